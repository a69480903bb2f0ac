"""Launch-lean steps, counted: a projUNN step is a few large operations plus
one host round trip for all of its small matrices.

On a GPU every aten operation is at least one kernel launch and every read of a
device value on the host is a stream synchronisation; both cost more than the
O(k n^2) work of a step at moderate n. CI has no GPU, so the budgets are
asserted on the CPU, where the same operations are dispatched: the count of
non-view aten operations (a ``TorchDispatchMode`` sees each one), the
device-to-host transfers of the small matrices (``_host.transfers``) and the
scalar reads (``aten._local_scalar_dense``: ``bool(t)``, ``float(t)``, ``t.item()``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from _aten import AtenOps  # noqa: E402

import unitary_lr as ul  # noqa: E402
from unitary_lr import _host  # noqa: E402

# PyTorch's own operations, the steps a GPU runs (see conftest.torch_operations)
pytestmark = pytest.mark.usefixtures("torch_operations")

STEP_OPS = 30
RANK_K_STEP_OPS = 40
OPTIMIZER_OPS = 45
# the default rank (8): the sketch re-bases three panels on the device, 7 operations each
OPTIMIZER_RANK_K_OPS = 48


@pytest.fixture(scope="module", autouse=True)
def _process_caches():
    """One step first: a process's first step on a device asks the namespace
    once which dtypes the device has (two ``empty`` operations, then cached
    for the process), which is not the step's cost. Without it a test run
    alone counted 23 operations for its first step and 21 for the same step
    on a column-major W."""
    ul.projunn_step(torch.eye(4), torch.ones(4, 4), lr=0.1, rng=0)


def counted(run):
    """(result, the aten operations it ran, host transfers) of one call of ``run``."""
    before = _host.transfers.count
    with AtenOps() as ops:
        result = run()
    return result, ops, _host.transfers.count - before


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("rank", [1, 2, 8])
@pytest.mark.parametrize("factored", [False, True])
def test_eager_step_is_a_few_operations_and_one_transfer(dtype, variant, rank, factored):
    """One host transfer at every rank. Rank k >= 2: the sketch's power
    iteration re-bases its two intermediate panels and the last one on the
    device (shifted Cholesky QR: no eigendecomposition, nothing read back),
    for a few more operations than rank 1 (measured: 33-35 float32, 37
    complex64; 37 and 39 on factors of 12 columns, which are sketched; rank 1
    takes its one-column factors as they are)."""
    n = 128
    rng = np.random.default_rng(0)
    W = torch.as_tensor(ul.random_unitary(n, dtype=dtype, rng=rng))
    if factored:
        G = tuple(torch.as_tensor(rng.standard_normal((n, 1 if rank == 1 else 12)).astype(dtype)) for _ in range(2))
    else:
        G = torch.as_tensor(rng.standard_normal((n, n)).astype(dtype))
    V, counter, transfers = counted(lambda: ul.projunn_step(W, G, lr=0.1, rank=rank, variant=variant, rng=1))
    assert len(counter.launching) <= (STEP_OPS if rank == 1 else RANK_K_STEP_OPS), counter.launching
    assert transfers == 1
    assert counter.scalar_reads == 0, counter.launching
    assert float(ul.unitarity_error(V)) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_complex_step_makes_no_conjugated_copy(dtype, variant, layout):
    """A rank-1 step touches n x n data in its six products (four passes over
    G for the sketch with one power iteration, two over W) and the update,
    complex or real, whatever W's layout: the products with G^H and W^H
    conjugate only the thin panels (a conjugated copy of G or W was three
    extra passes per complex step)."""
    n = 96
    W = torch.as_tensor(ul.random_unitary(n, dtype=dtype, rng=np.random.default_rng(0)))
    if layout == "columns":
        W = W.mT.contiguous().mT
    G = torch.as_tensor(np.random.default_rng(1).standard_normal((n, n)).astype(dtype))
    with AtenOps() as ops:
        V = ul.projunn_step(W, G, lr=0.1, rank=1, variant=variant, rng=2)
    large = sorted(ops.touching(n * n))
    assert large == ["aten.addmm.default"] + ["aten.mm.default"] * 6, large
    reference = ul.projunn_step(W.numpy(), G.numpy(), lr=0.1, rank=1, variant=variant, rng=2)
    assert np.abs(V.numpy() - reference).max() < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_wide_step_reads_w_as_the_tall_step_does(dtype, variant):
    """A wide W (orthonormal rows) is stepped through its conjugate transpose,
    which is never formed: its step makes the same operations on large data
    as the step of the tall W^H, and no copy of W or G (rank 2: panels of
    two columns)."""
    n, m = 96, 24
    tall = torch.as_tensor(ul.random_unitary(n, m, dtype=dtype, rng=np.random.default_rng(0)))
    G = torch.as_tensor(np.random.default_rng(1).standard_normal((n, m)).astype(dtype))
    passes = {}
    for name, (W, D) in {"tall": (tall, G), "wide": (tall.mH.contiguous(), G.mH.contiguous())}.items():
        with AtenOps() as ops:
            V = ul.projunn_step(W, D, lr=0.1, rank=2, variant=variant, rng=2)
        passes[name] = sorted(ops.touching(n * m))
        reference = ul.projunn_step(W.numpy(), D.numpy(), lr=0.1, rank=2, variant=variant, rng=2)
        assert np.abs(V.numpy() - reference).max() < 1e-5
    assert passes["wide"] == passes["tall"], passes
    assert not any("copy" in op or "clone" in op for op in passes["wide"]), passes


def test_the_counter_sees_a_dense_step():
    """The budget is meaningful: the dense O(n^3) step is counted too (its SVD
    and the reads of its error checks)."""
    W = torch.as_tensor(ul.random_unitary(16, dtype="float64", rng=0))
    _, counter, _ = counted(lambda: ul.project_unitary(W + 0.1))
    assert any("svd" in op for op in counter.launching)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("rank", [1, None])
def test_optimizer_step_is_lean(dtype, rank):
    """``ProjUNN(base="rmsprop").step()`` on one unitary parameter: the base
    rule's elementwise work plus the step, no scalar read (the gradient's
    NaN/Inf check reads the small Gram matrices on the host), and one host
    transfer at any rank: at the default rank (8) the sketch's power
    iteration re-bases its two intermediate panels and the last one on the
    device (measured: 40 float32, 47 complex64; 38 and 45 before the last
    panel was re-based, which made ill-conditioned sketches up to 4e-4 off)."""
    from unitary_lr.torch import ProjUNN, unitary_parameter

    W = unitary_parameter(128, dtype=dtype, generator=torch.Generator().manual_seed(0))
    opt = ProjUNN([W], lr=1e-3, base="rmsprop", rank=rank, seed=0)
    W.grad = torch.randn(128, 128, dtype=dtype, generator=torch.Generator().manual_seed(1))
    opt.step()
    _, counter, transfers = counted(opt.step)
    assert len(counter.launching) <= (OPTIMIZER_OPS if rank == 1 else OPTIMIZER_RANK_K_OPS), counter.launching
    assert counter.scalar_reads == 0, counter.launching
    assert transfers == 1, counter.launching


def test_nan_gradient_is_caught_by_the_transfer_and_changes_nothing():
    from unitary_lr.torch import ProjUNN, unitary_parameter

    W = unitary_parameter(32, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    b = torch.nn.Parameter(torch.zeros(4))
    opt = ProjUNN([{"params": [b]}, {"params": [W], "unitary": True}], lr=1e-2, seed=0)
    b.grad = torch.ones(4)
    W.grad = torch.randn(32, 32)
    W.grad[3, 4] = float("nan")
    before_W, before_b = W.detach().clone(), b.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*contains NaN or Inf.*no parameter was changed"):
        opt.step()
    assert torch.equal(W.detach(), before_W) and torch.equal(b.detach(), before_b)
    assert not opt.state[b] and not opt.state[W]


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_column_major_w_costs_no_extra_operation(variant):
    """A transposed layout (a LAPACK result, ``W.mT.contiguous().mT``) takes the
    same operations, no copy of W, and gives the same step."""
    rng = np.random.default_rng(3)
    W = torch.as_tensor(ul.random_unitary(96, dtype="float64", rng=rng)).contiguous()
    G = torch.as_tensor(rng.standard_normal((96, 96)))
    W_columns = W.mT.contiguous().mT
    assert W_columns.stride() == (1, 96)
    V, rows, _ = counted(lambda: ul.projunn_step(W, G, lr=0.1, variant=variant, rng=2))
    V_columns, columns, _ = counted(lambda: ul.projunn_step(W_columns, G, lr=0.1, variant=variant, rng=2))
    assert len(columns.launching) == len(rows.launching)
    assert not any(op.startswith(("aten.clone", "aten.contiguous", "aten._to_copy")) for op in columns.launching
                   if op not in rows.launching)
    torch.testing.assert_close(V_columns, V, rtol=0, atol=1e-14)


def test_unitary_parameters_are_row_major():
    from unitary_lr.torch import unitary_parameter

    assert unitary_parameter(8, dtype=torch.float32).is_contiguous()
    assert unitary_parameter(8, batch_shape=(2,), dtype=torch.complex64).is_contiguous()


def test_a_step_that_fails_for_a_later_parameter_changes_no_earlier_one():
    """Every update is computed and checked before any is applied: here the
    second unitary parameter's finite but huge gradient overflows its sketch,
    after the first parameter's update was computed (it used to be applied)."""
    from unitary_lr.torch import ProjUNN, unitary_parameter

    W1 = unitary_parameter(16, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    W2 = unitary_parameter(16, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    opt = ProjUNN([W1, W2], lr=1e-2, base="sgd", seed=0)
    W1.grad = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    W2.grad = torch.full((16, 16), 3e38)
    before = W1.detach().clone(), W2.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*too large.*no parameter was changed"):
        opt.step()
    assert torch.equal(W1.detach(), before[0]) and torch.equal(W2.detach(), before[1])
    assert not opt.state[W1] and not opt.state[W2]


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_the_update_is_one_fused_product_in_w_layout(batch, layout):
    """``W + L @ Rh`` is one ``addmm`` (``baddbmm`` for a batch), not a product
    into a fresh array and a sum, and the new W has W's layout."""
    rng = np.random.default_rng(4)
    W = torch.as_tensor(ul.random_unitary(64, batch_shape=batch, dtype="float64", rng=rng))
    if layout == "columns":
        W = W.mT.contiguous().mT
    G = torch.as_tensor(rng.standard_normal((*batch, 64, 64)))
    V, counter, _ = counted(lambda: ul.projunn_step(W, G, lr=0.1, rng=1))
    fused = "aten.addmm.default" if not batch else "aten.baddbmm.default"
    assert counter.launching.count(fused) == 1
    assert V.stride() == W.stride()
    torch.testing.assert_close(V, torch.as_tensor(np.asarray(ul.projunn_step(W.numpy(), G.numpy(), lr=0.1, rng=1))),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", ["float64", "complex64"])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_a_large_update_is_written_into_huge_page_memory(dtype, batch, layout):
    """From 4 MiB on, the fused update writes into memory NumPy allocated
    (transparent huge pages, see ``_xp._huge_page_result``): still one fused
    product, W's layout, W + L Rh to rounding, an ordinary tensor that does
    not alias W or the factors."""
    from unitary_lr._xp import add_product

    n = 1024 if dtype == "float64" else 768  # 8 MiB and 4.5 MiB per matrix
    rng = np.random.default_rng(7)
    W = torch.as_tensor(rng.standard_normal((*batch, n, n)).astype(dtype))
    if layout == "columns":
        W = W.mT.contiguous().mT
    L = torch.as_tensor(rng.standard_normal((*batch, n, 2)).astype(dtype))
    Rh = torch.as_tensor(rng.standard_normal((*batch, 2, n)).astype(dtype))
    before = W.clone()
    X, counter, _ = counted(lambda: add_product(torch, W, L, Rh))
    fused = "aten.addmm.out" if not batch else "aten.baddbmm.out"
    # (a complex W's factor along its contiguous axis is copied into its layout first, O(r n))
    assert counter.touching(n * n) == [fused], counter.launching
    assert len(counter.launching) <= 2, counter.launching
    assert X.stride() == W.stride() and X.dtype == W.dtype and X.shape == W.shape
    reference = W.numpy().astype(np.complex128 if "complex" in dtype else np.float64) + \
        L.numpy().astype(np.complex128) @ Rh.numpy().astype(np.complex128)
    np.testing.assert_allclose(X.numpy(), reference, rtol=0, atol=1e-4 if dtype == "complex64" else 1e-12)
    X.mul_(0)
    torch.testing.assert_close(W, before, rtol=0, atol=0)
    assert torch.count_nonzero(L) == L.numel()


def test_a_large_update_with_autograd_stays_differentiable():
    """The huge-page result is written with ``out=``, which autograd does not
    differentiate: a large update of tensors that require grad takes
    PyTorch's own allocation and keeps its gradient."""
    from unitary_lr._xp import add_product

    n = 1024
    rng = np.random.default_rng(8)
    W = torch.as_tensor(rng.standard_normal((n, n))).requires_grad_()
    L = torch.as_tensor(rng.standard_normal((n, 2))).requires_grad_()
    Rh = torch.as_tensor(rng.standard_normal((2, n)))
    X = add_product(torch, W, L, Rh)
    X.sum().backward()
    torch.testing.assert_close(W.grad, torch.ones_like(W))
    torch.testing.assert_close(L.grad, Rh.sum(dim=1).expand(n, 2))
    with torch.no_grad():  # without autograd, the huge-page path
        _, counter, _ = counted(lambda: add_product(torch, W, L, Rh))
    assert counter.launching == ["aten.addmm.out"], counter.launching


def test_a_large_update_compiles_in_one_graph():
    """Under ``torch.compile(fullgraph=True)`` the update keeps PyTorch's
    allocation (a NumPy array made while tracing would break the graph)."""
    from unitary_lr._xp import add_product

    n = 1024
    rng = np.random.default_rng(9)
    W, L, Rh = (torch.as_tensor(rng.standard_normal(shape)) for shape in ((n, n), (n, 2), (2, n)))
    compiled = torch.compile(lambda W, L, Rh: add_product(torch, W, L, Rh), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(W, L, Rh), torch.addmm(W, L, Rh), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("power_iters", [0, 1, 3])
def test_a_rank_one_sketch_makes_one_reduction_per_panel(dtype, power_iters):
    """A one-column sketch rescales each panel by its own largest entry: one
    reduction per panel, and 2 q + 2 products; a float32 T-step is 21
    operations at q = 1. (By the first panel's entry alone, one reduction in
    all, each panel grew by (sigma_1 / s)^2, and 25 power iterations of a
    rank-1 float32 gradient gave a zero step without a word.)"""
    n = 64
    rng = np.random.default_rng(5)
    W = torch.as_tensor(ul.random_unitary(n, dtype=dtype, rng=rng))
    G = torch.as_tensor(rng.standard_normal((n, n)).astype(dtype))
    V, counter, transfers = counted(lambda: ul.projunn_step(W, G, lr=0.1, rng=2, power_iters=power_iters))
    assert counter.launching.count("aten.linalg_vector_norm.default") == 1 + power_iters, counter.launching
    on_g = [op.name for op in counter.ops if not op.view and any(entries == n * n for entries, _ in op.inputs)
            and op.name == "aten.mm.default" and all(entries >= n for entries, _ in op.outputs)]
    assert len(on_g) >= 2 * power_iters + 2
    assert transfers == 1
    if dtype == "float32" and power_iters == 1:
        assert len(counter.launching) <= 21, counter.launching
    assert float(ul.unitarity_error(V)) < 1e-5


def _as_run(dtype, rank):
    """(dtype, rank) of the update as it runs (``_xp._REAL_VIEW_RANKS``,
    written out): complex64 of rank 2 and complex128 of rank 1-4 as a real
    update of twice the rank on the real views, in rows of the same bytes."""
    if dtype == "complex64" and rank == 2 or dtype == "complex128" and 1 <= rank <= 4:
        return {"complex64": "float32", "complex128": "float64"}[dtype], 2 * rank
    return dtype, rank


def _blocked(dtype, rank, row_bytes, rows):
    """The rule the blocked update follows (``_xp._CHUNKED_RANKS``), written
    out: float32 of rank 2-4 with rows a multiple of 2 KiB apart, or of rank
    5-8 and 4 KiB; complex128 of rank 2-4 and 2 KiB; 8 rows or a multiple."""
    if rows % 8:
        return False
    if dtype == "float32":
        return 2 <= rank <= 4 and row_bytes % 2048 == 0 or 5 <= rank <= 8 and row_bytes % 4096 == 0
    return dtype == "complex128" and 2 <= rank <= 4 and row_bytes % 2048 == 0


@pytest.mark.parametrize("dtype, rank, shape", [
    ("float32", 2, (512, 512)), ("float32", 8, (64, 1024)), ("float32", 4, (1024, 512)), ("float32", 8, (512, 512)),
    ("float32", 2, (1024, 1024)), ("complex128", 2, (1024, 256)), ("complex128", 2, (256, 256)),
    ("complex128", 4, (8, 128)), ("float32", 1, (512, 512)), ("float32", 9, (512, 512)),
    ("complex128", 8, (256, 256)), ("float32", 2, (500, 512)), ("float32", 2, (512, 500)),
    ("float64", 2, (512, 512)), ("complex64", 2, (512, 512)), ("complex64", 2, (500, 500)),
    ("complex64", 1, (512, 512)), ("complex64", 3, (512, 512)), ("complex128", 1, (500, 500)),
    ("complex128", 8, (512, 512))])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_a_thin_update_of_a_power_of_two_row_runs_in_blocks_of_rows(dtype, rank, shape, layout):
    """Where PyTorch's CPU gemm runs a rank-r update slowly (see ``_blocked``
    and ``_xp._CHUNKED_RANKS``), ``add_product`` and the optimizers' in-place
    update run it as one ``baddbmm`` over blocks of 8 rows: no copy of W or of
    the factors, W + L Rh to rounding, W's layout, W untouched (functional)
    or updated in place; into huge-page memory from 4 MiB on. Everywhere
    else one ``addmm``. In place, where MKL's complex update is bound by
    arithmetic (``_as_run``), the same on W's real view, with a real update
    of twice the rank; the factors' real forms are small copies."""
    from unitary_lr._xp import add_in_place, add_product

    n, m = shape
    rng = np.random.default_rng(11)
    draw = (lambda *s: rng.standard_normal(s) + 1j * rng.standard_normal(s)) if "complex" in dtype else \
        (lambda *s: rng.standard_normal(s))
    W = torch.as_tensor(draw(n, m).astype(dtype))
    if layout == "columns":  # a transposed view: the update runs on W^T, whose rows are m apart
        W = torch.as_tensor(draw(m, n).astype(dtype)).mT
    L, Rh = torch.as_tensor(draw(n, rank).astype(dtype)), torch.as_tensor(draw(rank, m).astype(dtype))
    wide = np.complex128 if "complex" in dtype else np.float64
    reference = W.numpy().astype(wide) + L.numpy().astype(wide) @ Rh.numpy().astype(wide)
    tolerance = 1e-4 if dtype in ("float32", "complex64") else 1e-12
    # the update runs on W (n rows of m entries), or on W^T (m rows of n) for a column-major W
    row, rows = (m, n) if layout == "rows" else (n, m)
    blocked = _blocked(dtype, rank, row * W.element_size(), rows)
    before = W.clone()
    X, counter, _ = counted(lambda: add_product(torch, W, L, Rh))
    # from 4 MiB on, into huge-page memory (``out=``, see _huge_page_result)
    kind = "out" if n * m * W.element_size() >= 1 << 22 else "default"
    expected = [f"aten.baddbmm.{kind}"] if blocked else [f"aten.addmm.{kind}"]
    assert [name for name in counter.launching if "copy" not in name and "clone" not in name] == expected, \
        counter.launching
    assert counter.touching(n * m) == expected, counter.launching
    np.testing.assert_allclose(X.numpy(), reference, rtol=0, atol=tolerance)
    assert X.stride() == W.stride() or layout == "columns" and X.mT.is_contiguous()
    torch.testing.assert_close(W, before, rtol=0, atol=0)

    if layout == "rows":
        # in place, a complex update may run on W's real view (_as_run): the
        # factors' real forms (i Rh, Rh and i Rh stacked, L's parts in a row)
        # are O(r (n + m)) operations, as large as W only for the tiniest W
        run_dtype, run_rank = _as_run(dtype, rank)
        blocked = _blocked(run_dtype, run_rank, row * W.element_size(), rows)
        factors = ("aten.mul", "aten.stack", "aten._unsafe_view", "aten.clone") if run_dtype != dtype else ()
        storage = W.data_ptr()
        _, counter, _ = counted(lambda: add_in_place(W, L, Rh))
        assert [name for name in counter.touching(n * m) if not name.startswith(factors)] == \
            (["aten.baddbmm_.default"] if blocked else ["aten.addmm_.default"]), counter.launching
        assert len(counter.launching) == 1 or run_dtype != dtype and len(counter.launching) <= 5, counter.launching
        assert W.data_ptr() == storage
        np.testing.assert_allclose(W.numpy(), reference, rtol=0, atol=tolerance)


def test_a_blocked_update_stays_differentiable():
    """The blocked update (``_xp._chunked_update``) without ``out=`` is an
    ordinary differentiable product: the gradients of W, L and Rh are those
    of ``addmm``."""
    from unitary_lr._xp import add_product

    rng = np.random.default_rng(12)
    W, L, Rh = (torch.as_tensor(rng.standard_normal(s).astype("float32")).requires_grad_()
                for s in ((512, 512), (512, 2), (2, 512)))
    weights = torch.as_tensor(rng.standard_normal((512, 512)).astype("float32"))
    grads = torch.autograd.grad((add_product(torch, W, L, Rh) * weights).sum(), (W, L, Rh))
    expected = torch.autograd.grad((torch.addmm(W, L, Rh) * weights).sum(), (W, L, Rh))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype, rank", [("complex64", 2), ("complex128", 1), ("complex128", 4)])
def test_an_update_on_the_real_view_stays_differentiable(dtype, rank):
    """The complex update on W's real view (``_xp.real_view_factors``) is made
    of differentiable views and products: the gradients of L and Rh through
    it (complex, PyTorch's conjugate convention) are those of ``addmm_``."""
    from unitary_lr._xp import add_in_place, real_view_factors

    rng = np.random.default_rng(13)
    draw = lambda *s: torch.as_tensor((rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(dtype))
    W0, L, Rh = draw(256, 256), draw(256, rank).requires_grad_(), draw(rank, 256).requires_grad_()
    assert real_view_factors(W0, L, Rh) is not None
    weights = draw(256, 256)
    grads = torch.autograd.grad((add_in_place(W0.clone(), L, Rh) * weights).real.sum(), (L, Rh))
    expected = torch.autograd.grad((W0.clone().addmm_(L, Rh) * weights).real.sum(), (L, Rh))
    tolerance = 1e-4 if dtype == "complex64" else 1e-12
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def _adapter_pass_ops(reflectors):
    """The aten operations of one forward + backward of an HTA layer."""
    from unitary_lr.torch import HouseholderAdapter

    torch.manual_seed(0)
    layer = HouseholderAdapter(torch.nn.Linear(96, 80), reflectors=reflectors,
                               generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.sigma.normal_()
    x = torch.randn(64, 96)
    with AtenOps() as counter:
        layer(x).square().sum().backward()
    return counter.launching


def test_householder_adapter_pass_does_not_grow_with_reflectors():
    """T's inverse is one triangular solve on PyTorch: 8 reflectors a side take
    a few more operations than 1, not the 3 (j - 1) products per side of back
    substitution (forward and backward), and no host sync."""
    one, eight = _adapter_pass_ops(1), _adapter_pass_ops(8)
    assert len(eight) <= len(one) + 20, (len(one), len(eight))
    assert len(eight) <= 160, sorted(eight)
    assert not any("_local_scalar_dense" in op for op in eight)


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_complex_update_factors_follow_w_layout(layout):
    """The factor of ``W + L @ Rh`` along W's contiguous axis is handed to the
    fused update in W's layout for complex W (MKL's complex64 update is 3-6x
    slower otherwise, the case of a wide W's factors); real W, and the other
    factor, are passed as they are."""
    from unitary_lr._xp import array_namespace, is_column_major, update_factors

    W = torch.as_tensor(ul.random_unitary(40, 24, dtype="complex64", rng=3))
    if layout == "columns":
        W = W.mT.contiguous().mT
    L = torch.randn(2, 40, dtype=torch.complex64).mT.conj()  # column-major, conjugate bit
    Rh = torch.randn(24, 2, dtype=torch.complex64).mT  # column-major
    Lrow, Rh_row = L.contiguous(), Rh.contiguous()
    xp = array_namespace(W)
    for left, right in ((L, Rh), (Lrow, Rh_row), (Lrow, Rh), (L, Rh_row)):
        new_left, new_right = update_factors(xp, W, left, right)
        if layout == "rows":
            assert new_left is left and not is_column_major(new_right)
        else:
            assert new_right is right and is_column_major(new_left)
        torch.testing.assert_close(new_left @ new_right, left @ right, rtol=0, atol=0)
        V = ul.projunn_step(W, (left, right.mH), lr=0.1, rank=2, rng=0)
        assert V.stride() == W.stride()
    real, L_real, Rh_real = W.real, torch.randn(2, 40).mT, torch.randn(24, 2).mT
    new_left, new_right = update_factors(xp, real, L_real, Rh_real)
    assert new_left is L_real and new_right is Rh_real


def _synchronising_operations(run):
    """The CUDA operations of ``run()`` that synchronise the host with the
    device, as PyTorch's sync debug mode reports them (a prototype: it may
    miss some, never invents one)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchronizing" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("rank", [1, 8])
def test_eager_cuda_step_synchronises_once(variant, rank):
    """On a GPU: the one read of the small results is the step's only
    synchronisation; the sketch and the small results go to the device
    asynchronously (``_host.from_host``). Before: 3 to 4 (H200, 2026-12-04)."""
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    W = ul.random_unitary(256, dtype="float32", rng=rng, xp=torch, device=device)
    G = torch.randn(256, 256, device=device)
    ul.projunn_step(W, G, lr=0.1, rank=rank, variant=variant, rng=rng)  # warm: handles, pinned blocks
    syncs = _synchronising_operations(lambda: ul.projunn_step(W, G, lr=0.1, rank=rank, variant=variant, rng=rng))
    assert len(syncs) <= 1, syncs


def test_host_arrays_for_a_torch_cuda_device_take_the_asynchronous_path():
    """Which copies ``_host.from_host`` sends from page-locked memory: those
    for PyTorch's CUDA devices, whatever names the device."""
    import array_api_compat.torch as compat_torch

    assert _host._torch_cuda(torch, "cuda") and _host._torch_cuda(compat_torch, torch.device("cuda", 0))
    assert not _host._torch_cuda(torch, "cpu") and not _host._torch_cuda(torch, None)
    assert not _host._torch_cuda(np, "cpu")
    x = _host.from_host(torch, np.arange(6.0).reshape(2, 3), dtype=torch.float32, device="cpu")
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.tolist() == [[0, 1, 2], [3, 4, 5]]
