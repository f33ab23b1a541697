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
(``density_constraint=two-sided``, the default, adds the lower bound :math:`\epsilon - \bar P \le 0` to
each, with its own restarting multiplier: exactly :math:`\epsilon`; ``density_constraint=inequality``
is the paper's upper bound alone; ``equality`` makes each a Cooper equality with a multiplier free in
sign). ``test_gap_max`` (default 0.01) adds, in the same scope, the proxy pair
:math:`\pm(T - \bar P) - \delta \le 0` on the test-time density :math:`T` (see
:class:`~constrainedsparse.formulations.l0.config.L0Config`). The
primal step (Adam; gates in their own parameter group with ``gate_lr``, no weight decay and no
momentum by default) and
the dual step (``SGD(maximize=True)``, step ``density_dual_lr`` on the density multipliers and ``dual_lr`` on the
user's, :math:`\lambda \leftarrow [\lambda + \eta g]_+`; no projection for an equality)
are simultaneous (:class:`cooper.optim.SimultaneousOptimizer`). With ``dual_restarts`` (default) a
satisfied constraint's multiplier is reset to 0 after the dual step.

``l0-penalty`` is the penalized baseline: the same gates and optimizer, no constraint, loss
:math:`f + \lambda\,\mathbb{E}[\text{density}]` with a fixed ``lmbda``
(:mod:`~constrainedsparse.formulations.l0.gated`).

**Hard masks and the median rule.** The test-time gate is the median rule :math:`\hat z`; its
density is logged (``l0_test_density/<param>``) and reported in ``summary.json``. The engine needs
the hard-pruned model exactly at the target, so :meth:`hard_masks` applies each target's feasible
set to a score that ranks every weight with :math:`\hat z > 0` by :math:`|\tilde\theta \hat z|`
above every weight with :math:`\hat z = 0` (those ranked by :math:`|\tilde\theta|`). When the gates
keep more than the target the mask is the top-k of the test-time weights; when they keep fewer, the
largest gated-off weights are re-admitted, and :meth:`finalize` bakes them in with gate 1 (every
other weight is baked in as :math:`\tilde\theta \odot \hat z`). That is layer scope; in model scope the
weights of all targets share one budget, ranked by their gates' :math:`\log\alpha` (the same scale in
every layer; see :meth:`L0.compute_hard_masks`).

**Structured gates in model scope** take one budget over the groups of all targets (whole input
columns / output channels, ranked by :math:`\log\alpha`, see :meth:`L0._global_group_masks`), so the
hard masks keep the gates' uneven allocation across layers. ``density_of=purged`` (structured,
model scope, an MLP) moves the level from the targeted weights to the *purged* model's targeted
weights: the constraint is :math:`E[\text{purged}]/\text{dense} - \epsilon \le 0` with the closed
form of :meth:`L0.expected_purged_density`, and the hard masks keep the group-ranking prefix whose
purged size is nearest to :math:`\epsilon \cdot \text{dense}`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cooper
import torch

from constrainedsparse.formulations.checks import warn_uneven_levels
from constrainedsparse.formulations.factory import register_formulation
from constrainedsparse.formulations.l0.config import TEST_GAP_OFF, L0Config
from constrainedsparse.formulations.l0.gated import TEST_TEMPERATURE, Gated
from constrainedsparse.gates import LOG_ALPHA_RANGE, HardConcreteGate
from constrainedsparse.multipliers import RestartingMultiplier
from constrainedsparse.problem import Batch
from constrainedsparse.purge import chain_purged_params, linear_chain
from constrainedsparse.sets import GlobalTopK, TopK, lift_floors, nearest_prefix
from constrainedsparse.targets import TargetParam

__all__ = ["L0", "MODEL_CONSTRAINT", "layer_constraint_name", "lower_constraint_name", "model_constraint_name"]

MODEL_CONSTRAINT = "l0_density"
TEST_GAP_CONSTRAINT = "l0_test_gap"


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


