"""Rectangular (Stiefel) matrices and the Cayley variant, against dense
float64/complex128 references: scipy.linalg.expm and polar, numpy.linalg.solve
for the Cayley map. W has orthonormal columns (n > m) or rows (n < m)."""

import numpy as np
import pytest
import scipy.linalg
from _helpers import assert_same_kind, eps, is_complex, mH, random_matrix, tol

import unitary_lr as ul

N = 16
# (n, m): square, tall with m in {1, n/4}, wide
SHAPES = [(N, N), (N, N // 4), (N, 1), (N // 4, N)]


def stiefel(rng, n, m, dtype, batch=()):
    """Haar matrices with orthonormal columns (rows for n < m), NumPy only."""
    rows, columns = max(n, m), min(n, m)
    Z = random_matrix(rng, (*batch, rows, columns), "complex128" if is_complex(dtype) else "float64")
    Q, R = np.linalg.qr(Z)
    d = np.diagonal(R, axis1=-2, axis2=-1)
    Q = Q * (d / np.abs(d))[..., None, :]
    return (Q if n >= m else mH(Q)).astype(dtype)


def orthonormality(W):
    """||W^H W - I_m|| / sqrt(m) (tall) or ||W W^H - I_n|| / sqrt(n) (wide), in complex128."""
    W = W.astype(np.complex128)
    if W.shape[-2] < W.shape[-1]:
        W = mH(W)
    m = W.shape[-1]
    return np.linalg.norm(mH(W) @ W - np.eye(m), axis=(-2, -1)) / np.sqrt(m)


def wide(x):
    """x in float64 or complex128."""
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _each(f, *arrays):
    """f applied matrix by matrix over the broadcast batch axes."""
    batch = np.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    flat = [np.broadcast_to(a, (*batch, *a.shape[-2:])).reshape(-1, *a.shape[-2:]) for a in arrays]
    out = np.stack([f(*xs) for xs in zip(*flat)])
    return out.reshape(*batch, *out.shape[-2:])


def reference_step(W, G, lr, variant):
    """The dense step: A = G W^H - W G^H; tangent expm(-lr/2 A) W, direct
    polar(W - lr G), cayley (I + lr/2 A)^(-1) (I - lr/2 A) W. A wide W steps
    through its conjugate transpose."""
    W, G = W.astype(np.complex128), G.astype(np.complex128)

    def one(W, G):
        if W.shape[0] < W.shape[1]:
            return mH(one(mH(W), mH(G)))
        if variant == "direct":
            return scipy.linalg.polar(W - lr * G)[0]
        A = G @ mH(W) - W @ mH(G)
        if variant == "tangent":
            return scipy.linalg.expm(-lr / 2 * A) @ W
        identity = np.eye(A.shape[0])
        return np.linalg.solve(identity + lr / 2 * A, (identity - lr / 2 * A) @ W)

    return _each(one, W, G)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 8])
def test_steps_match_dense_references(backend, dtype, rng, shape, k):
    n, m = shape
    k = min(k, n, m)
    batch = (2,) if k == 2 else ()
    W = stiefel(rng, n, m, dtype, batch)
    a = random_matrix(rng, (*batch, n, k), dtype)
    b = (random_matrix(rng, (*batch, m, k), dtype) / np.sqrt(n)).astype(dtype)
    G = (wide(a) @ mH(wide(b))).astype(dtype)
    args = [backend.asarray(x) for x in (W, a, b, G)]
    before = [backend.to_numpy(x).copy() for x in args]
    for variant in ul.steps.VARIANTS:
        expected = reference_step(W, G, 0.3, variant)
        factored = ul.projunn_step(args[0], (args[1], args[2]), lr=0.3, rank=k, variant=variant)
        sketched = ul.projunn_step(args[0], args[3], lr=0.3, rank=k, variant=variant, rng=5)
        assert_same_kind(backend, factored, args[0])
        for V in (factored, sketched):
            V = backend.to_numpy(V)
            assert V.shape == (*batch, n, m)
            # the sketch of a float32 G carries float32 rounding into the step
            np.testing.assert_allclose(V, expected, atol=tol(dtype, 3 * k), err_msg=variant)
            assert np.all(orthonormality(V) <= tol(dtype, 1)), variant
    for x, old in zip(args, before):
        np.testing.assert_array_equal(backend.to_numpy(x), old)


