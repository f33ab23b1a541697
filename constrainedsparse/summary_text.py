"""What the CLI prints when a run ends: its summary, one line a figure (and with ``--verbose`` every layer)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from constrainedsparse.report import block_names, print_layer_table

__all__ = ["LAYERWISE_SCORES", "print_summary", "summary_rows"]

LAYERWISE_SCORES = ("fidelity", "dense_perplexity", "perplexity")
"""The summary keys a layer-wise problem scores with, unless it names its own (``score_keys``)."""


def _size(count: int) -> str:
    return f"{count / 2**20:.2f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def _percent_or_plain(summary: dict, key: str) -> str:
    value = summary[key]
    return f"{100 * value:.2f} %" if summary.get("metric", {}).get("name") == "accuracy" else f"{value:.4f}"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The lines the CLI prints after a run, ``(label, text)``, from its ``summary.json`` values."""
    rows = [("problem", summary["problem"]), ("formulation", summary["formulation"])]
    target = summary.get("target_sparsity")
    # A layer-wise run names its scope either way (mask_scope=layer is the unstructured pattern).
    pattern = summary.get("pattern") or ("unstructured" if "mask_scope" in summary else None)
    rows.append(("target", f"{target} {pattern}" if target is not None and pattern else str(pattern or target)))
    rows.append(("achieved sparsity", f"{summary['achieved_sparsity']:.4f} of the pruned weights"))
    if "model_sparsity" in summary:
        parameters = summary["parameters"]
        rows.append(("model sparsity", f"{summary['model_sparsity']:.4f} of all {parameters['total']:,} parameters "
                                       f"({parameters['nonzero']:,} nonzero)"))  # fmt: skip
        size = summary["bytes"]
        rows.append(("size", f"{_size(size['dense'])} dense, {_size(size['sparse'])} stored sparse (values + bitmask)"))
    metric = summary.get("metric", {}).get("name")
    if metric:
        for stage in ("dense", "hardprune", "retrain"):
            if summary.get(f"{stage}_{metric}") is not None:
                rows.append((f"{stage} {metric}", _percent_or_plain(summary, f"{stage}_{metric}")))
    allocation = summary.get("allocation")
    if allocation:  # per-layer levels of a layer-wise run (lagrangian or owl)
        levels = allocation["levels"].values()
        rows.append(("allocation", f"{allocation['method']}: layer levels {min(levels):.4f} to {max(levels):.4f}"))
    for key in ("mean_layer_error", *summary.get("score_keys", LAYERWISE_SCORES)):  # a problem's own score keys
        if isinstance(summary.get(key), float):  # counts (evaluated_tokens) stay in summary.json
            rows.append((key.replace("_", " "), f"{summary[key]:.4f}"))
    if isinstance(summary.get("expected_density"), float) and isinstance(summary.get("target_density"), float):
        expected, wanted = summary["expected_density"], summary["target_density"]
        note = "" if abs(expected - wanted) <= 0.02 else " (more than 0.02 apart: the hard prune set the level)"
        rows.append(("l0 gates", f"expected density {expected:.4f}, target {wanted:.4f}{note}"))
    if "purged_params" in summary:  # a structured l0 run: the smaller dense model purged.safetensors holds
        rows.append(("purged", f"{summary['dense_params']:,} -> {summary['purged_params']:,} parameters, "
                               f"{summary['dense_macs']:,} -> {summary['purged_macs']:,} MACs per sample"))  # fmt: skip
    elif summary.get("purge_skipped"):
        rows.append(("purge skipped", str(summary["purge_skipped"])))
    for name, entry in summary.get("constraints", {}).items():
        value, equality = entry["value"], entry["sense"] == "=="
        if value is None:
            shown = "not finite"
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        else:  # a vector: its entry that decides (the largest; the largest in size for an equality)
            shown = f"max |entry| {max(abs(v) for v in value):.4g}" if equality else f"max {max(value):.4g}"
        verdict = "holds" if entry["satisfied"] else "VIOLATED"
        multiplier = entry.get("multiplier")
        if isinstance(multiplier, float):
            verdict += f" (multiplier {multiplier:.4g})"
        elif isinstance(multiplier, list):  # a vector's multipliers: their norm, as the logs show it
            verdict += f" (multipliers' norm {math.sqrt(sum(m * m for m in multiplier)):.4g})"
        rows.append((f"constraint {name}", f"{shown} {entry['sense']} 0: {verdict}"))
    rows.append(("seconds", f"{summary['seconds']:.1f}"))
    return rows


def print_summary(summary: dict, out: Path, verbose: bool) -> None:
    """Prints :func:`summary_rows`, with ``verbose`` the per-layer table of ``out/layers.csv``, and what was written."""
    rows = summary_rows(summary)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if verbose and (out / "layers.csv").is_file():
        with (out / "layers.csv").open() as handle:
            layers = [
                {
                    **row,
                    "sparsity": float(row["sparsity"]),
                    **({"error": float(row["error"])} if "error" in row else {}),
                }
                for row in csv.DictReader(handle)
            ]
        print_layer_table(layers, block_names([row["name"] for row in layers]))
    weights = summary.get("saved_model", "model.safetensors")
    purged = ", purged.safetensors" if "purged_params" in summary else ""
    print(f"  wrote {out}/summary.json, layers.csv, metrics.jsonl, metrics.png, {weights}{purged}")
    if summary.get("wandb_run"):
        print(f"  {summary['wandb_run']}")
