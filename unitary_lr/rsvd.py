"""Randomized truncated SVD."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from ._host import from_host, staged
from ._random import as_generator, host_normal
from ._validation import (
    check_float_dtype,
    check_int,
    check_matrix,
    namespace_of,
    report_nonfinite,
)
from ._xp import adjoint_matmul, device, exact_products, is_complex, mH

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
        and device.

    Returns
    -------
    SVDResult
        Named tuple ``(U, S, Vh)`` with shapes (..., m, rank), (..., rank) and
        (..., rank, n), as ``xp.linalg.svd(A, full_matrices=False)`` truncated
        to ``rank``; S is real and descending.

    Raises
    ------
    TypeError
        A is not an array of a supported floating dtype; wrong argument types.
    ValueError
        rank outside ``[1, min(m, n)]``, negative oversample or power_iters,
        NaN or Inf in A.

    Notes
    -----
    Halko, Martinsson and Tropp (2011), Algorithms 4.4 and 5.1: ``Y = A Omega``
    with a Gaussian ``Omega`` (complex Gaussian for complex A), ``power_iters``
    rounds of ``Y <- A (A^H Y)`` with a QR after each product, ``Q = qr(Y)``,
    then the SVD of the small ``B = Q^H A`` and ``U = Q U_B``. Each singular
    pair's phase is made canonical (the largest-magnitude entry of each column
    of U real and positive, Vh's row rotated to match), so the same seed gives
    the same factors on every backend, not only the same product. Cost:
    ``(2 + 2 power_iters)`` passes over A, O(m n l) flops with
    ``l = rank + oversample``, and O((m + n) l) memory. The NaN/Inf check looks
    at the sketch ``A Omega``, not at A, so it costs no extra pass.

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
    # the host draw goes with the call of the staged sketch (see _host.staged)
    Y, finite = _sketch(xp, A, from_host(xp, draw, dtype=A.dtype, device=device(A), staged=True))
    if not bool(finite):
        report_nonfinite(xp, "A", A, source="its sketch")
    Q, Bh, finite = _range_basis(xp, A, Y, power_iters=power_iters)
    if not bool(finite):
        report_nonfinite(xp, "A", A, source="its sketch")  # finite A whose products overflow
    return SVDResult(*_small_svd(xp, Q, Bh, rank=rank))


# The phases of randomized_svd between its checks, each one program on eager
# JAX arrays (see _host.staged); the checks read one flag each.
@staged()
def _sketch(xp, A, omega):
    """(Y, whether Y is finite) for the sketch ``Y = A omega``."""
    with warnings.catch_warnings():
        # NaN/Inf in A is reported by the caller as a ValueError naming the argument;
        # the library's own "invalid value in matmul" warning would only repeat it.
        warnings.simplefilter("ignore", RuntimeWarning)
        Y = A @ omega
    return Y, xp.all(xp.isfinite(Y))


@staged("power_iters")
def _range_basis(xp, A, Y, *, power_iters):
    """(Q, Bh, whether Bh is finite): Q = qr(Y) after ``power_iters`` rounds
    of ``Y <- A (A^H Y)`` with a QR after each product, and ``Bh = A^H Q``."""
    Q, _ = xp.linalg.qr(Y, mode="reduced")
    for _ in range(power_iters):
        Q, _ = xp.linalg.qr(adjoint_matmul(xp, A, Q), mode="reduced")
        Q, _ = xp.linalg.qr(A @ Q, mode="reduced")
    Bh = adjoint_matmul(xp, A, Q)
    return Q, Bh, xp.all(xp.isfinite(Bh))


@staged("rank")
def _small_svd(xp, Q, Bh, *, rank):
    """(U, S, Vh) truncated to ``rank``, phases canonical, from Q and
    ``Bh = A^H Q``: B = Q^H A is (l, n); the SVD of its transpose
    ``B^H = U_b S V_b^H`` gives ``A ~ Q B = (Q V_b) S U_b^H``."""
    Ub, S, Vbh = xp.linalg.svd(Bh, full_matrices=False)
    U, Vh = canonical_phases(xp, Q @ mH(xp, Vbh[..., :rank, :]), mH(xp, Ub[..., :, :rank]))
    return U, S[..., :rank], Vh


def sketch_width(rank, oversample, m, n):
    """Columns of the Gaussian test matrix: rank + oversample, at most min(m, n)."""
    return min(rank + oversample, m, n)


def canonical_phases(xp, U, Vh):
    """(U, Vh) with each singular pair's free phase fixed: the largest-magnitude
    entry of each column of U made real and positive, the row of Vh rotated by
    the same phase, so ``U diag(S) Vh`` is unchanged.

    Each backend's LAPACK picks its own signs (torch and NumPy disagreed on 49
    of 50 columns for one seed); after this the factors, not only their
    product, agree across backends for the same seed. Thin panels only, no
    pass over A, and no Python branch on array values (traceable). A zero
    column keeps its phase.
    """
    m = U.shape[-2]
    top = xp.argmax(xp.abs(U), axis=-2, keepdims=True)  # (..., 1, k), the first of ties
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
