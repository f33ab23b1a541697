r"""The ``fw`` solver: warm start → relax → round → search → keep the better → reconstruct.

:meth:`FWSolver.prune` runs, on one layer: the Wanda mask as warm start; for ``nm`` (and for
``row``/``unstructured`` with ``relax_rows=true``) Frank-Wolfe on the face of the mask hull that
fixes its top ``alpha`` share (:mod:`constrainedsparse.layerwise.fw.core`) and rounding of the
relaxed iterate; a local search on the rounded mask (:func:`search_rounded`:
:mod:`~constrainedsparse.layerwise.fw.swap_tabu` (or the descent of
:mod:`~constrainedsparse.layerwise.fw.search`) for ``row`` and ``unstructured``,
:mod:`~constrainedsparse.layerwise.fw.groups` and :mod:`~constrainedsparse.layerwise.fw.tabu`
for ``nm``); the better of the searched mask and Wanda's (:func:`keep_better`); and with
``reconstruct=true`` least squares on the kept weights
(:mod:`~constrainedsparse.layerwise.fw.reconstruct`).

**Why rows skip the relaxation by default.** Measured on the recorded layers of MiniLM and
SmolLM2 (``docs/formulations/layerwise.md``), the tabu search over swaps started from the Wanda
mask reaches lower errors than Frank-Wolfe followed by the same search in the same time: an
iteration costs a :math:`d_{out} d_{in}^2` product and some twenty passes over the layer, a search
step five passes, and a few iterations often round back to the Wanda mask anyway (one iteration does whenever
every row steps by less than 1/2, not always: the line search's steps reach 0.7–0.8). For N:M the relaxation pays
and runs by default.

**Rounding and its guarantee.** The relaxed iterate is rounded to the pattern by the feasible
set's own mask (top-k per unit of the relaxed values, the fixed weights ranked first, ties broken
by lower index, so the pattern holds exactly; :func:`round_relaxed`). Rounding a relaxed point has
**no guarantee in general**: the rounded objective may exceed the relaxed one, and even Wanda's,
arbitrarily. What *is* guaranteed: the local searches only ever lower the rounded mask's
objective, and the searched mask is then compared with the Wanda warm start and the better one is
kept — per row for the row-separable patterns, per layer for ``unstructured`` — so the returned
mask satisfies :math:`f(M_{\text{fw}}) \le \min(f(M_{\text{rounded}}), f(M_{\text{wanda}}))`, row
by row for ``row``/``nm`` (``fw/objective_final`` ≤ ``fw/objective_rounded`` and ≤
``fw/objective_start``). Without a relaxation the search starts from the Wanda mask itself
(``fw/objective_rounded`` = ``fw/objective_start``) and the guarantee is the search's own. The
relaxed iterate also gives a certificate: :math:`f(M) - g(M) \le f` on every mask of the face
(every mask containing the fixed weights), reported as ``fw/lower_bound`` (with the other
``fw/*`` metrics of the relaxation, only when it ran).
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch

from constrainedsparse.layerwise.base import (
    LayerProblem,
    LayerResult,
    LayerwiseSolver,
    below_per_row,
    register_solver,
    wanda_scores,
)
from constrainedsparse.layerwise.fw.config import FWConfig, SearchConfig
from constrainedsparse.layerwise.fw.core import (
    FrankWolfeRun,
    as_float,
    frank_wolfe,
    masked_row_errors,
    require_supported,
)
from constrainedsparse.layerwise.fw.groups import group_search_applies, group_sweep_polish
from constrainedsparse.layerwise.fw.reconstruct import Reconstruction, reconstruct_layer
from constrainedsparse.layerwise.fw.search import swap_polish
from constrainedsparse.layerwise.fw.swap_tabu import swap_tabu_search
from constrainedsparse.layerwise.fw.tabu import group_tabu_search
from constrainedsparse.sets import FeasibleSet, NMSparse
from constrainedsparse.targets import SparsityConfig

__all__ = ["FWSolver", "Polished", "keep_better", "relaxes", "round_relaxed", "search_rounded"]


def round_relaxed(feasible: FeasibleSet, run: FrankWolfeRun) -> torch.Tensor:
    """The pattern's mask of the relaxed iterate, the fixed weights first (ties by lower index)."""
    # Fixed weights outrank every free value in [0, 1]; the set's own mask rounds.
    return feasible.mask(run.mask + 2.0 * as_float(run.fixed, run.mask.dtype))


