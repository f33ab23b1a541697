r"""Formulation base class, the lifecycle it enforces, and :func:`make`.

A formulation is *how* a :class:`~constrainedsparse.problem.SparsityProblem` reaches its target
while the user trains: it may attach state to the model (masks, gates), register constraints of
its own (``W - Z = 0``, expected densities), keep a dual optimizer for its multipliers, and run a
post-step (dual step, coordination, restarts). The primal optimizer is the user's.

Lifecycle (a call out of order raises ``ValueError`` naming the missing step)::

    f = make("slr", problem, optimizer=opt)            # build: attaches state, adds constraints
    f.setup(num_epochs, steps_per_epoch, reference_batch)
    for epoch: f.start_epoch(e); for batch: f.training_step(batch); f.end_epoch(e)
    masks = f.hard_masks(); f.finalize(); hard_prune(problem.targets, masks)

One step, split so the user can act between backward and the primal step, is
:class:`~constrainedsparse.formulations.split_step.SplitStep` (its own module: the one update order).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch

from constrainedsparse.checkpoint import optimizer_state_plain, optimizer_state_typed
from constrainedsparse.claims import claim_targets, release_targets
from constrainedsparse.config import Hyperparameters, check_config
from constrainedsparse.errors import NonFiniteLossError, is_ours
from constrainedsparse.formulations.attachments import Attachments
from constrainedsparse.formulations.checks import (
    LastStep,
    check_covers,
    check_finite_step,
    check_finite_weights,
    check_first_order,
    check_hard_masks,
    check_pattern_masks,
    check_rate,
    check_state,
    check_target_levels,
    check_unparametrized,
    warn_schedule_unfinished,
)
from constrainedsparse.formulations.dual import DualTerms
from constrainedsparse.formulations.epochs import EpochCount, checked_epoch, declared_counts
from constrainedsparse.formulations.split_step import SplitStep
from constrainedsparse.formulations.step import LagrangianStep
from constrainedsparse.masks import canonical_parameters, check_masks, remove_masks, temporarily_pruned
from constrainedsparse.multipliers import cooper_optimizer
from constrainedsparse.problem import Batch, SparsityProblem

__all__ = ["Formulation", "LagrangianStep", "NoConfig"]

_BUILT, _READY, _FINALIZED = "built", "ready", "finalized"


@dataclasses.dataclass
class NoConfig(Hyperparameters):
    """Hyperparameters of a formulation that has none."""


def _stage_error(call: str, stage: str) -> ValueError:
    if stage == _BUILT:
        return ValueError(f"call setup(num_epochs, steps_per_epoch[, reference_batch]) before {call}")
    return ValueError(f"{call} after finalize(): the formulation has already removed its state from the model")


class Formulation(SplitStep, abc.ABC):
    """How the sparsity target is met: one training-phase algorithm over a :class:`SparsityProblem`.

    Args:
        problem: The CMP (model, loss, targets, user constraints).
        config: The formulation's hyperparameters (an instance of its ``Config``), validated here.
        optimizer: The user's primal optimizer over the model's parameters (any ``torch.optim``
            optimizer, with its own LR scheduler if any). ``None``: ``Adam(lr)`` over the model's
            parameters. A formulation with parameters of its own (l0's gates) adds them to it as
            parameter groups of their own.
        lr: Learning rate of the default Adam (ignored when ``optimizer`` is given).
        dual_lr: Gradient-ascent step of the user constraints' multipliers.

    Attributes:
        name: Registry name (``--formulation``).
        description: One line for ``constrainedsparse formulations``.
        Config: Dataclass of hyperparameters (:class:`~constrainedsparse.config.Hyperparameters`).
        config: The formulation's hyperparameters, an instance of its ``Config`` (typed ``Any`` so that a
            subclass reads its own fields, ``self.config.rho``; a subclass may narrow it: ``config: MyConfig``).
        adds_parameters: Whether :meth:`attach` adds a parameter group of its own to the primal
            optimizer (``l0``'s gates): a learning-rate scheduler must then be built after ``make``.
        optimizer: The primal optimizer stepped by :meth:`training_step`.
        dual_optimizer: ``SGD(maximize=True)`` (or another ascent optimizer) over the multipliers
            updated every step, or ``None`` when there are none.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[Hyperparameters]] = NoConfig
    config: Any
    adds_parameters: ClassVar[bool] = False

    def __init__(
        self,
        problem: SparsityProblem,
        config: Any = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        dual_lr: float = 1e-2,
    ) -> None:
        config = self.Config() if config is None else config
        check_config(self.name, self.Config, config)
        config.validate()
        check_rate("dual_lr", dual_lr)
        self.problem = problem
        self.config = config
        self.lr = lr
        self.dual_lr = dual_lr
        if optimizer is None:
            check_rate("lr", lr)
            optimizer = self.default_optimizer(lr)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_first_order(optimizer)
        check_covers(optimizer, problem)
        self.optimizer = optimizer
        self.reference_batch: Batch | None = None
        self._last: LastStep | None = None  # the last step's loss and Lagrangian, checked once an epoch
        self._last_taken: LastStep | None = None  # the last step given to post_step() (skip_step() restores it)
        self._epochs = EpochCount()  # the epoch under way and its post_step() and skip_step() calls
        self._ddp_checked = False
        self._duals = DualTerms()  # each step's λᵀg, backpropagated by post_step() for the steps it is given
        self._stage = _BUILT
        check_unparametrized(self.name, problem.targets)  # the user's masks: nothing below may strip them
        self._claim = claim_targets(self)  # before attach: a second formulation on the same tensors is refused
        self._built_on = before = Attachments.of(self)  # what discard() restores
        try:
            self.attach()
            self.dual_optimizer = self.build_dual_optimizer()
            self.cooper_optimizer = cooper_optimizer(problem, optimizer, self.dual_optimizer)
        except BaseException:  # a refused build leaves model, optimizer and problem as they were
            release_targets(self._claim)
            before.restore(self, failed_build=True)
            raise

    # --- construction hooks -------------------------------------------------------------------------

    def default_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The primal optimizer when the user gives none: ``Adam`` over the model's parameters at ``lr``.

        The parameters come in :func:`~constrainedsparse.masks.canonical_parameters` order, so a run
        resumed from a checkpoint rebuilds the same optimizer whatever was masked before.
        """
        return torch.optim.Adam(canonical_parameters(self.problem.model), lr=lr)

    def attach(self) -> None:
        """Attaches the formulation's state to the model and problem (masks, gates, constraints).

        Called once by the constructor, after ``self.optimizer`` exists: a formulation with
        parameters of its own adds them to it here (``optimizer.add_param_group``).
        """
        return None

    def build_dual_optimizer(self) -> torch.optim.Optimizer | None:
        """Gradient ascent on the multipliers updated every step (the user's at ``dual_lr``), or ``None``."""
        return self.problem.dual_optimizer(self.dual_lr)

    @classmethod
    def exact_layer_sparsity(cls, config: Any) -> bool:
        """Whether :meth:`hard_masks` meets every tensor's own level under ``config`` (else only the total)."""
        return True

    @classmethod
    def reference_samples_for(cls, config: Any) -> int:
        """How many training samples :meth:`setup` wants as ``reference_batch`` under ``config`` (0: none): known
        before a model exists, so a runner can refuse a reference batch it cannot share out before training."""
        return 0

    @property
    def reference_samples(self) -> int:
        """How many training samples :meth:`setup` wants as ``reference_batch`` (0: none)."""
        return type(self).reference_samples_for(self.config)

    # --- lifecycle ------------------------------------------------------------------------------------

    def setup(
        self,
        num_epochs: int,
        steps_per_epoch: int,
        reference_batch: Batch | None = None,
        *,
        total_steps: int | None = None,
    ) -> None:
        """Prepares the first epoch (also called before loading a checkpoint to resume).

        Args:
            num_epochs: Pruning epochs of the run (schedules use it).
            steps_per_epoch: Minibatches per epoch (``post_step()`` calls: optimizer steps).
            reference_batch: A fixed batch of training data, for formulations that compare the
                objective at two points on the same data (SLR's surrogate conditions; see
                :attr:`reference_samples`).
            total_steps: Steps of the whole run when its last epoch is cut short (a ``max_steps`` that is not a
                multiple of the epoch): from :math:`(E - 1) S + 1` to :math:`E S`, the default. Schedules counted
                in steps end on it.

        Raises:
            ValueError: After :meth:`finalize`, for negative counts, a ``total_steps`` outside its range, or
                without a reference batch where one is needed.
        """
        if self._stage == _FINALIZED:
            raise _stage_error("setup()", self._stage)
        counts = declared_counts(num_epochs, steps_per_epoch, total_steps)
        self.check_setup(num_epochs, steps_per_epoch)
        if self.reference_samples and reference_batch is None:
            raise ValueError(
                f"{self.name} needs a reference batch: pass reference_batch to setup() (a fixed batch of about "
                f"{self.reference_samples} training samples on which it compares the loss at two points)"
            )
        self._epochs.declare(*counts)
        self.reference_batch = reference_batch
        stage, self._stage = self._stage, _READY
        try:
            self.on_setup()
        except BaseException:
            self._stage = stage  # a setup that failed leaves the formulation as it was: not ready
            raise

    @property
    def num_epochs(self) -> int:
        """Pruning epochs declared by :meth:`setup` (0 before it)."""
        return self._epochs.num_epochs

    @property
    def steps_per_epoch(self) -> int:
        """``post_step()`` calls an epoch, declared by :meth:`setup` (0 before it)."""
        return self._epochs.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """``post_step()`` calls of the whole run, declared by :meth:`setup` (0 before it)."""
        return self._epochs.total_steps

    def check_setup(self, num_epochs: int, steps_per_epoch: int) -> None:
        """Hook of :meth:`setup` before it changes anything: raises ``ValueError`` for counts the formulation cannot
        use (``slr``/``admm``: no steps with coordinations spaced over the epoch)."""
        return None

    def on_setup(self) -> None:
        """Hook at the end of :meth:`setup` (e.g. SLR measures :math:`f` on the reference batch)."""
        return None

    def _require(self, call: str) -> None:
        if self._stage != _READY:
            raise _stage_error(call, self._stage)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Call at the start of epoch ``epoch`` (0-based); returns metrics to log.

        Raises:
            ValueError: Before :meth:`setup`, or for an ``epoch`` that is not an integer >= 0.

        Warns:
            UserWarning: Once, for an ``epoch`` past ``setup()``'s ``num_epochs`` (the schedules have ended).
        """
        self._require("start_epoch()")
        epoch = checked_epoch(epoch, "start_epoch")
        self._epochs.start(epoch)
        return self.on_start_epoch(epoch)

    def on_start_epoch(self, epoch: int) -> dict[str, float]:
        """Hook of :meth:`start_epoch`."""
        return {}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Call at the end of epoch ``epoch``; returns metrics to log.

        Raises:
            ValueError: Before :meth:`setup`, for an ``epoch`` that is not an integer >= 0, or for the epoch that
                has just ended (no :meth:`start_epoch` since).
            NonFiniteLossError: If the epoch's last loss is NaN/inf or a tensor the masks come from
                (:meth:`mask_sources`) holds NaN/inf (the run has diverged), or every step of the epoch went to
                :meth:`skip_step`.
        """
        self._require("end_epoch()")
        epoch = checked_epoch(epoch, "end_epoch")
        self._epochs.check_end(epoch)
        if self._epochs.steps and self._epochs.skipped == self._epochs.steps:
            raise NonFiniteLossError(
                f"every step of epoch {epoch} went to skip_step() ({self._epochs.steps}, none to post_step()): a run "
                "whose losses are all non-finite has diverged; lower lr or dual_lr, clip the gradients, or continue "
                "from a checkpoint"
            )
        check_finite_step(self._last, self.problem, f"at the last step of epoch {epoch}")
        check_finite_weights(self.mask_sources(), f"at the end of epoch {epoch}")
        if self._epochs.skipped:  # the last loss checked is a taken step's: a later NaN went to skip_step()
            check_finite_weights(dict(self.problem.model.named_parameters()), f"at the end of epoch {epoch}")
        self._epochs.end(epoch)
        return self.on_end_epoch(epoch)

    def on_end_epoch(self, epoch: int) -> dict[str, float]:
        """Hook of :meth:`end_epoch`."""
        return {}

    # --- the end of pruning -----------------------------------------------------------------------

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks at the target level, by parameter name (exactly feasible).

        Raises:
            ValueError: After :meth:`finalize`.
            NonFiniteLossError: If the last step's loss is NaN/inf or a tensor the masks come from
                (:meth:`mask_sources`) holds NaN/inf.
        """
        if self._stage == _FINALIZED:
            raise ValueError("hard_masks() after finalize(): call hard_masks() first, then finalize()")
        check_finite_step(self._last, self.problem, "at the last step before hard_masks()")
        check_finite_weights(self.mask_sources(), "at hard_masks()")
        masks = self.compute_hard_masks()
        if not is_ours(type(self)):  # a formulation of the user's: check it
            check_hard_masks(self.name, self.problem.targets, masks)
        elif type(self).exact_layer_sparsity(self.config):  # masks from each target's own set: a user's pattern
            check_pattern_masks(self.problem.targets, masks)
        return masks

    @abc.abstractmethod
    def compute_hard_masks(self) -> dict[str, torch.Tensor]:
        """The masks of :meth:`hard_masks`."""

    def mask_sources(self) -> dict[str, torch.Tensor]:
        """The tensors the hard masks are computed from, by name (:meth:`end_epoch` and :meth:`hard_masks` check
        they are finite): the targets' stored weights; a formulation adds its own (l0 its gates' log α)."""
        return {t.name: t.stored for t in self.problem.targets}

    def hard_prune_preview(self, masks: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
        """Inside the block the model computes exactly as :meth:`finalize` + ``hard_prune(masks)`` would
        leave it (for measuring the hard-pruned model during training); everything is restored on exit.

        Raises:
            ValueError: After :meth:`finalize` (the formulation has nothing left to preview: hard-prune), or for
                masks that name no target, are not boolean or have another shape (nothing is changed then).
        """
        if self._stage == _FINALIZED:
            raise _stage_error("hard_prune_preview()", self._stage)
        check_masks(self.problem.targets, masks)
        return self.preview_scope(masks)

    def preview_scope(self, masks: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
        """Hook of :meth:`hard_prune_preview` (by default the masks applied to the weights for the block)."""
        return temporarily_pruned(self.problem.targets, masks)

    def finalize(self) -> None:
        """Removes what the formulation attached (masks baked into the weights, its constraints unregistered).

        Raises:
            ValueError: If called twice.
        """
        if self._stage == _FINALIZED:
            raise ValueError("finalize() was already called")
        release_targets(self._claim)  # first: detach() removes the masks that the claim guards
        try:
            self.detach()
        except BaseException:
            release_targets(self._claim, released=False)
            raise
        self._stage = _FINALIZED
        warn_schedule_unfinished(self.name, self.schedule_fraction(), self.num_epochs)

    def discard(self) -> None:
        """Takes back what the build attached, without baking anything in: masks and gates come off (each weight is
        its stored tensor, as training left it), the formulation's constraints and gradient hooks go, its optimizer
        parameter groups are emptied (they stay, as after :meth:`finalize`: a scheduler counts them). For a run
        abandoned before it trained (a failure after ``make``); finalized after it.

        Raises:
            ValueError: After :meth:`finalize` (or a first :meth:`discard`).
        """
        if self._stage == _FINALIZED:
            raise ValueError("discard() after finalize(): the formulation has already removed its state from the model")
        release_targets(self._claim)
        try:
            self._built_on.restore(self)
        finally:
            self._stage = _FINALIZED  # a detach() that raised: the rest is restored, the build is gone

    def schedule_fraction(self) -> float:
        """Fraction of the target level the formulation's own schedule has reached (1: it has none, or it is
        over); :meth:`finalize` warns below 1."""
        return 1.0

    def detach(self) -> None:
        """Hook of :meth:`finalize`: undo :meth:`attach` (by default, bake and remove masks)."""
        remove_masks(self.problem.targets)

    @property
    def resumed_epoch(self) -> int | None:
        """The epoch a state loaded with :meth:`load_state_dict` was saved in, until :meth:`start_epoch` (``None``
        otherwise): a loop that moves on to the next epoch ends that one first (a checkpoint of its last step)."""
        return self._epochs.epoch if self._epochs.resumed_mid_epoch else None

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` ran."""
        return self._stage == _FINALIZED

    # --- what runs log and save -----------------------------------------------------------------------

    def histograms(self) -> dict[str, torch.Tensor]:
        """Value distributions to log as wandb histograms at epoch ends (none by default)."""
        return {}

    def summary_extra(self) -> dict[str, Any]:
        """Extra ``summary.json`` fields, taken at the end of pruning (before :meth:`finalize`)."""
        return {}

    @property
    def purges(self) -> bool:
        """Whether the hard-pruned model has whole groups removed that a purge stage can cut out."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything the formulation changes during training (not the model, not the primal optimizer).

        As torch's ``state_dict()``, its tensors are the live ones (no copy of the multipliers on every checkpoint):
        ``torch.save`` it, or ``copy.deepcopy`` it to keep one in memory while training goes on.
        """
        dual = optimizer_state_plain(self.dual_optimizer.state_dict()) if self.dual_optimizer is not None else None
        return {
            "formulation": self.name,
            "dual_optimizer": dual,
            "cmp": self.problem.state_dict(),
            "epoch_steps": self._epochs.state(),  # the epoch under way, its post_step()/skip_step() calls, the skips
            "target_levels": self._target_levels(),
        }

    def _target_levels(self) -> dict[str, str]:
        """Each target's level and pattern, as a state records them (a state of other levels is refused)."""
        return {t.name: f"{t.sparsity:g} {t.target.pattern_text()}" for t in self.problem.targets}

    _optional_state_keys: frozenset[str] = frozenset({"epoch_steps", "target_levels", "formulation"})
    """Keys of :meth:`state_dict` that states of earlier versions lack."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (after :meth:`setup`).

        Raises:
            ValueError: After :meth:`finalize`, or if ``state`` lacks a key of this formulation's :meth:`state_dict`
                or a tensor has another shape (another formulation's state, other targets); nothing is restored then.
        """
        if self._stage == _FINALIZED:
            raise _stage_error("load_state_dict()", self._stage)
        check_state(self.name, self.state_dict(), state, self._optional_state_keys)
        check_target_levels(self.name, self._target_levels(), state.get("target_levels", {}))
        if self.dual_optimizer is not None:
            self.dual_optimizer.zero_grad(set_to_none=True)
            self._duals.evaluated = 0  # steps taken before the state was saved or loaded are not this run's
            if state.get("dual_optimizer") is not None:
                # torch's load keeps the given tensors: training on would edit the caller's state
                dual = copy.deepcopy(state["dual_optimizer"])
                rates = [group["lr"] for group in self.dual_optimizer.param_groups]
                self.dual_optimizer.load_state_dict(optimizer_state_typed(self.dual_optimizer, dual))
                for group, rate in zip(self.dual_optimizer.param_groups, rates, strict=True):
                    group["lr"] = rate  # the step sizes built now (a constraint's dual_lr changed since) apply
        # Multipliers load by copy (nn.Module's); Cooper keeps a penalty coefficient's tensor as given: copies, so that
        # set_rho does not write into the given state (two formulations loaded from one dict shared their rho).
        cmp = state["cmp"]
        self.problem.load_state_dict(
            {**cmp, "penalty_coefficients": copy.deepcopy(cmp.get("penalty_coefficients", {}))}
        )
        self._epochs.load(state.get("epoch_steps", self._epochs.state()))
