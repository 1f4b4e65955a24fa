"""Property tests (hypothesis) of box ops (conversions, IoU, GIoU, paired GIoU),
sigmoid focal loss, L1, AdamW, gradient norm and clipping: random counts (0 and
1 included), layouts, degenerate boxes; values against damex.testing.reference;
inputs never modified (AdamW's state excepted: it updates param and moments in place)."""
import math

import numpy as np
import pytest

from property_support import Unchanged, close, dims, f32_arrays, hnp, layouts, reference, st
from hypothesis import given

from damex import ops


@st.composite
def xyxy(draw, n, min_size=0.05):
    c = draw(f32_arrays((n, 2), 0.0, 1.0)).astype(np.float64)
    wh = draw(f32_arrays((n, 2), min_size, 0.6)).astype(np.float64)
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


@given(st.data(), dims(0, 6))
def test_box_conversions(data, n):
    b = data.draw(layouts(data.draw(f32_arrays((n, 4), -2, 2))))
    keep = Unchanged(b)
    close(ops.box_cxcywh_to_xyxy_forward(b), reference.cxcywh_to_xyxy(b), 1e-6, 1e-6, "to xyxy")
    close(ops.box_xyxy_to_cxcywh_forward(b), reference.xyxy_to_cxcywh(b), 1e-6, 1e-6, "to cxcywh")
    keep.check()


@given(st.data(), dims(0, 5), dims(0, 5))
def test_iou_and_giou(data, n, m):
    a, b = data.draw(xyxy(n)), data.draw(xyxy(m))
    a = data.draw(layouts(a))
    keep = Unchanged(a, b)
    iou, union = ops.box_iou_forward(a, b)
    riou, runion = reference.box_iou(a, b)
    close(iou, riou, 1e-4, 1e-4, "iou")
    close(union, runion, 1e-6, 1e-5, "union")
    close(ops.generalized_box_iou_forward(a, b), reference.generalized_box_iou(a, b), 1e-4, 1e-4, "giou")
    if n == m:
        close(ops.generalized_box_iou_paired_forward(a, b),
              np.diag(reference.generalized_box_iou(a, b)) if n else np.zeros(0), 1e-4, 1e-4, "paired")
    g = ops.generalized_box_iou_backward(np.ones((n, m), np.float32), a, b)
    assert all(np.isfinite(x).all() for x in g)
    keep.check()


@given(st.data(), hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=5),
       st.sampled_from([0.25, 0.5, -1.0]), st.sampled_from([0.0, 1.0, 2.0]))
def test_focal_and_l1(data, shape, alpha, gamma):
    x = data.draw(layouts(data.draw(f32_arrays(shape, -50, 50))))
    t = data.draw(f32_arrays(shape, 0, 1))
    keep = Unchanged(x, t)
    close(ops.sigmoid_focal_loss_forward(x, t, alpha, gamma),
          reference.sigmoid_focal_loss(x, t, alpha, gamma), 1e-5, 1e-4, "focal")
    d = ops.sigmoid_focal_loss_backward(np.ones(shape, np.float32), x, t, alpha, gamma)
    assert d.shape == shape and np.isfinite(d).all()
    close(ops.l1_loss_forward(x, t), reference.l1(x, t), 1e-5, 1e-6, "l1")
    keep.check()


@given(st.data(), hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
       st.integers(1, 10 ** 6), st.floats(0, 1), st.sampled_from([0.0, 0.5, 0.9]),
       st.sampled_from([0.0, 0.9, 0.999]), st.sampled_from([1e-8, 1e-3]), st.sampled_from([0.0, 1e-2]))
def test_adamw(data, shape, step, lr, beta1, beta2, eps, wd):
    p = data.draw(f32_arrays(shape))
    g = data.draw(layouts(data.draw(f32_arrays(shape))))
    m = data.draw(f32_arrays(shape, -1, 1))
    v = data.draw(f32_arrays(shape, 0, 1))
    want = reference.adamw(p, g, m, v, step, lr, beta1, beta2, eps, wd)
    keep = Unchanged(g)
    ops.adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, wd)
    for got, w, name in zip((p, m, v), want, ("param", "exp_avg", "exp_avg_sq")):
        close(got, w, 1e-5, 1e-4, name)
    keep.check()


@given(st.data(), st.lists(hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=4),
                           max_size=4), st.floats(0, 10))
def test_grad_norm_and_clip(data, shapes, max_norm):
    grads = [data.draw(layouts(data.draw(f32_arrays(s)))) for s in shapes]
    keep = Unchanged(*grads)
    want = math.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in grads))
    assert ops.grad_global_norm(grads) == pytest.approx(want, rel=1e-5, abs=1e-6)
    total, scale = ops.clip_grad_norm(grads, max_norm)
    assert total == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert scale == pytest.approx(min(max_norm / (want + 1e-6), 1.0), rel=1e-5)
    keep.check()
