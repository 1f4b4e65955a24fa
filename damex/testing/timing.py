"""The one timing harness of bench/*.py.

Every benchmark times damex and PyTorch side by side in one run on a machine
that may be shared, so the harness:

- runs every job once per round, round after round (:func:`interleaved`), so
  all jobs of a process see the same background load;
- times each job at 1 and 2 threads (:func:`thread_jobs`) and keeps the faster
  (:func:`best_of_threads`), the thread count set untimed before each call, for
  damex and, when it is imported, torch;
- reports a statistic over the rounds (median by default, min on request);
- measures the machine's sgemm rate in the same run (:func:`sgemm_job`);
- times torch's jobs in a process of its own (:func:`torch_in_own_process`):
  damex and torch's CPU build load one libgomp, whose idle spin the library that
  loads it first fixes for both (damex's short one, or GCC's default), so in one
  process one side always runs with the other's setting (the sides then no
  longer share each round's load: read such runs on a quiet machine);
- runs a measurement in a fresh process of its own (:func:`child_json`), where a
  process must not hold what another measurement loaded (a built model, a
  thread count).
"""
import math
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


# torch_in_own_process: the torch child writes its results to the file named by
# TORCH_OUT, one JSON line per interleaved() call; the damex process reads them
# from the file named by TORCH_IN, call by call
TORCH_OUT, TORCH_IN = "DAMEX_BENCH_TORCH_OUT", "DAMEX_BENCH_TORCH_IN"
_calls = {"n": 0, "torch": None}


def is_torch_job(name):
    """A job of torch's: its name (or a tuple key's first item) starts with "torch"."""
    key = name[0] if isinstance(name, tuple) else name
    return isinstance(key, str) and key.startswith("torch")


def torch_in_own_process(script, argv=None):
    """Call first in a benchmark's ``main()``: runs the same benchmark (``script`` with
    ``argv``, default this process's) in a child that imports torch before damex and
    times only torch's jobs (:func:`is_torch_job`), its output discarded; then this
    process, which imported damex first, times only the others, and
    :func:`interleaved` takes torch's results from the child call by call.  Each side
    so runs with its own library's OpenMP spin.  The sides no longer share the
    background load of each round: read these runs on a quiet machine.  Returns
    whether torch's times come from a child (False: torch not installed, or this is
    the child)."""
    import atexit
    import importlib.util
    import subprocess
    import tempfile

    if os.environ.get(TORCH_OUT) or os.environ.get(TORCH_IN) or importlib.util.find_spec("torch") is None:
        return False
    fd, path = tempfile.mkstemp(prefix="damex-bench-torch-", suffix=".jsonl")
    os.close(fd)
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    code = "import sys, runpy, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    argv = sys.argv[1:] if argv is None else list(argv)
    print(f"{os.path.basename(script)}: timing torch's jobs in a process of its own first ...", flush=True)
    r = subprocess.run([sys.executable, "-c", code, os.path.abspath(script), *argv],
                       env=dict(os.environ, **{TORCH_OUT: path}), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, check=False)
    if r.returncode:
        sys.exit(f"{os.path.basename(script)}: the torch process failed:\n{r.stderr}")
    os.environ[TORCH_IN] = path
    return True


def _torch_side(jobs, results, cpu):
    """Write (torch child) or read and merge (damex process) torch's results of this call."""
    import json

    n = _calls["n"]
    _calls["n"] += 1
    keys = sorted(repr(k) for k in jobs if is_torch_job(k))
    if os.environ.get(TORCH_OUT):   # the others get NaN: this run's output is discarded
        with open(os.environ[TORCH_OUT], "a", encoding="utf-8") as f:
            f.write(json.dumps({"call": n, "results": {repr(k): v for k, v in results.items()}}) + "\n")
        nan = (math.nan, math.nan) if cpu else math.nan
        return {k: results.get(k, nan) for k in jobs}
    if _calls["torch"] is None:
        with open(os.environ[TORCH_IN], encoding="utf-8") as f:
            _calls["torch"] = [json.loads(line) for line in f]
    theirs = _calls["torch"][n]["results"] if n < len(_calls["torch"]) else {}
    if sorted(theirs) != keys:
        raise RuntimeError(f"timing: call {n} of the torch process timed {sorted(theirs)}, this one "
                           f"asks for {keys}: the two runs of the benchmark went different ways")
    by_repr = {repr(k): k for k in jobs}
    out = dict(results)
    for r, v in theirs.items():
        out[by_repr[r]] = tuple(v) if isinstance(v, list) else v
    return out


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
    side = "torch" if os.environ.get(TORCH_OUT) else "damex" if os.environ.get(TORCH_IN) else None
    timed = {name: job for name, job in jobs.items()
             if side is None or is_torch_job(name) == (side == "torch")}
    wall = {name: [] for name in timed}
    proc = {name: [] for name in timed}
    before = _thread_counts()
    try:
        for r in range(warmup + repeats):
            for name, (threads, fn) in timed.items():
                if threads is not None:
                    set_threads(threads)
                w, c = call_time(fn, inner, min_time)
                if r >= warmup:
                    wall[name].append(w)
                    proc[name].append(c)
    finally:
        _restore(before)
    if cpu:
        out = {name: (float(stat(wall[name])), float(stat(proc[name]))) for name in timed}
    else:
        out = {name: float(stat(v)) for name, v in wall.items()}
    return out if side is None else _torch_side(jobs, out, cpu)


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