@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_polar_matches_scipy(backend, dtype, rng, shape):
    n, m = shape
    W = stiefel(rng, n, m, dtype, (3,))
    a = random_matrix(rng, (3, n, 2), dtype)
    b = random_matrix(rng, (3, m, 2), dtype)
    V = ul.project_unitary_lowrank(*(backend.asarray(x) for x in (W, a, b)))
    M = wide(W) + wide(a) @ mH(wide(b))
    expected = _each(lambda x: scipy.linalg.polar(x)[0], M)
    np.testing.assert_allclose(backend.to_numpy(V), expected, atol=tol(dtype, 10))
    # the dense polar factor of a rectangular matrix
    P = ul.project_unitary(backend.asarray(M.astype(dtype)))
    np.testing.assert_allclose(backend.to_numpy(P), expected, atol=tol(dtype, 10))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.3, -2.0])
def test_transports_match_expm_and_solve(backend, dtype, rng, shape, t):
    n, m = shape
    W = stiefel(rng, n, m, dtype, (2,))
    a = (random_matrix(rng, (2, n, 2), dtype) / np.sqrt(n)).astype(dtype)
    b = random_matrix(rng, (2, n, 2), dtype)
    args = [backend.asarray(x) for x in (W, a, b)]
    a64, b64, W64 = (x.astype(np.complex128) for x in (a, b, W))
    X = a64 @ mH(b64) - b64 @ mH(a64)
    identity = np.eye(n)
    expected_exp = _each(lambda x, w: scipy.linalg.expm(t * x) @ w, X, W64)
    expected_cayley = _each(lambda x, w: np.linalg.solve(identity - t / 2 * x, (identity + t / 2 * x) @ w), X, W64)
    V = ul.exp_transport(*args, t=t)
    C = ul.cayley_transport(*args, t=t)
    assert_same_kind(backend, C, args[0])
    np.testing.assert_allclose(backend.to_numpy(V), expected_exp, atol=tol(dtype, 10))
    np.testing.assert_allclose(backend.to_numpy(C), expected_cayley, atol=tol(dtype, 10))
    assert np.all(orthonormality(backend.to_numpy(C)) <= tol(dtype, 1))


def test_cayley_agrees_with_the_exponential_to_second_order(rng):
    W = stiefel(rng, N, 4, "float64")
    a, b = random_matrix(rng, (2, N, 2), "float64")
    for t in (1e-2, 1e-3):
        gap = np.abs(ul.cayley_transport(W, a, b, t=t) - ul.exp_transport(W, a, b, t=t)).max()
        # the maps differ by t^3 X^3 / 12 at third order
        X = a @ b.T - b @ a.T
        assert gap <= 0.2 * t ** 3 * np.linalg.norm(X, 2) ** 3 + 1e-14, (t, gap)


@pytest.mark.parametrize("t", [1e8, 1e16, 1e300, -1e300])
def test_cayley_is_unitary_where_its_solve_is_singular(backend, dtype, rng, t):
    """I - t/2 X is singular in floating point for huge t; the Cayley map of a
    skew-Hermitian matrix is still unitary, and tends to the reflection that
    fixes the complement of span[a, b]."""
    n, m = N, 4
    W = stiefel(rng, n, m, dtype)
    a, b = random_matrix(rng, (2, n, 1), dtype)
    C = backend.to_numpy(ul.cayley_transport(*(backend.asarray(x) for x in (W, a, b)), t=t))
    assert np.all(np.isfinite(C))
    assert orthonormality(C) <= tol(dtype, 1)
    # X has rank 2 with eigenvalues +-i w; its limit map is I - 2 P on their plane
    a64, b64 = a.astype(np.complex128), b.astype(np.complex128)
    Q, _ = np.linalg.qr(np.concatenate([a64, b64], axis=-1))
    limit = (np.eye(n) - 2 * Q @ mH(Q)) @ W
    if abs(t) >= 1e16:
        np.testing.assert_allclose(C, limit, atol=tol(dtype, 10))


@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("dtype_", ["float64", "complex128"])
def test_a_thousand_rectangular_steps_stay_orthonormal(rng, variant, dtype_):
    """1,000 float64 steps on a 32 x 8 W with orthonormal columns, no
    re-projection: ||W^H W - I|| / sqrt(m) stays below 1e-12."""
    W = stiefel(rng, 32, 8, dtype_)
    for step in range(1000):
        x = random_matrix(rng, (32, 1), dtype_)
        y = random_matrix(rng, (8, 1), dtype_)
        W = ul.projunn_step(W, (x, y), lr=0.05, rank=1, variant=variant)
    assert float(ul.unitarity_error(W)) < 1e-12
    assert orthonormality(W) < 1e-12


