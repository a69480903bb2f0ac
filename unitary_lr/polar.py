"""Closest unitary (orthogonal) matrices: dense polar factor and the low-rank
update of a unitary matrix."""

from __future__ import annotations

import math

from ._autodiff import polar_rule
from ._cores import add_lowrank, make_cores
from ._flow import checked, lowrank_update
from ._host import is_traced, outside_torch_graph, staged
from ._validation import (
    check_choice,
    check_finite,
    check_float_dtype,
    check_int,
    check_matrix,
    namespace_of,
    refuse_jax_trace,
    unitary_and_factors,
)
from ._xp import Adjoint, exact_products, eye, max_abs, mH, real_dtype, thin_svd, times_inverse_power_of_two, untracked

__all__ = ["ConvergenceError", "project_unitary", "project_unitary_lowrank"]


class ConvergenceError(ValueError):
    """An iteration did not converge for this input (like numpy's LinAlgError,
    a ValueError: the input is singular or too ill-conditioned for the method).

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import ConvergenceError, project_unitary
    >>> try:
    ...     project_unitary(np.zeros((3, 3)), method="newton_schulz")
    ... except ConvergenceError as error:
    ...     print("did not converge" in str(error))
    True
    """


@exact_products
def project_unitary(A, /, *, method="svd", max_iter=60):
    r"""Closest unitary (complex) or orthogonal (real) matrix to A: its polar factor.

    Parameters
    ----------
    A : array, shape (..., n, m)
        Matrices; leading axes are a batch. For n != m the result has
        orthonormal columns (n > m) or rows (n < m): the closest point of the
        Stiefel manifold.
    method : {"svd", "newton_schulz"}, optional
        ``"svd"``: ``U @ Vh`` from ``svd(A)``; works for every A, including
        singular A (then one of the unitary polar factors). ``"newton_schulz"``:
        the matmul-only iteration ``X <- X (3 I - X^H X) / 2``, the fast path on
        GPUs, for nonsingular A.
    max_iter : int, optional
        Iteration limit of ``"newton_schulz"``; the number of iterations grows
        like log(cond(A)).

    Returns
    -------
    array, shape (..., n, m)
        The polar factor, same namespace, dtype and device as A. With
        ``"svd"`` its derivative is written out for PyTorch's autograd
        (reverse and forward mode, the ``torch.func`` transforms) and JAX
        (``jax.grad``, ``jax.jvp``): the polar factor's own, right at repeated
        singular values (a unitary A) where the SVD's is not; Inf or NaN at a
        singular A, where the polar factor has none. A second derivative
        raises on PyTorch, and on JAX goes through the SVD's (NaN at repeated
        singular values). ``"newton_schulz"`` is differentiated through its
        iterations.

    Raises
    ------
    TypeError
        A is not an array of a supported floating dtype; ``"newton_schulz"``
        with a JAX tracer for A (its stopping test reads on the host, so it
        does not run under ``jax.jit``; ``"svd"`` does, and there NaN or Inf
        in A is not checked). Under ``torch.compile`` ``"svd"`` is traced
        likewise, and ``"newton_schulz"`` runs its iterations outside the
        graph (with ``fullgraph=True`` Dynamo refuses it, naming it).
    ValueError
        A is not a matrix or contains NaN or Inf; unknown method.
    ConvergenceError
        ``"newton_schulz"`` did not converge within ``max_iter`` iterations
        (A singular or too ill-conditioned); ``"svd"`` never raises it.

    Notes
    -----
    For ``A = U diag(s) V^H`` the polar factor ``U V^H`` minimises ``||A - Q||_F``
    over Q with orthonormal columns (rows) (Higham, *Functions of Matrices*,
    ch. 8). Both methods cost O(n m min(n, m)). Newton-Schulz starts from ``A / s`` where ``s^2`` is the largest
    absolute row sum of ``A^H A``, an upper bound on ``||A||_2^2`` that is tight
    for nearly unitary A, so re-projecting a drifted W takes a few iterations.
    It stops once ``||X^H X - I||_F / sqrt(n) <= sqrt(eps)`` and then takes one
    more (quadratically convergent) step to reach rounding level.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import project_unitary, unitarity_error
    >>> A = np.eye(4) + 0.1 * np.random.default_rng(0).standard_normal((4, 4))
    >>> Q = project_unitary(A)
    >>> bool(unitarity_error(Q) < 1e-14)
    True
    >>> bool(np.allclose(project_unitary(A, method="newton_schulz"), Q))
    True
    """
    xp = namespace_of(A=A)
    check_float_dtype(xp, "A", A)
    check_matrix("A", A)
    check_choice("method", method, ("svd", "newton_schulz"))
    max_iter = check_int("max_iter", max_iter, minimum=1)
    if method == "newton_schulz":
        refuse_jax_trace("project_unitary(method='newton_schulz')", {"A": A},
                         "it reads each iteration's error on the host to decide when to stop",
                         "Under jit use method='svd'")
    check_finite(xp, "A", A)
    if method == "svd":
        return differentiable_polar(xp, A)
    if A.shape[-2] < A.shape[-1]:
        return mH(xp, _newton_schulz(xp, mH(xp, A), max_iter))
    return _newton_schulz(xp, A, max_iter)


