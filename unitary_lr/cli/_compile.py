"""``--compile`` for the PyTorch experiments (copy, adding, conv): the model's
forward and loss, and through them their backward, captured by
``torch.compile``; and the timing that shows what the capture costs and saves.

Why: a recurrent step over T time steps is hundreds of tiny kernels, so on a
GPU it is bound by launch overhead, not by arithmetic. A captured graph fuses
the elementwise work of each time step and, with CUDA graphs
(``mode="reduce-overhead"``), replays the whole forward and backward as one
launch. The optimizer step (ProjUNN) stays eager: its r x r cores go to the
host by design.
"""

from __future__ import annotations

import statistics

from ._options import run_group

COMPILE_MODES = ("auto", "default", "reduce-overhead")


def compile_options():
    """--compile [MODE], as a parent parser (see ``_options``)."""
    parser, group = run_group()
    group.add_argument(
        "--compile", nargs="?", const="auto", default=None, choices=COMPILE_MODES, metavar="MODE",
        help="capture the model's forward and loss, and their backward, with torch.compile; the optimizer "
             "step stays eager. The first steps pay the compile time (recorded apart from the later steps' "
             "median); it pays off on a GPU, where the recurrent loop is launch-bound. MODE: auto (the "
             "default: reduce-overhead, i.e. CUDA graphs, on CUDA, default elsewhere), default, reduce-overhead",
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


def loss_function(torch, compute, *, mode):
    """``compute(x, y) -> loss``, compiled when ``mode`` is not None.

    Compiling the function that returns the loss captures the backward too
    (AOTAutograd traces it with the forward), so ``loss.backward()`` runs a
    compiled graph. ``dynamic=False``: every training step has the same
    shapes, and a static graph is what CUDA graphs replay. No
    ``fullgraph=True``: torch.nn.LSTM and RNN (the baselines) are not traced by
    dynamo and run eagerly inside the captured function; the UnitaryRNN itself
    compiles without a graph break (tests/test_torch_layers_compile.py).
    """
    if mode is None:
        return compute
    # every run builds a new model: without a reset its compiled code would be
    # a recompilation of the previous run's, and after torch's cache limit
    # (8) dynamo would silently fall back to eager
    torch.compiler.reset()
    return torch.compile(compute, mode=mode, dynamic=False)


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
