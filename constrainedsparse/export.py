"""Deployable exports of a layer-wise run: compressed-tensors' sparse bitmask formats, 2:4 on GPU.

:func:`export_compressed` writes ``RUN_DIR/model`` (the pruned model, dense fp32 with zeros) into
``RUN_DIR/compressed/`` in the ``compressed-tensors`` sparse layout: for every pruned weight
``X.weight`` the file holds ``X.compressed`` (the kept values), ``X.bitmask`` (one bit per weight,
packed with :func:`compressed_tensors.utils.pack_bitmasks`) and ``X.shape``, and ``config.json``
gains the ``quantization_config`` entry (``quant_method: compressed-tensors`` and a
``sparsity_config`` serialised from :class:`compressed_tensors.config.Sparse24BitMaskConfig` or
:class:`~compressed_tensors.config.BitmaskConfig`). A run pruned 2:4 uses ``sparse-24-bitmask``
(values ``(rows, cols / 2)``, about 0.53 of the dense bytes at fp32); any other sparsity
``sparse-bitmask`` (flat values plus ``X.row_offsets``).

compressed-tensors removed its sparse compressors after 0.14 (and vLLM its Sparse24 kernels in
v0.19.1), so the installed library supplies the format's configs and bit packing while the tensor
layout is assembled here exactly as its 0.14 ``Sparse24BitMaskTensor`` / ``BitmaskTensor`` did.
:func:`load_compressed` reads it back (``from_pretrained`` cannot any more).

:func:`~constrainedsparse.semistructured.to_semi_structured` (re-exported here) converts the 2:4 ``nn.Linear``
weights of a loaded model to ``torch.sparse.to_sparse_semi_structured`` (CUDA, fp16/bf16) so 2:4 sparsity runs on
sparse tensor cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from constrainedsparse.bitmask import compress_state_dict, decompress_state_dict
from constrainedsparse.errors import first_line
from constrainedsparse.extras import require
from constrainedsparse.masks import parametrized
from constrainedsparse.saving import replace_folder, source_folder
from constrainedsparse.semistructured import is_two_four, to_semi_structured
from constrainedsparse.targets import tuner_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "COMPRESSED_DIR",
    "REPORT_FILE",
    "compress_state_dict",
    "decompress_state_dict",
    "export_compressed",
    "is_two_four",
    "load_compressed",
    "load_compressed_model",
    "to_semi_structured",
]

COMPRESSED_DIR = "compressed"
REPORT_FILE = "compression.json"
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``.safetensors`` files.

    Raises:
        ValueError: For none, or a file that is not safetensors (cut short, damaged), naming it.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(folder)!r} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{str(file)!r} cannot be read as safetensors weights: {first_line(err)}") from None
    return state


def _path(value: Any, name: str) -> Path:
    """``value`` (a ``str`` or ``os.PathLike``) as a ``Path`` the file system takes.

    Raises:
        ValueError: Naming ``name``, for another type or a path the system refuses (a name too long).
    """
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be a folder path (str or Path), got {type(value).__name__}")
    path = Path(value)
    try:
        path.exists()
    except OSError as err:
        raise ValueError(f"{name} {str(path)!r} cannot be used: {err.strerror or type(err).__name__}") from None
    return path


def _read_json(path: Path, what: str) -> Any:
    """A JSON file's value.

    Raises:
        ValueError: Naming the file and ``what`` it should be, for text that is not JSON.
    """
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # UnicodeDecodeError included
        raise ValueError(f"{str(path)!r} is not {what} (not JSON: {first_line(err)})") from None


_MERGE_FIRST = "merge_and_unload() the model, hard_prune(targets, masks) again (the merge adds the adapters' product)"


def _saved_run(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The run's ``model/`` folder and summary, refusing runs that cannot be exported."""
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise ValueError(f"run directory {str(run_dir)!r} {what}")
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        if (run_dir / "adapter_config.json").is_file():
            raise ValueError(f"{str(run_dir)!r} holds PEFT adapters only (adapter_config.json): {_MERGE_FIRST}")
        raise ValueError(
            f"{str(run_dir)!r} has no summary.json: export needs a finished layer-wise run, or a saved transformers "
            "model folder (config.json)"
        )
    summary = _read_json(summary_file, "a run's summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("layer_sparsity"), dict):
        raise ValueError(
            f"{str(run_dir)!r} is not a layer-wise run (export takes fw/wanda/sparsegpt/admm/magnitude runs)"
        )
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file() and (run_dir / "model.safetensors").is_file():
        raise ValueError(
            f"{str(run_dir)!r} is a training run (its model is model.safetensors): export takes the transformers "
            "model/ folder of a layer-wise run (fw/wanda/sparsegpt/admm/magnitude one-shot)"
        )
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{str(run_dir)!r} has no saved model/ folder (a transformers model saved by the run)")
    return model_dir, summary


def _sparsity_config(names: list[str], two_four: bool, sparsity: float) -> dict[str, Any]:
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    config_class = Sparse24BitMaskConfig if two_four else BitmaskConfig
    structure = "2:4" if two_four else "unstructured"
    modules = [name.removesuffix(".weight") for name in names]
    return config_class(targets=modules, global_sparsity=sparsity, sparsity_structure=structure).model_dump()


def _quantization_config(sparsity_config: dict[str, Any]) -> dict[str, Any]:
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )

    return {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: sparsity_config,
        TRANSFORM_CONFIG_NAME: {},
    }


