"""``unitary_lr.optax``: projUNN as optax ``GradientTransformation`` s.

Two entry points:

- :func:`projunn_retraction`, the optax way: a transformation placed **last**
  in a chain. Each leaf chosen by a mask is unitary (orthogonal if real); the
  update the chain made for it (already preconditioned and scaled by the
  learning rate) is taken as the Euclidean step and replaced by the projUNN
  step along it, so that ``optax.apply_updates`` lands on the group. Every
  other leaf's update passes through untouched.
- :func:`projunn`, the convenience chain built from it: the optax optimizer
  named ``base`` (``optax.sgd``, ``optax.rmsprop``, ``optax.adam``,
  ``optax.adamw`` or ``optax.amsgrad``, with the learning rate), then the
  retraction, with a skip of non-finite gradients.

Both are traceable: ``jax.jit`` them as any optax update. The sketches'
Gaussian test matrices come from ``jax.random`` keys folded from ``seed``, the
step count and the leaf's position, so a jitted run is reproducible and a
state restored from a checkpoint continues the same stream.

JAX's ``grad`` of a real loss of a complex array is the complex conjugate of
PyTorch's ``.grad`` (see "Complex gradients" in the docs). :func:`projunn`
conjugates the unitary leaves' updates before the retraction; the other leaves
are left to optax's own convention. :func:`projunn_retraction` takes an update
as what it is in optax, a displacement added to the parameters, and conjugates
nothing: a chain for complex leaves conjugates JAX's gradients first.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as error:  # pragma: no cover - jax and optax are in the test extra
    raise ImportError("unitary_lr.optax needs JAX and optax: pip install jax optax") from error

from .optim import DEFAULT_BASE, DEFAULT_LR, DEFAULT_VARIANT, step_rank
from .options import DRIFT_CHECK_EVERY, DriftControl, ProjUNNOptions
from .steps import (
    STEP_OVERSAMPLE,
    STEP_POWER_ITERS,
    sketch_shape,
    step_factors_unchecked,
)
from ._validation import describe
from ._xp import FLOAT_DTYPE_NAMES, exact_products, lowrank_product

__all__ = ["STATIC_ARGS", "ProjUNNState", "RetractionState", "projunn", "projunn_retraction"]

_BASES = {"sgd": optax.sgd, "rmsprop": optax.rmsprop, "adam": optax.adam, "adamw": optax.adamw,
          "amsgrad": optax.amsgrad}
_PROBES = 4

#: The arguments of :func:`projunn` that fix the shapes and the structure of
#: the computation. ``optax.inject_hyperparams`` turns every number it is given
#: (defaults included) into a traced array, which a sketch's shape cannot be:
#: pass ``static_args=STATIC_ARGS`` to inject the learning rate.
STATIC_ARGS = ("unitary", "base", "rank", "variant", "oversample", "power_iters", "drift_tol",
               "drift_check_every", "reproject", "seed")


class RetractionState(NamedTuple):
    """State of :func:`projunn_retraction`: the number of updates it made, the
    seed's ``jax.random`` key and ``precision``, an int32 array with the dtype
    of each unitary leaf (in the parameters' flattening order) at the last
    update, as a code (1: float32, 2: float64, 3: complex64, 4: complex128;
    0 or a state without it: not known, as after a state of an older version
    was restored). An integer array, so that a state cast to another precision
    with its parameters keeps it: the next update after a leaf changed dtype
    checks its drift, as the first does."""

    count: Any
    key: Any
    precision: Any = None


class ProjUNNState(NamedTuple):
    """State of :func:`projunn`: the step count and the seed's key (the
    retraction's state), the state of the optax base optimizer, the number
    of updates skipped for NaN/Inf gradients (as ``notfinite_count`` of
    ``optax.apply_if_finite``) and the unitary leaves' dtypes at the last
    update (the retraction's ``precision``, see :class:`RetractionState`)."""

    count: Any
    key: Any
    base: Any
    notfinite_count: Any = 0
    precision: Any = None



def _seed_key(seed):
    """The key of ``seed`` (an int >= 0 of any size): ``PRNGKey`` of its low
    32 bits, folded with each further 32 bits. ``PRNGKey`` alone keeps 32
    bits without x64 (seed 2**32 was seed 0) and 64 with it (the same seed
    gave two runs), and fails beyond; seeds below 2**32 keep their keys."""
    key = jax.random.PRNGKey(seed % 2**32)
    seed >>= 32
    while seed:
        key = jax.random.fold_in(key, seed % 2**32)
        seed >>= 32
    return key


def projunn_retraction(*, unitary, rank=None, variant=DEFAULT_VARIANT, oversample=STEP_OVERSAMPLE,
                       power_iters=STEP_POWER_ITERS, drift_tol=None, drift_check_every=DRIFT_CHECK_EVERY,
                       reproject="svd", seed=0):
    r"""The last transformation of an optax chain: turns the update of each
    unitary leaf into a projUNN step along it.

    The chain before it computes a Euclidean update ``U`` (gradient clipping,
    a preconditioner, the learning rate, ...). For a unitary leaf W the
    retraction returns ``u`` such that ``W + u`` is the projUNN step of W along
    the rank-``rank`` sketch ``U_k`` of U: that is :func:`unitary_lr.projunn_step`
    with ``-lr * G`` replaced by ``U``. The update of every other leaf passes
    through unchanged.

    Parameters
    ----------
    unitary : pytree of bool, or callable
        Which leaves are unitary: a pytree of booleans with the structure of
        the parameters or a prefix of it (as ``optax.masked`` takes a mask: a
        flag in place of a subtree marks each of its leaves), or a function of
        the parameters returning one. Unitary leaves are (..., n, m)
        float32/float64/complex64/complex128 arrays.
    rank : int or None, optional
        Rank k of the sketch of the update, ``1 <= rank <= min(n, m)``. None:
        8 (:data:`unitary_lr.options.DEFAULT_RANK`), capped at ``min(n, m)`` of
        each leaf.
    variant : {"tangent", "direct", "cayley"}, optional
        ``"tangent"`` (projUNN-T): ``W_new = W expm((W^H U_k - U_k^H W) / 2)``;
        ``"direct"`` (projUNN-D): ``W_new = polar(W + U_k)``; ``"cayley"``: the
        Cayley map of the tangent step's generator.
    oversample, power_iters : int, optional
        Sketch settings, as in :func:`unitary_lr.projunn_step`.
    drift_tol, drift_check_every
        Drift control, as in :class:`unitary_lr.optim.ProjUNN`: every
        ``drift_check_every`` updates, after the first and after the first
        since a leaf changed dtype (a float32 run resumed in float64: the
        state records each leaf's dtype; 0: never) a probe estimate of
        ``||W^H W - I||_F / sqrt(n)`` for the new W above ``drift_tol`` (None:
        1e-5 for 32-bit, 1e-12 for 64-bit leaves) re-projects it, inside a
        ``jax.lax.cond`` so that it costs nothing when it is not needed.
    reproject : {"svd", "newton_schulz"}, optional
        The dense re-projection: the SVD's polar factor, or five Newton-Schulz
        steps (matmuls only; enough for any drift below ``drift_tol``).
    seed : int or None, optional
        Seed of the sketches' ``jax.random`` keys (default 0). None is 0
        here: the keys of a traced program are explicit, and the state
        carries them (the other front ends draw fresh entropy for None).

    Returns
    -------
    optax.GradientTransformation
        ``update(updates, state, params)`` needs ``params``. For a unitary leaf
        the update is the thin product ``W_new - W`` the step makes, so
        ``optax.apply_updates`` lands on the new unitary matrix up to one
        rounding. A unitary leaf's update that holds NaN or Inf is returned
        as it is (wrap the chain in ``optax.apply_if_finite`` to skip it).

    Raises
    ------
    ValueError
        Unknown variant, bad integer options, a unitary leaf that is not
        a matrix (..., n, m) with ``min(n, m) >= rank``, an update whose shape is not its
        leaf's, update without params, a mask whose structure is neither the
        parameters' nor a prefix of it, a state made for other parameters (its
        ``precision`` not one entry per unitary leaf).
    TypeError
        Unsupported dtypes; a complex update for a real leaf.

    Notes
    -----
    **The retraction must be the last transformation of the chain.** Its
    output for a unitary leaf is exact only as it is: anything after it
    (``optax.scale``, weight decay, an EMA of updates, a second learning rate)
    moves W off the group, by about the size of the change per step, and
    nothing tells you (the drift control repairs it only every
    ``drift_check_every`` steps). Put every such transformation before it; wrap
    the whole chain (``optax.MultiSteps``, ``optax.apply_if_finite``,
    ``optax.inject_hyperparams``), never the retraction alone.

    The sign is optax's: an update is added to the parameters, so a descent
    chain ends with ``optax.scale_by_learning_rate(lr)`` (a negative scale).
    JAX's gradient of a real loss of a complex leaf is the conjugate of the
    descent direction's negative: conjugate the gradients of complex unitary
    leaves before the chain (``jax.tree.map(jnp.conj, grads)``), as for any
    optax optimizer of complex parameters. :func:`projunn` does this for you.

    Cost per unitary leaf: one projUNN step, O(k n^2), on the device with no
    host transfer (the sketch is drawn from ``jax.random``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> from unitary_lr import random_unitary, unitarity_error
    >>> from unitary_lr.optax import projunn_retraction
    >>> params = {"W": random_unitary(8, dtype="float32", xp=jnp, rng=0), "b": jnp.zeros(8)}
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
    ...                   optax.scale_by_learning_rate(1e-2),
    ...                   projunn_retraction(unitary={"W": True, "b": False}, rank=2))
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum((p["W"] @ jnp.ones(8) - 1.0) ** 2) + jnp.sum(p["b"] ** 2)
    >>> updates, state = jax.jit(opt.update)(jax.grad(loss)(params), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(unitarity_error(params["W"]) < 1e-5)
    True
    """
    options = _step_options(rank=rank, variant=variant, oversample=oversample, power_iters=power_iters,
                            drift_tol=drift_tol, drift_check_every=drift_check_every, reproject=reproject, seed=seed)
    return _retraction(unitary, options, checks_updates=True)


def _retraction(unitary, options, *, checks_updates):
    """:func:`projunn_retraction` for validated ``options``. ``checks_updates``
    False: the step runs without a test of its own, one pass over each update
    saved, because the caller has made sure the updates are finite
    (:func:`projunn` tests the gradients, and optax's sgd, rmsprop and adam
    make finite directions of finite gradients)."""
    rank, variant, power_iters, oversample = options.rank, options.variant, options.power_iters, options.oversample
    drift = DriftControl(options, jnp, cond=jax.lax.cond)

    def init(params):
        masked = _masked_leaves(unitary, params)
        for path, flag, leaf in masked:
            if flag:
                _check_leaf(path, leaf, rank)
        key = _seed_key(0 if options.seed is None else options.seed)
        return RetractionState(count=jnp.zeros([], jnp.int32), key=key, precision=_precision_codes(masked))

    @exact_products
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("projunn_retraction needs the parameters: opt.update(updates, state, params)")
        masked = _masked_leaves(unitary, params)
        treedef = jax.tree.structure(_mask_of(unitary, params))
        try:
            flat_updates = treedef.flatten_up_to(updates)
        except (ValueError, TypeError) as error:
            raise ValueError(f"updates must have the tree structure of the parameters: {error}") from None
        step_key = jax.random.fold_in(state.key, state.count)
        step = state.count + 1
        precision = _precision_codes(masked)
        recorded = _recorded_precision(state.precision, precision)
        new_updates, position = [], 0
        for index, ((path, flag, W), U) in enumerate(zip(masked, flat_updates)):
            if not flag:
                new_updates.append(U)
                continue
            _check_update(path, W, U)
            # the first update in this dtype (a float32 run resumed in float64,
            # whose W is float32-accurate) checks the drift: one scalar test
            due = drift.due(step) | (recorded[position] != precision[position]) if options.drift_check_every \
                else False
            position += 1
            new_updates.append(_unitary_update(W, U, jax.random.fold_in(step_key, index), due))
        return treedef.unflatten(new_updates), RetractionState(count=step, key=state.key, precision=precision)

    # The branches of lax.cond are defined once, here: JAX caches their traces
    # by identity, so an eager (un-jitted) update does not re-trace every step.
    def keep(update, *_):
        return update

    def check(update, W, probe_key):
        probes = jax.random.normal(probe_key, (*W.shape[:-2], min(W.shape[-2:]), _PROBES), dtype=W.dtype)
        return drift.apply_to_update(W, update, probes)

    def _unitary_update(W, U, key, due):
        """``W_new - W`` as the thin product the step makes (no new W formed
        and subtracted again: two passes saved). A non-finite U is handed
        back as it is, and the step is not run on it (``lax.cond``: no NaN
        in the small cores, and no pass over U to select between the two)."""
        U = U.astype(W.dtype)
        if not checks_updates:
            return retract(U, W, key, due)
        return jax.lax.cond(_all_finite(U), retract, keep, U, W, key, due)

    def retract(U, W, key, due):
        sketch_key, probe_key = jax.random.split(key)
        leaf_rank = step_rank(rank, W.shape)
        omega = jax.random.normal(sketch_key, sketch_shape(U, leaf_rank, oversample), dtype=U.dtype)
        # The step moves along -lr G: G = U with lr = -1 moves along U. The
        # sketch of -U is the sketch of U with its range panel negated,
        # exactly, so this is the step of G = -U and lr = 1 without an
        # n x n negation; a static lr keeps the kernels' clamping of huge steps.
        L, Rh = step_factors_unchecked(jnp, W, U, omega, lr=-1.0, rank=leaf_rank, variant=variant,
                                       power_iters=power_iters, traced=True)
        update = lowrank_product(jnp, L, Rh)
        if options.drift_check_every:
            update = jax.lax.cond(due, check, keep, update, W, probe_key)
        return update

    return optax.GradientTransformation(init, update)


def projunn(learning_rate=DEFAULT_LR, *, unitary, base=DEFAULT_BASE, rank=None, variant=DEFAULT_VARIANT,
            oversample=STEP_OVERSAMPLE, power_iters=STEP_POWER_ITERS, drift_tol=None,
            drift_check_every=DRIFT_CHECK_EVERY, reproject="svd", seed=0, **hyperparameters):
    r"""projUNN for optax: unitary leaves by rank-k projUNN steps, the rest by
    the optax optimizer named ``base``.

    The convenience chain ``optax.{base}(learning_rate, **hyperparameters)``,
    then the conjugation of the unitary leaves' updates (JAX's gradient
    convention, see Notes), then :func:`projunn_retraction`, with the whole
    update skipped when a gradient holds NaN or Inf.

    Parameters
    ----------
    learning_rate : float, scalar array or optax schedule, optional
        Learning rate (>= 0), or a function of the step count (default 1e-2,
        :data:`unitary_lr.options.DEFAULT_LR`, the same in every front end). An
        array may be traced: ``optax.inject_hyperparams(projunn, static_args=STATIC_ARGS)``
        injects it (see ``unitary_lr.optax.STATIC_ARGS``). At 0 (the start of
        a warm-up schedule) the unitary leaves stay where they are, but the
        update counts, as in the other front ends: the base's moments advance
        and the drift checks run on their schedule.
    unitary : pytree of bool, or callable
        Which leaves are unitary: a pytree of booleans with the structure of
        the parameters or a prefix of it (as ``optax.masked`` takes a mask: a
        flag in place of a subtree marks each of its leaves), or a function of
        the parameters returning one. Unitary leaves are (..., n, m)
        float32/float64/complex64/complex128 arrays.
    base : {"rmsprop", "adam", "adamw", "amsgrad", "sgd"}, optional
        ``optax.rmsprop``, ``optax.adam``, ``optax.adamw``, ``optax.amsgrad``
        or ``optax.sgd``;
        ``**hyperparameters`` are passed to it by name (``decay``, ``eps``,
        ``centered``, ``momentum``, ``b1``, ``b2``, ``nesterov``,
        ``weight_decay``, ...). AdamW's weight decay never reaches a unitary
        leaf (the group is invariant to scale, and ``weight_decay * W``, of
        full rank, would crowd the step's low-rank sketch): its ``mask`` is
        the other leaves, within the ``mask`` given (a pytree or a function of
        the parameters, as optax takes it).
    rank : int or None, optional
        Rank k of the unitary updates, ``1 <= rank <= min(n, m)``. None: 8
        (:data:`unitary_lr.options.DEFAULT_RANK`), capped at ``min(n, m)`` of
        each leaf.
    variant, oversample, power_iters
        As in :func:`unitary_lr.projunn_step`.
    drift_tol, drift_check_every, reproject, seed
        As in :func:`projunn_retraction`.

    Returns
    -------
    optax.GradientTransformation
        ``update(grads, state, params)`` needs ``params``. For a unitary leaf the
        update is ``W_new - W``, so ``optax.apply_updates`` lands on the new
        unitary matrix up to one rounding. It must be the last transformation
        applied to the updates (see :func:`projunn_retraction`).

    Raises
    ------
    ValueError
        Unknown base or variant, a negative learning rate, a unitary leaf
        that is not a matrix (..., n, m) with ``min(n, m) >= rank``, update without params;
        gradients not of the parameters' tree structure or shapes (naming the leaf); a
        state made for other parameters (its ``precision`` not one entry per unitary leaf).
    TypeError
        Hyper-parameters the base optimizer does not take; unsupported dtypes;
        an integer option given as an array (``optax.inject_hyperparams``
        without ``static_args=STATIC_ARGS``); a gradient whose dtype would
        promote its leaf's (a float64 gradient of a float32 leaf: the base's
        moments keep the leaf's dtype); a gradient of a unitary leaf that is
        not float32, float64, complex64 or complex128 (float16, bfloat16, an
        integer or bool; the base would form the moments of a float16 one in
        float16, where ``g**2`` is zero for ``|g|`` below about 2e-4). The
        gradients of the other leaves go to optax as they are, in any dtype
        that does not promote the leaf's. A state in another precision than
        the parameters (the float32 moments of a float32 run given with float64
        parameters), naming the state's array, its dtype and the parameter's:
        cast the state with the parameters (the next update then checks the
        unitary leaves' drift, as the first does).

    Notes
    -----
    The preconditioner is optax's: ``optax.rmsprop`` puts ``eps`` inside the
    square root by default, ``torch.optim.RMSprop`` outside, so the same
    ``base`` gives a slightly different step than the torch adapter. The
    second moment of a complex gradient is ``|g|^2`` in both, so conjugating
    the preconditioner's output equals preconditioning the conjugated gradient.
    A NaN/Inf in any gradient skips the whole update (zero updates, state
    unchanged but for ``notfinite_count``), as ``optax.apply_if_finite`` does;
    with a base that squares the gradient (all but sgd), so does a finite
    gradient with an entry whose ``|g|^2`` passes half the dtype's largest
    number (``|g|`` above 1.3e19 in float32, 181 in float16: 1e20 in float32
    made the second moments Inf and stopped those entries for good). That test, one read of
    each gradient, is the update's only one: the step runs
    on the base's direction without testing it again (a finite gradient
    makes a finite direction, unless the base overflows: sgd's ``lr * g``
    for g near the dtype's largest number, which makes W NaN).
    Drift control costs two passes over W every ``drift_check_every`` steps,
    at the first, and at the first after the leaf changed dtype.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> from unitary_lr import random_unitary, unitarity_error
    >>> from unitary_lr.optax import projunn
    >>> params = {"W": random_unitary(8, dtype="complex64", xp=jnp, rng=0), "b": jnp.zeros(8)}
    >>> opt = projunn(1e-2, unitary={"W": True, "b": False}, base="adam", rank=2)
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum(jnp.abs(p["W"] @ jnp.ones(8) - 1.0) ** 2) + jnp.sum(p["b"] ** 2)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(unitarity_error(params["W"]) < 1e-5)
    True
    """
    if not isinstance(base, str) or base not in _BASES:  # (an array is unhashable: "in" would raise)
        raise ValueError(f"base must be one of {', '.join(map(repr, _BASES))}, got {base!r}")
    learning_rate = _checked_learning_rate(learning_rate)
    if set(hyperparameters) == {"hyperparameters"} and isinstance(hyperparameters["hyperparameters"], dict):
        # optax.inject_hyperparams binds the arguments with inspect.Signature,
        # which gathers the var-keyword ones into one dict named after the
        # parameter, and passes that dict back by its name.
        hyperparameters = hyperparameters["hyperparameters"]
    options = _step_options(rank=rank, variant=variant, oversample=oversample, power_iters=power_iters,
                            drift_tol=drift_tol, drift_check_every=drift_check_every, reproject=reproject, seed=seed)
    retraction = _retraction(unitary, options, checks_updates=False)
    if base == "adamw":
        hyperparameters = {**hyperparameters, "mask": _decay_mask(unitary, hyperparameters.get("mask"))}
    try:
        preconditioner = _BASES[base](learning_rate, **hyperparameters)
    except TypeError as error:
        raise TypeError(f"optax.{base} does not take these hyper-parameters: {error}") from None

    def init(params):
        retraction_state = retraction.init(params)
        return ProjUNNState(count=retraction_state.count, key=retraction_state.key,
                            base=preconditioner.init(params), notfinite_count=jnp.zeros([], jnp.int32),
                            precision=retraction_state.precision)

    def step(grads, state, params):
        directions, base_state = preconditioner.update(grads, state.base, params)
        mask = _mask_of(unitary, params)
        # torch's convention is conj(JAX's); the preconditioner commutes with conj
        directions = jax.tree.map(lambda flag, u: jnp.conj(u) if flag and jnp.iscomplexobj(u) else u,
                                  mask, directions)
        new_updates, retraction_state = retraction.update(
            directions, RetractionState(state.count, state.key, state.precision), params)
        return new_updates, ProjUNNState(count=retraction_state.count, key=state.key, base=base_state,
                                         notfinite_count=state.notfinite_count, precision=retraction_state.precision)

    @exact_products
    def update(grads, state, params=None):
        if params is None:
            raise ValueError("projunn needs the parameters: opt.update(grads, state, params)")
        _check_gradients(grads, params, _mask_of(unitary, params))
        finite = _all_leaves_finite(jax.tree.leaves(grads), squares=base != "sgd")
        # (a state without precision: not known, 0, so that both branches return the same structure)
        state = state._replace(notfinite_count=jnp.asarray(state.notfinite_count, jnp.int32),
                               precision=_recorded_precision(state.precision,
                                                             _precision_codes(_masked_leaves(unitary, params))))
        return jax.lax.cond(finite, step, skip, grads, state, params)

    def skip(grads, state, params):
        """apply_if_finite's semantics: zero updates, the state as it was but
        for the count of skipped updates. The step is not run at all
        (``lax.cond``), so no NaN reaches the moments or the small cores."""
        shapes, new_state = jax.eval_shape(step, grads, state, params)
        _check_state_dtypes(state, new_state, params)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        return zeros, state._replace(notfinite_count=state.notfinite_count + 1)

    return optax.GradientTransformation(init, update)


def _check_state_dtypes(state, new_state, params):
    """A TypeError naming the first array of ``state`` whose dtype the step
    changes (``new_state``: the step's, as ``jax.eval_shape`` gives it) and
    the parameter it belongs to: the base's float32 moments of a float32 run
    given with float64 parameters, which the step promotes and the skip of a
    non-finite step keeps, failed in JAX's words ("cond branches must have
    equal output types"). Shapes and dtypes are static: no cost under jit."""
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(new_state)):
        if jnp.result_type(old) == jnp.result_type(new):
            continue
        name = jax.tree_util.keystr(path)
        # the parameter whose path ends the state array's (the longest: ['a']['W'] before ['W'])
        owners = sorted(((jax.tree_util.keystr(p), leaf) for p, leaf in flat_params
                         if name.endswith(jax.tree_util.keystr(p)) and jnp.shape(leaf) == jnp.shape(old)),
                        key=lambda owner: -len(owner[0]))
        owner = (f"parameter {owners[0][0]} is {jnp.result_type(owners[0][1]).name}" if owners else
                 f"the step makes it {jnp.result_type(new).name}")
        raise TypeError(f"the state's array {name} is {jnp.result_type(old).name} but {owner} (a state saved in "
                        f"another precision): cast the state's arrays to the parameters' precision (the next update "
                        f"then checks the unitary leaves' drift), or start from opt.init(params)")


def _check_gradients(grads, params, mask):
    """Each gradient of the parameter's shape, in a dtype that does not
    promote the parameter's, named where it is not: the base's moments (and
    the skip of a non-finite step, which keeps them as they were) would
    otherwise fail in JAX's words ("add got incompatible shapes", "cond
    branches must have equal output types"), naming no leaf. A unitary leaf's
    gradient (``mask``: one bool per leaf) must also be float32, float64,
    complex64 or complex128: a float16 or bfloat16 one does not promote a
    float32 leaf, but the base would form its moments in it (``g**2`` in
    float16 is zero below about 2e-4), far from the step of the same numbers
    in float32. The other leaves' gradients are optax's business. Shapes and
    dtypes are static under jit: no cost there."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        flat_grads = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as error:
        raise ValueError(f"grads must have the tree structure of the parameters: {error}") from None
    for (path, p), g, flag in zip(flat, flat_grads, treedef.flatten_up_to(mask)):
        name = jax.tree_util.keystr(path)
        if tuple(jnp.shape(g)) != tuple(jnp.shape(p)):
            raise ValueError(f"the gradient of leaf {name} has shape {tuple(jnp.shape(g))}, the leaf "
                             f"{tuple(jnp.shape(p))}")
        dtype = jnp.result_type(g).name
        if flag and dtype not in ("float32", "float64", "complex64", "complex128"):
            raise TypeError(f"the gradient of unitary leaf {name} has dtype {dtype}; expected float32, float64, "
                            f"complex64 or complex128 (pass gradients in the leaves' dtypes)")
        if jnp.result_type(g, p) != jnp.result_type(p):
            raise TypeError(f"the gradient of leaf {name} has dtype {jnp.result_type(g).name}, which would "
                            f"promote the leaf's {jnp.result_type(p).name}; pass gradients in the leaves' dtypes")


# a unitary leaf's dtype as its code in the state (0: not known)
_PRECISION_CODES = {name: code for code, name in enumerate(FLOAT_DTYPE_NAMES, start=1)}


def _precision_codes(masked):
    """The dtype codes of the unitary leaves of ``masked`` (as
    :func:`_masked_leaves` returns them), in their order, as an int32 array:
    the ``precision`` of :class:`RetractionState`."""
    return jnp.asarray([_PRECISION_CODES.get(jnp.result_type(leaf).name, 0) for _, flag, leaf in masked if flag],
                       dtype=jnp.int32)


def _recorded_precision(recorded, precision):
    """The state's ``precision``: zeros (not known) for None, a ValueError
    for one that is not of the parameters' unitary leaves (``precision``, the
    codes of their dtypes now), whose count is static."""
    if recorded is None:
        return jnp.zeros_like(precision)
    if tuple(jnp.shape(recorded)) != tuple(precision.shape):
        raise ValueError(f"the state's precision has shape {tuple(jnp.shape(recorded))}, one entry per unitary "
                         f"leaf: the state was made for other parameters than these, with {precision.shape[0]} "
                         "unitary leaves")
    return jnp.asarray(recorded, jnp.int32)


def _all_leaves_finite(leaves, squares=False):
    """Whether no array of ``leaves`` holds NaN or Inf (:func:`_all_finite`
    of each), as a traced bool; True for none. With ``squares``, whether
    every entry's ``|x|^2`` is at most half the largest number too
    (:func:`_all_squares_finite`)."""
    test = _all_squares_finite if squares else _all_finite
    return jnp.all(jnp.asarray([test(x) for x in leaves])) if leaves else jnp.asarray(True)


def _all_finite(x):
    """Whether the array x holds no NaN or Inf, as a traced bool. A sum is
    non-finite exactly when an entry is, or when it overflows: one fused
    read decides, and only a non-finite sum pays for the exact elementwise
    test (``lax.cond``), which XLA writes as an n x n mask and its reduction."""
    return jax.lax.cond(jnp.isfinite(jnp.sum(x)), _finite_sum, _finite_entries, x)


# The branches of lax.cond are module-level functions: JAX caches their traces
# by identity, so an eager (un-jitted) update does not re-trace them every step.
def _finite_sum(x):
    return jnp.asarray(True)


def _finite_entries(x):
    return jnp.all(jnp.isfinite(x))


def _all_squares_finite(x):
    """Whether every entry of x has a finite ``|x|^2`` of at most half the
    dtype's largest number (so none is NaN or Inf), as a traced bool.
    One read decides, the sum of squares as one dot product; only a sum
    above the bound pays for the exact elementwise test (``lax.cond``).

    This is the test of a gradient for the bases that square it (rmsprop,
    adam, adamw, amsgrad): their moments are convex combinations of the old
    ones and of g or ``|g|^2`` (amsgrad's maximum of two such), so that a
    finite state stays finite when every ``|g|^2`` is finite, and the other
    half covers the combination's rounding at the top of the range. A
    finite float32 gradient of 1e20 would otherwise make a second moment
    Inf for good, and every later direction of that entry 0."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return jnp.asarray(True)
    flat = jnp.ravel(x)  # half precision summed in float32: its bound is far below a sum of many entries
    squares = jnp.real(jnp.vdot(flat, flat, preferred_element_type=jnp.promote_types(dtype, jnp.float32)))
    return jax.lax.cond(squares <= _square_bound(x), _finite_sum, _small_squares, x)


def _square_bound(x):
    return jnp.finfo(jnp.result_type(x)).max / 2


def _small_squares(x):
    squares = jnp.real(x) ** 2 + jnp.imag(x) ** 2 if jnp.iscomplexobj(x) else x * x
    return jnp.all(squares <= _square_bound(x))


def _checked_learning_rate(learning_rate):
    """A schedule, a finite number >= 0, or a real scalar array (a traced one
    is taken as it is: its value is not known before the step runs). 0 is
    taken, as a schedule's value at a warm-up's start, which
    ``optax.inject_hyperparams`` passes as a number at ``init``.

    ``optax.inject_hyperparams`` casts every number to the parameters'
    widest dtype, which is complex when a leaf is: a complex scalar array with
    a zero imaginary part stands for its real part, which is returned."""
    if callable(learning_rate):
        return learning_rate
    if isinstance(learning_rate, (jax.Array, np.ndarray, np.generic)):
        dtype = jnp.dtype(learning_rate.dtype)
        if learning_rate.ndim != 0 or not any(jnp.issubdtype(dtype, kind) for kind in
                                              (jnp.floating, jnp.integer, jnp.complexfloating)):
            raise TypeError(f"learning_rate as an array must be a real scalar, got {learning_rate!r}")
        if isinstance(learning_rate, jax.core.Tracer):
            return jnp.real(learning_rate)
        if jnp.issubdtype(dtype, jnp.complexfloating) and complex(learning_rate).imag != 0:
            raise TypeError(f"learning_rate as an array must be a real scalar, got {learning_rate!r}")
        value = complex(learning_rate).real
    elif isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        raise TypeError(f"learning_rate must be a number, a real scalar array or a schedule, got {learning_rate!r}")
    else:
        value = learning_rate
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"learning_rate must be a finite number >= 0 or a schedule, got {learning_rate!r}")
    return jnp.real(learning_rate) if jnp.iscomplexobj(learning_rate) else learning_rate


