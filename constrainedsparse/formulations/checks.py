"""What a formulation checks of its caller's input: the optimizer and rates of ``make``, the arguments of
the lifecycle calls, and the hard masks of a formulation defined outside the package.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils import parametrize

from constrainedsparse.claims import attached_formulation
from constrainedsparse.errors import NonFiniteLossError, UserInputError, as_float, is_number, is_ours, user_stacklevel
from constrainedsparse.masks import foreign_parametrization
from constrainedsparse.sets.base import set_text

if TYPE_CHECKING:
    import cooper

    from constrainedsparse.problem import SparsityProblem

__all__ = [
    "check_backward_call",
    "check_covers",
    "check_dense_gradients",
    "check_state",
    "LastStep",
    "check_finite_step",
    "check_finite_weights",
    "check_hard_masks",
    "check_rate",
    "described",
    "warn_schedule_unfinished",
]


@dataclasses.dataclass
class LastStep:
    """What the lifecycle keeps of the last step to check once an epoch (detached: no graph kept alive).

    Attributes:
        loss: The objective on the step's batch.
        lagrangian: The primal Lagrangian (``None`` without constraints: the loss itself).
        state: A weak reference to the step's ``CMPState`` (to name a constraint that was not finite while
            the caller still holds the step).
    """

    loss: torch.Tensor
    lagrangian: torch.Tensor | None = None
    state: weakref.ref[cooper.cmp.CMPState] | None = None


def check_finite_step(last: LastStep | None, problem: SparsityProblem, when: str) -> None:
    """The last step's loss and Lagrangian are finite (once an epoch, not per step: one host sync, not one per step).

    Once the weights or multipliers hold a NaN/inf every later loss does too, so the last step's
    loss catches a run that has diverged; a single skipped step (``GradScaler`` overflow) does not. A finite
    loss beside a non-finite Lagrangian is a constraint (or multiplier) that was not finite: the step took
    its gradient. The constraint is named by its multiplier, or by its value while the caller still holds the step.

    Raises:
        NonFiniteLossError: Naming the value and ``when`` it was seen (``"at the last step of epoch 2"``).
    """
    if last is None:
        return
    if not bool(torch.isfinite(last.loss).all()):
        value = last.loss.reshape(-1)[0].item() if last.loss.numel() else last.loss
        half = any(p.dtype == torch.float16 for p in problem.model.parameters())
        yours = set(problem.user_constraint_names)
        odd = [n for n in problem.nonfinite_constraints(last.state() if last.state is not None else None) if n in yours]
        either = f"; not finite either: constraint {', '.join(map(repr, odd))}" if odd else ""
        raise NonFiniteLossError(
            f"the loss is {value} {when}: the weights or multipliers are no longer finite (a step took a non-finite "
            f"gradient, from the loss or a constraint{either}); "
            + (
                "the model's weights are float16, whose range a step (and Adam's eps 1e-8) easily leaves: keep the "
                "weights in float32 and run the forward under torch.autocast, or "
                if half
                else ""
            )
            + "lower lr or dual_lr, clip the gradients, or continue from a checkpoint"
        )
    if last.lagrangian is None or bool(torch.isfinite(last.lagrangian).all()):
        return
    odd = problem.nonfinite_constraints(last.state() if last.state is not None else None)  # yours first
    if odd:
        which = f"constraint {odd[0]!r} is not (its value or multiplier)"
        fix = (
            "make it finite wherever the weights can go (no sqrt or log of a value that reaches 0) and on every "
            "batch (one non-finite input makes a batch constraint's violation, and so its multiplier, NaN for good)"
        )
    else:
        which = "the Lagrangian was not (a constraint or multiplier)"
        fix = "make every constraint finite wherever the weights can go, or lower dual_lr"
    raise NonFiniteLossError(
        f"the loss is finite but {which} {when}: the step took a non-finite gradient from it; {fix}, then continue "
        "from a checkpoint"
    )


def check_finite_weights(tensors: Mapping[str, torch.Tensor], when: str) -> None:
    """The tensors the masks are computed from are finite (one pass each; where masks are chosen, not per step).

    The last step's loss (:func:`check_finite_step`) was computed before that step's update: a non-finite
    gradient on the last step leaves NaN weights beside a finite loss, and a top-k of NaN scores is no mask.

    Args:
        tensors: By name (:meth:`~constrainedsparse.formulations.Formulation.mask_sources`).
        when: When they are checked (``"at hard_masks()"``).

    Raises:
        NonFiniteLossError: Naming the first tensor that holds a NaN or inf and ``when`` it was seen.
    """
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            half = (
                "it is float16, whose range a step easily leaves: keep the weights in float32 and run the forward "
                "under torch.autocast, or "
                if tensor.dtype == torch.float16
                else ""
            )
            raise NonFiniteLossError(
                f"{name} holds NaN or inf {when}: a step took a non-finite gradient (from the loss or a constraint); "
                f"{half}lower lr or dual_lr, clip the gradients, or continue from a checkpoint"
            )


def check_target_levels(name: str, levels: dict[str, str], saved: dict[str, str]) -> None:
    """A state's targets were at this formulation's levels (a state of other levels has the same shapes).

    Raises:
        ValueError: Naming the first target whose level or pattern differs.
    """
    differ = [target for target in levels if target in saved and saved[target] != levels[target]]
    if differ:
        target = differ[0]
        raise ValueError(
            f"{name}: the state was saved for other targets: {target} at {saved[target]}, here at {levels[target]} "
            "(resolve the targets at the level the run was started with)"
        )


def check_ddp_wrapped(problem: Any) -> bool:
    """Warns when several processes train a model the problem runs unwrapped (``forward_module`` not DDP): each
    rank would then step on its own gradients and the ranks drift apart. Returns ``True`` (checked)."""
    from constrainedsparse import distributed

    if not distributed.is_distributed() or problem.compute_loss is not None:
        return True
    wrapped = any(  # DDP or FSDP or a subclass, also inside a wrapper or torch.compile's module
        cls.__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")
        for m in problem.forward_module.modules()
        for cls in type(m).__mro__
    )
    if not wrapped:
        warnings.warn(
            f"{distributed.world_size()} processes train, but problem.forward_module is not DistributedDataParallel: "
            "the ranks' gradients are not averaged and their models drift apart; set problem.forward_module = "
            "DistributedDataParallel(model) after make() (docs/distributed.md)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return True


def described(value: Any) -> str:
    """A short name of ``value`` for an error line (its type; never a tensor's or list's whole contents)."""
    if isinstance(value, (list, tuple)):
        if not value:
            return f"an empty {type(value).__name__}"
        return f"a {type(value).__name__} of {', '.join(sorted({type(v).__name__ for v in value}))}"
    return type(value).__name__


def check_hard_masks(name: str, targets: Sequence[Any], masks: Any) -> None:
    """A user formulation's ``compute_hard_masks()``: a boolean mask of every target's shape, in its pattern.

    Raises:
        UserInputError: Naming the formulation, the target and what is wrong (the built-in formulations
            are not checked: their masks are feasible by construction, and tested so).
    """
    if not isinstance(masks, dict) or set(masks) != {t.name for t in targets}:
        got = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise UserInputError(
            f"formulation {name!r}: compute_hard_masks() must return {{target name: mask}} for every target "
            f"({', '.join(t.name for t in targets)}), got {got}"
        )
    for t in targets:
        mask = masks[t.name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != t.tensor.shape:
            shown = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UserInputError(
                f"formulation {name!r}: the mask of {t.name} must be a torch.bool tensor of shape "
                f"{tuple(t.tensor.shape)}, got {shown}"
            )
        if not t.feasible_set.contains(mask.to(t.tensor.dtype)):
            raise UserInputError(
                f"formulation {name!r}: the mask of {t.name} is outside its pattern {set_text(t.feasible_set)} "
                f"({int(mask.sum())} of {mask.numel()} kept)"
            )


def check_pattern_masks(targets: Sequence[Any], masks: dict[str, torch.Tensor]) -> None:
    """Hard masks of targets whose pattern was registered outside this package: inside it by its own ``contains``.

    Raises:
        UserInputError: Naming the pattern and the target (its ``mask`` and ``contains`` disagree).
    """
    for t in targets:
        if is_ours(type(t.feasible_set)) or t.feasible_set.contains(masks[t.name].to(t.tensor.dtype)):
            continue
        mask = masks[t.name]
        raise UserInputError(
            f"pattern {t.target.pattern_text()!r} ({set_text(t.feasible_set)}): the hard mask of {t.name} from its "
            f"mask() is outside the set by its contains() ({int(mask.sum())} of {mask.numel()} kept): the two must "
            "agree"
        )


def check_rate(key: str, value: Any) -> None:
    """A learning rate: a finite number > 0."""
    if not is_number(value) or not 0 < value < float("inf"):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")


def check_first_order(optimizer: torch.optim.Optimizer) -> None:
    """The primal optimizer steps once on the gradients one backward left (the split step): one that needs a closure
    (``LBFGS`` evaluates the loss several times a step) or sparse gradients (``SparseAdam``) cannot.

    Raises:
        ValueError: Naming the optimizer and what to use instead.
    """
    name = type(optimizer).__name__
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"optimizer {name} needs a closure at every step (it evaluates the loss several times): a formulation "
            "evaluates the Lagrangian once a step (backward, your step, post_step); use a first-order optimizer "
            "(SGD, Adam, AdamW, ...)"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ValueError(
            "optimizer SparseAdam takes sparse gradients only, and the Lagrangian's are dense: use Adam (or AdamW)"
        )


def check_covers(optimizer: torch.optim.Optimizer, problem: SparsityProblem) -> None:
    """The optimizer must update every targeted tensor (else pruning would train nothing)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for target in problem.targets:
        stored = target.stored
        if id(stored) not in held and not stored.requires_grad:
            raise ValueError(
                f"the optimizer does not hold {target.name}, which is frozen (requires_grad=False): leave it out of "
                "the Targets (exclude), or unfreeze it and build the optimizer over it"
            )
        if id(stored) not in held:
            raise ValueError(
                f"the optimizer does not hold {target.name}: build it over this model's parameters "
                "(model.parameters()), and before make()"
            )


