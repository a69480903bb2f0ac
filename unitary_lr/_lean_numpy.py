"""The eager step of one square matrix on the host, in NumPy, and the
randomized SVD of one matrix (private; the host's fast paths, taken by
``steps.update_drawn`` through ``_host.lean_factors`` and by
``rsvd.randomized_svd`` for NumPy arrays and for PyTorch CPU tensors,
through their NumPy views; measured in docs/benchmarks.md, "The host's lean
step", "The host's lean step of rank two and more" and "The host's lean
randomized SVD").

At n <= 256 a step on the CPU is nearly all fixed cost. The general step
(``steps`` and ``_flow``, written once for every library, batch shape,
dtype, device, variant and rank) makes again at every step its decisions on
layouts, dtypes, devices and batch shapes, some 500 Python calls; and an
operation of PyTorch's CPU backend costs 5-10 us of dispatch where NumPy's
costs 1-3 us (the same products at n = 8: 304 against 55 us, one thread,
torch 2.13, NumPy 2.4). Here the step of one square matrix is the general
NumPy step's operations, in the same order and forms, its helpers' choices
made once: the factors are those of the general step on the same NumPy
arrays bit for bit (``tests/test_lean_numpy.py``). At rank 1 the 2 x 2
cores are closed forms on Python numbers (``_flow._right_core_tiny``); a
sketch of two or more columns (rank 2 and more, or oversampled) calls the
general step's cores (``_flow._right_core``) as they are, and saves the
flow's decisions and transfers around them. A small PyTorch
CPU tensor is stepped through its NumPy view (no copy), and its factors
come back as tensors on the NumPy results (no copy either; see
``_host.lean_factors``).

Anything out of the ordinary (NaN or Inf, a W that is not unitary, panels
whose columns need balancing) returns None after the host read, having
changed nothing; ``update_drawn`` then runs the general step on the same
sketch draw, which reports or handles it.

The randomized SVD (:func:`svd_factors`) is the general ``rsvd._svd``'s
NumPy operations in the same way, for one matrix, any shape, and a sketch
of two or more columns (the default has eleven), sharing the step's
sketch (:func:`_sketched_range`) and, where the Grams cannot resolve the
sketch, finishing on the general routine's QR route; its factors are the
general routine's bit for bit (``tests/test_lean_rsvd.py``), and NaN or
Inf goes back to the general routine, which names it.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _xp
from ._cores import balance_bound, drop_tolerance, host_xp, largest
from ._flow import (_check_unitary, _right_core, _right_core_tiny, balance_columns, needs_balancing,
                    newton_schulz_basis, newton_schulz_count)
from ._xp import by_columns, matmul_panel, namespace

__all__ = ["host_arrays", "lean_factors", "square_pair", "svd_factors", "takes_svd"]

# The host's dtypes and the dtype of their Gram and cores (float32 panels'
# Grams in float64, as ``_xp.core_dtype`` has them on the host).
_CORE = {np.dtype(np.float32): np.dtype(np.float64), np.dtype(np.complex64): np.dtype(np.complex128),
         np.dtype(np.float64): np.dtype(np.float64), np.dtype(np.complex128): np.dtype(np.complex128)}
_CORE_EPS = float(np.finfo(np.float64).eps)
_CORE_TINY = float(np.finfo(np.float64).smallest_normal)


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


def lean_factors(W, G, host_draw, *, lr, rank, variant, power_iters):
    """(L, Rh) of the step of the NumPy W along ``-lr G`` (the new W is
    W + L Rh), as ``steps.update_drawn`` gives them for the sketch
    ``host_draw`` (the host draw (l, n) of :func:`steps.sketch_draw`), or
    None where the general step must decide (see the module's docstring).
    Only for :func:`host_arrays`' pairs and checked options (``lr`` a
    float)."""
    # NumPy's warnings on NaN, Inf and the cores' rare overflow, which the
    # general step silences too (``_flow.checked``): what they warn of is checked
    with np.errstate(all="ignore"):
        if host_draw.shape[-2] == 1:
            return _factors(W, G, host_draw, lr=lr, variant=variant, power_iters=power_iters)
        return _wide_factors(W, G, host_draw, lr=lr, rank=rank, variant=variant, power_iters=power_iters)


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
    def largest(Y):  # a panel's largest entry, + tiny: a zero panel stays zero
        return np.abs(Y).max(axis=(-2, -1), keepdims=True) + tiny

    Y = G @ omega
    s = largest(Y)
    Y = Y / s
    Z = _left(G, Y)
    for _ in range(power_iters):  # each panel by its own largest entry (see _flow.sketch_panels)
        Y = G @ (Z / s)
        Y = Y / largest(Y)
        Z = _left(G, Y)
    gram = _panel_gram(W, Y, Z, core, tiny)
    if gram is None:
        return None
    F, C, scales = gram
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
    return matmul_panel(_numpy_namespace(), W, Q) @ D, _h(Q)


def _panel_gram(W, Y, Z, core, tiny):
    """(F, C, scales): the panels [Y, Z, W^H Y] side by side, their Gram in
    the cores' dtype and the gathered scales (``_flow._right_panels``; a
    Gram in the panels' own precision needs Z rescaled first, see
    ``_flow.prepare_panels``), or None where the Gram or a scale is not
    finite (the general step names the input)."""
    Z, scales = _rescaled(Z, core, tiny)
    F = np.concatenate([Y, Z, _left(W, Y)], -1)
    C = _gram(F, core)
    if not np.isfinite(C).all() or (scales and not np.isfinite(scales[0]).all()):
        return None
    return F, C, scales


def _rescaled(Z, core, tiny):
    """(Z, scales) as ``_flow.prepare_panels`` gives them for a sketch: Z
    divided by its largest entry where the Grams are formed in the panels'
    own precision (``core``, their dtype), with that scale in a list (the
    step's size, or S, is multiplied by it); Z as it is and no scale where
    the Grams are wider."""
    if core != Z.dtype:
        return Z, []
    top = np.abs(Z).max(axis=(-2, -1), keepdims=True) + tiny
    return Z / top, [top.astype(core)]


def _gram(P, core):
    """``P^H P`` of a 2-D panel in the cores' dtype (``_flow.panel_gram``)."""
    wide = P.astype(core, copy=False)
    return _h(wide) @ wide


def _left(A, P):
    """``_xp.adjoint_matmul(A, P)`` of a 2-D NumPy A and a panel:
    ``(P^H A)^H``, the rows of ``P^H A`` made one at a time where
    ``_xp.by_columns`` says so."""
    if P.shape[-1] > 1 and by_columns(_numpy_namespace(), A, P, "left"):
        return _h(np.concatenate([_h(P[:, j:j + 1]) @ A for j in range(P.shape[-1])], -2))
    if P.dtype.kind == "c":
        return np.conj((np.conj(P.mT) @ A).mT)
    return (P.mT @ A).mT


def _rebased(Y, core, eps, tiny):
    """``_flow.orthonormal_columns`` of a panel Y of two or more columns:
    Y times the inverse of the shifted Cholesky factor of its Gram
    (``_cores.cholesky_columns``), in the cores' dtype; None where the
    factorisation fails (NaN or Inf). Written out, as the rest of this
    module: 15-25 us a call against 21-34 us for the general helper (n = 64
    to 256, two and eight columns), three calls a step."""
    if core == Y.dtype:
        Y = Y / (np.abs(Y).max(axis=(-2, -1), keepdims=True) + tiny)
    F = Y.astype(core, copy=False)
    tol = max(drop_tolerance(Y.shape[-2], eps, _CORE_EPS), 16 * Y.shape[-1] * _CORE_EPS)
    M = _h(F) @ F
    d = np.einsum("ii->i", M)
    d *= 1 + tol
    d += _CORE_TINY
    try:
        inverse = np.linalg.inv(_h(np.linalg.cholesky(M)))
    except np.linalg.LinAlgError:
        return None
    return (inverse.mT @ F.mT).mT.astype(Y.dtype, copy=False)


def _wide_factors(W, G, host_draw, *, lr, rank, variant, power_iters):
    """:func:`lean_factors` for a sketch of two or more columns: the general
    step's ``_flow.sketch_panels`` and ``_flow.lowrank_right_update`` written
    out for two 2-D NumPy arrays, its cores (``_flow._right_core``) called
    as they are."""
    dtype = W.dtype
    core = _CORE[dtype]
    eps, tiny = _finfo(dtype)
    n, l = W.shape[-1], host_draw.shape[-2]
    panels = _sketched_range(G, np.asarray(host_draw, dtype=dtype).mT, power_iters)
    if panels is None:
        return None
    gram = _panel_gram(W, *panels, core, tiny)
    if gram is None:
        return None
    F, C, scales = gram
    CP = C[l:, l:]
    try:
        _check_unitary(host_xp, C[:l, :l], C[2 * l:, 2 * l:])  # |W^H y|^2 against |y|^2
        T, D, spread = _right_core(host_xp, C[:l, :l], CP, lr=lr, variant=variant, rank=rank, l=l, sketched=True,
                                   tol=drop_tolerance(n, eps, _CORE_EPS), traced=False,
                                   scales=scales)
    except ValueError:  # W is not unitary, or a core failed: the general step says so
        return None
    steps = newton_schulz_count(largest(spread, 1.0), 2 * l, eps, _CORE_EPS)
    # _flow._scatter: the results in W's dtype, row-major as its transfer makes them
    T, column_scale = balance_columns(host_xp, CP, T, False, balance_bound(host_xp, dtype))
    T, D = T.astype(dtype, order="C"), D.astype(dtype, order="C")
    if column_scale is not None:
        column_scale = column_scale.astype(dtype)
    xp = _numpy_namespace()
    Q = newton_schulz_basis(xp, F[:, l:], T, steps, column_scale)
    return matmul_panel(xp, W, Q) @ D, _h(Q)


def _sketched_range(A, omega, power_iters):
    """``_flow.sketch_panels`` of a 2-D NumPy A (m x n) and a test matrix
    omega (n x l) of two or more columns, in A's dtype: (Y, Z) with Y
    spanning ``(A A^H)^q A omega``, re-based before each product with A^H
    and A and after the last one, and ``Z = A^H Y``; None where a re-base
    fails (NaN or Inf). The step's sketch and the randomized SVD's."""
    dtype = A.dtype
    core = _CORE[dtype]
    eps, tiny = _finfo(dtype)
    xp = _numpy_namespace()
    Y = matmul_panel(xp, A, omega)
    for _ in range(power_iters):
        X = _rebased(Y, core, eps, tiny)
        X = None if X is None else _rebased(_left(A, X), core, eps, tiny)
        if X is None:
            return None
        Y = matmul_panel(xp, A, X)
    Y = _rebased(Y, core, eps, tiny)
    return None if Y is None else (Y, _left(A, Y))


def takes_svd(A, draw):
    """Whether ``rsvd._svd`` of A with the host draw ``draw`` (n x l) is
    :func:`svd_factors`' case: one 2-D NumPy array of a float dtype smaller
    than the last-level cache (beyond it the general products read A block
    by block), a sketch of two or more columns."""
    return (type(A) is np.ndarray and A.ndim == 2 and A.dtype in _CORE and draw.shape[-1] > 1
            and A.nbytes < _xp._BEYOND_CACHE_BYTES)


def svd_factors(A, draw, rank, power_iters):
    """(U, S, Vh) of ``randomized_svd`` of the NumPy A for its test
    matrix's host draw ``draw`` (n x l), as the general ``rsvd._svd`` gives
    them, bit for bit, on either of its routes (a sketch the Grams cannot
    resolve takes the QR route, ``rsvd._range_basis`` and
    ``rsvd._small_svd``, on the same sketch); or None where the general
    routine must decide: NaN or Inf. Only for :func:`takes_svd`'s case."""
    from .rsvd import _range_basis, _small_factors, _small_svd  # (rsvd imports this module)

    dtype = A.dtype
    xp = _numpy_namespace()
    core = _CORE[dtype]
    eps, tiny = _finfo(dtype)
    with np.errstate(all="ignore"):  # what NumPy would warn of is checked
        panels = _sketched_range(A, np.asarray(draw, dtype=dtype), power_iters)
        if panels is None:
            return None
        Y, Z = panels
        Z, scales = _rescaled(Z, core, tiny)  # rsvd._sketch
        Cy, Cz = _gram(Y, core), _gram(Z, core)
        if not (np.isfinite(Cy).all() and np.isfinite(Cz).all()):
            return None
        small = _small_factors(Cy, Cz, scales, rank=rank, rows=A.shape[-2], eps=eps, gram_eps=_CORE_EPS)
        if small is None:  # the QR route
            Q, Bh, finite = _range_basis(xp, A, Y)
            return _small_svd(xp, Q, Bh, rank=rank) if finite else None
        Fu, Fv, S, steps_u, steps_v = small
        bound = balance_bound(host_xp, dtype)
        (Fu, scale_u), (Fv, scale_v) = (balance_columns(host_xp, C, F, False, bound) for C, F in ((Cy, Fu), (Cz, Fv)))
    # rsvd._factors on the results in A's dtype, row-major as their transfer makes them
    U = newton_schulz_basis(xp, Y, Fu.astype(dtype, order="C"), steps_u,
                            None if scale_u is None else scale_u.astype(dtype))
    V = newton_schulz_basis(xp, Z, Fv.astype(dtype, order="C"), steps_v,
                            None if scale_v is None else scale_v.astype(dtype))
    U, Vh = _canonical_phases(U, _h(V))
    S = S.astype(dtype)
    return U, (S.real if S.dtype.kind == "c" else S), Vh


def _canonical_phases(U, Vh):
    """``rsvd.canonical_phases`` of two 2-D NumPy arrays: the same numbers,
    the entry of each column of U of largest magnitude taken by index where
    the general form sums the column masked by it (the one entry plus
    zeros). 5-13 us a call against 16-35 us for the general form (64 x 1
    to 256 x 8, float32 and complex64)."""
    k = U.shape[-1]
    magnitude = np.abs(U)
    near = magnitude >= magnitude.max(axis=-2, keepdims=True) * (1 - _finfo(U.dtype)[0] ** 0.5)
    u = U[near.argmax(axis=-2), np.arange(k)]  # the first entry tied with the largest (rsvd._phase_tolerance)
    size = np.abs(u)
    if U.dtype.kind == "c":
        phase = np.where(size > 0, u / np.where(size > 0, size, 1.0).astype(U.dtype), 1.0).astype(U.dtype)
        return U * np.conj(phase)[None, :], Vh * phase[:, None]
    sign = np.where(u < 0, -1.0, 1.0).astype(U.dtype)
    return U * sign[None, :], Vh * sign[:, None]
