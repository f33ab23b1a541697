"""The layer-wise runner: validate, prune block by block, summarise (``constrainedsparse run`` on a
layer-wise problem).

Like the training runner, :func:`prepare` checks everything a user can get wrong before anything
is written, and :func:`execute` checkpoints atomically after every block through the run directory
so a resumed run continues with the next block (the pruned weights so far are in the checkpoint;
the next block's inputs are recomputed from the partially pruned model).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from constrainedsparse import distributed
from constrainedsparse.causal_lm import has_tokenizer
from constrainedsparse.checkpoint import save_weights
from constrainedsparse.errors import UserInputError, first_line, user_input
from constrainedsparse.formulations.factory import available_formulations
from constrainedsparse.layerwise.allocation import (
    Allocation,
    level_targets,
)
from constrainedsparse.layerwise.base import LayerwiseSolver, available_solvers, solver_class
from constrainedsparse.layerwise.checks import (
    check_settings,
    checked_batches,
    checked_scores,
)
from constrainedsparse.layerwise.driver import (
    GRAM_DTYPES,
    LayerReport,
    prune_blocks,
    walk_inputs,
)
from constrainedsparse.layerwise.layers import layer_weight
from constrainedsparse.layerwise.levels import solve_levels
from constrainedsparse.layerwise.preflight import check_block_layout
from constrainedsparse.layerwise.report import PeakMemory, pruned_weights, summarize_layers
from constrainedsparse.layerwise.settings import MASK_SCOPES, DriverSettings, scope_field
from constrainedsparse.logger import finish_summary
from constrainedsparse.progress import Progress, transformers_bars_off
from constrainedsparse.report import layer_rows, write_layers_csv
from constrainedsparse.runs import RunConfig, RunDirectory, environment, open_logger, settings_text
from constrainedsparse.saving import replace_folder, save_pretrained_model, source_folder
from constrainedsparse.settings import resolve_device, route_settings, target_from_flags
from constrainedsparse.spec import LayerwiseProblem
from constrainedsparse.targets import SparsityConfig, unwrap_compiled

__all__ = [
    "DEFAULT_SPARSITY",
    "DriverSettings",
    "LayerwisePrepared",
    "MASK_SCOPES",
    "build_solver",
    "execute",
    "prepare",
]

DEFAULT_SPARSITY = 0.5
BLOCKS = "blocks"
"""Folder of the run directory holding each pruned block's weights (what a resume restores)."""


@dataclasses.dataclass
class LayerwisePrepared:
    """A validated layer-wise run (the model is loaded, nothing is written)."""

    config: RunConfig
    problem: LayerwiseProblem
    solver: LayerwiseSolver
    target: SparsityConfig
    driver: DriverSettings
    options: dict[str, Any]
    model: nn.Module
    batches: list[Any]
    levels: dict[str, SparsityConfig] = dataclasses.field(default_factory=dict)
    """The levels ``Targets.overrides`` give, by layer weight name (the other layers: ``target``)."""

    @property
    def device(self) -> str:
        """Where calibration and pruning run."""
        return self.driver.device

    def effective_settings(self) -> dict[str, str]:
        """Every ``--set`` key's value in effect (given or default), as text: checkpoints keep it so that
        ``--resume`` accepts a key given again with the value the run already uses."""
        return settings_text(self.driver.values(), self.options, self.solver.config.values())


def build_solver(name: str, values: dict[str, Any]) -> LayerwiseSolver:
    """The layer-wise solver ``name`` with its hyperparameters (validated before any model is loaded).

    Raises:
        ValueError: For an unknown name, key, or a bad value.
    """
    cls = solver_class(name)
    config = cls.Config.from_values(values, where=f" for layer-wise solver {name!r}")
    return cls(config)


def _refuse_epochs(config: RunConfig, problem: str) -> None:
    """A layer-wise run trains nothing: an epoch count would be dropped silently (``UserInputError``)."""
    for flag, value in (
        ("--epochs", config.epochs),
        ("--pretrain-epochs", config.pretrain_epochs),
        ("--retrain-epochs", config.retrain_epochs),
    ):
        if value:
            raise UserInputError(
                f"{flag} is not available for the layer-wise problem {problem!r} (it prunes a pretrained model "
                "once, block by block, without training)"
            )


