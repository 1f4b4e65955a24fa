"""The detector's layers as forward/backward pairs: linear, layer norm, group
norm, frozen batch norm, conv2d, sigmoid, inverse sigmoid, softmax, dropout
and embedding (C kernels in csrc/kernels/{linear,norm,conv,elementwise,
softmax,embedding}.c).

Conventions (docs/ops.md): float32 compute, int64 ids; arguments are checked
here with messages naming them; inputs are never modified; a backward returns
freshly zeroed gradients the kernel accumulated into.  Weights use PyTorch's
layouts (linear ``[Dout, Din]``, conv2d ``[Cout, Cin, kh, kw]``), so values and
gradients can be compared with ``torch.nn.functional`` one to one.
"""
import numpy as np

from .._lib import _C
from ._check import choice, contiguous, f32, float_arg, i64, int_arg, int_size, pair_arg

__all__ = [
    "CONV2D_ALGORITHMS",
    "linear_forward",
    "linear_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "frozen_batch_norm_forward",
    "frozen_batch_norm_backward",
    "conv2d_forward",
    "conv2d_backward",
    "sigmoid_forward",
    "sigmoid_backward",
    "inverse_sigmoid_forward",
    "inverse_sigmoid_backward",
    "softmax_forward",
    "softmax_backward",
    "dropout_forward",
    "dropout_backward",
    "embedding_forward",
    "embedding_backward",
]

# ---- linear ---------------------------------------------------------------


def linear_forward(x, w, b=None):
    """y = x @ w.T + b.

    Parameters
    ----------
    x : ndarray, float32, shape (..., Din)
    w : ndarray, float32, shape (Dout, Din) (PyTorch layout)
    b : ndarray, float32, shape (Dout,), optional

    Returns
    -------
    y : ndarray, float32, shape (..., Dout)
    """
    w = f32(w, "w", ndim=2)
    d_out, d_in = w.shape
    x = f32(x, "x")
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected shape (..., {d_in}) to match w {w.shape}, got {x.shape}")
    if b is not None:
        b = f32(b, "b", shape=(d_out,))
    n = int(np.prod(x.shape[:-1]))
    y = np.empty(x.shape[:-1] + (d_out,), np.float32)
    if y.size == 0 or d_in == 0:  # nothing to multiply: no kernel call, whatever n is
        y[...] = 0.0 if b is None else b
        return y
    _C.linear_forward(y, x, w, b, int_size(n, "x", "rows"), d_in, d_out)
    return y


def linear_backward(dy, x, w, has_bias=True):
    """Gradients of :func:`linear_forward`.

    Parameters
    ----------
    dy : ndarray, float32, shape (..., Dout)
    x : ndarray, float32, shape (..., Din), the forward input
    w : ndarray, float32, shape (Dout, Din)
    has_bias : bool
        Whether to return db.

    Returns
    -------
    dx : (..., Din);  dw : (Dout, Din);  db : (Dout,) or None
    """
    w = f32(w, "w", ndim=2)
    d_out, d_in = w.shape
    x = f32(x, "x")
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected shape (..., {d_in}) to match w {w.shape}, got {x.shape}")
    dy = f32(dy, "dy", shape=x.shape[:-1] + (d_out,))
    n = int(np.prod(x.shape[:-1]))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    db = np.zeros(d_out, np.float32) if has_bias else None
    if n == 0 or d_in == 0 or d_out == 0:  # dx and dw are empty or 0: no kernel call
        if db is not None and d_out:
            db[:] = dy.reshape(n, d_out).sum(axis=0, dtype=np.float64)
        return dx, dw, db
    _C.linear_backward(dx, dw, db, dy, x, w, int_size(n, "x", "rows"), d_in, d_out)
    return dx, dw, db