def _module_folders(model_dir: Path) -> set[str]:
    """The module folders a sentence-transformers ``modules.json`` lists (its pooling, normalisation)."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        return {str(m["path"]) for m in modules if isinstance(m, dict) and m.get("path")}
    except (OSError, ValueError, TypeError):
        return set()


def _copy_model_files(model_dir: Path, staging: Path) -> None:
    """The files beside the weights that the model needs: config, tokenizer, generation config, sentence-transformers
    module folders; not weights, checkpoints or the rest of a training folder (a Trainer's ``checkpoint-N/``,
    ``runs/``, ``training_args.bin``), nor a file ``staging`` holds already."""
    modules = _module_folders(model_dir)
    for path in model_dir.iterdir():
        if path.name.startswith(".") or (staging / path.name).exists() or path.name in _WEIGHT_FILES:
            continue
        if path.is_dir() and path.name in modules:
            shutil.copytree(path, staging / path.name)
        elif path.is_file() and path.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy2(path, staging / path.name)


def _folder_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def _report(sizes: dict[str, dict[str, int]], model_dir: Path, folder: Path, fmt: str) -> dict[str, Any]:
    dense = sum(s["dense_bytes"] for s in sizes.values())
    compressed = sum(s["compressed_bytes"] for s in sizes.values())
    dense_weights = _folder_bytes(model_dir, "*.safetensors")
    return {
        "format": fmt,
        "folder": str(folder),
        "layers": {name: {**s, "ratio": s["compressed_bytes"] / s["dense_bytes"]} for name, s in sizes.items()},
        "pruned_dense_bytes": dense,
        "pruned_compressed_bytes": compressed,
        "pruned_ratio": compressed / dense if dense else 1.0,
        "dense_safetensors_bytes": dense_weights,
        "compressed_safetensors_bytes": _folder_bytes(folder, "*.safetensors"),
        "safetensors_ratio": _folder_bytes(folder, "*.safetensors") / dense_weights,
        "compressed_folder_bytes": _folder_bytes(folder),
        "folder_ratio": _folder_bytes(folder) / dense_weights,
    }


def _check_destination(final: Path, source: Path | None, given: bool = True, inside: bool = True) -> None:
    """The export may replace ``final`` only if it is new, empty or an earlier export, outside the source's files.

    Args:
        final: The destination.
        source: The run directory or model folder exported (``None``: a model in memory).
        given: Whether the user named ``final`` (``--to``), else it is the run's default destination.
        inside: Whether ``final`` may be inside ``source`` (a run's ``compressed/``); not in a model folder.

    Raises:
        ValueError: For a file, the source or a folder holding it, a folder inside the run's ``model/`` (or
            anywhere inside a model folder), or a folder with other files (it would be deleted); named ``--to`` if
            ``given``, else as the default destination.
    """
    where = final.resolve()
    name = f"--to {str(final)!r}" if given else f"the default destination {str(final)!r} (give --to)"
    if where.is_file():
        raise ValueError(f"{name} is a file: give a folder")
    if source is not None:
        run = source.resolve()
        inside_export = where != (run / COMPRESSED_DIR) and where.is_relative_to(run / COMPRESSED_DIR)
        within = where.is_relative_to(run / "model") or inside_export if inside else where.is_relative_to(run)
        if where == run or run.is_relative_to(where) or within:
            what = "run's" if inside else "model folder's"
            raise ValueError(f"{name} would replace the {what} own files: give a folder outside {str(source)!r}")
    if where.is_dir() and any(where.iterdir()) and not (where / REPORT_FILE).is_file():
        raise ValueError(
            f"{name} holds files that are not an earlier export (no {REPORT_FILE}); the export replaces "
            "its folder: give a new or empty one"
        )


@dataclasses.dataclass
class _Pruned:
    """What an export writes: the saved model's folder and weights, which of them are pruned, and their pattern."""

    model_dir: Path
    state: dict[str, torch.Tensor]
    names: list[str]
    pattern: str
    sparsity: float


