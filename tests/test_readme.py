"""The README's example is code a new user copies first: it must run."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], str(README), "exec"), {})
    printed = float(capsys.readouterr().out.strip())
    assert printed < 1e-13  # the example's claim: still unitary
