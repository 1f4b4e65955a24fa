"""Regression tests for the kernel- and ops-level defects of issue 12 (one or
more per defect, each failing before its fix), named after the defect."""
import itertools
import math

import numpy as np
import pytest

from damex import ops
from damex.testing.reference import conv2d as ref_conv2d
from helpers import assert_close, torch_or_skip

ALGORITHMS = ("im2col", "shifted", "direct", "winograd", "auto")


# ---- 12.1: conv2d when the stride exceeds the padded image ------------------


def test_conv2d_column_stride_past_padded_width_issue12_1():
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 4, 1)
    w = np.ones((1, 1, 1, 3), np.float32)
    for algorithm in ("im2col", "shifted", "direct", "auto"):
        y = ops.conv2d_forward(x, w, None, stride=(1, 3), padding=(0, 1), algorithm=algorithm)
        np.testing.assert_array_equal(y.ravel(), [1, 2, 3, 4], err_msg=algorithm)


def _grid():
    # strides larger than the padded sizes on either axis, odd shapes, 1 and 9 channels
    for h, wd, kh, kw, sh, sw, ph, pw, cin in itertools.product(
            [1, 2, 5], [1, 4], [1, 3], [1, 3], [1, 3, 5], [1, 3, 4], [0, 1], [0, 1, 3], [1, 9]):
        if h + 2 * ph >= kh and wd + 2 * pw >= kw:
            yield h, wd, kh, kw, sh, sw, ph, pw, cin


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv2d_strides_and_paddings_all_algorithms_issue12_1(algorithm):
    torch = torch_or_skip()
    rng = np.random.default_rng(1)
    for h, wd, kh, kw, sh, sw, ph, pw, cin in _grid():
        if algorithm == "winograd" and (kh, kw, sh, sw) != (3, 3, 1, 1):
            continue
        x = rng.standard_normal((2, cin, h, wd)).astype(np.float32)
        w = rng.standard_normal((3, cin, kh, kw)).astype(np.float32)
        stride, padding = (sh, sw), (ph, pw)
        name = f"{algorithm} x{x.shape} w{w.shape} stride {stride} padding {padding}"
        y = ops.conv2d_forward(x, w, None, stride, padding, algorithm=algorithm)
        assert_close(y, ref_conv2d(x, w, None, stride, padding), atol=1e-4, name=name)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx, dw, _ = ops.conv2d_backward(dy, x, w, stride, padding, False, algorithm=algorithm)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
        torch.nn.functional.conv2d(xt, wt, None, stride, padding).backward(
            torch.tensor(dy, dtype=torch.float64))
        assert_close(dx, xt.grad.numpy(), atol=1e-4, name="dx " + name)
        assert_close(dw, wt.grad.numpy(), atol=1e-4, name="dw " + name)


@pytest.mark.parametrize("stride,padding", [((1, 3), (0, 1)), ((3, 1), (1, 0)), ((2, 4), (1, 2))])
def test_conv2d_auto_large_plane_strided_past_image_issue12_1(stride, padding):
    # output planes of 512+ pixels and Cin >= 8: AUTO's own kernels (direct
    # forward, dw by conv_dw.c, dx as forward convolutions in conv_dx.c)
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    tall = stride[1] > stride[0]
    x = rng.standard_normal((1, 8, 600, 1) if tall else (1, 8, 1, 600)).astype(np.float32)
    w = rng.standard_normal((4, 8, 1, 3) if tall else (4, 8, 3, 1)).astype(np.float32)
    if stride == (2, 4):
        x = rng.standard_normal((1, 8, 1200, 2)).astype(np.float32)
        w = rng.standard_normal((4, 8, 2, 5)).astype(np.float32)
    y = ops.conv2d_forward(x, w, None, stride, padding)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = ops.conv2d_backward(dy, x, w, stride, padding)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, None, stride, padding)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt.detach().numpy(), atol=1e-4, name="y")
    assert_close(dx, xt.grad.numpy(), atol=1e-4, name="dx")
    assert_close(dw, wt.grad.numpy(), atol=2e-3, name="dw")
    assert_close(db, dy.sum(axis=(0, 2, 3)), atol=1e-3, name="db")


