"""Masked multi-head scaled dot-product attention (the core of
``nn.MultiheadAttention``; the projections are ``linear``).

``out_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h`` for every head h, where
q, k, v are split into H column blocks of width d = C / H.  Masks are boolean
with True = blocked (PyTorch's convention): ``attn_mask[Lq, Lk]`` shared by the
batch (DINO's denoising mask) and ``key_padding_mask[N, Lk]``.  A row whose
every key is blocked gives output 0 and attention 0 (PyTorch gives NaN there).
"""
import numpy as np

from .._lib import _C
from ._check import bool_u8, f32, int_arg


def _qkv(q, k, v, num_heads):
    q = f32(q, "q", ndim=3)
    N, Lq, C = q.shape
    k = f32(k, "k", ndim=3)
    if k.shape[0] != N or k.shape[2] != C:
        raise ValueError(f"k: expected shape ({N}, ?, {C}), got {k.shape}")
    v = f32(v, "v", shape=k.shape)
    H = int_arg(num_heads, "num_heads", lo=1)
    if C % H:
        raise ValueError(f"num_heads: {H} does not divide the width C={C}")
    return q, k, v, H


def attention_forward(q, k, v, num_heads, attn_mask=None, key_padding_mask=None):
    """Attention over heads.

    Parameters
    ----------
    q : ndarray [N, Lq, C]
    k, v : ndarray [N, Lk, C]
    num_heads : int
        H, dividing C.
    attn_mask : ndarray [Lq, Lk] bool, optional
    key_padding_mask : ndarray [N, Lk] bool, optional

    Returns
    -------
    out : ndarray [N, Lq, C]
    attn : ndarray [N, H, Lq, Lk]
        The attention probabilities (what :func:`attention_backward` needs).
    """
    q, k, v, H = _qkv(q, k, v, num_heads)
    N, Lq, C = q.shape
    Lk = k.shape[1]
    am = bool_u8(attn_mask, "attn_mask", (Lq, Lk))
    kpm = bool_u8(key_padding_mask, "key_padding_mask", (N, Lk))
    out = np.empty((N, Lq, C), np.float32)
    attn = np.empty((N, H, Lq, Lk), np.float32)
    _C.attention_forward(out, attn, q, k, v, am, kpm, N, Lq, Lk, C, H)
    return out, attn


def attention_backward(dy, q, k, v, attn, num_heads):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward` given ``dy [N, Lq, C]``
    and the ``attn`` it returned (masks are already inside ``attn``)."""
    q, k, v, H = _qkv(q, k, v, num_heads)
    N, Lq, C = q.shape
    Lk = k.shape[1]
    dy = f32(dy, "dy", shape=(N, Lq, C))
    attn = f32(attn, "attn", shape=(N, H, Lq, Lk))
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    _C.attention_backward(dq, dk, dv, dy, attn, q, k, v, N, Lq, Lk, C, H)
    return dq, dk, dv
