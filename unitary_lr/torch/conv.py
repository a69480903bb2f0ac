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

import functools

import torch
from torch import nn

from .._validation import check_int
from .layers import COMPLEX_OF, _check_size, check_complex_flag, real_cast_error, real_precision, unitary_parameter

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


@functools.lru_cache(maxsize=8)
def _gather_index(h, w):
    """The index of every frequency of the rfft2 grid (h x (w//2 + 1)), in
    row-major order, into the bank [weight, conj(weight), weight_real]: a
    tuple of ints (built once per size)."""
    free, real, sources = _half_spectrum_sources(h, w)
    offsets = {"free": 0, "mirror": len(free), "real": 2 * len(free)}
    return tuple(offsets[kind] + k for kind, k in (sources[i, j] for i in range(h) for j in range(w // 2 + 1)))


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
        torch.float32 or torch.float64; ``complex`` not True or False; at
        ``forward`` and ``matrices``, parameters that a cast of the module
        left in a dtype the layer cannot use: a real ``weight``
        (``module.to(torch.float64)`` discards the imaginary part of complex
        parameters; ``module.double()`` keeps them complex), half precision
        (``module.half()``), a complex ``weight_real``.

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
        free, real, _ = _half_spectrum_sources(h, w)
        self.weight = unitary_parameter(*shape, batch_shape=(len(free),), dtype=COMPLEX_OF[real_dtype], **options)
        self.weight_real = unitary_parameter(*shape, batch_shape=(len(real),), dtype=real_dtype, **options)
        # Index into the bank [weight, conj(weight), weight_real] for every
        # frequency of the rfft2 grid, in row-major order. Not in the state
        # dict (it is a function of the size): rebuilt by _apply and wherever
        # it is not where the weight is (see _frequency_map).
        self.register_buffer("_gather", self._new_gather(self.weight.device), persistent=False)

    def _new_gather(self, device):
        return torch.tensor(_gather_index(*self.size), dtype=torch.int64, device=device)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .to_empty(), ...: the frequency map is rebuilt where
        # the weight now is. (to_empty left it uninitialised, and the layer
        # indexed with garbage: a wrong result or an IndexError.)
        module = super()._apply(fn, recurse)
        if self._gather is not None:
            self._gather = self._new_gather(self.weight.device)
        return module

    def _frequency_map(self):
        """``_gather``, on the device of the weight. A layer built on the meta
        device, whose weights ``load_state_dict(..., assign=True)`` then
        replaced, still had it on "meta", and the CPU's index_select read it
        without an error: the result was garbage. One device comparison per
        call where nothing changed."""
        gather = self._gather
        if gather.device != self.weight.device:
            gather = self._gather = self._new_gather(self.weight.device)
        return gather

    def matrices(self):
        """The d x c matrix of every frequency of the transform's grid: (h, w, d, c)
        for the complex layer, (h, w // 2 + 1, d, c) for the real one; a
        TypeError for parameters of a dtype the layer cannot use (see the
        class)."""
        h, w = self.size
        d, c = self.out_channels, self.in_channels
        dtype = self._complex_dtype()
        if self.complex:
            return self.weight.to(dtype).reshape(h, w, d, c)
        weight = self.weight.to(dtype)
        bank = torch.cat([weight, weight.conj(), self.weight_real.to(dtype)])
        return bank.index_select(0, self._frequency_map()).reshape(h, w // 2 + 1, d, c)

    def _complex_dtype(self):
        """The precision of the layer's work, as a complex dtype: that of its
        parameters, the wider one where they differ (``module.double()``
        casts the real ``weight_real`` and leaves the complex ``weight`` as it
        is: the layer then failed with a dtype error).

        A TypeError where a cast of the module left parameters the layer
        cannot use: a real ``weight`` (``module.to(torch.float64)``, a real
        dtype, casts complex parameters to real and discards their imaginary
        part, with at most one warning per process: the layer went on, no
        longer orthogonal), or a precision other than single and double
        (``module.half()``: a bare KeyError)."""
        weight = self.weight.dtype
        if not weight.is_complex:
            # (the real layer's weight_real is real: module.to(complex128) is no way out there)
            raise real_cast_error("FourierConv2d: weight (the matrices of the frequencies) is complex, but it",
                                  weight, complex_cast=self.complex)
        if weight not in COMPLEX_OF.values():
            raise TypeError(f"FourierConv2d: weight has dtype {weight}; the layer supports complex64 and complex128 "
                            f"(module.float() or module.double())")
        if self.complex:
            return weight
        real = self.weight_real.dtype
        if real not in COMPLEX_OF:
            why = ("a complex dtype made the real orthogonal matrices of the self-conjugate frequencies complex"
                   if real.is_complex else "half precision is not supported")
            raise TypeError(f"FourierConv2d: weight_real has dtype {real}; the real layer supports float32 and "
                            f"float64 ({why}): use module.float() or module.double()")
        return torch.promote_types(weight, COMPLEX_OF[real])

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
        TypeError
            Parameters of a dtype the layer cannot use (see the class).
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

