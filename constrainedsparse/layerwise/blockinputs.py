"""One calibration batch as a block sees it (:class:`BlockInputs`), and the block's output on it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from constrainedsparse.batches import map_tensors
from constrainedsparse.errors import UserInputError

__all__ = ["BlockInputs", "block_hidden", "block_output"]


@dataclasses.dataclass
class BlockInputs:
    """One calibration batch as a block sees it.

    Args:
        args: Positional arguments of the block call (hidden states first, if positional).
        kwargs: Keyword arguments (attention mask, position embeddings, ...).
        token_mask: ``(batch, seq)`` bool, True for real tokens; ``None`` if every token is real.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states (the first positional argument, or ``hidden_states``).

        Raises:
            UserInputError: For a call with neither (a block that takes its input under another keyword).
        """
        if self.args:
            return self.args[0]
        if "hidden_states" not in self.kwargs:
            raise UserInputError(
                "a block is called with its input neither as its first positional argument nor as hidden_states= "
                f"(keywords: {', '.join(self.kwargs) or 'none'}): running a block on its own (block_fit_epochs, "
                "block_mask_rounds, allocation=lagrangian) needs its input there"
            )
        return self.kwargs["hidden_states"]

    def without_hidden(self) -> BlockInputs:
        """The call's other arguments, its hidden states dropped (``None``): a call kept to run a later block with
        (:meth:`with_hidden`), without holding the activations it was seen with."""
        if self.args:
            return BlockInputs((None, *self.args[1:]), self.kwargs, self.token_mask)
        if "hidden_states" not in self.kwargs:  # under another keyword: nothing to drop
            return self
        return BlockInputs(self.args, {**self.kwargs, "hidden_states": None}, self.token_mask)

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        """The same call with new hidden states."""
        if self.args:
            return BlockInputs((hidden, *self.args[1:]), self.kwargs, self.token_mask)
        return BlockInputs(self.args, {**self.kwargs, "hidden_states": hidden}, self.token_mask)

    def same_call(self, other: BlockInputs) -> bool:
        """Whether ``other`` is this call but for the hidden states: the same other arguments and keywords (equal
        tensors, the same objects), as the walk assumes when it runs the next block with this call's arguments
        (an attention mask or rotary embedding of the block's own, as Gemma 2/3's local and global layers get,
        is not)."""
        if len(self.args) != len(other.args) or self.kwargs.keys() != other.kwargs.keys():
            return False
        skip = {"hidden_states"} if not self.args else set()
        return _same(self.args[1:], other.args[1:]) and all(
            _same(value, other.kwargs[key]) for key, value in self.kwargs.items() if key not in skip
        )

    def token_sum(self, values: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum` over the batch's real tokens of ``values`` summed over its last dimension (a
        ``(batch, seq, hidden)`` output of the block; every position when there is no padding)."""
        per_token = values.sum(dim=-1)
        if self.token_mask is not None:
            per_token = per_token[self.token_mask.to(per_token.device)]
        return per_token.sum()

    def to(self, device: torch.device | str) -> BlockInputs:
        """The same call with every tensor on ``device``."""
        mask = None if self.token_mask is None else self.token_mask.to(device)
        return BlockInputs(
            map_tensors(self.args, lambda t: t.to(device)), map_tensors(self.kwargs, lambda t: t.to(device)), mask
        )


def _same(a: Any, b: Any) -> bool:
    """Equal tensors (shape, dtype, values), containers of such, or the same (or equal) objects; anything that
    cannot be compared counts as different."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device and bool(torch.equal(a, b))
        )  # fmt: skip
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an object whose == is not a truth value (an array) or raises
        return False


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states of a block's output: the tensor, the first element of a tuple or list, or the first
    field of a ``transformers`` ``ModelOutput``.

    Raises:
        UserInputError: For any other output (a dict: which entry holds the hidden states is not known).
    """
    hidden = output
    if isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    elif callable(getattr(output, "to_tuple", None)):
        hidden = output.to_tuple()[0]
    if not isinstance(hidden, torch.Tensor):
        got = type(output).__name__ + (
            f" whose first element is a {type(hidden).__name__}" if hidden is not output else ""
        )
        raise UserInputError(
            f"a block returned a {got}: a block's output must be its hidden states, a tensor or the first element of "
            "a tuple"
        )
    return hidden


def block_output(block: nn.Module, item: BlockInputs) -> torch.Tensor:
    """The block's output hidden states on one batch (where the batch is)."""
    return block_hidden(block(*item.args, **item.kwargs))
