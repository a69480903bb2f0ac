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
from unitary_lr.optim import ProjUNN
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
        assert _host.transfers.count - before == 1
        # one NumPy matrix takes the host's lean step, which moves nothing
        assert one == 0


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


def test_stacked_update_takes_rngs_as_projunn_update_takes_rng():
    """``rngs=None`` (or left out) draws every sketch from fresh entropy, as
    ``rng=None`` does (it raised "object of type 'NoneType' has no len()");
    one generator shared as ``[g] * P`` is drawn from in order, as separate
    calls draw from it; a value that is no sequence, or an entry that is no
    rng, is a TypeError naming ``rngs`` or ``rngs[p]``."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    P, n, lr = 3, 8, 0.3
    Ws = [_unitary(rng, (n, n), "float64") for _ in range(P)]
    # rank-1 gradients: the sketch is exact whatever its draw, so the unseeded
    # steps have the dense reference W expm(-lr/2 (W^T G - G^T W))
    Gs = [np.outer(rng.standard_normal(n), rng.standard_normal(n)) for _ in range(P)]
    expected = [W @ scipy_linalg.expm(-lr / 2 * (W.T @ G - G.T @ W)) for W, G in zip(Ws, Gs)]
    for options in ({"rngs": None}, {}):
        stacked = projunn_update_stacked(Ws, Gs, lr=lr, **options)
        for W, (L, Rh), want in zip(Ws, stacked, expected):
            np.testing.assert_allclose(W + L @ Rh, want, atol=1e-13)
    # rank 2 of full-rank gradients: the draws matter; unseeded stacks differ
    Gs = [rng.standard_normal((n, n)) for _ in range(P)]
    first, second = (projunn_update_stacked(Ws, Gs, lr=lr, rank=2) for _ in range(2))
    assert not np.allclose(first[0][0] @ first[0][1], second[0][0] @ second[0][1])
    shared, again = np.random.default_rng(9), np.random.default_rng(9)
    stacked = projunn_update_stacked(Ws, Gs, lr=lr, rank=2, rngs=[shared] * P)
    for W, G, (L, Rh) in zip(Ws, Gs, stacked):
        L_ref, Rh_ref = projunn_update(W, G, lr=lr, rank=2, rng=again)
        np.testing.assert_allclose(W + L @ Rh, W + L_ref @ Rh_ref, atol=1e-13)
    assert shared.bit_generator.state == again.bit_generator.state
    for bad, shown in [(0, "int: 0"), (np.random.default_rng(0), "Generator: Generator"), ("abc", "str: 'abc'")]:
        with pytest.raises(TypeError, match=rf"^rngs must be None or a sequence of one None, int seed or "
                                            rf"numpy.random.Generator per matrix, got {shown}.*\[g\] \* len\(Ws\)$"):
            projunn_update_stacked(Ws, Gs, lr=lr, rngs=bad)
    with pytest.raises(TypeError, match=r"^rngs\[1\]: rng must be None, an int seed or a numpy.random.Generator, "
                                        r"got str: 'x'"):
        projunn_update_stacked(Ws, Gs, lr=lr, rngs=[0, "x", 2])
    with pytest.raises(ValueError, match=r"^rngs\[2\]: rng seed must be >= 0, got -1"):
        projunn_update_stacked(Ws, Gs, lr=lr, rngs=[0, 1, -1])


# --- the framework-free optimizer's step_many -------------------------------

MANY = {"a": (10, 10), "b": (9, 4), "c": (10, 10), "d": (2, 6, 6), "e": (9, 4), "f": (10, 10), "g": (4, 9)}


def _many(backend, rng, dtype, shapes=MANY):
    """Unitary matrices of the shapes ``MANY`` (NumPy arrays when backend is
    None) and four rounds of gradients for them."""
    convert = (lambda x: x) if backend is None else backend.asarray
    Ws = {key: convert(_unitary(rng, shape, dtype)) for key, shape in shapes.items()}
    grads = [{key: convert(random_matrix(rng, shape, dtype)) for key, shape in shapes.items()} for _ in range(4)]
    return Ws, grads


def _optimizers(**options):
    options = {"lr": 0.05, "base": "adam", "rank": 2, "seed": 3, "drift_check_every": 2, **options}
    return ProjUNN(**options), ProjUNN(**options, foreach=True)


@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_step_many_equals_separate_steps(backend, dtype, rng, variant):
    """Seven matrices in four shapes (three of one, two of another): step_many
    gives the matrices of separate steps in the same order to rounding, and
    leaves the same state: the same random stream (sketches and drift probes
    drawn in the same order: a drift check every second step), step counts
    and moments."""
    Ws, grads = _many(backend, rng, dtype)
    separate, stacked = _optimizers(variant=variant)
    A, B = dict(Ws), dict(Ws)
    for G in grads:
        A = {key: separate.step(A[key], G[key], key=key) for key in Ws}
        B = stacked.step_many({key: (B[key], G[key]) for key in Ws})
        assert list(B) == list(Ws)
    for key in Ws:
        V = backend.to_numpy(B[key])
        np.testing.assert_allclose(V, backend.to_numpy(A[key]), atol=tol(dtype, 10), err_msg=key)
        V = V if V.shape[-2] >= V.shape[-1] else np.swapaxes(V, -1, -2).conj()
        assert np.all(unitarity(V) <= tol(dtype, 1)), key
        ours, theirs = stacked.state_dict()["matrices"][key], separate.state_dict()["matrices"][key]
        assert ours["steps"] == theirs["steps"] == len(grads)
        np.testing.assert_allclose(backend.to_numpy(ours["state"]["exp_avg_sq"]),
                                   backend.to_numpy(theirs["state"]["exp_avg_sq"]), rtol=tol(dtype, 10))
    assert stacked.state_dict()["rng"] == separate.state_dict()["rng"]
    assert stacked.steps == separate.steps == len(grads) * len(Ws)


def test_step_many_with_steps_it_does_not_batch(rng):
    """Steps that are not batched keep their place in the random stream: a
    factored gradient (SGD takes it as it is) among dense ones, and the
    steps of optimizers with lr = 0 or unitary=False."""
    Ws, grads = _many(None, rng, "float64")
    with_factors = {**grads[0], "b": (rng.standard_normal((9, 2)), rng.standard_normal((4, 2)))}  # a b^H
    for options, gradients in [({"base": "sgd"}, with_factors), ({"lr": 0.0}, grads[0]),
                               ({"unitary": False}, grads[0])]:
        separate, stacked = _optimizers(**options)
        for _ in range(3):
            A = {key: separate.step(W, gradients[key], key=key) for key, W in Ws.items()}
            B = stacked.step_many({key: (W, gradients[key]) for key, W in Ws.items()})
        for key in Ws:
            np.testing.assert_allclose(B[key], A[key], atol=1e-13, err_msg=f"{options} {key}")
        assert stacked.state_dict()["rng"] == separate.state_dict()["rng"], options
        assert stacked.steps == separate.steps == 3 * len(Ws)


def test_step_many_makes_one_transfer_per_shape():
    """Four small matrices of one shape take the host transfers of one step
    (foreach None or True); with foreach=False, or by default for matrices
    above 256 KiB on the CPU, they are stepped one by one, each by the
    host's lean rank-1 step, which moves nothing."""
    rng = np.random.default_rng(5)
    counts = []
    for n, dtype, foreach in [(16, "float32", None), (16, "float32", True), (16, "float32", False),
                              (256, "float64", None), (256, "float64", True)]:
        opt = ProjUNN(0.01, rank=1, seed=0, foreach=foreach)
        Ws = {p: _unitary(rng, (n, n), dtype) for p in range(4)}
        G = random_matrix(rng, (n, n), dtype)
        before = _host.transfers.count
        opt.step_many({p: (W, G) for p, W in Ws.items()})
        counts.append(_host.transfers.count - before)
    assert counts == [1, 1, 0, 0, 1], counts


