"""projUNN steps, every registered variant: time, peak memory, and accuracy.

``ProjunnStep`` times one ``projunn_step(W, G)`` on a dense n x n gradient
with the step's default sketch, and records the process's peak resident
memory (``peakmem_``). ``RectangularStep`` times the same step on an n x m W
with orthonormal columns (m = n/16 and n/4: 4096 x 256 and 4096 x 1024), and
``DenseCayleyStep`` the O(n^3) Cayley step of full-capacity unitary RNNs that
the low-rank ``variant="cayley"`` replaces. ``StepExtraMemory`` measures what the issue's target is
about, the memory a step allocates beyond W, G and its output, with
``tracemalloc`` (which sees NumPy's allocations: NumPy only).
``StepAccuracy`` tracks how far W drifts from the group in 100 steps.
"""

import tracemalloc

import numpy as np

from unitary_lr import projunn_step, unitarity_error

from ._support import (
    BACKENDS,
    BASES,
    DTYPES,
    LEARNING_RATE,
    RANKS,
    SIZES,
    TIMEOUT,
    VARIANTS,
    block,
    host_gaussian,
    host_unitary,
    load,
    skip_dense_on_cpu,
    to_device,
)

# the widths of RectangularStep, as fractions of n (asv parameters must be plain values)
COLUMNS = {"n/16": 16, "n/4": 4}


def _step_data(backend, n, dtype):
    """A dense unitary W and a Gaussian gradient G with ||G||_2 ~ 2 on the device."""
    rng = np.random.default_rng(0)
    W = to_device(backend, host_unitary(rng, n, dtype), dtype)
    G = to_device(backend, host_gaussian(rng, (n, n), dtype, scale=n**-0.5), dtype)
    return W, G


class ProjunnStep:
    """One projUNN step, W <- step(W, G), O(k n^2)."""

    params = (SIZES, RANKS, DTYPES, VARIANTS, BACKENDS)
    param_names = ("n", "k", "dtype", "variant", "backend")
    timeout = TIMEOUT

    def setup(self, n, k, dtype, variant, backend):
        self.backend = load(backend, dtype)
        self.W, self.G = _step_data(self.backend, n, dtype)
        self.rng = np.random.default_rng(1)  # a fresh sketch every call, as in training

    def time_step(self, n, k, dtype, variant, backend):
        W = projunn_step(self.W, self.G, lr=LEARNING_RATE, rank=k, variant=variant, rng=self.rng)
        block(self.backend, W)

    def peakmem_step(self, n, k, dtype, variant, backend):
        # The peak resident memory of the whole process (setup's W and G
        # included): compare it across n and k, and against 3 n^2 itemsize.
        W = projunn_step(self.W, self.G, lr=LEARNING_RATE, rank=k, variant=variant, rng=self.rng)
        block(self.backend, W)


class RectangularStep:
    """One projUNN step on an n x m W with orthonormal columns and an n x m
    gradient, O(k n m): compare with ProjunnStep at the same n."""

    params = (SIZES, list(COLUMNS), RANKS, DTYPES, VARIANTS, BACKENDS)
    param_names = ("n", "m", "k", "dtype", "variant", "backend")
    timeout = TIMEOUT

    def setup(self, n, m, k, dtype, variant, backend):
        self.backend = load(backend, dtype)
        rng = np.random.default_rng(0)
        columns = n // COLUMNS[m]
        # the first m columns of a dense unitary: orthonormal columns, built in O(n^2)
        self.W = to_device(self.backend, host_unitary(rng, n, dtype)[:, :columns], dtype)
        self.G = to_device(self.backend, host_gaussian(rng, (n, columns), dtype, scale=n**-0.5), dtype)
        self.rng = np.random.default_rng(1)

    def time_step(self, n, m, k, dtype, variant, backend):
        W = projunn_step(self.W, self.G, lr=LEARNING_RATE, rank=k, variant=variant, rng=self.rng)
        block(self.backend, W)


class DenseCayleyStep:
    """The Cayley step as published (Wisdom et al. 2016), O(n^3):
    ``solve(I + lr/2 A, (I - lr/2 A) W)`` with A = G W^H - W G^H, in the
    backend's own linalg; the baseline of ``projunn_step(variant="cayley")``."""

    params = (SIZES, DTYPES, BACKENDS)
    param_names = ("n", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, dtype, backend):
        self.backend = load(backend, dtype)
        skip_dense_on_cpu(self.backend, n, "the dense Cayley step")
        self.W, self.G = _step_data(self.backend, n, dtype)
        xp = self.backend.xp
        self.eye = xp.eye(n, dtype=self.W.dtype, device=self.backend.device)

    def cayley(self):
        """The step's result (not a benchmark: no asv prefix)."""
        xp = self.backend.xp
        S = self.G @ xp.conj(xp.matrix_transpose(self.W))  # A = S - S^H: one O(n^3) product, not two
        A = (LEARNING_RATE / 2) * (S - xp.conj(xp.matrix_transpose(S)))
        return xp.linalg.solve(self.eye + A, self.W - A @ self.W)

    def time_step(self, n, dtype, backend):
        block(self.backend, self.cayley())


