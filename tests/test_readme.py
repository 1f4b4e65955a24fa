"""README.md stays true: its two set-up commands are the ones CI runs, and
every Python example in it runs."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_opens_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert block[0].startswith("pip install . && damex run")
    assert "pytest" in block[1]
    assert "torch==2.13.0" in block[1]


@pytest.mark.parametrize("i", range(len(EXAMPLES)))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[i], f"README example {i}", "exec"), {})
