"""The eager rank-1 step of a square torch matrix, in few Python calls
(private; PyTorch's fast path, taken by ``steps.update_drawn`` through
``_host.lean_factors`` for ``projunn_step``, ``projunn_update`` and the torch
optimizer alike; measured in docs/benchmarks.md, "A lean eager rank-1 step").
It steps tensors on a GPU, CPU tensors above ``_host.TORCH_NUMPY_BYTES`` and,
where PyTorch runs several threads, complex CPU matrices of
``_host.TORCH_NUMPY_COMPLEX_ENTRIES`` entries or more: other CPU tensors
take the host's lean step through their NumPy views
(``unitary_lr/_lean_numpy.py``), whose operations cost a fraction of
PyTorch's CPU dispatch.

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

import functools
import math

import array_api_compat.torch
import numpy as np
import torch

from .._cores import drop_tolerance, host_xp
from .._flow import _right_core_tiny, needs_balancing, newton_schulz_basis, newton_schulz_count
from .._host import from_host, from_host_stack, to_host
from .._xp import adjoint_matmul, real_finfo, supports_float64

__all__ = ["lean_arrays", "lean_factors", "takes_lean_step"]

_XP = array_api_compat.torch
_CORE = {torch.float32: torch.float64, torch.complex64: torch.complex128}
_HOST_DTYPE = {torch.float32: np.float32, torch.complex64: np.complex64}
_CORE_EPS = float(np.finfo(np.float64).eps)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def _tiny(tiny):
    """The float ``tiny`` as a 0-d CPU tensor of the real dtype it belongs to
    (float32 here): a tensor plus a 0-d tensor is one plain dispatch, plus a
    Python float wraps the float first (4 against 8.5 us, one CPU thread,
    torch 2.13). The sum is the same number: ``tiny`` is a float32."""
    return torch.tensor(tiny, dtype=torch.float32)


def lean_arrays(W, G):
    """(W, G) without autograd history where the two arrays are already
    known good, the common case of the lean step's: two tensors (or
    parameters) of one of its dtypes, square, 2-D, not empty, on one device;
    None where ``steps`` is to check them in full (and name what is wrong).
    The checks that remain for the step's options and values are the
    general ones."""
    if not (type(W) in _TENSOR_TYPES and type(G) in _TENSOR_TYPES and W.ndim == 2 and W.shape == G.shape
            and W.dtype == G.dtype and W.dtype in _CORE and W.shape[0] == W.shape[1] and W.shape[0] > 0
            and W.device == G.device):
        return None
    return (W.detach() if W.requires_grad else W), (G.detach() if G.requires_grad else G)


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
    dtype, device = W.dtype, W.device
    eps, tiny = real_finfo(_XP, dtype)
    # the general step's operations written out, its helpers' choices for a
    # square 2-D tensor made here once (each helper costs 1-3 us of Python)
    if W.is_complex():
        def adjoint(A, B):
            return adjoint_matmul(_XP, A, B)
    else:
        def adjoint(A, B):  # (B^T A)^T, as adjoint_matmul has it for real tensors
            return (B.mT @ A).mT
    # the sketch, as _host.sketch_from_host and _flow.sketch_panels make it
    omega = from_host(_XP, host_draw, dtype=dtype, device=device).mT
    def largest(Y):  # a panel's largest entry, + tiny: a zero panel stays zero
        return torch.linalg.vector_norm(Y, ord=math.inf, dim=(-2, -1), keepdim=True) + _tiny(tiny)

    Y = G @ omega  # _xp.matmul_panel of one column
    s = largest(Y)
    Y = Y / s
    Z = adjoint(G, Y)
    for _ in range(power_iters):  # each panel by its own largest entry (see _flow.sketch_panels)
        Y = G @ (Z / s)
        Y = Y / largest(Y)
        Z = adjoint(G, Y)
    # the panels [Y, Z, W^H Y] and their Gram in the cores' dtype, on the host
    F = torch.cat([Y, Z, adjoint(W, Y)], -1)
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
    T, D = from_host_stack(_XP, np.asarray((T, D), dtype=_HOST_DTYPE[dtype]), dtype=dtype, device=device)
    # _flow._apply_right: Q = P T, then (L, Rh) = ((W Q) D, Q^H), W Q as
    # _xp.matmul_panel makes a product with a two-column panel
    Q = (T.mT @ F[..., 1:].mT).mT if not steps else newton_schulz_basis(_XP, F[..., 1:], T, steps)
    return (Q.mT @ W.mT).mT @ D, Q.mH
