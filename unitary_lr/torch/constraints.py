"""``orthogonal(module, name)``: make an existing layer's weight unitary
(orthogonal if real) in one call, as ``geotorch.orthogonal`` does."""

from __future__ import annotations

import torch
from torch import nn

from ..haar import random_unitary
from ._mark import _check_and_mark, _set_mark
from .layers import check_generator

__all__ = ["orthogonal"]

_INITS = ("closest", "haar")


def orthogonal(module, name="weight", *, init="closest", generator=None):
    r"""Replace ``module.<name>`` by an orthogonal (real) or unitary (complex)
    matrix and mark it, so that :class:`ProjUNN` or
    :func:`projunn_retraction` keeps it on the group. Returns ``module``.

    Parameters
    ----------
    module : torch.nn.Module
    name : str, optional
        The name of one of the module's own parameters, (..., n, m): square
        matrices become unitary, n x m ones get orthonormal columns (m < n)
        or rows (m > n), as ``torch.nn.Linear(m, n)``'s weight in
        :class:`OrthogonalLinear`.
    init : {"closest", "haar"}, optional
        ``"closest"``: the closest unitary matrix to the current value, its
        polar factor (:func:`unitary_lr.project_unitary`), so a trained layer
        changes as little as it can. ``"haar"``: a Haar-random sample.
    generator : torch.Generator, optional
        Source of the ``"haar"`` sample.

    Returns
    -------
    torch.nn.Module
        ``module``; the parameter is the same object, its values replaced in
        place (an optimizer that already holds it keeps it) and its class
        :class:`UnitaryParameter`.

    Raises
    ------
    TypeError
        ``module`` not a ``torch.nn.Module``; a parameter dtype other than
        float32/64, complex64/128; an uninitialized (lazy) parameter; a
        ``generator`` that is not a ``torch.Generator``.
    ValueError
        ``name`` not a parameter of ``module`` (the message lists them), an
        unknown ``init``, a parameter that is not a matrix, NaN or Inf.
        Nothing is changed.

    Notes
    -----
    Unlike ``torch.nn.utils.parametrizations.orthogonal`` or geotorch, no
    parametrization is added: the weight is a plain (marked) parameter and the
    forward pass costs nothing extra. The optimizer keeps it on the group:
    ``ProjUNN(model.parameters())``, or any ``torch.optim`` optimizer followed
    by :func:`projunn_retraction`. ``"closest"`` costs one SVD, O(n^3), once.
    The mark survives ``deepcopy``, pickling and ``load_state_dict(...,
    assign=True)`` (see :func:`mark_unitary`).

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import is_unitary, orthogonal
    >>> layer = orthogonal(torch.nn.Linear(4, 4))
    >>> W = layer.weight.detach()
    >>> is_unitary(layer.weight), bool(torch.allclose(W.T @ W, torch.eye(4), atol=1e-6))
    (True, True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, _INITS))}, got {init!r}")
    check_generator(generator)
    param = module._parameters.get(name) if isinstance(name, str) else None
    if param is None:
        names = ", ".join(map(repr, dict(module.named_parameters(recurse=False)))) or "none"
        raise ValueError(f"name must be one of the parameters of the {type(module).__name__} "
                         f"({names}), got {name!r}")
    what = f"{type(module).__name__}.{name}"
    if isinstance(param, nn.parameter.UninitializedParameter):
        # (as "closest" refuses it; "haar" gave torch's uninitialized-parameter error)
        raise TypeError(f"{what} is an uninitialized (lazy) parameter; run the module once before marking it")
    if init == "closest":
        _check_and_mark(param, project=True, what=what)
        return module
    if param.dtype not in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        raise TypeError(f"{what} has dtype {param.dtype}; a unitary parameter must be float32, float64, "
                        "complex64 or complex128")
    if param.dim() < 2:
        raise ValueError(f"{what} must be a matrix or a batch of matrices, got shape {tuple(param.shape)}")
    *batch, n, m = param.shape
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator))
    sample = random_unitary(max(n, m), dtype=str(param.dtype).removeprefix("torch."), batch_shape=tuple(batch),
                            rng=seed, xp=torch, device=param.device)
    # the first m columns (rows) of a Haar unitary are Haar on the matrices
    # with orthonormal columns (rows)
    with torch.no_grad():
        param.copy_(sample[..., :n, :m])
    _set_mark(param)
    return module
