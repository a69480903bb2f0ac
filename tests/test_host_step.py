"""Small PyTorch CPU tensors with a sketch of two or more columns (rank >= 2,
or oversampled) take NumPy's step on their NumPy views
(``unitary_lr._host.host_views``; one square matrix by the host's lean
step, the others by the general step): the factors of NumPy's step on the
same memory bit for bit, a step that agrees with PyTorch's own operations
to rounding, PyTorch's own errors, and the limits on which tensors go that
way (the size, PyTorch's threads, complex matrices)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import haar, random_matrix, unitarity

from unitary_lr import _host, projunn_step
from unitary_lr.steps import projunn_update, projunn_update_stacked

torch = pytest.importorskip("torch")

DTYPES = ["float32", "complex64", "float64", "complex128"]
TOL = {"float32": 2e-5, "complex64": 2e-5, "float64": 1e-12, "complex128": 1e-12}


def _pair(rng, shape, dtype):
    """A Haar-random W with orthonormal columns (rows where it is wide) and a
    gradient, (..., n, m), as NumPy arrays of ``dtype``."""
    wide = "complex128" if "complex" in dtype else "float64"
    *batch, n, m = shape
    Q = haar(rng, max(n, m), wide, batch=tuple(batch))[..., :n, :m]
    return Q.astype(dtype), random_matrix(rng, shape, wide).astype(dtype)


def _host_steps(monkeypatch):
    """Spy on the NumPy views that NumPy's step of tensors takes (one square
    matrix by the host's lean step, ``unitary_lr._lean_numpy``, the others
    by the general step): the list gets each call's (W view, G view)."""
    calls = []
    real = _host.host_views

    def spy(*args):
        views = real(*args)
        if views is not None:
            calls.append(views)
        return views

    monkeypatch.setattr(_host, "host_views", spy)
    return calls


