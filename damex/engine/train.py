"""Training a DINO(-DAMEX) detector on a mixture of datasets.

Every random choice of a step is drawn from a stream derived from the run's
seed and the step: which images (the sampler), each image's augmentation (from
``(seed, step, image position)``), and inside the model every module's noise
(gate noise, denoising, drop-path, dropout) from the step's
:class:`~damex.nn.context.ForwardContext`, by module path.  Nothing is re-seeded,
so a run resumed from a checkpoint continues bit-for-bit as if it had never
stopped, for any module with randomness, whatever its name.
"""
import json
import math
import os
import time

import numpy as np

from .. import nn, ops, optim
from ..data.config import ConfigError, build_mixture
from ..data.mixture import MixtureSampler, collate
from ..models.criterion import SetCriterion
from ..models.dino import DINO
from ..nn.context import ForwardContext
from ..routing import dropped_fraction, expert_map, routing_accuracy
from . import distributed, rundir
from .checkpoint import load_checkpoint, remove_stale_temp, restore, save_checkpoint
from .config import RunConfig, finalize, run_config_from_dict


def build_model(cfg, num_classes, num_datasets, load_weights=True):
    """The DINO model of a run, sized for the mixture's joint label space, starting from
    ``model.backbone_weights`` / ``model.pretrained`` when given (``load_weights``).

    Unless the configuration gives ``dataset_to_expert``, dataset d goes to
    expert ``d % num_experts`` (:func:`damex.routing.expert_map`).  The initialisers
    are seeded with the model's ``seed`` first, so a config gives the same initial
    weights in any process.
    """
    mc = cfg.model
    mapping = expert_map(mc.dataset_to_expert, mc.num_experts, num_datasets)
    fields = dict(mc.__dict__, num_classes=num_classes, dataset_to_expert=tuple(mapping.tolist()))
    nn.manual_seed(mc.seed)   # the initial weights depend on the config, not on what ran before
    model = DINO(type(mc)(**fields))
    if load_weights:
        load_configured_weights(model, mc)
    return model


def check_image_sizes(cfg, mixture=None, split="train"):
    """Query selection takes ``model.num_queries`` encoder tokens per image
    (:func:`damex.models.dino.encoder_tokens`).  Without ``mixture``: images of at most
    ``data.max_size`` pixels a side (the resize caps the longer side) must give that many,
    or every step would fail.  With it: every image of the ``split`` ("train" or "val"),
    resized as that split's pipeline resizes it (training: at its smallest scale;
    validation: at ``data.min_size``), must, or a batch or a validation holding it would
    fail.  ConfigError naming the image (with ``mixture``) and both numbers; called
    before anything of the run (even the synthetic data) is written."""
    from ..data.transforms import resized_hw
    from ..models.dino import encoder_tokens, min_square_side

    dc, mc = cfg.data, cfg.model
    fix = f"query selection needs one per query: use images of at least {min_square_side(mc)} " \
          f"pixels a side (data.min_size, data.max_size), or fewer queries"
    if mixture is None:
        most = encoder_tokens(mc, dc.max_size, dc.max_size)
        if most < mc.num_queries:
            raise ConfigError(f"model.num_queries is {mc.num_queries} but images of at most "
                              f"data.max_size = {dc.max_size} pixels give at most {most} encoder "
                              f"tokens ({dc.max_size} x {dc.max_size}); {fix}")
        return
    size = min([dc.min_size] + list(dc.multiscale)) if split == "train" else dc.min_size
    worst = None
    for ds in mixture.datasets:
        for im in getattr(ds, "images", ()):
            h, w = resized_hw(im["height"], im["width"], size, dc.max_size)
            tokens = encoder_tokens(mc, h, w)
            if worst is None or tokens < worst[0]:
                worst = (tokens, ds.name, im, h, w)
    if worst is not None and worst[0] < mc.num_queries:
        tokens, name, im, h, w = worst
        kind = "training" if split == "train" else "validation"
        raise ConfigError(f"model.num_queries is {mc.num_queries} but {kind} image {im['id']} of "
                          f"{name} ({im['width']} x {im['height']}, resized to {w} x {h} by "
                          f"data.min_size = {size}, data.max_size = {dc.max_size}) gives {tokens} "
                          f"encoder tokens; {fix}")


