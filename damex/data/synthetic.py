"""The embedded default: a small, deterministic mixture of COCO-format datasets.

``make_mixture(root)`` writes five datasets that differ the way UODB's do, in
miniature, small enough that a tiny detector learns them on a CPU in minutes
and hard enough that it does not saturate them:

=========  ==========  ===================================  ===========  ==============  ==============================
name       image size  classes (COCO id: name)              objects/img  object side     domain
=========  ==========  ===================================  ===========  ==============  ==============================
flat       64 x 64     1 circle, 2 square, 3 triangle       1-4          22-42 % large   flat pastel background, filled
                                                                                         shapes that may occlude (30 %)
noise      64 x 64     1 circle, 2 cross                    0-4          18-32 % medium  dark, strong colour sensor
                                                                                         noise, distractor strokes
stripes    80 x 64     10 ring, 20 diamond                  2-6          13-22 % small   striped texture of random
                                                                                         angle / period / colours
sketch     64 x 64     1 triangle, 2 star                   1-4          22-40 % large   off-white paper grain, pencil
                                                                                         outlines only, 2-5 strokes
camo       72 x 72     1 star, 2 cross, 3 hexagon           1-4          17-30 % medium  camouflage blotches in muted
                                                                                         tones, half-transparent objects
=========  ==========  ===================================  ===========  ==============  ==============================

How they differ:

* **domain** - colour, texture and style differ per dataset (flat colour,
  sensor noise, stripes texture, line drawing, camouflage); the same class
  looks different in two datasets (a filled circle in ``flat``, a noisy one in
  ``noise``). Within a dataset an object's colour comes from the dataset's
  palette whatever its class, so the class is in the shape, not the colour;
  unlabelled line strokes (distractors) cross some images.
* **label set** - ``circle`` is shared by ``flat`` and ``noise``, ``triangle``
  by ``flat`` and ``sketch``, ``star`` by ``sketch`` and ``camo``, ``cross``
  by ``noise`` and ``camo`` (names merge in the joint label space, unless
  ``merge_labels_by_name`` is false); ``square`` only in ``flat``, ``ring``
  and ``diamond`` only in ``stripes``, ``hexagon`` only in ``camo``: 8 joint
  classes. Category ids are each dataset's own (``stripes`` uses 10 and 20).
* **size** - ``sketch`` has few images (24 train / 16 val in the default
  preset against 160 / 40 for the others).
* **object scale** - large in ``flat`` and ``sketch``, medium in ``noise`` and
  ``camo``, small in ``stripes``.
* **more datasets than experts** - five datasets for the ``tiny`` model's four
  experts, so DAMEX's map h (default ``d mod E``: ``camo`` shares ``flat``'s
  expert) is many-to-one.
* ``noise`` has some training images without any object (allowed by COCO).

Presets: ``"default"`` (664 train + 176 val images) and ``"tiny"`` (a few
images per dataset, for tests). The output is a function of ``(seed, preset)``
only: the same seed gives the same bytes (PNG written by Pillow without
metadata, JSON with sorted keys). The mixture is written into a temporary
directory next to ``root`` and renamed into place, so a failure never leaves a
half-written ``root`` behind; temporary folders of a generation that was killed
(its process gone) are removed by the next call.

Layout::

    root/mixture.json                       the description returned below
    root/NAME/images/{train,val}_000001.png
    root/NAME/annotations/{train,val}.json  COCO: images, annotations
                                            (bbox [x, y, w, h], area, iscrowd),
                                            categories
"""
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 4
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliasing)

