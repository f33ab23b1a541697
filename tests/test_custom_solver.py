"""A layer-wise solver of the user's: registered by name (Python or a problem file) or handed over as an
instance, its hyperparameters validated like the built-in ones, its answers checked before they reach
the model (docs/add-a-solver.md)."""

import json
import runpy
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TWO_RESIDUAL_BLOCKS, fails_with_one_line
from torch import nn

from constrainedsparse import LayerwiseSolver, describe, prune_layerwise
from constrainedsparse.cli import main
from constrainedsparse.layerwise import LayerResult
from constrainedsparse.registry import REGISTRY

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "wanda_p.py"


@pytest.fixture
def registry():
    """The registry as it was before the test (the example and the problem files register solvers)."""
    saved = dict(REGISTRY._classes)
    yield
    REGISTRY._classes.clear()
    REGISTRY._classes.update(saved)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_the_example_solver_runs_by_name_and_its_p1_is_wanda(registry, capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    errors = {}
    for line in capsys.readouterr().out.splitlines():
        method, rest = line.split(maxsplit=1)
        options, _, tail = rest.partition("}")
        assert tail.split()[-1] == "0.50"  # 2:4 exactly
        errors[(method, options + "}")] = float(tail.split()[3])
    p0, p05, p1 = (errors[("wanda-p", f"{{'p': {p}}}")] for p in (0.0, 0.5, 1.0))
    assert p1 == errors[("wanda", "{}")]  # the same score, the same masks
    assert p0 > p05 > p1  # inputs of very different norms: the input norm matters
    info = describe("wanda-p", kind="layerwise")
    assert info["p"].default == 1.0 and info["p"].allowed == ">= 0"
    with pytest.raises(ValueError, match=r"^p must be >= 0, got -1\.0$"):
        prune_layerwise(Net(), [torch.randn(8, 8)], "wanda-p", p=-1.0)
    with pytest.raises(ValueError, match=r"^unknown hyperparameter 'q' for layer-wise solver 'wanda-p'; allowed: p$"):
        prune_layerwise(Net(), [torch.randn(8, 8)], "wanda-p", q=1.0)


def _solver(answer):
    class Mine(LayerwiseSolver):
        description = "a test solver"

        def prune(self, layer):
            return answer(layer)

    return Mine()


def _two_of_four(layer):
    return (torch.arange(layer.weight.shape[1]) % 4 < 2).expand_as(layer.weight).clone()


def test_an_unregistered_instance_is_named_after_its_class():
    report = prune_layerwise(
        Net(),
        [torch.randn(16, 8)],
        _solver(lambda layer: LayerResult(layer.weight * _two_of_four(layer), _two_of_four(layer))),
        pattern="2:4",
    )
    assert report.method == "Mine" and report.achieved_sparsity == 0.5


def test_metrics_of_numpy_scalars_and_0d_tensors_become_floats():
    metrics = {"a": np.float32(1.5), "b": torch.tensor(2), "c": 3}
    report = prune_layerwise(
        Net(),
        [torch.randn(16, 8)],
        _solver(lambda layer: LayerResult(layer.weight * _two_of_four(layer), _two_of_four(layer), metrics)),
        pattern="2:4",
    )
    for values in report.layers.values():
        assert values == {"a": 1.5, "b": 2.0, "c": 3.0} and all(type(v) is float for v in values.values())


WHERE = r"^layer-wise solver 'Mine' on blocks\.0\.0\.weight"
BROKEN = {
    "keeps every weight": (
        lambda layer: LayerResult(layer.weight.clone(), torch.ones_like(layer.weight, dtype=torch.bool)),
        WHERE + r": the mask is outside the layer's pattern 2:4 \(NMSparse\(2:4\)\)$",
    ),
    "float mask": (
        lambda layer: LayerResult(layer.weight.clone(), torch.ones_like(layer.weight)),
        WHERE
        + r": the mask must be a torch\.bool tensor of the weight's shape \(16, 8\), got torch\.float32 \(16, 8\)$",
    ),
    "weight of another shape": (
        lambda layer: LayerResult(layer.weight[:, :4].clone(), _two_of_four(layer)),
        WHERE + r": the weight must be a floating-point tensor of the shape \(16, 8\), got torch\.float32 \(16, 4\)$",
    ),
    "integer weight": (
        lambda layer: LayerResult((layer.weight * 100).long(), _two_of_four(layer)),
        WHERE + r": the weight must be a floating-point tensor of the shape \(16, 8\), got torch\.int64 \(16, 8\)$",
    ),
    "tensor metrics": (  # a 0-d tensor or a NumPy scalar converts; three numbers do not
        lambda layer: LayerResult(
            layer.weight.clone(), _two_of_four(layer), metrics={"a": torch.tensor(1.5), "x/y": torch.ones(3)}
        ),
        WHERE + r": metrics must map names to numbers \(float\(t\) of a tensor t\), got 'x/y': Tensor$",
    ),
    "metrics not a dict": (
        lambda layer: LayerResult(layer.weight.clone(), _two_of_four(layer), metrics=[1]),
        WHERE + r": metrics must be a dict of names to numbers, got list$",
    ),
    "trace entry": (
        lambda layer: LayerResult(layer.weight.clone(), _two_of_four(layer), trace=[{"gap": "small"}]),
        WHERE + r": trace\[0\] must map names to numbers \(float\(t\) of a tensor t\), got 'gap': str$",
    ),
    "weight changed in place": (
        lambda layer: LayerResult(layer.weight.mul_(_two_of_four(layer)), _two_of_four(layer)),
        WHERE + r": prune\(\) modified layer\.weight in place \(it is read only",
    ),
    "not a LayerResult": (
        lambda layer: (layer.weight, _two_of_four(layer)),
        WHERE + r": prune\(\) must return a LayerResult, got tuple$",
    ),
    "nan kept weight": (
        lambda layer: LayerResult(layer.weight * float("nan"), _two_of_four(layer)),
        WHERE + r": kept weights must be finite \(some are inf or nan\)$",
    ),
    "raises": (lambda layer: {}["missing"], WHERE + r" failed: KeyError: 'missing' \(--debug shows the traceback\)$"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_answer_is_one_precise_error_and_the_model_is_left_as_it_was(case):
    answer, message = BROKEN[case]
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        prune_layerwise(model, [torch.randn(16, 8)], _solver(answer), pattern="2:4")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the first layer failed


PROBLEM_FILE = (
    """
import torch
from torch import nn

from constrainedsparse import LayerwiseProblem, LayerwiseSolver, register_solver
from constrainedsparse.layerwise import LayerResult


@register_solver("half-columns")
class HalfColumns(LayerwiseSolver):
    description = "keeps the first half of every group of four inputs"

    def prune(self, layer):
        mask = (torch.arange(layer.weight.shape[1]) % 4 < 2).expand_as(layer.weight).clone()
        return LayerResult(layer.weight * mask, mask)


@register_solver("keep-all")
class KeepAll(LayerwiseSolver):
    description = "keeps every weight"

    def prune(self, layer):
        return LayerResult(layer.weight.clone(), torch.ones_like(layer.weight, dtype=torch.bool))

"""
    + TWO_RESIDUAL_BLOCKS
    + """


problem = LayerwiseProblem(
    name="tiny-custom",
    description="two residual blocks, a solver of the file's own",
    model=lambda options: Net().eval(),
    calibration=lambda options, seed: [{"x": torch.randn(16, 8)} for _ in range(2)],
)
"""
)


def test_a_solver_registered_in_a_problem_file_runs_from_the_cli(registry, tmp_path, capsys):
    path = tmp_path / "tiny_custom.py"
    path.write_text(textwrap.dedent(PROBLEM_FILE))
    out = tmp_path / "run"
    common = ["--pattern", "2:4", "--wandb", "disabled", "--no-progress"]
    assert main(["run", str(path), "--formulation", "half-columns", "--out", str(out), *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["formulation"] == "half-columns" and summary["achieved_sparsity"] == 0.5
    capsys.readouterr()
    bad = tmp_path / "bad"
    line = fails_with_one_line(["run", str(path), "--formulation", "keep-all", "--out", str(bad), *common], capsys)
    assert line == (
        "error: layer-wise solver 'keep-all' on blocks.0.0.weight: the mask is outside the layer's pattern 2:4 "
        "(NMSparse(2:4))"
    )
    assert not bad.exists()  # nothing half-written
