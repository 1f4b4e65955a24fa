"""Loads the C core.

scipy_openblas32 is imported first: importing it loads libscipy_openblas into
the process, so the extension finds its BLAS even where the rpath does not
point at it.

damex's OpenMP threads sleep when idle instead of spinning: unless the user set
``OMP_WAIT_POLICY``, it is PASSIVE while the extension (and with it the
OpenMP runtime it links) is loaded, then the environment is put back, so other
libraries that load their own OpenMP runtime later (PyTorch bundles one) keep
their defaults.  On a 2-core machine, idle OpenMP threads spinning against
OpenBLAS's pools made a tiny-model training step 7x slower (1.03 s against 0.14 s).
"""
import os

try:
    import scipy_openblas32  # noqa: F401
except ImportError:  # built against a system OpenBLAS
    pass

_set_policy = "OMP_WAIT_POLICY" not in os.environ
if _set_policy:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
try:
    from . import _C  # noqa: E402
finally:
    if _set_policy:
        del os.environ["OMP_WAIT_POLICY"]

__all__ = ["_C"]