# Per dataset: image (width, height), categories, objects per image, object side
# as a fraction of min(width, height), rendering style, the palette instance
# colours are drawn from (any class takes any colour of its dataset's palette:
# the class is in the shape, not in the colour), unlabelled distractor strokes
# per image.
_DATASETS = [
    dict(name="flat", size=(64, 64),
         categories=[(1, "circle"), (2, "square"), (3, "triangle")],
         objects=(1, 4), scale=(0.22, 0.42), style="flat", empty_fraction=0.0, occlusion=0.3,
         palette=[(220, 40, 40), (40, 70, 210), (30, 160, 60), (200, 120, 20)],
         distractors=(0, 1)),
    dict(name="noise", size=(64, 64),
         categories=[(1, "circle"), (2, "cross")],
         objects=(1, 4), scale=(0.18, 0.32), style="noise", empty_fraction=0.06,
         palette=[(235, 215, 50), (60, 220, 230), (200, 90, 200)],
         distractors=(1, 3)),
    dict(name="stripes", size=(80, 64),
         categories=[(10, "ring"), (20, "diamond")],
         objects=(2, 6), scale=(0.13, 0.22), style="stripes", empty_fraction=0.0,
         palette=[(245, 245, 245), (250, 140, 20), (40, 40, 40)],
         distractors=(0, 2)),
    dict(name="sketch", size=(64, 64),
         categories=[(1, "triangle"), (2, "star")],
         objects=(1, 4), scale=(0.22, 0.40), style="sketch", empty_fraction=0.0, occlusion=0.2,
         palette=[(20, 20, 30), (20, 30, 110), (90, 30, 20)],
         distractors=(2, 5)),
    dict(name="camo", size=(72, 72),
         categories=[(1, "star"), (2, "cross"), (3, "hexagon")],
         objects=(1, 4), scale=(0.17, 0.30), style="camo", empty_fraction=0.0,
         palette=[(120, 140, 90), (150, 125, 85), (95, 110, 120)],
         distractors=(1, 3)),
]

PRESETS = {
    # images per dataset: (train, val)
    "default": {"flat": (160, 40), "noise": (160, 40), "stripes": (160, 40),
                "sketch": (24, 16), "camo": (160, 40)},
    "tiny": {"flat": (6, 3), "noise": (6, 3), "stripes": (6, 3),
             "sketch": (3, 2), "camo": (6, 3)},
}


