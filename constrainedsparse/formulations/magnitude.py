r"""Magnitude pruning: gradual (cubic schedule) or one-shot, masks through parametrize.

At the start of pruning epoch :math:`e` of :math:`E`, every target is masked to sparsity

.. math:: s_e = s \left(1 - \left(1 - \tfrac{e + 1}{E}\right)^3\right)

(Zhu & Gupta, 2017) by the projection of its feasible set; masked weights get no gradient and
stay pruned. With ``--epochs 0`` this is one-shot magnitude pruning of the dense model. An N:M
pattern has no intermediate levels: it applies in full from the first epoch.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from constrainedsparse.config import Hyperparameters, OneOf, hyperparameter
from constrainedsparse.errors import user_stacklevel
from constrainedsparse.formulations.base import Formulation
from constrainedsparse.formulations.factory import register_formulation
from constrainedsparse.masks import current_masks, set_masks


@dataclasses.dataclass
class MagnitudeConfig(Hyperparameters):
    """Hyperparameters of ``magnitude``.

    Attributes:
        schedule: ``"cubic"`` (gradual over the pruning epochs) or ``"oneshot"`` (prune at once,
            then train with the mask fixed).
    """

    schedule: str = hyperparameter(
        "cubic", "gradual cubic schedule over the pruning epochs, or one-shot", OneOf(("cubic", "oneshot"), "or")
    )


@register_formulation("magnitude")
class Magnitude(Formulation):
    """Magnitude pruning with the cubic gradual schedule (one-shot with 0 epochs)."""

    description = "magnitude pruning: gradual cubic schedule over the pruning epochs (one-shot at 0 epochs)"
    Config = MagnitudeConfig
    config: MagnitudeConfig

    def attach(self) -> None:
        """Registers all-ones masks now, so that :meth:`start_epoch` and :meth:`load_state_dict` only update
        them in place: a model wrapped in ``DistributedDataParallel`` after ``make`` keeps averaging the
        gradients of the masked weights (a parametrization registered after the wrap is not), and the
        model's ``state_dict`` has the masked keys from the start. Steps wait for the first masks."""
        set_masks(
            self.problem.targets, {t.name: torch.ones_like(t.tensor, dtype=torch.bool) for t in self.problem.targets}
        )
        self._masked = False

    def scheduled_sparsity(self, epoch: int) -> float:
        """Fraction of the target sparsity reached during epoch ``epoch``."""
        if self.config.schedule == "oneshot" or self.num_epochs == 0:
            return 1.0
        # Epochs beyond the num_epochs given to setup() stay at the target (the schedule is over).
        return 1.0 - (1.0 - min(1.0, (epoch + 1) / self.num_epochs)) ** 3

    def schedule_fraction(self) -> float:
        """The schedule's fraction in the epoch started last (0 before the first)."""
        return self.scheduled_sparsity(self._epochs.epoch)

    @torch.no_grad()
    def on_start_epoch(self, epoch: int) -> dict[str, float]:
        fraction = self.scheduled_sparsity(epoch)
        masks = {t.name: t.set_at(t.sparsity * fraction).mask(t.tensor) for t in self.problem.targets}
        if not self._masked and fraction < 1.0:
            self._warn_zeros_kept(masks, fraction)
        set_masks(self.problem.targets, masks)
        self._masked = True
        return {"schedule/fraction": fraction}

    def _warn_zeros_kept(self, masks: dict[str, torch.Tensor], fraction: float) -> None:
        """Warns when the first masks keep (train) more than 1 % of a target's weights that are zero already and that
        its mask at the target level prunes: a model pruned before (one-shot), whose zeros the cubic schedule's lower
        first levels let grow back. Not for a tensor that is all zeros (zero-initialised, not pruned)."""
        for target in self.problem.targets:
            zeros = target.stored == 0
            if bool(zeros.all()):
                continue
            freed = zeros & masks[target.name] & ~target.feasible_set.mask(target.tensor)
            if int(freed.sum()) > 0.01 * target.stored.numel():
                warnings.warn(
                    f"magnitude: {target.name} holds {float(zeros.float().mean()):.0%} zeros already (a model pruned "
                    f"before?), but the cubic schedule's first masks prune {target.sparsity * fraction:.0%}: "
                    f"{int(freed.sum())} of the zeros its target mask prunes train again and the final mask is chosen "
                    "anew by magnitude; to keep the zeros (fine-tuning a pruned model), use schedule='oneshot'",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
                return

    @torch.no_grad()
    def compute_hard_masks(self) -> dict[str, torch.Tensor]:
        return {t.name: t.feasible_set.mask(t.tensor) for t in self.problem.targets}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": current_masks(self.problem.targets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # checks the state first
        set_masks(self.problem.targets, state["masks"])
        self._masked = True

    def _require(self, call: str) -> None:
        super()._require(call)
        if not self._masked and call in ("compute_lagrangian()", "backward()", "training_step()"):
            raise ValueError(
                f"magnitude sets its masks in start_epoch(epoch): call start_epoch(0) before {call} "
                "(else the first epoch trains dense)"
            )
