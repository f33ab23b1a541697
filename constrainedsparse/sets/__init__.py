"""Feasible sets: the only place that knows what "k-sparse" means (see :mod:`constrainedsparse.sets.base`).

Modules: :mod:`~.base` (the :class:`FeasibleSet` contract, the pattern registry, levels),
:mod:`~.elementwise` (``unstructured``, ``row``, ``N:M``), :mod:`~.groups` (``structured:rows``,
``structured:columns``, ``block:RxC``), :mod:`~.joint` (one budget across tensors). The selection
kernels they call are in :mod:`constrainedsparse.selection`.
"""

from constrainedsparse.selection import topk_mask
from constrainedsparse.sets.base import (
    Face,
    FeasibleSet,
    JointFeasibleSet,
    available_patterns,
    check_sparsity,
    keep_count,
    parse_nm,
    parse_pattern,
    pattern_class,
    register_pattern,
)
from constrainedsparse.sets.elementwise import NMSparse, RowTopK, TopK
from constrainedsparse.sets.groups import BlockSparse, StructuredGroups
from constrainedsparse.sets.joint import GlobalTopK, lift_floors, nearest_prefix

__all__ = [
    "BlockSparse",
    "Face",
    "FeasibleSet",
    "GlobalTopK",
    "lift_floors",
    "JointFeasibleSet",
    "NMSparse",
    "RowTopK",
    "StructuredGroups",
    "TopK",
    "available_patterns",
    "check_sparsity",
    "keep_count",
    "nearest_prefix",
    "parse_nm",
    "parse_pattern",
    "pattern_class",
    "register_pattern",
    "topk_mask",
]
