"""Slow but obvious float64 NumPy references, one per ``damex.ops`` family.

Every function takes array-likes, computes in float64 and returns float64
arrays (or Python floats for scalar losses).  They follow docs/ops.md and
SPEC.md word by word and are what the tests compare the C kernels with.
"""
import math
from types import SimpleNamespace

import numpy as np

_ERF = np.vectorize(math.erf, otypes=[np.float64])
_ERFC = np.vectorize(math.erfc, otypes=[np.float64])


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# ---- finite differences ------------------------------------------------------

def finite_difference(f, x, eps=1e-6):
    """Central differences of the scalar float64 function f at x.

    Parameters
    ----------
    f : callable
        ``f(x) -> float`` on an array of x's shape.
    x : array_like, any shape
    eps : float

    Returns
    -------
    g : ndarray, float64, x's shape
        ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for every element i.
    """
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g


# ---- activations, softmax --------------------------------------------------------

def activation(x, act):
    """GELU (tanh form ``gelu_tanh`` or exact ``gelu``) or ReLU, elementwise.
    ReLU keeps NaN (as torch does)."""
    x = np.asarray(x, np.float64)
    if act == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if act == "gelu":
        return 0.5 * x * (1 + _ERF(x / math.sqrt(2)))
    if act == "relu":
        return np.maximum(x, 0)  # NaN stays NaN
    raise ValueError(f"unknown activation {act!r}")


def sigmoid(x):
    x = np.asarray(x, np.float64)
    return 1 / (1 + np.exp(-x))


def inverse_sigmoid(x, eps=1e-5):
    v = np.clip(np.asarray(x, np.float64), 0, 1)
    return np.log(np.maximum(v, eps) / np.maximum(1 - v, eps))