# ---- normalisation ----------------------------------------------------------


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """Layer norm over the last axis (biased variance, as PyTorch).

    ``y = (x - mean) * rstd * gamma + beta``, ``rstd = 1 / sqrt(var + eps)``.
    A row whose float32 moments overflow (entries past ~1e19) is computed in
    float64, so every finite row gives its normalised values (PyTorch's float32
    kernel returns NaN or 0 there); a row holding NaN or inf gives NaN.

    Parameters
    ----------
    x : ndarray, float32, shape (..., C)
    gamma, beta : ndarray, float32, shape (C,)
    eps : float

    Returns
    -------
    y : (..., C);  mean : (N,);  rstd : (N,)   (N = number of rows)
    """
    x = f32(x, "x")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., C) with C > 0, got {x.shape}")
    c = x.shape[-1]
    gamma = f32(gamma, "gamma", shape=(c,))
    beta = f32(beta, "beta", shape=(c,))
    eps = float_arg(eps, "eps", nonneg=True)
    n = x.size // c
    y = np.empty_like(x)
    mean = np.empty(n, np.float32)
    rstd = np.empty(n, np.float32)
    _C.layer_norm_forward(y, mean, rstd, x, gamma, beta, n, c, eps)
    return y, mean, rstd


def layer_norm_backward(dy, x, mean, rstd, gamma):
    """Gradients of :func:`layer_norm_forward`: ``(dx, dgamma, dbeta)``, shapes as x and gamma."""
    x = f32(x, "x")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., C) with C > 0, got {x.shape}")
    c = x.shape[-1]
    n = x.size // c
    dy = f32(dy, "dy", shape=x.shape)
    mean = f32(mean, "mean", shape=(n,))
    rstd = f32(rstd, "rstd", shape=(n,))
    gamma = f32(gamma, "gamma", shape=(c,))
    dx = np.zeros_like(x)
    dgamma = np.zeros(c, np.float32)
    dbeta = np.zeros(c, np.float32)
    _C.layer_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, n, c)
    return dx, dgamma, dbeta


def _nchw(x, name="x"):
    x = f32(x, name, ndim=4)
    if 0 in x.shape[1:]:
        raise ValueError(f"{name}: expected shape (N, C, H, W) with C, H, W > 0, got {x.shape}")
    return x


def _groups(groups, c):
    g = int_arg(groups, "groups", lo=1)
    if c % g:
        raise ValueError(f"groups: {g} does not divide the {c} channels")
    return g


def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """Group norm of an NCHW tensor (statistics per sample over C/G channels x H x W).

    Parameters
    ----------
    x : ndarray, float32, shape (N, C, H, W)
    gamma, beta : ndarray, float32, shape (C,)
    groups : int, divides C
    eps : float

    Returns
    -------
    y : (N, C, H, W);  mean : (N, G);  rstd : (N, G)
    """
    x = _nchw(x)
    n, c, h, w = x.shape
    g = _groups(groups, c)
    gamma = f32(gamma, "gamma", shape=(c,))
    beta = f32(beta, "beta", shape=(c,))
    eps = float_arg(eps, "eps", nonneg=True)
    y = np.empty_like(x)
    mean = np.empty((n, g), np.float32)
    rstd = np.empty((n, g), np.float32)
    _C.group_norm_forward(y, mean, rstd, x, gamma, beta, n, c, h * w, g, eps)
    return y, mean, rstd


def group_norm_backward(dy, x, mean, rstd, gamma, groups):
    """Gradients of :func:`group_norm_forward`: ``(dx, dgamma, dbeta)``."""
    x = _nchw(x)
    n, c, h, w = x.shape
    g = _groups(groups, c)
    dy = f32(dy, "dy", shape=x.shape)
    mean = f32(mean, "mean", shape=(n, g))
    rstd = f32(rstd, "rstd", shape=(n, g))
    gamma = f32(gamma, "gamma", shape=(c,))
    dx = np.zeros_like(x)
    dgamma = np.zeros(c, np.float32)
    dbeta = np.zeros(c, np.float32)
    _C.group_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, n, c, h * w, g)
    return dx, dgamma, dbeta


