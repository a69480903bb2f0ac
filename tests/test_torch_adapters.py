import copy
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from unitary_lr.torch import (  # noqa: E402
    HouseholderAdapter,
    SVDAdapter,
    adapter_state_dict,
    add_householder_adapters,
    add_svd_adapters,
    load_adapter_state_dict,
    trainable_parameters,
)

SHAPES = [(6, 6), (5, 9), (9, 5)]  # (out_features, in_features)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def linear(n_in, n_out, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


def dense_reflections(V):
    """H(v_1) ... H(v_j) in complex128, one dense reflector after another."""
    V = np.asarray(V, dtype=np.complex128)
    P = np.eye(V.shape[0], dtype=np.complex128)
    for v in V.T:
        v = v[:, None]
        P = P @ (np.eye(len(v)) - 2 * (v @ v.conj().T) / (v.conj().T @ v))
    return P


def reference_delta(adapter):
    """Delta W = H_U[:, :p] diag(sigma) H_V[:, :p]^H from the parameters, in complex128."""
    U, V, sigma = (p.detach().resolve_conj().numpy() for p in (adapter.reflectors_out, adapter.reflectors_in,
                                                               adapter.sigma))
    p = len(sigma)
    return dense_reflections(U)[:, :p] @ np.diag(sigma) @ dense_reflections(V)[:, :p].conj().T


def randomize_sigma(adapter, seed=1):
    with torch.no_grad():
        adapter.sigma.copy_(torch.randn(adapter.sigma.shape, dtype=adapter.sigma.dtype, generator=generator(seed)))


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_identity_at_init(n_out, n_in, bias, dtype):
    layer = linear(n_in, n_out, dtype=dtype, bias=bias)
    original = copy.deepcopy(layer)
    adapted = HouseholderAdapter(layer, reflectors=2, generator=generator(0))
    x = torch.randn(2, 3, n_in, dtype=dtype)
    assert torch.equal(adapted(x), original(x))
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.all(adapted.sigma == 0)
    for reflectors in (adapted.reflectors_out, adapted.reflectors_in):
        assert reflectors.requires_grad
        torch.testing.assert_close(torch.linalg.vector_norm(reflectors, dim=0).real.double(),
                                   torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(("n_out", "n_in"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reflectors", [1, 3, 5])
def test_delta_matches_dense_reference(n_out, n_in, dtype, reflectors):
    adapted = HouseholderAdapter(linear(n_in, n_out, dtype=dtype), reflectors=reflectors, generator=generator(2))
    randomize_sigma(adapted)
    expected = reference_delta(adapted)
    if not dtype.is_complex:
        expected = expected.real
    np.testing.assert_allclose(adapted.delta_weight().numpy(), expected, atol=1e-13, rtol=0)
    x = torch.randn(4, n_in, dtype=dtype)
    out = (adapted(x) - adapted.base(x)).detach().numpy()
    np.testing.assert_allclose(out, x.numpy() @ expected.T, atol=1e-13, rtol=0)


def test_delta_float32_against_float64_reference():
    adapted = HouseholderAdapter(linear(20, 12, dtype=torch.float32), reflectors=4, generator=generator(3))
    randomize_sigma(adapted)
    x = torch.randn(7, 20)
    out = (adapted(x) - adapted.base(x)).detach().numpy()
    np.testing.assert_allclose(out, x.double().numpy() @ reference_delta(adapted).real.T, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_merge_unmerge_round_trip(dtype):
    adapted = HouseholderAdapter(linear(9, 5, dtype=dtype), reflectors=3, generator=generator(4))
    randomize_sigma(adapted)
    weight = adapted.base.weight.detach().clone()
    x = torch.randn(6, 9, dtype=dtype)
    expected = adapted(x).detach()
    assert adapted.merge() is adapted and adapted.merged
    merged_weight = adapted.base.weight.detach().clone()
    delta = reference_delta(adapted)
    delta = torch.from_numpy(delta if dtype.is_complex else delta.real).to(dtype)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_training_changes_only_the_adapter_and_reduces_the_loss(dtype):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 16, dtype=dtype), nn.Tanh() if not dtype.is_complex else nn.Identity(),
                          nn.Linear(16, 4, dtype=dtype))
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a rank-1 change: within reach of one reflector a side
        a, b = torch.randn(16, 1, dtype=dtype), torch.randn(1, 12, dtype=dtype)
        teacher[0].weight.add_(0.3 * a @ b)
    add_householder_adapters(model, target_modules=["0"], reflectors=1, generator=generator(6))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert set(adapter) == {"0.reflectors_out", "0.reflectors_in", "0.sigma"}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x = torch.randn(64, 12, dtype=dtype, generator=generator(7))
    target = teacher(x).detach()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = (model(x) - target).abs().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None, name
        else:
            assert not torch.equal(p, adapter[name]), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradients_match_finite_differences(dtype):
    adapted = HouseholderAdapter(linear(5, 4, dtype=dtype), reflectors=2, generator=generator(13))
    randomize_sigma(adapted)
    x = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    names = ("reflectors_out", "reflectors_in", "sigma")
    params = [getattr(adapted, name).detach().clone().requires_grad_() for name in names]

    def forward(x, *params):
        return torch.func.functional_call(adapted, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *params))


def test_bad_inputs_raise_and_change_nothing():
    layer = linear(6, 4)
    before = snapshot(layer)
    with pytest.raises(TypeError, match=r"linear must be a torch.nn.Linear, got Conv1d"):
        HouseholderAdapter(nn.Conv1d(2, 2, 3))
    for bad in (0, -1, 5):
        with pytest.raises(ValueError, match=rf"reflectors must be between 1 and 4 = min\(out_features, "
                                             rf"in_features\) of Linear\(.*\), got {bad}"):
            HouseholderAdapter(layer, reflectors=bad)
    with pytest.raises(TypeError, match=r"reflectors must be an integer, got float: 1.0"):
        HouseholderAdapter(layer, reflectors=1.0)
    assert_unchanged(layer, before)

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"reflectors must be between 1 and 2 .* got 3"):
        add_householder_adapters(model, reflectors=3)  # fits layer 0, not layer 2
    with pytest.raises(ValueError, match=r"no torch.nn.Linear of the model matches target_modules=\['q'\]"):
        add_householder_adapters(model, target_modules=["q"])
    with pytest.raises(ValueError, match=r"target_modules is not a valid regular expression"):
        add_householder_adapters(model, target_modules="(")
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


