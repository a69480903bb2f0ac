import numpy as np
import pytest
from _helpers import is_complex, tol, unitarity

import unitary_lr as ul

N = 16


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_random_unitary_is_unitary_on_the_device(backend, dtype, batch):
    W = ul.random_unitary(N, dtype=dtype, batch_shape=batch, rng=1, xp=backend.xp, device=backend.device)
    assert tuple(W.shape) == (*batch, N, N)
    assert W.dtype == backend.dtype(dtype)
    import array_api_compat

    assert array_api_compat.device(W) == backend.device
    assert np.all(unitarity(backend.to_numpy(W)) <= tol(dtype, 1))
    # accepts the namespace's dtype object as well as its name
    same = ul.random_unitary(N, dtype=backend.dtype(dtype), batch_shape=batch, rng=1, xp=backend.xp, device=backend.device)
    np.testing.assert_array_equal(backend.to_numpy(same), backend.to_numpy(W))


@pytest.mark.parametrize("shape", [(N, N), (N, 5), (5, N)])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_random_unitary_is_row_major_whatever_its_qr_returns(backend, dtype, shape, batch):
    """LAPACK's Q is column-major (PyTorch keeps it so; a wide draw is a
    transposed view everywhere): the draw comes back row by row, with the
    same values, in every library that has strides."""
    W = ul.random_unitary(*shape, dtype=dtype, batch_shape=batch, rng=4, xp=backend.xp, device=backend.device)
    strides = W.stride() if hasattr(W, "stride") and callable(W.stride) else getattr(W, "strides", None)
    if strides is not None:
        itemsize = np.dtype(dtype).itemsize
        expected = tuple(int(np.prod((*batch, *shape)[i + 1:])) for i in range(len(batch) + 2))
        assert tuple(strides) == (expected if hasattr(W, "stride") and callable(W.stride)
                                  else tuple(e * itemsize for e in expected))
    np.testing.assert_allclose(backend.to_numpy(W), ul.random_unitary(*shape, dtype=dtype, batch_shape=batch, rng=4),
                               atol=tol(dtype, 10))
    assert np.all(unitarity(backend.to_numpy(W) if shape[0] >= shape[1]
                            else np.swapaxes(backend.to_numpy(W), -1, -2).conj()) <= tol(dtype, 1))


def test_random_unitary_same_seed_same_matrix_everywhere(backend, dtype):
    here = ul.random_unitary(N, dtype=dtype, rng=9, xp=backend.xp, device=backend.device)
    there = ul.random_unitary(N, dtype=dtype, rng=9)
    np.testing.assert_allclose(backend.to_numpy(here), there, atol=tol(dtype, 10))
    assert not np.allclose(ul.random_unitary(N, dtype=dtype, rng=10), there)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_random_unitary_has_haar_moments(dtype):
    """For Haar measure on U(n) or O(n): E tr W = 0 and E |tr W|^2 = 1, and each
    entry has E |W_ij|^2 = 1/n. A QR without the phase correction fails the first
    (its diagonal is biased by the sign convention of R)."""
    n, samples = 4, 20000
    W = ul.random_unitary(n, dtype=dtype, batch_shape=(samples,), rng=123)
    trace = np.trace(W, axis1=-2, axis2=-1)
    se = 1 / np.sqrt(samples)
    assert abs(np.mean(trace)) < 5 * se
    assert abs(np.mean(np.abs(trace) ** 2) - 1) < 5 * np.sqrt(2) * se * 2
    np.testing.assert_allclose(np.mean(np.abs(W) ** 2, axis=0), np.full((n, n), 1 / n), atol=5 * se)
    if is_complex(dtype):  # phases uniform: E W_ij^2 = 0 for U(n), not for O(n)
        assert np.abs(np.mean(W[:, 0, 0] ** 2)) < 5 * se
    Q = np.linalg.qr(np.random.default_rng(0).standard_normal((samples, n, n)))[0]
    assert abs(np.mean(np.trace(Q, axis1=-2, axis2=-1))) > 10 * se  # the test can fail


