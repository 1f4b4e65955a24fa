"""Auxiliary routing losses on the router logits of one MoE layer (SPEC section 3).

All losses take the *clean* router logits ``g[T, E]`` (``T`` tokens, ``E``
experts) and return a Python float; each ``NAME_backward`` returns
``dy * dL/dlogits`` as a new float32 ``[T, E]`` array.  Per-token work
(softmax, logsumexp, top-k, the normal tail) runs in float32, sums over tokens
in float64, in fixed blocks of tokens reduced in order, so the result does not
depend on the number of threads.

Notation: ``q(x) = softmax(g(x))``, ``M`` the unmasked tokens.

=================  =========================================================
loss               formula
=================  =========================================================
importance         ``Imp_i = sum_x q_i(x)``; ``L = (std(Imp) / mean(Imp))^2``
load               ``P_i(x) = 1 - Phi((eta_k(x) - g_i(x)) / sigma)``,
                   ``Load_i = sum_x P_i(x)``; ``L = (std(Load) / mean(Load))^2``
switch             ``L = E * sum_i f_i * mean_x q_i(x)``
z                  ``L = mean_x (logsumexp_i g_i(x))^2``
damex              ``L = -mean_x log q_{target(x)}(x)``
=================  =========================================================

Conventions shared by every loss:

* ``mask[T]`` (bool, ``False`` = padding): a padding token takes no part in any
  sum, mean or count, and its gradient is 0.  Its logits, noise and target are
  not read for the loss (they must still be finite, and are not range-checked).
* An empty batch (``T = 0`` or every token masked) gives loss ``0.0`` and a zero
  gradient, for every loss, so a micro-batch without routed tokens needs no
  special case.  (The importance and load losses are 0/0 there; 0 is their
  value in the limit of a balanced batch.)
* NaN or inf in ``logits`` or ``noise`` raises ValueError.
* The seed configuration ``L_imp + L_load / 2`` and the V-MoE/Tutel balance
  loss ``0.5 L_imp + 0.5 L_load`` are weighted sums: call both losses and pass
  the weight as ``dy`` to each backward.
"""
import numpy as np

from .._lib import _C
from ._check import choice, f32, float_arg, i64, int_arg, mask_u8

VARIANCES = ("population", "unbiased")
PROBS = ("clean", "noisy")
COUNTS = ("top1", "topk")

__all__ = [
    "importance_loss_forward", "importance_loss_backward",
    "load_loss_forward", "load_loss_backward",
    "switch_loss_forward", "switch_loss_backward",
    "z_loss_forward", "z_loss_backward",
    "damex_loss_forward", "damex_loss_backward",
    "dataset_to_expert",
]


def _logits(logits):
    g = f32(logits, "logits", ndim=2, finite=True)
    if g.shape[1] < 1:
        raise ValueError(f"logits: expected at least one expert (shape (T, E), E >= 1), got {g.shape}")
    return g


def _noise(noise, shape):
    return f32(noise, "noise", shape=shape, finite=True)


def _variance(variance, E):
    v = choice(variance, "variance", VARIANCES)
    if v == 1 and E < 2:
        raise ValueError(f"variance: 'unbiased' needs at least 2 experts, got E = {E}")
    return v


def _dy(dy, grad):
    """The upstream gradient of a loss: ``dy``, or ``grad``, its former name
    (still accepted as a keyword alias)."""
    if grad is None:
        return float_arg(dy, "dy")
    if dy != 1.0:
        raise TypeError("dy and grad: give one of them (grad is the former name of dy)")
    return float_arg(grad, "grad")


def _importance_args(logits, mask, noise, probs, variance):
    g = _logits(logits)
    T, E = g.shape
    m = mask_u8(mask, "mask", T)
    p = choice(probs, "probs", PROBS)
    v = _variance(variance, E)
    n = None
    if p == 1:
        if noise is None:
            raise ValueError("noise: probs='noisy' needs the noise sample (shape (T, E)), got None")
        n = _noise(noise, g.shape)
    return g, n, m, T, E, v


