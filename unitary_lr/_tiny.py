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
    # written out entry by entry: a step calls this once or twice, and
    # Python's generator expressions cost more than the arithmetic here
    d0, d1 = C[0][0].real, C[1][1].real
    root_d0, root_d1 = (math.sqrt(d0) if d0 > 0 else 0.0), (math.sqrt(d1) if d1 > 0 else 0.0)
    scale0, scale1 = (1 / root_d0 if root_d0 > 0 else 0.0), (1 / root_d1 if root_d1 > 0 else 0.0)
    (small, top), ((v00, v01), (v10, v11)) = eigh2(1.0 if d0 > 0 else 0.0, C[0][1] * scale0 * scale1,
                                                   1.0 if d1 > 0 else 0.0)
    keep_small = small > tol * top and top > 0
    root0 = math.sqrt(small) if keep_small else 0.0
    root1 = math.sqrt(top) if top > tol * top and top > 0 else 0.0
    inverse0, inverse1 = (1 / root0 if root0 else 0.0), (1 / root1 if root1 else 0.0)
    # T = diag(scale) V diag(1 / root), R = diag(root) V^H diag(root_d)
    T = ((v00 * scale0 * inverse0, v01 * scale0 * inverse1), (v10 * scale1 * inverse0, v11 * scale1 * inverse1))
    R = ((_conj(v00) * root0 * root_d0, _conj(v10) * root0 * root_d1),
         (_conj(v01) * root1 * root_d0, _conj(v11) * root1 * root_d1))
    smallest = small if keep_small else top
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
    (c0, s0), (c1, s1) = _phase_minus_one(lam[0], noise, cayley), _phase_minus_one(lam[1], noise, cayley)
    p0, p1 = complex(c0, -s0), complex(c1, -s1)
    (v00, v01), (v10, v11) = V
    # V diag(phase) V^H, entry by entry
    w00, w01, w10, w11 = _conj(v00), _conj(v01), _conj(v10), _conj(v11)
    return ((v00 * p0 * w00 + v01 * p1 * w01, v00 * p0 * w10 + v01 * p1 * w11),
            (v10 * p0 * w00 + v11 * p1 * w01, v10 * p0 * w10 + v11 * p1 * w11))


# see _cores._SMALL
_SMALL = 0.5


def polar_small2(B, bottom=()):
    """``polar(I + B) - I`` of a 2 x 2 B by the small-B formula of
    :func:`._cores.polar_minus_identity`, or None when ``||B||_F`` is beyond
    its range (the caller then takes the general core's SVD branch). With
    ``bottom``, rows of two entries E stacked under I + B: the polar factor X
    of ``[I + B; E]`` as the pair ``(X_top - I, X_bottom)``, or None when
    ``||[B; E]||_F`` is beyond the range."""
    # hypot: squares of entries beyond 1e154 overflow a Python float, which
    # raises (a float32 step of lr 1e150 on a gradient of 1e20 did)
    if math.hypot(*(abs(x) for row in (*B, *bottom) for x in row)) > _SMALL:
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
