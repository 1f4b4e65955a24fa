"""Benchmark: multi-scale deformable attention and masked multi-head attention,
damex (C) against PyTorch on the same inputs, side by side.

    python bench/bench_msda.py           # DINO-like shapes
    python bench/bench_msda.py --quick   # fewer repetitions

PyTorch is timed at 1 and 2 threads (torch.set_num_threads) and the faster is
reported; damex runs with its default threads.  Times are the median of the
repetitions, in milliseconds; ratio = torch / damex (> 1: damex is faster).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from damex import ops  # noqa: E402
from damex._lib import _C  # noqa: E402


def timeit(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_best(torch, fn, reps):
    """Median time of fn at 1 and 2 torch threads; the faster and its thread count."""
    before = torch.get_num_threads()
    best = None
    for t in (1, 2):
        torch.set_num_threads(t)
        ms = timeit(fn, reps)
        if best is None or ms < best[0]:
            best = (ms, t)
    torch.set_num_threads(before)
    return best


def line(name, ours, theirs):
    ms_t, threads = theirs
    print(f"{name:<44s} damex {ours:9.2f} ms   torch {ms_t:9.2f} ms ({threads}T)   "
          f"ratio {ms_t / ours:6.2f}x", flush=True)


# ---- MSDA ---------------------------------------------------------------

def torch_msda(torch, value, shapes, loc, attw):
    """Deformable-DETR's grid_sample formulation (ms_deform_attn_core_pytorch)."""
    F = torch.nn.functional
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    grids = 2 * loc - 1
    sampled = []
    for l, (v, (H, W)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        v = v.flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        g = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    a = attw.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    return (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(N, M * D, Lq).transpose(1, 2)


def bench_msda(torch, name, N, M, D, levels, Lq, P, reps):
    rng = np.random.default_rng(0)
    shapes = np.array(levels, np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    S, L = int(sizes.sum()), len(levels)
    value = rng.normal(size=(N, S, M, D)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, size=(N, Lq, M, L, P, 2)).astype(np.float32)
    attw = rng.dirichlet(np.ones(L * P), size=(N, Lq, M)).reshape(N, Lq, M, L, P).astype(np.float32)
    gout = rng.normal(size=(N, Lq, M * D)).astype(np.float32)

    def ours_fwd():
        ops.ms_deform_attn_forward(value, shapes, start, loc, attw)

    def ours_fwd_bwd():
        ops.ms_deform_attn_forward(value, shapes, start, loc, attw)
        ops.ms_deform_attn_backward(gout, value, shapes, start, loc, attw)

    tv, tl, ta = (torch.tensor(a, requires_grad=True) for a in (value, loc, attw))
    tg = torch.tensor(gout)
    lv = [tuple(x) for x in levels]

    def torch_fwd():
        with torch.no_grad():
            torch_msda(torch, tv, lv, tl, ta)

    def torch_fwd_bwd():
        tv.grad = tl.grad = ta.grad = None
        torch_msda(torch, tv, lv, tl, ta).backward(tg)

    tag = f"{name} N={N} M={M} D={D} Lq={Lq} S={S} L={L} P={P}"
    print(tag)
    line("  msda forward", timeit(ours_fwd, reps), torch_best(torch, torch_fwd, reps))
    line("  msda forward+backward", timeit(ours_fwd_bwd, reps), torch_best(torch, torch_fwd_bwd, reps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    import torch
    reps = 3 if args.quick else 10
    print(f"damex threads (openblas, openmp) = {_C.get_num_threads()}, cpus = {os.cpu_count()}, "
          f"torch {torch.__version__}; median of {reps}")
    levels = [(32, 32), (16, 16), (8, 8), (4, 4)]
    bench_msda(torch, "MSDA encoder", 2, 8, 32, levels, 1360, 4, reps)
    bench_msda(torch, "MSDA decoder", 2, 8, 32, levels, 300, 4, reps)


if __name__ == "__main__":
    main()
