"""DINO's deformable transformer: the encoder, the two-stage mixed query
selection, the decoder with iterative box refinement and look-forward-twice,
and the FFN blocks, any of which can be a Mixture-of-Experts.

Shapes: ``B`` images, ``S`` flattened multi-scale tokens, ``Q`` decoder
queries (denoising + matching), ``d`` model width, ``L`` feature levels.
"""
import numpy as np

from .. import functional as F
from .. import nn, ops
from ..autograd import Tensor
from .denoising import INV_SIG_EPS
from .position_encoding import sine_box_encoding



def drop_path(x, p, training, rngs):
    """Stochastic depth: zero a whole sample's residual branch with probability p;
    ``rngs`` holds one Generator per sample (its draw does not depend on the batch split)."""
    if not training or p == 0.0:
        return x
    keep = (np.array([g.random() for g in rngs]) >= p).astype(np.float32) / (1.0 - p)
    return x * keep.reshape((-1,) + (1,) * (x.ndim - 1))


class FFNBlock(nn.Module):
    """Dense FFN with residual and post-norm, as in DINO: ``norm(x + W2 relu(W1 x))``."""

    def __init__(self, d_model, d_ffn, dropout=0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x, ctx=None, token_mask=None):
        h = self.linear2(F.relu(self.linear1(x)))
        if self.dropout is not None:
            h = self.dropout(h, ctx)
        return self.norm(x + h)


class MoEBlock(nn.Module):
    """An MoE FFN with pre-norm and drop-path: ``x + drop_path(moe(norm(x)))``.

    The ``[B, L, d]`` tokens are flattened batch-major; each token carries its
    image's dataset id (from the :class:`~damex.nn.context.ForwardContext`) to the
    DAMEX loss, and the routing loss and record go back up through the context.
    ``moe_options`` are :class:`damex.nn.MoE`'s keyword arguments.
    """

    def __init__(self, d_model, name, *, drop_path=0.0, **moe_options):
        super().__init__()
        self.name = name
        self.norm = nn.LayerNorm(d_model)
        # the DAMEX loss enters unweighted: the criterion weights the mean over layers
        self.moe = nn.MoE(d_model, damex_weight=1.0, **moe_options)
        self.drop_path = float(drop_path)

    def forward(self, x, ctx=None, token_mask=None):
        """``token_mask [B, L]`` is True at real tokens (False = padding, not routed)."""
        B, L, d = x.shape
        ids = ctx.token_dataset_ids(B, L) if ctx is not None else None
        mask = None if token_mask is None else np.asarray(token_mask, bool).reshape(B * L)
        use = ids if (ctx is not None and ctx.use_labels) else None
        y, aux, r = self.moe(self.norm(x).reshape(B * L, d), ctx, dataset_ids=use, mask=mask)
        if ctx is not None:
            ctx.add_routing(self.name, aux, {
                "dataset_ids": ids, "top1": r["expert_index"][:, 0],
                "valid": np.ones(B * L, bool) if mask is None else mask,
                "kept": r["kept"], "routed": r["routed"], "losses": r["losses"]})
        if self.training and self.drop_path > 0:
            rngs = (ctx.image_rngs(self, B) if ctx is not None
                    else [np.random.default_rng([0, b]) for b in range(B)])
            y = drop_path(y.reshape(B, L, d), self.drop_path, True, rngs)
        return x + y.reshape(B, L, d)


def make_ffn(d_model, d_ffn, name, moe_cfg, dropout=0.0):
    """A dense FFN block, or an MoE block when ``moe_cfg`` (a dict of MoEBlock options) is given."""
    if moe_cfg is None:
        return FFNBlock(d_model, d_ffn, dropout)
    return MoEBlock(d_model, name, **moe_cfg)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then the FFN (post-norm)."""

    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points, ffn):
        super().__init__()
        self.self_attn = nn.MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(self, src, pos, reference_points, shapes, starts, padding_mask, ctx):
        src2 = self.self_attn(src + pos, reference_points, src, shapes, starts, padding_mask)
        src = self.norm1(src + src2)
        return self.ffn(src, ctx, None if padding_mask is None else ~padding_mask)


class DecoderLayer(nn.Module):
    """Masked self-attention, deformable cross-attention to the memory, FFN (DINO's order)."""

    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points, ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(self, tgt, query_pos, ref_input, memory, shapes, starts, memory_mask, attn_mask,
                ctx):
        q = tgt + query_pos
        tgt2, _ = self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm2(tgt + tgt2)
        tgt2 = self.cross_attn(tgt + query_pos, ref_input, memory, shapes, starts, memory_mask)
        tgt = self.norm1(tgt + tgt2)
        return self.ffn(tgt, ctx)


def encoder_reference_points(shapes, valid_ratios):
    """Pixel centres of every level, normalised by the valid area: [B, S, L, 2] (x, y)."""
    refs = []
    for lvl, (H, W) in enumerate(shapes):
        ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        ry = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * H)
        rx = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * W)
        refs.append(np.stack([rx, ry], -1))
    ref = np.concatenate(refs, 1)
    return (ref[:, :, None] * valid_ratios[:, None]).astype(np.float32)


