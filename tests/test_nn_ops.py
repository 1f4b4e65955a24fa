"""The detector's nn ops (damex/ops/nn.py): values and gradients against float64
NumPy references (central differences) and against PyTorch, over shapes with
the edge cases (one row, 1x1 conv, stride 2 + padding, a kernel larger than
the input, odd sizes, groups of one channel); dropout's mask; bad input."""
import tracemalloc

import numpy as np
import pytest

from damex import ops
from helpers import assert_close, numeric_grad, torch_or_skip, unchanged
from damex.testing.reference import (conv2d as ref_conv2d, frozen_batch_norm as ref_frozen_bn,
                                     group_norm as ref_group_norm, inverse_sigmoid as ref_inverse_sigmoid,
                                     layer_norm as ref_layer_norm, linear as ref_linear,
                                     sigmoid as ref_sigmoid, softmax as ref_softmax)

RNG = np.random.default_rng(12345)


def rnd(*shape, scale=1.0):
    return RNG.normal(0, scale, shape)


def f32(a):
    return np.asarray(a, np.float32)


def check_grads(ref, args, dy, got, atol=2e-4, rtol=2e-3):
    """Central differences of sum(ref(*args) * dy) w.r.t. each args[i] in got (i -> grad)."""
    for i, g in got.items():
        def f(v, i=i):
            a = list(args)
            a[i] = v
            return float((ref(*a) * dy).sum())
        assert_close(g, numeric_grad(f, args[i]), atol=atol, rtol=rtol, name=f"grad of arg {i}")


# ---- float64 references ----------------------------------------------------

# ---- linear -------------------------------------------------------------------

@pytest.mark.parametrize("xshape,dout", [((4, 3), 5), ((1, 7), 2), ((2, 3, 4), 3)])
def test_linear_central_differences(xshape, dout):
    x, w, b = rnd(*xshape), rnd(dout, xshape[-1]), rnd(dout)
    dy = rnd(*xshape[:-1], dout)
    assert_close(ops.linear_forward(f32(x), f32(w), f32(b)), ref_linear(x, w, b), 1e-5, 1e-5)
    dx, dw, db = ops.linear_backward(f32(dy), f32(x), f32(w))
    check_grads(ref_linear, [x, w, b], dy, {0: dx, 1: dw, 2: db})


@pytest.mark.parametrize("xshape,dout,bias", [((64, 33), 17, True), ((1, 256), 1024, True),
                                              ((2, 5, 8), 8, False), ((0, 4), 3, True)])
def test_linear_torch_parity(xshape, dout, bias):
    torch = torch_or_skip()
    x, w = f32(rnd(*xshape)), f32(rnd(dout, xshape[-1]) * 0.1)
    b = f32(rnd(dout)) if bias else None
    dy = f32(rnd(*xshape[:-1], dout))
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True) if bias else None
    yt = torch.nn.functional.linear(xt, wt, bt)
    yt.backward(torch.tensor(dy))
    assert_close(ops.linear_forward(x, w, b), yt.detach().numpy(), 1e-5, 1e-4)
    dx, dw, db = ops.linear_backward(dy, x, w, has_bias=bias)
    assert_close(dx, xt.grad.numpy(), 1e-5, 1e-4, "dx")
    assert_close(dw, wt.grad.numpy(), 1e-4, 1e-4, "dw")
    if bias:
        assert_close(db, bt.grad.numpy(), 1e-4, 1e-4, "db")
    else:
        assert db is None


# ---- layer norm -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (1, 8), (2, 2, 3)])
def test_layer_norm_central_differences(shape):
    x, g, b = rnd(*shape), rnd(shape[-1]), rnd(shape[-1])
    dy = rnd(*shape)
    y, mean, rstd = ops.layer_norm_forward(f32(x), f32(g), f32(b))
    assert_close(y, ref_layer_norm(x, g, b), 1e-5, 1e-4)
    assert_close(mean, x.reshape(-1, shape[-1]).mean(-1), 1e-6, 1e-5)
    got = ops.layer_norm_backward(f32(dy), f32(x), mean, rstd, f32(g))
    check_grads(ref_layer_norm, [x, g, b], dy, dict(enumerate(got)))


