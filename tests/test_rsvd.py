import numpy as np
import pytest
from _helpers import assert_same_kind, is_complex, mH, random_matrix, tol

import unitary_lr as ul


def low_rank(rng, m, n, k, dtype, batch=()):
    return (random_matrix(rng, (*batch, m, k), dtype) @ random_matrix(rng, (*batch, k, n), dtype)).astype(dtype)


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_recovers_exactly_low_rank_matrix(backend, dtype, rng, k, batch):
    A = low_rank(rng, 30, 24, k, dtype, batch)
    U, S, Vh = ul.randomized_svd(backend.asarray(A), k, rng=rng)
    for x, shape in ((U, (*batch, 30, k)), (S, (*batch, k)), (Vh, (*batch, k, 24))):
        assert tuple(x.shape) == shape
    assert_same_kind(backend, U, backend.asarray(A))
    assert_same_kind(backend, S, backend.asarray(A), dtype={"complex64": "float32", "complex128": "float64"}.get(dtype, dtype))
    U, S, Vh = (backend.to_numpy(x).astype(np.complex128) for x in (U, S, Vh))
    reference = np.linalg.svd(A.astype(np.complex128), compute_uv=False)[..., :k]
    scale = reference[..., :1]
    np.testing.assert_allclose(S.real, reference, atol=float(tol(dtype, 10)) * scale.max())
    np.testing.assert_allclose((U * S[..., None, :]) @ Vh, A, atol=tol(dtype, 10) * scale.max())
    np.testing.assert_allclose(mH(U) @ U, np.broadcast_to(np.eye(k), (*batch, k, k)), atol=tol(dtype))
    np.testing.assert_allclose(Vh @ mH(Vh), np.broadcast_to(np.eye(k), (*batch, k, k)), atol=tol(dtype))
    assert np.all(np.diff(S.real, axis=-1) <= tol(dtype) * scale)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_decaying_spectrum_within_1_1_of_optimal(backend, dtype, rng, k):
    """Halko et al.'s bound in practice: with the default oversampling and power
    iterations the rank-k error is within 1.1x of the best possible."""
    m, n = 60, 50
    s = 0.6 ** np.arange(n)
    U0 = np.linalg.qr(random_matrix(rng, (m, n), "complex128" if is_complex(dtype) else "float64"))[0]
    V0 = np.linalg.qr(random_matrix(rng, (n, n), "complex128" if is_complex(dtype) else "float64"))[0]
    A = ((U0 * s) @ mH(V0)).astype(dtype)
    s = np.linalg.svd(A.astype(np.complex128), compute_uv=False)
    U, S, Vh = (backend.to_numpy(x) for x in ul.randomized_svd(backend.asarray(A), k, rng=rng))
    residual = A.astype(np.complex128) - (U * S) @ Vh
    floor = 50 * np.sqrt(m) * eps_of(dtype)  # below this the comparison is rounding
    assert np.linalg.norm(residual, 2) <= 1.1 * s[k] + floor
    assert np.linalg.norm(residual) <= 1.1 * np.sqrt(np.sum(s[k:] ** 2)) + floor


def eps_of(dtype):
    return np.finfo(np.dtype(dtype)).eps


def test_complex_input_is_not_treated_as_real(rng):
    """A complex matrix whose real and imaginary parts have different ranges:
    a sketch that drops the imaginary part (or conjugates the wrong factor)
    gets the singular values wrong."""
    n = 40
    A = np.outer(random_matrix(rng, n, "complex128"), random_matrix(rng, n, "complex128"))
    A += 1j * np.outer(rng.standard_normal(n), rng.standard_normal(n))
    U, S, Vh = ul.randomized_svd(A, 2, rng=rng)
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:2], rtol=1e-12)
    np.testing.assert_allclose((U * S) @ Vh, A, atol=1e-12 * np.abs(A).max())


def test_same_seed_same_answer_on_every_backend(backend, dtype, rng):
    """The Gaussian test matrix is drawn on the host: the truncated SVD of a
    full-rank matrix (which depends on the draw) agrees with NumPy's."""
    A = random_matrix(rng, (2, 20, 16), dtype)
    here = ul.randomized_svd(backend.asarray(A), 3, oversample=1, power_iters=0, rng=7)
    there = ul.randomized_svd(A, 3, oversample=1, power_iters=0, rng=7)
    approx_here = (backend.to_numpy(here.U) * backend.to_numpy(here.S)[..., None, :]) @ backend.to_numpy(here.Vh)
    approx_there = (there.U * there.S[..., None, :]) @ there.Vh
    np.testing.assert_allclose(approx_here, approx_there, atol=tol(dtype, 10))
    other_seed = ul.randomized_svd(A, 3, oversample=1, power_iters=0, rng=8)
    assert not np.allclose((other_seed.U * other_seed.S[..., None, :]) @ other_seed.Vh, approx_there)


