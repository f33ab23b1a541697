r"""Block-sequential calibration driver: capture, accumulate Gram matrices, prune, propagate.

For a model made of a list of blocks (transformer layers), the driver

1. runs the calibration batches through the model once and captures the inputs of the first
   block to prune (positional and keyword arguments: hidden states, attention masks, position
   embeddings — whatever the model passes its blocks);
2. for each block: runs it on the captured inputs with hooks that add
   :math:`G \mathrel{+}= X_b^\top X_b` for every targeted linear layer (only the rows of real
   tokens: a batch's ``attention_mask`` marks padding), so memory is :math:`O(d_{in}^2)` per layer
   and activations are never stored beyond one block's inputs;
3. prunes every targeted layer of the block with the solver (all from the dense block's Gram
   matrices; with ``true_sequential``, group by group: steps 2 and 3 repeat for the layers that
   share an input, on the block with the earlier groups pruned);
4. runs the *pruned* block to produce the next block's inputs (where the model computes something
   between two blocks, e.g. an activation between bare ``nn.Linear`` blocks or a residual sum
   outside them, it runs the model up to the next block instead).

``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored transposed, ``(d_in, d_out)``) are handled;
solvers always see :math:`W` as ``(d_out, d_in)``.

**Several processes** (``torchrun`` / ``--nproc``): rank r runs the calibration batches
r, r + N, ... (capture, Gram accumulation and propagation are data-parallel); the Gram matrices and
token counts are summed over ranks with one all-reduce per layer, so every rank holds the same
:math:`G`. The block's layers are then dealt out to the ranks by estimated cost
(:func:`assign_layers`), each rank solves its own layers, and every pruned weight and its report
are broadcast from the rank that solved it: all ranks end every block with the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from constrainedsparse import distributed
from constrainedsparse.batches import tensors_in, to_device
from constrainedsparse.errors import UserInputError
from constrainedsparse.layerwise.base import LayerProblem, LayerwiseSolver, solve
from constrainedsparse.layerwise.blockfit import BlockFit
from constrainedsparse.layerwise.blockinputs import BlockInputs, block_output
from constrainedsparse.layerwise.blocksteps import block_steps, dense_layers
from constrainedsparse.layerwise.capture import (
    BlockChain,
    blocks_chained,
    call_model,
    capture_block_calls,
    capture_block_inputs,
    refuse_cache,
)
from constrainedsparse.layerwise.grams import accumulate_grams
from constrainedsparse.layerwise.layers import (
    check_in_range,
    layer_weight,
    set_layer_weight,
    targeted_layers,
    weight_name,
    written_dtype,
    written_weight,
)
from constrainedsparse.layerwise.sequential import block_groups
from constrainedsparse.targets import SparsityConfig, Targets

__all__ = [
    "BlockInputs",
    "accumulate_grams",
    "call_model",
    "assign_layers",
    "block_output",
    "block_prefixes",
    "LayerReport",
    "capture_block_inputs",
    "prune_block",
    "prune_blocks",
    "run_block",
    "walk_blocks",
    "walk_chained",
    "walk_inputs",
]

GRAM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: Sequence[BlockInputs], device: torch.device | str | None = None
) -> list[BlockInputs]:
    """The block's outputs on every batch, as the next block's inputs.

    With ``device``, each batch runs there and its outputs return to where its inputs were
    (activations kept on the CPU while the block computes on the GPU).
    """
    outputs = []
    for item in inputs:
        home = item.hidden.device
        call = item.to(device) if device is not None else item
        hidden = block_output(block, call)
        outputs.append(item.with_hidden(hidden.to(home)))
    return outputs


@torch.no_grad()
def assign_layers(costs: Sequence[float], ranks: int) -> list[int]:
    """Owner rank of every layer: greedy longest-first onto the least-loaded rank (deterministic).

    Args:
        costs: Estimated cost of each layer (the driver uses :math:`d_{out} d_{in}^2`).
        ranks: Number of ranks.

    Returns:
        One rank per layer, in the order of ``costs``.
    """
    loads = [0.0] * ranks
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


@dataclasses.dataclass
class LayerReport:
    """What happened to one layer: its error on the calibration inputs, its fraction of zeros, time and solver
    metrics."""

    name: str
    relative_error: float
    sparsity: float
    seconds: float
    tokens: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    trace: list[dict[str, float]] = dataclasses.field(default_factory=list)


@torch.no_grad()
def prune_block(
    block: nn.Module,
    prefix: str,
    targets: Targets,
    target: SparsityConfig,
    solver: LayerwiseSolver,
    inputs: Sequence[BlockInputs],
    gram_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    levels: Mapping[str, SparsityConfig] | None = None,
    true_sequential: bool = False,
) -> list[LayerReport]:
    """Prunes every targeted linear layer of ``block`` in place from its calibration Gram matrix.

    Args:
        block: The block (modified in place).
        prefix: The block's name in the model, prepended to layer names (``encoder.layer.0``).
        targets: Which layers of the block are pruned.
        target: Level and pattern.
        solver: The layer-wise solver.
        inputs: The block's calibration inputs.
        gram_dtype: Accumulation dtype of the Gram matrices.
        device: Where the block computes (each batch of ``inputs`` moves there); ``None``: in place.
        levels: Per-layer targets by weight name (an allocation); a layer not named gets ``target``.
        true_sequential: Prune the layers group by group (those sharing an input, in call order),
            each group from the block with the earlier groups pruned
            (:mod:`~constrainedsparse.layerwise.sequential`); otherwise all from the dense block.

    Returns:
        One :class:`LayerReport` per pruned layer, in the block's module order.
    """
    layers = targeted_layers(block, targets, prefix)
    if not true_sequential:
        grams = accumulate_grams(block, layers, inputs, gram_dtype, device, prefix=prefix)
        return _solve_layers(prefix, layers, grams, target, solver, levels)
    groups = block_groups(block, layers, inputs, device)
    if groups.uncalled:  # before any group is pruned: refuses a layer no batch reaches (the first one did not)
        accumulate_grams(
            block, [(n, m) for n, m in layers if n in groups.uncalled], inputs, device=device, prefix=prefix
        )
    reports: dict[str, LayerReport] = {}
    for group in groups:
        stop = group[-1][0] if groups.called_once else None
        grams = accumulate_grams(block, group, inputs, gram_dtype, device, stop_after=stop, prefix=prefix)
        reports.update(zip((name for name, _ in group), _solve_layers(prefix, group, grams, target, solver, levels)))
    return [reports[name] for name, _ in layers]


def _solve_layers(
    prefix: str,
    layers: list[tuple[str, nn.Module]],
    grams: Mapping[str, tuple[torch.Tensor, int]],
    target: SparsityConfig,
    solver: LayerwiseSolver,
    levels: Mapping[str, SparsityConfig] | None,
) -> list[LayerReport]:
    """Solves ``layers`` from their Gram matrices and writes the pruned weights into the modules.

    Under several processes the layers are dealt out by estimated cost and every pruned weight and
    report is broadcast from the rank that solved it.
    """
    # Weights first (a NaN weight makes the next layers' inputs NaN): scores and errors of NaN weights mean
    # nothing (NaN compares false), and a solver would return them pruned or kept without a word.
    for name, module in layers:
        if not bool(torch.isfinite(layer_weight(module)).all()):
            raise UserInputError(
                f"{weight_name(prefix, name)}: its weights hold nan or inf before pruning: check the model (its "
                "checkpoint, or a dtype that overflowed)"
            )
    for name, _ in layers:  # every rank holds the same Gram matrices: all refuse alike
        if grams[name][1] == 0:
            raise UserInputError(
                f"{weight_name(prefix, name)}: no calibration token reached it (every position of the calibration "
                "batches is padding: attention_mask all 0): give batches with real tokens"
            )
        if not bool(torch.isfinite(grams[name][0]).all()):
            raise UserInputError(
                f"{weight_name(prefix, name)}: its calibration inputs are not finite (nan or inf in their Gram "
                "matrix): check the calibration batches, and the model's dtype for overflow"
            )
    shapes = [layer_weight(module).shape for _, module in layers]
    world, me = (distributed.world_size(), distributed.rank()) if distributed.is_distributed() else (1, 0)
    owners = assign_layers([float(d_out) * d_in * d_in for d_out, d_in in shapes], world)
    solved: dict[str, tuple[torch.Tensor, LayerReport]] = {}
    for (name, module), owner in zip(layers, owners):
        if owner != me:
            continue
        started = time.perf_counter()
        gram, tokens = grams[name]
        full_name = weight_name(prefix, name)
        original = layer_weight(module).detach()
        weight = original.to(torch.float32, copy=True)  # the module is overwritten below
        problem = LayerProblem(full_name, weight, gram, (levels or {}).get(full_name, target), tokens)
        result = solve(solver, problem)
        pruned = torch.where(result.mask, result.weight, torch.zeros_like(result.weight))
        report = LayerReport(
            name=full_name,
            relative_error=problem.relative_error(pruned),
            # zeros of the result, as summary.json counts them (SparseGPT zeroes dead inputs' weights inside its mask)
            sparsity=1.0 - int(torch.count_nonzero(pruned)) / pruned.numel(),
            seconds=time.perf_counter() - started,
            tokens=tokens,
            metrics=dict(result.metrics),
            trace=list(result.trace),
        )
        # contiguous: a broadcast sends the raw memory, and GPT-2's Conv1D weight reads as a transposed view
        unchanged = result.mask & (result.weight == weight)  # kept as given: a float64 model's values go back
        solved[name] = (written_weight(pruned, unchanged, original).contiguous(), report)
    reports, written = [], []
    for (name, module), owner, shape in zip(layers, owners, shapes):
        if world > 1:  # every rank receives the layer from the rank that solved it
            dtype = written_dtype(layer_weight(module).dtype)
            pruned, report = solved.get(name, (torch.empty(shape, dtype=dtype, device=module.weight.device), None))
            dist.broadcast(pruned, src=owner)
            holder = [report]
            dist.broadcast_object_list(holder, src=owner)
            report = holder[0]
        else:
            pruned, report = solved[name]
        check_in_range(report.name, pruned, layer_weight(module).dtype)  # on every rank: all refuse alike
        reports.append(report)
        written.append((module, pruned))
    for module, pruned in written:  # none of the block's layers is written if one is refused
        set_layer_weight(module, pruned)
    return reports


def walk_inputs(
    model: nn.Module,
    block: nn.Module,
    batches: Sequence[Any],
    device: torch.device | str,
    offload: bool,
    activations: str,
) -> list[BlockInputs]:
    """``block``'s calibration inputs as the walk keeps them: captured where the model computes (on the
    model's own device with ``offload``), stored on ``device`` or the CPU per ``activations``."""
    capture = next(model.parameters()).device if offload else device
    store = device if activations == "device" else "cpu"
    inputs = capture_block_inputs(model, block, batches, capture)
    refuse_cache(inputs)
    return [item.to(store) for item in inputs]


