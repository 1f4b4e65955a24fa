"""DINO with Mixture-of-Experts FFNs (DAMEX).

Data flows once up and once down: images [B, 3, H, W] with their padding mask
and per-image dataset ids -> backbone -> 1x1 projections + GroupNorm (plus one
extra stride-2 level) -> sine position encoding + level embedding -> MSDA
encoder -> mixed query selection -> decoder (contrastive denoising queries
first, then the matching queries; MoE FFNs get every token's dataset id) ->
class and box heads on every decoder layer.  The criterion (criterion.py)
turns the returned outputs into the loss.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import nn
from .. import routing as _routing
from ..nn.context import ForwardContext
from ..autograd import Tensor, cat
from .backbone import ResNet
from .denoising import dn_content, prepare_cdn
from .position_encoding import sine_position_encoding
from .transformer import (Decoder, DecoderLayer, Encoder, EncoderLayer, encoder_proposals, make_ffn,
                          select_queries)


@dataclass
class DINOConfig:
    """Every size and switch of the model (see the ``tiny`` and ``paper`` presets)."""
    num_classes: int = 10
    d_model: int = 64
    d_ffn: int = 256
    n_heads: int = 4
    n_points: int = 4
    enc_layers: int = 2
    dec_layers: int = 3
    num_queries: int = 30
    num_feature_levels: int = 4
    backbone_depths: tuple = (1, 1, 1, 1)
    backbone_widths: tuple = (16, 32, 64, 128)
    backbone_block: str = "basic"
    backbone_norm: str = "group"
    stem_width: int = 16
    # backbone stages whose parameters train (0 = the stem conv1/bn1, 1..4 = layer1..layer4);
    # the others are frozen.  DINO freezes the stem and layer1: (2, 3, 4) in the ResNet-50 presets
    train_backbone_layers: tuple = (0, 1, 2, 3, 4)
    # weights to start from, loaded where the model is built (damex.weights.load_pretrained):
    # backbone only (e.g. converted torchvision ImageNet weights) and/or the whole model
    backbone_weights: str = ""
    pretrained: str = ""
    # routing: a mode of damex.routing.MODES: "dense" (no MoE), "moe" (balance loss),
    # "damex" (DAMEX loss), "damex+balance"
    routing: str = "damex"
    moe_decoder_layers: tuple = (0, 2)
    moe_encoder_layers: tuple = ()
    num_experts: int = 4
    moe_hidden: int = 256
    moe_k: int = 1
    capacity_factor: Optional[float] = 1.25   # None: dropless training
    capacity_sizing: str = "uniform"   # "composition": room for the batch's most frequent expert
    eval_capacity_factor: Optional[float] = None   # None: dropless at evaluation and prediction
    bpr: bool = True
    gate_noise: float = 1.0
    moe_activation: str = "gelu_tanh"
    drop_path: float = 0.0
    dataset_to_expert: tuple = ()
    # contrastive denoising
    dn_number: int = 100
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0
    # damex's option (off = DINO): padding / out-of-range proposals never win the query selection
    mask_unusable_queries: bool = False
    seed: int = 0


_R50_DINO_4SCALE = dict(   # IDEA-Research/DINO config/DINO/DINO_4scale.py
    d_model=256, d_ffn=2048, n_heads=8, n_points=4, enc_layers=6, dec_layers=6,
    num_queries=900, num_feature_levels=4, backbone_depths=(3, 4, 6, 3),
    backbone_widths=(64, 128, 256, 512), backbone_block="bottleneck",
    backbone_norm="frozen_bn", stem_width=64, train_backbone_layers=(2, 3, 4), dn_number=100,
    dn_label_noise_ratio=0.5)

PRESETS = {
    "tiny": DINOConfig(),
    # DINO_4scale: dense FFNs, COCO's 91 class ids, dn_box_noise_scale 0.4
    "dino": DINOConfig(**_R50_DINO_4SCALE, num_classes=91, routing="dense", dn_box_noise_scale=0.4),
    # jinga-lala/DAMEX config/uodb/DAMEX_4scale.py: MoE FFNs in decoder layers 0, 2, 4,
    # dn_box_noise_scale 1.0; experts with erf GELU (its Swin-MoE-style MoEMlp: F.gelu)
    "paper": DINOConfig(**_R50_DINO_4SCALE, moe_decoder_layers=(0, 2, 4), num_experts=8,
                        moe_hidden=2048, dn_box_noise_scale=1.0, moe_activation="gelu"),
}


def preset(name, **overrides):
    """A copy of a preset with some fields changed (unknown fields raise)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    fields = PRESETS[name].__dict__.copy()
    for key in overrides:
        if key not in fields:
            raise ValueError(f"model config: unknown key {key!r}")
    fields.update(overrides)
    return DINOConfig(**fields)