@pytest.mark.parametrize("shape", [(100, 256), (1, 7), (3, 5, 33), (4, 1)])
def test_layer_norm_torch_parity(shape):
    torch = torch_or_skip()
    x = f32(rnd(*shape, scale=3) + 2)
    g, b, dy = f32(rnd(shape[-1])), f32(rnd(shape[-1])), f32(rnd(*shape))
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    yt = torch.nn.functional.layer_norm(xt, (shape[-1],), gt, bt, 1e-5)
    yt.backward(torch.tensor(dy))
    y, mean, rstd = ops.layer_norm_forward(x, g, b)
    assert_close(y, yt.detach().numpy(), 1e-5, 1e-4)
    dx, dg, db = ops.layer_norm_backward(dy, x, mean, rstd, g)
    assert_close(dx, xt.grad.numpy(), 1e-4, 1e-3, "dx")
    assert_close(dg, gt.grad.numpy(), 1e-4, 1e-4, "dgamma")
    assert_close(db, bt.grad.numpy(), 1e-4, 1e-4, "dbeta")


# ---- group norm -----------------------------------------------------------------

@pytest.mark.parametrize("shape,groups", [((2, 4, 3, 2), 2), ((1, 3, 2, 3), 3), ((2, 2, 1, 1), 1)])
def test_group_norm_central_differences(shape, groups):
    x, g, b = rnd(*shape), rnd(shape[1]), rnd(shape[1])
    dy = rnd(*shape)
    y, mean, rstd = ops.group_norm_forward(f32(x), f32(g), f32(b), groups)
    assert_close(y, ref_group_norm(x, g, b, groups), 1e-5, 1e-4)
    got = ops.group_norm_backward(f32(dy), f32(x), mean, rstd, f32(g), groups)
    check_grads(lambda x, g, b: ref_group_norm(x, g, b, groups), [x, g, b], dy, dict(enumerate(got)))


@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 32), ((1, 6, 5, 7), 6),
                                          ((3, 8, 1, 1), 2), ((1, 32, 64, 64), 32)])
def test_group_norm_torch_parity(shape, groups):
    torch = torch_or_skip()
    x = f32(rnd(*shape, scale=2) - 1)
    g, b, dy = f32(rnd(shape[1])), f32(rnd(shape[1])), f32(rnd(*shape))
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    yt = torch.nn.functional.group_norm(xt, groups, gt, bt, 1e-5)
    yt.backward(torch.tensor(dy))
    y, mean, rstd = ops.group_norm_forward(x, g, b, groups)
    assert_close(y, yt.detach().numpy(), 2e-5, 1e-4)
    dx, dg, db = ops.group_norm_backward(dy, x, mean, rstd, g, groups)
    assert_close(dx, xt.grad.numpy(), 1e-4, 1e-3, "dx")
    assert_close(dg, gt.grad.numpy(), 1e-3, 1e-4, "dgamma")
    assert_close(db, bt.grad.numpy(), 1e-3, 1e-4, "dbeta")


# ---- frozen batch norm ----------------------------------------------------------

def test_frozen_batch_norm_central_differences_and_torchvision_formula():
    shape = (2, 3, 4, 5)
    x, w, b, rm = rnd(*shape), rnd(3), rnd(3), rnd(3)
    rv = RNG.uniform(0.5, 2, 3)
    dy = rnd(*shape)
    y = ops.frozen_batch_norm_forward(f32(x), f32(w), f32(b), f32(rm), f32(rv))
    assert_close(y, ref_frozen_bn(x, w, b, rm, rv), 1e-5, 1e-4)
    dx = ops.frozen_batch_norm_backward(f32(dy), f32(w), f32(rv))
    check_grads(lambda x: ref_frozen_bn(x, w, b, rm, rv), [x], dy, {0: dx})


