"""Elementwise activations: GELU (tanh or erf form) and ReLU.

``gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (PyTorch
``approximate="tanh"``), ``gelu(x) = x Phi(x)`` (the erf form, PyTorch's
default), ``relu(x) = max(x, 0)``.  ReLU keeps NaN (its gradient passes ``dy``
there), as PyTorch.  Past ``|x| = 10`` both GELUs return ``x`` or ``-0`` and
their derivatives exactly 1 or 0 (csrc/kernels/activation_scalar.h).
"""
import numpy as np

from .._lib import _C
from ._check import choice, f32

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


def activation_code(activation):
    """The C enum value of an activation name (see csrc/kernels/activation.h)."""
    return choice(activation, "activation", ACTIVATIONS)


def activation_forward(x, activation="gelu_tanh"):
    """y = act(x), any shape.

    Parameters
    ----------
    x : ndarray, float32, any shape
    activation : {"gelu_tanh", "gelu", "relu"}

    Returns
    -------
    y : ndarray, float32, same shape as x
    """
    code = activation_code(activation)
    x = f32(x, "x")
    y = np.empty_like(x)
    _C.activation_forward(y, x, code)
    return y


def activation_backward(dy, x, activation="gelu_tanh"):
    """dx = dy * act'(x), shapes as in :func:`activation_forward`."""
    code = activation_code(activation)
    x = f32(x, "x")
    dy = f32(dy, "dy", shape=x.shape)
    dx = np.zeros_like(x)
    _C.activation_backward(dx, dy, x, code)
    return dx
