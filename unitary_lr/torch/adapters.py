"""Adapters of frozen linear layers: Householder transformation adaptation
(:class:`HouseholderAdapter`), an SVD adapter with exactly orthonormal factors
(:class:`SVDAdapter`), and PEFT-style helpers to add, count, save and load
adapters."""

from __future__ import annotations

import functools
import re

import numpy as np
import torch
from array_api_compat import array_namespace
from torch import nn

from .._validation import check_int
from ..diagnostics import unitarity_error
from ..haar import random_unitary
from ..householder import apply_unchecked, householder_apply
from ..polar import project_unitary
from ._mark import is_unitary, mark_unitary, unitary_tolerance
from ._wy import wy_factors
from .layers import check_generator

__all__ = [
    "HouseholderAdapter",
    "SVDAdapter",
    "adapter_state_dict",
    "add_householder_adapters",
    "add_svd_adapters",
    "load_adapter_state_dict",
    "trainable_parameters",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
# the dtype a Householder adapter's forward pass computes half precision in
_SINGLE_OF_HALF = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


def _check_size(name, value, linear):
    """``reflectors`` of a HouseholderAdapter, ``rank`` of an SVDAdapter: an
    integer (a NumPy integer too, not a bool) in [1, min(n_out, n_in)];
    returns it as an int."""
    limit = min(linear.out_features, linear.in_features)
    number = check_int(name, value)
    if not 1 <= number <= limit:
        raise ValueError(
            f"{name} must be between 1 and {limit} = min(out_features, in_features) of {linear}, "
            f"got {value!r}"
        )
    return number


def _check_linear(linear):
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}: {linear!r}"[:200])
    if linear.weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"linear's weight has dtype {linear.weight.dtype}; expected float32, float64, "
                        "complex64 or complex128")


def _conj(x):
    # A physical conjugate: a lazy conj() would leave the parameter's .grad a
    # conjugate view, which optimizers such as Adam (view_as_real) reject.
    return x.conj_physical() if x.is_complex() else x


def _unit_columns(rows, columns, *, dtype, device, generator):
    """Gaussian columns scaled to unit length (circular complex for complex dtypes)."""
    if dtype.is_complex:
        real = torch.randn(2, rows, columns, dtype=torch.float64, generator=generator)
        x = torch.complex(real[0], real[1])
    else:
        x = torch.randn(rows, columns, dtype=torch.float64, generator=generator)
    x = x / torch.linalg.vector_norm(x, dim=0, keepdim=True)
    return x.to(dtype=dtype, device=device)


# The update's two computations, shared by HouseholderAdapter and the PEFT
# tuner layer of unitary_lr.peft (whose parameters live in per-adapter dicts).
def householder_delta(x, reflectors_out, reflectors_in, sigma, *, names=("reflectors_out", "reflectors_in", "sigma"),
                      adapter=None):
    """``x Delta W^T`` for x of shape (..., n_in), with Delta W as in
    HouseholderAdapter, in O(B (n_out + n_in) j) and without forming Delta W.

    Half precision (float16, bfloat16: a model's ``.half()`` or
    ``.to(torch.bfloat16)`` after the adapter was made) is computed in single
    precision, which the WY factors need, and rounded back to the operands'
    promoted dtype. Any other dtype raises a TypeError that names the
    parameter: ``names``, indexed by ``adapter`` where that is given (the
    per-adapter dicts of the PEFT layer)."""
    if (x.dtype not in _FLOAT_DTYPES or sigma.dtype not in _FLOAT_DTYPES or reflectors_out.dtype not in _FLOAT_DTYPES
            or reflectors_in.dtype not in _FLOAT_DTYPES):  # (no generator: the check runs on every forward pass)
        operands = (x, reflectors_out, reflectors_in, sigma)
        names = (*(name if adapter is None else f"{name}[{adapter!r}]" for name in names), "x")
        for name, operand in zip(names, (*operands[1:], x)):  # the parameters first: the PEFT layer casts x
            if operand.dtype not in _FLOAT_DTYPES and operand.dtype not in _SINGLE_OF_HALF:
                raise TypeError(f"{name} has dtype {operand.dtype}; expected one of float32, float64, complex64, "
                                "complex128 (float16 and bfloat16 are computed in float32)")
        dtype = functools.reduce(torch.promote_types, (operand.dtype for operand in operands))
        single = (operand.to(_SINGLE_OF_HALF.get(operand.dtype, operand.dtype)) for operand in operands)
        return householder_delta(*single).to(dtype)
    n_out, n_in, p = reflectors_out.shape[0], reflectors_in.shape[0], sigma.shape[0]
    rows = x.reshape(-1, n_in)
    # Rows times Delta W^T = conj(H_V)[:, :p] diag(sigma) H_U[:, :p]^T: conj(H(v)) =
    # H(conj v), and H_U^T is the product of the conj(u_i) in reverse order.
    rotated = _reflect_rows(rows, _conj(reflectors_in))
    scaled = (rotated if p == n_in else rotated[:, :p]) * sigma  # a full slice would cost a pass backward
    if n_out > p:
        scaled = torch.cat([scaled, scaled.new_zeros(scaled.shape[0], n_out - p)], dim=1)
    out = _reflect_rows(scaled, _conj(reflectors_out.flip(-1)))
    return out.reshape(*x.shape[:-1], n_out)


