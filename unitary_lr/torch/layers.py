"""Unitary layers for PyTorch: ``unitary_parameter``, ``ModReLU`` and
``UnitaryRNN``."""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings

import numpy as np
import torch
from torch import nn

from .._validation import check_int, describe
from ..haar import check_batch_shape, random_unitary
from ._mark import _check_and_mark, _set_mark

__all__ = ["INITS", "ModReLU", "UnitaryRNN", "unitary_parameter"]

#: The initialisations of :func:`~unitary_lr.torch.unitary_parameter` (``init``): a Haar-random
#: unitary matrix, the identity, or Henaff et al.'s block-diagonal rotations.
INITS = ("haar", "identity", "henaff")
# the complex dtype of each real precision a layer takes
COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _on_generator(generator):
    """Where ``generator`` draws: a torch.Generator("cuda") draws on the GPU
    only (a draw for the CPU from it is an error)."""
    return "cpu" if generator is None else generator.device


def _check_size(name, value):
    """A size argument (features, hidden_size, ...): an integer >= 1, a NumPy
    integer too (``np.prod`` of a shape; torch.nn.Linear takes them); returns
    it as an int. A TypeError for anything that is not an integer (a bool, a
    float, a string), a ValueError for an integer below 1, as the adapters'
    sizes."""
    number = check_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def check_complex_flag(complex):
    """A layer's ``complex`` argument: True or False ("False" is truthy: it
    built a complex layer)."""
    if not isinstance(complex, bool):
        raise TypeError(f"complex must be True or False, got {complex!r}")


def real_cast_error(subject, dtype, *, complex_cast=True):
    """The TypeError of a complex parameter that a cast of its module made
    real: ``module.to(torch.float64)``, a real dtype, casts complex
    parameters to real and discards their imaginary part, with at most one
    warning per process, and the layer went on with a weight no longer
    unitary. ``subject`` names the layer and the parameter; ``complex_cast``
    also offers ``module.to(torch.complex128)`` (a layer whose every
    parameter may be complex)."""
    cast = ", or module.to(torch.complex128)" if complex_cast else ""
    return TypeError(f"{subject} has dtype {dtype}: a cast to a real dtype (module.to({dtype})) discarded its "
                     "imaginary part, and it is no longer unitary. Load the weights again and use module.double() "
                     f"(or .float()), which keep complex parameters complex{cast}")


def real_precision(dtype):
    """A layer's ``dtype`` argument, the real precision of its parameters:
    torch.float32 or torch.float64 (None: torch's default dtype); else a
    TypeError showing it."""
    real_dtype = torch.get_default_dtype() if dtype is None else dtype
    # (an unhashable dtype, a list, gave "unhashable type: 'list'")
    if not isinstance(real_dtype, torch.dtype) or real_dtype not in COMPLEX_OF:
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (the real precision), got {real_dtype}")
    return real_dtype


