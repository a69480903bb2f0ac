"""The thin products every step is made of (``unitary_lr._xp``): a large
matrix times a panel of a few columns, a panel's adjoint times a large matrix,
and a large matrix's adjoint times a panel. They choose their form by library
and panel width (NumPy, and JAX on the CPU, multiply some panels of two to four
columns one column at a time); every form must give the product, on every backend and dtype,
batched and broadcast, for either layout of the large matrix."""

from __future__ import annotations

import re

import numpy as np
import pytest

from _helpers import assert_same_kind, haar, mH, random_matrix, tol, unitarity
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


# 8: PyTorch's CPU product of a real row-major matrix and a panel of 8 float32
# (4 float64) columns or more takes the plain form (_xp._TORCH_CPU_DIRECT_ROW_BYTES)
@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
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


# XLA's CPU dot runs a float64 panel of two columns, and float64 or complex
# panels of two to four rows, at a fraction of the speed of as many
# matrix-vector products (see _xp.by_columns); float32 runs at memory speed.
_JAX_CPU_DOTS = {  # (dtype, side, r) -> dots in the compiled program; the rest: 1
    ("float64", "right", 2): 2,
    **{(dtype, "left", r): r for dtype in ("float64", "complex64", "complex128") for r in (2, 3, 4)},
}


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64", "complex128"])
def test_xla_compiles_the_split_products_as_they_are_written(dtype, r):
    """Under jax.jit on the CPU, a panel the kernels split is one dot per
    column in the compiled program (XLA does not merge them back into the
    slow product), and the product is A P or P^H A to rounding."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("the split is for XLA's CPU dot")
    rng = np.random.default_rng([r, len(dtype)])
    A, P = random_matrix(rng, (40, 40), dtype), random_matrix(rng, (40, r), dtype)
    wide = lambda x: x.astype(np.complex128)
    for side, function, reference in (("right", lambda A, P: matmul_panel(jnp, A, P), wide(A) @ wide(P)),
                                      ("left", lambda A, P: adjoint_rows(jnp, P, A), mH(wide(P)) @ wide(A))):
        jitted = jax.jit(function)
        program = jitted.lower(jnp.asarray(A), jnp.asarray(P)).compile().as_text()
        assert len(re.findall(r"\bdot\(", program)) == _JAX_CPU_DOTS.get((dtype, side, r), 1), (side, program)
        result = np.asarray(jitted(jnp.asarray(A), jnp.asarray(P)))
        np.testing.assert_allclose(result, reference, rtol=tol(dtype, 4), atol=tol(dtype, 4))


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64", "complex128"])
def test_xla_writes_the_low_rank_update_as_one_elementwise_pass(dtype, r):
    """``W + L @ Rh`` under jax.jit on the CPU: for the ranks where XLA's
    product with the sum fused into its output is slow (see
    _xp.lowrank_product), the compiled program has no dot at all; otherwise
    one. Either way it is W + L Rh to rounding, batched too, and eagerly it
    stays one product."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from unitary_lr._xp import add_product, lowrank_product

    if jax.default_backend() != "cpu":
        pytest.skip("the broadcast form is for XLA's CPU backend")
    rng = np.random.default_rng([r, len(dtype), 7])
    elementwise = 2 <= r <= {"float32": 4, "float64": 3}.get(dtype, 8)
    for batch in ((), (3,)):
        W, L, Rh = (random_matrix(rng, shape, dtype) for shape in ((*batch, 30, 20), (*batch, 30, r), (*batch, r, 20)))
        wide = lambda x: x.astype(np.complex128)
        reference = wide(W) + wide(L) @ wide(Rh)
        arrays = [jnp.asarray(x) for x in (W, L, Rh)]
        jitted = jax.jit(lambda W, L, Rh: add_product(jnp, W, L, Rh))
        traced = str(jax.make_jaxpr(lambda W, L, Rh: add_product(jnp, W, L, Rh))(*arrays))
        assert ("dot_general" in traced) == (not elementwise), traced
        program = jitted.lower(*arrays).compile().as_text()
        # XLA writes a product of rank 1 as a broadcast product itself
        assert len(re.findall(r"\bdot\(", program)) == (0 if elementwise or r == 1 else 1), program
        np.testing.assert_allclose(np.asarray(jitted(*arrays)), reference, rtol=tol(dtype, 4), atol=tol(dtype, 4))
        eager = lowrank_product(jnp, arrays[1], arrays[2])
        np.testing.assert_allclose(np.asarray(eager), wide(L) @ wide(Rh), rtol=tol(dtype, 4), atol=tol(dtype, 4))


@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batched"])
@pytest.mark.parametrize("column_major", [False, True], ids=["row-major", "column-major"])
@pytest.mark.parametrize("r", [1, 2, 5])
def test_numpy_update_in_blocks_of_rows_is_the_sum(monkeypatch, dtype, rng, batch, column_major, r):
    """``add_product`` on NumPy arrays beyond the last-level cache writes
    ``W + L @ Rh`` block by block of rows (``_xp._blocked_update``); the
    thresholds made small here so that 37 rows fall into uneven blocks: the
    sum to rounding against float64, in W's layout, W untouched."""
    from unitary_lr import _xp

    monkeypatch.setattr(_xp, "_BEYOND_CACHE_BYTES", 0)
    monkeypatch.setattr(_xp, "_UPDATE_BLOCK_BYTES", 5 * 29 * np.dtype(dtype).itemsize * max(1, len(batch) * 3))
    W = random_matrix(rng, (*batch, 37, 29), dtype)
    if column_major:
        W = np.swapaxes(np.swapaxes(W, -1, -2).copy(), -1, -2)
    L, Rh = random_matrix(rng, (*batch, 37, r), dtype), random_matrix(rng, (*batch, r, 29), dtype)
    before = W.copy()
    out = _xp.add_product(np, W, L, Rh)
    wide = lambda x: x.astype(np.complex128)
    np.testing.assert_allclose(out, wide(W) + wide(L) @ wide(Rh), atol=tol(dtype, 4) * (1 + r))
    assert out.dtype == W.dtype and _xp.is_column_major(out) == column_major
    np.testing.assert_array_equal(W, before)


@pytest.mark.parametrize("r", [2, 3])
def test_numpy_products_in_blocks_of_rows_are_the_product(monkeypatch, dtype, rng, r):
    """``matmul_panel`` of a row-major NumPy A beyond the last-level cache and
    a panel of two or three columns runs one matrix-vector product per column
    and block of rows (``_xp._blocked_columns``); the thresholds made small
    here so that 37 rows fall into uneven blocks: the product to rounding
    against float64, column by column, with a real or complex panel."""
    from unitary_lr import _xp

    monkeypatch.setattr(_xp, "_BEYOND_CACHE_BYTES", 0)
    monkeypatch.setattr(_xp, "_PRODUCT_BLOCK_BYTES", 5 * 29 * np.dtype(dtype).itemsize)
    A = random_matrix(rng, (37, 29), dtype)
    for P in (random_matrix(rng, (29, r), dtype), random_matrix(rng, (29, r), "complex128")):
        out = matmul_panel(np, A, np.asfortranarray(P))
        wide = lambda x: x.astype(np.complex128)
        np.testing.assert_allclose(out, wide(A) @ wide(P), atol=tol(dtype, 4) * r)
        assert out.dtype == np.result_type(A, P) and _xp.is_column_major(out)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30], ids=["unit", "tiny", "huge"])
def test_numpy_normal_products_in_blocks_of_rows(monkeypatch, dtype, rng, scale):
    """``_xp.blocked_normal`` makes ``Y = A X / s`` and ``Z = A^H Y`` block by
    block of A's rows, with ``s`` the largest |entry| of ``A X`` (plus the
    smallest normal number) where no divisor is given. Blocks of 5 rows of
    37, the last rows 8x larger than the first so that the running scale
    grows mid-way: to rounding against float64, also at 1e30 in float32,
    where ``A^H A X`` unscaled would overflow, and with a given divisor."""
    from unitary_lr import _xp

    monkeypatch.setattr(_xp, "_NORMAL_BLOCK_BYTES", 5 * 29 * np.dtype(dtype).itemsize)
    A = random_matrix(rng, (37, 29), dtype)
    A[20:] *= 8
    A = A * np.asarray(scale, dtype=A.real.dtype)
    X = random_matrix(rng, (29, 1), dtype)
    wide = lambda x: x.astype(np.complex128)
    top = np.abs(wide(A) @ wide(X)).max() + np.finfo(A.real.dtype).smallest_normal
    Y, Z, s = _xp.blocked_normal(A, X)
    assert s.shape == (1, 1) and s.dtype == A.real.dtype
    np.testing.assert_allclose(s, top, rtol=tol(dtype))
    np.testing.assert_allclose(Y, wide(A) @ wide(X) / top, atol=tol(dtype, 4))
    np.testing.assert_allclose(Z / scale, mH(wide(A)) @ (wide(A) @ wide(X) / top) / scale, atol=tol(dtype, 40))
    assert Y.dtype == Z.dtype == A.dtype and np.abs(Y).max() == pytest.approx(1, rel=tol(dtype))
    Y2, Z2, s2 = _xp.blocked_normal(A, Z / s, s)
    assert s2 is s
    reference = wide(A) @ (wide(Z) / wide(s)) / wide(s)
    np.testing.assert_allclose(Y2, reference, rtol=tol(dtype, 40), atol=tol(dtype, 40) * np.abs(reference).max())
    np.testing.assert_allclose(Z2 / scale, mH(wide(A)) @ wide(Y2) / scale, rtol=tol(dtype, 40),
                               atol=tol(dtype, 40) * np.abs(Z2 / scale).max())
    A[11, 3] = np.nan
    assert not np.isfinite(_xp.blocked_normal(A, X)[1]).all()


