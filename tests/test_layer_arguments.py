"""Argument checks of unitary_parameter, ModReLU, UnitaryRNN and orthogonal:
every bad argument is refused with an error that names it, the same way
whichever init is asked for, and nothing is changed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.torch import ModReLU, OrthogonalLinear, UnitaryRNN, is_unitary, orthogonal, unitary_parameter  # noqa: E402

INITS = ("haar", "identity", "henaff")


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("batch_shape", [(-1,), (2, -3)])
def test_negative_batch_shape_is_refused_by_every_init(init, batch_shape):
    # "identity" gave torch's expand error, "henaff" a (0, 3, 3) parameter
    with pytest.raises(ValueError, match=rf"^batch_shape must not have negative sizes, got \({batch_shape[0]},"):
        unitary_parameter(3, init=init, batch_shape=batch_shape)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("batch_shape", [(2.0,), (True,), ("2",), 2])
def test_batch_shape_of_non_integers_is_refused_by_every_init(init, batch_shape):
    with pytest.raises(TypeError, match=r"^batch_shape must be a tuple of ints, got "):
        unitary_parameter(3, init=init, batch_shape=batch_shape)


@pytest.mark.parametrize("init", INITS)
def test_integer_batch_shapes_still_give_independent_unitary_matrices(init):
    # NumPy integers (a .shape, an arithmetic result) are sizes, as for n
    p = unitary_parameter(3, init=init, batch_shape=(np.int64(2), 0 + 1), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    assert tuple(p.shape) == (2, 1, 3, 3) and is_unitary(p)
    W = p.detach().numpy()
    gram = np.swapaxes(W, -1, -2) @ W
    assert np.abs(gram - np.eye(3)).max() < 1e-14
    if init != "identity":  # independent draws
        assert np.abs(W[0] - W[1]).max() > 1e-3
    else:
        assert np.array_equal(W, np.broadcast_to(np.eye(3), (2, 1, 3, 3)))


@pytest.mark.parametrize("features", [-1, 0, 2.5, True, "3", None])
def test_modrelu_refuses_a_features_that_is_not_a_size(features):
    # -1 gave torch's negative-dimension error, 2.5 empty()'s TypeError, 0 was accepted
    with pytest.raises(ValueError, match=rf"^features must be an integer >= 1, got {features!r}$"):
        ModReLU(features)


def test_modrelu_size_message_matches_unitary_rnn():
    with pytest.raises(ValueError) as modrelu:
        ModReLU(-1)
    with pytest.raises(ValueError) as rnn:
        UnitaryRNN(3, -1)
    assert str(modrelu.value).replace("features", "SIZE") == str(rnn.value).replace("hidden_size", "SIZE")
    assert tuple(ModReLU(1).bias.shape) == (1,)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.int64, torch.bool, "float32"])
def test_modrelu_refuses_a_dtype_that_is_not_a_real_precision(dtype):
    # a complex dtype made a complex bias (forward dropped its imaginary part, with torch's warning only); an integer
    # one gave torch's NotImplementedError from uniform_
    with pytest.raises(TypeError) as modrelu:
        ModReLU(3, dtype=dtype)
    assert str(modrelu.value) == f"dtype must be torch.float32 or torch.float64 (the real precision), got {dtype}"
    with pytest.raises(TypeError) as rnn:  # the same message as the recurrent layer's
        UnitaryRNN(2, 3, dtype=dtype)
    assert str(modrelu.value) == str(rnn.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modrelu_with_a_real_dtype_still_builds_and_keeps_its_bias_real(dtype):
    act = ModReLU(3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert act.bias.dtype == dtype and float(act.bias.detach().abs().max()) <= 0.01
    z = torch.tensor([[3 + 4j, -1j, 0j]], dtype=torch.complex128)
    b = act.bias.detach().double().numpy()
    expected = z.numpy() / np.where(z.numpy() == 0, 1, np.abs(z.numpy())) * np.maximum(np.abs(z.numpy()) + b, 0)
    np.testing.assert_allclose(act(z).detach().numpy(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-15)


@pytest.mark.parametrize("complex_", ["no", 1, 0, None, np.bool_(True)])
def test_unitary_rnn_refuses_a_complex_that_is_not_a_bool(complex_):
    # "no" is truthy: it silently built a complex layer
    with pytest.raises(TypeError, match=rf"^complex must be True or False, got {complex_!r}$"):
        UnitaryRNN(2, 3, complex=complex_)


@pytest.mark.parametrize("complex_, dtype", [(False, torch.float32), (True, torch.complex64)])
def test_unitary_rnn_with_a_bool_complex_still_builds(complex_, dtype):
    rnn = UnitaryRNN(2, 3, complex=complex_)
    assert rnn.complex is complex_ and rnn.weight_hh.dtype == dtype


@pytest.mark.parametrize("init", ["closest", "haar"])
def test_orthogonal_refuses_a_lazy_parameter_the_same_way_for_both_inits(init):
    # "haar" gave torch's "Attempted to use an uninitialized parameter"
    layer = torch.nn.LazyLinear(3)
    with pytest.raises(TypeError, match=r"^LazyLinear.weight is an uninitialized \(lazy\) parameter; run the "
                                        r"module once before marking it$"):
        orthogonal(layer, init=init)
    assert isinstance(layer.weight, torch.nn.parameter.UninitializedParameter) and not is_unitary(layer.weight)


@pytest.mark.parametrize("init", ["closest", "haar"])
@pytest.mark.parametrize("generator", [5, "seed", np.random.default_rng(0)])
def test_orthogonal_refuses_a_generator_that_is_not_a_torch_generator(init, generator):
    # an int gave torch.randint()'s argument-combination error
    layer = torch.nn.Linear(3, 3)
    before = layer.weight.detach().clone()
    with pytest.raises(TypeError, match=rf"^generator must be a torch.Generator or None, got "
                                        rf"{type(generator).__name__}: "):
        orthogonal(layer, init=init, generator=generator)
    assert torch.equal(layer.weight, before) and not is_unitary(layer.weight)


def test_orthogonal_haar_with_a_torch_generator_is_seeded():
    a = orthogonal(torch.nn.Linear(3, 3), init="haar", generator=torch.Generator().manual_seed(4))
    b = orthogonal(torch.nn.Linear(3, 3), init="haar", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.weight, b.weight) and is_unitary(a.weight)
    W = a.weight.detach().double().numpy()
    assert np.abs(W.T @ W - np.eye(3)).max() < 1e-6


@pytest.mark.parametrize("make", [
    lambda generator: unitary_parameter(3, generator=generator),
    lambda generator: unitary_parameter(4, init="henaff", generator=generator),
    lambda generator: ModReLU(3, generator=generator),
    lambda generator: UnitaryRNN(2, 3, generator=generator),
    lambda generator: OrthogonalLinear(3, 3, generator=generator),
])
def test_layers_refuse_a_generator_that_is_not_a_torch_generator(make):
    # "'int' object has no attribute 'device'", or torch's randint signature error
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None, got int: 5$"):
        make(5)
    assert make(torch.Generator().manual_seed(0)) is not None
