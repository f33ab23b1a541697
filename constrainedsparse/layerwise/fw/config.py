"""Hyperparameters of ``fw``: the Frank-Wolfe keys, and the ``search`` and ``reconstruction`` groups.

Keys are flat for users whatever the group (``--set tabu_steps=100``, ``--set reconstruct=true``,
``FWConfig.from_values({"tabu_steps": 100})``); in code they are ``config.search.tabu_steps`` and
``config.reconstruction.reconstruct``. Every value is checked by its declaration
(:mod:`constrainedsparse.config`), with messages prefixed ``fw: ``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from constrainedsparse.config import Bounds, Hyperparameters, OneOf, hyperparameter, nested

__all__ = ["PRODUCT_DTYPES", "STEPS", "FWConfig", "ReconstructionConfig", "SearchConfig"]

STEPS = ("line_search", "open_loop")
PRODUCT_DTYPES = ("float32", "bfloat16")


class _FWHyperparameters(Hyperparameters):
    """fw's hyperparameter groups: every message starts with ``fw: ``."""

    error_prefix: ClassVar[str] = "fw: "


@dataclasses.dataclass
class SearchConfig(_FWHyperparameters):
    """The local searches after rounding (keys ``polish_steps``, ``swap_steps``, ``swap_tenure``, ``tabu_steps``, ...).

    Args:
        polish_steps: Maximum steps of the swap descent for ``row`` and ``unstructured`` when
            ``swap_steps`` is 0 (:func:`~constrainedsparse.layerwise.fw.search.swap_polish`; 0:
            off), and of every round of joint swaps with ``reconstruct_sweeps``.
        swap_steps: Steps of the tabu search over swaps within rows for ``row`` and
            ``unstructured`` (:func:`~constrainedsparse.layerwise.fw.swap_tabu.swap_tabu_search`;
            0: the descent of ``polish_steps`` instead).
        swap_tenure: Steps during which a swapped weight may not move again, at least 1.
        polish_sweeps: Maximum sweeps of the exact group-wise local search after rounding for
            ``nm`` (0: off, the default: the tabu search does better in less time). Like the tabu
            search and the joint sweeps, only where a group has at most
            :data:`~constrainedsparse.layerwise.fw.groups.MAX_GROUP_CHOICES` = 256 kept sets, e.g.
            up to 4:8; larger patterns skip the group search (``fw/group_search_skipped``).
        tabu_steps: Steps of the tabu search over ``nm`` group moves
            (:func:`~constrainedsparse.layerwise.fw.tabu.group_tabu_search`), after the group sweep
            if any (0: off).
        tabu_tenure: Steps during which a group that just changed may not change again (unless
            the move reaches its row's best objective so far), at least 1.
    """

    polish_steps: int = hyperparameter(
        60,
        "max steps of the swap descent after rounding (swap_steps=0), row and unstructured (0: off)",
        Bounds(low=0, integer=True),
    )
    swap_steps: int = hyperparameter(
        80, "steps of the swap tabu search, row and unstructured (0: the descent instead)", Bounds(low=0, integer=True)
    )
    swap_tenure: int = hyperparameter(4, "steps during which a swapped weight stays tabu", Bounds(low=1, integer=True))
    polish_sweeps: int = hyperparameter(
        0, "max sweeps of the N:M group search after rounding (0: off)", Bounds(low=0, integer=True)
    )
    tabu_steps: int = hyperparameter(
        100, "steps of the N:M tabu search, after the group sweeps if any (0: off)", Bounds(low=0, integer=True)
    )
    tabu_tenure: int = hyperparameter(
        20, "steps during which a group that just changed stays tabu", Bounds(low=1, integer=True)
    )


