"""Evaluation and studies spread over MPI ranks (``mpiexec -n 2``): the same batches as in
one process, dealt out over the ranks and gathered on rank 0, so the AP is identical."""
import json
import subprocess
import sys

import numpy as np
import pytest

from test_mpi import MODEL, MPIEXEC, _env, _log, _ok, _train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi_eval")
    model = dict(MODEL, gate_noise=1.0, capacity_factor=1.0)
    cfg = {"model": model,
           "data": {"synthetic": {"root": str(root / "data"), "preset": "tiny"}, "batch_size": 4,
                    "min_size": 48, "max_size": 64},
           "train": {"steps": 40, "threads": 1, "lr": 1e-3, "lr_backbone": 1e-3, "clip_max_norm": 0.1,
                     "eval_every": 20, "parallel": "data+experts"}}   # 40 steps: a mean AP > 0
    (root / "cfg.json").write_text(json.dumps(cfg))
    _ok(_train(root, root / "one", 1, steps=40))
    return root


def _eval(root, n, out):
    cmd = [sys.executable, "-m", "damex", "eval", str(root / "one" / "checkpoint.npz"), "--json", str(out),
           "--no-progress", "--batch-size", "3"]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n)] + cmd
    return _ok(subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=240))


def test_eval_over_two_ranks_gives_the_same_results(trained):
    one, two = _eval(trained, 1, trained / "one.json"), _eval(trained, 2, trained / "two.json")
    a, b = json.loads((trained / "one.json").read_text()), json.loads((trained / "two.json").read_text())
    assert a["mean_ap"] > 0
    assert a == b           # every AP, per class, the routing matrices: identical
    assert two.stdout.count("mean") == one.stdout.count("mean")   # rank 0 alone prints the table


def test_validation_in_expert_parallel_training(trained):
    """eval_every under data+experts: every rank evaluates its share of the images through
    the sharded experts; the result is what one process finds for the same weights."""
    _ok(_train(trained, trained / "two", 2, steps=40))
    log = _log(trained / "two")
    assert [r["step"] for r in log if "val" in r] == [20, 40]
    assert (trained / "two" / "best.npz").exists()
    p = _ok(subprocess.run([sys.executable, "-m", "damex", "eval", str(trained / "two" / "checkpoint.npz"),
                            "--json", str(trained / "two.eval.json"), "--no-progress"],
                           cwd=trained, env=_env(), capture_output=True, text=True, timeout=240))
    ref = json.loads((trained / "two.eval.json").read_text())
    val = log[-1]["val"]
    assert val["mean_ap"] > 0, p.stdout
    np.testing.assert_allclose(val["mean_ap"], ref["mean_ap"], rtol=1e-6)
    np.testing.assert_allclose(val["routing_accuracy"], ref["routing"]["accuracy"], rtol=1e-6)
    for name, ap in val["ap"].items():
        np.testing.assert_allclose(ap, ref["datasets"][name]["ap"], rtol=1e-6, err_msg=name)


def test_study_runs_split_over_two_ranks(trained, tmp_path):
    conf = json.loads((trained / "cfg.json").read_text())
    conf["train"].update(steps=1, eval_every=0, parallel="data")
    (tmp_path / "study.json").write_text(json.dumps(conf))
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "damex", "study", str(tmp_path / "study.json"),
           "--modes", "dense,damex", "--seeds", "1", "--jobs", "1", "--bootstrap", "10",
           "--out", str(tmp_path / "st")]
    p = _ok(subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600))
    result = json.loads((tmp_path / "st" / "study.json").read_text())
    assert sorted(r["mode"] for r in result["runs"]) == ["damex", "dense"]
    started = [line for line in p.stdout.splitlines() if "study: started" in line]
    assert len(started) == 2 and p.stdout.count("study: bootstrap") == 1   # one run per rank