@pytest.mark.parametrize(("shape", "rank", "lr", "dtype_"), [((5, 4), 1, 5.0, "float64"), ((4, 5), 2, 5.0, "float64"),
                                                        ((10, 8), 2, 0.1, "float64"),
                                                        ((20, 16), 1, 5.0, "complex128")])
def test_direct_steps_of_a_nearly_square_w_do_not_amplify_drift(shape, rank, lr, dtype_):
    """The direct step of a tall W with few rows beyond its columns: a_perp,
    the part of the sketch outside W's range, is short beside W^H Y, and
    W's own drift Delta came back in the new W times |c| / |a_perp|, every
    step (5 x 4, lr = 5: 1e-16 to 1e-2 in 80 float64 steps, then a
    UnitarityError; 20 x 16 complex refused at step 255). Dense Gaussian
    gradients, 1,000 steps, no re-projection."""
    rng = np.random.default_rng(2)
    W = ul.random_unitary(*shape, dtype=dtype_, rng=0)
    sketches = np.random.default_rng(1)
    worst = 0.0
    for _ in range(1000):
        W = ul.projunn_step(W, random_matrix(rng, shape, dtype_), lr=lr, rank=rank, variant="direct", rng=sketches)
        worst = max(worst, float(ul.unitarity_error(W if shape[0] >= shape[1] else mH(W))))
    assert worst < 1e-13, worst


@pytest.mark.parametrize("shape", [(N, 4), (4, N)])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_zero_rank_deficient_and_huge_updates(rng, dtype, shape, variant):
    n, m = shape
    W = stiefel(rng, n, m, dtype)
    zero = np.zeros((n, m), dtype)
    np.testing.assert_allclose(ul.projunn_step(W, zero, lr=0.1, rank=2, variant=variant, rng=0), W, atol=tol(dtype))
    # a rank-1 gradient sketched at rank 3: two directions are null
    x, y = random_matrix(rng, (n, 1), dtype), random_matrix(rng, (m, 1), dtype)
    G = (wide(x) @ mH(wide(y))).astype(dtype)
    V = ul.projunn_step(W, G, lr=0.2, rank=3, variant=variant, rng=1)
    np.testing.assert_allclose(V, reference_step(W, G, 0.2, variant), atol=tol(dtype, 10))
    # factors with repeated columns
    V = ul.projunn_step(W, (np.concatenate([x, x], axis=1), np.concatenate([y, y], axis=1)), lr=0.1, rank=2,
                        variant=variant)
    np.testing.assert_allclose(V, reference_step(W, 2 * G, 0.1, variant), atol=tol(dtype, 10))
    for lr in (1e6, 1e30, 1e300):
        V = ul.projunn_step(W, G, lr=lr, rank=1, variant=variant, rng=2)
        assert np.all(np.isfinite(V)) and orthonormality(V) <= tol(dtype, 1), lr


def test_canonical_tangent_step_to_first_order(rng):
    """For small lr the tangent step is W - lr/2 A W (the canonical metric's
    gradient) and the direct step W - lr tangent_project(W, G)."""
    W = stiefel(rng, N, 4, "float64")
    G = random_matrix(rng, (N, 1), "float64") @ random_matrix(rng, (1, 4), "float64")
    lr = 1e-6
    A = G @ W.T - W @ G.T
    tangent = ul.projunn_step(W, G, lr=lr, rank=1, rng=0)
    direct = ul.projunn_step(W, G, lr=lr, rank=1, variant="direct", rng=0)
    np.testing.assert_allclose((tangent - W) / lr, -A @ W / 2, atol=1e-5)
    np.testing.assert_allclose((direct - W) / lr, -ul.tangent_project(W, G), atol=1e-5)


@pytest.mark.parametrize("shape", [(N, 4), (4, N), (N, N)])
def test_tangent_project_rectangular(backend, dtype, rng, shape):
    W = stiefel(rng, *shape, dtype, (2,))
    G = random_matrix(rng, (2, *shape), dtype)
    Z = backend.to_numpy(ul.tangent_project(backend.asarray(W), backend.asarray(G))).astype(np.complex128)
    W64, G64 = W.astype(np.complex128), G.astype(np.complex128)
    tall = shape[0] >= shape[1]
    # in the tangent space: W^H Z + Z^H W = 0 (tall) or Z W^H + W Z^H = 0 (wide)
    S = mH(W64) @ Z if tall else Z @ mH(W64)
    np.testing.assert_allclose(S + mH(S), 0, atol=tol(dtype, 10))
    # an orthogonal projection: G - Z is orthogonal to every tangent vector, here Z itself
    assert np.all(np.abs(np.einsum("...ij,...ij->...", np.conj(G64 - Z), Z).real) <= tol(dtype, 100))


