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
    sparsity, multiplier = capsys.readouterr().out.split()
    assert abs(float(sparsity) - 0.9) < 1e-4 and float(multiplier) >= 0
