"""The small r x r cores of the low-rank kernels, and where they run (floor 3, private).

The kernels reduce every n x n question to an r x r one (r <= 2k, or 2k + 2p
with oversampling) in the span of a few thin panels. The cores are written
once against the Array API and run in one of two places:

* :class:`HostCores` (eager calls): every small matrix of a step goes to the
  host in one transfer, is factored there in float64/complex128 with NumPy,
  and the results come back in one transfer. On a GPU this replaces a dozen
  tiny device LAPACK calls (each a launch or a synchronisation) by one round
  trip, and gives float64 cores on devices without float64. The host sees the
  small Gram matrices, so the NaN/Inf and unitarity checks cost nothing.
* :class:`DeviceCores` (traced calls: ``jax.jit``, ``torch.compile``, CUDA
  graphs): the same functions on the device, in float64 where it has it, with
  no host transfer and no Python branch on array values.

Every core is written so that a tiny update is not lost to cancellation and a
huge or singular one gives no NaN.
"""

from __future__ import annotations

import math

import array_api_compat.numpy
import numpy

# The host cores' namespace: NumPy itself from 2.1 on, where it implements
# the standard (its calls are a third cheaper than through the compat layer,
# and a step makes about a hundred of them); the compat layer before.
host_xp = numpy if tuple(int(part) for part in numpy.__version__.split(".")[:2]) >= (2, 1) else array_api_compat.numpy

from ._host import from_host_pieces, from_host_stack, staged, to_host_pieces
from ._xp import (
    add_product,
    complex_dtype,
    core_dtype,
    device,
    eye,
    finite_or_zero,
    is_complex,
    mH,
    real_dtype,
    real_finfo,
    shifted_diagonal,
    times_inverse_cholesky_factor,
)

__all__ = [
    "DeviceCores",
    "HostCores",
    "add_lowrank",
    "cholesky_columns",
    "expm_skew_minus_identity",
    "gram_basis",
    "hermitian_eigh",
    "make_cores",
    "polar_minus_identity",
]

# ||B||_F <= _SMALL keeps sigma(I + B) in [1/2, 3/2]; there the Gram formula of
# polar_minus_identity is both cancellation-free and well conditioned.
_SMALL = 0.5


def _widened(host):
    """A host array in float64 or complex128, the host cores' precision."""
    wide = host_xp.complex128 if host_xp.isdtype(host.dtype, "complex floating") else host_xp.float64
    return host.astype(wide, copy=False)


class HostCores:
    """Small work on the host, in float64/complex128; one transfer each way."""

    traced = False
    xp = host_xp
    eps = float(host_xp.finfo(host_xp.float64).eps)

    def __init__(self, xp, like):
        self._xp, self.dtype, self.device = xp, like.dtype, device(like)
        self.balance_bound = balance_bound(xp, like.dtype)

    def gather(self, *arrays):
        """The small device arrays (one dtype) as NumPy float64/complex128 arrays,
        moved in one transfer."""
        return tuple(_widened(host) for host in to_host_pieces(self._xp, arrays))

    def scatter(self, *arrays):
        """Host results as device arrays of the kernel's dtype, in one transfer."""
        name = _host_name(self._xp, self.dtype)
        hosts = [host_xp.asarray(a) for a in arrays]
        flat = host_xp.concat([host_xp.reshape(a, (-1,)) for a in hosts]).astype(name)
        return from_host_pieces(self._xp, flat, [tuple(a.shape) for a in hosts], dtype=self.dtype,
                                device=self.device)

    def scatter_stack(self, values, shape=None):
        """Nested sequences of Python numbers of one shape (..., r, s) as
        device arrays of the kernel's dtype, in one transfer: the entries of
        the first axis, as views of one array, each of ``shape`` where given."""
        name = _host_name(self._xp, self.dtype)
        host = host_xp.asarray(values, dtype=getattr(host_xp, name))
        if shape is not None:
            host = host.reshape((host.shape[0], *shape))
        return from_host_stack(self._xp, host, dtype=self.dtype, device=self.device)


