"""unitary_lr.optax: the projUNN optax transformation."""

import itertools
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
optax = pytest.importorskip("optax", reason="optax is not installed")
import jax.numpy as jnp

import unitary_lr as ul
from unitary_lr.optax import projunn

N = 12
BASES = [("sgd", {"momentum": 0.9, "nesterov": True}), ("rmsprop", {"decay": 0.9, "centered": True}),
         ("adam", {"b1": 0.8, "b2": 0.99}), ("amsgrad", {"b1": 0.8, "b2": 0.99})]


def unitarity(W):
    W = np.asarray(W).astype(np.complex128)
    n = W.shape[-1]
    return np.max(np.linalg.norm(np.conj(np.swapaxes(W, -1, -2)) @ W - np.eye(n), axis=(-2, -1)) / np.sqrt(n))


def params_and_loss(dtype):
    rng = np.random.default_rng(0)
    params = {
        "W": ul.random_unitary(N, dtype=dtype, batch_shape=(2,), xp=jnp, rng=1),
        "dense": {"kernel": jnp.asarray(rng.standard_normal((N, 5))), "bias": jnp.zeros(5)},
    }
    x = jnp.asarray(rng.standard_normal((7, N)) / np.sqrt(N))

    def loss(p, x=x):
        h = jnp.abs(x @ p["W"][0] @ p["W"][1]) ** 2
        return jnp.mean((h @ p["dense"]["kernel"] / np.sqrt(N) + p["dense"]["bias"] - 1.0) ** 2)

    mask = {"W": True, "dense": {"kernel": False, "bias": False}}
    return params, loss, mask


@pytest.mark.parametrize(("base", "hyper"), BASES, ids=[b for b, _ in BASES])
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_unitary_leaves_stay_unitary_and_others_match_optax(base, hyper, dtype):
    params, loss, mask = params_and_loss(dtype)
    opt = projunn(1e-2, unitary=mask, base=base, rank=2, **hyper)
    reference = getattr(optax, base)(1e-2, **hyper)
    state, ref_state = opt.init(params), reference.init(params["dense"])
    dense_ref = params["dense"]

    @jax.jit
    def train_step(params, state, dense_ref, ref_state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        ref_grads = jax.grad(lambda d: loss({**params, "dense": d}))(dense_ref)  # at the same W
        ref_updates, ref_state = reference.update(ref_grads, ref_state, dense_ref)
        return optax.apply_updates(params, updates), state, optax.apply_updates(dense_ref, ref_updates), ref_state

    losses = []
    for _ in range(30):
        params, state, dense_ref, ref_state = train_step(params, state, dense_ref, ref_state)
        losses.append(float(loss(params)))
    assert unitarity(params["W"]) < 1e-12
    for leaf, ref_leaf in zip(jax.tree.leaves(params["dense"]), jax.tree.leaves(dense_ref)):
        np.testing.assert_allclose(leaf, ref_leaf, rtol=1e-12, atol=1e-14)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_same_minimiser_as_torch():
    """The convention check the design notes ask for: minimise the real loss
    ||W - U||_F^2 of a complex unitary W in PyTorch (grad = dL/dRe + i dL/dIm)
    and in JAX (grad = its conjugate): both reach U. A sign or conjugation
    error would walk away from U."""
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN, unitary_parameter

    U = ul.random_unitary(8, dtype="complex128", rng=5)
    W0 = ul.random_unitary(8, dtype="complex128", rng=6)
    W_torch = unitary_parameter(torch.asarray(W0))
    opt_torch = ProjUNN([W_torch], lr=0.1, base="sgd", rank=8, seed=0)
    U_torch = torch.asarray(U)
    params = {"W": jnp.asarray(W0)}
    opt_jax = projunn(0.1, unitary={"W": True}, base="sgd", rank=8)
    state = opt_jax.init(params)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(jnp.abs(p["W"] - U) ** 2)))
    for _ in range(200):
        opt_torch.zero_grad()
        (W_torch - U_torch).abs().square().sum().backward()
        opt_torch.step()
        updates, state = opt_jax.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(W_torch.detach().numpy(), U, atol=1e-10)
    np.testing.assert_allclose(np.asarray(params["W"]), U, atol=1e-10)