@dataclasses.dataclass(frozen=True)
class Polished:
    """Outcome of :func:`search_rounded`.

    Args:
        mask: The searched mask (the rounded one itself when no search ran).
        row_errors: Its per-row objective, float64.
        steps: Swap steps or group sweeps run (``fw/polish_steps``).
        moves: Swaps or group replacements applied (``fw/swaps``).
        tabu_improved_rows: Rows the tabu search improved (``fw/tabu_improved_rows``).
    """

    mask: torch.Tensor
    row_errors: torch.Tensor
    steps: int = 0
    moves: int = 0
    tabu_improved_rows: int = 0


def search_rounded(
    weight: torch.Tensor,
    gram: torch.Tensor,
    feasible: FeasibleSet,
    rounded: torch.Tensor,
    rounded_rows: torch.Tensor,
    residual: torch.Tensor,
    config: SearchConfig,
) -> Polished:
    r"""The local searches on the rounded mask: swaps for ``row``/``unstructured``, sweep then tabu for ``nm``.

    The searches start from the rounded mask even where Wanda's is better: the searched rounded
    mask is the better one far more often than the searched Wanda mask. N:M patterns with more
    than ``MAX_GROUP_CHOICES`` kept sets per group skip the group searches.

    Args:
        weight: :math:`W`, float32.
        gram: :math:`G`, float32.
        feasible: The layer's pattern.
        rounded: The rounded mask.
        rounded_rows: Its per-row objective.
        residual: Its :math:`C = WG - (W \odot M)G` (not modified).
        config: Which searches run, and how long.
    """
    polished = Polished(rounded, rounded_rows)
    if not isinstance(feasible, NMSparse):
        if config.swap_steps > 0:
            tabu = swap_tabu_search(
                weight, gram, rounded, config.swap_steps, config.swap_tenure, residual=residual, start_rows=rounded_rows
            )
            polished = Polished(tabu.mask, tabu.row_errors, tabu.steps, tabu.moves, tabu.improved_rows)
        elif config.polish_steps > 0:
            swapped = swap_polish(weight, gram, rounded, config.polish_steps, residual=residual)
            polished = Polished(swapped.mask, swapped.row_errors, swapped.steps, swapped.moves)
        return polished
    if not group_search_applies(feasible):
        return polished
    if config.polish_sweeps > 0:
        swept = group_sweep_polish(weight, gram, rounded, feasible.m, config.polish_sweeps, residual=residual)
        polished = Polished(swept.mask, swept.row_errors, swept.steps, swept.moves)
    if config.tabu_steps > 0:
        # The sweep does not return its C; without a sweep the rounded mask's is at hand.
        known = residual if polished.mask is rounded else None
        tabu = group_tabu_search(
            weight,
            gram,
            polished.mask,
            feasible.m,
            config.tabu_steps,
            config.tabu_tenure,
            residual=known,
            start_rows=polished.row_errors,
        )
        polished = dataclasses.replace(
            polished, mask=tabu.mask, row_errors=tabu.row_errors, tabu_improved_rows=tabu.improved_rows
        )
    return polished


