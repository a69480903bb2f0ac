import numpy as np
import pytest
import scipy.linalg
from _helpers import assert_same_kind, haar, is_complex, mH, random_matrix, tol, unitarity

import unitary_lr as ul

N = 16  # one size across the suite keeps JAX's per-shape compilation cheap


def reference_polar(M):
    """scipy.linalg.polar in complex128/float64, batched by a loop."""
    wide = M.astype(np.complex128 if np.iscomplexobj(M) else np.float64)
    flat = wide.reshape(-1, *wide.shape[-2:])
    return np.stack([scipy.linalg.polar(m)[0] for m in flat]).reshape(wide.shape)


def assert_is_polar_factor(P, M, dtype, scale=1.0):
    """P is unitary and P^H M is Hermitian positive semidefinite: the defining
    property of a polar factor, which holds for every choice when M is singular."""
    assert np.all(unitarity(P) <= tol(dtype, 2))
    H = mH(P.astype(np.complex128)) @ M.astype(np.complex128)
    np.testing.assert_allclose(H, mH(H), atol=tol(dtype, 10) * scale)
    assert np.all(np.linalg.eigvalsh((H + mH(H)) / 2) >= -tol(dtype, 10) * scale)


# ------------------------------------------------------------ project_unitary


@pytest.mark.parametrize("batch", [(), (3,)])
def test_project_unitary_svd_matches_scipy(backend, dtype, rng, batch):
    A = random_matrix(rng, (*batch, N, N), dtype)
    P = ul.project_unitary(backend.asarray(A))
    assert_same_kind(backend, P, backend.asarray(A))
    np.testing.assert_allclose(backend.to_numpy(P), reference_polar(A), atol=tol(dtype, 10))


@pytest.mark.parametrize("batch", [(), (3,)])
def test_newton_schulz_agrees_with_svd(backend, dtype, rng, batch):
    # well conditioned: a unitary matrix times a positive definite factor in [0.5, 2]
    U = haar(rng, N, dtype, batch)
    V = haar(rng, N, dtype, batch)
    A = ((U * np.linspace(0.5, 2.0, N)) @ mH(V)).astype(dtype)
    P = ul.project_unitary(backend.asarray(A), method="newton_schulz")
    assert_same_kind(backend, P, backend.asarray(A))
    P = backend.to_numpy(P)
    # the contract is 1e-6 in float64; the iteration reaches rounding level
    np.testing.assert_allclose(P, reference_polar(A), atol=1e-6 if dtype in ("float64", "complex128") else 1e-4)
    np.testing.assert_allclose(P, U @ mH(V), atol=tol(dtype, 10))


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 6, 4), (0, 4, 6)])
def test_an_empty_batch_gives_an_empty_result(backend, dtype, rng, method, shape):
    """A batch of no matrices gives no polar factors, of the input's shape,
    dtype and device, by either method (Newton-Schulz raised NumPy's
    "zero-size array to reduction operation maximum", or PyTorch's amax
    error, before); the same call on a full batch still converges."""
    A = backend.asarray(np.zeros(shape, dtype))
    P = ul.project_unitary(A, method=method)
    assert tuple(P.shape) == shape
    assert_same_kind(backend, P, A)
    m, n = shape[-2:]
    U, V = haar(rng, m, dtype, (2,))[..., :min(m, n)], haar(rng, n, dtype, (2,))[..., :min(m, n)]
    full = ((U * np.linspace(0.5, 2.0, min(m, n))) @ mH(V)).astype(dtype)  # well conditioned
    np.testing.assert_allclose(backend.to_numpy(ul.project_unitary(backend.asarray(full), method=method)),
                               U @ mH(V), atol=tol(dtype, 10))


