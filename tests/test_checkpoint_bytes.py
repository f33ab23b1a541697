"""Any bytes in checkpoint.pt: load_checkpoint refuses them with one UserInputError, never an internal error."""

import random

import pytest

from constrainedsparse.checkpoint import load_checkpoint
from constrainedsparse.errors import UserInputError


def test_random_bytes_are_refused_with_one_clear_error(tmp_path):
    # A KeyError escaped for one stream in a few hundred (legacy-pickle opcodes with random arguments).
    rng = random.Random(0)
    path = tmp_path / "checkpoint.pt"
    for _ in range(400):
        path.write_bytes(rng.randbytes(rng.choice([16, 512, 4096])))
        with pytest.raises(UserInputError, match=r"^--resume: .* is not a (readable|constrainedsparse) checkpoint"):
            load_checkpoint(path)
