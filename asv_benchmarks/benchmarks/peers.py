"""The O(n^3) steps users take without unitary_lr, next to a projUNN-T step.

The same peers as ``unitary-lr bench --peers`` (built by
``unitary_lr.cli._peers``): geoopt's Stiefel manifolds with RiemannianSGD and
RiemannianAdam, geotorch's ``orthogonal`` and torch's orthogonal
parametrization (``matrix_exp``, ``cayley``) as forward + backward + SGD, on
the same W, G and learning rate as ``projunn_step(W, G, rank=1)`` on torch
tensors. A peer whose package is not installed is skipped (NotImplementedError
from setup). Each call steps the peer's parameter in place: one step of a
training run. PyTorch on the first CUDA GPU when there is one, else the CPU.
"""

import numpy as np

from unitary_lr import projunn_step

from ._support import LEARNING_RATE, TIMEOUT, block, host_gaussian, host_unitary, load, to_device

PROJUNN_T = "projUNN-T k=1"
# Spelled out (the test suite checks them against _peers.PEERS), so that the
# suite still imports against a unitary_lr older than the peers
METHODS = [
    PROJUNN_T,
    "geoopt Stiefel + RiemannianSGD",
    "geoopt Stiefel + RiemannianAdam",
    "geoopt EuclideanStiefel + RiemannianSGD",
    "geoopt EuclideanStiefel + RiemannianAdam",
    "geotorch orthogonal + SGD",
    "torch orthogonal matrix_exp + SGD",
    "torch orthogonal cayley + SGD",
]


def _peer(method):
    """The peer named ``method`` (None for the projUNN-T reference), or
    NotImplementedError (asv: skipped) when it cannot run here."""
    if method == PROJUNN_T:
        return None
    try:
        from unitary_lr.cli import _peers
    except ImportError:
        raise NotImplementedError("this unitary_lr has no unitary_lr.cli._peers") from None
    peer = next(p for p in _peers.PEERS if p.method == method)
    if not _peers.installed(peer.package):
        raise NotImplementedError(f"{peer.package} is not installed (pip install {peer.package})")
    return peer


class PeerSteps:
    """One optimizer step per call: a peer's, or projunn_step's for reference."""

    params = ([256, 1024], ["float32", "float64"], METHODS)
    param_names = ("n", "dtype", "method")
    timeout = TIMEOUT

    def setup(self, n, dtype, method):
        peer = _peer(method)
        self.backend = load("torch", dtype)
        rng = np.random.default_rng(0)
        self.W = to_device(self.backend, host_unitary(rng, n, dtype), dtype)
        self.G = to_device(self.backend, host_gaussian(rng, (n, n), dtype, scale=n**-0.5), dtype)
        if peer is None:
            sketches = np.random.default_rng(1)
            self.call = lambda: projunn_step(self.W, self.G, lr=LEARNING_RATE, rank=1, rng=sketches)
        else:
            self.call = peer.build(self.W, self.G, LEARNING_RATE).step

    def time_step(self, n, dtype, method):
        block(self.backend, self.call())
