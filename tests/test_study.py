"""`damex study`: eval does not depend on batching (dropless by default), the paired
bootstrap on cases with a known answer, resume after a kill, --subsample, --set."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from damex.data.config import build_mixture
from damex.data.synthetic import make_mixture
from damex.engine.config import run_config_from_dict
from damex.engine.evaluate import coco_ap
from damex.engine.inference import evaluate_model, predict
from damex.engine.study import (ImageAP, apply_set, many_to_one_purity, paired_bootstrap,
                                parse_subsample, plan_runs, subsample_coco)
from damex.engine.train import Trainer

SMALL_MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
               "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0, 1],
               "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
               "stem_width": 8, "dn_number": 12, "routing": "damex"}


def small_conf(root, steps=3, out="run"):
    return {"model": dict(SMALL_MODEL),
            "data": {"synthetic": {"root": str(root), "preset": "tiny"}, "batch_size": 4,
                     "min_size": 48, "max_size": 64},
            "train": {"steps": steps, "out_dir": out, "checkpoint_every": 0, "threads": 1,
                      "log_every": 0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    make_mixture(root / "data", preset="tiny")
    trainer = Trainer(run_config_from_dict(small_conf(root / "data", 6, str(root / "run"))))
    trainer.fit(progress=False, log=lambda *a: None)
    val = build_mixture(trainer.cfg.data, "val", label_space=trainer.label_space)
    return trainer, val


# ---------------------------------------------------------------- eval is batching-free

def test_eval_ap_identical_for_batch_sizes_and_shuffled_batches(trained):
    trainer, val = trained
    ref, ref_pred = evaluate_model(trainer.model, val, batch_size=1, progress=False)
    assert any(len(p["scores"]) for ds in ref_pred.values() for p in ds.values())
    for bs in (3, 8):
        res, pred = evaluate_model(trainer.model, val, batch_size=bs, progress=False)
        assert res["datasets"] == ref["datasets"], bs
        for name in ref_pred:
            for image_id, p in ref_pred[name].items():
                np.testing.assert_allclose(pred[name][image_id]["boxes"], p["boxes"], atol=1e-4)
                np.testing.assert_allclose(pred[name][image_id]["scores"], p["scores"], atol=1e-5)
    # another grouping of the images into batches: shuffle each dataset's image order
    shuffled = copy.copy(val)
    rng = np.random.default_rng(0)
    for ds in val.datasets:
        ds.images = [ds.images[i] for i in rng.permutation(len(ds.images))]
    try:
        res, _ = evaluate_model(trainer.model, shuffled, batch_size=3, progress=False)
    finally:
        for ds in val.datasets:
            ds.images = sorted(ds.images, key=lambda im: im["id"])
    assert res["datasets"] == ref["datasets"]


def test_eval_dropped_fraction_is_zero_by_default(trained):
    trainer, val = trained
    res, _ = evaluate_model(trainer.model, val, batch_size=8, progress=False)
    layers = res["routing"]["layers"]
    assert len(layers) == 2
    assert all(layer["dropped_fraction"] == 0.0 for layer in layers)
    old = trainer.model.cfg.eval_capacity_factor
    try:  # the reference behaviour (capacity at eval) does drop: the statistic is live
        for m in trainer.model.modules():
            if hasattr(m, "eval_capacity_factor"):
                m.eval_capacity_factor = 0.3
        res, _ = evaluate_model(trainer.model, val, batch_size=8, progress=False)
        assert max(layer["dropped_fraction"] for layer in res["routing"]["layers"]) > 0
    finally:
        for m in trainer.model.modules():
            if hasattr(m, "eval_capacity_factor"):
                m.eval_capacity_factor = old


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_constant_delta_has_a_point_interval():
    ap = lambda mode, seed, d, idx: 0.30 + 0.01 * seed + (0.05 if mode == "a" else 0.0)  # noqa: E731
    out = paired_bootstrap(ap, ["a", "b"], [0, 1, 2], [10, 10], [("a", "b")], n_boot=200)
    assert out["a-b"]["mean"] == pytest.approx(0.05)
    assert out["a-b"]["ci95"] == pytest.approx([0.05, 0.05])


def test_bootstrap_over_seeds_known_distribution():
    # delta 0 at seed 0, 1 at seed 1: the mean of two draws is 0, 0.5, 1 w.p. 1/4, 1/2, 1/4
    ap = lambda mode, seed, d, idx: float(seed) if mode == "a" else 0.0  # noqa: E731
    out = paired_bootstrap(ap, ["a", "b"], [0, 1], [5], [("a", "b")], n_boot=4000, seed=1)
    assert out["a-b"]["mean"] == 0.5
    assert out["a-b"]["ci95"] == [0.0, 1.0]


def _gt(n):
    return {"images": [{"id": i + 1, "width": 64, "height": 64} for i in range(n)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                             "area": 400, "iscrowd": 0} for i in range(n)],
            "categories": [{"id": 1, "name": "x"}]}


def test_image_ap_resamples_images():
    gt = _gt(4)
    # perfect detections on images 1 and 2, none on 3 and 4
    res = [{"image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9} for i in (1, 2)]
    e = ImageAP(gt, res)
    assert e.ap() == pytest.approx(coco_ap(gt, res)[0])
    assert e.ap() == pytest.approx(51 / 101)     # recall 0.5 at precision 1
    assert e.ap([0, 0, 1, 1]) == pytest.approx(1.0)
    assert e.ap([2, 3, 3, 2]) == 0.0
    assert e.ap() == pytest.approx(51 / 101)     # resampling left the evaluator intact


def test_bootstrap_over_images_known_answer():
    # a is perfect on every image, b finds nothing: every resample gives delta 1
    gt = _gt(6)
    perfect = [{"image_id": i + 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}
               for i in range(6)]
    evs = {"a": ImageAP(gt, perfect), "b": ImageAP(gt, [])}
    out = paired_bootstrap(lambda m, s, d, idx: evs[m].ap(idx), ["a", "b"], [0, 1], [6],
                           [("a", "b")], n_boot=50)
    assert out["a-b"]["mean"] == 1.0 and out["a-b"]["ci95"] == [1.0, 1.0]


def test_many_to_one_purity():
    h = np.eye(4)[[2, 0, 3, 1, 2]]               # 5 datasets, 4 experts, a permuted many-to-one map
    assert many_to_one_purity(h) == pytest.approx(1.0)
    collapsed = np.tile([1.0, 0, 0, 0], (5, 1))  # one expert takes everything: 2 of 5 datasets
    assert many_to_one_purity(collapsed) == pytest.approx(0.4)


# ---------------------------------------------------------------- options

def test_subsample_gives_the_stated_fraction(tmp_path):
    coco = _gt(100)
    a = subsample_coco(coco, 0.25, seed=0, name="flat")
    assert len(a["images"]) == 25
    ids = {im["id"] for im in a["images"]}
    assert {x["image_id"] for x in a["annotations"]} == ids and len(a["annotations"]) == 25
    assert subsample_coco(coco, 0.25, seed=0, name="flat") == a         # deterministic in the seed
    assert {im["id"] for im in subsample_coco(coco, 0.25, seed=1, name="flat")["images"]} != ids
    assert parse_subsample(["flat=0.5"]) == {"flat": 0.5}
    for bad in ("flat", "flat=0", "flat=1.5", "flat=x"):
        with pytest.raises(ValueError, match="NAME=FRACTION"):
            parse_subsample([bad])
    # in a study: the run's train annotations hold that fraction, per seed
    conf = small_conf(tmp_path / "data")
    conf = json.loads(json.dumps(run_config_from_dict(conf).to_dict()))
    plan = plan_runs(conf, str(tmp_path / "out"), ["dense", "damex"], 2, subsample={"flat": 0.5},
                     datasets=["flat", "noise", "camo"])
    assert len(plan) == 4
    for mode, seed, run_dir in plan:
        rc = json.load(open(os.path.join(run_dir, "config.json")))
        assert [d["name"] for d in rc["data"]["datasets"]] == ["flat", "noise", "camo"]
        assert rc["model"]["seed"] == rc["train"]["seed"] == rc["data"]["seed"] == seed
        flat = json.load(open(rc["data"]["datasets"][0]["train"]))
        full = json.load(open(tmp_path / "data" / "flat" / "annotations" / "train.json"))
        assert len(flat["images"]) == round(0.5 * len(full["images"]))
    with pytest.raises(ValueError, match="unknown datasets"):
        plan_runs(conf, str(tmp_path / "out2"), ["dense"], 1, datasets=["nope"])


def test_set_overrides():
    conf = {"model": {"routing": "damex"}, "data": {}, "train": {}}
    conf = apply_set(conf, ["model.num_experts=3", "model.dataset_to_expert=[0,1,2,0]",
                     "data.merge_labels_by_name=false", "model.capacity_factor=null",
                     "train.out_dir=runs/x"])
    assert conf["model"] == {"routing": "damex", "num_experts": 3, "dataset_to_expert": [0, 1, 2, 0],
                             "capacity_factor": None}
    assert conf["data"] == {"merge_labels_by_name": False}
    assert conf["train"]["out_dir"] == os.path.abspath("runs/x")
    with pytest.raises(ValueError, match="unknown key"):
        apply_set(conf, ["steps=3"])


# ---------------------------------------------------------------- resume

def test_study_killed_after_one_run_resumes_without_redoing_it(tmp_path):
    cfg = tmp_path / "cfg.json"
    conf = small_conf("data", steps=2)
    conf["model"]["moe_decoder_layers"] = [0]
    cfg.write_text(json.dumps(conf))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "damex", "study", str(cfg), "--modes", "dense,damex", "--seeds", "1",
           "--jobs", "1", "--out", str(out), "--bootstrap", "20"]
    first = out / "runs" / "dense-s0" / "result.json"
    second = out / "runs" / "damex-s0" / "result.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)   # not the source tree's folder
    try:
        deadline = time.time() + 240
        while not first.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert first.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # the study and its worker: our own group
        proc.wait()
    assert not second.exists() and not (out / "study.json").exists()
    stamp = first.stat().st_mtime_ns
    log_lines = (out / "runs" / "dense-s0" / "log.jsonl").read_text()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 of 2 runs already finished" in done.stdout
    assert "started dense" not in done.stdout and "started damex seed 0" in done.stdout
    assert first.stat().st_mtime_ns == stamp
    assert (out / "runs" / "dense-s0" / "log.jsonl").read_text() == log_lines
    study = json.loads((out / "study.json").read_text())
    assert [(r["mode"], r["seed"]) for r in study["runs"]] == [("dense", 0), ("damex", 0)]
    assert set(study["deltas"]) == {"damex-dense"}
    assert set(study["summary"]["damex"]) >= {"mean_ap", "datasets"}
    assert set(study["summary"]["damex"]["mean_ap"]) == {"mean", "std", "n"}
    lo, hi = study["deltas"]["damex-dense"]["ci95"]
    assert lo <= hi
    layer = study["runs"][1]["routing"]["layers"][0]
    assert layer["dropped_fraction"] == 0.0 and len(layer["load"]) == 4
    assert (out / "study.md").read_text().startswith("# damex study")
    assert (out / "ap_per_dataset.png").exists() and (out / "routing_damex.png").exists()
