"""The unitary mark of a torch parameter: what makes :class:`ProjUNN` (and
:func:`projunn_retraction`) treat it as a unitary (orthogonal) matrix.

Imported by the layers and by the optimizer, and importing neither.

Why a subclass and a hook, not just an attribute: ``torch.nn.Parameter.__deepcopy__``
copies the data and ``requires_grad`` only (a Python attribute set on the
parameter is lost), and ``load_state_dict(..., assign=True)`` replaces the
parameter object by a new one. The mark is therefore carried by

- the parameter's class, :class:`UnitaryParameter` (a ``torch.nn.Parameter``
  subclass): ``deepcopy`` builds ``type(self)(...)``, so the copy keeps the
  class; its ``__reduce_ex__`` rebuilds the same class on unpickling
  (``pickle``, ``torch.save``/``torch.load`` of a whole module);
  ``module.to(...)``, ``.double()`` and ``.cuda()`` change the data of the
  same object;
- a parameter-registration hook (``torch.nn.modules.module.
  register_module_parameter_registration_hook``): a Parameter that replaces a
  marked one under the same name in a module (``load_state_dict(...,
  assign=True)``, or an assignment) is marked too, after the same check.

A plain tensor (not a Parameter) gets the attribute only.
"""

from __future__ import annotations

import torch
from torch import nn

from .._xp import exact_products
from ..diagnostics import unitarity_error
from ..polar import project_unitary

__all__ = ["UnitaryParameter", "is_unitary", "mark_unitary", "unitary_tolerance"]

_MARK = "_unitary_lr_unitary"  # the attribute marks of earlier versions and of plain tensors

# Largest ||W^H W - I||_F / sqrt(m) (W n x m, m <= n; a wide W through W^H)
# accepted as "unitary" when a matrix is
# marked. A matrix built in the dtype (a Haar sample, a polar factor) is off by
# rounding only: measured up to n = 2048, <= 8e-7 in float32/complex64 and
# ~1e-15 in float64/complex128. The optimizers let a trained matrix drift up to
# their re-projection threshold (1e-5 and 1e-12) before they re-project it. The
# tolerance is 10x above that threshold, so that every matrix the library makes
# or trains passes, and small enough that a matrix accepted here moves by less
# than one training step would when it is re-projected; a matrix that is not
# unitary at all (a Kaiming-uniform nn.Linear weight: ~0.75) is far above it.
_TOLERANCE = {torch.float32: 1e-4, torch.complex64: 1e-4, torch.float64: 1e-10, torch.complex128: 1e-10}


class UnitaryParameter(nn.Parameter):
    """A ``torch.nn.Parameter`` marked unitary (see :func:`mark_unitary`).

    The class is the mark: it survives ``copy.deepcopy``, pickling and
    ``torch.save``/``torch.load`` of a module; ``isinstance(p, nn.Parameter)``
    stays true and every torch operation returns plain tensors, as for a
    Parameter.
    """

    def __reduce_ex__(self, protocol):
        # what nn.Parameter.__reduce_ex__ does, rebuilding this class instead
        # (backward hooks are not serialized, as torch does not)
        return (_rebuild_unitary_parameter,
                (self.data, self.requires_grad, torch._utils._get_obj_state(self)))

    def __repr__(self):
        return "Parameter containing (marked unitary):\n" + repr(self.data)

    def module_load(self, other, assign=False):
        """What ``load_state_dict`` swaps into this parameter under
        ``torch.__future__.set_swap_module_params_on_conversion(True)`` (the
        class included; torch would wrap a plain tensor in a plain, unmarked
        Parameter): a marked parameter. Without ``assign`` it holds ``other``'s
        values, copied unchecked as without the flag; with ``assign`` it is
        ``other``, checked as a Parameter assigned in this one's place is."""
        value = super().module_load(other, assign=assign)
        if not assign or is_unitary(other):
            return UnitaryParameter(value, self.requires_grad)
        replacement = nn.Parameter(value, self.requires_grad)
        _mark_replacement(replacement, old_dtype=self.dtype, name="<name>",
                          what="the value loaded into a parameter marked unitary")
        return replacement