# ---- 12.3: relu keeps NaN ---------------------------------------------------


SPECIALS = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, -1e38, 1e38, -1e13, 1e13,
                     -3e11, 2e11, -11.0, 11.0, -1.0, 1.0], np.float32)


def test_relu_keeps_nan_as_torch_issue12_3():
    torch = torch_or_skip()
    xt = torch.tensor(SPECIALS, requires_grad=True)
    yt = torch.relu(xt)
    yt.backward(torch.ones_like(xt))
    y = ops.activation_forward(SPECIALS, "relu")
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(np.signbit(y), np.signbit(yt.detach().numpy()))
    dx = ops.activation_backward(np.ones_like(SPECIALS), SPECIALS, "relu")
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def test_moe_expert_ffn_relu_keeps_nan_issue12_3():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    x[0, 0] = np.nan
    w1 = rng.standard_normal((1, 4, 3)).astype(np.float32)
    b1 = np.zeros((1, 3), np.float32)
    w2 = rng.standard_normal((1, 3, 4)).astype(np.float32)
    b2 = np.zeros((1, 4), np.float32)
    out = ops.expert_ffn_forward(x, np.array([2]), w1, b1, w2, b2, activation="relu")
    y = out[0] if isinstance(out, tuple) else out
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()


# ---- 12.18: GELU at large |x| -------------------------------------------------


@pytest.mark.parametrize("activation,approximate", [("gelu_tanh", "tanh"), ("gelu", "none")])
def test_gelu_saturates_at_large_abs_x_issue12_18(activation, approximate):
    torch = torch_or_skip()
    x = SPECIALS[np.isfinite(SPECIALS) & (np.abs(SPECIALS) < 1e12)]  # where torch is finite
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.gelu(xt, approximate=approximate)
    yt.backward(torch.ones_like(xt))
    assert_close(ops.activation_forward(x, activation), yt.detach().numpy(), atol=1e-6, name="y")
    assert_close(ops.activation_backward(np.ones_like(x), x, activation), xt.grad.numpy(),
                 atol=1e-6, name="dx")
    big = np.array([-np.inf, -1e38, -1e20, -1e13, -2e11, 2e11, 1e13, 1e20, 1e38, np.inf],
                   np.float32)
    d = ops.activation_backward(np.ones_like(big), big, activation)
    np.testing.assert_array_equal(d, (big > 0).astype(np.float32))
    y = ops.activation_forward(big[1:-1], activation)
    np.testing.assert_array_equal(y, np.where(big[1:-1] > 0, big[1:-1], 0))


# ---- 12.19: layer norm of rows of large magnitude -----------------------------


@pytest.mark.parametrize("scale", [1.0, 1e18, 1e20, 1e30, 1e37, 1.5e38])
def test_layer_norm_large_rows_normalised_issue12_19(scale):
    torch = torch_or_skip()
    rng = np.random.default_rng(4)
    x = np.clip(rng.standard_normal((3, 64)) * scale, -3.4e38, 3.4e38).astype(np.float32)
    g = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    y, mean, rstd = ops.layer_norm_forward(x, g, b)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in (("x", x), ("g", g), ("b", b))}
    ref = torch.nn.functional.layer_norm(t["x"], (64,), t["g"], t["b"]).numpy()
    assert_close(y, ref, atol=2e-6, name="y")
    assert_close(mean, x.astype(np.float64).mean(-1), rtol=1e-5, name="mean")


def test_layer_norm_non_finite_rows_give_nan_issue12_19():
    x = np.array([[np.nan, 1, 2], [np.inf, 1, 2], [1, 2, 3]], np.float32)
    y, _, _ = ops.layer_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    assert np.isnan(y[:2]).all() and np.isfinite(y[2]).all()


# ---- 12.11: 0-d arrays keep their shape ---------------------------------------


