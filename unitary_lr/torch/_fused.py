"""Fused base-rule updates for torch tensors (floor 6, private).

The framework-free rules in :mod:`unitary_lr.optim` are pure functions of
arrays: every intermediate is a new array, which on the CPU means a fresh,
page-faulted allocation per operation (seven for an RMSprop step), and made
``ProjUNN``'s RMSprop step 1.4x slower than ``torch.optim.RMSprop``'s whole
step at n = 512. These are the same rules written with torch's fused
operations (``addcmul_``, ``lerp``, ``out=``): two or three new tensors per
step and the same numbers to rounding. They leave the old state untouched,
so that a step that fails changes nothing. With ``deferred=True`` (the eager
optimizer on the CPU) no new state tensor is made at all: the new moments are formed in
the direction's own buffer, and a commit function, called once the step is
certain, writes them into the state in place with the same operations (the
same values, bit for bit). That leaves one new tensor per step, as
``torch.optim.RMSprop`` makes: with two (a new state and the direction), the
C library returned both to the system after every step on the CPU, and the
next step page-faulted them back (about 500 faults, a third of a
``ProjUNN(base="rmsprop")`` step at n = 512, float64). A GPU's caching
allocator reuses freed blocks, so there the optimizer keeps the new state
tensors, which cost no pass, where the commit costs two.

Only the common configurations are here; :func:`fused_direction` returns
None for the others, and the optimizer falls back to the generic rule.
"""

from __future__ import annotations

import math

import torch

from ..optim import SGD, Adam, RMSprop

__all__ = ["fused_direction"]


def fused_direction(rule, grad, param, state, *, mode, weight_decay, deferred=False):
    """(D, new state) as ``rule.direction`` gives them, or None when this
    configuration has no fused form. With ``deferred``: (D, new state,
    commit), where the new state holds the old tensors and ``commit()``
    writes their new values into them in place (None for a rule without
    moments)."""
    if weight_decay and rule.weight_decay != 0:
        return None
    if grad.is_complex() and mode != "modulus":
        return None
    if isinstance(rule, RMSprop) and not rule.centered and rule.momentum == 0:
        return _rmsprop(rule, grad, state, deferred)
    if isinstance(rule, Adam):
        return _adam(rule, grad, state, deferred)
    if isinstance(rule, SGD) and rule.momentum == 0:
        return (grad, state, None) if deferred else (grad, state)
    return None


def _add_square(target, grad, weight):
    """target += weight |grad|^2, in place (|g|^2 per entry for complex g)."""
    if grad.is_complex():
        target.addcmul_(grad.real, grad.real, value=weight).addcmul_(grad.imag, grad.imag, value=weight)
    else:
        target.addcmul_(grad, grad, value=weight)
    return target


def _overflow_as_nan(denominator):
    """The denominator with +Inf (a moment whose squares overflowed) made NaN,
    in place: the quotient is then NaN there, which the step's checks see,
    where it would be a silent 0 in this step and every later one (the
    moment stays Inf)."""
    return denominator.nan_to_num_(nan=math.nan, posinf=math.nan)


def _quotient(numerator, denominator):
    """numerator / denominator, into the denominator's buffer where the
    dtypes allow (a complex numerator over a real denominator does not)."""
    if numerator.is_complex():
        return numerator / denominator
    return torch.div(numerator, denominator, out=denominator)


def _rmsprop(rule, grad, state, deferred):
    square_avg = _add_square(torch.mul(state["square_avg"], rule.alpha), grad, 1 - rule.alpha)
    if not deferred:
        direction = _quotient(grad, _overflow_as_nan(torch.sqrt(square_avg).add_(rule.eps)))
        return direction, {**state, "square_avg": square_avg}
    direction = _quotient(grad, _overflow_as_nan(square_avg.sqrt_().add_(rule.eps)))  # the new average's buffer

    def commit():
        _add_square(state["square_avg"].mul_(rule.alpha), grad, 1 - rule.alpha)

    return direction, dict(state), commit


def _adam(rule, grad, state, deferred):
    beta1, beta2 = rule.betas
    step = state["step"] + 1
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = _add_square(torch.mul(state["exp_avg_sq"], beta2), grad, 1 - beta2)
    # a tensor step (capturable groups) stays on the device: no math.sqrt
    root = exp_avg_sq.sqrt_() if deferred else torch.sqrt(exp_avg_sq)
    denominator = root.div_((1 - beta2**step) ** 0.5).add_(rule.eps)
    denominator.mul_(1 - beta1**step)
    direction = _quotient(exp_avg, _overflow_as_nan(denominator))
    if not deferred:
        return direction, {**state, "step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def commit():
        state["exp_avg"].lerp_(grad, 1 - beta1)
        _add_square(state["exp_avg_sq"].mul_(beta2), grad, 1 - beta2)

    return direction, {**state, "step": step}, commit
