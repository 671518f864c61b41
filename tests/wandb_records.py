"""Reads the history of an offline W&B run (``run-<id>.wandb``) back, for the tests.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
LevelDB log blocks of 32 KiB, each record a 7-byte header (crc32, length, type: full,
first, middle, last) and a piece of a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    """Every protobuf Record in ``path``, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        piece = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = piece
        elif kind == FIRST:
            pending = piece
            continue
        elif kind == MIDDLE:
            pending += piece
            continue
        elif kind == LAST:
            pending += piece
        record = pb.Record()
        record.ParseFromString(pending)
        yield record
        pending = b""


def run_id(run_folder: str) -> str:
    """The W&B run id of a run folder (its ``run-<id>.wandb``; the folder's own name may carry a ``-1``
    when two runs start within the same second)."""
    (path,) = glob.glob(os.path.join(run_folder, "run-*.wandb"))
    return os.path.basename(path)[len("run-") : -len(".wandb")]


def history(run_folder: str, until=None, timeout_s: float = 60.0) -> list[dict]:
    """The rows logged in one run folder (``offline-run-*``): {key: value, "_step": step}.

    ``until(rows)``: read again until it holds, for at most ``timeout_s``. A run finished in this
    process may have its last records still on their way to the file: W&B's service writes the
    transaction log from its own process, and one suite run read a run folder before its last row
    was there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _history(run_folder)
        if until is None or until(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _history(run_folder: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(run_folder, "run-*.wandb"))
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
