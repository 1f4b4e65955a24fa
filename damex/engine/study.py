"""``damex study``: dense vs moe vs damex over seeds, at one budget, with intervals.

A study trains every (mode, seed) pair of one configuration and evaluates it on the
validation split of every dataset:

* **the same config and budget for every mode** - only the routing (and, for the
  ``*_dropless`` and ``damex_composition`` variants, the training-time capacity) differs;
* **a seed changes everything random alike for all modes**: ``model.seed`` (init),
  ``train.seed`` (data order, denoising and gate noise) and ``data.seed`` (flips);
  seed ``s`` of dense and seed ``s`` of damex see the same batches;
* **parallel**: J worker processes (``python -m damex.engine.study worker RUN_DIR``),
  one thread each (default J = the number of cores);
* **resumable**: a run is done when its ``result.json`` exists (written atomically,
  last); a killed study restarts the unfinished runs, each from its last checkpoint;
* **outputs** in ``--out``: ``study.json`` (the shape below), ``study.md`` (the paper
  table), ``ap_per_dataset.png`` (AP per dataset per mode, error bars = std over
  seeds) and ``routing_MODE.png`` (the dataset x expert heatmap of the last MoE
  layer, averaged over seeds), plus ``runs/MODE-sSEED/`` per run.

``study.json``::

    {"runs": [{"mode", "seed", "mean_ap", "datasets": {NAME: {"ap", "ap50", "ap75"}},
               "routing": {"accuracy", "purity", "layers": [{"name", "accuracy", "purity",
                           "load", "dropped_fraction", "train_dropped_fraction", "matrix"}]}}],
     "summary": {MODE: {"mean_ap": {"mean", "std", "n"}, "datasets": {NAME: {"mean", "std"}}}},
     "deltas": {"damex-dense": {"mean", "ci95": [lo, hi]}, "damex-moe": ..., "moe-dense": ...},
     "protocol": {...}}

AP are fractions. ``std`` is the sample standard deviation over seeds (ddof 1).

**The interval** (:func:`paired_bootstrap`) is a paired bootstrap over seeds *and*
images: one bootstrap sample draws seeds with replacement (the same seeds for both
modes of a delta) and, for every dataset, its validation images with replacement
(the same images for every run); each run's AP on each dataset is then recomputed
by pycocotools on the resampled images (``COCOeval.evaluate`` once per run and
dataset, ``COCOeval.accumulate`` on the resampled per-image evaluations), the mean
AP over datasets and seeds formed per mode, and the delta taken. ``ci95`` is the
2.5 and 97.5 percentiles of the bootstrap deltas; ``mean`` the delta of the study
itself.

The UODB axes are options: ``--subsample NAME=FRACTION`` (that share of NAME's
training images, chosen by the seed), ``--datasets A,B`` (a subset of the mixture),
``--set data.merge_labels_by_name=false`` (disjoint label sets),
``--set model.num_experts=3`` and ``--set model.dataset_to_expert=[0,1,2,0]``
(a many-to-one map).
"""
import copy
import json
import os
import subprocess
import sys
import time
import zlib

import numpy as np

from .config import load_run_config, run_config_from_dict

#: mode name -> model overrides; ``*_dropless`` train without capacity (no token dropped),
#: ``damex_composition`` sizes the training capacity by the batch's dataset composition
MODES = {
    "dense": {"routing": "dense"},
    "moe": {"routing": "moe"},
    "damex": {"routing": "damex"},
    "moe_dropless": {"routing": "moe", "capacity_factor": None},
    "damex_dropless": {"routing": "damex", "capacity_factor": None},
    "damex_composition": {"routing": "damex", "capacity_sizing": "composition"},
}
#: the deltas reported when both modes are in the study
DELTAS = [("damex", "dense"), ("damex", "moe"), ("moe", "dense"),
          ("damex_dropless", "dense"), ("damex_dropless", "damex"),
          ("damex_composition", "dense"), ("damex_composition", "damex")]


# ------------------------------------------------------------------ small helpers

def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def apply_set(conf, items):
    """A copy of the config dict with ``["section.key=value", ...]`` applied: the same
    ``--set`` as ``damex train`` (:func:`damex.engine.config.apply_overrides`)."""
    from .config import apply_overrides

    return apply_overrides(conf, items)


