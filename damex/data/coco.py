"""COCO-format detection datasets: an annotation JSON plus an image folder.

Everything is checked once, when the dataset is built, and every error names
the file and the problem (:class:`DatasetError`). Images are read with Pillow
when an item is asked for.

A target (what ``dataset[i]`` returns next to the image) is a dict:

============  ===============  ==================================================
key           dtype / shape    meaning
============  ===============  ==================================================
boxes         float32 [N, 4]   normalised ``(cx, cy, w, h)`` in [0, 1], relative
                               to the (unpadded) image; unchanged by resizing
labels        int64 [N]        joint label ids (``joint_labels`` map), or the
                               dataset's local index 0..K-1 when no map is set
local_labels  int64 [N]        index of the category in ``dataset.categories``
category_ids  int64 [N]        the dataset's own COCO category ids
image_id      int              COCO image id
orig_size     int64 [2]        ``(H, W)`` of the image file
size          int64 [2]        ``(H, W)`` after the transforms
dataset_id    int              index of the dataset in its mixture
============  ===============  ==================================================

Crowd annotations (``iscrowd=1``) are kept for evaluation but left out of the
training targets, as in DETR. Boxes of zero width or height (as given, or after
clipping to the image) are dropped with a :class:`DatasetWarning` naming them,
as detectron2 and mmdetection do.

Images are read by :func:`read_image`: 8-bit images of any mode become RGB;
16-bit and 32-bit integer grayscale (``I;16``, ``I``) and float grayscale
(``F``) become float images (mode ``F``) in [0, 1], keeping their full range.
"""
import json
import math
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .transforms import model_image


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent (message names the file)."""


class DatasetWarning(UserWarning):
    """A dataset entry was skipped (the message names the file and the entries)."""


def _fail(path, problem):
    raise DatasetError(f"{path}: {problem}")


def load_coco_json(ann_file):
    """Read and validate a COCO detection annotation file.

    Returns a normalised copy: ``{"images", "annotations", "categories"}`` (and
    ``"info"`` if present) with every annotation carrying ``area`` and
    ``iscrowd`` and its ``bbox`` clipped to the image.

    Raises
    ------
    DatasetError
        File missing or unreadable, not JSON (corrupt or truncated), missing
        keys, a field of the wrong JSON type (ids must be integers,
        ``file_name`` a relative path inside the image folder, ``iscrowd`` 0/1,
        ``area`` a finite number >= 0), duplicate ids, an annotation whose image
        or category id is not declared, a box that is not 4 finite numbers, has
        negative size, or lies outside its image by more than one pixel.

    Warns
    -----
    DatasetWarning
        Boxes of zero width or height (after clipping) are skipped, naming them.
    """
    ann_file = os.fspath(ann_file)
    try:
        with open(ann_file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        _fail(ann_file, "annotation file not found")
    except OSError as e:
        _fail(ann_file, f"cannot read annotation file ({e.strerror or e})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        _fail(ann_file, f"not UTF-8 text, corrupt annotation file ({e})")
    except json.JSONDecodeError as e:
        hint = " (the file looks truncated)" if e.pos >= len(raw.rstrip()) else ""
        _fail(ann_file, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}")
    if not isinstance(data, dict):
        _fail(ann_file, f"expected a JSON object at top level, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            _fail(ann_file, f"missing key {key!r}")
        if not isinstance(data[key], list):
            _fail(ann_file, f"{key!r} must be a list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        _fail(ann_file, "'annotations' must be a list")

    categories = []
    cat_ids = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            _fail(ann_file, f"category entry {c!r} needs 'id' and 'name'")
        if not _is_int(c["id"]):
            _fail(ann_file, f"category id {c['id']!r} is not an integer in the int64 range")
        if not isinstance(c["name"], str):
            _fail(ann_file, f"category id {c['id']}: name {c['name']!r} is not a string")
        if c["id"] in cat_ids:
            _fail(ann_file, f"duplicate category id {c['id']}")
        cat_ids.add(c["id"])
        categories.append(dict(c))

    images = []
    img_by_id = {}
    for im in data["images"]:
        if not isinstance(im, dict) or any(k not in im for k in ("id", "file_name", "width", "height")):
            _fail(ann_file, f"image entry {im!r} needs 'id', 'file_name', 'width', 'height'")
        if not _is_int(im["id"]):
            _fail(ann_file, f"image id {im['id']!r} is not an integer in the int64 range")
        if im["id"] in img_by_id:
            _fail(ann_file, f"duplicate image id {im['id']}")
        if not (_is_int(im["width"]) and _is_int(im["height"]) and im["width"] > 0 and im["height"] > 0):
            _fail(ann_file, f"image id {im['id']}: width/height must be positive integers, "
                            f"got {im['width']!r} x {im['height']!r}")
        problem = _file_name_problem(im["file_name"])
        if problem:
            _fail(ann_file, f"image id {im['id']}: file_name {im['file_name']!r} {problem}")
        im = dict(im)
        images.append(im)
        img_by_id[im["id"]] = im

    out_anns = []
    ann_ids = set()
    empty = []   # ids of zero-size boxes, skipped
    tol = 1.0
    for a in annotations:
        if not isinstance(a, dict) or any(k not in a for k in ("id", "image_id", "category_id", "bbox")):
            _fail(ann_file, f"annotation entry {a!r} needs 'id', 'image_id', 'category_id', 'bbox'")
        aid = a["id"]
        if not _is_int(aid):
            _fail(ann_file, f"annotation id {aid!r} is not an integer in the int64 range")
        if aid in ann_ids:
            _fail(ann_file, f"duplicate annotation id {aid}")
        ann_ids.add(aid)
        for key in ("image_id", "category_id"):
            if not _is_int(a[key]):
                _fail(ann_file, f"annotation id {aid}: {key} {a[key]!r} is not an integer in the int64 range")
        if a["category_id"] not in cat_ids:
            _fail(ann_file, f"annotation id {aid}: category id {a['category_id']!r} is not in the "
                            f"label set (categories {sorted(cat_ids)})")
        im = img_by_id.get(a["image_id"])
        if im is None:
            _fail(ann_file, f"annotation id {aid}: image id {a['image_id']!r} is not in 'images'")
        bb = a["bbox"]
        if (not isinstance(bb, (list, tuple)) or len(bb) != 4
                or not all(_is_number(v) and math.isfinite(v) for v in bb)):
            _fail(ann_file, f"annotation id {aid}: bbox must be 4 finite numbers [x, y, w, h], got {bb!r}")
        x, y, w, h = (float(v) for v in bb)
        if w < 0 or h < 0:
            _fail(ann_file, f"annotation id {aid}: box {bb} has non-positive width or height "
                            f"(negative size)")
        W, H = im["width"], im["height"]
        if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
            _fail(ann_file, f"annotation id {aid}: box {bb} (x, y, w, h) lies outside its image "
                            f"id {im['id']} of size {W} x {H}")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or not isinstance(crowd, (bool, int, np.integer)):
            _fail(ann_file, f"annotation id {aid}: iscrowd must be 0 or 1, got {crowd!r}")
        if "area" in a and not (_is_number(a["area"]) and math.isfinite(a["area"]) and a["area"] >= 0):
            _fail(ann_file, f"annotation id {aid}: area must be a finite number >= 0, got {a['area']!r}")
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(W)), min(y + h, float(H))
        if x1 <= x0 or y1 <= y0:
            empty.append(aid)
            continue
        a = dict(a)
        a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        a.setdefault("area", (x1 - x0) * (y1 - y0))
        a["iscrowd"] = int(crowd)
        out_anns.append(a)
    if empty:
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        warnings.warn(f"{ann_file}: skipped {len(empty)} annotation(s) whose box has zero width or "
                      f"height (inside the image): ids {empty[:10]}{more}", DatasetWarning,
                      stacklevel=2)

    out = {"images": images, "annotations": out_anns, "categories": categories}
    if "info" in data:
        out["info"] = data["info"]
    return out


def _is_int(v):
    """A JSON integer that fits int64 (targets hold ids as int64 arrays)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and -2**63 <= v < 2**63


