"""unitary_lr.optax.projunn_retraction: projUNN as the last step of an optax chain."""

import inspect
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
optax = pytest.importorskip("optax", reason="optax is not installed")
scipy_linalg = pytest.importorskip("scipy.linalg")
import jax.numpy as jnp

import unitary_lr as ul
from unitary_lr.optax import STATIC_ARGS, projunn, projunn_retraction

N = 10


def unitarity(W):
    W = np.asarray(W).astype(np.complex128)
    n = W.shape[-1]
    return np.max(np.linalg.norm(np.conj(np.swapaxes(W, -1, -2)) @ W - np.eye(n), axis=(-2, -1)) / np.sqrt(n))


def dense_step(W, U, variant):
    """The float64 SciPy reference of the step of W along the Euclidean update U."""
    W, U = np.asarray(W, np.complex128), np.asarray(U, np.complex128)
    if variant == "direct":
        return scipy_linalg.polar(W + U)[0]
    # projunn_step's tangent step W expm(-lr/2 (W^H G - G^H W)) with -lr G = U
    return W @ scipy_linalg.expm((W.conj().T @ U - U.conj().T @ W) / 2)


def random_like(rng, shape, dtype):
    x = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_rank_one_update_is_the_dense_step(variant, dtype):
    """A rank-1 update is sketched exactly, so W + u must be the dense step
    along U itself: polar(W + U), or the exponential of the skew generator."""
    rng = np.random.default_rng(0)
    W = ul.random_unitary(N, dtype=dtype, batch_shape=(2,), rng=1)
    a, b = random_like(rng, (2, N, 1), dtype), random_like(rng, (2, N, 1), dtype)
    U = 0.3 * a @ np.conj(np.swapaxes(b, -1, -2))
    bias = rng.standard_normal(3)
    params = {"W": jnp.asarray(W), "bias": jnp.asarray(bias)}
    opt = projunn_retraction(unitary={"W": True, "bias": False}, rank=1, variant=variant, drift_check_every=0)
    updates, state = jax.jit(opt.update)({"W": jnp.asarray(U), "bias": jnp.asarray(2 * bias)}, opt.init(params),
                                         params)
    new_W = optax.apply_updates(params, updates)["W"]
    for index in range(2):
        np.testing.assert_allclose(new_W[index], dense_step(W[index], U[index], variant), atol=1e-12)
    assert unitarity(new_W) < 1e-13
    np.testing.assert_array_equal(updates["bias"], 2 * bias)  # an unmasked leaf passes through
    assert int(state.count) == 1
    # the step is not the plain Euclidean one (the test could not pass by W + U)
    assert np.max(np.abs(np.asarray(new_W) - (W + U))) > 1e-3


def chain_problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {"W": ul.random_unitary(N, dtype=dtype, rng=seed + 1, xp=jnp),
              "dense": {"kernel": jnp.asarray(rng.standard_normal((N, 4))), "bias": jnp.zeros(4)}}
    x = jnp.asarray(random_like(rng, (16, N), dtype) / np.sqrt(N))
    y = jnp.asarray(rng.standard_normal((16, 4)))

    def loss(p):
        h = jnp.abs(x @ p["W"]) ** 2
        return jnp.mean((h @ p["dense"]["kernel"] + p["dense"]["bias"] - y) ** 2)

    mask = {"W": True, "dense": {"kernel": False, "bias": False}}
    return params, loss, mask


def conj_grads(grads):
    # JAX's gradient of a real loss of a complex leaf is the conjugate of the
    # one whose negative is the descent direction (optax's convention for updates)
    return jax.tree.map(jnp.conj, grads)


@pytest.mark.parametrize("variant", ["tangent", "direct"])
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_clip_adam_learning_rate_retraction_chain_under_jit(variant, dtype):
    params, loss, mask = chain_problem(dtype)
    before = [optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale_by_learning_rate(3e-2)]
    opt = optax.chain(*before, projunn_retraction(unitary=mask, rank=2, variant=variant, drift_check_every=0))
    euclidean = optax.chain(*before)  # the same chain without the retraction
    state, euclidean_state = opt.init(params), euclidean.init(params)

    @jax.jit
    def train_step(params, state, euclidean_state):
        grads = conj_grads(jax.grad(loss)(params))
        updates, state = opt.update(grads, state, params)
        euclidean_updates, euclidean_state = euclidean.update(grads, euclidean_state, params)
        return optax.apply_updates(params, updates), state, euclidean_state, updates, euclidean_updates

    first = float(loss(params))
    for _ in range(150):
        params, state, euclidean_state, updates, euclidean_updates = train_step(params, state, euclidean_state)
        # the other leaves get exactly the chain's updates
        for leaf, ref in zip(jax.tree.leaves(updates["dense"]), jax.tree.leaves(euclidean_updates["dense"])):
            np.testing.assert_array_equal(leaf, ref)
    # 150 steps, no re-projection: unitary to rounding
    assert unitarity(params["W"]) < 1e-13
    assert float(loss(params)) < 0.7 * first


