"""Stacked steps: several unitary matrices of one shape in one batched step.

``steps.projunn_update_stacked`` steps P matrices with one pass of each batched
product and one host round trip, each matrix's sketch drawn from its own
generator; ``ProjUNN(foreach=...)`` uses it for the unitary parameters of a
group that share a shape, dtype and device. The factors must agree with P
separate steps to rounding, every stream must advance as it would there, and
a refused step must still name its parameter and change nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import random_matrix, tol, unitarity

import unitary_lr as ul
from unitary_lr import _host
from unitary_lr.steps import projunn_update, projunn_update_stacked

SHAPES = [(12, 12), (5, 12), (2, 7, 7)]  # square, wide (through its adjoint: tall too), batched


def _unitary(rng, shape, dtype):
    *batch, n, m = shape
    return ul.random_unitary(n, m, dtype=dtype, batch_shape=tuple(batch), rng=rng)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
@pytest.mark.parametrize("rank", [1, 3])
def test_stacked_update_equals_separate_updates(backend, dtype, rng, shape, variant, rank):
    P, lr = 3, 0.2
    Ws = [backend.asarray(_unitary(rng, shape, dtype)) for _ in range(P)]
    Gs = [backend.asarray(random_matrix(rng, shape, dtype)) for _ in range(P)]
    separate = [projunn_update(W, G, lr=lr, rank=rank, variant=variant, rng=np.random.default_rng([7, p]))
                for p, (W, G) in enumerate(zip(Ws, Gs))]
    streams = [np.random.default_rng([7, p]) for p in range(P)]
    stacked = projunn_update_stacked(Ws, Gs, lr=lr, rank=rank, variant=variant, rngs=streams)
    assert len(stacked) == P
    for p, (W, (L, Rh), (L_ref, Rh_ref)) in enumerate(zip(Ws, stacked, separate)):
        W = backend.to_numpy(W)
        V = W + backend.to_numpy(L) @ backend.to_numpy(Rh)
        V_ref = W + backend.to_numpy(L_ref) @ backend.to_numpy(Rh_ref)
        np.testing.assert_allclose(V, V_ref, atol=tol(dtype, 10), err_msg=f"matrix {p}")
        assert np.all(unitarity(V if shape[-2] >= shape[-1] else np.swapaxes(V, -1, -2).conj()) <= tol(dtype, 1))
    # every stream advanced exactly as a separate step advances its own
    for p, stream in enumerate(streams):
        again = np.random.default_rng([7, p])
        projunn_update(Ws[p], Gs[p], lr=lr, rank=rank, variant=variant, rng=again)
        assert stream.bit_generator.state == again.bit_generator.state


@pytest.mark.parametrize("variant", ["tangent", "direct"])
def test_stacked_step_of_rank_one_gradients_matches_the_dense_formulas(backend, dtype, rng, variant):
    """A gradient of rank 1 is sketched exactly at rank 1, so each stacked step
    equals SciPy's dense formula: W expm(-lr/2 (W^H G - G^H W)) (projUNN-T),
    polar(W - lr G) (projUNN-D), in float64/complex128."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    P, n, lr = 3, 10, 0.3
    Ws = [_unitary(rng, (n, n), dtype) for _ in range(P)]
    Gs = [(random_matrix(rng, (n, 1), dtype) @ random_matrix(rng, (1, n), dtype)).astype(dtype) for _ in range(P)]
    stacked = projunn_update_stacked([backend.asarray(W) for W in Ws], [backend.asarray(G) for G in Gs], lr=lr,
                                     variant=variant, rngs=[np.random.default_rng(p) for p in range(P)])
    for W, G, (L, Rh) in zip(Ws, Gs, stacked):
        W64, G64 = W.astype(np.complex128), G.astype(np.complex128)
        if variant == "tangent":
            expected = W64 @ scipy_linalg.expm(-lr / 2 * (W64.conj().T @ G64 - G64.conj().T @ W64))
        else:
            expected = scipy_linalg.polar(W64 - lr * G64)[0]
        V = W + backend.to_numpy(L) @ backend.to_numpy(Rh)
        np.testing.assert_allclose(V, expected, atol=tol(dtype, 30))


def test_stacked_update_makes_one_transfer_for_all():
    """P matrices cost the transfers of one: on a GPU each is a synchronisation."""
    rng = np.random.default_rng(0)
    Ws = [_unitary(rng, (16, 16), "float64") for _ in range(5)]
    Gs = [rng.standard_normal((16, 16)) for _ in range(5)]
    for rank in (1, 4):
        before = _host.transfers.count
        projunn_update(Ws[0], Gs[0], lr=0.1, rank=rank, rng=1)
        one = _host.transfers.count - before
        before = _host.transfers.count
        projunn_update_stacked(Ws, Gs, lr=0.1, rank=rank, rngs=[np.random.default_rng(p) for p in range(5)])
        assert _host.transfers.count - before == one >= 1


