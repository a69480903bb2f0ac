"""unitary_lr.torch: the ProjUNN optimizer and the unitary layers."""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import unitary_lr as ul  # noqa: E402
from unitary_lr.torch import ModReLU, ProjUNN, UnitaryRNN, is_unitary, mark_unitary, unitary_parameter  # noqa: E402

REFERENCE = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}
SETTINGS = [
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("rmsprop", {"alpha": 0.9, "centered": True, "momentum": 0.3, "weight_decay": 1e-2}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2}),
]


def error(W):
    W = W.detach().to(torch.complex128)
    n = W.shape[-1]
    return float((torch.linalg.matrix_norm(W.mH @ W - torch.eye(n, dtype=W.dtype)) / math.sqrt(n)).max())


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("base", "hyper"), SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_mixed_model_unitary_stays_unitary_and_others_match_torch_optim(base, hyper, dtype):
    """One optimizer for a whole model: the unitary matrix stays unitary and the
    other parameters (real and complex) move exactly as torch.optim moves them."""
    W = unitary_parameter(12, dtype=dtype, batch_shape=(2,), generator=seeded())
    V = torch.nn.Parameter(torch.randn(12, 5, dtype=dtype, generator=seeded(1)))
    c = torch.nn.Parameter(torch.randn(12, dtype=torch.float64, generator=seeded(2)))
    V_ref, c_ref = (torch.nn.Parameter(p.detach().clone()) for p in (V, c))
    opt = ProjUNN([W, V, c], lr=1e-2, base=base, rank=2, seed=0, **hyper)
    assert [g["unitary"] for g in opt.param_groups] == [False, True]
    reference = REFERENCE[base]([V_ref, c_ref], lr=1e-2, **hyper)
    data = seeded(3)

    def loss(W, V, c):
        return (W @ V @ x).abs().square().sum() + ((c - x.real.mean()) ** 2).sum()

    # Fresh data every step: with a constant gradient centered RMSprop's
    # sqrt(v - g_avg^2) cancels, and rounding differences would dominate.
    for _ in range(40):
        x = torch.randn(5, 7, dtype=dtype, generator=data)
        opt.zero_grad()
        reference.zero_grad()
        loss(W.detach().clone(), V_ref, c_ref).backward()  # both at the same W
        loss(W, V, c).backward()
        opt.step()
        reference.step()
    assert error(W) < 1e-12
    torch.testing.assert_close(V.detach(), V_ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c.detach(), c_ref.detach(), rtol=1e-12, atol=1e-14)


def test_unitary_step_is_the_core_projunn_step():
    """A plain SGD step of a unitary parameter is projunn_step on the gradient,
    with the parameter's own random stream [seed, group, index]."""
    W = unitary_parameter(10, dtype=torch.complex128, generator=seeded())
    W0 = W.detach().clone()
    opt = ProjUNN([{"params": [W], "unitary": True}], lr=0.05, base="sgd", rank=3, variant="direct", seed=7)
    (W.real ** 2).sum().backward()
    grad = W.grad.clone()
    opt.step()
    expected = ul.projunn_step(W0, grad, lr=0.05, rank=3, variant="direct", rng=np.random.default_rng([7, 0, 0]))
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-15)



@pytest.mark.parametrize("dtype, n, rank", [(torch.float32, 512, 1), (torch.float32, 1024, 2),
                                           (torch.complex128, 256, 1), (torch.float64, 512, 1)])
def test_a_unitary_step_updated_in_blocks_of_rows_is_the_core_projunn_step(dtype, n, rank):
    """Where the optimizer's in-place update runs in blocks of rows (float32
    and complex128 W whose rows lie a power of two apart; float64 keeps one
    ``addmm_``), the step is still ``projunn_step``'s, in the parameter's own
    memory, and W stays unitary; compared in float64 against NumPy's step on
    the same W and gradient."""
    W = unitary_parameter(n, dtype=dtype, generator=seeded(4))
    W0, storage = W.detach().clone(), W.data_ptr()
    opt = ProjUNN([{"params": [W], "unitary": True}], lr=1.0, base="sgd", rank=rank, seed=3)
    W.grad = torch.randn(n, n, dtype=dtype, generator=seeded(5)) / math.sqrt(n)
    opt.step()
    expected = ul.projunn_step(W0.numpy(), W.grad.numpy(), lr=1.0, rank=rank, rng=np.random.default_rng([3, 0, 0]))
    assert W.data_ptr() == storage
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(W.detach().numpy(), expected, rtol=0, atol=atol)
    assert np.abs(W.detach().numpy() - W0.numpy()).max() > 1e-3  # a step that moves (a rotation of about a radian)
    assert error(W) < (1e-5 if dtype == torch.float32 else 1e-13)


def test_consecutive_steps_draw_one_stream_and_a_failed_step_draws_nothing():
    """The sketches of a parameter's steps come from one stream [seed, group,
    index] (the optimizer keeps the live generator between steps); a step
    that fails after drawing the first parameter's sketch leaves that
    stream where the last successful step left it."""
    grads = [torch.randn(2, 8, 8, dtype=torch.float64, generator=seeded(s)) for s in range(3)]

    def run(steps):
        W1, W2 = (unitary_parameter(8, dtype=torch.float64, generator=seeded(s)) for s in (1, 2))
        opt = ProjUNN([W1, W2], lr=0.05, base="sgd", rank=2, seed=3, unitary=True, drift_check_every=0)
        for grad in steps:
            W1.grad, W2.grad = grad[0].clone(), grad[1].clone()
            try:
                opt.step()
            except ValueError:
                pass
        return W1.detach(), W2.detach()

    broken = grads[1].clone()
    broken[1, 0, 0] = math.nan  # the second parameter fails, after the first one's draw
    with_failure = run([grads[0], broken, grads[2]])
    without = run([grads[0], grads[2]])
    for a, b in zip(with_failure, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and two good steps are projunn_step twice on the parameter's own stream
    W1 = unitary_parameter(8, dtype=torch.float64, generator=seeded(1)).detach()
    stream = np.random.default_rng([3, 0, 0])
    for grad in (grads[0], grads[2]):
        W1 = ul.projunn_step(W1, grad[0], lr=0.05, rank=2, rng=stream)
    torch.testing.assert_close(without[0], W1, rtol=0, atol=1e-15)


def test_an_edited_sketch_state_is_the_one_the_next_step_draws_from():
    """The saved generator state is what the next step starts from, also when
    it is edited in place between steps (the optimizer's live generator is
    then not used)."""
    from unitary_lr._random import generator_state

    grad = torch.randn(8, 8, dtype=torch.float64, generator=seeded(4))
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded(1))
    opt = ProjUNN([W], lr=0.05, base="sgd", rank=2, seed=3, unitary=True, drift_check_every=0)
    W.grad = grad.clone()
    opt.step()
    fresh = np.random.default_rng(11)
    opt.state[W]["sketch_rng"].update(generator_state(fresh))  # in place
    start = W.detach().clone()
    W.grad = grad.clone()
    opt.step()
    expected = ul.projunn_step(start, grad, lr=0.05, rank=2, rng=np.random.default_rng(11))
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-15)


def test_torch_lr_scheduler_drives_every_group():
    """torch.optim.lr_scheduler works on ProjUNN: each group's lr is scaled,
    so the unitary group keeps its ratio, and each unitary step is the core
    step at the scheduled lr. At lr 0 the parameters do not move at all."""
    W = unitary_parameter(10, dtype=torch.complex128, generator=seeded())
    V = torch.nn.Parameter(torch.randn(10, dtype=torch.float64, generator=seeded(1)))
    opt = ProjUNN([{"params": [V]}, {"params": [W], "unitary": True, "lr": 0.1 / 32}],
                  lr=0.1, base="sgd", rank=2, seed=7)
    factors = [1.0, 0.5, 0.0, 0.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: factors[epoch])
    rng = np.random.default_rng([7, 1, 0])  # the stream of group 1, parameter 0
    expected, data = W.detach().clone(), seeded(2)
    for factor in factors[:3]:
        assert [g["lr"] for g in opt.param_groups] == [0.1 * factor, 0.1 / 32 * factor]
        G = torch.randn(10, 10, dtype=torch.complex128, generator=data)
        W_before, V_before = W.detach().clone(), V.detach().clone()
        W.grad, V.grad = G, torch.ones(10, dtype=torch.float64)
        opt.step()
        schedule.step()
        if factor:
            expected = ul.projunn_step(expected, G, lr=0.1 / 32 * factor, rank=2, rng=rng)
        torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-14)
        torch.testing.assert_close(V.detach(), V_before - 0.1 * factor, rtol=0, atol=1e-15)
    assert torch.equal(W.detach(), W_before) and torch.equal(V.detach(), V_before)  # lr 0: bit for bit
    assert error(W) < 1e-13

