"""unitary_lr.torch.ProjUNN on plain (non-unitary) parameters: torch.optim's own
updates, state and machinery (schedulers, hooks, zero_grad, state_dict), and
``unitary_lr_scale``, the one-line form of a smaller unitary learning rate."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import unitary_lr as ul
from unitary_lr.torch import ProjUNN, UnitaryRNN, unitary_parameter

REFERENCE = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}
# Every base-rule option ProjUNN takes (torch.optim's fused and differentiable
# have no counterpart in its rules).
SETTINGS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2, "maximize": True}),
    ("rmsprop", {}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-6, "weight_decay": 1e-2}),
    ("rmsprop", {"centered": True, "momentum": 0.5, "maximize": True}),
    ("adam", {}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2}),
    ("adam", {"amsgrad": True, "maximize": True, "weight_decay": 1e-2}),
    ("adam", {"amsgrad": True, "weight_decay": 1e-1, "decoupled_weight_decay": True}),
]
IDS = [f"{base}-{'-'.join(hyper) or 'defaults'}" for base, hyper in SETTINGS]


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def plain_parameters(dtype, seed=0):
    """A matrix, a batch of matrices and a vector: real or complex."""
    g = seeded(seed)
    shapes = [(6, 5), (2, 4, 4), (7,)]
    return [torch.nn.Parameter(torch.randn(shape, dtype=dtype, generator=g)) for shape in shapes]


def clones(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def step_both(opt, reference, params, reference_params, *, steps=6, also=None, check=None):
    """``steps`` steps of both optimizers on the same fresh gradients
    (sometimes near zero: moments decay, centered RMSprop's v - g_avg^2 stays
    >= 0); ``also``, a parameter of ``opt`` alone, gets one too; ``check()``
    after each step."""
    data = seeded(1)
    for _ in range(steps):
        for p, q in zip(params, reference_params):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=data)
            q.grad = p.grad.clone()
        if also is not None:
            also.grad = torch.randn(also.shape, dtype=also.dtype, generator=data)
        opt.step()
        reference.step()
        if check is not None:
            check()


@pytest.mark.parametrize(("base", "hyper"), SETTINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_plain_updates_are_torch_optims_bit_for_bit(base, hyper, dtype):
    """Plain parameters (with a unitary one in the same optimizer) move exactly
    as torch.optim moves them, and their state is torch.optim's, key by key."""
    params = plain_parameters(dtype)
    reference_params = clones(params)
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded(9))
    opt = ProjUNN([*params, W], lr=3e-2, base=base, seed=0, **hyper)
    reference = REFERENCE[base](reference_params, lr=3e-2, **hyper)

    def bit_for_bit():
        for p, q in zip(params, reference_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)

    step_both(opt, reference, params, reference_params, also=W, check=bit_for_bit)
    for p, q in zip(params, reference_params):
        ours, theirs = opt.state[p], reference.state[q]
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key]), rtol=0, atol=0)
    assert float(ul.unitarity_error(W.detach())) < 1e-13


def numpy_adam(theta, grads, *, lr, betas, eps, weight_decay):
    """Adam with L2 weight decay in float64 NumPy, written from Kingma & Ba's
    algorithm; a complex parameter is a pair of real ones (torch.optim's
    convention), so the second moment is taken per component."""
    as_real = np.iscomplexobj(theta)
    pairs = (lambda z: np.stack([z.real, z.imag], -1)) if as_real else (lambda z: z)
    x = pairs(theta).astype(np.float64)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, grad in enumerate(grads, start=1):
        g = pairs(grad) + weight_decay * x
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        x = x - lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return x[..., 0] + 1j * x[..., 1] if as_real else x


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_plain_adam_matches_an_independent_numpy_reference(dtype):
    p = torch.nn.Parameter(torch.randn(3, 5, 4, dtype=dtype, generator=seeded(0)))
    theta = p.detach().numpy().copy()
    opt = ProjUNN([p], lr=1e-2, base="adam", betas=(0.85, 0.98), eps=1e-7, weight_decay=0.1)
    grads = [torch.randn(3, 5, 4, dtype=dtype, generator=seeded(s)) for s in range(1, 9)]
    for grad in grads:
        p.grad = grad
        opt.step()
    expected = numpy_adam(theta, [g.numpy() for g in grads], lr=1e-2, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.1)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("base", ["sgd", "rmsprop", "adam"])
