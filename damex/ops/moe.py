"""The MoE layer after routing: dispatch, expert FFN, combine, and the whole layer.

Routing (see :mod:`damex.ops.router`) gives, per token ``t`` and choice ``j``,
``expert_index[t, j]``, ``slot[t, j]`` (-1 where dropped or masked) and the
per-expert ``expert_count``.  The kept token-slots are packed by expert: the
rows of expert ``e`` are ``offset[e] + slot`` with ``offset`` the exclusive
cumsum of ``expert_count``, ``N = expert_count.sum()`` rows in all.

- dispatch: ``xe[row(t, j)] = x[t]``
- expert FFN, for the rows of expert e:
  ``h = xe @ w1[e] + b1[e]``, ``a = act(h)``, ``ye = a @ w2[e] + b2[e]``
- combine: ``y[t] = sum_j combine_weight[t, j] * ye[row(t, j)]`` (kept j only)

``moe_forward`` runs router -> dispatch -> expert FFN -> combine;
``moe_backward`` runs them backwards, adding the gradient of any routing loss
(``dlogits``, w.r.t. the clean logits) before the router matmul backward.
Weights are referenced, not copied, by the saved state: do not modify them in
place between a forward and its backward.
"""
import sys

import numpy as np

from .._lib import _C
from ._check import check_shape, f32, i64
from .activation import activation_code

__all__ = ["dispatch_forward", "dispatch_backward", "expert_ffn_forward",
           "expert_ffn_backward", "combine_forward", "combine_backward",
           "moe_forward", "moe_backward", "ExpertSaved", "MoEState", "clear_buffer_cache"]


class ExpertSaved:
    """What :func:`expert_ffn_backward` needs from :func:`expert_ffn_forward`.

    Attributes: ``xe[N,D]`` packed inputs, ``h[N,F]`` pre-activations,
    ``a[N,F]`` activations, ``expert_count[E]``, ``w1``, ``w2`` (float32,
    referenced), ``activation``.
    """

    __slots__ = ("xe", "h", "a", "expert_count", "w1", "w2", "activation")

    def __init__(self, xe, h, a, expert_count, w1, w2, activation):
        self.xe, self.h, self.a = xe, h, a
        self.expert_count, self.w1, self.w2 = expert_count, w1, w2
        self.activation = activation


class MoEState:
    """What :func:`moe_backward` needs from :func:`moe_forward`.

    Attributes: ``router`` (the RouterResult), ``x[T,D]``, ``w_router[D,E]``,
    ``expert`` (:class:`ExpertSaved`), ``ye[N,D]`` expert outputs.
    """

    __slots__ = ("router", "x", "w_router", "expert", "ye")

    def __init__(self, router, x, w_router, expert, ye):
        self.router, self.x, self.w_router = router, x, w_router
        self.expert, self.ye = expert, ye


# ---- work buffers ----------------------------------------------------------------

class _BufferPool:
    """Large float32 work buffers, reused once nothing else references them.

    A fresh large NumPy array gets fresh pages from the OS, and faulting them
    in costs ~20% of the expert FFN forward at N=16384, F=2048.  The pool keeps
    the buffers it handed out; one is free again when the pool holds the only
    reference to it (an array handed out is a view whose base is the buffer,
    so a buffer behind any live array, saved state or user view is never
    handed out twice).  Small arrays bypass it.  The GIL makes take() atomic.
    """

    MIN_BYTES = 1 << 22
    MAX_BUFFERS = 24

    def __init__(self):
        self._buffers = []
        # The reference count of a buffer only the pool holds, seen through the
        # very calls take() makes (list, loop variable, argument): measured,
        # not assumed, so it holds on any CPython.
        for probe in [np.empty(1, np.float32)]:
            self._free_refs = self._refcount(probe)

    @staticmethod
    def _refcount(buf):
        return sys.getrefcount(buf)

    def take(self, shape, zero=False):
        n = 1
        for d in shape:
            n *= int(d)
        if 4 * n < self.MIN_BYTES:
            return np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
        out = None
        for buf in self._buffers:
            if buf.size == n and self._refcount(buf) <= self._free_refs:
                out = buf.reshape(shape)
                break
        if out is None:
            if len(self._buffers) >= self.MAX_BUFFERS:
                for buf in self._buffers:
                    if self._refcount(buf) <= self._free_refs:
                        self._buffers.remove(buf)
                        break
            buf = np.empty(n, np.float32)
            self._buffers.append(buf)
            out = buf.reshape(shape)
        if zero:
            out.fill(0.0)
        return out

    def clear(self):
        """Forget every buffer (those still in use live on with their users)."""
        self._buffers = []


