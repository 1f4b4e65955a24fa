"""Optimizers and learning-rate schedules in the style of ``torch.optim``.

``AdamW`` keeps PyTorch's semantics (decoupled weight decay, bias correction)
and runs ``damex.ops.adamw_step`` on every parameter.  State dicts are flat
dicts of NumPy arrays, so ``damex.nn.save(optimizer, path)`` writes them
without pickle and ``load_state_dict(damex.nn.load(path))`` restores them.
"""
import numpy as np

from . import ops as _ops
from .nn.utils import clip_grad_norm_  # noqa: F401  (also here, for convenience)

__all__ = ["Optimizer", "AdamW", "StepLR", "MultiStepLR", "clip_grad_norm_"]


class Optimizer:
    """Base class: ``param_groups`` (list of dicts with ``params`` and options) and
    per-parameter ``state``."""

    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups = []
        for g in groups:
            g = dict(g)
            g["params"] = list(g["params"])
            for key, value in self.defaults.items():
                g.setdefault(key, value)
            g.setdefault("initial_lr", g["lr"])
            self.param_groups.append(g)
        self.state = {}   # id(param) -> dict

    def _params(self):
        for g in self.param_groups:
            for p in g["params"]:
                yield g, p

    def zero_grad(self, set_to_none=True):
        for _, p in self._params():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    # A flat dict of arrays: "state.<i>.<name>" for parameter i (in group order) and
    # "param_groups.<g>.<option>" for the numeric options.
    def state_dict(self):
        out = {}
        for i, (_, p) in enumerate(self._params()):
            for name, value in self.state.get(id(p), {}).items():
                out[f"state.{i}.{name}"] = np.array(value, copy=True)
        for gi, g in enumerate(self.param_groups):
            for key, value in g.items():
                if key != "params":
                    out[f"param_groups.{gi}.{key}"] = np.array(value, dtype=np.float64)
        return out

    def load_state_dict(self, state):
        params = list(self._params())
        for key, value in state.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] not in ("state", "param_groups"):
                raise KeyError(f"optimizer state: unexpected key {key!r}")
            idx = int(parts[1])
            if parts[0] == "param_groups":
                if idx >= len(self.param_groups):
                    raise KeyError(f"optimizer state: {key!r} names group {idx}, the optimizer has "
                                   f"{len(self.param_groups)}")
                v = np.asarray(value)
                self.param_groups[idx][parts[2]] = v.item() if v.ndim == 0 else tuple(v.tolist())
                continue
            if idx >= len(params):
                raise KeyError(f"optimizer state: {key!r} names parameter {idx}, the optimizer has {len(params)}")
            p = params[idx][1]
            v = np.array(value, copy=True)
            if parts[2] != "step" and v.shape != p.shape:
                raise ValueError(f"optimizer state: {key} has shape {v.shape}, the parameter has {p.shape}")
            self.state.setdefault(id(p), {})[parts[2]] = v


class AdamW(Optimizer):
    """AdamW (``torch.optim.AdamW`` semantics) over ``damex.ops.adamw_step``.

    Parameters
    ----------
    params : iterable of Parameter, or of dicts (parameter groups with their own options)
    lr, betas, eps, weight_decay : as in PyTorch (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self):
        step_fn = _ops.adamw_step
        for g, p in self._params():
            if p.grad is None:
                continue
            st = self.state.setdefault(id(p), {})
            if not st:
                st["step"] = np.array(0, np.int64)
                st["exp_avg"] = np.zeros(p.shape, np.float32)
                st["exp_avg_sq"] = np.zeros(p.shape, np.float32)
            st["step"] = np.array(int(st["step"]) + 1, np.int64)
            b1, b2 = g["betas"]
            step_fn(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], int(st["step"]), float(g["lr"]),
                    beta1=float(b1), beta2=float(b2), eps=float(g["eps"]),
                    weight_decay=float(g["weight_decay"]))


class _Scheduler:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.last_epoch = 0
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self._apply()

    def factor(self, epoch):
        raise NotImplementedError

    def _apply(self):
        f = self.factor(self.last_epoch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self):
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_epoch": np.array(self.last_epoch, np.int64)}

    def load_state_dict(self, state):
        self.last_epoch = int(state["last_epoch"])
        self._apply()


class MultiStepLR(_Scheduler):
    """lr = base_lr * gamma ** (number of milestones <= epoch), as ``torch.optim.lr_scheduler.MultiStepLR``."""

    def __init__(self, optimizer, milestones, gamma=0.1):
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)
        self._closed_form = _ops.MultiStepLR(1.0, self.milestones, self.gamma)   # the same closed form
        super().__init__(optimizer)

    def factor(self, epoch):
        return self._closed_form.lr(epoch)


class StepLR(_Scheduler):
    """lr = base_lr * gamma ** (epoch // step_size), as ``torch.optim.lr_scheduler.StepLR``."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer)

    def factor(self, epoch):
        return self.gamma ** (epoch // self.step_size)
