"""Model weights in and out, without torch: PyTorch ``.pth``/``.pt`` files, safetensors, npz.

``read(path)`` gives a flat ``{name: ndarray}`` state dict from

* ``.pth`` / ``.pt`` / ``.bin`` / ``.tar``: PyTorch's zip format (``torch.save`` since 1.6).
  ``data.pkl`` is read by a restricted unpickler that knows only what rebuilds
  tensors and plain containers (``torch._utils._rebuild_tensor_v2``,
  ``_rebuild_parameter``, the ``torch.*Storage`` types, ``collections.OrderedDict``,
  ``set``/``frozenset``, latin-1 ``bytes``) plus ``argparse.Namespace``, which
  becomes an inert :class:`InertNamespace` holding the pickled fields (no user
  code runs).  Any other global - ``os.system``, a model class, a NumPy scalar -
  is refused *before* anything calls it, with an error naming the file and the
  global.  Tensor data comes from the zip's ``data/N`` records with
  ``numpy.frombuffer`` (dtype, shape, strides and offset as pickled; bfloat16
  becomes float32).  The legacy pre-1.6 format and TorchScript archives are
  refused with an error saying what to do.
* ``.safetensors``: the ``safetensors`` package's NumPy API.
* ``.npz``: ``numpy.load(allow_pickle=False)``.

A checkpoint that is a dict holding more than arrays (``{"model": ..., "args":
..., "epoch": ...}`` as DETR/DINO's main.py saves) gives its ``"model"`` entry
(or the entry named by ``key``); :func:`read_checkpoint` returns the whole
unpickled object.

``write(path, state_dict, metadata)`` writes ``.safetensors`` atomically (a
temporary file renamed into place) with each metadata value stored as JSON, so
a weights file carries the model config and label space it belongs to
(:func:`read_metadata`).  :func:`load_pretrained` loads what fits into a model
and reports what it loaded, skipped, missed and could not load.
"""
import collections
import io
import json
import os
import pickle
import zipfile

import numpy as np

__all__ = ["WeightsError", "InertNamespace", "read", "read_checkpoint", "read_metadata", "write",
           "load_pretrained", "LoadReport"]


class WeightsError(ValueError):
    """A weights file that cannot be read (corrupt, truncated, unsupported or unsafe)."""


# ----------------------------------------------------------------- the unpickler

class InertNamespace:
    """What an ``argparse.Namespace`` in a checkpoint becomes: its pickled fields in
    ``.fields`` (a dict), attribute access to them, and nothing executed."""

    def __setstate__(self, state):
        object.__setattr__(self, "fields", dict(state) if isinstance(state, dict) else {})

    def __getattr__(self, name):
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def __repr__(self):
        return f"InertNamespace({self.__dict__.get('fields', {})!r})"


