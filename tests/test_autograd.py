"""The tape against PyTorch: every tensor op's values and gradients (tinygrad's
test_ops style: same inputs, a random upstream gradient, compare), broadcasting,
reuse, no_grad, detach; then every functional op over a couple of shapes."""
import numpy as np
import pytest

import damex.autograd as ag
import damex.functional as F
from damex.autograd import Tensor
from helpers import assert_close, torch_or_skip
from damex.testing import torch_twins

torch = torch_or_skip()


def check_op(shapes, damex_fn, torch_fn, *, low=-2.0, high=2.0, atol=1e-5, rtol=1e-4, seed=0,
             inputs=None, grad=True):
    """Run damex_fn and torch_fn on the same random inputs; compare outputs and the
    input gradients of sum(out * upstream)."""
    rng = np.random.default_rng(seed)
    xs = inputs if inputs is not None else [rng.uniform(low, high, s).astype(np.float32) for s in shapes]
    dx = [Tensor(x, requires_grad=grad) for x in xs]
    tx = [torch.tensor(x, requires_grad=grad) for x in xs]
    out_d, out_t = damex_fn(*dx), torch_fn(*tx)
    outs_d = out_d if isinstance(out_d, (tuple, list)) else [out_d]
    outs_t = out_t if isinstance(out_t, (tuple, list)) else [out_t]
    loss_d, loss_t = 0, 0
    for i, (od, ot) in enumerate(zip(outs_d, outs_t)):
        assert_close(od.data, ot.detach().numpy(), atol, rtol, f"output {i}")
        up = rng.standard_normal(od.shape).astype(np.float32)
        loss_d = loss_d + (od * up).sum()
        loss_t = loss_t + (ot * torch.tensor(up)).sum()
    if not grad:
        return
    loss_d.backward()
    loss_t.backward()
    for i, (a, b) in enumerate(zip(dx, tx)):
        if b.grad is None:
            assert a.grad is None or not np.any(a.grad), f"grad {i}: torch has none"
            continue
        assert_close(a.grad, b.grad.numpy(), atol, rtol, f"grad of input {i}")


# ------------------------------------------------------------------ algebra

@pytest.mark.parametrize("shapes", [[(3, 4), (3, 4)], [(3, 4), (4,)], [(2, 1, 4), (3, 1)], [(5,), ()]])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_broadcast(shapes, op):
    fn = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
          "mul": lambda a, b: a * b, "div": lambda a, b: a / (b * b + 0.5)}[op]
    check_op(shapes, fn, fn)


def test_scalars_and_arrays_on_either_side():
    arr = np.linspace(-1, 1, 4).astype(np.float32)
    fn_d = lambda a: (2.0 - a) * 3 + 1 / (a * a + 1) - arr + arr * a + a / 2  # noqa: E731
    fn_t = lambda a: (2.0 - a) * 3 + 1 / (a * a + 1) - torch.tensor(arr) + torch.tensor(arr) * a + a / 2  # noqa: E731
    check_op([(3, 4)], fn_d, fn_t)
    assert isinstance(arr + Tensor(arr), Tensor)   # numpy defers to Tensor.__radd__


@pytest.mark.parametrize("name", ["neg", "exp", "log", "sqrt", "abs", "tanh", "pow2", "pow_half"])
def test_unary(name):
    low = 0.1 if name in ("log", "sqrt", "pow_half") else -2.0
    fn = {"neg": lambda a: -a, "exp": lambda a: a.exp(), "log": lambda a: a.log(),
          "sqrt": lambda a: a.sqrt(), "abs": lambda a: a.abs(), "tanh": lambda a: a.tanh(),
          "pow2": lambda a: a ** 2, "pow_half": lambda a: a ** 0.5}[name]
    check_op([(3, 5)], fn, fn, low=low)


def test_clamp_and_where():
    x = np.array([[-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]], np.float32)   # values on the bounds too
    check_op(None, lambda a: a.clamp(-1.0, 1.0), lambda a: a.clamp(-1.0, 1.0), inputs=[x])
    check_op(None, lambda a: a.clamp(min=0.0), lambda a: a.clamp(min=0.0), inputs=[x])
    cond = np.array([True, False, True, False])
    check_op([(3, 4), (4,)], lambda a, b: ag.where(cond, a, b), lambda a, b: torch.where(torch.tensor(cond), a, b))
    m = np.array([[True], [False], [True]])
    check_op([(3, 4)], lambda a: a.masked_fill(m, -5.0), lambda a: a.masked_fill(torch.tensor(m), -5.0))