def test_complex_convention_reaches_the_minimiser():
    """Minimise ||W - V||_F^2 over unitary W with the conjugated JAX gradient
    and a plain learning rate: the chain must reach V (a sign or conjugation
    error would walk away from it)."""
    V = ul.random_unitary(6, dtype="complex128", rng=5)
    params = {"W": ul.random_unitary(6, dtype="complex128", rng=6, xp=jnp)}
    opt = optax.chain(optax.scale_by_learning_rate(0.1), projunn_retraction(unitary={"W": True}, rank=6))
    state = opt.init(params)

    @jax.jit
    def train_step(params, state):
        grads = conj_grads(jax.grad(lambda p: jnp.sum(jnp.abs(p["W"] - V) ** 2))(params))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(200):
        params, state = train_step(params, state)
    np.testing.assert_allclose(np.asarray(params["W"]), V, atol=1e-10)


def test_schedule_as_learning_rate_of_the_chain():
    """With a rank-1 Euclidean update, each step is the dense step along
    -schedule(count) * g: the schedule is what scales the retraction's input."""
    rng = np.random.default_rng(3)
    W0 = ul.random_unitary(N, dtype="float64", rng=4)
    a, b = rng.standard_normal((N, 1)), rng.standard_normal((N, 1))
    g = a @ b.T
    schedule = optax.piecewise_constant_schedule(0.2, {2: 0.25})
    opt = optax.chain(optax.scale_by_learning_rate(schedule),
                      projunn_retraction(unitary={"W": True}, rank=1, drift_check_every=0))
    params, state = {"W": jnp.asarray(W0)}, opt.init({"W": jnp.asarray(W0)})
    update = jax.jit(opt.update)
    W = W0
    for count in range(4):
        updates, state = update({"W": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        W = dense_step(W, -float(schedule(count)) * g, "tangent").real
        np.testing.assert_allclose(params["W"], W, atol=1e-12)


def test_inject_hyperparams_injects_the_learning_rate():
    params, loss, mask = chain_problem("complex128")
    options = {"unitary": mask, "base": "adam", "rank": 2, "seed": 3}
    injected = optax.inject_hyperparams(projunn, static_args=STATIC_ARGS)(learning_rate=1e-2, **options)
    schedule = optax.piecewise_constant_schedule(1e-2, {3: 0.4})  # 1e-2, then 4e-3 from the 4th update on
    scheduled = projunn(schedule, **options)
    state, scheduled_state = injected.init(params), scheduled.init(params)
    update, scheduled_update = jax.jit(injected.update), jax.jit(scheduled.update)
    for count in range(5):
        if count == 3:
            state.hyperparams["learning_rate"] = jnp.asarray(4e-3)
        grads = jax.grad(loss)(params)
        updates, state = update(grads, state, params)
        expected, scheduled_state = scheduled_update(grads, scheduled_state, params)
        for leaf, ref in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            np.testing.assert_allclose(leaf, ref, rtol=1e-10, atol=1e-14)
        params = optax.apply_updates(params, updates)
    assert unitarity(params["W"]) < 1e-13


@pytest.mark.parametrize("jitted", [False, True])
def test_a_schedule_through_zero_is_injected(jitted):
    """A schedule that is 0 somewhere (a warm-up from 0, a decay to 0) goes
    through optax.inject_hyperparams, which passes its value at init and at
    each eager update as a number: the updates are those of projunn given
    the schedule itself. At 0 the unitary leaf's update is exactly 0 and
    the base's moments advance; the next updates move W on the group."""
    params, loss, mask = chain_problem("float64")
    options = {"unitary": mask, "base": "adam", "rank": 2, "seed": 3}
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 2e-2, 2), optax.linear_schedule(2e-2, 0.0, 2)], [2])
    assert [float(schedule(count)) for count in range(5)] == [0.0, 1e-2, 2e-2, 1e-2, 0.0]
    injected = optax.inject_hyperparams(projunn, static_args=STATIC_ARGS)(learning_rate=schedule, **options)
    scheduled = projunn(schedule, **options)
    state, scheduled_state = injected.init(params), scheduled.init(params)
    update = jax.jit(injected.update) if jitted else injected.update
    for count in range(5):
        grads = jax.grad(loss)(params)
        updates, state = update(grads, state, params)
        expected, scheduled_state = scheduled.update(grads, scheduled_state, params)
        for leaf, ref in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            np.testing.assert_allclose(leaf, ref, rtol=1e-10, atol=1e-14)
        moved = float(jnp.max(jnp.abs(updates["W"])))
        assert (moved == 0.0) == (count in (0, 4)), (count, moved)
        params = optax.apply_updates(params, updates)
    first_moments = [leaf for leaf in jax.tree.leaves(state.inner_state.base) if leaf.shape == params["W"].shape]
    assert first_moments and all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in first_moments)
    assert unitarity(params["W"]) < 1e-13
    # a constant 0, as the other front ends take it: nothing moves, the update counts
    still = projunn(0.0, **options)
    updates, still_state = still.update(jax.grad(loss)(params), still.init(params), params)
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree.leaves(updates))
    assert int(still_state.count) == 1


