"""SVDAdapter: Delta W = U diag(s) V^H with U, V kept orthonormal by ProjUNN."""

import copy
import io
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from _aten import AtenOps  # noqa: E402

from unitary_lr import unitarity_error  # noqa: E402
from unitary_lr.torch import (  # noqa: E402
    HouseholderAdapter,
    ProjUNN,
    SVDAdapter,
    adapter_state_dict,
    add_householder_adapters,
    add_svd_adapters,
    is_unitary,
    load_adapter_state_dict,
    trainable_parameters,
)

SHAPES = [(6, 6), (5, 9), (9, 5)]  # (out_features, in_features)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def linear(n_in, n_out, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


def numpy_of(tensor):
    return tensor.detach().resolve_conj().numpy()


def reference_delta(adapter):
    """U diag(s) V^H from the parameters, in complex128 NumPy."""
    U, V, s = (numpy_of(p).astype(np.complex128) for p in (adapter.U, adapter.V, adapter.s))
    return U @ np.diag(s) @ V.conj().T


def real_if_real(array, dtype):
    return array if dtype.is_complex else array.real


def randomize_s(adapter, seed=1):
    with torch.no_grad():
        adapter.s.copy_(torch.randn(adapter.s.shape, dtype=adapter.s.dtype, generator=generator(seed)))


def orthonormality(matrix):
    """||M^H M - I||_F / sqrt(m) in float64 NumPy, independent of the library."""
    M = numpy_of(matrix).astype(np.complex128)
    return np.linalg.norm(M.conj().T @ M - np.eye(M.shape[1])) / np.sqrt(M.shape[1])


def snapshot(model):
    return {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == flag, name


@pytest.mark.parametrize(("n_out", "n_in"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64])
def test_identity_at_init_with_orthonormal_marked_factors(n_out, n_in, bias, dtype):
    layer = linear(n_in, n_out, dtype=dtype, bias=bias)
    original = copy.deepcopy(layer)
    rank = min(n_out, n_in) - 1
    adapted = SVDAdapter(layer, rank=rank, generator=generator(0))
    x = torch.randn(2, 3, n_in, dtype=dtype)
    assert torch.equal(adapted(x), original(x))
    assert adapted.base is layer and not any(p.requires_grad for p in layer.parameters())
    assert adapted.U.shape == (n_out, rank) and adapted.V.shape == (n_in, rank) and adapted.s.shape == (rank,)
    assert adapted.U.dtype == adapted.V.dtype == adapted.s.dtype == dtype
    assert torch.all(adapted.s == 0)
    tolerance = 1e-6 if dtype in (torch.float32, torch.complex64) else 1e-14
    for factor in (adapted.U, adapted.V):
        assert factor.requires_grad and is_unitary(factor)
        assert orthonormality(factor) < tolerance
    assert [name for name, p in adapted.named_parameters() if p.requires_grad] == ["U", "V", "s"]


@pytest.mark.parametrize(("n_out", "n_in"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_forward_matches_dense_reference(n_out, n_in, dtype, rank):
    adapted = SVDAdapter(linear(n_in, n_out, dtype=dtype), rank=rank, generator=generator(2))
    randomize_s(adapted)
    delta = real_if_real(reference_delta(adapted), dtype)
    np.testing.assert_allclose(adapted.delta_weight().numpy(), delta, atol=1e-13, rtol=0)
    # the singular values of Delta W are |s|: U and V are orthonormal
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False)[:rank],
                               np.sort(np.abs(numpy_of(adapted.s)))[::-1], atol=1e-13, rtol=0)
    x = torch.randn(2, 4, n_in, dtype=dtype)
    W0, b = numpy_of(adapted.base.weight), numpy_of(adapted.base.bias)
    expected = x.numpy() @ (W0 + delta).T + b
    np.testing.assert_allclose(numpy_of(adapted(x)), expected, atol=1e-13, rtol=0)


def test_float32_forward_against_float64_reference():
    adapted = SVDAdapter(linear(20, 12, dtype=torch.float32), rank=4, generator=generator(3))
    randomize_s(adapted)
    x = torch.randn(7, 20)
    out = numpy_of(adapted(x) - adapted.base(x))
    np.testing.assert_allclose(out, x.double().numpy() @ reference_delta(adapted).real.T, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_forward_and_backward_never_form_an_n_out_by_n_in_matrix(dtype):
    n_out, n_in, batch, rank = 64, 48, 4, 2
    adapted = SVDAdapter(linear(n_in, n_out, dtype=dtype), rank=rank, generator=generator(4))
    randomize_s(adapted)
    x = torch.randn(batch, n_in, dtype=dtype)
    with AtenOps() as mode:
        adapted.delta(x).abs().sum().backward()
    assert all(p.grad is not None for p in (adapted.U, adapted.V, adapted.s))
    assert mode.largest_output <= batch * n_out < n_out * n_in  # rows of the batch, never Delta W


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_merge_unmerge_round_trip(dtype):
    adapted = SVDAdapter(linear(9, 5, dtype=dtype), rank=3, generator=generator(4))
    randomize_s(adapted)
    weight = adapted.base.weight.detach().clone()
    x = torch.randn(6, 9, dtype=dtype)
    expected = adapted(x).detach()
    assert adapted.merge() is adapted and adapted.merged
    merged_weight = adapted.base.weight.detach().clone()
    delta = torch.from_numpy(real_if_real(reference_delta(adapted), dtype)).to(dtype)
    torch.testing.assert_close(merged_weight, weight + delta)
    torch.testing.assert_close(adapted(x), expected)
    torch.testing.assert_close(adapted(x), adapted.base(x))  # the plain layer: Delta W is in the weight
    with pytest.raises(ValueError, match=r"already merged \(merged=True\)"):
        adapted.merge()
    assert torch.equal(adapted.base.weight, merged_weight) and adapted.merged
    assert adapted.unmerge() is adapted and not adapted.merged
    torch.testing.assert_close(adapted.base.weight, weight, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"not merged \(merged=False\)"):
        adapted.unmerge()
    torch.testing.assert_close(adapted(x), expected)


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float32, 1e-6), (torch.float64, 1e-14),
                                                 (torch.complex64, 1e-6)])