def polar_unchecked(xp, A):
    """The polar factor ``U V^H`` from ``svd(A)``; traceable."""
    U, _, Vh = thin_svd(xp, A)
    return U @ Vh


def differentiable_polar(xp, A):
    """``polar_unchecked`` whose derivative, where autograd or JAX takes one,
    is :func:`polar_tangent` (``_autodiff.polar_rule``), not that of the SVD:
    the SVD's derivative has terms 1 / (s_i^2 - s_j^2) that cancel in U V^H,
    and gave NaN at every unitary A (repeated singular values) and wrong
    complex gradients (the SVD's phases). A wide A is the adjoint of a tall
    one."""
    if A.shape[-2] < A.shape[-1]:
        return mH(xp, differentiable_polar(xp, mH(xp, A)))
    rule = polar_rule(A)
    return polar_unchecked(xp, A) if rule is None else rule(A)


def polar_tangent(xp, P, s, Vh, dA):
    """The derivative of the polar factor of a tall or square ``A = P diag(s) Vh``
    (thin SVD, s > 0) along dA:

        dQ = P X Vh + (I - P P^H) dA V diag(1 / s) Vh,
        X = (C - C^H) / (s_i + s_j),   C = P^H dA V,

    the solution of ``X S + S X = C - C^H`` (Higham, *Functions of Matrices*,
    ch. 8). Smooth wherever A has full column rank, repeated singular values
    included. The map is self-adjoint under ``Re tr(G^H dQ)``, so it is also
    the gradient's (the adjoint) map: ``polar_tangent(..., G)`` is the
    gradient of ``Re tr(G^H Q)``. At a singular A, where the polar factor has
    no derivative, its entries are Inf or NaN."""
    V = mH(xp, Vh)
    dA_V = dA @ V
    C = mH(xp, P) @ dA_V
    dtype = C.dtype
    sums = xp.astype(s[..., :, None] + s[..., None, :], dtype, copy=False)
    dQ_V = P @ ((C - mH(xp, C)) / sums)
    if P.shape[-2] > P.shape[-1]:  # (for square A, P P^H = I)
        dQ_V = dQ_V + (dA_V - P @ C) / xp.astype(s[..., None, :], dtype, copy=False)
    return dQ_V @ Vh


@outside_torch_graph("it reads each iteration's error on the host to decide when to stop; in a graph use method='svd'",
                     name="project_unitary(method='newton_schulz')")
def _newton_schulz(xp, A, max_iter):
    """For tall or square A: X <- X (3 I - X^H X) / 2 on the m x m side. Each
    iteration reads its error on the host (the test to stop); on eager JAX
    arrays the work between two reads is one program (see ``_host.staged``).
    An empty batch has no matrix to iterate on (and no largest error)."""
    if math.prod(A.shape[:-2]) == 0:
        return xp.zeros_like(A)
    X, gram, error = _newton_schulz_start(xp, A)
    threshold = math.sqrt(xp.finfo(real_dtype(xp, A.dtype)).eps)
    for _ in range(max_iter):
        error = float(untracked(error))  # (of a tensor that requires grad: no warning)
        if error <= threshold:
            return _newton_schulz_finish(xp, X, gram)
        if not math.isfinite(error):
            break
        X, gram, error = _newton_schulz_step(xp, X, gram)
    else:
        error = float(untracked(error))  # (of a tensor that requires grad: no warning)
    raise ConvergenceError(
        f"project_unitary(method='newton_schulz') did not converge in {max_iter} "
        f"iterations: ||X^H X - I||_F / sqrt(n) = {error:.3g} for A of shape "
        f"{tuple(A.shape)} (singular or too ill-conditioned); use method='svd'"
    )


@staged()
def _newton_schulz_start(xp, A):
    """(X, X^H X, its error) for the first iteration: A scaled so that the
    iteration converges."""
    # A power of two first (exact; the polar factor of c A is A's for c > 0):
    # the Gram of a float64 A of size 1e200, or 1e30 in float32, overflowed
    # (1e-200 underflowed) and a well conditioned A was refused as singular.
    A = times_inverse_power_of_two(xp, A, max_abs(xp, A))
    gram = mH(xp, A) @ A
    bound = xp.max(xp.sum(xp.abs(gram), axis=-1), axis=-1)
    # A zero matrix has no polar factor this iteration can find; keep the
    # division finite and let the convergence test report it.
    bound = xp.where(bound > 0, bound, xp.ones_like(bound))
    X = A / xp.astype(xp.sqrt(bound), A.dtype)[..., None, None]
    gram = gram / xp.astype(bound, A.dtype)[..., None, None]
    return X, gram, _gram_error(xp, gram)


