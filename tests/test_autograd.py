"""The tape against PyTorch: every tensor op's values and gradients (tinygrad's
test_ops style: same inputs, a random upstream gradient, compare), broadcasting,
reuse, no_grad, detach; then every functional op over a couple of shapes."""
import numpy as np
import pytest

import damex.autograd as ag
import damex.functional as F
from damex import ops
from damex.autograd import Tensor
from helpers import assert_close, torch_or_skip

torch = torch_or_skip()


def needs(*names):
    missing = [n for n in names if not hasattr(ops, n)]
    return pytest.mark.skipif(bool(missing), reason=f"damex.ops lacks {missing} (kernel family not merged)")


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
