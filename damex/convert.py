"""Converting weights other programs saved into damex's names: ``damex convert SRC DST --from KIND``.

Every converter takes the object stored in the source file (what
:func:`damex.weights.read_checkpoint` returns) and the source path, and returns
``(state_dict, metadata)``; :func:`convert` writes them as ``.safetensors``
with the metadata (plus ``source`` and ``converted_from``) as JSON.  Adding a
source is one line in :data:`CONVERTERS`.

``torchvision-resnet18/34/50/101``: a torchvision ImageNet ``state_dict`` (e.g.
``resnet50-0676ba61.pth`` / ``resnet50-11ad3fa6.pth``, downloaded by the user;
damex never downloads).  ``fc.*`` and ``num_batches_tracked`` are dropped; the
other names are already damex's (:mod:`damex.models.backbone` uses torchvision's
module names), and the result is checked key for key and shape for shape
against ``damex.models.backbone.resnetN()``.  The output holds the backbone
*standalone* (``conv1.weight``, ``layer1.0.conv1.weight``, ...): it loads into
``resnetN()`` directly, and into a detector through ``model.backbone_weights``
(which loads it into ``model.backbone``).

``dino``: an IDEA-Research/DINO checkpoint as its ``main.py`` saves it;
``damex-official``: a jinga-lala/DAMEX checkpoint (one file per rank, each with that
rank's Tutel experts; give any rank's file).  Both give damex's whole DINO state
dict (key map in :mod:`damex.convert_dino`) and the config fields inferred from the
shapes in the metadata (``"config"``), for ``model.pretrained``.
"""
import importlib
import os
import re
from functools import partial

import numpy as np

from . import weights

__all__ = ["CONVERTERS", "convert", "torchvision_resnet"]


def torchvision_resnet(arch, obj, src):
    """A torchvision ``resnetN`` state dict -> damex's standalone backbone names.

    Parameters
    ----------
    arch : {"resnet18", "resnet34", "resnet50", "resnet101"}
    obj : the stored object (a state dict, possibly with a ``module.`` prefix)
    src : str, the source path (for messages)

    Returns
    -------
    state : dict of str to ndarray;  metadata : dict
    """
    from .models import backbone
    state = weights.state_dict_of(obj, src)
    if state and all(k.startswith("module.") for k in state):   # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    out = {k: v for k, v in state.items()
           if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
    want = getattr(backbone, arch)().state_dict()
    missing = [k for k in want if k not in out]
    extra = [k for k in out if k not in want]
    bad = [f"{k} {out[k].shape} (expected {want[k].shape})" for k in want
           if k in out and out[k].shape != want[k].shape]
    if missing or extra or bad:
        parts = [f"missing {missing[:6]}" if missing else "", f"unexpected {extra[:6]}" if extra else "",
                 f"wrong shapes {bad[:4]}" if bad else ""]
        raise ValueError(f"{src}: not a torchvision {arch} state dict: "
                         + "; ".join(p for p in parts if p))
    out = {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in want}
    return out, {"kind": "backbone", "arch": arch, "norm": "frozen_bn"}


def official_dino(obj, src, n_heads=8):
    """An IDEA-Research/DINO checkpoint (``{"model": ..., "args": ...}``; ``args`` is never
    read) -> damex's whole DINO, with the config fields inferred from the shapes as metadata."""
    from .convert_dino import convert_dino_state_dict
    state, cfg = convert_dino_state_dict(obj, n_heads=n_heads)
    return state, {"kind": "model", "config": _jsonable(cfg)}


def _rank_files(src):
    """``checkpoint.pth-rank0`` -> every ``checkpoint.pth-rankN`` beside it, in rank order."""
    m = re.match(r"(.*)-rank(\d+)$", src)
    if not m:
        return [src]
    folder = os.path.dirname(os.path.abspath(src))
    stem = os.path.basename(m.group(1))
    ranks = sorted(int(r.group(1)) for n in os.listdir(folder)
                   for r in [re.fullmatch(re.escape(stem) + r"-rank(\d+)", n)] if r)
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{src}: DAMEX rank files beside it are ranks {ranks}; expected 0..N-1, all present")
    return [os.path.join(folder, f"{stem}-rank{r}") for r in ranks]


def official_damex(obj, src, n_heads=8):
    """A jinga-lala/DAMEX checkpoint, saved once per rank with that rank's Tutel experts:
    give any ``...-rankN`` file; all ranks beside it are read and their experts gathered."""
    from .convert_dino import convert_damex_state_dicts
    files = _rank_files(src)
    objs = [obj if os.path.abspath(f) == os.path.abspath(src) else weights.read_checkpoint(f)
            for f in files]
    state, cfg = convert_damex_state_dicts(objs, n_heads=n_heads)
    return state, {"kind": "model", "config": _jsonable(cfg), "ranks": len(files)}


def _jsonable(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _lazy(module, name):
    """A converter living in another module, imported when used (no import cycles)."""
    def converter(obj, src):
        return getattr(importlib.import_module(module), name)(obj, src)
    return converter


# source kind -> converter(obj, src) -> (state_dict, metadata); one line per source
CONVERTERS = {
    "torchvision-resnet18": partial(torchvision_resnet, "resnet18"),
    "torchvision-resnet34": partial(torchvision_resnet, "resnet34"),
    "torchvision-resnet50": partial(torchvision_resnet, "resnet50"),
    "torchvision-resnet101": partial(torchvision_resnet, "resnet101"),
    "dino": official_dino,
    "damex-official": official_damex,
}
# converters that take the number of attention heads (not recoverable from the shapes)
TAKES_HEADS = ("dino", "damex-official")


def convert(src, dst, source, n_heads=None):
    """Convert the weights file ``src`` of kind ``source`` into damex's ``dst`` (.safetensors).

    Parameters
    ----------
    src : str or PathLike, a file :func:`damex.weights.read_checkpoint` reads
    dst : str or PathLike, ending in ``.safetensors``
    source : str, a key of :data:`CONVERTERS`
    n_heads : int, optional
        Attention heads, for ``dino`` / ``damex-official`` (default 8, as both references).

    Returns
    -------
    dict : ``{"dst": path, "arrays": n, "parameters": n_values, "metadata": {...}}``
    """
    if source not in CONVERTERS:
        raise ValueError(f"--from: expected one of {sorted(CONVERTERS)}, got {source!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    if not dst.endswith(".safetensors"):
        raise ValueError(f"{dst}: the converted weights are written as .safetensors")
    extra = {"n_heads": int(n_heads)} if n_heads is not None and source in TAKES_HEADS else {}
    state, meta = CONVERTERS[source](weights.read_checkpoint(src), src, **extra)
    meta = dict(meta, source=source, converted_from=os.path.basename(src))
    weights.write(dst, state, meta)
    return {"dst": dst, "arrays": len(state), "parameters": int(sum(v.size for v in state.values())),
            "metadata": meta}
