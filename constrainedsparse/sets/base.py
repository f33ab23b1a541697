r"""Feasible sets: the only place that knows what "k-sparse" means.

Every sparsity pattern is a :class:`FeasibleSet` with three operations:

* ``project(x)`` — the exact Euclidean projection
  :math:`\Pi_C(x) = \arg\min_{z \in C} \|z - x\|_2` onto the set of real tensors that satisfy
  the pattern (keep the largest-magnitude entries/groups allowed, zero the rest).
* ``lmo(g)`` — the linear minimisation oracle over the convex hull of the pattern's **binary
  masks**, :math:`\arg\min_{v \in \mathrm{conv}(\mathcal{M})} \langle g, v \rangle`, returned as
  a vertex (a 0/1 mask). With ``only_negative=True`` (the Frank-Wolfe paper's variant, i.e. the
  hull of masks with *at most* k ones) only coordinates with :math:`g < 0` are switched on;
  otherwise exactly k are (the hull of masks with exactly k ones).
* ``contains(x)`` — whether ``x`` satisfies the pattern (counts nonzeros).

**One pattern vocabulary.** A set class registered with :func:`register_pattern` is a pattern:
its ``kind`` names it in :class:`~constrainedsparse.sparsity.SparsityConfig`, its :meth:`parse`
reads the text users write (``--pattern row``, ``2:4``, ``structured:columns``, ``block:4x4``),
:meth:`at_level` builds it for a tensor at a sparsity level and :meth:`check_shape` says why a
tensor does not fit it. The CLI, the targets and every formulation reach a pattern only through
this registry, so a new pattern is one class in one file and one decorator line.

Ties are broken deterministically: among equal scores the lower flat index wins, on every
device and for every algorithm used internally (:mod:`constrainedsparse.selection`).

Formulations (SLR/ADMM Z-steps, hard pruning, Frank-Wolfe) compose these objects and never
re-implement a top-k.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import math
import operator
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from constrainedsparse.errors import UserInputError, is_number, is_ours
from constrainedsparse.registry import same_definition
from constrainedsparse.selection import topk_mask

__all__ = [
    "Face",
    "FeasibleSet",
    "JointFeasibleSet",
    "available_patterns",
    "check_count",
    "check_input",
    "check_sparsity",
    "keep_count",
    "set_text",
    "parse_nm",
    "parse_pattern",
    "pattern_class",
    "register_pattern",
]

_PATTERNS: dict[str, type[FeasibleSet]] = {}


def set_text(feasible: Any) -> str:
    """A feasible set for a message: its ``repr`` if its class defines one, else the class name (never
    ``<... object at 0x...>``)."""
    return repr(feasible) if type(feasible).__repr__ is not object.__repr__ else type(feasible).__name__


def check_sparsity(value: Any, name: str = "sparsity", noun: str = "") -> float:
    """A sparsity level: a real number in ``[0, 1)`` (the one place this range is checked).

    Args:
        value: The level.
        name: How the message names it (``"--sparsity"``, ``"override 'head.*'"``).
        noun: Said before the range (``"a sparsity "``).

    Raises:
        ValueError: ``"<name> must be <noun>in [0, 1), got <value>"``.
    """
    if not is_number(value):  # "0.5" or a tensor: not the range's fault
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r} (a {type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be {noun}in [0, 1), got {value}")
    return float(value)


def check_count(value: Any, name: str = "k", low: int | None = 0) -> int:
    """``value`` as an ``int`` if it is an integer ``>= low`` (any integer with ``low=None``; a NumPy or 0-d
    tensor integer too; a bool or float is not).

    Raises:
        ValueError: Naming ``name`` and the value.
    """
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool) or (low is not None and count < low):
        raise ValueError(f"{name} must be an integer{'' if low is None else f' >= {low}'}, got {value!r}")
    return count


def check_input(x: Any, ranked: bool = True) -> torch.Tensor:
    """``x`` if it is a tensor, of a dtype with magnitudes to rank if ``ranked`` (not bool: ``contains``
    takes a boolean mask, ``project`` does not).

    Raises:
        ValueError: Naming what ``x`` was.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"a sparsity set takes a torch.Tensor, got a {type(x).__name__}")
    if ranked and x.dtype == torch.bool:
        raise ValueError("a sparsity set takes a numeric tensor, got a bool one (a mask has no magnitudes to rank)")
    return x