def test_under_jax_jit_the_svd_method_runs_and_newton_schulz_is_refused_by_name(rng):
    """The SVD method is traceable: under jax.jit (and vmap) it gives the
    polar factor, NaN or Inf left unchecked there (its check read a tracer as
    a bool: JAX's TracerBoolConversionError). Newton-Schulz reads its error
    on the host at every iteration, and says so."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    A = random_matrix(rng, (2, N, N), "float64")
    np.testing.assert_allclose(np.asarray(jax.jit(ul.project_unitary)(jnp.asarray(A))), reference_polar(A), atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.vmap(ul.project_unitary)(jnp.asarray(A))), reference_polar(A), atol=1e-12)
    with pytest.raises(TypeError, match=r"^A is a JAX tracer: project_unitary\(method='newton_schulz'\) does not run "
                                        r"under jax.jit .* host .* Under jit use method='svd'"):
        jax.jit(lambda A: ul.project_unitary(A, method="newton_schulz"))(jnp.asarray(A))


@pytest.mark.parametrize("scale", ["huge", "tiny"])
def test_newton_schulz_takes_any_scale(backend, dtype, rng, scale):
    """c A has A's polar factor: a well conditioned A of size 1e200 (1e30 in
    32-bit) or 1e-200 (1e-30), whose Gram over- or underflows, was refused as
    "singular or too ill-conditioned"."""
    double = dtype in ("float64", "complex128") and backend.has_float64
    c = {"huge": 1e200, "tiny": 1e-200} if double else {"huge": 1e30, "tiny": 1e-30}
    U, V = haar(rng, N, dtype), haar(rng, N, dtype)
    A = ((U * np.linspace(0.5, 2.0, N)) @ mH(V) * c[scale]).astype(dtype)
    P = backend.to_numpy(ul.project_unitary(backend.asarray(A), method="newton_schulz"))
    np.testing.assert_allclose(P, U @ mH(V), atol=tol(dtype, 10))


def test_newton_schulz_repairs_drifted_matrix_quickly(rng):
    W = haar(rng, N, "complex128")
    drifted = W + 1e-6 * random_matrix(rng, (N, N), "complex128")
    P = ul.project_unitary(drifted, method="newton_schulz", max_iter=3)
    np.testing.assert_allclose(P, reference_polar(drifted), atol=1e-14)


def test_newton_schulz_reports_failure(backend, rng):
    A = random_matrix(rng, (N, N), "float32")
    A[:, 0] = 0  # exactly singular: that column of the iterate stays 0
    with pytest.raises(ul.ConvergenceError, match=r"did not converge in 60 iterations: .* use method='svd'"):
        ul.project_unitary(backend.asarray(A), method="newton_schulz")
    with pytest.raises(ul.ConvergenceError, match="did not converge in 60 iterations"):
        ul.project_unitary(backend.asarray(np.zeros((4, 4), np.float32)), method="newton_schulz")
    # and it is a ValueError, like numpy.linalg.LinAlgError
    assert issubclass(ul.ConvergenceError, ValueError)


def test_project_unitary_svd_handles_singular_input(rng):
    A = random_matrix(rng, (N, N), "complex128")
    A[:, :3] = 0
    assert_is_polar_factor(ul.project_unitary(A), A, "complex128", scale=np.abs(A).max())


def test_project_unitary_errors(backend, rng):
    A = random_matrix(rng, (N, N), "float32")
    with pytest.raises(ValueError, match=r"A must have shape \(..., m, n\), got shape \(16,\)"):
        ul.project_unitary(backend.asarray(A[:, 0]))
    with pytest.raises(ValueError, match=r"method must be one of 'svd', 'newton_schulz', got 'qr'"):
        ul.project_unitary(backend.asarray(A), method="qr")
    A[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"A contains NaN or Inf: 1 non-finite entry"):
        ul.project_unitary(backend.asarray(A))


# ---------------------------------------------------- project_unitary_lowrank


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_lowrank_polar_matches_scipy(backend, dtype, rng, k, batch):
    W = haar(rng, N, dtype, batch)
    a = random_matrix(rng, (*batch, N, k), dtype)
    b = random_matrix(rng, (*batch, N, k), dtype)
    args = [backend.asarray(x) for x in (W, a, b)]
    before = [backend.to_numpy(x).copy() for x in args]
    P = ul.project_unitary_lowrank(*args)
    assert_same_kind(backend, P, args[0])
    assert tuple(P.shape) == (*batch, N, N)
    for x, old in zip(args, before):  # inputs untouched
        np.testing.assert_array_equal(backend.to_numpy(x), old)
    P = backend.to_numpy(P)
    np.testing.assert_allclose(P, reference_polar(W + a @ mH(b)), atol=tol(dtype, 10))
    assert np.all(unitarity(P) <= tol(dtype, 1))


def test_lowrank_polar_broadcasts_batch_axes(backend, rng):
    W = haar(rng, N, "complex128" if backend.has_float64 else "complex64")
    dtype = W.dtype.name
    a = random_matrix(rng, (2, 1, N, 2), dtype)
    b = random_matrix(rng, (3, N, 2), dtype)
    P = backend.to_numpy(ul.project_unitary_lowrank(*(backend.asarray(x) for x in (W, a, b))))
    assert P.shape == (2, 3, N, N)
    np.testing.assert_allclose(P, reference_polar(W + a @ mH(b)), atol=tol(dtype, 10))


def test_lowrank_polar_of_singular_update(backend, dtype, rng):
    """a = -W b (b^H b)^-1 makes (W + a b^H) b = 0: M is singular, its polar
    factor is not unique, and any unitary choice with P^H M >= 0 is right."""
    W = haar(rng, N, dtype)
    b = random_matrix(rng, (N, 2), dtype)
    a = (-W @ b @ np.linalg.inv(mH(b) @ b)).astype(dtype)
    P = backend.to_numpy(ul.project_unitary_lowrank(*(backend.asarray(x) for x in (W, a, b))))
    assert np.all(np.isfinite(P))
    assert_is_polar_factor(P, W + a @ mH(b), dtype, scale=4.0)


def test_lowrank_polar_zero_update_returns_w_exactly(backend, dtype, rng):
    W = haar(rng, N, dtype)
    b = random_matrix(rng, (N, 3), dtype)
    zero = np.zeros((N, 3), dtype)
    for a, bb in ((zero, b), (b, zero), (zero, zero)):
        P = backend.to_numpy(ul.project_unitary_lowrank(*(backend.asarray(x) for x in (W, a, bb))))
        np.testing.assert_array_equal(P, W)


def test_lowrank_polar_rank_deficient_factors(backend, dtype, rng):
    W = haar(rng, N, dtype)
    a = random_matrix(rng, (N, 1), dtype)
    b = random_matrix(rng, (N, 1), dtype)
    a3, b3 = np.concatenate([a, 2 * a, 0 * a], axis=1), np.concatenate([b, b, b], axis=1)
    P = backend.to_numpy(ul.project_unitary_lowrank(*(backend.asarray(x) for x in (W, a3, b3))))
    np.testing.assert_allclose(P, reference_polar(W + 3 * a @ mH(b)), atol=tol(dtype, 10))


@pytest.mark.parametrize("scale", [1e-3, 1e3, 1e8])
def test_lowrank_polar_large_updates(backend, dtype, rng, scale):
    W = haar(rng, N, dtype)
    a = (scale * random_matrix(rng, (N, 2), dtype)).astype(dtype)
    b = random_matrix(rng, (N, 2), dtype)
    P = backend.to_numpy(ul.project_unitary_lowrank(*(backend.asarray(x) for x in (W, a, b))))
    assert np.all(np.isfinite(P))
    # unitary to rounding whatever the size of the update ...
    assert np.all(unitarity(P) <= tol(dtype, 1))
    # ... and the polar factor of W + a b^H up to a backward error of rounding
    # relative to ||W + a b^H||, which is all that forming M (as the SciPy
    # reference must) can resolve.
    wide = np.complex128 if is_complex(dtype) else np.float64
    M = W.astype(wide) + a.astype(wide) @ mH(b.astype(wide))
    size = np.linalg.norm(M, 2)
    assert_is_polar_factor(P, M, dtype, scale=size)
    np.testing.assert_allclose(P, reference_polar(M), atol=tol(dtype, 10) * size)


def test_lowrank_polar_tiny_update_not_lost(rng):
    """For ||a b^H|| = 1e-9 the step P - W matches its first-order expansion
    W (E - E^H)/2, E = W^H a b^H, to ~1e-9 relative: nothing is lost to
    cancellation in the small core."""
    W = haar(rng, N, "complex128")
    a = 1e-9 * random_matrix(rng, (N, 2), "complex128")
    b = random_matrix(rng, (N, 2), "complex128")
    step = ul.project_unitary_lowrank(W, a, b) - W
    E = mH(W) @ a @ mH(b)
    first_order = W @ (E - mH(E)) / 2
    assert np.linalg.norm(step - first_order) <= 1e-6 * np.linalg.norm(first_order)


def test_lowrank_polar_promotes_dtypes(rng):
    W = haar(rng, N, "float32")
    a = random_matrix(rng, (N, 1), "float64")
    b = random_matrix(rng, (N, 1), "float32")
    P = ul.project_unitary_lowrank(W, a, b)
    assert P.dtype == np.float64
    P = ul.project_unitary_lowrank(W, a.astype(np.complex64), b)
    assert P.dtype == np.complex64


def test_lowrank_polar_errors(backend, rng):
    W = haar(rng, N, "float32")
    a = random_matrix(rng, (N, 2), "float32")
    args = [backend.asarray(x) for x in (W, a, a)]
    with pytest.raises(ValueError, match=r"b must have shape \(..., 2, k\) to match W of shape \(16, 2\), got shape \(16, 2\)"):
        ul.project_unitary_lowrank(args[1], args[1], args[2])
    with pytest.raises(ValueError, match=r"b must have shape \(..., 16, k\) to match W of shape \(16, 16\), got shape \(15, 2\)"):
        ul.project_unitary_lowrank(args[0], args[1], backend.asarray(a[:-1]))
    with pytest.raises(ValueError, match=r"a and b must have the same number of columns k, got shapes \(16, 2\) and \(16, 1\)"):
        ul.project_unitary_lowrank(args[0], args[1], backend.asarray(a[:, :1]))
    with pytest.raises(ValueError, match=r"batch axes .* do not broadcast: W \(2, 16, 16\), a \(3, 16, 2\)"):
        ul.project_unitary_lowrank(backend.asarray(np.stack([W, W])), backend.asarray(np.stack([a] * 3)), backend.asarray(np.stack([a] * 3)))
    bad = a.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"a contains NaN or Inf: 1 non-finite entry in an array of shape \(16, 2\)"):
        ul.project_unitary_lowrank(args[0], backend.asarray(bad), args[2])
    if backend.name != "numpy":
        with pytest.raises(TypeError, match=r"W is a .* but b is a numpy.ndarray; pass arrays from one library"):
            ul.project_unitary_lowrank(args[0], args[1], a)


@pytest.mark.parametrize("dtype, scale", [("float32", 1e-40), ("complex64", 1e-40), ("float64", 1e-310),
                                          ("complex128", 1e-310), ("float32", 3e38), ("float64", 1e300)])
def test_newton_schulz_takes_a_matrix_at_the_ends_of_its_dtype(dtype, scale):
    """The iteration starts from A brought near unit size by a power of two.
    For a subnormal A that power (2**133 for a float32 1e-40) is Inf in A's
    dtype, and a perfectly conditioned A was refused as singular; it is
    applied in two halves. The result is the polar factor of the A given
    (rounded to the subnormal grid), as the SVD finds it."""
    Q = ul.random_unitary(6, dtype=dtype, rng=3)
    A = Q * np.asarray(scale, dtype=Q.real.dtype)
    P = ul.project_unitary(A, method="newton_schulz")
    reference = ul.project_unitary(A, method="svd")
    eps = np.finfo(Q.real.dtype).eps
    assert np.linalg.norm(np.conj(P).T @ P - np.eye(6)) < 64 * eps
    assert np.max(np.abs(P - reference)) < 1e3 * eps


# ------------------------------------------------- project_unitary's derivative


def reference_polar_tangent(A, dA):
    """dQ of the polar factor Q H = A (tall or square, full column rank) along
    dA, from SciPy's polar factors and a Sylvester equation, in complex128:
    Q^H dA - dA^H Q = O H + H O for the skew-Hermitian O, and dQ = Q O +
    (I - Q Q^H) dA H^-1. A wide A is the adjoint of a tall one."""
    if A.shape[-2] < A.shape[-1]:
        return mH(reference_polar_tangent(mH(A), mH(dA)))
    A, dA = A.astype(np.complex128), dA.astype(np.complex128)
    Q, H = scipy.linalg.polar(A)
    skew = scipy.linalg.solve_sylvester(H, H, mH(Q) @ dA - mH(dA) @ Q)
    return Q @ skew + (dA - Q @ (mH(Q) @ dA)) @ np.linalg.inv(H)


def _polar_derivatives(name, A, dA, G):
    """(jvp along dA, gradient of Re tr(G^H Q)) of project_unitary, in
    PyTorch's autograd or JAX, as NumPy arrays."""
    if name == "torch":
        import torch

        a = torch.tensor(A, requires_grad=True)
        _, tangent = torch.func.jvp(ul.project_unitary, (a.detach(),), (torch.tensor(dA),))
        (torch.tensor(G).conj() * ul.project_unitary(a)).real.sum().backward()
        return tangent.numpy(), a.grad.numpy()
    import jax
    import jax.numpy as jnp

    _, tangent = jax.jvp(ul.project_unitary, (jnp.asarray(A),), (jnp.asarray(dA),))
    gradient = jax.grad(lambda a: jnp.sum(jnp.conj(jnp.asarray(G)) * ul.project_unitary(a)).real)(jnp.asarray(A))
    # JAX's gradient of a real function of complex A is the conjugate of PyTorch's
    return np.asarray(tangent), np.conj(np.asarray(gradient))


