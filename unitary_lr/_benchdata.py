"""Test matrices for the benchmarks (``unitary-lr bench`` and the asv suite),
built on the host with NumPy in O(n^2) (floor 2).

A Haar-random unitary needs an O(n^3) QR, minutes at n = 4096 in complex128;
a product of Householder reflections and a diagonal of random phases is exactly
unitary and dense. For a Gaussian gradient G the cost and accuracy of every
benchmarked method depend only on distribution-invariant quantities (W^H G is
Gaussian again for any unitary W), so nothing is lost.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gaussian", "known_spectrum", "optimal_error", "reflect", "spectrum", "unitary"]


def gaussian(rng, shape, complex_, scale=1.0):
    """Gaussian float64/complex128 array (circular complex, E|z|^2 = scale^2)."""
    x = rng.standard_normal(shape)
    if complex_:
        x = (x + 1j * rng.standard_normal(shape)) * math.sqrt(0.5)
    return x * scale


def reflect(rng, M, complex_):
    """(I - 2 u u^H) M for a random unit vector u: O(n^2), exactly unitary."""
    u = gaussian(rng, (M.shape[0],), complex_)
    u /= np.linalg.norm(u)
    return M - 2.0 * np.outer(u, np.conj(u) @ M)


def unitary(rng, n, complex_, reflections=3):
    """A dense unitary (orthogonal if real) matrix: reflections times random
    phases (signs)."""
    W = np.diag(np.exp(2j * np.pi * rng.random(n)) if complex_ else rng.choice([-1.0, 1.0], n))
    for _ in range(reflections):
        W = reflect(rng, W, complex_)
    return W


def spectrum(n):
    """Singular values 1/j, j = 1..n: a slow decay, where power iterations matter."""
    return 1.0 / np.arange(1, n + 1)


def known_spectrum(rng, n, complex_):
    """H1 diag(1/j) H2 with reflections H1, H2: singular values exactly spectrum(n)."""
    return reflect(rng, reflect(rng, np.diag(spectrum(n)).T, complex_).T, complex_)


def optimal_error(n, k):
    """||A - A_k||_F of the best rank-k approximation of known_spectrum(n)."""
    return float(np.sqrt(np.sum(spectrum(n)[k:] ** 2)))
