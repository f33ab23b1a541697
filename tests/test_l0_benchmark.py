"""benchmarks/l0_control.py runs end to end in --quick mode and writes well-formed results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_l0_control", BENCHMARKS / "l0_control.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_l0_control_quick(tmp_path):
    bench = _load()
    threads = torch.get_num_threads()
    argv = ["--quick", "--targets", "0.5", "--epochs", "1", "--out", str(tmp_path), "--threads", "1"]
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads
    for name in ("results.md", "results.json", "l0_control.png"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["scope"], r["target"]) for r in data["constrained"]] == [("model", 0.5), ("layer", 0.5)]
    for record in data["constrained"]:
        assert 0.0 < record["expected_density"] <= 1.0
        assert record["gap"] == abs(record["expected_density"] - 0.5)
        assert set(record["layer_density"]) == {"0.weight", "2.weight", "4.weight"}
        assert 0.0 <= record["gated_accuracy"] <= 1.0
    assert [r["lmbda"] for r in data["penalized"]] == [0.0, 10.0]
    text = (tmp_path / "results.md").read_text()
    assert "benchmarks/l0_control.py --quick --targets 0.5" in text
    assert "| model | 0.5 |" in text and "| layer | 0.5 |" in text and "| 10 |" in text
    assert not list(tmp_path.glob("runs"))  # run directories live in a temporary folder
