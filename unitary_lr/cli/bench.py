"""``unitary-lr bench``: projUNN steps side by side with the floor and the dense steps.

Times, in one run on this machine and backend, a step of every projUNN
variant (projUNN-T, projUNN-D and projUNN-C) on a dense n x n gradient
against: the floor, one pass over G (``G @ x``) plus one rank-2 update
``W + u v^H``, which is what any O(n^2) step must at least cost; the dense
O(n^3) steps people use today, the SVD polar step ``polar(W - lr G)`` and
the Riemannian step ``W expm(-lr/2 (W^H G - G^H W))``; the dense Cayley
step of full-capacity unitary RNNs, an n x n solve
``(I + lr/2 A)^-1 (I - lr/2 A) W`` with ``A = G W^H - W G^H``; and, for the
randomized SVD, scikit-learn's and PyTorch's at the same oversampling and power
iterations, with their error next to the time.

With ``--columns M ...`` the bench also times, at every n of ``--sizes`` and
every m < n, the floor, every projUNN variant and the dense Cayley step on an
n x m matrix with orthonormal columns (``random_unitary(n, m)``) and an n x m
gradient, with each step's time over the same variant's square step at the
same n; with ``--peers``, geoopt's ``EuclideanStiefel`` QR-retraction step is
the peer at those shapes (the only peer that does not work on an n x n
embedding: O(n m^2), so not limited by ``--dense-max``).

Every time is the median of ``--repeat`` runs, waiting for the device before
the clock stops. At each n every method first runs once untimed (first-call
costs: JIT, allocator, lazy initialisation; its result gives the accuracy
columns), then the timed runs go round the methods in turn, so that a change
in the load of a shared machine hits all of them alike. A method whose
warm-up took less than a second runs once more, untimed, right before each
timed run: it is then timed in the state a loop of itself leaves (caches,
freed memory), not in whatever the method before it in the round left. Without
that, a step that costs 2 ms could take 1.9 or 3.6 ms depending only on its
place in the round (4096 x 256, float32: the Cayley and tangent steps, the
same work). The gradient has N(0, 1/n) entries
(``||G||_2 ~ 2``) and the learning rate is 0.1; W is a dense unitary matrix
built in O(n^2) from Householder reflections (for a Gaussian G, the cost and
accuracy of every method do not depend on which unitary W is). The randomized
SVDs decompose an n x n matrix with singular values 1/j, whose optimal rank-k
error is known exactly. The backend-specific calls (SciPy, torch.linalg,
scikit-learn, torch.svd_lowrank) live only in this module: a tool, not
algorithm code.

With ``--peers`` (torch backend) the table also holds the O(n^3) steps users
take today with other libraries (geoopt, geotorch, torch's orthogonal
parametrization; see ``_peers``), each where it is installed, with its time
over the projUNN-T step's. On the torch backend, the bench always times a plain
``torch.optim.RMSprop`` step and ``unitary_lr.torch.ProjUNN(base="rmsprop")``
at each of ``--ranks`` on the same n x n matrix, and prints their ratio. These
optimizers change their parameter in place: each timed step starts where the previous one ended,
as in training, and the unitarity error is checked once, after the timed steps.
On a CUDA device it also times both with ``capturable=True``, one step
captured in a CUDA graph and replayed (the fastest way a GPU training loop
can run them: no Python and no launches per step), and prints that ratio too.
On JAX it times their optax counterparts instead, ``jax.jit(opt.update)`` of
``optax.rmsprop`` and of ``unitary_lr.optax.projunn(base="rmsprop")`` (the
state carried from one update to the next), and the floor under ``jax.jit``,
and prints the jitted projunn update over each.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import _benchdata as data
from .. import projunn_step, random_unitary, randomized_svd, unitarity_error
from .._backends import load_backend
from .._host import to_host
from .._xp import add_product, array_namespace, mH
from ..steps import STEP_OVERSAMPLE, STEP_POWER_ITERS
from . import _options, _peers
from ._options import variant_label, variant_names
from ._output import CommandError, format_table, output_path, run_record, save_figure, write_json
from ._session import execute

LEARNING_RATE = 0.1

FLOOR = "floor"
# Methods whose warm-up run took less than this are primed before each timed
# run (an untimed run of their own); the slower ones are not, where the
# primer would double a run of minutes for an effect of a few milliseconds.
PRIMER_MAX_S = 1.0
# one projUNN step per registered variant, named as in the paper (projUNN-T, projUNN-D)
STEPS = {variant_label(variant): variant for variant in variant_names()}
TANGENT = variant_label("tangent")  # the step the peers are compared with
DENSE_SVD = "dense SVD polar"
DENSE_EXPM = "dense expm step"
DENSE_CAYLEY = "dense Cayley step"
RSVD = "unitary_lr randomized_svd"
RSVD_SKLEARN = "sklearn randomized_svd"
RSVD_TORCH = "torch.svd_lowrank"

# method -> kind; the kind says which columns apply and whether k matters
KINDS = {
    FLOOR: "floor",
    **{method: "step" for method in STEPS},
    DENSE_SVD: "dense",
    DENSE_EXPM: "dense",
    DENSE_CAYLEY: "dense",
    RSVD: "rsvd",
    RSVD_SKLEARN: "rsvd",
    RSVD_TORCH: "rsvd",
    **{peer.method: "peer" for peer in _peers.PEERS},
    _peers.RMSPROP: "optimizer",
    _peers.PROJUNN_RMSPROP: "optimizer",
    _peers.RMSPROP_GRAPH: "optimizer",
    _peers.PROJUNN_RMSPROP_GRAPH: "optimizer",
    _peers.OPTAX_RMSPROP: "optimizer",
    _peers.OPTAX_PROJUNN: "optimizer",
    _peers.JIT_FLOOR: "jitted floor",
}
RANKED = ("step", "rsvd")
STATEFUL = ("peer", "optimizer")


def add_parser(commands):
    parents = [
        _options.ranks_options(default=[1], what="the steps and of the randomized SVDs"),
        _options.array_options(dtype="float64"),
        _options.threads_options(experiment=False),
        _options.seed_options("the matrices and the sketches"),
        _options.progress_options(),
    ]
    parser = commands.add_parser("bench", help="time projUNN steps against the floor, the dense steps and other "
                                               "randomized SVDs",
                                 description=_options.paragraph(__doc__, 1), parents=parents)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], metavar="N",
                        help="matrix sizes n (default: 256 512 1024 2048 4096)")
    parser.add_argument("--columns", type=int, nargs="+", default=[], metavar="M",
                        help="also time the steps on n x m matrices with orthonormal columns, for every n of "
                             "--sizes and every m < n; with --peers, geoopt's EuclideanStiefel step too "
                             "(default: square only)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per method and size; the table shows their median (default: 5)")
    parser.add_argument("--dense-max", type=int, default=2048, metavar="N",
                        help="largest n for the dense O(n^3) steps, skipped above it (default: 2048)")
    parser.add_argument("--oversample", type=int, default=10,
                        help="oversampling of the three randomized SVDs (default: 10)")
    parser.add_argument("--power-iters", type=int, default=2,
                        help="power iterations of the three randomized SVDs (default: 2)")
    parser.add_argument("--peers", action="store_true",
                        help="also time the O(n^3) steps of geoopt, geotorch and torch's orthogonal "
                             "parametrization, where installed, up to --dense-max (needs --backend torch)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results, settings and machine as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="write a log-log PNG plot of time against n with the fitted slopes (PATH ends in "
                             ".png; a name without extension gets it)")
    parser.set_defaults(run=run)


def _validate(args):
    bad = [n for n in args.sizes if n < 2]
    if bad:
        raise CommandError(f"--sizes must be >= 2, got {bad[0]}")
    sizes = sorted(set(args.sizes))
    bad = [m for m in args.columns if m < 1]
    if bad:
        raise CommandError(f"--columns must be >= 1, got {bad[0]}")
    # a rank-k step needs k <= min(n, m): the smallest matrix dimension timed
    smallest = min([sizes[0]] + [m for m in args.columns if m < sizes[-1]])
    bad = [k for k in args.ranks if not 1 <= k <= smallest]
    if bad:
        raise CommandError(f"--ranks must lie in [1, smallest size = {smallest}], got {bad[0]}")
    for flag, value, minimum in (("--repeat", args.repeat, 1), ("--dense-max", args.dense_max, 0),
                                 ("--oversample", args.oversample, 0), ("--power-iters", args.power_iters, 0),
                                 ("--seed", args.seed, 0), ("--threads", args.threads, 1)):
        if value is not None and value < minimum:
            raise CommandError(f"{flag} must be >= {minimum}, got {value}")
    if args.peers and args.backend != "torch":
        raise CommandError(f"--peers times torch optimizers: add --backend torch (got --backend {args.backend})")
    args.threads_given = args.threads is not None  # unless given, the libraries' own pools
    # the shared checks: before the run, one line, exit 2
    if args.json is not None:
        output_path("--json", args.json)
    args.plot_path = None if args.plot is None else _plot_path(args.plot)
    return sizes, sorted(set(args.ranks))


def _plot_path(text):
    """The file ``--plot`` writes: a PNG (``_output.save_figure``), so ``text``
    itself when it ends in .png, ``text`` + ".png" when it has no extension
    (the name matplotlib would have given it), and a CommandError for any
    other extension, which would name a file that is not what it holds."""
    suffix = Path(text).suffix
    if suffix and suffix.lower() != ".png":
        raise CommandError(f"--plot writes a PNG image: PATH must end in .png (or have no extension), got {text!r}")
    return output_path("--plot", text, suffix="" if suffix else ".png")


# --- the methods ------------------------------------------------------------------------------

def _expm_for(backend):
    """(expm function, None) for the backend, or (None, why not)."""
    candidates = {
        "numpy": ("scipy.linalg", "expm", "scipy"),
        "torch": ("torch.linalg", "matrix_exp", "torch"),
        "jax": ("jax.scipy.linalg", "expm", "jax"),
        "cupy": ("cupyx.scipy.linalg", "expm", "cupy"),
    }
    if backend.name not in candidates:
        return None, f"{DENSE_EXPM} skipped: {backend.name} has no matrix exponential"
    module, name, package = candidates[backend.name]
    try:
        return getattr(importlib.import_module(module), name), None
    except (ImportError, AttributeError):
        return None, f"{DENSE_EXPM} skipped: {module}.{name} is not available (pip install {package})"


def _other_rsvds(backend, dtype, notes):
    """{method: function(A, k, oversample, power_iters, seed) -> (U, S, Vh)} for the
    randomized SVDs of other libraries that can run on this backend."""
    found = {}
    if backend.name != "numpy":
        notes.append(f"{RSVD_SKLEARN} skipped: it takes NumPy arrays (--backend numpy)")
    elif dtype.startswith("complex"):
        notes.append(f"{RSVD_SKLEARN} skipped: it rejects complex input")
    else:
        try:
            from sklearn.utils.extmath import randomized_svd as sklearn_rsvd
        except ImportError:
            notes.append(f"{RSVD_SKLEARN} skipped: scikit-learn is not installed (pip install scikit-learn)")
        else:
            def run_sklearn(A, k, oversample, power_iters, seed):
                # QR after every product, as unitary_lr does: the same accuracy
                # (its default for 2 power iterations is no normalisation at all)
                return sklearn_rsvd(A, k, n_oversamples=oversample, n_iter=power_iters,
                                    power_iteration_normalizer="QR", random_state=seed)

            found[RSVD_SKLEARN] = run_sklearn
    if backend.name == "torch":
        torch = importlib.import_module("torch")

        def run_torch(A, k, oversample, power_iters, seed):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(A, q=min(k + oversample, *A.shape), niter=power_iters)
            return U, S, V.mH

        found[RSVD_TORCH] = run_torch
    else:
        notes.append(f"{RSVD_TORCH} skipped: it takes torch tensors (--backend torch)")
    return found


def _thread_pools():
    """The BLAS/OpenMP pools the run uses (threadpoolctl's view), or None
    when threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{key: pool.get(key) for key in ("user_api", "internal_api", "version", "num_threads")}
            for pool in threadpool_info()]


