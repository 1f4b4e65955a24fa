"""A small reverse-mode tape over float32 NumPy arrays.

A :class:`Tensor` wraps a float32 array.  Every differentiable operation that
has an input with ``requires_grad`` records a :class:`Node`: the input tensors
(parents) and a backward closure that maps the gradients of the node's outputs
to gradients of its parents.  ``loss.backward()`` visits the nodes in reverse
topological order, accumulates gradients of tensors used in several places,
and adds the result into ``.grad`` of the leaves (tensors that require grad and
were not produced by a recorded op), as PyTorch does.

A node may have several outputs (the MoE op gives ``y`` and the routing loss);
its backward runs once, after every output's gradient has arrived, and gets
zeros for outputs that received none.

Heavy operations (linear, norms, attention, MoE ...) live in
:mod:`damex.functional` and wrap one ``damex.ops`` forward/backward pair each;
this file keeps the elementwise algebra, reductions and shape ops in NumPy.
Integer index arrays stay plain NumPy int64 arrays, and comparisons return
NumPy boolean arrays (they carry no gradient).
"""
import contextlib
import threading
import time

import numpy as np

__all__ = ["Tensor", "Node", "tensor", "no_grad", "enable_grad", "is_grad_enabled",
           "set_grad_enabled", "cat", "stack", "where", "zeros", "ones", "as_tensor",
           "set_backward_hook"]

_state = threading.local()

# Profiling: when set, ``backward_from`` calls ``_backward_hook(node, seconds)`` after
# each node's backward closure (wall time of the closure only; not the tape's own
# accumulation).  None (the default) costs one ``is None`` test per node.
_backward_hook = None


def set_backward_hook(hook):
    """Install ``hook(node, seconds)`` called after every node's backward; None removes it.

    For profiling (``bench/bench_train.py``): ``node.name`` is the op (``linear``,
    ``ms_deform_attn``, ``moe`` ...) and the node object can be mapped back to the
    module that recorded it.  Returns the previous hook.
    """
    global _backward_hook
    old, _backward_hook = _backward_hook, hook
    return old


