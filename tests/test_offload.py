"""Models larger than the device: offload, activations on the CPU, lower-precision weights, peak memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from constrainedsparse import RunConfig, run


def _run(tmp_path, name, tiny_llama, *settings, formulation="sparsegpt"):
    values = {"model": str(tiny_llama), "calibration_samples": "4", "seq_len": "16", "held_out_samples": "2"}
    values.update(dict(s.split("=") for s in settings))
    out = tmp_path / name
    summary = run(RunConfig(problem="hf-causal-lm", formulation=formulation, sparsity=0.5, out=out, progress=False,
                            settings=values))  # fmt: skip
    return summary, load_file(next((out / "model").glob("*.safetensors")))


def test_offload_and_cpu_activations_give_the_same_model(tmp_path, tiny_llama, capfd):
    plain, weights = _run(tmp_path, "plain", tiny_llama)
    for settings in (("offload=true",), ("activations=cpu",), ("offload=true", "activations=cpu")):
        summary, other = _run(tmp_path, "-".join(settings).replace("=", "_"), tiny_llama, *settings)
        assert summary["perplexity"] == plain["perplexity"] and summary["layer_error"] == plain["layer_error"]
        assert all(torch.equal(weights[k], other[k]) for k in weights)
    assert "offload=true with device cpu does nothing" in capfd.readouterr().err
    assert plain["peak_memory"]["cpu_rss_bytes"] > 0


def test_bfloat16_weights_with_float32_grams(tmp_path, tiny_llama):
    summary, weights = _run(tmp_path, "bf16", tiny_llama, "dtype=bfloat16", formulation="wanda")
    pruned = [k for k in weights if k.endswith("q_proj.weight")]
    assert pruned and all(weights[k].dtype == torch.bfloat16 for k in pruned)
    assert summary["achieved_sparsity"] == pytest.approx(0.5)
    assert json.loads(json.dumps(summary["peak_memory"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_to_cuda_matches_the_cpu_run(tmp_path, tiny_llama):
    cpu, _ = _run(tmp_path, "cpu", tiny_llama, formulation="wanda")
    cuda, _ = _run(tmp_path, "cuda", tiny_llama, "device=cuda", "offload=true", formulation="wanda")
    assert cuda["perplexity"] == pytest.approx(cpu["perplexity"], rel=0.02)
    assert cuda["peak_memory"]["cuda_max_allocated_bytes"] > 0
