"""``unitary_lr.peft``: HTA as a PEFT method, on tiny models (nothing is downloaded)."""

import copy
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
from unitary_lr._peft_support import check_peft_version, peft_problem  # noqa: E402
from unitary_lr.torch import HouseholderAdapter  # noqa: E402

PROBLEM = peft_problem()  # PEFT missing, or a release unitary_lr.peft refuses
if PROBLEM is None:
    import peft

    from unitary_lr.peft import HTAConfig, HTALinear
needs_peft = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


class Net(torch.nn.Module):
    """Named layers in a layer list, as PEFT's layers_to_transform expects."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(12, 12), "v": torch.nn.Linear(12, 12)})
                                          for _ in range(3))
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["v"](torch.tanh(layer["q"](x))))
        return self.head(x)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def x():
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(1))


def _adapted(base, **options):
    options.setdefault("target_modules", ["q", "v"])
    return peft.get_peft_model(copy.deepcopy(base), HTAConfig(**options))


def _train(model, x, steps=20):
    target = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@needs_peft
def test_starts_as_the_base_model_and_counts_parameters(base, x, capsys):
    model = _adapted(base, r=2)
    assert torch.equal(model(x), base(x))  # sigma = 0
    trainable, total = model.get_nb_trainable_parameters()
    per_layer = (12 + 12) * 2 + 12
    assert trainable == 6 * per_layer
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.rsplit(".", 2)[-2].startswith("hta_") for n in names), names
    assert sum(isinstance(m, HTALinear) for m in model.modules()) == 6


@needs_peft
def test_the_update_is_householder_adapters(base, x):
    """The same reflectors and sigma give HouseholderAdapter's output."""
    model = _adapted(base, r=3, target_modules=["head"], init_weights=False)
    layer = model.base_model.model.head
    reference = HouseholderAdapter(copy.deepcopy(base.head), reflectors=3)
    with torch.no_grad():
        reference.reflectors_out.copy_(layer.hta_reflectors_out["default"])
        reference.reflectors_in.copy_(layer.hta_reflectors_in["default"])
        reference.sigma.copy_(layer.hta_sigma["default"])
    features = torch.randn(5, 12)
    torch.testing.assert_close(layer(features), reference(features))
    assert not torch.equal(layer(features), base.head(features))  # init_weights=False: not the identity


@needs_peft
def test_training_changes_only_hta_parameters(base, x):
    model = _adapted(base, r=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = (model(x) - torch.randn(16, 3, generator=torch.Generator().manual_seed(2))).square().mean().item()
    last = _train(model, x)
    assert last < first
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == ("hta_" in name), name
    assert not any("hta_" in n for n, p in model.named_parameters() if not p.requires_grad)


@needs_peft
def test_save_and_load_round_trip(base, x, tmp_path):
    model = _adapted(base, r=2)
    _train(model, x)
    model.eval()
    expected = model(x)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"peft_type": "HTA"' in config
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), expected)
    assert isinstance(loaded.peft_config["default"], HTAConfig)
    assert loaded.peft_config["default"].r == 2


@needs_peft
def test_merge_and_unload_gives_plain_linear_layers(base, x):
    model = _adapted(base, r=2)
    _train(model, x)
    expected = model(x).detach()
    merged = model.merge_and_unload()
    linears = [m for m in merged.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 and all(type(m) is torch.nn.Linear for m in linears)
    assert not any("hta_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)  # float32 rounding of W0 + Delta W


@needs_peft
def test_merge_unmerge_and_disable_adapter(base, x):
    model = _adapted(base, r=2)
    _train(model, x)
    adapted = model(x).detach()
    with model.disable_adapter():
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), adapted)
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.base_model.model.layers[0]["q"].base_layer.weight, base.layers[0]["q"].weight,
                               rtol=0, atol=1e-6)


class TiedNet(torch.nn.Module):
    """``a`` and ``b`` share one weight Parameter (weight tying); ``c`` has its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = (torch.nn.Linear(6, 6, dtype=torch.float64) for _ in range(3))
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _untie(layer):
    """Give ``layer`` (a wrapped layer or a plain Linear) a weight of its own, equal to the shared one."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)