def test_frozen_batch_norm_torch_parity():
    torch = torch_or_skip()
    shape = (2, 16, 9, 7)
    x, w, b, rm = (f32(rnd(*s)) for s in (shape, (16,), (16,), (16,)))
    rv = f32(RNG.uniform(0.1, 3, 16))
    dy = f32(rnd(*shape))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, torch.tensor(rm), torch.tensor(rv), torch.tensor(w),
                                        torch.tensor(b), training=False, eps=1e-5)
    yt.backward(torch.tensor(dy))
    assert_close(ops.frozen_batch_norm_forward(x, w, b, rm, rv), yt.detach().numpy(), 1e-5, 1e-4)
    assert_close(ops.frozen_batch_norm_backward(dy, w, rv), xt.grad.numpy(), 1e-5, 1e-4)


# ---- conv2d ---------------------------------------------------------------------

CONV_SMALL = [  # (x shape, w shape, stride, padding)
    ((2, 3, 5, 4), (4, 3, 3, 3), 1, 1),
    ((1, 2, 5, 5), (3, 2, 1, 1), 1, 0),        # 1x1: no im2col
    ((1, 2, 6, 5), (2, 2, 3, 3), 2, 1),        # stride 2 + padding, odd width
    ((1, 1, 2, 3), (2, 1, 5, 5), 1, 2),        # kernel larger than the input
    ((2, 2, 4, 5), (2, 2, 2, 3), (2, 1), (0, 1)),
]


def with_algorithms(cases, algorithms):
    """(case..., algorithm) for every case and algorithm that takes it:
    "winograd" takes 3x3 kernels at stride 1 only (its refusal is tested below)."""
    return [(*c, a) for a in algorithms for c in cases
            if a != "winograd" or (c[1][2:] == (3, 3) and c[2] in (1, (1, 1)))]


@pytest.mark.parametrize("xs,ws,stride,padding,algorithm",
                         with_algorithms(CONV_SMALL, ["im2col", "shifted", "direct", "winograd"]))
def test_conv2d_central_differences(xs, ws, stride, padding, algorithm):
    x, w, b = rnd(*xs), rnd(*ws), rnd(ws[0])
    st = stride if isinstance(stride, tuple) else (stride, stride)
    pd = padding if isinstance(padding, tuple) else (padding, padding)
    ref = lambda x, w, b: ref_conv2d(x, w, b, st, pd)  # noqa: E731
    y = ops.conv2d_forward(f32(x), f32(w), f32(b), stride, padding, algorithm=algorithm)
    assert_close(y, ref(x, w, b), 1e-5, 1e-4)
    dy = rnd(*y.shape)
    dx, dw, db = ops.conv2d_backward(f32(dy), f32(x), f32(w), stride, padding, algorithm=algorithm)
    check_grads(ref, [x, w, b], dy, {0: dx, 1: dw, 2: db})


CONV_TORCH = [
    ((2, 16, 16, 16), (16, 16, 3, 3), 1, 1, True),
    ((2, 3, 33, 31), (8, 3, 3, 3), 2, 1, True),      # stride 2, odd sizes
    ((1, 32, 8, 8), (16, 32, 1, 1), 1, 0, False),    # 1x1
    ((1, 4, 3, 2), (5, 4, 7, 7), 1, 3, True),        # kernel larger than the input
    ((3, 8, 9, 9), (4, 8, 1, 1), 2, 0, True),        # strided 1x1
    ((1, 3, 28, 28), (8, 3, 7, 7), 2, 3, True),      # ResNet stem
    ((1, 1, 1, 1), (1, 1, 1, 1), 1, 0, True),
    ((2, 24, 15, 10), (7, 24, 3, 5), (2, 3), (2, 1), True),  # rectangular everything
    ((1, 16, 4, 4), (8, 16, 5, 5), 3, 2, True),     # stride 3, kernel larger than input
    ((3, 8, 50, 3), (8, 8, 3, 3), 1, (2, 1), True),   # more than 48 tiles, tall
    # output planes of 512+ pixels: "auto" runs damex's own kernels (see conv.h)
    ((2, 12, 33, 31), (10, 12, 3, 3), 1, 1, True),    # odd output: half Winograd tiles
    ((1, 9, 27, 26), (17, 9, 3, 3), 1, (0, 2), False),  # Cout not a multiple of 8
    ((1, 8, 30, 31), (4, 8, 2, 2), 1, 2, True),       # padding beyond the kernel
    ((2, 9, 50, 47), (12, 9, 3, 3), 2, 1, True),      # strided, odd sizes, Cin >= 8
    ((1, 10, 48, 48), (9, 10, 7, 7), 2, 3, False),    # strided 7x7
    ((1, 3, 48, 50), (8, 3, 7, 7), 2, 3, True),       # RGB stem: dx by the shifted products
]


