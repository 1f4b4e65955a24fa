"""Module and Parameter, with PyTorch's naming and state_dict conventions."""
from collections import OrderedDict

import numpy as np

from ..autograd import Tensor

__all__ = ["Parameter", "Module", "Sequential", "ModuleList"]


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as a parameter (requires grad by default)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of layers: attributes that are Parameters, Modules or buffers are
    registered in order; ``__call__`` runs ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        if name in self._buffers and (value is None or isinstance(value, np.ndarray)):
            self._buffers[name] = value          # assigning to a buffer updates it (as in torch)
            return
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        d = self.__dict__
        for key in ("_parameters", "_modules", "_buffers"):
            if key in d and name in d[key]:
                return d[key][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for d in (self._parameters, self._modules, self._buffers):
            if name in d:
                del d[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name, array):
        """A non-trainable float32 (or int64) array saved in the state_dict (e.g. running stats)."""
        self.__dict__.pop(name, None)
        self._buffers[name] = None if array is None else np.array(array)

    def register_parameter(self, name, param):
        if param is None:
            self.__dict__.pop(name, None)
            self._parameters[name] = None
        else:
            setattr(self, name, param)

    def add_module(self, name, module):
        self._modules[str(name)] = module

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---------------------------------------------------------------- traversal
    def named_children(self):
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self):
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix="", memo=None):
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, m in self.named_children():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix="", recurse=True):
        """(dotted name, Parameter) pairs; a parameter shared by two modules appears once."""
        seen = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mp, m in mods:
            for name, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mp}.{name}" if mp else name), p

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix=""):
        for mp, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mp}.{name}" if mp else name), b

    def buffers(self):
        for _, b in self.named_buffers():
            yield b

    def apply(self, fn):
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------------- modes
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    # --------------------------------------------------------------- state dict
    def state_dict(self, prefix=""):
        """OrderedDict of dotted names to NumPy arrays (copies): parameters, then buffers,
        module by module as in PyTorch."""
        out = OrderedDict()
        for mp, m in self.named_modules(prefix.rstrip(".")):
            for name, p in m._parameters.items():
                if p is not None:
                    out[f"{mp}.{name}" if mp else name] = p.data.copy()
            for name, b in m._buffers.items():
                if b is not None:
                    out[f"{mp}.{name}" if mp else name] = b.copy()
        return out

    def _state_targets(self):
        tgt = OrderedDict()
        for mp, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    tgt[f"{mp}.{name}" if mp else name] = (m, name, "param")
            for name, b in m._buffers.items():
                if b is not None:
                    tgt[f"{mp}.{name}" if mp else name] = (m, name, "buffer")
        return tgt

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters and buffers (in place, so optimizers keep their
        references).  Mis-shaped keys always raise; missing or unexpected keys raise when
        ``strict`` (the message names them).  Returns ``(missing, unexpected)``."""
        tgt = self._state_targets()
        missing = [k for k in tgt if k not in state]
        unexpected = [k for k in state if k not in tgt]
        problems = []
        for key, (m, name, kind) in tgt.items():
            if key not in state:
                continue
            arr = np.asarray(state[key])
            cur = m._parameters[name].data if kind == "param" else m._buffers[name]
            if arr.shape != cur.shape:
                problems.append(f"size mismatch for {key}: copying an array of shape {arr.shape}, "
                                f"the parameter in the model has shape {cur.shape}")
        if strict:
            if missing:
                problems.append("missing key(s) in state_dict: " + ", ".join(missing))
            if unexpected:
                problems.append("unexpected key(s) in state_dict: " + ", ".join(unexpected))
        if problems:  # RuntimeError, as torch's load_state_dict
            raise RuntimeError(f"error(s) in loading state_dict for {type(self).__name__}:\n  "
                               + "\n  ".join(problems))
        for key, (m, name, kind) in tgt.items():
            if key not in state:
                continue
            arr = np.asarray(state[key])
            if kind == "param":
                np.copyto(m._parameters[name].data, arr, casting="same_kind")
            else:
                np.copyto(m._buffers[name], arr, casting="same_kind")
        return missing, unexpected

    # ------------------------------------------------------------------- repr
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"({n}): " + repr(m).replace("\n", "\n  ") for n, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ..."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleList(Module):
    """A list of modules, registered as children "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ModuleList(list(self._modules.values())[i])
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
