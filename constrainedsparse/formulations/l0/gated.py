r"""Hard-concrete gates on every target: the machinery ``l0`` and ``l0-penalty`` share, and ``l0-penalty``.

Every target weight is gated, :math:`\theta_n = \tilde\theta_n \odot z_n` (see
:mod:`constrainedsparse.gates`); the gates' :math:`\log\alpha` join the user's primal optimizer
as a parameter group of their own (``gate_lr``, no weight decay, momentum ``gate_momentum``).
``l0-penalty`` is the penalized baseline: the same gates, loss :math:`f + \lambda\,\mathbb{E}[\text{density}]`
with a fixed ``lmbda`` (a penalty of the problem, :meth:`SparsityProblem.add_penalty`), no constraint.
See :mod:`constrainedsparse.formulations.l0` for the hard masks and the median rule.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import cooper
import torch

from constrainedsparse.errors import user_stacklevel
from constrainedsparse.formulations.base import Formulation
from constrainedsparse.formulations.checks import check_dense_gradients
from constrainedsparse.formulations.factory import register_formulation
from constrainedsparse.formulations.l0.config import L0PenaltyConfig
from constrainedsparse.gates import HardConcreteGate, apply_gates, clamp_log_alpha_, find_gate
from constrainedsparse.masks import canonical_parameters, remove_parametrization
from constrainedsparse.sets import StructuredGroups, TopK
from constrainedsparse.targets import TargetParam

__all__ = ["Gated", "L0Penalty", "PENALTY"]

PENALTY = "l0_penalty"
TEST_TEMPERATURE = 0.25
"""Temperature :math:`\\tau` of the smooth test-time density (:meth:`Gated.soft_test_density`): 4x sharper in
:math:`\\log\\alpha` than :math:`P(z \\ne 0)`, which is the same sigmoid at :math:`\\tau = 1` (median rule)."""


class Gated(Formulation):
    """Shared machinery of ``l0`` and ``l0-penalty``: gates on every target, their own parameter group
    in the primal optimizer, density bookkeeping, hard masks from the test-time gates."""

    adds_parameters = True

    def attach(self) -> None:
        """Gates every target (one shared generator), adds their group to the optimizer, then :meth:`add_terms`."""
        problem = self.problem
        check_dense_gradients(self.name, problem.targets)
        for t in problem.targets:
            density = 1.0 - t.sparsity
            if not (0.0 < density <= 1.0):
                raise ValueError(f"target density 1 - sparsity of {t.name} must be in (0, 1], got {density}")
            if self.config.grouping == "structured" and not isinstance(t.feasible_set, TopK):
                raise ValueError(
                    f"grouping=structured gates whole input neurons / output channels under a --sparsity budget; "
                    f"{t.name} has the pattern {t.target.describe()}, whose groups differ from the gates': give "
                    "a sparsity level without a pattern (--sparsity without --pattern; SparsityConfig(sparsity=...)): "
                    "the purge then shrinks the model; or grouping=unstructured"
                )
        # Sizes read once: every access to a gated weight in train mode draws a fresh gate sample.
        self.sizes = {t.name: t.tensor.numel() for t in problem.targets}
        self.steps_done = 0
        device = next(problem.model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(torch.initial_seed()) % 2**63)
        self.gates: dict[str, HardConcreteGate] = apply_gates(
            problem.targets, self.config.grouping, self.config.droprate_init, self.generator, self.config.test_rule
        )
        if any("initial_lr" in group for group in self.optimizer.param_groups):
            warnings.warn(
                f"{self.name} adds its gates' parameter group to an optimizer that a scheduler already holds (its "
                "groups carry initial_lr): that scheduler does not know the group (LinearLR skips it, LambdaLR and "
                "OneCycleLR raise in step()); build the scheduler after make()",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        self.optimizer.add_param_group(self._gate_group())
        if isinstance(self.optimizer, torch.optim.SGD) and self.config.gate_lr == self.config.keys()["gate_lr"].default:
            count = sum(gate.log_alpha.numel() for gate in self.gates.values())
            warnings.warn(
                f"{self.name}'s {count} gates (log alpha) learn in a group of your SGD at gate_lr="
                f"{self.config.gate_lr:g}: the density terms give each a gradient of order 1/{count}, and SGD's steps "
                "scale with it (Adam's do not), so they barely move (a 50k-gate MLP stayed at density 0.998 for 60 "
                "epochs): use Adam or AdamW, or raise gate_lr by orders of magnitude (1000 reached the target there)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        self._eval_warned = False  # a gated layer seen in eval mode by backward(), warned once
        self._schedule_warned = False  # a scheduler that set the gates' rate from its own arguments, warned once
        # The masks of the last hard_masks(), with the gates and weights they came from: finalize() right after it
        # bakes the weights with them instead of selecting again (forgotten at the next Lagrangian).
        self._last_masks: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None
        # An optimizer step forgets them too: a fused one changes the weights without their in-place version.
        self._forget_masks_hook = self.optimizer.register_step_post_hook(self._forget_masks)
        self.add_terms()

    def before_lagrangian(self) -> None:
        """A new Lagrangian: every gate draws its noise (one draw per gate and Lagrangian, outside the forward)."""
        super().before_lagrangian()
        self._last_masks = None
        for gate in self.gates.values():
            gate.redraw() if gate.training else gate.release_noise()  # an eval-mode Lagrangian draws nothing

    def backward_scope(self, scale: float, scaler: Any) -> contextlib.AbstractContextManager[None]:
        """Warns once when a gated layer ran in eval mode: its gates took their test-time value (no sample),
        so the loss gave log α no gradient."""
        if not self._eval_warned and any(not t.module.training for t in self.problem.targets):
            self._eval_warned = True
            warnings.warn(
                f"{self.name}: backward() of a step run with a gated layer in eval mode: its gates took their "
                "deterministic test-time value and the loss gives their log alpha no gradient; call model.train() "
                "before training steps",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return self._releasing_noise(super().backward_scope(scale, scaler))

    @contextlib.contextmanager
    def _releasing_noise(self, scope: contextlib.AbstractContextManager[None]) -> Iterator[None]:
        """``scope``, then the gates' noise freed (a tensor of the gates' shape each: the backward, and any forward
        activation checkpointing recomputes in it, has used it)."""
        with scope:
            yield
        for gate in self.gates.values():
            gate.release_noise()

    def default_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam over the weights with ``weight_decay`` (the gates join as their own group)."""
        weights = canonical_parameters(self.problem.model)
        return torch.optim.Adam(weights, lr=lr, weight_decay=self.config.weight_decay)

    def _gate_group(self) -> dict[str, Any]:
        """The gates' parameter group: ``gate_lr``, no weight decay, momentum ``gate_momentum``.

        The momentum goes where the optimizer keeps it: Adam's/AdamW's :math:`\\beta_1` (with the
        optimizer's own :math:`\\beta_2`), SGD's ``momentum`` (no Nesterov without momentum).
        """
        defaults = self.optimizer.defaults
        group: dict[str, Any] = {"params": [gate.log_alpha for gate in self.gates.values()], "lr": self.config.gate_lr}
        if "weight_decay" in defaults:
            group["weight_decay"] = 0.0
        if "betas" in defaults:
            group["betas"] = (self.config.gate_momentum, defaults["betas"][1])
        if "momentum" in defaults:
            group["momentum"] = self.config.gate_momentum
            if "nesterov" in defaults and self.config.gate_momentum == 0:
                group["nesterov"] = False
        return group

    # --- densities ------------------------------------------------------------------------------

    def layer_expected_density(self) -> dict[str, torch.Tensor]:
        """Expected density :math:`\\bar P_n` of every target (differentiable in :math:`\\log\\alpha`)."""
        return {name: gate.expected_density() for name, gate in self.gates.items()}

    def expected_density(self) -> torch.Tensor:
        """Model-wise expected density :math:`\\sum_n |\\theta_n| \\bar P_n / \\sum_n |\\theta_n|`."""
        sizes = self.sizes
        total = sum(sizes.values())
        return sum(sizes[name] * d for name, d in self.layer_expected_density().items()) / total

    def soft_test_density(self) -> torch.Tensor:
        """Model-wise smooth test-time density (:meth:`HardConcreteGate.soft_test_density`), size-weighted."""
        sizes = self.sizes
        total = sum(sizes.values())
        return sum(sizes[name] * gate.soft_test_density(TEST_TEMPERATURE) for name, gate in self.gates.items()) / total

    @torch.no_grad()
    def hard_test_density(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-wise ``(T, P̄)`` measured on device (no host sync): the share of weights whose gate is above the
        test rule's threshold (:meth:`HardConcreteGate.test_threshold`) and the expected density."""
        sizes = self.sizes
        total = sum(sizes.values())
        test = sum(sizes[n] * g.measured_test_density() for n, g in self.gates.items())
        expected = sum(sizes[n] * g.measured_expected_density() for n, g in self.gates.items())
        return test / total, expected / total

    def target_density(self) -> float:
        """Model-wise level :math:`\\epsilon = \\sum_n |\\theta_n|(1 - s_n) / \\sum_n |\\theta_n|`."""
        sizes = [(self.sizes[t.name], 1.0 - t.sparsity) for t in self.problem.targets]
        return sum(n * e for n, e in sizes) / sum(n for n, _ in sizes)

    @torch.no_grad()
    def layer_test_density(self) -> dict[str, float]:
        """Fraction of weights whose median-rule gate is nonzero, per target."""
        return {name: float(gate.test_density()) for name, gate in self.gates.items()}

    @torch.no_grad()
    def test_density(self) -> float:
        """Model-wise fraction of weights whose median-rule gate is nonzero."""
        sizes = self.sizes
        dens = self.layer_test_density()
        return sum(sizes[n] * dens[n] for n in dens) / sum(sizes.values())

    # --- Formulation hooks ----------------------------------------------------------------------

    def add_terms(self) -> None:
        """Registers constraints / penalties on the problem (after the gates exist)."""

    def after_step(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Clamps :math:`\\log\\alpha`, then :meth:`after_gated_step`; every ``log_interval`` steps the densities."""
        clamp_log_alpha_(self.gates.values())
        self.steps_done += 1
        self._check_gate_schedule()
        metrics = self.after_gated_step(cmp_state)
        if self.steps_done % self.config.log_interval == 0:
            metrics.update(self.dynamics())
            metrics.update(self.interval_metrics(cmp_state))
        return metrics

    def _check_gate_schedule(self) -> None:
        """Warns once when OneCycleLR peaks the gates' group where it peaks another group, not at ``gate_lr``: one
        ``max_lr`` sets every group's, so the gates learn at the weights' rate (a 6-epoch run stayed at expected
        density 0.998 against a 0.1 target). Multiplicative schedulers keep ``gate_lr``."""
        if self._schedule_warned:
            return
        first = next(iter(self.gates.values())).log_alpha
        groups = self.optimizer.param_groups  # looked up each time: load_state_dict replaces the group dicts
        gates = next(group for group in groups if group["params"] and group["params"][0] is first)
        peak = gates.get("max_lr")  # OneCycleLR's, per group
        others = [group.get("max_lr") for group in groups if group is not gates]
        if peak is None or math.isclose(float(peak), self.config.gate_lr, rel_tol=1e-6) or peak not in others:
            return
        self._schedule_warned = True
        warnings.warn(
            f"{self.name}: a OneCycleLR peaks the gates' group at max_lr={float(peak):g}, not at gate_lr="
            f"{self.config.gate_lr:g}: the gates learn at the weights' rate and may barely move; give one max_lr per "
            "group, the gates' last, and keep gate_momentum: OneCycleLR(optimizer, max_lr=[lr, gate_lr], "
            "cycle_momentum=False)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def after_gated_step(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Hook after every primal(-dual) step; returns metrics to log at this step."""
        return {}

    def interval_metrics(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Extra metrics logged every ``log_interval`` steps (none here)."""
        return {}

    @torch.no_grad()
    def dynamics(self) -> dict[str, float]:
        """Expected (``l0_density/``) and median-rule (``l0_test_density/``) densities per target."""
        metrics = {"l0/expected_density": float(self.expected_density()), "l0/test_density": self.test_density()}
        for name, value in self.layer_expected_density().items():
            metrics[f"l0_density/{name}"] = float(value)
        for name, value in self.layer_test_density().items():
            metrics[f"l0_test_density/{name}"] = value
        return metrics

    @torch.no_grad()
    def on_end_epoch(self, epoch: int) -> dict[str, float]:
        """Densities and gate-probability summaries :math:`P(z \\ne 0)` (mean/min/max, share > 0.5)."""
        metrics = self.dynamics()
        for name, gate in self.gates.items():
            p = gate.prob_nonzero()
            metrics[f"gates/p_mean/{name}"] = float(p.mean())
            metrics[f"gates/p_min/{name}"] = float(p.min())
            metrics[f"gates/p_max/{name}"] = float(p.max())
            metrics[f"gates/p_above_half/{name}"] = float((p > 0.5).float().mean())
        return metrics

    @torch.no_grad()
    def histograms(self) -> dict[str, torch.Tensor]:
        """:math:`P(z \\ne 0)` of every gate, per target (``gates/p/<param>``; wandb histograms)."""
        return {f"gates/p/{name}": gate.prob_nonzero().detach() for name, gate in self.gates.items()}

    def _gated(self, target: TargetParam) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stored weight, test-time gate over the weight)`` of a target."""
        gate = self.gates[target.name]
        weight = target.module.parametrizations[target.param_name].original.detach()
        return weight, gate.expand(gate.test_gate().detach()).expand_as(weight)

    def _score(self, target: TargetParam) -> torch.Tensor:
        r"""The hard-mask score of a target: gated-on weights by :math:`|\tilde\theta \hat z|` above every gated-off
        one, gated-off ones by :math:`|\tilde\theta|`."""
        weight, z = self._gated(target)
        magnitude = weight.abs().to(torch.float64)
        offset = float(magnitude.max()) + 1.0
        # float64: in float32 the offset (~1) would round |θ z| to steps of ~1e-7, turning the ranking of the
        # gated-on weights into ties (broken by index) and sending every selection through the tie-breaking pass.
        on = (weight * z).abs_().to(torch.float64).add_(offset)
        return torch.where(z > 0, on, magnitude, out=magnitude)

    @torch.no_grad()
    def compute_hard_masks(self) -> dict[str, torch.Tensor]:
        r"""Feasible-set masks of the test-time gated weights (see the module docstring).

        With ``grouping=structured`` the masks keep whole groups (input columns of Linear, output
        channels of Conv): :meth:`_group_mask` keeps :math:`\mathrm{round}((1 - s)\,n_{groups})`
        groups per target, so the achieved sparsity is the group-granular one (e.g. 3 of 8 columns
        kept is 0.625, not 0.6). Other patterns (``--pattern``) keep their own feasible set.
        """
        if self.config.grouping == "structured":  # whole groups for the plain top-k (--sparsity) targets
            return {
                t.name: self._group_mask(t) if isinstance(t.feasible_set, TopK) else t.feasible_set.mask(self._score(t))
                for t in self.problem.targets
            }
        return {t.name: t.feasible_set.mask(self._score(t)) for t in self.problem.targets}

    def _group_rms(self, target: TargetParam) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(rms, z)`` per group of a structured target: :math:`\|\tilde\theta_g\|_2/\sqrt{m}` of its
        stored weights (:math:`m` weights per group) and its median-rule gate :math:`\hat z_g` (float64)."""
        gate = self.gates[target.name]
        norms = self._group_set(target).group_norms(target.module.parametrizations[target.param_name].original)
        return norms / math.sqrt(gate.group_size), gate.test_gate().detach().to(torch.float64)

    def _expand_groups(self, target: TargetParam, keep: torch.Tensor) -> torch.Tensor:
        """A group mask broadcast to a weight mask."""
        weight = target.module.parametrizations[target.param_name].original
        return self.gates[target.name].expand(keep).expand_as(weight).clone()

    def _group_mask(self, target: TargetParam) -> torch.Tensor:
        r"""Whole-group mask from the shared structured set: groups with :math:`\hat z > 0` ranked by
        the norm of their gated weights above gated-off groups (ranked by the norm of their stored
        weights), :math:`\mathrm{round}((1 - s)\,n_{groups})` kept."""
        rms, z = self._group_rms(target)
        offset = float(rms.max()) + 1.0  # rms * z >= 0, so gated-on groups rank above the rest
        score = torch.where(z > 0, rms * z + offset, rms)
        weight = target.module.parametrizations[target.param_name].original
        return self._group_set(target).group_mask(score, weight).clone()

    @classmethod
    def _group_set(cls, target: TargetParam) -> StructuredGroups:
        r"""The whole groups a structured target keeps at its level: :math:`\mathrm{round}((1 - s)\,n_{groups})`."""
        # The stored tensor's shape: reading the gated one would draw a gate sample.
        return StructuredGroups.at_level(target.stored.shape, target.sparsity, dim=cls._group_dim(target))

    @staticmethod
    def _group_dim(target: TargetParam) -> int:
        """The dimension a structured gate groups: input columns of Linear (1), output channels of Conv (0)."""
        return 1 if isinstance(target.module, torch.nn.Linear) else 0

    def summary_extra(self) -> dict[str, Any]:
        """``expected_density`` (model-wise), ``layer_density`` and their median-rule counterparts."""
        with torch.no_grad():
            return {
                "expected_density": float(self.expected_density()),
                "layer_density": {name: float(d) for name, d in self.layer_expected_density().items()},
                "target_density": self.target_density(),
                "test_density": self.test_density(),
                "layer_test_density": self.layer_test_density(),
            }

    def _baked(self, target: TargetParam, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight :meth:`detach` leaves: :math:`\\tilde\\theta \\odot \\hat z`, gate 1 where the mask re-admits."""
        weight, z = self._gated(target)
        return weight * torch.where((z == 0) & masks[target.name], torch.ones_like(z), z)

    @contextlib.contextmanager
    def preview_scope(self, masks: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model as :meth:`detach` + ``hard_prune`` would leave it: baked weights under unit gates."""
        saved = []
        with torch.no_grad():
            for t in self.problem.targets:
                gate = find_gate(t.module, t.param_name)
                if gate is None:
                    continue
                stored = t.stored
                saved.append((gate, stored, stored.detach().clone()))
                stored.copy_(self._baked(t, masks) * masks[t.name])
                gate.test_override = torch.ones((), device=stored.device)
        try:
            yield
        finally:
            with torch.no_grad():
                for gate, stored, value in saved:
                    stored.copy_(value)
                    gate.test_override = None

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """:meth:`Formulation.hard_masks`, remembered for a :meth:`finalize` that follows before the next step."""
        masks = super().hard_masks()
        self._last_masks = (self._mask_inputs(), {name: mask.clone() for name, mask in masks.items()})
        return masks

    def _forget_masks(self, *args: Any) -> None:
        """Drops the masks of the last :meth:`hard_masks` (an optimizer step's post hook)."""
        self._last_masks = None

    def mask_sources(self) -> dict[str, torch.Tensor]:
        """The stored weights and every gate's log α."""
        gates = {f"{name} (its gates' log alpha)": gate.log_alpha for name, gate in self.gates.items()}
        return super().mask_sources() | gates

    def _mask_inputs(self) -> tuple[int, ...]:
        """Storage and in-place version of every gate's log α and stored weight (what the hard masks depend on)."""
        tensors = [tensor for t in self.problem.targets for tensor in (self.gates[t.name].log_alpha, t.stored)]
        return tuple(value for tensor in tensors for value in (tensor.data_ptr(), tensor._version))

    @torch.no_grad()
    def detach(self) -> None:
        r"""Removes the gates, baking :math:`\tilde\theta \odot \hat z` into plain weights.

        Weights the hard mask re-admits although their gate is 0 keep :math:`\tilde\theta`. The masks are those of
        the last :meth:`hard_masks` when no Lagrangian, optimizer step or in-place change of a weight or log α came
        since (one selection for ``hard_masks(); finalize()``; a write through ``.data`` is not seen).
        """
        self._forget_masks_hook.remove()
        last, self._last_masks = self._last_masks, None
        gated = [t for t in self.problem.targets if find_gate(t.module, t.param_name) is not None]
        masks: dict[str, torch.Tensor] = {}
        if gated:  # none under discard(), which took the gates off first
            masks = last[1] if last is not None and last[0] == self._mask_inputs() else self.compute_hard_masks()
        for t in gated:
            baked = self._baked(t, masks)
            remove_parametrization(t.module, t.param_name, leave_parametrized=False)
            getattr(t.module, t.param_name).copy_(baked)
        gates = {id(gate.log_alpha) for gate in self.gates.values()}
        for group in self.optimizer.param_groups:  # the gates' group stays (a scheduler counts groups), emptied
            for parameter in group["params"]:
                if id(parameter) in gates:
                    self.optimizer.state.pop(parameter, None)
            group["params"] = [p for p in group["params"] if id(p) not in gates]
        self.gates = {}
        super().detach()

    @property
    def purges(self) -> bool:
        """Structured gates remove whole input columns / output channels: the model can be purged."""
        return self.config.grouping == "structured"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_done": self.steps_done, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_done = state["steps_done"]
        self.generator.set_state(state["generator"])


@register_formulation("l0-penalty")
class L0Penalty(Gated):
    """Penalized baseline: the same gates, loss + lmbda * expected density, no constraint."""

    description = "hard-concrete L0 gates with a fixed penalty lmbda * expected density (baseline)"
    Config = L0PenaltyConfig
    config: L0PenaltyConfig

    def add_terms(self) -> None:
        """Adds :math:`\\lambda\\,\\mathbb{E}[\\text{density}]` to the loss (:meth:`SparsityProblem.add_penalty`)."""
        lmbda = self.config.lmbda
        self.problem.add_penalty(PENALTY, lambda model: lmbda * self.expected_density())

    def detach(self) -> None:
        """Removes the penalty, then the gates."""
        self.problem.remove_penalty(PENALTY)
        super().detach()
