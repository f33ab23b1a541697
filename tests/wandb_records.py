"""Reads the records of a wandb offline run (``wandb/offline-run-*/run-*.wandb``) back, for tests.

Format (wandb 0.31, see ``DESIGN.md``): a 7-byte header (``:W&B``, a 2-byte magic, a 1-byte
version), then LevelDB-log blocks of 32 KiB counted from the start of the file.  Each block holds
records ``crc32c (4) | length (2, little-endian) | type (1) | payload``; a block tail shorter than
the 7-byte record header is padding.  A logical record is either one FULL chunk or a FIRST chunk,
any MIDDLE chunks and a LAST chunk.  Each logical record is a serialized
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

__all__ = ["find_run_file", "history_rows", "read_records", "wait_for_complete_file", "wait_for_complete_run"]

HEADER_LEN = 7
HEADER_IDENT = b":W&B"
BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_run_file(out_dir: Path) -> Path:
    """The single ``wandb/offline-run-*/run-*.wandb`` under ``out_dir``."""
    found = sorted(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(found) == 1, f"expected exactly one wandb/offline-run-*/run-*.wandb under {out_dir}, found {found}"
    return found[0]


def _payloads(data: bytes) -> list[bytes]:
    """Reassembled record payloads of a ``.wandb`` file's contents."""
    assert len(data) >= HEADER_LEN, f"file too short for the {HEADER_LEN}-byte header: {len(data)} bytes"
    assert data[:4] == HEADER_IDENT, f"bad header identifier {data[:4]!r}, expected {HEADER_IDENT!r}"
    payloads: list[bytes] = []
    pending: list[bytes] | None = None
    pos = HEADER_LEN
    while pos < len(data):
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < CHUNK_HEADER_LEN:
            pos += left_in_block  # block tail padding
            continue
        if len(data) - pos < CHUNK_HEADER_LEN:
            break  # truncated trailing bytes (a run still being written)
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        start = pos + CHUNK_HEADER_LEN
        end = start + length
        assert length <= left_in_block - CHUNK_HEADER_LEN, f"chunk at {pos} crosses a block boundary"
        assert end <= len(data), f"chunk at {pos} runs past the end of the file"
        chunk = data[start:end]
        pos = end
        if kind == 0 and length == 0:
            # Zero-filled space (preallocation or padding): skip the rest of the block.
            pos += BLOCK_LEN - pos % BLOCK_LEN if pos % BLOCK_LEN else 0
            continue
        if kind == FULL:
            assert pending is None, f"FULL chunk at {pos} inside a FIRST/LAST sequence"
            payloads.append(chunk)
        elif kind == FIRST:
            assert pending is None, f"FIRST chunk at {pos} inside a FIRST/LAST sequence"
            pending = [chunk]
        elif kind == MIDDLE:
            assert pending is not None, f"MIDDLE chunk at {pos} without a FIRST"
            pending.append(chunk)
        elif kind == LAST:
            assert pending is not None, f"LAST chunk at {pos} without a FIRST"
            pending.append(chunk)
            payloads.append(b"".join(pending))
            pending = None
        else:
            raise AssertionError(f"unknown chunk type {kind} at {pos}")
    return payloads


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every ``Record`` of a ``.wandb`` file, in file order."""
    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def wait_for_complete_run(out_dir: Path, timeout_s: float = 30.0) -> Path:
    """``find_run_file(out_dir)`` once its last record, the run's ``exit`` record, is on disk.

    wandb-core writes the ``.wandb`` file asynchronously: right after ``run.finish()`` returns the
    file can still hold only its 7-byte header, the records following some milliseconds later.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if len(list(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb"))) > 1:
            find_run_file(out_dir)  # fails at once, naming the files
        try:
            path = find_run_file(out_dir)
            if any(record.WhichOneof("record_type") == "exit" for record in read_records(path)):
                return path
            problem = f"{path} has no exit record yet"
        except AssertionError as err:  # no file yet, or a partly flushed chunk
            problem = str(err)
        if time.monotonic() > deadline:
            raise AssertionError(f"wandb run under {out_dir} not complete after {timeout_s} s: {problem}")
        time.sleep(0.01)


def wait_for_complete_file(path: Path, timeout_s: float = 30.0) -> Path:
    """``path`` (one ``run-*.wandb`` file) once its ``exit`` record is on disk (see :func:`wait_for_complete_run`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(record.WhichOneof("record_type") == "exit" for record in read_records(path)):
                return path
            problem = "no exit record yet"
        except AssertionError as err:  # a partly flushed chunk
            problem = str(err)
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not complete after {timeout_s} s: {problem}")
        time.sleep(0.01)


def history_rows(path: Path) -> list[dict[str, object]]:
    """One dict per history record: key (``nested_key`` joined with ``/``) -> JSON-decoded value.

    The ``_step`` item is included, as are wandb's own items (``_runtime``, ``_timestamp``).
    """
    rows: list[dict[str, object]] = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in record.history.item:
            key = item.key if item.key else "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def summary_values(path: Path) -> dict[str, object]:
    """The run's summary as the offline file holds it: key (``nested_key`` joined with ``/``) -> last value."""
    summary: dict[str, object] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            key = item.key if item.key else "/".join(item.nested_key)
            summary[key] = json.loads(item.value_json)
    return summary
