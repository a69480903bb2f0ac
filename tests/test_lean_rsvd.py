"""The host's lean randomized SVD of one matrix (``unitary_lr._lean_numpy.svd_factors``),
which NumPy arrays and small PyTorch CPU tensors take for sketches of two or
more columns: the general NumPy routine's factors bit for bit, the same random
stream, the truncated SVD of the sketch's projection as an independent float64
reference computes it, and, for anything out of the ordinary, the general
routine's own route or error."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import mH, random_matrix

from unitary_lr import _lean_numpy, randomized_svd, rsvd
from unitary_lr._random import generator_state

DTYPES = ["float32", "complex64", "float64", "complex128"]
TOL = {"float32": 1e-4, "complex64": 1e-4, "float64": 1e-11, "complex128": 1e-11}


def _spied(monkeypatch, lean=True):
    """The lean SVD spied on (the list gets each call's result, None where it
    handed the call over) or switched off (the list stays empty)."""
    results = []
    real = _lean_numpy.svd_factors
    if lean:
        monkeypatch.setattr(_lean_numpy, "svd_factors",
                            lambda *args: results.append(real(*args)) or results[-1])
    else:
        monkeypatch.setattr(_lean_numpy, "takes_svd", lambda A, draw: False)
    return results


def _svd(A, k, seed, monkeypatch, lean=True, **options):
    """randomized_svd of A with the lean form on or off: (the factors or the
    error's message, the stream's state, the lean form's results)."""
    results = _spied(monkeypatch, lean)
    rng = np.random.default_rng(seed)
    try:
        out = tuple(randomized_svd(A, k, rng=rng, **options))
    except ValueError as error:
        out = str(error)
    finally:
        monkeypatch.undo()
    return out, generator_state(rng), results


def _decaying(rng, m, n, dtype, ratio=0.9):
    """A matrix of singular values ratio**j, with random singular vectors."""
    wide = "complex128" if "complex" in dtype else "float64"
    r = min(m, n)
    U = np.linalg.qr(random_matrix(rng, (m, r), wide))[0]
    V = np.linalg.qr(random_matrix(rng, (n, r), wide))[0]
    return ((U * ratio ** np.arange(r)) @ mH(V)).astype(dtype)


def _reference(A, omega, k, power_iters):
    """The rank-k truncated SVD of ``Q Q^H A``, Q an orthonormal basis of
    ``(A A^H)^q A omega``, in float64 (complex128) with NumPy's QR and SVD:
    what a randomized SVD of that sketch returns (Halko et al.), as ``U S Vh``."""
    A = A.astype(np.complex128)
    Y = A @ omega.astype(np.complex128)
    for _ in range(power_iters):
        Y = A @ (mH(A) @ Y)
    Q = np.linalg.qr(Y)[0]
    Ub, S, Vh = np.linalg.svd(mH(Q) @ A, full_matrices=False)
    return (Q @ Ub[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("power_iters", [0, 1, 2])
@pytest.mark.parametrize("m, n, k, oversample", [(2, 2, 2, 0), (7, 5, 1, 10), (40, 64, 3, 2), (64, 40, 8, 0),
                                                 (96, 96, 1, 10)])
def test_lean_svd_gives_the_general_factors_bit_for_bit(dtype, power_iters, m, n, k, oversample, monkeypatch):
    """Sketches of two or more columns, square, tall and wide, with and
    without power iterations: U, S and Vh equal the general NumPy routine's
    exactly (dtype, shape and every bit), the generator ends in the same
    state, the factors are orthonormal and ``U S Vh`` is the truncated SVD of
    the sketch's projection, computed in float64 from the same draw."""
    rng = np.random.default_rng([m, n, k, oversample, power_iters, DTYPES.index(dtype)])
    l = min(k + oversample, m, n)
    for seed in range(2):
        A = _decaying(rng, m, n, dtype)
        options = dict(oversample=oversample, power_iters=power_iters)
        ours, stream, results = _svd(A, k, seed, monkeypatch, **options)
        assert len(results) == 1 and results[0] is not None
        general, stream0, off = _svd(A, k, seed, monkeypatch, lean=False, **options)
        assert off == [] and stream == stream0
        for x, y in zip(ours, general):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        U, S, Vh = ours
        real = np.float32 if dtype in ("float32", "complex64") else np.float64
        assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n) and S.dtype == real
        assert np.all(np.diff(S) <= 0)
        parts = np.random.default_rng(seed).standard_normal((2, n, l) if "complex" in dtype else (1, n, l))
        omega = ((parts[0] + 1j * parts[1]) * np.sqrt(0.5) if "complex" in dtype else parts[0]).astype(dtype)
        want = _reference(A, omega, k, power_iters)
        assert np.abs((U * S) @ Vh - want).max() < TOL[dtype]
        assert np.abs(mH(U) @ U - np.eye(k)).max() < TOL[dtype]
        assert np.abs(Vh @ mH(Vh) - np.eye(k)).max() < TOL[dtype]


@pytest.mark.parametrize("case", ["nan", "inf", "zero", "rank 3", "spread", "huge", "tiny", "batch", "one column",
                                  "read-only", "transposed"])
def test_out_of_the_ordinary_svds_end_as_the_general_routine_does(case, monkeypatch):
    """NaN and Inf in A: handed over, the general routine's error, word for
    word; a zero A, one of lower rank than asked for, and a float64 A whose
    Grams cannot resolve its kept singular values take the QR route on the
    lean form's sketch, float32 matrices of 1e30 and 1e-30, read-only and
    transposed arrays the Gram route: the general routine's factors bit for
    bit; a batch and a one-column sketch are not its case."""
    rng = np.random.default_rng(9)
    dtype = "float64" if case == "spread" else "float32"
    A = _decaying(rng, 30, 24, dtype, ratio=1e-3 if case == "spread" else 0.9)
    k, options = 4, {}
    if case == "nan":
        A[3, 2] = np.nan
    elif case == "inf":
        A[0, 0] = -np.inf
    elif case == "zero":
        A = np.zeros_like(A)
    elif case == "rank 3":
        A = (random_matrix(rng, (30, 3), "float64") @ random_matrix(rng, (3, 24), "float64")).astype(dtype)
        k = 8
    elif case in ("huge", "tiny"):
        A = A * np.float32(1e30 if case == "huge" else 1e-30)
    elif case == "batch":
        A = np.stack([A, 2 * A])
    elif case == "one column":
        k, options = 1, {"oversample": 0}
    elif case == "read-only":
        A.flags.writeable = False
    elif case == "transposed":
        A = np.ascontiguousarray(A.T).T
    A0 = A.copy()
    routes = []  # the QR route's calls, the lean form's first
    real_range_basis = rsvd._range_basis
    monkeypatch.setattr(rsvd, "_range_basis", lambda *args: routes.append(1) or real_range_basis(*args))
    ours, stream, results = _svd(A, k, 5, monkeypatch, **options)  # (which undoes the patch)
    qr_route = len(routes)
    general, stream0, _ = _svd(A, k, 5, monkeypatch, lean=False, **options)
    assert qr_route == (case in ("zero", "rank 3", "spread"))
    assert stream == stream0 and np.array_equal(A, A0, equal_nan=True)
    if case in ("nan", "inf"):
        assert results == [None] and isinstance(ours, str) and ours == general and "NaN or Inf" in ours
        return
    for x, y in zip(ours, general):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    if case in ("batch", "one column"):
        assert results == []
        return
    assert len(results) == 1 and results[0] is not None
    U, S, Vh = ours
    if case == "zero":
        assert not S.any()
    elif case in ("rank 3", "spread"):  # the QR route: exact for rank 3, S to A's precision
        reference = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:k]
        assert np.abs(S - reference).max() < 1e-5 * reference[0]
        assert np.abs(mH(U) @ U - np.eye(k)).max() < 1e-5 and np.abs(Vh @ mH(Vh) - np.eye(k)).max() < 1e-5
    else:
        assert np.abs(mH(U) @ U - np.eye(k)).max() < 1e-5 and np.abs(Vh @ mH(Vh) - np.eye(k)).max() < 1e-5
        reference = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:k]
        assert np.abs(S / reference - 1).max() < 1e-4


