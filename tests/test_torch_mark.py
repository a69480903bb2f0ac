"""The unitary mark (survives copies, reloads and conversions; refuses a matrix
that is not unitary), ``orthogonal(module, name)`` and projUNN as a retraction
after torch.optim optimizers."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re

import numpy as np
import pytest
import scipy.linalg

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import unitary_lr as ul
from unitary_lr import unitarity_error
from unitary_lr.torch import (
    ProjUNN,
    UnitaryParameter,
    UnitaryRNN,
    is_unitary,
    mark_unitary,
    orthogonal,
    projunn_retraction,
    unitary_parameter,
    unitary_tolerance,
)

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def error(W):
    return float(torch.max(unitarity_error(W.detach())))


def rounding(dtype):
    return 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-12


def polar_reference(A):
    """Closest unitary matrix, in float64/complex128 with SciPy."""
    A = A.detach().numpy().astype(np.complex128 if np.iscomplexobj(A.detach().numpy()) else np.float64)
    return scipy.linalg.polar(A)[0]


# --------------------------------------------------------------- the mark


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.rnn = UnitaryRNN(3, 6, complex=dtype.is_complex, dtype=torch.float64, generator=seeded())
        self.linear = orthogonal(torch.nn.Linear(6, 6, dtype=torch.float64), init="haar", generator=seeded(1))

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.linear(out.real if out.is_complex() else out)


def _deepcopy(model):
    return copy.deepcopy(model)


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _assign(model):
    state = copy.deepcopy(model.state_dict())  # plain tensors, no mark
    twin = Net()
    twin.load_state_dict(state, assign=True)
    assert torch.equal(twin.rnn.weight_hh.detach(), model.rnn.weight_hh.detach())
    return twin


def _to_float32(model):
    model.to(torch.float32)
    return model


def _double(model):
    return model.float().double()


@pytest.mark.parametrize("operation", [_deepcopy, _pickle, _torch_save, _assign, _to_float32, _double])
def test_mark_survives_copies_reloads_and_conversions_and_the_copy_trains_as_unitary(operation):
    model = Net()
    marked = {name for name, p in model.named_parameters() if is_unitary(p)}
    assert marked == {"rnn.weight_hh", "linear.weight"}
    twin = operation(model)
    assert {name for name, p in twin.named_parameters() if is_unitary(p)} == marked
    opt = ProjUNN(twin.parameters(), lr=1e-2, base="adam", seed=0)
    unitary_groups = [g for g in opt.param_groups if g["unitary"]]
    assert len(unitary_groups) == 1 and len(unitary_groups[0]["params"]) == 2
    dtype = twin.rnn.weight_hh.dtype
    x = torch.randn(5, 4, 3, dtype=dtype, generator=seeded(2))
    before = twin.linear.weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        twin(x).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(before, twin.linear.weight.detach())  # it was trained
    # after float() and double(), a float64 matrix holds float32 rounding
    tolerance = 1e-6 if operation is _double else rounding(dtype)
    for p in unitary_groups[0]["params"]:
        assert error(p) < tolerance


def test_a_deep_copied_parameter_keeps_its_class_and_a_pickled_one_too():
    W = unitary_parameter(4, dtype=torch.complex128, generator=seeded())
    for twin in (copy.deepcopy(W), pickle.loads(pickle.dumps(W))):
        assert type(twin) is UnitaryParameter and is_unitary(twin) and twin is not W
        assert isinstance(twin, torch.nn.Parameter) and twin.requires_grad
        assert torch.equal(twin.detach(), W.detach())
    buffer = io.BytesIO()
    torch.save({"W": W}, buffer)
    buffer.seek(0)
    assert is_unitary(torch.load(buffer, weights_only=True)["W"])  # a safe global


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_matrix_that_is_not_unitary_is_refused_and_left_as_it_is(dtype):
    linear = torch.nn.Linear(5, 5, dtype=torch.float64)  # Kaiming-uniform: far from orthogonal
    value = linear.weight.detach().to(dtype) if not dtype.is_complex else torch.complex(
        linear.weight.detach(), linear.weight.detach().flip(0)).to(dtype)
    p = torch.nn.Parameter(value.clone())
    expected = error(p)
    assert expected > 0.1
    with pytest.raises(ValueError, match=rf"param \(shape \(5, 5\), {str(dtype)[6:]}\) is not unitary: its unitarity "
                                         rf"error .* is {expected:.3g}, above the tolerance .*project=True"):
        mark_unitary(p)
    assert type(p) is torch.nn.Parameter and not is_unitary(p) and torch.equal(p.detach(), value)
    with pytest.raises(ValueError, match=r"n_or_tensor .* is not unitary"):
        unitary_parameter(value)
    # project=True: the polar factor, compared with SciPy's in float64
    assert mark_unitary(p, project=True) is p and is_unitary(p)
    np.testing.assert_allclose(p.detach().numpy(), polar_reference(value), atol=100 * rounding(dtype))
    q = unitary_parameter(value, project=True)
    np.testing.assert_allclose(q.detach().numpy(), polar_reference(value), atol=100 * rounding(dtype))


def test_tolerance_by_dtype_accepts_rounding_and_refuses_just_above():
    for dtype in DTYPES:
        tolerance = unitary_tolerance(dtype)
        n = 8
        # W = (1 + s) I has error sqrt(n) |(1 + s)^2 - 1| / sqrt(n) ~ 2 s
        for scale, accepted in ((0.25 * tolerance, True), (2 * tolerance, False)):
            p = torch.nn.Parameter(torch.eye(n, dtype=torch.float64).mul(1 + scale).to(dtype))
            if accepted:
                mark_unitary(p)
            else:
                with pytest.raises(ValueError, match="is not unitary"):
                    mark_unitary(p)
    # a float64 matrix made in float32 is off by ~1e-7: refused in float64
    W = unitary_parameter(32, dtype=torch.float32, init="haar", generator=seeded()).detach().double()
    with pytest.raises(ValueError, match="is not unitary"):
        mark_unitary(torch.nn.Parameter(W))
    with pytest.raises(TypeError, match=r"dtype must be float32, float64, complex64 or complex128, got torch.float16"):
        unitary_tolerance(torch.float16)


def test_bad_marks():
    with pytest.raises(TypeError, match=r"param must be a torch.Tensor, got ndarray"):
        mark_unitary(np.eye(3))
    with pytest.raises(TypeError, match=r"param has dtype torch.float16"):
        mark_unitary(torch.nn.Parameter(torch.eye(3, dtype=torch.float16)))
    with pytest.raises(ValueError, match=r"param must be a matrix or a batch of matrices, got shape \(3,\)"):
        mark_unitary(torch.nn.Parameter(torch.ones(3)))
    nan = torch.eye(3, dtype=torch.float64)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"is not unitary: its unitarity error .* is nan"):
        mark_unitary(torch.nn.Parameter(nan))
    with pytest.raises(ValueError, match=r"param \(shape \(3, 3\)\) cannot be projected: .*NaN"):
        mark_unitary(torch.nn.Parameter(nan.clone()), project=True)
    with pytest.raises(TypeError, match=r"project must be True or False, got 1"):
        mark_unitary(torch.nn.Parameter(torch.eye(3)), project=1)


def test_a_batched_mark_reports_the_largest_error():
    value = torch.eye(4, dtype=torch.complex128).repeat(3, 1, 1)
    value[1] *= 1.5
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4\), complex128\) is not unitary: .* is 1.25"):
        mark_unitary(torch.nn.Parameter(value))


def test_a_replacement_of_a_marked_parameter_is_checked_and_marked():
    rnn = UnitaryRNN(2, 4, dtype=torch.float64, generator=seeded())
    W = rnn.weight_hh
    rnn.weight_hh = torch.nn.Parameter(torch.eye(4, dtype=torch.float64))
    assert rnn.weight_hh is not W and is_unitary(rnn.weight_hh)
    with pytest.raises(ValueError, match=r"UnitaryRNN.weight_hh \(marked unitary; its replacement\) .* is not unitary"
                                         r".*delete it first \(del module.weight_hh\)"):
        rnn.weight_hh = torch.nn.Parameter(2 * torch.eye(4, dtype=torch.float64))
    assert torch.equal(rnn.weight_hh.detach(), torch.eye(4, dtype=torch.float64))
    del rnn.weight_hh
    rnn.weight_hh = torch.nn.Parameter(2 * torch.eye(4, dtype=torch.float64))  # explicitly a plain one
    assert not is_unitary(rnn.weight_hh)


# ------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_closest_is_the_polar_factor_of_the_weight(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6, dtype=dtype)
    W = layer.weight
    before = W.detach().clone()
    assert orthogonal(layer) is layer and layer.weight is W and is_unitary(W)
    np.testing.assert_allclose(W.detach().numpy(), polar_reference(before), atol=100 * rounding(dtype))
    assert error(W) < rounding(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_haar_is_unitary_and_seeded(dtype):
    layers = [orthogonal(torch.nn.Linear(5, 5, dtype=dtype), init="haar", generator=seeded(3)) for _ in range(2)]
    assert torch.equal(layers[0].weight.detach(), layers[1].weight.detach())
    assert error(layers[0].weight) < rounding(dtype) and is_unitary(layers[0].weight)
    batched = torch.nn.Module()
    batched.weight = torch.nn.Parameter(torch.zeros(3, 4, 4, dtype=dtype))
    orthogonal(batched, init="haar", generator=seeded())
    assert error(batched.weight) < rounding(dtype)
    assert not torch.equal(batched.weight[0].detach(), batched.weight[1].detach())


def test_orthogonal_bad_arguments_change_nothing():
    layer = torch.nn.Linear(3, 3)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"name must be one of the parameters of the Linear \('weight', 'bias'\), "
                                         r"got 'kernel'"):
        orthogonal(layer, "kernel")
    with pytest.raises(ValueError, match=r"Linear.bias must be a matrix or a batch of matrices, got shape \(3,\)"):
        orthogonal(layer, "bias")
    with pytest.raises(ValueError, match=r"init must be one of 'closest', 'haar', got 'identity'"):
        orthogonal(layer, init="identity")
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got Parameter"):
        orthogonal(layer.weight)
    assert torch.equal(layer.weight.detach(), before) and not is_unitary(layer.weight)


@pytest.mark.parametrize("how", ["model", "named", "group", "pickled"])
def test_a_parameter_marked_after_the_optimizer_was_built_is_refused_at_the_step(how):
    # orthogonal(layer) after ProjUNN(model.parameters()): the plain group
    # that the marks made took the weight off the group (0.5 after 3 steps)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6, dtype=torch.float64), torch.nn.Tanh(),
                                torch.nn.Linear(6, 1, dtype=torch.float64))
    params = {"model": model.parameters(), "named": model.named_parameters(),
              "group": [{"params": model.parameters()}], "pickled": model.parameters()}[how]
    opt = ProjUNN(params, lr=0.1)
    orthogonal(model[0])
    if how == "pickled":  # the optimizer's parameters are its own copies now
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    model(torch.ones(3, 6, dtype=torch.float64)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    name = "0.weight" if how == "named" else r"param_groups\[0\]\['params'\]\[0\]"
    with pytest.raises(ValueError, match=name + r" was marked unitary after the optimizer was built, and param group "
                                              r"0 steps it as a plain parameter.*no parameter was changed"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert not opt.state


def test_a_group_given_unitary_false_steps_marked_parameters_plainly():
    W = unitary_parameter(5, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = ProjUNN([W, b], lr=0.1, base="sgd", unitary=False)  # on purpose, for every parameter
    assert [g["unitary"] for g in opt.param_groups] == [False, False]
    W.grad, b.grad = torch.ones_like(W), torch.ones_like(b)
    expected = W.detach() - 0.1
    opt.step()
    assert torch.equal(W.detach(), expected)
    # a plain group formed by the marks, and a parameter marked after an
    # optimizer given unitary=False: the group's plain steps were asked for
    v = torch.nn.Parameter(torch.eye(3, dtype=torch.float64))
    opt = ProjUNN([{"params": [v], "unitary": False}], lr=0.1, base="sgd")
    mark_unitary(v)
    v.grad = torch.ones_like(v)
    opt.step()
    assert torch.equal(v.detach(), torch.eye(3, dtype=torch.float64) - 0.1)
    # a parameter marked since that has no gradient is not stepped: no error
    u = torch.nn.Parameter(torch.eye(3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = ProjUNN([u, c], lr=0.1, base="sgd")
    mark_unitary(u)
    c.grad = torch.ones_like(c)
    opt.step()
    assert torch.equal(u.detach(), torch.eye(3, dtype=torch.float64)) and torch.equal(c.detach(), 0.9 * torch.ones(2, dtype=torch.float64))


# -------------------------------------------------------------- retraction


def _model(dtype, seed=0):
    layer = torch.nn.Linear(8, 8, bias=False, dtype=dtype)
    return orthogonal(layer, init="haar", generator=seeded(seed))


# AdamW takes a complex parameter as pairs of reals: its update of a complex
# rank-1 gradient is not rank 1, so that pair is not a case of this test
@pytest.mark.parametrize(("dtype", "optimizer"), [(torch.float64, "SGD"), (torch.complex128, "SGD"),
                                                  (torch.float64, "AdamW")])
def test_direct_retraction_of_a_rank_one_update_is_the_dense_polar_factor(dtype, optimizer):
    """A loss Re(u^H W v) has the rank-1 gradient u v^H; SGD's update is
    -lr u v^H and AdamW's first (eps = 0) is -lr sign(u v^H), also rank 1. The
    retraction must give polar(W_old + Delta), Delta from the unretracted optimizer."""
    generator = seeded(7)
    u = torch.randn(8, dtype=dtype, generator=generator)
    v = torch.randn(8, dtype=dtype, generator=generator)
    options = {"lr": 0.3, "weight_decay": 0.0} | ({"eps": 0.0} if optimizer == "AdamW" else {})
    retracted, plain = _model(dtype), _model(dtype)
    opts = [getattr(torch.optim, optimizer)(m.parameters(), **options) for m in (retracted, plain)]
    projunn_retraction(opts[0], rank=1, variant="direct", seed=0)
    W_old = plain.weight.detach().clone()
    for model, opt in zip((retracted, plain), opts):
        opt.zero_grad()
        (u.conj() @ model.weight @ v).real.backward()
        opt.step()
    delta = plain.weight.detach() - W_old
    assert torch.linalg.matrix_rank(delta).item() == 1
    np.testing.assert_allclose(retracted.weight.detach().numpy(), polar_reference(W_old + delta), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_tangent_retraction_of_a_rank_one_update_is_the_dense_geodesic(dtype):
    generator = seeded(8)
    u = torch.randn(8, dtype=dtype, generator=generator)
    v = torch.randn(8, dtype=dtype, generator=generator)
    model = _model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    projunn_retraction(opt, rank=1, variant="tangent", seed=0)
    W = model.weight.detach().numpy().copy()
    opt.zero_grad()
    (u.conj() @ model.weight @ v).real.backward()
    G = -(-0.2 * model.weight.grad.numpy())  # -Delta, Delta = -lr grad
    opt.step()
    expected = scipy.linalg.expm(-0.5 * (G @ W.conj().T - W @ G.conj().T)) @ W
    np.testing.assert_allclose(model.weight.detach().numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64])
@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_retraction_keeps_unitarity_over_many_steps(dtype, variant):
    model = _model(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    retraction = projunn_retraction(opt, rank=2, variant=variant, seed=0, drift_check_every=10)
    x = torch.randn(16, 8, dtype=dtype, generator=seeded(1))
    target = torch.randn(16, 8, dtype=dtype, generator=seeded(2))
    for _ in range(120):
        opt.zero_grad()
        (model(x) - target).abs().pow(2).sum().backward()
        opt.step()
        assert error(model.weight) < (2e-5 if dtype in (torch.float32, torch.complex64) else 1e-12)
    assert retraction.state[model.weight]["steps"] == 120


def test_retraction_reprojects_a_weight_marked_in_another_precision_at_its_first_step():
    # orthogonal(layer) in float32, then layer.double(): 2e-7 from unitary,
    # kept until the first drift check, drift_check_every steps later
    torch.manual_seed(0)
    layer = orthogonal(torch.nn.Linear(16, 16, bias=False)).double()
    assert error(layer.weight) > 1e-8
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 16, dtype=torch.float64, generator=seeded(1))
    retractions = []
    for module, every in ((layer, 50), (twin, 0)):
        opt = torch.optim.SGD(module.parameters(), lr=1e-2)
        retractions.append(projunn_retraction(opt, rank=2, seed=0, drift_check_every=every))
        module(x).sum().backward()
        opt.step()
    assert error(layer.weight) < 1e-14 and retractions[0].state[layer.weight]["reprojections"] == 1
    assert error(twin.weight) > 1e-8  # drift_check_every=0 checks nothing, the first step neither
    # a unitary weight is left as it is: the sketches' stream is not drawn from
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded())
    W0 = W.detach().clone()
    opt = torch.optim.SGD([W], lr=0.1)
    retraction = projunn_retraction(opt, rank=2, seed=3)
    W.grad = torch.randn(8, 8, dtype=torch.float64, generator=seeded(4))
    G = W.grad.clone()
    opt.step()
    expected = ul.projunn_step(W0, G, lr=0.1, rank=2, rng=np.random.default_rng([3, 0]))
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-15)
    assert retraction.state[W]["reprojections"] == 0


@pytest.mark.parametrize("write", ["half round trip", "load_state_dict", "in-place edit"])
def test_retraction_checks_a_weight_written_by_something_else_at_the_next_step(write, first_drift_checks):
    """As the torch optimizer: a weight written between two steps by
    something other than the optimizer and its retraction (a round trip
    through float16 leaves it 3e-4 from orthogonal, in the float32 the
    state records) has its drift checked at the next step and is
    re-projected; the optimizer's own writes between the hooks are not such
    a write."""
    checks = first_drift_checks(ul.torch.retraction)
    torch.manual_seed(0)
    dtype = torch.float32 if write == "half round trip" else torch.float64
    model = torch.nn.Sequential(torch.nn.Linear(20, 20, bias=False), torch.nn.Linear(20, 20, bias=False)).to(dtype)
    for layer in model:
        orthogonal(layer)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    retraction = projunn_retraction(opt, rank=2, seed=0)
    x = torch.randn(4, 20, dtype=dtype, generator=seeded(1))

    def step():
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()

    step(), step()
    assert checks == [True, True, False, False]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    noise = 1e-6 * torch.randn(20, 20, dtype=dtype, generator=seeded(2))
    if write == "half round trip":
        model.half().float()
    elif write == "load_state_dict":
        model[1].load_state_dict({"weight": model[1].weight.detach() + noise})
    else:
        with torch.no_grad():
            model[1].weight.add_(noise)
    assert error(model[1].weight) > 10 * tolerance
    step()
    rewritten = [True, True] if write == "half round trip" else [False, True]
    assert checks[4:] == rewritten
    assert [retraction.state[layer.weight]["reprojections"] for layer in model] == [int(r) for r in rewritten]
    assert all(error(layer.weight) < tolerance for layer in model)
    step()
    assert checks[6:] == [False, False]


def test_retraction_counts_the_optimizers_write_of_a_zero_update_as_its_own(first_drift_checks):
    """A zero gradient kept in ``.grad`` (``zero_grad(set_to_none=False)``):
    the optimizer's write of a zero update moves the version counter and
    leaves W as it was, so the retraction has nothing to retract; that
    write is not something else's, and the next steps are not checked. A
    weight written by something else before such a step is checked at the
    next step that moves it."""
    checks = first_drift_checks(ul.torch.retraction)
    torch.manual_seed(0)
    layer = orthogonal(torch.nn.Linear(12, 12, bias=False).double())
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    retraction = projunn_retraction(opt, rank=2, seed=0)
    x = torch.randn(3, 12, dtype=torch.float64, generator=seeded(1))

    def step(zero):
        opt.zero_grad(set_to_none=False)
        if not zero:
            layer(x).square().sum().backward()
        opt.step()

    for zero in (False, True, False, True, False):
        step(zero)
    assert checks == [True, False, False]
    with torch.no_grad():
        layer.weight.add_(1e-6 * torch.randn(12, 12, dtype=torch.float64, generator=seeded(2)))
    step(True)  # nothing to retract: the check waits for a step that moves W
    step(False)
    assert checks[3:] == [True] and retraction.state[layer.weight]["reprojections"] == 1
    assert error(layer.weight) < 1e-12
    step(False)
    assert checks[4:] == [False]


def test_retraction_trains_an_orthogonal_regression_with_sgd_momentum_and_adamw():
    generator = seeded(4)
    n = 16
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))[0]
    x = torch.randn(64, n, dtype=torch.float64, generator=generator)
    y = x @ Q.T
    for make in (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
                 lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0)):
        model = orthogonal(torch.nn.Linear(n, n, bias=False, dtype=torch.float64), init="haar", generator=seeded(5))
        opt = make(model.parameters())
        projunn_retraction(opt, rank=4, seed=0)
        losses = []
        for _ in range(150):
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.1 * losses[0], (type(opt).__name__, losses[0], losses[-1])
        assert error(model.weight) < 1e-12


def test_a_group_added_later_that_the_retraction_refuses_changes_nothing():
    """Groups added after projunn_retraction are covered, and checked: a
    parameter it cannot retract (rank above its size) was checked after the
    optimizer's step, and every retracted parameter kept the optimizer's raw,
    non-unitary update. Now the step is refused before anything moves."""
    W = unitary_parameter(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([W], lr=0.1, momentum=0.9)
    projunn_retraction(opt, rank=4, seed=0)
    V = unitary_parameter(3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opt.add_param_group({"params": [V]})
    W.grad = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    V.grad = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in (W, V)]
    with pytest.raises(ValueError, match=r"rank 4 exceeds the size of retracted parameter "
                                         r"param_groups\[1\]\['params'\]\[0\] \(shape \(3, 3\)\); no parameter"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip((W, V), before)) and not opt.state


def test_retraction_leaves_plain_parameters_to_the_optimizer_and_can_be_removed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(orthogonal(torch.nn.Linear(6, 6, dtype=torch.float64)),
                                torch.nn.Linear(6, 2, dtype=torch.float64))
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    retraction = projunn_retraction(opt, seed=0)
    x = torch.randn(4, 6, dtype=torch.float64)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert torch.equal(model[1].weight, twin[1].weight)  # plain: the optimizer's own step
    assert not torch.equal(model[0].weight, twin[0].weight) and error(model[0].weight) < 1e-12
    assert error(twin[0].weight) > 1e-3  # what the retraction prevented
    retraction.remove()
    W = model[0].weight.detach().clone()
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), W - 0.1 * model[0].weight.grad)


def test_retraction_with_a_closure_and_a_parameter_without_gradient():
    a, b = _model(torch.float64, 0), _model(torch.float64, 1)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    projunn_retraction(opt, seed=0)
    B = b.weight.detach().clone()
    x = torch.randn(3, 8, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = a(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert error(a.weight) < 1e-12 and torch.equal(b.weight.detach(), B)


def test_retraction_warns_about_weight_decay_and_refuses_bad_options():
    model = _model(torch.float32)
    with pytest.warns(UserWarning, match=r"param group 0 of the AdamW holds unitary parameters and has "
                                         r"weight_decay=0.01: decay is meaningless"):
        projunn_retraction(torch.optim.AdamW(model.parameters()), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for option, value, error, message in (
            ("rank", 0, ValueError, "rank must be >= 1, got 0"),
            ("rank", 2.0, TypeError, "rank must be an integer, got float: 2.0"),
            ("rank", 9, ValueError, r"rank 9 exceeds the size of retracted parameter "
                                    r"param_groups\[0\]\['params'\]\[0\] \(shape \(8, 8\)\)"),
            ("variant", "exact", ValueError, "variant must be one of 'tangent', 'direct', 'cayley', got 'exact'"),
            ("drift_tol", math.inf, ValueError, r"drift_tol must be a number in \(0, 0.01\] or None, got inf"),
            ("reproject", "qr", ValueError, "reproject must be one of 'svd', 'newton_schulz', got 'qr'")):
        with pytest.raises(error, match=message):
            projunn_retraction(opt, **{option: value})
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        projunn_retraction([model.weight])


def test_retraction_restores_every_parameter_on_a_non_finite_update():
    a, b = _model(torch.float64, 0), _model(torch.float64, 1)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    projunn_retraction(opt, seed=0)
    A, B = a.weight.detach().clone(), b.weight.detach().clone()
    a.weight.grad = torch.ones(8, 8, dtype=torch.float64)
    b.weight.grad = torch.full((8, 8), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"retracted parameter 1 \(param_groups\[0\]\['params'\]\[1\], shape "
                                         r"\(8, 8\)\) by the SGD: .*restored"):
        opt.step()
    assert torch.equal(a.weight.detach(), A) and torch.equal(b.weight.detach(), B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_retracted_parameter_made_half_since_is_refused_before_the_step(dtype):
    """One layer of two made float16 after the first step (``b.half()``):
    only parameters not yet stepped were checked before the optimizer moved,
    so SGD stepped both, projunn_step refused "W" and nothing was restored:
    the float32 layer kept the raw update, 4 from orthogonal. The step is
    refused first, naming the parameter and its dtype; nothing moves,
    neither the parameters nor the optimizer's momentum."""
    a, b = (orthogonal(torch.nn.Linear(8, 8, bias=False), init="haar", generator=seeded(s)) for s in (0, 1))
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1, momentum=0.9)
    projunn_retraction(opt, rank=2, seed=0)
    named = torch.optim.SGD([*a.named_parameters(prefix="a"), *b.named_parameters(prefix="b")], lr=0.1)
    projunn_retraction(named, rank=2, seed=0)
    x = torch.randn(4, 8, generator=seeded(2))
    b(a(x)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    b.to(dtype)
    b(a(x).to(dtype)).float().square().sum().backward()
    before = [p.detach().clone() for p in (a.weight, b.weight)]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in (a.weight, b.weight)]
    with pytest.raises(TypeError, match=rf"retracted parameter param_groups\[0\]\['params'\]\[1\] has dtype "
                                        rf"{dtype} \(shape \(8, 8\)\); expected float32, .*no parameter was changed"):
        opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip((a.weight, b.weight), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip((a.weight, b.weight), momenta))
    assert error(a.weight) < 1e-5
    with pytest.raises(TypeError, match=rf"retracted parameter b.weight has dtype {dtype}"):
        named.step()
    assert torch.equal(a.weight.detach(), before[0])


