"""Data and expert parallel over MPI against threads, side by side in one run.

    python bench/bench_mpi.py                 # test-size model, batch 4, 2 warm-up + 6 timed steps
    python bench/bench_mpi.py --steps 10 --batch-size 8
    python bench/bench_mpi.py --model tiny    # the shipped tiny preset at 64-96 px (tiny_damex.json)
    python bench/bench_mpi.py --model paper --batch-size 2 --steps 2 --warmup 1   # ~5 GB per process

Trains the same config through the CLI in each setting: 1 process x 1 thread (the
baseline), 1 process x 2 threads, then ``mpiexec -n 2`` processes x 1 thread each,
data parallel and data+experts (each rank holding half of every MoE layer's
experts).  The models: ``small`` a shrunk DINO-DAMEX at 48-64 px on the embedded
synthetic mixture, ``tiny`` the shipped preset, ``paper`` the paper preset (ResNet-50,
6+6 layers, 8 experts of 2048) at 256-384 px.  It prints, per setting, the median
seconds per step and images per second over the timed steps (from the run's
``log.jsonl``), and for the MPI runs the median time per step spent in collectives
(waits for the slower rank included) and, of it, in the gradient all-reduce alone
(the most an overlap of the all-reduce with the backward could hide), the speed-up
against 1 process x 2 threads, and the parallel efficiency (speed-up over 1 process x
1 thread per core used).

Wall clock on a possibly shared machine: the load average is printed; trust a
run only when it was low.  Needs ``mpiexec`` (``pip install 'damex[mpi]'``).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
         "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
         "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
         "stem_width": 8, "dn_number": 12, "routing": "damex"}


def run(root, name, n, threads, steps, env, parallel="data"):
    out = os.path.join(root, name)
    cmd = [sys.executable, "-m", "damex", "train", os.path.join(root, "cfg.json"), "--no-progress",
           "--out", out, "--steps", str(steps), "--threads", str(threads),
           "--set", f'train.parallel="{parallel}"']
    if n > 1:
        cmd = [shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + env["PATH"]),
               "-n", str(n)] + cmd
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model", choices=("small", "tiny", "paper"), default="small",
                    help="small: the test-size model (0.1M parameters); tiny: the shipped preset; "
                         "paper: the paper preset")
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MV2_"))}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    total = args.warmup + args.steps
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as root:
        model, (lo, hi) = {"small": (MODEL, (48, 64)),
                           "tiny": ({"preset": "tiny", "routing": "damex"}, (64, 96)),
                           "paper": ({"preset": "paper", "routing": "damex"}, (256, 384))}[args.model]
        cfg = {"model": model,
               "data": {"synthetic": {"root": os.path.join(root, "data"), "preset": "tiny"},
                        "batch_size": args.batch_size, "min_size": lo, "max_size": hi},
               "train": {"steps": total}}
        with open(os.path.join(root, "cfg.json"), "w") as f:
            json.dump(cfg, f)
        rows = []
        settings = (("1 process x 1 thread", 1, 1, "data"), ("1 process x 2 threads", 1, 2, "data"),
                    ("2 x 1, data", 2, 1, "data"), ("2 x 1, data+experts", 2, 1, "data+experts"))
        for name, n, threads, parallel in settings:
            log = run(root, f"run{len(rows)}", n, threads, total, env, parallel)[args.warmup:]
            t = statistics.median(r["time"] for r in log)
            comm = statistics.median(r["comm_time"] for r in log) if n > 1 else 0.0
            red = statistics.median(r["allreduce_time"] for r in log) if n > 1 else 0.0
            rows.append((name, t, args.batch_size / t, comm, red))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"model {args.model}, batch {args.batch_size}, median over {args.steps} steps after {args.warmup} warm-up")
    print(f"{'setting':<24} {'s/step':>8} {'images/s':>9} {'comm s/step':>12} {'allreduce':>10} "
          f"{'vs 2 threads':>13} {'efficiency':>11}")
    for (name, t, ips, comm, red), (_, n, threads, _) in zip(rows, settings):
        eff = rows[0][1] / (t * n * threads)    # speed-up over 1 x 1 per core used
        print(f"{name:<24} {t:8.3f} {ips:9.2f} {comm:12.3f} {red:10.4f} {rows[1][1] / t:12.2f}x "
              f"{eff:10.0%}")


if __name__ == "__main__":
    main()