@needs_peft
@pytest.mark.parametrize(("targets", "tied_to_a"), [(["a", "b", "c"], "b.base_layer.weight"), (["a", "c"], "b.weight")])
def test_merging_into_tied_weights_is_refused_and_changes_nothing(targets, tied_to_a):
    model = peft.get_peft_model(TiedNet(), HTAConfig(r=2, target_modules=targets, init_weights=False))
    inner = model.base_model.model
    assert inner.a.get_base_layer().weight is inner.b.weight  # PEFT keeps the tie
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    adapted = model(x).detach()
    # the reference: the same adapters on a copy whose layers have weights of their own
    untied = copy.deepcopy(model)
    _untie(untied.base_model.model.a)
    assert untied.base_model.model.a.get_base_layer().weight is not untied.base_model.model.b.weight
    torch.testing.assert_close(untied(x), adapted, rtol=0, atol=1e-12)  # unmerged, the tied model is right
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = {name: type(module) for name, module in inner.named_children()}
    message = rf"cannot merge the HTA adapters: the weight of 'a' is also '{re.escape(tied_to_a)}'.*Nothing was merged"
    for merge, refusal in ((model.merge_and_unload, message), (model.merge_adapter, message),
                           (inner.a.merge, rf"the weight of the layer Linear\(.*\) is also '{re.escape(tied_to_a)}'")):
        with pytest.raises(ValueError, match=refusal):
            merge()
        assert {name: type(module) for name, module in inner.named_children()} == layers  # nothing unloaded
        assert not any(module.merged for module in inner.modules() if isinstance(module, HTALinear))
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name  # bitwise
        assert torch.equal(model(x), adapted)
    # untied, the adapters merge, to the adapted model's output
    merged = untied.merge_and_unload()
    assert all(type(m) is torch.nn.Linear for m in merged.children())
    torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-12)
    _untie(inner.a)
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


@needs_peft
def test_several_adapters(base, x):
    model = _adapted(base, r=1)
    model.add_adapter("other", HTAConfig(r=3, target_modules=["v"], init_weights=False))
    # a new adapter is not active, so not trainable, until it is selected
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    assert torch.equal(model(x), base(x))  # "default" is active, sigma = 0
    model.set_adapter("other")
    assert not torch.equal(model(x), base(x))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    assert model.base_model.model.layers[0]["v"].hta_reflectors_in["other"].shape == (12, 3)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())


@needs_peft
def test_exclude_modules_layers_to_transform_and_modules_to_save(base, x, tmp_path):
    model = _adapted(base, exclude_modules=["layers.1.q"], modules_to_save=["head"])
    inner = model.base_model.model
    assert not isinstance(inner.layers[1]["q"], HTALinear) and isinstance(inner.layers[1]["v"], HTALinear)
    assert any(p.requires_grad for n, p in model.named_parameters() if "head" in n)
    only = _adapted(base, layers_to_transform=[2], layers_pattern="layers")
    adapted = [n for n, m in only.named_modules() if isinstance(m, HTALinear)]
    assert adapted == ["base_model.model.layers.2.q", "base_model.model.layers.2.v"]
    regex = _adapted(base, target_modules=r"layers\.0\.(q|v)")
    assert sum(isinstance(m, HTALinear) for m in regex.modules()) == 2