def _unit_polygon(shape):
    """Vertices of a polygonal shape, scaled so that their bounding box is [0, 1]^2."""
    if shape == "triangle":
        pts = [(0.0, 1.0), (1.0, 1.0), (0.5, 0.0)]
    elif shape == "diamond":
        pts = [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    elif shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        xy = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        xy = (xy - xy.min(0)) / (xy.max(0) - xy.min(0))
        pts = [tuple(p) for p in xy]
    elif shape == "hexagon":
        ang = np.arange(6) * np.pi / 3
        xy = np.stack([np.cos(ang), np.sin(ang)], 1)
        xy = (xy - xy.min(0)) / (xy.max(0) - xy.min(0))
        pts = [tuple(p) for p in xy]
    elif shape == "cross":
        a, b = 1 / 3, 2 / 3
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1),
               (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return pts


def _shape_mask(shape, box, size, outline):
    """Anti-aliased coverage in [0, 1] of one shape whose bounding box is ``box``.

    ``box`` is ``(x, y, w, h)`` in pixels of an image of ``size = (W, H)``;
    ``outline`` is the stroke width in pixels, or 0 for a filled shape.
    Returns float32 [H, W].
    """
    s = SUPERSAMPLE
    W, H = size
    # draw only the box and a one-pixel margin (integer pixel offsets keep the raster)
    ox, oy = max(int(box[0]) - 1, 0), max(int(box[1]) - 1, 0)
    ex, ey = min(int(np.ceil(box[0] + box[2])) + 1, W), min(int(np.ceil(box[1] + box[3])) + 1, H)
    m = Image.new("L", ((ex - ox) * s, (ey - oy) * s), 0)
    d = ImageDraw.Draw(m)
    x, y, w, h = (box[0] - ox) * s, (box[1] - oy) * s, box[2] * s, box[3] * s
    stroke = max(1, int(round(outline * s))) if outline else 0
    if stroke and shape not in ("circle", "ring", "square"):
        # a polygon's stroke is centred on its edges: inset so it stays in the box
        x, y, w, h = x + stroke / 2, y + stroke / 2, w - stroke, h - stroke
    x1, y1 = x + w - 1, y + h - 1
    if shape in ("circle", "ring"):
        width = stroke if shape == "circle" else max(stroke, int(round(0.36 * min(w, h) / 2)))
        if width:
            d.ellipse([x, y, x1, y1], outline=255, width=width)
        else:
            d.ellipse([x, y, x1, y1], fill=255)
    elif shape == "square":
        if stroke:
            d.rectangle([x, y, x1, y1], outline=255, width=stroke)
        else:
            d.rectangle([x, y, x1, y1], fill=255)
    else:
        pts = [(x + px * (w - 1), y + py * (h - 1)) for px, py in _unit_polygon(shape)]
        if stroke:
            d.line(pts + [pts[0], pts[1]], fill=255, width=stroke, joint="curve")
        else:
            d.polygon(pts, fill=255)
    out = np.zeros((H, W), dtype=np.float32)
    out[oy:ey, ox:ex] = np.asarray(m.resize((ex - ox, ey - oy), Image.Resampling.BOX),
                                   dtype=np.float32) / 255.0
    return out


def _background(style, size, rng):
    """float32 [H, W, 3] background in [0, 255] for one rendering style."""
    W, H = size
    if style == "flat":
        base = rng.uniform(185, 245, size=3)
        ramp = np.linspace(-8, 8, W, dtype=np.float32)[None, :, None]
        return np.broadcast_to(base, (H, W, 3)) + ramp
    if style == "noise":
        base = rng.uniform(25, 70, size=3)
        return np.broadcast_to(base, (H, W, 3)).astype(np.float32)
    if style == "stripes":
        c0 = rng.uniform(90, 170, size=3)
        c1 = c0 + rng.uniform(-60, 60, size=3)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(5, 11)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform()
        t = (0.5 + 0.5 * np.sin(2 * np.pi * phase))[..., None]
        return c0 * (1 - t) + c1 * t
    if style == "sketch":
        base = rng.uniform(232, 250) + np.array([4.0, 2.0, -6.0])
        grain = rng.normal(0, 4, size=(H, W, 1))
        return np.broadcast_to(base, (H, W, 3)) + grain
    if style == "camo":  # blotches: low-frequency noise thresholded into three muted tones
        tones = np.array([(105, 120, 80), (140, 120, 85), (85, 95, 100)], np.float32)
        tones = tones + rng.uniform(-15, 15, size=(1, 3))
        coarse = rng.normal(size=(3, H // 8 + 2, W // 8 + 2))
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / 8.0
        y0, x0 = yy.astype(int), xx.astype(int)
        fy, fx = yy - y0, xx - x0
        field = (coarse[:, y0, x0] * (1 - fy) * (1 - fx) + coarse[:, y0 + 1, x0] * fy * (1 - fx)
                 + coarse[:, y0, x0 + 1] * (1 - fy) * fx + coarse[:, y0 + 1, x0 + 1] * fy * fx)
        return tones[np.argmax(field, axis=0)] + rng.normal(0, 5, size=(H, W, 1))
    raise ValueError(f"unknown style {style!r}")


def _stroke_mask(size, rng, width):
    """Anti-aliased coverage [H, W] of one random line segment (an unlabelled distractor)."""
    s = SUPERSAMPLE
    W, H = size
    m = Image.new("L", (W * s, H * s), 0)
    x0, y0 = rng.uniform(0, W), rng.uniform(0, H)
    length = rng.uniform(0.25, 0.6) * min(W, H)
    ang = rng.uniform(0, 2 * np.pi)
    ImageDraw.Draw(m).line([x0 * s, y0 * s, (x0 + length * np.cos(ang)) * s,
                            (y0 + length * np.sin(ang)) * s], fill=255, width=max(1, int(width * s)))
    return np.asarray(m.resize((W, H), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _place_boxes(n, size, scale, rng, max_tries=60, occlusion=0.0):
    """Up to ``n`` boxes (x, y, w, h), integer pixels: one gap apart, or, with
    ``occlusion`` > 0, overlapping by at most that share of the smaller box's area."""
    W, H = size
    side = min(W, H)
    boxes = []
    for _ in range(max_tries):
        if len(boxes) == n:
            break
        s = rng.uniform(*scale) * side
        aspect = rng.uniform(0.8, 1.25)
        w = int(round(np.clip(s * np.sqrt(aspect), 6, W - 2)))
        h = int(round(np.clip(s / np.sqrt(aspect), 6, H - 2)))
        x = int(rng.integers(1, W - w))
        y = int(rng.integers(1, H - h))
        def ok(bx, by, bw, bh):
            if x + w + 1 <= bx or bx + bw + 1 <= x or y + h + 1 <= by or by + bh + 1 <= y:
                return True
            inter = max(0, min(x + w, bx + bw) - max(x, bx)) * max(0, min(y + h, by + bh) - max(y, by))
            return inter <= occlusion * min(w * h, bw * bh)
        if all(ok(*b) for b in boxes):
            boxes.append((x, y, w, h))
    return boxes


def _render_image(spec, rng):
    """One image of a dataset: (uint8 [H, W, 3], [(box, category_id), ...])."""
    size = spec["size"]
    style = spec["style"]
    img = np.array(_background(style, size, rng), dtype=np.float32)
    palette = np.array(spec["palette"], np.float32)
    for _ in range(int(rng.integers(spec["distractors"][0], spec["distractors"][1] + 1))):
        colour = np.clip(palette[int(rng.integers(len(palette)))] + rng.uniform(-25, 25, size=3), 0, 255)
        alpha = _stroke_mask(size, rng, rng.uniform(1.0, 2.5))[..., None]
        img = img * (1 - alpha) + colour * alpha
    if rng.uniform() < spec["empty_fraction"]:
        n = 0
    else:
        n = int(rng.integers(spec["objects"][0], spec["objects"][1] + 1))
    objects = []
    for box in _place_boxes(n, size, spec["scale"], rng, occlusion=spec.get("occlusion", 0.0)):
        cat_id, name = spec["categories"][int(rng.integers(len(spec["categories"])))]
        colour = np.clip(palette[int(rng.integers(len(palette)))] + rng.uniform(-25, 25, size=3), 0, 255)
        outline = 0.0
        if style == "sketch":
            outline = rng.uniform(1.0, 2.0)
        alpha = _shape_mask(name, box, size, outline)[..., None]
        if style == "sketch":  # pencil: strokes of varying pressure
            alpha = alpha * rng.uniform(0.6, 0.95)
        if style == "camo":  # objects blend in: partly transparent
            alpha = alpha * rng.uniform(0.55, 0.85)
        img = img * (1 - alpha) + colour * alpha
        if style == "stripes":  # a thin dark rim keeps small shapes off the texture
            rim_shape = "circle" if name == "ring" else name  # a ring gets its outer edge only
            rim = _shape_mask(rim_shape, box, size, 0.7)[..., None] * 0.6
            img = img * (1 - rim) + 20.0 * rim
        objects.append((box, cat_id))
    if style == "noise":
        img = img + rng.normal(0, 24, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _write_split(spec, split, count, rng, ds_dir):
    """Render ``count`` images of one split; write PNGs and return the COCO dict."""
    images, annotations = [], []
    for k in range(1, count + 1):
        pixels, objects = _render_image(spec, rng)
        file_name = f"{split}_{k:06d}.png"
        Image.fromarray(pixels, "RGB").save(os.path.join(ds_dir, "images", file_name),
                                           format="PNG", optimize=False)
        images.append({"id": k, "file_name": file_name,
                       "width": spec["size"][0], "height": spec["size"][1]})
        for (x, y, w, h), cat_id in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": k,
                                "category_id": cat_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
    return {
        "info": {"description": f"damex synthetic mixture: {spec['name']} {split}",
                 "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name in spec["categories"]],
    }


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, indent=1)
        f.write("\n")


def _description(root, seed, preset):
    counts = PRESETS[preset]
    datasets = []
    for spec in _DATASETS:
        name = spec["name"]
        ds_dir = os.path.join(root, name)
        n_train, n_val = counts[name]
        datasets.append({
            "name": name,
            "img_dir": os.path.join(ds_dir, "images"),
            "train": os.path.join(ds_dir, "annotations", "train.json"),
            "val": os.path.join(ds_dir, "annotations", "val.json"),
            "num_train": n_train, "num_val": n_val,
            "categories": [{"id": cid, "name": cname} for cid, cname in spec["categories"]],
            "image_size": list(spec["size"]),
            "object_scale": list(spec["scale"]),
            "objects_per_image": list(spec["objects"]),
            "style": spec["style"],
        })
    return {"root": os.path.abspath(root), "seed": int(seed), "preset": preset,
            "version": GENERATOR_VERSION, "datasets": datasets}


def _relative(desc):
    """The description with paths relative to root (what mixture.json stores)."""
    out = json.loads(json.dumps(desc))
    out.pop("root")
    for d in out["datasets"]:
        for key in ("img_dir", "train", "val"):
            d[key] = os.path.relpath(d[key], desc["root"])
    return out


def _holds(root, desc):
    """True when ``root`` already holds the mixture described by ``desc``."""
    try:
        with open(os.path.join(root, "mixture.json"), encoding="utf-8") as f:
            return json.load(f) == _relative(desc)
    except (OSError, ValueError):
        return False


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(parent, base):
    """Delete ``.BASE.tmp-PID-*`` / ``.BASE.old-*`` folders left by a generation that was
    killed midway (its process is gone); those of a live process are left alone."""
    for entry in os.listdir(parent):
        if entry.startswith(f".{base}.tmp-"):
            pid = entry[len(f".{base}.tmp-"):].split("-", 1)[0]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
        elif not entry.startswith(f".{base}.old-"):
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def make_mixture(root, *, seed=0, preset="default", overwrite=False):
    """Write the synthetic mixture of COCO-format datasets under ``root``.

    Parameters
    ----------
    root : str or os.PathLike
        Output directory. It must not exist, or hold a mixture written with the
        same ``seed`` and ``preset`` (then nothing is rewritten), or
        ``overwrite`` must be true.
    seed : int
        Seed of every random choice; the same seed gives the same bytes.
    preset : {"default", "tiny"}
        Image counts (see the module docstring).
    overwrite : bool
        Replace an existing, different ``root``.

    Returns
    -------
    dict
        ``{"root", "seed", "preset", "version", "datasets": [{"name", "img_dir",
        "train", "val", "num_train", "num_val", "categories": [{"id", "name"}],
        "image_size": [W, H], "object_scale", "objects_per_image", "style"}]}``
        with absolute paths.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    root = os.path.abspath(os.fspath(root))
    desc = _description(root, seed, preset)
    manifest = os.path.join(root, "mixture.json")
    if os.path.exists(root) and not overwrite:
        if os.path.isdir(root) and not os.listdir(root):
            pass  # an empty directory is as good as none
        else:
            try:
                with open(manifest, encoding="utf-8") as f:
                    existing = json.load(f)
            except (OSError, ValueError):
                existing = None
            if existing == _relative(desc):
                return desc
            raise FileExistsError(
                f"{root}: exists and does not hold the synthetic mixture with "
                f"seed={seed} preset={preset!r}; pass overwrite=True or another root")

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, os.path.basename(root))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-{os.getpid()}-", dir=parent)
    try:
        counts = PRESETS[preset]
        for index, spec in enumerate(_DATASETS):
            ds_dir = os.path.join(tmp, spec["name"])
            os.makedirs(os.path.join(ds_dir, "images"))
            os.makedirs(os.path.join(ds_dir, "annotations"))
            for split_index, split in enumerate(("train", "val")):
                rng = np.random.default_rng([int(seed), index, split_index])
                coco = _write_split(spec, split, counts[spec["name"]][split_index], rng, ds_dir)
                _write_json(os.path.join(ds_dir, "annotations", f"{split}.json"), coco)
        _write_json(os.path.join(tmp, "mixture.json"), _relative(desc))
        if not overwrite and _holds(root, desc):  # another process wrote the same mixture meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return desc
        if os.path.exists(root):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.rename(root, os.path.join(old, "x"))
            try:
                os.rename(tmp, root)
            except BaseException:
                os.rename(os.path.join(old, "x"), root)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return desc
