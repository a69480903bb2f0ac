"""Products of Householder reflectors in compact WY form (floor 3)."""

from __future__ import annotations

from ._validation import (
    check_batch_compatible,
    check_choice,
    check_float_dtype,
    check_matrix,
    namespace_of,
    report_nonfinite,
)
from ._xp import core_dtype, device, is_complex, mH

__all__ = ["householder_apply", "householder_product"]

SIDES = ("left", "right")


def householder_apply(V, X, /, *, side="left", check_finite=True):
    r"""Apply the product of the Householder reflectors in the columns of V to X.

    ``P = H(v_1) H(v_2) ... H(v_j)`` with ``H(v) = I - 2 v v^H / (v^H v)``;
    ``side="left"`` returns ``P @ X``, ``side="right"`` returns ``X @ P``. P is
    never formed: the cost is O(j n m), not O(n^2 m).

    Parameters
    ----------
    V : array, shape (..., n, j)
        The reflector vectors, one per column, of any nonzero length (only
        their directions matter). A zero column is the identity reflector.
    X : array, shape (..., n, m) for ``side="left"``, (..., m, n) for ``side="right"``
        The matrices to transform. Batch axes broadcast against those of V.
    side : {"left", "right"}, optional
        Which side of X the product multiplies.
    check_finite : bool, optional
        Check V and X for NaN and Inf (one reduction over each, and a read of
        the result on the host). Under ``jax.jit``, where values cannot be
        read, the check is skipped by itself; pass False to skip it elsewhere
        (a training loop's hot path).

    Returns
    -------
    array
        ``P @ X`` or ``X @ P``, of the broadcast batch shape, in the namespace
        and on the device of the inputs, with dtype ``result_type(V, X)``.

    Raises
    ------
    TypeError
        Arguments that are not arrays, arrays from different libraries, or
        dtypes other than float32, float64, complex64, complex128.
    ValueError
        Shapes that do not match (V's n against the matching axis of X), batch
        axes that do not broadcast, an unknown ``side``, NaN or Inf in V or X.

    See Also
    --------
    householder_product : the n x n matrix P itself.

    Notes
    -----
    Compact WY form (Schreiber and Van Loan, 1989): with the columns scaled to
    unit length, ``U = V diag(1 / |v_i|)``, the product is ``P = I - U T U^H``
    with T upper triangular (j x j) and

    .. math:: T^{-1} = \operatorname{triu}(U^H U, 1) + \tfrac12 \operatorname{diag}(U^H U),

    which follows from ``P_i = P_{i-1} H(u_i)``: the new column of T is
    ``-2 T_{i-1} U_{i-1}^H u_i``, so the new column of ``T^{-1}`` is
    ``U_{i-1}^H u_i`` over the diagonal entry 1/2. A zero column gets the
    diagonal entry 1 instead; its row and column of ``T^{-1}`` are otherwise
    zero, so it drops out of the product. T is inverted by recursive 2 x 2
    blocking (``[[A, B], [0, C]]^{-1} = [[A^{-1}, -A^{-1} B C^{-1}], [0,
    C^{-1}]]``, log2(j) rounds of matrix products, no branch on values), in
    float64 where the device has it. Then ``P X = X - U (T (U^H X))``.

    Cost: O(n j^2 + j^3 log j) for U^H U and T, and O(j n m) for the three
    products with X; O((n + m) j) memory beyond the output. The scaling makes
    any nonzero column usable whatever its size; the function is
    differentiable (torch autograd, ``jax.grad``) away from zero columns.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import householder_apply
    >>> v = np.array([[1.0], [1.0]])          # reflects across the line x + y = 0
    >>> householder_apply(v, np.eye(2)).round(12).tolist()
    [[0.0, -1.0], [-1.0, 0.0]]
    >>> V = np.random.default_rng(0).standard_normal((5, 3))
    >>> X = np.ones((4, 5))
    >>> householder_apply(V, X, side="right").shape
    (4, 5)
    """
    xp = namespace_of(V=V, X=X)
    for name, x in (("V", V), ("X", X)):
        check_float_dtype(xp, name, x)
        check_matrix(name, x)
    side = check_choice("side", side, SIDES)
    n = V.shape[-2]
    axis, expected = (-2, f"(..., {n}, m)") if side == "left" else (-1, f"(..., m, {n})")
    if X.shape[axis] != n:
        raise ValueError(
            f"X must have shape {expected} to match V of shape {tuple(V.shape)} with "
            f"side={side!r}, got shape {tuple(X.shape)}"
        )
    check_batch_compatible(V=V, X=X)
    if check_finite:
        for name, x in (("V", V), ("X", X)):
            if not _all_finite(xp, x):
                report_nonfinite(xp, name, x)
    dtype = xp.result_type(V, X)
    V, X = xp.astype(V, dtype, copy=False), xp.astype(X, dtype, copy=False)
    return apply_unchecked(xp, V, X, side)


