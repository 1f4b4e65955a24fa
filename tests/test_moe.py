"""MoE core: dispatch, expert FFN, combine and the whole layer (moe_forward /
moe_backward).  Values against a float64 NumPy reference, every gradient by
central differences through that reference and by PyTorch autograd on the
same inputs; edge cases (empty experts, one expert for all, k = E, capacity
drops, padding masks, T = 1); bad input; no input modified; flat memory."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from damex import ops
from helpers import assert_close, numeric_grad, torch_or_skip, unchanged

ERF = np.vectorize(math.erf, otypes=[np.float64])
ACTS = ("gelu_tanh", "gelu", "relu")


# ---- float64 references ------------------------------------------------------

def act_ref(h, act):
    if act == "gelu_tanh":
        return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    if act == "gelu":
        return 0.5 * h * (1 + ERF(h / math.sqrt(2)))
    return np.maximum(h, 0)


def rows_of(route):
    """Packed row of each choice, -1 where dropped."""
    count = np.asarray(route.expert_count)
    offset = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    slot = np.asarray(route.slot)
    return np.where(slot >= 0, offset[np.asarray(route.expert_index)] + slot, -1)


def dispatch_ref(x, route):
    rows = rows_of(route)
    xe = np.zeros((int(np.sum(route.expert_count)), x.shape[1]))
    for (t, j), r in np.ndenumerate(rows):
        if r >= 0:
            xe[r] = x[t]
    return xe


def expert_ref(xe, count, w1, b1, w2, b2, act):
    ye = np.zeros((xe.shape[0], w2.shape[2]))
    off = 0
    for e, n in enumerate(count):
        xr = xe[off:off + n]
        ye[off:off + n] = act_ref(xr @ w1[e] + b1[e], act) @ w2[e] + b2[e]
        off += n
    return ye


def combine_ref(ye, cw, route):
    rows = rows_of(route)
    y = np.zeros((rows.shape[0], ye.shape[1]))
    for (t, j), r in np.ndenumerate(rows):
        if r >= 0:
            y[t] += cw[t, j] * ye[r]
    return y


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def route_ref(logits, k, capacity_factor=None, bpr=False, mask=None):
    """The routing decisions of docs/ops.md, from (noisy) logits in float64."""
    T, E = logits.shape
    p = softmax(logits)
    ei = np.argsort(-p, axis=1, kind="stable")[:, :k]
    valid = np.ones(T, bool) if mask is None else np.asarray(mask, bool)
    t_valid = int(valid.sum())
    cap = None if capacity_factor is None else math.ceil(capacity_factor * k * t_valid / E)
    order = np.arange(T)
    if bpr:
        order = np.argsort(-p[np.arange(T), ei[:, 0]], kind="stable")
    slot = -np.ones((T, k), np.int64)
    count = np.zeros(E, np.int64)
    for j in range(k):
        for t in order:
            if not valid[t]:
                continue
            e = ei[t, j]
            if cap is None or count[e] < cap:
                slot[t, j] = count[e]
                count[e] += 1
    return SimpleNamespace(expert_index=ei.astype(np.int64), slot=slot, expert_count=count)


def gates_ref(logits, noise, route, normalize=False):
    """Combine weights as a function of the logits, routing decisions held fixed."""
    p = softmax(logits + noise)
    w = np.take_along_axis(p, route.expert_index, axis=1)
    kept = route.slot >= 0
    if normalize in (True, "before_drop"):
        w = w / w.sum(axis=1, keepdims=True)
    w = w * kept
    if normalize == "after_drop":
        s = w.sum(axis=1, keepdims=True)
        w = np.where(s > 0, w / np.where(s > 0, s, 1), 0)
    return w


def layer_ref(x, wr, w1, b1, w2, b2, route, act, noise, normalize=False):
    cw = gates_ref(x @ wr, noise, route, normalize)
    ye = expert_ref(dispatch_ref(x, route), route.expert_count, w1, b1, w2, b2, act)
    return combine_ref(ye, cw, route)


# ---- inputs --------------------------------------------------------------------

def random_route(rng, T, E, k, cap=None, drop_tokens=()):
    """Random distinct k experts per token, slots in token order, optional capacity."""
    ei = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    slot = -np.ones((T, k), np.int64)
    count = np.zeros(E, np.int64)
    for j in range(k):
        for t in range(T):
            if t in drop_tokens:
                continue
            e = ei[t, j]
            if cap is None or count[e] < cap:
                slot[t, j] = count[e]
                count[e] += 1
    cw = rng.uniform(0.1, 1.0, (T, k)) * (slot >= 0)
    return SimpleNamespace(expert_index=ei, slot=slot, expert_count=count,
                           combine_weight=cw.astype(np.float32))


def weights(rng, E, D, F, scale=0.5):
    return (rng.normal(0, scale, (E, D, F)), rng.normal(0, scale, (E, F)),
            rng.normal(0, scale, (E, F, D)), rng.normal(0, scale, (E, D)))


def f32s(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


# ---- dispatch and combine -----------------------------------------------------

def test_dispatch_forward_backward():
    rng = np.random.default_rng(0)
    T, D, E, k = 9, 5, 4, 2
    route = random_route(rng, T, E, k, cap=4)
    x = rng.normal(size=(T, D)).astype(np.float32)
    check = unchanged(x, route.expert_index, route.slot, route.expert_count)
    xe = ops.dispatch_forward(x, route)
    assert_close(xe, dispatch_ref(x, route), atol=0, rtol=0)
    dxe = rng.normal(size=xe.shape)
    num = numeric_grad(lambda v: (dispatch_ref(v, route) * dxe).sum(), x)
    dx = ops.dispatch_backward(dxe.astype(np.float32), route, T)
    assert_close(dx, num, atol=1e-5, rtol=1e-5, name="dx")
    check()


def test_combine_forward_backward():
    rng = np.random.default_rng(1)
    T, D, E, k = 8, 4, 3, 2
    route = random_route(rng, T, E, k, cap=5)
    assert (route.slot < 0).any()  # some choice is dropped
    N = int(route.expert_count.sum())
    ye = rng.normal(size=(N, D)).astype(np.float32)
    cw = route.combine_weight.astype(np.float64)
    check = unchanged(ye, route.combine_weight)
    y = ops.combine_forward(ye, route)
    assert_close(y, combine_ref(ye, cw, route), atol=1e-6, rtol=1e-6)
    dy = rng.normal(size=(T, D))
    dye, dcw = ops.combine_backward(dy.astype(np.float32), ye, route)
    num_ye = numeric_grad(lambda v: (combine_ref(v, cw, route) * dy).sum(), ye)
    num_cw = numeric_grad(lambda v: (combine_ref(ye, v, route) * dy).sum(), cw)
    num_cw[route.slot < 0] = 0  # a dropped choice carries no gradient
    assert_close(dye, num_ye, atol=1e-5, rtol=1e-5, name="dye")
    assert_close(dcw, num_cw, atol=1e-5, rtol=1e-5, name="dcombine_weight")
    check()


# ---- expert FFN -----------------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_expert_ffn_forward_backward(act):
    rng = np.random.default_rng(2)
    E, D, F = 3, 4, 5
    count = np.array([3, 0, 4])  # expert 1 gets no tokens
    N = int(count.sum())
    xe = rng.normal(size=(N, D))
    w = weights(rng, E, D, F)
    ye, saved = ops.expert_ffn_forward(xe.astype(np.float32), count, *f32s(*w), activation=act)
    assert_close(ye, expert_ref(xe, count, *w, act), atol=2e-5, rtol=1e-4)
    dye = rng.normal(size=(N, D))
    grads = ops.expert_ffn_backward(dye.astype(np.float32), saved)
    args = [xe, *w]
    names = ["xe", "w1", "b1", "w2", "b2"]
    for i, (name, got) in enumerate(zip(names, grads)):
        def f(v, i=i):
            a = list(args)
            a[i] = v
            return (expert_ref(a[0], count, *a[1:], act) * dye).sum()
        assert_close(got, numeric_grad(f, args[i]), atol=1e-4, rtol=1e-3, name=name)
    assert not grads[1][1].any() and not grads[2][1].any()  # empty expert: zero grads


# ---- PyTorch parity of the three ops on the same routing -----------------------

def torch_pipeline(torch, x, route, w1, b1, w2, b2, act):
    """Dispatch by index_select, per-expert Linear-act-Linear, index_add combine."""
    fn = {"gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
          "gelu": torch.nn.functional.gelu, "relu": torch.relu}[act]
    rows = rows_of(route)
    kept = np.argwhere(rows >= 0)
    order = np.argsort(rows[rows >= 0])
    tok = torch.tensor(kept[order, 0])
    xe = x.index_select(0, tok)
    outs, off = [], 0
    for e, n in enumerate(route.expert_count):
        outs.append(fn(xe[off:off + n] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        off += int(n)
    ye = torch.cat(outs)
    cw = route.cw_t[kept[order, 0], kept[order, 1]]
    return torch.zeros_like(x).index_add(0, tok, ye * cw[:, None])


@pytest.mark.parametrize("act", ACTS)
def test_parity_with_torch(act):
    torch = torch_or_skip()
    rng = np.random.default_rng(3)
    T, D, F, E, k = 40, 8, 16, 4, 2
    route = random_route(rng, T, E, k, cap=18)
    x = rng.normal(size=(T, D)).astype(np.float32)
    w = f32s(*weights(rng, E, D, F))
    dy = rng.normal(size=(T, D)).astype(np.float32)
    xe = ops.dispatch_forward(x, route)
    ye, saved = ops.expert_ffn_forward(xe, route.expert_count, *w, activation=act)
    y = ops.combine_forward(ye, route)
    dye, dcw = ops.combine_backward(dy, ye, route)
    dxe, *dw = ops.expert_ffn_backward(dye, saved)
    dx = ops.dispatch_backward(dxe, route, T)

    tx = torch.tensor(x, requires_grad=True)
    tw = [torch.tensor(a, requires_grad=True) for a in w]
    route.cw_t = torch.tensor(route.combine_weight, requires_grad=True)
    ty = torch_pipeline(torch, tx, route, *tw, act)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy(), atol=1e-5, rtol=1e-4, name="y")
    assert_close(dx, tx.grad.numpy(), atol=1e-4, rtol=1e-4, name="dx")
    for name, got, t in zip(["w1", "b1", "w2", "b2"], dw, tw):
        assert_close(got, t.grad.numpy(), atol=1e-4, rtol=1e-4, name=name)
    want_dcw = route.cw_t.grad.numpy() * (route.slot >= 0)
    assert_close(dcw, want_dcw, atol=1e-4, rtol=1e-4, name="dcombine_weight")


# ---- bad input to the lower-level ops ----------------------------------------------

def test_bad_routing_is_refused():
    rng = np.random.default_rng(4)
    T, D, E = 5, 3, 2
    route = random_route(rng, T, E, 1)
    x = rng.normal(size=(T, D)).astype(np.float32)
    bad = SimpleNamespace(**vars(route))
    bad.slot = route.slot.copy()
    bad.slot[0, 0] = 99  # outside its expert's rows
    with pytest.raises(ValueError, match="index out of range"):
        ops.dispatch_forward(x, bad)
    bad.slot = route.slot.copy()
    bad.slot[:, 0] = 0  # two tokens on one row
    with pytest.raises(ValueError, match="index out of range"):
        ops.combine_forward(np.zeros((int(route.expert_count.sum()), D), np.float32), bad)
    bad = SimpleNamespace(**vars(route))
    bad.expert_index = route.expert_index.astype(np.float32)
    with pytest.raises(TypeError, match="expert_index"):
        ops.dispatch_forward(x, bad)
    with pytest.raises(ValueError, match="T"):
        ops.dispatch_backward(np.zeros((T, D), np.float32), route, T + 1)
    with pytest.raises(TypeError, match="result"):
        ops.dispatch_forward(x, object())


def test_bad_expert_weights_are_named():
    rng = np.random.default_rng(5)
    E, D, F, N = 3, 4, 5, 6
    count = np.array([2, 2, 2])
    xe = rng.normal(size=(N, D)).astype(np.float32)
    w1, b1, w2, b2 = f32s(*weights(rng, E, D, F))
    with pytest.raises(TypeError, match="w1"):
        ops.expert_ffn_forward(xe, count, w1.astype(np.int32), b1, w2, b2)
    with pytest.raises(ValueError, match="b1"):
        ops.expert_ffn_forward(xe, count, w1, b1[:, :-1], w2, b2)
    with pytest.raises(ValueError, match="w2"):
        ops.expert_ffn_forward(xe, count, w1, b1, w2[:2], b2)
    with pytest.raises(ValueError, match="w2"):
        ops.expert_ffn_forward(xe, count, w1, b1, np.swapaxes(w2, 1, 2)[:, :-1], b2)
    with pytest.raises(ValueError, match="b2"):
        ops.expert_ffn_forward(xe, count, w1, b1, w2, b2[:, :-1])
    with pytest.raises(ValueError, match="xe"):
        ops.expert_ffn_forward(xe[:-1], count, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="expert_count"):
        ops.expert_ffn_forward(xe, np.array([2, 2]), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="activation"):
        ops.expert_ffn_forward(xe, count, w1, b1, w2, b2, activation="swish")
