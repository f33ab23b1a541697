"""hf-causal-lm: any local transformers causal LM directory (``--set model=PATH``), pruned layer by layer.

Text: CPython's reference documentation (``pydoc_data.topics``) or ``--set text=FILE``; the first
90 % of its tokens is the calibration pool (``calibration_samples`` windows of ``seq_len`` tokens at
seeded random offsets), the last 10 % the held-out set (consecutive windows). Metric: perplexity of
the pruned model on the held-out windows, next to the dense model's. The model directory must hold
its tokenizer (``tokenizer.save_pretrained(PATH)``).
"""

import functools
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
from constrainedsparse.data import load_text
from constrainedsparse.extras import require
from constrainedsparse.progress import transformers_quiet
from constrainedsparse.spec import LayerwiseProblem

OPTIONS = {"model": "", "calibration_samples": 32, "held_out_samples": 16, "seq_len": 128, "text": ""}
BATCH = 8
HELD_OUT_FRACTION = 0.1


def _directory(options):
    path = options["model"]
    if not path:
        raise ValueError("hf-causal-lm needs --set model=PATH (a local directory holding a transformers causal LM)")
    directory = Path(path)
    if directory.is_file() and directory.suffix == ".gguf":
        raise ValueError(
            f"--set model={path!r} is a GGUF file, not a transformers model directory: run smollm2-wiki "
            f"--set gguf={path} (it converts a GGUF causal LM)"
        )
    if not directory.is_dir():
        raise ValueError(
            f"--set model={path!r}: " + ("not a directory" if directory.exists() else "the directory does not exist")
        )
    if not (directory / "config.json").is_file():
        raise ValueError(f"--set model={path!r} is not a transformers model directory (no config.json)")
    return directory


def model(options):
    directory = _directory(options)
    require("transformers", "problem 'hf-causal-lm'", "llm")
    from transformers import AutoModelForCausalLM

    load_tokenizer(directory)  # a folder without its tokenizer fails here, before the model is loaded
    try:
        with transformers_quiet():  # its load report: the missing weights are checked below
            loaded, info = AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"--set model={options['model']!r} is not a loadable causal LM: {message}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:  # e.g. an encoder (BERT) loaded with a language-model head that the checkpoint lacks
        raise ValueError(
            f"--set model={options['model']!r} is not a causal LM checkpoint: {len(missing)} weights of "
            f"{type(loaded).__name__} are not in it ({', '.join(missing[:2])}, ...) and would be random"
        )
    check_context(loaded, options["seq_len"])
    return loaded.float().eval()


def _tokens(options):
    for key in ("calibration_samples", "held_out_samples", "seq_len"):
        if options[key] < 1:
            raise ValueError(f"--set {key} must be >= 1, got {options[key]}")
    check_seq_len(options["seq_len"])
    ids = _encoded(str(_directory(options)), options["text"])
    split = int(len(ids) * (1 - HELD_OUT_FRACTION))
    seq_len = options["seq_len"]
    if split < seq_len or len(ids) - split < seq_len:
        raise ValueError(
            f"the text has {len(ids)} tokens: too short for one calibration and one held-out sequence of "
            f"seq_len={seq_len} (the last {HELD_OUT_FRACTION:.0%} is held out)"
        )
    return ids[:split], ids[split:]


@functools.lru_cache(maxsize=4)
def _encoded(directory, text):
    """The text's token ids, tokenised once per (model directory, text) for calibration and both evaluations."""
    return encode(load_tokenizer(directory), load_text(text))


def calibration(options, seed):
    pool, _ = _tokens(options)
    windows = random_windows(pool, options["calibration_samples"], options["seq_len"], seed)
    return calibration_batches(windows, BATCH)


def held_out(model, options):
    """``[[summed next-token NLL, token count], ...]`` per held-out window."""
    _, ids = _tokens(options)
    seq_len = options["seq_len"]
    return window_nll(model, consecutive_windows(ids, seq_len, options["held_out_samples"] * seq_len), BATCH)


problem = LayerwiseProblem(
    name="hf-causal-lm",
    description="a local transformers causal LM (--set model=PATH), pydoc text; layer error + perplexity",
    model=model,
    calibration=calibration,
    held_out=held_out,
    score=perplexity_scores,
    options=OPTIONS,
    option_help={
        "model": "required: a local folder holding a transformers causal LM and its tokenizer",
        "calibration_samples": "an integer >= 1: windows of `seq_len` tokens at seeded offsets in the first 90 % of "
        "the text",
        "held_out_samples": "an integer >= 1: consecutive held-out windows from the last 10 % (perplexity)",
        "seq_len": "an integer >= 2: tokens per window",
        "text": "a UTF-8 text file to use instead of CPython's pydoc topics (empty: pydoc)",
    },
)
