r"""Block-output refit: the kept weights of a pruned block fitted to the dense model's block outputs.

Layer-wise solvers make every linear layer reproduce its own dense outputs,
:math:`\min \|WX - \hat W X\|^2`, one layer at a time. What the model needs is the *block's* output: the
attention softmax, the gated MLP's product and the residual stream mix the layers' errors, and the
error of the blocks before arrives in :math:`X`. After a block is pruned, the refit keeps every mask
fixed and lowers

.. math::

    \mathcal{L}(\hat W) = \frac{\sum_b \| f(\hat W; X_b) - Y_b \|^2}{\sum_b \|Y_b\|^2}

over the calibration batches :math:`b` (real tokens only) by Adam on the kept weights of the targeted
layers — each step's gradient is masked and the pruned entries are set back to zero, so the pattern
(N:M included) holds exactly. :math:`X_b` are the block's calibration inputs (the pruned previous
blocks' outputs, as the layer-wise solve saw them); the target :math:`Y_b` is

* ``dense`` (default): the dense model's output of this block on the *dense* model's inputs — the
  refit also absorbs the error the pruned earlier blocks passed on (the walk carries the dense
  trajectory alongside the pruned one, one extra set of activations);
* ``block``: the dense block on the pruned inputs, the layer-wise solve's own target at block level.

This is a refit of the kept weights in the spirit of block-wise reconstruction (as in EBFT / block
reconstruction after one-shot pruning), beyond SparseGPT's, Wanda's and SparseFW's papers, and
applies to any layer-wise method (``--set block_fit_epochs=N``). The per-layer errors a run reports
are those of the layer-wise solve, before the refit; :func:`fit_block` returns the block error before
and after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from constrainedsparse.batches import map_tensors
from constrainedsparse.layerwise.blockinputs import BlockInputs, block_output

__all__ = ["BlockFit", "BlockFitResult", "batch_loss", "block_sums", "compute_inputs", "fit_block", "widened_block"]

TARGETS = ("dense", "block")


@dataclasses.dataclass(frozen=True)
class BlockFit:
    """The block-level steps after every block is pruned: the mask search, then the refit (0: off).

    Args:
        epochs: Passes of Adam over the calibration batches per block (the refit).
        lr: Adam's learning rate.
        target: ``"dense"`` (the dense model's block outputs) or ``"block"`` (the dense block on the
            pruned inputs), for both steps.
        mask_rounds: Rounds of the block-level mask search
            (:mod:`~constrainedsparse.layerwise.blockmask`; mask-only solvers).
    """

    epochs: int = 0
    lr: float = 1e-3
    target: str = "dense"
    mask_rounds: int = 0

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.mask_rounds > 0


@dataclasses.dataclass(frozen=True)
class BlockFitResult:
    """Relative block error :math:`\\mathcal{L}` on the calibration batches before and after the refit; ``reverted``:
    the refit raised the error (a learning rate too large for the block), so the weights went back to before it."""

    before: float
    after: float
    reverted: bool = False


def compute_dtype(target: BlockInputs) -> torch.dtype:
    """The dtype a block computes in under :func:`widened_block`: its outputs' (``target``'s), at least float32."""
    return torch.promote_types(target.hidden.dtype, torch.float32)


def compute_inputs(item: BlockInputs, target: BlockInputs) -> BlockInputs:
    """The call with every floating tensor in :func:`compute_dtype` (a half-precision block computes in float32)."""
    dtype = compute_dtype(target)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return BlockInputs(map_tensors(item.args, cast), map_tensors(item.kwargs, cast), item.token_mask)


Pairs = Sequence[tuple[BlockInputs, BlockInputs]]


def batch_loss(
    block: nn.Module, item: BlockInputs, target: BlockInputs, device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed squared error and summed squared target over the batch's real tokens.

    The batch moves to ``device`` here, one at a time (``activations=cpu`` keeps the rest where it is).
    """
    if device is not None:
        item, target = item.to(device), target.to(device)
    wanted = target.hidden.to(compute_dtype(target))
    error = item.token_sum((block_output(block, compute_inputs(item, target)) - wanted).square())
    return error, item.token_sum(wanted.square())


def block_sums(block: nn.Module, pairs: Pairs, device: torch.device | str | None) -> tuple[float, float]:
    """Summed squared error and summed squared target over every batch."""
    with torch.no_grad():
        sums = [batch_loss(block, item, target, device) for item, target in pairs]
    return float(sum(e for e, _ in sums)), float(sum(t for _, t in sums))