def _run_contents(run_dir: Path) -> _Pruned:
    """A layer-wise run's ``model/``; its pruned weights and pattern as its summary records them."""
    model_dir, summary = _saved_run(run_dir)
    pattern = summary.get("pattern", summary.get("target"))  # prune_layerwise wrote only "target" before 0.1
    state = _read_safetensors(model_dir)
    sparsity = float(summary.get("achieved_sparsity", 0.0))
    return _Pruned(model_dir, state, sorted(summary["layer_sparsity"]), str(pattern), sparsity)


def _folder_contents(model_dir: Path) -> _Pruned:
    """A saved model folder; its pruned weights are the 2-D ``*.weight`` tensors whose zeros outnumber the bitmask's
    cost (one bit per entry: more than one zero in 16 entries of a 16-bit weight, in 32 of a 32-bit one), 2:4 if
    every one of them is."""
    state = _read_safetensors(model_dir)
    zeros = {
        name: int((t == 0).sum())
        for name, t in state.items()
        if name.endswith(".weight") and t.dim() == 2 and t.is_floating_point()
    }
    names = sorted(
        name for name, count in zeros.items() if count * state[name].element_size() * 8 > state[name].numel()
    )
    if not names:
        raise ValueError(f"{str(model_dir)!r} holds no pruned weight (no 2-D weight with zeros to compress)")
    pattern = "2:4" if all(is_two_four(state[n]) for n in names) else "unstructured"
    return _Pruned(
        model_dir, state, names, pattern, sum(zeros[n] for n in names) / sum(state[n].numel() for n in names)
    )


def _destination(to: Any, what: str) -> Path:
    """``to`` as a path; a model folder or model in memory has no default destination."""
    if to is None:
        raise ValueError(f"{what} has no default destination: give to (--to DIR on the command line)")
    return _path(to, "--to")


def _scratch_folder(final: Path, kind: str = "") -> Path:
    """A new hidden folder beside ``final`` (the same file system: moved into place in one step).

    Raises:
        ValueError: If ``final``'s parent cannot be made or written.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}{kind}.", dir=final.parent))
    except OSError as err:
        raise ValueError(
            f"--to {final}: {final.parent} cannot be written ({err.strerror or type(err).__name__})"
        ) from None


@contextlib.contextmanager
def _saved_model(model: nn.Module, final: Path) -> Iterator[Path]:
    """``model`` saved (``save_pretrained``, with the tokenizer of the folder it was loaded from, if any) into a scratch
    folder beside ``final``, removed afterwards.

    Raises:
        ValueError: For a model without ``save_pretrained`` or one that still carries masks or gates.
    """
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"export takes a transformers model (with save_pretrained), got {type(model).__name__}")
    if tuner_layers(model):  # a peft PeftModel, or a transformers model with adapters added (not merged)
        raise ValueError(f"the model carries PEFT adapters (save_pretrained would write them only): {_MERGE_FIRST}")
    if parametrized(model):
        raise ValueError(
            "the model still carries masks or gates (parametrizations): remove_masks(targets) or finalize() its "
            "formulation first, so the saved weights are the pruned ones"
        )
    scratch = _scratch_folder(final, ".model")
    try:
        model.save_pretrained(scratch)
        source = source_folder(model)
        if source is not None:  # the tokenizer and the like of the folder it was loaded from, if it has them
            _copy_model_files(source, scratch)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_compressed(
    source: str | os.PathLike[str] | nn.Module, to: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Writes a pruned model in compressed-tensors' sparse bitmask format.

    Args:
        source: A finished layer-wise run directory (``summary.json`` and its ``model/`` folder: the pruned
            weights and pattern its summary records); a saved ``transformers`` model folder (``config.json`` and
            ``.safetensors``, e.g. a pruned model's ``save_pretrained`` after fine-tuning); or a ``transformers``
            model in memory, its masks removed. In the last two the pruned weights are the 2-D weights with
            enough zeros to gain from the bitmask (more than 1 in 32 entries at fp32, 1 in 16 at 16 bits), and the
            format is ``sparse-24-bitmask`` when all of them are 2:4.
        to: The folder to write: new, empty or an earlier export (replaced atomically), outside the source's
            files. ``RUN_DIR/compressed`` by default for a run; required for a model folder or a model.

    Returns:
        The report (also written to ``compression.json`` in the folder): format, bytes per pruned
        layer dense vs compressed, ``pruned_ratio``, ``safetensors_ratio`` (the compressed weight files
        against the dense model's) and ``folder_ratio`` (the whole compressed folder, configuration and
        tokenizer included, against the dense model's safetensors).

    Raises:
        ValueError: With one line, before anything is written, for a source that cannot be exported or a
            destination the export must not replace.
    """
    require("compressed_tensors", "the compressed export", "llm")
    if isinstance(source, nn.Module):
        final = _destination(to, "a model in memory")
        _check_destination(final, None)
        with _saved_model(source, final) as model_dir:
            return _write_export(_folder_contents(model_dir), final)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"export takes a run directory or model folder (str or Path) or a transformers model, got "
            f"{type(source).__name__}"
        )
    path = _path(source, "export source")
    if path.is_dir() and not (path / "summary.json").is_file() and (path / "config.json").is_file():
        final = _destination(to, f"a model folder ({str(path)!r})")
        _check_destination(final, path, inside=False)
        return _write_export(_folder_contents(path), final)
    pruned = _run_contents(path)
    final = _path(to, "--to") if to is not None else path / COMPRESSED_DIR
    _check_destination(final, path, given=to is not None)
    return _write_export(pruned, final)