@pytest.mark.parametrize("shapes", [[(3, 4), (4, 5)], [(2, 3, 4), (4, 5)], [(2, 3, 4), (2, 4, 5)],
                                    [(2, 1, 3, 4), (5, 4, 2)], [(4,), (4, 5)], [(3, 4), (4,)], [(4,), (4,)]])
def test_matmul(shapes):
    check_op(shapes, lambda a, b: a @ b, lambda a, b: a @ b)


@pytest.mark.parametrize("axis,keep", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_sum_mean(axis, keep):
    check_op([(2, 3, 4)], lambda a: a.sum(axis, keep), lambda a: a.sum(dim=axis, keepdim=keep) if axis is not None else a.sum())
    check_op([(2, 3, 4)], lambda a: a.mean(axis, keep), lambda a: a.mean(dim=axis, keepdim=keep) if axis is not None else a.mean())


def test_max_over_axis():
    check_op([(3, 5)], lambda a: a.max(1), lambda a: a.max(1).values)
    check_op([(3, 5)], lambda a: a.max(0, keepdims=True), lambda a: a.max(0, keepdim=True).values)
    check_op([(3, 5)], lambda a: a.max(), lambda a: a.max())
    x = Tensor(np.array([[1.0, 3.0, 2.0]], np.float32))
    np.testing.assert_array_equal(x.argmax(-1), [1])


def test_shape_ops():
    check_op([(2, 3, 4)], lambda a: a.reshape(4, 6) * 1, lambda a: a.reshape(4, 6) * 1)
    check_op([(2, 3, 4)], lambda a: a.view(-1, 4), lambda a: a.view(-1, 4))
    check_op([(2, 3, 4)], lambda a: a.permute(2, 0, 1), lambda a: a.permute(2, 0, 1))
    check_op([(2, 3, 4)], lambda a: a.transpose(0, 2), lambda a: a.transpose(0, 2))
    check_op([(2, 3, 4)], lambda a: a.flatten(1), lambda a: a.flatten(1))
    check_op([(2, 3, 4)], lambda a: a.unsqueeze(1).squeeze(1), lambda a: a.unsqueeze(1).squeeze(1))
    check_op([(3, 1)], lambda a: a.expand(2, 3, 4), lambda a: a.expand(2, 3, 4))
    check_op([(3, 4)], lambda a: a.T, lambda a: a.T)


def test_indexing():
    check_op([(4, 5)], lambda a: a[1:3, ::2], lambda a: a[1:3, ::2])
    check_op([(4, 5)], lambda a: a[:, None, 2], lambda a: a[:, None, 2])
    idx = np.array([0, 2, 2, 3], np.int64)                       # a repeated index accumulates
    check_op([(4, 5)], lambda a: a[idx], lambda a: a[torch.tensor(idx)])
    check_op([(4, 5)], lambda a: a[idx, idx + 1], lambda a: a[torch.tensor(idx), torch.tensor(idx + 1)])
    m = np.array([True, False, True, True])
    check_op([(4, 5)], lambda a: a[m], lambda a: a[torch.tensor(m)])
    g = np.array([[0, 0, 3], [1, 4, 4]], np.int64)
    check_op([(2, 5)], lambda a: a.gather(1, g), lambda a: a.gather(1, torch.tensor(g)))
    g0 = np.array([[1, 0, 1, 1, 0]], np.int64)
    check_op([(2, 5)], lambda a: a.gather(0, g0), lambda a: a.gather(0, torch.tensor(g0)))
    check_op([(4, 5)], lambda a: ag.index_select(a, 1, idx), lambda a: a.index_select(1, torch.tensor(idx)))


def test_cat_stack_split():
    check_op([(2, 3), (4, 3)], lambda a, b: ag.cat([a, b], 0), lambda a, b: torch.cat([a, b], 0))
    check_op([(2, 3), (2, 3)], lambda a, b: ag.stack([a, b], 1), lambda a, b: torch.stack([a, b], 1))
    check_op([(2, 7)], lambda a: a.split(3, 1), lambda a: a.split(3, 1))
    check_op([(2, 7)], lambda a: a.split([2, 5], 1), lambda a: a.split([2, 5], 1))
    # only some outputs of a split used: the rest get zero gradient
    check_op([(6, 2)], lambda a: a.split(2)[1] * 2, lambda a: a.split(2)[1] * 2)


def test_comparisons_are_arrays():
    a = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    for r in (a > 1.5, a >= 2, a < 2, a <= 2, a == 2, a != 2):
        assert isinstance(r, np.ndarray) and r.dtype == np.bool_
    np.testing.assert_array_equal(a > Tensor([0.0, 5.0, 1.0]), [True, False, True])


# --------------------------------------------------------------- the tape

def test_reuse_accumulates():
    """x used in several places, and a shared intermediate: gradients add up."""
    def f(x, w):
        h = x @ w
        return (h * h).sum() + (h * x[:, :2].sum()).mean() + (x * 3).sum()
    check_op([(3, 4), (4, 4)], lambda x, w: f(x, w), lambda x, w: f(x, w))


def test_backward_accumulates_across_calls_and_grad_arg():
    x = Tensor(np.ones(3), requires_grad=True)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad, [5, 5, 5])
    y = x * x
    y.backward(np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(x.grad, [7, 9, 11])
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 1).backward()