def test_foreach_is_the_same_update(base):
    """foreach=True (one kernel per operation for the whole group) and the
    per-tensor loop agree to rounding, as in torch.optim."""
    hyper = {"sgd": {"momentum": 0.9}, "rmsprop": {"centered": True}, "adam": {}}[base]
    loop, grouped = plain_parameters(torch.float64), plain_parameters(torch.float64)
    opts = [ProjUNN(loop, lr=1e-2, base=base, foreach=False, **hyper),
            ProjUNN(grouped, lr=1e-2, base=base, foreach=True, **hyper)]
    for step in range(4):
        for params, opt in zip((loop, grouped), opts):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=seeded(10 * step + i))
            opt.step()
    for p, q in zip(loop, grouped):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_and_missing_gradients_as_in_torch_optim(set_to_none):
    """zero_grad(set_to_none=False) keeps zero gradients, which still step (the
    moments decay); None gradients are skipped: both as torch.optim does."""
    params = plain_parameters(torch.float32)
    reference_params = clones(params)
    opt = ProjUNN(params, lr=1e-2, base="adam")
    reference = torch.optim.Adam(reference_params, lr=1e-2)
    for step in range(4):
        for o in (opt, reference):
            o.zero_grad(set_to_none=set_to_none)
        for ps in (params, reference_params):  # after the first step, only the first parameter has a loss term
            sum((p**2).sum() for p in (ps if step == 0 else ps[:1])).backward()
        opt.step()
        reference.step()
        for p, q in zip(params, reference_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
            assert (p.grad is None) == (q.grad is None)
    assert float(opt.state[params[1]]["step"]) == (1 if set_to_none else 4)


def test_step_hooks_and_schedulers_work_as_on_torch_optim():
    params = plain_parameters(torch.float64)
    opt = ProjUNN(params, lr=0.1, base="sgd")
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        schedule.step()
        for p, b in zip(params, before):
            torch.testing.assert_close(p.detach(), b - 0.1 * 0.5**step, rtol=0, atol=1e-15)
    assert calls == [("pre", True), ("post", True)] * 3
    pre.remove()
    post.remove()
    opt.step()
    assert len(calls) == 6


def test_a_state_saved_with_int_steps_resumes_with_the_same_count():
    """Checkpoints from before plain groups were torch.optim's hold Adam's step
    as an int and no RMSprop step: they load and resume as the same run."""
    p, q = plain_parameters(torch.float64)[:2]
    p_ref, q_ref = clones([p, q])
    opt = ProjUNN([{"params": [p], "base": "adam"}, {"params": [q], "base": "rmsprop"}], lr=1e-2)
    reference = [torch.optim.Adam([p_ref], lr=1e-2), torch.optim.RMSprop([q_ref], lr=1e-2)]
    moments = torch.rand(p.shape, dtype=p.dtype, generator=seeded(5))
    opt.state[p] = {"step": 3, "exp_avg": moments.clone(), "exp_avg_sq": moments.square()}
    opt.state[q] = {"square_avg": torch.rand(q.shape, dtype=q.dtype, generator=seeded(6))}
    reference[0].state[p_ref] = {"step": torch.tensor(3.0), "exp_avg": moments.clone(), "exp_avg_sq": moments.square()}
    reference[1].state[q_ref] = {"step": torch.tensor(0.0), "square_avg": opt.state[q]["square_avg"].clone()}
    for step in range(2):
        for a, b in ((p, p_ref), (q, q_ref)):
            a.grad = torch.randn(a.shape, dtype=a.dtype, generator=seeded(20 + step))
            b.grad = a.grad.clone()
        opt.step()
        for r in reference:
            r.step()
    torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(q.detach(), q_ref.detach(), rtol=0, atol=0)
    assert float(opt.state[p]["step"]) == 5 and float(opt.state[q]["step"]) == 2


def test_a_failing_unitary_step_changes_no_plain_parameter():
    """All or nothing: the plain groups are stepped in place, so only after
    every unitary update was computed; one that fails leaves them as they were."""
    b = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded(0))
    opt = ProjUNN([b, W], lr=1e-2, base="adam", seed=0)
    with torch.no_grad():
        W.mul_(0.5)  # no longer unitary: the projUNN kernel refuses it
    b.grad, W.grad = torch.ones(5, dtype=torch.float64), torch.ones(8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"W is not unitary.*no parameter was changed"):
        opt.step()
    assert torch.equal(b.detach(), torch.ones(5, dtype=torch.float64)) and not opt.state[b]


def test_nan_in_a_plain_gradient_is_named_and_changes_nothing():
    params = plain_parameters(torch.float32)
    W = unitary_parameter(6, dtype=torch.float32, generator=seeded(3))
    opt = ProjUNN([*params, W], lr=1e-2, base="rmsprop", seed=0)
    for p in (*params, W):
        p.grad = torch.ones_like(p)
    params[1].grad[1, 2, 3] = float("nan")
    before = [p.detach().clone() for p in (*params, W)]
    with pytest.raises(ValueError, match=r"the gradient of param_groups\[0\]\['params'\]\[1\] \(shape \(2, 4, 4\)\) "
                                         r"contains NaN or Inf; no parameter was changed"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip((*params, W), before))
    assert not any(opt.state[p] for p in (*params, W))