def is_grad_enabled():
    """True unless inside :func:`no_grad`."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def set_grad_enabled(mode):
    """Context manager that switches recording on or off."""
    old = is_grad_enabled()
    _state.enabled = bool(mode)
    try:
        yield
    finally:
        _state.enabled = old


def no_grad():
    """Context manager: operations inside record nothing (like ``torch.no_grad``)."""
    return set_grad_enabled(False)


def enable_grad():
    """Context manager: recording on, even inside :func:`no_grad`."""
    return set_grad_enabled(True)


def _f32(x):
    a = np.asarray(x)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return a


class Node:
    """One recorded operation.

    ``parents`` are the input Tensors, ``backward(grads)`` takes a list with
    one float32 array per output and returns one gradient (or None) per parent.
    ``out_shapes`` lets the tape give zeros to outputs no gradient reached.
    """
    __slots__ = ("parents", "backward", "out_shapes", "name")

    def __init__(self, parents, backward, out_shapes, name):
        self.parents = parents
        self.backward = backward
        self.out_shapes = out_shapes
        self.name = name

    def __repr__(self):
        return f"<Node {self.name}>"


class Tensor:
    """A float32 NumPy array with an optional gradient.

    Parameters
    ----------
    data : array_like
        Converted to a float32 array (a copy only when needed).
    requires_grad : bool
        Whether ``backward`` should compute ``.grad`` for this tensor.
    """
    __array_ufunc__ = None  # numpy defers ``ndarray + Tensor`` to Tensor.__radd__
    __hash__ = object.__hash__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        self.data = _f32(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self._out_index = 0
        self._retain = False

    # ------------------------------------------------------------------ basics
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    def size(self, dim=None):
        """The shape, or its entry ``dim`` (torch's ``Tensor.size``)."""
        return self.data.shape if dim is None else self.data.shape[dim]

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def is_leaf(self):
        return self._node is None

    @property
    def grad_fn(self):
        return self._node

    def numel(self):
        return self.data.size

    def dim(self):
        return self.data.ndim

    def __len__(self):
        return len(self.data)

    def numpy(self):
        """The underlying float32 array (shared, not a copy; like torch's ``.numpy()``)."""
        return self.data

    def item(self):
        return float(self.data.reshape(-1)[0]) if self.data.size == 1 else self.data.item()

    def tolist(self):
        return self.data.tolist()

    def __bool__(self):
        return bool(self.data)

    def __float__(self):
        return float(self.item())

    def __repr__(self):
        extra = ""
        if self._node is not None:
            extra = f", grad_fn={self._node.name}"
        elif self.requires_grad:
            extra = ", requires_grad=True"
        return f"Tensor({np.array2string(self.data, precision=4, separator=', ')}{extra})"

    def detach(self):
        """A tensor sharing the data, cut from the tape."""
        return Tensor(self.data, requires_grad=False)

    def clone(self):
        return _unary(self, self.data.copy(), lambda g: g, "clone")

    def requires_grad_(self, mode=True):
        if self._node is not None and not mode:
            raise RuntimeError("requires_grad_(False) is only allowed on leaf tensors; use detach()")
        self.requires_grad = bool(mode)
        return self

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after backward."""
        self._retain = True
        return self

    def zero_grad(self):
        self.grad = None

    # ------------------------------------------------------------ the backward
    def backward(self, dy=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) * dy into ``leaf.grad`` of every leaf.

        Parameters
        ----------
        dy : array_like, optional
            The gradient of some scalar w.r.t. this tensor; defaults to 1 for a
            one-element tensor.
        retain_graph : bool
            Keep the backward closures so backward can run again through the
            same graph (by default they are freed, as in PyTorch).
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad and has no grad_fn")
        if dy is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward: dy can be implicitly created only for a one-element "
                                   f"tensor, got shape {self.shape}")
            dy = np.ones(self.shape, np.float32)
        dy = _f32(dy)
        if dy.shape != self.shape:
            raise ValueError(f"backward: dy has shape {dy.shape}, expected {self.shape}")
        backward_from([(self, dy)], retain_graph=retain_graph)

    # ------------------------------------------------------------------ algebra
    # Operators and methods that are this module's functions with the tensor first are
    # attached from one table below the functions (_METHODS); what remains here does more.
    def __neg__(self):
        return _unary(self, -self.data, lambda g: -g, "neg")

    # comparisons: plain boolean arrays, no gradient
    def __lt__(self, other):
        return self.data < _raw(other)

    def __le__(self, other):
        return self.data <= _raw(other)

    def __gt__(self, other):
        return self.data > _raw(other)

    def __ge__(self, other):
        return self.data >= _raw(other)

    def __eq__(self, other):
        return self.data == _raw(other)

    def __ne__(self, other):
        return self.data != _raw(other)

    def neg(self):
        return -self

    def sum(self, axis=None, keepdims=False, dim=None, keepdim=None):
        return sum(self, _axis(axis, dim), _keep(keepdims, keepdim))

    def mean(self, axis=None, keepdims=False, dim=None, keepdim=None):
        return mean(self, _axis(axis, dim), _keep(keepdims, keepdim))

    def max(self, axis=None, keepdims=False, dim=None, keepdim=None):
        return max(self, _axis(axis, dim), _keep(keepdims, keepdim))

    def argmax(self, axis=None):
        return np.argmax(self.data, axis=axis)

    @property
    def T(self):
        return permute(self, *reversed(range(self.ndim)))

    # sigmoid, softmax and relu (C kernels) are attached by damex.functional, which
    # imports this module (never the other way round)


# ------------------------------------------------------------------ the tape

def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _axis(axis, dim):
    return dim if dim is not None else axis


def _keep(keepdims, keepdim):
    return keepdim if keepdim is not None else keepdims


def as_tensor(x):
    """``x`` if it is a Tensor, else a constant Tensor of it."""
    return x if isinstance(x, Tensor) else Tensor(x)


tensor = Tensor


def zeros(*shape, requires_grad=False):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(np.zeros(shape, np.float32), requires_grad=requires_grad)


def ones(*shape, requires_grad=False):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(np.ones(shape, np.float32), requires_grad=requires_grad)


def record(outputs, parents, backward, name):
    """Wrap output arrays as Tensors and, if needed, record one Node.

    Parameters
    ----------
    outputs : ndarray or tuple of ndarray
        The op's results (converted to float32).
    parents : sequence of Tensor or None
        The op's differentiable inputs (None entries are ignored by backward).
    backward : callable
        ``backward(grads)`` with ``grads`` a list (one per output, zeros if the
        output got no gradient) returning a sequence with one gradient or None
        per parent.  Single-output ops may use :func:`_unary` style helpers.
    name : str
        Shown in ``grad_fn``.

    Returns
    -------
    Tensor or tuple of Tensor, matching ``outputs``.
    """
    single = not isinstance(outputs, (tuple, list))
    outs = [outputs] if single else list(outputs)
    tensors = [Tensor(o) for o in outs]
    needs = is_grad_enabled() and any(p is not None and p.requires_grad for p in parents)
    if needs:
        node = Node(list(parents), backward, [t.shape for t in tensors], name)
        for i, t in enumerate(tensors):
            t.requires_grad = True
            t._node = node
            t._out_index = i
    return tensors[0] if single else tuple(tensors)


def _unary(x, out, grad_fn, name):
    return record(out, [x], lambda gs: (grad_fn(gs[0]),), name)


def _toposort(roots):
    order, seen = [], set()
    stack = [(n, False) for n in roots]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node.parents:
            if p is not None and p._node is not None and id(p._node) not in seen:
                stack.append((p._node, False))
    return order[::-1]  # outputs before inputs


def backward_from(pairs, retain_graph=False):
    """Run the tape backward from several (tensor, grad) pairs at once."""
    grads = {}          # id(node) -> list of per-output grads
    nodes = []
    retained = []
    for t, g in pairs:
        if t._node is None:
            _accumulate_leaf(t, g)
        else:
            slot = grads.setdefault(id(t._node), [None] * len(t._node.out_shapes))
            i = t._out_index
            slot[i] = g.copy() if slot[i] is None else slot[i] + g
            nodes.append(t._node)
    for node in _toposort(nodes):
        out_grads = grads.pop(id(node), None)
        if out_grads is None:
            continue
        if node.backward is None:
            raise RuntimeError(f"backward through {node.name} a second time: the graph was freed; "
                               "pass retain_graph=True to the first backward")
        out_grads = [np.zeros(s, np.float32) if g is None else g
                     for g, s in zip(out_grads, node.out_shapes)]
        if _backward_hook is None:
            in_grads = node.backward(out_grads)
        else:
            t0 = time.perf_counter()
            in_grads = node.backward(out_grads)
            _backward_hook(node, time.perf_counter() - t0)
        if not retain_graph:
            node.backward = None
        for p, g in zip(node.parents, in_grads):
            if p is None or g is None or not p.requires_grad:
                continue
            g = _f32(g)
            if g.shape != p.shape:
                raise RuntimeError(f"{node.name}: backward gave a gradient of shape {g.shape} "
                                   f"for an input of shape {p.shape}")
            if p._node is None:
                _accumulate_leaf(p, g)
            else:
                slot = grads.setdefault(id(p._node), [None] * len(p._node.out_shapes))
                i = p._out_index
                slot[i] = g.copy() if slot[i] is None else slot[i] + g
                if p._retain:
                    retained.append((p, g))
    for p, g in retained:
        p.grad = g.copy() if p.grad is None else p.grad + g


def _accumulate_leaf(t, g):
    if not t.requires_grad:
        return
    if t.grad is None:
        t.grad = np.array(g, dtype=np.float32, copy=True)
    else:
        t.grad = t.grad + g


# ------------------------------------------------------- elementwise algebra

def unbroadcast(g, shape):
    """Sum ``g`` down to ``shape`` (the gradient of a NumPy broadcast)."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _binary(a, b, out, ga, gb, name):
    a_t, b_t = isinstance(a, Tensor), isinstance(b, Tensor)
    sa, sb = np.shape(_raw(a)), np.shape(_raw(b))

    def backward(gs):
        g = gs[0]
        return (unbroadcast(ga(g), sa) if a_t and a.requires_grad else None,
                unbroadcast(gb(g), sb) if b_t and b.requires_grad else None)
    return record(out, [a if a_t else None, b if b_t else None], backward, name)


def add(a, b):
    return _binary(a, b, _raw(a) + _raw(b), lambda g: g, lambda g: g, "add")


def sub(a, b):
    return _binary(a, b, _raw(a) - _raw(b), lambda g: g, lambda g: -g, "sub")


def mul(a, b):
    x, y = _raw(a), _raw(b)
    return _binary(a, b, x * y, lambda g: g * y, lambda g: g * x, "mul")


def div(a, b):
    x, y = _raw(a), _raw(b)
    return _binary(a, b, x / y, lambda g: g / y, lambda g: -g * x / (y * y), "div")


def pow(a, exponent):
    """``a ** exponent`` for a constant exponent."""
    if isinstance(exponent, Tensor):
        raise TypeError("pow: the exponent must be a number, not a Tensor")
    e = float(exponent)
    x = a.data
    return _unary(a, x ** e, lambda g: g * e * x ** (e - 1), "pow")


def exp(a):
    y = np.exp(a.data)
    return _unary(a, y, lambda g: g * y, "exp")


def log(a):
    x = a.data
    return _unary(a, np.log(x), lambda g: g / x, "log")


def sqrt(a):
    y = np.sqrt(a.data)
    return _unary(a, y, lambda g: g / (2 * y), "sqrt")


def abs(a):
    x = a.data
    return _unary(a, np.abs(x), lambda g: g * np.sign(x), "abs")


def tanh(a):
    y = np.tanh(a.data)
    return _unary(a, y, lambda g: g * (1 - y * y), "tanh")


def clamp(a, min=None, max=None):
    """Clip to [min, max]; the gradient passes where the value was inside (bounds included),
    as in PyTorch."""
    x = a.data
    y = np.clip(x, min, max) if (min is not None or max is not None) else x.copy()
    keep = np.ones(x.shape, bool)
    if min is not None:
        keep &= x >= min
    if max is not None:
        keep &= x <= max
    return _unary(a, y, lambda g: g * keep, "clamp")


def where(cond, a, b):
    """``a`` where ``cond`` (a boolean array) else ``b``, with broadcasting."""
    c = np.asarray(_raw(cond), dtype=bool)
    x, y = _raw(a), _raw(b)
    out = np.where(c, x, y)
    return _binary(a, b, out, lambda g: np.where(c, g, 0), lambda g: np.where(c, 0, g), "where")


def masked_fill(a, mask, value):
    """``a`` with ``value`` where ``mask`` (boolean, broadcast) is True."""
    m = np.asarray(_raw(mask), dtype=bool)
    out = np.where(m, np.float32(value), a.data)
    return _unary(a, out, lambda g: unbroadcast(np.where(m, 0, g), a.shape), "masked_fill")


def matmul(a, b):
    """``a @ b`` with NumPy's rules (1-D operands, batch broadcasting)."""
    a, b = as_tensor(a), as_tensor(b)
    x, y = a.data, b.data
    out = x @ y

    def backward(gs):
        g = gs[0]
        xa = x[None, :] if x.ndim == 1 else x
        yb = y[:, None] if y.ndim == 1 else y
        gg = g.reshape(np.broadcast_shapes(xa.shape[:-2], yb.shape[:-2]) + (xa.shape[-2], yb.shape[-1]))
        da = db = None
        if a.requires_grad:
            da = gg @ np.swapaxes(yb, -1, -2)
            da = unbroadcast(da, xa.shape).reshape(x.shape)
        if b.requires_grad:
            db = np.swapaxes(xa, -1, -2) @ gg
            db = unbroadcast(db, yb.shape).reshape(y.shape)
        return da, db
    return record(out, [a, b], backward, "matmul")


# ---------------------------------------------------------------- reductions

def _norm_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    return tuple(int(ax) % ndim for ax in axis) if ndim else ()


def sum(a, axis=None, keepdims=False):
    x = a.data
    axes = _norm_axis(axis, x.ndim)
    out = x.sum(axis=axes, keepdims=keepdims)

    def backward(gs):
        g = gs[0]
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g, x.shape).copy(),)
    return record(np.asarray(out, np.float32), [a], backward, "sum")