def test_zero_and_rank_deficient_matrices_give_no_nan(backend, dtype, rng):
    A = np.zeros((12, 9), dtype)
    U, S, Vh = (backend.to_numpy(x) for x in ul.randomized_svd(backend.asarray(A), 4, rng=rng))
    assert np.all(S == 0) and np.all(np.isfinite(U)) and np.all(np.isfinite(Vh))
    np.testing.assert_allclose(mH(U) @ U, np.eye(4), atol=tol(dtype))
    B = low_rank(rng, 12, 9, 1, dtype)
    U, S, Vh = (backend.to_numpy(x) for x in ul.randomized_svd(backend.asarray(B), 4, rng=rng))
    assert np.all(np.isfinite(U)) and np.all(S[1:] <= tol(dtype) * S[0])
    np.testing.assert_allclose((U * S) @ Vh, B, atol=tol(dtype, 10) * S[0])


@pytest.mark.parametrize("batch", [(0,), (2, 0)])
def test_an_empty_batch_gives_empty_factors(backend, dtype, rng, batch):
    """A batch of no matrices, as a batched caller may pass (the last, empty,
    group of a split): factors of no matrices, of the shapes, dtypes and
    device of a full batch's, as ``linalg.svd`` gives them (this raised
    NumPy's "zero-size array to reduction operation" before). A full batch
    afterwards still gives the right factors."""
    A = backend.asarray(np.zeros((*batch, 7, 5), dtype))
    U, S, Vh = ul.randomized_svd(A, 3, rng=rng)
    for x, shape in ((U, (*batch, 7, 3)), (S, (*batch, 3)), (Vh, (*batch, 3, 5))):
        assert tuple(x.shape) == shape
    assert_same_kind(backend, U, A)
    assert_same_kind(backend, Vh, A)
    assert_same_kind(backend, S, A, dtype={"complex64": "float32", "complex128": "float64"}.get(dtype, dtype))
    B = low_rank(rng, 7, 5, 2, dtype, (2,))
    U, S, Vh = (backend.to_numpy(x) for x in ul.randomized_svd(backend.asarray(B), 2, rng=rng))
    np.testing.assert_allclose((U * S[..., None, :]) @ Vh, B, atol=tol(dtype, 10) * float(np.abs(S).max()))


def test_under_jax_jit_a_clear_type_error_names_a(rng):
    """The call draws on the host and reads small Grams there: under jax.jit
    it names A and says so (JAX's own TracerArrayConversionError named
    neither); eager JAX arrays still work."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    A = jnp.asarray(low_rank(rng, 12, 9, 2, "float64"))
    with pytest.raises(TypeError, match=r"^A is a JAX tracer: randomized_svd does not run under jax.jit .* host .* "
                                        r"outside the transformation"):
        jax.jit(lambda A: ul.randomized_svd(A, 2, rng=0))(A)
    U, S, Vh = ul.randomized_svd(A, 2, rng=0)
    np.testing.assert_allclose(np.asarray(S), np.linalg.svd(np.asarray(A), compute_uv=False)[:2], rtol=1e-12)


def test_matrices_of_tiny_and_huge_entries_give_orthonormal_factors(backend, dtype, rng):
    """A of entries near the dtype's smallest normal number (and below it)
    or near its largest: the Gram route's coefficient of V, ``F_u / S``,
    reached 1e40 for a float32 A of 1e-40, Inf in float32, and Vh came back
    NaN with only a RuntimeWarning; the panels' columns are now balanced by
    powers of two. XLA's CPU code flushes subnormal numbers: there A is 0."""
    real = "float32" if dtype in ("float32", "complex64") else "float64"
    if real == "float64" and not backend.has_float64:
        dtype, real = {"float64": "float32", "complex128": "complex64"}[dtype], "float32"
    tiny = {"float32": [1e-40, 1e-37], "float64": [1e-310, 1e-300]}[real]
    huge = {"float32": [1e36], "float64": [1e300]}[real]
    X = random_matrix(rng, (12, 9), dtype).astype(np.complex128 if is_complex(dtype) else np.float64)
    for scale in tiny + huge:
        A = (X * scale).astype(dtype)
        U, S, Vh = (backend.to_numpy(x) for x in ul.randomized_svd(backend.asarray(A), 3, rng=0))
        assert np.all(np.isfinite(U)) and np.all(np.isfinite(S)) and np.all(np.isfinite(Vh)), scale
        reference = np.linalg.svd(A.astype(np.complex128), compute_uv=False)[:3]
        if backend.name.startswith("jax") and reference[0] < np.finfo(real).tiny:
            assert np.all(S == 0)  # flushed to zero: the SVD of 0
            continue
        np.testing.assert_allclose(mH(U) @ U, np.eye(3), atol=tol(dtype, 10))
        np.testing.assert_allclose(Vh @ mH(Vh), np.eye(3), atol=tol(dtype, 10))
        # subnormal singular values carry fewer digits: to a few ulps of the smallest normal number
        np.testing.assert_allclose(S, reference, rtol=tol(dtype, 10), atol=8 * np.finfo(real).tiny)


