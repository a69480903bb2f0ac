"""Householder transformation adaptation (HTA) as a PEFT method (optional:
``pip install "unitary-lr[peft]"``).

Importing this module registers the method ``"HTA"`` with the installed PEFT,
so that ``peft.get_peft_model(model, HTAConfig(...))``,
``PeftModel.from_pretrained``, ``merge_and_unload``, ``disable_adapter`` and
several named adapters work as with PEFT's own methods. The adapter parameters
are named ``hta_reflectors_out``, ``hta_reflectors_in`` and ``hta_sigma``.

PEFT offers no public way for another package to add a method (its
``register_peft_method`` accepts only the names of its own closed ``PeftType``
enumeration), so this module fills PEFT's method tables with the string type
``"HTA"`` itself. That relies on PEFT's internals; the import checks that the
installed PEFT is a version this was tested with and refuses others with an
ImportError that says which versions work.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _peft_support
from ._peft_support import check_peft_version
from ._validation import check_int
from .torch.adapters import (_find_tied, _still_tied, _unit_columns, _used_elsewhere, householder_delta,
                             householder_delta_weight)

#: The ``peft_type`` of :class:`~unitary_lr.peft.HTAConfig`, under which PEFT's tables know the method.
PEFT_TYPE = "HTA"

#: The PEFT releases this module is tested with, as [lowest, first untested):
#: it fills PEFT's method tables and subclasses its tuner classes, which are
#: internal to PEFT and change between minor releases.
TESTED_PEFT_VERSIONS = _peft_support.TESTED_PEFT_VERSIONS
PREFIX = "hta_"

__all__ = ["HTAConfig", "HTALayer", "HTALinear", "HTAModel", "PEFT_TYPE", "TESTED_PEFT_VERSIONS", "check_peft_version"]

try:
    import peft
except ImportError as error:
    raise ImportError(f"unitary_lr.peft needs PEFT: pip install 'unitary-lr[peft]' ({error})") from None

check_peft_version(peft.__version__)

from peft.config import PeftConfig  # noqa: E402 - only once the version is known to be one that has them
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import (  # noqa: E402
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
)


@dataclass
class HTAConfig(PeftConfig):
    """The settings of HTA adapters, with PEFT's option names.

    Parameters
    ----------
    r : int, optional
        Householder reflections j on each side of every adapted layer,
        ``1 <= r <= min(out_features, in_features)``; each layer gets
        ``(out_features + in_features) r + min(out_features, in_features)``
        parameters. A NumPy integer is taken too (and stored as an int, so
        that the config saves as JSON).
    target_modules : list of str or str
        The ``nn.Linear`` layers to adapt: names matched against the qualified
        name or its last dotted parts (``["q", "v"]``), or a regular
        expression for the whole name, as in PEFT's other methods. Required
        (models from outside ``transformers`` have no default).
    exclude_modules : list of str or str, optional
        Layers to leave out, matched the same way.
    init_weights : bool, optional
        True: sigma = 0, so the adapted model starts as the base model. False:
        a small random sigma (for tests of merging and saving).
    layers_to_transform : int or list of int, optional
        Only the layers of these indices (>= 0; NumPy integers too, stored
        as ints) in the model's layer list (with ``layers_pattern``, as in
        PEFT).
    layers_pattern : str or list of str, optional
        The name of the layer list (``"layers"``, ``"h"``).
    modules_to_save : list of str, optional
        Other modules to train and save with the adapters (a new classifier
        head).

    Raises
    ------
    TypeError
        ``r`` is not an integer (a bool or a float), ``layers_to_transform``
        not an integer or a list of integers, ``init_weights`` not a bool.
    ValueError
        ``r < 1``, a negative index in ``layers_to_transform``; a regular
        expression ``target_modules`` together with ``layers_to_transform``
        or ``layers_pattern``.

    Examples
    --------
    >>> import peft, torch
    >>> from unitary_lr.peft import HTAConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> adapted = peft.get_peft_model(model, HTAConfig(r=2, target_modules=["0"]))
    >>> adapted.print_trainable_parameters()
    trainable params: 40 || all params: 130 || trainable%: 30.7692
    """

    r: int = field(default=1, metadata={"help": "Householder reflections on each side of every adapted layer"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "names or a regular expression of the nn.Linear layers to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "names or a regular expression of layers to leave out"})
    init_weights: bool = field(default=True, metadata={"help": "sigma = 0 at start (the base model's outputs)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "indices of the layers to adapt in the layer list"})
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "name of the layer list, with layers_to_transform"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "other modules to train and save with the adapters"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        # (NumPy integers too, stored as Python ints: the config is saved as JSON)
        r = check_int("HTAConfig.r", self.r)
        if r < 1:
            raise ValueError(f"HTAConfig.r must be >= 1 (reflections per side), got {self.r!r}")
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, (list, tuple)):
                layers = [check_int("HTAConfig.layers_to_transform", i, minimum=0) for i in layers]
            else:
                try:
                    layers = check_int("HTAConfig.layers_to_transform", layers, minimum=0)
                except TypeError:
                    raise TypeError(f"HTAConfig.layers_to_transform must be an integer or a list of integers, got "
                                    f"{type(layers).__name__}: {layers!r}") from None
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"HTAConfig.init_weights must be a bool, got {type(self.init_weights).__name__}: "
                            f"{self.init_weights!r}")
        # PEFT's matching expects sets for name lists (and writes them back as lists)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(f"HTAConfig: layers_to_transform and layers_pattern need target_modules as a list of "
                             f"names, not the regular expression {self.target_modules!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"HTAConfig: layers_pattern={self.layers_pattern!r} needs layers_to_transform")
        self.r, self.layers_to_transform = r, layers


class HTALayer(BaseTunerLayer):
    """The HTA adapters of one wrapped layer, one entry per adapter name in
    each of ``hta_reflectors_out`` (n_out x r), ``hta_reflectors_in``
    (n_in x r) and ``hta_sigma`` (min(n_out, n_in)); the update is
    :class:`unitary_lr.torch.HouseholderAdapter`'s."""

    adapter_layer_names = ("hta_reflectors_out", "hta_reflectors_in", "hta_sigma")
    other_param_names = ("hta_r",)
    # the other places of the model that hold the base weight (the same Parameter), found by
    # HTAModel.inject_adapter: merging would change them too, so merge() refuses while one still does
    _hta_tied = ()

    def __init__(self, base_layer, **kwargs) -> None:
        self.base_layer = base_layer
        self.hta_r = {}
        self.hta_reflectors_out = nn.ParameterDict({})
        self.hta_reflectors_in = nn.ParameterDict({})
        self.hta_sigma = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"HTA adapts torch.nn.Linear layers only, got {type(base).__name__}: {base!r}"[:200])
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name, r, *, init_weights=True, inference_mode=False, name=None):
        """Add the adapter ``adapter_name`` with ``r`` reflections a side."""
        r = _check_r(r, self.get_base_layer(), name)
        limit = min(self.in_features, self.out_features)
        weight = self.get_base_layer().weight
        options = {"dtype": weight.dtype, "device": weight.device, "generator": None}  # torch's global generator
        self.hta_r[adapter_name] = r
        self.hta_reflectors_out[adapter_name] = nn.Parameter(_unit_columns(self.out_features, r, **options))
        self.hta_reflectors_in[adapter_name] = nn.Parameter(_unit_columns(self.in_features, r, **options))
        sigma = torch.zeros(limit, dtype=weight.dtype, device=weight.device)
        if not init_weights:
            # not the identity at start: what tests of merging and saving need
            sigma = 0.1 * torch.randn(limit, dtype=weight.dtype, device=weight.device)
        self.hta_sigma[adapter_name] = nn.Parameter(sigma)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _factors(self, adapter_name):
        return (self.hta_reflectors_out[adapter_name], self.hta_reflectors_in[adapter_name],
                self.hta_sigma[adapter_name])

    def get_delta_weight(self, adapter_name):
        """Delta W of ``adapter_name`` (n_out x n_in), computed in 64-bit
        precision and returned in the weight's dtype."""
        delta = householder_delta_weight(*self._factors(adapter_name), self.in_features)
        return delta.to(self.get_base_layer().weight.dtype)


