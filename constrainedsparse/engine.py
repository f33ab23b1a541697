"""The training runner: dense model (cached) -> pruning epochs -> hard pruning -> masked retraining.

:func:`~constrainedsparse.preparation.prepare` (re-exported here) validates everything a user can get wrong
*before* anything is written; :func:`execute` runs the phases, checkpointing atomically at every epoch end
through the run directory (:class:`~constrainedsparse.runs.RunDirectory`) so a resumed run continues where it
stopped. The scaffold (:func:`constrainedsparse.runners.run`) owns the directory; the dense model,
the data order and evaluation are in :mod:`constrainedsparse.dense`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from constrainedsparse import distributed
from constrainedsparse.batches import to_device
from constrainedsparse.batchnorm import batchnorm_layers
from constrainedsparse.checkpoint import save_weights
from constrainedsparse.dense import (
    PRUNE_PHASE,
    PRUNE_SEED_OFFSET,
    RETRAIN_PHASE,
    DenseRecipe,
    cache_dir,
    collate_samples,
    dense_model,
    evaluate,
    loader,
    random_states,
    reference_batch,
    seed_everything,
    set_random_states,
)
from constrainedsparse.errors import (
    NonFiniteLossError,
    UserInputError,
    debugging,
    first_line,
    plugin_code,
    raised_in_forward,
    user_stacklevel,
)
from constrainedsparse.formulations import Formulation
from constrainedsparse.formulations.retrain import FixedMaskRetrain
from constrainedsparse.logger import MetricsLogger, NullLogger, finish_summary
from constrainedsparse.masks import achieved_sparsity, hard_prune, layer_sparsity, remove_masks
from constrainedsparse.postprune import batchnorm_stage, purge_stage
from constrainedsparse.preparation import DEFAULT_SPARSITY, TrainingPrepared, prepare, task_problem
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.progress import Progress
from constrainedsparse.purge import purge
from constrainedsparse.report import (
    constraint_report,
    empty_layers,
    final_violations,
    layer_rows,
    model_figures,
    write_layers_csv,
)
from constrainedsparse.runs import RunConfig, RunDirectory, environment, open_logger
from constrainedsparse.settings import TrainingSettings
from constrainedsparse.targets import TargetParam, unwrap_compiled
from constrainedsparse.usercode import GuardedDataset, user_code_failed

__all__ = [
    "DEFAULT_SPARSITY",
    "NonFiniteLossError",
    "RunConfig",
    "TrainingPrepared",
    "TrainingSettings",
    "cache_dir",
    "execute",
    "prepare",
    "reference_batch",
]


@dataclasses.dataclass(frozen=True)
class _Parts:
    """What a run is built from (:func:`_build`): its data, the dense model with its test metric and cache
    file, the targets, the constrained problem and the logger."""

    train: Dataset
    test: Dataset
    model: torch.nn.Module
    dense_value: float
    dense_cache: dict[str, Any]
    targets: list[TargetParam]
    sparsity_problem: SparsityProblem
    logger: MetricsLogger | NullLogger


class _Run:
    """Mutable state of one execution (kept in one place so checkpoints see all of it)."""

    def __init__(self, prepared: TrainingPrepared, directory: RunDirectory, parts: _Parts) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.directory = directory
        self.train, self.test, self.model = parts.train, parts.test, parts.model
        self.targets, self.sparsity_problem, self.logger = parts.targets, parts.sparsity_problem, parts.logger
        self.dense_cache = parts.dense_cache  # the dense model's cache file, and whether it was loaded from it
        self.step = 0
        self.seconds_before = 0.0
        self.started = time.perf_counter()
        self.metric = prepared.problem.test_metric.name  # names the logged family and summary keys
        self.dense_value = parts.dense_value
        self.hardprune_value: float | None = None
        self.summary_extra: dict[str, Any] = {}
        self.phase_extra: dict[str, Any] = {}
        self.epochs_this_invocation = 0

    def seconds(self) -> float:
        """Wall seconds of the run over every invocation."""
        return self.seconds_before + time.perf_counter() - self.started

    def test_batch(self) -> Any:
        """The whole test set as one batch on the run's device (what data-dependent constraints are reported on)."""
        return to_device(collate_samples(self.test, range(len(self.test))), self.prepared.device)

    def check_not_emptied(self) -> None:
        """Stops the run when a hard prune left a targeted tensor without a weight (unless allowed)."""
        emptied = empty_layers({t.name: t.tensor for t in self.targets})
        if emptied and not self.prepared.training.allow_empty_layers:
            saved = self.directory.checkpoint_path.is_file()
            where = f"; the last checkpoint is {self.directory.checkpoint_path}" if saved else ""
            floor = " (or keep a floor per layer: --set min_layer_density=D)" if self.config.formulation == "l0" else ""
            raise UserInputError(
                f"hard pruning left {', '.join(emptied)} without a single weight (the layer is cut from the model); "
                f"set --set allow_empty_layers=true to accept that{floor}{where}"
            )

    def checkpoint(self, phase: str, epoch: int, formulation: Formulation) -> None:
        """Saves everything the run needs to continue after ``epoch`` of ``phase``."""
        self.directory.save(
            self.config,
            {
                "phase": phase,
                "epoch": epoch,
                "step": self.step,
                "model": self.model.state_dict(),
                "formulation": formulation.state_dict(),
                "optimizer": formulation.optimizer.state_dict(),
                "rng": random_states(),
                "dense_metric": self.dense_value,
                "hardprune_metric": self.hardprune_value,
                "seconds": self.seconds(),
                "wandb_id": self.logger.run_id,
                "effective_settings": self.prepared.effective_settings(),
                "logged_step": self.logger.last_step,
                **self.phase_extra,
            },
        )

    def _kept(self) -> str:
        if self.directory.checkpoint_path.is_file():
            return f"the last good checkpoint is {self.directory.checkpoint_path}"
        return "no checkpoint was written yet"

    def nonfinite(self, loss: float, phase: str, epoch: int, constraints: Sequence[str] = ()) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"loss became {loss} at step {self.step} ({phase} epoch {epoch + 1})"
            + (
                f"; not finite either: constraint {', '.join(map(repr, constraints))} (its value or multiplier: the "
                "cause, or carried along by weights a too large step made non-finite)"
                if constraints
                else ""
            )
            + f"; training stopped, {self._kept()}"
        )

    def nonfinite_parameter(self, phase: str, epoch: int) -> NonFiniteLossError | None:
        """At an epoch's end, before its checkpoint: the last step's update may have left NaN/inf beside a finite
        loss (the loss is computed before it), which the checkpoint and the saved model would keep. Trained
        floating-point parameters only (a frozen one may hold an inf on purpose); a target by its name."""
        names = {id(t.stored): t.name for t in self.targets}
        odd = next(
            (
                names.get(id(p), n)
                for n, p in self.model.named_parameters()
                if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(p).all())
            ),
            None,
        )
        if odd is None:
            return None
        return NonFiniteLossError(
            f"{odd} became NaN or inf by the end of {phase} epoch {epoch + 1} (step {self.step}); training stopped, "
            f"{self._kept()}"
        )