def test_zero_d_arrays_keep_shape_issue12_11():
    x = np.array(0.5, np.float32)
    assert ops.sigmoid_forward(x).shape == ()
    assert ops.activation_forward(x, "gelu").shape == ()
    y, keep = ops.dropout_forward(x, 0.5, 1)
    assert y.shape == () and keep.shape == ()
    assert ops.embedding_forward(np.ones((3, 2), np.float32), np.array(1)).shape == (2,)
    assert ops.inverse_sigmoid_forward(x).shape == ()


def test_zero_d_pairs_accepted_issue12_11():
    x = np.array(0.5, np.float32)
    dy = np.array(2.0, np.float32)
    s = ops.sigmoid_forward(x)
    dx = ops.sigmoid_backward(dy, s)
    assert dx.shape == () and math.isclose(float(dx), 2 * float(s) * (1 - float(s)), rel_tol=1e-6)
    assert ops.activation_backward(dy, x, "relu").shape == ()
    assert float(ops.activation_backward(dy, x, "relu")) == 2.0
    assert ops.dropout_backward(dy, np.array(1, np.uint8), 0.5).shape == ()
    assert ops.dropout_backward(dy, np.array(True), 0.5) == 4.0
    assert ops.inverse_sigmoid_backward(dy, x).shape == ()
    dw = ops.embedding_backward(np.ones(2, np.float32), np.array(1), 3)
    np.testing.assert_array_equal(dw, [[0, 0], [1, 1], [0, 0]])


# ---- 12.3: clipping with a non-finite total norm ------------------------------


def _params(*grads):
    from damex import nn
    ps = [nn.Parameter(np.zeros(len(g), np.float32)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = np.array(g, np.float32)
    return ps


def test_clip_grad_norm_nan_total_is_applied_as_torch_issue12_3():
    torch = torch_or_skip()
    from damex import nn
    grads = ([1.0, 2.0, np.nan], [3.0, 4.0])
    ps = _params(*grads)
    total = nn.utils.clip_grad_norm_(ps, 1.0)
    tp = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(tp, grads):
        p.grad = torch.tensor(g, dtype=torch.float32)
    ttotal = torch.nn.utils.clip_grad_norm_(tp, 1.0)
    assert math.isnan(total) and math.isnan(float(ttotal))
    for p, t in zip(ps, tp):  # no finite gradient is left unclipped beside a nan one
        np.testing.assert_array_equal(p.grad, t.grad.numpy())
    total, scale = ops.clip_grad_norm([np.array(g, np.float32) for g in grads], 1.0)
    assert math.isnan(total) and math.isnan(scale)


def test_clip_grad_norm_inf_total_is_applied_as_torch_issue12_3():
    from damex import nn
    ps = _params([1.0, np.inf], [3.0, 4.0])
    assert nn.utils.clip_grad_norm_(ps, 1.0) == math.inf
    np.testing.assert_array_equal(ps[1].grad, [0.0, 0.0])


def test_clip_grad_norm_error_if_nonfinite_issue12_3():
    from damex import nn
    ps = _params([1.0, np.nan], [3.0, 4.0])
    with pytest.raises(ValueError, match="total gradient norm is nan"):
        nn.utils.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    np.testing.assert_array_equal(ps[1].grad, [3.0, 4.0])  # untouched
    with pytest.raises(ValueError, match="total gradient norm is inf"):
        ops.clip_grad_norm([np.array([np.inf], np.float32)], 1.0, error_if_nonfinite=True)


# ---- 12.16: clean errors naming the argument and the bound ---------------------


def test_adamw_step_past_int64_issue12_16():
    z = [np.zeros(2, np.float32) for _ in range(4)]
    with pytest.raises(ValueError, match=r"step: must be <= 9223372036854775807"):
        ops.adamw_step(*z, step=2 ** 63, lr=0.1)
    ops.adamw_step(*z, step=2 ** 63 - 1, lr=0.1)


def test_msda_spatial_shapes_product_wrapping_issue12_16():
    value = np.zeros((1, 0, 1, 2), np.float32)
    with pytest.raises(ValueError, match=r"spatial_shapes: sum of H\*W is 18446744073709551616"):
        ops.ms_deform_attn_forward(value, np.array([[2 ** 32, 2 ** 32]]), np.array([0]),
                                   np.zeros((1, 1, 1, 1, 1, 2), np.float32),
                                   np.zeros((1, 1, 1, 1, 1), np.float32))


@pytest.mark.parametrize("grads", [3.0, None, "abc"])
def test_grad_global_norm_of_a_non_iterable_issue12_16(grads):
    with pytest.raises(TypeError, match="grads: expected an ndarray or an iterable"):
        ops.grad_global_norm(grads)


def test_forged_expert_counts_past_int64_issue12_16():
    class Forged:
        expert_index = np.zeros((2, 1), np.int64)
        slot = np.zeros((2, 1), np.int64)
        expert_count = np.array([2 ** 62, 2 ** 62, 2 ** 62], np.int64)
        combine_weight = np.ones((2, 1), np.float32)

    with pytest.raises(ValueError, match=r"expert_count: the counts sum to 13835058055282163712"):
        ops.dispatch_forward(np.zeros((2, 4), np.float32), Forged())
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 2, 4))
    with pytest.raises(ValueError, match=r"expert_count: the counts sum to 13835058055282163712"):
        ops.expert_ffn_forward(np.zeros((2, 4), np.float32), Forged.expert_count, w1,
                               np.zeros((3, 2)), w2, np.zeros((3, 4)))


