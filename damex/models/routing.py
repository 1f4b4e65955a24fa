"""How the dataset of every image reaches the tokens of the MoE layers.

A :class:`RoutingContext` is made once per forward pass from the batch's
per-image dataset ids and handed down to every FFN block.  A block that routes
``[B, L, D]`` tokens flattens them batch-major (token ``b * L + l`` belongs to
image ``b``), so :meth:`token_dataset_ids` repeats each image's id ``L`` times
in the same order.  MoE blocks report their routing loss and their routing
decisions back here; the criterion and the routing analysis read them.
"""
import numpy as np


class RoutingContext:
    """Per-forward routing bookkeeping.

    Parameters
    ----------
    dataset_ids : ndarray [B] of int, or None
        The dataset of every image (None at inference without labels: the
        router decides; the ids then only feed statistics if given).
    use_labels : bool
        Whether the MoE layers may use the ids for their DAMEX loss (training).
    """

    def __init__(self, dataset_ids=None, use_labels=True):
        self.dataset_ids = None if dataset_ids is None else np.asarray(dataset_ids, np.int64)
        self.use_labels = use_labels
        self.aux_losses = []     # one Tensor per MoE layer
        self.records = []        # (layer name, token dataset ids [T] or None, top-1 expert [T], valid [T])

    def token_dataset_ids(self, batch, length):
        """Dataset id of every token of a ``[batch, length, D]`` block flattened batch-major."""
        if self.dataset_ids is None:
            return None
        if self.dataset_ids.shape != (batch,):
            raise ValueError(f"dataset_ids: expected one id per image ({batch}), got shape "
                             f"{self.dataset_ids.shape}")
        return np.repeat(self.dataset_ids, length)

    def add(self, name, aux_loss, token_ids, top1, valid):
        self.aux_losses.append(aux_loss)
        self.records.append((name, token_ids, np.asarray(top1), np.asarray(valid)))
