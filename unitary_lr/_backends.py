"""Named backends for the command line and the benchmarks (floor 1).

This is the one place that imports array libraries by name; the kernels never
do. ``load_backend("torch", device="cuda")`` returns the library's Array API
namespace and a device object, or raises BackendError with a one-line reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ._xp import array_namespace

BACKEND_NAMES = ("numpy", "torch", "jax", "cupy", "array_api_strict")

_PACKAGES = {"numpy": "numpy", "torch": "torch", "jax": "jax", "cupy": "cupy", "array_api_strict": "array-api-strict"}


class BackendError(RuntimeError):
    """A backend or device that is not available here."""


@dataclass(frozen=True)
class LoadedBackend:
    name: str
    xp: Any  # Array API namespace (array_api_compat wrapper where needed)
    device: Any

    def synchronize(self):
        """Wait for queued device work (timings on GPUs); a no-op on the CPU."""
        if self.name == "torch" and getattr(self.device, "type", "cpu") == "cuda":
            importlib.import_module("torch").cuda.synchronize(self.device)
        elif self.name == "cupy":
            self.device.synchronize()


def load_backend(name: str, *, device: str | None = None, float64: bool = True) -> LoadedBackend:
    """Import backend ``name`` and resolve ``device`` (None: its default).

    ``float64=True`` switches on JAX's 64-bit mode, which 64-bit dtypes need.
    """
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise BackendError(f"backend {name!r} is not installed (pip install {_PACKAGES[name]})") from None
    if name == "jax":
        if float64:
            module.config.update("jax_enable_x64", True)
        numpy_like = importlib.import_module("jax.numpy")
    else:
        numpy_like = module
    try:
        xp = array_namespace(numpy_like.empty(0))
    except Exception as error:  # e.g. CuPy without a GPU
        raise BackendError(f"backend {name!r} cannot create arrays here: {error}") from None
    return LoadedBackend(name, xp, _resolve_device(name, module, xp, device))


def _resolve_device(name, module, xp, device):
    if device is None:
        return xp.__array_namespace_info__().default_device()
    try:
        if name == "numpy":
            if device != "cpu":
                raise ValueError
            return "cpu"
        if name == "torch":
            resolved = module.device(device)
            module.empty(0, device=resolved)  # raises if the device is not there
            return resolved
        if name == "jax":
            for candidate in module.devices():
                if device in (str(candidate), candidate.platform, f"{candidate.platform}:{candidate.id}"):
                    return candidate
            raise ValueError
        if name == "cupy":
            index = int(device.rpartition(":")[2]) if device not in ("cuda", "gpu") else 0
            if not 0 <= index < module.cuda.runtime.getDeviceCount():
                raise ValueError
            return module.cuda.Device(index)
        return module.Device(device)  # array_api_strict: CPU_DEVICE, device1, no_float64, ...
    except Exception:
        raise BackendError(f"device {device!r} is not available to {name} here") from None
