"""The one home of routing's vocabulary, of the dataset -> expert map h, and of
routing statistics.

Vocabulary
    A MoE layer's routing *loss* is one of :data:`LOSSES`; a detector's routing
    *mode* is one of :data:`MODES`, which names the loss its MoE layers use
    (``dense`` has no MoE layer).  :data:`DAMEX_WEIGHT` is the DAMEX reference
    weight of the DAMEX loss (0.1), the default everywhere a weight is not given.

The map h
    :func:`expert_map` gives h for a number of datasets (default ``d mod E``),
    validated against the number of experts; :func:`expert_targets` applies it
    to per-token dataset ids (through :func:`damex.ops.dataset_to_expert`).

Statistics
    From a *record* of one layer -- per routed token its dataset id and its
    chosen expert(s) -- :func:`routing_matrix`, :func:`routing_accuracy`,
    :func:`routing_purity` (permutation-invariant), :func:`expert_load`, and
    :func:`dropped_fraction` from a layer's kept slot counts.  :func:`summarize`
    gives all of them JSON-ready.
"""
import numpy as np

from . import ops

LOSSES = ("damex", "balance", "damex+balance", "none")
MODES = {"dense": None, "moe": "balance", "damex": "damex", "damex+balance": "damex+balance"}
DAMEX_WEIGHT = 0.1

__all__ = ["LOSSES", "MODES", "DAMEX_WEIGHT", "check_loss", "mode_loss", "expert_map",
           "expert_targets", "routing_matrix", "routing_accuracy", "routing_purity", "expert_load",
           "dropped_fraction", "summarize"]


def check_loss(loss):
    """``loss`` if it is one of :data:`LOSSES`, else ValueError."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {list(LOSSES)}, got {loss!r}")
    return loss


def mode_loss(mode):
    """The routing loss of a detector's routing ``mode`` (None for ``dense``)."""
    if mode not in MODES:
        raise ValueError(f"routing: expected one of {list(MODES)}, got {mode!r}")
    return MODES[mode]


def expert_map(mapping, num_experts, num_datasets=None):
    """The map h as an int64 array ``[num_datasets]``, validated.

    Parameters
    ----------
    mapping : sequence of int or None
        h(d) for every dataset d; None or empty gives the default ``d mod num_experts``
        (then ``num_datasets`` is required).
    num_experts : int
    num_datasets : int, optional
        When given, ``mapping`` must have exactly this many entries.
    """
    E = int(num_experts)
    if E < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
    if mapping is None or len(mapping) == 0:
        if num_datasets is None:
            raise ValueError("dataset_to_expert: needed (no number of datasets to default it from)")
        return np.arange(int(num_datasets), dtype=np.int64) % E
    h = np.asarray(mapping)
    if h.ndim != 1 or h.dtype.kind not in "iu":
        raise ValueError(f"dataset_to_expert: expected a list of expert ids, got {list(np.ravel(mapping))}")
    h = h.astype(np.int64)
    if ((h < 0) | (h >= E)).any():
        raise ValueError(f"dataset_to_expert: expert ids must lie in [0, {E}) (num_experts = {E}), "
                         f"got {h.tolist()}")
    if num_datasets is not None and len(h) != int(num_datasets):
        raise ValueError(f"dataset_to_expert: expected {num_datasets} entries (one per dataset), "
                         f"got {len(h)}")
    return h


def expert_targets(dataset_ids, mapping, num_experts):
    """Per-token target expert ``h(d(x))``; ``mapping`` None = the default map
    over the datasets present."""
    ids = np.asarray(dataset_ids, np.int64)
    if mapping is None:
        mapping = expert_map(None, num_experts, int(ids.max()) + 1 if ids.size else 1)
    return ops.dataset_to_expert(ids, mapping, num_experts)


# -- statistics -------------------------------------------------------------------