@dataclasses.dataclass
class ReconstructionConfig(_FWHyperparameters):
    r"""The least-squares reconstruction (keys ``reconstruct``, ``damp``, ``reconstruct_*``).

    Args:
        reconstruct: Re-solve the kept weights by damped least squares after rounding.
        damp: Damping :math:`\lambda` of the reconstruction as a fraction of the mean of diag(G).
        reconstruct_iterations: Conjugate-gradient iterations of the reconstruction, at least 1.
        reconstruct_sweeps: With ``reconstruct``, rounds of reconstruction-aware local search
            (masks and kept weights chosen jointly: a group sweep for ``nm``, up to
            ``polish_steps`` swap steps otherwise), each followed by a least-squares re-solve
            (0: least squares on the Frank-Wolfe mask only).
    """

    reconstruct: bool = hyperparameter(False, "re-solve the kept weights by damped least squares after rounding")
    damp: float = hyperparameter(
        0.01,
        "damping of the least squares as a fraction of the mean of diag(G)",
        Bounds(low=0, low_inclusive=False, finite=True),
    )
    reconstruct_iterations: int = hyperparameter(
        30, "conjugate-gradient iterations of the least squares", Bounds(low=1, integer=True)
    )
    reconstruct_sweeps: int = hyperparameter(
        2, "rounds of joint mask-and-weight search, each re-solved (0: least squares only)", Bounds(low=0, integer=True)
    )


@dataclasses.dataclass
class FWConfig(_FWHyperparameters):
    r"""Hyperparameters of :class:`~constrainedsparse.layerwise.fw.solver.FWSolver` (``--set key=value``).

    Keys are flat whatever the group: ``FWConfig.from_values({"tabu_steps": 100})`` sets
    ``config.search.tabu_steps``.

    Args:
        alpha: Fraction of every unit's budget fixed to the highest Wanda scores, in ``[0, 1)``.
        iterations: Frank-Wolfe iterations, at least 1 (``nm``; ``row`` and ``unstructured`` only
            with ``relax_rows``).
        relax_rows: Run the relaxation for ``row`` and ``unstructured`` too. Off by default: there
            the search starts from the Wanda mask, which reaches lower errors in the same time
            (``docs/formulations/layerwise.md``).
        step: ``"line_search"`` (exact, per row where the pattern allows) or ``"open_loop"``
            (:math:`2/(t+2)`, the paper's).
        search: The local searches after rounding (:class:`SearchConfig`).
        reconstruction: The least-squares reconstruction (:class:`ReconstructionConfig`).
        trace_every: Iterations between two sampled trace entries (the last one is always kept).
        refresh_every: Iterations between two dense recomputations of the incremental products.
        product_dtype: dtype of the dense vertex products :math:`(W \odot V)G` of the iterations
            (:class:`~constrainedsparse.layerwise.fw.core.VertexProduct`): ``"float32"``, or
            ``"bfloat16"`` (inputs rounded to bfloat16, result stored in float32): several times
            faster where the hardware multiplies bfloat16 natively (CPUs with AMX, recent GPUs),
            slower elsewhere. The relaxation is then approximate: ``fw/objective_relaxed`` within
            about 0.3 % on MiniLM's layers, and ``fw/lower_bound`` is no certificate (the gap of an
            approximate gradient). The rounded and searched masks' objectives stay float32, so the
            guarantee against the Wanda mask is unchanged.
    """

    alpha: float = hyperparameter(
        0.5,
        "fraction of every unit's budget fixed to the top Wanda scores",
        Bounds(low=0, high=1, high_inclusive=False),
    )
    iterations: int = hyperparameter(
        10, "Frank-Wolfe iterations (N:M; row and unstructured with relax_rows)", Bounds(low=1, integer=True)
    )
    relax_rows: bool = hyperparameter(
        False, "run Frank-Wolfe for row and unstructured too (off: the search starts from the Wanda mask)"
    )
    step: str = hyperparameter("line_search", "step size rule (open_loop: 2/(t+2), the paper's)", OneOf(STEPS))
    search: SearchConfig = nested(SearchConfig, "local searches after rounding")
    reconstruction: ReconstructionConfig = nested(ReconstructionConfig, "least-squares reconstruction")
    trace_every: int = hyperparameter(1, "iterations between two sampled trace entries", Bounds(low=1, integer=True))
    refresh_every: int = hyperparameter(
        50, "iterations between two dense recomputations of the incremental products", Bounds(low=1, integer=True)
    )
    product_dtype: str = hyperparameter(
        "float32",
        "dtype of the Frank-Wolfe vertex products (bfloat16: faster where multiplied natively, approximate)",
        OneOf(PRODUCT_DTYPES),
    )