# PyTorch lazily scripts its forward-mode decompositions at the first jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("library", ["torch", "jax"])
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 7), (2, 6, 3)])
@pytest.mark.parametrize("at", ["unitary", "general"])
def test_project_unitary_derivatives_match_a_sylvester_reference(rng, library, dtype, shape, at):
    """The derivatives of the SVD method are those of the polar factor: they
    went through the SVD's, NaN at every unitary A (repeated singular values,
    the case of a re-projection) and wrong for complex A (by 1.5-2.3 near a
    unitary one). Forward mode against an independent reference (SciPy's
    polar factors and a Sylvester equation); the gradient by the adjoint
    identity <G, J dA> = <J^H G, dA>."""
    pytest.importorskip(library)
    if library == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX without float64 (jax_enable_x64 is off)")
    tall = (*shape[:-2], max(shape[-2:]), min(shape[-2:]))
    A = haar(rng, tall[-2], dtype, batch=tall[:-2])[..., : tall[-1]]
    if at == "general":
        A = A @ (np.eye(tall[-1]) + 0.3 * random_matrix(rng, tall[-1:] * 2, dtype))
    if shape[-2] < shape[-1]:
        A = mH(A)
    dA, G = (random_matrix(rng, shape, dtype) for _ in range(2))
    expected = np.stack([reference_polar_tangent(a, d) for a, d in zip(A.reshape(-1, *shape[-2:]),
                                                                         dA.reshape(-1, *shape[-2:]))]).reshape(shape)
    tangent, gradient = _polar_derivatives(library, A, dA, G)
    assert np.isfinite(tangent).all() and np.isfinite(gradient).all()
    np.testing.assert_allclose(tangent, expected, atol=1e-12)
    np.testing.assert_allclose(np.sum(np.conj(gradient) * dA).real, np.sum(np.conj(G) * expected).real, rtol=1e-11)