def importance_loss_forward(logits, *, mask=None, noise=None, probs="clean", variance="population"):
    """V-MoE importance loss.

    ``Imp_i = sum_{x in M} q_i(x)``, ``L = (std(Imp) / mean(Imp))^2`` with the
    std over the ``E`` experts.

    Parameters
    ----------
    logits : ndarray, float, shape (T, E)
        Clean router logits ``g``.
    mask : ndarray of bool, shape (T,), optional
        False marks a padding token.
    noise : ndarray, float, shape (T, E), optional
        Gate noise; used only with ``probs="noisy"``.
    probs : {"clean", "noisy"}
        ``"clean"``: ``q = softmax(g)`` (V-MoE, Tutel, the SPEC default);
        ``"noisy"``: ``q = softmax(g + noise)``, the routing probabilities
        themselves (implementations that reuse the router's output).  The
        gradient is w.r.t. ``g`` with the noise held fixed.
    variance : {"population", "unbiased"}
        ``"population"`` divides by ``E`` (V-MoE: ``jnp.std``; the SPEC
        default); ``"unbiased"`` by ``E - 1`` (Tutel: ``torch.var``, which
        also adds 1e-10 to ``mean^2``; we add no epsilon).  Needs ``E >= 2``.

    Returns
    -------
    loss : float
    """
    g, n, m, T, E, v = _importance_args(logits, mask, noise, probs, variance)
    return _C.importance_loss_forward(g, n, m, T, E, v)


def importance_loss_backward(logits, *, mask=None, noise=None, probs="clean", variance="population",
                             dy=1.0, grad=None):
    """Gradient of :func:`importance_loss_forward` w.r.t. the clean logits.

    ``dlogits(x) = dy * q(x) * (a - q(x) . a)``, ``a_i = dL/dImp_i
    = 2 (Imp_i - mu) / (E' mu^2) - 2 var / (E mu^3)`` (``E'`` = ``E`` or
    ``E - 1``); padding rows are 0.

    Returns
    -------
    dlogits : ndarray, float32, shape (T, E)
    """
    gr = _dy(dy, grad)
    g, n, m, T, E, v = _importance_args(logits, mask, noise, probs, variance)
    d = np.zeros_like(g)
    _C.importance_loss_backward(d, gr, g, n, m, T, E, v)
    return d


def _load_args(logits, noise, sigma, k, mask, variance):
    g = _logits(logits)
    T, E = g.shape
    n = _noise(noise, g.shape)
    s = float_arg(sigma, "sigma", positive=True)
    kk = int_arg(k, "k", 1, E)
    m = mask_u8(mask, "mask", T)
    v = _variance(variance, E)
    return g, n, m, T, E, kk, s, v


def load_loss_forward(logits, noise, sigma, k, *, mask=None, variance="population"):
    """V-MoE load loss (noisy top-k), exactly as in V-MoE.

    ``g~ = g + noise``; ``eta_k(x)`` = the k-th largest entry of ``g~(x)``
    (ties to the lower expert index, as the router's top-k);
    ``P_i(x) = 1 - Phi((eta_k(x) - g_i(x)) / sigma)``, the probability that
    expert i is still among the top k if only its own noise is drawn again,
    computed as ``erfc(z / sqrt 2) / 2`` (accurate in the tail);
    ``Load_i = sum_{x in M} P_i(x)``; ``L = (std(Load) / mean(Load))^2``.

    Parameters
    ----------
    logits : ndarray, float, shape (T, E)
        Clean router logits ``g``.
    noise : ndarray, float, shape (T, E)
        The gate noise sample of this step (``sigma * N(0, 1)``).
    sigma : float > 0
        Noise standard deviation (``gate_noise / E`` in V-MoE and DAMEX).
    k : int in [1, E]
        Experts per token.
    mask : ndarray of bool, shape (T,), optional
    variance : {"population", "unbiased"}
        As in :func:`importance_loss_forward` (V-MoE population, Tutel
        unbiased).  Note that Tutel's ``load_importance_loss`` also differs
        in its argument: it takes ``Phi(softmax(g)_i - eta_k)``, clean
        *probabilities* against the k-th noisy *logit*; this function follows
        V-MoE and the SPEC (logits against logits).

    Returns
    -------
    loss : float
    """
    g, n, m, T, E, kk, s, v = _load_args(logits, noise, sigma, k, mask, variance)
    return _C.load_loss_forward(g, n, m, T, E, kk, s, v)