def test_which_matrices_take_the_lean_svd():
    """One 2-D NumPy array of the four float dtypes, below the cache size, with
    a sketch of two or more columns; nothing else."""
    A, draw = np.eye(6, 4, dtype=np.float32), np.zeros((4, 2))
    assert _lean_numpy.takes_svd(A, draw)
    refused = [(A, np.zeros((4, 1))), (A[None], draw), (A.astype(np.float16), draw), (A.astype(np.int32), draw),
               (np.zeros((2048, 2048), np.float32), draw)]  # 16 MiB: the general products read it block by block
    for matrix, sketch in refused:
        assert not _lean_numpy.takes_svd(matrix, sketch), (matrix.dtype, matrix.shape, sketch.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_cpu_tensors_take_it_through_their_numpy_views(dtype):
    """A small PyTorch CPU tensor (with autograd history, or a transposed
    view) gets CPU tensors of its dtype, equal bit for bit to the factors of
    the NumPy array on the same memory (the BLAS sums a transposed layout's
    products in another order), and is not changed."""
    torch = pytest.importorskip("torch")
    A = _decaying(np.random.default_rng(6), 24, 20, dtype)
    for At in (torch.nn.Parameter(torch.from_numpy(A.copy())), torch.from_numpy(np.ascontiguousarray(A.T)).mT):
        want = randomized_svd(At.detach().numpy(), 3, rng=2)
        before = At.detach().clone()
        got = randomized_svd(At, 3, rng=2)
        for x, y in zip(got, want):
            assert isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad
            assert np.array_equal(x.numpy(), y)
        assert got.U.dtype == At.dtype and torch.equal(At.detach(), before)