def test_project_unitary_second_derivative_on_torch_is_refused(rng):
    """The hand-written derivative has no derivative of its own: a second
    derivative raises, where one through it would take the SVD's factors as
    constants and be wrong without a word."""
    torch = pytest.importorskip("torch")
    A = torch.tensor(haar(rng, 4, "float64"))
    G = torch.tensor(random_matrix(rng, (4, 4), "float64"))

    def loss(a):
        return (G * ul.project_unitary(a)).sum()

    refused = "project_unitary's derivative is written by hand and is not differentiable"
    for second in (torch.func.hessian, lambda f: torch.func.jacrev(torch.func.jacrev(f)),
                   lambda f: torch.func.jacfwd(torch.func.jacfwd(f))):
        with pytest.raises(RuntimeError, match=refused):
            second(loss)(A)
    a = A.clone().requires_grad_()
    (first,) = torch.autograd.grad(loss(a), a, create_graph=True)
    with pytest.raises(RuntimeError, match=refused):
        first.sum().backward()


# PyTorch's own note on a complex conjugate it batches by a loop
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_project_unitary_per_sample_gradients(rng):
    """vmap of grad (PyTorch and JAX) equals a loop over the matrices."""
    torch = pytest.importorskip("torch")
    A = np.stack([haar(rng, 5, "complex128") for _ in range(3)])
    G = random_matrix(rng, (5, 5), "complex128")

    def loss(a):
        return (torch.tensor(G).conj() * ul.project_unitary(a)).real.sum()

    batched = torch.func.vmap(torch.func.grad(loss))(torch.tensor(A))
    loop = torch.stack([torch.func.grad(loss)(torch.tensor(a)) for a in A])
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-13)
    assert torch.isfinite(batched).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_newton_schulz_derivative_matches_the_reference(rng, dtype):
    """Differentiated through its iterations (PyTorch), the Newton-Schulz
    polar factor has the polar factor's derivative, at a unitary A too."""
    torch = pytest.importorskip("torch")
    for A in (haar(rng, 5, dtype), haar(rng, 5, dtype) @ (np.eye(5) + 0.3 * random_matrix(rng, (5, 5), dtype))):
        dA = random_matrix(rng, (5, 5), dtype)
        _, tangent = torch.func.jvp(lambda a: ul.project_unitary(a, method="newton_schulz"),
                                    (torch.tensor(A),), (torch.tensor(dA),))
        np.testing.assert_allclose(tangent.numpy(), reference_polar_tangent(A, dA), atol=1e-12)


def test_project_unitary_gradient_under_torch_compile(rng):
    """The written-out derivative compiles with fullgraph=True (the
    autograd.Function without forward mode, which Dynamo refuses) and gives
    the eager gradient, finite at a unitary A."""
    import warnings

    torch = pytest.importorskip("torch")
    A = torch.tensor(haar(rng, 6, "complex128"))
    G = torch.tensor(random_matrix(rng, (6, 6), "complex128"))

    def loss(a):
        return (G.conj() * ul.project_unitary(a)).real.sum()

    torch.compiler.reset()
    gradients = []
    for run in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
        a = A.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's own notes
            run(a).backward()
        gradients.append(a.grad)
    assert torch.isfinite(gradients[1]).all()
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=1e-14)