def load_loss_backward(logits, noise, sigma, k, *, mask=None, variance="population", dy=1.0,
                       grad=None):
    """Gradient of :func:`load_loss_forward` w.r.t. the clean logits, noise held fixed.

    With ``j(x)`` the index of the k-th noisy logit, ``z_i = (g~_j - g_i) /
    sigma`` and ``c_i = a_i phi(z_i) / sigma`` (``a = dL/dLoad``):
    ``dlogits_i = c_i`` for ``i != j`` and ``dlogits_j = -sum_{i != j} c_i``.
    The gradient flows through ``g_i`` and through ``eta_k = g_j + noise_j``;
    for ``i = j`` both dependencies cancel (``eta_k - g_j = noise_j``), so
    ``P_j`` contributes nothing.  At a tie of the k-th noisy logit with
    another entry the loss is continuous but not differentiable; the
    gradient returned is the one for the tie-broken ``j`` (lower index).

    Returns
    -------
    dlogits : ndarray, float32, shape (T, E)
    """
    gr = _dy(dy, grad)
    g, n, m, T, E, kk, s, v = _load_args(logits, noise, sigma, k, mask, variance)
    d = np.zeros_like(g)
    _C.load_loss_backward(d, gr, g, n, m, T, E, kk, s, v)
    return d


def _switch_args(logits, k, mask, counts):
    g = _logits(logits)
    T, E = g.shape
    kk = int_arg(k, "k", 1, E)
    m = mask_u8(mask, "mask", T)
    c = choice(counts, "counts", COUNTS)
    return g, m, T, E, kk, c


def switch_loss_forward(logits, *, k=1, mask=None, counts="top1"):
    """Switch Transformer / GShard load-balancing loss.

    ``L = E * sum_i f_i * P_i``, ``P_i = mean_{x in M} q_i(x)``.

    Parameters
    ----------
    logits : ndarray, float, shape (T, E)
        Router logits; ``f`` is taken from their top-k (ties to the lower
        index) and ``q = softmax(logits)``.  To reproduce Tutel's
        ``gshard_loss``, which uses the *noisy* probabilities and top-1,
        pass ``logits + noise`` (the gradient w.r.t. ``g`` is the same).
    k : int in [1, E]
        Experts per token; used by ``counts="topk"`` only.
    mask : ndarray of bool, shape (T,), optional
    counts : {"top1", "topk"}
        ``"top1"``: ``f_i`` = fraction of tokens whose top-1 expert is i
        (Switch Transformer, GShard, Tutel ``gshard_loss``, fairseq/DeepSpeed
        top-2 gating: all count the first choice only).  ``"topk"``:
        ``f_i`` = fraction of all ``k |M|`` choices that are i, i.e. counts
        over the k choices divided by k (Megatron-Core, MegaBlocks).
        HuggingFace's Mixtral ``load_balancing_loss_func`` does not divide by
        k: it is ``k`` times this loss.

    Returns
    -------
    loss : float
        1.0 for a perfectly balanced router.
    """
    g, m, T, E, kk, c = _switch_args(logits, k, mask, counts)
    return _C.switch_loss_forward(g, m, T, E, kk, c)


def switch_loss_backward(logits, *, k=1, mask=None, counts="top1", dy=1.0, grad=None):
    """Gradient of :func:`switch_loss_forward`; only through ``q`` (``f`` is
    piecewise constant): ``dlogits(x) = dy * q(x) * (a - q(x) . a)``,
    ``a_i = E f_i / |M|``.

    Returns
    -------
    dlogits : ndarray, float32, shape (T, E)
    """
    gr = _dy(dy, grad)
    g, m, T, E, kk, c = _switch_args(logits, k, mask, counts)
    d = np.zeros_like(g)
    _C.switch_loss_backward(d, gr, g, m, T, E, kk, c)
    return d


def z_loss_forward(logits, *, mask=None):
    """ST-MoE router z-loss ``L = mean_{x in M} (logsumexp_i g_i(x))^2``.

    Parameters
    ----------
    logits : ndarray, float, shape (T, E)
    mask : ndarray of bool, shape (T,), optional

    Returns
    -------
    loss : float
    """
    g = _logits(logits)
    T, E = g.shape
    return _C.z_loss_forward(g, mask_u8(mask, "mask", T), T, E)


