"""A self-contained MoE layer on NumPy arrays: parameters, gate noise, the
routing losses and routing statistics around ``ops.moe_forward/backward``.

This is the object a researcher uses without the autograd tape::

    layer = damex.MoELayer(256, 1024, num_experts=8, loss="damex",
                           dataset_to_expert=[0, 1, 2, 2], seed=0)
    y = layer.forward(x, dataset_ids=ids)        # x [T, D], ids [T]
    total = task_loss(y) + layer.aux_loss
    dx = layer.backward(dy)                       # fills layer.grads
    layer.routing_stats()["dataset_expert"]       # [datasets, E] token counts

``damex.nn.MoE`` wraps the same maths as a module of the tape.
"""
import math

import numpy as np

from . import ops
from .ops._check import choice, float_arg, int_arg

LOSS_MODES = ("damex", "balance", "damex+balance", "none")


class MoELayer:
    """Mixture-of-Experts FFN with top-k routing (SPEC section 2).

    Parameters
    ----------
    d_model, d_hidden : int
        Token width D and expert hidden width F.
    num_experts : int
        E.
    k : int
        Experts per token (1 in DAMEX).
    capacity_factor : float or None
        ``C = ceil(cf * k * T / E)`` slots per expert; None is dropless.
    bpr : bool
        Batch-prioritised routing (fill slots in decreasing top-1 probability).
    normalize : bool or {"before_drop", "after_drop"}
        Renormalise combine weights over the selected k (GShard); False as V-MoE/DAMEX.
    gate_noise : float
        Training-time gate noise, sigma = gate_noise / E (0 disables).
    activation : {"gelu_tanh", "gelu", "relu"}
    loss : {"damex", "balance", "damex+balance", "none"}
        Which routing loss :attr:`aux_loss` holds.  ``damex`` needs ``dataset_ids``.
    damex_weight : float
        Weight of the DAMEX loss (the reference setting is 0.1, applied here).
    importance_weight, load_weight : float
        Weights of the V-MoE balance terms (defaults 0.5/0.5 as V-MoE and Tutel;
        the DAMEX seed's ``L_imp + L_load / 2`` is 1.0/0.5).
    switch_weight, z_weight : float
        Optional Switch/GShard load loss and ST-MoE router z-loss, added in any mode.
    dataset_to_expert : sequence of int, optional
        The map h: dataset id -> expert (many-to-one allowed).
    seed : int or numpy.random.Generator
        Seeds the initialisation and the gate noise.
    """

    def __init__(self, d_model, d_hidden, num_experts, *, k=1, capacity_factor=1.25, bpr=True,
                 normalize=False, gate_noise=1.0, activation="gelu_tanh", loss="damex",
                 damex_weight=0.1, importance_weight=0.5, load_weight=0.5, switch_weight=0.0,
                 z_weight=0.0, dataset_to_expert=None, seed=0):
        D = int_arg(d_model, "d_model", lo=1)
        F = int_arg(d_hidden, "d_hidden", lo=1)
        E = int_arg(num_experts, "num_experts", lo=1)
        self.k = int_arg(k, "k", lo=1, hi=E)
        if capacity_factor is not None:
            capacity_factor = float_arg(capacity_factor, "capacity_factor", positive=True)
        self.capacity_factor = capacity_factor
        self.bpr = bool(bpr)
        self.normalize = normalize
        self.gate_noise = float_arg(gate_noise, "gate_noise", nonneg=True)
        choice(activation, "activation", ops.ACTIVATIONS)
        self.activation = activation
        choice(loss, "loss", LOSS_MODES)
        self.loss = loss
        self.weights = {
            "damex": float_arg(damex_weight, "damex_weight", nonneg=True),
            "importance": float_arg(importance_weight, "importance_weight", nonneg=True),
            "load": float_arg(load_weight, "load_weight", nonneg=True),
            "switch": float_arg(switch_weight, "switch_weight", nonneg=True),
            "z": float_arg(z_weight, "z_weight", nonneg=True),
        }
        if dataset_to_expert is not None:
            dataset_to_expert = np.asarray(dataset_to_expert, dtype=np.int64).copy()
            if dataset_to_expert.ndim != 1 or ((dataset_to_expert < 0) | (dataset_to_expert >= E)).any():
                raise ValueError(f"dataset_to_expert: expected expert ids in [0, {E}), got {dataset_to_expert.tolist()}")
        elif "damex" in loss:
            raise ValueError("dataset_to_expert: required when loss uses the DAMEX loss")
        self.dataset_to_expert = dataset_to_expert
        self.d_model, self.d_hidden, self.num_experts = D, F, E
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.params = self._init_params()
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.training = True
        self._state = None
        self._dataset_ids = None
        self.aux_loss = 0.0
        self.loss_terms = {}

    # -- parameters ---------------------------------------------------------

    def _init_params(self):
        """nn.Linear's default init, as Tutel and DAMEX use: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        D, F, E, rng = self.d_model, self.d_hidden, self.num_experts, self.rng

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return rng.uniform(-bound, bound, size=shape).astype(np.float32)

        return {"w_router": uniform((D, E), D), "w1": uniform((E, D, F), D),
                "b1": uniform((E, F), D), "w2": uniform((E, F, D), F), "b2": uniform((E, D), F)}

    def zero_grad(self):
        for g in self.grads.values():
            g.fill(0.0)

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def sigma(self):
        """Standard deviation of the gate noise, gate_noise / E."""
        return self.gate_noise / self.num_experts

    # -- forward / backward -------------------------------------------------

    def forward(self, x, dataset_ids=None, mask=None, noise=None):
        """Route and run the experts.

        Parameters
        ----------
        x : ndarray [T, D]
        dataset_ids : ndarray [T] of int, optional
            The dataset of every token (needed by the DAMEX loss and the statistics).
        mask : ndarray [T] of bool, optional
            False marks padding tokens: not routed, no part in losses or counts.
        noise : ndarray [T, E], optional
            Gate noise to use instead of drawing it (replays a step exactly).
            Drawn from the layer's generator in training mode when sigma > 0.

        Returns
        -------
        y : ndarray [T, D]
        """
        x = ops._check.f32(x, "x", ndim=2)
        T = x.shape[0]
        if dataset_ids is not None:
            dataset_ids = ops._check.i64(dataset_ids, "dataset_ids", shape=(T,))
        if noise is None and self.training and self.sigma > 0:
            noise = self.rng.normal(0.0, self.sigma, size=(T, self.num_experts)).astype(np.float32)
        p = self.params
        y, state = ops.moe_forward(x, p["w_router"], p["w1"], p["b1"], p["w2"], p["b2"], k=self.k,
                                   noise=noise, capacity_factor=self.capacity_factor, bpr=self.bpr,
                                   normalize=self.normalize, activation=self.activation, mask=mask)
        self._state, self._dataset_ids, self._noise, self._mask = state, dataset_ids, noise, mask
        self.aux_loss = self._routing_loss(state.router.logits, dataset_ids, noise, mask)
        return y

    def _loss_terms(self, dataset_ids, noise):
        """(name, weight, forward, backward) of every active routing loss."""
        w, terms = self.weights, []
        if self.training and "damex" in self.loss and dataset_ids is not None:
            target = ops.dataset_to_expert(dataset_ids, self.dataset_to_expert, self.num_experts)
            terms.append(("damex", w["damex"],
                          lambda g, m: ops.damex_loss_forward(g, target, mask=m),
                          lambda g, m: ops.damex_loss_backward(g, target, mask=m)))
        elif self.training and "damex" in self.loss:
            raise ValueError("dataset_ids: required in training mode when loss uses the DAMEX loss")
        if "balance" in self.loss:
            terms.append(("importance", w["importance"],
                          lambda g, m: ops.importance_loss_forward(g, mask=m),
                          lambda g, m: ops.importance_loss_backward(g, mask=m)))
            if noise is not None and self.sigma > 0:
                s, k = self.sigma, self.k
                terms.append(("load", w["load"],
                              lambda g, m: ops.load_loss_forward(g, noise, s, k, mask=m),
                              lambda g, m: ops.load_loss_backward(g, noise, s, k, mask=m)))
        if w["switch"] > 0:
            terms.append(("switch", w["switch"],
                          lambda g, m: ops.switch_loss_forward(g, k=self.k, mask=m),
                          lambda g, m: ops.switch_loss_backward(g, k=self.k, mask=m)))
        if w["z"] > 0:
            terms.append(("z", w["z"], lambda g, m: ops.z_loss_forward(g, mask=m),
                          lambda g, m: ops.z_loss_backward(g, mask=m)))
        return terms

    def _routing_loss(self, logits, dataset_ids, noise, mask):
        self._terms = self._loss_terms(dataset_ids, noise)
        self.loss_terms = {name: fwd(logits, mask) for name, _, fwd, _ in self._terms}
        return float(sum(wt * self.loss_terms[name] for name, wt, _, _ in self._terms))

    def backward(self, dy, aux_grad=1.0):
        """Backward of the last forward: accumulates into :attr:`grads`, returns dx [T, D].

        ``aux_grad`` scales the routing loss's gradient (the coefficient of
        :attr:`aux_loss` in the total loss; 0 leaves the router to the task loss).
        """
        if self._state is None:
            raise RuntimeError("backward: call forward first")
        logits, mask = self._state.router.logits, self._mask
        dlogits = None
        if aux_grad and self._terms:
            dlogits = sum((wt * aux_grad) * bwd(logits, mask) for _, wt, _, bwd in self._terms)
        grads = ops.moe_backward(dy, self._state, dlogits=dlogits)
        for name, g in self.grads.items():
            g += grads[name]
        return grads["x"]

    # -- statistics ---------------------------------------------------------

    def routing_stats(self, num_datasets=None):
        """Routing statistics of the last forward.

        Returns
        -------
        dict with
          ``dataset_expert`` [num_datasets, E] int64: tokens of each dataset whose
          top-1 expert is e (only with dataset ids); ``accuracy``: share of tokens
          routed (top-1) to h(dataset) (only with a map); ``drop_fraction``: share of
          kept token-choices that were dropped for capacity; ``expert_load`` [E]:
          share of kept token-slots each expert took.
        """
        if self._state is None:
            raise RuntimeError("routing_stats: call forward first")
        r = self._state.router
        valid = np.ones(r.expert_index.shape[0], bool) if self._mask is None else np.asarray(self._mask, bool)
        slots = r.slot[valid]
        kept = int((slots >= 0).sum())
        out = {"drop_fraction": 1.0 - kept / max(slots.size, 1),
               "expert_load": r.expert_count / max(int(r.expert_count.sum()), 1)}
        if self._dataset_ids is not None:
            ids, top1 = self._dataset_ids[valid], r.expert_index[valid, 0]
            n = num_datasets or (len(self.dataset_to_expert) if self.dataset_to_expert is not None
                                 else int(ids.max(initial=-1)) + 1)
            m = np.zeros((n, self.num_experts), np.int64)
            np.add.at(m, (ids, top1), 1)
            out["dataset_expert"] = m
            if self.dataset_to_expert is not None and ids.size:
                out["accuracy"] = float((top1 == self.dataset_to_expert[ids]).mean())
        return out
