"""Regression tests for the training-policy and run-file defects of issue 12:
#3 non-finite values, #6 log.jsonl across a kill and resume, #8 a checkpoint
without optimizer state, #17 interrupted saves (stale temporaries, fsync)."""
import json
import os
import stat

import numpy as np
import pytest

from damex.engine import checkpoint as ckpt_mod
from damex.engine.checkpoint import CheckpointError, save_checkpoint, temp_path
from damex.engine.config import run_config_from_dict
from damex.engine.train import NonFiniteError, Trainer
from damex.cli import main

SMALL_MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
               "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
               "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
               "stem_width": 8, "dn_number": 12}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reliability_data") / "synthetic")


def config(data_root, out_dir, **train):
    train = {"steps": 4, "out_dir": str(out_dir), "checkpoint_every": 2, "threads": 1, **train}
    return {"model": SMALL_MODEL,
            "data": {"synthetic": {"root": data_root, "preset": "tiny"}, "batch_size": 2,
                     "min_size": 48, "max_size": 64},
            "train": train}


def trainer(data_root, out_dir, **train):
    return Trainer(run_config_from_dict(config(data_root, out_dir, **train)))


def poison(tr, bad_steps):
    """Make the batches of the given (0-based) steps all-NaN images."""
    batch = tr.batch

    def poisoned(step):
        b = batch(step)
        if step in bad_steps:
            b["images"] = np.full_like(b["images"], np.nan)
        return b
    tr.batch = poisoned


def params(tr):
    return {n: p.data.copy() for n, p in tr.model.named_parameters()}


def log_steps(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# ---------------------------------------------------------------- #3 non-finite values

def test_nan_batch_stops_training_naming_step_and_tensor(data_root, tmp_path):
    tr = trainer(data_root, tmp_path / "run")
    poison(tr, {2})
    tr.fit(2, progress=False)
    before = params(tr)
    with pytest.raises(NonFiniteError) as e:
        tr.fit(4, progress=False)
    msg = str(e.value)
    assert msg.startswith("step 3: ")
    # relu maps NaN to 0 in some builds (the loss stays finite, the gradients do not)
    assert "the loss is nan" in msg or ("the gradient norm is nan" in msg and "backbone." in msg)
    assert tr.step == 2
    for n, p in params(tr).items():                 # nothing was applied
        np.testing.assert_array_equal(p, before[n], err_msg=n)
    assert log_steps(tmp_path / "run") == [1, 2]


def test_cli_reports_non_finite_stop_without_traceback(data_root, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config(data_root, tmp_path / "run")))
    orig = Trainer.batch

    def bad(self, step):
        b = orig(self, step)
        b["images"][:] = np.inf if step == 1 else b["images"]
        return b
    monkeypatch.setattr(Trainer, "batch", bad)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "damex train: error: step 2: " in err and "training stopped" in err
    assert "Traceback" not in err


def test_skip_policy_skips_bad_batches_and_keeps_weights_finite(data_root, tmp_path):
    tr = trainer(data_root, tmp_path / "run", nonfinite="skip", nonfinite_max_skips=2, steps=5)
    poison(tr, {1, 3})
    fit = tr.fit(progress=False)
    assert tr.step == 5 and os.path.exists(fit["checkpoint"])
    skipped = [r["step"] for r in tr.history if "skipped" in r]
    assert skipped == [2, 4]
    for n, p in tr.model.named_parameters():
        assert np.isfinite(p.data).all(), n
    for st in tr.optimizer.state.values():
        assert all(np.isfinite(v).all() for v in st.values())
    assert log_steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    # the skip count survives a resume: a third bad batch is one too many
    again = Trainer.from_checkpoint(fit["checkpoint"], steps=7)
    poison(again, {5})
    with pytest.raises(NonFiniteError, match=r"step 6: .*after skipping 2 bad batches"):
        again.fit(progress=False)


def test_non_finite_parameter_after_the_step_is_named(data_root, tmp_path, monkeypatch):
    tr = trainer(data_root, tmp_path / "run", nonfinite="skip")
    step = tr.optimizer.step
    name, victim = list(tr.model.named_parameters())[5]

    def overflowing_step():
        step()
        victim.data.flat[0] = np.inf
    monkeypatch.setattr(tr.optimizer, "step", overflowing_step)
    with pytest.raises(NonFiniteError, match=rf"step 1: parameter {name} is not finite after the optimizer step"):
        tr.train_step()


@pytest.mark.parametrize("train,problem", [
    ({"nonfinite": "ignore"}, "'train.nonfinite' = 'ignore' must be one of ['stop', 'skip']"),
    ({"nonfinite_max_skips": -1}, "'train.nonfinite_max_skips' = -1 must be >= 0"),
    ({"nonfinite": 1}, "'train.nonfinite' has the wrong type")])