def prepare(
    config: RunConfig,
    problem: LayerwiseProblem,
    before_model: Callable[[], None] | None = None,
    processes: int | None = None,
) -> LayerwisePrepared:
    """Validates a layer-wise run and loads the model and calibration data (``before_model()``, if given, is
    called once the options are checked, before the model loads; ``processes``: the run's, default this job's).

    Raises:
        UserInputError: With one line naming the bad value and what is allowed.
    """
    problem = problem.guarded()
    name = config.formulation
    if name not in available_solvers():
        trains = name in available_formulations()
        what = f"formulation {name!r} trains the model" if trains else f"unknown formulation {name!r}"
        raise UserInputError(
            f"{what}; problem {problem.name!r} is layer-wise: choose one of {', '.join(available_solvers())}"
        )
    _refuse_epochs(config, problem.name)
    with user_input():
        solver_cls = solver_class(name)
        routed = route_settings(
            config.settings,
            {
                "solver": solver_cls.Config.field_types(),
                "options": {k: type(v) for k, v in problem.options.items()},
                "driver": DriverSettings.field_types(),
            },
            f"for formulation {name!r} and problem {problem.name!r}",
        )
        driver = DriverSettings.from_values(routed["driver"])
        driver.validate()
        driver.device = distributed.rank_device(resolve_device(driver.device))
        if config.pattern is not None and "mask_scope" in routed["driver"]:
            raise ValueError(
                "give either --pattern or --set mask_scope (row is --pattern row, layer --pattern unstructured)"
            )
        target = target_from_flags(config.sparsity, config.pattern, DEFAULT_SPARSITY, MASK_SCOPES[driver.mask_scope])
        solver = build_solver(name, routed["solver"])  # validates before the model is loaded
        check_settings(driver, solver, target, problem.targets, processes)
    options = {**problem.options, **routed["options"]}
    if before_model is not None:
        before_model()
    # Our block bar is the run's progress; transformers' loading bars would also break the one-line error
    # contract (they print to stderr before a bad input is detected).
    with transformers_bars_off():
        model = problem.model(options)
    if not isinstance(model, nn.Module):
        raise UserInputError(f"problem {problem.name!r}: model(options) must return a torch.nn.Module, got "
                             f"{type(model).__name__}")  # fmt: skip
    model = unwrap_compiled(model)  # names without torch.compile's _orig_mod. (blocks run one at a time anyway)
    model.to(getattr(torch, driver.dtype)).eval()
    with user_input(f"problem {problem.name!r}: "):
        blocks = problem.model_blocks(model)
    layout = check_block_layout(
        model, blocks, problem.targets, target, driver, driver.device,
        allow_empty_layers=driver.allow_empty_layers, prefix=f"problem {problem.name!r}: ",
    )  # fmt: skip
    batches = problem.calibration(options, config.seed)  # its own errors are one line already (guarded)
    with user_input(f"problem {problem.name!r}: calibration(options, seed): "):
        batches = checked_batches(batches, model)
    resolved = dataclasses.replace(config, sparsity=None if target.fixed_level else target.sparsity, epochs=0)
    return LayerwisePrepared(resolved, problem, solver, target, driver, options, model, batches, layout.levels)


def _report_metrics(report: LayerReport) -> dict[str, float]:
    metrics = {
        f"layer_error/{report.name}": report.relative_error,
        f"layer_seconds/{report.name}": report.seconds,
        f"layer_sparsity/{report.name}": report.sparsity,
    }
    metrics.update({f"{key}/{report.name}": value for key, value in report.metrics.items()})
    return metrics


