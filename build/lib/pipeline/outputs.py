"""Outputs that appear whole or not at all: the one place for atomic writes of files and folders.

Files (:func:`atomic_file`, :func:`write_bytes`, :func:`write_json`): on a local disk the
data goes to a hidden temporary sibling (``.<name>.tmp-<pid>-<random>``) that is renamed
onto the path when complete, so a reader never sees half a file and a crash leaves only
the hidden temporary. On object storage (an fsspec URL such as ``s3://``) an object is
written in one upload and becomes visible only when the upload completes, which is the
same guarantee.

Folders (:func:`staged_output`): a job writes into a hidden temporary sibling folder and
renames it onto the output when everything is written. A previous output is replaced
(moved aside first and put back if the rename fails); ``check`` may refuse to replace
what is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return os.path.abspath(path.removeprefix("file://"))


def _hidden_sibling(path: str, kind: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing (``mode`` "wb" or "w"); it appears whole when the block succeeds.

    The parent folder is created when missing. On an exception nothing appears at
    ``path`` (a previous file there is kept).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes with mode 'wb' or 'w', not {mode!r}")
    path = os.fspath(path)
    if _is_url(path):
        import fsspec

        with fsspec.open(path, mode) as f:
            yield f
        return
    path = _local(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _hidden_sibling(path, "tmp")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, data: Any, **dump_args: Any) -> None:
    """``data`` as indented JSON with a final newline (``dump_args`` go to ``json.dump``)."""
    with atomic_file(path, "w") as f:
        json.dump(data, f, **{"indent": 2, **dump_args})
        f.write("\n")


def check_replaceable(output: str, is_own: Callable[[str], bool], refusal: str) -> None:
    """Raise ``FileExistsError`` unless ``output`` is absent, empty, or ``is_own(output)``.

    ``refusal`` says what the folder lacks, e.g. "is not a labels output (no summary.json)".
    """
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise FileExistsError(f"{output}: exists and is not a folder; choose another output")
    if os.listdir(output) and not is_own(output):
        raise FileExistsError(f"{output}: exists and {refusal}; refusing to replace it, choose another output")


@contextlib.contextmanager
def staged_output(output: str, check: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a hidden temporary sibling of ``output``; when the block succeeds, rename it onto ``output``.

    ``check(output)`` raises when ``output`` may not be replaced; it runs before the block
    and again before the rename (None: anything there is replaced). On an exception the
    temporary folder is removed; a killed process leaves only a hidden ``.<name>.tmp-*``
    folder, never a half-written output. A replaced output is moved aside first and put
    back if the rename fails.
    """
    check = check or (lambda path: None)
    output = _local(output)
    parent = os.path.dirname(output)
    check(output)
    os.makedirs(parent, exist_ok=True)
    tmp = _hidden_sibling(output, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        check(output)
        if os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)
        if os.path.exists(output):
            old = _hidden_sibling(output, "old")
            os.rename(output, old)
            try:
                os.rename(tmp, output)
            except BaseException:
                os.rename(old, output)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
