"""The README's examples are the code a new user copies first: they must run."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4  # the first example, then PyTorch, JAX and NumPy loops


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    needs = [m for m in ("torch", "jax", "optax") if re.search(rf"^import {m}|^from unitary_lr.{m}|import {m}\b", BLOCKS[index], re.M)]
    for module in needs:
        pytest.importorskip(module)
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {})
    if index == 0:  # the first example prints the unitarity error it claims
        assert float(capsys.readouterr().out.strip()) < 1e-13
