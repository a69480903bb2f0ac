"""projUNN as a retraction after any ``torch.optim`` optimizer: the optimizer
forms the update with its own rule (AdamW, Lion, a schedule ...), projUNN puts
the result back on the unitary group."""

from __future__ import annotations

import operator
import sys
import warnings

import array_api_compat.torch
import numpy as np
import torch

from .._host import outside_torch_graph
from .._random import generator_from_state, generator_state
from .._xp import exact_products
from ..optim import DEFAULT_VARIANT, step_drift, step_rank
from ..options import ProjUNNOptions
from ..steps import STEP_OVERSAMPLE, STEP_POWER_ITERS, projunn_step
from ._mark import is_unitary
from .optimizer import _PRECISIONS, _distributed, _name, _write_mark, _written_elsewhere, drawn_seed

__all__ = ["ProjUNNRetraction", "projunn_retraction"]


def projunn_retraction(optimizer, *, rank=None, variant=DEFAULT_VARIANT, params=None, oversample=STEP_OVERSAMPLE,
                       power_iters=STEP_POWER_ITERS, drift_tol=None, drift_check_every=50, reproject="svd",
                       seed=None):
    r"""Keep the unitary parameters of any ``torch.optim`` optimizer unitary:
    after each ``optimizer.step()``, the optimizer's update of each of them is
    replaced by the projUNN step along it.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any optimizer (``AdamW``, ``SGD``, a third-party one); its step hooks
        are used.
    rank : int or None, optional
        Rank k of the projUNN steps, ``1 <= rank <= min(n, m)``. None: 8
        (:data:`unitary_lr.options.DEFAULT_RANK`), capped at ``min(n, m)`` of
        each parameter.
    variant : {"tangent", "direct", "cayley"}, optional
        projUNN-T, projUNN-D or the Cayley step (see
        :func:`unitary_lr.projunn_step`).
    params : iterable of torch.Tensor, optional
        The parameters to keep unitary; by default every parameter of the
        optimizer's groups marked unitary (:func:`mark_unitary`,
        :func:`orthogonal`, :func:`unitary_parameter`), looked up at each step,
        so groups added later are covered. A parameter once chosen stays
        retracted if it loses its mark (see Notes).
    oversample, power_iters : int, optional
        Sketch settings (see :func:`unitary_lr.projunn_step`).
    drift_tol : float or None, optional
        Re-projection threshold for ``||W^H W - I||_F / sqrt(n)`` (None: 1e-5
        for 32-bit dtypes, 1e-12 for 64-bit ones).
    drift_check_every : int, optional
        Estimate the drift every this many steps of a parameter, and after
        its first step (which re-projects a weight marked in another
        precision, such as a float32 layer made float64), and after a step
        whose weight something else than the optimizer wrote since the
        retraction's last step (``model.load_state_dict``,
        ``model.half().float()``, ``.to()``, an in-place edit; not a write
        through ``p.data``; not in a job of several
        processes, whose ranks must check alike); 0: never.
    reproject : {"svd", "newton_schulz"}, optional
        Dense polar factor used to re-project.
    seed : int or None, optional
        Seed of the sketches' random streams (one per parameter); None draws
        it from torch's global generator (in a torch.distributed job it warns:
        replicas must draw the same seed, so pass it on every rank).

    Returns
    -------
    ProjUNNRetraction
        Holds the hooks; ``.remove()`` detaches them. Its ``state_dict()`` (the
        sketch streams and counts) is saved beside the optimizer's, and
        ``load_state_dict()`` resumes it: a resumed run takes the same steps as
        one that was not stopped.

    Raises
    ------
    TypeError
        ``optimizer`` not a ``torch.optim.Optimizer``; a parameter of another
        dtype than float32/64, complex64/128. At ``step()`` too, before the
        optimizer moves anything: a parameter made float16 or bfloat16 since
        (``module.half()``) is named, with its dtype, and no parameter changes.
    ValueError
        A bad option (named, with its value); a parameter that is not a
        matrix, or smaller than ``rank`` (at ``step()`` too, before the
        optimizer moves anything). At ``step()``, NaN or Inf in an update:
        every retracted parameter gets its value from before the step back
        (the optimizer's own state has moved) and the error names it. So does
        any other error of the projUNN step or of its drift check, which is
        raised with its own type.

    Warns
    -----
    UserWarning
        A group that holds a retracted parameter has ``weight_decay`` != 0.
        Decay on a unitary matrix is meaningless: the group has no scale to
        shrink, and the decay term ``-lr wd W`` is a full-rank part of the
        update that the rank-k sketch then has to approximate along with the
        gradient's. Put the unitary parameters in a group with
        ``weight_decay=0`` (``torch.optim.AdamW`` defaults to 0.01). Once
        per group (by its index in ``param_groups``): at construction, or,
        for a group added since (``add_param_group``) or given decay since,
        at the first ``step()`` that sees it, before the optimizer moves
        anything.

    Notes
    -----
    Before the step, each parameter's value W is kept (one copy, O(n^2)
    memory); after it, the optimizer has moved W to W + Delta with its own
    rule, and the parameter becomes ``projunn_step(W, -Delta, lr=1)``: Delta
    plays the part of ``-lr G``. With ``variant="direct"`` and a Delta of rank
    <= k this is exactly ``polar(W + Delta)``, the closest unitary matrix to
    the optimizer's result; ``"tangent"`` moves along the geodesic of Delta's
    tangent part. A parameter that the step did not change is left as it is.
    Cost per step and parameter: the projUNN step, O(k n^2), plus two passes
    over W. The optimizer's state (moments) stays Euclidean, as in
    :class:`ProjUNN`, whose preconditioned steps it reproduces for
    ``Adam``/``RMSprop`` up to the sketch. Under ``torch.compile`` of the
    optimizer's step the hooks run outside the graph, as they run without it
    (``fullgraph=True`` refuses them, naming them). The retraction is one of
    the optimizer's step post-hooks, which PyTorch runs in the order they were
    registered: a post-hook of yours registered before the retraction sees
    the optimizer's raw result, not yet unitary; register it after (or as a
    global optimizer hook, which runs after the optimizer's own hooks).

    A parameter chosen by its mark (``params=None``) stays retracted when it
    loses the mark, as it stays in :class:`ProjUNN`'s unitary group: with
    ``torch.__future__.set_swap_module_params_on_conversion(True)``,
    ``module.double()`` swaps a plain Parameter's contents into the same
    object (see :func:`mark_unitary`). Its first step in the new precision
    checks the drift and re-projects, as for a marked parameter. A retraction
    built after such a conversion does not see the parameter: mark it again
    (``mark_unitary(p)``; ``project=True`` for a float32 weight made float64)
    or pass it in ``params``.

    Examples
    --------
    >>> import torch
    >>> from unitary_lr import unitarity_error
    >>> from unitary_lr.torch import orthogonal, projunn_retraction
    >>> layer = orthogonal(torch.nn.Linear(8, 8, bias=False, dtype=torch.float64))
    >>> opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0)
    >>> retraction = projunn_retraction(opt, rank=2, seed=0)
    >>> for _ in range(5):
    ...     opt.zero_grad()
    ...     layer(torch.ones(3, 8, dtype=torch.float64)).sum().backward()
    ...     opt.step()
    >>> bool(unitarity_error(layer.weight.detach()) < 1e-13)
    True
    """
    return ProjUNNRetraction(optimizer, rank=rank, variant=variant, params=params, oversample=oversample,
                             power_iters=power_iters, drift_tol=drift_tol, drift_check_every=drift_check_every,
                             reproject=reproject, seed=seed)


