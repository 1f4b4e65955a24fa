"""Benchmark of the nn kernels against PyTorch and the machine's sgemm rate.

    python bench/bench_nn.py            # full
    python bench/bench_nn.py --quick    # fewer repeats

Prints, in one run: conv2d forward and forward+backward against
torch.nn.functional.conv2d for detector-like shapes, linear forward GFLOP/s
against the sgemm rate of the same product measured now through
damex._C.sgemm, and layer norm against torch.  Each side is timed at 1 and 2
threads and the faster is kept (the thread count is printed); times are the
minimum over repeats, damex's runs interleaved with each other in this process and
torch's in a process of its own (damex.testing.timing.torch_in_own_process: the two
share one libgomp, whose idle spin the first importer fixes).  ratio = torch time /
damex time (> 1: damex faster).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import damex  # noqa: E402
from damex import ops  # noqa: E402
from damex._lib import _C  # noqa: E402
from damex.testing import timing  # noqa: E402

try:
    import torch
except ImportError:  # the sgemm share is still printed
    torch = None


def race(cases, repeats):
    """{side: fn} -> {side: (seconds, threads)}: the minimum over repeats and thread
    counts, interleaved (torch's, when torch_in_own_process started its process, come
    from there)."""
    return timing.race(cases, repeats, stat=np.min, min_time=0.002)


def line(name, res, flops=None):
    d, dn = res["damex"]
    s = f"{name:<44s} damex {d * 1e3:8.2f} ms ({dn}t)"
    if flops:
        s += f" {flops / d / 1e9:6.1f} GF/s"
    if "torch" in res:
        t, tn = res["torch"]
        s += f" | torch {t * 1e3:8.2f} ms ({tn}t) | ratio {t / d:5.2f}"
    print(s, flush=True)


def bench_conv(n, cin, cout, hw, k, stride, pad, repeats):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, cin, hw, hw)).astype(np.float32)
    w = (rng.normal(size=(cout, cin, k, k)) * 0.05).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    y = ops.conv2d_forward(x, w, b, stride, pad)
    dy = rng.normal(size=y.shape).astype(np.float32)
    flops = 2.0 * n * cout * cin * k * k * y.shape[2] * y.shape[3]

    def d_fwd():
        ops.conv2d_forward(x, w, b, stride, pad)

    def d_fwd_bwd():
        ops.conv2d_forward(x, w, b, stride, pad)
        ops.conv2d_backward(dy, x, w, stride, pad)

    t_fwd = t_fwd_bwd = None
    if torch is not None:
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        dyt = torch.tensor(dy)

        def t_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=pad)

        def t_fwd_bwd():
            xt.grad = wt.grad = bt.grad = None
            torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=pad).backward(dyt)

    name = f"conv2d N={n} {cin}->{cout} {k}x{k} s{stride} p{pad} @{hw}x{hw}"
    line(name + " fwd", race({"damex": d_fwd, "torch": t_fwd}, repeats), flops)
    line(name + " fwd+bwd", race({"damex": d_fwd_bwd, "torch": t_fwd_bwd}, repeats), 3 * flops)


def bench_linear(m, k, nout, repeats):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (rng.normal(size=(nout, k)) * 0.05).astype(np.float32)
    b = rng.normal(size=nout).astype(np.float32)
    wt_rm = np.ascontiguousarray(w.T)  # [K, N] for the plain sgemm
    c = np.empty((m, nout), np.float32)
    flops = 2.0 * m * k * nout
    res = race({"sgemm": lambda: _C.sgemm(c, x, wt_rm, m, nout, k),
                "damex": lambda: ops.linear_forward(x, w, b),
                "nobias": lambda: ops.linear_forward(x, w)}, repeats)
    # all three run in damex's pool (set_threads goes through damex for them)
    sg = flops / res["sgemm"][0] / 1e9
    for key, label in (("damex", "bias"), ("nobias", "no bias")):
        t, nt = res[key]
        g = flops / t / 1e9
        print(f"{'linear [%d,%d]x[%d,%d] fwd (%s)' % (m, k, k, nout, label):<44s} damex {t * 1e3:8.2f} ms "
              f"({nt}t) {g:6.1f} GF/s | sgemm {res['sgemm'][0] * 1e3:8.2f} ms ({res['sgemm'][1]}t) "
              f"{sg:6.1f} GF/s | share of sgemm {g / sg * 100:5.1f}%", flush=True)
    if torch is not None:
        xt, wtt, bt = torch.tensor(x), torch.tensor(w), torch.tensor(b)

        def t_lin():
            with torch.no_grad():
                torch.nn.functional.linear(xt, wtt, bt)
        line(f"linear [{m},{k}]x[{k},{nout}] fwd vs torch",
             race({"damex": lambda: ops.linear_forward(x, w, b), "torch": t_lin}, repeats), flops)


def bench_layer_norm(n, c, repeats):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, c)).astype(np.float32)
    g = rng.normal(size=c).astype(np.float32)
    bb = rng.normal(size=c).astype(np.float32)
    dy = rng.normal(size=(n, c)).astype(np.float32)

    def d_fwd():
        ops.layer_norm_forward(x, g, bb)

    def d_fwd_bwd():
        y, m, r = ops.layer_norm_forward(x, g, bb)
        ops.layer_norm_backward(dy, x, m, r, g)

    t_fwd = t_fwd_bwd = None
    if torch is not None:
        xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, bb))
        dyt = torch.tensor(dy)

        def t_fwd():
            with torch.no_grad():
                torch.nn.functional.layer_norm(xt, (c,), gt, bt)

        def t_fwd_bwd():
            xt.grad = gt.grad = bt.grad = None
            torch.nn.functional.layer_norm(xt, (c,), gt, bt).backward(dyt)

    line(f"layer_norm [{n},{c}] fwd", race({"damex": d_fwd, "torch": t_fwd}, repeats))
    line(f"layer_norm [{n},{c}] fwd+bwd", race({"damex": d_fwd_bwd, "torch": t_fwd_bwd}, repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    timing.torch_in_own_process(__file__)
    repeats = 5 if args.quick else 15
    print(f"damex {damex.__version__}, torch {torch.__version__ if torch else 'absent'}; "
          f"times: min over {repeats} interleaved repeats, best of 1 and 2 threads per side; "
          "ratio = torch / damex (> 1: damex faster)", flush=True)
    for n, cin, cout, hw, k, s, p in [(2, 64, 64, 64, 3, 1, 1), (2, 3, 32, 128, 3, 2, 1),
                                      (2, 256, 256, 32, 1, 1, 0), (2, 3, 64, 128, 7, 2, 3),
                                      (2, 64, 128, 64, 3, 2, 1)]:
        bench_conv(n, cin, cout, hw, k, s, p, repeats)
    bench_linear(4096, 256, 1024, repeats)
    bench_layer_norm(4096, 256, repeats)
    damex.set_num_threads(2)


if __name__ == "__main__":
    main()
