"""Regression tests for issue 12 #12: structurally wrong, truncated or foreign
checkpoint files are a CheckpointError (a ValueError) naming the file and what
is wrong, from the API and at the CLI without a traceback."""
import json
import os

import numpy as np
import pytest

from damex.cli import main
from damex.engine.checkpoint import CheckpointError, load_checkpoint
from damex.engine.train import Trainer
from test_reliability_train import trainer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The entries of a real checkpoint after 2 steps: {name: array}."""
    root = tmp_path_factory.mktemp("ckpt")
    tr = trainer(str(root / "synthetic"), root / "run")
    tr.train_step()
    tr.train_step()
    path = tr.save(str(root / "good.npz"))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write(tmp_path, entries, name="bad.npz"):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        np.savez(f, **entries)
    return path


def meta_of(entries):
    return json.loads(str(entries["meta"]))


def with_meta(entries, meta):
    return dict(entries, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)))


def drop(entries, *keys):
    return {k: v for k, v in entries.items() if k not in keys}


def first(entries, prefix):
    return next(k for k in entries if k.startswith(prefix))


def cases(good):
    meta = meta_of(good)
    return {
        "meta {}": (with_meta(good, {}), "meta 'step' must be an integer >= 0, got None"),
        "format": (with_meta(good, dict(meta_of(good), format="other-2")), "meta 'format' is 'other-2'"),
        "meta list": (with_meta(good, [1, 2]), "must be a JSON object, got list"),
        "meta not JSON": (with_meta(good, "{'step': 2"), "'meta' entry is not valid JSON"),
        "meta not a string": (dict(good, meta=np.zeros(3)), "'meta' entry must be a JSON string"),
        "no meta": (drop(good, "meta"), "no 'meta' entry"),
        "step missing": (with_meta(good, drop(meta, "step")), "meta 'step'"),
        "step negative": (with_meta(good, dict(meta, step=-1)), "meta 'step'"),
        "config a list": (with_meta(good, dict(meta, config=[])), "meta 'config'"),
        "train a string": (with_meta(good, dict(meta, config=dict(meta["config"], train="x"))),
                           "meta 'config'"),
        "history a dict": (with_meta(good, dict(meta, history={})), "meta 'history'"),
        "no scheduler": (drop(good, "sched.last_epoch"), "scheduler entries do not fit: missing ['last_epoch']"),
        "extra scheduler": (dict(good, **{"sched.other": np.array(1)}), "unexpected ['other']"),
        "model key missing": (drop(good, first(good, "model.")), "model entries do not fit"),
        "model key extra": (dict(good, **{"model.ghost.weight": np.zeros(2, np.float32)}),
                            "model entries do not fit"),
        "model wrong shape": (dict(good, **{first(good, "model."): np.zeros(1, np.float32)}),
                              "size mismatch"),
        "no model at all": ({k: v for k, v in good.items() if not k.startswith("model.")},
                            "no model entries"),
        "optim extra param": (dict(good, **{"optim.state.99999.exp_avg": np.zeros(1, np.float32)}),
                              "unexpected optimizer entries ['optim.state.99999.exp_avg']"),
        "optim extra name": (dict(good, **{"optim.bogus": np.zeros(1)}), "unexpected optimizer entries"),
        "optim extra group": (dict(good, **{"optim.param_groups.7.lr": np.array(1.0)}),
                              "unexpected optimizer entries"),
        "optim group option missing": (drop(good, "optim.param_groups.0.lr"),
                                       "missing optimizer entries ['optim.param_groups.0.lr']"),
        "optim state incomplete": (drop(good, "optim.state.1.exp_avg_sq"),
                                   "incomplete optimizer state for parameter 1"),
        "optim state missing": ({k: v for k, v in good.items() if not k.startswith("optim.state.")},
                                "no per-parameter optimizer state"),
        "optim option shape": (dict(good, **{"optim.param_groups.1.lr": np.zeros(3)}),
                               "optim.param_groups.1.lr has shape (3,), expected ()"),
        "optim wrong shape": (dict(good, **{"optim.state.1.exp_avg": np.zeros(1, np.float32)}),
                              "optimizer entries do not fit"),
        "text entry": (dict(good, **{first(good, "model."): np.array("x")}), "dtype <U1"),
        "unknown entry": (dict(good, other=np.zeros(1)), "unexpected entry 'other'"),
    }


CASES = ["meta {}", "format", "meta list", "meta not JSON", "meta not a string", "no meta", "step missing",
         "step negative", "config a list", "train a string", "history a dict", "no scheduler",
         "extra scheduler", "model key missing", "model key extra", "model wrong shape",
         "no model at all", "optim extra param", "optim extra name", "optim extra group",
         "optim group option missing", "optim state incomplete", "optim state missing",
         "optim option shape", "optim wrong shape", "text entry", "unknown entry"]


@pytest.mark.parametrize("case", CASES)
def test_malformed_checkpoint_is_a_clear_error(good, tmp_path, case):
    entries, problem = cases(good)[case]
    path = write(tmp_path, entries)
    with pytest.raises(CheckpointError) as e:
        Trainer.from_checkpoint(path)
    assert str(e.value).startswith(path + ": ") and problem in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["meta {}", "meta list", "no scheduler", "model key missing",
                                  "optim extra param", "meta not JSON"])
def test_cli_reports_malformed_checkpoints_without_traceback(good, tmp_path, capsys, case):
    entries, problem = cases(good)[case]
    path = write(tmp_path, entries)
    commands = [["train", "--resume", path, "--no-progress"]]
    if not case.startswith("optim") and case != "no scheduler":   # eval reads the model only
        commands.append(["eval", path, "--no-progress"])
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"damex {argv[0]}: error: {path}: " in err and problem in err and "Traceback" not in err


def test_truncated_foreign_and_folder_files(good, tmp_path):
    path = write(tmp_path, good, "full.npz")
    raw = open(path, "rb").read()
    for name, data in [("half.npz", raw[: len(raw) // 2]), ("tail.npz", raw[:-40]),
                       ("text.npz", b"not a checkpoint at all\n"), ("empty.npz", b"")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(p))
        assert str(e.value).startswith(f"{p}: not a readable damex checkpoint"), str(e.value)
    arr = tmp_path / "array.npy"
    np.save(arr, np.zeros(3))
    with pytest.raises(CheckpointError, match="not a damex checkpoint"):
        load_checkpoint(str(arr))
    os.mkdir(tmp_path / "folder.npz")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(str(tmp_path / "folder.npz"))
    with pytest.raises(FileNotFoundError, match="nope.npz: checkpoint not found"):
        load_checkpoint(str(tmp_path / "nope.npz"))


def test_the_good_checkpoint_still_loads(good, tmp_path):
    tr = Trainer.from_checkpoint(write(tmp_path, good, "ok.npz"))
    assert tr.step == 2 and len(tr.optimizer.state) > 0
