"""What a layer-wise pruning run reports: per-layer error and sparsity, and the whole model's sparsity.

Shared by the layer-wise runner (``summary.json``) and :func:`constrainedsparse.prune_layerwise`
(the returned :class:`LayerwiseReport`).
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from constrainedsparse.layerwise.layers import layer_weight
from constrainedsparse.report import model_figures

__all__ = ["LayerwiseReport", "PeakMemory", "pruned_weights", "summarize_layers"]


class PeakMemory:
    """Peak memory of a run: the process's resident set (CPU) and, on CUDA, the device's allocations.

    Args:
        device: The run's device; on CUDA its allocation peak is reset at construction.
    """

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        self.device = device

    def read(self) -> dict[str, int]:
        """``{"cpu_rss_bytes": ..., ["cuda_max_allocated_bytes": ...]}`` (RSS: the process's peak so far)."""
        peak = {"cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.cuda:
            peak["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(self.device)))
        return peak


@torch.no_grad()
def summarize_layers(model: nn.Module, reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-layer and total figures of the pruned layers.

    Args:
        model: The pruned model.
        reports: One mapping per pruned layer with ``name`` (the weight's full name),
            ``relative_error`` and ``seconds`` (a :class:`~constrainedsparse.layerwise.driver.LayerReport`
            as a dict).

    Returns:
        ``achieved_sparsity`` (zeros over the pruned layers), ``layer_sparsity``, ``layer_error``,
        ``mean_layer_error``, ``layer_seconds`` and the whole-model figures of
        :func:`constrainedsparse.report.model_figures` (``model_sparsity``, ``parameters``, ``bytes``).
    """
    modules = dict(model.named_modules())
    zeros, total, layer_sparsity = 0, 0, {}
    for report in reports:
        weight = modules[report["name"].removesuffix(".weight")].weight
        layer_zeros = weight.numel() - int(torch.count_nonzero(weight))
        zeros, total = zeros + layer_zeros, total + weight.numel()
        layer_sparsity[report["name"]] = layer_zeros / weight.numel()
    layer_error = {r["name"]: r["relative_error"] for r in reports}
    return {
        "achieved_sparsity": zeros / total if total else 0.0,
        "layer_sparsity": layer_sparsity,
        "layer_error": layer_error,
        "mean_layer_error": sum(layer_error.values()) / len(layer_error) if layer_error else 0.0,
        "layer_seconds": {r["name"]: r["seconds"] for r in reports},
        **model_figures(model, layer_sparsity),
    }


def pruned_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The pruned layers' weights by name (``(d_out, d_in)``, GPT-2's ``Conv1D`` transposed back)."""
    modules = dict(model.named_modules())
    return {name: layer_weight(modules[name.removesuffix(".weight")]).detach() for name in names}


@dataclasses.dataclass
class LayerwiseReport:
    """What :func:`constrainedsparse.prune_layerwise` returns.

    Attributes:
        method: The solver's name.
        target: The level and pattern (``"0.5 row"``, ``"0.5 unstructured"``, ``"2:4"``).
        mean_layer_error: Mean over the pruned layers of :math:`\\|(W - \\hat W)X\\|^2 / \\|WX\\|^2`.
        layer_error: That error per layer (weight name).
        layer_sparsity: Fraction of zeros per pruned layer.
        achieved_sparsity: Fraction of zeros over all pruned layers.
        model_sparsity: Fraction of zeros over all parameters of the model.
        layer_seconds: Solver wall seconds per layer.
        seconds: Wall seconds of the whole call.
        calibration_tokens: Calibration tokens (rows) each layer's Gram matrix summed.
        layers: Solver metrics per layer (``fw/gap``, ...).
        allocation: With ``allocation="lagrangian"|"owl"``: the levels, the budget met and the rule's
            figures (:class:`~constrainedsparse.layerwise.allocation.Allocation` as a dict).
    """

    method: str
    target: str
    mean_layer_error: float
    layer_error: dict[str, float]
    layer_sparsity: dict[str, float]
    achieved_sparsity: float
    model_sparsity: float
    layer_seconds: dict[str, float]
    seconds: float
    calibration_tokens: int
    layers: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    allocation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able values."""
        return dataclasses.asdict(self)
