"""The base rules' ``maximize``, Adam's ``amsgrad`` and ``decoupled_weight_decay``
(AdamW), as ``torch.optim`` defines them, on unitary parameters in every front
end that takes them: the torch optimizer (eager and capturable) and the
framework-free one. Plain parameters are torch.optim's own code (see
test_torch_plain.py, which runs these options too)."""

import math

import numpy as np
import pytest

import unitary_lr as ul
from unitary_lr.optim import Adam, ProjUNN, RMSprop, make_rule

N, STEPS, LR = 6, 5, 0.03
CASES = [
    ("sgd", {"maximize": True}),
    ("sgd", {"maximize": True, "momentum": 0.9, "nesterov": True}),
    ("rmsprop", {"maximize": True}),
    ("rmsprop", {"maximize": True, "centered": True, "momentum": 0.5, "alpha": 0.9}),
    ("adam", {"amsgrad": True}),
    ("adam", {"amsgrad": True, "maximize": True, "betas": (0.8, 0.95)}),
    ("adam", {"maximize": True}),
]
IDS = [f"{base}-{'-'.join(hyper)}" for base, hyper in CASES]


def numpy_directions(base, hyper, grads):
    """The rule's directions D_t (the plain update being ``W - lr D_t``) for
    the gradients in turn, in float64 NumPy from the rules' definitions in
    torch.optim's documentation; the second moment of a complex gradient is
    |g|^2 per entry, as a unitary parameter's is."""
    momentum, eps = hyper.get("momentum", 0.0), hyper.get("eps", 1e-8)
    state, directions = {}, []
    for t, grad in enumerate(grads, start=1):
        g = -grad if hyper.get("maximize") else grad
        square = np.abs(g) ** 2
        if base == "sgd":
            state["b"] = g.copy() if t == 1 else momentum * state["b"] + g
            d = g + momentum * state["b"] if hyper.get("nesterov") else state["b"]
        elif base == "rmsprop":
            alpha = hyper.get("alpha", 0.99)
            state["v"] = alpha * state.get("v", 0) + (1 - alpha) * square
            if hyper.get("centered"):
                state["m"] = alpha * state.get("m", 0) + (1 - alpha) * g
                d = g / (np.sqrt(state["v"] - np.abs(state["m"]) ** 2) + eps)
            else:
                d = g / (np.sqrt(state["v"]) + eps)
            if momentum:
                d = state["buf"] = momentum * state.get("buf", 0) + d
        else:
            b1, b2 = hyper.get("betas", (0.9, 0.999))
            state["m"] = b1 * state.get("m", 0) + (1 - b1) * g
            state["v"] = b2 * state.get("v", 0) + (1 - b2) * square
            second = state["v"]
            if hyper.get("amsgrad"):
                second = state["vmax"] = np.maximum(state.get("vmax", 0), state["v"])
            d = state["m"] / (1 - b1**t) / (np.sqrt(second / (1 - b2**t)) + eps)
        directions.append(d)
    return directions


def expected_walk(W, directions):
    """The unitary parameter after the steps: full-rank projUNN-T steps
    (rank n: the sketch holds all of D, so no draw changes the step)."""
    for d in directions:
        W = ul.projunn_step(W, d, lr=LR, rank=N, rng=0)
    return W


def problem(dtype, batch=(2,), seed=0):
    rng = np.random.default_rng(seed)
    W = ul.random_unitary(N, dtype=dtype, batch_shape=batch, rng=seed)
    grads = rng.standard_normal((STEPS, *batch, N, N))
    if dtype == "complex128":
        grads = grads + 1j * rng.standard_normal((STEPS, *batch, N, N))
    return W, list(grads)


