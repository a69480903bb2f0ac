"""The data flow of a low-rank step (floor 3, private).

A step is a handful of large operations, the passes over G and W and one
rank-r update of W, plus r x r work done once, together, where it is cheapest
(see ``_cores``):

1. on the device, thin panels: the sketch ``Y`` of G's range and ``Z = G^H Y``
   (or the given factors; the power iteration's intermediate bases from
   shifted Cholesky factors of their Grams, also on the device), ``c = W^H Y``,
   ``W [Z, c]``, and one Gram matrix of all of them, in float64 where the
   device has it;
2. the small work: an orthonormal basis of span[Z, c] from its Gram
   (equilibrated eigendecomposition, rank-deficient directions dropped), the
   truncation of the sketch to rank k, the exp or polar core; in eager calls
   on the host (one transfer each way), where the Gram also shows NaN/Inf in
   the inputs and how far W is from unitary, at no extra pass;
3. on the device, ``L = (W Q) D`` and ``Rh = Q^H``: the new W is ``W + L @ Rh``.

No ``linalg.qr`` or ``svd`` of an n x r panel, no Python branch on device
values, and in eager calls exactly one device-to-host transfer.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import numpy as np

from ._cores import (cholesky_columns, drop_tolerance, expm_skew_minus_identity, gram_basis, hermitian_eigh, host_fast,
                     largest, polar_minus_identity, scatter_present)
from ._host import is_traced, staged
from ._tiny import gram_basis2, polar_small2, skew_core2
from ._xp import (RightProduct, adjoint_matmul, adjoint_rows, blocked_normal, broadcast_shapes, core_dtype, device,
                  fuses_right_update, matmul_panel, max_abs, mH, panel_times_small, real_finfo, rows_beyond_cache,
                  split_power_of_two)

__all__ = ["checked", "fused_right_update", "lowrank_right_update", "lowrank_update", "sketch_basis", "sketch_panels",
           "stiefel_update", "transport_update"]

# Unitarity of W as the step sees it: the largest relative change of |W x|^2
# over the step's panel. The check is for matrices that are not unitary at all
# (0.5 Q: 0.75; a Kaiming-uniform init: about 1), not for drift: W's drift is
# never amplified by a step (it is multiplied by a unitary matrix), and the
# optimizers' drift control, with thresholds a user may set up to this value,
# re-projects a drifted W.
UNITARITY_TOLERANCE = 1e-2


class StepInputError(ArithmeticError):
    """Raised by the checks of the small Gram matrices with the name of the
    input whose products are not finite; :func:`checked` turns it into the
    public ValueError."""


def _eps(xp, dtype):
    return real_finfo(xp, dtype)[0]


def _normalized(xp, Y):
    """Y scaled so that its largest entry is 1 (0 stays 0): a power iteration
    then never overflows, and a scale does not change the span."""
    return _scaled(xp, Y)[0]


def _scaled(xp, Y):
    """(Y / s, s) with s (..., 1, 1) about Y's largest entry."""
    top = max_abs(xp, Y)
    top = top + real_finfo(xp, Y.dtype)[1]
    return Y / top, top


# A step's size (lr times the panels' scales, or t times them) beyond this is
# clamped: a step (or a generator) that large has lost every digit of its
# direction to rounding anyway, and the polar and exp cores then give the same
# unitary result. Only the size is clamped, not its factors: see _step_size.
_HUGE = 1e150


def _clamped(sxp, s):
    """s (real part) clamped to +-_HUGE, or to the dtype's largest value when
    that is smaller (a 32-bit scale on a device without float64)."""
    if isinstance(s, (int, float)):
        return max(-_HUGE, min(_HUGE, s))
    if host_fast(sxp, s) and s.dtype == sxp.float64:  # one selection, of the same numbers (NaN stays NaN)
        return sxp.clip(s, -_HUGE, _HUGE)
    s = sxp.real(s)
    bound = min(_HUGE, float(sxp.finfo(s.dtype).max) / 4)
    return sxp.where(s > bound, sxp.full_like(s, bound), sxp.where(s < -bound, sxp.full_like(s, -bound), s))


def _needs_scaling(xp, dtype, core):
    """Whether thin panels of ``dtype`` must be rescaled before their Gram:
    only when the Gram is formed in the panels' own precision (``core``, the
    device's core dtype: a device without float64), whose range cannot hold
    their squares (a float32 panel's Gram in float64 always can). The host
    cores' precision does not decide it: on a device without float64 an
    eager step's Gram was formed in float32 before its float64 host cores
    saw it, and a float32 gradient of 1e-30 gave a Gram of zeros (a step
    1e-2 off its direction) and one of 1e20 an overflow."""
    return core == dtype


@staged("power_iters")
def sketch_panels(xp, G, omega, power_iters):
    """(Y, Z) with ``Z = G^H Y`` and Y spanning ``(G G^H)^q G omega``: the
    sketch ``G ~ Y (Y^H Y)^+ Z^H``. G is an array or factors (a, b) = a b^H.

    Between the passes the panel gets a new, well-conditioned basis (Halko
    et al.'s stable power iteration) by :func:`orthonormal_columns`, on the
    device: the sketch makes no host transfer. So does the last panel, before
    Z is formed: the projector ``Y (Y^H Y)^+ Y^H`` that the step builds from
    the Gram of Y is off by about eps cond(Y)^2, and an ill-conditioned Y
    (a gradient whose singular values spread over 1e4, or one of lower rank
    than the sketch's columns) made a float64 step 1e-5 away from the step
    along the exact rank-k gradient, a float32 one 4e-4. Columns of the
    re-based panel shorter than 1/sqrt(2) were below the basis' shift
    (rounding) and the step drops them (:func:`_sketch_projector`).
    """
    if isinstance(G, tuple):
        a, b = G
        matmul, rmatmul = (lambda X: a @ adjoint_rows(xp, b, X)), (lambda Y: b @ adjoint_rows(xp, a, Y))
    else:
        matmul, rmatmul = (lambda X: matmul_panel(xp, G, X)), (lambda Y: adjoint_matmul(xp, G, Y))
    if omega.shape[-1] == 1:
        # One column: Z = G^H Y is divided by the first panel's largest entry
        # s, whose orders of magnitude are the gradient's, before the next
        # product (which then makes about |G| |Y|, not |G|^2 |Y|, and does not
        # overflow), and each panel is rescaled by its own largest entry. (By s
        # alone, each panel grew by (sigma_1 / s)^2: a rank-1 float32 step with
        # power_iters=25 was 0 without a word, with 24 "W is not unitary".)
        # Each panel Y comes with G^H Y, from one pass over a NumPy G beyond
        # the cache (_xp.blocked_normal).
        if rows_beyond_cache(G, omega):
            normal = functools.partial(blocked_normal, G)
        else:
            normal = functools.partial(_normal_pair, xp, matmul, rmatmul)
        Y, Z, s = normal(omega)
        for _ in range(power_iters):
            Y, Z, _ = normal(Z / s)
        return Y, Z
    Y = matmul(omega)
    for _ in range(power_iters):
        Y = matmul(orthonormal_columns(xp, rmatmul(orthonormal_columns(xp, Y))))
    Y = orthonormal_columns(xp, Y)
    return Y, rmatmul(Y)


def _normal_pair(xp, matmul, rmatmul, X, divisor=None):
    """``(Y, Z, s)`` with ``Y = G X / s`` and ``Z = G^H Y`` (``matmul``,
    ``rmatmul``: the products with G and G^H); ``s`` is ``divisor`` where
    given, else the largest |entry| of ``G X`` (see :func:`_scaled`)."""
    Y = matmul(X)
    if divisor is None:
        Y, divisor = _scaled(xp, Y)
    else:
        Y = Y / divisor
    return Y, rmatmul(Y), divisor


