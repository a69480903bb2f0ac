"""``unitary_lr.torch.ProjUNN``: a ``torch.optim.Optimizer``.

A thin shell over :mod:`unitary_lr.optim`: torch tensors go straight through
array-api-compat to the same rules and kernels every backend uses, so GPU
tensors stay on the GPU and nothing is copied to the host but the O(n k)
random draws of the sketches.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import numbers
import warnings
from typing import NamedTuple

import array_api_compat.torch
import numpy as np
import torch

from .._host import outside_torch_graph, stack_pays, torch_capturing, torch_graph_tracing
from .._random import generator_from_state, generator_state
from .._xp import add_in_place, exact_products, update_factors
from ..optim import (
    DEFAULT_BASE,
    DEFAULT_LR,
    DEFAULT_VARIANT,
    RULES,
    capped_rank,
    check_base,
    control_drift,
    make_rule,
    option_number,
    python_number,
    rule_hyperparameters,
    rule_options,
    rule_state_keys,
    step_drift,
    unitary_factors,
    unitary_factors_stacked,
)
from ..options import ProjUNNOptions
from ..steps import (
    STEP_OVERSAMPLE,
    STEP_POWER_ITERS,
    sketch_shape,
    step_factors_unchecked,
)
from ._fused import fused_direction
from ._mark import is_unitary
from ._plain import plain_step

__all__ = ["ProjUNN"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


class ProjUNN(torch.optim.Optimizer):
    r"""projUNN optimizer: unitary (orthogonal) matrices by rank-k projUNN steps,
    every other parameter by the plain base rule, in one optimizer.

    Parameters
    ----------
    params : iterable
        Parameters, named parameters, or parameter groups (dicts). Given
        parameters without groups, those marked unitary (see
        :func:`unitary_parameter`, :func:`mark_unitary`) form a group with
        ``unitary=True`` and the rest a plain group. In explicit groups set
        ``"unitary": True``; by default a group is unitary when all its
        parameters are marked. Plain groups are stepped by ``torch.optim``'s
        own implementation of the base rule (its functional form, foreach where
        torch uses it), with its state keys: the same updates and the same
        speed as ``torch.optim.RMSprop`` / ``Adam`` / ``SGD``.
    lr : float, optional
        Learning rate, >= 0 (per group). The default, 1e-2
        (:data:`unitary_lr.options.DEFAULT_LR`), is ``torch.optim.RMSprop``'s,
        and with ``rank=None`` it trains an orthogonal feed-forward layer;
        recurrent weights want a smaller one (``unitary_lr_scale``). See
        "Choosing lr and rank" in the documentation. At ``lr = 0`` (the
        start of a warm-up schedule) a unitary parameter stays where it is,
        but the step counts, as in :class:`unitary_lr.optim.ProjUNN`: the
        rule's moments advance (a gradient with NaN or Inf is refused, or
        skipped where ``capturable``), and an eager group's drift checks run
        on their schedule (after its first step, then every
        ``drift_check_every``), re-projecting a weight marked in another
        precision. The same holds in :func:`unitary_lr.optax.projunn`.
        (:func:`unitary_lr.projunn_step` takes an lr > 0 only.)
    base : {"rmsprop", "adam", "sgd"}, optional
        The rule that forms the Euclidean step: ``torch.optim.RMSprop``,
        ``Adam`` or ``SGD``, with their hyper-parameters below (per group). For
        a unitary parameter the step (preconditioned, as in the paper) is
        sketched to rank ``rank`` and applied with projUNN-T or projUNN-D.
    rank : int or None, optional
        Rank k of the unitary updates (per group), ``1 <= rank <= min(n, m)``:
        a larger one is a ValueError naming the parameter, when the group is
        added and at ``step()`` (as in :func:`unitary_lr.optax.projunn`; the
        framework-free :class:`unitary_lr.optim.ProjUNN`, one optimizer for
        matrices of every size, caps it instead). None: 8
        (:data:`unitary_lr.options.DEFAULT_RANK`), capped at ``min(n, m)`` of
        each parameter.
    variant : {"tangent", "direct", "cayley"}, optional
        projUNN-T, projUNN-D or the Cayley step (per group; see
        :func:`unitary_lr.projunn_step`).
    unitary : bool or None, optional
        Whether the groups are unitary (per group). None: a group is unitary
        when all its parameters are marked, plain when none is. A parameter
        marked after the optimizer was built, in a group that its marks made
        plain, is refused at ``step()``; ``unitary=False`` steps marked
        parameters plainly on purpose.
    unitary_lr_scale : float, optional
        The learning rate of a unitary group that sets no ``lr`` of its own is
        ``lr * unitary_lr_scale`` (> 0; per group, read when the group is
        added). The paper's recurrent recipe, a unitary matrix trained 32
        times slower than the rest, is ``ProjUNN(model.parameters(), lr=1e-3,
        unitary_lr_scale=1 / 32)``. The group then holds that ``lr``, so a
        scheduler that multiplies each group's lr (``StepLR``, ``LambdaLR``)
        keeps their ratio; one that sets lrs from numbers of its own
        (``OneCycleLR``'s ``max_lr``, ``CyclicLR``, ``SWALR``) needs one value
        per group, a list, or it gives every group the same lr. (A tensor
        ``lr`` gives the group a new tensor: update both, or use 1 and set the
        groups' lr yourself.)
    momentum, dampening, nesterov, weight_decay, alpha, eps, centered, betas
        Base-rule hyper-parameters, as in ``torch.optim`` (per group);
        ``betas`` a pair. NumPy numbers (and 0-d arrays) are kept as the
        Python numbers they hold, as ``lr``; so is a real 0-d tensor
        ``momentum``, ``dampening``, ``weight_decay`` or ``eps``.
        ``OneCycleLR`` and ``CyclicLR`` with ``cycle_momentum`` cycle
        ``betas[0]`` where the constructor's base is adam and ``momentum``
        where it is sgd or rmsprop, as they do for ``torch.optim``'s (they look
        at the optimizer's defaults once, not at each group): in a group added
        with another base, the term its rule uses is not cycled. Weight
        decay does not apply to unitary parameters (the group is invariant to
        scaling).
    maximize, amsgrad, decoupled_weight_decay : bool, optional
        As in ``torch.optim`` (per group): ``maximize`` (every base) steps up
        the gradient; ``amsgrad`` (adam) divides by the running maximum of the
        second moment, kept as ``state["max_exp_avg_sq"]``;
        ``decoupled_weight_decay`` (adam) makes the plain parameters' decay
        AdamW's, ``p (1 - lr weight_decay)``. A hyper-parameter set for a
        base that does not take it (``betas`` for sgd) is a TypeError, as in
        ``torch.optim``; the constructor's may serve any group's base.
    foreach : bool or None, optional
        One operation for many parameters (per group). Plain groups: as in
        ``torch.optim``, one kernel per operation for all the group's
        parameters. Unitary groups (eager, not capturable): the parameters of
        one shape, dtype and device take one batched step, with one host round
        trip for all of them instead of one each (on a GPU, one stream
        synchronisation), their sketches drawn from their own streams, so the
        updates agree with separate steps to rounding. It copies the
        parameters and their directions into a stack, which on the CPU costs
        more than it saves from about 512 x 512 up. None (the default): plain
        groups as torch.optim decides; unitary groups stack off the CPU, and
        on the CPU for matrices of at most 256 KiB each (float32 256 x 256).
    oversample, power_iters : int, optional
        Sketch settings (see :func:`unitary_lr.projunn_step`).
    drift_tol : float or None, optional
        Re-projection threshold for ``||W^H W - I||_F / sqrt(n)`` (None: 1e-5
        for 32-bit dtypes, 1e-12 for 64-bit ones).
    drift_check_every : int, optional
        Estimate the drift every this many steps of a parameter, and after
        its first step (which re-projects a weight marked in another
        precision, such as a float32 layer made float64), and after a step
        whose weight something else wrote since this optimizer's last step
        (``model.load_state_dict``, ``model.half().float()``, ``.to()``, an
        in-place edit; not a write through ``p.data``; not in a job of several
        processes, whose ranks must check alike); 0: never.
    reproject : {"svd", "newton_schulz"}, optional
        Dense polar factor used to re-project.
    seed : int or None, optional
        Seed of the sketches' random streams, one stream per parameter. None
        draws it from torch's global generator, so replicas that call
        ``torch.manual_seed`` alike draw the same sketches and stay identical;
        DistributedDataParallel does not seed them, so in a torch.distributed
        job None warns: pass the same seed on every rank.
    capturable : bool, optional
        A step that reads nothing on the host, for ``torch.compile`` and CUDA
        graphs (as ``torch.optim.Adam(capturable=True)``; per group). The
        sketches come from torch's global generator on the parameter's device
        (``seed`` is not used: seed with ``torch.manual_seed``, alike on every
        rank of a distributed job, or the replicas drift apart; a step
        compiled by Inductor draws other numbers than the eager step unless
        ``torch._inductor.config.fallback_random`` is set), the small
        cores run on the device, ``lr`` may be a tensor, the counters
        (Adam's step, ``skipped_steps``) are tensors, and every state tensor
        is written in place, keeping its storage from step to step (a
        captured graph replays into the buffers it was captured with; a state
        that is replaced instead would never advance). Nothing can be raised
        from the device: a non-finite update (NaN/Inf in a unitary
        parameter's gradient) is skipped, the parameter and its state keep
        their values and ``state[p]["skipped_steps"]`` counts it (the check
        reads the update's direction once and writes nothing of its size); plain
        parameters are not checked, as in ``torch.optim``. Drift control
        reads a number on the host, so it is not run automatically: call
        :meth:`check_drift` every few dozen steps, outside the compiled or
        captured region. Left False, a group's step compiled with
        ``torch.compile`` is its eager step, run outside the graph (its
        seed's sketches, its drift control; Dynamo, which shows every
        group of a torch.optim optimizer as capturable inside a compiled
        step, would otherwise trace the capturable step instead), and
        ``fullgraph=True`` is refused with an error that names this option.
        A group's setting may be switched between eager steps: its
        parameters' states keep their moments and step count and gain the
        other way's counters. (A compiled step reads the record of the last
        eager step or change of the groups, so step eagerly once after a
        switch.)

    Raises
    ------
    ValueError
        A negative or non-finite lr, an unknown base, variant or reproject,
        out-of-range hyper-parameters (``betas`` not a pair of numbers in
        [0, 1), a negative or non-number ``eps``), a
        unitary parameter that is not a matrix (..., n, m) with
        ``min(n, m) >= rank``, a
        group mixing marked and unmarked parameters, a unitary parameter
        listed twice in its group (tied weights), a unitary group that sets
        both ``lr`` and ``unitary_lr_scale``; at ``step()``, a gradient
        with NaN or Inf (named, with its shape; nothing is changed), also
        at ``lr = 0``, where the rule's moments would keep it, and a
        parameter marked unitary since the optimizer was built in a group
        that the marks made plain (named; nothing is changed).
    TypeError
        A unitary parameter of a dtype other than float32/64, complex64/128;
        hyper-parameters the base rule does not take (set in the
        constructor where no group's base takes them, or in a group whose
        base does not).

    Notes
    -----
    Unitary parameters are matrices or batches of them, (..., n, m), real
    (orthogonal) or complex (unitary), float32/float64/complex64/complex128:
    square, or with orthonormal columns (n > m) or rows (n < m), as
    :class:`OrthogonalLinear`'s weight.
    The second moment of a complex unitary parameter's gradient is ``|g|^2`` per
    entry; other complex parameters are treated as ``torch.optim`` treats them,
    as pairs of reals. Every gradient is checked for NaN and Inf before any
    parameter changes. ``state_dict()`` holds the random streams, so a resumed
    run repeats the steps of an uninterrupted one.

    Memory: on the CPU, an eager step of a unitary parameter allocates
    nothing of its size. The new moments and the direction go to buffers
    the optimizer keeps from step to step (outside the state), and the state
    tensors take the new values by an exchange of storages, keeping their
    identity (a view of a state tensor taken before a step does not follow
    it). That is one n x n buffer per moment plus one for the direction
    (for a real parameter two for RMSprop and three for Adam, for a complex one
    one more; none for SGD) on top of the state; a new
    tensor per step would cost more time than it saves memory, since the C
    library returns it to the system and the next step page-faults it back.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr.torch import ProjUNN, unitary_parameter
    >>> W = unitary_parameter(8, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    >>> opt = ProjUNN([W], lr=1e-2, base="adam", rank=2, seed=0)
    >>> loss = (W.real.sum() - 1) ** 2
    >>> loss.backward()
    >>> opt.step()
    >>> err = torch.linalg.matrix_norm(W.detach().mH @ W.detach() - torch.eye(8)) / 8 ** 0.5
    >>> bool(err < 1e-13)
    True

    A whole model, its unitary weight at a learning rate 32 times smaller:

    >>> from unitary_lr.torch import UnitaryRNN
    >>> rnn = UnitaryRNN(4, 8)
    >>> [group["lr"] for group in ProjUNN(rnn.parameters(), lr=1e-3, unitary_lr_scale=1 / 32).param_groups]
    [0.001, 3.125e-05]
    """

    def __init__(self, params, lr=DEFAULT_LR, *, base=DEFAULT_BASE, rank=None, variant=DEFAULT_VARIANT, unitary=None,
                 unitary_lr_scale=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 alpha=0.99, eps=1e-8, centered=False, betas=(0.9, 0.999), oversample=STEP_OVERSAMPLE,
                 power_iters=STEP_POWER_ITERS, drift_tol=None, drift_check_every=50, reproject="svd", seed=None,
                 capturable=False, foreach=None, maximize=False, amsgrad=False, decoupled_weight_decay=False):
        if seed is None:
            seed = drawn_seed("ProjUNN")
        # NumPy scalars as the Python numbers they hold (as the rules keep them)
        lr, unitary_lr_scale = python_number(lr), python_number(unitary_lr_scale)
        given = _option_numbers(dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                     alpha=alpha, eps=eps, betas=betas))
        momentum, dampening, weight_decay, alpha, eps, betas = (given[name] for name in (
            "momentum", "dampening", "weight_decay", "alpha", "eps", "betas"))
        defaults = dict(
            lr=lr, base=base, rank=rank, variant=variant, unitary=unitary, momentum=momentum, dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, alpha=alpha, eps=eps, centered=centered, betas=betas,
            oversample=oversample, power_iters=power_iters, drift_tol=drift_tol, drift_check_every=drift_check_every,
            reproject=reproject, seed=seed, capturable=capturable, unitary_lr_scale=unitary_lr_scale,
            foreach=foreach, maximize=maximize, amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay,
        )
        _check_options(defaults, where="ProjUNN")
        if base != "adam" and not _differs(betas, _signature_defaults()["betas"]):
            # torch's OneCycleLR and CyclicLR cycle betas[0] wherever the
            # defaults hold betas, momentum elsewhere: an SGD or RMSprop step
            # had its momentum left as it was. A group whose base is adam
            # takes the default betas when it is added.
            del defaults["betas"]
        super().__init__(_split_by_mark(params), defaults)
        bases = {group["base"] for group in self.param_groups}
        for name, value in _set_hyperparameters(defaults, _signature_defaults()).items():
            if not any(name in rule_hyperparameters(b) for b in bases):
                raise TypeError(_not_taken("ProjUNN", base, name, value))

    def __setstate__(self, state):
        # groups saved before an option existed (a pickle, or a state_dict
        # that load_state_dict hands over) take its default, as torch.optim's do
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in _ADDED_OPTIONS.items():
                group.setdefault(name, default)
        self._note_eager_groups()

    def load_state_dict(self, state_dict):
        """``torch.optim.Optimizer.load_state_dict``, after checks that it
        does not make, done before anything changes: each saved group was
        saved by ProjUNN, is unitary where this optimizer's group is (groups
        in another order put a unitary weight under a plain rule, which took
        it off the group without a word), and holds options a group may
        hold; each saved moment has its parameter's shape (one of another
        shape failed in the middle of a later step). A ValueError names the
        first that does not fit.

        The load's pre-hooks (``register_load_state_dict_pre_hook``) run
        first, as in torch.optim, and the checks see what they return (a hook
        that upgrades an old state_dict was refused before it ran, and one
        that changed a moment's shape got past them); the post-hooks see the
        state as it is loaded. Moments of a complex parameter take its
        precision (torch.optim casts a floating parameter's only: a complex64
        state in a complex128 model failed in Adam's step, and RMSprop kept a
        float32 moment); a unitary parameter whose precision differs from the
        saved run's (a float32 run resumed in float64) has its drift checked
        at its next step, as at a first step."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()  # (shallow, as torch.optim's: a hook may set entries)
        pre_hooks = self.__dict__.get("_optimizer_load_state_dict_pre_hooks", {})
        post_hooks = self.__dict__.get("_optimizer_load_state_dict_post_hooks", {})
        for hook in list(pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_loaded(state_dict)
        plain = [index for index, group in enumerate(self.param_groups)
                 if any(group is g for g in self._plain_groups())]
        hooks = {name: self.__dict__[name] for name in ("_optimizer_load_state_dict_pre_hooks",
                                                        "_optimizer_load_state_dict_post_hooks")
                 if name in self.__dict__}
        self.__dict__.update({name: type(kept)() for name, kept in hooks.items()})  # run here, not by torch.optim
        try:
            super().load_state_dict(state_dict)
        finally:
            self.__dict__.update(hooks)
        self.__dict__["_plain_by_mark"] = [self.param_groups[index] for index in plain]
        saved_state = state_dict.get("state") or {}
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for key, p in zip(saved_group["params"], group["params"]):
                precision = saved_state.get(key, {}).get("precision") if isinstance(saved_state, dict) else None
                if isinstance(precision, str) and p in self.state:
                    # torch.optim's load rebuilds an iterable as type(value)(generator):
                    # the str became "<generator object ...>", and every resumed
                    # run's next step counted as a first one in a new precision
                    self.state[p]["precision"] = precision
        for p, state in self.state.items():
            # torch.optim casts every saved tensor but "step" to its parameter's
            # dtype: a float64 count, whose in-place writes torch.compile drops
            # (see _capturable_counters), and a compiled step counted no
            # skipped step after a resume
            count = state.get("skipped_steps")
            if isinstance(count, torch.Tensor) and count.dtype != torch.int64:
                state["skipped_steps"] = count.real.round().to(torch.int64)
            if p.is_complex():
                state.update(_in_precision(state, p))
        seeds = {group["seed"] for group in self.param_groups}
        if len(seeds) == 1:
            # the saved run's seed, which its groups share, seeds groups added
            # later as it did there (a resumed run built with seed=None drew
            # another, and a group added after the resume stepped otherwise)
            self.defaults["seed"] = seeds.pop()
        for hook in list(post_hooks.values()):
            hook(self)

    def _check_loaded(self, state_dict):
        """:meth:`load_state_dict`'s checks, before anything changes."""
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved_groups, list) and len(saved_groups) == len(self.param_groups):
            params = []
            for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                where = f"state_dict's param group {index}"
                missing = [key for key in ("base", "unitary", "seed", "rank", "variant") if key not in saved]
                if missing:
                    raise ValueError(f"{where} lacks {', '.join(missing)}: it was not saved by ProjUNN (by a "
                                     "torch.optim optimizer?); nothing was loaded")
                if saved["unitary"] != group["unitary"]:
                    kinds = ["unitary" if flag else "plain" for flag in (group["unitary"], saved["unitary"])]
                    raise ValueError(f"param group {index} is {kinds[0]} here and {kinds[1]} in the state_dict: "
                                     "the groups differ (in another order?); nothing was loaded")
                _check_options({**group, **{k: v for k, v in saved.items() if k != "params"}}, where=where)
                params.extend((index, i, p) for i, p in enumerate(group["params"]))
                if group["unitary"]:
                    for i, p in enumerate(group["params"]):
                        _check_unitary_parameter(_name(group, index, i), p, saved["rank"])
            saved_state = state_dict.get("state")
            for key, entry in (saved_state.items() if isinstance(saved_state, dict) else ()):
                if not isinstance(key, int) or not 0 <= key < len(params) or not isinstance(entry, dict):
                    continue  # (torch.optim's own load says what is wrong there)
                index, i, p = params[key]
                for name, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"state_dict's state of {_name(self.param_groups[index], index, i)}: "
                                         f"{name} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}; "
                                         "nothing was loaded")

    def add_param_group(self, param_group):
        param_group = {**param_group, **{key: python_number(param_group[key]) for key in ("lr", "unitary_lr_scale")
                                         if key in param_group}, **_option_numbers(param_group)}
        group = {**self.defaults, **param_group}
        index = len(self.param_groups)
        given = group["params"]
        if isinstance(given, set):
            raise TypeError(f"param group {index}: its parameters must be in an ordered collection (a list), got a "
                            "set, whose order, and so the state_dict's, changes between runs")
        # once: a generator (model.parameters()) is read here and handed on as a list
        params = given = [given] if isinstance(given, torch.Tensor) else list(given)
        names = group.get("param_names")
        if params and isinstance(params[0], tuple):  # named parameters
            names, params = [n for n, _ in params], [p for _, p in params]
        names = names or [f"param_groups[{index}]['params'][{i}]" for i in range(len(params))]
        _check_options(group, where=f"param group {index}")
        # a hyper-parameter the group's own base does not take (one that
        # equals the optimizer's default is not the group's: ZeroRedundancyOptimizer
        # hands whole groups back to the constructor)
        for name, value in _set_hyperparameters(param_group, _signature_defaults(), self.defaults).items():
            if name not in rule_hyperparameters(group["base"]):
                raise TypeError(_not_taken(f"param group {index}", group["base"], name, value))
        unitary = group["unitary"]
        plain_by_mark = False
        if unitary is None:
            marked = [is_unitary(p) for p in params]
            if any(marked) and not all(marked):
                mixed = [n for n, m in zip(names, marked) if m]
                raise ValueError(
                    f"param group {index} mixes unitary parameters ({', '.join(mixed)}) with others; "
                    "put them in separate groups, set 'unitary' for the group, or give ProjUNN the parameters "
                    "without groups (model.parameters(): the marked ones get a group of their own); "
                    "transformers.Trainer forms such groups by weight decay: give it "
                    "optimizers=(ProjUNN(model.parameters(), ...), None) instead of optimizer_cls_and_kwargs"
                )
            unitary = bool(params) and all(marked)
            if not unitary:  # checked at each step: a parameter marked since would get plain steps
                plain_by_mark = True
        if unitary:
            seen = {}
            for name, p in zip(names, params):
                _check_unitary_parameter(name, p, group["rank"])
                if id(p) in seen:
                    # its updates, each computed from the same W, were both added
                    # to it: tied weights left the unitary group after one step
                    raise ValueError(f"param group {index} lists unitary parameter {seen[id(p)]} twice (also as "
                                     f"{name}): tied weights? List each parameter once (model.parameters() "
                                     "does)")
                seen[id(p)] = name
        param_group = {**param_group, "params": given, "unitary": unitary,
                       **_missing_hyperparameters(group)}
        if unitary and "lr" in param_group and param_group.get("unitary_lr_scale", 1) != 1:  # (1 scales nothing)
            raise ValueError(f"param group {index} sets both lr ({param_group['lr']!r}) and unitary_lr_scale "
                             f"({param_group['unitary_lr_scale']!r}); set one of them")
        # A scale of 1 leaves the group on the shared default lr (a tensor lr
        # of a capturable optimizer stays the one tensor a schedule updates).
        if unitary and "lr" not in param_group and group["unitary_lr_scale"] != 1:
            param_group["lr"] = self.defaults["lr"] * group["unitary_lr_scale"]
        super().add_param_group(param_group)
        if plain_by_mark:
            self._plain_groups().append(self.param_groups[-1])
        self._note_eager_groups()

    def _plain_groups(self):
        """The param groups formed as plain ones because none of their
        parameters was marked unitary (see :meth:`_check_marks`): the group
        dicts themselves, not their places, which ``del
        opt.param_groups[i]`` shifts (a group's check then fell on its
        neighbour). A pickle of an earlier release kept the places."""
        kept = self.__dict__.setdefault("_plain_by_mark", [])
        if isinstance(kept, set):
            kept = self.__dict__["_plain_by_mark"] = [self.param_groups[i] for i in sorted(kept)
                                                      if i < len(self.param_groups)]
        return kept

    @torch.no_grad()
    @exact_products
    def check_drift(self):
        """Re-project every unitary parameter whose estimated drift from the
        group is above its group's ``drift_tol``; returns how many were.

        What ``step()`` does by itself every ``drift_check_every`` steps, for
        capturable groups (which cannot read the estimate on the host inside a
        compiled or captured step). One host read per parameter.
        """
        count = 0
        for index, group in enumerate(self.param_groups):
            if not group["unitary"]:
                continue
            for i, p in enumerate(group["params"]):
                xp = array_api_compat.torch
                rng = np.random.default_rng([group["seed"], index, i, int(self.state[p].get("reprojections", 0))])
                new_p, reprojected = control_drift(xp, p.detach(), step=1, rng=rng, drift_tol=group["drift_tol"],
                                                   drift_check_every=1, reproject=group["reproject"])
                if reprojected:
                    p.copy_(new_p)
                    self.state[p]["reprojections"] = self.state[p].get("reprojections", 0) + 1
                    count += 1
                self._note_written([p])  # (its drift was just checked)
        return count

    @torch.no_grad()
    @exact_products
    def step(self, closure=None):
        """One step for every parameter with a gradient; returns the closure's loss.

        Under ``torch.compile`` a step with a unitary group that is not
        capturable runs outside the graph, as the eager step (see the
        class's ``capturable``)."""
        if not torch_graph_tracing():
            self._note_eager_groups()
            self._check_marks()
            for index, group in enumerate(self.param_groups):
                group.update(_missing_hyperparameters(group))  # a base edited into a group takes its defaults
                _check_edited_lr(group, index)
                if _torch_optim_group(group) and any(p.grad is not None for p in group["params"]):
                    # torch.optim's code steps these groups one after another,
                    # in place, once nothing else can fail: an option edited
                    # into one that it refuses would leave the groups before it
                    # stepped (the other groups' rules are made before any write)
                    self._rule(index, group)
        if self._eager_groups:
            self._refuse_capture()
            return self._step_outside_graph(closure)
        return self._step(closure)

    # Dynamo shows every group of a torch.optim optimizer with capturable=True
    # inside a compiled step (torch/_dynamo/variables/optimizer.py), whatever
    # its setting, so a traced step cannot read the setting from its groups:
    # it reads this record of them, kept by every eager step and every change
    # of the groups. A unitary group the user did not make capturable runs
    # its eager step (its seed's sketches, its drift control, its state);
    # traced as capturable, it drew other sketches, checked no drift, and
    # left a state the next eager step could not read (a KeyError). The eager
    # step runs with Dynamo disabled also where Dynamo runs this frame
    # without tracing it (after a graph break), but would trace the frames
    # it calls.
    def _check_marks(self):
        """A ValueError, before anything changes, for a parameter with a
        gradient that was marked unitary after its group was formed as a plain
        one (``orthogonal(layer)`` after ``ProjUNN(model.parameters())``): the
        group's plain steps would take it off the unitary group without a word.
        A group given ``unitary=False`` steps its marked parameters plainly, as
        asked."""
        plain = self._plain_groups()
        for index, group in enumerate(self.param_groups):
            if not any(group is g for g in plain):
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is not None and is_unitary(p):
                    raise ValueError(
                        f"ProjUNN: {_name(group, index, i)} was marked unitary after the optimizer was built, "
                        f"and param group {index} steps it as a plain parameter, which would take it off the "
                        "unitary group; build ProjUNN after marking the parameters, or give the group "
                        "unitary=False to step them plainly; no parameter was changed")

    def __getstate__(self):
        # which plain groups were formed by the marks (see _check_marks) is
        # kept through pickling and copy.deepcopy
        # (the group dicts themselves: a pickle keeps them the groups' own)
        return {**super().__getstate__(), "_plain_by_mark": list(self._plain_groups())}

    def _note_eager_groups(self):
        self._eager_groups = [index for index, group in enumerate(self.param_groups)
                              if group["unitary"] and not group["capturable"]]

    @outside_torch_graph("a unitary group is not capturable: its step draws its sketch from a NumPy generator, "
                         "checks its drift on the host and reads its small matrices there; pass capturable=True "
                         "for a step that compiles", name="unitary_lr.torch.ProjUNN.step")
    def _step_outside_graph(self, closure):
        return self._step(closure)

    def _refuse_capture(self):
        """A RuntimeError naming the first group that is not capturable where
        a CUDA graph is being captured: its eager step reads the host, which
        would end the capture with a bare CUDA error. Raised before anything
        changes."""
        if torch_capturing():
            raise RuntimeError(
                f"ProjUNN: param group {self._eager_groups[0]} is not capturable, and a CUDA graph is being "
                "captured: its step draws its sketch on the host and reads its small matrices there, which a "
                "capture cannot hold; pass capturable=True for a step that a CUDA graph captures")

    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every update is computed and checked before any parameter or state
        # changes: a step that fails for one parameter changes none.
        plain_grads = []
        for index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"ProjUNN does not support sparse gradients ({_name(group, index, i)})")
                if group["unitary"]:
                    _check_stepped_unitary(group, index, i, p)
                if not group["unitary"]:
                    plain_grads.append((p, group, index, i))
        _check_plain_gradients([entry for entry in plain_grads if not entry[1]["capturable"]])
        pending, steps, rewritten = [], [], set()
        local_checks = not _distributed()  # (replicas decide their checks alike: by the step count only)
        for index, group in enumerate(self.param_groups):
            if _torch_optim_group(group):
                continue  # stepped by torch.optim's own code below, once nothing can fail
            rule = self._rule(index, group)
            unitary = group["unitary"]
            mode = "modulus" if unitary else "components"
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                xp = array_api_compat.torch
                # (self.state is a defaultdict: a lookup of a new p would store
                # an empty state for it, there even if the step fails)
                state = dict(self.state[p]) if p in self.state else {}
                if not state:
                    state.update(rule.init(xp, p.detach(), mode))
                elif not torch_graph_tracing() and not rule_state_keys(rule) <= state.keys():
                    # a base, momentum or centered edited into the group: the
                    # moments the new rule keeps start as its first step's
                    state = {**rule.init(xp, p.detach(), mode), **state}
                _add_counters(state, p, group, index, i)
                precision = _PRECISIONS.get(p.dtype)
                if state.get("precision", precision) != precision:
                    # the parameter changed precision (model.double()) since its
                    # last step: its moments take the new one (a float32 moment
                    # of a float64 parameter failed in the fused rule)
                    state.update(_in_precision(state, p))
                scratch = self.__dict__.setdefault("_scratch", {}).setdefault(p, {}) if _uses_scratch(group, p) else None
                W = p.detach()  # once: each detach is a dispatch of its own
                fused = fused_direction(rule, p.grad, W, state, mode=mode, weight_decay=not unitary, scratch=scratch)
                if fused is None:
                    fused = rule.direction(xp, p.grad, W, state, mode=mode, weight_decay=not unitary)
                direction, new_state, *rest = fused
                commit = rest[0] if rest else None  # gives the state the new moments, once the step is certain
                if not unitary:
                    pending.append((p, group, new_state, direction, None))
                    continue
                if group["capturable"]:
                    checked_factors, new_state = _capturable_step(xp, p, direction, state, new_state, group)
                    pending.append((p, group, new_state, (checked_factors, state), _CAPTURED))
                    continue
                if local_checks and _written_elsewhere(self.__dict__.get("_written", {}).get(p), p):
                    rewritten.add(id(p))  # (read before this step's own writes, which move views' counters)
                rng = self._sketch_generator(p, new_state["sketch_rng"])
                update = [None, commit]  # the factors are filled in below, all parameters' at once
                if group["lr"] != 0:
                    steps.append(_UnitaryStep(update, p, W, direction, rng, new_state["sketch_rng"], group, index, i))
                else:  # no step to check it: the rule's new moments are checked here
                    _check_unstepped(p, direction, group, index, i)
                pending.append((p, group, new_state, update, rng))
        _unitary_factors(steps)
        for group in self.param_groups:
            if _torch_optim_group(group):
                plain_step(self.state, group)
        for p, group, new_state, update, rng in pending:
            if rng is None:
                if isinstance(group["lr"], torch.Tensor):
                    p.sub_(update * group["lr"])
                else:
                    p.add_(update, alpha=-group["lr"])
                if group["capturable"]:
                    _write_state(self.state[p], new_state, self.state[p])
                else:
                    self.state[p].update(new_state)
                continue
            if rng is _CAPTURED:
                (factors, finite), previous = update
                _add_in_place(p, *factors)
                _write_state(self.state[p], new_state, previous, keep=finite)
                self.state[p]["skipped_steps"].add_(~finite)
                continue
            factors, commit = update
            if factors is not None:
                _add_in_place(p, *factors)
            if commit is not None:
                commit()
            steps = new_state["projunn_steps"] + 1
            precision = _PRECISIONS[p.dtype]
            # a first step, or the first in this precision (a float32 run
            # resumed in float64: 7e-8 from unitary, 1e5 times the tolerance),
            # or the first since something else wrote W (a round trip through
            # float16 leaves it 3e-4 from unitary, in the precision recorded)
            new_p, reprojected = step_drift(array_api_compat.torch, p.detach(), step=steps, rng=rng,
                                            seed=group["seed"], drift_tol=group["drift_tol"],
                                            drift_check_every=group["drift_check_every"],
                                            reproject=group["reproject"],
                                            first=new_state.get("precision") != precision or id(p) in rewritten)
            if reprojected:
                p.copy_(new_p)
            saved = generator_state(rng)
            new_state.update(projunn_steps=steps, sketch_rng=saved, precision=precision,
                             reprojections=new_state.get("reprojections", 0) + reprojected)
            self.state[p].update(new_state)
            self.__dict__.setdefault("_generators", {})[p] = (dict(saved), rng)
        self._note_written(p for p, _, _, _, rng in pending if rng is not None and rng is not _CAPTURED)
        return loss

    def _note_written(self, params):
        """Records what this optimizer left in ``params`` (once all of a
        step's writes are done: parameters that are views of one tensor share
        its version counter), so that its next step sees a W that something
        else wrote and checks its drift (see ``_written_elsewhere``)."""
        written = self.__dict__.setdefault("_written", {})
        for p in params:
            written[p] = _write_mark(p)

    def _rule(self, index, group):
        """Group ``index``'s base rule, made again only when its options
        changed (a step would otherwise make and check it again, some 5 us).
        One rule per group is kept: a scheduler that cycles momentum or betas
        (``OneCycleLR``) changes them every step."""
        try:
            check_base(group["base"])  # (edited into the group after construction: a KeyError below)
        except ValueError as error:
            raise ValueError(f"param group {index}: {error}; no parameter was changed") from None
        options = rule_options(group["base"], group)
        if torch.compiler.is_compiling():
            # traced once, made afresh: a float option changed between compiled
            # calls is symbolic once Dynamo recompiles, and the key's sort
            # broke the graph ("sort with non-constant keys")
            return _group_rule(index, group["base"], options)
        try:
            key = (group["base"], *sorted(options.items()))
            hash(key)
        except TypeError:  # an option of a type that has no hash: made afresh
            return _group_rule(index, group["base"], options)
        rules = self.__dict__.setdefault("_rules", {})
        kept = rules.get(index)
        if kept is None or key not in kept:
            kept = rules[index] = {key: _group_rule(index, group["base"], options)}
        return kept[key]

    def _sketch_generator(self, p, saved):
        """The generator of p's sketches at the state ``saved`` (its
        ``state["sketch_rng"]``): the live generator its last step left,
        while the state still reads what that step saved, else one rebuilt
        from ``saved`` (10-40 us: a first, loaded or edited state). The live
        one is taken out until the step succeeds, so a step that fails
        after drawing leaves only the saved state, from which the next
        step starts again. Not part of the state: pickles and
        ``state_dict()`` carry ``saved``."""
        live = self.__dict__.setdefault("_generators", {}).pop(p, None)
        if live is not None and live[0] == saved:
            return live[1]
        return generator_from_state(saved)


# Options added after the first release, with their defaults: older saved
# param groups lack them (see ProjUNN.__setstate__).
_ADDED_OPTIONS = {"maximize": False, "amsgrad": False, "decoupled_weight_decay": False}

_CAPTURED = object()  # marks a capturable update in the list of pending ones


class _UnitaryStep(NamedTuple):
    """An eager unitary parameter's step, to be computed: ``update[0]``
    receives its factors (L, Rh)."""

    update: list
    p: torch.Tensor
    W: torch.Tensor  # p.detach()
    direction: torch.Tensor
    rng: np.random.Generator
    saved_rng: dict  # the generator's state before this step's draw
    group: dict
    index: int
    i: int


def _stacks(group, p):
    """Whether the group's eager unitary parameters of one shape, dtype and
    device take one batched step (``foreach``): always with True, never with
    False. With None (the default): off the CPU always (P separate steps cost
    P host round trips, each a stream synchronisation, and P times the
    launches), and on the CPU for matrices of at most 256 KiB, where the
    step's fixed cost outweighs copying the parameters and directions into a
    stack (``_host.stack_pays``)."""
    foreach = group.get("foreach")
    return foreach if foreach is not None else stack_pays(p)


def _unitary_factors(steps):
    """Computes every step's factors, or raises (naming the parameter) before
    anything changes. Parameters that stack (see :func:`_stacks`) are stepped
    together, P of one group, shape, dtype and device at a time; the p-th
    matrix's sketch comes from its own generator, so the factors agree with
    separate steps to rounding and every stream advances as it would there."""
    stacks = {}
    for step in steps:
        key = (step.index, tuple(step.p.shape), step.p.dtype, step.p.device) if _stacks(step.group, step.p) else id(step)
        stacks.setdefault(key, []).append(step)
    for members in stacks.values():
        if len(members) == 1:
            members[0].update[0] = _factors(members[0], members[0].rng)
            continue
        group = members[0].group
        try:
            factors = unitary_factors_stacked(
                [step.W for step in members], [step.direction for step in members], lr=group["lr"],
                rank=group["rank"], variant=group["variant"], oversample=group["oversample"],
                power_iters=group["power_iters"], rngs=[step.rng for step in members])
        except ValueError as error:
            # find the parameter to name: each alone, from its stream's saved state
            for step in members:
                _factors(step, generator_from_state(step.saved_rng))
            names = ", ".join(_name(step.group, step.index, step.i) for step in members)
            raise ValueError(f"the batched step of {names} (shape {tuple(members[0].p.shape)}): {error}; "
                             "no parameter was changed") from None
        for step, pair in zip(members, factors):
            step.update[0] = pair


def _factors(step, rng):
    """One parameter's factors, or its error as the optimizer reports it."""
    group = step.group
    try:
        # a parameter and a direction made from its gradient: the arrays need no checks of their own
        return unitary_factors(step.W, step.direction, lr=group["lr"], rank=group["rank"],
                               variant=group["variant"], rng=rng, oversample=group["oversample"],
                               power_iters=group["power_iters"], arrays_checked=True)
    except ValueError as error:
        raise ValueError(f"{_name(group, step.index, step.i)} (shape {tuple(step.p.shape)}): "
                         f"{_cause(error, step.p.grad, step.direction, group)}; no parameter was changed") from None
    except TypeError as error:  # an option of the wrong type, edited into the group after construction
        raise TypeError(f"{_name(group, step.index, step.i)} (shape {tuple(step.p.shape)}): {error}; "
                        "no parameter was changed") from None


def _check_unstepped(p, direction, group, index, i):
    """A ValueError naming the parameter, before anything changes, where the
    rule's direction for a unitary parameter that lr = 0 leaves in place is
    not finite: NaN or Inf in its gradient, or moments that overflowed. Its
    new moments are kept (as torch.optim's are at lr = 0), and a step that
    would have refused them must refuse them here too: they were stored,
    and every later step failed on them, blaming a finite gradient."""
    if not _all_finite(direction):
        raise ValueError(f"{_name(group, index, i)} (shape {tuple(p.shape)}): "
                         f"{_cause(ValueError('its gradient contains NaN or Inf'), p.grad, direction, group)}; "
                         "no parameter was changed")


def _check_stepped_unitary(group, index, i, p):
    """The constructor's checks of a unitary parameter, again at a step: the
    parameter (``module.half()``) or its group's rank may have changed since
    (a rank above its size was capped without a word). Nothing is changed."""
    rank = group["rank"]
    rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None  # (another type: _rule names it)
    if p.dtype in _FLOAT_DTYPES and (rank is None or rank <= min(p.shape[-2:])):
        return  # (the common case, without a name to format)
    try:
        _check_unitary_parameter(_name(group, index, i), p, rank)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{error}; no parameter was changed") from None


def _group_rule(index, base, options):
    """The base rule of param group ``index``; an option it refuses (edited
    into the group since: ``eps=None``, a single beta) is named with the
    group."""
    try:
        return make_rule(base, **options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"param group {index}: {error}; no parameter was changed") from None


def _torch_optim_group(group):
    """Whether torch.optim's own implementation steps the group: a plain one
    that is not capturable. A capturable plain group keeps the rules of
    unitary_lr.optim, which read nothing on the host on any device (torch.optim
    refuses ``capturable=True`` on the CPU)."""
    return not group["unitary"] and not group["capturable"]


def drawn_seed(what, stacklevel=3):
    """A sketch seed for ``seed=None``, drawn from torch's global generator.
    In a torch.distributed job of two or more processes it warns: replicas
    draw the same seed only where every rank called ``torch.manual_seed``
    alike, which DistributedDataParallel does not do for them (ranks seeded
    ``base + rank`` drew other sketches, and the replicas drifted apart
    without a word, 7e-3 after 5 steps)."""
    if _distributed():
        warnings.warn(f"{what}(seed=None) in a torch.distributed job draws its sketch seed from torch's global "
                      "generator: the replicas stay identical only if every rank called torch.manual_seed alike. "
                      "Pass the same seed=<int> on every rank", UserWarning, stacklevel=stacklevel)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# the precision a unitary parameter's state records (its dtype's name: a
# string, which any torch.load takes)
_PRECISIONS = {dtype: str(dtype).split(".")[-1] for dtype in (torch.float32, torch.float64, torch.complex64,
                                                              torch.complex128, torch.float16, torch.bfloat16)}


def _in_precision(state, p):
    """The moments of ``state`` (its tensors of p's shape) in p's precision:
    complex ones in p's dtype, real ones in its real dtype (the second moment
    |g|^2 of a complex parameter); the counters as they are."""
    real = p.real.dtype if p.is_complex() else p.dtype
    return {key: value.to(p.dtype if value.is_complex() else real) for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == p.shape
            and value.dtype != (p.dtype if value.is_complex() else real)}


def _add_counters(state, p, group, index, i):
    """The counters of the group's way of stepping that ``state`` (a copy of
    the stored one, or the rule's initial state) lacks: those of a
    capturable group (:func:`_capturable_counters`) or an eager unitary one
    (its step count and its sketches' stream, seeded from the group's seed
    and the parameter's place). On a first step; and where a group's
    ``capturable`` was switched in ``param_groups`` after its parameters'
    states were made, which took the other way's state (a KeyError, and to
    eager, after the parameter had moved). Both keep the rule's moments and
    its step count."""
    if group["capturable"]:
        if "skipped_steps" not in state:
            state.update(_capturable_counters(state, p))
    elif group["unitary"] and "sketch_rng" not in state:
        state["projunn_steps"] = 0
        state["sketch_rng"] = generator_state(np.random.default_rng([group["seed"], index, i]))


def _capturable_counters(state, p):
    """Device-side counters of a capturable parameter: a Python number in the
    state would be a constant to torch.compile (a recompilation per step).
    Adam's step count (0 on a first step, or the count an eager state kept)
    is a float32 tensor, as in torch.optim's capturable Adam (exact up to
    2^24 steps); a 64-bit parameter's bias corrections are computed from it
    in float64 (see ``Adam.direction``). Not a float64 tensor:
    torch.compile (PyTorch 2.13, CPU) drops every in-place write to a 0-d
    float64 CPU tensor, and the count would stay at 1."""
    counters = {"skipped_steps": torch.zeros((), dtype=torch.int64, device=p.device)}
    if "step" in state:
        counters["step"] = torch.full((), float(state["step"]), dtype=torch.float32, device=p.device)
    return counters


def _uses_scratch(group, p):
    """Whether the eager unitary step of ``p`` has the fused rule write the new
    moments and the direction into buffers the optimizer keeps from step to
    step (see ``_fused``): on the CPU, where a new n x n tensor per step is
    page-faulted back from the system. A GPU's caching allocator serves new
    tensors from the blocks the last step freed, at no such cost."""
    return group["unitary"] and not group["capturable"] and p.is_cpu


def _capturable_step(xp, p, direction, state, new_state, group):
    """The unitary update of a capturable group, with nothing read on the host:
    the sketch from torch's generator on the parameter's device, the small
    cores on the device. A non-finite update (NaN/Inf in the gradient) is
    skipped: the parameter and the rule's state keep their values and
    ``state["skipped_steps"]`` counts it."""
    W = p.detach()
    rank = capped_rank(group["rank"], W.shape)
    square = W.shape[-1] == W.shape[-2]
    if W.is_cuda and torch.cuda.is_current_stream_capturing() and \
            not captures_in_cuda_graph(rank, group["variant"], square=square):
        # before the first library call that cannot be captured: that call
        # would invalidate the capture, and torch.cuda.graph's exit would then
        # report a bare CUDA error in place of this one
        raise RuntimeError(_UNCAPTURED.format(rank=rank, variant=group["variant"]))
    # A NaN/Inf in the direction reaches the small cores as zeros (see
    # DeviceCores.gather) and the factors as NaN, which the check below drops.
    finite = _finite_flag(direction)
    shape = sketch_shape(direction, rank, group["oversample"])
    omega = None
    if shape is not None:
        *batch, n, l = shape
        omega = torch.randn((*batch, l, n), dtype=direction.dtype, device=W.device).mT
    lr = group["lr"]
    if torch.compiler.is_compiling() and not isinstance(lr, torch.Tensor):
        # A float lr that changed between compiled calls is symbolic once
        # Dynamo recompiles, which the cores' paths for Python numbers (exact
        # products, closed forms) cannot take: compiled, lr is a tensor
        lr = torch.scalar_tensor(lr, dtype=torch.float64 if W.device.type != "mps" else W.real.dtype,
                                 device=W.device)
    try:
        L, Rh = step_factors_unchecked(xp, W, direction, omega, lr=lr, rank=rank,
                                       variant=group["variant"], power_iters=group["power_iters"], traced=True)
    except RuntimeError as error:
        if W.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(_UNCAPTURED.format(rank=rank, variant=group["variant"])) from error
        raise
    # The factors are bounded (|L| <= 2, |Rh| <= 1 entrywise for unitary W and
    # orthonormal Q): their sums are finite exactly when every entry is.
    finite = finite & _finite_numbers(L.sum(), Rh.sum())
    L, Rh = torch.where(finite, L, 0.0), torch.where(finite, Rh, 0.0)
    return ((L, Rh), finite), new_state


def captures_in_cuda_graph(rank, variant, *, square=True):
    """Whether a capturable step of this rank and variant can be captured in a
    CUDA graph: rank 1 'tangent' and 'cayley', whose small cores are closed
    forms, and rank 1 'direct' on a square W (its polar factor of a 2 x 2
    matrix is a closed form too, ``_cores._polar_2x2``; a rectangular W's
    direct core takes the SVD of a stacked matrix). The others call
    torch.linalg.eigh or torch.linalg.svd, whose CUDA kernels synchronise
    with the host (seen on an H200 with PyTorch 2.11, 2026-12-04:
    cusolverDnXsyevd failed under capture, rank 8)."""
    return rank == 1 and (variant != "direct" or square)


# What a CUDA-graph capture of a capturable step that cannot be captured
# reports, in place of the CUDA error of the library call.
_UNCAPTURED = (
    "ProjUNN(capturable=True) could not capture this step (rank {rank}, variant {variant!r}) in a CUDA "
    "graph: at rank 2 or more (the default rank is 8), and in the 'direct' variant of a rectangular "
    "matrix, the traced step's small cores call torch.linalg.eigh or torch.linalg.svd, which PyTorch "
    "cannot capture (pytorch/pytorch#188355, #195731). Rank-1 'tangent' and 'cayley' steps, and "
    "rank-1 'direct' steps of square matrices, use closed forms and call no library solver; "
    "torch.compile without CUDA graphs runs every rank and variant."
)


def _write_state(stored, new_state, previous, keep=None):
    """The new state written into the stored one. A tensor that replaces one
    of the same shape, dtype and device in ``previous`` (the state the step
    started from: on a first step, the rule's initial state, not yet stored)
    is written into that tensor in place, so that the state keeps its
    storage from step to step, as a captured CUDA graph needs (a replay
    writes into the buffers it was captured with); with ``keep`` (a bool
    tensor), the previous values stay where it is False, with no read on the
    host. Anything else replaces the stored value."""
    for key, value in new_state.items():
        old = previous.get(key)
        if (isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and value is not old
                and value.shape == old.shape and value.dtype == old.dtype and value.device == old.device):
            if keep is None:
                old.copy_(value)
            else:
                torch.where(keep, value, old, out=old)
            value = old
        stored[key] = value


def _cause(error, grad, direction, group):
    """What a refused step reports: the step's error, or, where the gradient
    is finite and the rule's direction is not, the rule's moments, whose
    squares overflowed (read on this error path only)."""
    if group["base"] == "sgd" or not bool(torch.isfinite(grad).all()) or bool(torch.isfinite(direction).all()):
        return str(error)
    largest = float(grad.abs().max())
    return (f"its gradient is too large for the {group['base']} rule's moments in {str(grad.dtype).split('.')[-1]} "
            f"(largest |entry| {largest:.3g}: its square overflows); scale the gradient (or the loss) down")


def _finite_flag(tensor):
    """Whether no entry of the tensor is NaN or Inf, as a bool tensor on its
    device, from one reduction that reads it once: its smallest and largest
    entries (of the real and imaginary parts), which a NaN or an Inf becomes.
    No n x n mask is written (``isfinite(t).all()`` writes one, and takes two
    to four passes), and no sum can overflow to a false alarm."""
    if tensor.numel() == 0:  # no entry (a shape, not a value: no branch on data)
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    values = torch.view_as_real(tensor.resolve_conj()) if tensor.is_complex() else tensor
    smallest, largest = torch.aminmax(values)
    return _finite_numbers(smallest, largest)


def _finite_numbers(*numbers):
    """Whether the 0-d tensors are all finite, as a bool tensor: the largest
    of their magnitudes (NaN wherever one is NaN: ``maximum`` propagates it)
    is below Inf. Two operations per real number (four per complex one),
    where ``torch.isfinite`` dispatches four, each a kernel on a GPU; no sum
    to overflow. (The form before, ``x * 0 == 0``, Inductor simplified to
    True under torch.compile: a compiled capturable step wrote a NaN
    gradient's update into the parameter.)"""
    largest = None
    for x in numbers:
        # a complex number's parts: |z| of a finite z can overflow
        for part in (x.real, x.imag) if x.is_complex() else (x,):
            largest = part.abs() if largest is None else torch.maximum(largest, part.abs())
    return largest < math.inf


def _name(group, index, i):
    names = group.get("param_names")
    return names[i] if names else f"param_groups[{index}]['params'][{i}]"


def _check_plain_gradients(entries):
    """NaN/Inf in the gradients of plain parameters, ``(p, group, index, i)``
    entries (a name is made only for the error), with one host read per
    device. A sum is non-finite exactly when
    an entry is, or when it overflows: only then is the exact elementwise test
    paid. The sums are stacked as they come, in the gradient's own dtype: a
    conversion per gradient cost as much as the sums on a model of many small
    parameters, where this check is the only work torch.optim does not do."""
    if not entries:
        return
    sums = {}
    for p, *_ in entries:
        sums.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad.sum())
    finite = {}
    for (device, _), group in sums.items():
        finite.setdefault(device, []).append(torch.isfinite(torch.stack(group)).all())
    if all(bool(torch.stack(flags).all()) for flags in finite.values()):
        return
    for p, group, index, i in entries:
        if not _all_finite(p.grad):
            raise ValueError(f"the gradient of {_name(group, index, i)} (shape {tuple(p.shape)}) contains NaN or Inf; "
                             "no parameter was changed")


def _all_finite(tensor):
    """Whether no entry is NaN or Inf. A sum is NaN or Inf exactly when an entry
    is, or when it overflows: one cheap pass decides, and only a non-finite sum
    pays for the exact elementwise test (10x slower: it writes a mask)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _distributed():
    """Whether this process is one of several of a torch.distributed job."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return distributed and torch.distributed.get_world_size() > 1


def _write_mark(p):
    """What a step leaves in ``p``, for :func:`_written_elsewhere`: its
    storage (held) and its version counter."""
    return p.untyped_storage(), p._version


def _written_elsewhere(mark, p):
    """Whether ``p`` holds other values than the step that left ``mark``
    wrote into it (``mark`` None: no step of this optimizer yet, which
    checks nothing more: a resumed run takes the steps of one never
    stopped, where its weight is the saved one). Its storage is
    held, so that no new tensor takes its place at the same address (as the
    float32 copy of ``module.half().float()`` does); every in-place write
    (``load_state_dict``'s copy, an edit under ``torch.no_grad()``) moves
    its version counter. A write through ``p.data`` moves neither, and is
    not seen; nor is a collective's (``torch.distributed.broadcast``), so
    in a job of several processes the step does not ask (a check on one
    rank only would re-project the replicas apart)."""
    if mark is None:
        return False
    storage, version = mark
    return version != p._version or storage.data_ptr() != p.untyped_storage().data_ptr()


def _add_in_place(p, L, Rh):
    """p += L @ Rh without an n x n temporary: one fused pass over p."""
    L, Rh = update_factors(array_api_compat.torch, p, L, Rh)
    if p.dim() == 2:
        add_in_place(p, L, Rh)
    elif p.is_contiguous():
        (n, m), r = p.shape[-2:], L.shape[-1]
        p.view(-1, n, m).baddbmm_(L.expand(*p.shape[:-1], r).reshape(-1, n, r),
                                  Rh.expand(*p.shape[:-2], r, m).reshape(-1, r, m))
    else:
        p.add_(L @ Rh)


def _missing_hyperparameters(group):
    """The hyper-parameters of the group's base that the group lacks, at
    their defaults (nothing for a base that is not one: the step names it)."""
    base = group.get("base")
    if not isinstance(base, str) or base not in RULES:
        return {}
    defaults = _signature_defaults()
    return {name: defaults[name] for name in rule_hyperparameters(base) if name not in group and name in defaults}


def _split_by_mark(params):
    """Parameters given without groups: the marked ones in a unitary group."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"params must be an iterable of tensors or of dicts, got a {type(params).__name__}")
    params = list(params)
    if not params or isinstance(params[0], dict):
        return params
    named = isinstance(params[0], tuple)
    tensors = [p[1] if named else p for p in params]
    marked = [is_unitary(p) for p in tensors]
    if all(marked) or not any(marked):
        return params
    # (no 'unitary' of their own: the constructor's, or the marks, decide it)
    return [{"params": [p for p, m in zip(params, marked) if m == flag]} for flag in (False, True)]


@functools.cache
def _signature_defaults():
    """The base-rule hyper-parameters of ``ProjUNN()`` and their defaults."""
    names = frozenset().union(*(rule_hyperparameters(base) for base in RULES))
    parameters = inspect.signature(ProjUNN.__init__).parameters
    return {name: parameters[name].default for name in names if name in parameters}


def _differs(value, default):
    """Whether an option's value differs from a default: arrays that do not
    compare to one bool (``betas=np.array([0.9, 0.999])``, whose comparison
    was NumPy's "truth value of an array ... is ambiguous") differ."""
    try:
        return bool(value != default)
    except (TypeError, RuntimeError, ValueError):  # tensors that do not compare to one bool
        return True


def _set_hyperparameters(options, signature, *others):
    """The base-rule hyper-parameters in ``options`` (the names in
    ``signature``) whose values differ from their defaults there and in each
    of the ``others`` (dicts): those a caller set."""
    return {name: value for name, value in options.items() if name in signature
            and all(_differs(value, d[name]) for d in (signature, *others) if name in d)}


# The hyper-parameters the rules take as numbers only; a NumPy number or a
# real 0-d tensor there is the number it holds (as lr takes them).
_NUMBER_OPTIONS = ("momentum", "dampening", "weight_decay", "eps")


def _option_numbers(options):
    """The base-rule hyper-parameters of ``options`` as the group keeps
    them: NumPy scalars and 0-d arrays (in ``betas`` too) as the Python
    numbers they hold, as ``lr``; a real 0-d tensor eps, momentum, dampening
    or weight_decay (which torch.optim takes) as its number, since the rules
    take numbers there. A 0-d NumPy eps was kept, and torch.optim's step of a
    plain group failed on it ("add_(): argument 'other' must be Tensor, not
    numpy.ndarray"); a tensor eps was refused as "not a finite number >= 0".
    Tensors of ``alpha`` and ``betas`` stay tensors, as in torch.optim.
    Anything else is as given, for the checks to name."""
    converted = {}
    for name in (*_NUMBER_OPTIONS, "alpha", "betas"):
        if name not in options:
            continue
        value = options[name]
        if name in _NUMBER_OPTIONS:
            converted[name] = option_number(value)
        elif name == "alpha":
            converted[name] = python_number(value)
        elif isinstance(value, (tuple, list)):
            converted[name] = type(value)(python_number(beta) for beta in value)
        else:
            converted[name] = value
    return converted


def _not_taken(where, base, name, value):
    return (f"{where}: base={base!r} does not take {name}={value!r}; it takes "
            f"{', '.join(sorted(rule_hyperparameters(base)))}")


def _check_edited_lr(group, index):
    """A number lr edited into a group (by hand, or by a scheduler), checked at
    each step on the host, where it costs nothing: a capturable group's step
    checks nothing there, and a NaN lr reached its small cores (a bare
    LinAlgError from eigh), a negative one stepped uphill. A tensor lr is not
    read (a synchronisation on a GPU): its shape and dtype are checked, and a
    foreach group that is not capturable refuses it, as at construction
    (torch.optim's foreach code refused it after the groups before had
    stepped)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        # its shape, dtype and the group's flags are known without a read
        if lr.dim() != 0 or lr.is_complex():
            raise ValueError(f"param group {index}: lr must be a number or a real 0-d tensor (torch.tensor(0.01)), "
                             f"got {lr!r}; no parameter was changed")
        if group.get("foreach") and not group["capturable"]:
            raise ValueError(f"param group {index}: foreach=True needs a number lr or capturable=True, got "
                             f"lr={lr!r}; no parameter was changed")
        return
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 <= lr < math.inf:
        raise ValueError(f"param group {index}: lr must be a finite number >= 0, got {lr!r}; no parameter was "
                         "changed")


def _check_options(group, *, where):
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        # (torch.optim takes a tensor of one element of any shape; a step here
        # needs a 0-d one: a tensor of shape (1,) passed and every eager step failed)
        if lr.dim() != 0 or lr.is_complex():
            raise ValueError(f"{where}: lr must be a number or a real 0-d tensor (torch.tensor(0.01)), got {lr!r}")
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where}: lr must be a real number, got {type(group['lr']).__name__} {group['lr']!r}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {group['lr']!r}")
    try:
        check_base(group["base"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    for flag in ("capturable", *_ADDED_OPTIONS):
        if not isinstance(group.get(flag, False), bool):
            raise ValueError(f"{where}: {flag} must be True or False, got {group[flag]!r}")
    try:
        make_rule(group["base"], **rule_options(group["base"], group))  # validates the hyper-parameters
        # the options every front end shares, checked by one object
        ProjUNNOptions.from_kwargs(group)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    # the seed as the Python int it holds (a 0-d array or tensor passed the
    # check and failed at the first step, in NumPy's default_rng)
    group["seed"] = operator.index(group["seed"])
    if group["unitary"] not in (None, True, False):
        raise ValueError(f"{where}: unitary must be True, False or None, got {group['unitary']!r}")
    scale = group.get("unitary_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: unitary_lr_scale must be a finite number > 0, got {scale!r}")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"{where}: foreach must be True, False or None, got {group['foreach']!r}")
    if group.get("foreach") and isinstance(group["lr"], torch.Tensor) and not group["capturable"]:
        # torch.optim's foreach kernels would refuse it at the first step
        raise ValueError(f"{where}: foreach=True needs a number lr or capturable=True, got lr={group['lr']!r}")


def _check_unitary_parameter(name, p, rank):
    shape = tuple(p.shape)
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(p).__name__}")
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"unitary parameter {name} has dtype {p.dtype}; expected float32, float64, complex64 or complex128")
    if len(shape) < 2:
        raise ValueError(f"unitary parameter {name} must be a matrix or a batch of them, (..., n, m), "
                         f"got shape {shape}")
    if rank is not None and rank > min(shape[-2:]):
        raise ValueError(f"rank {rank} exceeds min(n, m) = {min(shape[-2:])} of unitary parameter {name} "
                         f"(shape {shape})")