def _train_phase(
    run: _Run, formulation: Formulation, phase: str, phase_index: int, num_epochs: int, start_epoch: int
) -> bool:
    """Trains ``num_epochs`` epochs from ``start_epoch``; returns False if stopped early."""
    prepared, problem = run.prepared, run.sparsity_problem
    batch_size, device = prepared.training.batch_size, prepared.device
    steps_per_epoch = math.ceil(len(run.train) / batch_size)
    desc = f"{phase} {prepared.config.formulation if phase == 'prune' else ''}".strip()
    progress = Progress(num_epochs, desc, run.config.progress, initial=start_epoch, steps_per_unit=steps_per_epoch)
    for epoch in range(start_epoch, num_epochs):
        if run.config.stop_after_epochs is not None and run.epochs_this_invocation >= run.config.stop_after_epochs:
            progress.close()
            return False
        epoch_metrics = formulation.start_epoch(epoch)
        # DDP under torchrun: built anew for every phase, and again if masks/gates were (un)registered
        problem.forward_module = distributed.wrap(run.model, None if epoch == start_epoch else problem.forward_module)
        for batch in loader(run.train, batch_size, run.config.seed, phase_index, epoch):
            try:
                cmp_state, metrics = formulation.training_step(to_device(batch, device))
            except Exception as err:  # the problem's model failing on a batch is one line, as in the dense phase
                if debugging() or isinstance(err, UserInputError) or not raised_in_forward(err, run.model):
                    raise
                progress.close()
                raise user_code_failed(prepared.problem.name, "the model on a training batch, model(x)", err) from err
            run.step += 1
            loss = cmp_state.loss.item()
            if not math.isfinite(loss):
                progress.close()
                users = set(problem.user_constraint_names)
                odd = [name for name in problem.nonfinite_constraints(cmp_state) if name in users]
                raise run.nonfinite(loss, phase, epoch, odd)
            if run.step % prepared.training.log_every == 0 or metrics:
                run.logger.log({**problem.step_metrics(cmp_state), **metrics}, run.step)
            progress.step(loss=loss)
        error = run.nonfinite_parameter(phase, epoch)
        if error is not None:
            progress.close()
            raise error
        epoch_metrics.update(formulation.end_epoch(epoch))
        run.logger.log_histograms(formulation.histograms(), run.step)
        epoch_metrics.update(_epoch_metrics(run, formulation, phase_index, epoch))
        run.logger.log(epoch_metrics, run.step)
        run.epochs_this_invocation += 1
        run.checkpoint(phase, epoch + 1, formulation)
        progress.epoch_done(loss=loss, **{run.metric: epoch_metrics[f"{run.metric}/test"]})
    progress.close()
    return True


