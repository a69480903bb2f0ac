"""An eager step on JAX arrays runs its work on the device as a few programs
compiled once (``_host.staged``), not as one dispatch per operation.

JAX reports every backend compilation (``jax.monitoring``), eager operations
included: the first step of a new shape compiles each program it runs once,
so the count of compilations is the count of distinct programs; a later step
of the same shape with another gradient, step size and sketch compiles none
(nothing that changes from step to step is a static argument), but for the
one static value that follows the data: the number of Newton-Schulz steps a
basis needs, with which the programs that apply the update may be compiled
once more."""

import numpy as np
import pytest

import unitary_lr as ul

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
monitoring = pytest.importorskip("jax.monitoring")
from unitary_lr.transport import cayley_transport, exp_transport  # noqa: E402

_compiles = []


def _listener(name, seconds, fun_name="?", **_):
    if name.endswith("backend_compile_duration"):
        _compiles.append(fun_name)


monitoring.register_event_duration_secs_listener(_listener)


def _warm(dtype):
    """One step and one optimizer step of another shape first: the scalar
    conversions JAX compiles once per process and dtype (the step's, and the
    optimizer state's zeros') are not the programs counted. Without the
    optimizer's, whether the zeros compiled one program or two depended on
    which tests had run before in the same process."""
    from unitary_lr.optim import ProjUNN

    W, G = _matrices((4, 3), dtype, seed=0)
    jax.block_until_ready(ul.projunn_step(jnp.asarray(W), jnp.asarray(G), lr=0.1, rank=1, rng=0))
    jax.block_until_ready(ProjUNN(lr=0.1, base="rmsprop", rank=1, seed=0).step(jnp.asarray(W), jnp.asarray(G)))


def _compiled(call):
    """(result, names of the programs JAX compiled for it)."""
    _compiles.clear()
    result = call()
    jax.block_until_ready(result)
    return result, list(_compiles)


# the programs that apply an update, whose Newton-Schulz count is static
_APPLY = {"jit(_apply_right)", "jit(_apply_left)", "jit(_apply_stiefel_direct)"}


def _matrices(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    *batch, n, m = shape
    W = np.stack([ul.random_unitary(n, m, dtype=dtype, rng=seed + i) for i in range(int(np.prod(batch)))])
    W = W.reshape((*batch, n, m))
    G = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if dtype.startswith("complex") else 0)
    return W, G.astype(dtype)


# (shape, variant, dtype, rank); distinct shapes, so that each case compiles afresh
CASES = [
    ((10, 10), "tangent", "float32", 1),
    ((11, 11), "cayley", "complex128", 3),
    ((12, 5), "tangent", "float64", 1),
    ((13, 6), "direct", "float64", 2),
    ((14, 6), "cayley", "complex64", 1),
    ((6, 15), "direct", "float64", 1),
    ((3, 9, 9), "direct", "float64", 1),
]


