"""A PyTorch twin of DINO (IDEA-Research/DINO) and of its DAMEX variant
(jinga-lala/DAMEX), written for damex's parity tests from a reading of the
official code: the same module names (so ``state_dict()`` has the official
checkpoint layout), the same conventions, the same loss.

It starts after the backbone: ``forward`` takes the backbone's feature maps
(the ResNet is validated on its own).  What it reproduces:

- ``input_proj.N.0/1`` (1x1 conv + GroupNorm(32), extra levels a 3x3/2 conv on
  the last backbone map), masks by nearest interpolation of the image mask,
  ``PositionEmbeddingSineHW`` (temperature 20/20, normalised, no offset),
  ``transformer.level_embed``;
- the deformable encoder (``transformer.encoder.layers.N.self_attn`` MSDeformAttn,
  ``norm1``, ``linear1``, ``linear2``, ``norm2``, ReLU);
- two-stage selection (``transformer.enc_output``/``enc_output_norm``, padding
  and out-of-range proposals zeroed and set to +inf but ranked, ``torch.topk``,
  ``transformer.enc_out_class_embed``/``enc_out_bbox_embed``,
  ``transformer.tgt_embed``);
- the decoder (``self_attn`` nn.MultiheadAttention seq-first with
  ``in_proj_weight``, ``norm2``, ``cross_attn``, ``norm1``, FFN ``linear1``,
  ``linear2``, ``norm3``), ``ref_point_head``, the reference update from the raw
  layer output with the reference detached between layers, predictions from
  ``transformer.decoder.norm`` of the output and the previous layer's
  undetached reference (look forward twice), shared heads listed as
  ``class_embed.N``/``bbox_embed.N`` and ``transformer.decoder.class_embed.N``/
  ``bbox_embed.N``;
- denoising queries given from outside (``dn``: labels embedded by
  ``label_enc``, zero content at padding, attention mask), as DINO's
  ``prepare_for_cdn`` lays them out;
- DAMEX: decoder layers listed in ``moe_layers`` have a Tutel MoE FFN,
  ``_moe_layer._moe_layer.gates.0.wg.weight [E, D]``,
  ``_moe_layer._moe_layer.experts.batched_fc1_w [E, F, D]``, ``batched_fc1_bias
  [E, F]``, ``batched_fc2_w [E, F, D]``, ``batched_fc2_bias [E, D]`` and the
  ``_num_global_experts`` buffer, pre-norm ``norm3`` and a residual; top-1,
  softmax gate not renormalised, dropless, no gate noise, GELU (erf).

Generalised where the official code hard-codes the paper size: the sine
embedding of reference boxes has ``d_model // 2`` features per coordinate
(DINO: 128, which is d_model // 2 at d_model 256).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from damex.testing import torch_twins
from damex.testing.torch_twins import cxcywh_to_xyxy, generalized_box_iou, sigmoid_focal_loss


def inverse_sigmoid(x):
    """DINO's inverse_sigmoid: eps 1e-3."""
    return torch_twins.inverse_sigmoid(x, eps=1e-3)


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


# ---- position encodings -----------------------------------------------------