def _wait(backend, result):
    """Block until ``result`` (an array or a tuple of arrays) is computed."""
    if backend.name == "jax":  # asynchronous dispatch, on the CPU too
        for x in result if isinstance(result, tuple) else (result,):
            x.block_until_ready()
    else:
        backend.synchronize()


def _rsvd_error(U, S, Vh, A, optimal):
    """||A - U diag(S) Vh||_F over the optimal rank-k error, of every library's
    factors alike: on the host, in float64 (complex128).

    In the working precision the figure is not worth its digits: torch's
    float32 Frobenius norm of a 2048 x 2048 residual on a CPU is off by some
    1e-4 relative, and read 0.9999 where the optimum is 1. The cast is exact,
    so this is the error of the factors as computed, measured without rounding
    of its own worth counting."""
    xp = array_namespace(A)
    A, U, S, Vh = (to_host(xp, x) for x in (A, U, S, Vh))
    wide = np.complex128 if any(np.iscomplexobj(x) for x in (A, U, Vh)) else np.float64
    A, U, Vh = (x.astype(wide) for x in (A, U, Vh))
    residual = A - (U * S.astype(np.float64)[None, :]) @ Vh
    return float(np.linalg.norm(residual)) / optimal


# --- the run ------------------------------------------------------------------------------------

