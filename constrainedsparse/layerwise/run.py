"""``constrainedsparse run`` for layer-wise problems: validate, prune block by block, summarise.

Like the training engine, :func:`prepare` checks everything a user can get wrong before anything
is written, and :func:`execute` checkpoints atomically after every block so ``--resume`` continues
with the next block (the pruned weights so far are in the checkpoint; the next block's inputs are
recomputed from the partially pruned model).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from constrainedsparse import distributed
from constrainedsparse.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint, save_weights
from constrainedsparse.config import Hyperparameters
from constrainedsparse.formulations import available_formulations
from constrainedsparse.layerwise.base import LayerwiseSolver, available_solvers, solver_class
from constrainedsparse.layerwise.driver import GRAM_DTYPES, LayerReport, layer_weight, prune_blocks, targeted_layers
from constrainedsparse.logger import WANDB_MODES, MetricsLogger, NullLogger, plot_metrics
from constrainedsparse.settings import config_field_types, resolve_device, route_settings, target_from_flags
from constrainedsparse.spec import LayerwiseProblem
from constrainedsparse.targets import SparsityConfig

__all__ = ["DEFAULT_SPARSITY", "DRIVER_KEYS", "LayerwisePrepared", "execute", "prepare", "run"]

CHECKPOINT = "checkpoint.pt"
DEFAULT_SPARSITY = 0.5
DRIVER_KEYS: dict[str, type] = {"mask_scope": str, "gram_dtype": str, "device": str}
MASK_SCOPES = {"row": "row", "layer": "unstructured"}


@dataclasses.dataclass
class LayerwisePrepared:
    """A validated layer-wise run (the model is loaded, nothing is written)."""

    config: Any  # engine.RunConfig
    problem: LayerwiseProblem
    solver: LayerwiseSolver
    target: SparsityConfig
    driver: dict[str, Any]
    options: dict[str, Any]
    model: nn.Module
    batches: list[dict[str, Any]]


def _layer_shapes(problem: LayerwiseProblem, model: nn.Module) -> list[tuple[str, torch.Size]]:
    shapes = []
    for index, block in enumerate(problem.model_blocks(model)):
        for name, module in targeted_layers(block, problem.targets):
            shapes.append((f"block {index} {name}", layer_weight(module).shape))
    return shapes


def _hide_transformers_progress_bars() -> None:
    """Our block bar is the run's progress; transformers' loading/saving bars would also break the
    one-line error contract (they print to stderr before a bad input is detected)."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # transformers is an optional extra
        return
    transformers_logging.disable_progress_bar()


def prepare(config: Any, problem: LayerwiseProblem) -> LayerwisePrepared:
    """Validates a layer-wise run and loads the model and calibration data.

    Raises:
        ValueError: With one line naming the bad value and what is allowed.
    """
    name = config.formulation
    if name not in available_solvers():
        kind = "trains the model" if name in available_formulations() else "is not a formulation"
        raise ValueError(
            f"formulation {name!r} {kind}; problem {problem.name!r} is layer-wise: choose one of "
            f"{', '.join(available_solvers())}"
        )
    if config.wandb not in WANDB_MODES:
        raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {config.wandb!r}")
    if config.retrain_epochs:
        raise ValueError(f"--retrain-epochs is not available for the layer-wise problem {problem.name!r}")
    solver_cls = solver_class(name)
    routed = route_settings(
        config.settings,
        {
            "solver": config_field_types(solver_cls.Config),
            "options": {k: type(v) for k, v in problem.options.items()},
            "driver": DRIVER_KEYS,
        },
        f"for formulation {name!r} and problem {problem.name!r}",
    )
    driver: dict[str, Any] = {"mask_scope": "row", "gram_dtype": "float32", "device": "cpu", **routed["driver"]}
    options = {**problem.options, **routed["options"]}
    solver_values = routed["solver"]
    if driver["mask_scope"] not in MASK_SCOPES:
        raise ValueError(f"--set mask_scope must be one of {', '.join(MASK_SCOPES)}, got {driver['mask_scope']!r}")
    if driver["gram_dtype"] not in GRAM_DTYPES:
        raise ValueError(f"--set gram_dtype must be one of {', '.join(GRAM_DTYPES)}, got {driver['gram_dtype']!r}")
    driver["device"] = distributed.rank_device(resolve_device(driver["device"]))
    target = target_from_flags(config.sparsity, config.pattern, DEFAULT_SPARSITY, MASK_SCOPES[driver["mask_scope"]])
    config_cls = solver_cls.Config
    flat = issubclass(config_cls, Hyperparameters)  # keys routed into nested groups
    solver = solver_cls(config_cls.from_values(solver_values) if flat else config_cls(**solver_values))  # validates
    _hide_transformers_progress_bars()
    model = problem.model(options)
    model.eval()
    for where, shape in _layer_shapes(problem, model):
        try:
            target.feasible_set(shape)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    batches = problem.calibration(options, config.seed)
    if not batches:
        raise ValueError(f"problem {problem.name!r} produced no calibration batches")
    if config.resume and distributed.is_main_process() and not (Path(config.out) / CHECKPOINT).is_file():
        raise ValueError(f"--resume needs {Path(config.out) / CHECKPOINT}, which does not exist")
    return LayerwisePrepared(config, problem, solver, target, driver, options, model, batches)


