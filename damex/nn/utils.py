"""Gradient utilities (torch.nn.utils)."""
import numpy as np

from .. import ops as _ops

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(parameters, max_norm, error_if_nonfinite=False):
    """Scale the gradients in place so their global L2 norm is at most ``max_norm``
    (``damex.ops.clip_grad_norm``), as ``torch.nn.utils.clip_grad_norm_``.

    Parameters
    ----------
    parameters : Parameter or iterable of Parameter (those without a grad are skipped)
    max_norm : float >= 0
    error_if_nonfinite : bool
        Raise ValueError when the total norm is nan or inf, leaving the grads
        untouched.  Otherwise (PyTorch's default) the grads are scaled as
        PyTorch does: by nan when the norm is nan (every grad becomes nan, so a
        non-finite gradient is never applied beside unclipped finite ones), by
        0 when it is inf.

    Returns
    -------
    total_norm : float
        The norm before clipping (nan or inf when a gradient is).
    """
    params = [p for p in ([parameters] if hasattr(parameters, "grad") else parameters) if p.grad is not None]
    if not params:
        return 0.0
    total, scale = _ops.clip_grad_norm([p.grad for p in params], float(max_norm),
                                       error_if_nonfinite=error_if_nonfinite)
    if not scale >= 1.0:  # also nan
        with np.errstate(invalid="ignore"):  # inf * 0 is nan, as in PyTorch
            for p in params:
                p.grad = p.grad * np.float32(scale)
    return float(total)
