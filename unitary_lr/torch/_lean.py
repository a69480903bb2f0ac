"""The eager rank-1 step of a square torch matrix, in few Python calls
(private; PyTorch's fast path, taken by ``steps.update_drawn`` through
``_host.lean_factors`` for ``projunn_step``, ``projunn_update`` and the torch
optimizer alike; measured in docs/benchmarks.md, "A lean eager rank-1 step").

On a GPU an eager step costs what its host side costs, and on the CPU a step
at n <= 256 is all fixed cost: the library's general step (``steps`` and
``_flow``, written once for every library, batch shape, dtype, device,
variant and rank) makes again at every step its decisions on layouts,
dtypes, devices and batch shapes, some 500 Python calls. For the case that
most unitary parameters of a network take at every step (one matrix, square,
rank 1, a float32 or complex64 W whose small cores are float64 on its
device, no trace) the decisions are made once here, and the step is the
general one's operations, in the same order and forms, so the factors are
the same bit for bit (``tests/test_torch_lean.py``).

Anything out of the ordinary (NaN or Inf, a W that is not unitary, panels
whose columns need balancing) returns None after the host read, having
changed nothing; ``update_drawn`` then runs the general step on the same
sketch draw, which reports or handles it. The sketch's generator advances
once either way.
"""

from __future__ import annotations

import math

import array_api_compat.torch
import numpy as np
import torch

from .._cores import drop_tolerance, host_xp
from .._flow import _apply_right, _right_core_tiny, needs_balancing, newton_schulz_count
from .._host import from_host, from_host_stack, to_host
from .._xp import adjoint_matmul, matmul_panel, real_finfo, supports_float64

__all__ = ["lean_factors", "takes_lean_step"]

_XP = array_api_compat.torch
_CORE = {torch.float32: torch.float64, torch.complex64: torch.complex128}
_HOST_DTYPE = {torch.float32: np.float32, torch.complex64: np.complex64}
_CORE_EPS = float(np.finfo(np.float64).eps)


def takes_lean_step(W, direction, omega_shape):
    """Whether this step is the lean one's case: W and the direction 2-D,
    square, of one dtype (float32 or complex64) on a device with float64,
    no trace; a one-column sketch (rank 1, no oversampling)."""
    return (type(direction) is torch.Tensor and type(W) is torch.Tensor
            and omega_shape is not None and omega_shape[-1] == 1 and W.ndim == 2 and direction.ndim == 2
            and W.shape[0] == W.shape[1] and direction.dtype == W.dtype and W.dtype in _CORE
            and not torch.compiler.is_compiling()
            and not (W.is_cuda and torch.cuda.is_current_stream_capturing())
            and supports_float64(_XP, W.device))


def lean_factors(W, G, host_draw, *, lr, variant, power_iters):
    """(L, Rh) of the step of W along ``-lr G`` (the new W is W + L Rh), as
    ``steps.update_drawn`` gives them for the sketch ``host_draw`` (the host
    draw (1, n) of :func:`steps.sketch_draw`), or None where the general step
    must decide (see the module's docstring). Only for
    :func:`takes_lean_step`'s case and a checked ``lr`` (a float)."""
    dtype = W.dtype
    eps, tiny = real_finfo(_XP, dtype)
    # the sketch, as _host.sketch_from_host and _flow.sketch_panels make it
    omega = from_host(_XP, host_draw, dtype=dtype, device=W.device).mT
    Y = matmul_panel(_XP, G, omega)
    s = torch.linalg.vector_norm(Y, ord=math.inf, dim=(-2, -1), keepdim=True) + tiny
    Y = Y / s
    Z = adjoint_matmul(_XP, G, Y)
    for _ in range(power_iters):
        Y = matmul_panel(_XP, G, Z / s) / s
        Z = adjoint_matmul(_XP, G, Y)
    # the panels [Y, Z, W^H Y] and their Gram in the cores' dtype, on the host
    F = torch.cat([Y, Z, adjoint_matmul(_XP, W, Y)], -1)
    wide = F.to(_CORE[dtype])
    C = to_host(_XP, wide.mH @ wide)
    if not np.isfinite(C).all():
        return None
    try:
        # NumPy's warnings on the host cores' rare overflow, which the general
        # step silences too (``_flow.checked``): its result is checked
        with np.errstate(all="ignore"):
            T, D, spread = _right_core_tiny(host_xp, C, [], lr=lr, variant=variant, sketched=True,
                                            tol=drop_tolerance(W.shape[-1], eps, _CORE_EPS), core_eps=_CORE_EPS)
    except ValueError:  # W is not unitary, or a core failed: the general step says so
        return None
    steps = newton_schulz_count(spread, 2, eps, _CORE_EPS)
    if needs_balancing((C[1, 1].real, C[2, 2].real)):  # the columns of [Z, W^H Y]
        return None
    D = D.tolist() if hasattr(D, "shape") else D
    T, D = from_host_stack(_XP, np.asarray((T, D), dtype=_HOST_DTYPE[dtype]), dtype=dtype, device=W.device)
    return _apply_right(_XP, W, F[..., 1:], T, D, steps)