def frozen_batch_norm_forward(x, weight, bias, running_mean, running_var, eps=1e-5):
    """Batch norm with frozen statistics (torchvision's FrozenBatchNorm2d).

    ``scale = weight / sqrt(running_var + eps)``,
    ``y = x * scale + (bias - running_mean * scale)`` per channel.

    Parameters
    ----------
    x : ndarray, float32, shape (N, C, H, W)
    weight, bias, running_mean, running_var : ndarray, float32, shape (C,)

    Returns
    -------
    y : ndarray, float32, shape (N, C, H, W)
    """
    x = _nchw(x)
    n, c, h, w = x.shape
    weight = f32(weight, "weight", shape=(c,))
    bias = f32(bias, "bias", shape=(c,))
    running_mean = f32(running_mean, "running_mean", shape=(c,))
    running_var = f32(running_var, "running_var", shape=(c,))
    eps = float_arg(eps, "eps", nonneg=True)
    y = np.empty_like(x)
    _C.frozen_batch_norm_forward(y, x, weight, bias, running_mean, running_var, n, c, h * w, eps)
    return y


def frozen_batch_norm_backward(dy, weight, running_var, eps=1e-5):
    """dx = dy * weight / sqrt(running_var + eps) per channel; dy (N, C, H, W).

    The statistics and the affine parameters are frozen: no parameter gradients.
    """
    dy = _nchw(dy, "dy")
    n, c, h, w = dy.shape
    weight = f32(weight, "weight", shape=(c,))
    running_var = f32(running_var, "running_var", shape=(c,))
    eps = float_arg(eps, "eps", nonneg=True)
    dx = np.zeros_like(dy)
    _C.frozen_batch_norm_backward(dx, dy, weight, running_var, n, c, h * w, eps)
    return dx


# ---- conv2d -----------------------------------------------------------------


CONV2D_ALGORITHMS = ("auto", "im2col", "shifted", "direct", "winograd")  # codes as in csrc/kernels/conv.h


def _conv_sizes(x, w, stride, padding, algorithm="auto"):
    code = choice(algorithm, "algorithm", CONV2D_ALGORITHMS)
    x = _nchw(x)
    w = f32(w, "w", ndim=4)
    n, cin, h, wd = x.shape
    cout, wcin, kh, kw = w.shape
    if wcin != cin:
        raise ValueError(f"w: expected {cin} input channels to match x {x.shape}, got shape {w.shape}")
    if 0 in w.shape:
        raise ValueError(f"w: expected shape (Cout, Cin, kh, kw) with all sizes > 0, got {w.shape}")
    sh, sw = pair_arg(stride, "stride", 1)
    ph, pw = pair_arg(padding, "padding", 0)
    if h + 2 * ph < kh or wd + 2 * pw < kw:
        raise ValueError(f"w: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * ph}x{wd + 2 * pw}")
    if algorithm == "winograd" and (kh, kw, sh, sw) != (3, 3, 1, 1):
        raise ValueError(f"algorithm: 'winograd' needs a 3x3 kernel at stride 1, got a {kh}x{kw} "
                         f"kernel at stride {(sh, sw)}")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    return x, w, (n, cin, h, wd, cout, kh, kw, sh, sw, ph, pw, code), (n, cout, ho, wo)


