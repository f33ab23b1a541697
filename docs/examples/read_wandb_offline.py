"""Print the history rows of a wandb offline run (``wandb/offline-run-*/run-*.wandb``) without a network.

Usage: python read_wandb_offline.py RUN_DIR/wandb/offline-run-*/run-*.wandb [KEY ...]

A resumed run continues in a folder of its own with the same id: give every folder's file (the
glob above does, in time order). Rows an interrupted part logged after its last checkpoint are
replaced by the resumed part's, which starts again from that checkpoint's step.
"""

import json
import struct
import sys

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    """Payloads of a LevelDB-log file after wandb's 7-byte header (crc32c is not checked here)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block tail too short for a header: skip to the next block
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
        else:  # zero padding at the end of the file
            break


def history(path):
    """History rows; a nested value (a histogram: ``_type``, ``bins``, ``values``) is a dict under its key."""
    for payload in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                *outer, last = [item.key] if item.key else list(item.nested_key)
                place = row
                for name in outer:
                    place = place.setdefault(name, {})
                place[last] = json.loads(item.value_json)
            yield row


def merged_history(paths):
    """The rows of a run's files; a later part replaces the earlier rows after its first step, and its first row
    is merged into an earlier row at that step (its keys win).

    A resumed part starts at its checkpoint's step, where the earlier part may have logged before it stopped (the
    last epoch's row when it was stopped after its last checkpoint): those keys stay. The parts are ordered by their
    first step (a shell glob may list ``...-ID-1/`` before ``...-ID/``).
    """
    parts = sorted((part for part in map(list, map(history, paths)) if part), key=lambda p: p[0].get("_step", 0))
    rows = []
    for part in parts:
        first = part[0].get("_step", 0)
        at_first = [row for row in rows if row.get("_step", -1) == first]
        rows = [row for row in rows if row.get("_step", -1) < first]
        rows += [{**row, **part[0]} for row in at_first[-1:]] or part[:1]
        rows += part[1:]
    return rows


if __name__ == "__main__":
    paths = [arg for arg in sys.argv[1:] if arg.endswith(".wandb")]
    keys = [arg for arg in sys.argv[1:] if not arg.endswith(".wandb")]
    for row in merged_history(paths):
        if not keys or any(k in row for k in keys):
            print({k: v for k, v in row.items() if not keys or k in keys or k == "_step"})
