"""Inference over the validation images of a mixture: detections, COCO AP per
dataset, and routing statistics of every MoE layer.

The model runs in eval mode and never sees a dataset label: the router decides
the expert path.  The images' dataset ids are used only afterwards, to score
each dataset in its own label set (the evaluator maps joint labels back to the
dataset's categories and drops classes it does not annotate) and to fill the
dataset x expert routing matrices.
"""
import numpy as np

from ..autograd import no_grad
from ..data.mixture import collate
from ..models.postprocess import postprocess
from .evaluate import boxes_to_xywh, evaluate_detections
from .routing_analysis import analyse_routing


def predict(model, mixture, *, batch_size=8, num_select=100, progress=True, on_batch=None):
    """Detections for every image of ``mixture`` and the routing records.

    ``on_batch(dataset, targets, outputs)``, if given, sees every batch's raw outputs.

    Returns
    -------
    predictions : dict ``{dataset name: {image_id: {"boxes" xywh, "scores", "labels"}}}``
    records : dict ``{layer name: {"dataset_ids": [arrays], "experts": [arrays], "kept": int,
        "routed": int}}``: every valid token's dataset id and top-1 expert, per batch, and
        the layer's kept and routed token-slot counts (their ratio is the dropped fraction)
    """
    from tqdm import tqdm

    model.eval()
    predictions = {ds.name: {} for ds in mixture.datasets}
    records = {}
    total = sum(len(ds) for ds in mixture.datasets)
    bar = tqdm(total=total, desc="eval", disable=not progress, dynamic_ncols=True)
    with no_grad():
        for d, ds in enumerate(mixture.datasets):
            for start in range(0, len(ds), batch_size):
                b = collate([mixture[d, i] for i in range(start, min(start + batch_size, len(ds)))])
                out = model(b["images"], b["mask"], b["dataset_ids"])
                dets = postprocess(out["pred_logits"].data, out["pred_boxes"].data, num_select=num_select)
                if on_batch is not None:
                    on_batch(ds, b["targets"], out)
                for t, det in zip(b["targets"], dets):
                    predictions[ds.name][t["image_id"]] = {
                        "boxes": boxes_to_xywh(det["boxes"], t["orig_size"]),
                        "scores": det["scores"], "labels": det["labels"]}
                for name, rec in out["routing"].records:
                    acc = records.setdefault(name, {"dataset_ids": [], "experts": [], "kept": 0, "routed": 0})
                    valid = rec["valid"]
                    acc["dataset_ids"].append(rec["dataset_ids"][valid])
                    acc["experts"].append(rec["top1"][valid])
                    acc["kept"] += rec["kept"]
                    acc["routed"] += rec["routed"]
                bar.update(len(dets))
    bar.close()
    return predictions, records


def evaluate_model(model, mixture, *, batch_size=8, num_select=100, progress=True,
                   assignment="model", full=True):
    """COCO AP per dataset plus routing analysis, in the ``damex eval --json`` shape.

    ``assignment`` is h (dataset of the mixture -> expert) for the routing accuracy:
    by default the model's map (the mixture is the training mixture); None when the
    datasets are new to the model (the accuracy is then not defined and reported as None).
    """
    predictions, records = predict(model, mixture, batch_size=batch_size, num_select=num_select,
                                   progress=progress)
    results = evaluate_detections(mixture, predictions, full=full)
    cfg = model.cfg
    routing = {"accuracy": None, "layers": []}
    if assignment == "model":
        assignment = cfg.dataset_to_expert
    if records:
        h = np.zeros(len(mixture.datasets), np.int64) if assignment is None else np.asarray(assignment)
        stats = analyse_routing(records, len(mixture.datasets), cfg.num_experts, assignment=h)
        routing["layers"] = [{"name": name, **s} for name, s in stats.items()]
        if assignment is None:
            for layer in routing["layers"]:
                layer["accuracy"] = None
                layer["per_dataset_accuracy"] = None
        else:
            routing["accuracy"] = float(np.mean([s["accuracy"] for s in stats.values()]))
    results["routing"] = routing
    return results, predictions
