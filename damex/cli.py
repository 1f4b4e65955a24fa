"""The ``damex`` command line (``python -m damex`` works too).

    damex run [--config PATH] [--steps N] [--out DIR]   the main job: data, train, eval, pictures
    damex train CONFIG [--resume CKPT] [--steps N]      train a detector from a JSON config
    damex eval CHECKPOINT [--json PATH] [--dataset NAME=ANN.json:IMG_DIR ...]
    damex demo [--mode damex|balance|both]              one MoE layer on a generated token mixture
    damex bench moe|nn|msda [...]                       benchmarks from bench/
"""
import argparse
import json
import os
import runpy
import sys


def _cmd_run(args):
    from .engine.pipeline import run

    run(args.config, steps=args.steps, out_dir=args.out, progress=not args.no_progress)
    return 0


def _cmd_train(args):
    from .engine.config import load_run_config
    from .engine.train import Trainer

    if args.resume:
        overrides = {"steps": args.steps} if args.steps else {}
        trainer = Trainer.from_checkpoint(args.resume, fresh_optimizer=args.fresh_optimizer,
                                          **overrides)
    else:
        cfg = load_run_config(args.config)
        if args.steps:
            cfg.train.steps = args.steps
        trainer = Trainer(cfg)
    fit = trainer.fit(progress=not args.no_progress)
    last = trainer.history[-1] if trainer.history else {}
    print(f"step {trainer.step}: loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoint {fit['checkpoint']}")
    return 0


def _parse_dataset(spec):
    """NAME=ANN.json:IMG_DIR"""
    try:
        name, rest = spec.split("=", 1)
        ann, img_dir = rest.rsplit(":", 1)
    except ValueError:
        raise SystemExit(f"damex eval: --dataset expects NAME=ANNOTATIONS.json:IMAGE_DIR, got {spec!r}")
    return name, ann, img_dir


def _cmd_eval(args):
    from .engine.evaluate import format_table
    from .engine.inference import evaluate_model
    from .engine.train import Trainer

    trainer = Trainer.from_checkpoint(args.checkpoint, fresh_optimizer=True)   # eval: the model only
    if args.dataset:
        from .data.coco import CocoDetection
        from .data.mixture import MixtureDataset
        from .data.transforms import default_transforms

        dc = trainer.cfg.data
        tf = default_transforms(False, dc.min_size, dc.max_size, 0.0, dc.normalize)
        sets = [CocoDetection(name, ann, img, transforms=tf)
                for name, ann, img in map(_parse_dataset, args.dataset)]
        mixture = MixtureDataset(sets, label_space=trainer.label_space.project(sets))
        # routing accuracy needs h(d): known for datasets named as in training
        trained = list(trainer.label_space.dataset_names)
        mapping = trainer.model.cfg.dataset_to_expert
        assignment = ([mapping[trained.index(ds.name)] for ds in sets]
                      if all(ds.name in trained for ds in sets) else None)
    else:
        from .data.config import build_mixture
        mixture = build_mixture(trainer.cfg.data, "val", label_space=trainer.label_space)
        assignment = trainer.model.cfg.dataset_to_expert
    results, predictions = evaluate_model(trainer.model, mixture, batch_size=args.batch_size,
                                          progress=not args.no_progress, assignment=assignment)
    print(format_table(results))
    if results["routing"]["accuracy"] is not None:
        print(f"routing accuracy without dataset labels: {results['routing']['accuracy']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    if args.pictures:
        from .engine.pipeline import write_pictures
        write_pictures(args.pictures, trainer, mixture, results, predictions)
    return 0


def _cmd_demo(args):
    from .engine.moe_demo import format_matrix, run_demo

    modes = ["damex", "balance"] if args.mode == "both" else [args.mode]
    for mode in modes:
        print(f"== MoE layer, {mode} routing loss: {args.steps} steps, 4 datasets -> 4 experts ==")
        res = run_demo(mode=mode, steps=args.steps, seed=args.seed,
                       log_every=max(args.steps // 6, 1))
        print("dataset x expert token fractions at inference (no dataset labels given):")
        print(format_matrix(res["dataset_expert"]))
        print(f"routing accuracy {res['accuracy']:.3f}   purity (any expert permutation) "
              f"{res['purity']:.3f}   held-out mse {res['mse']:.4f}   "
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
    p = argparse.ArgumentParser(prog="damex", description="DAMEX: dataset-aware mixture of experts",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the main job: generate data, train tiny DAMEX, evaluate, pictures")
    r.add_argument("--config", help="a run config (default: the shipped tiny_damex.json)")
    r.add_argument("--steps", type=int)
    r.add_argument("--out", help="output folder (default: the config's out_dir)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_run)

    t = sub.add_parser("train", help="train a detector from a JSON config")
    t.add_argument("config", nargs="?", help="run config (JSON)")
    t.add_argument("--resume", help="checkpoint to continue from")
    t.add_argument("--steps", type=int, help="train until this step")
    t.add_argument("--fresh-optimizer", action="store_true",
                   help="with --resume: restart the optimizer state (AdamW moments) from zero")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: COCO AP per dataset, routing")
    e.add_argument("checkpoint")
    e.add_argument("--json", help="write the results here")
    e.add_argument("--dataset", action="append", metavar="NAME=ANN.json:IMG_DIR",
                   help="evaluate on these COCO datasets instead of the run's validation split")
    e.add_argument("--pictures", help="write routing heatmaps and detections to this folder")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)

    d = sub.add_parser("demo", help="train one MoE layer on a generated mixture of token datasets")
    d.add_argument("--mode", choices=["damex", "balance", "both"], default="both")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark from bench/")
    b.add_argument("what", help="which benchmark: moe, nn, msda, train")
    b.add_argument("--bench-dir", default="bench")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "train" and not (args.config or args.resume):
        build_parser().error("train: give a CONFIG or --resume CHECKPOINT")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"damex {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
