import numpy as np
import pytest
import scipy.linalg
from _helpers import assert_same_kind, eps, haar, is_complex, mH, random_matrix, tol, unitarity

import unitary_lr as ul

N = 16


def loop(f, *arrays):
    """Apply a dense SciPy reference matrix by matrix over broadcast batch axes."""
    arrays = np.broadcast_arrays(*(x.astype(np.complex128) for x in arrays))
    shape = arrays[0].shape
    flat = [x.reshape(-1, *shape[-2:]) for x in arrays]
    return np.stack([f(*xs) for xs in zip(*flat)]).reshape(shape)


def reference_tangent(W, G, lr):
    """projUNN-T, the paper's Eq. 7: W expm(-lr/2 (W^H G - G^H W))."""
    return loop(lambda w, g: w @ scipy.linalg.expm(-lr / 2 * (mH(w) @ g - mH(g) @ w)), W, G)


def reference_direct(W, G, lr):
    """projUNN-D, Eq. 3: polar(W - lr G)."""
    return loop(lambda w, g: scipy.linalg.polar(w - lr * g)[0], W, G)


REFERENCES = {"tangent": reference_tangent, "direct": reference_direct}


def low_rank(rng, k, dtype, batch=()):
    a = random_matrix(rng, (*batch, N, k), dtype)
    b = random_matrix(rng, (*batch, N, k), dtype)
    return a, b, (a @ mH(b)).astype(dtype)


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_step_matches_dense_reference_for_rank_k_gradient(backend, dtype, rng, variant, k, batch):
    """A gradient of rank <= k is sketched exactly, so the step equals the dense
    SciPy formula."""
    W = haar(rng, N, dtype, batch)
    _, _, G = low_rank(rng, k, dtype, batch)
    lr = 0.05
    args = [backend.asarray(x) for x in (W, G)]
    before = [backend.to_numpy(x).copy() for x in args]
    V = ul.projunn_step(*args, lr=lr, rank=k, variant=variant, rng=rng)
    assert_same_kind(backend, V, args[0])
    for x, old in zip(args, before):
        np.testing.assert_array_equal(backend.to_numpy(x), old)
    V = backend.to_numpy(V)
    np.testing.assert_allclose(V, REFERENCES[variant](W, G, lr), atol=tol(dtype, 30))
    assert np.all(unitarity(V) <= tol(dtype, 1))


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_factor_gradient_with_few_columns_is_used_exactly(backend, dtype, rng, variant):
    W = haar(rng, N, dtype)
    a, b, G = low_rank(rng, 3, dtype)
    V = ul.projunn_step(backend.asarray(W), (backend.asarray(a), backend.asarray(b)), lr=0.1, rank=3, variant=variant)
    np.testing.assert_allclose(backend.to_numpy(V), REFERENCES[variant](W, G, 0.1), atol=tol(dtype, 30))


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_factor_gradient_is_sketched_like_the_dense_one(backend, dtype, rng, variant):
    """G = a b^H with more columns than the rank: the sketch runs on the factors
    and, with the same seed, gives the step of the dense G."""
    W = haar(rng, N, dtype, (2,))
    a, b, G = low_rank(rng, 6, dtype, (2,))
    kwargs = dict(lr=0.1, rank=2, variant=variant, rng=5)
    from_factors = ul.projunn_step(backend.asarray(W), (backend.asarray(a), backend.asarray(b)), **kwargs)
    dense = ul.projunn_step(W, G, **kwargs)
    np.testing.assert_allclose(backend.to_numpy(from_factors), dense, atol=tol(dtype, 30))