@pytest.mark.parametrize("xs,ws,stride,padding,bias,algorithm", with_algorithms(
    CONV_TORCH, ["auto", "im2col", "shifted", "direct", "winograd"]))
def test_conv2d_torch_parity(xs, ws, stride, padding, bias, algorithm):
    torch = torch_or_skip()
    x, w = f32(rnd(*xs)), f32(rnd(*ws) * 0.2)
    b = f32(rnd(ws[0])) if bias else None
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True) if bias else None
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
    dy = f32(rnd(*yt.shape))
    yt.backward(torch.tensor(dy))
    check = unchanged(x, w, dy)
    assert_close(ops.conv2d_forward(x, w, b, stride, padding, algorithm=algorithm),
                 yt.detach().numpy(), 1e-4, 1e-4)
    dx, dw, db = ops.conv2d_backward(dy, x, w, stride, padding, has_bias=bias, algorithm=algorithm)
    check()
    assert_close(dx, xt.grad.numpy(), 1e-4, 1e-4, "dx")
    assert_close(dw, wt.grad.numpy(), 5e-4, 1e-4, "dw")
    if bias:
        assert_close(db, bt.grad.numpy(), 5e-4, 1e-4, "db")


def test_conv2d_shifted_in_image_chunks_matches_torch():
    """A batch the shifted algorithm runs in several image chunks (one image per
    chunk by default; build with -DSHIFTED_SCRATCH_FLOATS=4194304 for 2 + 1)."""
    torch = torch_or_skip()
    x, w, b = f32(rnd(3, 32, 200, 200)), f32(rnd(16, 32, 3, 3) * 0.1), f32(rnd(16))
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, padding=1)
    dy = f32(rnd(*yt.shape))
    yt.backward(torch.tensor(dy))
    assert_close(ops.conv2d_forward(x, w, b, 1, 1, algorithm="shifted"), yt.detach().numpy(), 1e-4, 1e-4)
    dx, dw, db = ops.conv2d_backward(dy, x, w, 1, 1, algorithm="shifted")
    assert_close(dx, xt.grad.numpy(), 1e-4, 1e-4, "dx")
    assert_close(dw, wt.grad.numpy(), 2e-2, 1e-4, "dw")  # sums over 120000 products
    assert_close(db, bt.grad.numpy(), 2e-2, 1e-4, "db")


# ---- sigmoid, inverse sigmoid, softmax --------------------------------------------

def test_sigmoid():
    x, dy = rnd(4, 7, scale=4), rnd(4, 7)
    y = ops.sigmoid_forward(f32(x))
    assert_close(y, ref_sigmoid(x), 1e-6, 1e-5)
    check_grads(ref_sigmoid, [x], dy, {0: ops.sigmoid_backward(f32(dy), y)})
    big = f32([-1e4, -100, -88, 0, 88, 100, 1e4])
    yb = ops.sigmoid_forward(big)
    assert np.isfinite(yb).all() and yb[0] < 1e-30 and yb[-1] == 1


def test_inverse_sigmoid_central_differences():
    x = RNG.uniform(0.02, 0.98, (3, 4))
    dy = rnd(3, 4)
    assert_close(ops.inverse_sigmoid_forward(f32(x)), ref_inverse_sigmoid(f32(x).astype(float)), 1e-5, 1e-5)
    check_grads(ref_inverse_sigmoid, [x], dy, {0: ops.inverse_sigmoid_backward(f32(dy), f32(x))})


