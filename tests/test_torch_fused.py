"""The torch optimizer's fused base rules (``unitary_lr.torch._fused``): the
same directions and moments as the framework-free rules of
:mod:`unitary_lr.optim`, and, in the CPU's eager form (buffers kept by the
optimizer), the state changed only when the step is certain, keeping its
tensors, with nothing allocated."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from _aten import AtenOps  # noqa: E402

from unitary_lr.optim import make_rule  # noqa: E402
from unitary_lr.torch import ProjUNN, unitary_parameter  # noqa: E402
from unitary_lr.torch._fused import fused_direction  # noqa: E402

RULES = [("rmsprop", {"alpha": 0.9, "eps": 1e-8}), ("adam", {"betas": (0.8, 0.95), "eps": 1e-8}), ("sgd", {}),
         ("rmsprop", {"alpha": 0.9, "eps": 1e-8, "maximize": True}),
         ("adam", {"betas": (0.8, 0.95), "eps": 1e-8, "amsgrad": True}),
         ("adam", {"betas": (0.8, 0.95), "eps": 1e-8, "amsgrad": True, "maximize": True}),
         ("sgd", {"maximize": True})]
RULE_IDS = ["-".join([name, *(key for key in hyper if key in ("amsgrad", "maximize"))]) for name, hyper in RULES]


@pytest.mark.parametrize(("base", "hyper"), RULES, ids=RULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("in_buffers", [False, True])
def test_fused_rule_gives_the_generic_rule(base, hyper, dtype, in_buffers):
    """Five steps of each rule on fresh gradients: the fused direction and the
    moments equal the generic rule's to rounding. In buffers, the stored
    state changes only in ``commit()``, which gives the same tensor objects
    the new values, and the buffers made at the first step serve every later
    one."""
    import array_api_compat

    generator = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, dtype=dtype, generator=generator)
    xp = array_api_compat.array_namespace(W)
    rule = make_rule(base, **hyper)
    generic = rule.init(xp, W, "modulus")
    fused = {key: (value.clone() if isinstance(value, torch.Tensor) else value) for key, value in generic.items()}
    scratch, buffers = {}, None
    for _ in range(5):
        grad = torch.randn(6, 6, dtype=dtype, generator=generator)
        expected, generic = rule.direction(xp, grad, W, generic, mode="modulus", weight_decay=False)
        before = {key: (value, value.clone()) for key, value in fused.items() if isinstance(value, torch.Tensor)}
        if not in_buffers:
            direction, fused = fused_direction(rule, grad, W, fused, mode="modulus", weight_decay=False)
        else:
            direction, new_state, commit = fused_direction(rule, grad, W, fused, mode="modulus", weight_decay=False,
                                                           scratch=scratch)
            for key, (tensor, values) in before.items():  # nothing written before the commit
                assert fused[key] is tensor and torch.equal(tensor, values)
            if commit is not None:  # None: a rule without moments (SGD)
                commit()
            fused = new_state
            for key, (tensor, _) in before.items():
                assert fused[key] is tensor
            if buffers is not None:
                assert {key: id(value) for key, value in scratch.items()} == buffers
            buffers = {key: id(value) for key, value in scratch.items()}
        torch.testing.assert_close(direction, expected, rtol=1e-13, atol=1e-15)
        for key, value in generic.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(fused[key], value, rtol=1e-13, atol=1e-15)
            else:
                assert fused[key] == value
    # (SGD keeps a buffer only for the negated gradient of maximize)
    assert (len(scratch) > 0) == (in_buffers and (base != "sgd" or hyper.get("maximize", False)))


@pytest.mark.parametrize("base", ["rmsprop", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_eager_cpu_step_allocates_no_tensor_of_the_parameters_size(base, dtype):
    """An eager ``ProjUNN`` step on the CPU makes no new tensor of the
    parameter's size (``torch.optim.RMSprop`` makes one, Adam two): the new
    moments and the direction go to buffers kept from step to step, and the
    state keeps its tensor objects. Before, a new n x n tensor per step was
    page-faulted back from the system: a third of a step at n = 512."""
    n = 40
    W = unitary_parameter(n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    opt = ProjUNN([W], lr=1e-3, base=base, rank=1, seed=0)
    W.grad = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(1))
    opt.step()
    state = {key: value for key, value in opt.state[W].items() if isinstance(value, torch.Tensor)}
    values = {key: value.clone() for key, value in state.items()}
    with AtenOps() as ops:
        opt.step()
    assert ops.new_tensors(n * n) == []
    assert {key: value for key, value in opt.state[W].items() if isinstance(value, torch.Tensor)} == state
    assert all(not torch.equal(state[key], values[key]) for key in state)  # ... holding the new moments


@pytest.mark.parametrize(("base", "scale", "options"), [
    ("rmsprop", 1e20, {}), ("adam", 1e22, {}), ("rmsprop", 1e20, {"maximize": True}),
    ("adam", 1e22, {"maximize": True, "amsgrad": True})], ids=["rmsprop", "adam", "rmsprop-maximize", "adam-amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("capturable", [False, True])
def test_a_gradient_whose_square_overflows_the_moments_is_not_silent(base, scale, options, dtype, capturable):
    """|g|^2 beyond float32 made the moments Inf, and every later direction 0
    there, without a word. Now the eager step is refused, naming the cause
    and changing nothing; a capturable step is skipped and counted. A large
    gradient whose squares fit is stepped as usual, and so is the next
    finite gradient."""
    n = 16
    W = unitary_parameter(n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    opt = ProjUNN([W], lr=1e-2, base=base, capturable=capturable, **options)
    generator = torch.Generator().manual_seed(1)
    W.grad = torch.randn(n, n, dtype=dtype, generator=generator)
    opt.step()
    before = W.detach().clone()
    state = {key: value.clone() for key, value in opt.state[W].items() if isinstance(value, torch.Tensor)}
    W.grad = scale * torch.randn(n, n, dtype=dtype, generator=generator)
    if capturable:
        opt.step()
        assert int(opt.state[W]["skipped_steps"]) == 1
    else:
        with pytest.raises(ValueError, match=rf"too large for the {base} rule's moments in {str(dtype)[6:]} "
                                             r"\(largest \|entry\| [0-9.e+]+: its square overflows\); scale"):
            opt.step()
    assert torch.equal(W.detach(), before)
    for key, value in state.items():
        if key != "skipped_steps":
            assert torch.equal(opt.state[W][key], value), key
    W.grad = scale * 1e-4 * torch.randn(n, n, dtype=dtype, generator=generator)
    opt.step()
    assert not torch.equal(W.detach(), before)
    assert all(bool(torch.isfinite(value).all()) for value in opt.state[W].values() if isinstance(value, torch.Tensor))


@pytest.mark.parametrize(("base", "options"), [
    ("rmsprop", {}), ("adam", {}), ("sgd", {}), ("rmsprop", {"maximize": True}),
    ("adam", {"amsgrad": True, "maximize": True}), ("sgd", {"maximize": True})],
    ids=["rmsprop", "adam", "sgd", "rmsprop-maximize", "adam-amsgrad-maximize", "sgd-maximize"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_eager_step_with_new_state_tensors_matches_the_one_in_buffers(base, options, dtype, monkeypatch):
    """The eager flow a GPU takes (new state tensors, no buffers), run here on
    the CPU: the same parameter and moments as the CPU's flow in buffers,
    step after step."""
    from unitary_lr.torch import optimizer

    runs = []
    for in_buffers in (True, False):
        monkeypatch.setattr(optimizer, "_uses_scratch", lambda group, p, flag=in_buffers: flag)
        W = unitary_parameter(12, dtype=dtype, generator=torch.Generator().manual_seed(0))
        opt = ProjUNN([W], lr=1e-2, base=base, rank=2, seed=4, **options)
        generator = torch.Generator().manual_seed(5)
        for _ in range(4):
            W.grad = torch.randn(12, 12, dtype=dtype, generator=generator)
            opt.step()
        runs.append((W.detach().clone(), {key: value.clone() for key, value in opt.state[W].items()
                                          if isinstance(value, torch.Tensor)}))
    (W_buffers, state_buffers), (W_new, state_new) = runs
    torch.testing.assert_close(W_new, W_buffers, rtol=0, atol=1e-14)
    assert state_new.keys() == state_buffers.keys()
    for key, value in state_buffers.items():
        torch.testing.assert_close(state_new[key], value, rtol=1e-14, atol=0)


@pytest.mark.parametrize("base", ["rmsprop", "adam"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_a_refused_step_leaves_no_trace_in_the_buffers(base, dtype):
    """A step refused after the rule wrote its buffers (NaN in the gradient)
    changes nothing: the next steps give, bit for bit, the parameter and the
    moments of a run that never saw it."""
    runs = []
    for refused in (False, True):
        W = unitary_parameter(10, dtype=dtype, generator=torch.Generator().manual_seed(0))
        opt = ProjUNN([W], lr=1e-2, base=base, rank=2, seed=3)
        generator = torch.Generator().manual_seed(4)
        grads = [torch.randn(10, 10, dtype=dtype, generator=generator) for _ in range(3)]
        for i, grad in enumerate(grads):
            if refused and i == 1:
                bad = grad.clone()
                bad[3, 4] = float("nan")
                W.grad = bad
                with pytest.raises(ValueError, match="NaN"):
                    opt.step()
            W.grad = grad
            opt.step()
        runs.append((W.detach().clone(), {key: value.clone() for key, value in opt.state[W].items()
                                          if isinstance(value, torch.Tensor)}))
    (W_clean, state_clean), (W_refused, state_refused) = runs
    assert torch.equal(W_refused, W_clean)
    assert state_refused.keys() == state_clean.keys()
    for key, value in state_clean.items():
        assert torch.equal(state_refused[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_square_root_of_the_eager_step(dtype):
    """The eager CPU step's square root (``_fused._sqrt``) is NumPy's,
    correctly rounded, where torch would run it on one thread: no aten
    operation, and the result equal to NumPy's bit for bit, within one ulp
    of torch's. With more threads and a tensor torch splits between them,
    and without a buffer (a GPU's step), torch's own."""
    import numpy as np

    from unitary_lr.torch._fused import _GRAIN_SIZE, _sqrt

    generator = torch.Generator().manual_seed(1)
    v = torch.rand(256, 256, dtype=dtype, generator=generator) * 10.0 ** torch.randint(-30, 30, (256, 256),
                                                                                      generator=generator)
    v = v.to(dtype)
    v[0, :3] = torch.tensor([0.0, float("inf"), 1e-300 if dtype == torch.float64 else 1e-40])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = torch.empty_like(v)
        with AtenOps() as ops:
            result = _sqrt(v, out)
        assert result is out and not [op for op in ops.ops if "sqrt" in op.name]
        np.testing.assert_array_equal(out.numpy(), np.sqrt(v.numpy()))
        reference = torch.sqrt(v)
        assert float(((out - reference).abs() / torch.finfo(dtype).eps / out.abs().clamp_min(1e-300))[1:].max()) <= 1
        assert float(out[0, 1]) == float("inf") and float(out[0, 0]) == 0.0
        torch.set_num_threads(2)
        for x, buffer in [(v, torch.empty_like(v)), (v[:100, :100].contiguous(), None)]:
            with AtenOps() as ops:
                _sqrt(x, buffer)
            assert [op.name for op in ops.ops if "sqrt" in op.name] == ["aten.sqrt.out" if buffer is not None
                                                                        else "aten.sqrt.default"]
        assert v.numel() >= _GRAIN_SIZE
        with AtenOps() as ops:
            _sqrt(v[:100, :100].contiguous(), torch.empty(100, 100, dtype=dtype))  # below the grain: NumPy's
        assert not [op for op in ops.ops if "sqrt" in op.name]
    finally:
        torch.set_num_threads(threads)
