"""UnitaryRNN and ModReLU under ``torch.compile(fullgraph=True)``: the time loop
traces as one graph, with no graph break, forward and backward, and gives the
eager layer's outputs and gradients."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.torch import ModReLU, UnitaryRNN  # noqa: E402


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
