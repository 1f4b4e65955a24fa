"""The researcher's workflow (issue 10): runs that never overwrite each other, exact
resume after Ctrl-C, evaluation and prediction from the checkpoint alone, full COCO
metrics, --set overrides."""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from damex.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
               "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
               "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
               "stem_width": 8, "dn_number": 12}


def write_cfg(folder, out="run", **train):
    cfg = {"model": SMALL_MODEL,
           "data": {"synthetic": {"root": "data", "preset": "tiny"}, "batch_size": 2,
                    "min_size": 48, "max_size": 64},
           "train": dict({"steps": 6, "out_dir": str(folder / out), "checkpoint_every": 2,
                          "lr": 2e-3, "lr_backbone": 2e-3}, **train)}
    path = folder / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def log_steps(run):
    return [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]


def digest(folder):
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 200-step run (enough for a non-zero AP on some datasets of the 5-dataset mixture), then its
    training data moved away: everything below works from the checkpoint alone."""
    root = tmp_path_factory.mktemp("wf")
    cfg = write_cfg(root, steps=200, checkpoint_every=100)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    # a "new" dataset: a copy of two validation splits, then the training data is gone
    new = root / "new"
    for name in ("noise", "camo"):
        shutil.copytree(root / "data" / name, new / name)
    shutil.rmtree(root / "data")
    return root


# ---------------------------------------------------------------- runs never overwrite

def test_second_train_into_the_same_folder_refuses_and_leaves_it_intact(tmp_path, capsys):
    cfg = write_cfg(tmp_path, steps=3)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    before = digest(tmp_path / "run")
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert digest(tmp_path / "run") == before
    assert main(["train", str(cfg), "--no-progress", "--overwrite", "--steps", "2"]) == 0
    assert log_steps(tmp_path / "run") == [1, 2]


def test_resume_cuts_the_log_back_and_steps_are_checked(tmp_path, capsys):
    cfg = write_cfg(tmp_path, steps=5, checkpoint_every=2, keep_last=2)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint_*.npz")) == ["checkpoint_000004.npz",
                                                                    "checkpoint_000005.npz"]
    # resume from the step-4 checkpoint although the log reaches step 5: no duplicates
    assert main(["train", "--resume", str(run / "checkpoint_000004.npz"), "--steps", "7",
                 "--no-progress"]) == 0
    assert log_steps(run) == list(range(1, 8))
    for bad, msg in (("0", "positive"), ("-3", "positive"), ("7", "already at step 7"),
                     ("5", "already at step 7")):
        assert main(["train", "--resume", str(run / "checkpoint.npz"), "--steps", bad]) == 2
        assert msg in capsys.readouterr().err
    assert main(["train", str(cfg), "--steps", "0", "--out", str(tmp_path / "other")]) == 2
    assert "positive" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_resume_into_another_folder_and_run_with_bad_steps(tmp_path, capsys, monkeypatch):
    cfg = write_cfg(tmp_path, steps=2)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    before = digest(tmp_path / "run")
    assert main(["train", "--resume", str(tmp_path / "run" / "checkpoint.npz"), "--steps", "3",
                 "--out", str(tmp_path / "branch"), "--no-progress"]) == 0
    assert log_steps(tmp_path / "branch") == [1, 2, 3]
    assert digest(tmp_path / "run") == before
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--steps", "-5", "--out", str(tmp_path / "bad")]) == 2
    assert "positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_resume_from_another_working_directory_continues_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_cfg(tmp_path, out="rel", steps=2)
    data = json.loads(cfg.read_text())
    data["train"]["out_dir"] = "rel"           # relative: against the working directory
    cfg.write_text(json.dumps(data))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "rel" / "checkpoint.npz"), "--steps", "3",
                 "--no-progress"]) == 0
    assert log_steps(tmp_path / "rel") == [1, 2, 3]
    assert not (elsewhere / "rel").exists()


def test_sigint_then_resume_gives_the_uninterrupted_run(tmp_path):
    cfg = write_cfg(tmp_path, steps=3000, checkpoint_every=0, log_every=0)
    import damex   # the subprocess imports the damex these tests import (installed or in place)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(damex.__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "damex", "train", str(cfg), "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpt = tmp_path / "run" / "checkpoint.npz"
    assert f"damex train --resume {ckpt}" in err
    stopped = len(log.read_text().splitlines())
    assert log_steps(tmp_path / "run") == list(range(1, stopped + 1))
    total = stopped + 3
    assert main(["train", "--resume", str(ckpt), "--steps", str(total), "--no-progress"]) == 0
    assert main(["train", str(cfg), "--steps", str(total), "--out", str(tmp_path / "straight"),
                 "--no-progress"]) == 0
    resumed = [json.loads(x) for x in log.read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, total + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_log_records_time_rate_and_routing_and_validation(tmp_path):
    cfg = write_cfg(tmp_path, steps=4, checkpoint_every=0, eval_every=2)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert r["time"] > 0 and r["images_per_s"] > 0
        assert 0 <= r["routing_accuracy/decoder.0"] <= 1
        assert 0 <= r["dropped_fraction/decoder.0"] <= 1
    assert [("val" in r) for r in recs] == [False, True, False, True]
    val = recs[1]["val"]
    assert set(val["ap"]) == {"flat", "noise", "stripes", "sketch", "camo"}
    assert 0 <= val["routing_accuracy"] <= 1
    from damex.engine.checkpoint import load_checkpoint
    _, meta = load_checkpoint(tmp_path / "run" / "best.npz")
    best = max((r for r in recs if "val" in r), key=lambda r: r["val"]["mean_ap"])
    assert meta["best_mean_ap"] == best["val"]["mean_ap"] and meta["step"] == best["step"]


# ---------------------------------------------------------------- from the checkpoint alone

def test_eval_needs_no_training_data_and_reports_full_metrics(trained, capsys):
    ckpt = trained / "run" / "checkpoint.npz"
    out = trained / "eval.json"
    spec = f"camo={trained / 'new' / 'camo' / 'annotations' / 'val.json'}:" \
           f"{trained / 'new' / 'camo' / 'images'}"
    assert main(["eval", str(ckpt), "--dataset", spec, "--json", str(out), "--full",
                 "--no-progress"]) == 0
    assert "AR100" in capsys.readouterr().out
    res = json.loads(out.read_text())
    m = res["datasets"]["camo"]
    assert {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100",
            "per_class"} <= set(m)
    assert set(m["per_class"]) == {"star", "cross", "hexagon"}
    assert res["step"] == 200 and res["checkpoint"] == str(ckpt) and len(res["config_hash"]) == 12
    # a dataset the model was trained on keeps its expert map: routing accuracy defined
    assert res["routing"]["accuracy"] is not None


def test_dataset_without_annotations_gets_null(trained):
    src = trained / "new" / "noise"
    ann = json.loads((src / "annotations" / "val.json").read_text())
    ann["annotations"] = []
    empty = trained / "empty.json"
    empty.write_text(json.dumps(ann))
    out = trained / "empty_eval.json"
    assert main(["eval", str(trained / "run" / "checkpoint.npz"), "--dataset",
                 f"noise={empty}:{src / 'images'}", "--json", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())["datasets"]["noise"]
    assert m["ap"] is None and m["ar100"] is None and m["per_class"] == {"circle": None, "cross": None}


def test_predict_coco_results_score_as_eval(trained):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ckpt = trained / "run" / "checkpoint.npz"
    for name in ("noise", "camo"):
        ann = trained / "new" / name / "annotations" / "val.json"
        spec = f"{name}={ann}:{trained / 'new' / name / 'images'}"
        res_path = trained / f"{name}_results.json"
        ev_path = trained / f"{name}_eval.json"
        assert main(["predict", str(ckpt), "--dataset", spec, "--json", str(res_path),
                     "--no-progress"]) == 0
        assert main(["eval", str(ckpt), "--dataset", spec, "--json", str(ev_path), "--no-progress"]) == 0
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ann))
            ev = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        mine = json.loads(ev_path.read_text())["datasets"][name]
        keys = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100"]
        for k, v in zip(keys, ev.stats):
            assert mine[k] == (None if v < 0 else pytest.approx(v, abs=1e-12)), (name, k)
        routing = json.loads((trained / f"{name}_results.routing.json").read_text())
        assert set(map(int, routing)) == set(gt.getImgIds())
    assert json.loads((trained / "camo_eval.json").read_text())["datasets"]["camo"]["ap"] > 0


def test_predict_on_a_folder_and_the_python_api(trained, capsys):
    import damex

    folder = trained / "new" / "camo" / "images"
    out = trained / "folder.json"
    pics = trained / "pics"
    assert main(["predict", str(trained / "run" / "checkpoint.npz"), str(folder), "--json", str(out),
                 "--pictures", str(pics), "--score-threshold", "0.01"]) == 0
    res = json.loads(out.read_text())
    files = sorted(str(folder / n) for n in os.listdir(folder))
    assert [p["file"] for p in res["images"]] == files
    assert res["step"] == 200
    classes = res["classes"]
    for p in res["images"]:
        assert p["names"] == [classes[j] for j in p["labels"]]
        assert set(p["experts"]) == {"decoder.0"}
        names = ["flat", "noise", "stripes", "sketch", "camo"]   # h(d) = d mod 4: camo shares expert 0
        assert p["datasets"]["decoder.0"] == [n for d, n in enumerate(names) if d % 4 == p["experts"]["decoder.0"]]
    assert len(list(pics.iterdir())) == len(files)
    det = damex.Detector.from_checkpoint(trained / "run" / "checkpoint.npz")
    from PIL import Image
    arr = np.asarray(Image.open(files[0]).convert("RGB"))
    a, b = det.predict([files[0], arr], score_threshold=0.01)
    np.testing.assert_allclose(a["boxes"], b["boxes"])
    assert a["names"] == b["names"] and b["file"] is None
    assert main(["predict", str(trained / "run" / "checkpoint.npz"), str(trained / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_eval_json_into_a_missing_folder_fails_before_work(trained, capsys):
    assert main(["eval", str(trained / "run" / "checkpoint.npz"), "--json",
                 str(trained / "nope" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_import_hints(tmp_path):
    import damex.models
    assert damex.models.DINO.__name__ == "DINO"
    # as README writes it: `import damex` alone, then damex.models.DINO
    import damex
    r = subprocess.run([sys.executable, "-c", "import damex; print(damex.models.DINO.__name__, "
                        "damex.routing.expert_map.__name__)"], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(damex.__file__))))
    assert r.returncode == 0 and r.stdout.split() == ["DINO", "expert_map"], r.stderr


def test_one_list_of_benchmarks():
    from damex.cli import BENCHMARKS, build_parser

    on_disk = sorted(n[len("bench_"):-3] for n in os.listdir(os.path.join(ROOT, "bench"))
                     if n.startswith("bench_") and n.endswith(".py"))
    assert sorted(BENCHMARKS) == on_disk, (
        "the one list of benchmarks is damex.cli.BENCHMARKS: a new bench/bench_NAME.py goes there "
        "and into README's `damex bench ...` line (Command line section)")
    listed = "|".join(BENCHMARKS)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"damex bench {listed}" in readme
    assert f"damex bench {listed}" in build_parser().format_help()
    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "bench")[1]
    assert listed in bench.format_help()


def test_import_from_a_source_tree_without_the_extension(tmp_path):
    """From a clone's root after `pip install .` (README's commands leave you there), Python
    finds the unbuilt source folder first: the installed damex is imported in its place,
    with a warning; with no damex installed, an error says what to do (no circular import)."""
    import damex

    src = tmp_path / "clone"
    shutil.copytree(os.path.join(ROOT, "damex"), src / "damex",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    built = os.path.dirname(os.path.dirname(damex.__file__))   # the damex these tests import
    readme_example = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)[-1]
    # an editable install's finder would find the built tree's _C for the source folder: out
    code = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in " \
           "repr(f).lower()]\nimport damex, os; print(os.path.dirname(damex.__file__)); " \
           "print(damex.models.DINO.__name__, damex.Detector.__name__)\n" + readme_example
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=built))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [os.path.join(built, "damex"), "DINO Detector"]
    assert "source folder without its C extension" in r.stderr and "pip install" in r.stderr
    # nothing installed behind it (-S: no site-packages, no editable finder): say what to do
    r = subprocess.run([sys.executable, "-S", "-c", "import damex"], cwd=src, capture_output=True,
                       text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0
    assert "not built" in r.stderr and "pip install" in r.stderr and "circular" not in r.stderr


def test_curves_picture_has_the_panels(tmp_path):
    from damex.engine.curves import panels, plot_run_curves, smooth

    hist = [{"step": s, "loss": 10.0 - s * 0.1, "loss_ce": 1.0, "loss_ce_0": 1.0, "loss_bbox": 0.5,
             "loss_giou": 0.4, "loss_routing": 0.2, "lr": 1e-4, "dropped_fraction/decoder.0": 0.1}
            for s in range(1, 21)]
    hist[9]["val"] = {"mean_ap": 0.2, "ap": {"a": 0.1, "b": 0.3}, "routing_accuracy": 0.9}
    hist[19]["val"] = {"mean_ap": 0.3, "ap": {"a": 0.2, "b": None}, "routing_accuracy": None}
    names = [p[0] for p in panels(hist)]
    assert names == ["total loss", "loss terms (summed over layers, smoothed)", "routing loss",
                     "dropped fraction", "validation", "learning rate"]
    terms = dict((label, y) for label, _, y, _ in panels(hist)[1][1])
    assert [(label, style) for label, _, _, style in panels(hist)[0][1]] == [("raw", "faint"), ("smoothed", "main")]
    assert set(terms) == {"classification", "box L1", "GIoU"}
    val = {label: (list(x), list(y)) for label, x, y, _ in panels(hist)[4][1]}
    assert set(val) == {"mean AP", "a", "b", "routing accuracy"} and val["mean AP"] == ([10, 20], [0.2, 0.3])
    assert terms["classification"][0] == pytest.approx(2.0)
    np.testing.assert_allclose(smooth(np.full(50, 3.0)), 3.0)
    assert os.path.getsize(plot_run_curves(hist, tmp_path / "c.png")) > 1000


def test_tensorboard_events_are_an_option(tmp_path, capsys):
    cfg = write_cfg(tmp_path, steps=2, checkpoint_every=0)
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        assert main(["train", str(cfg), "--set", "train.tensorboard=true", "--no-progress"]) == 2
        assert "tensorboardX" in capsys.readouterr().err
        return
    assert main(["train", str(cfg), "--set", "train.tensorboard=true", "--no-progress"]) == 0
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def read_events(folder):
    """``[(file, Event)]`` of every event file in ``folder`` (TFRecord framing: a uint64
    length, its crc, the serialized Event, its crc), files in TensorBoard's order."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            out.append((path.name, Event.FromString(data[pos + 12:pos + 12 + n])))
            pos += 12 + n + 4
        assert pos == len(data)
    return out


