"""The MoE module: a router and E expert FFNs around the fused MoE op."""
import math

import numpy as np

from .. import functional as F
from .. import ops as _ops
from ..autograd import as_tensor
from . import init
from .module import Module, Parameter

__all__ = ["MoE"]

LOSS_MODES = ("damex", "balance", "damex+balance", "none")


class MoE(Module):
    """Mixture-of-Experts FFN (SPEC section 2) with its routing losses.

    Parameters
    ----------
    d_model, num_experts, hidden_dim : int
        Token width D, experts E, expert hidden width F.
    k : int
        Experts per token (1 in DAMEX).
    capacity_factor : float or None
        None = dropless (every token-slot kept).
    bpr : bool
        Batch-prioritised slot filling (by decreasing top-1 probability).
    normalize : bool or str
        Renormalise the k combine weights (see ``damex.ops.router_forward``).
    gate_noise : float
        Training-mode router noise ``N(0, (gate_noise / E)^2)`` drawn from the module's
        Generator (``seed``); none in eval mode or when 0.
    activation : {"gelu_tanh", "gelu", "relu"}
    loss : {"damex", "balance", "damex+balance", "none"}
        ``damex``: ``damex_weight * L_damex`` (needs ``dataset_ids`` or ``expert_target``
        in forward, else contributes 0); ``balance``: ``importance_weight * L_imp +
        load_weight * L_load`` (the load loss needs gate noise, so only in training).
    switch_weight, z_weight : float
        Add the Switch/GShard loss and the ST-MoE router z-loss with these weights (0 = off).
    loss_options : dict, optional
        Per-loss options passed to ``damex.ops``, e.g. ``{"importance": {"variance":
        "unbiased"}, "switch": {"counts": "topk"}}``.
    dataset_to_expert : sequence of int, optional
        The map h from dataset id to expert; default ``d % E``.
    seed : int, optional
        Seeds the gate-noise Generator.

    Parameters of the module: ``w_router[D, E]`` (x @ w_router = logits), ``w1[E, D, F]``,
    ``b1[E, F]``, ``w2[E, F, D]``, ``b2[E, D]``, each expert initialised like a pair of
    nn.Linear layers (uniform in +-1/sqrt(fan_in)), the router like nn.Linear without bias.

    ``forward(x[..., D], dataset_ids=None, expert_target=None, mask=None)`` returns
    ``y[..., D]`` and sets ``self.aux_loss`` (a Tensor of shape (), part of the tape) and
    ``self.routing`` (a dict of NumPy arrays: ``expert_index``, ``combine_weight``,
    ``expert_count``, ``probs``, ``capacity``, ``dropped_fraction``, ``noise``,
    ``expert_target``, ``mask``, ``losses``: each unweighted loss value by name).  ``dataset_ids`` or
    ``expert_target`` are per token (shape ``x.shape[:-1]``) or per image along the
    leading axes (then broadcast over the trailing token axes); ``mask`` is True for real
    tokens and False for padding.
    """

    def __init__(self, d_model, num_experts, hidden_dim, k=1, capacity_factor=None, bpr=True,
                 normalize=False, gate_noise=1.0, activation="gelu_tanh", loss="damex",
                 damex_weight=1.0, importance_weight=0.5, load_weight=0.5, switch_weight=0.0,
                 z_weight=0.0, loss_options=None, dataset_to_expert=None, seed=0):
        super().__init__()
        if loss not in LOSS_MODES:
            raise ValueError(f"MoE: loss must be one of {list(LOSS_MODES)}, got {loss!r}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoE: k must be in [1, num_experts={num_experts}], got {k}")
        D, E, Fh = int(d_model), int(num_experts), int(hidden_dim)
        self.d_model, self.num_experts, self.hidden_dim, self.k = D, E, Fh, int(k)
        self.capacity_factor, self.bpr, self.normalize = capacity_factor, bool(bpr), normalize
        self.gate_noise, self.activation, self.loss = float(gate_noise), activation, loss
        self.damex_weight, self.importance_weight, self.load_weight = damex_weight, importance_weight, load_weight
        self.switch_weight, self.z_weight = switch_weight, z_weight
        self.loss_options = {k_: dict(v) for k_, v in (loss_options or {}).items()}
        unknown = set(self.loss_options) - set(F.ROUTING_LOSSES)
        if unknown:
            raise ValueError(f"MoE: loss_options has unknown losses {sorted(unknown)}; "
                             f"expected names from {list(F.ROUTING_LOSSES)}")
        self.dataset_to_expert = None if dataset_to_expert is None else np.asarray(dataset_to_expert, np.int64)
        self.rng = np.random.default_rng(seed)
        self.w_router = Parameter(np.zeros((D, E), np.float32))
        self.w1 = Parameter(np.zeros((E, D, Fh), np.float32))
        self.b1 = Parameter(np.zeros((E, Fh), np.float32))
        self.w2 = Parameter(np.zeros((E, Fh, D), np.float32))
        self.b2 = Parameter(np.zeros((E, D), np.float32))
        self.aux_loss = None
        self.routing = None
        self.reset_parameters()

    def reset_parameters(self, rng=None):
        bd, bf = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.hidden_dim)
        init.uniform_(self.w_router, -bd, bd, rng)
        init.uniform_(self.w1, -bd, bd, rng)
        init.uniform_(self.b1, -bd, bd, rng)
        init.uniform_(self.w2, -bf, bf, rng)
        init.uniform_(self.b2, -bf, bf, rng)

    @property
    def sigma(self):
        return self.gate_noise / self.num_experts

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
        mapping = self.dataset_to_expert
        if mapping is None:
            mapping = np.arange(int(ids.max()) + 1 if ids.size else 1, dtype=np.int64) % self.num_experts
        return _ops.dataset_to_expert(ids, mapping, self.num_experts)

    def forward(self, x, dataset_ids=None, expert_target=None, mask=None, noise=None):
        """Route and run the experts (see the class docstring); ``noise [T, E]`` replaces
        the gate noise the module would draw, to replay a step exactly."""
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
        elif self.training and self.gate_noise > 0:
            noise = self.rng.normal(0.0, self.sigma, (T, E)).astype(np.float32)
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
        values = {}
        y, aux, state = F.moe(xt, self.w_router, self.w1, self.b1, self.w2, self.b2, k=self.k,
                              noise=noise, capacity_factor=self.capacity_factor, bpr=self.bpr,
                              normalize=self.normalize, activation=self.activation, mask=m,
                              losses=losses, loss_values=values)
        self.aux_loss = aux
        r = state.router
        valid = T if m is None else int(m.sum())
        kept = int(np.asarray(r.expert_count).sum())
        self.routing = {
            "expert_index": r.expert_index, "combine_weight": r.combine_weight,
            "expert_count": r.expert_count, "probs": r.probs, "capacity": r.capacity,
            "dropped_fraction": 1.0 - kept / max(valid * self.k, 1), "noise": noise,
            "expert_target": target, "mask": m, "losses": values,
        }
        return y.reshape(*lead, D)

    def extra_repr(self):
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"k={self.k}, capacity_factor={self.capacity_factor}, bpr={self.bpr}, "
                f"gate_noise={self.gate_noise}, loss={self.loss!r}")

