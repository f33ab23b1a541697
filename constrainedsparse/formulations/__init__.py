"""Formulations, picked by name: ``make("magnitude", problem)``.

Importing this package registers every built-in formulation.
"""

from constrainedsparse.formulations import magnitude  # noqa: F401  (registers itself)
from constrainedsparse.formulations.base import (
    Formulation,
    NoConfig,
    available_formulations,
    describe_formulations,
    formulation_class,
    make,
    register_formulation,
)

__all__ = [
    "Formulation",
    "NoConfig",
    "available_formulations",
    "describe_formulations",
    "formulation_class",
    "make",
    "register_formulation",
]
