"""Multi-scale deformable attention: values against a float64 NumPy reference of
bilinear sampling with zero padding (grid_sample, align_corners=False), gradients by
central differences, and parity with the grid_sample reference of Deformable-DETR
(`ms_deform_attn_core_pytorch`) for values and all three gradients."""
import numpy as np
import pytest

from damex import ops
from damex._lib import _C
from helpers import assert_close, assert_memory_flat, numeric_grad, torch_or_skip, unchanged
from damex.testing import torch_twins
from damex.testing.reference import ms_deform_attn as ref_forward


def level_index(shapes):
    shapes = np.asarray(shapes, np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), int(sizes.sum())


def make(rng, N, Lq, M, D, shapes, P, lo=-0.2, hi=1.2):
    shapes, start, S = level_index(shapes)
    value = rng.normal(size=(N, S, M, D)).astype(np.float32)
    loc = rng.uniform(lo, hi, size=(N, Lq, M, len(shapes), P, 2)).astype(np.float32)
    attw = rng.uniform(0, 1, size=(N, Lq, M, len(shapes), P)).astype(np.float32)
    return value, shapes, start, loc, attw


def special_locations(loc, shapes, rng):
    """Overwrite some locations with the cases that matter: the map border (0, 1),
    pixel centres, x == -1 and x == W (exactly where float32 can say so exactly,
    else just inside: the location gradient jumps there, and a 1-ulp difference in
    x = loc W - 0.5 between two float32 formulas would pick either side),
    far off the map."""
    flat = loc.reshape(-1, loc.shape[3], loc.shape[4], 2)
    for l, (H, W) in enumerate(shapes.tolist()):
        cases = [0.0, 1.0, 0.5 / W, 1 - 0.5 / W, -3.0, 5.0, -0.75 / W, 1 + 0.25 / W,
                 -0.5 / W + 1e-3 / W, (W + 0.5) / W - 1e-3 / W]
        if W & (W - 1) == 0 and H == W:  # exact in float32: x == -1 and x == W
            cases += [-0.5 / W, (W + 0.5) / W]
        for j, c in enumerate(cases):
            r = rng.integers(flat.shape[0])
            p = rng.integers(flat.shape[2])
            flat[r, l, p, j % 2] = c
    return loc


CASES = [  # N, Lq, M, D, shapes, P
    (2, 7, 2, 4, [(4, 5)], 1),
    (1, 5, 3, 8, [(6, 4), (3, 2)], 2),
    (2, 9, 2, 32, [(8, 8), (4, 4), (2, 2)], 3),
    (2, 6, 4, 5, [(7, 9), (4, 5), (2, 3), (1, 1)], 4),
    (1, 1, 1, 3, [(1, 1)], 2),
    (1, 4, 2, 64, [(5, 3), (1, 1)], 4),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case):
    rng = np.random.default_rng(0)
    value, shapes, start, loc, attw = make(rng, *case)
    loc = special_locations(loc, shapes, rng)
    got = ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
    assert got.dtype == np.float32 and got.shape == (case[0], case[1], case[2] * case[3])
    assert_close(got, ref_forward(value, shapes, loc, attw), atol=1e-5, rtol=1e-5)


def away_from_pixel_edges(loc, shapes, margin=0.05):
    """Move every location so that x = loc W - 0.5 (and y) is >= margin away from an
    integer, where bilinear sampling is differentiable."""
    loc = np.array(loc, np.float64)
    for l, (H, W) in enumerate(shapes.tolist()):
        for k, size in ((0, W), (1, H)):
            x = loc[:, :, :, l, :, k] * size - 0.5
            frac = x - np.floor(x)
            frac = np.clip(frac, margin, 1 - margin)
            loc[:, :, :, l, :, k] = (np.floor(x) + frac + 0.5) / size
    return loc


@pytest.mark.parametrize("case", [CASES[1], (1, 4, 2, 3, [(5, 6), (4, 5), (2, 3), (1, 1)], 4),
                                  (1, 3, 2, 3, [(3, 4), (1, 1)], 2)])
