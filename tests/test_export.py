"""Deployable export: compressed-tensors sparse bitmask folders reload bit-identical and meet the size goals;
2:4 Linear layers convert to semi-structured sparse tensors where CUDA exists."""

import copy
import json
import re
import shutil
import sys

import pytest
import torch
from cli_helpers import fails_with_one_line
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from constrainedsparse import SparsityConfig, Targets, apply_masks
from constrainedsparse.cli import main
from constrainedsparse.export import (
    REPORT_FILE,
    export_compressed,
    is_two_four,
    load_compressed,
    load_compressed_model,
    to_semi_structured,
)
from constrainedsparse.export import main as export_main
from constrainedsparse.sets import NMSparse, RowTopK

CONFIG = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _half_per_row(weight):
    return RowTopK(weight.shape[1] // 2).mask(weight)


def _two_four(weight):
    return NMSparse(2, 4).mask(weight)


def _pruned_run(run_dir, mask, pattern=None):
    """A layer-wise run directory as the runner leaves it: ``model/`` (zeros where pruned) and ``summary.json``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).eval()
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.masked_fill_(~mask(module.weight), 0.0)
                names.append(f"{name}.weight")
    model.save_pretrained(run_dir / "model")
    summary = {"layer_sparsity": {n: 0.5 for n in names}, "achieved_sparsity": 0.5}
    (run_dir / "summary.json").write_text(json.dumps(summary | ({"pattern": pattern} if pattern else {})))
    return model, sorted(names)


def _assert_bit_identical(dense, reloaded):
    assert dense.keys() == reloaded.keys()
    for key, value in dense.items():
        assert reloaded[key].dtype == value.dtype == torch.float32, key
        assert torch.equal(reloaded[key].view(torch.int32), value.view(torch.int32)), key


@pytest.mark.parametrize(
    ("mask", "pattern", "fmt"),
    [(_two_four, "2:4", "sparse-24-bitmask"), (_half_per_row, None, "sparse-bitmask")],
    ids=["2:4", "unstructured"],
)
def test_export_reloads_bit_identical_and_meets_the_size_goals(tmp_path, mask, pattern, fmt):
    model, names = _pruned_run(tmp_path, mask, pattern)
    report = export_compressed(tmp_path)
    folder = tmp_path / "compressed"
    assert report["format"] == fmt and report["folder"] == str(folder) and sorted(report["layers"]) == names
    assert json.loads((folder / REPORT_FILE).read_text()) == report
    assert 0.5 < report["pruned_ratio"] <= 0.6 and report["safetensors_ratio"] < report["folder_ratio"] <= 0.7
    assert all(layer["ratio"] <= 0.6 for layer in report["layers"].values())
    _assert_bit_identical(load_file(tmp_path / "model" / "model.safetensors"), load_compressed(folder))
    stored = load_file(folder / "model.safetensors")
    assert not any(name in stored for name in names) and f"{names[0].removesuffix('.weight')}.bitmask" in stored
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["sparsity_config"]["format"] == fmt
    assert config["sparsity_config"]["targets"] == [n.removesuffix(".weight") for n in names]
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(load_compressed_model(folder)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_2_4_bitmask_tops_a_group_up_with_its_first_zeros():
    """torch.topk's order among the zeros of a group is unspecified: the bytes of the export could differ between
    machines; the 2:4 set's own rule (lower index first) fixes them."""
    from constrainedsparse.bitmask import two_four_bytemask

    weight = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -2.0, 0.0]])
    expected = [[True, True, False, False, True, True, False, False, True, False, True, False]]
    assert torch.equal(two_four_bytemask(weight), torch.tensor(expected))