def test_projunn_training_reduces_the_loss_and_keeps_the_factors_orthonormal(dtype, rounding):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 16, dtype=dtype), nn.Tanh() if not dtype.is_complex else nn.Identity(),
                          nn.Linear(16, 4, dtype=dtype))
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a rank-2 change of the first layer
        teacher[0].weight.add_(0.5 * torch.randn(16, 2, dtype=dtype) @ torch.randn(2, 12, dtype=dtype))
    add_svd_adapters(model, target_modules=["0"], rank=2, generator=generator(6))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = ProjUNN(model.parameters(), lr=2e-2)
    unitary = [group["params"] for group in optimizer.param_groups if group["unitary"]]
    assert len(unitary) == 1 and {id(p) for p in unitary[0]} == {id(model[0].U), id(model[0].V)}
    x = torch.randn(64, 12, dtype=dtype, generator=generator(7))
    target = teacher(x).detach()
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = (model(x) - target).abs().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        for factor in (model[0].U, model[0].V):
            assert float(unitarity_error(factor.detach())) < rounding
            assert orthonormality(factor) < rounding
    assert losses[-1] < 0.3 * losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None, name
    # Delta W is an exact SVD: its singular values are |s|
    s = np.sort(np.abs(numpy_of(model[0].s)))[::-1]
    singular_values = torch.linalg.svdvals(model[0].delta_weight())[:2].numpy()
    np.testing.assert_allclose(singular_values, s, rtol=10 * rounding, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradients_are_those_of_the_dense_weight(dtype):
    """dL/dconj(U) = G V diag(conj s), dL/dconj(V) = G^H U diag(s),
    dL/dconj(s) = diag(U^H G V), with G the gradient of the same loss with
    respect to the dense weight W0 + U diag(s) V^H."""
    adapted = SVDAdapter(linear(7, 5, dtype=dtype), rank=3, generator=generator(8))
    x = torch.randn(6, 7, dtype=dtype, generator=generator(9))
    target = torch.randn(6, 5, dtype=dtype, generator=generator(10))
    for randomized in (False, True):  # at s = 0 only s has a gradient
        if randomized:
            randomize_s(adapted, seed=11)
        for p in adapted.parameters():
            p.grad = None
        (adapted(x) - target).abs().square().sum().backward()
        dense = (adapted.base.weight + adapted.delta_weight()).detach().requires_grad_()
        (x @ dense.T + adapted.base.bias - target).abs().square().sum().backward()
        G, U, V, s = (numpy_of(t) for t in (dense.grad, adapted.U, adapted.V, adapted.s))
        np.testing.assert_allclose(numpy_of(adapted.U.grad), G @ V @ np.diag(s.conj()), atol=1e-12, rtol=0)
        np.testing.assert_allclose(numpy_of(adapted.V.grad), G.conj().T @ U @ np.diag(s), atol=1e-12, rtol=0)
        np.testing.assert_allclose(numpy_of(adapted.s.grad), np.diag(U.conj().T @ G @ V), atol=1e-12, rtol=0)
        assert np.abs(numpy_of(adapted.s.grad)).min() > 1e-6
        if randomized:
            assert np.abs(numpy_of(adapted.U.grad)).max() > 1e-6 and np.abs(numpy_of(adapted.V.grad)).max() > 1e-6
        else:
            assert not adapted.U.grad.any() and not adapted.V.grad.any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradients_match_finite_differences(dtype):
    adapted = SVDAdapter(linear(5, 4, dtype=dtype), rank=2, generator=generator(13))
    randomize_s(adapted)
    x = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    names = ("U", "V", "s")
    params = [getattr(adapted, name).detach().clone().requires_grad_() for name in names]

    def forward(x, *params):
        return torch.func.functional_call(adapted, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *params))


