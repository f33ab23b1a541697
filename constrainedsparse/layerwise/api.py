"""One-shot pruning of a pretrained model from Python: :func:`prune_layerwise`.

::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from constrainedsparse import prune_layerwise

    model = AutoModelForCausalLM.from_pretrained(path)
    batches = [dict(tokenizer(texts[i:i + 8], return_tensors="pt", padding=True)) for i in range(0, 64, 8)]
    report = prune_layerwise(model, batches, "sparsegpt", pattern="2:4")
    print(report.mean_layer_error, report.model_sparsity)   # the model is pruned in place

Nothing is written unless ``out=`` names a directory (then ``summary.json`` and the pruned model go
there, as a ``constrainedsparse run`` would write them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from constrainedsparse.causal_lm import load_tokenizer
from constrainedsparse.checkpoint import atomic_write_json
from constrainedsparse.errors import user_stacklevel
from constrainedsparse.layerwise.allocation import Allocation, level_targets
from constrainedsparse.layerwise.base import LayerwiseSolver, solver_class
from constrainedsparse.layerwise.checks import (
    check_materialized,
    check_settings,
    checked_batches,
)
from constrainedsparse.layerwise.driver import (
    GRAM_DTYPES,
    LayerReport,
    block_prefixes,
    prune_blocks,
)
from constrainedsparse.layerwise.layers import (
    find_blocks,
    layer_module_types,
    layer_weight,
    targeted_layers,
    weight_name,
)
from constrainedsparse.layerwise.levels import solve_levels
from constrainedsparse.layerwise.preflight import check_block_layout
from constrainedsparse.layerwise.report import LayerwiseReport, summarize_layers
from constrainedsparse.layerwise.runner import (
    DEFAULT_SPARSITY,
    build_solver,
    check_savable,
    save_model,
    tokenizer_source,
)
from constrainedsparse.layerwise.settings import MASK_SCOPES, DriverSettings, scope_field
from constrainedsparse.modes import eval_mode
from constrainedsparse.progress import Progress
from constrainedsparse.runs import RunDirectory
from constrainedsparse.saving import source_folder
from constrainedsparse.settings import resolve_device, target_from_flags
from constrainedsparse.targets import SparsityConfig, Targets, unwrap_compiled

__all__ = ["prune_layerwise"]


@dataclasses.dataclass
class _DriverKeywords(DriverSettings):
    """The driver settings as ``prune_layerwise`` keywords: errors name ``mask_scope``, not ``--set mask_scope``."""

    error_prefix: ClassVar[str] = ""


def _check_inputs(model: Any, batches: Any, out: Any, flags: dict[str, Any]) -> list[Any]:
    """The model, the keywords whose type no later check reads (``out``, the plain flags), then the batches."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"out must be a folder path (str or Path) or None, got {out!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):  # overwrite="no" would replace a finished run
            raise ValueError(f"{name} must be True or False, got {value!r}")
    return checked_batches(batches, model)


