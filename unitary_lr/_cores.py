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
huge or singular one gives no NaN. On the host, the cores of one matrix that
every eager step of rank two or more calls take NumPy fast paths of the same
operations, bit for bit (:data:`HOST_FAST_PATHS`).
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
    max_abs,
    mH,
    real_dtype,
    real_finfo,
    shifted_diagonal,
    supports_float64,
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
        # The Grams that reach the host were formed on the device, in float64
        # where it has it, else in the arrays' own precision: what they
        # resolve is that precision's (see drop_tolerance). Taken as float64
        # Grams, a float32 step on a device without float64 kept directions at
        # 1e-10 of a Gram's largest eigenvalue, which are rounding, and a
        # rank-n step left W 2.6e-6 from unitary (4.8e-6 on JAX without x64).
        self.gram_eps = self.eps if supports_float64(xp, self.device) else real_finfo(xp, like.dtype)[0]

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
        self.eps = self.gram_eps = float(xp.finfo(real_dtype(xp, self._core)).eps)  # (Grams formed in the cores' dtype)

    def gather(self, *arrays):
        """The small arrays in the cores' dtype, NaN and Inf entries replaced
        by zeros. A traced step cannot branch on them, and a device eigh may
        raise on NaN (PyTorch's on the CPU does), which no captured step may
        do; the thin panels still carry the NaN into the step's factors, where
        callers that guard (the capturable optimizer, the optax update) find it."""
        return tuple(finite_or_zero(self.xp, self.xp.astype(a, self._core, copy=False)) for a in arrays)

    def scatter(self, *arrays):
        return tuple(self.xp.astype(a, self.dtype, copy=False) for a in arrays)


def scatter_present(cores, *arrays):
    """``cores.scatter`` of those of ``arrays`` that are not None, in one
    transfer, in order; each None (an optional column scale that no column
    needed) stays None."""
    moved = iter(cores.scatter(*(a for a in arrays if a is not None)))
    return tuple(None if a is None else next(moved) for a in arrays)


def balance_bound(xp, dtype):
    """The largest power-of-two exponent that balancing a panel of ``dtype``
    may move (``_flow.balance_columns``): 2**e and 2**-e, and a column of any finite
    length scaled by either, stay finite there (120 for 32-bit dtypes, whose
    largest finite value is below 2**128; 1016 for 64-bit ones)."""
    return 120 if real_finfo(xp, dtype)[0] > 2.0**-30 else 1016


def _host_name(xp, dtype):
    for name in ("float32", "float64", "complex64", "complex128"):
        if dtype == getattr(xp, name):
            return name
    raise TypeError(f"unsupported dtype {dtype}")


def largest(x, empty):
    """The largest entry of the host array x (one of the cores' NumPy
    arrays) as a Python float, or ``empty`` where x has no entry: an empty
    batch of matrices, whose maximum has no value."""
    return float(host_xp.max(x)) if x.size else empty


def make_cores(xp, like, traced):
    """Where the small work of a kernel on ``like`` runs: on the host when the
    call is eager, on the device when it is traced."""
    return DeviceCores(xp, like) if traced else HostCores(xp, like)


# Whether the host's cores take their fast paths (``_gram_basis_host``,
# ``_planes_minus_identity_host``, the clamp of ``_flow._clamped``, the
# diagonals of ``_flow.balance_columns`` and ``_unitarity_deviation``): the
# general forms' operations bit for bit, with NumPy's cheaper means; tests
# switch them off to compare (``tests/test_cores_host.py``).
HOST_FAST_PATHS = True


def host_fast(xp, x):
    """Whether the core on ``x`` takes its host fast path: one NumPy matrix
    (or less) of the host's cores (``host_xp``), not a batch."""
    return HOST_FAST_PATHS and xp is host_xp and x.ndim <= 2


