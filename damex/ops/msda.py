"""Multi-scale deformable attention (MSDA), the sampling core of Deformable-DETR and DINO.

``out[n, q, m*D:(m+1)*D] = sum_{l,p} attention_weights[n,q,m,l,p] *
bilinear(value[n, level l, m, :], sampling_locations[n,q,m,l,p])``

Bilinear sampling has exactly the semantics of
``F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)``
with ``grid = 2 * loc - 1``: the pixel coordinate is ``x = loc_x * W - 0.5``
(``y`` likewise), each of the four corners that falls off the map reads 0, and
the location gradient is grid_sample's, including points partly or wholly off
the map (a point with no corner on the map gives 0 and gradient 0).  This is
what Deformable-DETR's ``ms_deform_attn_core_pytorch`` computes.  Its CUDA op
gives the same values; it differs only on the line ``x == -1`` (or ``y == -1``)
exactly, where it drops the point and so its location gradient, while
grid_sample (and damex) keep the gradient of the on-map corner of weight 0.
Non-finite locations sample nothing.
"""
import numpy as np

from .._lib import _C
from ._check import f32, i64


def _levels(spatial_shapes, level_start_index, S):
    shapes = i64(spatial_shapes, "spatial_shapes", ndim=2)
    if shapes.shape[1] != 2 or shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes: expected shape (L, 2) with L >= 1, got {shapes.shape}")
    L = shapes.shape[0]
    if (shapes < 1).any():
        raise ValueError(f"spatial_shapes: every (H, W) must be >= 1, got {shapes.tolist()}")
    # H*W in Python ints: an int64 product can wrap (2**32 x 2**32 is 0)
    sizes = [int(h) * int(w) for h, w in shapes.tolist()]
    if sum(sizes) != S:
        raise ValueError(f"spatial_shapes: sum of H*W is {sum(sizes)}, but value has "
                         f"S = {S} tokens (value[N, S, M, D])")
    start = i64(level_start_index, "level_start_index", shape=(L,))
    expected = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if not np.array_equal(start, expected):
        raise ValueError(f"level_start_index: expected {expected.tolist()} (the exclusive cumsum "
                         f"of H*W), got {start.tolist()}")
    return shapes, start, L


def _args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    value = f32(value, "value", ndim=4)
    N, S, M, D = value.shape
    shapes, start, L = _levels(spatial_shapes, level_start_index, S)
    loc = f32(sampling_locations, "sampling_locations", ndim=6)
    if loc.shape[0] != N or loc.shape[2] != M or loc.shape[3] != L or loc.shape[5] != 2:
        raise ValueError(f"sampling_locations: expected shape ({N}, Lq, {M}, {L}, P, 2), "
                         f"got {loc.shape}")
    Lq, P = loc.shape[1], loc.shape[4]
    attw = f32(attention_weights, "attention_weights", shape=(N, Lq, M, L, P))
    return value, shapes, start, loc, attw, (N, S, M, D, Lq, L, P)


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights):
    """Multi-scale deformable attention.

    Parameters
    ----------
    value : ndarray, float32, [N, S, M, D]
        Values of all levels, flattened level by level (S = sum H_l W_l), M heads of D.
    spatial_shapes : ndarray, int64, [L, 2]
        (H_l, W_l) of every level.
    level_start_index : ndarray, int64, [L]
        Exclusive cumsum of H_l W_l.
    sampling_locations : ndarray, float32, [N, Lq, M, L, P, 2]
        (x, y), normalised to [0, 1] per level; points off the map are allowed.
    attention_weights : ndarray, float32, [N, Lq, M, L, P]

    Returns
    -------
    out : ndarray, float32, [N, Lq, M * D]
    """
    value, shapes, start, loc, attw, sizes = _args(value, spatial_shapes, level_start_index,
                                                   sampling_locations, attention_weights)
    N, S, M, D, Lq, L, P = sizes
    out = np.empty((N, Lq, M * D), np.float32)
    _C.ms_deform_attn_forward(out, value, shapes, start, loc, attw, *sizes)
    return out


def ms_deform_attn_backward(dy, value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights):
    """Gradients of :func:`ms_deform_attn_forward`.

    Parameters
    ----------
    dy : ndarray, float32, [N, Lq, M * D]
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        As in :func:`ms_deform_attn_forward`.

    Returns
    -------
    dvalue : ndarray, float32, [N, S, M, D]
    dsampling_locations : ndarray, float32, [N, Lq, M, L, P, 2]
    dattention_weights : ndarray, float32, [N, Lq, M, L, P]
    """
    value, shapes, start, loc, attw, sizes = _args(value, spatial_shapes, level_start_index,
                                                   sampling_locations, attention_weights)
    N, S, M, D, Lq, L, P = sizes
    dy = f32(dy, "dy", shape=(N, Lq, M * D))
    dvalue = np.zeros_like(value)
    dloc = np.zeros_like(loc)
    dattw = np.zeros_like(attw)
    _C.ms_deform_attn_backward(dvalue, dloc, dattw, dy, value, shapes, start,
                               loc, attw, *sizes)
    return dvalue, dloc, dattw
