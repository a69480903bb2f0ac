"""unitary_lr.torch.FourierConv2d: exactly orthogonal (unitary) after training."""

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
        target = torch.randn(3, conv.channels, h, w, dtype=dtype, generator=g)
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
