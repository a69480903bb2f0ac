"""``unitary-lr toy``: the projUNN paper's first experiment.

Learn a Haar-random unitary U from Gaussian pairs (x, U x) with the mean
squared error ``L(W) = ||W X - U X||_F^2 / (B n)`` over a batch X of B
columns. The gradient (PyTorch's convention) is ``G = a b^H`` with
``a = 2 (W X - U X) / (B n)`` and ``b = X``: rank <= B, analytic, and passed to
``projunn_step`` as factors, so no n x n gradient is formed and no autodiff is
needed; the whole run is plain Array API code on the chosen backend.

The curve recorded is the expected loss over fresh x, ``||W - U||_F^2 / n``,
which starts near 2 for a random W. Every rank sees the same data stream.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np

from .. import random_unitary, unitarity_error
from .._backends import load_backend
from .._random import standard_normal
from .._xp import mH
from ..optim import ProjUNN
from . import _options, _output
from ._output import CommandError
from ._session import execute

# The default learning rate of each base rule, for this loss: sgd's is the
# fastest stable rate (it grows with the batch); the others were measured. A
# rule registered later has none until measured: it needs --lr.
DEFAULT_LR = {"sgd": lambda batch: batch / 2, "rmsprop": lambda batch: 0.01, "adam": lambda batch: 0.02}


def add_parser(commands):
    parents = [
        _options.ranks_options(default=[1, 4, 16], what="the updates to compare"),
        _options.variant_options(default="tangent"),
        _options.base_rule_options(
            "--base", default="sgd",
            help="base rule of the optimizer, one of %(choices)s; sgd passes the gradient's factors straight "
                 "to the step, the others keep dense moments (default: %(default)s)"),
        _options.array_options(dtype="complex128", dtype_help="real dtypes learn an orthogonal matrix "),
        _options.seed_options("U, the initial W, the data and the sketches"),
        _options.experiment_run_options("toy"),
    ]
    parser = commands.add_parser("toy", help="learn a random unitary from pairs (x, Ux) with rank-k projUNN steps",
                                 description=_options.paragraph(__doc__, 1), parents=parents)
    parser.add_argument("--n", type=int, default=128, help="matrix size (default: 128)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step (default: 32)")
    parser.add_argument("--steps", type=int, default=300, help="steps per rank (default: 300)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: batch / 2 for sgd, the fastest stable rate for this "
                             "loss; 0.01 for rmsprop, 0.02 for adam)")
    parser.add_argument("--dense-gradient", action="store_true",
                        help="form the n x n gradient and sketch it, instead of passing its factors")
    parser.set_defaults(run=run)


def _validate(args):
    if args.n < 2:
        raise CommandError(f"--n must be >= 2, got {args.n}")
    if args.batch < 1:
        raise CommandError(f"--batch must be >= 1, got {args.batch}")
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    bad = [k for k in args.ranks if not 1 <= k <= args.n]
    if bad:
        raise CommandError(f"--ranks must lie in [1, n = {args.n}], got {bad[0]}")
    if args.seed < 0:
        raise CommandError(f"--seed must be >= 0, got {args.seed}")
    if args.lr is None and args.base not in DEFAULT_LR:
        raise CommandError(f"--base {args.base} has no measured default learning rate here: give --lr")
    lr = DEFAULT_LR[args.base](args.batch) if args.lr is None else args.lr
    if not (math.isfinite(lr) and lr > 0):
        raise CommandError(f"--lr must be finite and > 0, got {args.lr}")
    _output.check_run_options(args)
    return lr


def run(args) -> int:
    lr = _validate(args)
    # what the work leaves for the report, however far it got
    state = SimpleNamespace(results=[], device=args.device, W=None)
    return execute(args, lambda session: _train(args, lr, state, session),
                   lambda session: _report(args, lr, state, session.interrupted),
                   description="toy", plot=args.png_path is not None, torch=args.backend == "torch")


def _train(args, lr, state, session):
    backend = load_backend(args.backend, device=args.device, float64=args.dtype in ("float64", "complex128"))
    xp, device = backend.xp, backend.device
    state.device = device
    try:
        U = random_unitary(args.n, dtype=args.dtype, rng=np.random.default_rng([args.seed, 0]), xp=xp,
                           device=device)
    except TypeError as error:  # e.g. complex128 on a device without float64
        raise CommandError(str(error)) from None
    W0 = random_unitary(args.n, dtype=args.dtype, rng=np.random.default_rng([args.seed, 1]), xp=xp,
                        device=device)
    scale = 2.0 / (args.batch * args.n)

    def expected_loss(W):
        D = W - U
        return float(xp.sum(xp.real(D * xp.conj(D)))) / args.n

    bar = session.progress(len(args.ranks) * args.steps)
    for k in args.ranks:
        data = np.random.default_rng([args.seed, 2])  # the same pairs for every rank
        optimizer = ProjUNN(lr, base=args.base, rank=k, variant=args.variant, seed=args.seed + k)
        state.W, losses, seconds = W0, [expected_loss(W0)], 0.0
        result = {"rank": k, "loss": losses, "steps_done": 0}
        state.results.append(result)
        for _ in range(args.steps):
            W = state.W
            X = standard_normal(xp, (args.n, args.batch), dtype=W.dtype, device=device, rng=data)
            a = (W @ X - U @ X) * scale
            G = a @ mH(xp, X) if args.dense_gradient else (a, X)
            backend.synchronize()
            start = time.perf_counter()
            W_next = optimizer.step(W, G)
            backend.synchronize()
            seconds += time.perf_counter() - start
            loss = expected_loss(W_next)
            # W, its loss and the step count move together: an interrupt
            # between two of these lines leaves the previous, whole step
            state.W, result["steps_done"] = W_next, result["steps_done"] + 1
            losses.append(loss)
            result["ms_per_step"] = 1e3 * seconds / result["steps_done"]
            bar.update(1)
            bar.set_postfix_str(f"k={k} loss={losses[-1]:.2e}", refresh=False)
        result.update(final_loss=losses[-1], unitarity_error=float(unitarity_error(state.W)))


def _close_interrupted(result, W, unitarity_error):
    """The interrupted rank's record, made whole from the steps it finished."""
    del result["loss"][result["steps_done"] + 1:]  # a loss appended without its step count
    result.setdefault("ms_per_step", None)  # no step finished: no time to report
    result["final_loss"] = result["loss"][-1]
    result["unitarity_error"] = float(unitarity_error(W))