def test_schedule_callable_mask_and_float32():
    params, loss, _ = params_and_loss("complex64")
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, params)
    schedule = optax.exponential_decay(1e-2, transition_steps=10, decay_rate=0.5)
    opt = projunn(schedule, unitary=lambda p: {"W": True, "dense": {"kernel": False, "bias": False}}, rank=1)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(60):
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert params["W"].dtype == jnp.complex64
    assert unitarity(params["W"]) < ul.diagnostics.default_drift_tolerance("complex64")
    assert int(state.count) == 60


@pytest.mark.slow
def test_eager_and_jit_agree_and_state_restores():
    params, loss, mask = params_and_loss("complex128")
    opt = projunn(1e-2, unitary=mask, base="adam", rank=2, seed=3)
    grads = jax.grad(loss)(params)
    eager = opt.update(grads, opt.init(params), params)[0]
    jitted = jax.jit(opt.update)(grads, opt.init(params), params)[0]
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, atol=1e-13)
    # the state is a pytree of arrays: a checkpoint restored continues the same stream
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
    first = opt.update(jax.grad(loss)(params), state, params)[0]
    second = opt.update(jax.grad(loss)(params), restored, params)[0]
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("every", [2, 0])
def test_drift_control_reprojects_under_jit(every):
    # checked after the first update too: a matrix marked in another precision
    # kept its error for drift_check_every updates
    rng = np.random.default_rng(1)
    opt = projunn(1e-4, unitary={"W": True}, base="sgd", drift_check_every=every)
    params = {"W": jnp.asarray(ul.random_unitary(N, dtype="float64", rng=0))}
    state = opt.init(params)
    update = jax.jit(opt.update)
    grads = {"W": jnp.ones((N, N))}
    for step, checked in enumerate((True, True, False, True), 1):
        params = {"W": params["W"] + 1e-6 * rng.standard_normal((N, N))}  # drifted off the group
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert (unitarity(params["W"]) < 1e-14) == (checked and every > 0), step


def test_errors():
    params = {"W": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"unitary leaf \['b'\] must be a matrix .* got shape \(3,\)"):
        projunn(1e-2, unitary={"W": True, "b": True}).init(params)
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(n, m\) = 4 of unitary leaf \['W'\]"):
        projunn(1e-2, unitary={"W": True}, rank=5).init({"W": jnp.eye(4)})
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(n, m\) = 3 of unitary leaf \['W'\]"):
        projunn(1e-2, unitary={"W": True}, rank=4).init({"W": params["W"]})
    with pytest.raises(ValueError, match=r"base must be one of 'sgd', 'rmsprop', 'adam', 'adamw', 'amsgrad', got 'lamb'"):
        projunn(1e-2, unitary={}, base="lamb")
    with pytest.raises(ValueError, match=r"base must be one of .*, got array\(\[1, 2\]\)"):
        projunn(1e-2, unitary={}, base=np.array([1, 2]))  # (was "unhashable type")
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number >= 0 or a schedule, got -0.1"):
        projunn(-0.1, unitary={})
    with pytest.raises(TypeError, match=r"optax.adam does not take these hyper-parameters"):
        projunn(1e-2, unitary={}, base="adam", momentum=0.9)
    with pytest.raises(ValueError, match=r"unitary must have the tree structure of the parameters"):
        projunn(1e-2, unitary={"W": True}).init({"W": jnp.eye(3), "b": jnp.zeros(3)})
    opt = projunn(1e-2, unitary={"W": True})
    state = opt.init({"W": jnp.eye(3)})
    with pytest.raises(ValueError, match=r"projunn needs the parameters: opt.update\(grads, state, params\)"):
        opt.update({"W": jnp.eye(3)}, state)
    with pytest.raises(TypeError, match=r"unitary leaf \['W'\] has dtype int32"):
        projunn(1e-2, unitary={"W": True}).init({"W": jnp.eye(3, dtype=jnp.int32)})