def test_per_group_settings():
    """lr, rank, variant and base are per group (the reference code applied one
    group's settings to all)."""
    A = unitary_parameter(12, dtype=torch.float64, generator=seeded(1))
    B = unitary_parameter(12, dtype=torch.float64, generator=seeded(2))
    A0, B0 = A.detach().clone(), B.detach().clone()
    opt = ProjUNN([{"params": [A], "rank": 1, "lr": 0.1, "variant": "tangent"},
                   {"params": [B], "rank": 4, "lr": 0.01, "base": "sgd", "variant": "direct"}],
                  lr=1.0, base="rmsprop", seed=3)
    G = torch.randn(12, 12, dtype=torch.float64, generator=seeded(4))
    A.grad, B.grad = G.clone(), G.clone()
    opt.step()
    # the generator of the update A0 -> A has rank 2 * 1, that of B0 -> B rank <= 2 * 4
    rank_A = torch.linalg.matrix_rank(A.detach() @ A0.T - torch.eye(12), atol=1e-10)
    rank_B = torch.linalg.matrix_rank(B.detach() @ B0.T - torch.eye(12), atol=1e-10)
    assert rank_A == 2 and 2 < rank_B <= 8
    expected_B = ul.projunn_step(B0, G, lr=0.01, rank=4, variant="direct", rng=np.random.default_rng([3, 1, 0]))
    torch.testing.assert_close(B.detach(), expected_B, rtol=0, atol=1e-14)
    assert "square_avg" in opt.state[A] and "square_avg" not in opt.state[B]


@pytest.mark.parametrize("given", ["generator", "named generator", "tensor", "tuple"])
def test_a_group_of_any_ordered_iterable_holds_its_parameters(given):
    # {"params": model.parameters()} made an empty group: the generator was
    # read by the checks, and the layer was never trained
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded(1))
    model = torch.nn.Linear(6, 2, dtype=torch.float64)
    plain = {"generator": model.parameters(), "named generator": model.named_parameters(),
             "tensor": model.weight, "tuple": (model.weight, model.bias)}[given]
    named = given == "named generator"
    opt = ProjUNN([{"params": [("W", W)] if named else [W]}, {"params": plain}], lr=0.1, base="sgd", seed=0)
    expected = model.weight.detach() - 0.1 * torch.ones(2, 6, dtype=torch.float64)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1 if given == "tensor" else 2]
    assert [g["unitary"] for g in opt.param_groups] == [True, False]
    if named:
        assert opt.param_groups[1]["param_names"] == ["weight", "bias"]
    model.weight.grad, W.grad = torch.ones_like(model.weight), torch.ones_like(W)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=0)
    assert error(W) < 1e-14 and opt.state[W]["projunn_steps"] == 1


def test_a_group_given_as_a_set_is_refused_as_torch_optim_refuses_it():
    W = unitary_parameter(4, dtype=torch.float64, generator=seeded(1))
    with pytest.raises(TypeError, match=r"param group 0: its parameters must be in an ordered collection \(a list\), "
                                        r"got a set"):
        ProjUNN([{"params": {W}}])


def test_float32_unitary_parameter_within_drift_tolerance():
    W = unitary_parameter(32, dtype=torch.float32, generator=seeded())
    opt = ProjUNN([W], lr=1e-2, base="adam", rank=2, seed=0)
    g = seeded(1)
    for _ in range(200):
        W.grad = torch.randn(32, 32, generator=g)
        opt.step()
    assert error(W) < ul.diagnostics.default_drift_tolerance("float32")


def test_closure_and_skipped_parameters():
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ProjUNN([{"params": [W], "unitary": True}, {"params": [unused]}], lr=0.1, seed=0)

    returned = []

    def closure():
        opt.zero_grad()
        loss = W.sum() ** 2
        loss.backward()
        returned.append(loss)
        return loss

    before = W.detach().clone()
    loss = opt.step(closure)
    assert loss is returned[0] and len(returned) == 1  # evaluated once, before the step
    assert not torch.equal(W.detach(), before)
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert unused not in opt.state


def test_state_dict_resume_repeats_the_uninterrupted_run(tmp_path):
    def build():
        rnn = UnitaryRNN(3, 10, complex=True, dtype=torch.float64, generator=seeded(0))
        return rnn, ProjUNN(rnn.parameters(), lr=1e-2, base="adam", rank=2, seed=11)

    def train(rnn, opt, steps, start):
        for step in range(start, start + steps):
            x = torch.randn(6, 4, 3, dtype=torch.float64, generator=seeded(100 + step))
            opt.zero_grad()
            rnn(x)[0].abs().mean().backward()
            opt.step()

    rnn, opt = build()
    train(rnn, opt, 10, 0)
    straight = {k: v.clone() for k, v in rnn.state_dict().items()}
    rnn, opt = build()
    train(rnn, opt, 4, 0)
    torch.save({"model": rnn.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pt")
    rnn, opt = build()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no pickled code needed
    rnn.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    train(rnn, opt, 6, 4)
    for key, value in rnn.state_dict().items():
        assert torch.equal(value, straight[key]), key


def test_bad_parameters_and_settings():
    square = unitary_parameter(4, dtype=torch.float64)
    rect = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    vector = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unitary parameter param_groups\[0\]\['params'\]\[0\] must be a matrix .* got shape \(4,\)"):
        ProjUNN([{"params": [vector], "unitary": True}])
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"unitary parameter bias must be a matrix .* got shape \(4,\)"):
        ProjUNN([{"params": [model.bias], "param_names": ["bias"], "unitary": True}])
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(n, m\) = 4 of unitary parameter"):
        ProjUNN([square], rank=5)
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(n, m\) = 3 of unitary parameter .* \(shape \(4, 3\)\)"):
        ProjUNN([{"params": [rect], "unitary": True}], rank=4)
    with pytest.raises(ValueError, match=r"ProjUNN: lr must be a finite number >= 0, got -0.1"):
        ProjUNN([square], lr=-0.1)
    with pytest.raises(ValueError, match=r"ProjUNN: base must be one of 'sgd', 'rmsprop', 'adam', got 'lion'"):
        ProjUNN([square], base="lion")
    with pytest.raises(ValueError, match=r"param group 1: variant must be one of 'tangent', 'direct', 'cayley', got 'geodesic'"):
        ProjUNN([{"params": [rect]}, {"params": [square], "variant": "geodesic"}])
    with pytest.raises(ValueError, match=r"param group 0 mixes unitary parameters .* with others"):
        ProjUNN([{"params": [square, rect]}])
    with pytest.raises(TypeError, match=r"unitary parameter .* has dtype torch.float16"):
        ProjUNN([{"params": [torch.nn.Parameter(torch.eye(3, dtype=torch.float16))], "unitary": True}])


def test_transformers_trainer_trains_with_projunn(tmp_path):
    """``Trainer(optimizers=(ProjUNN(model.parameters(), ...), None))``: the
    Trainer's loop (accelerate's optimizer wrapper, its linear schedule, its
    gradient clipping) keeps the orthogonal weight orthogonal while the
    other weights move. ``optimizer_cls_and_kwargs=(ProjUNN, ...)`` gets
    the Trainer's groups by weight decay, each mixing the marked weight with
    others, and is refused with the error that names the group."""
    transformers = pytest.importorskip("transformers")
    from unitary_lr.torch import OrthogonalLinear

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotate = OrthogonalLinear(8, 8)  # orthogonal weight, plain bias
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x, labels=None):
            out = self.head(torch.tanh(self.rotate(x))).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    torch.manual_seed(0)
    model = Model()
    data = [{"x": torch.randn(8), "labels": torch.randn(())} for _ in range(16)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, weight_decay=0.01, use_cpu=True, report_to=[],
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    opt = ProjUNN(model.parameters(), lr=1e-2, base="adam", rank=2, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert error(model.rotate.weight) < 1e-5 and opt.state[model.rotate.weight]["projunn_steps"] == 4
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert sorted(moved) == sorted(before)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=(ProjUNN, {"base": "adam", "rank": 2, "seed": 0}))
    with pytest.raises(ValueError, match=r"param group 0 mixes unitary parameters .* with others; .* "
                                         r"transformers.Trainer .* optimizers=\(ProjUNN\(model.parameters\(\), "):
        trainer.train()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("lr", -1e-3, r"lr must be a finite number >= 0, got -0.001"),
    ("lr", float("nan"), r"lr must be a finite number >= 0, got nan"),
    ("rank", 0, r"rank must be >= 1, got 0"),
    ("rank", 2.0, r"rank must be an integer, got float: 2.0"),
    ("variant", "geodesic", r"variant must be one of 'tangent', 'direct', 'cayley', got 'geodesic'"),
    ("power_iters", -1, r"power_iters must be >= 0, got -1"),
])
def test_options_edited_after_construction_are_checked_at_the_step(option, value, message):
    """The step checks a param group's options again (a scheduler or a user
    may edit them between steps), though not the parameter and its direction,
    which it made itself: a bad value is a ValueError or TypeError naming the
    parameter, and nothing changes."""
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    opt = ProjUNN([{"params": [W], "param_names": ["W"], "unitary": True}], lr=0.1, base="rmsprop", seed=0)
    W.grad = torch.ones(6, 6, dtype=torch.float64)
    opt.step()
    saved = W.detach().clone()
    saved_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[W].items()}
    opt.param_groups[0][option] = value
    # (an lr is checked for every group first, on the host: capturable ones check nothing else there)
    named = (r"^param group 0: " if option == "lr" else r"^W \(shape \(6, 6\)\): ") + message + \
        "; no parameter was changed"
    with pytest.raises((TypeError, ValueError), match=named):
        opt.step()
    assert torch.equal(W.detach(), saved)
    for key, before in saved_state.items():
        after = opt.state[W][key]
        assert torch.equal(after, before) if torch.is_tensor(before) else after == before, key