def _record(dataset_ids, experts):
    d = np.asarray(dataset_ids).reshape(-1).astype(np.int64)
    e = np.asarray(experts).astype(np.int64)
    if e.ndim == 1:
        e = e[:, None]
    if e.ndim != 2 or e.shape[0] != d.shape[0]:
        raise ValueError(f"experts must be [T] or [T, k] with T = len(dataset_ids) = {d.shape[0]}, "
                         f"got shape {np.shape(experts)}")
    return d, e


def routing_counts(dataset_ids, experts, num_datasets, num_experts):
    """int64 ``[D, E]``: token assignments of each dataset to each expert (top-k counts k)."""
    d, e = _record(dataset_ids, experts)
    if d.size and (d.min() < 0 or d.max() >= num_datasets):
        raise ValueError(f"dataset ids must lie in [0, {num_datasets}), got range [{d.min()}, {d.max()}]")
    if e.size and (e.min() < 0 or e.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{e.min()}, {e.max()}]")
    counts = np.zeros((num_datasets, num_experts), dtype=np.int64)
    np.add.at(counts, (np.repeat(d, e.shape[1]), e.reshape(-1)), 1)
    return counts


def routing_matrix(dataset_ids, experts, num_datasets, num_experts):
    """float64 ``[D, E]``: fraction of each dataset's token assignments per expert
    (rows sum to 1; a dataset without tokens has a zero row)."""
    counts = routing_counts(dataset_ids, experts, num_datasets, num_experts).astype(np.float64)
    rows = counts.sum(1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def routing_accuracy(dataset_ids, experts, assignment):
    """``(overall, per_dataset [D])``: share of tokens whose top expert is ``assignment[d]``
    (NaN where there are no tokens)."""
    d, e = _record(dataset_ids, experts)
    h = np.asarray(assignment, dtype=np.int64)
    if d.size == 0:
        return float("nan"), np.full(len(h), np.nan)
    hit = e[:, 0] == h[d]
    per = np.array([hit[d == k].mean() if np.any(d == k) else np.nan for k in range(len(h))])
    return float(hit.mean()), per


def routing_purity(counts):
    """Permutation-invariant routing purity of a ``[D, E]`` count (or fraction-weighted
    count) matrix: the largest share of tokens that any one-to-one matching of datasets
    to experts explains (scipy's ``linear_sum_assignment``).  A router that sends each
    dataset to its own expert scores 1 whichever expert that is; with more datasets
    than experts the unmatched datasets count as misses.  NaN without tokens."""
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return float("nan")
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / total)


def expert_load(experts, num_experts):
    """float64 ``[E]``: share of all routed assignments that went to each expert."""
    e = np.asarray(experts, dtype=np.int64).reshape(-1)
    counts = np.bincount(e, minlength=num_experts).astype(np.float64)[:num_experts]
    return counts / counts.sum() if counts.sum() else counts


def dropped_fraction(kept, routed):
    """Share of ``routed`` token-slots (valid tokens x k) that capacity dropped,
    given the ``kept`` slot count (0 when nothing was routed)."""
    kept, routed = int(kept), int(routed)
    return 0.0 if routed <= 0 else 1.0 - kept / routed


def summarize(dataset_ids, experts, num_datasets, num_experts, assignment=None, kept=None,
              routed=None):
    """Every statistic of one layer's record, JSON-ready.

    Returns ``{"matrix", "accuracy", "per_dataset_accuracy", "purity", "load",
    "dropped_fraction"}`` (``accuracy`` None without ``assignment``; ``dropped_fraction``
    None without ``kept``/``routed`` slot counts).
    """
    counts = routing_counts(dataset_ids, experts, num_datasets, num_experts)
    out = {"matrix": routing_matrix(dataset_ids, experts, num_datasets, num_experts).tolist(),
           "accuracy": None, "per_dataset_accuracy": None,
           "purity": routing_purity(counts), "load": expert_load(experts, num_experts).tolist(),
           "dropped_fraction": None if kept is None else dropped_fraction(kept, routed)}
    if assignment is not None:
        acc, per = routing_accuracy(dataset_ids, experts, assignment)
        out["accuracy"], out["per_dataset_accuracy"] = acc, per.tolist()
    return out