@pytest.mark.parametrize("base", ["sgd", "rmsprop", "adam"])
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_of_the_wrong_shape_dtype_or_structure_are_named(base, jit):
    """With a base that keeps moments (rmsprop, the default, and adam) they
    failed in JAX's words, naming no leaf ("add got incompatible shapes";
    "cond branches must have equal output types" for a float64 gradient of a
    float32 leaf): now as sgd's did, and the same under jit."""
    W = ul.random_unitary(6, dtype="float32", xp=jnp, rng=0)
    params = {"W": W, "b": jnp.zeros(3, jnp.float32)}
    opt = projunn(1e-2, unitary={"W": True, "b": False}, base=base, rank=2)
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    grads = {"W": jnp.ones((6, 6), jnp.float32), "b": jnp.ones(3, jnp.float32)}
    for leaf, bad in (("W", jnp.ones((3, 6), jnp.float32)), ("b", jnp.ones(4, jnp.float32))):
        with pytest.raises(ValueError, match=rf"^the gradient of leaf \['{leaf}'\] has shape \({bad.shape[0]},"):
            update({**grads, leaf: bad}, state, params)
    with pytest.raises(ValueError, match=r"^grads must have the tree structure of the parameters"):
        update({"W": grads["W"]}, state, params)
    with pytest.raises(TypeError, match=r"^the gradient of leaf \['W'\] has dtype float64, which would promote "
                                        r"the leaf's float32"):  # (the tests run JAX with x64)
        update({**grads, "W": jnp.ones((6, 6), jnp.float64)}, state, params)
    updates, _ = update(grads, state, params)
    assert updates["W"].dtype == jnp.float32 and np.all(np.isfinite(np.asarray(updates["W"])))


