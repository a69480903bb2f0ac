"""The host's lean eager step of one square matrix (``unitary_lr._lean_numpy``),
which NumPy arrays and small PyTorch CPU tensors take, at rank 1 and with
sketches of two or more columns: the factors of the general NumPy step bit
for bit, the same random stream, a step that agrees with an independent
float64 reference, and, for anything out of the ordinary, the general
step's own result or error."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from _helpers import haar, mH, random_matrix, unitarity

from unitary_lr import _host, _lean_numpy, projunn_step
from unitary_lr._random import generator_state
from unitary_lr.steps import projunn_update

DTYPES = ["float32", "complex64", "float64", "complex128"]
TOL = {"float32": 2e-5, "complex64": 2e-5, "float64": 1e-12, "complex128": 1e-12}


def _pair(rng, n, dtype, scale=1.0):
    wide = "complex128" if "complex" in dtype else "float64"
    return haar(rng, n, wide).astype(dtype), (random_matrix(rng, (n, n), wide) * scale).astype(dtype)


def _spied(monkeypatch, lean=True):
    """The lean step spied on (the list gets each call's result, None where
    it handed the step over) or switched off (the list stays empty)."""
    results = []
    real = _lean_numpy.lean_factors
    if lean:
        monkeypatch.setattr(_lean_numpy, "lean_factors",
                            lambda *args, **kwargs: results.append(real(*args, **kwargs)) or results[-1])
    else:
        monkeypatch.setattr(_lean_numpy, "host_arrays", lambda W, G: None)
    return results


def _update(W, G, seed, monkeypatch, lean=True, **options):
    """projunn_update of W and G with the lean step on or off: (the factors
    or the error's message, the stream's state, the lean step's results)."""
    results = _spied(monkeypatch, lean)
    rng = np.random.default_rng(seed)
    try:
        out = projunn_update(W, G, lr=options.pop("lr", 0.05), rng=rng, **options)
    except ValueError as error:
        out = str(error)
    finally:
        monkeypatch.undo()
    return out, generator_state(rng), results


def _reference(W, G, omega, *, lr, variant, power_iters, rank=None):
    """The step in float64 from the definitions: G_k the best rank-``rank``
    approximation (SVD) of the projection ``Y (Y^H Y)^-1 Y^H G`` with
    Y = (G G^H)^q G omega (the whole projection for ``rank=None``), then the
    variant's map (``projunn_step``'s docstring), with SciPy's expm and polar."""
    W, G = W.astype(np.complex128), G.astype(np.complex128)
    Y = G @ omega.astype(np.complex128)
    for _ in range(power_iters):
        Y = G @ (mH(G) @ Y)
    Q = np.linalg.qr(Y)[0]
    U, S, Vh = np.linalg.svd(mH(Q) @ G, full_matrices=False)
    keep = S.size if rank is None else rank
    Gk = (Q @ U[:, :keep] * S[:keep]) @ Vh[:keep]
    A = Gk @ mH(W) - W @ mH(Gk)
    eye = np.eye(W.shape[0])
    if variant == "tangent":
        return scipy.linalg.expm(-lr / 2 * A) @ W
    if variant == "cayley":
        return np.linalg.solve(eye + lr / 2 * A, (eye - lr / 2 * A) @ W)
    return scipy.linalg.polar(W - lr * Gk)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("power_iters", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
def test_lean_step_gives_the_general_factors_bit_for_bit(dtype, variant, power_iters, n, monkeypatch):
    """Fresh unitary matrices and gradients, two seeds each: the lean factors
    equal the general NumPy step's exactly (the same operations in the same
    order), the sketch's generator ends in the same state, and the step
    agrees with the float64 reference of the same sketch."""
    rng = np.random.default_rng([n, power_iters, DTYPES.index(dtype)])
    for seed in range(2):
        W, G = _pair(rng, n, dtype)
        (L, Rh), stream, results = _update(W, G, seed, monkeypatch, variant=variant, power_iters=power_iters)
        assert len(results) == 1 and results[0] is not None  # the lean step gave them
        (L0, Rh0), stream0, off = _update(W, G, seed, monkeypatch, lean=False, variant=variant,
                                          power_iters=power_iters)
        assert off == [] and stream == stream0
        assert L.dtype == Rh.dtype == W.dtype and L.shape == (n, 2) and Rh.shape == (2, n)
        assert np.array_equal(L, L0) and np.array_equal(Rh, Rh0)
        # the sketch's draw as _random.host_normal makes it: (1, n), complex from two real draws
        parts = np.random.default_rng(seed).standard_normal((2, 1, n) if "complex" in dtype else (1, 1, n))
        omega = ((parts[0] + 1j * parts[1]) * np.sqrt(0.5) if "complex" in dtype else parts[0]).T.astype(dtype)
        new = W + L @ Rh
        reference = _reference(W, G, omega, lr=0.05, variant=variant, power_iters=power_iters)
        assert np.abs(new - reference).max() < 50 * TOL[dtype]
        assert unitarity(new) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("power_iters", [0, 1, 2])
@pytest.mark.parametrize("n, rank, oversample", [(2, 2, 0), (5, 2, 1), (7, 3, 0), (40, 2, 0), (40, 3, 2), (64, 8, 0)])
def test_wide_sketches_give_the_general_factors_bit_for_bit(dtype, variant, power_iters, n, rank, oversample,
                                                             monkeypatch):
    """Sketches of two or more columns (rank >= 2, or oversampled; NumPy's
    BLAS takes two and three columns one at a time): the lean factors equal
    the general NumPy step's exactly, the generator ends in the same state,
    and the step agrees with the float64 reference of the same sketch,
    truncated to ``rank``."""
    rng = np.random.default_rng([n, rank, oversample, power_iters, DTYPES.index(dtype)])
    l = rank + oversample
    for seed in range(2):
        W, G = _pair(rng, n, dtype)
        options = dict(variant=variant, power_iters=power_iters, rank=rank, oversample=oversample)
        (L, Rh), stream, results = _update(W, G, seed, monkeypatch, **options)
        assert len(results) == 1 and results[0] is not None
        (L0, Rh0), stream0, off = _update(W, G, seed, monkeypatch, lean=False, **options)
        assert off == [] and stream == stream0
        assert L.dtype == Rh.dtype == W.dtype and L.shape == (n, 2 * l) and Rh.shape == (2 * l, n)
        assert np.array_equal(L, L0) and np.array_equal(Rh, Rh0)
        parts = np.random.default_rng(seed).standard_normal((2, l, n) if "complex" in dtype else (1, l, n))
        omega = ((parts[0] + 1j * parts[1]) * np.sqrt(0.5) if "complex" in dtype else parts[0]).T.astype(dtype)
        new = W + L @ Rh
        reference = _reference(W, G, omega, lr=0.05, variant=variant, power_iters=power_iters, rank=rank)
        assert np.abs(new - reference).max() < 50 * TOL[dtype]
        assert unitarity(new) < TOL[dtype]


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("case", ["nan", "inf", "not unitary", "zero", "huge", "tiny", "batch", "factors"])
def test_out_of_the_ordinary_steps_end_as_the_general_step_does(case, rank, monkeypatch):
    """NaN and Inf in G, a W that is not unitary: the general step's error,
    word for word; a zero gradient gives W back; gradients of 1e30 and 1e-30
    (float32 panels whose columns need balancing or rescaling) and the
    steps that are not its case (a batch of matrices, a factored gradient)
    get the general step's factors bit for bit."""
    W, G = _pair(np.random.default_rng(8), 12, "float32", scale={"huge": 1e30, "tiny": 1e-30}.get(case, 1.0))
    # a huge G at an lr that makes its step's angle about 0.3: at lr=0.05 the
    # angle (about 1e29) is below rounding once reduced to [-pi, pi], and
    # whether a rotation by it moves W depends on that rounding
    options = {"rank": rank, **({"lr": 1e-31} if case == "huge" else {})}
    if case == "nan":
        G[2, 3] = np.nan
    elif case == "inf":
        G[0, 0] = np.inf
    elif case == "not unitary":
        W = 2 * W
    elif case == "zero":
        G = np.zeros_like(G)
    elif case == "batch":
        W, G = np.stack([W, W]), np.stack([G, -G])
    elif case == "factors":
        G = (np.ones((12, 3), np.float32), np.arange(36, dtype=np.float32).reshape(12, 3))
    ours, stream, results = _update(W, G, 5, monkeypatch, **options)
    reference, stream0, _ = _update(W, G, 5, monkeypatch, lean=False, **options)
    assert stream == stream0
    if case in ("nan", "inf", "not unitary"):
        assert results == [None] and isinstance(ours, str) and ours == reference
        assert ("NaN or Inf" in ours) if case != "not unitary" else ("not unitary" in ours)
        return
    assert len(results) == (0 if case in ("batch", "factors") else 1)
    assert all(np.array_equal(a, b) for a, b in zip(ours, reference))
    if case == "zero":
        assert np.array_equal(W + ours[0] @ ours[1], W)
    if case == "huge":
        assert unitarity(W + ours[0] @ ours[1]) < 1e-5 and not np.allclose(W + ours[0] @ ours[1], W)


@pytest.mark.parametrize("rank", [1, 4])
def test_numpy_arrays_are_not_changed_and_steps_are_unitary(rank):
    """projunn_step of NumPy arrays through the lean step, at rank 1 and 4:
    W and G as they were (read-only arrays step too), a new unitary W in W's
    dtype, a transposed (column-major) W and G stepped as their row-major
    copies, to rounding (the BLAS sums their products in another order)."""
    W, G = _pair(np.random.default_rng(2), 40, "complex64")
    W0, G0 = W.copy(), G.copy()
    W.flags.writeable = G.flags.writeable = False
    new = projunn_step(W, G, lr=0.1, rank=rank, rng=1)
    assert np.array_equal(W, W0) and np.array_equal(G, G0)
    assert new.dtype == W.dtype and unitarity(new) < 2e-5 and not np.allclose(new, W)
    Wt, Gt = np.ascontiguousarray(W.T).T, np.ascontiguousarray(G.T).T
    assert np.allclose(projunn_step(Wt, Gt, lr=0.1, rank=rank, rng=1), new, rtol=0, atol=1e-5)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("rank", [1, 8])
def test_torch_cpu_tensors_step_through_their_numpy_views(dtype, variant, rank, monkeypatch):
    """A small PyTorch CPU parameter (with autograd history) and its
    gradient, transposed views of them, and blocks of larger matrices
    (rows farther apart than their length), at rank 1 and 8: the factors
    are CPU tensors of W's dtype, equal bit for bit to the general NumPy
    step's on the same memory; projunn_step gives a tensor, W is not
    changed."""
    W, G = _pair(np.random.default_rng(4), 24, dtype)
    wider = torch.zeros(24, 29, dtype=getattr(torch, dtype))  # a block of a larger matrix: rows 29 apart
    blocks = (wider[:, 2:26].copy_(torch.from_numpy(W)), wider.clone()[:, 2:26].copy_(torch.from_numpy(G)))
    for Wt, Gt in [(torch.nn.Parameter(torch.from_numpy(W.copy())), torch.from_numpy(G.copy())),
                   (torch.from_numpy(np.ascontiguousarray(W.T)).mT, torch.from_numpy(np.ascontiguousarray(G.T)).mT),
                   blocks]:
        (L0, Rh0), _, _ = _update(Wt.detach().numpy(), Gt.numpy(), 3, monkeypatch, lean=False, variant=variant,
                                  rank=rank)
        (L, Rh), _, results = _update(Wt, Gt, 3, monkeypatch, variant=variant, rank=rank)
        assert len(results) == 1 and results[0] is not None
        assert isinstance(L, torch.Tensor) and L.dtype == Wt.dtype and L.device.type == "cpu"
        assert np.array_equal(L.numpy(), L0) and np.array_equal(Rh.numpy(), Rh0)
        before = Wt.detach().clone()
        new = projunn_step(Wt, Gt, lr=0.05, variant=variant, rank=rank, rng=3)
        assert isinstance(new, torch.Tensor) and not new.requires_grad and torch.equal(Wt, before)
        assert np.allclose(new.numpy(), W + L0 @ Rh0, rtol=0, atol=10 * TOL[dtype])


def test_which_pairs_take_the_lean_step():
    """Two 2-D square NumPy arrays of one float dtype below the cache size,
    or small PyTorch CPU tensors without conjugate or negative bits (not
    sparse) as their NumPy views; nothing else (those get the general step)."""
    W = np.eye(4, dtype=np.float32)
    assert _lean_numpy.host_arrays(W, W) is not None
    refused = [
        (W, W.astype(np.float64)), (W, W[:3]), (W[:3], W[:3]), (W[None], W[None]), (W[:0, :0], W[:0, :0]),
        (W.astype(np.float16), W.astype(np.float16)), (W.astype(np.int64), W.astype(np.int64)),
        (np.zeros((2048, 2048), np.float32), np.zeros((2048, 2048), np.float32)),  # 16 MiB: blocked
        (W, torch.eye(4)), (torch.eye(4), W),
    ]
    for pair in refused:
        assert _lean_numpy.host_arrays(*pair) is None, [(type(x), x.dtype, x.shape) for x in pair]
    not_viewed = [
        (torch.eye(4, dtype=torch.complex64).conj(), torch.eye(4, dtype=torch.complex64)),
        (torch.eye(4), torch.eye(4, dtype=torch.complex64).conj().imag),  # a negative bit
        (torch.eye(4).to_sparse(), torch.eye(4)),
    ]
    for pair in not_viewed:
        assert _host._torch_numpy_views(*pair) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_larger_cpu_tensors_take_pytorchs_own_step(threads):
    """Beyond 256 KiB (1 MiB where PyTorch runs one thread) a CPU tensor
    keeps PyTorch's own operations: NumPy's BLAS threads would contend with
    PyTorch's."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        limit = 512 if threads == 1 else 256
        assert _host._torch_numpy_views(torch.eye(limit), torch.eye(limit)) is not None
        assert _host._torch_numpy_views(torch.eye(limit + 1), torch.eye(limit + 1)) is None
    finally:
        torch.set_num_threads(before)
    for dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        W, G = torch.nn.Parameter(torch.eye(3, dtype=dtype)), torch.eye(3, dtype=dtype)
        views = _host._torch_numpy_views(W, G)
        assert np.shares_memory(views[0], W.detach().numpy()) and _lean_numpy.host_arrays(*views) is not None
    assert _host.lean_arrays(W.detach().numpy(), G.numpy()) is not None


def test_a_small_cpu_tensor_runs_no_aten_operation(monkeypatch):
    """The factors of a 64 x 64 float32 CPU tensor's step come from NumPy:
    no aten operation but views (the counted budgets of PyTorch's own step,
    the GPU's, are in test_op_counts), no host transfer; the same with the
    optimizer's call."""
    from _aten import AtenOps

    W, G = (torch.from_numpy(x) for x in _pair(np.random.default_rng(1), 64, "float32"))
    before = _host.transfers.count
    with AtenOps() as ops:
        L, Rh = projunn_update(W, G, lr=0.1, rng=0)
    assert [op.name for op in ops.ops if not op.view] == []
    assert _host.transfers.count == before
    with AtenOps() as ops:
        projunn_step(W, G, lr=0.1, rng=0)
    assert [op.name for op in ops.ops if not op.view] == ["aten.addmm.default"]
