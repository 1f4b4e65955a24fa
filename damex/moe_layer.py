"""A Mixture-of-Experts layer on plain NumPy arrays, for use without the tape::

    layer = damex.MoELayer(256, d_hidden=1024, num_experts=8, loss="damex",
                           dataset_to_expert=[0, 1, 2, 2], seed=0)
    y = layer.forward(x, dataset_ids=ids)        # x [T, D], ids [T]
    total = task_loss(y) + layer.aux_loss
    dx = layer.backward(dy)                       # fills layer.grads
    layer.routing_stats()["dataset_expert"]       # [datasets, E] token counts

It is a thin NumPy adapter over :class:`damex.nn.MoE` (the same layer as a module of
the tape), with the same argument names, order and defaults: parameters are the
module's arrays, forward and backward run the module's tape node, so both share one
implementation of routing and losses.
"""
import numpy as np

from . import nn
from . import routing as _routing
from .autograd import Tensor, backward_from, enable_grad
from .ops._check import i64


class MoELayer:
    """Mixture-of-Experts FFN with top-k routing (SPEC section 2) on NumPy arrays.

    Takes exactly the arguments of :class:`damex.nn.MoE` (``d_model``, then keyword-only
    ``d_hidden``, ``num_experts``, ``k``, ``capacity_factor`` (1.25),
    ``eval_capacity_factor`` (None = dropless in eval mode), ``bpr``, ``normalize``,
    ``gate_noise``, ``activation``, ``loss``, ``damex_weight`` (0.1), ``importance_weight``,
    ``load_weight``, ``switch_weight``, ``z_weight``, ``loss_options``,
    ``dataset_to_expert``, ``seed``); see there.  ``seed`` (int or Generator) also seeds
    the initialisation.  The DAMEX loss needs ``dataset_to_expert``.
    """

    def __init__(self, d_model, **kwargs):
        if "damex" in kwargs.get("loss", "damex") and kwargs.get("dataset_to_expert") is None:
            raise ValueError("dataset_to_expert: required when loss uses the DAMEX loss")
        seed = kwargs.get("seed", 0)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        kwargs["seed"] = rng
        self.module = nn.MoE(d_model, **kwargs)
        self.module.reset_parameters(rng)
        self.loss = self.module.loss
        self._y = self._x = self._ids = self._aux = None
        self.routing = None
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
            self._y, self._aux, self.routing = self.module(
                self._x, dataset_ids=dataset_ids if self.training else None, mask=mask, noise=noise)
        self._ids, self._mask = dataset_ids, mask
        self.aux_loss = float(self._aux.data)
        return self._y.data

    @property
    def loss_terms(self):
        """Unweighted value of every routing loss of the last forward, by name."""
        return dict(self.routing["losses"])

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
        backward_from([(self._y, dy), (self._aux, np.float32(aux_grad))])
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
          routed (top-1) to h(dataset) (only with a map); ``dropped_fraction``: share of
          the valid token-choices dropped for capacity; ``expert_load`` [E]:
          share of kept token-slots each expert took.
        """
        r = self.routing
        if r is None:
            raise RuntimeError("routing_stats: call forward first")
        counts = np.asarray(r["expert_count"])
        out = {"dropped_fraction": float(r["dropped_fraction"]),
               "expert_load": counts / max(int(counts.sum()), 1)}
        if self._ids is not None:
            valid = np.ones(len(self._ids), bool) if self._mask is None else np.asarray(self._mask, bool)
            ids, top1 = self._ids[valid], np.asarray(r["expert_index"])[valid, 0]
            mapping = self.module.dataset_to_expert
            n = num_datasets or (len(mapping) if mapping is not None else int(ids.max(initial=-1)) + 1)
            out["dataset_expert"] = _routing.routing_counts(ids, top1, n, self.module.num_experts)
            out["purity"] = _routing.routing_purity(out["dataset_expert"])
            if mapping is not None and ids.size:
                out["accuracy"] = _routing.routing_accuracy(ids, top1, mapping)[0]
        return out
