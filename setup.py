"""Build the damex C core (damex._C) against OpenBLAS.

OpenBLAS comes from the ``scipy-openblas32`` wheel (the one NumPy and SciPy
build against), so ``pip install .`` needs no system packages.  Where that
wheel is missing, a system OpenBLAS (``-lopenblas``, plain ``cblas_*`` names)
is used instead.

Environment switches:

``DAMEX_SANITIZE=1``  build with ``-fsanitize=address,undefined`` (see README).
``DAMEX_NATIVE=1``    add ``-march=native`` (not portable across CPUs).

The entry points of the kernels are generated from ``csrc/kernels.spec`` by
``csrc/bindgen.py`` into ``build/generated/bind_kernels.c`` (not committed).
"""
import glob
import os
import sys

import numpy as np
from setuptools import Extension, setup


def openblas_config():
    """Return (include_dirs, library_dirs, libraries, macros, rpaths)."""
    try:
        import scipy_openblas32 as sob
    except ImportError:
        sys.stderr.write("damex: scipy-openblas32 not found, using system OpenBLAS\n")
        return [], [], ["openblas"], [], []
    lib_dir = sob.get_lib_dir()
    # At run time damex imports scipy_openblas32 first (which loads the
    # library); the rpaths are a second way to find it: next to damex in the
    # same site-packages, and where it was at build time.
    rpaths = ["$ORIGIN/../scipy_openblas32/lib", lib_dir]
    return ([sob.get_include_dir()], [lib_dir], [sob.get_library()],
            [("DAMEX_BLAS_SCIPY", "1")], rpaths)


inc, libdirs, libs, macros, rpaths = openblas_config()

compile_args = ["-std=gnu11", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter",
                "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
link_args = ["-fopenmp"]
if os.environ.get("DAMEX_SANITIZE"):
    compile_args += ["-O1", "-g", "-fno-omit-frame-pointer",
                     "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    link_args += ["-fsanitize=address,undefined"]
else:
    compile_args += ["-O3", "-fno-math-errno"]
if os.environ.get("DAMEX_NATIVE"):
    compile_args.append("-march=native")

sys.path.insert(0, "csrc")
from bindgen import generate  # noqa: E402

generated = generate("csrc/kernels.spec", "build/generated/bind_kernels.c")
sources = (["csrc/module.c", generated] + sorted(glob.glob("csrc/bind_*.c"))
           + sorted(glob.glob("csrc/kernels/*.c")))

ext = Extension(
    "damex._C",
    sources=sources,
    include_dirs=[np.get_include(), "csrc", "csrc/kernels"] + inc,
    library_dirs=libdirs,
    libraries=libs + ["m"],
    runtime_library_dirs=rpaths,
    define_macros=macros + [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    depends=(glob.glob("csrc/*.h") + glob.glob("csrc/kernels/*.h")
             + ["csrc/kernels.spec", "csrc/bindgen.py"]),
)

setup(ext_modules=[ext])
