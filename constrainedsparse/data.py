"""Small data helpers shared by the bundled problems."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "as_tensors",
    "check_cifar10",
    "load_cifar10",
    "load_mnist1d",
    "load_text",
    "split_paragraphs",
    "stratified_split",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel (RGB) mean of the CIFAR-10 training images, pixels scaled to [0, 1]."""
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel (RGB) standard deviation of the CIFAR-10 training images, pixels scaled to [0, 1]."""
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_FOLDER = "cifar-10-batches-py"


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features and int64 labels."""
    return torch.as_tensor(np.asarray(x), dtype=torch.float32), torch.as_tensor(np.asarray(y), dtype=torch.long)


def load_mnist1d() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-1D's default dataset (4,000 train / 1,000 test, 40 features), generated locally.

    Uses ``mnist1d.data.make_dataset(get_dataset_args())``; never the package's download helper.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    generated = make_dataset(get_dataset_args())
    return as_tensors(generated["x"], generated["y"]), as_tensors(generated["x_test"], generated["y_test"])


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed stratified train/test split (the same for every run seed, so runs compare)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        test[rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False)] = True
    return as_tensors(x[~test], y[~test]), as_tensors(x[test], y[test])


def check_cifar10(data_dir: str | Path) -> Path:
    """Checks that ``data_dir`` holds CIFAR-10's python batches without reading them (for validation).

    Returns:
        The folder holding the batch files.

    Raises:
        ValueError: If the folder or a batch file is missing (naming it).
    """
    folder = _cifar10_folder(Path(data_dir))
    for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE):
        _require_batch_file(folder / name)
    return folder


def _require_batch_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(
            f"CIFAR-10 batch file {str(path)!r} is missing (need {', '.join(CIFAR10_TRAIN_FILES)} and "
            f"{CIFAR10_TEST_FILE} from {CIFAR10_FOLDER})"
        )


def _cifar10_folder(data_dir: Path) -> Path:
    """The folder holding the batch files: ``data_dir`` itself or its ``cifar-10-batches-py/``."""
    if not data_dir.is_dir():
        raise ValueError(f"CIFAR-10 data_dir {str(data_dir)!r} is not a directory")
    if (data_dir / CIFAR10_TEST_FILE).exists() or (data_dir / CIFAR10_TRAIN_FILES[0]).exists():
        return data_dir
    if (data_dir / CIFAR10_FOLDER).is_dir():
        return data_dir / CIFAR10_FOLDER
    return data_dir


class _RefusedObject(pickle.UnpicklingError):
    """A pickle names a global the CIFAR-10 batch format never holds."""


class _BatchUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches: plain containers and NumPy arrays only.

    The batches are pickles by format; a pickle can name any global, and loading it would call it.
    Only what the files hold is admitted (NumPy's array reconstruction, ``ndarray``, ``dtype``, and
    ``_codecs.encode``, which protocol 2 uses for bytes written by Python 3); any other global is
    refused before it is looked up.
    """

    ALLOWED = frozenset(
        {
            ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise _RefusedObject(f"{module}.{name}")
        return super().find_class(module, name)


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data, labels)`` of one CIFAR-10 python batch: uint8 ``(n, 3072)`` and int64 ``(n,)``."""
    _require_batch_file(path)
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except _RefusedObject as err:
        raise ValueError(
            f"CIFAR-10 batch file {str(path)!r} holds {err}, not only the dicts, lists, bytes and NumPy arrays "
            "of the real files: refused without loading it"
        ) from None
    except Exception as err:  # truncated/garbage files raise many different types
        raise ValueError(
            f"CIFAR-10 batch file {str(path)!r} is corrupt (not a readable pickle: {type(err).__name__})"
        ) from None
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} is corrupt (holds a {type(entry).__name__}, not a dict)")
    raw = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if raw is None or labels is None:
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} is corrupt (no b'data' or b'labels' entry)")
    raw = np.asarray(raw)
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} is corrupt (labels are not integers)") from None
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-10 batch file {str(path)!r} is corrupt (data must be uint8 of shape (n, 3072), "
            f"got {raw.dtype} {tuple(raw.shape)})"
        )
    if len(labels) != len(raw):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} is corrupt ({len(raw)} images but {len(labels)} labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} is corrupt (labels outside 0..9)")
    return raw, labels


def _cifar10_tensors(raw: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 NCHW images and int64 labels."""
    x = torch.from_numpy(np.ascontiguousarray(raw)).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    x.sub_(torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)).div_(torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
    return x, torch.from_numpy(labels)


def load_cifar10(
    data_dir: str | os.PathLike[str], *, train_subset: int = 0, test_subset: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Reads CIFAR-10 from its python batches on disk (nothing is downloaded).

    ``data_dir`` is the ``cifar-10-batches-py`` folder (``data_batch_1`` .. ``data_batch_5`` and
    ``test_batch``, each a pickled dict with ``b"data"``, uint8 ``(n, 3072)`` channel-major RGB
    32x32, and ``b"labels"``) or its parent. The batches are unpickled, so only point this at files
    you trust. Images come back as float32 ``(N, 3, 32, 32)`` normalised with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD` per channel; labels as int64. No augmentation.

    Args:
        data_dir: The ``cifar-10-batches-py`` folder or the folder containing it.
        train_subset: If positive, keep only the first ``train_subset`` training images.
        test_subset: If positive, keep only the first ``test_subset`` test images.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``.

    Raises:
        ValueError: If the folder or a batch file is missing or corrupt (naming the file), or a
            subset size is negative.
    """
    for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0 = all), got {value!r}")
    folder = _cifar10_folder(Path(data_dir))
    train = [_read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_raw, test_labels = _read_cifar10_batch(folder / CIFAR10_TEST_FILE)
    train_raw = np.concatenate([raw for raw, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    if train_subset:
        train_raw, train_labels = train_raw[:train_subset], train_labels[:train_subset]
    if test_subset:
        test_raw, test_labels = test_raw[:test_subset], test_labels[:test_subset]
    return _cifar10_tensors(train_raw, train_labels), _cifar10_tensors(test_raw, test_labels)


def load_text(path: str = "") -> str:
    """Calibration/evaluation text: a user's UTF-8 file, or CPython's bundled reference documentation.

    Args:
        path: A text file; empty for ``pydoc_data.topics`` (~465 kB of English prose and code,
            topics concatenated in sorted order).

    Raises:
        ValueError: If ``path`` is given but is not a readable file.
    """
    if not path:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--set text={path!r} is not a file (give a UTF-8 text file, or leave it empty for pydoc)")
    return file.read_text(encoding="utf-8", errors="replace")


def split_paragraphs(text: str, min_chars: int = 200) -> tuple[list[str], list[str]]:
    """Splits text at blank lines into (calibration pool, held-out) paragraphs, disjoint and fixed.

    Every fourth paragraph (of at least ``min_chars`` characters) is held out, so the two sets
    interleave across the whole text.
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= min_chars]
    return [p for i, p in enumerate(paragraphs) if i % 4], paragraphs[::4]
