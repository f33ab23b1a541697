r"""The sparsity CMP: a :class:`cooper.cmp.ConstrainedMinimizationProblem` over a model.

.. math::
    \min_W f(W) \quad \text{s.t.}\quad W_n \in C_n \ \text{(sparsity, per formulation)},\quad
    g_j(W) \le 0,\quad h_j(W) = 0 \ \text{(user constraints)}.

The problem holds the model, the loss, the resolved targets and every constraint (the user's and
the ones a formulation registers, e.g. ``W - Z = 0`` or expected-L0 densities). Each constraint
is a real :class:`cooper.Constraint` with its own multiplier; ``compute_cmp_state`` evaluates
the loss and all violations on one batch.

**Batches.** The short form takes ``(x, y)`` batches: the loss is ``loss_fn(model(x), y)``. Any
other batch (a dict for a ``transformers`` model, a triple with sample weights, ...) needs
``compute_loss(model, batch) -> scalar tensor``; user constraints that take the batch receive the
same batch object. Penalties (``add_penalty``) are added to the loss, never swapped into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cooper
import torch
from torch import nn

from constrainedsparse.compiling import outside_compile
from constrainedsparse.distributed import synchronised
from constrainedsparse.errors import UserInputError
from constrainedsparse.modes import eval_mode, random_states_kept
from constrainedsparse.multipliers import RestartingMultiplier
from constrainedsparse.targets import TargetParam, resolved_targets
from constrainedsparse.userconstraint import SENSES, UserConstraint, ViolationFn, checked_violation

__all__ = ["Batch", "LossFn", "SparsityProblem", "UserConstraint", "ViolationFn", "violation_summary"]

Batch = Any
"""A batch as the problem's loss takes it: ``(x, y)`` for ``loss_fn``, anything for ``compute_loss``."""
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class _Registered:
    constraint: cooper.Constraint
    violation: Callable[[nn.Module, Batch], torch.Tensor]
    dual_every_step: bool
    data_dependent: bool = False
    user: bool = False
    observed: bool = True
    strict_violation: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    dual_lr: float | None = None  # the multiplier's own ascent step (a user constraint's), else the formulation's


def pair_of(
    batch: Batch, hint: str = "pass compute_loss=fn(model, batch) to SparsityProblem", who: str = "loss_fn"
) -> tuple[Any, Any]:
    """``(x, y)`` of a pair batch (``who`` takes it apart: named in the error).

    Raises:
        UserInputError: For any other batch (a dict, a triple), with ``hint`` on what to give instead.
    """
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
        return batch[0], batch[1]
    kind = type(batch).__name__ + (
        f" of {len(batch)}" if isinstance(batch, Sequence) and not isinstance(batch, str) else ""
    )
    keys = f" (keys {', '.join(map(str, batch))})" if isinstance(batch, Mapping) else ""
    raise UserInputError(f"{who} takes (inputs, targets) batches, got a {kind}{keys}: {hint} for other batches")


def checked_loss(value: Any, source: str) -> torch.Tensor:
    """``value`` as a 0-d tensor if it is the scalar, differentiable loss a step needs.

    Raises:
        UserInputError: For a non-tensor, a tensor of several entries (``reduction="none"``), or a
            loss without gradient while gradients are on (detached, ``.item()``, an integer cast).
    """
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserInputError(f"{source} must return a scalar tensor, got {shape}")
    if torch.is_grad_enabled() and not value.requires_grad:
        raise UserInputError(
            f"{source} returned a loss with no gradient (requires_grad=False, dtype {value.dtype}): compute it "
            "from the model's output, without detach(), .item() or an integer cast"
        )
    return value if value.dim() == 0 else value.reshape(())  # no view node for a 0-d loss


