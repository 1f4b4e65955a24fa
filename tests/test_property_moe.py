"""Property tests (hypothesis) of the MoE families: router (top-k, capacity, BPR,
normalisation, masks), the whole layer (dispatch, expert FFN, combine) and the
routing losses; random T (0 and 1 included where allowed), E, k, options; values
against damex.testing.reference; inputs never modified."""
import numpy as np

from property_support import Unchanged, close, dims, f32_arrays, hnp, layouts, reference, st
from hypothesis import assume, given

from damex import ops

NORMS = (False, True, "before_drop", "after_drop")


def _distinct_rows(p, gap=1e-4):
    """No two probabilities of a row within `gap`: the float32 kernel and the float64
    reference then rank them alike (ties are tested by hand in test_router.py)."""
    if p.shape[1] < 2 or p.shape[0] == 0:
        return True
    s = np.sort(p, axis=1)
    return bool((np.diff(s, axis=1) > gap).all())


@st.composite
def router_cases(draw, min_t=1):
    T, D, E = draw(dims(min_t, 9)), draw(dims(1, 4)), draw(dims(1, 6))
    k = draw(dims(1, E))
    x = draw(layouts(draw(f32_arrays((T, D), -2, 2))))
    w = draw(f32_arrays((D, E), -2, 2))
    noise = draw(st.none() | f32_arrays((T, E), -0.5, 0.5))
    mask = draw(st.none() | hnp.arrays(bool, (T,)))
    opts = dict(k=k, noise=noise, mask=mask, normalize=draw(st.sampled_from(NORMS)),
                capacity_factor=draw(st.none() | st.sampled_from([0.25, 0.5, 1.0, 1.25, 4.0])),
                bpr=draw(st.booleans()))
    return x, w, opts


@given(router_cases())
def test_router(case):
    x, w, opts = case
    keep = Unchanged(x, w, opts["noise"], opts["mask"])
    res = ops.router_forward(x, w, **opts)
    ref = reference.router(x, w, bpr_probs=res.probs, **opts)
    assume(_distinct_rows(ref["probs"]) and _distinct_rows(np.asarray(res.probs, np.float64)))
    close(res.probs, ref["probs"], 2e-6, 2e-5, "probs")
    for f in ("expert_index", "slot", "expert_count", "offset"):
        np.testing.assert_array_equal(getattr(res, f), ref[f], err_msg=f)
    assert res.capacity == ref["capacity"]
    close(res.combine_weight, ref["combine_weight"], 2e-6, 2e-5, "combine_weight")
    dcw = np.ones_like(res.combine_weight)
    assert np.isfinite(ops.router_backward(dcw, res)).all()
    keep.check()


@given(st.data(), router_cases(), dims(1, 5), st.sampled_from(ops.ACTIVATIONS))
def test_moe_layer(data, case, F, act):
    x, wr, opts = case
    D, E = wr.shape
    w1, b1 = data.draw(f32_arrays((E, D, F), -1, 1)), data.draw(f32_arrays((E, F), -1, 1))
    w2, b2 = data.draw(f32_arrays((E, F, D), -1, 1)), data.draw(f32_arrays((E, D), -1, 1))
    keep = Unchanged(x, wr, w1, b1, w2, b2, opts["noise"], opts["mask"])
    y, state = ops.moe_forward(x, wr, w1, b1, w2, b2, activation=act, **opts)
    noise = 0.0 if opts["noise"] is None else opts["noise"]
    want = reference.moe_layer(x, wr, w1, b1, w2, b2, state.router, act, noise, opts["normalize"])
    close(y, want, 1e-4, 1e-4, "moe y")
    grads = ops.moe_backward(data.draw(f32_arrays(y.shape)), state)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    keep.check()


@st.composite
def loss_cases(draw):
    T, E = draw(dims(0, 8)), draw(dims(2, 6))
    k = draw(dims(1, E - 1))
    g = draw(layouts(draw(f32_arrays((T, E), -5, 5))))
    noise = draw(f32_arrays((T, E), -0.5, 0.5))
    target = draw(hnp.arrays(np.int64, (T,), elements=st.integers(0, E - 1)))
    mask = draw(st.none() | hnp.arrays(bool, (T,)))
    return g, noise, target, mask, k


@given(loss_cases(), st.sampled_from(["population", "unbiased"]), st.sampled_from(["clean", "noisy"]))
def test_routing_losses(case, variance, probs):
    g, noise, target, mask, k = case
    keep = Unchanged(g, noise, target, mask)
    sigma = 0.25
    got = {
        "importance": ops.importance_loss_forward(g, mask=mask, noise=noise, probs=probs,
                                                  variance=variance),
        "z": ops.z_loss_forward(g, mask=mask),
        "damex": ops.damex_loss_forward(g, target, mask=mask),
    }
    want = {
        "importance": reference.importance_loss(g, mask, noise, probs, variance),
        "z": reference.z_loss(g, mask),
        "damex": reference.damex_loss(g, target, mask),
    }
    gn = np.asarray(g, np.float64) + noise
    if _distinct_rows(gn, 1e-4):  # the k-th largest decides the load; no ties
        got["load"] = ops.load_loss_forward(g, noise, sigma, k, mask=mask, variance=variance)
        want["load"] = reference.load_loss(g, noise, sigma, k, mask, variance)
    if _distinct_rows(np.asarray(g, np.float64), 1e-4):
        for counts in ("top1", "topk"):
            got["switch-" + counts] = ops.switch_loss_forward(g, k=k, mask=mask, counts=counts)
            want["switch-" + counts] = reference.switch_loss(g, k, mask, counts)
    for name in got:
        close(got[name], want[name], 1e-5, 1e-4, name)
    for grad in (ops.z_loss_backward(g, mask=mask), ops.damex_loss_backward(g, target, mask=mask),
                 ops.importance_loss_backward(g, mask=mask, noise=noise, probs=probs,
                                              variance=variance)):
        assert grad.shape == g.shape and np.isfinite(grad).all()
    keep.check()
