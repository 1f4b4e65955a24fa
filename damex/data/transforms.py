"""Detection transforms: ``t(image, target) -> (image, target)``.

Boxes in targets are normalised ``(cx, cy, w, h)`` relative to the image, so
resizing leaves them unchanged (only ``target["size"]`` changes) and a
horizontal flip maps ``cx -> 1 - cx``. Images are PIL images until
:class:`ToArray`, then float32 ``[3, H, W]`` arrays in [0, 1] (:func:`model_image`
says how each image mode maps there, 16-bit grayscale included). Random
transforms take a seed or a ``numpy.random.Generator``: the same seed and call
order give the same result. Targets are copied, never mutated.
"""
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _image_hw(image):
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    return tuple(image.shape[-2:])


class Compose:
    """Apply transforms in order.  ``rng`` (a Generator), when given, drives every random
    transform of this call instead of their own Generators: the trainer hands each image
    its own stream, derived from (seed, step, image), so a step replays exactly."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng=None):
        for t in self.transforms:
            image, target = t(image, target, rng=rng)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def resized_hw(h, w, size, max_size=None):
    """``(H', W')`` with the shorter side ``size`` and the longer at most ``max_size``."""
    short, long_ = min(h, w), max(h, w)
    scale = size / short
    if max_size is not None and long_ * scale > max_size:
        scale = max_size / long_
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class Resize:
    """Resize so the shorter side is ``size`` (one of ``sizes``, drawn at random).

    Parameters
    ----------
    sizes : int or sequence of int
        Shorter-side target; with several, one is drawn per call (multi-scale).
    max_size : int, optional
        Cap on the longer side (the aspect ratio is kept).
    seed : int or numpy.random.Generator, optional
        Drives the choice among ``sizes``.
    """

    def __init__(self, sizes, max_size=None, seed=None):
        self.sizes = [int(sizes)] if np.isscalar(sizes) else [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"Resize: sizes must be positive, got {sizes!r}")
        self.max_size = None if max_size is None else int(max_size)
        self.rng = _rng(seed)

    def __call__(self, image, target, rng=None):
        if not isinstance(image, Image.Image):
            raise TypeError("Resize expects a PIL image (put it before ToArray)")
        rng = self.rng if rng is None else rng
        size = self.sizes[int(rng.integers(len(self.sizes)))] if len(self.sizes) > 1 else self.sizes[0]
        h, w = _image_hw(image)
        nh, nw = resized_hw(h, w, size, self.max_size)
        if (nh, nw) != (h, w):
            image = image.resize((nw, nh), Image.Resampling.BILINEAR)
        target = dict(target)
        target["size"] = np.array([nh, nw], dtype=np.int64)
        return image, target

    def __repr__(self):
        return f"Resize(sizes={self.sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability ``p``."""

    def __init__(self, p=0.5, seed=None):
        self.p = float(p)
        self.rng = _rng(seed)

    def __call__(self, image, target, rng=None):
        if (self.rng if rng is None else rng).random() >= self.p:
            return image, target
        if isinstance(image, Image.Image):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = np.ascontiguousarray(image[..., ::-1])
        target = dict(target)
        boxes = np.array(target["boxes"], dtype=np.float32, copy=True)
        if len(boxes):
            boxes[:, 0] = 1.0 - boxes[:, 0]
        target["boxes"] = boxes
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


def model_image(image):
    """A PIL image of any mode as the model reads it: "RGB" (8 bits) or "F" in [0, 1].

    8-bit modes (1, L, LA, P, PA, RGBA, CMYK, YCbCr, ...) convert to RGB (alpha
    dropped). High-depth grayscale keeps its full range as float32 in [0, 1]:
    16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) divided by 65535, 32-bit
    integers (``I``) likewise when they fit in 0..65535, floats (``F``) as they
    are when in [0, 1]. Other values have no known range: ValueError.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F":
            if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
                raise ValueError(f"float image (mode F) with values in [{lo}, {hi}]; only [0, 1] has "
                                 f"a known range (convert it to 8 or 16 bits, or scale it to [0, 1])")
            return Image.fromarray(a.astype(np.float32))
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit integer image (mode {mode}) with values in [{lo:g}, {hi:g}]; only "
                             f"0..65535 (16 bits) has a known range (convert it to 8 or 16 bits)")
        return Image.fromarray((a.astype(np.float64) / 65535.0).astype(np.float32))
    return image.convert("RGB")


class ToArray:
    """PIL image -> float32 ``[3, H, W]`` in [0, 1] (any mode, see :func:`model_image`;
    grayscale is repeated over the 3 channels); an ``[H, W, 3]`` uint8 array is divided by 255."""

    def __call__(self, image, target, rng=None):
        if isinstance(image, Image.Image):
            image = model_image(image)
            if image.mode == "F":
                a = np.asarray(image, dtype=np.float32)
                return np.ascontiguousarray(np.broadcast_to(a, (3,) + a.shape)), target
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"ToArray: expected an RGB image [H, W, 3], got shape {arr.shape}")
        return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0), target

    def __repr__(self):
        return "ToArray()"


class Normalize:
    """``(x - mean) / std`` per channel on a float32 ``[3, H, W]`` array (ImageNet by default)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image, target, rng=None):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] != 3:
            raise TypeError("Normalize expects a float32 [3, H, W] array (put it after ToArray)")
        return ((image - self.mean) / self.std).astype(np.float32), target

    def __repr__(self):
        return "Normalize()"


def default_transforms(train, min_size=64, max_size=96, hflip=0.5, normalize=True, seed=0,
                       multiscale=None):
    """The usual pipeline: [multi-scale] resize, flip (train only), to array, normalise.

    ``multiscale`` (train only): extra shorter-side sizes to draw from.
    """
    rng = np.random.default_rng(seed)
    sizes = [min_size] + list(multiscale or []) if train else [min_size]
    ts = [Resize(sizes, max_size, seed=rng)]
    if train and hflip > 0:
        ts.append(RandomHorizontalFlip(hflip, seed=rng))
    ts.append(ToArray())
    if normalize:
        ts.append(Normalize())
    return Compose(ts)