class DeviceCores:
    """Small work on the device (traced programs): no transfer, no value branch."""

    traced = True

    def __init__(self, xp, like):
        self.xp, self.dtype = xp, like.dtype
        self.balance_bound = balance_bound(xp, like.dtype)
        self._core = core_dtype(xp, like.dtype, device(like))
        self.eps = float(xp.finfo(real_dtype(xp, self._core)).eps)

    def gather(self, *arrays):
        """The small arrays in the cores' dtype, NaN and Inf entries replaced
        by zeros. A traced step cannot branch on them, and a device eigh may
        raise on NaN (PyTorch's on the CPU does), which no captured step may
        do; the thin panels still carry the NaN into the step's factors, where
        callers that guard (the capturable optimizer, the optax update) find it."""
        return tuple(finite_or_zero(self.xp, self.xp.astype(a, self._core, copy=False)) for a in arrays)

    def scatter(self, *arrays):
        return tuple(self.xp.astype(a, self.dtype, copy=False) for a in arrays)


def balance_bound(xp, dtype):
    """The largest power-of-two exponent that balancing a panel of ``dtype``
    may move (``_flow._balance``): 2**e and 2**-e, and a column of any finite
    length scaled by either, stay finite there (120 for 32-bit dtypes, whose
    largest finite value is below 2**128; 1016 for 64-bit ones)."""
    return 120 if real_finfo(xp, dtype)[0] > 2.0**-30 else 1016


def _host_name(xp, dtype):
    for name in ("float32", "float64", "complex64", "complex128"):
        if dtype == getattr(xp, name):
            return name
    raise TypeError(f"unsupported dtype {dtype}")


def make_cores(xp, like, traced):
    """Where the small work of a kernel on ``like`` runs: on the host when the
    call is eager, on the device when it is traced."""
    return DeviceCores(xp, like) if traced else HostCores(xp, like)


def hermitian_eigh(xp, H):
    """``xp.linalg.eigh(H)`` for Hermitian H (..., r, r): eigenvalues in
    ascending order, orthonormal eigenvectors in the columns. For r = 1 and
    r = 2, the cores of a rank-1 step, in closed form from elementwise
    operations: on a device a library eigensolver is a solver call of its
    own (PyTorch's CUDA ``eigh`` cannot be captured in a CUDA graph), and
    these matrices need none. The 2 x 2 form reads the eigenvector of the
    larger eigenvalue from the row of ``H - lambda I`` without cancellation
    (as ``_tiny.eigh2`` does on the host), so it is accurate to rounding
    relative to the larger eigenvalue, as LAPACK's; scaled by the larger of
    the half-difference and the off-diagonal entry, it neither overflows nor
    underflows. Where the two eigenvalues are equal, any orthonormal pair is
    returned (the functions of H built from them do not depend on it)."""
    r = H.shape[-1]
    if r > 2:
        return xp.linalg.eigh(H)
    real = xp.real(H) if is_complex(xp, H.dtype) else H
    if r == 1:
        return real[..., 0], xp.ones_like(H)
    conj = xp.conj if is_complex(xp, H.dtype) else (lambda x: x)
    h00, h11, h01 = real[..., 0, 0], real[..., 1, 1], H[..., 0, 1]
    mean, half, off = (h00 + h11) / 2, (h00 - h11) / 2, xp.abs(h01)
    big = xp.maximum(xp.abs(half), off)
    unit = xp.where(big > 0, big, xp.ones_like(big))
    half_s, off_s = half / unit, off / unit
    rho_s = xp.sqrt(half_s * half_s + off_s * off_s)  # rho / unit, in [1, sqrt(2)] unless H is a multiple of I
    if is_complex(xp, H.dtype):  # part by part: a complex division by a tiny number can overflow inside
        h01_s = xp.astype(xp.real(h01) / unit, H.dtype) + xp.astype(xp.imag(h01) / unit, H.dtype) * 1j
    else:
        h01_s = h01 / unit
    upper = half >= 0
    x = xp.where(upper, xp.astype(half_s + rho_s, H.dtype, copy=False), h01_s)
    y = xp.where(upper, conj(h01_s), xp.astype(rho_s - half_s, H.dtype, copy=False))
    norm = xp.sqrt(xp.abs(x) ** 2 + xp.abs(y) ** 2)  # at least rho_s: no underflow
    # H = mean I (big = 0, so x = y = 0): every vector is an eigenvector. Decided
    # on the divisor itself: XLA may compute big and x in separate fusions with
    # different last bits, and a test on big (0 in one, 1e-16 in the other) gave
    # 0 / 0 for an H within rounding of I (a re-based sketch's Gram) under jax.jit.
    equal = ~(norm > 0)
    safe = xp.astype(xp.where(equal, xp.ones_like(norm), norm), H.dtype, copy=False)
    x = xp.where(equal, xp.ones_like(x), x / safe)
    y = xp.where(equal, xp.zeros_like(y), y / safe)
    rho = rho_s * big
    lam = xp.stack([mean - rho, mean + rho], axis=-1)
    V = xp.stack([xp.stack([-conj(y), x], axis=-1), xp.stack([conj(x), y], axis=-1)], axis=-2)
    return lam, V


