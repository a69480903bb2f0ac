"""Exponential transport along a low-rank skew-Hermitian direction."""

from __future__ import annotations

from ._cores import add_lowrank, make_cores
from ._flow import checked, transport_update
from ._host import is_traced
from ._validation import check_real_scalar, unitary_and_factors

__all__ = ["exp_transport"]


def exp_transport(W, a, b, /, *, t=1.0):
    r"""Move W along the geodesic ``expm(t (a b^H - b a^H)) @ W`` in O(k n^2).

    Parameters
    ----------
    W : array, shape (..., n, n)
        The matrix to transport, normally unitary (complex) or orthogonal (real).
    a, b : arrays, shape (..., n, k)
        Factors of the rank <= 2k skew-Hermitian generator ``X = a b^H - b a^H``.
        Batch axes broadcast against those of W.
    t : float, optional
        Step along the geodesic; any finite real number.

    Returns
    -------
    array, shape (..., n, n)
        ``expm(t X) @ W`` in the namespace and on the device of W, with dtype
        ``result_type(W, a, b)``. Unitary to rounding for every t when W is.

    Raises
    ------
    TypeError
        Arguments that are not arrays, arrays from different libraries, or
        dtypes other than float32, float64, complex64, complex128.
    ValueError
        Non-square W, a and b of different shapes or not matching W, batch
        axes that do not broadcast, NaN or Inf in a or b, non-finite t.

    Notes
    -----
    With ``[a, b] = Q R`` (reduced QR, Q of shape (n, r), r <= 2k) the generator
    lives in span Q, so ``expm(t X) W = W + Q (expm(t K) - I) (Q^H W)`` with the
    r x r skew-Hermitian ``K = Q^H X Q = R_a R_b^H - R_b R_a^H``. ``expm(t K) - I``
    comes from the Hermitian eigendecomposition of ``i t K``, in float64 where the
    device has it, with ``exp(-i lam) - 1 = -2 sin^2(lam/2) - i sin(lam)`` so that
    a tiny step is not lost to cancellation. Cost: one pass over W for
    ``Q^H W`` and one rank-r update, O(r n^2) flops, O(r n) memory beyond the
    output. A real W with real a, b gives a real (orthogonal) result.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import exp_transport, random_unitary, unitarity_error
    >>> W = random_unitary(6, dtype="complex128", rng=0)
    >>> rng = np.random.default_rng(1)
    >>> a, b = rng.standard_normal((2, 6, 1)) + 0j
    >>> V = exp_transport(W, a, b, t=0.5)
    >>> bool(unitarity_error(V) < 1e-14)
    True
    """
    xp, W, a, b = unitary_and_factors(W, a, b, check_values=False)
    t = check_real_scalar("t", t)
    traced = any(is_traced(x) for x in (W, a, b))
    return checked(lambda: transport_unchecked(xp, W, a, b, t, traced=traced), xp, {"W": W, "a": a, "b": b})


def transport_unchecked(xp, W, a, b, t, *, traced=True):
    """exp_transport for validated arrays of one dtype."""
    return add_lowrank(xp, W, *transport_update(xp, W, a, b, t=t, cores=make_cores(xp, W, traced)))
