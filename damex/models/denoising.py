"""DINO's contrastive denoising (CDN) queries, built in NumPy (no gradient
flows into the noised ground truth).

For a batch with at most ``n`` objects per image, ``G = max(1, dn_number // n)``
groups are made; group g holds ``n`` positive queries (boxes moved by less than
half their size, which must reconstruct their object) followed by ``n``
negative queries (moved by between one and two half-sizes, which must predict
"no object").  The queries of image b sit at

    positive j of group g:  2 g n + j        negative j:  2 g n + n + j

in a block of ``pad = 2 G n`` denoising queries placed before the matching
queries.  The self-attention mask (True = blocked) keeps the matching queries
from seeing any denoising query and every group from seeing the other groups.
Images with fewer than ``n`` objects leave padding queries that no loss
reads; as DINO, their content vector is zero (:func:`dn_content`) and their
box logits 0 (label id ``num_classes`` is only a placeholder, never embedded).
"""
from dataclasses import dataclass

import numpy as np

from .. import ops

INV_SIG_EPS = 1e-3  # DINO's inverse_sigmoid clamp


@dataclass
class DenoisingQueries:
    labels: np.ndarray        # [B, pad] int64 noised labels (num_classes at padding, not embedded)
    box_logits: np.ndarray    # [B, pad, 4] inverse-sigmoid of noised cxcywh boxes (0 at padding)
    attn_mask: np.ndarray     # [pad + num_queries, pad + num_queries] bool, True = blocked
    pad_size: int
    num_groups: int
    max_objects: int
    positive: list            # per image: (query indices, gt indices) of the positive queries
    valid: np.ndarray         # [B, pad] bool, False at padding queries

    def split(self, x):
        """Split an array whose axis 1 holds [denoising | matching] queries."""
        return x[:, :self.pad_size], x[:, self.pad_size:]


def make_attn_mask(pad_size, num_groups, num_queries):
    """The CDN self-attention mask, [pad + nq, pad + nq] bool (True = blocked)."""
    size = pad_size + num_queries
    mask = np.zeros((size, size), bool)
    mask[pad_size:, :pad_size] = True            # matching queries cannot see denoising ones
    group = pad_size // max(num_groups, 1)
    for g in range(num_groups):
        lo, hi = g * group, (g + 1) * group
        mask[lo:hi, :lo] = True                   # a group sees neither earlier groups ...
        mask[lo:hi, hi:pad_size] = True           # ... nor later ones
    return mask


def prepare_cdn(targets, *, num_classes, num_queries, rng, dn_number=100, label_noise_ratio=0.5,
                box_noise_scale=1.0):
    """Make the denoising queries of one training batch.

    Parameters
    ----------
    targets : list of dict
        Per image ``boxes`` [n_b, 4] normalised cxcywh and ``labels`` [n_b] in [0, num_classes).
    num_classes, num_queries : int
    rng : numpy.random.Generator
        All noise is drawn from it, so a seed replays a step exactly.
    dn_number : int
        Denoising budget: ``G = max(1, dn_number // max_objects)`` groups.
    label_noise_ratio : float
        A label is replaced by a random class with probability ``label_noise_ratio / 2``.
    box_noise_scale : float
        Scale of the corner noise relative to half the box size.

    Returns
    -------
    DenoisingQueries, or None when no image of the batch has an object.
    """
    counts = [len(t["labels"]) for t in targets]
    n = max(counts, default=0)
    if n == 0:
        return None
    B = len(targets)
    G = max(1, dn_number // n)
    pad = 2 * G * n
    labels = np.full((B, pad), num_classes, np.int64)
    box_logits = np.zeros((B, pad, 4), np.float32)
    positive = []
    for b, t in enumerate(targets):
        nb = counts[b]
        gt_boxes = np.asarray(t["boxes"], np.float64).reshape(nb, 4)
        gt_labels = np.asarray(t["labels"], np.int64).reshape(nb)
        q_pos, q_gt = [], []
        for g in range(G):
            for sign_neg, base in ((0, 2 * g * n), (1, 2 * g * n + n)):
                lab = gt_labels.copy()
                flip = rng.random(nb) < label_noise_ratio * 0.5
                lab[flip] = rng.integers(0, num_classes, int(flip.sum()))
                box = gt_boxes.copy()
                if box_noise_scale > 0 and nb:
                    xyxy = np.concatenate([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], 1)
                    half = np.concatenate([box[:, 2:] / 2, box[:, 2:] / 2], 1)
                    part = rng.random((nb, 4)) + sign_neg      # [0,1) positive, [1,2) negative
                    sign = rng.integers(0, 2, (nb, 4)) * 2.0 - 1.0
                    xyxy = np.clip(xyxy + part * sign * half * box_noise_scale, 0.0, 1.0)
                    box = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
                labels[b, base:base + nb] = lab
                box_logits[b, base:base + nb] = ops.inverse_sigmoid_forward(box, eps=INV_SIG_EPS)
                if not sign_neg:
                    q_pos.append(base + np.arange(nb))
                    q_gt.append(np.arange(nb))
        positive.append((np.concatenate(q_pos).astype(np.int64), np.concatenate(q_gt).astype(np.int64)))
    valid = np.zeros((B, pad), bool)
    for b, nb in enumerate(counts):
        for c in range(2 * G):
            valid[b, c * n:c * n + nb] = True
    return DenoisingQueries(labels, box_logits, make_attn_mask(pad, G, num_queries), pad, G, n, positive,
                            valid)


def dn_content(label_enc, dn):
    """The content vectors of the denoising queries, [B, pad, d] Tensor.

    ``label_enc`` rows of the noised labels, and a zero vector at padding
    queries (as DINO: they get neither a label row nor a gradient).
    """
    emb = label_enc(np.where(dn.valid, dn.labels, 0))
    return emb * dn.valid[..., None].astype(np.float32)
