"""Box conversions, IoU / GIoU, sigmoid focal loss and L1: values against
float64 NumPy references and against DETR / torchvision written in PyTorch,
gradients by central differences and by PyTorch autograd, edge cases (one box,
identical, disjoint, nested, touching and zero-area boxes, |logits| = 50) and
bad input."""
import numpy as np
import pytest

from damex import ops
from helpers import assert_close, assert_memory_flat, numeric_grad, torch_or_skip, unchanged
from damex.testing.reference import (box_iou as ref_box_iou, cxcywh_to_xyxy as ref_cxcywh_to_xyxy,
                                     generalized_box_iou as ref_giou, sigmoid_focal_loss as ref_focal,
                                     xyxy_to_cxcywh as ref_xyxy_to_cxcywh)
from damex.testing import torch_twins


def random_xyxy(rng, n, lo=0.02, hi=0.5):
    c = rng.uniform(0, 1, (n, 2))
    wh = rng.uniform(lo, hi, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], 1)


def special_pairs():
    """Rows of a and b covering the cases DETR's formulas branch on."""
    a = np.array([[0.1, 0.1, 0.5, 0.5],     # identical to b[0]
                  [0.0, 0.0, 1.0, 1.0],     # contains b[1]
                  [0.2, 0.2, 0.3, 0.3],     # disjoint from b[2]
                  [0.0, 0.0, 0.5, 0.5],     # touches b[3] along x = 0.5
                  [0.1, 0.3, 0.6, 0.4],     # shares y-range with b[4]
                  [0.25, 0.25, 0.75, 0.75]], np.float32)
    b = np.array([[0.1, 0.1, 0.5, 0.5],
                  [0.25, 0.3, 0.5, 0.625],
                  [0.6, 0.7, 0.9, 0.8],
                  [0.5, 0.0, 0.75, 0.5],
                  [0.2, 0.3, 0.9, 0.4]], np.float32)
    return a, b


# ---- conversions ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4), (7, 4), (2, 3, 4), (4,)])
def test_conversions_forward_backward(shape):
    rng = np.random.default_rng(0)
    b = rng.uniform(0.05, 1, shape)
    dout = rng.normal(size=shape)
    for fwd, bwd, ref in [
            (ops.box_cxcywh_to_xyxy_forward, ops.box_cxcywh_to_xyxy_backward, ref_cxcywh_to_xyxy),
            (ops.box_xyxy_to_cxcywh_forward, ops.box_xyxy_to_cxcywh_backward, ref_xyxy_to_cxcywh)]:
        b32 = b.astype(np.float32)
        assert_close(fwd(b32), ref(b32), atol=1e-7, rtol=1e-6)
        num = numeric_grad(lambda v: (ref(v) * dout).sum(), b)
        assert_close(bwd(dout.astype(np.float32)), num, atol=1e-6, rtol=1e-5)


def test_conversions_roundtrip_and_torch_parity():
    torch = torch_or_skip()
    rng = np.random.default_rng(1)
    b = rng.uniform(0.05, 1, (9, 4)).astype(np.float32)
    dout = rng.normal(size=(9, 4)).astype(np.float32)
    assert_close(ops.box_xyxy_to_cxcywh_forward(ops.box_cxcywh_to_xyxy_forward(b)), b,
                 atol=1e-6, rtol=1e-6)
    bt = torch.tensor(b, requires_grad=True)
    cx, cy, w, h = bt.unbind(-1)
    out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    out.backward(torch.tensor(dout))
    np.testing.assert_array_equal(ops.box_cxcywh_to_xyxy_forward(b), out.detach().numpy())
    assert_close(ops.box_cxcywh_to_xyxy_backward(dout), bt.grad.numpy(), atol=1e-7, rtol=1e-6)
    bt = torch.tensor(b, requires_grad=True)
    x0, y0, x1, y1 = bt.unbind(-1)
    out = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    out.backward(torch.tensor(dout))
    np.testing.assert_array_equal(ops.box_xyxy_to_cxcywh_forward(b), out.detach().numpy())
    assert_close(ops.box_xyxy_to_cxcywh_backward(dout), bt.grad.numpy(), atol=1e-7, rtol=1e-6)