def conv2d_forward(x, w, b=None, stride=1, padding=0, *, algorithm="auto"):
    """2-D convolution (cross-correlation, as PyTorch), NCHW, groups = 1.

    ``y[n,o,i,j] = b[o] + sum_{c,u,v} w[o,c,u,v] x[n, c, i*sh - ph + u, j*sw - pw + v]``
    with x zero outside the image.

    Parameters
    ----------
    x : ndarray, float32, shape (N, Cin, H, W)
    w : ndarray, float32, shape (Cout, Cin, kh, kw)
    b : ndarray, float32, shape (Cout,), optional
    stride : int or (int, int), >= 1
    padding : int or (int, int), >= 0
    algorithm : {"auto", "im2col", "shifted", "direct", "winograd"}
        "im2col": one OpenBLAS product with K = Cin*kh*kw per image (no copy
        for a 1x1 stride-1 conv); "shifted": one OpenBLAS product per kernel
        tap over shifted views of the padded image (stride handled by phase
        planes), no im2col matrix; "direct": damex's own register-blocked
        kernel over the same shifted views; "winograd": F(2x2, 3x3) tiles,
        2.25x fewer multiplications (3x3 kernels at stride 1 only).
        "auto" takes, on a CPU with AVX-512 and for output planes of 512
        pixels or more, "winograd" for 3x3 stride-1 convs with Cin >= 8 and
        "direct" for the others, except the plain 1x1 conv, which multiplies
        x directly; elsewhere "shifted" for Cin >= 16, else "im2col".  All give the same values up to float32
        rounding.

    Returns
    -------
    y : ndarray, float32, shape (N, Cout, Ho, Wo), ``Ho = (H + 2 ph - kh) // sh + 1``
    """
    x, w, sizes, yshape = _conv_sizes(x, w, stride, padding, algorithm)
    if b is not None:
        b = f32(b, "b", shape=(w.shape[0],))
    y = np.empty(yshape, np.float32)
    _C.conv2d_forward(y, x, w, b, sizes)
    return y


def conv2d_backward(dy, x, w, stride=1, padding=0, has_bias=True, *, algorithm="auto"):
    """Gradients of :func:`conv2d_forward`: ``(dx, dw, db or None)``.

    dy has the output's shape (N, Cout, Ho, Wo); dx, dw, db have the shapes of x, w, b.
    "direct" and "winograd" are forward algorithms: their backward is "shifted".
    With "auto" on a CPU with AVX-512 and output planes of 512+ pixels, dw runs
    on a register-blocked kernel of damex's own and dx (Cin >= 8) as forward
    convolutions of dy with the flipped, transposed filter, one per stride
    phase (so a 3x3 stride-1 one runs on Winograd tiles).
    """
    x, w, sizes, yshape = _conv_sizes(x, w, stride, padding, algorithm)
    dy = f32(dy, "dy", shape=yshape)
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    db = np.zeros(w.shape[0], np.float32) if has_bias else None
    _C.conv2d_backward(dx, dw, db, dy, x, w, sizes)
    return dx, dw, db