def mean(a, axis=None, keepdims=False):
    x = a.data
    axes = _norm_axis(axis, x.ndim)
    n = int(np.prod([x.shape[i] for i in axes])) if axes else 1
    out = x.mean(axis=axes, keepdims=keepdims)

    def backward(gs):
        g = gs[0]
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g / np.float32(n), x.shape).copy(),)
    return record(np.asarray(out, np.float32), [a], backward, "mean")


def max(a, axis=None, keepdims=False):
    """Maximum over ``axis`` (one axis or all); the gradient goes to the first maximum
    (PyTorch's ``max(dim)`` convention).  The indices come from ``argmax``."""
    x = a.data
    if axis is None:
        flat = int(np.argmax(x))
        out = x.reshape(-1)[flat]

        def backward(gs):
            g = np.zeros(x.size, np.float32)
            g[flat] = gs[0].reshape(-1)[0]
            return (g.reshape(x.shape),)
        out = np.asarray(out).reshape((1,) * x.ndim if keepdims else ())
        return record(out, [a], backward, "max")
    ax = int(axis) % x.ndim
    idx = np.expand_dims(np.argmax(x, axis=ax), ax)
    out = np.take_along_axis(x, idx, ax)

    def backward(gs):
        g = gs[0] if keepdims else np.expand_dims(gs[0], ax)
        d = np.zeros(x.shape, np.float32)
        np.put_along_axis(d, idx, g, ax)
        return (d,)
    return record(out if keepdims else np.squeeze(out, ax), [a], backward, "max")