def test_full_rank_request_is_exact(rng):
    A = random_matrix(rng, (7, 5), "float64")
    U, S, Vh = ul.randomized_svd(A, 5, oversample=0, power_iters=0, rng=rng)
    np.testing.assert_allclose((U * S) @ Vh, A, atol=1e-13)


def test_rng_reproducible_and_generator_advances(rng):
    A = random_matrix(rng, (15, 15), "float64")
    first = ul.randomized_svd(A, 2, oversample=0, power_iters=0, rng=3)
    again = ul.randomized_svd(A, 2, oversample=0, power_iters=0, rng=3)
    np.testing.assert_array_equal(first.S, again.S)
    gen = np.random.default_rng(3)
    one = ul.randomized_svd(A, 2, oversample=0, power_iters=0, rng=gen)
    two = ul.randomized_svd(A, 2, oversample=0, power_iters=0, rng=gen)
    np.testing.assert_array_equal(one.S, first.S)
    assert not np.array_equal(one.S, two.S)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
        ({"rank": 7}, ValueError, r"rank must be <= 6 = min\(m, n\) for A of shape \(6, 9\), got 7"),
        ({"rank": 2.5}, TypeError, r"rank must be an integer, got float: 2.5"),
        ({"rank": True}, TypeError, r"rank must be an integer, got bool"),
        ({"rank": 2, "oversample": -1}, ValueError, r"oversample must be >= 0, got -1"),
        ({"rank": 2, "power_iters": -2}, ValueError, r"power_iters must be >= 0, got -2"),
        ({"rank": 2, "rng": "seed"}, TypeError, r"rng must be None, an int seed or a numpy.random.Generator"),
        ({"rank": 2, "rng": -5}, ValueError, r"rng seed must be >= 0, got -5"),
    ],
)
def test_bad_arguments(rng, kwargs, error, match):
    A = random_matrix(rng, (6, 9), "float64")
    with pytest.raises(error, match=match):
        ul.randomized_svd(A, **kwargs)


def test_bad_arrays(backend, rng):
    A = random_matrix(rng, (6, 9), "float32")
    with pytest.raises(ValueError, match=r"A must have shape \(..., m, n\), got shape \(9,\)"):
        ul.randomized_svd(backend.asarray(A[0]), 1)
    with pytest.raises(TypeError, match=r"A has dtype .*int.*; expected one of float32, float64"):
        ul.randomized_svd(backend.asarray(np.ones((4, 4), dtype=np.int32)), 1)
    with pytest.raises(TypeError, match=r"A must be an array .* got list"):
        ul.randomized_svd([[1.0, 2.0]], 1)
    bad = A.copy()
    bad[2, 3] = np.nan
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"A contains NaN or Inf \(detected in its sketch\): 2 non-finite entries in an array of shape \(6, 9\)"):
        ul.randomized_svd(backend.asarray(bad), 2, rng=0)
    huge = np.full((6, 9), np.finfo(np.float32).max / 2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"A is too large for its dtype: its sketch overflows \(largest \|entry\| 1.7e\+38"):
        ul.randomized_svd(backend.asarray(huge), 2, rng=0)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_same_seed_gives_the_same_factors_on_every_backend(backend, dtype, rng, batch):
    """The factors themselves, not only their product: each backend's LAPACK
    picks its own signs (torch and NumPy used to disagree on 49 of 50 columns),
    so the phases are made canonical: the largest |entry| of each column of U
    is real and positive."""
    m, n, k = 70, 50, 6
    real = "complex128" if is_complex(dtype) else "float64"
    U0 = np.linalg.qr(random_matrix(rng, (*batch, m, n), real))[0]
    V0 = np.linalg.qr(random_matrix(rng, (*batch, n, n), real))[0]
    A = ((U0 * 0.7 ** np.arange(n)) @ mH(V0)).astype(dtype)  # well separated: unique vectors
    reference = ul.randomized_svd(A, k, rng=11)
    result = ul.randomized_svd(backend.asarray(A), k, rng=11)
    U = backend.to_numpy(result.U)
    for got, want in zip((backend.to_numpy(x) for x in result), reference):
        np.testing.assert_allclose(got, want, atol=tol(dtype, 30))
    top = np.take_along_axis(U, np.argmax(np.abs(U), axis=-2)[..., None, :], axis=-2)
    assert np.all(top.real > 0) and np.all(np.abs(top.imag) <= tol(dtype) * np.abs(top))


