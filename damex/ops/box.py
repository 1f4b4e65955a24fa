"""Box ops and the detection losses of the DINO criterion.

Boxes are rows of 4 numbers: ``xyxy = (x0, y0, x1, y1)`` or
``cxcywh = (cx, cy, w, h)``.  The values follow DETR's ``util/box_ops.py``
(float32, same order of operations) and torchvision's ``sigmoid_focal_loss``;
gradients follow PyTorch autograd, including its subgradients (``clamp(min=0)``
passes the gradient at 0, ``max``/``min`` split it evenly at a tie,
``|0|`` has gradient 0).

Degenerate boxes.  IoU and GIoU take xyxy boxes with ``x0 <= x1`` and
``y0 <= y1`` (DETR asserts this; here a ValueError names the argument and the
row).  Zero-area boxes are allowed: as DINO's ``util/box_ops.py``, the
union and the enclosing area get 1e-6 added before they divide
(``iou = inter / (union + 1e-6)``, ``giou = iou - (C - union) / (C + 1e-6)``),
so two coincident points have IoU 0 and GIoU 0 instead of NaN, and every
value is DINO's to float32 rounding.
"""
import numpy as np

from .._lib import _C
from ._check import check_shape, f32, float_arg


def _box_array(b, name, finite=True):
    """b[..., 4] as float32 (finite unless told otherwise)."""
    a = f32(b, name, finite=finite)
    if a.ndim == 0 or a.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape (..., 4), got {a.shape}")
    return a