def block_prefixes(model: nn.Module, blocks: Sequence[nn.Module]) -> list[str]:
    """Every block's name in ``model`` (``model.layers.3``), prepended to its layers' names; a block
    that is not a submodule of ``model`` is named by its index."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names.get(id(block), str(index)) for index, block in enumerate(blocks)]


def offloaded_elsewhere(model: nn.Module, device: torch.device | str, offload: bool) -> bool:
    """Whether ``offload`` moves blocks to another device than the model's (else it changes nothing; ``cuda`` is
    the current CUDA device, ``cuda:0`` where that is 0)."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None and torch.cuda.is_available():
        target = torch.device("cuda", torch.cuda.current_device())
    return offload and target != next(model.parameters()).device


def _home(block: nn.Module) -> torch.device | None:
    """Where a block's parameters (or buffers) are; ``None`` for a block without any (an activation)."""
    first = next(itertools.chain(block.parameters(), block.buffers()), None)
    return None if first is None else first.device


def walk_chained(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    *,
    start: int = 0,
    stop: int | None = None,
    device: torch.device | str = "cpu",
    offload: bool = False,
) -> BlockChain:
    """Whether a walk over blocks ``start .. stop - 1`` may run each block to get the next one's inputs, and with
    which of the forward's calls (:func:`~constrainedsparse.layerwise.capture.blocks_chained` on the first batch,
    its ``calls`` counted from ``start``; offloaded to another device than the model's, the blocks are not where
    one forward could run them all, and are taken to be chained with the first block's arguments, as most
    transformer blocks are)."""
    stop = len(blocks) if stop is None else min(stop, len(blocks))
    if offloaded_elsewhere(model, device, offload) or stop - start < 2 or not batches:
        return BlockChain(True, (0,) * max(stop - start, 0))
    prefixes = block_prefixes(model, blocks)
    longest = max(batches, key=_extent)  # a batch within Gemma's window gets the same mask in every layer
    return blocks_chained(model, blocks[start:stop], prefixes[start:stop], to_device(longest, device))