_pool = _BufferPool()


def clear_buffer_cache():
    """Release the large work buffers the MoE ops keep for reuse."""
    _pool.clear()


# ---- argument checks -------------------------------------------------------

def _expert_counts(expert_count, shape=None, most=None, most_what=""):
    """expert_count as int64, each >= 0, and N, their sum, exactly (an int64
    sum of forged counts can wrap negative); N <= ``most`` where given."""
    count = i64(expert_count, "expert_count", shape=shape, ndim=None if shape else 1)
    if (count < 0).any():
        raise ValueError("expert_count: counts must be >= 0")
    n = sum(count.tolist())
    if most is not None and n > most:
        raise ValueError(f"expert_count: the counts sum to {n}, more than {most_what} = {most}")
    return count, n


class _Routing:
    """expert_index, slot, expert_count of a routing result, checked and converted."""

    __slots__ = ("expert_index", "slot", "expert_count", "T", "k", "E", "N")

    def __init__(self, result):
        for name in ("expert_index", "slot", "expert_count"):
            if not hasattr(result, name):
                raise TypeError(f"result: expected a RouterResult with field {name!r}")
        self.expert_index = i64(result.expert_index, "expert_index", ndim=2)
        self.T, self.k = self.expert_index.shape
        if self.k < 1:
            raise ValueError(f"expert_index: expected at least one choice per token, got shape "
                             f"{self.expert_index.shape}")
        self.slot = i64(result.slot, "slot", shape=(self.T, self.k))
        self.expert_count, self.N = _expert_counts(result.expert_count, most=self.T * self.k,
                                                   most_what="T*k, the choices")
        self.E = self.expert_count.shape[0]
        if self.E < 1:
            raise ValueError("expert_count: expected at least one expert")

    def args(self):
        return self.expert_index, self.slot, self.expert_count


def _combine_weight(result, r):
    if not hasattr(result, "combine_weight"):
        raise TypeError("result: expected a RouterResult with field 'combine_weight'")
    return f32(result.combine_weight, "combine_weight", shape=(r.T, r.k))


def _expert_weights(w1, b1, w2, b2):
    """Convert and cross-check the expert weights; returns them and (E, D, F)."""
    w1 = f32(w1, "w1", ndim=3)
    E, D, F = w1.shape
    if E < 1 or D < 1 or F < 1:
        raise ValueError(f"w1: expected shape (E, D, F) with all sizes >= 1, got {w1.shape}")
    b1 = f32(b1, "b1", shape=(E, F))
    w2 = f32(w2, "w2", shape=(E, F, D))
    b2 = f32(b2, "b2", shape=(E, D))
    return w1, b1, w2, b2, (E, D, F)


# ---- dispatch ----------------------------------------------------------------

def dispatch_forward(x, result):
    """Gather token rows into a buffer packed by expert.

    Parameters
    ----------
    x : ndarray [T, D]
    result : RouterResult (uses expert_index[T,k], slot[T,k], expert_count[E])

    Returns
    -------
    xe : ndarray [N, D], ``xe[offset[e] + slot[t, j]] = x[t]`` for every kept choice,
        ``N = expert_count.sum()``.
    """
    r = _Routing(result)
    x = f32(x, "x", shape=(r.T, None))
    return _dispatch(x, r)


def _dispatch(x, r):
    D = x.shape[1]
    xe = _pool.take((r.N, D))
    _C.dispatch_forward(xe, x, *r.args(), r.T, r.k, D, r.E, r.N)
    return xe


def dispatch_backward(dy, result, T):
    """Gradient of :func:`dispatch_forward`: ``dx[t] = sum_{kept j} dy[row(t, j)]``.

    Parameters
    ----------
    dy : ndarray [N, D], the gradient of ``xe``
    result : RouterResult
    T : int, number of tokens (must match result.expert_index)

    Returns
    -------
    dx : ndarray [T, D] (0 for tokens with no kept choice)
    """
    r = _Routing(result)
    if int(T) != r.T:
        raise ValueError(f"T: expected {r.T} (rows of expert_index), got {T}")
    dy = f32(dy, "dy", shape=(r.N, None))
    return _dispatch_backward(dy, r)


def _dispatch_backward(dxe, r):
    D = dxe.shape[1]
    dx = np.zeros((r.T, D), np.float32)
    _C.dispatch_backward(dx, dxe, *r.args(), r.T, r.k, D, r.E, r.N)
    return dx


