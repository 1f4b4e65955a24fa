"""Gradient utilities (torch.nn.utils)."""
import numpy as np

from .. import ops as _ops

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(parameters, max_norm):
    """Scale the gradients in place so their global L2 norm is at most ``max_norm``
    (``damex.ops.clip_grad_norm``).  Returns the total norm before clipping (a float),
    as ``torch.nn.utils.clip_grad_norm_``."""
    params = [p for p in ([parameters] if hasattr(parameters, "grad") else parameters) if p.grad is not None]
    if not params:
        return 0.0
    total, scale = _ops.clip_grad_norm([p.grad for p in params], float(max_norm))
    if scale < 1.0:
        for p in params:
            p.grad = p.grad * np.float32(scale)
    return float(total)
