"""2:4 semi-structured sparsity on a GPU: a 2:4 Linear against dense, and a pruned run's model.

Needs CUDA (an Ampere or newer GPU); ``benchmarks/gpu_check.sh`` runs it. Two parts:

1. ``--features/--out-features/--tokens``: one ``nn.Linear`` pruned 2:4 (magnitude), timed dense and
   after :func:`constrainedsparse.export.to_semi_structured` (CUDA events, median of ``--repeats``);
   the outputs must agree to fp16/bf16 tolerance.
2. ``--run RUN_DIR`` (a 2:4 ``smollm2-wiki`` run): the saved model in ``--dtype`` on CUDA, held-out
   perplexity and forward time before and after converting its 2:4 layers.

Prints a markdown table; with ``--out DIR`` also writes ``results.md`` / ``results.json``. Exits 1 when the
semi-structured outputs disagree with the dense ones beyond :data:`LINEAR_TOLERANCE` /
:data:`PERPLEXITY_TOLERANCE` (the figures are still printed and written).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, out_folder, write_results  # noqa: E402

from constrainedsparse.export import to_semi_structured  # noqa: E402
from constrainedsparse.sets import NMSparse  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# The most the 2:4 kernels may differ from the dense product (max error over max output: a few of the half
# type's rounding steps, fp32 accumulation on both sides) and the held-out perplexity may move.
LINEAR_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}
PERPLEXITY_TOLERANCE = 0.01


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def linear_timing(features: int, out_features: int, tokens: int, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """Dense vs semi-structured ``nn.Linear(features, out_features)`` on ``tokens`` rows."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(features, out_features, bias=False)
    layer.weight.masked_fill_(~NMSparse(2, 4).mask(layer.weight), 0.0)
    model = torch.nn.Sequential(layer).to("cuda", dtype)
    x = torch.randn(tokens, features, device="cuda", dtype=dtype)
    expected = model(x)
    dense_ms = _median_ms(lambda: model(x), repeats)
    to_semi_structured(model)
    error = float((model(x) - expected).abs().max() / expected.abs().max())
    sparse_ms = _median_ms(lambda: model(x), repeats)
    return {"shape": f"{out_features}x{features}, {tokens} tokens", "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "max_relative_error": error}  # fmt: skip


@torch.no_grad()
def model_check(run_dir: Path, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """Perplexity and forward time of a 2:4 smollm2-wiki run's saved model, dense vs semi-structured."""
    import json

    from transformers import AutoModelForCausalLM

    from constrainedsparse.causal_lm import rows_perplexity
    from constrainedsparse.spec import load_problem

    summary = json.loads((run_dir / "summary.json").read_text())
    problem = load_problem(summary["problem"])
    options = {**problem.options, **{k: type(problem.options[k])(v) for k, v in summary["settings"].items()
                                     if k in problem.options}}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=dtype).to("cuda").eval()
    ids = torch.randint(0, model.config.vocab_size, (8, options["seq_len"]), device="cuda")
    before = rows_perplexity(problem.held_out(model, options))
    dense_ms = _median_ms(lambda: model(input_ids=ids), repeats)
    converted = to_semi_structured(model, [name.removesuffix(".weight") for name in summary["layer_sparsity"]])
    after = rows_perplexity(problem.held_out(model, options))
    sparse_ms = _median_ms(lambda: model(input_ids=ids), repeats)
    return {"run": str(run_dir), "layers": len(converted), "perplexity_dense_format": before,
            "perplexity_semi_structured": after, "dense_ms": dense_ms, "sparse_ms": sparse_ms}  # fmt: skip


def disagreements(linear: dict[str, Any], model: dict[str, Any] | None, dtype: str) -> list[str]:
    """Where the semi-structured result is not the dense one's within tolerance (empty: the check passes).

    Args:
        linear: :func:`linear_timing`'s result.
        model: :func:`model_check`'s result, or ``None``.
        dtype: The ``--dtype`` name (its :data:`LINEAR_TOLERANCE`).
    """
    found = []
    limit = LINEAR_TOLERANCE[dtype]
    if not linear["max_relative_error"] <= limit:  # a NaN fails too
        found.append(f"the 2:4 Linear's max relative error {linear['max_relative_error']:.2e} is over {limit:g}")
    if model is not None:
        before, after = model["perplexity_dense_format"], model["perplexity_semi_structured"]
        if not abs(after - before) <= PERPLEXITY_TOLERANCE * before:
            found.append(
                f"the converted model's perplexity {after:.3f} is not within {PERPLEXITY_TOLERANCE:.0%} of the "
                f"dense format's {before:.3f}"
            )
    return found


def _markdown(argv: list[str] | None, linear: dict[str, Any], model: dict[str, Any] | None, dtype: str) -> str:
    lines = [f"`{command_line('benchmarks/semi_structured.py', argv)}` ({torch.cuda.get_device_name()}, {dtype})", "",
             "| what | dense ms | 2:4 semi-structured ms | speedup | check |", "|---|---|---|---|---|",
             f"| Linear {linear['shape']} | {linear['dense_ms']:.3f} | {linear['sparse_ms']:.3f} | "
             f"{linear['speedup']:.2f}x | max rel. error {linear['max_relative_error']:.1e} |"]  # fmt: skip
    if model is not None:
        lines.append(
            f"| model of {model['run']} ({model['layers']} layers), 8 windows | {model['dense_ms']:.2f} | "
            f"{model['sparse_ms']:.2f} | {model['dense_ms'] / model['sparse_ms']:.2f}x | perplexity "
            f"{model['perplexity_dense_format']:.3f} -> {model['perplexity_semi_structured']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--run", type=Path, help="a 2:4 layer-wise run directory to convert and score")
    parser.add_argument("--out", type=out_folder)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: semi-structured sparsity needs CUDA; no GPU here", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    linear = linear_timing(args.features, args.out_features, args.tokens, dtype, args.repeats)
    model = model_check(args.run, dtype, args.repeats) if args.run else None
    markdown = _markdown(argv, linear, model, args.dtype)
    print(markdown)
    found = disagreements(linear, model, args.dtype)
    if args.out:
        payload = {"linear": linear, "model": model, "dtype": args.dtype, "disagreements": found}
        write_results(args.out, markdown, payload)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
