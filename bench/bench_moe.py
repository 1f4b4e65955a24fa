"""MoE layer benchmark: damex against a PyTorch eager layer with the same maths.

    python bench/bench_moe.py            # full shapes, 5 repeats
    python bench/bench_moe.py --quick    # small shapes, 3 repeats (a smoke run)
    python bench/bench_moe.py --stat min # fastest repeat instead of the median

For each shape it prints, side by side: damex and PyTorch forward and
forward+backward times (median of the repeats; each timed at 1 and 2
threads, the faster kept, both shown), the ratio, the layer's GFLOP/s as a
share of the machine's sgemm rate (damex._C.sgemm on 4096x1024x256, best of
1 and 2 threads), the share of layer time spent outside the expert GEMMs
(the same GEMMs timed alone through damex._C.sgemm at the same thread
count), and the ops timed one by one.

The PyTorch layer: router matmul, softmax, top-k, capacity with
batch-prioritised routing, per-expert Linear-GELU(tanh)-Linear (addmm) on
index_select'ed rows, index_add combine.  Its forward is timed under
torch.no_grad() (the fastest PyTorch forward); damex's forward always saves
what the backward needs.

Every timed function of a shape runs once per round, round after round;
torch's run in a process of their own (damex.testing.timing.torch_in_own_process:
the two share one libgomp, whose idle spin the first importer fixes), so the
sides do not share each round's background load.  The load average is printed
before and after.  Trust a run only when it was low.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from damex import _C, ops  # noqa: E402
from damex.testing import timing, torch_twins  # noqa: E402

SHAPES = [
    dict(name="A", T=4096, D=256, F=1024, E=8, k=1, capacity_factor=1.25, bpr=True),
    dict(name="B", T=8192, D=256, F=2048, E=8, k=2, capacity_factor=None, bpr=False),
]
THREADS = (1, 2)
STAT = np.median


_torch = None


def interleaved(jobs, repeats):
    return timing.interleaved(jobs, repeats, stat=STAT)


def best(times, key):
    """(seconds, threads) of the fastest thread count for `key`."""
    return timing.best_of_threads(times, key, THREADS)


def make_inputs(s, seed=0):
    rng = np.random.default_rng(seed)
    T, D, F, E = s["T"], s["D"], s["F"], s["E"]
    return dict(
        x=rng.normal(size=(T, D)).astype(np.float32),
        w_router=rng.normal(0, D ** -0.5, (D, E)).astype(np.float32),
        w1=rng.normal(0, D ** -0.5, (E, D, F)).astype(np.float32),
        b1=rng.normal(0, 0.02, (E, F)).astype(np.float32),
        w2=rng.normal(0, F ** -0.5, (E, F, D)).astype(np.float32),
        b2=rng.normal(0, 0.02, (E, D)).astype(np.float32),
        dy=rng.normal(size=(T, D)).astype(np.float32),
    )


def layer_flop(s, N, backward):
    T, D, F, E = s["T"], s["D"], s["F"], s["E"]
    router, experts = 2.0 * T * D * E, 4.0 * N * D * F
    return 3 * (router + experts) if backward else router + experts


# ---- damex --------------------------------------------------------------------

def damex_jobs(s, inp):
    args = [inp[n] for n in ("x", "w_router", "w1", "b1", "w2", "b2")]
    opts = dict(k=s["k"], capacity_factor=s["capacity_factor"], bpr=s["bpr"])

    def fwd():
        return ops.moe_forward(*args, **opts)

    def fwd_bwd():
        y, state = ops.moe_forward(*args, **opts)
        return ops.moe_backward(inp["dy"], state)

    return fwd, fwd_bwd


def op_jobs(s, inp, state):
    """Each op of the layer alone, forward + backward."""
    x, wr = inp["x"], inp["w_router"]
    r, dy = state.router, inp["dy"]
    opts = dict(k=s["k"], capacity_factor=s["capacity_factor"], bpr=s["bpr"])
    w = [inp[n] for n in ("w1", "b1", "w2", "b2")]
    xe = ops.dispatch_forward(x, r)
    ye, saved = ops.expert_ffn_forward(xe, r.expert_count, *w)
    dye, dcw = ops.combine_backward(dy, ye, r)
    dxe = ops.expert_ffn_backward(dye, saved)[0]
    T = s["T"]

    def routing():
        res = ops.router_forward(x, wr, **opts)
        ops.router_logits_backward(ops.router_backward(dcw, res), x, wr)

    jobs = {
        "routing": routing,
        "dispatch": lambda: (ops.dispatch_forward(x, r), ops.dispatch_backward(dxe, r, T)),
        "expert FFN": lambda: ops.expert_ffn_backward(
            dye, ops.expert_ffn_forward(xe, r.expert_count, *w)[1]),
        "combine": lambda: (ops.combine_forward(ye, r), ops.combine_backward(dy, ye, r)),
    }
    if hasattr(ops, "damex_loss_forward") and hasattr(ops, "damex_loss_backward"):
        target = np.arange(T, dtype=np.int64) % s["E"]
        jobs["DAMEX loss"] = lambda: (ops.damex_loss_forward(r.logits, target),
                                      ops.damex_loss_backward(r.logits, target))
    return jobs


def gemm_jobs(s, inp, state):
    """The layer's expert GEMMs (2 forward, 4 backward per expert, same shapes,
    transposes made beforehand) alone through damex._C.sgemm: (fwd, fwd+bwd)."""
    D, F, E = s["D"], s["F"], s["E"]
    count = state.router.expert_count
    rng = np.random.default_rng(1)
    bufs = []
    for e in range(E):
        n = int(count[e])
        if n == 0:
            continue
        xe = rng.random((n, D), dtype=np.float32)
        a = rng.random((n, F), dtype=np.float32)
        bufs.append(dict(n=n, xe=xe, a=a, g=rng.random((n, D), dtype=np.float32),
                         xeT=np.ascontiguousarray(xe.T), aT=np.ascontiguousarray(a.T),
                         w1=inp["w1"][e], w2=inp["w2"][e],
                         w1T=np.ascontiguousarray(inp["w1"][e].T),
                         w2T=np.ascontiguousarray(inp["w2"][e].T),
                         h=np.empty((n, F), np.float32), y=np.empty((n, D), np.float32),
                         dW1=np.empty((D, F), np.float32), dW2=np.empty((F, D), np.float32)))

    def fwd():
        for b in bufs:
            _C.sgemm(b["h"], b["xe"], b["w1"], b["n"], F, D)       # xe @ w1
            _C.sgemm(b["y"], b["a"], b["w2"], b["n"], D, F)        # a @ w2

    def fwd_bwd():
        fwd()
        for b in bufs:
            _C.sgemm(b["dW2"], b["aT"], b["g"], F, D, b["n"])      # a^T @ dye
            _C.sgemm(b["h"], b["g"], b["w2T"], b["n"], F, D)       # dye @ w2^T
            _C.sgemm(b["dW1"], b["xeT"], b["a"], D, F, b["n"])     # xe^T @ dh
            _C.sgemm(b["y"], b["a"], b["w1T"], b["n"], D, F)       # dh @ w1^T

    return fwd, fwd_bwd


# ---- PyTorch eager -------------------------------------------------------------------

def torch_jobs(torch, s, inp):
    names = ("x", "w_router", "w1", "b1", "w2", "b2")
    opts = (s["k"], s["capacity_factor"], s["bpr"])
    dy = torch.tensor(inp["dy"])
    params = [torch.tensor(inp[n], requires_grad=True) for n in names]

    def fwd():
        with torch.no_grad():
            return torch_twins.moe_layer(*params, *opts)

    def fwd_bwd():
        for p in params:
            p.grad = None
        torch_twins.moe_layer(*params, *opts).backward(dy)

    return fwd, fwd_bwd


# ---- report ---------------------------------------------------------------------------

def bench_shape(s, repeats, torch):
    inp = make_inputs(s)
    d_fwd, d_all = damex_jobs(s, inp)
    y, state = d_fwd()
    N = int(state.router.expert_count.sum())
    g_fwd, g_all = gemm_jobs(s, inp, state)
    flop_sgemm, sgemm, _ = timing.sgemm_job()
    jobs = {}
    for th in THREADS:
        jobs[("sgemm", th)] = (th, sgemm)
        jobs[("damex fwd", th)] = (th, d_fwd)
        jobs[("damex fwd+bwd", th)] = (th, d_all)
        jobs[("gemm fwd", th)] = (th, g_fwd)
        jobs[("gemm fwd+bwd", th)] = (th, g_all)
    y_t = None
    if torch is not None:
        t_fwd, t_all = torch_jobs(torch, s, inp)
        y_t = t_fwd().numpy()
        for th in THREADS:
            jobs[("torch fwd", th)] = (th, t_fwd)
            jobs[("torch fwd+bwd", th)] = (th, t_all)
    t = interleaved(jobs, repeats)
    rate = max(flop_sgemm / t[("sgemm", th)] for th in THREADS) / 1e9

    cf = "dropless" if s["capacity_factor"] is None else f"cf={s['capacity_factor']}"
    print(f"\nshape {s['name']}: T={s['T']} D={s['D']} F={s['F']} E={s['E']} k={s['k']} {cf}"
          f"{' BPR' if s['bpr'] else ''}  (kept rows N={N})")
    print("  sgemm 4096x1024x256: " + ", ".join(
        f"{th} thread{'s' if th > 1 else ''} {flop_sgemm / t[('sgemm', th)] / 1e9:.1f} GFLOP/s"
        for th in THREADS) + f"  -> machine rate {rate:.1f} GFLOP/s")
    print(f"  {'':9}{'damex ms (threads)':>20}{'torch ms (threads)':>21}{'torch/damex':>13}"
          f"{'damex GFLOP/s':>15}{'of sgemm':>10}{'outside GEMMs':>15}")
    for label in ("fwd", "fwd+bwd"):
        td, thd = best(t, "damex " + label)
        gf = layer_flop(s, N, backward=label == "fwd+bwd") / td / 1e9
        outside = 1 - t[("gemm " + label, thd)] / td
        if torch is not None:
            tt, tht = best(t, "torch " + label)
            torch_col, ratio = f"{tt * 1e3:.1f} ({tht})", f"{tt / td:.2f}x"
        else:
            torch_col, ratio = "n/a", "n/a"
        print(f"  {label:9}{f'{td * 1e3:.1f} ({thd})':>20}{torch_col:>21}{ratio:>13}"
              f"{gf:15.1f}{f'{100 * gf / rate:.0f}%':>10}{f'{100 * outside:.1f}%':>15}")
    for who in ("damex", "torch", "gemm"):
        if (who + " fwd", 1) not in t:
            continue
        detail = ", ".join(f"{th} thread{'s' if th > 1 else ''}: "
                           f"fwd {t[(who + ' fwd', th)] * 1e3:.1f} ms, "
                           f"fwd+bwd {t[(who + ' fwd+bwd', th)] * 1e3:.1f} ms" for th in THREADS)
        print(f"  {who + (' (expert GEMMs alone)' if who == 'gemm' else '')} at {detail}")

    _, thd = best(t, "damex fwd+bwd")
    ops_t = interleaved({k: (thd, fn) for k, fn in op_jobs(s, inp, state).items()}, repeats)
    total = sum(ops_t.values())
    print(f"  ops timed alone, fwd+bwd at {thd} thread{'s' if thd > 1 else ''}: " + ", ".join(
        f"{k} {v * 1e3:.1f} ms ({100 * v / total:.1f}%)" for k, v in ops_t.items()))
    print(f"  routing + dispatch + combine{' + loss' if 'DAMEX loss' in ops_t else ''}: "
          f"{100 * (total - ops_t['expert FFN']) / total:.1f}% of the summed op time")
    if y_t is not None:
        print(f"  max |y_damex - y_torch| = {np.abs(y - y_t).max():.2e}")


def main():
    global STAT, _torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--shape", choices=[s["name"] for s in SHAPES], action="append",
                    help="run only this shape (repeatable)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic over the repeats (min resists a busy machine)")
    args = ap.parse_args()
    STAT = np.median if args.stat == "median" else np.min
    shapes = [dict(s) for s in SHAPES if not args.shape or s["name"] in args.shape]
    repeats = args.repeats or (3 if args.quick else 5)
    if args.quick:
        for s in shapes:
            s["T"] //= 8
            s["F"] //= 4
    if not args.no_torch:
        timing.torch_in_own_process(__file__)
        try:
            import torch
            _torch = torch
        except ImportError:
            print("torch not installed: PyTorch columns skipped")
    print(f"cores {os.cpu_count()}, damex threads (openblas, openmp) {_C.get_num_threads()}, "
          f"torch {_torch.__version__ if _torch else 'n/a'}, "
          f"load average {timing.load_average():.2f}, {args.stat} of {repeats} repeats")
    for s in shapes:
        bench_shape(s, repeats, _torch)
    print(f"\nload average at the end {timing.load_average():.2f}")


if __name__ == "__main__":
    main()
