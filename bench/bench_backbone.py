"""Benchmark: torchvision-layout ResNet-50 forward (batch 1, 512x512) and the stem max-pool,
damex against torch on the same cores, with the same weights.

    python bench/bench_backbone.py [--quick] [--size 512] [--only resnet50]

Timing as bench/bench_nn.py (interleaved repeats at 1 and 2 threads, the best per side;
torch's jobs in a process of its own, damex.testing.timing.torch_in_own_process, since the
two share one libgomp whose idle spin the first importer fixes: measured here at 2
threads, damex's forward 1.15-1.45x slower with torch imported first, torch's 1.3-1.6x
slower timed in damex's process).  ratio = torch / damex (> 1: damex faster); the ResNet-50 line is followed by
both thread counts.  The features' max error relative to torch's largest value is checked
first, with the same weights.  The torch model is the twin damex.testing.resnet_twin.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import damex  # noqa: E402,F401  (first: damex's OpenMP spin in this process)
from damex.testing import timing  # noqa: E402


def resnet50_line(size, repeats):
    """Print the features' error (same weights) and the ResNet-50 forward line."""
    import torch
    from bench_nn import line
    from damex.autograd import no_grad
    from damex.models.backbone import resnet50
    from damex.testing.resnet_twin import random_resnet

    tm = random_resnet("resnet50", seed=0)
    dm = resnet50()
    dm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()
                        if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))})
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    xt = torch.tensor(x)

    def d_fwd():
        with no_grad():
            return [f.data for f in dm(x)]

    def t_fwd():
        with torch.no_grad():
            return [f.numpy() for f in tm.features(xt)]

    errs = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(d_fwd(), t_fwd())]
    print(f"resnet50 layer2..4 max |damex - torch| / max |torch|: "
          + ", ".join(f"{e:.1e}" for e in errs), flush=True)
    t = timing.interleaved(timing.thread_jobs({"damex": d_fwd, "torch": t_fwd}), repeats)
    res = {name: timing.best_of_threads(t, name) for name in ("damex", "torch")}
    per = "; ".join(f"{th}t damex {t[('damex', th)] * 1e3:.0f} ms, torch {t[('torch', th)] * 1e3:.0f} ms "
                    f"({t[('torch', th)] / t[('damex', th)]:.2f})" for th in timing.THREADS)
    line(f"resnet50 fwd B=1 {size}x{size} (layer2..4)", res)
    print(f"  {per}; median of {repeats}", flush=True)


def maxpool_line(size, repeats):
    import torch
    from bench_nn import line, race
    from damex import ops

    s = size // 2
    p = np.random.default_rng(1).normal(size=(1, 64, s, s)).astype(np.float32)
    pt = torch.tensor(p)
    line(f"max-pool 3x3/2 p1 fwd 1x64x{s}x{s}", race({
        "damex": lambda: ops.maxpool2d_forward(p, 3, 2, 1),
        "torch": lambda: torch.nn.functional.max_pool2d(pt, 3, 2, 1, return_indices=True)},
        repeats * 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", choices=("resnet50",), help="only the ResNet-50 line")
    args = ap.parse_args()
    timing.torch_in_own_process(__file__)
    repeats = args.repeats or (2 if args.quick else 8)
    resnet50_line(args.size, repeats)
    if not args.only:
        maxpool_line(args.size, max(repeats // 2, 2))


if __name__ == "__main__":
    main()