def _reflect_rows(X, V):
    """``X @ P`` for the product P of the reflectors in V's columns: the
    kernel of ``householder_apply(V, X, side="right")`` (its inputs checked
    when the adapter was built) with the WY factors' hand-written gradient."""
    dtype = torch.promote_types(X.dtype, V.dtype)
    return apply_unchecked(array_namespace(X), V.to(dtype), X.to(dtype), "right", factors=wy_factors)


@torch.no_grad()
def householder_delta_weight(reflectors_out, reflectors_in, sigma, in_features):
    """Delta W (n_out x n_in) as a dense matrix, in 64-bit precision (float64 or
    complex128), in O(j n_out n_in)."""
    wide = torch.promote_types(sigma.dtype, torch.float64)
    n_out, p = reflectors_out.shape[0], sigma.shape[0]
    columns = torch.eye(in_features, p, dtype=wide, device=sigma.device)  # E_in
    columns = householder_apply(reflectors_in.to(wide), columns, check_finite=False)  # H_V E_in
    rows = sigma.to(wide)[:, None] * columns.mH
    padded = torch.cat([rows, rows.new_zeros(n_out - p, in_features)])  # E_out diag(sigma) E_in^T H_V^H
    return householder_apply(reflectors_out.to(wide), padded, check_finite=False)


def _shares_memory(a, b):
    """Whether writing into the tensor ``a`` in place changes ``b``: the same
    tensor, or overlapping bytes on one device (``nn.Parameter(w.detach())``
    ties as ``l2.weight = l1.weight`` does). Pointers only, no pass over the
    entries."""
    if a is b:
        return True
    if a.device != b.device or a.device.type == "meta" or not a.numel() or not b.numel():
        return False
    try:
        spans = [(t.data_ptr(), t.data_ptr() + t.element_size() * (1 + sum((n - 1) * step for n, step
                                                                         in zip(t.shape, t.stride()))))
                 for t in (a, b)]
    except (RuntimeError, NotImplementedError):  # a tensor without storage: only the same tensor is the same
        return False
    (a_start, a_end), (b_start, b_end) = spans
    return a_start < b_end and b_start < a_end


def _memory_key(tensor):
    """Equal for tensors that may share memory (one storage), for grouping them."""
    try:
        return tensor.device, tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(tensor)