def keep_count(numel: int, sparsity: float) -> int:
    r"""Number of entries kept at a sparsity level: :math:`k = \mathrm{round}((1 - s)\, n)`.

    Args:
        numel: Number of entries (or groups) in the tensor.
        sparsity: Fraction of zeros wanted, in ``[0, 1)``.

    Returns:
        The keep count ``k``, in ``[0, numel]``.

    Raises:
        ValueError: If ``sparsity`` is outside ``[0, 1)``.
    """
    return int(round((1.0 - check_sparsity(sparsity)) * numel))


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parses an ``"N:M"`` pattern string.

    Args:
        pattern: Text such as ``"2:4"``.

    Returns:
        ``(n, m)`` with ``0 < n <= m``.

    Raises:
        ValueError: If the text is not two positive integers ``N:M`` with ``N <= M``.
    """
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must look like N:M with integers 0 < N <= M (e.g. 2:4), got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n <= m:
        raise ValueError(f"pattern must look like N:M with integers 0 < N <= M (e.g. 2:4), got {pattern!r}")
    return n, m


def _fixed_count(fraction: float, budget: int) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fixed fraction of a face must be in [0, 1), got {fraction}")
    return math.floor(fraction * budget)


def _check_out(x: torch.Tensor, out: torch.Tensor | None) -> None:
    """Raises ``ValueError`` unless ``out`` is ``None``, or matches ``x``'s shape, dtype and device and is ``x``
    itself or shares no memory with it (a write into an overlapping buffer would change ``x`` before it is read)."""
    if out is None:
        return
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must have the input's shape, dtype and device: got {tuple(out.shape)} {out.dtype} on "
            f"{out.device} for {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    same = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    if not same and _overlap(out, x):
        raise ValueError(
            "out shares memory with the input without being the input itself: give x, or a buffer of its own"
        )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors of one storage intersect."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _lmo_mask(neg_scores: torch.Tensor, k: int, only_negative: bool) -> torch.Tensor:
    """Vertex of the mask hull minimising <g, v>, given -g (batched along the last dim)."""
    vertex = topk_mask(neg_scores, k)
    if only_negative:
        vertex &= neg_scores > 0
    return vertex


@dataclasses.dataclass(frozen=True)
class Face:
    r"""A face of a pattern's mask hull: some coordinates of every unit fixed to 1, the rest free.

    Frank-Wolfe's α-fixed warm start works on such a face. Every unit (row, layer, N:M group)
    fixes the same number of coordinates, so the free coordinates of a tensor, gathered in their
    original order, form a dense tensor of ``free_shape`` with the same pattern and the remaining
    budget: its oracle is ``free.lmo`` (lower-index tie-breaking unchanged).

    Args:
        fixed: Picks the fixed coordinates from scores (``fixed.mask(scores)``); ``None`` if none.
        free: The pattern with the remaining budget, on the gathered free coordinates.
        free_shape: Shape of the gathered free coordinates.
    """

    fixed: FeasibleSet | None
    free: FeasibleSet
    free_shape: tuple[int, ...]


class FeasibleSet(abc.ABC):
    """A sparsity pattern: projection, linear minimisation oracle and membership test.

    Attributes:
        kind: The pattern's name in :class:`~constrainedsparse.sparsity.SparsityConfig` (registered
            sets only).
        fixed_level: Whether the pattern fixes its own sparsity level (N:M), so ``--sparsity``
            does not apply.
        rows_independent: Whether the pattern constrains every row (dim 0) on its own (``row``, N:M), so
            rows of two members make a member; ``False`` for a count over the whole tensor.
    """

    kind: ClassVar[str] = ""
    fixed_level: ClassVar[bool] = False
    rows_independent: ClassVar[bool] = False

    # --- the pattern vocabulary (class level) -------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> dict[str, Any] | None:
        """The pattern's parameters if ``text`` names this pattern, else ``None``.

        Raises:
            ValueError: If the text names this pattern with malformed parameters.
        """
        return {} if text == cls.kind else None

    @classmethod
    def at_level(cls, shape: Sequence[int], sparsity: float, **params: Any) -> FeasibleSet:
        """The set for a tensor of ``shape`` at ``sparsity`` with the pattern's ``params``."""
        raise NotImplementedError(f"{cls.__name__} is not a registered pattern")

    @classmethod
    def pattern_text(cls, **params: Any) -> str:
        """The text that names the pattern (what :meth:`parse` reads back)."""
        return cls.kind

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        """Parameters of an example of the pattern (for messages listing the vocabulary)."""
        return {}

    @classmethod
    def examples(cls) -> list[str]:
        """The pattern's texts that messages list (one, :meth:`example_params`'s, unless the pattern has forms a
        user would not guess from one: structured rows and columns)."""
        return [cls.pattern_text(**cls.example_params())]

    @classmethod
    def level(cls, **params: Any) -> float | None:
        """The sparsity a fixed-level pattern implies (``1 - n/m`` for N:M), else ``None``."""
        return None

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raises ``ValueError`` naming the shape if a tensor of ``shape`` cannot hold the pattern."""
        return None

    # --- geometry -----------------------------------------------------------------------------

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        r"""The face fixing :math:`\lfloor f k\rfloor` of every unit's budget :math:`k` (see :class:`Face`).

        Raises:
            ValueError: If the pattern has no such face (structured groups) or the fraction is not in [0, 1).
        """
        raise ValueError(f"{self!r} has no face with fixed coordinates (row, unstructured and N:M patterns do)")

    @abc.abstractmethod
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean support of :meth:`project`: the entries of ``x`` that the projection keeps."""

    def keeps_any(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` in this set may keep any entry (a level can round to 0 kept)."""
        return bool(self.mask(torch.ones(tuple(shape))).any())

    def project(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        r"""Euclidean projection :math:`\arg\min_{z \in C}\|z - x\|_2`.

        Args:
            x: The tensor to project (not modified, unless it is ``out``).
            out: Optional tensor of ``x``'s shape, dtype and device to write the result into (a
                caller that owns a buffer, e.g. a duplicate variable, avoids an allocation); may be
                ``x`` itself. It is returned. No gradient flows through ``out``.

        Without ``out`` the result keeps autograd's graph through ``x`` (the support is a constant:
        the gradient is the mask times the incoming gradient), for every pattern.
        """
        # where, not x * mask: an inf outside the support would give inf * 0 = nan
        if out is None:
            return torch.where(self.mask(x), x, x.new_zeros(()))
        _check_out(x, out)
        return torch.where(self.mask(x), x.detach(), x.new_zeros(()), out=out)

    @abc.abstractmethod
    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        r"""Vertex :math:`v \in \{0, 1\}` of the mask hull minimising :math:`\langle g, v\rangle`.

        Args:
            grad: Gradient ``g``, same shape as the masked tensor.
            only_negative: Switch on only coordinates (groups) whose gradient is negative, i.e.
                optimise over the hull of masks with *at most* ``k`` ones.

        Returns:
            A 0/1 tensor with the dtype and shape of ``grad``.
        """

    @abc.abstractmethod
    def contains(self, x: torch.Tensor) -> bool:
        """Whether ``x`` satisfies the pattern."""


def register_pattern(cls: type[FeasibleSet]) -> type[FeasibleSet]:
    """Class decorator: makes a :class:`FeasibleSet` a pattern users can name (``--pattern``).

    The same definition (module and qualified name: a problem file loaded again) may register again
    and replaces the earlier class.

    A pattern defined outside this package gets its ``mask`` and ``project`` answers checked (a boolean
    mask, a projection of the input's dtype, both of the input's shape): one error naming the pattern, not a
    shape error deep inside a formulation.

    Raises:
        ValueError: If ``cls`` is no :class:`FeasibleSet` subclass, leaves a method abstract or ``at_level``
            undefined, has no ``kind`` (a letter, then letters, digits, ``_ . + -``), or the kind is taken
            by another definition.
    """
    if not (isinstance(cls, type) and issubclass(cls, FeasibleSet)):
        raise ValueError(f"register_pattern takes a FeasibleSet subclass, got {cls!r}")
    # a letter first (a digit reads as N:M), no ':' ',' '=' '/' (pattern text and --set use them)
    if not isinstance(cls.kind, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]*", cls.kind):
        raise ValueError(
            f"{cls.__name__} needs a kind to be registered as a pattern: its registry key, a letter then letters, "
            f"digits, '_', '.', '+' or '-', got {cls.kind!r}"
        )
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing or inspect.getattr_static(cls, "at_level") is vars(FeasibleSet)["at_level"]:
        raise ValueError(
            f"{cls.__name__} must define {', '.join(missing or ['at_level'])} to be registered as a pattern"
        )
    held = _PATTERNS.get(cls.kind)
    if held is not None and not same_definition(held, cls):
        raise ValueError(f"pattern {cls.kind!r} is already registered (by {held.__module__}.{held.__qualname__})")
    if not is_ours(cls):
        _check_answers(cls)
    _PATTERNS[cls.kind] = cls
    return cls


def _check_answers(cls: type[FeasibleSet]) -> None:
    """Wraps the ``mask`` and ``project`` that ``cls`` has from code outside this package (its own or a base
    class's) so that their answers are checked."""
    for method in ("mask", "project"):
        owner = next(k for k in cls.__mro__ if method in vars(k))
        fn = vars(owner)[method]
        if is_ours(owner) or getattr(fn, "_answer_checked", False):
            continue

        @functools.wraps(fn)
        def checked(self: FeasibleSet, x: torch.Tensor, *args: Any, _fn: Any = fn, _method: str = method, **kw: Any):
            answer = _fn(self, x, *args, **kw)
            boolean = _method == "mask"
            dtype = torch.bool if boolean else x.dtype
            if not isinstance(answer, torch.Tensor) or answer.shape != x.shape or answer.dtype != dtype:
                got = (
                    f"{answer.dtype} {tuple(answer.shape)}"
                    if isinstance(answer, torch.Tensor)
                    else type(answer).__name__
                )
                wanted = f"a {dtype} tensor"
                raise UserInputError(
                    f"pattern {type(self).kind!r}: {_method}() must return {wanted} of the input's shape "
                    f"{tuple(x.shape)}, got {got}"
                )
            return answer

        checked._answer_checked = True  # type: ignore[attr-defined]
        setattr(cls, method, checked)


def available_patterns() -> list[str]:
    """The registered pattern kinds, in registration order."""
    return list(_PATTERNS)


def pattern_class(kind: str) -> type[FeasibleSet]:
    """The set class of a pattern kind.

    Raises:
        ValueError: For an unknown kind, listing the known ones.
    """
    if kind not in _PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(_PATTERNS)}, got {kind!r}")
    return _PATTERNS[kind]


def parse_pattern(text: str) -> tuple[str, dict[str, Any]]:
    """``(kind, params)`` of a pattern text (``"2:4"`` -> ``("nm", {"n": 2, "m": 4})``).

    Raises:
        ValueError: If no registered pattern reads the text (listing what is allowed).
    """
    text = str(text).strip()
    for kind, cls in _PATTERNS.items():
        params = cls.parse(text)
        if params is not None:
            return kind, params
    examples = ", ".join(text for cls in _PATTERNS.values() for text in cls.examples())
    raise ValueError(f"unknown pattern {text!r}; patterns: {examples}")


class JointFeasibleSet(abc.ABC):
    """A pattern over several tensors together (one budget across them): masks, project, lmo, contains."""

    @abc.abstractmethod
    def masks(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Boolean supports of :meth:`project`, one per tensor."""

    def project(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Euclidean projection of the tuple of tensors (inputs are not modified)."""
        return [torch.where(m, x, x.new_zeros(())) for x, m in zip(xs, self.masks(xs))]  # inf * 0 would be nan

    @abc.abstractmethod
    def lmo(self, grads: Sequence[torch.Tensor], only_negative: bool = False) -> list[torch.Tensor]:
        """Vertex of the joint mask hull minimising the summed inner product."""

    @abc.abstractmethod
    def contains(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether the tensors satisfy the joint pattern."""
