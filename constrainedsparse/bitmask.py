"""compressed-tensors' sparse bitmask layout of a state dict: compress the pruned weights, decompress them back.

For every pruned weight ``X.weight``: ``X.compressed`` (the kept values), ``X.bitmask`` (one bit per weight, packed
with :func:`compressed_tensors.utils.pack_bitmasks`) and ``X.shape``; ``sparse-bitmask`` adds ``X.row_offsets``
(values flat), ``sparse-24-bitmask`` keeps exactly 2 values per group of 4 (values ``(rows, cols / 2)``), as
compressed-tensors 0.14's ``BitmaskTensor`` / ``Sparse24BitMaskTensor`` laid them out (later releases removed
them; :mod:`constrainedsparse.export` writes and reads the folders).
"""

from __future__ import annotations

import torch

from constrainedsparse.semistructured import is_two_four
from constrainedsparse.sets import NMSparse

__all__ = ["compress_state_dict", "decompress_state_dict", "two_four_bytemask"]


def two_four_bytemask(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per group of 4: the nonzeros, topped up with zeros (as compressed-tensors chose),
    the first zeros of a group (the 2:4 set's own tie rule: the same file on every machine)."""
    return NMSparse(2, 4).mask(weight)


def _merge(prefix: str, part: str) -> str:
    """``prefix.part``, the key compressed-tensors gave a compressed weight's part (its former ``merge_names``)."""
    return f"{prefix}.{part}"


def _compress_weight(prefix: str, weight: torch.Tensor, two_four: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.utils import pack_bitmasks

    weight = weight.detach().cpu().contiguous()
    if two_four:
        mask = two_four_bytemask(weight)
        values = weight[mask].reshape(weight.shape[0], weight.shape[1] // 2)
        shape = torch.tensor(list(weight.shape)).reshape(-1, 1)
        return {
            _merge(prefix, "shape"): shape,
            _merge(prefix, "compressed"): values,
            _merge(prefix, "bitmask"): pack_bitmasks(mask),
        }
    mask = weight != 0
    counts = mask.sum(dim=-1)
    return {
        _merge(prefix, "shape"): torch.tensor(list(weight.shape)),
        _merge(prefix, "compressed"): weight[mask],
        _merge(prefix, "bitmask"): pack_bitmasks(mask),
        _merge(prefix, "row_offsets"): torch.cumsum(counts, 0) - counts,
    }


def compress_state_dict(
    state: dict[str, torch.Tensor], names: list[str], two_four: bool
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """Replaces each weight in ``names`` by its bitmask-compressed tensors; the rest stays dense.

    Returns:
        The compressed state dict and ``{name: {"dense_bytes", "compressed_bytes"}}`` per weight.

    Raises:
        ValueError: If a name is missing, not a 2-D weight, or (``two_four``) not 2:4 sparse.
    """
    out = dict(state)
    sizes = {}
    for name in names:
        weight = state.get(name)
        if weight is None or weight.dim() != 2 or not name.endswith(".weight"):
            raise ValueError(f"{name!r} is not a 2-D weight of the saved model (cannot compress it)")
        if two_four and not is_two_four(weight):
            raise ValueError(f"{name!r} is not 2:4 sparse (a group of 4 inputs holds more than 2 nonzeros)")
        del out[name]
        parts = _compress_weight(name.removesuffix(".weight"), weight, two_four)
        out.update(parts)
        sizes[name] = {
            "dense_bytes": weight.numel() * weight.element_size(),
            "compressed_bytes": sum(t.numel() * t.element_size() for t in parts.values()),
        }
    return out, sizes


def decompress_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense state dict of a compressed one: ``X.compressed`` / ``X.bitmask`` / ``X.shape`` become ``X.weight``.

    Raises:
        ValueError: For an ``X.compressed`` without its ``X.shape`` or ``X.bitmask``.
    """
    from compressed_tensors.utils import unpack_bitmasks

    dense = {k: v for k, v in state.items() if not k.endswith((".compressed", ".bitmask", ".shape", ".row_offsets"))}
    for key in state:
        if not key.endswith(".compressed"):
            continue
        prefix = key.removesuffix(".compressed")
        lost = [part for part in (".shape", ".bitmask") if f"{prefix}{part}" not in state]
        if lost:
            raise ValueError(f"{key} has no {prefix}{lost[0]} to decompress it (an incomplete export)")
        shape = state[f"{prefix}.shape"].flatten().tolist()
        mask = unpack_bitmasks(state[f"{prefix}.bitmask"], shape)
        values = state[key]
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[mask] = values.flatten()
        dense[f"{prefix}.weight"] = weight
    return dense