@torch.no_grad()
def _epoch_metrics(run: _Run, formulation: Formulation, phase_index: int, epoch: int) -> dict[str, float]:
    problem, targets = run.prepared.problem, run.sparsity_problem.targets
    value = evaluate(problem, run.model, run.test)
    with formulation.hard_prune_preview(formulation.hard_masks()):  # the hard-pruned model's metric now
        hardprune_now = evaluate(problem, run.model, run.test)
    metrics = {
        f"{run.metric}/test": value,
        f"{run.metric}/hardprune_now": hardprune_now,
        "sparsity/achieved": achieved_sparsity(targets),
        "phase": phase_index,
        "epoch": epoch + 1,
    }
    metrics.update({f"density/{k}": 1.0 - v for k, v in layer_sparsity(targets).items()})
    return metrics


def check_reference_shards(formulation: str, wanted: int, training_samples: int) -> None:
    """Under torchrun every rank holds a shard of the reference batch (a rank with no sample has no f to give).

    Raises:
        UserInputError: On every rank alike, when the batch has fewer samples than there are processes.
    """
    held, world = min(wanted, training_samples), distributed.world_size()
    if wanted and held < world:
        raise UserInputError(
            f"{formulation}: its reference batch of {held} training samples (--set reference_samples, at "
            f"most the training set) is shared out over {world} processes: give reference_samples >= {world}"
        )