def test_bad_rank_and_layer_raise_and_change_nothing():
    layer = linear(6, 4)
    before = snapshot(layer)
    for bad in (0, -1, 5):
        with pytest.raises(ValueError, match=rf"rank must be between 1 and 4 = min\(out_features, in_features\) "
                                             rf"of Linear\(in_features=6, out_features=4, bias=True\), got {bad}"):
            SVDAdapter(layer, rank=bad)
    for bad, shown in ((2.0, "float: 2.0"), (True, "bool: True"), ("2", "str: '2'")):
        with pytest.raises(TypeError, match=rf"rank must be an integer, got {shown}"):
            SVDAdapter(layer, rank=bad)
    with pytest.raises(TypeError, match=r"linear must be a torch.nn.Linear, got Conv1d"):
        SVDAdapter(nn.Conv1d(2, 2, 3), rank=1)
    assert_unchanged(layer, before)

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"rank must be between 1 and 2 .* got 3"):
        add_svd_adapters(model, rank=3)  # fits layer 0, not layer 2
    with pytest.raises(ValueError, match=r"no torch.nn.Linear of the model matches target_modules=\['q'\]"):
        add_svd_adapters(model, target_modules=["q"], rank=1)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got list"):
        add_svd_adapters([model], rank=1)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert_unchanged(model, before)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.q(x) + self.k(x) * self.v(x))


def model_of_blocks():
    torch.manual_seed(8)
    return nn.Sequential(Block(), Block(), nn.Linear(8, 3))


def test_add_svd_adapters_by_name_with_counts():
    model = model_of_blocks()
    x = torch.randn(5, 8)
    expected = model(x)
    assert add_svd_adapters(model, target_modules=r"(0\.q|2)", rank=2) is model
    found = {name for name, m in model.named_modules() if isinstance(m, SVDAdapter)}
    assert found == {"0.q", "2"}
    assert torch.equal(model(x), expected)
    trainable = (8 + 8) * 2 + 2 + (3 + 8) * 2 + 2
    total = sum(p.numel() for p in model_of_blocks().parameters()) + trainable
    assert trainable_parameters(model) == (trainable, total)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        "0.q.U", "0.q.V", "0.q.s", "2.U", "2.V", "2.s"}


def test_svd_and_householder_adapters_in_one_model():
    model = add_householder_adapters(model_of_blocks(), target_modules=["q"], reflectors=1)
    add_svd_adapters(model, rank=2)  # every other Linear; the wrapped ones stay as they are
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (SVDAdapter,
                                                                                           HouseholderAdapter))}
    assert kinds == {"0.q": "HouseholderAdapter", "1.q": "HouseholderAdapter", "0.k": "SVDAdapter",
                     "0.v": "SVDAdapter", "1.k": "SVDAdapter", "1.v": "SVDAdapter", "2": "SVDAdapter"}
    assert all(type(m.base) is nn.Linear for m in model.modules() if isinstance(m, (SVDAdapter, HouseholderAdapter)))
    assert set(adapter_state_dict(model)) == (
        {f"{b}.q.{p}" for b in "01" for p in ("reflectors_out", "reflectors_in", "sigma")}
        | {f"{b}.{l}.{p}" for b in "01" for l in "kv" for p in "UVs"} | {"2.U", "2.V", "2.s"})
    with pytest.raises(ValueError, match=r"no torch.nn.Linear of the model matches target_modules=None"):
        add_svd_adapters(model, rank=1)