@pytest.mark.parametrize(
    ("mask", "fmt"), [(_two_four, "sparse-24-bitmask"), (_half_per_row, "sparse-bitmask")], ids=["2:4", "unstructured"]
)
def test_a_model_in_memory_or_a_saved_model_folder_exports_its_pruned_weights(tmp_path, mask, fmt):
    """A model fine-tuned after one-shot pruning has no run directory: the model, or its save_pretrained folder,
    exports itself; the pruned weights are found by their zeros (the embeddings and lm_head stay dense)."""
    model, names = _pruned_run(tmp_path / "run", mask)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, :3] = 0.0  # a few zeros: too few to gain from a bitmask, kept dense
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    saved = tmp_path / "saved"
    model.save_pretrained(saved)  # a Trainer's output_dir: checkpoints and training state beside the model
    (saved / "checkpoint-4").mkdir()
    (saved / "checkpoint-4" / "optimizer.pt").write_bytes(b"0" * 4096)
    (saved / "training_args.bin").write_bytes(b"0")
    (saved / "tokenizer_config.json").write_text("{}")
    loaded = AutoModelForCausalLM.from_pretrained(saved)  # from a folder (its tokenizer files come along)
    sources = [(model, tmp_path / "from_model"), (saved, tmp_path / "from_folder"), (loaded, tmp_path / "loaded")]
    for source, to in sources:
        report = export_compressed(source, to)
        files = {p.name for p in to.iterdir()}
        assert {"config.json", "model.safetensors", REPORT_FILE} <= files and "training_args.bin" not in files
        assert ("tokenizer_config.json" in files) == (source is not model) and "checkpoint-4" not in files
        assert report["format"] == fmt and sorted(report["layers"]) == names and report["folder"] == str(to)
        assert report["pattern"] == ("2:4" if fmt == "sparse-24-bitmask" else "unstructured")
        sparsity = json.loads((to / "config.json").read_text())["quantization_config"]["sparsity_config"]
        assert sparsity["global_sparsity"] == pytest.approx(0.5)
        with torch.no_grad():
            assert torch.equal(load_compressed_model(to)(input_ids=ids).logits, logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_folder", "from_model", "loaded", "run", "saved"]
    assert main(["export", str(tmp_path / "saved"), "--to", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / REPORT_FILE).read_text())["format"] == fmt


def test_a_model_folder_or_model_that_cannot_be_exported_is_one_line(tmp_path, capsys):
    model, names = _pruned_run(tmp_path / "run", _two_four)
    model.save_pretrained(tmp_path / "saved")
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))
    dense.save_pretrained(tmp_path / "dense")
    masked = copy.deepcopy(model)
    targets = Targets(include=["model.layers.0.mlp.up_proj.weight"]).resolve(masked, SparsityConfig(pattern="2:4"))
    apply_masks(targets, {t.name: t.tensor != 0 for t in targets})  # a masked fine-tune, its masks not removed
    for source, to, message in [
        (tmp_path / "saved", None, r"a model folder \('.*saved'\) has no default destination: give to \(--to DIR "),
        (model, None, r"a model in memory has no default destination: give to"),
        (tmp_path / "saved", tmp_path / "saved" / "out", r"--to '.*out' would replace the model folder's own files"),
        (tmp_path / "dense", tmp_path / "out", r"'.*dense' holds no pruned weight \(no 2-D weight with zeros "),
        (masked, tmp_path / "out", r"the model still carries masks or gates \(parametrizations\): remove_masks"),
        (torch.nn.Linear(4, 4), tmp_path / "out", r"export takes a transformers model \(with save_pretrained\), got "),
        (None, tmp_path / "out", r"export takes a run directory or model folder \(str or Path\) or a transformers "),
    ]:
        with pytest.raises(ValueError, match=f"^{message}"):
            export_compressed(source, to)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))  # nothing written, no scratch
    capsys.readouterr()
    assert export_main([str(tmp_path / "saved")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: a model folder ({str(tmp_path / 'saved')!r}) has no default destination: give to (--to DIR on "
        "the command line)"
    ]


def test_a_bfloat16_model_reloads_in_bfloat16(tmp_path):
    model, _ = _pruned_run(tmp_path, _two_four)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    export_compressed(tmp_path)
    reloaded = load_compressed_model(tmp_path / "compressed")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # what a user loads from model/
    assert {p.dtype for p in reloaded.parameters()} == {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, saved(input_ids=ids).logits)


def test_cli_export_of_a_real_layerwise_run(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "hf-causal-lm", "--set", f"model={tiny_llama}", "--set", f"text={text_file}",
                 "--set", "seq_len=16", "--set", "calibration_samples=4", "--set", "held_out_samples=2",
                 "--formulation", "magnitude", "--pattern", "2:4", "--out", str(out), "--wandb", "disabled",
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert export_main([str(out), "--format", "compressed", "--to", str(tmp_path / "deploy")]) == 0
    printed = capsys.readouterr().out
    assert "sparse-24-bitmask" in printed and f"wrote {tmp_path / 'deploy'}/" in printed
    report = json.loads((tmp_path / "deploy" / REPORT_FILE).read_text())
    assert len(report["layers"]) == 14 and report["pruned_ratio"] < 0.54
    _assert_bit_identical(load_file(out / "model" / "model.safetensors"), load_compressed(tmp_path / "deploy"))
    assert not (out / "compressed").exists()


def _bad_runs(tmp_path):
    training = tmp_path / "training"
    training.mkdir()
    (training / "summary.json").write_text(json.dumps({"dense_accuracy": 0.9}))
    (training / "model.safetensors").write_bytes(b"")
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "summary.json").write_text(json.dumps({"layer_sparsity": {}}))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    no_epochs = tmp_path / "no_epochs"  # a training run of --epochs 0: its summary has layer_sparsity too
    no_epochs.mkdir()
    (no_epochs / "summary.json").write_text(json.dumps({"layer_sparsity": {"0.weight": 0.5}, "epochs": 0}))
    (no_epochs / "model.safetensors").write_bytes(b"")
    null = tmp_path / "null"
    null.mkdir()
    (null / "summary.json").write_text(json.dumps({"layer_sparsity": None}))
    return [
        (tmp_path / "missing", r"run directory '.*missing' does not exist"),
        (unfinished, r"'.*unfinished' has no summary.json: export needs a finished layer-wise run"),
        (training, r"'.*training' is not a layer-wise run \(export takes fw/wanda/sparsegpt/admm/magnitude runs\)"),
        (unsaved, r"'.*unsaved' has no saved model/ folder"),
        (no_epochs, r"'.*no_epochs' is a training run \(its model is model\.safetensors\): export takes"),
        (null, r"'.*null' is not a layer-wise run"),
        (tmp_path / ("a" * 300), r"export source '.*a{300}' cannot be used: File name too long$"),
    ]


def test_bad_runs_are_one_line_and_write_nothing(tmp_path, capsys):
    for run_dir, message in _bad_runs(tmp_path):
        with pytest.raises(ValueError, match=f"^{message}"):
            export_compressed(run_dir)
        assert export_main([str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        assert len(run_dir.name) > 255 or not (run_dir / "compressed").exists()  # a name too long cannot exist
    with pytest.raises(ValueError, match=r"holds no compressed-tensors sparse-bitmask model"):
        _pruned_run(tmp_path / "unsaved", _two_four)
        load_compressed(tmp_path / "unsaved" / "model")
    capsys.readouterr()  # transformers' save progress
    line = fails_with_one_line(["run", "hf-causal-lm", "--formulation", "wanda", "--out", str(tmp_path / "x")], capsys)
    assert "needs --set model=PATH" in line


def test_without_the_llm_extra_the_export_and_the_llm_problems_name_it(tmp_path, capsys, monkeypatch):
    """The base install lacks compressed-tensors and transformers: one line naming the extra, nothing written."""
    _pruned_run(tmp_path / "run", _two_four, "2:4")
    exported = export_compressed(tmp_path / "run", tmp_path / "exported")["folder"]  # with the extra
    capsys.readouterr()  # transformers' save progress
    for module in ("compressed_tensors", "transformers"):
        monkeypatch.setitem(sys.modules, module, None)  # what find_spec reports for a missing package
    extra = 'which is not installed: pip install "constrainedsparse\\[llm\\]"$'
    line = fails_with_one_line(["export", str(tmp_path / "run")], capsys)
    assert re.match(f"^error: the compressed export needs compressed_tensors, {extra}", line), line
    assert not (tmp_path / "run" / "compressed").exists()
    with pytest.raises(ValueError, match=f"^loading a compressed export needs compressed_tensors, {extra}"):
        load_compressed(exported)
    with pytest.raises(ValueError, match=f"^loading a compressed export needs transformers, {extra}"):
        load_compressed_model(exported)  # README's "load with"
    for name in ("minilm-layerwise", "hf-causal-lm"):
        folder = [] if name == "minilm-layerwise" else ["--set", f"model={tmp_path / 'run' / 'model'}"]
        line = fails_with_one_line(["run", name, "--formulation", "wanda", *folder, "--out", str(tmp_path / name),
                                    "--wandb", "disabled", "--no-progress"], capsys)  # fmt: skip
        assert re.match(f"^error: problem '{name}' needs transformers, {extra}", line), line
        assert not (tmp_path / name).exists()


def _two_four_linear(features, out_features):
    layer = torch.nn.Linear(features, out_features)
    with torch.no_grad():
        layer.weight.masked_fill_(~NMSparse(2, 4).mask(layer.weight), 0.0)
    return layer


def test_semi_structured_refusals_are_one_line():
    layer, dense = _two_four_linear(64, 32), torch.nn.Linear(64, 32)
    assert is_two_four(layer.weight) and not is_two_four(dense.weight) and not is_two_four(torch.zeros(4, 6))
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), dense)
    with pytest.raises(ValueError, match=r"^to_semi_structured needs float16 or bfloat16 weights on a CUDA device, "
                                         r"'0' is torch.float32 on cpu$"):  # fmt: skip
        to_semi_structured(model)
    with pytest.raises(ValueError, match=r"^to_semi_structured: '2' is not 2:4 sparse \(N:M 2:4 along the input"):
        to_semi_structured(model, ["2"])
    with pytest.raises(ValueError, match=r"^to_semi_structured: '1' is not an nn.Linear of the model$"):
        to_semi_structured(model, ["1"])
    with pytest.raises(ValueError, match=r"^to_semi_structured: no nn.Linear of the model is 2:4 sparse"):
        to_semi_structured(torch.nn.Sequential(dense))
    assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.layout == torch.strided  # nothing converted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparsity needs CUDA")
def test_semi_structured_two_four_linear_matches_dense_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_two_four_linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).half().cuda()
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match=r"^to_semi_structured: '2' is not 2:4 sparse"):
        to_semi_structured(model, ["2"])
    assert to_semi_structured(model) == ["0"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"needs float16 or bfloat16 weights on a CUDA device, '0' is torch.float32"):
        to_semi_structured(torch.nn.Sequential(_two_four_linear(64, 64)).cuda())


