"""Shared test helpers: finite differences, comparisons that report errors,
and the optional torch import for parity tests."""
import numpy as np
import pytest


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


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar float64 function f at x (float64 array)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g


def unchanged(*arrays):
    """Snapshot arrays; call the returned function to assert none was modified."""
    copies = [np.array(a, copy=True) for a in arrays]

    def check():
        for a, c in zip(arrays, copies):
            np.testing.assert_array_equal(a, c, err_msg="an input array was modified")
    return check
