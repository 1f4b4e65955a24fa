"""Loads the C core.

scipy_openblas32 is imported first: importing it loads libscipy_openblas into
the process, so the extension finds its BLAS even where the rpath does not
point at it.

damex's OpenMP threads spin only briefly when idle: unless the user set
``GOMP_SPINCOUNT``, it is 10000 (a fraction of a millisecond) while the
extension (and with it the OpenMP runtime it links) is loaded, then the
environment is put back, so other libraries that load their own OpenMP
runtime later (PyTorch bundles one) keep their defaults.  GCC's default spin
(300000, several ms) on a 2-core machine made idle OpenMP threads fight
OpenBLAS's pools (a tiny-model training step 7x slower, 1.03 s against
0.14 s); sleeping at once instead (OMP_WAIT_POLICY=PASSIVE) cost a wake-up
of ~50 us at every synchronisation point (a small conv twice as slow).

The same holds the other way: after a threaded GEMM, OpenBLAS's threads spin
for 2^28 cycles (about 0.1 s) before they sleep, taking a core from the
OpenMP kernels that follow.  Unless the user set ``OPENBLAS_THREAD_TIMEOUT``,
it is 20 (2^20 cycles, well under a millisecond) while damex's OpenBLAS is
loaded: back-to-back GEMMs still find their threads awake, and an MoE layer
after a threaded GEMM ran at full speed again (fwd+bwd 100 ms against 130 ms).
"""
import os

# variable -> damex's value, set only while the libraries load
_LOAD_ENV = {"GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "20"}
_set = [name for name in _LOAD_ENV if name not in os.environ]
if "OMP_WAIT_POLICY" in os.environ and "GOMP_SPINCOUNT" in _set:  # the user's policy rules
    _set.remove("GOMP_SPINCOUNT")
for _name in _set:
    os.environ[_name] = _LOAD_ENV[_name]
try:
    try:
        import scipy_openblas32  # noqa: F401
    except ImportError:  # built against a system OpenBLAS
        pass
    try:
        from . import _C  # noqa: E402
    except ImportError:
        import glob

        _here = os.path.dirname(os.path.abspath(__file__))
        if glob.glob(os.path.join(_here, "_C*")):
            raise
        raise ImportError(
            f"damex's C extension is not built in {_here} (a source tree: Python found this "
            "folder before the installed damex). Build it in place with "
            "`pip install --no-build-isolation -e .`, or run from another folder to use the "
            "installed damex.") from None
finally:
    for _name in _set:
        del os.environ[_name]

__all__ = ["_C"]
