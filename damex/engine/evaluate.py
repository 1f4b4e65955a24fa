"""COCO AP per dataset of a mixture, and the mean over datasets (the paper's headline).

Predictions are made without dataset labels: the model scores every joint
class. For each dataset, the evaluator maps the predicted joint labels back to
that dataset's own category ids and drops the classes the dataset does not
annotate (they cannot be right or wrong there), then runs pycocotools'
``COCOeval`` (bbox) against the dataset's ground truth.

Predictions format (per dataset name)::

    {NAME: {image_id: {"boxes": [N, 4] absolute (x, y, w, h) in original-image
                                pixels,
                       "scores": [N], "labels": [N] joint label ids}}}

(a list of dicts with an ``"image_id"`` key is accepted too). With
``label_space="category"`` labels are the dataset's own category ids.
:func:`boxes_to_xywh` converts normalised ``(cx, cy, w, h)`` model output and
:func:`add_predictions` files a batch of outputs under the right dataset.

Result::

    {"mean_ap": float, "mean_ap50": float, "mean_ap75": float,
     "datasets": {NAME: {"ap": float, "ap50": float, "ap75": float}}}
"""
import contextlib
import io

import numpy as np


def boxes_to_xywh(boxes_cxcywh, orig_size):
    """Normalised ``(cx, cy, w, h)`` [N, 4] -> absolute ``(x, y, w, h)`` for an image of ``orig_size = (H, W)``."""
    b = np.asarray(boxes_cxcywh, dtype=np.float64).reshape(-1, 4)
    H, W = (float(v) for v in orig_size)
    return np.stack([(b[:, 0] - b[:, 2] / 2) * W, (b[:, 1] - b[:, 3] / 2) * H,
                     b[:, 2] * W, b[:, 3] * H], axis=1)


def add_predictions(store, targets, outputs, dataset_names):
    """File one batch of model outputs under their datasets, for :func:`evaluate_detections`.

    The model never sees the dataset ids; they are only used here to know which
    ground truth each image belongs to.

    Parameters
    ----------
    store : dict
        Filled in place: ``{name: {image_id: {"boxes", "scores", "labels"}}}``.
    targets : list of dict
        The batch targets (``dataset_id``, ``image_id``, ``orig_size``).
    outputs : list of dict
        Per image: ``boxes`` [N, 4] normalised ``(cx, cy, w, h)``, ``scores``
        [N], ``labels`` [N] joint label ids (post-processed model output).
    dataset_names : sequence of str
        Name of each dataset id.
    """
    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    for t, o in zip(targets, outputs):
        name = dataset_names[int(t["dataset_id"])]
        store.setdefault(name, {})[int(t["image_id"])] = {
            "boxes": boxes_to_xywh(o["boxes"], t["orig_size"]),
            "scores": np.asarray(o["scores"], dtype=np.float64).reshape(-1),
            "labels": np.asarray(o["labels"]).reshape(-1).astype(np.int64)}
    return store


def _as_dataset_list(datasets):
    if hasattr(datasets, "datasets") and hasattr(datasets, "label_space"):
        return list(datasets.datasets)
    if isinstance(datasets, dict):
        return list(datasets.values())
    return list(datasets)


def _per_image(preds, name):
    """Normalise one dataset's predictions to ``{image_id: dict}``."""
    if preds is None:
        return {}
    if isinstance(preds, dict):
        return preds
    out = {}
    for p in preds:
        if "image_id" not in p:
            raise ValueError(f"predictions of dataset {name!r}: an entry has no 'image_id'")
        out[int(p["image_id"])] = p
    return out