def _is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _file_name_problem(name):
    """Why ``name`` is not a relative path inside the image folder (None if it is)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "\0" in name:
        return "contains a NUL character"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return "is an absolute path; file names must be relative to the image folder"
    parts = os.path.normpath(name).replace("\\", "/").split("/")
    if parts[0] == os.pardir:
        return "points outside the image folder ('..'); file names must stay inside it"
    return None


def read_image(path):
    """Read an image file for the model; errors name the file (:class:`DatasetError`).

    Returns
    -------
    PIL.Image.Image
        Mode "RGB" for 8-bit images, mode "F" in [0, 1] for high-depth
        grayscale (see :func:`damex.data.transforms.model_image`).

    Raises
    ------
    DatasetError
        Missing, unreadable or truncated file, a header whose pixel count
        exceeds Pillow's decompression-bomb limit, or pixel values without a
        known range.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return model_image(im)
    except FileNotFoundError:
        _fail(path, "image file not found")
    except Image.DecompressionBombError as e:
        _fail(path, f"image refused as a possible decompression bomb ({e})")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        _fail(path, f"cannot read image ({type(e).__name__}: {e})")


class CocoDetection:
    """One COCO-format detection dataset.

    Parameters
    ----------
    name : str
        Dataset name (used in tables and error messages).
    ann_file : str or os.PathLike
        COCO annotation JSON.
    img_dir : str or os.PathLike
        Folder holding the ``file_name`` of every image.
    transforms : callable, optional
        ``(image, target) -> (image, target)``, e.g. :mod:`damex.data.transforms`.
    dataset_id : int
        Index of this dataset in its mixture (carried in every target).
    joint_labels : dict, optional
        ``{category_id: joint_label}``; set by :class:`~damex.data.mixture.MixtureDataset`.
    verify_images : bool
        Open every image now (not only check that the files exist).

    Attributes
    ----------
    coco : dict
        The validated annotation dict (what the evaluator scores against).
    categories : list of dict
        ``{"id", "name"}`` in file order; ``local_labels`` index this list.
    """

    def __init__(self, name, ann_file, img_dir, transforms=None, dataset_id=0,
                 joint_labels=None, verify_images=False):
        self.name = str(name)
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        self.transforms = transforms
        self.dataset_id = int(dataset_id)
        self.coco = load_coco_json(self.ann_file)
        if not os.path.isdir(self.img_dir):
            _fail(self.img_dir, f"image folder of dataset {self.name!r} not found")
        self.categories = [{"id": c["id"], "name": str(c["name"])} for c in self.coco["categories"]]
        self.cat_ids = [c["id"] for c in self.categories]
        self._local_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.images = self.coco["images"]
        self._anns = {im["id"]: [] for im in self.images}
        for a in self.coco["annotations"]:
            self._anns[a["image_id"]].append(a)
        for im in self.images:
            path = self.image_path(im)
            if not os.path.isfile(path):
                _fail(path, f"image file not found (image id {im['id']} of {self.ann_file})")
            if verify_images:
                self._check_image(read_image(path), im, path)
        self.joint_labels = None
        if joint_labels is not None:
            self.set_joint_labels(joint_labels)

    def set_joint_labels(self, joint_labels):
        """Map this dataset's category ids to joint labels: ``{category_id: joint}``."""
        missing = [cid for cid in self.cat_ids if cid not in joint_labels]
        if missing:
            raise ValueError(f"dataset {self.name!r}: joint label map lacks category ids {missing}")
        self.joint_labels = {cid: int(joint_labels[cid]) for cid in self.cat_ids}

    def image_path(self, image_info):
        return os.path.join(self.img_dir, image_info["file_name"])

    @staticmethod
    def _check_image(img, info, path):
        if img.size != (info["width"], info["height"]):
            _fail(path, f"image is {img.size[0]} x {img.size[1]} but the annotation file says "
                        f"{info['width']} x {info['height']} (image id {info['id']})")

    def __len__(self):
        return len(self.images)

    @property
    def image_ids(self):
        return [im["id"] for im in self.images]

    def target(self, index):
        """The target of item ``index`` before transforms (see the module docstring)."""
        info = self.images[index]
        W, H = info["width"], info["height"]
        anns = [a for a in self._anns[info["id"]] if not a.get("iscrowd", 0)]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.stack([(xywh[:, 0] + xywh[:, 2] / 2) / W, (xywh[:, 1] + xywh[:, 3] / 2) / H,
                          xywh[:, 2] / W, xywh[:, 3] / H], axis=1)
        cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
        local = np.array([self._local_of[c] for c in cat], dtype=np.int64)
        if self.joint_labels is not None:
            labels = np.array([self.joint_labels[c] for c in cat], dtype=np.int64)
        else:
            labels = local.copy()
        return {
            "boxes": np.clip(boxes, 0.0, 1.0).astype(np.float32),
            "labels": labels,
            "local_labels": local,
            "category_ids": cat,
            "image_id": int(info["id"]),
            "orig_size": np.array([H, W], dtype=np.int64),
            "size": np.array([H, W], dtype=np.int64),
            "dataset_id": self.dataset_id,
        }

    def __getitem__(self, index):
        return self.load(index)

    def load(self, index, rng=None):
        """Image ``index`` and its target, transformed (``rng`` drives random transforms)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset {self.name!r} of {len(self)} images")
        index = index % len(self)
        info = self.images[index]
        path = self.image_path(info)
        img = read_image(path)
        self._check_image(img, info, path)
        target = self.target(index)
        if self.transforms is not None:
            img, target = self.transforms(img, target, rng=rng)
        return img, target

    def __repr__(self):
        return (f"CocoDetection(name={self.name!r}, images={len(self)}, "
                f"categories={[c['name'] for c in self.categories]})")
