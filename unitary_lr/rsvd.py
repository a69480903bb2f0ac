"""Randomized truncated SVD."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy

from . import _lean_numpy
from ._cores import (
    HostCores,
    balance_bound,
    drop_tolerance,
    hermitian_eigh,
    host_xp,
    largest,
    scatter_present,
)
from ._flow import (
    balance_columns,
    newton_schulz_basis,
    newton_schulz_count,
    panel_gram,
    prepare_panels,
    sketch_basis,
    sketch_panels,
)
from ._host import from_host, host_views, outside_torch_graph, staged, torch_factors
from ._random import as_generator, host_normal
from ._validation import (
    check_float_dtype,
    check_int,
    check_matrix,
    namespace_of,
    refuse_jax_trace,
    report_nonfinite,
)
from ._xp import (
    adjoint_matmul,
    core_dtype,
    device,
    exact_products,
    is_complex,
    mH,
    max_abs,
    namespace,
    real_finfo,
    reduced_qr,
    thin_svd,
)

__all__ = ["SVDResult", "randomized_svd"]


class SVDResult(NamedTuple):
    """Truncated SVD ``A ~ U @ diag(S) @ Vh``, as returned by ``randomized_svd``.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import randomized_svd
    >>> result = randomized_svd(np.diag([3.0, 2.0, 1.0]), 2, rng=0)
    >>> result.S.round(12).tolist(), result.U.shape, result.Vh.shape
    ([3.0, 2.0], (3, 2), (2, 3))
    """

    U: Any
    """Left singular vectors, shape (..., m, rank), orthonormal columns."""
    S: Any
    """Singular values, shape (..., rank), real, in descending order."""
    Vh: Any
    """Conjugate-transposed right singular vectors, shape (..., rank, n)."""


@outside_torch_graph(
    "it draws its test matrix from a NumPy generator and chooses its route from small matrices read on the host")
@exact_products
def randomized_svd(A, /, rank, *, oversample=10, power_iters=2, rng=None):
    r"""Truncated SVD of A from a randomized range finder.

    Parameters
    ----------
    A : array, shape (..., m, n)
        Real or complex matrices; leading axes are a batch.
    rank : int
        Number of singular triplets to return, ``1 <= rank <= min(m, n)``.
    oversample : int, optional
        Extra sketch columns beyond ``rank`` (the sketch has
        ``min(rank + oversample, m, n)`` columns).
    power_iters : int, optional
        Subspace (power) iterations; each costs two more passes over A and
        sharpens the result when the spectrum decays slowly.
    rng : None, int or numpy.random.Generator, optional
        Source of the Gaussian test matrix. The numbers are drawn on the host
        with NumPy, so the same seed gives the same result on every backend
        and device (where the truncation is unique: with ``S[rank - 1]`` tied
        to the next singular value, rounding picks one of the equally good
        subspaces, which can differ between backends).

    Returns
    -------
    SVDResult
        Named tuple ``(U, S, Vh)`` with shapes (..., m, rank), (..., rank) and
        (..., rank, n), as ``xp.linalg.svd(A, full_matrices=False)`` truncated
        to ``rank``; S is real and descending.

    Raises
    ------
    TypeError
        A is not an array of a supported floating dtype; wrong argument types;
        A is a JAX tracer (the call draws on the host and reads small Grams
        there, so it does not run under ``jax.jit`` or other JAX
        transformations). Under ``torch.compile`` it runs outside the graph,
        as an eager call (with ``fullgraph=True`` Dynamo refuses it, naming
        it).
    ValueError
        rank outside ``[1, min(m, n)]``, negative oversample or power_iters,
        NaN or Inf in A.

    Notes
    -----
    Halko, Martinsson and Tropp (2011), Algorithms 4.4 and 5.1, with every
    small factorization on the host: the sketch ``Y = A Omega`` with a
    Gaussian ``Omega`` (complex Gaussian for complex A), ``power_iters``
    rounds of ``Y <- A (A^H Y)`` with a new well-conditioned basis of each
    panel from the shifted Cholesky factor of its Gram (no QR), and
    ``Z = A^H Y``: then ``A ~ Q Q^H A`` with ``Q = Y T`` orthonormal, and
    ``B^H = A^H Q = Z T``. The Grams of Y and Z go to the host in one
    transfer; there, T comes from the eigendecomposition of ``Y^H Y``, and the
    top singular triplets of B from that of the small ``T^H Z^H Z T``; the
    factors ``U = Y T V_b``, ``V = Z T V_b S^-1`` come back in one transfer
    and are formed on the device, with Newton-Schulz steps where the Grams
    leave them short of orthonormal. No QR or SVD of an n x l panel, and no
    other read of a device value. The NaN/Inf check reads the two Grams.

    A Gram squares the spread of the singular values: it resolves
    ``S_rank`` to about ``eps_64 (S_1 / S_rank)^2`` relative, where an SVD of
    B in A's precision resolves it to ``eps (S_1 / S_rank)``. When that loses
    more than a few digits against A's own precision (float64 A, or a
    32-bit A on a device without float64, whose ``S_1 / S_rank`` exceeds 16;
    float32 and complex64 with float64 Grams only far down, at about 1e4,
    where both lose most of theirs) or the sketch has fewer than ``rank``
    directions (A of lower rank, A = 0), the call finishes as Halko et al.
    do: a QR of the sketch, ``B^H = A^H Q`` (one more pass over A) and the
    SVD of that n x l panel.

    Each singular pair's phase is made canonical (the largest-magnitude entry
    of each column of U real and positive, Vh's row rotated to match), so the
    same seed gives the same factors on every backend, not only the same
    product. Cost: ``(2 + 2 power_iters)`` passes over A (one more on the
    QR route), O(m n l) flops with ``l = rank + oversample``, and O((m + n) l)
    memory.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import randomized_svd
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 40))
    >>> U, S, Vh = randomized_svd(A, 3, rng=1)
    >>> bool(np.allclose((U * S) @ Vh, A))
    True
    """
    xp = namespace_of(A=A)
    refuse_jax_trace(
        "randomized_svd", {"A": A},
        "it draws its test matrix on the host from a NumPy generator (a trace would freeze it into one "
        "constant) and chooses its route from small Grams read on the host",
        "Call it on concrete arrays, outside the transformation")
    check_float_dtype(xp, "A", A)
    check_matrix("A", A)
    m, n = A.shape[-2:]
    rank = check_int(
        "rank", rank, minimum=1, maximum=min(m, n), maximum_reason=f" = min(m, n) for A of shape {tuple(A.shape)}"
    )
    oversample = check_int("oversample", oversample, minimum=0)
    power_iters = check_int("power_iters", power_iters, minimum=0)
    draw = host_normal(xp, (*A.shape[:-2], n, sketch_width(rank, oversample, m, n)), dtype=A.dtype,
                       rng=as_generator(rng))
    views = host_views(xp, A)
    if views is not None:
        # a small PyTorch CPU tensor: NumPy's calls on its view cost a fraction
        # of PyTorch's CPU dispatch (see _host.host_views); NaN or Inf is
        # reported by PyTorch's own call below, in its own words
        try:
            return SVDResult(*torch_factors(_svd(namespace(views[0]), views[0], draw, rank, power_iters)))
        except ValueError:
            pass
    return SVDResult(*_svd(xp, A, draw, rank, power_iters))


def _svd(xp, A, draw, rank, power_iters):
    """:func:`randomized_svd` of the checked A with its sketch's host draw:
    the factors (U, S, Vh). One NumPy matrix (or a PyTorch CPU tensor's
    NumPy view) takes the host's lean form of the same operations, which
    hands anything out of the ordinary back to the general one below."""
    if _lean_numpy.takes_svd(A, draw):
        factors = _lean_numpy.svd_factors(A, draw, rank, power_iters)
        if factors is not None:
            return factors
    m = A.shape[-2]
    # the host draw goes with the call of the staged sketch (see _host.staged)
    omega = from_host(xp, draw, dtype=A.dtype, device=device(A), staged=True)
    Y, Z, Cy, Cz, scales = _sketch(xp, A, omega, power_iters=power_iters)
    cores = HostCores(xp, A)
    Cy, Cz, *scales = cores.gather(Cy, Cz, *scales)
    if not (bool(host_xp.all(host_xp.isfinite(Cy))) and bool(host_xp.all(host_xp.isfinite(Cz)))):
        report_nonfinite(xp, "A", A, source="its sketch")
    # the Grams' precision: the cores' float64 where the device has it, else A's own
    gram_eps = real_finfo(xp, core_dtype(xp, A.dtype, device(A)))[0]
    small = _small_factors(Cy, Cz, scales, rank=rank, rows=m, eps=real_finfo(xp, A.dtype)[0], gram_eps=gram_eps)
    if small is None:
        Q, Bh, finite = _range_basis(xp, A, Y)
        if not bool(finite):
            report_nonfinite(xp, "A", A, source="its sketch")  # finite A whose products overflow
        return _small_svd(xp, Q, Bh, rank=rank)
    Fu, Fv, S, steps_u, steps_v = small
    # Y's and Z's columns balanced by powers of two where the coefficients
    # would leave A's range: a float32 A of entries 1e-40 has |Z| near
    # 1e-40 (its singular values), F_v = F_u / S near 1e40, Inf in float32,
    # and Vh came back NaN
    bound = balance_bound(xp, A.dtype)
    (Fu, scale_u), (Fv, scale_v) = (balance_columns(host_xp, C, F, False, bound)
                                    for C, F in ((Cy, Fu), (Cz, Fv)))
    Fu, Fv, S, scale_u, scale_v = scatter_present(cores, Fu, Fv, S, scale_u, scale_v)
    return _factors(xp, Y, Z, Fu, Fv, S, scale_u, scale_v, steps_u=steps_u, steps_v=steps_v)


# The phases of randomized_svd between its host reads, each one program on
# eager JAX arrays (see _host.staged).
@staged("power_iters")
def _sketch(xp, A, omega, *, power_iters):
    """(Y, Z, Cy, Cz, scales): the sketch's panels (``_flow.sketch_panels``),
    Z rescaled where the Grams are formed in A's own precision, their Grams
    in the cores' dtype and the scales to gather."""
    # NaN/Inf in A is reported by the caller as a ValueError naming the argument;
    # NumPy's own "invalid value in matmul" warning would only repeat it.
    with numpy.errstate(all="ignore"):
        Y, Z = sketch_panels(xp, A, omega, power_iters)
        Y, Z, core, scales = prepare_panels(xp, A, Y, Z, sketched=True)
        Cy, Cz = (panel_gram(xp, [P], core)[1] for P in (Y, Z))
    return Y, Z, Cy, Cz, scales


