"""The run: dense model (cached) -> pruning epochs -> hard pruning -> masked retraining.

:func:`prepare` validates everything a user can get wrong *before* anything is written;
:func:`execute` runs the phases, checkpointing atomically at every epoch end so ``resume=True``
continues where a run stopped. The CLI is a thin layer over these two functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from constrainedsparse import distributed
from constrainedsparse.checkpoint import (
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from constrainedsparse.formulations import Formulation, available_formulations, formulation_class
from constrainedsparse.layerwise import available_solvers
from constrainedsparse.logger import WANDB_MODES, MetricsLogger, NullLogger, plot_metrics
from constrainedsparse.masks import (
    achieved_sparsity,
    apply_masks,
    hard_prune,
    layer_sparsity,
    remove_masks,
    temporarily_pruned,
)
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.settings import config_field_types, resolve_device, route_settings, target_from_flags
from constrainedsparse.spec import LayerwiseProblem, Problem, load_problem
from constrainedsparse.targets import SparsityConfig

__all__ = ["NonFiniteLossError", "Prepared", "RunConfig", "cache_dir", "execute", "prepare", "run"]

CHECKPOINT = "checkpoint.pt"
DEFAULT_SPARSITY = 0.9
TRAINING_KEYS: dict[str, type] = {"lr": float, "dual_lr": float, "batch_size": int, "log_every": int, "device": str}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


@dataclasses.dataclass
class RunConfig:
    """Everything ``constrainedsparse run`` takes (see the CLI reference for each field)."""

    problem: str = "digits-mlp"
    formulation: str = "slr"
    sparsity: float | None = None
    pattern: str | None = None
    epochs: int | None = None
    pretrain_epochs: int | None = None
    retrain_epochs: int = 0
    seed: int = 0
    out: Path = Path("runs/latest")
    wandb: str = "disabled"
    settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    resume: bool = False
    progress: bool = True
    stop_after_epochs: int | None = None
    """Stop (with a checkpoint) after this many epochs (blocks, for layer-wise problems) of this invocation."""


@dataclasses.dataclass
class Prepared:
    """A validated run: the problem, parsed hyperparameters and target, nothing written yet."""

    config: RunConfig
    problem: Problem
    formulation_cls: type[Formulation]
    formulation_config: Any
    target: SparsityConfig
    training: dict[str, Any]
    options: dict[str, Any]
    epochs: int
    pretrain_epochs: int


def cache_dir() -> Path:
    """Where dense models are cached: ``$CONSTRAINEDSPARSE_CACHE`` or ``~/.cache/constrainedsparse``."""
    return Path(os.environ.get("CONSTRAINEDSPARSE_CACHE", Path.home() / ".cache" / "constrainedsparse"))


def _check_count(name: str, value: int | None, minimum: int = 0) -> None:
    if value is not None and (not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def prepare(config: RunConfig, problem: Problem | LayerwiseProblem | None = None) -> Prepared:
    """Validates a run configuration without touching the disk.

    Args:
        config: The run configuration.
        problem: ``config.problem`` already loaded (loaded here when ``None``).

    Raises:
        ValueError: With one line naming the bad value and what is allowed.
    """
    if not distributed.is_main_process():
        config = dataclasses.replace(config, progress=False)  # one progress bar per job: rank 0's
    if problem is None:
        problem = load_problem(config.problem)
    if isinstance(problem, LayerwiseProblem):
        raise ValueError(f"problem {problem.name!r} is layer-wise: run it with constrainedsparse.layerwise.run")
    if config.formulation in available_solvers() and config.formulation not in available_formulations():
        raise ValueError(
            f"formulation {config.formulation!r} is layer-wise; problem {problem.name!r} trains: choose one of "
            f"{', '.join(available_formulations())}"
        )
    formulation_cls = formulation_class(config.formulation)
    if config.wandb not in WANDB_MODES:
        raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {config.wandb!r}")
    target = target_from_flags(config.sparsity, config.pattern, DEFAULT_SPARSITY)
    for name, value in (
        ("--epochs", config.epochs),
        ("--pretrain-epochs", config.pretrain_epochs),
        ("--retrain-epochs", config.retrain_epochs),
    ):
        _check_count(name, value)

    routed = route_settings(
        config.settings,
        {
            "formulation": config_field_types(formulation_cls.Config),
            "options": {k: type(v) for k, v in problem.options.items()},
            "training": TRAINING_KEYS,
        },
        f"for formulation {config.formulation!r} and problem {problem.name!r}",
    )
    training = {
        "lr": problem.lr,
        "dual_lr": problem.dual_lr,
        "batch_size": problem.batch_size,
        "log_every": 10,
        "device": "cpu",
        **routed["training"],
    }
    options = {**problem.options, **routed["options"]}
    formulation_values = routed["formulation"]
    for key in ("lr", "dual_lr"):
        if not training[key] > 0:
            raise ValueError(f"--set {key} must be > 0, got {training[key]}")
    for key in ("batch_size", "log_every"):
        if training[key] < 1:
            raise ValueError(f"--set {key} must be >= 1, got {training[key]}")
    distributed.check_global_batch(training["batch_size"])
    training["device"] = distributed.rank_device(resolve_device(training["device"]))
    formulation_config = formulation_cls.Config(**formulation_values)
    formulation_config.validate()
    epochs = problem.epochs if config.epochs is None else config.epochs
    pretrain_epochs = problem.pretrain_epochs if config.pretrain_epochs is None else config.pretrain_epochs
    prepared = Prepared(
        config, problem, formulation_cls, formulation_config, target, training, options, epochs, pretrain_epochs
    )
    if problem.check is not None:
        problem.check(options)
    # Bind the targets to a throwaway model: catches "selects nothing" and N:M width errors now.
    problem.targets.resolve(problem.model(options), target)
    if config.resume and distributed.is_main_process() and not (Path(config.out) / CHECKPOINT).is_file():
        raise ValueError(f"--resume needs {Path(config.out) / CHECKPOINT}, which does not exist")
    return prepared


def _to(batch, device: str):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loader(dataset: Dataset, batch_size: int, seed: int, phase: int, epoch: int) -> DataLoader:
    """Shuffled batches whose order depends only on (seed, phase, epoch): resumable.

    Under torchrun each rank gets its share of every (global) batch, see :func:`distributed.loader`.
    """
    generator_seed = seed * 1_000_003 + phase * 10_007 + epoch
    if distributed.is_distributed():
        return distributed.loader(dataset, batch_size, generator_seed)
    generator = torch.Generator().manual_seed(generator_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, dataset: Dataset) -> float:
    """The problem's metric over ``dataset`` (on the model's device), weighted by batch size.

    Under torchrun every rank evaluates a shard (with rank 0's buffers) and the means are combined.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    distributed.broadcast_buffers(model)
    if distributed.is_distributed():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    total, weighted = 0, 0.0
    for x, y in DataLoader(dataset, batch_size=1024):
        x, y = x.to(device), y.to(device)
        weighted += problem.metric(model(x), y) * len(y)
        total += len(y)
    model.train(was_training)
    if distributed.is_distributed():
        return float(distributed.weighted_mean(torch.tensor(weighted / max(total, 1), dtype=torch.float64), total))
    return weighted / max(total, 1)


def _dense_model(prepared: Prepared, train: Dataset, test: Dataset) -> tuple[nn.Module, float]:
    """The problem's dense model after pre-training, cached per (problem, seed, pretrain epochs)."""
    problem, seed = prepared.problem, prepared.config.seed
    _seed_everything(seed)
    model = problem.model(prepared.options).to(prepared.training["device"])
    # Everything that shapes the dense model is in the key: problem file, options, training keys.
    recipe = json.dumps(
        {
            "options": prepared.options,
            "lr": prepared.training["lr"],
            "batch": prepared.training["batch_size"],
            # CUDA kernels round differently: a GPU-trained dense model is not the CPU one.
            "device": torch.device(prepared.training["device"]).type,
        },
        sort_keys=True,
        default=str,
    )
    tag = f"{problem.cache_tag()}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    path = cache_dir() / "dense" / f"{tag}-seed{seed}-pre{prepared.pretrain_epochs}.safetensors"
    if distributed.broadcast_object(path.is_file()):  # rank 0's cache decides (multi-node: caches may differ)
        if distributed.is_main_process():
            model.load_state_dict(load_file(path, device=str(prepared.training["device"])))
        distributed.broadcast_module(model)
        return model, evaluate(problem, model, test)
    optimizer = torch.optim.Adam(model.parameters(), lr=prepared.training["lr"])
    forward = distributed.wrap(model)
    bar = tqdm(range(prepared.pretrain_epochs), desc=f"dense {problem.name}", disable=not prepared.config.progress)
    for epoch in bar:
        for x, y in _loader(train, prepared.training["batch_size"], seed, -1, epoch):
            x, y = _to((x, y), prepared.training["device"])
            optimizer.zero_grad(set_to_none=True)
            loss = problem.loss(forward(x), y)
            loss.backward()
            optimizer.step()
        if not math.isfinite(loss.item()):
            bar.close()
            raise NonFiniteLossError(
                f"dense pre-training loss became {loss.item()} in epoch {epoch + 1}; nothing was cached "
                "(lower --set lr?)"
            )
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path, model.state_dict())
    return model, evaluate(problem, model, test)