def encoder_proposals(padding_mask, shapes, valid_ratios):
    """Two-stage proposals: a box of size 0.05 * 2^level at every encoder token.

    Returns ``(proposal_logits [B, S, 4], usable [B, S] bool)``; a token is usable
    when it is not padding and its proposal lies inside (0.01, 0.99).
    """
    props = []
    for lvl, (H, W) in enumerate(shapes):
        ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        cx = xs.reshape(1, -1) / (valid_ratios[:, lvl, 0:1] * W)
        cy = ys.reshape(1, -1) / (valid_ratios[:, lvl, 1:2] * H)
        wh = np.full_like(cx, 0.05 * 2.0 ** lvl)
        props.append(np.stack([cx, cy, wh, wh], -1))
    p = np.concatenate(props, 1)
    usable = ((p > 0.01) & (p < 0.99)).all(-1)
    if padding_mask is not None:
        usable &= ~padding_mask
    logits = ops.inverse_sigmoid_forward(p, eps=INV_SIG_EPS)
    return np.where(usable[..., None], logits, 0.0).astype(np.float32), usable


class Decoder(nn.Module):
    """Decoder layers with iterative refinement and look-forward-twice, as DINO.

    With ``out_l`` the raw output of layer l, ``r_l`` the reference it was placed
    by (``r_0 = sigmoid(ref_logits)``) and ``sg`` a stop-gradient:

        new_l  = sigmoid(bbox_embed(out_l) + inverse_sigmoid(sg(r_l)))     (raw output)
        r_{l+1} = sg(new_l)
        box_l  = sigmoid(bbox_embed(norm(out_l)) + inverse_sigmoid(new_{l-1}))   (normed output)
        logits_l = class_embed(norm(out_l))

    (``new_{-1} = r_0``).  So the loss on ``box_l`` reaches layer l-1's box update
    through ``new_{l-1}`` and no earlier one (look forward twice).
    """

    def __init__(self, layers, d_model, class_embed, bbox_embed):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = nn.MLP(2 * d_model, d_model, d_model, 2)
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.d_model = d_model

    def forward(self, tgt, ref_logits, memory, shapes, starts, memory_mask, valid_ratios, attn_mask,
                ctx):
        ref = F.sigmoid(Tensor(ref_logits))          # r_l, no gradient
        prev = ref                                   # new_{l-1}, with its gradient
        scale = np.concatenate([valid_ratios, valid_ratios], -1)[:, None]        # [B, 1, L, 4]
        outputs = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            ref_input = ref.data[:, :, None] * scale
            query_pos = self.ref_point_head(Tensor(sine_box_encoding(ref_input[:, :, 0], self.d_model // 2)))
            tgt = layer(tgt, query_pos, ref_input, memory, shapes, starts, memory_mask, attn_mask, ctx)
            h = self.norm(tgt)
            box = F.sigmoid(self.bbox_embed(h) + F.inverse_sigmoid(prev, eps=INV_SIG_EPS))
            outputs.append((self.class_embed(h), box))
            if i < last:                             # the last update feeds no prediction
                prev = F.sigmoid(self.bbox_embed(tgt) + F.inverse_sigmoid(ref, eps=INV_SIG_EPS))
                ref = Tensor(prev.data)
        return outputs


class Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, pos, shapes, starts, padding_mask, valid_ratios, ctx):
        ref = encoder_reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, starts, padding_mask, ctx)
        return src


def select_queries(memory, proposal_logits, usable, enc_output, enc_norm, enc_class, enc_bbox,
                   num_queries, mask_unusable=False):
    """Mixed query selection: the top ``num_queries`` encoder tokens by their best class
    logit give the anchor boxes (detached for the decoder).

    As DINO, the memory of unusable tokens (padding, or a proposal outside
    (0.01, 0.99)) is zeroed and their proposal logits are +inf, but they are
    ranked with the others: their constant score can win, and their anchor is then
    (1, 1, 1, 1).  ``mask_unusable=True`` (damex's option) scores them -inf
    instead, so they are chosen only when fewer than ``num_queries`` tokens are usable.

    Returns ``(ref_logits [B, Q, 4] ndarray, interm_logits [B, Q, C], interm_boxes [B, Q, 4])``,
    the last two Tensors for the encoder-proposal loss.

    Raises
    ------
    ValueError
        When the encoder has fewer tokens than ``num_queries`` (images too small
        for the query count).
    """
    B, S = memory.shape[:2]
    if S < num_queries:
        raise ValueError(f"query selection: the encoder has {S} tokens per image but num_queries is "
                         f"{num_queries}; use larger images or fewer queries")
    keep = Tensor(usable[..., None].astype(np.float32))
    out = enc_norm(enc_output(memory * keep))
    logits = enc_class(out)                                            # [B, S, C]
    score = logits.data.max(-1)
    if mask_unusable:
        score = np.where(usable, score, -np.inf)
        props = proposal_logits
    else:
        props = np.where(usable[..., None], proposal_logits, np.float32(np.inf)).astype(np.float32)
    coord = enc_bbox(out) + Tensor(props)                              # [B, S, 4]
    top = np.argsort(-score, axis=1, kind="stable")[:, :num_queries]   # [B, Q]
    flat = (top + np.arange(B)[:, None] * S).reshape(-1)
    sel_coord = coord.reshape(B * S, 4)[flat].reshape(B, num_queries, 4)
    sel_logits = logits.reshape(B * S, -1)[flat].reshape(B, num_queries, -1)
    return sel_coord.data.copy(), sel_logits, F.sigmoid(sel_coord)


__all__ = ["FFNBlock", "MoEBlock", "make_ffn", "EncoderLayer", "DecoderLayer", "Encoder", "Decoder",
           "encoder_reference_points", "encoder_proposals", "select_queries"]
