"""Property-based checks of the public step (hypothesis, derandomized).

Whatever the input, ``projunn_step`` gives a W that is unitary to rounding
(never NaN), or raises a ValueError whose message starts with the name of the
argument at fault; the inputs are never changed. The inputs range over every
dtype, batches, magnitudes from 0 to near the dtype's limit (lr * |G|
beyond it is test_steps.py's), rank-deficient and repeated factors, NaN/Inf and W that are
not unitary (a zero or vanishingly small gradient gives such a W back
unchanged: the check sees W only along the step's directions).
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import haar, random_matrix, tol, unitarity

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import unitary_lr as ul  # noqa: E402

DTYPES = ("float32", "float64", "complex64", "complex128")
# log10 of the largest finite value, less a margin for the sums of a small n
LIMIT = {"float32": 36, "float64": 305, "complex64": 36, "complex128": 305}
SETTINGS = settings(derandomize=True, max_examples=500, deadline=None, database=None)


@st.composite
def step_inputs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(2, 7))
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    limit = LIMIT[dtype]
    factored = draw(st.booleans())
    columns = draw(st.integers(1, 3))
    # magnitudes: 0, tiny, ordinary, huge; lr * |G| stays below the limit
    g_exp = draw(st.one_of(st.just(None), st.integers(-limit // 2, limit)))
    lr_exp = draw(st.integers(-limit // 2, min(limit, max(-limit // 2, limit - (g_exp or 0)))))
    shape = draw(st.sampled_from(["generic", "rank_deficient", "repeated"]))
    fault = draw(st.sampled_from(["none", "none", "none", "nan_G", "inf_G", "nan_W", "not_unitary"]))
    return dict(dtype=dtype, n=n, batch=batch, factored=factored, columns=columns, g_exp=g_exp,
                lr=10.0 ** lr_exp, shape=shape, fault=fault, rank=draw(st.integers(1, n)),
                variant=draw(st.sampled_from(["tangent", "direct"])), seed=draw(st.integers(0, 2**16)))


def make(case):
    rng = np.random.default_rng(case["seed"])
    dtype, n, batch = case["dtype"], case["n"], case["batch"]
    W = haar(rng, n, dtype, batch)
    scale = 0.0 if case["g_exp"] is None else 10.0 ** case["g_exp"]
    a = random_matrix(rng, (*batch, n, case["columns"]), dtype)
    b = random_matrix(rng, (n, case["columns"]), dtype)
    if case["shape"] == "rank_deficient":
        a[..., -1] = 0
    elif case["shape"] == "repeated":
        a[..., :] = a[..., :1]
        b[..., :] = b[..., :1]
    # the scale goes into a alone so that a b^H, not only a, is near the limit
    a = (a * scale).astype(dtype)
    G = (a, b) if case["factored"] else (a @ np.conj(b.T)).astype(dtype)
    faulty = G[0] if case["factored"] else G
    if case["fault"] in ("nan_G", "inf_G"):
        faulty[(0,) * faulty.ndim] = np.nan if case["fault"] == "nan_G" else np.inf
    elif case["fault"] == "nan_W":
        W[(0,) * W.ndim] = np.nan
    elif case["fault"] == "not_unitary":
        W = (0.5 * W).astype(dtype)
    return W, G


@SETTINGS
@given(step_inputs())
def test_a_step_is_unitary_or_a_value_error_naming_the_argument(case):
    W, G = make(case)
    arrays = [W, *(G if isinstance(G, tuple) else (G,))]
    before = [x.copy() for x in arrays]
    grad_name = "G[0]" if case["factored"] else "G"
    try:
        V = ul.projunn_step(W, G, lr=case["lr"], rank=case["rank"], variant=case["variant"], rng=0)
    except ValueError as error:
        message = str(error)
        # products beyond the dtype's range (G near its limit): the gradient is named
        too_large = message.startswith(("G is too large", "G[0] is too large", "G[1] is too large"))
        expected = {"nan_G": grad_name, "inf_G": grad_name, "nan_W": "W", "not_unitary": "W is not unitary"}.get(
            case["fault"])
        if expected is None:
            assert too_large, message  # a fault-free input may only fail for its size
        elif expected == grad_name:
            assert message.startswith(f"{grad_name} contains NaN or Inf"), message
        else:
            assert message.startswith(expected) or too_large, message
    else:
        if case["fault"] == "not_unitary":
            # W's error is measured on the step's own directions: a gradient of
            # zero (or so small that its panel's Gram underflows) has none, and
            # W comes back as it was, not made worse
            np.testing.assert_allclose(V, W, atol=tol(case["dtype"]))
            return
        assert case["fault"] == "none", f"a {case['fault']} input was accepted"
        assert V.dtype == W.dtype
        assert np.all(np.isfinite(V))
        assert np.all(unitarity(V) < tol(case["dtype"], 4)), unitarity(V)
    for x, copy in zip(arrays, before):
        np.testing.assert_array_equal(x, copy)


@settings(derandomize=True, max_examples=150, deadline=None, database=None)
@given(step_inputs())
def test_the_same_on_torch(case):
    """The torch path of the same step: the same outcome as NumPy's."""
    torch = pytest.importorskip("torch")
    W, G = make(case)
    as_torch = (lambda x: tuple(torch.asarray(y) for y in x)) if isinstance(G, tuple) else torch.asarray
    kwargs = dict(lr=case["lr"], rank=case["rank"], variant=case["variant"], rng=0)
    try:
        expected = ul.projunn_step(W, G, **kwargs)
    except ValueError as error:
        with pytest.raises(ValueError) as caught:
            ul.projunn_step(torch.asarray(W), as_torch(G), **kwargs)
        assert str(caught.value).split(" ")[0] == str(error).split(" ")[0], (caught.value, error)
        return
    V = ul.projunn_step(torch.asarray(W), as_torch(G), **kwargs).numpy()
    assert np.all(np.isfinite(V))
    if case["fault"] == "none":
        assert np.all(unitarity(V) < tol(case["dtype"], 4)), unitarity(V)
        if case["g_exp"] is None or case["lr"] * 10.0 ** case["g_exp"] <= 10:
            # the same seed draws the same sketch: the same step to rounding
            # (a larger step turns by many radians, where a last-bit difference
            # of the two libraries' products moves the angle visibly)
            np.testing.assert_allclose(V, expected, atol=tol(case["dtype"], 100))


