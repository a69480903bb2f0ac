"""The ``unitary-lr`` command: experiments and tools on top of the library.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``; errors a user can fix are reported as one line, with no
traceback, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .._backends import BackendError
from . import adapt, bench, conv, sequence, toy
from ._output import CommandError

SUBCOMMANDS = (toy, sequence, conv, adapt, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitary-lr",
        description="Low-rank unitary training (projUNN): experiments and tools.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # recorded with the results
    # SIGTERM (a job scheduler, kill) stops a run like Ctrl-C: the partial
    # results are written and the exit status is 130.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.run(args)
    except (CommandError, BackendError) as error:
        print(f"unitary-lr {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside a run's own handling (before its loop, or between
        # the loop and the outputs): nothing half-written is left, as every
        # output is replaced atomically; say so in one line, not a traceback
        print(f"unitary-lr {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``unitary-lr toy | head``): not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit flush quiet
        return 141
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
