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

Result (per dataset also ap_small, ap_medium, ap_large, ar1, ar10, ar100, per_class)::

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


METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100")


def coco_metrics(gt_dict, results, verbose=False):
    """pycocotools' bbox metrics of ``results`` against a COCO ground-truth dict.

    Returns
    -------
    dict
        :data:`METRICS` (``ap`` ... ``ar100``, in [0, 1]) and ``per_class``
        ``{category name: AP}``. With no annotations every value is None (not
        defined); so is a size range or class without ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in gt_dict.get("categories", [])}
    if not gt_dict.get("annotations"):
        return {**{k: None for k in METRICS}, "per_class": {n: None for n in names.values()}}
    with_gt = {a["category_id"] for a in gt_dict["annotations"]}
    if not results:
        out = {k: 0.0 for k in METRICS}
        out["per_class"] = {n: (0.0 if c in with_gt else None) for c, n in names.items()}
        return out
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
    stats = [float(v) for v in ev.stats]
    out = {k: (None if stats[i] < 0 else stats[i]) for i, k in enumerate(METRICS)}
    precision = ev.eval["precision"]          # [T IoU, R recall, K classes, A areas, M max dets]
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[names.get(cid, str(cid))] = float(p[p > -1].mean()) if (p > -1).any() else None
    out["per_class"] = per_class
    return out


def coco_ap(gt_dict, results, verbose=False):
    """``(AP, AP50, AP75)`` of ``results`` against a COCO ground-truth dict, by pycocotools
    (0 when there is nothing to score)."""
    m = coco_metrics(gt_dict, results, verbose)
    return tuple(m[k] or 0.0 for k in ("ap", "ap50", "ap75"))


def evaluate_detections(datasets, predictions, label_space="joint", verbose=False, full=False):
    """Per-dataset COCO metrics and the mean AP, AP50, AP75 over datasets.

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
    full : bool
        All of :data:`METRICS` and ``per_class`` per dataset (else ``ap, ap50, ap75``).

    Returns
    -------
    dict
        ``{"mean_ap", "mean_ap50", "mean_ap75", "datasets": {name: {ap, ap50, ap75
        [, ap_small, ap_medium, ap_large, ar1, ar10, ar100, per_class]}}}``; a dataset
        with no annotations has None metrics and is left out of the means.
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
        m = coco_metrics(ds.coco, res, verbose)
        table[ds.name] = m if full else {k: m[k] for k in ("ap", "ap50", "ap75")}

    def mean(k):
        vals = [v[k] for v in table.values() if v[k] is not None]
        return float(np.mean(vals)) if vals else None
    return {"mean_ap": mean("ap"), "mean_ap50": mean("ap50"), "mean_ap75": mean("ap75"),
            "datasets": table}


def _pct(v):
    return "     -" if v is None else f"{100 * v:6.1f}"


def format_table(results, full=False):
    """A plain-text table of :func:`evaluate_detections` results (AP in percent; "-" for
    undefined). ``full`` adds APs/APm/APl and AR1/10/100."""
    keys = METRICS if full else METRICS[:3]
    heads = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "ap_small": "APs", "ap_medium": "APm",
             "ap_large": "APl", "ar1": "AR1", "ar10": "AR10", "ar100": "AR100"}
    rows = [(name, [r.get(k) for k in keys]) for name, r in results["datasets"].items()]
    mean = [results.get("mean_" + k) if k in ("ap", "ap50", "ap75") else None for k in keys]
    if full:
        for i, k in enumerate(keys[3:], 3):
            vals = [r.get(k) for r in results["datasets"].values() if r.get(k) is not None]
            mean[i] = float(np.mean(vals)) if vals else None
    rows.append(("mean", mean))
    width = max(7, *(len(r[0]) for r in rows))
    line = "-" * (width + 8 * len(keys))
    lines = [f"{'dataset':<{width}}" + "".join(f"  {heads[k]:>6}" for k in keys), line]
    for i, (name, vals) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append(line)
        lines.append(f"{name:<{width}}" + "".join(f"  {_pct(v)}" for v in vals))
    return "\n".join(lines)
