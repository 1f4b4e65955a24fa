"""The ``damex`` command line (``python -m damex`` works too).

    damex run [--config PATH] [--steps N] [--out DIR]   the main job: dense vs damex side by side
    damex study [CONFIG] [--modes dense,moe,damex] [--seeds N] [--steps N] [--jobs J] [--out DIR]
                [--subsample NAME=FRACTION ...] [--datasets A,B] [--set section.key=value ...]
    damex train [CONFIG] [--set KEY=VALUE ...] [--steps N] [--threads N] [--seed N] [--out DIR]
    damex train --resume CKPT [--steps N]               continue a run in its folder
    damex eval CHECKPOINT [--json PATH] [--dataset NAME=ANN.json:IMG_DIR ...] [--full]
    damex predict CHECKPOINT [IMAGE|FOLDER ...] [--dataset ...] [--json PATH] [--pictures DIR]
    damex demo [--mode damex|balance|both]              one MoE layer on a generated token mixture
    damex bench backbone|dino|moe|mpi|msda|nn|routing_loss|threads|train [...]  benchmarks from bench/
    damex convert SRC DST --from KIND                   other programs' weights -> .safetensors
"""
import argparse
import json
import os
import runpy
import sys


# the benchmarks in bench/ (bench_NAME.py); README and both helps list these
BENCHMARKS = ("backbone", "dino", "moe", "mpi", "msda", "nn", "routing_loss", "threads", "train")


def _cmd_run(args):
    import shutil

    from .engine.study import run_comparison
    from .engine.train import check_steps

    if args.steps is not None:
        check_steps(args.steps)          # before any data is written
    out = args.out or "runs/tiny"
    if args.overwrite:
        for mode in ("dense", "damex"):
            shutil.rmtree(os.path.join(out, mode), ignore_errors=True)
    run_comparison(args.config, steps=args.steps, out_dir=out)
    return 0


def _cmd_study(args):
    from .engine.study import parse_subsample, study

    study(args.config, modes=[m for m in args.modes.split(",") if m], seeds=args.seeds,
          steps=args.steps, jobs=args.jobs, out_dir=args.out,
          subsample=parse_subsample(args.subsample),
          datasets=[d for d in args.datasets.split(",") if d] if args.datasets else None,
          sets=args.set or [], n_boot=args.bootstrap, train=not args.summarize)
    return 0


def _train_overrides(args):
    """``--threads/--seed/--out`` as train-section values (resolved like the config's)."""
    over = {}
    if args.threads is not None:
        over["threads"] = args.threads
    if args.seed is not None:
        over["seed"] = args.seed
    if args.out is not None:
        over["out_dir"] = os.path.abspath(args.out)
    return over


def _resume_command(ckpt, steps):
    return f"damex train --resume {ckpt}" + (f" --steps {steps}" if steps else "")


def _cmd_train(args):
    """New run: config (+ base chain, --set, flags) checked, --steps checked, run folder
    claimed, then training.  Resume: the checkpoint's config, its folder continued."""
    from .engine import rundir
    from .engine.checkpoint import load_checkpoint
    from .engine.config import ConfigError, apply_overrides, finalize, load_run_config, run_config_from_dict
    from .engine.train import Trainer, check_steps

    over = _train_overrides(args)
    if args.steps is not None:
        check_steps(args.steps)      # a clear error before anything is read or written
        over["steps"] = args.steps
    if args.resume:
        if args.set:
            raise ConfigError("--set: not with --resume (the checkpoint's config is the run's); "
                              "use --steps/--threads/--seed/--out")
        _, meta = load_checkpoint(args.resume)
        if "config" not in meta:
            raise ValueError(f"{args.resume}: not a training checkpoint (no run config in it)")
        done = int(meta.get("step", 0))
        conf = apply_overrides(meta["config"], [f"train.{k}={json.dumps(v)}" for k, v in over.items()],
                               source="damex train")
        cfg = run_config_from_dict(conf, source=args.resume)   # checks the flags' values
        check_steps(cfg.train.steps, done)
        if "out_dir" in over and over["out_dir"] != os.path.abspath(meta["config"]["train"]["out_dir"]):
            rundir.claim(over["out_dir"], args.overwrite)   # a branch of the run in a new folder
        trainer = Trainer.from_checkpoint(args.resume, fresh_optimizer=args.fresh_optimizer, **over)
    else:
        sets = list(args.set or []) + [f"train.{k}={json.dumps(v)}" for k, v in over.items()]
        path = args.config
        if path is None:   # the shipped tiny config; as with `damex run`, data below the working directory
            from .engine.pipeline import default_config_path
            path, sets = default_config_path(), ["data.synthetic.root=data/synthetic"] + sets
        cfg = finalize(load_run_config(path, sets))
        check_steps(cfg.train.steps)
        from .engine.distributed import launched_rank
        main = launched_rank() in (None, 0)   # under mpiexec rank 0 alone claims (the others see its log)
        if main:
            rundir.claim(cfg.train.out_dir, args.overwrite, check_only=True)   # a used folder fails fast
        trainer = Trainer(cfg)            # data and model built, image sizes checked: nothing written
        if main:
            rundir.claim(cfg.train.out_dir, args.overwrite)
    fit = trainer.fit(progress=not args.no_progress, overwrite=args.overwrite)
    last = trainer.history[-1] if trainer.history else {}
    if trainer.is_main:
        print(f"step {trainer.step}: loss {last.get('loss', float('nan')):.4f}; "
              f"checkpoint {fit['checkpoint']}")
    return 0