def test_variants_agree_to_first_order(rng):
    """Both steps are W - lr * tangent_project(W, G_k) + O(lr^2)."""
    W = haar(rng, N, "complex128")
    _, _, G = low_rank(rng, 2, "complex128")
    first_order = -np.asarray(ul.tangent_project(W, G))
    for lr in (1e-3, 1e-4):
        for variant in ("tangent", "direct"):
            step = ul.projunn_step(W, G, lr=lr, rank=2, variant=variant, rng=0) - W
            assert np.linalg.norm(step / lr - first_order) <= 10 * lr * np.linalg.norm(G) ** 2


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_thousand_steps_stay_unitary(backend, variant):
    """The issue's target: ||W^H W - I||_F / sqrt(n) < 1e-12 after 1,000
    consecutive float64 steps with full-rank gradients, no re-projection. A
    device without float64 runs the same in 32 bits, where rounding drifts as
    a random walk, ~sqrt(steps) * eps (measured 1.4e-6)."""
    rng = np.random.default_rng(11)
    complex_dtype, real_dtype, bound = ("complex128", "float64", 1e-12) if backend.has_float64 else ("complex64", "float32", 2e-5)
    dtype = complex_dtype if variant == "tangent" else real_dtype
    W = backend.asarray(haar(rng, N, dtype))
    gradients = random_matrix(rng, (1000, N, N), dtype)
    for G in gradients:
        W = ul.projunn_step(W, backend.asarray(G), lr=0.05, rank=2, variant=variant, rng=rng)
    assert unitarity(backend.to_numpy(W)) < bound


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_zero_gradient_returns_w_unchanged(backend, dtype, rng, variant):
    W = haar(rng, N, dtype, (2,))
    zero = np.zeros((2, N, N), dtype)
    V = ul.projunn_step(backend.asarray(W), backend.asarray(zero), lr=0.1, rank=2, variant=variant, rng=rng)
    np.testing.assert_array_equal(backend.to_numpy(V), W)
    factors = (backend.asarray(zero[..., :5]), backend.asarray(zero[..., :5]))
    V = ul.projunn_step(backend.asarray(W), factors, lr=0.1, rank=2, variant=variant, rng=rng)
    np.testing.assert_array_equal(backend.to_numpy(V), W)


