"""Rectangular unitary parameters (orthonormal columns or rows) and
unitary_lr.torch.OrthogonalLinear, against float64 NumPy references."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr import projunn_step
from unitary_lr.torch import (
    OrthogonalLinear,
    ProjUNN,
    is_unitary,
    mark_unitary,
    unitary_parameter,
    unitary_tolerance,
)

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
SHAPES = [(5, 2), (2, 5), (4, 4), (6, 1), (1, 6)]
COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def rounding(dtype):
    return 1e-6 if dtype in (torch.float32, torch.complex64) else 1e-14


def orthonormality_error(W):
    """max |W^H W - I| (tall or square) or |W W^H - I| (wide), in float64 NumPy."""
    A = W.detach().numpy().astype(np.complex128)
    if A.shape[-2] < A.shape[-1]:
        A = np.conj(np.swapaxes(A, -1, -2))
    gram = np.conj(np.swapaxes(A, -1, -2)) @ A
    return float(np.abs(gram - np.eye(A.shape[-1])).max())


def polar_reference(A):
    """U V^H from NumPy's SVD in float64/complex128: the closest matrix with
    orthonormal columns (rows)."""
    A = A.numpy().astype(np.complex128 if A.is_complex() else np.float64)
    U, _, Vh = np.linalg.svd(A, full_matrices=False)
    return U @ Vh


# ------------------------------------------------------ unitary_parameter(n, m)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_unitary_parameter_inits(shape, dtype):
    n, m = shape
    for init in ("haar", "identity"):
        W = unitary_parameter(n, m, init=init, dtype=dtype, batch_shape=(3,), generator=seeded())
        assert isinstance(W, torch.nn.Parameter) and is_unitary(W) and W.dtype == dtype
        assert tuple(W.shape) == (3, n, m) and W.is_contiguous()
        assert orthonormality_error(W) < 10 * rounding(dtype)
    identity = unitary_parameter(n, m, init="identity", dtype=dtype).detach()
    np.testing.assert_array_equal(identity.numpy(), np.eye(n, m))
    # independent draws per batch entry, and a seed gives the same sample
    W = unitary_parameter(n, m, dtype=dtype, batch_shape=(2,), generator=seeded(1)).detach()
    assert not torch.equal(W[0], W[1])
    assert torch.equal(W, unitary_parameter(n, m, dtype=dtype, batch_shape=(2,), generator=seeded(1)).detach())


def test_square_draw_is_the_same_with_or_without_m():
    for dtype in DTYPES:
        a = unitary_parameter(5, dtype=dtype, generator=seeded(3))
        b = unitary_parameter(5, 5, dtype=dtype, generator=seeded(3))
        assert torch.equal(a.detach(), b.detach())
    henaff = unitary_parameter(4, 4, init="henaff", dtype=torch.float64, generator=seeded())
    assert orthonormality_error(henaff) < 1e-14


def test_haar_columns_have_the_haar_second_moments():
    """E|W_ij|^2 = 1/n for the first m columns of a Haar unitary; the mean of
    W_ij is 0 (a statistical check with 5-sigma bounds, fixed seed)."""
    samples, n, m = 4000, 6, 2
    W = unitary_parameter(n, m, dtype=torch.complex128, batch_shape=(samples,), generator=seeded(7)).detach().numpy()
    power = np.abs(W) ** 2
    se = power.std(axis=0) / np.sqrt(samples)
    np.testing.assert_allclose(power.mean(axis=0), np.full((n, m), 1 / n), atol=5 * float(se.max()))
    assert np.abs(W.mean(axis=0)).max() < 5 * np.sqrt(1 / n / samples)


@pytest.mark.parametrize("shape", [(5, 2), (2, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_tensor_is_checked_or_projected(shape, dtype):
    generator = seeded(2)
    A = torch.randn(*shape, dtype=dtype, generator=generator)
    with pytest.raises(ValueError, match=rf"n_or_tensor \(shape \({shape[0]}, {shape[1]}\), .*\) is not unitary: its "
                                         r"unitarity error \|\|W\^H W - I\|\|_F / sqrt\(m\) is"):
        unitary_parameter(A)
    W = unitary_parameter(A, project=True)
    assert is_unitary(W) and tuple(W.shape) == shape
    np.testing.assert_allclose(W.detach().numpy(), polar_reference(A), atol=100 * rounding(dtype))
    # an orthonormal tensor is accepted as it is (copied)
    Q = torch.asarray(polar_reference(A)).to(dtype)
    V = unitary_parameter(Q)
    assert torch.equal(V.detach(), Q) and V.data_ptr() != Q.data_ptr()
    # mark_unitary on a Parameter of that shape: the same check, nothing changed on refusal
    p = torch.nn.Parameter(A.clone())
    with pytest.raises(ValueError, match=r"param .* is not unitary"):
        mark_unitary(p)
    assert type(p) is torch.nn.Parameter and torch.equal(p.detach(), A)


def test_tolerance_applies_to_rectangular_matrices():
    """W = (1 + s) Q with orthonormal columns has error ~2 s: accepted at
    s = tolerance / 4, refused at s = 2 tolerance."""
    for dtype in DTYPES:
        tolerance = unitary_tolerance(dtype)
        Q = unitary_parameter(7, 3, dtype=torch.float64, generator=seeded()).detach().to(dtype)
        for scale, accepted in ((0.25 * tolerance, True), (2 * tolerance, False)):
            p = torch.nn.Parameter(Q * (1 + scale))
            if accepted:
                assert is_unitary(mark_unitary(p))
            else:
                with pytest.raises(ValueError, match="is not unitary"):
                    mark_unitary(p)


def test_bad_rectangular_arguments():
    with pytest.raises(ValueError, match=r"init 'henaff' .* needs a square matrix, got n=4, m=3"):
        unitary_parameter(4, 3, init="henaff")
    with pytest.raises(ValueError, match=r"m must be an integer >= 1, got 0"):
        unitary_parameter(4, 0)
    with pytest.raises(TypeError, match=r"m must be an integer, got float: 2.0"):
        unitary_parameter(4, 2.0)
    with pytest.raises(ValueError, match=r"with a tensor \(shape \(3, 3\)\) it must be omitted, got m=3"):
        unitary_parameter(torch.eye(3), 3)


# ------------------------------------------------------------ OrthogonalLinear


@pytest.mark.parametrize("features", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("complex_", [False, True])
def test_orthogonal_linear_is_nn_linear_with_an_orthonormal_weight(features, complex_):
    in_features, out_features = features
    layer = OrthogonalLinear(in_features, out_features, complex=complex_, dtype=torch.float64, generator=seeded(4))
    dtype = torch.complex128 if complex_ else torch.float64
    assert tuple(layer.weight.shape) == (out_features, in_features) and layer.weight.dtype == dtype
    assert tuple(layer.bias.shape) == (out_features,) and layer.bias.dtype == dtype
    assert is_unitary(layer.weight) and not is_unitary(layer.bias)
    assert orthonormality_error(layer.weight) < 1e-14
    # the same state dict loads into torch.nn.Linear, which then computes the same
    reference = torch.nn.Linear(in_features, out_features, dtype=dtype)
    assert list(layer.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, in_features, dtype=dtype, generator=seeded(5))
    y = layer(x)
    assert tuple(y.shape) == (2, 7, out_features) and y.dtype == dtype
    torch.testing.assert_close(y, reference(x), rtol=0, atol=1e-14)
    # and a NumPy reference, x W^T + b
    W, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), x.numpy() @ W.T + b, atol=1e-14)
    if out_features >= in_features:  # orthonormal columns: an isometry
        norms = torch.linalg.vector_norm((y - layer.bias).detach(), dim=-1)
        torch.testing.assert_close(norms, torch.linalg.vector_norm(x, dim=-1), rtol=1e-14, atol=0)
    else:  # orthonormal rows: an isometry of the adjoint, W W^H = I
        z = torch.randn(4, out_features, dtype=dtype, generator=seeded(6))
        back = z @ layer.weight.detach().conj()
        torch.testing.assert_close(torch.linalg.vector_norm(back, dim=-1), torch.linalg.vector_norm(z, dim=-1),
                                   rtol=1e-14, atol=0)


def test_orthogonal_linear_repr_bias_and_inputs():
    assert repr(OrthogonalLinear(3, 5)) == repr(torch.nn.Linear(3, 5)).replace("Linear", "OrthogonalLinear")
    assert repr(OrthogonalLinear(4, 2, bias=False)) == repr(torch.nn.Linear(4, 2, bias=False)).replace(
        "Linear", "OrthogonalLinear")
    assert repr(OrthogonalLinear(2, 2, complex=True)).endswith("bias=True, complex=True)")
    layer = OrthogonalLinear(4, 2, bias=False, init="identity")
    assert layer.bias is None and list(layer.state_dict()) == ["weight"]
    np.testing.assert_array_equal(layer.weight.detach().numpy(), np.eye(2, 4))
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x[:, :2], rtol=0, atol=0)
    # a complex layer takes a real input; float32 by default
    complex_layer = OrthogonalLinear(3, 4, complex=True, generator=seeded())
    assert complex_layer(torch.randn(5, 3)).dtype == torch.complex64
    assert float(complex_layer.bias.detach().real.abs().max()) <= 1 / np.sqrt(3) / np.sqrt(2)
    assert float(complex_layer.bias.detach().imag.abs().max()) > 0
    # nn.Linear's bias law: uniform in [-1/sqrt(in), 1/sqrt(in)]
    bias = OrthogonalLinear(400, 2000, dtype=torch.float64, generator=seeded(1)).bias.detach()
    assert float(bias.abs().max()) <= 1 / 20 and float(bias.abs().max()) > 0.9 / 20


def test_orthogonal_linear_reset_copy_and_reload():
    layer = OrthogonalLinear(6, 3, dtype=torch.float64, generator=seeded(0))
    weight, before = layer.weight, layer.weight.detach().clone()
    layer.reset_parameters(generator=seeded(1))
    assert layer.weight is weight and is_unitary(layer.weight) and not torch.equal(before, weight.detach())
    assert orthonormality_error(layer.weight) < 1e-14
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert is_unitary(clone.weight) and torch.equal(clone.weight.detach(), layer.weight.detach())
    # the registration hook checks a replacement of the marked weight (torch's
    # load_state_dict reports the hook's ValueError as a RuntimeError)
    message = r"OrthogonalLinear.weight \(marked unitary; its replacement\) \(shape \(3, 6\), float64\) is not unitary"
    with pytest.raises(ValueError, match=message):
        layer.weight = torch.nn.Parameter(torch.randn(3, 6, dtype=torch.float64))
    bad = {"weight": torch.randn(3, 6, dtype=torch.float64), "bias": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(bad, assign=True)
    assert layer.weight is weight and is_unitary(layer.weight)
    good = {"weight": torch.eye(3, 6, dtype=torch.float64), "bias": torch.zeros(3, dtype=torch.float64)}
    layer.load_state_dict(good, assign=True)
    assert layer.weight is not weight and is_unitary(layer.weight)


@pytest.mark.parametrize("features", [(3, 7), (7, 3)])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("variant", ["tangent", "direct", "cayley"])
def test_projunn_steps_keep_the_weight_orthonormal_and_lower_the_loss(features, complex_, variant):
    in_features, out_features = features
    layer = OrthogonalLinear(in_features, out_features, bias=False, complex=complex_, dtype=torch.float64,
                             generator=seeded(8))
    dtype = layer.weight.dtype
    x = torch.randn(32, in_features, dtype=dtype, generator=seeded(9))
    target = torch.randn(32, out_features, dtype=dtype, generator=seeded(10))

    def loss():
        return (layer(x) - target).abs().square().sum()

    first = float(loss().detach())
    for step in range(8):
        layer.zero_grad()
        loss().backward()
        with torch.no_grad():
            layer.weight.copy_(projunn_step(layer.weight.detach(), layer.weight.grad, lr=1e-3, rank=1,
                                            variant=variant, rng=step))
    assert orthonormality_error(layer.weight) < 1e-13
    assert float(loss().detach()) < first


@pytest.mark.parametrize("features", [(3, 7), (7, 3)])
def test_projunn_optimizer_keeps_orthogonal_linear_orthonormal(features):
    """ProjUNN(model.parameters()) on a model with an OrthogonalLinear."""
    model = torch.nn.Sequential(OrthogonalLinear(*features, dtype=torch.float64, generator=seeded(11)),
                                torch.nn.Tanh(), torch.nn.Linear(features[1], 1, dtype=torch.float64))
    opt = ProjUNN(model.parameters(), lr=1e-2, rank=1, seed=0)
    assert [group["unitary"] for group in opt.param_groups] == [False, True]
    x = torch.randn(16, features[0], dtype=torch.float64, generator=seeded(12))
    before = model[0].weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert not torch.equal(before, model[0].weight.detach())
    assert orthonormality_error(model[0].weight) < 1e-13


def test_bad_orthogonal_linear_arguments():
    with pytest.raises(ValueError, match=r"in_features must be an integer >= 1, got 0"):
        OrthogonalLinear(0, 3)
    with pytest.raises(TypeError, match=r"out_features must be an integer, got float: 2.5"):
        OrthogonalLinear(3, 2.5)
    with pytest.raises(ValueError, match=r"init must be one of 'haar', 'identity', got 'henaff'"):
        OrthogonalLinear(3, 3, init="henaff")
    with pytest.raises(TypeError, match=r"dtype must be torch.float32 or torch.float64 .* got torch.complex64"):
        OrthogonalLinear(3, 3, dtype=torch.complex64)


def test_complex_layer_cast_to_a_real_dtype_is_refused():
    """module.to(torch.float64) casts the complex weight to real, discarding
    its imaginary part (torch warns once per process): the layer went on with
    a weight 0.64 off unitary. It now refuses to run; module.double() keeps
    the weight complex and matches a float64 NumPy reference."""
    layer = OrthogonalLinear(4, 4, complex=True, generator=seeded(0))
    x = torch.randn(3, 4, dtype=torch.float64, generator=seeded(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "Casting complex values to real discards the imaginary part"
        cast = copy.deepcopy(layer).to(torch.float64)
    assert cast.weight.dtype == torch.float64
    with pytest.raises(TypeError, match=r"^OrthogonalLinear: the layer is complex, but its weight has dtype "
                                        r"torch.float64: a cast to a real dtype \(module.to\(torch.float64\)\) "
                                        r"discarded its imaginary part, and it is no longer unitary. .*"
                                        r"module.double\(\) .*, or module.to\(torch.complex128\)$"):
        cast(x)
    W = layer.weight.detach().numpy().astype(np.complex128)
    b = layer.bias.detach().numpy().astype(np.complex128)
    y = layer.double()(x)
    assert y.dtype == torch.complex64  # double() leaves complex parameters as they are
    np.testing.assert_allclose(y.detach().numpy(), x.numpy() @ W.T + b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("complex_", [False, True])
def test_layer_built_under_a_default_device_puts_every_parameter_there(complex_):
    """Under ``with torch.device("meta")`` the weight was drawn on the CPU
    while the bias followed the default device: a model split across devices.
    On "meta" both have no values; load_state_dict(assign=True) gives them
    those of a checkpoint, and the weight stays marked."""
    source = OrthogonalLinear(3, 5, complex=complex_, dtype=torch.float64, generator=seeded(2))
    with torch.device("meta"):
        layer = OrthogonalLinear(3, 5, complex=complex_, dtype=torch.float64)
    assert {name: p.device.type for name, p in layer.named_parameters()} == {"weight": "meta", "bias": "meta"}
    assert is_unitary(layer.weight) and layer.weight.dtype == source.weight.dtype
    layer.load_state_dict(source.state_dict(), assign=True)
    assert is_unitary(layer.weight) and layer.weight.device.type == "cpu"
    x = torch.randn(2, 3, dtype=torch.float64, generator=seeded(3))
    W, b = (p.detach().numpy() for p in (source.weight, source.bias))
    np.testing.assert_allclose(layer(x).detach().numpy(), x.numpy() @ W.T + b, rtol=0, atol=1e-14)
