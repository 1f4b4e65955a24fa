"""Property tests (hypothesis) of the detector's nn ops: linear, layer norm, group
norm, frozen batch norm and conv2d across strides, paddings, kernel sizes and every
algorithm (forward and backward); values against damex.testing.reference."""
import numpy as np
import pytest

from property_support import (ERRORS, Unchanged, close, dims, f32_arrays, layouts, reference,
                              st)
from hypothesis import assume, given

from damex import ops


def _dot(a, b):
    return float((np.asarray(a, np.float64) * np.asarray(b, np.float64)).sum())


@given(st.data(), st.lists(dims(0, 3), max_size=2), dims(0, 6), dims(0, 6), st.booleans())
def test_linear(data, lead, cin, cout, bias):
    x = data.draw(layouts(data.draw(f32_arrays((*lead, cin)))))
    w = data.draw(layouts(data.draw(f32_arrays((cout, cin)))))
    b = data.draw(f32_arrays((cout,))) if bias else None
    keep = Unchanged(x, w, b)
    y = ops.linear_forward(x, w, b)
    close(y, reference.linear(x, w, b), 1e-5, 1e-5, "linear")
    dy = data.draw(f32_arrays((*lead, cout)))
    dx, dw, db = ops.linear_backward(dy, x, w, has_bias=bias)
    close(dx, np.asarray(dy, np.float64) @ w, 1e-5, 1e-5, "dx")
    rows = int(np.prod(lead))
    dy2 = np.asarray(dy, np.float64).reshape(rows, cout)
    close(dw, dy2.T @ x.reshape(rows, cin), 1e-4, 1e-5, "dw")
    if bias:
        close(db, dy2.sum(0), 1e-4, 1e-5, "db")
    keep.check()


@given(st.data(), st.lists(dims(1, 3), max_size=2), dims(1, 9), st.sampled_from([1e-5, 1e-3]),
       st.floats(1e-3, 1e3))
def test_layer_norm(data, lead, c, eps, scale):
    x = data.draw(layouts(data.draw(f32_arrays((*lead, c))))) * np.float32(scale)
    g, b = data.draw(f32_arrays((c,))), data.draw(f32_arrays((c,)))
    keep = Unchanged(x, g, b)
    y, mean, rstd = ops.layer_norm_forward(x, g, b, eps)
    # a float32 mean is off by ~1 ulp of |x|, which (x - mean) * rstd amplifies by up
    # to 1/sqrt(eps) on (near-)constant rows: allow that much besides the usual
    amp = 2.4e-7 * float(np.abs(x).max(initial=0)) / np.sqrt(eps) * float(np.abs(g).max())
    close(y, reference.layer_norm(x, g, b, eps), 2e-4 + 4 * amp, 1e-3, "layer_norm")
    dy = data.draw(f32_arrays((*lead, c)))
    dx, dg, db = ops.layer_norm_backward(dy, x, mean, rstd, g)
    assert np.isfinite(dx).all() and dg.shape == (c,) and db.shape == (c,)
    close(db, np.asarray(dy, np.float64).reshape(-1, c).sum(0), 1e-4, 1e-4, "dbeta")
    keep.check()


@given(st.data(), dims(2, 8), st.floats(1e29, 1e31))
def test_layer_norm_of_huge_rows_is_not_beta(data, c, scale):
    """Rows ~1e30 overflow the float32 variance: torch returns NaN, never plain beta."""
    x = (data.draw(f32_arrays((2, c), 0.5, 2.0)) * np.float32(scale)).astype(np.float32)
    assume(np.isfinite(x).all() and np.ptp(x, axis=1).min() > 0)
    g, b = np.ones(c, np.float32), np.full(c, 7.0, np.float32)
    y, _, _ = ops.layer_norm_forward(x, g, b)
    assert not np.allclose(y, b)


@given(st.data(), dims(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 3), (4, 2)]),
       dims(1, 4), dims(1, 4))
def test_group_norm(data, n, cg, h, w):
    c, groups = cg[0] * cg[1], cg[1]
    x = data.draw(layouts(data.draw(f32_arrays((n, c, h, w)))))
    g, b = data.draw(f32_arrays((c,))), data.draw(f32_arrays((c,)))
    keep = Unchanged(x, g, b)
    y, mean, rstd = ops.group_norm_forward(x, g, b, groups)
    # float32 rounding of ~|x| amplified by rstd <= 1/sqrt(eps) (as in test_layer_norm)
    amp = 2.4e-7 * float(np.abs(x).max(initial=0)) / np.sqrt(1e-5) * float(np.abs(g).max())
    close(y, reference.group_norm(x, g, b, groups), 2e-4 + 4 * amp, 1e-3, "group_norm")
    keep.check()


