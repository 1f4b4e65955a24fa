"""The MoE router (SPEC section 2): logits, softmax, top-k, capacity, combine weights.

``logits = x @ w_router``, ``noisy_logits = logits + noise`` (the caller draws
the noise, so a step can be replayed), ``probs = softmax(noisy_logits)``; each
token picks its k most probable experts (ties to the lower expert index).  With
a capacity factor each expert takes at most ``C = ceil(cf * k * T_valid / E)``
token-slots; slots are filled choice by choice (every token's 1st choice, then
every 2nd choice, ...), each round in token order or, with batch-prioritised
routing (``bpr=True``), in decreasing top-1 probability (stable).  A choice that
does not fit is dropped: slot -1, combine weight 0.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._lib import _C
from ._check import NonFiniteInputError, f32, float_arg, int_arg, mask_u8

NORMALIZE = (False, True, "before_drop", "after_drop")
_NORM_CODE = {"none": 0, "before_drop": 1, "after_drop": 2}


def _normalize_name(normalize):
    """Canonical name of a `normalize` option: "none", "before_drop" or "after_drop"."""
    if isinstance(normalize, (bool, np.bool_)):
        return "before_drop" if normalize else "none"
    if isinstance(normalize, str) and normalize in ("before_drop", "after_drop"):
        return normalize
    raise ValueError(f"normalize: expected one of {list(NORMALIZE)}, got {normalize!r}")


@dataclass(eq=False)
class RouterResult:
    """What :func:`router_forward` decided, and what its backward needs.

    Attributes
    ----------
    logits, noisy_logits, probs : ndarray [T, E] float32
        ``x @ w_router``, plus the noise, and the softmax of the noisy logits.
    expert_index : ndarray [T, k] int64
        The k most probable experts of every token (masked tokens too),
        descending probability, ties to the lower index.
    combine_weight : ndarray [T, k] float32
        Weight of each choice in the layer output; 0 where dropped or masked.
    slot : ndarray [T, k] int64
        Row of the token within its expert's packed rows; -1 where dropped or
        masked.  Packed row = ``offset[expert_index] + slot``.
    expert_count, offset : ndarray [E] int64
        Kept token-slots per expert, and their exclusive cumulative sum.
    capacity : int
        Slots per expert, -1 when dropless (``capacity_factor=None``).
    k, capacity_factor, bpr, normalize, mask :
        The options used; ``normalize`` is "none", "before_drop" or
        "after_drop"; ``mask`` is the bool padding mask [T] or None.
    """

    logits: np.ndarray
    noisy_logits: np.ndarray
    probs: np.ndarray
    expert_index: np.ndarray
    combine_weight: np.ndarray
    slot: np.ndarray
    expert_count: np.ndarray
    offset: np.ndarray
    capacity: int
    k: int
    capacity_factor: Optional[float]
    bpr: bool
    normalize: str
    mask: Optional[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def num_rows(self) -> int:
        """Total kept token-slots: the rows of the packed expert buffer."""
        return int(self.offset[-1] + self.expert_count[-1])

    @property
    def kept(self) -> np.ndarray:
        """bool [T, k]: the choice was routed (not dropped, not masked)."""
        return self.slot >= 0


def _nonfinite_message(x, w_router, noise):
    for name, a in (("x", x), ("w_router", w_router), ("noise", noise)):
        if a is not None and not np.isfinite(a).all():
            return f"router_forward: {name} contains NaN or inf"
    return ("router_forward: the router logits (x @ w_router, plus noise) overflow to inf; "
            "x or w_router is too large")


def router_forward(x, w_router, *, k=1, noise=None, capacity_factor=None, bpr=False,
                   normalize=False, mask=None):
    """Route T tokens to k of E experts.

    Parameters
    ----------
    x : ndarray [T, D], floating (computed in float32)
    w_router : ndarray [D, E], floating
    k : int, 1 <= k <= E
    noise : ndarray [T, E] or None
        Added to the logits before the softmax (e.g. ``rng.normal(0, 1/E, (T, E))``).
    capacity_factor : float > 0 or None
        None: dropless (every choice kept).  Otherwise each expert takes at most
        ``capacity = ceil(capacity_factor * k * T_valid / E)`` token-slots
        (evaluated in float64, left to right), T_valid the unmasked tokens.
    bpr : bool
        Batch-prioritised routing: fill slots in decreasing top-1 probability
        (stable: equal probabilities keep token order), the same order in every
        round.  Default token order.
    normalize : {False, True, "before_drop", "after_drop"}
        False: combine weight = p_e (V-MoE, DAMEX).  True / "before_drop":
        p_e / sum of p over the k selected, then zeroed where dropped (Tutel,
        GShard).  "after_drop": p_e / sum of p over the kept choices.
    mask : ndarray [T] bool or None
        False marks padding: never routed (slot -1, weight 0), takes no capacity.

    Returns
    -------
    RouterResult

    Raises
    ------
    TypeError, ValueError
        Wrong dtype/shape (naming the argument), k outside [1, E],
        capacity_factor <= 0, a bad `normalize`, NaN/inf in x, w_router, noise
        or the logits.
    """
    x = f32(x, "x", ndim=2)
    T, D = x.shape
    w_router = f32(w_router, "w_router", shape=(D, None))
    E = w_router.shape[1]
    k = int_arg(k, "k", lo=1)
    if k > E:
        raise ValueError(f"k: must be <= the number of experts E={E}, got {k}")
    if noise is not None:
        noise = f32(noise, "noise", shape=(T, E))
    norm = _normalize_name(normalize)
    bpr = bool(bpr)
    mask8 = mask_u8(mask, "mask", T)
    if capacity_factor is None:
        capacity = -1
    else:
        capacity_factor = float_arg(capacity_factor, "capacity_factor", positive=True)
        t_valid = T if mask8 is None else int(np.count_nonzero(mask8))
        c = capacity_factor * k * t_valid / E
        capacity = math.ceil(c) if c < 2.0 ** 62 else 2 ** 62
    logits = np.empty((T, E), np.float32)
    noisy = np.empty((T, E), np.float32)
    probs = np.empty((T, E), np.float32)
    expert_index = np.empty((T, k), np.int64)
    combine_weight = np.empty((T, k), np.float32)
    slot = np.empty((T, k), np.int64)
    expert_count = np.empty(E, np.int64)
    offset = np.empty(E, np.int64)
    # no expert can take more than T slots: a larger capacity is no limit
    c_capacity = capacity if capacity < 0 else min(capacity, T)
    bad = _C.router_forward(logits, noisy, probs, expert_index, combine_weight, slot,
                            expert_count, offset, x, noise, mask8, w_router,
                            T, D, E, k, c_capacity, bpr, _NORM_CODE[norm])
    if bad:
        raise NonFiniteInputError(_nonfinite_message(x, w_router, noise))
    return RouterResult(logits, noisy, probs, expert_index, combine_weight, slot, expert_count,
                        offset, capacity, k, capacity_factor, bpr, norm,
                        None if mask8 is None else mask8.astype(bool))


def router_backward(dcombine_weight, result):
    """Gradient of the combine weights w.r.t. the logits.

    Parameters
    ----------
    dcombine_weight : ndarray [T, k], floating
    result : RouterResult from :func:`router_forward`

    Returns
    -------
    dlogits : ndarray [T, E] float32
        Through the softmax and the normalisation; the same for the clean and
        the noisy logits.  Routing decisions carry no gradient; a dropped or
        masked choice passes none (with "before_drop" its probability still
        enters the normaliser of the kept ones, which does).
    """
    if not isinstance(result, RouterResult):
        raise TypeError(f"result: expected a RouterResult, got {type(result).__name__}")
    T, E = result.probs.shape
    k = result.k
    dcw = f32(dcombine_weight, "dcombine_weight", shape=(T, k))
    dlogits = np.zeros((T, E), np.float32)
    _C.router_backward(dlogits, dcw, result.probs, result.expert_index, result.slot,
                       T, E, k, _NORM_CODE[result.normalize])
    return dlogits


def router_logits_backward(dlogits, x, w_router):
    """Backward of ``logits = x @ w_router``.

    Parameters
    ----------
    dlogits : ndarray [T, E], floating
    x : ndarray [T, D], floating
    w_router : ndarray [D, E], floating

    Returns
    -------
    dx : ndarray [T, D] float32  (``dlogits @ w_router.T``)
    dw_router : ndarray [D, E] float32  (``x.T @ dlogits``)
    """
    x = f32(x, "x", ndim=2)
    T, D = x.shape
    w_router = f32(w_router, "w_router", shape=(D, None))
    E = w_router.shape[1]
    dlogits = f32(dlogits, "dlogits", shape=(T, E))
    dx = np.zeros((T, D), np.float32)
    dw = np.zeros((D, E), np.float32)
    _C.router_logits_backward(dx, dw, dlogits, x, w_router, T, D, E)
    return dx, dw


__all__ = ["NORMALIZE", "RouterResult", "router_forward", "router_backward",
           "router_logits_backward"]
