"""Training-step benchmark of a DINO-DAMEX preset (``tiny`` by default) on the embedded
synthetic mixture.

    python bench/bench_train.py                      # batch 4, 3 warm-up + 8 timed steps
    python bench/bench_train.py --steps 20 --batch-size 8
    python bench/bench_train.py --threads 1          # damex's and NumPy's BLAS/OpenMP threads
    python bench/bench_train.py --preset paper --batch-size 2 --min-size 256 --max-size 336 \
        --steps 3 --warmup 1                         # the ResNet-50 DAMEX preset (900 queries)

It prints

1. seconds per step and per image (median over the timed steps, after warm-up),
   measured on plain ``Trainer.train_step`` calls (no instrumentation);
2. peak memory: ``resource.getrusage`` max RSS of the process, and the
   tracemalloc peak (NumPy arrays included) of one extra, traced step;
3. where a step goes, by part of the model, forward and backward:
   backbone (+ 1x1 input projections), encoder, decoder (without its MoE FFNs),
   MoE blocks, the rest of DINO.forward (flattening, position encoding, query
   selection, denoising queries, heads), the criterion (Hungarian matcher
   separately), tape overhead, gradient clipping + AdamW, and data loading;
4. where a step goes, by op: the ``damex.ops`` kernels called in the forward
   and the tape nodes in the backward, so it is clear which kernel (or which
   NumPy glue outside the kernels) to optimise next;
5. how many steps / images fit in 15 minutes at the measured rate.

The split comes from instrumented steps, timed separately, and does not change
what the model computes: module ``forward``s are wrapped with exclusive timers
(a stack: time in a nested part counts for the innermost part only), every tape
node remembers the part that recorded it, the backward is timed per node with
``damex.autograd.set_backward_hook``, and every ``damex.ops`` function is wrapped
with a timer (outermost call only).  The instrumentation costs some time of its
own: compare the instrumented total with the plain step time printed above it.

Timing is wall clock on a possibly shared machine: the load average is printed
before and after; trust a run only when it was low.
"""
import argparse
import collections
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
import types

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import damex  # noqa: E402
from damex import autograd, ops  # noqa: E402
from damex.engine.config import run_config_from_dict  # noqa: E402
from damex.testing import timing  # noqa: E402

PARTS = ("data", "backbone", "encoder", "decoder", "moe", "dino other", "criterion",
         "matcher", "tape overhead", "clip+adamw")
NEEDED = ("attention_forward", "ms_deform_attn_forward", "adamw_step")


def build_trainer(args):
    from damex.engine.train import Trainer
    cfg = run_config_from_dict({
        "model": {"preset": args.preset},
        "data": {"synthetic": {"root": args.data, "preset": "default", "seed": 0},
                 "batch_size": args.batch_size, "sampler": "uniform",
                 **{k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}},
        "train": {"steps": 10 ** 6, "out_dir": os.path.join(tempfile.gettempdir(), "damex-bench-run"),
                  "checkpoint_every": 0, "threads": args.threads, "seed": 0}})
    return Trainer(cfg)


class Profiler:
    """Exclusive wall time per part (a stack of open parts) and per op."""

    def __init__(self):
        self.stack = ["dino other"]
        self.mark = time.perf_counter()
        self.fwd = collections.defaultdict(float)   # part -> seconds (forward)
        self.bwd = collections.defaultdict(float)   # part -> seconds (backward closures)
        self.ops_fwd = collections.defaultdict(float)   # damex.ops calls in model + criterion forward
        self.ops_bwd = collections.defaultdict(float)   # ... inside the tape's backward
        self.ops_opt = collections.defaultdict(float)   # ... in clipping + AdamW
        self.in_optim = False
        self.nodes_bwd = collections.defaultdict(float)
        self.op_depth = 0
        self.in_backward = False

    def _charge(self):
        now = time.perf_counter()
        if not self.in_backward:
            self.fwd[self.stack[-1]] += now - self.mark
        self.mark = now

    def enter(self, part):
        self._charge()
        self.stack.append(part)

    def leave(self):
        self._charge()
        self.stack.pop()

    def scoped(self, part, fn):
        def wrapped(*a, **kw):
            self.enter(part)
            try:
                return fn(*a, **kw)
            finally:
                self.leave()
        return wrapped

    def timed_op(self, name, fn):
        def wrapped(*a, **kw):
            if self.op_depth:
                return fn(*a, **kw)
            self.op_depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                (self.ops_bwd if self.in_backward else self.ops_opt if self.in_optim
                 else self.ops_fwd)[name] += dt
                self.op_depth -= 1
        return wrapped

    def reset(self):
        for d in (self.fwd, self.bwd, self.ops_fwd, self.ops_bwd, self.ops_opt, self.nodes_bwd):
            d.clear()