@given(st.data(), dims(1, 2), dims(1, 4), dims(0, 3), dims(0, 3))
def test_frozen_batch_norm(data, n, c, h, w):
    x = data.draw(layouts(data.draw(f32_arrays((n, c, h, w)))))
    wt, b, rm = (data.draw(f32_arrays((c,))) for _ in range(3))
    rv = data.draw(f32_arrays((c,), 0.0, 4.0))
    keep = Unchanged(x, wt, b, rm, rv)
    if h == 0 or w == 0:  # refused by design (C, H, W > 0)
        with pytest.raises(ValueError):
            ops.frozen_batch_norm_forward(x, wt, b, rm, rv)
        return
    y = ops.frozen_batch_norm_forward(x, wt, b, rm, rv)
    # y = x scale + (b - rm scale) in float32: rounding of the terms, scale up to |w|/sqrt(eps)
    scale = np.abs(wt.astype(np.float64)) / np.sqrt(rv.astype(np.float64) + 1e-5)
    amp = 2.4e-7 * float((scale * (np.abs(x).max(initial=0) + np.abs(rm))).max() + np.abs(b).max())
    close(y, reference.frozen_batch_norm(x, wt, b, rm, rv), 1e-4 + 4 * amp, 1e-4, "frozen_bn")
    keep.check()


@st.composite
def conv_cases(draw, big_column_stride=False):
    n, cin, cout = draw(dims(1, 2)), draw(dims(1, 20)), draw(dims(1, 4))
    h, w = draw(dims(1, 7)), draw(dims(1, 7))
    kh, kw = draw(dims(1, 4)), draw(dims(1, 4))
    ph, pw = draw(dims(0, 3)), draw(dims(0, 3))
    sh, sw = draw(dims(1, 5)), draw(dims(1, 9))
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw)
    # issue 12 #1: column stride > W + padding gave wrong values and read past the
    # input; those cases have their own test (test_conv2d_column_stride_past_the_image)
    assume((sw > w + pw) == big_column_stride)
    algorithm = draw(st.sampled_from(ops.CONV2D_ALGORITHMS))
    if algorithm == "winograd":
        kh = kw = 3
        sh = sw = 1
        assume(h + 2 * ph >= 3 and w + 2 * pw >= 3 and not big_column_stride)
    return n, cin, cout, h, w, kh, kw, (sh, sw), (ph, pw), algorithm


def _check_conv(data, case):
    n, cin, cout, h, w, kh, kw, stride, padding, algorithm = case
    x = data.draw(layouts(data.draw(f32_arrays((n, cin, h, w)))))
    wt = data.draw(layouts(data.draw(f32_arrays((cout, cin, kh, kw)))))
    b = data.draw(st.none() | f32_arrays((cout,)))
    keep = Unchanged(x, wt, b)
    y = ops.conv2d_forward(x, wt, b, stride, padding, algorithm=algorithm)
    tol = 1e-4 * cin * kh * kw
    close(y, reference.conv2d(x, wt, b, stride, padding), tol, 1e-4, f"conv2d {case}")
    dy = data.draw(f32_arrays(y.shape))
    dx, dw, db = ops.conv2d_backward(dy, x, wt, stride, padding, has_bias=b is not None,
                                     algorithm=algorithm)
    # the backward is the adjoint of the (linear) forward: probe it with random x2, w2
    x2 = data.draw(f32_arrays(x.shape))
    w2 = data.draw(f32_arrays(wt.shape))
    scale = 1e-3 * (1 + np.abs(dy).sum() * 4 * 4)
    assert abs(_dot(dx, x2) - _dot(dy, reference.conv2d(x2, wt, None, stride, padding))) <= scale
    assert abs(_dot(dw, w2) - _dot(dy, reference.conv2d(x, w2, None, stride, padding))) <= scale
    if b is not None:
        close(db, np.asarray(dy, np.float64).sum((0, 2, 3)), 1e-3, 1e-4, "db")
    keep.check()


@given(st.data(), conv_cases())
def test_conv2d_every_algorithm(data, case):
    _check_conv(data, case)


@given(st.data(), conv_cases(big_column_stride=True))
def test_conv2d_column_stride_past_the_image(data, case):
    _check_conv(data, case)


@given(st.sampled_from(ops.CONV2D_ALGORITHMS), dims(0, 2), st.sampled_from(["x", "w", "stride",
                                                                             "padding", "cin"]))
def test_conv2d_refuses_bad_sizes(algorithm, v, what):
    x = np.ones((1, 2, 4, 4), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    stride, padding = 1, 0
    if what == "x":
        x = np.ones((1, 2, v, 4), np.float32) if v < 3 else x[0]
    elif what == "w":
        w = np.ones((3, 2, 6 + v, 3), np.float32)
    elif what == "stride":
        stride = -v
    elif what == "padding":
        padding = -1 - v
    else:
        w = np.ones((3, 3 + v, 3, 3), np.float32)
    with pytest.raises(ERRORS):
        ops.conv2d_forward(x, w, None, stride, padding, algorithm=algorithm)