def _find_tied(model, wrappers, *, memory=True):
    """``{id(wrapper): [(module, attribute, qualified name), ...]}``: for each
    ``(wrapper, layer)`` of ``wrappers`` (an adapter and the ``nn.Linear`` it
    wraps), the other places of ``model`` that hold the layer's weight: every
    name of every module (``named_modules(remove_duplicate=False)``) with a
    parameter or a buffer that is the weight or, with ``memory``, shares its
    memory, other than the layer's own places inside the wrapper (the layer as
    the wrapper's ``base``, at each name of the wrapper). The layer itself at a
    name outside the wrapper (one ``nn.Linear`` used at two places of the
    model, adapted at one) is such another place. One pass over the model's
    parameters and buffers, by ids and pointers."""
    key = _memory_key if memory else id
    groups, paths = {}, {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(prefix)
        for table in (module._parameters, module._buffers):
            for attribute, tensor in table.items():
                if tensor is not None:
                    name = f"{prefix}.{attribute}" if prefix else attribute
                    groups.setdefault(key(tensor), []).append((module, attribute, name))
    found = {}
    for wrapper, layer in wrappers:
        inside = tuple(f"{path}." if path else "" for path in paths.get(id(wrapper), ()))
        found[id(wrapper)] = [
            (module, attribute, name) for module, attribute, name in groups.get(key(layer.weight), ())
            if not (module is layer and name.startswith(inside))  # (an empty tuple: no name starts with it)
            and _still_tied(((module, attribute, name),), layer.weight, memory=memory)]
    return found


def _used_elsewhere(places, layer, *, memory=True):
    """The names of ``places`` (a wrapper's ties, as :func:`_find_tied` gives
    them) where ``layer`` itself, the wrapped ``nn.Linear``, is used with its
    weight still: one layer at two places of the model, where a new weight
    of the layer would be the other place's too."""
    return _still_tied([place for place in places if place[0] is layer], layer.weight, memory=memory)


def _held(module, attribute):
    """The parameter or buffer ``attribute`` of ``module`` (None if neither),
    and whether it is a buffer."""
    parameter = module._parameters.get(attribute)
    if parameter is not None:
        return parameter, False
    return module._buffers.get(attribute), True


def _still_tied(places, weight, *, memory=True):
    """The names of ``places`` (as :func:`_find_tied` gives them) that hold
    ``weight`` still (or, with ``memory``, a tensor sharing its memory), for
    messages: each name quoted, a buffer's followed by ``(a buffer)``. The
    weights may have been untied since."""
    names = []
    for module, attribute, name in places:
        tensor, buffer = _held(module, attribute)
        if tensor is not None and (tensor is weight or memory and _shares_memory(tensor, weight)):
            names.append(f"{name!r} (a buffer)" if buffer else repr(name))
    return names


class _LinearAdapter(nn.Module):
    """What the adapters share: the frozen ``nn.Linear`` kept as ``base``, the
    forward pass ``base(x) + delta(x)``, and merging ``delta_weight()`` into the
    frozen weight. Each adapter defines ``delta`` and ``delta_weight``.

    ``_tied`` holds the other places of the model that held the base weight
    when :func:`_add_adapters` made or met the adapter, as :func:`_find_tied`
    gives them (none for an adapter made directly): ``merge`` refuses while
    one of them still does."""

    _tied = ()

    def __init__(self, linear):
        super().__init__()
        for parameter in linear.parameters():
            parameter.requires_grad_(False)
        self.base = linear
        self._merged = False

    @property
    def merged(self):
        """Whether Delta W is folded into ``base.weight``."""
        return self._merged

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        """The frozen layer's output plus ``x @ Delta_W.T``, as ``nn.Linear`` applies a weight (nothing is added once merged).

        Parameters
        ----------
        x : torch.Tensor, shape (..., in_features)

        Returns
        -------
        torch.Tensor, shape (..., out_features)
        """
        out = self.base(x)
        return out if self._merged else out + self.delta(x)

    @torch.no_grad()
    def merge(self):
        """Fold Delta W into ``base.weight`` (for inference); returns self.

        Raises ValueError, changing nothing, when the adapter is already
        merged, or when its layer's weight is tied to other places of the
        model (the same Parameter, as ``l2.weight = l1.weight`` or tied input
        and output embeddings make it, a parameter or buffer sharing its
        memory, or the layer itself used at another place of the model and
        adapted at this one only) that :func:`add_householder_adapters` or
        :func:`add_svd_adapters` found when they made the adapter: merging
        would add Delta W to those places too and change their outputs. The
        unmerged adapter computes the right outputs (and trains right); keep
        it unmerged, or untie the weight first (``base = adapter.base;
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)``;
        for a layer used at another place, ``adapter.base = copy.deepcopy(adapter.base)``).
        An adapter made directly (``HouseholderAdapter(linear)``) knows of no
        model and does not check.
        """
        if self._merged:
            raise ValueError("the adapter is already merged (merged=True); unmerge() it first")
        weight = self.base.weight
        tied = _still_tied(self._tied, weight)
        if tied:
            # the layer itself used at another place too: a new weight of it would be that place's too
            shared = _used_elsewhere(self._tied, self.base)
            untie = ("give the adapter its own copy of the layer first (the layer itself is used at "
                     f"{', '.join(shared)} too: adapter.base = copy.deepcopy(adapter.base))" if shared else
                     "untie the weight first (base = adapter.base; base.weight = "
                     "nn.Parameter(base.weight.detach().clone(), requires_grad=False))")
            raise ValueError(
                f"cannot merge: the weight of this adapter's layer ({self.base}) is tied to "
                f"{', '.join(tied)} of the model (the same Parameter, or a parameter or buffer sharing its memory), "
                "and merging would add Delta W there too, changing the outputs of the layers that use it. Nothing "
                f"was merged. The unmerged adapter's outputs are right: keep it unmerged, or {untie} and then merge"
            )
        weight.add_(self.delta_weight().to(weight.dtype))
        self._merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """Take Delta W out of ``base.weight`` again (to the weight's rounding);
        returns self.

        Raises ValueError, changing nothing, when the adapter is not merged.
        """
        if not self._merged:
            raise ValueError("the adapter is not merged (merged=False); there is nothing to unmerge")
        weight = self.base.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self._merged = False
        return self


class HouseholderAdapter(_LinearAdapter):
    r"""A frozen ``nn.Linear`` plus a trainable Householder update
    ``Delta W = H_U[:, :p] diag(sigma) H_V[:, :p]^H`` (HTA).

    Parameters
    ----------
    linear : torch.nn.Linear
        The layer to adapt, of any shape, real or complex. Its parameters are
        frozen (``requires_grad=False``) and kept as ``self.base``.
    reflectors : int, optional
        Number j of Householder vectors on each side, ``1 <= j <= min(n_out,
        n_in)``.
    generator : torch.Generator, optional
        Source of the random initial reflector vectors.

    Attributes
    ----------
    base : torch.nn.Linear
        The frozen layer.
    reflectors_out : torch.nn.Parameter, shape (n_out, j)
        The vectors ``u_1 ... u_j`` of ``H_U = H(u_1) ... H(u_j)`` (n_out x n_out).
    reflectors_in : torch.nn.Parameter, shape (n_in, j)
        The vectors ``v_1 ... v_j`` of ``H_V = H(v_1) ... H(v_j)`` (n_in x n_in).
    sigma : torch.nn.Parameter, shape (p,), p = min(n_out, n_in)
        The diagonal, zero at start; of the weight's dtype (complex for a
        complex layer).

    Raises
    ------
    TypeError
        ``linear`` is not an ``nn.Linear`` (or has an unsupported dtype);
        ``reflectors`` is not an integer; ``generator`` is not a
        torch.Generator or None. ``linear`` is unchanged then.
    ValueError
        ``reflectors`` outside ``[1, min(n_out, n_in)]``.

    Notes
    -----
    The adapted layer computes ``y = x W0^T + b + x Delta W^T`` with

    ``Delta W = H_U[:, :p] diag(sigma) H_V[:, :p]^H = H_U E_out diag(sigma) E_in^T H_V^H``

    (n_out x n_in), where ``H(w) = I - 2 w w^H / (w^H w)``, ``E_out`` and ``E_in``
    hold the first p unit vectors of their sizes, and ``^H`` is the conjugate
    transpose (``H_V^H = H(v_j) ... H(v_1)``; for j = 1 it is ``H_V`` itself). So
    Delta W has the form of an SVD: orthonormal columns of ``H_U`` and ``H_V``
    around the diagonal sigma, and its rank is the number of nonzero entries
    of sigma; each layer picks its own rank with ``(n_out + n_in) j + p``
    parameters. With sigma = 0 at
    start the layer computes exactly what ``linear`` does; the random
    reflectors make the gradient of sigma nonzero from the first step.

    The forward pass applies ``H_V``, sigma and ``H_U`` to the batch with
    :func:`unitary_lr.householder_apply` (compact WY form): O(B (n_out + n_in) j)
    for a batch of B rows, plus O((n_out + n_in) j^2) for the WY factors, and
    never an n_out x n_in matrix. After a ``.half()`` or ``.to(torch.bfloat16)``
    of the adapter it computes the update in float32 and rounds it to the
    half-precision dtype (the gradients, too, reach the parameters in their
    dtype). :meth:`merge` folds Delta W into the frozen
    weight for inference (the forward is then the plain layer, and no gradient
    reaches the adapter); :meth:`unmerge` takes it out again. The merged state
    is not part of ``state_dict()``: save unmerged models, or the adapters
    alone with :func:`adapter_state_dict`.

    An adapter made directly, as here, knows only ``linear``, not the model
    around it: if ``linear``'s weight is tied to another layer's (the same
    Parameter), :meth:`merge` changes that layer too, without a word. The
    adapters made by :func:`add_householder_adapters` know the model's ties,
    and their :meth:`merge` refuses a tied weight.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import HouseholderAdapter
    >>> layer = torch.nn.Linear(6, 4)
    >>> adapted = HouseholderAdapter(layer, reflectors=2, generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(3, 6)
    >>> bool(torch.equal(adapted(x), layer(x)))      # sigma = 0: the layer as it was
    True
    >>> [name for name, p in adapted.named_parameters() if p.requires_grad]
    ['reflectors_out', 'reflectors_in', 'sigma']
    """

    # Named in the class's own body because the documentation lists a class's
    # own members only (the torch classes would otherwise list all of nn.Module's).
    merged, in_features, out_features = _LinearAdapter.merged, _LinearAdapter.in_features, _LinearAdapter.out_features
    forward, merge, unmerge = _LinearAdapter.forward, _LinearAdapter.merge, _LinearAdapter.unmerge

    def __init__(self, linear, *, reflectors=1, generator=None):
        _check_linear(linear)
        reflectors = _check_size("reflectors", reflectors, linear)
        check_generator(generator)
        weight = linear.weight
        options = {"dtype": weight.dtype, "device": weight.device, "generator": generator}
        # drawn before super().__init__ freezes the layer: an error leaves it as it was
        reflectors_out = _unit_columns(linear.out_features, reflectors, **options)
        reflectors_in = _unit_columns(linear.in_features, reflectors, **options)
        super().__init__(linear)
        self.reflectors_out = nn.Parameter(reflectors_out)
        self.reflectors_in = nn.Parameter(reflectors_in)
        p = min(linear.out_features, linear.in_features)
        self.sigma = nn.Parameter(torch.zeros(p, dtype=weight.dtype, device=weight.device))

    def extra_repr(self):
        return f"reflectors={self.reflectors_out.shape[-1]}, merged={self._merged}"

    def delta(self, x):
        """``x Delta W^T`` for x of shape (..., n_in), without forming Delta W."""
        return householder_delta(x, self.reflectors_out, self.reflectors_in, self.sigma)

    @torch.no_grad()
    def delta_weight(self):
        """Delta W (n_out x n_in) as a dense matrix, computed in 64-bit precision
        in O(j n_out n_in); for merging and inspection, not for training."""
        return householder_delta_weight(self.reflectors_out, self.reflectors_in, self.sigma, self.in_features)



def _haar_columns(sizes, columns, *, dtype, device, generator):
    """For each n of ``sizes`` an n x ``columns`` matrix with orthonormal columns,
    Haar distributed on the Stiefel manifold.

    One seed is taken from ``generator`` (the global torch RNG when None, as
    for nn.Linear's weights); the draws are made in 64-bit precision and
    rounded to ``dtype``, so layers of different precisions get the same
    factors to rounding.
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
    wide = torch.complex128 if dtype.is_complex else torch.float64
    return [random_unitary(n, columns, dtype=wide, rng=rng, xp=torch, device="cpu").to(dtype=dtype, device=device)
            for n in sizes]


class SVDAdapter(_LinearAdapter):
    r"""A frozen ``nn.Linear`` plus a trainable update ``Delta W = U diag(s) V^H``
    whose factors U and V have exactly orthonormal columns.

    Parameters
    ----------
    linear : torch.nn.Linear
        The layer to adapt, of any shape, real or complex. Its parameters are
        frozen (``requires_grad=False``) and kept as ``self.base``.
    rank : int
        Number r of columns of U and V, ``1 <= r <= min(n_out, n_in)``.
    generator : torch.Generator, optional
        Source of the random initial U and V; the global torch RNG when
        omitted (so ``torch.manual_seed`` makes them reproducible, as it does
        ``nn.Linear``'s weights).

    Attributes
    ----------
    base : torch.nn.Linear
        The frozen layer.
    U : UnitaryParameter, shape (n_out, r)
        Orthonormal columns (``U^H U = I_r``), marked unitary.
    V : UnitaryParameter, shape (n_in, r)
        Orthonormal columns (``V^H V = I_r``), marked unitary.
    s : torch.nn.Parameter, shape (r,)
        The diagonal, zero at start; of the weight's dtype (complex for a
        complex layer).

    Raises
    ------
    TypeError
        ``linear`` is not an ``nn.Linear`` (or has an unsupported dtype);
        ``rank`` is not an integer; ``generator`` is not a torch.Generator or
        None. ``linear`` is unchanged then.
    ValueError
        ``rank`` outside ``[1, min(n_out, n_in)]``.

    Notes
    -----
    The adapted layer computes ``y = x W0^T + b + x Delta W^T`` with

    ``Delta W = U diag(s) V^H``   (n_out x n_in, rank at most r).

    U and V are marked unitary (:func:`mark_unitary`), so
    ``ProjUNN(model.parameters())`` puts them in its unitary group and trains
    them with projUNN steps on the Stiefel manifold ``{U : U^H U = I_r}``:
    their columns stay orthonormal to rounding at every step, while s (and
    any other trainable parameter) gets the optimizer's plain rule. Delta W
    is then an exact SVD of the update: its singular values are ``|s_i|``
    (the sign or phase of ``s_i`` belongs to column i of U), and setting
    ``s_i`` to zero removes exactly one singular direction, so pruning s sets
    each layer's rank. This is what AdaLoRA approximates with a penalty,
    done exactly: AdaLoRA's factors P, Q are pushed towards orthogonality by
    a term ``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` in the loss and are only
    near it, so its diagonal is only near the singular values of its update.
    A plain optimizer (``torch.optim.Adam``) moves U and V off the manifold
    at its first step; use :class:`ProjUNN` (or another Stiefel optimizer).

    U and V start Haar distributed on the Stiefel manifold
    (:func:`unitary_lr.random_unitary`, drawn in 64-bit precision and rounded
    to the weight's dtype) and s starts at zero, so the layer computes
    exactly what ``linear`` does. At s = 0 only s has a gradient,
    ``diag(U^H G V)`` for the weight's gradient G; U and V start moving once
    s has.

    The forward pass applies the factors to the batch,
    ``x Delta W^T = ((x conj(V)) * s) U^T``: O(B r (n_out + n_in)) for a batch
    of B rows, with ``(n_out + n_in) r + r`` parameters, and never an
    n_out x n_in matrix. :meth:`merge` folds Delta W into the frozen weight
    for inference and :meth:`unmerge` takes it out again, as for
    :class:`HouseholderAdapter`. As there, an adapter made directly knows
    nothing of the model around ``linear``, so its :meth:`merge` does not
    refuse a weight tied to another layer's; those made by
    :func:`add_svd_adapters` do.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr import unitarity_error
    >>> from unitary_lr.torch import ProjUNN, SVDAdapter
    >>> _ = torch.manual_seed(0)
    >>> layer = torch.nn.Linear(6, 4)
    >>> adapted = SVDAdapter(layer, rank=2)
    >>> x, target = torch.randn(16, 6), torch.randn(16, 4)
    >>> bool(torch.equal(adapted(x), layer(x)))      # s = 0: the layer as it was
    True
    >>> opt = ProjUNN(adapted.parameters(), lr=1e-2)  # U, V in the unitary group
    >>> for step in range(20):
    ...     opt.zero_grad()
    ...     ((adapted(x) - target) ** 2).mean().backward()
    ...     opt.step()
    >>> bool(adapted.s.abs().min() > 0), float(unitarity_error(adapted.U.detach())) < 1e-6
    (True, True)
    """

    # Named in the class's own body because the documentation lists a class's
    # own members only (the torch classes would otherwise list all of nn.Module's).
    merged, in_features, out_features = _LinearAdapter.merged, _LinearAdapter.in_features, _LinearAdapter.out_features
    forward, merge, unmerge = _LinearAdapter.forward, _LinearAdapter.merge, _LinearAdapter.unmerge

    def __init__(self, linear, *, rank, generator=None):
        _check_linear(linear)
        rank = _check_size("rank", rank, linear)
        check_generator(generator)
        weight = linear.weight
        # drawn before super().__init__ freezes the layer: an error leaves it as it was
        U, V = _haar_columns((linear.out_features, linear.in_features), rank, dtype=weight.dtype,
                             device=weight.device, generator=generator)
        super().__init__(linear)
        self.U = mark_unitary(nn.Parameter(U))
        self.V = mark_unitary(nn.Parameter(V))
        self.s = nn.Parameter(torch.zeros(rank, dtype=weight.dtype, device=weight.device))

    def extra_repr(self):
        return f"rank={self.s.shape[0]}, merged={self._merged}"

    def delta(self, x):
        """``x Delta W^T = ((x conj(V)) * s) U^T`` for x of shape (..., n_in), in
        O(B r (n_out + n_in)), without forming Delta W."""
        return ((x @ _conj(self.V)) * self.s) @ self.U.mT

    @torch.no_grad()
    def delta_weight(self):
        """Delta W = U diag(s) V^H (n_out x n_in) as a dense matrix, computed in
        64-bit precision in O(r n_out n_in); for merging and inspection, not
        for training."""
        wide = torch.promote_types(self.s.dtype, torch.float64)
        return (self.U.to(wide) * self.s.to(wide)) @ self.V.to(wide).mH


def _matcher(target_modules):
    """name -> bool, PEFT's rule: a string is a regex matched against the whole
    qualified name; a list holds names that match the name or its last parts."""
    if target_modules is None:
        return lambda name: True
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"target_modules is not a valid regular expression: {target_modules!r} ({error})") from None
        return lambda name: pattern.fullmatch(name) is not None
    try:
        suffixes = list(target_modules)
    except TypeError:
        raise TypeError(f"target_modules must be a regex string, a list of names or None, got "
                        f"{type(target_modules).__name__}: {target_modules!r}") from None
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _adapter_bases(model):
    return {id(module.base) for module in model.modules() if isinstance(module, _LinearAdapter)}


def add_householder_adapters(model, *, target_modules=None, reflectors=1, freeze_base=True, generator=None):
    """Wrap every ``nn.Linear`` of ``model`` whose qualified name matches
    ``target_modules`` in a :class:`HouseholderAdapter`, in place.

    Parameters
    ----------
    model : torch.nn.Module
    target_modules : str, list of str or None, optional
        A regular expression matched against the whole qualified name
        (``"layers\\.\\d+\\.attn\\.(q|v)"``), or names matched against the
        qualified name or its last dotted parts (``["q", "v"]`` matches
        ``layers.0.attn.q``), as PEFT's ``target_modules``. None: every
        ``nn.Linear``. Layers already inside an adapter are never wrapped again,
        nor subclasses of ``nn.Linear``, whose forward need not be its
        (``MultiheadAttention`` reads its ``out_proj``'s weight and never
        calls it); the error of a model that has only those names them.
    reflectors : int, optional
        Householder vectors per side of every adapter.
    freeze_base : bool, optional
        Freeze every parameter that is not an adapter's (as PEFT does), so
        that only the adapters train. False leaves the others as they are
        (the wrapped layers are frozen either way).
    generator : torch.Generator, optional
        Source of the initial reflectors, used layer after layer.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, modified. A layer whose weight is tied to other
        places of ``model`` (the same Parameter, as ``l2.weight = l1.weight``
        or tied input and output embeddings make it) is adapted too, and
        trains and computes right unmerged; its adapter's ``merge()`` raises
        a ValueError naming those places, since merging would change them
        too. Ties with parameters outside ``model`` are not seen.

    Raises
    ------
    ValueError
        No ``nn.Linear`` matches; ``reflectors`` too large for a matched layer;
        a malformed ``target_modules``. Nothing is changed then.
    TypeError
        ``model`` is not an ``nn.Module``; ``reflectors`` is not an integer;
        ``generator`` is not a torch.Generator or None. Nothing is changed
        then.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import add_householder_adapters, trainable_parameters
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> model = add_householder_adapters(model, target_modules=["0"], reflectors=2)
    >>> type(model[0]).__name__, trainable_parameters(model)
    ('HouseholderAdapter', (40, 130))
    """
    return _add_adapters(model, HouseholderAdapter, target_modules=target_modules, freeze_base=freeze_base,
                         generator=generator, reflectors=reflectors)


def add_svd_adapters(model, *, target_modules=None, rank, freeze_base=True, generator=None):
    """Wrap every ``nn.Linear`` of ``model`` whose qualified name matches
    ``target_modules`` in an :class:`SVDAdapter`, in place.

    Parameters
    ----------
    model : torch.nn.Module
    target_modules : str, list of str or None, optional
        Which layers, as for :func:`add_householder_adapters`: a regular
        expression for the whole qualified name, or names matched against
        the qualified name or its last dotted parts; None: every
        ``nn.Linear``. Layers already inside an adapter are never wrapped again.
    rank : int
        Columns of U and V of every adapter, at most ``min(n_out, n_in)`` of
        each matched layer.
    freeze_base : bool, optional
        Freeze every parameter that is not an adapter's (as PEFT does), so
        that only the adapters train. False leaves the others as they are
        (the wrapped layers are frozen either way).
    generator : torch.Generator, optional
        Source of the initial U and V, used layer after layer.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, modified. A layer whose weight is tied to other
        places of ``model`` (the same Parameter, as ``l2.weight = l1.weight``
        or tied input and output embeddings make it) is adapted too, and
        trains and computes right unmerged; its adapter's ``merge()`` raises
        a ValueError naming those places, since merging would change them
        too. Ties with parameters outside ``model`` are not seen.

    Raises
    ------
    ValueError
        No ``nn.Linear`` matches; ``rank`` too large for a matched layer;
        a malformed ``target_modules``. Nothing is changed then.
    TypeError
        ``model`` is not an ``nn.Module``; ``rank`` is not an integer;
        ``generator`` is not a torch.Generator or None. Nothing is changed
        then.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import ProjUNN, add_svd_adapters, trainable_parameters
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> model = add_svd_adapters(model, target_modules=["0"], rank=2)
    >>> type(model[0]).__name__, trainable_parameters(model)       # (8 + 8) * 2 + 2
    ('SVDAdapter', (34, 124))
    >>> opt = ProjUNN(model.parameters(), lr=1e-3)               # U and V: projUNN steps
    >>> [len(group["params"]) for group in opt.param_groups if group["unitary"]]
    [2]
    """
    return _add_adapters(model, SVDAdapter, target_modules=target_modules, freeze_base=freeze_base,
                         generator=generator, rank=rank)


def _add_adapters(model, adapter, *, target_modules, freeze_base, generator, **size):
    """Wrap the matching layers in ``adapter(linear, **size, generator=generator)``:
    ``size`` is the one size argument of the adapter (``reflectors=j``, ``rank=r``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_generator(generator)  # (a NumPy Generator failed in torch.randn, after the first layer was frozen)
    # a size of the wrong type is a TypeError whatever the model (it was the ValueError of no match)
    for name, value in size.items():
        check_int(name, value)
    matches = _matcher(target_modules)
    inside = _adapter_bases(model)
    targets = []  # (parent, attribute, linear): every reference, shared layers included
    subclassed = []  # matching layers of a subclass of nn.Linear, left as they are
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if isinstance(parent, _LinearAdapter):
            continue
        for child_name, child in parent._modules.items():  # named_children() hides repeats
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and id(child) not in inside and matches(name):
                if type(child) is nn.Linear:
                    targets.append((parent, child_name, child))
                else:
                    subclassed.append(f"{name!r} ({type(child).__name__})")
    if not targets:
        # a subclass's forward need not be nn.Linear's (MultiheadAttention reads
        # its out_proj's weight and never calls it: an adapter there would do
        # nothing, without a word)
        also = (f"; the matching subclasses of it, {', '.join(subclassed)}, are not wrapped: their forward need not "
                "be nn.Linear's (wrap one with HouseholderAdapter or SVDAdapter yourself where it is)"
                if subclassed else "")
        raise ValueError(f"no torch.nn.Linear of the model matches target_modules={target_modules!r}{also}")
    for _, _, linear in targets:  # every check before the first change
        _check_linear(linear)
        for name, value in size.items():
            _check_size(name, value, linear)
    adapters = {}
    for parent, child_name, linear in targets:
        if id(linear) not in adapters:
            adapters[id(linear)] = adapter(linear, **size, generator=generator)
        setattr(parent, child_name, adapters[id(linear)])
    # Each adapter learns the other places of the model that hold its weight
    # (weight tying), which its merge() would change too; the adapters of an
    # earlier call are brought up to date (their places may have been wrapped since).
    every = [module for module in model.modules() if isinstance(module, _LinearAdapter)]
    found = _find_tied(model, [(module, module.base) for module in every])
    for module in every:
        places = found[id(module)]
        module._tied = (*places, *(kept for kept in module._tied
                                   if not any(kept[0] is place[0] and kept[1] == place[1] for place in places)))
    if freeze_base:
        own = {id(p) for p in _adapter_parameters(model).values()}
        for parameter in model.parameters():
            if id(parameter) not in own:
                parameter.requires_grad_(False)
    return model


def trainable_parameters(model):
    """``(trainable, total)``: numbers of parameter entries of ``model`` that
    require a gradient, and of all (shared parameters counted once).

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import trainable_parameters
    >>> trainable_parameters(torch.nn.Linear(3, 2))
    (8, 8)
    """
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def _adapter_parameters(model):
    """{qualified name: parameter} of every adapter's own parameters (those it
    holds itself, not its frozen layer's)."""
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, _LinearAdapter):
            prefix = f"{name}." if name else ""
            for attribute, parameter in module.named_parameters(recurse=False):
                result[prefix + attribute] = parameter
    return result


def adapter_state_dict(model):
    """The adapters' parameters only, ``{qualified name: tensor}`` (detached
    copies), for saving a fine-tuning run without the frozen model.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import HouseholderAdapter, adapter_state_dict
    >>> model = torch.nn.Sequential(HouseholderAdapter(torch.nn.Linear(4, 3)))
    >>> {name: tuple(t.shape) for name, t in adapter_state_dict(model).items()}
    {'0.reflectors_out': (3, 1), '0.reflectors_in': (4, 1), '0.sigma': (3,)}
    """
    return {name: p.detach().clone() for name, p in _adapter_parameters(model).items()}


@torch.no_grad()
def load_adapter_state_dict(model, state_dict):
    """Load adapter parameters saved by :func:`adapter_state_dict` into ``model``.

    The keys must be exactly the model's adapter parameters, with their
    shapes; nothing is loaded unless all match. An entry is cast to its
    parameter's dtype. An orthonormal factor (an :class:`SVDAdapter`'s U or
    V) saved in a coarser dtype than the model's (float32 or complex64 into
    a float64 or complex128 model) is orthonormal to its own rounding only:
    it is checked against the tolerance of its own dtype
    (:func:`unitary_tolerance`) and then replaced by its polar factor
    (:func:`unitary_lr.project_unitary`), the nearest matrix with columns
    orthonormal to the model's rounding, which differs from the saved entry
    by about the entry's own rounding error.

    Raises
    ------
    ValueError
        Missing or unexpected keys, a shape mismatch, NaN or Inf, a matrix
        that must be orthonormal (an :class:`SVDAdapter`'s U or V) and is
        not, or a merged adapter (whose folded weight would no longer match);
        the model is unchanged.
    TypeError
        A complex entry for a real parameter (its imaginary part would be
        dropped); an orthonormal factor (an :class:`SVDAdapter`'s U or V) of
        the model in another dtype than float32/64, complex64/128 (a model
        made bfloat16 or float16: load the adapters before converting it),
        whose orthonormality cannot be checked. The error names the entry and
        the dtype; the model is unchanged.
    """
    own = _adapter_parameters(model)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter state dict does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    for name, parameter in own.items():
        value = state_dict[name]
        if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"adapter state dict entry {name!r} has shape {shape}, "
                             f"the model's has shape {tuple(parameter.shape)}")
        if value.is_complex() and not parameter.is_complex():
            raise TypeError(f"adapter state dict entry {name!r} is complex ({value.dtype}), the model's parameter "
                            f"real ({parameter.dtype}): its imaginary part would be dropped")
        if is_unitary(parameter) and parameter.dtype not in _FLOAT_DTYPES:
            # (the check of its orthonormality below refused it as "W has dtype torch.bfloat16")
            raise TypeError(f"adapter state dict entry {name!r} is for an orthonormal factor of dtype "
                            f"{parameter.dtype}, whose orthonormality cannot be checked; expected float32, float64, "
                            "complex64 or complex128: load the adapters before converting the model")
        if not bool(torch.isfinite(value).all()):
            # (a NaN sigma loaded silently, and every output after it was NaN)
            raise ValueError(f"adapter state dict entry {name!r} (shape {tuple(value.shape)}) contains NaN or Inf")
    values = {}
    for name, parameter in own.items():
        # An SVDAdapter's U and V must stay orthonormal: the optimizer keeps them
        # so but never checks them.
        if is_unitary(parameter):
            entry = state_dict[name].detach()
            value = entry.to(parameter.dtype)
            error, tolerance = float(unitarity_error(value)), unitary_tolerance(parameter.dtype)
            # An entry saved in a coarser dtype (float32 into a float64 model) is
            # orthonormal to its own rounding only: checked at its dtype's
            # tolerance, then made orthonormal to the model's (its polar factor,
            # which moves it by about its error), as ProjUNN would at its first step.
            coarser = entry.dtype in _FLOAT_DTYPES and unitary_tolerance(entry.dtype) > tolerance
            if coarser and error <= unitary_tolerance(entry.dtype):
                value = project_unitary(value)
                error = float(unitarity_error(value))
            if not error <= tolerance:  # NaN fails too
                saved = (f" ({str(entry.dtype).removeprefix('torch.')}, the tolerance of its own dtype "
                         f"{unitary_tolerance(entry.dtype):g})" if coarser else "")
                raise ValueError(f"adapter state dict entry {name!r} must have orthonormal columns: its unitarity "
                                 f"error ||W^H W - I||_F / sqrt(m) is {error:.3g}, above the tolerance "
                                 f"{tolerance:g} of {str(parameter.dtype).removeprefix('torch.')}{saved}")
            values[name] = value
    merged = [name for name, m in model.named_modules() if isinstance(m, _LinearAdapter) and m.merged]
    if merged:
        raise ValueError(f"unmerge() the adapters {merged} before loading adapter parameters (merged=True)")
    for name, parameter in own.items():
        parameter.copy_(values.get(name, state_dict[name]))
