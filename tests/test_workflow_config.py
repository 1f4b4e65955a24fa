"""One configuration schema (issue 11): types and ranges of every section checked by
the same code, errors naming the file and the key; ``base`` inheritance; ``--set``."""
import json
import os

import pytest

from damex.cli import main
from damex.data.config import ConfigError
from damex.engine.config import apply_overrides, default_threads, finalize, load_run_config


def write(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("section,key,value,phrase", [
    ("model", "num_experts", "4", "wrong type"),
    ("model", "d_model", 64.0, "wrong type"),
    ("model", "seed", "0", "wrong type"),
    ("model", "moe_decoder_layers", [7], "do not exist"),
    ("model", "num_experts", 0, ">= 1"),
    ("model", "num_queries", 0, ">= 1"),
    ("model", "dn_number", -1, ">= 0"),
    ("model", "moe_decoder_layers", [0, 3], "do not exist"),
    ("model", "routing", "dam", "one of"),
    ("model", "dataset_to_expert", [0, 9], "experts are 0..3"),
    ("train", "steps", 0, ">= 1"),
    ("train", "checkpoint_every", -1, ">= 0"),
    ("train", "clip_max_norm", -0.5, ">= 0"),
    ("train", "log_every", -1, ">= 0"),
    ("train", "threads", 513, "[1, 512]"),
    ("train", "threads", -1, "[1, 512]"),
    ("train", "lr", "1e-4", "wrong type"),
    ("data", "hflip", 1.5, "[0.0, 1.0]"),
    ("data", "batch_size", 0, ">= 1"),
])
def test_type_and_range_errors_name_file_and_key(tmp_path, section, key, value, phrase):
    p = write(tmp_path / "bad.json", {section: {key: value}})
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"'{section}.{key}'" in msg and phrase in msg, msg


def test_non_finite_floats_are_rejected(tmp_path):
    p = tmp_path / "nan.json"
    p.write_text('{"data": {"hflip": NaN}}')
    with pytest.raises(ConfigError, match="'data.hflip' has the wrong type"):
        load_run_config(p)
    p.write_text('{"train": {"lr": Infinity}}')
    with pytest.raises(ConfigError, match="'train.lr'"):
        load_run_config(p)


def test_unknown_keys_have_their_prefix_and_the_known_keys(tmp_path):
    for section, key in (("train", "stpes"), ("model", "num_expert"), ("data", "bach_size")):
        p = write(tmp_path / "u.json", {section: {key: 1}})
        with pytest.raises(ConfigError) as e:
            load_run_config(p)
        assert f"unknown key '{section}.{key}'" in str(e.value) and "known keys" in str(e.value)


def test_base_inheritance_merges_and_resolves_against_each_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "common.json",
          {"model": {"num_experts": 2, "d_model": 32, "n_heads": 2},
           "data": {"synthetic": {"root": "shared_data"}, "batch_size": 3},
           "train": {"lr": 1e-3, "steps": 10}})
    child = write(tmp_path / "child.json", {"base": "base/common.json", "train": {"steps": 20},
                                            "data": {"hflip": 0.0}})
    cfg = load_run_config(child)
    assert cfg.model.num_experts == 2 and cfg.train.lr == 1e-3 and cfg.train.steps == 20
    assert cfg.data.batch_size == 3 and cfg.data.hflip == 0.0
    assert cfg.data.synthetic.root == str(tmp_path / "base" / "shared_data")
    write(tmp_path / "loop.json", {"base": "loop.json"})
    with pytest.raises(ConfigError, match="loops"):
        load_run_config(tmp_path / "loop.json")
    write(tmp_path / "orphan.json", {"base": "missing.json"})
    with pytest.raises(ConfigError, match="missing.json"):
        load_run_config(tmp_path / "orphan.json")


def test_set_reaches_nested_keys_and_unknown_keys_are_named(tmp_path):
    p = write(tmp_path / "c.json", {"train": {"lr": 1e-3}})
    cfg = load_run_config(p, ["train.lr=1e-4", "model.num_experts=8", "data.synthetic.seed=3",
                              "model.moe_decoder_layers=[0, 1]", "data.sampler=uniform"])
    assert cfg.train.lr == 1e-4 and cfg.model.num_experts == 8 and cfg.data.synthetic.seed == 3
    assert cfg.model.moe_decoder_layers == (0, 1) and cfg.data.sampler == "uniform"
    for bad in ("train.lrr=1", "model.experts=2", "data.synthetic.sede=1", "optim.lr=1", "lr=1"):
        with pytest.raises(ConfigError) as e:
            load_run_config(p, [bad])
        assert repr(bad.split("=")[0]) in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="'model.num_experts'"):
        load_run_config(p, ["model.num_experts=many"])


def test_set_on_the_command_line(tmp_path, capsys):
    p = write(tmp_path / "c.json", {"train": {"steps": 1}})
    assert main(["train", str(p), "--set", "train.stpes=2"]) == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "known keys" in err


def test_set_takes_several_keys_after_one_flag_into_the_run(tmp_path):
    """As the issue writes it: `--set train.lr=1e-4 model.num_experts=8` reaches the run
    (the checkpoint's config), nested keys included."""
    from damex.engine.checkpoint import load_checkpoint

    model = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
             "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
             "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32], "stem_width": 8, "dn_number": 12}
    p = write(tmp_path / "c.json", {
        "model": model, "data": {"synthetic": {"root": "data", "preset": "tiny"}, "batch_size": 2,
                                 "min_size": 48, "max_size": 64},
        "train": {"steps": 1, "out_dir": str(tmp_path / "run"), "checkpoint_every": 0}})
    assert main(["train", str(p), "--set", "train.lr=1e-4", "model.num_experts=8",
                 "--set", "data.synthetic.seed=3", "--no-progress"]) == 0
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    conf = meta["config"]
    assert conf["train"]["lr"] == 1e-4 and conf["model"]["num_experts"] == 8
    assert conf["data"]["synthetic"]["seed"] == 3


def test_out_dir_and_threads_are_fixed_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path / "c.json", {"train": {"out_dir": "runs/x"}})
    cfg = finalize(load_run_config(p))
    assert cfg.train.out_dir == str(tmp_path / "runs" / "x")
    assert cfg.train.threads == default_threads(cfg.model) == 1          # the tiny preset
    mid = finalize(load_run_config(p, ["model.d_model=128"]))   # measured: still faster at 1
    assert mid.train.threads == 1
    for wide in (["model.d_model=256"], ["model.preset=paper"], ["model.preset=dino"]):
        assert finalize(load_run_config(p, wide)).train.threads == (os.cpu_count() or 1), wide
    assert finalize(load_run_config(p, ["train.threads=2"])).train.threads == 2


def test_a_folder_given_as_config_is_a_clear_error(tmp_path, capsys):
    from damex.cli import main
    assert main(["train", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: is a folder, not a config file" in err and "Traceback" not in err