class _StorageType:
    """A ``torch.<Name>Storage`` global: only says which dtype the records hold."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


# torch storage class -> dtype of its records ("bfloat16" is widened to float32)
_STORAGES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}


class _Storage:
    """One storage record: a flat array of its dtype (bfloat16 kept as uint16 bits)."""

    def __init__(self, flat, bfloat16):
        self.flat, self.bfloat16 = flat, bfloat16


def _check_strided(storage, offset, size, stride, where):
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise WeightsError(f"{where}: a tensor has size {size} and stride {stride}")
    n = storage.flat.size
    if 0 not in size:
        last = int(offset) + sum((s - 1) * st for s, st in zip(size, stride))
        if offset < 0 or last >= n:
            raise WeightsError(f"{where}: a tensor (offset {offset}, size {size}, stride {stride}) "
                               f"reaches past its storage of {n} elements (truncated or corrupt file)")
    return size, stride


def _rebuild_array(where, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
        raise WeightsError(f"{where}: a tensor's storage is {type(storage).__name__}, not a storage record")
    size, stride = _check_strided(storage, offset, size, stride, where)
    flat = storage.flat
    if 0 in size:
        out = np.zeros(size, flat.dtype)
    else:
        item = flat.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(flat[int(offset):], size, tuple(s * item for s in stride),
                                              writeable=False).copy()
    if storage.bfloat16:   # bfloat16 = the high 16 bits of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)   # C-contiguous (a copy)


class _Unpickler(pickle.Unpickler):
    """Rebuilds arrays and plain containers; refuses every other global unexecuted."""

    def __init__(self, file, where, records, byteorder):
        super().__init__(file)
        self.where, self.records, self.byteorder, self.cache = where, records, byteorder, {}

    def find_class(self, module, name):
        where = self.where
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: _rebuild_array(
                where, storage, offset, size, stride)
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *rest: data
        if module == "torch" and name in _STORAGES:
            return _StorageType(name, _STORAGES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return set if name == "set" else frozenset
        if module == "_codecs" and name == "encode":
            return _latin1_bytes
        if module == "argparse" and name == "Namespace":
            return InertNamespace
        raise WeightsError(f"{where}: refusing to unpickle the global {module}.{name} (only tensors and "
                           f"plain containers are read; nothing in the file was executed)")

    def persistent_load(self, pid):
        where = self.where
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise WeightsError(f"{where}: unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if key in self.cache:
            return self.cache[key]
        name = f"data/{key}"
        if name not in self.records:
            raise WeightsError(f"{where}: storage record {name} is missing (truncated or corrupt file)")
        raw = self.records[name]()
        bf16 = stype.dtype == "bfloat16"
        dtype = np.dtype("<u2" if bf16 else stype.dtype)
        if self.byteorder == "big":
            dtype = dtype.newbyteorder(">")
        if stype.name == "UntypedStorage":
            numel = len(raw)
        if len(raw) != int(numel) * dtype.itemsize:
            raise WeightsError(f"{where}: storage record {name} has {len(raw)} bytes, expected "
                               f"{int(numel)} x {dtype.itemsize} (truncated or corrupt file)")
        st = _Storage(np.frombuffer(raw, dtype), bf16)
        self.cache[key] = st
        return st


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise WeightsError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _read_torch_zip(path):
    where = os.fspath(path)
    with open(where, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(where):
        if head[:1] == b"\x80" or head[:2] == b"\x1f\x8b":
            raise WeightsError(f"{where}: this is PyTorch's legacy (pre-1.6, non-zip) format, which damex "
                               f"does not read; re-save it with torch >= 1.6: "
                               f"torch.save(torch.load(p, weights_only=True), p2)")
        if head.startswith(b"PK"):
            raise WeightsError(f"{where}: a truncated or corrupt zip archive")
        raise WeightsError(f"{where}: not a PyTorch zip checkpoint")
    try:
        zf = zipfile.ZipFile(where)
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{where}: a corrupt zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if not pkls:
            if any(n.endswith("constants.pkl") for n in names):
                raise WeightsError(f"{where}: a TorchScript archive (torch.jit.save); save the "
                                   f"state_dict with torch.save instead")
            raise WeightsError(f"{where}: no data.pkl in the archive (not a torch.save file)")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        records = {n[len(prefix):]: (lambda n=n: zf.read(n)) for n in names if n.startswith(prefix + "data/")}
        try:
            return _Unpickler(io.BytesIO(zf.read(pkls[0])), where, records, byteorder).load()
        except WeightsError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
                AttributeError, IndexError, KeyError, OSError, RuntimeError) as e:
            # zlib/CRC errors are surfaced by zipfile as BadZipFile or OSError
            raise WeightsError(f"{where}: corrupt checkpoint ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------ read

def _suffix(path):
    return os.path.splitext(os.fspath(path))[1].lower()


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


def _format(where):
    """"torch", "safetensors", "npz" or None: by the suffix (``.pth-rank0`` as Tutel's per-rank
    files is torch), else by the content."""
    ext = _suffix(where)
    if ext in (".safetensors", ".npz"):
        return ext[1:]
    if ext in _TORCH_SUFFIXES or ext.split("-rank")[0] in _TORCH_SUFFIXES:
        return "torch"
    try:
        with zipfile.ZipFile(where) as zf:
            names = zf.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return "npz" if names and all(n.endswith(".npy") for n in names) else None
    except (zipfile.BadZipFile, OSError):
        pass
    with open(where, "rb") as f:
        head = f.read(9)
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else None


def read_checkpoint(path):
    """The whole object stored in a weights file.

    Parameters
    ----------
    path : str or PathLike
        ``.pth``/``.pt``/``.bin``/``.tar`` (PyTorch zip), ``.safetensors`` or ``.npz``.

    Returns
    -------
    object
        Nested dicts/lists/tuples of ``ndarray``, numbers, strings and
        :class:`InertNamespace`; a flat ``{name: ndarray}`` for safetensors and npz.

    Raises
    ------
    FileNotFoundError, WeightsError (a ValueError naming the file)
    """
    where = os.fspath(path)
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where}: no such weights file")
    kind = _format(where)
    if kind == "safetensors":
        from safetensors.numpy import load_file
        try:
            return dict(load_file(where))
        except Exception as e:   # safetensors raises its own SafetensorError and others
            raise WeightsError(f"{where}: not a readable safetensors file ({e})") from None
    if kind == "npz":
        try:
            with np.load(where, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise WeightsError(f"{where}: not a readable npz file ({e})") from None
    if kind == "torch":
        return _read_torch_zip(where)
    raise WeightsError(f"{where}: unknown weights format {_suffix(where)!r}; expected .pth, .pt, "
                       f".safetensors or .npz")


def _flatten(obj, prefix, out):
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, np.ndarray):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out)
    return out


def read(path, key=None):
    """A flat state dict ``{name: ndarray}`` from a weights file (see the module docstring).

    Parameters
    ----------
    path : str or PathLike
    key : str, optional
        The entry of a checkpoint dict holding the state dict; by default the
        file's top level if it holds only arrays, else its ``"model"`` or
        ``"state_dict"`` entry.

    Returns
    -------
    dict of str to ndarray
        Nested dicts are flattened with dotted names; non-array leaves are dropped.
    """
    where = os.fspath(path)
    return state_dict_of(read_checkpoint(where), where, key)


def state_dict_of(obj, where, key=None):
    """The flat ``{name: ndarray}`` state dict in an object a weights file held (see
    :func:`read`; ``where`` names the file in errors)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{where}: expected a state dict, found a {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise WeightsError(f"{where}: no entry {key!r}; entries: {sorted(map(str, obj))}")
        obj = obj[key]
    elif not all(isinstance(v, np.ndarray) for v in obj.values()):
        for k in ("model", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"{where}: entry {key!r} is a {type(obj).__name__}, not a state dict")
    return _flatten(obj, "", collections.OrderedDict())


def read_metadata(path):
    """The metadata of a ``.safetensors`` file, each value decoded from JSON where it is JSON."""
    where = os.fspath(path)
    from safetensors import safe_open
    try:
        with safe_open(where, framework="numpy") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise WeightsError(f"{where}: not a readable safetensors file ({e})") from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


# ----------------------------------------------------------------------- write

def write(path, state_dict, metadata=None):
    """Write a state dict as ``.safetensors``, atomically, with JSON metadata.

    Parameters
    ----------
    path : str or PathLike, ending in ``.safetensors``
    state_dict : dict of str to array-like (numeric or bool), or a Module
    metadata : dict of str to JSON-serialisable, optional
        E.g. ``{"config": dataclasses.asdict(cfg), "label_space": [...]}``;
        every value is stored as its JSON text (read back by :func:`read_metadata`).
    """
    from safetensors.numpy import save_file
    where = os.fspath(path)
    if _suffix(where) != ".safetensors":
        raise ValueError(f"{where}: damex writes weights as .safetensors")
    if hasattr(state_dict, "state_dict"):
        state_dict = state_dict.state_dict()
    arrays = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise TypeError(f"write: keys must be strings, got {k!r}")
        a = np.asarray(getattr(v, "data", v) if not isinstance(v, np.ndarray) else v)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"write: {k} has dtype {a.dtype}; only numeric and boolean arrays are stored")
        arrays[k] = np.ascontiguousarray(a)
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = f"{where}.tmp-{os.getpid()}"
    try:
        save_file(arrays, tmp, metadata=meta)
        os.replace(tmp, where)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return where