def check_state(name: str, expected: Any, given: Any, optional: frozenset[str] = frozenset()) -> None:
    """``given`` (for ``load_state_dict``) has every key of ``expected`` (this formulation's own
    ``state_dict()``; top-level ``optional`` keys may be absent), and its tensors the same shapes.

    Optimizer states are not compared (their per-parameter entries appear after the first step).

    Raises:
        ValueError: Naming the first missing key or differing shape, before anything is restored.
    """
    if not isinstance(given, dict):
        raise ValueError(f"load_state_dict() takes what {name}'s state_dict() returned, got {described(given)}")
    if given.get("formulation", name) != name:
        raise ValueError(
            f"load_state_dict(): the state is a {given['formulation']!r} formulation's, this one is {name!r}"
        )
    missing = [key for key in expected if key not in given and key not in optional]
    if missing:
        raise ValueError(
            f"load_state_dict(): the state lacks {', '.join(map(repr, missing))}, so it is not a {name} formulation's "
            f"state_dict() (another formulation's, or a model's / a whole checkpoint's?)"
        )
    _same_shapes(name, expected, given, "")
    _same_groups(name, expected.get("dual_optimizer"), given.get("dual_optimizer"))


def _same_groups(name: str, expected: Any, given: Any) -> None:
    """The dual optimizers' param groups hold as many multiplier tensors (else torch refuses mid-restore)."""
    sizes = [len(g["params"]) for g in expected["param_groups"]] if isinstance(expected, dict) else []
    saved = given.get("param_groups") if isinstance(given, dict) else None
    if expected is None or saved is None:
        return
    if not isinstance(saved, list) or [len(g.get("params", [])) for g in saved] != sizes:
        got = [len(g.get("params", [])) for g in saved] if isinstance(saved, list) else saved
        raise ValueError(
            f"load_state_dict(): the state's dual optimizer has multiplier groups of sizes {got}, this {name} "
            f"formulation's {sizes}: it was saved with other constraints or settings (a constraint given a dual_lr "
            "of its own, or no longer, has a group of its own)"
        )


