"""damex.engine.evaluate: per-dataset COCO AP against pycocotools itself."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from damex.data import CocoDetection, MixtureDataset, make_mixture
from damex.data import MixtureSampler, collate
from damex.data import transforms as T
from damex.engine.evaluate import (add_predictions, boxes_to_xywh, coco_results,
                                   evaluate_detections, format_table)


def write_dataset(root, name, images, annotations, categories):
    """A hand-made COCO dataset on disk: images = [(id, W, H)]."""
    os.makedirs(root / name / "images", exist_ok=True)
    imgs = []
    for iid, W, H in images:
        fn = f"{iid}.png"
        Image.new("RGB", (W, H), (128, 128, 128)).save(root / name / "images" / fn)
        imgs.append({"id": iid, "file_name": fn, "width": W, "height": H})
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(annotations)]
    ann_file = root / name / "train.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns,
                                    "categories": [{"id": c, "name": n} for c, n in categories]}))
    return CocoDetection(name, str(ann_file), str(root / name / "images"))


@pytest.fixture
def hand_mix(tmp_path):
    a = write_dataset(tmp_path, "a", [(1, 100, 80), (2, 100, 80), (3, 100, 80)],
                      [(1, 1, [0, 0, 10, 10]), (1, 2, [50, 20, 30, 40]), (2, 1, [10, 10, 40, 40]),
                       (2, 1, [60, 40, 20, 20])],  # image 3 has no ground truth
                      [(1, "circle"), (2, "square")])
    b = write_dataset(tmp_path, "b", [(5, 64, 64)], [(5, 7, [4, 4, 20, 20])], [(7, "cross")])
    return MixtureDataset([a, b])  # joint: circle 0, square 1, cross 2


def gt_as_predictions(ds):
    preds = {}
    for k, im in enumerate(ds.images):
        t = ds.target(k)
        preds[im["id"]] = {"boxes": boxes_to_xywh(t["boxes"], t["orig_size"]),
                           "scores": np.ones(len(t["labels"])), "labels": t["labels"]}
    return preds


def test_ground_truth_as_predictions_scores_one(tmp_path):
    desc = make_mixture(tmp_path / "mix", seed=0, preset="tiny")
    mix = MixtureDataset([CocoDetection(d["name"], d["val"], d["img_dir"]) for d in desc["datasets"]])
    res = evaluate_detections(mix, {ds.name: gt_as_predictions(ds) for ds in mix.datasets})
    assert res["mean_ap"] == pytest.approx(1.0)
    for name, r in res["datasets"].items():
        assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0)
        assert r["ap75"] == pytest.approx(1.0), name
    json.dumps(res)  # JSON-ready


def test_batches_of_outputs_filed_by_dataset(tmp_path):
    """The eval loop: mixed batches, a model output per image (here the GT), filed by dataset id."""
    desc = make_mixture(tmp_path / "mix", seed=2, preset="tiny")
    tf = T.default_transforms(train=False, min_size=96, max_size=128)  # resized: boxes stay normalised
    mix = MixtureDataset([CocoDetection(d["name"], d["val"], d["img_dir"], transforms=tf)
                          for d in desc["datasets"]])
    store = {}
    pairs = list(MixtureSampler(mix.sizes, "proportional", seed=0))
    for k in range(0, len(pairs), 4):
        batch = collate([mix[p] for p in pairs[k:k + 4]])
        outputs = [{"boxes": t["boxes"], "scores": np.ones(len(t["labels"])), "labels": t["labels"]}
                   for t in batch["targets"]]
        add_predictions(store, batch["targets"], outputs, mix.names)
    assert sorted(store) == sorted(mix.names)
    assert evaluate_detections(mix, store)["mean_ap"] == pytest.approx(1.0)


def test_hand_made_case_matches_pycocotools(hand_mix):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    a, b = hand_mix.datasets
    preds_a = {
        # IoU(gt [0,0,10,10], [0,0,10,16.2]) = 0.617: a hit at 0.50-0.60, a miss from 0.65
        1: {"boxes": [[0, 0, 10, 16.2], [50, 20, 30, 40], [70, 60, 10, 10]],
            "scores": [0.9, 0.8, 0.3], "labels": [0, 1, 1]},
        2: {"boxes": [[12, 10, 40, 40], [0, 0, 5, 5], [60, 40, 20, 20]],
            "scores": [0.7, 0.95, 0.4], "labels": [0, 0, 2]},  # joint 2 (cross) is not a class of 'a'
        3: {"boxes": [[1, 1, 8, 8]], "scores": [0.5], "labels": [0]},  # image without GT
    }
    res = evaluate_detections(hand_mix, {"a": preds_a})

    # the same detections through pycocotools directly, in a's own category ids
    direct = [{"image_id": i, "category_id": {0: 1, 1: 2}[lab], "bbox": list(map(float, box)), "score": s}
              for i, p in preds_a.items() for box, s, lab in zip(p["boxes"], p["scores"], p["labels"])
              if lab in (0, 1)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(a.ann_file)
        ev = COCOeval(gt, gt.loadRes(direct), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert res["datasets"]["a"]["ap"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert res["datasets"]["a"]["ap50"] == pytest.approx(ev.stats[1], abs=1e-12)
    assert res["datasets"]["a"]["ap75"] == pytest.approx(ev.stats[2], abs=1e-12)
    assert 0 < ev.stats[0] < ev.stats[1]
    # dataset b got no predictions: AP 0; the mean is over both datasets
    assert res["datasets"]["b"] == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert res["mean_ap"] == pytest.approx(ev.stats[0] / 2)
    assert set(res) == {"mean_ap", "mean_ap50", "mean_ap75", "datasets"}


def test_single_box_by_hand(hand_mix):
    """One GT, one detection of IoU 0.617: hit at IoU 0.50, 0.55, 0.60 -> AP 0.3, AP50 1, AP75 0."""
    b = hand_mix.datasets[1]
    res = evaluate_detections([b], {"b": {5: {"boxes": [[4, 4, 20, 32.4]], "scores": [0.9],
                                             "labels": [2]}}})
    assert res["datasets"]["b"]["ap"] == pytest.approx(0.3)
    assert res["datasets"]["b"]["ap50"] == pytest.approx(1.0)
    assert res["datasets"]["b"]["ap75"] == pytest.approx(0.0)


def test_category_labels_and_list_input(hand_mix):
    b = hand_mix.datasets[1]
    res = evaluate_detections([b], {"b": [{"image_id": 5, "boxes": [[4, 4, 20, 20]], "scores": [1.0],
                                          "labels": [7]}]}, label_space="category")
    assert res["mean_ap"] == pytest.approx(1.0)


def test_bad_predictions_raise(hand_mix):
    with pytest.raises(ValueError, match="image id 42 is not in"):
        evaluate_detections(hand_mix, {"a": {42: {"boxes": [[0, 0, 1, 1]], "scores": [1], "labels": [0]}}})
    with pytest.raises(ValueError, match=r"unknown datasets \['zzz'\]"):
        evaluate_detections(hand_mix, {"zzz": {}})
    with pytest.raises(ValueError, match=r"must be \[N, 4\]"):
        evaluate_detections(hand_mix, {"a": {1: {"boxes": [[0, 0, 1]], "scores": [1], "labels": [0]}}})


def test_quiet_unless_verbose(hand_mix, capsys):
    preds = {"a": {1: {"boxes": [[0, 0, 10, 10]], "scores": [1.0], "labels": [0]}}}
    evaluate_detections(hand_mix, preds)
    assert capsys.readouterr().out == ""
    evaluate_detections(hand_mix, preds, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_empty_predictions_and_table(hand_mix):
    res = evaluate_detections(hand_mix, {"a": {1: {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}}})
    assert res["mean_ap"] == 0.0
    table = format_table({"mean_ap": 0.5, "mean_ap50": 0.75, "mean_ap75": 0.5,
                          "datasets": {"flat": {"ap": 0.6, "ap50": 0.9, "ap75": 0.7},
                                       "sketch": {"ap": 0.4, "ap50": 0.6, "ap75": 0.3}}})
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "AP", "AP50", "AP75"]
    assert lines[2].split() == ["flat", "60.0", "90.0", "70.0"]
    assert lines[-1].split() == ["mean", "50.0", "75.0", "50.0"]


def test_boxes_to_xywh_and_results():
    np.testing.assert_allclose(boxes_to_xywh([[0.5, 0.5, 0.2, 0.4]], (80, 100)), [[40, 24, 20, 32]])


def test_joint_map_required(tmp_path):
    ds = write_dataset(tmp_path, "c", [(1, 10, 10)], [], [(1, "x")])
    with pytest.raises(ValueError, match="no joint label map"):
        coco_results(ds, {1: {"boxes": [[0, 0, 1, 1]], "scores": [1], "labels": [0]}})
