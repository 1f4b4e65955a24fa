"""Saving and loading state dicts as .npz files, never with pickle."""
import os

import numpy as np

__all__ = ["save", "load"]


def save(obj, path):
    """Write a Module's ``state_dict()`` (or a dict of arrays / numbers) to ``path`` (.npz).

    Keys are the dotted names; values must be numeric arrays (object arrays are
    refused, so the file loads with ``allow_pickle=False``).
    """
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    if not isinstance(state, dict):
        raise TypeError(f"save: expected a Module, an optimizer or a dict of arrays, got {type(obj).__name__}")
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"save: keys must be strings, got {key!r}")
        a = np.asarray(value.data if hasattr(value, "data") and not isinstance(value, np.ndarray) else value)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"save: {key} has dtype {a.dtype}; only numeric and boolean arrays are stored")
        arrays[key] = a
    path = os.fspath(path)
    with open(path, "wb") as f:   # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)


def load(path):
    """Read a file written by :func:`save` into a dict of NumPy arrays (``allow_pickle=False``)."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
