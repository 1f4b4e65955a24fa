"""Benchmark: multi-scale deformable attention and masked multi-head attention,
damex (C) against PyTorch on the same inputs, side by side.

    python bench/bench_msda.py           # DINO-like shapes
    python bench/bench_msda.py --quick   # fewer repetitions

Both sides are timed at 1 and 2 threads (torch.set_num_threads,
damex._C.set_num_threads), interleaved round by round, torch's in a process of its
own (damex.testing.timing.torch_in_own_process: the two share one libgomp, whose idle
spin the first importer fixes); each side's faster configuration is reported.  Times are medians in
milliseconds; ratio = torch / damex (> 1: damex is faster).
"""
import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from damex import ops  # noqa: E402
from damex.testing import timing, torch_twins  # noqa: E402
from damex._lib import _C  # noqa: E402


def compare(torch, name, ours, theirs, reps):
    """Time damex (`ours`) and torch (`theirs`) at 1 and 2 threads each, the four
    configurations interleaved round by round (the machine's load drifts); print the
    median of the faster configuration of each side and the ratio."""
    t = timing.interleaved(timing.thread_jobs({"damex": ours, "torch": theirs}), reps,
                           stat=statistics.median)
    med = {k: v * 1e3 for k, v in t.items()}
    d = min((med[("damex", t)], t) for t in (1, 2))
    p = min((med[("torch", t)], t) for t in (1, 2))
    print(f"{name:<44s} damex {d[0]:9.2f} ms ({d[1]}T)   torch {p[0]:9.2f} ms ({p[1]}T)   "
          f"ratio {p[0] / d[0]:6.2f}x", flush=True)


# ---- MSDA ---------------------------------------------------------------

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
            torch_twins.ms_deform_attn(tv, lv, tl, ta)

    def torch_fwd_bwd():
        tv.grad = tl.grad = ta.grad = None
        torch_twins.ms_deform_attn(tv, lv, tl, ta).backward(tg)

    tag = f"{name} N={N} M={M} D={D} Lq={Lq} S={S} L={L} P={P}"
    print(tag)
    compare(torch, "  msda forward", ours_fwd, torch_fwd, reps)
    compare(torch, "  msda forward+backward", ours_fwd_bwd, torch_fwd_bwd, reps)


# ---- attention ----------------------------------------------------------

def bench_attention(torch, N, L, C, H, reps):
    rng = np.random.default_rng(1)
    q, k, v, gout = (rng.normal(size=(N, L, C)).astype(np.float32) for _ in range(4))
    # DINO-like denoising mask: 5 groups of 20 denoising queries, then matching queries
    pad, size = 100, 20
    mask = np.zeros((L, L), bool)
    mask[pad:, :pad] = True
    for g in range(pad // size):
        mask[g * size:(g + 1) * size, :g * size] = True
        mask[g * size:(g + 1) * size, (g + 1) * size:pad] = True

    def ours_fwd():
        ops.attention_forward(q, k, v, H, mask)

    def ours_fwd_bwd():
        out, attn = ops.attention_forward(q, k, v, H, mask)
        ops.attention_backward(gout, q, k, v, attn, H)

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tm, tg = torch.tensor(mask), torch.tensor(gout)

    def torch_fwd():
        with torch.no_grad():
            torch_twins.attention(tq, tk, tv, H, tm)

    def torch_fwd_bwd():
        tq.grad = tk.grad = tv.grad = None
        torch_twins.attention(tq, tk, tv, H, tm)[0].backward(tg)

    def torch_sdpa():
        with torch.no_grad():
            hd = C // H
            th = [t.reshape(N, L, H, hd).transpose(1, 2) for t in (tq, tk, tv)]
            torch.nn.functional.scaled_dot_product_attention(*th, attn_mask=~tm)

    print(f"Attention N={N} L={L} C={C} H={H}, denoising mask")
    compare(torch, "  attention forward", ours_fwd, torch_fwd, reps)
    compare(torch, "  attention forward+backward", ours_fwd_bwd, torch_fwd_bwd, reps)
    compare(torch, "  attention forward vs SDPA (no attn map)", ours_fwd, torch_sdpa, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    timing.torch_in_own_process(__file__)
    import torch
    reps = 3 if args.quick else 10
    print(f"damex threads (openblas, openmp) = {_C.get_num_threads()}, cpus = {os.cpu_count()}, "
          f"torch {torch.__version__}; median of {reps}")
    levels = [(32, 32), (16, 16), (8, 8), (4, 4)]
    bench_msda(torch, "MSDA encoder", 2, 8, 32, levels, 1360, 4, reps)
    bench_msda(torch, "MSDA decoder", 2, 8, 32, levels, 300, 4, reps)
    for L in (300, 500):
        bench_attention(torch, 2, L, 256, 8, reps)


if __name__ == "__main__":
    main()
