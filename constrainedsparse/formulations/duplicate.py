r"""Duplicate variables :math:`W = Z`: the augmented-Lagrangian core shared by ``slr`` and ``admm``.

The sparsity constraint is moved onto copies :math:`Z_n` of the pruned weights:

.. math::
    \min_{W, Z} f(W) \quad\text{s.t.}\quad W_n - Z_n = 0,\ Z_n \in C_n, \qquad
    L_\rho(W, Z, \Lambda) = f(W) + \sum_n \langle \Lambda_n, W_n - Z_n \rangle
    + \frac{\rho}{2} \sum_n \lVert W_n - Z_n \rVert^2 .

Every :math:`W_n - Z_n = 0` is a real :class:`cooper.Constraint` (equality, Cooper's
Augmented Lagrangian formulation, a ``DenseMultiplier`` :math:`\Lambda_n` and a
``DensePenaltyCoefficient`` :math:`\rho`), registered with ``dual_every_step=False``. So:

* **W-step** — every minibatch backpropagates the loss (and the user's constraints); a
  post-accumulate-grad hook on each pruned weight adds the rest of :math:`\nabla_W L_\rho`,
  :math:`\Lambda_n + \rho(W_n - Z_n)`, in place (:mod:`~constrainedsparse.formulations.penalty`; within
  :meth:`~DuplicateVariables.backward`, for all weights at once after the backward), so the primal
  optimizer steps on :math:`L_\rho` with :math:`Z, \Lambda` fixed. The W = Z constraints are
  registered ``observed=False``: they are not evaluated per step.
* **Coordination** — every ``interval`` steps or epochs, iteration :math:`k` runs
  :meth:`DuplicateVariables.coordinate`, the one place that fixes the update order:

  1. :meth:`~DuplicateVariables.dual_step_before_z` (SLR: condition (6) and :math:`\Lambda'`),
  2. Z-step :math:`Z^k = \Pi_{C}(W^k + \Lambda'/\rho)` through the feasible set's projection,
  3. :meth:`~DuplicateVariables.dual_step_after_z` (SLR: condition (11); ADMM:
     :math:`\Lambda \leftarrow \Lambda + \rho (W^k - Z^k)`),
  4. :meth:`~DuplicateVariables.end_iteration` (SLR keeps the scalars of :math:`W^k - Z^k` that its
     next condition (6) compares against: no copy of :math:`W^k` is kept), then
     :math:`\rho \leftarrow \min(\gamma\rho, \rho_{max})` (or residual balancing).

A dual step of size :math:`s` is a gradient-ascent step on Cooper's dual Lagrangian:
:math:`\nabla_\Lambda \langle \Lambda, W - Z\rangle = W - Z` is the Cooper multipliers' gradient
(given, not backpropagated), and the step is the one ``SGD(lr=s, maximize=True)`` takes, applied in place
(:meth:`DuplicateVariables.dual_ascent`). SLR and ADMM differ only in the two ``dual_step_*`` hooks,
i.e. in the step size rule.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from typing import Any

import cooper
import torch

from constrainedsparse import distributed
from constrainedsparse.batches import batch_size
from constrainedsparse.distributed import weighted_mean
from constrainedsparse.errors import user_stacklevel
from constrainedsparse.formulations.base import Formulation
from constrainedsparse.formulations.checks import check_dense_gradients
from constrainedsparse.formulations.duplicate_config import INTERVAL_UNITS, MASK_SOURCES, DuplicateConfig
from constrainedsparse.formulations.iterate import Iterate
from constrainedsparse.formulations.penalty import PenaltyGradient
from constrainedsparse.formulations.rho import PenaltyRule
from constrainedsparse.modes import eval_mode
from constrainedsparse.problem import Batch
from constrainedsparse.targets import TargetParam

__all__ = [
    "DuplicateConfig",
    "DuplicateVariables",
    "INTERVAL_UNITS",
    "Iterate",
    "MASK_SOURCES",
]

CONSTRAINT_PREFIX = "w_eq_z/"


def multiplier_dtype(target: TargetParam) -> torch.dtype:
    """:math:`\\Lambda`'s dtype: the weight's, at least float32 (a half-precision model keeps float32 multipliers)."""
    return torch.promote_types(target.tensor.dtype, torch.float32)


class DuplicateVariables(Formulation):
    """Shared machinery of the W = Z formulations (see the module docstring for the math).

    Subclasses implement the dual step rule: :meth:`dual_step_before_z` and
    :meth:`dual_step_after_z` return the step size of the multiplier update they want (or
    ``None`` for no update) and any metrics to log.
    """

    Config = DuplicateConfig

    def attach(self) -> None:
        """Copies :math:`Z = \\Pi_C(W)` and registers one W = Z constraint per target."""
        problem, config = self.problem, self.config
        check_dense_gradients(self.name, problem.targets)
        self.k = 0
        self.steps_done = 0
        self.penalty_rule = PenaltyRule(self.name, config, self.optimizer, problem.targets)
        self._level_sets: dict[tuple[str, float], Any] = {}
        self.constraints: dict[str, cooper.Constraint] = {}
        with torch.no_grad():
            self.z = {t.name: t.feasible_set.project(t.tensor.detach()) for t in problem.targets}
        self.penalty = PenaltyGradient(self.constraints, self.z, {t.name: t.stored for t in problem.targets})
        self._hooks = []
        for target in problem.targets:
            self._check_trainable(target)
            constraint = cooper.Constraint(
                constraint_type=cooper.ConstraintType.EQUALITY,
                formulation_type=cooper.formulations.AugmentedLagrangian,
                multiplier=cooper.multipliers.DenseMultiplier(
                    num_constraints=target.tensor.numel(), device=target.tensor.device, dtype=multiplier_dtype(target)
                ),
                penalty_coefficient=cooper.penalty_coefficients.DensePenaltyCoefficient(
                    init=torch.tensor(float(config.rho))
                ),
            )
            problem.add_constraint(
                CONSTRAINT_PREFIX + target.name,
                constraint,
                self._violation_fn(target),
                dual_every_step=False,
                observed=False,
            )
            self.constraints[target.name] = constraint
            self._hooks.append(target.stored.register_post_accumulate_grad_hook(self.penalty.hook(target.name)))

    def _check_trainable(self, target: TargetParam) -> None:
        """Raises ``ValueError`` for a frozen target (its W would never move towards Z)."""
        if not target.stored.requires_grad:
            raise ValueError(
                f"{self.name} trains the weights towards Z, but {target.name} is frozen (requires_grad=False): "
                "leave it out of the Targets (exclude), or unfreeze it"
            )

    def _violation_fn(self, target: TargetParam):
        name = target.name

        def violation(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            return (target.tensor - self.z[name]).reshape(-1)

        return violation

    def before_lagrangian(self) -> None:
        """:math:`\\rho` lowered to :meth:`PenaltyRule.stable` before a W-step whose learning rate is above its bound:
        the initial :math:`\\rho`, or the lr rose since the last coordination (a warm restart of the schedule)."""
        if self.rho > self.penalty_rule.stable():
            self.set_rho(self.penalty_rule.capped(self.rho))

    def backward_scope(self, scale: float, scaler: Any) -> contextlib.AbstractContextManager[None]:
        """The penalty gradient is added after the backward, scaled like the Lagrangian: by ``scale`` and the
        scaler's scale (:meth:`PenaltyGradient.scope`)."""
        if scaler is not None:
            device = self.problem.targets[0].tensor.device
            return self.penalty.scope(scaler.scale(torch.tensor(float(scale), device=device)))
        return self.penalty.scope(scale)

    def without_penalty(self) -> contextlib.AbstractContextManager[None]:
        """A backward inside gets no W = Z penalty gradient (:meth:`PenaltyGradient.paused`)."""
        return self.penalty.paused()

    # --- quantities ---------------------------------------------------------------------------

    @property
    def rho(self) -> float:
        """The current penalty coefficient :math:`\\rho`."""
        first = next(iter(self.constraints.values()), None)
        return float(first.penalty_coefficient.value) if first is not None else self.config.rho

    def weights(self) -> dict[str, torch.Tensor]:
        """Detached current :math:`W_n`, by target name."""
        return {t.name: t.tensor.detach() for t in self.problem.targets}

    def multipliers(self) -> dict[str, torch.Tensor]:
        """Detached :math:`\\Lambda_n` shaped like :math:`W_n`, by target name."""
        return {
            t.name: self.constraints[t.name].multiplier.weight.detach().view_as(t.tensor) for t in self.problem.targets
        }

    @torch.no_grad()
    def objective(self) -> float:
        """:math:`f(W)` on the fixed reference batch, model in eval mode (no BatchNorm updates).

        Under torchrun each rank holds a shard of the reference batch; the shard means are combined
        (one all-reduce), so every rank gets the same :math:`f` and takes the same branch.

        Raises:
            ValueError: If :meth:`setup` got no reference batch.
        """
        if self.reference_batch is None:
            raise ValueError(f"{self.name} needs a reference batch: pass reference_batch to setup()")
        model = self.problem.model
        with eval_mode(model):
            loss, _ = self.problem.loss(self.reference_batch, module=model)
        if distributed.is_distributed():  # the ranks' shard means, weighted by their samples
            loss = weighted_mean(loss, batch_size(self.reference_batch))
        return float(loss)

    def augmented_lagrangian(self, f_value: float, linear: list[float], squares: list[float]) -> float:
        """The augmented Lagrangian from :math:`f(W)`, the dots :math:`\\langle\\Lambda_n, W_n - Z_n\\rangle` and
        the squared norms :math:`\\lVert W_n - Z_n\\rVert^2` (per tensor, summed in float64):

        .. math::
            L_\\rho = f + \\sum_n\\langle\\Lambda_n, W_n - Z_n\\rangle
            + \\frac\\rho2\\sum_n\\lVert W_n - Z_n\\rVert^2
        """
        return f_value + sum(linear) + 0.5 * self.rho * sum(squares)

    # --- updates ------------------------------------------------------------------------------

    @torch.no_grad()
    def dual_ascent(self, step: float, residual: dict[str, torch.Tensor]) -> None:
        """:math:`\\Lambda_n \\leftarrow \\Lambda_n + s\\,r_n`: one gradient-ascent step of size :math:`s` on
        Cooper's dual Lagrangian :math:`\\sum_n\\langle\\Lambda_n, r_n\\rangle` (its gradient is :math:`r_n`),
        applied to the Cooper multipliers in place, then each multiplier's ``post_step_()``.

        It is the step ``SGD(lr=s, maximize=True)`` takes on that gradient, bit for bit (a test compares them), as
        one foreach add: a stock optimizer here (its lr set per call, the gradients given and cleared) made a
        coordination 0.1-0.3 ms slower, 3-7 % of an MLP's step (``benchmarks/overhead.py``, issue 18's goal).
        """
        multipliers = [self.constraints[name].multiplier for name in residual]
        torch._foreach_add_([m.weight for m in multipliers], [r.reshape(-1) for r in residual.values()], alpha=step)
        for multiplier in multipliers:
            multiplier.post_step_()

    def schedule_fraction(self) -> float:
        """Fraction of each target's sparsity that the Z-step projects to now (1 with ``sparsity_schedule=constant``).

        With ``sparsity_schedule=cubic``: :math:`1 - (1 - \\min(1, t / t_{end}))^3` with :math:`t` the W-steps
        done so far over the run's (``total_steps``: ``num_epochs x steps_per_epoch`` unless ``setup()`` cut the last
        epoch short) and :math:`t_{end}` = ``schedule_end``.
        """
        total = self.total_steps
        if self.config.sparsity_schedule == "constant" or total == 0:
            return 1.0
        progress = min(1.0, self.steps_done / (total * self.config.schedule_end))
        return 1.0 - (1.0 - progress) ** 3

    def level_set(self, target: TargetParam, fraction: float):
        """The feasible set of ``target`` at ``fraction`` of its level (the target's own set at 1)."""
        if fraction >= 1.0:
            return target.feasible_set
        key = (target.name, fraction)
        if key not in self._level_sets:
            self._level_sets = {key: target.set_at(target.sparsity * fraction)} | {
                k: v for k, v in self._level_sets.items() if k[0] != target.name
            }
        return self._level_sets[key]

    @torch.no_grad()
    def z_step(self, w: dict[str, torch.Tensor]) -> None:
        """:math:`Z_n \\leftarrow \\Pi_{C_n(s)}(W_n + \\Lambda_n/\\rho)` (new tensors; the old Z stays as Z^{k-1}).

        :math:`C_n(s)` is the target's set at the scheduled level (:meth:`schedule_fraction`).
        """
        lam, rho, fraction = self.multipliers(), self.rho, self.schedule_fraction()
        targets = self.problem.targets
        # W + Λ/ρ for every target in two foreach calls (the same values as w + lam / rho).
        shifted = torch._foreach_div([lam[t.name] for t in targets], rho)
        torch._foreach_add_(shifted, [w[t.name] for t in targets])
        for target, v in zip(targets, shifted):
            self.z[target.name] = self.level_set(target, fraction).project(v, out=v)  # in place: no second tensor

    @abc.abstractmethod
    def dual_step_before_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        """Step size of the update :math:`\\Lambda \\mathrel{+}= s'(W^k - Z^{k-1})`, or ``None``; metrics."""

    @abc.abstractmethod
    def dual_step_after_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        """Step size of the update :math:`\\Lambda \\mathrel{+}= s(W^k - Z^k)`, or ``None``; metrics."""

    needs_objective: bool = False
    """Whether the rule compares :math:`L_\\rho` values (then :meth:`objective` is evaluated)."""

    def coordinate(self) -> dict[str, float]:
        """Coordination iteration :math:`k`: the update order of both formulations, in one place."""
        self.k += 1
        # W does not change during a coordination, so views of the live weights are W^k.
        w = self.weights()
        z_prev = dict(self.z)
        f_value = self.objective() if self.needs_objective else None
        it = Iterate(w, z_prev, f_value)

        step, metrics = self.dual_step_before_z(it)
        if step is not None:
            self.dual_ascent(step, it.residual_before_z)
        self.z_step(w)
        it.z = self.z
        step, after_metrics = self.dual_step_after_z(it)
        metrics.update(after_metrics)
        if step is not None:
            self.dual_ascent(step, it.residual)
        self.end_iteration(it)
        metrics.update(self.dynamics(it))
        self.set_rho(self.next_rho(metrics))
        return metrics

    def end_iteration(self, it: Iterate) -> None:
        """Hook after the last dual step of iteration :math:`k` (:math:`\\Lambda^k` final, :math:`\\rho` not yet
        changed): what the rule keeps for iteration :math:`k + 1`. ADMM keeps nothing."""
        return None

    def next_rho(self, metrics: dict[str, float]) -> float:
        """:math:`\\rho` for the next iteration: :meth:`PenaltyRule.next` (growth or residual balancing, capped at
        ``rho_max`` and at the user's SGD bound)."""
        return self.penalty_rule.next(self.rho, metrics)

    def set_rho(self, value: float) -> None:
        """Sets :math:`\\rho` on every W = Z constraint."""
        for constraint in self.constraints.values():
            # In place (the setter clones and checks for every constraint; value > 0 here by construction).
            constraint.penalty_coefficient.value.fill_(value)

    def dynamics(self, it: Iterate) -> dict[str, float]:
        """Dual-dynamics metrics after a coordination: norms per layer and in total (:meth:`Iterate.squared_norms`,
        one host transfer)."""
        it.forget_before_z()  # W^k - Z^{k-1}: the dual steps are done
        norms = it.squared_norms(self.multipliers())
        metrics = {
            "coordination/k": float(self.k),
            "penalty/rho": self.rho,
            "schedule/fraction": self.schedule_fraction(),
            "dual/residual": sum(norms["residual"]) ** 0.5,
            "dual/lambda_norm": sum(norms["lambda"]) ** 0.5,
            "dual/z_change": sum(norms["z_change"]) ** 0.5,
        }
        for i, name in enumerate(it.w):
            metrics[f"residual/{name}"] = norms["residual"][i] ** 0.5
            metrics[f"lambda/{name}"] = norms["lambda"][i] ** 0.5
            metrics[f"offsupport/{name}"] = (norms["outside"][i] / max(norms["w"][i], 1e-300)) ** 0.5
        return metrics

    # --- Formulation hooks --------------------------------------------------------------------

    def check_setup(self, num_epochs: int, steps_per_epoch: int) -> None:
        """With ``interval_unit=per-epoch`` the epoch must have steps; no target frozen since ``make``.

        Raises:
            ValueError: For ``steps_per_epoch=0`` with ``interval_unit=per-epoch`` (the coordinations are spaced
                over the epoch's steps), or a target frozen since ``make``.
        """
        for target in self.problem.targets:
            self._check_trainable(target)
        if self.config.interval_unit == "per-epoch" and steps_per_epoch == 0:
            raise ValueError(
                f"{self.name} coordinates {self.config.interval} times per epoch (interval_unit=per-epoch), which "
                "needs steps_per_epoch >= 1 in setup(); pass the number of steps of one epoch, or set "
                "interval_unit=step"
            )

    @torch.no_grad()
    def on_setup(self) -> None:
        """With a schedule, :math:`Z^0` is the projection at the level of step 0 (before any coordination)."""
        if self.k == 0 and self.config.sparsity_schedule != "constant":
            fraction = self.schedule_fraction()
            for target in self.problem.targets:
                self.z[target.name] = self.level_set(target, fraction).project(target.tensor.detach())

    def after_step(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Counts the W-step and coordinates when :meth:`coordinates_after` says so."""
        self.steps_done += 1
        return self.coordinate() if self.coordinates_after(self.steps_done) else {}

    def coordinates_after(self, step: int) -> bool:
        """Whether a coordination follows W-step ``step`` (1-based, counted over the whole run).

        Every ``interval`` steps (``interval_unit=step``), or ``interval`` times per epoch (``per-epoch``:
        after step :math:`t` when :math:`\\lfloor t n / S\\rfloor` moves on, with :math:`n` = ``interval`` and
        :math:`S` = ``steps_per_epoch``; every step if :math:`n \\ge S`); never after a step with
        ``interval_unit=epoch`` (:meth:`on_end_epoch` coordinates then).
        """
        unit, interval = self.config.interval_unit, self.config.interval
        if unit == "step":
            return step % interval == 0
        if unit == "per-epoch":
            per = max(self.steps_per_epoch, 1)
            return (step * interval) // per != ((step - 1) * interval) // per
        return False

    def coordinations_per_epoch(self) -> float:
        """How many coordinations an epoch of ``steps_per_epoch`` W-steps holds on average (after :meth:`setup`):
        :math:`\\min(n, S)` with ``per-epoch``, :math:`S / n` with ``step``, :math:`1 / n` with ``epoch``."""
        unit, interval, steps = self.config.interval_unit, self.config.interval, self.steps_per_epoch
        if unit == "per-epoch":
            return float(min(interval, steps))
        if unit == "step":
            return steps / interval
        return 1.0 / interval

    def on_end_epoch(self, epoch: int) -> dict[str, float]:
        if self.config.interval_unit == "epoch" and (epoch + 1) % self.config.interval == 0:
            return self.coordinate()
        return {}

    @torch.no_grad()
    def compute_hard_masks(self) -> dict[str, torch.Tensor]:
        source = self.z if self.config.mask_from == "z" else self.weights()
        return {t.name: t.feasible_set.mask(source[t.name]) for t in self.problem.targets}

    def detach(self) -> None:
        """Unregisters the W = Z constraints and their gradient hooks, so masked retraining sees only the user's.

        Warns if it trained without a single coordination (e.g. ``interval_unit=epoch`` and a loop that never
        calls ``end_epoch``): the weights were never pulled towards Z, and the hard masks cut dense weights.
        """
        if self.k == 0 and self.steps_done > 0:
            where = "end_epoch()" if self.config.interval_unit == "epoch" else "post_step()"
            warnings.warn(
                f"{self.name} ran {self.steps_done} steps without a coordination (interval={self.config.interval} "
                f"{self.config.interval_unit}; it coordinates in {where}): its hard masks cut weights never pulled "
                "towards Z",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        for name in self.constraints:
            self.problem.remove_constraint(CONSTRAINT_PREFIX + name)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.penalty.clear()
        # Z and Λ (twice the pruned weights) go now, not when the formulation object does (the penalty shares
        # these dicts; the hard masks, the only later use of Z, are refused after finalize()).
        self.constraints.clear()
        self.z.clear()
        super().detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "k": self.k,
            "steps_done": self.steps_done,
            "z": {name: z.clone() for name, z in self.z.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.k = state["k"]
        self.steps_done = state["steps_done"]
        for name, z in state["z"].items():
            self.z[name] = z.to(self.z[name].device, copy=True)