def hermitian_eigh(xp, H):
    """``xp.linalg.eigh(H)`` for Hermitian H (..., r, r): eigenvalues in
    ascending order, orthonormal eigenvectors in the columns. For r = 1 and
    r = 2, the cores of a rank-1 step, in closed form from elementwise
    operations: on a device a library eigensolver is a solver call of its
    own (PyTorch's CUDA ``eigh`` cannot be captured in a CUDA graph), and
    these matrices need none.

    The 2 x 2 form is one Jacobi rotation. With ``h01 = |h01| e^{i w}``,
    ``H = P S P^H`` for ``P = diag(1, e^{-i w})`` and the real symmetric
    ``S = [[h00, |h01|], [|h01|, h11]]``, whose eigenvectors are
    ``(cos phi, sin phi)`` and ``(-sin phi, cos phi)`` for the angle
    ``2 phi = atan2(|h01|, (h00 - h11) / 2)``; the eigenvalues are
    ``mean -+ hypot((h00 - h11) / 2, |h01|)``. ``atan2`` and ``hypot`` take
    ratios, so no entry of any size overflows or underflows, the
    eigenvalues are accurate to rounding relative to the larger one, as
    LAPACK's, and the eigenvectors are orthonormal to rounding. Where the
    two eigenvalues are equal the angle is 0 and the pair is the identity's
    (any orthonormal pair is right there). On a GPU each operation is a
    kernel of its own: 17 operations for a real H, 33 for a complex one
    (torch, counting the numbers the selections take). On the host
    (``host_xp``, the eager cores) LAPACK's ``eigh`` is the faster of the
    two even there: 18-20 us against 60 (real) and 122 us (complex) for
    the closed form's NumPy calls on a 2 x 2 array."""
    r = H.shape[-1]
    if r > 2 or xp is host_xp:
        return xp.linalg.eigh(H)
    complex_ = is_complex(xp, H.dtype)
    real = xp.real(H) if complex_ else H
    if r == 1:
        return real[..., 0], xp.ones_like(H)
    h00, h11, h01 = real[..., 0, 0] / 2, real[..., 1, 1] / 2, H[..., 0, 1]
    mean, half = h00 + h11, h00 - h11  # halved first: no overflow
    # a real H rotates by the signed off-diagonal entry; a complex one by its
    # modulus, its phase moved into the second row of the eigenvectors
    off = xp.abs(h01) if complex_ else h01
    rho = xp.hypot(half, off)
    # rho = 0: H = mean I, any pair (and XLA's float32 atan2 of two subnormal
    # numbers is NaN, where its hypot flushes them to 0)
    phi = xp.where(rho > 0, xp.atan2(off, half), 0.0) / 2
    c, s = xp.cos(phi), xp.sin(phi)
    lam = xp.stack([mean - rho, mean + rho], axis=-1)
    if complex_:
        phase = _unit_phase(xp, xp.conj(h01), off)  # e^{-i w}
        c, s = xp.astype(c, H.dtype), xp.astype(s, H.dtype)
        entries = [-s, c, phase * c, phase * s]
    else:
        entries = [-s, c, c, s]
    # [[-s, c], [c', s']] row by row: one stack, whose reshape is a view
    return lam, xp.reshape(xp.stack(entries, axis=-1), (*c.shape, 2, 2))


def _unit_phase(xp, z, modulus):
    """``z / |z|`` for complex z (``modulus`` = ``|z|``), 1 where z = 0, from the angle
    ``atan2(Im z, Re z)``: of modulus 1 to rounding for every z. Dividing by
    ``|z|`` is not: a complex division by a tiny number overflows inside
    (NumPy's takes the reciprocal of a subnormal |z| first: Inf, then NaN),
    and dividing the parts of a subnormal z by its subnormal modulus keeps
    too few digits (the eigenvectors of a complex64 H with an off-diagonal
    entry of 5e-42 were 2e-4 from orthonormal)."""
    angle = xp.atan2(xp.imag(z), xp.real(z))
    phase = xp.astype(xp.cos(angle), z.dtype) + xp.astype(xp.sin(angle), z.dtype) * 1j
    # (XLA's float32 atan2 of two subnormal parts is NaN; its abs flushes them to 0)
    return xp.where(modulus > 0, phase, 1.0)