def _rebuild_unitary_parameter(data, requires_grad, state):
    param = UnitaryParameter(data, requires_grad)
    return torch._utils._set_obj_state(param, state)


# torch.load(weights_only=True) of a state dict saved with keep_vars=True
# meets this function; it only wraps a tensor in a Parameter.
torch.serialization.add_safe_globals([_rebuild_unitary_parameter, UnitaryParameter])


def unitary_tolerance(dtype):
    """The largest unitarity error (``||W^H W - I_m||_F / sqrt(m)`` for an n x m
    matrix, m <= n; ``||W W^H - I_n||_F / sqrt(n)`` for a wide one) that
    :func:`mark_unitary` accepts for matrices of ``dtype``.

    Parameters
    ----------
    dtype : torch.dtype
        float32, float64, complex64 or complex128.

    Returns
    -------
    float
        1e-4 for float32/complex64 and 1e-10 for float64/complex128: ten and a
        hundred times the optimizers' re-projection thresholds (1e-5 and 1e-12,
        the default ``drift_tol``), far above rounding (<= 1e-6 and ~1e-15 for
        n up to a few thousand).

    Raises
    ------
    TypeError
        Another dtype.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import unitary_tolerance
    >>> unitary_tolerance(torch.float32), unitary_tolerance(torch.complex128)
    (0.0001, 1e-10)
    """
    if dtype not in _TOLERANCE:
        raise TypeError(f"dtype must be float32, float64, complex64 or complex128, got {dtype}")
    return _TOLERANCE[dtype]


@exact_products
def mark_unitary(param: torch.Tensor, /, *, project: bool = False) -> torch.Tensor:
    r"""Mark ``param`` as a unitary (orthogonal, if real) matrix: :class:`ProjUNN`
    puts it in a unitary group when it receives parameters without explicit
    groups. Returns ``param``, the same object.

    Parameters
    ----------
    param : torch.Tensor
        A ``torch.nn.Parameter`` (or a tensor) of shape (..., n, m), float32,
        float64, complex64 or complex128, unitary to within
        :func:`unitary_tolerance` of its dtype: for m < n orthonormal columns
        (``W^H W = I_m``), for m > n orthonormal rows.
    project : bool, optional
        Replace the value, in place, by its closest unitary matrix (the polar
        factor, :func:`unitary_lr.project_unitary`) before marking it, instead
        of refusing a matrix that is not unitary.

    Returns
    -------
    torch.Tensor
        ``param``; a ``torch.nn.Parameter`` becomes a :class:`UnitaryParameter`
        (its class changes, the object stays the same).

    Raises
    ------
    TypeError
        ``param`` not a tensor, or of another dtype.
    ValueError
        A matrix whose unitarity error ``||W^H W - I||_F / sqrt(m)`` (the
        largest over a batch) is above the tolerance of its dtype, without
        ``project=True``; NaN or Inf; a shape that is not a matrix. Nothing is
        changed.

    Notes
    -----
    The mark survives ``copy.deepcopy``, pickling, ``torch.save``/``torch.load``
    of a whole module, ``module.to(...)``/``.double()``, and
    ``load_state_dict(..., assign=True)``: a Parameter that replaces a marked
    one in a module is checked and marked in turn (a replacement in float16 or
    bfloat16, which the check does not cover, is marked unchecked when the
    marked parameter has that dtype too, as after ``.half()``; in another dtype
    it is refused). ``load_state_dict`` without ``assign`` copies values into
    the marked parameter without checking them. Both hold with
    ``torch.__future__.set_swap_module_params_on_conversion(True)`` too, where
    ``load_state_dict`` swaps in the object that
    :meth:`UnitaryParameter.module_load` returns, a marked parameter; ``.to()``
    under that flag swaps in a new plain Parameter: mark it again.
    The check costs one dense product, O(n^3), once.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import ProjUNN, mark_unitary
    >>> W = mark_unitary(torch.nn.Parameter(torch.eye(3)))
    >>> b = torch.nn.Parameter(torch.zeros(3))
    >>> [group["unitary"] for group in ProjUNN([W, b]).param_groups]
    [False, True]
    >>> linear = torch.nn.Linear(3, 3)   # Kaiming-uniform: not orthogonal
    >>> _ = mark_unitary(linear.weight, project=True)
    >>> W = linear.weight.detach()
    >>> bool(torch.allclose(W.T @ W, torch.eye(3), atol=1e-6))
    True
    """
    _check_and_mark(param, project=project, what="param")
    return param


