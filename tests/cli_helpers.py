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