def test_backward_matches_central_differences(case):
    rng = np.random.default_rng(1)
    value, shapes, start, loc, attw = make(rng, *case, lo=-0.4, hi=1.4)
    loc = away_from_pixel_edges(loc, shapes).astype(np.float32)
    value64, loc64, attw64 = (a.astype(np.float64) for a in (value, loc, attw))
    gout = rng.normal(size=(case[0], case[1], case[2] * case[3]))
    gv, gl, ga = ops.ms_deform_attn_backward(gout.astype(np.float32), value, shapes, start, loc, attw)
    num_v = numeric_grad(lambda v: (ref_forward(v, shapes, loc64, attw64) * gout).sum(), value64)
    num_l = numeric_grad(lambda x: (ref_forward(value64, shapes, x, attw64) * gout).sum(), loc64)
    num_a = numeric_grad(lambda a: (ref_forward(value64, shapes, loc64, a) * gout).sum(), attw64)
    assert_close(gv, num_v, atol=2e-5, rtol=1e-4, name="grad_value")
    assert_close(gl, num_l, atol=1e-4, rtol=1e-4, name="grad_sampling_locations")
    assert_close(ga, num_a, atol=2e-5, rtol=1e-4, name="grad_attention_weights")
    assert (gl[np.abs(loc64 - 0.5).max(-1) > 3] == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_parity_with_torch_grid_sample(case):
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    value, shapes, start, loc, attw = make(rng, *case)
    loc = special_locations(loc, shapes, rng)
    gout = rng.normal(size=(case[0], case[1], case[2] * case[3])).astype(np.float32)
    # float64 torch on the very float32 inputs: the truth grid_sample defines
    tv, tl, ta = (torch.tensor(a, dtype=torch.float64, requires_grad=True)
                  for a in (value, loc, attw))
    tout = torch_twins.ms_deform_attn(tv, shapes, tl, ta)
    tout.backward(torch.tensor(gout, dtype=torch.float64))
    out = ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
    gv, gl, ga = ops.ms_deform_attn_backward(gout, value, shapes, start, loc, attw)
    assert_close(out, tout.detach().numpy(), atol=1e-5, rtol=1e-5, name="out")
    assert_close(gv, tv.grad.numpy(), atol=1e-5, rtol=1e-5, name="grad_value")
    # the location gradient scales with W, H (up to 9 here): relative to that
    assert_close(gl, tl.grad.numpy(), atol=1e-4, rtol=1e-4, name="grad_sampling_locations")
    assert_close(ga, ta.grad.numpy(), atol=1e-5, rtol=1e-5, name="grad_attention_weights")


def test_points_on_and_off_the_border():
    """x = loc W - 0.5: loc 0 and 1 sit half a pixel inside the border; x == -1 keeps
    grid_sample's one-sided gradient; x >= W and x < -1 give 0 and gradient 0."""
    W = H = 4
    shapes, start, S = level_index([(H, W)])
    value = np.arange(1, S + 1, dtype=np.float32).reshape(1, S, 1, 1)
    cases = {  # x-location -> (value at y = centre of row 1, d/dloc_x)
        0.0: (0.5 * 5, 5 * W), 1.0: (0.5 * 8, -8 * W),
        -0.5 / W: (0.0, 5 * W), (W + 0.5) / W: (0.0, 0.0), -3.0: (0.0, 0.0), 7.0: (0.0, 0.0),
    }
    y = 1.5 / H  # row 1 centre: y = 1 exactly
    for lx, (want, want_grad) in cases.items():
        loc = np.array([lx, y], np.float32).reshape(1, 1, 1, 1, 1, 2)
        attw = np.ones((1, 1, 1, 1, 1), np.float32)
        out = ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
        _, gl, _ = ops.ms_deform_attn_backward(np.ones_like(out), value, shapes, start, loc, attw)
        assert out.item() == pytest.approx(want, abs=1e-6), lx
        assert gl[..., 0].item() == pytest.approx(want_grad, abs=1e-5), lx


def test_nonfinite_locations_sample_nothing():
    rng = np.random.default_rng(3)
    value, shapes, start, loc, attw = make(rng, 1, 3, 2, 4, [(3, 3)], 2)
    loc[0, 1, 0, 0, 1, 0] = np.nan
    loc[0, 2, 1, 0, 0, 1] = np.inf
    out = ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
    gv, gl, ga = ops.ms_deform_attn_backward(np.ones_like(out), value, shapes, start, loc, attw)
    assert np.isfinite(out).all() and np.isfinite(gv).all() and np.isfinite(gl).all()
    assert gl[0, 1, 0, 0, 1].tolist() == [0, 0] and ga[0, 1, 0, 0, 1] == 0


def test_thread_count_does_not_change_bits():
    rng = np.random.default_rng(4)
    # large enough for the kernels to go parallel (csrc/kernels/msda.c parallel_worth_it)
    value, shapes, start, loc, attw = make(rng, 2, 400, 3, 16, [(6, 6), (3, 3)], 4)
    gout = rng.normal(size=(2, 400, 48)).astype(np.float32)
    before = _C.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            _C.set_num_threads(t)
            res.append((ops.ms_deform_attn_forward(value, shapes, start, loc, attw),)
                       + ops.ms_deform_attn_backward(gout, value, shapes, start, loc, attw))
    finally:
        _C.set_num_threads(before[1])
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_named():
    rng = np.random.default_rng(5)
    value, shapes, start, loc, attw = make(rng, 1, 2, 2, 3, [(2, 3), (1, 2)], 2)
    f = ops.ms_deform_attn_forward
    with pytest.raises(TypeError, match="value"):
        f(value.astype(np.int32), shapes, start, loc, attw)
    with pytest.raises(TypeError, match="spatial_shapes"):
        f(value, shapes.astype(np.float32), start, loc, attw)
    with pytest.raises(ValueError, match="value"):
        f(value[0], shapes, start, loc, attw)
    with pytest.raises(ValueError, match="spatial_shapes"):
        f(value, np.array([[2, 3], [1, 3]]), start, loc, attw)  # sum H*W != S
    with pytest.raises(ValueError, match="spatial_shapes"):
        f(value, np.array([[2, 3], [2, 1], [0, 5]]), np.array([0, 6, 8]), loc, attw)
    with pytest.raises(ValueError, match="level_start_index"):
        f(value, shapes, np.array([0, 5]), loc, attw)
    with pytest.raises(ValueError, match="level_start_index"):
        f(value, shapes, np.array([0]), loc, attw)
    with pytest.raises(ValueError, match="sampling_locations"):
        f(value, shapes, start, loc[:, :, :1], attw)
    with pytest.raises(ValueError, match="sampling_locations"):
        f(value, shapes, start, loc[..., :1], attw)
    with pytest.raises(ValueError, match="attention_weights"):
        f(value, shapes, start, loc, attw[..., :1])
    with pytest.raises(ValueError, match="^dy: "):
        ops.ms_deform_attn_backward(np.zeros((1, 2, 5), np.float32), value, shapes, start, loc, attw)
    with pytest.raises(ValueError):  # a direct call into _C with a wrong level table
        _C.ms_deform_attn_forward(np.empty((1, 2, 6), np.float32), value, shapes,
                                  np.array([0, 4]), loc, attw, 1, 8, 2, 3, 2, 2, 2)


def test_inputs_not_modified_and_noncontiguous_accepted():
    rng = np.random.default_rng(6)
    value, shapes, start, loc, attw = make(rng, 2, 5, 2, 4, [(3, 3), (2, 2)], 2)
    gout = rng.normal(size=(2, 5, 8)).astype(np.float32)
    check = unchanged(value, shapes, start, loc, attw, gout)
    vt = np.ascontiguousarray(value.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # a view
    assert not vt.flags.c_contiguous
    out = ops.ms_deform_attn_forward(vt, shapes, start, loc.astype(np.float64), attw)
    ops.ms_deform_attn_backward(gout, vt, shapes, start, loc, attw)
    check()
    np.testing.assert_array_equal(out, ops.ms_deform_attn_forward(value, shapes, start, loc, attw))


def test_memory_flat_over_many_calls():
    rng = np.random.default_rng(7)
    value, shapes, start, loc, attw = make(rng, 1, 4, 2, 4, [(3, 3), (1, 2)], 2)
    gout = np.ones((1, 4, 8), np.float32)

    def step():
        ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
        ops.ms_deform_attn_backward(gout, value, shapes, start, loc, attw)
    assert_memory_flat(step)
