"""Argument checks of unitary_parameter, ModReLU, UnitaryRNN and orthogonal:
every bad argument is refused with an error that names it, the same way
whichever init is asked for, and nothing is changed."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr import random_unitary  # noqa: E402
from unitary_lr.torch import (  # noqa: E402
    FourierConv2d,
    ModReLU,
    OrthogonalLinear,
    UnitaryRNN,
    is_unitary,
    orthogonal,
    unitary_parameter,
)

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


@pytest.mark.parametrize("features", [-1, 0, np.int64(0)], ids=repr)
def test_modrelu_refuses_a_features_below_one(features):
    # -1 gave torch's negative-dimension error, 0 was accepted
    with pytest.raises(ValueError, match=rf"^features must be an integer >= 1, got {re.escape(repr(features))}$"):
        ModReLU(features)


@pytest.mark.parametrize("features", [2.5, True, "3", None], ids=repr)
def test_modrelu_refuses_a_features_that_is_not_an_integer_with_a_type_error(features):
    # a ValueError, where the adapters' sizes of a wrong type are TypeErrors
    with pytest.raises(TypeError, match=rf"^features must be an integer, got {type(features).__name__}: "
                                        rf"{re.escape(repr(features))}$"):
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


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# each layer built from sizes, with a generator seeded the same way: (sizes, build(*sizes))
SIZED = {
    "unitary_parameter": ((4, 3), lambda n, m: unitary_parameter(n, m, dtype=torch.float64, generator=seeded())),
    "unitary_parameter_batch": ((3,), lambda n: unitary_parameter(n, batch_shape=(n,), generator=seeded())),
    "ModReLU": ((5,), lambda n: ModReLU(n, generator=seeded())),
    "OrthogonalLinear": ((4, 6), lambda n, m: OrthogonalLinear(n, m, generator=seeded())),
    "UnitaryRNN": ((3, 4, 2), lambda i, h, layers: UnitaryRNN(i, h, layers, init="haar", generator=seeded())),
    "FourierConv2d": ((2, 4, 3, 5), lambda c, h, w, d: FourierConv2d(c, (h, w), out_channels=d, init="haar",
                                                                    generator=seeded())),
}


def _values(made):
    return {"": made} if isinstance(made, torch.Tensor) else dict(made.named_parameters())


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint16], ids=lambda t: t.__name__)
@pytest.mark.parametrize("layer", list(SIZED))
def test_numpy_integer_sizes_build_the_same_layer_as_python_ints(layer, integer):
    # "in_features must be an integer >= 1, got np.int64(4)" (a ValueError), while torch.nn.Linear,
    # random_unitary and the optimizers take them (np.prod of a shape is one)
    sizes, build = SIZED[layer]
    made, reference = build(*map(integer, sizes)), build(*sizes)
    own, expected = _values(made), _values(reference)
    assert own.keys() == expected.keys()
    for name, value in expected.items():
        assert own[name].dtype == value.dtype and torch.equal(own[name], value), name
        assert is_unitary(own[name]) == is_unitary(value), name
    for attribute in ("in_features", "out_features", "hidden_size", "num_layers", "channels", "out_channels"):
        if hasattr(made, attribute):  # stored as Python ints (their repr is the layer's repr)
            assert type(getattr(made, attribute)) is int and getattr(made, attribute) == getattr(reference, attribute)
    if isinstance(made, FourierConv2d):
        assert made.size == (4, 3) and all(type(s) is int for s in made.size)
    if isinstance(made, torch.nn.Module):
        assert repr(made) == repr(reference)


def test_compile_recurrence_takes_a_numpy_integer_steps():
    rnn = UnitaryRNN(2, 3)
    assert rnn.compile_recurrence(np.int64(7)) is rnn and rnn._recurrence_steps == 7
    assert type(rnn._recurrence_steps) is int
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1 or None, got 0$"):
        rnn.compile_recurrence(0)
    assert rnn._recurrence_steps == 7  # nothing changed


@pytest.mark.parametrize("steps", [True, 2.0, np.float64(3.0), "5"], ids=repr)
def test_compile_recurrence_refuses_steps_of_a_wrong_type_with_a_type_error(steps):
    # a ValueError
    rnn = UnitaryRNN(2, 3)
    with pytest.raises(TypeError, match=rf"^steps must be an integer >= 1 or None, got {type(steps).__name__}: "
                                        rf"{re.escape(repr(steps))}$"):
        rnn.compile_recurrence(steps)
    assert rnn._recurrence_steps is None


SIZE_ARGUMENTS = {
    "ModReLU.features": lambda n: ModReLU(n),
    "OrthogonalLinear.in_features": lambda n: OrthogonalLinear(n, 3),
    "OrthogonalLinear.out_features": lambda n: OrthogonalLinear(3, n),
    "UnitaryRNN.input_size": lambda n: UnitaryRNN(n, 3),
    "UnitaryRNN.hidden_size": lambda n: UnitaryRNN(2, n),
    "UnitaryRNN.num_layers": lambda n: UnitaryRNN(2, 3, n),
    "FourierConv2d.channels": lambda n: FourierConv2d(n, (4, 4)),
    "FourierConv2d.out_channels": lambda n: FourierConv2d(2, (4, 4), out_channels=n),
    "unitary_parameter.m": lambda n: unitary_parameter(3, n),
}


@pytest.mark.parametrize("argument", list(SIZE_ARGUMENTS))
@pytest.mark.parametrize("bad", [0, -1, np.int64(0), np.int64(-2)], ids=repr)
def test_sizes_below_one_are_value_errors(argument, bad):
    name = argument.split(".")[1]
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got {re.escape(repr(bad))}$"):
        SIZE_ARGUMENTS[argument](bad)


@pytest.mark.parametrize("argument", list(SIZE_ARGUMENTS))
@pytest.mark.parametrize("bad", [True, np.True_, 2.0, 4.0, np.float64(2.0), "3", [3], torch.tensor(2.0)], ids=repr)
def test_sizes_of_a_wrong_type_are_type_errors_naming_the_argument(argument, bad):
    # they were ValueErrors, where the adapters' sizes (and n of unitary_parameter) of a wrong type are TypeErrors
    name = argument.split(".")[1]
    with pytest.raises(TypeError, match=rf"^{name} must be an integer, got {type(bad).__name__}: "
                                        rf"{re.escape(repr(bad))}$"):
        SIZE_ARGUMENTS[argument](bad)


@pytest.mark.parametrize("size", [(np.int64(4), 3), np.array([4, 3]).tolist(), tuple(np.array([4, 3]))])
def test_fourier_conv_size_of_numpy_integers(size):
    conv = FourierConv2d(2, size, init="haar", dtype=torch.float64, generator=seeded())
    reference = FourierConv2d(2, (4, 3), init="haar", dtype=torch.float64, generator=seeded())
    assert conv.size == (4, 3) and torch.equal(conv.weight, reference.weight)
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    assert torch.isclose(conv(x).norm(), x.norm())


@pytest.mark.parametrize("size", [(4, 0), (0, 3), (4, -1), (4,), (4, 3, 2), (), [np.int64(0), 3]], ids=repr)
def test_fourier_conv_size_of_integers_but_not_two_at_least_one_is_a_value_error(size):
    with pytest.raises(ValueError, match=rf"^size must be two integers \(h, w\) >= 1, got {re.escape(repr(size))}$"):
        FourierConv2d(2, size)


@pytest.mark.parametrize("size", [(4, True), (4, 3.0), (4, np.float32(3)), (2.5, 3), np.array([4, 3]), 4, "43",
                                  None, (4, "3"), (4.0, 3, 2)], ids=repr)
def test_fourier_conv_size_of_a_wrong_type_is_a_type_error(size):
    # a ValueError
    with pytest.raises(TypeError, match=rf"^size must be two integers \(h, w\) >= 1, got {re.escape(repr(size))}$"):
        FourierConv2d(2, size)


COMPLEX_LAYERS = {
    "OrthogonalLinear": lambda complex_: OrthogonalLinear(3, 3, complex=complex_),
    "FourierConv2d": lambda complex_: FourierConv2d(2, (4, 4), complex=complex_),
    "UnitaryRNN": lambda complex_: UnitaryRNN(2, 3, complex=complex_),
}


@pytest.mark.parametrize("complex_", ["False", "no", 1, 0, None, np.bool_(True), np.bool_(False)], ids=repr)
@pytest.mark.parametrize("layer", list(COMPLEX_LAYERS))
def test_layers_refuse_a_complex_that_is_not_a_bool(layer, complex_):
    # OrthogonalLinear(complex="False") and FourierConv2d(complex="False") built complex layers
    with pytest.raises(TypeError, match=rf"^complex must be True or False, got {re.escape(repr(complex_))}$"):
        COMPLEX_LAYERS[layer](complex_)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("layer", list(COMPLEX_LAYERS))
def test_layers_with_a_bool_complex_still_build(layer, complex_):
    made = COMPLEX_LAYERS[layer](complex_)
    assert made.complex is complex_
    weight = made.weight_hh if isinstance(made, UnitaryRNN) else made.weight
    if isinstance(made, FourierConv2d):  # the real layer's weight_real is real, its weight complex either way
        assert (made.weight_real is None) == complex_
    else:
        assert weight.is_complex() == complex_


@pytest.mark.parametrize("dtype", [[torch.float32], {"dtype": torch.float64}, "torch.float64"], ids=repr)
@pytest.mark.parametrize("make", [
    lambda dtype: ModReLU(3, dtype=dtype),
    lambda dtype: OrthogonalLinear(3, 3, dtype=dtype),
    lambda dtype: UnitaryRNN(2, 3, dtype=dtype),
    lambda dtype: FourierConv2d(2, (4, 4), dtype=dtype),
], ids=["ModReLU", "OrthogonalLinear", "UnitaryRNN", "FourierConv2d"])
def test_layers_refuse_an_unhashable_dtype_naming_it(make, dtype):
    # a list gave "unhashable type: 'list'"
    with pytest.raises(TypeError, match=r"^dtype must be torch.float32 or torch.float64 \(the real precision\), "
                                        r"got " + re.escape(str(dtype)) + "$"):
        make(dtype)


def test_unitary_parameter_refuses_an_unhashable_dtype_naming_it():
    with pytest.raises(TypeError, match=r"^dtype must be float32, float64, complex64 or complex128, got \[torch"):
        unitary_parameter(3, dtype=[torch.float32])
    with pytest.raises(TypeError, match=r"^dtype must be float32, float64, complex64 or complex128, got \[torch"):
        unitary_parameter(torch.eye(3), dtype=[torch.float32])


def _orthogonal(n, seed=0):
    return torch.from_numpy(random_unitary(n, dtype="float64", rng=seed))


@pytest.mark.parametrize("option", [
    {"init": "no-such-init"}, {"init": "haar"}, {"init": "identity"},
    {"batch_shape": (2,)}, {"batch_shape": [2]}, {"batch_shape": []}, {"batch_shape": "2"},
    {"generator": torch.Generator().manual_seed(0)},
], ids=lambda option: "=".join(map(str, next(iter(option.items())))).split(" object at")[0])
def test_unitary_parameter_of_a_tensor_refuses_the_options_of_a_new_parameter(option):
    # they were ignored without a word (even an unknown init), while m was refused
    Q = _orthogonal(4)
    kept = Q.clone()
    (name, value), = option.items()
    with pytest.raises(ValueError, match=rf"^{name} .* new parameter; with a tensor \(shape \(4, 4\)\).* must be "
                                         rf"omitted, got {name}="):
        unitary_parameter(Q, **option)
    assert torch.equal(Q, kept)


@pytest.mark.parametrize("generator", [5, "seed", np.random.default_rng(0)], ids=lambda g: type(g).__name__)
def test_unitary_parameter_of_a_tensor_refuses_a_generator_that_is_not_a_torch_generator(generator):
    with pytest.raises(TypeError, match=rf"^generator must be a torch.Generator or None, got "
                                        rf"{type(generator).__name__}: "):
        unitary_parameter(_orthogonal(3), generator=generator)


@pytest.mark.parametrize("project", ["yes", 1, None, np.bool_(True)], ids=repr)
@pytest.mark.parametrize("value", [3, "tensor"])
def test_unitary_parameter_refuses_a_project_that_is_not_a_bool(value, project):
    # with a size, any project was accepted
    with pytest.raises(TypeError, match=rf"^project must be True or False, got {re.escape(repr(project))}$"):
        unitary_parameter(_orthogonal(3) if value == "tensor" else value, project=project)


@pytest.mark.parametrize(("source", "dtype"), [
    ("float64", torch.float32), ("float64", torch.complex128), ("float64", torch.complex64),
    ("complex128", torch.complex64), ("float32", torch.complex64),
])
def test_unitary_parameter_of_a_tensor_is_made_in_the_dtype_asked_for(source, dtype):
    # unitary_parameter(float64 Q, dtype=torch.float32) was a float64 parameter
    Q = torch.from_numpy(random_unitary(5, dtype=source, rng=1))
    kept = Q.clone()
    W = unitary_parameter(Q, dtype=dtype)
    assert W.dtype == dtype and is_unitary(W) and W.requires_grad and tuple(W.shape) == (5, 5)
    assert torch.equal(W.detach(), Q.to(dtype)) and torch.equal(Q, kept)
    assert W.data_ptr() != Q.data_ptr()
    A = W.detach().to(torch.complex128).numpy()
    tolerance = 1e-6 if dtype in (torch.float32, torch.complex64) else 1e-13
    assert np.abs(A.conj().T @ A - np.eye(5)).max() < tolerance


def test_unitary_parameter_of_a_tensor_keeps_its_dtype_and_device_when_omitted():
    Q = _orthogonal(3)
    W = unitary_parameter(Q)
    assert W.dtype == torch.float64 and W.device == Q.device and torch.equal(W.detach(), Q)


def test_unitary_parameter_of_a_complex_tensor_refuses_a_real_dtype():
    Q = torch.from_numpy(random_unitary(3, dtype="complex128", rng=2))
    with pytest.raises(TypeError, match=r"^dtype torch.float64 is real but n_or_tensor is complex \(torch.complex128\)"
                                        r": its imaginary part would be dropped$"):
        unitary_parameter(Q, dtype=torch.float64)


def test_unitary_parameter_of_a_tensor_checks_in_the_dtype_asked_for():
    # unitary to float32's tolerance, not to float64's: accepted as float32, refused as float64
    Q = _orthogonal(4) + 1e-7
    W = unitary_parameter(Q, dtype=torch.float32)
    assert W.dtype == torch.float32 and is_unitary(W)
    with pytest.raises(ValueError, match=r"is not unitary"):
        unitary_parameter(Q, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"is not unitary"):  # a float32 draw is not float64-unitary
        unitary_parameter(torch.from_numpy(random_unitary(4, dtype="float32", rng=3)), dtype=torch.float64)
    P = unitary_parameter(Q, dtype=torch.float64, project=True)
    assert is_unitary(P) and float((P.detach().T @ P.detach() - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-13


def test_unitary_parameter_of_a_tensor_goes_to_the_device_asked_for():
    # device="meta" gave a CPU parameter; the check runs where the tensor is (a meta copy has no values)
    Q = _orthogonal(3)
    W = unitary_parameter(Q, device="meta")
    assert W.device.type == "meta" and tuple(W.shape) == (3, 3) and W.dtype == Q.dtype
    assert is_unitary(W) and W.requires_grad and isinstance(W, torch.nn.Parameter)
    with pytest.raises(ValueError, match=r"is not unitary"):  # checked before it moves
        unitary_parameter(2 * Q, device="meta")
    assert unitary_parameter(Q, device="cpu").device.type == "cpu"


@pytest.mark.parametrize("array", [np.eye(3), np.eye(3, dtype=np.float32)[None], np.array([3.0])], ids=repr)
def test_unitary_parameter_refuses_a_numpy_array_naming_the_argument(array):
    # "n must be an integer >= 1, got array(...)", a ValueError
    with pytest.raises(TypeError, match=rf"^n_or_tensor must be an integer \(the size n of a new parameter\) or a "
                                        rf"torch.Tensor \(its value\), got a NumPy array of shape "
                                        rf"{re.escape(str(array.shape))} and dtype {array.dtype}; pass "
                                        r"torch.from_numpy\(array\)$"):
        unitary_parameter(array)


@pytest.mark.parametrize("n", [3.0, True, "3", None], ids=repr)
def test_unitary_parameter_refuses_a_size_that_is_not_an_integer(n):
    with pytest.raises(TypeError, match=rf"^n_or_tensor must be an integer .* got {type(n).__name__}: "):
        unitary_parameter(n)


@pytest.mark.parametrize("n", [0, -1, np.int64(0)], ids=repr)
def test_unitary_parameter_refuses_a_size_below_one(n):
    with pytest.raises(ValueError, match=rf"^n must be an integer >= 1, got {re.escape(repr(n))}$"):
        unitary_parameter(n)


def test_unitary_parameter_init_omitted_is_haar():
    a = unitary_parameter(4, dtype=torch.float64, generator=seeded(5))
    b = unitary_parameter(4, init="haar", dtype=torch.float64, generator=seeded(5))
    assert torch.equal(a, b) and not torch.equal(a.detach(), torch.eye(4, dtype=torch.float64))
    # UnitaryRNN's own init (default "henaff") does not take None
    with pytest.raises(ValueError, match=r"^init must be one of 'haar', 'identity', 'henaff', got None$"):
        UnitaryRNN(2, 3, init=None)


@pytest.mark.parametrize("init", ["haar", "identity", "henaff"])
def test_unitary_parameter_follows_the_default_device(init):
    """device omitted: torch's default device, as every other parameter (it
    was the CPU: under ``with torch.device("meta")`` a model came out split
    across devices, and "henaff" failed with "Cannot copy out of meta
    tensor"). On "meta": no values, marked without a check. The host draw
    is pinned to the CPU: a device named under another default device gives
    the same values as without it."""
    with torch.device("meta"):
        W = unitary_parameter(4, init=init, batch_shape=(2,), dtype=torch.complex128, generator=seeded(1))
        on_cpu = unitary_parameter(4, init=init, dtype=torch.float64, device="cpu", generator=seeded(2))
    assert W.device.type == "meta" and tuple(W.shape) == (2, 4, 4) and W.dtype == torch.complex128
    assert is_unitary(W) and isinstance(W, torch.nn.Parameter) and W.requires_grad
    expected = unitary_parameter(4, init=init, dtype=torch.float64, generator=seeded(2))
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu, expected)
    A = on_cpu.detach().numpy()
    np.testing.assert_allclose(A.T @ A, np.eye(4), rtol=0, atol=1e-14)


@pytest.mark.parametrize("init", ["henaff", "haar"])
@pytest.mark.parametrize("complex_", [False, True])
def test_unitary_rnn_built_on_the_meta_device_loads_a_checkpoint(init, complex_):
    """UnitaryRNN under ``with torch.device("meta")``: every parameter on
    "meta" (weight_hh was on the CPU, and the default "henaff" init failed),
    then to_empty and load_state_dict give the checkpoint's outputs."""
    make = dict(num_layers=2, complex=complex_, init=init, nonlinearity="tanh", dtype=torch.float64)
    source = UnitaryRNN(3, 4, generator=seeded(4), **make)
    with torch.device("meta"):
        rnn = UnitaryRNN(3, 4, **make)
    assert {p.device.type for p in rnn.parameters()} == {"meta"}
    assert is_unitary(rnn.weight_hh) and is_unitary(rnn.weight_hh_l1)
    rnn = rnn.to_empty(device="cpu")
    rnn.load_state_dict(source.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=seeded(5))
    # float64 NumPy reference of h_t = tanh(W h_{t-1} + V x_t + c), layer after layer
    inputs = x.numpy().astype(np.complex128 if complex_ else np.float64)
    for layer in range(2):
        suffix = "" if layer == 0 else f"_l{layer}"
        W, V, c = (getattr(source, name + suffix).detach().numpy() for name in ("weight_hh", "weight_ih", "bias"))
        h = np.zeros((2, 4), dtype=inputs.dtype)
        states = []
        for u in inputs:
            z = h @ W.T + u @ V.T + c
            h = np.tanh(z.real) + 1j * np.tanh(z.imag) if complex_ else np.tanh(z)
            states.append(h)
        inputs = np.stack(states)
    np.testing.assert_allclose(rnn(x)[0].detach().numpy(), inputs, rtol=0, atol=1e-13)


def test_complex_unitary_rnn_cast_to_a_real_dtype_is_refused():
    """module.to(torch.float64) discards the imaginary part of the complex
    recurrent matrices (torch warns once per process): the layer went on with
    matrices that are no longer unitary."""
    rnn = UnitaryRNN(3, 4, num_layers=2, complex=True, generator=seeded(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rnn.to(torch.float64)
    with pytest.raises(TypeError, match=r"^UnitaryRNN: the layer is complex, but weight_hh has dtype torch.float64: "
                                        r"a cast to a real dtype \(module.to\(torch.float64\)\) discarded its "
                                        r"imaginary part, and it is no longer unitary. .*module.double\(\)"):
        rnn(torch.randn(5, 2, 3, dtype=torch.float64))