# ------------------------------------------------------------ unitary_lr_scale


def test_unitary_lr_scale_is_the_two_group_recipe_in_one_line():
    """ProjUNN(model.parameters(), unitary_lr_scale=1/32) takes the same steps
    as the explicit two-group form of the README, and a scheduler keeps the
    ratio of the two learning rates."""
    def build(one_line):
        rnn = UnitaryRNN(3, 8, complex=True, dtype=torch.float64, generator=seeded(0))
        if one_line:
            opt = ProjUNN(rnn.parameters(), lr=1e-2, unitary_lr_scale=1 / 32, seed=4)
        else:
            others = [p for name, p in rnn.named_parameters() if name != "weight_hh"]
            opt = ProjUNN([{"params": others}, {"params": [rnn.weight_hh], "lr": 1e-2 / 32}], lr=1e-2, seed=4)
        return rnn, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)

    runs = [build(one_line) for one_line in (True, False)]
    assert [g["lr"] for g in runs[0][1].param_groups] == [1e-2, 1e-2 / 32]
    for step in range(3):
        x = torch.randn(5, 2, 3, dtype=torch.float64, generator=seeded(10 + step))
        for rnn, opt, schedule in runs:
            opt.zero_grad()
            rnn(x)[0].abs().square().mean().backward()
            opt.step()
            schedule.step()
    (rnn_a, opt_a, _), (rnn_b, _, _) = runs
    for (name, a), b in zip(rnn_a.named_parameters(), rnn_b.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, msg=name)
    lrs = [g["lr"] for g in opt_a.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(1 / 32, rel=1e-12) and lrs[0] == pytest.approx(1e-2 / 8)
    assert float(ul.unitarity_error(rnn_a.weight_hh.detach())) < 1e-13


def test_unitary_lr_scale_per_group_and_in_add_param_group():
    b = torch.nn.Parameter(torch.zeros(3))
    W1, W2, W3 = (unitary_parameter(4, generator=seeded(s)) for s in range(3))
    opt = ProjUNN([b, W1], lr=0.1, unitary_lr_scale=0.25)
    opt.add_param_group({"params": [W2]})                          # the optimizer's scale
    opt.add_param_group({"params": [W3], "unitary_lr_scale": 0.5})  # its own
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.025, 0.025, 0.05]
    explicit = ProjUNN([{"params": [b]}, {"params": [W1], "lr": 0.3}], lr=0.1, unitary_lr_scale=0.25)
    assert [g["lr"] for g in explicit.param_groups] == [0.1, 0.3]  # a group's own lr is kept
    assert [g["lr"] for g in ProjUNN([b, W1], lr=0.1).param_groups] == [0.1, 0.1]  # default scale 1


def test_unitary_lr_scale_bad_values():
    W = unitary_parameter(4, generator=seeded(0))
    for bad in (0, -1.0, math.inf, math.nan, True, "1/32"):
        with pytest.raises(ValueError, match=rf"ProjUNN: unitary_lr_scale must be a finite number > 0, got {bad!r}"
                           .replace("(", r"\(").replace(")", r"\)")):
            ProjUNN([W], unitary_lr_scale=bad)
    with pytest.raises(ValueError, match=r"param group 0 sets both lr \(0.1\) and unitary_lr_scale \(0.5\); set one"):
        ProjUNN([{"params": [W], "lr": 0.1, "unitary_lr_scale": 0.5}])
    with pytest.raises(ValueError, match=r"ProjUNN: foreach must be True, False or None, got 'yes'"):
        ProjUNN([W], foreach="yes")
    with pytest.raises(ValueError, match=r"foreach=True needs a number lr or capturable=True"):
        ProjUNN([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1), foreach=True)


@pytest.mark.parametrize(("base", "hyper"), SETTINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_capturable_plain_updates_follow_torch_optim(base, hyper, dtype):
    """A capturable optimizer steps its plain parameters by the library's own
    rules (torch.optim refuses capturable=True on the CPU), which follow
    torch.optim's: the same parameters to rounding, every option, complex
    parameters as pairs of reals. (Adam counts the steps in a float32
    tensor, as torch.optim's capturable Adam does; a 64-bit parameter's
    bias corrections are computed from it in float64: from the float32 count
    they were wrong by 1e-5 relative.)"""
    params = plain_parameters(dtype)
    reference_params = clones(params)
    opt = ProjUNN(params, lr=3e-2, base=base, capturable=True, **hyper)
    reference = REFERENCE[base](reference_params, lr=3e-2, **hyper)
    step_both(opt, reference, params, reference_params)
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
    if base == "adam":  # the count itself stays float32 (see _capturable_counters)
        assert all(opt.state[p]["step"].dtype == torch.float32 and int(opt.state[p]["step"]) == 6 for p in params)