def test_graph_freed_unless_retained():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad, [4, 8])
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_no_grad_and_detach():
    x = Tensor([1.0, 2.0], requires_grad=True)
    assert ag.is_grad_enabled()
    with ag.no_grad():
        assert not ag.is_grad_enabled()
        y = x * 2
        with ag.enable_grad():
            z = x * 2
    assert ag.is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad
    d = (x * 3).detach()
    assert not d.requires_grad and d.is_leaf
    w = (d * x).sum()
    w.backward()
    np.testing.assert_array_equal(x.grad, [3, 6])  # nothing flowed through d
    with pytest.raises(RuntimeError):
        d.sum().backward()


def test_retain_grad_and_leaf_flags():
    x = Tensor([1.0, 2.0], requires_grad=True)
    h = (x * 2).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_array_equal(h.grad, [4, 8])
    assert x.is_leaf and not h.is_leaf
    assert x.numpy() is x.data and x.shape == (2,) and x.dtype == np.float32


def test_multi_output_node_gets_zeros_for_unused_outputs():
    x = Tensor([1.0, 2.0], requires_grad=True)
    calls = []

    def backward(gs):
        calls.append([g.copy() for g in gs])
        return (gs[0] * 2 + gs[1] * 3,)
    a, b = ag.record((x.data * 2, x.data * 3), [x], backward, "two")
    (b * 1).sum().backward()
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0][0], [0, 0])
    np.testing.assert_array_equal(x.grad, [3, 3])
    x.grad = None
    a, b = ag.record((x.data * 2, x.data * 3), [x], backward, "two")
    (a + b).sum().backward()
    assert len(calls) == 2       # one call for both outputs
    np.testing.assert_array_equal(x.grad, [5, 5])


def test_float32_everywhere():
    x = Tensor(np.arange(3, dtype=np.float64), requires_grad=True)
    assert x.dtype == np.float32
    y = (x * 2.5 + np.float64(1)).sum()
    y.backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32


# ================================================================ functional ops
# (each against the PyTorch formula)

def tf():
    return torch.nn.functional


@pytest.mark.parametrize("shape,bias", [((5, 4), True), ((2, 3, 4), False)])
def test_linear(shape, bias):
    shapes = [shape, (6, 4)] + ([(6,)] if bias else [])
    check_op(shapes, lambda *a: F.linear(*a), lambda *a: tf().linear(*a))


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 16)])
def test_layer_norm(shape):
    C = shape[-1]
    check_op([shape, (C,), (C,)], lambda x, w, b: F.layer_norm(x, (C,), w, b),
             lambda x, w, b: tf().layer_norm(x, (C,), w, b), atol=1e-4)