_RETRACTED_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)

# Traced by Dynamo (a compiled optimizer.step), the hooks lost the retraction:
# W came out of three compiled SGD steps 0.1 away from unitary, without a word.
_OUTSIDE_GRAPH = ("it reads the update on the host, draws its sketches from NumPy generators and checks drift "
                  "there; in a graph use unitary_lr.torch.ProjUNN(..., capturable=True)")


def _caller_stacklevel():
    """The ``stacklevel`` that points a warning raised by the caller of this
    function at the first frame outside torch and unitary_lr: the line that
    built the retraction or called ``optimizer.step()`` (the hooks run under
    torch's step wrapper, ``no_grad``, ``torch.compiler.disable``, maybe a
    scheduler's or a GradScaler's wrapper)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("torch",
                                                                                                 "unitary_lr"):
        frame, level = frame.f_back, level + 1
    return level


class ProjUNNRetraction:
    """The hooks that :func:`projunn_retraction` registers, and the per-parameter
    state (sketch streams, step and re-projection counts) in ``state``.

    Examples
    --------
    A checkpoint holds the retraction's state beside the optimizer's:

    >>> import torch
    >>> from unitary_lr.torch import orthogonal, projunn_retraction
    >>> layer = orthogonal(torch.nn.Linear(4, 4, bias=False))
    >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    >>> retraction = projunn_retraction(opt, rank=1, seed=0)
    >>> layer(torch.ones(1, 4)).sum().backward()
    >>> opt.step()
    >>> checkpoint = {"optimizer": opt.state_dict(), "retraction": retraction.state_dict()}
    >>> retraction.load_state_dict(checkpoint["retraction"])
    >>> retraction.state_dict()["state"][0]["steps"]
    1
    """

    def __init__(self, optimizer, *, rank, variant, params, oversample, power_iters, drift_tol, drift_check_every,
                 reproject, seed):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            # a wrapper that is an Optimizer by class but never ran its
            # __init__ (accelerate's AcceleratedOptimizer): no step hooks, and
            # a bare AttributeError at their registration
            inner = getattr(optimizer, "optimizer", None)
            remedy = (f"pass the optimizer it wraps, its .optimizer ({type(inner).__name__})"
                      if isinstance(inner, torch.optim.Optimizer) else "pass the optimizer it wraps")
            raise TypeError(f"optimizer ({type(optimizer).__name__}) is a wrapper without the step hooks of a "
                            f"torch.optim.Optimizer, which the retraction uses: {remedy}")
        # validated as every front end validates them (the same errors)
        ProjUNNOptions(rank=rank, variant=variant, oversample=oversample, power_iters=power_iters,
                       drift_tol=drift_tol, drift_check_every=drift_check_every, reproject=reproject, seed=seed)
        self.options = {"rank": rank, "variant": variant, "oversample": oversample, "power_iters": power_iters}
        self.drift = {"drift_tol": drift_tol, "drift_check_every": drift_check_every, "reproject": reproject}
        # (the seed as the Python int it holds: a 0-d array failed at the first step)
        self.seed = drawn_seed("projunn_retraction", stacklevel=4) if seed is None else operator.index(seed)
        self.params = None if params is None else list(params)
        self.optimizer = optimizer
        self.state = {}  # parameter -> {"rng", "steps", "reprojections"}
        self._streams = 0  # sketch streams made: the next one is seeded [seed, _streams]
        self._saved = []
        # what the last step left in each parameter (see _written_elsewhere),
        # and which ones something else wrote since, seen before a step
        self._written, self._rewritten = {}, set()
        # every parameter picked for retraction so far (the keys; a dict keyed
        # by the tensor, as the state, which copy.deepcopy maps to the copies):
        # with params=None one that loses its mark since (a swap conversion)
        # stays retracted; it was dropped, and the weight left with the
        # optimizer's raw updates (0.8 from unitary after three steps).
        self._chosen = {}
        # indices of the param groups whose weight decay was warned about: once
        # each, the optimizer's load_state_dict (new group dicts) included
        self._decay_warned = set()
        targets = self._targets()
        for p, _ in targets:
            self._check(p)
        self._warn_weight_decay(targets)
        self._chosen = dict.fromkeys(p for p, _ in targets)
        self._handles = [optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(self._after)]

    def __getstate__(self):
        # what the last step left in each parameter holds its storage: a
        # pickle or deep copy would carry a second copy of every weight, for
        # a record that does not describe the copies (checked as new ones)
        return {key: value for key, value in self.__dict__.items() if key != "_written"}

    def remove(self):
        """Detach the hooks: later steps are the optimizer's own."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self):
        """The retraction's state: its seed, and for each retracted parameter
        that has stepped, keyed by the parameter's index in the optimizer's
        ``state_dict()`` (its position in the param groups, in order), its
        sketch stream's state and its step and re-projection counts. Plain
        Python ints and dicts: ``torch.save`` and ``torch.load(...,
        weights_only=True)`` take it. The options are not part of it: the
        resuming code builds the retraction with its own."""
        index = {id(p): i for i, p in enumerate(self._all_parameters())}
        state = {}
        for p, entry in self.state.items():
            if id(p) in index:  # (a parameter whose group was removed from the optimizer since)
                state[index[id(p)]] = {"rng": generator_state(entry["rng"]), "steps": entry["steps"],
                                       "reprojections": entry["reprojections"], "precision": entry["precision"]}
        return {"seed": self.seed, "streams": self._streams, "state": state}

    def load_state_dict(self, state_dict):
        """Resume from :meth:`state_dict`, for the optimizer's parameters in the
        same order. Checked whole before anything changes: a ValueError (or
        TypeError) names the first entry that does not fit."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"seed", "streams", "state"}:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"state_dict must be a dict with keys 'seed', 'streams' and 'state', as "
                             f"ProjUNNRetraction.state_dict() returns it, got {got!r}")
        seed, streams, saved = state_dict["seed"], state_dict["streams"], state_dict["state"]
        for name, value in (("seed", seed), ("streams", streams)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict['{name}'] must be an int >= 0, got {value!r}")
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict['state'] must be a dict, got {type(saved).__name__}")
        params = self._all_parameters()
        targets = {id(p) for p, _ in self._targets()}
        state = {}
        for index, entry in saved.items():
            where = f"state_dict['state'][{index!r}]"
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(f"{where}: the index must be that of one of the optimizer's {len(params)} "
                                 "parameters")
            p = params[index]
            if id(p) not in targets:
                hint = "" if self.params is not None else ": it is not marked unitary (mark_unitary marks it)"
                raise ValueError(f"{where}: the optimizer's parameter {index} (shape {tuple(p.shape)}) is not "
                                 f"retracted{hint}")
            # ("precision", the dtype of its last step, since 2026-12: absent from older state_dicts)
            if not isinstance(entry, dict) or set(entry) - {"precision"} != {"rng", "steps", "reprojections"}:
                raise ValueError(f"{where} must be a dict with keys 'rng', 'steps', 'reprojections' and "
                                 f"'precision', got {entry!r}")
            counts = (entry["steps"], entry["reprojections"])
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
                raise ValueError(f"{where}: 'steps' and 'reprojections' must be ints >= 0, got {counts!r}")
            try:
                rng = generator_from_state(entry["rng"])
            except (TypeError, ValueError, KeyError) as error:
                raise ValueError(f"{where}['rng'] is not the state of a sketch stream: {error!r}") from None
            self._check(p)
            state[p] = {"rng": rng, "steps": entry["steps"], "reprojections": entry["reprojections"],
                        "precision": entry.get("precision")}
        self.seed, self._streams, self.state = seed, max(streams, len(state)), state
        self._chosen.update(dict.fromkeys(state))

    def _all_parameters(self):
        """The optimizer's parameters in the order of its ``state_dict()``."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _targets(self):
        """(parameter, group) of every retracted parameter, in group order:
        those of ``params``; by default those marked unitary and those
        retracted before (which a swap conversion may have unmarked since)."""
        if self.params is None:
            return [(p, group) for group in self.optimizer.param_groups for p in group["params"]
                    if is_unitary(p) or p in self._chosen]
        chosen = {id(p) for p in self.params}
        return [(p, group) for group in self.optimizer.param_groups for p in group["params"] if id(p) in chosen]

    def _name(self, p):
        """The parameter's name in the optimizer's errors: its name in its
        group's ``param_names``, or ``param_groups[g]['params'][i]``."""
        for index, group in enumerate(self.optimizer.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return _name(group, index, i)
        return "(not in the optimizer's param groups)"

    def _check(self, p, changed=""):
        """A TypeError or ValueError naming ``p`` where it cannot be retracted;
        ``changed`` ends the message."""
        if p.dtype not in _RETRACTED_DTYPES:
            raise TypeError(f"retracted parameter {self._name(p)} has dtype {p.dtype} (shape {tuple(p.shape)}); "
                            f"expected float32, float64, complex64 or complex128{changed}")
        if p.dim() < 2:
            raise ValueError(f"retracted parameter {self._name(p)} must be a matrix or a batch of them, got shape "
                             f"{tuple(p.shape)}{changed}")
        if self.options["rank"] is not None and self.options["rank"] > min(p.shape[-2:]):
            raise ValueError(f"rank {self.options['rank']} exceeds the size of retracted parameter {self._name(p)} "
                             f"(shape {tuple(p.shape)}){changed}")

    def _warn_weight_decay(self, targets):
        """Warn once per param group (by index) that holds one of ``targets``
        and has weight decay: O(number of parameters and groups), no array
        work."""
        holding = {id(group) for _, group in targets}
        for index, group in enumerate(self.optimizer.param_groups):
            if index in self._decay_warned or id(group) not in holding or not group.get("weight_decay", 0):
                continue
            warnings.warn(
                f"param group {index} of the {type(self.optimizer).__name__} holds unitary parameters and has "
                f"weight_decay={group['weight_decay']!r}: decay is meaningless on a unitary matrix and pollutes "
                "the rank-k update; put the unitary parameters in a group with weight_decay=0",
                UserWarning, stacklevel=_caller_stacklevel())
            self._decay_warned.add(index)

    @outside_torch_graph(_OUTSIDE_GRAPH, name="projunn_retraction's hook before the step")
    @torch.no_grad()
    def _before(self, optimizer, args, kwargs):
        # all of them, not only those with a gradient: a closure given to
        # step() computes the gradients after this hook
        targets = self._targets()
        for p, _ in targets:
            # every one, at every step, before the optimizer moves anything: a
            # parameter of a group added (or marked) since, or one made float16
            # since (module.half()), checked after the step left every retracted
            # parameter with the optimizer's raw update
            self._check(p, changed="; no parameter was changed")
        # a group added since (add_param_group: AdamW's weight_decay=0.01)
        self._warn_weight_decay(targets)
        self._chosen.update(dict.fromkeys(p for p, _ in targets))
        self._saved = [(p, p.detach().clone()) for p, _ in targets]
        # (a retraction pickled by an earlier release has no record; in a job
        # of several processes the ranks decide their checks alike, by the
        # step count only: a collective's write is not seen)
        written = {} if _distributed() else self.__dict__.get("_written", {})
        # one seen before a step that left it as it was (a zero update) is
        # checked at its next step that moves it
        self._rewritten = {id(p) for p, _ in targets if _written_elsewhere(written.get(p), p)
                           or id(p) in self.__dict__.get("_rewritten", ())}

    @outside_torch_graph(_OUTSIDE_GRAPH, name="projunn_retraction's hook after the step")
    @torch.no_grad()
    @exact_products
    def _after(self, optimizer, args, kwargs):
        saved, self._saved = self._saved, []
        pending, fresh, streams = [], {}, []
        xp = array_api_compat.torch
        # Every new value is made before any is written, and any error (NaN in
        # an update, a drift check that failed) puts back
        # every parameter and stream: a TypeError, or an error of the drift
        # check after the first parameter was written, left the optimizer's raw
        # update, off the unitary group.
        try:
            for index, (p, W) in enumerate(saved):
                delta = p.detach() - W
                if not bool(torch.any(delta != 0)):
                    continue
                state = self.state.get(p)
                if state is None:  # (checked before the step); its stream joins the state once every step succeeded
                    state = fresh[p] = {"rng": np.random.default_rng([self.seed, self._streams + len(fresh)]),
                                        "steps": 0, "reprojections": 0, "precision": None}
                streams.append((state["rng"], state["rng"].bit_generator.state))
                new = projunn_step(W, -delta, lr=1.0, rng=state["rng"],
                                   **{**self.options, "rank": step_rank(self.options["rank"], W.shape)})
                # a first step, the first in this precision (a float32 run resumed
                # in float64), or the first since something else wrote W
                precision = _PRECISIONS[p.dtype]
                first = state["precision"] != precision or id(p) in self._rewritten
                new, reprojected = step_drift(xp, new, step=state["steps"] + 1, rng=state["rng"], seed=self.seed,
                                              first=first, **self.drift)
                pending.append((p, new, state, int(reprojected), precision))
        except Exception as error:
            for q, old in saved:  # every retracted parameter as before the step
                q.copy_(old)
            for rng, before in streams:  # and every stream: a resumed run draws the same sketches
                rng.bit_generator.state = before
            if type(error) not in (TypeError, ValueError, RuntimeError):
                raise  # (another kind, whose arguments may not be a message: as it came, the parameters restored)
            raise type(error)(f"the update of retracted parameter {index} ({self._name(p)}, shape "
                              f"{tuple(p.shape)}) by the {type(optimizer).__name__}: {error}; "
                              "the retracted parameters were restored (the optimizer's state has moved)"
                              ) from (error if type(error) is RuntimeError else None)  # (an internal failure's trace)
        self.state.update(fresh)
        self._streams += len(fresh)
        for p, new, state, reprojected, precision in pending:
            state["steps"] += 1
            state["reprojections"] += reprojected
            state["precision"] = precision
            p.copy_(new)
        # once every write is done (views of one tensor share its version
        # counter), of every target: the optimizer's own write of a zero
        # update moves the counter too
        written = self.__dict__.setdefault("_written", {})
        for p, _ in saved:
            written[p] = _write_mark(p)
        self._rewritten -= {id(p) for p, *_ in pending}