@pytest.mark.parametrize(("target_modules", "wrapped"), [
    (["q", "v"], {"0.q", "0.v", "1.q", "1.v"}),
    (r"1\.(q|k)", {"1.q", "1.k"}),
    (None, {"0.q", "0.k", "0.v", "1.q", "1.k", "1.v", "2"}),
])
def test_add_adapters_by_name(target_modules, wrapped):
    model = model_of_blocks()
    x = torch.randn(5, 8)
    expected = model(x)
    assert add_householder_adapters(model, target_modules=target_modules, reflectors=2) is model
    found = {name for name, m in model.named_modules() if isinstance(m, HouseholderAdapter)}
    assert found == wrapped
    assert torch.equal(model(x), expected)
    per_adapter = {"2": 8 * 2 + 3 * 2 + 3}
    trainable = sum(per_adapter.get(name, 8 * 2 * 2 + 8) for name in wrapped)
    total = sum(p.numel() for p in model_of_blocks().parameters()) + trainable
    assert trainable_parameters(model) == (trainable, total)


def test_a_second_call_wraps_no_layer_twice():
    model = add_householder_adapters(model_of_blocks(), target_modules=["q"])
    add_householder_adapters(model)
    found = {name for name, m in model.named_modules() if isinstance(m, HouseholderAdapter)}
    assert found == {"0.q", "0.k", "0.v", "1.q", "1.k", "1.v", "2"}
    assert all(type(m.base) is nn.Linear for m in model.modules() if isinstance(m, HouseholderAdapter))
    with pytest.raises(ValueError, match=r"no torch.nn.Linear of the model matches target_modules=None"):
        add_householder_adapters(model)


def test_subclasses_of_linear_are_left_and_named():
    """Only nn.Linear itself is wrapped (MultiheadAttention never calls its
    out_proj, a NonDynamicallyQuantizableLinear); a model whose matching
    layers are all subclasses was told "no torch.nn.Linear matches"."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4), nn.ReLU(), nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match=r"matches target_modules=None; the matching subclasses of it, '0' \(Scaled\), "
                                         r"'2.out_proj' \(NonDynamicallyQuantizableLinear\), are not wrapped"):
        add_householder_adapters(model)
    assert type(model[0]) is Scaled and type(model[2].out_proj) is not HouseholderAdapter


def test_shared_layer_gets_one_adapter():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    add_householder_adapters(model, reflectors=1)
    assert model["a"] is model["b"] and isinstance(model["a"], HouseholderAdapter)
    assert trainable_parameters(model) == (4 + 4 + 4, 20 + 12)


class Tied(nn.Module):
    """``a`` and ``b`` share one weight Parameter (weight tying, as language
    models tie embeddings and output layers); ``c`` has its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = (nn.Linear(6, 6, dtype=torch.float64) for _ in range(3))
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


ADD_TWO = [(add_householder_adapters, {"reflectors": 2}), (add_svd_adapters, {"rank": 2})]


def as_if_trained(model, seed=5):
    """Random diagonals (sigma, s) for every adapter of ``model``, as after training."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (HouseholderAdapter, SVDAdapter)):
                diagonal = module.sigma if isinstance(module, HouseholderAdapter) else module.s
                diagonal.copy_(torch.randn(diagonal.shape, dtype=diagonal.dtype, generator=generator(seed)))
                seed += 1


def dense_layer(module):
    """(W, b) of a Linear or an unmerged adapter in NumPy float64: its frozen W0 plus its own Delta W."""
    linear_ = module.base if isinstance(module, (HouseholderAdapter, SVDAdapter)) else module
    W = linear_.weight.detach().numpy().copy()
    if isinstance(module, HouseholderAdapter):
        W += reference_delta(module).real
    elif isinstance(module, SVDAdapter):
        U, V, s = (p.detach().numpy() for p in (module.U, module.V, module.s))
        W += U @ np.diag(s) @ V.T
    return W, linear_.bias.detach().numpy()


def tied_reference(model, x):
    """What ``Tied`` with adapters computes, from dense matrices: every layer its own W0 + Delta W."""
    h = x.numpy()
    for name, activation in (("a", np.tanh), ("b", np.tanh), ("c", lambda v: v)):
        W, b = dense_layer(getattr(model, name))
        h = activation(h @ W.T + b)
    return h


@pytest.mark.parametrize(("add", "size"), ADD_TWO)
def test_merge_refuses_adapters_on_tied_weights_and_changes_nothing(add, size):
    model = add(Tied(), **size, generator=generator(0))
    as_if_trained(model)
    assert model.a.base.weight is model.b.base.weight  # the adapters keep the tie
    x = torch.randn(4, 6, dtype=torch.float64, generator=generator(2))
    adapted = model(x).detach()
    # unmerged, each layer adds its own update to the one shared W0: right
    np.testing.assert_allclose(adapted.numpy(), tied_reference(model, x), rtol=0, atol=1e-12)
    before = snapshot(model)
    copied = copy.deepcopy(model)  # a copy keeps the tie, and knows it
    for adapter, other in ((model.a, "b.base.weight"), (model.b, "a.base.weight"), (copied.a, "b.base.weight")):
        with pytest.raises(ValueError, match=rf"is tied to '{re.escape(other)}' of the model .* Nothing was merged\. "
                                             r"The unmerged adapter's outputs are right"):
            adapter.merge()
    assert_unchanged(model, before)  # bitwise
    assert not model.a.merged and not model.b.merged and not copied.a.merged
    assert torch.equal(model(x), adapted)
    model.c.merge()  # a weight of its own merges
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)
    # untied as the error says, both merge, to the adapted model's output
    base = model.a.base
    base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    model.a.merge()
    model.b.merge()
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"tied to 'b\.base\.weight'"):  # the copy is not untied by that
        copied.a.merge()


def test_merge_refuses_an_adapter_tied_to_a_layer_left_plain():
    model = add_householder_adapters(Tied(), target_modules=["a", "c"], reflectors=2, generator=generator(0))
    as_if_trained(model)
    assert type(model.b) is nn.Linear and model.b.weight is model.a.base.weight
    x = torch.randn(4, 6, dtype=torch.float64, generator=generator(2))
    adapted = model(x).detach()
    np.testing.assert_allclose(adapted.numpy(), tied_reference(model, x), rtol=0, atol=1e-12)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"is tied to 'b\.weight' of the model"):
        model.a.merge()
    assert_unchanged(model, before)
    assert not model.a.merged
    assert torch.equal(model(x), adapted)
    # a language model's tied input embedding and output layer: only the output layer is a Linear
    torch.manual_seed(4)
    lm = nn.Sequential(nn.Embedding(10, 6, dtype=torch.float64), nn.Linear(6, 10, bias=False, dtype=torch.float64))
    lm[1].weight = lm[0].weight
    add_householder_adapters(lm, reflectors=2, generator=generator(1))
    as_if_trained(lm)
    tokens = torch.tensor([[1, 4, 9]])
    adapted, before = lm(tokens).detach(), snapshot(lm)
    with pytest.raises(ValueError, match=r"is tied to '0\.weight' of the model"):
        lm[1].merge()
    assert_unchanged(lm, before)
    assert not lm[1].merged
    assert torch.equal(lm(tokens), adapted)
    # a later call that wraps the plain layer too: the first adapter's error names its new place
    add_householder_adapters(model, target_modules=["b"], reflectors=1, generator=generator(3))
    with pytest.raises(ValueError, match=r"is tied to 'b\.base\.weight' of the model"):
        model.a.merge()
    with pytest.raises(ValueError, match=r"is tied to 'a\.base\.weight' of the model"):
        model.b.merge()


def test_merge_refuses_a_weight_sharing_memory_with_another_parameter():
    model = Tied()
    model.b.weight = nn.Parameter(model.a.weight.detach())  # another Parameter, the same memory: still tied
    add_householder_adapters(model, reflectors=2, generator=generator(0))
    as_if_trained(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"is tied to 'b\.base\.weight' of the model"):
        model.a.merge()
    assert_unchanged(model, before)
    assert not model.a.merged


@pytest.mark.parametrize(("add", "size"), ADD_TWO)
@pytest.mark.parametrize("layout", ["copied", "disjoint halves of one tensor", "one layer in two places"])
def test_untied_weights_merge_to_the_adapted_output(add, size, layout):
    model = Tied()
    if layout == "copied":
        model.b.weight = nn.Parameter(model.a.weight.detach().clone())
    elif layout == "disjoint halves of one tensor":  # one storage, no entry in common: not tied
        both = torch.randn(12, 6, dtype=torch.float64, generator=generator(6))
        model.a.weight, model.b.weight = nn.Parameter(both[:6]), nn.Parameter(both[6:])
    else:
        model.b = model.a  # one layer, one adapter: its merge is right
    add(model, **size, generator=generator(0))
    as_if_trained(model)
    x = torch.randn(4, 6, dtype=torch.float64, generator=generator(2))
    adapted = model(x).detach()
    np.testing.assert_allclose(adapted.numpy(), tied_reference(model, x), rtol=0, atol=1e-12)
    for name in ("a", "b", "c"):
        if not getattr(model, name).merged:
            getattr(model, name).merge()
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


def test_freeze_base_false_leaves_other_parameters_trainable():
    model = model_of_blocks()
    add_householder_adapters(model, target_modules=["q"], freeze_base=False)
    assert model[0].norm.weight.requires_grad and model[2].weight.requires_grad
    assert not model[0].q.base.weight.requires_grad


def test_adapter_state_dict_round_trip():
    model = add_householder_adapters(model_of_blocks(), target_modules=["q", "v"], reflectors=2,
                                     generator=generator(9))
    for module in model.modules():
        if isinstance(module, HouseholderAdapter):
            randomize_sigma(module, seed=10)
    state = adapter_state_dict(model)
    assert set(state) == {f"{b}.{l}.{p}" for b in "01" for l in "qv" for p in ("reflectors_out", "reflectors_in",
                                                                              "sigma")}
    fresh = add_householder_adapters(model_of_blocks(), target_modules=["q", "v"], reflectors=2,
                                     generator=generator(11))
    x = torch.randn(3, 8)
    assert not torch.allclose(fresh(x), model(x))
    load_adapter_state_dict(fresh, state)
    assert torch.equal(fresh(x), model(x))
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    assert all(torch.equal(a, b) for a, b in zip(torch.load(buffer).values(), state.values()))


def test_load_adapter_state_dict_errors_change_nothing():
    model = add_householder_adapters(model_of_blocks(), target_modules=["q"], reflectors=2)
    state = adapter_state_dict(model)
    before = snapshot(model)
    missing = {k: v for k, v in state.items() if k != "0.q.sigma"}
    with pytest.raises(ValueError, match=re.escape("missing keys ['0.q.sigma'], unexpected keys []")):
        load_adapter_state_dict(model, {k: v + 1 for k, v in missing.items()})
    wrong = {k: (v[:1] if k == "1.q.sigma" else v + 1) for k, v in state.items()}
    with pytest.raises(ValueError, match=r"entry '1.q.sigma' has shape \(1,\), the model's has shape \(8,\)"):
        load_adapter_state_dict(model, wrong)
    # NaN loaded silently (every output NaN after it), complex lost its imaginary part
    bad = {k: v + 1 for k, v in state.items()}
    bad["0.q.sigma"][3] = float("nan")
    with pytest.raises(ValueError, match=r"entry '0.q.sigma' \(shape \(8,\)\) contains NaN or Inf"):
        load_adapter_state_dict(model, bad)
    with pytest.raises(TypeError, match=r"entry '0.q.reflectors_in' is complex .* imaginary part would be dropped"):
        load_adapter_state_dict(model, {**state, "0.q.reflectors_in": state["0.q.reflectors_in"] + 1j})
    assert_unchanged(model, before)
    model[1].q.merge()
    with pytest.raises(ValueError, match=r"unmerge\(\) the adapters \['1.q'\] before loading"):
        load_adapter_state_dict(model, state)


def test_generator_makes_initialisation_reproducible():
    a, b = (HouseholderAdapter(linear(7, 5), reflectors=3, generator=generator(12)) for _ in range(2))
    assert torch.equal(a.reflectors_out, b.reflectors_out) and torch.equal(a.reflectors_in, b.reflectors_in)


NOT_TORCH_GENERATORS = [np.random.default_rng(0), 0, 5, "seed"]


@pytest.mark.parametrize("bad", NOT_TORCH_GENERATORS, ids=lambda g: type(g).__name__)
@pytest.mark.parametrize(("add", "size"), [(add_householder_adapters, {}), (add_svd_adapters, {"rank": 1})],
                         ids=["householder", "svd"])
def test_add_adapters_refuse_a_generator_that_is_not_a_torch_generator(add, size, bad):
    # torch.randn()/randint()'s argument-combination error, which did not name generator, after the first
    # nn.Linear had been frozen
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"^generator must be a torch.Generator or None, got "
                                        rf"{type(bad).__name__}: "):
        add(model, generator=bad, **size)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad", NOT_TORCH_GENERATORS, ids=lambda g: type(g).__name__)
@pytest.mark.parametrize(("adapter", "size"), [(HouseholderAdapter, {}), (SVDAdapter, {"rank": 1})],
                         ids=["householder", "svd"])
def test_adapters_refuse_a_generator_that_is_not_a_torch_generator(adapter, size, bad):
    layer = linear(4, 3)
    before = snapshot(layer)
    with pytest.raises(TypeError, match=rf"^generator must be a torch.Generator or None, got "
                                        rf"{type(bad).__name__}: "):
        adapter(layer, generator=bad, **size)
    assert_unchanged(layer, before)
    assert layer.weight.requires_grad and layer.bias.requires_grad  # not frozen


@pytest.mark.parametrize("make", [
    lambda size, g: HouseholderAdapter(linear(6, 5), reflectors=size, generator=g),
    lambda size, g: SVDAdapter(linear(6, 5), rank=size, generator=g),
    lambda size, g: add_householder_adapters(nn.Sequential(linear(6, 5)), reflectors=size, generator=g)[0],
    lambda size, g: add_svd_adapters(nn.Sequential(linear(6, 5)), rank=size, generator=g)[0],
], ids=["HouseholderAdapter", "SVDAdapter", "add_householder_adapters", "add_svd_adapters"])
@pytest.mark.parametrize("size", [np.int64(2), np.int32(2), np.uint8(2)], ids=lambda n: type(n).__name__)
def test_numpy_integer_sizes_are_sizes(make, size):
    # np.prod of a shape is a NumPy integer: "reflectors must be an integer, got int64: np.int64(2)"
    # (torch.nn.Linear, random_unitary and the optimizers take them)
    adapted, reference = make(size, generator(3)), make(2, generator(3))
    own = dict(adapted.named_parameters())
    expected = dict(reference.named_parameters())
    assert own.keys() == expected.keys()
    for name, parameter in expected.items():
        assert own[name].shape == parameter.shape and torch.equal(own[name], parameter), name
    width = (adapted.reflectors_out if isinstance(adapted, HouseholderAdapter) else adapted.U).shape[-1]
    assert width == 2 and type(width) is int
    assert "=2," in adapted.extra_repr()  # shown as the integer 2, not np.int64(2)


@pytest.mark.parametrize(("adapter", "name"), [(HouseholderAdapter, "reflectors"), (SVDAdapter, "rank")])
@pytest.mark.parametrize("bad", [True, np.True_, 2.0, np.float64(2.0), "2"], ids=repr)
def test_sizes_that_are_not_integers_are_still_refused(adapter, name, bad):
    layer = linear(6, 5)
    before = snapshot(layer)
    with pytest.raises(TypeError, match=rf"^{name} must be an integer, got {type(bad).__name__}: "):
        adapter(layer, **{name: bad})
    assert_unchanged(layer, before)


@pytest.mark.parametrize(("add", "name"), [(add_householder_adapters, "reflectors"), (add_svd_adapters, "rank")],
                         ids=["householder", "svd"])
@pytest.mark.parametrize("bad", [True, 2.0, np.float64(2.0), "2"], ids=repr)
@pytest.mark.parametrize("target_modules", [None, ["nothing"]], ids=["matched", "unmatched"])
def test_add_adapters_refuse_a_size_of_a_wrong_type_with_a_type_error(add, name, bad, target_modules):
    # with no layer matched it was the ValueError of no match, naming neither the size nor its type
    model = nn.Sequential(linear(6, 5), nn.ReLU())
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"^{name} must be an integer, got {type(bad).__name__}: "
                                        rf"{re.escape(repr(bad))}$"):
        add(model, target_modules=target_modules, **{name: bad})
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU]
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("add", "name"), [(add_householder_adapters, "reflectors"), (add_svd_adapters, "rank")],
                         ids=["householder", "svd"])
@pytest.mark.parametrize("bad", [0, -1, np.int64(6)], ids=repr)
def test_add_adapters_refuse_a_size_out_of_range_with_a_value_error(add, name, bad):
    model = nn.Sequential(linear(6, 5), nn.ReLU())
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^{name} must be between 1 and 5 = min\(out_features, in_features\) "
                                         rf"of .* got {re.escape(repr(bad))}$"):
        add(model, **{name: bad})
    assert_unchanged(model, before)


@pytest.mark.parametrize("used", [(0, 1), (0,), (1,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(7, 1), (7, 3), (2, 9, 8), (12, 12)])
def test_hand_written_wy_gradient_equals_autograd(dtype, shape, used):
    """The adapters' WY factors (``unitary_lr.torch._wy``) have a closed-form
    gradient; it equals autograd's through the generic code, on any cotangent
    of both factors or of one (the other's gradient is None, not zeros), with
    a zero column among the reflectors, and passes gradcheck."""
    import array_api_compat

    from unitary_lr.householder import wy_factors as generic
    from unitary_lr.torch._wy import wy_factors as hand_written

    torch.manual_seed(shape[-1])
    V = torch.randn(*shape, dtype=dtype)
    if shape[-1] > 2:
        V[..., 1] = 0  # the identity reflector: U's column and T's row and column drop out
    xp = array_api_compat.array_namespace(V)
    cotangents = [torch.randn(*shape, dtype=dtype), torch.randn(*shape[:-2], shape[-1], shape[-1], dtype=dtype)]
    gradients = []
    for factors in (generic, hand_written):
        leaf = V.clone().requires_grad_()
        U, minus_T = factors(xp, leaf)
        loss = sum(torch.sum(cotangents[i].conj() * (U, minus_T)[i]).real for i in used)
        (gradient,) = torch.autograd.grad(loss, leaf)
        gradients.append(gradient)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(gradients[1]).all()
    nonzero = torch.randn(*shape, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: hand_written(xp, v), (nonzero,))


# PyTorch lazily scripts its forward-mode decompositions at the first jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_hand_written_wy_gradient_refuses_second_derivatives():
    import array_api_compat

    from unitary_lr.torch._wy import wy_factors

    V = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    U, _ = wy_factors(array_api_compat.array_namespace(V), V)
    (gradient,) = torch.autograd.grad((U * V).sum(), V, create_graph=True)
    refused = "hand-written gradient is not differentiable: a second derivative"
    with pytest.raises(RuntimeError, match=refused):
        gradient.sum().backward()
    # through V alone (the incoming gradient needs none): it was a Hessian of
    # zeros, without a word; the first derivatives with create_graph=True
    # are the plain ones
    layer = HouseholderAdapter(torch.nn.Linear(4, 3, dtype=torch.float64), reflectors=1)
    with torch.no_grad():
        layer.sigma.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(u):
        return (torch.func.functional_call(layer, {"reflectors_out": u}, (x,)) ** 2).sum()

    u = layer.reflectors_out.detach().clone().requires_grad_()
    (first,) = torch.autograd.grad(loss(u), u, create_graph=True)
    (plain,) = torch.autograd.grad(loss(u), u)
    assert torch.equal(first.detach(), plain)
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.functional.hessian(loss, u.detach())
    # and every second derivative of the torch.func transforms, forward mode
    # included: forward over forward took U and T as constants and gave a
    # wrong Hessian without a word
    from torch.func import hessian, jacfwd, jacrev

    for second in (hessian, lambda f: jacfwd(jacfwd(f)), lambda f: jacrev(jacfwd(f)), lambda f: jacrev(jacrev(f))):
        with pytest.raises(RuntimeError, match=refused):
            second(loss)(u.detach())


# PyTorch lazily scripts its forward-mode decompositions at the first jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(7, 1), (7, 3), (2, 9, 8), (12, 12)])
def test_hand_written_wy_forward_mode_equals_generic(dtype, shape):
    """Forward-mode AD (``torch.func.jvp`` and ``torch.autograd.forward_ad``)
    of the hand-written factors equals that of the generic code, with a zero
    column among the reflectors; it raised NotImplementedError."""
    import array_api_compat
    import torch.autograd.forward_ad as fwAD

    from unitary_lr.householder import wy_factors as generic
    from unitary_lr.torch._wy import wy_factors as hand_written

    generator = torch.Generator().manual_seed(shape[-1])
    V = torch.randn(*shape, dtype=dtype, generator=generator)
    if shape[-1] > 2:
        V[..., 1] = 0
    tangent = torch.randn(*shape, dtype=dtype, generator=generator)
    xp = array_api_compat.array_namespace(V)
    single = dtype in (torch.float32, torch.complex64)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if single else {"rtol": 1e-10, "atol": 1e-12}
    (_, expected) = torch.func.jvp(lambda v: generic(xp, v), (V,), (tangent,))
    (_, functorch) = torch.func.jvp(lambda v: hand_written(xp, v), (V,), (tangent,))
    with fwAD.dual_level():
        dual = hand_written(xp, fwAD.make_dual(V, tangent))
        autograd = [fwAD.unpack_dual(factor).tangent for factor in dual]
    for got in (functorch, autograd):
        for factor, reference in zip(got, expected):
            assert factor.dtype == dtype
            torch.testing.assert_close(factor, reference, **tolerance)


def _compiled_against_eager(model, x, backend):
    """Output and gradients of ``torch.compile(model, fullgraph=True)`` and of
    model itself, for the loss sum |y|^2."""
    torch.compiler.reset()
    results = []
    for run in (torch.compile(model, backend=backend, fullgraph=True), model):
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's own notes (on array_api_compat's lru_cache)
            y = run(x)
            (y.abs() ** 2).sum().backward()
        results.append((y.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_compiled_adapter_matches_eager(dtype):
    """``torch.compile`` of a model holding an adapter: the WY factors'
    forward saved a view (of wy_core's powers of two) for backward, and
    Dynamo refused the model ("An intermediate tensor 'power' created inside
    a higher-order op subgraph aliases an input or output")."""
    adapted = HouseholderAdapter(linear(7, 5, dtype=dtype), reflectors=3, generator=generator(7))
    randomize_sigma(adapted)
    model = nn.Sequential(adapted, nn.Identity() if dtype.is_complex else nn.Tanh())
    x = torch.randn(4, 7, dtype=dtype, generator=generator(8))
    (compiled, compiled_grads), (eager, eager_grads) = _compiled_against_eager(model, x, "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    assert compiled_grads.keys() == eager_grads.keys() == {"0.reflectors_out", "0.reflectors_in", "0.sigma"}
    for name, gradient in eager_grads.items():
        assert gradient.abs().max() > 0.1, name
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_adapter_compiled_with_inductor_matches_eager():
    """The same with torch.compile's default backend (Inductor), float32."""
    adapted = HouseholderAdapter(linear(7, 5, dtype=torch.float32), reflectors=3, generator=generator(7))
    randomize_sigma(adapted)
    x = torch.randn(4, 7, generator=generator(8))
    (compiled, compiled_grads), (eager, eager_grads) = _compiled_against_eager(adapted, x, "inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name, gradient in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapter_against_float64(dtype):
    """After ``.half()`` or ``.to(torch.bfloat16)`` the forward pass failed
    with "attribute name must be string, not 'NoneType'" (the WY factors have
    no wide dtype for half precision). It computes in float32 and rounds to
    ``dtype``: the update and the parameters' gradients are those of the same
    (half-precision) parameters and input in float64, to the rounding of
    ``dtype``."""
    eps = torch.finfo(dtype).eps
    adapted = HouseholderAdapter(linear(9, 5, dtype=torch.float32), reflectors=3, generator=generator(5))
    randomize_sigma(adapted)
    adapted = adapted.to(dtype)
    reference = copy.deepcopy(adapted).double()
    x = torch.randn(4, 9, generator=generator(6)).to(dtype)
    cotangent = torch.randn(4, 5, generator=generator(9)).to(dtype).float()  # exact in dtype
    delta, expected = adapted.delta(x), reference.delta(x.double())
    (delta.float() * cotangent).sum().backward()
    (expected * cotangent.double()).sum().backward()
    assert delta.dtype == adapted(x).dtype == dtype
    delta, expected = delta.detach().double(), expected.detach()
    torch.testing.assert_close(delta, expected, rtol=eps, atol=eps * float(expected.abs().max()))
    for name, parameter in adapted.named_parameters():
        if parameter.requires_grad:
            wanted = reference.get_parameter(name).grad
            assert parameter.grad.dtype == dtype and wanted.abs().max() > 0.1, name
            torch.testing.assert_close(parameter.grad.double(), wanted, rtol=eps, atol=eps * float(wanted.abs().max()))
    # merged, the layer computes the same to the rounding of its weight
    merged = copy.deepcopy(adapted).merge()
    torch.testing.assert_close(merged(x).double(), reference(x.double()), rtol=0, atol=8 * eps)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 dtype in this PyTorch")
def test_unsupported_parameter_dtype_is_named():
    adapted = HouseholderAdapter(linear(6, 4, dtype=torch.float32), reflectors=2)
    with torch.no_grad():
        adapted.reflectors_in.data = adapted.reflectors_in.data.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"^reflectors_in has dtype torch.float8_e4m3fn; expected one of float32, "
                                        r"float64, complex64, complex128"):
        adapted(torch.randn(3, 6))


# PyTorch lazily scripts its forward-mode decompositions at the first jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
# PyTorch's own note on a complex conjugate it batches by a loop
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_householder_adapter_under_torch_func_transforms(dtype):
    """torch.func.grad, per-sample gradients (vmap of grad) and vmap of the
    forward refused every adapted layer ("autograd.Function ... must
    override the setup_context staticmethod"); the SVD adapter worked. They
    equal autograd's gradient and a loop over the samples."""
    from torch.func import functional_call, grad, vmap

    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 5, dtype=dtype)
    adapter = HouseholderAdapter(layer, reflectors=2, generator=generator)
    with torch.no_grad():  # away from the identity start, so that the factors' gradient matters
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=generator))
    params = {k: v.detach() for k, v in adapter.named_parameters()}
    x = torch.randn(4, 6, dtype=dtype, generator=generator)

    def loss(p, xi):
        return functional_call(adapter, p, (xi,)).abs().pow(2).sum()

    adapter.zero_grad()
    loss(dict(adapter.named_parameters()), x).backward()
    transformed = grad(loss)(params, x)
    for name, p in adapter.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(transformed[name], p.grad, rtol=0, atol=1e-12)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for name in params:
        loop = torch.stack([grad(loss)(params, xi)[name] for xi in x])
        torch.testing.assert_close(per_sample[name], loop, rtol=0, atol=1e-12)
    torch.testing.assert_close(vmap(adapter)(x), adapter(x), rtol=0, atol=1e-12)
    # forward mode: the directional derivative <g, t> of jvp equals the
    # gradient's, and a central difference
    tangents = {k: torch.randn(v.shape, dtype=v.dtype, generator=generator) for k, v in params.items()}
    _, directional = torch.func.jvp(lambda p: loss(p, x), (params,), (tangents,))
    from_gradient = sum(torch.sum(transformed[k].conj() * tangents[k]).real for k in transformed)
    torch.testing.assert_close(directional, from_gradient, rtol=1e-12, atol=1e-12)
    h = 1e-6
    moved = [loss({k: params[k] + sign * h * tangents[k] for k in params}, x) for sign in (1, -1)]
    torch.testing.assert_close(directional, (moved[0] - moved[1]) / (2 * h), rtol=1e-6, atol=1e-6)


def _shared_linear_model(add, size, targets):
    """One float64 nn.Linear used at two places, ``Sequential(lin, Tanh(), lin)``, adapted at ``targets``."""
    lin = linear(4, 4)
    model = add(nn.Sequential(lin, nn.Tanh(), lin), target_modules=targets, generator=generator(3), **size)
    return model, lin


@pytest.mark.parametrize(("add", "size", "diagonal"), [(add_householder_adapters, {"reflectors": 2}, "sigma"),
                                                       (add_svd_adapters, {"rank": 2}, "s")])
def test_merge_refuses_a_shared_linear_adapted_at_one_of_its_places(add, size, diagonal):
    # the same nn.Linear at '0' and '2', adapted at '0' only: '2' keeps the plain layer, whose weight merging changes
    model, lin = _shared_linear_model(add, size, ["0"])
    assert type(model[0]) is not nn.Linear and model[2] is lin and model[0].base is lin
    with torch.no_grad():
        getattr(model[0], diagonal).copy_(torch.linspace(0.3, 0.7, 2 if diagonal == "s" else 4, dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(1))
    with torch.no_grad():
        adapted = model(x)
        # the reference, by hand: the adapted layer at '0', the plain layer at '2'
        reference = lin(torch.tanh(lin(x) + model[0].delta(x)))
    torch.testing.assert_close(adapted, reference, rtol=0, atol=1e-12)
    weight = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=r"is tied to '2\.weight' of the model .* Nothing was merged\. .*the layer "
                                         r"itself is used at '2\.weight' too: adapter\.base = copy\.deepcopy"):
        model[0].merge()
    assert not model[0].merged and torch.equal(lin.weight, weight)
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    # as the error says: the adapter's own copy of the layer merges, to the adapted model's outputs
    model[0].base = copy.deepcopy(model[0].base)
    with torch.no_grad():
        model[0].merge()
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)
    assert torch.equal(lin.weight, weight)  # the plain place keeps its weight
    # adapted at both places (target_modules=None): one adapter, nothing outside it, and merge keeps the outputs
    model, lin = _shared_linear_model(add, size, None)
    assert model[0] is model[2] and model[0]._tied == ()
    with torch.no_grad():
        getattr(model[0], diagonal).add_(0.5)
        adapted = model(x)
        model[0].merge()
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


