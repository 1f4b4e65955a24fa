"""Data-parallel training under ``mpiexec -n 2`` (the mpich wheel on loopback).

Every test launches real processes: ``mpiexec -n 2 python -m damex train``.  Exact
equality with one process needs the per-rank randomness off (gate noise 0, a
capacity factor >= num_experts, i.e. dropless; see damex.engine.distributed).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from damex.engine.distributed import launched_size, local_slice

pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install 'damex[mpi]')")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
if MPIEXEC is None:
    pytest.skip("no mpiexec (pip install mpich)", allow_module_level=True)

MODEL = {"preset": "tiny", "d_model": 32, "d_ffn": 64, "n_heads": 2, "n_points": 2,
         "enc_layers": 1, "dec_layers": 2, "num_queries": 12, "moe_decoder_layers": [0],
         "num_experts": 4, "moe_hidden": 64, "backbone_widths": [8, 16, 32, 32],
         "stem_width": 8, "dn_number": 12, "routing": "damex",
         "gate_noise": 0.0, "capacity_factor": 4.0}   # per-rank randomness off: exact equality
RTOL = 1e-4
TIMEOUT = 240


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MV2_"))}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(root, out, n, *extra, steps=3, timeout=TIMEOUT, script=None):
    cmd = [sys.executable] + ([str(script)] if script else ["-m", "damex"])
    cmd += ["train", *extra, "--no-progress"]
    if "--resume" not in extra:
        cmd += [str(root / "cfg.json"), "--out", str(out)]
    cmd += ["--steps", str(steps)]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n)] + cmd
    return subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(p):
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _weights(run):
    with np.load(run / "checkpoint.npz") as z:
        return {k: z[k].astype(np.float64) for k in z.files if k.startswith("model.")}


def _assert_same_run(a, b):
    la, lb = _log(a), _log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert set(ra) - {"time", "images_per_s"} <= set(rb)
        for key in ra:
            if key.startswith(("loss", "dropped_fraction", "routing_accuracy")) or key == "grad_norm":
                np.testing.assert_allclose(rb[key], ra[key], rtol=RTOL, atol=1e-7, err_msg=f"{key} at {ra['step']}")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    va = np.concatenate([wa[k].ravel() for k in sorted(wa)])
    vb = np.concatenate([wb[k].ravel() for k in sorted(wa)])
    # relative over the whole model: parameters whose exact gradient is 0 (a bias before a
    # GroupNorm) get Adam steps of lr size from float noise, in one process as in two
    assert np.linalg.norm(va - vb) / np.linalg.norm(va) < RTOL


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi")
    cfg = {"model": MODEL,
           "data": {"synthetic": {"root": str(root / "data"), "preset": "tiny"}, "batch_size": 4,
                    "min_size": 48, "max_size": 64},
           "train": {"steps": 4, "threads": 1, "lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 0.1}}
    (root / "cfg.json").write_text(json.dumps(cfg))
    _ok(_train(root, root / "one", 1, steps=4))
    return root


def test_local_slice_and_no_mpi_in_one_process(tmp_path):
    assert [local_slice(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    assert launched_size() == 1    # pytest itself is not an MPI launch: the plain path
    out = subprocess.run([sys.executable, "-c", "import sys, damex.engine.train; "
                          "print('mpi4py' in sys.modules)"], env=_env(), capture_output=True, text=True,
                         cwd=tmp_path)   # not the source tree's folder: the damex the tests import
    assert out.stdout.strip() == "False", out.stderr


def test_every_per_image_denoising_field_is_sliced():
    import dataclasses

    from damex.engine.distributed import _DN_PER_IMAGE
    from damex.models.denoising import prepare_cdn

    targets = [{"boxes": np.full((n, 4), 0.25), "labels": np.zeros(n, np.int64)} for n in (1, 2, 3, 1, 2)]
    dn = prepare_cdn(targets, num_classes=3, num_queries=7, rng=np.random.default_rng(0), dn_number=6)
    per_image = {f.name for f in dataclasses.fields(dn)
                 if f.name != "attn_mask" and hasattr(getattr(dn, f.name), "__len__")
                 and len(getattr(dn, f.name)) == len(targets)}
    assert per_image == set(_DN_PER_IMAGE)


def test_two_ranks_equal_one_process(runs):
    p = _ok(_train(runs, runs / "two", 2, steps=4))
    assert p.stdout.count("step 4: loss") == 1      # only rank 0 reports
    _assert_same_run(runs / "one", runs / "two")


def test_checkpoint_of_two_ranks_resumes_in_one(runs):
    _ok(_train(runs, runs / "half", 2, steps=2))
    assert len(_log(runs / "half")) == 2      # one log, written by rank 0 only
    _ok(_train(runs, None, 1, "--resume", str(runs / "half" / "checkpoint.npz"), steps=4))
    _assert_same_run(runs / "one", runs / "half")


def test_batch_not_divisible_is_refused(runs):
    p = _train(runs, runs / "three", 3, steps=1, timeout=120)
    assert p.returncode != 0
    assert "batch_size 4 is not divisible by the 3 ranks" in p.stderr


def test_different_configs_across_ranks_are_refused(runs):
    base = [sys.executable, "-m", "damex", "train", str(runs / "cfg.json"), "--no-progress",
            "--out", str(runs / "mixed"), "--steps", "1"]
    p = subprocess.run([MPIEXEC, "-n", "1", *base, ":", "-n", "1", *base, "--set", "train.lr=1e-3"],
                       cwd=runs, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "rank(s) [1] have a different run config than rank 0" in p.stderr


def _rank1_script(path, action):
    """A ``damex`` entry point whose rank 1 does ``action`` at the start of step 1."""
    path.write_text(
        "import os, sys, time\n"
        "from damex.engine import train\n"
        "step = train.Trainer.train_step\n"
        "def patched(self):\n"
        "    if self.step == 1 and self.world.rank == 1:\n"
        f"        {action}\n"
        "    return step(self)\n"
        "train.Trainer.train_step = patched\n"
        "from damex.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    return path


def test_killed_rank_ends_the_job(runs, tmp_path):
    script = _rank1_script(tmp_path / "die.py", "os.kill(os.getpid(), 9)")
    t0 = time.perf_counter()
    p = _train(runs, runs / "dead", 2, steps=3, timeout=120, script=script)
    assert p.returncode != 0
    assert time.perf_counter() - t0 < 120
    assert "BAD TERMINATION" in p.stdout + p.stderr   # mpich's mpiexec reports it and kills the rest
    # mpiexec names only a process id; damex names the rank (damex.engine.distributed.supervise)
    assert "damex: rank 1 of 2" in p.stderr and "was killed by signal 9 (SIGKILL)" in p.stderr, p.stderr


def test_exception_on_one_rank_aborts_naming_it(runs, tmp_path):
    script = _rank1_script(tmp_path / "fail.py", "raise RuntimeError('boom')")
    p = _train(runs, runs / "failed", 2, steps=3, timeout=120, script=script)
    assert p.returncode != 0
    assert "rank 1 of 2: RuntimeError: boom" in p.stderr


def test_stuck_rank_times_out(runs, tmp_path, monkeypatch):
    script = _rank1_script(tmp_path / "stuck.py", "time.sleep(60)")
    monkeypatch.setenv("DAMEX_MPI_TIMEOUT", "3")
    t0 = time.perf_counter()
    p = _train(runs, runs / "stuck", 2, steps=3, timeout=120, script=script)
    assert p.returncode != 0
    assert time.perf_counter() - t0 < 55
    assert "rank 0 of 2: no answer from the other ranks within 3 s" in p.stderr


@pytest.mark.skipif(os.environ.get("DAMEX_MPI_N4") != "1",
                    reason="4 ranks on loopback: a manual run (DAMEX_MPI_N4=1 pytest tests/test_mpi.py)")
def test_four_ranks_and_resume_from_two_at_four(runs):
    _ok(_train(runs, runs / "four", 4, steps=4))
    _assert_same_run(runs / "one", runs / "four")
    _ok(_train(runs, runs / "half4", 2, steps=2))
    _ok(_train(runs, None, 4, "--resume", str(runs / "half4" / "checkpoint.npz"), steps=4))
    _assert_same_run(runs / "one", runs / "half4")


def test_other_commands_refuse_several_ranks(runs):
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "damex", "predict", "missing.npz",
                        "x.png"], cwd=runs, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "only `damex train`, `eval` and `study` run on several MPI ranks" in p.stderr


def _script(path, body):
    """A `damex` entry script that runs ``body`` (Python, after ``np`` and ``train`` are
    imported) before the command line."""
    path.write_text("import sys\nimport numpy as np\nfrom damex.engine import train\n" + body +
                    "from damex.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return path


#: turns rank 1's images (the second half of a batch of 4) into NaN at step 1
NAN_IN_RANK1 = ("batch = train.Trainer.batch\n"
                "def patched(self, step):\n"
                "    b = batch(self, step)\n"
                "    if step == 1:\n"
                "        b['images'][2:] = np.nan\n"
                "    return b\n"
                "train.Trainer.batch = patched\n")


def test_nan_batch_is_skipped_on_every_rank(runs, tmp_path):
    """NaN in one rank's images: one decision for all ranks (skip the step everywhere)."""
    script = _script(tmp_path / "nan.py", NAN_IN_RANK1)
    _ok(_train(runs, runs / "nan", 2, "--set", "train.nonfinite=\"skip\"", steps=3, script=script))
    log = _log(runs / "nan")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "skipped" in log[1] and "skipped" not in log[0] and "skipped" not in log[2]


def test_ctrl_c_checkpoints_every_rank(runs):
    """SIGINT to mpiexec reaches each rank once (through its supervisor): every rank finishes
    the step, one checkpoint is written and the job exits 130 with the resume command."""
    import signal

    out = runs / "ctrlc"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "damex", "train", str(runs / "cfg.json"),
           "--no-progress", "--out", str(out), "--steps", "100000"]
    p = subprocess.Popen(cmd, cwd=runs, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 120 and not (
                (out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 3):
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stdout + stderr
    assert "interrupted at step" in stderr and (out / "checkpoint.npz").exists()
