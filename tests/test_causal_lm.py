"""Causal-LM building blocks: tokenizer refusal, token windows, perplexity from summed NLL."""

import math

import pytest
import torch
from cli_helpers import fails_with_one_line
from transformers import AutoModelForCausalLM

from constrainedsparse.causal_lm import (
    calibration_batches,
    consecutive_windows,
    encode,
    has_tokenizer,
    load_tokenizer,
    perplexity,
    perplexity_scores,
    random_windows,
    window_nll,
)


@pytest.fixture(scope="module")
def no_tokenizer(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-tokenizer")
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def test_a_folder_without_tokenizer_is_refused_in_one_line(tiny_llama, no_tokenizer, tmp_path, capsys):
    assert has_tokenizer(tiny_llama) and not has_tokenizer(no_tokenizer)
    with pytest.raises(ValueError, match=r"^--set model='.*' has no tokenizer \(none of tokenizer.json, "):
        load_tokenizer(no_tokenizer)
    out = tmp_path / "run"
    line = fails_with_one_line(["run", "hf-causal-lm", "--set", f"model={no_tokenizer}", "--out", str(out)], capsys)
    assert "has no tokenizer" in line and "tokenizer.save_pretrained(folder)" in line
    assert not out.exists()


def test_windows_are_seeded_consecutive_and_checked():
    ids = torch.arange(100)
    a, b = random_windows(ids, 5, 10, seed=3), random_windows(ids, 5, 10, seed=3)
    assert torch.equal(a, b) and a.shape == (5, 10) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 9).long())
    assert not torch.equal(a, random_windows(ids, 5, 10, seed=4))
    assert torch.equal(consecutive_windows(ids, 30), ids[:90].view(3, 30))
    assert torch.equal(consecutive_windows(ids, 30, max_tokens=65), ids[:60].view(2, 30))
    with pytest.raises(ValueError, match=r"^the evaluation text gives 20 tokens, fewer than one window of seq_len=30$"):
        consecutive_windows(ids[:20], 30)
    with pytest.raises(ValueError, match=r"^the calibration text has 20 tokens, fewer than one window of seq_len=30$"):
        random_windows(ids[:20], 1, 30, seed=0)
    batches = calibration_batches(a, 2)
    assert [len(x["input_ids"]) for x in batches] == [2, 2, 1] and all(x["attention_mask"].all() for x in batches)


def test_window_nll_is_the_mean_next_token_loss(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    ids = encode(tokenizer, "The quick brown fox jumps over the lazy dog. " * 8)
    assert tokenizer.model_max_length == 512  # encoding long text leaves the tokenizer's limit as it was
    windows = consecutive_windows(ids, 16)
    rows = window_nll(model, windows, batch=3)
    assert rows.shape == (len(windows), 2) and rows.dtype == torch.float64 and (rows[:, 1] == 15).all()
    with torch.no_grad():
        mean = model(input_ids=windows, labels=windows).loss  # transformers' own shifted mean cross-entropy
    assert perplexity(rows) == pytest.approx(math.exp(float(mean)), rel=1e-5)
    scores = perplexity_scores(rows, rows[:1])
    assert scores == {"dense_perplexity": perplexity(rows), "perplexity": perplexity(rows[:1])}
