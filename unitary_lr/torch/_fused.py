"""Fused base-rule updates for torch tensors (floor 6, private).

The framework-free rules in :mod:`unitary_lr.optim` are pure functions of
arrays: every intermediate is a new array, which on the CPU means a fresh,
page-faulted allocation per operation (seven for an RMSprop step), and made
``ProjUNN``'s RMSprop step 1.4x slower than ``torch.optim.RMSprop``'s whole
step at n = 512. These are the same rules written with torch's fused
operations (``addcmul_``, ``lerp``, ``out=``): two or three new tensors per
step and the same numbers to rounding. They still leave the old state
untouched, so that a step that fails changes nothing.

Only the common configurations are here; :func:`fused_direction` returns
None for the others, and the optimizer falls back to the generic rule.
"""

from __future__ import annotations

import torch

from ..optim import SGD, Adam, RMSprop

__all__ = ["fused_direction"]


def fused_direction(rule, grad, param, state, *, mode, weight_decay):
    """(D, new state) as ``rule.direction`` gives them, or None when this
    configuration has no fused form."""
    if weight_decay and rule.weight_decay != 0:
        return None
    if grad.is_complex() and mode != "modulus":
        return None
    if isinstance(rule, RMSprop) and not rule.centered and rule.momentum == 0:
        return _rmsprop(rule, grad, state)
    if isinstance(rule, Adam):
        return _adam(rule, grad, state)
    if isinstance(rule, SGD) and rule.momentum == 0:
        return grad, state
    return None


def _add_square(target, grad, weight):
    """target += weight |grad|^2, in place (|g|^2 per entry for complex g)."""
    if grad.is_complex():
        target.addcmul_(grad.real, grad.real, value=weight).addcmul_(grad.imag, grad.imag, value=weight)
    else:
        target.addcmul_(grad, grad, value=weight)
    return target


def _rmsprop(rule, grad, state):
    square_avg = _add_square(torch.mul(state["square_avg"], rule.alpha), grad, 1 - rule.alpha)
    denominator = torch.sqrt(square_avg).add_(rule.eps)
    if grad.is_complex():
        direction = grad / denominator
    else:
        direction = torch.div(grad, denominator, out=denominator)
    return direction, {**state, "square_avg": square_avg}


def _adam(rule, grad, state):
    beta1, beta2 = rule.betas
    step = state["step"] + 1
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = _add_square(torch.mul(state["exp_avg_sq"], beta2), grad, 1 - beta2)
    # a tensor step (capturable groups) stays on the device: no math.sqrt
    denominator = torch.sqrt(exp_avg_sq).div_((1 - beta2**step) ** 0.5).add_(rule.eps)
    denominator.mul_(1 - beta1**step)
    if exp_avg.is_complex():
        direction = exp_avg / denominator
    else:
        direction = torch.div(exp_avg, denominator, out=denominator)
    return direction, {**state, "step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