def orthonormal_columns(xp, Y):
    """A panel of well-conditioned columns spanning the columns of Y, for
    the power iteration, on Y's device: a rescaling for one column;
    otherwise Y times the inverse of the shifted Cholesky factor of its Gram
    (:func:`._cores.cholesky_columns`), in float64 where the device has it.

    The next product only needs a basis whose columns are far from
    dependent, not one orthonormal to rounding, so no Newton-Schulz step
    follows, unlike the step's own basis (:func:`newton_schulz_basis`), on which
    unitarity rests. Directions at the Gram's rounding level are damped,
    not dropped: the next product maps them as it maps any other, and the
    step's own basis drops what is left of them. NaN or Inf in Y gives NaN,
    which the step's Gram check reports (naming G)."""
    if Y.shape[-1] == 1:
        return _normalized(xp, Y)
    core = core_dtype(xp, Y.dtype, device(Y))
    if core == Y.dtype:
        # the Gram in Y's own precision: its squares must stay in range (a
        # wider dtype holds the squares of any float32 or complex64 panel)
        Y = _normalized(xp, Y)
    F = xp.astype(Y, core, copy=False)
    core_eps = _eps(xp, core)
    tol = max(drop_tolerance(Y.shape[-2], _eps(xp, Y.dtype), core_eps), 16 * Y.shape[-1] * core_eps)
    return xp.astype(cholesky_columns(xp, F, adjoint_rows(xp, F, F), tol), Y.dtype, copy=False)


def _newton_schulz_factor(xp, Q, three_halves):
    """``(3 I - Q^H Q) / 2``, given ``1.5 I``: made once for all the steps
    (on a device an identity is two kernels)."""
    return three_halves - 0.5 * adjoint_rows(xp, Q, Q)


def _gram(xp, panels, core):
    return panel_gram(xp, panels, core)[1]


def panel_gram(xp, panels, core):
    """(F, C): the panels side by side, in their own dtype, and the Gram
    ``C = F^H F`` in the dtype ``core``. A step that multiplies W by some of
    the same panels later takes them as a slice of F (a view), not as a
    second concatenation."""
    F = panels[0] if len(panels) == 1 else xp.concat(panels, axis=-1)
    wide = xp.astype(F, core, copy=False)
    return F, adjoint_rows(xp, wide, wide)


def _blocks(C, sizes):
    """The diagonal and off-diagonal blocks of a Gram of concatenated panels."""
    edges = [0]
    for size in sizes:
        edges.append(edges[-1] + size)
    return lambda i, j: C[..., edges[i]:edges[i + 1], edges[j]:edges[j + 1]]


def _all_finite(sxp, gram):
    """Whether the host array ``gram`` (a NumPy array: the host cores' own)
    is finite; its ``all`` method, where the function form costs twice as
    much Python (10 against 5 us)."""
    return bool(sxp.isfinite(gram).all())


def _check_finite(sxp, gram, name):
    if not _all_finite(sxp, gram):
        raise StepInputError(name)


def _check_finite_blocks(sxp, gram, *blocks, whole="W"):
    """One finiteness test of the whole Gram; only when it fails, the blocks
    (block, name), in order, name the input whose products are not finite."""
    if _all_finite(sxp, gram):
        return
    for block, name in blocks:
        _check_finite(sxp, block, name)
    raise StepInputError(whole)


def checked(run, xp, arrays, *, sketched=()):
    """``run()``, with the small-Gram checks' findings turned into the public
    errors: a ValueError naming the argument (and counting its NaN/Inf
    entries, on this error path only). ``arrays``: name -> array;
    ``sketched``: names whose NaN/Inf was seen through their sketch.

    In a traced program (:func:`._host.is_traced`) ``run`` checks nothing
    and is called as it is (no NumPy arithmetic there to quieten, and Dynamo
    need not trace a context manager)."""
    if any(is_traced(x) for x in arrays.values()):
        return run()
    try:
        # NaN/Inf and overflow are reported below as a ValueError naming the
        # argument; NumPy's "invalid value" warnings would only repeat it. (Its
        # error state, not the warning filters: those are global to the process,
        # and threads that swap them in and out of order left a filter behind.)
        with np.errstate(all="ignore"):
            return run()
    except StepInputError as error:
        from ._validation import report_nonfinite

        name = str(error)
        # the input named by the check first, then the others: a NaN in one
        # factor shows in the products of both
        for other in sorted(arrays, key=lambda key: key != name):
            if other not in sketched and not bool(xp.all(xp.isfinite(arrays[other]))):
                report_nonfinite(xp, other, arrays[other])
        if name in sketched:
            report_nonfinite(xp, name, arrays[name], source="its sketch")
        raise ValueError(f"{error} is too large for its dtype: its products overflow") from None


def _unitarity_deviation(sxp, C, CW):
    """max |x^H (W^H W - I) x| / |x|^2 over the panel's columns and pairs,
    from the Grams C = P^H P and CW = (W P)^H (W P)."""
    # one host matrix: the same operations, the diagonal as a view (9 against 10 us a call)
    d = C.diagonal().real if host_fast(sxp, C) else sxp.real(sxp.linalg.diagonal(C))
    scale = sxp.where(d > 0, 1 / sxp.sqrt(sxp.where(d > 0, d, 1.0)), 0.0)
    E = (CW - C) * (scale[..., :, None] * scale[..., None, :])
    return largest(sxp.abs(E), 0.0)


class UnitarityError(ValueError):
    """W was measured not to be unitary by a kernel's own products."""

    def __init__(self, deviation, tolerance):
        self.deviation, self.tolerance = deviation, tolerance
        super().__init__(
            f"W is not unitary (orthogonal): |W x|^2 differs from |x|^2 by up to {deviation:.3g} of |x|^2 "
            f"on the directions this step uses (tolerance {tolerance:g}); the low-rank kernels need "
            "W^H W = I. Start from a unitary matrix (random_unitary, or project_unitary(W) for the "
            "closest one)"
        )


def _check_unitary(sxp, C, CW):
    deviation = _unitarity_deviation(sxp, C, CW)
    if not deviation <= UNITARITY_TOLERANCE:
        raise UnitarityError(deviation, UNITARITY_TOLERANCE)


# Columns whose lengths are within 2**+-_BALANCE_LIMIT are left as they are
# by an eager step (see balance_columns).
_BALANCE_LIMIT = 40


def needs_balancing(lengths):
    """Whether panel columns of these squared lengths (Python numbers, the
    diagonal of the panel's host Gram) need :func:`balance_columns`: a length
    beyond 2**+-``_BALANCE_LIMIT`` (zero columns are left alone)."""
    return any(abs(round(math.log2(math.sqrt(v)))) > _BALANCE_LIMIT for v in lengths if v > 0)


def balance_columns(sxp, C, T, traced, bound):
    """(T', column scales or None) with ``P T = (P diag(s)) T'``: powers of two
    that bring the panel's columns (lengths from the diagonal of its Gram C)
    near 1, so that neither P's columns nor T's entries leave the range where
    a device keeps full precision (XLA's CPU matmul flushes subnormal float32
    numbers to zero: T = 1e-39 for columns of length 1e39 vanished). Exact: a
    power of two only moves exponents. The exponents stay within ``bound``
    (``_cores.balance_bound`` of the panel's dtype): a float32 column of
    length 1e-40 would ask for 2**133, which is Inf in float32, and made the
    step NaN. None when no column needs it (eager calls, decided on the host);
    traced calls always scale."""
    # one host matrix: its diagonal as a view (a call where the standard has two)
    d = C.diagonal().real if host_fast(sxp, C) else sxp.real(sxp.linalg.diagonal(C))
    # log2 of the column lengths sqrt(d); a zero column is left alone
    exponent = sxp.round(sxp.log2(sxp.where(d > 0, d, 1.0)) / 2)
    # tested before the clip to ``bound``, which cannot change the test
    # (``bound`` > _BALANCE_LIMIT) and which the common case then skips
    if not traced and not bool(sxp.any(sxp.abs(exponent) > _BALANCE_LIMIT)):
        return T, None
    exponent = sxp.clip(exponent, -bound, bound)
    factor = 2.0 ** exponent  # and its inverse, exact: powers of two in range
    return T * sxp.astype(factor, T.dtype)[..., :, None], sxp.astype(1 / factor, T.dtype)


