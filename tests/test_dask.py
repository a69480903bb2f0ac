"""Dask arrays, chunked by rows, through the public functions: the same
results as NumPy's from the same seeds, as Dask arrays. The kernels reach
the host through ``_host.to_host`` (a Dask array has no DLPack interface)
and never call ``linalg.qr`` of a thin panel, which Dask allows only with
one column chunk."""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
pytest.importorskip("scipy")  # Dask's linalg.cholesky

import unitary_lr as ul  # noqa: E402
from unitary_lr.optim import ProjUNN  # noqa: E402


def chunked(x):
    """x chunked by rows, and a stack matrix by matrix."""
    return da.from_array(x, chunks=(*(1,) * (x.ndim - 2), 16, x.shape[-1]))


def _inputs(dtype, n, m, batch=()):
    """W (orthonormal columns), a Gaussian G, and A = W diag(0.5^j) V^H of
    a decaying spectrum, whose top triplets a sketch holds to rounding."""
    rng = np.random.default_rng(7)
    W = ul.random_unitary(n, m, dtype=dtype, rng=3, batch_shape=batch)
    G = rng.standard_normal((*batch, n, m))
    if dtype.startswith("complex"):
        G = G + 1j * rng.standard_normal((*batch, n, m))
    V = ul.random_unitary(m, dtype=dtype, rng=4, batch_shape=batch)
    A = (W * 0.5 ** np.arange(m)) @ np.conj(np.swapaxes(V, -1, -2))
    return W, G.astype(dtype), A.astype(dtype)


def _svd_product(result):
    """(S, U diag(S) Vh): what a truncated SVD determines."""
    U, S, Vh = result
    return S, (U * S[..., None, :]) @ Vh


CALLS = {
    "tangent, rank 1": lambda W, G, A: ul.projunn_step(W, G, lr=0.1, rng=2),
    "direct, rank 8": lambda W, G, A: ul.projunn_step(W, G, lr=0.1, rank=8, variant="direct", rng=2),
    "cayley, rank 2": lambda W, G, A: ul.projunn_step(W, G, lr=0.1, rank=2, variant="cayley", rng=2),
    "exp_transport": lambda W, G, A: ul.exp_transport(W, G[..., :2], G[..., 2:4], t=0.1),
    "randomized_svd, Gram route": lambda W, G, A: ul.randomized_svd(A, 3, rng=1),
    # rank 1 asked for rank 3: the other two pairs span a null space, any basis of it
    "randomized_svd, QR route": lambda W, G, A: _svd_product(ul.randomized_svd(G[..., :1] * G[..., :1, :], 3, rng=1)),
    "unitarity_error": lambda W, G, A: ul.unitarity_error(W),
    "project_unitary": lambda W, G, A: ul.project_unitary(W + 0.1 * G),
    "project_unitary_lowrank": lambda W, G, A: ul.project_unitary_lowrank(
        W, G[..., :2], 0.1 * np.swapaxes(W[..., :2, :], -1, -2).conj()),
    "householder_apply": lambda W, G, A: ul.householder_apply(G[..., :3], W),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize(("dtype", "shape"), [("float64", (48, 48)), ("complex128", (48, 20)), ("float32", (40, 40)),
                                               ("float64", (2, 24, 24)), ("complex128", (2, 32, 12))])
def test_dask_gives_numpys_results(name, dtype, shape):
    """A matrix chunked by rows, and a stack of two: Dask's QR and SVD take a
    2-D array only, and a stack's QR route of ``randomized_svd``, its
    ``project_unitary`` and ``random_unitary`` failed ("Array must be 2D")."""
    arrays = _inputs(dtype, *shape[-2:], batch=shape[:-2])
    got = CALLS[name](*map(chunked, arrays))
    want = CALLS[name](*arrays)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert isinstance(g, da.Array)
        scale = 300 * np.finfo(np.dtype(dtype)).eps * max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(np.asarray(g), w, atol=scale, rtol=0)


def test_the_framework_free_optimizer_steps_dask_arrays():
    W, G, _ = _inputs("float32", 40, 40)
    results = []
    for wrap in (chunked, lambda x: x):
        opt = ProjUNN(lr=0.01, base="rmsprop", rank=1, seed=0)
        w = wrap(W)
        for _ in range(3):
            w = opt.step(w, wrap(G))
        results.append(w)
    assert isinstance(results[0], da.Array)
    np.testing.assert_allclose(np.asarray(results[0]), results[1], atol=1e-5, rtol=0)
    assert float(ul.unitarity_error(results[0])) < 1e-5


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize(("dtype", "shape"), [("float64", (24, 24)), ("complex128", (24, 10)), ("float32", (10, 24))])
def test_random_unitary_on_dask_is_numpys(dtype, shape, batch):
    """``random_unitary(..., xp=dask.array)``: a Dask array with NumPy's
    values from the same seed (its QR is of a square or thin matrix in one
    chunk, which Dask takes; a stack's matrix by matrix), orthonormal to
    rounding."""
    got = ul.random_unitary(*shape, dtype=dtype, rng=5, xp=da, batch_shape=batch)
    want = ul.random_unitary(*shape, dtype=dtype, rng=5, batch_shape=batch)
    assert isinstance(got, da.Array) and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), want, atol=100 * np.finfo(np.dtype(dtype)).eps, rtol=0)
    assert np.all(np.asarray(ul.unitarity_error(got)) < 100 * np.finfo(np.dtype(dtype)).eps)