def _write_export(pruned: _Pruned, final: Path) -> dict[str, Any]:
    """Writes ``pruned`` compressed into ``final`` (staged beside it, then moved in one step); returns the report."""
    names, state, pattern = pruned.names, pruned.state, pruned.pattern
    two_four = pattern == "2:4" and all(n in state and is_two_four(state[n]) for n in names)
    # GPT-2's Conv1D stores inputs x outputs: its 2:4 groups run along dim 0, which sparse-24-bitmask cannot hold.
    transposed = [n for n in names if pattern == "2:4" and n in state and not is_two_four(state[n])]
    compressed, sizes = compress_state_dict(state, names, two_four)  # validates every layer before writing
    staging = _scratch_folder(final)
    try:
        _copy_model_files(pruned.model_dir, staging)
        save_file({k: v.contiguous() for k, v in compressed.items()}, staging / "model.safetensors", {"format": "pt"})
        config = _read_json(staging / "config.json", "a transformers model's config")
        sparsity = _sparsity_config(names, two_four, pruned.sparsity)
        config["quantization_config"] = _quantization_config(sparsity)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        report = _report(sizes, pruned.model_dir, staging, sparsity["format"])
        report["folder"], report["pattern"] = str(final), pattern  # the config's sparsity_structure has 2:4 only
        if transposed:
            report["format_note"] = (
                f"a 2:4 run, but {transposed[0]}{' and others' if len(transposed) > 1 else ''} store the groups "
                "of 4 along dim 0 (a Conv1D's inputs x outputs), which sparse-24-bitmask cannot hold: sparse-bitmask"
            )
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def load_compressed(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The dense state dict of a folder written by :func:`export_compressed`.

    Raises:
        ValueError: If the folder holds no compressed-tensors sparse model.
    """
    folder = _path(folder, "folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(folder)!r} is not an exported model folder (no config.json)")
    config = _read_json(config_file, "a transformers model's config")
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    sparsity = quantization.get("sparsity_config") if isinstance(quantization, dict) else None
    if not isinstance(sparsity, dict) or sparsity.get("format") not in ("sparse-24-bitmask", "sparse-bitmask"):
        raise ValueError(f"{str(folder)!r} holds no compressed-tensors sparse-bitmask model (see its config.json)")
    require("compressed_tensors", "loading a compressed export", "llm")
    state = _read_safetensors(folder)
    try:
        return decompress_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{str(folder)!r}: {err}") from None


def load_compressed_model(folder: str | os.PathLike[str]) -> PreTrainedModel:
    """The ``transformers`` model of an exported folder, with its decompressed (dense) weights in their stored
    dtype (a bfloat16 run reloads in bfloat16, as ``from_pretrained`` of its ``model/`` does).

    Raises:
        ValueError: If the folder holds no compressed-tensors sparse model, or weights are missing.
    """
    require("transformers", "loading a compressed export", "llm")
    import transformers

    state = load_compressed(folder)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    model = architecture(config) if architecture is not None else transformers.AutoModel.from_config(config)
    # assign: the parameters become the loaded tensors, dtype included (a copy would cast them to the build dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    tied = {name for name in missing if _is_tied(model, name, state)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{str(folder)!r} does not match its config: missing {sorted(set(missing) - tied)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}"
        )
    return model.eval()


def _is_tied(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether parameter ``name`` shares its storage with a parameter that was loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    pointer = params[name].data_ptr() if name in params else None
    return pointer is not None and any(params[k].data_ptr() == pointer for k in state if k in params and k != name)


EXPORT_FORMATS = ("compressed",)


def main(argv: list[str] | None = None) -> int:
    """``python -m constrainedsparse.export RUN_DIR ...`` (the same as ``constrainedsparse export``)."""
    import argparse
    import sys

    from constrainedsparse.cli import add_export_command, export_command

    parser = argparse.ArgumentParser(prog="constrainedsparse")
    add_export_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    try:
        export_command(args)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
