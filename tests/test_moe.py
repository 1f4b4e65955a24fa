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
from helpers import assert_close, assert_memory_flat, numeric_grad, torch_or_skip, unchanged
from damex.testing.reference import (expert_ffn as expert_ref, moe_combine as combine_ref,
                                     moe_dispatch as dispatch_ref, moe_layer as layer_ref,
                                     moe_route as route_ref)
from damex.testing import torch_twins

ACTS = ("gelu_tanh", "gelu", "relu")


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
    cw_t = torch.tensor(route.combine_weight, requires_grad=True)
    ty = torch_twins.moe_experts(tx, route.expert_index, route.slot >= 0, cw_t, *tw, act)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy(), atol=1e-5, rtol=1e-4, name="y")
    assert_close(dx, tx.grad.numpy(), atol=1e-4, rtol=1e-4, name="dx")
    for name, got, t in zip(["w1", "b1", "w2", "b2"], dw, tw):
        assert_close(got, t.grad.numpy(), atol=1e-4, rtol=1e-4, name=name)
    want_dcw = cw_t.grad.numpy() * (route.slot >= 0)
    assert_close(dcw, want_dcw, atol=1e-4, rtol=1e-4, name="dcombine_weight")


@pytest.mark.parametrize("act", ACTS)
def test_threaded_expert_ffn_matches_torch_float64(act):
    """Large enough for the threaded path: several row blocks per expert,
    several column blocks of F, an empty expert; bitwise repeatable."""
    torch = torch_or_skip()
    rng = np.random.default_rng(6)
    E, D, F = 4, 16, 300
    count = np.array([520, 0, 300, 81])
    N = int(count.sum())
    xe = rng.normal(size=(N, D)).astype(np.float32)
    w = f32s(*weights(rng, E, D, F, scale=0.3))
    dye = rng.normal(size=(N, D)).astype(np.float32)
    ye, saved = ops.expert_ffn_forward(xe, count, *w, activation=act)
    grads = ops.expert_ffn_backward(dye, saved)
    again = ops.expert_ffn_backward(dye, ops.expert_ffn_forward(xe, count, *w, activation=act)[1])
    for g, g2 in zip(grads, again):
        np.testing.assert_array_equal(g, g2)
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (xe, *w)]
    ty = torch_twins.expert_ffn(*t[:1], count, *t[1:], act)
    ty.backward(torch.tensor(dye, dtype=torch.float64))
    assert_close(ye, ty.detach().numpy(), atol=1e-4, rtol=1e-4, name="ye")
    for name, got, tt in zip(["xe", "w1", "b1", "w2", "b2"], grads, t):
        assert_close(got, tt.grad.numpy(), atol=2e-4, rtol=2e-4, name=name)


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


# ---- the whole layer ------------------------------------------------------------------

def layer_inputs(seed, T, D, F, E, scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D))
    wr = rng.normal(0, 1.0, (D, E))
    return rng, x, wr, weights(rng, E, D, F, scale)


def same_route(got, want):
    np.testing.assert_array_equal(got.expert_index, want.expert_index)
    np.testing.assert_array_equal(got.slot, want.slot)
    np.testing.assert_array_equal(got.expert_count, want.expert_count)


LAYER_CASES = [  # k, capacity_factor, bpr, normalize, with noise, with dlogits, mask
    dict(k=1, capacity_factor=1.25, bpr=True),
    dict(k=2, capacity_factor=None, normalize=True, noise=True),
    dict(k=2, capacity_factor=0.75, bpr=False, normalize="after_drop", dlogits=True),
    dict(k=1, capacity_factor=1.0, bpr=True, noise=True, dlogits=True, mask=True),
    dict(k=3, capacity_factor=None, dlogits=True),  # k = E
]