# ------------------------------------------------------------- load_pretrained

class LoadReport:
    """What :func:`load_pretrained` did: key lists ``loaded``, ``skipped``, ``missing``
    (in the model, not in the file), ``unexpected`` (in the file, not in the model) and
    ``mismatched`` (``(key, file_shape, model_shape)``)."""

    def __init__(self, source):
        self.source = source
        self.loaded, self.skipped, self.missing, self.unexpected, self.mismatched = [], [], [], [], []

    def as_dict(self):
        return {"source": self.source, "loaded": self.loaded, "skipped": self.skipped,
                "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": [list(m) for m in self.mismatched]}

    def __str__(self):
        def some(keys, n=8):
            keys = [str(k) for k in keys]
            return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
        total = len(self.loaded) + len(self.skipped) + len(self.missing) + len(self.mismatched)
        lines = [f"load_pretrained {self.source}: loaded {len(self.loaded)} of {total} model arrays"]
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}): {some(self.skipped)}")
        if self.mismatched:
            lines.append(f"  shape mismatch, not loaded ({len(self.mismatched)}): " + some(
                [f"{k} file {tuple(a)} model {tuple(b)}" for k, a, b in self.mismatched], 4))
        if self.missing:
            lines.append(f"  missing from the file, left as initialised ({len(self.missing)}): "
                         f"{some(self.missing)}")
        if self.unexpected:
            lines.append(f"  in the file, not in the model ({len(self.unexpected)}): "
                         f"{some(self.unexpected)}")
        return "\n".join(lines)


