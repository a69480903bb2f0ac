"""Arguments of the two optimizers, ``unitary_lr.torch.ProjUNN`` and
``unitary_lr.optim.ProjUNN``, and of ``unitary_lr.optim.unitary_update``:
``betas`` that is not a pair, NumPy or 0-d tensor numbers as hyper-parameters,
a bad ``step`` or ``xp``, and what ``lr = 0`` and a rank above min(n, m) do
in each front end."""

import re

import array_api_compat.numpy as xnp
import numpy as np
import pytest

import unitary_lr as ul
from unitary_lr.optim import ProjUNN, control_drift, make_rule, step_drift, unitary_update

torch = pytest.importorskip("torch")
from unitary_lr.torch import ProjUNN as TorchProjUNN  # noqa: E402

N = 6


def _unitary(seed, n=N, dtype="float64"):
    return ul.random_unitary(n, dtype=dtype, rng=seed)


def _polar(A):
    """The closest orthogonal matrix to A, from NumPy's SVD."""
    U, _, Vh = np.linalg.svd(A)
    return U @ Vh


# ---- betas that is not a pair ---------------------------------------------------------------------------------

NOT_PAIRS = [0.9, None, {0.9, 0.99}, np.array(0.9), "ab"]
NOT_PAIR_IDS = ["float", "None", "set", "0-d array", "str"]


@pytest.mark.parametrize("betas", NOT_PAIRS, ids=NOT_PAIR_IDS)
def test_betas_not_a_pair_is_named_by_the_framework_free_optimizer(betas):
    """A float was Python's bare "'float' object is not iterable" (from the
    tuple() of make_rule), and a set was taken in its own iteration order."""
    match = re.escape(f"betas must be two numbers in [0, 1), got {betas!r}")
    with pytest.raises(ValueError, match=match):
        ProjUNN(1e-2, base="adam", betas=betas)
    with pytest.raises(ValueError, match=match):
        make_rule("adam", betas=betas)


@pytest.mark.parametrize("betas", [*NOT_PAIRS, torch.tensor(0.9)], ids=[*NOT_PAIR_IDS, "0-d tensor"])
def test_betas_not_a_pair_is_named_by_the_torch_optimizer(betas):
    W = torch.nn.Parameter(torch.asarray(_unitary(0)))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    match = re.escape(f"betas must be two numbers in [0, 1), got {betas!r}")
    with pytest.raises(ValueError, match=match):
        TorchProjUNN([{"params": [W], "unitary": True}, {"params": [b]}], base="adam", betas=betas)
    # in a group added later: refused, and the optimizer keeps the groups it had
    opt = TorchProjUNN([{"params": [W], "unitary": True}], base="adam", seed=0)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [b], "betas": betas})
    assert len(opt.param_groups) == 1 and not opt.state


def test_betas_as_a_pair_of_any_kind_still_steps():
    """A list, a 1-d array and a pair of NumPy numbers are pairs: the same
    steps as the tuple of Python floats."""
    G = np.random.default_rng(1).standard_normal((N, N))
    reference = ProjUNN(1e-2, base="adam", betas=(0.8, 0.95), seed=0).step(_unitary(0), G)
    for betas in ([0.8, 0.95], np.array([0.8, 0.95]), (np.float64(0.8), np.array(0.95))):
        opt = ProjUNN(1e-2, base="adam", betas=betas, seed=0)
        assert opt.rule.betas == (0.8, 0.95)
        np.testing.assert_array_equal(opt.step(_unitary(0), G), reference)


# ---- NumPy and 0-d tensor numbers as eps (and the rules' other numbers) -----------------------------------------

@pytest.mark.parametrize("eps", [np.array(1e-3), np.float64(1e-3), torch.tensor(1e-3, dtype=torch.float64)],
                         ids=["0-d array", "np.float64", "0-d tensor"])
@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_torch_eps_as_a_numpy_number_or_0d_tensor_is_the_number_it_holds(eps, base):
    """A 0-d NumPy eps was kept in the group, and torch.optim's step of a
    plain parameter failed on it ("add_(): argument 'other' must be Tensor,
    not numpy.ndarray"); a 0-d tensor eps, which torch.optim takes, was
    refused as "eps must be a finite number >= 0". Both are now the float
    they hold, as lr's NumPy numbers are: the steps are those of eps=1e-3,
    the plain parameter's those of torch.optim itself."""
    rng = np.random.default_rng(3)
    grads = [(rng.standard_normal((N, N)), rng.standard_normal(4)) for _ in range(3)]
    results = []
    for given in (eps, 1e-3):
        W = torch.nn.Parameter(torch.asarray(_unitary(0)))
        b = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        opt = TorchProjUNN([{"params": [W], "unitary": True}, {"params": [b]}], lr=0.05, base=base, eps=given,
                           seed=0)
        assert all(type(group["eps"]) is float and group["eps"] == 1e-3 for group in opt.param_groups)
        for gW, gb in grads:
            W.grad, b.grad = torch.asarray(gW), torch.asarray(gb)
            opt.step()
        results.append((W.detach().clone(), b.detach().clone()))
    b_ref = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    reference = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base]([b_ref], lr=0.05, eps=1e-3)
    for _, gb in grads:
        b_ref.grad = torch.asarray(gb)
        reference.step()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], b_ref.detach(), rtol=1e-14, atol=1e-15)