def test_sigmoid_inverse_sigmoid_softmax_torch_parity():
    torch = torch_or_skip()
    # inverse sigmoid: DINO's code, values inside, outside and at the clamps
    x = f32(np.concatenate([RNG.uniform(-0.5, 1.5, 200), [0, 1, 1e-6, 1 - 1e-6, 0.5, -1, 2]]))
    dy = f32(rnd(x.size))
    xt = torch.tensor(x, requires_grad=True)
    v = xt.clamp(min=0, max=1)
    yt = torch.log(v.clamp(min=1e-5) / (1 - v).clamp(min=1e-5))
    yt.backward(torch.tensor(dy))
    assert_close(ops.inverse_sigmoid_forward(x), yt.detach().numpy(), 1e-5, 1e-5)
    assert_close(ops.inverse_sigmoid_backward(dy, x), xt.grad.numpy(), 1e-4, 1e-5)
    # sigmoid
    x = f32(rnd(300, 91, scale=5))
    dy = f32(rnd(300, 91))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.sigmoid(xt)
    yt.backward(torch.tensor(dy))
    y = ops.sigmoid_forward(x)
    assert_close(y, yt.detach().numpy(), 1e-6, 1e-5)
    assert_close(ops.sigmoid_backward(dy, y), xt.grad.numpy(), 1e-6, 1e-5)
    # softmax over several shapes, with -inf entries
    for shape in [(5, 7), (1, 1), (2, 3, 300), (4, 1000)]:
        x = f32(rnd(*shape, scale=5))
        x.reshape(-1)[::7] = -np.inf if shape[-1] > 1 else 0
        dy = f32(rnd(*shape))
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.softmax(xt, -1)
        yt.backward(torch.tensor(dy))
        y = ops.softmax_forward(x)
        assert_close(y, yt.detach().numpy(), 1e-6, 1e-5, f"softmax {shape}")
        assert_close(ops.softmax_backward(dy, y), xt.grad.numpy(), 1e-6, 1e-4, f"dsoftmax {shape}")


def test_softmax_central_differences():
    x, dy = rnd(3, 6, scale=2), rnd(3, 6)
    y = ops.softmax_forward(f32(x))
    assert_close(y, ref_softmax(x), 1e-6, 1e-5)
    check_grads(ref_softmax, [x], dy, {0: ops.softmax_backward(f32(dy), y)})


# ---- dropout ----------------------------------------------------------------------

def test_dropout_mask_and_scale():
    x = f32(rnd(1000, 257))
    y1, k1 = ops.dropout_forward(x, 0.3, seed=7)
    y2, k2 = ops.dropout_forward(x, 0.3, seed=7)
    _, k3 = ops.dropout_forward(x, 0.3, seed=8)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(y1, y2)
    assert (k1 != k3).mean() > 0.3
    assert k1.dtype == np.uint8 and set(np.unique(k1)) <= {0, 1}
    assert abs(k1.mean() - 0.7) < 0.005
    assert_close(y1, np.where(k1, x / np.float32(0.7), 0), 1e-6, 1e-6)
    # the same element gets the same bit in a bigger array (counter-based)
    _, kbig = ops.dropout_forward(np.zeros(2 * x.size, np.float32), 0.3, seed=7)
    np.testing.assert_array_equal(kbig[:x.size], k1.reshape(-1))
    for p in (0.1, 0.5, 0.9):
        assert abs(ops.dropout_forward(x, p, seed=1)[1].mean() - (1 - p)) < 0.005
    y0, k0 = ops.dropout_forward(x, 0.0, seed=3)
    np.testing.assert_array_equal(y0, x)
    assert k0.all()
    yall, kall = ops.dropout_forward(x, 1.0, seed=3)
    assert not yall.any() and not kall.any()


