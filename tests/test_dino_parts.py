"""The NumPy parts of DINO: contrastive denoising queries, the Hungarian
matcher, post-processing and the sine position encodings."""
import math

import numpy as np
import pytest

from damex.models.denoising import make_attn_mask, prepare_cdn
from damex.models.matcher import hungarian_match, match_cost
from damex.models.position_encoding import sine_box_encoding, sine_position_encoding
from damex.models.postprocess import postprocess
from damex.testing.reference import cxcywh_to_xyxy, sigmoid
from helpers import assert_close


def _targets():
    return [{"boxes": np.array([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]), "labels": np.array([1, 4])},
            {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)},
            {"boxes": np.array([[0.5, 0.5, 0.5, 0.5]]), "labels": np.array([2])}]


def test_cdn_layout_and_noise_bounds():
    dn = prepare_cdn(_targets(), num_classes=5, num_queries=10, rng=np.random.default_rng(0),
                     dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.2)
    assert dn.max_objects == 2 and dn.num_groups == 3 and dn.pad_size == 12
    assert dn.labels.shape == (3, 12) and dn.box_logits.shape == (3, 12, 4)
    q, g = dn.positive[0]
    np.testing.assert_array_equal(q, [0, 1, 4, 5, 8, 9])
    np.testing.assert_array_equal(g, [0, 1, 0, 1, 0, 1])
    assert dn.positive[1][0].size == 0
    np.testing.assert_array_equal(dn.positive[2][0], [0, 4, 8])
    np.testing.assert_array_equal(dn.labels[0, q], [1, 4, 1, 4, 1, 4])   # no label noise
    assert (dn.labels[1] == 5).all()                                        # padding id
    boxes = sigmoid(dn.box_logits)
    gt = _targets()[0]["boxes"]
    half = 0.2 * np.concatenate([gt[:, 2:] / 2] * 2, 1)  # scale 0.2: no box flips over
    for grp in range(3):
        pos = cxcywh_to_xyxy(boxes[0, 4 * grp:4 * grp + 2])
        neg = cxcywh_to_xyxy(boxes[0, 4 * grp + 2:4 * grp + 4])
        assert (np.abs(pos - cxcywh_to_xyxy(gt)) <= half + 1e-6).all()         # moved < half size
        assert (np.abs(neg - cxcywh_to_xyxy(gt)) >= half - 1e-6).all()         # moved >= half size
        assert (np.abs(neg - cxcywh_to_xyxy(gt)) <= 2 * half + 1e-6).all()


def test_cdn_attention_mask():
    m = make_attn_mask(pad_size=8, num_groups=2, num_queries=3)
    assert m.shape == (11, 11)
    assert m[8:, :8].all() and not m[8:, 8:].any()        # matching sees matching only
    assert not m[:4, :4].any() and m[:4, 4:8].all()        # group 0 sees only itself
    assert m[4:8, :4].all() and not m[4:8, 4:8].any()
    assert not m[:8, 8:].any()                             # denoising queries see matching ones


def test_cdn_deterministic_and_empty_batch():
    a = prepare_cdn(_targets(), num_classes=5, num_queries=4, rng=np.random.default_rng(3))
    b = prepare_cdn(_targets(), num_classes=5, num_queries=4, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.box_logits, b.box_logits)
    np.testing.assert_array_equal(a.labels, b.labels)
    empty = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}]
    assert prepare_cdn(empty, num_classes=5, num_queries=4, rng=np.random.default_rng(0)) is None


def test_matcher_finds_the_obvious_assignment():
    gt = {"boxes": np.array([[0.2, 0.2, 0.1, 0.1], [0.8, 0.7, 0.2, 0.3]]), "labels": np.array([0, 2])}
    boxes = np.array([[[0.5, 0.5, 0.3, 0.3], [0.8, 0.7, 0.2, 0.3], [0.21, 0.2, 0.1, 0.1]]])
    logits = np.full((1, 3, 3), -4.0)
    logits[0, 1, 2] = logits[0, 2, 0] = 4.0
    (q, g), = hungarian_match(logits, boxes, [gt])
    np.testing.assert_array_equal(q, [1, 2])
    np.testing.assert_array_equal(g, [1, 0])
    empty = hungarian_match(logits, boxes, [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}])
    assert empty[0][0].size == 0


def test_match_cost_against_torch_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    boxes = np.concatenate([rng.uniform(0.3, 0.7, (6, 2)), rng.uniform(0.1, 0.3, (6, 2))], 1)
    gtb = np.concatenate([rng.uniform(0.3, 0.7, (3, 2)), rng.uniform(0.1, 0.3, (3, 2))], 1)
    labels = np.array([0, 3, 3])
    got = match_cost(logits, boxes, labels, gtb)
    p = torch.tensor(logits).sigmoid()
    neg = 0.75 * p ** 2 * -(1 - p + 1e-8).log()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    cls = pos[:, labels] - neg[:, labels]
    l1 = torch.cdist(torch.tensor(boxes), torch.tensor(gtb), p=1)

    def xyxy(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
    a, b = xyxy(torch.tensor(boxes)), xyxy(torch.tensor(gtb))
    lt, rb = torch.max(a[:, None, :2], b[:, :2]), torch.min(a[:, None, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b) - inter
    iou = inter / union
    lt2, rb2 = torch.min(a[:, None, :2], b[:, :2]), torch.max(a[:, None, 2:], b[:, 2:])
    hull = (rb2 - lt2).clamp(min=0).prod(-1)
    giou = iou - (hull - union) / hull
    assert_close(got, (2 * cls + 5 * l1 - 2 * giou).numpy(), atol=1e-5, rtol=1e-5)


def test_postprocess_top_k_over_query_class_pairs():
    logits = np.full((1, 3, 2), -5.0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 0] = 1.0
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    (det,) = postprocess(logits, boxes, num_select=2)
    np.testing.assert_array_equal(det["labels"], [1, 0])
    assert det["scores"][0] == pytest.approx(1 / (1 + math.exp(-3)))
    assert_close(det["boxes"], boxes[0, [2, 0]])


def test_sine_position_encoding_respects_padding():
    mask = np.zeros((2, 4, 6), bool)
    mask[1, :, 3:] = True  # second image is 4 x 3, padded to 4 x 6
    pos = sine_position_encoding(mask, num_pos_feats=8)
    assert pos.shape == (2, 16, 4, 6) and pos.dtype == np.float32
    small = sine_position_encoding(np.zeros((1, 4, 3), bool), num_pos_feats=8)
    assert_close(pos[1, :, :, :3], small[0])  # padding does not shift valid positions
    enc = sine_box_encoding(np.array([[0.5, 0.25, 0.1, 0.2]]), num_pos_feats=8)
    assert enc.shape == (1, 32)
    assert_close(enc[0, :2], [math.sin(0.25 * 2 * math.pi), math.cos(0.25 * 2 * math.pi)], atol=1e-6)
