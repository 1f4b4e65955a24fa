"""GELU (tanh/erf) and ReLU: values against a float64 NumPy reference and
PyTorch, gradients by central differences and PyTorch autograd."""
import math

import numpy as np
import pytest

from damex import ops
from helpers import assert_close, numeric_grad, torch_or_skip, unchanged
from damex.testing import torch_twins
from damex.testing.reference import activation as ref_forward



@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_forward_matches_reference(act):
    x = np.random.default_rng(0).normal(0, 3, (7, 33)).astype(np.float32)
    assert_close(ops.activation_forward(x, act), ref_forward(x, act), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_backward_matches_central_differences(act):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (5, 6))
    x = x[np.abs(x) > 1e-3]  # keep ReLU away from its kink
    dy = rng.normal(size=x.shape)
    num = numeric_grad(lambda v: (ref_forward(v, act) * dy).sum(), x)
    got = ops.activation_backward(dy.astype(np.float32), x.astype(np.float32), act)
    assert_close(got, num, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_parity_with_torch(act):
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, (64, 17)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_twins.activation(xt, act)
    yt.backward(torch.tensor(dy))
    # float32 against float32: both sit within ~1e-6 of the float64 truth
    assert_close(ops.activation_forward(x, act), yt.detach().numpy(), atol=5e-6, rtol=1e-5)
    assert_close(ops.activation_backward(dy, x, act), xt.grad.numpy(), atol=5e-6, rtol=1e-5)


def test_extreme_inputs_stay_finite():
    x = np.array([-1e4, -100, -88, 0, 88, 100, 1e4], np.float32)
    for act in ops.ACTIVATIONS:
        assert np.isfinite(ops.activation_forward(x, act)).all()
        assert np.isfinite(ops.activation_backward(np.ones_like(x), x, act)).all()


def test_bad_input():
    with pytest.raises(ValueError, match="activation"):
        ops.activation_forward(np.zeros(3, np.float32), "swish")
    with pytest.raises(TypeError, match="x"):
        ops.activation_forward(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="dy"):
        ops.activation_backward(np.zeros(4, np.float32), np.zeros(3, np.float32))


def test_inputs_not_modified_and_noncontiguous_accepted():
    x = np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32)
    check = unchanged(x)
    got = ops.activation_forward(x.T, "gelu")
    check()
    assert_close(got, ops.activation_forward(np.ascontiguousarray(x.T), "gelu"), atol=0, rtol=0)
