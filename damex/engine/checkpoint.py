"""Checkpoints without pickle: one ``.npz`` holding the model's state dict
(``model.*``), the optimizer's (``optim.*``), the LR schedule's (``sched.*``)
and a JSON ``meta`` string (run configuration, step, label space, history).

Files are written to a temporary name (``<path>.tmp.npz``), flushed to disk and
renamed, and the folder is synced, so a crash never leaves a half-written
checkpoint under the real name; a temporary left by a kill is removed by
:func:`remove_stale_temp` (the trainer calls it when it starts) and by the next
save. Every problem found when reading one is a :class:`CheckpointError`
naming the file and what is wrong.
"""
import json
import os
import re

import numpy as np

PREFIXES = ("model.", "optim.", "sched.")
FORMAT = "damex-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file is damaged, malformed or does not fit the run (message names the file)."""


def _fail(path, problem):
    err = CheckpointError(f"{path}: {problem}")
    err.__suppress_context__ = True   # the message says it all; no chained traceback
    raise err


def temp_path(path):
    """The temporary name a checkpoint is written under before its rename."""
    return os.fspath(path) + ".tmp.npz"


def remove_stale_temp(path):
    """Remove the temporary of ``path`` left by a save that was killed; True if there was one."""
    tmp = temp_path(path)
    if os.path.isfile(tmp):
        os.remove(tmp)
        return True
    return False


