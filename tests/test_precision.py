"""True float32 products whatever the caller's precision settings.

JAX computes float32 products in TF32 on NVIDIA GPUs by default, and PyTorch
does after ``torch.set_float32_matmul_precision("high")``; a step computed so
left W 3e-4 from unitary on an H200 (2026-12-04). The public entry points ask
for full precision for their own products (``_xp.exact_products``) and leave
the caller's setting as it was. No GPU is needed to check that: the jaxpr
records each product's precision, and PyTorch's settings can be read while
its kernels run, on the CPU too.
"""

from __future__ import annotations

import numpy as np
import pytest

import unitary_lr as ul

# --- JAX: every dot_general a public entry point records says HIGHEST ---------


def _dot_precisions(jaxpr):
    """The precision of every dot_general in a jaxpr and its sub-jaxprs
    (branches of cond, bodies of while and scan, pjit calls)."""
    from jax.extend import core as jcore

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    found += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    found += _dot_precisions(sub)
    return found


def _assert_all_highest(jaxpr, what):
    import jax

    precisions = _dot_precisions(jaxpr.jaxpr)
    assert precisions, f"{what}: no product traced"
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    bad = [p for p in precisions if p != highest]
    assert not bad, f"{what}: {len(bad)} of {len(precisions)} products at {bad[0]}, not {highest}"


def _traceable_calls(jnp, dtype):
    """The public functions that run under jax.jit (the others draw sketches
    on the host or read values there, and refuse a tracer)."""
    rng = np.random.default_rng(0)
    n = 12
    cast = (lambda x: jnp.asarray(x.astype(dtype)))
    W = jnp.asarray(ul.random_unitary(n, dtype=dtype, rng=rng))
    a, b, V = (cast(rng.standard_normal((n, k))) for k in (2, 2, 3))
    return {
        "project_unitary_lowrank": (ul.project_unitary_lowrank, (W, a, b)),
        "exp_transport": (ul.exp_transport, (W, a, b)),
        "cayley_transport": (ul.cayley_transport, (W, a, b)),
        "householder_apply": (lambda V, W: ul.householder_apply(V, W, check_finite=False), (V, W)),
        "householder_product": (ul.householder_product, (V,)),
        "unitarity_error": (ul.unitarity_error, (W,)),
        "unitarity_estimate": (lambda W: ul.unitarity_estimate(W, rng=1), (W,)),
        "project_unitary": (ul.project_unitary, (W,)),  # the SVD method
        "tangent_project": (ul.tangent_project, (W, cast(rng.standard_normal((n, n))))),
    }


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_jax_entry_points_record_float32_products(dtype):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    for name, (call, args) in _traceable_calls(jnp, dtype).items():
        _assert_all_highest(jax.make_jaxpr(call)(*args), name)


