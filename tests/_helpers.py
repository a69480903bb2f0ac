"""Reference helpers shared by the tests (NumPy only)."""

from __future__ import annotations

import numpy as np


def is_complex(dtype: str) -> bool:
    return dtype.startswith("complex")


def random_matrix(rng, shape, dtype) -> np.ndarray:
    """Standard Gaussian NumPy array (circular complex for complex dtypes)."""
    x = rng.standard_normal(shape)
    if is_complex(dtype):
        x = (x + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    return x.astype(dtype)


def haar(rng, n, dtype, batch=()) -> np.ndarray:
    """Reference Haar-random unitary/orthogonal matrices made with NumPy only."""
    Z = random_matrix(rng, (*batch, n, n), "complex128" if is_complex(dtype) else "float64")
    Q, R = np.linalg.qr(Z)
    d = np.diagonal(R, axis1=-2, axis2=-1)
    return (Q * (d / np.abs(d))[..., None, :]).astype(dtype)


def eps(dtype) -> float:
    return float(np.finfo(np.dtype(dtype)).eps)


def tol(dtype, factor=1.0) -> float:
    """Comparison tolerance for results computed in ``dtype``: a few hundred
    ulps, enough for the O(n)-length accumulations of the small test sizes."""
    return factor * 300 * eps(dtype)


def mH(x: np.ndarray) -> np.ndarray:
    return np.conj(np.swapaxes(x, -1, -2))


def unitarity(x: np.ndarray) -> np.ndarray:
    """Reference ||X^H X - I||_F / sqrt(n) in float64/complex128."""
    x = x.astype(np.complex128)
    n = x.shape[-1]
    return np.linalg.norm(mH(x) @ x - np.eye(n), axis=(-2, -1)) / np.sqrt(n)


def assert_same_kind(backend, result, like, dtype=None):
    """result is an array of backend's library, on its device, with the dtype
    of ``like`` (or ``dtype``)."""
    import array_api_compat

    assert array_api_compat.array_namespace(result) is array_api_compat.array_namespace(like)
    assert array_api_compat.device(result) == array_api_compat.device(like)
    expected = like.dtype if dtype is None else backend.dtype(dtype)
    assert result.dtype == expected, (result.dtype, expected)