@staged("reorthonormalize")
def _apply_right(xp, W, P, T, D, reorthonormalize, column_scale=None):
    """(L, Rh) = ((W Q) D, Q^H) with Q = P T: the new W is ``W (I + Q D Q^H)``.

    Q is formed before the pass over W, so W Q is W times exactly this Q and
    the update is unitary to rounding whenever Q has orthonormal columns. When
    the panel P was ill-conditioned, Q = P T carries errors of about eps
    cond(P); each Newton-Schulz step ``Q <- Q (3 I - Q^H Q) / 2`` squares them,
    with matmuls only (no factorisation, no transfer).
    """
    Q = newton_schulz_basis(xp, P, T, reorthonormalize, column_scale)
    # the caller adds L @ Rh to W at once, in one read of W (the variable read
    # only for the arrays it is set for: torch.compile cannot trace a read)
    if fuses_right_update(W) and _fused_W.get() is W:
        return RightProduct(W, Q, D), mH(xp, Q)
    return matmul_panel(xp, W, Q) @ D, mH(xp, Q)


# The W whose right update's panel ``(W Q) D`` is left unformed (an
# ``_xp.RightProduct``) for its caller to form as it applies the update; see
# :func:`fused_right_update`.
_fused_W = contextvars.ContextVar("unitary_lr_fused_W", default=None)


@contextlib.contextmanager
def fused_right_update(W):
    """A context in which the step of this W (``steps.projunn_step``, which
    applies its factors at once with ``_xp.add_product``) leaves the panel
    ``L = (W Q) D`` unformed, where that saves a read of W from memory: a
    2-D square row-major NumPy W beyond the last-level cache
    (``_xp.fuses_right_update``). Elsewhere, and for any other matrix
    stepped inside it, nothing changes."""
    if not fuses_right_update(W):  # nothing to set (nor for torch.compile to trace)
        yield
        return
    token = _fused_W.set(W)
    try:
        yield
    finally:
        _fused_W.reset(token)


def newton_schulz_basis(xp, P, T, reorthonormalize, column_scale=None):
    """Q = P T (P's columns scaled first, see :func:`balance_columns`), then
    ``reorthonormalize`` Newton-Schulz steps."""
    if column_scale is not None:
        P = P * column_scale[..., None, :]
    Q = panel_times_small(xp, P, T)
    if reorthonormalize:
        three_halves = 1.5 * xp.eye(Q.shape[-1], dtype=Q.dtype, device=device(Q))
        for _ in range(reorthonormalize):
            Q = panel_times_small(xp, Q, _newton_schulz_factor(xp, Q, three_halves))
    return Q


def _reorthonormalize_steps(sxp, spread, m, eps, core_eps, tol):
    """How many Newton-Schulz steps bring Q = P T to orthonormal columns at the
    device's rounding level; ``spread`` from :func:`gram_basis` (host side),
    or None from a traced call (``with_spread=False``), which cannot look at
    the conditioning: then the worst spread a basis keeps, the drop tolerance
    ``tol``'s inverse, decided by the dtypes and the shapes alone. That is 2
    steps for float32 panels with float64 cores (a departure of about 2e-2
    -> 5e-4 -> 2e-7), 4 for float64 ones (3e-2 -> 1e-3 -> 1e-6 -> 9e-13 ->
    eps: three, the fixed traced count before 2026-12-05, stopped at 9e-13
    in the worst case)."""
    if spread is None:
        ratio = 1 / tol
    else:
        ratio = largest(spread, 1.0)
    return newton_schulz_count(ratio, m, eps, core_eps)


def newton_schulz_count(ratio, m, eps, core_eps):
    """Newton-Schulz steps for a basis Q = P T of m columns from the Gram of P
    whose kept eigenvalues spread over ``ratio`` (cond(P)^2, after
    equilibration). Q departs from orthonormal columns by about
    ``eps sqrt(ratio m)`` from forming P T in the panels' precision ``eps``,
    plus ``core_eps ratio m`` from the Gram the basis comes from, in the
    cores' precision: a Gram squares the condition number. Each step squares
    the departure, down to the panels' rounding level. (Counting the first
    term alone, a float64 step on a gradient whose singular values spread
    over 1e10 took one step where it needed three, and returned W with
    ||W^H W - I|| = 5e-7.)"""
    error, steps = eps * (ratio * m) ** 0.5 + core_eps * ratio * m, 0
    while error > 16 * eps and steps < 4:
        error, steps = max(error * error, eps), steps + 1
    return steps


def _scalar(x):
    """A host 1 x 1 (or 0-d) array as a Python number."""
    return x.reshape(-1)[0].item()


def _right_core_tiny(sxp, C, scales, *, lr, variant, sketched, tol, core_eps):
    """:func:`_check_unitary` and :func:`_right_core` for one matrix and l = 1:
    C (3 x 3, finite) is the Gram of [Y, Z, c]; (T, D, spread) as nested
    tuples of Python numbers, from the closed forms of ``_tiny``."""
    (cy, _, _), (_, cz, g), (_, _, cw) = C.tolist()
    cy, cz, cw = cy.real, cz.real, cw.real
    deviation = abs(cw - cy) / cy if cy > 0 else 0.0
    if not deviation <= UNITARITY_TOLERANCE:
        raise UnitarityError(deviation, UNITARITY_TOLERANCE)
    # Pi: 1 / (Y^H Y) for a sketch (truncation to rank 1 of one column is
    # nothing), 1 for factors; see _sketch_projector
    Pi = (1 / cy if cy > 0 else 0.0) if sketched else 1.0
    T, R, spread = gram_basis2(((cz, g), (_conj(g), cw)), tol)
    size = _step_size(sxp, lr, _numbers(scales))
    if variant == "direct":
        B = _direct_generator_tiny(R, Pi, size)
        D = polar_small2(B)
        if D is None:
            D = polar_minus_identity(sxp, sxp.asarray(B, dtype=C.dtype), traced=False)
        return T, D, spread
    # A - A^H = R [[0, -Pi], [Pi, 0]] R^H
    return T, _skew_core_tiny(C, R, -Pi, size, variant, core_eps), spread


def _direct_generator_tiny(R, Pi, size):
    """B = -size R A0 R^H with A0 = [[0, 0], [Pi, 0]] (``W^H G_k`` in the
    basis), the 2 x 2 argument of the direct step's polar core."""
    (r00, r01), (r10, r11) = R
    return ((-size * r01 * Pi * _conj(r00), -size * r01 * Pi * _conj(r10)),
            (-size * r11 * Pi * _conj(r00), -size * r11 * Pi * _conj(r10)))