def softmax(x, axis=-1):
    """Softmax along `axis`, shifted by the max."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def logsumexp(g, axis=-1):
    g = np.asarray(g, np.float64)
    mx = g.max(axis=axis, keepdims=True)
    return (mx + np.log(np.exp(g - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


# ---- linear, norms, conv -------------------------------------------------------------

def linear(x, w, b=None):
    """x[..., Cin] @ w[Cout, Cin].T + b[Cout]."""
    x, w = _f64(x, w)
    y = x @ w.T
    return y if b is None else y + np.asarray(b, np.float64)


def layer_norm(x, g, b, eps=1e-5):
    """Normalise the last axis (population variance), then scale g and shift b."""
    x, g, b = _f64(x, g, b)
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


def group_norm(x, g, b, groups, eps=1e-5):
    """x[N, C, H, W]: normalise each of `groups` channel groups over (C/groups, H, W)."""
    x, g, b = _f64(x, g, b)
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    m = xg.mean(-1, keepdims=True)
    v = ((xg - m) ** 2).mean(-1, keepdims=True)
    y = ((xg - m) / np.sqrt(v + eps)).reshape(x.shape)
    return y * g[None, :, None, None] + b[None, :, None, None]


def frozen_batch_norm(x, w, b, rm, rv, eps=1e-5):
    x, w, b, rm, rv = _f64(x, w, b, rm, rv)
    scale = w / np.sqrt(rv + eps)
    return x * scale[None, :, None, None] + (b - rm * scale)[None, :, None, None]


def conv2d(x, w, b=None, stride=(1, 1), padding=(0, 0)):
    """Direct 2-D cross-correlation, NCHW, any stride and padding.

    ``y[n,o,i,j] = b[o] + sum_{c,u,v} w[o,c,u,v] x[n, c, i*sh - ph + u, j*sw - pw + v]``
    with x zero outside the image: every input index is computed and bounds
    checked here, no padded copy (so strides larger than the padded image are
    handled like any other).  x[N, Cin, H, W], w[Cout, Cin, KH, KW] -> y[N, Cout, HO, WO].
    """
    x, w = _f64(x, w)
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    ph, pw = (padding, padding) if np.isscalar(padding) else padding
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = max((h + 2 * ph - kh) // sh + 1, 0)
    wo = max((wd + 2 * pw - kw) // sw + 1, 0)
    y = np.zeros((n, o, ho, wo))
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    for u in range(kh):
        rows = np.arange(ho) * sh - ph + u
        rok = (rows >= 0) & (rows < h)
        for v in range(kw):
            cols = np.arange(wo) * sw - pw + v
            cok = (cols >= 0) & (cols < wd)
            if not rok.any() or not cok.any():
                continue
            patch = x[:, :, np.clip(rows, 0, h - 1)][:, :, :, np.clip(cols, 0, wd - 1)]
            patch = patch * (rok[:, None] & cok[None, :])
            y += np.einsum("oc,nchw->nohw", w[:, :, u, v], patch)
    return y


# ---- attention ----------------------------------------------------------------------

def attention(q, k, v, H, attn_mask=None, key_padding_mask=None):
    """Multi-head scaled dot-product attention; True in a mask blocks that key.
    Fully blocked rows give zeros.  q[N, Lq, C], k, v[N, Lk, C] -> (out[N, Lq, C],
    attn[N, H, Lq, Lk])."""
    q, k, v = _f64(q, k, v)
    N, Lq, C = q.shape
    Lk, d = k.shape[1], C // H
    qh = q.reshape(N, Lq, H, d).transpose(0, 2, 1, 3)
    kh = k.reshape(N, Lk, H, d).transpose(0, 2, 1, 3)
    vh = v.reshape(N, Lk, H, d).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    blocked = np.zeros((N, 1, Lq, Lk), bool)
    if attn_mask is not None:
        blocked |= np.asarray(attn_mask, bool)[None, None]
    if key_padding_mask is not None:
        blocked |= np.asarray(key_padding_mask, bool)[:, None, None, :]
    s = np.where(blocked, -np.inf, s)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(blocked, 0.0, np.exp(s - m))
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    out = (p @ vh).transpose(0, 2, 1, 3).reshape(N, Lq, C)
    return out, p


# ---- multi-scale deformable attention ----------------------------------------------

def ms_deform_attn(value, shapes, loc, attw):
    """Bilinear sampling with zero padding (grid_sample, align_corners=False).

    value[N, S, M, D], shapes[L, 2] (H, W), loc[N, Lq, M, L, P, 2] (x, y in [0, 1]),
    attw[N, Lq, M, L, P] -> out[N, Lq, M*D]."""
    value, loc, attw = _f64(value, loc, attw)
    N, S, M, D = value.shape
    Lq = loc.shape[1]
    out = np.zeros((N, Lq, M, D))
    n_i = np.arange(N)[:, None, None, None]
    m_i = np.arange(M)[None, None, :, None]
    start = 0
    for l, (H, W) in enumerate(np.asarray(shapes).tolist()):
        v = value[:, start:start + H * W]
        x = loc[:, :, :, l, :, 0] * W - 0.5
        y = loc[:, :, :, l, :, 1] * H - 0.5
        with np.errstate(invalid="ignore"):
            x0, y0 = np.floor(x), np.floor(y)
        fx, fy = x - x0, y - y0
        for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                          (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            with np.errstate(invalid="ignore"):
                ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            idx = np.where(ok, yi * W + xi, 0).astype(np.int64)
            wt = np.where(ok, w * attw[:, :, :, l], 0.0)
            out += (wt[..., None] * v[n_i, idx, m_i]).sum(3)
        start += H * W
    return out.reshape(N, Lq, M * D)


# ---- router: top-k, capacity, BPR, combine weights --------------------------------

NORM_NAME = {False: "none", None: "none", "none": "none", True: "before_drop",
             "before_drop": "before_drop", "after_drop": "after_drop"}


def route_decisions(probs, k, capacity_factor=None, bpr=False, mask=None, bpr_probs=None):
    """Top-k choices and capacity slots (SPEC section 2).

    probs[T, E]: descending probability, ties to the lower index; capacity
    ``ceil(cf k T_valid / E)``; slots handed out choice rank by choice rank, in
    token order or (BPR) by descending top-1 probability (of `bpr_probs` if
    given); masked tokens get no slot.

    Returns
    -------
    SimpleNamespace with expert_index[T, k], slot[T, k] (-1 dropped),
    expert_count[E], offset[E], capacity (-1 for none), all int64.
    """
    probs = np.asarray(probs, np.float64)
    T, E = probs.shape
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int64)
    valid = np.ones(T, bool) if mask is None else np.asarray(mask, bool)
    t_valid = int(valid.sum())
    cap = -1 if capacity_factor is None else math.ceil(capacity_factor * k * t_valid / E)
    order = [t for t in range(T) if valid[t]]
    if bpr:
        key = probs if bpr_probs is None else np.asarray(bpr_probs, np.float64)
        order = sorted(order, key=lambda t: -key[t, idx[t, 0]])  # sorted() is stable
    slot = np.full((T, k), -1, np.int64)
    count = np.zeros(E, np.int64)
    for r in range(k):
        for t in order:
            e = idx[t, r]
            if cap < 0 or count[e] < cap:
                slot[t, r] = count[e]
                count[e] += 1
    offset = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return SimpleNamespace(expert_index=idx, slot=slot, expert_count=count, offset=offset,
                           capacity=cap)


def combine_weights(noisy, idx, kept, normalize=False):
    """combine_weight[T, k] as a function of the (noisy) logits, decisions fixed."""
    normalize = NORM_NAME[normalize]
    pe = np.take_along_axis(softmax(noisy, axis=1), np.asarray(idx), axis=1)
    keptf = np.asarray(kept).astype(np.float64)
    if normalize == "none":
        return pe * keptf
    if normalize == "before_drop":
        return pe / pe.sum(axis=1, keepdims=True) * keptf
    s = (pe * keptf).sum(axis=1, keepdims=True)
    return np.where(s > 0, pe * keptf / np.where(s > 0, s, 1.0), 0.0)


def router(x, w, k=1, noise=None, capacity_factor=None, bpr=False, normalize=False,
           mask=None, bpr_probs=None):
    """A plain, slow float64 router following SPEC section 2 word by word.

    x[T, D], w[D, E], noise[T, E] or None -> dict of every RouterResult field.
    bpr_probs: probs to order BPR by (default the float64 ones).  With thousands
    of tokens some top-1 probs differ by one float32 ulp and the float32 kernel
    may order them the other way; passing its probs checks the rest exactly."""
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    noisy = logits if noise is None else logits + np.asarray(noise, np.float64)
    probs = softmax(noisy, axis=1)
    r = route_decisions(probs, k, capacity_factor, bpr, mask, bpr_probs)
    cw = combine_weights(noisy, r.expert_index, r.slot >= 0, normalize)
    return dict(logits=logits, noisy_logits=noisy, probs=probs, expert_index=r.expert_index,
                combine_weight=cw, slot=r.slot, expert_count=r.expert_count, offset=r.offset,
                capacity=r.capacity)


# ---- MoE: dispatch, expert FFN, combine, layer -------------------------------------

def packed_rows(route):
    """Packed row of each choice [T, k], -1 where dropped."""
    count = np.asarray(route.expert_count)
    offset = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    slot = np.asarray(route.slot)
    return np.where(slot >= 0, offset[np.asarray(route.expert_index)] + slot, -1)


def moe_dispatch(x, route):
    """x[T, D] -> xe[sum(expert_count), D], token rows packed by expert."""
    x = np.asarray(x, np.float64)
    rows = packed_rows(route)
    xe = np.zeros((int(np.sum(route.expert_count)), x.shape[1]))
    for (t, j), r in np.ndenumerate(rows):
        if r >= 0:
            xe[r] = x[t]
    return xe


def expert_ffn(xe, count, w1, b1, w2, b2, act):
    """Per expert e, its rows: act(xe @ w1[e] + b1[e]) @ w2[e] + b2[e].
    w1[E, D, F], b1[E, F], w2[E, F, D], b2[E, D]."""
    xe, w1, b1, w2, b2 = _f64(xe, w1, b1, w2, b2)
    ye = np.zeros((xe.shape[0], w2.shape[2]))
    off = 0
    for e, n in enumerate(count):
        xr = xe[off:off + n]
        ye[off:off + n] = activation(xr @ w1[e] + b1[e], act) @ w2[e] + b2[e]
        off += n
    return ye


def moe_combine(ye, cw, route):
    """y[t] = sum_j cw[t, j] ye[row(t, j)] over kept choices."""
    ye, cw = _f64(ye, cw)
    rows = packed_rows(route)
    y = np.zeros((rows.shape[0], ye.shape[1]))
    for (t, j), r in np.ndenumerate(rows):
        if r >= 0:
            y[t] += cw[t, j] * ye[r]
    return y


def moe_route(logits, k, capacity_factor=None, bpr=False, mask=None):
    """The routing decisions of docs/ops.md from (noisy) logits."""
    return route_decisions(softmax(logits, axis=1), k, capacity_factor, bpr, mask)


def moe_gates(logits, noise, route, normalize=False):
    """Combine weights as a function of the clean logits, routing decisions held fixed."""
    return combine_weights(np.asarray(logits, np.float64) + noise, route.expert_index,
                           np.asarray(route.slot) >= 0, normalize)


def moe_layer(x, wr, w1, b1, w2, b2, route, act, noise, normalize=False):
    """The whole layer on fixed routing decisions: x[T, D] -> y[T, D]."""
    x = np.asarray(x, np.float64)
    cw = moe_gates(x @ np.asarray(wr, np.float64), noise, route, normalize)
    ye = expert_ffn(moe_dispatch(x, route), route.expert_count, w1, b1, w2, b2, act)
    return moe_combine(ye, cw, route)


# ---- routing losses ------------------------------------------------------------------

def _mask(mask, T):
    return np.ones(T, bool) if mask is None else np.asarray(mask, bool)


def cv_squared(S, variance="population"):
    """Squared coefficient of variation of S[E] (0 when its mean is <= 0)."""
    if S.mean() <= 0:
        return 0.0
    return S.var(ddof=1 if variance == "unbiased" else 0) / S.mean() ** 2


def importance_loss(g, mask=None, noise=None, probs="clean", variance="population"):
    g = np.asarray(g, np.float64)
    v = g + np.asarray(noise, np.float64) if probs == "noisy" else g
    m = _mask(mask, len(g))
    if not m.any():
        return 0.0
    return cv_squared(softmax(v, axis=1)[m].sum(0), variance)


def kth_index(gn, k):
    """Index of the k-th largest per row, ties to the lower index."""
    return np.argsort(-gn, axis=1, kind="stable")[:, k - 1]


def load_loss(g, noise, sigma, k, mask=None, variance="population"):
    g = np.asarray(g, np.float64)
    gn = g + np.asarray(noise, np.float64)
    m = _mask(mask, len(g))
    if not m.any():
        return 0.0
    eta = gn[np.arange(len(g)), kth_index(gn, k)]
    P = 0.5 * _ERFC((eta[:, None] - g) / sigma / math.sqrt(2))
    return cv_squared(P[m].sum(0), variance)


def load_loss_grad(g, noise, sigma, k, mask=None, variance="population"):
    """The analytic gradient of load_loss with j from the tie rule (valid at ties too)."""
    g = np.asarray(g, np.float64)
    gn = g + np.asarray(noise, np.float64)
    T, E = g.shape
    m = _mask(mask, T)
    j = kth_index(gn, k)
    z = (gn[np.arange(T), j][:, None] - g) / sigma
    L = (0.5 * _ERFC(z / math.sqrt(2)))[m].sum(0)
    mu, Ed = L.mean(), E - (variance == "unbiased")
    a = 2 * (L - mu) / (Ed * mu ** 2) - 2 * L.var(ddof=E - Ed) / (E * mu ** 3)
    c = a * np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi) / sigma
    d = c.copy()
    d[np.arange(T), j] -= c.sum(1)
    d[~m] = 0
    return d


def switch_loss(g, k=1, mask=None, counts="top1"):
    g = np.asarray(g, np.float64)
    T, E = g.shape
    m = _mask(mask, T)
    if not m.any():
        return 0.0
    order = np.argsort(-g, axis=1, kind="stable")
    kk = k if counts == "topk" else 1
    f = np.zeros(E)
    for row in order[m]:
        f[row[:kk]] += 1
    f /= kk * m.sum()
    return E * (f * softmax(g, axis=1)[m].mean(0)).sum()


def z_loss(g, mask=None):
    g = np.asarray(g, np.float64)
    m = _mask(mask, len(g))
    return float((logsumexp(g, axis=1)[m] ** 2).mean()) if m.any() else 0.0


def damex_loss(g, target, mask=None):
    g = np.asarray(g, np.float64)
    m = _mask(mask, len(g))
    if not m.any():
        return 0.0
    logq = g - logsumexp(g, axis=1)[:, None]
    return float(-logq[np.arange(len(g)), target][m].mean())


# ---- boxes, focal, L1 --------------------------------------------------------------

def cxcywh_to_xyxy(b):
    cx, cy, w, h = np.moveaxis(np.asarray(b, np.float64), -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = np.moveaxis(np.asarray(b, np.float64), -1, 0)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_iou(a, b):
    """a[n, 4], b[m, 4] xyxy -> (iou[n, m], union[n, m]); ``iou = inter / (union + 1e-6)``
    (DINO's epsilon)."""
    a, b = _f64(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / (union + 1e-6)                     # DINO's epsilon
    return iou, union


def generalized_box_iou(a, b):
    """a[n, 4], b[m, 4] xyxy -> giou[n, m]; ``iou - (hull - union) / (hull + 1e-6)``
    (DINO's epsilon)."""
    a, b = _f64(a, b)
    iou, union = box_iou(a, b)
    lt = np.minimum(a[:, None, :2], b[None, :, :2])
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    area = wh[..., 0] * wh[..., 1]
    pen = (area - union) / (area + 1e-6)
    return iou - pen


def sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0):
    """Elementwise sigmoid focal loss (no reduction), stable in |x|."""
    x, t = _f64(x, t)
    p = 1 / (1 + np.exp(-x))
    q = 1 / (1 + np.exp(x))
    ce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    m = p * (1 - t) + q * t
    w = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return w * ce * m ** gamma


def l1(a, b):
    """Elementwise |a - b|."""
    a, b = _f64(a, b)
    return np.abs(a - b)


# ---- optimiser ------------------------------------------------------------------------

def adamw(p, g, m, v, step, lr, beta1, beta2, eps, wd):
    """The documented AdamW update in float64; returns new (p, m, v)."""
    p, g, m, v = _f64(p, g, m, v)
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - beta2 ** step) + eps
    return p - lr / (1 - beta1 ** step) * m / denom, m, v