@pytest.mark.parametrize(("base", "hyper"), CASES, ids=IDS)
def test_the_numpy_reference_is_torch_optims_rule(base, hyper):
    """The reference directions above are torch.optim's own (real parameters:
    the update of a plain parameter at lr = 1), so the tests below hold the
    unitary steps to torch.optim's definitions."""
    torch = pytest.importorskip("torch")
    _, grads = problem("float64", batch=())
    q = torch.nn.Parameter(torch.zeros(N, N, dtype=torch.float64))
    opt = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base]([q], lr=1.0, **hyper)
    for g, d in zip(grads, numpy_directions(base, hyper, grads)):
        before = q.detach().clone()
        q.grad = torch.asarray(g)
        opt.step()
        np.testing.assert_allclose((before - q.detach()).numpy(), d, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("base", "hyper"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_torch_unitary_steps_follow_the_options(base, hyper, dtype, capturable):
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN as TorchProjUNN

    W0, grads = problem(dtype)
    W = torch.nn.Parameter(torch.asarray(W0.copy()))
    opt = TorchProjUNN([{"params": [W], "unitary": True}], lr=LR, base=base, rank=N, seed=0,
                       capturable=capturable, **hyper)
    for g in grads:
        W.grad = torch.asarray(g)
        opt.step()
    expected = expected_walk(W0, numpy_directions(base, hyper, grads))
    np.testing.assert_allclose(W.detach().numpy(), expected, rtol=0, atol=1e-11)
    assert ul.unitarity_error(W.detach().numpy()).max() < 1e-13
    if hyper.get("amsgrad"):
        # the running maximum is kept, and is at least the current second moment
        state = opt.state[W]
        assert torch.all(state["max_exp_avg_sq"] >= state["exp_avg_sq"])
        assert not state["max_exp_avg_sq"].is_complex()


@pytest.mark.parametrize(("base", "hyper"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_framework_free_unitary_steps_follow_the_options(backend, base, hyper, dtype):
    W0, grads = problem(dtype)
    W = backend.asarray(W0)
    opt = ProjUNN(LR, base=base, rank=N, seed=0, **hyper)
    for g in grads:
        W = opt.step(W, backend.asarray(g))
    expected = expected_walk(W0, numpy_directions(base, hyper, grads))
    np.testing.assert_allclose(backend.to_numpy(W), expected, rtol=0, atol=1e-11)


def test_decoupled_weight_decay_is_adamw_on_plain_matrices():
    """``unitary=False`` with decoupled decay is torch.optim.AdamW (real
    matrices: torch takes a complex one as a pair of reals, this optimizer
    takes |g|^2)."""
    torch = pytest.importorskip("torch")
    _, grads = problem("float64", batch=())
    start = np.random.default_rng(3).standard_normal((N, N))
    reference = torch.nn.Parameter(torch.asarray(start.copy()))
    adamw = torch.optim.AdamW([reference], lr=LR, weight_decay=0.3, amsgrad=True)
    opt = ProjUNN(LR, base="adam", unitary=False, weight_decay=0.3, decoupled_weight_decay=True, amsgrad=True)
    W = start
    for g in grads:
        reference.grad = torch.asarray(g)
        adamw.step()
        W = opt.step(W, g)
    np.testing.assert_allclose(W, reference.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_decoupled_weight_decay_does_not_touch_a_unitary_parameter():
    """Weight decay of either kind leaves a unitary parameter alone (the
    group is invariant to scale): the steps are those without decay."""
    W0, grads = problem("float64")
    walks = []
    for decay in ({}, {"weight_decay": 0.5, "decoupled_weight_decay": True}, {"weight_decay": 0.5}):
        opt, W = ProjUNN(LR, base="adam", rank=N, seed=0, **decay), W0
        for g in grads:
            W = opt.step(W, g)
        walks.append(W)
    np.testing.assert_array_equal(walks[1], walks[0])
    np.testing.assert_array_equal(walks[2], walks[0])


def test_amsgrad_turned_on_later_starts_its_maximum_from_zero():
    """A state made without amsgrad, stepped with it (a rule swapped by hand,
    or a torch group edited between steps): the maximum starts as a new one
    does, and the steps are those of a run with amsgrad from that step on."""
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN as TorchProjUNN

    W0, grads = problem("float64", batch=())
    W = torch.nn.Parameter(torch.asarray(W0.copy()))
    opt = TorchProjUNN([{"params": [W], "unitary": True}], lr=LR, base="adam", rank=N, seed=0)
    W.grad = torch.asarray(grads[0])
    opt.step()
    assert "max_exp_avg_sq" not in opt.state[W]
    opt.param_groups[0]["amsgrad"] = True
    for g in grads[1:]:
        W.grad = torch.asarray(g)
        opt.step()
    # from the second step on, max(v) over the steps since the switch
    directions = numpy_directions("adam", {}, grads[:1])
    rule = Adam(amsgrad=True)
    state = {"step": 1}
    m = v = 0
    for t, g in enumerate(grads, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        if t > 1:
            state["vmax"] = np.maximum(state.get("vmax", 0), v)
            directions.append(m / (1 - 0.9**t) / (np.sqrt(state["vmax"] / (1 - 0.999**t)) + rule.eps))
    np.testing.assert_allclose(W.detach().numpy(), expected_walk(W0, directions), rtol=0, atol=1e-11)
    torch.testing.assert_close(opt.state[W]["max_exp_avg_sq"], torch.asarray(state["vmax"]), rtol=1e-13, atol=0)


@pytest.mark.parametrize("rule, name", [(RMSprop, "maximize"), (Adam, "amsgrad"), (Adam, "decoupled_weight_decay"),
                                        (RMSprop, "centered")])
def test_flags_must_be_booleans(rule, name):
    with pytest.raises(ValueError, match=rf"{name} must be True or False, got 'yes'"):
        rule(**{name: "yes"})
    with pytest.raises(ValueError, match=rf"{name} must be True or False, got 1"):
        make_rule(rule.__name__.lower(), **{name: 1})


def test_torch_flags_must_be_booleans_and_old_groups_take_the_defaults():
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN as TorchProjUNN
    from unitary_lr.torch import unitary_parameter

    W = unitary_parameter(4, dtype=torch.float64)
    for name in ("maximize", "amsgrad", "decoupled_weight_decay"):
        with pytest.raises(ValueError, match=rf"ProjUNN: {name} must be True or False, got None"):
            TorchProjUNN([W], **{name: None})
    opt = TorchProjUNN([W], base="adam", amsgrad=True)
    saved = opt.state_dict()
    for group in saved["param_groups"]:  # as saved before the options existed
        for name in ("maximize", "amsgrad", "decoupled_weight_decay"):
            del group[name]
    opt.load_state_dict(saved)
    assert [opt.param_groups[0][name] for name in ("maximize", "amsgrad", "decoupled_weight_decay")] == [False] * 3
    W.grad = torch.ones(4, 4, dtype=torch.float64)
    opt.step()
    assert ul.unitarity_error(W.detach().numpy()) < 1e-13
    assert math.isfinite(float(W.detach().sum()))


def test_torch_hyperparameters_the_base_does_not_take_are_refused():
    """As torch.optim.SGD refuses ``betas``: a hyper-parameter that no
    group's base takes is a TypeError naming it and listing what the base
    takes, not an option silently ignored."""
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN as TorchProjUNN
    from unitary_lr.torch import unitary_parameter

    W = unitary_parameter(4, dtype=torch.float64)
    V = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    cases = [({"base": "sgd", "betas": (0.5, 0.9)}, r"ProjUNN: base='sgd' does not take betas=\(0.5, 0.9\); it takes "
              r"dampening, maximize, momentum, nesterov, weight_decay"),
             ({"base": "rmsprop", "amsgrad": True}, r"ProjUNN: base='rmsprop' does not take amsgrad=True"),
             ({"base": "adam", "momentum": 0.9}, r"ProjUNN: base='adam' does not take momentum=0.9")]
    for options, message in cases:
        with pytest.raises(TypeError, match=message):
            TorchProjUNN([W], **options)
    with pytest.raises(TypeError, match=r"param group 1: base='rmsprop' does not take nesterov=True"):
        TorchProjUNN([{"params": [V]}, {"params": [W], "base": "rmsprop", "nesterov": True}], base="sgd", momentum=0.9)
    # an option of the constructor that some group's base takes is that group's
    opt = TorchProjUNN([{"params": [W], "base": "adam"}, {"params": [V]}], base="sgd", betas=(0.5, 0.9), momentum=0.9)
    assert [g["base"] for g in opt.param_groups] == ["adam", "sgd"]
    with pytest.raises(TypeError, match=r"param group 2: base='sgd' does not take amsgrad=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "amsgrad": True})
    # whole groups handed back with the optimizer's own options (as ZeroRedundancyOptimizer does)
    again = TorchProjUNN([dict(g) for g in opt.param_groups], **{k: v for k, v in opt.defaults.items()
                                                                 if k not in ("unitary", "unitary_lr_scale")})
    assert [g["betas"] for g in again.param_groups] == [(0.5, 0.9), (0.5, 0.9)]


def test_base_adamw_is_refused_with_the_way_to_it():
    """AdamW is no base of its own in the torch and framework-free
    optimizers (optax's front end takes optax.adamw): the error says how."""
    pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN as TorchProjUNN
    from unitary_lr.torch import unitary_parameter

    message = r"got 'adamw'; AdamW is base='adam' with decoupled_weight_decay=True"
    with pytest.raises(ValueError, match=message):
        ProjUNN(base="adamw")
    with pytest.raises(ValueError, match=message):
        TorchProjUNN([unitary_parameter(4)], base="adamw")


def test_a_numpy_step_count_steps_as_a_python_one():
    """A state whose Adam count is a NumPy integer (saved and loaded through
    NumPy) takes the same bias corrections as a Python int."""
    W0, grads = problem("float64", batch=())
    runs = []
    for convert in (int, np.int64):
        opt, W = ProjUNN(LR, base="adam", rank=2, seed=0), W0
        W = opt.step(W, grads[0])
        saved = opt.state_dict()
        saved["matrices"][None]["state"]["step"] = convert(saved["matrices"][None]["state"]["step"])
        opt.load_state_dict(saved)
        for g in grads[1:]:
            W = opt.step(W, g)
        runs.append(W)
    np.testing.assert_array_equal(runs[1], runs[0])
