"""The ``damex`` command line (``python -m damex`` works too).

    damex demo [--mode damex|balance|both] [--steps N]   MoE layer on a generated mixture
    damex bench moe [...]                                the MoE benchmark (bench/bench_moe.py)
"""
import argparse
import os
import runpy
import sys


def _cmd_demo(args):
    from .engine.moe_demo import format_matrix, run_demo

    modes = ["damex", "balance"] if args.mode == "both" else [args.mode]
    for mode in modes:
        print(f"== MoE layer, {mode} routing loss: {args.steps} steps, 4 datasets -> 4 experts ==")
        res = run_demo(mode=mode, steps=args.steps, seed=args.seed,
                       log_every=max(args.steps // 6, 1))
        print("dataset x expert token fractions at inference (no dataset labels given):")
        print(format_matrix(res["dataset_expert"]))
        print(f"routing accuracy {res['accuracy']:.3f}   held-out mse {res['mse']:.4f}   "
              f"({res['seconds']:.1f} s)\n")
    return 0


def _cmd_bench(args):
    script = os.path.join(args.bench_dir, f"bench_{args.what}.py")
    if not os.path.exists(script):
        print(f"damex bench: {script} not found (run from a source checkout, or pass --bench-dir)",
              file=sys.stderr)
        return 2
    sys.argv = [script] + args.rest
    runpy.run_path(script, run_name="__main__")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="damex", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train an MoE layer on a generated mixture of datasets")
    d.add_argument("--mode", choices=["damex", "balance", "both"], default="both")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    b = sub.add_parser("bench", help="run a benchmark from bench/")
    b.add_argument("what", help="which benchmark, e.g. moe, nn, msda")
    b.add_argument("--bench-dir", default="bench")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