def _fsync_dir(folder):
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, meta=None):
    """Write a checkpoint atomically and durably; returns the path."""
    path = os.fspath(path)
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim.{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    if scheduler is not None:
        arrays.update({f"sched.{k}": np.asarray(v) for k, v in scheduler.state_dict().items()})
    arrays["meta"] = np.array(json.dumps(meta or {}))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path):
    """Read and check a checkpoint: ``(parts, meta)`` with ``parts[prefix]`` a dict of
    arrays per prefix ("model", "optim", "sched").

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        Not a readable ``.npz`` (truncated, damaged, another format), an entry
        that is not a numeric array or has an unknown name, no model entries,
        a ``meta`` that is missing, not JSON, or not the damex layout
        (``step`` >= 0, ``config`` object; if present, ``format`` this
        version's and ``history`` a list).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        _fail(path, "is a folder, not a checkpoint file")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):   # a plain .npy file gives one array
            _fail(path, "not a damex checkpoint (a single .npy array, not an .npz archive)")
        with z:
            data = {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except Exception as e:  # zipfile / zlib / format errors
        _fail(path, f"not a readable damex checkpoint (truncated, damaged or not an .npz file: "
                    f"{type(e).__name__}: {e})")
    if "meta" not in data:
        _fail(path, "not a damex checkpoint (no 'meta' entry)")
    meta = _parse_meta(path, data.pop("meta"))
    parts = {p[:-1]: {} for p in PREFIXES}
    for key, value in data.items():
        for p in PREFIXES:
            if key.startswith(p) and len(key) > len(p):
                parts[p[:-1]][key[len(p):]] = value
                break
        else:
            _fail(path, f"unexpected entry {key!r} (entries are meta, model.*, optim.*, sched.*)")
        if value.dtype.kind not in "biuf":
            _fail(path, f"entry {key!r} has dtype {value.dtype}; checkpoint entries are numeric arrays")
    if not parts["model"]:
        _fail(path, "no model entries (model.*)")
    return parts, meta


def _parse_meta(path, entry):
    if entry.ndim != 0 or entry.dtype.kind != "U":
        _fail(path, f"the 'meta' entry must be a JSON string, got an array of dtype {entry.dtype} "
                    f"and shape {entry.shape}")
    try:
        meta = json.loads(str(entry))
    except json.JSONDecodeError as e:
        _fail(path, f"the 'meta' entry is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not isinstance(meta, dict):
        _fail(path, f"the 'meta' entry must be a JSON object, got {type(meta).__name__}")
    if meta.get("format", FORMAT) != FORMAT:
        _fail(path, f"meta 'format' is {meta['format']!r}, expected {FORMAT!r}")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        _fail(path, f"meta 'step' must be an integer >= 0, got {step!r}")
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("train", {}), dict):
        _fail(path, "meta 'config' must be a run configuration object (with a 'train' object)")
    if not isinstance(meta.get("history", []), list):
        _fail(path, "meta 'history' must be a list")
    return meta


_STATE_KEY = re.compile(r"state\.(\d+)\.(\w+)$")
_GROUP_KEY = re.compile(r"param_groups\.(\d+)\.(\w+)$")


def restore(path, parts, model, optimizer=None, scheduler=None, *, step=None, fresh_optimizer=False):
    """Load the ``parts`` of checkpoint ``path`` into a model, optimizer and scheduler.

    Every entry must fit: the model's keys and shapes exactly; the scheduler's
    keys exactly; the optimizer's parameter-group options all present and
    per-parameter state only for existing parameters, with the same names for
    each. A checkpoint without optimizer entries, or of a ``step`` > 0 without
    per-parameter state, is refused. ``fresh_optimizer=True`` leaves the
    optimizer as it is (zero moments), whatever the file holds.

    Raises
    ------
    CheckpointError
        Naming the file, the part and the entries that do not fit.
    """
    try:
        model.load_state_dict(parts["model"])
    except (RuntimeError, ValueError, TypeError) as e:
        _fail(path, f"the model entries do not fit the model: {e}")
    if optimizer is not None and not fresh_optimizer:
        _restore_optimizer(path, parts["optim"], optimizer, step)
    if scheduler is not None:
        want, got = set(scheduler.state_dict()), set(parts["sched"])
        if want != got:
            _fail(path, f"scheduler entries do not fit: missing {sorted(want - got)}, "
                        f"unexpected {sorted(got - want)}")
        try:
            scheduler.load_state_dict(parts["sched"])
        except (KeyError, ValueError, TypeError) as e:
            _fail(path, f"scheduler entries do not fit: {e}")


def _restore_optimizer(path, state, optimizer, step):
    if not state:
        _fail(path, "no optimizer entries (optim.*): resuming would restart the optimizer's "
                    "moments from zero; pass fresh_optimizer=True (damex train --fresh-optimizer) "
                    "to do that on purpose")
    nparams = sum(len(g["params"]) for g in optimizer.param_groups)
    fresh = optimizer.state_dict()
    want_groups = {k for k in fresh if k.startswith("param_groups.")}
    got_groups, names, bad = set(), {}, []
    for key in state:
        m = _GROUP_KEY.match(key)
        if m:
            if key in want_groups:
                got_groups.add(key)
            else:
                bad.append(key)
            continue
        m = _STATE_KEY.match(key)
        if m and int(m.group(1)) < nparams:
            names.setdefault(int(m.group(1)), set()).add(m.group(2))
        else:
            bad.append(key)
    if bad:
        _fail(path, f"unexpected optimizer entries {['optim.' + k for k in sorted(bad)[:5]]}"
                    f"{' ...' if len(bad) > 5 else ''} (the optimizer has {nparams} parameters in "
                    f"{len(optimizer.param_groups)} groups)")
    if want_groups - got_groups:
        _fail(path, f"missing optimizer entries {['optim.' + k for k in sorted(want_groups - got_groups)]}")
    for key in sorted(got_groups):
        if np.shape(state[key]) != np.shape(fresh[key]):
            _fail(path, f"optimizer entry optim.{key} has shape {np.shape(state[key])}, expected "
                        f"{np.shape(fresh[key])}")
    if len({frozenset(v) for v in names.values()}) > 1:
        i = min(names, key=lambda i: (len(names[i]), i))
        _fail(path, f"incomplete optimizer state for parameter {i}: has {sorted(names[i])}, others have "
                    f"{sorted(max(names.values(), key=len))}")
    if not names and step:
        _fail(path, f"no per-parameter optimizer state (optim.state.*) in a checkpoint of step {step}; "
                    "pass fresh_optimizer=True to resume without it")
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as e:
        _fail(path, f"optimizer entries do not fit: {str(e).strip(chr(39))}")