@needs_peft
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"r": 0}, ValueError, "HTAConfig.r must be >= 1 (reflections per side), got 0"),
        ({"r": 2.5}, TypeError, "HTAConfig.r must be an integer, got float: 2.5"),
        ({"r": True}, TypeError, "HTAConfig.r must be an integer, got bool: True"),
        ({"init_weights": "yes"}, TypeError, "HTAConfig.init_weights must be a bool, got str: 'yes'"),
        ({"target_modules": "q", "layers_to_transform": [1]}, ValueError, "layers_to_transform and layers_pattern"),
        ({"r": np.float64(2.0)}, TypeError, "HTAConfig.r must be an integer, got float64: np.float64(2.0)"),
        ({"r": np.True_}, TypeError, "HTAConfig.r must be an integer, got bool: np.True_"),
        ({"r": "2"}, TypeError, "HTAConfig.r must be an integer, got str: '2'"),
        ({"r": np.int64(0)}, ValueError, "HTAConfig.r must be >= 1 (reflections per side), got np.int64(0)"),
        ({"layers_to_transform": 1.0}, TypeError,
         "HTAConfig.layers_to_transform must be an integer or a list of integers, got float: 1.0"),
        ({"layers_to_transform": True}, TypeError,
         "HTAConfig.layers_to_transform must be an integer or a list of integers, got bool: True"),
        ({"layers_to_transform": "2"}, TypeError,
         "HTAConfig.layers_to_transform must be an integer or a list of integers, got str: '2'"),
        ({"layers_to_transform": [1, 2.0]}, TypeError,
         "HTAConfig.layers_to_transform must be an integer, got float: 2.0"),
        ({"layers_to_transform": [np.False_]}, TypeError,
         "HTAConfig.layers_to_transform must be an integer, got bool: np.False_"),
        ({"layers_to_transform": -1}, ValueError, "HTAConfig.layers_to_transform must be >= 0, got -1"),
        ({"layers_to_transform": [0, np.int64(-2)]}, ValueError,
         "HTAConfig.layers_to_transform must be >= 0, got np.int64(-2)"),
    ],
)
def test_bad_config(options, error, message):
    with pytest.raises(error, match=None) as info:
        HTAConfig(**{"target_modules": ["q"], **options})
    assert message in str(info.value)


@needs_peft
@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint8], ids=lambda t: t.__name__)
def test_numpy_integer_config_fields_are_plain_ints_that_save_and_load(base, x, tmp_path, integer):
    """``r`` (and ``layers_to_transform``) of NumPy integers, as the layers
    and adapters take them: HTAConfig(r=np.int64(4)) was a TypeError, and a
    NumPy integer kept as it is would not save (JSON has no int64)."""
    config = HTAConfig(r=integer(2), target_modules=["q", "v"], layers_to_transform=[integer(0), integer(2)],
                       layers_pattern="layers", init_weights=False)
    assert type(config.r) is int and config.r == 2
    assert config.layers_to_transform == [0, 2] and all(type(i) is int for i in config.layers_to_transform)
    assert type(HTAConfig(r=3, target_modules=["q"], layers_to_transform=integer(1)).layers_to_transform) is int
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, HTALinear))
    assert adapted == [f"base_model.model.layers.{i}.{p}" for i in (0, 2) for p in ("q", "v")]
    torch.manual_seed(3)
    plain = peft.get_peft_model(copy.deepcopy(base), HTAConfig(r=2, target_modules=["q", "v"],
                                                               layers_to_transform=[0, 2], layers_pattern="layers",
                                                               init_weights=False))
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(type(m.hta_r["default"]) is int for m in model.modules() if isinstance(m, HTALinear))
    model.eval()
    expected = model(x)
    assert not torch.equal(expected, base(x))  # init_weights=False: the adapters act
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["layers_to_transform"] == [0, 2] and saved["peft_type"] == "HTA"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), expected)
    assert loaded.peft_config["default"].r == 2 and type(loaded.peft_config["default"].r) is int


@needs_peft
def test_hta_linear_made_directly_checks_r(base):
    """An HTALinear made without an HTAConfig: r of a wrong type is a
    TypeError (2.5 passed the range check and failed in torch), a NumPy
    integer is taken and stored as an int."""
    with pytest.raises(TypeError, match=r"^r must be an integer, got float: 2.5$"):
        HTALinear(copy.deepcopy(base.head), "default", r=2.5)
    with pytest.raises(TypeError, match=r"^r must be an integer, got bool: True$"):
        HTALinear(copy.deepcopy(base.head), "default", r=True)
    with pytest.raises(ValueError, match=r"^HTAConfig.r must be between 1 and 3 .* got 0$"):
        HTALinear(copy.deepcopy(base.head), "default", r=np.int64(0))
    layer = HTALinear(copy.deepcopy(base.head), "default", r=np.int64(3))
    assert type(layer.hta_r["default"]) is int and layer.hta_reflectors_in["default"].shape == (12, 3)


@needs_peft
def test_bad_targets(base):
    with pytest.raises(ValueError, match=r"HTAConfig.r must be between 1 and 3 = min\(out_features, in_features\) "
                                         r"of layer 'head' \(3 x 12\), got 4"):
        _adapted(base, r=4, target_modules=["head"])
    with pytest.raises(ValueError, match="HTAConfig needs target_modules"):
        _adapted(base, target_modules=None)
    with pytest.raises(TypeError, match="HTA adapts torch.nn.Linear layers only; target_modules matched 'layers.0'"):
        _adapted(base, target_modules=["layers.0"])