def check_generator(generator):
    """A ``generator`` argument: a torch.Generator or None (an int gave
    torch's error about ``randint``'s signature, or "'int' object has no
    attribute 'device'")."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}: "
                        f"{describe(generator)}")


def _seed(generator):
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator, device=_on_generator(generator)))


def _henaff(n, *, dtype, device, generator):
    """Block-diagonal 2 x 2 rotations with angles uniform in [-pi, pi] (Henaff,
    Szlam and LeCun, 2016); a trailing 1 for odd n."""
    drawn = torch.rand(n // 2, dtype=torch.float64, generator=generator, device=_on_generator(generator))
    angles = (drawn.cpu() * 2 - 1) * math.pi
    # built on the host whatever torch's default device (under a default
    # "meta" device the copy from it failed), then moved to ``device``
    W = torch.eye(n, dtype=torch.float64, device="cpu")
    index = torch.arange(0, 2 * (n // 2), 2, device="cpu")
    W[index, index] = torch.cos(angles)
    W[index + 1, index + 1] = torch.cos(angles)
    W[index, index + 1] = -torch.sin(angles)
    W[index + 1, index] = torch.sin(angles)
    return W.to(dtype=dtype, device=device)


def unitary_parameter(n_or_tensor, m=None, /, *, init=None, batch_shape=(), dtype=None, device=None,
                      generator=None, project=False):
    r"""A ``torch.nn.Parameter`` marked unitary, so that :class:`ProjUNN` puts it
    in a unitary group by itself.

    Parameters
    ----------
    n_or_tensor : int or torch.Tensor
        The number of rows n of a new (..., n, m) parameter (a Python or
        NumPy integer), or a tensor holding the initial value (matrices of
        any shape (..., n, m), unitary to within :func:`unitary_tolerance` of
        its dtype; copied). A NumPy array is refused: pass
        ``torch.from_numpy(array)``.
    m : int, optional
        The number of columns of a new parameter; n when omitted (square).
        For m < n the columns are orthonormal (``W^H W = I_m``), for m > n the
        rows (``W W^H = I_n``). Only with a size, not with a tensor.
    init : {"haar", "identity", "henaff"}, optional
        Initial value of a new parameter: Haar-random unitary (orthogonal if
        real; for m != n the first m columns, or n rows, of a Haar unitary),
        the identity (the first m columns, or n rows, of I), or Henaff's block
        rotations with random angles (square only: they are a recurrent
        matrix's init). "haar" when omitted. Only with a size, not with a
        tensor.
    batch_shape : tuple of int, optional
        Leading axes of a new parameter (independent matrices). Only with a
        size: a tensor brings its own.
    dtype : torch.dtype, optional
        float32/float64 (orthogonal) or complex64/complex128 (unitary);
        torch's default dtype when omitted. With a tensor: the dtype of the
        copy (the tensor's own when omitted), a real one only for a real
        tensor; the copy is checked (or projected) in it.
    device : optional
        Where the parameter lives; torch's default device when omitted
        (``torch.get_default_device()``: the CPU unless
        ``torch.set_default_device`` or a ``with torch.device(...)`` block
        says otherwise), as for the other parameters of a module. On the
        "meta" device the new parameter has a shape and a dtype but no
        values, and is marked all the same (a module built there gets its
        values from ``load_state_dict``). With a tensor: where the copy goes,
        after the check (the tensor's device when omitted).
    generator : torch.Generator, optional
        Source of the random initial values. Only with a size, not with a
        tensor.
    project : bool, optional
        Where a tensor is given: use its closest unitary matrix (its polar
        factor, :func:`unitary_lr.project_unitary`; orthonormal columns or
        rows for a rectangular one) instead of refusing a tensor that is not
        unitary.

    Returns
    -------
    UnitaryParameter
        A ``torch.nn.Parameter`` marked unitary (see :func:`mark_unitary`).

    Raises
    ------
    ValueError
        Unknown ``init``, ``"henaff"`` with m != n, n < 1, m < 1, a tensor
        that is not a matrix, one whose unitarity error is above the
        tolerance of its dtype (without ``project=True``; the message gives
        the error), or a tensor given together with m, ``init``, a
        ``batch_shape`` or a ``generator`` (they make a new parameter); a
        negative size in ``batch_shape``.
    TypeError
        ``n_or_tensor`` neither an integer nor a torch.Tensor, ``m`` not an
        integer (a bool, a float); a dtype other than the four supported
        ones, or a real one for a complex tensor (its imaginary part would be
        dropped); a ``batch_shape`` that is not a sequence of integers; a
        ``generator`` that is not a torch.Generator; ``project`` not True or
        False.

    Notes
    -----
    The mark survives ``deepcopy``, pickling, ``torch.save`` of a module,
    ``module.to(...)`` and ``load_state_dict(..., assign=True)`` (see
    :func:`mark_unitary`). ``ProjUNN(model.parameters())`` splits marked and
    other parameters into two groups by itself. A Haar draw costs one QR,
    O(n m min(n, m)); square draws take the same numbers whether m is given
    or not.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import unitary_parameter, is_unitary
    >>> W = unitary_parameter(4, init="henaff", dtype=torch.float64)
    >>> is_unitary(W), tuple(W.shape)
    (True, (4, 4))
    >>> V = unitary_parameter(5, 2, dtype=torch.float64)   # V^T V = I_2
    >>> tuple(V.shape), bool(torch.allclose(V.T @ V, torch.eye(2, dtype=torch.float64)))
    ((5, 2), True)
    """
    if not isinstance(project, bool):  # (ignored with a size, whatever it was)
        raise TypeError(f"project must be True or False, got {project!r}")
    check_generator(generator)
    if dtype is not None:
        _check_parameter_dtype(dtype)
    if isinstance(n_or_tensor, torch.Tensor):
        return _parameter_of_tensor(n_or_tensor, m, init=init, batch_shape=batch_shape, dtype=dtype, device=device,
                                    generator=generator, project=project)
    try:
        n = check_int("n_or_tensor", n_or_tensor)
    except TypeError:
        # (a NumPy array was "n must be an integer >= 1, got array(...)", a ValueError)
        got = (f"a NumPy array of shape {n_or_tensor.shape} and dtype {n_or_tensor.dtype}; pass "
               "torch.from_numpy(array)" if isinstance(n_or_tensor, np.ndarray)
               else f"{type(n_or_tensor).__name__}: {describe(n_or_tensor)}")
        raise TypeError(f"n_or_tensor must be an integer (the size n of a new parameter) or a torch.Tensor (its "
                        f"value), got {got}") from None
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n_or_tensor!r}")
    m = n if m is None else _check_size("m", m)
    init = "haar" if init is None else init
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if init == "henaff" and m != n:
        raise ValueError(f"init 'henaff' (block rotations of a recurrent matrix) needs a square matrix, got "
                         f"n={n}, m={m}; use 'haar' or 'identity' for a rectangular one")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    # checked once for every init (random_unitary checked "haar" only: "identity"
    # gave torch's error and "henaff" an empty batch for (-1,))
    batch_shape = check_batch_shape(batch_shape)
    # torch's default device, as every other parameter of a module (the CPU
    # here left a module built under ``with torch.device(...)`` split across
    # devices); random values are drawn on the host and sent there
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":  # no values to draw: the shape and dtype only
        value = torch.empty(*batch_shape, n, m, dtype=dtype, device=device)
    elif init == "haar":
        name = str(dtype).removeprefix("torch.")
        value = random_unitary(n, m, dtype=name, batch_shape=batch_shape, rng=_seed(generator), xp=torch,
                               device=device)
    elif init == "identity":
        # eye(n, m) has orthonormal columns (m <= n) or rows (m > n)
        value = torch.eye(n, m, dtype=dtype, device=device).expand(*batch_shape, n, m).clone()
    else:
        blocks = [_henaff(n, dtype=dtype, device=device, generator=generator) for _ in range(math.prod(batch_shape))]
        # (an empty batch stacks nothing: torch.stack refused it)
        value = (torch.stack(blocks) if blocks else torch.empty(0, n, n, dtype=dtype, device=device)).reshape(
            *batch_shape, n, n)
    # row-major, as every freshly made torch tensor (the QR behind a Haar
    # sample returns it column by column; a wide one is a transposed view)
    param = nn.Parameter(value.contiguous())
    _set_mark(param)  # unitary by construction: no O(n^3) check
    return param


def _check_parameter_dtype(dtype):
    """The ``dtype`` of :func:`unitary_parameter`: one of the four supported."""
    # a tuple's membership test compares, it does not hash (a list is refused here too)
    if dtype not in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        raise TypeError(f"dtype must be float32, float64, complex64 or complex128, got {dtype}")


def _parameter_of_tensor(tensor, m, *, init, batch_shape, dtype, device, generator, project):
    """:func:`unitary_parameter` of a tensor: a checked (or projected) copy in
    ``dtype`` (the tensor's when None), then moved to ``device`` (its own
    when None). The options of a new parameter are refused (they were
    ignored without a word)."""
    shape = tuple(tensor.shape)
    if m is not None:
        raise ValueError(f"m is the number of columns of a new parameter; with a tensor (shape "
                         f"{shape}) it must be omitted, got m={m!r}")
    if init is not None:
        raise ValueError(f"init is the initial value of a new parameter; with a tensor (shape {shape}), which is the "
                         f"initial value, it must be omitted, got init={init!r}")
    if not (isinstance(batch_shape, tuple) and batch_shape == ()):
        raise ValueError(f"batch_shape gives the leading axes of a new parameter; with a tensor (shape {shape}), "
                         f"which has its own, it must be omitted, got batch_shape={describe(batch_shape)}")
    if generator is not None:
        raise ValueError(f"generator draws the initial value of a new parameter; with a tensor (shape {shape}) "
                         f"nothing is drawn, and it must be omitted, got generator={describe(generator)}")
    if dtype is not None and tensor.is_complex() and not dtype.is_complex:
        raise TypeError(f"dtype {dtype} is real but n_or_tensor is complex ({tensor.dtype}): its imaginary part "
                        "would be dropped")
    target = None if device is None else torch.device(device)
    value = tensor.detach().to(dtype=tensor.dtype if dtype is None else dtype, copy=True)
    # an integer tensor cannot require gradients: checked as a tensor first,
    # where the Parameter raised PyTorch's error, naming nothing
    param = nn.Parameter(value, requires_grad=value.is_floating_point() or value.is_complex())
    _check_and_mark(param, project=project, what="n_or_tensor")
    if target is None or param.device == target:
        return param
    # checked where the tensor is (a copy on the meta device has no values to check)
    moved = nn.Parameter(param.detach().to(target), requires_grad=param.requires_grad)
    _set_mark(moved)
    return moved


class ModReLU(nn.Module):
    r"""``modReLU(z) = z / |z| * relu(|z| + b)`` (Arjovsky, Shah and Bengio, 2016),
    real or complex, with a learnable real bias b per feature; 0 at z = 0.

    Parameters
    ----------
    features : int
    dtype : torch.float32 or torch.float64, optional
        Of the bias (real, for real and complex inputs alike); torch's default
        dtype when omitted.
    device : optional
    generator : torch.Generator, optional
        Source of the initial bias, uniform in [-0.01, 0.01].

    Raises
    ------
    ValueError
        ``features`` below 1.
    TypeError
        ``features`` not an integer (a bool, a float); a ``dtype`` other than
        torch.float32 or torch.float64: the bias is real, also for complex
        inputs.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import ModReLU
    >>> act = ModReLU(2)
    >>> with torch.no_grad():
    ...     _ = act.bias.copy_(torch.tensor([-1.0, 0.5]))
    >>> act(torch.tensor([[3 + 4j, 0.1j]]))
    tensor([[2.4000+3.2000j, 0.0000+0.6000j]], grad_fn=<WhereBackward0>)
    """

    def __init__(self, features, *, dtype=None, device=None, generator=None):
        super().__init__()
        features = _check_size("features", features)
        check_generator(generator)
        real_dtype = real_precision(dtype)
        bias = torch.empty(features, dtype=real_dtype, device=device).uniform_(-0.01, 0.01, generator=generator)
        self.bias = nn.Parameter(bias)

    def forward(self, z):
        """Apply modReLU elementwise.

        Parameters
        ----------
        z : torch.Tensor, shape (..., features)
            Real or complex.

        Returns
        -------
        torch.Tensor
            Same shape and dtype as ``z`` (the bias taken in z's precision).
            NaN stays NaN.
        """
        magnitude = torch.abs(z)
        # != 0, not > 0: a NaN entry takes the first branch and stays NaN
        # (it was set to 0, and a recurrent layer went on from a zero state)
        nonzero = magnitude != 0
        # the inner where keeps z / |z| finite at z = 0, forward and backward
        phase = z / torch.where(nonzero, magnitude, torch.ones_like(magnitude))
        bias = self.bias.to(magnitude.dtype)  # (a float64 bias made a float32 z's result float64)
        return torch.where(nonzero, phase * torch.relu(magnitude + bias), torch.zeros_like(z))

    def extra_repr(self):
        return f"{self.bias.shape[0]}"


class UnitaryRNN(nn.Module):
    r"""Recurrent layers ``h_t = f(W h_{t-1} + V x_t + c)`` with a unitary
    (complex) or orthogonal (real) recurrent matrix W per layer: the shapes of
    ``torch.nn.RNN``.

    Parameters
    ----------
    input_size, hidden_size : int
    num_layers : int, optional
        Stacked layers: layer l > 0 takes the hidden states of layer l - 1 as
        its input sequence.
    complex : bool, optional
        Complex hidden state and unitary W (else real and orthogonal).
    nonlinearity : {"modrelu", "relu", "tanh"}, optional
        f; "relu" and "tanh" act on real and imaginary parts separately for a
        complex state. modReLU has its own bias, the others use c.
    init : {"henaff", "identity", "haar"}, optional
        Initial W of every layer (see :func:`unitary_parameter`).
    batch_first : bool, optional
        Input and output as (batch, time, features) instead of (time, batch,
        features); ``h0`` and ``h_n`` are (num_layers, batch, hidden_size)
        either way, as in ``torch.nn.RNN``.
    bias : bool, optional
        Whether f's argument has a learnable bias c (relu/tanh) or modReLU a
        learnable bias.
    dtype : torch.float32 or torch.float64, optional
        Real precision; a complex layer uses the matching complex dtype.
    device : optional
    generator : torch.Generator, optional
        Source of the random initial values.

    Raises
    ------
    ValueError
        Sizes below 1, an unknown nonlinearity or init; at ``forward``, an
        input or ``h0`` of the wrong shape.
    TypeError
        Sizes that are not integers (a bool, a float); a ``dtype`` other than
        torch.float32 or torch.float64; ``complex`` not True or False. At
        ``forward``, a complex layer whose recurrent matrix is real:
        ``module.to(torch.float64)`` (a real dtype) discards the imaginary
        part of complex parameters, ``module.double()`` keeps them complex.

    Notes
    -----
    ``forward(x, h0=None)`` takes (T, B, input_size) (or (B, T, ...) with
    ``batch_first``, or (T, input_size) unbatched) and returns
    ``(outputs, h_n)``: the last layer's hidden states (same layout) and every
    layer's last one, (num_layers, B, hidden_size) ((num_layers, hidden_size)
    unbatched). Per layer, the input projection ``V x_t + c`` of all steps is
    one matrix product; the loop then costs one fused ``addmm`` and the
    nonlinearity per step. The real and complex dtypes of the input are cast
    to the layer's dtype. On a GPU those are a few small kernels per time
    step: :meth:`compile_recurrence` compiles the loop, a chunk of time
    steps per graph (with CUDA graphs, one launch a chunk).

    Layer 0's parameters are ``weight_hh``, ``weight_ih``, ``bias`` (relu,
    tanh) or ``activation.bias`` (modReLU), the names of a single-layer
    ``UnitaryRNN``, whose checkpoints therefore load; layer l > 0 adds
    ``weight_hh_l{l}``, ``weight_ih_l{l}`` (hidden_size x hidden_size, of the
    state's dtype) and ``bias_l{l}`` or ``activation_l{l}.bias``. Every
    ``weight_hh*`` is marked unitary: give the module's parameters to
    :class:`ProjUNN` and they are trained with projUNN steps.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import UnitaryRNN
    >>> rnn = UnitaryRNN(3, 16, num_layers=2, complex=True, generator=torch.Generator().manual_seed(0))
    >>> out, h = rnn(torch.randn(20, 4, 3))
    >>> tuple(out.shape), tuple(h.shape), out.dtype
    ((20, 4, 16), (2, 4, 16), torch.complex64)
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, complex=False, nonlinearity="modrelu",
                 init="henaff", batch_first=False, bias=True, dtype=None, device=None, generator=None):
        super().__init__()
        input_size, hidden_size, num_layers = (_check_size(name, value) for name, value in (
            ("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)))
        check_complex_flag(complex)
        check_generator(generator)
        if nonlinearity not in ("modrelu", "relu", "tanh"):
            raise ValueError(f"nonlinearity must be 'modrelu', 'relu' or 'tanh', got {nonlinearity!r}")
        if init not in INITS:  # (unitary_parameter takes None for "haar"; here the default is "henaff")
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        real_dtype = real_precision(dtype)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.complex, self.nonlinearity, self.batch_first = complex, nonlinearity, batch_first
        # compile_recurrence's setting and its compiled loop
        self._recurrence_steps, self._recurrence_options, self._recurrence_loop = None, {}, None
        state_dtype = COMPLEX_OF[real_dtype] if complex else real_dtype
        options = {"dtype": real_dtype, "device": device, "generator": generator}
        # layer 0 first, in the order of a single-layer UnitaryRNN: the same
        # seed gives it the same initial values
        self.weight_hh = unitary_parameter(hidden_size, init=init, dtype=state_dtype, device=device, generator=generator)
        self.weight_ih = nn.Parameter(_input_weight(hidden_size, input_size, complex=complex, **options))
        if nonlinearity == "modrelu":
            self.activation = _modrelu(hidden_size, bias=bias, **options)
            self.bias = None
        else:
            function = torch.relu if nonlinearity == "relu" else torch.tanh
            self.activation = _split_complex(function) if complex else function
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=state_dtype, device=device)) if bias else None
        for layer in range(1, num_layers):
            W = unitary_parameter(hidden_size, init=init, dtype=state_dtype, device=device, generator=generator)
            self.register_parameter(f"weight_hh_l{layer}", W)
            # the input of layer l > 0 is a hidden state: of the state's dtype
            V = _input_weight(hidden_size, hidden_size, complex=complex, **options)
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(V))
            if nonlinearity == "modrelu":
                self.add_module(f"activation_l{layer}", _modrelu(hidden_size, bias=bias, **options))
            else:
                c = nn.Parameter(torch.zeros(hidden_size, dtype=state_dtype, device=device)) if bias else None
                self.register_parameter(f"bias_l{layer}", c)

    def _layer(self, layer):
        """(weight_hh, weight_ih, bias, activation) of one layer."""
        if layer == 0:
            return self.weight_hh, self.weight_ih, self.bias, self.activation
        activation = getattr(self, f"activation_l{layer}") if self.nonlinearity == "modrelu" else self.activation
        bias = None if self.nonlinearity == "modrelu" else getattr(self, f"bias_l{layer}")
        return getattr(self, f"weight_hh_l{layer}"), getattr(self, f"weight_ih_l{layer}"), bias, activation

    def forward(self, input, h0=None):
        """Run the recurrence over a whole sequence, layer after layer.

        Parameters
        ----------
        input : torch.Tensor
            Shape (T, B, input_size), (B, T, input_size) with
            ``batch_first``, or (T, input_size) unbatched. Real or complex; it
            is cast to the layer's dtype.
        h0 : torch.Tensor, optional
            Initial hidden state of every layer, shape (num_layers, B,
            hidden_size) ((num_layers, hidden_size) unbatched), as
            ``torch.nn.RNN`` takes it; zeros when omitted. With one layer, the
            former shape (B, hidden_size) ((hidden_size,) unbatched) is still
            accepted, with a FutureWarning.

        Returns
        -------
        outputs : torch.Tensor
            The last layer's hidden states h_1 ... h_T, in the layout of
            ``input`` with hidden_size features.
        h_n : torch.Tensor
            Every layer's last hidden state, shape (num_layers, B,
            hidden_size) ((num_layers, hidden_size) unbatched).

        Raises
        ------
        ValueError
            ``input`` or ``h0`` of the wrong shape, or an ``input`` of no
            time steps (as ``torch.nn.RNN``).
        TypeError
            A complex layer whose recurrent matrix a cast of the module made
            real (see the class).

        Notes
        -----
        Per layer, the input projection of all T steps is one matrix product;
        the loop then costs one ``addmm`` (O(B hidden_size^2)) and the
        nonlinearity per step.

        Examples
        --------
        >>> import torch
        >>> from unitary_lr.torch import UnitaryRNN
        >>> rnn = UnitaryRNN(3, 8, batch_first=True, generator=torch.Generator().manual_seed(0))
        >>> outputs, h = rnn(torch.randn(5, 20, 3))
        >>> tuple(outputs.shape), tuple(h.shape)
        ((5, 20, 8), (1, 5, 8))
        """
        unbatched = input.dim() == 2
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(f"input must be (T, B, {self.input_size}), (B, T, {self.input_size}) with "
                             f"batch_first, or (T, {self.input_size}); got shape {tuple(input.shape)}")
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[0] == 0:  # as torch.nn.RNN, which refuses a sequence of no time steps too
            raise ValueError(f"input must have at least one time step, got shape {tuple(input.shape)}"
                             f"{' (batch_first: (B, T, features))' if self.batch_first and not unbatched else ''}")
        batch = x.shape[1]
        h0 = self._initial_state(h0, batch, unbatched, x.device)
        last = []
        for layer in range(self.num_layers):
            weight_hh, weight_ih, bias, activation = self._layer(layer)
            if self.complex and not weight_hh.is_complex():
                name = "weight_hh" if layer == 0 else f"weight_hh_l{layer}"
                raise real_cast_error(f"UnitaryRNN: the layer is complex, but {name}", weight_hh.dtype)
            projected = x.to(weight_ih.dtype) @ weight_ih.T  # every step's input projection in one product
            if bias is not None:
                projected = projected + bias
            x, h = self._recurrence(projected, h0[layer], weight_hh, activation)
            last.append(h)
        h_n = torch.stack(last)
        if unbatched:
            return x.squeeze(1), h_n.squeeze(1)
        return (x.transpose(0, 1) if self.batch_first else x), h_n

    def compile_recurrence(self, steps=32, **options):
        """Compile the time loop with ``torch.compile``, ``steps`` time steps
        per compiled graph, so that the compile time does not grow with the
        sequence length; ``steps=None`` runs the loop eagerly again.

        ``torch.compile`` of a whole forward unrolls all T time steps into
        one graph, and its compile time grows with T: on one CPU thread the
        copy task's first step took 53 s at 120 time steps and 70 s at 220,
        and at 1,020 Inductor failed (``RecursionError``). Here each layer's
        loop runs in chunks through one compiled function, forward and
        backward: chunks of a length that divides T, of ``steps / 2`` to
        ``steps`` time steps, where T has such a divisor (one graph), else
        of ``steps`` and a shorter last one (two graphs); the copy task's
        first step took 18 s at 120 time steps and 20 s at 1,020. On a GPU,
        with ``mode="reduce-overhead"``, each chunk replays as one CUDA
        graph where the eager loop launches a few kernels per time step.
        The outputs and gradients are the eager loop's, up to the
        compiler's order of sums. Under an outer ``torch.compile`` of the
        whole model the loop is traced as before, unrolled.

        Parameters
        ----------
        steps : int or None, optional
            The most time steps per compiled call, >= 1 (default 32); None:
            the eager loop.
        **options
            Passed to ``torch.compile`` (``mode``, ``backend``, ...), over
            the defaults ``dynamic=False`` (every chunk of a training run
            has the same shapes, which CUDA graphs need) and
            ``fullgraph=True`` (the loop has no graph break: a break would
            be an error, not a silent slowdown).

        Returns
        -------
        UnitaryRNN
            The layer itself, for chaining.

        Raises
        ------
        ValueError
            ``steps`` below 1.
        TypeError
            ``steps`` neither an integer nor None (a bool, a float).

        Examples
        --------
        >>> import torch
        >>> from unitary_lr.torch import UnitaryRNN
        >>> rnn = UnitaryRNN(3, 16, generator=torch.Generator().manual_seed(0))
        >>> rnn = rnn.compile_recurrence(steps=25, mode="reduce-overhead")  # doctest: +SKIP
        """
        if steps is not None:
            try:
                number = check_int("steps", steps)
            except TypeError:
                raise TypeError(f"steps must be an integer >= 1 or None, got {type(steps).__name__}: "
                                f"{steps!r}") from None
            if number < 1:
                raise ValueError(f"steps must be an integer >= 1 or None, got {steps!r}")
            steps = number
        if steps is None:
            self._recurrence_steps, self._recurrence_options, self._recurrence_loop = None, {}, None
            return self
        options = {"dynamic": False, "fullgraph": True, **options}
        compiled = _compiled_loop(options)  # torch's own errors for bad options, now
        self._recurrence_steps, self._recurrence_options, self._recurrence_loop = steps, options, compiled
        return self

    def _recurrence(self, projected, h, weight_hh, activation):
        """(states, last state) of one layer's loop over ``projected`` (T, B,
        hidden): eager, or chunks of ``compile_recurrence``'s steps through
        its compiled loop."""
        steps = self.__dict__.get("_recurrence_steps")  # (None in modules pickled before it existed)
        if steps is None or torch.compiler.is_compiling():
            return _run_steps(projected, h, weight_hh, activation)
        run = self._recurrence_loop
        if run is None:  # a deep copy or an unpickled module: its own compiled loop
            run = self._recurrence_loop = _compiled_loop(self._recurrence_options)
        carries_grad = _carries_grad(projected, weight_hh, activation)
        if not h.requires_grad and carries_grad:
            # the later chunks' states carry autograd history, and a compiled
            # graph is made for one setting of its inputs' requires_grad: the
            # first chunk's state as theirs, so that one graph serves every
            # full chunk (a zero h0 alone took a second compile of the chunk)
            h = h.detach().requires_grad_()
        # Without a backward to come, CUDA graphs (mode="reduce-overhead")
        # start a new iteration at every call and may overwrite the last
        # call's outputs: a chunk's states are copied before the next chunk
        # runs (torch's advice for outputs kept across calls). Not yet run on
        # a GPU.
        copies = not carries_grad and projected.is_cuda
        chunks = []
        for chunk in projected.split(_chunk_length(projected.shape[0], steps)):
            states, h = run(chunk, h, weight_hh, activation)
            if copies:
                states, h = states.clone(), h.clone()
            chunks.append(states)
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)), h

    def __getstate__(self):
        # pickles and copies carry compile_recurrence's setting, not its
        # compiled loop (a function of torch.compile's, which does not
        # pickle): they compile their own at their first forward.
        # torch.nn.DataParallel's replicas, made at every forward from the
        # module's __dict__, share it (a loop of their own would compile at
        # every step).
        state = super().__getstate__()
        if state.get("_recurrence_loop") is not None:
            state = {**state, "_recurrence_loop": None}
        return state

    def _initial_state(self, h0, batch, unbatched, device):
        """h0 as (num_layers, B, hidden_size), zeros when None."""
        layers, hidden, dtype = self.num_layers, self.hidden_size, self.weight_hh.dtype
        if h0 is None:
            return torch.zeros(layers, batch, hidden, dtype=dtype, device=device)
        expected = (layers, hidden) if unbatched else (layers, batch, hidden)
        former = (hidden,) if unbatched else (batch, hidden)
        shape = tuple(h0.shape)
        if layers == 1 and shape == former:
            warnings.warn(f"UnitaryRNN: h0 of shape {former} is deprecated; pass it as torch.nn.RNN takes it, "
                          f"shape {expected} (h0.unsqueeze(0)); h_n has that shape already", FutureWarning,
                          stacklevel=3)
            h0 = h0.unsqueeze(0)
        elif shape != expected:
            layout = "(num_layers, hidden_size) for an unbatched input" if unbatched else "(num_layers, B, hidden_size)"
            raise ValueError(f"h0 must have shape {expected}, {layout}; got {shape}")
        return (h0.unsqueeze(1) if unbatched else h0).to(dtype)

    def extra_repr(self):
        # what print(model) shows: the sizes and the choices that change the maths
        kind = "complex, unitary" if self.complex else "real, orthogonal"
        layers = f", num_layers={self.num_layers}" if self.num_layers > 1 else ""
        return (f"{self.input_size}, {self.hidden_size}{layers}, {kind}, nonlinearity={self.nonlinearity!r}, "
                f"batch_first={self.batch_first}")