def test_tied_largest_entries_give_the_same_factors_on_every_backend(backend, dtype):
    """A left singular vector (1, -1, 0, ...) / sqrt(2): its two largest
    entries are equal only to rounding, which each backend broke its own
    way, and the column's sign with it (NumPy against JAX: 8 of 20 seeds).
    The first entry within sqrt(eps) of the largest decides now."""
    real = "complex128" if is_complex(dtype) else "float64"
    rng = np.random.default_rng(1)
    u = np.array([1.0, -1, 0, 0, 0, 0]) / np.sqrt(2)
    U0 = np.linalg.qr(np.c_[u, rng.standard_normal((6, 5))])[0]
    U0[:, 0] = u
    V0 = np.linalg.qr(random_matrix(rng, (5, 5), real))[0]
    A = ((U0[:, :5] * np.array([5.0, 3, 2, 1, 0.5])) @ mH(V0)).astype(dtype)
    for seed in range(12):
        reference = ul.randomized_svd(A, 2, rng=seed)
        result = ul.randomized_svd(backend.asarray(A), 2, rng=seed)
        np.testing.assert_allclose(backend.to_numpy(result.U), reference.U, atol=tol(dtype, 30))
        np.testing.assert_allclose(backend.to_numpy(result.Vh), reference.Vh, atol=tol(dtype, 30))
        first = reference.U[0, 0]  # the first of the tied pair, made real and positive
        assert first.real > 0 and abs(first.imag) <= tol(dtype) and abs(abs(first) - 2**-0.5) < tol(dtype, 30)


def _with_spectrum(rng, m, n, s, dtype, batch=()):
    real = "complex128" if is_complex(dtype) else "float64"
    U0 = np.linalg.qr(random_matrix(rng, (*batch, m, len(s)), real))[0]
    V0 = np.linalg.qr(random_matrix(rng, (*batch, n, len(s)), real))[0]
    return ((U0 * s) @ mH(V0)).astype(dtype)