def check_savable(model: nn.Module) -> None:
    """A ``transformers`` model that ``save_pretrained`` refuses (loaded quantized, e.g. from a GGUF file) is
    refused before anything is pruned.

    Raises:
        ValueError: Naming the quantization and a savable way to load the model.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not hasattr(model, "save_pretrained"):
        return
    try:
        savable = bool(quantizer.is_serializable())
    except Exception:  # a quantizer whose check needs more than it has: transformers would refuse it too
        savable = False
    if not savable:
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(
            f"out=: the model was loaded quantized ({getattr(method, 'value', method)}, e.g. from a GGUF file) and "
            "transformers cannot save it: load a plain copy (SmolLM2: constrainedsparse.models.materialize_smollm2"
            "(folder) writes one) or leave out= out and save the pruned weights yourself"
        )


def tokenizer_source(model: nn.Module, tokenizer: Any = None) -> Any:
    """What the saved model's tokenizer comes from: ``tokenizer`` if given, else the folder the model was
    loaded from if it holds one, else ``None``."""
    if tokenizer is not None:
        return tokenizer
    source = source_folder(model)
    return source if source is not None and has_tokenizer(source) else None


def save_model(model: nn.Module, out: Path, tokenizer: Any = None) -> str:
    """Saves the pruned model so that it loads the standard way.

    A ``transformers`` model goes to ``out/model`` with ``save_pretrained``, together with ``tokenizer``
    or else the tokenizer of the folder it was loaded from (and a sentence-transformers source's module
    files, so ``SentenceTransformer(out/model)`` works): :func:`constrainedsparse.saving.save_pretrained_model`;
    without a tokenizer it is saved alone. Anything else is saved as ``out/model.safetensors``.
    """
    if hasattr(model, "save_pretrained"):
        source = tokenizer_source(model, tokenizer)
        with transformers_bars_off():  # transformers' "Writing model shards" bar: the run has its own progress
            if source is not None:
                save_pretrained_model(model, out / "model", source)
            else:
                staging = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
                try:
                    model.save_pretrained(staging)
                    replace_folder(staging, out / "model")
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        return "model/"
    save_weights(out / "model.safetensors", unwrap_compiled(model).state_dict())
    return "model.safetensors"


class _Blocks:
    """Per-block bookkeeping of a run: logging, the pruned weights so far, checkpoints."""

    def __init__(
        self, prepared: LayerwisePrepared, directory: RunDirectory, state: dict[str, Any] | None, count: int
    ) -> None:
        self.prepared, self.directory = prepared, directory
        self.main = distributed.is_main_process()
        self.modules = dict(prepared.model.named_modules())
        self.reports: list[dict[str, Any]] = state["reports"] if state else []
        self.start = state["block"] if state else 0
        self.step = state["step"] if state else 0
        self.seconds_before = state["seconds"] if state else 0.0
        stored = state.get("allocation") if state else None
        self.allocation: Allocation | None = Allocation(**stored) if stored else None
        self.started = time.perf_counter()
        logged = {
            **prepared.config.identity(),
            **prepared.solver.config.values(),
            **dataclasses.asdict(prepared.driver),
            "options": dict(prepared.options),  # the problem's: runs can be grouped by them
        }
        self.logger = open_logger(directory, prepared.config, logged, state)
        show = prepared.config.progress and self.main
        self.bar = Progress(count, f"layer-wise {prepared.solver.name}", show, initial=self.start, unit="block")

    def block_file(self, index: int) -> Path:
        """Where the pruned weights of block ``index`` are kept (one file per block, written once)."""
        return self.directory.out / BLOCKS / f"block-{index:05d}.safetensors"

    def restore(self) -> None:
        """Writes the pruned weights of a resumed run's finished blocks back into the model.

        Rank 0 reads the block files and sends the weights to the other ranks.
        """
        weights: dict[str, torch.Tensor] = {}
        if self.main:
            for index in range(self.start):
                if not self.block_file(index).is_file():
                    raise UserInputError(
                        f"--resume: {self.block_file(index)} is missing: the run in {self.directory.out} has finished "
                        "(a finished run keeps its pruned model, not its block files) or its files were removed; "
                        "--overwrite runs it again"
                    )
                try:
                    weights.update(load_file(self.block_file(index)))
                except Exception as err:  # safetensors' own error type: a file cut short by a crash, a full disk
                    raise UserInputError(
                        f"--resume: {self.block_file(index)} is damaged or truncated ({first_line(err)}); --overwrite "
                        "runs the pruning again"
                    ) from err
        for name, weight in distributed.broadcast_object(weights).items():
            module = self.modules[name.removesuffix(".weight")]
            with torch.no_grad():
                layer_weight(module).copy_(weight.to(module.weight.device, module.weight.dtype))

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def on_block(self, index: int, block_reports: list[LayerReport]) -> None:
        """Logs the block's layers, checkpoints the run after it and moves the progress bar (rank 0's: the only one
        shown)."""
        for report in block_reports:
            for point in report.trace:  # already sampled by the solver
                self.step += 1
                row = {f"trace/{k}": v for k, v in point.items()}
                self.logger.log({**row, "trace/layer": len(self.reports)}, self.step)
            self.step += 1
            self.logger.log({**_report_metrics(report), "block": index + 1}, self.step)
            self.reports.append(dataclasses.asdict(report) | {"trace": []})
        if not self.main:
            return  # only rank 0 writes files
        weights = {r.name: layer_weight(self.modules[r.name.removesuffix(".weight")]) for r in block_reports}
        save_weights(self.block_file(index), weights)  # this block's weights only: the checkpoint stays small
        self.directory.save(
            self.prepared.config,
            {
                "block": index + 1,
                "reports": self.reports,
                "allocation": self.allocation.as_dict() if self.allocation is not None else None,
                "step": self.step,
                "seconds": self.seconds(),
                "wandb_id": self.logger.run_id,
                "effective_settings": self.prepared.effective_settings(),
            },
        )
        self.bar.epoch_done()


def _allocation(prepared: LayerwisePrepared, blocks: Sequence[nn.Module], run: _Blocks) -> Allocation | None:
    """The per-layer levels of ``allocation=lagrangian|owl`` (measured and solved once; kept by checkpoints)."""
    driver = prepared.driver
    if driver.allocation == "uniform":
        return None
    if run.allocation is not None:  # a resumed run keeps the levels it started with
        return run.allocation
    what = "error curves" if driver.allocation == "lagrangian" else "outlier ratios"
    progress = Progress(len(blocks), f"allocation: {what}", prepared.config.progress and run.main, unit="block")
    run.allocation = solve_levels(driver, prepared.model, blocks, prepared.batches, prepared.target,
                                  prepared.problem.targets, prepared.device, progress.epoch_done)  # fmt: skip
    progress.close()
    assert run.allocation is not None
    logged = {f"allocation/level/{name}": level for name, level in run.allocation.levels.items()}
    logged["allocation/achieved"] = run.allocation.achieved
    if run.allocation.multiplier is not None:
        logged["allocation/multiplier"] = run.allocation.multiplier
    for block, ratio in (run.allocation.outlier_ratios or {}).items():
        logged[f"allocation/outlier_ratio/{block}"] = ratio
    run.logger.log(logged, run.step)
    return run.allocation


def _place(prepared: LayerwisePrepared) -> bool | None:
    """Puts the model where it computes; returns its ``use_cache`` (turned off for calibration)."""
    model, driver = prepared.model, prepared.driver
    if not driver.offload:
        model.to(prepared.device)
    elif torch.device(prepared.device).type == "cpu" and distributed.is_main_process():
        print(
            "note: --set offload=true with device cpu does nothing (the model is on the CPU already)", file=sys.stderr
        )
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False  # calibration passes must not accumulate key/value caches
    return use_cache


def _resumed_reference(prepared: LayerwisePrepared, blocks: Sequence[nn.Module], start: int) -> list | None:
    """A resumed run's dense inputs of block ``start`` for ``block_fit_target=dense`` (before the restore)."""
    driver = prepared.driver
    fit = driver.block_fit()
    if start == 0 or start >= len(blocks) or not fit.enabled or fit.target != "dense":
        return None
    return walk_inputs(prepared.model, blocks[start], prepared.batches, prepared.device, driver.offload,
                       driver.activations)  # fmt: skip


