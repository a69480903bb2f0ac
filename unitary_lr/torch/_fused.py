"""Fused base-rule updates for torch tensors (floor 6, private).

The framework-free rules in :mod:`unitary_lr.optim` are pure functions of
arrays: every intermediate is a new array, which on the CPU means a fresh,
page-faulted allocation per operation (seven for an RMSprop step), and made
``ProjUNN``'s RMSprop step 1.4x slower than ``torch.optim.RMSprop``'s whole
step at n = 512. These are the same rules written with torch's fused
operations (``addcmul_``, ``lerp``, ``out=``) and the same numbers to
rounding. They leave the old state untouched, so that a step that fails
changes nothing.

Without ``scratch`` (a GPU's eager optimizer) the new moments and the
direction are new tensors, which a GPU's caching allocator serves from the
blocks the last step freed; the new state replaces the old one.

With ``scratch`` (the eager optimizer on the CPU, where the C library returns
a freed n x n block to the system and the next step page-faults it back:
about 500 faults per step at n = 512, float64) nothing is allocated: the new
moments and the direction are written into buffers that the caller keeps
from step to step, and ``commit()``, called once the step is certain,
exchanges the storages of the state's moments and their buffers
(:func:`_swap_storages`). The state's tensors keep their identity and show
the new values, as torch.optim's in-place updates do, at no pass: the
moments are computed once (before, a commit recomputed them in place, two
more passes over the state). The price is memory: the buffers hold one n x n
tensor per moment and one for the direction between steps.

Only the common configurations are here; :func:`fused_direction` returns
None for the others, and the optimizer falls back to the generic rule.
"""

from __future__ import annotations

import math

import array_api_compat.torch
import numpy as np
import torch

from ..optim import SGD, Adam, RMSprop, step_count

__all__ = ["fused_direction"]


def fused_direction(rule, grad, param, state, *, mode, weight_decay, scratch=None):
    """(D, new state) as ``rule.direction`` gives them, or None when this
    configuration has no fused form. With ``scratch`` (a dict the caller
    keeps for this parameter): (D, new state, commit), where D and the new
    moments live in ``scratch``'s buffers, the new state holds the old
    tensors, and ``commit()`` gives those tensors the new values (None for a
    rule without moments)."""
    if weight_decay and rule.weight_decay != 0:
        return None
    if grad.is_complex() and mode != "modulus":
        return None
    if isinstance(rule, RMSprop) and not rule.centered and rule.momentum == 0:
        return _rmsprop(rule, grad, state, scratch)
    if isinstance(rule, Adam) and (not rule.amsgrad or "max_exp_avg_sq" in state):
        # (amsgrad turned on after the state was made: the generic rule adds the entry)
        return _adam(rule, grad, state, scratch)
    if isinstance(rule, SGD) and rule.momentum == 0:
        direction = torch.neg(grad, out=_buffer(scratch, "direction", grad)) if rule.maximize else grad
        return (direction, state) if scratch is None else (direction, state, None)
    return None


def _buffer(scratch, key, like):
    """``scratch[key]``, a tensor of ``like``'s shape, dtype, device and
    layout, made on first use (or when ``like`` changed: a loaded state);
    None without ``scratch``, where the result is a new tensor (``out=None``)."""
    if scratch is None:
        return None
    buffer = scratch.get(key)
    if (buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype
            or buffer.device != like.device or buffer.stride() != like.stride()):
        buffer = scratch[key] = torch.empty_like(like)
    return buffer


def _swap_storages(a, b):
    """Exchange the data of a and b (same shape, dtype, device and layout)
    without copying: each tensor object keeps its identity and takes the
    other's storage. Views taken of either before the swap stay on the old
    storage."""
    storage, offset, shape, stride = a.untyped_storage(), a.storage_offset(), a.shape, a.stride()
    a.set_(b)
    b.set_(storage, offset, shape, stride)


def _committer(state, scratch, keys):
    def commit():
        for key in keys:
            _swap_storages(state[key], scratch[key])
    return commit


def _add_square(target, grad, weight):
    """target += weight |grad|^2, in place (|g|^2 per entry for complex g)."""
    if grad.is_complex():
        target.addcmul_(grad.real, grad.real, value=weight).addcmul_(grad.imag, grad.imag, value=weight)
    else:
        target.addcmul_(grad, grad, value=weight)
    return target


def _overflow_as_nan(denominator):
    """The denominator with +-Inf (a moment whose squares overflowed; -Inf
    where it was negated to maximize) made NaN,
    in place: the quotient is then NaN there, which the step's checks see,
    where it would be a silent 0 in this step and every later one (the
    moment stays Inf)."""
    return denominator.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)


