r"""Hard-concrete gates (Louizos, Welling & Kingma, 2018) as :mod:`torch.nn.utils.parametrize` parametrizations.

A gated weight is :math:`\theta = \tilde\theta \odot z` with one stochastic gate :math:`z \in [0, 1]`
per weight (``unstructured``) or per group of weights (``structured``: one gate per input neuron of
a Linear layer, i.e. per weight column, and one per output channel of a Conv layer). Each gate has
a learnable location :math:`\log\alpha` and the fixed constants :math:`\gamma = -0.1`,
:math:`\zeta = 1.1`, :math:`\beta = 2/3`:

* training (one draw per Lagrangian, see below): :math:`u \sim U(0, 1)`,
  :math:`s = \sigma\big((\log u - \log(1 - u) + \log\alpha)/\beta\big)`,
  :math:`z = \min(1, \max(0, s(\zeta - \gamma) + \gamma))`;
* evaluation (``test_rule="median"``, the default): the median of the gate's distribution,
  :math:`\hat z = \min(1, \max(0, \sigma(\log\alpha/\beta)(\zeta - \gamma) + \gamma))` (the median of
  :math:`\log u - \log(1 - u)` is 0 and :math:`z` is nondecreasing in it), the test-time gate of
  Gallego-Posada et al. (2022). :math:`\hat z > 0` exactly when :math:`P(z \ne 0) > 1/2`;
* evaluation with ``test_rule="louizos"``: Louizos et al.'s (2018) estimator
  :math:`\hat z = \min(1, \max(0, \sigma(\log\alpha)(\zeta - \gamma) + \gamma))`, which drops the
  temperature and is *not* the median (it is nonzero for :math:`P(z \ne 0) > 0.31`);
* expected :math:`L_0` of a gate: :math:`P(z \ne 0) = \sigma\big(\log\alpha - \beta \log(-\gamma/\zeta)\big)`.

:math:`\log\alpha` starts at :math:`\log(1 - d) - \log d` for an initial drop rate :math:`d` and is
kept in :data:`LOG_ALPHA_RANGE` by :func:`clamp_log_alpha_` (in place, after each optimizer step, so
the gradient is never cut by the clamp).

Sampling draws from an optional :class:`torch.Generator` shared by all gates of a model, whose
state a formulation checkpoints: a resumed run draws exactly the same gates as an uninterrupted one
on any device (the global RNG is used when no generator is given). A gate takes **one draw per
Lagrangian** in training forwards (:meth:`HardConcreteGate.step_sample`; :meth:`~HardConcreteGate.sample`
draws afresh every call): :meth:`HardConcreteGate.redraw` (which the ``l0`` formulations call before every
training evaluation of the Lagrangian, freeing it again after their ``backward()``) draws the uniform noise
from the generator, and every sample until the noise is freed or drawn again computes the gates from it. So
a weight read twice in a forward (tied layers) has one mask per step, a forward that activation
checkpointing (``torch.utils.checkpoint``, ``gradient_checkpointing_enable()``) recomputes inside the
backward, in whatever order, sees the gates the forward used (the checkpoint restores only the global RNG),
and ``torch.compile`` traces the gates without a graph break (the draw happens outside the forward).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from constrainedsparse.masks import find_parametrization, register_parametrization, remove_parametrization
from constrainedsparse.modes import eval_mode
from constrainedsparse.targets import TargetParam

__all__ = [
    "BETA",
    "GAMMA",
    "GROUPINGS",
    "LOG_ALPHA_RANGE",
    "TEST_RULES",
    "ZETA",
    "HardConcreteGate",
    "apply_gates",
    "clamp_log_alpha_",
    "find_gate",
    "gates_of",
    "log_alpha_from_droprate",
    "remove_gates",
]

GAMMA = -0.1
ZETA = 1.1
BETA = 2.0 / 3.0
LOG_ALPHA_RANGE = (-10.0, 10.0)
GROUPINGS = ("unstructured", "structured")
TEST_RULES = ("median", "louizos")
_STRUCTURED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS = 1e-6


def log_alpha_from_droprate(droprate: float) -> float:
    r""":math:`\log\alpha = \log(1 - d) - \log d`, clamped to :data:`LOG_ALPHA_RANGE`.

    Raises:
        ValueError: If ``droprate`` is not in (0, 1).
    """
    if not (0.0 < droprate < 1.0):
        raise ValueError(f"droprate_init must be in (0, 1), got {droprate}")
    low, high = LOG_ALPHA_RANGE
    return min(max(math.log(1.0 - droprate) - math.log(droprate), low), high)


def _group_layout(
    module: nn.Module, weight_shape: torch.Size, grouping: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(gate_shape, view_shape)``: the gates' shape and the shape that broadcasts them over the weight."""
    if grouping == "unstructured":
        return tuple(weight_shape), tuple(weight_shape)
    if grouping != "structured":
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    if isinstance(module, nn.Linear) and len(weight_shape) == 2:
        # One gate per input neuron: column j of W (out x in) is multiplied by z_j.
        return (weight_shape[1],), (1, weight_shape[1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # One gate per output channel: W[c] (in x k...) is multiplied by z_c.
        return (weight_shape[0],), (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    raise ValueError(
        f"structured gates have no grouping rule for {type(module).__name__}; allowed: "
        f"{', '.join(t.__name__ for t in _STRUCTURED_TYPES)} (or use grouping=unstructured)"
    )


class HardConcreteGate(nn.Module):
    r"""Parametrization :math:`\tilde\theta \mapsto \tilde\theta \odot z` with hard-concrete gates.

    Args:
        module: The module owning the weight (picks the structured grouping rule).
        weight_shape: Shape of the gated weight.
        grouping: ``"unstructured"`` (one gate per weight) or ``"structured"`` (per input neuron of
            Linear, per output channel of Conv).
        droprate_init: Initial drop rate :math:`d`; :math:`\log\alpha = \log(1-d) - \log d`.
        generator: Source of the uniform noise (the global RNG if ``None``).
        test_rule: The eval-mode gate: ``"median"`` (the distribution's median) or ``"louizos"``
            (Louizos et al.'s estimator, see the module docstring).

    Raises:
        ValueError: For an unknown grouping or test rule, a layer type without a structured grouping
            rule, or a drop rate outside (0, 1).
    """

    def __init__(
        self,
        module: nn.Module,
        weight_shape: torch.Size,
        grouping: str = "unstructured",
        droprate_init: float = 0.01,
        generator: torch.Generator | None = None,
        test_rule: str = "median",
    ) -> None:
        super().__init__()
        if test_rule not in TEST_RULES:
            raise ValueError(f"test_rule must be one of {', '.join(TEST_RULES)}, got {test_rule!r}")
        self.test_rule = test_rule
        gate_shape, self.view_shape = _group_layout(module, weight_shape, grouping)
        self.grouping = grouping
        self.group_size = math.prod(weight_shape) // math.prod(gate_shape)
        self.generator = generator
        self.log_alpha = nn.Parameter(torch.full(gate_shape, log_alpha_from_droprate(droprate_init)))
        self._measured: tuple[int, torch.Tensor | None] = (-1, None)  # (log_alpha version, expected density)
        self._noise: torch.Tensor | None = None  # this Lagrangian's uniform noise (drawn by redraw)
        self.test_override: torch.Tensor | None = None
        """When set, the gate over the weight in either mode (a hard-prune preview), instead of a sample or
        :meth:`test_gate`."""

    @property
    def num_gates(self) -> int:
        """Number of gates (groups)."""
        return self.log_alpha.numel()

    def _uniform(self, generator: torch.Generator | None) -> torch.Tensor:
        """Uniform noise of the gates' shape, kept away from 0 and 1."""
        return torch.rand(
            self.log_alpha.shape, generator=generator, device=self.log_alpha.device, dtype=self.log_alpha.dtype
        ).clamp(_EPS, 1.0 - _EPS)

    def _gate(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`z = \min(1, \max(0, s(\zeta - \gamma) + \gamma))` with
        :math:`s = \sigma((\log u - \log(1 - u) + \log\alpha) / \beta)`, differentiable in :math:`\log\alpha`."""
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""One fresh draw :math:`z` (differentiable in :math:`\log\alpha`) from ``generator`` (default: the gate's
        own, or the global RNG without one)."""
        return self._gate(self._uniform(self.generator if generator is None else generator))

    def step_sample(self) -> torch.Tensor:
        """The gate in a training forward: the Lagrangian's draw. The noise comes from the last :meth:`redraw` (made
        at the first call if there was none), so every read until the next one (a weight read again, a forward
        recomputed by activation checkpointing) sees the same gates; a gate on the global RNG draws afresh."""
        if self.generator is None:  # the global RNG, which torch.utils.checkpoint restores itself
            return self.sample()
        noise = self._noise
        if noise is None or noise.device != self.log_alpha.device or noise.dtype != self.log_alpha.dtype:
            self.redraw()
            noise = self._noise
        return self._gate(noise)

    def release_noise(self) -> None:
        """Frees the noise of the last :meth:`redraw` (a later training forward draws anew)."""
        self._noise = None

    def redraw(self) -> None:
        """Draws the noise of the next Lagrangian from the gate's generator (a formulation calls it before each):
        outside the forward, so a compiled model traces the gates without a graph break."""
        if self.generator is not None:
            self._noise = self._uniform(self.generator)

    def median(self) -> torch.Tensor:
        r"""Median of every gate, :math:`\hat z = \min(1, \max(0, \sigma(\log\alpha/\beta)(\zeta - \gamma) + \gamma))`.

        :math:`z` is a nondecreasing function of :math:`\log u - \log(1 - u)`, whose median is 0, so
        :math:`P(z \le \hat z) \ge 1/2` and :math:`P(z \ge \hat z) \ge 1/2` (strictly inside (0, 1)
        half the draws lie below :math:`\hat z`); :math:`\hat z > 0` exactly when :math:`P(z \ne 0) > 1/2`.
        """
        return (torch.sigmoid(self.log_alpha / BETA) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def louizos_estimate(self) -> torch.Tensor:
        r"""Louizos et al.'s test-time estimator :math:`\min(1, \max(0, \sigma(\log\alpha)(\zeta - \gamma) + \gamma))`
        (not the median: it omits the temperature :math:`\beta`)."""
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def test_gate(self) -> torch.Tensor:
        """The eval-mode gate of ``test_rule``: :meth:`median` or :meth:`louizos_estimate`."""
        return self.median() if self.test_rule == "median" else self.louizos_estimate()

    def prob_nonzero(self) -> torch.Tensor:
        r"""Expected :math:`L_0` per gate, :math:`P(z \ne 0) = \sigma(\log\alpha - \beta\log(-\gamma/\zeta))`."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def expected_density(self) -> torch.Tensor:
        """Expected fraction of nonzero weights (every gate covers the same number of weights)."""
        value = self.prob_nonzero().mean()
        self._measured = (self.log_alpha._version, value.detach())
        return value

    @torch.no_grad()
    def measured_expected_density(self) -> torch.Tensor:
        """:meth:`expected_density` without gradient, the value already computed for the current
        :math:`\\log\\alpha` when there is one (its in-place version unchanged): no second pass over the gates."""
        version, value = self._measured
        if value is not None and version == self.log_alpha._version:
            return value
        return self.expected_density()

    def test_threshold(self) -> float:
        r""":math:`t` with test-time gate :math:`> 0` exactly when :math:`\log\alpha > t`: the median is
        positive when :math:`\sigma(\log\alpha/\beta) > -\gamma/(\zeta - \gamma)`, Louizos et al.'s estimator
        when :math:`\sigma(\log\alpha) > -\gamma/(\zeta - \gamma)`."""
        cut = math.log(-GAMMA / ZETA)  # logit(-gamma / (zeta - gamma))
        return BETA * cut if self.test_rule == "median" else cut

    @torch.no_grad()
    def measured_test_density(self) -> torch.Tensor:
        """:meth:`test_density` by the threshold, :math:`\\mathrm{mean}\\,[\\log\\alpha > t]`: one comparison, no
        gradient, on the device (what the test-gap constraint of ``l0`` measures every step)."""
        return (self.log_alpha > self.test_threshold()).float().mean()

    def soft_test_density(self, temperature: float) -> torch.Tensor:
        r"""A smooth :meth:`test_density`, :math:`\mathrm{mean}\,\sigma((\log\alpha - t)/\tau)` with
        :math:`t` = :meth:`test_threshold` and :math:`\tau` = ``temperature`` (differentiable in :math:`\log\alpha`)."""
        return torch.sigmoid((self.log_alpha - self.test_threshold()) / temperature).mean()

    def test_density(self) -> torch.Tensor:
        """Fraction of gates that are nonzero at test time (:meth:`test_gate`)."""
        return (self.test_gate() > 0).float().mean()

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Gate values shaped to broadcast over the weight."""
        return z.reshape(self.view_shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # The gates stay float32 (their log alpha trains there); the product keeps the weight's dtype.
        if self.test_override is not None:  # a preview: the same in train and eval mode
            return weight * self.test_override.to(weight.dtype)
        z = self.step_sample() if self.training else self.test_gate()
        return weight * self.expand(z).to(weight.dtype)


def find_gate(module: nn.Module, param_name: str) -> HardConcreteGate | None:
    """The :class:`HardConcreteGate` parametrizing ``module.<param_name>``, if any."""
    return find_parametrization(module, param_name, HardConcreteGate)


def apply_gates(
    targets: Iterable[TargetParam],
    grouping: str = "unstructured",
    droprate_init: float = 0.01,
    generator: torch.Generator | None = None,
    test_rule: str = "median",
) -> dict[str, HardConcreteGate]:
    """Registers a gate on every target (all layers are checked before any is touched).

    Returns:
        ``{param name: gate}`` in target order.

    Raises:
        ValueError: See :class:`HardConcreteGate` (names the offending parameter).
    """
    targets = list(targets)
    gates = {}
    for t in targets:
        try:
            gate = HardConcreteGate(t.module, t.tensor.shape, grouping, droprate_init, generator, test_rule)
        except ValueError as err:
            raise ValueError(f"{t.name}: {err}") from None
        gates[t.name] = gate.to(t.tensor.device)
    for t in targets:
        register_parametrization(t.module, t.param_name, gates[t.name])
    return gates


def gates_of(targets: Iterable[TargetParam]) -> Iterator[tuple[str, HardConcreteGate]]:
    """``(param name, gate)`` for every gated target."""
    for t in targets:
        gate = find_gate(t.module, t.param_name)
        if gate is not None:
            yield t.name, gate


@torch.no_grad()
def clamp_log_alpha_(gates: Iterable[HardConcreteGate]) -> None:
    r"""Keeps every :math:`\log\alpha` in :data:`LOG_ALPHA_RANGE` (in place)."""
    low, high = LOG_ALPHA_RANGE
    for gate in gates:
        gate.log_alpha.clamp_(low, high)


@torch.no_grad()
def remove_gates(targets: Iterable[TargetParam]) -> None:
    r"""Bakes :math:`\tilde\theta \odot \hat z` (the test-time gates, :meth:`HardConcreteGate.test_gate`) into
    plain weights.

    Every parametrization of a gated target is removed, whatever mode the model is in.
    """
    for t in targets:
        gate = find_gate(t.module, t.param_name)
        if gate is None:
            continue
        with eval_mode(gate):
            remove_parametrization(t.module, t.param_name, leave_parametrized=True)