def _step_options(**options):
    """The shared :class:`ProjUNNOptions`, after a clear error for an array
    where a number fixes the shapes (what optax.inject_hyperparams passes)."""
    for name, value in options.items():
        if isinstance(value, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name} must be a Python number, got an array {value!r}: it fixes the shapes of the step. "
                "With optax.inject_hyperparams pass static_args=unitary_lr.optax.STATIC_ARGS"
            )
    return ProjUNNOptions(**options)


def _mask_of(unitary, params):
    """One bool per leaf of ``params``, in their structure. ``unitary`` (or
    what it returns for ``params``) has their structure or a prefix of it, as
    ``optax.masked`` takes a mask: a flag that stands for a subtree marks each
    of its leaves."""
    mask = unitary(params) if callable(unitary) else unitary
    try:
        jax.tree.structure(mask).flatten_up_to(params)
    except (ValueError, TypeError):
        raise ValueError(f"unitary must have the tree structure of the parameters or a prefix of it, got "
                         f"{describe(jax.tree.structure(mask))} for parameters "
                         f"{describe(jax.tree.structure(params))}") from None
    return _full_mask(mask, params)


def _full_mask(flags, params):
    """A prefix mask ``flags`` of ``params`` as one bool per parameter leaf."""
    return jax.tree.map(lambda flag, subtree: jax.tree.map(lambda _: bool(flag), subtree), flags, params)


