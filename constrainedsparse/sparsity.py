"""What to reach: a sparsity level in a pattern (:class:`SparsityConfig`), the "what" of a pruning problem.

The "where" (which parameters) is :class:`~constrainedsparse.targets.Targets`; the patterns' geometry
(projections, masks, LMOs) is :mod:`constrainedsparse.sets`, which registers the pattern kinds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from constrainedsparse.sets import (
    FeasibleSet,
    available_patterns,
    check_sparsity,
    parse_nm,
    parse_pattern,
    pattern_class,
)

__all__ = ["PATTERNS", "SparsityConfig"]

PATTERNS = tuple(available_patterns())
"""The registered pattern kinds (see :mod:`constrainedsparse.sets`)."""


@dataclass(frozen=True)
class SparsityConfig:
    """What to reach: a sparsity level in a pattern (:mod:`constrainedsparse.sets` registers the patterns).

    Args:
        sparsity: Fraction of zeros in ``[0, 1)``; derived for a pattern that fixes its level (N:M).
        pattern: The pattern's kind: ``"unstructured"`` (top-k per tensor), ``"row"`` (top-k per
            output row), ``"nm"``, ``"structured"`` (whole output rows or input columns, see
            ``params``), ``"block"``, or any registered pattern; or pattern text with its parameters
            (``"2:4"``, ``"block:4x4"``, ``"structured:columns"``), read as :meth:`parse` reads it.
        nm: ``(n, m)`` of the ``nm`` pattern (at most n nonzeros in every m inputs).
        params: The pattern's other parameters as ``((name, value), ...)`` (``(("dim", 1),)`` for
            structured columns); :meth:`parse` fills them from text.

    Raises:
        ValueError: For an unknown pattern, a level outside ``[0, 1)`` or ``nm`` missing.
    """

    sparsity: float = 0.0
    pattern: str = "unstructured"
    nm: tuple[int, int] | None = None
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.pattern, str) and ":" in self.pattern and self.nm is None and not self.params:
            kind, params = parse_pattern(self.pattern)  # text with parameters: "2:4", "block:4x4"
            object.__setattr__(self, "pattern", kind)
            if kind == "nm":
                object.__setattr__(self, "nm", (params["n"], params["m"]))
            else:
                object.__setattr__(self, "params", tuple(sorted(params.items())))
        cls = pattern_class(self.pattern)
        if self.nm is not None and self.pattern != "nm":
            raise ValueError(f"nm={self.nm!r} is for pattern='nm', got pattern={self.pattern!r}")
        if self.pattern == "nm":
            if self.nm is None:
                raise ValueError("pattern 'nm' needs nm=(n, m)")
            if not isinstance(self.nm, (tuple, list)) or len(self.nm) != 2:
                raise ValueError(
                    f"nm must be a pair (n, m), got {self.nm!r} (for text such as '2:4' use SparsityConfig.parse)"
                )
            n, m = parse_nm(f"{self.nm[0]}:{self.nm[1]}")
            object.__setattr__(self, "params", (("n", n), ("m", m)))
        self._check_params(cls)
        level = cls.level(**self.options)
        if level is not None:
            if self.sparsity != 0.0 and not math.isclose(self.sparsity, level, abs_tol=1e-9):  # 0.0: not given
                raise ValueError(
                    f"pattern {cls.pattern_text(**self.options)} fixes its own level {level!r}, got sparsity="
                    f"{self.sparsity!r}: give one or the other"
                )
            object.__setattr__(self, "sparsity", level)
        else:
            check_sparsity(self.sparsity)

    def _check_params(self, cls: type[FeasibleSet]) -> None:
        """``params`` are the pattern's own keys, of its types, with none it needs missing."""
        example = cls.example_params()
        odd = [k for k, v in self.options.items() if k not in example or type(v) is not type(example[k])]
        try:
            text = "" if odd else cls.pattern_text(**self.options)
        except (KeyError, TypeError):
            text = ""
        if not text:
            wanted = ", ".join(f"({k!r}, {v!r})" for k, v in sorted(example.items()))
            takes = f"takes params like {wanted}" if wanted else "takes no params"
            raise ValueError(
                f"pattern {self.pattern!r} {takes}, got {self.params!r} (SparsityConfig.parse reads pattern text)"
            )
        try:  # values its text cannot say (block:0x2) are refused as the text would be
            read = cls.parse(text)
        except ValueError as err:
            raise ValueError(f"params {self.params!r}: {err}") from None
        if read is None or any(read.get(key) != value for key, value in self.options.items()):
            raise ValueError(
                f"pattern {self.pattern!r}: params {self.params!r} name no pattern ({text!r} reads {read})"
            )

    @property
    def options(self) -> dict[str, Any]:
        """The pattern's parameters as keywords."""
        return dict(self.params)

    @classmethod
    def parse(cls, text: str, sparsity: float | None = None) -> SparsityConfig:
        """The config of a pattern text (``"2:4"``, ``"row"``, ``"structured:columns"``, ``"block:4x4"``).

        Args:
            text: The pattern as users write it (``--pattern``).
            sparsity: The level; must be ``None`` for a pattern that fixes its own (N:M).

        Raises:
            ValueError: For text no pattern reads, a level given to a pattern that fixes its own (N:M),
                or none given to one that does not.
        """
        kind, params = parse_pattern(text)
        if pattern_class(kind).fixed_level:
            if sparsity is not None:
                raise ValueError(f"the pattern {text} fixes its own level: give --pattern or --sparsity, not both")
            if kind == "nm":
                return cls(pattern="nm", nm=(params["n"], params["m"]))
            return cls(0.0, kind, params=tuple(sorted(params.items())))  # the level comes from the pattern
        if sparsity is None:
            raise ValueError(f"the pattern {text} needs a level: SparsityConfig.parse({text!r}, sparsity)")
        return cls(sparsity, kind, params=tuple(sorted(params.items())))

    @classmethod
    def from_pattern(cls, text: str) -> SparsityConfig:
        """Builds an N:M (or any fixed-level) config from text such as ``"2:4"``."""
        return cls.parse(text)

    @property
    def fixed_level(self) -> bool:
        """Whether the pattern fixes its own level (N:M, or a pattern of yours that does): no level of its own
        is given, overridden per layer or allocated."""
        return pattern_class(self.pattern).fixed_level

    def with_sparsity(self, sparsity: float) -> SparsityConfig:
        """The same pattern at another level (the same config for a fixed-level pattern)."""
        return self if self.fixed_level else dataclasses.replace(self, sparsity=sparsity)

    def pattern_text(self) -> str:
        """The pattern as users write it (``"row"``, ``"2:4"``, ``"structured:columns"``)."""
        return pattern_class(self.pattern).pattern_text(**self.options)

    def describe(self) -> str:
        """Short human label, e.g. ``'0.9'``, ``'2:4'`` or ``'0.5 row'``."""
        if self.fixed_level:
            return self.pattern_text()
        suffix = "" if self.pattern == "unstructured" else f" {self.pattern_text()}"
        return f"{self.sparsity:g}{suffix}"

    def summary_fields(self) -> dict[str, Any]:
        """What ``summary.json`` says of the target: ``pattern`` for N:M; else ``target_sparsity`` (and
        ``pattern`` unless unstructured)."""
        if self.fixed_level:
            return {"pattern": self.describe()}
        fields: dict[str, Any] = {"target_sparsity": self.sparsity}
        if self.pattern != "unstructured":
            fields["pattern"] = self.pattern_text()
        return fields

    def feasible_set(self, shape: Sequence[int]) -> FeasibleSet:
        """The pattern's feasible set for a tensor of this shape at this level.

        Raises:
            ValueError: If the shape does not fit the pattern (e.g. N:M on a width not divisible by M).
        """
        feasible = pattern_class(self.pattern).at_level(torch.Size(shape), self.sparsity, **self.options)
        feasible.check_shape(shape)
        return feasible
