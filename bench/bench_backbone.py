"""Benchmark: torchvision-layout ResNet-50 forward (batch 1, 512x512) and the stem max-pool,
damex against torch on the same cores, with the same weights.

    python bench/bench_backbone.py [--quick] [--size 512]

The ResNet-50 forward of each side is timed in a process of its own per thread count (1,
then 2; one warm-up call, then the median of the repeats): damex and the CPU build of torch load the same libgomp, and
its idle spin is fixed by whichever library loads it first (damex asks for a short one,
torch keeps GCC's default), so in one process one side always runs with the other's setting
(measured here at 2 threads: damex 1.4x slower when torch came first, torch 1.6x slower when
damex came first).  The line prints each thread count and the best of each side; ratio =
torch / damex (> 1: damex faster).  The features' max error relative to torch's largest
value is checked first, in this process, with the same weights.  The max-pool line is timed
in this process, both sides interleaved (torch loaded first, by the error check).  The torch
model is the twin damex.testing.resnet_twin.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _input(size):
    return np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)


def child(side, threads, size, repeats):
    """Time one side's forward at ``threads``: one warm-up call, then ``repeats``; print
    one JSON line.  The torch side imports torch before anything of damex, the damex side
    never imports torch."""
    import time

    if side == "torch":
        import torch
        from damex.testing.resnet_twin import random_resnet
        torch.set_num_threads(threads)
        tm = random_resnet("resnet50", seed=0)
        xt = torch.tensor(_input(size))

        def fn():
            with torch.no_grad():
                tm.features(xt)
    else:
        import damex
        from damex.autograd import no_grad
        from damex.models.backbone import resnet50
        damex.set_num_threads(threads)
        dm = resnet50()   # its own random weights: the time does not depend on the values
        x = _input(size)

        def fn():
            with no_grad():
                dm(x)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times[1:], "torch_loaded": "torch" in sys.modules}))


def resnet50_errors(size):
    """Max |damex - torch| / max |torch| of layer2..4, the same weights."""
    import torch
    from damex.autograd import no_grad
    from damex.models.backbone import resnet50
    from damex.testing.resnet_twin import random_resnet

    tm = random_resnet("resnet50", seed=0)
    dm = resnet50()
    dm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()
                        if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))})
    x = _input(size)
    with no_grad():
        ours = [f.data for f in dm(x)]
    with torch.no_grad():
        theirs = [f.numpy() for f in tm.features(torch.tensor(x))]
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, theirs)]


def resnet50_line(size, repeats):
    """Print the features' error and the ResNet-50 forward line (each side in its own process)."""
    errs = resnet50_errors(size)
    print(f"resnet50 layer2..4 max |damex - torch| / max |torch|: "
          + ", ".join(f"{e:.1e}" for e in errs), flush=True)
    import statistics

    from damex.testing import timing   # here, not at the top: the torch child imports torch first

    res = {"damex": {}, "torch": {}}
    for threads in (1, 2):
        for side in ("damex", "torch"):
            out = timing.child_json(__file__, side, threads, "--size", size, "--repeats", repeats,
                                    what=f"the {side} child at {threads} threads")
            if (side == "damex") == out["torch_loaded"]:
                sys.exit(f"bench_backbone: the {side} child imported the other library")
            res[side][threads] = statistics.median(out["times"])
    per = "; ".join(f"{th}t damex {res['damex'][th] * 1e3:.0f} ms, torch {res['torch'][th] * 1e3:.0f} ms "
                    f"({res['torch'][th] / res['damex'][th]:.2f})" for th in sorted(res["damex"]))
    (d, dn), (t, tn) = (min((v, k) for k, v in res[s].items()) for s in ("damex", "torch"))
    print(f"{f'resnet50 fwd B=1 {size}x{size} (layer2..4)':<44s} damex {d * 1e3:8.2f} ms ({dn}t) | "
          f"torch {t * 1e3:8.2f} ms ({tn}t) | ratio {t / d:5.2f}   [{per}; each side in its own "
          f"process, median of {repeats}]", flush=True)


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
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 8)
    if args.child:
        child(args.child[0], int(args.child[1]), args.size, repeats)
        return
    resnet50_line(args.size, repeats)
    maxpool_line(args.size, max(repeats // 2, 2))


if __name__ == "__main__":
    main()