def _same_shapes(name: str, expected: Any, given: Any, path: str) -> None:
    if isinstance(expected, torch.Tensor):
        if not isinstance(given, torch.Tensor) or given.shape != expected.shape:
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(
                f"load_state_dict(): {path} is {got} in the state, {tuple(expected.shape)} here: the state was "
                f"saved for other targets or layer sizes than this {name} formulation's"
            )
    elif isinstance(expected, dict) and isinstance(given, dict):
        extra = [key for key in given if key not in expected and "optimizer" not in str(key)]
        if path.startswith("cmp/") and extra:  # a multiplier or penalty coefficient this problem does not have
            raise ValueError(
                f"load_state_dict(): the state has {path}/{extra[0]}, which this {name} formulation lacks: it was "
                "saved with other targets, constraints or settings"
            )
        for key, value in expected.items():
            if "optimizer" in str(key):
                continue
            if key not in given:
                if path:  # a nested entry (a multiplier, a target's Z) of another problem
                    raise ValueError(
                        f"load_state_dict(): the state has no {path}/{key}: it was saved for other targets or "
                        f"constraints than this {name} formulation's"
                    )
                continue
            _same_shapes(name, value, given[key], f"{path}/{key}" if path else str(key))


def checked_scale(what: str, scale: Any) -> float:
    """A Lagrangian's scale (``1 / accumulation steps``) as a ``float``: a finite number > 0 (NumPy's too).

    Raises:
        ValueError: Naming ``what`` and the value.
    """
    value = as_float(scale)
    if value is None or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a finite number > 0 (1 / accumulation steps), got {scale!r}")
    return value