def _skew_core_tiny(C, R, p, size, variant, core_eps):
    """:func:`_skew_core` of ``K = R [[0, p], [-p, 0]] R^H`` (p real) in closed form."""
    (r00, r01), (r10, r11) = R
    c00, c01, c10, c11 = _conj(r00), _conj(r01), _conj(r10), _conj(r11)
    # K[i][j] = p (R[i][0] conj(R[j][1]) - R[i][1] conj(R[j][0])), entry by entry
    K = ((p * (r00 * c01 - r01 * c00), p * (r00 * c11 - r01 * c10)),
         (p * (r10 * c01 - r11 * c00), p * (r10 * c11 - r11 * c10)))
    t = -size if variant == "cayley" else -size / 2
    return skew_core2(K, t, cayley=variant == "cayley", real=C.dtype.kind != "c", eps=core_eps)


def _unitarity_deviation_tiny(C, CW):
    """:func:`_unitarity_deviation` of two 2 x 2 Grams (nested lists)."""
    scale = [1 / math.sqrt(C[i][i].real) if C[i][i].real > 0 else 0.0 for i in range(2)]
    return max(abs(CW[i][j] - C[i][j]) * scale[i] * scale[j] for i in range(2) for j in range(2))


def _numbers(scales):
    """Host 1 x 1 scales as Python floats."""
    return [_scalar(factor).real for factor in scales]


def _conj(x):
    return x.conjugate() if isinstance(x, complex) else x


def _scatter_tiny(cores, CP, each):
    """:func:`_scatter` of closed-form 2 x 2 cores: ``each`` holds (T, D, ...)
    for each matrix of the host batch CP (..., 2, 2) (one entry for a single
    matrix), T and D as nested Python numbers (D may be a host array). The
    device's (T, D) of shape (..., 2, 2) and the column scale (or None); all
    of them as one host array: one conversion, one transfer."""
    sxp, shape = cores.xp, (*CP.shape[:-2], 2, 2)
    T = [T for T, *_ in each]
    D = [D.tolist() if hasattr(D, "shape") else D for _, D, *_ in each]
    d = CP.diagonal(axis1=-2, axis2=-1).real.reshape(-1).tolist()  # a NumPy array's own, a third of linalg's
    if not needs_balancing(d):
        return (*cores.scatter_stack((T, D), shape=shape), None)
    T, D = (sxp.reshape(sxp.asarray(x, dtype=CP.dtype), shape) for x in (T, D))
    return _scatter(sxp, cores, CP, T, D)


# The largest batch whose rank-1 cores run in closed form, matrix by matrix
# (about 20 us of Python each); a larger batch takes the vectorised cores.
_TINY_BATCH = 16


def _few(C):
    """Whether the host batch of small matrices C (..., r, r) is small enough
    for the closed-form cores, matrix by matrix (see ``_TINY_BATCH``); an
    empty batch is left to the general cores."""
    return 1 <= math.prod(C.shape[:-2]) <= _TINY_BATCH


def _each(C, scales):
    """(C_p, [scale_p, ...]) for each matrix of the host batch C (..., r, r)
    (one pair for a single matrix), the scales (..., 1, 1) alike."""
    if C.ndim == 2:
        yield C, scales
        return
    flat = C.reshape(-1, *C.shape[-2:])
    flat_scales = [s.reshape(-1, *s.shape[-2:]) for s in scales]
    for p in range(flat.shape[0]):
        yield flat[p], [s[p] for s in flat_scales]


def _left_core_tiny(Cn, Cz, scales, *, lr, variant, sketched, tol, sxp, core_eps):
    """The closed-form cores of :func:`stiefel_update` ("tangent", "cayley")
    for one matrix and l = 1: Cn (2 x 2) the Gram of [Y, W Z], Cz (1 x 1) that
    of Z; (T, D, spread)."""
    (cy, _), (_, ce) = Cn.tolist()
    cz = _scalar(Cz).real
    deviation = abs(ce.real - cz) / cz if cz > 0 else 0.0
    if not deviation <= UNITARITY_TOLERANCE:
        raise UnitarityError(deviation, UNITARITY_TOLERANCE)
    Pi = (1 / cy.real if cy.real > 0 else 0.0) if sketched else 1.0
    T, R, spread = gram_basis2(Cn.tolist(), tol)
    size = _step_size(sxp, lr, _numbers(scales))
    return T, _skew_core_tiny(Cn, R, Pi, size, variant, core_eps), spread


def lowrank_right_update(xp, W, Y, Z, *, lr, variant, rank, cores, sketched, names):
    """(L, Rh) such that the new square W is ``W + L @ Rh``, the step of W along
    ``-lr G_k`` with ``G_k = Y Pi Z^H``.

    ``sketched``: Y and Z come from :func:`sketch_panels` and ``Pi`` is the
    pseudo-inverse of ``Y^H Y`` truncated to the top ``rank`` singular
    directions of the sketch; otherwise G = Y Z^H exactly (``Pi = I``).
    ``variant`` "tangent": ``W expm(-lr/2 (W^H G_k - G_k^H W))``; "cayley":
    the Cayley map of the same generator; "direct": ``polar(W - lr G_k)``.
    All are ``W (I + Q D Q^H)`` with Q an orthonormal basis of span[Z, W^H Y],
    so W's own departure from unitarity is never amplified. ``names`` = (name
    of Y's source, of Z's source) for errors. Passes over W: ``W^H Y``,
    ``W Q`` and the update.
    """
    n, l = W.shape[-1], Y.shape[-1]
    P, C, scale_panels = _right_panels(xp, W, Y, Z, sketched=sketched)
    C, *scales = cores.gather(C, *scale_panels)
    sxp = cores.xp
    block = _blocks(C, (l, l, l))
    CP = C[..., l:, l:]
    eps = _eps(xp, W.dtype)
    tol = drop_tolerance(n, eps, cores.eps, cores.gram_eps)
    if not cores.traced:
        _check_finite_blocks(sxp, C, (block(0, 0), names[0]), (block(1, 1), names[1]))
        if l == 1 and isinstance(lr, (int, float)) and _few(C):
            # one sketch column: 2 x 2 cores in closed form, matrix by matrix
            cores_ = [_right_core_tiny(sxp, Cp, scales_p, lr=lr, variant=variant, sketched=sketched, tol=tol,
                                       core_eps=cores.eps) for Cp, scales_p in _each(C, scales)]
            steps = max(newton_schulz_count(spread, 2, eps, cores.gram_eps) for _, _, spread in cores_)
            T, D, column_scale = _scatter_tiny(cores, C[..., 1:, 1:], cores_)
            return _apply_right(xp, W, P, T, D, steps, column_scale)
        # |W^H y|^2 against |y|^2: W W^H = I exactly when W^H W = I
        _check_unitary(sxp, block(0, 0), block(2, 2))
    T, D, spread = _right_core(sxp, block(0, 0), CP, lr=lr, variant=variant, rank=rank, l=l,
                               sketched=sketched, tol=tol, traced=cores.traced, scales=scales)
    steps = _reorthonormalize_steps(sxp, spread, CP.shape[-1], eps, cores.gram_eps, tol)
    T, D, column_scale = _scatter(sxp, cores, CP, T, D)
    return _apply_right(xp, W, P, T, D, steps, column_scale)


@staged("sketched")
def _right_panels(xp, W, Y, Z, *, sketched):
    """The device's work of :func:`lowrank_right_update` before its small
    matrices go to the cores: (P, C, scales) with the panel P = [Z, c],
    ``c = W^H Y``, the Gram C of [Y, Z, c] and the panels' scales."""
    Y, Z, core, scales = prepare_panels(xp, W, Y, Z, sketched)
    F, C = panel_gram(xp, [Y, Z, adjoint_matmul(xp, W, Y)], core)
    return F[..., Y.shape[-1]:], C, scales


