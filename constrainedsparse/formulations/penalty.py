r"""The W-step's gradient of the W = Z terms: :math:`\Lambda_n + \rho(W_n - Z_n)`, added in place.

Every minibatch backpropagates the loss (and the user's constraints); the rest of
:math:`\nabla_W L_\rho` is :math:`\Lambda_n + \rho(W_n - Z_n) = \rho W_n + (\Lambda_n - \rho Z_n)`.
:class:`PenaltyGradient` adds it to each pruned weight's gradient once that gradient is accumulated:
a post-accumulate-grad hook per weight (:meth:`PenaltyGradient.hook`). Inside the formulation's
``backward()`` (:meth:`PenaltyGradient.scope`) the hooks only note the weights and all of them get
the term after the backward, in two foreach calls (the same sums), a weight the backward gave no gradient
(a head this batch did not use) too, as the term is part of every Lagrangian; a backward the user runs on
their own goes through the hooks one tensor at a time (those weights only). The anchor :math:`\Lambda_n - \rho Z_n` is
cached until :math:`\Lambda_n`, :math:`Z_n` or :math:`\rho` changes, so a W-step reads only
:math:`W`, its gradient and the anchor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping

import cooper
import torch

from constrainedsparse.compiling import outside_compile

__all__ = ["PenaltyGradient"]


@dataclasses.dataclass
class _Anchor:
    """:math:`\\Lambda_n - \\rho Z_n` and what it was computed from."""

    rho: float
    value: torch.Tensor
    z: weakref.ref[torch.Tensor]  # not the tensor: a Z the Z-step replaced would stay alive until the next backward
    coefficient: torch.Tensor
    key: tuple[int, int, int]


class PenaltyGradient:
    """Adds :math:`c\\,(\\Lambda_n + \\rho(W_n - Z_n))` to the gradients of the pruned weights.

    Args:
        constraints: The W = Z Cooper constraints by target name (their multipliers are
            :math:`\\Lambda_n`, their penalty coefficients :math:`\\rho`).
        z: The duplicates :math:`Z_n` by target name (read at every use: the Z-step replaces them).
        weights: The pruned weights :math:`W_n` by target name (the parameters the hooks are on).
    """

    def __init__(
        self,
        constraints: Mapping[str, cooper.Constraint],
        z: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor],
    ) -> None:
        self.constraints, self.z, self.weights = constraints, z, weights
        self._anchors: dict[str, _Anchor] = {}
        self._factor: float | torch.Tensor = 1.0  # c: the Lagrangian's scale inside scope()
        self._pending: list[tuple[str, torch.Tensor]] | None = None  # a list inside scope(): hooks defer

    def hook(self, name: str) -> Callable[[torch.Tensor], None]:
        """The post-accumulate-grad hook of target ``name``."""

        def add(param: torch.Tensor) -> None:
            if self._pending is not None:
                self._pending.append((name, param))
            else:
                self.add([(name, param)])

        return outside_compile(add)  # traced, the per-target hooks recompiled once per tensor

    @outside_compile
    @torch.no_grad()
    def add(self, params: list[tuple[str, torch.Tensor]]) -> None:
        """:math:`\\nabla W_n \\mathrel{+}= c\\,(\\rho W_n + \\Lambda_n - \\rho Z_n)` for every ``(name, W_n)``: a few
        foreach calls over all of them."""
        anchors = [self.anchor(name) for name, _ in params]
        rho = anchors[0][0]
        if any(a[0] != rho for a in anchors):  # not from set_rho (one rho for all): one tensor at a time
            for one in params:
                self.add([one])
            return
        grads = [p.grad for _, p in params]
        if any(grad is None for grad in grads):
            name = next(name for (name, _), grad in zip(params, grads, strict=True) if grad is None)
            raise ValueError(
                f"{name} has no gradient to add the W = Z penalty to once backward accumulated it: a hook of yours "
                "stepped and cleared it inside the backward (an optimizer fused into the backward)? slr and admm "
                "add the penalty after the backward: step the optimizer after backward()"
            )
        weights = [p.detach() for _, p in params]
        offsets = [a[1] for a in anchors]
        factor = self._factor
        if isinstance(factor, torch.Tensor):  # a GradScaler's scale, on the device: no host sync
            terms = torch._foreach_add(offsets, weights, alpha=rho)
            torch._foreach_mul_(terms, factor)
            torch._foreach_add_(grads, terms)
        elif factor == 1.0:
            torch._foreach_add_(grads, weights, alpha=rho)
            torch._foreach_add_(grads, offsets)
        else:
            torch._foreach_add_(grads, weights, alpha=rho * factor)
            torch._foreach_add_(grads, offsets, alpha=factor)

    def anchor(self, name: str) -> tuple[float, torch.Tensor]:
        """:math:`(\\rho, \\Lambda_n - \\rho Z_n)`, recomputed only when :math:`\\Lambda_n`, :math:`Z_n` or
        :math:`\\rho` changed (by identity and in-place version)."""
        constraint, z = self.constraints[name], self.z[name]
        lam, coefficient = constraint.multiplier.weight, constraint.penalty_coefficient.value
        key = (lam._version, z._version, coefficient._version)
        anchor = self._anchors.get(name)
        if anchor is None or anchor.z() is not z or anchor.coefficient is not coefficient or anchor.key != key:
            rho = float(coefficient)  # a 0-d CPU tensor: no device sync
            with torch.no_grad():
                value = torch.add(lam.detach().view_as(z), z, alpha=-rho)
            anchor = self._anchors[name] = _Anchor(rho, value, weakref.ref(z), coefficient, key)
        return anchor.rho, anchor.value

    @contextlib.contextmanager
    def scope(self, factor: float | torch.Tensor) -> Iterator[None]:
        """Within: the hooks note the weights; on a normal exit every pruned weight gets the term times
        ``factor``, one without a gradient from the backward as its whole gradient (a zero one before)."""
        outer = self._factor, self._pending  # a scope inside paused() leaves it paused
        self._factor, self._pending = factor, []
        try:
            yield
            pending = self._pending
            if len(pending) < len(self.weights):  # weights this backward did not reach
                reached = {name for name, _ in pending}
                for name, weight in self.weights.items():
                    if name not in reached and weight.requires_grad:  # one frozen since make() stays frozen
                        if weight.grad is None:
                            weight.grad = torch.zeros_like(weight)
                        pending.append((name, weight))
            if pending:
                self.add(pending)
        finally:
            self._factor, self._pending = outer

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within: the hooks note the weights into a list that is then dropped (no penalty gradient)."""
        pending, factor = self._pending, self._factor
        self._pending = []
        try:
            yield
        finally:
            self._pending, self._factor = pending, factor

    def clear(self) -> None:
        """Drops the cached anchors (the constraints are gone)."""
        self._anchors = {}