def gram_basis(xp, C, tol, *, basis_only=False):
    """A basis of the span of a panel P (..., n, m) from its Gram C = P^H P.

    Returns (T, R, spread): Q = P T has orthonormal columns, or exactly zero
    ones for the directions dropped as numerically null, and P = Q R on the
    kept ones; ``spread`` (...) is the largest over the smallest kept
    eigenvalue, which bounds how far the computed Q = P T is from orthonormal.
    The columns are equilibrated first (Jacobi scaling), so columns of very
    different lengths cost no accuracy; a direction is dropped when its
    eigenvalue in the scaled Gram is at most ``tol`` times the largest (and a
    zero panel keeps none). Shapes do not depend on values: traceable.
    ``basis_only``: (T, None, None), for callers that need only the basis
    (on the host every operation here is a NumPy call on a tiny array, and
    R and the spread are a third of them).
    """
    d = xp.real(xp.linalg.diagonal(C))
    zero, one = xp.zeros_like(d), xp.ones_like(d)  # also lam's shape and dtype
    positive = d > 0
    root_d = xp.sqrt(xp.where(positive, d, one))
    scale = xp.where(positive, 1 / root_d, zero)
    lam, V = hermitian_eigh(xp, C * xp.astype(scale[..., :, None] * scale[..., None, :], C.dtype, copy=False))
    top = xp.max(lam, axis=-1, keepdims=True)
    keep = (lam > tol * top) & (top > 0)
    root = xp.sqrt(xp.where(keep, lam, one))
    inverse_root = xp.where(keep, 1 / root, zero)
    T = V * xp.astype(scale[..., :, None] * inverse_root[..., None, :], V.dtype, copy=False)
    if basis_only:
        return T, None, None
    kept_root, column_root = xp.where(keep, root, zero), xp.where(positive, root_d, zero)
    R = mH(xp, V) * xp.astype(kept_root[..., :, None] * column_root[..., None, :], V.dtype, copy=False)
    smallest = xp.min(xp.where(keep, lam, top), axis=-1)
    kept_any, ones = smallest > 0, xp.ones_like(smallest)
    spread = xp.where(kept_any, top[..., 0] / xp.where(kept_any, smallest, ones), ones)
    return T, R, spread