def _sketch_projector(sxp, Cy, Cz, *, rank, l, sketched, tol):
    """Pi (..., l, l) with ``G_k = Y Pi Z^H``: for a sketch, the pseudo-inverse
    of ``Y^H Y`` truncated to the top ``rank`` singular directions of
    ``Y (Y^H Y)^+ Z^H`` (Grams Cy = Y^H Y, Cz = Z^H Z); otherwise I."""
    if not sketched:
        return sxp.broadcast_to(sxp.eye(l, dtype=Cy.dtype), (*Cy.shape[:-2], l, l))
    if l == 1:
        # one column: 1 / |y|^2, 0 for y = 0 (``gram_basis`` of the 1 x 1 Cy,
        # in closed form, as the host's ``_right_core_tiny`` has it)
        d = sxp.real(Cy)
        positive = d > 0
        return sxp.astype(sxp.where(positive, 1 / sxp.where(positive, d, 1.0), 0.0), Cy.dtype, copy=False)
    Ty, _, _ = sketch_basis(sxp, Cy, tol, basis_only=True)
    if rank >= l:
        return Ty @ mH(sxp, Ty)
    _, Ub = hermitian_eigh(sxp, mH(sxp, Ty) @ Cz @ Ty)
    U = Ty @ Ub[..., -rank:]
    return U @ mH(sxp, U)


def sketch_basis(sxp, Cy, tol, *, basis_only=False):
    """:func:`._cores.gram_basis` of the sketch Y of :func:`sketch_panels`
    from its Gram Cy. A panel of two or more columns was re-based (shifted
    Cholesky QR): a column below the shift, rounding, came out shorter than
    1/sqrt(2) and is dropped here, where equilibration would restore it to a
    direction of its own (and the basis would carry its noise, amplified)."""
    return gram_basis(sxp, without_sketch_noise(sxp, Cy, Cy, sketched=True, copies=1), tol, basis_only=basis_only)


def without_sketch_noise(sxp, C, Cy, *, sketched, copies):
    """C, the Gram of ``copies`` panels side by side whose j-th columns come
    from the sketch's j-th column (Y itself, ``G^H Y``, ``W^H Y``, ``W G^H Y``),
    with the columns of the sketch's dropped columns (:func:`sketch_basis`;
    Cy = Y^H Y) zeroed: :func:`._cores.gram_basis` then gives them zero
    rows in T, as if they were not there. ``G_k`` has no part along them,
    but their ``G^H Y``, at rounding level, kept a step's basis
    ill-conditioned: a step of rank 31 along a gradient of rank 1 (n = 32)
    was 4.7e-8 from the exact step in float64, 3.8e-5 in float32 at rank 8
    along rank 4. Factors used as they are (not ``sketched``) and one-column
    sketches have none to drop."""
    if not sketched or Cy.shape[-1] == 1:
        return C
    keep = sxp.astype(sxp.real(sxp.linalg.diagonal(Cy)) >= 0.5, C.dtype)
    if copies > 1:
        keep = sxp.concat([keep] * copies, axis=-1)
    return C * (keep[..., :, None] * keep[..., None, :])


def _step_size(sxp, lr, scales):
    """The step's size, lr times the product of ``scales`` (the panels'
    scales: Python numbers or arrays (..., 1, 1)), clamped where it exceeds
    any meaningful step (the polar, exp and Cayley cores are then saturated)
    instead of overflowing. A tensor lr (a capturable step) is not clamped.

    Only the size is clamped, not its factors, and no partial product
    overflows or underflows: each factor is taken apart into a power of two
    and a number near 1 (exactly), the numbers are multiplied in the order the
    factors would be and the powers added. Clamped one by one, the scale of a
    gradient of 1e200 became 1e150, and a step at lr = 1e-200, of size O(1),
    left W exactly where it was; at 1e152 it went 0.6 astray. Where
    no partial product leaves the range, the size is the plain product's, bit
    for bit: a power of two only moves exponents."""
    if not scales:
        return _clamped(sxp, lr) if isinstance(lr, (int, float)) else lr
    return _exact_product(sxp, lr, scales, clamp=isinstance(lr, (int, float)))


def _exact_product(sxp, first, factors, *, clamp=True, nested=True):
    """``first * (factors[0] * factors[1] * ...)`` (``nested``; else
    ``((first * factors[0]) * factors[1]) ...``), clamped to +-_HUGE at the
    end only (see :func:`_step_size`). Python numbers by ``math.frexp``,
    arrays by their powers of two."""
    if not factors:
        return _clamped(sxp, first) if clamp else first
    mantissa, exponent = _split(sxp, first)
    tail, tail_exponent = 1.0, 0
    for factor in factors:
        m, e = _split(sxp, factor)
        if nested:
            tail, tail_exponent = tail * m, tail_exponent + e
        else:
            mantissa, exponent = mantissa * m, exponent + e
    mantissa, exponent = mantissa * tail, exponent + tail_exponent
    if isinstance(mantissa, float):  # every factor a Python number
        if mantissa == 0 or not math.isfinite(mantissa):
            return _clamped(sxp, mantissa)
        m, e = math.frexp(mantissa)
        # (2**600 > _HUGE: clamped below; under 2**-1200 the size is 0)
        return _clamped(sxp, math.ldexp(m, max(-1200, min(600, exponent + e))))
    # 2**exponent in two halves, each representable, the exponent kept where
    # their product times the mantissa (< 4) stays below the dtype's largest
    top = math.frexp(float(sxp.finfo(mantissa.dtype).max))[1] - 8
    exponent = sxp.clip(exponent, -2 * top, top)
    half = sxp.floor(exponent / 2)
    size = mantissa * 2.0 ** half * 2.0 ** (exponent - half)
    return _clamped(sxp, size) if clamp else size


def _split(sxp, x):
    """(m, e): x = m * 2**e exactly, with m near 1 (0 for 0); a Python number
    by frexp (a non-finite one as it is), an array (its real part) by the
    power of two of its magnitude (``_xp.split_power_of_two``)."""
    if isinstance(x, (int, float)):
        return math.frexp(x) if math.isfinite(x) else (x, 0)
    return split_power_of_two(sxp, sxp.real(x))


def _skew_core(sxp, K, size, variant):
    """The tangent or Cayley step's ``f(K) - I`` for the skew-Hermitian
    ``K = W^H G_k - G_k^H W`` (in a basis): ``expm(-size/2 K)`` and
    ``(I + size/2 K)^(-1) (I - size/2 K)``."""
    if variant == "cayley":
        return expm_skew_minus_identity(sxp, K, -size, cayley=True)
    return expm_skew_minus_identity(sxp, K, -size / 2)


def _right_core(sxp, Cy, CP, *, lr, variant, rank, l, sketched, tol, traced, scales=()):
    """(T, D, spread): the basis Q = P T of span P, the core D in Q's
    coordinates, for ``G_k = s * Y Pi Z^H`` (s the product of ``scales``),
    and the basis' spread (see
    :func:`gram_basis`)."""
    Pi = _sketch_projector(sxp, Cy, CP[..., :l, :l], rank=rank, l=l, sketched=sketched, tol=tol)
    CP = without_sketch_noise(sxp, CP, Cy, sketched=sketched, copies=2)
    T, R, spread = gram_basis(sxp, CP, tol, with_spread=not traced)
    # W^H G_k = c Pi Z^H = [Z, c] A0 [Z, c]^H with A0 = [[0, 0], [Pi, 0]], so
    # A = R A0 R^H = R_c Pi R_Z^H, from the columns of R (l each)
    A = (R[..., :, l:] @ Pi) @ mH(sxp, R[..., :, :l])
    size = _step_size(sxp, lr, scales)
    if variant == "direct":
        D = polar_minus_identity(sxp, -size * A, traced=traced)
    else:
        D = _skew_core(sxp, A - mH(sxp, A), size, variant)
    return T, D, spread