@pytest.mark.parametrize(("shape", "variant", "dtype", "rank"), CASES)
def test_an_eager_jax_step_is_a_few_programs_compiled_once(shape, variant, dtype, rank):
    if True:  # x64 is on for the whole suite (conftest)
        _warm(dtype)
        W, G = _matrices(shape, dtype, seed=len(shape) + shape[-1])
        W_, G_, G2_ = jnp.asarray(W), jnp.asarray(G), jnp.asarray(2 * G)
        step = lambda G, lr, seed: ul.projunn_step(W_, G, lr=lr, rank=rank, variant=variant, rng=seed)  # noqa: E731
        first, programs = _compiled(lambda: step(G_, 0.1, 1))
        # the sketch, the panels and Grams, the update's factors, W + L Rh
        # (and for a wide W the adjoints of its tall W^H's factors); without
        # staging, about fifteen programs, one per kind of operation
        assert len(programs) <= (5 if shape[-2] < shape[-1] else 4), programs
        second, again = _compiled(lambda: step(G2_, 0.2, 2))
        assert set(again) <= _APPLY, again
        # the same steps as NumPy's, from the same draws (float64 references)
        tol = 1e-4 if dtype in ("float32", "complex64") else 1e-11
        for result, (G, lr, seed) in ((first, (G, 0.1, 1)), (second, (2 * G, 0.2, 2))):
            expected = ul.projunn_step(W.astype(np.complex128 if dtype.startswith("c") else np.float64),
                                       G.astype(np.complex128 if dtype.startswith("c") else np.float64),
                                       lr=lr, rank=rank, variant=variant, rng=seed)
            np.testing.assert_allclose(np.asarray(result), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("transport", [exp_transport, cayley_transport])
@pytest.mark.parametrize("shape", [(16, 16), (17, 7)])
def test_an_eager_jax_transport_is_three_programs_compiled_once(transport, shape):
    if True:
        _warm("complex128")
        W, _ = _matrices(shape, "complex128", seed=3)
        rng = np.random.default_rng(4)
        a, b = (rng.standard_normal((shape[0], 2)) + 1j * rng.standard_normal((shape[0], 2)) for _ in range(2))
        args = [jnp.asarray(x) for x in (W, a, b)]
        moved, programs = _compiled(lambda: transport(*args, t=0.3))
        assert len(programs) <= 3, programs
        again, names = _compiled(lambda: transport(args[0], args[2], args[1], t=-0.2))
        assert set(names) <= _APPLY, names
        np.testing.assert_allclose(np.asarray(moved), transport(W, a, b, t=0.3), atol=1e-12, rtol=0)
        np.testing.assert_allclose(np.asarray(again), transport(W, b, a, t=-0.2), atol=1e-12, rtol=0)


_ON_SECOND_DEVICE = """
import jax, numpy as np
import unitary_lr as ul
from unitary_lr.transport import exp_transport
second = jax.devices()[1]
for shape in ((12, 12), (12, 5), (5, 12)):
    for variant in ("tangent", "direct"):
        W = ul.random_unitary(*shape, dtype="float32", rng=0)
        G = np.random.default_rng(1).standard_normal(shape).astype("float32")
        moved = ul.projunn_step(jax.device_put(W, second), jax.device_put(G, second), lr=0.1, rank=2,
                                variant=variant, rng=2)
        assert moved.devices() == {second}, (shape, variant, moved.devices())
        expected = ul.projunn_step(W, G, lr=0.1, rank=2, variant=variant, rng=2)
        assert np.abs(np.asarray(moved) - expected).max() < 1e-5, (shape, variant)
W = jax.device_put(ul.random_unitary(12, dtype="float32", rng=0), second)
a, b = (jax.device_put(np.random.default_rng(s).standard_normal((12, 1)).astype("float32"), second) for s in (3, 4))
assert exp_transport(W, a, b, t=0.1).devices() == {second}
# random_unitary(device=...): its staged factorization ran on the default device
import jax.numpy as jnp
for shape, batch in (((6,), ()), ((6, 3), (2,)), ((3, 6), ())):
    drawn = ul.random_unitary(*shape, dtype="float32", batch_shape=batch, rng=5, xp=jnp, device=second)
    assert drawn.devices() == {second}, (shape, drawn.devices())
    assert np.abs(np.asarray(drawn) - ul.random_unitary(*shape, dtype="float32", batch_shape=batch, rng=5)).max() < 1e-6
print("ok")
"""


def test_staged_programs_run_on_the_device_of_the_arrays():
    """The host's results and the sketch's draw go to the device with the
    staged call: on the device of W and G, here the second of two CPU
    devices (a fresh process: XLA's device count is fixed at start); and
    ``random_unitary(xp=jax.numpy, device=...)`` draws on that device."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _ON_SECOND_DEVICE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


_BATCHED_RECTANGULAR = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import unitary_lr as ul
from unitary_lr.optim import ProjUNN
cases = [((2, 6, 3), 2, "float64", "tangent"), ((2, 6, 3), 2, "float32", "direct"),
         ((3, 6, 3), 3, "float64", "tangent"), ((2, 3, 6), 1, "float64", "tangent"),
         ((2, 3, 6), 2, "float64", "cayley"), ((2, 2, 7, 3), 2, "complex128", "tangent")]
for shape, rank, dtype, variant in cases:
    W = ul.random_unitary(*shape[-2:], dtype=dtype, batch_shape=shape[:-2], rng=0)
    G = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    moved = ul.projunn_step(jnp.asarray(W), jnp.asarray(G), lr=0.1, rank=rank, variant=variant, rng=0)
    expected = ul.projunn_step(W, G, lr=0.1, rank=rank, variant=variant, rng=0)
    assert np.abs(np.asarray(moved) - expected).max() < (1e-5 if dtype == "float32" else 1e-13), (shape, variant)
opt = ProjUNN(0.1, rank=2, seed=0)
Ws = {k: jnp.asarray(ul.random_unitary(6, 3, dtype="float32", rng=i)) for i, k in enumerate("ab")}
moved = opt.step_many({k: (W, jnp.ones((6, 3), jnp.float32)) for k, W in Ws.items()})
assert all(float(ul.unitarity_error(W)) < 1e-5 for W in moved.values())
print("ok")
"""


def test_batched_rectangular_steps_compile_on_jax():
    """A batch of tall or wide matrices (and ``step_many``, which stacks
    them): XLA's CPU compiler aborted the whole process on the sketch (JAX
    0.10.2, a failed layout check after an optimization barrier of a batched
    panel), where NumPy steps them; now the step is NumPy's to rounding. In
    a fresh process, which an abort would end without taking the tests."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BATCHED_RECTANGULAR], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-3000:])


@pytest.mark.parametrize(("base", "hyper"), [("rmsprop", {}), ("rmsprop", {"centered": True, "momentum": 0.5}),
                                             ("adam", {}), ("sgd", {"momentum": 0.9, "nesterov": True})])
def test_the_framework_free_optimizer_on_jax_compiles_its_rule_once(base, hyper):
    """unitary_lr.optim.ProjUNN on JAX arrays: the base rule's elementwise
    work is one program too, and a later step (a new step count for Adam's
    bias corrections, new moments) compiles nothing; the steps are NumPy's
    (float64 references, the same seeds)."""
    from unitary_lr.optim import ProjUNN

    n = 11 + len(base) + len(hyper)  # a shape of its own per case
    W, G = _matrices((n, n), "float64", seed=5)
    _warm("float64")
    opt, reference = ProjUNN(lr=1e-2, base=base, rank=1, seed=3, **hyper), ProjUNN(lr=1e-2, base=base, rank=1,
                                                                                     seed=3, **hyper)
    W_, expected = jnp.asarray(W), W
    compiled = []
    for scale in (1.0, -0.5, 2.0):
        W_, names = _compiled(lambda: opt.step(W_, jnp.asarray(scale * G)))
        expected = reference.step(expected, scale * G)
        compiled.append(names)
        np.testing.assert_allclose(np.asarray(W_), expected, atol=1e-12, rtol=0)
    # the state's zeros, the rule, the step's four programs and the first
    # step's drift estimate
    assert len(compiled[0]) <= 7 and "jit(_rule_arrays)" in compiled[0], compiled[0]
    # sgd with momentum has no buffer on its first step, a state of another
    # structure: its second step compiles the rule once more
    rule_again = {"jit(_rule_arrays)"} if base == "sgd" else set()
    assert set(compiled[1]) <= _APPLY | rule_again and set(compiled[2]) <= _APPLY, compiled


@pytest.mark.parametrize(("shape", "dtype", "rank"), [((20, 14), "float64", 2), ((2, 13, 18), "complex128", 3)])
def test_an_eager_jax_randomized_svd_is_two_programs_compiled_once(shape, dtype, rank):
    """randomized_svd on JAX arrays: the sketch with its Grams, and the
    factors from the host's small results, one program each (the Gram route:
    a Gaussian matrix's top singular values lie within 16 of each other);
    another draw compiles
    nothing; the factors are NumPy's from the same seed (the phases are made
    canonical)."""
    _warm(dtype)
    A = _matrices(shape, dtype, seed=6)[1]
    A_ = jnp.asarray(A)
    first, programs = _compiled(lambda: ul.randomized_svd(A_, rank, rng=1))
    assert sorted(programs) == ["jit(_factors)", "jit(_sketch)"], programs
    second, again = _compiled(lambda: ul.randomized_svd(A_, rank, rng=2))
    assert again == [], again
    for result, seed in ((first, 1), (second, 2)):
        expected = ul.randomized_svd(A, rank, rng=seed)
        for got, want in zip(result, expected):
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_eager_jax_householder_calls_are_one_program_each(side):
    """householder_apply and householder_product on JAX arrays: the finiteness
    checks (one program, one flag each) and the compact WY work, one program;
    other values compile nothing; the results are NumPy's."""
    _warm("complex128")
    rng = np.random.default_rng(7)
    V = rng.standard_normal((19, 4)) + 1j * rng.standard_normal((19, 4))
    X = rng.standard_normal((19, 19)) + 1j * rng.standard_normal((19, 19))
    V_, X_, V2_, X2_ = jnp.asarray(V), jnp.asarray(X), jnp.asarray(2 * V), jnp.asarray(X - 1)
    applied, programs = _compiled(lambda: ul.householder_apply(V_, X_, side=side))
    assert len(programs) <= 3, programs  # the checks of V and of X (two shapes), the product
    again, names = _compiled(lambda: ul.householder_apply(V2_, X2_, side=side))
    assert names == [], names
    np.testing.assert_allclose(np.asarray(applied), ul.householder_apply(V, X, side=side), atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.asarray(again), ul.householder_apply(2 * V, X - 1, side=side), atol=1e-12, rtol=0)
    product, programs = _compiled(lambda: ul.householder_product(V_))
    assert len(programs) <= 1, programs  # the check ran for this shape already
    np.testing.assert_allclose(np.asarray(product), ul.householder_product(V), atol=1e-12, rtol=0)