# Where the Gram route gives up: its error in S_rank, about gram_eps (S_1 /
# S_rank)^2 relative, at most this many times the error eps (S_1 / S_rank) of
# an SVD of B in A's precision; and V's departure from orthonormal columns
# small enough for Newton-Schulz steps (each squares it) to remove.
_GRAM_LOSS = 16
_NEWTON_SCHULZ_REACH = 1e-2


def _small_factors(Cy, Cz, scales, *, rank, rows, eps, gram_eps):
    """On the host, from the Grams of Y and Z (float64/complex128): the
    coefficients ``(F_u, F_v, S, steps_u, steps_v)`` of ``U = Y F_u`` and
    ``V = Z F_v`` and their Newton-Schulz steps; None where the Gram route
    would lose accuracy (see :func:`randomized_svd`'s notes). ``eps``: A's
    precision; ``gram_eps``: the Grams' (float64 where the device has it)."""
    hxp = host_xp
    l = Cy.shape[-1]
    T, _, spread = sketch_basis(hxp, Cy, drop_tolerance(rows, eps, gram_eps))
    lam, Vb = hermitian_eigh(hxp, mH(hxp, T) @ Cz @ T)
    lam, Vb = lam[..., ::-1][..., :rank], Vb[..., ::-1][..., :rank]
    top, low = lam[..., 0], lam[..., -1]
    if not hxp.all(low > 0):
        return None
    ratio = largest(top / low, 1.0)
    departure = eps * (ratio * rank) ** 0.5 + gram_eps * ratio * rank
    if gram_eps * ratio > _GRAM_LOSS * eps * ratio**0.5 or departure > _NEWTON_SCHULZ_REACH:
        return None
    root = hxp.sqrt(lam)
    Fu = T @ Vb
    Fv = Fu / root[..., None, :]
    S = root
    for scale in scales:
        S = S * scale[..., 0]
    spread = largest(spread, 1.0)
    return (Fu, Fv, S, newton_schulz_count(spread, l, eps, gram_eps),
            newton_schulz_count(spread * ratio, rank, eps, gram_eps))


