"""Prints the `--set` key tables of docs/cli.md from the code (run from the repository root).

    python docs/examples/set_keys.py > /tmp/set_keys.md

Formulations and layer-wise solvers: `constrainedsparse.describe(name)` (their Config classes).
Runners: the `TrainingSettings` and `DriverSettings` Config classes. Bundled problems: key, type
and default from each problem's `options`; problems declare no help text, so the meanings are the
lines in `PROBLEM_OPTIONS` below, and the script stops if a problem's keys and those lines differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not an installed one

from constrainedsparse import describe  # noqa: E402
from constrainedsparse.config import Bounds, HyperparameterInfo, OneOf  # noqa: E402
from constrainedsparse.engine import TrainingSettings  # noqa: E402
from constrainedsparse.formulations import available_formulations  # noqa: E402
from constrainedsparse.layerwise import available_solvers  # noqa: E402
from constrainedsparse.layerwise.settings import DriverSettings  # noqa: E402
from constrainedsparse.spec import LayerwiseProblem, bundled_problems, load_problem  # noqa: E402
from constrainedsparse.text import TEXT_SOURCES  # noqa: E402

PROBLEM_OPTIONS = {
    "cifar10-resnet18": {
        "data_dir": "required: the `cifar-10-batches-py` folder (or the folder holding it); nothing is downloaded",
        "train_subset": "keep only the first N training images (0: all)",
        "test_subset": "keep only the first N test images (0: all)",
    },
    "mnist1d-mlp-macs": {
        "macs_fraction": "the user constraint: expected MACs <= this fraction of the dense MACs",
    },
    "minilm-layerwise": {
        "calibration_samples": "calibration paragraphs, drawn with `--seed` from the calibration pool",
        "held_out_samples": "held-out paragraphs the fidelity is measured on",
        "max_tokens": "paragraphs are truncated to this many tokens",
        "text": "a UTF-8 text file to use instead of CPython's pydoc topics (empty: pydoc)",
    },
    "hf-causal-lm": {
        "model": "required: a local folder holding a transformers causal LM and its tokenizer",
        "calibration_samples": "windows of `seq_len` tokens at seeded offsets in the first 90 % of the text",
        "held_out_samples": "consecutive held-out windows from the last 10 % (perplexity)",
        "seq_len": "tokens per window",
        "text": "a UTF-8 text file to use instead of CPython's pydoc topics (empty: pydoc)",
    },
    "smollm2-wiki": {
        "calibration_samples": "calibration windows, drawn at seeded offsets (`--seed`)",
        "seq_len": "tokens per calibration and evaluation window",
        "eval_tokens": "held-out tokens scored: the first eval_tokens // seq_len consecutive windows (>= seq_len)",
        "calibration_text": "calibration text: wiki (the 70 calibration articles), news or pydoc",
        "gguf": "another GGUF causal LM instead of SmolLM2 (empty: SmolLM2-135M-Instruct)",
    },
}

AT_LEAST_ONE = Bounds(low=1, integer=True)
AT_LEAST_TWO = Bounds(low=2, integer=True)  # seq_len: a window predicts its tokens after the first
PROBLEM_RULES = {  # the checks the problem files make (their ValueErrors), for the "allowed" column
    "mnist1d-mlp-macs": {"macs_fraction": Bounds(0, 1, low_inclusive=False)},
    "minilm-layerwise": {k: AT_LEAST_ONE for k in ("calibration_samples", "held_out_samples", "max_tokens")},
    "hf-causal-lm": {**{k: AT_LEAST_ONE for k in ("calibration_samples", "held_out_samples")}, "seq_len": AT_LEAST_TWO},
    "smollm2-wiki": {
        **{k: AT_LEAST_ONE for k in ("calibration_samples", "eval_tokens")},
        "seq_len": AT_LEAST_TWO,
        "calibration_text": OneOf(TEXT_SOURCES),
    },
}


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
        meanings = PROBLEM_OPTIONS.get(name, {})
        if set(meanings) != set(problem.options):
            raise SystemExit(f"{name}: options {sorted(problem.options)} but described {sorted(meanings)}")
        rules = PROBLEM_RULES.get(name, {})
        rows = [HyperparameterInfo(k, type(v), v, meanings[k], rules.get(k)) for k, v in problem.options.items()]
        print(f"#### Problem `{name}` ({kind})\n")
        print(table(rows))


if __name__ == "__main__":
    main()