def test_tensorboard_events_are_cut_back_on_resume_like_the_log(tmp_path):
    """A resume from an earlier checkpoint than the last step rebuilds the events from the
    log's records: every tag holds each step once, with the log's values and wall times."""
    pytest.importorskip("tensorboardX")
    cfg = write_cfg(tmp_path, steps=5, checkpoint_every=2, keep_last=0, eval_every=2, tensorboard=True)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--resume", str(run / "checkpoint_000004.npz"), "--steps", "7",
                 "--no-progress"]) == 0
    assert log_steps(run) == list(range(1, 8))
    log = {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    events = read_events(run / "tensorboard")
    files = sorted({f for f, _ in events})
    assert len(files) == 2 and files[0].endswith(".from_step_000001") and files[1].endswith(".from_step_000005")
    scalars = {}
    for _, e in events:
        for v in e.summary.value:
            scalars.setdefault(v.tag, []).append((e.step, v.simple_value, e.wall_time))
    assert [s for s, _, _ in scalars["loss"]] == list(range(1, 8))
    for step, value, wall in scalars["loss"]:
        assert value == pytest.approx(log[step]["loss"], rel=1e-6)
        assert wall == pytest.approx(log[step]["timestamp"], abs=1e-3)
    assert [s for s, _, _ in scalars["val/mean_ap"]] == [2, 4, 6, 7]
    assert "timestamp" not in scalars and "step" not in scalars
    # the new segment's file opens with the purge marker at its first step (TensorBoard's own
    # mechanism, for a TensorBoard that had read the old files before the resume)
    marks = [(f, e.step) for f, e in events if e.HasField("session_log")]
    assert marks == [(files[1], 5)]
    # a new run into the folder must not find the events without --overwrite, and with it starts afresh
    assert main(["train", str(cfg), "--no-progress", "--overwrite", "--steps", "1"]) == 0
    assert {e.step for _, e in read_events(run / "tensorboard") if e.summary.value} == {1}
    for p in run.iterdir():
        if p.is_file():
            p.unlink()
    assert main(["train", str(cfg), "--no-progress"]) == 2    # the events alone are a run's


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, capsys):
    """Fewer encoder tokens than queries (issue 8 #8, issue 12 #10): a clear error naming
    both numbers, and no half-written run (the empty log.jsonl of the issue) left behind."""
    import json as _json
    from damex.cli import main
    cfg = {"model": {"preset": "tiny", "num_queries": 900},
           "data": {"synthetic": {"root": str(tmp_path / "data"), "preset": "tiny"}, "batch_size": 2,
                    "min_size": 32, "max_size": 48},
           "train": {"steps": 2, "out_dir": str(tmp_path / "run"), "threads": 1}}
    (tmp_path / "cfg.json").write_text(_json.dumps(cfg))
    assert main(["train", str(tmp_path / "cfg.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "num_queries is 900" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- audit of issue 10, point by point

def test_predict_coco_results_use_the_files_own_ids(trained):
    """An annotation file whose image and category ids are not 0..n or 1..n: the results are
    in its ids (pycocotools' loadRes takes them as they are) and score as `damex eval` does."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    src = trained / "new" / "camo"
    ann = json.loads((src / "annotations" / "val.json").read_text())
    img_id = {im["id"]: 1000 + 7 * k for k, im in enumerate(ann["images"])}
    cat_id = {c["id"]: 40 + 3 * k for k, c in enumerate(reversed(ann["categories"]))}
    for im in ann["images"]:
        im["id"] = img_id[im["id"]]
    for c in ann["categories"]:
        c["id"] = cat_id[c["id"]]
    for k, a in enumerate(ann["annotations"]):
        a.update(id=500 + k, image_id=img_id[a["image_id"]], category_id=cat_id[a["category_id"]])
    own = trained / "own_ids.json"
    own.write_text(json.dumps(ann))
    spec = f"camo={own}:{src / 'images'}"
    res_path, ev_path = trained / "own_results.json", trained / "own_eval.json"
    ckpt = str(trained / "run" / "checkpoint.npz")
    assert main(["predict", ckpt, "--dataset", spec, "--json", str(res_path), "--no-progress"]) == 0
    assert main(["eval", ckpt, "--dataset", spec, "--json", str(ev_path), "--no-progress"]) == 0
    results = json.loads(res_path.read_text())
    assert results and {r["image_id"] for r in results} <= set(img_id.values())
    assert {r["category_id"] for r in results} <= set(cat_id.values())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} and len(r["bbox"]) == 4 for r in results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(own))
        ev = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    mine = json.loads(ev_path.read_text())["datasets"]["camo"]
    assert mine["ap"] == pytest.approx(ev.stats[0], abs=1e-12) and mine["ap"] > 0
    # the same detections as under the original ids: the relabelling changes nothing
    orig_path = trained / "orig_ids_eval.json"
    assert main(["eval", ckpt, "--dataset", f"camo={src / 'annotations' / 'val.json'}:{src / 'images'}",
                 "--json", str(orig_path), "--no-progress"]) == 0
    assert mine["ap"] == pytest.approx(json.loads(orig_path.read_text())["datasets"]["camo"]["ap"], abs=1e-12)


def test_pictures_titles_and_file_names_carry_the_same_index(trained, monkeypatch):
    import re as _re

    from damex.engine import routing_analysis

    drawn = []
    real = routing_analysis.draw_detections

    def spy(*a, **kw):
        drawn.append((os.path.basename(a[5]), kw.get("title")))
        return real(*a, **kw)

    monkeypatch.setattr(routing_analysis, "draw_detections", spy)
    ckpt = str(trained / "run" / "checkpoint.npz")
    folder = trained / "new" / "noise" / "images"
    assert main(["predict", ckpt, str(folder), "--pictures", str(trained / "pics_idx"), "--no-progress"]) == 0
    spec = f"noise={trained / 'new' / 'noise' / 'annotations' / 'val.json'}:{folder}"
    assert main(["eval", ckpt, "--dataset", spec, "--pictures", str(trained / "eval_pics_idx"),
                 "--no-progress"]) == 0
    assert len(drawn) > 4
    for name, title in drawn:
        index_in_name = int(_re.search(r"(\d+)", name).group(1))
        assert f"#{index_in_name} " in title, (name, title)


GT_PROBE = [[10, 24, 50, 30]]


def test_ground_truth_is_visible_and_labels_stay_inside_apart():
    """Ground truth drawn black and white (visible on a white and on a black image); labels,
    measured as drawn, inside the image and not overlapping, also in corners and crowds."""
    from damex.engine.routing_analysis import _pyplot, detections_figure, place_label

    plt = _pyplot()
    boxes = [[0, 0, 30, 20], [2, 1, 30, 20], [4, 2, 30, 20], [70, 40, 26, 24], [72, 44, 20, 20],
             [80, 60, 16, 4], [40, 30, 10, 10], [0, 50, 8, 14]]
    for background in (255, 0):
        img = np.full((64, 96, 3), background, np.uint8)
        fig = detections_figure(img, boxes, [0, 1, 2, 0, 1, 2, 0, 1], np.linspace(0.9, 0.2, 8),
                                ["circle", "square", "a long class name"], gt_boxes=GT_PROBE,
                                title="x")
        try:
            fig.canvas.draw()
            r = fig.canvas.get_renderer()
            ax = fig.axes[0]
            image = ax.images[0].get_window_extent(r)
            labels = [t.get_bbox_patch().get_window_extent(r) for t in ax.texts]
            assert len(labels) == len(boxes)
            for e in labels:
                assert image.x0 - 0.5 <= e.x0 and e.x1 <= image.x1 + 0.5
                assert image.y0 - 0.5 <= e.y0 and e.y1 <= image.y1 + 0.5
            for i in range(len(labels)):
                for j in range(i):
                    a, b = labels[i], labels[j]
                    assert min(a.x1, b.x1) - max(a.x0, b.x0) <= 0.5 or min(a.y1, b.y1) - max(a.y0, b.y0) <= 0.5, (i, j)
            # the ground truth box's left edge (x = 10, rows 30..50 away from any label): both
            # a dark and a light outline whatever the background
            pix = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
            (x0, _), = ax.transData.transform([(9.5, 0)])
            _, y_top = ax.transData.transform([(0, 30)])[0]
            _, y_bot = ax.transData.transform([(0, 50)])[0]
            H = pix.shape[0]
            rows = range(int(H - max(y_top, y_bot)), int(H - min(y_top, y_bot)))
            strip = pix[list(rows), int(x0) - 3:int(x0) + 4].reshape(-1, 3)
            assert (strip.max(1) < 60).any() and (strip.min(1) > 200).any(), background
        finally:
            plt.close(fig)
    # no room: the wanted spot, clipped inside
    assert place_label(90, 70, 10, 5, [(-0.5, -0.5, 100, 100)], 96, 64) == (85.5, 58.5)


def test_demo_reports_a_permutation_invariant_purity(capsys):
    """The balance-loss MoE learns its own dataset -> expert permutation: routing accuracy
    against h is near 0 while the purity (any permutation) is near 1; both printed."""
    from damex.engine.moe_demo import run_demo

    res = run_demo(mode="balance", steps=300, log_every=0)
    assert res["purity"] > 0.9 and res["purity"] >= res["accuracy"]
    assert main(["demo", "--mode", "balance", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "routing accuracy" in out and "purity (any expert permutation)" in out


def test_threads_seed_and_out_on_train_and_resume(tmp_path):
    from damex.engine.checkpoint import load_checkpoint

    cfg = write_cfg(tmp_path, steps=1, checkpoint_every=0)
    assert main(["train", str(cfg), "--threads", "1", "--seed", "7", "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    assert main(["train", str(cfg), "--threads", "1", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    _, meta = load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    assert meta["config"]["train"]["seed"] == 7 and meta["config"]["train"]["threads"] == 1
    assert meta["config"]["train"]["out_dir"] == str(tmp_path / "a")
    loss = [json.loads((tmp_path / r / "log.jsonl").read_text())["loss"] for r in "ab"]
    assert loss[0] != loss[1]                       # the seed reaches the run
    assert main(["train", "--resume", str(tmp_path / "a" / "checkpoint.npz"), "--steps", "2",
                 "--threads", "2", "--seed", "7", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    _, meta = load_checkpoint(tmp_path / "c" / "checkpoint.npz")
    assert meta["config"]["train"]["threads"] == 2 and meta["step"] == 2
    assert log_steps(tmp_path / "c") == [1, 2] and not (tmp_path / "a" / "checkpoint_000002.npz").exists()


def test_predict_and_eval_outputs_into_missing_folders_fail_before_work(trained, capsys):
    ckpt = str(trained / "run" / "checkpoint.npz")
    folder = str(trained / "new" / "noise" / "images")
    assert main(["predict", ckpt, folder, "--json", str(trained / "nope" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --pictures folders are created before the work (and exist when it is done)
    assert main(["predict", ckpt, folder, "--pictures", str(trained / "deep" / "er"), "--no-progress"]) == 0
    assert any((trained / "deep" / "er").iterdir())


def test_readme_workflow_commands_run(tmp_path, monkeypatch):
    """README's workflow section, each command as written (with a 2-step budget and no progress
    bars): train with validation, read the log, predict on a folder, evaluate on a new dataset."""
    import shlex

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"### Workflow[^\n]*\n+```\n(.*?)```", readme, re.S).group(1)
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("damex ")]
    assert [c[1] for c in commands] == ["train", "predict", "eval"]
    assert "tail -f runs/mine/log.jsonl" in block
    monkeypatch.chdir(tmp_path)
    assert main(commands[0][1:] + ["--steps", "2", "--no-progress"]) == 0
    recs = [json.loads(x) for x in open("runs/mine/log.jsonl")]
    assert [r["step"] for r in recs] == [1, 2] and "mean_ap" in recs[-1]["val"]
    # "photos/": plain images; "voc": a new COCO dataset (the sketch validation split, copied)
    sketch = tmp_path / "data" / "synthetic" / "sketch"
    shutil.copytree(sketch / "images", tmp_path / "photos")
    shutil.copytree(sketch / "images", tmp_path / "voc" / "images")
    shutil.copy(sketch / "annotations" / "val.json", tmp_path / "voc" / "val.json")
    assert main(commands[1][1:] + ["--no-progress"]) == 0
    assert json.loads(open("photos.json").read())["images"] and os.listdir("runs/mine/photos")
    assert main(commands[2][1:] + ["--no-progress"]) == 0
    assert "ap_small" in json.loads(open("voc.json").read())["datasets"]["voc"]


def test_eval_and_predict_do_not_read_the_runs_pretrained_weights(trained, tmp_path):
    """A run started from `model.pretrained`: its checkpoint holds every weight, so evaluation
    and prediction work with that file gone (as they do with the training data gone)."""
    import damex
    from damex.weights import write

    det = damex.Detector.from_checkpoint(trained / "run" / "checkpoint.npz")
    pre = tmp_path / "pre.safetensors"
    write(pre, {k: np.asarray(v) for k, v in det.model.state_dict().items()})
    cfg = write_cfg(tmp_path, steps=1, checkpoint_every=0)
    data = json.loads(cfg.read_text())
    data["data"]["synthetic"]["root"] = str(tmp_path / "data")
    data["model"]["pretrained"] = str(pre)
    cfg.write_text(json.dumps(data))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    pre.unlink()
    ckpt = tmp_path / "run" / "checkpoint.npz"
    spec = f"camo={trained / 'new' / 'camo' / 'annotations' / 'val.json'}:{trained / 'new' / 'camo' / 'images'}"
    assert main(["eval", str(ckpt), "--dataset", spec, "--no-progress"]) == 0
    assert main(["predict", str(ckpt), str(trained / "new" / "camo" / "images"), "--no-progress"]) == 0


def test_per_image_experts_do_not_depend_on_the_batch(trained):
    """The expert reported per image (majority of its tokens, per MoE layer) is the image's
    own: the same whether it is predicted alone or in a batch of several."""
    import damex

    det = damex.Detector.from_checkpoint(trained / "run" / "checkpoint.npz")
    files = [str(p) for p in sorted((trained / "new" / "noise" / "images").iterdir())][:3] + \
        [str(p) for p in sorted((trained / "new" / "camo" / "images").iterdir())][:3]
    alone = [det.predict([f], score_threshold=0.0)[0] for f in files]
    batch = det.predict(files, score_threshold=0.0, batch_size=6)
    assert [p["experts"] for p in alone] == [p["experts"] for p in batch]
    assert [p["datasets"] for p in alone] == [p["datasets"] for p in batch]


def test_ctrl_c_in_damex_run_checkpoints_both_runs_and_the_same_command_continues(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: `damex run` and its two
    workers.  Each worker finishes its step and writes its checkpoint, nothing prints a
    traceback, and the printed command (the same one) continues both runs with one log
    record per step."""
    cfg = write_cfg(tmp_path, steps=3000, checkpoint_every=0, log_every=0)
    import damex
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(damex.__file__)))
    cmd = [sys.executable, "-m", "damex", "run", "--config", str(cfg), "--steps", "3000",
           "--out", str(tmp_path / "out"), "--no-progress"]
    runs = [tmp_path / "out" / m for m in ("dense", "damex")]

    def steps(run):
        log = run / "log.jsonl"
        return [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.exists() else []

    def start_and_interrupt(after):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and \
                not all(len(steps(r)) >= after for r in runs):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)     # as a terminal's Ctrl-C: the group
        out, err = proc.communicate(timeout=180)
        return proc.returncode, out, err

    code, out, err = start_and_interrupt(2)
    assert code == 130, err
    assert "Traceback" not in err and "FAILED" not in out
    again = "damex run --config " + str(cfg)
    assert again in err and "continue with" in err
    from damex.engine.checkpoint import load_checkpoint
    stopped = {}
    for run in runs:
        assert "Traceback" not in (run / "worker.log").read_text()
        _, meta = load_checkpoint(run / "checkpoint.npz")
        assert steps(run) == list(range(1, meta["step"] + 1)) and meta["step"] >= 2
        stopped[run] = meta["step"]
    code, out, err = start_and_interrupt(max(stopped.values()) + 2)
    assert code == 130 and "Traceback" not in err, err
    for run in runs:
        _, meta = load_checkpoint(run / "checkpoint.npz")
        assert steps(run) == list(range(1, meta["step"] + 1)) and meta["step"] > stopped[run]