def test_step_many_refuses_bad_input_naming_the_key_and_changes_nothing(rng):
    """A NaN in the gradient of the third matrix of a batch: the error names
    its key, nothing changes (moments, step counts, random stream), and the
    next call steps as an undisturbed optimizer does."""
    Ws, grads = _many(None, rng, "float64")
    opt, clean = _optimizers()
    for o in (opt, clean):
        o.step_many({key: (W, grads[0][key]) for key, W in Ws.items()})
    before = opt.state_dict()
    bad = {key: G.copy() for key, G in grads[1].items()}
    bad["f"][3, 2] = np.nan
    with pytest.raises(ValueError, match=r"steps\['f'\]: .*NaN"):
        opt.step_many({key: (W, bad[key]) for key, W in Ws.items()})
    after = opt.state_dict()
    assert after["rng"] == before["rng"] and after["steps"] == before["steps"]
    for key in Ws:
        assert after["matrices"][key]["steps"] == 1
        assert after["matrices"][key]["state"]["exp_avg"] is before["matrices"][key]["state"]["exp_avg"]
    A = opt.step_many({key: (W, grads[1][key]) for key, W in Ws.items()})
    B = clean.step_many({key: (W, grads[1][key]) for key, W in Ws.items()})
    for key in Ws:
        np.testing.assert_array_equal(A[key], B[key])
    with pytest.raises(TypeError, match="steps must be a mapping"):
        opt.step_many([(Ws["a"], grads[0]["a"])])
    with pytest.raises(TypeError, match=r"steps\['a'\] must be a pair \(W, G\)"):
        opt.step_many({"a": Ws["a"]})
    with pytest.raises(ValueError, match=r"steps\['b'\]: G must have the shape of W \(9, 4\), got \(4, 9\)"):
        opt.step_many({"a": (Ws["a"], grads[0]["a"]), "b": (Ws["b"], grads[0]["g"])})
    not_unitary = {key: W for key, W in Ws.items()}
    not_unitary["c"] = 0.5 * Ws["c"]
    with pytest.raises(ValueError, match=r"steps\['c'\]: W is not unitary"):
        opt.step_many({key: (W, grads[1][key]) for key, W in not_unitary.items()})
    with pytest.raises(ValueError, match="foreach must be True, False or None"):
        ProjUNN(foreach="yes")
    assert opt.state_dict()["rng"] == clean.state_dict()["rng"]


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