def test_inject_hyperparams_without_static_args_names_the_fix():
    inject = optax.inject_hyperparams(projunn)
    # the default rank is None, which inject_hyperparams leaves alone: the
    # first integer option it turns into an array is then oversample
    with pytest.raises(TypeError, match=r"oversample must be a Python number, got an array .*"
                                        r"static_args=unitary_lr.optax.STATIC_ARGS"):
        inject(learning_rate=1e-2, unitary={"W": True}).init({"W": jnp.eye(3)})


def test_array_learning_rate_of_projunn():
    params = {"W": ul.random_unitary(N, dtype="float64", rng=0, xp=jnp)}
    grads = {"W": jnp.asarray(np.random.default_rng(1).standard_normal((N, N)))}
    by_float = projunn(1e-2, unitary={"W": True}, base="sgd")
    by_array = projunn(jnp.asarray(1e-2), unitary={"W": True}, base="sgd")
    first = by_float.update(grads, by_float.init(params), params)[0]["W"]
    second = by_array.update(grads, by_array.init(params), params)[0]["W"]
    np.testing.assert_allclose(first, second, atol=1e-15)
    # a traced learning rate: projunn built inside jit
    traced = jax.jit(lambda lr, p, g: projunn(lr, unitary={"W": True}, base="sgd").update(
        g, projunn(1e-2, unitary={"W": True}, base="sgd").init(p), p)[0])(jnp.asarray(1e-2), params, grads)
    np.testing.assert_allclose(traced["W"], first, atol=1e-15)
    for bad, error, match in [(jnp.asarray(-1e-2), ValueError, r"finite number >= 0 or a schedule, got Array\(-0.01"),
                              (np.float64("nan"), ValueError, r"finite number >= 0 or a schedule, got np.float64\(nan"),
                              (jnp.ones(2), TypeError, r"learning_rate as an array must be a real scalar, got Array"),
                              ("0.1", TypeError, r"learning_rate must be a number, .* got '0.1'"),
                              (True, TypeError, r"learning_rate must be a number, .* got True")]:
        with pytest.raises(error, match=match):
            projunn(bad, unitary={"W": True})


def test_multisteps_accumulates_then_takes_one_step():
    params, _, mask = chain_problem("float64")
    chain = lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(5e-2),
                                projunn_retraction(unitary=mask, rank=2, seed=7))
    # MultiSteps accumulates in float32 unless told (and drops the imaginary
    # part of complex gradients: accumulator_dtype=jnp.complex128 for those),
    # from optax 0.2.8 on; before, in the gradients' dtype
    told = "accumulator_dtype" in inspect.signature(optax.MultiSteps.__init__).parameters
    opt = optax.MultiSteps(chain(), every_k_schedule=3, **({"accumulator_dtype": jnp.float64} if told else {}))
    single = chain()
    state, single_state = opt.init(params), single.init(params)
    update = jax.jit(opt.update)
    rng = np.random.default_rng(2)
    for _ in range(2):
        grads = []
        for mini in range(3):
            g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
            grads.append(g)
            updates, state = update(g, state, params)
            if mini < 2:
                for leaf in jax.tree.leaves(updates):
                    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
        mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
        expected, single_state = single.update(mean, single_state, params)
        for leaf, ref in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            np.testing.assert_allclose(leaf, ref, atol=1e-12)
        params = optax.apply_updates(params, updates)
        assert unitarity(params["W"]) < 1e-13
    assert int(state.inner_opt_state[-1].count) == 2  # the retraction ran once per 3 mini-steps