def z_loss_backward(logits, *, mask=None, dy=1.0, grad=None):
    """Gradient of :func:`z_loss_forward`: ``dlogits(x) = dy * 2 lse(x) q(x) / |M|``.

    Returns
    -------
    dlogits : ndarray, float32, shape (T, E)
    """
    gr = _dy(dy, grad)
    g = _logits(logits)
    T, E = g.shape
    d = np.zeros_like(g)
    _C.z_loss_backward(d, gr, g, mask_u8(mask, "mask", T), T, E)
    return d


def _damex_args(logits, expert_target, mask):
    g = _logits(logits)
    T, E = g.shape
    y = i64(expert_target, "expert_target", shape=(T,))
    m = mask_u8(mask, "mask", T)
    yv = y if m is None else y[m.astype(bool)]
    if yv.size and (yv.min() < 0 or yv.max() >= E):
        bad = yv[(yv < 0) | (yv >= E)][0]
        raise ValueError(f"expert_target: values must be in [0, {E}) (E = {E} experts), got {bad}")
    return g, y, m, T, E


def damex_loss_forward(logits, expert_target, *, mask=None):
    """DAMEX loss: token-level cross-entropy of the clean router towards the
    dataset's expert, ``L = -(1/|M|) sum_{x in M} log q_{target(x)}(x)``.

    Parameters
    ----------
    logits : ndarray, float, shape (T, E)
        Clean router logits.
    expert_target : ndarray, int, shape (T,)
        Target expert ``h(d(x))`` of every token, in ``[0, E)``; see
        :func:`dataset_to_expert`.  Targets of padding tokens are ignored
        (e.g. -1 is allowed there).
    mask : ndarray of bool, shape (T,), optional

    Returns
    -------
    loss : float
    """
    g, y, m, T, E = _damex_args(logits, expert_target, mask)
    return _C.damex_loss_forward(g, y, m, T, E)


def damex_loss_backward(logits, expert_target, *, mask=None, dy=1.0, grad=None):
    """Gradient of :func:`damex_loss_forward`:
    ``dlogits(x) = dy * (q(x) - onehot(target(x))) / |M|``.

    Returns
    -------
    dlogits : ndarray, float32, shape (T, E)
    """
    gr = _dy(dy, grad)
    g, y, m, T, E = _damex_args(logits, expert_target, mask)
    d = np.zeros_like(g)
    _C.damex_loss_backward(d, gr, g, y, m, T, E)
    return d


def dataset_to_expert(dataset_ids, mapping, num_experts):
    """Target expert of every token: ``expert_target[x] = mapping[dataset_ids[x]]``.

    Parameters
    ----------
    dataset_ids : ndarray, int, shape (T,) (any shape is accepted)
        Dataset index ``d(x)`` of every token, in ``[0, num_datasets)``.  A
        token's dataset is its image's: for tokens laid out ``[B, Q]`` use
        ``np.repeat(image_dataset_ids, Q)``.
    mapping : ndarray, int, shape (num_datasets,)
        ``h``: the expert of each dataset, in ``[0, num_experts)``; several
        datasets may share one expert.
    num_experts : int >= 1

    Returns
    -------
    expert_target : ndarray, int64, same shape as dataset_ids
    """
    E = int_arg(num_experts, "num_experts", lo=1)
    h = i64(mapping, "mapping", ndim=1)
    if h.size == 0:
        raise ValueError("mapping: expected at least one dataset, got shape (0,)")
    if h.min() < 0 or h.max() >= E:
        bad = h[(h < 0) | (h >= E)][0]
        raise ValueError(f"mapping: expert indices must be in [0, {E}) (num_experts = {E}), got {bad}")
    d = i64(dataset_ids, "dataset_ids")
    if d.size and (d.min() < 0 or d.max() >= h.size):
        bad = d[(d < 0) | (d >= h.size)].flat[0]
        raise ValueError(f"dataset_ids: values must be in [0, {h.size}) (len(mapping) = {h.size}), "
                         f"got {bad}")
    return h[d]