def test_an_error_of_the_drift_check_restores_every_parameter_and_stream(monkeypatch):
    """The drift check of the second parameter fails (as it did inside
    torch.autocast): it ran after the first parameter was written, and the
    error restored nothing (the second kept the optimizer's raw update). Every
    parameter and sketch stream is put back, and the error, of its own type,
    names the parameter."""
    import unitary_lr.torch.retraction as retraction_module

    a, b = _model(torch.float64, 0), _model(torch.float64, 1)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    retraction = projunn_retraction(opt, rank=2, seed=0, drift_check_every=1)
    x = torch.randn(3, 8, dtype=torch.float64, generator=seeded(2))
    b(a(x)).sum().backward()
    opt.step()
    state = retraction.state_dict()
    before = [p.detach().clone() for p in (a.weight, b.weight)]
    calls = []
    real_step_drift = retraction_module.step_drift

    def failing_step_drift(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a drift check that failed")
        return real_step_drift(*args, **kwargs)

    monkeypatch.setattr(retraction_module, "step_drift", failing_step_drift)
    opt.zero_grad()
    b(a(x)).sum().backward()
    with pytest.raises(RuntimeError, match=r"retracted parameter 1 \(param_groups\[0\]\['params'\]\[1\], shape "
                                           r"\(8, 8\)\) by the SGD: a drift check that failed; the retracted "
                                           r"parameters were restored"):
        opt.step()
    assert len(calls) == 2
    assert all(torch.equal(p.detach(), w) for p, w in zip((a.weight, b.weight), before))
    assert retraction.state_dict() == state


def test_a_retracted_step_inside_autocast_is_taken_whole_or_not_at_all():
    """SGD with the retraction, its step inside torch.autocast(bfloat16): the
    drift check failed on an internal message and the weight kept SGD's raw
    update, 1e-2 from orthogonal. Either the step is retracted (W stays
    orthogonal, moved) or it is refused with the parameter named, W as it was."""
    layer = orthogonal(torch.nn.Linear(16, 16, bias=False), init="haar", generator=seeded(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    projunn_retraction(opt, rank=4, seed=0)
    x = torch.randn(8, 16, generator=seeded(1))
    W = layer.weight.detach().clone()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        (layer(x).float() - 1).square().mean().backward()
        try:
            opt.step()
        except (TypeError, ValueError, RuntimeError) as failure:
            assert re.search(r"retracted parameter 0 \(param_groups\[0\]\['params'\]\[0\], shape \(16, 16\)\) "
                             r"by the SGD: .*torch.autocast.*restored", str(failure)), str(failure)
            assert torch.equal(layer.weight.detach(), W)
            return
    assert not torch.equal(layer.weight.detach(), W) and error(layer.weight) < 1e-5


def _two_layer_run(seed):
    """A model of a real and a complex retracted layer and a plain one,
    AdamW with the retraction, and a deterministic stream of batches."""
    real = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
    cplx = torch.nn.Linear(6, 6, bias=False, dtype=torch.complex128)
    with torch.no_grad():
        real.weight.copy_(torch.randn(6, 6, dtype=torch.float64, generator=seeded(1)))
        cplx.weight.copy_(torch.randn(6, 6, dtype=torch.complex128, generator=seeded(2)))
    orthogonal(real), orthogonal(cplx)
    head = torch.nn.Linear(6, 1, dtype=torch.float64)
    with torch.no_grad():
        head.weight.fill_(0.3), head.bias.zero_()
    params = [*real.parameters(), *head.parameters(), *cplx.parameters()]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    retraction = projunn_retraction(opt, rank=2, seed=seed, drift_check_every=2)

    def step(i):
        x = torch.randn(4, 6, dtype=torch.float64, generator=seeded(100 + i))
        z = cplx(real(x).to(torch.complex128))
        loss = (head(z.real) ** 2).sum() + (z.imag ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return (real, head, cplx), opt, retraction, step


@pytest.mark.parametrize("older", [False, True])
def test_a_retraction_resumed_in_another_precision_is_reprojected_at_its_next_step(older):
    """A float32 run resumed in float64: W is 7e-8 from unitary, and was kept
    so until the next scheduled check (the first step's check saw a step
    count of 3); also from a state_dict of an earlier release, which does
    not record the precision. (Resumed in the same precision, nothing is
    checked again: test_a_resumed_retraction_takes_the_steps_of_an_uninterrupted_run.)"""
    torch.manual_seed(0)
    runs = []
    for dtype in (torch.float32, torch.float64):
        layer = orthogonal(torch.nn.Linear(16, 16, bias=False))
        opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
        runs.append((layer.to(dtype), opt, projunn_retraction(opt, rank=2, seed=0)))
    layer, opt, retraction = runs[0]
    x = torch.randn(3, 16, generator=seeded(1))
    for _ in range(3):
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()
    saved = retraction.state_dict()
    assert saved["state"][0]["precision"] == "float32"
    if older:
        del saved["state"][0]["precision"]
    twin, twin_opt, twin_retraction = runs[1]
    twin.load_state_dict({"weight": layer.weight.detach().double()})
    twin_retraction.load_state_dict(saved)
    assert error(twin.weight) > 1e-8
    twin_opt.zero_grad()
    twin(x.double()).sum().backward()
    twin_opt.step()
    assert error(twin.weight) < 1e-14 and twin_retraction.state[twin.weight]["reprojections"] == 1
    assert twin_retraction.state[twin.weight]["precision"] == "float64"


def test_a_resumed_retraction_takes_the_steps_of_an_uninterrupted_run():
    # without its state, a resumed run drew its sketches from fresh streams
    modules, opt, retraction, step = _two_layer_run(seed=0)
    for i in range(6):
        step(i)
    expected = [m.weight.detach().clone() for m in modules]

    modules, opt, retraction, step = _two_layer_run(seed=0)
    for i in range(3):
        step(i)
    buffer = io.BytesIO()
    torch.save({"model": [m.state_dict() for m in modules], "opt": opt.state_dict(),
                "retraction": retraction.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    modules, opt, retraction, step = _two_layer_run(seed=7)  # another seed: the state's is taken
    for m, saved in zip(modules, checkpoint["model"]):
        m.load_state_dict(saved)
    opt.load_state_dict(checkpoint["opt"])
    retraction.load_state_dict(checkpoint["retraction"])
    assert retraction.seed == 0 and sorted(retraction.state_dict()["state"]) == [0, 3]
    assert [retraction.state[m.weight]["steps"] for m in modules[::2]] == [3, 3]
    for i in range(3, 6):
        step(i)
    for m, W in zip(modules, expected):
        assert torch.equal(m.weight.detach(), W)
    assert error(modules[0].weight) < 1e-13 and error(modules[2].weight) < 1e-13


def test_a_failed_retraction_leaves_its_streams_as_they_were():
    modules, opt, retraction, step = _two_layer_run(seed=0)
    step(0)
    twin_modules, twin_opt, twin, twin_step = _two_layer_run(seed=0)
    twin_step(0)
    before = retraction.state_dict()
    opt.zero_grad()
    for m in modules:
        m.weight.grad = torch.ones_like(m.weight)
    modules[2].weight.grad[0, 0] = float("nan")  # the last one fails, after the first drew its sketch
    with pytest.raises(ValueError, match="retracted parameter 1"):
        opt.step()
    assert retraction.state_dict() == before
    retraction.load_state_dict(twin.state_dict())  # the optimizers differ now (AdamW's moments moved)
    assert retraction.state_dict() == twin.state_dict()


def test_a_bad_retraction_state_is_refused_and_changes_nothing():
    modules, opt, retraction, step = _two_layer_run(seed=0)
    step(0)
    good = retraction.state_dict()
    rng_state = good["state"][0]["rng"]
    for bad, message in (
            ([], r"state_dict must be a dict with keys 'seed', 'streams' and 'state'.*got 'list'"),
            ({"seed": 0, "state": {}}, r"state_dict must be a dict with keys .*got \['seed', 'state'\]"),
            ({**good, "seed": -1}, r"state_dict\['seed'\] must be an int >= 0, got -1"),
            ({**good, "streams": 1.5}, r"state_dict\['streams'\] must be an int >= 0, got 1.5"),
            ({**good, "state": [1]}, r"state_dict\['state'\] must be a dict, got list"),
            ({**good, "state": {9: good["state"][0]}}, r"state_dict\['state'\]\[9\]: the index must be that of "
                                                        r"one of the optimizer's 4 parameters"),
            ({**good, "state": {1: good["state"][0]}}, r"\[1\]: the optimizer's parameter 1 \(shape \(1, 6\)\) is "
                                                        r"not retracted"),
            ({**good, "state": {0: {"rng": rng_state, "steps": -1, "reprojections": 0}}},
             r"\[0\]: 'steps' and 'reprojections' must be ints >= 0, got \(-1, 0\)"),
            ({**good, "state": {0: {"rng": {"inc": 1}, "steps": 1, "reprojections": 0}}},
             r"state_dict\['state'\]\[0\]\['rng'\] is not the state of a sketch stream"),
            ({**good, "state": {0: {"rng": rng_state, "steps": 1}}}, r"\[0\] must be a dict with keys 'rng', 'steps', "
                                                                     r"'reprojections' and 'precision'")):
        with pytest.raises(ValueError, match=message):
            retraction.load_state_dict(bad)
        assert retraction.state_dict() == good


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_retraction_of_a_compiled_step_is_the_eager_retraction(dtype):
    """Traced by Dynamo, the hooks lost the retraction: three compiled SGD
    steps left W 0.1 away from unitary, without a word. They run outside the
    graph: the compiled steps are the eager ones, bit for bit, the first the
    dense polar factor of the optimizer's update."""
    import warnings

    generator = seeded(7)
    u = torch.randn(8, dtype=dtype, generator=generator)
    v = torch.randn(8, dtype=dtype, generator=generator)
    models = _model(dtype), _model(dtype)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.5) for m in models]
    retractions = [projunn_retraction(opt, rank=1, variant="direct", seed=0) for opt in opts]
    torch.compiler.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes
        compiled = torch.compile(opts[1].step, backend="aot_eager")
        for step in range(3):
            for model, opt in zip(models, opts):
                opt.zero_grad()
                (u.conj() @ model.weight @ v).real.backward()
            W_old, delta = models[1].weight.detach().clone(), -0.3 * models[1].weight.grad
            opts[0].step()
            compiled()
            if step == 0:  # momentum's first update is -lr G, of rank 1
                np.testing.assert_allclose(models[1].weight.detach().numpy(), polar_reference(W_old + delta),
                                           atol=1e-12)
            assert torch.equal(models[0].weight.detach(), models[1].weight.detach())
            assert error(models[1].weight) < 1e-13
    assert retractions[1].state[models[1].weight]["steps"] == 3


@pytest.mark.parametrize("seed", [np.array(2), np.int64(2), torch.tensor(2)])
def test_a_seed_given_as_a_0_d_array_steps_as_the_int_it_holds(seed):
    """ProjUNN and projunn_retraction took a 0-d NumPy array or tensor as the
    seed and failed at the first step ("len() of unsized object", inside
    NumPy's default_rng); the seed is kept as the Python int it holds, and
    the steps are those of seed=2."""
    from unitary_lr.torch import ProjUNN, projunn_retraction, unitary_parameter

    results = []
    for given in (seed, 2):
        generator = torch.Generator().manual_seed(0)
        stepped = unitary_parameter(6, dtype=torch.float64, generator=generator)
        retracted = unitary_parameter(6, dtype=torch.float64, generator=generator)
        optimizer = ProjUNN([stepped], lr=0.1, rank=1, seed=given)
        sgd = torch.optim.SGD([retracted], lr=0.1)
        projunn_retraction(sgd, params=[retracted], rank=1, seed=given)
        assert type(optimizer.param_groups[0]["seed"]) is int
        stepped.grad = torch.randn(6, 6, dtype=torch.float64, generator=generator)
        retracted.grad = torch.randn(6, 6, dtype=torch.float64, generator=generator)
        optimizer.step()
        sgd.step()
        results.append((stepped.detach().clone(), retracted.detach().clone()))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def _swap_flag(value):
    """Set torch's global swap flag; returns the value it had, to restore in a ``finally``."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(value)
    return before


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_load_state_dict_under_the_swap_flag_keeps_the_mark_and_trains_as_unitary(assign, requires_grad):
    """Under ``set_swap_module_params_on_conversion(True)`` ``load_state_dict``
    swapped a plain nn.Parameter (class included) into the marked parameter:
    the mark was lost without a word and ProjUNN trained it as a plain weight
    (0.8 to 2.6 from unitary after 5 steps). The loaded parameter is marked,
    holds the checkpoint's values and keeps its requires_grad."""
    source = UnitaryRNN(3, 8, dtype=torch.float64, generator=seeded())
    state = copy.deepcopy(source.state_dict())  # plain tensors, no mark
    target = UnitaryRNN(3, 8, dtype=torch.float64, generator=seeded(1))
    target.weight_hh.requires_grad_(requires_grad)
    before = _swap_flag(True)
    try:
        target.load_state_dict(state, assign=assign)
    finally:
        _swap_flag(before)
    W = target.weight_hh
    assert type(W) is UnitaryParameter and is_unitary(W) and W.requires_grad is requires_grad
    assert torch.equal(W.detach(), source.weight_hh.detach())
    if not requires_grad:
        return
    optimizer = ProjUNN(target.parameters(), lr=0.05)
    assert [group["params"] for group in optimizer.param_groups if group["unitary"]] == [[W]]
    x = torch.randn(10, 4, 3, dtype=torch.float64, generator=seeded(2))
    for _ in range(5):
        optimizer.zero_grad()
        target(x)[0].pow(2).sum().backward()
        optimizer.step()
    assert not torch.equal(W.detach(), source.weight_hh.detach())  # it was trained (assign shares state's storage)
    assert error(W) < rounding(torch.float64)


def test_load_state_dict_assign_under_the_swap_flag_refuses_a_matrix_that_is_not_unitary():
    """With ``assign=True`` the swapped-in value is checked, as a Parameter
    assigned in the marked one's place is; nothing is changed on refusal."""
    target = UnitaryRNN(3, 5, dtype=torch.float64, generator=seeded())
    kept = target.weight_hh.detach().clone()
    state = copy.deepcopy(target.state_dict())
    state["weight_hh"] = torch.nn.Linear(5, 5, dtype=torch.float64).weight.detach()  # ~0.75 from orthogonal
    before = _swap_flag(True)
    try:
        with pytest.raises(RuntimeError, match=r"is not unitary.*delete it first \(del module\.<name>\)"):
            target.load_state_dict(state, assign=True)
    finally:
        _swap_flag(before)
    assert type(target.weight_hh) is UnitaryParameter and torch.equal(target.weight_hh.detach(), kept)


@pytest.mark.parametrize("swap", [False, True])
def test_a_half_checkpoint_loads_with_assign_into_a_half_model_and_stays_marked(swap):
    """``.half()`` keeps the mark, but the checkpoint of a ``.half()`` model could
    not be loaded with ``assign=True`` into a ``.half()`` model (the check's
    TypeError on float16). A replacement in the marked parameter's own dtype,
    which the check does not cover, is marked unchecked; in another dtype it is
    refused with the hint to delete the parameter first."""
    state = UnitaryRNN(3, 4, generator=seeded()).half().state_dict()
    assert state["weight_hh"].dtype == torch.float16
    with torch.device("meta"):
        target = UnitaryRNN(3, 4)
    target = target.half()  # before the flag: .half() under it swaps in a plain Parameter
    single = UnitaryRNN(3, 4)  # float32
    before = _swap_flag(swap)
    try:
        target.load_state_dict(state, assign=True)
        with pytest.raises(RuntimeError, match=r"has dtype torch.float16.*delete it first \(del module\."):
            single.load_state_dict(state, assign=True)
    finally:
        _swap_flag(before)
    W = target.weight_hh
    assert is_unitary(W) and W.dtype == torch.float16 and not W.is_meta and W.requires_grad
    assert torch.equal(W.detach(), state["weight_hh"])
    assert is_unitary(single.weight_hh) and single.weight_hh.dtype == torch.float32
