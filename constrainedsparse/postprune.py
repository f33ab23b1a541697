"""What every hard-pruned model passes through before it is evaluated and saved: BatchNorm statistics, purge.

A model with BatchNorm layers gets their running statistics re-estimated on training batches
(:func:`batchnorm_stage`, :mod:`constrainedsparse.batchnorm`): the dense ones no longer describe
the pruned weights' activations.

Formulations hold no I/O. When a formulation's hard masks remove whole groups
(:attr:`Formulation.purges`: l0 with structured gates), the runner calls :func:`purge_stage`: the
model is purged to smaller dense modules (:func:`constrainedsparse.purge.purge`), its parameters and
multiply-accumulates are counted before and after, and the purged model is returned for the run
directory to save as ``purged.safetensors``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from constrainedsparse import distributed
from constrainedsparse.batches import tensors_in, to_device
from constrainedsparse.batchnorm import batchnorm_layers, recalibrate_batchnorm
from constrainedsparse.dense import BATCHNORM_PHASE, loader
from constrainedsparse.purge import count_params_and_macs, purge
from constrainedsparse.spec import Problem
from constrainedsparse.targets import TargetParam

__all__ = ["batchnorm_stage", "purge_stage"]


def batchnorm_stage(
    model: nn.Module, problem: Problem, train: Any, batch_size: int, batches: int, seed: int, device: str
) -> dict[str, Any]:
    """Re-estimates the BatchNorm statistics of a hard-pruned model on ``batches`` shuffled training batches.

    Returns:
        ``{"batchnorm_batches": count}`` when the model has BatchNorm layers with running statistics
        and ``batches > 0``; ``{}`` otherwise (nothing ran). Under several processes every rank
        averages over its share of each batch, and rank 0's statistics are kept.
    """
    if batches == 0 or not batchnorm_layers(model):
        return {}
    data = (to_device(batch, device) for batch in loader(train, batch_size, seed, BATCHNORM_PHASE, 0))
    seen = recalibrate_batchnorm(model, data, forward=problem.predict, max_batches=batches)
    distributed.broadcast_buffers(model)
    return {"batchnorm_batches": seen}


def purge_stage(
    model: nn.Module, targets: list[TargetParam], example_batch: Any
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Purges a structured hard-pruned model and reports its size.

    Args:
        model: The hard-pruned model (plain weights).
        targets: The pruned tensors.
        example_batch: One training batch (its first tensor is the model's input, for MAC counting).

    Returns:
        ``(purged model or None, summary fields)``: ``dense_params``/``dense_macs`` and
        ``purged_params``/``purged_macs`` (MACs per sample), the targeted weights' entries before and
        after (``dense_target_params``, ``purged_target_params``), their ratio ``purged_density``
        and ``purged_nonzero_density`` (nonzero entries left in the purged targets over the dense
        targets; below ``purged_density`` where purge keeps a dead channel). A model :func:`purge`
        does not handle gives ``(None, {"purge_skipped": reason})``.
    """
    x = next(tensors_in(example_batch))
    try:
        small = purge(model)
    except ValueError as err:
        return None, {"purge_skipped": str(err)}
    dense_params, dense_macs = count_params_and_macs(model, x)
    purged_params, purged_macs = count_params_and_macs(small, x)
    # purge keeps the child names, so every target has the same name in the small model.
    dense_target = sum(model.get_parameter(t.name).numel() for t in targets)
    purged_target = sum(small.get_parameter(t.name).numel() for t in targets)
    nonzero = sum(int(torch.count_nonzero(small.get_parameter(t.name))) for t in targets)
    return small, {
        "dense_params": dense_params,
        "dense_macs": dense_macs,
        "purged_params": purged_params,
        "purged_macs": purged_macs,
        "dense_target_params": dense_target,
        "purged_target_params": purged_target,
        "purged_density": purged_target / dense_target,
        "purged_nonzero_density": nonzero / dense_target,
    }
