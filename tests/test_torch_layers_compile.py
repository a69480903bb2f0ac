"""UnitaryRNN and ModReLU under ``torch.compile(fullgraph=True)``: the time loop
traces as one graph, with no graph break, forward and backward, and gives the
eager layer's outputs and gradients."""

from __future__ import annotations

import re
import warnings

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.torch import ModReLU, UnitaryRNN  # noqa: E402

# torch.compile reads the .grad of the tensors it is given, and a non-leaf one
# (a compiled chunk's input states) warns; torch's own doing, shown only where
# warnings are errors, as in this suite
NON_LEAF_GRAD = "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"


def _loss(rnn, x, h0):
    outputs, h = rnn(x, h0)
    return (outputs.abs() ** 2).sum() + (h.abs() ** 3).sum()


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "relu", "tanh"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_unitary_rnn_compiles_as_one_graph_forward_and_backward(complex_, nonlinearity, with_h0):
    generator = torch.Generator().manual_seed(3)
    rnn = UnitaryRNN(3, 6, complex=complex_, nonlinearity=nonlinearity, batch_first=True, dtype=torch.float64,
                     generator=generator)
    x = torch.randn(4, 7, 3, dtype=torch.float64, generator=generator)
    h0 = torch.randn(1, 4, 6, dtype=rnn.weight_hh.dtype, generator=generator) if with_h0 else None

    eager = _loss(rnn, x, h0)
    eager_grads = torch.autograd.grad(eager, list(rnn.parameters()))

    torch.compiler.reset()
    # aot_eager: dynamo traces the forward, AOTAutograd the backward, with no
    # C++ compile in the test; fullgraph=True makes any graph break an error
    compiled = torch.compile(_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes
        loss = compiled(rnn, x, h0)
        grads = torch.autograd.grad(loss, list(rnn.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-12, atol=0)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_explain_finds_no_graph_break_in_the_time_loop():
    """dynamo's own account: one graph for the whole sequence, zero breaks."""
    rnn = UnitaryRNN(2, 5, complex=True, generator=torch.Generator().manual_seed(0))
    torch.compiler.reset()
    explanation = torch._dynamo.explain(rnn)(torch.randn(9, 3, 2))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_modrelu_compiles_as_one_graph():
    act = ModReLU(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = torch.tensor([[3 + 4j, 0j, -1e-3 + 0j, 0.5j]], dtype=torch.complex128)
    torch.compiler.reset()
    compiled = torch.compile(act, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), act(z), rtol=1e-15, atol=0)


# --- compile_recurrence: the time loop compiled a chunk of steps at a time ---
# (each test below runs compiled chunks: NON_LEAF_GRAD applies)


def _counting_backend(graphs):
    """A torch.compile backend that runs dynamo's graph as it is and records,
    per compiled graph, how many time steps it holds (its addmm calls)."""
    def backend(gm, example_inputs):
        graphs.append(sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target is torch.addmm))
        return gm.forward
    return backend


@pytest.mark.filterwarnings(NON_LEAF_GRAD)
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "relu", "tanh"])
@pytest.mark.parametrize("layout", ["time_first", "batch_first", "unbatched"])
def test_compiled_recurrence_gives_the_eager_outputs_and_gradients(complex_, nonlinearity, layout):
    """Two layers, h0 given, T = 11 in chunks of 4, 4 and 3: outputs, last
    states and every parameter's gradient as the eager loop gives them."""
    generator = torch.Generator().manual_seed(5)
    rnn = UnitaryRNN(3, 6, num_layers=2, complex=complex_, nonlinearity=nonlinearity,
                     batch_first=layout == "batch_first", dtype=torch.float64, generator=generator)
    shape = {"time_first": (11, 4, 3), "batch_first": (4, 11, 3), "unbatched": (11, 3)}[layout]
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    h0 = torch.randn(2, *([] if layout == "unbatched" else [4]), 6, dtype=rnn.weight_hh.dtype, generator=generator)

    eager = _loss(rnn, x, h0)
    eager_grads = torch.autograd.grad(eager, list(rnn.parameters()))
    eager_out = rnn(x, h0)

    torch.compiler.reset()
    graphs = []
    assert rnn.compile_recurrence(4, backend=_counting_backend(graphs)) is rnn
    loss = _loss(rnn, x, h0)
    grads = torch.autograd.grad(loss, list(rnn.parameters()))
    out = rnn(x, h0)
    assert graphs == [4, 3]  # a full chunk and the last one, each compiled once
    torch.testing.assert_close(loss, eager, rtol=1e-13, atol=0)
    for got, expected in zip((*out, *grads), (*eager_out, *eager_grads)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings(NON_LEAF_GRAD)
@pytest.mark.parametrize(("T", "steps", "expected"), [
    (40, 5, [5]),        # 5 divides 40: one graph
    (97, 5, [5, 2]),     # 97 is prime: chunks of 5 and a last one of 2
    (120, 32, [30]),     # the copy task's --quick sequence: 4 chunks of 30, one graph
    (1020, 32, [30]),    # its full length: the same graph
    (7, 32, [7]),        # shorter than a chunk: one call
])
def test_a_compiled_graph_holds_at_most_steps_time_steps_whatever_T(T, steps, expected):
    """The compile cost follows ``steps``, not T: every graph holds at most
    ``steps`` time steps, and a sequence compiles at most two graphs."""
    rnn = UnitaryRNN(2, 4, generator=torch.Generator().manual_seed(1))
    torch.compiler.reset()
    graphs = []
    rnn.compile_recurrence(steps, backend=_counting_backend(graphs))
    x = torch.randn(T, 3, 2, generator=torch.Generator().manual_seed(2))
    outputs, h = rnn(x)
    rnn(x)  # no recompilation on the second call
    assert graphs == expected
    expected_outputs, expected_h = rnn.compile_recurrence(None)(x)
    torch.testing.assert_close(outputs, expected_outputs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h, expected_h, rtol=1e-6, atol=1e-7)


def test_compiled_recurrence_without_grad_gives_the_eager_outputs():
    """Inference (no autograd): the chunks' graphs of a forward with no
    backward, h0 given or not, equal the eager loop's outputs."""
    generator = torch.Generator().manual_seed(8)
    rnn = UnitaryRNN(3, 5, num_layers=2, complex=True, dtype=torch.float64, generator=generator)
    x = torch.randn(11, 2, 3, dtype=torch.float64, generator=generator)  # chunks of 4, 4 and 3
    h0 = torch.randn(2, 2, 5, dtype=torch.complex128, generator=generator)
    with torch.no_grad():
        expected = [rnn(x), rnn(x, h0)]
        torch.compiler.reset()
        graphs = []
        rnn.compile_recurrence(4, backend=_counting_backend(graphs))
        got = [rnn(x), rnn(x, h0)]
    assert graphs == [4, 3]
    for (outputs, h), (expected_outputs, expected_h) in zip(got, expected):
        torch.testing.assert_close(outputs, expected_outputs, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(h, expected_h, rtol=1e-13, atol=1e-15)


@pytest.mark.filterwarnings(NON_LEAF_GRAD)
def test_many_compiled_layers_in_one_process_do_not_exhaust_the_recompile_limit():
    """Each layer's loop keeps its own compiled graphs: twelve layers of two
    graphs each (24, where torch.compile keeps 8 per function by default)
    all compile; with ``fullgraph=True`` one more graph than the limit would
    be an error, not a silent fallback to eager."""
    torch.compiler.reset()
    x = torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(0))
    graphs = []
    for seed in range(12):
        rnn = UnitaryRNN(3, 4 + seed % 3, complex=seed % 2 == 1, generator=torch.Generator().manual_seed(seed))
        rnn.compile_recurrence(3, backend=_counting_backend(graphs))
        outputs, _ = rnn(x)
        expected, _ = rnn.compile_recurrence(None)(x)
        torch.testing.assert_close(outputs, expected, rtol=1e-6, atol=1e-7)
    assert graphs == [3, 1] * 12


@pytest.mark.filterwarnings(NON_LEAF_GRAD)
@pytest.mark.parametrize("steps", [0, -2, 2.5, True, "4", [4]])
def test_compile_recurrence_refuses_bad_steps_and_keeps_its_setting(steps):
    rnn = UnitaryRNN(2, 3, generator=torch.Generator().manual_seed(0))
    torch.compiler.reset()
    graphs = []
    rnn.compile_recurrence(2, backend=_counting_backend(graphs))
    expected = ValueError if type(steps) is int else TypeError  # a wrong type, or an integer below 1
    with pytest.raises(expected, match=re.escape("steps must be an integer >= 1 or None, got ")):
        rnn.compile_recurrence(steps)
    rnn(torch.randn(4, 1, 2))
    assert graphs == [2]  # still compiled, two steps a graph


def test_compile_recurrence_passes_torch_compile_its_options():
    rnn = UnitaryRNN(2, 3)
    with pytest.raises(RuntimeError, match="no-such-mode"):
        rnn.compile_recurrence(4, mode="no-such-mode")
    assert rnn._recurrence_steps is None  # refused: the loop stays eager


@pytest.mark.filterwarnings(NON_LEAF_GRAD)
def test_copies_and_pickles_of_a_compiled_layer_compile_their_own_loop():
    import copy
    import pickle

    rnn = UnitaryRNN(2, 5, complex=True, generator=torch.Generator().manual_seed(4))
    keys = list(rnn.state_dict())
    torch.compiler.reset()
    graphs = []
    rnn.compile_recurrence(3, backend=_counting_backend(graphs))
    x = torch.randn(6, 2, 2, generator=torch.Generator().manual_seed(5))
    expected, _ = rnn(x)
    twin = copy.deepcopy(rnn)  # (the backend, a function, is shared: it counts the copy's graph too)
    torch.testing.assert_close(twin(x)[0], expected, rtol=0, atol=0)
    assert graphs == [3, 3]  # the layer's graph, then the copy's own
    assert list(twin.state_dict()) == keys  # the setting is not state
    # a replica as torch.nn.DataParallel makes one at every forward (a new
    # object with a copy of the module's __dict__; DataParallel then gives it
    # its device's parameters, which needs GPUs) shares the compiled loop:
    # nothing compiles again
    replica = UnitaryRNN.__new__(UnitaryRNN)
    replica.__dict__ = rnn.__dict__.copy()
    torch.testing.assert_close(replica(x)[0], expected, rtol=0, atol=0)
    assert graphs == [3, 3]
    rnn.compile_recurrence(3, backend="aot_eager")  # a backend that pickles (a string)
    thawed = pickle.loads(pickle.dumps(rnn))
    assert thawed._recurrence_steps == 3 and list(thawed.state_dict()) == keys
    torch.testing.assert_close(thawed(x)[0], expected, rtol=0, atol=0)


def test_an_outer_compile_traces_the_whole_loop_as_before():
    """torch.compile of the whole model over a layer with a compiled
    recurrence: one graph, no break (the chunks are not nested compiles)."""
    rnn = UnitaryRNN(2, 5, complex=True, generator=torch.Generator().manual_seed(0))
    rnn.compile_recurrence(4, backend="aot_eager")
    torch.compiler.reset()
    explanation = torch._dynamo.explain(rnn)(torch.randn(9, 3, 2))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_householder_adapter_exports_and_traces_with_any_batch(dtype):
    """The update's blocked path was chosen from the row count (a multiple of
    8): torch.export with a dynamic batch failed on its guard, and a
    jit.trace made at 8 rows failed at 5 ('unflatten'). A traced program
    takes the plain product, the same values at every batch."""
    from torch import nn
    from torch.export import Dim

    from unitary_lr.torch import HouseholderAdapter

    generator = torch.Generator().manual_seed(3)
    adapter = HouseholderAdapter(nn.Linear(512, 16, dtype=dtype), reflectors=2, generator=generator)
    with torch.no_grad():
        adapter.sigma.copy_(torch.randn(adapter.sigma.shape, dtype=dtype, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracers' own notes (a TracerWarning raised inside torch's C code)
        exported = torch.export.export(adapter, (torch.randn(8, 512, dtype=dtype),),
                                       dynamic_shapes=({0: Dim("batch", min=2, max=64)},)).module()
        traced = torch.jit.trace(adapter, (torch.randn(8, 512, dtype=dtype),), check_trace=False)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for batch in (16, 5, 3):
        x = torch.randn(batch, 512, dtype=dtype, generator=generator)
        expected = adapter(x)
        torch.testing.assert_close(exported(x), expected, rtol=0, atol=tolerance)
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=tolerance)
