r"""Hyperparameters of ``l0`` and ``l0-penalty``: the gate settings both share, and each one's own."""

from __future__ import annotations

import dataclasses

from constrainedsparse.config import Bounds, Hyperparameters, OneOf, hyperparameter
from constrainedsparse.gates import GROUPINGS, TEST_RULES

__all__ = [
    "DENSITY_CONSTRAINTS",
    "DENSITY_OF",
    "GateConfig",
    "L0Config",
    "L0PenaltyConfig",
    "SCOPES",
    "TEST_GAP_OFF",
]

SCOPES = ("model", "layer")
DENSITY_CONSTRAINTS = ("inequality", "equality", "two-sided")
DENSITY_OF = ("weights", "purged")
_POSITIVE = Bounds(low=0, low_inclusive=False)
TEST_GAP_OFF = 1.0
"""``test_gap_max`` at which no test-gap constraint is added (the gap of two densities never exceeds 1)."""


@dataclasses.dataclass
class GateConfig(Hyperparameters):
    """The gate settings of both ``l0`` and ``l0-penalty``.

    Attributes:
        grouping: ``"unstructured"`` (a gate per weight) or ``"structured"`` (per input neuron of
            Linear, per output channel of Conv).
        droprate_init: Initial drop rate of every gate, in (0, 1).
        gate_lr: Learning rate of the gates' :math:`\\log\\alpha` (their own parameter group of the
            primal optimizer: the default Adam or the user's).
        gate_momentum: Momentum of the gates' group (Adam's :math:`\\beta_1`, SGD's momentum). 0 by
            default: with momentum the gates keep moving after a restart sets :math:`\\lambda = 0` and
            overshoot the target (measured in ``benchmarks/l0_control.py`` and the report of issue 4).
        weight_decay: L2 weight decay of the weights in the default Adam (a user's optimizer keeps
            its own); the gates' group always has 0.
        log_interval: Log the dual dynamics every this many steps (and at every restart).
        test_rule: The test-time (eval-mode) gate that is measured, baked in and ranks the hard
            masks: ``"median"`` (default), the median of the hard-concrete distribution,
            :math:`\\min(1, \\max(0, \\sigma(\\log\\alpha/\\beta)(\\zeta - \\gamma) + \\gamma))`, nonzero exactly
            when :math:`P(z \\ne 0) > 1/2` (Gallego-Posada et al.'s test-time model); ``"louizos"``:
            Louizos et al.'s estimator :math:`\\min(1, \\max(0, \\sigma(\\log\\alpha)(\\zeta - \\gamma) + \\gamma))`,
            which is not the median (nonzero for :math:`P(z \\ne 0) > 0.31`). Training is the same.
    """

    grouping: str = hyperparameter(
        "unstructured", "a gate per weight, or per input neuron / output channel", OneOf(GROUPINGS)
    )
    droprate_init: float = hyperparameter(0.01, "initial drop rate of every gate", Bounds(0, 1, False, False))
    gate_lr: float = hyperparameter(0.1, "learning rate of the gates' log alpha (own parameter group)", _POSITIVE)
    gate_momentum: float = hyperparameter(
        0.0, "momentum of the gates' group (Adam beta1 / SGD momentum)", Bounds(0, 1, high_inclusive=False)
    )
    weight_decay: float = hyperparameter(0.0, "L2 weight decay of the weights in the default Adam", Bounds(low=0))
    log_interval: int = hyperparameter(10, "log the dual dynamics every this many steps", Bounds(low=1))
    test_rule: str = hyperparameter(
        "median", "test-time gate: the gate's median, or Louizos et al.'s estimator", OneOf(TEST_RULES)
    )


