"""``OrthogonalLinear``: a drop-in for ``torch.nn.Linear`` whose weight has
orthonormal columns (or rows), kept so by :class:`ProjUNN`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from ._mark import _set_mark
from .layers import (COMPLEX_OF, _check_size, check_complex_flag, check_generator, real_cast_error, real_precision,
                     unitary_parameter)

__all__ = ["OrthogonalLinear"]

_INITS = ("haar", "identity")


class OrthogonalLinear(nn.Module):
    r"""``y = x W^T + b`` as ``torch.nn.Linear``, with a weight W
    (out_features x in_features) that has orthonormal columns
    (``W^H W = I``, out_features >= in_features) or orthonormal rows
    (``W W^H = I``, out_features < in_features), marked unitary.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of each input and output sample, as for ``torch.nn.Linear``.
    bias : bool, optional
        Whether the layer adds a learnable bias b.
    complex : bool, optional
        A complex weight (orthonormal in the complex sense, ``W^H W = I``) and
        bias; a real input is cast to the complex dtype. Else real and
        orthogonal.
    init : {"haar", "identity"}, optional
        W Haar-random (the first columns, or rows, of a Haar orthogonal or
        unitary matrix) or the first columns (rows) of the identity.
    dtype : torch.float32 or torch.float64, optional
        Real precision; a complex layer uses the matching complex dtype.
        torch's default dtype when omitted.
    device : optional
    generator : torch.Generator, optional
        Source of the random initial values.

    Raises
    ------
    ValueError
        A size below 1, an unknown init.
    TypeError
        A size that is not an integer (a bool, a float, a string); a
        ``dtype`` other than torch.float32 or torch.float64; ``complex`` not
        True or False; a ``generator`` that is not a torch.Generator. At
        ``forward``, a complex layer whose weight is real:
        ``module.to(torch.float64)`` (a real dtype) discards the imaginary
        part of complex parameters, ``module.double()`` keeps them complex.

    Notes
    -----
    The parameters are ``weight`` (a :class:`UnitaryParameter`, marked) and
    ``bias`` (``None`` without bias): the state-dict keys, shapes and forward
    pass of ``torch.nn.Linear``, whose checkpoints therefore load.
    ``ProjUNN(model.parameters())`` puts the weight in a unitary group and
    trains it with projUNN steps, O(k n m) for an n x m weight; the layer
    preserves the norm of every input when out_features >= in_features
    (``||x W^T|| = ||x||``). The bias starts as ``torch.nn.Linear``'s,
    uniform in [-1/sqrt(in_features), 1/sqrt(in_features)] (a complex bias
    has real and imaginary parts of that law, divided by sqrt(2)).

    The class is a ``torch.nn.Module``, not a subclass of ``torch.nn.Linear``:
    code that re-initialises or merges updates into every ``nn.Linear``
    weight it finds (init loops, LoRA-style adapters) would silently take the
    weight off its manifold.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import OrthogonalLinear
    >>> layer = OrthogonalLinear(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> layer
    OrthogonalLinear(in_features=3, out_features=5, bias=True)
    >>> W = layer.weight.detach()
    >>> bool(torch.allclose(W.T @ W, torch.eye(3, dtype=torch.float64)))
    True
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> bool(torch.allclose((layer(x) - layer.bias).norm(dim=1), x.norm(dim=1)))
    True
    """

    def __init__(self, in_features, out_features, bias=True, *, complex=False, init="haar", dtype=None,
                 device=None, generator=None):
        super().__init__()
        in_features, out_features = _check_size("in_features", in_features), _check_size("out_features", out_features)
        check_complex_flag(complex)
        check_generator(generator)
        if init not in _INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, _INITS))}, got {init!r}")
        real_dtype = real_precision(dtype)
        self.in_features, self.out_features, self.complex, self.init = in_features, out_features, complex, init
        weight_dtype = COMPLEX_OF[real_dtype] if complex else real_dtype
        self.weight = unitary_parameter(out_features, in_features, init=init, dtype=weight_dtype, device=device,
                                        generator=generator)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=weight_dtype, device=device))
            self._reset_bias(generator)
        else:
            self.register_parameter("bias", None)

    def _reset_bias(self, generator):
        bound = 1 / math.sqrt(self.in_features)
        real = self.bias.real if self.complex else self.bias
        with torch.no_grad():
            real.uniform_(-bound, bound, generator=generator)
            if self.complex:
                self.bias.imag.uniform_(-bound, bound, generator=generator)
                self.bias.div_(math.sqrt(2))

    def reset_parameters(self, generator=None):
        """Draw new initial values in place (the parameters stay the same
        objects, the weight stays marked), as ``torch.nn.Linear.reset_parameters``.

        Parameters
        ----------
        generator : torch.Generator, optional
            Source of the random values.
        """
        fresh = unitary_parameter(self.out_features, self.in_features, init=self.init, dtype=self.weight.dtype,
                                  device=self.weight.device, generator=generator)
        with torch.no_grad():
            self.weight.copy_(fresh)
        _set_mark(self.weight)  # unchanged object; a no-op unless it lost its class
        if self.bias is not None:
            self._reset_bias(generator)

    def forward(self, x):
        """Apply the layer.

        Parameters
        ----------
        x : torch.Tensor, shape (..., in_features)
            Of the layer's dtype; a complex layer also takes a real x.

        Returns
        -------
        torch.Tensor, shape (..., out_features)

        Raises
        ------
        TypeError
            A complex layer whose weight a cast of the module made real (see
            the class).
        """
        if self.complex and not self.weight.is_complex():
            raise real_cast_error("OrthogonalLinear: the layer is complex, but its weight", self.weight.dtype)
        if self.complex and not x.is_complex():
            x = x.to(self.weight.dtype)
        return functional.linear(x, self.weight, self.bias)

    def extra_repr(self):
        # torch.nn.Linear's text; only a complex layer says more
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return text + (", complex=True" if self.complex else "")
