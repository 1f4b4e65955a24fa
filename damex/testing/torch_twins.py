"""The damex ops written in PyTorch, for parity tests and benchmarks: one
definition of each, the tests and bench/ import them from here.

torch is imported inside each function: importing this module needs only NumPy.
Every function takes and returns torch tensors (NumPy only for routing
decisions and sizes, which are not differentiated).
"""
import math

import numpy as np


def _torch():
    import torch
    return torch


def _tensor(a, dtype=None):
    """a as a torch tensor (no copy where it already is one)."""
    torch = _torch()
    if not isinstance(a, torch.Tensor):
        a = np.asarray(a)
        a = torch.as_tensor(a if a.flags.writeable else a.copy())
    t = a
    return t if dtype is None else t.to(dtype)


# ---- activations, norms, attention ---------------------------------------------------------

def activation(x, act):
    """act(x) for act in damex.ops.ACTIVATIONS: "gelu_tanh" (tanh form), "gelu"
    (erf form), "relu"."""
    F = _torch().nn.functional
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu}[act](x)


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)) with x clamped to [0, 1] and both sides to >= eps
    (Deformable-DETR's util/misc.py; DINO calls it with eps=1e-3)."""
    torch = _torch()
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def frozen_batch_norm(x, w, b, rm, rv, eps=1e-5):
    """torchvision's FrozenBatchNorm2d: x [N, C, H, W] * scale + shift, with
    scale = w * rsqrt(rv + eps) and shift = b - rm * scale (all [C])."""
    scale = _tensor(w) * (_tensor(rv) + eps).rsqrt()
    shift = _tensor(b) - _tensor(rm) * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def attention(q, k, v, H, attn_mask=None, key_padding_mask=None):
    """Multi-head scaled dot-product attention, eager; True in a mask blocks that
    key (a fully blocked row gives NaN, as torch does).

    Parameters
    ----------
    q : torch.Tensor [N, Lq, C]
    k, v : torch.Tensor [N, Lk, C]
    H : int
        Heads (C % H == 0).
    attn_mask : bool array_like [Lq, Lk] or None
    key_padding_mask : bool array_like [N, Lk] or None

    Returns
    -------
    out : torch.Tensor [N, Lq, C]
    attn : torch.Tensor [N, H, Lq, Lk]
    """
    torch = _torch()
    N, Lq, C = q.shape
    Lk = k.shape[1]
    d = C // H

    def heads(t, L):
        return t.reshape(N, L, H, d).transpose(1, 2)
    s = heads(q, Lq) @ heads(k, Lk).transpose(-1, -2) / d ** 0.5
    if attn_mask is not None:
        s = s.masked_fill(_tensor(attn_mask)[None, None], float("-inf"))
    if key_padding_mask is not None:
        s = s.masked_fill(_tensor(key_padding_mask)[:, None, None, :],
                          float("-inf"))
    p = torch.softmax(s, -1)
    return (p @ heads(v, Lk)).transpose(1, 2).reshape(N, Lq, C), p


def ms_deform_attn(value, shapes, loc, attw):
    """Deformable-DETR's grid_sample formulation of multi-scale deformable
    attention (ms_deform_attn_core_pytorch): bilinear, zero padding,
    align_corners=False.

    Parameters
    ----------
    value : torch.Tensor [N, S, M, D]
    shapes : array_like [L, 2] of (H, W)
    loc : torch.Tensor [N, Lq, M, L, P, 2], (x, y) in [0, 1]
    attw : torch.Tensor [N, Lq, M, L, P]

    Returns
    -------
    torch.Tensor [N, Lq, M*D], contiguous
    """
    torch = _torch()
    F = torch.nn.functional
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    hw = [(int(h), int(w)) for h, w in np.asarray(shapes).tolist()]
    grids = 2 * loc - 1
    sampled = []
    for l, (v, (H, W)) in enumerate(zip(value.split([h * w for h, w in hw], dim=1), hw)):
        v = v.flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        g = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    a = attw.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


# ---- MoE ------------------------------------------------------------------------------

def combine_weights(probs, expert_index, kept, normalize=False):
    """The combine weights of the router: probs[t, expert_index[t, j]], kept slots
    only, optionally renormalised over a token's k choices.

    Parameters
    ----------
    probs : torch.Tensor [T, E]
    expert_index : array_like int [T, k]
    kept : bool array_like [T, k]
    normalize : False or "none", True or "before_drop" (over all k), "after_drop" (over the
        kept ones; a token with none kept stays 0)

    Returns
    -------
    torch.Tensor [T, k]
    """
    torch = _torch()
    pe = probs.gather(1, _tensor(expert_index))
    kept = _tensor(kept, pe.dtype)
    if normalize in (True, "before_drop"):
        return pe / pe.sum(-1, keepdim=True) * kept
    if normalize == "after_drop":
        s = (pe * kept).sum(-1, keepdim=True)
        return torch.where(s > 0, pe * kept / s.clamp_min(1e-30), torch.zeros_like(pe))
    return pe * kept


def expert_ffn(xe, count, w1, b1, w2, b2, act="gelu_tanh"):
    """Per-expert Linear-act-Linear on packed rows (expert 0's count[0] rows
    first, then expert 1's, ...): xe[N, D], count[E] -> ye[N, D]."""
    torch = _torch()
    outs, off = [], 0
    for e, n in enumerate(np.asarray(count).tolist()):
        outs.append(activation(xe[off:off + n] @ w1[e] + b1[e], act) @ w2[e] + b2[e])
        off += n
    return torch.cat(outs)


def moe_experts(x, expert_index, kept, cw, w1, b1, w2, b2, act="gelu_tanh"):
    """y[t] = sum_j cw[t, j] * FFN_{expert_index[t, j]}(x[t]) over the kept (t, j):
    per expert, its rows index_select'ed, addmm-act-addmm, index_add combine.

    Parameters
    ----------
    x : torch.Tensor [T, D]
    expert_index : array_like int [T, k]
    kept : bool array_like [T, k]
    cw : torch.Tensor [T, k]
    w1 : [E, D, F]; b1 : [E, F]; w2 : [E, F, D]; b2 : [E, D]

    Returns
    -------
    y : torch.Tensor [T, D]
    """
    torch = _torch()
    idx, kept = _tensor(expert_index), _tensor(kept)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, j = torch.nonzero((idx == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = activation(torch.addmm(b1[e], x.index_select(0, tok), w1[e]), act)
        ye = torch.addmm(b2[e], h, w2[e])
        y = y.index_add(0, tok, ye * cw[tok, j].unsqueeze(1))
    return y


def moe_layer(x, wr, w1, b1, w2, b2, k=1, capacity_factor=None, bpr=False):
    """The MoE layer of damex.ops.moe_forward in PyTorch eager (GELU tanh form,
    probabilities not renormalised): router matmul, softmax, top-k, capacity
    with optional batch-prioritised routing, then :func:`moe_experts`.

    Parameters
    ----------
    x : torch.Tensor [T, D]
    wr : [D, E]; w1 : [E, D, F]; b1 : [E, F]; w2 : [E, F, D]; b2 : [E, D]
    k : int
    capacity_factor : float or None
    bpr : bool

    Returns
    -------
    y : torch.Tensor [T, D]
    """
    torch = _torch()
    T, D = x.shape
    E = wr.shape[1]
    probs = torch.softmax(x @ wr, dim=1)
    topv, topi = torch.topk(probs, k, dim=1)
    if capacity_factor is None:
        kept = torch.ones_like(topi, dtype=torch.bool)
    else:
        cap = math.ceil(capacity_factor * k * T / E)
        with torch.no_grad():
            order = torch.argsort(-topv[:, 0], stable=True) if bpr else torch.arange(T)
            kept = torch.zeros((T, k), dtype=torch.bool)
            base = torch.zeros(E, dtype=torch.long)
            rows = torch.arange(T)
            for j in range(k):
                e = topi[order, j]
                onehot = torch.nn.functional.one_hot(e, E)
                pos = (onehot.cumsum(0) - 1)[rows, e] + base[e]
                kept[order, j] = pos < cap
                base = torch.clamp(base + onehot.sum(0), max=cap)
    return moe_experts(x, topi, kept, topv * kept, w1, b1, w2, b2)


def moe_layer_on_choices(x, wr, w1, b1, w2, b2, expert_index, noise=None, act="gelu_tanh",
                         normalize=False, kept=None):
    """The MoE layer given its (piecewise-constant) routing decisions: logits
    x @ wr, probabilities of logits + noise, :func:`combine_weights` on
    expert_index and kept, :func:`moe_experts`.

    Parameters
    ----------
    x : torch.Tensor [T, D]; wr : [D, E]; w1, b1, w2, b2 as :func:`moe_experts`
    expert_index : array_like int [T, k]
    noise : array_like [T, E] or None
    act : str
    normalize : see :func:`combine_weights`
    kept : bool array_like [T, k] or [T, 1] (broadcast) or None (all kept)

    Returns
    -------
    y : torch.Tensor [T, D]
    logits, noisy : torch.Tensor [T, E]
    """
    torch = _torch()
    expert_index = np.asarray(expert_index)
    kept = np.ones(expert_index.shape, bool) if kept is None else \
        np.broadcast_to(np.asarray(kept, bool), expert_index.shape)
    logits = x @ wr
    noisy = logits + (_tensor(noise) if noise is not None else 0)
    cw = combine_weights(torch.softmax(noisy, -1), expert_index, kept, normalize)
    return moe_experts(x, expert_index, kept, cw, w1, b1, w2, b2, act), logits, noisy


# ---- routing losses (the signatures of damex.testing.reference) -----------------------

def _masked(g, mask):
    return g if mask is None else g[_tensor(mask, _torch().bool)]


def _cv_squared(S, variance="population"):
    return S.var(unbiased=variance == "unbiased") / S.mean() ** 2


def importance_loss(g, mask=None, noise=None, probs="clean", variance="population"):
    """CV^2 of the per-expert sum of softmax(g) (probs="clean") or of
    softmax(g + noise) ("noisy") over the unmasked tokens; g [T, E]."""
    torch = _torch()
    v = g + _tensor(noise, g.dtype) if probs == "noisy" else g
    return _cv_squared(_masked(torch.softmax(v, 1), mask).sum(0), variance)


def load_loss(g, noise, sigma, k, mask=None, variance="population"):
    """CV^2 of the per-expert load P[t, e] = 1 - Phi((kth(g + noise)[t] - g[t, e]) / sigma)
    over the unmasked tokens (the k-th largest noisy logit held fixed)."""
    torch = _torch()
    gn = g + _tensor(noise, g.dtype)
    thr = torch.topk(gn, k, dim=1).values[:, k - 1:k]
    P = 1 - torch.special.ndtr((thr - g) / sigma)
    return _cv_squared(_masked(P, mask).sum(0), variance)


def switch_loss(g, k=1, mask=None, counts="top1"):
    """E * sum_e f_e * mean_t softmax(g)[t, e]: f the share of the unmasked tokens'
    top-1 (counts="top1") or top-k ("topk") choices sent to e."""
    torch = _torch()
    E = g.shape[1]
    g = _masked(g, mask)
    kk = k if counts == "topk" else 1
    top = g.detach().argmax(1) if kk == 1 else torch.topk(g.detach(), kk, dim=1).indices.reshape(-1)
    f = torch.bincount(top, minlength=E).to(g.dtype) / (kk * g.shape[0])
    return E * (f * torch.softmax(g, 1).mean(0)).sum()


def z_loss(g, mask=None):
    """mean over the unmasked tokens of logsumexp(g[t])^2."""
    torch = _torch()
    return (torch.logsumexp(_masked(g, mask), 1) ** 2).mean()


def damex_loss(g, target, mask=None):
    """Cross entropy of the router logits g [T, E] against the expert target [T]
    (mean over the unmasked tokens)."""
    return _torch().nn.functional.cross_entropy(_masked(g, mask), _masked(_tensor(target), mask))


# ---- boxes and box losses (DETR / DINO util/box_ops.py, torchvision) ------------------

def cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return _torch().stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = b.unbind(-1)
    return _torch().stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_iou(a, b):
    """a[n, 4], b[m, 4] xyxy -> (iou[n, m], union[n, m]); iou = inter / (union + 1e-6)
    (DINO's epsilon)."""
    torch = _torch()
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b - inter
    return inter / (union + 1e-6), union


def generalized_box_iou(a, b):
    """a[n, 4], b[m, 4] xyxy -> giou[n, m] = iou - (hull - union) / (hull + 1e-6)
    (DINO's util/box_ops.py)."""
    torch = _torch()
    iou, union = box_iou(a, b)
    wh = (torch.max(a[:, None, 2:], b[:, 2:]) - torch.min(a[:, None, :2], b[:, :2])).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / (area + 1e-6)


def sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss, reduction="none" (alpha < 0: no weighting)."""
    torch = _torch()
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss
