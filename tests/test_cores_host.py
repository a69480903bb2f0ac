"""The host cores' fast paths (``unitary_lr._cores``: ``_gram_basis_host``,
``_planes_minus_identity_host``; in ``_flow`` the clamp of ``_clamped`` and
the diagonals of ``balance_columns`` and ``_unitarity_deviation``), which
every eager step of rank two or more takes on the host: the general forms' results bit for bit (the fast paths
switched off by ``HOST_FAST_PATHS``), on fresh random matrices of every
kind the steps make (real and complex, rank-deficient, zero columns,
columns of lengths 1e-5 to 1e5, huge and tiny steps), and against
independent float64 references (NumPy's QR, SciPy's expm and the Cayley
map by a solve)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from unitary_lr import _cores, _flow
from unitary_lr.steps import projunn_update


def _same(a, b):
    """Both None, or arrays (or NumPy scalars) equal bit for bit, of one
    dtype and shape."""
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)


def _general(monkeypatch, function, *args, **kwargs):
    """``function`` with the host fast paths switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(_cores, "HOST_FAST_PATHS", False)
        return function(*args, **kwargs)


def _panel(rng, n, r, complex_, case):
    P = rng.standard_normal((n, r)) * 10.0 ** rng.uniform(-5, 5, size=r)
    if complex_:
        P = P + 1j * rng.standard_normal((n, r))
    if case == "zero column":
        P[:, 0] = 0
    elif case == "dependent" and r > 1:
        P[:, -1] = 3 * P[:, 0]
    elif case == "zero":
        P[:] = 0
    return P


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("r", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("case", ["plain", "zero column", "dependent", "zero"])
def test_gram_basis_fast_path_is_the_general_form_bit_for_bit(complex_, r, case, monkeypatch):
    """T, R and the spread of the fast path equal the general form's on
    NumPy exactly, for each of the three kinds of call; and T is a basis:
    P T has orthonormal columns where a direction was kept and zero ones
    where it was dropped, and (P T) R = P for a panel of full rank."""
    rng = np.random.default_rng([r, complex_, len(case)])
    for _ in range(5):
        P = _panel(rng, 40, r, complex_, case)
        C = P.conj().T @ P
        for options in ({}, {"basis_only": True}, {"with_spread": False}):
            ours = _cores.gram_basis(np, C, 1e-12, **options)
            theirs = _general(monkeypatch, _cores.gram_basis, np, C, 1e-12, **options)
            assert all(_same(a, b) for a, b in zip(ours, theirs)), options
        T, R, spread = _cores.gram_basis(np, C, 1e-12)
        Q = P @ T
        lengths = np.linalg.norm(Q, axis=0)
        kept = lengths > 0.5
        assert np.allclose(lengths[~kept], 0, atol=1e-12)
        assert np.allclose(Q[:, kept].conj().T @ Q[:, kept], np.eye(int(kept.sum())), atol=1e-6)
        assert spread >= 1
        if case == "plain":
            assert kept.all()
            assert np.allclose(Q @ R, P, rtol=0, atol=1e-8 * np.abs(P).max())


@pytest.mark.parametrize("cayley", [False, True])
@pytest.mark.parametrize("r", [4, 6, 8, 16])
def test_plane_rotations_fast_path_is_the_general_form_bit_for_bit(cayley, r, monkeypatch):
    """expm(t K) - I (and the Cayley map) of a real skew-symmetric K of
    four or more rows: the fast path's result equals the general form's
    exactly, for generators whose planes' angles spread over 1e16 and for
    steps from 1e-9 to 1e6 (numbers, and host arrays as the step's scaled
    size comes); it is orthogonal to rounding, and agrees with
    SciPy's expm and with the Cayley map by a solve (moderate steps)."""
    rng = np.random.default_rng([r, cayley])
    for _ in range(6):
        A = rng.standard_normal((r, r)) * 10.0 ** rng.uniform(-8, 8, size=(r, 1))
        K = A - A.T
        for t in (1e-9, -0.01, 3.0, -1e6, np.full((1, 1), 0.02), np.asarray(-5.0)):
            ours = _cores.expm_skew_minus_identity(np, K, t, cayley=cayley)
            theirs = _general(monkeypatch, _cores.expm_skew_minus_identity, np, K, t, cayley=cayley)
            assert _same(ours, theirs)
            M = np.eye(r) + ours
            assert np.abs(M.T @ M - np.eye(r)).max() < 1e-13
    A = rng.standard_normal((r, r))
    K, t = A - A.T, 0.3
    ours = np.eye(r) + _cores.expm_skew_minus_identity(np, K, t, cayley=cayley)
    if cayley:
        reference = np.linalg.solve(np.eye(r) - t / 2 * K, np.eye(r) + t / 2 * K)
    else:
        reference = scipy.linalg.expm(t * K)
    assert np.abs(ours - reference).max() < 1e-13


@pytest.mark.parametrize("dtype", ["float32", "complex64", "float64", "complex128"])
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("rank", [2, 8])
def test_steps_are_the_same_with_and_without_the_fast_paths(dtype, variant, rank, monkeypatch):
    """Whole eager steps of rank 2 and 8 through the host's cores (one
    matrix, the host's lean step; a batch, the general step): the same
    factors bit for bit with the fast paths on and off."""
    rng = np.random.default_rng([rank, len(dtype), len(variant)])
    wide = np.complex128 if "complex" in dtype else np.float64
    n = 24
    A = rng.standard_normal((2, n, n)) + (1j * rng.standard_normal((2, n, n)) if "complex" in dtype else 0)
    W = np.linalg.qr(A.astype(wide))[0].astype(dtype)
    G = (rng.standard_normal((2, n, n)) + (1j * rng.standard_normal((2, n, n)) if "complex" in dtype else 0))
    G = G.astype(dtype)
    for Wi, Gi in [(W[0], G[0]), (W, G)]:
        ours = projunn_update(Wi, Gi, lr=0.05, rank=rank, variant=variant, rng=3)
        theirs = _general(monkeypatch, projunn_update, Wi, Gi, lr=0.05, rank=rank, variant=variant, rng=3)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_clamp_fast_path_is_the_general_form():
    """The step's clamped size: the same numbers (huge ones clamped to
    1e150 either way, NaN kept), dtype and shape, with the fast path on and
    off; a batch of sizes and float32 ones take the general form."""
    values = np.array([0.0, -0.0, 1e-300, 2.5, -3e149, 1e151, -np.inf, np.inf, np.nan])
    single = np.array([0.0, 2.5, -3e30, np.inf, np.nan], np.float32)
    for s in [np.full((1, 1), v) for v in values] + [np.asarray(7.0), values.reshape(3, 1, 3), single]:
        ours = _flow._clamped(np, s)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_cores, "HOST_FAST_PATHS", False)
            theirs = _flow._clamped(np, s)
        assert np.array_equal(ours, theirs, equal_nan=True) and ours.dtype == theirs.dtype and ours.shape == s.shape
        assert np.array_equal(np.signbit(ours), np.signbit(theirs))


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("case", ["plain", "zero column", "long column", "short column", "2**41", "2**-40", "nan",
                                  "empty"])