def instrument(trainer, prof):
    """Wrap the parts and ops; returns an ``undo`` callable."""
    undo = []
    model = trainer.model

    def wrap_forward(module, part):
        orig = module.forward
        object.__setattr__(module, "forward", prof.scoped(part, orig))
        undo.append(lambda m=module: object.__delattr__(m, "forward"))

    wrap_forward(model.backbone, "backbone")
    for p in model.input_proj:
        wrap_forward(p, "backbone")
    wrap_forward(model.encoder, "encoder")
    wrap_forward(model.decoder, "decoder")
    for _, m in model.named_modules():
        if type(m).__name__ == "MoEBlock":
            wrap_forward(m, "moe")

    crit = trainer.criterion
    trainer.criterion = prof.scoped("criterion", crit)
    undo.append(lambda: setattr(trainer, "criterion", crit))
    import damex.models.criterion as cm
    hm = cm.hungarian_match
    cm.hungarian_match = prof.scoped("matcher", hm)
    undo.append(lambda: setattr(cm, "hungarian_match", hm))

    # every tape node remembers the part that recorded it
    base = autograd.Node

    class TaggedNode(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.part = prof.stack[-1]
    autograd.Node = TaggedNode
    undo.append(lambda: setattr(autograd, "Node", base))

    def hook(node, seconds):
        prof.bwd[getattr(node, "part", "dino other")] += seconds
        prof.nodes_bwd[node.name] += seconds
    old = autograd.set_backward_hook(hook)
    undo.append(lambda: autograd.set_backward_hook(old))

    for name in dir(ops):
        fn = getattr(ops, name)
        if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)) and not name.startswith("_"):
            setattr(ops, name, prof.timed_op(name, fn))
            undo.append(lambda n=name, f=fn: setattr(ops, n, f))

    def restore():
        for u in reversed(undo):
            u()
    return restore