@pytest.mark.parametrize("shape,groups", [((2, 4, 3, 5), 2), ((1, 6, 4, 4), 3)])
def test_group_norm(shape, groups):
    C = shape[1]
    check_op([shape, (C,), (C,)], lambda x, w, b: F.group_norm(x, groups, w, b),
             lambda x, w, b: tf().group_norm(x, groups, w, b), atol=1e-4)


def test_frozen_batch_norm():
    rng = np.random.default_rng(0)
    w, b, rm = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
    rv = rng.uniform(0.5, 2, 3).astype(np.float32)

    check_op([(2, 3, 4, 5)], lambda x: F.frozen_batch_norm(x, w, b, rm, rv),
             lambda x: torch_twins.frozen_batch_norm(x, w, b, rm, rv))


@pytest.mark.parametrize("xs,ws,stride,padding,bias", [((2, 3, 7, 6), (4, 3, 3, 3), 1, 1, True),
                                                        ((1, 2, 8, 8), (3, 2, 1, 1), 2, 0, False),
                                                        ((1, 2, 9, 7), (2, 2, 3, 3), 2, 1, True)])
def test_conv2d(xs, ws, stride, padding, bias):
    shapes = [xs, ws] + ([(ws[0],)] if bias else [])
    check_op(shapes, lambda *a: F.conv2d(*a, stride=stride, padding=padding),
             lambda *a: tf().conv2d(*a, stride=stride, padding=padding), atol=1e-4)


@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh"])
def test_activations(kind):
    d = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[kind]
    check_op([(4, 7)], d, lambda x: torch_twins.activation(x, kind))


def test_sigmoid_and_inverse_sigmoid():
    check_op([(3, 5)], F.sigmoid, torch.sigmoid, low=-4, high=4)
    inv = torch_twins.inverse_sigmoid
    x = np.array([[-0.1, 0.0, 1e-7, 0.2, 0.5, 0.9, 1.0, 1.3]], np.float32)
    check_op(None, F.inverse_sigmoid, inv, inputs=[x], atol=1e-4)
    check_op([(4, 4)], F.inverse_sigmoid, inv, low=0.05, high=0.95)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax(dim):
    check_op([(3, 4, 5)], lambda x: F.softmax(x, dim), lambda x: torch.softmax(x, dim), low=-3, high=3)


def test_dropout_matches_mask_and_seed():
    x = Tensor(np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32), requires_grad=True)
    y = F.dropout(x, 0.3, seed=11)
    keep = y.data != 0
    np.testing.assert_allclose(y.data, np.where(keep, x.data / 0.7, 0), rtol=1e-6)
    up = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    (y * up).sum().backward()
    np.testing.assert_allclose(x.grad, np.where(keep, up / 0.7, 0), rtol=1e-6)
    np.testing.assert_array_equal(F.dropout(x, 0.3, seed=11).data, y.data)
    assert F.dropout(x, 0.3, training=False) is x


def test_embedding():
    ids = np.array([[0, 3, 3], [1, 0, 4]], np.int64)
    check_op([(5, 6)], lambda w: F.embedding(ids, w), lambda w: tf().embedding(torch.tensor(ids), w))


@pytest.mark.parametrize("masks", [False, True])
def test_attention(masks):
    N, Lq, Lk, C, H = 2, 5, 6, 8, 2
    am = kpm = None
    if masks:
        am = np.zeros((Lq, Lk), bool)
        am[0, 3:] = True
        am[2, :2] = True
        kpm = np.zeros((N, Lk), bool)
        kpm[1, -2:] = True
    check_op([(N, Lq, C), (N, Lk, C), (N, Lk, C)],
             lambda q, k, v: F.attention(q, k, v, H, am, kpm)[0],
             lambda q, k, v: torch_twins.attention(q, k, v, H, am, kpm)[0])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(N, Lq, C), (N, Lk, C), (N, Lk, C)])
    _, attn = F.attention(q, k, v, H, am, kpm)
    _, ta = torch_twins.attention(*(torch.tensor(a) for a in (q, k, v)), H, am, kpm)
    assert_close(attn.data, ta.numpy(), 1e-5, 1e-4, "attn")
    assert not attn.requires_grad


