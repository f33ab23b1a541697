r"""``l0``: controlled sparsity with hard-concrete gates and expected-density constraints.

After Gallego-Posada, Ramirez, Erraqabi, Bengio & Lacoste-Julien, *Controlled Sparsity via
Constrained Optimization* (NeurIPS 2022). Every target weight is gated,
:math:`\theta_n = \tilde\theta_n \odot z_n` (see :mod:`constrainedsparse.gates`), and the problem is

.. math::
    \min_{\tilde\theta, \log\alpha} \ \mathbb{E}_z\, f(\tilde\theta \odot z) \quad \text{s.t.}\quad
    \frac{\mathbb{E}\|z_g\|_0}{\#(\theta_g)} - \epsilon_g \le 0,

with :math:`\epsilon_g = 1 - s_g` for the target sparsity :math:`s_g`. ``scope=model`` (default)
has one constraint over all targets, the expected density weighted by layer sizes,
:math:`\sum_n |\theta_n| \bar P_n / \sum_n |\theta_n| \le \sum_n |\theta_n|(1 - s_n)/\sum_n |\theta_n|`;
``scope=layer`` has one constraint per target. Each is a Cooper inequality constraint with the
Lagrangian formulation and a :class:`~constrainedsparse.multipliers.RestartingMultiplier`
(``density_constraint=two-sided`` adds the lower bound :math:`\epsilon - \bar P \le 0` to each,
with its own restarting multiplier, for users who want exactly :math:`\epsilon`;
``density_constraint=equality`` makes each a Cooper equality with a multiplier free in sign); the
primal step (Adam; gates in their own parameter group with ``gate_lr``, no weight decay and no
momentum by default) and
the dual step (``SGD(maximize=True)``, step ``density_dual_lr`` on the density multipliers and ``dual_lr`` on the
user's, :math:`\lambda \leftarrow [\lambda + \eta g]_+`; no projection for an equality)
are simultaneous (:class:`cooper.optim.SimultaneousOptimizer`). With ``dual_restarts`` (default) a
satisfied constraint's multiplier is reset to 0 after the dual step.

``l0-penalty`` is the penalized baseline: the same gates and optimizer, no constraint, loss
:math:`f + \lambda\,\mathbb{E}[\text{density}]` with a fixed ``lmbda``.

**Hard masks and the median rule.** The test-time gate is the median rule :math:`\hat z`; its
density is logged (``l0_test_density/<param>``) and reported in ``summary.json``. The engine needs
the hard-pruned model exactly at the target, so :meth:`hard_masks` applies each target's feasible
set to a score that ranks every weight with :math:`\hat z > 0` by :math:`|\tilde\theta \hat z|`
above every weight with :math:`\hat z = 0` (those ranked by :math:`|\tilde\theta|`). When the gates
keep more than the target the mask is the top-k of the test-time weights; when they keep fewer, the
largest gated-off weights are re-admitted, and :meth:`finalize` bakes them in with gate 1 (every
other weight is baked in as :math:`\tilde\theta \odot \hat z`).

**Structured gates in model scope** take one budget over the groups of all targets (whole input
columns / output channels, ranked by :math:`\log\alpha`, see :meth:`L0._global_group_masks`), so the
hard masks keep the gates' uneven allocation across layers. ``density_of=purged`` (structured,
model scope, an MLP) moves the level from the targeted weights to the *purged* model's targeted
weights: the constraint is :math:`E[\text{purged}]/\text{dense} - \epsilon \le 0` with the closed
form of :meth:`L0.expected_purged_density`, and the hard masks keep the group-ranking prefix whose
purged size is nearest to :math:`\epsilon \cdot \text{dense}`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import cooper
import torch

from constrainedsparse.checkpoint import save_weights
from constrainedsparse.distributed import is_main_process
from constrainedsparse.formulations.base import Formulation, register_formulation
from constrainedsparse.gates import (
    GROUPINGS,
    LOG_ALPHA_RANGE,
    HardConcreteGate,
    apply_gates,
    clamp_log_alpha_,
    find_gate,
)
from constrainedsparse.multipliers import RestartingMultiplier, reset_dual_state_
from constrainedsparse.problem import Batch, SparsityProblem
from constrainedsparse.purge import chain_purged_params, count_params_and_macs, linear_chain, purge
from constrainedsparse.sets import GlobalTopK, TopK, keep_count, topk_mask
from constrainedsparse.targets import TargetParam

__all__ = [
    "DENSITY_CONSTRAINTS",
    "DENSITY_OF",
    "L0",
    "L0Config",
    "L0Penalty",
    "L0PenaltyConfig",
    "SCOPES",
    "layer_constraint_name",
    "lower_constraint_name",
    "model_constraint_name",
]

SCOPES = ("model", "layer")
DENSITY_CONSTRAINTS = ("inequality", "equality", "two-sided")
DENSITY_OF = ("weights", "purged")
MODEL_CONSTRAINT = "l0_density"


def model_constraint_name() -> str:
    """Name of the model-wise constraint (``l0_density``)."""
    return MODEL_CONSTRAINT


def layer_constraint_name(param: str) -> str:
    """Name of the layer-wise constraint of target ``param`` (``l0_density:<param>``)."""
    return f"{MODEL_CONSTRAINT}:{param}"


def lower_constraint_name(name: str) -> str:
    """Name of the lower bound :math:`\\epsilon - \\bar P \\le 0` paired with density constraint ``name`` by
    ``density_constraint=two-sided`` (``l0_density`` -> ``l0_density_min``, ``l0_density:<param>`` ->
    ``l0_density_min:<param>``)."""
    return name.replace(MODEL_CONSTRAINT, f"{MODEL_CONSTRAINT}_min", 1)


def _validate_gate_settings(config: Any) -> None:
    if config.grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {config.grouping!r}")
    if not (0.0 < config.droprate_init < 1.0):
        raise ValueError(f"droprate_init must be in (0, 1), got {config.droprate_init}")
    if not config.gate_lr > 0:
        raise ValueError(f"gate_lr must be > 0, got {config.gate_lr}")
    if not (0.0 <= config.gate_momentum < 1.0):
        raise ValueError(f"gate_momentum must be in [0, 1), got {config.gate_momentum}")
    if not config.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if config.log_interval < 1:
        raise ValueError(f"log_interval must be >= 1, got {config.log_interval}")


@dataclasses.dataclass
class L0Config:
    """Hyperparameters of ``l0``.

    Attributes:
        scope: ``"model"`` (one expected-density constraint over all targets) or ``"layer"``.
        density_constraint: How the expected density :math:`\\bar P` is held to :math:`\\epsilon`:

            * ``"inequality"`` (default, the paper's): :math:`\\bar P - \\epsilon \\le 0`,
              :math:`\\lambda \\ge 0`. Inactive wherever the loss alone prefers sparser gates: the
              density then settles *below* :math:`\\epsilon` (mnist1d-cnn at 0.9: 0.843).
            * ``"two-sided"`` (for "exactly :math:`\\epsilon`"): the equality :math:`\\bar P =
              \\epsilon` as two restarting inequalities, :math:`\\bar P - \\epsilon \\le 0`
              (``l0_density``) and :math:`\\epsilon - \\bar P \\le 0` (``l0_density_min``). Their
              multipliers' difference is the equality's multiplier, free in sign; the restart of
              the satisfied side at every crossing keeps gradient ascent from winding up.
            * ``"equality"``: one Cooper equality constraint, multiplier free in sign, no
              projection. Dual restarts do not apply (an equality is never strictly satisfied):
              ``dual_restarts`` is ignored. Plain gradient ascent oscillates around
              :math:`\\epsilon` (see ``density_dual_kp``) and winds up at low targets (the
              integral of :math:`\\bar P - \\epsilon` built while the density falls from 1 takes
              long to unwind, as :math:`\\bar P - \\epsilon \\ge -\\epsilon`).
        grouping: ``"unstructured"`` (a gate per weight) or ``"structured"`` (per input neuron of
            Linear, per output channel of Conv).
        density_of: What the level :math:`\\epsilon` bounds. ``"weights"`` (default): the density of
            the targeted weights, as ``--sparsity`` counts it. ``"purged"`` (``grouping=structured``,
            ``scope=model``, an MLP of Linear layers, see :func:`~constrainedsparse.purge.linear_chain`):
            the size of the purged model's targeted weights over the dense ones. Purging a kept-input
            fraction :math:`\\epsilon` of every layer leaves about :math:`\\epsilon^2`, because a removed
            input column of layer :math:`l+1` also removes output row of layer :math:`l`; the
            constraint is then on :math:`E[\\text{purged}]/\\text{dense} =
            \\sum_l \\mathrm{in}_l \\bar P_l\\,\\mathrm{out}_l \\bar P_{l+1} / \\sum_l \\mathrm{in}_l\\,\\mathrm{out}_l`
            (:math:`\\bar P_{L+1} = 1`) and the hard masks meet the purged budget (see
            :meth:`L0.hard_masks`).
        droprate_init: Initial drop rate of every gate, in (0, 1).
        gate_lr: Adam learning rate of the gates' :math:`\\log\\alpha` (its own parameter group).
        gate_momentum: Adam :math:`\\beta_1` of the gates' group. 0 by default: with momentum the
            gates keep moving after a restart sets :math:`\\lambda = 0` and overshoot the target
            (measured in ``benchmarks/l0_control.py`` and the report of issue 4).
        weight_decay: L2 weight decay of the weights (the gates' group always has 0).
        dual_restarts: Reset a multiplier to 0 whenever its constraint is satisfied (inequality
            constraints, so also both sides of ``two-sided``; ignored with ``equality``).
        density_dual_lr: Gradient-ascent step on the density multipliers. Their violations are
            fractions in [-1, 1], so they need a far larger step than a problem's default
            ``dual_lr`` (which stays the step of the user's own constraints).
        density_dual_kp: Proportional gain :math:`K_P \\ge 0` of a nuPI dual update on the density
            multipliers (0, the default: plain gradient ascent). Gradient ascent alone is an
            integral controller; without restarts to stop it (an equality has none) the density
            oscillates around :math:`\\epsilon` (measured on mnist1d-cnn, target 0.9: 0.69 to 0.98
            over 20 epochs). A proportional term damps that.
        log_interval: Log the dual dynamics every this many steps (and at every restart).
    """

    scope: str = "model"
    density_constraint: str = "inequality"
    grouping: str = "unstructured"
    density_of: str = "weights"
    droprate_init: float = 0.01
    gate_lr: float = 0.1
    gate_momentum: float = 0.0
    weight_decay: float = 0.0
    dual_restarts: bool = True
    density_dual_lr: float = 1.0
    density_dual_kp: float = 0.0
    log_interval: int = 10

    def validate(self) -> None:
        """Raises ``ValueError`` naming the bad value and what is allowed."""
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.density_constraint not in DENSITY_CONSTRAINTS:
            raise ValueError(
                f"density_constraint must be one of {', '.join(DENSITY_CONSTRAINTS)}, got {self.density_constraint!r}"
            )
        if not self.density_dual_lr > 0:
            raise ValueError(f"density_dual_lr must be > 0, got {self.density_dual_lr}")
        if not (self.density_dual_kp >= 0) or math.isinf(self.density_dual_kp):
            raise ValueError(f"density_dual_kp must be a finite number >= 0, got {self.density_dual_kp}")
        _validate_gate_settings(self)
        if self.density_of not in DENSITY_OF:
            raise ValueError(f"density_of must be one of {', '.join(DENSITY_OF)}, got {self.density_of!r}")
        if self.density_of == "purged" and self.grouping != "structured":
            raise ValueError(
                "density_of=purged needs grouping=structured (unstructured gates leave nothing to purge), "
                f"got grouping={self.grouping!r}"
            )
        if self.density_of == "purged" and self.scope != "model":
            raise ValueError(
                "density_of=purged needs scope=model (a layer's purged size depends on the next layer's kept "
                f"inputs), got scope={self.scope!r}"
            )


@dataclasses.dataclass
class L0PenaltyConfig:
    """Hyperparameters of ``l0-penalty`` (see :class:`L0Config` for the shared ones).

    Attributes:
        lmbda: Fixed penalty weight :math:`\\lambda \\ge 0` on the expected density.
    """

    lmbda: float = 1.0
    grouping: str = "unstructured"
    droprate_init: float = 0.01
    gate_lr: float = 0.1
    gate_momentum: float = 0.0
    weight_decay: float = 0.0
    log_interval: int = 10

    def validate(self) -> None:
        """Raises ``ValueError`` naming the bad value and what is allowed."""
        if not (self.lmbda >= 0) or math.isinf(self.lmbda):
            raise ValueError(f"lmbda must be a finite number >= 0, got {self.lmbda}")
        _validate_gate_settings(self)


class _Gated(Formulation):
    """Shared machinery: gates on every target, two-group Adam, density bookkeeping."""

    def __init__(self, problem: SparsityProblem, config: Any, *, lr: float, dual_lr: float) -> None:
        super().__init__(problem, config, lr=lr, dual_lr=dual_lr)
        for t in problem.targets:
            density = 1.0 - t.sparsity
            if not (0.0 < density <= 1.0):
                raise ValueError(f"target density 1 - sparsity of {t.name} must be in (0, 1], got {density}")
        self.gates: dict[str, HardConcreteGate] = {}
        # Sizes read once: every access to a gated weight in train mode draws a fresh gate sample.
        self.sizes = {t.name: t.tensor.numel() for t in problem.targets}
        self.steps_done = 0

    # --- densities ------------------------------------------------------------------------------

    def layer_expected_density(self) -> dict[str, torch.Tensor]:
        """Expected density :math:`\\bar P_n` of every target (differentiable in :math:`\\log\\alpha`)."""
        return {name: gate.expected_density() for name, gate in self.gates.items()}

    def expected_density(self) -> torch.Tensor:
        """Model-wise expected density :math:`\\sum_n |\\theta_n| \\bar P_n / \\sum_n |\\theta_n|`."""
        sizes = self.sizes
        total = sum(sizes.values())
        return sum(sizes[name] * d for name, d in self.layer_expected_density().items()) / total

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

    def setup(self, num_epochs: int, steps_per_epoch: int, reference_batch: Batch | None = None) -> None:
        device = next(self.problem.model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(torch.initial_seed()) % 2**63)
        self.gates = apply_gates(self.problem.targets, self.config.grouping, self.config.droprate_init, self.generator)
        self.add_terms()
        super().setup(num_epochs, steps_per_epoch, reference_batch)

    def add_terms(self) -> None:
        """Registers constraints / penalties on the problem (after the gates exist)."""

    def build_optimizer(self) -> cooper.optim.CooperOptimizer:
        """Adam with two groups: weights (``lr``, ``weight_decay``) and gates (``gate_lr``, no decay)."""
        gate_params = [gate.log_alpha for gate in self.gates.values()]
        gate_ids = {id(p) for p in gate_params}
        weights = [p for p in self.problem.model.parameters() if id(p) not in gate_ids]
        primal = torch.optim.Adam(
            [
                {"params": weights, "lr": self.lr, "weight_decay": self.config.weight_decay},
                {
                    "params": gate_params,
                    "lr": self.config.gate_lr,
                    "weight_decay": 0.0,
                    "betas": (self.config.gate_momentum, 0.999),
                },
            ]
        )
        dual = self.dual_optimizer()
        if dual is None:
            return cooper.optim.UnconstrainedOptimizer(self.problem, primal)
        return cooper.optim.SimultaneousOptimizer(self.problem, primal, dual)

    def dual_optimizer(self) -> torch.optim.Optimizer | None:
        """Gradient ascent on every per-step multiplier (the user's, at ``dual_lr``)."""
        return self.problem.dual_optimizer(self.dual_lr)

    def training_step(self, batch: Batch) -> tuple[cooper.CMPState, dict[str, float]]:
        cmp_state, metrics = super().training_step(batch)
        clamp_log_alpha_(self.gates.values())
        self.steps_done += 1
        metrics.update(self.after_step(cmp_state))
        if self.steps_done % self.config.log_interval == 0:
            metrics.update(self.dynamics())
        return cmp_state, metrics

    def after_step(self, cmp_state: cooper.CMPState) -> dict[str, float]:
        """Hook after every primal(-dual) step; returns metrics to log at this step."""
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
    def end_epoch(self, epoch: int) -> dict[str, float]:
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

    def _scores(self, target: TargetParam) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(stored weight, median-rule gate over the weight, hard-mask score)`` of a target."""
        gate = self.gates[target.name]
        weight = target.module.parametrizations[target.param_name].original.detach()
        z = gate.expand(gate.test_gate().detach()).expand_as(weight)
        magnitude = weight.abs()
        offset = float(magnitude.max()) + 1.0
        # Gated-on weights rank above all gated-off ones; gated-off ones by |weight|.
        score = torch.where(z > 0, (weight * z).abs() + offset, magnitude)
        return weight, z, score

    @torch.no_grad()
    def hard_masks(self) -> dict[str, torch.Tensor]:
        r"""Feasible-set masks of the test-time gated weights (see the module docstring).

        With ``grouping=structured`` the masks keep whole groups (input columns of Linear, output
        channels of Conv): :meth:`_group_mask` keeps :math:`\mathrm{round}((1 - s)\,n_{groups})`
        groups per target, so the achieved sparsity is the group-granular one (e.g. 3 of 8 columns
        kept is 0.625, not 0.6). Other patterns (``--pattern``) keep their own feasible set.
        """
        if self.config.grouping == "structured":  # whole groups for the plain top-k (--sparsity) targets
            return {
                t.name: self._group_mask(t)
                if isinstance(t.feasible_set, TopK)
                else t.feasible_set.mask(self._scores(t)[2])
                for t in self.problem.targets
            }
        return {t.name: t.feasible_set.mask(self._scores(t)[2]) for t in self.problem.targets}

    def _group_rms(self, target: TargetParam) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(rms, z)`` per group of a structured target: :math:`\|\tilde\theta_g\|_2/\sqrt{m}` of its
        stored weights (:math:`m` weights per group) and its median-rule gate :math:`\hat z_g` (float64)."""
        gate = self.gates[target.name]
        weight = target.module.parametrizations[target.param_name].original.detach()
        dim = 1 if isinstance(target.module, torch.nn.Linear) else 0
        groups = weight.movedim(dim, 0).reshape(weight.shape[dim], -1).to(torch.float64)
        return groups.norm(dim=1) / math.sqrt(gate.group_size), gate.test_gate().detach().to(torch.float64)

    def _expand_groups(self, target: TargetParam, keep: torch.Tensor) -> torch.Tensor:
        """A group mask broadcast to a weight mask."""
        weight = target.module.parametrizations[target.param_name].original
        return self.gates[target.name].expand(keep).expand_as(weight).clone()

    def _group_mask(self, target: TargetParam) -> torch.Tensor:
        r"""Whole-group mask: groups with :math:`\hat z > 0` ranked by the norm of their gated
        weights above gated-off groups (ranked by the norm of their stored weights)."""
        rms, z = self._group_rms(target)
        offset = float(rms.max()) + 1.0  # rms * z >= 0, so gated-on groups rank above the rest
        score = torch.where(z > 0, rms * z + offset, rms)
        k = keep_count(self.gates[target.name].num_gates, target.sparsity)
        return self._expand_groups(target, topk_mask(score.unsqueeze(0), k)[0])

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

    @torch.no_grad()
    def finalize(self) -> None:
        r"""Removes the gates, baking :math:`\tilde\theta \odot \hat z` into plain weights.

        Weights the hard mask re-admits although their gate is 0 keep :math:`\tilde\theta`.
        """
        masks = self.hard_masks()
        for t in self.problem.targets:
            if find_gate(t.module, t.param_name) is None:
                continue
            weight, z, _ = self._scores(t)
            baked = weight * torch.where((z == 0) & masks[t.name], torch.ones_like(z), z)
            torch.nn.utils.parametrize.remove_parametrizations(t.module, t.param_name, leave_parametrized=False)
            getattr(t.module, t.param_name).copy_(baked)
        self.gates = {}

    def after_hard_prune(self, model: torch.nn.Module, example_batch: Batch, out: Path) -> dict[str, Any]:
        """With ``grouping=structured``: purges the hard-pruned model (:func:`constrainedsparse.purge.purge`),
        saves it as ``purged.safetensors`` and reports ``dense_params``/``dense_macs`` and
        ``purged_params``/``purged_macs`` (MACs per sample), the targeted weights' entries before and
        after (``dense_target_params``, ``purged_target_params``), their ratio ``purged_density`` (the
        purged model's measured density) and ``purged_nonzero_density`` (nonzero entries left in the
        purged targets over ``dense_target_params``; below ``purged_density`` where purge keeps a
        dead channel). A model :func:`purge` does not handle gets ``purge_skipped`` (the reason) instead."""
        if self.config.grouping != "structured":
            return {}
        x = example_batch[0]
        try:
            small = purge(model)
        except ValueError as err:
            return {"purge_skipped": str(err)}
        dense_params, dense_macs = count_params_and_macs(model, x)
        purged_params, purged_macs = count_params_and_macs(small, x)
        # purge keeps the child names, so every target has the same name in the small model.
        dense_target = sum(model.get_parameter(t.name).numel() for t in self.problem.targets)
        purged_target = sum(small.get_parameter(t.name).numel() for t in self.problem.targets)
        nonzero = sum(int(small.get_parameter(t.name).count_nonzero()) for t in self.problem.targets)
        if is_main_process():  # under torchrun every rank purged the same model; rank 0 writes it
            save_weights(Path(out) / "purged.safetensors", small.state_dict(), metadata={"model": repr(small)})
        return {
            "dense_params": dense_params,
            "dense_macs": dense_macs,
            "purged_params": purged_params,
            "purged_macs": purged_macs,
            "dense_target_params": dense_target,
            "purged_target_params": purged_target,
            "purged_density": purged_target / dense_target,
            "purged_nonzero_density": nonzero / dense_target,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_done": self.steps_done, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_done = state["steps_done"]
        self.generator.set_state(state["generator"])


@register_formulation("l0")
class L0(_Gated):
    """Hard-concrete gates under expected-density constraints, gradient ascent with dual restarts."""

    description = "hard-concrete L0 gates with expected-density constraints (Lagrangian, dual restarts)"
    Config = L0Config
    exact_layer_sparsity = False  # model scope: one budget over all targets, layers free

    def __init__(self, problem: SparsityProblem, config: L0Config, *, lr: float, dual_lr: float) -> None:
        super().__init__(problem, config, lr=lr, dual_lr=dual_lr)
        # density_of=purged: (child name, in_features, out_features) of every Linear, in order.
        self._chain: list[tuple[str, int, int]] = []
        if config.density_of == "purged":
            self._chain = self._purge_chain()

    def _purge_chain(self) -> list[tuple[str, int, int]]:
        """The Linear chain whose expected purged size the constraint bounds (checked once, at construction)."""
        model, targets = self.problem.model, self.problem.targets
        try:
            names = linear_chain(model)
        except ValueError as err:
            raise ValueError(f"density_of=purged: {err}") from None
        wanted = {f"{name}.weight" for name in names}
        have = {t.name for t in targets}
        if have != wanted:
            raise ValueError(
                f"density_of=purged needs exactly the Linear weights as targets ({', '.join(sorted(wanted))}), "
                f"got {', '.join(sorted(have)) or 'none'}"
            )
        if not all(isinstance(t.feasible_set, TopK) for t in targets):
            raise ValueError("density_of=purged needs a --sparsity target (top-k), not --pattern")
        layers = [model.get_submodule(name) for name in names]
        return [(name, layer.in_features, layer.out_features) for name, layer in zip(names, layers)]

    def expected_purged_density(self) -> torch.Tensor:
        r"""Expected purged density (``density_of=purged``; differentiable in :math:`\log\alpha`):

        .. math::
            \frac{E[\text{purged}]}{\text{dense}} = \frac{\sum_l \mathrm{in}_l \bar P_l\;
            \mathrm{out}_l \bar P_{l+1}}{\sum_l \mathrm{in}_l\,\mathrm{out}_l}, \qquad \bar P_{L+1} = 1,

        with :math:`\bar P_l` the mean :math:`P(z \ne 0)` of layer :math:`l`'s input-column gates
        (closed form from the hard-concrete CDF). Purging keeps :math:`k_l` inputs and :math:`k_{l+1}`
        outputs of Linear :math:`l`, and :math:`E[k_l k_{l+1}] = E[k_l]E[k_{l+1}]` (independent gates):
        :func:`~constrainedsparse.purge.chain_purged_params` of the expected counts.
        """
        if not self._chain:
            raise ValueError("expected_purged_density needs density_of=purged")
        kept = [n_in * self.gates[f"{name}.weight"].expected_density() for name, n_in, _ in self._chain]
        dense = sum(n_in * n_out for _, n_in, n_out in self._chain)
        return chain_purged_params(kept, self._chain[-1][2]) / dense

    def constrained_density(self) -> torch.Tensor:
        """The model-wise density the constraint bounds: expected purged or expected weight density."""
        return self.expected_purged_density() if self._chain else self.expected_density()

    @torch.no_grad()
    def dynamics(self) -> dict[str, float]:
        """:meth:`_Gated.dynamics` plus ``l0/expected_purged_density`` with ``density_of=purged``."""
        metrics = super().dynamics()
        if self._chain:
            metrics["l0/expected_purged_density"] = float(self.expected_purged_density())
        return metrics

    def summary_extra(self) -> dict[str, Any]:
        """:meth:`_Gated.summary_extra` plus ``expected_purged_density`` with ``density_of=purged``."""
        extra = super().summary_extra()
        if self._chain:
            with torch.no_grad():
                extra["expected_purged_density"] = float(self.expected_purged_density())
        return extra

    @torch.no_grad()
    def hard_masks(self) -> dict[str, torch.Tensor]:
        r"""Model scope (top-k targets): one global budget over all targets.

        The model-wise constraint lets the gates spread the density unevenly across layers; masking
        every layer to the same level would undo that (measured on mnist1d-mlp at density 0.1: 66 %
        gated, 23 % after per-layer masks; structured: 41 % gated, 14 % per layer). So the
        gated-on weights of all targets compete for one budget:

        * unstructured: :class:`~constrainedsparse.sets.GlobalTopK` of :math:`\sum_n k_n` over
          :math:`|\tilde\theta \hat z|` (gated-on above gated-off everywhere); the total number of
          zeros is exactly the target's;
        * structured: whole groups, see :meth:`_global_group_masks`.

        Layer scope keeps the per-target masks of :meth:`_Gated.hard_masks`.
        """
        targets = self.problem.targets
        if self.config.scope != "model" or not all(isinstance(t.feasible_set, TopK) for t in targets):
            return super().hard_masks()
        if self.config.grouping == "structured":
            return self._global_group_masks()
        weights_and_gates = [self._scores(t)[:2] for t in targets]
        offset = max(float(w.abs().max()) for w, _ in weights_and_gates) + 1.0
        scores = [torch.where(z > 0, (w * z).abs() + offset, w.abs()) for w, z in weights_and_gates]
        budget = GlobalTopK(sum(t.feasible_set.k for t in targets))
        return {t.name: mask for t, mask in zip(targets, budget.masks(scores))}

    def _global_group_masks(self) -> dict[str, torch.Tensor]:
        r"""Structured model-scope masks: the shortest prefix of one global group ranking whose size is
        nearest to the budget.

        All groups of all targets are ranked together by their gate's :math:`\log\alpha_g`, the
        argument of the median rule :math:`\hat z_g` (monotone in it, but not saturated at
        :math:`\hat z = 1`, and on the same scale in every layer; weight norms are not: ranking by
        :math:`\hat z_g \|\tilde\theta_g\|` emptied the whole second layer of digits-mlp after one
        epoch, when every gate was still on), gated-on groups (:math:`\hat z_g > 0`) above gated-off
        ones; equal :math:`\log\alpha` (e.g. at the clamp) is broken by the per-weight RMS
        :math:`\|\tilde\theta_g\|/\sqrt{m_g}` (:math:`m_g` weights in the group).
        :class:`~constrainedsparse.sets.GlobalTopK` (:math:`k` groups, ties to the lower index) gives
        the top-:math:`k` prefix, and the prefixes are nested, so the size :math:`S(k)` of the kept
        model never decreases with :math:`k`; a bisection
        finds the smallest :math:`k` with :math:`S(k) \ge B` and keeps :math:`k` or :math:`k - 1`
        groups, whichever is nearer to :math:`B` (a tie keeps :math:`k`):

        * ``density_of=weights``: :math:`S(k) = \sum_g m_g` kept weights, :math:`B = \sum_n k_n` (the
          per-target keep counts of ``--sparsity``). Guarantee: :math:`|S - B| \le \max_g m_g / 2`.
        * ``density_of=purged``: :math:`S(k) = \sum_l k_l k_{l+1}` (the purged targets,
          :func:`~constrainedsparse.purge.chain_purged_params`), :math:`B = \epsilon \cdot \text{dense}`.
          Adding an input column to Linear :math:`l` adds :math:`k_{l+1} + k_{l-1} \le \mathrm{out}_l +
          \mathrm{in}_{l-1}` entries (a column of layer :math:`l`, the matching row of layer :math:`l - 1`), so
          :math:`|S - B| \le \max_l(\mathrm{out}_l + \mathrm{in}_{l-1}) / 2` (:math:`\mathrm{in}_0 = 0`):
          148 of 78,336 entries (0.0019) on mnist1d-mlp.
        """
        if self._chain:
            by_name = {t.name: t for t in self.problem.targets}
            targets = [by_name[f"{name}.weight"] for name, _, _ in self._chain]
            dense = sum(n_in * n_out for _, n_in, n_out in self._chain)
            last_out = self._chain[-1][2]
            budget = self.target_density() * dense

            def size(counts: list[int]) -> float:
                return chain_purged_params(counts, last_out)
        else:
            targets = list(self.problem.targets)
            group_sizes = [self.gates[t.name].group_size for t in targets]
            budget = sum(t.feasible_set.k for t in targets)

            def size(counts: list[int]) -> float:
                return sum(c * m for c, m in zip(counts, group_sizes))

        rms_and_gates = [self._group_rms(t) for t in targets]
        top_rms = max(float(rms.max()) for rms, _ in rms_and_gates) or 1.0
        low, high = LOG_ALPHA_RANGE
        scores = []
        for t, (rms, z) in zip(targets, rms_and_gates):
            log_alpha = self.gates[t.name].log_alpha.detach().to(torch.float64).clamp(low, high)
            # log alpha - low in [0, high - low]; RMS only breaks ties (1e-6 of the scale); gated-on first.
            score = (log_alpha - low) + 1e-6 * rms / top_rms
            scores.append(torch.where(z > 0, score + (high - low) + 1.0, score))

        def prefix(k: int) -> list[torch.Tensor]:
            return GlobalTopK(k).masks(scores)

        def prefix_size(k: int) -> float:
            return size([int(m.sum()) for m in prefix(k)])

        low, high = 0, sum(s.numel() for s in scores)
        while low < high:  # smallest k with S(k) >= B (S(all groups) = dense >= B)
            middle = (low + high) // 2
            if prefix_size(middle) >= budget:
                high = middle
            else:
                low = middle + 1
        k = low
        if k > 0 and budget - prefix_size(k - 1) < prefix_size(k) - budget:
            k -= 1
        return {t.name: self._expand_groups(t, keep) for t, keep in zip(targets, prefix(k))}

    def dual_optimizer(self) -> torch.optim.Optimizer | None:
        """``SGD(maximize=True)``: density multipliers at ``density_dual_lr``, the user's at ``dual_lr``.

        With ``density_dual_kp > 0`` it is :class:`cooper.optim.nuPI` instead (Sohrabi et al., 2024):
        :math:`\\lambda_{t+1} = \\lambda_t + \\eta\\,(g_t + K_P (g_t - g_{t-1}))` on the density multipliers,
        so :math:`\\lambda_t = \\eta\\,(\\sum_{s \\le t} g_s + K_P g_t)` (Cooper's first nuPI step is plain SGD
        and the error memory starts at 0 after it, so this holds from the second step on); the user's
        multipliers keep plain gradient ascent (:math:`K_P = 0`).
        """
        density = [p for m in self._multipliers.values() for p in m.parameters()]
        density_ids = {id(p) for p in density}
        user = self.problem.dual_optimizer(self.dual_lr)
        others = [p for g in (user.param_groups if user else []) for p in g["params"] if id(p) not in density_ids]
        groups = [{"params": density, "lr": self.config.density_dual_lr}]
        if others:
            groups.append({"params": others, "lr": self.dual_lr})
        kp = self.config.density_dual_kp
        if kp == 0:
            return torch.optim.SGD(groups, lr=self.dual_lr, maximize=True)
        # nuPI(Kp, Ki=1, nu=0): SGD plus a proportional term; the user's group keeps Kp = 0 (plain SGD).
        # Gains as 1-element tensors (nuPI's rule for several groups) on the multipliers' device.
        device = density[0].device if density else None
        for group, gain in zip(groups, [kp] + [0.0] * (len(groups) - 1)):
            group["Kp"] = torch.tensor([gain], device=device)
            group["Ki"] = torch.tensor([1.0], device=device)
        return cooper.optim.nuPI(groups, lr=self.dual_lr, Kp=groups[0]["Kp"], Ki=groups[0]["Ki"], maximize=True)

    def add_terms(self) -> None:
        """One model-wise constraint or one per target: :math:`\\bar P - \\epsilon \\le 0` (or ``= 0``)."""
        device = next(self.problem.model.parameters()).device
        self.constraint_names: list[str] = []
        self._multipliers: dict[str, RestartingMultiplier] = {}
        if self.config.scope == "model":
            level = self.target_density()
            self._add(
                model_constraint_name(),
                lambda model, batch: (self.constrained_density() - level).reshape(1),
                device,
            )
        else:
            for t in self.problem.targets:
                self._add(layer_constraint_name(t.name), self._layer_violation(t), device)

    def _layer_violation(self, target: TargetParam):
        gate, level = self.gates[target.name], 1.0 - target.sparsity

        def violation(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            return (gate.expected_density() - level).reshape(1)

        return violation

    def _add(self, name: str, violation, device: torch.device) -> None:
        if self.config.density_constraint == "two-sided":
            self._add_one(name, violation, device, equality=False)

            def lower(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                return -violation(model, batch)

            self._add_one(lower_constraint_name(name), lower, device, equality=False)
        else:
            self._add_one(name, violation, device, equality=self.config.density_constraint == "equality")

    def _add_one(self, name: str, violation, device: torch.device, equality: bool) -> None:
        # Restarts are defined for inequalities only; an equality's multiplier is free in sign.
        multiplier = RestartingMultiplier(1, restarts=self.config.dual_restarts and not equality, device=device)
        constraint = cooper.Constraint(
            constraint_type=cooper.ConstraintType.EQUALITY if equality else cooper.ConstraintType.INEQUALITY,
            formulation_type=cooper.formulations.Lagrangian,
            multiplier=multiplier,
        )
        self.problem.add_constraint(name, constraint, violation)
        self.constraint_names.append(name)
        self._multipliers[name] = multiplier

    def multipliers(self) -> dict[str, RestartingMultiplier]:
        """The density constraints' multipliers by constraint name."""
        return dict(self._multipliers)

    def after_step(self, cmp_state: cooper.CMPState) -> dict[str, float]:
        """Resets the dual-optimizer state of restarted entries; logs restarts when they happen."""
        metrics = {}
        for name, multiplier in self.multipliers().items():
            if bool(multiplier.last_restart.any()):
                for dual in self.optimizer.dual_optimizers:
                    reset_dual_state_(dual, multiplier)
                metrics[f"restart/{name}"] = 1.0
        if metrics:
            metrics.update(self._dual_metrics(cmp_state))
        return metrics

    def _dual_metrics(self, cmp_state: cooper.CMPState) -> dict[str, float]:
        metrics = {}
        for constraint, state in cmp_state.observed_constraints.items():
            if constraint.name in self.constraint_names:
                metrics[f"violation/{constraint.name}"] = float(state.violation.detach().reshape(-1)[0])
        for name, multiplier in self.multipliers().items():
            metrics[f"multiplier/{name}"] = float(multiplier.weight.detach().reshape(-1)[0])
        return metrics

    def training_step(self, batch: Batch) -> tuple[cooper.CMPState, dict[str, float]]:
        cmp_state, metrics = super().training_step(batch)
        if self.steps_done % self.config.log_interval == 0:
            metrics.update(self._dual_metrics(cmp_state))
        return cmp_state, metrics

    def finalize(self) -> None:
        """Unregisters the density constraints (retraining sees only the user's), then removes the gates."""
        for name in self.constraint_names:
            self.problem.remove_constraint(name)
        self.constraint_names = []
        self._multipliers = {}
        super().finalize()


@register_formulation("l0-penalty")
class L0Penalty(_Gated):
    """Penalized baseline: the same gates, loss + lmbda * expected density, no constraint."""

    description = "hard-concrete L0 gates with a fixed penalty lmbda * expected density (baseline)"
    Config = L0PenaltyConfig

    def add_terms(self) -> None:
        """Wraps the problem's loss: :math:`f + \\lambda\\,\\mathbb{E}[\\text{density}]` (undone in finalize)."""
        self._task_loss = self.problem.loss_fn
        lmbda = self.config.lmbda

        def penalized(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self._task_loss(output, y) + lmbda * self.expected_density()

        self.problem.loss_fn = penalized

    def finalize(self) -> None:
        """Restores the task loss, then removes the gates."""
        self.problem.loss_fn = self._task_loss
        super().finalize()
