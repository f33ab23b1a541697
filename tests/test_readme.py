"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_own_loop_example_runs_and_prunes_to_90_percent(capsys):
    code = _block("## Your own loop")
    assert len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    sparsity, norm = capsys.readouterr().out.split()
    assert abs(float(sparsity) - 0.9) < 1e-4 and float(norm) <= 5.0  # the budget holds


def test_the_cli_reference_lists_every_set_key_as_the_code_declares_it():
    """docs/cli.md's `--set` tables are what docs/examples/set_keys.py generates from the code now."""
    import subprocess
    import sys

    root = README.parent
    generated = subprocess.run(
        [sys.executable, str(root / "docs" / "examples" / "set_keys.py")], capture_output=True, text=True, check=True
    ).stdout
    documented = set((root / "docs" / "cli.md").read_text().splitlines())
    stale = [line for line in generated.splitlines() if line.strip() and line not in documented]
    assert not stale, "docs/cli.md is behind the code; regenerate with docs/examples/set_keys.py:\n" + "\n".join(stale)