def _build(prepared: TrainingPrepared, directory: RunDirectory, resume_state: dict[str, Any] | None) -> _Run:
    """The run: its data, the dense model, the targets, the problem and the logger."""
    config, problem = prepared.config, prepared.problem
    seed_everything(config.seed)  # --seed reaches the problem's data(options) too (random data, a random split)
    data = problem.datasets(prepared.options)  # read through GuardedDataset: the user's item errors are one line
    train, test = (GuardedDataset(dataset, problem.name, which) for dataset, which in zip(data, ("training", "test")))
    for name, dataset in (("training", train), ("test", test)):
        if len(dataset) == 0:
            raise UserInputError(f"problem {problem.name!r}: data(options) returned an empty {name} set")
    wanted = prepared.formulation_cls.reference_samples_for(prepared.formulation_config)
    check_reference_shards(config.formulation, wanted, len(train))  # before the dense model trains
    recipe = DenseRecipe(
        problem, prepared.options, prepared.training.lr, prepared.training.batch_size, prepared.device,
        config.seed, prepared.pretrain_epochs, config.progress,
    )  # fmt: skip
    model, dense_value, dense_cache = dense_model(recipe, train, test)
    if prepared.training.batchnorm_batches and not batchnorm_layers(model):
        warnings.warn(
            f"--set batchnorm_batches={prepared.training.batchnorm_batches} has no effect: the model of problem "
            f"{problem.name!r} has no BatchNorm layer with running statistics",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    targets = problem.targets.resolve(model, prepared.target, allow_empty=True)
    first = range(min(prepared.training.batch_size, len(train)))
    example = to_device(collate_samples(train, first), prepared.device)
    sparsity_problem = task_problem(problem, model, targets, example)
    logged = {
        **config.identity(),
        **prepared.formulation_config.values(),
        **dataclasses.asdict(prepared.training),
        "options": dict(prepared.options),  # the problem's (a constraint's budget): runs can be grouped by them
    }
    logger = open_logger(directory, config, logged, resume_state)
    parts = _Parts(train, test, model, dense_value, dense_cache, targets, sparsity_problem, logger)
    return _Run(prepared, directory, parts)


def _prune(run: _Run, state: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], FixedMaskRetrain] | None:
    """The pruning phase, hard pruning and the purge stage; returns the masks and the retrainer."""
    prepared, config = run.prepared, run.config
    training = prepared.training
    # A formulation of the user's that raises is one line naming it (a built-in's exception keeps its traceback).
    with plugin_code(prepared.formulation_cls, f"formulation {prepared.config.formulation!r}"):
        formulation = prepared.formulation_cls(
            run.sparsity_problem, prepared.formulation_config, lr=training.lr, dual_lr=training.dual_lr
        )
        wanted = formulation.reference_samples
        check_reference_shards(config.formulation, wanted, len(run.train))
        # Under torchrun each rank holds its shard of the reference batch; f is combined across ranks.
        reference = (
            to_device(distributed.shard(reference_batch(run.train, config.seed, wanted)), prepared.device)
            if wanted
            else None
        )
        steps_per_epoch = math.ceil(len(run.train) / training.batch_size)
        formulation.setup(prepared.epochs, steps_per_epoch, reference)
        if state is not None:
            with _restoring(run):
                formulation.load_state_dict(state["formulation"])
                formulation.optimizer.load_state_dict(state["optimizer"])
                run.model.load_state_dict(state["model"])
        if not _train_phase(run, formulation, "prune", PRUNE_PHASE, prepared.epochs, state["epoch"] if state else 0):
            return None
        masks = formulation.hard_masks()
        distributed.dump_rank_state(
            "prune", {"masks": masks, "formulation": formulation.state_dict(), "model": run.model.state_dict()}
        )
        run.summary_extra = formulation.summary_extra()
        formulation.finalize()
        hard_prune(run.targets, masks, allow_empty=True)  # check_not_emptied words it
    run.check_not_emptied()
    run.summary_extra.update(
        batchnorm_stage(run.model, prepared.problem, run.train, training.batch_size, training.batchnorm_batches,
                        config.seed, prepared.device)
    )  # fmt: skip
    if formulation.purges:  # the figures now; purged.safetensors holds the final (retrained) weights
        example = to_device(reference_batch(run.train, config.seed, 1), prepared.device)
        run.summary_extra.update(purge_stage(run.model, run.targets, example)[1])
    run.hardprune_value = evaluate(prepared.problem, run.model, run.test)
    run.logger.log(
        {f"{run.metric}/hardprune": run.hardprune_value, "sparsity/achieved": achieved_sparsity(run.targets)}, run.step
    )
    run.phase_extra = {"masks": masks, "summary_extra": run.summary_extra}
    retrainer = FixedMaskRetrain(run.sparsity_problem, masks, lr=training.lr, dual_lr=training.dual_lr)
    retrainer.setup(config.retrain_epochs, steps_per_epoch)
    run.checkpoint("retrain", 0, retrainer)
    return masks, retrainer


def _resume_retraining(run: _Run, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], FixedMaskRetrain]:
    training = run.prepared.training
    masks = state["masks"]
    run.summary_extra = state.get("summary_extra", {})
    run.phase_extra = {"masks": masks, "summary_extra": run.summary_extra}
    remove_masks(run.targets)
    retrainer = FixedMaskRetrain(run.sparsity_problem, masks, lr=training.lr, dual_lr=training.dual_lr)
    retrainer.setup(run.config.retrain_epochs, math.ceil(len(run.train) / training.batch_size))
    with _restoring(run):
        retrainer.load_state_dict(state["formulation"])
        retrainer.optimizer.load_state_dict(state["optimizer"])
        run.model.load_state_dict(state["model"])
    return masks, retrainer