def position_sine_hw(mask, num_pos_feats, temperature_h=20.0, temperature_w=20.0):
    """PositionEmbeddingSineHW(normalize=True): [B, H, W] bool -> [B, 2F, H, W]."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.get_default_dtype())
    x = not_mask.cumsum(2, dtype=torch.get_default_dtype())
    scale = 2 * math.pi
    y = y / (y[:, -1:, :] + 1e-6) * scale
    x = x / (x[:, :, -1:] + 1e-6) * scale
    i = torch.arange(num_pos_feats, dtype=torch.get_default_dtype())
    pos = []
    for v, t in ((y, temperature_h), (x, temperature_w)):
        p = v[..., None] / (t ** (2 * (i // 2) / num_pos_feats))
        pos.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).flatten(3))
    return torch.cat(pos, dim=3).permute(0, 3, 1, 2)


def sine_embed_boxes(boxes, num_feats):
    """gen_sineembed_for_position of [..., 4] boxes: (y, x, w, h) blocks."""
    i = torch.arange(num_feats, dtype=torch.get_default_dtype())
    dim_t = 10000 ** (2 * (i // 2) / num_feats)
    out = []
    for c in (1, 0, 2, 3):
        p = boxes[..., c, None] * (2 * math.pi) / dim_t
        out.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(out, -1)


# ---- deformable attention ---------------------------------------------------

class MSDeformAttn(nn.Module):
    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, shapes, padding_mask=None):
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, -1, M, self.d_model // M)
        off = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        aw = F.softmax(self.attention_weights(query).view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            t = torch.tensor(shapes, dtype=torch.get_default_dtype())
            normalizer = torch.stack([t[:, 1], t[:, 0]], -1)
            loc = reference_points[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        else:
            loc = reference_points[:, :, None, :, None, :2] \
                + off / P * reference_points[:, :, None, :, None, 2:] * 0.5
        return self.output_proj(torch_twins.ms_deform_attn(value, shapes, loc, aw))


# ---- encoder / decoder layers -------------------------------------------------

class EncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, ref, shapes, mask):
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes, mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TutelExperts(nn.Module):
    """tutel.experts.ffn as saved: one rank's local experts."""

    def __init__(self, num_experts, d_model, d_hidden):
        super().__init__()
        self.batched_fc1_w = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.batched_fc2_w = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.batched_fc1_bias = nn.Parameter(torch.empty(num_experts, d_hidden))
        self.batched_fc2_bias = nn.Parameter(torch.empty(num_experts, d_model))


class TutelGate(nn.Module):
    def __init__(self, d_model, num_experts):
        super().__init__()
        self.wg = nn.Linear(d_model, num_experts, bias=False)


class TutelMoELayer(nn.Module):
    """tutel moe_layer as DAMEX uses it: top-1, no gate renormalisation (dropless here)."""

    def __init__(self, d_model, num_experts, d_hidden):
        super().__init__()
        self.register_buffer("_num_global_experts", torch.tensor(num_experts))
        self.experts = TutelExperts(num_experts, d_model, d_hidden)
        self.gates = nn.ModuleList([TutelGate(d_model, num_experts)])

    def forward(self, x):
        """x [T, D] -> (y [T, D], router logits [T, E])."""
        logits = self.gates[0].wg(x)
        scores = F.softmax(logits, dim=1)
        top = scores.topk(1, dim=1).indices[:, 0]
        gate = scores.gather(1, top[:, None])
        e = self.experts
        y = x.new_zeros(x.shape)
        for i in range(e.batched_fc1_w.shape[0]):       # each expert on its tokens
            sel = (top == i).nonzero()[:, 0]
            if len(sel):
                h = F.gelu(x[sel] @ e.batched_fc1_w[i].T + e.batched_fc1_bias[i])
                y = y.index_add(0, sel, h @ e.batched_fc2_w[i] + e.batched_fc2_bias[i])
        return gate * y, logits


