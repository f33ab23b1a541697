"""A layer-wise solver of your own: scores |W_ij| * ||X_j||^p, registered as ``wanda-p``.

``p = 0`` is magnitude pruning, ``p = 1`` Wanda's score; any pattern the library knows works, because
the mask comes from the pattern's own feasible set. Run it: ``python docs/examples/wanda_p.py``
(the walk-through is docs/add-a-solver.md).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from constrainedsparse import LayerwiseSolver, prune_layerwise, register_solver
from constrainedsparse.config import Bounds, Hyperparameters, hyperparameter
from constrainedsparse.layerwise import LayerProblem, LayerResult


@dataclasses.dataclass
class WandaPConfig(Hyperparameters):
    """Hyperparameters of ``wanda-p`` (``--set p=...``, ``prune_layerwise(..., p=...)``)."""

    p: float = hyperparameter(1.0, "exponent of the input norm in the score (0: magnitude, 1: Wanda)", Bounds(low=0))


@register_solver("wanda-p")
class WandaP(LayerwiseSolver):
    """Mask by the score |W_ij| * ||X_j||_2^p, with ||X_j||_2^2 = G_jj; kept weights unchanged."""

    description = "mask by |W| * ||X_j||^p (p = 0: magnitude, p = 1: Wanda); kept weights unchanged"
    Config = WandaPConfig
    supported_patterns = None  # every pattern: the feasible set chooses the mask

    def keeps_dense_weights(self) -> bool:
        return True  # a mask-only solver (the block mask search may then move its masks)

    def prune(self, layer: LayerProblem) -> LayerResult:
        started = time.perf_counter()
        norms = layer.gram.diagonal().clamp_min(0).to(layer.weight.dtype)
        scores = layer.weight.abs() * norms.pow(self.config.p / 2)
        mask = layer.feasible_set().mask(scores)  # the pattern's own top-k: row, N:M, blocks, ...
        weight = layer.weight * mask
        metrics = {"wanda-p/seconds": time.perf_counter() - started}
        return LayerResult(weight=weight, mask=mask, metrics=metrics)


class Net(nn.Module):
    """Two residual blocks in an nn.ModuleList (what prune_layerwise prunes block by block)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        out: torch.Tensor = self.head(x)
        return out


def main() -> None:
    """Prunes the same model with p = 0, 0.5, 1 and with Wanda itself, at 2:4."""
    scale = torch.logspace(-1, 1, 16)  # inputs of very different norms: where p matters
    runs: list[tuple[str, dict[str, Any]]] = [("wanda-p", {"p": p}) for p in (0.0, 0.5, 1.0)] + [("wanda", {})]
    for method, options in runs:
        torch.manual_seed(0)
        model = Net()
        batches = [torch.randn(64, 16) * scale for _ in range(4)]
        report = prune_layerwise(model, batches, method, pattern="2:4", **options)
        error, sparsity = report.mean_layer_error, report.achieved_sparsity
        print(f"{method:<8} {options!s:<11} mean layer error {error:.4f}  sparsity {sparsity:.2f}")


if __name__ == "__main__":
    main()
