"""Plain (non-unitary) parameter groups of ``ProjUNN``, stepped by torch.optim
itself (floor 6, private).

A model handed whole to :class:`unitary_lr.torch.ProjUNN` has most of its
parameters in plain groups. The framework-free rules of :mod:`unitary_lr.optim`
return new arrays (they must: JAX arrays are immutable, and a failed step
must change nothing), which cost 1.2-1.4x ``torch.optim``'s step on such
parameters. Here a plain group is stepped by the functional forms that
``torch.optim.SGD``, ``RMSprop`` and ``Adam`` call themselves
(``torch.optim.adam.adam`` and so on): the same numbers, the same in-place
kernels, foreach (one kernel per operation for a whole group) where torch
picks it, and the state under torch.optim's own keys, so that a state dict
reads as torch's does.

The caller checks the gradients and computes every unitary update first: these
functions write the parameters and their state in place, so they run only once
nothing can fail any more.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam
from torch.optim.rmsprop import rmsprop
from torch.optim.sgd import sgd

__all__ = ["plain_step"]


def _scalar_dtype():
    # torch.optim keeps ``step`` in float32 (float64 when that is the default
    # dtype), on the host when the group is not capturable
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _step_counter(state):
    """``state["step"]`` as the tensor torch.optim expects. A state saved by
    ProjUNN before plain groups were torch.optim's held a Python int, or no
    step at all (RMSprop): it resumes with the same count."""
    step = state.get("step", 0)
    if not isinstance(step, torch.Tensor):
        step = torch.tensor(float(step), dtype=_scalar_dtype())
        state["step"] = step
    return step


def _with_grad(state, group):
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params], [state[p] for p in params]


def _zeros(p):
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _sgd(state, group):
    params, grads, states = _with_grad(state, group)
    momentum = group["momentum"]
    buffers = [s.get("momentum_buffer") for s in states] if momentum != 0 else []
    sgd(params, grads, buffers, foreach=group.get("foreach"), weight_decay=group["weight_decay"],
        momentum=momentum, lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
        maximize=group.get("maximize", False))
    # sgd creates a parameter's buffer at its first step, in the list
    for s, buffer in zip(states, buffers):
        s["momentum_buffer"] = buffer


def _rmsprop(state, group):
    params, grads, states = _with_grad(state, group)
    for p, s in zip(params, states):
        if "square_avg" not in s:
            s["square_avg"] = _zeros(p)
        if group["momentum"] > 0 and "momentum_buffer" not in s:
            s["momentum_buffer"] = _zeros(p)
        if group["centered"] and "grad_avg" not in s:
            s["grad_avg"] = _zeros(p)
    rmsprop(params, grads, [s["square_avg"] for s in states],
            [s["grad_avg"] for s in states] if group["centered"] else [],
            [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else [],
            [_step_counter(s) for s in states], foreach=group.get("foreach"), maximize=group.get("maximize", False),
            has_complex=any(p.is_complex() for p in params), lr=group["lr"], alpha=group["alpha"],
            eps=group["eps"], weight_decay=group["weight_decay"], momentum=group["momentum"],
            centered=group["centered"])


def _adam(state, group):
    params, grads, states = _with_grad(state, group)
    amsgrad = group.get("amsgrad", False)
    for p, s in zip(params, states):
        if "exp_avg" not in s:
            s["exp_avg"], s["exp_avg_sq"] = _zeros(p), _zeros(p)
        if amsgrad and "max_exp_avg_sq" not in s:  # (also where amsgrad was turned on later)
            s["max_exp_avg_sq"] = _zeros(p)
    beta1, beta2 = group["betas"]
    adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
         [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [_step_counter(s) for s in states],
         foreach=group.get("foreach"), has_complex=any(p.is_complex() for p in params),
         decoupled_weight_decay=group.get("decoupled_weight_decay", False), amsgrad=amsgrad, beta1=beta1,
         beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
         maximize=group.get("maximize", False))


_STEPS = {"sgd": _sgd, "rmsprop": _rmsprop, "adam": _adam}


@torch.no_grad()
def plain_step(state, group):
    """Step every parameter of the plain ``group`` that has a gradient, in
    place, as ``torch.optim`` does for the group's ``base`` rule; ``state`` is
    the optimizer's per-parameter state (written in place too). No autograd
    graph records it.

    Examples
    --------
    >>> import torch
    >>> from collections import defaultdict
    >>> from unitary_lr.torch._plain import plain_step
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> p.grad = torch.tensor([1.0, -1.0])
    >>> group = {"params": [p], "base": "sgd", "lr": 0.5, "momentum": 0.0, "dampening": 0.0,
    ...          "nesterov": False, "weight_decay": 0.0}
    >>> plain_step(defaultdict(dict), group)
    >>> p.detach().tolist()
    [0.5, 1.5]
    """
    if any(p.grad is not None for p in group["params"]):
        _STEPS[group["base"]](state, group)