# ---- IoU / GIoU -------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 1), (1, 6), (5, 1), (8, 13)])
def test_giou_and_iou_match_reference(n, m):
    rng = np.random.default_rng(n * 100 + m)
    a = random_xyxy(rng, n).astype(np.float32)
    b = random_xyxy(rng, m).astype(np.float32)
    giou = ops.generalized_box_iou_forward(a, b)
    assert giou.shape == (n, m)
    assert_close(giou, ref_giou(a, b), atol=1e-6, rtol=1e-5)
    iou, union = ops.box_iou_forward(a, b)
    riou, runion = ref_box_iou(a, b)
    assert_close(iou, riou, atol=1e-6, rtol=1e-5)
    assert_close(union, runion, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n,m", [(1, 1), (3, 1), (1, 4), (6, 5)])
def test_giou_backward_matches_central_differences(n, m):
    rng = np.random.default_rng(7 + n + m)
    a = random_xyxy(rng, n).astype(np.float32).astype(np.float64)
    b = random_xyxy(rng, m).astype(np.float32).astype(np.float64)
    dg = rng.normal(size=(n, m))
    num_a = numeric_grad(lambda v: (ref_giou(v, b) * dg).sum(), a)
    num_b = numeric_grad(lambda v: (ref_giou(a, v) * dg).sum(), b)
    da, db = ops.generalized_box_iou_backward(dg.astype(np.float32), a.astype(np.float32),
                                              b.astype(np.float32))
    assert_close(da, num_a, atol=1e-4, rtol=1e-4, name="da")
    assert_close(db, num_b, atol=1e-4, rtol=1e-4, name="db")


def test_giou_special_pairs_central_differences():
    """Nested, disjoint, overlapping: away from ties the gradient is unique."""
    a = np.array([[0.0, 0.0, 1.0, 1.0],          # contains both b
                  [0.2, 0.2, 0.3, 0.28],         # disjoint from both
                  [0.4, 0.5, 0.7, 0.9]])         # overlaps both partially
    b = np.array([[0.25, 0.3, 0.5, 0.625], [0.6, 0.7, 0.9, 0.8]])
    dg = np.array([[1.0, -0.5], [0.25, 2.0], [-1.0, 0.5]])
    da, db = ops.generalized_box_iou_backward(dg.astype(np.float32), a.astype(np.float32),
                                              b.astype(np.float32))
    assert_close(da, numeric_grad(lambda v: (ref_giou(v, b) * dg).sum(), a), atol=1e-5, rtol=1e-4)
    assert_close(db, numeric_grad(lambda v: (ref_giou(a, v) * dg).sum(), b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["random", "special", "one_by_one"])
def test_giou_parity_with_torch(case):
    torch = torch_or_skip()
    rng = np.random.default_rng(3)
    if case == "random":
        a = random_xyxy(rng, 11).astype(np.float32)
        b = np.concatenate([random_xyxy(rng, 6), a[:3]]).astype(np.float32)
    elif case == "special":
        a, b = special_pairs()  # identical, nested, disjoint, touching, shared edges: ties
    else:
        a = random_xyxy(rng, 1).astype(np.float32)
        b = random_xyxy(rng, 1).astype(np.float32)
    dg = rng.normal(size=(a.shape[0], b.shape[0])).astype(np.float32)
    at = torch.tensor(a, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    giou = torch_twins.generalized_box_iou(at, bt)
    iou, union = torch_twins.box_iou(at, bt)
    giou.backward(torch.tensor(dg))
    # DETR's float32 formulas in DETR's order: the same bits
    np.testing.assert_array_equal(ops.generalized_box_iou_forward(a, b), giou.detach().numpy())
    got_iou, got_union = ops.box_iou_forward(a, b)
    np.testing.assert_array_equal(got_iou, iou.detach().numpy())
    np.testing.assert_array_equal(got_union, union.detach().numpy())
    da, db = ops.generalized_box_iou_backward(dg, a, b)
    assert_close(da, at.grad.numpy(), atol=2e-6, rtol=1e-5, name="da")
    assert_close(db, bt.grad.numpy(), atol=2e-6, rtol=1e-5, name="db")


def test_giou_known_values():
    a, b = special_pairs()
    g = ops.generalized_box_iou_forward(a, b)
    assert_close(g[0, 0], 1.0, atol=1e-5)                   # identical: U / (U + 1e-6) (DINO's eps)
    assert_close(g[1, 1], 0.25 * 0.325 / 1.0, atol=1e-7)    # nested: iou = area ratio
    # disjoint: iou 0, enclosing box (0.2,0.2)-(0.9,0.8) = 0.42, union 0.01 + 0.03
    assert_close(g[2, 2], -(0.42 - 0.04) / 0.42, atol=1e-6)
    assert_close(g[3, 3], 0.0, atol=1e-7)                   # touching: C == union


def test_zero_area_boxes_are_finite_with_defined_values():
    torch = torch_or_skip()
    pt = np.array([[0.3, 0.3, 0.3, 0.3]], np.float32)          # a point
    seg = np.array([[0.1, 0.5, 0.7, 0.5]], np.float32)         # a horizontal segment
    box = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
    a = np.concatenate([pt, seg, box])
    b = np.concatenate([pt, seg, box, np.array([[0.2, 0.5, 0.9, 0.5]], np.float32)])
    giou = ops.generalized_box_iou_forward(a, b)
    iou, union = ops.box_iou_forward(a, b)
    dg = np.ones_like(giou)
    da, db = ops.generalized_box_iou_backward(dg, a, b)
    for v in (giou, iou, union, da, db):
        assert np.isfinite(v).all()
    # two zero-area boxes: DETR gives 0/0 = NaN; DINO's 1e-6 makes the quotients 0
    assert giou[0, 0] == 0 and iou[0, 0] == 0          # coincident points: union 0, C 0
    assert giou[1, 1] == 0 and giou[1, 3] == 0         # collinear segments: union 0, C 0
    assert abs(giou[0, 1] + 1) < 1e-4 and abs(giou[1, 0] + 1) < 1e-4   # point vs segment: union 0
    # every pair is DINO's value (1e-6 in the union and in C) to the bit
    ref = torch_twins.generalized_box_iou(torch.tensor(a), torch.tensor(b))
    ref_iou, _ = torch_twins.box_iou(torch.tensor(a), torch.tensor(b))
    np.testing.assert_array_equal(giou, ref.numpy())
    np.testing.assert_array_equal(iou, ref_iou.numpy())
    assert_close(giou, ref_giou(a, b), atol=1e-6, rtol=1e-5)
    # coincident points contribute no gradient (every area factor is 0) ...
    da_pt, db_pt = ops.generalized_box_iou_backward(np.ones((1, 1), np.float32), pt, pt)
    assert not da_pt.any() and not db_pt.any()
    # ... and the segments get DINO's (large, finite) gradient
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch_twins.generalized_box_iou(at, bt).sum().backward()
    assert_close(da, at.grad.numpy(), atol=1e-4, rtol=1e-5)
    assert_close(db, bt.grad.numpy(), atol=1e-4, rtol=1e-5)


def test_giou_gradient_to_a_zero_area_box_matches_torch():
    torch = torch_or_skip()
    a = np.array([[0.3, 0.3, 0.3, 0.3], [0.1, 0.5, 0.7, 0.5]], np.float32)
    b = np.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.4, 0.9]], np.float32)
    dg = np.array([[1.0, -2.0], [0.5, 1.5]], np.float32)
    at = torch.tensor(a, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    g = torch_twins.generalized_box_iou(at, bt)
    g.backward(torch.tensor(dg))
    da, db = ops.generalized_box_iou_backward(dg, a, b)
    assert_close(da, at.grad.numpy(), atol=2e-6, rtol=1e-5)
    assert_close(db, bt.grad.numpy(), atol=2e-6, rtol=1e-5)


def test_giou_empty_sets():
    a = np.zeros((0, 4), np.float32)
    b = random_xyxy(np.random.default_rng(0), 3).astype(np.float32)
    assert ops.generalized_box_iou_forward(a, b).shape == (0, 3)
    da, db = ops.generalized_box_iou_backward(np.zeros((0, 3), np.float32), a, b)
    assert da.shape == (0, 4) and not db.any()


def test_giou_large_set_uses_threads_and_agrees():
    rng = np.random.default_rng(5)
    a = random_xyxy(rng, 150).astype(np.float32)
    b = random_xyxy(rng, 120).astype(np.float32)
    dg = rng.normal(size=(150, 120)).astype(np.float32)
    da, db = ops.generalized_box_iou_backward(dg, a, b)
    # the same rows computed as small (single-threaded) problems
    da_rows = np.concatenate([ops.generalized_box_iou_backward(dg[i:i + 1], a[i:i + 1], b)[0]
                              for i in range(0, 150, 37)])
    assert_close(da[::37], da_rows, atol=0, rtol=0)
    assert_close(ops.generalized_box_iou_forward(a, b), ref_giou(a, b), atol=1e-6, rtol=1e-5)
    assert np.isfinite(db).all()


def test_giou_paired_is_the_diagonal():
    torch = torch_or_skip()
    rng = np.random.default_rng(9)
    sa, sb = special_pairs()
    a = np.concatenate([random_xyxy(rng, 7), sa[:5], [[0.3, 0.3, 0.3, 0.3]]]).astype(np.float32)
    b = np.concatenate([random_xyxy(rng, 7), sb, [[0.3, 0.3, 0.3, 0.3]]]).astype(np.float32)
    dg = rng.normal(size=len(a)).astype(np.float32)
    full = ops.generalized_box_iou_forward(a, b)
    np.testing.assert_array_equal(ops.generalized_box_iou_paired_forward(a, b), np.diag(full))
    da, db = ops.generalized_box_iou_paired_backward(dg, a, b)
    fa, fb = ops.generalized_box_iou_backward(np.diag(dg), a, b)
    np.testing.assert_array_equal(da, fa)
    np.testing.assert_array_equal(db, fb)
    at = torch.tensor(a[:-1], requires_grad=True)  # DETR: NaN on the point pair
    bt = torch.tensor(b[:-1], requires_grad=True)
    g = torch_twins.generalized_box_iou(at, bt)
    torch.diag(g).backward(torch.tensor(dg[:-1]))
    assert_close(da[:-1], at.grad.numpy(), atol=2e-6, rtol=1e-5)
    assert_close(db[:-1], bt.grad.numpy(), atol=2e-6, rtol=1e-5)
    a64, b64 = random_xyxy(rng, 4), random_xyxy(rng, 4)
    d64 = rng.normal(size=4)
    num = numeric_grad(lambda v: (np.diag(ref_giou(v, b64)) * d64).sum(), a64)
    got = ops.generalized_box_iou_paired_backward(d64.astype(np.float32), a64.astype(np.float32),
                                                  b64.astype(np.float32))[0]
    assert_close(got, num, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"b: expected shape \(2, 4\)"):
        ops.generalized_box_iou_paired_forward(a[:2], b[:3])
    with pytest.raises(ValueError, match=r"dy: expected shape \(2,\)"):
        ops.generalized_box_iou_paired_backward(dg[:3], a[:2], b[:2])
    assert ops.generalized_box_iou_paired_forward(a[:0], b[:0]).shape == (0,)


# ---- sigmoid focal loss -----------------------------------------------------

FOCAL_CASES = [(0.25, 2.0), (-1.0, 2.0), (0.25, 0.0), (0.5, 1.0), (0.25, 1.5), (0.75, 3.0)]


@pytest.mark.parametrize("alpha,gamma", FOCAL_CASES)
def test_focal_forward_backward_reference(alpha, gamma):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 3, (6, 5))
    t = (rng.uniform(size=(6, 5)) < 0.3).astype(np.float64)
    t[0] = rng.uniform(size=5)  # soft targets
    x32, t32 = x.astype(np.float32), t.astype(np.float32)
    got = ops.sigmoid_focal_loss_forward(x32, t32, alpha, gamma)
    assert_close(got, ref_focal(x32, t32, alpha, gamma), atol=1e-7, rtol=1e-6)
    dl = rng.normal(size=x.shape)
    x64 = x32.astype(np.float64)
    num = numeric_grad(lambda v: (ref_focal(v, t32, alpha, gamma) * dl).sum(), x64)
    dx = ops.sigmoid_focal_loss_backward(dl.astype(np.float32), x32, t32, alpha, gamma)
    assert_close(dx, num, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha,gamma", FOCAL_CASES)
def test_focal_parity_with_torch(alpha, gamma):
    torch = torch_or_skip()
    rng = np.random.default_rng(12)
    x = rng.normal(0, 4, (40, 9)).astype(np.float32)
    t = (rng.uniform(size=x.shape) < 0.2).astype(np.float32)
    dl = rng.normal(size=x.shape).astype(np.float32)
    # float64 torch on the same float32 inputs: the exact values we round
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    lt = torch_twins.sigmoid_focal_loss(xt, torch.tensor(t, dtype=torch.float64), alpha, gamma)
    lt.backward(torch.tensor(dl, dtype=torch.float64))
    assert_close(ops.sigmoid_focal_loss_forward(x, t, alpha, gamma), lt.detach().numpy(),
                 atol=1e-7, rtol=1e-6)
    assert_close(ops.sigmoid_focal_loss_backward(dl, x, t, alpha, gamma), xt.grad.numpy(),
                 atol=1e-7, rtol=1e-6)
    # float32 torch: agrees to float32 rounding of its own cancellation in 1 - p_t
    xt = torch.tensor(x, requires_grad=True)
    lt = torch_twins.sigmoid_focal_loss(xt, torch.tensor(t), alpha, gamma)
    lt.backward(torch.tensor(dl))
    assert_close(ops.sigmoid_focal_loss_forward(x, t, alpha, gamma), lt.detach().numpy(),
                 atol=1e-6, rtol=1e-4)
    assert_close(ops.sigmoid_focal_loss_backward(dl, x, t, alpha, gamma), xt.grad.numpy(),
                 atol=1e-6, rtol=1e-4)


def test_focal_large_logits_stable():
    torch = torch_or_skip()
    x = np.array([[-50, -30, 0, 30, 50], [-50, -30, 0, 30, 50], [-1e4, -88, 1e-3, 88, 1e4]],
                 np.float32)
    t = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], np.float32)
    loss = ops.sigmoid_focal_loss_forward(x, t)
    dx = ops.sigmoid_focal_loss_backward(np.ones_like(x), x, t)
    assert np.isfinite(loss).all() and np.isfinite(dx).all()
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    lt = torch_twins.sigmoid_focal_loss(xt, torch.tensor(t, dtype=torch.float64))
    lt.sum().backward()
    assert_close(loss, lt.detach().numpy(), atol=1e-30, rtol=1e-6)
    assert_close(dx, xt.grad.numpy(), atol=1e-30, rtol=1e-6)
    # wrong and confident: loss ~ (1 - alpha_t)... = alpha_t |x|, gradient alpha_t sign
    assert_close(loss[0, 4], 0.75 * 50, rtol=1e-6)
    assert_close(loss[1, 0], 0.25 * 50, rtol=1e-6)
    assert_close(dx[0, 4], 0.75, rtol=1e-6)
    assert_close(dx[1, 0], -0.25, rtol=1e-6)


