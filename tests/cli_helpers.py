"""The CLI's bad-input contract, checked the same way by every test file."""

import pytest

from constrainedsparse.cli import main


def fails_with_one_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Runs ``constrainedsparse ARGS``; asserts exit code 2 and one ``error: …`` line on stderr; returns it."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


# The source of a toy model for problem files written by tests: two residual blocks of two Linear layers.
TWO_RESIDUAL_BLOCKS = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x
"""
