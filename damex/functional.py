"""Differentiable heavy ops, like ``torch.nn.functional``.

Each function wraps one ``damex.ops`` forward/backward pair as one tape node:
the forward runs the C kernel on ``.data``, the node keeps what the backward
kernel needs, and the backward hands the kernel's gradients to the inputs.
Arguments that are not Tensors (index arrays, masks, shapes) are plain NumPy.

>>> import damex.functional as F
>>> y = F.linear(x, w, b)            # x[..., Din], w[Dout, Din], b[Dout]
"""
import numpy as np

from . import ops as _ops
from .autograd import Tensor, as_tensor, record, transpose

__all__ = ["linear", "layer_norm", "group_norm", "frozen_batch_norm", "conv2d", "max_pool2d", "relu",
           "gelu",
           "activation", "sigmoid", "inverse_sigmoid", "softmax", "dropout", "embedding",
           "attention", "ms_deform_attn", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh",
           "generalized_box_iou", "generalized_box_iou_paired", "sigmoid_focal_loss", "l1_loss",
           "moe", "routing_loss", "manual_seed", "ROUTING_LOSSES"]


def _data(t):
    return None if t is None else (t.data if isinstance(t, Tensor) else np.asarray(t, np.float32))


def _tensor_or_none(t):
    return t if isinstance(t, Tensor) else None


# ---------------------------------------------------------------- dense layers

def linear(x, weight, bias=None):
    """``y = x @ weight.T + bias``; x[..., Din], weight[Dout, Din], bias[Dout] or None."""
    x, weight = as_tensor(x), as_tensor(weight)
    xd, wd = x.data, weight.data
    y = _ops.linear_forward(xd, wd, _data(bias))

    def backward(gs):
        dx, dw, db = _ops.linear_backward(gs[0], xd, wd, has_bias=bias is not None)
        return dx, dw, db
    return record(y, [x, weight, _tensor_or_none(bias)], backward, "linear")


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm over the last axis (``normalized_shape`` must be ``(C,)``)."""
    x = as_tensor(x)
    C = x.shape[-1]
    ns = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if ns != (C,):
        raise ValueError(f"layer_norm: normalized_shape must be the last axis ({C},), got {ns}")
    g = _data(weight) if weight is not None else np.ones(C, np.float32)
    b = _data(bias) if bias is not None else np.zeros(C, np.float32)
    xd = x.data
    y, mu, rstd = _ops.layer_norm_forward(xd, g, b, eps=eps)

    def backward(gs):
        return _ops.layer_norm_backward(gs[0], xd, mu, rstd, g)
    return record(y, [x, _tensor_or_none(weight), _tensor_or_none(bias)], backward, "layer_norm")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm of x[N, C, H, W] with ``num_groups`` groups."""
    x = as_tensor(x)
    C = x.shape[1]
    g = _data(weight) if weight is not None else np.ones(C, np.float32)
    b = _data(bias) if bias is not None else np.zeros(C, np.float32)
    xd = x.data
    y, mu, rstd = _ops.group_norm_forward(xd, g, b, num_groups, eps=eps)

    def backward(gs):
        return _ops.group_norm_backward(gs[0], xd, mu, rstd, g, num_groups)
    return record(y, [x, _tensor_or_none(weight), _tensor_or_none(bias)], backward, "group_norm")