@staged("steps_u", "steps_v")
def _factors(xp, Y, Z, Fu, Fv, S, scale_u=None, scale_v=None, *, steps_u, steps_v):
    """(U, S, Vh) from the host's coefficients: ``U = Y F_u`` and
    ``V = Z F_v`` (the panels' columns scaled first where given) with their
    Newton-Schulz steps, S real, phases canonical."""
    U = newton_schulz_basis(xp, Y, Fu, steps_u, scale_u)
    V = newton_schulz_basis(xp, Z, Fv, steps_v, scale_v)
    U, Vh = canonical_phases(xp, U, mH(xp, V))
    return U, xp.real(S) if is_complex(xp, S.dtype) else S, Vh


@staged()
def _range_basis(xp, A, Y):
    """(Q, Bh, whether Bh is finite): Q = qr(Y) and ``Bh = A^H Q``, the QR
    route of :func:`randomized_svd`."""
    Q, _ = reduced_qr(xp, Y)
    Bh = adjoint_matmul(xp, A, Q)
    return Q, Bh, xp.all(xp.isfinite(Bh))


@staged("rank")
def _small_svd(xp, Q, Bh, *, rank):
    """(U, S, Vh) truncated to ``rank``, phases canonical, from Q and
    ``Bh = A^H Q``: B = Q^H A is (l, n); the SVD of its transpose
    ``B^H = U_b S V_b^H`` gives ``A ~ Q B = (Q V_b) S U_b^H``."""
    Ub, S, Vbh = thin_svd(xp, Bh)
    U, Vh = canonical_phases(xp, Q @ mH(xp, Vbh[..., :rank, :]), mH(xp, Ub[..., :, :rank]))
    return U, S[..., :rank], Vh


