"""The damex command line: train, resume, eval (own split and user datasets,
--json and --pictures), and clear errors for bad configs."""
import json

import pytest

from damex.cli import main

SMALL_MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
               "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
               "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
               "stem_width": 8, "dn_number": 12}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = {"model": SMALL_MODEL,
           "data": {"synthetic": {"root": "data", "preset": "tiny"}, "batch_size": 2,
                    "min_size": 48, "max_size": 64},
           "train": {"steps": 3, "out_dir": str(root / "run"), "checkpoint_every": 2, "threads": 1}}
    (root / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", str(root / "cfg.json"), "--no-progress"]) == 0
    return root


def test_train_writes_checkpoint_log_and_resumes(run_dir):
    ckpt = run_dir / "run" / "checkpoint.npz"
    assert ckpt.exists()
    lines = (run_dir / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert main(["train", "--resume", str(ckpt), "--steps", "4", "--no-progress"]) == 0
    lines = (run_dir / "run" / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4


def test_eval_json_and_pictures(run_dir, capsys):
    out = run_dir / "res.json"
    pics = run_dir / "pics"
    assert main(["eval", str(run_dir / "run" / "checkpoint.npz"), "--json", str(out),
                 "--pictures", str(pics), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["datasets"]) == {"flat", "noise", "stripes", "sketch", "camo"}
    assert 0.0 <= res["mean_ap"] <= 1.0
    assert all({"ap", "ap50", "ap75"} <= set(v) for v in res["datasets"].values())
    assert 0.0 <= res["routing"]["accuracy"] <= 1.0
    layer = res["routing"]["layers"][0]
    assert len(layer["matrix"]) == 5 and len(layer["matrix"][0]) == 4
    assert "mean" in capsys.readouterr().out
    assert any(p.name.startswith("routing_") for p in pics.iterdir())
    assert any(p.name.startswith("detections_") for p in pics.iterdir())


def test_eval_on_user_datasets(run_dir):
    data = run_dir / "data"
    out = run_dir / "user.json"
    spec = f"mine={data / 'noise' / 'annotations' / 'val.json'}:{data / 'noise' / 'images'}"
    assert main(["eval", str(run_dir / "run" / "checkpoint.npz"), "--dataset", spec,
                 "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert list(res["datasets"]) == ["mine"]
    assert res["routing"]["accuracy"] is None   # a dataset the model has no expert map for


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"preset": "tiny"}, "train": {"stpes": 3}}))
    assert main(["train", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stpes" in err and "bad.json" in err
    assert main(["eval", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
