r"""What a finished run tells a person: whole-model figures, a per-layer table, the user's constraints.

Shared by both runners (``summary.json``, ``layers.csv``, the printed summary) and by
:func:`constrainedsparse.prune_layerwise`:

* :func:`model_figures` — zeros over *all* parameters (``model_sparsity``; embeddings, norms and
  biases included), parameter counts, and bytes dense vs sparse-storable (a pruned tensor stored as
  its nonzero values plus a one-bit-per-entry mask, the layout of ``constrainedsparse export``);
* :func:`layer_rows` / :func:`write_layers_csv` — name, shape, sparsity (and error, layer-wise);
* :func:`constraint_report` — each user constraint's value on the final model (on the whole test
  set when it takes a batch), whether it holds and its multiplier;
* :func:`empty_layers` — targeted tensors a hard prune left without a single weight.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from constrainedsparse.checkpoint import atomic_write_bytes
from constrainedsparse.modes import eval_mode
from constrainedsparse.problem import violation_summary

__all__ = [
    "EQUALITY_TOLERANCE",
    "block_names",
    "constraint_report",
    "empty_layers",
    "layer_rows",
    "model_figures",
    "print_layer_table",
    "write_layers_csv",
]

EQUALITY_TOLERANCE = 1e-3
"""An equality constraint counts as satisfied when every entry is within this of 0."""


def _bytes(tensor: torch.Tensor, sparse: bool) -> int:
    dense = tensor.numel() * tensor.element_size()
    if not sparse:
        return dense
    stored = int(torch.count_nonzero(tensor)) * tensor.element_size() + math.ceil(tensor.numel() / 8)
    return min(dense, stored)


@torch.no_grad()
def model_figures(model: nn.Module, pruned: Iterable[str]) -> dict[str, Any]:
    """Whole-model figures of ``model`` whose tensors named in ``pruned`` were pruned.

    Returns:
        ``model_sparsity`` (zeros over all parameters), ``parameters`` (``total``, ``nonzero``) and
        ``bytes`` (``dense``: every parameter dense; ``sparse``: pruned tensors as nonzero values
        plus a bitmask, whichever is smaller, the rest dense).
    """
    pruned = set(pruned)
    total = nonzero = dense = sparse = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        nonzero += int(torch.count_nonzero(parameter))
        dense += _bytes(parameter, False)
        sparse += _bytes(parameter, name in pruned)
    return {
        "model_sparsity": 1.0 - nonzero / total if total else 0.0,
        "parameters": {"total": total, "nonzero": nonzero},
        "bytes": {"dense": dense, "sparse": sparse},
    }


@torch.no_grad()
def layer_rows(weights: Mapping[str, torch.Tensor], errors: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per pruned tensor: ``name``, ``shape``, ``parameters``, ``nonzero``, ``sparsity`` (and ``error``)."""
    rows = []
    for name, weight in weights.items():
        nonzero = int(torch.count_nonzero(weight))
        row = {
            "name": name,
            "shape": "x".join(str(d) for d in weight.shape),
            "parameters": weight.numel(),
            "nonzero": nonzero,
            "sparsity": 1.0 - nonzero / weight.numel(),
        }
        if errors is not None:
            row["error"] = errors.get(name, float("nan"))
        rows.append(row)
    return rows


def write_layers_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``layers.csv``: the per-layer table (atomic write)."""
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def print_layer_table(rows: Sequence[Mapping[str, Any]], block_of: Mapping[str, str] | None = None) -> None:
    """Prints the per-layer table (``--verbose``), grouped by block when ``block_of`` names them."""
    if not rows:
        return
    width = max(len(r["name"]) for r in rows)
    has_error = "error" in rows[0]
    print(f"  {'layer':<{width}}  {'shape':>11}  {'sparsity':>8}" + ("  error" if has_error else ""))
    last = None
    for row in rows:
        block = (block_of or {}).get(row["name"])
        if block is not None and block != last:
            print(f"  [{block}]")
            last = block
        line = f"  {row['name']:<{width}}  {row['shape']:>11}  {row['sparsity']:>8.4f}"
        print(line + (f"  {row['error']:.5f}" if has_error else ""))


def block_names(names: Sequence[str]) -> dict[str, str]:
    """``{layer: block}``: the name's prefix up to its first index (``model.layers.3``), when there is one."""
    blocks = {}
    for name in names:
        parts = name.split(".")
        first = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if first is not None and first + 1 < len(parts) - 1:
            blocks[name] = ".".join(parts[: first + 1])
    return blocks


def empty_layers(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors without a single nonzero entry: weights of a layer the model no longer uses, or
    masks that would make them so."""
    return [name for name, weight in weights.items() if weight.numel() and int(torch.count_nonzero(weight)) == 0]


def final_violations(report: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each reported constraint's value as its plot's training line shows a violation (``violation/<name>``), to
    mark the final model on it: an inequality's largest entry, an equality's norm (a scalar: the value; a value
    that was not finite is left out)."""
    return {
        name: violation_summary(torch.tensor(entry["value"], dtype=torch.float64), entry["sense"] == "==")
        for name, entry in report.items()
        if entry["value"] is not None
    }


def _value(tensor: torch.Tensor) -> float | list[float]:
    flat = tensor.detach().reshape(-1).double().cpu()
    return float(flat[0]) if flat.numel() == 1 else flat.tolist()


@torch.no_grad()
def constraint_report(
    model: nn.Module,
    constraints: Mapping[str, Any],
    multipliers: Mapping[str, torch.Tensor],
    test_batch: Any,
) -> dict[str, dict[str, Any]]:
    """Each user constraint on the final model: ``{name: {"value", "satisfied", "multiplier", "sense"}}``.

    Args:
        model: The final (hard-pruned, retrained if any) model, in eval mode for the measurement.
        constraints: ``{name: UserConstraint}``.
        multipliers: Their multipliers' last values by name (a constraint without one is reported
            with ``None``).
        test_batch: The whole test set as one batch, for constraints that take a batch.

    ``value`` is ``strict_fn``'s measurement when the constraint has one (else ``fn``'s); ``None`` (not
    satisfied) when it is not finite. ``satisfied`` is
    ``max(value) <= 0`` for ``<=`` and ``max|value| <= EQUALITY_TOLERANCE`` for ``==``.
    """
    report = {}
    with eval_mode(model):
        for name, spec in constraints.items():
            value = torch.as_tensor(spec.measure(model, test_batch)).reshape(-1).double()  # strict_fn's if given
            worst = float(value.max()) if spec.sense == "<=" else float(value.abs().max())
            limit = 0.0 if spec.sense == "<=" else EQUALITY_TOLERANCE
            multiplier = multipliers.get(name)
            finite = bool(torch.isfinite(value).all())  # a nan is no value (summary.json would hold a bare NaN)
            report[name] = {
                "value": _value(value) if finite else None,
                "satisfied": finite and bool(worst <= limit),
                "multiplier": None if multiplier is None else _value(multiplier),
                "sense": spec.sense,
            }
    return report