def test_the_sketch_of_a_numpy_gradient_beyond_the_cache_reads_it_in_blocks(monkeypatch, dtype, rng):
    """The one-column sketch of a row-major NumPy G beyond the cache makes each
    pair of products ``G X``, ``G^H (G X)`` in one pass (``blocked_normal``,
    twice with one power iteration), and gives the panels the plain products
    give, to rounding; a column-major G, and array_api_strict's arrays, take
    the plain products."""
    from unitary_lr import _flow, _xp

    G = random_matrix(rng, (37, 29), dtype)
    omega = random_matrix(rng, (29, 1), dtype)
    plain = _flow.sketch_panels(np, G, omega, 1)
    monkeypatch.setattr(_xp, "_BEYOND_CACHE_BYTES", 0)
    monkeypatch.setattr(_xp, "_NORMAL_BLOCK_BYTES", 5 * 29 * np.dtype(dtype).itemsize)
    calls = []
    monkeypatch.setattr(_flow, "blocked_normal", lambda *args: calls.append(1) or _xp.blocked_normal(*args))
    blocked = _flow.sketch_panels(np, G, omega, 1)
    assert len(calls) == 2
    for got, want in zip(blocked, plain):
        np.testing.assert_allclose(got, want, atol=tol(dtype, 4) * np.abs(want).max())
    _flow.sketch_panels(np, np.asfortranarray(G), omega, 1)
    _flow.sketch_panels(np, G, omega, 0)
    assert len(calls) == 3  # the column-major G took the plain products; no power iteration: one pass


@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("rank", [1, 2])
def test_numpy_step_forms_its_panel_as_it_adds_the_update(monkeypatch, dtype, rng, variant, rank):
    """``projunn_step`` on a square row-major NumPy W beyond the last-level
    cache leaves the panel ``L = (W Q) D`` unformed (``_xp.RightProduct``) and
    forms it block by block of rows as it adds ``L Q^H`` to W
    (``_xp._fused_update``); the thresholds made small here so that 37 rows
    fall into uneven blocks. The new W is ``W + L @ Rh`` of
    ``projunn_update`` (the same draw, L formed, the sum taken in float64) to
    rounding, unitary, in W's dtype and layout, W untouched; a column-major
    W (the same step) and a batch (unitary) form L as before, and so does
    ``projunn_update`` itself."""
    from unitary_lr import _xp, projunn_step
    from unitary_lr.steps import projunn_update

    monkeypatch.setattr(_xp, "_BEYOND_CACHE_BYTES", 0)
    monkeypatch.setattr(_xp, "_FUSED_BLOCK_BYTES", 5 * 37 * np.dtype(dtype).itemsize)
    fused = []
    real = _xp._fused_update
    monkeypatch.setattr(_xp, "_fused_update", lambda *args: fused.append(args[1]) or real(*args))
    W, G = haar(rng, 37, dtype), random_matrix(rng, (37, 37), dtype)
    before = W.copy()
    new = projunn_step(W, G, lr=0.3, rank=rank, variant=variant, rng=5)
    assert len(fused) == 1 and isinstance(fused[0], _xp.RightProduct)
    L, Rh = projunn_update(W, G, lr=0.3, rank=rank, variant=variant, rng=5)
    assert isinstance(L, np.ndarray) and len(fused) == 1  # formed: the caller adds it itself
    wide = lambda x: x.astype(np.complex128)
    np.testing.assert_allclose(new, wide(W) + wide(L) @ wide(Rh), atol=tol(dtype, 4))
    assert new.dtype == W.dtype and new.flags.c_contiguous and unitarity(new) < tol(dtype, 4)
    assert not np.allclose(new, W)
    np.testing.assert_array_equal(W, before)
    column_major = np.asfortranarray(W)
    np.testing.assert_allclose(projunn_step(column_major, G, lr=0.3, rank=rank, variant=variant, rng=5), new,
                               atol=tol(dtype, 4))
    batched = projunn_step(np.stack([W, W]), np.stack([G, G]), lr=0.3, rank=rank, variant=variant, rng=5)
    assert batched.shape == (2, 37, 37) and (unitarity(batched) < tol(dtype, 4)).all()
    assert len(fused) == 1


def test_an_unformed_panel_is_formed_where_the_update_is_not_blocked(dtype, rng):
    """``add_product`` given a ``RightProduct`` where it adds in one piece (a W
    within the cache) forms ``(W Q) D`` first: the sum to rounding."""
    from unitary_lr import _xp

    W, Q, D = random_matrix(rng, (9, 9), dtype), random_matrix(rng, (9, 2), dtype), random_matrix(rng, (2, 2), dtype)
    out = _xp.add_product(np, W, _xp.RightProduct(W, Q, D), mH(Q))
    wide = lambda x: x.astype(np.complex128)
    np.testing.assert_allclose(out, wide(W) + wide(W) @ wide(Q) @ wide(D) @ mH(wide(Q)), atol=tol(dtype, 40))