def test_eager_jax_diagnostics_and_projection_are_one_program_each():
    """unitarity_error, unitarity_estimate (probes sent with the call) and
    tangent_project on JAX arrays; other values compile nothing; NumPy's
    results."""
    _warm("float64")
    W, G = _matrices((17, 9), "float64", seed=8)
    W_, G_, W2_, G2_ = jnp.asarray(W), jnp.asarray(G), jnp.asarray(W * 1.5), jnp.asarray(G - 2)
    for call, reference in ((lambda W, G, seed: ul.unitarity_error(W), lambda W, G, seed: ul.unitarity_error(W)),
                            (lambda W, G, seed: ul.unitarity_estimate(W, rng=seed),
                             lambda W, G, seed: ul.unitarity_estimate(W, rng=seed)),
                            (lambda W, G, seed: ul.tangent_project(W, G), lambda W, G, seed: ul.tangent_project(W, G))):
        first, programs = _compiled(lambda: call(W_, G_, 1))
        assert len(programs) <= 2, programs  # tangent_project's finiteness check, then the work
        second, again = _compiled(lambda: call(W2_, G2_, 2))
        assert again == [], again
        np.testing.assert_allclose(np.asarray(first), reference(W, G, 1), atol=1e-12, rtol=0)
        np.testing.assert_allclose(np.asarray(second), reference(W * 1.5, G - 2, 2), atol=1e-12, rtol=0)