def parse_subsample(items):
    """``["NAME=FRACTION", ...]`` -> ``{NAME: fraction}`` with 0 < fraction <= 1."""
    out = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        try:
            frac = float(raw)
        except ValueError:
            frac = None
        if not sep or not name or frac is None or not 0 < frac <= 1:
            raise ValueError(f"--subsample expects NAME=FRACTION with 0 < FRACTION <= 1, got {item!r}")
        out[name] = frac
    return out


def subsample_coco(coco, fraction, seed, name):
    """The COCO dict with ``round(fraction * n)`` of its images (at least 1), chosen by
    ``(seed, name)``, and their annotations."""
    images = sorted(coco["images"], key=lambda im: im["id"])
    n = max(1, int(round(fraction * len(images))))
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    keep = {images[i]["id"] for i in rng.choice(len(images), size=n, replace=False)}
    out = dict(coco)
    out["images"] = [im for im in images if im["id"] in keep]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return out


# ------------------------------------------------------------------ planning

def base_config(config_path=None, sets=(), data_root=None):
    """The study's config dict: the file (default: the shipped tiny config) with ``--set``
    applied, paths absolute.  ``data_root`` places a synthetic mixture of the shipped
    config (which otherwise would live inside the installed package)."""
    from .pipeline import default_config_path

    cfg = load_run_config(config_path or default_config_path())
    if config_path is None and data_root is not None:
        cfg.data.synthetic.root = os.path.abspath(data_root)
    conf = apply_set(json.loads(json.dumps(cfg.to_dict())), sets)
    run_config_from_dict(copy.deepcopy(conf), source="study config")  # fail early on bad --set
    return conf


def explicit_datasets(conf, names=None):
    """The data section's datasets as an explicit list (writing the synthetic mixture if
    the config uses it), restricted to ``names`` in that order when given."""
    data = conf["data"]
    if data.get("datasets"):
        sets = [dict(d) for d in data["datasets"]]
    else:
        from ..data.synthetic import make_mixture
        s = data.get("synthetic", {})
        desc = make_mixture(s.get("root", "data/synthetic"), seed=s.get("seed", 0),
                            preset=s.get("preset", "default"))
        sets = [{"name": d["name"], "train": d["train"], "val": d["val"], "img_dir": d["img_dir"]}
                for d in desc["datasets"]]
    if names:
        known = [d["name"] for d in sets]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--datasets: unknown datasets {unknown}; the mixture has {known}")
        sets = [next(d for d in sets if d["name"] == n) for n in names]
    return sets


def plan_runs(conf, out_dir, modes, seeds, steps=None, subsample=None, datasets=None,
              run_name="runs/{mode}-s{seed}"):
    """Write ``OUT/runs/MODE-sSEED/config.json`` for every run (kept if already there) and
    return ``[(mode, seed, run_dir)]`` in seed-major order."""
    subsample = subsample or {}
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r}; known modes: {sorted(MODES)}")
    sets = explicit_datasets(conf, datasets)
    unknown = sorted(set(subsample) - {d["name"] for d in sets})
    if unknown:
        raise ValueError(f"--subsample: unknown datasets {unknown}")
    plan = []
    for seed in range(seeds):
        seed_sets = []
        for d in sets:
            d = dict(d)
            if d["name"] in subsample:
                with open(d["train"], encoding="utf-8") as f:
                    coco = json.load(f)
                sub_dir = os.path.join(out_dir, "data", f"seed{seed}")
                os.makedirs(sub_dir, exist_ok=True)
                path = os.path.join(sub_dir, f"{d['name']}_train.json")
                if not os.path.exists(path):
                    _write_json_atomic(path, subsample_coco(coco, subsample[d["name"]], seed, d["name"]))
                d["val_img_dir"] = d.get("val_img_dir") or d["img_dir"]
                d["train"] = path
            seed_sets.append(d)
        for mode in modes:
            run_dir = os.path.join(out_dir, *run_name.format(mode=mode, seed=seed).split("/"))
            rc = copy.deepcopy(conf)
            rc["model"].update(MODES[mode])
            rc["model"]["seed"] = seed
            rc["data"]["datasets"] = seed_sets
            rc["data"]["seed"] = seed
            rc["train"].update(seed=seed, out_dir=run_dir, threads=1)
            if steps is not None:  # a shorter (longer) budget keeps the schedule's shape
                full = rc["train"]["steps"]
                rc["train"]["lr_drop"] = [int(round(s * steps / full)) for s in rc["train"].get("lr_drop", [])]
                rc["train"]["steps"] = int(steps)
            run_config_from_dict(copy.deepcopy(rc), source=f"{run_dir}/config.json")
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "config.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    if json.load(f) != json.loads(json.dumps(rc)):
                        raise ValueError(f"{path}: this run was planned with another config; "
                                         "use another --out or remove the folder")
            else:
                _write_json_atomic(path, rc)
            plan.append((mode, seed, run_dir))
    return plan


