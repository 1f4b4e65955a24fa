"""Turn DINO outputs into detections: top-k over all query x class sigmoid scores."""
import numpy as np


def postprocess(logits, boxes, *, num_select=100):
    """Detections per image.

    Parameters
    ----------
    logits : ndarray [B, Q, C]
    boxes : ndarray [B, Q, 4] normalised cxcywh
    num_select : int
        Detections kept per image (the top scores over the Q * C pairs, so one
        query may give several classes, as in DINO).

    Returns
    -------
    list of dict with ``scores`` [K], ``labels`` [K] int64 (joint label ids) and
    ``boxes`` [K, 4] normalised cxcywh, K = min(num_select, Q * C), best first.
    """
    B, Q, C = logits.shape
    k = min(num_select, Q * C)
    scores_all = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64).reshape(B, Q * C)))
    results = []
    for b in range(B):
        top = np.argpartition(-scores_all[b], k - 1)[:k]
        top = top[np.argsort(-scores_all[b, top], kind="stable")]
        results.append({"scores": scores_all[b, top].astype(np.float32),
                        "labels": (top % C).astype(np.int64),
                        "boxes": np.asarray(boxes[b], np.float32)[top // C]})
    return results
