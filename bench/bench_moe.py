"""MoE layer benchmark: damex against a PyTorch eager layer with the same maths.

    python bench/bench_moe.py            # full shapes, 5-7 repeats
    python bench/bench_moe.py --quick    # small shapes, 3 repeats (a smoke run)

For each shape it prints, side by side: damex and PyTorch forward and
forward+backward times (median of the repeats; PyTorch timed at 1 and 2
threads, the faster kept), the ratio, the layer's GFLOP/s as a share of the
sgemm rate measured in the same run, the share of layer time spent outside
the expert GEMMs (the same GEMMs timed alone with damex._C.sgemm), and a
breakdown by op.  The PyTorch layer: router matmul, softmax, top-k, capacity
with batch-prioritised routing, per-expert Linear-GELU-Linear on
index_select'ed rows, index_add combine.  Its forward is timed under
torch.no_grad() (the fastest PyTorch forward); damex's forward always saves
what the backward needs.

Timing is wall clock on a possibly shared machine: the load average is
printed before and after; trust a run only when it was low.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from damex import _C, ops  # noqa: E402

SHAPES = [
    dict(name="A", T=4096, D=256, F=1024, E=8, k=1, capacity_factor=1.25, bpr=True),
    dict(name="B", T=8192, D=256, F=2048, E=8, k=2, capacity_factor=None, bpr=False),
]


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def sgemm_rates(repeats):
    M, N, K = 4096, 1024, 256
    rng = np.random.default_rng(0)
    a = rng.random((M, K), dtype=np.float32)
    b = rng.random((K, N), dtype=np.float32)
    c = np.empty((M, N), np.float32)
    flop = 2.0 * M * N * K
    damex = flop / median_time(lambda: _C.sgemm(c, a, b, M, N, K), repeats, warmup=2) / 1e9
    numpy = flop / median_time(lambda: a @ b, repeats, warmup=2) / 1e9
    return damex, numpy, (M, N, K)


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

def damex_layer(s, inp, repeats):
    args = [inp[n] for n in ("x", "w_router", "w1", "b1", "w2", "b2")]
    opts = dict(k=s["k"], capacity_factor=s["capacity_factor"], bpr=s["bpr"])

    def fwd():
        return ops.moe_forward(*args, **opts)

    def fwd_bwd():
        y, state = ops.moe_forward(*args, **opts)
        return ops.moe_backward(inp["dy"], state)

    t_fwd = median_time(fwd, repeats)
    t_all = median_time(fwd_bwd, repeats)
    y, state = fwd()
    return t_fwd, t_all, y, state


def damex_breakdown(s, inp, state, repeats):
    """Each op of the layer timed alone (forward + backward), in seconds."""
    x, wr = inp["x"], inp["w_router"]
    r, dy = state.router, inp["dy"]
    opts = dict(k=s["k"], capacity_factor=s["capacity_factor"], bpr=s["bpr"])
    xe = ops.dispatch_forward(x, r)
    ye, saved = ops.expert_ffn_forward(xe, r.expert_count, inp["w1"], inp["b1"], inp["w2"],
                                       inp["b2"])
    dye, dcw = ops.combine_backward(dy, ye, r)
    dxe = ops.expert_ffn_backward(dye, saved)[0]
    T = s["T"]

    def routing():
        res = ops.router_forward(x, wr, **opts)
        dl = ops.router_backward(dcw, res)
        ops.router_logits_backward(dl, x, wr)

    out = {
        "routing": median_time(routing, repeats),
        "dispatch": median_time(lambda: (ops.dispatch_forward(x, r),
                                         ops.dispatch_backward(dxe, r, T)), repeats),
        "expert FFN": median_time(lambda: ops.expert_ffn_backward(
            dye, ops.expert_ffn_forward(xe, r.expert_count, inp["w1"], inp["b1"], inp["w2"],
                                        inp["b2"])[1]), repeats),
        "combine": median_time(lambda: (ops.combine_forward(ye, r),
                                        ops.combine_backward(dy, ye, r)), repeats),
    }
    if hasattr(ops, "damex_loss_forward") and hasattr(ops, "damex_loss_backward"):
        target = np.arange(T, dtype=np.int64) % s["E"]
        out["DAMEX loss"] = median_time(lambda: (ops.damex_loss_forward(r.logits, target),
                                                 ops.damex_loss_backward(r.logits, target)),
                                        repeats)
    return out


def gemm_only(s, inp, state, repeats):
    """The layer's expert GEMMs (2 forward, 4 backward per expert, same shapes)
    run alone through damex._C.sgemm with OpenBLAS's threads: (fwd, fwd+bwd) s."""
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
        g = rng.random((n, D), dtype=np.float32)
        bufs.append(dict(n=n, xe=xe, a=a, g=g, xeT=np.ascontiguousarray(xe.T),
                         aT=np.ascontiguousarray(a.T), w1=inp["w1"][e], w2=inp["w2"][e],
                         w1T=np.ascontiguousarray(inp["w1"][e].T),
                         w2T=np.ascontiguousarray(inp["w2"][e].T),
                         h=np.empty((n, F), np.float32), y=np.empty((n, D), np.float32),
                         dW1=np.empty((D, F), np.float32), dW2=np.empty((F, D), np.float32)))

    def fwd():
        for b in bufs:
            _C.sgemm(b["h"], b["xe"], b["w1"], b["n"], F, D)
            _C.sgemm(b["y"], b["a"], b["w2"], b["n"], D, F)

    def bwd():
        for b in bufs:
            _C.sgemm(b["dW2"], b["aT"], b["g"], F, D, b["n"])
            _C.sgemm(b["h"], b["g"], b["w2T"], b["n"], F, D)
            _C.sgemm(b["dW1"], b["xeT"], b["a"], D, F, b["n"])
            _C.sgemm(b["y"], b["a"], b["w1T"], b["n"], D, F)

    t_fwd = median_time(fwd, repeats)
    return t_fwd, t_fwd + median_time(bwd, repeats)


