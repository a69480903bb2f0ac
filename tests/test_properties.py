"""Property-based tests: random shapes, ranks, batch axes, dtypes and update
sizes (hypothesis), against SciPy on NumPy arrays."""

import numpy as np
import scipy.linalg
from _helpers import haar, mH, tol, unitarity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unitary_lr as ul

dtypes = st.sampled_from(["float32", "float64", "complex64", "complex128"])
batches = st.sampled_from([(), (1,), (2,), (2, 1)])


def gaussian(seed, shape, dtype, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if dtype.startswith("complex"):
        x = x + 1j * rng.standard_normal(shape)
    return (scale * x).astype(dtype)


def wide(x):
    return x.astype(np.complex128)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(n=st.integers(1, 12), k=st.integers(1, 14), dtype=dtypes, batch=batches,
       log_scale=st.floats(-6, 8), seed=st.integers(0, 2**32 - 1))
def test_lowrank_polar_is_a_polar_factor(n, k, dtype, batch, log_scale, seed):
    W = haar(np.random.default_rng(seed), n, dtype, batch)
    a = gaussian(seed + 1, (*batch, n, k), dtype, 10.0**log_scale)
    b = gaussian(seed + 2, (*batch, n, k), dtype)
    P = ul.project_unitary_lowrank(W, a, b)
    assert P.shape == W.shape and P.dtype == W.dtype
    assert np.all(unitarity(P) <= tol(dtype, 2))
    M = wide(W) + wide(a) @ mH(wide(b))
    H = mH(wide(P)) @ M
    size = np.linalg.norm(M, 2, axis=(-2, -1)).max()
    np.testing.assert_allclose(H, mH(H), atol=tol(dtype, 10 * n) * size)
    assert np.all(np.linalg.eigvalsh((H + mH(H)) / 2) >= -tol(dtype, 10 * n) * size)


@SETTINGS
@given(n=st.integers(1, 12), k=st.integers(1, 8), dtype=dtypes, batch=batches,
       t=st.floats(-100, 100), seed=st.integers(0, 2**32 - 1))
def test_exp_transport_matches_expm(n, k, dtype, batch, t, seed):
    W = haar(np.random.default_rng(seed), n, dtype, batch)
    a = gaussian(seed + 1, (*batch, n, k), dtype, 1 / np.sqrt(n * k))
    b = gaussian(seed + 2, (*batch, n, k), dtype)
    V = ul.exp_transport(W, a, b, t=t)
    assert V.shape == W.shape and V.dtype == W.dtype
    assert np.all(unitarity(V) <= tol(dtype, 2))
    X = wide(a) @ mH(wide(b)) - wide(b) @ mH(wide(a))
    for index in np.ndindex(*batch):
        expected = scipy.linalg.expm(t * X[index]) @ wide(W[index])
        # the eigenvalue phases carry an absolute error of eps * |t X|
        atol = tol(dtype, 10) * max(1.0, abs(t) * np.linalg.norm(X[index], 2))
        np.testing.assert_allclose(V[index], expected, atol=atol)


@SETTINGS
@given(m=st.integers(1, 20), n=st.integers(1, 20), dtype=dtypes, batch=batches,
       data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_randomized_svd_shapes_and_exactness(m, n, dtype, batch, data, seed):
    rank = data.draw(st.integers(1, min(m, n)))
    A = gaussian(seed, (*batch, m, n), dtype)
    U, S, Vh = ul.randomized_svd(A, rank, oversample=min(m, n), power_iters=1, rng=seed)
    assert U.shape == (*batch, m, rank) and S.shape == (*batch, rank) and Vh.shape == (*batch, rank, n)
    # a sketch as wide as the matrix is exact
    reference = np.linalg.svd(wide(A), compute_uv=False)[..., :rank]
    np.testing.assert_allclose(S, reference, atol=tol(dtype, 10) * max(1.0, reference.max()))


@SETTINGS
@given(n=st.integers(2, 12), rank=st.integers(1, 4), variant=st.sampled_from(["tangent", "direct"]),
       dtype=dtypes, log_lr=st.floats(-8, 4), seed=st.integers(0, 2**32 - 1))
def test_step_is_unitary_and_finite(n, rank, variant, dtype, log_lr, seed):
    rank = min(rank, n)
    W = haar(np.random.default_rng(seed), n, dtype)
    G = gaussian(seed + 1, (n, n), dtype)
    V = ul.projunn_step(W, G, lr=10.0**log_lr, rank=rank, variant=variant, rng=seed)
    assert np.all(np.isfinite(V))
    assert unitarity(V) <= tol(dtype, 2)