# ---- elementwise ------------------------------------------------------------


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), any shape."""
    x = f32(x, "x")
    y = np.empty_like(x)
    _C.sigmoid_forward(y, x)
    return y


def sigmoid_backward(dy, y):
    """dx = dy * y * (1 - y), from the forward output y."""
    y = f32(y, "y")
    dy = f32(dy, "dy", shape=y.shape)
    dx = np.zeros_like(y)
    _C.sigmoid_backward(dx, dy, y)
    return dx


def inverse_sigmoid_forward(x, eps=1e-5):
    """DINO's inverse sigmoid: ``v = clip(x, 0, 1)``, ``y = log(max(v, eps) / max(1 - v, eps))``.

    Parameters
    ----------
    x : ndarray, float32, any shape
    eps : float, >= 0

    Returns
    -------
    y : ndarray, float32, same shape as x
    """
    x = f32(x, "x")
    eps = float_arg(eps, "eps", nonneg=True)
    y = np.empty_like(x)
    _C.inverse_sigmoid_forward(y, x, eps)
    return y


def inverse_sigmoid_backward(dy, x, eps=1e-5):
    """Gradient of :func:`inverse_sigmoid_forward` with PyTorch autograd's clamp rule.

    ``dx = dy * [0 <= x <= 1] * ([x >= eps] / x + [1 - x >= eps] / (1 - x))``: zero where
    x is outside [0, 1]; where only one of the two eps-clamps is active, the other
    term still passes (exactly what autograd gives for DINO's code).
    """
    x = f32(x, "x")
    dy = f32(dy, "dy", shape=x.shape)
    eps = float_arg(eps, "eps", nonneg=True)
    dx = np.zeros_like(x)
    _C.inverse_sigmoid_backward(dx, dy, x, eps)
    return dx


def softmax_forward(x):
    """Softmax over the last axis; entries of -inf get probability 0.

    Parameters
    ----------
    x : ndarray, float32, shape (..., C)

    Returns
    -------
    y : ndarray, float32, same shape
    """
    x = f32(x, "x")
    if x.ndim < 1:
        raise ValueError(f"x: expected at least 1 dimension, got shape {x.shape}")
    y = np.empty_like(x)
    if x.size:
        _C.softmax_forward(y, x, x.shape[-1])
    return y


def softmax_backward(dy, y):
    """dx = y * (dy - sum(dy * y, last axis)), from the forward output y."""
    y = f32(y, "y")
    if y.ndim < 1:
        raise ValueError(f"y: expected at least 1 dimension, got shape {y.shape}")
    dy = f32(dy, "dy", shape=y.shape)
    dx = np.zeros_like(y)
    if y.size:
        _C.softmax_backward(dx, dy, y, y.shape[-1])
    return dx


def _prob(p):
    p = float_arg(p, "p")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    return p


def dropout_forward(x, p, seed):
    """Inverted dropout with an explicit seed.

    Element i is kept when the top 24 bits of ``splitmix64(seed + (i + 1) * golden)``
    are >= ``round(p * 2**24)``; kept values are scaled by ``1 / (1 - p)``.  The
    same seed gives the same mask bits (any thread count).  ``p = 0`` is the
    identity, ``p = 1`` drops everything (y = 0, as PyTorch).

    Parameters
    ----------
    x : ndarray, float32, any shape
    p : float in [0, 1], the drop probability
    seed : int in [0, 2**64)

    Returns
    -------
    y : ndarray, float32, same shape as x
    keep_mask : ndarray, uint8 (1 = kept), same shape as x
    """
    x = f32(x, "x")
    p = _prob(p)
    seed = int_arg(seed, "seed", lo=0, hi=2 ** 64 - 1)
    y = np.empty_like(x)
    keep = np.empty(x.shape, np.uint8)
    _C.dropout_forward(y, keep, x, p, seed)
    return y, keep


def dropout_backward(dy, keep_mask, p):
    """dx = dy * keep_mask / (1 - p)  (0 for p = 1)."""
    dy = f32(dy, "dy")
    keep = np.asarray(keep_mask)
    if keep.dtype not in (np.uint8, np.bool_):
        raise TypeError(f"keep_mask: expected dtype uint8 or bool, got {keep.dtype}")
    if keep.shape != dy.shape:
        raise ValueError(f"keep_mask: expected shape {dy.shape}, got {keep.shape}")
    keep = contiguous(keep, keep.dtype).view(np.uint8)
    p = _prob(p)
    dx = np.zeros_like(dy)
    _C.dropout_backward(dx, dy, keep, p)
    return dx


# ---- embedding --------------------------------------------------------------


def _ids(ids, v):
    ids = i64(ids, "ids")
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise ValueError(f"ids: expected values in [0, {v}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    return ids


def embedding_forward(weight, ids):
    """out[..., :] = weight[ids[...], :].

    Parameters
    ----------
    weight : ndarray, float32, shape (V, D)
    ids : ndarray, integer, any shape, values in [0, V)

    Returns
    -------
    out : ndarray, float32, shape ids.shape + (D,)
    """
    weight = f32(weight, "weight", ndim=2)
    v, d = weight.shape
    ids = _ids(ids, v)
    out = np.empty(ids.shape + (d,), np.float32)
    _C.embedding_forward(out, weight, ids, v, d)
    return out


def embedding_backward(dy, ids, num_embeddings):
    """dweight[V, D] with ``dweight[ids[i]] += dy[i]``, dy of shape ids.shape + (D,) (repeated ids add up)."""
    v = int_arg(num_embeddings, "num_embeddings", lo=0)
    ids = _ids(ids, v)
    dy = f32(dy, "dy", ndim=ids.ndim + 1)
    if dy.shape[:-1] != ids.shape:
        raise ValueError(f"dy: expected shape {ids.shape + ('D',)}, got {dy.shape}")
    d = dy.shape[-1]
    dweight = np.zeros((v, d), np.float32)
    _C.embedding_backward(dweight, dy, ids, v, d)
    return dweight
