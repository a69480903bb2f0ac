"""The thin products every step is made of (``unitary_lr._xp``): a large
matrix times a panel of a few columns, a panel's adjoint times a large matrix,
and a large matrix's adjoint times a panel. They choose their form by library
and panel width (NumPy multiplies panels of two or three columns one column at
a time); every form must give the product, on every backend and dtype,
batched and broadcast, for either layout of the large matrix."""

from __future__ import annotations

import numpy as np
import pytest

from _helpers import assert_same_kind, mH, random_matrix, tol
from unitary_lr._xp import Adjoint, adjoint_matmul, adjoint_rows, matmul_panel, namespace


def _operands(backend, dtype, rng, batch, r, column_major):
    A = random_matrix(rng, (*batch, 12, 9), dtype)
    P = random_matrix(rng, (9, r), dtype)  # broadcast against A's batch
    Y = random_matrix(rng, (*batch, 12, r), dtype)
    if column_major:  # a transposed view: column by column where arrays have strides
        stored = backend.asarray(np.swapaxes(A, -1, -2).copy())
        A_b = namespace(stored).matrix_transpose(stored)
    else:
        A_b = backend.asarray(A)
    return A, P, Y, A_b


@pytest.mark.parametrize("r", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
@pytest.mark.parametrize("column_major", [False, True], ids=["row-major", "column-major"])
def test_thin_products_match_float64_references(backend, dtype, rng, r, batch, column_major):
    A, P, Y, A_b = _operands(backend, dtype, rng, batch, r, column_major)
    xp = namespace(A_b)
    P_b, Y_b = backend.asarray(P), backend.asarray(Y)
    wide = lambda x: x.astype(np.complex128)
    scale = tol(dtype, 4)

    product = matmul_panel(xp, A_b, P_b)  # A P, (..., 12, r)
    assert_same_kind(backend, product, A_b)
    np.testing.assert_allclose(backend.to_numpy(product), wide(A) @ wide(P), rtol=scale, atol=scale)

    rows = adjoint_rows(xp, Y_b, A_b)  # Y^H A, (..., r, 9)
    assert_same_kind(backend, rows, A_b)
    np.testing.assert_allclose(backend.to_numpy(rows), mH(wide(Y)) @ wide(A), rtol=scale, atol=scale)

    adjoint = adjoint_matmul(xp, A_b, Y_b)  # A^H Y, (..., 9, r)
    np.testing.assert_allclose(backend.to_numpy(adjoint), mH(wide(A)) @ wide(Y), rtol=scale, atol=scale)

    # The adjoint of a matrix, held as such, through the same three products
    via_adjoint = matmul_panel(xp, Adjoint(A_b), Y_b)  # A^H Y
    np.testing.assert_allclose(backend.to_numpy(via_adjoint), mH(wide(A)) @ wide(Y), rtol=scale, atol=scale)
    rows_of_adjoint = adjoint_rows(xp, P_b, Adjoint(A_b))  # P^H A^H = (A P)^H
    np.testing.assert_allclose(backend.to_numpy(rows_of_adjoint), mH(wide(A) @ wide(P)), rtol=scale, atol=scale)