# ---- PyTorch eager -------------------------------------------------------------------

def torch_layer(torch, x, wr, w1, b1, w2, b2, k, capacity_factor, bpr):
    """The same maths as damex.ops.moe_forward (GELU tanh form, p not renormalised)."""
    T, D = x.shape
    E = wr.shape[1]
    probs = torch.softmax(x @ wr, dim=1)
    topv, topi = torch.topk(probs, k, dim=1)
    if capacity_factor is None:
        kept = torch.ones_like(topi, dtype=torch.bool)
    else:
        cap = math.ceil(capacity_factor * k * T / E)
        with torch.no_grad():
            order = torch.argsort(-topv[:, 0], stable=True) if bpr else torch.arange(T)
            kept = torch.zeros((T, k), dtype=torch.bool)
            base = torch.zeros(E, dtype=torch.long)
            rows = torch.arange(T)
            for j in range(k):
                e = topi[order, j]
                onehot = torch.nn.functional.one_hot(e, E)
                pos = (onehot.cumsum(0) - 1)[rows, e] + base[e]
                kept[order, j] = pos < cap
                base = torch.clamp(base + onehot.sum(0), max=cap)
    w = topv * kept
    y = torch.zeros_like(x)
    for e in range(E):
        tok, j = torch.nonzero((topi == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = torch.nn.functional.gelu(torch.addmm(b1[e], x.index_select(0, tok), w1[e]),
                                     approximate="tanh")
        ye = torch.addmm(b2[e], h, w2[e])
        y = y.index_add(0, tok, ye * w[tok, j].unsqueeze(1))
    return y


def torch_times(torch, s, inp, repeats):
    """{threads: (fwd s, fwd+bwd s)} and the forward output."""
    names = ("x", "w_router", "w1", "b1", "w2", "b2")
    opts = (s["k"], s["capacity_factor"], s["bpr"])
    dy = torch.tensor(inp["dy"])
    out, y = {}, None
    saved_threads = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        params = [torch.tensor(inp[n], requires_grad=True) for n in names]

        def fwd():
            with torch.no_grad():
                return torch_layer(torch, *params, *opts)

        def fwd_bwd():
            for p in params:
                p.grad = None
            torch_layer(torch, *params, *opts).backward(dy)

        out[threads] = (median_time(fwd, repeats), median_time(fwd_bwd, repeats))
        y = fwd().numpy()
    torch.set_num_threads(saved_threads)
    return out, y


# ---- report ---------------------------------------------------------------------------

def bench_shape(s, rate, repeats, torch):
    inp = make_inputs(s)
    t_fwd, t_all, y, state = damex_layer(s, inp, repeats)
    N = int(state.router.expert_count.sum())
    cf = "dropless" if s["capacity_factor"] is None else f"cf={s['capacity_factor']}"
    print(f"\nshape {s['name']}: T={s['T']} D={s['D']} F={s['F']} E={s['E']} k={s['k']} {cf}"
          f"{' BPR' if s['bpr'] else ''}  (kept rows N={N})")
    tt = y_t = None
    if torch is not None:
        tt, y_t = torch_times(torch, s, inp, repeats)
    print(f"  {'':9}{'damex ms':>10}{'torch ms (threads)':>21}{'torch/damex':>13}"
          f"{'damex GFLOP/s':>15}{'of sgemm':>10}")
    for i, (label, t) in enumerate((("fwd", t_fwd), ("fwd+bwd", t_all))):
        gf = layer_flop(s, N, backward=i == 1) / t / 1e9
        if tt is not None:
            best = min(tt, key=lambda th: tt[th][i])
            t_torch = tt[best][i]
            torch_col = f"{t_torch * 1e3:14.1f} ({best})"
            ratio = f"{t_torch / t:12.2f}x"
        else:
            torch_col, ratio = f"{'n/a':>20}", f"{'n/a':>13}"
        print(f"  {label:9}{t * 1e3:10.1f}{torch_col:>21}{ratio:>13}{gf:15.1f}"
              f"{100 * gf / rate:9.0f}%")
    if tt is not None:
        detail = ", ".join(f"{th} thread{'s' if th > 1 else ''}: fwd {v[0] * 1e3:.1f} ms, "
                           f"fwd+bwd {v[1] * 1e3:.1f} ms" for th, v in tt.items())
        print(f"  torch at {detail}")
    g_fwd, g_all = gemm_only(s, inp, state, repeats)
    print(f"  outside the expert GEMMs: fwd {100 * (1 - g_fwd / t_fwd):.1f}%, "
          f"fwd+bwd {100 * (1 - g_all / t_all):.1f}% of the layer time "
          f"(the same GEMMs alone: fwd {g_fwd * 1e3:.1f} ms, fwd+bwd {g_all * 1e3:.1f} ms)")
    parts = damex_breakdown(s, inp, state, repeats)
    total = sum(parts.values())
    non_expert = total - parts["expert FFN"]
    print("  ops timed alone (fwd+bwd): " + ", ".join(
        f"{k} {v * 1e3:.1f} ms ({100 * v / total:.1f}%)" for k, v in parts.items()))
    print(f"  routing + dispatch + combine{' + loss' if 'DAMEX loss' in parts else ''}: "
          f"{100 * non_expert / total:.1f}% of the summed op time")
    if y_t is not None:
        print(f"  max |y_damex - y_torch| = {np.abs(y - y_t).max():.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    shapes = [dict(s) for s in SHAPES]
    repeats = args.repeats or (3 if args.quick else 5)
    if args.quick:
        for s in shapes:
            s["T"] //= 8
            s["F"] //= 4
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch not installed: PyTorch columns skipped")
    print(f"cores {os.cpu_count()}, damex threads (openblas, openmp) {_C.get_num_threads()}, "
          f"torch {torch.__version__ if torch else 'n/a'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rate, np_rate, (M, N, K) = sgemm_rates(max(repeats, 5))
    print(f"sgemm {M}x{N}x{K}: damex._C.sgemm {rate:.1f} GFLOP/s, numpy {np_rate:.1f} GFLOP/s "
          f"(shares below are of the damex rate)")
    for s in shapes:
        bench_shape(s, rate, repeats, torch)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
