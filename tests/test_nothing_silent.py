"""Every finite input gives a unitary result or a clear error naming the
argument: the regressions of the kernel audit (huge and lopsided generators,
finite but huge updates, NaN/Inf or a non-unitary W)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import tol

import unitary_lr as ul


def orthogonality(V):
    V = np.asarray(V, dtype=np.complex128)
    return np.linalg.norm(V.conj().T @ V - np.eye(V.shape[-1])) / np.sqrt(V.shape[-1])


@pytest.mark.parametrize("seed", range(5))
def test_real_exp_core_orthogonal_for_a_huge_generator(seed):
    """||t X|| ~ 1e12 on a small W, where rebuilding each plane rotation from
    one member of its (lam, -lam) pair was up to 9e-14 off: every rotation is
    now exact in its own orthonormal plane."""
    rng = np.random.default_rng(seed)
    W = ul.random_unitary(4, dtype="float64", rng=rng)
    a, b = rng.standard_normal((2, 4, 3))
    V = ul.exp_transport(W, a, b, t=1e11)
    assert orthogonality(V) < 1e-14


def test_real_exp_core_orthogonal_for_far_apart_angles(rng):
    """Rotation angles 1e-12 apart from 1e12 (it was 4.6e-12 off, the complex
    path 6e-16)."""
    n = 4
    W = ul.random_unitary(n, dtype="float64", rng=rng)
    a, b = rng.standard_normal((2, n, 3))
    a[:, 0] *= 1e-6
    a[:, 1] *= 1e6
    V = ul.exp_transport(W, a, b, t=1.0)
    assert orthogonality(V) < 1e-14
    Vc = ul.exp_transport(W + 0j, a + 0j, b + 0j, t=1.0)
    np.testing.assert_allclose(V, Vc.real, atol=1e-9)


@pytest.mark.parametrize("scale", [1e150, 1e300])
def test_huge_factors_give_a_unitary_polar_factor(rng, scale):
    W = ul.random_unitary(2, dtype="float64", rng=rng)
    a, b = rng.standard_normal((2, 2, 1))
    V = ul.project_unitary_lowrank(W, a * scale, b * scale)
    assert np.all(np.isfinite(V)) and orthogonality(V) < 1e-14


def test_huge_float32_factors_give_a_unitary_step(rng):
    W = ul.random_unitary(8, dtype="float32", rng=rng)
    ga, gb = rng.standard_normal((2, 8, 1)).astype(np.float32)
    for variant in ("tangent", "direct"):
        V = ul.projunn_step(W, (ga * np.float32(1e38), gb), lr=1e-8, rank=1, variant=variant, rng=0)
        assert np.all(np.isfinite(V)) and orthogonality(V) < tol("float32")


@pytest.mark.parametrize("shape", [(8, 8), (8, 3), (3, 8)])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("scale", [1e-39, 1e-40, 1e-42])
def test_subnormal_32_bit_gradients_leave_w_in_place(backend, rng, shape, dtype, scale):
    """Gradients (and factors) of float32's subnormal range: the panels'
    balancing asked for 2**133 and more, Inf in float32, and every variant
    returned NaN without a word; the transports and the low-rank polar
    factor likewise. The step is far below rounding: W comes back."""
    W = ul.random_unitary(*shape, dtype=dtype, rng=rng)
    G = (rng.standard_normal(shape) * scale).astype(dtype)
    a = (rng.standard_normal((shape[0], 2)) * scale).astype(dtype)
    b, c = rng.standard_normal((shape[1], 2)).astype(dtype), rng.standard_normal((shape[0], 2)).astype(dtype)
    W_, G_, a_, b_, c_ = (backend.asarray(x) for x in (W, G, a, b, c))
    results = [ul.projunn_step(W_, G_, lr=0.5, rank=2, variant=variant, rng=0)
               for variant in ("tangent", "direct", "cayley")]
    results += [ul.project_unitary_lowrank(W_, a_, b_)]
    results += [f(W_, a_, c_) for f in (ul.exp_transport, ul.cayley_transport)]  # n x k factors
    for V in results:
        V = backend.to_numpy(V)
        assert np.all(np.isfinite(V))
        np.testing.assert_allclose(V, W, atol=tol("float32"))


@pytest.mark.parametrize("shape", [(8, 3), (3, 8)])
def test_subnormal_32_bit_gradients_are_no_reason_to_refuse_a_rectangular_w(shape):
    """W times a panel of subnormal entries rounds to the subnormal grid: the
    rectangular steps compared |W z| with |z| on such panels and refused a
    unitary W ("W is not unitary") for about one seed in sixty. The panels W
    multiplies are rescaled first; over many draws no step is refused and W
    comes back."""
    failures = []
    for seed in range(60):
        for scale in (1e-39, 1e-40, 1e-42):
            rng = np.random.default_rng(seed)
            W = ul.random_unitary(*shape, dtype="float32", rng=rng)
            G = (rng.standard_normal(shape) * scale).astype(np.float32)
            for variant in ("tangent", "direct", "cayley"):
                try:
                    V = ul.projunn_step(W, G, lr=0.5, rank=2, variant=variant, rng=0)
                except ValueError as error:
                    failures.append((seed, scale, variant, str(error)[:40]))
                    continue
                np.testing.assert_allclose(V, W, atol=tol("float32"))
    assert not failures, failures


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_huge_dense_step_is_unitary(rng, variant):
    W = ul.random_unitary(16, dtype="float64", rng=rng)
    G = rng.standard_normal((16, 16)) * 1e150
    V = ul.projunn_step(W, G, lr=1e10, rank=2, variant=variant, rng=0)
    assert np.all(np.isfinite(V)) and orthogonality(V) < 1e-13


@pytest.mark.parametrize("shape", [(8, 8), (8, 3), (3, 8), (2, 8, 3)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_w_is_named(backend, rng, shape, bad):
    """Every call that takes W names its NaN or Inf (a rectangular W, which
    the transports read only in their update, gave a NaN result without a
    word, and so did tangent_project for any W), and changes nothing."""
    W = ul.random_unitary(*shape[-2:], dtype="float64", rng=rng) * np.ones(shape)
    W.flat[5] = bad
    n, m = shape[-2:]
    a, b = rng.standard_normal((2, n, 1))
    G = rng.standard_normal(shape)
    W_, a_, b_, G_ = (backend.asarray(x, "float32") for x in (W, a, b, G))
    before = backend.to_numpy(W_).copy()
    calls = [lambda: ul.exp_transport(W_, a_, b_, t=0.1), lambda: ul.cayley_transport(W_, a_, b_, t=0.1),
             lambda: ul.tangent_project(W_, G_), lambda: ul.projunn_step(W_, G_, lr=0.1, rng=0),
             lambda: ul.projunn_step(W_, G_, lr=0.1, variant="direct", rng=0)]
    if n == m:
        calls += [lambda: ul.project_unitary_lowrank(W_, a_, b_), lambda: ul.projunn_step(W_, (a_, b_), lr=0.1, rng=0)]
    for call in calls:
        with pytest.raises(ValueError, match=r"^W contains NaN or Inf: 1 non-finite entry"):
            call()
    np.testing.assert_array_equal(backend.to_numpy(W_), before)


@pytest.mark.parametrize("make", ["half", "kaiming"])
def test_w_that_is_not_unitary_is_refused_with_its_error(rng, make):
    Q = ul.random_unitary(32, dtype="float64", rng=rng)
    W = 0.5 * Q if make == "half" else rng.uniform(-1, 1, (32, 32)) / np.sqrt(32)
    G = rng.standard_normal((32, 32))
    a, b = rng.standard_normal((2, 32, 2))
    for call in (lambda: ul.projunn_step(W, G, lr=0.1, rng=0),
                 lambda: ul.projunn_step(W, G, lr=0.1, variant="direct", rng=0),
                 lambda: ul.project_unitary_lowrank(W, a, b),
                 lambda: ul.exp_transport(W, a, b, t=0.1)):
        with pytest.raises(ValueError, match=r"W is not unitary \(orthogonal\): \|W x\|\^2 differs from \|x\|\^2 by up to [0-9.e+-]+"):
            call()


def test_slightly_drifted_w_is_accepted_and_not_made_worse(rng):
    """Drift (here 1e-6) is the optimizers' business: the step multiplies W by
    a unitary matrix, so W's error stays where it was."""
    W = ul.random_unitary(32, dtype="float64", rng=rng) + 1e-6 * rng.standard_normal((32, 32))
    before = orthogonality(W)
    V = ul.projunn_step(W, rng.standard_normal((32, 32)), lr=0.1, rank=2, rng=0)
    assert orthogonality(V) < 1.5 * before