def _extent(batch: Any) -> tuple[int, int]:
    """A batch's longest last dimension among its tensors of 2+ dimensions (a sequence's length), then its size: the
    batch whose blocks are likeliest to get arguments of their own (past a sliding window or an attention chunk)."""
    tensors = list(tensors_in(batch))
    return (max((t.shape[-1] for t in tensors if t.dim() >= 2), default=0), sum(t.numel() for t in tensors))


def walk_blocks(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    *,
    start: int = 0,
    stop: int | None = None,
    device: torch.device | str = "cpu",
    offload: bool = False,
    activations: str = "device",
    chained: BlockChain | None = None,
) -> Generator[tuple[int, nn.Module, str, list[BlockInputs], torch.device | str | None], None, None]:
    """The block-sequential walk every pass over a model shares: capture, visit, propagate.

    Yields ``(index, block, prefix, inputs, compute)`` for blocks ``start .. stop - 1``: the block's
    calibration inputs and the device it computes on (``None``: where the inputs are). After the
    caller is done with a block (pruned it, or measured it) the walk runs it on the inputs to get
    the next block's (so the next block sees the caller's changes), and with ``offload`` moves it
    back. Where the model computes something between two blocks (one forward of the first batch
    finds out, :func:`~constrainedsparse.layerwise.capture.blocks_chained`), the next block's inputs
    come from the model run up to it instead (``offload`` assumes chained blocks, as transformer
    blocks are; ``chained``: what :func:`walk_chained` said, if the caller asked already). Blocks called with
    arguments of their own (Gemma 2/3's local and global layers) get them from one forward of every batch ahead
    (:func:`~constrainedsparse.layerwise.capture.capture_block_calls`). See :func:`prune_blocks` for ``offload``
    and ``activations``.
    """
    prefixes = block_prefixes(model, blocks)
    if distributed.is_distributed():  # data-parallel calibration: rank r takes batches r, r + N, ...
        batches = list(batches)[distributed.rank() :: distributed.world_size()]
    stop = len(blocks) if stop is None else min(stop, len(blocks))
    if chained is None:
        chained = walk_chained(model, blocks, batches, start=start, stop=stop, device=device, offload=offload)
    store = device if activations == "device" else "cpu"
    inputs = walk_inputs(model, blocks[start], batches, device, offload, activations) if start < stop else []
    calls = _own_calls(model, blocks[start:stop], chained, batches, device, store) if chained.own_calls else None
    linked = chained.linked and (calls is not None or not chained.own_calls)  # a batch of another pattern: unlinked
    compute = device if (offload or store != device) else None
    for index in range(start, stop):
        block = blocks[index]
        home = _home(block)
        if offload and home is not None:
            block.to(device)
        try:  # an error in the caller (its consumer closes the walk) also sends the block home
            yield index, block, prefixes[index], inputs, compute
            if index + 1 < stop and linked:
                inputs = run_block(block, inputs, compute)
                if calls is not None:  # the next block's own arguments with this block's outputs
                    kind = chained.calls[index + 1 - start]
                    inputs = [own[kind].with_hidden(item.hidden) for own, item in zip(calls, inputs, strict=True)]
            elif index + 1 < stop:  # something runs between the blocks: the model up to the next one, as changed
                inputs = walk_inputs(model, blocks[index + 1], batches, device, offload, activations)
        finally:
            if offload and home is not None:
                block.to(home)


