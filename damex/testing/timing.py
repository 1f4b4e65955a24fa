"""The one timing harness of bench/*.py.

Every benchmark times damex and PyTorch side by side in one run on a machine
that may be shared, so the harness:

- runs every job once per round, round after round (:func:`interleaved`), so
  all jobs see the same background load;
- times each job at 1 and 2 threads (:func:`thread_jobs`) and keeps the faster
  (:func:`best_of_threads`), the thread count set untimed before each call, for
  damex and, when it is imported, torch;
- reports a statistic over the rounds (median by default, min on request);
- measures the machine's sgemm rate in the same run (:func:`sgemm_job`);
- runs a measurement in a fresh process of its own (:func:`child_json`), where a
  process must not hold what another measurement loaded (a second library, a
  built model, a thread count).
"""
import os
import sys
import time

import numpy as np

THREADS = (1, 2)


def set_threads(n):
    """Set damex's thread count and, if torch is imported, torch's."""
    from damex._lib import _C
    _C.set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _thread_counts():
    from damex._lib import _C
    torch = sys.modules.get("torch")
    return _C.get_num_threads()[1], (torch.get_num_threads() if torch is not None else None)


def _restore(counts):
    from damex._lib import _C
    _C.set_num_threads(counts[0])
    if counts[1] is not None:
        sys.modules["torch"].set_num_threads(counts[1])


def call_time(fn, inner=1, min_time=0.0):
    """(wall, thread CPU) seconds per call of fn: `inner` calls, repeated as a
    batch until min_time has passed (timer resolution for short calls)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    k = 0
    while True:
        for _ in range(inner):
            fn()
        k += inner
        wall = time.perf_counter() - w0
        if wall >= min_time:
            return wall / k, (time.thread_time() - c0) / k


def interleaved(jobs, repeats, warmup=1, stat=np.median, inner=1, min_time=0.0, cpu=False):
    """Time every job once per round, `warmup` untimed rounds first.

    Parameters
    ----------
    jobs : dict name -> (threads or None, fn)
        None leaves the thread count alone.
    repeats : int
        Timed rounds.
    stat : callable
        Over the rounds (np.median, np.min).
    inner, min_time : see :func:`call_time`
    cpu : bool
        Also return the thread CPU time.

    Returns
    -------
    dict name -> seconds per call, or (wall, cpu) seconds if `cpu`
    """
    wall = {name: [] for name in jobs}
    proc = {name: [] for name in jobs}
    before = _thread_counts()
    try:
        for r in range(warmup + repeats):
            for name, (threads, fn) in jobs.items():
                if threads is not None:
                    set_threads(threads)
                w, c = call_time(fn, inner, min_time)
                if r >= warmup:
                    wall[name].append(w)
                    proc[name].append(c)
    finally:
        _restore(before)
    if cpu:
        return {name: (float(stat(wall[name])), float(stat(proc[name]))) for name in jobs}
    return {name: float(stat(v)) for name, v in wall.items()}


def thread_jobs(fns, threads=THREADS):
    """{name: fn} -> {(name, threads): (threads, fn)} for every thread count."""
    return {(name, th): (th, fn) for name, fn in fns.items() for th in threads}


def best_of_threads(times, name, threads=THREADS):
    """(seconds, threads) of the fastest thread count of `name` in `times`
    (keyed (name, threads) as :func:`thread_jobs` makes them)."""
    return min((times[(name, th)], th) for th in threads)


def race(fns, repeats, threads=THREADS, stat=np.median, min_time=0.0, warmup=1):
    """{name: fn} -> {name: (seconds, threads)}: every fn at every thread count,
    interleaved, the faster thread count kept.  None entries are skipped."""
    fns = {k: f for k, f in fns.items() if f is not None}
    t = interleaved(thread_jobs(fns, threads), repeats, warmup=warmup, stat=stat,
                    min_time=min_time)
    return {name: best_of_threads(t, name, threads) for name in fns}


def child_json(script, *args, what="a child"):
    """Run ``python script --child ARGS...`` and return the JSON object its last output
    line holds; a failed child ends the benchmark with its stderr, naming ``what``."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, os.path.abspath(script), "--child", *map(str, args)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"{os.path.basename(script)}: {what} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def sgemm_job(M=4096, N=1024, K=256, seed=0):
    """(flop, fn, numpy_fn): damex._C.sgemm on an [M, K] x [K, N] product, and
    the same product through NumPy."""
    from damex._lib import _C
    rng = np.random.default_rng(seed)
    a = rng.random((M, K), dtype=np.float32)
    b = rng.random((K, N), dtype=np.float32)
    c = np.empty((M, N), np.float32)
    return 2.0 * M * N * K, lambda: _C.sgemm(c, a, b, M, N, K), lambda: a @ b


def load_average():
    """The 1-minute load average (0.0 where unavailable)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0
