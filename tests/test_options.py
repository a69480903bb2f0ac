"""One options object behind every front end: the same bad option gets the
same error (type and message) from the torch optimizer, the torch retraction,
optax's projunn and projunn_retraction, and the framework-free optimizer; one
drift-control policy, eager and traced."""

import math

import numpy as np
import pytest

import unitary_lr as ul
from unitary_lr.options import DriftControl, ProjUNNOptions

BAD_OPTIONS = [
    ({"rank": 0}, ValueError, "rank must be >= 1, got 0"),
    ({"rank": 2.0}, TypeError, "rank must be an integer, got float: 2.0"),
    ({"rank": True}, TypeError, "rank must be an integer, got bool: True"),
    ({"variant": "geodesic"}, ValueError, "variant must be one of 'tangent', 'direct', 'cayley', got 'geodesic'"),
    ({"oversample": -1}, ValueError, "oversample must be >= 0, got -1"),
    ({"power_iters": 1.5}, TypeError, "power_iters must be an integer, got float: 1.5"),
    ({"drift_tol": 0.0}, ValueError, "drift_tol must be a number in (0, 0.01] or None, got 0.0"),
    ({"drift_tol": math.inf}, ValueError, "drift_tol must be a number in (0, 0.01] or None, got inf"),
    ({"drift_tol": 0.5}, ValueError, "drift_tol must be a number in (0, 0.01] or None, got 0.5"),
    ({"drift_tol": "1e-6"}, TypeError, "drift_tol must be a real number or None, got str: '1e-6'"),
    ({"drift_check_every": -1}, ValueError, "drift_check_every must be >= 0, got -1"),
    ({"reproject": "qr"}, ValueError, "reproject must be one of 'svd', 'newton_schulz', got 'qr'"),
    ({"seed": -3}, ValueError, "seed must be >= 0, got -3"),
]


def _front_ends():
    """name -> a function taking the options as keyword arguments."""
    ends = {"options": lambda **kw: ProjUNNOptions(**kw),
            "optim.ProjUNN": lambda **kw: ul.optim.ProjUNN(1e-3, **kw)}
    try:
        import torch

        from unitary_lr.torch import ProjUNN, projunn_retraction, unitary_parameter

        W = unitary_parameter(4, dtype=torch.float64)
        ends["torch.ProjUNN"] = lambda **kw: ProjUNN([W], lr=1e-3, **kw)
        ends["torch.projunn_retraction"] = lambda **kw: projunn_retraction(torch.optim.SGD([W], lr=0.1), **kw)
    except ImportError:
        pass
    try:
        from unitary_lr.optax import projunn, projunn_retraction as optax_retraction

        ends["optax.projunn"] = lambda **kw: projunn(1e-3, unitary=True, **kw)
        ends["optax.projunn_retraction"] = lambda **kw: optax_retraction(unitary=True, **kw)
    except ImportError:
        pass
    return ends


FRONT_ENDS = _front_ends()


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_OPTIONS)
@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_each_bad_option_gets_the_same_error_everywhere(front_end, kwargs, error, message):
    with pytest.raises(error) as raised:
        FRONT_ENDS[front_end](**kwargs)
    # the torch optimizer says which group first ("ProjUNN: ..."); the rest is the same
    assert str(raised.value).endswith(message), (front_end, str(raised.value))


def test_defaults_are_one_set():
    import inspect

    defaults = ProjUNNOptions().as_dict()
    signatures = [inspect.signature(ul.optim.ProjUNN)]
    try:
        from unitary_lr.torch import ProjUNN, projunn_retraction

        signatures += [inspect.signature(ProjUNN), inspect.signature(projunn_retraction)]
    except ImportError:
        pass
    try:
        from unitary_lr.optax import projunn, projunn_retraction as optax_retraction

        signatures += [inspect.signature(projunn), inspect.signature(optax_retraction)]
    except ImportError:
        pass
    for signature in signatures:
        for name, parameter in signature.parameters.items():
            if name in defaults and name != "seed":
                assert parameter.default == defaults[name], (signature, name)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
@pytest.mark.parametrize("shape", [(12, 12), (12, 5), (5, 12)])
def test_drift_control_eager_and_traced(rng, method, shape):
    """A drifted W (1e-6) is re-projected to its polar factor by the eager
    policy and by the traced one under jax.jit; a W within the tolerance is
    kept as it is."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import scipy.linalg

    W = ul.random_unitary(*shape, dtype="float64", rng=rng)
    drifted = W + 1e-6 * rng.standard_normal(shape)
    polar = scipy.linalg.polar(drifted)[0]
    probes = rng.standard_normal((min(shape), 4))
    options = ProjUNNOptions(reproject=method)
    eager = DriftControl(options, ul._cores.host_xp)
    new, reprojected = eager.apply(drifted, probes)
    assert reprojected
    np.testing.assert_allclose(new, polar, atol=1e-13)
    kept, reprojected = eager.apply(W, probes)
    assert not reprojected and kept is W

    traced = DriftControl(options, jnp, cond=jax.lax.cond)
    run = jax.jit(lambda W, probes: traced.apply(W, probes)[0])
    np.testing.assert_allclose(np.asarray(run(jnp.asarray(drifted), jnp.asarray(probes))), polar, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(run(jnp.asarray(W), jnp.asarray(probes))), W)
    assert traced.due(50) and not traced.due(49)
    assert not DriftControl(options.replace(drift_check_every=0), jnp).due(50)