@pytest.mark.parametrize("shapes", [[(4, 5)], [(6, 4), (3, 2)]])
def test_ms_deform_attn(shapes):
    shapes = np.array(shapes, np.int64)
    start = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    N, Lq, M, D, L, P = 2, 3, 2, 4, len(shapes), 2
    rng = np.random.default_rng(0)
    value = rng.standard_normal((N, S, M, D)).astype(np.float32)
    loc = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2)).astype(np.float32)   # some off the map
    w = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(np.float32)
    check_op(None, lambda v, l_, a: F.ms_deform_attn(v, shapes, start, l_, a),
             lambda v, l_, a: torch_twins.ms_deform_attn(v, shapes, l_, a), inputs=[value, loc, w], atol=1e-4)


def random_cxcywh(rng, n):
    return np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.4, (n, 2))], 1).astype(np.float32)


def test_boxes_and_giou():
    rng = np.random.default_rng(0)
    a, b = random_cxcywh(rng, 5), random_cxcywh(rng, 4)
    check_op(None, F.box_cxcywh_to_xyxy, torch_twins.cxcywh_to_xyxy, inputs=[a])
    check_op(None, F.box_xyxy_to_cxcywh, torch_twins.xyxy_to_cxcywh, inputs=[a])
    check_op(None, lambda x, y: F.generalized_box_iou(F.box_cxcywh_to_xyxy(x), F.box_cxcywh_to_xyxy(y)),
             lambda x, y: torch_twins.generalized_box_iou(torch_twins.cxcywh_to_xyxy(x), torch_twins.cxcywh_to_xyxy(y)), inputs=[a, b], atol=1e-4)


def test_paired_giou_is_the_diagonal():
    rng = np.random.default_rng(1)
    a, b = random_cxcywh(rng, 6), random_cxcywh(rng, 6)
    check_op(None, lambda x, y: F.generalized_box_iou_paired(F.box_cxcywh_to_xyxy(x), F.box_cxcywh_to_xyxy(y)),
             lambda x, y: torch.diagonal(torch_twins.generalized_box_iou(torch_twins.cxcywh_to_xyxy(x), torch_twins.cxcywh_to_xyxy(y))),
             inputs=[a, b], atol=1e-4)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_and_l1(reduction):
    rng = np.random.default_rng(0)
    targets = (rng.uniform(size=(6, 3)) < 0.3).astype(np.float32)
    red = {"none": lambda z: z, "mean": lambda z: z.mean(), "sum": lambda z: z.sum()}[reduction]
    check_op([(6, 3)], lambda x: F.sigmoid_focal_loss(x, targets, reduction=reduction),
             lambda x: red(torch_twins.sigmoid_focal_loss(x, torch.tensor(targets))), low=-3, high=3)
    check_op([(6, 4), (6, 4)], lambda a, b: F.l1_loss(a, b, reduction=reduction),
             lambda a, b: tf().l1_loss(a, b, reduction=reduction))


# ------------------------------------------------------------------------- MoE

