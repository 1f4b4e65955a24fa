"""A run folder: what is in it, and the rules that keep runs from overwriting each other.

Layout of ``out_dir``::

    log.jsonl                 one JSON record per training step (validation inside its step)
    checkpoint.npz            the latest checkpoint (what ``--resume`` takes)
    checkpoint_000500.npz     numbered checkpoints, the last ``keep_last`` kept
    best.npz                  the checkpoint of the best validation mean AP (with ``eval_every``)
    tensorboard/              TensorBoard event files (with ``train.tensorboard``)
    results.json, pictures/   written by ``damex run``

* :func:`claim` starts a new run: it refuses a folder that already holds a run
  (unless ``overwrite``, which removes that run's files first) and creates the
  folder before any work starts.
* :func:`cut_log` makes a resumed run's log hold exactly the checkpoint's steps.
"""
import glob
import json
import os
import re
import shutil

LOG = "log.jsonl"
LATEST = "checkpoint.npz"
BEST = "best.npz"
_NUMBERED = re.compile(r"^checkpoint_(\d+)\.npz$")


class RunDirError(ValueError):
    """A run folder cannot be used as asked (message says what to do)."""


def run_files(out_dir):
    """The files of a run in ``out_dir`` (log and checkpoints), sorted."""
    if not os.path.isdir(out_dir):
        return []
    names = [LOG, LATEST, BEST, "results.json"] + [n for n in os.listdir(out_dir) if _NUMBERED.match(n)]
    return sorted(os.path.join(out_dir, n) for n in set(names) if os.path.exists(os.path.join(out_dir, n)))


def claim(out_dir, overwrite=False):
    """Create ``out_dir`` for a new run; RunDirError if it already holds one (unless
    ``overwrite``: then that run's log, checkpoints and results are removed)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"{out_dir}: exists and is not a folder")
    existing = run_files(out_dir)
    if existing and not overwrite:
        raise RunDirError(f"{out_dir} already holds a run ({', '.join(os.path.basename(p) for p in existing)}); "
                          f"continue it with `damex train --resume {os.path.join(out_dir, LATEST)}`, "
                          "choose another folder (--out DIR) or pass --overwrite to replace it")
    for p in existing:
        os.remove(p)
    if overwrite and os.path.isdir(os.path.join(out_dir, "tensorboard")):
        shutil.rmtree(os.path.join(out_dir, "tensorboard"))
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def abandon(out_dir):
    """A new run that failed before its first step: remove its empty log, and the folder
    if nothing else is in it, so that no half-written run is left behind."""
    log = os.path.join(out_dir, LOG)
    if os.path.isfile(log) and os.path.getsize(log) == 0:
        os.remove(log)
    try:
        os.rmdir(out_dir)          # only when empty
    except OSError:
        pass


class EventWriter:
    """TensorBoard scalars of the log records (through tensorboardX, the optional
    ``damex[tensorboard]`` extra): every numeric key, and ``val/...`` for validation."""

    def __init__(self, out_dir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise RunDirError("train.tensorboard needs tensorboardX: pip install 'damex[tensorboard]' "
                              "(or tensorboardX)") from None
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def add(self, rec):
        step = rec["step"]
        for key, v in rec.items():
            if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(key, v, step)
        val = rec.get("val") or {}
        for key, v in [("mean_ap", val.get("mean_ap")), ("routing_accuracy", val.get("routing_accuracy"))] + \
                [(f"ap/{k}", a) for k, a in (val.get("ap") or {}).items()]:
            if v is not None:
                self.writer.add_scalar(f"val/{key}", v, step)

    def close(self):
        self.writer.close()


def write_log(out_dir, history):
    """Rewrite ``log.jsonl`` to hold exactly ``history`` (atomically)."""
    path = os.path.join(out_dir, LOG)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


def cut_log(out_dir, history, step):
    """A resumed run: the log gets the checkpoint's records, steps 1..``step``, once each."""
    os.makedirs(out_dir, exist_ok=True)
    return write_log(out_dir, [r for r in history if r.get("step", 0) <= step])


def numbered(out_dir, step):
    return os.path.join(out_dir, f"checkpoint_{int(step):06d}.npz")


def publish(path, out_dir, name):
    """Copy checkpoint ``path`` to ``out_dir/name`` atomically (latest, best)."""
    dst = os.path.join(out_dir, name)
    tmp = dst + ".tmp.npz"
    shutil.copyfile(path, tmp)
    os.replace(tmp, dst)
    return dst


def prune(out_dir, keep_last):
    """Remove all but the ``keep_last`` newest numbered checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return []
    found = sorted(glob.glob(os.path.join(out_dir, "checkpoint_*.npz")))
    found = [p for p in found if _NUMBERED.match(os.path.basename(p))]
    gone = found[:-keep_last]
    for p in gone:
        os.remove(p)
    return gone