def run_case(case, act, seed, T=7, D=3, F=4, E=3):
    rng, x, wr, w = layer_inputs(seed, T, D, F, E)
    noise = rng.normal(0, 1 / E, (T, E)) if case.get("noise") else np.zeros((T, E))
    mask = (rng.uniform(size=T) > 0.3) if case.get("mask") else None
    dl = rng.normal(size=(T, E)) if case.get("dlogits") else np.zeros((T, E))
    dy = rng.normal(size=(T, D))
    opts = dict(k=case["k"], capacity_factor=case.get("capacity_factor"),
                bpr=case.get("bpr", False), normalize=case.get("normalize", False), mask=mask)
    y, state = ops.moe_forward(*f32s(x, wr, *w), noise=noise.astype(np.float32),
                               activation=act, **opts)
    grads = ops.moe_backward(dy.astype(np.float32), state,
                             dlogits=dl.astype(np.float32) if case.get("dlogits") else None)
    return SimpleNamespace(x=x, wr=wr, w=w, noise=noise, mask=mask, dl=dl, dy=dy, y=y,
                           state=state, grads=grads, opts=opts)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_moe_layer_gradients_by_central_differences(case):
    act = "gelu_tanh"
    c = run_case(case, act, seed=10)
    route = route_ref(c.x @ c.wr + c.noise, case["k"], case.get("capacity_factor"),
                      case.get("bpr", False), c.mask)
    same_route(c.state.router, route)
    norm = case.get("normalize", False)
    assert_close(c.y, layer_ref(c.x, c.wr, *c.w, route, act, c.noise, norm),
                 atol=2e-5, rtol=1e-4, name="y")
    args = [c.x, c.wr, *c.w]

    def loss(i):
        def f(v):
            a = list(args)
            a[i] = v
            y = layer_ref(a[0], a[1], *a[2:], route, act, c.noise, norm)
            return (y * c.dy).sum() + (a[0] @ a[1] * c.dl).sum()
        return f

    for i, name in enumerate(["x", "w_router", "w1", "b1", "w2", "b2"]):
        assert_close(c.grads[name], numeric_grad(loss(i), args[i]), atol=1e-4, rtol=1e-3,
                     name=name)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", LAYER_CASES[:4])
def test_moe_layer_parity_with_torch(case, act):
    torch = torch_or_skip()
    c = run_case(case, act, seed=11, T=50, D=8, F=16, E=4)
    t = [torch.tensor(np.asarray(a, np.float32), requires_grad=True) for a in (c.x, c.wr, *c.w)]
    r = c.state.router
    ty, tlogits, _ = torch_twins.moe_layer_on_choices(
        *t, r.expert_index, torch.tensor(c.noise, dtype=torch.float32), act,
        case.get("normalize", False), kept=r.slot >= 0)
    loss = (ty * torch.tensor(c.dy, dtype=torch.float32)).sum() + \
        (tlogits * torch.tensor(c.dl, dtype=torch.float32)).sum()
    loss.backward()
    assert_close(c.y, ty.detach().numpy(), atol=2e-5, rtol=1e-4, name="y")
    for name, tt in zip(["x", "w_router", "w1", "b1", "w2", "b2"], t):
        assert_close(c.grads[name], tt.grad.numpy(), atol=1e-4, rtol=1e-4, name=name)


# ---- edge cases ---------------------------------------------------------------------------

def test_every_token_to_one_expert_and_empty_experts():
    rng, x, wr, w = layer_inputs(20, 12, 4, 6, 4)
    wr = np.zeros_like(wr)
    wr[:, 2] = 0.0
    x = np.abs(x)
    wr[0, 2] = 50.0  # expert 2 wins for every token; 0, 1, 3 get nothing
    y, state = ops.moe_forward(*f32s(x, wr, *w))
    assert state.router.expert_count.tolist() == [0, 0, 12, 0]
    route = route_ref(x @ wr, 1)
    assert_close(y, layer_ref(x, wr, *w, route, "gelu_tanh", 0), atol=2e-5, rtol=1e-4)
    g = ops.moe_backward(np.ones_like(y), state)
    for e in (0, 1, 3):
        assert not g["w1"][e].any() and not g["b1"][e].any()
        assert not g["w2"][e].any() and not g["b2"][e].any()
    assert g["w1"][2].any()


def test_capacity_drops_give_zero_output():
    rng, x, wr, w = layer_inputs(21, 16, 4, 5, 4)
    y, state = ops.moe_forward(*f32s(x, wr, *w), k=1, capacity_factor=0.5, bpr=True)
    dropped = state.router.slot[:, 0] < 0
    assert dropped.any() and (~dropped).any()
    assert not y[dropped].any()
    dy = np.ones_like(y)
    g = ops.moe_backward(dy, state)
    # a dropped token gets no gradient from the experts or the combine weights
    assert not g["x"][dropped].any()


def test_padding_mask():
    rng, x, wr, w = layer_inputs(22, 10, 4, 5, 3)
    mask = np.array([True, False] * 5)
    check = unchanged(mask)
    y, state = ops.moe_forward(*f32s(x, wr, *w), k=2, capacity_factor=1.0, mask=mask)
    assert not y[~mask].any()
    assert (state.router.slot[~mask] == -1).all()
    g = ops.moe_backward(np.ones_like(y), state)
    assert not g["x"][~mask].any()
    # padding tokens change nothing for the others
    y2, _ = ops.moe_forward(*f32s(x[mask], wr, *w), k=2, capacity_factor=1.0)
    assert_close(y[mask], y2, atol=1e-6, rtol=1e-6)
    check()


