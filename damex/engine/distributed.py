"""Data-parallel training over MPI (through mpi4py): ``mpiexec -n N damex train CONFIG``.

The scheme is the simplest exact one.  Every rank builds the same collated
global batch of a step (:meth:`Trainer.batch`: same images, order, padding and
augmentation, all drawn per (seed, step, image)) and runs its contiguous slice
of ``batch_size / N`` images.  What couples the images of a batch is taken from
the global batch, so a rank's loss is its images' share of the single-process
loss:

* the box terms are normalised by the GLOBAL box count (as DINO all-reduces
  ``num_boxes``);
* the denoising queries are prepared once over the global targets, from the
  same stream as in one process (their group count depends on the batch's max
  object count), and each rank takes its images' rows;
* the routing loss (a mean over tokens) is weighted by the rank's share of the
  images (exact when every image has the same number of routed tokens, as in
  the decoder's MoE layers).

The logged losses, dropped fraction and routing accuracy are those of the
global batch (summed over the ranks).  The gradients are summed over the ranks (bucketed flat float32 buffers,
``Allreduce`` in place), then every rank clips and steps AdamW identically, so
the weights stay equal on every rank without a broadcast.

Per-rank, as in Tutel's or DeepSpeed's pure data parallelism: the MoE gate
noise is drawn over the rank's tokens and the expert capacity is computed from
them (and dropout / drop-path masks over the rank's slice).  A step equals the
single-process one up to float summation order when the gate noise is 0, the
capacity dropless (``capacity_factor: null``) and dropout 0; otherwise it is the
same training procedure with different noise draws.

Without an MPI launch (no ``PMI_SIZE``/``OMPI_COMM_WORLD_SIZE``/``MV2_COMM_WORLD_SIZE``
> 1 in the environment) nothing here imports mpi4py: world size 1 is the plain path.
Every collective of a step waits at most ``DAMEX_MPI_TIMEOUT`` seconds (default 600);
past that, or on any exception on a rank, the job is aborted with a message
naming the rank, so a dead or stuck rank never hangs the others.
"""
import copy
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from .. import ops
from ..nn.context import ForwardContext

__all__ = ["launched_size", "launched_rank", "plain_env", "supervise", "World", "world", "guard_ranks", "local_slice", "StateOf"]

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")   # MPICH/Intel, Open MPI, MVAPICH
BUCKET_BYTES = 4 << 20
# the fields of damex.models.denoising.DenoisingQueries with one entry per image
_DN_PER_IMAGE = ("labels", "box_logits", "valid", "positive")
_WORLD = None


def launched_size():
    """The world size an MPI launcher announced in the environment (1 without one)."""
    for var in _SIZE_VARS:
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 1


def _timeout():
    return float(os.environ.get("DAMEX_MPI_TIMEOUT", "600"))


