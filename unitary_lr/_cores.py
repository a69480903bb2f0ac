"""The small r x r cores of the low-rank kernels (floor 3, private).

The kernels reduce every n x n question to an r x r one (r <= 2k) in an
orthonormal basis of the update's span. These cores cost nothing next to the
O(k n^2) passes over W, so they run in float64/complex128 where the device has
it (see ``_xp.core_dtype``), use only ``eigh`` and ``svd`` (never a general
eigensolver), and are written so that a tiny update is not lost to
cancellation and a huge or singular one does not produce NaN.
"""

from __future__ import annotations

import math

from ._xp import broadcast_shapes, complex_dtype, eye, is_complex, mH

__all__ = ["add_lowrank", "basis_of_columns", "expm_skew_minus_identity", "polar_minus_identity"]

# ||B||_F <= _SMALL keeps sigma(I + B) in [1/2, 3/2]; there the Gram formula of
# polar_minus_identity is both cancellation-free and well conditioned.
_SMALL = 0.5


def basis_of_columns(xp, left, right):
    """Orthonormal basis Q (..., n, r) of span[left, right] and the coordinates
    R = Q^H [left, right] (..., r, kl + kr), split back into the two blocks.

    Householder QR: Q is orthonormal to rounding even when the columns are
    dependent or zero (then Q carries harmless extra directions, and the block
    of R of a zero column is exactly zero).
    """
    batch = broadcast_shapes(left.shape[:-2], right.shape[:-2])
    left = xp.broadcast_to(left, (*batch, *left.shape[-2:]))
    right = xp.broadcast_to(right, (*batch, *right.shape[-2:]))
    Q, R = xp.linalg.qr(xp.concat([left, right], axis=-1), mode="reduced")
    k = left.shape[-1]
    return Q, R[..., :k], R[..., k:]


def expm_skew_minus_identity(xp, K, t):
    """expm(t K) - I for skew-Hermitian K (..., r, r).

    With i t K = V diag(lam) V^H (Hermitian eigendecomposition),
    expm(t K) - I = V diag(exp(-i lam) - 1) V^H, and
    exp(-i lam) - 1 = -2 sin^2(lam / 2) - i sin(lam) keeps full relative
    accuracy for tiny lam. Real K gives a real result.
    """
    ctype = complex_dtype(xp, K.dtype)
    Kc = xp.astype(K, ctype, copy=False)
    lam, V = xp.linalg.eigh(Kc * (1j * t))
    # Reduce to [-pi, pi]: exact for |lam| < pi, and for huge steps it keeps
    # sin(lam) and sin(lam / 2) consistent (so |exp(-i lam)| = 1 to rounding)
    # in math libraries whose argument reduction is loose for large arguments.
    angle = lam - (2 * math.pi) * xp.round(lam / (2 * math.pi))
    # Eigenvalues at the eigensolver's rounding level (matrix_rank's criterion)
    # are zero in exact arithmetic: K of odd size or of lower rank. Their noise
    # angle, eps t |K|, would otherwise rotate W's untouched directions.
    noise = lam.shape[-1] * xp.finfo(lam.dtype).eps * xp.max(xp.abs(lam), axis=-1, keepdims=True)
    angle = xp.where(xp.abs(lam) <= noise, xp.zeros_like(angle), angle)
    half = xp.sin(angle / 2)
    phase = xp.astype(-2 * half * half, ctype) + xp.astype(-xp.sin(angle), ctype) * 1j
    if is_complex(xp, K.dtype):
        return (V * phase[..., None, :]) @ mH(xp, V)
    # Real K: the eigenpairs come as (lam, v) and (-lam, conj(v)), and together
    # they contribute 2 Re(phi v v^H), a rotation of the real plane spanned by
    # Re v and Im v. Taking the lam > 0 member twice, instead of both members,
    # keeps every plane's rotation orthogonal to rounding even when a computed
    # pair disagrees in its last bits, which a huge t |K| would amplify.
    weight = xp.astype(2 * xp.astype(lam > 0, lam.dtype), ctype)
    return xp.real((V * (weight * phase)[..., None, :]) @ mH(xp, V))


def polar_minus_identity(xp, B):
    """polar(I + B) - I for square B (..., r, r): the unitary factor of I + B,
    minus the identity.

    Small B: with H = B + B^H + B^H B = (I + B)^H (I + B) - I = Y diag(mu) Y^H,
    (I + H)^(-1/2) - I = Y diag(-mu / (sqrt(1+mu) (1 + sqrt(1+mu)))) Y^H =: S and
    polar(I + B) - I = B + S + B S, free of cancellation, and exactly 0 for B = 0.
    Otherwise: U V^H - I from the SVD of I + B, which is well defined for huge B
    and picks a unitary polar factor when I + B is singular.
    """
    identity = eye(xp, B.shape[-1], like=B)
    Bh = mH(xp, B)
    mu, Y = xp.linalg.eigh(B + Bh + Bh @ B)
    # The clip only guards entries of the batch that take the SVD branch.
    root = xp.sqrt(1 + xp.clip(mu, min=-0.75))
    shrink = -mu / (root * (1 + root))
    S = (Y * shrink[..., None, :]) @ mH(xp, Y)
    small = B + S + B @ S
    U, _, Vh = xp.linalg.svd(identity + B, full_matrices=False)
    large = U @ Vh - identity
    is_small = xp.linalg.matrix_norm(B) <= _SMALL
    return xp.where(is_small[..., None, None], small, large)


def add_lowrank(xp, W, L, Rh):
    """W + L @ Rh for thin L (..., n, r) and Rh (..., r, m), as a new array.

    Every low-rank kernel ends in such an update. One n x m temporary, the
    result itself, is written, then W is added into it in place (an array of
    our own); an optimizer that owns W can apply L and Rh in place instead.
    """
    out = L @ Rh
    out += W
    return out
