"""The benchmark harness (damex.testing.timing): torch's jobs timed in a process of their
own, which imports torch before damex (the two share one libgomp, whose idle spin the first
importer fixes), while the benchmark's own process imports damex first and takes torch's
results call by call."""
import json
import os
import subprocess
import sys

import pytest

import damex

pytest.importorskip("torch")

SCRIPT = '''
import json, os, sys
import damex
from damex.testing import timing

def main():
    from_child = timing.torch_in_own_process(__file__)
    import torch
    child = bool(os.environ.get(timing.TORCH_OUT))
    order = list(sys.modules)
    torch_first = order.index("torch") < order.index("damex")
    extra = {("torch extra", 1): (1, lambda: None)} if child and os.environ.get("DIVERGE") else {}
    jobs = {("damex", 1): (1, lambda: sum(range(1000))), ("torch", 1): (1, lambda: torch.ones(8).sum()),
            **extra}
    r = timing.interleaved(jobs, 2)
    r2 = timing.interleaved({"numpy": (None, lambda: None), "torch b": (None, lambda: None)}, 1, cpu=True)
    record = {"from_child": from_child, "child": child, "torch_first": torch_first,
              "r": {repr(k): v for k, v in r.items()}, "r2": {k: list(v) for k, v in r2.items()}}
    if child:
        with open(os.environ["CHILD_RECORD"], "w") as f:
            json.dump(record, f)
    print(json.dumps(record))

main()
'''


def run(tmp_path, **env):
    script = tmp_path / "bench_fake.py"
    script.write_text(SCRIPT)
    full = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(damex.__file__)),
                CHILD_RECORD=str(tmp_path / "child.json"), TMPDIR=str(tmp_path), **env)
    for name in ("DAMEX_BENCH_TORCH_OUT", "DAMEX_BENCH_TORCH_IN"):
        full.pop(name, None)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=full, capture_output=True,
                          text=True, timeout=300)


def test_torch_jobs_run_in_their_own_process_that_imports_torch_first(tmp_path):
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    theirs = json.loads((tmp_path / "child.json").read_text())
    assert ours["from_child"] and not ours["child"] and not ours["torch_first"]   # damex first here
    assert theirs["child"] and theirs["torch_first"]                              # torch first there
    # every job has a time here; the torch job's is the child's, the damex job's is this one's
    assert ours["r"]["('torch', 1)"] == theirs["r"]["('torch', 1)"] > 0
    assert ours["r"]["('damex', 1)"] > 0 and theirs["r"]["('damex', 1)"] != theirs["r"]["('damex', 1)"]  # NaN
    assert ours["r2"]["torch b"] == theirs["r2"]["torch b"] and ours["r2"]["numpy"][0] >= 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith("damex-bench-torch-")]   # removed at exit


def test_runs_that_go_different_ways_are_an_error(tmp_path):
    r = run(tmp_path, DIVERGE="1")
    assert r.returncode != 0
    assert "the two runs of the benchmark went different ways" in r.stderr
