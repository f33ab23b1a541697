"""Building blocks of the causal-LM problems: tokenizer, token windows, perplexity.

Shared by ``hf-causal-lm`` (any local causal LM) and ``smollm2-wiki`` (the real SmolLM2 on
Wikipedia). Perplexity follows the papers' protocol (SparseGPT, Wanda): the evaluation text is one
token stream cut into consecutive non-overlapping windows of ``seq_len`` tokens, each window scored
on its own (no context carried over), and perplexity is ``exp`` of the mean next-token negative
log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from constrainedsparse.errors import as_int
from constrainedsparse.modes import eval_mode

__all__ = [
    "check_context",
    "check_seq_len",
    "TOKENIZER_FILES",
    "calibration_batches",
    "consecutive_windows",
    "encode",
    "has_tokenizer",
    "load_tokenizer",
    "perplexity",
    "perplexity_scores",
    "random_windows",
    "rows_perplexity",
    "window_nll",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt")
"""Files one of which a folder needs for ``AutoTokenizer`` to build a real vocabulary."""


def has_tokenizer(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds tokenizer files (``tokenizer.json``, a vocabulary or a SentencePiece model)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike[str], flag: str = "--set model") -> Any:
    """The folder's tokenizer, refusing folders without tokenizer files.

    ``AutoTokenizer`` can silently build a tokenizer with an empty vocabulary from a folder that
    holds only a model; this checks for the files first.

    Raises:
        ValueError: With one line naming the folder (and the ``flag`` that set it).
    """
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise ValueError(
            f"{flag}={str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "save it next to the model with tokenizer.save_pretrained(folder)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{flag}={str(folder)!r} has no usable tokenizer: {message}") from None
    return tokenizer


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """The text's token ids as one int64 stream (no special tokens added; windows are cut later, so no
    long-input warning)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def random_windows(ids: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens at seeded uniform random offsets, ``(count, seq_len)``.

    Raises:
        ValueError: If the stream is shorter than one window.
    """
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (count,), generator=generator).tolist()
    return torch.stack([ids[s : s + seq_len] for s in starts])


def consecutive_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the stream, ``(n, seq_len)``.

    Args:
        ids: The token stream.
        seq_len: Tokens per window.
        max_tokens: Use at most this many tokens (``n = min(len(ids), max_tokens) // seq_len``).

    Raises:
        ValueError: If not even one window fits.
    """
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    count = usable // seq_len
    if count < 1:
        cut = f" (max_tokens={max_tokens} of its {len(ids)})" if usable < len(ids) else ""
        raise ValueError(f"the evaluation text gives {usable} tokens{cut}, fewer than one window of seq_len={seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def calibration_batches(windows: torch.Tensor, batch: int) -> list[dict[str, torch.Tensor]]:
    """Keyword-argument batches for the layer-wise driver (every token real: an all-ones attention mask)."""
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch)]


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """``[[summed next-token NLL, predicted tokens], ...]``, one row per window (float64, on CPU)."""
    device = next(model.parameters()).device
    rows = []
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").sum(dim=1)
        counts = torch.full_like(nll, chunk.shape[1] - 1)
        rows.append(torch.stack([nll, counts], dim=1).double().cpu())
    return torch.cat(rows)


def rows_perplexity(rows: torch.Tensor) -> float:
    """``exp(total NLL / total predicted tokens)`` of :func:`window_nll` rows."""
    return math.exp(float(rows[:, 0].sum() / rows[:, 1].sum()))


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor | Sequence[int],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> float:
    r"""Perplexity of a causal LM on a token stream, as SparseGPT and Wanda measure it (and the CLI's problems).

    The stream is cut into consecutive non-overlapping windows of ``seq_len`` tokens (a last partial window is
    left out), each scored on its own, no context carried over:

    .. math:: \mathrm{ppl} = \exp\Big(\frac{1}{W (L - 1)} \sum_{w=1}^{W} \sum_{t=2}^{L}
        -\log p_\theta(x_{w,t} \mid x_{w,<t})\Big)

    with :math:`W` windows of :math:`L` = ``seq_len`` tokens. The model runs in eval mode (every module back in
    its own mode after), without gradients, on the device of its parameters.

    Args:
        model: A causal LM whose ``model(input_ids=...)`` returns ``.logits`` (a ``transformers``
            ``AutoModelForCausalLM``).
        token_ids: The token stream: a 1-D integer tensor, a ``(1, n)`` one
            (``tokenizer(text, return_tensors="pt").input_ids``) or a list of ints.
        seq_len: Tokens per window (at least 2, at most the model's context).
        batch_size: Windows per forward pass.
        max_tokens: Use at most this many tokens of the stream (default: all).

    Returns:
        The perplexity (a float; the dense model's, then the pruned one's, is how to compare them).

    Raises:
        ValueError: For a model that is no ``nn.Module``, token ids that are not one stream of integers, a
            ``seq_len``, ``batch_size`` or ``max_tokens`` out of range, or a stream shorter than one window.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"perplexity: model must be an nn.Module (a causal LM), got {type(model).__name__}")
    for key, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("max_tokens", max_tokens, 2)):
        if (value is not None or key != "max_tokens") and (as_int(value) is None or value < low):
            raise ValueError(f"perplexity: {key} must be an integer >= {low}, got {value!r}")
    ids = _token_stream(token_ids)
    check_context(model, seq_len, "seq_len")
    windows = consecutive_windows(ids, seq_len, max_tokens)
    with eval_mode(model):
        return rows_perplexity(window_nll(model, windows, batch_size))


def _token_stream(token_ids: Any) -> torch.Tensor:
    """``token_ids`` as one 1-D ``long`` tensor: a 1-D or ``(1, n)`` integer tensor, or a list of ints.

    Raises:
        ValueError: For anything else (a tokenizer's whole output: pass its ``input_ids``).
    """
    if isinstance(token_ids, Mapping):
        raise ValueError("perplexity: token_ids is a tokenizer's output (a dict): pass its input_ids")
    if not isinstance(token_ids, torch.Tensor):
        if not isinstance(token_ids, Sequence) or not all(as_int(t) is not None for t in token_ids):
            raise ValueError(
                f"perplexity: token_ids must be a tensor or a list of token ids, got {type(token_ids).__name__}"
            )
        token_ids = torch.tensor([int(t) for t in token_ids], dtype=torch.long)
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"perplexity: token_ids must hold integers (token ids), got {token_ids.dtype}")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(
            f"perplexity: token_ids must be one stream of tokens (1-D, or (1, n)), got shape {tuple(token_ids.shape)}"
        )
    return token_ids.long()


def perplexity_scores(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """The summary entries of a causal-LM problem: ``dense_perplexity`` and ``perplexity``."""
    return {"dense_perplexity": rows_perplexity(dense), "perplexity": rows_perplexity(pruned)}


def check_seq_len(seq_len: int) -> None:
    """Refuses a window of one token: a window predicts its tokens after the first, so its perplexity would be nan.

    Raises:
        ValueError: Naming ``seq_len``.
    """
    if seq_len < 2:
        raise ValueError(f"--set seq_len must be >= 2 (a window predicts its tokens after the first), got {seq_len}")


def check_context(model: nn.Module, seq_len: int, flag: str = "--set seq_len") -> None:
    """Refuses a sequence length above the model's context (an ``IndexError`` deep in the embedding otherwise).

    Raises:
        ValueError: Naming ``flag``, ``seq_len`` and the model's ``max_position_embeddings``.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ValueError(f"{flag}={seq_len} is above the model's context of {context} tokens")
