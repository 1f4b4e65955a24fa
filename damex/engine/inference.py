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


def predict(model, mixture, *, batch_size=8, num_select=100, progress=True, on_batch=None,
            world=None):
    """Detections for every image of ``mixture`` and the routing records.

    ``on_batch(dataset, targets, outputs)``, if given, sees every batch's raw outputs.
    With ``world`` (a :class:`~damex.engine.distributed.World`) the batches, the same as
    in one process, are dealt out over the ranks (``on_batch`` sees this rank's) and the
    results gathered on rank 0 in the one-process order; the other ranks return
    ``(None, None)``.

    Returns
    -------
    predictions : dict ``{dataset name: {image_id: {"boxes" xywh, "scores", "labels"}}}``
    records : dict ``{layer name: {"dataset_ids": [arrays], "experts": [arrays], "kept": int,
        "routed": int}}``: every valid token's dataset id and top-1 expert, per batch, and
        the layer's kept and routed token-slot counts (their ratio is the dropped fraction)
    """
    from tqdm import tqdm

    model.eval()
    batches = [(d, start) for d, ds in enumerate(mixture.datasets) for start in range(0, len(ds), batch_size)]
    mine = range(len(batches)) if world is None else world.batches_of(len(batches), model)
    done = []     # (batch index, dataset name, [(image_id, prediction)], [(layer, record)])
    bar = tqdm(total=sum(len(ds) for ds in mixture.datasets), desc="eval", dynamic_ncols=True,
               disable=not progress or (world is not None and not world.is_main))
    with no_grad():
        for j in mine:
            d, start = batches[0 if j is None else j]   # None: a batch for the others' collectives
            ds = mixture.datasets[d]
            b = collate([mixture[d, i] for i in range(start, min(start + batch_size, len(ds)))])
            out = model(b["images"], b["mask"], b["dataset_ids"])
            if j is None:
                continue
            dets = postprocess(out["pred_logits"].data, out["pred_boxes"].data, num_select=num_select)
            if on_batch is not None:
                on_batch(ds, b["targets"], out)
            preds = [(t["image_id"], {"boxes": boxes_to_xywh(det["boxes"], t["orig_size"]),
                                      "scores": det["scores"], "labels": det["labels"]})
                     for t, det in zip(b["targets"], dets)]
            recs = [(name, {"dataset_ids": rec["dataset_ids"][rec["valid"]],
                            "experts": rec["top1"][rec["valid"]], "kept": rec["kept"],
                            "routed": rec["routed"]}) for name, rec in out["routing"].records]
            done.append((j, ds.name, preds, recs))
            bar.update(len(dets) * (1 if world is None else world.size))
    bar.close()
    if world is not None:
        done = world.gather_batches(done)
        if done is None:
            return None, None
    predictions = {ds.name: {} for ds in mixture.datasets}
    records = {}
    for _, name, preds, recs in sorted(done, key=lambda item: item[0]):
        predictions[name].update(preds)
        for layer, rec in recs:
            acc = records.setdefault(layer, {"dataset_ids": [], "experts": [], "kept": 0, "routed": 0})
            acc["dataset_ids"].append(rec["dataset_ids"])
            acc["experts"].append(rec["experts"])
            acc["kept"] += int(rec["kept"])
            acc["routed"] += int(rec["routed"])
    return predictions, records


def evaluate_model(model, mixture, *, batch_size=8, num_select=100, progress=True,
                   assignment="model", full=True, world=None):
    """COCO AP per dataset plus routing analysis, in the ``damex eval --json`` shape.

    ``assignment`` is h (dataset of the mixture -> expert) for the routing accuracy:
    by default the model's map (the mixture is the training mixture); None when the
    datasets are new to the model (the accuracy is then not defined and reported as None).
    With ``world`` the images are split over the ranks (:func:`predict`), rank 0 scores
    them and every rank returns its results (predictions None except on rank 0).
    """
    predictions, records = predict(model, mixture, batch_size=batch_size, num_select=num_select,
                                   progress=progress, world=world)
    if world is not None:
        results = _evaluate(model, mixture, predictions, records, assignment, full) \
            if world.is_main else None
        return world.bcast_json(results, "the evaluation results"), predictions
    return _evaluate(model, mixture, predictions, records, assignment, full), predictions


def _evaluate(model, mixture, predictions, records, assignment, full):
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
    return results