def test_stacked_update_refuses_bad_input_with_the_argument_named():
    rng = np.random.default_rng(1)
    W, G = _unitary(rng, (8, 8), "float64"), rng.standard_normal((8, 8))
    streams = [np.random.default_rng(0), np.random.default_rng(1)]
    with pytest.raises(ValueError, match="one shape and dtype"):
        projunn_update_stacked([W, W[:, :4]], [G, G[:, :4]], lr=0.1, rngs=streams)
    with pytest.raises(ValueError, match="one shape and dtype"):
        projunn_update_stacked([W, W.astype(np.float32)], [G, G], lr=0.1, rngs=streams)
    with pytest.raises(ValueError, match="of one length, got 2, 2, 1"):
        projunn_update_stacked([W, W], [G, G], lr=0.1, rngs=streams[:1])
    with pytest.raises(ValueError, match="non-empty"):
        projunn_update_stacked([], [], lr=0.1, rngs=[])
    with pytest.raises(TypeError, match=r"Gs\[1\] must be an array"):
        projunn_update_stacked([W, W], [G, "G"], lr=0.1, rngs=streams)
    bad = G.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        projunn_update_stacked([W, W], [G, bad], lr=0.1, rngs=streams)
    with pytest.raises(ValueError, match="lr"):
        projunn_update_stacked([W, W], [G, G], lr=-1.0, rngs=streams)


# --- the torch optimizer ---------------------------------------------------

torch = pytest.importorskip("torch")


def _model(shapes, dtype, *, foreach, base="rmsprop", rank=2, variant="tangent", seed=0):
    """Unitary parameters of the given shapes with fixed gradients, one group,
    and a plain parameter in a second group."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        *batch, n, m = shape
        W = torch.as_tensor(ul.random_unitary(n, m, batch_shape=tuple(batch), dtype=str(dtype).split(".")[-1],
                                              rng=int(torch.randint(0, 2**31, (), generator=g))))
        params.append(torch.nn.Parameter(W.clone()))
    bias = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    opt = ul.torch.ProjUNN([{"params": params, "unitary": True}, {"params": [bias]}], lr=1e-2, base=base,
                           rank=rank, variant=variant, seed=3, foreach=foreach)
    return params, bias, opt


def _gradients(params, bias, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in (*params, bias):
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)


import unitary_lr.torch  # noqa: E402  (after the importorskip)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("base", ["rmsprop", "adam", "sgd"])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_foreach_optimizer_equals_separate_steps(dtype, base, variant):
    """Three parameters of one shape (stacked), two of another (stacked), one
    alone: foreach=True moves every parameter as foreach=False does, to
    rounding, and leaves the same state (the sketch streams included)."""
    shapes = [(10, 10), (10, 10), (9, 4), (10, 10), (9, 4), (2, 6, 6)]
    runs = [_model(shapes, dtype, foreach=flag, base=base, variant=variant) for flag in (False, True)]
    for step in range(4):
        for params, bias, opt in runs:
            _gradients(params, bias, step)
            opt.step()
    (separate, bias_a, opt_a), (stacked, bias_b, opt_b) = runs
    for p, q in zip(separate, stacked):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-13)
        assert opt_b.state[q]["sketch_rng"] == opt_a.state[p]["sketch_rng"]
        assert opt_b.state[q]["projunn_steps"] == opt_a.state[p]["projunn_steps"] == 4
        W = q.detach().to(torch.complex128)
        W = W if W.shape[-2] >= W.shape[-1] else W.mH
        eye = torch.eye(W.shape[-1], dtype=W.dtype)
        assert float((W.mH @ W - eye).abs().max()) < 1e-13
    assert torch.equal(bias_a.detach(), bias_b.detach())


def test_foreach_stacks_one_transfer_per_shape():
    """Four parameters of one shape take the host transfers of one, with
    foreach=True; separately (foreach=False, and the default on the CPU) four
    times as many."""
    counts = {}
    for flag in (None, False, True):
        params, bias, opt = _model([(16, 16)] * 4, torch.float32, foreach=flag, rank=1)
        _gradients(params, bias, 0)
        opt.step()
        before = _host.transfers.count
        opt.step()
        counts[flag] = _host.transfers.count - before
    assert counts[True] == 1 and counts[False] == counts[None] == 4, counts


def test_foreach_refused_step_names_the_parameter_and_changes_nothing():
    """A NaN in the third gradient of a stack: the error names that parameter,
    no parameter or state changes, and the next step is the one an
    undisturbed run takes."""
    params, bias, opt = _model([(12, 12)] * 4, torch.float64, foreach=True)
    clean, clean_bias, clean_opt = _model([(12, 12)] * 4, torch.float64, foreach=True)
    _gradients(params, bias, 0)
    opt.step()
    _gradients(clean, clean_bias, 0)
    clean_opt.step()
    before = [p.detach().clone() for p in params]
    state = {key: value for key, value in opt.state[params[0]].items()}
    _gradients(params, bias, 1)
    params[2].grad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*NaN.*no parameter was changed"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert opt.state[params[0]]["sketch_rng"] == state["sketch_rng"]
    assert torch.equal(opt.state[params[0]]["square_avg"], state["square_avg"])
    _gradients(params, bias, 1)
    opt.step()
    _gradients(clean, clean_bias, 1)
    clean_opt.step()
    for p, q in zip(params, clean):
        assert torch.equal(p.detach(), q.detach())
