"""Elementwise patterns: a budget of nonzeros per tensor (``unstructured``), per row (``row``) or per
group of M consecutive inputs (``N:M``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from constrainedsparse.selection import project_largest_magnitudes, topk_mask
from constrainedsparse.sets.base import (
    Face,
    FeasibleSet,
    _check_out,
    _fixed_count,
    _lmo_mask,
    check_count,
    check_input,
    keep_count,
    parse_nm,
    register_pattern,
)

__all__ = ["NMSparse", "RowTopK", "TopK"]


@register_pattern
class TopK(FeasibleSet):
    r"""At most ``k`` nonzeros in the whole tensor: :math:`\{x : \|x\|_0 \le k\}` (pattern ``unstructured``)."""

    kind = "unstructured"

    @classmethod
    def at_level(cls, shape: Sequence[int], sparsity: float, **params: Any) -> TopK:
        return cls(keep_count(math.prod(shape), sparsity))

    def __init__(self, k: int) -> None:
        k = check_count(k)
        self.k = k

    def _check(self, x: torch.Tensor) -> None:
        if self.k > check_input(x).numel():
            raise ValueError(f"k={self.k} exceeds the tensor's {x.numel()} entries")

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return topk_mask(x.detach().abs().reshape(1, -1), self.k).reshape(x.shape)

    def project(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if out is None and x.requires_grad and torch.is_grad_enabled():  # keeps the graph through x, as every set's
            return super().project(x)
        x = x.detach()
        _check_out(x, out)
        if self.k in (0, x.numel()):  # nothing or everything kept: no mask of x's size
            if out is None:
                return x.clone() if self.k else torch.zeros_like(x)
            return out.copy_(x) if self.k else out.zero_()
        # Large tensors: a sampled bracket (one read) and one hardshrink pass into the result.
        fast = project_largest_magnitudes(x, self.k, out)
        if fast is not None:
            return fast
        return super().project(x, out)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        self._check(grad)
        return _lmo_mask(-grad.reshape(1, -1), self.k, only_negative).reshape(grad.shape).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return int(torch.count_nonzero(check_input(x, ranked=False))) <= self.k

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        count = _fixed_count(fixed_fraction, self.k)
        return Face(TopK(count) if count else None, TopK(self.k - count), (math.prod(shape) - count,))

    def __repr__(self) -> str:
        return f"TopK(k={self.k})"


@register_pattern
class RowTopK(FeasibleSet):
    """At most ``k`` nonzeros in every row (dim 0 indexes rows; the rest is flattened); pattern ``row``."""

    kind = "row"
    rows_independent = True

    @classmethod
    def at_level(cls, shape: Sequence[int], sparsity: float, **params: Any) -> RowTopK:
        return cls(keep_count(math.prod(shape[1:]), sparsity))

    def check_shape(self, shape: Sequence[int]) -> None:
        if len(shape) < 2:
            raise ValueError(f"the row pattern needs a tensor with rows, got shape {tuple(shape)}")

    def __init__(self, k: int) -> None:
        k = check_count(k)
        self.k = k

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        self.check_shape(check_input(x).shape)
        rows = x.reshape(x.shape[0], -1)
        if self.k > rows.shape[1]:
            raise ValueError(f"k={self.k} exceeds the row width {rows.shape[1]}")
        return rows

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return topk_mask(self._rows(x).detach().abs(), self.k).reshape(x.shape)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        return _lmo_mask(-self._rows(grad), self.k, only_negative).reshape(grad.shape).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        self.check_shape(check_input(x, ranked=False).shape)
        return bool((torch.count_nonzero(x.reshape(x.shape[0], -1), dim=1) <= self.k).all())

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        count = _fixed_count(fixed_fraction, self.k)
        width = math.prod(shape[1:])
        return Face(RowTopK(count) if count else None, RowTopK(self.k - count), (shape[0], width - count))

    def __repr__(self) -> str:
        return f"RowTopK(k={self.k})"


@register_pattern
class NMSparse(FeasibleSet):
    """N:M sparsity: at most ``n`` nonzeros in every group of ``m`` consecutive inputs (pattern ``N:M``).

    Groups run along dim 1 (the input dimension of a Linear weight ``(out, in)``, the input
    channels of a Conv weight ``(out, in, *kernel)``). The pattern fixes its level, ``1 - n/m``.
    """

    kind = "nm"
    fixed_level = True
    rows_independent = True

    @classmethod
    def parse(cls, text: str) -> dict[str, Any] | None:
        if not text[:1].isdigit():  # N:M starts with a digit; anything else is another pattern's
            return None
        n, m = parse_nm(text)
        return {"n": n, "m": m}

    @classmethod
    def at_level(cls, shape: Sequence[int], sparsity: float, **params: Any) -> NMSparse:
        return cls(params["n"], params["m"])

    @classmethod
    def pattern_text(cls, **params: Any) -> str:
        return f"{params['n']}:{params['m']}"

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        return {"n": 2, "m": 4}

    @classmethod
    def level(cls, **params: Any) -> float | None:
        return 1.0 - params["n"] / params["m"]

    def __init__(self, n: int, m: int) -> None:
        n, m = check_count(n, "N", None), check_count(m, "M", None)
        if not 0 < n <= m:
            raise ValueError(f"N:M needs integers 0 < N <= M, got {n}:{m}")
        self.n, self.m = n, m

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raises ``ValueError`` if the input width (dim 1) is not divisible by ``m``."""
        if len(shape) < 2:
            raise ValueError(
                f"N:M pattern {self.n}:{self.m} needs a tensor with an input dimension, got shape {tuple(shape)}"
            )
        if shape[1] % self.m != 0:
            raise ValueError(
                f"N:M pattern {self.n}:{self.m} needs the input width divisible by {self.m}, got width {shape[1]}"
            )

    def _groups(self, x: torch.Tensor, ranked: bool = True) -> torch.Tensor:
        self.check_shape(check_input(x, ranked).shape)
        return x.movedim(1, -1).reshape(-1, self.m)

    def _ungroup(self, groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        moved_shape = like.movedim(1, -1).shape
        return groups.reshape(moved_shape).movedim(-1, 1)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return self._ungroup(topk_mask(self._groups(x).detach().abs(), self.n), x)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        vertex = _lmo_mask(-self._groups(grad), self.n, only_negative)
        return self._ungroup(vertex, grad).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return bool((torch.count_nonzero(self._groups(x, ranked=False), dim=1) <= self.n).all())

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        self.check_shape(shape)
        if len(shape) != 2:
            raise ValueError(f"an N:M face needs a 2-D (out, in) tensor, got shape {tuple(shape)}")
        count = _fixed_count(fixed_fraction, self.n)
        fixed = NMSparse(count, self.m) if count else None
        return Face(fixed, NMSparse(self.n - count, self.m - count), (shape[0], shape[1] // self.m * (self.m - count)))

    def __repr__(self) -> str:
        return f"NMSparse({self.n}:{self.m})"
