"""``unitary_lr.optax.projunn``: an optax ``GradientTransformation``.

Leaves chosen by a mask are kept unitary (orthogonal if real) with projUNN
steps; every other leaf is updated by the matching optax optimizer itself,
``optax.sgd``, ``optax.rmsprop`` or ``optax.adam``, unchanged. The unitary
leaves take the same optax preconditioner's output as their Euclidean step.

The update is traceable: ``jax.jit`` it as any optax update. The sketches'
Gaussian test matrices come from ``jax.random`` keys folded from ``seed``, the
step count and the leaf's position, so a jitted run is reproducible and a
state restored from a checkpoint continues the same stream.

JAX's ``grad`` of a real loss of a complex array is the complex conjugate of
PyTorch's ``.grad`` (see "Complex gradients" in the docs). The unitary leaves conjugate it
before the projUNN step; the other leaves are left to optax's own convention.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as error:  # pragma: no cover - jax and optax are in the test extra
    raise ImportError("unitary_lr.optax needs JAX and optax: pip install jax optax") from error

from .diagnostics import default_drift_tolerance, estimate_unchecked
from .polar import polar_unchecked
from .steps import STEP_OVERSAMPLE, STEP_POWER_ITERS, VARIANTS, sketch_shape, step_factors_unchecked

__all__ = ["ProjUNNState", "projunn"]

_BASES = {"sgd": optax.sgd, "rmsprop": optax.rmsprop, "adam": optax.adam}
_PROBES = 4


class ProjUNNState(NamedTuple):
    """State of :func:`projunn`: the step count, the seed's key, the state of
    the optax base optimizer and the number of updates skipped for NaN/Inf
    gradients (as ``notfinite_count`` of ``optax.apply_if_finite``)."""

    count: Any
    key: Any
    base: Any
    notfinite_count: Any = 0


def projunn(learning_rate, *, unitary, base="rmsprop", rank=1, variant="tangent",
            oversample=STEP_OVERSAMPLE, power_iters=STEP_POWER_ITERS, drift_tol=None,
            drift_check_every=50, seed=0, **hyperparameters):
    r"""projUNN for optax: unitary leaves by rank-k projUNN steps, the rest by
    the optax optimizer named ``base``.

    Parameters
    ----------
    learning_rate : float or optax schedule
        Learning rate (> 0), or a function of the step count.
    unitary : pytree of bool, or callable
        Which leaves are unitary: a pytree of booleans with the structure of
        the parameters, or a function of the parameters returning one. Unitary
        leaves are (..., n, n) float32/float64/complex64/complex128 arrays.
    base : {"rmsprop", "adam", "sgd"}, optional
        ``optax.rmsprop``, ``optax.adam`` or ``optax.sgd``; ``**hyperparameters``
        are passed to it by name (``decay``, ``eps``, ``centered``, ``momentum``,
        ``b1``, ``b2``, ``nesterov``, ...).
    rank, variant, oversample, power_iters
        As in :func:`unitary_lr.projunn_step`.
    drift_tol, drift_check_every
        Drift control, as in :class:`unitary_lr.optim.ProjUNN`: every
        ``drift_check_every`` steps (0: never) a probe estimate of
        ``||W^H W - I||_F / sqrt(n)`` above ``drift_tol`` (None: 1e-5 for 32-bit,
        1e-12 for 64-bit leaves) re-projects the leaf with a dense SVD, inside a
        ``jax.lax.cond`` so that it costs nothing when it is not needed.
    seed : int, optional
        Seed of the sketches' ``jax.random`` keys.

    Returns
    -------
    optax.GradientTransformation
        ``update(grads, state, params)`` needs ``params``. For a unitary leaf the
        update is ``W_new - W``, so ``optax.apply_updates`` lands on the new
        unitary matrix up to one rounding.

    Raises
    ------
    ValueError
        Unknown base or variant, a non-positive learning rate, a unitary leaf
        that is not (..., n, n) or smaller than ``rank``, update without params.
    TypeError
        Hyper-parameters the base optimizer does not take; unsupported dtypes.

    Notes
    -----
    The preconditioner is optax's: ``optax.rmsprop`` puts ``eps`` inside the
    square root by default, ``torch.optim.RMSprop`` outside, so the same
    ``base`` gives a slightly different step than the torch adapter. The
    second moment of a complex gradient is ``|g|^2`` in both. Drift control
    costs two passes over W every ``drift_check_every`` steps.

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
    if base not in _BASES:
        raise ValueError(f"base must be one of {', '.join(map(repr, _BASES))}, got {base!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    if not callable(learning_rate):
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
            math.isfinite(learning_rate) and learning_rate > 0
        ):
            raise ValueError(f"learning_rate must be a finite number > 0 or a schedule, got {learning_rate!r}")
    for name, value, minimum in (("rank", rank, 1), ("oversample", oversample, 0),
                                 ("power_iters", power_iters, 0), ("drift_check_every", drift_check_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if drift_tol is not None and not (isinstance(drift_tol, (int, float)) and drift_tol > 0):
        raise ValueError(f"drift_tol must be a number > 0 or None, got {drift_tol!r}")
    try:
        # learning rate 1: the output is minus the preconditioned direction
        preconditioner = _BASES[base](1.0, **hyperparameters)
    except TypeError as error:
        raise TypeError(f"optax.{base} does not take these hyper-parameters: {error}") from None
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def mask_of(params):
        mask = unitary(params) if callable(unitary) else unitary
        try:
            return jax.tree.map(lambda flag, _: bool(flag), mask, params)
        except ValueError as error:
            raise ValueError(f"unitary must have the tree structure of the parameters: {error}") from None

    def init(params):
        mask = mask_of(params)
        for path, (flag, leaf) in _leaves_with_paths(mask, params):
            if flag:
                _check_leaf(path, leaf, rank)
        return ProjUNNState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed),
                            base=preconditioner.init(params), notfinite_count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("projunn needs the parameters: opt.update(grads, state, params)")
        leaves = jax.tree.leaves(updates)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves else jnp.asarray(True)
        # The step runs on zeros in place of non-finite gradients so that no
        # NaN reaches the small eigen- and SVD cores, then its result is
        # dropped by the selection below (apply_if_finite's semantics).
        safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), updates)
        new_updates, new_state = _finite_update(safe, state, params)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        skipped = jnp.asarray(state.notfinite_count, jnp.int32) + jnp.where(finite, 0, 1).astype(jnp.int32)
        return new_updates, ProjUNNState(
            count=keep(new_state.count, state.count), key=state.key,
            base=jax.tree.map(keep, new_state.base, state.base), notfinite_count=skipped,
        )

    def _finite_update(updates, state, params):
        mask = mask_of(params)
        negative_directions, base_state = preconditioner.update(updates, state.base, params)
        lr = schedule(state.count)
        step_key = jax.random.fold_in(state.key, state.count)
        step = state.count + 1
        flat_mask, treedef = jax.tree.flatten(mask)
        flat_params = treedef.flatten_up_to(params)
        flat_directions = treedef.flatten_up_to(negative_directions)
        new_updates = []
        for index, (flag, W, minus_d) in enumerate(zip(flat_mask, flat_params, flat_directions)):
            if not flag:
                new_updates.append(jax.tree.map(lambda x: lr * x, minus_d))
                continue
            key = jax.random.fold_in(step_key, index)
            # torch's convention is conj(JAX's); the preconditioner commutes with conj
            direction = -jnp.conj(minus_d) if jnp.iscomplexobj(minus_d) else -minus_d
            new_updates.append(_unitary_update(W, direction, key, lr, step))
        return treedef.unflatten(new_updates), ProjUNNState(count=step, key=state.key, base=base_state,
                                                            notfinite_count=state.notfinite_count)

    # The branches of lax.cond are defined once, here: JAX caches their traces
    # by identity, so an eager (un-jitted) update does not re-trace every step.
    def keep(update, *_):
        return update

    def reproject(W, update):
        return polar_unchecked(jnp, W + update) - W

    def check(update, W, probe_key):
        tolerance = default_drift_tolerance(jnp.dtype(W.dtype).name) if drift_tol is None else drift_tol
        probes = jax.random.normal(probe_key, (*W.shape[:-2], W.shape[-1], _PROBES), dtype=W.dtype)
        drifted = jnp.max(estimate_unchecked(jnp, W + update, probes)) > tolerance
        return jax.lax.cond(drifted, reproject, lambda W, update: update, W, update)

    def _unitary_update(W, direction, key, lr, step):
        """The update ``W_new - W`` of a unitary leaf, as the thin product the
        step makes (no new W formed and subtracted again: two passes saved)."""
        sketch_key, probe_key = jax.random.split(key)
        omega = jax.random.normal(sketch_key, sketch_shape(direction, rank, oversample), dtype=direction.dtype)
        L, Rh = step_factors_unchecked(jnp, W, direction, omega, lr=lr, rank=rank, variant=variant,
                                       power_iters=power_iters, traced=True)
        update = L @ Rh
        if not drift_check_every:
            return update
        return jax.lax.cond(step % drift_check_every == 0, check, keep, update, W, probe_key)

    return optax.GradientTransformation(init, update)


def _leaves_with_paths(mask, params):
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    flat_params = jax.tree.leaves(params)
    return [(jax.tree_util.keystr(path), (flag, leaf)) for (path, flag), leaf in zip(flat_mask, flat_params)]


def _check_leaf(path, leaf, rank):
    shape = tuple(leaf.shape)
    name = jnp.dtype(leaf.dtype).name
    if name not in ("float32", "float64", "complex64", "complex128"):
        raise TypeError(f"unitary leaf {path} has dtype {name}; expected float32, float64, complex64 or complex128")
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"unitary leaf {path} must be a square matrix or a batch of them, (..., n, n), got shape {shape}")
    if rank > shape[-1]:
        raise ValueError(f"rank {rank} exceeds the size n = {shape[-1]} of unitary leaf {path} (shape {shape})")