@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_jitted_optax_update_records_float32_products_and_leaves_the_callers_alone(variant):
    """Inside the caller's jax.jit: the update's products ask for HIGHEST, the
    caller's own products beside it keep the caller's precision."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn, projunn_retraction

    params = {"W": ul.random_unitary(16, dtype="complex64", xp=jnp, rng=0), "b": jnp.zeros((16, 4), jnp.float32)}
    grads = {"W": jnp.ones((16, 16), jnp.complex64), "b": jnp.ones((16, 4), jnp.float32)}
    for opt in (projunn(1e-2, unitary={"W": True, "b": False}, rank=2, variant=variant),
                projunn_retraction(unitary={"W": True, "b": False}, rank=1, variant=variant)):
        state = opt.init(params)
        _assert_all_highest(jax.make_jaxpr(opt.update)(grads, state, params), f"optax update ({variant})")

        def training_step(grads, state, params):
            updates, state = opt.update(grads, state, params)
            return updates, params["b"].T @ grads["b"]  # the caller's own product

        with jax.default_matmul_precision("bfloat16"):
            jaxpr = jax.make_jaxpr(training_step)(grads, state, params)
        precisions = _dot_precisions(jaxpr.jaxpr)
        assert precisions[-1] == (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)  # bfloat16 = DEFAULT
        highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        assert precisions[:-1] and all(p == highest for p in precisions[:-1])


def test_every_public_entry_point_asks_for_float32_products():
    """The eager-only entry points (host sketches, host checks) cannot be
    traced; they carry the same wrapper, whose effect the torch tests below
    observe on running kernels."""
    import unitary_lr.optim
    import unitary_lr.steps

    entry_points = [getattr(ul, name) for name in ul.__all__ if callable(getattr(ul, name))
                    and not isinstance(getattr(ul, name), type)]
    entry_points += [unitary_lr.steps.projunn_update, unitary_lr.steps.projunn_update_stacked,
                     unitary_lr.optim.ProjUNN.step, unitary_lr.optim.ProjUNN.step_many]
    ul_torch = pytest.importorskip("unitary_lr.torch")
    from unitary_lr.torch.retraction import ProjUNNRetraction

    entry_points += [ul_torch.ProjUNN.step, ul_torch.ProjUNN.check_drift, ul_torch.mark_unitary,
                     ProjUNNRetraction._after]
    assert len(entry_points) >= 19

    def wrapped(function):  # through torch.no_grad and torch.optim's own wrappers
        while function is not None:
            if getattr(function, "__code__", None) is not None and function.__code__.co_name == "in_full_precision":
                return True
            function = getattr(function, "__wrapped__", None)
        return False

    bare = [f.__qualname__ for f in entry_points if not wrapped(f)]
    assert not bare, f"entry points without exact_products: {bare}"


# --- PyTorch: reduced-precision settings are lifted during a call, then restored


@pytest.fixture
def torch_reduced_precision():
    """float32 products set to TF32 (CUDA) and bfloat16 (oneDNN, the CPU), as a
    training script sets them; restored after the test."""
    torch = pytest.importorskip("torch")
    settings = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    if not all(hasattr(s, "fp32_precision") for s in settings):
        pytest.skip("this PyTorch has no fp32_precision settings (before 2.9)")
    saved = [s.fp32_precision for s in settings]
    settings[0].fp32_precision, settings[1].fp32_precision = "tf32", "bf16"
    yield torch
    for s, value in zip(settings, saved):
        s.fp32_precision = value


def _settings_seen_by_products(torch, call):
    """Run ``call`` and return the (CUDA, oneDNN) fp32 precision settings in
    force at every matrix product it launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []
    products = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linalg_vecdot", "dot", "vdot", "mv", "addmv"}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in products:
                seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
            return func(*args, **(kwargs or {}))

    with Spy():
        call()
    return seen


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_torch_step_lifts_reduced_precision_and_restores_it(torch_reduced_precision, dtype):
    torch = torch_reduced_precision
    rng = np.random.default_rng(0)
    W = torch.as_tensor(ul.random_unitary(12, dtype=dtype, rng=rng))
    G = torch.as_tensor(rng.standard_normal((12, 12)).astype(dtype))
    seen = _settings_seen_by_products(torch, lambda: ul.projunn_step(W, G, lr=0.1, rank=2, rng=1))
    assert seen and set(seen) == {("ieee", "ieee")}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    # an error inside the call restores the settings too
    with pytest.raises(ValueError, match="lr"):
        ul.projunn_step(W, G, lr=float("nan"), rng=1)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")