import unitary_lr.torch


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


@pytest.mark.usefixtures("torch_operations")  # the transfers of a GPU's step
def test_foreach_stacks_one_transfer_per_shape():
    """Four parameters of one shape take the host transfers of one, with
    foreach=True, and by default on the CPU for small matrices; separately
    (foreach=False, and the default for matrices above 256 KiB) four times
    as many."""
    counts = {}
    for shape, dtype, flag in [((16, 16), torch.float32, None), ((16, 16), torch.float32, False),
                               ((16, 16), torch.float32, True), ((256, 256), torch.float32, None),
                               ((256, 257), torch.float32, None), ((256, 256), torch.float64, None),
                               ((2, 256, 256), torch.float32, None)]:
        params, bias, opt = _model([shape] * 4, dtype, foreach=flag, rank=1)
        _gradients(params, bias, 0)
        opt.step()
        before = _host.transfers.count
        opt.step()
        counts[shape, dtype, flag] = _host.transfers.count - before
    assert list(counts.values()) == [1, 4, 1, 1, 4, 4, 4], counts


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


class _UnhashableDevice:
    """A device object as CuPy's: equal by its id, with no hash."""

    def __init__(self, index):
        self.index = index

    def __eq__(self, other):
        return isinstance(other, _UnhashableDevice) and other.index == self.index

    __hash__ = None

    def __repr__(self):
        return f"<device {self.index}>"


def test_step_many_groups_matrices_on_unhashable_devices(monkeypatch):
    """CuPy's cupy.cuda.Device cannot be hashed, and step_many keyed its
    stacks by the device: 12 CuPy tests (every dtype) failed on an H200. The
    key now stands in its repr; matrices on one such device share a stack."""
    import unitary_lr.optim as optim_module
    from unitary_lr._xp import device_key

    with pytest.raises(TypeError):
        hash(_UnhashableDevice(0))
    assert device_key(_UnhashableDevice(1)) == device_key(_UnhashableDevice(1)) != device_key(_UnhashableDevice(2))
    assert device_key("cpu") == "cpu"
    monkeypatch.setattr(optim_module, "device", lambda x: _UnhashableDevice(0))
    keys = {optim_module._stack_key(np.zeros((3, 3))), optim_module._stack_key(np.ones((3, 3)))}
    assert len(keys) == 1 and len({*keys, optim_module._stack_key(np.zeros((3, 2)))}) == 2


def test_strict_arrays_after_numpy_ones_warn_nothing():
    # array_api_strict's dtypes hash as NumPy's: a dtype-name cache keyed by
    # dtype compared the two, which warns ("comparing a array_api_strict
    # dtype against a NumPy native dtype")
    import warnings

    xs = pytest.importorskip("array_api_strict")
    from unitary_lr.optim import ProjUNN

    W = ul.random_unitary(6, dtype="float64", rng=0)
    G = np.random.default_rng(1).standard_normal((6, 6))
    ProjUNN(0.1, seed=0).step_many({"a": (W, G)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProjUNN(0.1, seed=0).step_many({"a": (xs.asarray(W), xs.asarray(G))})
