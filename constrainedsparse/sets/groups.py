r"""Group patterns: whole slices (``structured:rows``, ``structured:columns``) or whole b×c blocks
(``block:RxC``) are kept or zeroed together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from constrainedsparse.selection import topk_mask
from constrainedsparse.sets.base import FeasibleSet, _lmo_mask, check_count, check_input, keep_count, register_pattern

__all__ = ["BlockSparse", "StructuredGroups"]


@register_pattern
class StructuredGroups(FeasibleSet):
    r"""At most ``k`` nonzero groups, a group being a slice along ``dim``.

    ``dim=0`` groups output rows/channels (pattern ``structured:rows``, or ``structured``),
    ``dim=1`` input neurons/channels (``structured:columns``). The projection keeps the ``k``
    groups of largest Euclidean norm (exact: :math:`\|x\|^2` splits over groups).
    """

    kind = "structured"
    _DIMS = {"rows": 0, "columns": 1}

    @classmethod
    def parse(cls, text: str) -> dict[str, Any] | None:
        if text == cls.kind:
            return {"dim": 0}
        head, _, side = text.partition(":")
        if head != cls.kind:
            return None
        if side not in cls._DIMS:
            raise ValueError(f"pattern {text!r}: structured takes :rows or :columns (e.g. structured:columns)")
        return {"dim": cls._DIMS[side]}

    @classmethod
    def at_level(cls, shape: Sequence[int], sparsity: float, **params: Any) -> StructuredGroups:
        dim = params.get("dim", 0)
        cls(0, dim).check_shape(shape)
        return cls(keep_count(shape[dim], sparsity), dim=dim)

    @classmethod
    def pattern_text(cls, **params: Any) -> str:
        dim = params.get("dim", 0)
        if dim not in (0, 1):
            raise ValueError(f"structured groups take dim 0 (rows) or 1 (columns), got {dim!r}")
        return f"{cls.kind}:{'columns' if dim == 1 else 'rows'}"

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        return {"dim": 1}

    @classmethod
    def examples(cls) -> list[str]:
        return [cls.pattern_text(dim=0), cls.pattern_text(dim=1)]

    def __init__(self, k: int, dim: int = 0) -> None:
        k = check_count(k)
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output groups) or 1 (input groups), got {dim}")
        self.k, self.dim = k, dim

    def check_shape(self, shape: Sequence[int]) -> None:
        if len(shape) <= self.dim:
            raise ValueError(
                f"structured groups along dim {self.dim} need a tensor with {self.dim + 1} dimensions, "
                f"got {tuple(shape)}"
            )

    def _groups(self, x: torch.Tensor, ranked: bool = True) -> torch.Tensor:
        self.check_shape(check_input(x, ranked).shape)
        groups = x.movedim(self.dim, 0).reshape(x.shape[self.dim], -1)
        if self.k > groups.shape[0]:
            raise ValueError(f"k={self.k} exceeds the {groups.shape[0]} groups along dim {self.dim}")
        return groups

    def _expand(self, group_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[self.dim] = like.shape[self.dim]
        return group_mask.reshape(shape).expand_as(like)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        # float64 so that squared norms neither overflow (float16) nor underflow into false ties.
        norms = self._groups(x).detach().to(torch.float64).square().sum(dim=1)
        return self.group_mask(norms, x)

    def group_norms(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\|x_g\|_2` of each group along ``dim`` (float64, detached): what :meth:`mask` ranks."""
        return self._groups(x).detach().to(torch.float64).norm(dim=1)

    def group_mask(self, scores: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The mask keeping the ``k`` groups of largest ``scores`` (one per group), shaped like ``like``."""
        if scores.shape != (like.shape[self.dim],):
            raise ValueError(f"need one score per group ({like.shape[self.dim]}), got shape {tuple(scores.shape)}")
        if self.k > scores.numel():
            raise ValueError(f"k={self.k} exceeds the {scores.numel()} groups along dim {self.dim}")
        return self._expand(topk_mask(scores.unsqueeze(0), self.k)[0], like)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        group_grad = self._groups(grad).sum(dim=1, dtype=torch.float64)  # half-precision sums overflow or tie
        vertex = _lmo_mask(-group_grad.unsqueeze(0), self.k, only_negative)[0]
        return self._expand(vertex, grad).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return int((torch.count_nonzero(self._groups(x, ranked=False), dim=1) > 0).sum()) <= self.k

    def __repr__(self) -> str:
        return f"StructuredGroups(k={self.k}, dim={self.dim})"


@register_pattern
class BlockSparse(FeasibleSet):
    r"""At most ``k`` nonzero blocks of ``rows`` × ``cols`` entries (pattern ``block:RxC``, ``block:B`` for B×B).

    A block covers ``rows`` consecutive outputs (dim 0) and ``cols`` consecutive inputs (dim 1); a
    Conv weight's kernel positions belong to their block. Kept blocks are dense tiles, the layout
    block-sparse kernels run fast. The projection keeps the ``k`` blocks of largest Frobenius norm
    (exact: :math:`\|x\|^2` splits over blocks); the oracle switches on the ``k`` blocks of most
    negative summed gradient (only negative sums with ``only_negative``).
    """

    kind = "block"

    def __init__(self, k: int, rows: int, cols: int) -> None:
        k = check_count(k)
        rows, cols = check_count(rows, "block rows", 1), check_count(cols, "block cols", 1)
        self.k, self.rows, self.cols = k, rows, cols

    @classmethod
    def parse(cls, text: str) -> dict[str, Any] | None:
        head, _, size = text.partition(":")
        if head != cls.kind:
            return None
        parts = size.lower().split("x") if "x" in size.lower() else [size, size]
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"pattern {text!r}: block takes RxC with positive integers (e.g. block:4x4 or block:4)")
        return {"rows": int(parts[0]), "cols": int(parts[1])}

    @classmethod
    def at_level(cls, shape: Sequence[int], sparsity: float, **params: Any) -> BlockSparse:
        rows, cols = params["rows"], params["cols"]
        cls(0, rows, cols).check_shape(shape)
        return cls(keep_count((shape[0] // rows) * (shape[1] // cols), sparsity), rows, cols)

    @classmethod
    def pattern_text(cls, **params: Any) -> str:
        return f"{cls.kind}:{params['rows']}x{params['cols']}"

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        return {"rows": 4, "cols": 4}

    def check_shape(self, shape: Sequence[int]) -> None:
        if len(shape) < 2 or shape[0] % self.rows or shape[1] % self.cols:
            raise ValueError(
                f"block pattern {self.rows}x{self.cols} needs dims 0 and 1 divisible by ({self.rows}, {self.cols}), "
                f"got shape {tuple(shape)}"
            )

    def _blocks(self, x: torch.Tensor, ranked: bool = True) -> torch.Tensor:
        """``(blocks, entries per block)``: block (i, j) is row ``i * C + j``."""
        self.check_shape(check_input(x, ranked).shape)
        r, c = x.shape[0] // self.rows, x.shape[1] // self.cols
        tiles = x.reshape(r, self.rows, c, self.cols, -1).transpose(1, 2)
        blocks = tiles.reshape(r * c, -1)
        if self.k > blocks.shape[0]:
            raise ValueError(f"k={self.k} exceeds the {blocks.shape[0]} blocks")
        return blocks

    def _expand(self, block_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        r, c = like.shape[0] // self.rows, like.shape[1] // self.cols
        rest = like.numel() // (like.shape[0] * like.shape[1])
        tiles = block_mask.reshape(r, 1, c, 1, 1).expand(r, self.rows, c, self.cols, rest)
        return tiles.reshape(like.shape)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        norms = self._blocks(x).detach().to(torch.float64).square().sum(dim=1)
        return self._expand(topk_mask(norms.unsqueeze(0), self.k)[0], x)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        block_grad = self._blocks(grad).sum(dim=1, dtype=torch.float64)  # half-precision sums overflow or tie
        vertex = _lmo_mask(-block_grad.unsqueeze(0), self.k, only_negative)[0]
        return self._expand(vertex, grad).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return int((torch.count_nonzero(self._blocks(x, ranked=False), dim=1) > 0).sum()) <= self.k

    def __repr__(self) -> str:
        return f"BlockSparse(k={self.k}, {self.rows}x{self.cols})"
