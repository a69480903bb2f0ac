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

import numpy as np

from .. import random_unitary, unitarity_error
from ..optim import ProjUNN
from .._backends import BACKEND_NAMES, load_backend
from .._random import standard_normal
from .._xp import FLOAT_DTYPE_NAMES, mH
from ._output import (
    CommandError,
    InterruptGuard,
    add_threads_option,
    environment,
    finish,
    format_table,
    output_path,
    plot_curves,
    progress,
    require_modules,
    resolve_threads,
    thread_limits,
    write_json,
)


def add_parser(commands):
    parser = commands.add_parser(
        "toy",
        help="learn a random unitary from pairs (x, Ux) with rank-k projUNN steps",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("--n", type=int, default=128, help="matrix size (default: 128)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16], metavar="K",
                        help="ranks k of the updates to compare (default: 1 4 16)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step (default: 32)")
    parser.add_argument("--steps", type=int, default=300, help="steps per rank (default: 300)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: batch / 2 for sgd, the fastest stable rate for this "
                             "loss; 0.01 for rmsprop, 0.02 for adam)")
    parser.add_argument("--variant", choices=("tangent", "direct"), default="tangent",
                        help="projUNN-T (tangent) or projUNN-D (direct) (default: tangent)")
    parser.add_argument("--base", choices=("sgd", "rmsprop", "adam"), default="sgd",
                        help="base rule of the optimizer; sgd passes the gradient's factors straight to "
                             "the step, the others keep dense moments (default: sgd)")
    parser.add_argument("--dtype", choices=FLOAT_DTYPE_NAMES, default="complex128",
                        help="real dtypes learn an orthogonal matrix (default: complex128)")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="numpy", help="array library (default: numpy)")
    parser.add_argument("--device", default=None, help="device of the backend, e.g. cuda:0 (default: its default)")
    parser.add_argument("--dense-gradient", action="store_true",
                        help="form the n x n gradient and sketch it, instead of passing its factors")
    parser.add_argument("--seed", type=int, default=0, help="seed of U, the initial W, the data and the sketches")
    add_threads_option(parser)
    parser.add_argument("--out", default="unitary-lr-toy",
                        help="path prefix of the .json and .png outputs (default: unitary-lr-toy)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    default = {"sgd": args.batch / 2, "rmsprop": 0.01, "adam": 0.02}[args.base]
    lr = default if args.lr is None else args.lr
    if not (math.isfinite(lr) and lr > 0):
        raise CommandError(f"--lr must be finite and > 0, got {args.lr}")
    resolve_threads(args)
    # the outputs are checked before the run, which they would otherwise lose
    json_path = output_path("--out", args.out, suffix=".json")
    png_path = None if args.no_plot else output_path("--out", args.out, suffix=".png")
    return lr, json_path, png_path


def run(args) -> int:
    lr, json_path, png_path = _validate(args)
    require_modules(("matplotlib",) * (not args.no_plot) + ("tqdm",) * (not args.no_progress))
    with thread_limits(args.threads, torch=args.backend == "torch", required=args.threads_given):
        return _run(args, lr, json_path, png_path)


def _run(args, lr, json_path, png_path) -> int:
    results, interrupted, bar, device, W = [], False, None, args.device, None
    with InterruptGuard() as guard:
        try:
            backend = load_backend(args.backend, device=args.device, float64=args.dtype in ("float64", "complex128"))
            xp, device = backend.xp, backend.device
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

            bar = progress(len(args.ranks) * args.steps, description="toy", enabled=not args.no_progress)
            for k in args.ranks:
                data = np.random.default_rng([args.seed, 2])  # the same pairs for every rank
                optimizer = ProjUNN(lr, base=args.base, rank=k, variant=args.variant, seed=args.seed + k)
                W, losses, seconds = W0, [expected_loss(W0)], 0.0
                result = {"rank": k, "loss": losses, "steps_done": 0}
                results.append(result)
                for _ in range(args.steps):
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
                    W, result["steps_done"] = W_next, result["steps_done"] + 1
                    losses.append(loss)
                    result["ms_per_step"] = 1e3 * seconds / result["steps_done"]
                    bar.update(1)
                    bar.set_postfix_str(f"k={k} loss={losses[-1]:.2e}", refresh=False)
                result.update(final_loss=losses[-1], unitarity_error=float(unitarity_error(W)))
            guard.defer()  # the work is done: from here on a signal must not cut the outputs
        except KeyboardInterrupt:
            interrupted = True
            guard.defer()
        if bar is not None:
            bar.close()
        if interrupted and results and "final_loss" not in results[-1]:
            _close_interrupted(results[-1], W, unitarity_error)
        return guard.status(_report(args, lr, device, results, interrupted, json_path, png_path))


def _close_interrupted(result, W, unitarity_error):
    """The interrupted rank's record, made whole from the steps it finished."""
    del result["loss"][result["steps_done"] + 1:]  # a loss appended without its step count
    result.setdefault("ms_per_step", None)  # no step finished: no time to report
    result["final_loss"] = result["loss"][-1]
    result["unitarity_error"] = float(unitarity_error(W))


def _report(args, lr, device, results, interrupted, json_path, png_path):
    print(format_table(
        ("rank k", "steps", "final loss", "unitarity error", "ms/step"),
        [(r["rank"], r["steps_done"], f"{r['final_loss']:.3e}", f"{r['unitarity_error']:.1e}",
          "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.3f}") for r in results],
    ))
    record = {
        "command": "unitary-lr " + " ".join(args.argv),
        "experiment": "toy",
        "settings": {"n": args.n, "batch": args.batch, "steps": args.steps, "lr": lr, "variant": args.variant,
                     "base": args.base,
                     "dtype": args.dtype, "backend": args.backend, "device": str(device),
                     "dense_gradient": args.dense_gradient, "seed": args.seed, "threads": args.threads},
        "interrupted": interrupted,
        "results": results,
        "environment": environment(),
    }
    write_json(json_path, record)
    written = [str(json_path)]
    if png_path is not None and results:
        plot_curves(
            png_path,
            {f"k = {r['rank']}": (np.arange(len(r["loss"])), np.maximum(r["loss"], 1e-300)) for r in results},
            title=f"Learning a Haar-random {args.n} x {args.n} unitary\n"
            f"projUNN-{args.variant[0].upper()}, batch {args.batch}, {args.dtype}, {args.backend}",
            xlabel="step",
            ylabel="expected loss ||W - U||_F^2 / n",
        )
        written.append(str(png_path))
    return finish(written, interrupted)
