"""The framework-free optimizer (unitary_lr.optim) on every backend."""

import numpy as np
import pytest
from _helpers import haar, random_matrix, unitarity

import unitary_lr as ul
from unitary_lr.optim import ProjUNN, make_rule

N = 16
BASES = [
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", {"alpha": 0.9, "centered": True, "momentum": 0.5}),
    ("adam", {"betas": (0.8, 0.99)}),
]


@pytest.mark.parametrize(("base", "hyper"), BASES, ids=[b for b, _ in BASES])
@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_unitary_parameter_stays_unitary(backend, dtype, rng, base, hyper, variant):
    W = backend.asarray(haar(rng, N, dtype, (2,)))
    opt = ProjUNN(1e-2, base=base, rank=2, variant=variant, seed=0, **hyper)
    for G in random_matrix(rng, (30, 2, N, N), dtype):
        W = opt.step(W, backend.asarray(G))
    assert W.dtype == backend.dtype(dtype)
    bound = 1e-12 if dtype in ("float64", "complex128") else ul.diagnostics.default_drift_tolerance(dtype)
    assert np.all(unitarity(backend.to_numpy(W)) < bound)
    assert opt.steps == 30


@pytest.mark.parametrize(("base", "hyper"), [*BASES, ("rmsprop", {"weight_decay": 0.1}), ("sgd", {"dampening": 0.3, "momentum": 0.5})])
def test_plain_parameters_update_like_torch_optim(base, hyper, rng):
    """unitary=False is the base rule itself: compared with torch.optim (an
    independent implementation) on NumPy arrays."""
    torch = pytest.importorskip("torch")
    W = rng.standard_normal((5, 7))
    reference = torch.nn.Parameter(torch.asarray(W.copy()))
    torch_opt = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base]([reference], lr=0.01, **hyper)
    opt = ProjUNN(0.01, base=base, unitary=False, **hyper)
    for G in rng.standard_normal((25, 5, 7)):
        W = opt.step(W, G)
        reference.grad = torch.asarray(G)
        torch_opt.step()
    np.testing.assert_allclose(W, reference.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_resume_from_state_dict_repeats_the_uninterrupted_run(backend, rng):
    dtype = "complex128" if backend.has_float64 else "complex64"
    W0 = backend.asarray(haar(rng, N, dtype))
    gradients = [backend.asarray(G) for G in random_matrix(rng, (12, N, N), dtype)]
    straight = ProjUNN(1e-2, base="adam", rank=3, seed=5)
    W = W0
    for G in gradients:
        W = straight.step(W, G)
    first = ProjUNN(1e-2, base="adam", rank=3, seed=5)
    V = W0
    for G in gradients[:5]:
        V = first.step(V, G)
    saved = first.state_dict()
    first.step(V, gradients[5])  # the saved state must not move with the live one
    resumed = ProjUNN(1e-2, base="adam", rank=3, seed=99)
    resumed.load_state_dict(saved)
    for G in gradients[5:]:
        V = resumed.step(V, G)
    np.testing.assert_array_equal(backend.to_numpy(V), backend.to_numpy(W))


def test_factor_gradient_goes_straight_to_the_step(rng):
    """With a stateless rule the pair (a, b) is not formed into an n x n matrix,
    and the step equals the one for the dense a b^H with the same seed."""
    W = haar(rng, N, "complex128")
    a, b = random_matrix(rng, (2, N, 6), "complex128")
    from_factors = ProjUNN(0.1, base="sgd", rank=2, seed=3).step(W, (a, b))
    dense = ProjUNN(0.1, base="sgd", rank=2, seed=3).step(W, a @ b.conj().T)
    np.testing.assert_allclose(from_factors, dense, atol=1e-13)
    with_state = ProjUNN(0.1, base="rmsprop", rank=2, seed=3)
    assert with_state.step(W, (a, b)).shape == (N, N)  # formed: the rule keeps dense moments
    assert with_state.state["square_avg"].shape == (N, N)


@pytest.mark.parametrize("base", ["sgd", "rmsprop"])
def test_factors_without_columns_step_as_a_zero_gradient(base):
    """An empty batch's pair (n x 0, m x 0) takes the step of the zero
    gradient: W comes back unchanged and a stateful rule's moments move as
    for zeros."""
    W = ul.random_unitary(N, dtype="complex128", rng=0)
    empty = (np.zeros((N, 0), complex), np.zeros((N, 0), complex))
    from_empty, from_zeros = ProjUNN(0.1, base=base, seed=3), ProjUNN(0.1, base=base, seed=3)
    G = np.ones((N, N), complex)
    for opt in (from_empty, from_zeros):
        opt.step(W, G)
    V = from_empty.step(W, empty)
    np.testing.assert_array_equal(V, from_zeros.step(W, np.zeros((N, N), complex)))
    assert from_empty.steps == 2
    for key, value in from_zeros.state.items():
        np.testing.assert_array_equal(from_empty.state[key], value)


def test_complex_second_moment_is_the_modulus():
    """|g|^2, not g^2 (whose phase would make the moment complex and the step wrong)."""
    import array_api_compat

    g = np.array([[3 + 4j, 1j]])
    xp = array_api_compat.array_namespace(g)
    rule = make_rule("rmsprop", alpha=0.0, eps=0.0)
    direction, state = rule.direction(xp, g, g, rule.init(xp, g))
    np.testing.assert_allclose(state["square_avg"], [[25.0, 1.0]])
    assert state["square_avg"].dtype == np.float64
    np.testing.assert_allclose(direction, g / np.abs(g))


def test_drift_control_reprojects(rng):
    """A W that has drifted off the group is brought back at the next check;
    the default thresholds do not fire on healthy float64 training."""
    opt = ProjUNN(1e-3, base="sgd", rank=1, drift_check_every=2, seed=0)
    G = rng.standard_normal((N, N))
    W = haar(rng, N, "float64")
    for step, (checked, reprojections) in enumerate(((True, 1), (True, 2), (False, 2), (True, 3)), 1):
        W = opt.step(W + 1e-6 * rng.standard_normal((N, N)), G)  # drifted off the group
        assert (unitarity(W) < 1e-14) == checked, step  # the first step, then every second
        assert opt.reprojections == reprojections
    for _ in range(20):
        W = opt.step(W, G)
    assert opt.reprojections == 3


@pytest.mark.slow
def test_float32_training_stays_within_the_drift_tolerance(rng):
    """Rounding drift in float32 grows like sqrt(steps) * eps; drift control keeps
    it under the tolerance (a tight one here, so that it has to act)."""
    W = haar(rng, 48, "float32")
    tolerance = 1e-6
    opt = ProjUNN(1e-2, base="sgd", rank=2, drift_tol=tolerance, drift_check_every=25, seed=0)
    worst = 0.0
    for step in range(3000):
        W = opt.step(W, rng.standard_normal((48, 48)).astype(np.float32))
        if step % 25 == 24:
            worst = max(worst, float(unitarity(W)))
    assert opt.reprojections > 0
    assert worst < 3 * tolerance  # the estimate is within a factor ~2 of the truth


def test_errors_leave_everything_unchanged(rng):
    W = haar(rng, N, "float64")
    opt = ProjUNN(1e-2, base="adam", rank=2, seed=0)
    W1 = opt.step(W, rng.standard_normal((N, N)))
    before = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state.items()}
    bad = rng.standard_normal((N, N))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step(W1, bad)
    assert opt.steps == 1
    for key, value in before.items():
        np.testing.assert_array_equal(opt.state[key], value)
    with pytest.raises(ValueError, match=r"G must have the shape of W \(16, 16\), got \(16, 15\)"):
        opt.step(W1, bad[:, :-1])