class StepExtraMemory:
    """Peak bytes a step allocates beyond its n x n output (W and G exist
    before): O(n k) when the step makes no n x n temporaries."""

    params = (SIZES, RANKS, DTYPES, VARIANTS, BACKENDS)
    param_names = ("n", "k", "dtype", "variant", "backend")
    timeout = TIMEOUT

    def setup(self, n, k, dtype, variant, backend):
        if backend != "numpy":
            raise NotImplementedError("tracemalloc sees NumPy's allocations only")
        self.backend = load(backend, dtype)
        self.W, self.G = _step_data(self.backend, n, dtype)

    def track_extra_memory(self, n, k, dtype, variant, backend):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            W = projunn_step(self.W, self.G, lr=LEARNING_RATE, rank=k, variant=variant, rng=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak - before - W.nbytes

    track_extra_memory.unit = "bytes"


class StepAccuracy:
    """``unitarity_error(W)`` after 100 steps from a unitary W: the drift the
    adapters correct by re-projection (float32: ~1e-7 per step; float64: none
    that accumulates)."""

    params = (SIZES, RANKS, DTYPES, VARIANTS, BACKENDS)
    param_names = ("n", "k", "dtype", "variant", "backend")
    timeout = TIMEOUT

    def setup(self, n, k, dtype, variant, backend):
        self.backend = load(backend, dtype)
        # 100 steps and the O(n^3) check take minutes at n = 4096 on a CPU
        skip_dense_on_cpu(self.backend, n, "100 steps and unitarity_error")
        self.W, self.G = _step_data(self.backend, n, dtype)

    def track_unitarity_after_100_steps(self, n, k, dtype, variant, backend):
        W, rng = self.W, np.random.default_rng(1)
        for _ in range(100):
            W = projunn_step(W, self.G, lr=LEARNING_RATE, rank=k, variant=variant, rng=rng)
        return float(unitarity_error(W))

    track_unitarity_after_100_steps.unit = "||W^H W - I||_F / sqrt(n)"


class TorchOptimizerStep:
    """``unitary_lr.torch.ProjUNN.step()`` for one unitary parameter: the
    gradient check, the base rule, the sketch and the projUNN step applied in
    place (``addmm_``), without drift checks. Compare with ProjunnStep on torch,
    which returns a new matrix."""

    params = (SIZES, ["float32", "float64", "complex64", "complex128"], VARIANTS, BASES)
    param_names = ("n", "dtype", "variant", "base")
    timeout = TIMEOUT

    def setup(self, n, dtype, variant, base):
        backend = load("torch", dtype)
        import torch

        from unitary_lr.torch import ProjUNN, unitary_parameter

        self.backend = backend
        W, G = _step_data(backend, n, dtype)
        self.W = unitary_parameter(W)
        self.W.grad = G
        # rank 1, the optimizer's default before it became 8: the series stays comparable
        self.opt = ProjUNN([self.W], lr=LEARNING_RATE, base=base, rank=1, variant=variant, seed=0,
                           drift_check_every=0)
        self.torch = torch

    def time_step(self, n, dtype, variant, base):
        self.opt.step()
        block(self.backend, self.W.detach())


class TorchOptimizerStacked:
    """``ProjUNN.step()`` for eight unitary parameters of one shape, stepped
    one by one (``foreach=False``) or as one batched step (``foreach=True``:
    one host round trip for all eight, at the price of stacking them). The
    default rank (8). On a GPU the batched step saves seven synchronisations."""

    params = ([64, 128, 256, 512], [False, True])
    param_names = ("n", "foreach")
    timeout = TIMEOUT

    def setup(self, n, foreach):
        self.backend = load("torch", "float32")
        import torch

        from unitary_lr.torch import ProjUNN, unitary_parameter

        self.params = []
        for p in range(8):
            W, G = _step_data(self.backend, n, "float32")
            W = unitary_parameter(W)
            W.grad = G
            self.params.append(W)
        self.opt = ProjUNN([{"params": self.params, "unitary": True}], lr=LEARNING_RATE, base="rmsprop",
                           seed=0, drift_check_every=0, foreach=foreach)
        self.opt.step()
        self.torch = torch

    def time_step(self, n, foreach):
        self.opt.step()
        block(self.backend, self.params[-1].detach())



class OptimStepMany:
    """The framework-free ``ProjUNN.step_many`` for eight unitary matrices of
    one shape, stepped one by one (``foreach=False``) or as one batched step
    (``foreach=True``: one host round trip for all eight). The default rank
    (8). NumPy on the CPU; CuPy where a GPU is (each separate step is a
    stream synchronisation there)."""

    params = ([64, 128, 256, 512], [False, True], ["numpy", "cupy"])
    param_names = ("n", "foreach", "backend")
    timeout = TIMEOUT

    def setup(self, n, foreach, backend):
        from unitary_lr.optim import ProjUNN

        self.backend = load(backend, "float32")
        self.data = {p: _step_data(self.backend, n, "float32") for p in range(8)}
        self.opt = ProjUNN(LEARNING_RATE, base="rmsprop", seed=0, drift_check_every=0, foreach=foreach)
        self.step()

    def step(self):
        new = self.opt.step_many(self.data)
        self.data = {p: (W, self.data[p][1]) for p, W in new.items()}
        return new

    def time_step_many(self, n, foreach, backend):
        block(self.backend, self.step()[7])
