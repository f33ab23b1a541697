"""Any bytes in checkpoint.pt: load_checkpoint refuses them with one UserInputError, never an internal error; a
Ctrl-C while one is written leaves it whole."""

import random
import signal

import pytest
import torch

from constrainedsparse.checkpoint import load_checkpoint, save_checkpoint
from constrainedsparse.errors import UserInputError


def test_random_bytes_are_refused_with_one_clear_error(tmp_path):
    # A KeyError escaped for one stream in a few hundred (legacy-pickle opcodes with random arguments).
    rng = random.Random(0)
    path = tmp_path / "checkpoint.pt"
    for _ in range(400):
        path.write_bytes(rng.randbytes(rng.choice([16, 512, 4096])))
        with pytest.raises(UserInputError, match=r"^--resume: .* is not a (readable|constrainedsparse) checkpoint"):
            load_checkpoint(path)


class _CtrlCWhilePickled:
    """Sends this process SIGINT while torch.save pickles it: a Ctrl-C in the middle of a checkpoint write."""

    def __reduce__(self):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)
        return (int, (7,))


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test: a process started in the background by a shell without job
    control (a CI runner's ``cmd &``) inherits SIGINT ignored, and an ignored Ctrl-C stays ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_checkpoint_write_is_raised_after_the_file_is_complete(tmp_path, ctrl_c_raises):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"weights": torch.ones(3), "late": _CtrlCWhilePickled()})
    assert torch.load(path, weights_only=False)["late"] == 7  # written whole, then interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


class _TermWhilePickled:
    """Sends this process SIGTERM while torch.save pickles it."""

    def __reduce__(self):
        import os

        os.kill(os.getpid(), signal.SIGTERM)
        return (int, (7,))


def test_sigterm_during_a_checkpoint_write_reaches_the_cli_handler_after_the_file_is_complete(tmp_path):
    from constrainedsparse.cli import Terminated, _sigterm_interrupts

    path = tmp_path / "checkpoint.pt"
    with _sigterm_interrupts(None), pytest.raises(Terminated):  # the CLI's handler: SIGTERM unwinds like Ctrl-C
        save_checkpoint(path, {"weights": torch.ones(3), "late": _TermWhilePickled()})
    assert torch.load(path, weights_only=False)["late"] == 7  # written whole, then terminated
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_default_sigterm_during_a_checkpoint_write_ends_the_process_after_the_file_is_complete(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "checkpoint.pt"
    script = (
        "import os, signal, torch\n"
        "from constrainedsparse.checkpoint import save_checkpoint\n"
        "class Late:\n"
        "    def __reduce__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return (int, (7,))\n"
        f"save_checkpoint({str(path)!r}, {{'late': Late()}})\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM and "survived" not in done.stdout  # the default action, deferred
    assert torch.load(path, weights_only=False)["late"] == 7


def test_save_weights_removes_a_killed_writers_old_temporary_file_only(tmp_path):
    import os
    import time

    from safetensors.torch import load_file

    from constrainedsparse.checkpoint import save_weights

    path = tmp_path / "dense.safetensors"
    old, fresh = tmp_path / ".dense.safetensors.old1.tmp", tmp_path / ".dense.safetensors.new1.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")  # another process's write under way, maybe
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    save_weights(path, {"w": torch.ones(2)})
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert not old.exists() and fresh.exists()