class _WithSnapshot(nn.Module):
    """A Linear and a buffer that shares its weight's memory (``register_buffer(..., weight.detach())``)."""

    def __init__(self):
        super().__init__()
        self.a = linear(4, 4)
        self.register_buffer("snap", self.a.weight.detach())

    def forward(self, x):
        return self.a(x) + x @ self.snap.T


@pytest.mark.parametrize(("add", "size"), [(add_householder_adapters, {"reflectors": 2}),
                                         (add_svd_adapters, {"rank": 2})])
def test_merge_refuses_a_weight_sharing_memory_with_a_buffer(add, size):
    model = add(_WithSnapshot(), target_modules=["a"], generator=generator(3), **size)
    with torch.no_grad():
        for p in model.a.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.5)  # a trained diagonal
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(1))
    with torch.no_grad():
        adapted = model(x)
        reference = model.a.base(x) + model.a.delta(x) + x @ model.a.base.weight.T  # the snapshot: the frozen weight
    torch.testing.assert_close(adapted, reference, rtol=0, atol=1e-12)
    snap = model.snap.clone()
    with pytest.raises(ValueError, match=r"is tied to 'snap' \(a buffer\) of the model .* Nothing was merged"):
        model.a.merge()
    assert not model.a.merged and torch.equal(model.snap, snap)
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    # untied as the error says, it merges and keeps the outputs
    base = model.a.base
    base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        model.a.merge()
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pair", [(torch.float32, torch.float64), (torch.complex64, torch.complex128)])
def test_load_adapter_state_dict_takes_single_precision_factors_into_a_double_model(pair):
    single, double = pair
    torch.manual_seed(0)
    source = nn.Sequential(SVDAdapter(nn.Linear(6, 8, dtype=single), rank=2))
    with torch.no_grad():
        source[0].s.copy_(torch.tensor([0.7, -0.4], dtype=single))
    saved = adapter_state_dict(source)
    U = saved["0.U"].to(double)
    eye = torch.eye(2, dtype=double)
    assert torch.linalg.matrix_norm(U.mH @ U - eye) > 1e-10  # orthonormal to float32's rounding only
    target = nn.Sequential(SVDAdapter(nn.Linear(6, 8, dtype=double), rank=2))
    with torch.no_grad():
        target[0].base.weight.copy_(source[0].base.weight)
        target[0].base.bias.copy_(source[0].base.bias)
    load_adapter_state_dict(target, saved)
    for name in ("U", "V"):
        factor, entry = getattr(target[0], name).detach(), saved[f"0.{name}"].to(double)
        assert factor.dtype == double
        assert torch.linalg.matrix_norm(factor.mH @ factor - eye) < 1e-14  # orthonormal to float64's rounding
        torch.testing.assert_close(factor, entry, rtol=0, atol=1e-6)  # moved by float32's rounding only
    assert torch.equal(target[0].s.detach(), saved["0.s"].to(double))
    x = torch.randn(5, 6, dtype=single, generator=generator(1))
    with torch.no_grad():
        torch.testing.assert_close(target(x.to(double)), source(x).to(double), rtol=0, atol=1e-5)
    # a single-precision entry that is not orthonormal to its own rounding is refused, naming its dtype
    bad = dict(saved, **{"0.U": saved["0.U"] + 1e-3})
    kept = target[0].U.detach().clone()
    name = str(single).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"entry '0\.U' must have orthonormal columns: .* above the tolerance 1e-10 "
                                         rf"of {str(double).removeprefix('torch.')} \({name}, the tolerance of its "
                                         rf"own dtype 0\.0001\)"):
        load_adapter_state_dict(target, bad)
    assert torch.equal(target[0].U.detach(), kept)
    # and the other way, double-precision factors into a single-precision model, as before
    load_adapter_state_dict(source, adapter_state_dict(target))
    torch.testing.assert_close(source[0].U.detach(), kept.to(single), rtol=0, atol=1e-7)
