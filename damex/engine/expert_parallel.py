"""Expert parallelism over MPI: ``"parallel": "data+experts"`` in the train section.

The ranks form groups of ``G = train.expert_ranks`` (default: all of them); within a
group each rank holds ``E / G`` experts of every MoE layer (``w1 .. b2`` are cut to
those rows), and the groups are data-parallel replicas of one another.  One MoE call
on a rank's tokens ``x [T_r, D]``:

1. the rank's router logits ``x @ w_router [T_r, E]`` (plus padding mask and DAMEX
   target) are gathered from every rank (``Allgatherv``; T x E floats, small), the
   gate noise is drawn for all T tokens from the layer's stream (this rank keeps its
   rows), and every rank routes the whole batch with the single-process router
   (:func:`damex.ops.router_forward`: capacity over the global token count, BPR
   order over the global batch).  So the routing, the kept slots and the routing
   losses are the single-process ones, decided identically everywhere;
2. the rank's kept rows are packed by expert (the C dispatch, in the global slot
   order) and sent to the group rank holding each expert (``Alltoallv``; the counts
   follow from the shared routing, so no ``Alltoall`` of counts is needed); the
   holder puts the rows it receives in the single-process packed order and runs
   its experts (the C expert FFN), and the outputs go back the same way into the C
   combine;
3. the backward is the mirror: the combine gradient of the rows goes to the
   holder, the expert FFN backward there, the input-row gradient comes back into
   the dispatch backward.  The routing losses' gradient is the single-process one's
   rows of this rank.

Expert gradients stay on the ranks that hold the experts (summed only over the
replicas, across groups); the other gradients are all-reduced as in data
parallelism.  The global gradient norm adds the shards' squares.  A checkpoint
holds every expert (gathered by the first group to its rank 0, which writes it);
loading cuts it again for any number of ranks.
"""
import numpy as np

from .. import ops
from ..autograd import as_tensor, record
from ..functional import _loss_args, _loss_fns
from ..nn.module import Parameter
from ..nn.moe import MoE
from ..ops._check import NonFiniteInputError
from ..ops.router import RouterResult

__all__ = ["ExpertParallel", "EXPERT_PARAMS"]

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")   # the per-expert parameters of damex.nn.MoE, expert first