def run(args) -> int:
    sizes, ranks = _validate(args)
    setup = _setup(args, sizes, ranks)
    # what the work leaves for the report, however far it got: the sizes done
    state = SimpleNamespace(rows=[], pools=None)
    status = execute(args, lambda session: _time_all(args, setup, state, session),
                     lambda session: _report(args, setup, state, session.interrupted),
                     description="bench", plot=args.plot is not None, torch=setup.backend.name == "torch",
                     unfinished="the table and outputs hold the sizes done so far")
    if status == 0 and setup.failures:
        print(f"unitary-lr bench: {len(setup.failures)} method(s) failed, the others were timed (see the notes)",
              file=sys.stderr)
        return 1
    return status


def _setup(args, sizes, ranks):
    """The backend and the methods that can run on it, with notes on the others."""
    backend = load_backend(args.backend, device=args.device, float64=args.dtype in ("float64", "complex128"))
    xp, device = backend.xp, backend.device
    if args.dtype not in xp.__array_namespace_info__().dtypes(device=device):
        raise CommandError(f"dtype {args.dtype} is not available on device {device!r} of {args.backend}")
    complex_ = args.dtype.startswith("complex")
    notes = []
    expm, why_not = _expm_for(backend)
    if why_not:
        notes.append(why_not)
    others = _other_rsvds(backend, args.dtype, notes)
    peers, peer_notes = _peers.available_peers(complex_) if args.peers else ([], [])
    notes.extend(peer_notes)
    dense = [DENSE_SVD] + [DENSE_EXPM] * (expm is not None) + [DENSE_CAYLEY]
    too_big = [n for n in sizes if n > args.dense_max]
    if too_big and dense:
        notes.append(f"dense steps {'and peers ' * bool(peers)}skipped for n > {args.dense_max} (--dense-max): n = "
                     + ", ".join(map(str, too_big)))
    if backend.name == "torch" and getattr(device, "type", device) == "cuda" and any(k > 1 for k in ranks):
        notes.append(f"{_peers.PROJUNN_RMSPROP_GRAPH} timed at rank 1 only: at rank 2 or more a capturable step "
                     "calls torch.linalg.eigh, which a CUDA graph cannot capture")
    columns = sorted(set(args.columns))
    unused = [m for m in columns if m >= sizes[-1]]
    if unused:
        notes.append(f"--columns m >= n is the square case or a wide matrix: not timed: m = {', '.join(map(str, unused))}")
    return SimpleNamespace(sizes=sizes, ranks=ranks, backend=backend, xp=xp, device=device, dtype=getattr(xp, args.dtype),
                           complex_=complex_, notes=notes, expm=expm, others=others, peers=peers, dense=dense,
                           columns=columns, failures=[],
                           # geoopt's QR retraction steps the n x m matrix itself; the other peers an n x n one
                           stiefel_peers=[peer for peer in peers if peer.method in _peers.STIEFEL_PEERS],
                           # torch: RMSprop and ProjUNN(base="rmsprop"); JAX: their optax
                           # counterparts under jax.jit and the jitted floor
                           optimizers=backend.name if backend.name in ("torch", "jax") else None)