# ---- expert FFN --------------------------------------------------------------

def expert_ffn_forward(xe, expert_count, w1, b1, w2, b2, activation="gelu_tanh"):
    """All experts' FFNs, each on exactly its own packed rows.

    For the rows of expert e: ``h = xe @ w1[e] + b1[e]``, ``a = act(h)``,
    ``ye = a @ w2[e] + b2[e]``.

    Parameters
    ----------
    xe : ndarray [N, D], rows packed by expert
    expert_count : int array [E], rows per expert, summing to N
    w1 : ndarray [E, D, F]
    b1 : ndarray [E, F]
    w2 : ndarray [E, F, D]
    b2 : ndarray [E, D]
    activation : {"gelu_tanh", "gelu", "relu"}

    Returns
    -------
    ye : ndarray [N, D]
    saved : ExpertSaved, for :func:`expert_ffn_backward`
    """
    code = activation_code(activation)
    w1, b1, w2, b2, (E, D, F) = _expert_weights(w1, b1, w2, b2)
    xe = f32(xe, "xe", ndim=2)
    count, N = _expert_counts(expert_count, shape=(E,), most=xe.shape[0], most_what="the rows of xe")
    xe = check_shape(xe, "xe", shape=(N, D))
    return _expert_ffn(xe, count, w1, b1, w2, b2, activation, code)


def _expert_ffn(xe, count, w1, b1, w2, b2, activation, code):
    E, D, F = w1.shape
    N = xe.shape[0]
    ye = _pool.take((N, D))
    h = _pool.take((N, F))
    a = _pool.take((N, F))
    _C.expert_ffn_forward(ye, h, a, xe, w1, b1, w2, b2, count, E, D, F, N, code)
    return ye, ExpertSaved(xe, h, a, count, w1, w2, activation)


def expert_ffn_backward(dy, saved):
    """Gradients of :func:`expert_ffn_forward`.

    Parameters
    ----------
    dy : ndarray [N, D], the gradient of ``ye``
    saved : ExpertSaved from the forward

    Returns
    -------
    dxe : ndarray [N, D]
    dw1 : ndarray [E, D, F]
    db1 : ndarray [E, F]
    dw2 : ndarray [E, F, D]
    db2 : ndarray [E, D]
    """
    if not isinstance(saved, ExpertSaved):
        raise TypeError(f"saved: expected the ExpertSaved of expert_ffn_forward, got "
                        f"{type(saved).__name__}")
    N, D = saved.xe.shape
    dy = f32(dy, "dy", shape=(N, D))
    return _expert_ffn_backward(dy, saved)


def _expert_ffn_backward(dy, s):
    E, D, F = s.w1.shape
    N = s.xe.shape[0]
    dxe = _pool.take((N, D))  # every output is overwritten (moe.h)
    dh = _pool.take((N, F))  # scratch
    dw1 = np.empty((E, D, F), np.float32)
    db1 = np.empty((E, F), np.float32)
    dw2 = np.empty((E, F, D), np.float32)
    db2 = np.empty((E, D), np.float32)
    _C.expert_ffn_backward(dxe, dw1, db1, dw2, db2, dh, dy, s.xe, s.h, s.a, s.w1, s.w2,
                           s.expert_count, E, D, F, N, activation_code(s.activation))
    return dxe, dw1, db1, dw2, db2


# ---- combine -------------------------------------------------------------------

def combine_forward(ye, result):
    """Weighted sum of each token's expert outputs.

    Parameters
    ----------
    ye : ndarray [N, D], expert outputs packed by expert
    result : RouterResult (uses combine_weight[T,k] and the routing arrays)

    Returns
    -------
    y : ndarray [T, D], ``y[t] = sum_{kept j} combine_weight[t, j] * ye[row(t, j)]``
        (0 for a token with no kept choice).
    """
    r = _Routing(result)
    cw = _combine_weight(result, r)
    ye = f32(ye, "ye", shape=(r.N, None))
    return _combine(ye, cw, r)


def _combine(ye, cw, r):
    D = ye.shape[1]
    y = np.empty((r.T, D), np.float32)
    _C.combine_forward(y, ye, cw, *r.args(), r.T, r.k, D, r.E, r.N)
    return y


