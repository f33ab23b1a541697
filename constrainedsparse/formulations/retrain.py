"""Masked retraining: the hard masks fixed, the kept weights (and the user's multipliers) trained.

What the training runner does after a hard prune (``--retrain-epochs``), and what a user's own loop
can do the same way: ``f = FixedMaskRetrain(problem, masks, optimizer=...)`` then the usual
``setup`` / ``training_step`` / ``finalize`` (which bakes the masks in).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from constrainedsparse.formulations.base import Formulation
from constrainedsparse.masks import set_masks
from constrainedsparse.problem import SparsityProblem

__all__ = ["FixedMaskRetrain"]


class FixedMaskRetrain(Formulation):
    """Masked retraining: the masks are fixed, the kept weights (and user multipliers) train."""

    name = "retrain"
    description = "masked retraining with fixed masks"

    def __init__(
        self,
        problem: SparsityProblem,
        masks: Mapping[str, torch.Tensor],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        dual_lr: float = 1e-2,
    ) -> None:
        self.masks = dict(masks)
        super().__init__(problem, optimizer=optimizer, lr=lr, dual_lr=dual_lr)

    @classmethod
    def exact_layer_sparsity(cls, config: object) -> bool:
        """The masks it was given (checked where they were made: l0's model scope shares one budget)."""
        return False

    def attach(self) -> None:
        """Registers the fixed masks."""
        set_masks(self.problem.targets, self.masks)

    def compute_hard_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.masks)