def _parse_dataset(spec):
    """NAME=ANN.json:IMG_DIR"""
    try:
        name, rest = spec.split("=", 1)
        ann, img_dir = rest.rsplit(":", 1)
    except ValueError:
        raise ValueError(f"--dataset expects NAME=ANNOTATIONS.json:IMAGE_DIR, got {spec!r}") from None
    return name, ann, img_dir


def _check_out_file(path, flag):
    """Fail before any work when an output file's folder does not exist."""
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist")


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _cmd_eval(args):
    """Evaluate from the checkpoint alone: the model, label space and expert map come
    from it; data only for the datasets scored."""
    from .engine.evaluate import format_table
    from .engine.inference import evaluate_model
    from .engine.predict import Detector

    _check_out_file(args.json, "--json")
    specs = [_parse_dataset(s) for s in args.dataset or []]
    if args.pictures:
        os.makedirs(args.pictures, exist_ok=True)
    det = Detector.from_checkpoint(args.checkpoint, threads=args.threads)
    if specs:
        mixture = det.mixture(specs)
        assignment = det.assignment(mixture)
    else:
        from .data.config import build_mixture
        mixture = build_mixture(det.config.data, "val", label_space=det.label_space)
        assignment = det.dataset_to_expert
    from .engine.distributed import world
    w = world()   # under mpiexec: the images split over the ranks, rank 0 reports
    results, predictions = evaluate_model(det.model, mixture, batch_size=args.batch_size,
                                          progress=not args.no_progress, assignment=assignment, world=w)
    if w is not None and not w.is_main:
        return 0
    results.update(det.describe())
    print(format_table(results, full=args.full))
    if results["routing"]["accuracy"] is not None:
        print(f"routing accuracy without dataset labels: {results['routing']['accuracy']:.3f}")
    if args.json:
        _write_json(args.json, results)
    if args.pictures:
        from .engine.pipeline import write_pictures
        write_pictures(args.pictures, det, mixture, results, predictions)
    return 0


def _jsonable(p):
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in p.items()}