class SparsityProblem(cooper.cmp.ConstrainedMinimizationProblem):
    """Model + loss + targets + constraints, as a Cooper CMP.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, y) -> scalar`` for ``(x, y)`` batches (the short form).
        targets: Resolved pruning targets (see :meth:`Targets.resolve`).
        constraints: User constraints by name; each becomes a Cooper constraint with a
            :class:`cooper.multipliers.DenseMultiplier` sized by one evaluation of ``fn``.
        example_batch: A batch used to size data-dependent user constraints.
        compute_loss: ``compute_loss(model, batch) -> scalar tensor`` for any batch (instead of
            ``loss_fn``).

    Attributes:
        forward_module: What the loss calls on the batch: ``model`` itself, or a
            ``DistributedDataParallel`` wrapper of it under torchrun (set by the runner per phase).
            Constraints and formulations always see the plain ``model``.

    Raises:
        ValueError: Without targets, with neither or both of ``loss_fn`` and ``compute_loss``, or for
            a constraint that cannot be sized.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        targets: list[TargetParam] | None = None,
        constraints: Mapping[str, UserConstraint] | None = None,
        example_batch: Batch | None = None,
        *,
        compute_loss: LossFn | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (loss_fn is None) == (compute_loss is None):
            raise ValueError(
                "give exactly one of loss_fn(output, y) (for (x, y) batches) and compute_loss(model, batch)"
            )
        for key, fn in (("loss_fn", loss_fn), ("compute_loss", compute_loss)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{key} must be callable, got {type(fn).__name__}")
        if not targets:
            raise ValueError("targets is required: pass Targets().resolve(model, SparsityConfig(...))")
        targets = resolved_targets(targets)
        if constraints is not None and not isinstance(constraints, Mapping):
            raise ValueError(f"constraints must be a dict {{name: UserConstraint}}, got a {type(constraints).__name__}")
        held = {id(p) for p in model.parameters()}
        foreign = [t.name for t in targets if id(t.stored) not in held]
        if foreign:
            raise ValueError(
                f"target {foreign[0]} is not a parameter of this model: resolve the targets on the model you "
                "train (Targets().resolve(model, ...)), after any copy of it"
            )
        self.model = model
        self._wrapper: nn.Module | None = None  # forward_module: a wrapper of model set in its place (DDP's)
        self.loss_fn = loss_fn
        self.compute_loss = compute_loss
        self.targets = targets
        self._violations: dict[str, _Registered] = {}
        self._penalties: dict[str, Callable[[nn.Module], torch.Tensor]] = {}
        self.user_constraint_names: list[str] = []
        for name, spec in (constraints or {}).items():
            self.add_user_constraint(name, spec, example_batch)

    @property
    def forward_module(self) -> nn.Module:
        """What the loss calls on the batch: ``model`` itself, or the wrapper of it set here (DDP's)."""
        return self.model if self._wrapper is None else self._wrapper

    @forward_module.setter
    def forward_module(self, module: nn.Module) -> None:
        # The model itself is read through self.model: reached under two names, a compiled model asserted in a step
        # function compiled around backward() ("already tracked for mutation").
        self._wrapper = None if module is self.model else module

    # --- the objective --------------------------------------------------------------------------

    def loss(self, batch: Batch, module: nn.Module | None = None) -> tuple[torch.Tensor, Any]:
        """The task loss on ``batch`` (with ``module`` in place of :attr:`forward_module`) and the output.

        Returns:
            ``(loss, output)``; ``output`` is ``None`` with ``compute_loss``.

        Raises:
            ValueError: For a batch ``loss_fn`` cannot take, or a loss that is not a scalar tensor.
        """
        module = self.forward_module if module is None else module
        if self.compute_loss is not None:
            value, output = self.compute_loss(module, batch), None
            source = "compute_loss"
        else:
            x, y = pair_of(batch)
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0:
                raise ValueError("the batch holds no samples (its inputs have shape (0, ...)): the mean loss is NaN")
            output = module(x)
            value, source = self.loss_fn(output, y), "loss_fn"
        return checked_loss(value, source), output

    def add_penalty(self, name: str, fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """Adds ``fn(model)`` (a scalar tensor) to the loss of every step until :meth:`remove_penalty`.

        Raises:
            ValueError: If the name is taken.
        """
        if name in self._penalties:
            raise ValueError(f"penalty {name!r} is already added")
        self._penalties[name] = fn

    def remove_penalty(self, name: str) -> None:
        """Removes a penalty added by :meth:`add_penalty`.

        Raises:
            ValueError: If no penalty has this name.
        """
        if name not in self._penalties:
            raise ValueError(f"no penalty named {name!r}; added: {', '.join(self._penalties) or 'none'}")
        del self._penalties[name]

    # --- constraints ----------------------------------------------------------------------------

    def add_user_constraint(self, name: str, spec: UserConstraint, example_batch: Batch | None) -> None:
        """Registers a :class:`UserConstraint` as a Cooper constraint with its own multiplier.

        Raises:
            ValueError: If the constraint takes a batch and none is given, or its value is not a tensor.
        """
        if not isinstance(spec, UserConstraint):
            raise ValueError(f"constraint {name!r} must be a UserConstraint, got {type(spec).__name__}")
        self._check_name(name, yours=True)
        if spec.uses_batch and example_batch is None:
            raise ValueError(f"constraint {name!r} takes a batch; pass example_batch to size it")
        # Sized in eval mode, the random streams kept: BatchNorm statistics and the training's draws untouched.
        with torch.no_grad(), eval_mode(self.model), random_states_kept():
            value = checked_violation(name, spec(self.model, example_batch))
            strict = (
                None
                if spec.strict_fn is None
                else checked_violation(name, spec.measure(self.model, example_batch), "strict_fn")
            )
        for what, measured in (("", value), (" strict_fn", strict)):
            if measured is not None and not bool(torch.isfinite(measured).all()):  # would make λ and W nan
                raise UserInputError(
                    f"constraint {name!r}{what} is not finite on the model as given ({measured.tolist()[:4]}): a nan "
                    "or inf violation would make the multiplier and the weights nan; check its function"
                )
        size = value.numel()
        if strict is not None and strict.numel() != size:
            raise UserInputError(
                f"constraint {name!r}: strict_fn returned {strict.numel()} entries but fn {size}: one measurement "
                "per constraint entry"
            )
        device = next(self.model.parameters()).device
        constraint = cooper.Constraint(
            constraint_type=SENSES[spec.sense],
            formulation_type=cooper.formulations.Lagrangian,
            multiplier=RestartingMultiplier(size, restarts=spec.restarts, device=device),
        )
        self.add_constraint(
            name, constraint, spec, data_dependent=spec.uses_batch,
            strict_violation=None if spec.strict_fn is None else spec.measure, dual_lr=spec.dual_lr,
        )  # fmt: skip
        self._violations[name].user = True
        self.user_constraint_names.append(name)

    def add_constraint(
        self,
        name: str,
        constraint: cooper.Constraint,
        violation: Callable[[nn.Module, Batch], torch.Tensor],
        *,
        dual_every_step: bool = True,
        data_dependent: bool = False,
        observed: bool = True,
        strict_violation: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        dual_lr: float | None = None,
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
            observed: If False, :meth:`compute_cmp_state` does not evaluate the constraint, so it is
                no part of the per-step Lagrangian: the formulation that registered it applies its
                primal term itself (``slr``/``admm`` add the W = Z penalty gradient with a gradient
                hook) and updates its multiplier on its own schedule (requires ``dual_every_step=False``).
            strict_violation: ``strict_violation(model, batch) -> tensor``, a *proxy constraint*
                (Cotter et al., 2019; Cooper's ``ConstraintState.strict_violation``): the dual step
                (and a dual restart) reads this measurement, which need not be differentiable, while
                the primal Lagrangian keeps ``violation`` as its differentiable surrogate.
            dual_lr: The multiplier's own step in :meth:`dual_optimizer` (a group of its own); ``None``: the
                formulation's ``dual_lr``.

        Raises:
            ValueError: If the name is taken, or for an unobserved constraint stepped every step.
        """
        self._check_name(name, yours=False)
        if not observed and dual_every_step:
            raise ValueError(f"constraint {name!r}: an unobserved constraint cannot take a dual step every step")
        self._register_constraint(name, constraint)
        self._violations[name] = _Registered(
            constraint, violation, dual_every_step, data_dependent, observed=observed,
            strict_violation=strict_violation, dual_lr=dual_lr,
        )  # fmt: skip

    def _check_name(self, name: str, yours: bool) -> None:
        """The rules of a constraint's name, for yours (:meth:`add_user_constraint`, checked before its function
        runs) and a formulation's (:meth:`add_constraint`).

        Raises:
            ValueError: If it is taken (by a constraint, or an attribute ``problem.<name>``), not a non-empty
                string, or (yours) holds a ``/``.
        """
        if name in self._violations:
            if self._violations[name].user and not yours:  # a formulation registering its own under your name
                raise ValueError(
                    f"constraint {name!r} is one of yours, and the formulation being built registers its own "
                    "under that name: give yours another name"
                )
            raise ValueError(f"constraint {name!r} is already registered")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a constraint name must be a non-empty string, got {name!r}")
        if yours and "/" in name:  # logged as violation/<name>, multiplier/<name>
            raise ValueError(f"constraint name {name!r} has a '/': logged keys are family/name, choose a name without")
        if hasattr(type(self), name) or name in vars(self):  # problem.<name> would not read the constraint
            raise ValueError(f"constraint name {name!r} is taken by SparsityProblem.{name}: choose another")

    def check_constraint_name(self, name: str) -> None:
        """Raises ``ValueError`` if ``name`` cannot be one of your constraints here (taken, empty, a ``/``)."""
        self._check_name(name, yours=True)

    def constraint_names(self) -> list[str]:
        """The registered constraints' names: yours, then those formulations added, in order."""
        return list(self._violations)

    def remove_constraint(self, name: str) -> None:
        """Unregisters a constraint (and its multiplier) added by :meth:`add_constraint`.

        Raises:
            ValueError: If no constraint has this name.
        """
        if name not in self._violations:
            raise ValueError(f"no constraint named {name!r}; registered: {', '.join(self._violations) or 'none'}")
        delattr(self, name)
        del self._violations[name]

    def compute_cmp_state(self, batch: Batch) -> cooper.cmp.CMPState:
        """Loss (plus penalties) and every observed constraint's violation on ``batch``; ``misc['output']`` keeps
        the output."""
        loss, output = self.loss(batch)
        for fn in self._penalties.values():
            loss = loss + fn(self.model)
        observed = {name: entry for name, entry in self._violations.items() if entry.observed}
        violations = {name: self._violation(name, entry, batch) for name, entry in observed.items()}
        measured = {name: entry for name, entry in observed.items() if entry.strict_violation is not None}
        strict = _strict_violations(self, measured, batch) if measured else {}  # after: l0's reuse their densities
        states = {
            entry.constraint: cooper.ConstraintState(
                violation=violations[name],
                strict_violation=strict.get(name),
                contributes_to_dual_update=entry.dual_every_step,
            )
            for name, entry in observed.items()
        }
        return cooper.cmp.CMPState(loss=loss, observed_constraints=states, misc={"output": output})

    def _violation(self, name: str, entry: _Registered, batch: Batch) -> torch.Tensor:
        return _entries(name, entry, entry.violation(self.model, batch))

    def _strict(self, name: str, entry: _Registered, batch: Batch) -> torch.Tensor:
        """A constraint's proxy measurement on ``batch`` (what its dual step reads), checked like a violation."""
        return _entries(name, entry, entry.strict_violation(self.model, batch), "strict_fn")

    def dual_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """Gradient ascent (``SGD(maximize=True)``) on every multiplier updated each step, or ``None``: one
        parameter group at ``lr`` (empty if every constraint has its own step), then one for each constraint with a
        ``dual_lr`` of its own, in registration order: the groups depend on which constraints have one, not on the
        values, so a state saved with other values loads (and the current ones apply)."""
        shared: list[torch.nn.Parameter] = []
        own: list[dict[str, Any]] = []
        for entry in self._violations.values():
            if entry.dual_every_step and entry.constraint.multiplier is not None:
                params = list(entry.constraint.multiplier.parameters())
                if entry.dual_lr is None:
                    shared.extend(params)
                else:
                    own.append({"params": params, "lr": entry.dual_lr})
        if not shared and not own:
            return None
        return torch.optim.SGD([{"params": shared, "lr": lr}, *own], lr=lr, maximize=True)

    def nonfinite_constraints(self, cmp_state: cooper.cmp.CMPState | None = None) -> list[str]:
        """The constraints whose violation on ``cmp_state`` (if given) or whose multiplier is not finite, yours
        first, each sorted: the likely cause of a NaN loss or Lagrangian."""
        bad = {n for n, v in self.named_multiplier_values().items() if not bool(torch.isfinite(v).all())}
        if cmp_state is not None:
            bad.update(
                c.name for c, s in cmp_state.observed_constraints.items() if not bool(torch.isfinite(s.violation).all())
            )
        yours = set(self.user_constraint_names)
        return sorted(bad, key=lambda name: (name not in yours, name))

    def named_multiplier_values(self) -> dict[str, torch.Tensor]:
        """Current multiplier values by constraint name."""
        return {name: m.weight.detach().reshape(-1) for name, m in self.named_multipliers()}

    def step_metrics(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """What a training loop logs of one step: ``loss/train``, and ``violation/<name>`` and
        ``multiplier/<name>`` of every user constraint (with ``strict_fn``: the violation is its measurement, and
        ``surrogate/<name>`` is ``fn``'s value); reads them to the host. A vector inequality logs its
        largest entry (it holds when that is ≤ 0), a vector equality its norm (it holds at 0); a vector
        constraint's multiplier, its norm.

        Args:
            cmp_state: A step's state (``step.cmp_state`` of what ``backward()`` returned).
        """
        metrics = {"loss/train": float(cmp_state.loss.detach())}
        users = set(self.user_constraint_names)
        for constraint, state in cmp_state.observed_constraints.items():
            if constraint.name in users:
                equality = constraint.constraint_type == cooper.ConstraintType.EQUALITY
                if state.strict_violation is not None:  # the measurement; fn is its surrogate
                    metrics[f"surrogate/{constraint.name}"] = violation_summary(state.violation, equality)
                measured = state.violation if state.strict_violation is None else state.strict_violation
                metrics[f"violation/{constraint.name}"] = violation_summary(measured, equality)
        for name, value in self.named_multiplier_values().items():
            if name in users:
                metrics[f"multiplier/{name}"] = float(value[0] if value.numel() == 1 else value.norm())
        return metrics


@outside_compile
def _strict_violations(
    problem: SparsityProblem, measured: dict[str, _Registered], batch: Batch
) -> dict[str, torch.Tensor]:
    """The proxy measurements (``strict_fn``, no gradient: what the dual steps read) of ``measured``, measured
    eagerly between the graphs of a step function you compile: traced, one per constraint, they recompiled."""
    return {name: problem._strict(name, entry, batch) for name, entry in measured.items()}


def violation_summary(violation: torch.Tensor, equality: bool) -> float:
    """One number of a violation: a vector inequality's largest entry (it holds when that is <= 0), a vector
    equality's norm (it holds at 0)."""
    violation = violation.detach().reshape(-1)
    if violation.numel() > 1:
        violation = violation.norm() if equality else violation.max()
    return float(violation.reshape(-1)[0])


def _entries(name: str, entry: _Registered, value: Any, key: str = "") -> torch.Tensor:
    """A constraint's value on a batch (``fn``'s, or with ``key="strict_fn"`` its measurement) in its multiplier's
    dtype, a user constraint's checked (a tensor, differentiable for ``fn``, as many entries as it was sized with; a
    measurement taken elsewhere, a latency on the CPU, joins its multiplier's device), all-reduced over the ranks if it
    depends on the batch."""
    value = _in_multiplier_dtype(entry, value)
    if entry.user:
        weight = entry.constraint.multiplier.weight
        value = checked_violation(name, value, key)
        if key:
            value = value.to(weight.device)
        elif torch.is_grad_enabled() and not value.requires_grad:
            raise UserInputError(
                f"constraint {name!r} has no gradient path to the model's parameters (its value does not "
                "require grad): a constraint must be differentiable in what the optimizer updates "
                "(no .item(), .detach() or float())"
            )
        if value.numel() != weight.numel():
            who = f"constraint {name!r}" + (f" {key}" if key else "")
            raise UserInputError(
                f"{who} returned {value.numel()} entries on this batch, but it was sized with {weight.numel()} (one "
                "multiplier per entry): return as many entries on every batch (e.g. 0 for a class the batch lacks)"
            )
    return synchronised(value) if entry.data_dependent else value


def _in_multiplier_dtype(entry: _Registered, value: Any) -> Any:
    """A violation in its multiplier's dtype (a model moved to float64 after ``make`` keeps float32 multipliers;
    Cooper's Lagrangian needs one dtype). A no-op while the two agree, and for what is not a tensor (checked
    after)."""
    multiplier = entry.constraint.multiplier
    if multiplier is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    return value.to(multiplier.weight.dtype)
