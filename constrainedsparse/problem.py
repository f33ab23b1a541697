r"""The sparsity CMP: a :class:`cooper.ConstrainedMinimizationProblem` over a model.

.. math::
    \min_W f(W) \quad \text{s.t.}\quad W_n \in C_n \ \text{(sparsity, per formulation)},\quad
    g_j(W) \le 0,\quad h_j(W) = 0 \ \text{(user constraints)}.

The problem holds the model, the loss, the resolved targets and every constraint (the user's and
the ones a formulation registers, e.g. ``W - Z = 0`` or expected-L0 densities). Each constraint
is a real :class:`cooper.Constraint` with its own multiplier; ``compute_cmp_state`` evaluates
the loss and all violations on one batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import cooper
import torch
from torch import nn

from constrainedsparse.distributed import synchronised
from constrainedsparse.targets import TargetParam

__all__ = ["Batch", "SparsityProblem", "UserConstraint", "ViolationFn"]

Batch = tuple[torch.Tensor, torch.Tensor]
ViolationFn = Callable[..., torch.Tensor]
_SENSES = {"<=": cooper.ConstraintType.INEQUALITY, "==": cooper.ConstraintType.EQUALITY}


@dataclass(frozen=True)
class UserConstraint:
    """A constraint of the user's: ``fn(model)`` or ``fn(model, batch)`` ``<= 0`` or ``== 0``.

    Args:
        fn: Returns a tensor (any shape; every entry is one constraint) differentiable in the
            model's parameters. If it takes two arguments it receives the current batch.
        sense: ``"<="`` (inequality, multiplier kept >= 0) or ``"=="`` (equality).
    """

    fn: ViolationFn
    sense: str = "<="

    def __post_init__(self) -> None:
        if self.sense not in _SENSES:
            raise ValueError(f"constraint sense must be '<=' or '==', got {self.sense!r}")
        if not callable(self.fn):
            raise ValueError(f"constraint fn must be callable, got {type(self.fn).__name__}")

    @property
    def uses_batch(self) -> bool:
        """Whether ``fn`` takes the batch as its second argument."""
        return len(inspect.signature(self.fn).parameters) >= 2

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        value = self.fn(model, batch) if self.uses_batch else self.fn(model)
        return torch.as_tensor(value).reshape(-1)


@dataclass
class _Registered:
    constraint: cooper.Constraint
    violation: Callable[[nn.Module, Batch], torch.Tensor]
    dual_every_step: bool
    data_dependent: bool = False


class SparsityProblem(cooper.ConstrainedMinimizationProblem):
    """Model + loss + targets + constraints, as a Cooper CMP.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, y) -> scalar``.
        targets: Resolved pruning targets (see :meth:`Targets.resolve`).
        constraints: User constraints by name; each becomes a Cooper constraint with a
            :class:`cooper.multipliers.DenseMultiplier` sized by one evaluation of ``fn``.
        example_batch: A batch used to size data-dependent user constraints.

    Attributes:
        forward_module: What :meth:`compute_cmp_state` calls on the batch: ``model`` itself, or a
            ``DistributedDataParallel`` wrapper of it under torchrun (set by the engine per phase).
            Constraints and formulations always see the plain ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        targets: list[TargetParam],
        constraints: Mapping[str, UserConstraint] | None = None,
        example_batch: Batch | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.forward_module: nn.Module = model
        self.loss_fn = loss_fn
        self.targets = targets
        self._violations: dict[str, _Registered] = {}
        self.user_constraint_names: list[str] = []
        for name, spec in (constraints or {}).items():
            self.add_user_constraint(name, spec, example_batch)

    def add_user_constraint(self, name: str, spec: UserConstraint, example_batch: Batch | None) -> None:
        """Registers a :class:`UserConstraint` as a Cooper constraint with its own multiplier."""
        if spec.uses_batch and example_batch is None:
            raise ValueError(f"constraint {name!r} takes a batch; pass example_batch to size it")
        with torch.no_grad():
            size = spec(self.model, example_batch).numel()
        device = next(self.model.parameters()).device
        constraint = cooper.Constraint(
            constraint_type=_SENSES[spec.sense],
            formulation_type=cooper.formulations.Lagrangian,
            multiplier=cooper.multipliers.DenseMultiplier(num_constraints=size, device=device),
        )
        self.add_constraint(name, constraint, spec, data_dependent=spec.uses_batch)
        self.user_constraint_names.append(name)

    def add_constraint(
        self,
        name: str,
        constraint: cooper.Constraint,
        violation: Callable[[nn.Module, Batch], torch.Tensor],
        *,
        dual_every_step: bool = True,
        data_dependent: bool = False,
    ) -> None:
        """Registers any Cooper constraint with the function that measures its violation.

        Args:
            name: Unique constraint name (used in logs and checkpoints).
            constraint: The Cooper constraint (type, formulation, multiplier).
            violation: ``violation(model, batch) -> tensor``.
            dual_every_step: If True the multiplier takes a gradient-ascent step after every
                minibatch (via :meth:`dual_optimizer`). If False it only enters the primal
                Lagrangian, and a formulation updates it on its own schedule (e.g. the W = Z
                multipliers of SLR/ADMM).
            data_dependent: Whether the violation depends on the batch. Under torchrun its value is
                then averaged over the ranks (:func:`constrainedsparse.distributed.synchronised`)
                before any dual use, so every rank updates the multiplier the same way.

        Raises:
            ValueError: If the name is taken.
        """
        if name in self._violations:
            raise ValueError(f"constraint {name!r} is already registered")
        self._register_constraint(name, constraint)
        self._violations[name] = _Registered(constraint, violation, dual_every_step, data_dependent)

    def remove_constraint(self, name: str) -> None:
        """Unregisters a constraint (and its multiplier) added by :meth:`add_constraint`.

        Raises:
            ValueError: If no constraint has this name.
        """
        if name not in self._violations:
            raise ValueError(f"no constraint named {name!r}; registered: {', '.join(self._violations) or 'none'}")
        delattr(self, name)
        del self._violations[name]

    def compute_cmp_state(self, batch: Batch) -> cooper.CMPState:
        """Loss and every constraint violation on ``batch``; ``misc['output']`` keeps the logits."""
        x, y = batch
        output = self.forward_module(x)
        loss = self.loss_fn(output, y)
        observed = {
            entry.constraint: cooper.ConstraintState(
                violation=self._violation(entry, batch), contributes_to_dual_update=entry.dual_every_step
            )
            for entry in self._violations.values()
        }
        return cooper.CMPState(loss=loss, observed_constraints=observed, misc={"output": output})

    def _violation(self, entry: _Registered, batch: Batch) -> torch.Tensor:
        violation = entry.violation(self.model, batch)
        return synchronised(violation) if entry.data_dependent else violation

    def dual_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """Gradient ascent (``SGD(maximize=True)``) on every multiplier updated each step, or ``None``."""
        params = [
            p
            for entry in self._violations.values()
            if entry.dual_every_step and entry.constraint.multiplier is not None
            for p in entry.constraint.multiplier.parameters()
        ]
        if not params:
            return None
        return torch.optim.SGD(params, lr=lr, maximize=True)

    def named_multiplier_values(self) -> dict[str, torch.Tensor]:
        """Current multiplier values by constraint name."""
        return {name: m.weight.detach().reshape(-1) for name, m in self.named_multipliers()}