@contextlib.contextmanager
def widened_block(block: nn.Module, modules: Sequence[nn.Module]) -> Iterator[None]:
    """The block computes in float32 or wider with no parameter requiring gradients; every tensor's dtype and flag
    restored after.

    Weights in bfloat16 or float16 (read from ``modules[0]``) are cast to float32 and back; each floating
    parameter and buffer gets its own dtype back (a norm or a buffer the model keeps in float32 stays float32).
    A float32 or float64 block computes as it is (a float64 norm is not rounded through float32).
    """
    dtype = modules[0].weight.dtype
    dtypes = [
        (module, kind, name, tensor.dtype)
        for module in block.modules()
        for kind in ("_parameters", "_buffers")
        for name, tensor in getattr(module, kind).items()
        if tensor is not None and tensor.is_floating_point()
    ]
    if torch.finfo(dtype).bits < 32:
        block.float()
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for module, kind, name, was in dtypes:
            tensor = getattr(module, kind)[name]
            if tensor.dtype != was and kind == "_parameters":
                tensor.data = tensor.data.to(was)  # the same Parameter object
            elif tensor.dtype != was:
                module._buffers[name] = tensor.to(was)


def fit_block(
    block: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    inputs: Sequence[BlockInputs],
    targets: Sequence[BlockInputs],
    fit: BlockFit,
    device: torch.device | str | None = None,
) -> BlockFitResult:
    """Refits the kept weights of ``layers`` (masks fixed) so that ``block(inputs)`` approaches ``targets``.

    Weights in bfloat16 or float16 are refitted in float32 and cast back; float64 ones in float64.

    Args:
        block: The pruned block (its weights are updated in place).
        layers: The block's pruned layers; their zero entries are the masks and stay zero.
        inputs: The block's calibration inputs.
        targets: The target outputs, one per batch (their hidden states).
        fit: Epochs, learning rate.
        device: Where the block computes (each batch moves there in turn); ``None``: where they are.

    Returns:
        The relative block error before and after; a refit that raised it, made it non-finite or left a weight
        beyond the model dtype's range (float16) is undone, and ``after`` is then the error before it.
    """
    pairs = list(zip(inputs, targets))
    weights = [module.weight for _, module in layers]  # the parameters (GPT-2's Conv1D: transposed)
    largest = torch.finfo(weights[0].dtype).max if weights else math.inf  # the model dtype's: float16 holds 65504
    with widened_block(block, [module for _, module in layers]):
        error, energy = block_sums(block, pairs, device)
        scale = 1.0 / max(energy, torch.finfo(torch.float32).tiny)
        saved = [w.detach().clone() for w in weights]
        _adam(block, weights, pairs, fit, scale, device)
        after, _ = block_sums(block, pairs, device)
        beyond = any(float(w.detach().abs().max()) > largest for w in weights)  # cast back, it would be inf
        reverted = not math.isfinite(after) or after > error or beyond  # diverged: the pruned block was better
        if reverted:
            with torch.no_grad():
                for w, before in zip(weights, saved):
                    w.copy_(before)
            after = error
    return BlockFitResult(before=error * scale, after=after * scale, reverted=reverted)


def _adam(
    block: nn.Module,
    weights: list[torch.Tensor],
    pairs: Pairs,
    fit: BlockFit,
    scale: float,
    device: torch.device | str | None,
) -> None:
    """``fit.epochs`` passes of Adam over ``pairs`` on ``weights``, their zero entries held at zero."""
    masks = [w != 0 for w in weights]
    optimizer = torch.optim.Adam(weights, lr=fit.lr)
    with torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        try:
            for _ in range(fit.epochs):
                for item, target in pairs:
                    optimizer.zero_grad(set_to_none=True)
                    error, _ = batch_loss(block, item, target, device)
                    (error * scale).backward()
                    for w, mask in zip(weights, masks):
                        if w.grad is not None:  # None: a layer whose output the block discards
                            w.grad.mul_(mask)
                    optimizer.step()
                    with torch.no_grad():
                        for w, mask in zip(weights, masks):
                            w.mul_(mask)
        finally:
            optimizer.zero_grad(set_to_none=True)  # no gradient left on the model's weights