def _report(args, lr, state, interrupted):
    results = state.results
    if interrupted and results and "final_loss" not in results[-1]:
        _close_interrupted(results[-1], state.W, unitarity_error)
    print(_output.format_table(
        ("rank k", "steps", "final loss", "unitarity error", "ms/step"),
        [(r["rank"], r["steps_done"], f"{r['final_loss']:.3e}", f"{r['unitarity_error']:.1e}",
          "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.3f}") for r in results],
    ))
    record = _output.run_record(args, "toy", {
        "settings": {"n": args.n, "batch": args.batch, "steps": args.steps, "lr": lr, "variant": args.variant,
                     "base": args.base,
                     "dtype": args.dtype, "backend": args.backend, "device": str(state.device),
                     "dense_gradient": args.dense_gradient, "seed": args.seed, "threads": args.threads},
        "interrupted": interrupted,
        "results": results,
    }, versions=_output.loaded_versions([args.backend]))

    def plot(path):
        _output.plot_curves(
            path,
            {f"k = {r['rank']}": (np.arange(len(r["loss"])), np.maximum(r["loss"], 1e-300)) for r in results},
            title=f"Learning a Haar-random {args.n} x {args.n} unitary\n"
            f"{_options.variant_label(args.variant)}, batch {args.batch}, {args.dtype}, {args.backend}",
            xlabel="step",
            ylabel="expected loss ||W - U||_F^2 / n",
        )

    return _output.write_outputs(args, record, plot=plot if results else None)