def test_a_bad_state_dict_or_a_complex_plain_gradient_changes_nothing(rng):
    """load_state_dict with a dict that lacks an entry replaced the random
    stream, then raised a bare KeyError; a plain (unitary=False) real W took
    a complex gradient and came back complex, and its next step failed."""
    W = haar(rng, N, "float64")
    opt = ProjUNN(1e-2, base="adam", rank=2, seed=0)
    W = opt.step(W, rng.standard_normal((N, N)))
    saved = opt.state_dict()
    stream = opt._rng.bit_generator.state
    for bad, error, match in (({"rng": saved["rng"]}, ValueError, r"state_dict lacks 'steps'"),
                              ({}, ValueError, r"state_dict lacks 'rng', 'steps'"),
                              (None, TypeError, r"state_dict must be a dict made by ProjUNN.state_dict\(\)"),
                              ({"rng": {"state": 1}, "steps": 1}, ValueError, r"not a dict made by .*KeyError")):
        with pytest.raises(error, match=match):
            opt.load_state_dict(bad)
        assert opt._rng.bit_generator.state == stream and opt.steps == 1
    plain = ProjUNN(1e-2, base="adam", unitary=False)
    with pytest.raises(TypeError, match=r"^G has complex dtype complex128 but W is real \(float64\)"):
        plain.step(np.eye(3), np.ones((3, 3)) + 1j)
    assert plain.steps == 0 and plain.state is None
    assert plain.step(np.eye(3) + 0j, np.ones((3, 3)) + 1j).dtype == np.complex128  # complex W: as before