@st.composite
def optimizer_runs(draw):
    return dict(base=draw(st.sampled_from(["sgd", "rmsprop", "adam"])), unitary=draw(st.booleans()),
                lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0])), dtype=draw(st.sampled_from(DTYPES)),
                bad=draw(st.lists(st.sampled_from(["nan_G", "inf_G", "huge_G", "nan_W", "not_unitary", "shape"]),
                                  min_size=1, max_size=3)),
                seed=draw(st.integers(0, 2**16)))


@settings(derandomize=True, max_examples=80, deadline=None, database=None)
@given(optimizer_runs())
def test_an_optimizer_step_that_fails_changes_nothing(run):
    """Good steps around failing ones: the run equals the one without the
    failing steps, bit for bit (moments, step counts, random stream)."""
    from unitary_lr.optim import ProjUNN

    rng = np.random.default_rng(run["seed"])
    dtype, n = run["dtype"], 6
    W0 = haar(rng, n, dtype)
    good = random_matrix(rng, (2, n, n), dtype)
    limit = 10.0 ** LIMIT[dtype]
    options = dict(base=run["base"], unitary=run["unitary"], rank=2, seed=3)
    straight, interrupted = ProjUNN(run["lr"], **options), ProjUNN(run["lr"], **options)
    W = V = W0
    W = straight.step(W, good[0])
    V = interrupted.step(V, good[0])
    for bad in run["bad"]:
        X, G = V.copy(), good[1].copy()
        if bad in ("nan_G", "inf_G"):
            G[1, 2] = np.nan if bad == "nan_G" else np.inf
        elif bad == "huge_G":
            G = (G * limit).astype(dtype)
        elif bad == "nan_W":
            X[0, 0] = np.nan
        elif bad == "not_unitary":
            X = (0.5 * X).astype(dtype)
        else:
            G = G[:, :-1]
        try:
            interrupted.step(X, G)
        except ValueError as error:
            assert str(error).split(" ")[0] in ("G", "W"), error
        else:
            # accepted: only inputs the optimizer has no reason to refuse
            assert bad in ("huge_G", "not_unitary") or (bad == "nan_W" and run["unitary"] and run["lr"] == 0) \
                or (bad == "not_unitary" and not run["unitary"]), bad
            return  # the run has changed on purpose; nothing more to compare
    W = straight.step(W, good[1])
    V = interrupted.step(V, good[1])
    np.testing.assert_array_equal(V, W)
    assert interrupted.state_dict()["rng"] == straight.state_dict()["rng"]
    assert interrupted.steps == straight.steps == 2
