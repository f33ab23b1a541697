"""``--set`` routing and the name registry shared by training formulations and layer-wise solvers."""

import re

import pytest

from constrainedsparse.registry import Registry
from constrainedsparse.settings import route_settings


def test_route_settings_sends_each_key_to_its_group_and_refuses_an_option_named_like_another_groups_key():
    groups = {"solver": {"alpha": float}, "options": {"seq_len": int}, "driver": {"device": str}}
    routed = route_settings({"alpha": "0.5", "seq_len": "16", "device": "cpu"}, groups, "for x")
    assert routed == {"solver": {"alpha": 0.5}, "options": {"seq_len": 16}, "driver": {"device": "cpu"}}
    assert route_settings({}, groups, "for x") == {"solver": {}, "options": {}, "driver": {}}
    clash = {**groups, "options": {"alpha": int}}
    with pytest.raises(ValueError, match=r"^the problem's option 'alpha' has the name of a solver --set key for x, so"):
        route_settings({}, clash, "for x")


def test_route_settings_errors_name_the_key_and_what_is_allowed():
    groups = {"a": {"rho": float}, "b": {"flag": bool}}
    with pytest.raises(ValueError, match=r"^unknown --set key 'nope' for formulation 'f'; allowed: flag, rho$"):
        route_settings({"nope": "1"}, groups, "for formulation 'f'")
    with pytest.raises(ValueError, match=r"^--set rho='fast' must be a float$"):
        route_settings({"rho": "fast"}, groups, "for x")
    with pytest.raises(ValueError, match=r"^--set flag='maybe' must be a bool \(true/false\)$"):
        route_settings({"flag": "maybe"}, groups, "for x")


def test_registry_names_classes_by_kind_and_refuses_duplicates():
    registry = Registry()

    @registry.register("layerwise", "b")
    class B:
        description = "the b"

    @registry.register("training", "a")
    class A:
        description = "the a"

    @registry.register("layerwise", "a")
    class A2:
        description = "the other a"

    assert (
        registry.names("layerwise") == ["a", "b"]
        and A.name == "a"
        and registry.kinds_of("a") == ["training", "layerwise"]
    )
    assert registry.describe("layerwise") == {"a": "the other a", "b": "the b"}
    assert registry.get("layerwise", "b") is B and registry.get("training", "a") is A
    with pytest.raises(ValueError, match=r"^unknown layer-wise solver 'c'; choose one of a, b$"):
        registry.get("layerwise", "c")
    with pytest.raises(ValueError, match=r"^unknown formulation 'b'; available: a$"):
        registry.get("training", "b")
    by = re.escape(f"{A.__module__}.{A.__qualname__}")
    with pytest.raises(ValueError, match=rf"^formulation 'a' is already registered \(by {by}\)$"):
        registry.register("training", "a")(type("Again", (), {"description": "another a"}))
    # The same definition loaded again (a problem file loaded twice in one process) replaces the class.
    Reloaded = type("A", (), {"__module__": A.__module__, "__qualname__": A.__qualname__, "description": "new"})
    assert registry.register("training", "a")(Reloaded) is Reloaded and registry.get("training", "a") is Reloaded


def test_target_from_flags_is_one_validation_for_both_runners():
    from constrainedsparse.settings import target_from_flags

    assert target_from_flags(None, None, 0.9).sparsity == 0.9
    assert target_from_flags(0.5, None, 0.9, "row").pattern == "row"
    assert target_from_flags(None, "2:4", 0.5).nm == (2, 4)
    with pytest.raises(
        ValueError,
        match=r"^argument --pattern: not allowed with argument --sparsity \(the pattern 2:4 fixes its own level\)",
    ):
        target_from_flags(0.5, "2:4", 0.9)
    assert target_from_flags(0.5, "structured:columns", 0.9).feasible_set((4, 6)).k == 3  # other patterns take a level
    assert target_from_flags(None, "row", 0.9).sparsity == 0.9
    with pytest.raises(ValueError, match=r"^--sparsity must be in \[0, 1\), got 1.0$"):
        target_from_flags(1.0, None, 0.9)