def test_dropout_backward_uses_mask():
    x, dy = f32(rnd(50, 9)), f32(rnd(50, 9))
    y, keep = ops.dropout_forward(x, 0.4, seed=11)
    dx = ops.dropout_backward(dy, keep, 0.4)
    assert_close(dx, np.where(keep, dy / np.float32(0.6), 0), 1e-6, 1e-6)
    assert_close(ops.dropout_backward(dy, keep.astype(bool), 0.4), dx, 0, 0)
    assert not ops.dropout_backward(dy, np.zeros_like(keep), 1.0).any()
    # directional check: y is linear in x for a fixed mask
    assert_close((y * dy).sum(), (dx * x).sum(), 1e-3, 1e-5)


# ---- embedding --------------------------------------------------------------------

def test_embedding_against_numpy_and_torch():
    weight = f32(rnd(10, 70))
    ids = np.array([[3, 3, 0], [9, 3, 1]])
    dout = f32(rnd(2, 3, 70))
    out = ops.embedding_forward(weight, ids)
    assert_close(out, weight[ids], 0, 0)
    dw = ops.embedding_backward(dout, ids, 10)
    ref = np.zeros((10, 70))
    np.add.at(ref, ids, dout.astype(float))
    assert_close(dw, ref, 1e-6, 1e-6)
    torch = torch_or_skip()
    wt = torch.tensor(weight, requires_grad=True)
    ot = torch.nn.functional.embedding(torch.tensor(ids), wt)
    ot.backward(torch.tensor(dout))
    assert_close(dw, wt.grad.numpy(), 1e-6, 1e-6)
    # many repeats over many threads: no races
    ids = RNG.integers(0, 5, 20000)
    dout = f32(rnd(20000, 300))
    ref = np.zeros((5, 300))
    np.add.at(ref, ids, dout.astype(float))
    assert_close(ops.embedding_backward(dout, ids, 5), ref, 1e-3, 1e-4)
    assert ops.embedding_forward(weight, np.zeros((0,), np.int64)).shape == (0, 70)