def load_configured_weights(model, mc):
    """Load ``model.backbone_weights`` into the backbone, then ``model.pretrained`` into the
    whole model (what fits; each prints a report).  Returns the reports."""
    from ..weights import load_pretrained, read

    reports = []
    if mc.backbone_weights:
        state = read(mc.backbone_weights)
        # a standalone backbone (damex convert --from torchvision-*) or a detector's weights
        prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
        report = load_pretrained(model.backbone, state, skip=(), prefix=prefix, verbose=False)
        report.source = f"{mc.backbone_weights} (backbone)"
        print(report)
        reports.append(("backbone_weights", report))
    if mc.pretrained:
        reports.append(("pretrained", load_pretrained(model, mc.pretrained)))
    for key, report in reports:   # each named by its own key (pretrained alone is not backbone_weights)
        if not report.loaded:
            raise ValueError(f"model.{key}: nothing in {report.source} fits the model "
                             f"({len(report.unexpected)} other keys, {len(report.mismatched)} "
                             f"shape mismatches)")
    return [report for _, report in reports]


def routing_log(ctx, mapping):
    """Per MoE layer of one forward: the dropped fraction and (with the map h) the
    routing accuracy on the batch, as flat log keys ``dropped_fraction/LAYER`` and
    ``routing_accuracy/LAYER``."""
    out = {}
    for name, rec in ctx.records:
        out[f"dropped_fraction/{name}"] = dropped_fraction(rec["kept"], rec["routed"])
        if mapping and rec["dataset_ids"] is not None and rec["valid"].any():
            v = rec["valid"]
            out[f"routing_accuracy/{name}"] = routing_accuracy(rec["dataset_ids"][v], rec["top1"][v],
                                                               mapping)[0]
    return out