@pytest.mark.parametrize("reproject", ["svd", "newton_schulz"])
@pytest.mark.parametrize(("dtype", "shape"), [("float64", (32, 32)), ("complex128", (32, 12)), ("float64", (12, 32)),
                                               ("float64", (2, 16, 16))])
def test_drift_control_reprojects_a_dask_array(reproject, dtype, shape):
    """A matrix made float64 from float32 (2e-7 off the group) is re-projected
    at its first step. The sum of a row-chunked W and its update is chunked
    along both axes, which Dask's SVD refuses ("Array must be chunked in one
    dimension only"): the default drift control failed on every Dask W it
    had to re-project. NumPy's result, orthonormal to rounding."""
    W = ul.random_unitary(*shape[-2:], dtype="complex64" if dtype.startswith("complex") else "float32", rng=0,
                          batch_shape=shape[:-2])
    W = W.astype(dtype)
    G = _inputs(dtype, *shape[-2:], batch=shape[:-2])[1]
    results = [ProjUNN(1e-2, seed=0, reproject=reproject).step(wrap(W), wrap(G)) for wrap in (chunked, np.asarray)]
    assert isinstance(results[0], da.Array)
    np.testing.assert_allclose(np.asarray(results[0]), results[1], atol=1e-13, rtol=0)
    assert np.all(np.asarray(ul.unitarity_error(results[0])) < 1e-14) and np.all(ul.unitarity_error(W) > 1e-14)


def test_a_batch_of_dask_matrices_steps_as_numpys():
    """A (2, n, n) Dask W chunked by matrix and rows: the panels' Cholesky
    basis inverted its factor with Dask's inv, which takes 2-D arrays only
    ("Dimension must be 2 to perform lu decomposition")."""
    W = ul.random_unitary(16, dtype="float64", batch_shape=(2,), rng=0)
    G = np.random.default_rng(1).standard_normal((2, 16, 16))
    got = ProjUNN(1e-2, rank=2, seed=0).step(da.from_array(W, chunks=(1, 8, 16)), da.from_array(G, chunks=(1, 8, 16)))
    want = ProjUNN(1e-2, rank=2, seed=0).step(W, G)
    assert isinstance(got, da.Array)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-14, rtol=0)


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize(("dtype", "shape"), [("float32", (0, 8, 8)), ("complex128", (0, 8, 8)),
                                               ("float64", (0, 12, 8)), ("complex64", (3, 0, 8, 8))])
def test_an_empty_batch_computes_numpys_empty_result(name, dtype, shape):
    """A stack of no matrices: the computed Dask arrays have the shapes of
    NumPy's results. Before, a complex or rectangular one failed to flatten
    for its host transfer (Dask reshapes only by merging whole chunks), and
    Dask's ``max`` of an empty stack computed another shape than it announced
    (``randomized_svd``'s U came out (0, m, 0); ``householder_apply`` failed
    in the compute, far from the call)."""
    arrays = [np.zeros(shape, dtype) for _ in range(3)]
    want = CALLS[name](*arrays)
    got = CALLS[name](*(da.from_array(x) for x in arrays))
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert isinstance(g, da.Array) and g.shape == w.shape
        computed = np.asarray(g)
        assert computed.shape == w.shape and computed.dtype == w.dtype