def prune_layerwise(
    model: nn.Module,
    batches: Iterable[Any],
    method: str | LayerwiseSolver = "fw",
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    targets: Targets | None = None,
    out: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    blocks: Iterable[nn.Module] | None = None,
    mask_scope: str | None = None,
    gram_dtype: str = "float32",
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    offload: bool = False,
    activations: str = "device",
    true_sequential: bool = False,
    allocation: str = "uniform",
    allocation_min: float = 0.0,
    allocation_max: float = 0.95,
    allocation_step: float = 0.1,
    allocation_weight: str = "block",
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    block_fit_epochs: int = 0,
    block_fit_lr: float = 1e-3,
    block_fit_target: str = "dense",
    block_mask_rounds: int = 0,
    allow_empty_layers: bool = False,
    config: Any = None,
    **hyperparameters: Any,
) -> LayerwiseReport:
    """Prunes a pretrained model block by block from calibration batches, in place.

    Args:
        model: A ``transformers`` model or any module holding its blocks in an ``nn.ModuleList``.
        batches: Calibration batches (a list, or a ``DataLoader`` read once): dicts of keyword
            arguments (``model(**batch)``; an ``attention_mask`` marks padding), tuples
            (``model(*batch)``) or tensors (``model(batch)``).
        method: ``"fw"``, ``"admm"``, ``"wanda"``, ``"sparsegpt"``, ``"magnitude"`` (or a solver instance).
        sparsity: Fraction of zeros of every targeted layer (default 0.5 unless ``pattern`` is given), in
            every row of it by default (``mask_scope="row"``, as Wanda and SparseGPT compare), or over the
            whole layer with ``mask_scope="layer"``.
        pattern: A pattern text: ``"2:4"`` (its own level), or ``"row"``, ``"unstructured"``,
            ``"structured:rows"``, ``"block:4x4"`` at ``sparsity`` (see :mod:`constrainedsparse.sets`).
        targets: Which layers of a block are pruned (``nn.Linear`` and GPT-2 ``Conv1D`` by default);
            ``include``/``exclude`` globs and ``overrides`` (``{glob: sparsity}``, first match wins)
            match a layer's weight name in the model or within its block.
        out: If given, a directory that receives ``summary.json`` and the pruned model.
        tokenizer: With ``out``: the tokenizer saved with a ``transformers`` model in ``out/model``
            (default: the one in the folder the model was loaded from; without one, a warning).
        blocks: The blocks in execution order: an ``nn.ModuleList``, a list or any iterable of sub-modules
            (the largest ``ModuleList`` of one class by default).
        mask_scope: ``"row"`` (default) or ``"layer"``: the comparison group of a ``sparsity`` target
            without ``pattern`` (``"row"`` is ``pattern="row"``, ``"layer"`` ``pattern="unstructured"``).
        gram_dtype: ``"float32"`` or ``"float64"``, accumulation dtype of the Gram matrices.
        device: Where calibration and pruning run, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a
            ``torch.device`` (the model's device by default).
        overwrite: With ``out``: replace a previous run's files there.
        progress: Show a progress bar over blocks.
        offload: Keep the model where it is and move one block at a time to ``device``.
        activations: ``"device"`` or ``"cpu"``: where calibration activations live between blocks.
        true_sequential: Prune a block's layers group by group (those called with the same input, in
            call order), each group from the block with the earlier groups pruned (GPTQ's "true
            sequential"); ``False`` (SparseGPT's and Wanda's setting): all from the dense block.
        allocation: Per-layer levels under the global ``sparsity``: ``"uniform"`` (every layer at it),
            ``"lagrangian"`` (Lagrangian relaxation over measured error curves) or ``"owl"`` (OWL's
            outlier-ratio rule); the levels are in the report's ``allocation``.
        allocation_min: Lowest level a layer may get (``lagrangian``, ``owl``).
        allocation_max: Highest level a layer may get (``lagrangian``, ``owl``).
        allocation_step: Spacing of the levels the error curves are measured at (``lagrangian``).
        allocation_weight: ``"block"``, ``"equal"`` or ``"energy"``: the cost the allocation sums (``lagrangian``).
        owl_m: A Wanda score is an outlier above ``owl_m`` times its block's mean (``owl``).
        owl_lambda: Block levels spread over ``[S - owl_lambda, S + owl_lambda]`` (``owl``).
        block_fit_epochs: After each block is pruned, epochs of Adam on its kept weights (masks
            fixed) towards the dense block outputs (:mod:`~constrainedsparse.layerwise.blockfit`);
            0 (default): off. One process only.
        block_fit_lr: Adam's learning rate of the block refit.
        block_fit_target: ``"dense"`` (the dense model's block outputs) or ``"block"`` (the dense
            block on the pruned inputs): the target of the refit and of the mask search.
        block_mask_rounds: After each block is pruned (and before any refit), rounds of the
            block-level mask search towards that target: masks move, kept weights stay the dense
            ones (:mod:`~constrainedsparse.layerwise.blockmask`; ``magnitude``, ``wanda``, ``fw``
            without ``reconstruct``; row, unstructured and N:M patterns); 0 (default): off. One
            process only.
        allow_empty_layers: Accept a level that keeps no weight of a targeted layer (the layer is cut from the
            model; the CLI's ``--set allow_empty_layers``); ``False``: that is an error before pruning.
        config: The solver's hyperparameters as its config object (``FWConfig(alpha=0.3)`` for ``"fw"``),
            instead of keywords.
        **hyperparameters: The solver's hyperparameters (``describe("fw")`` lists them).

    Returns:
        A :class:`~constrainedsparse.layerwise.report.LayerwiseReport` (errors, sparsities).

    Raises:
        ValueError: For a bad argument or hyperparameter, or a layer that does not fit the pattern:
            nothing is pruned or written then (these are checked before the first block). An error met on the
            way (calibration inputs that turn non-finite inside the model, a solver's) leaves the blocks before
            it pruned in place and nothing written; an offloaded block is back where it was.
    """
    started = time.perf_counter()
    flags = {"overwrite": overwrite, "progress": progress, "allow_empty_layers": allow_empty_layers}
    batches = _check_inputs(model, batches, out, flags)
    model = unwrap_compiled(model)  # names without torch.compile's _orig_mod. (blocks run one at a time anyway)
    driver = _driver_keywords(
        pattern,
        {"mask_scope": mask_scope, "gram_dtype": gram_dtype, "offload": offload, "activations": activations,
         "true_sequential": true_sequential, "allocation": allocation, "allocation_min": allocation_min,
         "allocation_max": allocation_max, "allocation_step": allocation_step, "allocation_weight": allocation_weight,
         "owl_m": owl_m, "owl_lambda": owl_lambda, "block_fit_epochs": block_fit_epochs,
         "block_fit_lr": block_fit_lr, "block_fit_target": block_fit_target, "block_mask_rounds": block_mask_rounds},
    )  # fmt: skip
    if tokenizer is not None and out is None:
        warnings.warn("tokenizer= is saved with the pruned model, which only out= writes: it is not used", stacklevel=2)
    target = target_from_flags(sparsity, pattern, DEFAULT_SPARSITY, MASK_SCOPES[driver.mask_scope], keywords=True)
    solver = _solver(method, config, hyperparameters)
    if targets is not None and not isinstance(targets, Targets):
        raise ValueError(f"targets must be a Targets (which layers, per-layer levels), got {type(targets).__name__}")
    targets = Targets(module_types=layer_module_types()) if targets is None else targets
    check_settings(driver, solver, target, targets)
    check_materialized(model)
    device = str(next(model.parameters()).device) if device is None else resolve_device(device, "device")
    layout = check_block_layout(
        model, find_blocks(model) if blocks is None else blocks, targets, target, driver, device,
        allow_empty_layers=allow_empty_layers, keywords=True,
    )  # fmt: skip
    blocks, overrides = layout.blocks, layout.levels
    if driver.allocation == "uniform":
        _warn_pruned_before(model, blocks, targets, target, overrides)
    directory = _directory(model, out, tokenizer, overwrite)
    bar = Progress(len(blocks), f"layer-wise {solver.name}", progress, unit="block")
    with _calibration_mode(model), contextlib.closing(bar):
        levels = solve_levels(driver, model, blocks, batches, target, targets, device)
        reports = prune_blocks(
            model, blocks, batches, solver, target, targets, on_block=lambda index, done: bar.epoch_done(),
            gram_dtype=GRAM_DTYPES[driver.gram_dtype], device=device,
            offload=driver.offload, activations=driver.activations, true_sequential=driver.true_sequential,
            levels=level_targets(target, levels.levels) if levels is not None else overrides,
            fit=driver.block_fit(),
        )  # fmt: skip
    report = _report(model, solver, target, reports, levels, time.perf_counter() - started)
    if directory is not None:
        _warn_without_tokenizer(model, tokenizer, directory.out)
        _write(directory, model, report, target, tokenizer)
    return report