# Spectra for both routes of randomized_svd: the Gram route (one host round
# trip, no device QR or SVD) where the Grams resolve the kept singular values
# to A's precision, the QR route elsewhere (a float64 spread beyond 16, a
# singular value at rounding level, fewer directions than the rank).
SPECTRA = {
    "decay 0.3": 0.3 ** np.arange(30),
    "spread 1e3": np.r_[1.0, 0.3, 1e-3, 1e-4 * 0.5 ** np.arange(27)],
    "tiny 1e-6": np.r_[1.0, 0.5, 1e-6, 1e-9 * 0.5 ** np.arange(27)],
    "rank 3": np.r_[3.0, 2.0, 1.0, np.zeros(27)],
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", [(40, 34), (2, 30, 36)])
def test_factors_match_the_float64_svd_on_either_route(backend, dtype, rng, spectrum, k, shape):
    """U, S and Vh against NumPy's float64 SVD of the same (rounded) matrix,
    whichever route the host picks: S to A's precision relative to S_1,
    orthonormal columns, and the rank-k part ``U S Vh`` (unique: S_k > S_k+1)
    to A's precision times S_k / (S_k - S_k+1), Wedin's bound. The spectra
    fall off fast enough beyond k for the sketch (p = 10, q = 2) to hold the
    top k directions to rounding."""
    *batch, m, n = shape
    A = _with_spectrum(rng, m, n, SPECTRA[spectrum], dtype, tuple(batch))
    U, S, Vh = (backend.to_numpy(x).astype(np.complex128) for x in ul.randomized_svd(backend.asarray(A), k, rng=rng))
    ref_U, ref_S, ref_Vh = np.linalg.svd(A.astype(np.complex128), full_matrices=False)
    top = ref_S[..., 0]
    np.testing.assert_allclose(S.real / top[..., None], ref_S[..., :k] / top[..., None], atol=tol(dtype), rtol=0)
    np.testing.assert_allclose(mH(U) @ U, np.broadcast_to(np.eye(k), (*batch, k, k)), atol=tol(dtype))
    np.testing.assert_allclose(Vh @ mH(Vh), np.broadcast_to(np.eye(k), (*batch, k, k)), atol=tol(dtype))
    want = (ref_U[..., :k] * ref_S[..., None, :k]) @ ref_Vh[..., :k, :]
    error = np.abs((U * S[..., None, :]) @ Vh - want).max(axis=(-2, -1)) / top
    wedin = ref_S[..., k - 1] / (ref_S[..., k - 1] - ref_S[..., k])
    assert np.all(error <= tol(dtype) * wedin), (error, wedin)


def _routes(A, k):
    """The linear algebra randomized_svd ran on the torch tensor A, and its
    counts: (device factorizations, aten operations, scalar reads, transfers)."""
    torch = pytest.importorskip("torch")
    from _aten import AtenOps
    from unitary_lr import _host

    before = _host.transfers.count
    with AtenOps() as ops:
        ul.randomized_svd(torch.as_tensor(A), k, rng=0)
    factorizations = sorted({name for name in ops.launching if any(f in name for f in ("qr", "svd", "eig"))})
    return factorizations, len(ops.launching), ops.scalar_reads, _host.transfers.count - before


@pytest.mark.usefixtures("torch_operations")  # PyTorch's own operations, as on a GPU
@pytest.mark.parametrize("dtype", ["float32", "complex64", "float64", "complex128"])
@pytest.mark.parametrize("k", [1, 8])
def test_the_gram_route_runs_no_device_qr_or_svd_and_reads_back_once(dtype, k):
    """Design section 6 for the randomized SVD: no QR or SVD of an n x l
    panel on the device (on a GPU each is a solver call with its own waits),
    the power iteration's bases from shifted Cholesky factors, and one
    device-to-host transfer (the two Grams) with no other read of a device
    value, where the old code made 5 QRs, an SVD and two flag reads (the
    default p = 10, q = 2). A spectrum within 16 of flat at rank 8 takes this
    route in every precision. Operations (measured 63-92): six products, five
    re-bases of 7-9 operations, the factors, the canonical phases (about 16),
    and Newton-Schulz steps of 7 each where the Grams leave V short of
    orthonormal (float64, rank 8: two)."""
    rng = np.random.default_rng(3)
    A = _with_spectrum(rng, 96, 80, np.r_[np.linspace(1.0, 0.5, 8), 1e-3 * np.ones(32)], dtype)
    factorizations, operations, reads, transfers = _routes(A, k)
    assert factorizations == []
    assert (reads, transfers) == (0, 1)
    assert operations <= 96, operations


@pytest.mark.usefixtures("torch_operations")  # PyTorch's own operations, as on a GPU
@pytest.mark.parametrize(("dtype", "spectrum", "k"), [("float64", "spread 1e3", 3), ("complex128", "tiny 1e-6", 3),
                                                      ("float32", "rank 3", 8), ("float64", "zero", 2)])
def test_the_qr_route_where_the_grams_would_lose_digits(dtype, spectrum, k):
    """Where the Grams cannot resolve the kept singular values to A's
    precision (float64 with S_1 / S_k = 1e3; S_k at 1e-6 in float64) or the
    sketch has fewer than k directions (rank 3 asked for rank 8, A = 0), the
    host sends the call on to a QR of the sketch and an SVD of B: the factors
    stay accurate (the test above) and orthonormal."""
    s = np.zeros(30) if spectrum == "zero" else SPECTRA[spectrum]
    A = _with_spectrum(np.random.default_rng(4), 50, 40, s, dtype)
    factorizations, _, reads, transfers = _routes(A, k)
    assert factorizations == ["aten._linalg_svd.default", "aten.linalg_qr.default"]
    assert transfers == 1 and reads == 1  # the Grams, then the flag of B's finiteness