def _case_count(args, setup, n):
    """How many cases ``_cases`` builds at size n (for the progress bar)."""
    ranks = len(setup.ranks)
    square = (1 + len(STEPS) * ranks + (len(setup.dense) + len(setup.peers)) * (n <= args.dense_max)
              + (1 + len(setup.others)) * ranks + _optimizer_count(setup))
    rectangular = 1 + len(STEPS) * ranks + (n <= args.dense_max) + len(setup.stiefel_peers)
    return square + rectangular * sum(m < n for m in setup.columns)


def _optimizer_count(setup):
    """How many optimizer cases ``_optimizer_cases`` builds at one size."""
    plain = {"torch": 1 + _captures(setup), "jax": 2, None: 0}[setup.optimizers]
    projunn = len(setup.ranks) * (setup.optimizers is not None) + len(_captured_ranks(setup))
    return plain + projunn


def _captures(setup):
    """Whether the torch optimizers are also timed captured in CUDA graphs
    (see ``_peers._captured``): on a CUDA device."""
    return setup.optimizers == "torch" and getattr(setup.device, "type", setup.device) == "cuda"


def _captured_ranks(setup):
    """The ranks at which ProjUNN's default ('tangent') step is timed captured
    in a CUDA graph: those whose capture works (rank 1, see
    ``unitary_lr.torch.optimizer.captures_in_cuda_graph``)."""
    if not _captures(setup):
        return []
    from ..torch.optimizer import captures_in_cuda_graph

    return [k for k in setup.ranks if captures_in_cuda_graph(k, "tangent")]


@dataclass(frozen=True)
class Case:
    """One timed method at one size: ``call()`` runs it; ``check(result)``
    measures the untimed first result, ``final()`` the state after timing
    (for the methods that step a parameter in place). ``m`` is the number of
    columns of an n x m case, None for n x n."""

    method: str
    k: int | None
    call: Callable
    check: Callable | None = None
    final: Callable | None = None
    m: int | None = None


def _unitarity(W):
    return {"unitarity_error": float(unitarity_error(W))}


def _stateful(method, k, stepper, checked, m=None):
    """A case whose call steps a parameter in place, checked once after timing."""
    return Case(method, k, stepper.step, final=(lambda: _unitarity(stepper.point())) if checked else None, m=m)


def _cases(args, setup, n):
    """Every method at size n, on the same data."""
    xp = setup.xp
    rng = np.random.default_rng([args.seed, n])

    def on_device(host):
        return xp.asarray(host.astype(args.dtype), dtype=setup.dtype, device=setup.device)

    W = on_device(data.unitary(rng, n, setup.complex_))
    G = on_device(data.gaussian(rng, (n, n), setup.complex_, scale=n**-0.5))
    x, u, v = (on_device(data.gaussian(rng, shape, setup.complex_)) for shape in ((n,), (n, 2), (n, 2)))
    A = on_device(data.known_spectrum(rng, n, setup.complex_))
    found = [Case(FLOOR, None, lambda: (G @ x, add_product(xp, W, u, mH(xp, v))))]
    found += _guarded(setup, n, "the projUNN steps", lambda: _step_cases(args, setup, n, W, G))
    if n <= args.dense_max:
        found += _guarded(setup, n, "the dense steps", lambda: _dense_cases(setup, W, G))
        for peer in setup.peers:
            found += _guarded(setup, n, peer.method,
                              lambda peer=peer: [_stateful(peer.method, None, peer.build(W, G, LEARNING_RATE), True)])
    found += _guarded(setup, n, "the randomized SVDs", lambda: _rsvd_cases(args, setup, n, A))
    found += _optimizer_cases(args, setup, n, W, G, (x, u, v))
    for m in setup.columns:
        if m < n:
            found += _guarded(setup, n, f"the n x {m} cases",
                              lambda m=m: _rectangular_cases(args, setup, n, m, on_device))
    return found


def _guarded(setup, n, what, build):
    """The cases ``build()`` makes, or none where it raises: the failure goes
    into the table's notes and the exit status (1), and the other methods
    run. A GPU lent for minutes should not lose a whole table to one method
    (a CUDA-graph capture that failed did, 2026-12-04)."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - reported: _failed
        _failed(setup, n, what, error)
        return []


def _failed(setup, n, what, error):
    """Record that ``what`` failed at size n with ``error``."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = f"FAILED at n = {n}: {what}: {type(error).__name__}{': ' + message if message else ''}"
    setup.failures.append(line)
    setup.notes.append(line)


