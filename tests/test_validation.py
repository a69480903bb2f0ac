"""The checks every public array function shares: argument types, dtypes,
namespaces and devices, with messages that name the argument."""

import re

import numpy as np
import pytest

import unitary_lr as ul
from unitary_lr._validation import check_int

N = 6
W = np.eye(N)
a = np.ones((N, 2))

# (function, positional arrays, keyword options, names of the array arguments)
CALLS = [
    (ul.randomized_svd, (W,), {"rank": 1}, ("A",)),
    (ul.project_unitary, (W,), {}, ("A",)),
    (ul.project_unitary_lowrank, (W, a, a), {}, ("W", "a", "b")),
    (ul.exp_transport, (W, a, a), {}, ("W", "a", "b")),
    (ul.tangent_project, (W, W), {}, ("W", "G")),
    (ul.projunn_step, (W, W), {"lr": 0.1}, ("W", "G")),
    (ul.unitarity_error, (W,), {}, ("W",)),
]
IDS = [call[0].__name__ for call in CALLS]
MULTI = [call for call in CALLS if len(call[3]) > 1]  # calls with several arrays to mix
MULTI_IDS = [call[0].__name__ for call in MULTI]


@pytest.mark.parametrize(("function", "arrays", "options", "names"), CALLS, ids=IDS)
def test_non_arrays_are_type_errors_naming_the_argument(function, arrays, options, names):
    for i, name in enumerate(names):
        bad = list(arrays)
        bad[i] = [[1.0, 0.0], [0.0, 1.0]]
        with pytest.raises(TypeError, match=rf"^{name} must be an array .* got list: \[\[1.0, 0.0\], \[0.0, 1.0\]\]"):
            function(*bad, **options)
        bad[i] = 3.0
        with pytest.raises(TypeError, match=rf"^{name} must be an array"):
            function(*bad, **options)


@pytest.mark.parametrize(("function", "arrays", "options", "names"), CALLS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.bool_])
def test_unsupported_dtypes_are_type_errors(function, arrays, options, names, dtype):
    for i, name in enumerate(names):
        bad = list(arrays)
        bad[i] = bad[i].astype(dtype)
        with pytest.raises(TypeError, match=rf"^{name} has dtype {np.dtype(dtype).name}; expected one of float32, float64, complex64, complex128"):
            function(*bad, **options)


@pytest.mark.parametrize(("function", "arrays", "options", "names"), CALLS, ids=IDS)
@pytest.mark.parametrize("dtype", ["float64", "complex64"])
def test_another_machines_byte_order_is_named_with_the_conversion(function, arrays, options, names, dtype):
    """An array read from a big-endian file (``>f8`` on this machine) is the
    dtype's values in another byte order: the error said only "has dtype
    >f8; expected one of float32, float64, ...". It now says which dtype it
    holds and how to convert it, and the converted array is taken."""
    other = np.dtype(dtype).newbyteorder("S")
    for i, name in enumerate(names):
        bad = [x.astype(dtype) for x in arrays]
        bad[i] = bad[i].astype(other)
        with pytest.raises(TypeError, match=rf"^{name} has dtype {re.escape(str(other))}: {dtype} in the byte order "
                                            rf"of another machine.*{name}\.astype\({name}\.dtype\.newbyteorder"):
            function(*bad, **options)
        bad[i] = bad[i].astype(bad[i].dtype.newbyteorder("="))
        function(*bad, **options)


@pytest.mark.parametrize(("function", "arrays", "options", "names"), MULTI, ids=MULTI_IDS)
def test_mixed_libraries_are_type_errors(function, arrays, options, names):
    torch = pytest.importorskip("torch")
    bad = list(arrays)
    bad[-1] = torch.asarray(bad[-1])
    with pytest.raises(TypeError, match=rf"^{names[0]} is a numpy.ndarray but {names[-1]} is a torch.Tensor; pass arrays from one library"):
        function(*bad, **options)


@pytest.mark.parametrize(("function", "arrays", "options", "names"), MULTI, ids=MULTI_IDS)
def test_arrays_on_different_devices_are_value_errors(function, arrays, options, names):
    import array_api_strict as xs

    bad = [xs.asarray(x, device=xs.Device("device1")) for x in arrays]
    bad[-1] = xs.asarray(arrays[-1], device=xs.Device("device2"))
    with pytest.raises(ValueError, match=rf"^{names[0]} is on device .*device1.* but {names[-1]} is on device .*device2.*; move them to one device"):
        function(*bad, **options)


@pytest.mark.parametrize(("function", "arrays", "options", "names"), CALLS, ids=IDS)
def test_vectors_are_value_errors(function, arrays, options, names):
    for i, name in enumerate(names):
        bad = list(arrays)
        bad[i] = np.ones(N)
        with pytest.raises(ValueError, match=rf"^{name} must .*shape .* got shape \(6,\)"):
            function(*bad, **options)


def test_positional_only_arrays_and_keyword_only_options():
    with pytest.raises(TypeError):
        ul.projunn_step(W=W, G=W, lr=0.1)
    with pytest.raises(TypeError):
        ul.projunn_step(W, W, 0.1)
    with pytest.raises(TypeError):
        ul.exp_transport(W, a, a, 0.5)
    with pytest.raises(TypeError):
        ul.randomized_svd(W, 1, 10)