@pytest.mark.parametrize("shape", [(N, 4), (4, N), (N, 1)])
def test_random_unitary_rectangular(backend, shape):
    n, m = shape
    W = ul.random_unitary(n, m, dtype="complex128", batch_shape=(2,), rng=0, xp=backend.xp) \
        if backend.name != "array_api_strict:no_float64" else None
    if W is None:
        pytest.skip("no complex128 on this device")
    W = backend.to_numpy(W)
    assert W.shape == (2, n, m)
    assert np.all(orthonormality(W) < 1e-14)
    assert np.all(backend.to_numpy(ul.unitarity_error(backend.asarray(W))) < 1e-14)
    # a square draw takes the same numbers whether m is given or not
    np.testing.assert_array_equal(ul.random_unitary(5, 5, dtype="float64", rng=3),
                                  ul.random_unitary(5, dtype="float64", rng=3))


def test_random_stiefel_is_haar(rng):
    """The first column of a Haar matrix is uniform on the sphere: E|w_1|^2 = 1/n
    for each entry, and the columns' Gram is the identity."""
    W = ul.random_unitary(6, 2, dtype="float64", batch_shape=(4000,), rng=rng)
    second_moments = np.mean(W[..., 0] ** 2, axis=0)
    np.testing.assert_allclose(second_moments, 1 / 6, atol=0.02)
    fourth = np.mean(W[..., 0, 0] ** 4)
    np.testing.assert_allclose(fourth, 3 / (6 * 8), atol=0.01)  # E x_1^4 on S^5


def test_a_rectangular_w_that_is_not_orthonormal_is_refused(rng):
    W = 0.5 * stiefel(rng, N, 4, "float64")
    G = random_matrix(rng, (N, 4), "float64")
    for variant in ("tangent", "direct", "cayley"):
        with pytest.raises(ValueError, match=r"W is not unitary"):
            ul.projunn_step(W, G, lr=0.1, variant=variant, rng=0)


@pytest.mark.parametrize("shape", [(N, 4), (N, 1), (4, N)])
@pytest.mark.parametrize("damage", ["zero", "halved, G outside its range"])
def test_a_rectangular_w_refused_where_w_h_y_says_nothing(backend, rng, shape, damage):
    """The direct step checks W's orthonormal columns on span[Z, c], not on
    c = W^H Y alone, which says nothing when c = 0 exactly: for W = 0, or for
    W / 2 with G's columns outside W's range (W's rows and G's rows apart, so
    that W^H Y has no rounding either), |W c| = |c| holds, and the step
    returned a matrix off the manifold without a word."""
    n, m = max(shape), min(shape)
    W = np.zeros((n, m))
    G = random_matrix(rng, (n, m), "float64")
    if damage != "zero":
        W[:m] = stiefel(rng, m, m, "float64") / 2
        G[:m] = 0  # W^H G = 0 exactly: every sketch of G has c = W^H Y = 0
    if shape[0] < shape[1]:  # a wide W: the conjugate transposes
        W, G = W.T, G.T
    dtype = "float64" if backend.has_float64 else "float32"
    W, G = backend.asarray(W.astype(dtype)), backend.asarray(G.astype(dtype))
    with pytest.raises(ValueError, match=r"W is not unitary"):
        ul.projunn_step(W, G, lr=0.1, variant="direct", rank=1, rng=0)
    if damage == "zero":
        a, b = (backend.asarray(random_matrix(rng, (k, 2), "float64").astype(dtype)) for k in shape)
        with pytest.raises(ValueError, match=r"W is not unitary"):
            ul.project_unitary_lowrank(W, a, b)


