"""The options of a projUNN step and its drift control, shared by every front
end (floor 4).

:class:`ProjUNNOptions` is validated once, where it is made; the torch
optimizer, the optax transformations and the framework-free optimizer all
build one from their keyword arguments, so the same bad option gives the same
error (type and message) everywhere. :class:`DriftControl` is the one
drift-control policy: every ``drift_check_every`` steps a probe estimate of
``||W^H W - I||`` (:func:`unitarity_estimate`) above the tolerance of W's dtype
re-projects W, with the branch taken by Python in eager code and by a ``cond``
(``jax.lax.cond``) in traced code.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

from ._validation import check_choice, check_int
from .diagnostics import default_drift_tolerance, estimate_unchecked
from .polar import polar_unchecked, project_unitary
from .steps import STEP_OVERSAMPLE, STEP_POWER_ITERS, VARIANTS
from ._xp import device, dtype_name, mH

__all__ = ["DEFAULT_BASE", "DEFAULT_LR", "DEFAULT_RANK", "DEFAULT_VARIANT", "DRIFT_CHECK_EVERY", "REPROJECT_METHODS",
           "DriftControl", "ProjUNNOptions", "step_rank"]

# The defaults of the three front ends (unitary_lr.optim.ProjUNN,
# unitary_lr.torch.ProjUNN, unitary_lr.optax.projunn), written once here and
# chosen by measurement (docs/choosing-lr-and-rank.md, measured with
# docs/scripts/orthogonal_regression.py): on an orthogonal nn.Linear
# regression, 200 steps, rank 8 at lr 1e-2 ends at 0.17x (n = 512) down to
# 3e-8x (n = 64) the loss of torch's orthogonal parametrization with Adam's
# defaults, real and complex, where rank 1 at lr 1e-3 (the former defaults)
# barely moved. lr 1e-2 is also torch.optim.RMSprop's own default, which the
# plain parameters get. A rank-8 step costs about twice a rank-1 step on a CPU
# at n = 256, and three host transfers instead of one on a GPU. The paper's
# recurrent recipes set their rank and lr themselves.
#: Learning rate of every front end when none is given.
DEFAULT_LR = 1e-2
#: Rank of the unitary updates when none is given (``rank=None``), capped at
#: ``min(n, m)`` of each matrix.
DEFAULT_RANK = 8
#: Base rule (preconditioner) when none is given.
DEFAULT_BASE = "rmsprop"
#: Step variant when none is given.
DEFAULT_VARIANT = "tangent"

#: How often (in steps) the drift from the group is estimated by default: the
#: estimate costs two passes over W, about one step's worth, so every 50 steps
#: it adds 2 % (float32 drifts by ~1e-7 per step: far below the tolerance).
DRIFT_CHECK_EVERY = 50

#: The dense re-projections: ``"svd"`` (the polar factor from an SVD, any
#: matrix) and ``"newton_schulz"`` (matmuls only, the fast path on GPUs).
REPROJECT_METHODS = ("svd", "newton_schulz")

# Newton-Schulz steps of a traced re-projection, which cannot test for
# convergence: the error e of a drifted W goes to about e^2 per step, so five
# steps take any drift below the largest tolerance (1e-2) to rounding.
_TRACED_NEWTON_SCHULZ_STEPS = 5
_LARGEST_DRIFT_TOL = 1e-2


@dataclass(frozen=True)
class ProjUNNOptions:
    r"""The options of a projUNN step and its drift control, validated once.

    Every front end (:class:`unitary_lr.torch.ProjUNN`,
    :func:`unitary_lr.optax.projunn`, :func:`unitary_lr.optax.projunn_retraction`,
    :class:`unitary_lr.optim.ProjUNN`) builds one from its keyword arguments,
    so the defaults are written here only and a bad option gets the same
    error from each of them.

    Parameters
    ----------
    rank : int or None
        Rank k of the sketch of each update, ``>= 1``; None:
        :data:`unitary_lr.options.DEFAULT_RANK` capped at min(n, m) of each matrix
        (:func:`step_rank`).
    variant : str
        A name of ``unitary_lr.steps.VARIANTS``: ``"tangent"``
        (projUNN-T), ``"direct"`` (projUNN-D) or ``"cayley"``.
    oversample, power_iters : int
        The sketch's settings, ``>= 0`` (see :func:`unitary_lr.projunn_step`).
    drift_tol : float or None
        Re-projection threshold for ``||W^H W - I||_F / sqrt(m)``, in
        ``(0, 1e-2]``; None: the default of W's dtype (1e-5 for 32-bit, 1e-12
        for 64-bit dtypes).
    drift_check_every : int
        Estimate the drift every this many steps, ``>= 0`` (0: never).
    reproject : {"svd", "newton_schulz"}
        The dense re-projection.
    seed : int or None
        Seed of the sketches' random stream, ``>= 0``; None: fresh entropy
        (optax, whose keys are explicit, uses 0).

    Raises
    ------
    TypeError
        An integer option that is not an integer (``rank=2.0``), a
        ``drift_tol`` that is not a real number.
    ValueError
        An out-of-range value or an unknown name.

    Examples
    --------
    >>> from unitary_lr.options import ProjUNNOptions
    >>> options = ProjUNNOptions(rank=4, variant="cayley")
    >>> options.rank, options.drift_check_every, ProjUNNOptions().rank
    (4, 50, None)
    >>> try:
    ...     ProjUNNOptions(rank=2.0)
    ... except TypeError as error:
    ...     print(error)
    rank must be an integer, got float: 2.0
    """

    rank: int | None = None
    variant: str = DEFAULT_VARIANT
    oversample: int = STEP_OVERSAMPLE
    power_iters: int = STEP_POWER_ITERS
    drift_tol: float | None = None
    drift_check_every: int = DRIFT_CHECK_EVERY
    reproject: str = "svd"
    seed: int | None = None

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        if self.rank is not None:
            set_("rank", check_int("rank", self.rank, minimum=1))
        set_("variant", check_choice("variant", self.variant, VARIANTS))
        set_("oversample", check_int("oversample", self.oversample, minimum=0))
        set_("power_iters", check_int("power_iters", self.power_iters, minimum=0))
        set_("drift_check_every", check_int("drift_check_every", self.drift_check_every, minimum=0))
        set_("reproject", check_choice("reproject", self.reproject, REPROJECT_METHODS))
        if self.seed is not None:
            set_("seed", check_int("seed", self.seed, minimum=0))
        tol = self.drift_tol
        if tol is not None:
            if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
                raise TypeError(f"drift_tol must be a real number or None, got {type(tol).__name__}: {tol!r}")
            if not (math.isfinite(tol) and 0 < tol <= _LARGEST_DRIFT_TOL):
                raise ValueError(f"drift_tol must be a number in (0, {_LARGEST_DRIFT_TOL:g}] or None, got {tol!r}")
            set_("drift_tol", float(tol))

    @classmethod
    def from_kwargs(cls, kwargs):
        """The options named in the dict ``kwargs`` (other keys are ignored)."""
        return cls(**{f.name: kwargs[f.name] for f in fields(cls) if f.name in kwargs})

    def replace(self, **changes):
        """A copy with some options changed (validated again)."""
        return replace(self, **changes)

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def tolerance(self, xp, dtype):
        """The drift tolerance for matrices of ``dtype``."""
        return default_drift_tolerance(dtype_name(xp, dtype)) if self.drift_tol is None else self.drift_tol


def step_rank(rank, shape):
    """The rank of the updates of a matrix of ``shape`` (..., n, m): ``rank``
    as given, or for ``None`` :data:`unitary_lr.options.DEFAULT_RANK` capped at
    ``min(n, m)``.

    Examples
    --------
    >>> from unitary_lr.options import step_rank
    >>> step_rank(None, (256, 256)), step_rank(None, (4, 3)), step_rank(2, (4, 3))
    (8, 3, 2)
    """
    return min(DEFAULT_RANK, *shape[-2:]) if rank is None else rank


OPTION_NAMES = tuple(f.name for f in fields(ProjUNNOptions))


class DriftControl:
    """The drift-control policy of every front end.

    ``DriftControl(options, xp)`` checks eagerly (the branch in Python, W read
    on the host once per check); ``DriftControl(options, xp, cond=jax.lax.cond)``
    builds the traced version, whose re-projection is a ``cond`` branch (SVD,
    or a fixed number of Newton-Schulz steps). The branches are made once, so
    a JAX trace of them is cached between calls.
    """

    def __init__(self, options, xp, *, cond=None):
        self.options, self.xp, self._cond = options, xp, cond
        traced = cond is not None
        method = options.reproject

        def reproject(W):
            if not traced:
                return project_unitary(W, method=method)
            if method == "svd":
                return polar_unchecked(xp, W)
            return _newton_schulz_fixed(xp, W, _TRACED_NEWTON_SCHULZ_STEPS)

        def keep(W):
            return W

        def reproject_update(W, update):
            return reproject(W + update) - W

        def keep_update(W, update):
            return update

        self._reproject, self._keep = reproject, keep
        self._update_branches = (reproject_update, keep_update)

    def due(self, step):
        """Whether step number ``step`` (1, 2, ...) checks the drift: every
        ``drift_check_every``-th step and the first (a matrix marked or given
        in another precision is checked at once); a bool, or a boolean array
        for a traced step count."""
        every = self.options.drift_check_every
        return bool(every) and (drift_check_due(step, every) | (step == 1))

    def apply(self, W, probes):
        """(W or its re-projection, whether it was re-projected): re-projected
        when the probe estimate with ``probes`` (..., min(n, m), p) is above
        the tolerance of W's dtype."""
        xp = self.xp
        # any, not max: an empty batch has no largest estimate and has not drifted
        drifted = xp.any(estimate_unchecked(xp, W, probes) > self.options.tolerance(xp, W.dtype))
        if self._cond is None:
            return (self._reproject(W), True) if bool(drifted) else (W, False)
        return self._cond(drifted, self._reproject, self._keep, W), drifted

    def apply_to_update(self, W, update, probes):
        """``update``, or the update that re-projects ``W + update`` when its
        drift is above the tolerance (a transformation's output: the new W is
        never formed twice)."""
        xp = self.xp
        new = W + update
        drifted = xp.any(estimate_unchecked(xp, new, probes) > self.options.tolerance(xp, W.dtype))
        if self._cond is None:
            return self._update_branches[0](W, update) if bool(drifted) else update
        return self._cond(drifted, *self._update_branches, W, update)


def drift_check_due(step, every):
    """Whether step ``step`` checks the drift when it is checked every
    ``every`` steps (0: never)."""
    if not every:
        return False
    return step % every == 0


def _newton_schulz_fixed(xp, W, steps):
    """``steps`` Newton-Schulz steps ``X <- X (3 I - X^H X) / 2`` on the small
    side of W; traceable (no convergence test)."""
    wide = W.shape[-2] < W.shape[-1]
    X = mH(xp, W) if wide else W
    identity = xp.eye(X.shape[-1], dtype=X.dtype, device=device(X))
    for _ in range(steps):
        X = X @ (1.5 * identity - 0.5 * (mH(xp, X) @ X))
    return mH(xp, X) if wide else X
