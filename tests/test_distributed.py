"""Multi-process training: real processes (gloo on CPU) launched from the tests, plus the pieces in one process.

The multi-process tests run ``tests/problems/ddp_digits.py`` (512 training images, global batch 64,
an MLP and a data-dependent user constraint) on 2 ranks and read the per-rank state every rank
dumps when ``CONSTRAINEDSPARSE_DEBUG_STATE_DIR`` is set.

Tolerance of "a 2-rank run matches a 1-rank run with the same global batch": the two differ only
in the order of floating-point sums (a 64-sample mean vs the average of two 32-sample means, an
all-reduced reference loss), so after 2 epochs the weights agree to ``WEIGHT_ATOL`` = 1e-5, the
hard masks agree on all but ``MASK_FLIPS`` = 0.1 % of the entries (a weight within ~1e-7 of the
top-k threshold may swap), every surrogate-condition decision is the same, and accuracies agree to
one test image (1/256).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import fails_with_one_line
from torch.utils.data import DataLoader

from constrainedsparse import RunConfig, distributed, launcher, run
from constrainedsparse.data import load_cifar10
from constrainedsparse.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = str(Path(__file__).parent / "problems" / "ddp_digits.py")
TIMEOUT = 180  # seconds: a hung job fails the test instead of hanging it
WEIGHT_ATOL = 1e-5
MASK_FLIPS = 1e-3
ACCURACY_TOL = 1.5 / 256


def _env(dump: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop(distributed.ENV_DEBUG_STATE_DIR, None)
    if dump is not None:
        env[distributed.ENV_DEBUG_STATE_DIR] = str(dump)
    return env


def _spawn(args: list[str], cwd: Path, dump: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(dump), capture_output=True, text=True, timeout=TIMEOUT
    )


def _flat(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _flat(value, f"{prefix}/{i}").items()}
    return {prefix: obj}


def _load(path: Path) -> dict[str, object]:
    return _flat(torch.load(path, weights_only=False))


def _assert_bit_identical(a: Path, b: Path) -> dict[str, object]:
    left, right = _load(a), _load(b)
    assert left.keys() == right.keys()
    for key, value in left.items():
        other = right[key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert value == other, key
    return left


def _decisions(out: Path) -> list[tuple[int, float, float]]:
    return [
        (row["step"], row["condition/6_holds"], row["condition/11_holds"])
        for row in read_metrics(out / "metrics.jsonl")
        if "condition/6_holds" in row
    ]


# --- one process ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "replicas"), [(64, 2), (37, 2), (37, 3)])
def test_sharded_sampler_deals_out_the_one_process_batches(size, replicas):
    seed, per_rank = 12_345, 4
    one = [
        b.tolist()
        for b in DataLoader(
            range(size), batch_size=per_rank * replicas, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
    ]
    ranks = [
        [
            b.tolist()
            for b in DataLoader(
                range(size), batch_size=per_rank, sampler=distributed.ShardedSampler(size, seed, replicas, r)
            )
        ]
        for r in range(replicas)
    ]
    assert {len(batches) for batches in ranks} == {len(one)}  # same step count on every rank
    for j, batch in enumerate(one):
        union = sorted(i for batches in ranks for i in batches[j])
        if j < len(one) - 1 or size % replicas == 0:
            assert union == sorted(batch)
        else:  # the padded last batch: the one-process batch plus repeats of the first samples
            assert set(batch) <= set(union) and len(union) - len(batch) == -size % replicas


def test_single_process_helpers_are_identities():
    value, model = torch.tensor(2.5), torch.nn.Linear(2, 2)
    batch = (torch.arange(6), torch.arange(6))
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.weighted_mean(value, 3) is value
    assert distributed.synchronised(value) is value
    assert distributed.shard(batch) is batch
    assert distributed.wrap(model) is model
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.rank_device("cuda") == "cuda"


def test_global_batch_must_split_over_the_processes(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--set batch_size=30 must be divisible by the number of processes \(4\)"):
        distributed.check_global_batch(30, 4)
    distributed.check_global_batch(32, 4)
    line = fails_with_one_line(
        ["run", PROBLEM, "--nproc", "4", "--set", "batch_size=30", "--out", str(tmp_path / "o"), "--no-progress"],
        capsys,
    )
    assert line == (
        "error: --set batch_size=30 must be divisible by the number of processes (4): batch_size is the global "
        "batch, split evenly over the ranks"
    )
    assert not (tmp_path / "o").exists()
    line = fails_with_one_line(["run", PROBLEM, "--nproc", "3", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert line.startswith("error: the problem's batch size ") and line.endswith(
        "must be divisible by the number of processes (3): batch_size is the global batch, split evenly over the "
        "ranks; choose one with --set batch_size=N"
    )
    assert not (tmp_path / "o").exists()
    held = tmp_path / "held"
    held.mkdir()
    (held / "summary.json").write_text("{}")  # a folder holding a run: the bad value is still reported first
    line = fails_with_one_line(["run", PROBLEM, "--nproc", "4", "--set", "batch_size=30", "--out", str(held)], capsys)
    assert line.startswith("error: --set batch_size=30 must be divisible by the number of processes (4)")


def test_nproc_bad_values_are_one_line(tmp_path, capsys, monkeypatch):
    args = ["run", PROBLEM, "--out", str(tmp_path / "o"), "--no-progress", "--nproc"]
    assert fails_with_one_line([*args, "0"], capsys) == "error: --nproc must be an integer >= 1, got 0"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fails_with_one_line([*args, "2"], capsys) == (
        "error: --nproc cannot be combined with torchrun (torchrun already started the processes)"
    )
    assert not (tmp_path / "o").exists()


def test_launcher_reports_the_rank_that_raised_not_the_ranks_that_lost_it():
    def failure(exitcode, timestamp, **mine):
        data = {"message": "m", "constrainedsparse": mine} if mine else {"message": "<NONE>"}
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, error_file_data=data, message="m")

    own = failure(2, 100, time=100.7, peer=False)
    lost = failure(1, 100, time=100.2, peer=True)  # earlier, but only lost its peer
    killed = failure(-15, 99)  # SIGTERM from the launcher: no error file
    assert launcher.root_cause({0: lost, 1: own, 2: killed}) == (1, own)
    assert launcher.root_cause({0: lost, 2: killed})[0] == 2
    aborted = failure(-6, 99)  # SIGABRT without a report: died on its own, before the agent stopped rank 0
    assert launcher.root_cause({0: failure(-15, 99), 1: aborted}) == (1, aborted)
    assert launcher.root_cause({0: lost, 1: own, 2: aborted}) == (1, own)
    oom = failure(-9, 99)  # kill -9 / the OOM killer: the agent then stops rank 0 with SIGTERM
    assert launcher.root_cause({0: failure(-15, 99), 1: oom}) == (1, oom)


def test_the_job_exits_with_the_code_the_failing_rank_reported_even_if_its_process_aborted_after():
    def failure(exitcode, **mine):
        return SimpleNamespace(exitcode=exitcode, timestamp=1, error_file_data={"constrainedsparse": mine}, message="m")

    assert launcher._exit_code(failure(-6, time=1.0, peer=False, code=2)) == 2  # bad input, then a SIGABRT
    assert launcher._exit_code(failure(1, time=1.0, peer=False, code=1)) == 1
    assert launcher._exit_code(failure(-6)) == 1  # no report: a signal is exit status 1
    assert launcher._exit_code(failure(3)) == 3


# --- several processes --------------------------------------------------------------------------------


def test_two_ranks_slr_identical_on_every_rank_and_match_one_rank(tmp_path, monkeypatch):
    """slr on 2 ranks through ``--nproc 2``: every rank ends with the same masks, Z, Λ, user multiplier
    and weights bit for bit; rank 0 alone writes files; a 1-rank run with the same global batch agrees."""
    common = ["--formulation", "slr", "--epochs", "2", "--set", "interval=3", "--no-progress"]
    started = time.perf_counter()
    done = _spawn(
        ["-m", "constrainedsparse", "run", PROBLEM, *common, "--nproc", "2", "--out", "two", "--wandb", "offline"],
        tmp_path,
        dump=tmp_path / "dump2",
    )
    print(f"2-rank slr run: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote two/summary.json" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump2", "two"]  # no stray files from rank 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.pt",
        "layers.csv",
        "metrics.jsonl",
        "metrics.png",
        "model.safetensors",
        "summary.json",
        "wandb",
    ]
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    state = _assert_bit_identical(tmp_path / "dump2" / "prune-rank0.pt", tmp_path / "dump2" / "prune-rank1.pt")
    _assert_bit_identical(tmp_path / "dump2" / "final-rank0.pt", tmp_path / "dump2" / "final-rank1.pt")
    assert any(key.startswith("/masks/") for key in state) and any(key.startswith("/formulation/z/") for key in state)
    assert float(state["/formulation/cmp/multipliers/logit_budget/weight"].abs().max()) > 0  # the constraint acted
    assert float(state["/formulation/cmp/multipliers/w_eq_z/0.weight/weight"].abs().max()) > 0

    monkeypatch.setenv(distributed.ENV_DEBUG_STATE_DIR, str(tmp_path / "dump1"))
    one = run(
        RunConfig(
            problem=PROBLEM,
            formulation="slr",
            epochs=2,
            settings={"interval": "3"},
            out=tmp_path / "one",
            progress=False,
        )
    )
    single = _load(tmp_path / "dump1" / "prune-rank0.pt")
    for key, value in state.items():
        if key.startswith("/masks/"):
            assert (value != single[key]).float().mean() <= MASK_FLIPS, key
        elif key.startswith(("/model/", "/formulation/z/", "/formulation/cmp/")):
            torch.testing.assert_close(value, single[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    assert _decisions(tmp_path / "two") == _decisions(tmp_path / "one") != []
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("dense_accuracy", "hardprune_accuracy"):
        assert abs(two[key] - one[key]) <= ACCURACY_TOL, key


def test_l0_resumes_on_two_ranks_from_a_one_rank_checkpoint(tmp_path, monkeypatch):
    """l0 (+ masked retraining) stopped after 1 of 2 epochs in one process, resumed by plain torchrun on
    2 ranks: λ, gates and weights are bit-identical across ranks and close to an uninterrupted run."""
    settings = {"log_interval": "2"}
    config = dict(problem=PROBLEM, formulation="l0", epochs=2, retrain_epochs=1, settings=settings, progress=False)
    assert run(RunConfig(**config, out=tmp_path / "resumed", stop_after_epochs=1)) is None
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "constrainedsparse",
        "run",
        PROBLEM,
        "--formulation",
        "l0",
        "--epochs",
        "2",
        "--retrain-epochs",
        "1",
        "--set",
        "log_interval=2",
        "--out",
        "resumed",
        "--resume",
        "--wandb",
        "disabled",
        "--no-progress",
    ]
    started = time.perf_counter()
    done = _spawn(args, tmp_path, dump=tmp_path / "dump2")
    print(f"2-rank l0 resume: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    state = _assert_bit_identical(tmp_path / "dump2" / "prune-rank0.pt", tmp_path / "dump2" / "prune-rank1.pt")
    _assert_bit_identical(tmp_path / "dump2" / "final-rank0.pt", tmp_path / "dump2" / "final-rank1.pt")
    lambda_key = "/formulation/cmp/multipliers/l0_density/weight"
    assert lambda_key in state and any("log_alpha" in key for key in state)

    monkeypatch.setenv(distributed.ENV_DEBUG_STATE_DIR, str(tmp_path / "dump1"))
    run(RunConfig(**config, out=tmp_path / "straight"))
    single = _load(tmp_path / "dump1" / "prune-rank0.pt")
    for key, value in state.items():
        if "log_alpha" in key or key.startswith("/model/") or key == lambda_key:
            torch.testing.assert_close(value, single[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    final_two, final_one = _load(tmp_path / "dump2" / "final-rank0.pt"), _load(tmp_path / "dump1" / "final-rank0.pt")
    for key, value in final_two.items():
        torch.testing.assert_close(value, final_one[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert abs(resumed["retrain_accuracy"] - straight["retrain_accuracy"]) <= ACCURACY_TOL


def test_magnitude_masks_registered_during_training_are_averaged_on_two_ranks(tmp_path):
    """magnitude registers its masks when built (updated in place at every epoch start) and retraining registers new
    ones after the hard prune: DDP is rebuilt then, so every parameter keeps its gradient averaging and the ranks stay
    identical."""
    args = [
        "-m",
        "constrainedsparse",
        "run",
        PROBLEM,
        "--formulation",
        "magnitude",
        "--epochs",
        "2",
        "--retrain-epochs",
        "1",
        "--nproc",
        "2",
        "--out",
        "o",
        "--wandb",
        "disabled",
        "--no-progress",
    ]
    done = _spawn(args, tmp_path, dump=tmp_path / "dump")
    assert done.returncode == 0, done.stderr[-3000:]
    state = _assert_bit_identical(tmp_path / "dump" / "prune-rank0.pt", tmp_path / "dump" / "prune-rank1.pt")
    _assert_bit_identical(tmp_path / "dump" / "final-rank0.pt", tmp_path / "dump" / "final-rank1.pt")
    assert any(".parametrizations.weight.original" in key for key in state)  # trained through the masks
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["retrain_epochs"] == 1


def test_a_failing_rank_fails_the_job_with_its_message(tmp_path):
    started = time.perf_counter()
    done = _spawn(
        [
            "-m",
            "constrainedsparse",
            "run",
            PROBLEM,
            "--formulation",
            "admm",
            "--nproc",
            "2",
            "--out",
            "o",
            "--set",
            "fail_rank=1",
            "--set",
            "fail_step=5",
            "--wandb",
            "disabled",
            "--no-progress",
        ],
        tmp_path,
    )
    elapsed = time.perf_counter() - started
    print(f"failing 2-rank job: {elapsed:.1f} s")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: rank 1: problem 'ddp-digits': loss(output, y) failed: rank 1 refuses its batch at loss call 5"
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()  # no checkpoint yet: the job leaves no half-written directory


def test_a_reference_batch_smaller_than_the_processes_is_one_line_before_the_dense_training(tmp_path):
    """With reference_samples=1 on two processes the second rank's shard was empty: tracebacks from inside slr's f.
    Refused before the dense model trains (it came after 1,000 epochs of it: the job would time out here)."""
    started = time.perf_counter()
    done = _spawn(["-m", "constrainedsparse", "run", PROBLEM, "--formulation", "slr", "--nproc", "2", "--out", "o",
                   "--epochs", "1", "--pretrain-epochs", "1000", "--set", "reference_samples=1", "--wandb", "disabled",
                   "--no-progress"], tmp_path)  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"refused 2-rank job: {elapsed:.1f} s")
    assert elapsed < 90, elapsed  # 13.5 s here; after the 1,000 dense epochs it would take minutes
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: rank \d: slr: its reference batch of 1 training samples \(--set reference_samples, at most the "
        r"training set\) is shared out over 2 processes: give reference_samples >= 2",
        last,
    ), last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_ctrl_c_of_a_two_process_job_is_one_line_and_exit_130(tmp_path):
    import signal

    args = [sys.executable, "-m", "constrainedsparse", "run", PROBLEM, "--formulation", "admm", "--epochs", "30",
            "--nproc", "2", "--out", "o", "--wandb", "disabled", "--no-progress"]  # fmt: skip
    child = subprocess.Popen(args, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "o" / "checkpoint.pt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["interrupted; continue from the last checkpoint with --resume --out o"]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_a_launcher_terminated_or_killed_takes_its_ranks_with_it(tmp_path, signum):
    import signal

    args = [sys.executable, "-m", "constrainedsparse", "run", PROBLEM, "--formulation", "admm", "--epochs", "1000",
            "--nproc", "2", "--out", "o", "--wandb", "disabled", "--no-progress"]  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file, as a scheduler's log: a pipe's end would stop ranks
        child = subprocess.Popen(args, cwd=tmp_path, env=_env(), stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "o" / "checkpoint.pt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    ranks = _children(child.pid)
    assert ranks, "the launcher started no process"
    os.kill(child.pid, getattr(signal, signum))  # the launcher alone (kill PID, a scheduler), not its group
    child.wait(timeout=60)
    if signum == "SIGTERM":  # one line and the shell's code, as for one process
        err = (tmp_path / "stderr.txt").read_text()
        assert child.returncode == 143, err[-3000:]
        assert err.strip().splitlines() == ["terminated; continue from the last checkpoint with --resume --out o"]
    deadline = time.monotonic() + 20  # far less than the 1000 epochs would take
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks)  # no rank runs on unattended


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for a dead parent's reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ddp_throughput_benchmark_quick(tmp_path):
    """``benchmarks/ddp_throughput.py --quick``: 1 and 2 launched processes on a generated CIFAR-10."""
    import importlib.util

    benchmarks = ROOT / "benchmarks"
    if str(benchmarks) not in sys.path:
        sys.path.insert(0, str(benchmarks))  # as when the script runs: benchmarks/common.py is importable
    spec = importlib.util.spec_from_file_location("benchmark_ddp_throughput", benchmarks / "ddp_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    with pytest.raises(ValueError, match=r"--configs entries must be PxT with integers >= 1"):
        bench.parse_config("2x0")
    folder = bench.write_cifar10(tmp_path / "cifar", train_images=12, test_images=3)
    (x_train, y_train), (x_test, _) = load_cifar10(folder)
    assert x_train.shape == (12, 3, 32, 32) and x_test.shape == (3, 3, 32, 32) and y_train.dtype == torch.long

    assert bench.main(["--quick", "--out", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = payload["results"]
    assert [(r["processes"], r["threads_per_process"], r["world_size"]) for r in rows] == [(1, 1, 1), (2, 1, 2)]
    for row in rows:
        assert row["global_batch"] == 8 and row["per_rank_batch"] == 8 // row["processes"]
        assert row["samples_per_second"] == pytest.approx(row["steps"] * 8 / row["seconds"])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "benchmarks/ddp_throughput.py --quick --out" in text and "| 2 x 1 | 4 |" in text and "every repeat" in text


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_flushes_and_skips_finalization_only_in_a_rank(tmp_path, world_size):
    """A rank leaves with os._exit after flushing (gloo can abort during finalization); one process exits normally."""
    script = (
        "import atexit, logging, sys\n"
        "from constrainedsparse.distributed import exit_process\n"
        "atexit.register(lambda: print('finalized', flush=True))\n"
        "logging.basicConfig(filename='log.txt', level=logging.INFO)\n"
        "logging.info('logged')\n"
        "sys.stdout.write('buffered')\n"
        "exit_process(3)\n"
    )
    env = {**_env(), "WORLD_SIZE": world_size}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("buffered")
    assert ("finalized" in done.stdout) == (world_size == "1")
    assert "logged" in (tmp_path / "log.txt").read_text()


def test_a_ranks_error_exit_skips_interpreter_finalization(tmp_path):
    """A rank's error paths raised SystemExit past exit_process: interpreter finalization ran with gloo's threads
    alive, and a failing job sometimes printed a second line ('terminate called without an active exception')."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, os, runpy, sys\n"
        "os.environ['WORLD_SIZE'] = '2'\n"
        "atexit.register(lambda: print('interpreter finalization ran', flush=True))\n"
        "sys.argv = ['constrainedsparse', 'run', 'no-such-problem']\n"
        "runpy.run_module('constrainedsparse', run_name='__main__')\n"
    )
    done = _spawn([str(script)], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "interpreter finalization ran" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown problem 'no-such-problem'"), lines
