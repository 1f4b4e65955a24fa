"""A trained detector from its checkpoint alone, and predictions with it.

:class:`Detector` rebuilds the model from what the checkpoint stores (model
configuration, weights, joint label space, dataset -> expert map); no training
data is read.  It predicts on plain images (file names, arrays or PIL images)
and on COCO datasets, where the results are in the annotation file's own image
and category ids, as pycocotools' ``loadRes`` takes them.

Every prediction also says which expert the router chose in each MoE layer for
that image (the majority of the image's tokens' top-1 experts) and the training
dataset(s) whose expert that is: the DAMEX router read as a domain classifier.

Example::

    det = damex.Detector.from_checkpoint("runs/tiny_damex/checkpoint.npz")
    for p in det.predict(["a.png", "b.jpg"]):
        print(p["file"], p["names"], p["experts"], p["dataset"])
"""
import os

import numpy as np

from ..autograd import no_grad
from ..data.mixture import LabelSpace, collate
from ..models.postprocess import postprocess
from .evaluate import boxes_to_xywh

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(paths):
    """Image files of ``paths`` (files as given, folders' image files sorted by name)."""
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            out += sorted(os.path.join(p, n) for n in os.listdir(p)
                          if n.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    if not out:
        raise ValueError(f"no image files in {[os.fspath(p) for p in paths]}")
    return out


def image_experts(records, batch, mapping, dataset_names):
    """Per image of a batch: ``{layer: expert}`` (majority of its valid tokens' top-1) and
    the names of the datasets mapped to that expert in each layer."""
    per_image = [({}, {}) for _ in range(batch)]
    for name, rec in records:       # the forward context's (layer, record) pairs
        top1, valid = np.asarray(rec["top1"]), np.asarray(rec["valid"], bool)
        if top1.size % batch:
            continue
        top1, valid = top1.reshape(batch, -1), valid.reshape(batch, -1)
        for b in range(batch):
            chosen = top1[b][valid[b]]
            if chosen.size == 0:
                continue
            e = int(np.bincount(chosen).argmax())
            per_image[b][0][name] = e
            per_image[b][1][name] = [dataset_names[d] for d, x in enumerate(mapping) if x == e]
    return per_image


class Detector:
    """A trained model with its label space, ready to predict.

    Attributes
    ----------
    model : DINO (eval mode)
    label_space : LabelSpace of the training mixture
    config : RunConfig of the run
    step : int, the checkpoint's training step
    path : str, the checkpoint
    """

    def __init__(self, model, label_space, config, step=0, path=None, config_hash=None):
        self.model, self.label_space, self.config = model, label_space, config
        self.step, self.path = int(step), path
        self.config_hash = config_hash or config.hash()
        self.model.eval()

    @classmethod
    def from_checkpoint(cls, path, threads=None):
        """Rebuild the detector from a checkpoint (no data on disk needed)."""
        from .. import set_num_threads
        from .checkpoint import load_checkpoint, restore
        from .config import finalize, run_config_from_dict
        from .train import build_model

        path = os.fspath(path)
        parts, meta = load_checkpoint(path)
        if "config" not in meta or "label_space" not in meta:
            raise ValueError(f"{path}: not a damex training checkpoint (no config or label space)")
        conf = dict(meta["config"])
        if threads:
            conf["train"] = dict(conf["train"], threads=threads)
        cfg = run_config_from_dict(conf, source=path)
        finalize(cfg)
        set_num_threads(cfg.train.threads)
        space = LabelSpace.from_dict(meta["label_space"])
        # every weight comes from the checkpoint: the run's pretrained files are not read
        model = build_model(cfg, space.num_classes, space.num_datasets, load_weights=False)
        restore(path, parts, model)   # the model only: optimizer and schedule are training's
        return cls(model, space, cfg, meta.get("step", 0), os.path.abspath(path), meta.get("config_hash"))

    # -- what the model knows ----------------------------------------------------

    @property
    def class_names(self):
        return list(self.label_space.names)

    @property
    def dataset_names(self):
        return list(self.label_space.dataset_names)

    @property
    def dataset_to_expert(self):
        return tuple(self.model.cfg.dataset_to_expert)

    def transforms(self):
        """The evaluation transforms of the run (resize, to array, normalise)."""
        from ..data.transforms import default_transforms

        dc = self.config.data
        return default_transforms(False, dc.min_size, dc.max_size, 0.0, dc.normalize)

    def describe(self):
        """What goes into a results file: checkpoint, step, config hash."""
        return {"checkpoint": self.path, "step": self.step, "config_hash": self.config_hash}

    # -- plain images ------------------------------------------------------------

    def _run(self, batch_items, dataset_ids=None, num_select=100):
        b = collate(batch_items)
        with no_grad():
            out = self.model(b["images"], b["mask"], dataset_ids)
        dets = postprocess(out["pred_logits"].data, out["pred_boxes"].data, num_select=num_select)
        routes = image_experts(out["routing"].records, len(dets), self.dataset_to_expert,
                               self.dataset_names)
        return b, dets, routes

    def predict(self, images, score_threshold=0.3, batch_size=8, num_select=100):
        """Detections on plain images.

        Parameters
        ----------
        images : sequence of file paths, PIL images or uint8 arrays [H, W, 3]
            (folders are expanded to their image files)
        score_threshold : float
            Detections scoring below are dropped.

        Returns
        -------
        list of dict, one per image: ``file`` (path or None), ``size`` (H, W),
        ``boxes`` [N, 4] absolute (x, y, w, h), ``scores`` [N], ``labels`` [N] joint
        ids, ``names`` [N] class names, ``experts`` {MoE layer: expert},
        ``datasets`` {MoE layer: names of datasets routed to that expert}, and
        ``dataset``: the dataset of the first MoE layer's expert (None when not unique).
        """
        from PIL import Image

        from ..data.coco import read_image

        items = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                for f in (image_files([im]) if os.path.isdir(im) else [os.fspath(im)]):
                    items.append((f, read_image(f)))
            elif isinstance(im, Image.Image):
                items.append((None, im.convert("RGB")))
            else:
                arr = np.asarray(im)
                if arr.ndim != 3 or arr.shape[2] != 3:
                    raise ValueError(f"predict: an image array must be [H, W, 3], got {arr.shape}")
                items.append((None, Image.fromarray(arr.astype(np.uint8))))
        tf = self.transforms()
        self.model.eval()
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            samples = []
            for k, (_, img) in enumerate(chunk):
                W, H = img.size
                target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                          "image_id": start + k, "orig_size": np.array([H, W]),
                          "size": np.array([H, W]), "dataset_id": 0}
                samples.append(tf(img, target))
            b, dets, routes = self._run(samples, None, num_select)
            for (f, img), t, det, (experts, dsets) in zip(chunk, b["targets"], dets, routes):
                keep = det["scores"] >= score_threshold
                labels = det["labels"][keep]
                first = next(iter(dsets.values()), None)
                results.append({
                    "file": f, "size": [int(img.size[1]), int(img.size[0])],
                    "boxes": boxes_to_xywh(det["boxes"][keep], t["orig_size"]),
                    "scores": det["scores"][keep], "labels": labels,
                    "names": [self.class_names[int(j)] for j in labels],
                    "experts": experts, "datasets": dsets,
                    "dataset": first[0] if first and len(first) == 1 else None})
        return results

    # -- COCO datasets -----------------------------------------------------------

    def mixture(self, specs):
        """A :class:`~damex.data.mixture.MixtureDataset` of ``[(name, ann_file, img_dir)]``
        in the model's label space (categories matched to its classes by name)."""
        from ..data.coco import CocoDetection
        from ..data.mixture import MixtureDataset

        tf = self.transforms()
        sets = [CocoDetection(name, ann, img, transforms=tf) for name, ann, img in specs]
        return MixtureDataset(sets, label_space=self.label_space.project(sets))

    def assignment(self, mixture):
        """h for a mixture's datasets (dataset -> expert) when all were trained on, else None."""
        trained = self.dataset_names
        if all(ds.name in trained for ds in mixture.datasets):
            return [self.dataset_to_expert[trained.index(ds.name)] for ds in mixture.datasets]
        return None

    def predict_coco(self, mixture, batch_size=8, num_select=100, score_threshold=0.0, progress=False):
        """COCO results per dataset of ``mixture`` and the router's choice per image.

        Returns
        -------
        results : ``{dataset name: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]}``
            in each annotation file's own ids (classes a dataset does not annotate dropped)
        routes : ``{dataset name: {image_id: {"experts": {...}, "datasets": {...}}}}``
        """
        from .evaluate import coco_results
        from .inference import predict

        routes = {ds.name: {} for ds in mixture.datasets}

        def keep_routes(ds, targets, out):
            r = image_experts(out["routing"].records, len(targets), self.dataset_to_expert,
                              self.dataset_names)
            for t, (experts, dsets) in zip(targets, r):
                routes[ds.name][int(t["image_id"])] = {"experts": experts, "datasets": dsets}

        preds, _ = predict(self.model, mixture, batch_size=batch_size, num_select=num_select,
                           progress=progress, on_batch=keep_routes)
        results = {ds.name: [r for r in coco_results(ds, preds[ds.name]) if r["score"] >= score_threshold]
                   for ds in mixture.datasets}
        return results, routes