def _quotient(numerator, denominator, out=None):
    """numerator / denominator (a real denominator), into the denominator's
    buffer where the dtypes allow. A complex numerator goes into ``out``
    where given (the CPU): as ``numerator * (1 / denominator)`` with the
    reciprocal made complex first, 4.5x faster there than the mixed division,
    which casts and divides per entry (3.5 against 0.78 ms at n = 1024,
    complex64); the same to rounding. Else new."""
    if not numerator.is_complex():
        return torch.div(numerator, denominator, out=denominator)
    if out is None:
        return numerator / denominator
    return out.copy_(torch.reciprocal(denominator, out=denominator)).mul_(numerator)


# torch parallelises an elementwise operation over tensors of at least this
# many entries (``at::internal::GRAIN_SIZE``) when it has more than one thread.
_GRAIN_SIZE = 32768


def _sqrt(x, out):
    """``torch.sqrt(x, out=out)``; in the CPU's eager step (``out`` a buffer on
    the CPU) NumPy's square root on the same memory, where torch's would run
    on one thread.

    The CPU build of torch (2.13, AVX2) computes a square root 2-3x slower
    than NumPy does, and not correctly rounded: at 512 x 512 on one thread,
    180 against 104 us in float32 (a multiplication takes 40 us), 1.0 ms
    against 0.38 ms in float64, with errors up to 0.75 ulp where NumPy's
    (the processor's own instruction) is correctly rounded. The denominators
    of RMSprop and Adam are one such root per step. With several threads
    torch splits a large tensor between them and NumPy would not, so there
    torch keeps it."""
    if (out is None or not out.is_cpu or not x.is_cpu
            or (torch.get_num_threads() > 1 and x.numel() >= _GRAIN_SIZE) or torch.compiler.is_compiling()):
        return torch.sqrt(x, out=out)
    np.sqrt(x.numpy(), out=out.numpy())
    return out


def _rmsprop(rule, grad, state, scratch):
    old = state["square_avg"]
    square_avg = _add_square(torch.mul(old, rule.alpha, out=_buffer(scratch, "square_avg", old)), grad, 1 - rule.alpha)
    denominator = _sqrt(square_avg, _buffer(scratch, "denominator", old)).add_(rule.eps)
    if rule.maximize:  # -g / d as g / (-d): the moments see g^2 either way
        denominator.neg_()
    denominator = _overflow_as_nan(denominator)
    direction = _quotient(grad, denominator, out=_buffer(scratch, "direction", grad) if grad.is_complex() else None)
    if scratch is None:
        return direction, {**state, "square_avg": square_avg}
    return direction, dict(state), _committer(state, scratch, ("square_avg",))


def _adam(rule, grad, state, scratch):
    beta1, beta2 = rule.betas
    step = state["step"] + 1
    old_avg, old_sq = state["exp_avg"], state["exp_avg_sq"]
    if rule.maximize:  # the moment of -g, as torch.optim keeps it: beta1 m - (1 - beta1) g, one pass more
        exp_avg = torch.mul(old_avg, beta1, out=_buffer(scratch, "exp_avg", old_avg)).sub_(grad, alpha=1 - beta1)
    else:
        exp_avg = torch.lerp(old_avg, grad, 1 - beta1, out=_buffer(scratch, "exp_avg", old_avg))
    exp_avg_sq = _add_square(torch.mul(old_sq, beta2, out=_buffer(scratch, "exp_avg_sq", old_sq)), grad, 1 - beta2)
    moments = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second = exp_avg_sq
    if rule.amsgrad:
        old_max = state["max_exp_avg_sq"]
        second = moments["max_exp_avg_sq"] = torch.maximum(old_max, exp_avg_sq,
                                                           out=_buffer(scratch, "max_exp_avg_sq", old_max))
    root = _sqrt(second, _buffer(scratch, "denominator", old_sq))
    # (sqrt(v) / sqrt(1 - beta2^t) + eps) (1 - beta1^t), in two passes; a
    # tensor step (capturable groups) stays on the device: no math.sqrt
    t = step_count(array_api_compat.torch, step, grad)
    bias1 = 1 - beta1**t
    denominator = root.mul_(bias1 / (1 - beta2**t) ** 0.5).add_(rule.eps * bias1)
    direction = _quotient(exp_avg, _overflow_as_nan(denominator),
                          out=_buffer(scratch, "direction", exp_avg) if exp_avg.is_complex() else None)
    if scratch is None:
        return direction, {**state, "step": step, **moments}
    return direction, {**state, "step": step}, _committer(state, scratch, tuple(moments))