def keep_better(
    feasible: FeasibleSet, polished: Polished, wanda: torch.Tensor, start_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The better of the searched mask and Wanda's: per row for ``row``/``nm``, for the layer for ``unstructured``.

    Returns:
        The mask and its per-row objective.
    """
    rows = polished.row_errors
    better = below_per_row(feasible, rows, start_rows)
    mask = wanda ^ ((polished.mask ^ wanda) & better.unsqueeze(1))  # bitwise: where() on masks is slow on CPU
    return mask, torch.where(better, rows, start_rows)


_RELAXATION_KEYS = ("alpha", "iterations", "step", "trace_every", "refresh_every", "product_dtype")
"""The keys only the Frank-Wolfe relaxation reads."""


def relaxes(feasible: FeasibleSet, config: FWConfig) -> bool:
    """Whether Frank-Wolfe runs before the search: always for N:M, for ``row``/``unstructured`` with ``relax_rows``."""
    return isinstance(feasible, NMSparse) or config.relax_rows


def _relax_and_round(
    weight: torch.Tensor,
    gram: torch.Tensor,
    feasible: FeasibleSet,
    wanda: torch.Tensor,
    scores: torch.Tensor,
    config: FWConfig,
) -> tuple[FrankWolfeRun | None, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    r"""Frank-Wolfe and rounding where :func:`relaxes`, else the Wanda mask itself (one product).

    Returns:
        The relaxation's run (``None`` without one), the rounded mask, the per-row objectives of
        the start (``"start"``) and rounded (``"rounded"``) masks, and the rounded mask's
        :math:`C = (W \odot (1 - M))G`.
    """
    if not relaxes(feasible, config):
        residual = (weight * as_float(~wanda, weight.dtype)) @ gram
        start = (weight * as_float(~wanda, weight.dtype)).mul_(residual).sum(dim=1).to(torch.float64)
        return None, wanda, {"start": start, "rounded": start}, residual
    wg = weight @ gram
    run = frank_wolfe(weight, gram, feasible, wanda, scores, config, wg=wg)
    rounded = round_relaxed(feasible, run)
    rows = {"start": masked_row_errors(weight, wg, run.start_product, wanda)}
    if torch.equal(rounded, wanda):  # few iterations often round back to the start: no product to redo
        rounded_product, rows["rounded"] = run.start_product, rows["start"]
    else:
        rounded_product = (weight * as_float(rounded, weight.dtype)) @ gram
        rows["rounded"] = masked_row_errors(weight, wg, rounded_product, rounded)
    return run, rounded, rows, wg - rounded_product


def _trace(run: FrankWolfeRun | None, config: FWConfig) -> list[dict[str, float]]:
    """Every ``trace_every``-th iteration's objective and gap, and the last one's (none without a relaxation)."""
    if run is None:
        return []
    return [
        {"iteration": float(t), "objective": run.objectives[t], "gap": run.gaps[t]}
        for t in range(config.iterations)
        if t % config.trace_every == 0 or t == config.iterations - 1
    ]


def _metrics(
    run: FrankWolfeRun | None,
    rows: dict[str, torch.Tensor],
    polished: Polished,
    reconstruction: Reconstruction | None,
    group_search: bool,
    started: float,
) -> dict[str, float]:
    """The layer's ``fw/*`` metrics (``rows``: per-row objectives of the start, rounded and final masks)."""
    metrics = {
        "fw/iterations": float(len(run.gaps)) if run is not None else 0.0,
        "fw/objective_start": float(rows["start"].sum()),
        "fw/objective_rounded": float(rows["rounded"].sum()),
        "fw/objective_final": float(rows["final"].sum()),
    }
    if run is not None:  # the relaxation ran (N:M, or relax_rows)
        metrics |= {
            "fw/objective_relaxed": run.objectives[-1],
            "fw/gap_last": run.gaps[-1],
            "fw/lower_bound": run.objectives[-2] - run.gaps[-1],
            "fw/sparse_updates": float(run.sparse_updates),
            "fw/dense_updates": float(run.dense_updates),
        }
    metrics |= {
        "fw/polish_steps": float(polished.steps),
        "fw/swaps": float(polished.moves),
        "fw/tabu_improved_rows": float(polished.tabu_improved_rows),
        "fw/joint_changes": float(reconstruction.joint_changes if reconstruction is not None else 0),
        "fw/group_search_skipped": float(not group_search),
        "fw/seconds": time.perf_counter() - started,
    }
    if reconstruction is not None:
        # fw/objective_final is the mask-only searched mask's; this is what the layer returns.
        metrics["fw/objective_reconstructed"] = float(reconstruction.row_errors.sum())
    return metrics


@register_solver("fw")
class FWSolver(LayerwiseSolver):
    """Frank-Wolfe over the mask hull with an α-fixed Wanda warm start (Roux et al. 2025)."""

    description = (
        "Frank-Wolfe on the convex hull of masks from an alpha-fixed Wanda warm start, + tabu search "
        "(row/unstructured: Wanda + swap tabu search unless relax_rows)"
    )
    Config = FWConfig
    supported_patterns: ClassVar[tuple[str, ...]] = ("unstructured", "row", "N:M")

    def keeps_dense_weights(self) -> bool:
        """Masks only unless ``reconstruct`` refits the kept weights."""
        return not self.config.reconstruction.reconstruct

    def idle_settings(self, target: SparsityConfig) -> dict[str, str]:
        """Keys set away from their defaults that the pipeline never reads at ``target``'s pattern: the relaxation's
        without it (``row``/``unstructured`` unless ``relax_rows``), the N:M searches' at ``row``/``unstructured``
        and the swap searches' at N:M, the reconstruction's without ``reconstruct``."""
        cfg: FWConfig = self.config
        defaults = {key: info.default for key, info in FWConfig.keys().items()}
        nm, search, rebuild = target.nm is not None, cfg.search, cfg.reconstruction
        relax = "the Frank-Wolfe relaxation runs for N:M patterns, for row and unstructured with relax_rows=true"
        joint = rebuild.reconstruct and rebuild.reconstruct_sweeps > 0
        idle = {key: relax for key in _RELAXATION_KEYS if not (nm or cfg.relax_rows)}
        if nm:
            idle |= {key: "a search of row and unstructured masks" for key in ("swap_steps", "swap_tenure")}
            idle["polish_steps"] = "a search of row and unstructured masks"
            idle["relax_rows"] = "N:M always runs the relaxation"
            if search.tabu_steps == 0:
                idle["tabu_tenure"] = "tabu_steps=0 turns the N:M tabu search off"
        else:
            idle |= {key: "a search of N:M masks" for key in ("polish_sweeps", "tabu_steps", "tabu_tenure")}
            if search.swap_steps > 0 and not joint:
                idle["polish_steps"] = "the swap descent runs only with swap_steps=0, or with reconstruct_sweeps"
            if search.swap_steps == 0:
                idle["swap_tenure"] = "swap_steps=0 turns the swap tabu search off"
        if not rebuild.reconstruct:
            idle |= {key: "reconstruct=false" for key in ("damp", "reconstruct_iterations", "reconstruct_sweeps")}
        values = cfg.values()
        return {key: why for key, why in idle.items() if values[key] != defaults[key]}

    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes ``layer`` (``layer.weight`` is not modified).

        Raises:
            ValueError: For a pattern other than ``row``, ``unstructured`` and ``nm``.
        """
        cfg: FWConfig = self.config
        started = time.perf_counter()
        feasible = layer.feasible_set()
        require_supported(feasible, layer.target.pattern)
        # Contiguous float32: the flat views and NumPy fast paths of the searches need it.
        weight = layer.weight.detach().to(torch.float32).contiguous()
        gram = layer.gram.detach().to(torch.float32).contiguous()
        scores = wanda_scores(weight, gram)
        wanda = feasible.mask(scores)  # warm start
        run, rounded, rows, residual = _relax_and_round(weight, gram, feasible, wanda, scores, cfg)  # relax, round
        polished = search_rounded(  # search
            weight, gram, feasible, rounded, rows["rounded"], residual, cfg.search
        )
        final, rows["final"] = keep_better(feasible, polished, wanda, rows["start"])  # keep the better
        weight_hat = layer.weight.detach() * final
        group_search = group_search_applies(feasible)
        reconstruction = None
        if cfg.reconstruction.reconstruct:  # reconstruct
            reconstruction = reconstruct_layer(layer, weight, gram, final, feasible, cfg, group_search)
            final, weight_hat = reconstruction.mask, reconstruction.weight
        metrics = _metrics(run, rows, polished, reconstruction, group_search, started)
        return LayerResult(weight=weight_hat, mask=final, metrics=metrics, trace=_trace(run, cfg))