@contextlib.contextmanager
def _restoring(run: _Run) -> Iterator[None]:
    """A checkpoint's states restored into this run's model, formulation and optimizer: one that does not fit
    (a problem file whose model changed since, another run's checkpoint) is one :class:`UserInputError` line."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError) as err:
        if debugging() or isinstance(err, torch.cuda.OutOfMemoryError):
            raise
        raise UserInputError(
            f"--resume: {run.directory.checkpoint_path} does not fit this run ({first_line(err)}): did the "
            "problem file or its model change since? (--overwrite starts again)"
        ) from err


def execute(prepared: TrainingPrepared, directory: RunDirectory, state: dict[str, Any] | None) -> dict | None:
    """Runs a prepared configuration in its claimed directory; returns the summary (``None`` if stopped early).

    Args:
        prepared: What :func:`prepare` returned.
        directory: The claimed run directory.
        state: The checkpoint to resume from (``None``: a new run).

    Raises:
        NonFiniteLossError: If the loss becomes NaN/inf (the last good checkpoint is kept).
    """
    run = _build(prepared, directory, state)
    try:
        if state is not None:
            run.step, run.seconds_before = state["step"], state["seconds"]
            run.hardprune_value = state["hardprune_metric"]
            run.dense_value = state["dense_metric"]  # the dense model the run started from, whatever the cache holds
            set_random_states(state["rng"])
        else:
            seed_everything(run.config.seed + PRUNE_SEED_OFFSET)
            run.logger.log({f"{run.metric}/dense": run.dense_value, "phase": 0, "epoch": 0}, 0)
        if state is None or state["phase"] == "prune":
            pruned = _prune(run, state)
            if pruned is None:
                return None
            masks, retrainer = pruned
            start = 0
        else:
            masks, retrainer = _resume_retraining(run, state)
            start = state["epoch"]
        if not _train_phase(run, retrainer, "retrain", RETRAIN_PHASE, run.config.retrain_epochs, start):
            return None
        retrainer.finalize()
        hard_prune(run.targets, masks, allow_empty=True)  # check_not_emptied words it
        run.check_not_emptied()
        final_value = evaluate(prepared.problem, run.model, run.test)
        summary = _summary(run, final_value)
        final_row = {f"final_violation/{name}": v for name, v in final_violations(summary["constraints"]).items()}
        final_row.update({f"final_density/{name}": 1.0 - v for name, v in summary["layer_sparsity"].items()})
        run.logger.log({f"{run.metric}/final": final_value, **final_row}, run.step)
        finish_summary(run.logger, summary)
    finally:
        run.logger.close()
    distributed.dump_rank_state("final", {"model": run.model.state_dict()})
    if distributed.is_main_process():
        save_weights(
            directory.out / "model.safetensors",
            unwrap_compiled(run.model).state_dict(),
            metadata={"summary": "see summary.json"},
        )
        if "purged_params" in run.summary_extra:  # a structured run: the final weights, purged
            small = purge(run.model)
            save_weights(directory.out / "purged.safetensors", small.state_dict(), metadata={"model": repr(small)})
        write_layers_csv(directory.out / "layers.csv", layer_rows({t.name: t.tensor for t in run.targets}))
    directory.finish(summary)
    return summary


def _summary(run: _Run, final_value: float) -> dict[str, Any]:
    prepared, config, metric = run.prepared, run.config, run.metric
    summary: dict[str, Any] = {
        "problem": prepared.problem.name,
        "formulation": config.formulation,
        "achieved_sparsity": achieved_sparsity(run.targets),
        "layer_sparsity": layer_sparsity(run.targets),
        **model_figures(run.model, [t.name for t in run.targets]),
        "seconds": run.seconds(),
        "epochs": prepared.epochs,
        "pretrain_epochs": prepared.pretrain_epochs,
        "retrain_epochs": config.retrain_epochs,
        "seed": config.seed,
        "settings": dict(config.settings),
        "effective_settings": prepared.effective_settings(),
        **environment(),
        "dense_cache": run.dense_cache,
        "metric": prepared.problem.test_metric.describe(),
        f"dense_{metric}": run.dense_value,
        f"hardprune_{metric}": run.hardprune_value,
    }
    summary.update(prepared.target.summary_fields())
    if config.retrain_epochs > 0:
        summary[f"retrain_{metric}"] = final_value
    problem = run.sparsity_problem
    multipliers = {k: v for k, v in problem.named_multiplier_values().items() if k in problem.user_constraint_names}
    constraints = prepared.problem.constraints  # the whole test set goes to the device only if one is reported
    summary["constraints"] = (
        constraint_report(run.model, constraints, multipliers, run.test_batch()) if constraints else {}
    )
    summary.update(run.summary_extra)  # the formulation's own fields (e.g. l0's densities)
    return summary
