r"""Targets: *which* parameters are pruned, to *what* level, with *which* pattern.

A :class:`Targets` object is the "where" (module types, ``filter_fn(module, fqn)``, include /
exclude name patterns, per-parameter overrides); a :class:`SparsityConfig`
(:mod:`constrainedsparse.sparsity`) is the "what" (a sparsity fraction or N:M pattern).
:meth:`Targets.resolve` binds both to a model and returns one :class:`TargetParam` per pruned
tensor, each carrying its :mod:`~constrainedsparse.sets` feasible set. Everything is validated up
front with precise ``ValueError``\ s.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse.errors import is_ours, user_stacklevel
from constrainedsparse.sets import FeasibleSet, check_sparsity
from constrainedsparse.sparsity import PATTERNS, SparsityConfig  # the "what", re-exported beside the "where"

__all__ = [
    "PATTERNS",
    "SparsityConfig",
    "TargetParam",
    "Targets",
    "DEFAULT_MODULE_TYPES",
    "full_name",
    "glob_names",
    "resolved_targets",
    "unwrap_compiled",
]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class TargetParam:
    """One pruned tensor: its module, names, level and feasible set at the target level."""

    name: str
    module_name: str
    param_name: str
    module: nn.Module
    sparsity: float
    feasible_set: FeasibleSet
    target: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)

    @property
    def tensor(self) -> torch.Tensor:
        """The current (possibly parametrized) tensor."""
        return getattr(self.module, self.param_name)

    @property
    def stored(self) -> torch.nn.Parameter:
        """The stored parameter (under a parametrization: its ``original``), what an optimizer updates."""
        if parametrize.is_parametrized(self.module, self.param_name):
            return self.module.parametrizations[self.param_name].original
        return getattr(self.module, self.param_name)

    def set_at(self, sparsity: float) -> FeasibleSet:
        """The same pattern at another sparsity level (used by schedules)."""
        return self.target.with_sparsity(sparsity).feasible_set(self.tensor.shape)


@dataclass
class Targets:
    """Where to prune: which modules/parameters are targeted and per-parameter overrides.

    Args:
        module_types: Module classes whose parameters are targeted (Linear and Conv by default).
        param_names: Parameter names on those modules (``weight`` by default).
        filter_fn: Optional ``filter_fn(module, fqn) -> bool``; only modules where it is true.
        include: Glob patterns on the parameter's full name (``fc1.weight``); if given, a
            parameter must match at least one.
        exclude: Glob patterns; a matching parameter is never pruned.
        overrides: ``{glob: sparsity}`` per-parameter sparsity levels (first match wins).
    """

    module_types: tuple[type[nn.Module], ...] = DEFAULT_MODULE_TYPES
    param_names: tuple[str, ...] = ("weight",)
    filter_fn: FilterFn | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.module_types:
            raise ValueError("module_types must name at least one module class")
        for key in ("module_types", "param_names", "include", "exclude"):
            value = getattr(self, key)
            if isinstance(value, (str, type)) or not isinstance(value, Collection):  # "4.*" is not a list of globs
                shown = value.__name__ if isinstance(value, type) else repr(value)
                raise ValueError(f"{key} must be a list, tuple or set, got {shown}: wrap a single item as ({shown},)")
        self.module_types = tuple(self.module_types)  # isinstance() takes a tuple of classes, not a list
        twice = [name for i, name in enumerate(self.param_names) if name in list(self.param_names)[:i]]
        if twice:
            raise ValueError(f"param_names lists {twice[0]!r} twice: name each parameter once")
        odd = [t for t in self.module_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if odd:
            raise ValueError(f"module_types must hold nn.Module classes (nn.Linear, ...), got {odd[0]!r}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a dict {{glob: sparsity}}, got a {type(self.overrides).__name__}")
        if self.filter_fn is not None and not _takes_two(self.filter_fn):
            raise ValueError("filter_fn must take (module, fqn): the module and its dotted name in the model")
        for pattern, level in self.overrides.items():
            check_sparsity(level, f"override {pattern!r}", "a sparsity ")

    def override_for(self, *names: str) -> float | None:
        """The level of the first ``overrides`` glob that matches one of ``names`` (``None``: no override)."""
        for pattern, level in self.overrides.items():
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return float(level)
        return None

    def check_overrides(self, config: SparsityConfig) -> None:
        """``overrides`` need a pattern whose level can change per tensor.

        Raises:
            ValueError: For overrides next to a pattern that fixes its own level (N:M: every group keeps N).
        """
        if self.overrides and config.fixed_level:
            raise ValueError(
                f"Targets.overrides set per-layer sparsity levels; the {'N:M ' * bool(config.nm)}pattern "
                f"{config.describe()} fixes every group's: use a sparsity target, or exclude the layers to keep dense"
            )

    def candidates(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        """``(module_fqn, param_name, module)`` of every parameter of the module types, names and
        ``filter_fn``, before ``include``/``exclude``, in model order."""
        found = []
        for fqn, module in model.named_modules():
            if not isinstance(module, self.module_types):
                continue
            if self.filter_fn is not None and not self.filter_fn(module, fqn):
                continue
            found.extend((fqn, name, module) for name in self.param_names if getattr(module, name, None) is not None)
        return found

    def select(self, model: nn.Module, prefix: str = "") -> list[tuple[str, str, nn.Module]]:
        """``(module_fqn, param_name, module)`` for every targeted parameter, in model order.

        Args:
            model: The model, or a block of it.
            prefix: The block's name in its model (``model.layers.3``): ``include``/``exclude`` globs
                then match a parameter's name in the block or in the model.
        """
        return self._included(self.candidates(model), prefix)

    def _included(
        self, candidates: Sequence[tuple[str, str, nn.Module]], prefix: str = ""
    ) -> list[tuple[str, str, nn.Module]]:
        """The ``candidates`` that ``include`` and ``exclude`` keep (names within ``prefix``'s module)."""
        chosen = []
        for fqn, param_name, module in candidates:
            full = full_name(fqn, param_name)
            names = glob_names(full, prefix)
            if self.include and not any(fnmatch.fnmatchcase(n, p) for p in self.include for n in names):
                continue
            if any(fnmatch.fnmatchcase(n, p) for p in self.exclude for n in names):
                continue
            chosen.append((fqn, param_name, module))
        return chosen

    def check_globs(self, candidates: Sequence[str], selected: Sequence[str], model: nn.Module | None = None) -> None:
        """Every ``include``/``exclude`` glob matches a candidate name and every override a selected one.

        Args:
            candidates: The candidates' names.
            selected: The selected tensors' names.
            model: The model: a glob that matches nothing is then looked up among its modules' second names (one
                module registered under two attributes; its tensors are named by the first) and says so.

        Raises:
            ValueError: Naming the first glob that matches nothing (a typo would prune what was meant to
                be kept, or leave a level at the default) and the names it could have matched.
        """
        checks = [("include", self.include, candidates, "parameter; the candidates are")]
        checks.append(("exclude", self.exclude, candidates, "parameter; the candidates are"))
        checks.append(("override", list(self.overrides), selected, "targeted parameter; they are"))
        for kind, globs, names, what in checks:
            for pattern in globs:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    aliases = _second_names(model, candidates) if model is not None else {}
                    alias = next((a for a in aliases if fnmatch.fnmatchcase(a, pattern)), None)
                    if alias is not None:
                        raise ValueError(
                            f"{kind} {pattern!r} matches {alias}, a second name of {aliases[alias]} (one module "
                            f"under two names): patterns match the first name, {aliases[alias]}"
                        )
                    raise ValueError(f"{kind} {pattern!r} matches no {what} {_shown(names)}")

    def resolve(self, model: nn.Module, config: SparsityConfig, *, allow_empty: bool = False) -> list[TargetParam]:
        """Binds the targets to ``model`` at the level of ``config``.

        Args:
            model: The model to prune.
            config: The level and pattern (overrides set other levels per tensor).
            allow_empty: Accept a level that keeps no weight of a tensor (``Linear(2, 1)`` at 0.9).

        Raises:
            ValueError: If ``model`` is not a module or ``config`` not a :class:`SparsityConfig`, nothing
                is selected, ``overrides`` sit next to an N:M pattern (:meth:`check_overrides`), a glob matches
                nothing (:meth:`check_globs`), a selected weight is tied to
                another parameter name, a pattern does not fit a tensor (e.g. N:M on a width not
                divisible by M), or a level keeps no weight of a tensor (unless ``allow_empty``).
        """
        if not isinstance(model, nn.Module):
            raise ValueError(f"resolve(model, config): model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, SparsityConfig):
            raise ValueError(
                f"resolve(model, config): config must be a SparsityConfig (e.g. SparsityConfig(sparsity=0.9) or "
                f"SparsityConfig.parse('2:4')), got {config!r}"
            )
        self.check_overrides(config)
        model = unwrap_compiled(model)  # a torch.compile wrapper shares the module's parameters: its names
        candidates = self.candidates(model)
        selected = self._included(candidates)
        names = [full_name(fqn, name) for fqn, name, _ in candidates]
        if not selected:
            if candidates:
                self.check_globs(names, names, model)  # an include typo: named, with the names it could match
            raise ValueError(self._selects_nothing(model))
        self.check_globs(names, [full_name(fqn, name) for fqn, name, _ in selected], model)
        device_map = getattr(model, "hf_device_map", None) or {}  # accelerate's placement, if it loaded the model
        for fqn, param_name, module in selected:
            _check_prunable(full_name(fqn, param_name), module, param_name, device_map)
        _check_untied(model, selected, names)
        resolved = []
        for fqn, param_name, module in selected:
            full = full_name(fqn, param_name)
            shape = getattr(module, param_name).shape
            level = self.override_for(full)
            own = config if level is None else config.with_sparsity(level)
            transposed = _inputs_first(module)
            if transposed is not None and own.pattern != "unstructured":
                raise ValueError(
                    f"{full}: {transposed} stores its weight as (inputs, outputs, ...), so pattern "
                    f"{own.pattern_text()!r} would group its outputs; only unstructured targets it in training"
                    + (" (prune_layerwise handles Conv1D patterns)" if transposed.endswith("Conv1D") else "")
                )
            if math.prod(shape) == 0:
                raise ValueError(f"{full} has no weights (shape {tuple(shape)}): a layer of width 0 cannot be pruned")
            try:
                feasible = own.feasible_set(shape)
            except ValueError as err:
                raise ValueError(f"{full}: {err}") from None
            if not allow_empty and not feasible.keeps_any(shape):
                raise ValueError(
                    f"{full}: sparsity {own.describe()} keeps none of its {math.prod(shape)} weights (the layer would "
                    "be cut from the model); lower its level (overrides={name: level}) or pass allow_empty=True"
                )
            resolved.append(TargetParam(full, fqn, param_name, module, own.sparsity, feasible, own))
        adapters = adapter_layers(model, [t.module_name for t in resolved])
        warn_adapters([t.name for t in resolved if t.module_name in adapters], adapters.values())
        return resolved

    def _selects_nothing(self, model: nn.Module) -> str:
        """The message for a filter that selects nothing: every criterion, and the model's weights."""
        shown = _shown([name for name, _ in model.named_parameters()]) or "none"
        unlisted = sorted(
            {
                type(m).__name__
                for m in model.modules()
                if _inputs_first(m) is not None and not isinstance(m, self.module_types)
            }
        )
        hint = (
            f" (its {', '.join(unlisted)} layers are not in module_types: add their class, e.g. "
            "transformers.pytorch_utils.Conv1D for GPT-2)"
            if unlisted
            else ""
        )
        return (
            "the target filter selects no parameters (module_types="
            f"{', '.join(t.__name__ for t in self.module_types)}, param_names={list(self.param_names)}, "
            f"filter_fn={'given' if self.filter_fn is not None else None}, include={list(self.include)}, "
            f"exclude={list(self.exclude)}); the model's parameters are {shown}{hint}"
        )


def tuner_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s PEFT tuner layers (a LoRA-adapted Linear: its ``base_layer`` and adapters), found by
    the class name ``BaseTunerLayer``, without importing ``peft``; none once ``merge_and_unload()`` ran."""
    return [
        fqn
        for fqn, module in model.named_modules()
        if any(kind.__name__ == "BaseTunerLayer" for kind in type(module).__mro__)
    ]


def adapter_layers(model: nn.Module, fqns: Iterable[str]) -> dict[str, str]:
    """The modules among ``fqns`` inside a PEFT tuner layer but its ``base_layer`` (LoRA's ``lora_A``/``lora_B``),
    each with its part's name in the tuner layer (``lora_A``)."""
    tuners = tuner_layers(model)
    found = {}
    for fqn in fqns:
        tuner = next((t for t in tuners if fqn.startswith(f"{t}.")), None)
        if tuner is not None and not f"{fqn}.".startswith(f"{tuner}.base_layer."):
            found[fqn] = fqn[len(tuner) + 1 :].split(".")[0]
    return found


def warn_adapters(names: Sequence[str], parts: Iterable[str]) -> None:
    """Warns that the weights ``names`` are adapters' (``parts``: their names in the tuner layers, from
    :func:`adapter_layers`): pruned, they leave a merged weight dense."""
    if names:
        globs = ", ".join(repr(f"*.{part}.*") for part in sorted(set(parts)))
        warnings.warn(
            f"the targets hold {len(names)} weights of PEFT adapters ({_shown(names)}): pruning an adapter leaves "
            "the merged weight dense (merge_and_unload() adds the adapters' product), and a mask of an adapter "
            "initialised to 0 (lora_B) keeps it 0; prune the model before adding adapters, merge them first, or "
            f"leave them out (Targets(exclude=[{globs}]))",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _shown(names: Sequence[str]) -> str:
    """The first six of ``names`` and their count when there are more (for a message)."""
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def _inputs_first(module: nn.Module) -> str | None:
    """What stores its weight as (inputs, outputs, ...): a transformers ``Conv1D`` or a ``ConvTranspose``, else
    ``None`` (dim 0 is the outputs, what ``row`` and ``structured:rows`` group)."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "a transformers Conv1D"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"a {type(module).__name__}"
    return None


def _check_prunable(full: str, module: nn.Module, param_name: str, device_map: Mapping[str, Any]) -> None:
    """A selected weight is an initialized ``nn.Parameter``, under no parametrization but this package's own.

    Raises:
        ValueError: For a parametrization of the user's (``spectral_norm``, ``weight_norm``: the masks and gates
            are parametrizations that replace the weight), a lazy module before its first forward, a weight
            that is no parameter (a buffer, or a tensor a hook recomputes), or one on the meta device.
    """
    if parametrize.is_parametrized(module, param_name):
        foreign = [type(p).__name__ for p in module.parametrizations[param_name] if not is_ours(type(p))]
        if foreign:
            raise ValueError(
                f"{full} carries a parametrization of yours ({foreign[0]}): masks and gates replace the weight "
                f"through parametrizations of their own; remove it (torch.nn.utils.parametrize."
                f"remove_parametrizations(module, {param_name!r})) or exclude {full}"
            )
        return
    value = getattr(module, param_name)
    if isinstance(value, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{full} is not initialized yet ({type(module).__name__} is lazy): run one forward pass of the model "
            "before resolving its targets"
        )
    if not isinstance(value, nn.Parameter):
        raise ValueError(
            f"{full} is a {type(value).__name__}, not an nn.Parameter (a buffer, or a tensor a forward pre-hook "
            "recomputes from another parameter, as torch.nn.utils.prune, spectral_norm and the former weight_norm "
            "do): only parameters can be pruned; take the hook off first (torch.nn.utils.prune.remove, "
            "remove_spectral_norm, remove_weight_norm) or exclude it"
        )
    if value.is_meta:
        raise not_materialized(full, "resolving its targets", device_map)


def not_materialized(name: str, before: str, device_map: Mapping[str, Any] | None = None) -> ValueError:
    """The error for a weight on the meta device (no values yet), met ``before`` something (``"pruning it"``); one
    that accelerate offloaded to disk (the model's ``hf_device_map`` places it there) is named so."""
    placement = device_map or {}
    keys = [key for key in placement if key == "" or name.startswith(f"{key}.")]
    if keys and placement[max(keys, key=len)] == "disk":
        return ValueError(
            f"{name} is offloaded to disk (from_pretrained(device_map=..., offload_folder=...)): load the model into "
            f"memory before {before} (prune_layerwise's offload=True moves one block at a time to the device)"
        )
    return ValueError(
        f"{name} is on the meta device (it has no values yet): load the model's weights before {before} "
        "(to_empty() then load_state_dict(), or from_pretrained())"
    )


def _second_names(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """The candidates' parameters under a module's second name (a module registered twice), mapped to their name."""
    first = {id(module): fqn for fqn, module in model.named_modules()}
    found = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if first[id(module)] != fqn:
            for name, _ in module.named_parameters(recurse=False):
                if full_name(first[id(module)], name) in names:
                    found[full_name(fqn, name)] = full_name(first[id(module)], name)
    return found


def _check_untied(model: nn.Module, selected: Sequence[tuple[str, str, nn.Module]], candidates: Sequence[str]) -> None:
    """No selected weight is tied (the same tensor in another module, e.g. an LM head and its embedding). One
    module under two attribute names is one layer, not a tie: its masks reach both."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for fqn, owner in model.named_modules(remove_duplicate=False):
        for name, param in owner.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((full_name(fqn, name), owner, name))
    for fqn, param_name, module in selected:
        full = full_name(fqn, param_name)
        aliases = owners.get(id(getattr(module, param_name)), [])
        others = [n for n, owner, name in aliases if owner is not module or name != param_name]
        if others:
            excluded = [n for n in (full, *others) if n in candidates]
            raise ValueError(
                f"{full} is tied to {others[0]} (the same tensor): pruning a tied weight is not supported (masks "
                f"and gates would untie it while training); exclude every name of it (exclude={excluded!r}) or untie "
                "the weights"
            )


def resolved_targets(targets: Any, call: str = "") -> list[TargetParam]:
    """``targets`` as a list, if it holds only :class:`TargetParam` (what :meth:`Targets.resolve` returns).

    Args:
        targets: What a caller passed as the resolved targets.
        call: The call to name at the start of the message (``"hard_prune(targets, masks): "``).

    Raises:
        ValueError: Naming what was passed instead (an unresolved :class:`Targets`: how to resolve it), or a tensor
            listed twice (two ``resolve`` results joined that overlap).
    """
    items = list(targets) if isinstance(targets, Iterable) and not isinstance(targets, (str, Mapping)) else None
    if items is not None and all(isinstance(t, TargetParam) for t in items):
        _check_each_once(items, call)
        return items
    if items is not None:
        odd = sorted({type(t).__name__ for t in items if not isinstance(t, TargetParam)})
        what = f"a {type(targets).__name__} holding {', '.join(odd)}"
    else:
        what = type(targets).__name__ + (": call .resolve(model, config) on it" if hasattr(targets, "resolve") else "")
    raise ValueError(f"{call}targets must be the list Targets(...).resolve(model, config) returns, got {what}")


def _check_each_once(targets: list[TargetParam], call: str) -> None:
    """Raises ``ValueError`` for a tensor in ``targets`` twice, by name or by identity (a module under two names)."""
    first: dict[int, str] = {}
    for t in targets:
        seen = first.get(id(t.stored))
        if seen is not None:
            same = f"{t.name} twice" if seen == t.name else f"one tensor twice, as {seen} and as {t.name}"
            raise ValueError(
                f"{call}targets list {same}: give each tensor once (for another level or pattern on some layers, "
                "exclude them from the other resolve: Targets(exclude=[...]))"
            )
        first[id(t.stored)] = t.name


def _takes_two(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called with two positional arguments (unknown signatures pass)."""
    try:
        inspect.signature(fn).bind(None, "")
    except TypeError:
        return False
    except ValueError:  # a builtin without a signature
        return True
    return True


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model = torch.compile(model)`` keeps it as ``_orig_mod``), else
    ``model``: target names, masks, states and saved weights are the module's own, without ``_orig_mod.``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def full_name(fqn: str, param_name: str) -> str:
    """``"<module fqn>.<param>"`` (the bare parameter name for the root module)."""
    return f"{fqn}.{param_name}" if fqn else param_name


def glob_names(name: str, prefix: str = "") -> tuple[str, ...]:
    """The names a glob may match for parameter ``name`` of a block named ``prefix`` in its model: the name
    within the block (``mlp.down_proj.weight``) and in the model (``model.layers.0.mlp.down_proj.weight``)."""
    return (name, f"{prefix}.{name}") if prefix else (name,)