class World:
    """The ranks of one job: MPI ``COMM_WORLD`` and the collectives of data parallel training."""

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError("launched under MPI (e.g. mpiexec -n N) but mpi4py is not installed: "
                               "pip install 'damex[mpi]'") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.comm_seconds = 0.0    # time spent in collectives (waits included)
        self.allreduce_seconds = 0.0   # of which the gradient buckets' all-reduce (no waits)
        self.experts = None        # the ExpertParallel of "parallel": "data+experts"

    @property
    def is_main(self):
        return self.rank == 0

    # -- bounded collectives --------------------------------------------------------

    def wait(self, req, what, bounded=True):
        """Wait for the request ``req`` of a collective (``what`` names it in the timeout's
        message), at most ``DAMEX_MPI_TIMEOUT`` seconds when ``bounded``."""
        t0 = time.perf_counter()
        limit = _timeout()
        while not req.Test():
            if bounded and time.perf_counter() - t0 > limit:
                self.abort(f"no answer from the other ranks within {limit:g} s during {what} "
                           "(a rank died or hangs)")
            time.sleep(0.0002)
        self.comm_seconds += time.perf_counter() - t0

    def allreduce_(self, buf, what="allreduce"):
        """Sum ``buf`` (a contiguous NumPy array) over the ranks, in place."""
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), what)
        return buf

    def allgather_bytes(self, data, what="allgather"):
        """Every rank's fixed-length ``data`` (bytes), as a list in rank order."""
        send = np.frombuffer(data, np.uint8).copy()
        recv = np.empty(self.size * send.size, np.uint8)
        self.wait(self.comm.Iallgather(send, recv), what)
        return [recv[i * send.size:(i + 1) * send.size].tobytes() for i in range(self.size)]

    def allgather_array(self, arr, what="allgather"):
        """Every rank's ``arr`` (the same shape and dtype everywhere), concatenated in rank order."""
        arr = np.ascontiguousarray(arr)
        out = np.empty((self.size,) + arr.shape, arr.dtype)
        self.wait(self.comm.Iallgather(arr, out), what)
        return out.reshape((-1,) + arr.shape[1:])

    def allgatherv_rows(self, rows, counts, what="allgatherv"):
        """The float32 ``rows [counts[rank], W]`` of every rank, stacked in rank order."""
        W = rows.shape[1]
        sizes = np.asarray(counts, np.int64) * W
        out = np.empty((int(np.sum(counts)), W), np.float32)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.wait(self.comm.Iallgatherv(np.ascontiguousarray(rows, np.float32),
                                        [out, (sizes, displs), self.MPI.FLOAT]), what)
        return out

    def gather_arrays(self, arrays, what="gather", root=0):
        """Every rank's dict of NumPy arrays (numeric, any shapes), as a list in rank order on
        ``root`` (None elsewhere); sent as ``.npz`` bytes, read back without pickle."""
        import io

        f = io.BytesIO()
        np.savez(f, **arrays)
        data = np.frombuffer(f.getvalue(), np.uint8)
        sizes = self.allgather_array(np.array([data.size], np.int64), what)
        out = np.empty(int(sizes.sum()) if self.rank == root else 0, np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.wait(self.comm.Igatherv(data, [out, (sizes, displs), self.MPI.BYTE], root=root), what)
        if self.rank != root:
            return None
        parts = []
        for i in range(self.size):
            with np.load(io.BytesIO(out[displs[i]:displs[i] + sizes[i]].tobytes()),
                         allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
        return parts

    def bcast_json(self, obj, what="broadcast", root=0):
        """``obj`` (JSON-able) of ``root`` on every rank."""
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.rank == root else None
        n = np.array([0 if data is None else data.size], np.int64)
        self.wait(self.comm.Ibcast(n, root=root), what)
        buf = data.copy() if data is not None else np.empty(int(n[0]), np.uint8)
        self.wait(self.comm.Ibcast(buf, root=root), what)
        return json.loads(buf.tobytes().decode())

    def batches_of(self, n, model):
        """This rank's share of ``n`` evaluation batches: batch indices ``rank, rank + N, ...``;
        with sharded experts padded with None (a batch whose results are dropped) so every
        rank runs as many forwards, each layer's collectives meeting their peers."""
        mine = list(range(self.rank, n, self.size))
        if self.experts is not None:
            mine += [None] * (-(-n // self.size) - len(mine))
        return mine

    def gather_batches(self, done, what="the evaluation gather"):
        """:func:`damex.engine.inference.predict`'s per-batch results of every rank, on rank 0
        (None elsewhere): ``[(batch index, dataset name, [(image_id, prediction)],
        [(layer, record)])]``."""
        arrays, meta = {}, []
        for j, name, preds, recs in done:
            item = [j, name, [], []]
            for image_id, p in preds:
                n = len(arrays)
                arrays.update({f"{n}.{k}": v for k, v in p.items()})
                item[2].append([image_id, n, sorted(p)])
            for layer, rec in recs:
                n = len(arrays)
                arrays[f"{n}.dataset_ids"], arrays[f"{n}.experts"] = rec["dataset_ids"], rec["experts"]
                item[3].append([layer, n, int(rec["kept"]), int(rec["routed"])])
            meta.append(item)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        parts = self.gather_arrays(arrays, what)
        if parts is None:
            return None
        out = []
        for z in parts:
            for j, name, preds, recs in json.loads(z["meta"].tobytes().decode()):
                out.append((j, name,
                            [(image_id, {k: z[f"{n}.{k}"] for k in keys}) for image_id, n, keys in preds],
                            [(layer, {"dataset_ids": z[f"{n}.dataset_ids"], "experts": z[f"{n}.experts"],
                                      "kept": kept, "routed": routed}) for layer, n, kept, routed in recs]))
        return out

    def abort(self, message, code=1):
        """Print ``message`` naming this rank and end the whole job."""
        print(f"damex: rank {self.rank} of {self.size}: {message}; aborting the job",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # MPI_Abort makes the launcher kill every rank at once, and a line still in the pipe
        # to the launcher is lost with them (seen: 0-2 of 3 ranks' messages arrived): give it
        # a moment to forward the message first
        time.sleep(0.5)
        self.comm.Abort(code)

    # -- start checks ---------------------------------------------------------------

    def check_run(self, cfg):
        """Refuse a batch the ranks do not divide and configs that differ across ranks."""
        bs = int(cfg.data.batch_size)
        if bs % self.size:
            raise ValueError(f"data parallel: the global batch_size {bs} is not divisible by the "
                             f"{self.size} ranks (choose N dividing {bs}, or data.batch_size a "
                             f"multiple of {self.size})")
        text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).digest()
        hashes = self.allgather_bytes(digest, "the config check")
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if bad:
            raise ValueError(f"data parallel: rank(s) {bad} have a different run config than rank 0 "
                             "(every rank must run the same config and flags)")

    def setup(self, cfg, model):
        """Check the run (:meth:`check_run`) and, with ``"parallel": "data+experts"``, cut
        every MoE layer of ``model`` to this rank's experts (before the optimizer is built)."""
        self.check_run(cfg)
        if cfg.train.parallel == "data+experts":
            from .expert_parallel import ExpertParallel

            self.experts = ExpertParallel(self, cfg.train.expert_ranks or None)
            self.experts.shard(model)

    # -- one step -------------------------------------------------------------------

    def forward_backward(self, trainer, b):
        """This rank's part of one step on the global batch ``b``: gradients summed over the
        ranks in the parameters' ``.grad``; returns ``(loss, terms, ctx, images)`` with the
        loss and terms of the global batch (as one process logs them)."""
        from ..models.denoising import prepare_cdn

        tc, mc = trainer.cfg.train, trainer.model.cfg
        self.comm_seconds = self.allreduce_seconds = 0.0
        B = len(b["targets"])
        lo, hi = local_slice(B, self.rank, self.size)
        part = {k: b[k][lo:hi] for k in ("images", "mask", "dataset_ids", "targets")}
        num_boxes = float(sum(len(t["labels"]) for t in b["targets"]))
        dn = None
        if mc.dn_number > 0:   # the global batch's queries, from the single-process stream
            dn = prepare_cdn(b["targets"], num_classes=mc.num_classes, num_queries=mc.num_queries,
                             rng=ForwardContext(seed=tc.seed, step=trainer.step).rng("denoising"),
                             dn_number=mc.dn_number, label_noise_ratio=mc.dn_label_noise_ratio,
                             box_noise_scale=mc.dn_box_noise_scale)
            if dn is not None:   # this rank's images' rows (attn_mask, sizes and groups are shared)
                dn = copy.copy(dn)
                for name in _DN_PER_IMAGE:
                    if hasattr(dn, name):
                        setattr(dn, name, getattr(dn, name)[lo:hi])
        share = (hi - lo) / B
        if self.experts is not None:
            self.experts.loss_share = share
        criterion = copy.copy(trainer.criterion)
        criterion.routing_weight = trainer.criterion.routing_weight * share
        ctx = ForwardContext(part["dataset_ids"], use_labels=True, seed=tc.seed, step=trainer.step,
                             root=trainer.model, first_image=lo)
        refused, outputs = None, None
        try:
            outputs = trainer.model(part["images"], part["mask"], part["dataset_ids"], part["targets"],
                                    ctx=ctx, dn_queries=dn)
            loss, terms = criterion(outputs, part["targets"], num_boxes=num_boxes)
        except ops.NonFiniteInputError as e:   # NaN reached an op: this step is bad on every rank
            refused = e
            if outputs is None and self.experts is not None and not getattr(e, "every_rank", False):
                # refused inside the model on this rank alone: the others are in the MoE
                # exchanges this rank will not reach, so the step cannot be skipped
                self.abort(f"{e} (in this rank's forward, before the expert-parallel MoE exchanges "
                           "of the other ranks: under data+experts such a step cannot be skipped)")
        trainer.optimizer.zero_grad()
        flag = np.array([int(refused is not None)], np.int32)
        if self.allreduce_(flag, "the forward check")[0]:
            if refused is not None:
                print(f"damex: rank {self.rank}: {refused}", file=sys.stderr, flush=True)
            return math.nan, {}, ForwardContext(seed=tc.seed, step=trainer.step), B
        loss.backward()
        self.reduce_gradients(trainer.model.parameters())
        terms = {k: v * share if k == "loss_routing" else v for k, v in terms.items()}
        keys = sorted(terms)
        scalars = np.array([float(loss.data)] + [terms[k] for k in keys], np.float64)
        self.allreduce_(scalars, "the loss reduction")
        return float(scalars[0]), dict(zip(keys, scalars[1:].tolist())), ctx, B

    def routing_log(self, ctx, mapping):
        """:func:`damex.engine.train.routing_log` of the global batch: every layer's kept and
        routed slots and routing hits summed over the ranks."""
        from ..routing import dropped_fraction, routing_accuracy

        names, vals = [], []
        for name, rec in ctx.records:
            v, hits, n = rec["valid"], 0.0, 0.0
            if mapping and rec["dataset_ids"] is not None and v.any():
                n = float(v.sum())
                hits = round(routing_accuracy(rec["dataset_ids"][v], rec["top1"][v], mapping)[0] * n)
            names.append(name)
            vals += [rec["kept"], rec["routed"], hits, n]
        buf = self.allreduce_(np.array(vals, np.float64), "the routing statistics")
        out = {}
        for i, name in enumerate(names):
            kept, routed, hits, n = buf[4 * i:4 * i + 4]
            out[f"dropped_fraction/{name}"] = dropped_fraction(kept, routed)
            if n > 0:
                out[f"routing_accuracy/{name}"] = float(hits / n)
        return out

    def reduce_gradients(self, params):
        """Sum every parameter's gradient over the ranks through flat float32 buckets of about
        :data:`BUCKET_BYTES`; a parameter no rank has a gradient for keeps ``grad = None``."""
        params = list(params)
        if self.experts is not None:   # expert gradients stay with the ranks holding the experts
            self.experts.reduce_expert_gradients([p for p in params if self.experts.is_sharded(p)])
            params = [p for p in params if not self.experts.is_sharded(p)]
        has = np.array([p.grad is not None for p in params], np.int32)
        self.allreduce_(has, "the gradient flags")   # (also the wait for the slowest backward)
        t0 = time.perf_counter()
        live = [p for p, h in zip(params, has) if h]
        start = 0
        while start < len(live):
            stop, nbytes = start, 0
            while stop < len(live) and (stop == start or nbytes + live[stop].data.nbytes <= BUCKET_BYTES):
                nbytes += live[stop].data.size * 4
                stop += 1
            group = live[start:stop]
            buf = np.empty(sum(p.data.size for p in group), np.float32)
            o = 0
            for p in group:
                n = p.data.size
                buf[o:o + n] = 0.0 if p.grad is None else np.asarray(p.grad, np.float32).reshape(-1)
                o += n
            self.allreduce_(buf, "the gradient all-reduce")
            o = 0
            for p in group:
                n = p.data.size
                p.grad = buf[o:o + n].reshape(p.data.shape).copy()
                o += n
            start = stop
        self.allreduce_seconds += time.perf_counter() - t0

    def grad_norm(self, params):
        """The global L2 norm of the (reduced) gradients of ``params``, the same on every rank."""
        params = list(params)
        if self.experts is not None:
            return self.experts.grad_norm(params)
        grads = [p.grad for p in params if p.grad is not None]
        return ops.grad_global_norm(grads) if grads else 0.0

    def clip_grad_norm_(self, params, max_norm, total_norm):
        """Scale the gradients by the factor of :func:`damex.ops.clip_grad_norm` for the global
        norm ``total_norm`` (:meth:`grad_norm`)."""
        scale = (math.nan if math.isnan(total_norm) else 0.0) if not math.isfinite(total_norm) \
            else min(max_norm / (total_norm + 1e-6), 1.0)
        if not scale >= 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad = (np.asarray(p.grad, np.float32) * np.float32(scale)).astype(np.float32)

    def gather_state(self, trainer):
        """``(model state, optimizer state)`` with every expert for rank 0 to write (every
        rank must call it); None without expert parallelism (rank 0's own state is whole)."""
        if self.experts is None:
            return None
        return self.experts.gather_state(trainer.model, trainer.optimizer)

    def local_parts(self, parts, trainer):
        """A checkpoint's ``parts`` cut to this rank's experts (unchanged without them)."""
        if self.experts is None:
            return parts
        return self.experts.local_parts(parts, trainer.model, trainer.optimizer)

    def any(self, flag):
        """True on every rank if ``flag`` is true on any rank.  Unbounded: called before
        every step, it also waits while rank 0 validates or writes a checkpoint (a rank that
        dies meanwhile still ends the job: the MPI launcher kills the others)."""
        buf = np.array([int(bool(flag))], np.int32)
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "the stop check",
                   bounded=False)
        return bool(buf[0])


class StateOf:
    """A state dict standing in for its model or optimizer (``state_dict()`` returns it)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def local_slice(batch, rank, size):
    """``(lo, hi)``: the contiguous images of ``rank`` in a global batch of ``batch``."""
    per = batch // size
    return rank * per, (rank + 1) * per


def world():
    """The :class:`World` of an MPI-launched job of more than one rank, else None (and
    mpi4py is not imported)."""
    global _WORLD
    if _WORLD is None and launched_size() > 1:
        _WORLD = World()
        if _WORLD.size == 1:
            _WORLD = None
    return _WORLD


_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SUPERVISED = "DAMEX_MPI_SUPERVISED"


def plain_env(env):
    """``env`` without the MPI launcher's variables: for a child process that is not a
    rank of this job (a study's worker)."""
    return {k: v for k, v in env.items()
            if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "MPI_LOCAL", _SUPERVISED))}


def launched_rank():
    """This process's rank as the MPI launcher announced it (None without one)."""
    for var in _RANK_VARS:
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return None


def supervise():
    """Run this rank's command in a child process and report how it ended.

    ``mpiexec`` names a rank that dies by a signal (SIGKILL, a segfault, the OOM killer)
    only by its process id; so each rank's launched process waits for a copy of its
    own command line and, when that copy is killed, prints ``damex: rank R of N ...
    was killed by signal S`` before ending by the same signal, which makes the
    launcher end the job as before.  The child dies with its parent (Linux
    ``PR_SET_PDEATHSIG``), signals to the parent are passed on (Ctrl-C still writes a
    checkpoint), and the launcher's
    PMI descriptor stays open in the child.  Returns in the child (the caller goes on
    with the command); never returns in the parent.  A no-op without an MPI launch of
    several ranks, off Linux, or with ``DAMEX_MPI_SUPERVISE=0``.
    """
    if os.environ.get(_SUPERVISED):
        _die_with_parent(int(os.environ[_SUPERVISED]))
        return
    if launched_size() <= 1 or not sys.platform.startswith("linux") or \
            os.environ.get("DAMEX_MPI_SUPERVISE", "1") == "0":
        return
    import signal
    import subprocess

    fds = [int(os.environ[v]) for v in ("PMI_FD",) if os.environ.get(v, "").isdigit()]
    env = dict(os.environ, **{_SUPERVISED: str(os.getpid())})
    # its own session: a signal the launcher sends to this process group reaches it once,
    # passed on by this process (a second SIGINT would interrupt a step at once)
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, pass_fds=fds,
                             start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, f: child.send_signal(s))
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:   # pragma: no cover - PEP 475 retries; kept for clarity
            continue
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        print(f"damex: rank {launched_rank()} of {launched_size()} (launched as pid {os.getpid()}, "
              f"run as pid {child.pid}) was killed by signal {-code} ({name}); the job ends",
              file=sys.stderr, flush=True)
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)   # end the same way, for the launcher to see
        os._exit(128 - code)
    os._exit(code)


def _die_with_parent(parent):
    """In a supervised rank: be killed when the supervising process goes (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # pragma: no cover - not Linux
        return
    if os.getppid() != parent:    # the parent went before prctl took effect
        os._exit(1)


def guard_ranks(func):
    """``func`` for a command run by several ranks: an exception on any rank ends the
    whole job (MPI_Abort) with a message naming the rank, instead of leaving the others
    waiting in a collective.  ``func`` itself when not launched under MPI."""
    if launched_size() <= 1:
        return func

    def guarded(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as e:   # noqa: BLE001 - any failure must end every rank
            if isinstance(e, SystemExit) and e.code in (0, None):
                raise
            try:
                w = world()
            except RuntimeError:    # no mpi4py: nothing to abort, every rank fails alike
                w = None
            if w is None:
                raise
            w.abort(f"{type(e).__name__}: {e}")
    return guarded
