"""Benchmark: the ``paper`` preset (DAMEX_4scale: ResNet-50, 6 + 6 layers, d 256, 900 queries,
8 experts in decoder layers 0, 2, 4) at 512x512, batch 1, at 1 and 2 threads; then the ResNet-50
forward against torch's on the same cores (bench/bench_backbone.py's line).

    python bench/bench_dino.py [--quick] [--size 512] [--repeats N]

For each thread count a fresh child process builds the model (random weights, DINO's
backbone freezing: conv1 and layer1 frozen) and times

- ``fwd``: eval-mode forward under ``no_grad`` (inference: backbone to heads), and
- ``fwd+bwd``: training-mode forward with denoising queries (3 objects, 100 DN queries),
  the criterion (matcher, focal/L1/GIoU on every layer, DAMEX loss) and the backward,

each ``--repeats`` times after one untimed warm-up call (median printed; ``--quick``: once).  Peak memory,
per child and measurement, two ways: ``resource.getrusage`` max RSS minus the RSS just
before the first call of that measurement (the whole process: NumPy arrays, damex's C
work buffers, OpenBLAS; ``fwd`` and ``fwd+bwd`` run in separate children, so each figure
is that measurement's own); and the ``tracemalloc`` peak of the warm-up call, traced
(NumPy's array data, which NumPy reports to tracemalloc; not the C kernels' own buffers).  The machine may be shared: the load average is printed.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from damex.testing import timing  # noqa: E402


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(what, threads, size, repeats):
    """Build the model, time `what` at `threads`, print one JSON line."""
    import damex
    from damex.autograd import no_grad
    from damex.models.criterion import SetCriterion
    from damex.models.dino import DINO, preset

    damex.set_num_threads(threads)
    cfg = preset("paper", num_classes=91, dataset_to_expert=tuple(range(8)))
    model = DINO(cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, size, size)).astype(np.float32)
    mask = np.zeros((1, size, size), bool)
    ids = np.array([0])
    targets = [{"labels": np.array([1, 17, 60]),
                "boxes": np.array([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.7, 0.4, 0.3]],
                                  np.float32)}]
    criterion = SetCriterion(cfg.num_classes)

    def fwd():
        model.eval()
        with no_grad():
            model(x, mask, dataset_ids=ids)

    def fwd_bwd():
        model.train()
        out = model(x, mask, dataset_ids=ids, targets=targets)
        loss, _ = criterion(out, targets)
        model.zero_grad()
        loss.backward()

    fn = fwd if what == "fwd" else fwd_bwd
    rss0 = _rss_kib()
    tracemalloc.start()                     # the untimed warm-up call is the traced one
    fn()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"what": what, "threads": threads, "times": times,
                      "rss_peak_delta_mib": (peak - rss0) / 1024,
                      "model_rss_mib": rss0 / 1024, "traced_peak_mib": traced / 2 ** 20}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one timed call each, and a short backbone line")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    if args.child:
        child(args.child[0], int(args.child[1]), args.size, repeats)
        return
    print(f"load average {os.getloadavg()[0]:.2f}; paper preset, batch 1, {args.size}x{args.size}",
          flush=True)
    for threads in (1, 2):
        for what in ("fwd", "fwd+bwd"):
            res = timing.child_json(__file__, what, threads, "--size", args.size, "--repeats", repeats,
                                    what=f"the {what} child at {threads} threads")
            med = statistics.median(res["times"])
            print(f"paper {what:<8s} {threads}t  {med:7.2f} s (median of {len(res['times'])}; "
                  f"{', '.join(f'{t:.2f}' for t in res['times'])})  peak RSS +{res['rss_peak_delta_mib']:.0f} MiB "
                  f"over the built model's {res['model_rss_mib']:.0f} MiB, tracemalloc peak "
                  f"{res['traced_peak_mib']:.0f} MiB", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "bench_backbone.py"), "--only", "resnet50",
                    "--size", str(args.size)] + (["--quick"] if args.quick else []), check=True)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
