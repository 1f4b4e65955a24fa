"""Expert-parallel training (``"parallel": "data+experts"``) under ``mpiexec -n 2``.

Unlike plain data parallelism, the routing of data+experts is decided over the global
batch, so the gate noise and a dropping capacity stay on: a 2-rank run equals the
one-process run (capacity factor 1.0 drops tokens here).  4-rank runs are manual:
``DAMEX_MPI_N4=1 pytest tests/test_mpi_experts.py`` (mpich oversubscribes the cores).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_mpi import (MODEL, MPIEXEC, NAN_IN_RANK1, _assert_same_run, _env, _log, _ok, _script,
                      _train, _weights)

N4 = pytest.mark.skipif(os.environ.get("DAMEX_MPI_N4") != "1",
                        reason="4 ranks on loopback: a manual run (DAMEX_MPI_N4=1 pytest "
                               "tests/test_mpi_experts.py)")
LAYER = os.path.join(os.path.dirname(__file__), "mpi_moe_layer.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi_experts")
    model = dict(MODEL, gate_noise=1.0, capacity_factor=1.0)   # single-process randomness on
    cfg = {"model": model,
           "data": {"synthetic": {"root": str(root / "data"), "preset": "tiny"}, "batch_size": 4,
                    "min_size": 48, "max_size": 64},
           "train": {"steps": 4, "threads": 1, "lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 0.1,
                     "parallel": "data+experts"}}
    (root / "cfg.json").write_text(json.dumps(cfg))
    _ok(_train(root, root / "one", 1, steps=4))
    return root


def _layer(n, **opts):
    env = _env()
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(__import__("damex").__file__))
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, LAYER, json.dumps(opts)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(LAYER))


@pytest.mark.parametrize("opts", [
    {},
    {"k": 2, "loss": "balance", "capacity_factor": 0.8, "masked": True},
    {"k": 2, "normalize": "after_drop", "bpr": False, "loss": "damex+balance", "z_weight": 0.1,
     "switch_weight": 0.2},
    {"E": 2, "capacity_factor": 0.5},
    {"capacity_factor": 0.6, "capacity_sizing": "composition", "masked": True},
], ids=["damex", "k2-balance-mask-drops", "options", "one-expert-per-rank", "composition"])
def test_layer_equals_one_process(opts):
    """y, routing, aux loss and every gradient of one sharded layer equal the whole layer's."""
    p = _ok(_layer(2, **opts))
    assert p.stdout.count("ok") == 2, p.stdout + p.stderr   # (the two ranks' lines may interleave)


def test_two_ranks_equal_one_process(runs):
    _ok(_train(runs, runs / "two", 2, steps=4))
    assert any(r["dropped_fraction/decoder.0"] > 0 for r in _log(runs / "one"))   # capacity drops
    _assert_same_run(runs / "one", runs / "two")


def test_checkpoint_holds_every_expert_and_resumes_in_one(runs):
    _ok(_train(runs, runs / "half", 2, steps=2))
    with np.load(runs / "half" / "checkpoint.npz") as z:
        assert z["model.decoder.layers.0.ffn.moe.w1"].shape == (4, 32, 64)
        moments = [k for k in z.files if k.startswith("optim.state.") and z[k].shape == (4, 32, 64)]
        assert len(moments) == 2      # AdamW's two moments of w1, gathered too
    _ok(_train(runs, None, 1, "--resume", str(runs / "half" / "checkpoint.npz"), steps=4))
    _assert_same_run(runs / "one", runs / "half")


def test_checkpoint_of_one_process_resumes_at_two(runs):
    _ok(_train(runs, runs / "solo", 1, steps=2))
    _ok(_train(runs, None, 2, "--resume", str(runs / "solo" / "checkpoint.npz"), steps=4))
    _assert_same_run(runs / "one", runs / "solo")


def test_experts_not_divisible_is_refused(runs):
    p = _train(runs, runs / "odd", 2, "--set", "model.num_experts=3", "--set",
               "model.dataset_to_expert=[0, 1, 2, 0, 1]", steps=1, timeout=120)
    assert p.returncode != 0
    assert "has 3 experts, not divisible by the 2 ranks of an expert group" in p.stderr, p.stderr


def test_group_size_not_dividing_the_ranks_is_refused(runs):
    p = _train(runs, runs / "grp", 2, "--set", "train.expert_ranks=3", steps=1, timeout=120)
    assert p.returncode != 0
    assert "train.expert_ranks 3 does not divide the 2 ranks" in p.stderr, p.stderr


@N4
@pytest.mark.parametrize("opts", [{"group": 2, "k": 2, "capacity_factor": 1.0, "masked": True,
                                   "loss": "balance"}, {"group": 4, "E": 8}], ids=["groups", "E8"])
def test_layer_four_ranks(opts):
    p = _ok(_layer(4, **opts))
    assert p.stdout.count("ok") == 4, p.stdout + p.stderr


@N4
def test_four_ranks_groups_and_resume_from_two_at_four(runs):
    for name, extra in (("four", ()), ("groups", ("--set", "train.expert_ranks=2"))):
        _ok(_train(runs, runs / name, 4, *extra, steps=4))
        _assert_same_run(runs / "one", runs / name)
    _ok(_train(runs, runs / "half4", 2, steps=2))
    _ok(_train(runs, None, 4, "--resume", str(runs / "half4" / "checkpoint.npz"), steps=4))
    _assert_same_run(runs / "one", runs / "half4")
    assert _weights(runs / "half4").keys() == _weights(runs / "one").keys()


def test_nan_in_one_ranks_tokens_is_skipped_on_every_rank(runs, tmp_path):
    """The MoE exchange carries a NaN flag: every rank refuses the same layer, the step is
    skipped everywhere."""
    script = _script(tmp_path / "nan.py", NAN_IN_RANK1)
    p = _ok(_train(runs, runs / "nan", 2, "--set", "train.nonfinite=\"skip\"", steps=3, script=script))
    log = _log(runs / "nan")
    assert [("skipped" in r) for r in log] == [False, True, False]
    assert "tokens of rank(s) [1] hold NaN or inf" in p.stderr


def test_refusal_before_the_exchanges_on_one_rank_ends_the_job(runs, tmp_path):
    """Refused inside the model on one rank only, before its MoE exchanges: the others wait
    in them, so the job ends at once with a message instead of hanging."""
    script = _script(tmp_path / "early.py",
                     "from damex import ops\n"
                     "from damex.engine import distributed\n"
                     "from damex.models import dino\n"
                     "fwd = dino.DINO.forward\n"
                     "def patched(self, *a, ctx=None, **k):\n"
                     "    if ctx is not None and ctx.step == 1 and distributed.world().rank == 1:\n"
                     "        raise ops.NonFiniteInputError('boxes: contains NaN or inf')\n"
                     "    return fwd(self, *a, ctx=ctx, **k)\n"
                     "dino.DINO.forward = patched\n")
    p = _train(runs, runs / "early", 2, "--set", "train.nonfinite=\"skip\"", steps=3, script=script,
               timeout=120)
    assert p.returncode != 0
    assert "rank 1 of 2: boxes: contains NaN or inf (in this rank's forward" in p.stderr, p.stderr