class HTALinear(nn.Module, HTALayer):
    """An ``nn.Linear`` with HTA adapters, as PEFT wraps it
    (``base_layer`` holds the frozen layer)."""

    def __init__(self, base_layer, adapter_name, *, r=1, init_weights=True, inference_mode=False, name=None,
                 **kwargs) -> None:
        super().__init__()
        HTALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, init_weights=init_weights, inference_mode=inference_mode, name=name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active adapters (or ``adapter_names``) into the base weight;
        ``safe_merge`` checks the merged weight for NaN/Inf before changing it.

        Raises ValueError, changing nothing, when the base weight is tied to
        other places of the model (the same Parameter, as tied input and
        output embeddings share theirs, or as one ``nn.Linear`` used at two
        places has it: PEFT wraps such a layer at its first name only), as
        ``get_peft_model`` found them:
        merging would change those places too. A layer made directly, outside
        a PEFT model, knows of no ties."""
        base = self.get_base_layer()
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.hta_sigma]
        tied = _still_tied(self._hta_tied, base.weight, memory=False)
        if names and tied:
            raise ValueError(_tied_message([f"the weight of the layer {base} is also {', '.join(tied)}"],
                                           shared=_shared(self)))
        for name in names:
            merged = base.weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging the HTA adapter {name!r} gives NaN or Inf weights; nothing was merged")
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight (to its rounding)."""
        if not self.merged:
            warnings.warn("no HTA adapter is merged; nothing to unmerge", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.hta_sigma:
                base.weight.data = base.weight.data - self.get_delta_weight(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus every active adapter's ``x Delta W^T``
        (the base layer alone when the adapters are disabled or merged)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        for name in self.active_adapters:
            if name in self.hta_sigma:
                reflectors_out, reflectors_in, sigma = self._factors(name)
                delta = householder_delta(x.to(sigma.dtype), reflectors_out, reflectors_in, sigma,
                                          names=self.adapter_layer_names, adapter=name)
                out = out + delta.to(out.dtype)
        return out

    def __repr__(self) -> str:
        return "hta." + super().__repr__()


class HTAModel(BaseTuner):
    """The PEFT tuner that wraps the targeted ``nn.Linear`` layers of a model
    in :class:`~unitary_lr.peft.HTALinear`; made by ``peft.get_peft_model(model, HTAConfig(...))``."""

    prefix: str = PREFIX
    tuner_layer_cls = HTALayer
    target_module_mapping: dict = {}  # no defaults for transformers architectures: target_modules is required

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("HTAConfig needs target_modules: the names or a regular expression of the "
                             "nn.Linear layers to adapt (target_modules=None)")
        return peft_config

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        """PEFT's injection, after every layer it will wrap has been checked:
        it wraps them one by one, and a layer too small for ``r`` (or not a
        Linear) met after the first had left that one wrapped, or had left an
        earlier layer an orphan adapter of a refused ``add_adapter``. Every
        path that adds an adapter (``get_peft_model``, ``add_adapter``,
        ``load_adapter``, ``inject_adapter_in_model``) comes here."""
        self._check_targets(model, self.peft_config[adapter_name], state_dict)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # Each wrapped layer learns the other places of the model that hold its
        # weight (weight tying), which merging would change too (PEFT's merge
        # replaces the Parameter's .data, so only the same Parameter is tied).
        # A layer used at two places of the model is wrapped at its first name
        # only (PEFT's named_modules() drops repeats): the other place keeps
        # the plain layer, its weight the same Parameter, and is such a place.
        layers = [module for module in model.modules() if isinstance(module, HTALayer)]
        found = _find_tied(model, [(layer, layer.get_base_layer()) for layer in layers], memory=False)
        for layer in layers:
            layer._hta_tied = tuple(found[id(layer)])

    def merge_adapter(self, adapter_names=None, safe_merge=False):
        """PEFT's ``merge_adapter``, refused with a ValueError, changing
        nothing, when a layer it would merge has its weight tied to other
        places of the model (see :meth:`HTALinear.merge`)."""
        self._check_not_tied(adapter_names)
        return super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar=False, safe_merge=False, adapter_names=None):
        """PEFT's ``merge_and_unload``, refused with a ValueError, changing
        nothing (no layer merged or unloaded), when a layer it would merge has
        its weight tied to other places of the model (see :meth:`HTALinear.merge`)."""
        self._check_not_tied(adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def _check_not_tied(self, adapter_names):
        """Refuse, before any layer is merged, to merge an adapter into a tied weight."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]  # (refused by PEFT's merge with a TypeError)
        tied, shared = [], False
        for key, module in self.model.named_modules():
            if isinstance(module, HTALayer):
                names = module.active_adapters if adapter_names is None else adapter_names
                if not any(name in module.hta_sigma and name not in module.merged_adapters for name in names):
                    continue
                places = _still_tied(module._hta_tied, module.get_base_layer().weight, memory=False)
                if places:
                    tied.append(f"the weight of {key!r} is also {', '.join(places)}")
                    shared = shared or _shared(module)
        if tied:
            raise ValueError(_tied_message(tied, shared=shared))

    def _check_targets(self, model, config, state_dict):
        """The layers ``inject_adapter`` targets, matched as it matches them
        (``"all-linear"`` expanded, the insides of wrapped layers skipped, or
        the module names of ``state_dict``), checked for ``config.r``."""
        if config.target_modules is None:
            return  # named by _prepare_adapter_config
        config = _maybe_include_all_linear_layers(copy.copy(config), model)  # PEFT sets the copy's target_modules
        if state_dict is not None:
            from_state = {key.rsplit("." + PREFIX, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
        wrapped = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(inside) for inside in wrapped):
                continue  # the model itself, and the insides of a wrapped layer
            if isinstance(module, BaseTunerLayer):
                wrapped.append(key + ".")
            if state_dict is not None:
                targeted = key.removeprefix("_orig_mod.") in from_state
            else:
                targeted = self._check_target_module_exists(config, key)
            if targeted or self._check_tied_module_exists(config, key):
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                _check_linear(base, key)
                _check_r(config.r, base, key)

    def _create_and_replace(self, hta_config, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        options = {"r": hta_config.r, "init_weights": hta_config.init_weights,
                   "inference_mode": hta_config.inference_mode, "name": current_key}
        if isinstance(target, HTALayer):
            target.update_layer(adapter_name, **options)
            return
        _check_linear(target, current_key)
        new_module = HTALinear(target, adapter_name, **options)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trainable until set_adapter selects it
        self._replace_module(parent, target_name, new_module, target)


def _shared(layer):
    """Whether the base layer of the HTA ``layer`` is itself used at one of its
    tied places (one ``nn.Linear`` at two places of the model), where a new
    weight of it would be that place's too."""
    return bool(_used_elsewhere(layer._hta_tied, layer.get_base_layer(), memory=False))


def _tied_message(layers, *, shared=False):
    """The error of a merge into tied weights; ``layers`` names each layer and
    its ties, ``shared`` says that a base layer itself is used at a tied place."""
    copy_it = (" (a base layer that is itself used at another place of the model, as here: give the HTA layer its "
               "own copy of it first, layer.base_layer = copy.deepcopy(layer.base_layer))" if shared else "")
    return (f"cannot merge the HTA adapters: {'; '.join(layers)}, the same Parameter (weight tying), and merging "
            "would add Delta W there too, changing the outputs of the layers that use it. Nothing was merged. The "
            "unmerged adapters' outputs are right: keep them unmerged, or untie the weights first (base = "
            "layer.get_base_layer(); base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False))"
            f"{copy_it} and then merge")


def _check_linear(layer, key):
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"HTA adapts torch.nn.Linear layers only; target_modules matched {key!r}, "
                        f"a {type(layer).__name__}")


def _check_r(r, layer, name):
    """``r`` reflections a side fit the Linear ``layer`` (named ``name``);
    returns it as an int (an HTALinear made directly, without an HTAConfig,
    is checked here only)."""
    limit = min(layer.in_features, layer.out_features)
    r = check_int("r", r)
    if not 1 <= r <= limit:
        where = f"layer {name!r}" if name else "the layer"
        raise ValueError(f"HTAConfig.r must be between 1 and {limit} = min(out_features, in_features) of {where} "
                         f"({layer.out_features} x {layer.in_features}), got {r}")
    return r


def _register():
    """Enter HTA in PEFT's method tables (see the module's docstring)."""
    for table, entry in ((PEFT_TYPE_TO_CONFIG_MAPPING, HTAConfig), (PEFT_TYPE_TO_TUNER_MAPPING, HTAModel),
                         (PEFT_TYPE_TO_PREFIX_MAPPING, PREFIX)):
        present = table.get(PEFT_TYPE)
        # a re-import (importlib.reload) replaces our own entry; anything else is someone else's HTA
        if present is not None and getattr(present, "__module__", __name__) != __name__ and present != PREFIX:
            raise ImportError(f"PEFT already has a method {PEFT_TYPE!r} ({present!r}); unitary_lr.peft cannot "
                              "register its own")
        table[PEFT_TYPE] = entry


_register()