def _optimizer_cases(args, setup, n, W, G, floor_arrays):
    """A plain optimizer and projUNN with it as the base rule, on the same
    matrix: torch.optim.RMSprop and ProjUNN(base="rmsprop") on torch; on JAX
    the jitted optax updates, with the floor under jax.jit. Each is built
    apart (see :func:`_guarded`)."""
    def stateful(method, k, make, checked):  # (method, k, build the case)
        return method, k, lambda: _stateful(method, k, make(), checked)

    builders = []
    if setup.optimizers == "torch":
        builders.append(stateful(_peers.RMSPROP, None, lambda: _peers.rmsprop(W, G, LEARNING_RATE), False))
        builders += [stateful(_peers.PROJUNN_RMSPROP, k, lambda k=k: _peers.projunn_rmsprop(
            W, G, LEARNING_RATE, rank=k, seed=args.seed), True) for k in setup.ranks]
        if _captures(setup):
            builders.append(stateful(_peers.RMSPROP_GRAPH, None, lambda: _peers.rmsprop_graph(W, G, LEARNING_RATE),
                                     False))
            builders += [stateful(_peers.PROJUNN_RMSPROP_GRAPH, k, lambda k=k: _peers.projunn_rmsprop_graph(
                W, G, LEARNING_RATE, rank=k, seed=args.seed), True) for k in _captured_ranks(setup)]
    elif setup.optimizers == "jax":
        x, u, v = floor_arrays
        builders.append((_peers.JIT_FLOOR, None,
                         lambda: Case(_peers.JIT_FLOOR, None, _peers.jitted_floor(G, x, W, u, v))))
        builders.append(stateful(_peers.OPTAX_RMSPROP, None, lambda: _peers.optax_rmsprop(W, G, LEARNING_RATE), False))
        builders += [stateful(_peers.OPTAX_PROJUNN, k, lambda k=k: _peers.optax_projunn(
            W, G, LEARNING_RATE, rank=k, seed=args.seed), True) for k in setup.ranks]
    found = []
    for method, k, build in builders:
        found += _guarded(setup, n, _label(method, k, None), lambda build=build: [build()])
    return found


def _rectangular_cases(args, setup, n, m, on_device):
    """The floor, every variant, the dense Cayley step and the Stiefel peers on
    an n x m matrix with orthonormal columns and an n x m gradient."""
    xp = setup.xp
    rng = np.random.default_rng([args.seed, n, m])
    # Haar on the Stiefel manifold: a QR of an n x m Gaussian, O(n m^2), seconds at 4096 x 1024
    W = random_unitary(n, m, dtype=args.dtype, rng=rng, xp=xp, device=setup.device)
    G = on_device(data.gaussian(rng, (n, m), setup.complex_, scale=n**-0.5))
    x, u, v = (on_device(data.gaussian(rng, shape, setup.complex_)) for shape in ((m,), (n, 2), (m, 2)))
    found = [Case(FLOOR, None, lambda: (G @ x, add_product(xp, W, u, mH(xp, v))), m=m)]
    found += _step_cases(args, setup, n, W, G, m=m)
    if n <= args.dense_max:
        found.append(Case(DENSE_CAYLEY, None, _dense_cayley(xp, setup.device, W, G), _unitarity, m=m))
    found += [_stateful(peer.method, None, peer.build(W, G, LEARNING_RATE), True, m=m) for peer in setup.stiefel_peers]
    return found


def _step_cases(args, setup, n, W, G, m=None):
    """A projUNN step of every registered variant, at every rank."""
    found = []
    for k in setup.ranks:
        for method, variant in STEPS.items():
            sketches = np.random.default_rng([args.seed, n, k, 1] + [m] * (m is not None))
            found.append(Case(method, k, functools.partial(projunn_step, W, G, lr=LEARNING_RATE, rank=k,
                                                           variant=variant, rng=sketches), _unitarity, m=m))
    return found


def _dense_cayley(xp, device, W, G):
    """The full-capacity uRNN step (Wisdom et al. 2016) as published, O(n^3):
    ``solve(I + lr/2 A, (I - lr/2 A) W)``, A = G W^H - W G^H (n x n), in the
    backend's own linalg."""
    n = W.shape[-2]

    def step():
        S = G @ mH(xp, W)  # A = S - S^H: one O(n^2 m) product, not two
        A = (LEARNING_RATE / 2) * (S - mH(xp, S))
        eye = xp.eye(n, dtype=W.dtype, device=device)
        return xp.linalg.solve(eye + A, W - A @ W)

    return step


def _dense_cases(setup, W, G):
    """The O(n^3) steps: the SVD polar step, the Cayley step and, where the
    backend has expm, the Riemannian step."""
    xp, expm = setup.xp, setup.expm

    def svd_polar():
        U, _, Vh = xp.linalg.svd(W - LEARNING_RATE * G, full_matrices=False)
        return U @ Vh

    def expm_step():
        S = mH(xp, W) @ G  # W^H G - G^H W = S - S^H: one O(n^3) product, not two
        return W @ expm((-LEARNING_RATE / 2) * (S - mH(xp, S)))

    return [Case(DENSE_SVD, None, svd_polar, _unitarity)] + [Case(DENSE_EXPM, None, expm_step, _unitarity)] * (
        expm is not None) + [Case(DENSE_CAYLEY, None, _dense_cayley(xp, setup.device, W, G), _unitarity)]


