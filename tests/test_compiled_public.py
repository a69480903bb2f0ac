"""The public array functions inside ``torch.compile(fullgraph=True)``, as
inside ``jax.jit``: one graph with no break and no host read, giving what a
float64 NumPy/SciPy reference gives; the eager checks do not run there, and
NaN or Inf carries through to the result, where an eager call refuses it.

The functions that draw from a NumPy generator (``projunn_step``,
``randomized_svd``, ``unitarity_estimate``, the framework-free optimizer) or
read a stopping test on the host (``project_unitary(method="newton_schulz")``)
break the graph there instead and run eagerly, are refused by name under
``fullgraph=True`` and in a CUDA-graph capture (docs/backends.md); the traced
step is ``steps.step_unchecked`` (tests/test_traced.py) or
``ProjUNN(capturable=True)``. The traceable functions also run under
``torch.func.vmap``, as under ``jax.vmap``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.linalg

import unitary_lr as ul
from unitary_lr import _host

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

TOLERANCE = {"float32": 2e-5, "complex64": 2e-5, "float64": 1e-12, "complex128": 1e-12}


def _unitary(rng, shape, dtype):
    """Matrices with orthonormal columns (n >= m) or rows (n < m), from NumPy's QR."""
    *batch, n, m = shape
    big, small = max(n, m), min(n, m)
    A = rng.standard_normal((*batch, big, small))
    if np.dtype(dtype).kind == "c":
        A = A + 1j * rng.standard_normal(A.shape)
    Q = np.linalg.qr(A)[0]
    return (Q if n >= m else np.conj(np.swapaxes(Q, -1, -2))).astype(dtype)


def _normal(rng, shape, dtype):
    A = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        A = A + 1j * rng.standard_normal(shape)
    return A.astype(dtype)


def _h(X):
    return np.conj(np.swapaxes(X, -1, -2))


def _per_matrix(function, *arrays):
    """``function`` of each matrix of a batch (the arrays' leading axis, or none)."""
    if arrays[0].ndim == 2:
        return function(*arrays)
    return np.stack([function(*parts) for parts in zip(*arrays)])


def _reflectors(V):
    n = V.shape[0]
    P = np.eye(n, dtype=np.result_type(V, np.float64))
    for j in range(V.shape[1]):
        v = V[:, j:j + 1]
        P = P @ (np.eye(n) - 2 * (v @ _h(v)) / (_h(v) @ v))
    return P


def _gram_error(A):
    """||A^H A - I||_F / sqrt(m), or ||A A^H - I||_F / sqrt(n) for a wide A."""
    gram = _h(A) @ A if A.shape[0] >= A.shape[1] else A @ _h(A)
    return np.linalg.norm(gram - np.eye(len(gram))) / np.sqrt(len(gram))


def _generator(a, b):
    return a @ _h(b) - b @ _h(a)


# name -> (the call, the arrays it takes from (W, G, a, b, V), the float64 reference)
CASES = {
    "tangent_project": (
        lambda W, G, a, b, V: ul.tangent_project(W, G),
        lambda W, G, a, b, V: G - W @ ((_h(W) @ G + _h(G) @ W) / 2) if W.shape[-2] >= W.shape[-1]
        else G - ((G @ _h(W) + W @ _h(G)) / 2) @ W),
    "project_unitary": (
        lambda W, G, a, b, V: ul.project_unitary(W + 0.3 * G),
        lambda W, G, a, b, V: _per_matrix(lambda A: scipy.linalg.polar(A)[0], W + 0.3 * G)),
    "project_unitary_lowrank": (
        lambda W, G, a, b, V: ul.project_unitary_lowrank(W, a, b),
        lambda W, G, a, b, V: _per_matrix(lambda A: scipy.linalg.polar(A)[0], W + a @ _h(b))),
    "exp_transport": (
        lambda W, G, a, b, V: ul.exp_transport(W, a, b, t=0.7),
        lambda W, G, a, b, V: _per_matrix(lambda a, b: scipy.linalg.expm(0.7 * _generator(a, b)), a, b) @ W),
    "cayley_transport": (
        lambda W, G, a, b, V: ul.cayley_transport(W, a, b, t=0.7),
        lambda W, G, a, b, V: _per_matrix(
            lambda a, b, W: np.linalg.solve(np.eye(len(a)) - 0.35 * _generator(a, b),
                                            (np.eye(len(a)) + 0.35 * _generator(a, b)) @ W), a, b, W)),
    "unitarity_error": (
        lambda W, G, a, b, V: ul.unitarity_error(W + 1e-3 * G),
        lambda W, G, a, b, V: _per_matrix(_gram_error, W + 1e-3 * G)),
    "householder_product": (
        lambda W, G, a, b, V: ul.householder_product(V),
        lambda W, G, a, b, V: _per_matrix(_reflectors, V)),
    "householder_apply": (
        lambda W, G, a, b, V: ul.householder_apply(V, G),
        lambda W, G, a, b, V: _per_matrix(lambda V, G: _reflectors(V) @ G, V, G)),
}
SQUARE_ONLY = {"householder_product", "householder_apply", "exp_transport", "cayley_transport"}