def execute(prepared: LayerwisePrepared, directory: RunDirectory, state: dict[str, Any] | None) -> dict | None:
    """Prunes the prepared model block by block and writes summary, metrics and the pruned model.

    Returns ``None`` when ``config.stop_after_epochs`` (counted in blocks here) stopped it early.
    """
    config, problem, model, driver = prepared.config, prepared.problem, prepared.model, prepared.driver
    use_cache = _place(prepared)
    peak = PeakMemory(prepared.device)
    scored = distributed.is_main_process() and problem.held_out is not None and problem.score is not None
    dense_outputs = problem.held_out_outputs(model, prepared.options) if scored else None
    if scored:  # its mistakes now, not after the pruning: the dense model scored against itself
        reserved = {*_summary(prepared, model, [], 0.0), "peak_memory", "allocation", "saved_model", "wandb_run",
                    "score_keys"}  # fmt: skip
        with user_input(f"problem {problem.name!r}: "):
            checked_scores(problem.score(dense_outputs, dense_outputs), reserved)
    blocks = problem.model_blocks(model)
    run = _Blocks(prepared, directory, state, len(blocks))
    stop = len(blocks) if config.stop_after_epochs is None else run.start + config.stop_after_epochs
    try:
        allocation = _allocation(prepared, blocks, run)
        reference = _resumed_reference(prepared, blocks, run.start)
        run.restore()
        prune_blocks(
            model, blocks, prepared.batches, prepared.solver, prepared.target, problem.targets,
            start=run.start, stop=stop, gram_dtype=GRAM_DTYPES[driver.gram_dtype], device=prepared.device,
            on_block=run.on_block, offload=driver.offload,
            activations=driver.activations, true_sequential=driver.true_sequential,
            levels=level_targets(prepared.target, allocation.levels) if allocation is not None else prepared.levels,
            fit=driver.block_fit(), reference=reference,
        )  # fmt: skip
        if stop < len(blocks):
            return None
        summary = _summary(prepared, model, run.reports, run.seconds())
        summary["peak_memory"] = peak.read()
        if allocation is not None:
            summary["allocation"] = allocation.as_dict()
        if scored:
            with user_input(f"problem {problem.name!r}: "):
                scores = checked_scores(
                    problem.score(dense_outputs, problem.held_out_outputs(model, prepared.options)), summary
                )
            summary.update(scores)
            summary["score_keys"] = list(scores)  # what the printed summary shows of them
            run.logger.log(scores, run.step + 1)
        final = {"mean_layer_error": summary["mean_layer_error"], "sparsity/achieved": summary["achieved_sparsity"]}
        run.logger.log(final, run.step + 1)
        finish_summary(run.logger, summary)
    finally:
        run.bar.close()
        run.logger.close()
    distributed.dump_rank_state("layerwise-final", {"model": model.state_dict(), "summary": summary})
    if use_cache is not None:
        model.config.use_cache = use_cache  # the saved model generates as the original did
    if run.main:
        summary["saved_model"] = save_model(model, directory.out)
        weights = pruned_weights(model, list(summary["layer_error"]))
        write_layers_csv(directory.out / "layers.csv", layer_rows(weights, summary["layer_error"]))
    directory.finish(summary)
    if run.main:  # the saved model holds every pruned block: the per-block copies would double the run's size
        shutil.rmtree(directory.out / BLOCKS, ignore_errors=True)
    return summary


def _summary(prepared: LayerwisePrepared, model: nn.Module, reports: list[dict[str, Any]], seconds: float) -> dict:
    summary: dict[str, Any] = {
        "problem": prepared.problem.name,
        "formulation": prepared.config.formulation,
        **summarize_layers(model, reports),
        "seconds": seconds,
        "epochs": 0,
        "seed": prepared.config.seed,
        "settings": dict(prepared.config.settings),
        "effective_settings": prepared.effective_settings(),
        **environment(),
        "calibration_tokens": reports[0]["tokens"] if reports else 0,
    }
    summary.update(prepared.target.summary_fields())
    summary.update(scope_field(prepared.target))
    return summary