@pytest.mark.parametrize("act", ACTS)
def test_single_token(act):
    rng, x, wr, w = layer_inputs(23, 1, 4, 5, 3)
    y, state = ops.moe_forward(*f32s(x, wr, *w), k=2, activation=act)
    route = route_ref(x @ wr, 2)
    assert_close(y, layer_ref(x, wr, *w, route, act, 0), atol=2e-5, rtol=1e-4)
    g = ops.moe_backward(np.ones_like(y), state)
    assert g["x"].shape == (1, 4) and np.isfinite(g["x"]).all()


# ---- bad input, inputs untouched, memory -------------------------------------------------------

def test_moe_bad_input():
    rng, x, wr, w = layer_inputs(24, 6, 4, 5, 3)
    x, wr, w1, b1, w2, b2 = f32s(x, wr, *w)
    with pytest.raises(TypeError, match="w1"):
        ops.moe_forward(x, wr, w1.astype(np.int64), b1, w2, b2)
    with pytest.raises(ValueError, match="w1"):
        ops.moe_forward(x[:, :3], wr[:3], w1, b1, w2, b2)  # D of x != D of w1
    with pytest.raises(ValueError, match="w_router"):
        ops.moe_forward(x, wr[:, :2], w1, b1, w2, b2)  # E of router != E of experts
    with pytest.raises(ValueError, match="b1"):
        ops.moe_forward(x, wr, w1, b1[:, :4], w2, b2)
    with pytest.raises(ValueError, match="w2"):
        ops.moe_forward(x, wr, w1, b1, w2[:, :, :3], b2)
    with pytest.raises(ValueError, match="b2"):
        ops.moe_forward(x, wr, w1, b1, w2, b2[:2])
    with pytest.raises(ValueError, match="activation"):
        ops.moe_forward(x, wr, w1, b1, w2, b2, activation="tanh")
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.moe_forward(bad, wr, w1, b1, w2, b2)
    y, state = ops.moe_forward(x, wr, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="dy"):
        ops.moe_backward(y[:, :2], state)
    with pytest.raises(ValueError, match="dlogits"):
        ops.moe_backward(y, state, dlogits=np.zeros((6, 2), np.float32))
    with pytest.raises(TypeError, match="state"):
        ops.moe_backward(y, state.router)


def test_moe_inputs_not_modified():
    rng, x, wr, w = layer_inputs(25, 9, 4, 5, 3)
    args = f32s(x, wr, *w)
    noise = rng.normal(size=(9, 3)).astype(np.float32)
    check = unchanged(*args, noise)
    y, state = ops.moe_forward(*args, k=2, noise=noise, capacity_factor=1.0, bpr=True)
    dy = rng.normal(size=y.shape).astype(np.float32)
    dl = rng.normal(size=(9, 3)).astype(np.float32)
    check2 = unchanged(dy, dl, state.router.combine_weight, state.ye, state.expert.h)
    ops.moe_backward(dy, state, dlogits=dl)
    ops.moe_backward(dy, state, dlogits=dl)  # a second backward sees the same state
    check()
    check2()


def test_memory_flat_over_many_calls():
    rng, x, wr, w = layer_inputs(26, 5, 4, 6, 3)
    args = f32s(x, wr, *w)
    dy = np.ones((5, 4), np.float32)

    def step():
        y, state = ops.moe_forward(*args, k=2, capacity_factor=1.0, bpr=True)
        ops.moe_backward(dy, state)

    assert_memory_flat(step, rss_slack=2 << 20)


def test_reused_work_buffers_never_clobber_live_state():
    """Large work buffers are reused across calls only once nothing refers to
    them: a state kept alive across later calls still gives its own gradients."""
    rng, x, wr, w = layer_inputs(27, 2048, 16, 512, 4)  # h is 2048 x 512: 4 MiB, pooled
    args = f32s(x, wr, *w)
    dy = rng.normal(size=(2048, 16)).astype(np.float32)
    y1, s1 = ops.moe_forward(*args, k=1)
    g1 = ops.moe_backward(dy, s1)
    h1 = s1.expert.h.copy()
    x2 = args[0] * 0.5
    y2, s2 = ops.moe_forward(x2, *args[1:], k=1)  # s1 still alive: must not share buffers
    assert not np.shares_memory(s1.expert.h, s2.expert.h)
    assert not np.shares_memory(s1.expert.a, s2.expert.a)
    np.testing.assert_array_equal(s1.expert.h, h1)
    g1_again = ops.moe_backward(dy, s1)
    for name in g1:
        np.testing.assert_array_equal(g1_again[name], g1[name], err_msg=name)
    del s2, y2
    y3, s3 = ops.moe_forward(*args, k=1)  # s2's buffers are free again: results identical
    np.testing.assert_array_equal(y3, y1)