def test_hyper_parameters_as_numpy_scalars_and_non_numbers():
    """NumPy scalars are numbers (a np.float32 momentum was refused as "not a
    finite number"); a string in betas or alpha is named (it was Python's
    bare comparison TypeError)."""
    assert ProjUNN(np.float32(1e-2), base="sgd", momentum=np.float32(0.9)).rule.momentum == np.float32(0.9)
    assert ProjUNN(1e-2, base="adam", weight_decay=np.int64(0)).rule.weight_decay == 0
    rule = ProjUNN(1e-2, base="adam", betas=(np.float64(0.5), np.array(0.9)), eps=np.float32(1e-6)).rule
    assert [type(x) for x in (*rule.betas, rule.eps)] == [float, float, float]  # Python's, as lr is
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\), got \('a', 0.9\)"):
        ProjUNN(1e-2, base="adam", betas=("a", 0.9))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\), got '0.5'"):
        ProjUNN(1e-2, base="rmsprop", alpha="0.5")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1e-3}, ValueError, r"lr must be >= 0, got -0.001"),
        ({"lr": 1e-3, "base": "adagrad"}, ValueError, r"base must be one of 'sgd', 'rmsprop', 'adam', got 'adagrad'"),
        ({"lr": 1e-3, "base": "adam", "momentum": 0.9}, TypeError, r"base='adam' takes the hyper-parameters amsgrad, betas, decoupled_weight_decay, eps, maximize, weight_decay; got 'momentum'"),
        ({"lr": 1e-3, "base": "sgd", "nesterov": True}, ValueError, r"nesterov needs momentum > 0 and dampening = 0"),
        ({"lr": 1e-3, "base": "adam", "betas": (0.9, 1.0)}, ValueError, r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ({"lr": 1e-3, "base": "rmsprop", "alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\), got 1.5"),
        ({"lr": 1e-3, "base": "rmsprop", "eps": -1.0}, ValueError, r"eps must be a finite number >= 0, got -1.0"),
        ({"lr": 1e-3, "variant": "geodesic"}, ValueError, r"variant must be one of 'tangent', 'direct', 'cayley', got 'geodesic'"),
        ({"lr": 1e-3, "drift_tol": 0.0}, ValueError, r"drift_tol must be a number in \(0, 0.01\] or None, got 0.0"),
        ({"lr": 1e-3, "reproject": "qr"}, ValueError, r"reproject must be one of 'svd', 'newton_schulz', got 'qr'"),
        ({"lr": 1e-3, "unitary": "yes"}, TypeError, r"unitary must be True or False, got 'yes'"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProjUNN(**kwargs)


def _snapshot(opt):
    return {key: (np.array(value, copy=True) if hasattr(value, "shape") else value) for key, value in opt.state.items()}


def _assert_state_is(opt, snapshot):
    for key, value in snapshot.items():
        np.testing.assert_array_equal(opt.state[key], value)


@pytest.mark.parametrize("base", ["adam", "rmsprop"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_plain_update_refuses_a_nonfinite_gradient_and_keeps_its_state(rng, base, bad):
    """unitary=False: NaN/Inf used to go into the moments (and W) silently."""
    W = rng.standard_normal((5, 7))
    opt = ProjUNN(1e-2, base=base, unitary=False)
    W = opt.step(W, rng.standard_normal((5, 7)))
    snapshot = _snapshot(opt)
    G = rng.standard_normal((5, 7))
    G[3, 1] = bad
    with pytest.raises(ValueError, match=r"^G contains NaN or Inf: 1 non-finite entry in an array of shape \(5, 7\)"):
        opt.step(W, G)
    assert opt.steps == 1
    _assert_state_is(opt, snapshot)
    W_bad = W.copy()
    W_bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^W contains NaN or Inf"):
        opt.step(W_bad, rng.standard_normal((5, 7)))
    _assert_state_is(opt, snapshot)


def test_lr_zero_refuses_a_nan_gradient_and_later_steps_work(rng):
    """lr = 0 skips the projUNN step; the NaN used to poison the moments and
    every later step then failed."""
    W = haar(rng, N, "float64")
    opt = ProjUNN(0.0, base="adam", rank=2, seed=0)
    G = rng.standard_normal((N, N))
    G[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^G contains NaN or Inf: 1 non-finite entry"):
        opt.step(W, G)
    assert opt.state is None and opt.steps == 0
    opt.lr = 1e-2
    V = opt.step(W, rng.standard_normal((N, N)))
    assert np.all(np.isfinite(opt.state["exp_avg"])) and unitarity(V) < 1e-13


@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_a_rejected_step_leaves_the_random_stream_where_it_was(rng, base):
    """Skipping a bad batch gives the run that never saw it, bit for bit: the
    failed step used to advance the sketches' stream."""
    W0 = haar(rng, N, "complex128")
    good = random_matrix(rng, (3, N, N), "complex128")
    bad_G = good[1].copy()
    bad_G[2, 2] = np.nan
    not_unitary = 0.5 * W0
    straight, skipping = (ProjUNN(1e-2, base=base, rank=2, seed=7) for _ in range(2))
    W = V = W0
    for G in good:
        W = straight.step(W, G)
    for i, G in enumerate(good):
        if i == 1:
            with pytest.raises(ValueError, match=r"^G contains NaN or Inf"):
                skipping.step(V, bad_G)
            with pytest.raises(ValueError, match=r"^W is not unitary"):
                skipping.step(not_unitary, G)
        V = skipping.step(V, G)
    np.testing.assert_array_equal(V, W)
    assert skipping.state_dict()["rng"] == straight.state_dict()["rng"] and skipping.steps == 3


def test_each_key_has_its_own_moments(rng):
    """One optimizer for two matrices used to share (and mix) one set of Adam
    moments, or fail with a raw broadcasting error for different shapes."""
    W1, W2 = rng.standard_normal((4, 6)), rng.standard_normal((3, 3))
    G1, G2 = rng.standard_normal((5, 4, 6)), rng.standard_normal((5, 3, 3))
    shared = ProjUNN(1e-2, base="adam", unitary=False)
    alone1, alone2 = ProjUNN(1e-2, base="adam", unitary=False), ProjUNN(1e-2, base="adam", unitary=False)
    V1, V2 = W1, W2
    for g1, g2 in zip(G1, G2):
        W1, W2 = shared.step(W1, g1, key="W1"), shared.step(W2, g2, key="W2")
        V1, V2 = alone1.step(V1, g1), alone2.step(V2, g2)
    np.testing.assert_array_equal(W1, V1)
    np.testing.assert_array_equal(W2, V2)
    assert shared.steps == 10 and shared.state is None
    restored = ProjUNN(1e-2, base="adam", unitary=False)
    restored.load_state_dict(shared.state_dict())
    np.testing.assert_array_equal(restored.step(W1, G1[0], key="W1"), alone1.step(V1, G1[0]))


def test_a_second_matrix_without_its_own_key_is_refused(rng):
    opt = ProjUNN(1e-2, base="adam", unitary=False)
    W = opt.step(rng.standard_normal((4, 6)), rng.standard_normal((4, 6)))
    with pytest.raises(ValueError, match=r"W has shape \(3, 3\) and dtype float64, but the optimizer's state under "
                                         r"key=None belongs to a W of shape \(4, 6\) and dtype float64; give each "
                                         r"matrix its own key: opt.step\(W, G, key=name\)"):
        opt.step(rng.standard_normal((3, 3)), rng.standard_normal((3, 3)))
    with pytest.raises(TypeError, match=r"key must be hashable"):
        opt.step(W, rng.standard_normal((4, 6)), key=["W"])
    assert opt.steps == 1


@pytest.mark.parametrize("unitary", [False, True])
@pytest.mark.parametrize(("base", "hyper"), [("sgd", {"momentum": np.float64(0.9)}),
                                            ("rmsprop", {"alpha": np.float64(0.9), "eps": np.float64(1e-6)}),
                                            ("adam", {"betas": (np.float64(0.8), np.float64(0.99))})],
                         ids=["sgd", "rmsprop", "adam"])
def test_numpy_scalar_hyper_parameters_keep_the_dtypes(backend, rng, base, hyper, unitary):
    """np.float64 hyper-parameters, and an Adam count restored as a NumPy
    integer: a float32 W and its state stay float32, on the W's library and
    device. They made the state (and a plain W) float64 (NumPy's promotion of
    a float64 scalar; a plain W's next step was then refused as "another
    key's"), and array_api_strict's arrays NumPy's ("W is a array_api_strict
    Array but G is a numpy.ndarray")."""
    dtype = backend.dtype("float32")
    W = backend.asarray(haar(rng, N, "float32"))
    opt = ProjUNN(1e-2, base=base, unitary=unitary, seed=0, **hyper)
    reference = ProjUNN(1e-2, base=base, unitary=unitary, seed=0,
                        **{k: tuple(map(float, v)) if isinstance(v, tuple) else float(v) for k, v in hyper.items()})
    G = random_matrix(rng, (3, N, N), "float32")
    W_ref = W
    for i, g in enumerate(G):
        if i == 2 and base == "adam":  # a count restored by NumPy
            opt.state["step"] = np.int64(opt.state["step"])
        W, W_ref = opt.step(W, backend.asarray(g)), reference.step(W_ref, backend.asarray(g))
        assert W.dtype == dtype and all(v.dtype == dtype for v in opt.state.values() if hasattr(v, "dtype"))
        np.testing.assert_array_equal(backend.to_numpy(W), backend.to_numpy(W_ref))
    if backend.name.startswith("array_api_strict"):
        assert W.device == backend.device


@pytest.mark.parametrize("unitary", [False, True])
@pytest.mark.parametrize(("base", "hyper"), [("rmsprop", {}), ("rmsprop", {"centered": True}),
                                            ("adam", {"amsgrad": True})], ids=["rmsprop", "centered", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("lr", [1e-2, 0.0])
def test_moments_that_overflow_are_refused_on_every_backend(backend, rng, base, hyper, dtype, unitary, lr):
    """A finite gradient whose squares overflow float32: the moments became
    Inf for good on JAX, torch and array_api_strict (only NumPy warns of the
    overflow), and every later step moved W by exactly 0, without a word.
    Refused now by every path: a plain update, lr = 0 (no step looks at the
    direction), the unitary step and step_many's batched steps; nothing
    changes."""
    W = backend.asarray(haar(rng, N, dtype))
    opt = ProjUNN(lr, base=base, unitary=unitary, seed=0, foreach=True, **hyper)
    W = opt.step(W, backend.asarray(random_matrix(rng, (N, N), dtype)))
    snapshot = {key: (backend.to_numpy(v) if hasattr(v, "shape") else v) for key, v in opt.state.items()}
    G = random_matrix(rng, (N, N), dtype) * np.float32(1e30)
    assert np.all(np.isfinite(G))
    message = rf"G is too large for the {base} rule's moments in {dtype} \(.*largest \|entry\| [0-9.e+]+.*\); scale"
    with pytest.raises(ValueError, match="^" + message):
        opt.step(W, backend.asarray(G))
    with pytest.raises(ValueError, match=r"^steps\['b'\]: " + message):
        opt.step_many({"a": (W, backend.asarray(G / np.float32(1e30))), "b": (W, backend.asarray(G))})
    for key, value in snapshot.items():
        np.testing.assert_array_equal(backend.to_numpy(opt.state[key]) if hasattr(value, "shape") else opt.state[key],
                                      value)
    assert opt.steps == 1 and set(opt._slots) == {None}


@pytest.mark.parametrize("unitary", [False, True])
def test_a_gradient_whose_square_overflows_the_moments_is_refused(rng, unitary):
    """|g|^2 beyond float32: the moments used to become Inf for good (every
    later step then moved W by 0) with only NumPy's RuntimeWarning."""
    W = haar(rng, N, "float32")
    opt = ProjUNN(1e-2, base="rmsprop", unitary=unitary, seed=0)
    W = opt.step(W, random_matrix(rng, (N, N), "float32"))
    snapshot = _snapshot(opt)
    G = random_matrix(rng, (N, N), "float32") * np.float32(1e30)
    with pytest.raises(ValueError, match=r"^G is too large for the rmsprop rule's moments in float32 \(overflow "
                                         r"encountered in .*; largest \|entry\| [0-9.e+]+: its square overflows\); scale the gradient"):
        opt.step(W, G)
    _assert_state_is(opt, snapshot)
    zero_eps = ProjUNN(1e-2, base="rmsprop", unitary=unitary, eps=0.0)
    with pytest.raises(ValueError, match=r"^G makes the rmsprop rule's step non-finite in float32 .* use eps > 0"):
        zero_eps.step(W, np.zeros_like(W))
    assert zero_eps.state is None


@pytest.mark.parametrize("under", ["warn", "raise"])
@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_an_underflow_reported_by_numpy_is_not_an_error_of_the_gradient(rng, base, under):
    """np.errstate(under="warn") (a debugging setting): the squares of a
    tiny finite gradient underflow, and the rule's check of NumPy's warnings
    refused it ("G makes the rmsprop rule's step non-finite")."""
    W = haar(rng, N, "float64")
    G = random_matrix(rng, (N, N), "float64") * 1e-170
    expected = ProjUNN(0.1, base=base, seed=0).step(W, G)
    with np.errstate(under=under):
        got = ProjUNN(0.1, base=base, seed=0).step(W, G)
    np.testing.assert_array_equal(got, expected)


def test_a_state_of_another_rule_or_malformed_is_refused_and_changes_nothing():
    W = ul.random_unitary(8, dtype="float64", rng=0)
    G = np.random.default_rng(0).standard_normal((8, 8))
    adam = ProjUNN(0.1, base="adam", seed=0)
    adam.step(W, G)
    saved = adam.state_dict()
    for base, options in (("rmsprop", {}), ("sgd", {"momentum": 0.9}), ("adam", {"amsgrad": True})):
        other = ProjUNN(0.1, base=base, seed=1, **options)
        other.step(W, G)
        before = other.state_dict()
        # (under RMSprop a bare KeyError at the next step; under SGD the moments were dropped unsaid)
        with pytest.raises(ValueError, match=r"state_dict\['matrices'\]\[None\]\['state'\] holds \['exp_avg', "
                                             r"'exp_avg_sq', 'step'\], the state of another base rule"):
            other.load_state_dict(saved)
        assert other.state_dict()["rng"] == before["rng"] and other.steps == 1
    fresh = ProjUNN(0.1, base="adam")
    for bad, message in (({**saved, "rng": {**saved["rng"], "state": -1}}, r"OverflowError"),
                         ({**saved, "steps": -5}, r"state_dict\['steps'\] must be >= 0, got -5"),
                         ({**saved, "matrices": {None: {}}}, r"state_dict\['matrices'\]\[None\] must be a dict with "
                                                             r"keys 'signature', 'steps' and 'state'")):
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(bad)
        assert fresh.steps == 0 and not fresh._slots
    sgd = ProjUNN(0.1, base="sgd", momentum=0.9, seed=0)
    sgd.step(W, G)
    ProjUNN(0.1, base="sgd", momentum=0.9).load_state_dict(sgd.state_dict())  # its own rule's state loads


@pytest.mark.parametrize("base", ["adam", "rmsprop", "sgd"])
def test_malformed_factor_pairs_are_named_before_they_are_multiplied(base):
    # a stateful base multiplied them first: NumPy's "matmul: Input operand 1
    # has a mismatch in its core dimension", or a shape of the product
    W = ul.random_unitary(16, dtype="float64", rng=0)
    opt = ProjUNN(1e-2, base=base, **({"momentum": 0.9} if base == "sgd" else {}))
    with pytest.raises(ValueError, match=r"G\[0\] and G\[1\] must have the same number of columns k, got shapes "
                                         r"\(16, 2\) and \(16, 3\)"):
        opt.step(W, (np.ones((16, 2)), np.ones((16, 3))))
    with pytest.raises(ValueError, match=r"G\[1\] must have shape \(\.\.\., 16, k\) to match W of shape \(16, 16\), "
                                         r"got shape \(32, 2\)"):
        opt.step(W, (np.ones((16, 2)), np.ones((32, 2))))
    assert opt.steps == 0


@pytest.mark.parametrize("many", [False, True])
def test_a_matrix_given_in_another_precision_is_reprojected_at_its_first_step(many):
    # a float32 matrix given as float64 is 2e-7 from unitary, 1e5 times the
    # tolerance: it kept that error until the first drift check, 50 steps later
    W = ul.random_unitary(16, dtype="float32", rng=0).astype(np.float64)
    assert unitarity(W) > 1e-8
    G = np.random.default_rng(1).standard_normal((16, 16))

    def stepped(opt, W):
        return opt.step_many({"w": (W, G)})["w"] if many else opt.step(W, G, key="w")

    opt = ProjUNN(1e-2, base="sgd", rank=2, seed=0, **({"foreach": True} if many else {}))
    assert unitarity(stepped(opt, W)) < 1e-14 and opt.reprojections == 1
    assert unitarity(stepped(ProjUNN(1e-2, rank=2, seed=0, drift_check_every=0), W)) > 1e-8
    # a unitary matrix is left as it is, and the sketches' stream is not drawn from
    V = ul.random_unitary(16, dtype="float64", rng=2)
    opt = ProjUNN(0.1, base="sgd", rank=2, seed=3, **({"foreach": True} if many else {}))
    rng = np.random.default_rng(3)
    for _ in range(2):
        expected = ul.projunn_step(V, G, lr=0.1, rank=2, rng=rng)
        V = stepped(opt, V)
        np.testing.assert_allclose(V, expected, rtol=0, atol=1e-15)
    assert opt.reprojections == 0


def test_edited_options_are_checked_and_the_base_is_fixed():
    # an edited base was ignored (the rule was made from the first); a bad
    # drift_tol or reproject passed until a drift check
    opt = ProjUNN(0.1, base="rmsprop", seed=0)
    with pytest.raises(AttributeError, match=r"base is fixed when ProjUNN is made"):
        opt.base = "sgd"
    for name, value, error, message in (("drift_tol", -1, ValueError, r"drift_tol must be a number in \(0, 0.01\]"),
                                        ("reproject", "x", ValueError, r"reproject must be one of 'svd'"),
                                        ("rank", 0, ValueError, r"rank must be >= 1, got 0"),
                                        ("lr", "a", TypeError, r"lr must be a real number, got str"),
                                        ("lr", -1, ValueError, r"lr must be >= 0, got -1")):
        with pytest.raises(error, match=message):
            setattr(opt, name, value)
    assert (opt.base, opt.drift_tol, opt.reproject, opt.rank, opt.lr) == ("rmsprop", None, "svd", None, 0.1)
    opt.lr, opt.rank, opt.variant = 0.5, 3, "direct"
    W = ul.random_unitary(8, dtype="float64", rng=0)
    V = opt.step(W, np.ones((8, 8)))
    assert float(ul.unitarity_error(V)) < 1e-14


def test_a_state_of_another_device_or_library_is_named_with_its_key():
    """A checkpoint resumed with W on another device or library: the rule's
    arithmetic failed in the library's words ("Arrays from two different
    devices can not be combined", "Expected Array or Python scalar"), naming
    neither the key nor the way out. A torch Parameter and its state's plain
    tensors are of one library."""
    xs = pytest.importorskip("array_api_strict")
    W0 = ul.random_unitary(8, dtype="float64", rng=0)
    G = np.random.default_rng(1).standard_normal((8, 8))
    d1, d2 = xs.Device("device1"), xs.Device("device2")
    for made, used in (((lambda x: xs.asarray(x, device=d1)), (lambda x: xs.asarray(x, device=d2))),
                       (np.asarray, (lambda x: xs.asarray(x, device=d1)))):
        opt = ProjUNN(0.1, base="adam", seed=0)
        opt.step(made(W0), made(G), key="layer")
        resumed = ProjUNN(0.1, base="adam", seed=0)
        resumed.load_state_dict(opt.state_dict())
        before = resumed.state_dict()
        with pytest.raises(TypeError, match=r"^the optimizer's state under key='layer' holds .* arrays on device .*, "
                                            r"but W is a .* on device .*; convert the state's arrays"):
            resumed.step(used(W0), used(G), key="layer")
        assert resumed.steps == before["steps"] and resumed.state_dict()["rng"] == before["rng"]
    torch = pytest.importorskip("torch")
    opt = ProjUNN(0.1, base="adam", seed=0)
    W = torch.nn.Parameter(torch.as_tensor(W0))
    for _ in range(2):
        W = opt.step(W, torch.as_tensor(G))
    assert opt.steps == 2


def _half_arrays():
    """Makers of arrays of the dtypes unitary_lr does not take, on each library
    installed: (name, make(x, dtype name), dtype names)."""
    makers = [("numpy", lambda x, d: np.asarray(x).astype(d), ("float16", "bool", "int32"))]
    try:
        import torch
        makers.append(("torch", lambda x, d: torch.asarray(np.asarray(x, np.float32)).to(getattr(torch, d)),
                       ("float16", "bfloat16", "bool", "int32")))
    except ImportError:  # pragma: no cover
        pass
    try:
        import jax.numpy as jnp
        makers.append(("jax", lambda x, d: jnp.asarray(np.asarray(x, np.float32)).astype(d),
                       ("float16", "bfloat16", "bool", "int32")))
    except ImportError:  # pragma: no cover
        pass
    return makers


@pytest.mark.parametrize("unitary", [True, False])
@pytest.mark.parametrize(("base", "hyper"), [("sgd", {}), ("sgd", {"momentum": 0.9}), ("rmsprop", {}), ("adam", {})],
                         ids=["sgd", "sgd-momentum", "rmsprop", "adam"])
def test_unsupported_gradient_and_matrix_dtypes_are_refused_before_the_rule(rng, base, hyper, unitary):
    """A float16 (or bool, integer) G for a float32 W: rmsprop and adam took
    it, squared it in float16, where the squares of entries below 1e-3
    underflow, and stepped 0.17 away from the step of the same numbers in
    float32; sgd refused it. Every rule refuses it now with a TypeError that
    names the argument and shows the dtype, for G, a factor of G and W, on
    every path, and nothing changes."""
    W32 = haar(rng, 8, "float32")
    G32 = (1e-4 * rng.standard_normal((8, 8))).astype(np.float32)
    a32, b32 = rng.standard_normal((2, 8, 2)).astype(np.float32)
    expected = "; expected one of float32, float64, complex64, complex128"
    for library, make, dtypes in _half_arrays():
        to = (lambda x: make(x, "float32")) if library != "numpy" else (lambda x: x)
        for dtype in dtypes:
            opt = ProjUNN(1e-2, base=base, rank=2, unitary=unitary, seed=0, **hyper)
            W = opt.step(to(W32), to(G32), key="w")  # a state to keep
            before = (opt.state_dict()["rng"], opt.steps, {key: dict(slot) for key, slot in opt._slots.items()})
            shown = rf"(torch\.)?{dtype}"
            for call, name in ((lambda: opt.step(W, make(G32, dtype), key="w"), "G"),
                               (lambda: opt.step(W, make(G32, dtype), key="new"), "G"),
                               (lambda: opt.step(W, (make(a32, dtype), to(b32)), key="w"), r"G\[0\]"),
                               (lambda: opt.step(W, (to(a32), make(b32, dtype)), key="w"), r"G\[1\]"),
                               (lambda: opt.step(make(W32, dtype), make(G32, dtype), key="new"), "W"),
                               (lambda: opt.step(make(W32, dtype), to(G32), key="new"), "W")):
                with pytest.raises(TypeError, match=rf"^{name} has dtype {shown}{expected}$"):
                    call()
            with pytest.raises(TypeError, match=rf"^steps\['b'\]: G has dtype {shown}{expected}$"):
                opt.step_many({"w": (W, to(G32)), "b": (W, make(G32, dtype))})
            assert (opt.state_dict()["rng"], opt.steps) == before[:2] and set(opt._slots) == {"w"}
            assert opt._slots["w"]["signature"] == ((8, 8), "float32") and opt._slots["w"]["steps"] == 1


def test_a_half_precision_matrix_records_no_key_and_is_refused():
    """The key's signature recorded dtype None for float16 and bfloat16, so
    the check of a key's dtype was skipped: a bfloat16 W under the state of
    a float16 one was stepped with its moments and came back float32."""
    torch = pytest.importorskip("torch")
    opt = ProjUNN(0.01, unitary=False, seed=0)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"^W has dtype {dtype}; expected one of float32, float64"):
            opt.step(torch.ones(4, 4, dtype=dtype), torch.ones(4, 4, dtype=dtype))
    assert opt.state_dict()["matrices"] == {} and opt.steps == 0
    opt.step(torch.ones(4, 4), torch.ones(4, 4))
    assert opt.state_dict()["matrices"][None]["signature"] == ((4, 4), "float32")


@pytest.mark.parametrize(("base", "hyper"), BASES, ids=[b for b, _ in BASES])
def test_a_wider_gradient_keeps_the_dtype_of_a_plain_matrix(rng, base, hyper):
    """unitary=False: a float64 G for a float32 W (what NumPy code makes
    easily) returned a float64 W, whose next step was refused as another
    matrix's ("give each matrix its own key"). The step keeps W's dtype, as
    the unitary step does: it is torch.optim's step of a float32 parameter
    whose gradient is G rounded to float32, and the moments are float32."""
    torch = pytest.importorskip("torch")
    W = rng.standard_normal((5, 7)).astype(np.float32)
    reference = torch.nn.Parameter(torch.asarray(W.copy()))
    torch_opt = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base](
        [reference], lr=0.01, **hyper)
    opt = ProjUNN(0.01, base=base, unitary=False, **hyper)
    for G in rng.standard_normal((6, 5, 7)):
        W = opt.step(W, G)
        assert W.dtype == np.float32
        assert all(v.dtype == np.float32 for v in opt.state.values() if hasattr(v, "dtype"))
        reference.grad = torch.asarray(G.astype(np.float32))
        torch_opt.step()
    np.testing.assert_allclose(W, reference.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert opt.steps == 6 and opt.state_dict()["matrices"][None]["signature"] == ((5, 7), "float32")
    # a narrower G promotes nothing: a float64 W stays float64, a complex64 W complex64
    assert ProjUNN(0.01, base=base, unitary=False, **hyper).step(W.astype(np.float64), G.astype(np.float32)).dtype \
        == np.float64
    assert ProjUNN(0.01, base=base, unitary=False, **hyper).step(W + 0j * W, G).dtype == np.complex64


@pytest.mark.parametrize("unitary", [False, True])
def test_a_wider_gradient_keeps_the_dtypes_on_every_backend(backend, rng, unitary):
    """float64 G, float32 W (complex128 G, complex64 W): the new W and the
    moments are in W's dtype on every library, as from G rounded to W's
    dtype; a finite G beyond W's range is a ValueError, and nothing changes."""
    if not backend.has_float64:
        pytest.skip("no float64 on this device")
    for narrow, wide in (("float32", "float64"), ("complex64", "complex128")):
        W = backend.asarray(haar(rng, N, narrow))
        G = random_matrix(rng, (N, N), wide)
        opt, rounded = (ProjUNN(1e-2, base="adam", rank=2, unitary=unitary, seed=0) for _ in range(2))
        V = opt.step(W, backend.asarray(G))
        V_rounded = rounded.step(W, backend.asarray(G.astype(narrow)))
        assert V.dtype == backend.dtype(narrow) and opt.steps == 1
        assert all(v.dtype == backend.dtype("float32" if key == "exp_avg_sq" else narrow)
                   for key, v in opt.state.items() if hasattr(v, "dtype"))
        np.testing.assert_array_equal(backend.to_numpy(V), backend.to_numpy(V_rounded))
        V = opt.step(V, backend.asarray(G))  # the same matrix: its key's state takes it
        too_large = G * 1e39
        with pytest.raises(ValueError, match=rf"^G is too large for W's dtype {narrow} \(G has dtype {wide}, "
                                             r"largest \|entry\| [0-9.e+]+\); scale the gradient"):
            opt.step(V, backend.asarray(too_large))
        assert opt.steps == 2


@pytest.mark.parametrize("unitary", [False, True])
@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_eps_zero_at_a_zero_gradient_entry_is_named_as_0_over_0(backend, base, unitary):
    """eps=0 and an entry of G that is 0: the rule divides 0 by sqrt(0) + 0.
    On torch, JAX and array_api_strict (NumPy warns of it instead) this was
    reported as "G is too large for the rule's moments ... its square
    overflows"; with float16 arrays (refused now) the dtype read "None"."""
    W = backend.asarray(haar(np.random.default_rng(0), 4, "float32"))
    G = np.ones((4, 4), np.float32)
    G[1, 2] = 0.0
    opt = ProjUNN(1e-2, base=base, unitary=unitary, eps=0.0, seed=0, foreach=True)
    message = (rf"G makes the {base} rule's step non-finite in float32 \((.*; )?eps=0.0 is 0 in float32, so an entry "
               r"of G that is 0 divides 0 by 0, and one whose square underflows divides by 0\); use eps > 0, at "
               r"least 1.18e-38 in float32")
    for call in (lambda: opt.step(W, backend.asarray(G)),
                 lambda: opt.step_many({"a": (W, backend.asarray(G)), "b": (W, backend.asarray(G))})):
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "None" not in str(error.value) and "too large" not in str(error.value)
    assert opt.steps == 0 and opt.state is None and not opt._slots
    # a positive eps steps the same G
    assert ProjUNN(1e-2, base=base, unitary=unitary, seed=0).step(W, backend.asarray(G)).dtype == W.dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_capturable_adam_steps_a_half_precision_plain_parameter(dtype):
    """unitary_lr.torch.ProjUNN(capturable=True, base="adam") failed on a
    float16 or bfloat16 plain parameter in step_count ("attribute name must
    be string, not 'NoneType'"); torch.optim.Adam steps it. Compared with
    torch.optim.Adam in the parameter's dtype, and with the optimizer that
    is not capturable."""
    torch = pytest.importorskip("torch")
    import unitary_lr.torch as ut

    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 3, generator=generator).to(dtype)
    grads = [torch.randn(6, 3, generator=generator).to(dtype) for _ in range(4)]
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    optimizers = [ut.ProjUNN([params[0]], lr=0.01, base="adam", unitary=False, capturable=True),
                  ut.ProjUNN([params[1]], lr=0.01, base="adam", unitary=False),
                  torch.optim.Adam([params[2]], lr=0.01)]
    for g in grads:
        for p, opt in zip(params, optimizers):
            p.grad = g.clone()
            opt.step()
    captured, plain, reference = (p.detach() for p in params)
    assert captured.dtype == dtype
    ulp = float(torch.finfo(dtype).eps)
    assert float((captured.float() - start.float()).abs().max()) > 0.02  # moved: 4 steps of up to lr each
    torch.testing.assert_close(captured.float(), reference.float(), rtol=4 * ulp, atol=4 * ulp)
    torch.testing.assert_close(captured.float(), plain.float(), rtol=4 * ulp, atol=4 * ulp)