@dataclasses.dataclass
class L0Config(GateConfig):
    """Hyperparameters of ``l0`` (plus the gate ones of :class:`GateConfig`).

    Attributes:
        scope: ``"model"`` (one expected-density constraint over all targets) or ``"layer"``.
        density_constraint: How the expected density :math:`\\bar P` is held to :math:`\\epsilon`:

            * ``"inequality"`` (the paper's): :math:`\\bar P - \\epsilon \\le 0`,
              :math:`\\lambda \\ge 0`. Inactive wherever the loss alone prefers sparser gates: the
              density then settles *below* :math:`\\epsilon` (mnist1d-cnn at 0.9: 0.843).
            * ``"two-sided"`` (default: "exactly :math:`\\epsilon`", what a sparsity target means): the
              equality :math:`\\bar P = \\epsilon` as two restarting inequalities, :math:`\\bar P - \\epsilon \\le 0`
              (``l0_density``) and :math:`\\epsilon - \\bar P \\le 0` (``l0_density_min``). Their
              multipliers' difference is the equality's multiplier, free in sign; the restart of
              the satisfied side at every crossing keeps gradient ascent from winding up.
            * ``"equality"``: one Cooper equality constraint, multiplier free in sign, no
              projection. Dual restarts do not apply (an equality is never strictly satisfied):
              ``dual_restarts`` is ignored. Plain gradient ascent oscillates around
              :math:`\\epsilon` (see ``density_dual_kp``) and winds up at low targets (the
              integral of :math:`\\bar P - \\epsilon` built while the density falls from 1 takes
              long to unwind, as :math:`\\bar P - \\epsilon \\ge -\\epsilon`).
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
        min_layer_density: A floor on every target's density in the model-scope hard masks (0, the
            default: none). One global budget lets the gates empty a whole layer (a user constraint
            on active neurons did, on a structured MLP); with a floor :math:`d`, every target keeps
            at least :math:`\\lceil d\\,n_l \\rceil` of its :math:`n_l` weights (structured: groups),
            its best ones, and the rest of the budget goes to the best of the remainder
            (:func:`~constrainedsparse.sets.lift_floors`). At most the lowest target density
            :math:`1 - s_l`; layer scope masks every target at its own level already.
        test_gap_max: A bound :math:`\\delta` on the gap between the test-time (``test_rule``) density
            :math:`T` and the expected density :math:`\\bar P`: the pair
            :math:`\\pm(T - \\bar P) - \\delta \\le 0` in the scope of the density constraint, as one
            Cooper constraint of two entries (model-wise ``l0_test_gap``, or per target
            ``l0_test_gap:<param>``; the second entry is logged as ``l0_test_gap_min…``), a restarting
            multiplier per entry, stepped like the density ones. These are *proxy constraints*
            (:meth:`~constrainedsparse.problem.SparsityProblem.add_constraint`): the dual step and the
            restarts read the measured :math:`T`, which has no gradient; the primal Lagrangian has the
            smooth :math:`\\tilde T = \\mathrm{mean}\\,\\sigma((\\log\\alpha - t)/\\tau)` in its place
            (:math:`t` the test rule's threshold, :math:`\\tau` =
            :data:`~constrainedsparse.formulations.l0.gated.TEST_TEMPERATURE`), which pushes gates near
            the threshold across it. With the expected density held at :math:`\\epsilon`
            (``two-sided``), the test-time density is then within :math:`\\delta` of it too: gates left
            at intermediate probabilities had put mnist1d-cnn's test-time density 0.05-0.09 off its
            target. Default 0.01; ``1`` (:data:`TEST_GAP_OFF`) adds no constraint.
    """

    scope: str = hyperparameter(
        "model", "one expected-density constraint over all targets, or one per target", OneOf(SCOPES)
    )
    density_constraint: str = hyperparameter(
        "two-sided", "how the expected density is held to its level", OneOf(DENSITY_CONSTRAINTS)
    )
    density_of: str = hyperparameter(
        "weights",
        "what the level bounds: the targeted weights, or the purged model's (structured MLPs)",
        OneOf(DENSITY_OF),
    )
    dual_restarts: bool = hyperparameter(True, "reset a satisfied inequality's multiplier to 0")
    density_dual_lr: float = hyperparameter(1.0, "gradient-ascent step on the density multipliers", _POSITIVE)
    density_dual_kp: float = hyperparameter(
        0.0,
        "proportional gain of a nuPI update on the density multipliers (0: plain ascent)",
        Bounds(low=0, finite=True),
    )

    min_layer_density: float = hyperparameter(
        0.0,
        "least density of every target in the model-scope hard masks (0: no floor)",
        Bounds(low=0, high=1, high_inclusive=False),
    )
    test_gap_max: float = hyperparameter(
        0.01,
        "bound on |test-time density - expected density|, a proxy constraint (1: no constraint)",
        Bounds(low=0, high=TEST_GAP_OFF, low_inclusive=False),
    )

    def check(self) -> None:
        """``density_of=purged`` needs structured gates in model scope."""
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
class L0PenaltyConfig(GateConfig):
    """Hyperparameters of ``l0-penalty`` (plus the gate ones of :class:`GateConfig`).

    Attributes:
        lmbda: Fixed penalty weight :math:`\\lambda \\ge 0` on the expected density.
    """

    lmbda: float = hyperparameter(1.0, "fixed penalty weight on the expected density", Bounds(low=0, finite=True))
