"""Which formulation is attached to which pruned tensor, until it is finalized.

A formulation's masks, gates or gradient hooks stay on the model until its ``finalize()``, also after the
formulation object is dropped. A second formulation on the same tensors would stack on them, and hard-pruning
or removing masks under them would leave them half attached (slr's penalty hooks still adding to gradients):
both are refused, naming the formulation (:func:`claim_targets`, :func:`attached_formulation`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from constrainedsparse.targets import TargetParam

__all__ = ["attached_formulation", "claim_targets", "release_targets"]


@dataclasses.dataclass
class _Claim:
    """That a formulation's attachments (masks, gates, gradient hooks) are on its targets until it is finalized:
    kept apart from the formulation, whose hooks can outlive it."""

    name: str
    released: bool = False


# Which formulation's attachments each targeted tensor carries: module -> {parameter name: claim}. Keyed by
# the module object (weakly), so a deep copy of the model starts free and a dropped model is forgotten.
_CLAIMS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Claim]] = weakref.WeakKeyDictionary()


def attached_formulation(target: TargetParam) -> str | None:
    """The name of the formulation attached to ``target`` and not finalized (``None``: none is)."""
    claim = _CLAIMS.get(target.module, {}).get(target.param_name)
    return claim.name if claim is not None and not claim.released else None


def claim_targets(formulation: Any) -> _Claim:
    """Records that ``formulation`` attaches to its targets; refuses a target another formulation is attached to.

    Returns:
        The claim, released by :func:`release_targets`.

    Raises:
        ValueError: If a target carries another formulation that was not finalized.
    """
    targets: Iterable[TargetParam] = formulation.problem.targets
    for target in targets:
        owner = attached_formulation(target)
        if owner is not None:
            raise ValueError(
                f"{target.name} is pruned already by a {owner!r} formulation built on this model and not "
                "finalized (its masks, gates or gradient hooks stay on the model): finalize() that one first, or "
                "prune a fresh copy of the model"
            )
    claim = _Claim(formulation.name)
    for target in targets:
        _CLAIMS.setdefault(target.module, {})[target.param_name] = claim
    return claim


def release_targets(claim: _Claim, released: bool = True) -> None:
    """Marks a formulation's targets free (``released=False``: attached again, a finalize that failed)."""
    claim.released = released