def _cmd_predict(args):
    """Detections on plain images, or COCO results on annotated datasets."""
    from .engine.predict import Detector, image_files

    _check_out_file(args.json, "--json")
    specs = [_parse_dataset(s) for s in args.dataset or []]
    files = image_files(args.images) if args.images else []
    if not files and not specs:
        raise ValueError("give images or folders to predict on, or --dataset NAME=ANN.json:IMG_DIR")
    if args.pictures:
        os.makedirs(args.pictures, exist_ok=True)
    det = Detector.from_checkpoint(args.checkpoint, threads=args.threads)
    out = {**det.describe(), "classes": det.class_names}
    if files:
        thr = 0.3 if args.score_threshold is None else args.score_threshold
        preds = det.predict(files, score_threshold=thr, batch_size=args.batch_size)
        out["images"] = [_jsonable(p) for p in preds]
        for p in preds:
            print(f"{p['file']}: {len(p['scores'])} detections "
                  f"({', '.join(sorted(set(p['names']))) or 'none'}); expert(s) {p['experts']} "
                  f"-> dataset {p['dataset']}")
        if args.pictures:
            from .engine.routing_analysis import draw_detections
            from .data.coco import read_image
            for k, p in enumerate(preds):
                name = os.path.splitext(os.path.basename(p["file"]))[0]
                draw_detections(read_image(p["file"]), p["boxes"], p["labels"], p["scores"],
                                det.class_names, os.path.join(args.pictures, f"{k:03d}_{name}.png"),
                                title=f"#{k} {os.path.basename(p['file'])}")
    if specs:
        thr = 0.0 if args.score_threshold is None else args.score_threshold
        mixture = det.mixture(specs)
        results, routes = det.predict_coco(mixture, batch_size=args.batch_size, score_threshold=thr,
                                           progress=not args.no_progress)
        out["datasets"] = {name: {"results": results[name],
                                  "routing": {str(i): r for i, r in routes[name].items()}}
                           for name in results}
        for name, res in results.items():
            print(f"{name}: {len(res)} detections on {len(routes[name])} images")
        if args.json and len(specs) == 1:   # one dataset: the file is pycocotools' loadRes format
            _write_json(args.json, results[specs[0][0]])
            base, ext = os.path.splitext(args.json)
            _write_json(base + ".routing" + (ext or ".json"), out["datasets"][specs[0][0]]["routing"])
            args.json = None
    if args.json:
        _write_json(args.json, out)
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


def _cmd_convert(args):
    from .convert import convert

    out = convert(args.src, args.dst, args.source, n_heads=args.n_heads)
    print(f"{args.src} ({args.source}) -> {out['dst']}: {out['arrays']} arrays, "
          f"{out['parameters']:,} values")
    return 0


