"""Strategies and checks shared by the property suite (tests/test_property_*.py)."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from damex.testing import reference  # noqa: E402,F401  (re-exported for the tests)

ERRORS = (TypeError, ValueError)
def floats(lo=-4.0, hi=4.0):
    """Finite float32 values in [lo, hi] (bounds rounded inward to float32)."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    lo32 = lo32 if lo32 >= lo else np.nextafter(lo32, np.float32(np.inf))
    hi32 = hi32 if hi32 <= hi else np.nextafter(hi32, np.float32(-np.inf))
    return st.floats(float(lo32), float(hi32), width=32, allow_nan=False, allow_infinity=False)


def f32_arrays(shape, lo=-4.0, hi=4.0):
    return hnp.arrays(np.float32, shape, elements=floats(lo, hi))


def dims(lo=0, hi=4):
    return st.integers(lo, hi)


@st.composite
def layouts(draw, a):
    """The same values as `a` in a C-contiguous, strided (non-contiguous) or
    negative-stride layout."""
    kind = draw(st.sampled_from(["contiguous", "strided", "reversed"]))
    a = np.asarray(a)
    if kind == "contiguous" or a.ndim == 0:
        return np.ascontiguousarray(a)
    if kind == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    return np.ascontiguousarray(a[..., ::-1])[..., ::-1]


class Unchanged:
    """Snapshot arrays; .check() asserts none was modified (NaN-aware)."""

    def __init__(self, *arrays):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.copies = [a.copy() for a in self.arrays]

    def check(self):
        for a, c in zip(self.arrays, self.copies):
            np.testing.assert_array_equal(a, c, err_msg="an input array was modified")


def close(got, want, atol, rtol, name="value"):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name, equal_nan=True)


def refuses_cleanly(fn, *args, **kw):
    """fn(*args, **kw) either returns or raises TypeError/ValueError (anything else fails)."""
    try:
        fn(*args, **kw)
    except ERRORS:
        return True
    return False
