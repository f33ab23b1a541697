"""Formulations, picked by name: ``make("slr", problem)``.

Importing this package registers every built-in formulation.
"""

from constrainedsparse.formulations import admm, l0, magnitude, slr  # noqa: F401  (each registers itself)
from constrainedsparse.formulations.base import Formulation, NoConfig
from constrainedsparse.formulations.factory import (
    available_formulations,
    describe_formulations,
    formulation_class,
    make,
    register_formulation,
)
from constrainedsparse.formulations.step import LagrangianStep

__all__ = [
    "Formulation",
    "LagrangianStep",
    "NoConfig",
    "available_formulations",
    "describe_formulations",
    "formulation_class",
    "make",
    "register_formulation",
]