def test_focal_alpha_negative_drops_weight():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    t = (rng.uniform(size=x.shape) < 0.5).astype(np.float32)
    full = ops.sigmoid_focal_loss_forward(x, t, -1.0, 2.0)
    weighted = ops.sigmoid_focal_loss_forward(x, t, 0.25, 2.0)
    w = 0.25 * t + 0.75 * (1 - t)
    assert_close(weighted, full * w, atol=1e-7, rtol=1e-6)
    assert_close(ops.sigmoid_focal_loss_forward(x, t, -0.5, 2.0), full, atol=0, rtol=0)


# ---- L1 ---------------------------------------------------------------------

def test_l1_forward_backward_and_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(14)
    a = rng.normal(size=(5, 4)).astype(np.float32)
    b = rng.normal(size=(5, 4)).astype(np.float32)
    b[0] = a[0]  # equality: subgradient 0
    dout = rng.normal(size=a.shape).astype(np.float32)
    np.testing.assert_array_equal(ops.l1_loss_forward(a, b), np.abs(a - b))
    da, db = ops.l1_loss_backward(dout, a, b)
    assert not da[0].any() and not db[0].any()
    at = torch.tensor(a, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    torch.nn.functional.l1_loss(at, bt, reduction="none").backward(torch.tensor(dout))
    np.testing.assert_array_equal(da, at.grad.numpy())
    np.testing.assert_array_equal(db, bt.grad.numpy())
    a64, b64 = a.astype(np.float64)[1:], b.astype(np.float64)[1:]
    num = numeric_grad(lambda v: (np.abs(v - b64) * dout[1:]).sum(), a64)
    assert_close(da[1:], num, atol=1e-6, rtol=1e-5)


# ---- bad input, immutability, memory ---------------------------------------

def test_bad_input_names_the_argument():
    good = np.array([[0, 0, 1, 1]], np.float32)
    with pytest.raises(TypeError, match="a: .*float"):
        ops.generalized_box_iou_forward(good.astype(np.int32), good)
    with pytest.raises(ValueError, match=r"b: expected shape \(\?, 4\)"):
        ops.generalized_box_iou_forward(good, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="b: contains NaN"):
        ops.box_iou_forward(good, np.array([[0, 0, np.nan, 1]], np.float32))
    with pytest.raises(ValueError, match="a: contains NaN"):
        ops.generalized_box_iou_backward(np.ones((1, 1), np.float32),
                                         np.array([[np.inf, 0, 1, 1]], np.float32), good)
    with pytest.raises(ValueError, match="b: contains NaN"):
        ops.box_cxcywh_to_xyxy_forward(np.array([0, np.nan, 1, 1], np.float32))
    with pytest.raises(ValueError, match=r"a: box 1 is not xyxy"):
        ops.generalized_box_iou_forward(np.array([[0, 0, 1, 1], [0, 1, 1, 0]], np.float32), good)
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 2\)"):
        ops.generalized_box_iou_backward(np.ones((2, 1), np.float32), good,
                                         np.concatenate([good, good]))
    with pytest.raises(ValueError, match=r"b: expected shape \(\.\.\., 4\)"):
        ops.box_xyxy_to_cxcywh_forward(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"dy: expected shape \(\.\.\., 4\)"):
        ops.box_xyxy_to_cxcywh_backward(np.zeros(3, np.float32))
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="targets: expected shape"):
        ops.sigmoid_focal_loss_forward(x, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 1\]"):
        ops.sigmoid_focal_loss_forward(x, np.full((2, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="logits: contains NaN"):
        ops.sigmoid_focal_loss_forward(np.full((2, 3), np.nan, np.float32), x)
    with pytest.raises(ValueError, match="gamma"):
        ops.sigmoid_focal_loss_forward(x, x, 0.25, -1.0)
    with pytest.raises(TypeError, match="targets"):
        ops.sigmoid_focal_loss_forward(x, x.astype(bool))
    with pytest.raises(ValueError, match="^dy: "):
        ops.sigmoid_focal_loss_backward(np.zeros(6, np.float32), x, x)
    with pytest.raises(ValueError, match="b: expected shape"):
        ops.l1_loss_forward(x, np.zeros(6, np.float32))
    with pytest.raises(TypeError, match="^dy: "):
        ops.l1_loss_backward(np.zeros((2, 3), np.int64), x, x)


def test_direct_binding_calls_are_checked():
    from damex import _C
    a = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="elements"):
        _C.generalized_box_iou_forward(np.empty((2, 3), np.float32), a, a, 2, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        _C.box_cxcywh_to_xyxy_forward(np.empty(6, np.float32), np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="gamma|invalid"):
        _C.sigmoid_focal_loss_forward(np.empty(3, np.float32), np.zeros(3, np.float32),
                                      np.zeros(3, np.float32), 0.25, -2.0)


def test_inputs_unchanged_and_noncontiguous_accepted():
    rng = np.random.default_rng(15)
    a = random_xyxy(rng, 6).astype(np.float32)
    b = random_xyxy(rng, 4).astype(np.float32)
    dg = rng.normal(size=(4, 6)).astype(np.float32).T  # non-contiguous view
    x = rng.normal(size=(3, 8)).astype(np.float32)
    t = (x > 0).astype(np.float32)
    check = unchanged(a, b, dg, x, t)
    ops.generalized_box_iou_forward(a, b)
    got = ops.generalized_box_iou_backward(dg, a, b)
    ops.box_iou_forward(a, b)
    ops.box_cxcywh_to_xyxy_forward(a)
    ops.box_xyxy_to_cxcywh_backward(a)
    ops.sigmoid_focal_loss_backward(x.T, x.T, t.T)
    ops.l1_loss_backward(x, x, t)
    check()
    want = ops.generalized_box_iou_backward(np.ascontiguousarray(dg), a, b)
    assert_close(got[0], want[0], atol=0, rtol=0)
    assert_close(got[1], want[1], atol=0, rtol=0)
    # float64 inputs are converted, not refused
    assert_close(ops.generalized_box_iou_forward(a.astype(np.float64), b),
                 ops.generalized_box_iou_forward(a, b), atol=0, rtol=0)


def test_memory_flat_over_many_calls():
    rng = np.random.default_rng(16)
    a = random_xyxy(rng, 3).astype(np.float32)
    b = random_xyxy(rng, 2).astype(np.float32)
    dg = np.ones((3, 2), np.float32)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    t = (x > 0).astype(np.float32)

    def step():
        ops.generalized_box_iou_forward(a, b)
        ops.generalized_box_iou_backward(dg, a, b)
        ops.generalized_box_iou_paired_backward(dg[:2, 0], a[:2], b)
        ops.box_iou_forward(a, b)
        ops.box_cxcywh_to_xyxy_backward(ops.box_cxcywh_to_xyxy_forward(a))
        ops.sigmoid_focal_loss_backward(x, x, t)
        ops.l1_loss_backward(x, x, t)
    assert_memory_flat(step, calls=10_000)