def _inputs(rng, shape, dtype):
    *batch, n, m = shape
    W = _unitary(rng, shape, dtype)
    G = _normal(rng, shape, dtype)
    a, b = _normal(rng, (*batch, n, 2), dtype), _normal(rng, (*batch, m, 2), dtype)
    V = _normal(rng, (*batch, n, 3), dtype)
    return W, G, a, b, V


def _compiled(function, backend, fullgraph=True):
    torch.compiler.reset()
    return torch.compile(function, fullgraph=fullgraph, backend=backend)


def _check(name, rng, shape, dtype, backend):
    call, reference = CASES[name]
    arrays = _inputs(rng, shape, dtype)
    tensors = [torch.as_tensor(x) for x in arrays]
    before = _host.transfers.count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes and deprecations
        result = _compiled(call, backend)(*tensors)
    assert _host.transfers.count == before
    assert isinstance(result, torch.Tensor)
    expected = reference(*(x.astype(np.complex128 if x.dtype.kind == "c" else np.float64) for x in arrays))
    got = result.numpy()
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[dtype] * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_public_function_compiles_as_one_graph_and_matches_the_reference(name, dtype, rng):
    """A batch of two square matrices, traced by Dynamo and AOTAutograd (the
    graph breaks and the reads of values on the host show there)."""
    _check(name, rng, (2, 6, 6), dtype, "aot_eager")


@pytest.mark.parametrize("shape", [(7, 3), (3, 7)])
@pytest.mark.parametrize("name", sorted(set(CASES) - SQUARE_ONLY))
def test_public_function_compiles_on_rectangular_float32(name, shape, rng):
    _check(name, rng, shape, "float32", "aot_eager")