@needs_peft
def test_a_refused_config_changes_no_layer(base):
    """PEFT wraps the targets one by one: a layer too small for r (or not a
    Linear) met after another target left that one wrapped. Every target is
    checked first now, and the model is as it was."""
    model = copy.deepcopy(base)
    before = {name: type(module) for name, module in model.named_modules()}
    for options, error in (({"r": 4, "target_modules": ["q", "head"]}, ValueError),
                           ({"r": 2, "target_modules": ["q", "layers.0"]}, TypeError)):
        with pytest.raises(error, match=r"layer 'head'|matched 'layers.0'"):
            peft.get_peft_model(model, HTAConfig(**options))
        assert {name: type(module) for name, module in model.named_modules()} == before


def _layout(model):
    """The model's modules (name and type) and its state_dict's keys."""
    return [(name, type(module)) for name, module in model.named_modules()], list(model.state_dict())


@needs_peft
def test_a_refused_all_linear_config_changes_no_layer(base):
    """``target_modules="all-linear"`` is expanded by PEFT's injection itself:
    the check before it saw the literal string, matched nothing, and the
    layers before 'head' were wrapped when r was refused there."""
    model = copy.deepcopy(base)
    before = _layout(model)
    with pytest.raises(ValueError, match=r"of layer 'head' \(3 x 12\), got 4"):
        peft.get_peft_model(model, HTAConfig(r=4, target_modules="all-linear"))
    assert _layout(model) == before
    adapted = peft.get_peft_model(model, HTAConfig(r=3, target_modules="all-linear"))  # the expansion itself works
    assert sum(isinstance(module, HTALinear) for module in adapted.modules()) == 7


@needs_peft
def test_a_refused_added_adapter_leaves_nothing_behind(base, x):
    """``add_adapter`` (and ``load_adapter``, which calls it) injects without
    the check PEFT runs only when the tuner is made: a refused r left an
    orphan adapter (parameters in state_dict(), no config) on the layers
    before the refused one. Also for ``inject_adapter_in_model`` with a
    state dict, whose keys name the layers."""
    model = _adapted(base, r=1, target_modules=["q"])
    before, output = _layout(model), model(x)
    with pytest.raises(ValueError, match=r"of layer 'head' \(3 x 12\), got 4"):
        model.add_adapter("extra", HTAConfig(r=4, target_modules=["q", "head"]))
    assert _layout(model) == before
    assert list(model.peft_config) == ["default"]
    assert all(list(module.hta_sigma) == ["default"] for module in model.modules() if isinstance(module, HTALinear))
    assert torch.equal(model(x), output)
    model.add_adapter("extra", HTAConfig(r=3, target_modules=["q", "head"]))  # a fitting r is added
    assert sorted(model.base_model.model.layers[0]["q"].hta_sigma) == ["default", "extra"]

    plain = copy.deepcopy(base)
    before = _layout(plain)
    keys = {f"{name}.hta_sigma": torch.zeros(3) for name in ("layers.0.q", "head")}
    with pytest.raises(ValueError, match=r"of layer 'head' \(3 x 12\), got 4"):
        peft.inject_adapter_in_model(HTAConfig(r=4, target_modules=["v"]), plain, state_dict=keys)
    assert _layout(plain) == before


