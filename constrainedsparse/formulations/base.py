"""Formulation base class and the registry that picks one by name."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import cooper
import torch

from constrainedsparse.masks import remove_masks
from constrainedsparse.problem import Batch, SparsityProblem
from constrainedsparse.registry import Registry

__all__ = [
    "Formulation",
    "NoConfig",
    "available_formulations",
    "describe_formulations",
    "formulation_class",
    "make",
    "register_formulation",
]

_REGISTRY: Registry[type[Formulation]] = Registry("formulation")


@dataclasses.dataclass
class NoConfig:
    """Hyperparameters of a formulation that has none."""

    def validate(self) -> None:
        """Raises ``ValueError`` for out-of-range values (none here)."""


class Formulation(abc.ABC):
    """How the sparsity target is met: one training-phase algorithm over a :class:`SparsityProblem`.

    The engine drives every formulation the same way::

        setup(num_epochs, steps_per_epoch, reference_batch)  # reference_samples > 0 asks for one
        for epoch: start_epoch(epoch); for batch: training_step(batch); end_epoch(epoch)
        hard_masks()  # -> exact masks at the target, then hard pruning

    Primal and dual updates go through a Cooper optimizer: a stock ``torch.optim`` optimizer on
    the primal side and ``SGD(maximize=True)`` on the multipliers. Everything that changes during
    training is returned by :meth:`state_dict` so a run can be checkpointed and resumed.

    Attributes:
        name: Registry name (``--formulation``).
        description: One line for ``constrainedsparse formulations``.
        Config: Dataclass of hyperparameters, validated by its ``validate()``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    exact_layer_sparsity: ClassVar[bool] = True
    """Whether :meth:`hard_masks` meets every tensor's own level (else only the total budget)."""

    def __init__(self, problem: SparsityProblem, config: Any, *, lr: float, dual_lr: float) -> None:
        config.validate()
        self.problem = problem
        self.config = config
        self.lr = lr
        self.dual_lr = dual_lr
        self.optimizer: cooper.optim.CooperOptimizer | None = None

    def primal_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the primal optimizer (the model's by default)."""
        return list(self.problem.model.parameters())

    def build_optimizer(self) -> cooper.optim.CooperOptimizer:
        """Adam on the primal side; gradient ascent on the multipliers if there are any."""
        primal = torch.optim.Adam(self.primal_parameters(), lr=self.lr)
        dual = self.problem.dual_optimizer(self.dual_lr)
        if dual is None:
            return cooper.optim.UnconstrainedOptimizer(self.problem, primal)
        return cooper.optim.SimultaneousOptimizer(self.problem, primal, dual)

    @property
    def reference_samples(self) -> int:
        """How many training samples :meth:`setup` wants as ``reference_batch`` (0: none)."""
        return 0

    def setup(self, num_epochs: int, steps_per_epoch: int, reference_batch: Batch | None = None) -> None:
        """Builds state before the first epoch (also called before resuming).

        Args:
            num_epochs: Pruning epochs of the run.
            steps_per_epoch: Minibatches per epoch.
            reference_batch: A fixed batch of training data for formulations that compare the
                objective at two points on the same data (e.g. SLR's surrogate conditions).
        """
        self.num_epochs = num_epochs
        self.steps_per_epoch = steps_per_epoch
        self.optimizer = self.build_optimizer()

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Hook at the start of epoch ``epoch`` (0-based); returns metrics to log."""
        return {}

    def training_step(self, batch: Batch) -> tuple[cooper.CMPState, dict[str, float]]:
        """One primal(-dual) step on ``batch``; returns the CMP state and metrics to log."""
        rollout = self.optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
        return rollout.cmp_state, {}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Hook at the end of epoch ``epoch``; returns metrics to log."""
        return {}

    @abc.abstractmethod
    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks at the target level, by parameter name (exactly feasible)."""

    def histograms(self) -> dict[str, torch.Tensor]:
        """Value distributions to log as wandb histograms at epoch ends (none by default)."""
        return {}

    def summary_extra(self) -> dict[str, Any]:
        """Extra ``summary.json`` fields, taken at the end of pruning (before :meth:`finalize`)."""
        return {}

    def after_hard_prune(self, model: torch.nn.Module, example_batch: Batch, out: Path) -> dict[str, Any]:
        """Hook called once right after hard pruning (before retraining); its dict joins ``summary.json``.

        Args:
            model: The hard-pruned model (plain weights).
            example_batch: One training sample ``(x, y)`` on the model's device.
            out: The run directory (for extra artifacts such as ``purged.safetensors``).
        """
        return {}

    def finalize(self) -> None:
        """Removes what the formulation attached to the model; masks are baked into the weights."""
        remove_masks(self.problem.targets)

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes during training, for checkpoints."""
        return {"optimizer": self.optimizer.state_dict(), "cmp": self.problem.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (after :meth:`setup`)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.problem.load_state_dict(state["cmp"])


def register_formulation(name: str) -> Callable[[type[Formulation]], type[Formulation]]:
    """Class decorator adding a formulation to the registry under ``name``.

    Raises:
        ValueError: If ``name`` is already registered.
    """
    return _REGISTRY.register(name)


def available_formulations() -> list[str]:
    """Registered names, sorted."""
    return _REGISTRY.names()


def describe_formulations() -> dict[str, str]:
    """``{name: one-line description}``."""
    return _REGISTRY.describe()


def formulation_class(name: str) -> type[Formulation]:
    """The class registered as ``name``.

    Raises:
        ValueError: For an unknown name, listing the known ones.
    """
    return _REGISTRY.get(name, f"unknown formulation {name!r}; available: ")


def make(
    name: str, problem: SparsityProblem, config: Any = None, *, lr: float = 1e-3, dual_lr: float = 1e-2
) -> Formulation:
    """Builds the formulation ``name`` on ``problem`` (default hyperparameters if ``config`` is None)."""
    cls = formulation_class(name)
    return cls(problem, config if config is not None else cls.Config(), lr=lr, dual_lr=dual_lr)
