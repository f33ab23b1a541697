"""A bad benchmark argument is one ``error:`` line and exit status 2, found by the parser before any model is
loaded, with nothing written in the output folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

OUT_IN_PROC = ["--out", "/proc/constrainedsparse-no-such-folder/results"]

ROWS = [
    ("overhead", ["--problems", "nope"], r"--problems: unknown problem 'nope'; bundled problems: .*digits-mlp"),
    ("overhead", ["--problems", "hf-causal-lm"], r"'hf-causal-lm' is a layer-wise problem: .* trained"),
    ("overhead", ["--sparsity", "1.5"], r"argument --sparsity: sparsity must be in \[0, 1\), got 1.5"),
    ("overhead", ["--steps", "0"], r"argument --steps: must be an integer >= 1, got '0'"),
    ("projection", ["--sparsity", "1.5"], r"argument --sparsity: sparsity must be in \[0, 1\), got 1.5"),
    ("projection", ["--sparsity", "-0.1"], r"argument --sparsity: sparsity must be in \[0, 1\), got -0.1"),
    ("projection", ["--sparsity", "x"], r"argument --sparsity: must be a number in \[0, 1\), got 'x'"),
    ("projection", ["--device", "nope"], r"^--device must be cpu, cuda, cuda:N or auto, got 'nope'$"),
    ("nm_search", ["--pattern", "5:4"], r"--pattern: pattern must look like N:M with integers 0 < N <= M"),
    ("nm_search", ["--pattern", "abc"], r"--pattern: unknown pattern 'abc'; patterns: unstructured, row, 2:4"),
    ("nm_search", ["--configs", "bogus=1"], r"--configs: setting 'bogus=1' must be KEY=VALUE with KEY one of "),
    ("nm_search", ["--configs", "sweeps=2"], r"--configs: setting 'sweeps=2' must be KEY=VALUE with KEY one of alph"),
    ("nm_search", ["--configs", "tabu_tenure=0"], r"--configs: fw: tabu_tenure must be an integer >= 1, got 0"),
    ("nm_search", ["--layers", "0"], r"argument --layers: must be an integer >= 1, got '0'"),
    ("nm_search", ["--layers", "-2"], r"argument --layers: must be an integer >= 1, got '-2'"),
    ("fw_settings", ["--configs", "bogus=1"], r"--configs: setting 'bogus=1' must be KEY=VALUE with KEY one of "),
    ("fw_settings", ["--configs", "sweeps=2"], r"--configs: setting 'sweeps=2' must be KEY=VALUE with KEY one of "),
    ("fw_settings", ["--problem", "nope"], r"--problem: unknown problem 'nope'; bundled problems: "),
    ("fw_settings", ["--problem", "digits-mlp"], r"--problem 'digits-mlp' is a trained problem: .* layer-wise"),
    ("fw_settings", ["--blocks", "-1"], r"argument --blocks: must be an integer >= 0, got '-1'"),
    ("fw_settings", ["--layers", "0"], r"argument --layers: must be an integer >= 1, got '0'"),
    ("layerwise", ["--set", "bogus"], r"argument --set: expected KEY=VALUE, got 'bogus'"),
    ("causal_lm", ["--problem", "nope"], r"--problem: unknown problem 'nope'; bundled problems: "),
    ("causal_lm", ["--problem", "digits-mlp"], r"--problem 'digits-mlp' is a trained problem"),
    ("causal_lm", ["--set", "bogus"], r"argument --set: expected KEY=VALUE, got 'bogus'"),
    ("ddp_throughput", ["--configs", "0x1"], r"--configs entries must be PxT with integers >= 1 .*got '0x1'"),
    ("ddp_throughput", ["--formulation", "nope"], r"--formulation: .*'nope'.*slr"),
    ("ddp_throughput", ["--batch", "0"], r"argument --batch: must be an integer >= 1, got '0'"),
    ("ddp_throughput", ["--steps", "0"], r"argument --steps: must be an integer >= 1, got '0'"),
    ("ddp_throughput", ["--configs", "2x1", "--batch", "3"], r"batch.*3.*2"),
    ("dense_target", ["--sparsity", "1.5"], r"argument --sparsity: sparsity must be in \[0, 1\), got 1.5"),
    ("dense_target", ["--damp", "-1"], r"argument --damp: must be a number > 0, got '-1'"),
    ("dense_target", ["--damp", "0"], r"argument --damp: must be a number > 0, got '0'"),
    ("sgd_stability", ["--epochs", "0"], r"--epochs must be >= 1"),
    ("l0_control", ["--epochs", "0"], r"argument --epochs: must be an integer >= 1, got '0'"),
    ("mask_only_gap", ["--blocks", "99"], r"--blocks 99: smollm2-wiki has 30 blocks, numbered 0 to 29"),
    ("mask_only_gap", ["--blocks", "-1"], r"argument --blocks: must be an integer >= 0, got '-1'"),
    ("slr_vs_admm", OUT_IN_PROC, r"argument --out: .*: cannot make a folder in /proc \("),
    ("overhead", OUT_IN_PROC, r"argument --out: .*: cannot make a folder in /proc \("),
    ("readme_runs", OUT_IN_PROC, r"argument --out: .*: cannot make a folder in /proc \("),
]


@pytest.mark.parametrize(("script", "argv", "message"), ROWS, ids=[f"{r[0]} {' '.join(r[1])}" for r in ROWS])
def test_a_bad_argument_is_one_error_line_and_exit_2_before_any_work(script, argv, message, tmp_path, capsys):
    if "--out" in argv and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (Linux), where no folder can be made")
    bench = load_benchmark(script)
    out = tmp_path / "out"
    argv = ["--quick", *argv, *([] if "--out" in argv else ["--out", str(out)])]
    entry = getattr(bench, "parse_args", bench.main)  # readme_runs parses in main
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(message, errors[0].split("error: ", 1)[1]), errors[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # no output folder, nor anything else, was made