def gram_basis(xp, C, tol, *, basis_only=False, with_spread=True):
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
    R and the spread are a third of them); ``with_spread=False``: (T, R,
    None), for traced callers, which cannot look at the spread.
    """
    if host_fast(xp, C):
        return _gram_basis_host(C, tol, basis_only, with_spread)
    # Python zeros and ones in the selections: the standard broadcasts them
    # at no cost, where a zeros_like is an operation (a kernel on a device)
    d = xp.real(xp.linalg.diagonal(C))
    positive = d > 0
    root_d = xp.sqrt(xp.where(positive, d, 1.0))
    scale = xp.where(positive, 1 / root_d, 0.0)
    lam, V = hermitian_eigh(xp, C * xp.astype(scale[..., :, None] * scale[..., None, :], C.dtype, copy=False))
    top = xp.max(lam, axis=-1, keepdims=True)
    # (tol < 1: a top <= 0, a zero panel's, keeps nothing)
    keep = lam > tol * top
    root = xp.sqrt(xp.where(keep, lam, 1.0))
    inverse_root = xp.where(keep, 1 / root, 0.0)
    T = V * xp.astype(scale[..., :, None] * inverse_root[..., None, :], V.dtype, copy=False)
    if basis_only:
        return T, None, None
    kept_root, column_root = xp.where(keep, root, 0.0), xp.where(positive, root_d, 0.0)
    R = mH(xp, V) * xp.astype(kept_root[..., :, None] * column_root[..., None, :], V.dtype, copy=False)
    if not with_spread:
        return T, R, None
    smallest = xp.min(xp.where(keep, lam, top), axis=-1)
    kept_any = smallest > 0
    spread = xp.where(kept_any, top[..., 0] / xp.where(kept_any, smallest, 1.0), 1.0)
    return T, R, spread


def _gram_basis_host(C, tol, basis_only, with_spread):
    """:func:`gram_basis` of one host matrix C: the general form's
    operations bit for bit, with NumPy's cheaper means (array methods and
    views where the standard has functions: a NumPy function call on a tiny
    array costs about twice its method's). ``tests/test_cores_host.py``
    holds it to the general form with the fast paths off."""
    d = C.diagonal().real
    positive = d > 0
    root_d = numpy.sqrt(numpy.where(positive, d, 1.0))
    scale = numpy.where(positive, 1 / root_d, 0.0)
    outer = scale[:, None] * scale[None, :]
    lam, V = numpy.linalg.eigh(C * (outer if outer.dtype == C.dtype else outer.astype(C.dtype)))
    top = lam.max(keepdims=True)
    keep = lam > tol * top
    root = numpy.sqrt(numpy.where(keep, lam, 1.0))
    inverse_root = numpy.where(keep, 1 / root, 0.0)
    inner = scale[:, None] * inverse_root[None, :]
    T = V * (inner if inner.dtype == V.dtype else inner.astype(V.dtype))
    if basis_only:
        return T, None, None
    kept_root, column_root = numpy.where(keep, root, 0.0), numpy.where(positive, root_d, 0.0)
    outer = kept_root[:, None] * column_root[None, :]
    R = (V.conj() if V.dtype.kind == "c" else V).mT * (outer if outer.dtype == V.dtype else outer.astype(V.dtype))
    if not with_spread:
        return T, R, None
    smallest = numpy.where(keep, lam, top).min()
    spread = top[0] / smallest if smallest > 0 else numpy.float64(1.0)
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


def drop_tolerance(n, eps, core_eps, gram_eps=0.0):
    """Relative eigenvalue below which a direction of an n-row panel of
    precision ``eps``, whose Gram is factored in precision ``core_eps``, is
    rounding: the panel's columns carry errors of about eps sqrt(n) of their
    length, and eigh resolves eigenvalues only to about core_eps times the
    largest. ``gram_eps``: the precision the Gram was formed in, where it is
    coarser than ``core_eps`` (a device without float64, whose float32 Gram
    the host factors in float64): its entries carry errors of about gram_eps
    times the largest eigenvalue, so an eigenvalue below that is rounding, and
    Q = P T on its direction is far from a unit vector."""
    return max(max(n, 64) * (8 * eps) ** 2, 64 * core_eps, GRAM_DROP * gram_eps)


# The null directions of a float32 Gram of 2n columns in n rows measured at
# most 0.5 eps (n = 4, 8), 0.8 (16) and 1.0 (32) of the largest eigenvalue
# (equilibrated), and a float32 panel in the tests had a direction it needs at
# 3.3 eps: 2 drops the first and keeps the second, and full-rank steps at
# n = 32 and 64 then depart from unitary as where the Grams are float64.
GRAM_DROP = 2


def expm_skew_minus_identity(xp, K, t, *, cayley=False):
    """expm(t K) - I for skew-Hermitian K (..., r, r); t a number or an array that broadcasts as (..., 1, 1).
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
    if K.shape[-1] == 2 and not is_complex(xp, K.dtype):
        return _plane_rotation_minus_identity(xp, K, t, cayley)
    if host_fast(xp, K) and K.shape[-1] >= 4 and K.dtype.kind == "f" and numpy.size(t) == 1:
        return _planes_minus_identity_host(K, t, cayley)
    ctype = complex_dtype(xp, K.dtype)
    Kc = xp.astype(K, ctype, copy=False)
    if isinstance(t, (int, float)):
        lam, V = hermitian_eigh(xp, Kc * (1j * t))
    else:  # a 0-d array (a traced learning rate)
        lam, V = hermitian_eigh(xp, Kc * (xp.astype(t, ctype) * 1j))
    angle = _rotation_angle(xp, lam, cayley)
    # Eigenvalues at the eigensolver's rounding level (matrix_rank's criterion)
    # are zero in exact arithmetic: K of odd size or of lower rank. Their noise
    # angle, eps t |K|, would otherwise rotate W's untouched directions.
    size = xp.abs(lam)
    noise = lam.shape[-1] * xp.finfo(lam.dtype).eps * xp.max(size, axis=-1, keepdims=True)
    angle = xp.where(size <= noise, 0.0, angle)
    cos_minus_one, sine = _cos_minus_one_and_sine(xp, angle)
    if is_complex(xp, K.dtype):
        phase = xp.astype(cos_minus_one, ctype) - xp.astype(sine, ctype) * 1j
        return (V * phase[..., None, :]) @ mH(xp, V)
    # Real K: the eigenvectors of lam > 0, v = x + i y, each span an invariant
    # plane {x, y} that K rotates by lam. Re-orthonormalising x and y within
    # their plane and applying the rotation there gives an orthogonal result to
    # rounding for every t, where rebuilding it from the complex formula would
    # amplify the last-bit disagreement of a computed (lam, -lam) pair by t |K|.
    positive = xp.astype(lam > noise, lam.dtype)
    r = K.shape[-1]
    if r >= 4:
        # Two planes or more: the planes of the top r // 2 eigenvalues (lam >= 0)
        # orthonormalised together, the largest angle first (one QR of [x1, y1,
        # x2, y2, ...], signs kept). Each plane on its own left planes of close
        # small angles 1e-6 apart from orthogonal when the angles spread over
        # 1e10 (a huge step on an ill-conditioned gradient), and the result
        # ||D^H D + D + D^H|| at 1e-12; now the planes are orthogonal to rounding.
        # (The eigenvectors and the three elementwise results flipped as two
        # arrays, not five: a flip is some 10 us on the host.)
        h = r // 2
        V = xp.flip(V[..., -h:], axis=-1)
        top = xp.flip(xp.stack([positive, cos_minus_one, sine], axis=-2)[..., -h:], axis=-1)
        positive, cos_minus_one, sine = top[..., 0, :], top[..., 1, :], top[..., 2, :]
        x, y = xp.real(V), xp.imag(V)
        Q, R = xp.linalg.qr(xp.reshape(xp.stack([x, y], axis=-1), (*x.shape[:-1], 2 * h)))
        pivots = xp.linalg.diagonal(R)
        Q = Q * xp.where(pivots < 0, -xp.ones_like(pivots), xp.ones_like(pivots))[..., None, :]
        x, y = Q[..., 0::2], Q[..., 1::2]
    else:
        x, y = xp.real(V), xp.imag(V)
        x = x / _column_norm(xp, x)
        y = y - x * xp.sum(x * y, axis=-2, keepdims=True)
        y = y / _column_norm(xp, y)
    a = positive * cos_minus_one
    b = -positive * sine
    a, b = a[..., None, :], b[..., None, :]
    # x a x^T + y a y^T + x b y^T - y b x^T, as one product
    left = xp.concat([x * a - y * b, x * b + y * a], axis=-1)
    return left @ mH(xp, xp.concat([x, y], axis=-1))


