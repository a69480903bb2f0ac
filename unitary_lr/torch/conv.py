"""``FourierConv2d``: full-width orthogonal (real) or unitary (complex)
convolutions in the Fourier domain.

A circular convolution with c input and d output channels is diagonal in the
2-D Fourier basis: one d x c matrix U_f per spatial frequency f. It is
orthogonal (unitary) exactly when every U_f is unitary (Trockman and Kolter,
2021); for d != c it is an isometry (d > c) or a co-isometry (d < c) exactly
when every U_f has orthonormal columns (rows). The matrices are the layer's
parameters, trained with batched projUNN updates: all frequencies in one
(F, d, c) parameter, one call per step.

For real input and output the spectrum is Hermitian, X(-f) = conj(X(f)), and
the operator maps real images to real images exactly when U(-f) = conj(U(f)).
Only one matrix of each pair (f, -f) is a parameter; its partner is derived
by conjugation, so the constraint holds after every update by construction,
not just at initialisation. The self-conjugate frequencies (f = -f: the
corners (0, 0), (0, w/2), (h/2, 0), (h/2, w/2) that exist) get real
orthogonal matrices, a second batched parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_int
from .layers import COMPLEX_OF, _check_size, check_complex_flag, real_precision, unitary_parameter

__all__ = ["FourierConv2d"]


def _half_spectrum_sources(h, w):
    """For each frequency (i, j) of the rfft2 grid (h x (w//2 + 1)), where its
    matrix comes from: ("free", index), ("mirror", index of the free partner)
    or ("real", index)."""
    width = w // 2 + 1
    free, real, sources = [], [], {}
    for i in range(h):
        for j in range(width):
            mirrored_column = j == 0 or (w % 2 == 0 and j == w // 2)
            partner = (-i) % h
            if not mirrored_column:
                sources[i, j] = ("free", len(free))
                free.append((i, j))
            elif partner == i:
                sources[i, j] = ("real", len(real))
                real.append((i, j))
            elif i < partner:
                sources[i, j] = ("free", len(free))
                free.append((i, j))
    for i in range(h):
        for j in range(width):
            if (i, j) not in sources:
                sources[i, j] = ("mirror", sources[(-i) % h, j][1])
    return free, real, sources


class FourierConv2d(nn.Module):
    r"""Orthogonal (real) or unitary (complex) 2-D circular convolution with
    c input and d output channels, one d x c matrix with orthonormal columns
    (d >= c) or rows (d < c) per frequency.

    Parameters
    ----------
    channels : int
        c, the number of input channels (and of output channels unless
        ``out_channels`` is given).
    size : tuple of int
        (h, w), the spatial size of the images (the convolution is circular
        over it: a full-width kernel).
    out_channels : int, optional
        d, the number of output channels; ``channels`` when omitted (a
        square, orthogonal operator).
    complex : bool, optional
        Complex images and a unitary operator (else real images and an
        orthogonal operator).
    init : {"identity", "haar"}, optional
        Every U_f the identity (the first d columns or c rows of I for
        d != c: the layer starts as the identity map, zero-padded or truncated
        over channels) or Haar-random.
    dtype : torch.float32 or torch.float64, optional
        Real precision.
    device : optional
    generator : torch.Generator, optional

    Raises
    ------
    ValueError
        channels or out_channels below 1, a size of other than two integers
        or with one below 1, an unknown init; at ``forward``, an input that
        is not (B, c, h, w).
    TypeError
        channels or out_channels not an integer (a bool, a float), a size
        that is not a tuple or list of integers; a dtype other than
        torch.float32 or torch.float64; ``complex`` not True or False.

    Notes
    -----
    ``forward(x)`` computes ``X = fft2(x)`` (``rfft2`` for the real layer, with
    the orthonormal scaling), ``Y_f = U_f X_f`` for every frequency, and the
    inverse transform: O(B h w ((c + d) log(h w) + c d)). By Parseval,
    ``||forward(x)|| = ||x||`` to rounding for every x when d >= c; for
    d < c the operator's adjoint preserves norms instead. The parameters are
    ``weight`` ((F, d, c) complex, marked unitary) and, for the real layer,
    ``weight_real`` ((S, d, c) real, orthonormal columns or rows, S <= 4):
    give them to :class:`ProjUNN` and each is updated with one batched
    projUNN call.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import FourierConv2d
    >>> conv = FourierConv2d(3, (8, 8), init="haar", dtype=torch.float64,
    ...                      generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    >>> y = conv(x)
    >>> y.dtype, bool(torch.isclose(y.norm(), x.norm()))
    (torch.float64, True)
    >>> wider = FourierConv2d(3, (8, 8), out_channels=5, init="haar", dtype=torch.float64)
    >>> z = wider(x)
    >>> tuple(z.shape), bool(torch.isclose(z.norm(), x.norm()))
    ((2, 5, 8, 8), True)
    """

    def __init__(self, channels, size, *, out_channels=None, complex=False, init="identity", dtype=None,
                 device=None, generator=None):
        super().__init__()
        channels = _check_size("channels", channels)
        out_channels = channels if out_channels is None else _check_size("out_channels", out_channels)
        wanted = f"size must be two integers (h, w) >= 1, got {size!r}"
        try:  # (NumPy integers too: the entries of an array's shape)
            sizes = tuple(check_int("size", s) for s in size) if isinstance(size, (tuple, list)) else None
        except TypeError:
            sizes = None
        if sizes is None:  # not a tuple or list, or an entry that is not an integer (a bool, a float)
            raise TypeError(wanted)
        if len(sizes) != 2 or min(sizes) < 1:
            raise ValueError(wanted)
        check_complex_flag(complex)
        if init not in ("identity", "haar"):
            raise ValueError(f"init must be 'identity' or 'haar', got {init!r}")
        real_dtype = real_precision(dtype)
        self.channels, self.size, self.complex = channels, sizes, complex
        self.in_channels, self.out_channels = channels, out_channels
        h, w = self.size
        shape = (out_channels, channels)  # U_f maps the c input channels to the d output ones
        options = {"init": init, "device": device, "generator": generator}
        if complex:
            self.weight = unitary_parameter(*shape, batch_shape=(h * w,), dtype=COMPLEX_OF[real_dtype], **options)
            self.weight_real = None
            self.register_buffer("_gather", None, persistent=False)
            return
        free, real, sources = _half_spectrum_sources(h, w)
        self.weight = unitary_parameter(*shape, batch_shape=(len(free),), dtype=COMPLEX_OF[real_dtype], **options)
        self.weight_real = unitary_parameter(*shape, batch_shape=(len(real),), dtype=real_dtype, **options)
        # Index into the bank [weight, conj(weight), weight_real] for every
        # frequency of the rfft2 grid, in row-major order.
        offsets = {"free": 0, "mirror": len(free), "real": 2 * len(free)}
        index = [offsets[kind] + k for kind, k in (sources[i, j] for i in range(h) for j in range(w // 2 + 1))]
        self.register_buffer("_gather", torch.tensor(index, device=device), persistent=False)

    def matrices(self):
        """The d x c matrix of every frequency of the transform's grid: (h, w, d, c)
        for the complex layer, (h, w // 2 + 1, d, c) for the real one."""
        h, w = self.size
        d, c = self.out_channels, self.in_channels
        dtype = self._complex_dtype()
        if self.complex:
            return self.weight.to(dtype).reshape(h, w, d, c)
        weight = self.weight.to(dtype)
        bank = torch.cat([weight, weight.conj(), self.weight_real.to(dtype)])
        return bank.index_select(0, self._gather).reshape(h, w // 2 + 1, d, c)

    def _complex_dtype(self):
        """The precision of the layer's work, as a complex dtype: that of its
        parameters, the wider one where they differ (``module.double()``
        casts the real ``weight_real`` and leaves the complex ``weight`` as it
        is: the layer then failed with a dtype error)."""
        if self.complex:
            return self.weight.dtype
        return torch.promote_types(self.weight.dtype, COMPLEX_OF[self.weight_real.dtype])

    def forward(self, x):
        """Convolve a batch of images.

        Parameters
        ----------
        x : torch.Tensor, shape (B, channels, h, w)
            Real images (complex ones for a complex layer); cast to the
            layer's dtype.

        Returns
        -------
        torch.Tensor, shape (B, out_channels, h, w)
            Real for a real layer, complex for a complex one; with the same
            norm as ``x`` per image, to rounding, when out_channels >=
            channels.

        Raises
        ------
        ValueError
            ``x`` of the wrong shape.
        """
        h, w = self.size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, h, w):
            raise ValueError(f"input must be (B, {self.channels}, {h}, {w}), got shape {tuple(x.shape)}")
        U = self.matrices()
        if x.shape[0] == 0:  # an empty batch, which MKL's FFT refuses: an empty result, tied to U
            total = U.sum()
            return (total if self.complex else total.real).expand(0, self.out_channels, h, w)
        if self.complex:
            X = torch.fft.fft2(x.to(U.dtype), norm="ortho")
            return torch.fft.ifft2(torch.einsum("ijab,nbij->naij", U, X), norm="ortho")
        X = torch.fft.rfft2(x.to(U.real.dtype), norm="ortho")
        return torch.fft.irfft2(torch.einsum("ijab,nbij->naij", U, X), s=(h, w), norm="ortho")

    def extra_repr(self):
        kind = "unitary" if self.complex else "orthogonal"
        out = f", out_channels={self.out_channels}" if self.out_channels != self.in_channels else ""
        return f"{self.channels}, size={self.size}{out}, {kind}"

