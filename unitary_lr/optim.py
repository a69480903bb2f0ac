"""Framework-free projUNN optimizer.

The pieces every adapter shares:

* base rules (:class:`SGD`, :class:`RMSprop`, :class:`Adam`) that turn a
  gradient into a Euclidean step direction D, the plain update being
  ``W - lr * D``. They follow ``torch.optim``'s definitions (the projUNN
  reference is a PyTorch code), except that the second moment of a complex
  gradient is ``|g|^2`` per entry (``mode="modulus"``, as optax keeps it;
  ``mode="components"`` keeps torch.optim's one per real and imaginary part),
  and are pure functions of arrays: no in-place
  writes, so the same code serves PyTorch tensors, JAX arrays and NumPy arrays;
* :func:`unitary_update`: for a unitary parameter, D is sketched to rank k and
  applied with a projUNN step, and every ``drift_check_every`` steps a cheap
  estimate of ``||W^H W - I||`` triggers a dense re-projection;
* :class:`ProjUNN`: an optimizer object for NumPy/CuPy (or any Array API)
  training loops, ``W = opt.step(W, G)``, and ``opt.step_many`` for several
  matrices with one host round trip per shape.

The torch and optax adapters are thin shells over these.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import numpy as np
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import NamedTuple

from ._cores import add_lowrank
from ._host import from_host, is_traced, outside_torch_graph, own_transfers, stack_pays, staged
from ._random import as_generator, generator_from_state, generator_state, host_normal
from ._validation import (check_choice, check_factor_pair, check_finite, check_float_dtype, check_int, check_matrix,
                          check_real_gradient, check_real_scalar, describe, finite_flag, namespace_of,
                          nonempty_factors)
from ._xp import (complex_dtype, device, device_key, dtype_name, dtype_name_of, exact_products, is_complex,
                  known_namespace, mH, namespace, real_dtype)
from .options import (  # the defaults live with the options; re-exported here
    DEFAULT_BASE,
    DEFAULT_LR,
    DEFAULT_RANK,
    DEFAULT_VARIANT,
    DriftControl,
    OPTION_NAMES,
    ProjUNNOptions,
    drift_check_due,
    step_rank,
)
from .steps import (
    STEP_OVERSAMPLE,
    STEP_POWER_ITERS,
    projunn_update_stacked,
    sketch_draw,
    sketch_shape,
    update_drawn,
    update_seeded,
    update_stacked_drawn,
)

__all__ = ["DEFAULT_BASE", "DEFAULT_LR", "DEFAULT_RANK", "DEFAULT_VARIANT", "SGD", "Adam", "ProjUNN", "RMSprop",
           "control_drift", "make_rule", "step_drift", "step_rank", "unitary_factors", "unitary_factors_stacked", "unitary_update"]


# How the second moment of a complex gradient is formed. "modulus": |g|^2 per
# entry, a real state; invariant to the phase of each entry, and what a unitary
# parameter gets. "components": torch.optim's treatment of a complex parameter
# as a pair of real ones, (Re g)^2 + i (Im g)^2 in a complex state; what the
# torch adapter gives ordinary complex parameters, to match torch.optim exactly.
COMPLEX_MODES = ("modulus", "components")


def _complex(xp, re, im):
    ctype = complex_dtype(xp, re.dtype)
    return xp.astype(re, ctype) + xp.astype(im, ctype) * 1j


def _componentwise(xp, x, mode):
    return mode == "components" and is_complex(xp, x.dtype)


def _square(xp, g, mode):
    if not is_complex(xp, g.dtype):
        return g * g
    if mode == "modulus":
        return xp.real(g * xp.conj(g))
    re, im = xp.real(g), xp.imag(g)
    return _complex(xp, re * re, im * im)


def _second_moment_zeros(xp, param, mode):
    if is_complex(xp, param.dtype) and mode == "modulus":
        return xp.zeros_like(xp.real(param))
    return xp.zeros_like(param)


def _root_plus(xp, v, scale, eps, mode):
    """sqrt(v) / scale + eps, per component for a "components" complex state;
    NaN where it is Inf (a moment whose squares overflowed): the quotient is
    then NaN, which the step's checks see, where ``g / Inf`` would be a silent
    0 in this step and every later one (the moment stays Inf). ``d + (d - d)``
    is d itself wherever d is finite."""
    if _componentwise(xp, v, mode):
        return _complex(xp, _inf_as_nan(xp.sqrt(xp.real(v)) / scale + eps),
                        _inf_as_nan(xp.sqrt(xp.imag(v)) / scale + eps))
    return _inf_as_nan(xp.sqrt(v) / scale + eps)


def _inf_as_nan(d):
    return d + (d - d)


def _divide(xp, g, denominator, mode):
    if _componentwise(xp, denominator, mode):
        return _complex(xp, xp.real(g) / xp.real(denominator), xp.imag(g) / xp.imag(denominator))
    return g / denominator


def _decayed(grad, param, weight_decay, apply):
    return grad + weight_decay * param if apply and weight_decay != 0 else grad


def _ascent(grad, maximize):
    """The gradient the rule descends: ``-grad`` to maximize (as torch.optim,
    before weight decay and the moments)."""
    return -grad if maximize else grad


def _larger(xp, a, b, mode):
    """The entrywise larger of two second moments (NaN where either is), per
    component for a "components" complex state."""
    if _componentwise(xp, a, mode):
        return _complex(xp, xp.maximum(xp.real(a), xp.real(b)), xp.maximum(xp.imag(a), xp.imag(b)))
    return xp.maximum(a, b)


def _direction_of(rule, xp, grad, param, state, scalars, counters, *, mode, weight_decay):
    """(D, new state) of ``rule``: its arithmetic (``rule._arrays``) on the
    moments it keeps in ``state``, with the Python numbers ``scalars`` (bias
    corrections), and ``counters`` into the new state; the state's other
    entries (an adapter's own) pass through."""
    moments = {key: state[key] for key in rule._moments if key in state}
    d, new = _rule_arrays(xp, grad, param, moments, scalars, rule=rule, mode=mode, weight_decay=weight_decay)
    return d, {**state, **new, **counters}


@staged("rule", "mode", "weight_decay")
def _rule_arrays(xp, grad, param, moments, scalars, *, rule, mode, weight_decay):
    """``rule._arrays``: on eager JAX arrays one compiled program (see
    ``_host.staged``), where each elementwise operation of a rule would be a
    pass over the matrix and a dispatch of its own (RMSprop at 512 x 512,
    float32: 1.9 ms of a 2.5 ms step); the scalars are arguments, not
    constants, so a new step count compiles nothing."""
    return rule._arrays(xp, grad, param, moments, scalars, mode=mode, weight_decay=weight_decay)


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``
    (``maximize`` as there).

    A pure function of arrays: ``direction(xp, grad, param, state)`` returns the
    step direction D (the plain update is ``param - lr * D``) and a new state;
    nothing is written in place.

    Examples
    --------
    >>> import numpy as np
    >>> from array_api_compat import array_namespace
    >>> from unitary_lr.optim import SGD
    >>> rule = SGD(momentum=0.9)
    >>> g = np.array([1.0, -2.0])
    >>> d, state = rule.direction(array_namespace(g), g, np.zeros(2), rule.init(array_namespace(g), g))
    >>> d.tolist(), state["momentum_buffer"].tolist()
    ([1.0, -2.0], [1.0, -2.0])
    """

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self):
        _non_negative(self, "momentum", "dampening", "weight_decay")
        _flags(self, "nesterov", "maximize")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening = 0, got momentum={self.momentum!r}, "
                f"dampening={self.dampening!r}"
            )

    @property
    def stateless(self):
        return self.momentum == 0

    def init(self, xp, param, mode="modulus"):
        return {}

    def direction(self, xp, grad, param, state, *, mode="modulus", weight_decay=True):
        """(D, new state): the plain update is ``param - lr * D``."""
        if self.momentum == 0:
            return _decayed(_ascent(grad, self.maximize), param, self.weight_decay, weight_decay), state
        return _direction_of(self, xp, grad, param, state, {}, {}, mode=mode, weight_decay=weight_decay)

    _moments = ("momentum_buffer",)

    def _arrays(self, xp, grad, param, state, scalars, *, mode, weight_decay):
        g = _decayed(_ascent(grad, self.maximize), param, self.weight_decay, weight_decay)
        buffer = state.get("momentum_buffer")
        # the first buffer is a copy: a gradient zeroed in place must not reset it
        buffer = xp.asarray(g, copy=True) if buffer is None else self.momentum * buffer + (1 - self.dampening) * g
        d = g + self.momentum * buffer if self.nesterov else buffer
        return d, {**state, "momentum_buffer": buffer}


@dataclass(frozen=True)
class RMSprop:
    """RMSprop, as ``torch.optim.RMSprop`` (eps added after the square root;
    ``maximize`` as there); a complex gradient's second moment is ``|g|^2``
    per entry, as optax keeps it (``mode="components"``: torch.optim's, one
    per real and imaginary part).

    A pure function of arrays: ``direction(xp, grad, param, state)`` returns the
    step direction D (the plain update is ``param - lr * D``) and a new state;
    nothing is written in place.

    Examples
    --------
    >>> import numpy as np
    >>> from array_api_compat import array_namespace
    >>> from unitary_lr.optim import RMSprop
    >>> rule = RMSprop(alpha=0.0, eps=0.0)
    >>> g = np.array([3.0, -0.5])
    >>> d, state = rule.direction(array_namespace(g), g, np.zeros(2), rule.init(array_namespace(g), g))
    >>> d.tolist()
    [1.0, -1.0]
    """

    alpha: float = 0.99
    eps: float = 1e-8
    centered: bool = False
    momentum: float = 0.0
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self):
        _non_negative(self, "eps", "momentum", "weight_decay")
        _flags(self, "centered", "maximize")
        _as_python_numbers(self, "alpha")
        if not _in_unit_interval(self.alpha):
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha!r}")

    stateless = False

    def init(self, xp, param, mode="modulus"):
        state = {"square_avg": _second_moment_zeros(xp, param, mode)}
        if self.centered:
            state["grad_avg"] = xp.zeros_like(param)
        if self.momentum > 0:
            state["momentum_buffer"] = xp.zeros_like(param)
        return state

    def direction(self, xp, grad, param, state, *, mode="modulus", weight_decay=True):
        return _direction_of(self, xp, grad, param, state, {}, {}, mode=mode, weight_decay=weight_decay)

    _moments = ("square_avg", "grad_avg", "momentum_buffer")

    def _arrays(self, xp, grad, param, state, scalars, *, mode, weight_decay):
        g = _decayed(_ascent(grad, self.maximize), param, self.weight_decay, weight_decay)
        square_avg = self.alpha * state["square_avg"] + (1 - self.alpha) * _square(xp, g, mode)
        new = {**state, "square_avg": square_avg}
        if self.centered:
            grad_avg = state["grad_avg"] + (1 - self.alpha) * (g - state["grad_avg"])
            new["grad_avg"] = grad_avg
            denominator = _root_plus(xp, square_avg - _square(xp, grad_avg, mode), 1.0, self.eps, mode)
        else:
            denominator = _root_plus(xp, square_avg, 1.0, self.eps, mode)
        d = _divide(xp, g, denominator, mode)
        if self.momentum > 0:
            d = self.momentum * state["momentum_buffer"] + d
            new["momentum_buffer"] = d
        return d, new


@dataclass(frozen=True)
class Adam:
    """Adam, as ``torch.optim.Adam``: L2 weight decay, or AdamW's decoupled
    decay with ``decoupled_weight_decay=True``; ``amsgrad`` and ``maximize``
    as there. A complex gradient's second moment is ``|g|^2`` per entry, as
    optax keeps it (``mode="components"``: torch.optim's, one per real and
    imaginary part).

    A pure function of arrays: ``direction(xp, grad, param, state)`` returns the
    step direction D (the plain update is ``param - lr * D``) and a new state;
    nothing is written in place. Decoupled decay is part of D: ``param - lr *
    (D_adam + weight_decay * param)`` is AdamW's ``param (1 - lr weight_decay)
    - lr D_adam``.

    Examples
    --------
    >>> import numpy as np
    >>> from array_api_compat import array_namespace
    >>> from unitary_lr.optim import Adam
    >>> rule = Adam()
    >>> g = np.array([0.3, -4.0])
    >>> d, state = rule.direction(array_namespace(g), g, np.zeros(2), rule.init(array_namespace(g), g))
    >>> d.round(6).tolist(), state["step"]
    ([1.0, -1.0], 1)
    """

    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False

    def __post_init__(self):
        _non_negative(self, "eps", "weight_decay")
        _flags(self, "amsgrad", "maximize", "decoupled_weight_decay")
        if isinstance(self.betas, (tuple, list)):
            _as_python_numbers(self, "betas")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2 or \
                not all(_in_unit_interval(b) for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    stateless = False

    def init(self, xp, param, mode="modulus"):
        state = {"step": 0, "exp_avg": xp.zeros_like(param), "exp_avg_sq": _second_moment_zeros(xp, param, mode)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = _second_moment_zeros(xp, param, mode)
        return state

    def direction(self, xp, grad, param, state, *, mode="modulus", weight_decay=True):
        beta1, beta2 = self.betas
        # (a count restored as a NumPy scalar made the bias corrections float64)
        step = python_number(state["step"]) + 1
        t = step_count(xp, step, param)
        # a count on the device (capturable optimizers) is not read on the host: no math.sqrt
        root = math.sqrt if isinstance(t, numbers.Real) else (lambda x: x**0.5)
        corrections = {"first": 1 - beta1**t, "root_second": root(1 - beta2**t)}
        return _direction_of(self, xp, grad, param, state, corrections, {"step": step}, mode=mode,
                             weight_decay=weight_decay)

    _moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _arrays(self, xp, grad, param, state, corrections, *, mode, weight_decay):
        beta1, beta2 = self.betas
        g = _ascent(grad, self.maximize)
        decoupled = self.decoupled_weight_decay
        g = _decayed(g, param, self.weight_decay, weight_decay and not decoupled)
        exp_avg = state["exp_avg"] + (1 - beta1) * (g - state["exp_avg"])
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * _square(xp, g, mode)
        new = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        second = exp_avg_sq
        if self.amsgrad:
            # a state made without amsgrad (turned on later) starts from zeros, as a new one does
            previous = state.get("max_exp_avg_sq")
            previous = xp.zeros_like(exp_avg_sq) if previous is None else previous
            second = new["max_exp_avg_sq"] = _larger(xp, previous, exp_avg_sq, mode)
        denominator = _root_plus(xp, second, corrections["root_second"], self.eps, mode)
        d = _divide(xp, exp_avg, denominator, mode) / corrections["first"]
        return _decayed(d, param, self.weight_decay, weight_decay and decoupled), new


def step_count(xp, step, param):
    """The step count t of Adam's bias corrections: a Python (or NumPy)
    number as it is; a count kept as an array (float32, as torch.optim's
    capturable Adam keeps it) in the precision of ``param``: ``1 - beta^t``
    cancels, and from a float32 t it is wrong by about 1e-5 relative in the
    first steps (beta = 0.999), far above a 64-bit parameter's rounding. The
    count itself is exact in float32 up to 2^24. For a parameter of another
    dtype (float16, bfloat16: plain parameters of a torch optimizer) the
    count is kept as it is, as torch.optim's capturable Adam keeps it: in
    float16 the count itself would be exact only up to 2^11, and
    ``1 - beta^t`` is 0 at t = 1 for beta = 0.9999."""
    if isinstance(step, numbers.Real):
        return step
    if dtype_name(xp, param.dtype) is None:
        return step
    real = real_dtype(xp, param.dtype)
    return step if step.dtype == real else xp.astype(step, real)


def _flags(rule, *names):
    for name in names:
        value = getattr(rule, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def _real(value):
    """Whether ``value`` is a real number: Python's, or NumPy's scalars (a
    np.float32 momentum was refused as not a number), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_unit_interval(value):
    """``0 <= value < 1``; False for a bool and for what does not compare
    with numbers (a string gave Python's bare TypeError). A 0-d tensor
    compares, as torch.optim takes tensor betas."""
    if isinstance(value, bool):
        return False
    try:
        return bool(0 <= value < 1)
    except (TypeError, ValueError, RuntimeError):
        return False


def python_number(value):
    """A NumPy scalar (or 0-d NumPy array) as the Python number it holds; any
    other value as it is. Kept as NumPy's, its arithmetic with the arrays
    made a float32 state float64 (NumPy's promotion of a float64 scalar) and
    another library's arrays NumPy arrays (array_api_strict)."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _as_python_numbers(rule, *names):
    for name in names:
        value = getattr(rule, name)
        if isinstance(value, (tuple, list)):
            number = type(value)(python_number(v) for v in value)
        else:
            number = python_number(value)
        object.__setattr__(rule, name, number)  # (a frozen dataclass)


def option_number(value):
    """A hyper-parameter that must be a number, as the number it holds: a
    NumPy scalar or 0-d array (:func:`python_number`), or a real 0-d array of
    another library (``torch.tensor(1e-8)``, which torch.optim takes as an
    eps and which was refused here as "not a finite number >= 0"), as
    ``check_real_scalar`` takes an lr; any other value as it is (for the
    checks to name it)."""
    value = python_number(value)
    if isinstance(value, numbers.Number) or getattr(value, "shape", None) != ():
        return value
    kind = str(getattr(value, "dtype", ""))
    if "bool" in kind or "complex" in kind:
        return value
    try:
        return value.item()
    except Exception:  # (a traced value, which holds no number yet)
        return value


def _non_negative(rule, *names):
    for name in names:
        object.__setattr__(rule, name, option_number(getattr(rule, name)))  # (a frozen dataclass)
    for name in names:
        value = getattr(rule, name)
        # (comparisons, not math.isfinite: a compiled step traces the rule's
        # checks with the options symbolic once Dynamo recompiles for them)
        if not _real(value) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


RULES = {"sgd": SGD, "rmsprop": RMSprop, "adam": Adam}
# rule class -> its hyper-parameter names (dataclass fields() builds its tuple
# on every call, and the torch optimizer makes its rules at every step); by
# class, not name: RULES is open to rules registered at run time
_RULE_FIELDS = {}


def rule_hyperparameters(base):
    """The names of the hyper-parameters the rule named ``base`` takes."""
    rule = RULES[base]
    names = _RULE_FIELDS.get(rule)
    if names is None:
        names = _RULE_FIELDS[rule] = frozenset(f.name for f in fields(rule))
    return names


def check_base(base):
    """``base``, the name of a rule of :data:`RULES`; else a ValueError that
    lists them (and, for AdamW, which users reach for, says how to get it)."""
    try:
        return check_choice("base", base, tuple(RULES))
    except ValueError as error:
        hint = ""
        if isinstance(base, str) and base.lower() == "adamw":
            hint = "; AdamW is base='adam' with decoupled_weight_decay=True (and weight_decay=0.01, AdamW's default)"
        raise ValueError(f"{error}{hint}") from None


def make_rule(base, **hyperparameters):
    """The base rule named ``base`` ("sgd", "rmsprop" or "adam") with its
    hyper-parameters; unknown names are a TypeError that lists the valid ones."""
    check_base(base)
    rule, valid = RULES[base], rule_hyperparameters(base)
    unknown = sorted(set(hyperparameters) - valid)
    if unknown:
        raise TypeError(
            f"base={base!r} takes the hyper-parameters {', '.join(sorted(valid))}; got {', '.join(map(repr, unknown))}"
        )
    if "betas" in hyperparameters:
        hyperparameters["betas"] = _betas_pair(hyperparameters["betas"])
    return rule(**hyperparameters)


def _betas_pair(betas):
    """``betas`` as a tuple where it is an ordered sequence of them (a list,
    or a 1-d array); anything else as it is, for :class:`Adam` to refuse
    with its value shown (a float was Python's bare "'float' object is not
    iterable", and a set was taken in its own order)."""
    if isinstance(betas, (tuple, list)) or getattr(betas, "ndim", None) == 1:
        return tuple(betas)
    return betas


def rule_state_keys(rule):
    """The entries of a matrix's state under ``rule`` after a step (those it
    makes at its first step too, as SGD's momentum buffer), from a step of a
    1 x 1 host matrix; remembered per rule."""
    try:
        return _state_keys(rule)
    except TypeError:  # a rule with an option that has no hash
        return _state_keys.__wrapped__(rule)


@functools.lru_cache(maxsize=64)
def _state_keys(rule):
    import array_api_compat.numpy as host

    # the options as Python numbers: a tensor's (torch.optim takes tensor
    # betas) met the host's arrays and failed ("Concatenation operation is
    # not implemented for NumPy arrays")
    rule = type(rule)(**{f.name: _host_option(getattr(rule, f.name)) for f in fields(rule)})
    one = host.ones((1, 1))
    return frozenset(rule.direction(host, one, one, rule.init(host, one))[1])


def _host_option(value):
    if isinstance(value, (tuple, list)):
        return type(value)(_host_option(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return float(value)


def rule_options(base, options):
    """The entries of ``options`` (for example a torch param group) that the
    rule named ``base`` takes."""
    valid = rule_hyperparameters(base)
    return {key: value for key, value in options.items() if key in valid}


def unitary_update(
    xp,
    W,
    direction,
    *,
    lr,
    rank,
    variant,
    rng,
    step,
    oversample=STEP_OVERSAMPLE,
    power_iters=STEP_POWER_ITERS,
    drift_tol=None,
    drift_check_every=50,
    reproject="svd",
    add_in_place=None,
    seed=None,
):
    """One projUNN step of a unitary parameter along ``-lr * direction``, with
    drift control.

    ``direction`` is a dense (..., n, m) array or a pair (a, b) meaning a b^H.
    ``rank`` is capped at min(n, m) (None:
    :data:`unitary_lr.options.DEFAULT_RANK`, capped). Every
    ``drift_check_every`` steps (0: never) :func:`~unitary_lr.unitarity_estimate` measures
    the drift from the group and, above ``drift_tol`` (None: :func:`default_drift_tolerance` of W's dtype), W is
    re-projected with :func:`~unitary_lr.project_unitary` (``reproject`` = "svd" or
    "newton_schulz"); so is it after the first step (``step`` = 1), with
    probes seeded by ``seed`` (see :func:`step_drift`). ``add_in_place(L, Rh)``, when given, must add ``L @ Rh``
    to W in place (an optimizer that owns W's memory): the step then writes no
    new n x n array. Returns ``(new W, re-projected?)``; the new W is W itself
    when it was updated in place and not re-projected.

    ``xp`` is W's array namespace (``array_api_compat.array_namespace(W)``,
    or the namespace W's own ``__array_namespace__()`` gives), and ``step``
    the matrix's step number, an integer >= 1 (1 for its first step); else a
    TypeError or ValueError naming them, before anything is drawn. ``lr = 0``
    leaves W where it is, but the step counts: its drift checks run as at any
    other step (after the first step, then every ``drift_check_every``), as
    in the torch optimizer, so a W given in another precision is re-projected
    after its first step whatever the lr (a schedule that starts at 0 skipped
    that check).
    """
    step = _check_step(step)
    _check_namespace(xp, W)
    if lr != 0:
        factors = unitary_factors(W, direction, lr=lr, rank=rank, variant=variant, rng=rng, oversample=oversample,
                                  power_iters=power_iters)
        if add_in_place is None:
            W = add_lowrank(xp, W, *factors)
        else:
            add_in_place(*factors)
    return step_drift(xp, W, step=step, rng=rng, seed=seed, drift_tol=drift_tol,
                      drift_check_every=drift_check_every, reproject=reproject)


def _check_step(step):
    """A matrix's step number, an integer >= 1, as a Python int (a string
    failed in the drift schedule's ``step % every``, "not all arguments
    converted during string formatting")."""
    if type(step) is int and step >= 1:  # (the common case, at no cost)
        return step
    return check_int("step", step, minimum=1)


def _check_namespace(xp, W):
    """A TypeError naming ``xp`` where it is not W's array namespace: a
    string (``xp="numpy"``) failed deep in the step ("'str' object has no
    attribute 'float32'"), and another library's namespace on its arrays
    ("'numpy.ndarray' object has no attribute 'is_cpu'"). W's own
    ``__array_namespace__()`` (``numpy`` for a NumPy array) is W's namespace
    too. A W that is not an array is a TypeError naming W."""
    if xp is not None and xp is known_namespace(W):  # (the common case, a lookup)
        return
    expected = namespace_of(W=W)
    if xp is expected:
        return
    try:
        own = W.__array_namespace__()
    except Exception:  # (none, or one that refuses)
        own = None
    if own is not None and xp is own:
        return
    given = f"module {xp.__name__}" if inspect.ismodule(xp) else f"{type(xp).__name__}: {describe(xp)}"
    name = getattr(expected, "__name__", expected)
    raise TypeError(f"xp must be the array namespace of W, {name} for a {type(W).__module__}.{type(W).__name__} "
                    f"(array_api_compat.array_namespace(W)), got {given}")


@exact_products
def unitary_factors(W, direction, *, lr, rank, variant, rng, oversample=STEP_OVERSAMPLE,
                    power_iters=STEP_POWER_ITERS, arrays_checked=False):
    """The projUNN step of W along ``-lr * direction`` as thin factors (L, Rh):
    the new W is ``W + L @ Rh``. Nothing is changed; errors (NaN/Inf in the
    direction or in W, a W that is not unitary) are raised here.
    ``arrays_checked``: W and direction need no checks of their own (see
    ``steps.update_drawn``)."""
    return update_seeded(W, direction, rng, lr=lr, rank=capped_rank(rank, W.shape), variant=variant,
                         oversample=oversample, power_iters=power_iters, arrays_checked=arrays_checked)


def capped_rank(rank, shape):
    """The rank of the steps of a matrix of ``shape`` (..., n, m): ``rank``
    (None: :func:`step_rank`'s default) capped at min(n, m)."""
    return min(step_rank(rank, shape), *shape[-2:])


def unitary_factors_stacked(Ws, directions, *, lr, rank, variant, rngs, oversample=STEP_OVERSAMPLE,
                            power_iters=STEP_POWER_ITERS):
    """:func:`unitary_factors` of P matrices of one shape, dtype and device in
    one batched step (see ``steps.projunn_update_stacked``): a list of P pairs
    (L, Rh), the p-th sketch drawn from ``rngs[p]``."""
    return projunn_update_stacked(Ws, directions, lr=lr, rank=capped_rank(rank, Ws[0].shape),
                                  variant=variant, oversample=oversample, power_iters=power_iters, rngs=rngs)


# Probe vectors of a drift estimate (unitarity_estimate's default).
_PROBES = 4


def control_drift(xp, W, *, step, rng, drift_tol=None, drift_check_every=50, reproject="svd", probes=None):
    """Every ``drift_check_every`` steps, re-project W when a probe estimate of
    its drift from the group is above ``drift_tol``. Returns (W, re-projected?).
    The probe vectors are drawn from ``rng``, or given as ``probes``, the host
    draw ``drift_probes`` made beforehand."""
    step = _check_step(step)
    # decided before the policy is made: most steps check nothing
    if not drift_check_due(step, drift_check_every):
        return W, False
    policy = DriftControl(ProjUNNOptions(drift_tol=drift_tol, drift_check_every=drift_check_every,
                                         reproject=reproject), xp)
    if probes is None:
        probes = drift_probes(xp, W, rng)
    with own_transfers(xp):  # (JAX: the comparison with the tolerance sends it)
        return policy.apply(W, from_host(xp, probes, dtype=W.dtype, device=device(W)))


def step_drift(xp, W, *, step, rng, seed, drift_tol=None, drift_check_every=50, reproject="svd", probes=None,
               first=None):
    """:func:`control_drift` after a matrix's step number ``step``, and after
    its first step too (unless checks are off): a W marked or given in
    another precision (a float32 layer made float64 is 2e-7 from unitary,
    1e5 times float64's tolerance) would keep that error for
    ``drift_check_every`` steps. ``first`` (default: ``step == 1``) says
    whether this step counts as a first one (a front end that knows the
    matrix's precision changed says so). The first step's extra check draws
    its probes from a stream of its own, seeded by ``seed`` (an int, or None
    for 0), so the sketches' stream ``rng`` is left as it is."""
    step = _check_step(step)
    first = step == 1 if first is None else first
    if first and drift_check_every and not drift_check_due(step, drift_check_every):
        rng, probes, drift_check_every = np.random.default_rng([seed or 0, 2**32]), None, 1
    return control_drift(xp, W, step=step, rng=rng, drift_tol=drift_tol, drift_check_every=drift_check_every,
                         reproject=reproject, probes=probes)


def drift_probes(xp, W, rng):
    """The probe vectors of a drift check of W (:func:`control_drift`), drawn
    from ``rng`` on the host and not yet moved to W's device."""
    return host_normal(xp, (*W.shape[:-2], min(W.shape[-2:]), _PROBES), dtype=W.dtype, rng=rng)


def _stack_key(W):
    """What the matrices that :meth:`ProjUNN.step_many` steps together share:
    array type, shape, dtype and device (CuPy's devices have no hash: their
    repr stands in)."""
    return type(W), tuple(W.shape), str(W.dtype), device_key(device(W))


def _check_state_place(xp, key, state, W):
    """A TypeError naming the key where its state's arrays are not of W's
    library and device (a state loaded from a run on another device): the
    rule's arithmetic failed in the library's words ("Arrays from two
    different devices can not be combined")."""
    # (a moment, not a count: Adam's step restored as a NumPy number is one of any library)
    moment = next((value for value in state.values() if getattr(value, "ndim", 0) > 0), None)
    if moment is None or (namespace(moment) is xp and device(moment) == device(W)):
        return
    raise TypeError(
        f"the optimizer's state under key={key!r} holds {type(moment).__module__}.{type(moment).__name__} arrays on "
        f"device {device(moment)!r}, but W is a {type(W).__module__}.{type(W).__name__} on device {device(W)!r}; "
        "convert the state's arrays to W's library and device before load_state_dict (or step this W under "
        "another key)"
    )


def _eps_vanishes(eps, dtype):
    """(why, smallest normal number of ``dtype``) where ``eps`` (a number,
    or None for a rule without one) is 0 in the arithmetic of the floating
    dtype named ``dtype``: 0 itself or rounded to 0, or subnormal (flushed
    to 0 where subnormals are, as by JAX on the CPU); None where it is not."""
    if eps is None:
        return None
    try:
        info = np.finfo(np.dtype(dtype))
    except TypeError:  # a dtype NumPy does not know
        return None
    if float(np.asarray(eps, dtype=info.dtype)) == 0:
        return f"is 0 in {dtype}", float(info.tiny)
    if eps < info.tiny:
        return f"is subnormal in {dtype}, 0 where subnormals are flushed to zero", float(info.tiny)
    return None


def _in_dtype_of(xp, G, W):
    """G in W's dtype where G's would promote W's (a float64 G of a float32
    W): the rule's moments and the plain update ``W - lr * D`` then keep W's
    dtype, as the unitary step's result does and as torch.optim keeps a
    parameter's state. (A plain update came back float64, and its next
    step was refused as another matrix's.) A finite G that overflows W's
    dtype is a ValueError."""
    if G.dtype == W.dtype or xp.result_type(W.dtype, G.dtype) == W.dtype:
        return G
    with np.errstate(over="ignore"):  # (NumPy warns of the overflow checked here)
        cast = xp.astype(G, W.dtype)
    if not is_traced(G) and not bool(finite_flag(xp, cast)) and bool(finite_flag(xp, G)):
        raise ValueError(
            f"G is too large for W's dtype {dtype_name_of(W.dtype)} (G has dtype {dtype_name_of(G.dtype)}, "
            f"largest |entry| {float(xp.max(xp.abs(G))):.3g}); scale the gradient (or the loss) down"
        )
    return cast


class _Prepared(NamedTuple):
    """A checked step of :class:`ProjUNN`, its direction computed, not yet taken."""

    xp: object
    W: object
    G: object  # the gradient (an array, or factors (a, b))
    direction: object  # an array, or factors (a, b)
    state: dict  # the rule's new state
    slot: dict  # the key's slot before this step
    signature: tuple


@contextmanager
def _naming(key):
    """Errors of :meth:`ProjUNN.step_many` name the key of the matrix."""
    try:
        yield
    except (TypeError, ValueError) as error:
        kind = TypeError if isinstance(error, TypeError) else ValueError
        raise kind(f"steps[{key!r}]: {error}") from None


# why the framework-free optimizer's steps run outside a torch.compile graph
_OUTSIDE_GRAPH = ("it draws its sketches from NumPy generators and reads small matrices and drift estimates on the "
                  "host; in a graph use unitary_lr.torch.ProjUNN(..., capturable=True)")


class ProjUNN:
    r"""projUNN optimizer for training loops written with NumPy, CuPy or any
    Array API library: ``W = opt.step(W, G)``.

    Parameters
    ----------
    lr : float, optional
        Learning rate, >= 0 (default 1e-2,
        :data:`unitary_lr.options.DEFAULT_LR`). The step of a unitary W is
        ``-lr`` times the base rule's direction, sketched to rank ``rank``:
        with rmsprop or adam each entry of that direction is about 1 in size,
        whatever n. See "Choosing lr and rank" in the documentation. At
        ``lr = 0`` (the start of a warm-up schedule) W stays where it is, but
        the step counts, as in :class:`unitary_lr.torch.ProjUNN`: the rule's
        moments advance, NaN/Inf in G is refused, and the drift checks run
        on their schedule (after a matrix's first step, then every
        ``drift_check_every``), so a W given in another precision is
        re-projected after its first step at any lr, as in
        :func:`unitary_lr.optax.projunn`. (:func:`unitary_lr.projunn_step`
        takes an lr > 0 only.)
    base : {"rmsprop", "adam", "sgd"}, optional
        The rule that turns gradients into a Euclidean step (preconditioned, as
        in the projUNN paper), with ``torch.optim``'s definitions, except that
        a complex W's second moment is ``|g|^2`` per entry, also with
        ``unitary=False`` (as optax's; torch.optim keeps one per real and
        imaginary part).
    rank : int or None, optional
        Rank k of the unitary updates, >= 1, capped at min(n, m) of each W:
        one optimizer serves matrices of every size (the torch optimizer and
        the optax transformation, whose parameters are known when they are
        made, refuse a rank above min(n, m) instead). None:
        :data:`unitary_lr.options.DEFAULT_RANK` (8), capped at min(n, m).
    unitary : bool, optional
        True: W is kept unitary (orthogonal if real) with projUNN steps.
        False: the plain base-rule update ``W - lr * D`` (any shape).
    variant, oversample, power_iters
        Options of :func:`unitary_lr.projunn_step`.
    drift_tol : float or None, optional
        Re-projection threshold for ``||W^H W - I||_F / sqrt(n)``; None: 1e-5
        for 32-bit dtypes, 1e-12 for 64-bit ones.
    drift_check_every : int, optional
        Estimate the drift every this many steps of a matrix, and after its
        first step (which re-projects a matrix given in another precision,
        such as a float32 one made float64); 0: never.
    reproject : {"svd", "newton_schulz"}, optional
        Dense polar factor used to re-project.
    seed : None or int, optional
        Seed of the sketches' random stream (fresh entropy when None). The
        stream is part of ``state_dict()``, so a resumed run repeats the steps
        of an uninterrupted one.
    foreach : bool or None, optional
        Whether :meth:`step_many` steps the unitary matrices of one shape,
        dtype and device as one batch: True always, False never, None (the
        default) on accelerators always and on the CPU for matrices of at
        most 256 KiB each (float32 256 x 256), where a step's fixed cost
        outweighs copying the matrices into a stack.
    **hyperparameters
        Of the base rule, as in ``torch.optim``: ``momentum, dampening,
        nesterov, weight_decay, maximize`` (sgd), ``alpha, eps, centered,
        momentum, weight_decay, maximize`` (rmsprop), ``betas, eps,
        weight_decay, amsgrad, maximize, decoupled_weight_decay`` (adam; the
        last is AdamW's decay). Weight decay of either kind does not apply to a
        unitary W: the group is invariant to scaling.

    Raises
    ------
    ValueError
        A negative lr, an unknown base, variant or reproject, out-of-range
        hyper-parameters (e.g. ``betas`` not a pair of numbers in [0, 1)); at a step: G not of
        W's shape, NaN/Inf in G (or in W with ``unitary=False``), a W that is
        not unitary (``unitary=True``), a W of another shape or dtype than
        the one its ``key``'s state was made for, a finite G too large for
        W's dtype; a G whose rule step is not finite: squares that overflow
        the moments, or an ``eps`` that is 0 in the dtype (0/0 at a zero
        entry of G). On any error at a step the optimizer is unchanged:
        moments, step counts and the random stream.
    TypeError
        Hyper-parameters the base rule does not take; non-array W or G; a W
        or G (or a factor of G) of a dtype other than float32, float64,
        complex64 or complex128 (float16, bfloat16, bool, integers), with
        either rule and ``unitary``; an unhashable ``key``.

    Notes
    -----
    ``G`` may be a pair ``(a, b)`` meaning ``a @ b^H``. With a stateless rule
    (SGD without momentum) the pair goes to the step as it is and no n x n
    gradient is formed; a rule with state needs the dense gradient and forms it.
    The second moment of a complex gradient is ``|g|^2`` per entry. The new W
    has W's dtype, with ``unitary=False`` too: a G of a wider dtype (float64
    for a float32 W) is rounded to W's before the rule, whose moments keep
    W's dtype, as ``torch.optim``'s keep a parameter's.

    One optimizer can train several matrices: ``opt.step(W, G, key=name)``
    keeps moments and a step count per key. The optimizer cannot tell two
    matrices of one shape apart (each step returns a new array), so matrices
    that share a key share their moments; a W of another shape or dtype under
    a key already used is refused with a ValueError. :meth:`step_many` steps
    several keys at once, with one host round trip for all the matrices of
    one shape.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import random_unitary, unitarity_error
    >>> from unitary_lr.optim import ProjUNN
    >>> W = random_unitary(32, dtype="complex128", rng=0)
    >>> opt = ProjUNN(1e-2, base="adam", rank=2, seed=0)
    >>> G = np.random.default_rng(1).standard_normal((32, 32)) + 0j
    >>> for _ in range(10):
    ...     W = opt.step(W, G)
    >>> bool(unitarity_error(W) < 1e-13), opt.state_dict()["steps"]
    (True, 10)
    """

    def __init__(self, lr=DEFAULT_LR, *, base=DEFAULT_BASE, unitary=True, rank=None, variant=DEFAULT_VARIANT,
                 oversample=STEP_OVERSAMPLE, power_iters=STEP_POWER_ITERS, drift_tol=None,
                 drift_check_every=50, reproject="svd", seed=None, foreach=None, **hyperparameters):
        self.lr = check_real_scalar("lr", lr)
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be True, False or None, got {foreach!r}")
        self.foreach = foreach
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        self.rule = make_rule(base, **hyperparameters)
        self.base = base
        if not isinstance(unitary, bool):
            raise TypeError(f"unitary must be True or False, got {unitary!r}")
        self.unitary = unitary
        self.options = ProjUNNOptions(rank=rank, variant=variant, oversample=oversample, power_iters=power_iters,
                                      drift_tol=drift_tol, drift_check_every=drift_check_every,
                                      reproject=reproject, seed=seed)
        for name, value in self.options.as_dict().items():
            if name != "seed":
                setattr(self, name, value)
        self._rng = as_generator(self.options.seed, own=True)
        self.steps = 0  # successful steps, all matrices together
        self.reprojections = 0
        # per matrix key: the rule's arrays (made at its first step), its step
        # count (drift checks) and the shape and dtype they were made for
        self._slots = {}

    def __setattr__(self, name, value):
        # Options edited after construction are checked as the constructor
        # checks them: an edited base was ignored (the rule was made from the
        # first), and a bad drift_tol or reproject passed until a drift check.
        if "_slots" in self.__dict__:
            if name in ("base", "rule"):
                raise AttributeError(f"{name} is fixed when ProjUNN is made (the matrices' states are that rule's); "
                                     "make another optimizer for another base")
            if name == "lr":
                value = check_real_scalar("lr", value)
                if value < 0:
                    raise ValueError(f"lr must be >= 0, got {value!r}")
            elif name in OPTION_NAMES and name != "seed":
                current = {option: getattr(self, option) for option in OPTION_NAMES if option != "seed"}
                ProjUNNOptions(**{**current, name: value})
        object.__setattr__(self, name, value)

    @outside_torch_graph(_OUTSIDE_GRAPH, name="unitary_lr.optim.ProjUNN.step")
    @exact_products
    def step(self, W, G, /, *, key=None):
        """Return the updated W for gradient G (an array, or a pair (a, b) meaning
        a b^H); W is not modified.

        ``key`` (any hashable, default None) names the matrix: each key has its
        own base-rule state (moments) and step count, so one optimizer can train
        several matrices, ``W1 = opt.step(W1, G1, key="W1")``. A W whose shape or
        dtype differs from the one a key's state was made for is a ValueError
        (a second matrix needs its own key). On any error nothing changes: the
        state, the step counts and the sketches' random stream are as before.
        """
        # Every error below, raised before or during the step, leaves the
        # optimizer as it was, the random stream included: a run that skips a
        # bad batch then repeats one that never saw it.
        saved_rng = self._rng.bit_generator.state
        try:
            return self._step(W, G, key)
        except BaseException:
            self._rng.bit_generator.state = saved_rng
            raise

    @outside_torch_graph(_OUTSIDE_GRAPH, name="unitary_lr.optim.ProjUNN.step_many")
    @exact_products
    def step_many(self, steps, /):
        """Step several matrices at once: ``steps`` maps each matrix's key to
        its ``(W, G)`` (G an array or a pair (a, b)); returns a dict mapping
        the same keys, in the same order, to the new matrices.

        The steps are those of ``{key: opt.step(W, G, key=key) for key, (W, G)
        in steps.items()}``, to rounding, and the random stream is drawn in
        that order, so the state afterwards is the same too. But the unitary
        matrices of one shape, dtype and device with dense gradients take one
        batched step (see ``foreach``): one pass of each batched product and
        one host round trip for all of them, where separate steps make one
        each (on a GPU, a stream synchronisation each).

        Parameters
        ----------
        steps : mapping of hashable key -> (W, G)
            Each matrix's key (its state's name, as ``step``'s ``key``), its
            current value and its gradient (an array of W's shape, or a pair
            (a, b) meaning a b^H).

        Returns
        -------
        dict
            The new matrices under the same keys, in the same order; the
            inputs are not modified.

        Raises
        ------
        TypeError
            ``steps`` not a mapping, a value not a pair, or ``step``'s type
            errors, with the key named.
        ValueError
            ``step``'s errors (a G of another shape, NaN/Inf, a W that is not
            unitary, ...), with the key named: ``steps['W2']: ...``. On any
            error nothing changes: no state, step count or random draw of
            any key.

        Examples
        --------
        >>> import numpy as np
        >>> from unitary_lr import random_unitary, unitarity_error
        >>> from unitary_lr.optim import ProjUNN
        >>> rng = np.random.default_rng(0)
        >>> Ws = {f"layer{i}": random_unitary(16, dtype="float64", rng=rng) for i in range(4)}
        >>> opt = ProjUNN(1e-2, rank=2, seed=0)
        >>> grads = {key: rng.standard_normal((16, 16)) for key in Ws}
        >>> Ws = opt.step_many({key: (W, grads[key]) for key, W in Ws.items()})
        >>> list(Ws), bool(max(unitarity_error(W) for W in Ws.values()) < 1e-14)
        (['layer0', 'layer1', 'layer2', 'layer3'], True)
        """
        if not hasattr(steps, "items"):
            raise TypeError(f"steps must be a mapping key -> (W, G), got {type(steps).__name__}")
        saved = (self._rng.bit_generator.state, dict(self._slots), self.steps, self.reprojections)
        try:
            return self._step_many(steps)
        except BaseException:
            rng_state, self._slots, self.steps, self.reprojections = saved
            self._rng.bit_generator.state = rng_state
            raise

    def _step_many(self, steps):
        results, batched = {}, []
        for key, pair in steps.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"steps[{key!r}] must be a pair (W, G), got {type(pair).__name__}: {pair!r}")
            with _naming(key):
                prepared = self._prepared(*pair, key)
                if not self._batches(prepared):
                    results[key] = self._finish(prepared, key)
                    continue
                # drawn now, in the order of separate steps: the sketch, then
                # the drift check's probes when this matrix's check is due
                xp, W, direction = prepared.xp, prepared.W, prepared.direction
                shape = sketch_shape(direction, capped_rank(self.rank, W.shape), self.oversample)
                sketch = sketch_draw(xp, shape, dtype=direction.dtype, rng=self._rng)
                due = drift_check_due(prepared.slot["steps"] + 1, self.drift_check_every)
                probes = drift_probes(xp, W, self._rng) if due else None
                batched.append((key, prepared, sketch, probes))
        stacks = {}
        for entry in batched:
            W = entry[1].W
            stacks.setdefault(_stack_key(W), []).append(entry)
        for members in stacks.values():
            for (key, prepared, _, probes), factors in zip(members, self._stacked_factors(members)):
                with _naming(key):
                    new_W = add_lowrank(prepared.xp, prepared.W, *factors)
                    results[key] = self._commit(prepared, key, *step_drift(
                        prepared.xp, new_W, step=prepared.slot["steps"] + 1, rng=None, seed=self.options.seed,
                        drift_tol=self.drift_tol, drift_check_every=self.drift_check_every,
                        reproject=self.reproject, probes=probes))
        return {key: results[key] for key in steps}

    def _batches(self, prepared):
        """Whether this step goes into :meth:`step_many`'s batches: a unitary W
        with a dense direction, a nonzero lr, and ``foreach`` (or its
        default, ``_host.stack_pays``) saying yes."""
        if not self.unitary or self.lr == 0 or isinstance(prepared.direction, tuple) or self.foreach is False:
            return False
        return self.foreach or stack_pays(prepared.W)

    def _stacked_factors(self, members):
        """The factors (L, Rh) of each member's step, from its own sketch: one
        batched step for two or more; each alone for one, or to name the
        member whose step fails."""
        options = {"lr": self.lr, "rank": capped_rank(self.rank, members[0][1].W.shape), "variant": self.variant,
                   "oversample": self.oversample, "power_iters": self.power_iters}
        if len(members) > 1:
            try:
                return update_stacked_drawn([m[1].W for m in members], [m[1].direction for m in members],
                                            lambda *_: [m[2] for m in members], **options)
            except ValueError:
                pass  # stepped one by one below, which names the matrix
        factors = []
        for key, prepared, sketch, _ in members:
            with _naming(key), self._overflow_named(prepared):
                factors.append(update_drawn(prepared.W, prepared.direction, lambda *_, s=sketch: s, **options))
        return factors

    def _step(self, W, G, key):
        return self._finish(self._prepared(W, G, key), key)

    def _prepared(self, W, G, key):
        """The checks of a step and the base rule's direction, before any
        random draw; nothing is changed."""
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable (a name for the matrix), got {type(key).__name__}: {key!r}") from None
        factored = isinstance(G, tuple)
        arrays = {"W": W, "G[0]": G[0], "G[1]": G[1]} if factored and len(G) == 2 else {"W": W, "G": G}
        xp = namespace_of(**arrays)
        # Before the rule sees them: a float16, bool or integer G went into
        # the moments (in float16 the squares of small entries underflow, and
        # the step was far off), and only the kernels refused such dtypes,
        # after the rule's arithmetic; a float16 W's key recorded no dtype.
        for name, x in arrays.items():
            check_float_dtype(xp, name, x)
        # (for a plain update too, which made the real W complex, and the
        # next step failed on its state)
        for name, x in arrays.items():
            if name != "W":
                check_real_gradient(xp, W, name, x)
        # Where no projUNN kernel looks at the gradient (a plain update, or
        # lr = 0 which skips the step) its NaN/Inf would go straight into the
        # rule's moments: checked here, one reduction per array.
        if not self.unitary or self.lr == 0:
            for name, x in arrays.items():
                if name != "W" or not self.unitary:
                    check_finite(xp, name, x)
        if factored:  # checked before they are multiplied, by the kernels' own words
            check_matrix("W", W)
            check_factor_pair("G[0]", G[0], "G[1]", G[1], W.shape[-2], f"W of shape {tuple(W.shape)}",
                              b_rows=W.shape[-1])
            G = nonempty_factors(xp, *G)
        if factored and not (self.unitary and self.rule.stateless):
            G = G[0] @ mH(xp, G[1])  # the rule's state is dense: form the gradient
            factored = False
        if not factored and tuple(G.shape) != tuple(W.shape):
            raise ValueError(f"G must have the shape of W {tuple(W.shape)}, got {tuple(G.shape)}")
        if not factored:
            G = _in_dtype_of(xp, G, W)
        slot = self._slots.get(key)
        signature = (tuple(W.shape), dtype_name(xp, W.dtype))
        if slot is not None and not self.rule.stateless and slot["signature"] not in (None, signature):
            shape, dtype = slot["signature"]
            raise ValueError(
                f"W has shape {signature[0]} and dtype {signature[1]}, but the optimizer's state under "
                f"key={key!r} belongs to a W of shape {shape} and dtype {dtype}; give each matrix its own "
                "key: opt.step(W, G, key=name)"
            )
        if slot is not None:
            _check_state_place(xp, key, slot["state"], W)
        if slot is None:
            with own_transfers(xp):  # JAX's zeros send their fill value
                slot = {"signature": signature, "steps": 0, "state": self.rule.init(xp, W)}
        if factored:
            direction, state = G, slot["state"]
        else:
            direction, state = self._direction(xp, G, W, slot["state"])
            if (not self.unitary or self.lr == 0) and not self.rule.stateless \
                    and not bool(finite_flag(xp, direction)):
                # no kernel sees this direction: its moments are read here (G is finite)
                raise self._nonfinite_step(xp, G, state)
        return _Prepared(xp, W, G, direction, state, slot, signature)

    @contextmanager
    def _overflow_named(self, prepared):
        """A step's error, or, where the kernel refused a non-finite direction
        of a finite gradient, its cause in the rule (:meth:`_nonfinite_step`:
        moments whose squares overflowed, or an eps too small for the dtype;
        NumPy warns of these in the rule, other libraries do not, and the
        rule's direction is then NaN). Read on the error path only."""
        try:
            yield
        except ValueError:
            xp, G, direction = prepared.xp, prepared.G, prepared.direction
            if self.rule.stateless or isinstance(direction, tuple) or not bool(finite_flag(xp, G)) \
                    or bool(finite_flag(xp, direction)):
                raise
            raise self._nonfinite_step(xp, G, prepared.state) from None

    def _nonfinite_step(self, xp, G, state, cause=None):
        """The error of a finite G whose direction is not finite, by its
        cause: the rule's moments overflowed (Inf in ``state``, the new
        state; None: ``cause``, NumPy's warning, says whether), or an ``eps``
        that is 0 in G's dtype divided by a zero denominator (0/0 at an entry
        of G that is 0). Those were both reported as an overflow."""
        # the moments made from G alone: RMSprop's momentum buffer holds
        # directions, non-finite with them whatever the cause
        moments = [state[key] for key in self.rule._moments if key in state and not (
            key == "momentum_buffer" and isinstance(self.rule, RMSprop))] if state is not None else ()
        overflowed = ("overflow" in str(cause)) if state is None else any(
            not bool(finite_flag(xp, moment)) for moment in moments)
        if overflowed:
            return self._moments_overflow(xp, G, cause)
        dtype = dtype_name_of(G.dtype)
        cause = f"{cause}; " if cause is not None else ""
        eps = getattr(self.rule, "eps", None)
        vanishes = _eps_vanishes(eps, dtype)
        if vanishes is not None:
            why, tiny = vanishes
            return ValueError(
                f"G makes the {self.base} rule's step non-finite in {dtype} ({cause}eps={eps!r} {why}, so an entry "
                f"of G that is 0 divides 0 by 0, and one whose square underflows divides by 0); use eps > 0, at "
                f"least {tiny:.3g} in {dtype} (the default is 1e-8)"
            )
        return ValueError(f"G makes the {self.base} rule's step non-finite in {dtype} ({cause}largest |entry| "
                          f"{float(xp.max(xp.abs(G))):.3g})")

    def _moments_overflow(self, xp, G, cause=None):
        """The error of a finite G too large for the rule's moments."""
        cause = f"{cause}; " if cause is not None else ""
        return ValueError(
            f"G is too large for the {self.base} rule's moments in {dtype_name_of(G.dtype)} ({cause}largest "
            f"|entry| {float(xp.max(xp.abs(G))):.3g}: its square overflows); scale the gradient (or the loss) down"
        )

    def _finish(self, prepared, key):
        """The step itself (it draws from the random stream), recorded."""
        xp, W, direction = prepared.xp, prepared.W, prepared.direction
        if not self.unitary:
            return self._commit(prepared, key, W - self.lr * direction, False)
        with self._overflow_named(prepared):
            stepped = unitary_update(
                xp, W, direction, lr=self.lr, rank=self.rank, variant=self.variant, rng=self._rng,
                step=prepared.slot["steps"] + 1, oversample=self.oversample, power_iters=self.power_iters,
                drift_tol=self.drift_tol, drift_check_every=self.drift_check_every, reproject=self.reproject,
                seed=self.options.seed,
            )
        return self._commit(prepared, key, *stepped)

    def _commit(self, prepared, key, new_W, reprojected):
        """Records a step that succeeded (a bad gradient changes nothing);
        returns the new W."""
        self._slots[key] = {"signature": prepared.signature, "steps": prepared.slot["steps"] + 1,
                            "state": prepared.state}
        self.steps += 1
        self.reprojections += reprojected
        return new_W

    def _direction(self, xp, G, W, state):
        """The rule's (direction, new state). NumPy's arithmetic raises where a
        NaN/Inf or an overflow meets the rule's: turned into the error naming G
        (otherwise the kernel names a NaN/Inf G from its sketch, for free). An
        underflow is not an error of G. (NumPy's error state, which is the
        thread's own, not a warning filter, which is the process's: threads
        that swapped filters in and out of order left one behind.)"""
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            try:
                return self.rule.direction(xp, G, W, state, weight_decay=not self.unitary)
            except FloatingPointError as error:
                cause = error
        check_finite(xp, "G", G)
        raise self._nonfinite_step(xp, G, None, cause)

    @property
    def state(self):
        """The base rule's arrays of the matrix stepped without a key (None
        before its first step)."""
        slot = self._slots.get(None)
        return None if slot is None else slot["state"]

    def state_dict(self):
        """Everything a resumed run needs: the rule's arrays of each matrix (as
        they are), the step counts and the state of the sketches' random
        stream. ``"state"`` is the arrays of the matrix stepped without a key."""
        return {"steps": self.steps, "reprojections": self.reprojections, "state": self.state,
                "matrices": {key: dict(slot) for key, slot in self._slots.items()},
                "rng": generator_state(self._rng)}

    def load_state_dict(self, state_dict):
        """Resume from :meth:`state_dict`'s dict. Everything is read before
        anything is set: a dict that lacks an entry is a ValueError naming
        it, and the optimizer stays as it was (a bare KeyError came after
        the random stream had been replaced)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict made by ProjUNN.state_dict(), got {type(state_dict).__name__}")
        missing = [key for key in ("rng", "steps") if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(map(repr, missing))}: not a dict made by "
                             f"ProjUNN.state_dict() (it has {sorted(map(repr, state_dict))})")
        try:
            rng = generator_from_state(state_dict["rng"])
            steps = int(state_dict["steps"])
            reprojections = int(state_dict.get("reprojections", 0))
            if "matrices" in state_dict:
                slots = {key: dict(slot) for key, slot in state_dict["matrices"].items()}
            elif state_dict.get("state") is not None:
                # a state saved before per-matrix keys: one matrix, under key None;
                # its shape is not known, so the first step takes it as it comes
                slots = {None: {"signature": None, "steps": steps, "state": state_dict["state"]}}
            else:
                slots = {}
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
            raise ValueError(f"state_dict is not a dict made by ProjUNN.state_dict(): {type(error).__name__}: "
                             f"{error}") from None
        for name, count in (("steps", steps), ("reprojections", reprojections)):
            if count < 0:
                raise ValueError(f"state_dict['{name}'] must be >= 0, got {count}")
        kept = rule_state_keys(self.rule)
        for key, slot in slots.items():
            where = f"state_dict['matrices'][{key!r}]"
            if set(slot) != {"signature", "steps", "state"} or not isinstance(slot["state"], dict):
                raise ValueError(f"{where} must be a dict with keys 'signature', 'steps' and 'state' (a dict), as "
                                 f"ProjUNN.state_dict() makes it, got keys {sorted(map(repr, slot))}")
            if isinstance(slot["steps"], bool) or not isinstance(slot["steps"], int) or slot["steps"] < 0:
                raise ValueError(f"{where}['steps'] must be an int >= 0, got {slot['steps']!r}")
            if slot["state"] and set(slot["state"]) != kept:
                # (an Adam state under RMSprop failed at the next step with a
                # bare KeyError; under SGD its moments were dropped unsaid)
                raise ValueError(f"{where}['state'] holds {sorted(slot['state'])}, the state of another base "
                                 f"rule: base={self.base!r} with these options keeps {sorted(kept)}")
        self._rng, self.steps, self.reprojections, self._slots = rng, steps, reprojections, slots
