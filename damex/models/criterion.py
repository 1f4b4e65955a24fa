"""DINO's training loss: Hungarian-matched focal / L1 / GIoU losses on every
decoder layer and on the encoder proposals, the denoising losses on the
noised ground-truth queries, and the routing loss of the MoE layers.

For one set of predictions and a matching (query q answers for object g):

    loss_ce   = sum over queries and classes of sigmoid_focal(logit, onehot) / num_boxes
    loss_bbox = sum over matched |box_q - box_g|_1 / num_boxes
    loss_giou = sum over matched (1 - GIoU(box_q, box_g)) / num_boxes

weighted 1 / 5 / 2.  The denoising set uses its fixed positive pairs instead of
a matching, normalised by ``num_boxes * num_groups`` as in DINO; its negatives
and padding queries only enter loss_ce, as background.
The routing loss is ``routing_weight * mean over MoE layers of that layer's
loss`` (DAMEX: the DAMEX loss with weight 0.1; plain MoE: the balance loss).
"""
import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..routing import DAMEX_WEIGHT
from .matcher import hungarian_match


class SetCriterion:
    """Callable ``criterion(outputs, targets) -> (total Tensor, dict of float terms)``.

    Parameters
    ----------
    num_classes : int
    weight_ce, weight_bbox, weight_giou : float
        Loss weights (DINO: 1, 5, 2); the matcher uses 2 / 5 / 2.
    focal_alpha, focal_gamma : float
    routing_weight : float
        Multiplies the mean routing loss of the MoE layers.
    """

    def __init__(self, num_classes, *, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0, routing_weight=DAMEX_WEIGHT, match_cost=None):
        self.num_classes = num_classes
        self.w = {"ce": weight_ce, "bbox": weight_bbox, "giou": weight_giou}
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.routing_weight = routing_weight
        self.match_cost = match_cost or {}

    def _set_losses(self, logits, boxes, targets, indices, num_boxes):
        B, Q, C = logits.shape
        onehot = np.zeros((B, Q, C), np.float32)
        flat, gt_boxes = [], []
        for b, (q, g) in enumerate(indices):
            labels = np.asarray(targets[b]["labels"], np.int64)
            onehot[b, q, labels[g]] = 1.0
            flat.append(b * Q + q)
            gt_boxes.append(np.asarray(targets[b]["boxes"], np.float32).reshape(-1, 4)[g])
        loss_ce = F.sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma, reduction="sum") / num_boxes
        flat = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        if flat.size == 0:
            zero = (boxes * 0.0).sum()
            return {"ce": loss_ce, "bbox": zero, "giou": zero}
        src = boxes.reshape(B * Q, 4)[flat]
        tgt = np.concatenate(gt_boxes).astype(np.float32)
        loss_bbox = F.l1_loss(src, Tensor(tgt), reduction="sum") / num_boxes
        giou = F.generalized_box_iou_paired(F.box_cxcywh_to_xyxy(src), F.box_cxcywh_to_xyxy(Tensor(tgt)))
        loss_giou = (1.0 - giou).sum() / num_boxes
        return {"ce": loss_ce, "bbox": loss_bbox, "giou": loss_giou}

    def _matched(self, out, targets, num_boxes):
        idx = hungarian_match(out["pred_logits"].data, out["pred_boxes"].data, targets, **self.match_cost)
        return self._set_losses(out["pred_logits"], out["pred_boxes"], targets, idx, num_boxes)

    def __call__(self, outputs, targets, num_boxes=None):
        """``num_boxes`` (default: the objects of ``targets``) normalises the box terms; data
        parallel training passes the global batch's count, as DINO all-reduces it."""
        if num_boxes is None:
            num_boxes = float(sum(len(t["labels"]) for t in targets))
        num_boxes = max(float(num_boxes), 1.0)
        sets = {"": outputs}
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            sets[f"_{i}"] = aux
        sets["_enc"] = outputs["interm_outputs"]
        terms, weights = {}, {}      # term name -> value, and its weight
        for suffix, out in sets.items():
            for kind, value in self._matched(out, targets, num_boxes).items():
                terms[f"loss_{kind}{suffix}"], weights[f"loss_{kind}{suffix}"] = value, self.w[kind]
        dn = outputs.get("dn")
        if dn is not None:
            for i, out in enumerate(outputs["dn_outputs"]):
                sfx = "" if i == len(outputs["dn_outputs"]) - 1 else f"_{i}"
                # as DINO: normalised by the boxes of all groups (each object has one
                # positive query per group)
                for kind, value in self._set_losses(out["pred_logits"], out["pred_boxes"], targets,
                                                    dn.positive, num_boxes * dn.num_groups).items():
                    terms[f"loss_{kind}_dn{sfx}"], weights[f"loss_{kind}_dn{sfx}"] = value, self.w[kind]
        ctx = outputs.get("routing")
        if ctx is not None and ctx.losses:
            routing = ctx.losses[0][1]
            for _, a in ctx.losses[1:]:
                routing = routing + a
            terms["loss_routing"] = routing * (1.0 / len(ctx.losses))
            weights["loss_routing"] = self.routing_weight
        total = None
        for key, value in terms.items():
            total = value * weights[key] if total is None else total + value * weights[key]
        return total, {k: float(v.data) for k, v in terms.items()}
