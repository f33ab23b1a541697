"""Calling the model to reach its blocks: the calibration batches' inputs to a block, and whether the blocks
form a chain (each called with the previous one's output), which lets a walk run one block to get the next's."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from constrainedsparse.batches import tensors_in, to_device
from constrainedsparse.errors import UserInputError, first_line, user_input, user_stacklevel
from constrainedsparse.layerwise.blockinputs import BlockInputs, block_hidden
from constrainedsparse.layerwise.grams import StopForward

__all__ = [
    "BlockChain",
    "blocks_chained",
    "call_model",
    "capture_block_calls",
    "capture_block_inputs",
    "refuse_cache",
    "token_mask",
]


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as booleans (True for real tokens), or ``None``."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if mask is None else mask.bool()


MODEL_ERRORS = (RuntimeError, IndexError, TypeError, ValueError, AttributeError, NotImplementedError)
"""What a model's forward raises on a batch it cannot take (a tuple where it reads a dict's keys, 1-d token ids)."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Sequence[Any], device: torch.device | str = "cpu"
) -> list[BlockInputs]:
    """Runs every batch through ``model`` up to ``block`` and records what ``block`` is called with.

    The forward stops at the block (nothing after it runs), so capturing the first block's inputs
    costs the embeddings only.

    Args:
        model: The whole model (called as :func:`call_model` does).
        block: The block whose inputs to record.
        batches: Calibration batches (dicts of keyword arguments, tuples or tensors); a dict's
            ``attention_mask`` marks padding.
        device: Where the batches are run (the model's modules before the block must be there).

    Returns:
        One :class:`BlockInputs` per batch.

    Raises:
        ValueError: If a batch never reaches the block.
    """
    captured: list[tuple[tuple, dict]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise StopForward

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    inputs = []
    try:
        for index, batch in enumerate(batches):
            batch = to_device(batch, device)
            before = len(captured)
            try:
                call_model(model, batch)
            except StopForward:
                pass
            except UserInputError:
                raise
            except MODEL_ERRORS as err:  # before any block: a batch the model cannot take (a tuple for a dict, 1-d ids)
                raise UserInputError(
                    f"calibration batch {index}: the model's forward failed before the block to calibrate: "
                    f"{type(err).__name__}: {first_line(err)} (check the batches' shapes, dtypes and token ids)"
                ) from err
            if len(captured) != before + 1:
                raise ValueError("a calibration batch never reached the block to prune (is it one of the model's?)")
            args, kwargs = captured[-1]
            inputs.append(BlockInputs(args, kwargs, token_mask(batch)))
    finally:
        handle.remove()
    return inputs


_CACHE_KEYWORDS = ("past_key_value", "past_key_values", "layer_past")


def refuse_cache(inputs: Sequence[BlockInputs]) -> None:
    """Raises for a block call with a key/value cache (a batch's ``use_cache=True`` or ``past_key_values``): a
    walk runs every block more than once a batch, and each run would append to the one cache object."""
    for index, call in enumerate(inputs):
        for key, value in [*enumerate(call.args), *call.kwargs.items()]:
            if value is None or not (key in _CACHE_KEYWORDS or any(c.__name__ == "Cache" for c in type(value).__mro__)):
                continue
            raise UserInputError(
                f"calibration batch {index}: a block is called with a key/value cache ({key}: {type(value).__name__}): "
                "the walk runs every block more than once a batch, and each run would add to it; calibrate without "
                "one (model.config.use_cache = False, which prune_layerwise sets, and no use_cache=True or "
                "past_key_values in the batches)"
            )


@dataclasses.dataclass(frozen=True)
class BlockChain:
    """How a walk gets a block's calibration inputs: from the previous block's output, or by running the model.

    Attributes:
        linked: Every block is called with the previous block's output as its hidden states (the model computes
            nothing between them), and its other arguments are one of a few calls the forward repeats.
        calls: With ``linked``, each block's other arguments as an index into the forward's distinct calls (0: the
            first block's). All 0 for a plain chain; Gemma 2/3's local and global layers have two, which the walk
            captures for every batch ahead (:func:`capture_block_calls`).
    """

    linked: bool
    calls: tuple[int, ...] = ()

    @property
    def own_calls(self) -> bool:
        """Whether some block is called with other arguments than the first block's."""
        return any(self.calls)


def blocks_chained(model: nn.Module, blocks: Sequence[nn.Module], names: Sequence[str], batch: Any) -> BlockChain:
    """Whether every block after the first is called with the previous block's output, and otherwise with one of a
    few calls the forward repeats (the first block's attention mask and position embeddings, or Gemma 2/3's local
    and global layers' own).

    A walk over chained blocks gets a block's inputs by running the previous block on its own inputs;
    where the model computes something between two blocks (an activation between bare ``nn.Linear``
    blocks, a residual sum outside them, a norm) it has to run the model again up to the next block, as it does
    where the blocks' other arguments differ at most blocks (more distinct calls than half the blocks) or are
    computed from the weights (a value or output of an earlier block, which pruning changes: ResFormer's value
    residual). One forward of ``batch``, stopped where the last block would run (or at the first link that
    differs), compares each block's hidden states with the previous block's output and its other arguments with
    the distinct calls before it (:meth:`BlockInputs.same_call`); it records autograd's graph without keeping a
    tensor, so an argument that requires grad and is not one of the first block's depends on the weights.

    Args:
        model: The whole model (called as :func:`call_model` does).
        blocks: The blocks the walk visits, in order.
        names: Their names in the model, for the message.
        batch: One calibration batch, where the model computes.

    Raises:
        UserInputError: For a block called out of the given order or twice, or never (a walk would make up its
            inputs), a block output without hidden states (:func:`block_hidden`), or a forward that fails
            between two blocks (where no block's calibration would name it). A forward that fails before
            the first block or inside a block counts as chained: the walk fails there and names it.
    """
    if len(blocks) < 2:
        return BlockChain(True, (0,) * len(blocks))
    position = {id(block): index for index, block in enumerate(blocks)}
    last: list[Any] = [-1, None]  # the index of the block that ran last, a copy of its output
    distinct: list[BlockInputs] = []  # the calls seen, their hidden states dropped
    calls: list[int] = []  # each block's call, an index into distinct
    entered = [-1]  # the index of the block that started last
    chained = [True]
    static: set[int] = set()  # the first block's argument tensors: computed before any block, by layers never pruned

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = position[id(module)]
        entered[0] = index
        if index != last[0] + 1:
            ran = f"after {names[last[0]]}" if last[0] >= 0 else "first"
            raise UserInputError(
                f"blocks must be the model's blocks in execution order, each called once: {names[index]} ran {ran}"
            )
        call = BlockInputs(args, kwargs, None)
        try:
            hidden = call.hidden
        except UserInputError:  # hidden states under another keyword: only a run of the model up to it reaches them
            hidden = None
        if index > 0 and (hidden is None or not torch.equal(hidden, last[1])):
            chained[0] = False
            if len(blocks) >= 4:  # fewer: at most 2.5 times the block forwards
                _warn_unchained(names, index, len(blocks), f"is not called with {names[index - 1]}'s output {_BETWEEN}")
            raise StopForward
        seen = len(distinct)
        calls.append(_call_index(distinct, call))
        if index == 0:
            static.update(id(t) for t in _tensors(distinct[0]))
        elif len(distinct) > seen and any(t.requires_grad and id(t) not in static for t in _tensors(distinct[-1])):
            chained[0] = False
            if len(blocks) >= 4:
                why = (
                    "is called with arguments computed from the weights of the blocks before it, which pruning changes"
                )
                _warn_unchained(names, index, len(blocks), why)
            raise StopForward
        if index == len(blocks) - 1:
            raise StopForward

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        index = position[id(module)]
        with user_input(f"{names[index]}: "):
            hidden = block_hidden(output)
        last[0], last[1] = index, hidden.clone()  # a copy: the model may change it in place before the next block

    handles = [block.register_forward_pre_hook(before, with_kwargs=True) for block in blocks]
    handles += [block.register_forward_hook(after) for block in blocks]
    try:
        with _graph_without_tensors(model):
            call_model(model, batch)
        raise UserInputError(  # the forward ended without reaching the last block: a walk would make up its inputs
            f"{names[entered[0] + 1]} never ran on calibration batch 0: blocks must be blocks the model's forward "
            "calls, in execution order"
        )
    except StopForward:
        pass
    except UserInputError:
        raise
    except MODEL_ERRORS as err:
        if last[0] < 0 or entered[0] > last[0]:  # before the first block or inside one: the walk names it
            return BlockChain(True, (0,) * len(blocks))
        raise UserInputError(
            f"calibration batch 0: the model's forward failed after {names[last[0]]}, before the next block ran: "
            f"{type(err).__name__}: {first_line(err)}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    if not chained[0]:
        return BlockChain(False)
    if 2 * len(distinct) > len(blocks):  # arguments of their own at most blocks: maybe computed from the hidden states
        if len(blocks) >= 4:
            why = (
                f"and {len(distinct) - 2} more of the {len(blocks)} blocks get other arguments than any block before "
                f"them ({len(distinct)} distinct calls: a walk reuses calls that serve two blocks each on average)"
            )
            _warn_unchained(names, calls.index(1), len(blocks), why)
        return BlockChain(False)
    return BlockChain(True, tuple(calls))


_BETWEEN = "(the model computes between them: a norm, an activation, a residual sum outside the blocks)"


def _tensors(call: BlockInputs) -> Iterator[torch.Tensor]:
    """The tensors among a call's arguments (its hidden states dropped already)."""
    return tensors_in((call.args, call.kwargs))


@contextlib.contextmanager
def _graph_without_tensors(model: nn.Module) -> Iterator[None]:
    """Within: autograd records which tensors depend on the model's floating-point parameters (each made to require
    grad for the while) but keeps none of the tensors a backward would need: one forward's provenance, no memory."""
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _never_unpacked):
            yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def _drop(tensor: torch.Tensor) -> None:
    return None


def _never_unpacked(packed: None) -> torch.Tensor:
    raise AssertionError("blocks_chained never runs a backward")


def _call_index(distinct: list[BlockInputs], call: BlockInputs) -> int:
    """The index of ``call``'s other arguments among ``distinct``, appended there (hidden states dropped) if new."""
    for index, seen in enumerate(distinct):
        if seen.same_call(call):
            return index
    distinct.append(call.without_hidden())
    return len(distinct) - 1


@torch.no_grad()
def capture_block_calls(
    model: nn.Module, blocks: Sequence[nn.Module], chain: BlockChain, batches: Sequence[Any], device: torch.device | str
) -> list[list[BlockInputs]] | None:
    """Every batch's distinct block calls (hidden states dropped) in the order of ``chain.calls``, from one forward
    of each batch stopped at the last block: what a walk over linked blocks with arguments of their own runs each
    block with. ``None`` if a batch's blocks do not share their calls as ``chain`` (found on the first batch) says.
    """
    position = {id(block): index for index, block in enumerate(blocks)}
    seen: list[BlockInputs] = []
    matched = [True]

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = position[id(module)]
        call, kind = BlockInputs(args, kwargs, None), chain.calls[index]
        if kind == len(seen):
            seen.append(call.without_hidden())
        elif kind > len(seen) or not seen[kind].same_call(call):
            matched[0] = False
            raise StopForward
        if index == len(blocks) - 1:
            raise StopForward

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    captured = []
    try:
        for batch in batches:
            batch = to_device(batch, device)
            seen = []
            try:
                call_model(model, batch)
            except StopForward:
                pass
            if not matched[0] or len(seen) != max(chain.calls) + 1:
                return None
            captured.append([dataclasses.replace(call, token_mask=token_mask(batch)) for call in seen])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _warn_unchained(names: Sequence[str], index: int, count: int, why: str) -> None:
    """Says why a walk over ``count`` blocks re-runs the model up to every block, and what that costs."""
    warnings.warn(
        f"{names[index]} {why}: each of the {count} blocks' calibration inputs come from a forward of the model up "
        f"to it, about {count * (count + 1) // 2} block forwards a pass instead of {count}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
