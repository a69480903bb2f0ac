"""The steps users take without unitary_lr, for ``unitary-lr bench --peers``.

Each peer is one optimizer step on an n x n orthogonal (unitary) matrix as its
library's users pay it, built on torch tensors of the bench's own W and G:

- geoopt: a ``ManifoldParameter`` on ``Stiefel()`` (canonical metric, a
  Cayley-type retraction: an n x n solve) or ``EuclideanStiefel()`` (QR
  retraction), with ``RiemannianSGD`` or ``RiemannianAdam``; one ``.step()``
  with ``.grad`` set to G.
- geotorch ``orthogonal`` and torch's ``parametrizations.orthogonal``
  (``matrix_exp`` and ``cayley`` maps) on a bias-free ``nn.Linear(n, n)``:
  the forward pass that materialises the weight, the backward pass of a loss
  whose gradient with respect to the weight is G, and a ``torch.optim.SGD``
  step.

geoopt's ``EuclideanStiefel`` steps take an n x m matrix with orthonormal
columns as it is (a QR of the n x m point, O(n m^2)); the other peers work on
an n x n matrix whatever m is. So ``bench --columns`` times the SGD one on n x m
matrices (``STIEFEL_PEERS``): the peer for the rectangular shapes.

Next to them, on every torch device, a plain ``torch.optim.RMSprop`` step on
an n x n parameter and ``unitary_lr.torch.ProjUNN(base="rmsprop")`` on the same
matrix marked unitary, at the bench's ``--ranks``: the price of keeping W
unitary inside a training loop.
On a CUDA device also the same pair as a GPU training loop runs it at its
fastest: ``capturable=True`` (``torch.optim.RMSprop``'s and ProjUNN's), one
step captured in a CUDA graph and replayed, so that neither pays its Python
or its kernel launches per step (ProjUNN's capturable step reads nothing on
the host). On JAX, the same pair as jitted optax updates (``optax.rmsprop`` and
``unitary_lr.optax.projunn(base="rmsprop")``), with the floor under
``jax.jit`` next to them: the update is what ``jax.jit(opt.update)`` costs,
the optimizer state carried from one update to the next.

All of these change their parameter in place, so a "stepper" keeps the state:
``step()`` takes one step and returns a tensor to wait on, ``point()`` is the
current n x n matrix, for one dense unitarity check after the timed steps.
This is a benchmarking tool, not algorithm code: the only module besides
``bench`` that imports optimizer libraries by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

GEOOPT_CANONICAL_SGD = "geoopt Stiefel + RiemannianSGD"
GEOOPT_CANONICAL_ADAM = "geoopt Stiefel + RiemannianAdam"
GEOOPT_EUCLIDEAN_SGD = "geoopt EuclideanStiefel + RiemannianSGD"
GEOOPT_EUCLIDEAN_ADAM = "geoopt EuclideanStiefel + RiemannianAdam"
GEOTORCH_ORTHOGONAL = "geotorch orthogonal + SGD"
TORCH_MATRIX_EXP = "torch orthogonal matrix_exp + SGD"
TORCH_CAYLEY = "torch orthogonal cayley + SGD"
# the peers that ``bench --columns`` also times on n x m matrices
STIEFEL_PEERS = (GEOOPT_EUCLIDEAN_SGD,)
RMSPROP = "torch.optim.RMSprop"
PROJUNN_RMSPROP = "ProjUNN(base='rmsprop')"
OPTAX_RMSPROP = "optax.rmsprop (jit)"
OPTAX_PROJUNN = "unitary_lr.optax.projunn (jit)"
RMSPROP_GRAPH = "torch.optim.RMSprop (CUDA graph)"
PROJUNN_RMSPROP_GRAPH = "ProjUNN(base='rmsprop') (CUDA graph)"
JIT_FLOOR = "floor (jit)"
OPTAX_METHODS = (OPTAX_RMSPROP, OPTAX_PROJUNN)
# (unitary optimizer, its plain counterpart, the heading of their ratio) of each library
OPTIMIZER_PAIRS = ((PROJUNN_RMSPROP, RMSPROP, "ProjUNN / RMSprop"),
                   (PROJUNN_RMSPROP_GRAPH, RMSPROP_GRAPH, "captured ProjUNN / RMSprop"),
                   (OPTAX_PROJUNN, OPTAX_RMSPROP, "projunn / rmsprop"))


@dataclass(frozen=True)
class Stepper:
    """One stateful optimizer: ``step()`` -> tensor to wait on; ``point()`` -> the matrix."""

    step: Callable
    point: Callable


@dataclass(frozen=True)
class Peer:
    """A peer step: the table's name, the package it needs, whether it takes
    complex matrices, and ``build(W, G, lr) -> Stepper``."""

    method: str
    package: str
    real_only: bool
    build: Callable


def _geoopt(canonical, optimizer):
    def build(W, G, lr):
        geoopt = importlib.import_module("geoopt")
        manifold = geoopt.Stiefel() if canonical else geoopt.EuclideanStiefel()
        point = geoopt.ManifoldParameter(W.clone(), manifold=manifold)
        opt = getattr(geoopt.optim, optimizer)([point], lr=lr)
        grad = G.clone()  # geoopt adds weight decay into .grad in place: its own copy

        def step():
            point.grad = grad
            opt.step()
            return point.detach()

        return Stepper(step, point.detach)

    return build


def _parametrized(register):
    """forward + backward + SGD on ``nn.Linear(n, n)`` with ``register(module)``
    applied, its weight set to W (through the parametrization's right inverse)."""

    def build(W, G, lr):
        torch = importlib.import_module("torch")
        n = W.shape[-1]
        module = torch.nn.Linear(n, n, bias=False, dtype=W.dtype, device=W.device)
        register(module)
        module.weight = W
        opt = torch.optim.SGD(module.parameters(), lr=lr)
        flat_grad = G.reshape(-1)  # read only

        def step():
            opt.zero_grad(set_to_none=True)
            # Re <G, weight>: its gradient with respect to the weight is G,
            # for real and complex weights alike (torch's .grad convention)
            torch.vdot(flat_grad, module.weight.reshape(-1)).real.backward()
            opt.step()
            return module.parametrizations.weight.original.detach()

        def point():
            with torch.no_grad():
                return module.weight.detach()

        return Stepper(step, point)

    return build


def _geotorch_orthogonal(module):
    importlib.import_module("geotorch").orthogonal(module, "weight")


def _torch_orthogonal(orthogonal_map):
    def register(module):
        parametrizations = importlib.import_module("torch.nn.utils.parametrizations")
        parametrizations.orthogonal(module, "weight", orthogonal_map=orthogonal_map)

    return register


# geoopt's Stiefel manifolds and geotorch's orthogonal constraint are for real
# matrices (complex input fails or leaves the group); torch's takes both.
PEERS = (
    Peer(GEOOPT_CANONICAL_SGD, "geoopt", True, _geoopt(True, "RiemannianSGD")),
    Peer(GEOOPT_CANONICAL_ADAM, "geoopt", True, _geoopt(True, "RiemannianAdam")),
    Peer(GEOOPT_EUCLIDEAN_SGD, "geoopt", True, _geoopt(False, "RiemannianSGD")),
    Peer(GEOOPT_EUCLIDEAN_ADAM, "geoopt", True, _geoopt(False, "RiemannianAdam")),
    Peer(GEOTORCH_ORTHOGONAL, "geotorch", True, _parametrized(_geotorch_orthogonal)),
    Peer(TORCH_MATRIX_EXP, "torch", False, _parametrized(_torch_orthogonal("matrix_exp"))),
    Peer(TORCH_CAYLEY, "torch", False, _parametrized(_torch_orthogonal("cayley"))),
)


def installed(package) -> bool:
    """Whether ``package`` imports (False also when a test has set
    ``sys.modules[package] = None``)."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def available_peers(complex_):
    """(peers that can run here, notes on the others)."""
    found, notes = [], []
    missing = [p for p in dict.fromkeys(peer.package for peer in PEERS) if not installed(p)]
    for package in missing:
        names = [peer.method for peer in PEERS if peer.package == package]
        notes.append(f"{package} is not installed (pip install {package}): not timed: {', '.join(names)}")
    for peer in PEERS:
        if peer.package in missing:
            continue
        if complex_ and peer.real_only:
            notes.append(f"{peer.method} skipped: {peer.package} takes real matrices only")
            continue
        found.append(peer)
    return found, notes


def rmsprop(W, G, lr):
    """A plain ``torch.optim.RMSprop`` step on an n x n parameter holding W."""
    torch = importlib.import_module("torch")
    param = torch.nn.Parameter(W.clone())
    opt = torch.optim.RMSprop([param], lr=lr)

    def step():
        param.grad = G  # read only, like ProjUNN's: no copy
        opt.step()
        return param.detach()

    return Stepper(step, param.detach)


def projunn_rmsprop(W, G, lr, *, rank, seed):
    """``ProjUNN(base="rmsprop", rank=rank)`` on W as a parameter marked
    unitary: at the bench's ``--ranks`` (default 1), not at ProjUNN's own
    default rank (8); its defaults otherwise, drift checks included."""
    from ..torch import ProjUNN, unitary_parameter

    param = unitary_parameter(W)  # a copy, marked unitary
    opt = ProjUNN([param], lr=lr, base="rmsprop", rank=rank, seed=seed)

    def step():
        param.grad = G
        opt.step()
        return param.detach()

    return Stepper(step, param.detach)


def rmsprop_graph(W, G, lr):
    """``torch.optim.RMSprop(capturable=True)`` on an n x n parameter holding
    W, one step captured in a CUDA graph (see :func:`_captured`)."""
    torch = importlib.import_module("torch")
    return _captured(lambda param: torch.optim.RMSprop([param], lr=lr, capturable=True),
                     torch.nn.Parameter(W.clone()), G)


def projunn_rmsprop_graph(W, G, lr, *, rank, seed):
    """``ProjUNN(base="rmsprop", rank=rank, capturable=True)`` on W marked
    unitary, at the bench's ``--ranks`` as :func:`projunn_rmsprop` (its
    defaults otherwise, drift checks included), one step captured in a CUDA
    graph (see :func:`_captured`)."""
    from ..torch import ProjUNN, unitary_parameter

    return _captured(lambda param: ProjUNN([param], lr=lr, base="rmsprop", rank=rank, seed=seed, capturable=True),
                     unitary_parameter(W), G)


# Eager steps before the capture: they make the optimizer's state (which a
# graph must find, not create) and warm the allocator and the libraries up.
_WARMUP_STEPS = 3


def _captured(make_optimizer, param, G):
    """One step of ``make_optimizer(param)`` captured in a CUDA graph, as
    PyTorch's whole-network recipe captures a training step: the gradient is
    a static tensor (a copy of G), the warm-up runs on a side stream, and
    each ``step()`` replays the graph, which advances the parameter and the
    state in their own memory."""
    torch = importlib.import_module("torch")
    opt = make_optimizer(param)
    param.grad = G.clone()
    side = torch.cuda.Stream(device=param.device)
    side.wait_stream(torch.cuda.current_stream(param.device))
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_STEPS):
            opt.step()
    torch.cuda.current_stream(param.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()

    def step():
        graph.replay()
        return param.detach()

    return Stepper(step, param.detach)


def jitted_floor(G, x, W, u, v):
    """The floor as one jitted JAX program: ``G @ x`` and ``W + u v^H`` (XLA
    fuses the sum into the product's output), to compare jitted updates with."""
    jax = importlib.import_module("jax")
    floor = jax.jit(lambda G, x, W, u, v: (G @ x, W + u @ v.conj().T))
    return lambda: floor(G, x, W, u, v)


def optax_rmsprop(W, G, lr):
    """A jitted ``optax.rmsprop`` update of a parameter holding W."""
    optax = importlib.import_module("optax")
    return _optax_stepper(optax.rmsprop(lr), W, G)


def optax_projunn(W, G, lr, *, rank, seed):
    """A jitted ``unitary_lr.optax.projunn(base="rmsprop", rank=rank)`` update
    of W marked unitary, at the bench's ``--ranks`` as :func:`projunn_rmsprop`;
    its defaults otherwise (drift checks included)."""
    from ..optax import projunn

    return _optax_stepper(projunn(lr, unitary={"W": True}, base="rmsprop", rank=rank, seed=seed), W, G)


def _optax_stepper(optimizer, W, G):
    """``jax.jit(optimizer.update)`` with the gradient G at the point W; each
    step carries the optimizer state on (the parameter stays W, so that every
    step does the same work); ``point()`` is where the last update leads."""
    jax = importlib.import_module("jax")
    params, grads = {"W": W}, {"W": G}
    update = jax.jit(optimizer.update)
    carried = {"state": optimizer.init(params), "update": None}

    def step():
        updates, carried["state"] = update(grads, carried["state"], params)
        carried["update"] = updates["W"]
        return updates["W"]

    return Stepper(step, lambda: W + carried["update"])


def versions(packages):
    """{package: version} of the peer packages a run timed."""
    return {p: getattr(importlib.import_module(p), "__version__", None) for p in dict.fromkeys(packages)}
