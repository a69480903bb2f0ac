import warnings

import numpy as np
import pytest
from _helpers import assert_same_kind, mH, random_matrix, tol, unitarity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unitary_lr as ul

N, M = 8, 5


def reference_product(V):
    """H(v_1) ... H(v_j) as a dense complex128 product, reflector by reflector,
    batched by a loop; a zero column is skipped (the identity)."""
    V = V.astype(np.complex128)
    flat = V.reshape(-1, *V.shape[-2:])
    out = []
    for vs in flat:
        P = np.eye(V.shape[-2], dtype=np.complex128)
        for v in vs.T:
            if np.any(v != 0):
                v = v[:, None]
                P = P @ (np.eye(len(v)) - 2 * (v @ mH(v)) / (mH(v) @ v))
        out.append(P)
    return np.stack(out).reshape(*V.shape[:-2], V.shape[-2], V.shape[-2])


def reference_apply(V, X, side):
    P = reference_product(V)
    X = X.astype(np.complex128)
    return P @ X if side == "left" else X @ P


def cast_back(result, dtype):
    """The reference's real part for real dtypes (its imaginary part is 0)."""
    return result if dtype.startswith("complex") else result.real


@pytest.mark.parametrize("j", [1, 3, N])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("v_batch", "x_batch"), [((), ()), ((3, 1), (2,))])
def test_matches_dense_product(backend, dtype, rng, j, side, v_batch, x_batch):
    V = random_matrix(rng, (*v_batch, N, j), dtype)
    X = random_matrix(rng, (*x_batch, N, M) if side == "left" else (*x_batch, M, N), dtype)
    args = [backend.asarray(x) for x in (V, X)]
    before = [backend.to_numpy(x).copy() for x in args]
    Y = ul.householder_apply(*args, side=side)
    assert_same_kind(backend, Y, args[0])
    for x, old in zip(args, before):
        np.testing.assert_array_equal(backend.to_numpy(x), old)
    expected = cast_back(reference_apply(V, X, side), dtype)
    assert Y.shape == expected.shape
    np.testing.assert_allclose(backend.to_numpy(Y), expected, atol=tol(dtype, j), rtol=0)


@pytest.mark.parametrize("j", [1, 3, N, 2 * N + 1])
def test_product_is_unitary_and_matches(backend, dtype, rng, j):
    V = random_matrix(rng, (2, N, j), dtype)
    P = ul.householder_product(backend.asarray(V))
    assert_same_kind(backend, P, backend.asarray(V))
    P = backend.to_numpy(P)
    np.testing.assert_allclose(P, cast_back(reference_product(V), dtype), atol=tol(dtype, j), rtol=0)
    assert np.all(unitarity(P) <= tol(dtype, 1))


def test_zero_columns_are_identity_reflectors(backend, dtype, rng):
    V = random_matrix(rng, (N, 5), dtype)
    V[:, [0, 2, 4]] = 0
    X = random_matrix(rng, (N, M), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y = backend.to_numpy(ul.householder_apply(backend.asarray(V), backend.asarray(X)))
        P = backend.to_numpy(ul.householder_product(backend.asarray(np.zeros_like(V))))
    assert np.all(np.isfinite(Y))
    np.testing.assert_allclose(Y, cast_back(reference_apply(V[:, [1, 3]], X, "left"), dtype), atol=tol(dtype, 3))
    np.testing.assert_array_equal(P, np.eye(N))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 10), j=st.integers(1, 24), dtype=st.sampled_from(["float32", "complex128"]),
       zeros=st.integers(0, 2**24 - 1), log_scale=st.floats(-12, 12), seed=st.integers(0, 2**32 - 1))