def test_nonfinite_policy_config_is_checked(data_root, tmp_path, train, problem):
    from damex.data.config import ConfigError
    with pytest.raises(ConfigError) as e:
        run_config_from_dict(config(data_root, tmp_path, **train), source="cfg.json")
    assert str(e.value).startswith("cfg.json: ") and problem in str(e.value)
    cfg = run_config_from_dict(config(data_root, tmp_path, nonfinite="skip", nonfinite_max_skips=0))
    assert (cfg.train.nonfinite, cfg.train.nonfinite_max_skips) == ("skip", 0)
    assert run_config_from_dict(config(data_root, tmp_path)).train.nonfinite == "stop"


# ---------------------------------------------------------------- #6 log.jsonl

def test_log_is_on_disk_whenever_a_checkpoint_is(data_root, tmp_path, monkeypatch):
    tr = trainer(data_root, tmp_path / "run", steps=4)
    seen = []
    save = Trainer.save

    def spy(self, path):
        seen.append((self.step, log_steps(tmp_path / "run")))   # what a kill right now would leave
        return save(self, path)
    monkeypatch.setattr(Trainer, "save", spy)
    tr.fit(progress=False)
    assert seen == [(2, [1, 2]), (4, [1, 2, 3, 4])]   # (the last step's checkpoint is written once)


def test_resume_after_a_kill_cuts_the_log_back_to_the_checkpoint(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = trainer(data_root, out, steps=6)
    step = Trainer.train_step

    def killed_after_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self)
    monkeypatch.setattr(Trainer, "train_step", killed_after_3)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(progress=False)
    monkeypatch.setattr(Trainer, "train_step", step)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2')                  # a torn last line
    assert log_steps_raw(out)[-1].startswith('{"step": 4')
    again = Trainer.from_checkpoint(str(out / "checkpoint.npz"))
    assert again.step == 2
    again.fit(progress=False)
    assert log_steps(out) == [1, 2, 3, 4, 5, 6]
    recs = [json.loads(x) for x in log_steps_raw(out)]
    assert [r["step"] for r in again.history] == [1, 2, 3, 4, 5, 6]
    assert recs == json.loads(json.dumps(again.history))


def log_steps_raw(out):
    return (out / "log.jsonl").read_text().splitlines()


def test_a_fresh_run_starts_a_fresh_log(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 2, "loss": 9}\n')
    from damex.engine.rundir import RunDirError
    with pytest.raises(RunDirError, match="already holds a run"):   # issue 10: never overwrite silently
        trainer(data_root, out, steps=1).fit(progress=False)
    trainer(data_root, out, steps=1).fit(progress=False, overwrite=True)
    recs = [json.loads(x) for x in log_steps_raw(out)]
    assert [r["step"] for r in recs] == [1] and recs[0]["loss"] != 9


# ---------------------------------------------------------------- #8 optimizer state

def test_checkpoint_without_optimizer_state_is_refused(data_root, tmp_path, capsys):
    tr = trainer(data_root, tmp_path / "run")
    tr.train_step()
    tr.train_step()
    path = str(tmp_path / "no_optim.npz")
    save_checkpoint(path, model=tr.model, scheduler=tr.scheduler, meta=tr.meta())
    with pytest.raises(CheckpointError) as e:
        Trainer.from_checkpoint(path)
    assert path in str(e.value) and "no optimizer entries" in str(e.value)
    assert main(["train", "--resume", path, "--no-progress"]) == 2
    assert "no optimizer entries" in capsys.readouterr().err
    assert main(["eval", path, "--no-progress"]) == 0          # evaluation needs the model only
    # resuming without it is possible, but only on request
    again = Trainer.from_checkpoint(path, fresh_optimizer=True)
    assert again.step == 2 and again.optimizer.state == {}
    for (n, p), (_, q) in zip(tr.model.named_parameters(), again.model.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)


# ---------------------------------------------------------------- #17 interrupted saves

def test_stale_temporary_is_removed_when_training_starts(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    stale = temp_path(str(out / "checkpoint.npz"))
    with open(stale, "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    tr = trainer(data_root, out, steps=1)
    step = Trainer.train_step
    present = []

    def spy(self):
        present.append(os.path.exists(stale))
        return step(self)
    monkeypatch.setattr(Trainer, "train_step", spy)
    tr.fit(progress=False)
    assert present == [False] and not os.path.exists(stale)


def test_save_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    from damex import nn
    synced = []
    fsync = os.fsync

    def spy(fd):
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        return fsync(fd)
    monkeypatch.setattr(ckpt_mod.os, "fsync", spy)
    path = tmp_path / "c.npz"
    save_checkpoint(str(path), model=nn.Linear(2, 3), meta={"step": 0})
    assert synced == ["file", "dir"]
    assert os.listdir(tmp_path) == ["c.npz"]
