"""The main job: generate the embedded mixture, train the tiny DAMEX model,
evaluate per dataset, print the table and write the pictures."""
import json
import os

import numpy as np
from importlib import resources

from ..data.config import build_mixture
from .config import load_run_config
from .inference import evaluate_model
from .train import Trainer


def default_config_path(name="tiny_damex"):
    """Path of a configuration shipped with damex (``damex/configs/NAME.json``)."""
    return str(resources.files("damex") / "configs" / f"{name}.json")


def write_pictures(out_dir, trainer, mixture, results, predictions, num_images=4):
    """Routing heatmaps (one per MoE layer), training curves (when ``trainer`` has a
    history; a :class:`~damex.engine.predict.Detector` has none) and sample detections as PNG."""
    from .routing_analysis import draw_detections, plot_routing_heatmap

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    names = [ds.name for ds in mixture.datasets]
    for layer in results["routing"]["layers"]:
        p = os.path.join(out_dir, f"routing_{layer['name']}.png")
        acc = "" if layer["accuracy"] is None else f": routing accuracy {layer['accuracy']:.2f}"
        plot_routing_heatmap(layer["matrix"], names, p, title=f"{layer['name']}{acc}")
        paths.append(p)
    if getattr(trainer, "history", None):
        from .curves import plot_run_curves
        p = os.path.join(out_dir, "training_curves.png")
        plot_run_curves(trainer.history, p)
        paths.append(p)
    from ..data.coco import read_image

    label_names = mixture.label_space.names
    for ds in mixture.datasets:
        for idx in range(min(num_images, len(ds))):
            info = ds.images[idx]
            det = predictions[ds.name].get(info["id"])
            if det is None:
                continue
            keep = det["scores"] >= 0.3
            gt = [a["bbox"] for a in ds.coco["annotations"] if a["image_id"] == info["id"]]
            p = os.path.join(out_dir, f"detections_{ds.name}_{idx}.png")
            draw_detections(read_image(ds.image_path(info)), det["boxes"][keep], det["labels"][keep],
                            det["scores"][keep], label_names, p, gt_boxes=np.array(gt).reshape(-1, 4),
                            title=f"{ds.name} #{idx} (image id {info['id']})")
            paths.append(p)
    return paths


def run(config_path=None, *, steps=None, out_dir=None, progress=True, log=print, overwrite=False):
    """Train and evaluate; returns the evaluation results (the ``--json`` dict)."""
    from .evaluate import format_table

    cfg = load_run_config(config_path or default_config_path())
    if config_path is None:  # the shipped config: data and runs go below the working directory
        cfg.data.synthetic.root = os.path.abspath("data/synthetic")
    if steps is not None:
        cfg.train.steps = steps
    if out_dir is not None:
        cfg.train.out_dir = out_dir
    from .config import finalize
    from .rundir import claim
    claim(finalize(cfg).train.out_dir, overwrite)   # refuse an existing run before any work
    trainer = Trainer(cfg)
    log(f"training {cfg.model_preset} ({cfg.model.routing}) on {len(trainer.train_set.datasets)} "
        f"datasets, {sum(trainer.train_set.sizes)} images, {cfg.train.steps} steps")
    fit = trainer.fit(progress=progress, log=log, overwrite=overwrite)
    val = build_mixture(cfg.data, "val", label_space=trainer.label_space)
    results, predictions = evaluate_model(trainer.model, val, progress=progress)
    log(format_table(results))
    if results["routing"]["accuracy"] is not None:
        log(f"routing accuracy without dataset labels: {results['routing']['accuracy']:.3f}")
    results["train_seconds"] = fit["seconds"]
    with open(os.path.join(cfg.train.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    paths = write_pictures(os.path.join(cfg.train.out_dir, "pictures"), trainer, val, results, predictions)
    log(f"checkpoint {fit['checkpoint']}; results.json and {len(paths)} pictures in {cfg.train.out_dir}")
    return results