def _xyxy(b, name):
    """b[N, 4] xyxy boxes as float32: finite, x0 <= x1 and y0 <= y1."""
    a = f32(b, name, shape=(None, 4), finite=True)
    bad = (a[:, 2] < a[:, 0]) | (a[:, 3] < a[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: box {i} is not xyxy with x0 <= x1 and y0 <= y1: {a[i].tolist()}")
    return a


def _box_map(kernel, v, name, backward=False):
    """kernel(out, v) on (..., 4) arrays: a conversion forward (v = boxes, finite;
    out fresh) or its backward (v = dy, any float; out zeroed, as the kernel
    accumulates)."""
    v = _box_array(v, name, finite=not backward)
    out = np.zeros_like(v) if backward else np.empty_like(v)
    kernel(out, v)
    return out


def box_cxcywh_to_xyxy_forward(b):
    """(cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2).

    Parameters
    ----------
    b : ndarray, float32, shape (..., 4), finite

    Returns
    -------
    out : ndarray, float32, shape (..., 4)
    """
    return _box_map(_C.box_cxcywh_to_xyxy_forward, b, "b")


def box_cxcywh_to_xyxy_backward(dy):
    """Gradient of :func:`box_cxcywh_to_xyxy_forward`: dy (..., 4) -> db (..., 4)."""
    return _box_map(_C.box_cxcywh_to_xyxy_backward, dy, "dy", backward=True)


def box_xyxy_to_cxcywh_forward(b):
    """(x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0).

    Parameters
    ----------
    b : ndarray, float32, shape (..., 4), finite

    Returns
    -------
    out : ndarray, float32, shape (..., 4)
    """
    return _box_map(_C.box_xyxy_to_cxcywh_forward, b, "b")


def box_xyxy_to_cxcywh_backward(dy):
    """Gradient of :func:`box_xyxy_to_cxcywh_forward`: dy (..., 4) -> db (..., 4)."""
    return _box_map(_C.box_xyxy_to_cxcywh_backward, dy, "dy", backward=True)


def box_iou_forward(a, b):
    """Pairwise IoU and union area of xyxy boxes (DETR ``box_iou``).

    Parameters
    ----------
    a : ndarray, float32, shape (N, 4), xyxy
    b : ndarray, float32, shape (M, 4), xyxy

    Returns
    -------
    iou : ndarray, float32, shape (N, M), ``inter / (union + 1e-6)``
    union : ndarray, float32, shape (N, M)
    """
    a = _xyxy(a, "a")
    b = _xyxy(b, "b")
    n, m = a.shape[0], b.shape[0]
    iou = np.empty((n, m), np.float32)
    union = np.empty((n, m), np.float32)
    _C.box_iou_forward(iou, union, a, b, n, m)
    return iou, union


def generalized_box_iou_forward(a, b):
    """Pairwise generalized IoU of xyxy boxes (DETR ``generalized_box_iou``).

    ``giou = iou - (C - union) / (C + 1e-6)`` with C the area of the smallest box
    enclosing both (DINO's epsilon, see the module docstring).

    Parameters
    ----------
    a : ndarray, float32, shape (N, 4), xyxy
    b : ndarray, float32, shape (M, 4), xyxy

    Returns
    -------
    giou : ndarray, float32, shape (N, M), in [-1, 1]
    """
    a = _xyxy(a, "a")
    b = _xyxy(b, "b")
    giou = np.empty((a.shape[0], b.shape[0]), np.float32)
    _C.generalized_box_iou_forward(giou, a, b, a.shape[0], b.shape[0])
    return giou


def generalized_box_iou_backward(dy, a, b):
    """Gradient of :func:`generalized_box_iou_forward` to both box sets.

    Parameters
    ----------
    dy : ndarray, float32, shape (N, M)
    a : ndarray, float32, shape (N, 4), xyxy
    b : ndarray, float32, shape (M, 4), xyxy

    Returns
    -------
    da : ndarray, float32, shape (N, 4)
    db : ndarray, float32, shape (M, 4)
    """
    a = _xyxy(a, "a")
    b = _xyxy(b, "b")
    n, m = a.shape[0], b.shape[0]
    dy = f32(dy, "dy", shape=(n, m))
    da = np.zeros_like(a)
    db = np.zeros_like(b)
    _C.generalized_box_iou_backward(da, db, dy, a, b, n, m)
    return da, db


def generalized_box_iou_paired_forward(a, b):
    """GIoU of matched pairs: ``giou[i] = giou(a[i], b[i])``.

    The diagonal of :func:`generalized_box_iou_forward` (what the GIoU loss
    ``1 - giou`` of matched predictions needs) in O(N) instead of O(N^2); the
    same values and conventions.

    Parameters
    ----------
    a : ndarray, float32, shape (N, 4), xyxy
    b : ndarray, float32, shape (N, 4), xyxy

    Returns
    -------
    giou : ndarray, float32, shape (N,)
    """
    a = _xyxy(a, "a")
    b = _xyxy(b, "b")
    check_shape(b, "b", a.shape)
    giou = np.empty(a.shape[0], np.float32)
    _C.generalized_box_iou_paired_forward(giou, a, b, a.shape[0])
    return giou


def generalized_box_iou_paired_backward(dy, a, b):
    """Gradient of :func:`generalized_box_iou_paired_forward`.

    Parameters
    ----------
    dy : ndarray, float32, shape (N,)
    a, b : ndarray, float32, shape (N, 4), xyxy

    Returns
    -------
    da, db : ndarray, float32, shape (N, 4)
    """
    a = _xyxy(a, "a")
    b = _xyxy(b, "b")
    check_shape(b, "b", a.shape)
    dy = f32(dy, "dy", shape=(a.shape[0],))
    da = np.zeros_like(a)
    db = np.zeros_like(b)
    _C.generalized_box_iou_paired_backward(da, db, dy, a, b, a.shape[0])
    return da, db


def _focal_args(logits, targets, alpha, gamma):
    logits = f32(logits, "logits", finite=True)
    targets = f32(targets, "targets", shape=logits.shape, finite=True)
    if ((targets < 0) | (targets > 1)).any():
        raise ValueError("targets: expected values in [0, 1]")
    alpha = float_arg(alpha, "alpha")
    gamma = float_arg(gamma, "gamma", nonneg=True)
    return logits, targets, alpha, gamma


def sigmoid_focal_loss_forward(logits, targets, alpha=0.25, gamma=2.0):
    """Elementwise sigmoid focal loss (torchvision, ``reduction="none"``).

    ``loss = alpha_t * BCE_with_logits(x, t) * (1 - p_t) ** gamma`` with
    ``p = sigmoid(x)``, ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``; ``alpha < 0`` drops the
    ``alpha_t`` factor (as torchvision).  Computed in float64 from ``p`` and
    ``1 - p`` separately, so large ``|x|`` neither overflows nor cancels.

    Parameters
    ----------
    logits : ndarray, float32, shape (N, C) (any shape), finite
    targets : ndarray, float32, same shape, values in [0, 1] (soft targets allowed)
    alpha : float, default 0.25
    gamma : float >= 0, default 2.0

    Returns
    -------
    loss : ndarray, float32, same shape as logits (unreduced)
    """
    logits, targets, alpha, gamma = _focal_args(logits, targets, alpha, gamma)
    loss = np.empty_like(logits)
    _C.sigmoid_focal_loss_forward(loss, logits, targets, alpha, gamma)
    return loss


def sigmoid_focal_loss_backward(dy, logits, targets, alpha=0.25, gamma=2.0):
    """Gradient of :func:`sigmoid_focal_loss_forward` to the logits.

    Parameters
    ----------
    dy : ndarray, float32, shape of logits
    logits, targets, alpha, gamma : as in the forward

    Returns
    -------
    dlogits : ndarray, float32, shape of logits
    """
    logits, targets, alpha, gamma = _focal_args(logits, targets, alpha, gamma)
    dy = f32(dy, "dy", shape=logits.shape)
    dx = np.zeros_like(logits)
    _C.sigmoid_focal_loss_backward(dx, dy, logits, targets, alpha, gamma)
    return dx


def l1_loss_forward(a, b):
    """Elementwise ``|a - b|`` (``reduction="none"``).

    Parameters
    ----------
    a : ndarray, float32, any shape
    b : ndarray, float32, same shape

    Returns
    -------
    out : ndarray, float32, same shape
    """
    a = f32(a, "a")
    b = f32(b, "b", shape=a.shape)
    out = np.empty_like(a)
    _C.l1_loss_forward(out, a, b)
    return out


def l1_loss_backward(dy, a, b):
    """Gradient of :func:`l1_loss_forward`: ``da = dy sign(a - b)``, ``db = -da``
    (``sign(0) = 0``, PyTorch's subgradient).

    Returns
    -------
    da, db : ndarray, float32, shape of a
    """
    a = f32(a, "a")
    b = f32(b, "b", shape=a.shape)
    dy = f32(dy, "dy", shape=a.shape)
    da = np.zeros_like(a)
    db = np.zeros_like(a)
    _C.l1_loss_backward(da, db, dy, a, b)
    return da, db