def _decay_mask(unitary, mask):
    """AdamW's weight-decay mask for :func:`projunn`: a function of the
    parameters, True on each leaf that is not unitary and that ``mask`` (None,
    a pytree of bools or a function of the parameters, a prefix of the
    parameters' structure as optax allows) leaves decayed."""
    def decayed(params):
        keep = jax.tree.map(lambda flag: not flag, _mask_of(unitary, params))
        if mask is None:
            return keep
        given = mask(params) if callable(mask) else mask
        try:
            given = _full_mask(given, params)
        except ValueError as error:
            raise ValueError(f"mask must have the tree structure of the parameters (or a prefix of it): "
                             f"{error}") from None
        return jax.tree.map(lambda a, b: a and b, keep, given)

    return decayed


def _masked_leaves(unitary, params):
    """(path, flag, leaf) for each leaf of the parameters, in their flattening
    order (a flag of the mask that stands for a subtree of the parameters is
    each of its leaves' flag, the path the leaf's own)."""
    mask = _mask_of(unitary, params)
    flat_mask, _ = jax.tree_util.tree_flatten_with_path(mask)
    flat_params = jax.tree.structure(mask).flatten_up_to(params)
    # (parameters that are one array: a path of no keys, which the messages would show as nothing)
    return [(jax.tree_util.keystr(path) or "(the parameters: one array)", flag, leaf)
            for (path, flag), leaf in zip(flat_mask, flat_params)]


