"""AdamW, global gradient-norm clipping and a multi-step learning-rate schedule.

``adamw_step`` is the one op in damex.ops that writes into its arguments: it
updates a parameter and its two moment buffers in place, as
``torch.optim.AdamW`` does (the optimizer owns that state).  Everything else
here only reads.
"""
import bisect
import math

import numpy as np

from .._lib import _C
from ._check import f32, float_arg, int_arg


STEP_MAX = 2 ** 63 - 1  # adamw_step's count is a C int64


def _state_array(x, name, shape=None):
    """An array adamw_step may write: float32, C-contiguous, writeable, no conversion."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray (updated in place), got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32 (updated in place), got dtype {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (updated in place)")
    if not x.flags.writeable:
        raise ValueError(f"{name}: array is not writeable")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return x


def _beta(v, name):
    v = float_arg(v, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: must be in [0, 1), got {v}")
    return v


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=1e-4):
    """One AdamW step (``torch.optim.AdamW``, ``amsgrad=False``), in place.

    ::

        param      *= 1 - lr * weight_decay
        exp_avg     = lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq  = beta2 * exp_avg_sq + (1 - beta2) * grad**2
        param      -= lr / (1 - beta1**step) * exp_avg
                      / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

    Parameters
    ----------
    param : ndarray, float32, C-contiguous, any shape; updated in place
    grad : ndarray, floating, same shape (read only; converted to float32)
    exp_avg, exp_avg_sq : ndarray, float32, C-contiguous, same shape; updated in
        place (start them at zero)
    step : int in [1, 2**63 - 1]
        The number of this step, counting from 1 (PyTorch increments its step
        count before the update); the kernel takes a 64-bit count.
    lr : float >= 0
    beta1, beta2 : float in [0, 1)
    eps, weight_decay : float >= 0

    Returns
    -------
    None.  ``grad`` is not checked for NaN (as in PyTorch); check
    ``grad_global_norm`` first if that matters.
    """
    param = _state_array(param, "param")
    exp_avg = _state_array(exp_avg, "exp_avg", param.shape)
    exp_avg_sq = _state_array(exp_avg_sq, "exp_avg_sq", param.shape)
    grad = f32(grad, "grad", shape=param.shape)
    step = int_arg(step, "step", lo=1, hi=STEP_MAX)
    lr = float_arg(lr, "lr", nonneg=True)
    beta1 = _beta(beta1, "beta1")
    beta2 = _beta(beta2, "beta2")
    eps = float_arg(eps, "eps", nonneg=True)
    weight_decay = float_arg(weight_decay, "weight_decay", nonneg=True)
    arrays = {"param": param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "grad": grad}
    names = list(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.shares_memory(arrays[a], arrays[b]):
                raise ValueError(f"{a} and {b}: must not share memory")
    _C.adamw_step(param, exp_avg, exp_avg_sq, grad, step, lr, beta1, beta2, eps, weight_decay)


def _grad_list(grads):
    if isinstance(grads, np.ndarray):
        grads = [grads]
    elif isinstance(grads, (str, bytes)) or not hasattr(grads, "__iter__"):
        raise TypeError(f"grads: expected an ndarray or an iterable of ndarrays, "
                        f"got {type(grads).__name__}")
    return [f32(g, f"grads[{i}]") for i, g in enumerate(grads) if g is not None]


def grad_global_norm(grads):
    """The L2 norm of all gradients taken together.

    ``sqrt(sum over arrays, sum over elements of g**2)``, accumulated in float64
    in a fixed order (the same bits for any thread count).

    Parameters
    ----------
    grads : iterable of ndarray (any shapes; ``None`` entries are skipped), or one ndarray

    Returns
    -------
    total_norm : float (inf or nan if a gradient is)
    """
    return math.sqrt(sum(_C.sum_of_squares(g) for g in _grad_list(grads)))


def clip_grad_norm(grads, max_norm, error_if_nonfinite=False):
    """The clipping factor of ``torch.nn.utils.clip_grad_norm_`` (norm type 2).

    ``scale = min(max_norm / (total_norm + 1e-6), 1)``; the caller multiplies
    every gradient by ``scale`` (the grads are not modified here) whenever
    ``not scale >= 1``: a nan scale must be applied too (``scale < 1`` is false
    for nan, which once left finite gradients unclipped beside nan ones);
    ``damex.nn.utils.clip_grad_norm_`` does this.

    Parameters
    ----------
    grads : iterable of ndarray, or one ndarray
    max_norm : float >= 0
    error_if_nonfinite : bool
        Raise ValueError when the total norm is nan or inf (PyTorch raises a
        RuntimeError); otherwise return it, with the scale PyTorch would apply
        (0 for inf, nan for nan).

    Returns
    -------
    total_norm : float
        The norm before clipping.
    scale : float
    """
    max_norm = float_arg(max_norm, "max_norm", nonneg=True)
    total = grad_global_norm(grads)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise ValueError(f"grads: the total gradient norm is {total}")
        return total, (math.nan if math.isnan(total) else 0.0)
    coef = max_norm / (total + 1e-6)
    return total, min(coef, 1.0)


class MultiStepLR:
    """Learning rate multiplied by ``gamma`` at each milestone.

    ``lr(t) = base_lr * gamma ** (number of milestones <= t)``, the closed form
    of ``torch.optim.lr_scheduler.MultiStepLR`` (repeated milestones count
    repeatedly, as there).  ``t`` is whatever the caller steps by: epochs or
    iterations.

    Parameters
    ----------
    base_lr : float >= 0
    milestones : iterable of int >= 0
    gamma : float > 0, default 0.1

    Examples
    --------
    >>> sched = MultiStepLR(1.0, [40, 60], 0.5)
    >>> sched.lr(39), sched.lr(40), sched.lr(60)
    (1.0, 0.5, 0.25)
    """

    def __init__(self, base_lr, milestones, gamma=0.1):
        self.base_lr = float_arg(base_lr, "base_lr", nonneg=True)
        self.milestones = sorted(int_arg(m, "milestones", lo=0) for m in milestones)
        self.gamma = float_arg(gamma, "gamma", positive=True)
        self.last_epoch = 0

    def lr(self, epoch_or_step):
        """The learning rate at epoch (or step) ``epoch_or_step`` >= 0."""
        t = int_arg(epoch_or_step, "epoch_or_step", lo=0)
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)

    def step(self):
        """Advance ``last_epoch`` by one and return the learning rate there."""
        self.last_epoch += 1
        return self.lr(self.last_epoch)

    def get_lr(self):
        """The learning rate at ``last_epoch``."""
        return self.lr(self.last_epoch)

    def state_dict(self):
        """Plain numbers: base_lr, milestones (list of int), gamma, last_epoch."""
        return {"base_lr": self.base_lr, "milestones": list(self.milestones),
                "gamma": self.gamma, "last_epoch": self.last_epoch}

    def load_state_dict(self, state):
        """Restore from :meth:`state_dict` (validated as in the constructor)."""
        other = MultiStepLR(state["base_lr"], state["milestones"], state["gamma"])
        other.last_epoch = int_arg(state.get("last_epoch", 0), "last_epoch", lo=0)
        self.__dict__.update(other.__dict__)

    def __repr__(self):
        return (f"MultiStepLR(base_lr={self.base_lr}, milestones={self.milestones}, "
                f"gamma={self.gamma}, last_epoch={self.last_epoch})")
