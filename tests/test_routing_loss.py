"""Routing losses (importance, load, switch, z, DAMEX): values against float64
NumPy references, gradients by float64 central differences through the
references (load: noise held fixed) and by PyTorch autograd, options, masks,
edge cases and bad input."""
import math

import numpy as np
import pytest

from damex import _C, ops
from helpers import assert_close, assert_memory_flat, numeric_grad, torch_or_skip, unchanged
from damex.testing import torch_twins
from damex.testing.reference import (_mask as _m, damex_loss as ref_damex, importance_loss as ref_importance,
                                     kth_index, logsumexp as lse,
                                     load_loss as ref_load, load_loss_grad as ref_load_grad,
                                     softmax, switch_loss as ref_switch, z_loss as ref_z)


# ---- the cases: (name, forward, backward, reference) ---------------------

SIGMA = 0.25


def make(T=12, E=5, seed=0, k=2):
    rng = np.random.default_rng(seed)
    g = rng.normal(0, 1, (T, E)).astype(np.float32)
    noise = rng.normal(0, SIGMA, (T, E)).astype(np.float32)
    target = rng.integers(0, E, T)
    return g, noise, target


def cases(noise, target, k=2):
    """name -> (forward(g, mask), backward(g, mask, grad), reference(g64, mask))"""
    c = {}
    for variance in ("population", "unbiased"):
        for probs in ("clean", "noisy"):
            kw = dict(noise=noise, probs=probs, variance=variance)
            c[f"importance-{probs}-{variance}"] = (
                lambda g, m, kw=kw: ops.importance_loss_forward(g, mask=m, **kw),
                lambda g, m, gr, kw=kw: ops.importance_loss_backward(g, mask=m, dy=gr, **kw),
                lambda g, m, kw=kw: ref_importance(g, m, **kw))
        c[f"load-{variance}"] = (
            lambda g, m, v=variance: ops.load_loss_forward(g, noise, SIGMA, k, mask=m, variance=v),
            lambda g, m, gr, v=variance: ops.load_loss_backward(g, noise, SIGMA, k, mask=m,
                                                                variance=v, dy=gr),
            lambda g, m, v=variance: ref_load(g, noise, SIGMA, k, m, v))
    for counts in ("top1", "topk"):
        c[f"switch-{counts}"] = (
            lambda g, m, cn=counts: ops.switch_loss_forward(g, k=k, mask=m, counts=cn),
            lambda g, m, gr, cn=counts: ops.switch_loss_backward(g, k=k, mask=m, counts=cn, dy=gr),
            lambda g, m, cn=counts: ref_switch(g, k, m, cn))
    c["z"] = (lambda g, m: ops.z_loss_forward(g, mask=m),
              lambda g, m, gr: ops.z_loss_backward(g, mask=m, dy=gr),
              lambda g, m: ref_z(g, m))
    c["damex"] = (lambda g, m: ops.damex_loss_forward(g, target, mask=m),
                  lambda g, m, gr: ops.damex_loss_backward(g, target, mask=m, dy=gr),
                  lambda g, m: ref_damex(g, target, m))
    return c


NAMES = list(cases(None, None))


