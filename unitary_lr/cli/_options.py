"""The flags that several subcommands share, each defined once, as argparse
parent parsers (``parents=[...]`` of ``add_parser``).

Every function returns a new parent parser: argparse shares the parents'
actions with each child, so a parent built once and given to two
subcommands with other defaults would carry one subcommand's default into
the other. The choices of the step variants and of the base rules are read
from the library's registries (``unitary_lr.steps.VARIANTS``,
``unitary_lr.optim.RULES``): a variant or rule registered there is a choice
of every subcommand, with no change here.
"""

from __future__ import annotations

import argparse

from .._backends import BACKEND_NAMES
from .._xp import FLOAT_DTYPE_NAMES
from ..optim import RULES
from ..steps import VARIANTS

# The flags of how a run runs and what it writes, listed in --help after the
# flags of what it computes (argparse merges the parents' groups by title).
RUN_GROUP = "how it runs and what it writes"


def _parent():
    return argparse.ArgumentParser(add_help=False)


def run_group():
    """A new parent parser and its group of run flags (see RUN_GROUP)."""
    parent = _parent()
    return parent, parent.add_argument_group(RUN_GROUP)


def paragraph(text, index):
    r"""Paragraph ``index`` of ``text`` (a module docstring) on one line: a
    subcommand's --help description.

    Examples
    --------
    >>> paragraph("Title.\n\nFirst line\nand second.", 1)
    'First line and second.'
    """
    return text.split("\n\n")[index].replace("\n", " ")


def variant_names() -> tuple:
    """The registered step variants, in their registry's order."""
    return tuple(VARIANTS)


def base_rule_names() -> tuple:
    """The registered base rules, in their registry's order."""
    return tuple(RULES)


def variant_label(variant: str) -> str:
    """The table's and the plot's name of a step: projUNN-T, projUNN-D, as in the
    paper; the whole name where two variants share an initial.

    Examples
    --------
    >>> variant_label("tangent"), variant_label("direct")
    ('projUNN-T', 'projUNN-D')
    """
    initial = variant[0].upper()
    if sum(name[0].upper() == initial for name in variant_names()) > 1:
        return f"projUNN-{variant}"
    return f"projUNN-{initial}"


def array_options(*, dtype, dtype_help=""):
    """--backend, --device, --dtype: the array library the run computes with."""
    parent = _parent()
    parent.add_argument("--dtype", choices=FLOAT_DTYPE_NAMES, default=dtype,
                        help=f"{dtype_help}(default: %(default)s)")
    parent.add_argument("--backend", choices=BACKEND_NAMES, default="numpy",
                        help="array library (default: %(default)s)")
    parent.add_argument("--device", default=None, help="device of the backend, e.g. cuda:0 (default: its default)")
    return parent


def torch_device_options():
    """--device of the PyTorch experiments."""
    parent, group = run_group()
    group.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default: %(default)s)")
    return parent


def seed_options(what="the run's random draws"):
    parent = _parent()
    parent.add_argument("--seed", type=int, default=0, help=f"seed of {what} (default: %(default)s)")
    return parent


def ranks_options(*, default, what):
    parent = _parent()
    parent.add_argument("--ranks", type=int, nargs="+", default=default, metavar="K",
                        help=f"ranks k of {what} (default: {' '.join(map(str, default))})")
    return parent


def variant_options(*, default, several=False):
    """--variant (one step variant) or, with ``several``, --variants (runs to compare)."""
    parent = _parent()
    if several:
        parent.add_argument("--variants", nargs="+", choices=variant_names(), default=[default],
                            help="projUNN variants to compare, among %(choices)s (projUNN-T is tangent, "
                                 f"projUNN-D direct) (default: {default})")
    else:
        parent.add_argument("--variant", choices=variant_names(), default=default,
                            help="projUNN step variant, one of %(choices)s (projUNN-T is tangent, projUNN-D "
                                 "direct) (default: %(default)s)")
    return parent


def base_rule_options(flag, *, default, help):
    """The base rule of the optimizer (``--base`` or ``--optimizer``), among the registered ones."""
    parent = _parent()
    parent.add_argument(flag, choices=base_rule_names(), default=default, help=help)
    return parent


def threads_options(*, experiment=True):
    """--threads. An experiment runs on one thread unless asked (``resolve_threads``
    fills the default); the bench leaves the libraries' own pools unless asked."""
    parent, group = run_group()
    if experiment:
        # One thread by default: on a machine whose cores are busy with other work,
        # threads wait for each other. Measured on a busy 2-core machine, 2 threads
        # (torch's and OpenBLAS's default there) took 1.3-11x as long as 1 (README, "Try it").
        text = "CPU threads of torch and of the BLAS libraries; more help only on idle cores (default: 1)"
    else:
        text = ("limit the BLAS/OpenMP threads (NumPy, SciPy, scikit-learn; torch's too) to N during the run; 1 "
                "gives steadier ratios on a shared machine. Needs threadpoolctl (default: the libraries' own)")
    group.add_argument("--threads", type=int, default=None, metavar="N", help=text)
    return parent


def progress_options():
    parent, group = run_group()
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parent


def output_options(command):
    """--out PREFIX and --no-plot: an experiment writes PREFIX.json and PREFIX.png."""
    parent, group = run_group()
    group.add_argument("--out", default=f"unitary-lr-{command}",
                       help="path prefix of the .json and .png outputs (default: %(default)s)")
    group.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return parent


def experiment_run_options(command):
    """The run flags of every experiment (all subcommands but bench):
    --threads, --out, --no-plot, --no-progress."""
    return argparse.ArgumentParser(add_help=False,
                                   parents=[threads_options(), output_options(command), progress_options()])


def quick_options(help):
    parent = _parent()
    parent.add_argument("--quick", action="store_true", help=help)
    return parent
