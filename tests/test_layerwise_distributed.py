"""Layer-wise pruning on 2 processes (gloo on CPU): calibration batches and layers split across ranks.

Tolerance against one process: the Gram matrices are the same sums in another order (each rank sums
its batches, then one all-reduce), so relative layer errors agree to 1e-4 and weights to 1e-5;
the ranks themselves end bit-identical (every pruned weight is broadcast from its solver's rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from constrainedsparse import distributed
from constrainedsparse.layerwise.driver import assign_layers

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240


def test_assign_layers_balances_costs_deterministically():
    assert assign_layers([1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 0, 1]
    assert assign_layers([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1]
    assert assign_layers([3.0, 3.0, 2.0], 1) == [0, 0, 0]


def _run(args: list[str], cwd: Path, dump: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop(distributed.ENV_DEBUG_STATE_DIR, None)
    if dump is not None:
        env[distributed.ENV_DEBUG_STATE_DIR] = str(dump)
    return subprocess.run(
        [sys.executable, "-m", "constrainedsparse", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip


# wanda returns the weight in its input's memory layout: GPT-2's Conv1D weights (read transposed) must still be
# broadcast as the layer reads them.
@pytest.mark.parametrize(("method", "true_sequential"), [("sparsegpt", "false"), ("wanda", "true")])
def test_two_ranks_split_a_block_and_match_one_rank(tiny_gpt2, text_file, tmp_path, method, true_sequential):
    common = [
        "run", "hf-causal-lm", "--formulation", method, "--sparsity", "0.5", "--wandb", "disabled",
        "--no-progress", "--set", f"model={tiny_gpt2}", "--set", f"text={text_file}", "--set", "seq_len=16",
        "--set", "calibration_samples=16", "--set", "held_out_samples=4", "--set", f"true_sequential={true_sequential}",
    ]  # fmt: skip
    one = _run([*common, "--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([*common, "--out", "two", "--nproc", "2"], tmp_path, dump=tmp_path / "dump")
    assert two.returncode == 0, two.stderr[-2000:]

    rank0 = torch.load(tmp_path / "dump" / "layerwise-final-rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "dump" / "layerwise-final-rank1.pt", weights_only=False)
    assert rank0["model"].keys() == rank1["model"].keys()
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])
    assert rank0["summary"]["layer_error"] == rank1["summary"]["layer_error"]

    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    split = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert split["calibration_tokens"] == single["calibration_tokens"] == 16 * 16
    assert split["achieved_sparsity"] == single["achieved_sparsity"] == 0.5
    for name, error in single["layer_error"].items():
        assert abs(split["layer_error"][name] - error) <= 1e-4 * error, name
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