def encoder_tokens(cfg, height, width):
    """The encoder tokens of one (padded) ``height`` x ``width`` image: the backbone's
    layer2..layer4 maps (strides 8, 16, 32) and the extra stride-2 levels, every convolution
    rounding up (a 7x7/2 or 3x3/2 conv with padding and the 3x3/2 max-pool give
    ``ceil(n / 2)``).  Query selection needs at least ``cfg.num_queries`` of them."""
    levels = max(cfg.num_feature_levels, 3)
    return sum(-(-int(height) // 2 ** (3 + i)) * -(-int(width) // 2 ** (3 + i)) for i in range(levels))


def min_square_side(cfg):
    """The smallest ``n`` for which an ``n`` x ``n`` image gives ``cfg.num_queries`` tokens."""
    n = 1
    while encoder_tokens(cfg, n, n) < cfg.num_queries:
        n += 1
    return n


def _moe_cfg(cfg, layer_ids, i):
    loss = _routing.mode_loss(cfg.routing)
    if loss is None or i not in layer_ids:
        return None
    mapping = list(cfg.dataset_to_expert) or None
    if "damex" in loss and mapping is None:
        raise ValueError(f"dataset_to_expert: required by routing={cfg.routing!r}")
    return dict(d_hidden=cfg.moe_hidden, num_experts=cfg.num_experts, k=cfg.moe_k,
                capacity_factor=cfg.capacity_factor, capacity_sizing=cfg.capacity_sizing,
                eval_capacity_factor=cfg.eval_capacity_factor,
                bpr=cfg.bpr, gate_noise=cfg.gate_noise, activation=cfg.moe_activation, loss=loss,
                dataset_to_expert=mapping, drop_path=cfg.drop_path)


def _downsample_mask(mask, shape):
    """Nearest-neighbour resize of a [B, H, W] padding mask to ``shape``."""
    H, W = mask.shape[1:]
    h, w = shape
    ys = (np.arange(h) * H // h).clip(0, H - 1)
    xs = (np.arange(w) * W // w).clip(0, W - 1)
    return mask[:, ys][:, :, xs]


class DINO(nn.Module):
    """The detector; ``forward(images, mask, dataset_ids, targets=None)`` -> outputs dict."""

    def __init__(self, cfg):
        super().__init__()
        _routing.mode_loss(cfg.routing)
        self.cfg = cfg
        d, C = cfg.d_model, cfg.num_classes
        self.backbone = ResNet(cfg.backbone_depths, cfg.backbone_widths, cfg.backbone_block,
                               cfg.stem_width, cfg.backbone_norm)
        self.backbone.set_trainable_stages(cfg.train_backbone_layers)
        groups = 32 if d % 32 == 0 else 8
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(groups, d))
                for c in self.backbone.num_channels]
        cin = self.backbone.num_channels[-1]
        for _ in range(cfg.num_feature_levels - len(proj)):
            proj.append(nn.Sequential(nn.Conv2d(cin, d, 3, stride=2, padding=1), nn.GroupNorm(groups, d)))
            cin = d
        self.input_proj = nn.ModuleList(proj)
        self.level_embed = nn.Parameter(np.random.default_rng(cfg.seed).normal(
            0, 1, (cfg.num_feature_levels, d)).astype(np.float32))
        L = cfg.num_feature_levels
        self.encoder = Encoder([
            EncoderLayer(d, cfg.d_ffn, L, cfg.n_heads, cfg.n_points,
                         make_ffn(d, cfg.d_ffn, f"encoder.{i}", _moe_cfg(cfg, cfg.moe_encoder_layers, i)))
            for i in range(cfg.enc_layers)])
        prior = -math.log((1 - 0.01) / 0.01)
        class_embed = nn.Linear(d, C)
        class_embed.bias.data[:] = prior
        bbox_embed = nn.MLP(d, d, 4, 3)
        bbox_embed.layers[-1].weight.data[:] = 0
        bbox_embed.layers[-1].bias.data[:] = 0
        self.decoder = Decoder([
            DecoderLayer(d, cfg.d_ffn, L, cfg.n_heads, cfg.n_points,
                         make_ffn(d, cfg.d_ffn, f"decoder.{i}", _moe_cfg(cfg, cfg.moe_decoder_layers, i)))
            for i in range(cfg.dec_layers)], d, class_embed, bbox_embed)
        # two-stage heads on the encoder memory
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_class_embed = nn.Linear(d, C)
        self.enc_class_embed.bias.data[:] = prior
        self.enc_bbox_embed = nn.MLP(d, d, 4, 3)
        self.enc_bbox_embed.layers[-1].weight.data[:] = 0
        self.enc_bbox_embed.layers[-1].bias.data[:] = 0
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.label_enc = nn.Embedding(C + 1, d)   # C + 1 rows as DINO (the last is never embedded)
        self._calls = 0   # numbers the forwards made without a context (their streams' step)

    # -- the parts of the forward pass ------------------------------------------

    def _features(self, images, mask):
        feats = self.backbone(images)
        srcs = [p(f) for p, f in zip(self.input_proj, feats)]
        x = feats[-1]
        for p in self.input_proj[len(feats):]:   # extra levels: stride-2 convs on the last map
            x = p(x)
            srcs.append(x)
        masks = [_downsample_mask(mask, s.shape[2:]) for s in srcs]
        return srcs, masks

    def _flatten(self, srcs, masks):
        """Level-major flattening of the maps: memory tokens, positions, mask, shapes."""
        d = self.cfg.d_model
        shapes = np.array([s.shape[2:] for s in srcs], np.int64)
        starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64)
        flat, pos = [], []
        for lvl, (s, m) in enumerate(zip(srcs, masks)):
            B = s.shape[0]
            flat.append(s.reshape(B, d, -1).transpose(1, 2))
            pe = sine_position_encoding(m, d // 2).reshape(B, d, -1).transpose(0, 2, 1)
            pos.append(Tensor(pe) + self.level_embed[lvl].reshape(1, 1, d))
        mask_flat = np.concatenate([m.reshape(m.shape[0], -1) for m in masks], 1)
        valid_ratios = np.stack([np.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
                          for m in masks], 1).astype(np.float32)             # [B, L, 2] (w, h)
        return cat(flat, 1), cat(pos, 1), mask_flat, shapes, starts, valid_ratios

    def forward(self, images, mask, dataset_ids=None, targets=None, ctx=None, dn_queries=None):
        """Run the detector.

        Parameters
        ----------
        images : ndarray or Tensor [B, 3, H, W]
        mask : ndarray [B, H, W] bool, True at padding pixels
        dataset_ids : ndarray [B] int, optional
            The dataset of every image: routed tokens inherit it for the DAMEX loss
            (training) and the routing statistics; the router never sees it.
        targets : list of dict, optional
            Per image ``labels`` [n] (joint label space) and ``boxes`` [n, 4]
            normalised cxcywh; in training mode they give the denoising queries.
        ctx : ForwardContext, optional
            The per-forward context (random streams from its seed and step); by default
            one with ``dataset_ids``, labels used in training, ``cfg.seed`` and a call count.
        dn_queries : DenoisingQueries, optional
            Use these denoising queries instead of preparing them from ``targets`` (data
            parallel training: this rank's images' part of the global batch's queries).

        Returns
        -------
        dict with ``pred_logits`` [B, Qm, C], ``pred_boxes`` [B, Qm, 4] (last layer),
        ``aux_outputs`` (earlier layers), ``interm_outputs`` (encoder proposals),
        ``dn_outputs`` and ``dn`` (denoising part, training only), ``routing``
        (the ForwardContext, holding every MoE layer's loss and record).
        """
        cfg = self.cfg
        images = images if isinstance(images, Tensor) else Tensor(images)
        mask = np.asarray(mask, bool)
        if ctx is None:
            ctx = ForwardContext(dataset_ids, use_labels=self.training, seed=cfg.seed,
                                 step=self._calls, root=self)
            self._calls += 1
        srcs, masks = self._features(images, mask)
        src, pos, mask_flat, shapes, starts, valid_ratios = self._flatten(srcs, masks)
        pad_mask = mask_flat if mask_flat.any() else None
        memory = self.encoder(src, pos, shapes, starts, pad_mask, valid_ratios, ctx)
        props, usable = encoder_proposals(pad_mask, shapes, valid_ratios)
        ref_logits, interm_logits, interm_boxes = select_queries(
            memory, props, usable, self.enc_output, self.enc_output_norm, self.enc_class_embed,
            self.enc_bbox_embed, cfg.num_queries, mask_unusable=cfg.mask_unusable_queries)
        B = images.shape[0]
        tgt = self.tgt_embed.weight.reshape(1, cfg.num_queries, cfg.d_model).expand(B, cfg.num_queries, cfg.d_model)
        dn = None
        if dn_queries is not None:   # prepared over a larger batch (data parallel: this rank's part)
            dn = dn_queries
        elif self.training and targets is not None and cfg.dn_number > 0:
            dn = prepare_cdn(targets, num_classes=cfg.num_classes, num_queries=cfg.num_queries,
                             rng=ctx.rng("denoising"), dn_number=cfg.dn_number,
                             label_noise_ratio=cfg.dn_label_noise_ratio,
                             box_noise_scale=cfg.dn_box_noise_scale)
        attn_mask = None
        if dn is not None:
            tgt = cat([dn_content(self.label_enc, dn), tgt], 1)
            ref_logits = np.concatenate([dn.box_logits, ref_logits], 1)
            attn_mask = dn.attn_mask
        layers = self.decoder(tgt, ref_logits, memory, shapes, starts, pad_mask, valid_ratios, attn_mask, ctx)
        p = 0 if dn is None else dn.pad_size
        outs = [(lg[:, p:], bx[:, p:]) for lg, bx in layers]
        result = {"pred_logits": outs[-1][0], "pred_boxes": outs[-1][1],
                  "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in outs[:-1]],
                  "interm_outputs": {"pred_logits": interm_logits, "pred_boxes": interm_boxes},
                  "routing": ctx, "dn": dn}
        if dn is not None:
            result["dn_outputs"] = [{"pred_logits": lg[:, :p], "pred_boxes": bx[:, :p]} for lg, bx in layers]
        return result
