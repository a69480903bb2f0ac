"""The closed-form 2 x 2 host cores (unitary_lr._tiny) against float64 NumPy/SciPy
references, and the rank-1 steps that use them against the general cores (a batch
of one takes the general path) and against dense SciPy steps."""

import numpy as np
import pytest
import scipy.linalg

import unitary_lr as ul
from unitary_lr import _cores, _tiny

EPS = np.finfo(np.float64).eps


def as_array(M):
    return np.array(M, dtype=np.complex128)


def random_hermitian(rng, complex_, scale=1.0):
    X = rng.standard_normal((2, 2)) + (1j * rng.standard_normal((2, 2)) if complex_ else 0)
    return scale * (X + X.conj().T) / 2


def as_nested(H):
    return tuple(tuple(x.item() for x in row) for row in H)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("case", ["generic", "diagonal", "scalar", "nearly_degenerate", "tiny", "huge"])
def test_eigh2_matches_numpy(rng, complex_, case):
    for _ in range(20):
        H = random_hermitian(rng, complex_)
        if case == "diagonal":
            H = np.diag(np.diag(H)).astype(H.dtype)
        elif case == "scalar":
            H = 0.7 * np.eye(2, dtype=H.dtype)
        elif case == "nearly_degenerate":
            H = np.eye(2, dtype=H.dtype) + 1e-12 * H
        elif case == "tiny":
            H = 1e-300 * H
        elif case == "huge":
            H = 1e300 * H
        lam, V = _tiny.eigh2(H[0, 0].real, H[0, 1].item(), H[1, 1].real)
        V = as_array(V)
        reference = np.linalg.eigvalsh(H)
        top = np.max(np.abs(reference))
        np.testing.assert_allclose(lam, reference, rtol=0, atol=8 * EPS * top)
        assert lam[0] <= lam[1]
        np.testing.assert_allclose(V.conj().T @ V, np.eye(2), atol=8 * EPS)
        np.testing.assert_allclose(V @ np.diag(lam) @ V.conj().T, H, rtol=0, atol=16 * EPS * top)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("case", ["generic", "dependent", "one_zero", "zero", "scaled_apart"])
