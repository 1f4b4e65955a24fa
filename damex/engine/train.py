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
from ..data.config import build_mixture
from ..data.mixture import MixtureSampler, collate
from ..models.criterion import SetCriterion
from ..models.dino import DINO
from ..nn.context import ForwardContext
from ..routing import dropped_fraction, expert_map, routing_accuracy
from .checkpoint import load_checkpoint, remove_stale_temp, restore, save_checkpoint
from .config import RunConfig, run_config_from_dict


def build_model(cfg, num_classes, num_datasets):
    """The DINO model of a run, sized for the mixture's joint label space.

    Unless the configuration gives ``dataset_to_expert``, dataset d goes to
    expert ``d % num_experts`` (:func:`damex.routing.expert_map`).
    """
    mc = cfg.model
    mapping = expert_map(mc.dataset_to_expert, mc.num_experts, num_datasets)
    fields = dict(mc.__dict__, num_classes=num_classes, dataset_to_expert=tuple(mapping.tolist()))
    return DINO(type(mc)(**fields))


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

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        tc = cfg.train
        if tc.threads:
            from .. import set_num_threads
            set_num_threads(tc.threads)
        self.train_set = build_mixture(cfg.data, "train")
        self.label_space = self.train_set.label_space
        self.model = build_model(cfg, self.label_space.num_classes, len(self.train_set.datasets))
        self.criterion = SetCriterion(self.label_space.num_classes, routing_weight=tc.routing_weight)
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.")]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        self.optimizer = optim.AdamW([{"params": backbone, "lr": tc.lr_backbone}, {"params": rest}],
                                     lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = optim.MultiStepLR(self.optimizer, tc.lr_drop, tc.lr_gamma)
        self.step = 0
        self.history = []

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
        self.model.train()
        b = self.batch(self.step)
        ctx = ForwardContext(b["dataset_ids"], use_labels=True, seed=tc.seed, step=self.step,
                             root=self.model)
        outputs = self.model(b["images"], b["mask"], b["dataset_ids"], b["targets"], ctx=ctx)
        loss, terms = self.criterion(outputs, b["targets"])
        self.optimizer.zero_grad()
        loss_value, grad_norm, bad = float(loss.data), math.nan, None
        if not math.isfinite(loss_value):
            bad = f"the loss is {loss_value}"
        else:
            loss.backward()
            bad, grad_norm = self._check_gradients()
        if bad is None:
            if tc.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_max_norm)
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
                  **routing_log(ctx, self.model.cfg.dataset_to_expert)}
        if bad is not None:
            record["skipped"] = bad
        self.history.append(record)
        return record

    def _check_gradients(self):
        """``(problem or None, global gradient norm)``, computed here, before any clipping."""
        grads = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
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

    def fit(self, steps=None, progress=True, log=print):
        """Train until ``steps`` (default: the configured total), checkpointing and logging."""
        from tqdm import tqdm

        tc = self.cfg.train
        steps = tc.steps if steps is None else steps
        os.makedirs(tc.out_dir, exist_ok=True)
        log_path = os.path.join(tc.out_dir, "log.jsonl")
        ckpt_path = os.path.join(tc.out_dir, "checkpoint.npz")
        remove_stale_temp(ckpt_path)
        t0 = time.perf_counter()
        bar = tqdm(total=steps, initial=self.step, desc="train", disable=not progress,
                   dynamic_ncols=True)
        with _open_log(log_path, self.step) as logf:
            while self.step < steps:
                rec = self.train_step()
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if tc.log_every and self.step % tc.log_every == 0 and not progress:
                    log(f"step {self.step}: loss {rec['loss']:.4f}")
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    os.fsync(logf.fileno())   # the log holds every step the checkpoint has
                    self.save(ckpt_path)
            os.fsync(logf.fileno())
        bar.close()
        path = self.save(ckpt_path)
        return {"checkpoint": path, "seconds": time.perf_counter() - t0, "history": self.history}

    # -- checkpoints -------------------------------------------------------------

    def meta(self):
        return {"format": "damex-checkpoint-1", "config": self.cfg.to_dict(), "step": self.step,
                "label_space": self.label_space.to_dict(), "history": self.history}

    def save(self, path):
        return save_checkpoint(path, model=self.model, optimizer=self.optimizer,
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
        trainer = cls(run_config_from_dict(conf, source=os.fspath(path)))
        restore(os.fspath(path), parts, trainer.model, trainer.optimizer, trainer.scheduler,
                step=meta["step"], fresh_optimizer=fresh_optimizer)
        trainer.step = int(meta["step"])
        trainer.history = list(meta.get("history", []))
        return trainer