class MoEMlp(nn.Module):
    def __init__(self, d_model, num_experts, d_hidden):
        super().__init__()
        self._moe_layer = TutelMoELayer(d_model, num_experts, d_hidden)

    def forward(self, x):
        return self._moe_layer(x)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points, moe=None):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=0.0)
        self.norm2 = nn.LayerNorm(d_model)
        if moe is None:
            self.linear1 = nn.Linear(d_model, d_ffn)
            self.linear2 = nn.Linear(d_ffn, d_model)
        else:
            self._moe_layer = MoEMlp(d_model, *moe)
        self.norm3 = nn.LayerNorm(d_model)
        self.router_logits = None

    def forward(self, tgt, query_pos, ref_input, memory, shapes, memory_mask, attn_mask):
        """tgt, query_pos [nq, bs, d] (seq-first, as DINO's decoder)."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, attn_mask=attn_mask)[0])
        ca = self.cross_attn((tgt + query_pos).transpose(0, 1), ref_input.transpose(0, 1).contiguous(),
                             memory, shapes, memory_mask).transpose(0, 1)
        tgt = self.norm1(tgt + ca)
        if hasattr(self, "linear1"):
            return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        nq, bs, d = tgt.shape
        y, self.router_logits = self._moe_layer(self.norm3(tgt).reshape(-1, d))
        return tgt + y.view(nq, bs, d)


class TransformerEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, pos, shapes, valid_ratios, mask):
        refs = []
        for lvl, (H, W) in enumerate(shapes):
            ry, rx = torch.meshgrid(torch.linspace(0.5, H - 0.5, H), torch.linspace(0.5, W - 0.5, W),
                                    indexing="ij")
            ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            refs.append(torch.stack((rx, ry), -1))
        ref = torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, mask)
        return src


class TransformerDecoder(nn.Module):
    def __init__(self, layers, d_model):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, memory, mask, refpoints_unsigmoid, shapes, valid_ratios, attn_mask):
        """tgt [nq, bs, d], refpoints_unsigmoid [nq, bs, 4] -> (normed outputs, references)."""
        reference = refpoints_unsigmoid.sigmoid()
        refs, hs = [reference], []
        out = tgt
        for lid, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[None]
            query_pos = self.ref_point_head(sine_embed_boxes(ref_input[:, :, 0, :], self.d_model // 2))
            out = layer(out, query_pos, ref_input, memory, shapes, mask, attn_mask)
            new_ref = (self.bbox_embed[lid](out) + inverse_sigmoid(reference)).sigmoid()
            reference = new_ref.detach()
            refs.append(new_ref)
            hs.append(self.norm(out))
        return hs, refs


class DeformableTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, L = cfg["d_model"], cfg["num_feature_levels"]
        self.d_model, self.num_queries = d, cfg["num_queries"]
        self.level_embed = nn.Parameter(torch.empty(L, d))
        self.encoder = TransformerEncoder([
            EncoderLayer(d, cfg["d_ffn"], L, cfg["n_heads"], cfg["n_points"]) for _ in range(cfg["enc_layers"])])
        moe = (cfg.get("num_experts"), cfg.get("moe_hidden"))
        self.decoder = TransformerDecoder([
            DecoderLayer(d, cfg["d_ffn"], L, cfg["n_heads"], cfg["n_points"],
                         moe if i in cfg.get("moe_layers", ()) else None)
            for i in range(cfg["dec_layers"])], d)
        self.tgt_embed = nn.Embedding(cfg["num_queries"], d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_class_embed = nn.Linear(d, cfg["num_classes"])
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)

    def proposals(self, memory, mask, shapes):
        """gen_encoder_output_proposals."""
        N = memory.shape[0]
        props, cur = [], 0
        for lvl, (H, W) in enumerate(shapes):
            m = mask[:, cur:cur + H * W].view(N, H, W)
            valid_h = (~m[:, :, 0]).sum(1)
            valid_w = (~m[:, 0, :]).sum(1)
            gy, gx = torch.meshgrid(torch.linspace(0, H - 1, H), torch.linspace(0, W - 1, W), indexing="ij")
            grid = torch.cat([gx[..., None], gy[..., None]], -1)
            scale = torch.cat([valid_w[:, None], valid_h[:, None]], 1).view(N, 1, 1, 2)
            grid = (grid[None].expand(N, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            props.append(torch.cat((grid, wh), -1).view(N, -1, 4))
            cur += H * W
        p = torch.cat(props, 1)
        ok = ((p > 0.01) & (p < 0.99)).all(-1, keepdim=True)
        p = torch.log(p / (1 - p))
        p = p.masked_fill(mask[..., None], float("inf")).masked_fill(~ok, float("inf"))
        out = memory.masked_fill(mask[..., None], 0.0).masked_fill(~ok, 0.0)
        return out, p

    def forward(self, srcs, masks, pos_embeds, dn_boxes=None, dn_tgt=None, attn_mask=None):
        flat, mflat, pflat, shapes = [], [], [], []
        for lvl, (src, m, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append((src.shape[2], src.shape[3]))
            flat.append(src.flatten(2).transpose(1, 2))
            mflat.append(m.flatten(1))
            pflat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src, mask, pos = torch.cat(flat, 1), torch.cat(mflat, 1), torch.cat(pflat, 1)
        valid_ratios = torch.stack([torch.stack([(~m[:, 0, :]).sum(1).to(src.dtype) / m.shape[2],
                                                 (~m[:, :, 0]).sum(1).to(src.dtype) / m.shape[1]], -1)
                                    for m in masks], 1)
        memory = self.encoder(src, pos, shapes, valid_ratios, mask)
        out_mem, out_props = self.proposals(memory, mask, shapes)
        out_mem = self.enc_output_norm(self.enc_output(out_mem))
        cls = self.enc_out_class_embed(out_mem)
        coord = self.enc_out_bbox_embed(out_mem) + out_props
        top = torch.topk(cls.max(-1)[0], self.num_queries, dim=1)[1]
        ref_undetach = torch.gather(coord, 1, top[..., None].repeat(1, 1, 4))
        tgt_undetach = torch.gather(out_mem, 1, top[..., None].repeat(1, 1, self.d_model))
        bs = src.shape[0]
        tgt = self.tgt_embed.weight[:, None, :].repeat(1, bs, 1).transpose(0, 1)
        ref = ref_undetach.detach()
        if dn_boxes is not None:
            ref = torch.cat([dn_boxes, ref], 1)
            tgt = torch.cat([dn_tgt, tgt], 1)
        hs, refs = self.decoder(tgt.transpose(0, 1), memory, mask, ref.transpose(0, 1), shapes,
                                valid_ratios, attn_mask)
        hs = [h.transpose(0, 1) for h in hs]
        refs = [r.transpose(0, 1) for r in refs]
        return hs, refs, tgt_undetach, ref_undetach.sigmoid(), top


class DINOTwin(nn.Module):
    """The detector after the backbone.

    ``cfg``: dict with d_model, d_ffn, n_heads, n_points, enc_layers, dec_layers,
    num_queries, num_classes, num_feature_levels, in_channels (backbone maps),
    optional moe_layers, num_experts, moe_hidden, dn_labelbook_size.
    """

    def __init__(self, cfg):
        super().__init__()
        d, C = cfg["d_model"], cfg["num_classes"]
        self.cfg = dict(cfg)
        self.transformer = DeformableTransformer(cfg)
        self.label_enc = nn.Embedding(cfg.get("dn_labelbook_size", C) + 1, d)
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in cfg["in_channels"]]
        cin = cfg["in_channels"][-1]
        for _ in range(cfg["num_feature_levels"] - len(proj)):
            proj.append(nn.Sequential(nn.Conv2d(cin, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            cin = d
        self.input_proj = nn.ModuleList(proj)
        class_embed, bbox_embed = nn.Linear(d, C), MLP(d, d, 4, 3)
        n = cfg["dec_layers"]
        self.bbox_embed = nn.ModuleList([bbox_embed] * n)
        self.class_embed = nn.ModuleList([class_embed] * n)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed

    def randomize(self, seed=0):
        """Random values in every parameter and buffer that is not an integer count."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name or name.endswith(".1.weight") and "input_proj" in name:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
                elif name.endswith("sampling_offsets.bias"):
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    fan_in = p.shape[-1] if p.ndim > 1 else 16
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        return self

    def forward(self, features, mask, dn=None):
        """Run in the parameters' dtype (``twin.double()`` gives a float64 reference).

        features: list of backbone maps [B, C_l, H_l, W_l]; mask [B, H, W] bool (True = padding);
        dn: None or dict with labels [B, pad] long, valid [B, pad] bool, box_logits [B, pad, 4],
        attn_mask [pad + nq, pad + nq] bool, pad_size."""
        dtype = self.label_enc.weight.dtype
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return self._forward([f.to(dtype) for f in features], mask, dn)
        finally:
            torch.set_default_dtype(old)

    def _forward(self, features, mask, dn):
        d = self.cfg["d_model"]
        srcs = [p(f) for p, f in zip(self.input_proj, features)]
        x = features[-1]
        for p in self.input_proj[len(features):]:
            x = p(x)
            srcs.append(x)
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        pos = [position_sine_hw(m, d // 2) for m in masks]
        dn_boxes = dn_tgt = attn_mask = None
        if dn is not None:
            dn_tgt = self.label_enc(torch.as_tensor(np.where(dn["valid"], dn["labels"], 0))) \
                * torch.as_tensor(dn["valid"], dtype=torch.get_default_dtype())[..., None]
            dn_boxes = torch.as_tensor(dn["box_logits"]).to(self.label_enc.weight.dtype)
            attn_mask = torch.as_tensor(dn["attn_mask"])
        hs, refs, hs_enc, ref_enc, top = self.transformer(srcs, masks, pos, dn_boxes, dn_tgt, attn_mask)
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0
        boxes = [(self.bbox_embed[i](h) + inverse_sigmoid(r)).sigmoid() for i, (h, r) in enumerate(zip(hs, refs[:-1]))]
        logits = [self.class_embed[i](h) for i, h in enumerate(hs)]
        p = 0 if dn is None else dn["pad_size"]
        out = {"pred_logits": logits[-1][:, p:], "pred_boxes": boxes[-1][:, p:],
               "aux_outputs": [{"pred_logits": lg[:, p:], "pred_boxes": bx[:, p:]}
                               for lg, bx in zip(logits[:-1], boxes[:-1])],
               "interm_outputs": {"pred_logits": self.transformer.enc_out_class_embed(hs_enc),
                                  "pred_boxes": ref_enc},
               "topk": top}
        if dn is not None:
            out["dn_outputs"] = [{"pred_logits": lg[:, :p], "pred_boxes": bx[:, :p]}
                                 for lg, bx in zip(logits, boxes)]
        out["router_logits"] = [layer.router_logits for layer in self.transformer.decoder.layers
                                if layer.router_logits is not None]
        return out


# ---- DINO's criterion ---------------------------------------------------------

@torch.no_grad()
def hungarian(logits, boxes, targets, alpha=0.25):
    out = []
    for b, t in enumerate(targets):
        p = logits[b].sigmoid()
        neg = (1 - alpha) * p ** 2 * -(1 - p + 1e-8).log()
        pos = alpha * (1 - p) ** 2 * -(p + 1e-8).log()
        cls = pos[:, t["labels"]] - neg[:, t["labels"]]
        l1 = torch.cdist(boxes[b], t["boxes"], p=1)
        giou = -generalized_box_iou(cxcywh_to_xyxy(boxes[b]), cxcywh_to_xyxy(t["boxes"]))
        q, g = linear_sum_assignment((5 * l1 + 2 * cls + 2 * giou).numpy())
        out.append((torch.as_tensor(q), torch.as_tensor(g)))
    return out


def set_losses(logits, boxes, targets, indices, num_boxes, alpha=0.25):
    """loss_labels (focal) and loss_boxes (L1, GIoU) of DINO's SetCriterion."""
    B, Q, C = logits.shape
    onehot = torch.zeros(B, Q, C, dtype=logits.dtype)
    for b, (q, g) in enumerate(indices):
        onehot[b, q, targets[b]["labels"][g]] = 1.0
    focal = sigmoid_focal_loss(logits, onehot, alpha, 2.0)
    loss_ce = focal.mean(1).sum() / num_boxes * Q
    src = torch.cat([boxes[b, q] for b, (q, _) in enumerate(indices)])
    tgt = torch.cat([targets[b]["boxes"][g] for b, (_, g) in enumerate(indices)])
    loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
    loss_giou = (1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))).sum() / num_boxes
    return {"ce": loss_ce, "bbox": loss_bbox, "giou": loss_giou}


