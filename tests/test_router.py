"""The MoE router: every RouterResult field against a float64 NumPy reference,
hand-made routing cases (ties, capacity drops with and without BPR, masks,
normalisation), gradients by central differences and PyTorch autograd, bad
input, and flat memory."""
import math

import numpy as np
import pytest

from damex import ops
from damex._lib import _C
from helpers import assert_close, assert_memory_flat, numeric_grad, torch_or_skip, unchanged
from damex.testing import torch_twins
from damex.testing.reference import combine_weights as ref_combine, router as ref_router
from damex.testing.reference import softmax as softmax64

NORMS = (False, True, "before_drop", "after_drop")
NORM_NAME = {False: "none", True: "before_drop", "before_drop": "before_drop",
             "after_drop": "after_drop"}


# ---- float64 reference ----------------------------------------------------

def assert_matches_ref(res, ref, name=""):
    assert_close(res.logits, ref["logits"], atol=2e-5, rtol=1e-5, name=name + "logits")
    assert_close(res.noisy_logits, ref["noisy_logits"], atol=2e-5, rtol=1e-5,
                 name=name + "noisy_logits")
    assert_close(res.probs, ref["probs"], atol=2e-6, rtol=2e-5, name=name + "probs")
    for f in ("expert_index", "slot", "expert_count", "offset"):
        got = getattr(res, f)
        assert got.dtype == np.int64, f
        np.testing.assert_array_equal(got, ref[f], err_msg=name + f)
    assert_close(res.combine_weight, ref["combine_weight"], atol=2e-6, rtol=2e-5,
                 name=name + "combine_weight")
    assert res.capacity == ref["capacity"]


def rand_case(rng, T, D, E, noise=False, mask=False):
    x = rng.normal(size=(T, D)).astype(np.float32)
    w = rng.normal(0, 0.5, size=(D, E)).astype(np.float32)
    nz = rng.normal(0, 1.0 / E, size=(T, E)).astype(np.float32) if noise else None
    m = rng.random(T) < 0.7 if mask else None
    return x, w, nz, m


def route(logits, **kw):
    """Router on given logits: x = logits, w_router = I (exact in float32)."""
    logits = np.asarray(logits, np.float32)
    return ops.router_forward(logits, np.eye(logits.shape[1], dtype=np.float32), **kw)


# ---- forward against the reference ------------------------------------------

@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("bpr", [False, True])
def test_forward_matches_reference_random(bpr, normalize):
    rng = np.random.default_rng(10 + bpr)
    for trial in range(12):
        T = int(rng.integers(1, 90))
        D = int(rng.integers(1, 20))
        E = int(rng.integers(1, 10))
        k = int(rng.integers(1, E + 1))
        cf = [None, 0.5, 1.0, 1.25, 2.0][trial % 5]
        x, w, nz, m = rand_case(rng, T, D, E, noise=trial % 2 == 0, mask=trial % 3 == 0)
        kw = dict(k=k, noise=nz, capacity_factor=cf, bpr=bpr, normalize=normalize, mask=m)
        res = ops.router_forward(x, w, **kw)
        assert_matches_ref(res, ref_router(x, w, **kw), name=f"trial {trial} {kw}: ")
        assert res.k == k and res.bpr == bpr and res.normalize == NORM_NAME[normalize]
        assert res.capacity_factor == cf


@pytest.mark.parametrize("E", [1, 3, 8, 9, 12, 16, 17, 40])
def test_forward_matches_reference_across_gemm_paths(E):
    """E <= 8 and E <= 16 take the narrow logits kernels, E > 16 sgemm; T off
    multiples of their row blocks; one large case crosses the OpenMP thresholds."""
    rng = np.random.default_rng(20 + E)
    for T, D in [(1, 33), (7, 33), (9, 5), (257, 33), (601, 0)]:
        x, w, nz, m = rand_case(rng, T, D, E, noise=True, mask=True)
        kw = dict(k=min(2, E), noise=nz, capacity_factor=1.0, bpr=True, mask=m)
        assert_matches_ref(ops.router_forward(x, w, **kw), ref_router(x, w, **kw),
                           name=f"T={T} D={D} E={E}: ")
    if E == 8:
        x, w, nz, _ = rand_case(rng, 8200, 520, E, noise=True)
        w /= np.float32(np.sqrt(520))  # logits O(1): no top-1 prob saturates to 1.0f
        kw = dict(k=2, noise=nz, capacity_factor=1.25, bpr=True, normalize="after_drop")
        res = ops.router_forward(x, w, **kw)
        assert_matches_ref(res, ref_router(x, w, bpr_probs=res.probs, **kw), name="large: ")


