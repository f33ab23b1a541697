"""Validation of a training run before any work: :func:`prepare` checks everything a user can get wrong (flags,
``--set`` keys, the problem's options, the targets on a throwaway model) and writes nothing; its
:class:`TrainingPrepared` is what :func:`constrainedsparse.engine.execute` runs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch

from constrainedsparse import distributed
from constrainedsparse.errors import UserInputError, is_integer, plugin_code, user_input
from constrainedsparse.formulations import Formulation, available_formulations, formulation_class
from constrainedsparse.layerwise.base import available_solvers
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.runs import RunConfig, settings_text
from constrainedsparse.settings import (
    TrainingSettings,
    check_keeps_weights,
    resolve_device,
    route_settings,
    target_from_flags,
)
from constrainedsparse.spec import Problem, load_problem
from constrainedsparse.targets import SparsityConfig

__all__ = ["DEFAULT_SPARSITY", "TrainingPrepared", "prepare", "task_problem"]

DEFAULT_SPARSITY = 0.9


@dataclasses.dataclass
class TrainingPrepared:
    """A validated training run: the problem, parsed hyperparameters and target, nothing written.

    ``config`` is the run configuration with the problem's defaults filled in (what checkpoints store).
    """

    config: RunConfig
    problem: Problem
    formulation_cls: type[Formulation]
    formulation_config: Any
    target: SparsityConfig
    training: TrainingSettings
    options: dict[str, Any]

    @property
    def device(self) -> str:
        """Where the run computes."""
        return self.training.device

    def effective_settings(self) -> dict[str, str]:
        """Every ``--set`` key's value in effect (given or default), as text: checkpoints keep it so that
        ``--resume`` accepts a key given again with the value the run already uses."""
        return settings_text(self.training.values(), self.options, self.formulation_config.values())

    @property
    def epochs(self) -> int:
        """Pruning epochs."""
        return self.config.epochs

    @property
    def pretrain_epochs(self) -> int:
        """Dense pre-training epochs."""
        return self.config.pretrain_epochs


def _check_count(name: str, value: int | None, minimum: int = 0) -> None:
    if value is not None and (not is_integer(value) or value < minimum):
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def prepare(
    config: RunConfig,
    problem: Problem | None = None,
    before_model: Callable[[], None] | None = None,
    processes: int | None = None,
) -> TrainingPrepared:
    """Validates a training run configuration without touching the disk.

    Args:
        config: The run configuration.
        problem: ``config.problem`` already loaded (loaded here when ``None``).
        before_model: Called once the options are checked, before the throwaway model is built (the run
            directory's check: a bad value is reported before a folder that holds a run).
        processes: The processes the run will have (``--nproc``; default: this job's).

    Raises:
        UserInputError: With one line naming the bad value and what is allowed.
    """
    problem = (load_problem(config.problem) if problem is None else problem).guarded()
    if not distributed.is_main_process():
        config = dataclasses.replace(config, progress=False)  # one progress bar per job: rank 0's
    if config.formulation in available_solvers() and config.formulation not in available_formulations():
        raise UserInputError(
            f"formulation {config.formulation!r} is layer-wise; problem {problem.name!r} trains: choose one of "
            f"{', '.join(available_formulations())}"
        )
    for name, value in (
        ("--epochs", config.epochs),
        ("--pretrain-epochs", config.pretrain_epochs),
        ("--retrain-epochs", config.retrain_epochs),
    ):
        _check_count(name, value)
    with user_input():
        formulation_cls = formulation_class(config.formulation)
        target = target_from_flags(config.sparsity, config.pattern, DEFAULT_SPARSITY)
        routed = route_settings(
            config.settings,
            {
                "formulation": formulation_cls.Config.field_types(),
                "options": {k: type(v) for k, v in problem.options.items()},
                "training": TrainingSettings.field_types(),
            },
            f"for formulation {config.formulation!r} and problem {problem.name!r}",
        )
        defaults = {"lr": problem.lr, "dual_lr": problem.dual_lr, "batch_size": problem.batch_size}
        training = TrainingSettings.from_values({**defaults, **routed["training"]})
        training.validate()
        training.device = distributed.rank_device(resolve_device(training.device))
        distributed.check_global_batch(training.batch_size, processes, given="batch_size" in routed["training"])
        formulation_config = formulation_cls.Config.from_values(routed["formulation"])
        formulation_config.validate()
    options = {**problem.options, **routed["options"]}
    resolved = dataclasses.replace(
        config,
        sparsity=None if target.fixed_level else target.sparsity,
        epochs=problem.epochs if config.epochs is None else config.epochs,
        pretrain_epochs=problem.pretrain_epochs if config.pretrain_epochs is None else config.pretrain_epochs,
    )
    prepared = TrainingPrepared(resolved, problem, formulation_cls, formulation_config, target, training, options)
    if problem.check is not None:
        problem.check(options)
    if before_model is not None:
        before_model()
    _check_on_a_throwaway_model(prepared)
    return prepared


def _check_on_a_throwaway_model(prepared: TrainingPrepared) -> None:
    """Builds the problem's model once to catch now what would fail later: a filter that selects nothing, N:M
    widths, the user constraints' names, and what the formulation checks when it attaches (l0's
    ``density_of=purged`` model). Its warnings wait for the run's own model (an error line here stands alone)."""
    problem, options, target, config = prepared.problem, prepared.options, prepared.target, prepared.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = problem.built_model(options)
    with user_input():
        targets = problem.targets.resolve(model, target, allow_empty=True)  # checked below, with the CLI's words
        task = task_problem(problem, model, targets, None, constraints=False)
        with user_input(f"problem {problem.name!r}: "):
            for name in problem.constraints:  # the names' rules now, not after pre-training
                task.check_constraint_name(name)
        with plugin_code(prepared.formulation_cls, f"formulation {config.formulation!r}"):  # a user's attach()
            prepared.formulation_cls(task, prepared.formulation_config)
    clash = [name for name in problem.constraints if name in task.constraint_names()]
    if clash:
        raise UserInputError(
            f"problem {problem.name!r}: constraint {clash[0]!r} has the name of one that formulation "
            f"{config.formulation!r} registers: give yours another name"
        )
    if not prepared.training.allow_empty_layers:
        check_keeps_weights({t.name: (t.feasible_set, t.tensor.shape) for t in targets}, target)


def task_problem(
    problem: Problem, model: torch.nn.Module, targets: list, example: Any, *, constraints: bool = True
) -> SparsityProblem:
    """The CMP of a run: the problem's loss (or ``compute_loss``), targets and (unless not wanted) user constraints."""
    user = problem.constraints if constraints else None
    if problem.compute_loss is not None:
        return SparsityProblem(model, None, targets, user, example, compute_loss=problem.compute_loss)
    return SparsityProblem(model, problem.loss, targets, user, example)