def _rsvd_cases(args, setup, n, A):
    """unitary_lr's randomized SVD and the other libraries', with their error over the optimal one."""
    found = []
    for k in setup.ranks:
        optimal = data.optimal_error(n, k)

        def error(result, optimal=optimal, k=k):
            U, S, Vh = result
            return {"relative_error": _rsvd_error(U[:, :k], S[:k], Vh[:k, :], A, optimal)}

        sketches = np.random.default_rng([args.seed, n, k, 2])
        found.append(Case(RSVD, k, lambda k=k, sketches=sketches: tuple(randomized_svd(
            A, k, oversample=args.oversample, power_iters=args.power_iters, rng=sketches)), error))
        for method, function in setup.others.items():
            found.append(Case(method, k, functools.partial(function, A, k, args.oversample, args.power_iters,
                                                           args.seed), error))
    return found


def _time_all(args, setup, state, session):
    """Every size in turn; a size's rows join ``state.rows`` once it is complete."""
    state.pools = _thread_pools()  # as limited by --threads
    bar = session.progress(sum(_case_count(args, setup, n) for n in setup.sizes) * (1 + args.repeat))
    for n in setup.sizes:
        state.rows.extend(_time_size(args, setup, n, bar))


def _time_size(args, setup, n, bar):
    """The rows of size n: each case's warm-up run, then ``--repeat`` interleaved rounds."""
    backend, cases, todo, done, primers = setup.backend, _cases(args, setup, n), [], [], []
    for case in cases:
        # The untimed warm-up run; its result is checked, then dropped
        # so that only one n x n result is alive at a time. A method that
        # fails here is reported and left out of the timed rounds.
        bar.set_postfix_str(f"n={n} {_label(case.method, case.k, case.m)}", refresh=True)
        start = time.perf_counter()
        try:
            result = case.call()
            _wait(backend, result)
        except Exception as error:  # noqa: BLE001 - reported: _failed
            _failed(setup, n, _label(case.method, case.k, case.m), error)
            bar.update(1 + args.repeat)
            continue
        todo.append(case)
        primers.append(time.perf_counter() - start < PRIMER_MAX_S)
        done.append({"method": case.method, "kind": KINDS[case.method], "n": n,
                     "m": n if case.m is None else case.m, "k": case.k, "median_s": None,
                     "times_s": [], "ratio_to_floor": None, "speedup_over_dense": None,
                     "ratio_to_projunn_t": None, "ratio_to_rmsprop": None, "ratio_to_jitted_floor": None,
                     "ratio_to_square": None,
                     "unitarity_error": None, "relative_error": None,
                     **(case.check(result) if case.check else {})})
        del result
        bar.update(1)
    # Interleaved rounds, every method once per round: a change in the
    # load of a shared machine hits all methods alike, so their ratios
    # hold better than if each method were timed in one block. The quick
    # methods are primed by an untimed run of their own (see the docstring).
    for _ in range(args.repeat):
        for case, row, primed in zip(todo, done, primers):
            bar.set_postfix_str(f"n={n} {_label(case.method, case.k, case.m)}", refresh=False)
            if primed:
                _wait(backend, case.call())
            start = time.perf_counter()
            _wait(backend, case.call())
            row["times_s"].append(time.perf_counter() - start)
            bar.update(1)
    for case, row in zip(todo, done):
        row["median_s"] = statistics.median(row["times_s"])
        if case.final is not None:  # stateful: one dense check of where the timed steps ended
            row.update(case.final())
    return done


def _report(args, setup, state, interrupted):
    """The table, the JSON and the plot, of the sizes done; the paths written."""
    rows = state.rows
    _add_ratios(rows)
    slopes = _slopes(rows)
    _print(rows, slopes, setup.notes, projunn_t_rank=setup.ranks[0])
    record = run_record(args, "bench", {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "sizes": setup.sizes, "columns": setup.columns, "ranks": setup.ranks, "dtype": args.dtype,
            "backend": args.backend,
            "device": str(setup.device), "repeat": args.repeat, "dense_max": args.dense_max, "lr": LEARNING_RATE,
            "gradient": "N(0, 1/n) entries", "step_oversample": STEP_OVERSAMPLE,
            "step_power_iters": STEP_POWER_ITERS, "rsvd_oversample": args.oversample,
            "rsvd_power_iters": args.power_iters, "rsvd_spectrum": "1/j", "threads": args.threads,
            "seed": args.seed, "peers": args.peers, "peer_ratio_rank": setup.ranks[0],
            "primed_below_s": PRIMER_MAX_S,
        },
        "interrupted": interrupted,
        "results": rows,
        "slopes": slopes,
        "notes": setup.notes,
    }, versions={**_versions(args.backend, setup.expm, setup.others),
                 **_peers.versions(peer.package for peer in setup.peers), "thread_pools": state.pools})
    written = []
    if args.json is not None:
        write_json(Path(args.json), record)
        written.append(args.json)
    if args.plot_path is not None and rows:
        _plot(args.plot_path, rows, slopes,
              title=f"unitary-lr bench: {args.dtype}, {args.backend} ({setup.device})")
        written.append(args.plot_path)
    return written


