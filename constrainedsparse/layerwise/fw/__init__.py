r"""``fw``: layer-wise mask selection by Frank-Wolfe on the convex hull of masks.

After Roux, Zimmer, d'Aspremont and Pokutta (2025), "Don't be greedy, just relax! Pruning LLMs via
Frank-Wolfe": for one linear layer with weight :math:`W` and calibration Gram matrix
:math:`G = XX^\top`, the mask minimising :math:`f(M) = \operatorname{tr}(D G D^\top)`,
:math:`D = W - M \odot W`, is chosen by Frank-Wolfe over the convex hull of the pattern's masks,
then rounded, searched locally and compared with Wanda's. :meth:`FWSolver.prune` reads as that
pipeline: warm start → relax (N:M; ``row``/``unstructured`` with ``relax_rows``) → round → search →
keep the better → reconstruct.

Each module holds one part, with its math in its docstring:

- :mod:`~constrainedsparse.layerwise.fw.config`: :class:`FWConfig` with its ``search`` and
  ``reconstruction`` groups (flat ``--set`` keys);
- :mod:`~constrainedsparse.layerwise.fw.core`: the relaxation, the oracle on the α-fixed face,
  the step size and the incremental products (:func:`frank_wolfe`);
- :mod:`~constrainedsparse.layerwise.fw.search`: :class:`SearchResult` and the swap descents for
  ``row`` and ``unstructured`` (:func:`swap_polish`, :func:`joint_swap_polish`);
- :mod:`~constrainedsparse.layerwise.fw.swap_tabu`: the tabu search over swaps within rows, the
  default search for ``row`` and ``unstructured`` (:func:`swap_tabu_search`);
- :mod:`~constrainedsparse.layerwise.fw.groups`: the N:M group sweep (:func:`group_sweep_polish`);
- :mod:`~constrainedsparse.layerwise.fw.tabu`: the N:M tabu search (:func:`group_tabu_search`);
- :mod:`~constrainedsparse.layerwise.fw.reconstruct`: damped least squares
  (:func:`reconstruct_rows`) and the joint mask-and-weight sweeps;
- :mod:`~constrainedsparse.layerwise.fw.solver`: :class:`FWSolver`, registered as ``fw``, the
  rounding and its guarantee.
"""

from constrainedsparse.layerwise.fw.config import STEPS, FWConfig, ReconstructionConfig, SearchConfig
from constrainedsparse.layerwise.fw.core import (
    SUPPORTED_SETS,
    FaceCoordinates,
    FrankWolfeRun,
    VertexProduct,
    frank_wolfe,
    require_supported,
    step_sizes,
)
from constrainedsparse.layerwise.fw.groups import MAX_GROUP_CHOICES, KeptSets, group_search_applies, group_sweep_polish
from constrainedsparse.layerwise.fw.reconstruct import Reconstruction, joint_sweeps, reconstruct_layer, reconstruct_rows
from constrainedsparse.layerwise.fw.search import SearchResult, joint_swap_polish, swap_polish
from constrainedsparse.layerwise.fw.solver import (
    FWSolver,
    Polished,
    keep_better,
    relaxes,
    round_relaxed,
    search_rounded,
)
from constrainedsparse.layerwise.fw.swap_tabu import swap_tabu_search
from constrainedsparse.layerwise.fw.tabu import TabuResult, group_tabu_search

__all__ = [
    "MAX_GROUP_CHOICES",
    "STEPS",
    "SUPPORTED_SETS",
    "FWConfig",
    "FWSolver",
    "FaceCoordinates",
    "FrankWolfeRun",
    "KeptSets",
    "Polished",
    "ReconstructionConfig",
    "Reconstruction",
    "SearchConfig",
    "SearchResult",
    "TabuResult",
    "VertexProduct",
    "frank_wolfe",
    "group_search_applies",
    "group_sweep_polish",
    "group_tabu_search",
    "joint_swap_polish",
    "joint_sweeps",
    "keep_better",
    "reconstruct_layer",
    "reconstruct_rows",
    "relaxes",
    "require_supported",
    "round_relaxed",
    "search_rounded",
    "step_sizes",
    "swap_polish",
    "swap_tabu_search",
]