def _identity(prepared: LayerwisePrepared) -> dict[str, Any]:
    config = prepared.config
    return {
        "problem": prepared.problem.name,
        "formulation": config.formulation,
        "target": prepared.target.describe(),
        "pattern": prepared.target.pattern,
        "seed": config.seed,
        "settings": dict(sorted(config.settings.items())),
    }


def _solver_values(config: Any) -> dict[str, Any]:
    """The solver's hyperparameters by flat key (as ``--set`` names them)."""
    return config.values() if isinstance(config, Hyperparameters) else dataclasses.asdict(config)


def _report_metrics(report: LayerReport) -> dict[str, float]:
    metrics = {
        f"layer_error/{report.name}": report.relative_error,
        f"layer_seconds/{report.name}": report.seconds,
        f"layer_sparsity/{report.name}": report.sparsity,
    }
    metrics.update({f"{key}/{report.name}": value for key, value in report.metrics.items()})
    return metrics


def _save_model(model: nn.Module, out: Path) -> str:
    """Saves the pruned model: ``save_pretrained`` into ``out/model`` for transformers, else safetensors."""
    if hasattr(model, "save_pretrained"):
        final = out / "model"
        staging = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
        try:
            model.save_pretrained(staging)
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return "model/"
    save_weights(out / "model.safetensors", model.state_dict())
    return "model.safetensors"


