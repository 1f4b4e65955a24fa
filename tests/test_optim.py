"""AdamW against torch.optim.AdamW over several steps, global-norm clipping
against torch.nn.utils.clip_grad_norm_, ops.MultiStepLR against torch MultiStepLR, a float64
reference for the update, bad input and flat memory."""
import math

import numpy as np
import pytest

from damex import ops
from helpers import assert_close, assert_memory_flat, torch_or_skip, unchanged
from damex.testing.reference import adamw as ref_adamw

SHAPES = [(1,), (7,), (4, 5), (3, 2, 33)]


def run_both(torch, steps, lr, betas, eps, wd, lrs=None, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    tparams = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    opt = torch.optim.AdamW(tparams, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for step in range(1, steps + 1):
        step_lr = lr if lrs is None else lrs[step - 1]
        for group in opt.param_groups:
            group["lr"] = step_lr
        for p, (m, v), tp in zip(params, moments, tparams):
            g = rng.normal(0, 0.1 * step, size=p.shape).astype(np.float32)
            tp.grad = torch.tensor(g)
            check = unchanged(g)
            ops.adamw_step(p, g, m, v, step, step_lr, betas[0], betas[1], eps, wd)
            check()
        opt.step()
    return params, moments, tparams, opt


@pytest.mark.parametrize("wd", [0.0, 1e-4, 0.05])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.9), (0.0, 0.5)])
def test_adamw_matches_torch_over_steps(wd, betas):
    torch = torch_or_skip()
    params, moments, tparams, opt = run_both(torch, 6, 1e-3, betas, 1e-8, wd)
    for p, (m, v), tp in zip(params, moments, tparams):
        state = opt.state[tp]
        # float32 rounding of the same operations; the remaining ulps come from
        # PyTorch's MKL sqrt, which is not correctly rounded
        assert_close(p, tp.detach().numpy(), atol=1e-7, rtol=1e-6, name="param")
        assert_close(m, state["exp_avg"].numpy(), atol=1e-9, rtol=1e-6, name="exp_avg")
        assert_close(v, state["exp_avg_sq"].numpy(), atol=1e-12, rtol=1e-6, name="exp_avg_sq")


def test_adamw_with_a_changing_lr_matches_torch():
    torch = torch_or_skip()
    sched = ops.MultiStepLR(2e-3, [2, 4], 0.5)
    lrs = [sched.lr(t) for t in range(6)]
    params, _, tparams, _ = run_both(torch, 6, 2e-3, (0.9, 0.999), 1e-6, 1e-2, lrs=lrs, seed=3)
    for p, tp in zip(params, tparams):
        assert_close(p, tp.detach().numpy(), atol=1e-7, rtol=1e-6)


def test_adamw_matches_float64_reference():
    rng = np.random.default_rng(4)
    p = rng.normal(size=50).astype(np.float32)
    m = (0.1 * rng.normal(size=50)).astype(np.float32)
    v = (0.01 * rng.uniform(size=50)).astype(np.float32)
    g = rng.normal(size=50).astype(np.float32)
    want = ref_adamw(p, g, m, v, 7, 1e-2, 0.9, 0.99, 1e-8, 0.1)
    ops.adamw_step(p, g, m, v, 7, 1e-2, 0.9, 0.99, 1e-8, 0.1)
    for got, ref in zip((p, m, v), want):
        assert_close(got, ref, atol=1e-7, rtol=2e-6)


def test_adamw_large_array_uses_threads_and_agrees():
    rng = np.random.default_rng(5)
    n = 100_003
    p = rng.normal(size=n).astype(np.float32)
    g = rng.normal(size=n).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    pieces = [(p[i:i + 1000].copy(), m[i:i + 1000].copy(), v[i:i + 1000].copy()) for i in (0, 99_003)]
    ops.adamw_step(p, g, m, v, 1, 1e-3)
    for (ps, ms, vs), i in zip(pieces, (0, 99_003)):
        ops.adamw_step(ps, g[i:i + 1000], ms, vs, 1, 1e-3)
        np.testing.assert_array_equal(ps, p[i:i + 1000])
        np.testing.assert_array_equal(vs, v[i:i + 1000])