# ------------------------------------------------------------------ one run (worker process)

def run_one(run_dir, pictures=False, progress=False, log=print):
    """Train (or resume) and evaluate the run in ``run_dir``; write ``predictions.json``
    (pycocotools results per dataset) and, last, ``result.json``.  Returns the result."""
    from ..data.config import build_mixture
    from .evaluate import coco_results
    from .inference import evaluate_model
    from .train import Trainer

    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    ckpt = os.path.join(run_dir, "checkpoint.npz")
    if os.path.exists(ckpt):
        trainer = Trainer.from_checkpoint(ckpt)
        # the log of steps after the checkpoint is rewritten by the resumed run
        _truncate_log(os.path.join(run_dir, "log.jsonl"), trainer.step)
    else:
        trainer = Trainer(run_config_from_dict(copy.deepcopy(conf), source=run_dir))
    t0 = time.perf_counter()
    # a run folder of the study's own: without a checkpoint, what a killed worker left goes
    fit = trainer.fit(progress=progress, log=log, overwrite=not os.path.exists(ckpt))
    val = build_mixture(trainer.cfg.data, "val", label_space=trainer.label_space)
    results, predictions = evaluate_model(trainer.model, val, progress=progress)
    results["train_seconds"] = time.perf_counter() - t0
    results["train_dropped_fraction"] = _train_dropped(trainer.history)
    coco = {ds.name: coco_results(ds, predictions.get(ds.name)) for ds in val.datasets}
    _write_json_atomic(os.path.join(run_dir, "predictions.json"),
                       {"datasets": {ds.name: {"ann_file": ds.ann_file, "results": coco[ds.name]}
                                     for ds in val.datasets}})
    if pictures:
        from .pipeline import write_pictures
        results["pictures"] = os.path.join(run_dir, "pictures")
        write_pictures(results["pictures"], trainer, val, results, predictions)
    results["checkpoint"] = fit["checkpoint"]
    _write_json_atomic(result_path, results)
    return results


