"""JAX's transformations over the traceable public functions, where they
stopped or gave NaN: the gradient of the unitarity diagnostics at an exactly
unitary W, a transport's time ``t`` traced (jit, vmap or grad over it), and
an optax unitary leaf with no rows or columns."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import unitary_lr as ul  # noqa: E402

UNITARY = {
    "identity": np.eye(5),
    "permutation": np.eye(5)[::-1],
    "complex identity": np.eye(4, dtype=complex),
    "tall": np.eye(5)[:, :3],
    "wide": np.eye(5)[:3, :],
    "batch": np.stack([np.eye(4), np.eye(4)[[1, 0, 3, 2]]]),
}


def _finite_difference(f, W, D, h=1e-6):
    return (float(f(W + h * D)) - float(f(W - h * D))) / (2 * h)


@pytest.mark.parametrize("name", sorted(UNITARY))
@pytest.mark.parametrize("diagnostic", ["unitarity_error", "unitarity_estimate"])
def test_the_diagnostics_gradient_is_zero_at_a_unitary_matrix(name, diagnostic):
    """The norm's minimum, 0: JAX's derivative of ``matrix_norm`` at 0 is
    NaN, and a penalty ``lam * unitarity_error(W)`` made W all NaN in one
    step from the identity. PyTorch's autograd gives 0 there, as now JAX."""
    W = jnp.asarray(UNITARY[name])
    rng = np.random.default_rng(0)
    probes = jnp.asarray(rng.standard_normal((*W.shape[:-2], min(W.shape[-2:]), 4)).astype(W.dtype))
    if diagnostic == "unitarity_error":
        def f(W):
            return jnp.sum(ul.unitarity_error(W))
    else:
        from unitary_lr.diagnostics import estimate_unchecked

        def f(W):
            return jnp.sum(estimate_unchecked(jnp, W, probes))
    for g in (jax.grad(f)(W), jax.jit(jax.grad(f))(W)):
        assert np.all(np.asarray(g) == 0), np.asarray(g)
    # one step of a penalised loss from W stays finite
    assert np.all(np.isfinite(np.asarray(W - 0.1 * jax.grad(f)(W))))


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_the_diagnostics_gradient_away_from_the_group_is_the_finite_difference(dtype):
    rng = np.random.default_rng(1)
    W = ul.random_unitary(6, 4, dtype=dtype, rng=2) + 0.05 * rng.standard_normal((6, 4))
    D = rng.standard_normal((6, 4))
    f = ul.unitarity_error
    g = np.asarray(jax.grad(lambda W: jnp.real(f(W)))(jnp.asarray(W)))
    # JAX's gradient of a real function of a complex W is the conjugate of d/dRe + i d/dIm
    directional = float(np.real(np.sum(np.conj(g) * D))) if dtype.startswith("complex") else float(np.sum(g * D))
    np.testing.assert_allclose(directional, _finite_difference(f, W, D), rtol=1e-6)


@pytest.mark.parametrize("transport", ["exp_transport", "cayley_transport"])
def test_a_traced_time_gives_the_eager_transport_and_its_derivative(transport):
    """jit, vmap and grad over ``t`` raised "t must be a real number, got
    DynamicJaxprTracer": the time was read on the host."""
    function = getattr(ul, transport)
    rng = np.random.default_rng(3)
    W = jnp.asarray(ul.random_unitary(6, dtype="float64", rng=4))
    a, b = (jnp.asarray(rng.standard_normal((6, 2))) for _ in range(2))
    times = [0.0, 0.3, 2.5]
    eager = [np.asarray(function(W, a, b, t=t)) for t in times]
    jitted = jax.jit(lambda t: function(W, a, b, t=t))
    for t, want in zip(times, eager):
        np.testing.assert_allclose(np.asarray(jitted(t)), want, atol=1e-13, rtol=0)
    mapped = np.asarray(jax.vmap(lambda t: function(W, a, b, t=t))(jnp.asarray(times)))
    np.testing.assert_allclose(mapped, np.stack(eager), atol=1e-13, rtol=0)

    def f(t):
        return jnp.sum(function(W, a, b, t=t)[0] * jnp.arange(6.0))

    h = 1e-6
    # (d/dt at t = 0 exactly is NaN: see "Gradients through the kernels" in docs/backends.md)
    for t in times[1:] + [1e-8]:
        want = (float(f(t + h)) - float(f(t - h))) / (2 * h)
        np.testing.assert_allclose(float(jax.grad(f)(t)), want, rtol=1e-6, atol=1e-8)


def test_a_traced_time_of_another_kind_is_named():
    W = jnp.eye(4)
    a = jnp.ones((4, 1))
    with pytest.raises(TypeError, match=r"^t must be a real number, got a traced array of shape \(2,\)"):
        jax.jit(lambda t: ul.exp_transport(W, a, a, t=t))(jnp.ones(2))
    with pytest.raises(TypeError, match=r"^t must be a real number, got a traced array of shape \(\) and dtype complex"):
        jax.jit(lambda t: ul.exp_transport(W, a, a, t=t))(jnp.asarray(1j))
    # a traced t with NumPy arrays (it failed inside the step with JAX's TracerArrayConversionError)
    with pytest.raises(TypeError, match=r"^W is a numpy.ndarray but t is a jax\..*; pass arrays from one library"):
        jax.jit(lambda t: ul.cayley_transport(np.eye(4), np.ones((4, 1)), np.ones((4, 1)), t=t))(0.3)


@pytest.mark.parametrize("shape", [(4, 0), (3, 0, 0), (0, 5)])
@pytest.mark.parametrize("params", ["tree", "array"])
def test_an_optax_leaf_of_no_rows_or_columns_is_named(shape, params):
    """Accepted by ``init`` with the default rank, it failed at the update
    with an IndexError in the small cores. An empty batch of matrices
    (0, n, n) steps, see test_empty_batches.py."""
    from unitary_lr.optax import projunn

    leaf = jnp.zeros(shape)
    tree, name = ({"W": leaf}, r"\['W'\]") if params == "tree" else (leaf, r"\(the parameters: one array\)")
    tx = projunn(0.1, unitary=True)
    with pytest.raises(ValueError, match=rf"^unitary leaf {name} must not be an empty matrix, got shape"):
        tx.init(tree)