def test_random_unitary_errors():
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        ul.random_unitary(0, dtype="float64")
    with pytest.raises(TypeError, match=r"n must be an integer, got float: 3.0"):
        ul.random_unitary(3.0, dtype="float64")
    with pytest.raises(TypeError, match=r"dtype must be one of float32, float64, complex64, complex128 .* got 'float16'"):
        ul.random_unitary(3, dtype="float16")
    with pytest.raises(TypeError, match=r"dtype must be one of .* got <class 'numpy.int64'>"):
        ul.random_unitary(3, dtype=np.int64)
    with pytest.raises(TypeError, match=r"batch_shape must be a tuple of ints, got 5"):
        ul.random_unitary(3, dtype="float64", batch_shape=5)
    with pytest.raises(ValueError, match=r"batch_shape must not have negative sizes, got \(-1,\)"):
        ul.random_unitary(3, dtype="float64", batch_shape=(-1,))
    with pytest.raises(TypeError, match=r"batch_shape must be a tuple of ints, got \(2.0,\)"):
        ul.random_unitary(3, dtype="float64", batch_shape=(2.0,))
    with pytest.raises(TypeError, match=r"batch_shape must be a tuple of ints, got \(True,\)"):
        ul.random_unitary(3, dtype="float64", batch_shape=(True,))
    with pytest.raises(TypeError, match=r"xp must be an array namespace such as numpy or torch, got 'numpy'"):
        ul.random_unitary(3, dtype="float64", xp="numpy")
    import array_api_strict as xs

    with pytest.raises(TypeError, match=r"dtype float64 is not available on device .*no_float64"):
        ul.random_unitary(3, dtype="float64", xp=xs, device=xs.Device("no_float64"))
    # a device the namespace does not have: said so (it read "float64 is not
    # available", and a float32 draw failed in the pinned-memory transfer)
    for dtype in ("float64", "float32"):
        with pytest.raises(ValueError, match=r"device 'nowhere' is not available to array_api_compat.numpy: "):
            ul.random_unitary(3, dtype=dtype, xp=np, device="nowhere")


def test_random_unitary_refuses_an_array_as_its_dtype():
    """An array in place of a dtype (``dtype=x`` for ``dtype=x.dtype``): NumPy's
    raised "descriptor '__array_wrap__' for 'numpy.generic' objects doesn't
    apply to a 'numpy.ndarray' object", array_api_strict's "Expected Array or
    Python scalar", naming neither the argument nor its value. The dtypes
    themselves, and NumPy's scalar types, are still dtypes."""
    import array_api_strict as xs

    arrays = [(np.array([1.0]), np, r"ndarray array\(\[1\.\]\)"), (np.array(1.0), np, r"ndarray array\(1\.\)"),
              (np.zeros(500), np, r"ndarray array\(\[0\., 0\., .*\.\.\.;"),  # (shortened)
              (xs.asarray([1.0]), xs, r"Array Array\(\[1\.\]")]
    try:
        import torch

        arrays.append((torch.ones(2), torch, r"Tensor tensor\(\[1\., 1\.\]\)"))
    except ImportError:  # pragma: no cover - torch is in the test extra
        pass
    for value, xp, shown in arrays:
        with pytest.raises(TypeError, match=rf"(?s)^dtype must be a dtype or its name, not an array: got {shown}.*"
                                            r"pass x\.dtype$"):
            ul.random_unitary(3, dtype=value, xp=xp)
    for dtype, expected in [(np.float32, np.float32), (np.dtype("complex64"), np.complex64), ("float64", np.float64)]:
        W = ul.random_unitary(3, dtype=dtype, rng=0)
        assert W.dtype == expected and unitarity(W) < tol(expected)
    assert ul.random_unitary(3, dtype=xs.float32, xp=xs).dtype == xs.float32


# ---------------------------------------------------------- unitarity_error


def test_unitarity_error_matches_numpy(backend, dtype, rng):
    W = ul.random_unitary(N, dtype=dtype, batch_shape=(3,), rng=rng)
    W = W + (1e-3 * np.arange(3))[:, None, None].astype(W.dtype) * rng.standard_normal((3, N, N)).astype(W.dtype)
    e = ul.unitarity_error(backend.asarray(W))
    assert tuple(e.shape) == (3,)
    wide = "float64" if backend.has_float64 else "float32"
    assert e.dtype == backend.dtype(wide)  # reported in float64 where the device has it
    np.testing.assert_allclose(backend.to_numpy(e), unitarity(W), rtol=1e-3, atol=tol(dtype, 1))
    assert backend.to_numpy(e)[0] < tol(dtype, 1) < backend.to_numpy(e)[1]