def _through_torch(monkeypatch):
    monkeypatch.setattr(_host, "TORCH_NUMPY_BYTES", -1)
    monkeypatch.setattr(_host, "TORCH_NUMPY_BYTES_ONE_THREAD", -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("shape,options", [
    ((24, 24), {"rank": 2}), ((24, 24), {"rank": 8, "power_iters": 2}), ((24, 24), {"rank": 1, "oversample": 3}),
    ((3, 16, 16), {"rank": 4}), ((3, 16, 16), {"rank": 1}), ((20, 12), {"rank": 3}), ((12, 20), {"rank": 3}),
])
def test_tensors_take_numpys_step_on_their_views(dtype, variant, shape, options, monkeypatch):
    """Square, batched (rank 1 too: the host's lean step takes one matrix
    only), tall and wide W, every variant and dtype: the factors
    are CPU tensors equal bit for bit to NumPy's step's on the same arrays
    (one sketch draw, so one random stream), and agree to rounding with
    PyTorch's own operations; projunn_step leaves W and G as they were and
    gives a W with orthonormal columns."""
    rng = np.random.default_rng([len(shape), shape[-1], options["rank"], DTYPES.index(dtype)])
    W, G = _pair(rng, shape, dtype)
    Wt, Gt = torch.nn.Parameter(torch.from_numpy(W.copy())), torch.from_numpy(G.copy())
    calls = _host_steps(monkeypatch)
    L, Rh = projunn_update(Wt, Gt, lr=0.05, variant=variant, rng=7, **options)
    assert len(calls) == 1 and np.shares_memory(calls[0][0], Wt.detach().numpy())
    assert all(isinstance(x, torch.Tensor) and x.dtype == Wt.dtype and x.device.type == "cpu" for x in (L, Rh))
    L0, Rh0 = projunn_update(W, G, lr=0.05, variant=variant, rng=7, **options)
    assert np.array_equal(L.numpy(), L0) and np.array_equal(Rh.numpy(), Rh0)

    monkeypatch.undo()
    _through_torch(monkeypatch)
    calls = _host_steps(monkeypatch)
    L1, Rh1 = projunn_update(Wt, Gt, lr=0.05, variant=variant, rng=7, **options)
    assert calls == []
    ours, theirs = (W + L0 @ Rh0), (Wt + L1 @ Rh1).detach().numpy()
    assert np.allclose(ours, theirs, rtol=0, atol=20 * TOL[dtype])

    monkeypatch.undo()
    before = Wt.detach().clone(), Gt.clone()
    new = projunn_step(Wt, Gt, lr=0.05, variant=variant, rng=7, **options)
    assert torch.equal(Wt, before[0]) and torch.equal(Gt, before[1])
    assert isinstance(new, torch.Tensor) and not new.requires_grad and new.dtype == Wt.dtype
    assert np.allclose(new.numpy(), ours, rtol=0, atol=20 * TOL[dtype])
    assert float(np.max(unitarity(new.numpy() if shape[-2] >= shape[-1] else np.swapaxes(new.numpy(), -1, -2)))) \
        < 50 * TOL[dtype]
    assert not np.allclose(new.numpy(), W, rtol=0, atol=100 * TOL[dtype])


@pytest.mark.parametrize("dtypes", [("float32", "float64"), ("float64", "float32"), ("complex64", "complex128")])
def test_a_pair_of_two_dtypes_takes_numpys_step_bit_for_bit(dtypes, monkeypatch):
    """W and G of two precisions (a valid pair) stay on this route, and the
    sketch is made in G's dtype there too, as NumPy's own step and
    PyTorch's make it: the factors equal NumPy's on the same arrays."""
    rng = np.random.default_rng([7, len(dtypes[0])])
    W, G = _pair(rng, (20, 20), dtypes[0])
    G = G.astype(dtypes[1])
    calls = _host_steps(monkeypatch)
    L, Rh = projunn_update(torch.from_numpy(W), torch.from_numpy(G), lr=0.05, rank=4, rng=3)
    assert calls  # (the host's lean step takes one dtype only, and hands the pair to NumPy's general step)
    L0, Rh0 = projunn_update(W, G, lr=0.05, rank=4, rng=3)
    assert L.numpy().dtype == L0.dtype and np.array_equal(L.numpy(), L0) and np.array_equal(Rh.numpy(), Rh0)


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("rank", [1, 8])
def test_stacked_tensors_take_numpys_step(dtype, rank, monkeypatch):
    """The optimizer's batched step of several small parameters
    (``projunn_update_stacked``): one NumPy step on the stack's views, the
    factors bit for bit those of the same call on NumPy arrays (the same
    generators), and to rounding those of PyTorch's own operations; every
    generator advanced as by separate steps."""
    rng = np.random.default_rng([rank, DTYPES.index(dtype)])
    pairs = [_pair(rng, (24, 24), dtype) for _ in range(3)]
    Ws, Gs = [torch.from_numpy(W) for W, _ in pairs], [torch.from_numpy(G) for _, G in pairs]

    def stacked(Ws, Gs):
        generators = [np.random.default_rng(seed) for seed in (5, 6, 7)]
        factors = projunn_update_stacked(Ws, Gs, lr=0.05, rank=rank, rngs=generators)
        return factors, [g.bit_generator.state for g in generators]

    calls = _host_steps(monkeypatch)
    ours, states = stacked(Ws, Gs)
    assert len(calls) == 1 and calls[0][0].shape == (3, 24, 24)
    reference, reference_states = stacked([W for W, _ in pairs], [G for _, G in pairs])
    assert states == reference_states
    assert all(isinstance(L, torch.Tensor) and np.array_equal(L.numpy(), L0) and np.array_equal(Rh.numpy(), Rh0)
               for (L, Rh), (L0, Rh0) in zip(ours, reference))
    monkeypatch.undo()
    _through_torch(monkeypatch)
    theirs, their_states = stacked(Ws, Gs)
    assert their_states == states
    for (L, Rh), (L1, Rh1), W in zip(ours, theirs, Ws):
        assert torch.allclose(W + L @ Rh, W + L1 @ Rh1, rtol=0, atol=20 * TOL[dtype])
        assert not torch.allclose(W + L @ Rh, W, rtol=0, atol=100 * TOL[dtype])


@pytest.mark.parametrize("case", ["nan", "inf", "not unitary"])
def test_errors_are_pytorchs_own(case, monkeypatch):
    """NaN or Inf in G, a W that is not unitary: NumPy's step raises, and the
    tensors' step ends as PyTorch's own operations end it, word for word,
    W and G unchanged."""
    W, G = _pair(np.random.default_rng(3), (16, 16), "float32")
    if case == "nan":
        G[2, 3] = np.nan
    elif case == "inf":
        G[0, 0] = -np.inf
    else:
        W = 2 * W
    Wt, Gt = torch.from_numpy(W.copy()), torch.from_numpy(G.copy())
    calls = _host_steps(monkeypatch)
    with pytest.raises(ValueError) as ours:
        projunn_step(Wt, Gt, lr=0.1, rank=4, rng=0)
    # the host's lean step, which hands the step over having changed nothing, then NumPy's general step
    assert len(calls) == 2 and all(np.shares_memory(views[0], Wt.numpy()) for views in calls)
    assert np.array_equal(Wt.numpy(), W) and np.array_equal(Gt.numpy(), G, equal_nan=True)
    monkeypatch.undo()
    _through_torch(monkeypatch)
    with pytest.raises(ValueError) as theirs:
        projunn_step(Wt, Gt, lr=0.1, rank=4, rng=0)
    assert str(ours.value) == str(theirs.value)
    assert ("NaN or Inf" in str(ours.value)) if case != "not unitary" else ("not unitary" in str(ours.value))


@pytest.mark.parametrize("threads", [1, 2])
def test_which_tensors_go_through_numpy(threads):
    """For a sketch of two or more columns and for ``randomized_svd``, the
    rank-1 limit where PyTorch runs one thread (float32 512 x 512: nothing
    contends with NumPy's BLAS threads), a quarter of it with several
    (float32 128 x 128);
    with several threads, complex matrices only below 4096 entries, whatever
    the sketch; never a rank-1 sketch of one matrix (the host's lean step
    has it; a batch's goes through NumPy), a factored gradient, a sparse
    tensor, or a NumPy array."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        limit = 512 if threads == 1 else 128
        for n, takes in [(limit, True), (limit + 1, False)]:
            W = torch.eye(n)
            assert (_host.host_step_views(_host_namespace(W), W, W, (n, 2)) is not None) is takes
            assert (_host.host_views(_host_namespace(W), W) is not None) is takes  # randomized_svd's matrix
        assert _host.host_step_views(_host_namespace(W), torch.eye(8), torch.eye(8), (8, 1)) is None
        stack = torch.eye(8).repeat(3, 1, 1)  # a batch at rank 1: not the lean step's case
        assert _host.host_step_views(_host_namespace(W), stack, stack, (3, 8, 1)) is not None
        assert _host.host_step_views(_host_namespace(W), torch.eye(8), torch.eye(8), None) is None
        for dtype in (torch.complex64, torch.complex128):
            for n, takes in [(63, True), (64, threads == 1)]:
                W = torch.eye(n, dtype=dtype)
                assert (_host._torch_numpy_views(W, W) is not None) is takes
                assert (_host.host_step_views(_host_namespace(W), W, W, (n, 2)) is not None) is takes
        # float32 64 x 64 (16 KiB) within every limit: real tensors are not bound by entries
        W = torch.eye(64)
        assert _host._torch_numpy_views(W, W) is not None
        sparse = torch.eye(8).to_sparse()
        assert _host.host_step_views(_host_namespace(W), sparse, torch.eye(8), (8, 2)) is None
        eye = np.eye(8, dtype=np.float32)
        assert _host.host_step_views(_host_namespace(eye), eye, eye, (8, 2)) is None
    finally:
        torch.set_num_threads(before)


def _host_namespace(x):
    from unitary_lr._xp import namespace

    return namespace(x)


def test_a_small_cpu_tensor_of_rank_8_runs_no_aten_operation():
    """The factors of a rank-8 step of a 64 x 64 float32 CPU tensor come from
    NumPy (the host's lean step): no aten operation but views, no host
    transfer; projunn_step adds them with one ``addmm``. A batch of such
    tensors takes NumPy's general step, which counts its one read of the
    small Grams (of NumPy memory: no copy)."""
    from _aten import AtenOps

    W, G = (torch.from_numpy(x) for x in _pair(np.random.default_rng(1), (64, 64), "float32"))
    before = _host.transfers.count
    with AtenOps() as ops:
        projunn_update(W, G, lr=0.1, rank=8, rng=0)
    assert [op.name for op in ops.ops if not op.view] == []
    assert _host.transfers.count == before
    with AtenOps() as ops:
        projunn_step(W, G, lr=0.1, rank=8, rng=0)
    assert [op.name for op in ops.ops if not op.view] == ["aten.addmm.default"]
    Ws, Gs = torch.stack([W, W]), torch.stack([G, -G])
    with AtenOps() as ops:
        projunn_update(Ws, Gs, lr=0.1, rank=8, rng=0)
    assert [op.name for op in ops.ops if not op.view] == []
    assert _host.transfers.count == before + 1


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("rank", [1, 8])
def test_optimizer_steps_small_parameters_through_numpy(dtype, rank, monkeypatch):
    """ProjUNN on a small parameter at rank 1 (the host's lean step) and at
    its default rank, 8 (NumPy's general step): 30 steps through the NumPy
    views against the same steps by PyTorch's own operations, the same
    parameters to rounding, unitary, and moved."""
    from unitary_lr.torch import ProjUNN

    wide = "complex128" if dtype == "complex64" else "float64"
    start = torch.from_numpy(haar(np.random.default_rng(0), 32, wide)).to(getattr(torch, dtype))

    def run(through_numpy):
        if not through_numpy:
            _through_torch(monkeypatch)
        views, real = [], _host._torch_numpy_views
        monkeypatch.setattr(_host, "_torch_numpy_views", lambda *a, **k: views.append(real(*a, **k)) or views[-1])
        p = torch.nn.Parameter(start.clone())
        opt = ProjUNN([{"params": [p], "unitary": True}], lr=0.02, base="rmsprop", rank=rank, seed=4)
        generator = torch.Generator().manual_seed(9)
        for _ in range(30):
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            opt.step()
        monkeypatch.undo()
        return p.detach().clone(), sum(v is not None for v in views)

    (ours, viewed), (theirs, none) = run(True), run(False)
    assert viewed == 30 and none == 0
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-4) and (ours - start).abs().max() > 1e-2
    assert unitarity(ours.to(getattr(torch, wide)).numpy()) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (2, 24, 24)])
def test_randomized_svd_of_small_tensors_runs_in_numpy(dtype, shape, monkeypatch):
    """``randomized_svd`` of a small PyTorch CPU tensor: NumPy's on its view
    (the factors tensors, bit for bit those of the NumPy array with the same
    seed), to rounding PyTorch's own operations' factors; NaN gives
    PyTorch's own error."""
    from unitary_lr import randomized_svd

    rng = np.random.default_rng([len(shape), shape[-1], DTYPES.index(dtype)])
    A = random_matrix(rng, shape, dtype)
    At = torch.from_numpy(A.copy())
    views, real = [], _host.host_views
    monkeypatch.setattr("unitary_lr.rsvd.host_views", lambda *a, **k: views.append(real(*a, **k)) or views[-1])
    ours = randomized_svd(At, 3, rng=2)
    assert len(views) == 1 and views[0] is not None and np.shares_memory(views[0][0], At.numpy())
    reference = randomized_svd(A, 3, rng=2)
    assert all(isinstance(x, torch.Tensor) and np.array_equal(x.numpy(), y) for x, y in zip(ours, reference))
    monkeypatch.undo()
    _through_torch(monkeypatch)
    theirs = randomized_svd(At, 3, rng=2)
    scale = float(np.max(np.abs(reference.S)))
    assert np.allclose(ours.S.numpy(), theirs.S.numpy(), rtol=0, atol=50 * TOL[dtype] * scale)
    product = (ours.U * ours.S[..., None, :]) @ ours.Vh
    assert torch.allclose(product, (theirs.U * theirs.S[..., None, :]) @ theirs.Vh, rtol=0,
                          atol=50 * TOL[dtype] * scale)
    monkeypatch.undo()
    At[..., 1, 2] = float("nan")
    messages = []
    for through_torch in (False, True):
        if through_torch:
            _through_torch(monkeypatch)
        with pytest.raises(ValueError) as error:
            randomized_svd(At, 3, rng=2)
        messages.append(str(error.value))
        monkeypatch.undo()
    assert messages[0] == messages[1] and "NaN" in messages[0]
