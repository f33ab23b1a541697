"""docs/examples/hf_trainer.py: pruning inside transformers.Trainer, the saved model loaded by plain transformers."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "hf_trainer.py"


def test_trainer_example_prunes_to_half_and_saves_a_model_plain_transformers_loads(tmp_path):
    method = "l0"  # its gates join Trainer's optimizer as a group of their own (slr runs the same way)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), method, f"{out}/", "--quick"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("hard-pruned accuracy ") and last.endswith(" at sparsity 0.500"), last
    assert "UserWarning" not in done.stderr  # setup()'s steps per epoch match Trainer's optimizer steps
    assert (out / "checkpoint-4" / "formulation.pt").is_file()  # the formulation's state beside Trainer's
    check = (
        "import json, sys; from transformers import AutoModelForSequenceClassification as A\n"
        f"m = A.from_pretrained({str(out / 'final')!r})\n"
        "w = [p for n, p in m.named_parameters() if '.encoder.' in n and n.endswith('weight') and p.dim() == 2]\n"
        "print(json.dumps([sum(int((p == 0).sum()) for p in w) / sum(p.numel() for p in w),"
        " 'constrainedsparse' in sys.modules]))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == [0.5, False], loaded.stderr[-2000:]