def test_unitarity_error_values():
    assert float(ul.unitarity_error(np.eye(5))) == 0.0
    P = np.eye(4)[[2, 0, 3, 1]]
    assert float(ul.unitarity_error(P)) == 0.0
    np.testing.assert_allclose(float(ul.unitarity_error(2 * np.eye(4))), 3.0)  # ||3 I||_F / 2
    np.testing.assert_allclose(float(ul.unitarity_error(np.zeros((9, 9), np.complex64))), 1.0)
    # rectangular: orthonormal columns (tall) or rows (wide) are measured
    np.testing.assert_allclose(float(ul.unitarity_error(np.eye(5)[:, :3])), 0.0)
    np.testing.assert_allclose(float(ul.unitarity_error(np.ones((3, 4)))), np.sqrt(41))  # ||4 J - I||_F / sqrt(3)
    np.testing.assert_allclose(float(ul.unitarity_error(np.ones((4, 3)))), np.sqrt(41))
    with pytest.raises(ValueError, match=r"W must have shape \(..., m, n\), got shape \(3,\)"):
        ul.unitarity_error(np.ones(3))


def test_unitarity_error_of_float32_is_measured_above_float32_rounding(rng):
    W = ul.random_unitary(64, dtype="float64", rng=rng)
    drift = (W + 1e-9 * rng.standard_normal((64, 64))).astype(np.float32)
    reference = unitarity(drift.astype(np.float64))
    np.testing.assert_allclose(float(ul.unitarity_error(drift)), reference, rtol=1e-10)


def test_unitarity_estimate_tracks_the_exact_error(backend, dtype, rng):
    """Hutchinson's estimate with 4 probes: within a factor ~2 of the exact
    value, for drift well above the dtype's rounding."""
    n = 48
    W = ul.random_unitary(n, dtype=dtype, batch_shape=(3,), rng=rng)
    scale = 1e-3 if dtype in ("float32", "complex64") else 1e-8
    drift = (scale * np.array([1.0, 3.0, 10.0]))[:, None, None] * rng.standard_normal((3, n, n))
    W = (W + drift).astype(W.dtype)
    estimate = ul.unitarity_estimate(backend.asarray(W), rng=rng)
    assert tuple(estimate.shape) == (3,)
    ratio = backend.to_numpy(estimate) / unitarity(W)
    assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio
    with pytest.raises(ValueError, match=r"probes must be >= 1, got 0"):
        ul.unitarity_estimate(backend.asarray(W), probes=0)
    with pytest.raises(ValueError, match=r"W must have shape \(..., m, n\)"):
        ul.unitarity_estimate(backend.asarray(W[0, 0]))


def test_numpy_integer_sizes_are_sizes():
    """n and batch_shape take NumPy integers alike (a size from a .shape or a
    NumPy computation): the same draws as with Python ints."""
    W = ul.random_unitary(np.int64(3), dtype="float64", batch_shape=(np.int64(2), np.int32(1)), rng=5)
    assert W.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(W, ul.random_unitary(3, dtype="float64", batch_shape=(2, 1), rng=5))
    assert ul.random_unitary(2, dtype="float64", batch_shape=np.array([2]), rng=0).shape == (2, 2, 2)


def test_random_unitary_names_a_torch_device_that_is_not_there():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    for dtype in ("float64", "float32"):
        with pytest.raises(ValueError, match=r"device 'cuda' is not available to array_api_compat.torch: "):
            ul.random_unitary(3, dtype=dtype, xp=torch, device="cuda")


def test_random_unitary_says_how_jax_gets_float64():
    """A fresh process: JAX's default, x64 off (this one has it on). The
    message said "not available on device None"."""
    pytest.importorskip("jax")
    import subprocess
    import sys

    script = ("import jax.numpy as jnp, unitary_lr as ul\n"
              "try:\n    ul.random_unitary(3, dtype='complex128', xp=jnp)\n"
              "except TypeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == ("dtype complex128 is not available on the default device of jax.numpy; JAX has "
                                   "64-bit dtypes once jax.config.update('jax_enable_x64', True)"), done.stdout
