"""Calling the model to reach its blocks: the calibration batches' inputs to a block, and whether the blocks
form a chain (each called with the previous one's output), which lets a walk run one block to get the next's."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from constrainedsparse.batches import to_device
from constrainedsparse.errors import UserInputError, first_line, user_input, user_stacklevel
from constrainedsparse.layerwise.blockinputs import BlockInputs, block_hidden
from constrainedsparse.layerwise.grams import StopForward

__all__ = ["blocks_chained", "call_model", "capture_block_inputs", "token_mask"]


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


@torch.no_grad()
def blocks_chained(model: nn.Module, blocks: Sequence[nn.Module], names: Sequence[str], batch: Any) -> bool:
    """Whether every block after the first is called with the previous block's output, and otherwise with the
    first block's arguments (the same attention mask, position embeddings, ...).

    A walk over chained blocks gets a block's inputs by running the previous block on its own inputs;
    where the model computes something between two blocks (an activation between bare ``nn.Linear``
    blocks, a residual sum outside them, a norm) it has to run the model again up to the next block.
    One forward of ``batch``, stopped where the last block would run (or at the first link that
    differs), compares each block's hidden states with the previous block's output and its other arguments with
    the first block's (:meth:`BlockInputs.same_call`).

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
        return True
    position = {id(block): index for index, block in enumerate(blocks)}
    last: list[Any] = [-1, None]  # the index of the block that ran last, a copy of its output
    first: list[BlockInputs] = []  # the first block's call: the walk runs every later block with its arguments
    entered = [-1]  # the index of the block that started last
    chained = [True]

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
        if index == 0:
            first.append(call)
        elif hidden is None or not torch.equal(hidden, last[1]) or not first[0].same_call(call):
            chained[0] = False
            if len(blocks) >= 4:  # fewer: at most 2.5 times the block forwards
                _warn_unchained(names, index, len(blocks), hidden is not None and torch.equal(hidden, last[1]))
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
            return True
        raise UserInputError(
            f"calibration batch 0: the model's forward failed after {names[last[0]]}, before the next block ran: "
            f"{type(err).__name__}: {first_line(err)}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return chained[0]


def _warn_unchained(names: Sequence[str], index: int, count: int, same_hidden: bool) -> None:
    """Says why a walk over ``count`` blocks re-runs the model up to every block, and what that costs."""
    why = (
        "is called with {}'s output but not with the first block's other arguments (an attention mask or rotary "
        "embedding of its own, as Gemma 2/3's local and global layers get)"
        if same_hidden
        else "is not called with {}'s output (the model computes between them: a norm, an activation, a residual sum "
        "outside the blocks)"
    )
    warnings.warn(
        f"{names[index]} {why.format(names[index - 1])}: each of the {count} blocks' calibration "
        f"inputs come from a forward of the model up to it, about {count * (count + 1) // 2} block forwards a pass "
        f"instead of {count}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