def test_torch_numpy_hyperparameters_step_plain_parameters():
    """momentum, alpha and weight_decay as 0-d NumPy arrays in the constructor
    and in a group added later: torch.optim's plain step failed on each."""
    for options in ({"base": "sgd", "momentum": np.array(0.5)}, {"base": "rmsprop", "alpha": np.array(0.9)},
                    {"base": "adam", "weight_decay": np.array(0.1)}):
        numbers = {key: value.item() if isinstance(value, np.ndarray) else value for key, value in options.items()}
        finals = []
        for given in (options, numbers):
            b = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
            opt = TorchProjUNN([b], lr=0.05, **given)
            c = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
            opt.add_param_group({"params": [c], **{k: v for k, v in given.items() if k != "base"}})
            for step in range(3):
                b.grad = torch.full((4,), 1.0 + step, dtype=torch.float64)
                c.grad = torch.full((3,), 2.0 - step, dtype=torch.float64)
                opt.step()
            finals.append((b.detach().clone(), c.detach().clone()))
        torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=0)


def test_eps_that_holds_no_number_is_refused_by_both_optimizers():
    W = torch.nn.Parameter(torch.asarray(_unitary(0)))
    for eps in (torch.tensor([1e-8]), np.array([1e-8]), "1e-8", torch.tensor(1e-8j)):
        match = re.escape(f"eps must be a finite number >= 0, got {eps!r}")
        with pytest.raises(ValueError, match=match):
            TorchProjUNN([W], unitary=True, eps=eps)
        with pytest.raises(ValueError, match=match):
            ProjUNN(1e-2, eps=eps)


def test_framework_free_eps_takes_a_0d_tensor_as_lr_does():
    """lr takes a real 0-d array of any library as its number
    (check_real_scalar); eps was refused there ("not a finite number")."""
    opt = ProjUNN(torch.tensor(1e-2, dtype=torch.float64), base="adam", eps=torch.tensor(1e-3, dtype=torch.float64),
                  weight_decay=torch.tensor(0.0))
    assert (opt.lr, opt.rule.eps, opt.rule.weight_decay) == (1e-2, 1e-3, 0.0)
    assert all(type(x) is float for x in (opt.rule.eps, opt.rule.weight_decay))


# ---- unitary_update's step and xp ------------------------------------------------------------------------------

def _update(xp=xnp, step=1, lr=1e-2, W=None, G=None, rng=None):
    W = _unitary(0) if W is None else W
    G = np.random.default_rng(1).standard_normal((N, N)) if G is None else G
    return unitary_update(xp, W, G, lr=lr, rank=2, variant="tangent", rng=rng or np.random.default_rng(0),
                          step=step, seed=0)


@pytest.mark.parametrize(("step", "error", "message"), [
    ("a", TypeError, "step must be an integer, got str: 'a'"),
    (None, TypeError, "step must be an integer, got NoneType: None"),
    (1.5, TypeError, "step must be an integer, got float: 1.5"),
    (True, TypeError, "step must be an integer, got bool: True"),
    (0, ValueError, "step must be >= 1, got 0"),
    (-3, ValueError, "step must be >= 1, got -3"),
])
@pytest.mark.parametrize("lr", [1e-2, 0.0])
def test_unitary_update_names_a_bad_step_before_anything_is_drawn(step, error, message, lr):
    """A string was "not all arguments converted during string formatting"
    (the drift schedule's ``step % every``), None an unsupported operand; a
    float, 0 or a negative count was taken. So are they in the drift
    functions the optimizers call."""
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        _update(step=step, lr=lr, rng=rng)
    assert rng.bit_generator.state == before
    for function in (control_drift, step_drift):
        kwargs = {"seed": 0} if function is step_drift else {}
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            function(xnp, _unitary(0), step=step, rng=rng, drift_check_every=1, **kwargs)


def test_unitary_update_takes_numpy_integers_as_the_step():
    reference, _ = _update(step=3)
    for step in (np.int64(3), np.array(3)):
        np.testing.assert_array_equal(_update(step=step)[0], reference)


@pytest.mark.parametrize("lr", [1e-2, 0.0])
def test_unitary_update_names_an_xp_that_is_not_ws_namespace(lr):
    """A string failed deep in the step ("'str' object has no attribute
    'float32'"), another library's namespace on NumPy arrays ("'numpy.ndarray'
    object has no attribute 'is_cpu'"); at lr = 0 neither was looked at."""
    import array_api_compat.torch as xtorch

    cases = [("numpy", "str: 'numpy'"), (None, "NoneType: None"), (xtorch, "module array_api_compat.torch"),
             (torch, "module torch")]
    for xp, given in cases:
        rng = np.random.default_rng(0)
        before = rng.bit_generator.state
        with pytest.raises(TypeError, match=re.escape(
                "xp must be the array namespace of W, array_api_compat.numpy for a numpy.ndarray "
                f"(array_api_compat.array_namespace(W)), got {given}")):
            _update(xp=xp, lr=lr, rng=rng)
        assert rng.bit_generator.state == before
    W, G = torch.asarray(_unitary(0)), torch.asarray(np.random.default_rng(1).standard_normal((N, N)))
    with pytest.raises(TypeError, match=re.escape("xp must be the array namespace of W, array_api_compat.torch for "
                                                  "a torch.Tensor (array_api_compat.array_namespace(W)), got "
                                                  "module torch")):
        _update(xp=torch, W=W, G=G, lr=lr)
    with pytest.raises(TypeError, match=r"^W must be an array .*got list"):
        _update(W=_unitary(0).tolist(), lr=lr)