def build_parser():
    from .engine.study import MODES
    p = argparse.ArgumentParser(prog="damex", description="DAMEX: dataset-aware mixture of experts",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the main job: train dense and damex side by side on the embedded "
                                   "mixture, evaluate, compare, pictures")
    r.add_argument("--config", help="a run config (default: the shipped tiny_damex.json); "
                                    "its model.routing is replaced by dense and damex")
    r.add_argument("--steps", type=int)
    r.add_argument("--out", help="output folder: OUT/dense and OUT/damex (default: runs/tiny)")
    r.add_argument("--overwrite", action="store_true",
                   help="retrain: remove finished runs in the folder (else they are reused)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("study", help="modes x seeds at one budget, in parallel and resumable: "
                                     "study.json, study.md, plots")
    s.add_argument("config", nargs="?", help="run config (default: the shipped tiny_damex.json)")
    s.add_argument("--modes", default="dense,moe,damex",
                   help="comma-separated: " + ", ".join(MODES))
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--steps", type=int, help="training steps of every run (default: the config's)")
    s.add_argument("--jobs", type=int, help="parallel runs (default: one per core, one thread each)")
    s.add_argument("--out", default="runs/study")
    s.add_argument("--subsample", action="append", metavar="NAME=FRACTION",
                   help="train on this fraction of NAME's training images (chosen by the seed)")
    s.add_argument("--datasets", help="comma-separated subset of the mixture's datasets")
    s.add_argument("--set", action="append", metavar="section.key=value",
                   help="override a config key (value as JSON), e.g. model.num_experts=3")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples of the intervals")
    s.add_argument("--summarize", action="store_true",
                   help="train nothing: summarise the runs finished so far")
    s.set_defaults(func=_cmd_study)

    t = sub.add_parser("train", help="train a detector from a JSON config, or resume a checkpoint")
    t.add_argument("config", nargs="?", help="run config (JSON; default: the shipped tiny_damex.json "
                                             "with its data below the working directory)")
    t.add_argument("--resume", metavar="CKPT", help="checkpoint to continue from (its run folder)")
    t.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.lr=1e-4 model.num_experts=8 "
                        "(values parsed as JSON, else strings)")
    t.add_argument("--steps", type=int, help="train until this step")
    t.add_argument("--threads", type=int, help="threads (default: the config's, else the measured "
                                               "default for the model)")
    t.add_argument("--seed", type=int, help="the run's seed (train.seed)")
    t.add_argument("--out", metavar="DIR", help="run folder (train.out_dir)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in the folder")
    t.add_argument("--fresh-optimizer", action="store_true",
                   help="with --resume: restart the optimizer state (AdamW moments) from zero")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: COCO metrics per dataset, routing")
    e.add_argument("checkpoint")
    e.add_argument("--json", help="write the results here (full metrics, checkpoint, step, config hash)")
    e.add_argument("--dataset", action="append", metavar="NAME=ANN.json:IMG_DIR",
                   help="evaluate on these COCO datasets instead of the run's validation split "
                        "(needs no training data)")
    e.add_argument("--full", action="store_true", help="table with APs/APm/APl and AR1/10/100")
    e.add_argument("--pictures", help="write routing heatmaps and detections to this folder")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--threads", type=int)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)

    q = sub.add_parser("predict", help="detections on images or folders, or COCO results on a dataset")
    q.add_argument("checkpoint")
    q.add_argument("images", nargs="*", metavar="IMAGE|FOLDER")
    q.add_argument("--dataset", action="append", metavar="NAME=ANN.json:IMG_DIR",
                   help="COCO results in this annotation file's ids (pycocotools loadRes format)")
    q.add_argument("--json", help="write the detections here (with one --dataset: the COCO results "
                                  "list, and the per-image routing next to it: x.json -> x.routing.json)")
    q.add_argument("--pictures", metavar="DIR", help="draw the detections on the images here")
    q.add_argument("--score-threshold", type=float,
                   help="drop detections below (default 0.3 on images, 0 for COCO results)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--threads", type=int)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cmd_predict)

    d = sub.add_parser("demo", help="train one MoE layer on a generated mixture of token datasets")
    d.add_argument("--mode", choices=["damex", "balance", "both"], default="both")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark from bench/")
    b.add_argument("what", choices=BENCHMARKS, metavar="|".join(BENCHMARKS),
                   help="which benchmark: " + ", ".join(BENCHMARKS))
    b.add_argument("--bench-dir", default="bench")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=_cmd_bench)

    from .convert import CONVERTERS
    c = sub.add_parser("convert", help="convert torchvision / DINO / DAMEX weights to damex .safetensors")
    c.add_argument("src", help="the weights file (.pth, .pt, .safetensors, .npz)")
    c.add_argument("dst", help="the output .safetensors file")
    c.add_argument("--from", dest="source", required=True, choices=sorted(CONVERTERS),
                   help="what the source file is")
    c.add_argument("--n-heads", type=int, help="attention heads, for --from dino / damex-official "
                                               "(not in the shapes; default 8, as both references)")
    c.set_defaults(func=_cmd_convert)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.config and args.resume:
        build_parser().error("train: give a CONFIG or --resume CHECKPOINT, not both")
    from .engine.train import TrainingInterrupted

    func = args.func
    from .engine.distributed import guard_ranks, launched_size, supervise
    if launched_size() > 1 and args.command not in ("train", "eval", "study"):
        print(f"damex {args.command}: error: only `damex train`, `eval` and `study` run on several MPI ranks "
              f"(launched with {launched_size()}); run it in one process", file=sys.stderr)
        return 2
    if args.command in ("train", "eval", "study"):   # under mpiexec: a failing rank ends the job
        supervise()               # and a rank killed by a signal is named
        func = guard_ranks(func)
    try:
        return func(args)
    except TrainingInterrupted as e:   # Ctrl-C in training: a checkpoint was written
        print(f"\ndamex {args.command}: interrupted at step {e.step}; checkpoint {e.checkpoint}\n"
              f"resume with:\n  {_resume_command(e.checkpoint, e.steps)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ndamex {args.command}: interrupted", file=sys.stderr)
        if args.command in ("run", "study"):   # each unfinished run wrote its checkpoint
            import shlex
            again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
            print("finished runs and the checkpoints of the others are kept; continue with:\n  "
                  + " ".join(["damex"] + [shlex.quote(str(a)) for a in again]), file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"damex {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