def test_result_is_consistent():
    rng = np.random.default_rng(3)
    x, w, nz, m = rand_case(rng, 200, 16, 8, noise=True, mask=True)
    res = ops.router_forward(x, w, k=2, noise=nz, capacity_factor=1.0, bpr=True, mask=m)
    # every kept (expert, slot) pair is distinct and slots are 0..count-1
    for e in range(8):
        s = np.sort(res.slot[(res.expert_index == e) & res.kept])
        np.testing.assert_array_equal(s, np.arange(res.expert_count[e]))
    assert (res.expert_count <= res.capacity).all()
    rows = (res.offset[res.expert_index] + res.slot)[res.kept]
    np.testing.assert_array_equal(np.sort(rows), np.arange(res.num_rows))
    assert res.num_tokens == 200 and res.num_experts == 8
    assert_close(res.probs.sum(axis=1), np.ones(200), atol=1e-6)
    np.testing.assert_array_equal(res.mask, m)


# ---- routing semantics, by hand ----------------------------------------------

def test_ties_go_to_the_lower_index():
    res = route([[1, 3, 3, 0], [2, 2, 2, 2], [0, 0, 5, 5]], k=3)
    np.testing.assert_array_equal(res.expert_index, [[1, 2, 0], [0, 1, 2], [2, 3, 0]])
    res = ops.router_forward(np.ones((5, 3), np.float32), np.zeros((3, 4), np.float32), k=4)
    np.testing.assert_array_equal(res.expert_index, np.tile(np.arange(4), (5, 1)))
    assert_close(res.probs, np.full((5, 4), 0.25), atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_1_2_and_E_dropless(k):
    rng = np.random.default_rng(k)
    x, w, _, _ = rand_case(rng, 40, 6, 5)
    res = ops.router_forward(x, w, k=k)
    assert res.capacity == -1 and res.kept.all()
    assert res.expert_count.sum() == 40 * k
    if k == 5:  # every expert, each token once
        np.testing.assert_array_equal(np.sort(res.expert_index, axis=1), np.tile(np.arange(5), (40, 1)))
        np.testing.assert_array_equal(res.expert_count, np.full(5, 40))
        assert_close(ops.router_forward(x, w, k=5, normalize=True).combine_weight,
                     res.combine_weight / res.combine_weight.sum(1, keepdims=True), atol=1e-6)
    assert_close(res.combine_weight, np.take_along_axis(res.probs, res.expert_index, 1), atol=0)


def test_capacity_drops_in_token_order():
    # all four tokens prefer expert 0; C = ceil(1 * 1 * 4 / 2) = 2
    logits = [[1.0, 0], [2.0, 0], [3.0, 0], [4.0, 0]]
    res = route(logits, capacity_factor=1.0)
    assert res.capacity == 2
    np.testing.assert_array_equal(res.slot[:, 0], [0, 1, -1, -1])
    np.testing.assert_array_equal(res.expert_count, [2, 0])
    np.testing.assert_array_equal(res.offset, [0, 2])
    assert (res.combine_weight[2:] == 0).all() and (res.combine_weight[:2] > 0).all()


def test_capacity_drops_with_bpr():
    # the same tokens by decreasing confidence: 3, 2 keep their slots, 0, 1 drop
    res = route([[1.0, 0], [2.0, 0], [3.0, 0], [4.0, 0]], capacity_factor=1.0, bpr=True)
    np.testing.assert_array_equal(res.slot[:, 0], [-1, -1, 1, 0])
    # equal confidence keeps token order (stable), in every round
    res = route([[1.0, 0], [5.0, 0], [1.0, 0], [5.0, 0], [1.0, 0]], capacity_factor=0.8, bpr=True)
    assert res.capacity == 2
    np.testing.assert_array_equal(res.slot[:, 0], [-1, 0, -1, 1, -1])


def test_bpr_orders_by_the_float32_probs():
    # top-1 probs that differ in float64 but all round to 1.0f: token order
    res = route([[20.0, 0], [40.0, 0], [30.0, 0]], capacity_factor=1.0, bpr=True)
    assert (res.probs[:, 0] == 1.0).all()
    np.testing.assert_array_equal(res.slot[:, 0], [0, 1, -1])


def test_second_choices_come_after_all_first_choices():
    # E=2, k=2, C = ceil(0.5 * 2 * 4 / 2) = 2; 1st choices: e0, e0, e1, e0
    logits = [[2.0, 0], [1.0, 0], [0, 1.0], [3.0, 0]]
    res = route(logits, k=2, capacity_factor=0.5)
    assert res.capacity == 2
    np.testing.assert_array_equal(res.expert_index, [[0, 1], [0, 1], [1, 0], [0, 1]])
    # round 1: t0 e0 s0, t1 e0 s1, t2 e1 s0, t3 dropped; round 2: t0 e1 s1, rest full
    np.testing.assert_array_equal(res.slot, [[0, 1], [1, -1], [0, -1], [-1, -1]])
    # BPR order by top-1 prob: t3 (3.0), t0 (2.0), t1 = t2 (1.0, token order)
    # round 1: t3 e0 s0, t0 e0 s1, t1 dropped, t2 e1 s0; round 2: t3 e1 s1, rest full
    res = route(logits, k=2, capacity_factor=0.5, bpr=True)
    np.testing.assert_array_equal(res.slot, [[1, -1], [-1, -1], [0, -1], [0, 1]])


def test_empty_expert_and_every_token_to_one_expert():
    logits = np.zeros((7, 4), np.float32)
    logits[:, 2] = 3.0
    res = route(logits)
    np.testing.assert_array_equal(res.expert_count, [0, 0, 7, 0])
    np.testing.assert_array_equal(res.offset, [0, 0, 0, 7])
    np.testing.assert_array_equal(res.slot[:, 0], np.arange(7))
    res = route(logits, capacity_factor=2.0)  # C = ceil(2 * 7 / 4) = 4
    np.testing.assert_array_equal(res.slot[:, 0], [0, 1, 2, 3, -1, -1, -1])
    np.testing.assert_array_equal(res.expert_count, [0, 0, 4, 0])


def test_padding_mask_takes_no_capacity():
    logits = [[1.0, 0], [2.0, 0], [3.0, 0], [4.0, 0]]
    mask = np.array([False, True, True, True])
    res = route(logits, capacity_factor=1.0, mask=mask)  # T_valid = 3: C = ceil(1.5) = 2
    assert res.capacity == 2
    np.testing.assert_array_equal(res.slot[:, 0], [-1, 0, 1, -1])
    assert res.combine_weight[0, 0] == 0
    res = route(logits, capacity_factor=1.0, mask=mask, bpr=True)
    np.testing.assert_array_equal(res.slot[:, 0], [-1, -1, 1, 0])
    res = route(logits, k=2, mask=np.zeros(4, bool), normalize="after_drop")
    assert (res.slot == -1).all() and (res.combine_weight == 0).all()
    assert res.expert_count.sum() == 0
    assert (ops.router_backward(np.ones((4, 2)), res) == 0).all()


def test_single_token_and_empty_batch():
    res = route([[0.5, 2.0, 1.0]], k=2, capacity_factor=1.0, bpr=True)
    assert res.capacity == 1
    np.testing.assert_array_equal(res.expert_index, [[1, 2]])
    np.testing.assert_array_equal(res.slot, [[0, 0]])
    res = ops.router_forward(np.zeros((0, 3), np.float32), np.ones((3, 2), np.float32), k=2,
                             capacity_factor=1.0, bpr=True)
    assert res.expert_index.shape == (0, 2) and res.capacity == 0
    assert res.num_rows == 0
    assert ops.router_backward(np.zeros((0, 2)), res).shape == (0, 2)


def test_normalize_variants_by_hand():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    # C = ceil(0.75 * 2 * 2 / 3) = 1: t0 e0 s0, t1 e0 dropped; t0 e1 s0, t1 e1 dropped
    kw = dict(k=2, capacity_factor=0.75)
    none = route(logits, **kw)
    np.testing.assert_array_equal(none.slot, [[0, 0], [-1, -1]])
    assert_close(none.combine_weight, [[0.5, 0.3], [0, 0]], atol=1e-6)
    before = route(logits, normalize="before_drop", **kw)
    assert_close(before.combine_weight, [[0.5 / 0.8, 0.3 / 0.8], [0, 0]], atol=1e-6)
    assert_close(route(logits, normalize=True, **kw).combine_weight, before.combine_weight, atol=0)
    logits2 = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    # C = 1: t0 e0 s0, t1 e1 s0; t0 e1 dropped, t1 e2 s0
    res = route(logits2, normalize="after_drop", **kw)
    np.testing.assert_array_equal(res.slot, [[0, -1], [0, 0]])
    assert_close(res.combine_weight, [[1.0, 0], [0.6 / 0.9, 0.3 / 0.9]], atol=1e-6)
    res = route(logits2, normalize="before_drop", **kw)
    assert_close(res.combine_weight, [[0.5 / 0.8, 0], [0.6 / 0.9, 0.3 / 0.9]], atol=1e-6)


def test_noise_changes_probs_not_logits():
    logits = np.array([[1.0, 0.5, 0.0], [0.0, 0.2, 0.1]], np.float32)
    noise = np.array([[0.0, 1.0, 0.0], [0.3, 0.0, 0.0]], np.float32)
    res = route(logits, noise=noise)
    assert_close(res.logits, logits, atol=0)
    assert_close(res.noisy_logits, logits + noise, atol=0)
    assert_close(res.probs, softmax64(logits + noise), atol=1e-7)
    np.testing.assert_array_equal(res.expert_index[:, 0], [1, 0])
    clean = route(logits)
    np.testing.assert_array_equal(clean.expert_index[:, 0], [0, 1])


def test_capacity_formula_edge_cases():
    x, w = np.ones((10, 2), np.float32), np.ones((2, 1), np.float32)
    assert ops.router_forward(x, w, capacity_factor=1.1).capacity == math.ceil(1.1 * 1 * 10 / 1)
    res = ops.router_forward(x, w, capacity_factor=1e300)  # huge: no drops, no overflow
    assert res.kept.all() and res.capacity > 10
    res = ops.router_forward(x, w, capacity_factor=1e-9)  # tiny: still >= 1 slot
    assert res.capacity == 1 and res.kept.sum() == 1


# ---- gradients ------------------------------------------------------------

def composite_case(seed, T=7, D=5, E=4, k=2, cf=0.75, bpr=True, normalize=False, mask=True):
    rng = np.random.default_rng(seed)
    x, w, nz, _ = rand_case(rng, T, D, E, noise=True)
    m = np.ones(T, bool)
    if mask:
        m[1] = False
    res = ops.router_forward(x, w, k=k, noise=nz, capacity_factor=cf, bpr=bpr,
                             normalize=normalize, mask=m)
    assert (~res.kept[m]).any() and res.kept.any(), "the case should drop some choices"
    dcw = rng.normal(size=(T, k))
    return x, w, nz, m, res, dcw


@pytest.mark.parametrize("normalize", NORMS)
def test_router_backward_central_differences(normalize):
    x, w, nz, m, res, dcw = composite_case(1, normalize=normalize)
    idx, kept, name = res.expert_index, res.kept, NORM_NAME[normalize]
    noisy = res.noisy_logits.astype(np.float64)
    num = numeric_grad(lambda g: (ref_combine(g, idx, kept, name) * dcw).sum(), noisy)
    got = ops.router_backward(dcw.astype(np.float32), res)
    assert got.dtype == np.float32 and got.shape == noisy.shape
    assert_close(got, num, atol=2e-6, rtol=1e-4)
    assert (got[1] == 0).all()  # the masked token


@pytest.mark.parametrize("normalize", NORMS)
def test_full_chain_central_differences(normalize):
    """d/dx and d/dw_router of sum(dcw * combine_weight), decisions held fixed."""
    x, w, nz, m, res, dcw = composite_case(2, normalize=normalize)
    idx, kept, name = res.expert_index, res.kept, NORM_NAME[normalize]

    def loss(xv, wv):
        return (ref_combine(xv @ wv + nz, idx, kept, name) * dcw).sum()

    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    dlogits = ops.router_backward(dcw, res)
    dx, dw = ops.router_logits_backward(dlogits, x, w)
    assert_close(dx, numeric_grad(lambda v: loss(v, w64), x64), atol=5e-6, rtol=1e-4, name="dx")
    assert_close(dw, numeric_grad(lambda v: loss(x64, v), w64), atol=5e-6, rtol=1e-4, name="dw")


def test_router_logits_backward_is_the_matmul_transpose():
    rng = np.random.default_rng(4)
    x, w, dl = rng.normal(size=(33, 17)), rng.normal(size=(17, 6)), rng.normal(size=(33, 6))
    dx, dw = ops.router_logits_backward(dl, x, w)
    assert dx.dtype == np.float32 and dw.dtype == np.float32
    assert_close(dx, dl @ w.T, atol=1e-5, rtol=1e-5)
    assert_close(dw, x.T @ dl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("k", [1, 2])
def test_parity_with_torch(normalize, k):
    torch = torch_or_skip()
    rng = np.random.default_rng(5 + k)
    T, D, E = 64, 12, 6
    x, w, nz, m = rand_case(rng, T, D, E, noise=True, mask=True)
    res = ops.router_forward(x, w, k=k, noise=nz, capacity_factor=1.0, bpr=True,
                             normalize=normalize, mask=m)
    dcw = rng.normal(size=(T, k)).astype(np.float32)

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    pt = torch.softmax(xt @ wt + torch.tensor(nz), dim=-1)
    top = torch.topk(pt.detach(), k, dim=-1).indices
    np.testing.assert_array_equal(res.expert_index, top.numpy())
    cw = torch_twins.combine_weights(pt, res.expert_index, res.kept, NORM_NAME[normalize])
    (cw * torch.tensor(dcw)).sum().backward()

    assert_close(res.probs, pt.detach().numpy(), atol=1e-6, rtol=1e-5, name="probs")
    assert_close(res.combine_weight, cw.detach().numpy(), atol=1e-6, rtol=1e-5, name="cw")
    dx, dw = ops.router_logits_backward(ops.router_backward(dcw, res), x, w)
    assert_close(dx, xt.grad.numpy(), atol=1e-5, rtol=1e-4, name="dx")
    assert_close(dw, wt.grad.numpy(), atol=1e-5, rtol=1e-4, name="dw")


# ---- bad input ------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    x, w = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
    cases = [
        (TypeError, "x", dict(x=np.ones((4, 3), np.int32))),
        (TypeError, "w_router", dict(w=np.ones((3, 2), np.int64))),
        (ValueError, "x", dict(x=np.ones(4, np.float32))),
        (ValueError, "w_router", dict(w=np.ones((2, 2), np.float32))),
        (ValueError, "k", dict(k=3)),
        (ValueError, "k", dict(k=0)),
        (TypeError, "k", dict(k=1.5)),
        (ValueError, "capacity_factor", dict(capacity_factor=0.0)),
        (ValueError, "capacity_factor", dict(capacity_factor=-1.0)),
        (ValueError, "capacity_factor", dict(capacity_factor=float("nan"))),
        (TypeError, "capacity_factor", dict(capacity_factor="big")),
        (ValueError, "normalize", dict(normalize="sometimes")),
        (ValueError, "normalize", dict(normalize=1)),
        (ValueError, "noise", dict(noise=np.zeros((4, 3), np.float32))),
        (TypeError, "noise", dict(noise=np.zeros((4, 2), np.int32))),
        (TypeError, "mask", dict(mask=np.ones(4, np.int64))),
        (ValueError, "mask", dict(mask=np.ones(5, bool))),
        (ValueError, "x contains NaN", dict(x=np.where(np.eye(4, 3) > 0, np.nan, 1).astype(np.float32))),
        (ValueError, "w_router contains NaN", dict(w=np.full((3, 2), np.inf, np.float32))),
        (ValueError, "noise contains NaN", dict(noise=np.full((4, 2), -np.inf, np.float32))),
        (ValueError, "overflow", dict(x=np.full((4, 3), 3e38, np.float32))),
    ]
    for exc, match, kw in cases:
        xx, ww = kw.pop("x", x), kw.pop("w", w)
        check = unchanged(xx, ww, *[v for v in kw.values() if isinstance(v, np.ndarray)])
        with pytest.raises(exc, match=match):
            ops.router_forward(xx, ww, **kw)
        check()


def test_backward_bad_input():
    x, w = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
    res = ops.router_forward(x, w, k=2)
    with pytest.raises(ValueError, match="dcombine_weight"):
        ops.router_backward(np.ones((4, 1), np.float32), res)
    with pytest.raises(TypeError, match="dcombine_weight"):
        ops.router_backward(np.ones((4, 2), np.int32), res)
    with pytest.raises(TypeError, match="result"):
        ops.router_backward(np.ones((4, 2), np.float32), {"probs": 1})
    with pytest.raises(ValueError, match="dlogits"):
        ops.router_logits_backward(np.ones((4, 3)), x, w)
    with pytest.raises(ValueError, match="w_router"):
        ops.router_logits_backward(np.ones((4, 2)), x, np.ones((2, 2)))
    res.expert_index[0, 0] = 7  # a tampered result: refused, no crash
    with pytest.raises(ValueError, match="index"):
        ops.router_backward(np.ones((4, 2), np.float32), res)


def test_direct_C_calls_with_wrong_buffers_do_not_crash():
    f = np.zeros(8, np.float32)
    i = np.zeros(8, np.int64)
    with pytest.raises(ValueError):  # logits holds 8, not 4*3
        _C.router_forward(f, f, f, i, f, i, i[:2].copy(), i[:2].copy(), f, None, None, f,
                          4, 2, 3, 2, -1, 0, 0)
    with pytest.raises(ValueError, match="k"):
        _C.router_forward(f, f, f, i, f, i, i, i, f, None, None, f, 2, 4, 4, 5, -1, 0, 0)
    with pytest.raises(TypeError):
        _C.router_backward(f, f, f, f, i, 4, 2, 2, 0)


def test_noncontiguous_and_float64_inputs_are_accepted_and_unchanged():
    rng = np.random.default_rng(6)
    xF = np.asfortranarray(rng.normal(size=(30, 8)))
    w = rng.normal(size=(16, 5))[::2]  # strided rows, float64
    nz = rng.normal(size=(5, 30)).T
    m = np.repeat(rng.random(15) < 0.8, 2)[::1]
    check = unchanged(xF, w, nz, m)
    kw = dict(k=2, capacity_factor=1.0, bpr=True, normalize="after_drop")
    res = ops.router_forward(xF, w, noise=nz, mask=m, **kw)
    ref = ops.router_forward(np.ascontiguousarray(xF, np.float32),
                             np.ascontiguousarray(w, np.float32),
                             noise=np.ascontiguousarray(nz, np.float32), mask=m.copy(), **kw)
    for f in ("logits", "probs", "expert_index", "combine_weight", "slot", "expert_count"):
        np.testing.assert_array_equal(getattr(res, f), getattr(ref, f), err_msg=f)
    dcw = rng.normal(size=(2, 30)).T
    check2 = unchanged(dcw)
    dl = ops.router_backward(dcw, res)
    np.testing.assert_array_equal(dl, ops.router_backward(np.ascontiguousarray(dcw, np.float32), ref))
    dlT = np.asfortranarray(dl)
    dx, dw = ops.router_logits_backward(dlT, xF, w)
    dx2, dw2 = ops.router_logits_backward(dl, np.ascontiguousarray(xF, np.float32),
                                          np.ascontiguousarray(w, np.float32))
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(dw, dw2)
    check()
    check2()


def test_memory_flat_over_many_calls():
    rng = np.random.default_rng(7)
    x, w, nz, m = rand_case(rng, 32, 8, 4, noise=True, mask=True)
    bad = x.copy()
    bad[3, 3] = np.nan
    dcw = np.ones((32, 2), np.float32)

    def step():
        res = ops.router_forward(x, w, k=2, noise=nz, capacity_factor=1.0, bpr=True,
                                 normalize=True, mask=m)
        dl = ops.router_backward(dcw, res)
        ops.router_logits_backward(dl, x, w)
        try:
            ops.router_forward(bad, w)
        except ValueError:
            pass

    assert_memory_flat(step)
