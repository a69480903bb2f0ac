"""The documentation's code: every ```python block of the docs' Markdown pages
runs as written (the API's docstring examples run as doctests)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [(page, index, code) for page in sorted(DOCS.rglob("*.md")) if "_build" not in page.parts
          for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


def test_the_docs_have_code():
    pages = {page.relative_to(DOCS).as_posix() for page, _, _ in BLOCKS}
    assert {"getting-started.md", "tutorials/toy.md", "tutorials/copy-torch.md", "tutorials/jax-optax.md",
            "tutorials/fourier-conv.md"} <= pages


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS,
                         ids=[f"{page.relative_to(DOCS).as_posix()}#{index}" for page, index, _ in BLOCKS])
def test_docs_code_runs(page, index, code, tmp_path, monkeypatch):
    for module in ("torch", "jax", "optax"):
        if re.search(rf"^\s*(import|from) {module}\b|unitary_lr\.{module}\b", code, flags=re.M):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"{page.name} block {index}", "exec"), {"__name__": "__docs__"})