def test_a_step_on_a_torch_parameter_returns_plain_values():
    """``projunn_step(param, param.grad)`` gives new values for W, not a tensor
    tracked by autograd (whose graph would grow step after step)."""
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import unitary_parameter

    W = unitary_parameter(8, dtype=torch.float64)
    (W.sum() ** 2).backward()
    for call in (lambda: ul.projunn_step(W, W.grad, lr=0.1, rng=0),
                 lambda: ul.projunn_step(W, (W.grad[:, :2], W.grad[:, 2:4]), lr=0.1, rng=0),
                 lambda: ul.exp_transport(W, W.grad[:, :1], W.grad[:, 1:2], t=0.1),
                 lambda: ul.project_unitary_lowrank(W, W.grad[:, :1], W.grad[:, 1:2])):
        V = call()
        assert not V.requires_grad and V.grad_fn is None


# PyTorch lazily scripts its forward-mode decompositions at the first jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_forward_mode_dual_input_gives_plain_values_too():
    """A forward-mode dual tensor (``torch.autograd.forward_ad``) is detached
    as a tensor that requires grad is: the results carry no tangent and
    equal the plain call's. The tangent went through the kernels' device
    products but not through their small factorizations on the host, and
    came back wrong without a word (exp_transport's 1.5 off against the
    finite difference)."""
    torch = pytest.importorskip("torch")
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(11)
    W = ul.random_unitary(6, dtype="float64", xp=torch, rng=11)
    a, b = (torch.randn(6, 2, dtype=torch.float64, generator=gen) for _ in range(2))
    G = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    calls = {
        "exp_transport": (lambda W, a, b, G: ul.exp_transport(W, a, b, t=0.3), (0, 1, 2)),
        "cayley_transport": (lambda W, a, b, G: ul.cayley_transport(W, a, b, t=0.3), (0, 1, 2)),
        "project_unitary_lowrank": (lambda W, a, b, G: ul.project_unitary_lowrank(W, a, b), (0, 1, 2)),
        "projunn_step": (lambda W, a, b, G: ul.projunn_step(W, G, lr=0.1, rank=2, rng=0), (0, 3)),
        "projunn_step of factors": (lambda W, a, b, G: ul.projunn_step(W, (a, b), lr=0.1, rank=2, rng=0), (0, 1)),
        "randomized_svd": (lambda W, a, b, G: ul.randomized_svd(G, 2, rng=0), (3,)),
    }
    inputs = (W, a, b, G)
    for name, (call, positions) in calls.items():
        expected = call(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for position in positions:
            with fwAD.dual_level():
                dual = fwAD.make_dual(inputs[position], torch.ones_like(inputs[position]))
                result = call(*(dual if i == position else x for i, x in enumerate(inputs)))
                for got, want in zip(result if isinstance(result, tuple) else (result,), expected):
                    primal, tangent = fwAD.unpack_dual(got)
                    assert tangent is None, (name, position)
                    assert torch.equal(primal, want), (name, position)


def _ill_conditioned_gradient(rng, n, m, k, dtype, spread):
    """An exact rank-k gradient whose singular values spread over ``spread``."""
    s = np.logspace(0, -np.log10(spread), k)
    a, b = rng.standard_normal((n, k)) * s, rng.standard_normal((m, k))
    if dtype.startswith("complex"):
        a, b = a + 1j * rng.standard_normal((n, k)) * s, b + 1j * rng.standard_normal((m, k))
    return (a @ b.conj().T).astype(dtype)


@pytest.mark.parametrize("dtype", ["float64", "complex128", "float32"])
@pytest.mark.parametrize("shape", [(48, 48), (60, 15), (15, 60)])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("power_iters", [0, 1])
@pytest.mark.parametrize("step", [1.0, 1e6])
def test_an_ill_conditioned_gradient_keeps_w_orthonormal(dtype, shape, variant, power_iters, step):
    """A gradient whose singular values spread over 1e10 gives a sketch whose
    panels are ill-conditioned, and the step's bases Q = P T, made from the
    panels' Gram matrices, depart from orthonormal columns by about eps
    cond(P)^2, not eps cond(P): one Newton-Schulz step where three were
    needed left float64 results at ||W^H W - I|| = 1e-7 to 5e-7 (square W,
    lr ||G|| = 100), and the direct step on a rectangular W, whose part
    outside W's range had no Newton-Schulz step at all, at 2e-4. Square W
    must stay orthonormal to rounding; rectangular W, whose direct step
    also orthogonalises against W's range once, within 2e4 eps
    (power_iters=1) and 1e6 eps (power_iters=0, measured up to 6e5 eps)."""
    n, m = shape
    k = 6
    eps = np.finfo(np.float32 if dtype == "float32" else np.float64).eps
    worst = 0.0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        W = ul.random_unitary(n, m, dtype=dtype, rng=seed)
        G = _ill_conditioned_gradient(rng, n, m, k, dtype, 1e10)
        lr = step / np.linalg.norm(G.astype(np.complex128), 2)
        V = ul.projunn_step(W, G, lr=lr, rank=k, variant=variant, power_iters=power_iters, rng=seed)
        assert np.all(np.isfinite(V))
        worst = max(worst, orthogonality(V if n >= m else np.conj(V).T))
    if n == m:
        bound = 64 * eps
    elif dtype == "float32":  # one rounding of a float32 panel, against a Gram factored in float64
        bound = 2e4 * eps
    else:
        bound = (2e4 if power_iters else 1e6) * eps
    assert worst < bound, worst / eps


def _dense_step(W, G, lr, variant):
    """The step along the exact gradient G in float64/complex128 (SciPy):
    tangent ``expm(-lr/2 A) W``, cayley ``(I + lr/2 A)^-1 (I - lr/2 A) W``
    with A = G W^H - W G^H, direct ``polar(W - lr G)``."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    W, G = (np.asarray(x, dtype=np.complex128) for x in (W, G))
    if variant == "direct":
        return scipy_linalg.polar(W - lr * G)[0]
    A = G @ W.conj().T - W @ G.conj().T
    identity = np.eye(W.shape[0])
    if variant == "tangent":
        return scipy_linalg.expm(-lr / 2 * A) @ W
    return np.linalg.solve(identity + lr / 2 * A, (identity - lr / 2 * A) @ W)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("shape", [(40, 40), (60, 15)])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("spread, power_iters", [(1e4, 0), (1e10, 1), (1e10, 2)])
def test_an_ill_conditioned_gradient_of_the_sketch_rank_is_captured_exactly(dtype, shape, variant, spread,
                                                                            power_iters):
    """A gradient of rank k, sketched with k columns, is its own rank-k
    truncation: the step is the step along G itself. The projector the step
    built from the Gram of an ill-conditioned sketch Y was off by eps
    cond(Y)^2, which made float64 steps 2e-5 (singular values spread over
    1e4, no power iteration) and 7e-6 (1e10, one) away from it, at lr ||G|| = 1;
    the sketch's last panel is now re-based on the device too."""
    n, m = shape
    k = 6
    for seed in range(2):
        rng = np.random.default_rng(seed)
        W = ul.random_unitary(n, m, dtype=dtype, rng=seed)
        G = _ill_conditioned_gradient(rng, n, m, k, dtype, spread)
        lr = 1 / np.linalg.norm(G, 2)
        V = ul.projunn_step(W, G, lr=lr, rank=k, variant=variant, power_iters=power_iters, rng=seed)
        assert np.max(np.abs(V - _dense_step(W, G, lr, variant))) < 1e-12


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_a_32_bit_gradient_of_lower_rank_than_the_sketch_is_captured(dtype, power_iters):
    """A rank-1 float32 gradient sketched with 8 columns (n = 8): the sketch's
    other columns are rounding, which the re-based panel shows as columns
    shorter than 1/sqrt(2) and the step drops. Kept (after the power
    iteration amplified them), they made the step 4e-4 away from the step
    along G, in every seed; now it is as close as a rank-1 sketch's."""
    n = 8
    errors = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        W = ul.random_unitary(n, dtype=dtype, rng=seed)
        x, y = rng.standard_normal((2, n, 1)) + (1j * rng.standard_normal((2, n, 1)) if dtype == "complex64" else 0)
        G = (x @ y.conj().T).astype(dtype)
        lr = 1 / np.linalg.norm(G.astype(np.complex128), 2)
        V = ul.projunn_step(W, G, lr=lr, rank=n, power_iters=power_iters, rng=seed)
        errors.append(np.max(np.abs(V - _dense_step(W, G, lr, "tangent"))))
    assert max(errors) < 2e-6, max(errors)


@pytest.mark.parametrize("transport", ["exp_transport", "cayley_transport"])
@pytest.mark.parametrize("t", [1.0, 1e3])
def test_real_core_orthogonal_for_many_planes_of_spread_angles(transport, t):
    """A generator of seven planes whose angles spread from 1e3 t down to
    1e-4 t: each plane orthonormalised on its own left planes of close small
    angles about 1e-6 from orthogonal to each other, and the result up to
    1.6e5 eps from orthogonal; the planes are now orthonormalised together."""
    worst = 0.0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        W = ul.random_unitary(16, dtype="float64", rng=rng)
        a = rng.standard_normal((16, 7)) * np.logspace(3, -4, 7)
        b = rng.standard_normal((16, 7))
        worst = max(worst, orthogonality(getattr(ul, transport)(W, a, b, t=t)))
    assert worst < 32 * np.finfo(np.float64).eps, worst


@pytest.mark.parametrize("scale", [1e152, 1e200, 1e300, 1e-200])
def test_a_huge_or_tiny_gradient_at_the_inverse_lr_takes_the_unit_step(backend, scale):
    """lr G and t X are what a step moves by; their factors may each be far
    from 1. Clamped one by one (at 1e150), the panels' scale of a gradient of
    1e200 gave a step of 1e-50 at lr = 1e-200 (W unchanged) and at 1e152 one
    0.6 astray, without a word; a gradient of 1e-200 at lr = 1e200 too."""
    if not backend.has_float64:
        pytest.skip("a 64-bit range is needed")
    rng = np.random.default_rng(3)
    for shape in ((8, 8), (8, 3), (3, 8)):
        for dtype in ("float64", "complex128"):
            W = ul.random_unitary(*shape, dtype=dtype, rng=rng)
            G = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if dtype == "complex128" else 0)
            a, b = rng.standard_normal((2, shape[0], 2))
            Wb, Gb = backend.asarray(W), backend.asarray(G.astype(dtype))
            for variant in ("tangent", "direct", "cayley"):
                expected = ul.projunn_step(W, G, lr=0.7, rank=2, variant=variant, rng=1)
                got = ul.projunn_step(Wb, Gb * scale, lr=0.7 / scale, rank=2, variant=variant, rng=1)
                np.testing.assert_allclose(backend.to_numpy(got), expected, atol=tol(dtype, 8), err_msg=variant)
            if shape[0] != shape[1]:
                continue
            A, B = backend.asarray(a * scale), backend.asarray(b)
            for transport in (ul.exp_transport, ul.cayley_transport):
                expected = transport(W.real if dtype == "float64" else W, a, b, t=0.5)
                got = transport(backend.asarray(W.real if dtype == "float64" else W), A, B, t=0.5 / scale)
                np.testing.assert_allclose(backend.to_numpy(got), expected, atol=tol(dtype, 8))


@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_the_traced_step_takes_the_unit_step_of_a_huge_gradient_at_the_inverse_lr(variant):
    import array_api_compat.numpy as xp

    from unitary_lr.steps import sketch_matrix, step_unchecked

    rng = np.random.default_rng(4)
    for rank in (1, 3):
        W = ul.random_unitary(12, dtype="float64", rng=rng)
        G = rng.standard_normal((12, 12))
        omega = sketch_matrix(xp, (12, rank), dtype=W.dtype, device="cpu", rng=5)
        expected = step_unchecked(xp, W, G, omega, lr=0.7, rank=rank, variant=variant, power_iters=1, traced=True)
        for scale in (1e200, 1e-200):
            got = step_unchecked(xp, W, G * scale, omega, lr=0.7 / scale, rank=rank, variant=variant, power_iters=1,
                                 traced=True)
            np.testing.assert_allclose(got, expected, atol=1e-13, err_msg=f"rank {rank}, scale {scale}")