@pytest.mark.parametrize("transport", ["exp_transport", "cayley_transport"])
def test_a_transport_compiles_for_every_number_t(transport, rng):
    """A Python number t given to a compiled function: Dynamo makes it a
    symbolic float from its second value on, which stopped the transports'
    check ("Unsupported hasattr call") and their step size's frexp. Every
    value gives the eager result, in one graph."""
    W, _, a, b, _ = (torch.as_tensor(x) for x in _inputs(rng, (6, 6), "float64"))
    call = getattr(ul, transport)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notes and deprecations
        compiled = _compiled(lambda t: call(W, a, b, t=t), "aot_eager")
        for t in (0.3, 0.5, -0.7, 2):
            torch.testing.assert_close(compiled(t), call(W, a, b, t=t), rtol=0, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_public_function_under_inductor_matches_the_reference(name, dtype, rng):
    """The default backend, which generates the CPU's kernels."""
    _check(name, rng, (2, 5, 5), dtype, "inductor")


@pytest.mark.parametrize(
    ("name", "bad_argument"),
    [("tangent_project", 1), ("exp_transport", 2), ("cayley_transport", 2), ("project_unitary_lowrank", 3),
     ("householder_apply", 1)],
)
def test_nan_is_refused_eagerly_and_carried_through_when_compiled(name, bad_argument, rng):
    call, _ = CASES[name]
    tensors = [torch.as_tensor(x) for x in _inputs(rng, (5, 5), "float64")]
    tensors[bad_argument][1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        call(*tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _compiled(call, "aot_eager")(*tensors)
    assert bool(torch.isnan(result).any())


# name -> a call that reads values on the host or draws from a NumPy generator
HOST_CALLS = {
    "projunn_step": lambda W, G: ul.projunn_step(W, G, lr=0.1, rng=3),
    "randomized_svd": lambda W, G: ul.randomized_svd(G[..., :, :2] @ G[..., :2, :], 2, rng=1),
    "unitarity_estimate": lambda W, G: ul.unitarity_estimate(W + 1e-3 * G, rng=2),
    "project_unitary": lambda W, G: ul.project_unitary(W + 0.05 * G, method="newton_schulz"),
}


def _named(name):
    """How the messages name the call of ``HOST_CALLS[name]``, as a pattern."""
    return re.escape("project_unitary(method='newton_schulz')") if name == "project_unitary" else name


@pytest.mark.parametrize("dtype", ["float32", "complex128"])
@pytest.mark.parametrize("name", sorted(HOST_CALLS))
def test_call_that_reads_the_host_runs_eagerly_under_torch_compile(name, dtype, rng):
    """The same draws and the same result as the eager call, bit for bit,
    from the graph's break (randomized_svd raised IndexError inside
    PyTorch's NumPy emulation before it ran outside the graph)."""
    call = HOST_CALLS[name]
    W, G = (torch.as_tensor(x) for x in _inputs(rng, (6, 6), dtype)[:2])
    eager = call(W, G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = _compiled(lambda W, G: call(W, G), "aot_eager", fullgraph=False)(W, G)
    for got, expected in zip(compiled if isinstance(compiled, tuple) else (compiled,),
                             eager if isinstance(eager, tuple) else (eager,)):
        assert torch.equal(got, expected)
    if name == "randomized_svd":  # rank 2: the sketch finds it exactly
        A = (G[:, :2] @ G[:2, :]).numpy().astype(np.complex128 if G.is_complex() else np.float64)
        np.testing.assert_allclose(compiled.S.numpy(), np.linalg.svd(A, compute_uv=False)[:2],
                                   rtol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize("name", sorted(HOST_CALLS))
def test_call_that_reads_the_host_is_refused_by_name_in_one_graph(name, rng):
    W, G = (torch.as_tensor(x) for x in _inputs(rng, (6, 6), "float64")[:2])
    with pytest.raises(torch._dynamo.exc.Unsupported, match=f"unitary_lr: {_named(name)} runs outside the graph: it "):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _compiled(HOST_CALLS[name], "aot_eager")(W, G)


@pytest.mark.parametrize("dtype", ["float32", "complex128"])
def test_framework_free_optimizer_steps_outside_the_graph_as_eagerly(dtype, rng):
    from unitary_lr.optim import ProjUNN

    W, _, _, _, _ = _inputs(rng, (8, 8), dtype)
    W = torch.as_tensor(W)
    gradients = [torch.as_tensor(_normal(rng, (8, 8), dtype)) for _ in range(3)]
    eager, traced = ProjUNN(0.05, seed=2, rank=2), ProjUNN(0.05, seed=2, rank=2)
    step = _compiled(lambda W, G: traced.step(W, G, key="w"), "aot_eager", fullgraph=False)
    many = _compiled(lambda W, G: traced.step_many({"v": (W, G)}), "aot_eager", fullgraph=False)
    W1 = W2 = W
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for G in gradients:
            W1, W2 = eager.step(W1, G, key="w"), step(W2, G)
            assert torch.equal(W1, W2)
            assert torch.equal(eager.step_many({"v": (W1, G)})["v"], many(W2, G)["v"])
        with pytest.raises(torch._dynamo.exc.Unsupported,
                           match=r"unitary_lr\.optim\.ProjUNN\.step runs outside the graph: .*capturable=True"):
            _compiled(lambda W, G: traced.step(W, G, key="w"), "aot_eager")(W2, gradients[0])
    assert traced.state_dict()["steps"] == eager.state_dict()["steps"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["tangent_project", "exp_transport", "cayley_transport", "project_unitary_lowrank",
                                  "unitarity_error"])
def test_cuda_graph_captures_a_public_function_and_replays_it_on_new_inputs(name, rng):
    """In a capture nothing is read on the host (the checks are skipped, as in
    a compiled graph); rank-1 factors, whose small cores are closed forms
    (a solver call cannot be captured). The replay on new inputs, written
    into the captured ones, gives the reference of the new inputs."""
    call, reference = CASES[name]

    def one_column(arrays):
        W, G, a, b, V = arrays
        return W, G, a[..., :1], b[..., :1], V

    tensors = [torch.as_tensor(x, device="cuda") for x in one_column(_inputs(rng, (2, 6, 6), "float64"))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        call(*tensors)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = call(*tensors)
    new = one_column(_inputs(rng, (2, 6, 6), "float64"))
    for tensor, x in zip(tensors, new):
        tensor.copy_(torch.as_tensor(x, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    np.testing.assert_allclose(result.cpu().numpy(), reference(*new), rtol=0, atol=1e-12)


# PyTorch's own note on a complex conjugate it batches by a loop
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_public_function_under_torch_func_vmap_matches_the_reference(name, dtype, rng):
    """vmap's batched tensors are traced as under jax.vmap (they could not be
    read on the host: every one of these calls raised there before)."""
    call, reference = CASES[name]
    arrays = _inputs(rng, (3, 6, 6), dtype)
    result = torch.func.vmap(call)(*(torch.as_tensor(x) for x in arrays))
    np.testing.assert_allclose(result.numpy(), reference(*arrays), rtol=0, atol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize("name", ["householder_apply", "householder_product", "project_unitary", "tangent_project"])
def test_per_sample_gradients_by_vmap_of_grad_match_a_loop(name):
    """torch.func.vmap(torch.func.grad(f)): the batched tensor is inside
    grad's wrapper, which the eager NaN/Inf check took for a plain tensor and
    read ("vmap: It looks like you're calling .item()"); vmap and grad alone
    worked. The per-sample gradients equal a loop of grad calls."""
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(4, 4, dtype=torch.float64, generator=generator)
    batch = torch.randn(3, 4, 4, dtype=torch.float64, generator=generator)
    calls = {"householder_apply": (lambda V: ul.householder_apply(V, G)[0, 0], batch[..., :2]),
             "householder_product": (lambda V: ul.householder_product(V)[0, 1], batch[..., :2]),
             "project_unitary": (lambda A: ul.project_unitary(A)[0, 1], batch),
             "tangent_project": (lambda W: ul.tangent_project(W, G)[0, 1], batch)}
    f, inputs = calls[name]
    loop = torch.stack([torch.func.grad(f)(x) for x in inputs])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(inputs), loop, rtol=0, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", sorted(HOST_CALLS))
def test_cuda_graph_capture_of_a_call_that_reads_the_host_says_why(name, rng):
    """Its host reads would end the capture with a bare CUDA error: a
    RuntimeError that names the call first, and the call still runs
    eagerly afterwards."""
    W, G = (torch.as_tensor(x, device="cuda") for x in _inputs(rng, (6, 6), "float64")[:2])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=f"unitary_lr: {_named(name)} cannot be captured in a CUDA graph: it "):
        with torch.cuda.graph(graph):
            HOST_CALLS[name](W, G)
    HOST_CALLS[name](W, G)


@pytest.mark.parametrize("name", sorted(HOST_CALLS))
def test_capture_of_a_call_that_reads_the_host_is_refused_before_it_starts(name, rng, monkeypatch):
    """The refusal's branch on the CPU, with PyTorch told that a capture is
    under way: the error names the call, and the NumPy generator it would
    have drawn from has not moved."""
    W, G = (torch.as_tensor(x) for x in _inputs(rng, (6, 6), "float64")[:2])
    generator = np.random.default_rng(5)
    state = generator.bit_generator.state
    calls = {**HOST_CALLS, "projunn_step": lambda W, G: ul.projunn_step(W, G, lr=0.1, rng=generator)}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=f"unitary_lr: {_named(name)} cannot be captured in a CUDA graph: it "):
        calls[name](W, G)
    assert generator.bit_generator.state == state
