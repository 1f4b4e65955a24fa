"""Shared test helpers: finite differences, comparisons that report errors,
and the optional torch import for parity tests."""
import os

import numpy as np
import pytest

from damex.testing.reference import finite_difference as numeric_grad  # noqa: F401 (re-exported)


def torch_or_skip():
    """Return the torch module, or skip the test cleanly where it is absent."""
    return pytest.importorskip("torch")


def assert_close(actual, expected, atol=1e-5, rtol=1e-4, name="value"):
    """assert_allclose that prints max abs and max rel error on failure."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    rel = err / np.maximum(np.abs(expected), 1e-12)
    ok = err <= atol + rtol * np.abs(expected)
    if not ok.all():
        i = np.unravel_index(np.argmax(err - rtol * np.abs(expected)), err.shape)
        raise AssertionError(
            f"{name}: max abs err {err.max():.3e}, max rel err {rel.max():.3e}, "
            f"{(~ok).sum()} of {ok.size} out of tolerance (atol={atol}, rtol={rtol}); "
            f"worst at {i}: got {actual[i]!r}, expected {expected[i]!r}")


def unchanged(*arrays):
    """Snapshot arrays; call the returned function to assert none was modified."""
    copies = [np.array(a, copy=True) for a in arrays]

    def check():
        for a, c in zip(arrays, copies):
            np.testing.assert_array_equal(a, c, err_msg="an input array was modified")
    return check


def rss_bytes():
    """Resident set size of this process (Linux /proc), or 0 where unavailable."""
    try:
        import os
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def assert_memory_flat(fn, calls=10_000, traced_slack=256 << 10, rss_slack=4 << 20):
    """Call fn() `calls` times; fail if Python-traced memory grew by more than
    `traced_slack` bytes (one leaked object per call is more) or the RSS by more
    than `rss_slack` (leaked C scratch)."""
    import gc
    import tracemalloc
    for _ in range(100):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        traced0, rss0 = tracemalloc.get_traced_memory()[0], rss_bytes()
        for _ in range(calls):
            fn()
        gc.collect()
        traced1, rss1 = tracemalloc.get_traced_memory()[0], rss_bytes()
    finally:
        tracemalloc.stop()
    assert traced1 - traced0 < traced_slack, f"traced memory grew by {traced1 - traced0} bytes"
    if os.environ.get("DAMEX_SANITIZE"):
        return  # ASan quarantines freed memory, so RSS grows without a leak
    assert rss1 - rss0 < rss_slack, f"RSS grew by {rss1 - rss0} bytes over {calls} calls"