def combine_backward(dy, ye, result):
    """Gradients of :func:`combine_forward`.

    Parameters
    ----------
    dy : ndarray [T, D]
    ye : ndarray [N, D]
    result : RouterResult

    Returns
    -------
    dye : ndarray [N, D], ``dye[row(t, j)] = combine_weight[t, j] * dy[t]``
    dcombine_weight : ndarray [T, k], ``<dy[t], ye[row(t, j)]>``, 0 where dropped
    """
    r = _Routing(result)
    cw = _combine_weight(result, r)
    ye = f32(ye, "ye", shape=(r.N, None))
    dy = f32(dy, "dy", shape=(r.T, ye.shape[1]))
    return _combine_backward(dy, ye, cw, r)


def _combine_backward(dy, ye, cw, r):
    D = ye.shape[1]
    dye = _pool.take((r.N, D), zero=True)
    dcw = np.zeros((r.T, r.k), np.float32)
    _C.combine_backward(dye, dcw, dy, ye, cw, *r.args(), r.T, r.k, D, r.E, r.N)
    return dye, dcw


# ---- the whole layer ---------------------------------------------------------------

def moe_forward(x, w_router, w1, b1, w2, b2, *, k=1, noise=None, capacity_factor=None,
                bpr=False, normalize=False, activation="gelu_tanh", mask=None):
    """The MoE layer: router, dispatch, expert FFNs, combine.

    Parameters
    ----------
    x : ndarray [T, D], tokens (finite)
    w_router : ndarray [D, E]
    w1, b1, w2, b2 : ndarrays [E, D, F], [E, F], [E, F, D], [E, D], the expert FFNs
    k, noise, capacity_factor, bpr, normalize, mask :
        routing options, as in :func:`damex.ops.router_forward`
    activation : {"gelu_tanh", "gelu", "relu"}

    Returns
    -------
    y : ndarray [T, D], ``sum over kept choices of combine_weight * expert(x)``;
        0 for a token whose choices were all dropped or masked (the residual carries it)
    state : MoEState, with ``state.router`` the RouterResult
    """
    from .router import router_forward

    code = activation_code(activation)
    x = f32(x, "x", ndim=2)  # router_forward refuses NaN/inf in x
    T, D = x.shape
    w1, b1, w2, b2, (E, Dw, F) = _expert_weights(w1, b1, w2, b2)
    if Dw != D:
        raise ValueError(f"w1: expected shape ({E}, {D}, {F}) (D from x), got {w1.shape}")
    w_router = f32(w_router, "w_router", shape=(D, E))
    result = router_forward(x, w_router, k=k, noise=noise, capacity_factor=capacity_factor,
                            bpr=bpr, normalize=normalize, mask=mask)
    r = _Routing(result)
    cw = _combine_weight(result, r)
    xe = _dispatch(x, r)
    ye, saved = _expert_ffn(xe, r.expert_count, w1, b1, w2, b2, activation, code)
    y = _combine(ye, cw, r)
    return y, MoEState(result, x, w_router, saved, ye)


def moe_backward(dy, state, *, dlogits=None):
    """Gradients of :func:`moe_forward`.

    Parameters
    ----------
    dy : ndarray [T, D]
    state : MoEState from the forward
    dlogits : ndarray [T, E], optional
        Gradient of routing losses w.r.t. the clean router logits; added to the
        gradient that reaches the logits through the combine weights.

    Returns
    -------
    dict with ``x [T,D]``, ``w_router [D,E]``, ``w1 [E,D,F]``, ``b1 [E,F]``,
    ``w2 [E,F,D]``, ``b2 [E,D]``.
    """
    from .router import router_backward

    if not isinstance(state, MoEState):
        raise TypeError(f"state: expected the MoEState of moe_forward, got {type(state).__name__}")
    x = state.x
    T, D = x.shape
    E = state.w_router.shape[1]
    dy = f32(dy, "dy", shape=(T, D))
    if dlogits is not None:
        dlogits = f32(dlogits, "dlogits", shape=(T, E))
    result = state.router
    r = _Routing(result)
    cw = _combine_weight(result, r)
    dye, dcw = _combine_backward(dy, state.ye, cw, r)
    dxe, dw1, db1, dw2, db2 = _expert_ffn_backward(dye, state.expert)
    dx = _dispatch_backward(dxe, r)
    dl = router_backward(dcw, result)
    if dlogits is not None:
        dl += dlogits
    # dx += dl @ w_router^T (onto the dispatch gradient), dw_router = x^T @ dl
    dw_router = np.zeros((D, E), np.float32)
    _C.router_logits_backward(dx, dw_router, dl, x, state.w_router, T, D, E)
    return {"x": dx, "w_router": dw_router, "w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