def load_pretrained(model, path_or_dict, skip=("class_embed", "label_enc"), prefix="", verbose=True):
    """Load the arrays of a weights file that fit ``model``; report the rest.

    Parameters
    ----------
    model : damex.nn.Module
    path_or_dict : str, PathLike or dict of str to ndarray
        A weights file (anything :func:`read` reads) or a state dict.
    skip : sequence of str
        Model keys containing any of these substrings are not loaded (the defaults
        are the parts sized by the number of classes, as when fine-tuning DINO on
        another label space; ``"class_embed"`` also matches ``enc_class_embed``).
    prefix : str
        Only file keys starting with ``prefix`` are used, with it removed (e.g.
        ``"backbone."`` to load a detector's backbone into a bare ResNet).
    verbose : bool
        Print the report.

    Returns
    -------
    LoadReport
    """
    if isinstance(path_or_dict, dict):
        state, source = path_or_dict, "<state dict>"
    else:
        source = os.fspath(path_or_dict)
        state = read(source)
    report = LoadReport(source)
    if prefix:
        report.unexpected += [k for k in state if not k.startswith(prefix)]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model_state = model.state_dict()
    report.unexpected += [k for k in state if k not in model_state]
    fits = {}
    for key, cur in model_state.items():
        if any(s in key for s in skip):
            report.skipped.append(key)
        elif key not in state:
            report.missing.append(key)
        elif tuple(np.shape(state[key])) != cur.shape:
            report.mismatched.append((key, tuple(np.shape(state[key])), cur.shape))
        else:
            fits[key] = np.asarray(state[key]).astype(cur.dtype, copy=False)
            report.loaded.append(key)
    model.load_state_dict(fits, strict=False)
    if verbose:
        print(report)
    return report
