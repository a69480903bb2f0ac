"""How far a matrix is from the unitary group."""

from __future__ import annotations

import math

from ._host import from_host, outside_torch_graph, staged
from ._random import as_generator, host_normal
from ._validation import check_float_dtype, check_int, check_matrix, namespace_of
from ._xp import adjoint_matmul, core_dtype, device, exact_products, eye, frobenius_norm, mH

__all__ = ["default_drift_tolerance", "unitarity_error", "unitarity_estimate"]

# Re-projection thresholds for ||W^H W - I||_F / sqrt(n), by precision: well
# above the noise floor of unitarity_estimate in that precision (measured up
# to n = 1024: ~5e-7 in float32/complex64, ~2e-15 in float64/complex128) and
# well below any loss of accuracy a user would notice.
_DRIFT_TOLERANCE = {"float32": 1e-5, "complex64": 1e-5, "float64": 1e-12, "complex128": 1e-12}


def default_drift_tolerance(dtype_name_: str) -> float:
    """Default re-projection threshold for matrices of the named dtype
    (``"float32"``, ``"float64"``, ``"complex64"`` or ``"complex128"``; a
    ValueError lists them for any other value).

    Examples
    --------
    >>> from unitary_lr.diagnostics import default_drift_tolerance
    >>> default_drift_tolerance("float32"), default_drift_tolerance("complex128")
    (1e-05, 1e-12)
    """
    try:
        return _DRIFT_TOLERANCE[dtype_name_]
    except (KeyError, TypeError):
        raise ValueError(f"dtype_name_ must be one of {', '.join(map(repr, _DRIFT_TOLERANCE))}, "
                         f"got {dtype_name_!r}") from None


@exact_products
def unitarity_error(W, /):
    r"""``||W^H W - I||_F / sqrt(m)`` for each matrix of a batch.

    Parameters
    ----------
    W : array, shape (..., n, m)
        For n < m (orthonormal rows are what a wide matrix can have) the
        error is ``||W W^H - I||_F / sqrt(n)``.

    Returns
    -------
    array, shape (...)
        Real, computed (and returned) in float64 where the device has it, so the
        drift of float32 matrices is measured above float32 rounding. 0-d for a
        single matrix; ``float(unitarity_error(W))`` gives a Python number.

    Raises
    ------
    TypeError
        W is not an array of a supported floating dtype.
    ValueError
        W is not a matrix.

    Notes
    -----
    Dense, O(n m min(n, m)): a diagnostic. For an error e per entry of W^H W the value is
    about e * sqrt(n), and it is 0 exactly for a permutation matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import unitarity_error
    >>> float(unitarity_error(np.eye(3)))
    0.0
    >>> round(float(unitarity_error(2 * np.eye(4))), 6)
    3.0
    """
    xp = namespace_of(W=W)
    check_float_dtype(xp, "W", W)
    check_matrix("W", W)
    return _error(xp, W)


@staged()
def _error(xp, W):
    """unitarity_error of a validated W; one program on eager JAX arrays (see
    ``_host.staged``)."""
    core = core_dtype(xp, W.dtype, device(W))
    Wc = xp.astype(W, core, copy=False)
    if W.shape[-2] < W.shape[-1]:
        Wc = mH(xp, Wc)
    m = Wc.shape[-1]
    return frobenius_norm(xp, mH(xp, Wc) @ Wc - eye(xp, m, like=Wc)) / math.sqrt(m)


@outside_torch_graph(
    "it draws its probes from a NumPy generator; unitarity_error runs in the graph")
@exact_products
def unitarity_estimate(W, /, *, probes=4, rng=None):
    r"""Cheap estimate of ``||W^H W - I||_F / sqrt(m)``: O(p n m) instead of O(n m^2).

    Parameters
    ----------
    W : array, shape (..., n, m)
        For n < m, ``||W W^H - I||_F / sqrt(n)`` is estimated (orthonormal rows).
    probes : int, optional
        Number p of random probe vectors.
    rng : None, int or numpy.random.Generator, optional
        Source of the probes (drawn on the host, like every draw of the
        library). Under ``jax.jit`` the probes are drawn once, as the
        function is traced, and every call of the compiled function reuses
        them: an estimate with fixed probes. Under ``torch.compile`` the
        call runs outside the graph and draws new probes each time (with
        ``fullgraph=True`` Dynamo refuses it: use :func:`unitarity_error`
        there).

    Returns
    -------
    array, shape (...)
        Real estimates in W's real dtype, one per matrix.

    Raises
    ------
    TypeError
        W is not an array of a supported floating dtype.
    ValueError
        W is not a matrix; probes < 1.

    Notes
    -----
    For Gaussian probes Z (n x p), ``E ||(W^H W - I) Z||_F^2 = p ||W^H W - I||_F^2``
    (Hutchinson), so ``||W^H (W Z) - Z||_F / sqrt(p n)`` estimates the error with
    two passes over W. With p = 4 it is within a factor of about 2 of the exact
    value. Computed in W's precision, it cannot see errors below about
    ``eps * sqrt(n)`` (float32: ~5e-7 at n = 1024); that floor is far below the
    re-projection thresholds of :func:`default_drift_tolerance`.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import random_unitary, unitarity_error, unitarity_estimate
    >>> W = random_unitary(200, dtype="float64", rng=0)
    >>> W = W + 1e-6 * np.random.default_rng(1).standard_normal(W.shape)
    >>> ratio = float(unitarity_estimate(W, rng=2) / unitarity_error(W))
    >>> 0.5 < ratio < 2
    True
    """
    xp = namespace_of(W=W)
    check_float_dtype(xp, "W", W)
    check_matrix("W", W)
    probes = check_int("probes", probes, minimum=1)
    m = min(W.shape[-2:])
    # the host draw goes with the call of the staged estimate (see _host.staged)
    Z = from_host(xp, host_normal(xp, (*W.shape[:-2], m, probes), dtype=W.dtype, rng=as_generator(rng)),
                  dtype=W.dtype, device=device(W), staged=True)
    return estimate_unchecked(xp, W, Z)


@staged()
def estimate_unchecked(xp, W, Z):
    """unitarity_estimate with the probes Z (..., min(n, m), p) given; traceable."""
    if W.shape[-2] < W.shape[-1]:
        # orthonormal rows: W (W^H Z) - Z
        residual = W @ adjoint_matmul(xp, W, Z) - Z
    else:
        residual = adjoint_matmul(xp, W, W @ Z) - Z
    return frobenius_norm(xp, residual) / math.sqrt(Z.shape[-1] * Z.shape[-2])