def test_destinations_that_an_export_would_destroy_are_refused(tmp_path, capsys):
    _pruned_run(tmp_path / "run", _two_four, "2:4")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    refused = [
        (tmp_path / "run", r"would replace the run's own files"),
        (tmp_path, r"would replace the run's own files"),
        (tmp_path / "run" / "model", r"would replace the run's own files"),
        (tmp_path / "run" / "compressed" / "inner", r"would replace the run's own files"),  # a default export's
        (tmp_path / "notes", r"holds files that are not an earlier export \(no compression\.json\)"),
        (tmp_path / "file.txt", r"is a file: give a folder"),
    ]
    for to, message in refused:
        with pytest.raises(ValueError, match=f"^--to '.*' {message}"):
            export_compressed(tmp_path / "run", to)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (tmp_path / "file.txt").is_file()
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()
    export_compressed(tmp_path / "run", tmp_path / "deploy")
    assert export_compressed(tmp_path / "run", tmp_path / "deploy")["format"] == "sparse-24-bitmask"  # again: replaced


def test_a_two_four_run_of_prune_layerwise_exports_as_two_four(tiny_llama, tmp_path):
    from constrainedsparse import prune_layerwise

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    batches = [
        {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    prune_layerwise(model, batches, "wanda", pattern="2:4", out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pattern"] == "2:4"
    assert export_compressed(tmp_path / "run")["format"] == "sparse-24-bitmask"


def test_a_24_run_with_groups_along_dim_0_exports_as_bitmask_and_says_why(tmp_path):
    """GPT-2's Conv1D stores inputs x outputs: its 2:4 groups run along dim 0, which sparse-24-bitmask cannot hold."""
    _pruned_run(tmp_path / "run", lambda w: _two_four(w.t()).t(), "2:4")
    report = export_compressed(tmp_path / "run")
    assert report["format"] == "sparse-bitmask"
    assert "store the groups of 4 along dim 0 (a Conv1D's inputs x outputs)" in report["format_note"]
    assert report["pattern"] == "2:4"  # the run's, as the config's sparsity_structure (2:4 or unstructured) cannot say


def test_damaged_runs_and_exports_are_one_precise_error(tmp_path, capsys):
    _pruned_run(tmp_path / "run", _two_four, "2:4")
    folder = tmp_path / "exported"
    export_compressed(tmp_path / "run", folder)
    capsys.readouterr()
    damaged = tmp_path / "damaged"  # the run's weights cut short
    shutil.copytree(tmp_path / "run", damaged)
    weights = damaged / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"^'.*model\.safetensors' cannot be read as safetensors weights: "):
        export_compressed(damaged)
    (tmp_path / "run" / "compressed").write_text("mine")
    with pytest.raises(ValueError, match=r"^the default destination '.*compressed' \(give --to\) is a file"):
        export_compressed(tmp_path / "run")
    with pytest.raises(ValueError, match=r"^export takes a run directory or model folder .* got NoneType$"):
        export_compressed(None)
    config = json.loads((folder / "config.json").read_text())
    for broken, message in [
        ({**config, "quantization_config": None}, r"holds no compressed-tensors sparse-bitmask model"),
        ([], r"holds no compressed-tensors sparse-bitmask model"),
    ]:
        (folder / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            load_compressed(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"^'.*config\.json' is not a transformers model's config \(not JSON: "):
        load_compressed(folder)
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "model.safetensors")
    key = next(k for k in state if k.endswith(".shape"))
    save_file({k: v for k, v in state.items() if k != key}, folder / "model.safetensors")
    prefix = key.removesuffix(".shape")
    with pytest.raises(ValueError, match=rf"^'.*': {re.escape(prefix)}\.compressed has no {re.escape(key)} to "):
        load_compressed(folder)
    save_file({**state, "extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not match its config: missing \[\], unexpected \['extra\.weight'\]$"):
        load_compressed_model(folder)
    with pytest.raises(ValueError, match=r"^to_semi_structured: names must be a list of module names, got 'ab'$"):
        to_semi_structured(torch.nn.Sequential(_two_four_linear(8, 8)), "ab")
