"""Products of Householder reflectors in compact WY form."""

from __future__ import annotations

from ._host import staged
from ._validation import check_batch_compatible, check_choice, check_float_dtype, check_matrix, namespace_of
from ._validation import check_finite as _require_finite  # householder_apply's argument takes the name
from ._xp import (
    add_product,
    column_layout,
    core_dtype,
    device,
    exact_products,
    eye,
    inverse_power_of_two_halves,
    is_complex,
    matmul_panel,
    max_abs,
    mH,
    upper_triangle,
    upper_triangular_inverse,
)

__all__ = ["householder_apply", "householder_product"]

SIDES = ("left", "right")


@exact_products
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
        the result on the host). Under ``jax.jit``, ``torch.compile`` or a
        CUDA-graph capture, where values cannot be read, the check is skipped
        by itself (NaN and Inf carry through to the result); pass False to
        skip it elsewhere (a training loop's hot path).

    Returns
    -------
    array
        ``P @ X`` or ``X @ P``, of the broadcast batch shape, in the namespace
        and on the device of the inputs, with dtype ``result_type(V, X)``.

    Raises
    ------
    TypeError
        Arguments that are not arrays, arrays from different libraries,
        dtypes other than float32, float64, complex64, complex128, or a
        ``check_finite`` that is not a bool.
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
    diagonal entry -1/2 instead; its row and column of ``T^{-1}`` are
    otherwise zero, so it drops out of the product. T is inverted in float64
    where the device has it, by the library's triangular solve where it has
    one (PyTorch), elsewhere with matrix products only, no branch on values:
    by back substitution done for all rows at once (j - 1 products, for
    j <= 16) or by recursive 2 x 2 blocking, ``[[A, B], [0, C]]^{-1} = [[A^{-1}, -A^{-1} B C^{-1}], [0,
    C^{-1}]]`` (log2(j) rounds). Then ``P X = X - U (T (U^H X))``, its sum
    fused with the last product where the library can (PyTorch's ``addmm``).

    Cost: O(n j^2) for the Gram matrix ``V^H V``, O(j^4) (j <= 16) or
    O(j^3 log j) for T, and O(j n m) for the two products with X; O((n + m) j)
    memory beyond the output. The Gram matrix is formed in float64 where the
    device has it, so the squared length of any float32 column is
    representable; without float64 (and for float64 input) column lengths must
    stay within the square root of the dtype's range. The function is
    differentiable (torch autograd, ``jax.grad``) away from zero columns; at
    a zero column, where it is not, the gradient computed is finite (zero).

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import householder_apply
    >>> v = np.array([[1.0], [1.0]])          # reflects across the line x + y = 0
    >>> (householder_apply(v, np.eye(2)).round(12) + 0.0).tolist()  # + 0.0: no -0.0
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
    if not isinstance(check_finite, bool):  # ("no" is truthy: the check ran)
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    n = V.shape[-2]
    axis, expected = (-2, f"(..., {n}, m)") if side == "left" else (-1, f"(..., m, {n})")
    if X.shape[axis] != n:
        raise ValueError(
            f"X must have shape {expected} to match V of shape {tuple(V.shape)} with "
            f"side={side!r}, got shape {tuple(X.shape)}"
        )
    check_batch_compatible(V=V, X=X)
    if check_finite:
        _require_finite(xp, "V", V)
        _require_finite(xp, "X", X)
    dtype = xp.result_type(V, X)
    V, X = xp.astype(V, dtype, copy=False), xp.astype(X, dtype, copy=False)
    return apply_unchecked(xp, V, X, side)


@exact_products
def householder_product(V, /):
    r"""The product of the Householder reflectors in the columns of V, as an n x n matrix.

    ``P = H(v_1) H(v_2) ... H(v_j)`` with ``H(v) = I - 2 v v^H / (v^H v)``.

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
    _require_finite(xp, "V", V)
    return _product_unchecked(xp, V)


@staged()
def _product_unchecked(xp, V):
    """householder_product for a validated V; one program on eager JAX
    arrays (see ``_host.staged``), where the compact WY factors' some twenty
    small operations would be a dispatch each."""
    U, minus_T = wy_factors(xp, V)
    return add_product(xp, eye(xp, V.shape[-2], like=V), U @ minus_T, mH(xp, U))


@staged("side", "factors")
def apply_unchecked(xp, V, X, side, factors=None):
    """householder_apply for validated V and X of one dtype; traceable.
    ``factors(xp, V)`` gives (U, -T), ``wy_factors`` unless a caller brings
    its own (the torch adapters' hand-written gradient)."""
    U, minus_T = (factors or wy_factors)(xp, V)
    # The only passes over X's size are the product with U and the fused sum.
    if side == "left":
        return add_product(xp, X, U, minus_T @ (mH(xp, U) @ X))
    return add_product(xp, X, matmul_panel(xp, X, U) @ minus_T, mH(xp, U))


def wy_factors(xp, V):
    """``(U, -T)``: the unit columns U = V diag(1 / |v_i|) (a zero column
    stays zero) and T (..., j, j) upper triangular, with ``H(v_1) ... H(v_j) =
    I - U T U^H``; see householder_apply's Notes. Both in V's dtype, U laid
    out column by column (``_xp.column_layout``).

    -T rather than T: negating the small factor spares autograd a negation
    of X's size.
    """
    U, minus_T, _, _ = wy_core(xp, xp.astype(V, core_dtype(xp, V.dtype, device(V)), copy=False))
    return (column_layout(xp, xp.astype(U, V.dtype, copy=False)), xp.astype(minus_T, V.dtype, copy=False))


def wy_core(xp, V):
    """``(U, -T, s, p)`` of ``wy_factors`` for V in its core dtype (float64
    where the device has it, so that |v|^2 of any float32 column is
    representable and U's columns are unit to V's rounding), with
    ``1 / |v_i| = s_i p_i`` as two factors (s p = 1 for a zero column), each
    representable where their product need not be. Only the Gram matrix
    V^H V gives the lengths, of the columns brought near unit length by
    powers of two first (exact, and U does not depend on a column's length):
    the squares of a float64 column of length 1e155 overflowed and those of
    length 1e-170 underflowed, which gave NaN or a wrong product. The power
    is applied as two halves (``_xp.times_inverse_power_of_two``): that of
    a subnormal float64 column (2**1026 for 1e-309) is beyond float64, and as
    one factor it gave an all-NaN product, without a word."""
    first, second = inverse_power_of_two_halves(xp, max_abs(xp, V, axis=-2))
    V = V * xp.astype(first, V.dtype, copy=False) * xp.astype(second, V.dtype, copy=False)
    gram = mH(xp, V) @ V
    squares = xp.linalg.diagonal(gram)
    if is_complex(xp, V.dtype):
        squares = xp.real(squares)
    zero, ones = squares == 0, xp.ones_like(squares)
    # The where comes before the sqrt, so that autograd meets no sqrt'(0).
    scale = 1 / xp.sqrt(xp.where(zero, ones, squares))
    outer = xp.astype(scale[..., :, None] * scale[..., None, :], V.dtype, copy=False)
    # T^-1 = triu(U^H U, 1) + D with the exact pivots 1/2 for unit columns
    # (not U^H U's computed diagonal, 1 to rounding: with nearly parallel
    # reflectors T is ill-conditioned and a rounded pivot shows in P). A zero
    # column's row and column of U^H U are 0, so its pivot is -1/2, any
    # nonzero value serving: it drops out of the product with the zero
    # column of U. Constants: the gradient needs no path through them.
    pivots = xp.astype(xp.where(zero, -ones, ones) / 2, V.dtype, copy=False)
    D = xp.eye(gram.shape[-1], dtype=V.dtype, device=device(V)) * pivots[..., None, :]
    minus_T = _minus_inverse_triangular(xp, upper_triangle(xp, gram * outer, k=1) + D)
    return V * xp.astype(scale[..., None, :], V.dtype, copy=False), minus_T, scale * first[..., 0, :], second[..., 0, :]


# Up to this size T comes from back substitution (j - 1 products of j x j
# matrices), beyond it from recursive doubling (log2(j) rounds of a few ops):
# fewer operations either way, which is what a small T costs in eager mode.
_SUBSTITUTION_MAX = 16


def _minus_inverse_triangular(xp, A):
    """``-A^{-1}`` for A upper triangular (..., j x j) with a nonzero
    diagonal: one triangular solve where the backend has one, else matrix
    products only, no branch on values."""
    j = A.shape[-1]
    if j == 1:
        return -1 / A
    inverse = upper_triangular_inverse(xp, A)
    if inverse is not None:
        return -inverse
    identity = xp.eye(j, dtype=A.dtype, device=device(A))
    inverse_pivots = 1 / xp.linalg.diagonal(A)
    minus_D_inv = identity * -inverse_pivots[..., None, :]
    strict = upper_triangle(xp, A, k=1)
    S = minus_D_inv
    if j <= _SUBSTITUTION_MAX:
        # Row-oriented back substitution for all rows at once: row i of
        # S = -D^-1 - D^-1 strict S depends only on rows > i of S, so after
        # j - 1 rounds every row holds its substitution value.
        coupling = strict * -inverse_pivots[..., :, None]
        for _ in range(j - 1):
            S = minus_D_inv + coupling @ S
        return S
    # S is block diagonal, its blocks (of `size`) minus the inverses of those
    # of strict + D; each round joins the blocks (2p, 2p + 1) through the part
    # of `strict` between them: [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]],
    # which for S = -T reads S <- S + S B S.
    position = xp.arange(j, device=device(strict))
    size = 1
    while size < j:
        index = position // size
        between = (index[:, None] + 1 == index[None, :]) & (index[:, None] % 2 == 0)
        S = S + S @ (strict * xp.astype(between, strict.dtype)) @ S
        size *= 2
    return S