def frozen_batch_norm(x, weight, bias, running_mean, running_var, eps=1e-5):
    """Batch norm with frozen statistics and affine parameters (DETR's FrozenBatchNorm2d);
    only ``x`` gets a gradient."""
    x = as_tensor(x)
    w, rv = _data(weight), _data(running_var)
    y = _ops.frozen_batch_norm_forward(x.data, w, _data(bias), _data(running_mean), rv, eps=eps)

    def backward(gs):
        return (_ops.frozen_batch_norm_backward(gs[0], w, rv, eps=eps),)
    return record(y, [x], backward, "frozen_batch_norm")


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution, x[N, Cin, H, W], weight[Cout, Cin, kh, kw]."""
    x, weight = as_tensor(x), as_tensor(weight)
    xd, wd = x.data, weight.data
    y = _ops.conv2d_forward(xd, wd, _data(bias), stride=stride, padding=padding)

    def backward(gs):
        return _ops.conv2d_backward(gs[0], xd, wd, stride=stride, padding=padding,
                                      has_bias=bias is not None)
    return record(y, [x, weight, _tensor_or_none(bias)], backward, "conv2d")


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """2-D max pooling of x[N, C, H, W] (torch's values, indices and tie rule)."""
    x = as_tensor(x)
    shape = x.shape
    y, idx = _ops.maxpool2d_forward(x.data, kernel_size, stride, padding)
    return record(y, [x], lambda gs: (_ops.maxpool2d_backward(gs[0], idx, shape),), "max_pool2d")


# ------------------------------------------------------------- elementwise

def activation(x, kind="gelu_tanh"):
    """``act(x)`` with kind in ``("gelu_tanh", "gelu", "relu")``."""
    x = as_tensor(x)
    xd = x.data
    y = _ops.activation_forward(xd, kind)
    return record(y, [x], lambda gs: (_ops.activation_backward(gs[0], xd, kind),), kind)


def relu(x):
    return activation(x, "relu")


def gelu(x, approximate="none"):
    """GELU; ``approximate="none"`` is the erf form (PyTorch's default), ``"tanh"`` the tanh form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return activation(x, "gelu" if approximate == "none" else "gelu_tanh")


def sigmoid(x):
    x = as_tensor(x)
    y = _ops.sigmoid_forward(x.data)
    return record(y, [x], lambda gs: (_ops.sigmoid_backward(gs[0], y),), "sigmoid")


def inverse_sigmoid(x, eps=1e-5):
    """DINO's ``log(x / (1 - x))`` with x clamped to [0, 1] and both terms to >= eps."""
    x = as_tensor(x)
    xd = x.data
    y = _ops.inverse_sigmoid_forward(xd, eps=eps)
    return record(y, [x], lambda gs: (_ops.inverse_sigmoid_backward(gs[0], xd, eps=eps),),
                  "inverse_sigmoid")


def softmax(x, dim=-1):
    """Softmax along ``dim`` (the kernel works on the last axis; others are moved there)."""
    x = as_tensor(x)
    nd = x.ndim
    d = dim % nd
    if d != nd - 1:
        return transpose(softmax(transpose(x, d, -1), -1), d, -1)
    y = _ops.softmax_forward(x.data)
    return record(y, [x], lambda gs: (_ops.softmax_backward(gs[0], y),), "softmax")


_default_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Reseed the generator that :func:`dropout` draws from when given no seed."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def _seed_from(seed):
    if seed is None:
        seed = _default_rng
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63 - 1))
    return int(seed)


def dropout(x, p=0.5, training=True, seed=None):
    """Zero each element with probability ``p`` and scale the rest by ``1/(1-p)``.

    ``seed``: an int or a ``numpy.random.Generator`` (one seed is drawn from it);
    None draws from the module generator (see :func:`manual_seed`).  With
    ``training=False`` or ``p == 0`` the input is returned unchanged.
    """
    x = as_tensor(x)
    if not training or p == 0:
        return x
    y, keep = _ops.dropout_forward(x.data, p, _seed_from(seed))
    return record(y, [x], lambda gs: (_ops.dropout_backward(gs[0], keep, p),), "dropout")


def embedding(ids, weight):
    """Rows ``weight[ids]``; ids an int64 array of any shape, weight[V, D]."""
    weight = as_tensor(weight)
    ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
    V = weight.shape[0]
    out = _ops.embedding_forward(weight.data, ids)
    return record(out, [weight], lambda gs: (_ops.embedding_backward(gs[0], ids, V),), "embedding")


# ------------------------------------------------------------------ attention

