"""The traced path: a projUNN step inside ``torch.compile(fullgraph=True)`` and
``jax.jit`` keeps its small work on the device, with no host transfer, no
callback and no Python branch on array values, and gives the eager step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import unitary_lr as ul
from unitary_lr import _host
from unitary_lr.steps import sketch_matrix

torch = pytest.importorskip("torch")


def _eager_and_omega(xp_module, W, G, *, variant, seed):
    import array_api_compat

    xp = array_api_compat.array_namespace(W)
    omega = sketch_matrix(xp, (min(W.shape[-2:]), 1), dtype=W.dtype, device=W.device, rng=seed)
    eager = ul.projunn_step(W, G, lr=0.1, rank=1, variant=variant, rng=seed)
    return xp, omega, eager


@pytest.mark.parametrize(
    ("dtype", "variant", "shape"),
    [(dtype, variant, (48, 48)) for dtype in ("float32", "float64", "complex64") for variant in ul.steps.VARIANTS]
    + [("float64", "tangent", (48, 12)), ("complex64", "direct", (12, 48)), ("complex64", "cayley", (48, 12)),
       ("float32", "cayley", (12, 48)), ("float32", "direct", (48, 12))],
)
def test_torch_compile_fullgraph_gives_the_eager_step(dtype, variant, shape):
    from unitary_lr.steps import step_unchecked

    rng = np.random.default_rng(0)
    W = torch.as_tensor(ul.random_unitary(*shape, dtype=dtype, rng=rng))
    G = torch.as_tensor(rng.standard_normal(shape).astype(dtype))
    xp, omega, eager = _eager_and_omega(torch, W, G, variant=variant, seed=5)

    def step(W, G, omega, lr):
        return step_unchecked(xp, W, G, omega, lr=lr, rank=1, variant=variant, power_iters=1, traced=True)

    torch._dynamo.reset()
    before = _host.transfers.count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes and deprecations
        compiled = torch.compile(step, fullgraph=True)
        V = compiled(W, G, omega, torch.tensor(0.1, dtype=W.real.dtype))
    assert _host.transfers.count == before
    tolerance = 1e-5 if dtype in ("float32", "complex64") else 1e-12
    np.testing.assert_allclose(V.numpy(), eager.numpy(), atol=tolerance)
    assert float(ul.unitarity_error(V)) < 10 * tolerance


def test_device_cores_make_no_transfer_and_no_scalar_read():
    """The traced cores on eager tensors: the same step, nothing read on the host."""
    from _aten import AtenOps
    from unitary_lr.steps import step_unchecked

    rng = np.random.default_rng(1)
    W = torch.as_tensor(ul.random_unitary(32, dtype="complex128", rng=rng))
    G = torch.as_tensor(rng.standard_normal((32, 32)) + 1j * rng.standard_normal((32, 32)))
    xp, omega, eager = _eager_and_omega(torch, W, G, variant="direct", seed=2)
    before = _host.transfers.count
    with AtenOps() as ops:
        V = step_unchecked(xp, W, G, omega, lr=0.1, rank=1, variant="direct", power_iters=1, traced=True)
    assert ops.scalar_reads == 0 and _host.transfers.count == before
    np.testing.assert_allclose(V.numpy(), eager.numpy(), atol=1e-12)


@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_rank_one_traced_step_calls_no_eigensolver(variant, dtype):
    """Issue 11's traced path: the 2 x 2 cores of a rank-1 step on the device
    in closed form (``_cores.hermitian_eigh``; the direct step's polar factor
    of a large 2 x 2 matrix by ``_cores._polar_2x2``), no library
    eigensolver or SVD, which PyTorch cannot capture in a CUDA graph; the
    same step as the eager one."""
    from _aten import AtenOps
    from unitary_lr.steps import step_unchecked

    rng = np.random.default_rng(3)
    W = torch.as_tensor(ul.random_unitary(32, dtype=dtype, rng=rng))
    G = torch.as_tensor(rng.standard_normal((32, 32)).astype(dtype))
    xp, omega, eager = _eager_and_omega(torch, W, G, variant=variant, seed=4)
    with AtenOps() as ops:
        V = step_unchecked(xp, W, G, omega, lr=0.1, rank=1, variant=variant, power_iters=1, traced=True)
    assert not [op for op in ops.launching if "eigh" in op or "svd" in op], ops.launching
    np.testing.assert_allclose(V.numpy(), eager.numpy(), atol=1e-5)


# A capturable rank-1 step (the optimizer's rule, the NaN/Inf guards, the
# sketch, the closed-form cores and the update): on a GPU each of these
# operations is a node of the captured CUDA graph, about 1.5 us each on an
# H200 (2026-12-04: 0.51 ms per replay at n = 1024 with about 310 of them).
# The direct step computes both branches of its polar core and selects one.
CAPTURABLE_STEP_OPS = {("float32", "tangent"): 150, ("complex64", "tangent"): 235,
                       ("float32", "cayley"): 150, ("complex64", "cayley"): 235,
                       ("float32", "direct"): 225, ("complex64", "direct"): 295}


@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_capturable_rank_one_step_is_a_bounded_number_of_operations(variant, dtype):
    """The traced cores are a few elementwise operations each (a Jacobi
    rotation for the 2 x 2 eigenvectors, a plane rotation for a real
    exponential, 1 / |y|^2 for a one-column sketch), not the closed forms of
    general shape they were: 145 aten operations per float32 step, 228
    complex64 (314 and 335 before); the direct step, with a closed-form
    polar factor where it took an SVD, 215 and 282."""
    from _aten import AtenOps

    from unitary_lr.torch import ProjUNN, unitary_parameter

    W = unitary_parameter(64, dtype=getattr(torch, dtype), generator=torch.Generator().manual_seed(0))
    opt = ProjUNN([W], lr=torch.tensor(1e-2), base="rmsprop", capturable=True, rank=1, variant=variant)
    gradients = torch.Generator().manual_seed(1)
    for _ in range(2):
        W.grad = torch.randn(64, 64, dtype=W.dtype, generator=gradients)
        opt.step()
    W.grad = torch.randn(64, 64, dtype=W.dtype, generator=gradients)
    with AtenOps() as ops:
        opt.step()
    assert ops.scalar_reads == 0
    assert len(ops.launching) <= CAPTURABLE_STEP_OPS[dtype, variant], len(ops.launching)
    assert not [op for op in ops.launching if "svd" in op or "eigh" in op], ops.launching
    assert float(ul.unitarity_error(W.detach())) < 1e-5
    assert int(opt.state[W]["skipped_steps"]) == 0


def _hard_gradients(W, rng):
    """Gradients that take the cores' every branch: a random one, one near
    the dtype's smallest and largest useful sizes, zero, one whose panel
    [Z, W^H Y] has rank 1 (G = W u u^T: both columns along u), and W itself
    (its rank-1 sketch's panel is nearly so)."""
    n = W.shape[-1]
    complex_ = np.iscomplexobj(W)
    X = rng.standard_normal((n, n)) + (1j * rng.standard_normal((n, n)) if complex_ else 0)
    u = rng.standard_normal((n, 1))
    big = 1e30 if W.dtype in (np.float64, np.complex128) else 1e18
    return {"random": X, "tiny": X * 1e-30, "huge": X * big, "zero": 0 * X, "rank one": W @ (u @ u.T), "W": W}


@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64", "complex128"])
def test_traced_cores_give_the_eager_step_on_hard_gradients(variant, dtype):
    """The device's closed-form cores (traced path) against the host's
    (eager path, ``_tiny``), the same sketch, on gradients that reach their
    every branch, for three learning rates: the same step to a few hundred
    ulps and unitary to rounding. A step of ``lr |G|`` beyond 1e6 turns W by
    an angle that rounding decides (the two paths round differently), so
    there only unitarity is compared."""
    import array_api_compat.numpy as xp

    from unitary_lr.steps import step_unchecked

    rng = np.random.default_rng(7)
    n, eps = 24, np.finfo(dtype).eps
    W = ul.random_unitary(n, dtype=dtype, rng=rng)
    for name, G in _hard_gradients(W, rng).items():
        G = G.astype(dtype) if np.iscomplexobj(W) else np.real(G).astype(dtype)
        for lr in (0.1, 1e-30, 1e6):
            omega = sketch_matrix(xp, (n, 1), dtype=W.dtype, device="cpu", rng=5)
            eager = ul.projunn_step(W, G, lr=lr, rank=1, variant=variant, rng=5)
            traced = step_unchecked(xp, W, G, omega, lr=lr, rank=1, variant=variant, power_iters=1, traced=True)
            assert traced.shape == W.shape and traced.dtype == W.dtype
            unitarity = np.abs(np.conj(traced.T) @ traced - np.eye(n)).max()
            assert unitarity <= 64 * eps, (name, lr, unitarity / eps)
            if lr * np.abs(G).max() <= 1e6:
                assert np.abs(traced - eager).max() <= 256 * eps, (name, lr, np.abs(traced - eager).max() / eps)
            if name == "zero" or lr * np.abs(G).max() < 1e-20:
                np.testing.assert_allclose(traced, W, atol=4 * eps)


def test_jitted_rank_one_optax_update_has_no_eigensolver():
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn

    params = {"W": ul.random_unitary(16, dtype="float32", xp=jnp, rng=0)}
    opt = projunn(1e-2, unitary={"W": True}, rank=1, variant="tangent")
    jaxpr = str(jax.make_jaxpr(opt.update)({"W": jnp.ones((16, 16), jnp.float32)}, opt.init(params), params))
    # (the drift control's re-projection, in a branch of its own, is an SVD of W)
    assert "eigh" not in jaxpr and "callback" not in jaxpr


def test_jitted_optax_update_has_no_callback():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn

    params = {"W": ul.random_unitary(16, dtype="float64", xp=jnp, rng=0), "b": jnp.zeros(16)}
    opt = projunn(1e-2, unitary={"W": True, "b": False}, rank=2, variant="direct")
    state = opt.init(params)
    grads = {"W": jnp.ones((16, 16)), "b": jnp.ones(16)}
    jaxpr = str(jax.make_jaxpr(opt.update)(grads, state, params))
    assert "callback" not in jaxpr and "eigh" in jaxpr
    updates, _ = jax.jit(opt.update)(grads, state, params)
    W = optax.apply_updates(params, updates)["W"]
    assert float(ul.unitarity_error(W)) < 1e-13


@pytest.mark.parametrize("variant", ul.steps.VARIANTS)
def test_jitted_optax_update_on_rectangular_leaves(variant):
    """Leaves with orthonormal columns and rows under jax.jit: the jitted update
    is the eager step, orthonormal to rounding, with no callback."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn

    params = {"tall": ul.random_unitary(16, 4, dtype="float64", xp=jnp, rng=0),
              "wide": ul.random_unitary(3, 12, dtype="complex128", xp=jnp, rng=1)}
    opt = projunn(1e-1, unitary={"tall": True, "wide": True}, base="sgd", rank=1, variant=variant)
    state = opt.init(params)
    rng = np.random.default_rng(2)
    grads = {"tall": jnp.asarray(rng.standard_normal((16, 1)) @ rng.standard_normal((1, 4))),
             "wide": jnp.asarray((rng.standard_normal((3, 1)) + 1j) @ rng.standard_normal((1, 12)))}
    assert "callback" not in str(jax.make_jaxpr(opt.update)(grads, state, params))
    eager, _ = opt.update(grads, state, params)
    jitted, _ = jax.jit(opt.update)(grads, state, params)
    for name in params:
        np.testing.assert_allclose(np.asarray(jitted[name]), np.asarray(eager[name]), atol=1e-13)
        W = optax.apply_updates(params, jitted)[name]
        assert W.shape == params[name].shape
        assert float(ul.unitarity_error(W)) < 1e-13


_HLO_VALUE = r"%(?P<name>[\w.\-]+) = (?P<type>[a-z]+\d*)\[(?P<dims>[\d,]*)\]"


def _transposing_products(hlo, large):
    """The products of an optimized XLA module that read a large operand
    (``large`` entries or more) transposed: as the left factor contracted
    along its rows (``A^T @ P``), which XLA's CPU backend runs by copying A
    into its transpose first, ten to forty times the product's own cost
    (1024 x 1024, float32, two columns: 3.6 against 0.13 ms), or as the right
    factor contracted along its columns (``P @ A^T``), at half speed."""
    import re

    shapes = {m["name"]: tuple(int(d) for d in m["dims"].split(",") if d) for m in re.finditer(_HLO_VALUE, hlo)}
    found = []
    for m in re.finditer(r"dot\(%(?P<lhs>[\w.\-]+), %(?P<rhs>[\w.\-]+)\)(?P<attributes>[^\n]*)", hlo):
        for side, transposed_axis in (("lhs", -2), ("rhs", -1)):
            shape = shapes[m[side]]
            contracting = re.search(side + r"_contracting_dims=\{(\d+)\}", m["attributes"])
            if int(np.prod(shape)) >= large and contracting and int(contracting[1]) == len(shape) + transposed_axis:
                found.append(m[0])
    return found


@pytest.mark.parametrize(("shape", "dtype"), [((64, 64), "float32"), ((128, 48), "float32"), ((48, 128), "float32"),
                                             ((48, 128), "complex64"), ((2, 32, 32), "complex64")])
def test_jitted_update_never_transposes_a_large_operand(shape, dtype):
    """Every product of the compiled optax update reads W and G in their own
    layout, for every variant: square, tall, wide (stepped through its
    conjugate transpose, never formed) and batched matrices, drift check
    included; rank 2, the smallest whose panels have two columns. Before, the thin products ``(Y^H G)^H`` of a rank >= 2 sketch
    and a wide W's ``W^H Q`` compiled to transposing copies: rank 2 took
    ten times rank 1 (1024 x 1024, float32, one CPU thread: 14.1 against 1.4 ms)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn

    *batch, n, m = shape
    W = jnp.asarray(np.stack([ul.random_unitary(n, m, dtype=dtype, rng=seed) if n >= m else
                              ul.random_unitary(m, n, dtype=dtype, rng=seed).T for seed in range(max(batch, default=1))])
                    .reshape(shape))
    G = jnp.asarray(np.random.default_rng(1).standard_normal(shape), dtype=W.dtype)
    # the drift check runs on the first step (every 1): its products are compiled in too
    for variant in ul.steps.VARIANTS:
        opt = projunn(1e-2, unitary={"W": True}, rank=2, variant=variant, drift_check_every=1)
        args = ({"W": G}, opt.init({"W": W}), {"W": W})
        hlo = jax.jit(opt.update).lower(*args).compile().as_text()
        assert _transposing_products(hlo, W.size) == [], variant


def test_vmapped_jitted_update_is_each_members_update():
    """An ensemble stepped by ``jax.vmap`` of the update (each member with its
    own state) gets each member's own update: the compiler guards of the
    products (``optimization_barrier``) batch."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn

    members = 3
    W = jnp.asarray(ul.random_unitary(24, batch_shape=(members,), dtype="float64", rng=0))
    G = jnp.asarray(np.random.default_rng(1).standard_normal((members, 24, 24)))
    opt = projunn(1e-1, unitary={"W": True}, rank=2, variant="tangent")
    states = jax.vmap(opt.init)({"W": W})
    updates, _ = jax.jit(jax.vmap(opt.update))({"W": G}, states, {"W": W})
    for i in range(members):
        state = jax.tree.map(lambda x: x[i], states)
        alone, _ = jax.jit(opt.update)({"W": G[i]}, state, {"W": W[i]})
        np.testing.assert_allclose(np.asarray(updates["W"][i]), np.asarray(alone["W"]), atol=1e-12)
    assert float(ul.unitarity_error(W + updates["W"]).max()) < 1e-13
