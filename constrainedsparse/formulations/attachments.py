"""What a formulation's ``attach`` may change, kept before it runs: restored when the build fails part-way."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from torch.nn.utils import parametrize

from constrainedsparse.masks import remove_parametrization

if TYPE_CHECKING:
    from constrainedsparse.formulations.base import Formulation

__all__ = ["Attachments"]


@dataclasses.dataclass
class Attachments:
    """What a formulation's ``attach`` may change, as it was before: restored when the build fails part-way."""

    constraints: list[str]
    groups: int

    @classmethod
    def of(cls, formulation: Formulation) -> Attachments:
        """Before ``attach``, on targets without masks or gates (``claim_targets`` refuses the others)."""
        return cls(formulation.problem.constraint_names(), len(formulation.optimizer.param_groups))

    def restore(self, formulation: Formulation, failed_build: bool = False) -> None:
        """Masks or gates off (the weights as they were, not baked), the formulation's constraints and gradient hooks
        removed, its parameter groups emptied (removed after a failed build).

        Args:
            formulation: The formulation built on the state this records.
            failed_build: ``attach`` failed part-way: its ``detach`` may meet what was never attached, and the
                build's own error is the one to raise (a ``detach`` error is then set aside); otherwise a
                ``detach`` error is an error of its own (:meth:`~Formulation.discard`).
        """
        for target in formulation.problem.targets:
            if parametrize.is_parametrized(target.module, target.param_name):
                remove_parametrization(target.module, target.param_name, leave_parametrized=False)
        error = None
        try:
            formulation.detach()  # its own hooks and bookkeeping, as far as attach got
        except Exception as err:  # the rest is restored first; then raised (set aside after a failed build)
            error = None if failed_build else err
        problem, optimizer = formulation.problem, formulation.optimizer
        for name in problem.constraint_names():
            if name not in self.constraints:
                problem.remove_constraint(name)
        if failed_build:  # every group since attach began is its own; after a build, detach() emptied its groups and
            for group in optimizer.param_groups[self.groups :]:  # they stay, as after finalize() (a scheduler counts
                for parameter in group["params"]:  # them, and the user may have added groups of their own since)
                    optimizer.state.pop(parameter, None)
            del optimizer.param_groups[self.groups :]
        if error is not None:
            raise error