@register_formulation("l0")
class L0(Gated):
    """Hard-concrete gates under expected-density constraints, gradient ascent with dual restarts."""

    description = "hard-concrete L0 gates with expected-density constraints (Lagrangian, dual restarts)"
    Config = L0Config
    config: L0Config

    @classmethod
    def exact_layer_sparsity(cls, config: L0Config) -> bool:
        """Layer scope with unstructured gates masks every target at its own level; model scope
        takes one budget over all targets, structured gates whole groups."""
        return config.scope == "layer" and config.grouping == "unstructured"

    def attach(self) -> None:
        """Checks ``density_of=purged``'s model and the floor first, then the gates and the density constraints."""
        floor = self.config.min_layer_density
        for t in self.problem.targets:
            if floor > 1.0 - t.sparsity:
                raise ValueError(
                    f"min_layer_density must be at most every target's density 1 - sparsity: got {floor} "
                    f"for {t.name} at density {1.0 - t.sparsity:g}"
                )
        if self.config.grouping == "structured" and self.config.scope == "layer":
            for t in self.problem.targets:
                self._check_keeps_a_group(t)
        if self.config.scope == "model":
            warn_uneven_levels(self.problem.targets, self._global_budget)
        # density_of=purged: (child name, in_features, out_features) of every Linear, in order.
        self._chain: list[tuple[str, int, int]] = []
        if self.config.density_of == "purged":
            self._chain = self._purge_chain()
        super().attach()

    @property
    def _global_budget(self) -> bool:
        """Model scope over top-k targets only: one budget for all of them (:meth:`compute_hard_masks`)."""
        return self.config.scope == "model" and all(isinstance(t.feasible_set, TopK) for t in self.problem.targets)

    def _check_keeps_a_group(self, target: TargetParam) -> None:
        """Layer scope, structured gates: the target's level keeps at least one group (else its hard prune cuts
        the layer, found only after training)."""
        if isinstance(target.feasible_set, TopK) and self._group_set(target).k == 0:
            dim = self._group_dim(target)
            groups = target.stored.shape[dim]
            what = "input columns" if dim == 1 else "output channels"
            raise ValueError(
                f"scope=layer with grouping=structured keeps none of the {groups} {what} of {target.name} at "
                f"sparsity {target.sparsity:g} (the hard prune would cut the layer): lower --sparsity or use "
                "scope=model"
            )

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
        patterned = next((t for t in targets if not isinstance(t.feasible_set, TopK)), None)
        if patterned is not None:
            raise ValueError(
                "density_of=purged needs a sparsity level without a pattern, a top-k budget (--sparsity without "
                f"--pattern; SparsityConfig(sparsity=...)); {patterned.name} has the pattern "
                f"{patterned.target.describe()}"
            )
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
    def compute_hard_masks(self) -> dict[str, torch.Tensor]:
        r"""Model scope (top-k targets): one global budget over all targets.

        The model-wise constraint lets the gates spread the density unevenly across layers; masking
        every layer to the same level would undo that (measured on mnist1d-mlp at density 0.1: 66 %
        gated, 23 % after per-layer masks; structured: 41 % gated, 14 % per layer). So the
        gated-on weights of all targets compete for one budget:

        * unstructured: :class:`~constrainedsparse.sets.GlobalTopK` of :math:`\sum_n k_n` over the gates'
          :math:`\log\alpha` (gated-on above gated-off everywhere, see :meth:`_global_weight_scores`); the
          total number of zeros is exactly the target's;
        * structured: whole groups, see :meth:`_global_group_masks`.

        Layer scope keeps the per-target masks of :meth:`Gated.compute_hard_masks`.
        """
        targets = self.problem.targets
        if not self._global_budget:
            return super().compute_hard_masks()
        if self.config.grouping == "structured":
            return self._global_group_masks()
        scores = self._global_weight_scores()
        floors = self._floors(scores)
        budget = GlobalTopK(max(sum(t.feasible_set.k for t in targets), sum(floors)))
        return {t.name: mask for t, mask in zip(targets, budget.masks(self._lifted(scores, floors)))}

    def _global_weight_scores(self) -> list[torch.Tensor]:
        r"""Unstructured model-scope scores: every weight ranked by its gate's :math:`\log\alpha` (clamped to
        :data:`~constrainedsparse.gates.LOG_ALPHA_RANGE`), ties by :math:`|\tilde\theta|` in units of its
        layer's RMS (float64).

        The median-rule gate is monotone in :math:`\log\alpha`, so gated-on weights rank above gated-off
        ones, and :math:`\log\alpha` is on the same scale in every layer. Raw :math:`|\tilde\theta \hat z|`
        is not: while the gates are still all on (stopped early), it emptied a layer whose weights
        were initialised smaller than the others'.
        """
        low, high = LOG_ALPHA_RANGE
        ratios = []
        for t in self.problem.targets:
            magnitude = t.stored.detach().to(torch.float64).abs()  # the weight under its gate
            ratios.append(magnitude / (float(magnitude.square().mean().sqrt()) or 1.0))
        top = max(float(r.max()) for r in ratios) or 1.0
        scores = []
        for t, ratio in zip(self.problem.targets, ratios):
            gate = self.gates[t.name]
            log_alpha = gate.expand(gate.log_alpha.detach()).expand_as(ratio).to(torch.float64).clamp(low, high)
            scores.append((log_alpha - low) + 1e-6 * ratio / top)  # the ratio in [0, 1e-6]: ties only
        return scores

    @staticmethod
    def _lifted(scores: list[torch.Tensor], floors: list[int]) -> list[torch.Tensor]:
        """``scores`` with the floors ranked first (:func:`~constrainedsparse.sets.lift_floors`); as they are
        without a floor (the default), where lifting would only copy them to float64."""
        return lift_floors(scores, floors) if any(floors) else scores

    def _floors(self, scores: list[torch.Tensor]) -> list[int]:
        """``ceil(min_layer_density * n)`` entries (weights or groups) of each of ``scores``' tensors."""
        floor = self.config.min_layer_density
        return [min(s.numel(), math.ceil(floor * s.numel() - 1e-9)) for s in scores]

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
        model never decreases with :math:`k`; :func:`~constrainedsparse.sets.nearest_prefix` finds by
        bisection the :math:`k` whose size is nearest to :math:`B` (a tie keeps the larger):

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

        floors = self._floors(scores)
        keeps = nearest_prefix(self._lifted(scores, floors), size, budget, minimum=sum(floors))
        return {t.name: self._expand_groups(t, keep) for t, keep in zip(targets, keeps)}

    def build_dual_optimizer(self) -> torch.optim.Optimizer | None:
        """``SGD(maximize=True)``: density multipliers at ``density_dual_lr``, the user's at ``dual_lr`` (or their own).

        With ``density_dual_kp > 0`` it is :class:`cooper.optim.nuPI` instead (Sohrabi et al., 2024):
        :math:`\\lambda_{t+1} = \\lambda_t + \\eta\\,(g_t + K_P (g_t - g_{t-1}))` on the density multipliers,
        so :math:`\\lambda_t = \\eta\\,(\\sum_{s \\le t} g_s + K_P g_t)` (Cooper's first nuPI step is plain SGD
        and the error memory starts at 0 after it, so this holds from the second step on); the user's
        multipliers keep plain gradient ascent (:math:`K_P = 0`).
        """
        density = [p for m in self._multipliers.values() for p in m.parameters()]
        density_ids = {id(p) for p in density}
        user = self.problem.dual_optimizer(self.dual_lr)  # one group per step size (a constraint's own dual_lr)
        groups = [{"params": density, "lr": self.config.density_dual_lr}]
        for group in user.param_groups if user else []:
            others = [p for p in group["params"] if id(p) not in density_ids]
            if others:
                groups.append({"params": others, "lr": group["lr"]})
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
        """One model-wise constraint or one per target: :math:`\\bar P - \\epsilon \\le 0` (or ``= 0``), and
        with ``test_gap_max < 1`` the test-gap proxy constraint in the same scope."""
        device = next(self.problem.model.parameters()).device
        self.constraint_names: list[str] = []
        self._multipliers: dict[str, RestartingMultiplier] = {}
        self._second_entry: dict[str, str] = {}  # constraint of two entries -> the name its second is logged as
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
        if self.config.test_gap_max >= TEST_GAP_OFF:
            return
        if self.config.scope == "model":
            self._add_test_gap(TEST_GAP_CONSTRAINT, self.soft_test_density, self.hard_test_density, device)
        else:
            for name, gate in self.gates.items():
                self._add_test_gap(
                    f"{TEST_GAP_CONSTRAINT}:{name}",
                    functools.partial(gate.soft_test_density, TEST_TEMPERATURE),
                    functools.partial(self._gate_test_density, gate),
                    device,
                )

    @staticmethod
    def _gate_test_density(gate: HardConcreteGate) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, P̄)`` of one gate, measured: the share of gates above the test threshold, the expected density."""
        return gate.measured_test_density(), gate.measured_expected_density()

    def _add_test_gap(self, name: str, soft, measure, device: torch.device) -> None:
        """The proxy pair :math:`\\pm(T - \\bar P) - \\delta \\le 0` as one Cooper constraint with two entries
        (``name``, logged also as ``name_min`` for the second): the dual step reads the measured
        ``measure() = (T, P̄)``, the primal Lagrangian the smooth ``soft()`` in place of :math:`T` (the
        :math:`\\bar P` term has the density constraints' gradient already, and is left out)."""
        limit = self.config.test_gap_max

        def surrogate(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            value = soft()
            return torch.stack([value, -value]) - limit

        def strict(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            test, expected = measure()
            gap = test - expected
            return torch.stack([gap, -gap]) - limit

        self._second_entry[name] = name.replace(TEST_GAP_CONSTRAINT, TEST_GAP_CONSTRAINT + "_min", 1)
        self._add_one(name, surrogate, device, False, strict, entries=(name, self._second_entry[name]))

    def _layer_violation(self, target: TargetParam):
        gate, level = self.gates[target.name], 1.0 - target.sparsity

        def violation(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            return (gate.expected_density() - level).reshape(1)

        return violation

    def _add(self, name: str, violation, device: torch.device) -> None:
        if self.config.density_constraint == "two-sided":
            # The lower bound is evaluated right after the upper one (registration order) and takes its value
            # (with its graph) instead of a second pass over every gate; it is handed over once, never kept.
            handed: list[torch.Tensor] = []

            def upper(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                value = violation(model, batch)
                handed[:] = [value]
                return value

            def lower(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                value = handed.pop() if handed else violation(model, batch)
                return -value

            self._add_one(name, upper, device, equality=False)
            self._add_one(lower_constraint_name(name), lower, device, equality=False)
        else:
            self._add_one(name, violation, device, equality=self.config.density_constraint == "equality")

    def _add_one(
        self, name: str, violation, device: torch.device, equality: bool, strict=None, entries: tuple[str, ...] = ()
    ) -> None:
        # Restarts are defined for inequalities only; an equality's multiplier is free in sign. A constraint of
        # several entries logs each under its own name (entries).
        restarts = self.config.dual_restarts and not equality
        multiplier = RestartingMultiplier(
            max(len(entries), 1), restarts=restarts, entry_names=entries or None, device=device
        )
        constraint = cooper.Constraint(
            constraint_type=cooper.ConstraintType.EQUALITY if equality else cooper.ConstraintType.INEQUALITY,
            formulation_type=cooper.formulations.Lagrangian,
            multiplier=multiplier,
        )
        self.problem.add_constraint(name, constraint, violation, strict_violation=strict)
        self.constraint_names.append(name)
        self._multipliers[name] = multiplier

    def multipliers(self) -> dict[str, RestartingMultiplier]:
        """The density constraints' multipliers by constraint name."""
        return dict(self._multipliers)

    def after_gated_step(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Logs the density constraints' dual state at a step where one of them restarted
        (:meth:`Formulation.post_step` resets the restarted entries and logs ``restart/<name>``)."""
        if any(bool(m.last_restart.any()) for m in self.multipliers().values()):
            return self._dual_metrics(cmp_state)
        return {}

    def _dual_metrics(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        metrics = {}
        for constraint, state in cmp_state.observed_constraints.items():
            if constraint.name in self.constraint_names:
                # A proxy constraint's dual step reads its strict (measured) violation: log that one.
                measured = state.violation if state.strict_violation is None else state.strict_violation
                self._log_entries(metrics, "violation", constraint.name, measured)
        for name, multiplier in self.multipliers().items():
            self._log_entries(metrics, "multiplier", name, multiplier.weight)
        return metrics

    def _log_entries(self, metrics: dict[str, float], kind: str, name: str, value: torch.Tensor) -> None:
        values = value.detach().reshape(-1).tolist()
        metrics[f"{kind}/{name}"] = values[0]
        if name in self._second_entry:
            metrics[f"{kind}/{self._second_entry[name]}"] = values[1]

    def interval_metrics(self, cmp_state: cooper.cmp.CMPState) -> dict[str, float]:
        """Violations and multipliers of the density constraints."""
        return self._dual_metrics(cmp_state)

    def detach(self) -> None:
        """Unregisters the density constraints (retraining sees only the user's), then removes the gates."""
        for name in self.constraint_names:
            self.problem.remove_constraint(name)
        self.constraint_names = []
        self._multipliers = {}
        super().detach()