def sketch_width(rank, oversample, m, n):
    """Columns of the Gaussian test matrix: rank + oversample, at most min(m, n)."""
    return min(rank + oversample, m, n)


def _phase_tolerance(xp, dtype):
    """How close to a column's largest magnitude an entry counts as tied
    with it (:func:`canonical_phases`): sqrt(eps) of the dtype, far above the
    rounding that tells computed ties apart and far below a real gap."""
    return real_finfo(xp, dtype)[0] ** 0.5


def canonical_phases(xp, U, Vh):
    """(U, Vh) with each singular pair's free phase fixed: the largest-magnitude
    entry of each column of U made real and positive, the row of Vh rotated by
    the same phase, so ``U diag(S) Vh`` is unchanged.

    Each backend's LAPACK picks its own signs (torch and NumPy disagreed on 49
    of 50 columns for one seed); after this the factors, not only their
    product, agree across backends for the same seed. The entry taken is the
    first of those within a relative ``sqrt(eps)`` of the column's largest
    magnitude (:func:`_phase_tolerance`): a column of tied largest entries
    (a singular vector ``(1, -1, 0, ...) / sqrt(2)``) has them equal only
    to rounding, which each backend broke its own way, and the signs then
    differed (8 of 20 seeds, NumPy against JAX). Thin panels only, no pass
    over A, and no Python branch on array values (traceable). A zero column
    keeps its phase.
    """
    m = U.shape[-2]
    magnitude = xp.abs(U)
    largest = max_abs(xp, U, axis=-2)
    near = magnitude >= largest * (1 - _phase_tolerance(xp, U.dtype))
    # (..., 1, k): the first entry near the largest (argmax takes the first of equal values)
    top = xp.argmax(xp.astype(near, largest.dtype), axis=-2, keepdims=True)
    rows = xp.reshape(xp.arange(m, dtype=top.dtype, device=device(U)), (m, 1))
    u = xp.sum(xp.where(rows == top, U, xp.zeros_like(U)), axis=-2)  # (..., k)
    size = xp.abs(u)
    if is_complex(xp, U.dtype):
        # u / |u|, and 1 for u = 0 (the division is guarded, not branched on)
        phase = xp.where(size > 0, u / xp.astype(xp.where(size > 0, size, xp.ones_like(size)), U.dtype),
                         xp.ones_like(u))
        return U * xp.conj(phase)[..., None, :], Vh * phase[..., :, None]
    sign = xp.where(u < 0, -xp.ones_like(u), xp.ones_like(u))
    return U * sign[..., None, :], Vh * sign[..., :, None]