def cholesky_columns(xp, P, C, tol):
    """``P T``, nearly orthonormal columns spanning the panel P (..., n, m)
    of Gram C = P^H P, on P's device with no host transfer: shifted Cholesky
    QR (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa, SIAM J. Sci.
    Comput. 42(1), 2020), for bases that need to be well conditioned, not
    orthonormal to rounding (the sketch's power iteration, see
    ``_flow.orthonormal_columns``). P and C in one dtype, the result in it.

    Each diagonal entry of C grows by ``tol`` (at least the Gram's rounding
    level, see :func:`drop_tolerance`) times itself, the shift ``tol I`` of
    the equilibrated Gram, plus the dtype's smallest normal number: the
    factorisation succeeds for every finite C, directions well above ``tol``
    come out orthonormal, directions near it are damped instead of amplified
    (``gram_basis`` drops them) and a zero column stays zero. Cholesky
    factors and triangular solves need no equilibration of their own: their
    errors are those of the equilibrated matrix (van der Sluis). Unlike
    ``gram_basis``, no eigendecomposition, and no branch on values: one
    Cholesky factorisation and one triangular solve, which a GPU runs
    without synchronising (``_xp.times_inverse_cholesky_factor``). NaN or
    Inf in C gives NaN, which the step's own Gram reports.
    """
    # C's own diagonal (complex for a complex C, with a zero or rounding-level
    # imaginary part, which the factorisation ignores) grows in place: C is
    # the caller's fresh Gram
    try:
        return times_inverse_cholesky_factor(xp, P, shifted_diagonal(xp, C, 1 + tol, real_finfo(xp, C.dtype)[1]))
    except numpy.linalg.LinAlgError:  # NumPy's, for NaN or Inf in C
        return xp.full_like(P, float("nan"))


def drop_tolerance(n, eps, core_eps):
    """Relative eigenvalue below which a direction of an n-row panel of
    precision ``eps``, whose Gram is factored in precision ``core_eps``, is
    rounding: the panel's columns carry errors of about eps sqrt(n) of their
    length, and eigh resolves eigenvalues only to about core_eps times the
    largest."""
    return max(max(n, 64) * (8 * eps) ** 2, 64 * core_eps)


