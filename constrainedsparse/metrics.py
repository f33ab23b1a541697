r"""What a problem reports on its test set: a named metric computed once over the whole set.

A :class:`Metric` is a name, a function of *all* test outputs and targets, and a direction. It is
computed on the concatenated outputs of the whole test set, never as a mean of per-batch values,
so R², AUC or F1 are what their definitions say (a mean of batch R²'s is not the R² of the set).
Summary keys follow the name: ``dense_<name>``, ``hardprune_<name>``, ``retrain_<name>``
(``dense_accuracy`` ... for the default accuracy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from constrainedsparse.errors import UserInputError, is_number

__all__ = ["ACCURACY", "R2", "Metric", "accuracy", "as_metric", "r2"]


def accuracy(output: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((output.argmax(dim=-1) == y).float().mean())


def r2(output: torch.Tensor, y: torch.Tensor) -> float:
    r"""Coefficient of determination :math:`1 - \sum (y - \hat y)^2 / \sum (y - \bar y)^2` (float64).

    Raises:
        UserInputError: For targets that do not vary (one test sample): :math:`R^2` is undefined there.
    """
    prediction = output.reshape(y.shape).to(torch.float64)
    target = y.to(torch.float64)
    residual = float(((target - prediction) ** 2).sum())
    total = float(((target - target.mean()) ** 2).sum())
    if not total > 0:
        raise UserInputError(
            f"metric 'r2': the {target.numel()} test targets do not vary, so R² is undefined there: give a test set "
            "whose targets differ"
        )
    return 1.0 - residual / total


@dataclasses.dataclass(frozen=True)
class Metric:
    """A test-set metric.

    Args:
        name: Names the summary keys (``dense_<name>``) and the logged family (``<name>/test``).
        fn: ``fn(outputs, targets) -> float`` over the whole test set.
        higher_is_better: The direction (for reading; nothing is optimised on it).
    """

    name: str
    fn: Callable[[Any, Any], float]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a metric name must be an identifier (it names summary keys), got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"metric fn must be callable, got {type(self.fn).__name__}")

    def __call__(self, outputs: Any, targets: Any) -> float:
        value = self.fn(outputs, targets)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not is_number(value):
            shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:40]
            raise UserInputError(f"metric {self.name!r} must return one number over the test set, got {shown}")
        if math.isnan(value):  # a figure that means nothing (an overflowing perplexity's inf is one)
            raise UserInputError(f"metric {self.name!r} returned nan over the test set: it must be a number")
        return float(value)

    def describe(self) -> dict[str, Any]:
        """What ``summary.json`` says of the metric."""
        return {"name": self.name, "higher_is_better": self.higher_is_better}


ACCURACY = Metric("accuracy", accuracy, True)
R2 = Metric("r2", r2, True)


def as_metric(metric: Metric | Callable[[Any, Any], float]) -> Metric:
    """A :class:`Metric` from a metric or a plain function (named by the function, ``metric`` for a lambda;
    higher is better)."""
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise ValueError(f"metric must be a Metric or a function, got {type(metric).__name__}")
    if metric is accuracy:
        return ACCURACY
    name = getattr(metric, "__name__", "").strip("_")
    return Metric(name if name.isidentifier() else "metric", metric)  # a lambda is "metric"
