import numpy as np
import pytest
import scipy.linalg
from _helpers import assert_same_kind, haar, mH, random_matrix, tol, unitarity

import unitary_lr as ul

N = 16


def reference_transport(W, a, b, t):
    """scipy.linalg.expm(t (a b^H - b a^H)) @ W in complex128, batched by a loop."""
    W, a, b = (x.astype(np.complex128) for x in (W, a, b))
    X = a @ mH(b) - b @ mH(a)
    X, W = np.broadcast_arrays(X, W)
    flat_X, flat_W = X.reshape(-1, N, N), W.reshape(-1, N, N)
    return np.stack([scipy.linalg.expm(t * x) @ w for x, w in zip(flat_X, flat_W)]).reshape(X.shape)


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("t", [0.3, -2.0])
def test_matches_scipy_expm(backend, dtype, rng, k, batch, t):
    W = haar(rng, N, dtype, batch)
    a = (random_matrix(rng, (*batch, N, k), dtype) / np.sqrt(N)).astype(dtype)
    b = random_matrix(rng, (*batch, N, k), dtype)
    args = [backend.asarray(x) for x in (W, a, b)]
    before = [backend.to_numpy(x).copy() for x in args]
    V = ul.exp_transport(*args, t=t)
    assert_same_kind(backend, V, args[0])
    for x, old in zip(args, before):
        np.testing.assert_array_equal(backend.to_numpy(x), old)
    V = backend.to_numpy(V)
    np.testing.assert_allclose(V, reference_transport(W, a, b, t), atol=tol(dtype, 10 * k))
    assert np.all(unitarity(V) <= tol(dtype, 1))


@pytest.mark.parametrize("t", [50.0, 1e4, 1e300, -1.7976931348623157e308])
@pytest.mark.parametrize("cayley", [False, True])
def test_unitary_for_long_steps(backend, dtype, rng, t, cayley):
    """Any finite t, the largest float64 included: t = 1.8e308 overflowed the
    cores of a 32-bit W (whose panels take no scale, so t went unclamped)
    and returned NaN."""
    W = haar(rng, N, dtype)
    a, b = random_matrix(rng, (2, N, 2), dtype)
    transport = ul.cayley_transport if cayley else ul.exp_transport
    V = backend.to_numpy(transport(*(backend.asarray(x) for x in (W, a, b)), t=t))
    assert np.all(np.isfinite(V))
    assert np.all(unitarity(V) <= tol(dtype, 1))


def test_real_input_gives_real_orthogonal_output(backend, rng):
    dtype = "float64" if backend.has_float64 else "float32"
    W = haar(rng, N, dtype)
    a, b = random_matrix(rng, (2, N, 2), dtype)
    V = ul.exp_transport(*(backend.asarray(x) for x in (W, a, b)), t=0.7)
    assert_same_kind(backend, V, backend.asarray(W))
    np.testing.assert_allclose(backend.to_numpy(V), reference_transport(W, a, b, 0.7).real, atol=tol(dtype, 10))


def test_zero_direction_and_zero_time_return_w_exactly(backend, dtype, rng):
    W = haar(rng, N, dtype)
    a = random_matrix(rng, (N, 2), dtype)
    zero = np.zeros_like(a)
    for args, t in (((W, zero, a), 1.0), ((W, a, zero), 1.0), ((W, a, a), 3.0), ((W, a, 2 * a), 0.0)):
        V = backend.to_numpy(ul.exp_transport(*(backend.asarray(x) for x in args), t=t))
        # a b^H - b a^H vanishes for b parallel to a with a real factor
        np.testing.assert_allclose(V, W, atol=tol(dtype, 1), rtol=0)
    V = backend.to_numpy(ul.exp_transport(*(backend.asarray(x) for x in (W, zero, a))))
    np.testing.assert_array_equal(V, W)
    # factors without columns: X = 0, and their batch axes broadcast
    empty = np.zeros((2, N, 0), dtype)
    for transport in (ul.exp_transport, ul.cayley_transport):
        V = transport(backend.asarray(W), backend.asarray(empty), backend.asarray(empty), t=0.5)
        assert_same_kind(backend, V, backend.asarray(W))
        np.testing.assert_array_equal(backend.to_numpy(V), np.broadcast_to(W, (2, N, N)))
    V = ul.project_unitary_lowrank(backend.asarray(W), backend.asarray(empty[0]), backend.asarray(empty[0]))
    np.testing.assert_array_equal(backend.to_numpy(V), W)


def test_tiny_step_not_lost_to_cancellation(rng):
    """exp(-i lam) - 1 computed as -2 sin^2(lam/2) - i sin(lam): at t = 1e-10 the
    step V - W agrees with t X W to ~1e-10 relative."""
    W = haar(rng, N, "complex128")
    a, b = random_matrix(rng, (2, N, 2), "complex128")
    t = 1e-10
    step = ul.exp_transport(W, a, b, t=t) - W
    first_order = t * (a @ mH(b) - b @ mH(a)) @ W
    assert np.linalg.norm(step - first_order) <= 1e-6 * np.linalg.norm(first_order)


def test_broadcasts_batch_axes(rng):
    W = haar(rng, N, "complex128", (4, 1))
    a, b = random_matrix(rng, (2, 3, N, 1), "complex128")
    V = ul.exp_transport(W, a, b, t=0.5)
    assert V.shape == (4, 3, N, N)
    np.testing.assert_allclose(V, reference_transport(W, a, b, 0.5), atol=1e-13)


def test_errors(backend, rng):
    W = haar(rng, N, "float32")
    a = random_matrix(rng, (N, 2), "float32")
    W_, a_ = backend.asarray(W), backend.asarray(a)
    with pytest.raises(ValueError, match=r"t must be finite, got nan"):
        ul.exp_transport(W_, a_, a_, t=float("nan"))
    with pytest.raises(TypeError, match=r"t must be a real number, got complex: 1j"):
        ul.exp_transport(W_, a_, a_, t=1j)
    with pytest.raises(TypeError, match=r"t must be a real number, got str: '1'"):
        ul.exp_transport(W_, a_, a_, t="1")
    with pytest.raises(ValueError, match=r"a must have shape \(..., 16, k\) to match W of shape \(16, 16\), got shape \(2, 16\)"):
        ul.exp_transport(W_, backend.asarray(a.T), a_)
    bad = a.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"b contains NaN or Inf: 1 non-finite entry"):
        ul.exp_transport(W_, a_, backend.asarray(bad))
    with pytest.raises(TypeError, match=r"W has dtype .*int.*; expected one of float32"):
        ul.exp_transport(backend.asarray(np.eye(N, dtype=np.int64)), a_, a_)
