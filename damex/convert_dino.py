"""Official DINO and DAMEX checkpoints -> damex's DINO (the ``dino`` and
``damex-official`` converters).

IDEA-Research/DINO's ``main.py`` saves ``{"model": state_dict, "optimizer": ...,
"args": Namespace, ...}``; jinga-lala/DAMEX does the same, once per rank
(``checkpoint.pth-rank{r}``), each rank holding its own Tutel experts.  These
functions take the already-read ``state_dict`` (a dict of arrays: reading the
file is :mod:`damex.weights`' job; ``args`` is never read) and return damex's
state dict with the config inferred from the shapes.

Key map (official -> damex), after stripping ``module.``:

==============================================================  ==========================================
``transformer.level_embed``                                      ``level_embed``
``input_proj.N.{0,1}.*``                                         the same
``transformer.encoder.layers.N.{self_attn.*, norm1}``            the same without ``transformer.``
``transformer.encoder.layers.N.{linear1, linear2, norm2}``       ``encoder.layers.N.ffn.{linear1, linear2, norm}``
``transformer.decoder.layers.N.{self_attn, cross_attn, norm1, norm2}.*``   the same without ``transformer.``
  (``self_attn.in_proj_weight [3d, d]`` is damex's MultiheadAttention parameter as is)
``transformer.decoder.layers.N.{linear1, linear2, norm3}``       ``decoder.layers.N.ffn.{linear1, linear2, norm}``
``transformer.decoder.{norm, ref_point_head}.*``                 ``decoder.{norm, ref_point_head}.*``
``class_embed.N.*``, ``transformer.decoder.class_embed.N.*``     ``decoder.class_embed.*`` (one shared head)
``bbox_embed.N.*``, ``transformer.decoder.bbox_embed.N.*``       ``decoder.bbox_embed.*``
``transformer.enc_output``, ``transformer.enc_output_norm``      ``enc_output``, ``enc_output_norm``
``transformer.enc_out_class_embed``, ``.enc_out_bbox_embed``     ``enc_class_embed``, ``enc_bbox_embed``
``transformer.tgt_embed.weight``                                 ``tgt_embed.weight``
``label_enc.weight [dn_labelbook_size + 1, d]``                  ``label_enc.weight [num_classes + 1, d]``
``backbone.0.body.*``                                            ``backbone.*`` (``num_batches_tracked`` dropped)
==============================================================  ==========================================

DAMEX's MoE FFN (decoder layer N, Tutel ``moe_layer`` inside ``MoEMlp``):

==================================================================  ===========================================
``..._moe_layer._moe_layer.gates.0.wg.weight [E, D]``                ``decoder.layers.N.ffn.moe.w_router [D, E]``
``..._moe_layer._moe_layer.experts.batched_fc1_w [E_r, F, D]`` (*)   ``...moe.w1 [E, D, F]`` (ranks concatenated)
``..._moe_layer._moe_layer.experts.batched_fc1_bias [E_r, F]``       ``...moe.b1 [E, F]``
``..._moe_layer._moe_layer.experts.batched_fc2_w [E_r, F, D]``       ``...moe.w2 [E, F, D]``
``..._moe_layer._moe_layer.experts.batched_fc2_bias [E_r, D]``       ``...moe.b2 [E, D]``
``decoder.layers.N.norm3`` (pre-norm of the MoE block)                ``decoder.layers.N.ffn.norm``
==================================================================  ===========================================

(*) Tutel's ``ffn`` experts store ``batched_fc1_w`` as ``[E_r, F, D]`` (the version DAMEX
uses: each expert's ``fc1.weight``) or, in other versions, ``[E_r, D, F]``
(``fc1.weight.t()``); ``batched_fc2_w`` is ``[E_r, F, D]`` in both.  The layout is read
from the shapes; when ``F == D`` it is ambiguous and DAMEX's ``[E_r, F, D]`` is assumed.

Not recoverable from shapes: the number of attention heads (``n_heads``,
default 8 as both references; ``n_points`` follows from it).  Not supported
(a clear error): unshared decoder heads (``dec_pred_*_embed_share=False``).
"""
import re