def expm_skew_minus_identity(xp, K, t, *, cayley=False):
    """expm(t K) - I for skew-Hermitian K (..., r, r); t a number or a 0-d array.
    ``cayley=True``: the Cayley map ``(I - t/2 K)^(-1) (I + t/2 K) - I`` instead.

    With i t K = V diag(lam) V^H (Hermitian eigendecomposition),
    expm(t K) - I = V diag(exp(-i lam) - 1) V^H, and
    exp(-i lam) - 1 = -2 sin^2(lam / 2) - i sin(lam) keeps full relative
    accuracy for tiny lam. The Cayley map has the same eigenvectors and the
    eigenvalues ``(1 - i lam/2) / (1 + i lam/2) = exp(-2 i atan(lam / 2))``: the
    same formula with the angle ``2 atan(lam / 2)``, which needs no solve, is
    unitary to rounding for every t and tends to a reflection (angle pi) as t
    grows, where ``I - t/2 K`` is singular in floating point. Real K gives a
    real result built from exact plane rotations (see below).
    """
    ctype = complex_dtype(xp, K.dtype)
    Kc = xp.astype(K, ctype, copy=False)
    if isinstance(t, (int, float)):
        lam, V = hermitian_eigh(xp, Kc * (1j * t))
    else:  # a 0-d array (a traced learning rate)
        lam, V = hermitian_eigh(xp, Kc * (xp.astype(t, ctype) * 1j))
    if cayley:
        angle = 2 * xp.atan(lam / 2)
    else:
        # Reduce to [-pi, pi]: exact for |lam| < pi, and for huge steps it keeps
        # sin(lam) and sin(lam / 2) consistent (so |exp(-i lam)| = 1 to rounding)
        # in math libraries whose argument reduction is loose for large arguments.
        angle = lam - (2 * math.pi) * xp.round(lam / (2 * math.pi))
    # Eigenvalues at the eigensolver's rounding level (matrix_rank's criterion)
    # are zero in exact arithmetic: K of odd size or of lower rank. Their noise
    # angle, eps t |K|, would otherwise rotate W's untouched directions.
    size = xp.abs(lam)
    noise = lam.shape[-1] * xp.finfo(lam.dtype).eps * xp.max(size, axis=-1, keepdims=True)
    angle = xp.where(size <= noise, xp.zeros_like(angle), angle)
    half = xp.sin(angle / 2)
    cos_minus_one = -2 * half * half
    sine = xp.sin(angle)
    if is_complex(xp, K.dtype):
        phase = xp.astype(cos_minus_one, ctype) - xp.astype(sine, ctype) * 1j
        return (V * phase[..., None, :]) @ mH(xp, V)
    # Real K: the eigenvectors of lam > 0, v = x + i y, each span an invariant
    # plane {x, y} that K rotates by lam. Re-orthonormalising x and y within
    # their plane and applying the rotation there gives an orthogonal result to
    # rounding for every t, where rebuilding it from the complex formula would
    # amplify the last-bit disagreement of a computed (lam, -lam) pair by t |K|.
    positive = xp.astype(lam > noise, lam.dtype)
    x, y = xp.real(V), xp.imag(V)
    r = K.shape[-1]
    if r >= 4:
        # Two planes or more: the planes of the top r // 2 eigenvalues (lam >= 0)
        # orthonormalised together, the largest angle first (one QR of [x1, y1,
        # x2, y2, ...], signs kept). Each plane on its own left planes of close
        # small angles 1e-6 apart from orthogonal when the angles spread over
        # 1e10 (a huge step on an ill-conditioned gradient), and the result
        # ||D^H D + D + D^H|| at 1e-12; now the planes are orthogonal to rounding.
        h = r // 2
        x, y = xp.flip(x[..., -h:], axis=-1), xp.flip(y[..., -h:], axis=-1)
        positive, cos_minus_one, sine = (xp.flip(v[..., -h:], axis=-1) for v in (positive, cos_minus_one, sine))
        Q, R = xp.linalg.qr(xp.reshape(xp.stack([x, y], axis=-1), (*x.shape[:-1], 2 * h)))
        pivots = xp.linalg.diagonal(R)
        Q = Q * xp.where(pivots < 0, -xp.ones_like(pivots), xp.ones_like(pivots))[..., None, :]
        x, y = Q[..., 0::2], Q[..., 1::2]
    else:
        x = x / _column_norm(xp, x)
        y = y - x * xp.sum(x * y, axis=-2, keepdims=True)
        y = y / _column_norm(xp, y)
    a = positive * cos_minus_one
    b = -positive * sine
    a, b = a[..., None, :], b[..., None, :]
    # x a x^T + y a y^T + x b y^T - y b x^T, as one product
    left = xp.concat([x * a - y * b, x * b + y * a], axis=-1)
    return left @ mH(xp, xp.concat([x, y], axis=-1))


def _column_norm(xp, x):
    norm = xp.sqrt(xp.sum(x * x, axis=-2, keepdims=True))
    return xp.where(norm > 0, norm, xp.ones_like(norm))


