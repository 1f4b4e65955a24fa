"""A Mixture-of-Experts layer on plain NumPy arrays, for use without the tape::

    layer = damex.MoELayer(256, 1024, num_experts=8, loss="damex",
                           dataset_to_expert=[0, 1, 2, 2], seed=0)
    y = layer.forward(x, dataset_ids=ids)        # x [T, D], ids [T]
    total = task_loss(y) + layer.aux_loss
    dx = layer.backward(dy)                       # fills layer.grads
    layer.routing_stats()["dataset_expert"]       # [datasets, E] token counts

It is a thin shell around :class:`damex.nn.MoE` (the same layer as a module of
the tape): parameters are the module's arrays, forward and backward run the
module's tape node, so both share one implementation of routing and losses.
"""
import numpy as np

from . import nn
from .autograd import Tensor, backward_from, enable_grad
from .ops._check import choice, float_arg, i64, int_arg

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
        Which routing loss :attr:`aux_loss` holds; ``damex`` needs ``dataset_ids`` in training.
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
        int_arg(k, "k", lo=1, hi=E)
        if capacity_factor is not None:
            capacity_factor = float_arg(capacity_factor, "capacity_factor", positive=True)
        choice(activation, "activation", ("gelu_tanh", "gelu", "relu"))
        choice(loss, "loss", LOSS_MODES)
        weights = {name: float_arg(v, name, nonneg=True) for name, v in (
            ("damex_weight", damex_weight), ("importance_weight", importance_weight),
            ("load_weight", load_weight), ("switch_weight", switch_weight), ("z_weight", z_weight))}
        if dataset_to_expert is not None:
            dataset_to_expert = np.asarray(dataset_to_expert, dtype=np.int64).copy()
            if dataset_to_expert.ndim != 1 or ((dataset_to_expert < 0) | (dataset_to_expert >= E)).any():
                raise ValueError(f"dataset_to_expert: expected expert ids in [0, {E}), "
                                 f"got {dataset_to_expert.tolist()}")
        elif "damex" in loss:
            raise ValueError("dataset_to_expert: required when loss uses the DAMEX loss")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.module = nn.MoE(D, E, F, k=k, capacity_factor=capacity_factor, bpr=bpr,
                             normalize=normalize, gate_noise=float_arg(gate_noise, "gate_noise", nonneg=True),
                             activation=activation, loss=loss, dataset_to_expert=dataset_to_expert,
                             seed=rng, **weights)
        self.module.reset_parameters(rng)
        self.loss = loss
        self._y = self._x = self._ids = None
        self.aux_loss = 0.0

    # -- parameters ---------------------------------------------------------

    @property
    def params(self):
        """``{name: array}`` of ``w_router[D, E]``, ``w1[E, D, F]``, ``b1[E, F]``,
        ``w2[E, F, D]``, ``b2[E, D]``: the live arrays (update them in place)."""
        return {name: p.data for name, p in self.module.named_parameters()}

    @property
    def grads(self):
        """``{name: array}`` gradients accumulated by :meth:`backward` (zeros before any)."""
        return {name: (p.grad if p.grad is not None else np.zeros_like(p.data))
                for name, p in self.module.named_parameters()}

    @property
    def sigma(self):
        """Standard deviation of the gate noise, gate_noise / E."""
        return self.module.sigma

    @property
    def training(self):
        return self.module.training

    @property
    def routing(self):
        """The module's routing record of the last forward (indices, counts, noise, losses)."""
        return self.module.routing

    def zero_grad(self):
        self.module.zero_grad()

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- forward / backward -------------------------------------------------

    def forward(self, x, dataset_ids=None, mask=None, noise=None):
        """Route and run the experts.

        Parameters
        ----------
        x : ndarray [T, D]
        dataset_ids : ndarray [T] of int, optional
            The dataset of every token: the DAMEX loss's targets in training and the
            statistics' rows (the router itself never sees them).
        mask : ndarray [T] of bool, optional
            False marks padding tokens: not routed, no part in losses or counts.
        noise : ndarray [T, E], optional
            Gate noise to use instead of drawing it (replays a step exactly).

        Returns
        -------
        y : ndarray [T, D]
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x: expected 2 dimensions, got shape {x.shape}")
        if dataset_ids is not None:
            dataset_ids = i64(dataset_ids, "dataset_ids", shape=(x.shape[0],))
        elif self.training and "damex" in self.loss:
            raise ValueError("dataset_ids: required in training mode when loss uses the DAMEX loss")
        self._x = Tensor(x, requires_grad=True)
        with enable_grad():
            self._y = self.module(self._x, dataset_ids=dataset_ids if self.training else None,
                                  mask=mask, noise=noise)
        self._ids, self._mask = dataset_ids, mask
        self.aux_loss = float(self.module.aux_loss.data)
        return self._y.data

    @property
    def loss_terms(self):
        """Unweighted value of every routing loss of the last forward, by name."""
        return dict(self.module.routing["losses"])

    def backward(self, dy, aux_grad=1.0):
        """Backward of the last forward: accumulates into :attr:`grads`, returns dx [T, D].

        ``aux_grad`` scales the routing loss's gradient (the coefficient of
        :attr:`aux_loss` in the total loss; 0 leaves the router to the task loss).
        """
        if self._y is None:
            raise RuntimeError("backward: call forward first")
        dy = np.asarray(dy, np.float32)
        if dy.shape != self._y.shape:
            raise ValueError(f"dy: expected shape {self._y.shape}, got {dy.shape}")
        backward_from([(self._y, dy), (self.module.aux_loss, np.float32(aux_grad))])
        self._y = None
        return self._x.grad

    # -- statistics ---------------------------------------------------------

    def routing_stats(self, num_datasets=None):
        """Routing statistics of the last forward.

        Returns
        -------
        dict with
          ``dataset_expert`` [num_datasets, E] int64: tokens of each dataset whose
          top-1 expert is e (only with dataset ids); ``accuracy``: share of tokens
          routed (top-1) to h(dataset) (only with a map); ``drop_fraction``: share of
          the valid token-choices dropped for capacity; ``expert_load`` [E]:
          share of kept token-slots each expert took.
        """
        r = self.module.routing
        if r is None:
            raise RuntimeError("routing_stats: call forward first")
        counts = np.asarray(r["expert_count"])
        out = {"drop_fraction": float(r["dropped_fraction"]),
               "expert_load": counts / max(int(counts.sum()), 1)}
        if self._ids is not None:
            valid = np.ones(len(self._ids), bool) if self._mask is None else np.asarray(self._mask, bool)
            ids, top1 = self._ids[valid], np.asarray(r["expert_index"])[valid, 0]
            mapping = self.module.dataset_to_expert
            n = num_datasets or (len(mapping) if mapping is not None else int(ids.max(initial=-1)) + 1)
            m = np.zeros((n, self.module.num_experts), np.int64)
            np.add.at(m, (ids, top1), 1)
            out["dataset_expert"] = m
            if mapping is not None and ids.size:
                out["accuracy"] = float((top1 == mapping[ids]).mean())
        return out