@pytest.mark.parametrize("base", ["rmsprop", "adam"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_narrow_gradient_of_a_unitary_leaf_is_refused_and_a_plain_leaf_keeps_optax(base, jit):
    """A float16 gradient of a float32 unitary leaf was taken: it promotes
    nothing, but the base formed its moments in float16 (adam's W was 0.48
    from the step of the same numbers in float32, for a step of 0.012). Now a
    unitary leaf's gradient must be float32/float64/complex64/complex128, and
    the error names the leaf and the dtype, eagerly and under jit; a plain
    leaf's narrow gradient is stepped as optax steps it."""
    params = {"W": ul.random_unitary(6, dtype="float32", xp=jnp, rng=0), "b": jnp.zeros(3, jnp.float32),
              "V": ul.random_unitary(4, dtype="complex64", xp=jnp, rng=1)}
    opt = projunn(1e-2, unitary={"W": True, "b": False, "V": True}, base=base, rank=2)
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    rng = np.random.default_rng(3)
    grads = {"W": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32), "b": jnp.ones(3, jnp.float32),
             "V": jnp.asarray(rng.standard_normal((4, 4)), jnp.complex64)}
    for leaf in ("W", "V"):
        for dtype in (jnp.float16, jnp.bfloat16, jnp.int32, jnp.int8, jnp.bool_):
            bad = {**grads, leaf: grads[leaf].real.astype(dtype)}
            with pytest.raises(TypeError, match=rf"^the gradient of unitary leaf \['{leaf}'\] has dtype "
                                                rf"{jnp.dtype(dtype).name}; expected float32, float64, complex64 "
                                                r"or complex128"):
                update(bad, state, params)
    # a supported dtype that does not promote the leaf passes (float32 for the complex64 leaf), and a plain
    # leaf's float16 gradient is stepped as optax steps it
    narrow = {**grads, "V": grads["V"].real, "b": jnp.asarray([1e-4, -3e-3, 0.5], jnp.float16)}
    updates, _ = update(narrow, state, params)
    new_V = optax.apply_updates(params, updates)["V"]
    assert new_V.dtype == jnp.complex64 and unitarity(new_V) < 1e-5
    assert float(jnp.max(jnp.abs(new_V - params["V"]))) > 1e-4
    reference = getattr(optax, base)(1e-2)
    ref_updates, _ = reference.update(narrow["b"], reference.init(params["b"]), params["b"])
    assert updates["b"].dtype == ref_updates.dtype
    np.testing.assert_allclose(np.asarray(updates["b"], np.float64), np.asarray(ref_updates, np.float64),
                               rtol=1e-6, atol=0)
    assert float(jnp.max(jnp.abs(updates["b"]))) > 1e-3  # (and b moved)


@pytest.mark.parametrize("bad_leaf", ["W", "bias"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradient_is_skipped_under_jit(bad_leaf, bad):
    """As optax.apply_if_finite: a NaN/Inf gradient (in any leaf) used to turn
    W and the moments into NaN; now the update is zero, the state is unchanged
    but for the count of skipped updates, and the next clean update is the one
    an uninterrupted run makes."""
    params, loss, mask = params_and_loss("complex128")
    opt = projunn(1e-2, unitary=mask, base="adam", rank=2, seed=1)
    update = jax.jit(opt.update)
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    grads = jax.grad(loss)(params)
    if bad_leaf == "W":
        poisoned = {**grads, "W": grads["W"].at[1, 2, 3].set(bad)}
    else:
        poisoned = {**grads, "dense": {**grads["dense"], "bias": grads["dense"]["bias"].at[0].set(bad)}}
    skipped_updates, skipped_state = update(poisoned, state, params)
    for leaf in jax.tree.leaves(skipped_updates):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    assert int(skipped_state.notfinite_count) == 1 and int(state.notfinite_count) == 0
    for after, before in zip(jax.tree.leaves(skipped_state._replace(notfinite_count=0)),
                             jax.tree.leaves(state._replace(notfinite_count=0))):
        np.testing.assert_array_equal(after, before)
    clean_after_skip, _ = update(grads, skipped_state, params)
    clean, _ = update(grads, state, params)
    for a, b in zip(jax.tree.leaves(clean_after_skip), jax.tree.leaves(clean)):
        np.testing.assert_array_equal(a, b)
    new_W = optax.apply_updates(params, clean_after_skip)["W"]
    assert np.all(np.isfinite(np.asarray(new_W))) and unitarity(new_W) < 1e-12


SCRIPT_32_BIT = """
import jax, jax.numpy as jnp
import unitary_lr as ul
from unitary_lr.optax import projunn
params = {"W": ul.random_unitary(8, dtype="complex64", xp=jnp, rng=0)}
opt = projunn(1e-2, unitary={"W": True}, rank=2)
updates, _ = jax.jit(opt.update)({"W": jnp.ones((8, 8), dtype=jnp.complex64)}, opt.init(params), params)
assert bool(jnp.all(jnp.isfinite(updates["W"])))
"""


def test_32_bit_update_without_x64_leaks_no_warning():
    """In a fresh process (this one has x64 on): JAX's defaults, warnings as errors."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error", "-c", SCRIPT_32_BIT], check=False, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("user_mask", [None, {"W": True, "dense": {"kernel": True, "bias": False}},
                                       lambda p: {"W": False, "dense": False}],
                         ids=["no-mask", "pytree-mask", "callable-prefix-mask"])
def test_adamw_decays_the_other_leaves_and_never_the_unitary_ones(user_mask):
    """base="adamw": the plain leaves move as optax.adamw moves them (with the
    mask given, where one is), the unitary leaves as with base="adam" (the
    decay never reaches them), under jit."""
    params, loss, mask = params_and_loss("float64")
    extra = {} if user_mask is None else {"mask": user_mask}
    opt = projunn(1e-2, unitary=mask, base="adamw", rank=2, weight_decay=0.5, **extra)
    plain = projunn(1e-2, unitary=mask, base="adam", rank=2)
    dense_mask = None if user_mask is None else (user_mask["dense"] if isinstance(user_mask, dict) else False)
    reference = optax.adamw(1e-2, weight_decay=0.5, mask=dense_mask)
    state, plain_state, ref_state = opt.init(params), plain.init(params), reference.init(params["dense"])
    W_plain, dense_ref = params["W"], params["dense"]

    @jax.jit
    def train_step(params, state, W_plain, plain_state, dense_ref, ref_state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        at_plain = {**params, "W": W_plain}  # the adam run, at its own W and the same dense leaves
        plain_updates, plain_state = plain.update(jax.grad(loss)(at_plain), plain_state, at_plain)
        ref_grads = jax.grad(lambda d: loss({**params, "dense": d}))(dense_ref)
        ref_updates, ref_state = reference.update(ref_grads, ref_state, dense_ref)
        return (optax.apply_updates(params, updates), state, W_plain + plain_updates["W"], plain_state,
                optax.apply_updates(dense_ref, ref_updates), ref_state)

    for _ in range(10):
        params, state, W_plain, plain_state, dense_ref, ref_state = train_step(
            params, state, W_plain, plain_state, dense_ref, ref_state)
    for leaf, ref_leaf in zip(jax.tree.leaves(params["dense"]), jax.tree.leaves(dense_ref)):
        np.testing.assert_allclose(leaf, ref_leaf, rtol=1e-12, atol=1e-14)
    assert unitarity(params["W"]) < 1e-12
    # the adam run, stepped at the same dense leaves, keeps the same W: no decay reached it
    np.testing.assert_allclose(params["W"], W_plain, rtol=0, atol=1e-13)
    assert float(jnp.max(jnp.abs(params["W"] - W_plain))) < float(jnp.max(jnp.abs(params["W"] - params_and_loss(
        "float64")[0]["W"])))  # (and W moved)


def test_adamw_mask_of_the_wrong_structure_is_named():
    params, _, mask = params_and_loss("float64")
    opt = projunn(1e-2, unitary=mask, base="adamw", rank=2, mask={"W": True, "other": False})
    with pytest.raises(ValueError, match=r"mask must have the tree structure of the parameters"):
        opt.init(params)


def subtree_params_and_loss():
    """Two complex unitary matrices in one subtree, a real head (with a bias) in another."""
    rng = np.random.default_rng(2)
    n = 6
    params = {"rnn": {"W1": ul.random_unitary(n, dtype="complex128", xp=jnp, rng=3),
                      "W2": ul.random_unitary(n, dtype="complex128", xp=jnp, rng=4)},
              "head": {"w": jnp.asarray(rng.standard_normal((n, 3))), "b": jnp.zeros(3)}}
    x = jnp.asarray(rng.standard_normal((5, n)) / np.sqrt(n))

    def loss(p):
        h = jnp.abs(x @ p["rnn"]["W1"] @ p["rnn"]["W2"]) ** 2
        return jnp.mean((h @ p["head"]["w"] + p["head"]["b"] - 1.0) ** 2)

    return params, loss


@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_a_true_prefix_mask_marks_its_whole_subtree(base):
    """unitary={"rnn": True, "head": False}, a prefix of the parameters'
    structure (as optax.masked takes a mask), or a function returning it,
    makes exactly the updates of the full mask, under jit: each leaf of "rnn"
    is unitary, each of "head" is optax's."""
    params, loss = subtree_params_and_loss()
    hyper = {"weight_decay": 0.5} if base == "adamw" else {}
    full = {"rnn": {"W1": True, "W2": True}, "head": {"w": False, "b": False}}
    prefix = {"rnn": True, "head": False}
    runs = []
    for mask in (full, prefix, lambda p: prefix):
        opt = projunn(1e-2, unitary=mask, base=base, rank=2, **hyper)
        p, state, update, steps = params, opt.init(params), jax.jit(opt.update), []
        for _ in range(3):
            updates, state = update(jax.grad(loss)(p), state, p)
            steps.append(updates)
            p = optax.apply_updates(p, updates)
        runs.append((steps, p))
    for steps, _ in runs[1:]:
        for updates, full_updates in zip(steps, runs[0][0]):
            assert jax.tree.structure(updates) == jax.tree.structure(params)
            for leaf, full_leaf in zip(jax.tree.leaves(updates), jax.tree.leaves(full_updates)):
                np.testing.assert_array_equal(leaf, full_leaf)
    steps, p = runs[1]
    assert unitarity(p["rnn"]["W1"]) < 1e-12 and unitarity(p["rnn"]["W2"]) < 1e-12
    assert float(jnp.max(jnp.abs(p["rnn"]["W1"] - params["rnn"]["W1"]))) > 1e-4  # (and W moved)
    reference = getattr(optax, base)(1e-2, **hyper)
    ref_updates, _ = reference.update(jax.grad(loss)(params)["head"], reference.init(params["head"]), params["head"])
    for leaf, ref_leaf in zip(jax.tree.leaves(steps[0]["head"]), jax.tree.leaves(ref_updates)):
        np.testing.assert_allclose(leaf, ref_leaf, rtol=1e-12, atol=1e-15)


def test_a_prefix_mask_over_a_bias_or_of_another_structure_is_refused():
    params, _ = subtree_params_and_loss()
    with pytest.raises(ValueError, match=r"unitary leaf \['head'\]\['b'\] must be a matrix .* got shape \(3,\)"):
        projunn(1e-2, unitary={"rnn": True, "head": True}, rank=2).init(params)
    with pytest.raises(ValueError, match=r"unitary must have the tree structure of the parameters or a prefix of it, "
                                         r"got PyTreeDef\(\{'head': \*, 'rnn': \{'W1': \*\}\}\) for parameters "
                                         r"PyTreeDef\(\{'head': \{'b': \*, 'w': \*\}, "
                                         r"'rnn': \{'W1': \*, 'W2': \*\}\}\)"):
        projunn(1e-2, unitary={"rnn": {"W1": True}, "head": False}, rank=2).init(params)
    with pytest.raises(ValueError, match=r"unitary must have the tree structure of the parameters or a prefix of it, "
                                         r"got PyTreeDef\(\[\*, \*\]\)"):
        projunn(1e-2, unitary=lambda p: [True, False], rank=2).init(params)


SEED_SCRIPT = """
import json, sys
import numpy as np, jax.numpy as jnp
import unitary_lr as ul
from unitary_lr.optax import projunn
W = jnp.asarray(ul.random_unitary(8, dtype="float32", rng=0))
G = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
out = {}
for seed in (0, 2**32, 2**64 + 5):
    tx = projunn(0.1, unitary=True, base="sgd", rank=2, seed=seed)
    out[str(seed)] = np.asarray(tx.update(G, tx.init(W), W)[0]).tolist()
print(json.dumps(out))
"""


def test_a_seed_takes_the_same_sketches_with_and_without_x64_and_at_any_size():
    """PRNGKey keeps 32 bits of a seed without x64 (2**32 drew seed 0's
    sketches) and 64 with it (the same seed gave two runs), and refused
    2**64 with an OverflowError."""
    import json
    import subprocess
    import sys

    def run(script):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
        return json.loads(done.stdout)

    x64 = run(SEED_SCRIPT.replace("import json, sys", "import json, sys\nimport jax\n"
                                                      "jax.config.update('jax_enable_x64', True)"))
    default = run(SEED_SCRIPT)
    for seed in default:  # the same sketches (x64 changes the small cores' precision, not the draws)
        np.testing.assert_allclose(x64[seed], default[seed], atol=1e-5, err_msg=seed)
    updates = [np.asarray(u) for u in default.values()]
    assert np.abs(updates[0] - updates[1]).max() > 1e-3 and np.abs(updates[1] - updates[2]).max() > 1e-3


@pytest.mark.parametrize("base", ["rmsprop", "adam", "adamw", "amsgrad"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_gradient_whose_square_overflows_the_moments_is_skipped_and_counted(base, jit):
    """A finite float32 gradient of 1e20 made the base's second moments Inf
    for good: every later direction of those entries was 0 and the unitary
    leaf stopped moving, with notfinite_count 0. The update is now skipped
    and counted, the state kept, and training goes on as without it."""
    rng = np.random.default_rng(0)
    grads = [jnp.asarray(rng.standard_normal((8, 8)).astype("float32")) for _ in range(6)]
    spike = jnp.asarray(1e20 * rng.standard_normal((8, 8)).astype("float32"))
    W0 = ul.random_unitary(8, dtype="float32", xp=jnp, rng=0)
    runs = []
    for with_spike in (True, False):
        opt = projunn(1e-2, unitary=True, base=base, rank=2, seed=0)
        update = jax.jit(opt.update) if jit else opt.update
        W, state = W0, opt.init(W0)
        for t, g in enumerate(grads):
            if with_spike and t == 3:
                before = state
                updates, state = update(spike, state, W)
                assert float(jnp.abs(updates).max()) == 0.0 and int(state.notfinite_count) == 1
                for kept, old in zip(jax.tree.leaves(state.base), jax.tree.leaves(before.base)):
                    assert bool(jnp.array_equal(kept, old))
            updates, state = update(g, state, W)
            W = optax.apply_updates(W, updates)
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.base))
        runs.append(W)
    np.testing.assert_allclose(np.asarray(runs[0]), np.asarray(runs[1]), rtol=0, atol=1e-6)
    assert float(ul.unitarity_error(runs[0])) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_the_square_test_is_exact_entry_by_entry(dtype):
    """The bases that square the gradient skip it when one entry's |g|^2
    passes half the largest float32 (its sum of squares decides in
    one read; above the bound each entry is tested): an entry of 1e20 (or
    an imaginary part of 1e20) is skipped, in a unitary or a plain leaf; a
    gradient of 64 entries of 3e18, whose sum of squares is above the bound
    while each square is below it, is taken and leaves the moments finite;
    sgd, which squares nothing, takes the entry of 1e20."""
    rng = np.random.default_rng(3)
    W = ul.random_unitary(8, dtype=dtype, xp=jnp, rng=0)
    params = {"W": W, "b": jnp.zeros(3, jnp.float32)}

    def grads(big, where):
        g = {"W": jnp.asarray(rng.standard_normal((8, 8)), W.dtype), "b": jnp.ones(3, jnp.float32)}
        if where == "plain":
            return {**g, "b": g["b"].at[1].set(big)}
        return {**g, "W": g["W"].at[2, 5].set(1j * big if dtype == "complex64" else big)}

    spread = {"W": jnp.full((8, 8), 3e18, W.dtype), "b": jnp.ones(3, jnp.float32)}
    assert float(jnp.real(jnp.vdot(spread["W"].ravel(), spread["W"].ravel()))) > np.finfo("float32").max / 2
    cases = {"rmsprop": [(1e20, True), (1.4e19, True), (1.2e19, False)], "adam": [(1e20, True)],
             "sgd": [(1e20, False)]}
    for base, sizes in cases.items():
        opt = projunn(1e-30, unitary={"W": True, "b": False}, base=base, rank=1)
        update = jax.jit(opt.update)
        for (big, skipped), where in itertools.product(sizes, ("unitary", "plain")):
            updates, state = update(grads(big, where), opt.init(params), params)
            assert int(state.notfinite_count) == int(skipped), (base, big, where)
            assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.base)), (base, big, where)
        updates, state = update(spread, opt.init(params), params)
        assert int(state.notfinite_count) == 0, base


@pytest.mark.parametrize("base", ["rmsprop", "adam", "amsgrad"])
def test_a_half_precision_plain_leaf_is_skipped_only_where_its_square_is_too_large(base):
    """A float16 plain leaf beside a float32 unitary one: a gradient entry
    of 180, whose square (32400) is finite in float16, is taken, with the
    plain leaf's update optax's own and finite moments; one of 182 (33124,
    past half of 65504) skips the whole update. (The bound was a quarter:
    130 skipped every leaf's update.)"""
    W = ul.random_unitary(6, dtype="float32", xp=jnp, rng=2)
    params = {"W": W, "h": jnp.zeros(3, jnp.float16)}
    g_W = jnp.asarray(np.random.default_rng(4).standard_normal((6, 6)), jnp.float32)
    opt = projunn(1e-2, unitary={"W": True, "h": False}, base=base, rank=2)
    plain = getattr(optax, base)(1e-2)
    for big, skipped in [(130.0, False), (180.0, False), (182.0, True)]:
        grads = {"W": g_W, "h": jnp.asarray([big, 1.0, -1.0], jnp.float16)}
        updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
        assert int(state.notfinite_count) == int(skipped), big
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.base)), big
        if skipped:
            assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(updates))
            continue
        reference, _ = plain.update({"h": grads["h"]}, plain.init({"h": params["h"]}), {"h": params["h"]})
        np.testing.assert_array_equal(np.asarray(updates["h"]), np.asarray(reference["h"]))
        assert float(jnp.max(jnp.abs(updates["W"]))) > 0
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.base)), base