# ------------------------------------------------------------------ shape ops

def _shape_args(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(int(s) for s in shape)


def reshape(a, *shape):
    x = a.data
    out = x.reshape(_shape_args(shape))
    return _unary(a, out, lambda g: g.reshape(x.shape), "reshape")


def flatten(a, start_dim=0, end_dim=-1):
    nd = a.ndim
    if nd == 0:
        return reshape(a, 1)
    s, e = start_dim % nd, end_dim % nd
    shape = a.shape[:s] + (int(np.prod(a.shape[s:e + 1])),) + a.shape[e + 1:]
    return reshape(a, shape)


def permute(a, *dims):
    dims = _shape_args(dims)
    inv = np.argsort(dims)
    return _unary(a, np.ascontiguousarray(a.data.transpose(dims)), lambda g: g.transpose(inv), "permute")


def transpose(a, dim0=None, dim1=None):
    """Swap two axes (``dim0``, ``dim1``); with no arguments swap the last two."""
    if dim0 is None and dim1 is None:
        dim0, dim1 = -2, -1
    dims = list(range(a.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(a, *dims)


def unsqueeze(a, dim):
    x = a.data
    return _unary(a, np.expand_dims(x, dim), lambda g: g.reshape(x.shape), "unsqueeze")


def squeeze(a, dim=None):
    x = a.data
    if dim is None:
        out = np.squeeze(x)
    else:
        out = np.squeeze(x, dim) if x.shape[dim] == 1 else x
    return _unary(a, out, lambda g: g.reshape(x.shape), "squeeze")


def expand(a, *shape):
    """Broadcast to ``shape`` (-1 keeps a size); the gradient sums back."""
    shape = _shape_args(shape)
    lead = len(shape) - a.ndim
    shape = tuple(a.shape[i - lead] if s == -1 else s for i, s in enumerate(shape))
    x = a.data
    return _unary(a, np.broadcast_to(x, shape).copy(), lambda g: unbroadcast(g, x.shape), "expand")


def _index(index):
    if isinstance(index, tuple):
        return tuple(_raw(i) for i in index)
    return _raw(index)


def getitem(a, index):
    """``a[index]`` with NumPy semantics (ints, slices, None, boolean and int64 arrays).
    The gradient scatters back, adding where an index repeats."""
    index = _index(index)
    x = a.data
    out = x[index]

    parts = index if isinstance(index, tuple) else (index,)
    repeats = any(np.asarray(p).dtype.kind in "iu" and np.ndim(p) > 0 for p in parts
                  if p is not None and not isinstance(p, slice) and p is not Ellipsis)

    def backward(gs):
        d = np.zeros(x.shape, np.float32)
        if repeats:
            np.add.at(d, index, gs[0])   # integer arrays may repeat an element
        else:
            d[index] = gs[0]
        return (d,)
    return record(np.array(out, np.float32, copy=True), [a], backward, "getitem")


def gather(a, dim, index):
    """``out[i][j] = a[i][index[i][j]]`` along ``dim`` (torch.gather); ``index`` int64."""
    index = np.asarray(_raw(index))
    if index.dtype.kind not in "iu":
        raise TypeError(f"gather: index must be an integer array, got dtype {index.dtype}")
    index = index.astype(np.int64, copy=False)
    x = a.data
    ax = dim % x.ndim
    out = np.take_along_axis(x, index, ax)

    def backward(gs):
        d = np.zeros(x.shape, np.float32)
        # scatter-add along ax (np.add.at with explicit full index tuples)
        grids = list(np.indices(index.shape, sparse=True))
        grids[ax] = index
        np.add.at(d, tuple(grids), gs[0])
        return (d,)
    return record(out, [a], backward, "gather")


def index_select(a, dim, index):
    """Rows ``index`` (1-D int64) of ``a`` along ``dim``."""
    index = np.asarray(_raw(index)).astype(np.int64, copy=False)
    sl = [slice(None)] * a.ndim
    sl[dim] = index
    return getitem(a, tuple(sl))


def cat(tensors, dim=0):
    """Concatenate along ``dim`` (``torch.cat``)."""
    ts = [as_tensor(t) for t in tensors]
    ax = dim % ts[0].ndim
    sizes = [t.shape[ax] for t in ts]
    out = np.concatenate([t.data for t in ts], axis=ax)
    bounds = np.cumsum(sizes)[:-1]

    def backward(gs):
        return np.split(gs[0], bounds, axis=ax)
    return record(out, ts, backward, "cat")


concat = cat


def stack(tensors, dim=0):
    ts = [as_tensor(t) for t in tensors]
    ax = dim % (ts[0].ndim + 1)
    out = np.stack([t.data for t in ts], axis=ax)

    def backward(gs):
        return [np.take(gs[0], i, axis=ax) for i in range(len(ts))]
    return record(out, ts, backward, "stack")


def split(a, split_size_or_sections, dim=0):
    """Split along ``dim`` into chunks of a size, or of the sizes in a list (``torch.split``)."""
    n = a.shape[dim]
    if isinstance(split_size_or_sections, (int, np.integer)):
        s = int(split_size_or_sections)
        sizes = [min(s, n - i) for i in range(0, n, s)]
    else:
        sizes = [int(s) for s in split_size_or_sections]
        if np.sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to {n} along dim {dim}")
    out, start = [], 0
    for s in sizes:
        sl = [slice(None)] * a.ndim
        sl[dim] = slice(start, start + s)
        out.append(getitem(a, tuple(sl)))
        start += s
    return tuple(out)


# Tensor operators and methods that call the function of the same name with the tensor
# first (``x.exp()`` is ``exp(x)``); reflected operators put it second.
_METHODS = {
    "__add__": add, "__sub__": sub, "__mul__": mul, "__truediv__": div, "__pow__": pow,
    "__matmul__": matmul, "__getitem__": getitem,
    "add": add, "sub": sub, "mul": mul, "div": div, "matmul": matmul, "pow": pow,
    "reshape": reshape, "view": reshape, "flatten": flatten, "transpose": transpose,
    "permute": permute, "unsqueeze": unsqueeze, "squeeze": squeeze, "expand": expand,
    "split": split, "gather": gather, "exp": exp, "log": log, "sqrt": sqrt, "abs": abs,
    "tanh": tanh, "clamp": clamp, "masked_fill": masked_fill,
}
_REFLECTED = {"__radd__": add, "__rsub__": sub, "__rmul__": mul, "__rtruediv__": div,
              "__rmatmul__": matmul}


def _method(fn):
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)
    method.__name__, method.__doc__ = fn.__name__, fn.__doc__
    return method


def _reflected(fn):
    def method(self, other):
        return fn(other, self)
    method.__name__ = fn.__name__
    return method


for _name, _fn in _METHODS.items():
    setattr(Tensor, _name, _method(_fn))
for _name, _fn in _REFLECTED.items():
    setattr(Tensor, _name, _reflected(_fn))
del _name, _fn