def _planes_minus_identity_host(K, t, cayley):
    """:func:`expm_skew_minus_identity` of one real K (r x r, r >= 4) on the
    host, t a number or a host array of one entry: the general form's
    operations bit for bit, with NumPy's means. The top half of the
    spectrum is a reversed view (the standard has no negative step, and a
    flip is a call of its own), only that half's angles are computed
    (elementwise: the same numbers), and the planes are interleaved into
    one array by two assignments. The host's cores call it at every eager
    step of rank two or more (``_flow._right_core``); ``tests/test_cores_host.py``
    holds it to the general form with the fast paths off."""
    r = K.shape[-1]
    h = r // 2
    ctype = _COMPLEX_OF_REAL[K.dtype]
    if isinstance(t, (int, float)):
        lam, V = numpy.linalg.eigh(K.astype(ctype, copy=False) * (1j * t))
    else:  # the step's size as a host array (..., 1, 1), as the general form takes it
        lam, V = numpy.linalg.eigh(K.astype(ctype, copy=False) * (t.astype(ctype) * 1j))
    noise = r * float(numpy.finfo(lam.dtype).eps) * numpy.abs(lam).max()
    top = lam[:r - h - 1:-1]  # the top h eigenvalues, largest first
    angle = numpy.where(numpy.abs(top) <= noise, 0.0, _rotation_angle(numpy, top, cayley))
    cos_minus_one, sine = _cos_minus_one_and_sine(numpy, angle)
    positive = (top > noise).astype(top.dtype)
    planes = numpy.empty((r, 2 * h), dtype=top.dtype)
    V = V[:, :r - h - 1:-1]
    planes[:, 0::2], planes[:, 1::2] = V.real, V.imag
    Q, R = numpy.linalg.qr(planes)
    Q = Q * numpy.where(numpy.diagonal(R) < 0, -1.0, 1.0)
    x, y = Q[:, 0::2], Q[:, 1::2]
    a, b = positive * cos_minus_one, -positive * sine
    left = numpy.concatenate([x * a - y * b, x * b + y * a], axis=-1)
    return left @ numpy.concatenate([x, y], axis=-1).mT


