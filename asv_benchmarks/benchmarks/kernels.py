"""The public kernels, one class each: randomized_svd, project_unitary (SVD and
Newton-Schulz), project_unitary_lowrank, exp_transport and unitarity_error.

Every timed function waits for the device (``_support.block``) before it
returns, so GPU timings include the work and not just its dispatch.
"""

import numpy as np

from unitary_lr import (
    exp_transport,
    project_unitary,
    project_unitary_lowrank,
    randomized_svd,
    unitarity_error,
)
from unitary_lr._host import to_host

from ._support import (
    BACKENDS,
    DTYPES,
    LEARNING_RATE,
    OVERSAMPLE,
    POWER_ITERS,
    RANKS,
    SIZES,
    TIMEOUT,
    block,
    host_gaussian,
    host_known_spectrum,
    host_unitary,
    is_complex,
    load,
    optimal_error,
    skip_dense_on_cpu,
    to_device,
)


class RandomizedSVD:
    """``randomized_svd(A, k)`` with its default sketch (oversample 10, two
    power iterations) on an n x n matrix with singular values 1/j."""

    params = (SIZES, RANKS, DTYPES, BACKENDS)
    param_names = ("n", "k", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, k, dtype, backend):
        self.backend = load(backend, dtype)
        self.A = to_device(self.backend, host_known_spectrum(np.random.default_rng(0), n, dtype), dtype)
        self.rng = np.random.default_rng(1)

    def time_randomized_svd(self, n, k, dtype, backend):
        result = randomized_svd(self.A, k, oversample=OVERSAMPLE, power_iters=POWER_ITERS, rng=self.rng)
        block(self.backend, tuple(result))

    def track_relative_error(self, n, k, dtype, backend):
        """||A - U S V^H||_F over the optimal rank-k error ||A - A_k||_F (>= 1;
        1 is optimal), on the host in float64 (complex128), as ``unitary-lr
        bench`` measures it: torch's float32 norm of an n x n residual on a CPU
        is off by some 1e-4 and reads below the optimum."""
        xp = self.backend.xp
        U, S, Vh = randomized_svd(self.A, k, oversample=OVERSAMPLE, power_iters=POWER_ITERS, rng=2)
        wide = np.complex128 if is_complex(dtype) else np.float64
        A, U, S, Vh = (to_host(xp, x).astype(wide) for x in (self.A, U, S, Vh))
        return float(np.linalg.norm(A - (U * S[None, :]) @ Vh)) / optimal_error(n, k)

    track_relative_error.unit = "error / optimal rank-k error"


class ProjectUnitary:
    """Dense polar factor of a drifted unitary matrix ``W - lr G``, O(n^3): the
    re-projection the adapters run when W has drifted, by both methods."""

    params = (SIZES, DTYPES, BACKENDS)
    param_names = ("n", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, dtype, backend):
        self.backend = load(backend, dtype)
        skip_dense_on_cpu(self.backend, n, "project_unitary")
        rng = np.random.default_rng(0)
        W = host_unitary(rng, n, dtype)
        G = host_gaussian(rng, (n, n), dtype, scale=n**-0.5)
        self.A = to_device(self.backend, W - LEARNING_RATE * G, dtype)

    def time_svd(self, n, dtype, backend):
        block(self.backend, project_unitary(self.A, method="svd"))

    def time_newton_schulz(self, n, dtype, backend):
        block(self.backend, project_unitary(self.A, method="newton_schulz"))


class _UnitaryAndFactors:
    """Inputs of the two step kernels: a unitary W and thin factors a, b of the
    size of a step's update (``a_scale`` times a rank-k matrix of norm ~ 1)."""

    params = (SIZES, RANKS, DTYPES, BACKENDS)
    param_names = ("n", "k", "dtype", "backend")
    timeout = TIMEOUT
    a_scale = 1.0

    def setup(self, n, k, dtype, backend):
        self.backend = load(backend, dtype)
        rng = np.random.default_rng(0)
        self.W = to_device(self.backend, host_unitary(rng, n, dtype), dtype)
        self.a = to_device(self.backend, host_gaussian(rng, (n, k), dtype, scale=self.a_scale / n**0.5), dtype)
        self.b = to_device(self.backend, host_gaussian(rng, (n, k), dtype, scale=n**-0.5), dtype)


class ProjectUnitaryLowrank(_UnitaryAndFactors):
    """``project_unitary_lowrank(W, a, b)``: the projUNN-D core, O(k n^2)."""

    a_scale = -LEARNING_RATE  # W - lr G_k

    def time_project_unitary_lowrank(self, n, k, dtype, backend):
        block(self.backend, project_unitary_lowrank(self.W, self.a, self.b))


class ExpTransport(_UnitaryAndFactors):
    """``exp_transport(W, a, b, t)``: the projUNN-T core, O(k n^2)."""

    def time_exp_transport(self, n, k, dtype, backend):
        block(self.backend, exp_transport(self.W, self.a, self.b, t=-LEARNING_RATE / 2))


class UnitarityError:
    """``unitarity_error(W)``: one dense W^H W product, O(n^3)."""

    params = (SIZES, DTYPES, BACKENDS)
    param_names = ("n", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, dtype, backend):
        self.backend = load(backend, dtype)
        skip_dense_on_cpu(self.backend, n, "unitarity_error")
        self.W = to_device(self.backend, host_unitary(np.random.default_rng(0), n, dtype), dtype)

    def time_unitarity_error(self, n, dtype, backend):
        block(self.backend, unitarity_error(self.W))
