"""Saving a pruned ``transformers`` model as a folder that loads the standard way.

:func:`save_pretrained_model` writes ``model.save_pretrained`` together with the tokenizer of the
folder the model came from, and, when that folder is a sentence-transformers model (it has a
``modules.json``), the files ``SentenceTransformer(folder)`` needs (module list, pooling config,
...). So ``AutoTokenizer.from_pretrained(out)``, ``AutoModel*.from_pretrained(out)`` and
``SentenceTransformer(out)`` give the pruned model's real behaviour. The folder appears atomically:
it is written next to its final place and moved there with one ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from constrainedsparse.causal_lm import load_tokenizer
from constrainedsparse.checkpoint import directory_mode, file_mode

__all__ = ["SENTENCE_TRANSFORMERS_FILES", "replace_folder", "save_pretrained_model", "source_folder"]

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
"""Top-level files of a sentence-transformers folder (module sub-folders are listed in ``modules.json``)."""


def replace_folder(staging: Path, final: Path) -> None:
    """Moves ``staging`` to ``final`` atomically, replacing (and deleting) any folder already there.

    An existing ``final`` is first renamed aside, so readers see the old folder or the new one. Every
    file and folder in it gets the mode a new one has under the umask (mkdtemp's 0700, and the 0600
    of files some writers stage through ``mkstemp``, would hide the folder from other users).
    """
    for path in staging.rglob("*"):
        path.chmod(file_mode() if path.is_file() else directory_mode())
    staging.chmod(directory_mode())
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        try:
            os.replace(final, trash / final.name)
        except FileNotFoundError:  # removed meanwhile by someone else
            pass
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def source_folder(model: nn.Module) -> Path | None:
    """The local folder ``model`` was loaded from (``from_pretrained``'s ``name_or_path``), if it still exists."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(name) if name and Path(name).is_dir() else None


def _copy_sentence_transformers_files(source: Path, staging: Path) -> None:
    """Copies the sentence-transformers module list, its configs and its module sub-folders."""
    if not (source / "modules.json").is_file():
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    for module in json.loads((source / "modules.json").read_text()):
        sub = module.get("path", "")
        if sub and (source / sub).is_dir():  # path "" is the transformer itself: save_pretrained wrote it
            shutil.copytree(source / sub, staging / sub, dirs_exist_ok=True)


def save_pretrained_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer_source: str | os.PathLike[str] | Any | None = None,
) -> Path:
    """Saves ``model`` (``save_pretrained``) with its tokenizer into ``out_dir``, atomically.

    Args:
        model: A ``transformers`` model (anything with ``save_pretrained``).
        out_dir: The folder to write (replaced if it exists).
        tokenizer_source: A folder holding the tokenizer, or a tokenizer object; ``None`` takes the
            folder the model was loaded from (:func:`source_folder`). A sentence-transformers
            source folder also contributes its module files.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If the model cannot ``save_pretrained``, or no tokenizer is found (one line,
            nothing written).
    """
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} has no save_pretrained: save its state_dict instead")
    source = source_folder(model) if tokenizer_source is None else tokenizer_source
    if source is None:
        raise ValueError("the model was not loaded from a local folder: pass tokenizer_source (a folder or tokenizer)")
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        tokenizer = load_tokenizer(folder, "tokenizer_source")
    else:
        folder, tokenizer = None, source
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder is not None:
            _copy_sentence_transformers_files(folder, staging)
        replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
