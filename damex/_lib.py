"""Loads the C core.  scipy_openblas32 is imported first: importing it loads
libscipy_openblas into the process, so the extension finds its BLAS even
where the rpath does not point at it."""
try:
    import scipy_openblas32  # noqa: F401
except ImportError:  # built against a system OpenBLAS
    pass

from . import _C  # noqa: E402

__all__ = ["_C"]