def _add_ratios(rows):
    """Ratio to the floor and speed-up over the fastest dense step, per shape
    (n, m); a peer's time over projUNN-T's at the smallest k and the same
    shape; ProjUNN(base="rmsprop")'s time over torch.optim.RMSprop's (the
    optax pair's likewise, and over the jitted floor); an n x m step's time
    over the same variant's n x n step (same k)."""
    def shape(r):
        return r["n"], r["m"]

    floor = {shape(r): r["median_s"] for r in rows if r["kind"] == "floor"}
    ranks = [r["k"] for r in rows if r["method"] == TANGENT]
    tangent = {shape(r): r["median_s"] for r in rows if r["method"] == TANGENT and r["k"] == min(ranks, default=None)}
    plain = {(r["method"], r["n"]): r["median_s"] for r in rows if r["kind"] == "optimizer"}
    jitted_floor = {r["n"]: r["median_s"] for r in rows if r["method"] == _peers.JIT_FLOOR}
    square = {(r["method"], r["k"], r["n"]): r["median_s"] for r in rows if r["kind"] == "step" and r["m"] == r["n"]}
    dense = {}
    for r in rows:
        if r["kind"] == "dense":
            dense[shape(r)] = min(dense.get(shape(r), math.inf), r["median_s"])
    for r in rows:
        if shape(r) in floor:
            r["ratio_to_floor"] = r["median_s"] / floor[shape(r)]
        if shape(r) in dense:
            r["speedup_over_dense"] = dense[shape(r)] / r["median_s"]
        if r["kind"] == "peer" and shape(r) in tangent:
            r["ratio_to_projunn_t"] = r["median_s"] / tangent[shape(r)]
        for unitary, counterpart, _ in _peers.OPTIMIZER_PAIRS:
            if r["method"] == unitary and (counterpart, r["n"]) in plain:
                r["ratio_to_rmsprop"] = r["median_s"] / plain[(counterpart, r["n"])]
        if r["method"] == _peers.OPTAX_PROJUNN and r["n"] in jitted_floor:
            r["ratio_to_jitted_floor"] = r["median_s"] / jitted_floor[r["n"]]
        if r["kind"] == "step" and r["m"] != r["n"] and (r["method"], r["k"], r["n"]) in square:
            r["ratio_to_square"] = r["median_s"] / square[(r["method"], r["k"], r["n"])]


def _columns(r):
    """A row's number of columns m, None for an n x n matrix."""
    return None if r["m"] == r["n"] else r["m"]


def _series(rows):
    """(method, k, m) -> (sizes, median seconds), in the order the methods first
    ran; m is None for n x n matrices."""
    series = {}
    for r in rows:
        sizes, times = series.setdefault((r["method"], r["k"], _columns(r)), ([], []))
        sizes.append(r["n"])
        times.append(r["median_s"])
    return series


def _slopes(rows):
    """Least-squares slope of log(time) against log(n) of each method (and k, and m)."""
    slopes = []
    for (method, k, m), (sizes, times) in _series(rows).items():
        slope = float(np.polyfit(np.log(sizes), np.log(times), 1)[0]) if len(sizes) >= 2 else None
        slopes.append({"method": method, "k": k, "m": m, "slope": slope, "sizes": sizes})
    return slopes


def _label(method, k, m=None):
    return method + ("" if k is None else f" k={k}") + ("" if m is None else f" m={m}")


def _number(value, digits=3):
    return "-" if value is None else f"{value:.{digits}g}"


def _print(rows, slopes, notes, *, projunn_t_rank):
    peers = any(r["kind"] == "peer" for r in rows)
    rectangular = any(r["m"] != r["n"] for r in rows)  # the m and x square columns only then
    print(format_table(
        ("method", "n") + ("m",) * rectangular + ("k", "time [ms]", "x floor", "speed-up vs dense")
        + ("x square",) * rectangular + ("x projUNN-T",) * peers + ("unitarity error", "error / optimal"),
        [(r["method"], r["n"]) + (r["m"],) * rectangular
         + ("-" if r["k"] is None else r["k"], f"{1e3 * r['median_s']:.4g}",
            _number(r["ratio_to_floor"]), _number(r["speedup_over_dense"]))
         + (_number(r["ratio_to_square"]),) * rectangular
         + (_number(r["ratio_to_projunn_t"]),) * peers
         + ("-" if r["unitarity_error"] is None else f"{r['unitarity_error']:.1e}",
            _number(r["relative_error"], 5)) for r in rows],
    ))
    _print_rmsprop_ratios(rows)
    fitted = [s for s in slopes if s["slope"] is not None]
    if fitted:
        print()
        print(format_table(("method", "slope of log time vs log n", "sizes"),
                           [(_label(s["method"], s["k"], s["m"]), f"{s['slope']:.2f}",
                             f"{s['sizes'][0]}..{s['sizes'][-1]}") for s in fitted]))
    notes = ["speed-up vs dense: the fastest dense step at the same n (and m) over this time",
             *["x square: an n x m step's time over the same variant's n x n step at the same n and k"]
             * rectangular,
             "error / optimal: ||A - U S V^H||_F / ||A - A_k||_F for singular values 1/j (1 is optimal)",
             *[(f"x projUNN-T: the peer's step time over the projUNN-T step's (k = {projunn_t_rank}) at the "
                "same n (and m)")] * peers,
             *[("peers and optimizers step their parameter in place: each timed step starts where the last "
                "ended; unitarity error after the timed steps")]
             * any(r["kind"] in STATEFUL and r["method"] not in _peers.OPTAX_METHODS for r in rows),
             *[("the jitted optax updates carry their state from one update to the next at the fixed point W "
                "(every update does the same work); unitarity error of W plus the last update")]
             * any(r["method"] in _peers.OPTAX_METHODS for r in rows),
             *notes]
    print()
    for note in notes:
        print(f"note: {note}")


