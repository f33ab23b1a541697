"""constrainedsparse: neural-network pruning as constrained optimization on Cooper.

*What* to reach is a :class:`SparsityConfig`, *where* is a :class:`Targets`, *how* is a
formulation picked by name (:func:`make` for training in your own loop, :func:`prune_layerwise`
for one-shot pruning of a pretrained model, :func:`run` / the CLI for whole runs). Sparsity
geometry lives in :mod:`constrainedsparse.sets`; :func:`describe` lists every hyperparameter.
"""

from constrainedsparse.batchnorm import recalibrate_batchnorm
from constrainedsparse.catalog import describe
from constrainedsparse.causal_lm import perplexity
from constrainedsparse.errors import NonFiniteLossError, UserInputError
from constrainedsparse.formulations import (
    Formulation,
    LagrangianStep,
    available_formulations,
    describe_formulations,
    make,
    register_formulation,
)
from constrainedsparse.formulations.duplicate import DuplicateConfig
from constrainedsparse.formulations.l0 import GateConfig, L0Config, L0PenaltyConfig
from constrainedsparse.formulations.magnitude import MagnitudeConfig
from constrainedsparse.formulations.slr import SLRConfig
from constrainedsparse.layerwise import LayerwiseSolver, available_solvers, describe_solvers, register_solver
from constrainedsparse.layerwise.admm import ADMMLayerConfig
from constrainedsparse.layerwise.api import prune_layerwise
from constrainedsparse.layerwise.fw import FWConfig
from constrainedsparse.layerwise.report import LayerwiseReport
from constrainedsparse.layerwise.solvers import SparseGPTConfig
from constrainedsparse.logger import MetricsLogger, read_metrics
from constrainedsparse.masks import achieved_sparsity, apply_masks, hard_prune, layer_sparsity, remove_masks
from constrainedsparse.plots import plot_metrics
from constrainedsparse.problem import SparsityProblem, UserConstraint
from constrainedsparse.runners import run
from constrainedsparse.runs import RunConfig
from constrainedsparse.sets import BlockSparse, GlobalTopK, NMSparse, RowTopK, StructuredGroups, TopK
from constrainedsparse.spec import LayerwiseProblem, Problem, load_problem
from constrainedsparse.targets import SparsityConfig, TargetParam, Targets

__version__ = "0.1.0"

__all__ = [
    "ADMMLayerConfig",
    "BlockSparse",
    "DuplicateConfig",
    "FWConfig",
    "Formulation",
    "GateConfig",
    "GlobalTopK",
    "L0Config",
    "L0PenaltyConfig",
    "LagrangianStep",
    "LayerwiseProblem",
    "LayerwiseReport",
    "LayerwiseSolver",
    "MagnitudeConfig",
    "MetricsLogger",
    "NMSparse",
    "NonFiniteLossError",
    "Problem",
    "RowTopK",
    "RunConfig",
    "SLRConfig",
    "SparseGPTConfig",
    "SparsityConfig",
    "SparsityProblem",
    "StructuredGroups",
    "TargetParam",
    "Targets",
    "TopK",
    "UserConstraint",
    "UserInputError",
    "achieved_sparsity",
    "apply_masks",
    "available_formulations",
    "available_solvers",
    "describe",
    "describe_formulations",
    "describe_solvers",
    "hard_prune",
    "layer_sparsity",
    "load_problem",
    "make",
    "perplexity",
    "plot_metrics",
    "prune_layerwise",
    "read_metrics",
    "recalibrate_batchnorm",
    "register_formulation",
    "register_solver",
    "remove_masks",
    "run",
]