def execute(prepared: LayerwisePrepared) -> dict[str, Any] | None:
    """Prunes the prepared model block by block and writes summary, metrics and the pruned model.

    Returns ``None`` when ``config.stop_after_epochs`` (counted in blocks here) stopped it early.

    Raises:
        ValueError: If ``--resume`` finds a checkpoint of a different run.
    """
    config, problem, model = prepared.config, prepared.problem, prepared.model
    out = Path(config.out)
    identity = _identity(prepared)
    main = distributed.is_main_process()
    state = None
    if config.resume:  # rank 0 reads it and sends it to the others once
        state = distributed.broadcast_object(load_checkpoint(out / CHECKPOINT) if main else None)
    if state is not None and state["identity"] != identity:
        raise ValueError(f"--resume: the checkpoint in {out} is of another run ({state['identity']}), not {identity}")
    device = prepared.driver["device"]
    model.to(device)
    started = time.perf_counter()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # calibration passes must not accumulate key/value caches
    scored = main and problem.held_out is not None and problem.score is not None
    dense_outputs = problem.held_out(model, prepared.options) if scored else None
    blocks = problem.model_blocks(model)
    modules = dict(model.named_modules())
    pruned: dict[str, torch.Tensor] = {}
    reports: list[dict[str, Any]] = []
    start, step, seconds_before = 0, 0, 0.0
    if state is not None:
        pruned, reports = state["weights"], state["reports"]
        start, step, seconds_before = state["block"], state["step"], state["seconds"]
        for name, weight in pruned.items():
            module = modules[name.removesuffix(".weight")]
            with torch.no_grad():
                layer_weight(module).copy_(weight.to(device, module.weight.dtype))
    logger = (MetricsLogger if main else NullLogger)(
        out,
        config.wandb,
        config={**identity, **_solver_values(prepared.solver.config), **prepared.driver},
        run_id=state["wandb_id"] if state else None,
        resume_step=step if state else None,
    )
    progress: dict[str, int] = {"step": step}

    def on_block(index: int, block_reports: list[LayerReport]) -> None:
        for report in block_reports:
            for point in report.trace:  # already sampled by the solver
                progress["step"] += 1
                row = {f"trace/{k}": v for k, v in point.items()}
                logger.log({**row, "trace/layer": len(reports)}, progress["step"])
            progress["step"] += 1
            logger.log({**_report_metrics(report), "block": index + 1}, progress["step"])
            reports.append(dataclasses.asdict(report) | {"trace": []})
        if not main:
            return  # only rank 0 checkpoints, so only rank 0 keeps copies of the pruned weights
        for report in block_reports:
            pruned[report.name] = layer_weight(modules[report.name.removesuffix(".weight")]).detach().cpu().clone()
        save_checkpoint(
            out / CHECKPOINT,
            {
                "version": 1,
                "identity": identity,
                "block": index + 1,
                "weights": pruned,
                "reports": reports,
                "step": progress["step"],
                "seconds": seconds_before + time.perf_counter() - started,
                "wandb_id": logger.run_id,
            },
        )

    stop = len(blocks) if config.stop_after_epochs is None else start + config.stop_after_epochs
    try:
        prune_blocks(
            model,
            blocks,
            prepared.batches,
            prepared.solver,
            prepared.target,
            problem.targets,
            start=start,
            stop=stop,
            gram_dtype=GRAM_DTYPES[prepared.driver["gram_dtype"]],
            device=device,
            on_block=on_block,
            progress=config.progress and main,
        )
        if stop < len(blocks):
            return None
        summary = _summary(prepared, model, reports, seconds_before + time.perf_counter() - started)
        if scored:
            scores = problem.score(dense_outputs, problem.held_out(model, prepared.options))
            summary.update(scores)
            logger.log(scores, progress["step"] + 1)
        final = {"mean_layer_error": summary["mean_layer_error"], "sparsity/achieved": summary["achieved_sparsity"]}
        logger.log(final, progress["step"] + 1)
    finally:
        logger.close()
    distributed.dump_rank_state("layerwise-final", {"model": model.state_dict(), "summary": summary})
    if main:
        summary["saved_model"] = _save_model(model, out)
        atomic_write_json(out / "summary.json", summary)
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    return summary


def _summary(prepared: LayerwisePrepared, model: nn.Module, reports: list[dict[str, Any]], seconds: float) -> dict:
    modules = dict(model.named_modules())
    zeros, total, layer_sparsity = 0, 0, {}
    for report in reports:
        weight = modules[report["name"].removesuffix(".weight")].weight
        layer_zeros = int((weight == 0).sum())
        zeros, total = zeros + layer_zeros, total + weight.numel()
        layer_sparsity[report["name"]] = layer_zeros / weight.numel()
    layer_error = {r["name"]: r["relative_error"] for r in reports}
    summary: dict[str, Any] = {
        "problem": prepared.problem.name,
        "formulation": prepared.config.formulation,
        "achieved_sparsity": zeros / total if total else 0.0,
        "layer_sparsity": layer_sparsity,
        "layer_error": layer_error,
        "mean_layer_error": sum(layer_error.values()) / len(layer_error) if layer_error else 0.0,
        "layer_seconds": {r["name"]: r["seconds"] for r in reports},
        "seconds": seconds,
        "epochs": 0,
        "seed": prepared.config.seed,
        "settings": dict(prepared.config.settings),
        "calibration_tokens": reports[0]["tokens"] if reports else 0,
    }
    if prepared.target.pattern == "nm":
        summary["pattern"] = prepared.target.describe()
    else:
        summary["target_sparsity"] = prepared.target.sparsity
        summary["mask_scope"] = prepared.driver["mask_scope"]
    return summary


def run(config: Any, problem: LayerwiseProblem) -> dict[str, Any] | None:
    """Validates and executes; removes a run directory this call created if it fails before a checkpoint.

    Raises:
        ValueError: Bad input (nothing is left on disk).
    """
    prepared = prepare(config, problem)
    out = Path(config.out)
    created = not out.exists()
    try:
        with distributed.process_group(prepared.driver["device"]):  # under torchrun; else a no-op
            return execute(prepared)
    except BaseException:
        if created and distributed.is_main_process() and not (out / CHECKPOINT).is_file():
            shutil.rmtree(out, ignore_errors=True)
        raise
