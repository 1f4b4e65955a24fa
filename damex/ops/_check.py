"""Argument checks shared by the ops wrappers.

Every public op converts its arguments here: floating arrays become
C-contiguous float32, integer arrays C-contiguous int64.  A wrong kind of
dtype, a wrong shape or a non-finite value raises an exception that names the
argument, the expected and the given dtype/shape.  Inputs are never written:
a conversion copies, and the C kernels only read their inputs.
"""
import numpy as np


class NonFiniteInputError(ValueError):
    """NaN or inf in an input of an op that has no defined result for it (the
    router's top-k, the routing and box losses).  Ops that compute through NaN
    (matmuls, activations, norms) propagate it instead, as PyTorch; a caller
    such as the trainer can take this error for a non-finite loss."""


def contiguous(a, dtype):
    """``a`` as a C-contiguous array of ``dtype``, copied only if needed, with its
    shape kept (``np.ascontiguousarray`` turns a 0-d array into shape (1,))."""
    return np.asarray(a, dtype=dtype, order="C")


def _shape_ok(shape, expected):
    if len(shape) != len(expected):
        return False
    return all(e is None or e == s for s, e in zip(shape, expected))


def _fmt(expected):
    return "(" + ", ".join("?" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"


def check_shape(a, name, shape=None, ndim=None):
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if shape is not None and not _shape_ok(a.shape, shape):
        raise ValueError(f"{name}: expected shape {_fmt(shape)}, got {a.shape}")
    return a


def f32(x, name, shape=None, ndim=None, finite=False):
    """Return `x` as a C-contiguous float32 array (a copy only if needed).

    Raises TypeError for a non-floating dtype, ValueError for a wrong shape or
    (with ``finite=True``) for NaN/inf.
    """
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating array (float32), got dtype {a.dtype}")
    check_shape(a, name, shape, ndim)
    a = contiguous(a, np.float32)
    if finite and not np.isfinite(a).all():
        raise NonFiniteInputError(f"{name}: contains NaN or inf")
    return a


def i64(x, name, shape=None, ndim=None):
    """Return `x` as a C-contiguous int64 array; TypeError for a non-integer dtype."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array (int64), got dtype {a.dtype}")
    check_shape(a, name, shape, ndim)
    return contiguous(a, np.int64)


def bool_u8(mask, name, shape):
    """A boolean array of ``shape`` as C-contiguous uint8 (what the kernels read), or None."""
    if mask is None:
        return None
    a = np.asarray(mask)
    if a.dtype != np.bool_:
        raise TypeError(f"{name}: expected a boolean array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")
    return contiguous(a, np.uint8)


def mask_u8(mask, name, n):
    """A padding mask (True = keep) of n tokens as a uint8 array, or None."""
    return bool_u8(mask, name, (n,))


def int_arg(v, name, lo=None, hi=None):
    """An integer argument within [lo, hi]."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v}")
    return v


def float_arg(v, name, positive=False, nonneg=False):
    """A finite float argument."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}") from None
    if not np.isfinite(f):
        raise ValueError(f"{name}: must be finite, got {f}")
    if positive and f <= 0:
        raise ValueError(f"{name}: must be > 0, got {f}")
    if nonneg and f < 0:
        raise ValueError(f"{name}: must be >= 0, got {f}")
    return f


def choice(v, name, options):
    """One of a fixed set of strings; returns its index in `options`."""
    if v not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {v!r}")
    return list(options).index(v)


INT_MAX = 2 ** 31 - 1  # the kernels' sizes are C ints


def int_size(n, name, what="rows"):
    """A size the C kernels take as an int: at most 2**31 - 1 (ValueError naming it)."""
    if n > INT_MAX:
        raise ValueError(f"{name}: {n} {what}, more than the kernels' limit of 2**31 - 1")
    return n


def pair_arg(v, name, lo=None):
    """An int or a pair of ints (each within [lo, ...]) as a pair: ``3 -> (3, 3)``."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
        return int_arg(v[0], name, lo=lo), int_arg(v[1], name, lo=lo)
    v = int_arg(v, name, lo=lo)
    return v, v