def test_unitary_update_takes_ws_namespace_in_either_form():
    """array_api_compat's namespace, or the one the array's own
    __array_namespace__ gives (numpy itself for a NumPy array): one step."""
    reference, _ = _update(xp=xnp)
    np.testing.assert_array_equal(_update(xp=np)[0], reference)
    W, G = torch.asarray(_unitary(0)), torch.asarray(np.random.default_rng(1).standard_normal((N, N)))
    import array_api_compat.torch as xtorch

    np.testing.assert_allclose(_update(xp=xtorch, W=W, G=G)[0].numpy(), reference, rtol=0, atol=1e-14)


# ---- lr = 0 and a rank above min(n, m) in the two front ends -------------------------------------------------

def _both_front_ends(W0, G, *, lr, steps=1, drift_check_every=50, rank=None):
    """W after ``steps`` steps of each optimizer (RMSprop, seed 0), and the
    RMSprop moment each keeps."""
    opt = ProjUNN(lr, rank=rank, seed=0, drift_check_every=drift_check_every)
    W = W0
    for _ in range(steps):
        W = opt.step(W, G)
    p = torch.nn.Parameter(torch.asarray(W0.copy()))
    topt = TorchProjUNN([{"params": [p], "unitary": True}], lr=lr, rank=rank, seed=0,
                        drift_check_every=drift_check_every)
    for _ in range(steps):
        p.grad = torch.asarray(G)
        topt.step()
    return (W, opt.state["square_avg"], opt.reprojections), (p.detach().numpy(), topt.state[p]["square_avg"].numpy(),
                                                             topt.state[p]["reprojections"])


@pytest.mark.parametrize("many", [False, True], ids=["step", "step_many"])
def test_lr_zero_runs_the_drift_checks_in_both_front_ends(many):
    """At lr = 0 the torch optimizer re-projected a W given in float32
    precision after its first step, as its drift schedule says, and the
    framework-free one skipped the check (its step count still went on, so
    the W kept its 4e-8 error until the 50th step): now both do the first
    step's check. The moments advance in both, as torch.optim's do."""
    W0 = _unitary(0, dtype="float32").astype(np.float64)  # 4e-8 from orthogonal
    assert ul.unitarity_error(W0) > 1e-9
    G = np.random.default_rng(1).standard_normal((N, N))
    ours, theirs = _both_front_ends(W0, G, lr=0.0)
    if many:
        opt = ProjUNN(0.0, seed=0)
        ours = (opt.step_many({"W": (W0, G)})["W"], opt._slots["W"]["state"]["square_avg"], opt.reprojections)
    for W, square_avg, reprojections in (ours, theirs):
        assert reprojections == 1
        np.testing.assert_allclose(W, _polar(W0), rtol=0, atol=1e-14)
        np.testing.assert_allclose(square_avg, 0.01 * G**2, rtol=1e-14, atol=0)


def test_lr_zero_leaves_a_unitary_w_in_place_in_both_front_ends():
    """A W unitary to float64 rounding is not moved at lr = 0, at the first
    step's check or at the later ones."""
    W0 = _unitary(0)
    G = np.random.default_rng(1).standard_normal((N, N))
    for W, _, reprojections in _both_front_ends(W0, G, lr=0.0, steps=4, drift_check_every=2):
        assert reprojections == 0
        np.testing.assert_array_equal(W, W0)


def test_rank_above_min_n_m_follows_each_front_ends_documented_rule():
    """docs/choosing-lr-and-rank.md: a rank given to the torch optimizer (or
    optax) must lie in [1, min(n, m)]; the framework-free optimizer, one
    rank for matrices of every size, caps it at min(n, m)."""
    W0, G = _unitary(0, n=4), np.random.default_rng(1).standard_normal((4, 4))
    capped = ProjUNN(1e-2, rank=9, seed=0).step(W0, G)
    np.testing.assert_array_equal(capped, ProjUNN(1e-2, rank=4, seed=0).step(W0, G))
    p = torch.nn.Parameter(torch.asarray(W0))
    with pytest.raises(ValueError, match=re.escape("rank 9 exceeds min(n, m) = 4 of unitary parameter")):
        TorchProjUNN([{"params": [p], "unitary": True}], rank=9)
    with pytest.raises(ValueError, match=re.escape("rank must be <= 4 = min(n, m)")):
        ul.projunn_step(W0, G, lr=1e-2, rank=9, rng=0)