def test_adapter_state_dict_round_trip():
    model = add_svd_adapters(model_of_blocks(), target_modules=["q", "v"], rank=3, generator=generator(9))
    optimizer = ProjUNN(model.parameters(), lr=1e-2)
    for _ in range(3):  # trained factors, not the initial ones
        optimizer.zero_grad()
        model(torch.randn(4, 8, generator=generator(14))).square().sum().backward()
        optimizer.step()
    state = adapter_state_dict(model)
    assert set(state) == {f"{b}.{l}.{p}" for b in "01" for l in "qv" for p in "UVs"}
    assert {tuple(state[key].shape) for key in ("0.q.U", "0.q.V")} == {(8, 3)} and state["0.q.s"].shape == (3,)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    fresh = add_svd_adapters(model_of_blocks(), target_modules=["q", "v"], rank=3, generator=generator(11))
    x = torch.randn(3, 8)
    assert not torch.allclose(fresh(x), model(x))
    load_adapter_state_dict(fresh, loaded)
    assert torch.equal(fresh(x), model(x))
    assert is_unitary(fresh[0].q.U) and is_unitary(fresh[1].v.V)  # loading keeps the marks


def test_load_refuses_factors_that_are_not_orthonormal():
    model = add_svd_adapters(model_of_blocks(), target_modules=["q"], rank=2, generator=generator(12))
    state = adapter_state_dict(model)
    before = snapshot(model)
    # valid s and factors, but for one factor scaled by 2
    bad = {**{k: v + 1 if k.endswith(".s") else v for k, v in state.items()}, "1.q.V": 2 * state["1.q.V"]}
    with pytest.raises(ValueError, match=re.escape("adapter state dict entry '1.q.V' must have orthonormal "
                                                   "columns: its unitarity error ||W^H W - I||_F / sqrt(m) is "
                                                   "3, above the tolerance 0.0001 of float32")):
        load_adapter_state_dict(model, bad)
    assert_unchanged(model, before)
    model[0].q.merge()
    with pytest.raises(ValueError, match=r"unmerge\(\) the adapters \['0.q'\] before loading"):
        load_adapter_state_dict(model, state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_into_a_half_precision_model_names_the_entry_and_changes_nothing(dtype):
    """A model made bfloat16 after its adapters were added (its forward pass
    runs): the orthonormality check of the loaded U refused it as "W has dtype
    torch.bfloat16", naming neither the entry nor the function. The error
    names the entry and the dtype, and the model is unchanged; loaded before
    the conversion, the same state loads."""
    state = adapter_state_dict(add_svd_adapters(model_of_blocks(), target_modules=["q"], rank=2,
                                                generator=generator(12)))
    model = add_svd_adapters(model_of_blocks(), target_modules=["q"], rank=2, generator=generator(13)).to(dtype)
    assert model(torch.randn(2, 8, dtype=dtype)).dtype == dtype
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(f"adapter state dict entry '0.q.U' is for an orthonormal factor "
                                                  f"of dtype {dtype}, whose orthonormality cannot be checked")):
        load_adapter_state_dict(model, state)
    assert_unchanged(model, before)
    model = add_svd_adapters(model_of_blocks(), target_modules=["q"], rank=2, generator=generator(13))
    load_adapter_state_dict(model, state)
    model.to(dtype)
    assert torch.equal(model[1].q.V.detach(), state["1.q.V"].to(dtype))


def test_generator_makes_initialisation_reproducible_across_precisions():
    a, b = (SVDAdapter(linear(7, 5), rank=3, generator=generator(12)) for _ in range(2))
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    c = SVDAdapter(linear(7, 5), rank=3, generator=generator(13))
    assert not torch.allclose(a.U, c.U)
    single = SVDAdapter(linear(7, 5, dtype=torch.float32), rank=3, generator=generator(12))
    torch.testing.assert_close(single.U.double(), a.U.detach(), atol=1e-7, rtol=0)
    torch.manual_seed(3)
    d = SVDAdapter(linear(7, 5, seed=3), rank=3)
    torch.manual_seed(3)
    e = SVDAdapter(linear(7, 5, seed=3), rank=3)
    assert torch.equal(d.U, e.U)


def test_repr_names_the_rank():
    assert "rank=2, merged=False" in repr(SVDAdapter(linear(4, 3), rank=2))