@pytest.mark.usefixtures("torch_operations")  # products by PyTorch, as on a GPU
def test_torch_optimizer_step_lifts_reduced_precision_and_restores_it(torch_reduced_precision):
    torch = torch_reduced_precision
    from unitary_lr.torch import ProjUNN, unitary_parameter

    W = unitary_parameter(16, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    opt = ProjUNN([W], lr=0.05, base="rmsprop", rank=2, seed=0)
    W.grad = torch.randn(16, 16, dtype=torch.complex64)
    seen = _settings_seen_by_products(torch, opt.step)
    assert seen and set(seen) == {("ieee", "ieee")}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    assert float(ul.unitarity_error(W.detach())) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_public_functions_and_steps_ignore_autocast(dtype):
    """Inside ``torch.autocast`` the kernels ran their float32 products in
    bfloat16 and returned bfloat16, 3e-3 to 5e-3 from unitary; the torch
    optimizer and the retraction's steps left W 4e-3 from unitary after 60
    steps, or failed with an internal message. Now autocast is off for each
    call, and back on after it (float64 W: autocast leaves it alone anyway)."""
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN, projunn_retraction, unitary_parameter

    rng = np.random.default_rng(0)
    n = 24
    W = torch.as_tensor(ul.random_unitary(n, dtype=dtype, rng=rng))
    G = torch.as_tensor(rng.standard_normal((n, n)).astype(dtype))
    a, b = (torch.as_tensor(rng.standard_normal((n, 2)).astype(dtype)) for _ in range(2))
    V = torch.as_tensor(rng.standard_normal((n, 3)).astype(dtype))
    calls = {
        "projunn_step": lambda: ul.projunn_step(W, G, lr=0.1, rank=2, rng=1),
        "project_unitary": lambda: ul.project_unitary(W + 0.1 * G),
        "exp_transport": lambda: ul.exp_transport(W, a, b),
        "cayley_transport": lambda: ul.cayley_transport(W, a, b),
        "householder_product": lambda: ul.householder_product(V),
    }
    bound = 50 * float(np.finfo(dtype).eps) * n
    for name, call in calls.items():
        expected = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
            assert torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert got.dtype == expected.dtype == W.dtype, name
        assert float(ul.unitarity_error(got)) < bound, name
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(0)
    stepped = unitary_parameter(n, dtype=getattr(torch, dtype), generator=generator)
    retracted = unitary_parameter(n, dtype=getattr(torch, dtype), generator=generator)
    optimizer = ProjUNN([stepped], lr=0.05, base="rmsprop", rank=2, seed=0)
    sgd = torch.optim.SGD([retracted], lr=0.05)
    projunn_retraction(sgd, params=[retracted], rank=2, seed=0)
    for _ in range(30):
        stepped.grad = torch.randn(n, n, dtype=stepped.dtype, generator=generator)
        retracted.grad = torch.randn(n, n, dtype=retracted.dtype, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            optimizer.step()
            sgd.step()
    for p in (stepped, retracted):
        assert p.dtype == getattr(torch, dtype)
        assert float(ul.unitarity_error(p.detach())) < bound


@pytest.mark.usefixtures("torch_operations")  # products by PyTorch, as on a GPU
def test_nested_entry_points_set_the_precision_once(torch_reduced_precision, monkeypatch):
    """An entry point called by another (an optimizer's step calls
    ``projunn_update``) runs in the settings the outer one made: nothing is set
    a second time, the inner call's return restores nothing (the outer call's
    later products stay float32), and the outer call restores the caller's
    settings, also when an inner call raises."""
    torch = torch_reduced_precision
    from unitary_lr import _xp

    rng = np.random.default_rng(3)
    W = torch.as_tensor(ul.random_unitary(12, dtype="float32", rng=rng))
    G = torch.as_tensor(rng.standard_normal((12, 12)).astype("float32"))
    sets = []
    original = _xp._torch_products_in_ieee
    monkeypatch.setattr(_xp, "_torch_products_in_ieee", lambda t: sets.append(1) or original(t))

    @_xp.exact_products
    def outer():
        V = ul.projunn_step(W, G, lr=0.1, rng=1)
        return V @ G  # a product of the outer call after the inner one returned

    seen = _settings_seen_by_products(torch, outer)
    assert len(seen) > 2 and set(seen) == {("ieee", "ieee")} and len(sets) == 1
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")

    @_xp.exact_products
    def failing():
        ul.projunn_step(W, G, lr=-1.0, rng=1)

    with pytest.raises(ValueError, match="lr"):
        failing()
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    sets.clear()
    assert set(_settings_seen_by_products(torch, lambda: ul.projunn_step(W, G, lr=0.1, rng=1))) == {("ieee", "ieee")}
    assert len(sets) == 1  # a later call sets them again: the failed one left no trace


def test_calls_in_two_threads_keep_the_products_exact_until_the_last_returns(torch_reduced_precision):
    """A call that began while another thread's call had lifted the setting
    changed nothing, and the first call's return put TF32 (and oneDNN's
    bfloat16) back under the second one's remaining products."""
    import threading

    from unitary_lr._xp import exact_products

    torch = torch_reduced_precision
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def settings():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision

    @exact_products
    def first_call():  # lifts the setting, and returns while the second call runs
        first_in.set()
        assert second_in.wait(30)
        seen.append(("first", settings()))

    @exact_products
    def second_call():  # begins under the first call's lift, ends after it
        second_in.set()
        assert first_out.wait(30)
        seen.append(("second", settings()))

    first = threading.Thread(target=lambda: (first_call(), first_out.set()))
    first.start()
    assert first_in.wait(30)
    second = threading.Thread(target=second_call)
    second.start()
    first.join(30)
    second.join(30)
    assert seen == [("first", ("ieee", "ieee")), ("second", ("ieee", "ieee"))]
    assert settings() == ("tf32", "bf16")
