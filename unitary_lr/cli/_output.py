"""What every subcommand writes: a progress bar, a table, JSON and a plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
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
        # the package's own extras are not on any index: name what pip can install
        raise CommandError(
            f"{' and '.join(missing)} not installed: pip install {' '.join(missing)} "
            "(or pass --no-plot / --no-progress)"
        )


def progress(total, *, description, enabled, unit="step"):
    """A tqdm progress bar on stderr, or a silent stand-in."""
    if not enabled:
        return Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True)


class Silent:
    """The progress bar of a run with --no-progress, and of one whose work
    stopped before its bar was made: it does nothing."""

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


def output_path(flag, path, *, suffix=""):
    """The file ``path + suffix`` that ``flag`` asks for, checked before any work:
    a run must not end in a traceback that loses its results because its output
    cannot be written. Creates the missing parent folders (the run would create
    them anyway) and raises a one-line CommandError naming the option and the
    path when the file cannot be written there."""
    text = os.fspath(path)
    if not text.strip():
        raise CommandError(f"{flag} must name a file, got {text!r}")
    # a name ending in a separator, ".", ".." or the root names a folder, not a file
    if text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise CommandError(f"{flag} must be a file path, got the directory {text!r}")
    target = Path(text + suffix)
    if target.is_dir():
        if suffix:  # the prefix names no folder, but the file it makes is one
            raise CommandError(f"{flag}: cannot write {str(target)!r}: a folder of that name exists")
        raise CommandError(f"{flag} must be a file path, got the directory {text!r}")
    parent = target.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise CommandError(f"{flag}: cannot write {str(target)!r}: {str(ancestor)!r} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # a real write, not os.access: root, read-only file systems and
        # special folders (/proc) answer access() wrongly
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.", suffix=".probe", delete=False)
        probe.close()
        os.unlink(probe.name)
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(f"{flag}: cannot write {str(target)!r}: {reason}") from None
    return target


def check_run_options(args):
    """The run flags of an experiment, checked before any work: ``--threads``
    (see resolve_threads) and the ``--out`` files (see prefix_outputs)."""
    resolve_threads(args)
    prefix_outputs(args)


def prefix_outputs(args):
    """``--out PREFIX``: PREFIX.json, and PREFIX.png unless ``--no-plot``, as
    ``args.json_path`` and ``args.png_path`` (None: no plot), checked before
    the run, whose results an unwritable path would lose."""
    args.json_path = output_path("--out", args.out, suffix=".json")
    args.png_path = None if args.no_plot else output_path("--out", args.out, suffix=".png")


def write_outputs(args, record, *, plot=None) -> list:
    """An experiment's outputs: ``record`` as ``args.json_path`` and, when
    there is a plot (``plot(path)`` draws it; None: nothing to draw) and
    ``--no-plot`` is not given, the plot as ``args.png_path``; the paths
    written, in that order."""
    write_json(args.json_path, record)
    written = [args.json_path]
    if plot is not None and args.png_path is not None:
        plot(args.png_path)
        written.append(args.png_path)
    return written


def loaded_versions(modules) -> dict:
    """``{module: version}`` of each of ``modules`` that this run imported (its
    ``__version__``, None without one), for ``run_record``'s ``versions``;
    one it did not import is left out."""
    return {module: getattr(sys.modules[module], "__version__", None)
            for module in dict.fromkeys(modules) if module in sys.modules}


def run_record(args, experiment, fields, *, versions=None) -> dict:
    """The JSON record of a run: the command line, the experiment, ``fields``
    and the environment (with ``versions`` of the libraries it used)."""
    return {
        "command": "unitary-lr " + " ".join(args.argv),
        "experiment": experiment,
        **fields,
        "environment": {**environment(), **(versions or {})},
    }


def _strict_json(value):
    """``value`` with every NaN and infinity replaced by None: JSON has no such
    numbers, and strict parsers (jq, JavaScript, Go) reject Python's NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def _replace_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it
    over ``path``: a reader, a kill or a Ctrl-C at any moment sees either the
    old file or the new one, never half of one. (Same folder: a rename across
    file systems is not atomic.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the results from other users
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as strict JSON (NaN and infinities become null), atomically."""
    text = json.dumps(_strict_json(data), indent=2, allow_nan=False) + "\n"
    _replace_atomically(Path(path), lambda file: file.write(text.encode()))


def save_figure(figure, path: Path, **options) -> None:
    """``figure.savefig`` to ``path`` as PNG, atomically (see write_json)."""
    _replace_atomically(Path(path), lambda file: figure.savefig(file, format="png", **options))


class InterruptGuard:
    """Ctrl-C and SIGTERM during a run: the first one stops the run (it raises
    KeyboardInterrupt, which the run catches); from then on, and from
    ``defer()`` on (called where the run's work ends), they are noted in
    ``received`` instead, so that no second signal cuts the writing of the
    results. Use as a context manager around the whole run; the previous
    handlers come back at its end. (Signal handlers can only be set from the
    main thread; elsewhere it only records ``defer()``.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = []
        self._deferred = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._deferred:
            self.received.append(signum)
            return
        self._deferred = True  # before raising: a second signal must not cut the handling of the first
        raise KeyboardInterrupt

    def defer(self):
        self._deferred = True

    def status(self, status):
        """The exit status once the outputs are written: 130 if a signal came
        while they were (the run itself may have finished)."""
        if self.received and status == 0:
            print("interrupted: the outputs were completed first", file=sys.stderr)
            return 130
        return status

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            # None: a handler not set from Python; the default is the closest
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        return False


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
    save_figure(figure, path, dpi=120)


def torch_session(args):
    """(torch, device) for the PyTorch experiments: a clear error if PyTorch is
    missing, and the device from ``--device`` (one-line error if it is not
    there). ``--threads`` is applied earlier, by thread_limits."""
    try:
        import torch  # noqa: F401 - a clear error now rather than deep in the run
    except ImportError:
        raise CommandError("PyTorch is not installed: pip install torch") from None
    from .._backends import load_backend

    device = load_backend("torch", device=args.device).device
    return torch, device


def resolve_threads(args):
    """Check ``--threads`` and fill its default, 1; ``args.threads_given`` says
    whether the user asked (then a limit that cannot be applied is an error)."""
    args.threads_given = args.threads is not None
    if args.threads_given and args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    if not args.threads_given:
        args.threads = 1


def thread_limits(threads, *, torch=False, required=True):
    """Apply ``--threads`` before any work, until ``.close()`` (None: no limit): torch's intra-op
    pool (when ``torch`` is true: the run uses torch) and, through
    threadpoolctl (the cli extra installs it), the BLAS/OpenMP pools of NumPy
    and SciPy. Restored on close, so that a run inside a Python session leaves
    the session as it was. Without threadpoolctl only torch's pool can be
    limited: if nothing would apply a ``required`` limit, a CommandError says so;
    the default, 1 thread, is then left unapplied rather than stopping the run."""
    stack = contextlib.ExitStack()
    if threads is None:  # the libraries' own pools (the bench's default)
        return stack
    uses_torch = torch
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if required and not uses_torch:
            raise CommandError("--threads needs threadpoolctl for NumPy's BLAS: pip install threadpoolctl") from None
    else:
        stack.enter_context(threadpool_limits(limits=threads))
    if uses_torch:
        try:
            import torch as torch_module
        except ImportError:  # torch_session says so, in one line
            return stack
        stack.callback(torch_module.set_num_threads, torch_module.get_num_threads())
        torch_module.set_num_threads(threads)
    return stack
