"""The MoE module: a router and E expert FFNs around the fused MoE op."""
import math
from collections import namedtuple

import numpy as np

from .. import functional as F
from .. import routing as _routing
from ..autograd import as_tensor
from ..ops._check import choice, float_arg, int_arg
from . import init
from .module import Module, Parameter

__all__ = ["MoE", "MoEOutput"]

MoEOutput = namedtuple("MoEOutput", ["y", "aux_loss", "routing"])
MoEOutput.__doc__ = """What one MoE call returns: ``y`` (Tensor, the input's shape), ``aux_loss``
(Tensor of shape (), the weighted routing loss, part of the tape) and ``routing`` (dict of
NumPy arrays: ``expert_index``, ``combine_weight``, ``expert_count``, ``probs``,
``capacity``, ``kept``, ``routed``, ``dropped_fraction``, ``noise``, ``expert_target``,
``mask``, ``losses``: each unweighted loss value by name)."""


class MoE(Module):
    """Mixture-of-Experts FFN (SPEC section 2) with its routing losses.

    Parameters
    ----------
    d_model : int
        Token width D.
    d_hidden, num_experts : int, keyword-only
        Expert hidden width F and the number of experts E.
    k : int
        Experts per token (1 in DAMEX).
    capacity_factor : float or None
        Training-time capacity ``C = ceil(cf * k * T / E)``; None = dropless.
    capacity_sizing : {"uniform", "composition"}
        How training-time capacity is sized. ``"uniform"`` (default, the reference
        code): ``C = ceil(cf * k * T / E)``, an even share per expert, so a dataset that
        fills more than ``1/E`` of the batch loses tokens under DAMEX routing.
        ``"composition"``: when per-token targets are known (DAMEX training with
        ``dataset_ids``), ``C = ceil(cf * k * max_e T_e)`` with ``T_e`` the valid tokens
        whose target expert is ``e``, so the batch's most frequent expert has room for
        all of its tokens; without targets (eval, or balance routing) as ``"uniform"``.
    eval_capacity_factor : float or None
        Capacity in eval mode; None (default) = dropless, so every token reaches its
        expert whatever the batch (set it to ``capacity_factor`` to reproduce the
        reference code, which drops at inference too).
    bpr : bool
        Batch-prioritised slot filling (by decreasing top-1 probability).
    normalize : bool or str
        Renormalise the k combine weights (see ``damex.ops.router_forward``).
    gate_noise : float
        Training-mode router noise ``N(0, (gate_noise / E)^2)``; none in eval mode or when 0.
        Drawn from the forward context's stream of this module (see
        :class:`~damex.nn.context.ForwardContext`), else from the module's own Generator.
    activation : {"gelu_tanh", "gelu", "relu"}
    loss : one of ``damex.routing.LOSSES``
        ``damex``: ``damex_weight * L_damex`` (needs ``dataset_ids`` or ``expert_target``
        in forward, else contributes 0); ``balance``: ``importance_weight * L_imp +
        load_weight * L_load`` (the load loss needs gate noise, so only in training).
    damex_weight : float
        Default ``damex.routing.DAMEX_WEIGHT`` (0.1, the DAMEX reference setting).
    importance_weight, load_weight : float
        V-MoE/Tutel defaults 0.5/0.5 (the DAMEX seed's ``L_imp + L_load / 2`` is 1.0/0.5).
    switch_weight, z_weight : float
        Add the Switch/GShard loss and the ST-MoE router z-loss with these weights (0 = off).
    loss_options : dict, optional
        Per-loss options passed to ``damex.ops``, e.g. ``{"importance": {"variance":
        "unbiased"}, "switch": {"counts": "topk"}}``.
    dataset_to_expert : sequence of int, optional
        The map h from dataset id to expert (``damex.routing.expert_map``); default ``d % E``.
    seed : int or numpy.random.Generator
        Seeds the module's own gate-noise Generator (used without a forward context).

    Parameters of the module: ``w_router[D, E]`` (x @ w_router = logits), ``w1[E, D, F]``,
    ``b1[E, F]``, ``w2[E, F, D]``, ``b2[E, D]``, each expert initialised like a pair of
    nn.Linear layers (uniform in +-1/sqrt(fan_in)), the router like nn.Linear without bias.

    ``forward(x[..., D], ctx=None, dataset_ids=None, expert_target=None, mask=None)`` returns
    a :class:`MoEOutput` ``(y, aux_loss, routing)``.  ``dataset_ids`` or ``expert_target``
    are per token (shape ``x.shape[:-1]``) or per image along the leading axes (then
    broadcast over the trailing token axes); ``mask`` is True for real tokens and False
    for padding.
    """

    def __init__(self, d_model, *, d_hidden, num_experts, k=1, capacity_factor=1.25,
                 capacity_sizing="uniform", eval_capacity_factor=None, bpr=True, normalize=False, gate_noise=1.0,
                 activation="gelu_tanh", loss="damex", damex_weight=_routing.DAMEX_WEIGHT,
                 importance_weight=0.5, load_weight=0.5, switch_weight=0.0, z_weight=0.0,
                 loss_options=None, dataset_to_expert=None, seed=0):
        super().__init__()
        D = int_arg(d_model, "d_model", lo=1)
        Fh = int_arg(d_hidden, "d_hidden", lo=1)
        E = int_arg(num_experts, "num_experts", lo=1)
        self.d_model, self.num_experts, self.d_hidden = D, E, Fh
        self.k = int_arg(k, "k", lo=1, hi=E)
        cf = lambda v, n: None if v is None else float_arg(v, n, positive=True)  # noqa: E731
        self.capacity_factor = cf(capacity_factor, "capacity_factor")
        self.eval_capacity_factor = cf(eval_capacity_factor, "eval_capacity_factor")
        choice(capacity_sizing, "capacity_sizing", ("uniform", "composition"))
        self.capacity_sizing = capacity_sizing
        self.bpr, self.normalize = bool(bpr), normalize
        self.gate_noise = float_arg(gate_noise, "gate_noise", nonneg=True)
        choice(activation, "activation", ("gelu_tanh", "gelu", "relu"))
        self.activation = activation
        self.loss = _routing.check_loss(loss)
        for name, v in (("damex_weight", damex_weight), ("importance_weight", importance_weight),
                        ("load_weight", load_weight), ("switch_weight", switch_weight),
                        ("z_weight", z_weight)):
            setattr(self, name, float_arg(v, name, nonneg=True))
        self.loss_options = {k_: dict(v) for k_, v in (loss_options or {}).items()}
        unknown = set(self.loss_options) - set(F.ROUTING_LOSSES)
        if unknown:
            raise ValueError(f"MoE: loss_options has unknown losses {sorted(unknown)}; "
                             f"expected names from {list(F.ROUTING_LOSSES)}")
        self.dataset_to_expert = (None if dataset_to_expert is None or len(dataset_to_expert) == 0
                                  else _routing.expert_map(dataset_to_expert, E))
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        # set by damex.engine.expert_parallel when this layer's experts are sharded over MPI ranks
        # (w1..b2 then hold only this rank's experts)
        self.expert_parallel = None
        self.w_router = Parameter(np.zeros((D, E), np.float32))
        self.w1 = Parameter(np.zeros((E, D, Fh), np.float32))
        self.b1 = Parameter(np.zeros((E, Fh), np.float32))
        self.w2 = Parameter(np.zeros((E, Fh, D), np.float32))
        self.b2 = Parameter(np.zeros((E, D), np.float32))
        self.reset_parameters()

    def reset_parameters(self, rng=None):
        bd, bf = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_hidden)
        init.uniform_(self.w_router, -bd, bd, rng)
        init.uniform_(self.w1, -bd, bd, rng)
        init.uniform_(self.b1, -bd, bd, rng)
        init.uniform_(self.w2, -bf, bf, rng)
        init.uniform_(self.b2, -bf, bf, rng)

    @property
    def sigma(self):
        return self.gate_noise / self.num_experts

    @property
    def active_capacity_factor(self):
        """The capacity factor of the current mode (training or eval)."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def capacity_factor_for(self, target, mask):
        """The capacity factor passed to the router for one call: the active one, or
        under ``capacity_sizing="composition"`` in training with targets, the factor whose
        capacity is ``ceil(cf * k * max_e T_e)`` (see the class docstring)."""
        cf = self.active_capacity_factor
        if cf is None or not self.training or self.capacity_sizing == "uniform" or target is None:
            return cf
        valid = target if mask is None else target[mask]
        if valid.size == 0:
            return cf
        need = math.ceil(cf * self.k * np.bincount(valid, minlength=self.num_experts).max())
        # the router computes ceil(f * k * T_valid / E): (need - 1/2) keeps that ceil at `need`
        return (need - 0.5) * self.num_experts / (self.k * valid.size)

    def _per_token(self, a, lead, name):
        a = np.asarray(a)
        if a.dtype.kind not in "iu":
            raise TypeError(f"MoE: {name} must be an integer array, got dtype {a.dtype}")
        if a.shape != lead:
            if a.shape != lead[:a.ndim]:
                raise ValueError(f"MoE: {name} must have shape {lead} (per token) or a leading "
                                 f"part of it (per image), got {a.shape}")
            a = np.broadcast_to(a.reshape(a.shape + (1,) * (len(lead) - a.ndim)), lead)
        return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)

    def expert_targets(self, dataset_ids, lead):
        """Per-token target experts h(d) of ``dataset_ids`` (flattened)."""
        ids = self._per_token(dataset_ids, lead, "dataset_ids")
        return _routing.expert_targets(ids, self.dataset_to_expert, self.num_experts)

    def _losses(self, target, noise):
        opts = self.loss_options
        losses = []
        if "damex" in self.loss and target is not None:
            losses.append(("damex", self.damex_weight, dict(opts.get("damex", {}), expert_target=target)))
        if "balance" in self.loss:
            losses.append(("importance", self.importance_weight, opts.get("importance", {})))
            if noise is not None:
                losses.append(("load", self.load_weight, dict(opts.get("load", {}), sigma=self.sigma)))
        if self.switch_weight:
            losses.append(("switch", self.switch_weight, opts.get("switch", {})))
        if self.z_weight:
            losses.append(("z", self.z_weight, opts.get("z", {})))
        return losses

    def forward(self, x, ctx=None, dataset_ids=None, expert_target=None, mask=None, noise=None):
        """Route and run the experts (see the class docstring); ``noise [T, E]`` replaces
        the gate noise the module would draw, to replay a step exactly.  Returns a
        :class:`MoEOutput`."""
        x = as_tensor(x)
        lead, D = x.shape[:-1], x.shape[-1]
        if D != self.d_model:
            raise ValueError(f"MoE: x must have last dim {self.d_model}, got shape {x.shape}")
        T, E = int(np.prod(lead)), self.num_experts
        xt = x.reshape(T, D)
        target = None
        if expert_target is not None:
            target = self._per_token(expert_target, lead, "expert_target")
        elif dataset_ids is not None:
            target = self.expert_targets(dataset_ids, lead)
        m = None
        if mask is not None:
            m = np.ascontiguousarray(np.broadcast_to(np.asarray(mask, bool), lead).reshape(-1))
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.shape != (T, E):
                raise ValueError(f"MoE: noise must have shape ({T}, {E}), got {noise.shape}")
        if self.expert_parallel is not None:   # experts sharded over MPI ranks: the routing is
            # decided over every rank's tokens, the gate noise drawn for them all (this rank's rows)
            y, aux, r, noise, values = self.expert_parallel.moe(self, xt, ctx, target, m, noise)
        else:
            if noise is None and self.training and self.gate_noise > 0:
                rng = self._rng if ctx is None else ctx.rng(self)
                noise = rng.normal(0.0, self.sigma, (T, E)).astype(np.float32)
            values = {}
            y, aux, state = F.moe(xt, self.w_router, self.w1, self.b1, self.w2, self.b2, k=self.k,
                                  noise=noise, capacity_factor=self.capacity_factor_for(target, m),
                                  bpr=self.bpr, normalize=self.normalize, activation=self.activation,
                                  mask=m, losses=self._losses(target, noise), loss_values=values)
            r = state.router
        routed = (T if m is None else int(m.sum())) * self.k
        kept = int(np.asarray(r.expert_count).sum())
        routing = {
            "expert_index": r.expert_index, "combine_weight": r.combine_weight,
            "expert_count": r.expert_count, "probs": r.probs, "capacity": r.capacity,
            "kept": kept, "routed": routed, "dropped_fraction": _routing.dropped_fraction(kept, routed),
            "noise": noise, "expert_target": target, "mask": m, "losses": values,
        }
        return MoEOutput(y.reshape(*lead, D), aux, routing)

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
                f"k={self.k}, capacity_factor={self.capacity_factor}, "
                f"capacity_sizing={self.capacity_sizing!r}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, bpr={self.bpr}, "
                f"gate_noise={self.gate_noise}, loss={self.loss!r}")