def test_a_base_edited_after_construction_and_a_tensor_lr_of_many_entries_are_named():
    """An unknown base edited into a group was a bare KeyError at the step;
    an lr tensor of two entries PyTorch's "only one element tensors can be
    converted", naming nothing."""
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    with pytest.raises(ValueError, match=r"^ProjUNN: lr must be a number or a real 0-d tensor "
                                         r"\(torch.tensor\(0.01\)\), got tensor\(\[0.1000, 0.2000\]\)$"):
        ProjUNN([W], lr=torch.tensor([0.1, 0.2]))
    opt = ProjUNN([W], lr=0.1, base="rmsprop", seed=0)
    W.grad = torch.ones(6, 6, dtype=torch.float64)
    opt.step()
    saved, saved_state = W.detach().clone(), _state_copy(opt.state[W])
    opt.param_groups[0]["base"] = "adamw"
    with pytest.raises(ValueError, match=r"^param group 0: base must be one of 'sgd', 'rmsprop', 'adam', got "
                                         r"'adamw'; AdamW is base='adam' with .*; no parameter was changed$"):
        opt.step()
    assert torch.equal(W.detach(), saved)
    _same_state(opt.state[W], saved_state)


@pytest.mark.parametrize(("base", "key", "value", "message"), [
    ("adam", "eps", None, r"eps must be a finite number >= 0, got None"),
    ("adam", "betas", (0.9,), r"betas must be two numbers in \[0, 1\), got \(0.9,\)"),
    ("adam", "weight_decay", "0.1", r"weight_decay must be a finite number >= 0, got '0.1'"),
    ("rmsprop", "alpha", None, r"alpha must be in \[0, 1\), got None"),
    ("sgd", "momentum", -0.5, r"momentum must be a finite number >= 0, got -0.5"),
    ("adam", "lr", "tensor", r"foreach=True needs a number lr or capturable=True, got lr=tensor\(0.0100\)"),
    ("adam", "lr", "tensors", r"lr must be a number or a real 0-d tensor \(torch.tensor\(0.01\)\), got tensor"),
])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_an_option_edited_into_a_plain_group_changes_no_group(base, key, value, message, where):
    """torch.optim's code steps the plain groups one after another, in place,
    after the unitary ones are computed: an option edited into one of them
    that it refuses (eps=None, a single beta, a tensor lr in a foreach group)
    failed there with torch's own words, after the plain groups before it
    had stepped, their step counts advanced. Now the step refuses it before
    anything changes, naming the group, wherever the group stands."""
    gen = seeded(5)
    W = unitary_parameter(5, dtype=torch.float64, generator=gen)
    a, b = (torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=gen)) for _ in range(2))
    groups = [{"params": [a]}, {"params": [b], "foreach": True}]
    groups.insert(where, {"params": [W]})
    opt = ProjUNN(groups, lr=0.05, base=base, rank=2, seed=0)
    edited = next(i for i, group in enumerate(opt.param_groups) if group["params"][0] is b)

    def step():
        for p in (W, a, b):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        opt.step()

    step()
    saved = [(p.detach().clone(), _state_copy(opt.state[p])) for p in (W, a, b)]
    lrs = {"tensor": torch.tensor(0.01), "tensors": torch.tensor([0.01, 0.02])}
    opt.param_groups[edited][key] = lrs[value] if key == "lr" else value
    with pytest.raises((TypeError, ValueError), match=rf"^param group {edited}: {message}.*; no parameter was changed$"):
        step()
    for p, (values, state) in zip((W, a, b), saved):
        assert torch.equal(p.detach(), values)
        _same_state(opt.state[p], state)


def test_a_step_checks_the_options_but_not_its_own_arrays_again(monkeypatch):
    """The eager step of a unitary parameter checks the group's options once
    and skips the public entry point's array checks (the parameter and the
    direction made from its gradient are the optimizer's own): those cost
    about 10 us a step on the CPU. Counted, not timed."""
    from unitary_lr import steps

    calls = {"arrays": 0, "options": 0}
    validated, options = steps._validated, steps._checked_options

    def counting(key, function):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(steps, "_validated", counting("arrays", validated))
    monkeypatch.setattr(steps, "_checked_options", counting("options", options))
    W = unitary_parameter(6, dtype=torch.float32, generator=seeded())
    opt = ProjUNN([W], lr=0.1, seed=0)
    W.grad = torch.ones(6, 6)
    opt.step()
    assert calls == {"arrays": 0, "options": 1}
    assert error(W) < 1e-5


def test_a_scheduler_that_cycles_an_option_gets_a_fresh_rule_and_no_growing_cache():
    """The optimizer keeps one base rule per group and makes it again when an
    option changes (as ``OneCycleLR`` cycles momentum or betas every step):
    each step's second moment uses that step's alpha, and the kept rules do
    not grow with the number of values seen."""
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    opt = ProjUNN([W], lr=0.01, base="rmsprop", seed=0)
    g = torch.linspace(-1, 1, 36, dtype=torch.float64).reshape(6, 6)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for alpha in (0.9, 0.8, 0.7, 0.95, 0.6):
        opt.param_groups[0]["alpha"] = alpha
        W.grad = g.clone()
        opt.step()
        expected = alpha * expected + (1 - alpha) * g * g
        torch.testing.assert_close(opt.state[W]["square_avg"], expected, rtol=1e-14, atol=0)
    assert [len(kept) for kept in opt._rules.values()] == [1]


