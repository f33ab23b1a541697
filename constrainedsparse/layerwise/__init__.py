"""Layer-wise pruning of pretrained models: calibration driver and per-layer solvers.

Importing this package registers every built-in solver (``magnitude``, ``wanda``, ``sparsegpt``, ``fw``, ``admm``).
"""

from constrainedsparse.layerwise import admm, fw, solvers  # noqa: F401  (each registers its solvers)
from constrainedsparse.layerwise.base import (
    LayerProblem,
    LayerResult,
    LayerwiseSolver,
    available_solvers,
    describe_solvers,
    register_solver,
    solver_class,
    wanda_scores,
)

__all__ = [
    "LayerProblem",
    "LayerResult",
    "LayerwiseSolver",
    "available_solvers",
    "describe_solvers",
    "register_solver",
    "solver_class",
    "wanda_scores",
]
