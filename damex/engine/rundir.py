"""A run folder: what is in it, and the rules that keep runs from overwriting each other.

Layout of ``out_dir``::

    log.jsonl                 one JSON record per training step (validation inside its step)
    checkpoint.npz            the latest checkpoint (what ``--resume`` takes)
    checkpoint_000500.npz     numbered checkpoints, the last ``keep_last`` kept
    best.npz                  the checkpoint of the best validation mean AP (with ``eval_every``)
    tensorboard/              TensorBoard event files (with ``train.tensorboard``), rebuilt
                              from the log's records on resume: each step once
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
EVENTS = "tensorboard"
_NUMBERED = re.compile(r"^checkpoint_(\d+)\.npz$")


class RunDirError(ValueError):
    """A run folder cannot be used as asked (message says what to do)."""


def run_files(out_dir):
    """The files of a run in ``out_dir`` (log and checkpoints), sorted."""
    if not os.path.isdir(out_dir):
        return []
    names = [LOG, LATEST, BEST, "results.json"] + [n for n in os.listdir(out_dir) if _NUMBERED.match(n)]
    return sorted(os.path.join(out_dir, n) for n in set(names) if os.path.exists(os.path.join(out_dir, n)))


def claim(out_dir, overwrite=False, check_only=False):
    """Create ``out_dir`` for a new run; RunDirError if it already holds one (unless
    ``overwrite``: then that run's log, checkpoints, results and event files are removed).
    ``check_only``: only raise, change nothing."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"{out_dir}: exists and is not a folder")
    existing = run_files(out_dir)
    events = os.path.join(out_dir, EVENTS)
    found = [os.path.basename(p) for p in existing] + ([EVENTS + "/"] if os.path.isdir(events) else [])
    if found and not overwrite:
        raise RunDirError(f"{out_dir} already holds a run ({', '.join(found)}); "
                          f"continue it with `damex train --resume {os.path.join(out_dir, LATEST)}`, "
                          "choose another folder (--out DIR) or pass --overwrite to replace it")
    if check_only:
        return out_dir
    for p in existing:
        os.remove(p)
    if os.path.isdir(events):
        shutil.rmtree(events)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def abandon(out_dir):
    """A new run that failed before its first step: remove its empty log, and the folder
    if nothing else is in it, so that no half-written run is left behind."""
    log = os.path.join(out_dir, LOG)
    if os.path.isfile(log) and os.path.getsize(log) == 0:
        os.remove(log)
    shutil.rmtree(os.path.join(out_dir, EVENTS), ignore_errors=True)   # no step in them
    try:
        os.rmdir(out_dir)          # only when empty
    except OSError:
        pass


class EventWriter:
    """TensorBoard scalars of the log records (through tensorboardX, the optional
    ``damex[tensorboard]`` extra): every numeric key, and ``val/...`` for validation.

    The event files are a view of ``log.jsonl`` and, like the log, hold each step
    once: opening the writer rebuilds ``out_dir/tensorboard`` from ``history`` (the
    records a resumed run keeps, cut back to its checkpoint's step; none for a new
    run) into one file with the records' own wall times, then this segment's steps go
    to a second file.  That file starts with tensorboardX's ``purge_step`` marker (a
    ``SessionLog.START`` at the first new step), so a TensorBoard that read the old
    files before the resume also drops the steps the resume replays.
    """

    def __init__(self, out_dir, history=()):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise RunDirError("train.tensorboard needs tensorboardX: pip install 'damex[tensorboard]' "
                              "(or tensorboardX)") from None
        folder = os.path.join(out_dir, EVENTS)
        history = list(history)
        first = history[-1]["step"] + 1 if history else 1
        rebuilt = folder + ".new"
        shutil.rmtree(rebuilt, ignore_errors=True)     # of a rebuild that was killed
        if history:
            self.writer = SummaryWriter(rebuilt, filename_suffix=".from_step_000001")
            for rec in history:
                self.add(rec)
            self.writer.close()
        shutil.rmtree(folder, ignore_errors=True)
        if history:
            os.replace(rebuilt, folder)
        self.writer = SummaryWriter(folder, purge_step=first if history else None,
                                    filename_suffix=f".from_step_{first:06d}")

    def add(self, rec):
        step, wall = rec["step"], rec.get("timestamp")
        for key, v in rec.items():
            if key not in ("step", "timestamp") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(key, v, step, walltime=wall)
        val = rec.get("val") or {}
        for key, v in [("mean_ap", val.get("mean_ap")), ("routing_accuracy", val.get("routing_accuracy"))] + \
                [(f"ap/{k}", a) for k, a in (val.get("ap") or {}).items()]:
            if v is not None:
                self.writer.add_scalar(f"val/{key}", v, step, walltime=wall)

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
