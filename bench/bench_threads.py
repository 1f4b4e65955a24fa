"""Benchmark: the thread count a run takes without ``train.threads``
(:func:`damex.engine.config.default_threads`), measured on this machine.

    python bench/bench_threads.py [--quick] [--rounds R] [--steps N]

For each model below, training steps (``Trainer.train_step``: data, forward, criterion,
backward, clipping, AdamW) on the embedded synthetic mixture, at 1 thread and at all
cores.  Each (model, thread count) runs in a fresh child process (2 warm-up steps, then
``--steps`` timed ones); the children of one model alternate between the two counts for
``--rounds`` rounds, so both see the same background load.  Printed per model: the
median seconds per step at each count over all timed steps, the ratio, the faster count
and the count ``default_threads`` gives the model (``<- default`` marks a default that is
not the faster count here).

Models: the ``tiny`` preset as shipped (d_model 64, images 64-96 px, batch 4); ``tiny``
widened to d_model 128 and 256 (same images); the ``dino`` and ``paper`` presets
(ResNet-50, 900 queries) with the images resized to a shorter side of 256 px (longer
side at most 336), batch 2.  The load average is printed before and after: trust a run only when it was low.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from damex.testing import timing  # noqa: E402

WIDE = {"d_ffn": 512, "moe_hidden": 512, "n_heads": 8, "backbone_widths": [32, 64, 128, 256],
        "stem_width": 32}
SMALL = {"min_size": 64, "max_size": 96, "batch_size": 4}     # the tiny preset's images
R50 = {"min_size": 256, "max_size": 336, "batch_size": 2}     # enough tokens for 900 queries
MODELS = {   # name -> (model section, data sizes and batch)
    "tiny": ({"preset": "tiny"}, SMALL),
    "tiny d128": ({"preset": "tiny", "d_model": 128, **WIDE}, SMALL),
    "tiny d256": ({"preset": "tiny", "d_model": 256, **WIDE, "d_ffn": 1024, "moe_hidden": 1024}, SMALL),
    "dino": ({"preset": "dino"}, R50),
    "paper": ({"preset": "paper"}, R50),
}


def run_config(name, threads, data_root):
    from damex.engine.config import run_config_from_dict
    model, data = MODELS[name]
    return run_config_from_dict({
        "model": model,
        "data": {"synthetic": {"root": data_root, "preset": "tiny", "seed": 0}, "sampler": "uniform", **data},
        "train": {"steps": 10 ** 6, "out_dir": os.path.join(tempfile.gettempdir(), "damex-bench-threads"),
                  "checkpoint_every": 0, "threads": threads, "seed": 0}})


def child(name, threads, steps, data_root):
    """Time ``steps`` training steps of model ``name`` at ``threads``; print one JSON line."""
    from damex.engine.train import Trainer
    trainer = Trainer(run_config(name, threads, data_root))
    for _ in range(2):
        trainer.train_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 2 steps per model and count")
    ap.add_argument("--rounds", type=int, default=None, help="alternations of the two counts (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per child (default 4)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "damex-synthetic-tiny"),
                    help="where the embedded synthetic mixture is written (reused if present)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (2 if args.quick else 4)
    if args.child:
        child(args.child[0], int(args.child[1]), steps, args.data)
        return
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"bench_threads: unknown model(s) {unknown}; expected some of {list(MODELS)}")
    from damex.engine.config import default_threads
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    print(f"load average {os.getloadavg()[0]:.2f}; {cores} cores; training steps, median s/step over "
          f"{rounds} round(s) x {steps} steps per count", flush=True)
    for name in names:
        times = {c: [] for c in counts}
        for _ in range(rounds):
            for c in counts:
                times[c] += timing.child_json(__file__, name, c, "--steps", steps, "--data", args.data,
                                              what=f"the {name} child at {c} threads")["times"]
        med = {c: statistics.median(v) for c, v in times.items()}
        faster = min(counts, key=med.get)
        default = default_threads(run_config(name, 0, args.data).model)
        cells = "  ".join(f"{c}t {med[c]:6.3f} s" for c in counts)
        ratio = med[1] / med[cores] if cores > 1 else 1.0
        mark = "" if default == faster else "  <- default"
        print(f"{name:<10s} {cells}  1t/{cores}t {ratio:4.2f}  faster: {faster}t  default: {default}t{mark}",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