def _in_precision(tree, dtypes):
    """The floating arrays of a pytree cast to ``dtypes`` (a real, a complex
    dtype), the rest (counts, keys) as they are."""
    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return x.astype(dtypes[1] if jnp.iscomplexobj(x) else dtypes[0])
        return x
    return jax.tree.map(cast, tree)


def params_in_two_precisions():
    """A complex64 unitary leaf ['W'] and a float32 one ['rnn']['W'] of the same
    shape, their gradients, and projunn (adam) for both."""
    rng = np.random.default_rng(5)
    params = {"W": ul.random_unitary(N, dtype="complex64", xp=jnp, rng=0),
              "rnn": {"W": ul.random_unitary(N, dtype="float32", xp=jnp, rng=1)}}
    grads = {"W": jnp.asarray(rng.standard_normal((N, N)) + 1j * rng.standard_normal((N, N)), jnp.complex64),
             "rnn": {"W": jnp.asarray(rng.standard_normal((N, N)), jnp.float32)}}
    return params, grads, projunn(1e-2, unitary=True, base="adam", rank=2)


def test_a_run_resumed_in_float64_checks_the_drift_at_its_next_update():
    """A float32 run of projunn (adam) cast to float64, parameters and
    state, left W float32-accurate (2.4e-7 from unitary) until count 50: now
    the state records each unitary leaf's dtype (an int32 array, which the
    cast keeps), and the first update in float64 re-projects, as a fresh
    float64 run's first does."""
    params, grads, opt = params_in_two_precisions()
    update = jax.jit(opt.update)
    state = opt.init(params)
    for _ in range(2):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    wide = (jnp.float64, jnp.complex128)
    wide_params, wide_grads = _in_precision(params, wide), _in_precision(grads, wide)
    assert all(1e-8 < unitarity(W) < 1e-5 for W in jax.tree.leaves(wide_params))
    updates, wide_state = update(wide_grads, _in_precision(state, wide), wide_params)
    resumed = optax.apply_updates(wide_params, updates)
    fresh = optax.apply_updates(wide_params, update(wide_grads, opt.init(wide_params), wide_params)[0])
    for name in ("W", "rnn"):
        W, first = jax.tree.leaves(resumed[name])[0], jax.tree.leaves(fresh[name])[0]
        assert W.dtype == first.dtype and unitarity(first) < 1e-13
        assert unitarity(W) < 1e-13, (name, unitarity(W))
    assert int(wide_state.count) == 3 and int(wide_state.notfinite_count) == 0


