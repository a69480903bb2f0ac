"""Backend x dtype test matrix.

Every test that takes the ``backend`` fixture runs on: NumPy; array_api_strict
on a non-default device (an array created on the default device cannot be
combined with it, so a forgotten ``device=`` fails); array_api_strict's
``no_float64`` device (32-bit dtypes only: it proves the float32 fallback of
the small cores); PyTorch on the CPU; JAX on the CPU with x64 (immutable
arrays: any in-place write fails); CuPy where a GPU is present. Libraries that
are not installed are skipped with the reason.

Random inputs come from ``rng``, seeded from UNITARY_LR_TEST_SEED (default 0)
and the test's id, so a failure is reproducible and other seeds are one
environment variable away.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

try:  # x64 must be switched on before JAX creates any array
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - JAX is in the test extra
    jax = None

DTYPES = ("float32", "float64", "complex64", "complex128")
# "torch:cuda" and "jax:gpu" run where a GPU is (skipped elsewhere, as CuPy
# is): every kernel test then also covers the device code paths, the host
# round trips from device memory included (docs/scripts/gpu_targets.sh).
BACKENDS = ("numpy", "array_api_strict", "array_api_strict:no_float64", "torch", "jax", "cupy", "torch:cuda", "jax:gpu")
BASE_SEED = int(os.environ.get("UNITARY_LR_TEST_SEED", "0"))


@dataclass(frozen=True)
class Backend:
    """One column of the test matrix: how to make and read back its arrays."""

    name: str
    xp: Any  # the library's own namespace (numpy, torch, jax.numpy, ...)
    device: Any
    has_float64: bool
    _asarray: Callable[[np.ndarray], Any]
    _to_numpy: Callable[[Any], np.ndarray]

    def asarray(self, x, dtype=None):
        """A NumPy array (or number) as this backend's array on its device."""
        x = np.asarray(x)
        if dtype is not None:
            x = x.astype(dtype)
        return self._asarray(x)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(self._to_numpy(x))

    def dtype(self, name):
        return getattr(self.xp, name)

    @property
    def cli(self) -> list:
        """The ``unitary-lr`` options that select this backend and device."""
        library, _, device = self.name.partition(":")
        if library == "numpy":
            return []
        return ["--backend", library, *(["--device", device] if device else [])]

    def __repr__(self):
        return self.name


def _numpy():
    return Backend("numpy", np, "cpu", True, lambda x: x, lambda x: x)


def _strict(device_name):
    import array_api_strict as xs

    device = xs.Device(device_name)
    return Backend(
        f"array_api_strict:{device_name}",
        xs,
        device,
        device_name != "no_float64",
        lambda x: xs.asarray(x, device=device),
        lambda x: np.asarray(x.to_device(xs.Device("CPU_DEVICE"))),
    )


def _torch(kind="cpu"):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    # the index too: arrays report cuda:0, and torch.device("cuda") != torch.device("cuda:0")
    device = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    return Backend(
        "torch" if kind == "cpu" else f"torch:{kind}",
        torch,
        device,
        True,
        lambda x: torch.asarray(x, device=device),
        lambda x: x.detach().resolve_conj().cpu().numpy(),
    )


def _jax(platform="cpu"):
    if jax is None:
        pytest.skip("JAX is not installed")
    import jax.numpy as jnp

    try:
        device = jax.devices(platform)[0]
    except RuntimeError:  # no such platform here
        pytest.skip(f"JAX has no {platform} device")
    return Backend(
        "jax" if platform == "cpu" else f"jax:{platform}",
        jnp,
        device,
        True,
        lambda x: jax.device_put(jnp.asarray(x), device),
        np.asarray,
    )


def _cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # pragma: no cover - needs a GPU machine
        pytest.skip(f"CuPy has no usable GPU: {error}")
    if count == 0:  # pragma: no cover
        pytest.skip("CuPy sees no GPU")
    return Backend(  # pragma: no cover
        "cupy", cupy, cupy.cuda.Device(0), True, cupy.asarray, lambda x: x.get()
    )


_MAKERS = {
    "numpy": _numpy,
    "array_api_strict": lambda: _strict("device1"),
    "array_api_strict:no_float64": lambda: _strict("no_float64"),
    "torch": _torch,
    "jax": _jax,
    "cupy": _cupy,
    "torch:cuda": lambda: _torch("cuda"),
    "jax:gpu": lambda: _jax("gpu"),
}


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return _MAKERS[request.param]()


@pytest.fixture(params=DTYPES)
def dtype(request) -> str:
    return request.param


@pytest.fixture
def torch_operations():
    """PyTorch CPU tensors stepped by PyTorch's own operations, as GPU
    tensors are (by default small ones go through their NumPy views, see
    ``unitary_lr._host.TORCH_NUMPY_BYTES``): for the tests of those
    operations and of their counts, the CPU's stand-ins for a GPU's
    launches. A patch of its own, which a test's ``monkeypatch.undo()``
    leaves in place."""
    from unitary_lr import _host

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_host, "TORCH_NUMPY_BYTES", -1)
        patch.setattr(_host, "TORCH_NUMPY_BYTES_ONE_THREAD", -1)
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_jax_programs():
    """After each test module, JAX forgets the programs it compiled.

    Each XLA:CPU executable keeps about three memory mappings for as long as
    a cache holds it (the eager operations' caches, and the caches of the
    jitted functions a test keeps alive), and the suite compiles thousands
    of them in its one process (the README's command). Past the kernel's
    ``vm.max_map_count`` (65530 by default) the next compilation dies with a
    segmentation fault, which is how a full run ended at about 80 % of
    the way through."""
    yield
    if jax is not None:
        jax.clear_caches()


@pytest.fixture
def first_drift_checks(monkeypatch):
    """``watch(module)`` records, in the list it returns, the ``first`` flag
    of every drift check that ``module`` (``unitary_lr.torch.optimizer`` or
    ``unitary_lr.torch.retraction``) makes from then on: which steps counted
    as a first one."""
    def watch(module):
        from unitary_lr.optim import step_drift

        seen = []

        def spy(*args, first=None, **kwargs):
            seen.append(first)
            return step_drift(*args, first=first, **kwargs)

        monkeypatch.setattr(module, "step_drift", spy)
        return seen

    return watch


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng([BASE_SEED, zlib.crc32(request.node.nodeid.encode())])


def pytest_report_header(config):
    return f"unitary_lr test seed: UNITARY_LR_TEST_SEED={BASE_SEED}"


def pytest_collection_modifyitems(config, items):
    """Drop the (no_float64 device, 64-bit dtype) pairs: they do not exist, so
    they are not collected at all rather than reported as skips."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        if params.get("backend") == "array_api_strict:no_float64" and params.get("dtype") in (
            "float64",
            "complex128",
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