# ---- norms and clipping -----------------------------------------------------

def test_grad_global_norm_reference_and_determinism():
    rng = np.random.default_rng(6)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(3,), (100_001,), (20, 30)]]
    want = math.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    got = ops.grad_global_norm(grads)
    assert isinstance(got, float)
    assert_close(got, want, atol=0, rtol=1e-12)
    assert ops.grad_global_norm(grads) == got
    assert ops.grad_global_norm([None, grads[0]]) == ops.grad_global_norm(grads[0])
    assert ops.grad_global_norm([]) == 0.0


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6, 0.0])
def test_clip_grad_norm_matches_torch(max_norm):
    torch = torch_or_skip()
    rng = np.random.default_rng(7)
    grads = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.tensor(g)
    check = unchanged(*grads)
    total, scale = ops.clip_grad_norm(grads, max_norm)
    check()
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    assert_close(total, ttotal.item(), atol=0, rtol=1e-6)
    assert 0.0 <= scale <= 1.0
    for g, tp in zip(grads, tparams):
        assert_close(g * np.float32(scale), tp.grad.numpy(), atol=1e-9, rtol=1e-6)


def test_clip_grad_norm_nonfinite():
    g = [np.array([1.0, np.inf], np.float32)]
    total, scale = ops.clip_grad_norm(g, 1.0)
    assert total == math.inf and scale == 0.0
    total, scale = ops.clip_grad_norm([np.array([np.nan], np.float32)], 1.0)
    assert math.isnan(total) and math.isnan(scale)
    with pytest.raises(ValueError, match="grads: the total gradient norm is inf"):
        ops.clip_grad_norm(g, 1.0, error_if_nonfinite=True)


# ---- MultiStepLR (ops) --------------------------------------------------------------

@pytest.mark.parametrize("milestones,gamma", [([5, 10, 20], 0.1), ([3, 3, 8], 0.5), ([0, 4], 0.7), ([], 0.1)])
def test_step_lr_matches_multisteplr(milestones, gamma):
    torch = torch_or_skip()
    base = 1e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)
    ours = ops.MultiStepLR(base, milestones, gamma)
    for epoch in range(25):
        assert_close(ours.lr(epoch), opt.param_groups[0]["lr"], atol=0, rtol=1e-12, name=f"epoch {epoch}")
        assert_close(ours.get_lr(), opt.param_groups[0]["lr"], atol=0, rtol=1e-12)
        opt.step()
        sched.step()
        ours.step()


def test_step_lr_state_dict_roundtrip():
    s = ops.MultiStepLR(2.0, [7, 3], 0.5)
    for _ in range(5):
        s.step()
    state = s.state_dict()
    assert state == {"base_lr": 2.0, "milestones": [3, 7], "gamma": 0.5, "last_epoch": 5}
    assert all(isinstance(v, (int, float)) for v in state.values() if not isinstance(v, list))
    t = ops.MultiStepLR(1.0, [], 0.1)
    t.load_state_dict(state)
    assert t.state_dict() == state and t.get_lr() == s.get_lr() == 1.0
    assert t.step() == s.step() == 1.0
    with pytest.raises(ValueError, match="gamma"):
        t.load_state_dict({**state, "gamma": -1.0})
    assert t.state_dict()["gamma"] == 0.5   # a refused state leaves the old one


# ---- bad input, memory ------------------------------------------------------

