"""The eager rank-1 step of one square matrix on the host, in NumPy (private;
the host's fast path, taken by ``steps.update_drawn`` through
``_host.lean_factors`` for NumPy arrays and for PyTorch CPU tensors, through
their NumPy views; measured in docs/benchmarks.md, "The host's lean step").

At n <= 256 a step on the CPU is nearly all fixed cost. The general step
(``steps`` and ``_flow``, written once for every library, batch shape,
dtype, device, variant and rank) makes again at every step its decisions on
layouts, dtypes, devices and batch shapes, some 500 Python calls; and an
operation of PyTorch's CPU backend costs 5-10 us of dispatch where NumPy's
costs 1-3 us (the same products at n = 8: 304 against 55 us, one thread,
torch 2.13, NumPy 2.4). Here the step of one square matrix at rank 1 is the
general NumPy step's operations, in the same order and forms, its helpers'
choices made once: the factors are those of the general step on the same
NumPy arrays bit for bit (``tests/test_lean_numpy.py``). A small PyTorch
CPU tensor is stepped through its NumPy view (no copy), and its factors
come back as tensors on the NumPy results (no copy either; see
``_host.lean_factors``).

Anything out of the ordinary (NaN or Inf, a W that is not unitary, panels
whose columns need balancing) returns None after the host read, having
changed nothing; ``update_drawn`` then runs the general step on the same
sketch draw, which reports or handles it.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _xp
from ._cores import drop_tolerance, host_xp
from ._flow import _right_core_tiny, needs_balancing, newton_schulz_basis, newton_schulz_count
from ._xp import by_columns, namespace

__all__ = ["host_arrays", "lean_factors", "square_pair"]

# The host's dtypes and the dtype of their Gram and cores (float32 panels'
# Grams in float64, as ``_xp.core_dtype`` has them on the host).
_CORE = {np.dtype(np.float32): np.dtype(np.float64), np.dtype(np.complex64): np.dtype(np.complex128),
         np.dtype(np.float64): np.dtype(np.float64), np.dtype(np.complex128): np.dtype(np.complex128)}
_CORE_EPS = float(np.finfo(np.float64).eps)


@functools.cache
def _numpy_namespace():
    """The namespace the general step uses for NumPy arrays (for the rare
    Newton-Schulz steps, which take the general helper)."""
    return namespace(np.empty(0))


@functools.cache
def _finfo(dtype):
    """(eps, smallest normal) of a NumPy dtype, as Python floats."""
    info = np.finfo(dtype)
    return float(info.eps), float(info.smallest_normal)


def square_pair(W, G):
    """Whether W and G are two 2-D square NumPy arrays of one float dtype,
    not empty: a pair the step's arrays' checks would pass
    (``_host.lean_arrays``), whatever its size."""
    return (type(W) is np.ndarray and type(G) is np.ndarray and W.ndim == 2 and W.shape == G.shape
            and W.shape[0] == W.shape[1] and W.shape[0] > 0 and W.dtype == G.dtype and W.dtype in _CORE)


def host_arrays(W, G):
    """(W, G) where the pair is the lean host step's case, a
    :func:`square_pair` of arrays each smaller than the last-level cache
    (``_xp._BEYOND_CACHE_BYTES``: from there on the general step reads G and
    W block by block, see ``_xp.rows_beyond_cache`` and
    ``_xp.fuses_right_update``, which this step does not); else None.
    (``_host.lean_factors`` gives it PyTorch CPU tensors as their NumPy
    views.)"""
    if not (square_pair(W, G) and W.nbytes < _xp._BEYOND_CACHE_BYTES):
        return None
    return W, G


def lean_factors(W, G, host_draw, *, lr, variant, power_iters):
    """(L, Rh) of the step of the NumPy W along ``-lr G`` (the new W is
    W + L Rh), as ``steps.update_drawn`` gives them for the sketch
    ``host_draw`` (the host draw (1, n) of :func:`steps.sketch_draw`), or
    None where the general step must decide (see the module's docstring).
    Only for :func:`host_arrays`' pairs and a checked ``lr`` (a float)."""
    # NumPy's warnings on NaN, Inf and the cores' rare overflow, which the
    # general step silences too (``_flow.checked``): what they warn of is checked
    with np.errstate(all="ignore"):
        return _factors(W, G, host_draw, lr=lr, variant=variant, power_iters=power_iters)


def _adjoint(A, B):
    """``A^H B`` of a large A and one column B as ``_xp.adjoint_matmul`` makes
    it for NumPy: ``(B^H A)^H``."""
    if B.dtype.kind == "c":
        return np.conj((np.conj(B.mT) @ A).mT)
    return (B.mT @ A).mT


def _h(X):
    """``_xp.mH`` of a 2-D NumPy array."""
    return np.conj(X.mT) if X.dtype.kind == "c" else X.mT


def _factors(W, G, host_draw, *, lr, variant, power_iters):
    """:func:`lean_factors`, NumPy's warnings silenced. The general step's
    helpers (``_xp``, ``_flow``) are written out for two 2-D NumPy arrays:
    their forms, their choices made once."""
    dtype = W.dtype
    core = _CORE[dtype]
    eps, tiny = _finfo(dtype)
    # the sketch (_host.sketch_from_host, _flow.sketch_panels: one column)
    omega = np.asarray(host_draw, dtype=dtype).mT
    Y = G @ omega
    s = np.abs(Y).max(axis=(-2, -1), keepdims=True) + tiny
    Y = Y / s
    Z = _adjoint(G, Y)
    for _ in range(power_iters):
        Y = G @ (Z / s) / s
        Z = _adjoint(G, Y)
    # the panels [Y, Z, W^H Y] and their Gram (_flow._right_panels); a Gram
    # in the panels' own precision needs Z rescaled (_flow.prepare_panels)
    scales = []
    if core == dtype:
        top = np.abs(Z).max(axis=(-2, -1), keepdims=True) + tiny
        Z = Z / top
        scales.append(top.astype(core))
    F = np.concatenate([Y, Z, _adjoint(W, Y)], -1)
    wide = F.astype(core, copy=False)
    C = _h(wide) @ wide
    if not np.isfinite(C).all() or (scales and not np.isfinite(scales[0]).all()):
        return None
    try:
        T, D, spread = _right_core_tiny(host_xp, C, scales, lr=lr, variant=variant, sketched=True,
                                        tol=drop_tolerance(W.shape[-1], eps, _CORE_EPS), core_eps=_CORE_EPS)
    except ValueError:  # W is not unitary, or a core failed: the general step says so
        return None
    if needs_balancing((C[1, 1].real, C[2, 2].real)):  # the columns of [Z, W^H Y]
        return None
    D = D.tolist() if hasattr(D, "shape") else D
    T, D = np.asarray((T, D), dtype=dtype)
    # _flow._apply_right: Q = P T (_xp.panel_times_small), then W Q one
    # column at a time (_xp.matmul_panel: NumPy's BLAS pads two columns)
    steps = newton_schulz_count(spread, 2, eps, _CORE_EPS)
    P = F[..., 1:]
    Q = (T.mT @ P.mT).mT if not steps else newton_schulz_basis(_numpy_namespace(), P, T, steps)
    if by_columns(_numpy_namespace(), W, Q, "right"):
        return np.concatenate([W @ Q[:, :1], W @ Q[:, 1:]], -1) @ D, _h(Q)
    return W @ Q @ D, _h(Q)
