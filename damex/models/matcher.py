"""Hungarian matching of predictions to ground truth (DINO's matcher).

Cost per (query, object): ``w_class * focal_class + w_bbox * L1 + w_giou * (-GIoU)``
with DINO's defaults 2 / 5 / 2, where ``focal_class`` is the focal loss of
predicting the object's class minus that of predicting background:

    pos = alpha (1 - p)^gamma (-log p),  neg = (1 - alpha) p^gamma (-log(1 - p)),
    focal_class = pos[:, label] - neg[:, label]

The assignment is scipy's ``linear_sum_assignment``.  No gradient: the matcher
only decides which query answers for which object.
"""
import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import ops


def match_cost(logits, boxes, gt_labels, gt_boxes, *, cost_class=2.0, cost_bbox=5.0,
               cost_giou=2.0, alpha=0.25, gamma=2.0):
    """The [Q, n] cost matrix of one image.

    Parameters
    ----------
    logits : ndarray [Q, C]
    boxes : ndarray [Q, 4] predicted normalised cxcywh
    gt_labels : ndarray [n] int
    gt_boxes : ndarray [n, 4] normalised cxcywh
    """
    logits = np.asarray(logits, np.float64)
    p = 1.0 / (1.0 + np.exp(-logits[:, gt_labels]))
    pos = alpha * (1 - p) ** gamma * -np.log(p + 1e-8)
    neg = (1 - alpha) * p ** gamma * -np.log(1 - p + 1e-8)
    l1 = np.abs(np.asarray(boxes, np.float64)[:, None, :] - np.asarray(gt_boxes, np.float64)[None]).sum(-1)
    giou = ops.generalized_box_iou_forward(ops.box_cxcywh_to_xyxy_forward(boxes),
                                           ops.box_cxcywh_to_xyxy_forward(gt_boxes))
    return cost_class * (pos - neg) + cost_bbox * l1 - cost_giou * giou


def hungarian_match(logits, boxes, targets, **cost_kw):
    """Match every image of a batch.

    Parameters
    ----------
    logits : ndarray [B, Q, C]
    boxes : ndarray [B, Q, 4]
    targets : list of dict with ``labels`` [n_b] and ``boxes`` [n_b, 4]

    Returns
    -------
    list of (query_index [m] int64, gt_index [m] int64), one per image, m = min(Q, n_b),
    sorted by query index.
    """
    out = []
    for b, t in enumerate(targets):
        labels = np.asarray(t["labels"], np.int64)
        if labels.size == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        cost = match_cost(logits[b], boxes[b], labels, t["boxes"], **cost_kw)
        q, g = linear_sum_assignment(cost)
        out.append((q.astype(np.int64), g.astype(np.int64)))
    return out
