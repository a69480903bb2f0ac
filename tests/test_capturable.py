"""``ProjUNN(capturable=True)``: a step that reads nothing on the host, so that
it can be compiled with ``torch.compile`` or captured in a CUDA graph."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from _aten import AtenOps  # noqa: E402

import unitary_lr as ul  # noqa: E402
from unitary_lr import _host  # noqa: E402
from unitary_lr.torch import ProjUNN, mark_unitary, unitary_parameter  # noqa: E402


def _model(seed=0, dtype=torch.float32):
    W = unitary_parameter(32, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    b = torch.nn.Parameter(torch.zeros(32, dtype=W.real.dtype))
    return W, b


def _loss(W, b, x):
    y = x.to(W.dtype) @ W
    return ((y.real if y.is_complex() else y) + b).sin().pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
def test_the_skip_count_stays_an_integer_through_a_resume(dtype):
    # torch.optim's load_state_dict cast it to a float64 parameter's dtype, and
    # torch.compile drops in-place writes to a 0-d float64 CPU tensor: a
    # compiled step counted no skipped step after a resume
    W, b = _model(dtype=dtype)
    opt = ProjUNN([W, b], lr=1e-2, base="adam", capturable=True, rank=1)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    _loss(W, b, x).backward()
    W.grad[0, 0] = float("nan")
    opt.step()
    saved = opt.state_dict()
    resumed = ProjUNN([W, b], lr=1e-2, base="adam", capturable=True, rank=1)
    resumed.load_state_dict(saved)
    count = resumed.state[W]["skipped_steps"]
    assert count.dtype == torch.int64 and int(count) == 1
    resumed.step()  # the NaN gradient again: counted
    assert int(resumed.state[W]["skipped_steps"]) == 2 and resumed.state[W]["skipped_steps"].dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_capturable_step_reads_nothing_on_the_host(dtype, base):
    W, b = _model(dtype=dtype)
    opt = ProjUNN([W, b], lr=torch.tensor(1e-2), base=base, capturable=True)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        _loss(W, b, x).backward()
        before = _host.transfers.count
        with AtenOps() as ops:
            opt.step()
        assert ops.scalar_reads == 0 and _host.transfers.count == before
    assert float(ul.unitarity_error(W.detach())) < 1e-5
    assert int(opt.state[W]["skipped_steps"]) == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_plain_adam_parameters_read_nothing_on_the_host_either(weight_decay):
    """The plain parameters of a capturable optimizer that the fused rules do
    not take (complex ones, kept as pairs of reals; weight decay) went to the
    generic Adam, whose bias correction took ``math.sqrt`` of the device's
    step count: a read on the host every step (a CUDA-graph capture fails
    there, torch.compile breaks its graph). Now computed on the device."""
    W = unitary_parameter(8, generator=torch.Generator().manual_seed(0))
    b = torch.nn.Parameter(torch.zeros(8))
    c = torch.nn.Parameter(torch.zeros(8, dtype=torch.complex64))
    opt = ProjUNN([W, b, c], lr=1e-2, base="adam", capturable=True, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in (W, b, c):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        with AtenOps() as ops:
            opt.step()
        assert ops.scalar_reads == 0
    assert all(int(opt.state[p]["step"]) == 3 for p in (W, b, c))


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "options", "dtype"), [
    ("tangent", {}, torch.float32), ("direct", {}, torch.float32),
    ("tangent", {"amsgrad": True, "maximize": True}, torch.float32), ("tangent", {}, torch.float64)])
def test_compiled_capturable_step_equals_the_eager_one(variant, options, dtype):
    """(float64: torch.compile drops in-place writes to a 0-d float64 CPU
    tensor, so a step count kept in float64 stayed at 1; it is float32.)"""
    import torch._inductor.config as inductor_config

    W1, b1 = _model(dtype=dtype)
    W2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (W1, b1))
    mark_unitary(W2)
    eager = ProjUNN([W1, b1], lr=1e-2, base="adam", variant=variant, capturable=True, **options)
    compiled_opt = ProjUNN([W2, b2], lr=1e-2, base="adam", variant=variant, capturable=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own deprecation notes
        compiled = torch.compile(compiled_opt.step)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    previous = inductor_config.fallback_random
    inductor_config.fallback_random = True  # the compiled sketch draws eager's numbers
    try:
        for step in range(3):
            for W, b, opt in ((W1, b1, eager), (W2, b2, compiled_opt)):
                opt.zero_grad()
                _loss(W, b, x).backward()
            torch.manual_seed(step)
            eager.step()
            torch.manual_seed(step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.compile's own notes
                compiled()
    finally:
        inductor_config.fallback_random = previous
    assert torch.allclose(W1.detach(), W2.detach(), atol=1e-5)
    assert torch.allclose(b1.detach(), b2.detach(), atol=1e-5)
    assert float(ul.unitarity_error(W2.detach())) < 1e-5
    assert int(compiled_opt.state[W2]["step"]) == int(compiled_opt.state[b2]["step"]) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(("variant", "rank", "dtype"), [
    ("tangent", 1, torch.float32), ("direct", 1, torch.complex64), ("cayley", 1, torch.float32),
    ("tangent", 3, torch.complex64), ("direct", 3, torch.float32), ("cayley", 3, torch.complex64)])
def test_non_finite_update_is_skipped_and_counted(bad, variant, rank, dtype):
    """NaN or Inf in one gradient entry: the parameter and the rule's state
    keep their values, the skip is counted, nothing raises (a rank-3 step's
    device eigh sees no NaN), and the next finite step goes on as usual."""
    W, b = _model(dtype=dtype)
    opt = ProjUNN([W, b], lr=1e-2, base="rmsprop", capturable=True, variant=variant, rank=rank)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    _loss(W, b, x).backward()
    opt.step()
    state = {key: value.clone() for key, value in opt.state[W].items()}
    before = W.detach().clone()
    finite_grad = W.grad.clone()
    W.grad[2, 3] = bad if not dtype.is_complex else complex(0.5, bad)
    opt.step()
    assert torch.equal(W.detach(), before)
    assert torch.equal(opt.state[W]["square_avg"], state["square_avg"])
    assert int(opt.state[W]["skipped_steps"]) == 1
    W.grad = finite_grad
    opt.step()
    assert not torch.equal(W.detach(), before)
    assert int(opt.state[W]["skipped_steps"]) == 1
    assert float(ul.unitarity_error(W.detach())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_finiteness_flag_under_inductor(dtype):
    """The capturable step's NaN/Inf test compiled by Inductor as eager runs
    it: its form before (``x * 0 == 0``) Inductor simplified to True."""
    from unitary_lr.torch.optimizer import _finite_flag, _finite_numbers

    torch.compiler.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes
        flag = torch.compile(_finite_flag, dynamic=False)
        numbers = torch.compile(lambda x, y: _finite_numbers(x.sum(), y.sum()), dynamic=False)
        big = torch.finfo(torch.float32).max
        for value, finite in ((1.0, True), (-big, True), (float("nan"), False), (float("inf"), False),
                              (-float("inf"), False)):
            t = torch.tensor([[0.5, -2.0], [3.0, value]]).to(dtype)
            if dtype.is_complex:
                t = t * (1 - 1j) if value == value else t + 1j  # NaN enters the real part
            assert bool(flag(t)) is bool(_finite_flag(t)) is finite, value
            assert bool(numbers(t, torch.ones(2, dtype=dtype))) is finite, value


@pytest.mark.slow
@pytest.mark.parametrize(("base", "dtype", "bad"), [("rmsprop", torch.float32, float("nan")),
                                                    ("adam", torch.complex64, float("inf"))])
def test_compiled_capturable_step_skips_a_non_finite_update(base, dtype, bad):
    """Under torch.compile (Inductor) as in eager mode: the parameter and the
    rule's state keep their values and the skip is counted (the compiled
    step wrote NaN into W, and its moments, and counted nothing)."""
    W, b = _model(dtype=dtype)
    opt = ProjUNN([W, b], lr=1e-2, base=base, capturable=True)
    torch.compiler.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes
        step = torch.compile(opt.step)
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
        _loss(W, b, x).backward()
        step()
        state = {key: value.clone() for key, value in opt.state[W].items()}
        before = W.detach().clone()
        W.grad[2, 3] = bad
        step()
    assert torch.equal(W.detach(), before)
    for key, value in state.items():
        assert torch.equal(opt.state[W][key], value) or key == "skipped_steps", key
    assert int(opt.state[W]["skipped_steps"]) == 1


@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_a_non_finite_first_step_keeps_the_initial_state(base):
    """On the very first step the state is the rule's initial one, not yet
    stored: a skipped first step must store it as it was (zeros), not the
    moments of the NaN gradient."""
    W, _ = _model()
    opt = ProjUNN([W], lr=1e-2, base=base, capturable=True)
    before = W.detach().clone()
    W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(2))
    W.grad[1, 1] = float("nan")
    opt.step()
    assert torch.equal(W.detach(), before)
    assert int(opt.state[W]["skipped_steps"]) == 1
    moments = [key for key in ("square_avg", "exp_avg", "exp_avg_sq") if key in opt.state[W]]
    assert moments and all(torch.count_nonzero(opt.state[W][key]) == 0 for key in moments)
    if base == "adam":
        assert float(opt.state[W]["step"]) == 0
    W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(3))
    opt.step()
    assert not torch.equal(W.detach(), before)
    assert all(bool(torch.isfinite(opt.state[W][key]).all()) for key in moments)


def test_huge_finite_gradient_is_not_skipped():
    """Entries near the dtype's largest value are finite: the guard must not
    take them for an overflow (a sum of them would be Inf). Plain SGD, whose
    direction is the gradient itself (RMSprop's squares would overflow), and
    the direct step, which saturates to a well-defined polar factor (the
    angle of a tangent step that large is lost to rounding)."""
    W, b = _model()
    opt = ProjUNN([W, b], lr=1e-2, base="sgd", capturable=True, variant="direct")
    before = W.detach().clone()
    W.grad = 2e36 + 1e35 * torch.randn(W.shape, generator=torch.Generator().manual_seed(3))
    assert not torch.isfinite(W.grad.sum())
    opt.step()
    assert int(opt.state[W]["skipped_steps"]) == 0
    assert not torch.equal(W.detach(), before)
    assert float(ul.unitarity_error(W.detach())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_guard_writes_no_mask_of_the_parameter_size(dtype):
    """The NaN/Inf guard of a capturable step reads the direction once and
    writes nothing of its size: no elementwise mask (``isfinite(d).all()``
    writes one) and no zeroed copy of the direction. The one select of the
    parameter's size left keeps the rule's state on a skipped step."""
    n = 48

    W = unitary_parameter(n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    opt = ProjUNN([W], lr=torch.tensor(1e-2), base="rmsprop", capturable=True)
    W.grad = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(1))
    opt.step()
    with AtenOps() as ops:
        opt.step()
    writes = ops.writes(n * n)
    assert not [op for op, kind in writes if kind == torch.bool], writes
    assert not [op for op, _ in writes if "zeros" in op or "full" in op], writes
    assert sum("where" in op for op, _ in writes) == 1, writes


@pytest.mark.parametrize("base", ["rmsprop", "adam"])
def test_state_keeps_its_storage_from_step_to_step(base):
    """A captured CUDA graph replays into the buffers it was captured with, so
    a capturable step writes the new state into the old tensors, for unitary
    and plain parameters, on a taken step and on a skipped one."""
    W, b = _model()
    opt = ProjUNN([W, b], lr=1e-2, base=base, capturable=True)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    _loss(W, b, x).backward()
    opt.step()
    storage = {(id(p), key): value.data_ptr() for p in (W, b) for key, value in opt.state[p].items()
               if isinstance(value, torch.Tensor)}
    before = {(id(p), key): value.clone() for p in (W, b) for key, value in opt.state[p].items()
              if isinstance(value, torch.Tensor)}
    for bad in (False, True, False):
        opt.zero_grad()
        _loss(W, b, x).backward()
        if bad:
            W.grad[0, 0] = float("nan")
        opt.step()
        now = {(id(p), key): value.data_ptr() for p in (W, b) for key, value in opt.state[p].items()
               if isinstance(value, torch.Tensor)}
        assert now == storage
    assert int(opt.state[W]["skipped_steps"]) == 1
    changed = [key for key, value in before.items()
               if not torch.equal(value, dict(opt.state[W] if key[0] == id(W) else opt.state[b])[key[1]])]
    assert {key for _, key in changed} >= ({"square_avg"} if base == "rmsprop" else {"exp_avg", "exp_avg_sq", "step"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("variant", ["tangent", "cayley", "direct"])
def test_cuda_graph_replays_advance_parameter_and_state(dtype, variant):
    """The use capturable=True is for: ``opt.step()`` captured once in a CUDA
    graph (PyTorch's whole-network capture recipe, with a static gradient)
    and replayed. Every replay must move W, keep it unitary, advance the
    RMSprop average in the state's own tensor and draw a new sketch. Rank 1,
    whose traced cores are closed forms (no library solver; the direct
    step's on a square W too)."""
    _capture_and_replay(dtype, rank=1, variant=variant)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("rank, variant", [(8, "tangent"), (2, "cayley"), (2, "direct")])
def test_cuda_graph_capture_of_a_solver_step_says_why(rank, variant):
    """Steps whose traced cores call ``torch.linalg.eigh`` or ``svd``, which a
    CUDA graph cannot capture (cusolverDnXsyevd failed under capture on an
    H200, PyTorch 2.11): the optimizer's own RuntimeError, raised before that
    call, so the capture ends cleanly and no bare CUDA error replaces it; the
    parameter is untouched and the device still steps eagerly."""
    with pytest.raises(RuntimeError, match="could not capture this step") as caught:
        _capture_and_replay(torch.float32, rank=rank, variant=variant)
    assert type(caught.value) is RuntimeError and caught.value.__cause__ is None
    assert f"rank {rank}" in str(caught.value) and "torch.linalg.eigh" in str(caught.value)
    W = unitary_parameter(16, device="cuda")
    W.grad = torch.randn(16, 16, device="cuda")
    ProjUNN([W], lr=1e-2, rank=rank, variant=variant).step()
    assert float(ul.unitarity_error(W.detach())) < 1e-5


def test_which_steps_a_cuda_graph_captures():
    from unitary_lr.torch.optimizer import captures_in_cuda_graph

    assert all(captures_in_cuda_graph(1, variant) for variant in ("tangent", "cayley", "direct"))
    assert captures_in_cuda_graph(1, "tangent", square=False) and captures_in_cuda_graph(1, "cayley", square=False)
    assert not any(captures_in_cuda_graph(rank, variant, square=square) for rank, variant, square in
                   [(2, "tangent", True), (8, "cayley", True), (1, "direct", False), (4, "direct", True)])


def _capture_and_replay(dtype, *, rank, variant):
    device = torch.device("cuda")
    W = unitary_parameter(64, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(0))
    opt = ProjUNN([W], lr=torch.tensor(1e-2, device=device), base="rmsprop", capturable=True, rank=rank,
                  variant=variant)
    W.grad = torch.randn(64, 64, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(1))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the state is made outside the graph
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    averages, moves = [opt.state[W]["square_avg"].clone()], []
    for _ in range(4):
        before = W.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        averages.append(opt.state[W]["square_avg"].clone())
        moves.append(W.detach() - before)
    assert all(not torch.equal(a, b) for a, b in zip(averages, averages[1:]))
    assert all(float(move.abs().max()) > 0 for move in moves)
    assert float(ul.unitarity_error(W.detach())) < 1e-4
    assert int(opt.state[W]["skipped_steps"]) == 0


def test_check_drift_reprojects_a_drifted_parameter():
    W, b = _model(dtype=torch.float64)
    opt = ProjUNN([W, b], lr=1e-2, capturable=True, drift_tol=1e-10)
    with torch.no_grad():
        W.add_(1e-6 * torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    assert float(ul.unitarity_error(W.detach())) > 1e-7
    assert opt.check_drift() == 1
    assert float(ul.unitarity_error(W.detach())) < 1e-14
    assert opt.check_drift() == 0


def test_capturable_must_be_a_bool():
    W, _ = _model()
    with pytest.raises(ValueError, match=r"capturable must be True or False, got 'yes'"):
        ProjUNN([W], capturable="yes")


def _compiled_step(opt, **options):
    torch.compiler.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own deprecation notes
        return torch.compile(opt.step, backend="aot_eager", **options)


@pytest.mark.parametrize(("base", "dtype"), [("rmsprop", torch.float32), ("adam", torch.complex64),
                                             ("sgd", torch.float64)])
def test_compiled_step_of_a_group_that_is_not_capturable_is_the_eager_step(base, dtype):
    """Inside a compiled step Dynamo shows every group as capturable; a
    unitary group left eager runs its eager step there, outside the graph:
    its seed's sketches, its state, its drift control (re-projections at a
    tolerance every step exceeds), bit for bit, and an eager step after
    compiled ones goes on from their state (it raised KeyError)."""
    W1, b1 = _model(dtype=dtype)
    W2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (W1, b1))
    mark_unitary(W2)
    options = {"lr": 1e-2, "base": base, "seed": 4, "drift_check_every": 2, "drift_tol": 1e-30}
    eager, compiled_opt = ProjUNN([W1, b1], **options), ProjUNN([W2, b2], **options)
    compiled = _compiled_step(compiled_opt)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        for W, b, opt in ((W1, b1, eager), (W2, b2, compiled_opt)):
            opt.zero_grad()
            _loss(W, b, x).backward()
        eager.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's own notes
            compiled() if step < 3 else compiled_opt.step()
    assert torch.equal(W1.detach(), W2.detach()) and torch.equal(b1.detach(), b2.detach())
    for p1, p2 in ((W1, W2), (b1, b2)):
        state1, state2 = eager.state[p1], compiled_opt.state[p2]
        assert state1.keys() == state2.keys()
        for key, value in state1.items():
            assert torch.equal(value, state2[key]) if isinstance(value, torch.Tensor) else value == state2[key]
    assert compiled_opt.state[W2]["projunn_steps"] == 4
    assert compiled_opt.state[W2]["reprojections"] == 3  # after steps 1, 2 and 4
    assert "skipped_steps" not in compiled_opt.state[W2]


def test_fullgraph_compile_of_a_step_that_is_not_capturable_names_the_way_out():
    W, b = _model()
    opt = ProjUNN([W, b], lr=1e-2, base="adam")
    W.grad, b.grad = torch.ones_like(W), torch.ones_like(b)
    before = W.detach().clone()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"not capturable.*pass capturable=True"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _compiled_step(opt, fullgraph=True)()
    assert torch.equal(W.detach(), before) and not opt.state


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_a_capturable_group_still_compiles_as_one_graph(dtype):
    """Only groups left eager run outside the graph: a capturable optimizer's
    step compiles with fullgraph=True, its state the capturable one (complex
    too: its update's layout test read a module name with str.startswith,
    which Dynamo does not trace)."""
    W, b = _model(dtype=dtype)
    opt = ProjUNN([W, b], lr=1e-2, base="rmsprop", capturable=True)
    W.grad, b.grad = torch.randn(W.shape, dtype=W.dtype), torch.randn(b.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compiled_step(opt, fullgraph=True)()
    assert int(opt.state[W]["skipped_steps"]) == 0 and "sketch_rng" not in opt.state[W]
    assert float(ul.unitarity_error(W.detach())) < 1e-5


@pytest.mark.parametrize(("base", "edit"), [("adam", {"lr": 0.5}), ("sgd", {"momentum": 0.5}),
                                            ("rmsprop", {"alpha": 0.9})])
def test_a_fullgraph_step_goes_on_when_a_float_option_changes(base, edit):
    """A float lr (or a rule's momentum, alpha) changed between compiled calls
    is symbolic once Dynamo recompiles: the rank-2 cores failed on it
    ("unsupported operand type(s) for *: 'complex' and 'float'"), the rule's
    cache key on "sort with non-constant keys". The compiled steps are the
    eager ones (to rounding: compiled, lr is a tensor)."""
    options = {"lr": 1e-2, "base": base, "rank": 2, "capturable": True,
               **({"momentum": 0.9} if base == "sgd" else {})}
    (W1, b1), (W2, b2) = _model(dtype=torch.float64), _model(dtype=torch.float64)
    eager, compiled_opt = ProjUNN([W1, b1], **options), ProjUNN([W2, b2], **options)
    compiled = _compiled_step(compiled_opt, fullgraph=True)
    x = torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        for W, b, opt in ((W1, b1, eager), (W2, b2, compiled_opt)):
            opt.zero_grad()
            _loss(W, b, x).backward()
            if step:  # scaled at every call: a new value each time
                for group in opt.param_groups:
                    for name, factor in edit.items():
                        group[name] *= factor
        torch.manual_seed(10 + step)  # the capturable sketches' generator
        eager.step()
        torch.manual_seed(10 + step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.compile's own notes
            compiled()
        torch.testing.assert_close(W2.detach(), W1.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(b2.detach(), b1.detach(), rtol=0, atol=1e-14)
    assert float(ul.unitarity_error(W2.detach())) < 1e-13


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_of_a_step_that_is_not_capturable_names_the_option():
    """Its eager step reads the host, which would end the capture with a bare
    CUDA error: the optimizer's own RuntimeError first, nothing changed, and
    the same optimizer steps eagerly afterwards."""
    device = torch.device("cuda")
    W = unitary_parameter(16, device=device, generator=torch.Generator(device).manual_seed(0))
    opt = ProjUNN([W], lr=1e-2, base="rmsprop")
    W.grad = torch.randn(16, 16, device=device)
    before = W.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"param group 0 is not capturable.*pass capturable=True"):
        with torch.cuda.graph(graph):
            opt.step()
    assert torch.equal(W.detach(), before) and not opt.state
    opt.step()
    assert not torch.equal(W.detach(), before) and float(ul.unitarity_error(W.detach())) < 1e-5


def test_capture_of_a_step_that_is_not_capturable_is_refused_before_it_starts(monkeypatch):
    """The refusal's branch on the CPU, with PyTorch told that a capture is
    under way: the error names the group and the option, nothing changes."""
    W, b = _model()
    opt = ProjUNN([W], lr=1e-2, base="adam")
    opt.add_param_group({"params": [b], "capturable": True})
    W.grad, b.grad = torch.ones_like(W), torch.ones_like(b)
    before = W.detach().clone()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"param group 0 is not capturable.*pass capturable=True"):
        opt.step()
    assert torch.equal(W.detach(), before) and not opt.state
