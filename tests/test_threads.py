"""Thread control: damex.set_num_threads is global, bounded, and never undone.

Regressions of issue 12 (items 2, 4, 5): a huge count was accepted and the next
OpenMP kernel crashed; a new thread saw the OpenMP default instead of the set
count; a set made while another thread ran a bracketed kernel (expert FFN,
attention) was undone when that kernel ended, and the toggling changed bits.
"""
import ctypes
import os
import threading
import time

import numpy as np
import pytest

import damex
from damex import _C


@pytest.fixture(autouse=True)
def restore_threads():
    before = damex.get_num_threads()
    yield
    damex.set_num_threads(before[1])


def openblas_threads():
    """OpenBLAS's own count (not damex's stored one)."""
    sob = pytest.importorskip("scipy_openblas32")
    lib = ctypes.CDLL(os.path.join(sob.get_lib_dir(), f"lib{sob.get_library()}.so"))
    return lib.scipy_openblas_get_num_threads()


def openmp_threads_of_this_thread():
    """libgomp's nthreads ICV of the calling thread."""
    return ctypes.CDLL("libgomp.so.1").omp_get_max_threads()


def ffn_case(seed=0, E=4, D=64, F=256, N=2048):
    """An expert FFN above the kernel's parallel threshold (csrc/kernels/moe.c FFN_PAR_MIN)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    xe, w1, b1, w2, b2 = f(N, D), f(E, D, F) * 0.1, f(E, F), f(E, F, D) * 0.1, f(E, D)
    count = np.full(E, N // E, np.int64)

    def run():
        ye, h, a = np.empty((N, D), np.float32), np.empty((N, F), np.float32), np.empty((N, F), np.float32)
        _C.expert_ffn_forward(ye, h, a, xe, w1, b1, w2, b2, count, E, D, F, N, 0)
        return ye
    return run


def attention_case(seed=1, N=2, H=4, L=128, C=64):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((N, L, C)).astype(np.float32) for _ in range(3))

    def run():
        out, attn = np.empty((N, L, C), np.float32), np.empty((N, H, L, L), np.float32)
        _C.attention_forward(out, attn, q, k, v, None, None, N, L, L, C, H)
        return out
    return run


def test_count_is_bounded_with_a_clear_error():
    with pytest.raises(ValueError, match="set_num_threads"):
        damex.set_num_threads(100000)  # was accepted; the next OpenMP kernel crashed
    limit = _C.max_num_threads()
    assert limit == 4 * len(os.sched_getaffinity(0))
    for bad in (0, -1, limit + 1, 100000, 2**40):
        with pytest.raises(ValueError, match=rf"\[1, {limit}\]"):
            damex.set_num_threads(bad)
    damex.set_num_threads(limit)
    assert damex.get_num_threads() == (limit, limit)
    ffn_case(N=512)()  # runs with the largest count allowed
    damex.set_num_threads(1)
    assert damex.get_num_threads() == (1, 1)


def test_a_new_thread_sees_the_count():
    damex.set_num_threads(1)
    seen = {}

    def worker():
        seen["get"] = damex.get_num_threads()
        attention_case()()
        seen["openmp"] = openmp_threads_of_this_thread()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["get"] == (1, 1)
    assert seen["openmp"] == 1


def test_a_set_during_a_kernel_is_not_undone():
    run = ffn_case()
    for trial in range(6):
        damex.set_num_threads(2)
        t = threading.Thread(target=lambda: [run() for _ in range(4)])
        t.start()
        time.sleep(0.01 + 0.01 * trial)
        damex.set_num_threads(1)  # most likely while the FFN is inside its bracket
        t.join()
        assert damex.get_num_threads() == (1, 1)
        assert openblas_threads() == 1, f"trial {trial}: the kernel restored a stale count"
    damex.set_num_threads(2)
    assert openblas_threads() == 2


@pytest.mark.parametrize("case", [ffn_case, attention_case])
def test_results_bit_identical_while_another_thread_sets_the_count(case):
    run = case()
    reference = run()
    stop = threading.Event()

    def toggle():
        n = 1
        while not stop.is_set():
            damex.set_num_threads(n)
            n = 3 - n
            time.sleep(0.0005)

    t = threading.Thread(target=toggle)
    t.start()
    try:
        results = [run() for _ in range(30)]
    finally:
        stop.set()
        t.join()
    differing = sum(not np.array_equal(r, reference) for r in results)
    assert differing == 0, f"{differing} of {len(results)} results changed bits"