def test_empty_linear_with_2_31_rows_issue12_16():
    n = 2 ** 31
    y = ops.linear_forward(np.empty((n, 0), np.float32), np.empty((0, 0), np.float32))
    assert y.shape == (n, 0)
    dx, dw, db = ops.linear_backward(np.empty((n, 0), np.float32), np.empty((n, 0), np.float32),
                                     np.empty((0, 0), np.float32))
    assert dx.shape == (n, 0) and dw.shape == (0, 0) and db.shape == (0,)
    # Din = 0 with a real output: y = b, db = sum of dy
    b = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(ops.linear_forward(np.empty((2, 0), np.float32),
                                                     np.empty((3, 0), np.float32), b), [b, b])
    _, _, db = ops.linear_backward(np.ones((2, 3), np.float32), np.empty((2, 0), np.float32),
                                   np.empty((3, 0), np.float32))
    np.testing.assert_array_equal(db, [2, 2, 2])


# ---- issue 11: the gradient of an op's output is spelled dy ------------------


def test_backward_upstream_gradient_is_dy_issue11():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    a = ops.z_loss_backward(g, dy=2.0)
    np.testing.assert_array_equal(a, ops.z_loss_backward(g, grad=2.0))  # the former name
    np.testing.assert_allclose(a, 2.0 * ops.z_loss_backward(g), rtol=1e-6)
    with pytest.raises(TypeError, match="dy and grad"):
        ops.z_loss_backward(g, dy=2.0, grad=2.0)
    ops.embedding_backward(dy=np.ones((3, 2), np.float32), ids=np.array([0, 1, 1]),
                           num_embeddings=4)
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    _, attn = ops.attention_forward(q, q, q, num_heads=2)
    ops.attention_backward(dy=q, q=q, k=q, v=q, attn=attn, num_heads=2)


def test_nan_reaching_the_router_is_a_non_finite_input_error_issue12_3():
    # relu now lets NaN through, so a NaN batch reaches the router, which has no
    # NaN result: its error is a ValueError the trainer can tell apart
    x = np.full((3, 4), np.nan, np.float32)
    with pytest.raises(ops.NonFiniteInputError, match="router_forward: x contains NaN or inf"):
        ops.router_forward(x, np.ones((4, 2), np.float32))
    assert issubclass(ops.NonFiniteInputError, ValueError)


def test_ops_schedule_is_named_for_what_it_is_issue11():
    """damex.ops had a StepLR that was MultiStepLR (damex.optim.StepLR is torch's StepLR)."""
    from damex import ops
    assert not hasattr(ops, "StepLR")
    assert ops.MultiStepLR(1.0, [2, 4], 0.5).lr(4) == 0.25