def lowrank_update(xp, W, Y, Z, *, lr, variant, rank, cores, sketched, names):
    """:func:`lowrank_right_update` for W of shape (..., n, m), n >= m: the
    square case in W's frame, a tall W (orthonormal columns) by
    :func:`stiefel_update`. Wide matrices are handled by the callers through
    the conjugate transpose."""
    update = lowrank_right_update if W.shape[-1] == W.shape[-2] else stiefel_update
    return update(xp, W, Y, Z, lr=lr, variant=variant, rank=rank, cores=cores, sketched=sketched, names=names)


def stiefel_update(xp, W, Y, Z, *, lr, variant, rank, cores, sketched, names):
    """(L, Rh) with the new W = ``W + L @ Rh`` for a tall W (..., n, m), n > m,
    with orthonormal columns, Y (..., n, l) and Z (..., m, l), ``G_k = Y Pi Z^H``
    as in :func:`lowrank_right_update`.

    "tangent" and "cayley" act from the left: ``f(A) W`` with the n x n
    skew-Hermitian ``A = G_k W^H - W G_k^H = P K0 P^H``, P = [Y, W Z],
    ``K0 = [[0, Pi], [-Pi, 0]]``; with P = Q R, ``f(A) W = W + Q (f(K) - I) Q^H W``,
    K = R K0 R^H. Passes over W: ``W Z``, ``Q^H W`` and the update.

    "direct" acts from the right, with the part of Y outside W's range:
    ``M = W - s Y Pi Z^H``, c = W^H Y, ``a_perp = Y - W c``; with [Z, c] = Q R,
    ``M Q = [W Q, N] [I + B; R_a E]`` (N = a_perp T_a orthonormal, a_perp = N R_a)
    and ``polar(M) = W + (W Q (X_top - I) + N X_bottom) Q^H`` from the polar
    factor X of the small stacked matrix. Passes over W: ``W^H Y``, ``W c``,
    two more that orthogonalize a_perp against W again (see
    :func:`_direct_panels`), ``W Z``, ``W Q`` and the update. W's orthonormal columns are checked on
    span[Z, c], where the formula uses them: ``|W x| = |x|`` for x in c and
    in Z (c = W^H Y never sees the columns W maps to zero: a W with a zero
    column, or W = 0, passed the check on c alone). Eager calls only.
    """
    if variant == "direct":
        return _stiefel_direct(xp, W, Y, Z, lr=lr, rank=rank, cores=cores, sketched=sketched, names=names)
    n, l = W.shape[-2], Y.shape[-1]
    P, Cn, Cz, scale_panels = _left_panels(xp, W, Y, Z, sketched=sketched)
    Cn, Cz, *scales = cores.gather(Cn, Cz, *scale_panels)
    sxp = cores.xp
    eps = _eps(xp, W.dtype)
    tol = drop_tolerance(n, eps, cores.eps, cores.gram_eps)
    Cy, Ce = Cn[..., :l, :l], Cn[..., l:, l:]
    if not cores.traced:
        if not bool(sxp.all(sxp.isfinite(Cz))):
            _check_finite(sxp, Cy, names[0])
            raise StepInputError(names[1])
        _check_finite_blocks(sxp, Cn, (Cy, names[0]))
        if l == 1 and isinstance(lr, (int, float)) and _few(Cn):
            # one sketch column: 2 x 2 cores in closed form, matrix by matrix
            cores_ = [_left_core_tiny(Cp, Czp, scales_p, lr=lr, variant=variant, sketched=sketched, tol=tol,
                                      sxp=sxp, core_eps=cores.eps)
                      for (Cp, scales_p), (Czp, _) in zip(_each(Cn, scales), _each(Cz, []))]
            steps = max(newton_schulz_count(spread, 2, eps, cores.gram_eps) for _, _, spread in cores_)
            return _apply_left(xp, W, P, *_scatter_tiny(cores, Cn, cores_), steps)
        # |W z|^2 against |z|^2: W^H W = I
        _check_unitary(sxp, Cz, Ce)
    Pi = _sketch_projector(sxp, Cy, Cz, rank=rank, l=l, sketched=sketched, tol=tol)
    zero = sxp.zeros_like(Pi)
    K0 = sxp.concat([sxp.concat([zero, Pi], axis=-1), sxp.concat([-Pi, zero], axis=-1)], axis=-2)
    Cn = without_sketch_noise(sxp, Cn, Cy, sketched=sketched, copies=2)
    T, R, spread = gram_basis(sxp, Cn, tol, with_spread=not cores.traced)
    D = _skew_core(sxp, R @ K0 @ mH(sxp, R), _step_size(sxp, lr, scales), variant)
    steps = _reorthonormalize_steps(sxp, spread, Cn.shape[-1], eps, cores.gram_eps, tol)
    return _apply_left(xp, W, P, *_scatter(sxp, cores, Cn, T, D), steps)


@staged("sketched")
def _left_panels(xp, W, Y, Z, *, sketched):
    """The device's work of :func:`stiefel_update` before its small matrices
    go to the cores: (P, Cn, Cz, scales) with P = [Y, W Z], the Grams Cn of
    P and Cz of Z, and the panels' scales."""
    Y, Z, core, scales = prepare_panels(xp, W, Y, Z, sketched, multiplied=True)
    P, Cn = panel_gram(xp, [Y, matmul_panel(xp, W, Z)], core)
    return P, Cn, _gram(xp, [Z], core), scales


def _stiefel_direct(xp, W, Y, Z, *, lr, rank, cores, sketched, names):
    n, l = W.shape[-2], Y.shape[-1]
    Zc, a_perp, grams, scale_panels = _direct_panels(xp, W, Y, Z, sketched=sketched, checked=not cores.traced)
    Cm, Cn, *scales = cores.gather(*grams, *scale_panels)
    if not cores.traced:
        Ce, *scales = scales
    sxp = cores.xp
    eps = _eps(xp, W.dtype)
    tol = drop_tolerance(n, eps, cores.eps, cores.gram_eps)
    block = _blocks(Cn, (l, l, l))
    Cy = block(0, 0)
    if not cores.traced:
        _check_finite(sxp, Cy, names[0])
        _check_finite(sxp, Cm[..., :l, :l], names[1])
        _check_finite(sxp, Cn, "W")
        _check_finite(sxp, Cm, "W")
        # |W c|^2 against |c|^2 and |W Z|^2 against |Z|^2: W^H W = I
        _check_unitary(sxp, Cm[..., l:, l:], block(2, 2))
        _check_unitary(sxp, Cm[..., :l, :l], Ce)
        if l == 1 and Cn.ndim == 2 and isinstance(lr, (int, float)):
            # one matrix, one sketch column: the cores in closed form
            T, D, Ta, X_bottom, steps = _stiefel_direct_core_tiny(
                sxp, Cm, Cn, scales, lr=lr, sketched=sketched, tol=tol, eps=eps, core_eps=cores.eps,
                columns=W.shape[-1])
            on_device = _scatter_direct(sxp, cores, Cm, block(1, 1), T, D, Ta, X_bottom)
            # one column: T_a = 1 / |a_perp| normalises it, no Newton-Schulz step
            return _apply_stiefel_direct(xp, W, Zc, a_perp, on_device, steps, 0)
    Pi = _sketch_projector(sxp, Cy, Cm[..., :l, :l], rank=rank, l=l, sketched=sketched, tol=tol)
    zero = sxp.zeros_like(Pi)
    A0 = sxp.concat([sxp.concat([zero, zero], axis=-1), sxp.concat([Pi, zero], axis=-1)], axis=-2)
    Cm = without_sketch_noise(sxp, Cm, Cy, sketched=sketched, copies=2)
    T, R, spread = gram_basis(sxp, Cm, tol, with_spread=not cores.traced)
    size = _step_size(sxp, lr, scales)
    B = -size * (R @ A0 @ mH(sxp, R))
    E = -size * (Pi @ mH(sxp, R[..., :, :l]))
    # a column of Y inside W's range to rounding has no a_perp part: its
    # computed a_perp (about eps sqrt(m) |y|) is cancellation noise; dropping
    # it keeps N orthogonal to W's range (keeping it would cost only an error
    # of that size)
    Ca = block(1, 1)
    da, dy = sxp.real(sxp.linalg.diagonal(Ca)), sxp.real(sxp.linalg.diagonal(Cy))
    keep = sxp.astype(da > _in_range_threshold(eps, W.shape[-1]) * dy, Ca.dtype)
    Ca = without_sketch_noise(sxp, Ca * (keep[..., :, None] * keep[..., None, :]), Cy, sketched=sketched, copies=1)
    Ta, Ra, spread_a = gram_basis(sxp, Ca, tol, with_spread=not cores.traced)
    D, X_bottom = polar_minus_identity(sxp, B, bottom=Ra @ E, traced=cores.traced)
    steps = _reorthonormalize_steps(sxp, spread, Cm.shape[-1], eps, cores.gram_eps, tol)
    steps_a = _reorthonormalize_steps(sxp, spread_a, l, eps, cores.gram_eps, tol)
    on_device = _scatter_direct(sxp, cores, Cm, Ca, T, D, Ta, X_bottom)
    return _apply_stiefel_direct(xp, W, Zc, a_perp, on_device, steps, steps_a)


