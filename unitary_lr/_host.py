"""Moving the small matrices of a step between the device and the host (floor 1).

A low-rank step reduces every n x n question to a few r x r ones (r <= 2k + 2p).
On a GPU each small factorization done by the device's LAPACK costs a kernel
launch or more and often a stream synchronisation, which is far more than the
O(k n^2) work of the step itself. So an eager step gathers all its small
matrices, moves them to the host in one transfer, factors them there in
float64 with NumPy, and moves the results back in one transfer.

This is the one place, besides ``_backends``, that knows array libraries by
name: a CUDA tensor or a CuPy array cannot be read through DLPack on the host,
and the fast way to read it is the library's own. Everything else goes
through ``numpy.from_dlpack``.

Inside a traced program (``jax.jit``, ``torch.compile``, CUDA-graph capture) a
host transfer is impossible or breaks the graph; :func:`is_traced` tells the
kernels to keep the small work on the device instead.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["from_host", "is_traced", "to_host", "transfers"]


class _Counter:
    """How many device-to-host transfers the library has made (tests read it:
    each one is a host synchronisation on an accelerator)."""

    count = 0


transfers = _Counter()


def to_host(xp, x) -> np.ndarray:
    """``x`` (any backend, any device) as a NumPy array; one transfer."""
    transfers.count += 1
    module = type(x).__module__.partition(".")[0]
    if module == "torch":
        return x.detach().cpu().resolve_conj().resolve_neg().numpy()
    if module == "cupy":
        return x.get()
    try:
        return np.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return np.asarray(x)


def from_host(xp, x: np.ndarray, *, dtype, device):
    """A NumPy array as an array of namespace ``xp`` with ``dtype`` on ``device``."""
    return xp.asarray(x, dtype=dtype, device=device)


def is_traced(x) -> bool:
    """Whether ``x`` is a placeholder of a traced program (a JAX tracer, a tensor
    under ``torch.compile``, or any tensor while a CUDA graph is being captured),
    whose values cannot be read on the host."""
    module = type(x).__module__.partition(".")[0]
    if module == "jax" or module == "jaxlib":
        jax_core = sys.modules.get("jax.core")
        return jax_core is not None and isinstance(x, jax_core.Tracer)
    if module == "torch":
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return True
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        # fake and functional tensors of torch's tracers, seen outside is_compiling
        return type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter
    return False