def _check_leaf(path, leaf, rank):
    shape = tuple(leaf.shape)
    name = jnp.dtype(leaf.dtype).name
    if name not in ("float32", "float64", "complex64", "complex128"):
        raise TypeError(f"unitary leaf {path} has dtype {name}; expected float32, float64, complex64 or complex128")
    # n x m with orthonormal columns (n > m) or rows (n < m), or square
    if len(shape) < 2:
        raise ValueError(f"unitary leaf {path} must be a matrix or a batch of them, (..., n, m), got shape {shape}")
    if min(shape[-2:]) < 1:  # (an empty batch of matrices is stepped as such; a matrix of no rows is none)
        raise ValueError(f"unitary leaf {path} must not be an empty matrix, got shape {shape}")
    if rank is not None and rank > min(shape[-2:]):
        raise ValueError(f"rank {rank} exceeds min(n, m) = {min(shape[-2:])} of unitary leaf {path} (shape {shape})")


def _check_update(path, W, U):
    """Shapes and dtypes are static under jit: these checks cost nothing."""
    if tuple(U.shape) != tuple(W.shape):
        raise ValueError(f"the update of unitary leaf {path} has shape {tuple(U.shape)}, the leaf {tuple(W.shape)}")
    if jnp.iscomplexobj(U) and not jnp.iscomplexobj(W):
        raise TypeError(f"the update of unitary leaf {path} is complex ({jnp.dtype(U.dtype).name}) but the leaf "
                        f"is real ({jnp.dtype(W.dtype).name}); a real (orthogonal) leaf takes a real update")