_COMPLEX_OF_REAL = {numpy.dtype(numpy.float32): numpy.complex64, numpy.dtype(numpy.float64): numpy.complex128}


def _plane_rotation_minus_identity(xp, K, t, cayley):
    """:func:`expm_skew_minus_identity` of a real 2 x 2 K: a skew K is
    ``kappa [[0, 1], [-1, 0]]``, and ``expm(t K)`` the plane rotation by the
    angle ``t kappa`` (the Cayley map: ``2 atan(t kappa / 2)``), with
    ``cos - 1 = -2 sin^2(angle / 2)`` for full relative accuracy at tiny
    angles, the angle reduced to [-pi, pi] as in the general form. Fourteen
    elementwise operations, where the complex eigendecomposition of ``i t K``
    and the products of its eigenvectors took about a hundred on a device
    (``_tiny.skew_core2`` is the same on the host)."""
    if not isinstance(t, (int, float)):  # an array (a traced learning rate, the panels' scales)
        t = xp.astype(t, K.dtype)
    tK = K * t  # t is a number, or broadcasts as (..., 1, 1)
    theta = (tK[..., 0, 1] - tK[..., 1, 0]) / 2  # t kappa, of the skew part
    cos_minus_one, sine = _cos_minus_one_and_sine(xp, _rotation_angle(xp, theta, cayley))
    # [[cos - 1, sin], [-sin, cos - 1]] row by row: one stack, reshaped as a view
    return xp.reshape(xp.stack([cos_minus_one, sine, -sine, cos_minus_one], axis=-1), (*theta.shape, 2, 2))


def _rotation_angle(xp, lam, cayley):
    """The angle of ``exp(-i lam)`` for the eigenvalues ``lam`` of ``i t K``,
    or of the Cayley map's ``exp(-2 i atan(lam / 2))``. The exponential's is
    reduced to [-pi, pi]: exact for |lam| < pi, and for huge steps it keeps
    sin(lam) and sin(lam / 2) consistent (so |exp(-i lam)| = 1 to rounding) in
    math libraries whose argument reduction is loose for large arguments."""
    if cayley:
        return 2 * xp.atan(lam / 2)
    return lam - (2 * math.pi) * xp.round(lam / (2 * math.pi))


def _cos_minus_one_and_sine(xp, angle):
    """(cos(angle) - 1, sin(angle)), the first as ``-2 sin^2(angle / 2)``:
    full relative accuracy at tiny angles, where cos - 1 cancels."""
    half = xp.sin(angle / 2)
    return -2 * half * half, xp.sin(angle)


def _column_norm(xp, x):
    norm = xp.sqrt(xp.sum(x * x, axis=-2, keepdims=True))
    return xp.where(norm > 0, norm, 1.0)


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
    norm = _frobenius(xp, stacked)
    is_small = norm <= _SMALL
    if not traced and B.ndim == 2:
        if bool(is_small):
            return _polar_small(xp, B, bottom)
        return _polar_large(xp, stacked, norm, identity, bottom is not None)
    if not is_complex(xp, B.dtype) and not (r == 2 and bottom is None):
        # The polar factor of a real matrix is real; computed in complex
        # arithmetic here because torch.compile's inductor (2.13) mis-compiles a
        # graph holding both real branches (two real LAPACK calls on related
        # buffers gave a wrong D, never a non-unitary one). The cores are r x r.
        # (A 2 x 2 square case calls no LAPACK routine, and stays real.)
        ctype = complex_dtype(xp, B.dtype)
        result = polar_minus_identity(xp, xp.astype(B, ctype),
                                      bottom=None if bottom is None else xp.astype(bottom, ctype), traced=True)
        return xp.real(result) if bottom is None else tuple(xp.real(x) for x in result)
    select = is_small[..., None, None]
    small = _polar_small(xp, *_split(xp, xp.where(select, stacked, 0.0), r, bottom is not None))
    large = _polar_large(xp, xp.where(select, 0.0, stacked), norm, identity, bottom is not None)
    if bottom is None:
        return xp.where(select, small, large)
    return tuple(xp.where(select, s, g) for s, g in zip(small, large))