def test_random_shapes_scales_and_zero_columns(n, j, dtype, zeros, log_scale, seed):
    """Any n, j (also j > n, both substitution and doubling), column sizes over
    24 decades and any set of zero columns: the dense product, unitary."""
    rng = np.random.default_rng(seed)
    V = random_matrix(rng, (n, j), dtype) * np.asarray(10.0**log_scale, dtype=dtype)
    V[:, [i for i in range(j) if zeros >> i & 1]] = 0
    X = random_matrix(rng, (n, 3), dtype)
    Y = ul.householder_apply(V, X)
    P = ul.householder_product(V)
    np.testing.assert_allclose(Y, cast_back(reference_apply(V, X, "left"), dtype), atol=tol(dtype, j), rtol=0)
    # The departure grows with j, as for reflectors applied one by one: up to
    # about 7 eps a reflector (complex128, j reflectors in one dimension, all
    # parallel; 164 eps at j = 23 in 6,000 draws), beyond the 300 eps of
    # tol(dtype, 1) for j near 24 (a draw of 168 eps failed it).
    assert unitarity(P) <= tol(dtype, 1 + j / 8)


def test_column_scale_does_not_matter(rng):
    """Only directions count: columns of norm 1e-30 and 1e30 in float32 (whose
    squares under- and overflow) give the unit columns' product."""
    V = random_matrix(rng, (N, 3), "float32")
    X = random_matrix(rng, (N, M), "float32")
    scaled = V * np.array([1e-30, 1e30, 1.0], dtype=np.float32)
    np.testing.assert_allclose(ul.householder_apply(scaled, X), reference_apply(V, X, "left").real,
                               atol=tol("float32", 3), rtol=0)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_column_scale_does_not_matter_in_64_bit(backend, rng, dtype):
    """Columns of length 1e155 and 1e-170 in float64, whose squares over- and
    underflow even there: the product was NaN or off by 1 (a tiny column
    counted as zero), now it is the unit columns' product."""
    if not backend.has_float64:
        pytest.skip("64-bit input")
    V = random_matrix(rng, (N, 4), dtype)
    X = random_matrix(rng, (M, N), dtype)
    scaled = V * np.array([1e155, 1e-170, 1e200, 1.0])
    P = backend.to_numpy(ul.householder_product(backend.asarray(scaled)))
    np.testing.assert_allclose(P, cast_back(reference_product(V), dtype), atol=tol(dtype, 4), rtol=0)
    Y = backend.to_numpy(ul.householder_apply(backend.asarray(scaled), backend.asarray(X), side="right"))
    np.testing.assert_allclose(Y, cast_back(reference_apply(V, X, "right"), dtype), atol=tol(dtype, 4), rtol=0)