class FixedMaskRetrain(Formulation):
    """Masked retraining: the masks are fixed, the kept weights (and user multipliers) train."""

    name = "retrain"
    description = "masked retraining with fixed masks"

    def __init__(self, problem: SparsityProblem, masks: Mapping[str, torch.Tensor], *, lr: float, dual_lr: float):
        super().__init__(problem, Formulation.Config(), lr=lr, dual_lr=dual_lr)
        self.masks = dict(masks)
        apply_masks(problem.targets, self.masks)

    def hard_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.masks)


@torch.no_grad()
def _hardprune_accuracy_now(run: _Run, formulation: Formulation, test: Dataset) -> float:
    """Accuracy of a hard-pruned copy of the model with the formulation's current masks."""
    with temporarily_pruned(run.sparsity_problem.targets, formulation.hard_masks()):
        return evaluate(run.prepared.problem, run.model, test)


def reference_batch(train: Dataset, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of ``min(size, len(train))`` training samples drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed * 7_919 + 13)
    indices = torch.randperm(len(train), generator=generator)[:size].tolist()
    return tuple(next(iter(DataLoader(Subset(train, indices), batch_size=len(indices)))))


def _step_metrics(problem: SparsityProblem, cmp_state) -> dict[str, float]:
    metrics = {"loss/train": cmp_state.loss.item()}
    for constraint, state in cmp_state.observed_constraints.items():
        if constraint.name in problem.user_constraint_names:
            violation = state.violation.detach().reshape(-1)
            metrics[f"violation/{constraint.name}"] = float(
                violation[0] if violation.numel() == 1 else violation.norm()
            )
    for name, value in problem.named_multiplier_values().items():
        if name in problem.user_constraint_names:
            metrics[f"multiplier/{name}"] = float(value[0] if value.numel() == 1 else value.norm())
    return metrics