def _print_rmsprop_ratios(rows):
    """ProjUNN(base="rmsprop") against torch.optim.RMSprop, and the jitted
    optax projunn update against optax.rmsprop's and the jitted floor, one
    line per n and k."""
    for unitary, counterpart, heading in _peers.OPTIMIZER_PAIRS:
        paired = [r for r in rows if r["method"] == unitary and r["ratio_to_rmsprop"] is not None]
        if not paired:
            continue
        plain = {r["n"]: r["median_s"] for r in rows if r["method"] == counterpart}
        floors = {r["n"]: r["median_s"] for r in rows if r["method"] == _peers.JIT_FLOOR}
        jitted = unitary == _peers.OPTAX_PROJUNN
        print()
        print(format_table(
            ("n", "k", f"{unitary} [ms]", f"{counterpart} [ms]") + (f"{_peers.JIT_FLOOR} [ms]",) * jitted
            + (heading,) + (f"projunn / {_peers.JIT_FLOOR}",) * jitted,
            [(r["n"], r["k"], f"{1e3 * r['median_s']:.4g}", f"{1e3 * plain[r['n']]:.4g}")
             + (f"{1e3 * floors[r['n']]:.4g}" if r["n"] in floors else "-",) * jitted
             + (_number(r["ratio_to_rmsprop"]),) + (_number(r["ratio_to_jitted_floor"]),) * jitted
             for r in paired],
        ))


def _versions(backend_name, expm, others):
    """Versions of the libraries this run timed, beyond ``environment()``'s."""
    versions = {}
    for module in dict.fromkeys(
        [backend_name] + ["scipy"] * (expm is not None and backend_name == "numpy")
        + ["sklearn"] * (RSVD_SKLEARN in others)
    ):
        versions[module] = getattr(importlib.import_module(module), "__version__", None)
    return versions


# Floors are drawn in black or grey, each with a grey and a marker of its own;
# every other series in colour, and once the colours run out, in the same
# colours with the next marker: no two series look alike (see _styles).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FLOOR_COLORS = ("black", "0.45", "0.7")
FLOOR_KINDS = ("floor", "jitted floor")
LINESTYLES = {"floor": "-", "step": "-", "dense": "--", "rsvd": ":", "peer": "-.",
              "optimizer": (0, (5, 1, 1, 1, 1, 1)), "jitted floor": "--"}
# legend entries per column below the axes, and the height one row of them takes
LEGEND_COLUMNS = 2
LEGEND_ROW_INCHES = 0.2


def _styles(keys):
    """(method, k, m) -> plot keywords: colour, marker, line style and width,
    distinct for every series (see MARKERS)."""
    import matplotlib

    colors = matplotlib.colormaps["tab20" if len(keys) > 10 else "tab10"].colors
    styles, counts = {}, {True: 0, False: 0}
    for key in keys:
        kind = KINDS[key[0]]
        floor = kind in FLOOR_KINDS
        palette = FLOOR_COLORS if floor else colors
        index = counts[floor]
        counts[floor] += 1
        # floors: a grey and a marker of their own each (3 x 8 pairs); the
        # others: the colours first, then the same colours with the next marker
        marker = index if floor else index // len(palette)
        styles[key] = {"color": palette[index % len(palette)], "marker": MARKERS[marker % len(MARKERS)],
                       "linestyle": LINESTYLES[kind], "linewidth": 2 if kind == "floor" else 1.5}
    return styles


def _figure(rows, slopes, *, title):
    """Log-log time against n, one line per method and k (and m), slope in the
    legend; the legend below the axes, in columns, the figure as tall as it needs."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    from matplotlib.ticker import NullLocator

    slope_of = {(s["method"], s["k"], s["m"]): s["slope"] for s in slopes}
    series = _series(rows)
    styles = _styles(list(series))
    legend_rows = math.ceil(len(series) / LEGEND_COLUMNS)
    figure = Figure(figsize=(9.6, 4.8 + LEGEND_ROW_INCHES * legend_rows), layout="constrained")
    axes = figure.subplots()
    for key, (sizes, times) in series.items():
        slope = slope_of[key]
        label = _label(*key) + ("" if slope is None else f": slope {slope:.2f}")
        axes.plot(sizes, 1e3 * np.asarray(times), label=label, **styles[key])
    axes.set_xscale("log")
    axes.set_yscale("log")
    sizes = sorted({r["n"] for r in rows})
    axes.set_xticks(sizes, labels=[str(n) for n in sizes])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set(title=title, xlabel="n", ylabel="median time [ms]")
    axes.grid(True, which="both", alpha=0.3)
    # "outside": constrained layout keeps the room the legend needs below the axes
    figure.legend(loc="outside lower center", ncols=LEGEND_COLUMNS, fontsize="small")
    return figure


def _plot(path, rows, slopes, *, title):
    """The plot of :func:`_figure`, written as a PNG to ``path`` (atomically)."""
    save_figure(_figure(rows, slopes, title=title), path, dpi=120)
