"""smollm2-wiki: the real SmolLM2-135M-Instruct on held-out Wikipedia articles.

Bad options fail in one line before the model is materialized; one test uses the real model (the
session's ``smollm2_folder``, materialized once): tokenizer, dense perplexity, one pruned block.
"""

import math
import re
import time

import pytest
import torch
from cli_helpers import fails_with_one_line

from constrainedsparse.layerwise import solver_class
from constrainedsparse.layerwise.driver import prune_blocks
from constrainedsparse.models import folder_is_complete, materialize_smollm2
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig


def test_problem_file_declares_its_options():
    problem = load_problem("smollm2-wiki")
    assert problem.name == "smollm2-wiki" and "perplexity" in problem.description
    assert problem.options == {
        "calibration_samples": 32, "seq_len": 256, "eval_tokens": 16384, "calibration_text": "wiki", "gguf": "",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("calibration_text=c4", r"--set calibration_text must be one of wiki, news, pydoc, got 'c4'"),
        ("eval_tokens=100", r"--set eval_tokens must be >= seq_len \(256\), got 100"),
        ("seq_len=0", r"--set seq_len must be >= 1, got 0"),
        ("seq_len=1", r"--set seq_len must be >= 2 \(a window predicts its tokens after the first\), got 1"),
        ("gguf=/no/such/model.gguf", r"--set gguf='/no/such/model.gguf': the GGUF file does not exist"),
        ("gguf=/tmp", r"--set gguf='/tmp' is a directory: give the path of a \.gguf file"),
        (f"gguf={__file__}", r"--set gguf='.*test_smollm2\.py' is not a GGUF file \(it does not start with b'GGUF'\)"),
    ],
)
def test_bad_options_are_one_line_before_the_model_is_built(setting, message, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "smollm2-wiki", "--formulation", "wanda", "--set", setting, "--out", str(out)]
    started = time.perf_counter()
    line = fails_with_one_line(args, capsys)
    assert re.search(message, line), line
    assert not out.exists() and time.perf_counter() - started < 5  # refused before the ~20 s materialization


def test_real_smollm2_perplexity_and_one_pruned_block(smollm2_folder, _dense_cache):
    from transformers import AutoTokenizer

    assert folder_is_complete(smollm2_folder)
    started = time.perf_counter()
    assert materialize_smollm2(_dense_cache) == smollm2_folder and time.perf_counter() - started < 1
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert len(tokenizer) == 49152 and tokenizer("Hello world")["input_ids"] == [19556, 905]
    problem = load_problem("smollm2-wiki")
    options = {**problem.options, "seq_len": 64, "eval_tokens": 256, "calibration_samples": 4}
    model = problem.model(options)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    batches = problem.calibration(options, 0)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([4, 64])]
    dense = problem.held_out(model, options)
    assert dense.shape == (4, 2) and int(dense[:, 1].sum()) == 4 * 63
    blocks = problem.model_blocks(model)
    assert len(blocks) == 30
    model.config.use_cache = False  # what prune_layerwise and the CLI set: the driver's walk refuses a cache
    reports = prune_blocks(model, blocks, batches, solver_class("wanda")(), SparsityConfig.from_pattern("2:4"),
                           problem.targets, stop=1)  # fmt: skip
    # the fraction of zeros: 2:4's half, and a few exact zeros of the dequantized Q4_1 weights themselves
    assert len(reports) == 7 and all(0.5 <= r.sparsity < 0.5001 for r in reports)
    scores = problem.score(dense, problem.held_out(model, options))
    assert 10 < scores["dense_perplexity"] < 100  # a real model: a random-init one scores ~55,000
    assert scores["dense_perplexity"] < scores["perplexity"] < 2 * scores["dense_perplexity"]
    assert scores["evaluated_tokens"] == 4 * 63 and math.isfinite(scores["perplexity"])
