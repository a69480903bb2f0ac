"""What every benchmark class shares: the parameter grid, loading a backend (or
skipping it), test matrices and device synchronisation.

Nothing here is a benchmark: asv finds benchmarks by the ``time_``,
``peakmem_`` and ``track_`` prefixes, so no name in this module starts with one.

Backends and devices. ``numpy`` runs on the CPU; ``torch`` on the first CUDA
GPU when there is one, else on the CPU; ``jax`` on its default device (a GPU
with a CUDA build of jaxlib); ``cupy`` on GPU 0. A backend that is not
installed, or has no usable device, is skipped by raising NotImplementedError
from ``setup``: asv's documented way to skip a parameter combination (it is
reported as skipped, not failed). The dense O(n^3) kernels are skipped the same
way above ``DENSE_MAX_ON_CPU`` on a CPU, where n = 4096 would take minutes.

Test matrices are built on the host with NumPy in O(n^2) and moved to the
device, not drawn Haar-random (an O(n^3) QR that takes minutes at n = 4096 in
complex128): a product of Householder reflections and a diagonal of phases is
exactly unitary and dense. For a Gaussian gradient G the timing and accuracy of
every benchmark depend only on such distribution-invariant quantities
(``W^H G`` is Gaussian again for any unitary W), so nothing is lost.
"""

from __future__ import annotations

from unitary_lr import _benchdata as data
from unitary_lr._backends import BackendError, load_backend
from unitary_lr.optim import RULES
from unitary_lr.steps import VARIANTS as STEP_VARIANTS

SIZES = [256, 1024, 4096]
RANKS = [1, 8]
DTYPES = ["float32", "float64", "complex64", "complex128"]
BACKENDS = ["numpy", "torch", "jax", "cupy"]
# The registries: a step variant or base rule registered in the library is benchmarked with no change here.
VARIANTS = list(STEP_VARIANTS)
BASES = list(RULES)

# Largest n for the dense O(n^3) kernels on a CPU: an SVD of a 4096 x 4096
# complex128 matrix takes minutes on a few cores; on a GPU it takes seconds.
DENSE_MAX_ON_CPU = 1024

# A dense step with lr * ||G||_2 ~ 0.2: G has N(0, 1/n) entries, so ||G||_2 ~ 2.
LEARNING_RATE = 0.1

# The settings of randomized_svd's own defaults, benchmarked as such.
OVERSAMPLE = 10
POWER_ITERS = 2

# Generous: setup builds n x n matrices on the host before every sample.
TIMEOUT = 300


def load(name, dtype):
    """The loaded backend ``name`` (with its best device), or NotImplementedError
    (asv: skipped) when it is missing, has no device, or lacks ``dtype`` there."""
    backend = None
    if name == "torch":
        try:  # a GPU when there is one: that is what a torch user would time
            backend = load_backend("torch", device="cuda")
        except BackendError:
            backend = None
    if backend is None:
        try:
            backend = load_backend(name)
        except BackendError as error:
            raise NotImplementedError(f"{error}") from None
    available = backend.xp.__array_namespace_info__().dtypes(device=backend.device)
    if dtype not in available:
        raise NotImplementedError(f"dtype {dtype} is not available on {name} device {backend.device!r}")
    return backend


def on_gpu(backend) -> bool:
    """Whether the backend's device is an accelerator (CuPy, torch CUDA, JAX GPU)."""
    if backend.name == "cupy":
        return True
    if getattr(backend.device, "type", None) == "cuda":  # torch
        return True
    return getattr(backend.device, "platform", "cpu") != "cpu"  # jax; numpy's "cpu" has neither


def skip_dense_on_cpu(backend, n, what):
    """Skip (NotImplementedError) an O(n^3) benchmark that would take minutes."""
    if n > DENSE_MAX_ON_CPU and not on_gpu(backend):
        raise NotImplementedError(
            f"{what} is O(n^3); n = {n} > {DENSE_MAX_ON_CPU} takes minutes on a CPU"
        )


def block(backend, result):
    """Wait until ``result`` (an array or a tuple of arrays) is computed.

    JAX dispatches asynchronously on every device, so its arrays are waited on
    one by one; torch on CUDA and CuPy wait for the device's queue; NumPy and
    torch on the CPU compute eagerly.
    """
    if backend.name == "jax":
        for x in result if isinstance(result, tuple) else (result,):
            x.block_until_ready()
    else:
        backend.synchronize()


def to_device(backend, host, dtype):
    """A float64/complex128 NumPy array rounded to ``dtype`` and moved to the device."""
    xp = backend.xp
    return xp.asarray(host.astype(dtype), dtype=getattr(xp, dtype), device=backend.device)


def is_complex(dtype) -> bool:
    return dtype.startswith("complex")


def host_gaussian(rng, shape, dtype, scale=1.0):
    """Gaussian NumPy array (circular complex for a complex ``dtype``, E|z|^2 = 1)."""
    return data.gaussian(rng, shape, is_complex(dtype), scale)


def host_unitary(rng, n, dtype):
    """A dense unitary (orthogonal for a real dtype) NumPy matrix, in O(n^2)."""
    return data.unitary(rng, n, is_complex(dtype))


def host_known_spectrum(rng, n, dtype):
    """A dense NumPy matrix with singular values 1/j, in O(n^2)."""
    return data.known_spectrum(rng, n, is_complex(dtype))


optimal_error = data.optimal_error