def dino_loss(out, targets, dn=None, dataset_ids=None, moe_weight=0.1, weights=(1.0, 5.0, 2.0)):
    """The weighted total of DINO's training loss (matched sets, interm, dn) plus DAMEX's
    routing loss (mean over MoE layers of the cross entropy of the router logits against
    the token's dataset, per-token labels) when ``dataset_ids`` is given."""
    w = dict(zip(("ce", "bbox", "giou"), weights))
    dtype = out["pred_boxes"].dtype
    targets = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in targets]
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    sets = [out] + out["aux_outputs"] + [out["interm_outputs"]]
    total = 0.0
    for s in sets:
        idx = hungarian(s["pred_logits"].detach(), s["pred_boxes"].detach(), targets)
        for k, v in set_losses(s["pred_logits"], s["pred_boxes"], targets, idx, num_boxes).items():
            total = total + w[k] * v
    if dn is not None:
        for s in out["dn_outputs"]:
            idx = [(torch.as_tensor(q), torch.as_tensor(g)) for q, g in dn["positive"]]
            for k, v in set_losses(s["pred_logits"], s["pred_boxes"], targets, idx,
                                   num_boxes * dn["num_groups"]).items():
                total = total + w[k] * v
    if dataset_ids is not None and out["router_logits"]:
        moe = 0.0
        for logits in out["router_logits"]:
            nq_bs = logits.shape[0]
            bs = len(dataset_ids)
            ids = torch.as_tensor(np.asarray(dataset_ids)).repeat(nq_bs // bs)   # seq-first tokens
            moe = moe + F.cross_entropy(logits, ids)
        total = total + moe_weight * moe / len(out["router_logits"])
    return total
