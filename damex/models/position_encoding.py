"""Sine position encodings (no gradient): of feature maps (DINO's
PositionEmbeddingSineHW, normalised) and of reference boxes (DINO's query
positional embedding)."""
import math

import numpy as np
def sine_position_encoding(mask, num_pos_feats=128, temperature_h=20.0, temperature_w=20.0,
                           offset=0.0, scale=2 * math.pi):
    """Position encoding of a padded feature map (DINO's ``PositionEmbeddingSineHW``).

    With ``c`` the running count of valid pixels along an axis and ``n`` its
    total, the angle is ``(c + offset) / (n + 1e-6) * scale`` divided by
    ``temperature ** (2 * (i // 2) / num_pos_feats)``, sine on even and cosine on
    odd features.  DINO's configs use temperature 20 for H and W and no offset
    (the defaults); Deformable-DETR's ``PositionEmbeddingSine`` is
    ``temperature_h = temperature_w = 10000, offset = -0.5``.

    Parameters
    ----------
    mask : ndarray [B, H, W] bool, True at padding pixels
    num_pos_feats : int
        Features per axis; the output has 2 * num_pos_feats channels (y then x).
    temperature_h, temperature_w : float
    offset : float

    Returns
    -------
    pos : ndarray [B, 2 * num_pos_feats, H, W] float32
    """
    valid = ~np.asarray(mask, bool)
    y = np.cumsum(valid, 1, dtype=np.float32)
    x = np.cumsum(valid, 2, dtype=np.float32)
    eps = np.float32(1e-6)
    y = (y + np.float32(offset)) / (y[:, -1:, :] + eps) * np.float32(scale)
    x = (x + np.float32(offset)) / (x[:, :, -1:] + eps) * np.float32(scale)
    i = np.arange(num_pos_feats, dtype=np.float32)

    def enc(v, temperature):
        dim_t = np.float32(temperature) ** (2 * (i // 2) / np.float32(num_pos_feats))
        p = v[..., None] / dim_t
        return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], -1).reshape(*p.shape[:3], -1)

    return np.concatenate([enc(y, temperature_h), enc(x, temperature_w)], -1).transpose(0, 3, 1, 2) \
        .astype(np.float32)




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
