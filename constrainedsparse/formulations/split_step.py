r"""One step, split so the user can act between backward and the primal step (clipping, AMP, accumulation)::

    opt.zero_grad()
    step = f.backward(batch)              # Lagrangian on the batch, backward (primal and dual)
    clip_grad_norm_(model.parameters(), 1.0)
    opt.step()                            # the user's primal step
    metrics = f.post_step(step)           # dual step, coordination, restarts

:meth:`SplitStep.training_step` is exactly these calls in this order (the one update order). The primal side is
the user's optimizer on :meth:`SplitStep.backward`'s gradients; the dual side is the formulation's dual optimizer,
stepped in :meth:`SplitStep.post_step` on the dual terms of the steps it is given
(:class:`~constrainedsparse.formulations.dual.DualTerms`). :class:`~constrainedsparse.formulations.base.Formulation`
inherits it; the lifecycle checks (:meth:`_require`) and the state it reads are the formulation's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import cooper
import torch

from constrainedsparse.compiling import outside_compile
from constrainedsparse.formulations.checks import LastStep, check_backward_call, check_ddp_wrapped, checked_scale
from constrainedsparse.formulations.dual import DualTerms
from constrainedsparse.formulations.epochs import EpochCount
from constrainedsparse.formulations.step import LagrangianStep, checked_steps
from constrainedsparse.multipliers import restarted_multipliers
from constrainedsparse.problem import SparsityProblem

__all__ = ["SplitStep"]


class SplitStep:
    """The step methods of a :class:`~constrainedsparse.formulations.base.Formulation` (a mixin of it: the
    attributes below are the formulation's)."""

    problem: SparsityProblem
    optimizer: torch.optim.Optimizer
    dual_optimizer: torch.optim.Optimizer | None
    cooper_optimizer: cooper.optim.CooperOptimizer
    _duals: DualTerms
    _epochs: EpochCount
    _last: LastStep | None
    _last_taken: LastStep | None
    _ddp_checked: bool

    def _require(self, call: str) -> None:
        """The formulation's lifecycle check (raises ``ValueError`` out of order)."""
        raise NotImplementedError

    def compute_lagrangian(self, batch: Any, *, dual_scale: float = 1.0) -> LagrangianStep:
        """Evaluates loss and violations on ``batch`` and builds the primal Lagrangian.

        The dual Lagrangian (:math:`\\lambda^\\top g(x_t)` with the violation detached, times
        ``dual_scale``) is kept in the returned step, so :meth:`post_step` steps the multipliers with the
        violations measured *here*, whatever the primal step did meanwhile, and with those of the steps it
        is given only: a batch you skip after evaluating it (a loss spike) takes no part in the dual step.
        Several steps given to one :meth:`post_step` add their dual gradients, like the primal ones
        (gradient accumulation); ``dual_scale`` scales this call's share (``1 / steps`` makes the dual step
        use the mean violation over the accumulated micro-batches). Under ``torch.no_grad()`` (a
        validation batch) the step carries no dual term at all.
        """
        self._require("compute_lagrangian()")
        return self._lagrangian(batch, checked_scale("compute_lagrangian(dual_scale=...)", dual_scale))

    def _lagrangian(self, batch: Any, dual_scale: float) -> LagrangianStep:
        _before_lagrangian(self)
        cmp_state = self.problem.compute_cmp_state(batch)
        training = torch.is_grad_enabled()  # an evaluation under no_grad is not the step the epoch checks
        if not cmp_state.observed_constraints:  # the loss itself (Cooper would return a clone of it)
            if training:
                self._last = LastStep(cmp_state.loss.detach())
            return LagrangianStep(cmp_state, cmp_state.loss)
        primal = cmp_state.compute_primal_lagrangian()
        if training:
            self._last = LastStep(cmp_state.loss.detach(), primal.lagrangian.detach(), weakref.ref(cmp_state))
        step = LagrangianStep(cmp_state, primal.lagrangian)
        if self.dual_optimizer is not None:
            self._duals.keep(step, _dual_lagrangian(cmp_state), dual_scale)
        return step

    def backward(self, batch: Any, *, scale: float = 1.0, scaler: torch.amp.GradScaler | None = None) -> LagrangianStep:
        """:meth:`compute_lagrangian` then backward of the primal Lagrangian.

        Args:
            batch: Any batch the problem accepts (``(x, y)``, a dict, ...).
            scale: Multiplies the Lagrangian before backward (``1 / accumulation_steps``): the primal
                gradient and the multipliers' ascent direction become means over the micro-batches.
            scaler: A ``torch.amp.GradScaler``: the primal Lagrangian is scaled by it before backward.

        Returns:
            The step's loss, Lagrangian and CMP state (a :class:`LagrangianStep`), what :meth:`post_step` takes.

        Raises:
            ValueError: Before :meth:`setup` or after :meth:`finalize`, for a ``scale`` that is not a finite
                number > 0, a ``scaler`` without a ``scale`` method, or inside ``torch.no_grad()`` /
                ``torch.inference_mode()`` (nothing to backpropagate).
        """
        self._require("backward()")
        scale = check_backward_call(scale, scaler)
        if not self._ddp_checked:
            self._ddp_checked = check_ddp_wrapped(self.problem)
        step = self._lagrangian(batch, scale)
        lagrangian = step.lagrangian if scale == 1.0 else step.lagrangian * scale
        if scaler is not None:
            lagrangian = scaler.scale(lagrangian)
        with self.backward_scope(scale, scaler):
            lagrangian.backward()
        return step

    def before_lagrangian(self) -> None:
        """Hook before every evaluation of the Lagrangian (:meth:`backward` and :meth:`compute_lagrangian`)."""
        return None

    def backward_scope(self, scale: float, scaler: Any) -> AbstractContextManager[None]:
        """Context of the primal backward in :meth:`backward`, given its ``scale`` and ``scaler``.

        A formulation that adds gradient terms of its own during backward (``slr``/``admm``: the W = Z
        penalty gradient, by a hook) scales them by the same factor as the Lagrangian here.
        """
        return contextlib.nullcontext()

    def without_penalty(self) -> AbstractContextManager[None]:
        """Context for a backward of your own that adds to what :meth:`backward` left (an auxiliary loss, a
        gradient probe): inside, the formulation adds none of its gradient terms to it. ``slr``/``admm`` add the
        W = Z penalty gradient :math:`\\Lambda + \\rho(W - Z)` in a hook at every backward that reaches the pruned
        weights, so outside this context an extra backward gets it a second time; the other formulations add
        nothing to a backward of yours. A backward whose gradient replaces the step's (SAM's second pass, after a
        ``zero_grad``) is the step's own: run it with :meth:`backward`, not in here.
        """
        return contextlib.nullcontext()

    def post_step(self, step: LagrangianStep | Sequence[LagrangianStep]) -> dict[str, float]:
        """After the user's primal step: the dual step and the formulation's own post-step work.

        Args:
            step: What :meth:`backward` returned (a sequence of them with gradient accumulation;
                the last one's state is what the formulation logs).

        Returns:
            Metrics to log at this step.

        Raises:
            ValueError: Before :meth:`setup` or after :meth:`finalize`, for anything but steps :meth:`backward`
                returned, a last step already taken, or the same step twice in the list.
        """
        self._require("post_step()")
        steps = checked_steps(step)
        last = steps[-1]
        self._epochs.steps += 1
        restarts: dict[str, float] = {}
        if self.dual_optimizer is not None:
            self.dual_optimizer.zero_grad(set_to_none=True)
            self._duals.backpropagate(steps)
            self.cooper_optimizer.dual_step()  # ascent step, then every multiplier's post_step_ (restarts)
            self.dual_optimizer.zero_grad(set_to_none=True)
            restarts = restarted_multipliers(self.problem, self.dual_optimizer)
        metrics = {**restarts, **self.after_step(last.cmp_state)}
        for item in steps:
            item.taken, item.dual = True, None
        self._last_taken = self._last
        return metrics

    def skip_step(self, step: LagrangianStep | Sequence[LagrangianStep]) -> dict[str, float]:
        """Instead of :meth:`post_step` for a step you skip after :meth:`backward` (a non-finite loss: you zero
        the gradients and take no primal step): no dual step, but the step counts as :meth:`post_step` counts
        it, for the epoch's step count and the formulation's own work (``slr``/``admm``'s coordination when due,
        ``l0``'s clamp), and ``end_epoch`` does not take its loss for a diverged run's. Skipped with neither
        call, the batch is missing from the count: ``end_epoch`` warns that ``setup()`` declared more steps,
        ``slr``/``admm`` lose the epoch's last coordination, and a skipped last batch of an epoch raises
        :class:`NonFiniteLossError` there.

        Args:
            step: What :meth:`backward` returned (or the micro-batches' list).

        Returns:
            Metrics to log at this step (the formulation's own).

        Raises:
            ValueError: As :meth:`post_step`.
        """
        self._require("skip_step()")
        steps = checked_steps(step, "skip_step()")
        self._epochs.steps += 1
        self._epochs.skipped += 1
        self._last = self._last_taken  # the epoch's end checks the last taken step's loss for divergence
        self._duals.evaluated = 0  # the skipped backward() calls are no part of the next dual step
        metrics = self.after_step(steps[-1].cmp_state)
        for item in steps:
            item.taken, item.dual = True, None
        return metrics

    def after_step(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Hook of :meth:`post_step`: coordination, restarts, clamps; returns metrics to log."""
        return {}

    def training_step(self, batch: Any) -> tuple[cooper.cmp.CMPState, dict[str, float]]:
        """One primal-dual step on ``batch``: zero_grad, :meth:`backward`, primal step, :meth:`post_step`.

        Returns:
            The step's CMP state (loss, violations) and :meth:`post_step`'s metrics.

        Raises:
            ValueError: As :meth:`backward` and :meth:`post_step`.
        """
        self._require("training_step()")
        self.optimizer.zero_grad(set_to_none=True)
        step = self.backward(batch)
        self.optimizer.step()
        return step.cmp_state, self.post_step(step)


@outside_compile
def _before_lagrangian(formulation: SplitStep) -> None:
    """The formulation's bookkeeping before a Lagrangian (``l0``'s gate draws), eager between the graphs of a step
    function you compile: traced, one draw per gate shape recompiled."""
    formulation.before_lagrangian()


@outside_compile
def _dual_lagrangian(cmp_state: cooper.cmp.CMPState) -> torch.Tensor:
    """The dual Lagrangian :math:`\\lambda^\\top g` (violations detached), built outside any compiled frame: built
    inside a step function under ``torch.compile``, its backward in ``post_step`` would go through a compiled node
    the primal backward has freed."""
    return cmp_state.compute_dual_lagrangian().lagrangian
