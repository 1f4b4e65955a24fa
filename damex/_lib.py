"""Loads the C core.

scipy_openblas32 is imported first: importing it loads libscipy_openblas into
the process, so the extension finds its BLAS even where the rpath does not
point at it.

damex's OpenMP threads spin only briefly when idle: unless the user set
``GOMP_SPINCOUNT``, it is 10000 (a fraction of a millisecond) while the
extension (and with it the OpenMP runtime it links) is loaded, then the
environment is put back, so libraries that load their own OpenMP runtime
later keep their defaults.  A runtime already loaded is not changed: PyTorch's
CPU wheel links the same system libgomp, so with torch imported first damex
runs with GCC's spin (a ResNet-50 forward at 2 threads 1.15-1.45x slower), and with
damex first torch runs with damex's (README, "Installing and threads").  GCC's default spin
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


def _installed_elsewhere(here):
    """The import spec of a built damex other than the source folder ``here`` (the
    installed one that ``here``, first on sys.path, hides), or None."""
    import glob
    import sys

    parent = os.path.realpath(os.path.dirname(here))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != parent]
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec("damex", path)
        except Exception:   # a finder that does not take this call
            continue
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if locations and os.path.realpath(locations[0]) != os.path.realpath(here) and \
                glob.glob(os.path.join(locations[0], "_C*")):
            return spec
    return None


def _installed_instead(here):
    """``import damex`` found the source folder ``here`` without its C extension (Python
    started in a clone's root, after ``pip install .``): import the installed damex in
    its place, with a warning, and return its ``_C``; without one, an ImportError that
    says what to do.  Works because ``from ._lib import _C`` is the first line of
    ``damex/__init__.py``: nothing else of the source folder has been imported yet."""
    import importlib.util
    import sys
    import warnings

    spec = _installed_elsewhere(here)
    if spec is None:
        raise ImportError(
            f"damex's C extension is not built in {here} (a source tree, found first on "
            "sys.path, with no installed damex behind it). Install it (`pip install .`, then "
            "run Python from another folder) or build it in place with "
            "`pip install --no-build-isolation -e .`.") from None
    installed = spec.submodule_search_locations[0]
    warnings.warn(f"{here} is damex's source folder without its C extension (found first "
                  f"on sys.path); importing the installed damex from {installed} instead "
                  "(`pip install --no-build-isolation -e .` builds the source folder in place)",
                  stacklevel=3)
    # the installed package replaces this one in sys.modules; the rest of the source
    # __init__ then binds the installed modules, and `import damex` returns the installed one
    del sys.modules[__name__]
    module = importlib.util.module_from_spec(spec)
    source = sys.modules["damex"]
    sys.modules["damex"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules["damex"] = source
        raise
    return module._C

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
        _C = _installed_instead(_here)
finally:
    for _name in _set:
        del os.environ[_name]

__all__ = ["_C"]