def instrumented_step(trainer, prof):
    """Trainer.train_step, in its parts; returns {phase: seconds}."""
    from damex import nn
    from damex.nn.context import ForwardContext
    tc = trainer.cfg.train
    t = {}
    t0 = time.perf_counter()
    trainer.model.train()
    b = trainer.batch(trainer.step)
    ctx = ForwardContext(b["dataset_ids"], seed=tc.seed, step=trainer.step, root=trainer.model)
    t1 = time.perf_counter()
    prof.stack, prof.mark = ["dino other"], t1
    outputs = trainer.model(b["images"], b["mask"], b["dataset_ids"], b["targets"], ctx=ctx)
    loss, _ = trainer.criterion(outputs, b["targets"])
    prof._charge()
    t2 = time.perf_counter()
    trainer.optimizer.zero_grad()
    prof.in_backward = True
    loss.backward()
    prof.in_backward = False
    t3 = time.perf_counter()
    prof.in_optim = True
    if tc.clip_max_norm > 0:
        nn.utils.clip_grad_norm_(trainer.model.parameters(), tc.clip_max_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    prof.in_optim = False
    trainer.step += 1
    t4 = time.perf_counter()
    t.update(data=t1 - t0, forward=t2 - t1, backward=t3 - t2, optim=t4 - t3, total=t4 - t0)
    return t


def load():
    return f"load average {timing.load_average():.2f}"


def fmt_table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--preset", default="tiny", help="model preset (damex.models.dino.PRESETS)")
    ap.add_argument("--min-size", type=int, default=0, help="data.min_size (0: the config default)")
    ap.add_argument("--max-size", type=int, default=0, help="data.max_size (0: the config default)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of damex and of every BLAS pool in the process (0 = leave the defaults)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "damex-synthetic-default"),
                    help="where the embedded synthetic mixture is written (reused if present)")
    ap.add_argument("--top", type=int, default=15, help="ops shown in the by-op table")
    args = ap.parse_args(argv)
    missing = [n for n in NEEDED if not hasattr(ops, n)]
    if missing:
        sys.exit(f"bench_train: damex.ops lacks {missing}: the detector cannot run in this build "
                 "(its kernel family has not been merged yet)")

    if args.threads:   # every BLAS pool in the process (damex's and NumPy's OpenBLAS)
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    trainer = build_trainer(args)
    print(f"damex bench_train: {args.preset} preset, batch {args.batch_size}, {os.cpu_count()} cores, "
          f"damex (OpenBLAS, OpenMP) threads {damex.get_num_threads()}; {load()}")
    n_params = sum(p.data.size for p in trainer.model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {trainer.label_space.num_classes} joint classes, "
          f"{len(trainer.train_set.datasets)} datasets, {sum(trainer.train_set.sizes)} train images")

    # 1. plain steps
    for _ in range(args.warmup):
        trainer.train_step()
    plain = [timing.call_time(trainer.train_step)[0] for _ in range(args.steps)]
    med = statistics.median(plain)
    B = args.batch_size
    print(f"\nstep time (plain train_step): median {med:.3f} s/step = {med / B:.3f} s/image "
          f"(min {min(plain):.3f}, max {max(plain):.3f}, {len(plain)} steps after {args.warmup} warm-up)")

    # 2. memory
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tracemalloc.start()
    trainer.train_step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak memory: max RSS {rss:.0f} MiB (process so far); tracemalloc peak of one step "
          f"{peak / 2 ** 20:.1f} MiB (Python + NumPy allocations, not OpenBLAS/OpenMP buffers)")

    # 3-4. instrumented steps
    prof = Profiler()
    restore = instrument(trainer, prof)
    try:
        instrumented_step(trainer, prof)  # warm the wrappers
        prof.reset()
        phases = collections.defaultdict(list)
        parts = collections.defaultdict(float)
        n = max(args.steps // 2, 3)
        for _ in range(n):
            t = instrumented_step(trainer, prof)
            for k, v in t.items():
                phases[k].append(v)
    finally:
        restore()
    mean = lambda d: {k: v / n for k, v in d.items()}
    fwd, bwd = mean(prof.fwd), mean(prof.bwd)
    ph = {k: statistics.mean(v) for k, v in phases.items()}
    tape = ph["backward"] - sum(bwd.values())
    total = ph["total"]
    rows = []
    for part in PARTS:
        f = {"data": ph["data"], "clip+adamw": ph["optim"]}.get(part, fwd.get(part, 0.0))
        b = {"tape overhead": tape}.get(part, bwd.get(part, 0.0))
        if part in ("data", "clip+adamw", "tape overhead"):
            f, b = (f, 0.0) if part != "tape overhead" else (0.0, b)
        rows.append((part, f"{f:.3f}", f"{b:.3f}", f"{f + b:.3f}", f"{100 * (f + b) / total:.1f}%"))
    rows.append(("total (instrumented)", f"{ph['data'] + ph['forward'] + ph['optim']:.3f}", f"{ph['backward']:.3f}",
                 f"{total:.3f}", "100.0%"))
    print(f"\nwhere a step goes, by part (mean of {n} instrumented steps; s/step; "
          f"instrumented {total:.3f} s vs plain {med:.3f} s):")
    print("(backbone includes the 1x1 input projections; decoder excludes its MoE blocks; matcher is the\n"
          " Hungarian matching inside the criterion; data/clip+adamw are listed under forward)")
    print(fmt_table(rows, ("part", "forward", "backward", "total", "share")))

    ops_total_f, ops_total_b = sum(prof.ops_fwd.values()) / n, sum(prof.ops_bwd.values()) / n
    ops_total_o = sum(prof.ops_opt.values()) / n
    print(f"\nwhere a step goes, by op (mean s/step): damex.ops calls take {ops_total_f:.3f} s of the "
          f"{ph['forward']:.3f} s forward (model + criterion, {100 * ops_total_f / ph['forward']:.0f}%), "
          f"{ops_total_b:.3f} s of the {ph['backward']:.3f} s backward and {ops_total_o:.3f} s of the "
          f"{ph['optim']:.3f} s clip+AdamW; the rest is NumPy glue and Python")
    items = sorted(mean(prof.ops_fwd).items(), key=lambda kv: -kv[1])[:args.top]
    print(fmt_table([(k, f"{v:.4f}", f"{100 * v / total:.1f}%") for k, v in items],
                    ("forward: damex.ops call", "s/step", "share")))
    items = sorted(mean(prof.nodes_bwd).items(), key=lambda kv: -kv[1])[:args.top]
    print()
    print(fmt_table([(k, f"{v:.4f}", f"{100 * v / total:.1f}%") for k, v in items],
                    ("backward: tape node", "s/step", "share")))
    glue_f = ph["forward"] - ops_total_f
    print(f"\nforward outside damex.ops (NumPy glue, matcher, Python): {glue_f:.3f} s/step "
          f"({100 * glue_f / total:.0f}% of the step)")

    budget = 15 * 60
    print(f"\n15-minute budget at {med:.3f} s/step: {budget / med:.0f} steps = {budget / med * B:.0f} images "
          f"(about {budget / med * B / sum(trainer.train_set.sizes):.1f} epochs of the "
          f"{sum(trainer.train_set.sizes)}-image mixture); the shipped config asks for "
          f"{shipped_steps()} steps x 4 images")
    print(f"\n{load()}")


def shipped_steps():
    """Training steps of the shipped tiny config (damex/configs/tiny_damex.json)."""
    import json
    from damex.engine.pipeline import default_config_path
    with open(default_config_path(), encoding="utf-8") as f:
        return json.load(f)["train"]["steps"]


if __name__ == "__main__":
    main()