def _input_weight(rows, columns, *, complex, dtype, device, generator):
    """V, uniform in [-1/sqrt(columns), 1/sqrt(columns)] as torch.nn.RNN's; a
    complex V has real and imaginary parts of that law, divided by sqrt(2)."""
    bound = 1 / math.sqrt(columns)
    V = torch.empty(rows, columns, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
    if complex:
        imaginary = torch.empty_like(V).uniform_(-bound, bound, generator=generator)
        V = torch.complex(V, imaginary) / math.sqrt(2)
    return V


def _run_steps(projected, h, weight_hh, activation):
    """The recurrence ``h_t = f(u_t + W h_{t-1})`` over the steps of
    ``projected`` (T, B, hidden), the states as rows (``h W^T``): (all
    states stacked, the last one)."""
    recurrent = weight_hh.T
    outputs = []
    # unbind, not projected[t]: the backward of T separate indexings would
    # allocate T gradients of the whole sequence, O(T^2); unbind's is one stack.
    for u in projected.unbind(0):
        h = activation(torch.addmm(u, h, recurrent))
        outputs.append(h)
    return torch.stack(outputs), h


def _chunk_length(length, steps):
    """Time steps per compiled call for a sequence of ``length`` steps, at
    most ``steps``: a divisor of ``length`` of at least ``steps / 2`` where
    there is one (every chunk the same: one graph to compile, not two), else
    ``steps`` (and a shorter last chunk)."""
    if length <= steps:
        return length
    for chunk in range(steps, (steps + 1) // 2 - 1, -1):
        if length % chunk == 0:
            return chunk
    return steps


def _carries_grad(projected, weight_hh, activation):
    """Whether a layer's states will carry autograd history: grad mode on
    and its inputs' projection, its recurrent matrix or its activation's
    parameters requiring grad."""
    if not torch.is_grad_enabled():
        return False
    parameters = activation.parameters() if isinstance(activation, nn.Module) else ()
    return projected.requires_grad or weight_hh.requires_grad or any(p.requires_grad for p in parameters)


@contextlib.contextmanager
def _eager_stance():
    """A block in which compiled functions, a compiled recurrence's loop
    among them, run eagerly (``torch.compiler.set_stance("force_eager")``,
    torch >= 2.6; with an older torch, nothing changes), the stance before
    it restored after it. The stance is global to the process and
    ``set_stance(...)`` sets it when called, before a ``with`` statement in
    the caller has armed its exit: here it is set as this context is
    entered, so that an interrupt at any line of the caller (the CLI's
    evaluations, whose tests interrupt each of its lines) leaves none
    behind."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def _compiled_loop(options):
    """``torch.compile(loop, **options)`` of :func:`_run_steps` with a code
    object of its own. torch.compile keeps the graphs it compiles per code
    object, up to a limit (8 by default,
    ``torch._dynamo.config.recompile_limit``): each layer's compiled loop
    keeps its own (chunk lengths, batch sizes, grad mode), so that layers
    and models in one process do not exhaust one another's."""
    loop = types.FunctionType(_run_steps.__code__.replace(), _run_steps.__globals__, _run_steps.__name__)
    return torch.compile(loop, **options)


def _modrelu(features, *, bias, dtype, device, generator):
    activation = ModReLU(features, dtype=dtype, device=device, generator=generator)
    if not bias:
        activation.bias.requires_grad_(False).zero_()
    return activation


def _split_complex(function):
    """A real activation applied to the real and imaginary parts separately; a
    partial of a module-level function, so that the layer pickles."""
    return functools.partial(_apply_to_parts, function)


def _apply_to_parts(function, z):
    return torch.complex(function(z.real), function(z.imag))