import numpy as np

_TRANSFORMER_SAME = ("self_attn.", "cross_attn.", "norm1.", "norm2.")


def official_state_dict(obj):
    """The model's state dict from what ``damex.weights.read`` / ``torch.load`` returned:
    ``obj["model"]`` when present (``args`` and the optimizer are ignored), with
    ``module.`` prefixes stripped and values as float32/int NumPy arrays."""
    sd = obj["model"] if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) else obj
    if not isinstance(sd, dict):
        raise ValueError(f"official checkpoint: expected a dict of arrays or {{'model': ...}}, "
                         f"got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
    return out


def _layer_ids(sd, prefix):
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _shared_head(sd, names, out_prefix, out):
    """Map a head shared across decoder layers, listed under ``names`` prefixes (each
    followed by ``N.``); every copy must hold the same values."""
    ref = {}
    for k, v in sd.items():
        for name in names:
            if k.startswith(name):
                m = re.match(r"(\d+)\.(.*)", k[len(name):])
                if not m:
                    continue
                sub = m.group(2)
                if sub in ref and not np.array_equal(ref[sub][1], v):
                    raise ValueError(f"official checkpoint: {k} differs from {ref[sub][0]}: unshared "
                                     f"decoder heads (dec_pred_*_embed_share=False) are not supported")
                ref.setdefault(sub, (k, v))
    for sub, (_, v) in ref.items():
        out[out_prefix + sub] = v
    return ref


def _convert_common(sd, n_heads, moe_layers=()):
    """Everything but the MoE experts: (damex state dict, config fields, keys used)."""
    out, used = {}, set()

    def put(src, dst, value=None):
        out[dst] = sd[src] if value is None else value
        used.add(src)

    for k in sd:
        if k.startswith("transformer.encoder.layers."):
            i, rest = k[len("transformer.encoder.layers."):].split(".", 1)
            if rest.startswith(("self_attn.", "norm1.")):
                put(k, f"encoder.layers.{i}.{rest}")
            elif rest.startswith(("linear1.", "linear2.")):
                put(k, f"encoder.layers.{i}.ffn.{rest}")
            elif rest.startswith("norm2."):
                put(k, f"encoder.layers.{i}.ffn.norm.{rest[len('norm2.'):]}")
        elif k.startswith("transformer.decoder.layers."):
            i, rest = k[len("transformer.decoder.layers."):].split(".", 1)
            if rest.startswith(_TRANSFORMER_SAME):
                put(k, f"decoder.layers.{i}.{rest}")
            elif rest.startswith(("linear1.", "linear2.")):
                put(k, f"decoder.layers.{i}.ffn.{rest}")
            elif rest.startswith("norm3."):
                put(k, f"decoder.layers.{i}.ffn.norm.{rest[len('norm3.'):]}")
        elif k.startswith(("transformer.decoder.norm.", "transformer.decoder.ref_point_head.")):
            put(k, k[len("transformer."):])
        elif k == "transformer.level_embed":
            put(k, "level_embed")
        elif k.startswith("input_proj."):
            put(k, k)
        elif k.startswith(("transformer.enc_output.", "transformer.enc_output_norm.")):
            put(k, k[len("transformer."):])
        elif k.startswith("transformer.enc_out_class_embed."):
            put(k, "enc_class_embed." + k[len("transformer.enc_out_class_embed."):])
        elif k.startswith("transformer.enc_out_bbox_embed."):
            put(k, "enc_bbox_embed." + k[len("transformer.enc_out_bbox_embed."):])
        elif k == "transformer.tgt_embed.weight":
            put(k, "tgt_embed.weight")
        elif k.startswith("backbone.0.body."):
            if not k.endswith("num_batches_tracked"):
                put(k, "backbone." + k[len("backbone.0.body."):])
            used.add(k)
    for names, dst in ((("class_embed.", "transformer.decoder.class_embed."), "decoder.class_embed."),
                       (("bbox_embed.", "transformer.decoder.bbox_embed."), "decoder.bbox_embed.")):
        _shared_head(sd, names, dst, out)
        used.update(k for k in sd if k.startswith(names))

    if "transformer.level_embed" not in sd or "transformer.tgt_embed.weight" not in sd:
        raise ValueError("official checkpoint: no transformer.level_embed / transformer.tgt_embed.weight; "
                         "is this a two-stage DINO checkpoint?")
    L, d = sd["transformer.level_embed"].shape
    C = out["decoder.class_embed.weight"].shape[0]
    enc = _layer_ids(sd, "transformer.encoder.layers.")
    dec = _layer_ids(sd, "transformer.decoder.layers.")
    aw = sd["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]
    if aw % (n_heads * L):
        raise ValueError(f"official checkpoint: attention_weights has {aw} rows, not a multiple of "
                         f"n_heads * levels = {n_heads} * {L}; pass the right n_heads")
    dense = [i for i in dec if i not in moe_layers]
    ffn_key = (f"transformer.encoder.layers.{enc[0]}.linear1.weight" if enc
               else f"transformer.decoder.layers.{dense[0]}.linear1.weight")
    label = sd["label_enc.weight"]
    if label.shape[0] < C + 1:
        raise ValueError(f"official checkpoint: label_enc has {label.shape[0]} rows, fewer than "
                         f"num_classes + 1 = {C + 1}")
    put("label_enc.weight", "label_enc.weight", label[:C + 1])   # rows > num_classes are never used
    cfg = dict(num_classes=int(C), d_model=int(d), d_ffn=int(sd[ffn_key].shape[0]), n_heads=int(n_heads),
               n_points=int(aw // (n_heads * L)), enc_layers=len(enc), dec_layers=len(dec),
               num_queries=int(sd["transformer.tgt_embed.weight"].shape[0]), num_feature_levels=int(L))
    cfg.update(_backbone_config(sd))
    return out, cfg, used


def _backbone_config(sd):
    """The backbone fields of the config: from ``backbone.0.body`` keys when present, else
    guessed from the widths of ``input_proj`` (ResNet-50 at 512/1024/2048)."""
    depths = [len(_layer_ids(sd, f"backbone.0.body.layer{s}.")) for s in (1, 2, 3, 4)]
    chans = []
    i = 0
    while f"input_proj.{i}.0.weight" in sd:
        w = sd[f"input_proj.{i}.0.weight"]
        if w.shape[2:] == (1, 1):
            chans.append(int(w.shape[1]))
        i += 1
    if all(depths):
        bottleneck = "backbone.0.body.layer1.0.conv3.weight" in sd
        widths = tuple(int(sd[f"backbone.0.body.layer{s}.0.conv1.weight"].shape[0]) for s in (1, 2, 3, 4))
        return dict(backbone_depths=tuple(depths), backbone_widths=widths,
                    backbone_block="bottleneck" if bottleneck else "basic", backbone_norm="frozen_bn",
                    stem_width=int(sd["backbone.0.body.conv1.weight"].shape[0]))
    if chans == [512, 1024, 2048]:
        return dict(backbone_depths=(3, 4, 6, 3), backbone_widths=(64, 128, 256, 512),
                    backbone_block="bottleneck", backbone_norm="frozen_bn", stem_width=64)
    if len(chans) == 3:
        return dict(backbone_widths=(chans[0] // 2, chans[0], chans[1], chans[2]), backbone_block="basic")
    return {}


def _check_unused(sd, used, ignore=()):
    left = [k for k in sd if k not in used and not any(k.startswith(p) or k.endswith(p) for p in ignore)]
    if left:
        raise ValueError(f"official checkpoint: {len(left)} keys have no place in damex's DINO, "
                         f"e.g. {left[:5]}")


def convert_dino_state_dict(sd, *, n_heads=8):
    """An IDEA-Research/DINO (two-stage, 4-scale) state dict -> damex.

    Parameters
    ----------
    sd : dict of str -> ndarray (or a ``{"model": ...}`` checkpoint)
    n_heads : int
        Attention heads (not recoverable from shapes; DINO_4scale: 8).

    Returns
    -------
    (state_dict, config) : damex DINO state dict, and the DINOConfig fields it implies
        (``routing="dense"``; DINO_4scale's ``dn_box_noise_scale`` 0.4).
    """
    sd = official_state_dict(sd)
    out, cfg, used = _convert_common(sd, n_heads)
    _check_unused(sd, used)
    cfg.update(routing="dense", dn_box_noise_scale=0.4)
    return out, cfg


_MOE = "._moe_layer._moe_layer."


def convert_damex_state_dicts(sds, *, n_heads=8):
    """jinga-lala/DAMEX state dicts, one per rank (rank order), -> damex.

    Every rank holds the same dense weights and router; rank r's Tutel experts are
    global experts ``r * E_r ... (r + 1) * E_r - 1``.  A single dict is one rank.

    Returns
    -------
    (state_dict, config) : with the MoE layers at the decoder layers that hold a
        ``_moe_layer``, ``num_experts``, ``moe_hidden``, ``moe_activation="gelu"``
        (DAMEX's F.gelu), ``dn_box_noise_scale`` 1.0 (DAMEX_4scale).
    """
    if isinstance(sds, dict):
        sds = [sds]
    sds = [official_state_dict(s) for s in sds]
    sd = sds[0]
    moe_layers = sorted({int(m.group(1)) for k in sd
                         for m in [re.match(r"transformer\.decoder\.layers\.(\d+)\._moe_layer\.", k)] if m})
    if not moe_layers:
        raise ValueError("DAMEX checkpoint: no decoder layer has a _moe_layer (is it a plain DINO "
                         "checkpoint? use the 'dino' converter)")
    out, cfg, used = _convert_common(sd, n_heads, moe_layers)
    E = F = None
    for i in moe_layers:
        base = f"transformer.decoder.layers.{i}{_MOE}"
        wg = sd[base + "gates.0.wg.weight"]                  # [E, D]
        parts = {n: [s[base + "experts." + n] for s in sds]
                 for n in ("batched_fc1_w", "batched_fc1_bias", "batched_fc2_w", "batched_fc2_bias")}
        fc2 = np.concatenate(parts["batched_fc2_w"], 0)      # [E, F, D]
        E, F, D = fc2.shape
        fc1 = np.concatenate(parts["batched_fc1_w"], 0)
        if fc1.shape == (E, F, D):                           # DAMEX's Tutel: fc1.weight per expert
            fc1 = fc1.transpose(0, 2, 1)
        elif fc1.shape != (E, D, F):
            raise ValueError(f"DAMEX checkpoint: layer {i} batched_fc1_w has shape {fc1.shape}, "
                             f"expected {(E, F, D)} or {(E, D, F)} from batched_fc2_w {fc2.shape}")
        if wg.shape[0] != E:
            raise ValueError(f"DAMEX checkpoint: layer {i} routes to {wg.shape[0]} experts but the "
                             f"{len(sds)} rank file(s) hold {E}; pass every rank's file in rank order")
        g = base + "_num_global_experts"
        if g in sd and int(np.asarray(sd[g])) != E:
            raise ValueError(f"DAMEX checkpoint: {g} = {int(np.asarray(sd[g]))} but {E} experts were given")
        dst = f"decoder.layers.{i}.ffn.moe."
        out[dst + "w_router"] = np.ascontiguousarray(wg.T)
        out[dst + "w1"] = np.ascontiguousarray(fc1)
        out[dst + "b1"] = np.concatenate(parts["batched_fc1_bias"], 0).reshape(E, F)
        out[dst + "w2"] = fc2
        out[dst + "b2"] = np.concatenate(parts["batched_fc2_bias"], 0).reshape(E, -1)
        used.update(k for k in sd if k.startswith(f"transformer.decoder.layers.{i}._moe_layer."))
    _check_unused(sd, used)
    cfg.update(routing="damex", moe_decoder_layers=tuple(moe_layers), num_experts=int(E),
               moe_hidden=int(F), moe_k=1, moe_activation="gelu", dn_box_noise_scale=1.0)
    return out, cfg


__all__ = ["official_state_dict", "convert_dino_state_dict", "convert_damex_state_dicts"]