def test_balance_and_unitarity_fast_paths_are_the_general_forms(complex_, case, monkeypatch):
    """``balance_columns`` (eager) and ``_unitarity_deviation`` of one host
    Gram, with the fast paths on and off: the same scaled T and column
    scales (None where no column is beyond 2**+-40), the same deviation;
    columns of lengths 1e-5 to 1e5 and 2**-40 need no balancing, one of
    2**41, or made 1e20 times longer or shorter, does (in float32 and
    float64 bounds), a zero column never."""
    rng = np.random.default_rng([len(case), complex_])
    r = 0 if case == "empty" else 6
    P = _panel(rng, 20, r, complex_, "zero column" if case == "zero column" else "plain")
    if case == "long column":
        P[:, 2] *= 1e20
    elif case == "short column":
        P[:, 1] *= 1e-20
    elif case.startswith("2**"):  # a column of exactly this length: the edge, balanced beyond 2**+-40
        P[:, 3] *= {"2**41": 2.0**41, "2**-40": 2.0**-40}[case] / np.linalg.norm(P[:, 3])
    C = P.conj().T @ P
    if case == "nan":
        C[1, 1] = np.nan
    T = rng.standard_normal((r, r)) + (1j * rng.standard_normal((r, r)) if complex_ else 0)
    CW = C * (1 + 1e-3 * rng.standard_normal((r, r)))
    for bound in (120, 1016):
        ours = _flow.balance_columns(np, C, T, False, bound)
        theirs = _general(monkeypatch, _flow.balance_columns, np, C, T, False, bound)
        assert _same(ours[0], theirs[0]) and _same(ours[1], theirs[1])
        assert (ours[1] is None) is (case not in ("long column", "short column", "2**41"))
    ours, theirs = _flow._unitarity_deviation(np, C, CW), _general(monkeypatch, _flow._unitarity_deviation, np, C, CW)
    assert ours == theirs or (np.isnan(ours) and np.isnan(theirs))
    if case == "plain":
        assert 1e-5 < ours < 1e-2
