"""Checkpoints without pickle: one ``.npz`` holding the model's state dict
(``model.*``), the optimizer's (``optim.*``), the LR schedule's (``sched.*``)
and a JSON ``meta`` string (run configuration, step, label space, history).

Files are written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint under the real name.
"""
import json
import os

import numpy as np

PREFIXES = ("model.", "optim.", "sched.")


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, meta=None):
    """Write a checkpoint atomically; returns the path."""
    path = os.fspath(path)
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim.{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    if scheduler is not None:
        arrays.update({f"sched.{k}": np.asarray(v) for k, v in scheduler.state_dict().items()})
    arrays["meta"] = np.array(json.dumps(meta or {}))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path):
    """Read a checkpoint: ``(parts, meta)`` with ``parts[prefix]`` a dict of arrays per
    prefix ("model", "optim", "sched")."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / format errors
        raise ValueError(f"{path}: not a damex checkpoint ({e})") from None
    if "meta" not in data:
        raise ValueError(f"{path}: not a damex checkpoint (no 'meta' entry)")
    meta = json.loads(str(data.pop("meta")))
    parts = {p[:-1]: {} for p in PREFIXES}
    for key, value in data.items():
        for p in PREFIXES:
            if key.startswith(p):
                parts[p[:-1]][key[len(p):]] = value
                break
        else:
            raise ValueError(f"{path}: unexpected entry {key!r}")
    return parts, meta