def _frobenius(xp, X):
    """``||X||_F`` of (..., r, s) without overflow: an X with entries beyond
    1e154 is divided by its largest entry first (squares of 1e190, a float32
    step of lr 1e150 on a gradient of 1e20, made the norm Inf and the step
    nothing). Small entries are left alone: their squares may underflow, but
    such an X is in the small-B branch either way."""
    big = max_abs(xp, X)  # (..., 1, 1)
    scale = xp.where(big > 1, big, 1.0)
    return scale[..., 0, 0] * xp.linalg.matrix_norm(X / xp.astype(scale, X.dtype))


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
    scale = xp.astype(xp.where(norm > 1, norm, 1.0), stacked.dtype)[..., None, None]
    scaled = stacked / scale
    if has_bottom:
        pad = xp.zeros((*stacked.shape[:-2], stacked.shape[-2] - r, r), dtype=stacked.dtype, device=device(stacked))
        scaled = scaled + xp.concat([xp.broadcast_to(identity, (*stacked.shape[:-2], r, r)), pad], axis=-2) / scale
    else:
        scaled = scaled + identity / scale
    if r == 2 and not has_bottom:
        return _polar_2x2(xp, scaled, identity) - identity
    U, _, Vh = xp.linalg.svd(scaled, full_matrices=False)
    X = U @ Vh
    if not has_bottom:
        return X - identity
    return X[..., :r, :] - identity, X[..., r:, :]


def _polar_2x2(xp, M, identity):
    """The unitary polar factor of 2 x 2 matrices M (..., 2, 2), in closed
    form: with the SVD ``M = s1 u1 v1^H + s2 u2 v2^H`` and ``d = det M``,
    ``(d / |d|) adj(M)^H = s2 u1 v1^H + s1 u2 v2^H``, so

        polar(M) = (M + (d / |d|) adj(M)^H) / (s1 + s2),
        (s1 + s2)^2 = ||M||_F^2 + 2 |d|.

    Each singular pair enters with the weight s1 + s2, so a nearly singular
    M loses no accuracy in its small direction; a singular one (d = 0) gets
    the phase 1, one of its polar factors, and M = 0 the identity. A real M
    of negative determinant gets a reflection, its orthogonal polar factor.
    Elementwise operations only (no SVD: on a device, no solver call, which a
    CUDA graph could not capture)."""
    m00, m01, m10, m11 = M[..., 0, 0], M[..., 0, 1], M[..., 1, 0], M[..., 1, 1]
    complex_ = is_complex(xp, M.dtype)
    conj = xp.conj if complex_ else (lambda x: x)
    det = m00 * m11 - m01 * m10
    size = xp.abs(det)
    # det / |det| (1 for det = 0); a real one's is exact, a complex one's is
    # taken from its angle (see _unit_phase)
    phase = _unit_phase(xp, det, size) if complex_ else xp.where(det < 0, -1.0, xp.ones_like(det))
    entries = [m00 + phase * conj(m11), m01 - phase * conj(m10), m10 - phase * conj(m01), m11 + phase * conj(m00)]
    length = xp.sqrt(xp.sum(xp.abs(xp.reshape(M, (*M.shape[:-2], 4))) ** 2, axis=-1) + 2 * size)
    nonzero = length > 0
    divisor = xp.where(nonzero, length, 1.0)
    U = xp.reshape(xp.stack(entries, axis=-1), M.shape) / xp.astype(divisor, M.dtype)[..., None, None]
    return xp.where(nonzero[..., None, None], U, identity)


@staged()
def add_lowrank(xp, W, L, Rh):
    """W + L @ Rh for thin L (..., n, r) and Rh (..., r, m), as a new array in
    W's layout (``_xp.add_product``); an optimizer that owns W can apply L and
    Rh in place instead."""
    return add_product(xp, W, L, Rh)