def polar_minus_identity(xp, B, *, bottom=None, traced=True):
    """polar(I + B) - I for square B (..., r, r): the unitary factor of I + B,
    minus the identity. With ``bottom`` E (..., j, r): the polar factor X of
    the stacked (r + j) x r matrix ``[I + B; E]`` (orthonormal columns),
    returned as the pair ``(X_top - I, X_bottom)``.

    Small B (and E): with H = B + B^H + B^H B + E^H E = M^H M - I = Y diag(mu) Y^H,
    (I + H)^(-1/2) - I = Y diag(-mu / (sqrt(1+mu) (1 + sqrt(1+mu)))) Y^H =: S and
    X_top - I = B + S + B S, X_bottom = E (I + S), free of cancellation, and
    exactly (0, 0) for B = 0, E = 0.
    Otherwise: U V^H from the thin SVD of M, scaled so that no finite B
    overflows, which is well defined for huge B and picks one polar factor
    when M is rank-deficient. ``traced=False`` computes only the branch each
    matrix takes (host cores); traced code computes both and selects.
    """
    r = B.shape[-1]
    identity = eye(xp, r, like=B)
    stacked = B if bottom is None else xp.concat([B, bottom], axis=-2)
    norm = xp.linalg.matrix_norm(stacked)
    is_small = norm <= _SMALL
    if not traced and B.ndim == 2:
        if bool(is_small):
            return _polar_small(xp, B, bottom)
        return _polar_large(xp, stacked, norm, identity, bottom is not None)
    if not is_complex(xp, B.dtype):
        # The polar factor of a real matrix is real; computed in complex
        # arithmetic here because torch.compile's inductor (2.13) mis-compiles a
        # graph holding both real branches (two real LAPACK calls on related
        # buffers gave a wrong D, never a non-unitary one). The cores are r x r.
        ctype = complex_dtype(xp, B.dtype)
        result = polar_minus_identity(xp, xp.astype(B, ctype),
                                      bottom=None if bottom is None else xp.astype(bottom, ctype), traced=True)
        return xp.real(result) if bottom is None else tuple(xp.real(x) for x in result)
    select = is_small[..., None, None]
    zero = xp.zeros_like(stacked)
    small = _polar_small(xp, *_split(xp, xp.where(select, stacked, zero), r, bottom is not None))
    large = _polar_large(xp, xp.where(select, zero, stacked), norm, identity, bottom is not None)
    if bottom is None:
        return xp.where(select, small, large)
    return tuple(xp.where(select, s, g) for s, g in zip(small, large))


def _split(xp, stacked, r, has_bottom):
    return (stacked[..., :r, :], stacked[..., r:, :]) if has_bottom else (stacked, None)


def _polar_small(xp, B, E=None):
    Bh = mH(xp, B)
    H = B + Bh + Bh @ B
    if E is not None:
        H = H + mH(xp, E) @ E
    mu, Y = hermitian_eigh(xp, H)
    root = xp.sqrt(1 + xp.clip(mu, min=-0.75))
    shrink = -mu / (root * (1 + root))
    S = (Y * xp.astype(shrink, Y.dtype)[..., None, :]) @ mH(xp, Y)
    top = B + S + B @ S
    return top if E is None else (top, E + E @ S)


def _polar_large(xp, stacked, norm, identity, has_bottom):
    # polar(c M) = polar(M) for c > 0: divide by ||B|| (>= 1/2 here) so that
    # I + B is formed without overflow however large B is.
    r = identity.shape[-1]
    scale = xp.astype(xp.where(norm > 1, norm, xp.ones_like(norm)), stacked.dtype)[..., None, None]
    scaled = stacked / scale
    if has_bottom:
        pad = xp.zeros((*stacked.shape[:-2], stacked.shape[-2] - r, r), dtype=stacked.dtype, device=device(stacked))
        scaled = scaled + xp.concat([xp.broadcast_to(identity, (*stacked.shape[:-2], r, r)), pad], axis=-2) / scale
    else:
        scaled = scaled + identity / scale
    U, _, Vh = xp.linalg.svd(scaled, full_matrices=False)
    X = U @ Vh
    if not has_bottom:
        return X - identity
    return X[..., :r, :] - identity, X[..., r:, :]


@staged()
def add_lowrank(xp, W, L, Rh):
    """W + L @ Rh for thin L (..., n, r) and Rh (..., r, m), as a new array in
    W's layout (``_xp.add_product``); an optimizer that owns W can apply L and
    Rh in place instead."""
    return add_product(xp, W, L, Rh)
