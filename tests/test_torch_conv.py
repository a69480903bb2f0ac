"""unitary_lr.torch.FourierConv2d: exactly orthogonal (unitary) after training."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.torch import FourierConv2d, ProjUNN  # noqa: E402

SIZES = [(4, 5), (5, 4), (4, 4), (3, 3), (1, 6), (6, 1)]


def trained(conv, steps=6, seed=0):
    """A few projUNN steps on a random loss, so that every U_f has moved."""
    opt = ProjUNN(conv.parameters(), lr=0.2, base="adam", rank=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    h, w = conv.size
    dtype = torch.complex128 if conv.complex else torch.float64
    for _ in range(steps):
        x = torch.randn(3, conv.channels, h, w, dtype=dtype, generator=g)
        target = torch.randn(3, conv.out_channels, h, w, dtype=dtype, generator=g)
        loss = (conv(x) - target).abs().square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return conv


def operator_matrix(conv):
    h, w = conv.size
    n = conv.channels * h * w
    dtype = torch.complex128 if conv.complex else torch.float64
    basis = torch.eye(n, dtype=dtype).reshape(n, conv.channels, h, w)
    with torch.no_grad():
        return conv(basis).reshape(n, n).T  # column k is the image of basis vector k


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("complex_", [False, True])
def test_operator_is_exactly_orthogonal_after_training(size, complex_):
    conv = trained(FourierConv2d(2, size, complex=complex_, init="haar", dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(1)))
    M = operator_matrix(conv)
    assert M.dtype == (torch.complex128 if complex_ else torch.float64)  # a real layer maps reals to reals
    identity = torch.eye(M.shape[0], dtype=M.dtype)
    assert float((M.mH @ M - identity).abs().max()) < 1e-13
    x = torch.randn(4, 2, *size, dtype=M.dtype)
    norms = torch.linalg.vector_norm
    torch.testing.assert_close(norms(conv(x).detach(), dim=(1, 2, 3)), norms(x, dim=(1, 2, 3)), rtol=1e-13, atol=0)


@pytest.mark.parametrize("size", [(4, 5), (3, 4)])
def test_real_layer_matches_a_full_spectrum_reference(size):
    """Independent NumPy reference: the full 2-D spectrum, U(-f) = conj(U(f)),
    y = ifft2(U_f fft2(x)_f); its imaginary part vanishes and it equals the layer."""
    h, w = size
    conv = trained(FourierConv2d(3, size, init="haar", dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    half = conv.matrices().detach().numpy()  # (h, w // 2 + 1, c, c)
    full = np.empty((h, w, 3, 3), dtype=np.complex128)
    for i in range(h):
        for j in range(w):
            full[i, j] = half[i, j] if j <= w // 2 else np.conj(half[(-i) % h, (-j) % w])
    x = np.random.default_rng(3).standard_normal((2, 3, h, w))
    X = np.fft.fft2(x, norm="ortho")
    y = np.fft.ifft2(np.einsum("ijab,nbij->naij", full, X), norm="ortho")
    assert np.abs(y.imag).max() < 1e-14
    np.testing.assert_allclose(conv(torch.asarray(x)).detach().numpy(), y.real, atol=1e-14)


def test_identity_init_and_parameter_layout():
    conv = FourierConv2d(4, (6, 8), dtype=torch.float64)
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    # the identity map up to an FFT round trip's rounding, ~eps log(h w) |x|
    torch.testing.assert_close(conv(x), x, rtol=0, atol=50 * torch.finfo(torch.float64).eps * float(x.abs().max()))
    # one batched parameter per kind: h * (w/2 - 1) + 2 * (h/2 - 1) free pairs, 4 self-conjugate corners
    assert tuple(conv.weight.shape) == (6 * 3 + 2 * 2, 4, 4) and conv.weight.dtype == torch.complex128
    assert tuple(conv.weight_real.shape) == (4, 4, 4) and conv.weight_real.dtype == torch.float64
    opt = ProjUNN(conv.parameters(), lr=0.1)
    assert [g["unitary"] for g in opt.param_groups] == [True]  # both marked: projUNN steps, batched
    complex_conv = FourierConv2d(2, (3, 5), complex=True, dtype=torch.float32)
    assert tuple(complex_conv.weight.shape) == (15, 2, 2) and complex_conv.weight_real is None
    assert complex_conv(torch.randn(1, 2, 3, 5)).dtype == torch.complex64


def test_float32_layer_preserves_norm():
    conv = FourierConv2d(3, (8, 8), init="haar", generator=torch.Generator().manual_seed(0))
    opt = ProjUNN(conv.parameters(), lr=0.1, base="adam", rank=1, seed=0)
    for _ in range(20):
        x = torch.randn(4, 3, 8, 8)
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(conv(x).detach().norm(), x.norm(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("complex_", [False, True])
def test_double_and_empty_batches(complex_):
    """``module.double()`` casts the real ``weight_real`` and leaves the
    complex ``weight``: the real layer then failed with a dtype error; it
    now works in the wider precision, as the same layer made in float64
    does. An empty batch, which MKL's FFT refuses, gives an empty result
    that backpropagates (zeros)."""
    conv = FourierConv2d(2, (4, 6), init="haar", complex=complex_, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if complex_:
        x = x + 1j * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = conv(x.to(torch.complex64 if complex_ else torch.float32))
    doubled = conv.double()
    y = doubled(x)
    assert y.dtype == (torch.complex64 if complex_ else torch.float64)  # a complex layer's precision is its weight's
    torch.testing.assert_close(y.to(expected.dtype), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.norm().to(torch.float64), x.norm(), rtol=1e-6, atol=0)
    empty = doubled(x[:0])
    assert tuple(empty.shape) == (0, 2, 4, 6) and empty.dtype == y.dtype
    empty.abs().sum().backward()
    assert torch.count_nonzero(doubled.weight.grad) == 0


def test_gradients_match_finite_differences():
    conv = FourierConv2d(2, (3, 4), init="haar", dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    target = torch.randn(2, 2, 3, 4, dtype=torch.float64)

    def loss(weight, weight_real):
        out = torch.func.functional_call(conv, {"weight": weight, "weight_real": weight_real}, (x,))
        return ((out - target) ** 2).sum()

    weight = conv.weight.detach().clone().requires_grad_(True)
    weight_real = conv.weight_real.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (weight, weight_real))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"channels must be an integer >= 1, got 0"):
        FourierConv2d(0, (4, 4))
    with pytest.raises(ValueError, match=r"size must be two integers \(h, w\) >= 1, got \(4,\)"):
        FourierConv2d(2, (4,))
    with pytest.raises(ValueError, match=r"init must be 'identity' or 'haar', got 'henaff'"):
        FourierConv2d(2, (4, 4), init="henaff")
    with pytest.raises(TypeError, match=r"dtype must be torch.float32 or torch.float64 .* got torch.complex64"):
        FourierConv2d(2, (4, 4), dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"input must be \(B, 2, 4, 4\), got shape \(1, 3, 4, 4\)"):
        FourierConv2d(2, (4, 4))(torch.zeros(1, 3, 4, 4))


# ------------------------------------------- different input and output channels

CHANNELS = [(2, 3), (3, 2), (1, 3), (3, 1)]  # (in, out)


def stepped(conv, steps=4, seed=0):
    """A few projUNN kernel steps on the weights of a random loss, so that
    every U_f has moved (the kernel directly; ``trained`` goes through ProjUNN)."""
    from unitary_lr import projunn_step

    g = torch.Generator().manual_seed(seed)
    h, w = conv.size
    dtype = torch.complex128 if conv.complex else torch.float64
    for step in range(steps):
        x = torch.randn(3, conv.in_channels, h, w, dtype=dtype, generator=g)
        target = torch.randn(3, conv.out_channels, h, w, dtype=dtype, generator=g)
        conv.zero_grad()
        (conv(x) - target).abs().square().sum().backward()
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(projunn_step(p.detach(), p.grad, lr=0.1, rank=1, variant="tangent", rng=step))
    return conv


def dense_reference(conv):
    """The operator as a dense (d h w) x (c h w) matrix from explicit DFT
    matrices in NumPy: M[a p, b q] = sum_f conj(D[f, p]) U_f[a, b] D[f, q],
    with the full spectrum U(-f) = conj(U(f)) for the real layer."""
    h, w = conv.size
    d, c = conv.out_channels, conv.in_channels
    U = conv.matrices().detach().numpy()
    if not conv.complex:
        full = np.empty((h, w, d, c), dtype=np.complex128)
        for i in range(h):
            for j in range(w):
                full[i, j] = U[i, j] if j <= w // 2 else np.conj(U[(-i) % h, (-j) % w])
        U = full

    def dft(n):
        k = np.arange(n)
        return np.exp(-2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)

    D = np.kron(dft(h), dft(w))  # orthonormal 2-D DFT on row-major (h, w) images
    M = np.einsum("fp,fab,fq->apbq", D.conj(), U.reshape(h * w, d, c), D)
    return M.reshape(d * h * w, c * h * w)


def rectangular_operator(conv):
    h, w = conv.size
    n = conv.in_channels * h * w
    dtype = torch.complex128 if conv.complex else torch.float64
    basis = torch.eye(n, dtype=dtype).reshape(n, conv.in_channels, h, w)
    with torch.no_grad():
        return conv(basis).reshape(n, -1).T


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", [(4, 5), (3, 4), (1, 2)])
@pytest.mark.parametrize("complex_", [False, True])
def test_rectangular_layer_matches_a_dense_dft_reference_and_is_an_isometry(channels, size, complex_):
    c, d = channels
    conv = stepped(FourierConv2d(c, size, out_channels=d, complex=complex_, init="haar", dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(5)))
    h, w = size
    assert tuple(conv.weight.shape[1:]) == (d, c)
    M = rectangular_operator(conv)
    assert tuple(M.shape) == (d * h * w, c * h * w)
    assert M.dtype == (torch.complex128 if complex_ else torch.float64)  # a real layer maps reals to reals
    reference = dense_reference(conv)
    if not complex_:
        assert np.abs(reference.imag).max() < 1e-14
    np.testing.assert_allclose(M.numpy(), reference if complex_ else reference.real, atol=1e-13)
    # orthonormal columns per frequency: an isometry for d >= c, else a co-isometry
    gram = M.mH @ M if d >= c else M @ M.mH
    assert float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max()) < 1e-13
    if d >= c:
        x = torch.randn(4, c, h, w, dtype=M.dtype)
        norms = torch.linalg.vector_norm
        torch.testing.assert_close(norms(conv(x).detach(), dim=(1, 2, 3)), norms(x, dim=(1, 2, 3)),
                                   rtol=1e-13, atol=0)


def test_rectangular_layout_identity_init_and_repr():
    conv = FourierConv2d(2, (6, 8), out_channels=3, dtype=torch.float64)
    assert (conv.in_channels, conv.out_channels, conv.channels) == (2, 3, 2)
    assert tuple(conv.weight.shape) == (22, 3, 2) and tuple(conv.weight_real.shape) == (4, 3, 2)
    assert tuple(conv.matrices().shape) == (6, 5, 3, 2)
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    y = conv(x)
    # the identity init embeds the input channels and pads with zero channels
    atol = 50 * torch.finfo(torch.float64).eps * float(x.abs().max())
    torch.testing.assert_close(y[:, :2], x, rtol=0, atol=atol)
    torch.testing.assert_close(y[:, 2], torch.zeros_like(y[:, 2]), rtol=0, atol=atol)
    narrow = FourierConv2d(3, (4, 4), out_channels=1, complex=True, dtype=torch.float32)
    assert tuple(narrow(torch.randn(2, 3, 4, 4)).shape) == (2, 1, 4, 4)
    assert repr(narrow) == "FourierConv2d(3, size=(4, 4), out_channels=1, unitary)"
    assert repr(FourierConv2d(3, (4, 4), out_channels=3)) == "FourierConv2d(3, size=(4, 4), orthogonal)"
    with pytest.raises(ValueError, match=r"out_channels must be an integer >= 1, got 0"):
        FourierConv2d(2, (4, 4), out_channels=0)
    with pytest.raises(ValueError, match=r"input must be \(B, 2, 4, 4\), got shape \(1, 3, 4, 4\)"):
        FourierConv2d(2, (4, 4), out_channels=3)(torch.zeros(1, 3, 4, 4))


def test_rectangular_layer_trained_with_projunn_stays_an_isometry():
    conv = trained(FourierConv2d(2, (4, 5), out_channels=3, init="haar", dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(6)))
    M = rectangular_operator(conv)
    assert float((M.mH @ M - torch.eye(M.shape[1], dtype=M.dtype)).abs().max()) < 1e-13


def numpy_reference(matrices, x, size):
    """float64 NumPy of the documented real layer: irfft2(U_f rfft2(x)_f), orthonormal scaling."""
    U = matrices.detach().to(torch.complex128).numpy()
    X = np.fft.rfft2(np.asarray(x, dtype=np.float64), norm="ortho")
    return np.fft.irfft2(np.einsum("ijab,nbij->naij", U, X), s=size, norm="ortho")


@pytest.mark.parametrize("how", ["assign", "to_empty", "default device, to_empty"])
def test_layer_built_on_the_meta_device_loads_a_checkpoint(how):
    """Built on the meta device and then given its values (load_state_dict
    with assign=True, or to_empty and load_state_dict): the frequency map,
    not in the state dict, stayed on "meta" or uninitialised, and the layer
    returned garbage (1e17, NaN) or an IndexError."""
    size = (6, 5)
    source = FourierConv2d(3, size, init="haar", dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    state = source.state_dict()
    if how == "default device, to_empty":
        with torch.device("meta"):
            conv = FourierConv2d(3, size, init="haar", dtype=torch.float64)
    else:
        conv = FourierConv2d(3, size, init="haar", dtype=torch.float64, device="meta")
    assert conv.weight.is_meta and conv.weight_real.is_meta
    if how == "assign":
        conv.load_state_dict(state, assign=True)
    else:
        conv.to_empty(device="cpu").load_state_dict(state)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    expected = numpy_reference(source.matrices(), x.numpy(), size)
    np.testing.assert_allclose(conv(x).detach().numpy(), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(conv(x).norm(), x.norm(), rtol=1e-13, atol=0)
    assert conv._gather.device.type == "cpu"


@pytest.mark.parametrize("complex_", [False, True])
def test_cast_to_a_real_dtype_is_refused_and_double_works(complex_):
    """module.to(torch.float64) casts the complex weight to real and discards
    its imaginary part (torch warns once per process): the layer went on,
    2.0 off the float64 reference. It now refuses to run; module.double()
    keeps the weight complex and matches the reference."""
    size = (4, 6)
    make = dict(init="haar", complex=complex_, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "Casting complex values to real discards the imaginary part"
        cast = FourierConv2d(2, size, **make).to(torch.float64)
    assert not cast.weight.is_complex()
    hint = r"module.double\(\) \(or .float\(\)\), which keep complex parameters complex"
    hint += r", or module.to\(torch.complex128\)$" if complex_ else "$"
    with pytest.raises(TypeError, match=r"^FourierConv2d: weight \(the matrices of the frequencies\) is complex, but "
                                        r"it has dtype torch.float64: a cast to a real dtype "
                                        r"\(module.to\(torch.float64\)\) discarded its imaginary part, and it is "
                                        r"no longer unitary. .*" + hint):
        cast(x.to(torch.complex128) if complex_ else x)
    with pytest.raises(TypeError, match=r"discarded its imaginary part"):
        cast.matrices()
    doubled = FourierConv2d(2, size, **make).double()
    assert doubled.weight.is_complex()
    if complex_:
        U = doubled.matrices().detach().to(torch.complex128).numpy()
        X = np.fft.fft2(x.numpy(), norm="ortho")
        expected = np.fft.ifft2(np.einsum("ijab,nbij->naij", U, X), norm="ortho")
        np.testing.assert_allclose(doubled(x.to(torch.complex128)).detach().numpy(), expected, rtol=0, atol=1e-6)
    else:
        expected = numpy_reference(doubled.matrices(), x.numpy(), size)
        np.testing.assert_allclose(doubled(x).detach().numpy(), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "complex128"])
def test_unsupported_precision_is_a_clear_type_error(cast):
    """module.half() / .bfloat16() on the real layer gave a bare KeyError
    (torch.float16) from the layer's dtype table, in forward and matrices();
    module.to(a complex dtype) too."""
    conv = FourierConv2d(3, (4, 4), init="haar", generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning on complex modules
        conv = conv.to(torch.complex128) if cast == "complex128" else getattr(conv, cast)()
    dtype = conv.weight_real.dtype
    why = "a complex dtype made the real orthogonal matrices" if cast == "complex128" else "half precision"
    message = (rf"^FourierConv2d: weight_real has dtype {dtype}; the real layer supports float32 and float64 "
               rf"\({why}.*\): use module.float\(\) or module.double\(\)$")
    with pytest.raises(TypeError, match=message):
        conv(torch.randn(2, 3, 4, 4).to(dtype))
    with pytest.raises(TypeError, match=message):
        conv.matrices()
