"""2-D max pooling as a forward/backward pair (C kernel in csrc/kernels/pool.c).

Matches ``torch.nn.functional.max_pool2d`` (dilation 1, ``ceil_mode=False``)
value for value and index for index: padding counts as -inf, ties go to the
first maximum in row-major order of the window, NaN propagates.  The saved
indices are the flat positions ``h * W + w`` inside each input plane (what
``return_indices=True`` gives in torch), so the backward sends each output's
gradient to exactly the element torch sends it to.
"""
import numpy as np

from .._lib import _C
from ._check import f32, i64, int_arg, pair_arg

__all__ = ["maxpool2d_forward", "maxpool2d_backward", "maxpool2d_output_shape"]


def _params(kernel_size, stride, padding):
    k = pair_arg(kernel_size, "kernel_size", 1)
    s = k if stride is None else pair_arg(stride, "stride", 1)
    p = pair_arg(padding, "padding", 0)
    for ki, pi in zip(k, p):
        if 2 * pi > ki:
            raise ValueError(f"padding: must be at most half the kernel size {k}, got {p}")
    return k, s, p


def maxpool2d_output_shape(shape, kernel_size, stride=None, padding=0):
    """``(N, C, Ho, Wo)`` of :func:`maxpool2d_forward` for an input of ``shape``."""
    (kh, kw), (sh, sw), (ph, pw) = _params(kernel_size, stride, padding)
    n, c, h, w = shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"x: the padded input {h + 2 * ph}x{w + 2 * pw} is smaller than the "
                         f"kernel {kh}x{kw}")
    return n, c, ho, wo


def maxpool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max pooling of NCHW planes.

    Parameters
    ----------
    x : ndarray, float32, shape (N, C, H, W)
    kernel_size, stride, padding : int or (int, int)
        ``stride`` defaults to ``kernel_size`` (as torch); ``padding <= kernel_size / 2``.

    Returns
    -------
    y : ndarray, float32, shape (N, C, Ho, Wo)
    idx : ndarray, int64, shape (N, C, Ho, Wo)
        Flat position ``h * W + w`` of each maximum in its input plane.
    """
    x = f32(x, "x", ndim=4)
    if 0 in x.shape[2:]:
        raise ValueError(f"x: expected shape (N, C, H, W) with H, W > 0, got {x.shape}")
    (kh, kw), (sh, sw), (ph, pw) = _params(kernel_size, stride, padding)
    out = maxpool2d_output_shape(x.shape, (kh, kw), (sh, sw), (ph, pw))
    y = np.empty(out, np.float32)
    idx = np.empty(out, np.int64)
    n, c, h, w = x.shape
    _C.maxpool2d_forward(y, idx, x, n, c, h, w, kh, kw, sh, sw, ph, pw)
    return y, idx


def maxpool2d_backward(dy, idx, input_shape):
    """Gradient of :func:`maxpool2d_forward`.

    Parameters
    ----------
    dy : ndarray, float32, shape (N, C, Ho, Wo)
    idx : ndarray, int64, shape (N, C, Ho, Wo), the forward's indices
    input_shape : (N, C, H, W), the forward input's shape

    Returns
    -------
    dx : ndarray, float32, shape (N, C, H, W): ``dy`` summed into the saved positions.
    """
    if len(tuple(input_shape)) != 4:
        raise ValueError(f"input_shape: expected (N, C, H, W), got {tuple(input_shape)}")
    n, c, h, w = (int_arg(v, "input_shape", lo=0) for v in input_shape)
    dy = f32(dy, "dy", ndim=4)
    if dy.shape[:2] != (n, c):
        raise ValueError(f"dy: expected shape ({n}, {c}, Ho, Wo) to match input_shape, got {dy.shape}")
    idx = i64(idx, "idx", shape=dy.shape)
    dx = np.zeros((n, c, h, w), np.float32)
    _C.maxpool2d_backward(dx, dy, idx, n, c, h, w, dy.shape[2], dy.shape[3])
    return dx