def check_steps(steps, done=0):
    """``steps`` must be a positive integer beyond the ``done`` steps of a checkpoint."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"--steps must be a positive integer (the step to train until), got {steps!r}")
    if steps <= done:
        raise ValueError(f"--steps {steps}: the checkpoint is already at step {done}; give a step "
                         f"beyond it (e.g. --steps {done + max(done // 2, 1)})")


def step_rate(images, seconds):
    """Wall time of one step and images per second, as log keys (the record's
    ``timestamp`` is the clock time, in seconds since the epoch, at the step's end)."""
    return {"time": float(seconds), "images_per_s": float(images / seconds) if seconds > 0 else None}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.fit`: a checkpoint of ``step`` was written to ``checkpoint``."""

    def __init__(self, step, checkpoint, steps):
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.steps = step, checkpoint, steps


class _StopOnSigint:
    """While active, SIGINT asks the loop to stop after the current step (a second one
    interrupts at once). Inactive outside the main thread."""

    def __enter__(self):
        import signal
        import threading

        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class NonFiniteError(ValueError):
    """Training met a NaN or infinity (the message names the step and the tensor)."""


def _first_nonfinite(named):
    """Name of the first ``(name, array)`` holding a NaN or infinity (None if all are finite)."""
    for name, a in named:
        if not np.isfinite(a).all():
            return name
    return None


def _open_log(path, step):
    """Open a run's ``log.jsonl`` for appending after cutting it back to ``step``.

    Records of later steps (written after the checkpoint a run resumes from, so
    about to be written again) and a torn last line go; returns the open file.
    """
    keep = 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:
                    rec = None
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] > step:
                    break
                keep += len(line)
        with open(path, "r+b") as f:
            f.truncate(keep)
    return open(path, "a", encoding="utf-8")


class Trainer:
    """Owns the data, model, criterion, optimizer and schedule of one run.

    ``Trainer(cfg).fit(steps)`` trains; ``Trainer.from_checkpoint(path)`` resumes.
    """

    def __init__(self, cfg: RunConfig, load_weights=True):
        self.cfg = cfg
        tc = cfg.train
        from .. import set_num_threads
        finalize(cfg)
        set_num_threads(tc.threads)
        check_image_sizes(cfg)            # before the synthetic data is written
        self.train_set = build_mixture(cfg.data, "train")
        self.label_space = self.train_set.label_space
        check_image_sizes(cfg, self.train_set)
        self._val_set = None
        if tc.eval_every:   # built now when the run validates: its images are checked too
            check_image_sizes(cfg, self.val_set, "val")
        self.model = build_model(cfg, self.label_space.num_classes, len(self.train_set.datasets),
                                 load_weights=load_weights)
        self.criterion = SetCriterion(self.label_space.num_classes, routing_weight=tc.routing_weight)
        self.world = distributed.world()   # None in one process (no MPI import)
        if self.world is not None:   # checks the run; data+experts cuts the experts per rank
            self.world.setup(cfg, self.model)
        # frozen backbone stages (model.train_backbone_layers) stay out of the optimizer, as DINO's
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        self.optimizer = optim.AdamW([{"params": backbone, "lr": tc.lr_backbone}, {"params": rest}],
                                     lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = optim.MultiStepLR(self.optimizer, tc.lr_drop, tc.lr_gamma)
        self.step = 0
        self.history = []
        self.best_mean_ap = None

    @property
    def is_main(self):
        """Whether this process logs and writes (rank 0, or the only process)."""
        return self.world is None or self.world.is_main

    # -- one step ----------------------------------------------------------------

    def batch(self, step):
        """The collated batch of a step (deterministic in (seed, step))."""
        dc = self.cfg.data
        sampler = MixtureSampler(self.train_set.sizes, dc.sampler, dc.weights,
                                 seed=self.cfg.train.seed * 1_000_003 + step, num_samples=dc.batch_size)
        seed = self.cfg.train.seed
        return collate([self.train_set.load(d, i, rng=np.random.default_rng([seed, step, 1 << 20, j]))
                        for j, (d, i) in enumerate(sampler)])

    def train_step(self):
        tc = self.cfg.train
        t0 = time.perf_counter()
        self.model.train()
        b = self.batch(self.step)
        if self.world is None:
            ctx = ForwardContext(b["dataset_ids"], use_labels=True, seed=tc.seed, step=self.step,
                                 root=self.model)
            try:
                outputs = self.model(b["images"], b["mask"], b["dataset_ids"], b["targets"], ctx=ctx)
                loss, terms = self.criterion(outputs, b["targets"])
                loss_value, refused = float(loss.data), None
            except ops.NonFiniteInputError as e:  # NaN reached an op without a NaN result (routing)
                loss, terms, loss_value, refused = None, {}, math.nan, e
            self.optimizer.zero_grad()
            grad_norm, bad = math.nan, None
            if not math.isfinite(loss_value):
                bad = f"the loss is {loss_value}" + (f" ({refused})" if refused else "")
            else:
                loss.backward()
                bad, grad_norm = self._check_gradients()
        else:   # this rank's slice of the batch; loss, terms and gradients summed over the ranks
            loss_value, terms, ctx, _ = self.world.forward_backward(self, b)
            bad, grad_norm = (f"the loss is {loss_value}", math.nan) if not math.isfinite(loss_value) \
                else self._check_gradients()   # the same decision on every rank
        if bad is None:
            if tc.clip_max_norm > 0 and self.world is None:
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_max_norm)
            elif tc.clip_max_norm > 0:   # by the norm over every rank's expert shards
                self.world.clip_grad_norm_(self.model.parameters(), tc.clip_max_norm, grad_norm)
            self.optimizer.step()
            params = [(n, p.data) for n, p in self.model.named_parameters()]
            if not math.isfinite(ops.grad_global_norm([a for _, a in params])):
                raise NonFiniteError(f"step {self.step + 1}: parameter {_first_nonfinite(params)} is "
                                     f"not finite after the optimizer step; training stopped")
        else:
            self._skip_or_stop(bad)
        self.scheduler.step()
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "grad_norm": grad_norm,
                  "lr": self.optimizer.param_groups[-1]["lr"], **terms,
                  **(routing_log if self.world is None else self.world.routing_log)(
                      ctx, self.model.cfg.dataset_to_expert),
                  **step_rate(len(b["targets"]), time.perf_counter() - t0), "timestamp": time.time()}
        if bad is not None:
            record["skipped"] = bad
        if self.world is not None:
            record["comm_time"] = self.world.comm_seconds   # this step's collectives, waits included
            record["allreduce_time"] = self.world.allreduce_seconds   # the gradient buckets alone
        self.history.append(record)
        return record

    def _check_gradients(self):
        """``(problem or None, global gradient norm)``, computed here, before any clipping."""
        grads = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if self.world is not None:
            norm = self.world.grad_norm(self.model.parameters())
        else:
            norm = ops.grad_global_norm([g for _, g in grads]) if grads else 0.0
        if math.isfinite(norm):
            return None, norm
        return f"the gradient norm is {norm} (first non-finite gradient: {_first_nonfinite(grads)})", norm

    def _skip_or_stop(self, problem):
        """The ``nonfinite`` policy for a bad batch: skip it (no update) or stop."""
        tc = self.cfg.train
        skipped = sum(1 for r in self.history if "skipped" in r)
        self.optimizer.zero_grad()
        if tc.nonfinite == "skip" and skipped < tc.nonfinite_max_skips:
            return
        why = (f" after skipping {skipped} bad batches (nonfinite_max_skips {tc.nonfinite_max_skips})"
               if tc.nonfinite == "skip" else " (set train.nonfinite to 'skip' to skip such batches)")
        raise NonFiniteError(f"step {self.step + 1}: {problem}; training stopped{why}")

    # -- the loop ----------------------------------------------------------------

    def fit(self, steps=None, progress=True, log=print, overwrite=False):
        """Train until ``steps`` (default: the configured total), logging, validating and
        checkpointing into ``out_dir`` (see :mod:`damex.engine.rundir`).

        A new trainer (step 0) claims ``out_dir``: a folder that already holds a run is
        refused unless ``overwrite``.  A resumed one continues its folder with the log
        cut back to the checkpoint's step.  Ctrl-C (SIGINT) finishes the current step,
        writes a checkpoint and raises :class:`TrainingInterrupted`.
        """
        from tqdm import tqdm

        tc = self.cfg.train
        steps = tc.steps if steps is None else steps
        check_steps(steps, self.step)
        out = tc.out_dir
        main = self.is_main    # with several ranks only rank 0 logs and writes
        if main:
            if self.step == 0:
                rundir.claim(out, overwrite)
            else:
                rundir.cut_log(out, self.history, self.step)
        log_path = os.path.join(out, rundir.LOG)
        for name in (rundir.LATEST, rundir.BEST) if main else ():   # temporaries of a killed save
            remove_stale_temp(os.path.join(out, name))
        t0 = time.perf_counter()
        bar = tqdm(total=steps, initial=self.step, desc="train", disable=not (progress and main),
                   dynamic_ncols=True)
        events = rundir.EventWriter(out, self.history) if tc.tensorboard and main else None
        fresh = self.step == 0
        try:
            stop, saved = self._loop(steps, main, log_path, events, bar, progress, log)
        except BaseException:
            if events is not None:
                events.close()
            if main and fresh and self.step == 0:
                rundir.abandon(out)   # a new run that failed before its first step leaves nothing
            raise
        bar.close()
        if events is not None:
            events.close()
        if saved != self.step:
            self.checkpoint()
        latest = os.path.join(out, rundir.LATEST)
        if self.world is not None and self.step < steps:
            stop.requested = True      # another rank was interrupted
        if stop.requested:
            raise TrainingInterrupted(self.step, latest, steps)
        return {"checkpoint": latest, "seconds": time.perf_counter() - t0, "history": self.history}

    def _loop(self, steps, main, log_path, events, bar, progress, log):
        """The steps of :meth:`fit` (logging, validation, checkpoints) until ``steps`` or a
        stop request; returns ``(the SIGINT guard, the step last checkpointed)``."""
        tc = self.cfg.train
        saved = None
        with _StopOnSigint() as stop, \
                (_open_log(log_path, self.step) if main else open(os.devnull, "w")) as logf:
            while self.step < steps and not self._stop(stop.requested):
                rec = self.train_step()
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == steps):
                    rec["val"] = self.validate()    # every rank: the images split over them
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if events is not None:
                    events.add(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if main and tc.log_every and self.step % tc.log_every == 0 and not progress:
                    log(f"step {self.step}: loss {rec['loss']:.4f}")
                if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or \
                        ("val" in rec and self._is_best(rec["val"])):
                    if main:
                        os.fsync(logf.fileno())   # the log holds every step the checkpoint has
                    self.checkpoint()
                    saved = self.step
            if main:
                os.fsync(logf.fileno())
        return stop, saved

    def _stop(self, requested):
        """Whether to stop before the next step: this process's Ctrl-C, or any rank's."""
        return requested if self.world is None else self.world.any(requested)

    def checkpoint(self):
        """Write the numbered checkpoint of this step, update ``checkpoint.npz`` (and
        ``best.npz`` when this step's validation is the best so far), prune old ones.
        With several ranks only rank 0 writes (the weights are equal on every rank): one
        file, read back by any number of ranks."""
        out = self.cfg.train.out_dir
        whole = self.world.gather_state(self) if self.world is not None else None  # every expert
        if not self.is_main:
            return os.path.join(out, rundir.LATEST)
        val = self.history[-1].get("val") if self.history else None
        best = val is not None and self._is_best(val)
        if best:
            self.best_mean_ap = val["mean_ap"]
        path = rundir.numbered(out, self.step)
        path = self.save(path) if whole is None else self.save(path, whole)
        rundir.publish(path, out, rundir.LATEST)
        if best:
            rundir.publish(path, out, rundir.BEST)
        rundir.prune(out, self.cfg.train.keep_last)
        return path

    def _is_best(self, val):
        ap = val.get("mean_ap")
        return ap is not None and (self.best_mean_ap is None or ap > self.best_mean_ap)

    @property
    def val_set(self):
        """The validation mixture (the training label space), built on first use."""
        if self._val_set is None:
            self._val_set = build_mixture(self.cfg.data, "val", label_space=self.label_space)
        return self._val_set

    def validate(self, batch_size=8):
        """Per-dataset AP, mean AP and routing accuracy on the validation split (log form)."""
        from .inference import evaluate_model

        res, _ = evaluate_model(self.model, self.val_set, batch_size=batch_size, progress=False,
                                world=self.world)
        self.model.train()
        return {"mean_ap": res["mean_ap"], "ap": {k: v["ap"] for k, v in res["datasets"].items()},
                "routing_accuracy": res["routing"]["accuracy"]}

    # -- checkpoints -------------------------------------------------------------

    def meta(self):
        return {"format": "damex-checkpoint-1", "config": self.cfg.to_dict(), "step": self.step,
                "label_space": self.label_space.to_dict(), "history": self.history,
                "best_mean_ap": self.best_mean_ap, "config_hash": self.cfg.hash()}

    def save(self, path, state=None):
        """Write a checkpoint of this run; ``state``: ``(model state, optimizer state)`` to
        write instead of this process's (the experts gathered from every rank)."""
        model, optimizer = (self.model, self.optimizer) if state is None else \
            (distributed.StateOf(state[0]), distributed.StateOf(state[1]))
        return save_checkpoint(path, model=model, optimizer=optimizer,
                               scheduler=self.scheduler, meta=self.meta())

    @classmethod
    def from_checkpoint(cls, path, fresh_optimizer=False, **train_overrides):
        """Rebuild a run from its checkpoint and continue where it stopped.

        A checkpoint without optimizer state is refused unless ``fresh_optimizer``
        (then AdamW restarts from zero moments); every problem with the file is a
        :class:`~damex.engine.checkpoint.CheckpointError` naming it.
        """
        parts, meta = load_checkpoint(path)
        conf = meta["config"]
        conf["train"] = {**conf.get("train", {}), **train_overrides}
        # the checkpoint's weights replace any pretrained ones: do not read those files again
        trainer = cls(run_config_from_dict(conf, source=os.fspath(path)), load_weights=False)
        if trainer.world is not None:   # the experts of this rank
            parts = trainer.world.local_parts(parts, trainer)
        restore(os.fspath(path), parts, trainer.model, trainer.optimizer, trainer.scheduler,
                step=meta["step"], fresh_optimizer=fresh_optimizer)
        trainer.step = int(meta["step"])
        trainer.history = list(meta.get("history", []))
        trainer.best_mean_ap = meta.get("best_mean_ap")
        return trainer
