"""What a layer-wise run checks before anything is pruned or written, for the CLI runner and
:func:`~constrainedsparse.prune_layerwise` alike: the layers against their patterns and levels, the
allocation settings, and the block-level steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse import distributed
from constrainedsparse.batches import tensors_in
from constrainedsparse.errors import UserInputError, is_integer, user_input, user_stacklevel
from constrainedsparse.layerwise.allocation import reachable_range, row_width
from constrainedsparse.layerwise.base import LayerwiseSolver, check_solver
from constrainedsparse.layerwise.blockmask import SEARCHABLE_PATTERNS
from constrainedsparse.layerwise.layers import layer_module_types, layer_weight, targeted_layers, weight_name
from constrainedsparse.layerwise.settings import DriverSettings
from constrainedsparse.settings import check_keeps_weights
from constrainedsparse.targets import (
    SparsityConfig,
    Targets,
    adapter_layers,
    full_name,
    glob_names,
    not_materialized,
    warn_adapters,
)

__all__ = [
    "check_settings",
    "check_allocation",
    "check_block_fit",
    "check_block_mask",
    "check_consecutive",
    "check_layer_shapes",
    "check_layer_types",
    "check_reachable",
    "checked_batches",
    "check_materialized",
    "checked_blocks",
    "checked_scores",
]


def check_layer_shapes(
    blocks: Sequence[nn.Module],
    targets: Targets,
    target: SparsityConfig,
    allow_empty: bool = False,
    levels: Mapping[str, SparsityConfig] | None = None,
    prefixes: Sequence[str] | None = None,
    keywords: bool = False,
) -> None:
    """Every targeted layer fits its level's pattern (N:M widths) and keeps a weight (errors name its weight).

    Args:
        blocks: The model's blocks.
        targets: Which layers of a block are pruned.
        target: The run's level and pattern.
        allow_empty: Whether a level may empty a layer.
        levels: Per-layer levels by weight name in the model (:func:`override_levels`); others get
            ``target``.
        prefixes: The blocks' names in the model (:func:`block_prefixes`); needed with ``levels``.
        keywords: Word the errors for ``prune_layerwise``'s keywords (``sparsity``; a layer is excluded from the
            targets to leave it dense) instead of the CLI's flags.

    Raises:
        UserInputError: For no block or no targeted layer at all, a targeted weight tied to another one or
            under a parametrization, a targeted module that is not a layer
            (:func:`check_layer_types`), a glob that matches nothing, the first layer that does not fit, or
            that its level would empty (unless ``allow_empty``).
    """
    if not blocks:
        raise UserInputError("no blocks to prune: the list of blocks is empty")
    levels = levels or {}
    prefixes = prefixes if prefixes is not None else [str(index) for index in range(len(blocks))]
    check_layer_types(blocks, targets, prefixes)
    by_level: dict[SparsityConfig, dict[str, tuple[Any, Any]]] = {}
    selected = set()
    seen: dict[int, str] = {}  # a weight's first name: a tied one would be pruned again by a later block
    for index, block in enumerate(blocks):
        for name, module in targeted_layers(block, targets, prefixes[index]):
            shape, full = layer_weight(module).shape, weight_name(prefixes[index], name)
            _check_plain_and_untied(module, full, seen)
            own = levels.get(full, target)
            with user_input(f"{full}: "):  # the weight's name in the model, as every other layer error says it
                by_level.setdefault(own, {})[full] = (own.feasible_set(shape), shape)
            selected.update((full_name(name, "weight"), full))
    # include/exclude globs match a name within a block or in the model, in some block
    candidates = sorted(
        {
            name
            for prefix, block in zip(prefixes, blocks)
            for fqn, p, _ in targets.candidates(block)
            for name in glob_names(full_name(fqn, p), prefix)
        }
    )
    # with nothing selected, an include glob that matches nothing still names the candidates
    with user_input(suffix=" (layer-wise pruning prunes the blocks' layers only: embeddings and the head stay dense)"):
        targets.check_globs(candidates, sorted(selected) if by_level else candidates)
    if not by_level:
        raise UserInputError(f"no layer to prune: the targets match no layer in the {len(blocks)} blocks")
    _warn_adapters(blocks, targets, prefixes)
    if not allow_empty:
        for own, sets in by_level.items():
            level = ("sparsity" if keywords else "--sparsity") if own == target else "the override level"
            hint = {"allow": "exclude it from the targets (Targets(exclude=[...])) or pass allow_empty_layers=True"}
            hint = hint if keywords else {}
            check_keeps_weights(sets, own, level, **hint)


def _warn_adapters(blocks: Sequence[nn.Module], targets: Targets, prefixes: Sequence[str]) -> None:
    """Warns of targeted layers that are PEFT adapters (:func:`~constrainedsparse.targets.warn_adapters`)."""
    names, parts = [], []
    for prefix, block in zip(prefixes, blocks):
        found = adapter_layers(block, [name for name, _ in targeted_layers(block, targets, prefix)])
        names += [weight_name(prefix, name) for name in found]
        parts += found.values()
    warn_adapters(names, parts)


def _check_plain_and_untied(module: nn.Module, full: str, seen: dict[int, str]) -> None:
    """A targeted layer's weight is a plain parameter (one-shot pruning writes it: under a parametrization it would
    write a temporary) that no layer before it holds (a later block would prune a tied weight again).

    Args:
        module: The layer.
        full: Its weight's name in the model.
        seen: The first name of every weight seen so far, by the parameter's id (updated).

    Raises:
        UserInputError: Naming the weight.
    """
    if parametrize.is_parametrized(module, "weight"):
        raise UserInputError(
            f"{full} carries a parametrization (masks, gates or one of yours): one-shot pruning writes plain "
            "weights; finalize() the formulation, or remove_masks() / remove the parametrization first"
        )
    first = seen.setdefault(id(module.weight), full)  # the parameter (a Conv1D's layer_weight is a new view)
    if first != full:
        raise UserInputError(
            f"{full} is tied to {first} (the same tensor): one-shot pruning prunes each layer once, from its own "
            "inputs; exclude every name of it from the Targets, or untie the weights"
        )


def check_layer_types(blocks: Sequence[nn.Module], targets: Targets, prefixes: Sequence[str]) -> None:
    """Every parameter the targets select in the blocks is the weight of a module type the driver prunes
    (:func:`~constrainedsparse.layerwise.layers.layer_module_types`): a convolution's or an attention's
    own parameters have no ``(d_out, d_in)`` layer and inputs to build a Gram matrix from.

    Raises:
        UserInputError: Naming the first other parameter, its module's type and the allowed types.
    """
    types = layer_module_types()
    allowed = " and ".join("nn.Linear" if kind is nn.Linear else f"transformers' {kind.__name__}" for kind in types)
    for prefix, block in zip(prefixes, blocks):
        for fqn, param_name, module in targets.select(block, prefix):
            if not isinstance(module, types):
                name = ".".join(part for part in (prefix, fqn, param_name) if part)
                kind = f"{'nn.' * type(module).__module__.startswith('torch.nn.')}{type(module).__name__}"
                raise UserInputError(
                    f"{name} is a parameter of {kind}, a module type layer-wise pruning cannot prune: it prunes "
                    f"the weights of {allowed} layers only (narrow Targets.module_types, or exclude it)"
                )


def check_settings(
    driver: DriverSettings,
    solver: LayerwiseSolver,
    target: SparsityConfig,
    targets: Targets | None,
    processes: int | None = None,
) -> None:
    """Every check of a layer-wise run's settings before a model is needed, in one order for the CLI runner and
    :func:`~constrainedsparse.prune_layerwise`: the solver against the pattern (and its idle settings), the
    allocation, the block-level steps.

    Raises:
        ValueError: Naming the first setting that cannot work.
    """
    check_solver(solver, target)
    check_allocation(driver, target, targets)
    check_block_fit(driver, processes)
    check_block_mask(driver, solver, target)


def check_allocation(driver: DriverSettings, target: SparsityConfig, targets: Targets | None = None) -> None:
    """Per-layer levels: ``allocation=lagrangian|owl`` needs a level to share out, inside its bounds, and sets
    every layer's; ``Targets.overrides`` need a sparsity target and no allocation.

    Raises:
        ValueError: For an N:M target (its level is fixed per group) with an allocation or
            ``targets.overrides``, a budget outside the bounds, or overrides (levels given by hand) next
            to an allocation.
    """
    if targets is not None:
        targets.check_overrides(target)
    if driver.allocation == "uniform":
        return
    key, level = _names(driver)
    if targets is not None and targets.overrides:
        raise ValueError(
            f"{key}allocation={driver.allocation} sets every layer's level; Targets.overrides set some by hand: "
            "give one or the other"
        )
    if target.fixed_level:
        raise ValueError(
            f"{key}allocation={driver.allocation} shares out a {level} level; the {'N:M ' * bool(target.nm)}pattern "
            f"{target.describe()} "
            f"fixes every group's level: give a {level} instead of the pattern, or leave allocation at uniform"
        )
    if not driver.allocation_min <= target.sparsity <= driver.allocation_max:
        raise ValueError(
            f"{level} {target.sparsity} is outside the allocation bounds [{driver.allocation_min}, "
            f"{driver.allocation_max}] ({key}allocation_min / allocation_max)"
        )


def _names(driver: DriverSettings) -> tuple[str, str]:
    """How messages name a driver key and the level: ``--set key`` / ``--sparsity`` for the CLI, the keywords
    ``key`` / ``sparsity`` for :func:`~constrainedsparse.prune_layerwise`."""
    return driver.error_prefix, "--sparsity" if driver.error_prefix else "sparsity"


def check_block_fit(driver: DriverSettings, processes: int | None = None) -> None:
    """The block-level steps (``block_fit_epochs``, ``block_mask_rounds``) run in one process (they would
    diverge over the ranks' batch shares).

    ``processes`` defaults to this run's (:func:`~constrainedsparse.distributed.world_size`).

    Raises:
        ValueError: For a block-level step under several processes.
    """
    processes = distributed.world_size() if processes is None else processes
    for key in ("block_fit_epochs", "block_mask_rounds"):
        value = getattr(driver, key)
        if value and processes > 1:
            raise ValueError(
                f"{driver.error_prefix}{key}={value} runs in one process; with --nproc / torchrun leave it at 0"
            )


def check_block_mask(driver: DriverSettings, solver: LayerwiseSolver, target: SparsityConfig) -> None:
    """``block_mask_rounds > 0`` needs a mask-only solver and a pattern the search has moves for.

    Raises:
        ValueError: Naming the solver or the pattern and what is allowed.
    """
    if not driver.block_mask_rounds:
        return
    key = driver.error_prefix
    if not solver.keeps_dense_weights():
        raise ValueError(
            f"{key}block_mask_rounds moves masks over the dense weights; {solver.name} changes the kept weights "
            "(use magnitude, wanda, or fw without reconstruct)"
        )
    if target.pattern not in SEARCHABLE_PATTERNS:
        raise ValueError(
            f"{key}block_mask_rounds searches the {', '.join(SEARCHABLE_PATTERNS)} patterns, "
            f"got {target.pattern_text()}"
        )


def check_reachable(
    blocks: Sequence[nn.Module],
    targets: Targets,
    target: SparsityConfig,
    driver: DriverSettings,
    prefixes: Sequence[str],
) -> None:
    """``allocation=lagrangian|owl``: whole weights per row can reach the level within the bounds.

    Raises:
        UserInputError: When the rows are too narrow for the level (8 inputs at ``allocation_max``
            0.95 keep 1 weight: 0.875 at most).
    """
    if driver.allocation == "uniform":
        return
    shapes = [
        layer_weight(module).shape
        for block, prefix in zip(blocks, prefixes)
        for _, module in targeted_layers(block, targets, prefix)
    ]
    layers = [(math.prod(shape), row_width(shape, target.pattern), driver.allocation_min, driver.allocation_max)
              for shape in shapes]  # fmt: skip
    low, high = reachable_range(layers)
    if not low - 1e-9 <= target.sparsity <= high + 1e-9:
        raise UserInputError(
            f"--sparsity {target.sparsity} cannot be allocated: whole weights per row within [allocation_min, "
            f"allocation_max] reach [{low:.4g}, {high:.4g}] on this model (widen the bounds)"
        )


def checked_blocks(model: nn.Module, blocks: Any) -> list[nn.Module]:
    """``blocks`` as a list: non-empty, distinct sub-modules of ``model`` (blocks of layers, or single layers).

    Raises:
        ValueError: Naming what is wrong (``None``, the model itself, a repeat, a foreign module).
    """
    listed = isinstance(blocks, nn.ModuleList) or (
        not isinstance(blocks, (nn.Module, str, bytes, Mapping)) and hasattr(blocks, "__iter__")
    )
    if not listed:
        kind = "the model itself" if blocks is model else type(blocks).__name__
        raise ValueError(f"blocks must be a list of the model's blocks in execution order, got {kind}")
    blocks = list(blocks)  # a ModuleList, a tuple, a generator
    if not blocks:
        raise ValueError("blocks is empty: there is nothing to prune")
    names = {id(m): name for name, m in model.named_modules()}
    for index, block in enumerate(blocks):
        if not isinstance(block, nn.Module) or id(block) not in names or block is model:
            what = "the model itself" if block is model else type(block).__name__
            hint = " (blocks takes the modules themselves, e.g. list(model.layers), not their names)"
            hint = hint if isinstance(block, str) else ""
            raise ValueError(f"block {index} must be a sub-module of the model, got {what}{hint}")
        if any(block is other for other in blocks[:index]):
            raise ValueError(
                f"block {index} ({names[id(block)]}) is listed twice: each block is pruned once, from its own inputs "
                "(a block shared by several positions of the model, as in ALBERT, is not supported)"
            )
    return blocks


def checked_batches(batches: Any, model: nn.Module | None = None) -> list[Any]:
    """Calibration batches as a non-empty list whose every batch holds a non-empty tensor (and, for a
    ``model`` that takes token ids, a ``transformers`` text model, ids with a batch dimension).

    Raises:
        ValueError: For anything else (text that was not tokenized, a bare tensor, an empty list).
    """
    if isinstance(batches, (str, bytes, Mapping)) or hasattr(batches, "dim") or not hasattr(batches, "__iter__"):
        one = " (one batch: pass [batch])" if isinstance(batches, Mapping) or hasattr(batches, "dim") else ""
        raise ValueError(
            f"batches must be a non-empty list of calibration batches (dicts, tuples or tensors), got "
            f"{type(batches).__name__}{one}"
        )
    items = list(batches)  # a DataLoader or a generator: read once
    if not items:
        raise ValueError("batches must be a non-empty list of calibration batches (dicts, tuples or tensors)")
    for index, batch in enumerate(items):
        found = list(tensors_in(batch))
        if not found:
            raise ValueError(
                f"calibration batch {index} holds no tensor (got a {type(batch).__name__}): tokenize text first, "
                "e.g. tokenizer(texts, return_tensors='pt')"
            )
        empty = next((t for t in found if t.numel() == 0), None)
        if empty is not None:
            raise ValueError(f"calibration batch {index} holds an empty tensor of shape {tuple(empty.shape)}")
        if any(t.is_meta for t in found):
            raise ValueError(f"calibration batch {index} holds a tensor on the meta device (a shape without values)")
        if getattr(model, "main_input_name", None) == "input_ids":
            _check_token_ids(index, batch)
    _warn_unread_padding(items)
    return items


def _check_token_ids(index: int, batch: Any) -> None:
    """A text model's token ids (a dict's ``input_ids``, a bare integer tensor, a tuple's first) must be
    ``(batch, tokens)``.

    Raises:
        ValueError: For 1-d ids (embeddings take them, the attention of the first block fails on them).
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if isinstance(ids, (tuple, list)) and ids:
        ids = ids[0]
    if isinstance(ids, torch.Tensor) and ids.ndim == 1 and not ids.is_floating_point() and ids.dtype != torch.bool:
        raise ValueError(
            f"calibration batch {index}: token ids of shape {tuple(ids.shape)} have no batch dimension: give "
            "(batch, tokens), e.g. ids.unsqueeze(0) or tokenizer(texts, return_tensors='pt')"
        )


def _warn_unread_padding(items: Sequence[Any]) -> None:
    """Warns once when a tuple / list batch holds what looks like an attention mask with padding as its second
    element (where ``transformers`` models take ``attention_mask``; 0/1 integers shaped like the first tensor,
    some 0): only a dict's ``attention_mask`` marks padding."""
    for index, batch in enumerate(items):
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and _looks_like_padding_mask(batch[1], batch[0]):
            warnings.warn(
                f"calibration batch {index} is a {type(batch).__name__} whose second element looks like an "
                "attention mask with padding: only a dict's attention_mask marks padding, so the padded positions "
                "are calibrated on; give dict batches ({'input_ids': ..., 'attention_mask': ...})",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return


def _looks_like_padding_mask(item: Any, first: Any) -> bool:
    tensors = isinstance(item, torch.Tensor) and isinstance(first, torch.Tensor)
    if not tensors or item.shape != first.shape or item.is_floating_point():
        return False
    values = item.unique()
    return bool(((values == 0) | (values == 1)).all()) and bool((values == 0).any())


def checked_scores(scores: Any, reserved: Any) -> dict[str, float]:
    """``score(dense, pruned)``'s return as ``{name: number}`` (ints stay ints, the rest floats); a name of the
    run's own summary is refused.

    Raises:
        ValueError: For anything but a dict of numbers (one-element tensors are read), or a reserved key.
    """
    if not isinstance(scores, Mapping):
        raise ValueError(f"score(dense, pruned) must return a dict {{name: number}}, got {type(scores).__name__}")
    out = {}
    for key, value in scores.items():
        if not isinstance(key, str):
            raise ValueError(f"score(dense, pruned) must return a dict with text keys, got the key {key!r}")
        if key in reserved:
            raise ValueError(f"score(dense, pruned) returned {key!r}, a key of the run's own summary: rename it")
        try:
            number = value.item() if hasattr(value, "item") else value  # a one-element tensor or numpy number
            out[key] = number if is_integer(number) else float(number)
        except (TypeError, ValueError, RuntimeError):
            shown = repr(value) if "\n" not in repr(value) and len(repr(value)) <= 80 else f"a {type(value).__name__}"
            if hasattr(value, "shape"):  # a tensor's or an array's values would not fit one line
                shown = f"a {type(value).__name__} of shape {tuple(value.shape)}"
            raise ValueError(f"score(dense, pruned) returned {key!r}: {shown}, not a number") from None
    return out


def check_consecutive(prefixes: Sequence[str], offload: bool = False) -> None:
    """Blocks of one ``ModuleList`` (``model.layers.<i>``) are listed in their order and, with ``offload``,
    without a gap: an offloaded walk calibrates each block on the previous one's outputs, so a skipped
    block would be left out of its inputs (without offload the walk finds the gap and runs the model
    up to the next block, :func:`~constrainedsparse.layerwise.capture.blocks_chained`).

    Raises:
        UserInputError: Naming the first pair out of order, or with ``offload`` the first gap.
    """
    for before, after in zip(prefixes, prefixes[1:]):
        (parent, _, first), (other, _, second) = before.rpartition("."), after.rpartition(".")
        if parent != other or not (first.isdigit() and second.isdigit()) or int(second) == int(first) + 1:
            continue
        if int(second) <= int(first):
            raise UserInputError(f"blocks must be in execution order: {after} runs before {before} in the model")
        if offload:
            raise UserInputError(
                f"with offload, blocks must follow each other without a gap: {before} is followed by {after}, which "
                f"skips {parent}.{int(first) + 1} (its inputs would be {before}'s outputs); give a consecutive slice"
            )


def check_materialized(model: nn.Module) -> None:
    """No parameter of ``model`` is on the meta device (before anything is pruned: a block on it would fail midway).

    Raises:
        ValueError: Naming the first such parameter.
    """
    device_map = getattr(model, "hf_device_map", None) or {}  # accelerate's placement, if it loaded the model
    for name, parameter in model.named_parameters():
        if parameter.is_meta:
            raise not_materialized(name, "pruning it", device_map)