def check_backward_call(scale: Any, scaler: Any) -> float:
    """The arguments of ``backward()``, and that autograd records here; returns ``scale`` as a ``float``.

    Raises:
        ValueError: Inside ``torch.no_grad()`` / ``torch.inference_mode()``, for a ``scale`` that is not a finite
            number > 0, or a ``scaler`` without a ``scale`` method.
    """
    if not torch.is_grad_enabled():
        raise ValueError(
            "backward() inside torch.no_grad() or torch.inference_mode(): autograd records nothing there to "
            "backpropagate; call it where gradients are enabled (to evaluate, call compute_lagrangian() there)"
        )
    value = checked_scale("backward(scale=...)", scale)
    if scaler is not None and not callable(getattr(scaler, "scale", None)):
        raise ValueError(f"backward(scaler=...) must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
    return value


def warn_schedule_unfinished(name: str, fraction: float, num_epochs: int) -> None:
    """Warns when ``finalize()`` finds the formulation's sparsity schedule at ``fraction`` < 1 of the target: a loop
    that stopped early, whose hard prune jumps to the target at once."""
    if fraction < 1.0:
        warnings.warn(
            f"{name}: finalize() with its sparsity schedule at {fraction:.3g} of the target (setup() declared "
            f"{num_epochs} epochs): the hard prune removes the rest at once; a loop that stops early calls setup() "
            "again with the epochs it trains",
            stacklevel=user_stacklevel(),
        )


def warn_uneven_levels(targets: Sequence[Any], one_budget: bool) -> None:
    """``l0``'s model scope, targets given different levels: its one density budget keeps only their total
    (``one_budget``: the hard masks share it too; else each target is masked at its level, after gates trained for
    the total)."""
    levels: dict[float, list[str]] = {}
    for t in targets:
        levels.setdefault(t.sparsity, []).append(t.name)
    if len(levels) > 1:
        shown = ", ".join(f"{s:g} ({n[0]}" + (f", +{len(n) - 1})" if len(n) > 1 else ")") for s, n in levels.items())
        hard = (
            "one budget, their total, whose split follows the gates"
            if one_budget
            else "each target's own level (a target has a pattern), after gates trained for their total"
        )
        warnings.warn(
            f"l0 scope=model holds one density budget over targets given different levels ({shown}): the hard "
            f"prune keeps {hard}; scope=layer holds every target at its own level",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def check_dense_gradients(name: str, targets: Sequence[Any]) -> None:
    """No target gets sparse gradients (``nn.Embedding(sparse=True)``): ``slr``/``admm`` add the W = Z penalty to
    the gradient, ``l0`` multiplies the weight by its gates, and neither works on a sparse gradient.

    Raises:
        ValueError: Naming the first such target.
    """
    for target in targets:
        if isinstance(target.module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and target.module.sparse:
            raise ValueError(
                f"{name} needs dense gradients, but {target.name} belongs to an {type(target.module).__name__} with "
                "sparse=True: build it with sparse=False, exclude it from the Targets, or use magnitude"
            )


def check_unparametrized(name: str, targets: Sequence[Any]) -> None:
    """No target carries masks or gates already, except a live formulation's (:func:`~constrainedsparse.claims.
    claim_targets` names that one): a formulation built on the user's masks (``apply_masks`` for a masked
    fine-tuning) would override, stack on or, refused part-way, remove them.

    Raises:
        ValueError: Naming the first such target and the way out.
    """
    for target in targets:
        parametrized = parametrize.is_parametrized(target.module, target.param_name)
        if not parametrized or attached_formulation(target) is not None:
            continue
        foreign = foreign_parametrization(target)
        if foreign is None:
            raise ValueError(
                f"{name}: {target.name} carries masks already (apply_masks): keep them with "
                "hard_prune(targets, masks) or take them off with remove_masks(targets) before make()"
            )
        raise ValueError(  # gates on a copy of a model made while its formulation was attached (no claim)
            f"{name}: {target.name} carries a {foreign} parametrization already (a copy of the model made while a "
            "formulation was attached keeps its gates): prune the model whose formulation finalize() releases, or a "
            "copy made before make()"
        )
