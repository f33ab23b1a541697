"""``run``: validate, claim the run directory, execute with the runner of the problem's kind.

The CLI, the Python API and ``--nproc`` all go through :func:`run`; it picks the runner once
(:func:`runner_for`) and leaves everything that touches the directory to
:class:`~constrainedsparse.runs.RunDirectory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from constrainedsparse import distributed, engine, preparation
from constrainedsparse.errors import UserInputError, is_integer
from constrainedsparse.layerwise import runner as layerwise_runner
from constrainedsparse.logger import WANDB_MODES
from constrainedsparse.runs import RunConfig, RunDirectory
from constrainedsparse.spec import LayerwiseProblem, Problem, load_problem

__all__ = [
    "LAYERWISE",
    "TRAINING",
    "Prepared",
    "Runner",
    "check_common",
    "check_options",
    "execute",
    "run",
    "runner_for",
    "validate",
]


class Prepared(Protocol):
    """What a runner's ``prepare`` returns: a validated run, nothing written."""

    config: RunConfig

    @property
    def device(self) -> str:
        """Where the run computes (``cpu``, ``cuda:N``)."""


@dataclasses.dataclass(frozen=True)
class Runner:
    """A runner supplies validation and the work; the scaffold owns the directory.

    Attributes:
        kind: ``"training"`` or ``"layerwise"`` (the registry kind of its formulations).
        settings: Its own ``--set`` keys (a :class:`~constrainedsparse.config.Hyperparameters` class).
        prepare: ``prepare(config, problem, before_model, processes) -> Prepared``: validates everything, writes
            nothing; calls ``before_model()`` (if given) once the options are checked, before any model is built;
            ``processes``: the run's process count (``--nproc``; ``None``: this job's).
        execute: ``execute(prepared, directory, state) -> summary | None``: the work.
    """

    kind: str
    settings: type
    prepare: Callable[[RunConfig, Any, Callable[[], None] | None, int | None], Prepared]
    execute: Callable[[Any, RunDirectory, dict[str, Any] | None], dict[str, Any] | None]


TRAINING = Runner("training", engine.TrainingSettings, preparation.prepare, engine.execute)
LAYERWISE = Runner("layerwise", layerwise_runner.DriverSettings, layerwise_runner.prepare, layerwise_runner.execute)


def runner_for(problem: Problem | LayerwiseProblem) -> Runner:
    """The runner of a problem's kind (a layer-wise problem or one that trains)."""
    return LAYERWISE if isinstance(problem, LayerwiseProblem) else TRAINING


def check_common(config: RunConfig) -> None:
    """Checks of the configuration both runners share (before anything is loaded).

    Raises:
        UserInputError: For a ``--wandb`` mode, seed or ``stop_after_epochs`` outside what is allowed.
    """
    if config.wandb not in WANDB_MODES:
        raise UserInputError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {config.wandb!r}")
    if not is_integer(config.seed) or not 0 <= config.seed < 2**32:
        raise UserInputError(
            f"--seed must be an integer in [0, 2**32) (torch's and NumPy's seed range), got {config.seed!r}"
        )
    stop = config.stop_after_epochs
    if stop is not None and (not is_integer(stop) or stop < 1):
        raise UserInputError(f"RunConfig(stop_after_epochs=...) must be an integer >= 1 or None, got {stop!r}")


class _OptionsChecked(Exception):
    """Raised by :func:`check_options` where the checks reach the run directory (the options are done)."""


def check_options(config: RunConfig) -> None:
    """The checks of :func:`validate` up to the run directory: the options alone (no directory, no model).

    Raises:
        UserInputError: As :func:`validate`.
    """
    problem = load_problem(config.problem)
    check_common(config)

    def stop() -> None:
        raise _OptionsChecked

    try:
        runner_for(problem).prepare(config, problem, stop, None)
    except _OptionsChecked:
        return


def validate(config: RunConfig, problem: Problem | LayerwiseProblem, processes: int | None = None) -> Prepared:
    """Every check of a run before any work, cheapest first: the shared options, the runner's options, the run
    directory, then what needs the model (built or loaded). ``processes``: the run's (``--nproc``; default this
    job's).

    Raises:
        UserInputError: With one line naming the bad value and what is allowed; nothing is written.
    """
    check_common(config)

    def check_directory() -> None:
        if distributed.is_main_process():
            RunDirectory(config.out, resume=config.resume, overwrite=config.overwrite).check()

    return runner_for(problem).prepare(config, problem, check_directory, processes)


def run(config: RunConfig, problem: Problem | LayerwiseProblem | None = None) -> dict[str, Any] | None:
    """Validates, claims the run directory, executes; returns the summary (``None`` if stopped early).

    ``problem`` is ``config.problem`` already loaded (:func:`~constrainedsparse.spec.load_problem`; the CLI
    loads it once); ``None`` loads it here. With ``resume=True`` the run goes on with the configuration its
    checkpoint stores: ``RunConfig(out=..., resume=True)`` is enough, and options given besides must mean the
    stored ones (:meth:`RunConfig.continued`).

    Raises:
        UserInputError: Bad input (nothing is left on disk).
        NonFiniteLossError: NaN/inf loss (the last good checkpoint is kept).
    """
    if not isinstance(config, RunConfig):
        raise UserInputError(f"run(config): config must be a RunConfig(...), got {type(config).__name__}")
    if config.resume and not config.overwrite:  # both at once: refused with the directory's own message
        config = config.continued(check_options)
    return execute(config, problem)


def execute(config: RunConfig, problem: Problem | LayerwiseProblem | None = None) -> dict[str, Any] | None:
    """:func:`run` of a configuration taken as it is (the CLI's: ``--resume`` already read the checkpoint's)."""
    if problem is not None and not isinstance(problem, (Problem, LayerwiseProblem)):
        raise UserInputError(
            f"run(config, problem): problem must be a loaded problem (load_problem(name)) or None, got "
            f"{type(problem).__name__}"
        )
    if problem is None:
        problem = load_problem(config.problem)
    prepared = validate(config, problem)
    runner = runner_for(problem)
    directory = RunDirectory(config.out, resume=config.resume, overwrite=config.overwrite)
    with distributed.process_group(prepared.device):  # under torchrun; else a no-op
        try:
            directory.claim()
            state = directory.load(prepared.config)
            if state is not None:  # the wandb run goes on under the names it started with
                prepared.config = prepared.config.with_stored_wandb(state.get("config", {}))
            return runner.execute(prepared, directory, state)
        except BaseException:
            directory.discard_if_unused()
            raise
        finally:
            directory.release()
