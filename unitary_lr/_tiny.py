"""Closed forms of the 2 x 2 host cores, in Python scalars (floor 3, private).

A rank-1 step (one sketch column) reduces to 2 x 2 matrices: the Gram of a
two-column panel, its basis, and the exp, Cayley or polar core. NumPy spends
a few microseconds of call overhead on each operation on such a matrix, and
the general cores of :mod:`._cores` make about a hundred of them, which is
most of a step's time at n <= 512 on the CPU. Here the same quantities come
from closed forms on Python floats and complex numbers (the host copy's
``tolist()``), with the same conventions as the general cores: the same
dropping rule for null directions, the same cancellation-free
``exp(-i lam) - 1``, the same Cayley angle, the same small-B polar formula.
Results agree with the general cores to rounding (tests/test_tiny.py).

Matrices are tuples of rows, ``((m00, m01), (m10, m11))``; the input is
finite (the callers check the Gram first).
"""

from __future__ import annotations

import math

__all__ = ["adjoint2", "eigh2", "gram_basis2", "mul2", "polar_small2", "skew_core2"]


def _conj(x):
    return x.conjugate() if isinstance(x, complex) else x


def adjoint2(M):
    """The conjugate transpose of a 2 x 2 matrix."""
    return ((_conj(M[0][0]), _conj(M[1][0])), (_conj(M[0][1]), _conj(M[1][1])))


def mul2(A, B):
    """The product of two 2 x 2 matrices."""
    return (
        (A[0][0] * B[0][0] + A[0][1] * B[1][0], A[0][0] * B[0][1] + A[0][1] * B[1][1]),
        (A[1][0] * B[0][0] + A[1][1] * B[1][0], A[1][0] * B[0][1] + A[1][1] * B[1][1]),
    )


def eigh2(h00, h01, h11):
    """Eigenvalues (ascending) and orthonormal eigenvectors (the columns of V)
    of the Hermitian ``[[h00, h01], [conj(h01), h11]]`` (h00, h11 real).

    The eigenvector of the larger eigenvalue is read from the row of
    ``H - lam I`` without cancellation (the sign of the half-difference picks
    it), the other is its orthogonal complement; accurate to rounding
    relative to the larger eigenvalue, as LAPACK's eigh."""
    mean, half = (h00 + h11) / 2, (h00 - h11) / 2
    off = abs(h01)
    rho = math.hypot(half, off)
    if rho == 0:
        return (mean, mean), ((1.0, 0.0), (0.0, 1.0))
    if half >= 0:
        x, y = half + rho, _conj(h01)
    else:
        x, y = h01, rho - half
    norm = math.hypot(abs(x), abs(y))
    x, y = x / norm, y / norm
    # V = [v_small, v_large] with v_large = (x, y), v_small = (-conj(y), conj(x))
    return (mean - rho, mean + rho), ((-_conj(y), x), (_conj(x), y))


def gram_basis2(C, tol):
    """:func:`._cores.gram_basis` of a 2 x 2 Gram C: (T, R, spread)."""
    d = (C[0][0].real, C[1][1].real)
    root_d = tuple(math.sqrt(v) if v > 0 else 0.0 for v in d)
    scale = tuple(1 / v if v > 0 else 0.0 for v in root_d)
    gamma = C[0][1] * scale[0] * scale[1]
    lam, V = eigh2(1.0 if d[0] > 0 else 0.0, gamma, 1.0 if d[1] > 0 else 0.0)
    top = lam[1]
    keep = tuple(v > tol * top and top > 0 for v in lam)
    root = tuple(math.sqrt(v) if k else 0.0 for v, k in zip(lam, keep))
    inverse_root = tuple(1 / v if v else 0.0 for v in root)
    T = tuple(tuple(V[i][j] * scale[i] * inverse_root[j] for j in range(2)) for i in range(2))
    R = tuple(tuple(_conj(V[j][i]) * root[i] * root_d[j] for j in range(2)) for i in range(2))
    smallest = lam[0] if keep[0] else top
    spread = top / smallest if smallest > 0 else 1.0
    return T, R, spread


def _phase_minus_one(lam, noise, cayley):
    """(cos(angle) - 1, sin(angle)) of ``exp(-i lam) - 1`` as in
    :func:`._cores.expm_skew_minus_identity`."""
    if abs(lam) <= noise:
        return 0.0, 0.0
    if cayley:
        angle = 2 * math.atan(lam / 2)
    else:
        angle = lam - 2 * math.pi * round(lam / (2 * math.pi))
    half = math.sin(angle / 2)
    return -2 * half * half, math.sin(angle)


def skew_core2(K, t, *, cayley, real, eps):
    """:func:`._cores.expm_skew_minus_identity` of a 2 x 2 skew-Hermitian K:
    ``expm(t K) - I`` (or the Cayley map minus I). ``eps``: the core
    precision, for the eigensolver's noise level."""
    if real:
        # K = [[0, kappa], [-kappa, 0]]: a plane rotation by t kappa
        theta = t * (K[0][1] - K[1][0]) / 2
        noise = 2 * eps * abs(theta)
        cos_minus_one, sine = _phase_minus_one(theta, noise, cayley)
        # exp(t K) = [[cos, sin], [-sin, cos]] for the eigenvalues -+theta of i t K
        return ((cos_minus_one, sine), (-sine, cos_minus_one))
    # i t K is Hermitian: its diagonal is real to rounding
    h00, h11 = (1j * t * K[0][0]).real, (1j * t * K[1][1]).real
    lam, V = eigh2(h00, 1j * t * K[0][1], h11)
    noise = 2 * eps * max(abs(lam[0]), abs(lam[1]))
    phase = []
    for value in lam:
        cos_minus_one, sine = _phase_minus_one(value, noise, cayley)
        phase.append(complex(cos_minus_one, -sine))
    return tuple(
        tuple(sum(V[i][j] * phase[j] * _conj(V[k][j]) for j in range(2)) for k in range(2)) for i in range(2)
    )


# see _cores._SMALL
_SMALL = 0.5


def polar_small2(B, bottom=()):
    """``polar(I + B) - I`` of a 2 x 2 B by the small-B formula of
    :func:`._cores.polar_minus_identity`, or None when ``||B||_F`` is beyond
    its range (the caller then takes the general core's SVD branch). With
    ``bottom``, rows of two entries E stacked under I + B: the polar factor X
    of ``[I + B; E]`` as the pair ``(X_top - I, X_bottom)``, or None when
    ``||[B; E]||_F`` is beyond the range."""
    if math.sqrt(sum(abs(x) ** 2 for row in (*B, *bottom) for x in row)) > _SMALL:
        return None
    Bh = adjoint2(B)
    BhB = mul2(Bh, B)
    H = tuple(tuple(B[i][j] + Bh[i][j] + BhB[i][j] + sum(_conj(e[i]) * e[j] for e in bottom) for j in range(2))
              for i in range(2))
    mu, Y = eigh2(H[0][0].real, H[0][1], H[1][1].real)
    shrink = []
    for value in mu:
        root = math.sqrt(1 + max(value, -0.75))
        shrink.append(-value / (root * (1 + root)))
    S = tuple(tuple(sum(Y[i][j] * shrink[j] * _conj(Y[k][j]) for j in range(2)) for k in range(2)) for i in range(2))
    BS = mul2(B, S)
    top = tuple(tuple(B[i][j] + S[i][j] + BS[i][j] for j in range(2)) for i in range(2))
    if not bottom:
        return top
    return top, tuple(tuple(e[j] + e[0] * S[0][j] + e[1] * S[1][j] for j in range(2)) for e in bottom)