def test_eager_jax_newton_schulz_projection_is_four_programs():
    """project_unitary(method="newton_schulz") on JAX arrays: the finiteness
    check, the start, one iteration (its error read on the host) and the
    last product, one program each, whatever the number of iterations;
    NumPy's result."""
    _warm("float64")
    rng = np.random.default_rng(9)
    W = ul.random_unitary(21, 8, dtype="float64", rng=9)
    A, A2 = W + 1e-2 * rng.standard_normal(W.shape), W + 1e-1 * rng.standard_normal(W.shape)
    A_, A2_ = jnp.asarray(A), jnp.asarray(A2)
    first, programs = _compiled(lambda: ul.project_unitary(A_, method="newton_schulz"))
    assert len(programs) <= 4, programs
    second, again = _compiled(lambda: ul.project_unitary(A2_, method="newton_schulz"))
    assert again == [], again
    for got, source in ((first, A), (second, A2)):
        np.testing.assert_allclose(np.asarray(got), ul.project_unitary(source, method="newton_schulz"),
                                   atol=1e-12, rtol=0)
        np.testing.assert_allclose(np.asarray(got), ul.project_unitary(source), atol=1e-12, rtol=0)


def test_eager_jax_calls_pass_a_callers_transfer_guard(monkeypatch):
    """Under ``jax.transfer_guard("disallow")`` (a caller's guard against its
    own accidental transfers) every public function runs on JAX arrays: the
    library's transfers (the sketch's draw, the host's results, the compat
    layer's probe for the namespace, a state's zeros) are its own. (On the
    CPU, where JAX does not guard reads back to the host; on a GPU the
    library's reads of its small results and flags are not yet wrapped.)"""
    from unitary_lr import _xp, steps
    from unitary_lr.optim import ProjUNN
    from unitary_lr.transport import cayley_transport

    monkeypatch.setattr(_xp, "_NAMESPACE_OF_TYPE", {})  # the first lookup too
    rng = np.random.default_rng(10)
    W = jnp.asarray(ul.random_unitary(9, dtype="float32", rng=10))
    Wt = jnp.asarray(ul.random_unitary(9, 4, dtype="float32", rng=11))
    G, Gt = (jnp.asarray(rng.standard_normal(shape).astype("float32")) for shape in ((9, 9), (9, 4)))
    a, b = (jnp.asarray(rng.standard_normal((9, 1)).astype("float32")) for _ in range(2))
    small = jnp.asarray(1e-2 * rng.standard_normal((9, 1)).astype("float32"))
    G2 = jnp.asarray(rng.standard_normal((9, 9)).astype("float32"))
    calls = {
        "projunn_step": lambda: ul.projunn_step(W, G, lr=0.1, rng=1),
        "projunn_step, tall, direct, rank 2": lambda: ul.projunn_step(Wt, Gt, lr=0.1, rank=2, variant="direct", rng=1),
        "cayley_transport": lambda: cayley_transport(W, a, b, t=0.1),
        "randomized_svd": lambda: ul.randomized_svd(G, 2, rng=0),
        "householder_apply": lambda: ul.householder_apply(a, W),
        "householder_product": lambda: ul.householder_product(a),
        "unitarity_error": lambda: ul.unitarity_error(W),
        "unitarity_estimate": lambda: ul.unitarity_estimate(W, rng=0),
        "tangent_project": lambda: ul.tangent_project(W, G),
        "project_unitary": lambda: ul.project_unitary(W, method="newton_schulz"),
        "project_unitary_lowrank": lambda: ul.project_unitary_lowrank(W, small, b),
        "ProjUNN.step": lambda: ProjUNN(lr=0.01, base="adam", rank=1).step(W, G),
        # the stacked update split its factors by a Python index, a transfer of its own
        "projunn_update_stacked": lambda: steps.projunn_update_stacked([W, W], [G, G2], lr=0.1, rngs=[1, 2]),
        "ProjUNN.step_many": lambda: ProjUNN(lr=0.01, rank=1).step_many({"a": (W, G), "b": (W, G2)}),
        "random_unitary": lambda: ul.random_unitary(9, dtype="float32", xp=jnp, rng=0),
    }
    with jax.transfer_guard("disallow"):
        for name, call in calls.items():
            result = call()
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result)), name