@pytest.mark.parametrize("jit", [False, True])
def test_a_state_in_another_precision_than_the_parameters_is_named(jit):
    """The float32 state of a float32 run kept with float64 parameters failed
    in JAX's words ("cond branches must have equal output types", from the
    skip of non-finite gradients, which keeps the state the step promotes);
    now a TypeError names the state's array, its dtype and the parameter's
    (the longest path the array's ends with: ['rnn']['W'], not ['W'])."""
    params, grads, opt = params_in_two_precisions()
    state = opt.init(params)
    # only ['rnn']['W'] in float64: ['W'] stays complex64, its state fits, and
    # the first array of another dtype is adam's mu['rnn']['W']
    mixed = {"W": params["W"], "rnn": {"W": params["rnn"]["W"].astype(jnp.float64)}}
    mixed_grads = {"W": grads["W"], "rnn": {"W": grads["rnn"]["W"].astype(jnp.float64)}}
    update = jax.jit(opt.update) if jit else opt.update
    with pytest.raises(TypeError, match=r"^the state's array \.base\[0\]\.mu\['rnn'\]\['W'\] is float32 but "
                                        r"parameter \['rnn'\]\['W'\] is float64 .*cast the state's arrays"):
        update(mixed_grads, state, mixed)
    if jit:  # cast, the state is taken, and the leaf now in float64 is re-projected
        updates, _ = update(mixed_grads, _in_precision(state, (jnp.float64, jnp.complex64)), mixed)
        new = optax.apply_updates(mixed, updates)["rnn"]["W"]
        assert new.dtype == jnp.float64 and unitarity(new) < 1e-13