def test_adamw_bad_input_names_the_argument_and_leaves_state():
    p = np.ones(4, np.float32)
    g = np.ones(4, np.float32)
    m = np.zeros(4, np.float32)
    v = np.zeros(4, np.float32)
    check = unchanged(p, g, m, v)
    cases = [
        (dict(lr=-1e-3), ValueError, "lr: must be >= 0"),
        (dict(lr=math.nan), ValueError, "lr: must be finite"),
        (dict(beta1=1.0), ValueError, r"beta1: must be in \[0, 1\)"),
        (dict(beta2=-0.1), ValueError, r"beta2: must be in \[0, 1\)"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(step=0), ValueError, "step: must be >= 1"),
        (dict(step=1.5), TypeError, "step"),
    ]
    for kw, exc, msg in cases:
        args = dict(step=1, lr=1e-3)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            ops.adamw_step(p, g, m, v, **args)
    with pytest.raises(TypeError, match="param: expected dtype float32"):
        ops.adamw_step(p.astype(np.float64), g, m, v, 1, 1e-3)
    with pytest.raises(TypeError, match="exp_avg: expected a numpy.ndarray"):
        ops.adamw_step(p, g, [0.0] * 4, v, 1, 1e-3)
    with pytest.raises(ValueError, match="exp_avg_sq: expected shape"):
        ops.adamw_step(p, g, m, np.zeros(5, np.float32), 1, 1e-3)
    with pytest.raises(ValueError, match="grad: expected shape"):
        ops.adamw_step(p, np.ones(3, np.float32), m, v, 1, 1e-3)
    with pytest.raises(TypeError, match="grad"):
        ops.adamw_step(p, np.ones(4, np.int32), m, v, 1, 1e-3)
    with pytest.raises(ValueError, match="param: expected a C-contiguous"):
        ops.adamw_step(np.ones((4, 2), np.float32).T, np.ones((2, 4)), np.zeros((2, 4), np.float32),
                       np.zeros((2, 4), np.float32), 1, 1e-3)
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq: must not share memory"):
        ops.adamw_step(p, g, m, m, 1, 1e-3)
    with pytest.raises(ValueError, match="param and grad: must not share memory"):
        ops.adamw_step(p, p, m, v, 1, 1e-3)
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="param: array is not writeable"):
        ops.adamw_step(ro, g, m, v, 1, 1e-3)
    check()


def test_direct_binding_rejects_bad_hyperparameters():
    from damex import _C
    a = [np.zeros(3, np.float32) for _ in range(4)]
    with pytest.raises(ValueError, match="invalid argument"):
        _C.adamw_step(*a, 1, -1.0, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(ValueError, match="distinct"):
        _C.adamw_step(a[0], a[0], a[1], a[2], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_clip_and_steplr_bad_input():
    with pytest.raises(ValueError, match="max_norm"):
        ops.clip_grad_norm([np.ones(3, np.float32)], -1.0)
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        ops.grad_global_norm([np.ones(3, np.float32), np.ones(3, np.int64)])
    with pytest.raises(ValueError, match="gamma"):
        ops.MultiStepLR(1e-3, [2], 0.0)
    with pytest.raises(ValueError, match="milestones"):
        ops.MultiStepLR(1e-3, [-2], 0.1)
    with pytest.raises(TypeError, match="milestones"):
        ops.MultiStepLR(1e-3, [2.5], 0.1)
    with pytest.raises(ValueError, match="base_lr"):
        ops.MultiStepLR(-1e-3, [2], 0.1)
    with pytest.raises(ValueError, match="epoch_or_step"):
        ops.MultiStepLR(1e-3, [2], 0.1).lr(-1)


def test_memory_flat_over_many_calls():
    rng = np.random.default_rng(8)
    p = rng.normal(size=16).astype(np.float32)
    g = rng.normal(size=16).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    state = {"step": 0}
    sched = ops.MultiStepLR(1e-3, [100], 0.1)

    def step():
        state["step"] += 1
        total, scale = ops.clip_grad_norm([g, g], 1.0)
        ops.adamw_step(p, g * np.float32(scale), m, v, state["step"], sched.lr(state["step"]))
    assert_memory_flat(step, calls=10_000)
    assert np.isfinite(p).all()
