"""One run of a subcommand, from its first piece of work to its outputs.

Every subcommand runs through ``execute``, which owns what they must all do
alike: the modules the progress bar and the plot need, the thread limits,
the progress bar, Ctrl-C and SIGTERM (the first stops the work; the outputs
are then written whatever comes), and the last lines (what was written, the
exit status). A subcommand gives it two functions: ``work(session)``, which
computes and keeps its records as it goes, and ``report(session)``, which
makes the records whole (an interrupt can land between any two lines of the
work), prints the table, writes the outputs and returns their paths.
"""

from __future__ import annotations

import sys

from ._output import InterruptGuard, Silent, progress, require_modules, thread_limits


class Session:
    """What ``work`` and ``report`` share with the run: the progress bar and
    whether the work was interrupted."""

    def __init__(self, description, *, show_progress):
        self.description = description
        self.show_progress = show_progress
        self.interrupted = False
        self.bar = Silent()

    def progress(self, total, *, unit="step"):
        """Start the progress bar over ``total`` units of work; returns it."""
        self.bar = progress(total, description=self.description, enabled=self.show_progress, unit=unit)
        return self.bar


def execute(args, work, report, *, description, plot, torch=False,
            unfinished="the outputs hold the steps done so far") -> int:
    """Run ``work(session)`` and then ``report(session) -> written paths``;
    the exit status.

    ``plot``: whether the run writes a plot (it then needs matplotlib);
    ``torch``: whether it computes with PyTorch (``--threads`` then limits
    torch's pool too); ``unfinished``: the last line after an interrupt,
    saying what the outputs hold. Ctrl-C or SIGTERM during ``work`` stops it
    (``session.interrupted``), and ``report`` runs as after a complete run;
    from the end of ``work`` on, signals are noted and the exit status is 130
    once the outputs are written.

    Examples
    --------
    A run whose work is interrupted still reports, and exits with 130:

    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(no_progress=True, threads=None, threads_given=False)
    >>> def work(session):
    ...     session.progress(3).update(1)
    ...     raise KeyboardInterrupt  # what Ctrl-C does in the middle of the work
    >>> def report(session):
    ...     print("interrupted" if session.interrupted else "done")
    ...     return []
    >>> execute(args, work, report, description="demo", plot=False)
    interrupted
    130
    """
    require_modules(("matplotlib",) * plot + ("tqdm",) * (not args.no_progress))
    session = Session(description, show_progress=not args.no_progress)
    restore_grad_mode = _grad_mode_restorer() if torch else None
    with thread_limits(args.threads, torch=torch, required=args.threads_given), \
            InterruptGuard() as guard:
        try:
            work(session)
            guard.defer()  # the work is done: from here on a signal must not cut the outputs
        except KeyboardInterrupt:
            session.interrupted = True
            guard.defer()
        if restore_grad_mode is not None:
            restore_grad_mode()
        session.bar.close()
        return guard.status(_finish(report(session), session.interrupted, unfinished))


def _grad_mode_restorer():
    """A function that puts torch's grad mode back as it is now (None without torch).

    ``with torch.no_grad():`` switches gradients off inside ``__enter__``, in
    Python; a Ctrl-C that lands after the switch and before ``__enter__``
    returns skips ``__exit__`` and leaves gradients off for the rest of the
    process. The work may be cut anywhere, so the mode is put back here, once
    the guard has deferred signals, for every subcommand that uses torch."""
    try:
        import torch
    except ImportError:  # the subcommand says so, in one line
        return None
    enabled = torch.is_grad_enabled()
    return lambda: torch.set_grad_enabled(enabled)


def _finish(written, interrupted, unfinished) -> int:
    """Say what was written; exit status 130 after an interrupt, else 0."""
    if written:
        print("wrote " + ", ".join(map(str, written)))
    if interrupted:
        print(f"interrupted: {unfinished}", file=sys.stderr)
        return 130
    return 0