@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_factors_without_columns_are_a_zero_gradient(backend, dtype, rng, variant):
    """An empty batch's ``delta x^H``: factors with no column are the zero
    gradient, W comes back as it is, and batch axes still broadcast."""
    W = haar(rng, N, dtype)
    empty = (backend.asarray(np.zeros((3, N, 0), dtype)), backend.asarray(np.zeros((N, 0), dtype)))
    V = ul.projunn_step(backend.asarray(W), empty, lr=0.1, rank=2, variant=variant, rng=rng)
    assert_same_kind(backend, V, backend.asarray(W))
    np.testing.assert_array_equal(backend.to_numpy(V), np.broadcast_to(W, (3, N, N)))
    L, Rh = ul.steps.projunn_update(backend.asarray(W), empty, lr=0.1, rank=2, variant=variant, rng=rng)
    assert tuple(L.shape[:-1]) == (3, N) and tuple(Rh.shape[-1:]) == (N,)
    np.testing.assert_array_equal(backend.to_numpy(L @ Rh), np.zeros((3, N, N)))
    with pytest.raises(ValueError, match=r"^G\[0\] and G\[1\] must have the same number of columns k"):
        ul.projunn_step(backend.asarray(W), (empty[1], backend.asarray(np.zeros((N, 1), dtype))), lr=0.1)


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_gradient_of_lower_rank_than_requested(backend, dtype, rng, variant):
    W = haar(rng, N, dtype)
    _, _, G = low_rank(rng, 1, dtype)
    V = backend.to_numpy(ul.projunn_step(backend.asarray(W), backend.asarray(G), lr=0.1, rank=4, variant=variant, rng=rng))
    assert np.all(np.isfinite(V))
    np.testing.assert_allclose(V, REFERENCES[variant](W, G, 0.1), atol=tol(dtype, 30))


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("shape", [(N, N), (N, N // 2), (N // 2, N)])
@pytest.mark.parametrize("dtype64", ["float64", "complex128"])
def test_a_sketch_far_wider_than_the_gradient_gives_the_exact_step(backend, rng, variant, shape, dtype64):
    """rank = min(n, m) - 1 along a rank-1 gradient: the sketch's columns
    beyond the gradient's rank are rounding, and dropping them from the step's
    basis too keeps the step exact to a few ulps (it was 4e-11 away at n = 32:
    their G^H Y, at rounding level, made the basis ill-conditioned)."""
    if not backend.has_float64:
        pytest.skip("float64 steps")
    n, m = shape
    W = ul.random_unitary(n, m, dtype=dtype64, rng=rng)
    a, b = random_matrix(rng, (n, 1), dtype64), random_matrix(rng, (m, 1), dtype64)
    G = a @ mH(b)
    tall_W, tall_G = (W, G) if n >= m else (mH(W), mH(G))  # a wide W's step is its conjugate transpose's
    if variant == "direct" or n == m:
        expected = REFERENCES[variant](tall_W, tall_G, 0.1)
    else:  # a tall W's geodesic: expm(-lr/2 (G W^H - W G^H)) W
        expected = scipy.linalg.expm(-0.05 * (tall_G @ mH(tall_W) - tall_W @ mH(tall_G))) @ tall_W
    expected = expected if n >= m else mH(expected)
    factors = (backend.asarray(a @ np.ones((1, 6))), backend.asarray(b / 6 @ np.ones((1, 6))))  # 6 columns, rank 1
    for gradient in (backend.asarray(G), factors):
        V = ul.projunn_step(backend.asarray(W), gradient, lr=0.1, rank=min(n, m) - 1, variant=variant, rng=rng)
        np.testing.assert_allclose(backend.to_numpy(V), expected, rtol=0, atol=30 * eps(dtype64))


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("lr", [1e3, 1e9])
def test_huge_steps_stay_unitary(backend, dtype, rng, variant, lr):
    W = haar(rng, N, dtype)
    G = random_matrix(rng, (N, N), dtype)
    V = backend.to_numpy(ul.projunn_step(backend.asarray(W), backend.asarray(G), lr=lr, rank=2, variant=variant, rng=rng))
    assert np.all(np.isfinite(V))
    assert unitarity(V) <= tol(dtype, 1)


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_same_seed_same_step_on_every_backend(backend, dtype, rng, variant):
    """Replicas of a distributed job rely on this: the sketch depends on the
    random draw (G is full rank), and the draw is the same everywhere."""
    W = haar(rng, N, dtype)
    G = random_matrix(rng, (N, N), dtype)
    here = ul.projunn_step(backend.asarray(W), backend.asarray(G), lr=0.2, rank=2, variant=variant, rng=42)
    there = ul.projunn_step(W, G, lr=0.2, rank=2, variant=variant, rng=42)
    np.testing.assert_allclose(backend.to_numpy(here), there, atol=tol(dtype, 10))
    elsewhere = ul.projunn_step(W, G, lr=0.2, rank=2, variant=variant, rng=43)
    assert not np.allclose(elsewhere, there, atol=tol(dtype, 100))


def test_gradient_dtype_is_cast_to_w(rng):
    W = haar(rng, N, "complex64")
    G = random_matrix(rng, (N, N), "complex128")
    assert ul.projunn_step(W, G, lr=0.1).dtype == np.complex64
    assert ul.projunn_step(W, G.real.astype(np.float32), lr=0.1).dtype == np.complex64


def test_loss_decreases_on_a_least_squares_problem(rng):
    """A step along -G lowers a real loss of a complex W: the sign and the
    conjugation of the gradient convention (PyTorch's .grad) are right."""
    U = haar(rng, N, "complex128")
    W = haar(rng, N, "complex128")
    X = random_matrix(rng, (N, 64), "complex128")

    def loss(W):
        return np.linalg.norm(W @ X - U @ X) ** 2

    for variant in ("tangent", "direct"):
        V = W
        for _ in range(50):
            G = 2 * (V @ X - U @ X) @ mH(X)  # dL/dRe W + i dL/dIm W
            V = ul.projunn_step(V, G, lr=1e-3, rank=4, variant=variant, rng=rng)
        assert loss(V) < 0.2 * loss(W)


# ------------------------------------------------------------------- errors


def test_step_errors(backend, rng):
    W = haar(rng, N, "float32")
    G = random_matrix(rng, (N, N), "float32")
    W_, G_ = backend.asarray(W), backend.asarray(G)
    cases = [
        (dict(lr=0.0), ValueError, r"lr must be > 0, got 0.0"),
        (dict(lr=-1e-3), ValueError, r"lr must be > 0, got -0.001"),
        (dict(lr=float("inf")), ValueError, r"lr must be finite, got inf"),
        (dict(lr="0.1"), TypeError, r"lr must be a real number, got str: '0.1'"),
        (dict(lr=0.1, rank=0), ValueError, r"rank must be >= 1, got 0"),
        (dict(lr=0.1, rank=17), ValueError, r"rank must be <= 16 = min\(n, m\) for W of shape \(16, 16\), got 17"),
        (dict(lr=0.1, variant="geodesic"), ValueError, r"variant must be one of 'tangent', 'direct', 'cayley', got 'geodesic'"),
        (dict(lr=0.1, oversample=-1), ValueError, r"oversample must be >= 0, got -1"),
        (dict(lr=0.1, rng=1.5), TypeError, r"rng must be None, an int seed or a numpy.random.Generator, got float"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ul.projunn_step(W_, G_, **kwargs)
    with pytest.raises(TypeError, match=r"lr"):
        ul.projunn_step(W_, G_)  # lr is required


def test_step_bad_arrays(backend, rng):
    W = haar(rng, N, "float32")
    G = random_matrix(rng, (N, N), "float32")
    W_, G_ = backend.asarray(W), backend.asarray(G)
    with pytest.raises(ValueError, match=r"G must have shape \(..., 16, 8\) to match W of shape \(16, 8\), got shape \(16, 16\)"):
        ul.projunn_step(backend.asarray(W[:, :8]), G_, lr=0.1)
    with pytest.raises(ValueError, match=r"G must have shape \(..., 16, 16\) to match W of shape \(16, 16\), got shape \(16, 8\)"):
        ul.projunn_step(W_, backend.asarray(G[:, :8]), lr=0.1)
    with pytest.raises(TypeError, match=r"G as factors must be a pair \(a, b\) meaning a @ b\^H, got 3 items"):
        ul.projunn_step(W_, (G_, G_, G_), lr=0.1)
    with pytest.raises(ValueError, match=r"G\[0\] and G\[1\] must have the same number of columns k"):
        ul.projunn_step(W_, (G_, backend.asarray(G[:, :3])), lr=0.1)
    with pytest.raises(TypeError, match=r"G has complex dtype .*complex64.* but W is real .*float32.*; a real \(orthogonal\) W takes a real gradient"):
        ul.projunn_step(W_, backend.asarray(G.astype(np.complex64)), lr=0.1)
    for position in ((0, 0), (7, 11)):
        bad = G.copy()
        bad[position] = np.nan
        bad_ = backend.asarray(bad)
        with pytest.raises(ValueError, match=r"G contains NaN or Inf \(detected in its sketch\): 1 non-finite entry"):
            ul.projunn_step(W_, bad_, lr=0.1, rng=0)
        np.testing.assert_array_equal(backend.to_numpy(bad_), bad)  # nothing changed
    np.testing.assert_array_equal(backend.to_numpy(W_), W)
    inf_factor = G[:, :4].copy()
    inf_factor[3, 2] = -np.inf
    with pytest.raises(ValueError, match=r"G\[1\] contains NaN or Inf: 1 non-finite entry in an array of shape \(16, 4\)"):
        ul.projunn_step(W_, (backend.asarray(G[:, :4]), backend.asarray(inf_factor)), lr=0.1)
    if backend.name != "numpy":
        with pytest.raises(TypeError, match=r"W is a .* but G is a numpy.ndarray; pass arrays from one library"):
            ul.projunn_step(W_, G, lr=0.1)


# ---------------------------------------------------------- tangent_project


def test_tangent_project(backend, dtype, rng):
    W = haar(rng, N, dtype, (2,))
    G = random_matrix(rng, (2, N, N), dtype)
    T = ul.tangent_project(backend.asarray(W), backend.asarray(G))
    assert_same_kind(backend, T, backend.asarray(W))
    T = backend.to_numpy(T).astype(np.complex128)
    W64, G64 = W.astype(np.complex128), G.astype(np.complex128)
    A = mH(W64) @ T
    np.testing.assert_allclose(A, -mH(A), atol=tol(dtype, 10))  # T = W A, A skew-Hermitian
    np.testing.assert_allclose(T, W64 @ (mH(W64) @ G64 - mH(G64) @ W64) / 2, atol=tol(dtype, 10))
    # orthogonal projection: the residual is orthogonal to every tangent vector
    residual = G64 - T
    assert np.all(np.abs(np.real(np.trace(mH(T) @ residual, axis1=-2, axis2=-1))) <= tol(dtype, 30) * N)
    again = backend.to_numpy(ul.tangent_project(backend.asarray(W), backend.asarray(T.astype(dtype) if is_complex(dtype) else T.real.astype(dtype))))
    np.testing.assert_allclose(again, T, atol=tol(dtype, 30))


@pytest.mark.parametrize("shape", [(N, N), (N, 4), (4, N)])
def test_tangent_project_of_a_gradient_near_the_dtype_limit(backend, dtype, rng, shape):
    """G = W B with B's two entries [0, 1] and [1, 0] at 0.6 of the dtype's
    largest number: its projection ``W skew(B)`` is representable (and small
    there), but ``S + S^H`` with ``S = W^H G = B`` was not, and the result came
    back Inf; now the halves are added."""
    real = "float32" if dtype in ("float32", "complex64") else "float64"
    if real == "float64" and not backend.has_float64:
        dtype, real = {"float64": "float32", "complex128": "complex64"}[dtype], "float32"
    from unitary_lr import random_unitary

    W = random_unitary(*shape, dtype=dtype, rng=rng).astype(np.complex128)
    k = min(shape)
    big = 0.6 * float(np.finfo(real).max)
    B = random_matrix(rng, (k, k), dtype).astype(np.complex128)
    B[0, 1], B[1, 0] = big, big
    G = W @ B if shape[0] >= shape[1] else B @ W
    cast = (lambda x: x.astype(dtype)) if is_complex(dtype) else (lambda x: x.real.astype(dtype))
    G = cast(G)
    assert np.all(np.isfinite(G))
    T = backend.to_numpy(ul.tangent_project(backend.asarray(cast(W)), backend.asarray(G)))
    assert np.all(np.isfinite(T))
    skew = (B - mH(B)) / 2  # W skew(B) (or skew(B) W): the projection, computed exactly in float64
    expected = W @ skew if shape[0] >= shape[1] else skew @ W
    # to rounding of the largest entries that cancel in it
    np.testing.assert_allclose(T, expected, atol=tol(dtype, 10) * big)


def test_tangent_project_errors(rng):
    W = haar(rng, N, "float64")
    with pytest.raises(ValueError, match=r"G must have shape \(..., 16, 16\) to match W of shape \(16, 16\), got shape \(16, 15\)"):
        ul.tangent_project(W, W[:, :-1])
    bad = W.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        ul.tangent_project(W, bad)


# lr and the gradient's scale, lr * |G| up to ~1e305 (float64) and ~1e36
# (float32): each step gives a unitary result or a ValueError naming G (its
# products overflow the dtype), never NaN or a non-unitary W, and leaks no
# RuntimeWarning (pytest turns warnings into errors).
HUGE_STEPS = {"float64": [(1e300, 1e5), (1e150, 1e100), (1.0, 1e300)], "float32": [(1e30, 1e5), (1e10, 1e25), (1.0, 1e36)]}
# JAX (CPU) flushes subnormal float32 numbers to zero: 1e36 gradients lost
# their basis there until the panels were balanced by powers of two.


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factors"])
def test_huge_lr_times_g_is_unitary_on_every_backend(backend, dtype, rng, variant, factored):
    real = "float64" if dtype in ("float64", "complex128") else "float32"
    W = backend.asarray(haar(rng, N, dtype, (2,)))
    G = random_matrix(rng, (N, N), dtype)
    a, b = random_matrix(rng, (2, N, 3), dtype)
    for lr, scale in HUGE_STEPS[real]:
        gradient = (backend.asarray(a * scale), backend.asarray(b)) if factored else backend.asarray(G * scale)
        try:
            V = backend.to_numpy(ul.projunn_step(W, gradient, lr=lr, rank=2, variant=variant, rng=0))
        except ValueError as error:
            assert str(error).startswith(("G is too large", "G[0] is too large", "G[1] is too large")), error
            continue
        assert np.all(np.isfinite(V)), (lr, scale)
        assert np.all(unitarity(V) < tol(dtype)), (lr, scale, unitarity(V))


FULL_RANK_32_BIT = """
import numpy as np
import unitary_lr as ul

xp, device, host, dtype, variant = {setup}
n, worst = 8, 0.0
for seed in range(12):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n)) + (1j * rng.standard_normal((n, n)) if dtype == "complex64" else 0)
    W = xp.asarray(ul.random_unitary(n, dtype=dtype, rng=seed), device=device)
    V = ul.projunn_step(W, xp.asarray(G.astype(dtype), device=device), lr=1.0, rank=n, variant=variant, rng=seed)
    worst = max(worst, float(ul.unitarity_error(host(V).astype(np.complex128))))
assert worst < 1e-6, worst
"""


@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("where", ["no_float64", "jax without x64"])
def test_full_rank_32_bit_steps_without_float64_stay_at_rounding(where, dtype, variant):
    """Where the device has no float64 (array_api_strict's no_float64 device,
    JAX without x64: its default), the step's Grams are formed in float32 and
    their small work runs in float64 on the host. The drop tolerance took
    them as float64 Grams and kept directions at 1e-10 of the largest, which
    are float32 noise: a rank-n step left W up to 2.6e-6 from unitary
    (4.8e-6 on JAX), against 5e-7 where the Grams are float64. A fresh
    process: this one has JAX's x64 on."""
    import subprocess
    import sys

    if where == "no_float64":
        pytest.importorskip("array_api_strict")
        setup = ("__import__('array_api_strict'), __import__('array_api_strict').Device('no_float64'), "
                 "lambda V: np.asarray(V.to_device(__import__('array_api_strict').Device('CPU_DEVICE'))), "
                 f"{dtype!r}, {variant!r}")
    else:
        pytest.importorskip("jax")
        setup = f"__import__('jax.numpy').numpy, None, np.asarray, {dtype!r}, {variant!r}"
    done = subprocess.run([sys.executable, "-c", FULL_RANK_32_BIT.replace("{setup}", setup)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_huge_rank_one_step_of_a_32_bit_w_keeps_it_unitary(rng, dtype, variant):
    """A single 32-bit W, rank 1 (the host's closed-form cores): a float32
    gradient of 1e20 takes no scale before the float64 cores, so the direct
    core's 2 x 2 B reached 1e190, whose squared entries raised OverflowError
    in the closed form's norm (and made the general core's norm Inf, which
    left W unmoved). Now every such step keeps W unitary, eager and traced,
    and the direct and Cayley steps move it (to their saturated limits)."""
    import array_api_compat.numpy as xp

    from unitary_lr.steps import sketch_matrix, step_unchecked

    W = haar(rng, N, dtype)
    G = random_matrix(rng, (N, N), dtype) * 1e20
    omega = sketch_matrix(xp, (N, 1), dtype=W.dtype, device="cpu", rng=0)
    for lr in (1e150, 1e300, 1.7976931348623157e308):
        eager = ul.projunn_step(W, G, lr=lr, rank=1, variant=variant, rng=0)
        traced = step_unchecked(xp, W, G, omega, lr=lr, rank=1, variant=variant, power_iters=1, traced=True)
        for V in (eager, traced):
            assert np.all(np.isfinite(V)) and unitarity(V) < tol(dtype), (lr, unitarity(V))
            if variant != "tangent":  # a rotation by an angle of 1e190 is rounding's: any angle
                assert np.abs(V - W).max() > 1e-3, lr  # the saturated polar factor, a reflection


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factors"])
def test_lr_times_g_beyond_the_dtype_range_is_unitary_or_a_clear_error(rng, variant, factored):
    W = haar(rng, N, "float64")
    gradient = tuple(random_matrix(rng, (2, N, 3), "float64") * 1e5) if factored else random_matrix(rng, (N, N), "float64")
    try:
        V = ul.projunn_step(W, gradient, lr=1e300 if factored else 1e308, rank=2, variant=variant, rng=0)
    except ValueError as error:
        assert "G" in str(error)
        return
    assert np.all(np.isfinite(V)) and unitarity(V) < tol("float64")


def test_under_jax_jit_a_clear_type_error_names_the_traced_path(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    W = jnp.asarray(haar(rng, N, "float64"))
    G = jnp.asarray(random_matrix(rng, (N, N), "float64"))
    match = (r"is a JAX tracer: projunn_step does not run under jax.jit .* unitary_lr.optax.projunn, "
             r"or unitary_lr.steps.step_unchecked\(xp, W, G, omega, ...\)")
    with pytest.raises(TypeError, match="^W " + match):
        jax.jit(lambda W, G: ul.projunn_step(W, G, lr=0.1, rng=0))(W, G)
    with pytest.raises(TypeError, match="^lr " + match):
        jax.jit(lambda lr: ul.projunn_step(W, G, lr=lr, rng=0))(0.1)
    with pytest.raises(TypeError, match=r"^G\[0\] " + match):
        jax.jit(lambda a: ul.projunn_step(W, (a, G[:, :2]), lr=0.1, rng=0))(G[:, :2])
    # the way it names works under jit, with the sketch drawn by jax.random
    from unitary_lr.steps import sketch_shape, step_unchecked

    def step(W, G, key):
        omega = jax.random.normal(key, sketch_shape(G, 1, 0), dtype=G.dtype)
        return step_unchecked(jnp, W, G, omega, lr=0.1, rank=1, variant="tangent", power_iters=1)

    V = jax.jit(step)(W, G, jax.random.PRNGKey(0))
    assert unitarity(np.asarray(V)) < 1e-13


def test_tangent_project_runs_under_jax_jit(rng):
    """Dense and traceable: under jax.jit it gives the eager projection (its
    check of G read a tracer as a bool: JAX's TracerBoolConversionError)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    W, G = haar(rng, N, "complex128", (2,)), random_matrix(rng, (2, N, N), "complex128")
    traced = np.asarray(jax.jit(ul.tangent_project)(jnp.asarray(W), jnp.asarray(G)))
    np.testing.assert_allclose(traced, ul.tangent_project(W, G), atol=1e-13)


def test_power_iteration_keeps_the_small_directions_of_a_steep_float32_spectrum(backend):
    """The sketch's power iteration re-bases its panels between passes: with
    singular values 4^-j, the eighth is 6e-5 of the first, and ``G^H G omega``
    without a new basis between the products would round it away in float32
    (the captured range then misses the optimal error by 60-150x). With it,
    the range of the sketch is within a few times of the optimal rank-8 one,
    on every backend (the bases come from shifted Cholesky factors on the
    device, in float32 where the device has no float64)."""
    from unitary_lr._flow import sketch_panels

    xp = ul._xp.namespace(backend.asarray(np.zeros(1, np.float32)))
    n, k = 64, 8
    ratios = []
    for seed in range(8):
        gen = np.random.default_rng(seed)
        U, V = (np.linalg.qr(gen.standard_normal((n, n)))[0] for _ in range(2))
        s = 4.0 ** -np.arange(n)
        G = ((U * s) @ V.T).astype(np.float32)
        omega = gen.standard_normal((n, k)).astype(np.float32)
        Y, Z = (backend.to_numpy(x) for x in sketch_panels(xp, backend.asarray(G), backend.asarray(omega), 1))
        assert Y.dtype == Z.dtype == np.float32
        Q = np.linalg.qr(Y.astype(np.float64))[0]
        G64 = G.astype(np.float64)
        ratios.append(np.linalg.norm(G64 - Q @ (Q.T @ G64)) / np.sqrt(np.sum(s[k:] ** 2)))
    assert np.median(ratios) < 1.5 and max(ratios) < 10, ratios


@pytest.mark.parametrize("dtype, scales", [("float32", (1e-30, 1e30)), ("complex64", (1e-30, 1e30)),
                                           ("float64", (1e-120, 1e120)), ("complex128", (1e-120, 1e120))])
@pytest.mark.parametrize("rank, power_iters", [(1, 1), (1, 4), (3, 1)])
def test_the_step_keeps_its_direction_at_any_gradient_scale(backend, dtype, scales, rank, power_iters):
    """The step along c G with lr / c is the step along G, to rounding, for a
    gradient of any representable scale (the step clamps lr beyond 1e150).
    A rank-1 sketch rescales all its panels by the first one's largest entry
    (one reduction per step), so its 2 q + 2 products stay in range. On a
    device without float64 the Grams are formed in float32 and their panels
    are rescaled first: without that, a float32 gradient of 1e-30 gave a Gram
    of zeros and a step 1e-2 off its direction, and one of 1e20 was refused
    as overflowing."""
    rng = np.random.default_rng(21)
    n = 24
    W, G = haar(rng, n, dtype), random_matrix(rng, (n, n), dtype) / n
    step = dict(rank=rank, rng=3, power_iters=power_iters)
    reference = backend.to_numpy(ul.projunn_step(backend.asarray(W), backend.asarray(G), lr=0.3, **step))
    assert np.linalg.norm(reference - W) > 1e-2  # a step that moves
    for c in scales:
        G_c = (G.astype(np.complex128 if is_complex(dtype) else np.float64) * c).astype(dtype)
        V = backend.to_numpy(ul.projunn_step(backend.asarray(W), backend.asarray(G_c), lr=0.3 / c, **step))
        assert np.all(np.isfinite(V))
        np.testing.assert_allclose(V, reference, rtol=0, atol=tol(dtype))
        assert unitarity(V) < tol(dtype)


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("shape", [(N, N), (N, 3)], ids=["square", "tall"])
@pytest.mark.parametrize("rank", [1, 3])
def test_jax_without_x64_steps_as_numpy_does(rng, dtype, shape, rank):
    """JAX's default configuration has no float64: the eager step then forms
    its Grams in float32 (rescaled panels, several small arrays fetched
    together) and its arrays come back from the host cores cast there. The
    step is NumPy's float64 step from the same draw, to float32 rounding,
    and float64 support is asked again when x64 is switched (the test suite
    runs with x64 on)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rank = min(rank, shape[1])
    W = haar(rng, shape[0], dtype)[:, :shape[1]]
    G = random_matrix(rng, shape, dtype) * 1e-3
    wide = "complex128" if is_complex(dtype) else "float64"
    reference = ul.projunn_step(W.astype(wide), G.astype(wide), lr=0.5, rank=rank, rng=7)
    with jax.enable_x64(False):
        V = ul.projunn_step(jnp.asarray(W), jnp.asarray(G), lr=0.5, rank=rank, rng=7)
        assert V.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(V), reference, atol=tol(dtype, 3))
    assert unitarity(np.asarray(V)) < tol(dtype, 1)


def test_tangent_project_promotes_mixed_dtypes(backend, rng):
    """The result has dtype result_type(W, G): PyTorch's products refused
    float32 times float64 (\"expected m1 and m2 to have the same dtype\")."""
    dtypes = ["float32", "float64", "complex64", "complex128"] if backend.has_float64 else ["float32", "complex64"]
    for w_dtype in dtypes:
        for g_dtype in dtypes:
            if is_complex(g_dtype) and not is_complex(w_dtype):
                continue  # (a complex gradient of a real W is refused)
            W, G = haar(rng, 6, w_dtype), random_matrix(rng, (6, 6), g_dtype)
            got = ul.tangent_project(backend.asarray(W), backend.asarray(G))
            expected_dtype = np.result_type(W.dtype, G.dtype)
            assert backend.to_numpy(got).dtype == expected_dtype, (w_dtype, g_dtype)
            W64, G64 = W.astype(np.complex128), G.astype(np.complex128)
            S = mH(W64) @ G64
            np.testing.assert_allclose(backend.to_numpy(got), G64 - W64 @ (S + mH(S)) / 2,
                                       atol=tol(str(expected_dtype), 8))


@pytest.mark.parametrize("power_iters", [2, 25, 40])
def test_a_one_column_sketch_takes_any_number_of_power_iterations(backend, dtype, rng, power_iters):
    """A one-column sketch (rank 1, no oversampling) of a rank-1 gradient is
    exact for every number of power iterations. Its panels were rescaled by
    the first one's largest entry s alone and grew by (sigma_1 / s)^2 each:
    a float32 step with 24 iterations raised "W is not unitary", with 25 it
    was 0 without a word, and randomized_svd raised a false overflow."""
    n = 64
    W = haar(rng, n, dtype)
    a, b = random_matrix(rng, (n, 1), dtype), random_matrix(rng, (n, 1), dtype)
    b = b / (np.abs(a @ mH(b)).max() * 2)  # |G| about 0.5, sigma_1 up to n times its largest entry
    G = (a @ mH(b)).astype(dtype)
    V = ul.projunn_step(backend.asarray(W), backend.asarray(G), lr=0.1, rank=1, oversample=0,
                        power_iters=power_iters, rng=3)
    np.testing.assert_allclose(backend.to_numpy(V), reference_tangent(W, G, 0.1), atol=tol(dtype, 50))
    S = ul.randomized_svd(backend.asarray(G), 1, oversample=0, power_iters=power_iters, rng=0).S
    sigma = np.linalg.norm(a) * np.linalg.norm(b)
    np.testing.assert_allclose(backend.to_numpy(S), [sigma], rtol=tol(dtype, 50))
