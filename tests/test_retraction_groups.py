"""projunn_retraction and the parameters it picks over a run: groups added
after it was built (their weight decay is warned about once), and parameters
that lose their unitary mark since (a swap conversion) stay retracted."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.torch import ProjUNN, is_unitary, mark_unitary, orthogonal, projunn_retraction  # noqa: E402

DECAY = r"param group {} of the AdamW holds unitary parameters and has weight_decay=0.01: decay is meaningless"


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def unitarity_error(W):
    """||W^H W - I||_F / sqrt(n) in float64 NumPy, independent of the library."""
    W = W.detach().numpy().astype(np.complex128)
    return float(np.linalg.norm(W.conj().T @ W - np.eye(W.shape[-1])) / np.sqrt(W.shape[-1]))


def layer(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return orthogonal(torch.nn.Linear(6, 6, bias=False, dtype=dtype))


def step(opt, modules, i, dtype=torch.float64):
    opt.zero_grad()
    x = torch.randn(3, 6, dtype=dtype, generator=seeded(100 + i))
    sum(m(x).pow(2).sum() for m in modules).backward()
    opt.step()


def decay_warnings(record):
    return [w for w in record if "weight_decay" in str(w.message)]


# ------------------------------------------------- weight decay of later groups


def test_a_group_added_later_with_weight_decay_is_warned_about_once_at_its_first_step():
    """A unitary parameter in a group added with add_param_group (AdamW's
    default weight_decay=0.01) was retracted without the warning that the
    groups present at construction get."""
    a, b, plain = layer(0), layer(1), torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decay at construction: no warning
        opt = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.0)
        retraction = projunn_retraction(opt, rank=2, seed=0)
        opt.add_param_group({"params": list(plain.parameters()), "weight_decay": 0.01})  # not unitary: no warning
        step(opt, (a, plain), 0)
    opt.add_param_group({"params": list(b.parameters()), "weight_decay": 0.01})  # group 2
    with pytest.warns(UserWarning, match=DECAY.format(2)) as record:
        for i in range(1, 4):
            step(opt, (a, b, plain), i)
        opt.load_state_dict(opt.state_dict())  # new group dicts, the same groups: not warned again
        step(opt, (a, b, plain), 4)
    (warning,) = decay_warnings(record)
    assert warning.filename == __file__  # the line that called opt.step()
    assert retraction.state[b.weight]["steps"] == 4
    assert unitarity_error(a.weight) < 1e-12 and unitarity_error(b.weight) < 1e-12


def test_the_weight_decay_warning_is_given_once_per_group_and_before_the_step_moves_anything():
    a, b = layer(0), layer(1)
    with pytest.warns(UserWarning, match=DECAY.format(0)) as record:
        opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
        projunn_retraction(opt, rank=2, seed=0)
        step(opt, (a,), 0)
    (warning,) = decay_warnings(record)
    assert warning.filename == __file__  # the line that built the retraction
    opt.add_param_group({"params": list(b.parameters())})
    B = b.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=DECAY.format(1)):
            step(opt, (a, b), 1)
    assert torch.equal(b.weight.detach(), B) and b.weight not in opt.state
    with pytest.warns(UserWarning, match=DECAY.format(1)) as record:
        step(opt, (a, b), 2)
        step(opt, (a, b), 3)
    assert len(decay_warnings(record)) == 1


# --------------------------------------------- parameters that lose their mark


@contextlib.contextmanager
def swapping():
    """module.to() swaps new contents into the same Parameter object,
    which drops the UnitaryParameter class, the mark."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def float32_run(stepped, swap=True, **options):
    """A float32 layer, SGD and the retraction, ``stepped`` steps, then
    ``.double()``, under a swap conversion (which unmarks the weight) or not."""
    m = layer(0, torch.float32)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    retraction = projunn_retraction(opt, rank=2, seed=0, **options)
    for i in range(stepped):
        step(opt, (m,), i, torch.float32)
    W = m.weight
    with swapping() if swap else contextlib.nullcontext():
        m.double()
    assert m.weight is W and m.weight.dtype == torch.float64 and is_unitary(W) is not swap
    return m, opt, retraction


@pytest.mark.parametrize("stepped", [0, 1])
def test_a_retracted_parameter_unmarked_by_a_swap_conversion_stays_retracted(stepped):
    """It was dropped from the retraction without a word: the SGD's raw
    updates took it 0.8 away from unitary in three steps. It is retracted as
    the marked parameter of a conversion without swap is, re-projected at its
    first float64 step."""
    m, opt, retraction = float32_run(stepped)
    twin, twin_opt, _ = float32_run(stepped, swap=False)
    W = m.weight.detach().clone()
    assert unitarity_error(W) > 1e-9  # float32 rounding
    for i in range(stepped, stepped + 3):
        step(opt, (m,), i)
        step(twin_opt, (twin,), i)
    assert unitarity_error(m.weight) < 1e-12 and not torch.equal(m.weight.detach(), W)
    assert torch.equal(m.weight.detach(), twin.weight.detach())
    state = retraction.state[m.weight]
    assert (state["steps"], state["reprojections"], state["precision"]) == (stepped + 3, 1, "float64")


