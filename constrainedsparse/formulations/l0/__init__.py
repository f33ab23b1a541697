"""``l0`` and ``l0-penalty``: hard-concrete L0 gates under expected-density constraints, or a fixed penalty.

Modules: :mod:`~.config` (hyperparameters), :mod:`~.gated` (the gates both share, ``l0-penalty``),
:mod:`~.constrained` (``l0``: density constraints, dual restarts, global hard masks).
"""

from constrainedsparse.formulations.l0.config import (
    DENSITY_CONSTRAINTS,
    DENSITY_OF,
    SCOPES,
    GateConfig,
    L0Config,
    L0PenaltyConfig,
)
from constrainedsparse.formulations.l0.constrained import (
    L0,
    MODEL_CONSTRAINT,
    layer_constraint_name,
    lower_constraint_name,
    model_constraint_name,
)
from constrainedsparse.formulations.l0.gated import PENALTY, Gated, L0Penalty

__all__ = [
    "DENSITY_CONSTRAINTS",
    "DENSITY_OF",
    "GateConfig",
    "Gated",
    "L0",
    "L0Config",
    "L0Penalty",
    "L0PenaltyConfig",
    "MODEL_CONSTRAINT",
    "PENALTY",
    "SCOPES",
    "layer_constraint_name",
    "lower_constraint_name",
    "model_constraint_name",
]
