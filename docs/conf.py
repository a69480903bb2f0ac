"""Sphinx configuration: builds offline (no intersphinx, no remote assets at
build time), is read offline (MathJax is served with the pages), and is
warning-free with every reference checked (CI runs sphinx-build -W; nitpicky)."""

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _ext: the CLI reference generator

import unitary_lr

project = "unitary_lr"
author = "unitary_lr developers"
copyright = "2026, unitary_lr developers"
release = unitary_lr.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "_ext.cli_reference",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "results", "README.md"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autosummary_generate = True
# undoc-members: the base rules' dataclass fields and methods without their own
# docstring are still listed (the summary tables link to them)
autodoc_default_options = {"members": True, "undoc-members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = "unitary_lr"
templates_path = ["_templates"]


def _mathjax_files():
    """The MathJax 3 files that the sphinx-mathjax-offline package ships (the
    docs extra installs it): served from the site's own _static/mathjax, so a
    page renders its formulas without reaching a CDN."""
    try:
        static = importlib.metadata.distribution("sphinx-mathjax-offline").locate_file("sphinx-mathjax-offline/static")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the docs need the docs extra: pip install '.[docs]' (sphinx-mathjax-offline)") from None
    if not (Path(static) / "mathjax" / "tex-mml-chtml.js").is_file():
        raise RuntimeError(f"sphinx-mathjax-offline has no mathjax/tex-mml-chtml.js under {static}")
    return str(static)


# the contents of each static path land in _static: .../static/mathjax -> _static/mathjax
html_static_path = ["_static", _mathjax_files()]
mathjax_path = "mathjax/tex-mml-chtml.js"  # the bundle Sphinx loads from a CDN by default

# Every cross-reference must resolve. intersphinx cannot download inventories
# here, so the few third-party names the docstrings mention are listed instead.
nitpicky = True
nitpick_ignore = [
    ("py:class", "torch.Tensor"),  # PyTorch's; no inventory offline
    ("py:class", "Optimizer"),  # torch.optim.Optimizer, in the docstring ProjUNN.add_param_group overrides
    # a helper of unitary_lr.diagnostics that unitarity_estimate's docstring names;
    # its value for each dtype is stated there
    ("py:func", "default_drift_tolerance"),
    # PEFT's, in the signature of unitary_lr.peft.HTAConfig (a dataclass that
    # inherits PEFT's fields); PEFT has no inventory offline either
    ("py:class", "peft.config.PeftConfig"),
    ("py:class", "PeftType"),
    ("py:class", "TaskType"),
]
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