def test_an_unmarked_retracted_parameter_keeps_its_state_dict_and_explicit_params_are_kept_too():
    m, opt, retraction = float32_run(2)
    step(opt, (m,), 2)
    saved = retraction.state_dict()
    assert sorted(saved["state"]) == [0] and saved["state"][0]["steps"] == 3
    retraction.load_state_dict(saved)  # (refused: "not retracted")
    assert retraction.state_dict() == saved
    # a run resumed from the checkpoint by a retraction built after the conversion
    resumed = layer(0, torch.float32)
    with swapping():
        resumed.double()
    resumed.load_state_dict(m.state_dict())
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed_retraction = projunn_retraction(resumed_opt, rank=2, seed=1)
    with pytest.raises(ValueError, match=r"\[0\]: the optimizer's parameter 0 \(shape \(6, 6\)\) is not retracted: "
                                         r"it is not marked unitary \(mark_unitary marks it\)"):
        resumed_retraction.load_state_dict(saved)
    mark_unitary(resumed.weight)
    resumed_retraction.load_state_dict(saved)
    for i in range(3, 6):
        step(opt, (m,), i)
        step(resumed_opt, (resumed,), i)
    assert torch.equal(resumed.weight.detach(), m.weight.detach()) and unitarity_error(m.weight) < 1e-12
    # params= picks by identity: kept, marked or not, and nothing else is
    chosen, other = float32_run(0, params=None)[0], layer(1)
    opt = torch.optim.SGD([*chosen.parameters(), *other.parameters()], lr=0.05)
    retraction = projunn_retraction(opt, rank=2, seed=0, params=[chosen.weight])
    O = other.weight.detach().clone()
    for i in range(3):
        step(opt, (chosen, other), i)
    assert unitarity_error(chosen.weight) < 1e-12 and list(retraction.state) == [chosen.weight]
    assert not torch.equal(other.weight.detach(), O) and unitarity_error(other.weight) > 1e-4  # SGD's own steps


def test_projunn_keeps_a_parameter_unmarked_by_a_swap_conversion_in_its_unitary_group():
    m = layer(0, torch.float32)
    opt = ProjUNN(m.parameters(), lr=0.05, rank=2, seed=0)
    with swapping():
        m.double()
    assert not is_unitary(m.weight)
    for i in range(3):
        step(opt, (m,), i)
    assert unitarity_error(m.weight) < 1e-12



def test_a_wrapper_without_step_hooks_is_named_with_the_optimizer_it_wraps():
    """accelerate's AcceleratedOptimizer (what Accelerator.prepare and the
    Trainer's callbacks hand over) is an Optimizer by class but never runs
    Optimizer.__init__: registering the hooks failed with a bare
    AttributeError. A TypeError names the wrapper and its .optimizer, and the
    wrapped optimizer is retracted as any."""
    from unitary_lr.torch import OrthogonalLinear

    class Wrapper(torch.optim.Optimizer):  # accelerate's pattern: no super().__init__
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self, closure=None):
            return self.optimizer.step(closure)

    layer = OrthogonalLinear(6, 6, dtype=torch.float64)
    wrapped = Wrapper(torch.optim.SGD(layer.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"^optimizer \(Wrapper\) is a wrapper without the step hooks of a "
                                        r"torch.optim.Optimizer, which the retraction uses: pass the optimizer "
                                        r"it wraps, its .optimizer \(SGD\)$"):
        projunn_retraction(wrapped, rank=2, seed=0)
    projunn_retraction(wrapped.optimizer, rank=2, seed=0)
    for _ in range(3):
        layer(torch.ones(2, 6, dtype=torch.float64)).pow(2).sum().backward()
        wrapped.step()
        wrapped.optimizer.zero_grad()
    weight = layer.weight.detach().numpy()
    assert np.abs(weight.T @ weight - np.eye(6)).max() < 1e-12
    accelerate = pytest.importorskip("accelerate")
    prepared = accelerate.Accelerator(cpu=True).prepare(torch.optim.SGD(layer.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"^optimizer \(AcceleratedOptimizer\) is a wrapper .* its .optimizer \(SGD\)$"):
        projunn_retraction(prepared, rank=2, seed=0)