def test_gram_basis2_matches_gram_basis(rng, complex_, case):
    tol = _cores.drop_tolerance(64, EPS, EPS)
    for _ in range(20):
        P = rng.standard_normal((64, 2)) + (1j * rng.standard_normal((64, 2)) if complex_ else 0)
        if case == "dependent":
            P[:, 1] = 3 * P[:, 0]
        elif case == "one_zero":
            P[:, 0] = 0
        elif case == "zero":
            P[:] = 0
        elif case == "scaled_apart":
            P[:, 0] *= 1e-120
        C = P.conj().T @ P
        T, R, spread = _tiny.gram_basis2(as_nested(C), tol)
        T_ref, R_ref, spread_ref = _cores.gram_basis(_cores.host_xp, C, tol)
        Q, Q_ref = P @ as_array(T), P @ T_ref
        # the same projector onto the kept span, and P = Q R on it
        np.testing.assert_allclose(Q @ Q.conj().T, Q_ref @ Q_ref.conj().T, atol=1e-12)
        np.testing.assert_allclose(Q @ as_array(R), Q_ref @ R_ref, atol=1e-12 * max(1.0, np.abs(P).max()))
        kept = np.linalg.matrix_rank(Q_ref, tol=0.5)
        np.testing.assert_allclose(Q.conj().T @ Q, np.diag([0.0] * (2 - kept) + [1.0] * kept), atol=1e-12)
        np.testing.assert_allclose(spread, spread_ref, rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("cayley", [False, True])
@pytest.mark.parametrize("t", [1e-9, 0.3, -2.0, 40.0, 1e8])
def test_skew_core2_matches_dense(rng, complex_, cayley, t):
    for _ in range(10):
        X = rng.standard_normal((2, 2)) + (1j * rng.standard_normal((2, 2)) if complex_ else 0)
        K = X - X.conj().T
        D = as_array(_tiny.skew_core2(as_nested(K), t, cayley=cayley, real=not complex_, eps=EPS))
        if abs(t) < 1e-6:
            # both maps are I + tK + (tK)^2 / 2 + O(t^3): dense references lose the
            # second-order term to cancellation, the closed forms must not
            reference = t * K + (t * K) @ (t * K) / 2
        elif cayley:
            reference = np.linalg.solve(np.eye(2) - t / 2 * K, np.eye(2) + t / 2 * K) - np.eye(2)
        else:
            reference = scipy.linalg.expm(t * K.astype(np.complex128)) - np.eye(2)
        # relative accuracy of tiny steps (no cancellation), unitarity for every t
        atol = 64 * EPS * max(1.0, abs(t) * np.abs(K).max()) if abs(t) * np.abs(K).max() < 100 else None
        if atol is not None:
            np.testing.assert_allclose(D, reference, rtol=1e-9, atol=atol if abs(t) > 1e-6 else 1e-26)
        U = np.eye(2) + D
        np.testing.assert_allclose(U.conj().T @ U, np.eye(2), atol=32 * EPS)
        if not complex_:
            assert np.all(D.imag == 0)


def test_skew_core2_zero_generator_is_exact():
    for real in (True, False):
        D = _tiny.skew_core2(((0.0, 0.0), (0.0, 0.0)), 3.0, cayley=False, real=real, eps=EPS)
        assert np.all(as_array(D) == 0)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("size", [1e-10, 0.1, 0.45])
def test_polar_small2_matches_scipy(rng, complex_, size):
    for _ in range(10):
        B = rng.standard_normal((2, 2)) + (1j * rng.standard_normal((2, 2)) if complex_ else 0)
        B = size * B / np.linalg.norm(B)
        D = as_array(_tiny.polar_small2(as_nested(B)))
        # SciPy's polar(I + B) - I cancels to absolute accuracy eps; the general
        # core (an eigh of B + B^H + B^H B) keeps relative accuracy, as must this
        reference = scipy.linalg.polar(np.eye(2) + B)[0] - np.eye(2)
        np.testing.assert_allclose(D, reference, rtol=1e-8, atol=16 * EPS)
        B = B.astype(np.complex128 if complex_ else np.float64)
        general = _cores.polar_minus_identity(_cores.host_xp, B, traced=False)
        np.testing.assert_allclose(D, general, rtol=1e-9, atol=16 * EPS * size)
    assert _tiny.polar_small2(((0.6, 0.0), (0.0, 0.0))) is None


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("size", [1e-10, 0.1, 0.45])
@pytest.mark.parametrize("rows", [1, 2])
def test_polar_small2_with_rows_below_matches_the_general_core(rng, complex_, size, rows):
    """The polar factor of the stacked [I + B; E] (the direct step on a tall
    W): against the general core and against SciPy's polar of the stacked matrix."""
    for _ in range(10):
        M = rng.standard_normal((2 + rows, 2)) + (1j * rng.standard_normal((2 + rows, 2)) if complex_ else 0)
        M = size * M / np.linalg.norm(M)
        B, E = M[:2], M[2:]
        top, bottom = (as_array(x) for x in _tiny.polar_small2(as_nested(B), as_nested(E)))
        general_top, general_bottom = _cores.polar_minus_identity(_cores.host_xp, B, bottom=E, traced=False)
        np.testing.assert_allclose(top, general_top, rtol=1e-9, atol=16 * EPS * size)
        np.testing.assert_allclose(bottom, general_bottom, rtol=1e-9, atol=16 * EPS * size)
        X = scipy.linalg.polar(M + np.eye(2 + rows, 2))[0]
        np.testing.assert_allclose(np.vstack([top + np.eye(2), bottom]), X, atol=64 * EPS)
        if size > 0.1:  # E changes the top (a second-order effect, seen at this size)
            assert not np.allclose(as_array(_tiny.polar_small2(as_nested(B))), top, rtol=0, atol=1e-6)
    assert _tiny.polar_small2(((0.3, 0.0), (0.0, 0.0)), ((0.45, 0.0),)) is None  # ||[B; E]|| > 1/2
    assert _tiny.polar_small2(((0.3, 0.0), (0.0, 0.0)), ((0.3, 0.0),)) is not None


@pytest.mark.parametrize("dtype", ["float64", "complex128", "float32"])
@pytest.mark.parametrize("gradient", ["inside_range", "zero", "rank_one_outside"])
def test_rank1_tall_direct_step_edge_cases_match_the_general_cores(rng, dtype, gradient):
    """The direct step on a tall W in closed form: a gradient whose sketch lies
    in W's range (a_perp dropped), a zero gradient (W back), a gradient
    orthogonal to W's range; against the general cores (a batch of one) and
    the dense polar step."""
    n, m, lr = 20, 5, 0.3
    W = ul.random_unitary(n, m, dtype=dtype, rng=6)
    if gradient == "inside_range":
        G = W @ rng.standard_normal((m, m)).astype(dtype)
    elif gradient == "zero":
        G = np.zeros((n, m), dtype=dtype)
    else:
        outside = rng.standard_normal((n, 1)).astype(dtype)
        outside -= W @ (W.conj().T @ outside)
        G = outside @ rng.standard_normal((1, m)).astype(dtype)
    tiny = ul.projunn_step(W, G, lr=lr, variant="direct", rank=1, rng=5)
    general = ul.projunn_step(W[None], G[None], lr=lr, variant="direct", rank=1, rng=5)[0]
    atol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(tiny, general, atol=atol)
    assert ul.unitarity_error(tiny) < (1e-5 if dtype == "float32" else 1e-13)
    if gradient == "zero":
        np.testing.assert_array_equal(tiny, W)
    elif gradient == "rank_one_outside" and dtype != "float32":
        # G has rank 1: the sketch is exact, and the step is the dense polar step
        np.testing.assert_allclose(tiny, scipy.linalg.polar(W - lr * G)[0], atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "complex128", "float32"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("shape", [(24, 24), (24, 6), (6, 24)])
@pytest.mark.parametrize("lr", [1e-3, 0.5, 1e6])
def test_rank1_step_matches_the_general_cores(rng, dtype, variant, shape, lr):
    """A 2-D W at rank 1 takes the closed forms; the same W as a batch of one
    takes the general (eigh-based) cores: same step to rounding."""
    W = ul.random_unitary(*shape, dtype=dtype, rng=1) if shape[0] >= shape[1] else \
        ul.random_unitary(shape[1], shape[0], dtype=dtype, rng=1).conj().T
    G = rng.standard_normal(shape).astype(dtype)
    tiny = ul.projunn_step(W, G, lr=lr, variant=variant, rng=5)
    general = ul.projunn_step(W[None], G[None], lr=lr, variant=variant, rng=5)[0]
    atol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(tiny, general, atol=atol)
    assert ul.unitarity_error(tiny) < (1e-5 if dtype == "float32" else 1e-13)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_rank1_factor_step_matches_dense_scipy(rng, dtype, variant):
    n, lr = 12, 0.7
    W = ul.random_unitary(n, dtype=dtype, rng=2)
    a = rng.standard_normal((n, 1)).astype(dtype)
    b = rng.standard_normal((n, 1)).astype(dtype)
    new = ul.projunn_step(W, (a, b), lr=lr, variant=variant)
    G = a @ b.conj().T
    A = G @ W.conj().T - W @ G.conj().T
    if variant == "tangent":
        reference = scipy.linalg.expm(-lr / 2 * A) @ W
    elif variant == "cayley":
        reference = np.linalg.solve(np.eye(n) + lr / 2 * A, (np.eye(n) - lr / 2 * A) @ W)
    else:
        reference = scipy.linalg.polar(W - lr * G)[0]
    np.testing.assert_allclose(new, reference, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("shape", [(10, 10), (10, 3)])
@pytest.mark.parametrize("cayley", [False, True])
def test_rank1_transport_matches_dense_scipy(rng, dtype, shape, cayley):
    W = ul.random_unitary(*shape, dtype=dtype, rng=3)
    a = rng.standard_normal((shape[0], 1)).astype(dtype)
    b = rng.standard_normal((shape[0], 1)).astype(dtype)
    X = a @ b.conj().T - b @ a.conj().T
    t = 0.9
    if cayley:
        new = ul.cayley_transport(W, a, b, t=t)
        eye = np.eye(shape[0])
        reference = np.linalg.solve(eye - t / 2 * X, (eye + t / 2 * X) @ W)
    else:
        new = ul.exp_transport(W, a, b, t=t)
        reference = scipy.linalg.expm(t * X) @ W
    np.testing.assert_allclose(new, reference, atol=1e-12)


def test_rank1_checks_still_name_the_input(rng):
    W = ul.random_unitary(8, dtype="float64", rng=0)
    G = rng.standard_normal((8, 8))
    G[2, 3] = np.nan
    with pytest.raises(ValueError, match="G"):
        ul.projunn_step(W, G, lr=0.1, rng=0)
    with pytest.raises(ValueError, match="not unitary"):
        ul.projunn_step(0.5 * W, rng.standard_normal((8, 8)), lr=0.1, rng=0)
    with pytest.raises(ValueError, match="not unitary"):
        ul.exp_transport(0.5 * W, rng.standard_normal((8, 1)), rng.standard_normal((8, 1)), t=0.1)


@pytest.mark.parametrize("shape", [(20, 5), (20, 20)])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_rank1_steps_of_one_matrix_make_no_general_core_call(rng, monkeypatch, shape, variant):
    """The closed forms replace the general cores' eigen-decompositions at rank
    1 (square and tall W, every variant; the direct step's polar core within
    its small-B range), also matrix by matrix in a batch of up to
    ``_TINY_BATCH`` (but the tall direct step); larger batches keep the
    vectorised general cores."""
    from unitary_lr import _flow

    def refuse(*args, **kwargs):
        raise AssertionError("a general core was called")

    W = ul.random_unitary(*shape, dtype="float64", rng=7)
    G = rng.standard_normal(shape)
    expected = ul.projunn_step(W, G, lr=0.01, variant=variant, rng=1)
    for name in ("gram_basis", "polar_minus_identity", "expm_skew_minus_identity"):
        monkeypatch.setattr(_flow, name, refuse)
    np.testing.assert_array_equal(ul.projunn_step(W, G, lr=0.01, variant=variant, rng=1), expected)
    # a small batch too (matrix by matrix), except the direct step of a tall W;
    # a batch beyond _TINY_BATCH takes the vectorised general cores
    pair_W, pair_G = np.stack([W, W[::-1]]), np.stack([G, -G])
    if variant == "direct" and shape[0] > shape[1]:
        with pytest.raises(AssertionError, match="general core"):
            ul.projunn_step(pair_W, pair_G, lr=0.01, variant=variant, rng=1)
    else:
        pair = ul.projunn_step(pair_W, pair_G, lr=0.01, variant=variant, rng=1)
        with monkeypatch.context() as general:  # the same batch through the general cores
            for name in ("gram_basis", "polar_minus_identity", "expm_skew_minus_identity"):
                general.setattr(_flow, name, getattr(_cores, name))
            general.setattr(_flow, "_TINY_BATCH", 0)
            np.testing.assert_allclose(pair, ul.projunn_step(pair_W, pair_G, lr=0.01, variant=variant, rng=1),
                                       atol=1e-14)
    many = _flow._TINY_BATCH + 1
    with pytest.raises(AssertionError, match="general core"):
        ul.projunn_step(np.stack([W] * many), np.stack([G] * many), lr=0.01, variant=variant, rng=1)


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_device_closed_form_eigh_matches_lapack(backend, dtype, rng, size, scale):
    """``_cores.hermitian_eigh`` of 1 x 1 and 2 x 2 matrices (the cores of a
    rank-1 step) in closed form, on every backend: eigenvalues within a few
    ulps of the largest from NumPy's LAPACK, orthonormal eigenvectors that
    rebuild H, batched, with a scalar matrix, a diagonal one and a zero one
    in the batch."""
    complex_ = dtype.startswith("complex")
    X = rng.standard_normal((40, size, size)) + (1j * rng.standard_normal((40, size, size)) if complex_ else 0)
    H = (X + np.conj(np.swapaxes(X, -1, -2))) / 2
    H[0] = np.eye(size)
    H[1] = np.diag(np.linspace(1, 1e-9, size))
    H[2] = 0
    H = (H * scale).astype(dtype)
    from unitary_lr._xp import namespace

    H_b = backend.asarray(H)
    lam, V = _cores.hermitian_eigh(namespace(H_b), H_b)
    lam, V = backend.to_numpy(lam).astype(np.float64), backend.to_numpy(V).astype(np.complex128)
    reference = np.linalg.eigh(H.astype(np.complex128))[0]
    top = np.maximum(np.abs(reference).max(axis=-1), np.finfo(dtype).tiny)
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(lam - reference).max(axis=-1) <= 8 * eps * top)
    assert np.abs(np.conj(np.swapaxes(V, -1, -2)) @ V - np.eye(size)).max() <= 8 * eps
    rebuilt = V @ (lam[..., None] * np.conj(np.swapaxes(V, -1, -2)))
    assert np.all(np.abs(rebuilt - H).max(axis=(-2, -1)) <= 8 * eps * top)


@pytest.mark.parametrize("cayley", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_real_exponential_is_a_plane_rotation(backend, rng, dtype, cayley):
    """``_cores.expm_skew_minus_identity`` of real 2 x 2 skew matrices (the
    core of a real rank-1 tangent or Cayley step on the device) in closed
    form, on every backend: ``expm(t K) - I`` (or the Cayley map minus I)
    against the float64 rotation (checked against SciPy's ``expm``) and a
    dense solve, with full relative
    accuracy for tiny steps, orthogonal to rounding for huge ones, with t a
    number or an array broadcasting as (..., 1, 1) (a traced learning rate
    times the panels' scales); and the same as the general complex form."""
    if dtype == "float64" and not backend.has_float64:
        dtype = "float32"  # the device has no float64: its cores run in float32
    eps = np.finfo(dtype).eps
    kappa = rng.standard_normal(24) * np.logspace(-3, 1, 24)
    kappa[0] = 0.0
    K = np.zeros((24, 2, 2))
    K[:, 0, 1], K[:, 1, 0] = kappa, -kappa
    from unitary_lr._xp import namespace

    K_b = backend.asarray(K, dtype)
    xp = namespace(K_b)
    K = K.astype(dtype).astype(np.float64)  # the reference of the rounded K

    def reference(t):
        A = t * K
        if cayley:
            eye = np.eye(2)
            return np.linalg.solve(eye - A / 2, eye + A / 2) - eye
        # the rotation by t kappa in float64 (SciPy's expm agrees with it to
        # its own accuracy, some 400 ulps at angles of 50: scaling and squaring)
        theta = A[:, 0, 1]
        c, s = np.cos(theta) - 1, np.sin(theta)
        exact = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
        small = np.abs(theta) <= 2
        assert np.abs(exact[small] - (np.stack([scipy.linalg.expm(a) for a in A[small]]) - np.eye(2))).max() <= 8 * EPS
        return exact

    for t in (0.3, -1.7):
        D = backend.to_numpy(_cores.expm_skew_minus_identity(xp, K_b, t, cayley=cayley)).astype(np.float64)
        exact = reference(t)
        # entry by entry to a few ulps of the rotation's size, plus the
        # rounding of the angle t kappa, plus the reference's own (it
        # subtracts I: about one float64 ulp of 1)
        angle = np.abs(t * kappa)[:, None, None]
        size = np.abs(exact).max(axis=(-2, -1), keepdims=True)
        assert np.all(np.abs(D - exact) <= 16 * eps * (size + angle) + 4 * EPS), (t, np.abs(D - exact).max())
        general = _cores.expm_skew_minus_identity(xp, xp.astype(K_b, xp.complex64 if dtype == "float32" else xp.complex128),
                                                  t, cayley=cayley)
        assert np.abs(backend.to_numpy(general) - D).max() <= 16 * eps * (1 + abs(t) * np.abs(kappa).max())
    # a tiny step: cos - 1 and sin to full relative accuracy (the dense
    # reference, which subtracts I, cannot tell), both maps to first order
    t = 1e-6 if dtype == "float32" else 1e-12
    theta = t * kappa
    D = backend.to_numpy(_cores.expm_skew_minus_identity(xp, K_b, t, cayley=cayley)).astype(np.float64)
    assert np.all(np.abs(D[:, 0, 1] - theta) <= 4 * eps * np.abs(theta))
    assert np.all(np.abs(D[:, 1, 0] + theta) <= 4 * eps * np.abs(theta))
    assert np.all(np.abs(D[:, 0, 0] + theta**2 / 2) <= 8 * eps * theta**2 / 2)
    assert np.all(D[:, 1, 1] == D[:, 0, 0])
    t = backend.asarray(np.full((24, 1, 1), 0.3), dtype)
    D = backend.to_numpy(_cores.expm_skew_minus_identity(xp, K_b, t, cayley=cayley)).astype(np.float64)
    assert D.shape == (24, 2, 2) and np.abs(D - reference(0.3)).max() <= 16 * eps * (1 + 0.3 * np.abs(kappa).max()) + 4 * EPS
    for t in (1e8, 1e30):  # the angle is rounding's, but the rotation is exact
        D = backend.to_numpy(_cores.expm_skew_minus_identity(xp, K_b, t, cayley=cayley)).astype(np.float64)
        Q = D + np.eye(2)
        assert np.abs(np.swapaxes(Q, -1, -2) @ Q - np.eye(2)).max() <= 8 * eps


@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64", "complex128"])
def test_device_polar_factor_of_a_2x2_matrix(backend, rng, dtype):
    """``_cores._polar_2x2``, the large branch of the direct step's 2 x 2 core
    on the device (no SVD, so a CUDA graph can capture it), on every backend:
    the SVD's polar factor ``U V^H`` of random matrices, of nearly singular
    ones (singular values in the ratio 1e-6 in float32, 1e-12 in float64) and of
    real ones with a negative determinant (a reflection); unitary to rounding
    where the polar factor is not unique (rank 1, zero)."""
    if not backend.has_float64 and dtype in ("float64", "complex128"):
        dtype = {"float64": "float32", "complex128": "complex64"}[dtype]
    complex_ = dtype.startswith("complex")
    eps = np.finfo(dtype).eps
    M = rng.standard_normal((40, 2, 2)) + (1j * rng.standard_normal((40, 2, 2)) if complex_ else 0)
    U0, _, V0h = np.linalg.svd(M[:8])
    gap = 1e-6 if eps > 1e-10 else 1e-12
    M[:8] = U0 @ (np.array([1.0, gap])[:, None] * V0h)  # nearly singular
    M[8] = np.diag([2.0, -0.5])  # a reflection's direction in real dtypes
    M[9] = np.outer([1.0, 2.0], [3.0, -1.0])  # rank 1
    M[10] = 0
    M = M.astype(dtype)
    from unitary_lr._xp import namespace

    M_b = backend.asarray(M)
    xp = namespace(M_b)
    identity = backend.asarray(np.eye(2), dtype)
    U = backend.to_numpy(_cores._polar_2x2(xp, M_b, identity)).astype(np.complex128)
    assert U.shape == M.shape
    unitarity = np.abs(np.conj(np.swapaxes(U, -1, -2)) @ U - np.eye(2)).max(axis=(-2, -1))
    assert np.all(unitarity <= 8 * eps), unitarity.max() / eps
    Ur, _, Vrh = np.linalg.svd(M.astype(np.complex128))
    reference = Ur @ Vrh
    unique = np.ones(40, bool)
    unique[[9, 10]] = False
    # to a few ulps; a nearly singular complex M's polar factor has the
    # condition number 1 / s2 (a real one's 2 / (s1 + s2): Higham, Functions
    # of Matrices, ch. 8), which the rounding of M itself brings in
    error = np.abs(U - reference).max(axis=(-2, -1))
    assert np.all(error[8:][unique[8:]] <= 16 * eps), error.max() / eps
    assert np.all(error[:8] <= 16 * eps * (1 / gap if complex_ else 1)), error[:8].max() / eps
    np.testing.assert_allclose(U[10], np.eye(2))
    if not complex_:
        assert np.all(np.abs(np.imag(U)) == 0) and np.linalg.det(U[8].real) < 0


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_device_closed_forms_of_subnormal_matrices(backend, dtype):
    """The closed forms on matrices whose entries or determinant are
    subnormal: a complex division by such a number overflows inside (NumPy's
    takes the divisor's reciprocal first), which made the eigenvectors NaN
    and ``exp_transport`` with t = 2.2e-309 return NaN (found by hypothesis,
    ``test_properties.py``); the phases are now divided part by part."""
    if not backend.has_float64:
        pytest.skip("subnormal float64 numbers need a device with float64")
    from unitary_lr._xp import namespace

    complex_ = dtype.startswith("complex")
    h01 = (3e-310 + 4e-310j) if complex_ else 3e-310
    H = np.array([[1e-310, h01], [np.conj(h01), -2e-310]]).astype(dtype)
    H_b = backend.asarray(H)
    lam, V = _cores.hermitian_eigh(namespace(H_b), H_b)
    lam, V = backend.to_numpy(lam), backend.to_numpy(V)
    assert np.all(np.isfinite(lam)) and np.all(np.isfinite(V))
    assert np.abs(np.conj(V.T) @ V - np.eye(2)).max() <= 8 * EPS
    # XLA's CPU code flushes subnormal numbers to zero: there H is 0
    flushes = backend.name.startswith("jax")
    reference = np.zeros(2) if flushes else np.linalg.eigvalsh(H.astype(np.complex128))
    np.testing.assert_allclose(lam, reference, atol=1e-323)
    phase = (0.6 + 0.8j) if complex_ else -1.0
    M = np.diag([1.0, 1e-310 * phase]).astype(dtype)  # det 1e-310 times the phase
    M_b = backend.asarray(M)
    U = backend.to_numpy(_cores._polar_2x2(namespace(M_b), M_b, backend.asarray(np.eye(2), dtype)))
    np.testing.assert_allclose(U, np.diag([1.0, 1.0 if flushes else phase]), atol=4 * EPS)


@pytest.mark.parametrize("dtype", ["float32", "complex64", "float64", "complex128"])
def test_device_eigenvectors_stay_orthonormal_with_a_subnormal_coupling(backend, dtype):
    """A 2 x 2 Hermitian H of normal diagonal and a subnormal off-diagonal
    entry (found by fuzzing): the phase of that entry, divided by its
    subnormal modulus part by part, kept too few digits, and the complex64
    eigenvectors came out 2e-4 from orthonormal; the phase now comes from the
    entry's angle."""
    if dtype.endswith("128") or dtype == "float64":
        if not backend.has_float64:
            pytest.skip("subnormal float64 numbers need a device with float64")
        coupling = 7.5e-320 - 5.4e-319j
    else:
        coupling = 7.5e-43 - 5.4e-42j
    if not dtype.startswith("complex"):
        coupling = coupling.imag
    eps = np.finfo(dtype).eps
    from unitary_lr._xp import namespace

    H = np.array([[-135.5, coupling], [np.conj(coupling), 7.1e-14]]).astype(dtype)
    H_b = backend.asarray(H)
    lam, V = _cores.hermitian_eigh(namespace(H_b), H_b)
    lam, V = backend.to_numpy(lam).astype(np.float64), backend.to_numpy(V).astype(np.complex128)
    assert np.abs(np.conj(V.T) @ V - np.eye(2)).max() <= 8 * eps
    rebuilt = V @ np.diag(lam) @ np.conj(V.T)
    assert np.abs(rebuilt - H).max() <= 8 * eps * 135.5


def test_exp_transport_of_a_subnormal_time_is_the_identity_step():
    """The hypothesis case behind the test above, as it was found."""
    rng = np.random.default_rng(0)
    W = ul.random_unitary(2, dtype="complex64", rng=rng)[None]
    a = (rng.standard_normal((1, 2, 1)) + 1j * rng.standard_normal((1, 2, 1))).astype(np.complex64)
    b = (rng.standard_normal((1, 2, 1)) + 1j * rng.standard_normal((1, 2, 1))).astype(np.complex64)
    V = ul.exp_transport(W, a, b, t=2.225073858507203e-309)
    np.testing.assert_allclose(V, W, atol=1e-6)