def _own_calls(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    chain: BlockChain,
    batches: Sequence[Any],
    device: torch.device | str,
    store: torch.device | str,
) -> list[list[BlockInputs]] | None:
    """Every batch's distinct block calls for a walk over linked blocks with arguments of their own, stored on
    ``store``; ``None`` where a batch's blocks do not share their calls as the first batch's did."""
    calls = capture_block_calls(model, blocks, chain, batches, device)
    return None if calls is None else [[call.to(store) for call in own] for own in calls]


def prune_blocks(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    solver: LayerwiseSolver,
    target: SparsityConfig,
    targets: Targets,
    *,
    start: int = 0,
    stop: int | None = None,
    gram_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_block: Callable[[int, list[LayerReport]], None] | None = None,
    offload: bool = False,
    activations: str = "device",
    levels: Mapping[str, SparsityConfig] | None = None,
    true_sequential: bool = False,
    fit: BlockFit | None = None,
    reference: Sequence[BlockInputs] | None = None,
) -> list[LayerReport]:
    """Prunes blocks ``start, ..., stop - 1`` in order, each from the pruned previous blocks' outputs.

    Args:
        model: The whole model (its earlier blocks may already be pruned: that is how a run resumes).
        blocks: The model's blocks, in execution order.
        batches: Calibration batches (``model(**batch)``).
        solver: The layer-wise solver.
        target: Level and pattern.
        targets: Which layers inside a block are pruned.
        start: Index of the first block to prune.
        stop: One past the last block to prune (all remaining blocks by default).
        gram_dtype: Accumulation dtype of the Gram matrices.
        device: Where calibration and pruning compute.
        on_block: Called as ``on_block(index, reports)`` after each block (checkpointing, logging, a
            progress bar: the caller's, as every output is).
        offload: The model stays where it is (the CPU): the calibration inputs are captured there
            and one block at a time moves to ``device`` to be calibrated, pruned and run, then back
            (SparseGPT's and Wanda's sequential scripts do the same). The model then only needs
            to fit the device one block at a time.
        activations: Where the calibration activations between blocks live: ``"device"`` or
            ``"cpu"`` (each batch moves to ``device`` when its block runs).
        levels: Per-layer targets by weight name (a non-uniform allocation); others get ``target``.
        true_sequential: Inside a block, prune group by group from the partly pruned block
            (:func:`prune_block`).
        fit: The block-level steps after every block is pruned (:mod:`~constrainedsparse.layerwise.blocksteps`):
            the mask search and the refit of the kept weights towards the dense outputs; the block
            errors join the metrics of the block's layer reports (``block_error``,
            ``block_error_masked``, ``block_error_fitted``).
        reference: With ``fit.target == "dense"``, the dense model's inputs of block ``start`` (a
            resumed run's earlier blocks are pruned already); default: the captured inputs,
            which are the dense ones when ``start`` is the first block.

    Returns:
        The reports of every layer pruned by this call.
    """
    reports: list[LayerReport] = []
    stop = len(blocks) if stop is None else min(stop, len(blocks))
    chained = walk_chained(model, blocks, batches, start=start, stop=stop, device=device, offload=offload)
    if fit is not None and fit.enabled and fit.target == "dense" and (not chained.linked or chained.own_calls):
        raise UserInputError(
            "block_fit_target=dense fits each block to the dense model's block outputs, which the walk follows "
            "from block to block, but this model computes something between its blocks or calls them with arguments "
            "of their own: set "
            "block_fit_target=block (each block fitted to its dense outputs on its own inputs)"
        )
    walk = walk_blocks(model, blocks, batches, start=start, stop=stop, device=device, offload=offload,
                       activations=activations, chained=chained)  # fmt: skip
    with contextlib.closing(walk):  # an error below sends an offloaded block home at once
        for index, block, prefix, inputs, compute in walk:
            wanted = mask_layers = None
            if fit is not None and fit.enabled:  # the dense block's outputs and weights, before it is pruned
                reference = inputs if reference is None or fit.target == "block" else reference
                wanted = run_block(block, reference, compute)
                mask_layers = dense_layers(block, prefix, targets, target, levels) if fit.mask_rounds else None
            block_reports = prune_block(
                block, prefix, targets, target, solver, inputs, gram_dtype, compute, levels, true_sequential
            )
            if fit is not None and wanted is not None:
                if block_reports:  # a block without targeted layers has nothing to refine
                    metrics = block_steps(block, prefix, targets, mask_layers, inputs, wanted, fit, compute)
                    for report in block_reports:
                        report.metrics.update(metrics)
                reference = wanted
            reports.extend(block_reports)
            if on_block is not None:
                on_block(index, block_reports)
    return reports
