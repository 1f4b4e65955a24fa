"""Sine position encodings (no gradient): of feature maps (DETR's
PositionEmbeddingSine, normalised) and of reference boxes (DINO's query
positional embedding)."""
import math

import numpy as np


def sine_position_encoding(mask, num_pos_feats=128, temperature=10000.0, scale=2 * math.pi):
    """Position encoding of a padded feature map.

    Parameters
    ----------
    mask : ndarray [B, H, W] bool, True at padding pixels
    num_pos_feats : int
        Features per axis; the output has 2 * num_pos_feats channels (y then x).

    Returns
    -------
    pos : ndarray [B, 2 * num_pos_feats, H, W] float32
    """
    valid = ~np.asarray(mask, bool)
    y = np.cumsum(valid, 1, dtype=np.float64)
    x = np.cumsum(valid, 2, dtype=np.float64)
    eps = 1e-6
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    dim_t = temperature ** (2 * (np.arange(num_pos_feats) // 2) / num_pos_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = np.stack([np.sin(px[..., 0::2]), np.cos(px[..., 1::2])], -1).reshape(*px.shape[:3], -1)
    py = np.stack([np.sin(py[..., 0::2]), np.cos(py[..., 1::2])], -1).reshape(*py.shape[:3], -1)
    return np.concatenate([py, px], -1).transpose(0, 3, 1, 2).astype(np.float32)


def sine_box_encoding(boxes, num_pos_feats=128, temperature=10000.0):
    """DINO's embedding of reference boxes for the decoder queries.

    Parameters
    ----------
    boxes : ndarray [..., 4] normalised cxcywh (or [..., 2] points)

    Returns
    -------
    ndarray [..., num_pos_feats * boxes.shape[-1]] float32, in the order (y, x, w, h).
    """
    boxes = np.asarray(boxes, np.float64)
    dim_t = temperature ** (2 * (np.arange(num_pos_feats) // 2) / num_pos_feats)

    def enc(v):
        p = v[..., None] * (2 * math.pi) / dim_t
        return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], -1).reshape(*v.shape, -1)

    parts = [enc(boxes[..., 1]), enc(boxes[..., 0])]
    if boxes.shape[-1] == 4:
        parts += [enc(boxes[..., 2]), enc(boxes[..., 3])]
    return np.concatenate(parts, -1).astype(np.float32)
