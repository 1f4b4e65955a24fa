"""Routing-loss benchmark: damex against the same losses in PyTorch autograd.

    python bench/bench_routing_loss.py             # T=8192, E=8 (and T=32768)
    python bench/bench_routing_loss.py --quick     # T=1024, E=8 (a smoke run)

For each loss it prints forward and forward+backward times (best of the
repeats, wall clock and this thread's CPU time) for damex on one thread and for
PyTorch float32 autograd, and the ratio.  Timing is wall clock on a possibly
shared machine: the load average is printed before and after; trust a run
only when it was low (thread CPU time is less sensitive to other processes).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from damex import _C, ops  # noqa: E402
from damex.testing import timing, torch_twins  # noqa: E402


def best(fn, repeats, inner):
    """(wall, thread CPU) seconds per call: the minimum over repeats of `inner` calls."""
    return timing.interleaved({"fn": (None, fn)}, repeats, stat=np.min, inner=inner, cpu=True)["fn"]


def damex_cases(g, noise, target, sigma, k):
    return {
        "importance": (lambda: ops.importance_loss_forward(g),
                       lambda: ops.importance_loss_backward(g)),
        "load": (lambda: ops.load_loss_forward(g, noise, sigma, k),
                 lambda: ops.load_loss_backward(g, noise, sigma, k)),
        "switch": (lambda: ops.switch_loss_forward(g, k=k),
                   lambda: ops.switch_loss_backward(g, k=k)),
        "z": (lambda: ops.z_loss_forward(g), lambda: ops.z_loss_backward(g)),
        "damex": (lambda: ops.damex_loss_forward(g, target),
                  lambda: ops.damex_loss_backward(g, target)),
    }


def torch_cases(torch, g, noise, target, sigma, k):
    n = torch.tensor(noise)
    y = torch.tensor(target)
    fns = {
        "importance": torch_twins.importance_loss,
        "load": lambda t: torch_twins.load_loss(t, n, sigma, k),
        "switch": torch_twins.switch_loss,
        "z": torch_twins.z_loss,
        "damex": lambda t: torch_twins.damex_loss(t, y),
    }
    out = {}
    for name, f in fns.items():
        def fwd(f=f):
            with torch.no_grad():
                f(torch.from_numpy(g))

        def fwd_bwd(f=f):
            t = torch.from_numpy(g).requires_grad_(True)
            f(t).backward()
        out[name] = (fwd, fwd_bwd)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [(1024, 8)] if args.quick else [(8192, 8), (32768, 8)]
    repeats, inner = (3, 5) if args.quick else (7, 20)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    print(f"load average before: {timing.load_average():.2f}")
    _C.set_num_threads(1)
    for T, E in shapes:
        rng = np.random.default_rng(0)
        sigma, k = 1.0 / E, 1
        g = rng.normal(size=(T, E)).astype(np.float32)
        noise = (sigma * rng.normal(size=(T, E))).astype(np.float32)
        target = rng.integers(0, E, T)
        dm = damex_cases(g, noise, target, sigma, k)
        tc = torch_cases(torch, g, noise, target, sigma, k) if torch else {}
        print(f"\nT={T} E={E} k={k}, one thread; times in microseconds (wall / thread CPU)")
        print(f"{'loss':11s} {'damex fwd':>17s} {'damex fwd+bwd':>17s} {'torch fwd':>17s} "
              f"{'torch fwd+bwd':>17s} {'ratio fwd+bwd':>14s}")
        for name, (f, b) in dm.items():
            fw = best(f, repeats, inner)
            bw = best(b, repeats, inner)
            fb = (fw[0] + bw[0], fw[1] + bw[1])
            row = f"{name:11s} {fw[0]*1e6:8.1f}/{fw[1]*1e6:8.1f} {fb[0]*1e6:8.1f}/{fb[1]*1e6:8.1f}"
            if name in tc:
                tf = best(tc[name][0], repeats, inner)
                tb = best(tc[name][1], repeats, inner)
                row += (f" {tf[0]*1e6:8.1f}/{tf[1]*1e6:8.1f} {tb[0]*1e6:8.1f}/{tb[1]*1e6:8.1f}"
                        f" {tb[0]/fb[0]:13.1f}x")
            print(row)
    print(f"\nload average after: {timing.load_average():.2f}")


if __name__ == "__main__":
    main()