def test_rectangular_shape_errors(rng):
    W = stiefel(rng, N, 4, "float64")
    with pytest.raises(ValueError, match=r"G must have shape \(..., 16, 4\) to match W of shape \(16, 4\), got shape \(4, 16\)"):
        ul.projunn_step(W, np.ones((4, N)), lr=0.1)
    with pytest.raises(ValueError, match=r"G\[1\] must have shape \(..., 4, k\) to match W of shape \(16, 4\), got shape \(16, 1\)"):
        ul.projunn_step(W, (np.ones((N, 1)), np.ones((N, 1))), lr=0.1)
    with pytest.raises(ValueError, match=r"rank must be <= 4 = min\(n, m\) for W of shape \(16, 4\), got 5"):
        ul.projunn_step(W, np.ones((N, 4)), lr=0.1, rank=5)
    with pytest.raises(ValueError, match=r"b must have shape \(..., 4, k\) to match W of shape \(16, 4\), got shape \(16, 1\)"):
        ul.project_unitary_lowrank(W, np.ones((N, 1)), np.ones((N, 1)))
    with pytest.raises(ValueError, match=r"a must have shape \(..., 16, k\) to match W of shape \(16, 4\), got shape \(4, 1\)"):
        ul.cayley_transport(W, np.ones((4, 1)), np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"m must be >= 1, got 0"):
        ul.random_unitary(4, 0, dtype="float64")


def test_float32_steps_use_float64_cores(rng):
    """The small work runs in float64 on the host: a float32 rectangular step is
    orthonormal to float32 rounding, not worse."""
    W = stiefel(rng, 64, 16, "float32")
    G = random_matrix(rng, (64, 16), "float32")
    for variant in ul.steps.VARIANTS:
        V = ul.projunn_step(W, G, lr=0.5, rank=4, variant=variant, rng=0)
        assert orthonormality(V) < 30 * eps("float32"), variant


# ------------------------------------------------ the front ends, rectangular


@pytest.mark.parametrize("shape", [(N, 4), (4, N), (N, N)])
@pytest.mark.parametrize("dtype_", ["float64", "complex128"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_the_three_front_ends_take_the_reference_step(rng, shape, dtype_, variant):
    """A rank-1 gradient is sketched exactly: with SGD (direction = G), the
    torch optimizer, optax and the framework-free optimizer all take the dense
    reference step, on square, tall and wide matrices."""
    torch = pytest.importorskip("torch")
    from unitary_lr.optim import ProjUNN as ArrayProjUNN
    from unitary_lr.torch import ProjUNN as TorchProjUNN, mark_unitary

    W = stiefel(rng, *shape, dtype_)
    G = wide(random_matrix(rng, (shape[0], 1), dtype_)) @ mH(wide(random_matrix(rng, (shape[1], 1), dtype_)))
    expected = reference_step(W, G, 0.1, variant)

    p = torch.nn.Parameter(torch.from_numpy(W.copy()))
    mark_unitary(p)
    opt = TorchProjUNN([p], lr=0.1, base="sgd", rank=1, variant=variant, seed=0)
    p.grad = torch.from_numpy(G.copy())
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), expected, atol=1e-13)

    V = ArrayProjUNN(lr=0.1, base="sgd", rank=1, variant=variant, seed=0).step(W, G)
    np.testing.assert_allclose(V, expected, atol=1e-13)

    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import optax

    from unitary_lr.optax import projunn

    params = {"W": jax.numpy.asarray(W)}
    transform = projunn(0.1, unitary={"W": True}, base="sgd", rank=1, variant=variant)
    # JAX's gradient of a real loss of a complex W is the conjugate of torch's
    updates, _ = jax.jit(transform.update)({"W": jax.numpy.asarray(np.conj(G))}, transform.init(params), params)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(params, updates)["W"]), expected, atol=1e-13)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("shape", [(2, N, 4), (2, 4, N)])
def test_torch_optimizer_batched_rectangular(rng, capturable, shape):
    """A batch of rectangular unitary parameters, updated in place (one batched
    product), eager or capturable (the sketch drawn on the device)."""
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN, mark_unitary

    W = stiefel(rng, *shape[1:], "complex128", (shape[0],))
    x = random_matrix(rng, (shape[0], shape[1], 1), "complex128")
    y = random_matrix(rng, (shape[0], shape[2], 1), "complex128")
    G = x @ mH(y)
    p = torch.nn.Parameter(torch.from_numpy(W.copy()))
    mark_unitary(p)
    opt = ProjUNN([p], lr=0.2, base="sgd", rank=1, variant="cayley", capturable=capturable, seed=0)
    p.grad = torch.from_numpy(G)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), reference_step(W, G, 0.2, "cayley"), atol=1e-13)
    assert np.all(orthonormality(p.detach().numpy()) < 1e-14)