@staged()
def _newton_schulz_step(xp, X, gram):
    """(the next X, its Gram, the Gram's error)."""
    X = _newton_schulz_finish(xp, X, gram)
    gram = mH(xp, X) @ X
    return X, gram, _gram_error(xp, gram)


@staged()
def _newton_schulz_finish(xp, X, gram):
    """``X (3 I - X^H X) / 2``."""
    return X @ (1.5 * eye(xp, gram.shape[-1], like=gram) - 0.5 * gram)


def _gram_error(xp, gram):
    """``max ||X^H X - I||_F / sqrt(n)`` over the batch, from the Gram."""
    n = gram.shape[-1]
    return xp.max(xp.linalg.matrix_norm(gram - eye(xp, n, like=gram))) / math.sqrt(n)


@exact_products
def project_unitary_lowrank(W, a, b, /):
    r"""Polar factor of ``W + a b^H`` for unitary W, in O(k n m).

    Parameters
    ----------
    W : array, shape (..., n, m)
        Unitary (complex) or orthogonal (real) matrices; for n > m, matrices
        with orthonormal columns, for n < m with orthonormal rows.
    a : array, shape (..., n, k)
    b : array, shape (..., m, k)
        Factors of the update; any size (k = 0 too), rank-deficient or zero.
        Batch axes broadcast against those of W.

    Returns
    -------
    array, shape (..., n, m)
        The closest unitary matrix (with orthonormal columns or rows) to
        ``W + a b^H`` (one of them if it is rank-deficient), in the namespace
        and on the device of W, with dtype ``result_type(W, a, b)``.
        A new value, as an optimizer step makes it: on PyTorch it carries no autograd
        history and no forward-mode tangent (W, a and b are detached; ``torch.func.grad``
        fails), where ``jax.grad`` runs through it, but its gradient is NaN or wrong, without a word, at
        degenerate factors (a zero factor, k = 0, 2k > min(n, m), dependent
        columns): see "Gradients through the kernels" on the backends page.

    Raises
    ------
    TypeError
        Arguments that are not arrays, arrays from different libraries, or
        unsupported dtypes.
    ValueError
        a or b not matching W, batch axes that do not broadcast, NaN or Inf
        in a or b, a W that is not unitary (its orthonormal columns or rows).

    Notes
    -----
    ``W + a b^H = W (I + c b^H)`` with ``c = W^H a``. Let ``[b, c] = Q R``
    (reduced QR, r <= 2k). ``I + c b^H`` is the identity on the complement of
    span Q and ``I_r + B``, ``B = R_c R_b^H``, on it, so

        polar(W + a b^H) = W + (W Q) (polar(I_r + B) - I_r) Q^H.

    The r x r core runs in float64 where the device has it: for small B through
    the eigendecomposition of ``(I + B)^H (I + B) - I = B + B^H + B^H B`` (no
    cancellation, exactly W for a zero update), otherwise through the SVD of
    ``I + B`` (huge or singular updates). Cost: two passes over W (``W^H a``
    and ``W Q``) and one rank-r update, O(r n^2) flops and O(r n) memory
    beyond the output. W must be unitary: the identity
    ``polar(W M) = W polar(M)`` is what makes the cost O(k n^2).

    A tall W (n > m, orthonormal columns) adds the part of a outside W's range,
    ``a_perp = a - W c`` with an orthonormal basis N: then
    ``(W + a b^H) Q = [W Q, N] [I + B; R_a E]`` and the polar factor of that
    small stacked matrix gives the result, at one more pass over W (``W c``).
    A wide W is handled through ``polar(W + a b^H)^H = polar(W^H + b a^H)``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.linalg import polar
    >>> from unitary_lr import project_unitary_lowrank, random_unitary
    >>> W = random_unitary(5, dtype="float64", rng=0)
    >>> a, b = np.random.default_rng(1).standard_normal((2, 5, 2))
    >>> V = project_unitary_lowrank(W, a, b)
    >>> bool(np.allclose(V, polar(W + a @ b.T)[0]))
    True
    """
    xp, W, a, b = unitary_and_factors(W, a, b, check_values=False, b_side="columns")
    traced = any(is_traced(x) for x in (W, a, b))
    return checked(lambda: polar_lowrank_unchecked(xp, W, a, b, traced=traced), xp, {"W": W, "a": a, "b": b})


def polar_lowrank_unchecked(xp, W, a, b, *, traced=True):
    """project_unitary_lowrank for validated arrays of one dtype:
    ``polar(W + a b^H) = polar(W - (-1) a b^H)``, a direct step of size 1."""
    wide = W.shape[-2] < W.shape[-1]
    V, Y, Z, names = (Adjoint(W), b, a, ("b", "a")) if wide else (W, a, b, ("a", "b"))
    L, Rh = lowrank_update(xp, V, Y, Z, lr=-1.0, variant="direct", rank=a.shape[-1],
                           cores=make_cores(xp, W, traced), sketched=False, names=names)
    if wide:
        L, Rh = mH(xp, Rh), mH(xp, L)
    return add_lowrank(xp, W, L, Rh)
