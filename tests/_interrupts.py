"""Ctrl-C at any moment of a ``unitary-lr`` run, for the CLI tests.

A trace function counts the lines that the run executes in the command's own
code (the work that ``unitary_lr.cli._session.execute`` runs for every
subcommand, and every helper of ``unitary_lr.cli`` it calls), from the first
line of execute's ``try`` to ``guard.defer()``, where the work ends and the
outputs begin; a run is then repeated with a KeyboardInterrupt raised at the
k-th of those lines, for k spread over the whole run. That is where a real
Ctrl-C can land: after ``defer()`` the InterruptGuard only notes signals.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from unitary_lr.cli import _output

CLI = str(Path(_output.__file__).parent)


class _Injector:
    def __init__(self, run_function, at):
        self.code = run_function.__code__
        lines, first = inspect.getsourcelines(run_function)
        self.try_line = first + next(i for i, line in enumerate(lines) if line.strip() == "try:")
        self.defer_code = _output.InterruptGuard.defer.__code__
        self.at, self.count, self.state = at, 0, "before"

    def trace(self, frame, event, arg):
        if self.state == "after" or not frame.f_code.co_filename.startswith(CLI):
            return None
        if frame.f_code is self.defer_code:
            self.state = "after"  # the work is over; the outputs are the guard's to protect
            return None
        return self.line

    def line(self, frame, event, arg):
        if event != "line" or self.state == "after":
            return self.line if self.state != "after" else None
        if self.state == "before":
            if frame.f_code is self.code and frame.f_lineno > self.try_line:
                self.state = "armed"
            else:
                return self.line
        self.count += 1
        if self.count == self.at:
            self.state = "after"
            raise KeyboardInterrupt
        return self.line


def run_with_interrupt(main, argv, run_function, at):
    """main(argv) with Ctrl-C at the ``at``-th counted line (0: none); returns
    (exit status, number of lines counted)."""
    injector = _Injector(run_function, at)
    previous = sys.gettrace()
    sys.settrace(injector.trace)
    try:
        status = main(argv)
    finally:
        sys.settrace(previous)
    return status, injector.count


def moments(main, argv, run_function, samples):
    """``samples`` moments spread over a whole run of main(argv), first and
    last counted lines included."""
    status, total = run_with_interrupt(main, argv, run_function, 0)
    assert status == 0 and total > samples, (status, total)
    return sorted({1 + round(i * (total - 1) / (samples - 1)) for i in range(samples)})


class _ReturnInjector:
    """Ctrl-C as ``code`` (a function of any module) returns for the ``at``-th
    time during the work: the moment just after a context manager's
    ``__enter__`` has changed global state and before the ``with`` statement
    has armed its ``__exit__``, which no line of the command itself reaches."""

    def __init__(self, code, at):
        self.code, self.at, self.count, self.after = code, at, 0, False
        self.defer_code = _output.InterruptGuard.defer.__code__

    def trace(self, frame, event, arg):
        if self.after:
            return None
        if frame.f_code is self.defer_code:
            self.after = True  # the work is over; the outputs are the guard's to protect
            return None
        return self.on_return if frame.f_code is self.code else None

    def on_return(self, frame, event, arg):
        if event == "return" and not self.after:
            self.count += 1
            if self.count == self.at:
                self.after = True
                raise KeyboardInterrupt  # raised by a trace function on "return", it leaves the call
        return self.on_return


def run_with_interrupt_on_return(main, argv, code, at):
    """main(argv) with Ctrl-C as ``code`` returns for the ``at``-th time (0:
    none); returns (exit status, how many times it returned during the work)."""
    injector = _ReturnInjector(code, at)
    previous = sys.gettrace()
    sys.settrace(injector.trace)
    try:
        status = main(argv)
    finally:
        sys.settrace(previous)
    return status, injector.count
