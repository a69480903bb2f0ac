"""``--compile`` for the PyTorch experiments (copy, adding, conv): the model's
forward and loss, and through them their backward, captured by
``torch.compile``; and the timing that shows what the capture costs and saves.

Why: a recurrent step over T time steps is hundreds of tiny kernels, so on a
GPU it is bound by launch overhead, not by arithmetic. A captured graph fuses
the elementwise work of each time step and, with CUDA graphs
(``mode="reduce-overhead"``), replays it as one launch. A UnitaryRNN's time
loop is compiled in chunks of at most ``--compile-steps`` time steps
(``UnitaryRNN.compile_recurrence``): a graph of the whole unrolled sequence
took a compile time that grew with T (0.3 to 0.45 s per time step on one
CPU thread) and failed at T = 1000. The optimizer step (ProjUNN) stays
eager: its r x r cores go to the host by design.
"""

from __future__ import annotations

import statistics

from ._options import run_group

COMPILE_MODES = ("auto", "default", "reduce-overhead")


# Time steps of a UnitaryRNN per compiled graph (--compile-steps): the
# compile time is that of this many steps whatever T.
COMPILE_STEPS = 32


def compile_options(recurrence=False):
    """--compile [MODE], as a parent parser (see ``_options``); with
    ``recurrence``, also --compile-steps N (the recurrent tasks)."""
    parser, group = run_group()
    group.add_argument(
        "--compile", nargs="?", const="auto", default=None, choices=COMPILE_MODES, metavar="MODE",
        help="capture the model's forward and loss, and their backward, with torch.compile; the optimizer "
             "step stays eager. The first steps pay the compile time (recorded apart from the later steps' "
             "median); it pays off on a GPU, where the recurrent loop is launch-bound. MODE: auto (the "
             "default: reduce-overhead, i.e. CUDA graphs, on CUDA, default elsewhere), default, reduce-overhead",
    )
    if recurrence:
        group.add_argument(
            "--compile-steps", type=int, default=None, metavar="N",
            help="with --compile: at most N time steps of the unitary RNN per compiled graph; the compile time "
                 f"grows with N, not with T (default: {COMPILE_STEPS})",
        )
    return parser


def compile_mode(requested, device):
    """The torch.compile mode that ``--compile MODE`` means on ``device``
    (None: no compilation)."""
    if requested is None:
        return None
    if requested == "auto":
        # CUDA graphs remove the per-kernel launch cost that makes the loop slow
        # on a GPU; on a CPU there is no launch cost and nothing to replay
        return "reduce-overhead" if device.type == "cuda" else "default"
    return requested


def loss_function(torch, compute, *, mode, recurrence=None, steps=COMPILE_STEPS):
    """``compute(x, y) -> loss``, compiled when ``mode`` is not None.

    Compiling the function that returns the loss captures the backward too
    (AOTAutograd traces it with the forward), so ``loss.backward()`` runs a
    compiled graph. ``dynamic=False``: every training step has the same
    shapes, and a static graph is what CUDA graphs replay. No
    ``fullgraph=True``: torch.nn.LSTM and RNN (the baselines) are not traced by
    dynamo and run eagerly inside the captured function.

    ``recurrence``: the model's UnitaryRNN, whose time loop is compiled
    instead, ``steps`` time steps per graph (its ``compile_recurrence``),
    and ``compute`` is returned as it is: the rest of it (an input and an
    output product, the loss) is a few kernels a training step.
    """
    if mode is None:
        return compute
    # every run builds a new model: without a reset its compiled code would be
    # a recompilation of the previous run's, and after torch's cache limit
    # (8) dynamo would silently fall back to eager
    torch.compiler.reset()
    if recurrence is not None:
        recurrence.compile_recurrence(steps, mode=mode)
        return compute
    return torch.compile(compute, mode=mode, dynamic=False)


def eager():
    """A context in which compiled functions run eagerly (torch >= 2.6;
    before, a context that changes nothing): the test-set evaluations,
    whose other batch size would compile graphs of its own. The stance is
    set inside the context's ``__enter__``, not when it is made (as
    ``torch.compiler.set_stance(...)`` does), so that a Ctrl-C between the
    two leaves it as it was (see ``unitary_lr.torch.layers._eager_stance``)."""
    from ..torch.layers import _eager_stance

    return _eager_stance()


def mark_step_begin(torch, mode):
    """Under CUDA graphs, tell torch that a new training step starts: the
    previous step's graph outputs (the loss, the gradients) may be overwritten
    from here on; they have all been read by then."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def synchronize(torch, device):
    """Wait for the device's queued work, so that a step's time is its own:
    CUDA runs asynchronously; the CPU has nothing to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_timing(seconds):
    """First step (with --compile: mostly the compile time) and the median of
    the later steps (the steady state), in seconds."""
    return {
        "first_step_seconds": seconds[0] if seconds else None,
        "median_step_seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
    }


def format_step_timing(record):
    """The table's two timing cells: first step in seconds, later steps' median in ms."""
    first, median = record.get("first_step_seconds"), record.get("median_step_seconds")
    return ("-" if first is None else f"{first:.2f}", "-" if median is None else f"{1000 * median:.1f}")
