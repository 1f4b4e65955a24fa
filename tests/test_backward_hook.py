"""autograd.set_backward_hook: the profiling callback sees every node once, with
its name and a duration, changes no gradient, and is gone once removed."""
import numpy as np

import damex.autograd as ag
from damex.autograd import Tensor


def _graph():
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    w = Tensor(np.ones((3, 2), np.float32), requires_grad=True)
    loss = ((x @ w).tanh() * 2.0).sum()
    return x, w, loss


def test_hook_sees_each_node_and_changes_nothing():
    x0, w0, loss0 = _graph()
    loss0.backward()
    seen = []
    old = ag.set_backward_hook(lambda node, sec: seen.append((node.name, sec)))
    try:
        x, w, loss = _graph()
        loss.backward()
    finally:
        assert ag.set_backward_hook(old) is not None
    assert old is None
    assert [n for n, _ in seen] == ["sum", "mul", "tanh", "matmul"]
    assert all(isinstance(s, float) and s >= 0 for _, s in seen)
    np.testing.assert_array_equal(x.grad, x0.grad)
    np.testing.assert_array_equal(w.grad, w0.grad)
    seen.clear()
    _, _, loss = _graph()
    loss.backward()
    assert seen == []
