"""The damex ops written in PyTorch, for parity tests and benchmarks.

torch is imported inside each function: importing this module needs only NumPy.
"""
import math

import numpy as np


def _torch():
    import torch
    return torch


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


def _act(act):
    F = _torch().nn.functional
    return {"gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "gelu": F.gelu,
            "relu": F.relu}[act]


def moe_layer(x, wr, w1, b1, w2, b2, k=1, capacity_factor=None, bpr=False):
    """The MoE layer of damex.ops.moe_forward in PyTorch eager (GELU tanh form,
    probabilities not renormalised): router matmul, softmax, top-k, capacity
    with optional batch-prioritised routing, per-expert Linear-GELU-Linear
    (addmm) on index_select'ed rows, index_add combine.

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
    w = topv * kept
    y = torch.zeros_like(x)
    for e in range(E):
        tok, j = torch.nonzero((topi == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = torch.nn.functional.gelu(torch.addmm(b1[e], x.index_select(0, tok), w1[e]),
                                     approximate="tanh")
        ye = torch.addmm(b2[e], h, w2[e])
        y = y.index_add(0, tok, ye * w[tok, j].unsqueeze(1))
    return y


def moe_layer_on_choices(x, wr, w1, b1, w2, b2, expert_index, noise=None, act="gelu_tanh",
                         normalize=False):
    """The dropless MoE layer given the (piecewise-constant) expert choices
    expert_index[T, k] (NumPy int).  Returns (y[T, D], clean logits, noisy logits)."""
    torch = _torch()
    logits = x @ wr
    noisy = logits + (torch.tensor(noise) if noise is not None else 0)
    probs = torch.softmax(noisy, -1)
    idx = torch.tensor(expert_index)
    cw = probs.gather(1, idx)
    if normalize:
        cw = cw / cw.sum(1, keepdim=True)
    a = _act(act)
    y = torch.zeros_like(x)
    for j in range(idx.shape[1]):
        e = idx[:, j]
        h = a(torch.einsum("td,tdf->tf", x, w1[e]) + b1[e])
        y = y + cw[:, j:j + 1] * (torch.einsum("tf,tfd->td", h, w2[e]) + b2[e])
    return y, logits, noisy
