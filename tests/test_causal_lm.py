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
    perplexity_scores,
    random_windows,
    rows_perplexity,
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
    assert rows_perplexity(rows) == pytest.approx(math.exp(float(mean)), rel=1e-5)
    scores = perplexity_scores(rows, rows[:1])
    assert scores == {"dense_perplexity": rows_perplexity(rows), "perplexity": rows_perplexity(rows[:1])}


def test_the_public_perplexity_is_transformers_own_loss_over_consecutive_windows_in_eval_mode(tiny_llama):
    from constrainedsparse import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attention_dropout=0.5)  # train mode would drop out
    tokenizer = load_tokenizer(tiny_llama)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids  # (1, n)
    model.train()
    value = perplexity(model, ids, seq_len=16, batch_size=3)
    assert model.training  # every module back in its own mode
    windows = ids[0, : ids.shape[1] // 16 * 16].view(-1, 16)  # consecutive, the partial last window left out
    with torch.no_grad():
        mean = model.eval()(input_ids=windows, labels=windows).loss  # transformers' own shifted mean cross-entropy
    assert value == pytest.approx(math.exp(float(mean)), rel=1e-5)
    assert perplexity(model, ids[0].tolist(), seq_len=16) == pytest.approx(value, rel=1e-6)  # a list of ints
    first = perplexity(model, ids[0], seq_len=16, max_tokens=32)  # the first two windows only
    with torch.no_grad():
        two = model(input_ids=windows[:2], labels=windows[:2]).loss
    assert first == pytest.approx(math.exp(float(two)), rel=1e-5)


@pytest.mark.parametrize(
    ("args", "keywords", "message"),
    [
        ((None, [1, 2, 3]), {}, r"^perplexity: model must be an nn.Module \(a causal LM\), got NoneType$"),
        (("ids-dict",), {}, r"^perplexity: token_ids is a tokenizer's output \(a dict\): pass its input_ids$"),
        ((torch.rand(40),), {}, r"^perplexity: token_ids must hold integers \(token ids\), got torch.float32$"),
        (
            (torch.zeros(2, 20, dtype=torch.long),),
            {},
            r"one stream of tokens \(1-D, or \(1, n\)\), got shape \(2, 20\)$",
        ),
        (("abc",), {}, r"^perplexity: token_ids must be a tensor or a list of token ids, got str$"),
        ((list(range(40)),), {"seq_len": 1}, r"^perplexity: seq_len must be an integer >= 2, got 1$"),
        ((list(range(40)),), {"batch_size": 0}, r"^perplexity: batch_size must be an integer >= 1, got 0$"),
        ((list(range(40)),), {"max_tokens": 2.5}, r"^perplexity: max_tokens must be an integer >= 2, got 2.5$"),
        ((list(range(40)),), {"seq_len": 4096}, r"^seq_len=4096 is above the model's context of \d+ tokens$"),
        (
            (list(range(10)),),
            {"seq_len": 16},
            r"^the evaluation text gives 10 tokens, fewer than one window of seq_len=16$",
        ),
        (
            (list(range(40)),),
            {"seq_len": 16, "max_tokens": 10},
            r"^the evaluation text gives 10 tokens \(max_tokens=10 of its 40\), fewer than one window of seq_len=16$",
        ),
    ],
)
def test_the_public_perplexity_refuses_what_it_cannot_score(tiny_llama, args, keywords, message):
    from constrainedsparse import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if args[0] is not None:
        args = (model, {"input_ids": torch.ones(1, 40, dtype=torch.long)} if args[0] == "ids-dict" else args[0])
    with pytest.raises(ValueError, match=message):
        perplexity(*args, **keywords)
