"""PyTorch CPU transfers of the small matrices (``unitary_lr._host``):
NumPy arrays wrapped where they lie, the same values and the same memory
sharing as ``asarray``, a copy where PyTorch cannot share the memory; CPU
tensors read without needless dispatches, whatever their lazy flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import array_api_compat.torch as xpt  # noqa: E402

from unitary_lr._host import from_host, from_host_stack, to_host, transfers  # noqa: E402

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


def _host_array(rng, shape, complex_):
    x = rng.standard_normal(shape)
    return x + 1j * rng.standard_normal(shape) if complex_ else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", [CPU, "cpu"], ids=["torch.device", "str"])
def test_from_host_casts_as_asarray_does(dtype, device):
    """Fresh float64/complex128 host arrays in every dtype: the values of
    ``torch.asarray`` exactly, and shared memory exactly where the dtype
    already matches (asarray shares there too)."""
    rng = np.random.default_rng(0)
    x = _host_array(rng, (3, 4), dtype.is_complex)
    ours = from_host(xpt, x, dtype=dtype, device=device)
    reference = torch.asarray(x, dtype=dtype, device=CPU)
    assert ours.dtype == dtype and ours.device == CPU and ours.shape == (3, 4)
    assert torch.equal(ours, reference)
    shares = {np.dtype(np.float64): torch.float64, np.dtype(np.complex128): torch.complex128}[x.dtype] == dtype
    assert (ours.data_ptr() == x.ctypes.data) == shares
    assert np.shares_memory(reference.numpy(), x) == shares


@pytest.mark.parametrize("case", ["read-only", "negative strides", "big-endian", "strided"])
def test_from_host_copies_what_torch_cannot_wrap(case):
    """Memory PyTorch cannot (or should not) share gives a copy with the same
    values and no warning; a strided view is wrapped as it is."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    if case == "read-only":
        x.flags.writeable = False
    elif case == "negative strides":
        x = x[::-1, ::-2]
    elif case == "big-endian":
        x = x.astype(">f8")
    else:
        x = x[:, ::2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = from_host(xpt, x, dtype=torch.float64, device=CPU)
    np.testing.assert_array_equal(ours.numpy(), np.asarray(x, dtype=np.float64))
    assert np.shares_memory(ours.numpy(), x) == (case == "strided")


def test_from_host_leaves_an_unnamed_device_to_torch():
    """device None is the default device (which ``torch.set_default_device``
    may change): asarray decides, as before."""
    x = np.arange(6.0).reshape(2, 3)
    ours = from_host(xpt, x, dtype=torch.float32, device=None)
    assert torch.equal(ours, torch.asarray(x, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_host_stack_gives_the_pieces(dtype):
    rng = np.random.default_rng(2)
    stack = _host_array(rng, (3, 2, 2), dtype.is_complex)
    pieces = from_host_stack(xpt, stack, dtype=dtype, device=CPU)
    assert len(pieces) == 3
    for piece, part in zip(pieces, stack):
        assert piece.dtype == dtype and piece.shape == (2, 2)
        assert torch.equal(piece, torch.asarray(part, dtype=dtype))


@pytest.mark.parametrize("view", ["plain", "conj", "neg", "conj of neg", "requires grad", "transposed"])
def test_to_host_reads_the_values_of_any_view(view):
    """A CPU tensor with lazy conjugation or negation, one that requires grad,
    a transposed view: the host copy holds the values the tensor means, and
    each read counts as one transfer."""
    rng = np.random.default_rng(3)
    base = torch.from_numpy(_host_array(rng, (3, 3), True))
    expected = base.numpy().copy()
    x = base
    if view == "conj":
        x, expected = base.conj(), expected.conj()
    elif view == "neg":
        x, expected = torch._neg_view(base), -expected
    elif view == "conj of neg":
        x, expected = torch._neg_view(base).conj(), -expected.conj()
    elif view == "requires grad":
        x = base.clone().requires_grad_()
    elif view == "transposed":
        x, expected = base.mT, expected.T
    assert x.is_conj() == ("conj" in view) and x.is_neg() == ("neg" in view)
    before = transfers.count
    host = to_host(xpt, x)
    assert transfers.count == before + 1
    np.testing.assert_array_equal(host, expected)