@needs_peft
def test_compiled_hta_model_matches_eager(base, x):
    """``torch.compile`` of an HTA model failed as that of a HouseholderAdapter
    (the WY factors saved a view for backward, which Dynamo refuses)."""
    import warnings

    model = _adapted(base, r=2, init_weights=False)
    torch.compiler.reset()
    results = []
    for run in (torch.compile(model, backend="aot_eager"), model):
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's own notes
            y = run(x)
            y.square().sum().backward()
        results.append((y.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    (compiled, compiled_grads), (eager, eager_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 18
    for name, gradient in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-5, atol=1e-6)


@needs_peft
# PyTorch lazily scripts its forward-mode decompositions at the first jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_hta_model_per_sample_gradients_and_forward_mode(base, x):
    """Per-sample gradients of an HTA model's trainable parameters
    (``torch.func.vmap`` of ``grad``, as differential-privacy training takes
    them) equal a loop over the samples, and forward mode (``jvp``) equals
    the gradient's directional derivative; both failed in the WY factors."""
    from torch.func import functional_call, grad, jvp, vmap

    model = _adapted(base.double(), r=2, init_weights=False)
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 18
    x = x.double()

    def loss(params, xi):
        return functional_call(model, params, (xi,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(trainable, x)
    loop = [grad(loss)(trainable, xi) for xi in x]
    for name in trainable:
        torch.testing.assert_close(per_sample[name], torch.stack([g[name] for g in loop]), rtol=1e-10, atol=1e-12)
    generator = torch.Generator().manual_seed(3)
    tangents = {name: torch.randn(p.shape, dtype=p.dtype, generator=generator) for name, p in trainable.items()}
    _, directional = jvp(lambda params: loss(params, x), (trainable,), (tangents,))
    gradient = grad(loss)(trainable, x)
    torch.testing.assert_close(directional, sum(torch.sum(gradient[k] * tangents[k]) for k in trainable),
                               rtol=1e-10, atol=1e-12)


@needs_peft
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_hta_model(base, x, dtype):
    """After ``.to(dtype)`` the HTA layers' forward failed with "attribute name
    must be string, not 'NoneType'"; they compute in float32 and round: the
    model gives what its float64 copy gives, to the rounding of ``dtype``."""
    model = _adapted(base, r=2, init_weights=False).to(dtype)
    reference = copy.deepcopy(model).double()
    x = x.to(dtype)
    y, expected = model(x), reference(x.double())
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2 * torch.finfo(dtype).eps)
    y.float().square().sum().backward()
    assert all(p.grad.dtype == dtype for p in model.parameters() if p.requires_grad)


def test_version_guard():
    """Runs without PEFT: the check reads versions, not PEFT itself."""
    check_peft_version("0.21.2")
    check_peft_version("0.21.3.dev0")
    for version in ("0.13.2", "0.22.0", "1.0.0", "not a version"):
        with pytest.raises(ImportError, match=rf"tested with PEFT >= 0.21.0, < 0.22.0; the installed PEFT is "
                                              rf"'{version}'.*pip install 'peft>=0.21.0,<0.22.0'"):
            check_peft_version(version)


def test_missing_or_untested_peft_is_named(monkeypatch):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    assert peft_problem() == "PEFT is not installed: pip install 'unitary-lr[peft]'"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.30.0")
    assert "the installed PEFT is '0.30.0'" in peft_problem()


@needs_peft
@pytest.mark.parametrize("targets", [["0", "2"], ["0"]])
def test_merging_a_linear_used_at_two_places_is_refused_and_changes_nothing(targets):
    # one nn.Linear at '0' and '2': PEFT wraps it at its first name only, '2' keeps the plain layer
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    model = peft.get_peft_model(torch.nn.Sequential(lin, torch.nn.Tanh(), lin),
                                HTAConfig(r=2, target_modules=targets, init_weights=False))
    inner = model.base_model.model
    assert isinstance(inner[0], HTALinear) and inner[2] is lin and inner[0].get_base_layer() is lin
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(x)
        # the reference, by hand: the adapter at '0' (its Delta W, dense), the plain layer at '2'
        delta = inner[0].get_delta_weight("default")
        reference = lin(torch.tanh(lin(x) + x @ delta.T))
    assert float(delta.abs().max()) > 1e-3
    torch.testing.assert_close(adapted, reference, rtol=0, atol=1e-12)
    weight = lin.weight.detach().clone()
    for merge in (model.merge_and_unload, model.merge_adapter, inner[0].merge):
        with pytest.raises(ValueError, match=r"the weight of .* is also '2\.weight'.*Nothing was merged.*"
                                             r"layer\.base_layer = copy\.deepcopy\(layer\.base_layer\)"):
            merge()
        assert isinstance(inner[0], HTALinear) and not inner[0].merged and torch.equal(lin.weight, weight)
        with torch.no_grad():
            assert torch.equal(model(x), adapted)
    # as the error says: the HTA layer's own copy of the layer merges, to the adapted model's outputs
    inner[0].base_layer = copy.deepcopy(inner[0].base_layer)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-12)
    assert torch.equal(lin.weight, weight)