def householder_product(V, /):
    r"""The product ``P = H(v_1) H(v_2) ... H(v_j)`` of the reflectors in V, as an
    n x n matrix.

    Parameters
    ----------
    V : array, shape (..., n, j)
        The reflector vectors, one per column; a zero column is the identity.

    Returns
    -------
    array, shape (..., n, n)
        P, unitary (orthogonal if real) to rounding, with the dtype, namespace
        and device of V.

    Raises
    ------
    TypeError
        V is not an array of a supported floating dtype.
    ValueError
        V is not (..., n, j) with n, j >= 1, or contains NaN or Inf.

    See Also
    --------
    householder_apply : P applied to a matrix without forming P.

    Notes
    -----
    ``P = I - U T U^H`` in compact WY form (see :func:`householder_apply`).
    Cost: O(j n^2) for the dense output. To multiply P with a matrix, use
    :func:`householder_apply`, which costs O(j n m) instead of O(n^2 (j + m)).

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import householder_product
    >>> P = householder_product(np.array([[1.0, 0.0], [0.0, 1.0]]))
    >>> P.tolist()                            # two reflections: a rotation by pi
    [[-1.0, 0.0], [0.0, -1.0]]
    """
    xp = namespace_of(V=V)
    check_float_dtype(xp, "V", V)
    check_matrix("V", V)
    if not _all_finite(xp, V):
        report_nonfinite(xp, "V", V)
    U = _unit_columns(xp, V)
    n = V.shape[-2]
    return xp.eye(n, dtype=V.dtype, device=device(V)) - (U @ wy_factor(xp, U)) @ mH(xp, U)


def apply_unchecked(xp, V, X, side):
    """householder_apply for validated V and X of one dtype; traceable."""
    U = _unit_columns(xp, V)
    T = wy_factor(xp, U)
    if side == "left":
        return X - U @ (T @ (mH(xp, U) @ X))
    return X - ((X @ U) @ T) @ mH(xp, U)


def _all_finite(xp, x):
    """Whether x is free of NaN and Inf; True when its values cannot be read
    (a tracer under jax.jit raises TypeError on bool())."""
    try:
        return bool(xp.all(xp.isfinite(x)))
    except TypeError:
        return True


def _unit_columns(xp, V):
    """V with each nonzero column scaled to unit length; zero columns stay zero.

    Dividing by the largest entry first keeps |v|^2 clear of overflow and
    underflow. Both divisors are replaced by 1 on zero columns *before* the
    sqrt, so that autograd sees no 0/0 or sqrt'(0) there either.
    """
    largest = xp.max(xp.abs(V), axis=-2, keepdims=True)
    zero = largest == 0
    ones = xp.ones_like(largest)
    W = V / xp.astype(xp.where(zero, ones, largest), V.dtype)
    if is_complex(xp, V.dtype):
        square = xp.real(W) ** 2 + xp.imag(W) ** 2
    else:
        square = W * W
    norm = xp.sqrt(xp.where(zero, ones, xp.sum(square, axis=-2, keepdims=True)))
    return W / xp.astype(norm, V.dtype)


def wy_factor(xp, U):
    """T (..., j, j), upper triangular, with ``I - U T U^H = H(u_1) ... H(u_j)``
    for U of unit or zero columns (see householder_apply's Notes)."""
    j = U.shape[-1]
    core = core_dtype(xp, U.dtype, device(U))
    gram = xp.astype(mH(xp, U) @ U, core)
    diagonal = xp.linalg.diagonal(gram)
    # A zero column: any nonzero pivot works, as its off-diagonal entries are 0.
    pivots = xp.where(diagonal == 0, xp.ones_like(diagonal), diagonal / 2)
    strict = xp.triu(gram, k=1)
    T = xp.eye(j, dtype=core, device=device(U)) / pivots[..., None, :]
    # T is block diagonal with inverted blocks of size `size`; each round joins
    # neighbouring blocks (2p, 2p + 1) with their off-diagonal block B.
    block = xp.arange(j, device=device(U))
    size = 1
    while size < j:
        index = block // size
        coupling = ((index % 2) == 0)[:, None] & (index[None, :] == index[:, None] + 1)
        T = T - T @ (strict * xp.astype(coupling, core)) @ T
        size *= 2
    return xp.astype(T, U.dtype)