def _warn_pruned_before(
    model: nn.Module, blocks: Sequence[nn.Module], targets: Targets, target: SparsityConfig, levels: dict[str, Any]
) -> None:
    """Warns when a targeted layer holds more zeros than its level (a model pruned before, now at a lower level):
    pruning only adds zeros, so such a layer keeps its own and its error reads 0."""
    for prefix, block in zip(block_prefixes(model, blocks), blocks):
        for name, module in targeted_layers(block, targets, prefix):
            full_name = weight_name(prefix, name)
            level = levels.get(full_name, target)
            weight = layer_weight(module).detach()
            zeros = float((weight == 0).float().mean())
            if zeros == 0.0:  # a model not pruned before: no mask to compute
                continue
            pruned = 1.0 - float(level.feasible_set(weight.shape).mask(weight).float().mean())  # counts rounded
            if zeros > pruned + 1e-9:
                warnings.warn(
                    f"{full_name} holds {zeros:.0%} zeros already, more than the {level.describe()} asked (a model "
                    "pruned before?): pruning only adds zeros, so such layers keep theirs (and their error reads 0)",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
                return


def _driver_keywords(pattern: str | None, values: dict[str, Any]) -> _DriverKeywords:
    """The driver's keywords checked (``mask_scope`` only without ``pattern``; ``None``: ``"row"``).

    Raises:
        ValueError: Naming the keyword.
    """
    if pattern is not None and values["mask_scope"] is not None:
        raise ValueError(
            "give either pattern or mask_scope (mask_scope='row' is pattern='row', 'layer' is pattern='unstructured')"
        )
    driver = _DriverKeywords.from_values(
        {**values, "mask_scope": "row" if values["mask_scope"] is None else values["mask_scope"]}
    )
    driver.validate()
    return driver


def _directory(
    model: nn.Module, out: str | os.PathLike[str] | None, tokenizer: Any, overwrite: bool
) -> RunDirectory | None:
    """With ``out``: the run directory, checked (model savable, tokenizer readable, folder free) before pruning."""
    if out is None:
        return None
    check_savable(model)
    _check_tokenizer(tokenizer)
    directory = RunDirectory(Path(out), overwrite=overwrite, keywords=True)
    directory.check()
    return directory


def _check_tokenizer(tokenizer: Any) -> None:
    """``tokenizer=``: a folder holding tokenizer files, or an object with ``save_pretrained`` (checked before pruning).

    Raises:
        ValueError: Naming the keyword and what it got.
    """
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        load_tokenizer(tokenizer, "tokenizer")
    elif not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(
            f"tokenizer= must be a folder holding a tokenizer or a tokenizer object (with save_pretrained), got "
            f"{type(tokenizer).__name__}"
        )


def _warn_without_tokenizer(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """A ``transformers`` model saved without a tokenizer loads, but ``AutoTokenizer`` on its folder fails: say so."""
    if hasattr(model, "save_pretrained") and tokenizer_source(model, tokenizer) is None:
        source = source_folder(model)
        where = f"in {source}" if source is not None else "(the model was not loaded from a folder)"
        warnings.warn(
            f"{out / 'model'} gets no tokenizer: none was found {where}; pass tokenizer= to save one",
            stacklevel=user_stacklevel(),
        )


def _solver(method: str | LayerwiseSolver, config: Any, hyperparameters: dict[str, Any]) -> LayerwiseSolver:
    """The solver instance, or one built by name from its config object or its hyperparameters."""
    if isinstance(method, LayerwiseSolver):
        if hyperparameters or config is not None:
            raise ValueError("give hyperparameters to the solver instance's config, not as keywords or config=")
        return method
    if config is None:
        return build_solver(method, hyperparameters)
    if hyperparameters:
        raise ValueError("give either config= or hyperparameters as keywords, not both")
    return solver_class(method)(config)


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no key/value cache while calibrating; the model's own settings restored after."""
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False  # calibration passes must not accumulate key/value caches
    try:
        with eval_mode(model):
            yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache


def _report(
    model: nn.Module,
    solver: LayerwiseSolver,
    target: SparsityConfig,
    reports: list[LayerReport],
    levels: Allocation | None,
    seconds: float,
) -> LayerwiseReport:
    """The :class:`LayerwiseReport` of a finished run from its per-layer reports."""
    rows = [{"name": r.name, "relative_error": r.relative_error, "seconds": r.seconds} for r in reports]
    figures = summarize_layers(model, rows)
    return LayerwiseReport(
        method=solver.name,
        # Layer-wise pruning defaults to rows, so the unstructured pattern is named (as the CLI's summary does).
        target=target.describe() if target.pattern != "unstructured" else f"{target.describe()} unstructured",
        mean_layer_error=figures["mean_layer_error"],
        layer_error=figures["layer_error"],
        layer_sparsity=figures["layer_sparsity"],
        achieved_sparsity=figures["achieved_sparsity"],
        model_sparsity=figures["model_sparsity"],
        layer_seconds=figures["layer_seconds"],
        seconds=seconds,
        calibration_tokens=reports[0].tokens if reports else 0,
        layers={r.name: dict(r.metrics) for r in reports},
        allocation=levels.as_dict() if levels is not None else None,
    )


def _write(
    directory: RunDirectory,
    model: nn.Module,
    report: LayerwiseReport,
    target: SparsityConfig,
    tokenizer: Any,
) -> None:
    """``summary.json`` (with the target's fields as a CLI run writes them: ``pattern`` of an N:M run, which
    ``export`` reads) and the pruned model into the run directory (removed again if saving fails)."""
    directory.claim()
    try:
        summary = {**report.as_dict(), **target.summary_fields(), **scope_field(target), "formulation": report.method,
                   "saved_model": save_model(model, directory.out, tokenizer)}  # fmt: skip
        atomic_write_json(directory.out / "summary.json", summary)
    except BaseException:
        directory.discard_if_unused()
        raise
    directory.release()