@staged("sketched", "checked")
def _direct_panels(xp, W, Y, Z, *, sketched, checked):
    """The device's work of :func:`_stiefel_direct` before its small matrices
    go to the cores: (Zc, a_perp, Grams, scales) with the panel Zc = [Z, c],
    ``c = W^H Y``, ``a_perp = Y - W c``, the Grams of Zc and of
    [Y, a_perp, W c], and where ``checked`` the Gram of W Z too."""
    Y, Z, core, scales = prepare_panels(xp, W, Y, Z, sketched, multiplied=True)
    c = adjoint_matmul(xp, W, Y)
    Wc = matmul_panel(xp, W, c)
    a_perp = Y - Wc
    # once more against W's columns (Gram-Schmidt twice): where W^H W = I + Delta,
    # W^H (Y - W c) = -Delta c, and N = a_perp T_a carried Delta |c| / |a_perp|
    # into the new W; for a nearly square W (a_perp short beside c) the drift
    # grew by that factor every step, 1e-16 to 1e-2 in 80 float64 steps of a
    # 5 x 4 W. Twice it is Delta^2 c: drift stays at rounding (two passes more)
    a_perp = a_perp - matmul_panel(xp, W, adjoint_matmul(xp, W, a_perp))
    Zc, Czc = panel_gram(xp, [Z, c], core)
    grams = [Czc, _gram(xp, [Y, a_perp, Wc], core)]
    if checked:
        # a product of its own: on the CPU an n x 2l panel [W Z, W c] costs as much as two to four of them
        grams.append(_gram(xp, [matmul_panel(xp, W, Z)], core))
    return Zc, a_perp, grams, scales


def _scatter_direct(sxp, cores, Cm, Ca, T, D, Ta, X_bottom):
    """(T, D, Ta, X_bottom, column scale of [Z, c] or None, column scale of
    a_perp or None) on the device in one transfer: both panels balanced (see
    :func:`balance_columns`, with the Grams Cm of [Z, c] and Ca of a_perp) where
    needed. A float32 gradient of 1e-40 gave T of about 2**133, Inf in
    float32, and a NaN step."""
    T, zc_scale = balance_columns(sxp, Cm, T, cores.traced, cores.balance_bound)
    Ta, a_scale = balance_columns(sxp, Ca, Ta, cores.traced, cores.balance_bound)
    return scatter_present(cores, T, D, Ta, X_bottom, zc_scale, a_scale)


def _in_range_threshold(eps, m):
    """|a_perp|^2 / |y|^2 at or below which a column of Y counts as inside
    W's range (see _stiefel_direct)."""
    return 64 * eps * eps * max(m, 64)


@staged("steps", "steps_a")
def _apply_stiefel_direct(xp, W, Zc, a_perp, cores_on_device, steps, steps_a):
    """(L, Rh) of the direct step on a tall W from its cores (T, D, Ta,
    X_bottom) and the panels' column scales on the device
    (:func:`_scatter_direct`): ``W Q D Q^H`` with Q = [Z, c] T (Zc, the panel
    [Z, c]), plus a_perp's part ``N X_bottom Q^H`` with N = a_perp Ta.

    Both bases get their Newton-Schulz steps (``steps``, ``steps_a``): the
    new W has orthonormal columns only where [W Q, N] does, and N = a_perp Ta
    from the Gram of an ill-conditioned a_perp departed from orthonormal
    columns by 1e-6 and more (float64, a gradient whose singular values spread
    over 1e10)."""
    T, D, Ta, X_bottom, zc_scale, a_scale = cores_on_device
    L, Rh = _apply_right(xp, W, Zc, T, D, steps, zc_scale)
    N = newton_schulz_basis(xp, a_perp, Ta, steps_a, a_scale)
    return L + panel_times_small(xp, N, X_bottom), Rh


def _stiefel_direct_core_tiny(sxp, Cm, Cn, scales, *, lr, sketched, tol, eps, core_eps, columns):
    """The cores of :func:`_stiefel_direct` for one matrix and l = 1, from the
    closed forms of ``_tiny``: Cm (2 x 2, finite) the Gram of [Z, c], Cn
    (3 x 3) that of [Y, a_perp, W c]. Returns (T, D, Ta, X_bottom,
    Newton-Schulz steps) with the cores as host arrays (2 x 2, 2 x 2, 1 x 1,
    1 x 2)."""
    (cy, _, _), (_, ca, _), _ = Cn.tolist()
    cy, ca = cy.real, ca.real
    Pi = (1 / cy if cy > 0 else 0.0) if sketched else 1.0  # see _sketch_projector
    T, R, spread = gram_basis2(Cm.tolist(), tol)
    size = _step_size(sxp, lr, _numbers(scales))
    B = _direct_generator_tiny(R, Pi, size)  # and E = -size Pi R[:, :1]^H
    # a_perp = N R_a with N = a_perp T_a: 1 x 1 Gram, dropped inside W's range
    root = math.sqrt(ca) if ca > _in_range_threshold(eps, columns) * cy and ca > 0 else 0.0
    bottom = (tuple(-size * Pi * root * _conj(R[j][0]) for j in range(2)),)  # R_a E
    polar = polar_small2(B, bottom)
    if polar is None:
        D, X_bottom = polar_minus_identity(sxp, sxp.asarray(B, dtype=Cm.dtype),
                                           bottom=sxp.asarray(bottom, dtype=Cm.dtype), traced=False)
        X_bottom = X_bottom.tolist()
    else:
        D, X_bottom = polar
    Ta = ((1 / root if root > 0 else 0.0,),)
    T, D, Ta, X_bottom = (sxp.asarray(x, dtype=Cm.dtype) for x in (T, D, Ta, X_bottom))
    return T, D, Ta, X_bottom, newton_schulz_count(spread, 2, eps, core_eps)


