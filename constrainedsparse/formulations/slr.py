r"""SLR: Surrogate Lagrangian Relaxation on the W = Z core (Zhou, Bragin et al.).

Coordination iteration :math:`k` (after the W-steps that produced :math:`W^k`):

.. math::
    \alpha^k &= 1 - \frac{1}{M\,k^{\,1 - 1/k^{r}}} \\
    (6)\ \ & L_\rho(W^k, Z^{k-1}, \Lambda^{k-1}) < L_\rho(W^{k-1}, Z^{k-1}, \Lambda^{k-1})
      \ \Rightarrow\ s'^k = \alpha^k s^{k-1}
      \frac{\lVert W^{k-1} - Z^{k-1}\rVert}{\lVert W^k - Z^{k-1}\rVert},\quad
      \Lambda' = \Lambda^{k-1} + s'^k (W^k - Z^{k-1}) \\
    & Z^k = \Pi_C(W^k + \Lambda'/\rho) \\
    (11)\ \ & L_\rho(W^k, Z^k, \Lambda') < L_\rho(W^k, Z^{k-1}, \Lambda')
      \ \Rightarrow\ s^k = \alpha^k s'^k
      \frac{\lVert W^{k-1} - Z^{k-1}\rVert}{\lVert W^k - Z^k\rVert},\quad
      \Lambda^k = \Lambda' + s^k (W^k - Z^k)

with :math:`s^0 = s_0`. When a condition fails its multiplier update is skipped and the step size is
carried over (:math:`s'^k = s^{k-1}`, resp. :math:`s^k = s'^k`); so is it when a norm in a ratio is
zero, which keeps every step size positive. With the user's SGD both step sizes are capped at :math:`\rho`,
ADMM's dual step (:func:`capped_step`): the ratios grow them whenever the residual shrinks, and beyond
:math:`\rho` a dual step overshoots what a W-step of a few SGD updates can follow (measured: :math:`s` rising
above :math:`3\rho` made :math:`\Lambda` and the run diverge, ``benchmarks/sgd_stability.py``). Capping only
lowers a step, so the step sizes still shrink as the method's convergence needs. Adam and the other adaptive
optimizers keep the rule as it is (the papers' setting reaches :math:`1.16\rho` on digits-mlp; the defaults
stay below :math:`0.5\rho`).

**Estimating** :math:`L_\rho` **in condition (6).** Both sides need :math:`f` on the same data:
:math:`f` is the loss on one fixed reference batch of training samples (drawn once per run), in
eval mode. :math:`f(W^{k-1})` is the value measured on that batch at iteration :math:`k-1`, and the
penalty terms on both sides use the current :math:`\Lambda = \Lambda^{k-1}` and :math:`\rho`. Those terms
of the right-hand side, :math:`\lVert W^{k-1} - Z^{k-1}\rVert^2` and
:math:`\langle\Lambda^{k-1}, W^{k-1} - Z^{k-1}\rangle` per tensor, are measured at the end of iteration
:math:`k-1` (:meth:`SLR.end_iteration`; :math:`\Lambda` and both points do not change in between, and
:math:`\rho` enters only as the factor of the squares): the same numbers as from copies of
:math:`W^{k-1}`, without keeping a copy. In condition (11) :math:`W^k` is the same on both sides, so
:math:`f` cancels exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from constrainedsparse.config import Bounds, hyperparameter
from constrainedsparse.errors import UserInputError
from constrainedsparse.formulations.duplicate import DuplicateConfig, DuplicateVariables
from constrainedsparse.formulations.factory import register_formulation
from constrainedsparse.formulations.iterate import Iterate, dots

__all__ = ["SLR", "SLRConfig", "slr_alpha"]


def slr_alpha(k: int, M: float, r: float) -> float:
    r""":math:`\alpha^k = 1 - 1/(M\,k^{1 - 1/k^r})` for iteration :math:`k \ge 1` (in (0, 1) for M > 1)."""
    return 1.0 - 1.0 / (M * k ** (1.0 - 1.0 / k**r))


@dataclasses.dataclass
class SLRConfig(DuplicateConfig):
    """Hyperparameters of ``slr`` (plus the shared ones of :class:`DuplicateConfig`).

    Attributes:
        s0: Initial dual step size :math:`s^0 > 0`. 0.001 (the papers use 0.01): SLR's step then
            grows with the ratio of residual norms as :math:`\\rho` grows; 0.01 and above move
            :math:`\\Lambda` too far early at 90-95 % sparsity (``benchmarks/slr_vs_admm.py``).
        M: :math:`M > 1` in :math:`\\alpha^k`.
        r: :math:`r \\in (0, 1)` in :math:`\\alpha^k`.
        reference_samples: Size of the fixed training batch on which :math:`f` is compared in
            condition (6). 32: a forward of 32 samples every coordination was about 3 % of a
            ResNet-18 step at batch 32 when it coordinated every 10 steps (128 cost 15 %), and
            the accuracies of ``benchmarks/slr_vs_admm.py`` are the same within 0.3 points.
    """

    s0: float = hyperparameter(0.001, "initial dual step size s^0", Bounds(low=0, low_inclusive=False))
    M: float = hyperparameter(300.0, "M in alpha^k = 1 - 1/(M k^(1 - 1/k^r))", Bounds(low=1, low_inclusive=False))
    r: float = hyperparameter(0.1, "r in alpha^k", Bounds(0, 1, low_inclusive=False, high_inclusive=False))
    reference_samples: int = hyperparameter(
        32, "training samples of the fixed batch on which f is compared in condition (6)", Bounds(low=1, integer=True)
    )


@dataclasses.dataclass
class _Previous:
    """Per tensor, :math:`\\lVert W^{k-1} - Z^{k-1}\\rVert^2` and
    :math:`\\langle\\Lambda^{k-1}, W^{k-1} - Z^{k-1}\\rangle`."""

    residual_sq: list[float]
    linear: list[float]


def _ratio_step(alpha: float, step: float, numerator: float, denominator: float) -> float:
    if numerator > 0 and denominator > 0:
        return alpha * step * numerator / denominator
    return step


def capped_step(step: float, cap: float) -> float:
    """A step size of the rule, at most ``cap`` (:math:`\\rho` with the user's SGD; see the module docstring)."""
    return min(step, cap)


@register_formulation("slr")
class SLR(DuplicateVariables):
    """Surrogate Lagrangian Relaxation on W = Z: dual steps only when a surrogate condition holds."""

    description = "surrogate Lagrangian relaxation with duplicate variables W = Z (retrain-free pruning)"
    Config = SLRConfig
    config: SLRConfig
    _optional_state_keys = DuplicateVariables._optional_state_keys | {"previous"}  # older: a copy w_prev
    needs_objective = True

    def attach(self) -> None:
        """The W = Z core, then :math:`s = s_0`; :math:`f(W^0)` is measured at :meth:`setup`."""
        super().attach()
        self.step_size = self.config.s0  # s^k
        self.s_prime = self.config.s0  # s'^k of the latest iteration
        self.f_prev: float | None = None
        self.previous: _Previous | None = None  # the terms of W^{k-1} - Z^{k-1} in condition (6)

    @classmethod
    def reference_samples_for(cls, config: SLRConfig) -> int:
        return config.reference_samples

    def on_setup(self) -> None:
        """Measures :math:`f(W^0)` on the reference batch and the terms of :math:`W^0 - Z^0` (replaced when
        resuming from a checkpoint)."""
        super().on_setup()
        if self.f_prev is None:
            f_value = self.objective()
            if not math.isfinite(f_value):  # every condition (6) would fail: Λ would never move
                raise UserInputError(
                    f"slr: the loss on the reference batch is {f_value} (not finite), and slr compares it between "
                    "coordinations: the reference batch (setup()'s reference_batch; in a run, samples of the "
                    "problem's training data) must give a finite loss"
                )
            self.f_prev = f_value
        if self.previous is None:
            self.previous = self._measure(self.weights())

    @torch.no_grad()
    def _measure(self, w: dict[str, torch.Tensor]) -> _Previous:
        """The terms of condition (6) for the point ``w`` against the current :math:`Z` and :math:`\\Lambda`."""
        names = list(w)
        return self._terms(dict(zip(names, torch._foreach_sub([w[n] for n in names], [self.z[n] for n in names]))))

    def _terms(self, residual: dict[str, torch.Tensor]) -> _Previous:
        """:math:`\\lVert r_n\\rVert^2` and :math:`\\langle\\Lambda_n, r_n\\rangle` of every residual :math:`r_n`
        (one host transfer)."""
        lam = self.multipliers()
        values = dots([(r, r) for r in residual.values()] + [(lam[n], r) for n, r in residual.items()])
        m = len(residual)
        return _Previous(values[:m], values[m:])

    def _cap(self) -> float:
        """The largest step size: :math:`\\rho` with the user's SGD, none otherwise (module docstring)."""
        return self.rho if self.penalty_rule.sgd else float("inf")

    def dual_step_before_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        alpha = it.notes["alpha"] = slr_alpha(self.k, self.config.M, self.config.r)
        names = list(it.w)
        terms = self._terms(it.residual_before_z)
        now_sq, now_linear = terms.residual_sq, terms.linear
        assert self.previous is not None, "setup() measures the terms of W^0 - Z^0"
        prev_sq, prev_linear = self.previous.residual_sq, self.previous.linear
        it.residual_sq_before_z = dict(zip(names, now_sq))
        prev_gap = it.notes["prev_gap"] = sum(prev_sq) ** 0.5
        now = self.augmented_lagrangian(it.f_value, now_linear, now_sq)
        before = self.augmented_lagrangian(self.f_prev, prev_linear, prev_sq)
        holds = now < before
        gap = sum(now_sq) ** 0.5
        s_prime = capped_step(
            _ratio_step(alpha, self.step_size, prev_gap, gap) if holds else self.step_size, self._cap()
        )
        self.s_prime = it.notes["s_prime"] = s_prime
        metrics = {
            "stepsize/alpha": alpha,
            "condition/6_holds": float(holds),
            "lagrangian/L_rho": now,
            "lagrangian/f_reference": it.f_value,
            "stepsize/s_prime": s_prime,
        }
        return (s_prime if holds else None), metrics

    def dual_step_after_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        lam = self.multipliers()  # Lambda' (after the first update, if any)
        names = list(it.w)
        residual, before_z = it.residual, it.residual_before_z
        pairs = [(residual[n], residual[n]) for n in names] + [(lam[n], residual[n]) for n in names]
        pairs += [(lam[n], before_z[n]) for n in names]
        values = dots(pairs)  # every dot of condition (11), one host transfer
        m = len(names)
        now_sq, now_linear, before_linear = (values[i * m : (i + 1) * m] for i in range(3))
        it.residual_sq = dict(zip(names, now_sq))
        after = self.augmented_lagrangian(it.f_value, now_linear, now_sq)
        holds = after < self.augmented_lagrangian(it.f_value, before_linear, list(it.residual_sq_before_z.values()))
        gap = sum(now_sq) ** 0.5
        alpha, s_prime, prev_gap = it.notes["alpha"], it.notes["s_prime"], it.notes["prev_gap"]
        self.step_size = capped_step(_ratio_step(alpha, s_prime, prev_gap, gap) if holds else s_prime, self._cap())
        self.f_prev = it.f_value
        it.residual_linear = dict(zip(names, now_linear))  # <Lambda^k, W^k - Z^k> unless the update changes Lambda
        it.notes["updated_after_z"] = float(holds)  # then end_iteration measures it again
        return (self.step_size if holds else None), {"condition/11_holds": float(holds), "stepsize/s": self.step_size}

    def end_iteration(self, it: Iterate) -> None:
        """Keeps :math:`\\lVert W^k - Z^k\\rVert^2` and :math:`\\langle\\Lambda^k, W^k - Z^k\\rangle` per tensor for
        condition (6) of iteration :math:`k + 1` (the second measured after the update of (11), if any)."""
        assert it.residual_sq is not None and it.residual_linear is not None
        linear = list(it.residual_linear.values())
        if it.notes["updated_after_z"]:
            lam = self.multipliers()
            linear = dots([(lam[n], it.residual[n]) for n in it.w])
        self.previous = _Previous(list(it.residual_sq.values()), linear)

    def state_dict(self) -> dict[str, Any]:
        previous = dataclasses.asdict(self.previous) if self.previous is not None else None
        return {**super().state_dict(), "step_size": self.step_size, "f_prev": self.f_prev, "previous": previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; a checkpoint of an older version (a copy ``w_prev`` of :math:`W^{k-1}`
        instead of its terms) is converted with the restored :math:`Z` and :math:`\\Lambda`."""
        super().load_state_dict(state)
        self.step_size = state["step_size"]
        self.f_prev = state["f_prev"]
        if state.get("previous") is not None:
            self.previous = _Previous(**state["previous"])
        elif "w_prev" in state:
            device = next(iter(self.z.values())).device
            self.previous = self._measure({n: w.to(device) for n, w in state["w_prev"].items()})
        # else: a state saved before setup(), which measures the previous iterate: this setup's stands