def coco_results(dataset, predictions, label_space="joint"):
    """pycocotools result list (``image_id, category_id, bbox, score``) of one dataset."""
    image_ids = set(dataset.image_ids)
    results = []
    for image_id, p in _per_image(predictions, dataset.name).items():
        image_id = int(image_id)
        if image_id not in image_ids:
            raise ValueError(f"predictions of dataset {dataset.name!r}: image id {image_id} is not "
                             f"in {dataset.ann_file}")
        boxes = np.asarray(p["boxes"], dtype=np.float64)
        if boxes.size == 0:
            continue
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"predictions of dataset {dataset.name!r}, image {image_id}: boxes must be "
                             f"[N, 4] (x, y, w, h), got shape {boxes.shape}")
        scores = np.asarray(p["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(p["labels"]).reshape(-1).astype(np.int64)
        if not len(scores) == len(labels) == len(boxes):
            raise ValueError(f"predictions of dataset {dataset.name!r}, image {image_id}: boxes, scores "
                             f"and labels differ in length ({len(boxes)}, {len(scores)}, {len(labels)})")
        if label_space == "joint":
            if dataset.joint_labels is None:
                raise ValueError(f"dataset {dataset.name!r} has no joint label map; put it in a "
                                 "MixtureDataset or pass label_space='category'")
            back = {j: cid for cid, j in dataset.joint_labels.items()}
            cats = np.array([back.get(int(j), -1) for j in labels], dtype=np.int64)
        elif label_space == "category":
            own = set(dataset.cat_ids)
            cats = np.array([c if c in own else -1 for c in labels.tolist()], dtype=np.int64)
        else:
            raise ValueError(f"label_space must be 'joint' or 'category', got {label_space!r}")
        for box, score, cat in zip(boxes, scores, cats):
            if cat < 0:
                continue  # a class this dataset does not annotate
            results.append({"image_id": image_id, "category_id": int(cat),
                            "bbox": [float(v) for v in box], "score": float(score)})
    return results


def coco_ap(gt_dict, results, verbose=False):
    """``(AP, AP50, AP75)`` of ``results`` against a COCO ground-truth dict, by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results or not gt_dict.get("annotations"):
        return 0.0, 0.0, 0.0
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        gt = COCO()
        gt.dataset = {"images": gt_dict["images"], "annotations": gt_dict["annotations"],
                      "categories": gt_dict["categories"], "info": gt_dict.get("info", {})}
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return tuple(max(float(v), 0.0) for v in ev.stats[:3])


def evaluate_detections(datasets, predictions, label_space="joint", verbose=False):
    """Per-dataset COCO AP, AP50, AP75 and their means over datasets.

    Parameters
    ----------
    datasets : MixtureDataset, or sequence / dict of CocoDetection
    predictions : dict
        ``{dataset name: per-image predictions}`` (see the module docstring); a
        dataset missing here, or with no predictions, scores 0.
    label_space : {"joint", "category"}
        What prediction ``labels`` are.
    verbose : bool
        Let pycocotools print its summaries.

    Returns
    -------
    dict
        ``{"mean_ap", "mean_ap50", "mean_ap75", "datasets": {name: {"ap", "ap50", "ap75"}}}``.
    """
    dsets = _as_dataset_list(datasets)
    known = {ds.name for ds in dsets}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(f"predictions for unknown datasets {unknown}; datasets are {sorted(known)}")
    table = {}
    for ds in dsets:
        res = coco_results(ds, predictions.get(ds.name), label_space)
        if verbose:
            print(f"== {ds.name}: {len(res)} detections on {len(ds)} images")
        ap, ap50, ap75 = coco_ap(ds.coco, res, verbose)
        table[ds.name] = {"ap": ap, "ap50": ap50, "ap75": ap75}
    mean = lambda k: float(np.mean([v[k] for v in table.values()])) if table else 0.0  # noqa: E731
    return {"mean_ap": mean("ap"), "mean_ap50": mean("ap50"), "mean_ap75": mean("ap75"),
            "datasets": table}


def format_table(results):
    """A plain-text table of :func:`evaluate_detections` results (AP in percent)."""
    rows = [(name, r["ap"], r["ap50"], r["ap75"]) for name, r in results["datasets"].items()]
    rows.append(("mean", results["mean_ap"], results.get("mean_ap50", float("nan")),
                 results.get("mean_ap75", float("nan"))))
    width = max(7, *(len(r[0]) for r in rows))
    lines = [f"{'dataset':<{width}}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}", "-" * (width + 24)]
    for k, (name, ap, ap50, ap75) in enumerate(rows):
        if k == len(rows) - 1:
            lines.append("-" * (width + 24))
        lines.append(f"{name:<{width}}  {100 * ap:6.1f}  {100 * ap50:6.1f}  {100 * ap75:6.1f}")
    return "\n".join(lines)
