"""Prints the `--set` key tables of docs/cli.md from the code (run from the repository root).

    python docs/examples/set_keys.py > /tmp/set_keys.md

Formulations and layer-wise solvers: `constrainedsparse.describe(name)` (their Config classes).
Runners: the `TrainingSettings` and `DriverSettings` Config classes. Bundled problems: key, type
and default from each problem's `options`, the meaning (with what the problem's checks allow) from
its `option_help` (what `--set help` shows); the script stops at an option without one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not an installed one

from constrainedsparse import describe  # noqa: E402
from constrainedsparse.config import HyperparameterInfo  # noqa: E402
from constrainedsparse.engine import TrainingSettings  # noqa: E402
from constrainedsparse.formulations import available_formulations  # noqa: E402
from constrainedsparse.layerwise import available_solvers  # noqa: E402
from constrainedsparse.layerwise.settings import DriverSettings  # noqa: E402
from constrainedsparse.spec import LayerwiseProblem, bundled_problems, load_problem  # noqa: E402


def cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def table(rows: list[HyperparameterInfo]) -> str:
    if not rows:
        return "(no keys)\n"
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.key}` | {r.type_name} | `{r.default!r}` | {cell(r.allowed)} | {cell(r.help)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    print("#### Training runner (`TrainingSettings`)\n")
    print(table(list(TrainingSettings.keys().values())))
    print("#### Layer-wise driver (`DriverSettings`)\n")
    print(table(list(DriverSettings.keys().values())))
    for name in available_formulations():
        entry = describe(name, kind="training")
        print(f"#### Formulation `{name}`\n")
        print(table(list(entry.hyperparameters.values())))
    for name in available_solvers():
        entry = describe(name, kind="layerwise")
        print(f"#### Layer-wise solver `{name}`\n")
        print(table(list(entry.hyperparameters.values())))
    for name in bundled_problems():
        problem = load_problem(name)
        kind = "layer-wise" if isinstance(problem, LayerwiseProblem) else "training"
        undescribed = sorted(set(problem.options) - set(problem.option_help))
        if undescribed:
            raise SystemExit(f"{name}: options {undescribed} have no option_help")
        rows = [HyperparameterInfo(k, type(v), v, problem.option_help[k]) for k, v in problem.options.items()]
        print(f"#### Problem `{name}` ({kind})\n")
        print(table(rows))


if __name__ == "__main__":
    main()