MOE_CASES = [
    dict(k=1, losses=("damex",), mask=False, act="gelu_tanh", normalize=False),
    dict(k=2, losses=("importance", "load"), mask=True, act="gelu", normalize=False),
    dict(k=2, losses=("switch", "z", "damex"), mask=False, act="relu", normalize=True),
]


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_op_and_routing_loss_gradients(case):
    """y and aux loss from one node: d(sum y*up + aux)/d(params) equals torch's,
    including the router weight's gradient through the routing losses."""
    rng = np.random.default_rng(0)
    T, D, E, Fh, k = 12, 6, 4, 5, case["k"]
    x = rng.standard_normal((T, D)).astype(np.float32)
    params = [rng.standard_normal(s).astype(np.float32) * 0.5
              for s in [(D, E), (E, D, Fh), (E, Fh), (E, Fh, D), (E, D)]]
    noise = rng.normal(0, 0.25, (T, E)).astype(np.float32)
    target = rng.integers(0, E, T).astype(np.int64)
    mask = (np.arange(T) % 5 != 4) if case["mask"] else None
    weights = {"importance": 0.5, "load": 0.7, "switch": 0.3, "z": 0.01, "damex": 0.9}
    losses = []
    for name in case["losses"]:
        kw = {"expert_target": target} if name == "damex" else {"sigma": 0.25} if name == "load" else {}
        losses.append((name, weights[name], kw))
    dts = [Tensor(a, requires_grad=True) for a in [x] + params]
    y, aux, state = F.moe(*dts, k=k, noise=noise, activation=case["act"], mask=mask,
                          normalize=case["normalize"], losses=losses)
    up = rng.standard_normal((T, D)).astype(np.float32)
    ((y * up).sum() + aux).backward()

    tts = [torch.tensor(a, requires_grad=True) for a in [x] + params]
    ty, logits, noisy = torch_twins.moe_layer_on_choices(*tts, state.router.expert_index, noise, case["act"], case["normalize"])
    if mask is not None:
        ty = ty * torch.tensor(mask, dtype=torch.float32)[:, None]
    twin = {"importance": lambda: torch_twins.importance_loss(logits, mask),
            "load": lambda: torch_twins.load_loss(logits, noise, 0.25, k, mask),
            "switch": lambda: torch_twins.switch_loss(logits, k, mask),
            "z": lambda: torch_twins.z_loss(logits, mask),
            "damex": lambda: torch_twins.damex_loss(logits, target, mask)}
    taux = sum(weights[n] * twin[n]() for n in case["losses"])
    assert_close(y.data, ty.detach().numpy(), 1e-5, 1e-4, "y")
    assert_close(aux.data, taux.detach().numpy(), 1e-5, 1e-4, "aux loss")
    ((ty * torch.tensor(up)).sum() + taux).backward()
    for name, a, b in zip(["x", "w_router", "w1", "b1", "w2", "b2"], dts, tts):
        assert_close(a.grad, b.grad.numpy(), 1e-4, 1e-3, f"d{name}")


def test_moe_aux_loss_alone_reaches_router():
    """Only the routing loss is used: dy = 0 goes in, the router still gets its gradient."""
    rng = np.random.default_rng(1)
    T, D, E = 8, 4, 3
    x = Tensor(rng.standard_normal((T, D)).astype(np.float32), requires_grad=True)
    ws = [Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)
          for s in [(D, E), (E, D, 5), (E, 5), (E, 5, D), (E, D)]]
    target = np.arange(T) % E
    _, aux, _ = F.moe(x, *ws, losses=[("damex", 1.0, {"expert_target": target})])
    aux.backward()
    tx, twr = torch.tensor(x.data, requires_grad=True), torch.tensor(ws[0].data, requires_grad=True)
    torch_twins.damex_loss(tx @ twr, target).backward()
    assert_close(ws[0].grad, twr.grad.numpy(), 1e-5, 1e-4, "dw_router")
    assert_close(x.grad, tx.grad.numpy(), 1e-5, 1e-4, "dx")
    assert not ws[1].grad.any()


def test_routing_loss_node():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 4, 7)
    check_op([(7, 4)], lambda g: F.routing_loss("damex", g, 0.5, expert_target=target),
             lambda g: 0.5 * torch_twins.damex_loss(g, target))
    check_op([(7, 4)], lambda g: F.routing_loss("z", g), torch_twins.z_loss)


def test_torch_style_methods():
    check_op([(3, 4)], lambda a: a.sigmoid() + a.softmax(0) + a.relu(),
             lambda a: a.sigmoid() + a.softmax(0) + a.relu())
    x = Tensor(np.zeros((2, 3)))
    assert x.size() == (2, 3) and x.size(1) == 3 and x.numel() == 6 and x.dim() == 2


def test_moe_importance_on_noisy_probs_gets_the_layers_noise():
    rng = np.random.default_rng(3)
    T, D, E = 10, 4, 3
    x = rng.standard_normal((T, D)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) for s in [(D, E), (E, D, 5), (E, 5), (E, 5, D), (E, D)]]
    noise = rng.normal(0, 0.3, (T, E)).astype(np.float32)
    vals = {}
    F.moe(x, *ws, noise=noise, losses=[("importance", 1.0, {"probs": "noisy"})], loss_values=vals)
    want = torch_twins.importance_loss(torch.tensor(x @ ws[0]), noise=noise, probs="noisy")
    assert vals["importance"] == pytest.approx(float(want), rel=1e-5)
