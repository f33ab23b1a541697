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
    added: set[int] | None = None  # ids of the parameters of the groups attach added, once it succeeded

    @classmethod
    def of(cls, formulation: Formulation) -> Attachments:
        """Before ``attach``, on targets without masks or gates (``claim_targets`` refuses the others)."""
        return cls(formulation.problem.constraint_names(), len(formulation.optimizer.param_groups))

    def attached(self, formulation: Formulation) -> None:
        """After a successful ``attach``: records the parameters of the groups it added (l0's gates), so that a later
        restore removes those groups and not the ones the user adds to the optimizer afterwards."""
        groups = formulation.optimizer.param_groups[self.groups :]
        self.added = {id(parameter) for group in groups for parameter in group["params"]}

    def restore(self, formulation: Formulation, failed_build: bool = False) -> None:
        """Masks or gates off (the weights as they were, not baked), the formulation's constraints, gradient
        hooks and parameter groups removed.

        Args:
            formulation: The formulation built on the state this records.
            failed_build: ``attach`` failed part-way: its ``detach`` may meet what was never attached, and the
                build's own error is the one to raise (a ``detach`` error is then set aside); otherwise a
                ``detach`` error is an error of its own (:meth:`~Formulation.discard`).
        """
        optimizer = formulation.optimizer
        if self.added is None:  # attach failed part-way: every group since is its
            ours = optimizer.param_groups[self.groups :]
        else:  # found by their parameters before detach() empties them (a loaded state rebuilds the group dicts)
            ours = [g for g in optimizer.param_groups if g["params"] and all(id(p) in self.added for p in g["params"])]
        for target in formulation.problem.targets:
            if parametrize.is_parametrized(target.module, target.param_name):
                remove_parametrization(target.module, target.param_name, leave_parametrized=False)
        error = None
        try:
            formulation.detach()  # its own hooks and bookkeeping, as far as attach got
        except Exception as err:  # the rest is restored first; then raised (set aside after a failed build)
            error = None if failed_build else err
        problem = formulation.problem
        for name in problem.constraint_names():
            if name not in self.constraints:
                problem.remove_constraint(name)
        for group in ours:
            for parameter in group["params"]:
                optimizer.state.pop(parameter, None)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if not any(g is group for group in ours)]
        if error is not None:
            raise error