def test_bool_and_complex_scalars_are_not_a_learning_rate():
    # np.True_, a 0-d bool array or tensor were taken as lr = 1; a complex
    # scalar lost its imaginary part
    W = ul.random_unitary(4, dtype="float64", rng=0)
    scalars = [np.True_, np.array(True), np.complex128(0.1)]
    try:
        import torch

        scalars += [torch.tensor(True), torch.tensor(0.1 + 0j)]
    except ImportError:  # pragma: no cover - torch is in the test extra
        pass
    for lr in scalars:
        with pytest.raises(TypeError, match=r"lr must be a real number, got"):
            ul.projunn_step(W, np.ones((4, 4)), lr=lr, rng=0)
    for t in (np.False_, np.complex64(1)):
        with pytest.raises(TypeError, match=r"t must be a real number, got"):
            ul.exp_transport(W, np.ones((4, 1)), np.ones((4, 1)), t=t)


def test_a_tensor_that_requires_grad_is_read_without_a_warning():
    torch = pytest.importorskip("torch")
    import warnings

    W = ul.random_unitary(4, dtype="float64", rng=0)
    A = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Converting a tensor with requires_grad=True to a scalar"
        ul.projunn_step(W, np.ones((4, 4)), lr=torch.tensor(0.1, requires_grad=True), rng=0)
        ul.project_unitary(A, method="newton_schulz")


def test_default_drift_tolerance_names_what_it_takes():
    from unitary_lr.diagnostics import default_drift_tolerance

    assert (default_drift_tolerance("float32"), default_drift_tolerance("complex128")) == (1e-5, 1e-12)
    for bad in ("float16", np.float32, None):
        with pytest.raises(ValueError, match=r"dtype_name_ must be one of 'float32', 'complex64', 'float64', "
                                             r"'complex128', got"):
            default_drift_tolerance(bad)


@pytest.mark.parametrize("call", ["projunn_step", "exp_transport", "randomized_svd", "project_unitary"])
def test_a_numpy_masked_array_is_refused_by_name(call):
    """A masked array failed deep inside a step with NumPy's "operands could
    not be broadcast together" (its mask follows some operations and not
    others), and project_unitary returned a masked array; np.matrix was
    already refused. A memory-mapped array (another ndarray subclass) is an
    array like any other."""
    W = ul.random_unitary(4, dtype="float64", rng=0)
    G = np.random.default_rng(1).standard_normal((4, 4))
    calls = {"projunn_step": lambda M: ul.projunn_step(M, G, lr=0.1, rng=0),
             "exp_transport": lambda M: ul.exp_transport(M, G[:, :1], G[:, 1:2]),
             "randomized_svd": lambda M: ul.randomized_svd(M, 2, rng=0),
             "project_unitary": lambda M: ul.project_unitary(M)}
    name = "A" if call in ("randomized_svd", "project_unitary") else "W"
    with pytest.raises(TypeError, match=rf"^{name} is a NumPy masked array, which unitary_lr does not take: pass "
                                        rf"the array of its values, {name}.filled\(\) or np.asarray\({name}\)$"):
        calls[call](np.ma.masked_array(W))
    result = calls[call](np.ma.masked_array(W).filled())
    expected = calls[call](W)
    for got, want in zip(*(r if isinstance(r, tuple) else (r,) for r in (result, expected))):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("function", ["tangent_project", "projunn_step"])
def test_a_complex_gradient_of_a_real_w_is_refused_naming_both_dtypes(function):
    """A real (orthogonal) W takes a real gradient: projunn_step refused a
    complex G, tangent_project returned a complex "projection", which is no
    tangent vector of the real group. A real G for a complex W, or a G of
    another precision, is still projected (to ``result_type(W, G)``)."""
    W = ul.random_unitary(5, dtype="float64", rng=0)
    G = np.random.default_rng(1).standard_normal((5, 5))
    calls = {"tangent_project": lambda W, G: ul.tangent_project(W, G),
             "projunn_step": lambda W, G: ul.projunn_step(W, G, lr=0.1, rng=0)}
    before = W.copy()
    for complex_dtype in (np.complex128, np.complex64):
        with pytest.raises(TypeError, match=rf"^G has complex dtype {np.dtype(complex_dtype).name} but W is real "
                                            r"\(float64\); a real \(orthogonal\) W takes a real gradient"):
            calls[function](W, (G + 0.5j).astype(complex_dtype))
    np.testing.assert_array_equal(W, before)
    if function == "tangent_project":
        Wc = W.astype(np.complex128)
        Z = ul.tangent_project(Wc, G)
        assert Z.dtype == np.complex128
        np.testing.assert_allclose(Z, G - Wc @ (Wc.conj().T @ G + G.T @ Wc) / 2, atol=1e-14)
        assert ul.tangent_project(W.astype(np.float32), G).dtype == np.float64


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_an_integer_argument_refuses_a_bool_array_of_any_library(library):
    """Sizes and ranks are integers: a 0-d bool array is none (torch's
    ``operator.index(tensor(True))`` is 1, and ModReLU(torch.tensor(True))
    built a layer of size 1), while a 0-d integer array of each library is
    taken as the number it holds."""
    xp = pytest.importorskip(library if library != "jax" else "jax.numpy")
    with pytest.raises(TypeError, match="rank must be an integer, got bool"):
        check_int("rank", xp.asarray(True))
    assert check_int("rank", xp.asarray(3), minimum=1) == 3
    if library == "torch":
        from unitary_lr.torch import ModReLU

        with pytest.raises(TypeError, match="features must be an integer, got bool"):
            ModReLU(xp.asarray(True))
