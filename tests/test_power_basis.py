"""The bases the sketch's power iteration multiplies G by between its passes
(``_flow.orthonormal_columns``: shifted Cholesky QR on the device, see the
mathematics page, "The data flow of a step"). They need not be orthonormal to
rounding, but they must span the panel, be well conditioned whatever the
lengths of its columns, keep zero columns zero, turn NaN into NaN (which the
step's own Gram reports) rather than raise, and cost no host transfer, on
every backend and dtype, batched."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from _helpers import assert_same_kind, mH, random_matrix
from unitary_lr import _host
from unitary_lr._flow import orthonormal_columns
from unitary_lr._xp import namespace


def _basis(backend, Y):
    x = backend.asarray(Y)
    before = _host.transfers.count
    Q = orthonormal_columns(namespace(x), x)
    assert _host.transfers.count == before  # computed where the panel is
    assert_same_kind(backend, Q, x)
    return backend.to_numpy(Q).astype(np.complex128)


def _wide(dtype, backend):
    """Whether the Gram is formed in a wider dtype than the panel's."""
    return backend.has_float64 and dtype in ("float32", "complex64")


@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batched"])
@pytest.mark.parametrize("lengths", ["equal", "graded"])
def test_basis_spans_the_panel_with_orthonormal_columns(backend, dtype, rng, batch, lengths):
    """A well-conditioned panel (columns of any lengths: 1 down to 1e-12,
    1e-4 in 32 bits) gives orthonormal columns spanning it."""
    n, m = 40, 6
    Y = random_matrix(rng, (*batch, n, m), dtype)
    if lengths == "graded":
        smallest = -12 if dtype in ("float64", "complex128") else -4
        Y = (Y * np.logspace(0, smallest, m)).astype(dtype)
    Q = _basis(backend, Y)
    orthonormality = np.abs(mH(Q) @ Q - np.eye(m)).max()
    # a 32-bit Gram on a device without float64 resolves less
    assert orthonormality < (1e-6 if dtype in ("float64", "complex128") or _wide(dtype, backend) else 1e-3)
    # Q = Y T: the residual of Q's least-squares fit from Y's columns is rounding
    Yw = Y.astype(np.complex128)
    assert np.abs(Yw @ (np.linalg.pinv(Yw, rcond=1e-14) @ Q) - Q).max() < 1e-4


def test_steep_panel_stays_well_conditioned(backend, dtype, rng):
    """Columns nearly dependent (singular values of the panel down to 1e-6 of
    the largest, 1e-3 in 32 bits) come out far from dependent: the condition
    number of the basis is small, and its span is the panel's."""
    n, m = 50, 5
    U = np.linalg.qr(random_matrix(rng, (n, m), "complex128" if "complex" in dtype else "float64"))[0]
    V = np.linalg.qr(random_matrix(rng, (m, m), "complex128" if "complex" in dtype else "float64"))[0]
    smallest = -6 if dtype in ("float64", "complex128") else -3
    Y = ((U * np.logspace(0, smallest, m)) @ mH(V)).astype(dtype)
    Q = _basis(backend, Y)
    assert np.linalg.cond(Q) < 2
    # span: Q's columns lie in U's range
    assert np.abs(Q - U @ (mH(U) @ Q)).max() < 1e-3


@pytest.mark.parametrize("case", ["zero column", "repeated column", "zero panel"])
def test_rank_deficient_panels_give_finite_bases(backend, dtype, rng, case):
    """A zero column stays zero and a repeated one costs no accuracy or NaN:
    the shift keeps the factorisation of every finite Gram defined."""
    n, m = 30, 4
    Y = random_matrix(rng, (n, m), dtype)
    if case == "zero column":
        Y[:, 1] = 0
    elif case == "repeated column":
        Y[:, 2] = Y[:, 0]
    else:
        Y[:] = 0
    Q = _basis(backend, Y)
    assert np.all(np.isfinite(Q))
    if case == "zero panel":
        assert not np.any(Q)
        return
    if case == "zero column":
        assert not np.any(Q[:, 1])
        kept = [0, 2, 3]
    else:
        kept = [0, 1, 3]
    # the independent columns give orthonormal ones
    assert np.abs(mH(Q[:, kept]) @ Q[:, kept] - np.eye(3)).max() < 1e-3
    assert np.linalg.matrix_rank(Q, tol=1e-2) == 3


def test_tiny_and_huge_panels(backend, dtype, rng):
    """Scale does not matter: a panel of entries about 1e-30 or 1e30 (1e-18
    and 1e18 in 32 bits, whose squares a 32-bit Gram could not hold) gives
    the basis of the same panel at scale 1."""
    Y = random_matrix(rng, (24, 3), dtype)
    reference = _basis(backend, Y)
    exponent = 30 if dtype in ("float64", "complex128") or _wide(dtype, backend) else 18
    for scale in (10.0**-exponent, 10.0**exponent):
        Q = _basis(backend, (Y * scale).astype(dtype))
        assert np.all(np.isfinite(Q))
        np.testing.assert_allclose(Q, reference, atol=1e-3)


def test_nan_gives_nan_not_an_error(backend, dtype, rng):
    """A NaN in the panel (a NaN gradient) propagates: the step's own Gram
    finds it and names the argument; the basis never raises."""
    Y = random_matrix(rng, (20, 3), dtype)
    Y[4, 1] = np.nan
    with warnings.catch_warnings():  # NumPy's "invalid value"; a step reports the NaN as a ValueError
        warnings.simplefilter("ignore", RuntimeWarning)
        Q = _basis(backend, Y)
    assert np.isnan(Q).any()
