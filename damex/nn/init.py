"""Parameter initialisers (PyTorch's formulas) drawing from a numpy Generator.

Every function takes the array to fill (a Parameter or ndarray, filled in place)
and an optional ``rng``; without one they draw from the module generator that
:func:`manual_seed` resets, so the same seed builds the same model.
"""
import math

import numpy as np

__all__ = ["manual_seed", "default_generator", "uniform_", "normal_", "zeros_", "ones_",
           "constant_", "xavier_uniform_", "kaiming_uniform_", "fan_in_and_fan_out"]

_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Reseed the generator that module initialisation draws from."""
    global _rng
    _rng = np.random.default_rng(seed)


def default_generator():
    return _rng


def _arr(t):
    return t.data if hasattr(t, "data") and not isinstance(t, np.ndarray) else t


def uniform_(t, a=0.0, b=1.0, rng=None):
    a_ = _arr(t)
    a_[...] = (rng or _rng).uniform(a, b, a_.shape)
    return t


def normal_(t, mean=0.0, std=1.0, rng=None):
    a_ = _arr(t)
    a_[...] = (rng or _rng).normal(mean, std, a_.shape)
    return t


def constant_(t, value):
    _arr(t)[...] = value
    return t


def zeros_(t):
    return constant_(t, 0.0)


def ones_(t):
    return constant_(t, 1.0)


def fan_in_and_fan_out(shape):
    """PyTorch's fans: dim 1 and dim 0, times the receptive field (dims 2+)."""
    if len(shape) < 2:
        raise ValueError(f"fans need at least 2 dimensions, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def xavier_uniform_(t, gain=1.0, rng=None):
    fan_in, fan_out = fan_in_and_fan_out(_arr(t).shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, -bound, bound, rng)


def kaiming_uniform_(t, a=0.0, rng=None):
    """He uniform with leaky-relu slope ``a`` over fan_in (``a=sqrt(5)`` is nn.Linear's default)."""
    fan_in, _ = fan_in_and_fan_out(_arr(t).shape)
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    return uniform_(t, -bound, bound, rng)
