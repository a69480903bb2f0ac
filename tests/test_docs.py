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
    for module in ("torch", "jax", "optax", "peft"):
        if re.search(rf"^\s*(import|from) {module}\b|unitary_lr\.{module}\b", code, flags=re.M):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"{page.name} block {index}", "exec"), {"__name__": "__docs__"})


ROOT = DOCS.parent
# Words of the project's own planning that mean nothing to a reader.
INTERNAL = re.compile(r"\bfloor \d|design notes|\bthe issue\b|issue's target|\bsection 2\b", re.I)


def _api_entries():
    """(module name, attribute) of every entry of docs/api.md's autosummary tables."""
    current = "unitary_lr"
    for line in (DOCS / "api.md").read_text().splitlines():
        directive = re.match(r"\.\. currentmodule:: (\S+)", line)
        if directive:
            current = directive.group(1)
            continue
        entry = re.fullmatch(r"   ([A-Za-z_][\w.]*)", line)
        if entry:
            module_name, _, attribute = f"{current}.{entry.group(1)}".rpartition(".")
            yield module_name, attribute


def _public_texts():
    """(where, text) for what a user reads: the README, the docs' pages, the
    docstrings of the documented API and the command's --help."""
    import inspect

    yield "README.md", (ROOT / "README.md").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" not in page.parts:
            yield page.relative_to(ROOT).as_posix(), page.read_text()
    import importlib

    for module_name, attribute in _api_entries():
        if module_name.split(".")[1:2] in (["torch"], ["optax"], ["peft"]):
            pytest.importorskip(module_name.split(".")[1])
        obj = getattr(importlib.import_module(module_name), attribute)
        name = f"{module_name}.{attribute}"
        yield f"docstring of {name}", inspect.getdoc(obj) or ""
        for member_name, member in vars(obj).items() if inspect.isclass(obj) else ():
            if callable(member) and (member_name == "__init__" or not member_name.startswith("_")):
                yield f"docstring of {name}.{member_name}", inspect.getdoc(member) or ""
    from unitary_lr.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command, subparser in commands.choices.items():
        yield f"unitary-lr {command} --help", subparser.format_help()


def test_public_text_has_no_internal_vocabulary():
    found = [f"{where}: {match.group(0)!r}" for where, text in _public_texts() for match in INTERNAL.finditer(text)]
    assert not found, found


def _conf():
    pytest.importorskip("sphinx")
    namespace = {"__file__": str(DOCS / "conf.py")}
    try:
        exec(compile((DOCS / "conf.py").read_text(), "docs/conf.py", "exec"), namespace)
    except RuntimeError as error:  # the docs extra is not installed in this environment
        pytest.skip(str(error))
    return namespace


def test_docs_serve_mathjax_themselves():
    """Formulas render offline: MathJax comes from the site's own _static, not a CDN."""
    conf = _conf()
    path = conf["mathjax_path"]
    assert "://" not in path and not path.startswith("//"), path
    assert any((Path(static) / path).is_file() for static in conf["html_static_path"]), conf["html_static_path"]


def test_docs_check_every_reference():
    conf = _conf()
    assert conf["nitpicky"] is True
    # only names outside the project (no inventory offline) or named in prose
    for _, target in conf.get("nitpick_ignore", []):
        assert not target.startswith("unitary_lr"), target


def test_class_pages_list_only_their_own_members():
    """The torch layers' pages must not list the ~55 members they inherit from
    nn.Module: the autosummary class template leaves inherited members out."""
    template = (DOCS / "_templates" / "autosummary" / "class.rst").read_text()
    assert "inherited_members" in template
    conf = _conf()
    assert "_templates" in conf["templates_path"]
    assert conf["autodoc_default_options"].get("inherited-members") is False


# The modules the API reference documents, with the optional libraries each needs.
DOCUMENTED_MODULES = {"unitary_lr": (), "unitary_lr.optim": (), "unitary_lr.options": (),
                      "unitary_lr.steps": (), "unitary_lr.diagnostics": (),
                      "unitary_lr.torch": ("torch",), "unitary_lr.optax": ("jax", "optax"),
                      "unitary_lr.peft": ("torch", "peft")}


@pytest.mark.parametrize("module_name", sorted(DOCUMENTED_MODULES))
def test_api_reference_lists_every_public_name(module_name):
    """Every name of a documented module's ``__all__`` has an entry in
    docs/api.md, under that module or under another that exports the same
    object (``unitary_lr.optim.DEFAULT_LR`` is ``options.DEFAULT_LR``)."""
    import importlib

    for library in DOCUMENTED_MODULES[module_name]:
        pytest.importorskip(library)
    module = importlib.import_module(module_name)
    entries = set(_api_entries())

    def listed(name):
        if (module_name, name) in entries:
            return True
        for where, attribute in entries:
            if attribute == name and where in DOCUMENTED_MODULES:
                try:
                    if getattr(importlib.import_module(where), name) is getattr(module, name):
                        return True
                except ImportError:  # another module's optional library
                    continue
        return False

    assert module.__all__, module_name
    missing = [name for name in module.__all__ if not listed(name)]
    assert not missing, f"{module_name}: {missing}"


def test_conv_example_states_the_recorded_gradient_range():
    """The examples page's first-block gradient of the projUNN conv run is the
    committed record's (docs/results/conv.json, the table's source)."""
    import json

    import numpy as np

    record = json.loads((DOCS / "results" / "conv.json").read_text())
    gradient = np.array(next(r for r in record["results"] if r["run"] == "orthogonal")["first_layer_gradient"])
    row = re.search(r"^\| kept orthogonal by projUNN .*\| stays between ([\d.]+) and ([\d.]+) \(median ([\d.]+)\) \|$",
                    (DOCS / "examples.md").read_text(), flags=re.M)
    assert row, "the projUNN row of the conv table"
    low, high, median = map(float, row.groups())
    assert abs(low - gradient.min()) < 0.005 and abs(high - gradient.max()) < 0.005, (gradient.min(), gradient.max())
    assert abs(median - np.median(gradient)) < 0.005, np.median(gradient)