@pytest.mark.parametrize("bad_leaf", ["W", "bias"])
def test_apply_if_finite_skips_and_resumes(bad_leaf):
    params, loss, mask = chain_problem("complex128")
    opt = optax.apply_if_finite(optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2),
                                            projunn_retraction(unitary=mask, rank=2, seed=1)),
                                max_consecutive_errors=3)
    update = jax.jit(opt.update)
    state = opt.init(params)
    updates, state = update(conj_grads(jax.grad(loss)(params)), state, params)
    params = optax.apply_updates(params, updates)
    grads = conj_grads(jax.grad(loss)(params))
    if bad_leaf == "W":
        poisoned = {**grads, "W": grads["W"].at[2, 3].set(np.nan)}
    else:
        poisoned = {**grads, "dense": {**grads["dense"], "bias": grads["dense"]["bias"].at[0].set(np.inf)}}
    skipped, skipped_state = update(poisoned, state, params)
    for leaf in jax.tree.leaves(skipped):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    assert int(skipped_state.notfinite_count) == 1
    for after, before in zip(jax.tree.leaves(skipped_state.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(after, before)
    resumed, _ = update(grads, skipped_state, params)
    clean, _ = update(grads, state, params)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(clean)):
        np.testing.assert_array_equal(a, b)
    assert unitarity(optax.apply_updates(params, resumed)["W"]) < 1e-13


def test_nonfinite_update_passes_through_the_bare_retraction():
    """Without apply_if_finite a NaN is not hidden: the unitary leaf's update
    is handed back as it came (W + U shows the NaN), the other leaves untouched."""
    params = {"W": ul.random_unitary(N, dtype="float64", rng=0, xp=jnp), "b": jnp.zeros(3)}
    U = jnp.ones((N, N)).at[1, 2].set(np.nan)
    opt = projunn_retraction(unitary={"W": True, "b": False})
    updates, _ = jax.jit(opt.update)({"W": U, "b": jnp.ones(3)}, opt.init(params), params)
    np.testing.assert_array_equal(updates["W"], U)
    np.testing.assert_array_equal(updates["b"], np.ones(3))


@pytest.mark.parametrize("chain", ["retraction", "projunn"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_the_nan_guard_makes_no_pass_over_the_matrices_but_one_sum(chain, dtype):
    """The NaN/Inf guards of the jitted update: one sum of each gradient (a
    fused read, no n x n mask), then a lax.cond that runs the step only on
    finite input. Outside the cond, nothing of the matrices' size is
    computed (no n x n select of zeros, negation or mask)."""
    W = ul.random_unitary(N, dtype=dtype, xp=jnp, rng=0)
    G = jnp.ones((N, N), W.dtype)
    opt = projunn_retraction(unitary={"W": True}, rank=1) if chain == "retraction" else \
        projunn(1e-2, unitary={"W": True}, rank=1)
    jaxpr = jax.make_jaxpr(opt.update)({"W": G}, opt.init({"W": W}), {"W": W}).jaxpr
    big = [e.primitive.name for e in jaxpr.eqns if any(getattr(v.aval, "shape", ()) == (N, N) for v in e.outvars)]
    assert big == ["cond"]
    # one read of the gradient, to a scalar: its sum (or, with rmsprop, the
    # default, its sum of squares, a dot product: one whose square overflows
    # stopped the second moment's entries for good)
    assert [e.primitive.name for e in _scalar_reads(jaxpr.eqns)] == ["reduce_sum" if chain == "retraction"
                                                                     else "dot_general"]
    # and nowhere else, branches included: the step projunn runs on the base
    # optimizer's direction makes no test of its own (a test of the base's
    # new moments, a cond over the step's output, cost 1.5-2x the update)
    assert len(_scalar_reads(_all_eqns(jaxpr))) == 1


def _scalar_reads(eqns):
    """The equations that reduce an array of N x N entries to a scalar."""
    return [e for e in eqns if e.primitive.name in ("reduce_sum", "dot_general")
            and getattr(e.outvars[0].aval, "shape", None) == ()
            and math.prod(getattr(e.invars[0].aval, "shape", ())) == N * N]


def _all_eqns(jaxpr):
    """The equations of a jaxpr and of its sub-jaxprs (branches of cond,
    bodies of loops, pjit calls)."""
    from jax.extend import core as jcore

    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _all_eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _all_eqns(sub)


def test_drift_control_in_the_retraction():
    # the first update is checked too, then every drift_check_every-th
    rng = np.random.default_rng(1)
    params = {"W": jnp.asarray(ul.random_unitary(N, dtype="float64", rng=0))}
    opt = optax.chain(optax.scale_by_learning_rate(1e-4),
                      projunn_retraction(unitary={"W": True}, drift_check_every=2))
    state = opt.init(params)
    update = jax.jit(opt.update)
    grads = {"W": jnp.ones((N, N))}
    for step, checked in enumerate((True, True, False, True), 1):
        params = {"W": params["W"] + 1e-6 * rng.standard_normal((N, N))}  # drifted off the group
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert (unitarity(params["W"]) < 1e-14) == checked, step


def test_errors_name_the_argument_and_value():
    params = {"W": jnp.eye(4), "b": jnp.zeros(3)}
    mask = {"W": True, "b": False}
    for kwargs, error, match in [
        ({"variant": "cayley?"}, ValueError, r"variant must be one of 'tangent', 'direct', 'cayley', got 'cayley\?'"),
        ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
        ({"rank": 2.0}, TypeError, r"rank must be an integer, got float: 2.0"),
        ({"drift_tol": float("inf")}, ValueError, r"drift_tol must be a number in \(0, 0.01\] or None, got inf"),
        ({"drift_check_every": -1}, ValueError, r"drift_check_every must be >= 0, got -1"),
        ({"seed": jnp.asarray(0)}, TypeError, r"seed must be a Python number, got an array"),
    ]:
        with pytest.raises(error, match=match):
            projunn_retraction(unitary=mask, **kwargs)
    opt = projunn_retraction(unitary=mask)
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(n, m\) = 4 of unitary leaf \['W'\]"):
        projunn_retraction(unitary=mask, rank=5).init(params)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"projunn_retraction needs the parameters: opt.update\(updates, state, "
                                         r"params\)"):
        opt.update(params, state)
    with pytest.raises(ValueError, match=r"the update of unitary leaf \['W'\] has shape \(4, 3\), the leaf \(4, 4\)"):
        opt.update({"W": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, state, params)
    with pytest.raises(TypeError, match=r"update of unitary leaf \['W'\] is complex \(complex128\) but the leaf is "
                                        r"real \(float64\)"):
        opt.update({"W": jnp.zeros((4, 4), jnp.complex128), "b": jnp.zeros(3)}, state, params)
    with pytest.raises(ValueError, match=r"updates must have the tree structure of the parameters"):
        opt.update({"W": jnp.zeros((4, 4))}, state, params)
    with pytest.raises(ValueError, match=r"unitary must have the tree structure of the parameters"):
        projunn_retraction(unitary={"W": True}).init(params)


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_a_true_prefix_mask_marks_its_whole_subtree(variant):
    """unitary={"rnn": True, "head": False}, a prefix of the parameters'
    structure (as optax.masked takes a mask), or a function returning it,
    gives exactly the updates of the full mask, under jit: each leaf of "rnn"
    takes the dense step along its rank-1 update, each of "head" passes through."""
    rng = np.random.default_rng(0)
    n = 6
    Ws = {name: ul.random_unitary(n, dtype="complex128", rng=seed) for name, seed in (("W1", 1), ("W2", 2))}
    Us = {name: 0.3 * random_like(rng, (n, 1), "complex128") @ np.conj(random_like(rng, (n, 1), "complex128")).T
          for name in Ws}
    head = {"w": rng.standard_normal((n, 3)), "b": rng.standard_normal(3)}
    params = jax.tree.map(jnp.asarray, {"rnn": Ws, "head": head})
    updates = jax.tree.map(jnp.asarray, {"rnn": Us, "head": jax.tree.map(lambda x: 2 * x, head)})
    full = {"rnn": {"W1": True, "W2": True}, "head": {"w": False, "b": False}}
    prefix = {"rnn": True, "head": False}
    results = []
    for mask in (full, prefix, lambda p: prefix):
        opt = optax.chain(optax.identity(), projunn_retraction(unitary=mask, rank=1, variant=variant))
        results.append(jax.jit(opt.update)(updates, opt.init(params), params)[0])
    for result in results[1:]:
        assert jax.tree.structure(result) == jax.tree.structure(params)
        for leaf, full_leaf in zip(jax.tree.leaves(result), jax.tree.leaves(results[0])):
            np.testing.assert_array_equal(leaf, full_leaf)
    new = optax.apply_updates(params, results[1])
    for name in Ws:
        np.testing.assert_allclose(new["rnn"][name], dense_step(Ws[name], Us[name], variant), atol=1e-12)
        assert np.max(np.abs(np.asarray(new["rnn"][name]) - (Ws[name] + Us[name]))) > 1e-3  # not W + U
    for name in head:
        np.testing.assert_array_equal(results[1]["head"][name], 2 * head[name])


def test_a_prefix_mask_over_a_bias_or_of_another_structure_is_refused():
    params = {"rnn": {"W1": jnp.eye(4), "W2": jnp.eye(4)}, "head": {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"unitary leaf \['head'\]\['b'\] must be a matrix .* got shape \(3,\)"):
        projunn_retraction(unitary={"rnn": True, "head": True}).init(params)
    with pytest.raises(ValueError, match=r"unitary must have the tree structure of the parameters or a prefix of it, "
                                         r"got PyTreeDef\(\{'rnn': \{'W3': \*\}\}\) for parameters "
                                         r"PyTreeDef\(\{'head': \{'b': \*, 'w': \*\}, "
                                         r"'rnn': \{'W1': \*, 'W2': \*\}\}\)"):
        projunn_retraction(unitary={"rnn": {"W3": True}}).init(params)
    opt = projunn_retraction(unitary={"rnn": True, "head": False}, rank=2)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"unitary must have the tree structure of the parameters or a prefix of it"):
        jax.jit(opt.update)(params, state, {"rnn": params["rnn"]})  # params of another structure at update


def _in_float64(tree):
    """The floating arrays of a pytree cast to float64 (complex ones to
    complex128), the rest (counts, keys) as they are: a run resumed in float64."""
    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return x.astype(jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64)
        return x
    return jax.tree.map(cast, tree)


def test_a_run_resumed_in_float64_checks_the_drift_at_its_next_update():
    """A float32 run cast to float64 (parameters and state) at count 3 left W
    float32-accurate (2.4e-7 from unitary) until count 50, the next check.
    The state now records each unitary leaf's dtype (an int32 array, which
    the cast keeps): the first update in float64 checks the drift and
    re-projects, as a fresh float64 run's first update does; the next one
    does not check again. A state without the record (an older version's) is
    checked too."""
    rng = np.random.default_rng(4)
    params = {"W": ul.random_unitary(N, dtype="float32", xp=jnp, rng=0), "b": jnp.zeros(3, jnp.float32)}
    opt = optax.chain(optax.scale_by_learning_rate(1e-2), projunn_retraction(unitary={"W": True, "b": False}, rank=2))
    update = jax.jit(opt.update)
    G = rng.standard_normal((N, N))
    grads = {"W": jnp.asarray(G, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    state = opt.init(params)
    for _ in range(3):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert 1e-8 < unitarity(params["W"]) < 1e-5  # float32-accurate
    params, state, grads = _in_float64(params), _in_float64(state), _in_float64(grads)
    assert int(state[-1].count) == 3 and unitarity(params["W"]) > 1e-8
    updates, resumed_state = update(grads, state, params)
    resumed = optax.apply_updates(params, updates)
    fresh = optax.apply_updates(params, update(grads, opt.init(params), params)[0])  # a float64 run's first
    assert unitarity(fresh["W"]) < 1e-13
    assert unitarity(resumed["W"]) < 1e-13, unitarity(resumed["W"])
    assert int(resumed_state[-1].count) == 4
    # the next update in float64 is not checked: a drift of 1e-9 stays
    drifted = {**resumed, "W": resumed["W"] + 1e-9 * rng.standard_normal((N, N))}
    updates, _ = update(grads, resumed_state, drifted)
    assert 1e-10 < unitarity(optax.apply_updates(drifted, updates)["W"]) < 1e-7
    # a state that records no dtypes (saved by an older version) is checked at its next update
    old_state = (resumed_state[0], resumed_state[1]._replace(precision=None))
    updates, new_state = update(grads, old_state, drifted)
    assert unitarity(optax.apply_updates(drifted, updates)["W"]) < 1e-13
    np.testing.assert_array_equal(new_state[-1].precision, [2])  # float64