def _truncate_log(path, step):
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _train_dropped(history, tail=0.2):
    """Mean over the last ``tail`` of training of each logged ``*dropped*`` series, or {}."""
    rows = history[-max(1, int(len(history) * tail)):] if history else []
    keys = sorted({k for r in rows for k, v in r.items() if k.startswith("dropped_fraction/")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


# ------------------------------------------------------------------ scheduling

def _last_step(run_dir):
    try:
        with open(os.path.join(run_dir, "log.jsonl"), "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            return json.loads(f.read().splitlines()[-1]).get("step", 0)
    except (OSError, ValueError, IndexError):
        return 0


INTERRUPTED = 130   # a worker's exit status after Ctrl-C (its checkpoint written)


def _stop_workers(running, grace=20.0):
    """Ctrl-C: the workers (same process group) got the SIGINT too and finish their step
    and checkpoint; wait for them.  One still running after ``grace`` seconds (only this
    process was signalled) gets one SIGINT of its own, then, after ``grace`` more, SIGTERM."""
    import signal

    for action in (None, lambda p: p.send_signal(signal.SIGINT), lambda p: p.terminate()):
        deadline = time.monotonic() + grace
        for proc, *_ in running:
            if proc.poll() is None and action is not None:
                action(proc)
        for proc, *_ in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(proc.poll() is not None for proc, *_ in running):
            return


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_all`: the interrupted runs wrote their checkpoints."""


def run_all(plan, jobs=None, log=print, pictures=False, progress_every=60.0):
    """Run the unfinished runs of ``plan``, ``jobs`` worker processes at a time, one
    thread each.  Finished runs (``result.json`` present) are skipped.  Every
    ``progress_every`` seconds the running runs' steps are logged.  Ctrl-C stops the
    workers after their current step, with a checkpoint each (StudyInterrupted): the
    same call again continues them."""
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    todo = [p for p in plan if not os.path.exists(os.path.join(p[2], "result.json"))]
    if len(todo) < len(plan):
        log(f"study: {len(plan) - len(todo)} of {len(plan)} runs already finished, skipped")
    from .distributed import plain_env

    # one process per run: not ranks of the study's MPI job, if it has one
    env = dict(plain_env(os.environ), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    running, failed, interrupted = [], [], []
    t0 = last = time.perf_counter()
    try:
        while (todo and not interrupted) or running:
            while todo and len(running) < jobs and not interrupted:
                mode, seed, run_dir = todo.pop(0)
                err = open(os.path.join(run_dir, "worker.log"), "ab")
                cmd = [sys.executable, "-m", "damex.engine.study", "worker", run_dir]
                if pictures:
                    cmd.append("--pictures")
                proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env)
                running.append((proc, err, mode, seed, run_dir))
                log(f"study: started {mode} seed {seed} (pid {proc.pid})")
            time.sleep(0.5)
            if progress_every and time.perf_counter() - last > progress_every:
                last = time.perf_counter()
                log("study: " + ", ".join(f"{m} seed {s} at step {_last_step(d)}"
                                          for _, _, m, s, d in running)
                    + f" ({last - t0:.0f} s)")
            for item in list(running):
                proc, err, mode, seed, run_dir = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                err.close()
                if proc.returncode == INTERRUPTED:
                    interrupted.append((mode, seed, run_dir))
                    log(f"study: {mode} seed {seed} interrupted at step {_last_step(run_dir)} "
                        "(checkpoint written)")
                    continue
                if proc.returncode == 0 and os.path.exists(os.path.join(run_dir, "result.json")):
                    with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
                        r = json.load(f)
                    log(f"study: finished {mode} seed {seed}: mean AP {100 * r['mean_ap']:.1f} "
                        f"({time.perf_counter() - t0:.0f} s)")
                else:
                    failed.append((mode, seed, run_dir))
                    log(f"study: {mode} seed {seed} FAILED (exit {proc.returncode}); "
                        f"see {run_dir}/worker.log")
    except KeyboardInterrupt:
        try:
            _stop_workers(running)
        finally:
            for proc, err, mode, seed, run_dir in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                err.close()
                log(f"study: {mode} seed {seed} stopped at step {_last_step(run_dir)}")
        raise StudyInterrupted from None
    except BaseException:
        for proc, err, *_ in running:  # an error here: stop our own workers
            proc.terminate()
            proc.wait()
            err.close()
        raise
    if interrupted:   # the workers got a Ctrl-C this process did not see (e.g. run in the background)
        raise StudyInterrupted
    if failed:
        raise RuntimeError(f"study: {len(failed)} runs failed: "
                           + ", ".join(f"{m} seed {s} ({d}/worker.log)" for m, s, d in failed))


# ------------------------------------------------------------------ the bootstrap

class ImageAP:
    """AP of one run on one dataset, recomputable on a resampled set of its images.

    ``COCOeval.evaluate`` runs once (area "all", 100 detections: the setting of the
    headline AP); :meth:`ap` re-runs ``COCOeval.accumulate`` on the per-image
    evaluations of the image indices given (with repeats).
    """

    def __init__(self, gt_dict, results):
        import contextlib
        import io
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self.image_ids = sorted(im["id"] for im in gt_dict["images"])
        self.ev = None
        if not results or not gt_dict.get("annotations"):
            return
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {k: gt_dict[k] for k in ("images", "annotations", "categories")}
            gt.createIndex()
            dt = gt.loadRes([dict(r) for r in results])
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = self.image_ids
            ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
            ev.params.maxDets = [100]
            ev.evaluate()
        self.ev = ev
        self._evals = list(ev.evalImgs)
        self._params = copy.deepcopy(ev.params)
        self._K = len(ev.params.catIds)

    def ap(self, index=None):
        """AP (fraction) on the images ``index`` (positions in ``image_ids``; None = all)."""
        import contextlib
        import io

        if self.ev is None:
            return 0.0
        I0 = len(self.image_ids)
        index = np.arange(I0) if index is None else np.asarray(index)
        ev = self.ev
        ev.evalImgs = [self._evals[k * I0 + i] for k in range(self._K) for i in index]
        p = copy.copy(self._params)
        p.imgIds = list(range(len(index)))
        ev._paramsEval = p
        with contextlib.redirect_stdout(io.StringIO()):
            ev.accumulate(p)
        prec = ev.eval["precision"][:, :, :, 0, 0]
        prec = prec[prec > -1]
        return float(prec.mean()) if prec.size else 0.0


def paired_bootstrap(ap, modes, seeds, image_counts, pairs, n_boot=1000, seed=0):
    """Paired bootstrap of mean-AP deltas over seeds and images.

    Parameters
    ----------
    ap : callable ``(mode, seed, dataset_index, image_index or None) -> float``
        The AP of a run on one dataset, on the resampled images (None = all).
    modes : sequence of str
    seeds : sequence of int
        Seeds present for every mode.
    image_counts : sequence of int [D]
        Number of validation images of each dataset.
    pairs : sequence of (mode_a, mode_b)
    n_boot : int
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict ``{"a-b": {"mean", "ci95": [lo, hi], "n_boot"}}``: ``mean`` the delta on the
    study itself, the interval the 2.5 / 97.5 percentiles of the bootstrap deltas.
    """
    seeds = list(seeds)
    D = len(image_counts)

    def mean_ap(mode, seed_draw, img_draw):
        return float(np.mean([np.mean([ap(mode, s, d, None if img_draw is None else img_draw[d])
                                       for d in range(D)]) for s in seed_draw]))

    rng = np.random.default_rng(seed)
    boots = {f"{a}-{b}": [] for a, b in pairs}
    for _ in range(n_boot):
        s_draw = [seeds[i] for i in rng.integers(len(seeds), size=len(seeds))]
        i_draw = [rng.integers(n, size=n) for n in image_counts]
        per_mode = {}
        for a, b in pairs:
            for m in (a, b):
                if m not in per_mode:
                    per_mode[m] = mean_ap(m, s_draw, i_draw)
            boots[f"{a}-{b}"].append(per_mode[a] - per_mode[b])
    out = {}
    for a, b in pairs:
        v = np.asarray(boots[f"{a}-{b}"])
        out[f"{a}-{b}"] = {"mean": mean_ap(a, seeds, None) - mean_ap(b, seeds, None),
                           "ci95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                           if len(v) else [float("nan")] * 2, "n_boot": int(n_boot)}
    return out


# ------------------------------------------------------------------ summary

def many_to_one_purity(matrix):
    """Routing purity of a row-normalised ``[D, E]`` matrix when each expert may host up
    to ``ceil(D / E)`` datasets (h many-to-one), datasets weighted equally: the share of
    tokens on their dataset's expert under the best such map.  Equals
    :func:`damex.routing.routing_purity` (one-to-one) when D <= E."""
    from ..routing import routing_purity

    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    cap = -(-m.shape[0] // m.shape[1])
    # tiling repeats every row cap times in the total, so scale back (NaN without tokens)
    return routing_purity(np.tile(m, (1, cap))) * cap


def _run_record(mode, seed, run_dir):
    with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
        r = json.load(f)
    layers = []
    train_drop = r.get("train_dropped_fraction", {})
    for i, layer in enumerate(r["routing"]["layers"]):
        purity = many_to_one_purity(layer["matrix"])
        tdrop = [v for k, v in train_drop.items() if k == f"dropped_fraction/{layer['name']}"]
        layers.append({"name": layer["name"], "accuracy": layer["accuracy"], "purity": purity,
                       "load": layer["load"], "dropped_fraction": layer.get("dropped_fraction"),
                       "train_dropped_fraction": tdrop[0] if len(tdrop) == 1 else None,
                       "matrix": layer["matrix"]})
    routing = {"accuracy": r["routing"]["accuracy"],
               "purity": float(np.mean([x["purity"] for x in layers])) if layers else None,
               "train_dropped_fraction": train_drop, "layers": layers}
    return {"mode": mode, "seed": seed, "mean_ap": r["mean_ap"],
            "datasets": {k: {m: v[m] for m in ("ap", "ap50", "ap75")} for k, v in r["datasets"].items()},
            "routing": routing, "train_seconds": r.get("train_seconds")}


def _std(v):
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(plan, n_boot=1000, boot_seed=0):
    """The ``study.json`` dict of a finished plan."""
    runs = [_run_record(m, s, d) for m, s, d in plan]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    names = list(runs[0]["datasets"]) if runs else []
    summary = {}
    for m in modes:
        rs = [r for r in runs if r["mode"] == m]
        v = [r["mean_ap"] for r in rs]
        summary[m] = {"mean_ap": {"mean": float(np.mean(v)), "std": _std(v), "n": len(v)},
                      "datasets": {n: {"mean": float(np.mean([r["datasets"][n]["ap"] for r in rs])),
                                       "std": _std([r["datasets"][n]["ap"] for r in rs])}
                                   for n in names}}
        pur = [r["routing"]["purity"] for r in rs if r["routing"]["purity"] is not None]
        if pur:
            summary[m]["routing_purity"] = {"mean": float(np.mean(pur)), "std": _std(pur)}
            acc = [r["routing"]["accuracy"] for r in rs if r["routing"]["accuracy"] is not None]
            summary[m]["routing_accuracy"] = {"mean": float(np.mean(acc)), "std": _std(acc)}
    pairs = [(a, b) for a, b in DELTAS if a in summary and b in summary]
    deltas = {}
    if pairs:
        by_run = {(m, s): d for m, s, d in plan}
        evaluators, counts = {}, None
        for (m, s), d in by_run.items():
            with open(os.path.join(d, "predictions.json"), encoding="utf-8") as f:
                preds = json.load(f)["datasets"]
            evs = []
            for n in names:
                with open(preds[n]["ann_file"], encoding="utf-8") as f:
                    evs.append(ImageAP(json.load(f), preds[n]["results"]))
            evaluators[(m, s)] = evs
            counts = [len(e.image_ids) for e in evs]
        cache = {}

        def ap(mode, seed, d, index):
            if index is None:
                key = (mode, seed, d, None)
            else:
                key = (mode, seed, d, index.tobytes())
            if key not in cache:
                cache[key] = evaluators[(mode, seed)][d].ap(index)
            return cache[key]

        for a, b in pairs:  # each delta over the seeds both of its modes have
            seeds = sorted({r["seed"] for r in runs if r["mode"] == a}
                           & {r["seed"] for r in runs if r["mode"] == b})
            deltas.update(paired_bootstrap(ap, modes, seeds, counts, [(a, b)], n_boot=n_boot,
                                           seed=boot_seed))
    return {"runs": runs, "summary": summary, "deltas": deltas}


def format_markdown(study, title=None):
    """The paper-style table: datasets as columns, modes as rows, mean ± std (AP %)."""
    summary = study["summary"]
    if not summary:
        return "(no finished runs)\n"
    names = list(next(iter(summary.values()))["datasets"])
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| mode | " + " | ".join(names) + " | mean | n |")
    lines.append("|---" * (len(names) + 3) + "|")
    for m, s in summary.items():
        cells = [f"{100 * s['datasets'][n]['mean']:.1f} ± {100 * s['datasets'][n]['std']:.1f}" for n in names]
        mm = s["mean_ap"]
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | **{100 * mm['mean']:.1f} ± {100 * mm['std']:.1f}** | {mm['n']} |")
    if study["deltas"]:
        lines += ["", "| delta (mean AP) | mean | 95% interval |", "|---|---|---|"]
        for k, v in study["deltas"].items():
            lo, hi = v["ci95"]
            lines.append(f"| {k} | {100 * v['mean']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    rows = [(m, s) for m, s in summary.items() if "routing_purity" in s]
    if rows:
        lines += ["", "| routing (val, no dataset labels) | accuracy vs h | purity | dropped (eval) "
                  "| dropped (train) | expert load (last layer) |", "|---|---|---|---|---|---|"]
        for m, s in rows:
            rs = [r for r in study["runs"] if r["mode"] == m]
            drops = [x["dropped_fraction"] for r in rs for x in r["routing"]["layers"]
                     if x["dropped_fraction"] is not None]
            tdrops = [v for r in rs for v in r["routing"]["train_dropped_fraction"].values()]
            load = np.mean([r["routing"]["layers"][-1]["load"] for r in rs], axis=0)
            fmt = lambda v: f"{100 * np.mean(v):.1f} %" if v else "n/a"  # noqa: E731
            lines.append(f"| {m} | {s['routing_accuracy']['mean']:.3f} | "
                         f"{s['routing_purity']['mean']:.3f} | {fmt(drops)} | {fmt(tdrops)} | "
                         + " ".join(f"{x:.2f}" for x in load) + " |")
    return "\n".join(lines) + "\n"


def write_plots(study, out_dir):
    """``ap_per_dataset.png`` and ``routing_MODE.png`` (last MoE layer, mean over seeds)."""
    from .routing_analysis import _pyplot, _save_png, plot_routing_heatmap

    paths = []
    summary = study["summary"]
    if not summary:
        return paths
    names = list(next(iter(summary.values()))["datasets"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * (len(names) + 1), 3.2), dpi=120)
    try:
        width = 0.8 / len(summary)
        x = np.arange(len(names) + 1)
        for k, (m, s) in enumerate(summary.items()):
            mean = [s["datasets"][n]["mean"] for n in names] + [s["mean_ap"]["mean"]]
            std = [s["datasets"][n]["std"] for n in names] + [s["mean_ap"]["std"]]
            ax.bar(x + (k - (len(summary) - 1) / 2) * width, 100 * np.array(mean), width,
                   yerr=100 * np.array(std), capsize=2, label=f"{m} (n={s['mean_ap']['n']})")
        ax.set_xticks(x, names + ["mean"])
        ax.set_ylabel("AP (%)")
        ax.set_title("AP per dataset: mean ± std over seeds", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(_save_png(fig, os.path.join(out_dir, "ap_per_dataset.png")))
    finally:
        plt.close(fig)
    for m in summary:
        rs = [r for r in study["runs"] if r["mode"] == m and r["routing"]["layers"]]
        if not rs:
            continue
        mat = np.mean([r["routing"]["layers"][-1]["matrix"] for r in rs], axis=0)
        layer = rs[0]["routing"]["layers"][-1]["name"]
        p = os.path.join(out_dir, f"routing_{m}.png")
        plot_routing_heatmap(mat, names, p, title=f"{m}, {layer}: purity "
                             f"{summary[m]['routing_purity']['mean']:.2f} (mean of {len(rs)} seeds)")
        paths.append(p)
    return paths


# ------------------------------------------------------------------ the command

def study(config_path=None, *, modes=("dense", "moe", "damex"), seeds=3, steps=None, jobs=None,
          out_dir="runs/study", subsample=None, datasets=None, sets=(), n_boot=1000,
          train=True, log=print):
    """Plan, run (resumably) and summarise a study; returns the ``study.json`` dict.
    With ``train=False`` nothing is trained: the finished runs are summarised.

    Under ``mpiexec -n N`` (one rank per machine, ``out_dir`` on a shared file system)
    rank 0 plans, the runs are dealt out over the ranks (``jobs`` workers on each), and
    rank 0 summarises once all are done; the other ranks return None."""
    from .distributed import world

    w = world()
    out_dir = os.path.abspath(out_dir)
    if w is None or w.is_main:
        os.makedirs(out_dir, exist_ok=True)
        conf = base_config(config_path, sets, data_root=os.path.join(out_dir, "data", "synthetic"))
        plan = plan_runs(conf, out_dir, list(modes), int(seeds), steps, subsample, datasets)
        log(f"study: {len(modes)} modes x {seeds} seeds = {len(plan)} runs in {out_dir}")
    if w is not None:   # the plan of rank 0, and this rank's share of its runs
        plan = [tuple(p) for p in w.bcast_json(plan if w.is_main else None, "the study plan")]
        if train:
            failed = None
            try:
                run_all(plan[w.rank::w.size], jobs, log=log)
            except (RuntimeError, KeyboardInterrupt) as e:   # failed runs, or Ctrl-C (StudyInterrupted)
                failed = e
            if w.any(failed is not None):   # waits for every rank's runs
                raise failed or RuntimeError("study: runs failed on another rank (see its log)")
        if not w.is_main:
            return None
    elif train:
        run_all(plan, jobs, log=log)
    if not train:
        plan = [p for p in plan if os.path.exists(os.path.join(p[2], "result.json"))]
        log(f"study: summarising the {len(plan)} finished runs")
    log(f"study: bootstrap ({n_boot} samples over seeds and images)")
    result = summarise(plan, n_boot=n_boot)
    result["protocol"] = {"modes": list(dict.fromkeys(p[0] for p in plan)),
                          "seeds": sorted({p[1] for p in plan}),
                          "steps": run_config_from_dict(copy.deepcopy(conf)).train.steps
                          if steps is None else int(steps),
                          "subsample": subsample or {}, "datasets": datasets, "set": list(sets),
                          "bootstrap": f"paired over seeds and images, {n_boot} samples"}
    _write_json_atomic(os.path.join(out_dir, "study.json"), result)
    md = format_markdown(result, title=f"# damex study: {len(seeds_list(result))} seeds, "
                                       f"{result['protocol']['steps']} steps (AP %, mean ± std over seeds)")
    with open(os.path.join(out_dir, "study.md"), "w", encoding="utf-8") as f:
        f.write(md)
    paths = write_plots(result, out_dir)
    log(md)
    log(f"study: study.json, study.md and {len(paths)} plots in {out_dir}")
    return result


def seeds_list(result):
    return sorted({r["seed"] for r in result["runs"]})


def run_comparison(config_path=None, *, modes=("dense", "damex"), steps=None, out_dir=None,
                   jobs=2, log=print):
    """The main job: train every mode of ``modes`` at the same budget on the config's
    mixture, side by side (one process and thread each), print each table and the
    delta, and write the pictures.  Returns ``{mode: eval results}``."""
    from .evaluate import format_table

    out_dir = os.path.abspath(out_dir or "runs/tiny")
    conf = base_config(config_path, data_root="data/synthetic")
    plan = plan_runs(conf, out_dir, list(modes), 1, steps, run_name="{mode}")
    with open(os.path.join(plan[0][2], "config.json"), encoding="utf-8") as f:
        rc = json.load(f)
    n_img = 0
    for d in rc["data"]["datasets"]:
        with open(d["train"], encoding="utf-8") as f:
            n_img += len(json.load(f)["images"])
    log(f"training {' and '.join(modes)} side by side ({len(modes)} processes, one thread each): "
        f"{len(rc['data']['datasets'])} datasets, {n_img} images, {rc['train']['steps']} steps each")
    t0 = time.perf_counter()
    run_all(plan, jobs, log=log, pictures=True)
    results = {}
    for m, _, d in plan:
        with open(os.path.join(d, "result.json"), encoding="utf-8") as f:
            results[m] = json.load(f)
        log(f"\n== {m} ==")
        log(format_table(results[m]))
        acc = results[m]["routing"]["accuracy"]
        if acc is not None:
            log(f"routing accuracy without dataset labels: {acc:.3f}")
    if len(modes) >= 2:
        a, b = modes[-1], modes[0]
        log(f"\nAP (%)     {b:>7}  {a:>7}  {a} - {b}")
        for n in results[b]["datasets"]:
            x, y = results[b]["datasets"][n]["ap"], results[a]["datasets"][n]["ap"]
            log(f"{n:<10} {100 * x:7.1f}  {100 * y:7.1f}  {100 * (y - x):+7.1f}")
        x, y = results[b]["mean_ap"], results[a]["mean_ap"]
        log(f"{'mean':<10} {100 * x:7.1f}  {100 * y:7.1f}  {100 * (y - x):+7.1f}   (one seed: "
            "`damex study` gives seeds and intervals)")
    for m, _, d in plan:
        log(f"{m}: checkpoint, result.json and pictures in {d}")
    log(f"({time.perf_counter() - t0:.0f} s)")
    return results


def _worker_main(argv):
    import argparse
    p = argparse.ArgumentParser(prog="python -m damex.engine.study")
    p.add_argument("command", choices=["worker"])
    p.add_argument("run_dir")
    p.add_argument("--pictures", action="store_true")
    a = p.parse_args(argv)
    from .train import TrainingInterrupted
    try:
        run_one(a.run_dir, pictures=a.pictures)
    except TrainingInterrupted as e:   # Ctrl-C: the checkpoint is written; the study says how to go on
        print(f"interrupted at step {e.step}; checkpoint {e.checkpoint}", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