class ExpertParallel:
    """The expert sharding of one job (see the module docstring).

    Parameters
    ----------
    world : damex.engine.distributed.World
    group_size : int or None
        Ranks per expert group (``None`` = every rank); must divide the world size.
    """

    def __init__(self, world, group_size=None):
        G = world.size if not group_size else int(group_size)
        if world.size % G:
            raise ValueError(f"data+experts: train.expert_ranks {G} does not divide the {world.size} "
                             "ranks (each expert group has the same number of ranks)")
        self.world, self.G = world, G
        self.gindex, self.grank = divmod(world.rank, G)
        comm = world.comm
        self.group = comm.Split(self.gindex, world.rank)      # the ranks that share out the experts
        self.replicas = comm.Split(self.grank, world.rank)    # the ranks holding the same experts
        self.loss_share = 1.0     # this rank's share of the loss (set per step by World)
        self._sharded = {}        # id(parameter) -> the layer's expert count E

    # -- the model ------------------------------------------------------------------

    def shard(self, model):
        """Cut every MoE layer of ``model`` to this rank's experts (in place, before the
        optimizer is built); a layer whose experts the group does not divide is refused."""
        for name, m in model.named_modules():
            if not isinstance(m, MoE):
                continue
            E = m.num_experts
            if E % self.G:
                raise ValueError(f"data+experts: {name or 'the model'} has {E} experts, not divisible "
                                 f"by the {self.G} ranks of an expert group (choose N or "
                                 "train.expert_ranks dividing the experts)")
            lo, hi = self.expert_range(E)
            for p in EXPERT_PARAMS:
                full = m._parameters[p]
                part = Parameter(np.ascontiguousarray(full.data[lo:hi]))
                m._parameters[p] = part        # in place: the parameter order stays the same
                self._sharded[id(part)] = E
            m.expert_parallel = self

    def expert_range(self, E):
        """``(lo, hi)``: the experts of this rank in a layer of ``E``."""
        per = E // self.G
        return self.grank * per, (self.grank + 1) * per

    def is_sharded(self, p):
        return id(p) in self._sharded

    # -- the layer ------------------------------------------------------------------

    def moe(self, layer, x, ctx, target, mask, noise):
        """One expert-parallel MoE call on this rank's tokens ``x [T_r, D]`` (a Tensor);
        returns ``(y [T_r, D], aux_loss, RouterResult of this rank's tokens, noise rows,
        loss values)`` as :meth:`damex.nn.MoE.forward` uses them."""
        w = self.world
        x = as_tensor(x)
        T, D = x.shape
        E, k = layer.num_experts, layer.k
        wr = layer.w_router
        try:   # the clean logits of this rank's tokens (the C router, so the same float ops)
            logits, bad = ops.router_forward(x.data, wr.data, k=k).logits, 0
        except NonFiniteInputError:
            logits, bad = np.zeros((T, E), np.float32), 1
        head = w.allgather_array(np.array([T, bad, mask is not None, target is not None,
                                           noise is not None], np.int64), "the MoE token counts")
        head = head.reshape(w.size, 5)
        if head[:, 1].any():   # raised on every rank alike: the step can be skipped
            err = NonFiniteInputError(f"router_forward: the tokens of rank(s) "
                                      f"{np.flatnonzero(head[:, 1]).tolist()} hold NaN or inf "
                                      f"(x @ w_router is not finite)")
            err.every_rank = True
            raise err
        counts = head[:, 0]
        starts = np.concatenate([[0], np.cumsum(counts)])
        t0, Tg = int(starts[w.rank]), int(starts[-1])
        cols = [logits]
        with_mask, with_target, with_noise = (bool(head[:, i].any()) for i in (2, 3, 4))
        if with_mask:
            cols.append((np.ones(T, bool) if mask is None else mask).astype(np.float32)[:, None])
        if with_target:   # expert indices: exact in float32
            cols.append((np.full(T, -1) if target is None else target).astype(np.float32)[:, None])
        if with_noise:
            cols.append(np.zeros((T, E), np.float32) if noise is None else noise)
        rows = np.ascontiguousarray(np.concatenate(cols, axis=1), np.float32)
        allrows = w.allgatherv_rows(rows, counts, "the router logits")
        logits_g, c = allrows[:, :E], E
        mask_g = target_g = noise_g = None
        if with_mask:
            mask_g, c = allrows[:, c] > 0.5, c + 1
        if with_target:
            target_g, c = allrows[:, c].astype(np.int64), c + 1
        if with_noise:
            noise_g = np.ascontiguousarray(allrows[:, c:c + E])
        elif layer.training and layer.gate_noise > 0:   # the single-process draw, for all tokens
            rng = layer._rng if ctx is None else ctx.rng(layer)
            noise_g = rng.normal(0.0, layer.sigma, (Tg, E)).astype(np.float32)
        logits_g = np.ascontiguousarray(logits_g)
        # logits_g @ I == logits_g exactly: the single-process routing of the global batch
        res = ops.router_forward(logits_g, np.eye(E, dtype=np.float32), k=k, noise=noise_g,
                                 capacity_factor=layer.capacity_factor_for(target_g, mask_g), bpr=layer.bpr,
                                 normalize=layer.normalize, mask=mask_g)
        values, specs, aux = {}, [], 0.0
        for name, weight, kwargs in layer._losses(target_g, noise_g):
            fwd, bwd = _loss_fns(name)
            args, kw = _loss_args(name, kwargs or {}, noise=noise_g, k=k, mask=mask_g)
            values[name] = float(fwd(logits_g, *args, **kw))
            aux += float(weight) * values[name]
            specs.append((bwd, float(weight), args, kw))
        local, plan = self._plan(res, starts, t0, T)
        params = [x, wr] + [getattr(layer, p) for p in EXPERT_PARAMS]
        w1, b1, w2, b2 = (p.data for p in params[2:])
        xs = ops.dispatch_forward(x.data, local)               # this rank's rows, by expert
        xe = self._exchange(xs, plan, "the MoE dispatch")[plan.perm]
        ye, saved = ops.expert_ffn_forward(xe, plan.expert_count, w1, b1, w2, b2, layer.activation)
        ye_send = self._exchange(self._unpermute(ye, plan), plan, "the MoE combine", back=True)
        y = ops.combine_forward(ye_send, local)
        share = self.loss_share

        def backward(gs):
            dy, daux = gs
            dye_send, dcw = ops.combine_backward(dy, ye_send, local)
            dye = self._exchange(dye_send, plan, "the MoE combine backward")[plan.perm]
            dxe, dw1, db1, dw2, db2 = ops.expert_ffn_backward(dye, saved)
            dxs = self._exchange(self._unpermute(dxe, plan), plan, "the MoE dispatch backward",
                                 back=True)
            dx = ops.dispatch_backward(dxs, local, T)
            dl = ops.router_backward(dcw, local)
            daux = float(daux)
            if specs and daux != 0.0:
                # every rank holds the global loss, weighted by its share in the step's loss;
                # its tokens' rows of the gradient are the single-process ones
                scale = daux / share
                dlg = np.zeros_like(logits_g)
                for bwd, weight, args, kw in specs:
                    dlg += bwd(logits_g, *args, **kw, dy=weight * scale)
                dl += dlg[t0:t0 + T]
            dx2, dwr = ops.router_logits_backward(dl, x.data, wr.data)
            dx += dx2
            return dx, dwr, dw1, db1, dw2, db2

        y_t, aux_t = record((y, np.asarray(aux, np.float32)), params, backward, "moe_expert_parallel")
        return y_t, aux_t, local, None if noise_g is None else noise_g[t0:t0 + T], values

    def _plan(self, res, starts, t0, T):
        """This rank's tokens' RouterResult (slots renumbered within the rank's rows, in
        the global slot order) and the exchange plan of the group."""
        E = res.num_experts
        slot_g, ei_g = res.slot, res.expert_index
        # this rank's tokens
        ei, sl = ei_g[t0:t0 + T], slot_g[t0:t0 + T]
        kept = sl >= 0
        e_k = ei[kept]
        order = np.argsort(res.offset[e_k] + sl[kept], kind="stable")
        pos = np.empty(order.size, np.int64)
        pos[order] = np.arange(order.size)
        count = np.bincount(e_k, minlength=E).astype(np.int64)
        offset = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        slot = np.full(sl.shape, -1, np.int64)
        slot[kept] = pos - offset[e_k]
        r = slice(t0, t0 + T)
        local = RouterResult(res.logits[r], res.noisy_logits[r], res.probs[r], ei,
                             res.combine_weight[r], slot, count, offset, res.capacity, res.k,
                             res.capacity_factor, res.bpr, res.normalize,
                             None if res.mask is None else res.mask[r])
        per = E // self.G
        send = count.reshape(self.G, per).sum(axis=1)
        # the rows this rank's experts receive: tokens of the group's ranks, kept, to them
        lo, hi = self.grank * per, (self.grank + 1) * per
        tk, jk = np.nonzero(slot_g >= 0)
        e = ei_g[tk, jk]
        src = np.searchsorted(starts, tk, side="right") - 1
        first = self.gindex * self.G
        sel = (e >= lo) & (e < hi) & (src >= first) & (src < first + self.G)
        g = res.offset[e[sel]] + slot_g[tk[sel], jk[sel]]
        src = src[sel] - first
        recv_order = np.lexsort((g, src))         # how they arrive: by sender, then slot order
        plan = _Plan(send, np.bincount(src, minlength=self.G).astype(np.int64),
                     np.argsort(g[recv_order], kind="stable"),
                     np.bincount(e[sel] - lo, minlength=per).astype(np.int64))
        return local, plan

    @staticmethod
    def _unpermute(rows, plan):
        out = np.empty_like(rows)
        out[plan.perm] = rows
        return out

    def _exchange(self, rows, plan, what, back=False):
        """Alltoallv of packed rows within the group: to the experts' holders (or ``back``)."""
        send, recv = (plan.recv, plan.send) if back else (plan.send, plan.recv)
        D = rows.shape[1] if rows.ndim == 2 else 0
        out = np.empty((int(recv.sum()), D), np.float32)
        MPI = self.world.MPI
        sc, rc = send * D, recv * D
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
        rows = np.ascontiguousarray(rows, np.float32)
        req = self.group.Ialltoallv([rows, (sc, sd), MPI.FLOAT], [out, (rc, rd), MPI.FLOAT])
        self.world.wait(req, what)
        return out

    # -- gradients ------------------------------------------------------------------

    def reduce_expert_gradients(self, params):
        """Sum the expert gradients over the replicas (the ranks holding the same experts)."""
        if self.replicas.Get_size() == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = np.zeros_like(p.data)
            g = np.ascontiguousarray(p.grad, np.float32)
            self.world.wait(self.replicas.Iallreduce(self.world.MPI.IN_PLACE, g, op=self.world.MPI.SUM),
                            "the expert gradient all-reduce")
            p.grad = g

    def grad_norm(self, params):
        """The global L2 norm of the gradients: the replicated ones once, the expert shards
        summed over the group (the same float on every rank)."""
        shared = [p.grad for p in params if p.grad is not None and not self.is_sharded(p)]
        mine = [p.grad for p in params if p.grad is not None and self.is_sharded(p)]
        sq = np.array([ops.grad_global_norm(mine) ** 2 if mine else 0.0], np.float64)
        self.world.wait(self.group.Iallreduce(self.world.MPI.IN_PLACE, sq, op=self.world.MPI.SUM),
                        "the gradient norm")
        base = ops.grad_global_norm(shared) if shared else 0.0
        return float(np.sqrt(base * base + sq[0]))

    # -- checkpoints ----------------------------------------------------------------

    def _sharded_keys(self, model, optimizer):
        """``{state key: E}`` of the model and optimizer entries cut by expert."""
        keys = {}
        for name, p in model.named_parameters():
            if self.is_sharded(p):
                keys[f"model.{name}"] = self._sharded[id(p)]
        if optimizer is not None:
            for i, (_, p) in enumerate(optimizer._params()):
                if self.is_sharded(p):
                    keys[f"optim.state.{i}."] = self._sharded[id(p)]
        return keys

    def _match(self, keys, key):
        if key in keys:
            return keys[key]
        if key.startswith("optim.state."):
            head = key[:key.rindex(".") + 1]
            if head in keys and not key.endswith(".step"):
                return keys[head]
        return None

    def gather_state(self, model, optimizer):
        """``(model state, optimizer state)`` with every expert, on the group-0 ranks (the
        first group's rank 0 writes it); ``(None, None)`` on the other groups.  Every rank
        of group 0 must call it."""
        if self.gindex != 0:
            return None, None
        keys = self._sharded_keys(model, optimizer)
        states = {"model.": model.state_dict(), "optim.": optimizer.state_dict()}
        out = {}
        for prefix, state in states.items():
            full = {}
            for k, v in state.items():
                E = self._match(keys, prefix + k)
                if E is None:
                    full[k] = v
                    continue
                v = np.ascontiguousarray(v)
                buf = np.empty((self.G,) + v.shape, v.dtype)
                self.world.wait(self.group.Iallgather(v, buf), "the checkpoint gather")
                full[k] = buf.reshape((E,) + v.shape[1:])
            out[prefix] = full
        return out["model."], out["optim."]

    def local_parts(self, parts, model, optimizer):
        """A checkpoint's ``parts`` (with every expert) cut to this rank's experts."""
        keys = self._sharded_keys(model, optimizer)
        out = {}
        for part, state in parts.items():
            cut = {}
            for k, v in state.items():
                E = self._match(keys, f"{part}.{k}")
                if E is not None and np.ndim(v) >= 1 and np.shape(v)[0] == E:
                    lo, hi = self.expert_range(E)
                    v = np.ascontiguousarray(v[lo:hi])
                cut[k] = v
            out[part] = cut
        return out


class _Plan:
    """Rows this rank sends to / receives from each group rank, the permutation from
    arrival order to the packed expert order, and the row count of each local expert."""

    __slots__ = ("send", "recv", "perm", "expert_count")

    def __init__(self, send, recv, perm, expert_count):
        self.send, self.recv, self.perm, self.expert_count = send, recv, perm, expert_count