# ---- bad input ---------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x4 = np.zeros((1, 4, 5, 5), np.float32)
    w = np.zeros((2, 4, 3, 3), np.float32)
    check = unchanged(x4, w)
    with pytest.raises(TypeError, match="x"):
        ops.linear_forward(np.zeros((2, 3), np.int32), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="x"):
        ops.linear_forward(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="b"):
        ops.linear_forward(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="dy"):
        ops.linear_backward(np.zeros((2, 5), np.float32), np.zeros((2, 3), np.float32),
                            np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="gamma"):
        ops.layer_norm_forward(np.zeros((2, 3), np.float32), np.ones(4), np.zeros(3))
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm_forward(np.zeros((2, 3), np.float32), np.ones(3), np.zeros(3), eps=-1)
    with pytest.raises(ValueError, match="groups"):
        ops.group_norm_forward(x4, np.ones(4), np.zeros(4), 3)
    with pytest.raises(ValueError, match="groups"):
        ops.group_norm_forward(x4, np.ones(4), np.zeros(4), 0)
    with pytest.raises(ValueError, match="x"):
        ops.group_norm_forward(np.zeros((4, 5, 5), np.float32), np.ones(4), np.zeros(4), 2)
    with pytest.raises(ValueError, match="running_var"):
        ops.frozen_batch_norm_forward(x4, np.ones(4), np.zeros(4), np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_forward(x4, np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="stride"):
        ops.conv2d_forward(x4, w, stride=0)
    with pytest.raises(ValueError, match="padding"):
        ops.conv2d_forward(x4, w, padding=-1)
    with pytest.raises(ValueError, match="larger"):
        ops.conv2d_forward(x4, np.zeros((2, 4, 7, 7), np.float32))
    with pytest.raises(TypeError, match="w"):
        ops.conv2d_forward(x4, w.astype(np.int64))
    with pytest.raises(ValueError, match="dy"):
        ops.conv2d_backward(np.zeros((1, 2, 5, 5), np.float32), x4, w)
    with pytest.raises(ValueError, match="algorithm"):
        ops.conv2d_forward(x4, w, algorithm="fft")
    with pytest.raises(ValueError, match="winograd.*3x3 kernel at stride 1"):
        ops.conv2d_forward(x4, f32(rnd(2, x4.shape[1], 3, 3)), stride=2, algorithm="winograd")
    with pytest.raises(ValueError, match="p"):
        ops.dropout_forward(x4, 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ops.dropout_forward(x4, 0.5, seed=-1)
    with pytest.raises(TypeError, match="keep_mask"):
        ops.dropout_backward(x4, x4, 0.5)
    with pytest.raises(ValueError, match="ids"):
        ops.embedding_forward(np.zeros((3, 2), np.float32), np.array([0, 3]))
    with pytest.raises(TypeError, match="ids"):
        ops.embedding_forward(np.zeros((3, 2), np.float32), np.array([0.0]))
    with pytest.raises(ValueError, match="dy"):
        ops.softmax_backward(np.zeros(3, np.float32), np.zeros(4, np.float32))
    check()


def test_direct_c_calls_are_checked():
    from damex._lib import _C
    with pytest.raises(ValueError, match="y"):
        _C.linear_forward(np.zeros(3, np.float32), np.zeros(6, np.float32), np.zeros(12, np.float32),
                          None, 2, 3, 4)
    with pytest.raises(ValueError, match="conv2d"):
        _C.conv2d_forward(np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
                          None, (1, 1, 1, 1, 1, 3, 3, 1, 1, 0, 0))
    with pytest.raises(ValueError, match="embedding_forward"):
        _C.embedding_forward(np.zeros(2, np.float32), np.zeros(6, np.float32),
                             np.array([5], np.int64), 3, 2)
    with pytest.raises(ValueError, match="group_norm_forward"):
        _C.group_norm_forward(*(np.zeros(n, np.float32) for n in (6, 2, 2, 6, 3, 3)), 1, 3, 2, 2, 1e-5)


def test_memory_flat_over_many_small_calls():
    x = f32(rnd(2, 3, 5, 5))
    w = f32(rnd(4, 3, 3, 3))
    b = f32(rnd(4))
    v = f32(rnd(6, 8))
    g = np.ones(8, np.float32)

    x16 = f32(rnd(1, 16, 4, 5))
    w16 = f32(rnd(2, 16, 3, 3))
    x8, x8s2, w8 = f32(rnd(1, 8, 23, 23)), f32(rnd(1, 8, 46, 46)), f32(rnd(8, 8, 3, 3))

    def step():
        y = ops.conv2d_forward(x, w, b, 1, 1)
        ops.conv2d_backward(y, x, w, 1, 1)
        y = ops.conv2d_forward(x16, w16, None, 2, 1)  # the shifted algorithm
        ops.conv2d_backward(y, x16, w16, 2, 1)
        ops.conv2d_forward(x16, w16, None, 1, 1, algorithm="winograd")
        ops.conv2d_forward(x16, w16, None, 2, 1, algorithm="direct")
        for xi, st in ((x8, 1), (x8s2, 2)):  # 23x23 outputs: "auto" runs damex's own kernels
            ops.conv2d_backward(ops.conv2d_forward(xi, w8, None, st, 1), xi, w8, st, 1)
        yl, m, r = ops.layer_norm_forward(v, g, g)
        ops.layer_norm_backward(yl, v, m, r, g)
        yg, m, r = ops.group_norm_forward(x, g[:3], g[:3], 3)
        ops.group_norm_backward(yg, x, m, r, g[:3], 3)
        ops.linear_backward(ops.linear_forward(v, v[:, :8], g[:6]), v, v[:, :8])
        ops.softmax_backward(v, ops.softmax_forward(v))
        yd, k = ops.dropout_forward(v, 0.5, 1)
        ops.dropout_backward(yd, k, 0.5)
        ops.embedding_backward(ops.embedding_forward(v, [1, 2]), [1, 2], 6)
        ops.inverse_sigmoid_backward(v, ops.inverse_sigmoid_forward(ops.sigmoid_forward(v)))

    for _ in range(200):
        step()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(10000):
        step()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - before < 100_000, f"memory grew by {after - before} bytes"