class _Run:
    """Mutable state of one execution (kept in one place so checkpoints see all of it)."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.out = Path(prepared.config.out)
        self.step = 0
        self.seconds_before = 0.0
        self.dense_accuracy = float("nan")
        self.hardprune_accuracy: float | None = None
        self.summary_extra: dict[str, Any] = {}
        self.epochs_this_invocation = 0

    def checkpoint(self, phase: str, epoch: int, formulation: Formulation, extra: dict | None = None) -> None:
        if not distributed.is_main_process():
            return  # every rank holds the same state; rank 0 writes it
        state = {
            "version": 1,
            "identity": self.identity(),
            "phase": phase,
            "epoch": epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "formulation": formulation.state_dict(),
            "rng": torch.get_rng_state(),
            "dense_accuracy": self.dense_accuracy,
            "hardprune_accuracy": self.hardprune_accuracy,
            "seconds": self.seconds_before + time.perf_counter() - self.started,
            "wandb_id": self.logger.run_id,
            **(extra or {}),
        }
        save_checkpoint(self.out / CHECKPOINT, state)

    def identity(self) -> dict[str, Any]:
        p = self.prepared
        return {
            "problem": p.problem.name,
            "formulation": self.config.formulation,
            "target": p.target.describe(),
            "seed": self.config.seed,
            "epochs": p.epochs,
            "pretrain_epochs": p.pretrain_epochs,
            "retrain_epochs": self.config.retrain_epochs,
        }


def _train_phase(
    run: _Run,
    formulation: Formulation,
    phase: str,
    phase_index: int,
    num_epochs: int,
    start_epoch: int,
    train: Dataset,
    test: Dataset,
) -> bool:
    """Trains ``num_epochs`` epochs from ``start_epoch``; returns False if stopped early."""
    prepared = run.prepared
    problem = run.sparsity_problem
    log_every = prepared.training["log_every"]
    batch_size = prepared.training["batch_size"]
    steps_per_epoch = math.ceil(len(train) / batch_size)
    bar = tqdm(
        total=num_epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        desc=f"{phase} {prepared.config.formulation if phase == 'prune' else ''}".strip(),
        disable=not prepared.config.progress,
    )
    for epoch in range(start_epoch, num_epochs):
        if run.config.stop_after_epochs is not None and run.epochs_this_invocation >= run.config.stop_after_epochs:
            bar.close()
            return False
        epoch_metrics = formulation.start_epoch(epoch)
        # DDP under torchrun: built anew for every phase, and again if masks/gates were (un)registered
        problem.forward_module = distributed.wrap(run.model, None if epoch == start_epoch else problem.forward_module)
        for batch in _loader(train, batch_size, run.config.seed, phase_index, epoch):
            cmp_state, metrics = formulation.training_step(_to(batch, prepared.training["device"]))
            run.step += 1
            loss = cmp_state.loss.item()
            if not math.isfinite(loss):
                bar.close()
                saved = (run.out / CHECKPOINT).is_file()
                where = (
                    f"the last good checkpoint is {run.out / CHECKPOINT}" if saved else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"loss became {loss} at step {run.step} ({phase} epoch {epoch + 1}); training stopped, {where}"
                )
            if run.step % log_every == 0 or metrics:
                run.logger.log({**_step_metrics(problem, cmp_state), **metrics}, run.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        epoch_metrics.update(formulation.end_epoch(epoch))
        run.logger.log_histograms(formulation.histograms(), run.step)
        epoch_metrics.update(
            {
                "accuracy/test": evaluate(prepared.problem, run.model, test),
                "accuracy/hardprune_now": _hardprune_accuracy_now(run, formulation, test),
                "sparsity/achieved": achieved_sparsity(problem.targets),
                "phase": phase_index,
                "epoch": epoch + 1,
            }
        )
        epoch_metrics.update({f"density/{k}": 1.0 - v for k, v in layer_sparsity(problem.targets).items()})
        run.logger.log(epoch_metrics, run.step)
        run.epochs_this_invocation += 1
        run.checkpoint(phase, epoch + 1, formulation, run.phase_extra)
    bar.close()
    return True


def execute(prepared: Prepared) -> dict[str, Any] | None:
    """Runs a prepared configuration; returns the summary (``None`` if stopped early).

    Raises:
        NonFiniteLossError: If the loss becomes NaN/inf (the last good checkpoint is kept).
        ValueError: If ``--resume`` finds a checkpoint of a different run.
    """
    config, problem = prepared.config, prepared.problem
    run = _Run(prepared)
    run.started = time.perf_counter()
    out = run.out
    resume_state = None
    if config.resume:  # rank 0 reads the checkpoint, every rank gets it (any world size)
        resume_state = distributed.broadcast_object(
            load_checkpoint(out / CHECKPOINT) if distributed.is_main_process() else None
        )
    if resume_state is not None and resume_state["identity"] != run.identity():
        raise ValueError(
            f"--resume: the checkpoint in {out} is of another run ({resume_state['identity']}), not {run.identity()}"
        )
    train, test = problem.data(prepared.options)
    model, run.dense_accuracy = _dense_model(prepared, train, test)
    run.model = model
    targets = problem.targets.resolve(model, prepared.target)
    device = prepared.training["device"]
    example_batch = _to(next(iter(DataLoader(train, batch_size=prepared.training["batch_size"]))), device)
    run.sparsity_problem = SparsityProblem(model, problem.loss, targets, problem.constraints, example_batch)
    logger_cls = MetricsLogger if distributed.is_main_process() else NullLogger
    run.logger = logger_cls(
        out,
        config.wandb,
        config={**run.identity(), **dataclasses.asdict(prepared.formulation_config), **prepared.training},
        run_id=resume_state["wandb_id"] if resume_state else None,
        resume_step=resume_state["step"] if resume_state else None,
    )
    run.phase_extra = {}
    lr, dual_lr = prepared.training["lr"], prepared.training["dual_lr"]
    steps_per_epoch = math.ceil(len(train) / prepared.training["batch_size"])
    try:
        phase, start_epoch = ("prune", 0) if resume_state is None else (resume_state["phase"], resume_state["epoch"])
        if resume_state is not None:
            run.step = resume_state["step"]
            run.seconds_before = resume_state["seconds"]
            run.hardprune_accuracy = resume_state["hardprune_accuracy"]
            torch.set_rng_state(resume_state["rng"])
        else:
            _seed_everything(config.seed + 1)
            run.logger.log({"accuracy/dense": run.dense_accuracy, "phase": 0, "epoch": 0}, 0)

        if phase == "prune":
            formulation = prepared.formulation_cls(
                run.sparsity_problem, prepared.formulation_config, lr=lr, dual_lr=dual_lr
            )
            wanted = formulation.reference_samples
            # Under torchrun each rank holds its shard of the reference batch; f is combined across ranks.
            reference = _to(distributed.shard(reference_batch(train, config.seed, wanted)), device) if wanted else None
            formulation.setup(prepared.epochs, steps_per_epoch, reference)
            if resume_state is not None:
                formulation.load_state_dict(resume_state["formulation"])
                model.load_state_dict(resume_state["model"])
            if not _train_phase(run, formulation, "prune", 0, prepared.epochs, start_epoch, train, test):
                return None
            masks = formulation.hard_masks()
            distributed.dump_rank_state(
                "prune", {"masks": masks, "formulation": formulation.state_dict(), "model": model.state_dict()}
            )
            run.summary_extra = formulation.summary_extra()
            formulation.finalize()
            hard_prune(targets, masks)
            example = _to(reference_batch(train, config.seed, 1), device)
            run.summary_extra.update(formulation.after_hard_prune(model, example, out))
            run.hardprune_accuracy = evaluate(problem, model, test)
            run.logger.log(
                {"accuracy/hardprune": run.hardprune_accuracy, "sparsity/achieved": achieved_sparsity(targets)},
                run.step,
            )
            phase, start_epoch = "retrain", 0
            run.phase_extra = {"masks": masks, "summary_extra": run.summary_extra}
            retrainer = FixedMaskRetrain(run.sparsity_problem, masks, lr=lr, dual_lr=dual_lr)
            retrainer.setup(config.retrain_epochs, steps_per_epoch)
            run.checkpoint("retrain", 0, retrainer, run.phase_extra)
        else:
            masks = resume_state["masks"]
            run.summary_extra = resume_state.get("summary_extra", {})
            run.phase_extra = {"masks": masks, "summary_extra": run.summary_extra}
            remove_masks(targets)
            retrainer = FixedMaskRetrain(run.sparsity_problem, masks, lr=lr, dual_lr=dual_lr)
            retrainer.setup(config.retrain_epochs, steps_per_epoch)
            retrainer.load_state_dict(resume_state["formulation"])
            model.load_state_dict(resume_state["model"])
        if not _train_phase(run, retrainer, "retrain", 1, config.retrain_epochs, start_epoch, train, test):
            return None
        retrainer.finalize()
        hard_prune(targets, masks)
        final_accuracy = evaluate(problem, model, test)
        summary = _summary(run, targets, final_accuracy)
        run.logger.log({"accuracy/final": final_accuracy}, run.step)
    finally:
        run.logger.close()
    distributed.dump_rank_state("final", {"model": model.state_dict()})
    if distributed.is_main_process():
        atomic_write_json(out / "summary.json", summary)
        save_weights(out / "model.safetensors", model.state_dict(), metadata={"summary": "see summary.json"})
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    return summary


def _summary(run: _Run, targets, final_accuracy: float) -> dict[str, Any]:
    prepared, config = run.prepared, run.config
    summary: dict[str, Any] = {
        "problem": prepared.problem.name,
        "formulation": config.formulation,
        "achieved_sparsity": achieved_sparsity(targets),
        "layer_sparsity": layer_sparsity(targets),
        "seconds": run.seconds_before + time.perf_counter() - run.started,
        "epochs": prepared.epochs,
        "pretrain_epochs": prepared.pretrain_epochs,
        "retrain_epochs": config.retrain_epochs,
        "seed": config.seed,
        "settings": dict(config.settings),
        "dense_accuracy": run.dense_accuracy,
        "hardprune_accuracy": run.hardprune_accuracy,
    }
    if prepared.target.pattern == "nm":
        summary["pattern"] = prepared.target.describe()
    else:
        summary["target_sparsity"] = prepared.target.sparsity
    if config.retrain_epochs > 0:
        summary["retrain_accuracy"] = final_accuracy
    summary.update(run.summary_extra)  # the formulation's own fields (e.g. l0's densities)
    return summary


def default_formulation(problem: Problem | LayerwiseProblem) -> str:
    """The formulation a run uses when none is named: ``slr`` for training problems, ``fw`` for layer-wise ones."""
    return "fw" if isinstance(problem, LayerwiseProblem) else "slr"


def run(config: RunConfig, problem: Problem | LayerwiseProblem | None = None) -> dict[str, Any] | None:
    """Validates and executes; removes a run directory this call created if it fails before a checkpoint.

    A layer-wise problem is handed to :func:`constrainedsparse.layerwise.run.run`. ``problem`` is
    ``config.problem`` already loaded (the CLI loads it once); ``None`` loads it here.

    Raises:
        ValueError: Bad input (nothing is left on disk).
        NonFiniteLossError: NaN/inf loss (the last good checkpoint is kept).
    """
    problem = load_problem(config.problem) if problem is None else problem
    if isinstance(problem, LayerwiseProblem):
        from constrainedsparse.layerwise import run as layerwise

        return layerwise.run(config, problem)
    prepared = prepare(config, problem)
    out = Path(config.out)
    created = not out.exists()
    try:
        with distributed.process_group(prepared.training["device"]):  # under torchrun; else a no-op
            return execute(prepared)
    except BaseException:
        if created and distributed.is_main_process() and not (out / CHECKPOINT).is_file():
            shutil.rmtree(out, ignore_errors=True)
        raise