def attention(q, k, v, num_heads, attn_mask=None, key_padding_mask=None):
    """Scaled dot-product attention over heads, q[N, Lq, C], k, v[N, Lk, C].

    Masks are boolean with True = blocked: ``attn_mask[Lq, Lk]``,
    ``key_padding_mask[N, Lk]``.  Returns ``(out[N, Lq, C], attn[N, H, Lq, Lk])``;
    ``attn`` is a constant (no gradient flows through it).
    """
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    qd, kd, vd = q.data, k.data, v.data
    out, attn = _ops.attention_forward(qd, kd, vd, num_heads, attn_mask=attn_mask,
                                         key_padding_mask=key_padding_mask)

    def backward(gs):
        return _ops.attention_backward(gs[0], qd, kd, vd, attn, num_heads)
    return record(out, [q, k, v], backward, "attention"), Tensor(attn)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention core (Deformable-DETR).

    value[N, S, M, D], spatial_shapes[L, 2] and level_start_index[L] int64,
    sampling_locations[N, Lq, M, L, P, 2] in [0, 1], attention_weights[N, Lq, M, L, P].
    Returns out[N, Lq, M*D].
    """
    value, loc, aw = as_tensor(value), as_tensor(sampling_locations), as_tensor(attention_weights)
    shapes = np.asarray(spatial_shapes, np.int64)
    start = np.asarray(level_start_index, np.int64)
    vd, ld, ad = value.data, loc.data, aw.data
    out = _ops.ms_deform_attn_forward(vd, shapes, start, ld, ad)

    def backward(gs):
        return _ops.ms_deform_attn_backward(gs[0], vd, shapes, start, ld, ad)
    return record(out, [value, loc, aw], backward, "ms_deform_attn")


# ----------------------------------------------------------------- boxes, losses

def box_cxcywh_to_xyxy(b):
    b = as_tensor(b)
    return record(_ops.box_cxcywh_to_xyxy_forward(b.data), [b],
                  lambda gs: (_ops.box_cxcywh_to_xyxy_backward(gs[0]),), "box_cxcywh_to_xyxy")


def box_xyxy_to_cxcywh(b):
    b = as_tensor(b)
    return record(_ops.box_xyxy_to_cxcywh_forward(b.data), [b],
                  lambda gs: (_ops.box_xyxy_to_cxcywh_backward(gs[0]),), "box_xyxy_to_cxcywh")


def generalized_box_iou(a, b):
    """GIoU matrix [N, M] of xyxy boxes a[N, 4], b[M, 4]."""
    a, b = as_tensor(a), as_tensor(b)
    ad, bd = a.data, b.data
    g = _ops.generalized_box_iou_forward(ad, bd)
    return record(g, [a, b], lambda gs: _ops.generalized_box_iou_backward(gs[0], ad, bd),
                  "generalized_box_iou")


def generalized_box_iou_paired(a, b):
    """GIoU of matched pairs [N] of xyxy boxes a[N, 4], b[N, 4] (the diagonal of
    :func:`generalized_box_iou`, in O(N)); the DETR GIoU loss is ``(1 - giou).sum()``."""
    a, b = as_tensor(a), as_tensor(b)
    ad, bd = a.data, b.data
    g = _ops.generalized_box_iou_paired_forward(ad, bd)
    return record(g, [a, b], lambda gs: _ops.generalized_box_iou_paired_backward(gs[0], ad, bd),
                  "generalized_box_iou_paired")


def _reduce(loss, reduction, name):
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"{name}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """Sigmoid focal loss (torchvision's ``sigmoid_focal_loss``), elementwise unless reduced.
    ``targets`` is a constant array of 0/1 (or soft) labels of the logits' shape."""
    logits = as_tensor(logits)
    ld, td = logits.data, np.asarray(_data(targets), np.float32)
    loss = _ops.sigmoid_focal_loss_forward(ld, td, alpha=alpha, gamma=gamma)
    out = record(loss, [logits], lambda gs: (
        _ops.sigmoid_focal_loss_backward(gs[0], ld, td, alpha=alpha, gamma=gamma),),
        "sigmoid_focal_loss")
    return _reduce(out, reduction, "sigmoid_focal_loss")


def l1_loss(a, b, reduction="mean"):
    """``|a - b|`` reduced like ``torch.nn.functional.l1_loss`` (default ``"mean"``)."""
    a, b = as_tensor(a), as_tensor(b)
    ad, bd = a.data, b.data
    out = record(_ops.l1_loss_forward(ad, bd), [a, b],
                 lambda gs: _ops.l1_loss_backward(gs[0], ad, bd), "l1_loss")
    return _reduce(out, reduction, "l1_loss")


# ------------------------------------------------------------------------ MoE

# each routing loss by name: its (forward, backward) pair in damex.ops
_ROUTING_LOSS_OPS = {
    "importance": (_ops.importance_loss_forward, _ops.importance_loss_backward),
    "load": (_ops.load_loss_forward, _ops.load_loss_backward),
    "switch": (_ops.switch_loss_forward, _ops.switch_loss_backward),
    "z": (_ops.z_loss_forward, _ops.z_loss_backward),
    "damex": (_ops.damex_loss_forward, _ops.damex_loss_backward),
}
ROUTING_LOSSES = tuple(_ROUTING_LOSS_OPS)


def _loss_fns(name):
    if name not in ROUTING_LOSSES:
        raise ValueError(f"routing loss: expected one of {list(ROUTING_LOSSES)}, got {name!r}")
    return _ROUTING_LOSS_OPS[name]


def _loss_args(name, kwargs, *, noise, k, mask):
    """Positional and keyword arguments of routing loss ``name`` after the logits."""
    kw = dict(kwargs)
    if mask is not None:
        kw.setdefault("mask", mask)
    if name == "load":
        if noise is None:
            raise ValueError("routing loss 'load' needs the gate noise (train mode with gate_noise > 0)")
        return (noise, kw.pop("sigma"), k), kw
    if name == "importance" and kw.get("probs") == "noisy":
        kw.setdefault("noise", noise)
    if name == "switch":
        kw.setdefault("k", k)
    if name == "damex":
        return (kw.pop("expert_target"),), kw
    return (), kw


def moe(x, w_router, w1, b1, w2, b2, *, k=1, noise=None, capacity_factor=None, bpr=False,
        normalize=False, activation="gelu_tanh", mask=None, losses=(), loss_values=None):
    """A Mixture-of-Experts layer and its routing losses as one tape node.

    Parameters
    ----------
    x : Tensor [T, D]
    w_router : Tensor [D, E]
    w1, b1, w2, b2 : Tensor [E, D, F], [E, F], [E, F, D], [E, D]
    k, noise[T, E], capacity_factor, bpr, normalize, activation, mask[T] bool
        As in ``damex.ops.moe_forward`` (mask False = padding).
    losses : sequence of (name, weight, kwargs)
        Routing losses on the clean router logits, ``name`` in
        ``("importance", "load", "switch", "z", "damex")``; ``kwargs`` are the
        loss's options (``expert_target`` for damex, ``sigma`` for load,
        ``probs="noisy"`` for importance on the noisy probabilities ...); the
        layer's mask, noise and k are filled in.
    loss_values : dict, optional
        Filled with each loss's unweighted value (float), by name.

    Returns
    -------
    y : Tensor [T, D]
    aux_loss : Tensor, shape ()
        ``sum weight * loss``.  Both outputs belong to one node: its backward
        turns ``d aux_loss`` into ``dlogits`` and hands it to ``moe_backward``
        together with ``dy``, so the routing losses' gradient reaches the
        router weight (and ``x``).
    state : the ``moe_forward`` state (``state.router`` holds the routing).
    """
    params = [as_tensor(t) for t in (x, w_router, w1, b1, w2, b2)]
    y, state = _ops.moe_forward(*(p.data for p in params), k=k, noise=noise,
                                  capacity_factor=capacity_factor, bpr=bpr, normalize=normalize,
                                  activation=activation, mask=mask)
    logits = state.router.logits
    specs = []
    aux = 0.0
    for name, weight, kwargs in losses:
        fwd, bwd = _loss_fns(name)
        args, kw = _loss_args(name, kwargs or {}, noise=noise, k=k, mask=mask)
        value = float(fwd(logits, *args, **kw))
        if loss_values is not None:
            loss_values[name] = value
        aux += float(weight) * value
        specs.append((bwd, float(weight), args, kw))
    aux = np.asarray(aux, np.float32)

    def backward(gs):
        dy, daux = gs
        daux = float(daux)
        dlogits = None
        if specs and daux != 0.0:
            dlogits = np.zeros_like(logits)
            for bwd, weight, args, kw in specs:
                dlogits += bwd(logits, *args, **kw, dy=weight * daux)
        g = _ops.moe_backward(dy, state, dlogits=dlogits)
        return g["x"], g["w_router"], g["w1"], g["b1"], g["w2"], g["b2"]
    y_t, aux_t = record((y, aux), params, backward, "moe")
    return y_t, aux_t, state


def routing_loss(name, logits, weight=1.0, **kwargs):
    """One routing loss on a logits Tensor [T, E] as a tape node (for analysis and tests;
    inside a layer use ``moe(..., losses=...)``).  Options as in ``damex.ops``."""
    logits = as_tensor(logits)
    fwd, bwd = _loss_fns(name)
    ld = logits.data
    noise, k, mask = kwargs.pop("noise", None), kwargs.pop("k", 1), kwargs.pop("mask", None)
    args, kw = _loss_args(name, kwargs, noise=noise, k=k, mask=mask)
    val = np.asarray(weight * float(fwd(ld, *args, **kw)), np.float32)
    return record(val, [logits], lambda gs: (bwd(ld, *args, **kw, dy=weight * float(gs[0])),),
                  f"{name}_loss")


# The tape's Tensor offers these as methods too (``x.sigmoid()``); they are defined here,
# beside their C kernels, so that autograd never imports functional.
Tensor.sigmoid = lambda self: sigmoid(self)
Tensor.softmax = lambda self, dim=-1: softmax(self, dim)
Tensor.relu = lambda self: relu(self)
