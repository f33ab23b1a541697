"""The layer-wise driver's own ``--set`` keys (:class:`DriverSettings`), for the CLI runner and
:func:`~constrainedsparse.prune_layerwise` alike."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from constrainedsparse.config import Bounds, DeviceName, Hyperparameters, OneOf, hyperparameter
from constrainedsparse.layerwise.blockfit import TARGETS, BlockFit
from constrainedsparse.layerwise.driver import GRAM_DTYPES
from constrainedsparse.targets import SparsityConfig

__all__ = ["DTYPES", "MASK_SCOPES", "DriverSettings", "scope_field"]

DTYPES = ("float32", "bfloat16", "float16")
MASK_SCOPES = {"row": "row", "layer": "unstructured"}
"""The pattern a ``--sparsity`` target gets per ``mask_scope``."""


def scope_field(target: SparsityConfig) -> dict[str, str]:
    """``summary.json``'s ``mask_scope`` of a target whose pattern is a scope's (``--pattern unstructured``
    too: ``layer``); none for other patterns (N:M, blocks)."""
    scopes = [scope for scope, pattern in MASK_SCOPES.items() if pattern == target.pattern]
    return {"mask_scope": scopes[0]} if scopes else {}


@dataclasses.dataclass
class DriverSettings(Hyperparameters):
    """The layer-wise driver's own ``--set`` keys.

    Attributes:
        mask_scope: ``row`` (every output row keeps the same count, Wanda's comparison group) or
            ``layer`` (one count for the whole layer, SparseGPT's) for ``--sparsity`` targets.
        gram_dtype: Accumulation dtype of the calibration Gram matrices.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    error_prefix: ClassVar[str] = "--set "
    mask_scope: str = hyperparameter(
        "row", "a --sparsity target per output row or per layer", OneOf(tuple(MASK_SCOPES))
    )
    gram_dtype: str = hyperparameter("float32", "accumulation dtype of the Gram matrices", OneOf(tuple(GRAM_DTYPES)))
    device: str = hyperparameter("cpu", "where the run computes (auto: CUDA when available)", DeviceName())
    allow_empty_layers: bool = hyperparameter(False, "let the level leave a targeted layer without any weight")
    offload: bool = hyperparameter(
        False, "keep the model on the CPU and move one block at a time to the device (models larger than it)"
    )
    activations: str = hyperparameter(
        "device", "where the calibration activations between blocks live", OneOf(("device", "cpu"))
    )
    true_sequential: bool = hyperparameter(
        False, "prune a block's layers group by group (those sharing an input, in call order), each from the "
        "block with the earlier groups pruned (GPTQ's order); false: all from the dense block (SparseGPT's, Wanda's)",
    )  # fmt: skip
    dtype: str = hyperparameter(
        "float32", "dtype of the model's weights (Gram matrices stay float32/64)", OneOf(DTYPES)
    )
    allocation: str = hyperparameter(
        "uniform", "per-layer levels: every layer at --sparsity, chosen by Lagrangian relaxation, or by OWL's "
        "outlier ratios (the published baseline)",
        OneOf(("uniform", "lagrangian", "owl")),
    )  # fmt: skip
    allocation_min: float = hyperparameter(
        0.0, "lowest level a layer may get (lagrangian, owl; <= allocation_max)", Bounds(0, 1, True, False)
    )
    allocation_max: float = hyperparameter(
        0.95, "highest level a layer may get (lagrangian, owl)", Bounds(0, 1, True, False)
    )
    allocation_weight: str = hyperparameter(
        "block", "what the allocation sums: relative layer errors (equal), absolute errors (energy), or each "
        "layer's relative change of its block's output (block)",
        OneOf(("equal", "energy", "block")),
    )  # fmt: skip
    allocation_step: float = hyperparameter(
        0.1, "spacing of the levels each layer's error curve is measured at", Bounds(0, 1, False, False)
    )
    owl_m: float = hyperparameter(5.0, "owl: a score is an outlier above owl_m x its block's mean", Bounds(low=0))
    owl_lambda: float = hyperparameter(
        0.08, "owl: block levels spread over [S - owl_lambda, S + owl_lambda]", Bounds(0, 1, True, False)
    )

    block_fit_epochs: int = hyperparameter(
        0, "after each block is pruned, epochs of Adam on its kept weights towards the dense block outputs "
        "(masks fixed; 0: off)",
        Bounds(low=0, integer=True),
    )  # fmt: skip
    block_fit_lr: float = hyperparameter(
        1e-3, "Adam's learning rate of the block refit", Bounds(low=0, low_inclusive=False, finite=True)
    )
    block_fit_target: str = hyperparameter(
        "dense", "the target of the block refit and mask search: the dense model's block outputs, or the dense "
        "block on the pruned inputs",
        OneOf(TARGETS),
    )  # fmt: skip

    block_mask_rounds: int = hyperparameter(
        0, "after each block is pruned, rounds of the block-level mask search towards the block_fit_target "
        "outputs (masks move, weights stay dense; magnitude, wanda, fw without reconstruct; 0: off)",
        Bounds(low=0, integer=True),
    )  # fmt: skip

    def block_fit(self) -> BlockFit:
        """The block-level steps these settings ask for (``enabled`` False when both are 0)."""
        return BlockFit(
            epochs=self.block_fit_epochs,
            lr=self.block_fit_lr,
            target=self.block_fit_target,
            mask_rounds=self.block_mask_rounds,
        )

    def check(self) -> None:
        """``allocation_min <= allocation_max``."""
        if self.allocation_min > self.allocation_max:
            raise ValueError(
                f"{self.error_prefix}allocation_min={self.allocation_min} is above allocation_max={self.allocation_max}"
            )
