"""Attention modules: MultiheadAttention (torch.nn.MultiheadAttention's parameters and
layout) and MSDeformAttn (Deformable-DETR / DINO)."""
import math

import numpy as np

from .. import functional as F
from ..autograd import Tensor, as_tensor
from . import init
from .layers import Linear
from .module import Module, Parameter

__all__ = ["MultiheadAttention", "MSDeformAttn"]


def _bool_mask(mask, name):
    """A boolean mask (True = blocked); float masks of 0 / -inf are converted."""
    if mask is None:
        return None
    m = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
    if m.dtype == np.bool_:
        return m
    if m.dtype.kind == "f" and np.all((m == 0) | np.isneginf(m)):
        return np.isneginf(m)
    raise TypeError(f"{name}: expected a boolean mask (True = blocked) or a float mask of 0/-inf, "
                    f"got dtype {m.dtype}")


class MultiheadAttention(Module):
    """Multi-head attention with torch.nn.MultiheadAttention's parameters:
    ``in_proj_weight[3E, E]``, ``in_proj_bias[3E]``, ``out_proj.weight[E, E]``,
    ``out_proj.bias[E]`` and its initialisation (xavier-uniform in-projection, zero biases).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True)`` takes ``[L, N, E]`` (or ``[N, L, E]`` with
    ``batch_first=True``) and returns ``(out, weights)``; weights are a constant Tensor
    ``[N, L, S]`` (averaged over heads) or ``[N, H, L, S]``, or None.  Masks are boolean,
    True = blocked.  Attention dropout is not supported (``dropout`` must be 0).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if dropout:
            raise NotImplementedError("MultiheadAttention: attention dropout is not supported (use dropout=0.0)")
        self.embed_dim, self.num_heads, self.batch_first = int(embed_dim), int(num_heads), bool(batch_first)
        self.head_dim = embed_dim // num_heads
        self.dropout = 0.0
        self.in_proj_weight = Parameter(np.zeros((3 * embed_dim, embed_dim), np.float32))
        if bias:
            self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, np.float32))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, rng=None):
        init.xavier_uniform_(self.in_proj_weight, rng=rng)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True):
        query, key, value = as_tensor(query), as_tensor(key), as_tensor(value)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        E = self.embed_dim
        W, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, W[:E], None if b is None else b[:E])
        k = F.linear(key, W[E:2 * E], None if b is None else b[E:2 * E])
        v = F.linear(value, W[2 * E:], None if b is None else b[2 * E:])
        out, attn = F.attention(q, k, v, self.num_heads,
                                attn_mask=_bool_mask(attn_mask, "attn_mask"),
                                key_padding_mask=_bool_mask(key_padding_mask, "key_padding_mask"))
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = Tensor(attn.data.mean(axis=1)) if average_attn_weights else attn
        return out, weights

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class MSDeformAttn(Module):
    """Multi-scale deformable attention (Deformable-DETR, as used by DINO), batch first.

    Parameters ``sampling_offsets`` (Linear d_model -> n_heads*n_levels*n_points*2),
    ``attention_weights`` (-> n_heads*n_levels*n_points), ``value_proj`` and
    ``output_proj`` (d_model -> d_model), initialised as in DINO: zero offset weights
    with the directional grid as bias (head h points along angle 2*pi*h/n_heads, point
    p at distance p+1), zero attention weights, xavier-uniform projections.

    ``forward(query[N, Lq, C], reference_points[N, Lq, L, 2|4], input_flatten[N, S, C],
    input_spatial_shapes[L, 2], input_level_start_index[L], input_padding_mask=None[N, S])``
    returns ``[N, Lq, C]``.  Reference points are normalised (cx, cy) or boxes
    (cx, cy, w, h) in [0, 1]; padding mask True = padded (the value is zeroed there).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self, rng=None):
        M, L, P = self.n_heads, self.n_levels, self.n_points
        init.zeros_(self.sampling_offsets.weight)
        thetas = np.arange(M, dtype=np.float32) * np.float32(2.0 * math.pi / M)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid.reshape(M, 1, 1, 2), (1, L, P, 1))
        grid *= np.arange(1, P + 1, dtype=np.float32).reshape(1, 1, P, 1)
        self.sampling_offsets.bias.data[...] = grid.reshape(-1)
        init.zeros_(self.attention_weights.weight)
        init.zeros_(self.attention_weights.bias)
        init.xavier_uniform_(self.value_proj.weight, rng=rng)
        init.zeros_(self.value_proj.bias)
        init.xavier_uniform_(self.output_proj.weight, rng=rng)
        init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None):
        query, reference_points = as_tensor(query), as_tensor(reference_points)
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        shapes = np.asarray(input_spatial_shapes, np.int64)
        if shapes.shape != (L, 2):
            raise ValueError(f"MSDeformAttn: input_spatial_shapes must have shape ({L}, 2), got {shapes.shape}")
        if int((shapes[:, 0] * shapes[:, 1]).sum()) != S:
            raise ValueError(f"MSDeformAttn: the levels hold {int((shapes[:, 0] * shapes[:, 1]).sum())} "
                             f"positions but input_flatten has {S}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            mask = np.asarray(input_padding_mask.data if isinstance(input_padding_mask, Tensor)
                              else input_padding_mask, bool)
            value = value.masked_fill(mask[..., None], 0.0)
        value = value.reshape(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).reshape(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).reshape(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).reshape(N, Lq, M, L, P)
        last = reference_points.shape[-1]
        if last == 2:
            normalizer = np.stack([shapes[:, 1], shapes[:, 0]], -1).astype(np.float32)
            ref = reference_points.reshape(N, Lq, 1, L, 1, 2)
            locations = ref + offsets / normalizer.reshape(1, 1, 1, L, 1, 2)
        elif last == 4:
            ref = reference_points.reshape(N, Lq, 1, L, 1, 4)
            locations = ref[..., :2] + offsets / np.float32(P) * ref[..., 2:] * np.float32(0.5)
        else:
            raise ValueError(f"MSDeformAttn: last dim of reference_points must be 2 or 4, got {last}")
        out = F.ms_deform_attn(value, shapes, np.asarray(input_level_start_index, np.int64),
                               locations, weights)
        return self.output_proj(out)

    def extra_repr(self):
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"
