"""What every subcommand writes: a progress bar, a table, JSON and a plot."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path


class CommandError(Exception):
    """A problem with the command line the user can fix (one line, exit 2)."""


def require_modules(modules):
    """The plot and the progress bar need the ``cli`` extra; say so if it is missing."""
    missing = []
    for module in dict.fromkeys(modules):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CommandError(
            f"{' and '.join(missing)} not installed: pip install 'unitary-lr[cli]' "
            "(or pass --no-plot / --no-progress)"
        )


def progress(total, *, description, enabled):
    """A tqdm progress bar on stderr, or a silent stand-in."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True)


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass

    def close(self):
        pass


def format_table(headers, rows) -> str:
    """Right-aligned plain-text table."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def environment() -> dict:
    """Versions and machine, recorded next to every result."""
    import array_api_compat
    import numpy

    from .. import __version__

    return {
        "unitary_lr": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "array_api_compat": array_api_compat.__version__,
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot_curves(path: Path, curves: dict, *, title: str, xlabel: str, ylabel: str, logy: bool = True) -> None:
    """One line per entry of ``curves`` (label -> (x, y)), saved as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    for label, (x, y) in curves.items():
        axes.plot(x, y, label=label)
    if logy:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def torch_session(args):
    """(torch, device) for the PyTorch experiments: a clear error if PyTorch is
    missing, the device from ``--device`` (one-line error if it is not there),
    and ``--threads`` applied."""
    try:
        import torch
    except ImportError:
        raise CommandError("PyTorch is not installed: pip install 'unitary-lr[torch]'") from None
    from .._backends import load_backend

    device = load_backend("torch", device=args.device).device
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return torch, device


def finish(written, interrupted) -> int:
    """Say what was written; exit status 130 after Ctrl-C (the outputs hold
    what was done), else 0."""
    print("wrote " + ", ".join(map(str, written)))
    if interrupted:
        print("interrupted: the outputs hold the steps done so far", file=sys.stderr)
        return 130
    return 0
