"""constrainedsparse: neural-network pruning as constrained optimization on Cooper.

*What* to reach is a :class:`SparsityConfig`, *where* is a :class:`Targets`, *how* is a
formulation picked by name from the registry (:func:`make`). Sparsity geometry lives in
:mod:`constrainedsparse.sets`.
"""

from constrainedsparse.engine import NonFiniteLossError, RunConfig, run
from constrainedsparse.formulations import (
    Formulation,
    available_formulations,
    describe_formulations,
    make,
    register_formulation,
)
from constrainedsparse.logger import MetricsLogger, plot_metrics, read_metrics
from constrainedsparse.masks import achieved_sparsity, apply_masks, hard_prune, layer_sparsity
from constrainedsparse.problem import SparsityProblem, UserConstraint
from constrainedsparse.sets import GlobalTopK, NMSparse, RowTopK, StructuredGroups, TopK
from constrainedsparse.spec import Problem, load_problem
from constrainedsparse.targets import SparsityConfig, Targets

__version__ = "0.1.0"

__all__ = [
    "Formulation",
    "GlobalTopK",
    "MetricsLogger",
    "NMSparse",
    "NonFiniteLossError",
    "Problem",
    "RowTopK",
    "RunConfig",
    "SparsityConfig",
    "SparsityProblem",
    "StructuredGroups",
    "Targets",
    "TopK",
    "UserConstraint",
    "achieved_sparsity",
    "apply_masks",
    "available_formulations",
    "describe_formulations",
    "hard_prune",
    "layer_sparsity",
    "load_problem",
    "make",
    "plot_metrics",
    "read_metrics",
    "register_formulation",
    "run",
]