def test_nan_gradient_changes_nothing():
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = ProjUNN(list(zip(["W", "b"], [W, b])), lr=0.1, base="adam", seed=0)
    W.grad, b.grad = torch.ones(6, 6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    opt.step()
    saved_W, saved_b = W.detach().clone(), b.detach().clone()
    saved_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[b].items()}
    W.grad = torch.ones(6, 6, dtype=torch.float64)
    b.grad = torch.tensor([1.0, 2, 3, float("inf"), 5, 6], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the gradient of b \(shape \(6,\)\) contains NaN or Inf; no parameter was changed"):
        opt.step()
    assert torch.equal(W.detach(), saved_W) and torch.equal(b.detach(), saved_b)
    for key, value in saved_state.items():
        assert torch.equal(torch.as_tensor(opt.state[b][key]), torch.as_tensor(value))


def _state_copy(state):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _same_state(state, saved):
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value, key


@pytest.mark.parametrize(("base", "hyper"), [("adam", {}), ("rmsprop", {}), ("sgd", {"momentum": 0.9})])
@pytest.mark.parametrize("lr", [0.0, "tensor"])
def test_nan_gradient_of_a_unitary_parameter_at_lr_0_changes_nothing(base, hyper, lr):
    """At lr = 0 (a warm-up's first steps) no step checks the gradient: its
    moments took the NaN silently, and every later step failed on them,
    blaming a finite gradient. Now the error is raised there, nothing changes,
    and the next steps (lr > 0) go on as an uninterrupted run."""
    lr = torch.tensor(0.0, dtype=torch.float64) if lr == "tensor" else lr
    Ws = [unitary_parameter(6, dtype=torch.float64, generator=seeded()) for _ in range(2)]
    opts = [ProjUNN([("W", W)], lr=lr, base=base, seed=0, rank=2, **hyper) for W in Ws]
    grads = [torch.randn(6, 6, dtype=torch.float64, generator=seeded(k)) for k in range(3)]
    for W, opt in zip(Ws, opts):
        W.grad = grads[0].clone()
        opt.step()
    W, opt = Ws[0], opts[0]
    saved_W, saved = W.detach().clone(), _state_copy(opt.state[W])
    for bad in (float("nan"), float("inf")):
        W.grad = grads[1].clone()
        W.grad[2, 3] = bad
        with pytest.raises(ValueError, match=r"^W \(shape \(6, 6\)\): its gradient contains NaN or Inf; "
                                             r"no parameter was changed$"):
            opt.step()
        assert torch.equal(W.detach(), saved_W)
        _same_state(opt.state[W], saved)
    if base != "sgd":  # a finite gradient whose square overflows the moments
        W.grad = torch.full((6, 6), 1e200, dtype=torch.float64)
        with pytest.raises(ValueError, match="too large for the .* rule's moments"):
            opt.step()
        _same_state(opt.state[W], saved)
    for W, opt in zip(Ws, opts):
        opt.param_groups[0]["lr"] = 0.1
        for g in grads[1:]:
            W.grad = g.clone()
            opt.step()
    assert torch.equal(Ws[0].detach(), Ws[1].detach())
    _same_state(opts[0].state[Ws[0]], _state_copy(opts[1].state[Ws[1]]))


@pytest.mark.parametrize("base", ["adam", "rmsprop"])
@pytest.mark.parametrize("first", [False, True])
def test_a_group_switched_between_capturable_and_eager_keeps_stepping(base, first):
    """``capturable`` edited in param_groups after the states were made: the
    next step adds the counters of the new way (it raised KeyError, and from
    eager to capturable only after the parameter had moved), keeps the
    moments and Adam's step count, and stays unitary; back again, too."""
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    twin = torch.nn.Parameter(W.detach().clone())
    opt = ProjUNN([W], lr=0.05, base=base, rank=2, seed=0, capturable=first)
    reference = ProjUNN([twin], lr=0.05, base=base, rank=2, seed=0, capturable=first, unitary=True)
    grads = [torch.randn(6, 6, dtype=torch.float64, generator=seeded(k)) for k in range(6)]
    ways = set()
    for k, g in enumerate(grads):
        if k in (2, 4):
            opt.param_groups[0]["capturable"] = not opt.param_groups[0]["capturable"]
        ways.add(opt.param_groups[0]["capturable"])
        W.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        state = opt.state[W]  # each way's counters, added when it first steps
        assert ("skipped_steps" in state) == (True in ways) and ("sketch_rng" in state) == (False in ways)
        if base == "adam":
            assert int(state["step"]) == k + 1 == int(reference.state[twin]["step"])
        moment = "exp_avg_sq" if base == "adam" else "square_avg"
        # the moments do not depend on the way (nor on W, for Adam and RMSprop)
        torch.testing.assert_close(state[moment], reference.state[twin][moment], rtol=1e-14, atol=0)
        assert error(W) < 1e-13
    assert int(opt.state[W].get("skipped_steps", 0)) == 0


def test_a_failed_first_step_leaves_no_state():
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    opt = ProjUNN([W], lr=0.1, base="adam")
    W.grad = torch.ones(6, 6, dtype=torch.float64)
    W.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        opt.step()
    assert opt.state_dict()["state"] == {} and W not in opt.state


# ------------------------------------------------------------------- layers


def test_unitary_parameter_inits():
    for dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        for init in ("haar", "identity", "henaff"):
            W = unitary_parameter(7, init=init, dtype=dtype, batch_shape=(2,), generator=seeded())
            assert isinstance(W, torch.nn.Parameter) and is_unitary(W) and W.dtype == dtype
            assert tuple(W.shape) == (2, 7, 7)
            assert error(W) < (1e-6 if dtype in (torch.float32, torch.complex64) else 1e-14)
    assert torch.equal(unitary_parameter(3, init="identity").detach(), torch.eye(3))
    henaff = unitary_parameter(5, init="henaff", dtype=torch.float64, generator=seeded()).detach()
    assert torch.all(henaff[4, :4] == 0) and henaff[4, 4] == 1  # 2 x 2 blocks, then a 1
    assert torch.all(henaff[0, 2:] == 0) and torch.all(henaff[2:, 0] == 0)
    with pytest.raises(ValueError, match=r"init must be one of 'haar', 'identity', 'henaff', got 'random'"):
        unitary_parameter(3, init="random")
    # any matrix shape is accepted (issue 13); zeros are not orthonormal rows
    with pytest.raises(ValueError, match=r"n_or_tensor \(shape \(2, 3\), float32\) is not unitary"):
        unitary_parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"n_or_tensor must be a matrix or a batch of matrices, got shape \(3,\)"):
        unitary_parameter(torch.zeros(3))
    # an empty batch for every init (henaff's stacked nothing), and errors that
    # name the argument (an integer tensor gave PyTorch's "can require gradients")
    for init in ("haar", "identity", "henaff"):
        assert tuple(unitary_parameter(3, init=init, batch_shape=(2, 0)).shape) == (2, 0, 3, 3)
    with pytest.raises(TypeError, match=r"^n_or_tensor has dtype torch.int64; a unitary parameter must be"):
        unitary_parameter(torch.eye(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^batch_shape must be a tuple of ints, got 2$"):
        unitary_parameter(3, batch_shape=2)


def test_modrelu_matches_its_formula_and_is_safe_at_zero():
    act = ModReLU(4, dtype=torch.float64)
    with torch.no_grad():
        act.bias.copy_(torch.tensor([-0.5, 0.2, 0.0, -2.0]))
    z = torch.tensor([[1 + 1j, -3j, 0j, 0.5]], dtype=torch.complex128, requires_grad=True)
    out = act(z)
    expected = [(1 + 1j) / math.sqrt(2) * (math.sqrt(2) - 0.5), -3j / 3 * 3.2, 0, 0]
    torch.testing.assert_close(out.detach(), torch.tensor([expected], dtype=torch.complex128))
    out.abs().sum().backward()
    assert torch.all(torch.isfinite(z.grad)) and torch.all(torch.isfinite(act.bias.grad))
    real = act(torch.tensor([[-2.0, 1.0, 0.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(real, torch.tensor([[-1.5, 1.2, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64, torch.complex128])
def test_modrelu_keeps_nan_and_the_input_dtype(dtype):
    """NaN became 0 (|NaN| > 0 is False), and a recurrent layer went on from
    a zero state without a word; a float64 bias made a float32 input's
    result float64, where the docstring says z's dtype."""
    act = ModReLU(3, dtype=torch.float64)
    z = torch.tensor([[float("nan"), 0.0, 2.0]], dtype=dtype)
    out = act(z)
    assert out.dtype == dtype and torch.isnan(out[0, 0]) and out[0, 1] == 0 and torch.isfinite(out[0, 2])
    rnn = UnitaryRNN(2, 3, dtype=torch.float64, generator=seeded())
    x = torch.randn(4, 1, 2, dtype=torch.float64, generator=seeded(1))
    x[1, 0, 0] = float("nan")
    outputs, h = rnn(x)
    assert torch.isfinite(outputs[0]).all() and torch.isnan(outputs[1:]).all() and torch.isnan(h).all()


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "relu", "tanh"])
def test_rnn_matches_a_hand_written_loop(complex_, nonlinearity):
    rnn = UnitaryRNN(3, 8, complex=complex_, nonlinearity=nonlinearity, dtype=torch.float64, generator=seeded())
    if rnn.bias is not None:
        with torch.no_grad():
            rnn.bias.normal_(generator=seeded(5))
    x = torch.randn(11, 2, 3, dtype=torch.float64, generator=seeded(1))
    h0 = torch.randn(1, 2, 8, dtype=rnn.weight_hh.dtype, generator=seeded(2))
    out, h = rnn(x, h0)
    activation = {"relu": torch.relu, "tanh": torch.tanh}.get(nonlinearity)
    state = h0[0]
    for t in range(11):
        pre = rnn.weight_hh @ state.T + rnn.weight_ih @ x[t].T.to(rnn.weight_ih.dtype)
        pre = pre.T + (rnn.bias if rnn.bias is not None else 0)
        if nonlinearity == "modrelu":
            state = rnn.activation(pre)
        elif complex_:
            state = torch.complex(activation(pre.real), activation(pre.imag))
        else:
            state = activation(pre)
        torch.testing.assert_close(out[t], state)
    torch.testing.assert_close(h, state.unsqueeze(0))
    batch_first, _ = UnitaryRNN(3, 8, complex=complex_, nonlinearity=nonlinearity, dtype=torch.float64,
                                batch_first=True, generator=seeded())(x.transpose(0, 1), h0)
    if rnn.bias is None:
        torch.testing.assert_close(batch_first.transpose(0, 1), out)
    single, last = rnn(x[:, 0], h0[:, 0])
    torch.testing.assert_close(single, out[:, 0])
    torch.testing.assert_close(last, h[:, 0])


def test_rnn_bad_input():
    rnn = UnitaryRNN(3, 8)
    with pytest.raises(ValueError, match=r"input must be \(T, B, 3\), .* got shape \(5, 2, 4\)"):
        rnn(torch.zeros(5, 2, 4))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 2, 8\), \(num_layers, B, hidden_size\); got \(3, 8\)"):
        rnn(torch.zeros(5, 2, 3), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 8\), \(num_layers, hidden_size\) for an unbatched "
                                         r"input; got \(2, 8\)"):
        rnn(torch.zeros(5, 3), torch.zeros(2, 8))
    # no time steps: refused as torch.nn.RNN refuses it (it raised torch.stack's "non-empty TensorList")
    for layer, empty in ((rnn, torch.zeros(0, 2, 3)), (rnn, torch.zeros(0, 3)),
                         (UnitaryRNN(3, 8, batch_first=True), torch.zeros(2, 0, 3)),
                         (UnitaryRNN(3, 8).compile_recurrence(4), torch.zeros(0, 2, 3))):
        with pytest.raises(ValueError, match=rf"input must have at least one time step, got shape "
                                             rf"\({', '.join(map(str, empty.shape))}\)"):
            layer(empty)
    # no sequences (a batch of 0): outputs and last states of no sequences
    outputs, h_n = rnn(torch.zeros(5, 0, 3))
    assert tuple(outputs.shape) == (5, 0, 8) and tuple(h_n.shape) == (1, 0, 8)
    with pytest.raises(ValueError, match=r"num_layers must be an integer >= 1, got 0"):
        UnitaryRNN(3, 8, 0)
    with pytest.raises(ValueError, match=r"nonlinearity must be 'modrelu', 'relu' or 'tanh', got 'gelu'"):
        UnitaryRNN(3, 8, nonlinearity="gelu")
    with pytest.raises(TypeError, match=r"dtype must be torch.float32 or torch.float64 .* got torch.complex64"):
        UnitaryRNN(3, 8, dtype=torch.complex64)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_rnn_shapes_follow_torch_nn_rnn(batch_first, num_layers):
    ours = UnitaryRNN(3, 8, num_layers, batch_first=batch_first, nonlinearity="tanh", dtype=torch.float64)
    theirs = torch.nn.RNN(3, 8, num_layers, batch_first=batch_first, dtype=torch.float64)
    x = torch.randn(*((2, 5) if batch_first else (5, 2)), 3, dtype=torch.float64)
    h0 = torch.randn(num_layers, 2, 8, dtype=torch.float64)
    for args in ((x,), (x, h0), (x[0] if batch_first else x[:, 0],), (x[0] if batch_first else x[:, 0], h0[:, 0])):
        (out, h), (expected_out, expected_h) = ours(*args), theirs(*args)
        assert out.shape == expected_out.shape and h.shape == expected_h.shape, args[0].shape
    assert [is_unitary(p) for p in ours.parameters()].count(True) == num_layers
    assert all(is_unitary(getattr(ours, name)) for name in ["weight_hh"] + [f"weight_hh_l{i}" for i in range(1, num_layers)])


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_two_layers_equal_two_stacked_single_layers_with_the_same_weights(complex_, nonlinearity, batch_first):
    options = {"complex": complex_, "nonlinearity": nonlinearity, "batch_first": batch_first, "dtype": torch.float64}
    deep = UnitaryRNN(3, 6, 2, generator=seeded(1), **options)
    first = UnitaryRNN(3, 6, generator=seeded(9), **options)
    second = UnitaryRNN(6, 6, generator=seeded(8), **options)
    # the same seed gives layer 0 the values of a single-layer UnitaryRNN
    torch.testing.assert_close(deep.weight_hh, UnitaryRNN(3, 6, generator=seeded(1), **options).weight_hh, rtol=0, atol=0)
    layer1 = {name.replace("_l1", ""): p for name, p in deep.named_parameters() if "_l1" in name}
    with torch.no_grad():
        first.load_state_dict({k: v for k, v in deep.state_dict().items() if "_l1" not in k})
        second.load_state_dict(layer1)
        if deep.bias is not None:
            deep.bias.normal_(generator=seeded(3))
            deep.bias_l1.normal_(generator=seeded(4))
            first.bias.copy_(deep.bias)
            second.bias.copy_(deep.bias_l1)
    x = torch.randn(4, 7, 3, dtype=torch.float64, generator=seeded(5))
    h0 = torch.randn(2, 4 if batch_first else 7, 6, dtype=deep.weight_hh.dtype, generator=seeded(6))
    out, h = deep(x, h0)
    middle, h_first = first(x, h0[:1])
    expected, h_second = second(middle, h0[1:])
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(h, torch.cat([h_first, h_second]), rtol=1e-13, atol=1e-14)
    # unbatched: the first sequence of the batch
    single, h_single = deep(x[0] if batch_first else x[:, 0], h0[:, 0])
    torch.testing.assert_close(single, out[0] if batch_first else out[:, 0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(h_single, h[:, 0], rtol=1e-13, atol=1e-14)


def test_rnn_former_h0_shape_still_works_with_a_future_warning():
    rnn = UnitaryRNN(3, 5, dtype=torch.float64, generator=seeded())
    x = torch.randn(4, 2, 3, dtype=torch.float64, generator=seeded(1))
    h0 = torch.randn(2, 5, dtype=torch.float64, generator=seeded(2))
    with pytest.warns(FutureWarning, match=r"h0 of shape \(2, 5\) is deprecated; .* shape \(1, 2, 5\)"):
        out, h = rnn(x, h0)
    expected_out, expected_h = rnn(x, h0.unsqueeze(0))
    assert torch.equal(out, expected_out) and torch.equal(h, expected_h) and h.shape == (1, 2, 5)
    with pytest.warns(FutureWarning, match=r"h0 of shape \(5,\) is deprecated"):
        rnn(x[:, 0], h0[0])
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 2, 5\)"):
        UnitaryRNN(3, 5, 2)(x.float(), h0.float())  # no former shape with two layers


def test_multi_layer_rnn_trains_with_projunn_and_keeps_every_recurrent_matrix_unitary():
    rnn = UnitaryRNN(3, 8, 2, complex=True, dtype=torch.float64, generator=seeded())
    opt = ProjUNN(rnn.parameters(), lr=1e-2, base="adam", seed=0)
    assert [len(g["params"]) for g in opt.param_groups if g["unitary"]] == [2]
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=seeded(1))
    before = rnn.weight_hh_l1.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        rnn(x)[0].abs().pow(2).mean().backward()
        opt.step()
    assert not torch.equal(before, rnn.weight_hh_l1.detach())
    assert error(rnn.weight_hh) < 1e-12 and error(rnn.weight_hh_l1) < 1e-12


@pytest.mark.slow
def test_rnn_learns_the_copy_task_below_the_memoryless_baseline():
    """Copy task with delay T = 20: K = 10 symbols of 8, recalled after a marker.
    The memoryless baseline is K log(8) / (T + 2K) = 0.52 nats per step."""
    T, K, batch = 20, 10, 64
    torch.manual_seed(0)
    rnn = UnitaryRNN(10, 64, batch_first=True, init="henaff", generator=seeded())
    readout = torch.nn.Linear(64, 9)
    opt = ProjUNN([{"params": [rnn.weight_hh], "unitary": True, "lr": 2e-3 / 32},
                   {"params": [rnn.weight_ih, *rnn.activation.parameters(), *readout.parameters()]}],
                  lr=2e-3, base="rmsprop", rank=1, seed=0)
    data = seeded(1)
    losses = []
    for _ in range(150):
        symbols = torch.randint(1, 9, (batch, K), generator=data)
        x = torch.zeros(batch, T + 2 * K, dtype=torch.long)
        x[:, :K], x[:, T + K - 1] = symbols, 9
        y = torch.zeros(batch, T + 2 * K, dtype=torch.long)
        y[:, T + K:] = symbols
        out, _ = rnn(torch.nn.functional.one_hot(x, 10).float())
        loss = torch.nn.functional.cross_entropy(readout(out).reshape(-1, 9), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    baseline = K * math.log(8) / (T + 2 * K)
    assert np.mean(losses[-10:]) < 0.3 * baseline
    assert error(rnn.weight_hh) < ul.diagnostics.default_drift_tolerance("float32")


def test_huge_finite_gradient_is_not_mistaken_for_inf():
    """The NaN/Inf check sums the gradient first; a sum that overflows must fall
    back to the exact test, not reject a finite gradient."""
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ProjUNN([b], lr=1e-320, base="sgd", seed=0)
    b.grad = torch.full((3,), 1e308, dtype=torch.float64)  # the sum overflows, the entries are finite
    opt.step()
    assert torch.all(torch.isfinite(b)) and torch.all(b < 0)


def test_gradient_too_large_to_sketch_is_reported_as_such():
    W = unitary_parameter(4, dtype=torch.float64, generator=seeded())
    opt = ProjUNN([W], lr=1e-3, base="sgd", seed=0)
    W.grad = torch.full((4, 4), 1e308, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"G is too large for its dtype: its sketch overflows \(largest \|entry\| 1e\+308"):
        opt.step()


def test_layers_show_their_sizes_and_document_forward():
    """print(model) tells the layers apart, and forward has its own
    documentation, not nn.Module's placeholder."""
    import inspect

    from unitary_lr.torch import FourierConv2d, ModReLU

    text = repr(UnitaryRNN(3, 16, complex=True, nonlinearity="tanh", batch_first=True))
    assert text.startswith("UnitaryRNN(3, 16, complex, unitary, nonlinearity='tanh', batch_first=True")
    assert "5, 7, real, orthogonal, nonlinearity='modrelu'" in repr(UnitaryRNN(5, 7))  # with a submodule
    assert "ModReLU(16)" in repr(UnitaryRNN(3, 16, complex=True)) and repr(ModReLU(4)) == "ModReLU(4)"
    for layer in (UnitaryRNN, ModReLU, FourierConv2d):
        doc = inspect.getdoc(layer.forward)
        assert "Returns" in doc and "Define the computation" not in doc, layer


@pytest.mark.parametrize("capturable", [False, True])
def test_a_unitary_parameter_listed_twice_is_refused(capturable):
    # tied weights, [*enc.parameters(), *dec.parameters()]: both updates, each
    # computed from the same W, were added to it (1.9 from unitary after one
    # step; capturable: 4.9e3 after six, no step skipped)
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded())
    with pytest.raises(ValueError, match=r"param group 0 lists unitary parameter param_groups\[0\]\['params'\]\[0\] "
                                         r"twice \(also as param_groups\[0\]\['params'\]\[1\]\): tied weights\?"):
        ProjUNN([W, W], lr=0.1, capturable=capturable)
    opt = ProjUNN([W], lr=0.1, capturable=capturable)
    with pytest.raises(ValueError, match=r"param group 1 lists unitary parameter a twice \(also as b\)"):
        opt.add_param_group({"params": [unitary_parameter(4)] * 2, "param_names": ["a", "b"]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("base", "cycled"), [("sgd", "momentum"), ("rmsprop", "momentum"), ("adam", "betas")])
def test_one_cycle_lr_cycles_the_momentum_the_base_uses(base, cycled):
    # OneCycleLR cycles betas[0] wherever the defaults hold betas: an SGD or
    # RMSprop step kept its momentum while the schedule ran
    options = {"sgd": {"momentum": 0.9}, "rmsprop": {"momentum": 0.9}, "adam": {}}[base]
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = ProjUNN([W, b], lr=0.01, base=base, seed=0, **options)
    reference = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base](
        [torch.nn.Parameter(torch.ones(6, dtype=torch.float64))], lr=0.01, **options)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (opt, reference)]
    for _ in range(4):
        W.grad, b.grad = torch.ones(6, 6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
        opt.step()
        reference.param_groups[0]["params"][0].grad = torch.ones(6, dtype=torch.float64)
        reference.step()
        for schedule in schedules:
            schedule.step()
    expected = reference.param_groups[0][cycled]
    assert expected != {"momentum": 0.9, "betas": (0.9, 0.999)}[cycled]  # it did cycle
    assert [group[cycled] for group in opt.param_groups] == [expected, expected]
    if base != "adam":
        assert "betas" not in opt.defaults and all("betas" not in group for group in opt.param_groups)
    torch.testing.assert_close(b.detach(), reference.param_groups[0]["params"][0].detach(), rtol=0, atol=0)


def test_a_group_of_another_base_takes_its_defaults():
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = ProjUNN([{"params": [W]}, {"params": [b], "base": "adam"}], lr=0.01, base="sgd", seed=0)
    assert opt.param_groups[1]["betas"] == (0.9, 0.999) and "betas" not in opt.param_groups[0]
    opt = ProjUNN([{"params": [W]}, {"params": [b], "base": "adam"}], lr=0.01, base="sgd", betas=(0.5, 0.6))
    assert opt.param_groups[1]["betas"] == (0.5, 0.6)


@pytest.mark.parametrize(("edit", "key"), [({"base": "adam"}, "exp_avg"), ({"momentum": 0.9}, "momentum_buffer"),
                                           ({"centered": True}, "grad_avg"), ({"base": "sgd", "momentum": 0.5}, None)])
def test_an_edited_rule_of_a_unitary_group_starts_its_moments(edit, key):
    # a KeyError at every step, where plain groups took the edit
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = ProjUNN([W, b], lr=0.01, rank=2, seed=0)  # rmsprop
    gradients = seeded(1)
    W.grad, b.grad = torch.randn(8, 8, dtype=torch.float64, generator=gradients), torch.ones(8, dtype=torch.float64)
    opt.step()
    square_avg = opt.state[W]["square_avg"].clone()
    for group in opt.param_groups:
        group.update(edit)
    for _ in range(2):
        W.grad, b.grad = torch.randn(8, 8, dtype=torch.float64, generator=gradients), torch.ones(8, dtype=torch.float64)
        opt.step()
    assert error(W) < 1e-14 and opt.state[W]["projunn_steps"] == 3
    if key is not None:
        assert key in opt.state[W] and key in opt.state[b]
    if edit.get("base") == "adam":
        assert opt.state[W]["step"] == 2 and torch.equal(opt.state[W]["square_avg"], square_avg)


def test_a_unitary_parameter_converted_to_half_since_is_named():
    model = torch.nn.Linear(8, 8, bias=False)
    from unitary_lr.torch import orthogonal

    orthogonal(model)
    opt = ProjUNN(model.parameters(), lr=1e-2, seed=0)
    model.half()
    model.weight.grad = torch.ones(8, 8, dtype=torch.half)
    before = model.weight.detach().clone()
    with pytest.raises(TypeError, match=r"unitary parameter param_groups\[0\]\['params'\]\[0\] has dtype "
                                        r"torch.float16; expected float32, .*no parameter was changed"):
        opt.step()
    assert torch.equal(model.weight.detach(), before) and not opt.state


def test_lr_of_another_type_is_a_type_error():
    W = unitary_parameter(4, dtype=torch.float64, generator=seeded())
    for lr in ("1", None):
        with pytest.raises(TypeError, match=r"ProjUNN: lr must be a real number, got (str '1'|NoneType None)"):
            ProjUNN([W], lr=lr)
    with pytest.raises(ValueError, match=r"ProjUNN: lr must be a finite number >= 0, got -1"):
        ProjUNN([W], lr=-1)


def _trained(groups_in_order, seed=0):
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded(seed))
    b = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    groups = [{"params": [W]}, {"params": [b]}]
    opt = ProjUNN(groups if groups_in_order else groups[::-1], lr=0.05, base="adam", seed=0)
    W.grad, b.grad = torch.ones(8, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    opt.step()
    return W, b, opt


def _snapshot(opt):
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()})


def test_a_state_dict_of_other_groups_is_refused_and_changes_nothing():
    # groups in another order put the unitary W under the plain Adam rule:
    # 1.32 from unitary after 20 steps, without a word
    _, _, saved = _trained(True)
    W, b, opt = _trained(False, seed=1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0 is plain here and unitary in the state_dict: the groups "
                                         r"differ \(in another order\?\); nothing was loaded"):
        opt.load_state_dict(saved.state_dict())
    # a torch.optim optimizer's: a bare KeyError that left Adam's groups in place
    lin = torch.nn.Linear(8, 8, dtype=torch.float64)
    adam = torch.optim.Adam(lin.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"state_dict's param group 0 lacks base, unitary, seed, rank, variant: it "
                                         r"was not saved by ProjUNN"):
        opt.load_state_dict(adam.state_dict() | {"param_groups": [dict(g, params=[0]) for g in
                                                                  adam.state_dict()["param_groups"]] * 2})
    assert _snapshot(opt)[0] == before[0] and opt.state[W]["step"] == 1


def test_a_saved_moment_of_another_shape_is_refused_and_changes_nothing():
    A = unitary_parameter(8, batch_shape=(1,), dtype=torch.float64, generator=seeded(1))
    B = unitary_parameter(8, dtype=torch.float64, generator=seeded(2))
    opt = ProjUNN([A, B], lr=0.05, base="rmsprop", rank=2, seed=0)
    A.grad, B.grad = torch.ones(1, 8, 8, dtype=torch.float64), torch.ones(8, 8, dtype=torch.float64)
    opt.step()
    A2, B2 = unitary_parameter(8, dtype=torch.float64, generator=seeded(3)), unitary_parameter(
        8, dtype=torch.float64, generator=seeded(4))
    fresh = ProjUNN([A2, B2], lr=0.05, base="rmsprop", rank=2, seed=0)
    with pytest.raises(ValueError, match=r"state_dict's state of param_groups\[0\]\['params'\]\[0\]: square_avg has "
                                         r"shape \(1, 8, 8\), the parameter \(8, 8\); nothing was loaded"):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state
    # a unitary group's saved rank above a parameter's size
    saved = opt.state_dict()
    saved["param_groups"][0]["rank"] = 9
    with pytest.raises(ValueError, match=r"rank 9 exceeds min\(n, m\) = 8 of unitary parameter"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["rank"] == 2


def test_a_weight_marked_in_another_precision_is_reprojected_at_the_first_step():
    # orthogonal(layer) in float32, then layer.double(): 2e-7 from unitary,
    # kept until the first drift check, 49 steps later
    from unitary_lr.torch import OrthogonalLinear

    torch.manual_seed(0)
    layer = OrthogonalLinear(16, 16, bias=False).double()
    assert error(layer.weight) > 1e-8
    twin = copy.deepcopy(layer)
    opt = ProjUNN(layer.parameters(), lr=1e-2, rank=2, seed=0)
    unchecked = ProjUNN(twin.parameters(), lr=1e-2, rank=2, seed=0, drift_check_every=0)
    x = torch.randn(3, 16, dtype=torch.float64, generator=seeded(1))
    for module, optimizer in ((layer, opt), (twin, unchecked)):
        module(x).sum().backward()
        optimizer.step()
    assert error(layer.weight) < 1e-14 and opt.state[layer.weight]["reprojections"] == 1
    assert error(twin.weight) > 1e-8  # drift_check_every=0 checks nothing, the first step neither
    # a unitary weight is left as it is: the sketches' stream is not drawn from
    W = unitary_parameter(8, dtype=torch.float64, generator=seeded())
    W0 = W.detach().clone()
    opt = ProjUNN([W], lr=0.1, base="sgd", rank=2, seed=3)
    W.grad = torch.randn(8, 8, dtype=torch.float64, generator=seeded(4))
    G = W.grad.clone()
    opt.step()
    expected = ul.projunn_step(W0, G, lr=0.1, rank=2, rng=np.random.default_rng([3, 0, 0]))
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-15)
    assert opt.state[W]["reprojections"] == 0


def test_a_group_added_after_a_resume_steps_as_in_the_run_never_stopped():
    # defaults["seed"] is not in a state_dict: a run resumed with seed=None
    # seeded a group added later from another draw (0.9 apart)
    def run(resume):
        A = unitary_parameter(6, dtype=torch.float64, generator=seeded(1))
        B = unitary_parameter(6, dtype=torch.float64, generator=seeded(2))
        torch.manual_seed(10)
        opt = ProjUNN([A], lr=0.1, base="sgd", rank=2)
        A.grad = torch.ones(6, 6, dtype=torch.float64)
        opt.step()
        if resume:
            saved = opt.state_dict()
            torch.manual_seed(11)  # another draw for the resumed optimizer's seed
            opt = ProjUNN([A], lr=0.1, base="sgd", rank=2)
            opt.load_state_dict(saved)
        opt.add_param_group({"params": [B]})
        A.grad, B.grad = torch.ones(6, 6, dtype=torch.float64), torch.ones(6, 6, dtype=torch.float64)
        opt.step()
        return A.detach(), B.detach()

    for expected, got in zip(run(False), run(True)):
        assert torch.equal(expected, got)


def test_an_edited_rank_above_a_parameters_size_is_refused_as_the_constructor_refuses_it():
    # it was capped at the step, without a word
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    opt = ProjUNN([W], lr=0.1, rank=2, seed=0)
    opt.param_groups[0]["rank"] = 7
    W.grad = torch.ones(6, 6, dtype=torch.float64)
    before = W.detach().clone()
    with pytest.raises(ValueError, match=r"rank 7 exceeds min\(n, m\) = 6 of unitary parameter "
                                         r"param_groups\[0\]\['params'\]\[0\] \(shape \(6, 6\)\)"):
        opt.step()
    assert torch.equal(W.detach(), before) and not opt.state
    opt.param_groups[0]["rank"] = 6
    opt.step()
    assert error(W) < 1e-14


def _trained_run(dtype, base, steps=3, **options):
    W = unitary_parameter(12, dtype=dtype, generator=seeded())
    opt = ProjUNN([W], lr=1e-2, base=base, rank=2, seed=0, **options)
    for k in range(steps):
        W.grad = torch.randn(12, 12, dtype=dtype, generator=seeded(10 + k))
        opt.step()
    return W, opt


@pytest.mark.parametrize("base", ["sgd", "rmsprop", "adam"])
@pytest.mark.parametrize(("saved", "resumed"), [(torch.float32, torch.float64), (torch.complex64, torch.complex128),
                                                (torch.complex128, torch.complex64)])
def test_a_run_resumed_in_another_precision_is_reprojected_and_its_moments_take_it(base, saved, resumed):
    """A float32 run resumed in float64 (model.double(), load_state_dict): W
    is 7e-8 from unitary, and was kept so until the 50th step's check (the
    first step's check saw a step count of 4). A complex run's moments
    stayed in the saved precision (torch.optim casts a floating parameter's
    only): Adam's step failed in lerp, RMSprop kept a float32 second moment
    of a complex128 weight."""
    options = {"momentum": 0.9} if base == "sgd" else {}
    W0, opt0 = _trained_run(saved, base, **options)
    W = unitary_parameter(12, dtype=saved)  # a model made .to(resumed) after it was built: its mark is kept
    W.data = W0.detach().to(resumed)
    opt = ProjUNN([W], lr=1e-2, base=base, rank=2, seed=0, **options)
    opt.load_state_dict(copy.deepcopy(opt0.state_dict()))
    real = W.real.dtype
    for key, value in opt.state[W].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            assert value.dtype == (W.dtype if value.is_complex() else real), key
    far = resumed in (torch.float64, torch.complex128)  # a 32-bit run's W in 64 bits
    assert error(W) > 1e-8 if far else error(W) < 1e-6
    W.grad = torch.randn(12, 12, dtype=resumed, generator=seeded(20))
    opt.step()
    assert opt.state[W]["reprojections"] == int(far)
    assert error(W) < (1e-14 if resumed in (torch.float64, torch.complex128) else 1e-6)
    # resumed in the same precision: no extra check, the same steps as the run that was not stopped
    twin = torch.nn.Parameter(W0.detach().clone())
    ul.torch.mark_unitary(twin)
    again = ProjUNN([twin], lr=1e-2, base=base, rank=2, seed=0, **options)
    again.load_state_dict(copy.deepcopy(opt0.state_dict()))
    for W_, opt_ in ((W0, opt0), (twin, again)):
        W_.grad = torch.randn(12, 12, dtype=saved, generator=seeded(21))
        opt_.step()
    assert torch.equal(twin.detach(), W0.detach()) and again.state[twin]["reprojections"] == 0


def test_a_parameter_made_double_in_the_middle_of_a_run_is_reprojected_and_steps():
    """model.double() between two steps: the float32 moments of a float64
    parameter failed in the fused rule ("result type Double can't be cast"),
    and the weight's float32 error was kept until the next scheduled check."""
    W, opt = _trained_run(torch.float32, "rmsprop")
    W.data = W.data.double()  # what Module.double() does to a parameter
    assert error(W) > 1e-8
    W.grad = torch.randn(12, 12, dtype=torch.float64, generator=seeded(30))
    opt.step()
    assert opt.state[W]["square_avg"].dtype == torch.float64
    assert error(W) < 1e-14 and opt.state[W]["reprojections"] == 1 and opt.state[W]["precision"] == "float64"


_PRECISION_NAMES = {torch.float32: "float32", torch.complex128: "complex128"}


@pytest.mark.parametrize("write", ["half round trip", "load_state_dict", "in-place edit", "to and back"])
def test_a_weight_written_by_something_else_between_steps_is_checked_at_the_next_step(write, first_drift_checks):
    """A weight that something other than the optimizer wrote between two
    steps has its drift checked at the next step, and is re-projected when
    it is off the group. ``layer.half().float()`` leaves an orthogonal
    weight 3e-4 from orthogonal in the float32 the state records (the new
    float32 copy even lands at the old address), and it stayed so, without
    a word, until the scheduled check 50 steps later."""
    from unitary_lr.torch import OrthogonalLinear

    checks = first_drift_checks(ul.torch.optimizer)
    torch.manual_seed(0)
    dtype = torch.float32 if write == "half round trip" else torch.float64
    layer = OrthogonalLinear(24, 24, bias=False).to(dtype)
    opt = ProjUNN(layer.parameters(), lr=1e-2, rank=2, seed=0)
    x = torch.randn(5, 24, dtype=dtype, generator=seeded(1))

    def step():
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()

    step(), step()  # (a float64 layer made from float32 is re-projected at its first step)
    assert checks == [True, False]
    before = opt.state[layer.weight]["reprojections"]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    noise = 1e-6 * torch.randn(24, 24, dtype=dtype, generator=seeded(2))
    if write == "half round trip":
        layer.half().float()
    elif write == "load_state_dict":
        layer.load_state_dict({"weight": layer.weight.detach() + noise})
    elif write == "in-place edit":
        with torch.no_grad():
            layer.weight.add_(noise)
    else:  # float64 through float32: another storage, rounded, its version counter unmoved
        layer.to(torch.float32).to(dtype)
    assert error(layer.weight) > 10 * tolerance
    step()
    assert checks[2] is True and opt.state[layer.weight]["reprojections"] == before + 1
    assert error(layer.weight) < tolerance
    step()  # and then the schedule again: nothing more is checked
    assert checks[3] is False and opt.state[layer.weight]["reprojections"] == before + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_a_resumed_optimizer_keeps_the_precision_and_checks_on_schedule(dtype, first_drift_checks):
    """torch.optim's load_state_dict rebuilds every iterable of a state as
    ``type(value)(generator)``: the recorded precision became the string
    "<generator object ...>", and every resumed run's next step counted as
    a first step in a new precision (an extra check, and with a tight
    drift_tol a re-projection that the run never stopped did not make)."""
    checks = first_drift_checks(ul.torch.optimizer)
    W, opt = _trained_run(dtype, "adam")
    again = ProjUNN([W], lr=1e-2, base="adam", rank=2, seed=0)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert again.state[W]["precision"] == opt.state[W]["precision"] == _PRECISION_NAMES[dtype]
    del checks[:]
    W.grad = torch.randn(12, 12, dtype=dtype, generator=seeded(40))
    again.step()
    assert checks == [False]


def test_parameters_that_share_a_tensor_are_not_checked_at_every_step(first_drift_checks):
    """Views of one tensor share its version counter: each one's write moves
    the others', which must not read as a write by someone else (a check at
    every step, two passes over each weight)."""
    checks = first_drift_checks(ul.torch.optimizer)
    whole = torch.stack([ul.random_unitary(8, dtype="float64", xp=torch, rng=k) for k in range(2)])
    A, B = torch.nn.Parameter(whole[0]), torch.nn.Parameter(whole[1])
    assert A.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
    opt = ProjUNN([mark_unitary(A), mark_unitary(B)], lr=1e-2, rank=2, seed=0)
    for k in range(3):
        A.grad, B.grad = (torch.randn(8, 8, dtype=torch.float64, generator=seeded(10 * k + j)) for j in range(2))
        opt.step()
    assert checks == [True, True, False, False, False, False]
    assert error(A) < 1e-14 and error(B) < 1e-14


def test_load_state_dict_hooks_run_as_in_torch_optim():
    """The pre-hooks run before the checks (a hook that upgrades an old
    checkpoint was never reached: "lacks variant"), the checks see what they
    return (a moment of another shape got past them), and the post-hooks see
    the loaded state (skipped_steps still float32)."""
    W, opt = _trained_run(torch.float32, "adam", capturable=True)
    saved = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)
    for group in old["param_groups"]:
        del group["variant"]
    calls = []

    def upgrade(optimizer, state_dict):
        calls.append("pre")
        for group in state_dict["param_groups"]:
            group.setdefault("variant", "tangent")

    def seen(optimizer):
        calls.append(optimizer.state[optimizer.param_groups[0]["params"][0]]["skipped_steps"].dtype)

    fresh, fresh_opt = _trained_run(torch.float32, "adam", steps=0, capturable=True)
    fresh_opt.register_load_state_dict_pre_hook(upgrade)
    fresh_opt.register_load_state_dict_post_hook(seen)
    fresh_opt.load_state_dict(old)
    assert calls == ["pre", torch.int64] and fresh_opt.param_groups[0]["variant"] == "tangent"

    def corrupt(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = torch.zeros(3, 3)
        return state_dict

    other, other_opt = _trained_run(torch.float32, "adam", steps=0, capturable=True)
    other_opt.register_load_state_dict_pre_hook(corrupt)
    with pytest.raises(ValueError, match=r"exp_avg has shape \(3, 3\), the parameter \(12, 12\); nothing was loaded"):
        other_opt.load_state_dict(saved)
    assert not other_opt.state
    # the hooks are still registered after the load (and after a refused one)
    assert [len(o._optimizer_load_state_dict_pre_hooks) for o in (fresh_opt, other_opt)] == [1, 1]


@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_betas_take_the_steps_of_float_betas(capturable):
    """torch.optim.Adam takes tensor betas; here the second step of a unitary
    group failed ("Concatenation operation is not implemented for NumPy
    arrays": the rule's state keys were found by a step on host arrays)."""
    runs = []
    for betas in ((0.8, 0.99), (torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64))):
        W = unitary_parameter(8, dtype=torch.float64, generator=seeded())
        opt = ProjUNN([W], lr=0.05, base="adam", rank=2, seed=0, capturable=capturable, betas=betas)
        for k in range(3):
            torch.manual_seed(k)
            W.grad = torch.randn(8, 8, dtype=torch.float64, generator=seeded(40 + k))
            opt.step()
        runs.append(W.detach())
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("lr", [math.nan, -0.1, math.inf])
def test_an_lr_edited_into_a_group_is_checked_at_the_step(capturable, lr):
    """A capturable group's step checked no lr: NaN gave a bare LinAlgError
    from eigh, a negative lr stepped uphill without a word."""
    W, opt = _trained_run(torch.float64, "rmsprop", steps=1, capturable=capturable)
    before, state = W.detach().clone(), copy.deepcopy(opt.state[W])
    opt.param_groups[0]["lr"] = lr
    W.grad = torch.ones(12, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^param group 0: lr must be a finite number >= 0, got {lr}; no parameter"):
        opt.step()
    assert torch.equal(W.detach(), before) and torch.equal(opt.state[W]["square_avg"], state["square_avg"])


def test_numpy_scalar_options_and_a_one_element_tensor_lr():
    """torch.optim takes lr=np.float32(...); it was a TypeError here, and
    unitary_lr_scale=np.float32(...) a ValueError showing the value. A tensor
    lr of shape (1,) passed the constructor and failed at every eager step."""
    W = unitary_parameter(6, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = ProjUNN([W, b], lr=np.float32(0.5), unitary_lr_scale=np.float32(0.25), base="sgd", seed=0)
    assert [type(g["lr"]) for g in opt.param_groups] == [float, float]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.125]
    W.grad, b.grad = torch.ones(6, 6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    opt.step()
    assert torch.equal(b.detach(), torch.full((6,), 0.5, dtype=torch.float64)) and error(W) < 1e-14
    with pytest.raises(ValueError, match=r"ProjUNN: lr must be a number or a real 0-d tensor \(torch.tensor\(0.01\)\), "
                                         r"got tensor\(\[0.0500\]"):
        ProjUNN([W], lr=torch.tensor([0.05]))


def test_a_plain_group_formed_by_the_marks_is_checked_after_groups_are_deleted_or_loaded():
    """The groups formed plain by the marks were kept by their places: after
    ``del opt.param_groups[0]`` the check fell on the unitary group that
    moved into place 0, and every step was refused ("was marked unitary
    after the optimizer was built")."""
    W = unitary_parameter(4, dtype=torch.float64, generator=seeded())
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    v = torch.nn.Parameter(torch.eye(4, dtype=torch.float64))
    opt = ProjUNN([W, b], lr=0.1, base="sgd", seed=0)
    opt.add_param_group({"params": [v]})
    assert [g["unitary"] for g in opt.param_groups] == [False, True, False]
    del opt.param_groups[0]
    W.grad = torch.ones(4, 4, dtype=torch.float64)
    opt.step()
    assert error(W) < 1e-14
    # the group of v is still checked, in its new place, after a deepcopy and a load
    ul.torch.mark_unitary(v)
    v.grad = torch.ones(4, 4, dtype=torch.float64)
    copied = copy.deepcopy(opt)
    copied.param_groups[1]["params"][0].grad = torch.ones(4, 4, dtype=torch.float64)  # (a copy has none)
    loaded = ProjUNN([W], lr=0.1, base="sgd", seed=0)
    u = torch.nn.Parameter(torch.eye(4, dtype=torch.float64))
    loaded.add_param_group({"params": [u]})  # (plain: u is not marked yet)
    loaded.load_state_dict(opt.state_dict())
    ul.torch.mark_unitary(u)
    u.grad = torch.ones(4, 4, dtype=torch.float64)
    for optimizer in (opt, copied, loaded):
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] was marked unitary after the "
                                             r"optimizer was built, and param group 1 steps it"):
            optimizer.step()


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("dtype", "shape", "rank"), [
    (torch.complex64, (12, 12), 2), (torch.complex128, (12, 12), 1), (torch.complex128, (12, 12), 2),
    (torch.complex128, (16, 6), 2), (torch.complex64, (12, 12), 1),
])
def test_a_parameter_with_the_lazy_conjugation_bit_steps_as_its_resolved_copy(dtype, shape, rank, foreach, capturable):
    """``nn.Parameter(U.conj())`` keeps PyTorch's conjugation bit (conj(U) is
    unitary as U is). The in-place update of a complex parameter on its real
    view raised "view_as_real doesn't work on unresolved conjugated tensors"
    (rank 2 in complex64, ranks 1 to 4 in complex128), after the parameters
    before it in the step were already updated."""
    U = torch.as_tensor(ul.random_unitary(*shape, dtype=str(dtype).split(".")[-1], rng=4))
    grads = [torch.randn(*shape, dtype=dtype, generator=seeded(s)) for s in range(3)]
    results = []
    for flagged in (True, False):
        first = mark_unitary(torch.nn.Parameter(U.clone()))
        W = mark_unitary(torch.nn.Parameter(U.clone().conj() if flagged else U.conj().resolve_conj()))
        assert W.is_conj() == flagged
        opt = ProjUNN([first, W], lr=0.05, base="adam", rank=rank, seed=0, foreach=foreach, capturable=capturable)
        torch.manual_seed(5)  # a capturable step draws from torch's generator
        for G in grads:
            first.grad, W.grad = G.clone(), G.clone()
            opt.step()
        results.append((first.detach().clone(), W.detach().resolve_conj()))
    # (the same values to rounding: PyTorch's products of a conjugate view round their own way)
    eps = torch.finfo(dtype).eps
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=50 * eps, rtol=0)
    assert error(results[0][1]) < 50 * eps