def is_unitary(param: torch.Tensor) -> bool:
    """Whether ``param`` was marked with :func:`mark_unitary` (or made by
    :func:`unitary_parameter` or :func:`orthogonal`).

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import UnitaryRNN, is_unitary
    >>> [name for name, p in UnitaryRNN(2, 4).named_parameters() if is_unitary(p)]
    ['weight_hh']
    """
    return isinstance(param, UnitaryParameter) or bool(getattr(param, _MARK, False))


def _check_and_mark(param, *, project, what):
    """Check (or project) and mark; ``what`` names the parameter in messages."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(param).__name__}")
    if not isinstance(project, bool):
        raise TypeError(f"project must be True or False, got {project!r}")
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise TypeError(f"{what} is an uninitialized (lazy) parameter; run the module once before marking it")
    if param.dtype not in _TOLERANCE:
        raise TypeError(f"{what} has dtype {param.dtype}; a unitary parameter must be float32, float64, "
                        "complex64 or complex128")
    if param.dim() < 2:
        raise ValueError(f"{what} must be a matrix or a batch of matrices, got shape {tuple(param.shape)}")
    W = param.detach()
    if project:
        try:
            value = project_unitary(W)
        except ValueError as error:
            raise ValueError(f"{what} (shape {tuple(param.shape)}) cannot be projected: {error}") from None
        with torch.no_grad():
            param.copy_(value)
    else:
        try:
            errors = unitarity_error(W)
            error = float(torch.max(errors)) if errors.numel() else 0.0  # an empty batch: no matrix to check
        except ValueError as error_:
            raise ValueError(f"{what} (shape {tuple(param.shape)}): {error_}") from None
        tolerance = _TOLERANCE[param.dtype]
        if not error <= tolerance:  # NaN fails too
            raise ValueError(
                f"{what} (shape {tuple(param.shape)}, {str(param.dtype).removeprefix('torch.')}) is not unitary: "
                f"its unitarity error ||W^H W - I||_F / sqrt(m) is {error:.3g}, above the tolerance "
                f"{tolerance:g} of its dtype; pass project=True to replace it by its closest unitary matrix"
            )
    _set_mark(param)


def _set_mark(param):
    """Mark without a check: for matrices unitary by construction."""
    if type(param) is nn.Parameter:
        # same object, so optimizers, hooks and modules that hold it keep it
        param.__class__ = UnitaryParameter
    if not isinstance(param, UnitaryParameter):
        setattr(param, _MARK, True)


def _inherit_mark(module, name, param):
    """Parameter-registration hook: a Parameter that replaces a marked one under
    the same name (``load_state_dict(assign=True)`` does that) is marked too."""
    old = module._parameters.get(name)
    if old is None or old is param or not is_unitary(old) or is_unitary(param):
        return
    what = f"{type(module).__name__}.{name} (marked unitary; its replacement)"
    _mark_replacement(param, old_dtype=old.dtype, name=name, what=what)


def _mark_replacement(param, *, old_dtype, name, what):
    """Check and mark ``param``, a Parameter that replaces a marked one of dtype
    ``old_dtype``. A replacement in the marked parameter's own dtype that the
    check does not cover (float16, bfloat16: a model converted with ``.half()``
    keeps its mark) is marked without a check, as ``load_state_dict`` without
    ``assign`` copies values in unchecked."""
    if param.dtype == old_dtype and param.dtype not in _TOLERANCE and (param.is_floating_point()
                                                                       or param.is_complex()):
        _set_mark(param)
        return
    try:
        _check_and_mark(param, project=False, what=what)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{error}. To put a plain parameter in its place, delete it first "
                          f"(del module.{name})") from None


_HOOK = nn.modules.module.register_module_parameter_registration_hook(_inherit_mark)