def grad_close(got, ref, name):
    scale = max(np.abs(ref).max(), 1e-12)
    assert_close(got, ref, atol=2e-5 * scale + 1e-7, rtol=1e-3, name=name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_central_differences(name, masked):
    g, noise, target = make()
    mask = np.arange(len(g)) % 4 != 1 if masked else None
    fwd, bwd, ref = cases(noise, target)[name]
    assert_close(fwd(g, mask), ref(g, mask), atol=1e-7, rtol=2e-5, name=name)
    # f is piecewise constant: central differences see only the q path
    num = numeric_grad(lambda v: ref(v, mask), g.astype(np.float64))
    grad_close(bwd(g, mask, 1.0), num, name)
    grad_close(bwd(g, mask, -2.5), -2.5 * num, name + " grad=-2.5")


@pytest.mark.parametrize("E", [1, 2, 8, 16, 33])
def test_expert_counts(E):
    """Specialised (4, 8, 16) and generic row code, E = 1 included."""
    k = min(2, E)
    g, noise, target = make(T=6, E=E, seed=20 + E, k=k)
    for name, (fwd, bwd, ref) in cases(noise, target, k=k).items():
        if E == 1 and "unbiased" in name:
            continue
        assert_close(fwd(g, None), ref(g, None), atol=1e-7, rtol=2e-5, name=f"{name} E={E}")
        num = numeric_grad(lambda v: ref(v, None), g.astype(np.float64))
        grad_close(bwd(g, None, 1.0), num, f"{name} E={E}")


def torch_loss(name, g, noise, target, mask, k=2):
    """The case `name` of :func:`cases` through its twin in damex.testing.torch_twins."""
    kind, *opt = name.split("-")
    variance = "unbiased" if "unbiased" in opt else "population"
    if kind == "importance":
        return torch_twins.importance_loss(g, mask, noise, opt[0], variance)
    if kind == "load":
        return torch_twins.load_loss(g, noise, SIGMA, k, mask, variance)
    if kind == "switch":
        return torch_twins.switch_loss(g, k, mask, opt[0])
    if kind == "z":
        return torch_twins.z_loss(g, mask)
    return torch_twins.damex_loss(g, target, mask)


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_torch(name):
    torch = torch_or_skip()
    g, noise, target = make(T=200, E=8, seed=3)
    mask = np.arange(200) % 7 != 3
    fwd, bwd, _ = cases(noise, target)[name]
    gt = torch.tensor(g, dtype=torch.float64, requires_grad=True)
    lt = torch_loss(name, gt, noise, target, mask)
    lt.backward()
    assert_close(fwd(g, mask), lt.item(), atol=1e-7, rtol=2e-5, name=name)
    grad_close(bwd(g, mask, 1.0), gt.grad.numpy(), name)


# ---- load loss: the k-th expert, ties, k = E ---------------------------

def test_load_kth_expert_gets_only_the_threshold_gradient():
    """For j = the k-th expert, eta - g_j = noise_j: P_j has no gradient, and
    g_j receives minus the sum of the other experts' threshold gradients."""
    g, noise, _ = make(T=1, E=4, seed=5)
    for k in (1, 2, 4):
        gn = g.astype(np.float64) + noise
        j = kth_index(gn, k)[0]
        d = ops.load_loss_backward(g, noise, SIGMA, k, variance="population")
        num = numeric_grad(lambda v: ref_load(v, noise, SIGMA, k), g.astype(np.float64))
        grad_close(d, num, f"k={k}")
        # the loss is invariant to shifting every logit: gradients sum to 0 per token
        assert abs(d.sum()) < 1e-5 * np.abs(d).max() + 1e-9
        # moving g_j alone moves only the threshold (all z_i, i != j) and not P_j
        assert d[0, j] != 0 or np.allclose(d, 0)


def test_load_ties_follow_the_lower_index():
    E = 4
    g = np.array([[1.0, 0.5, 0.5, -1.0], [0.2, 0.2, 0.2, 0.2], [0.0, 1.0, 1.0, 0.3]], np.float32)
    noise = np.zeros_like(g)
    for k in (1, 2, 3, E):
        got_f = ops.load_loss_forward(g, noise, SIGMA, k)
        assert_close(got_f, ref_load(g, noise, SIGMA, k), atol=1e-7, rtol=2e-5, name=f"k={k}")
        got = ops.load_loss_backward(g, noise, SIGMA, k)
        grad_close(got, ref_load_grad(g, noise, SIGMA, k), f"tie k={k}")
        assert np.isfinite(got).all()


@pytest.mark.parametrize("variance", ["population", "unbiased"])
def test_load_k_equals_E(variance):
    g, noise, _ = make(T=10, E=4, seed=6)
    k = 4
    assert_close(ops.load_loss_forward(g, noise, SIGMA, k, variance=variance),
                 ref_load(g, noise, SIGMA, k, variance=variance), atol=1e-7, rtol=2e-5)
    num = numeric_grad(lambda v: ref_load(v, noise, SIGMA, k, variance=variance),
                       g.astype(np.float64))
    grad_close(ops.load_loss_backward(g, noise, SIGMA, k, variance=variance), num, "k=E")


def test_load_tail_accuracy():
    """P_i deep in the normal tail: erfc keeps the relative accuracy."""
    g = np.array([[0.0, -1.0, -1.5, -2.0], [0.0, -0.5, -1.7, -2.1]], np.float32)
    noise = np.zeros_like(g)
    for sigma in (0.25, 0.5, 1.0):
        assert_close(ops.load_loss_forward(g, noise, sigma, 1), ref_load(g, noise, sigma, 1),
                     atol=0, rtol=1e-5, name=f"sigma={sigma}")


# ---- combinations, masks, edge cases -----------------------------------

def test_importance_and_load_combine_linearly():
    """The seed's L_imp + L_load / 2 (and V-MoE's 0.5/0.5) are weights on two losses."""
    g, noise, _ = make(T=16, E=6, seed=7)
    k = 1

    def total(v, wi, wl):
        return wi * ref_importance(v) + wl * ref_load(v, noise, SIGMA, k)
    for wi, wl in ((1.0, 0.5), (0.5, 0.5)):
        got = (ops.importance_loss_backward(g, dy=wi)
               + ops.load_loss_backward(g, noise, SIGMA, k, dy=wl))
        num = numeric_grad(lambda v: total(v, wi, wl), g.astype(np.float64))
        grad_close(got, num, f"w=({wi},{wl})")
        assert_close(wi * ops.importance_loss_forward(g) + wl * ops.load_loss_forward(g, noise, SIGMA, k),
                     total(g, wi, wl), atol=1e-7, rtol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padding_tokens_change_nothing(name):
    """Changing the logits, noise and target of padding tokens changes nothing."""
    g, noise, target = make(T=16, E=5, seed=8)
    mask = np.ones(16, bool)
    mask[[0, 5, 6, 15]] = False
    fwd, bwd, _ = cases(noise, target)[name]
    rng = np.random.default_rng(9)
    g2, noise2, target2 = g.copy(), noise.copy(), target.copy()
    g2[~mask] = rng.normal(0, 10, ((~mask).sum(), 5))
    noise2[~mask] = rng.normal(0, 10, ((~mask).sum(), 5))
    target2[~mask] = -1
    fwd2, bwd2, _ = cases(noise2, target2)[name]
    assert fwd(g, mask) == fwd2(g2, mask)
    d1, d2 = bwd(g, mask, 1.0), bwd2(g2, mask, 1.0)
    np.testing.assert_array_equal(d1, d2)
    assert (d1[~mask] == 0).all()
    # and the masked batch is the batch of the unmasked tokens alone
    sub = cases(noise[mask], target[mask])[name]
    assert_close(fwd(g, mask), sub[0](g[mask], None), atol=1e-7, rtol=1e-6)
    assert_close(d1[mask], sub[1](g[mask], None, 1.0), atol=1e-7, rtol=1e-5)


def test_padding_targets_are_ignored():
    g, _, target = make(T=6, E=3, seed=10)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    t = target % 3
    t[~mask] = -1
    assert_close(ops.damex_loss_forward(g, t, mask=mask), ref_damex(g, np.where(mask, t, 0), mask),
                 atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_single_token(name):
    g, noise, target = make(T=1, E=4, seed=11)
    fwd, bwd, ref = cases(noise, target)[name]
    assert_close(fwd(g, None), ref(g, None), atol=1e-7, rtol=2e-5, name=name)
    num = numeric_grad(lambda v: ref(v, None), g.astype(np.float64))
    grad_close(bwd(g, None, 1.0), num, name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [0, 5])
def test_empty_batch_is_zero(name, T):
    """No unmasked token: loss 0 and zero gradient (documented convention)."""
    g, noise, target = make(T=T, E=4, seed=12)
    mask = np.zeros(T, bool)
    fwd, bwd, _ = cases(noise, target)[name]
    assert fwd(g, mask) == 0.0
    d = bwd(g, mask, 1.0)
    assert d.shape == (T, 4) and d.dtype == np.float32 and not d.any()
    if T == 0:
        assert fwd(g, None) == 0.0 and not bwd(g, None, 1.0).any()


def test_every_token_to_one_expert():
    T, E = 32, 4
    g = np.full((T, E), -30.0, np.float32)
    g[:, 2] = 30.0
    noise = np.zeros_like(g)
    # Imp = (0, 0, T, 0): population var / mean^2 = E - 1; unbiased: E
    assert_close(ops.importance_loss_forward(g), E - 1, atol=1e-6, rtol=1e-6)
    assert_close(ops.importance_loss_forward(g, variance="unbiased"), E, atol=1e-6, rtol=1e-6)
    # f = P = (0, 0, 1, 0): switch loss = E
    assert_close(ops.switch_loss_forward(g), E, atol=1e-6, rtol=1e-6)
    assert_close(ops.load_loss_forward(g, noise, SIGMA, 1), ref_load(g, noise, SIGMA, 1),
                 atol=1e-7, rtol=1e-5)
    for d in (ops.importance_loss_backward(g), ops.load_loss_backward(g, noise, SIGMA, 1),
              ops.switch_loss_backward(g), ops.z_loss_backward(g),
              ops.damex_loss_backward(g, np.zeros(T, np.int64))):
        assert np.isfinite(d).all()
    # a balanced router: switch loss 1, importance 0
    gb = np.tile(np.eye(E, dtype=np.float32) * 40, (T // E, 1))
    assert_close(ops.switch_loss_forward(gb), 1.0, atol=1e-6, rtol=1e-6)
    assert ops.importance_loss_forward(gb) < 1e-10


def test_switch_ties_go_to_the_lower_index():
    g = np.zeros((3, 4), np.float32)  # all tied: top-1 is expert 0, top-2 is {0, 1}
    assert_close(ops.switch_loss_forward(g), 4 * 1.0 * 0.25, atol=1e-7, rtol=1e-6)
    assert_close(ops.switch_loss_forward(g, k=2, counts="topk"), 4 * 0.25 * (0.5 + 0.5),
                 atol=1e-7, rtol=1e-6)
    assert_close(ops.switch_loss_forward(g, k=2, counts="topk"), ref_switch(g, 2, None, "topk"),
                 atol=1e-7, rtol=1e-6)


def test_large_logits_stay_finite():
    g = np.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 5.0]], np.float32)
    t = np.array([1, 0])
    assert_close(ops.z_loss_forward(g), ref_z(g), atol=0, rtol=1e-6)
    assert_close(ops.damex_loss_forward(g, t), ref_damex(g, t), atol=0, rtol=1e-6)
    for d in (ops.importance_loss_backward(g), ops.switch_loss_backward(g),
              ops.z_loss_backward(g), ops.damex_loss_backward(g, t),
              ops.load_loss_backward(g, np.zeros_like(g), SIGMA, 1)):
        assert np.isfinite(d).all()


def test_mixed_batch_of_datasets():
    """Images of 4 datasets in one batch, datasets 1 and 2 share expert 1."""
    B, Q, E = 5, 7, 3
    mapping = np.array([0, 1, 1, 2])
    image_dataset = np.array([2, 0, 3, 1, 2])
    token_dataset = np.repeat(image_dataset, Q)  # tokens laid out [B, Q]
    target = ops.dataset_to_expert(token_dataset, mapping, E)
    assert target.dtype == np.int64 and target.shape == (B * Q,)
    np.testing.assert_array_equal(target.reshape(B, Q), np.repeat(mapping[image_dataset][:, None], Q, 1))
    rng = np.random.default_rng(13)
    g = rng.normal(size=(B * Q, E)).astype(np.float32)
    mask = rng.random(B * Q) > 0.2
    # the per-token loop, as written in the paper
    lq = g.astype(np.float64) - lse(g.astype(np.float64))[:, None]
    terms = [-lq[b * Q + i, mapping[image_dataset[b]]] for b in range(B) for i in range(Q)
             if mask[b * Q + i]]
    assert_close(ops.damex_loss_forward(g, target, mask=mask), np.mean(terms), atol=1e-7, rtol=1e-6)
    q = np.exp(lq)
    onehot = np.eye(E)[target]
    expect = (q - onehot) * mask[:, None] / mask.sum()
    assert_close(ops.damex_loss_backward(g, target, mask=mask), expect, atol=1e-7, rtol=1e-5)


def test_same_bits_for_any_thread_count():
    T, E = 32768, 8  # above the OpenMP threshold
    g, noise, target = make(T=T, E=E, seed=14)
    before = _C.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            _C.set_num_threads(n)
            outs.append([(f(g, None), b(g, None, 1.0)) for f, b, _ in cases(noise, target).values()])
    finally:
        _C.set_num_threads(before[1])
    for (f1, d1), (f2, d2) in zip(*outs):
        assert f1 == f2
        np.testing.assert_array_equal(d1, d2)


# ---- bad input ----------------------------------------------------------

def test_bad_input():
    g, noise, target = make(T=6, E=4, seed=15)
    with pytest.raises(TypeError, match="logits"):
        ops.z_loss_forward(g.astype(np.int32))
    with pytest.raises(ValueError, match="logits"):
        ops.z_loss_forward(g[0])
    with pytest.raises(ValueError, match="logits"):
        ops.importance_loss_forward(np.zeros((3, 0), np.float32))
    with pytest.raises(TypeError, match="mask"):
        ops.switch_loss_forward(g, mask=np.ones(6, np.int64))
    with pytest.raises(ValueError, match="mask"):
        ops.switch_loss_forward(g, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="noise"):
        ops.load_loss_forward(g, noise[:5], SIGMA, 1)
    with pytest.raises(ValueError, match="noise"):
        ops.importance_loss_forward(g, probs="noisy")
    with pytest.raises(TypeError, match="expert_target"):
        ops.damex_loss_forward(g, target.astype(np.float32))
    with pytest.raises(ValueError, match="expert_target"):
        ops.damex_loss_forward(g, target[:5])
    for bad_name, call in [
        ("variance", lambda: ops.importance_loss_forward(g, variance="sample")),
        ("variance", lambda: ops.importance_loss_forward(g[:, :1], variance="unbiased")),
        ("probs", lambda: ops.importance_loss_forward(g, probs="soft")),
        ("counts", lambda: ops.switch_loss_forward(g, counts="all")),
        ("sigma", lambda: ops.load_loss_forward(g, noise, 0.0, 1)),
        ("sigma", lambda: ops.load_loss_backward(g, noise, -0.1, 1)),
        ("sigma", lambda: ops.load_loss_forward(g, noise, float("nan"), 1)),
        ("k", lambda: ops.load_loss_forward(g, noise, SIGMA, 0)),
        ("k", lambda: ops.load_loss_backward(g, noise, SIGMA, 5)),
        ("k", lambda: ops.switch_loss_forward(g, k=5, counts="topk")),
        ("expert_target", lambda: ops.damex_loss_forward(g, np.full(6, 4))),
        ("expert_target", lambda: ops.damex_loss_backward(g, np.full(6, -1))),
        ("grad", lambda: ops.z_loss_backward(g, grad=float("inf"))),
        ("dy", lambda: ops.z_loss_backward(g, dy=float("inf"))),
    ]:
        with pytest.raises(ValueError, match=bad_name):
            call()
    with pytest.raises(TypeError, match="k"):
        ops.load_loss_forward(g, noise, SIGMA, 1.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad):
    g, noise, target = make(T=6, E=4, seed=16)
    g2 = g.copy()
    g2[3, 1] = bad
    n2 = noise.copy()
    n2[2, 2] = bad
    for f, b, _ in cases(noise, target).values():
        with pytest.raises(ValueError, match="logits"):
            f(g2, None)
        with pytest.raises(ValueError, match="logits"):
            b(g2, None, 1.0)
    with pytest.raises(ValueError, match="noise"):
        ops.load_loss_forward(g, n2, SIGMA, 1)
    with pytest.raises(ValueError, match="noise"):
        ops.importance_loss_backward(g, noise=n2, probs="noisy")
    # the C kernels refuse NaN/inf by themselves too
    with pytest.raises(ValueError, match="NaN"):
        _C.z_loss_forward(g2, None, 6, 4)
    with pytest.raises(ValueError, match="NaN"):
        _C.load_loss_forward(g, n2, None, 6, 4, 1, SIGMA, 0)


def test_c_level_range_checks():
    g, noise, target = make(T=6, E=4, seed=17)
    with pytest.raises(ValueError, match="index"):
        _C.damex_loss_forward(g, np.full(6, 9, np.int64), None, 6, 4)
    for call in (lambda: _C.load_loss_forward(g, noise, None, 6, 4, 0, SIGMA, 0),
                 lambda: _C.load_loss_forward(g, noise, None, 6, 4, 1, 0.0, 0),
                 lambda: _C.importance_loss_forward(g, None, None, 6, 4, 7)):
        with pytest.raises(ValueError, match="invalid"):
            call()
    with pytest.raises(ValueError, match="elements"):
        _C.z_loss_forward(g, None, 7, 4)


def test_dataset_to_expert_bad_input():
    mapping = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="dataset_ids"):
        ops.dataset_to_expert(np.array([0, 3]), mapping, 2)
    with pytest.raises(ValueError, match="dataset_ids"):
        ops.dataset_to_expert(np.array([-1]), mapping, 2)
    with pytest.raises(ValueError, match="mapping"):
        ops.dataset_to_expert(np.array([0]), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="mapping"):
        ops.dataset_to_expert(np.array([0]), np.array([-1]), 2)
    with pytest.raises(TypeError, match="dataset_ids"):
        ops.dataset_to_expert(np.array([0.0]), mapping, 2)
    with pytest.raises(ValueError, match="num_experts"):
        ops.dataset_to_expert(np.array([0]), mapping, 0)
    np.testing.assert_array_equal(ops.dataset_to_expert(np.array([2, 0, 1, 2]), mapping, 2), [1, 0, 1, 1])


@pytest.mark.parametrize("name", NAMES)
def test_noncontiguous_float64_accepted_and_inputs_unchanged(name):
    g, noise, target = make(T=10, E=6, seed=18)
    big = np.zeros((6, 20), np.float64)
    big[:, ::2] = g.T  # g64 = big[:, ::2].T is a strided float64 view equal to g
    gv = big[:, ::2].T
    nbig = np.zeros((10, 12), np.float32)
    nbig[:, ::2] = noise
    nv = nbig[:, ::2]
    tbig = np.zeros(20, np.int64)
    tbig[::2] = target
    tv = tbig[::2]
    mask = np.ones(20, bool)
    mask[::2][[3, 7]] = False
    mv = mask[::2]
    check = unchanged(big, nbig, tbig, mask)
    fwd, bwd, _ = cases(nv, tv)[name]
    ref_fwd, ref_bwd, _ = cases(np.ascontiguousarray(noise), np.ascontiguousarray(target))[name]
    assert fwd(gv, mv) == ref_fwd(g, np.ascontiguousarray(mv))
    np.testing.assert_array_equal(bwd(gv, mv, 1.0), ref_bwd(g, np.ascontiguousarray(mv), 1.0))
    check()


def test_memory_flat_over_many_calls():
    g, noise, target = make(T=1024, E=8, seed=19)
    mask = np.arange(1024) % 9 != 0
    fns = list(cases(noise, target).values())

    def every_loss():
        for f, b, _ in fns:
            f(g, mask)
            b(g, mask, 1.0)
    # 10,000 forward and 10,000 backward calls in all
    assert_memory_flat(every_loss, calls=10_000 // len(fns))