def prepare_panels(xp, W, Y, Z, sketched, *, multiplied=False):
    """Y and Z broadcast to the common batch, rescaled where the cores need it
    (see :func:`_needs_scaling`), in W's dtype; the core dtype and the scales
    to gather (their product multiplies the step).

    ``multiplied``: the step multiplies W by them (a tall W: ``W Z``, ``W c``)
    and checks W's unitarity on those products, so they are rescaled in every
    precision. W times a panel of subnormal entries rounds to the subnormal
    grid and loses the digits the check compares: a float32 gradient of
    1e-42 on a rectangular W was refused as "W is not unitary" for about one
    seed in sixty."""
    Y, Z = _broadcast_batch(xp, W, Y, Z)
    core = core_dtype(xp, W.dtype, device(W))
    scales = []
    if multiplied or _needs_scaling(xp, W.dtype, core):
        if not sketched:
            Y, sy = _scaled(xp, Y)
            scales.append(sy)
        Z, sz = _scaled(xp, Z)
        scales.append(sz)
    return Y, Z, core, [xp.astype(x, core) for x in scales]


def _scatter(sxp, cores, C, T, D):
    """(T, D, column scale or None) on the device, in one transfer; the panel
    columns balanced (see :func:`balance_columns`) where needed."""
    T, column_scale = balance_columns(sxp, C, T, cores.traced, cores.balance_bound)
    return scatter_present(cores, T, D, column_scale)


@staged("reorthonormalize")
def _apply_left(xp, W, P, T, D, column_scale, reorthonormalize):
    """(L, Rh) = (Q D, Q^H W) with Q = P T: the new W is ``(I + Q D Q^H) W``,
    unitary to rounding whenever Q has orthonormal columns."""
    Q = newton_schulz_basis(xp, P, T, reorthonormalize, column_scale)
    return panel_times_small(xp, Q, D), adjoint_rows(xp, Q, W)


def transport_update(xp, W, a, b, *, t, cores, cayley=False):
    """(L, Rh) with ``f(t (a b^H - b a^H)) W = W + L @ Rh``, f = expm, or the
    Cayley map ``f(X) = (I - X/2)^(-1) (I + X/2)`` when ``cayley``.

    Square W: in W's frame the generator is ``W^H X W = P K0 P^H`` with the
    panel ``P = W^H [a, b]`` and ``K0 = [[0, I], [-I, 0]]``; with Q = P T an
    orthonormal basis of span P and P = Q R, the result is
    ``W (I + Q (f(t K) - I) Q^H)``, ``K = R K0 R^H``. Passes over W:
    ``[a, b]^H W``, ``W Q`` and the update; the Gram of the first panel shows
    NaN/Inf and W's unitarity for free. Non-square W (..., n, m): from the
    left, ``(I + Q (f(t K) - I) Q^H) W`` with P = [a, b] itself, exact for any W;
    passes: ``Q^H W``, the update, and W's largest |entry| for its NaN/Inf
    check, which no Gram makes there.
    """
    n, k = W.shape[-2], a.shape[-1]
    square = W.shape[-1] == n
    panels, C, scales, largest_W = _transport_panels(xp, W, a, b)
    C, *gathered = cores.gather(C, *scales, *largest_W)
    scales, largest_W = gathered[:len(scales)], gathered[len(scales):]
    P = panels[0]
    sxp = cores.xp
    # clamped whether or not the panels were scaled: t = 1.8e308 times K
    # overflowed in the cores of a float32 W (no scales), and W became NaN
    # (t times the scales, clamped as a whole: see _step_size)
    t = _exact_product(sxp, t, _numbers(scales) if not cores.traced and C.ndim == 2 else scales, nested=False)
    CP = C[..., :2 * k, :2 * k]
    CW = C[..., 2 * k:, 2 * k:] if square else CP
    eps = _eps(xp, W.dtype)
    tol = drop_tolerance(n, eps, cores.eps, cores.gram_eps)
    if not cores.traced:
        _check_finite_blocks(sxp, C, (C[..., :k, :k], "a"), (CP, "b"))
        for top in largest_W:
            _check_finite(sxp, top, "W")
        if k == 1 and C.ndim == 2 and isinstance(t, (int, float)):
            # one matrix, one column each: 2 x 2 cores in closed form
            if square:
                full = C.tolist()
                deviation = _unitarity_deviation_tiny([row[:2] for row in full[:2]], [row[2:] for row in full[2:]])
                if not deviation <= UNITARITY_TOLERANCE:
                    raise UnitarityError(deviation, UNITARITY_TOLERANCE)
            T, R, spread = gram_basis2(CW.tolist(), tol)
            # K = R [[0, 1], [-1, 0]] R^H, f(t K) with t as given (size -2 t for the tangent
            # convention of _skew_core_tiny, -t for the Cayley one)
            D = _skew_core_tiny(CW, R, 1.0, -t if cayley else -2 * t, "cayley" if cayley else "tangent", cores.eps)
            steps = newton_schulz_count(spread, 2, eps, cores.gram_eps)
            T, D, column_scale = _scatter_tiny(cores, CW, [(T, D)])
            if square:
                return _apply_right(xp, W, panels[1], T, D, steps, column_scale)
            return _apply_left(xp, W, P, T, D, column_scale, steps)
        if square:
            _check_unitary(sxp, CP, CW)
    T, R, spread = gram_basis(sxp, CW, tol, with_spread=not cores.traced)
    steps = _reorthonormalize_steps(sxp, spread, CW.shape[-1], eps, cores.gram_eps, tol)
    identity = sxp.broadcast_to(sxp.eye(k, dtype=C.dtype), (*C.shape[:-2], k, k))
    zero = sxp.zeros_like(identity)
    K0 = sxp.concat([sxp.concat([zero, identity], axis=-1), sxp.concat([-identity, zero], axis=-1)], axis=-2)
    D = expm_skew_minus_identity(sxp, R @ K0 @ mH(sxp, R), t, cayley=cayley)
    T, D, column_scale = _scatter(sxp, cores, CW, T, D)
    if square:
        return _apply_right(xp, W, panels[1], T, D, steps, column_scale)
    return _apply_left(xp, W, P, T, D, column_scale, steps)


@staged()
def _transport_panels(xp, W, a, b):
    """The device's work of :func:`transport_update` before its small matrices
    go to the cores: (panels, C, scales, largest) with the panels P = [a, b]
    and, for a square W, ``W^H P``, their Gram C, the scales of a and b
    where the cores need them (see :func:`_needs_scaling`; they multiply t),
    and for a rectangular W its largest |entry| (NaN or Inf where W has
    one), in a list: the Grams show NaN and Inf in a, b and a square W, and
    a rectangular W, which no Gram reads, gave a NaN result without a word.
    All go to the host in the Grams' transfer."""
    a, b = _broadcast_batch(xp, W, a, b)
    core = core_dtype(xp, W.dtype, device(W))
    scales = []
    if _needs_scaling(xp, W.dtype, core):
        (a, sa), (b, sb) = _scaled(xp, a), _scaled(xp, b)
        scales = [xp.astype(sa, core), xp.astype(sb, core)]
    P = xp.concat([a, b], axis=-1)
    square = W.shape[-1] == W.shape[-2]
    panels = [P, adjoint_matmul(xp, W, P)] if square else [P]
    if square:
        largest = []
    elif math.prod(W.shape):
        largest = [xp.astype(xp.max(xp.abs(W)), core)]
    else:  # an empty batch: a maximum over nothing has no value
        largest = [xp.zeros((), dtype=core, device=device(W))]
    return panels, _gram(xp, panels, core), scales, largest


def _broadcast_batch(xp, W, *panels):
    """The panels broadcast to the common batch of W and the panels (as they
    are when all are single matrices, the common case: no calls)."""
    if W.ndim == 2 and all(x.ndim == 2 for x in panels):
        return panels
    batch = broadcast_shapes(*(tuple(x.shape[:-2]) for x in (W, *panels)))
    return tuple(xp.broadcast_to(x, (*batch, *x.shape[-2:])) for x in panels)
