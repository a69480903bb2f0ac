"""PyTorch's lean eager rank-1 step (``unitary_lr.torch._lean``), which the
optimizer and the free functions take: the factors of the general step bit
for bit, the same random stream, and, for anything out of the ordinary, the
general step's own result or error."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from _helpers import haar, random_matrix, unitarity  # noqa: E402

from unitary_lr import projunn_step  # noqa: E402
from unitary_lr._random import generator_state  # noqa: E402
from unitary_lr.optim import unitary_factors  # noqa: E402
from unitary_lr.torch import ProjUNN, _lean  # noqa: E402

# PyTorch's own operations, the steps a GPU runs (see conftest.torch_operations)
pytestmark = pytest.mark.usefixtures("torch_operations")

DTYPES = {"float32": torch.float32, "complex64": torch.complex64}


def _group(**options):
    return {"lr": 0.05, "rank": 1, "variant": "tangent", "oversample": 0, "power_iters": 1, **options}


def _pair(rng, n, dtype, scale=1.0, device="cpu"):
    W = torch.from_numpy(haar(rng, n, "complex128" if dtype.is_complex else "float64")).to(device, dtype)
    G = torch.from_numpy(random_matrix(rng, (n, n), "complex128" if dtype.is_complex else "float64") * scale)
    return W, G.to(device, dtype)


# the lean step runs wherever a float32 matrix does; on a CUDA device its
# sketch and small results travel through page-locked memory (_host.from_host)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="PyTorch sees no CUDA device"))]


def _lean_on(monkeypatch, lean=True):
    """The lean step spied on (the list it returns gets each call's result,
    None where it handed the step over) or switched off (every step takes
    the general way; the list stays empty). ``monkeypatch.undo()`` ends it."""
    results = []
    if lean:
        real = _lean.lean_factors
        monkeypatch.setattr(_lean, "lean_factors",
                            lambda *args, **kwargs: results.append(real(*args, **kwargs)) or results[-1])
    else:
        monkeypatch.setattr(_lean, "takes_lean_step", lambda *args: False)
    return results


def _factors(W, G, seed, group, monkeypatch, lean=True):
    """``unitary_factors`` of W and G (the optimizer's call), the lean path on
    or off; the factors, the sketch stream's state and the lean path's results."""
    results = _lean_on(monkeypatch, lean)
    rng = np.random.default_rng(seed)
    try:
        factors = unitary_factors(W, G, lr=group["lr"], rank=group["rank"], variant=group["variant"], rng=rng,
                                  oversample=group["oversample"], power_iters=group["power_iters"],
                                  arrays_checked=True)
    finally:
        monkeypatch.undo()
    return factors, generator_state(rng), results


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("power_iters", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 5, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_lean_step_gives_the_general_factors_bit_for_bit(dtype, variant, power_iters, n, device, monkeypatch):
    """Fresh unitary matrices and gradients, three seeds each: the lean
    factors equal the general step's exactly (the same operations in the
    same order, on W's device), and the sketch's generator ends in the same
    state."""
    rng = np.random.default_rng(n * 100 + power_iters)
    group = _group(variant=variant, power_iters=power_iters)
    for seed in range(3):
        W, G = _pair(rng, n, DTYPES[dtype], device=device)
        (L0, Rh0), stream, results = _factors(W, G, seed, group, monkeypatch)
        assert len(results) == 1 and results[0] is not None  # the lean path gave them
        (L, Rh), state, _ = _factors(W, G, seed, group, monkeypatch, lean=False)
        assert torch.equal(L0, L) and torch.equal(Rh0, Rh)
        assert stream == state
        assert L0.device == W.device and Rh0.device == W.device
        new = (W + L0 @ Rh0).to("cpu", torch.complex128).numpy()
        assert unitarity(new) < 1e-5


@pytest.mark.parametrize(("case", "dtype", "options"), [
    ("float64", torch.float64, {}),
    ("complex128", torch.complex128, {}),
    ("rank 2", torch.float32, {"rank": 2}),
    ("oversampled", torch.float32, {"oversample": 1}),
])
def test_other_steps_are_left_to_the_general_step(case, dtype, options, monkeypatch):
    """Steps outside the lean case (64-bit matrices, whose small cores are not
    wider than W; ranks or sketches of two or more columns) never reach the
    lean step, and take the general step's draw."""
    rng = np.random.default_rng(0)
    W, G = _pair(rng, 6, dtype)
    _, stream, results = _factors(W, G, 1, _group(**options), monkeypatch)
    assert results == [], case
    assert stream == _factors(W, G, 1, _group(**options), monkeypatch, lean=False)[1]


def test_rectangular_and_batched_steps_are_left_to_the_general_step():
    W = torch.linalg.qr(torch.randn(6, 3))[0]
    assert not _lean.takes_lean_step(W, torch.randn(6, 3), (3, 1))
    W = torch.linalg.qr(torch.randn(2, 4, 4))[0]
    assert not _lean.takes_lean_step(W, torch.randn(2, 4, 4), (2, 4, 1))
    assert not _lean.takes_lean_step(torch.eye(4), torch.randn(4, 4, dtype=torch.float64), (4, 1))
    assert not _lean.takes_lean_step(torch.eye(4), (torch.randn(4, 3), torch.randn(4, 3)), (4, 1))


def _free_step(W, G, seed, monkeypatch, lean, **options):
    """``projunn_step`` of W and G (the free function, its own checks), the
    lean path on or off: the new W or the error's message, and the lean
    path's results (one per call)."""
    calls = _lean_on(monkeypatch, lean)
    try:
        return projunn_step(W, G, lr=0.05, rng=seed, **options), calls
    except ValueError as error:
        return str(error), calls
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("device", DEVICES)
def test_projunn_step_takes_the_lean_step(dtype, variant, device, monkeypatch):
    """The free function on one square float32 or complex64 matrix (here a
    parameter that requires grad, as a user's may) goes the lean way and
    gives the general step's W bit for bit, on W's device, unitary and
    without autograd history."""
    W, G = _pair(np.random.default_rng(7), 32, DTYPES[dtype], device=device)
    W = torch.nn.Parameter(W)
    ours, calls = _free_step(W, G, 3, monkeypatch, True, variant=variant)
    reference, _ = _free_step(W, G, 3, monkeypatch, False, variant=variant)
    assert len(calls) == 1
    assert torch.equal(ours, reference)
    assert not ours.requires_grad and ours.grad_fn is None
    assert not torch.equal(ours, W.detach()) and ours.device == W.device
    assert unitarity(ours.to("cpu", torch.complex128).numpy()) < 1e-5


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_projunn_step_on_transposed_views(dtype, monkeypatch):
    """W and G as transposed views (column-major, as LAPACK's results are):
    the lean step takes them and gives the general step's W bit for bit."""
    W, G = _pair(np.random.default_rng(11), 24, DTYPES[dtype])
    W, G = W.mT.contiguous().mT, G.mT
    assert not W.is_contiguous() and not G.is_contiguous()
    ours, calls = _free_step(W, G, 5, monkeypatch, True)
    reference, _ = _free_step(W, G, 5, monkeypatch, False)
    assert len(calls) == 1
    assert torch.equal(ours, reference)
    assert unitarity(ours.to(torch.complex128).numpy()) < 1e-5


@pytest.mark.parametrize("case", ["nan", "not unitary", "factors"])
def test_projunn_step_out_of_the_ordinary(case, monkeypatch):
    """A NaN gradient and a W that is not unitary get the general step's
    error through the free function too; a factored gradient is not the
    lean step's case and steps as before."""
    W, G = _pair(np.random.default_rng(8), 10, torch.float32)
    if case == "nan":
        G[2, 2] = float("nan")
    elif case == "not unitary":
        W = 2 * W
    else:
        G = (torch.randn(10, 3), torch.randn(10, 3))
    ours, calls = _free_step(W, G, 4, monkeypatch, True)
    reference, _ = _free_step(W, G, 4, monkeypatch, False)
    assert len(calls) == (0 if case == "factors" else 1)
    if case == "factors":
        assert torch.equal(ours, reference)
    else:
        assert isinstance(ours, str) and ours == reference
        assert ("NaN" in ours) if case == "nan" else ("not unitary" in ours)


def _optimizers_step(make_params, steps, lean, monkeypatch):
    """``steps`` steps of ProjUNN(rmsprop) on the parameters, the lean path
    on or off; the parameters and their states."""
    _lean_on(monkeypatch, lean)
    params = make_params()
    opt = ProjUNN([{"params": params, "unitary": True}], lr=0.02, base="rmsprop", rank=1, seed=4,
                  drift_check_every=5)
    generator = torch.Generator().manual_seed(9)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        opt.step()
    monkeypatch.undo()
    return [p.detach().clone() for p in params], opt.state_dict()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_optimizer_runs_with_the_lean_step_as_without_it(dtype, monkeypatch):
    """Thirty steps of two parameters, drift checks every fifth: the same
    parameters bit for bit and the same state (moments, step counts, saved
    sketch streams) with the lean step as with the general one."""
    def make_params():
        rng = np.random.default_rng(3)
        return [torch.nn.Parameter(_pair(rng, n, DTYPES[dtype])[0]) for n in (8, 24)]

    with_lean, state = _optimizers_step(make_params, 30, True, monkeypatch)
    without, reference = _optimizers_step(make_params, 30, False, monkeypatch)
    for a, b in zip(with_lean, without):
        assert torch.equal(a, b)
        assert unitarity(a.to(torch.complex128).numpy()) < 1e-5
    for key, value in reference["state"].items():
        for name, entry in value.items():
            ours = state["state"][key][name]
            assert torch.equal(ours, entry) if isinstance(entry, torch.Tensor) else ours == entry, name


def test_lean_step_is_taken_for_a_float32_square_parameter(monkeypatch):
    """The optimizer's float32 square rank-1 step goes the lean way (a spy on
    ``lean_factors``), and its result is a step (W changed, still unitary)."""
    calls = _lean_on(monkeypatch)
    p = torch.nn.Parameter(_pair(np.random.default_rng(0), 16, torch.float32)[0])
    before = p.detach().clone()
    opt = ProjUNN([{"params": [p], "unitary": True}], lr=0.05, base="rmsprop", rank=1)
    p.grad = torch.randn(16, 16)
    opt.step()
    assert len(calls) == 1
    assert not torch.equal(p.detach(), before)
    assert unitarity(p.detach().double().numpy()) < 1e-5


def _one_step(p0, grad, monkeypatch, lean):
    """One ProjUNN(sgd) step of a copy of p0, the lean path on or off: the new
    parameter or the error's message, the saved sketch stream, and the lean
    path's results."""
    results = _lean_on(monkeypatch, lean)
    p = torch.nn.Parameter(p0.clone())
    opt = ProjUNN([{"params": [p], "unitary": True}], lr=0.05, base="sgd", rank=1, seed=2)
    p.grad = grad.clone()
    try:
        opt.step()
        outcome = p.detach().clone()
    except ValueError as error:
        outcome = str(error)
    monkeypatch.undo()
    return outcome, opt.state[p].get("sketch_rng"), results


@pytest.mark.parametrize("case", ["nan", "inf", "not unitary", "huge", "tiny", "rank-one"])
def test_out_of_the_ordinary_steps_end_as_the_general_step_does(case, monkeypatch):
    """NaN or Inf in the gradient, a W that is not unitary (both refused
    with the general step's message), gradients of 1e30 and 1e-30 (panels
    that need balancing) and a rank-one gradient (a basis that may need
    Newton-Schulz steps): the lean path ends as the general one, the same
    parameter bit for bit or the same error."""
    rng = np.random.default_rng(5)
    W, G = _pair(rng, 12, torch.float32)
    if case == "nan":
        G[3, 4] = float("nan")
    elif case == "inf":
        G[0, 0] = float("inf")
    elif case == "not unitary":
        W = W * 1.5
    elif case == "huge":
        G = G * 1e30
    elif case == "tiny":
        G = G * 1e-30
    elif case == "rank-one":
        u = torch.randn(12, 1)
        G = W @ u @ u.mT + 1e-7 * G
    *ours, results = _one_step(W, G, monkeypatch, True)
    *reference, _ = _one_step(W, G, monkeypatch, False)
    assert len(results) == 1
    # handed to the general step (rank-one: a step of its own, whatever its basis needs)
    assert (results[0] is None) == (case != "rank-one"), case
    assert ours[1] == reference[1]  # the saved sketch stream
    if isinstance(reference[0], str):
        assert ours[0] == reference[0]
        assert ("NaN" in ours[0] or "Inf" in ours[0]) if case in ("nan", "inf") else "not unitary" in ours[0]
    else:
        assert torch.equal(ours[0], reference[0]), case
        assert unitarity(ours[0].double().numpy()) < 1e-5


@pytest.mark.parametrize(("case", "make", "error", "message"), [
    ("G of another shape", lambda W: (W, torch.randn(6, 5)), ValueError,
     r"^G must have shape \(\.\.\., 6, 6\) to match W of shape \(6, 6\), got shape \(6, 5\)$"),
    ("G a vector", lambda W: (W, torch.randn(6)), ValueError,
     r"^G must have shape \(\.\.\., m, n\), got shape \(6,\)$"),
    ("G of integers", lambda W: (W, torch.ones(6, 6, dtype=torch.int64)), TypeError,
     r"^G has dtype torch.int64; expected one of "),
    ("G complex, W real", lambda W: (W, torch.randn(6, 6, dtype=torch.complex64)), TypeError,
     r"^G has complex dtype torch.complex64 but W is real \(torch.float32\)"),
    ("G a NumPy array", lambda W: (W, np.ones((6, 6), np.float32)), TypeError,
     r"^W is a torch.Tensor but G is a numpy.ndarray; pass arrays from one library$"),
    ("W empty", lambda W: (W[:0, :0], torch.randn(0, 0)), ValueError, r"^W must not be empty, got shape \(0, 0\)$"),
])
def test_pairs_not_known_good_get_the_full_checks(case, make, error, message):
    """The lean step's glance at W and G (``lean_arrays``) passes only pairs
    it knows good; any other pair gets the general checks, which name the
    argument at fault, as they do for NumPy arrays."""
    W, G = make(_pair(np.random.default_rng(1), 6, torch.float32)[0])
    assert _lean.lean_arrays(W, G) is None, case
    with pytest.raises(error, match=message):
        projunn_step(W, G, lr=0.1)


def test_known_good_pairs_lose_their_autograd_history_only():
    """A parameter and a gradient that requires grad come back as detached
    views of the same memory; plain tensors as they are."""
    W, G = _pair(np.random.default_rng(2), 5, torch.complex64)
    p, g = torch.nn.Parameter(W), G.clone().requires_grad_()
    W1, G1 = _lean.lean_arrays(p, g)
    assert not W1.requires_grad and not G1.requires_grad
    assert W1.data_ptr() == p.data_ptr() and G1.data_ptr() == g.data_ptr()
    W2, G2 = _lean.lean_arrays(W, G)
    assert W2 is W and G2 is G


def test_a_rank_above_the_size_names_the_limit():
    """rank > n is refused with the limit and its reason (the message made
    only when it is needed)."""
    W, G = _pair(np.random.default_rng(3), 4, torch.float32)
    with pytest.raises(ValueError, match=r"^rank must be <= 4 = min\(n, m\) for W of shape \(4, 4\), got 5$"):
        projunn_step(W, G, lr=0.1, rank=5)
    with pytest.raises(ValueError, match=r"^rank must be >= 1, got 0$"):
        projunn_step(W, G, lr=0.1, rank=0)