def _ldexp(V, powers):
    """V's columns times 2**powers, exactly (also where 2**power is beyond float64)."""
    if np.iscomplexobj(V):
        return _ldexp(V.real, powers) + 1j * _ldexp(V.imag, powers)
    return np.ldexp(V, powers)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_subnormal_columns_in_64_bit(backend, rng, dtype):
    """Columns whose entries are subnormal float64 numbers (lengths 2**-1040
    and 5e-324): the power of two that brings them near unit length (2**1040)
    is beyond float64, and as one factor it made the whole product NaN,
    without a warning. Now their rounded directions' product, unitary, and
    no warning. (XLA flushes subnormal numbers to zero: on JAX they are zero
    columns, identity reflectors.)"""
    if not backend.has_float64:
        pytest.skip("64-bit input")
    V = random_matrix(rng, (N, 4), dtype)
    V[:, 3] = 0
    V[0, 3] = 1  # a column of one nonzero entry, the smallest subnormal below
    X = random_matrix(rng, (N, M), dtype)
    powers = np.array([0, -1040, 0, -1074])
    scaled = _ldexp(V, powers)
    directions = _ldexp(scaled, -powers)  # exact: the subnormals' rounding kept
    assert not np.array_equal(directions[:, 1], V[:, 1]) and scaled[0, 3] == 5e-324 and directions[0, 3] == 1
    if backend.name.startswith("jax"):
        directions[:, [1, 3]] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = backend.to_numpy(ul.householder_product(backend.asarray(scaled)))
        Y = backend.to_numpy(ul.householder_apply(backend.asarray(scaled), backend.asarray(X)))
    np.testing.assert_allclose(P, cast_back(reference_product(directions), dtype), atol=tol(dtype, 4), rtol=0)
    np.testing.assert_allclose(Y, cast_back(reference_apply(directions, X, "left"), dtype), atol=tol(dtype, 4), rtol=0)
    assert unitarity(P) <= tol(dtype, 1)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_torch_gradient_of_a_long_column_scales_with_its_length(dtype):
    """The hand-written gradient at c V is the gradient at V divided by c
    (the product depends on V's directions only), also where s**3 = |v|**-3
    underflows (c = 1e155)."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(2)
    tdtype = getattr(torch, dtype)
    V = torch.randn(6, 3, dtype=tdtype, generator=generator)
    X = torch.randn(6, 4, dtype=tdtype, generator=generator)
    grads = []
    for c in (1.0, 1e155, 1e-160):
        Vc = (V * c).requires_grad_()
        ul.householder_apply(Vc, X).real.sum().backward()
        grads.append(Vc.grad * c)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-10, atol=1e-12)


def test_nearly_parallel_reflectors(rng):
    """Reflectors 1e-8 apart: T has entries of size 1e8... in some orderings, yet
    the product stays accurate and unitary."""
    v = random_matrix(rng, (N, 1), "complex128")
    V = v + 1e-8 * random_matrix(rng, (N, N), "complex128")
    P = ul.householder_product(V)
    np.testing.assert_allclose(P, reference_product(V), atol=1e-12, rtol=0)
    assert unitarity(P) <= tol("complex128", 1)


def test_nearly_parallel_reflectors_by_blocks(rng):
    """The same beyond 16 reflectors, where T comes from recursive doubling."""
    v = random_matrix(rng, (N, 1), "float64")
    V = v + 1e-8 * random_matrix(rng, (N, 40), "float64")
    P = ul.householder_product(V)
    np.testing.assert_allclose(P, reference_product(V).real, atol=1e-11, rtol=0)
    assert unitarity(P) <= tol("float64", 1)


def test_mixed_dtypes_promote(rng):
    V = random_matrix(rng, (N, 2), "float32")
    X = random_matrix(rng, (N, M), "complex128")
    Y = ul.householder_apply(V, X)
    assert Y.dtype == np.complex128
    np.testing.assert_allclose(Y, reference_apply(V, X, "left"), atol=tol("float32", 2))


def test_check_finite_false_skips_the_check(rng):
    V = random_matrix(rng, (N, 2), "float64")
    X = np.full((N, M), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's own warning for NaN in matmul
        assert np.all(np.isnan(ul.householder_apply(V, X, check_finite=False)))


def test_errors(backend, rng):
    V = backend.asarray(random_matrix(rng, (N, 2), "float32"))
    X = backend.asarray(random_matrix(rng, (N, M), "float32"))
    with pytest.raises(TypeError, match=r"X must be an array .* got list"):
        ul.householder_apply(V, [[1.0]])
    if backend.name != "numpy":
        with pytest.raises(TypeError, match=r"V is a numpy.ndarray but X is a"):
            ul.householder_apply(np.ones((N, 2)), X)
    with pytest.raises(TypeError, match=r"V has dtype .*int.*; expected one of float32"):
        ul.householder_apply(backend.asarray(np.ones((N, 2), dtype=np.int32)), X)
    with pytest.raises(ValueError, match=r"X must have shape \(..., 8, m\) to match V of shape \(8, 2\) "
                                         r"with side='left', got shape \(5, 8\)"):
        ul.householder_apply(V, backend.asarray(random_matrix(rng, (M, N), "float32")))
    with pytest.raises(ValueError, match=r"X must have shape \(..., m, 8\) .* side='right', got shape \(8, 5\)"):
        ul.householder_apply(V, X, side="right")
    with pytest.raises(ValueError, match=r"side must be one of 'left', 'right', got 'top'"):
        ul.householder_apply(V, X, side="top")
    with pytest.raises(ValueError, match=r"V must have shape \(..., m, n\), got shape \(8,\)"):
        ul.householder_product(backend.asarray(np.ones(N, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"batch axes .* do not broadcast: V \(2, 8, 2\), X \(3, 8, 5\)"):
        ul.householder_apply(backend.asarray(np.ones((2, N, 2), dtype=np.float32)),
                             backend.asarray(np.ones((3, N, M), dtype=np.float32)))
    bad = random_matrix(rng, (N, M), "float32")
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"X contains NaN or Inf: 1 non-finite entry"):
        ul.householder_apply(V, backend.asarray(bad))
    bad = np.full((N, 2), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match=r"V contains NaN or Inf: 16 non-finite entries"):
        ul.householder_product(backend.asarray(bad))


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_torch_gradcheck(dtype, side):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    tdtype = getattr(torch, dtype)
    V = torch.randn(2, 6, 3, dtype=tdtype, generator=generator, requires_grad=True)
    X = torch.randn(6, 4, dtype=tdtype, generator=generator)
    X = (X if side == "left" else X.mT.contiguous()).requires_grad_()
    assert torch.autograd.gradcheck(lambda V, X: ul.householder_apply(V, X, side=side), (V, X))


def test_torch_gradient_with_a_zero_column_is_finite():
    torch = pytest.importorskip("torch")
    V = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    V[:, 1] = 0
    V.requires_grad_()
    ul.householder_apply(V, torch.ones(6, 2, dtype=torch.float64)).sum().backward()
    assert torch.all(torch.isfinite(V.grad))
    assert torch.all(V.grad[:, 1] == 0)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("j", [3, 20])
def test_jax_grad_and_jit_match_the_dense_formula(dtype, j, rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    V = jnp.asarray(random_matrix(rng, (N, j), dtype))
    X = jnp.asarray(random_matrix(rng, (N, M), dtype))
    C = jnp.asarray(random_matrix(rng, (N, M), dtype))

    def dense(V):  # an independent product of dense reflectors
        P = jnp.eye(N, dtype=V.dtype)
        for i in range(V.shape[-1]):
            v = V[:, i : i + 1]
            P = P @ (jnp.eye(N) - 2 * (v @ v.conj().T) / jnp.vdot(v, v))
        return P

    def loss(apply):
        return lambda V, X: jnp.sum(jnp.abs(apply(V, X) - C) ** 2)

    ours = jax.jit(jax.grad(loss(ul.householder_apply), argnums=(0, 1)))(V, X)
    expected = jax.grad(loss(lambda V, X: dense(V) @ X), argnums=(0, 1))(V, X)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(ul.householder_apply)(V, X)),
                               reference_apply(np.asarray(V), np.asarray(X), "left"), atol=1e-13)


def test_jax_gradient_with_a_zero_column_is_finite(rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    V = jnp.asarray(random_matrix(rng, (6, 3), "complex128")).at[:, 1].set(0)
    X = jnp.ones((6, 2), dtype=jnp.complex128)
    # Both arrays are traced: the shared device check reads None for a tracer.
    gradient = jax.grad(lambda V, X: jnp.sum(jnp.abs(ul.householder_apply(V, X)) ** 2 * jnp.arange(6.0)[:, None]),
                        argnums=(0, 1))(V, X)[0]
    assert np.all(np.isfinite(np.asarray(gradient)))
    np.testing.assert_array_equal(np.asarray(gradient)[:, 1], 0)


def test_check_finite_must_be_a_bool():
    # "no" is truthy: the check ran where the caller meant to skip it
    import unitary_lr as ul

    with pytest.raises(TypeError, match=r"check_finite must be True or False, got 'no'"):
        ul.householder_apply(np.ones((3, 1)), np.eye(3), check_finite="no")
