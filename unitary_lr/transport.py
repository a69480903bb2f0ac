"""Transport along a low-rank skew-Hermitian direction: the exponential map
and the Cayley map."""

from __future__ import annotations

from ._cores import add_lowrank, make_cores
from ._flow import checked, transport_update
from ._host import is_traced, torch_graph_tracing
from ._validation import check_real_scalar, namespace_of, unitary_and_factors
from ._xp import device, exact_products, real_dtype

__all__ = ["cayley_transport", "exp_transport"]


@exact_products
def exp_transport(W, a, b, /, *, t=1.0):
    r"""Move W along the geodesic ``expm(t (a b^H - b a^H)) @ W`` in O(k n^2).

    Parameters
    ----------
    W : array, shape (..., n, m)
        The matrix to transport, normally unitary (complex) or orthogonal
        (real), or with orthonormal columns (n > m) or rows (n < m).
    a, b : arrays, shape (..., n, k)
        Factors of the rank <= 2k skew-Hermitian generator ``X = a b^H - b a^H``
        (k = 0: X = 0). Batch axes broadcast against those of W.
    t : float, optional
        Step along the geodesic; any finite real number.

    Returns
    -------
    array, shape (..., n, m)
        ``expm(t X) @ W`` in the namespace and on the device of W, with dtype
        ``result_type(W, a, b)``. Unitary (orthonormal columns or rows) to
        rounding for every t when W is.
        A new value, as an optimizer step makes it: on PyTorch it carries no autograd
        history and no forward-mode tangent (W, a and b are detached; ``torch.func.grad``
        fails), where ``jax.grad`` runs through it, but its gradient is NaN or wrong, without a word, at
        degenerate factors (a zero factor, k = 0, 2k > min(n, m), dependent
        columns): see "Gradients through the kernels" on the backends page.

    Raises
    ------
    TypeError
        Arguments that are not arrays, arrays from different libraries, or
        dtypes other than float32, float64, complex64, complex128.
    ValueError
        a and b of different shapes or not matching W, batch axes that do not
        broadcast, NaN or Inf in W, a or b, non-finite t; a square W that is
        not unitary.

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
    A square W is worked on in its own frame (``W^H [a, b]``, which also checks
    that W is unitary); a rectangular one from the left,
    ``W + Q (expm(t K) - I) (Q^H W)`` with Q spanning [a, b], which is exact
    for any W and costs one pass less.

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
    return _transport(W, a, b, t, cayley=False)


@exact_products
def cayley_transport(W, a, b, /, *, t=1.0):
    r"""Move W by the Cayley map ``(I - t/2 X)^(-1) (I + t/2 X) @ W`` of the
    low-rank skew-Hermitian ``X = a b^H - b a^H``, in O(k n m).

    Parameters
    ----------
    W : array, shape (..., n, m)
        The matrix to transport, normally unitary (complex) or orthogonal
        (real), or with orthonormal columns (n > m) or rows (n < m).
    a, b : arrays, shape (..., n, k)
        Factors of the rank <= 2k generator X (k = 0: X = 0). Batch axes
        broadcast against those of W.
    t : float, optional
        Any finite real number: the Cayley map of a skew-Hermitian matrix is
        unitary for every t, however large.

    Returns
    -------
    array, shape (..., n, m)
        ``(I - t/2 X)^(-1) (I + t/2 X) @ W`` in the namespace and on the device
        of W, with dtype ``result_type(W, a, b)``; unitary to rounding when W is.
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
        a and b of different shapes or not matching W, batch axes that do not
        broadcast, NaN or Inf in W, a or b, non-finite t; a square W that is
        not unitary.

    Notes
    -----
    This is the multiplicative step of full-capacity unitary RNNs (Wisdom et
    al., NeurIPS 2016), ``(I + lr/2 A)^(-1) (I - lr/2 A) W`` for
    ``A = G W^H - W G^H``, with ``t = -lr``. With X = U V^H (U = [a, -b],
    V = [b, a]) Woodbury's identity
    ``(I - t/2 U V^H)^(-1) = I + t/2 U (I_r - t/2 V^H U)^(-1) V^H`` reduces it to
    an r x r problem, r <= 2k. It is computed as :func:`exp_transport` is,
    in an orthonormal basis Q of span[a, b] with ``K = Q^H X Q``: the r x r
    Cayley map has K's eigenvectors and the eigenvalues
    ``exp(i 2 atan(t w / 2))`` for the eigenvalues ``i w`` of K, which needs no
    solve and stays unitary to rounding even where ``I - t/2 X`` is singular in
    floating point. It agrees with ``expm(t X) W`` to second order in t.
    Cost: as :func:`exp_transport`.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import cayley_transport, random_unitary, unitarity_error
    >>> W = random_unitary(6, dtype="float64", rng=0)
    >>> a, b = np.random.default_rng(1).standard_normal((2, 6, 1))
    >>> X = a @ b.T - b @ a.T
    >>> V = cayley_transport(W, a, b, t=0.5)
    >>> bool(np.allclose(V, np.linalg.solve(np.eye(6) - X / 4, (np.eye(6) + X / 4) @ W)))
    True
    >>> bool(unitarity_error(cayley_transport(W, a, b, t=1e12)) < 1e-14)
    True
    """
    return _transport(W, a, b, t, cayley=True)


def _transport(W, a, b, t, *, cayley):
    """The transports' checks and call (NaN and Inf in W, a and b are found
    by the step, see ``_flow.transport_update``)."""
    xp, W, a, b = unitary_and_factors(W, a, b, check_values=False)
    t = check_real_scalar("t", t, traced=True)  # (a traced t: jax.jit, vmap or grad over the time)
    if isinstance(t, (int, float)) and torch_graph_tracing():
        # a number Dynamo may have made symbolic (from a compiled function's
        # second t on), which the step size's exact scaling by frexp cannot
        # take: a 0-d tensor, scaled as an array is (both exact)
        t = xp.asarray(t, dtype=real_dtype(xp, W.dtype), device=device(W))
    elif not isinstance(t, float):
        # a traced t of another library than W's (jax.jit over t, with NumPy
        # W, a and b) failed deep inside the step, in JAX's words
        namespace_of(W=W, t=t)
    traced = not isinstance(t, float) or any(is_traced(x) for x in (W, a, b))
    return checked(lambda: transport_unchecked(xp, W, a, b, t, traced=traced, cayley=cayley), xp,
                   {"W": W, "a": a, "b": b})


def transport_unchecked(xp, W, a, b, t, *, traced=True, cayley=False):
    """exp_transport (cayley_transport when ``cayley``) for validated arrays of one dtype."""
    return add_lowrank(xp, W, *transport_update(xp, W, a, b, t=t, cores=make_cores(xp, W, traced), cayley=cayley))
