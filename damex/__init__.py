"""damex: Dataset-aware Mixture-of-Experts (DAMEX) with a C core.

Layers, bottom to top: ``damex.ops`` (NumPy forward/backward pairs over the
C kernels), ``damex.autograd`` (a small tape), ``damex.nn`` (modules),
``damex.models`` (DINO), ``damex.data`` and ``damex.engine``.
"""
from ._lib import _C   # first: from an unbuilt source folder, _lib imports the installed damex instead
from . import ops
from .moe_layer import MoELayer

__version__ = "0.1.0"


def set_num_threads(n):
    """Set the threads of damex's OpenBLAS pool and its OpenMP loops.

    The count is stored once for the whole process: every thread's next kernel
    call uses it, and a call already running finishes with the count it began with.

    Parameters
    ----------
    n : int
        1 <= n <= ``damex._C.max_num_threads()`` (4 x the CPUs the process may
        use); otherwise ValueError.
    """
    _C.set_num_threads(int(n))


def get_num_threads():
    """Return the stored ``(openblas_threads, openmp_threads)`` of the damex core."""
    return _C.get_num_threads()


__all__ = ["ops", "MoELayer", "set_num_threads", "get_num_threads", "__version__"]

# The tape and the modules (NumPy only, cheap to import): damex.Tensor, damex.nn, ...
from .autograd import Tensor, enable_grad, is_grad_enabled, no_grad  # noqa: E402
from . import functional, nn, optim  # noqa: E402,F401

__all__ += ["Tensor", "no_grad", "enable_grad", "is_grad_enabled", "functional", "nn", "optim"]


# imported on first use (as scipy's subpackages): `import damex; damex.models.DINO(...)`
_LAZY = ("models", "data", "engine", "routing", "weights")


def __getattr__(name):
    # the trained-detector API, imported on first use (it pulls in the engine)
    if name == "Detector":
        from .engine.predict import Detector
        return Detector
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'damex' has no attribute {name!r}")


__all__ += ["Detector"]
