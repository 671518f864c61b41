"""Outputs that appear whole or not at all: the one place for atomic writes of files and folders.

Files (:func:`atomic_file`, :func:`write_bytes`, :func:`write_json`): on a local disk the
data goes to a hidden temporary sibling (``.<name>.tmp-<pid>-<random>``) that is renamed
onto the path when complete, so a reader never sees half a file and a crash leaves only
the hidden temporary. On object storage (an fsspec URL such as ``s3://``) an object is
written in one upload and becomes visible only when the upload completes, which is the
same guarantee.

Folders (:func:`staged_output`): a job writes into a hidden temporary sibling
(``.<name>.tmp-<pid>-<random>``) and publishes it when everything is written:

- on a local disk (or a shared file system) by renaming it onto the output: a previous
  output is moved aside first and put back if the rename fails;
- on object storage, which has no rename of a prefix, by copying its objects into place
  (server-side copies) and then writing the marker object ``<output>/_SUCCESS`` (JSON:
  every file of the output with its size). Before the copy a previous output loses its
  marker, then its objects. So "atomic" there means: an output is whole exactly when its
  ``_SUCCESS`` exists, and readers look for it (:func:`require_published`); a job killed
  while publishing leaves a prefix without ``_SUCCESS``, which readers refuse and no job
  replaces (:func:`check_replaceable`), naming the URL.

On a local disk the rename is the guarantee: no marker is written, none is required.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from pipeline import storage

MARKER = "_SUCCESS"


class UnpublishedOutputError(FileNotFoundError):
    """An output on object storage has no ``_SUCCESS`` marker: it is not whole (the message names it)."""


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
    if storage.is_url(path):
        # one upload, visible when complete; an exception inside the block aborts it
        fs, p = storage.filesystem(path)
        with storage.reported(path), fs.open(p, mode) as f:
            yield f
        return
    path = storage.local_path(path)
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


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, data: Any, **dump_args: Any) -> None:
    """``data`` as indented JSON with a final newline (``dump_args`` go to ``json.dump``)."""
    with atomic_file(path, "w") as f:
        json.dump(data, f, **{"indent": 2, **dump_args})
        f.write("\n")


# ----------------------------------------------------------------------------- folders


def _files(fs, root: str) -> dict[str, int]:
    """Relative path -> size of every file under ``root``."""
    root = root.rstrip("/")
    return {posixpath.relpath(p, root): int(info.get("size") or 0) for p, info in fs.find(root, detail=True).items()}


def is_published(output: str) -> bool:
    """True when ``output`` holds its ``_SUCCESS`` marker."""
    fs, p = storage.fresh(storage.join(output, MARKER))
    return fs.isfile(p)


def require_published(output: str, what: str = "output") -> None:
    """Raise :class:`UnpublishedOutputError` when ``output``, on object storage, holds no ``_SUCCESS`` marker.

    Local outputs are renamed into place whole, so they are not checked.
    """
    if storage.is_url(output) and not is_published(output):
        raise UnpublishedOutputError(
            f"{output}: not a published {what} (no {MARKER} marker): the job writing it was killed, or is still "
            f"running; run it again to write it whole"
        )


def check_replaceable(output: str, is_own: Callable[[str], bool], refusal: str) -> None:
    """Raise ``FileExistsError`` unless ``output`` is absent, empty, or ``is_own(output)``.

    ``refusal`` says what the folder lacks, e.g. "is not a labels output (no summary.json)".
    On object storage a prefix holding objects but no ``_SUCCESS`` marker is refused too:
    it is what a job killed while publishing leaves, and is never overwritten.
    """
    if storage.is_url(output):
        fs, root = storage.fresh(output)
        with storage.reported(output):
            if fs.isfile(root):
                raise FileExistsError(f"{output}: exists and is not a folder; choose another output")
            if not fs.isdir(root):
                return
            if not is_published(output):
                n = len(fs.find(root))
                raise FileExistsError(
                    f"{output}: holds {n} object(s) but no {MARKER} marker: a half-written output (a job writing it "
                    "was killed while publishing) or something else; nothing was overwritten: remove the prefix or "
                    "choose another output"
                )
        if not is_own(output):
            raise FileExistsError(f"{output}: exists and {refusal}; refusing to replace it, choose another output")
        return
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise FileExistsError(f"{output}: exists and is not a folder; choose another output")
    if os.listdir(output) and not is_own(output):
        raise FileExistsError(f"{output}: exists and {refusal}; refusing to replace it, choose another output")


@contextlib.contextmanager
def staged_output(output: str, check: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a hidden temporary sibling of ``output``; when the block succeeds, publish it as ``output``.

    ``check(output)`` raises when ``output`` may not be replaced; it runs before the block
    and again before publishing (None: anything there is replaced). On an exception the
    temporary folder is removed; a killed process leaves only a hidden ``.<name>.tmp-*``
    folder or prefix, never a half-written output. See the module docstring for how a
    folder is published on a local disk and on object storage.
    """
    check = check or (lambda path: None)
    if storage.is_url(output):
        with _staged_url(output.rstrip("/"), check) as tmp:
            yield tmp
        return
    output = storage.local_path(output)
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


@contextlib.contextmanager
def _staged_url(output: str, check: Callable[[str], None]) -> Iterator[str]:
    fs, root = storage.filesystem(output)
    with storage.reported(output):
        check(output)
        parent, name = posixpath.split(root)
        tmp_root = posixpath.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp = storage.url_of(fs, tmp_root)
    try:
        yield tmp
        with storage.reported(output):
            check(output)
            fs.invalidate_cache(tmp_root)
            files = _files(fs, tmp_root)
            if fs.exists(posixpath.join(root, MARKER)):
                fs.rm(posixpath.join(root, MARKER))  # from here on the previous output is no longer whole
            if fs.isdir(root):
                fs.rm(root, recursive=True)
            if files:  # server-side copies, run concurrently by fsspec's async filesystems
                names = sorted(files)
                fs.copy([posixpath.join(tmp_root, r) for r in names], [posixpath.join(root, r) for r in names])
            write_json(storage.join(output, MARKER), {"files": dict(sorted(files.items())), "published": time.time()})
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(tmp_root, recursive=True)


def copy_folder(src: str, dest: str, check: Callable[[str], None] | None = None) -> str:
    """Copy the local folder ``src`` to ``dest`` (a local path or URL) as one output, published whole
    (:func:`staged_output`; ``check`` as there). Returns ``dest``."""
    with staged_output(dest, check) as tmp:
        fs, root = storage.filesystem(tmp)
        for folder, _, names in os.walk(src):
            for name in sorted(names):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, src).replace(os.sep, "/")
                if storage.is_url(tmp):
                    fs.put_file(path, posixpath.join(root, rel))
                else:
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    shutil.copyfile(path, os.path.join(tmp, rel))
    return dest


def local_copy(url: str, cache: str, what: str = "output") -> str:
    """A local copy of the published output at ``url`` (a folder) under ``cache``; a local path is returned as is.

    The copy's folder is named by the URL and its ``_SUCCESS`` marker, so a republished
    output is fetched again; processes sharing ``cache`` fetch it once each at most and
    never replace a copy another may be reading.
    """
    if not storage.is_url(url):
        return url
    import hashlib

    require_published(url, what)
    marker = storage.read_bytes(storage.join(url, MARKER))
    dest = os.path.join(cache, hashlib.sha256(url.encode() + b"\0" + marker).hexdigest()[:20])
    if os.path.isdir(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    tmp = _hidden_sibling(dest, "tmp")
    fs, root = storage.filesystem(url)
    try:
        with storage.reported(url):
            names = sorted(json.loads(marker)["files"])
            for rel in names:
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            fs.get([posixpath.join(root, r) for r in names], [os.path.join(tmp, r) for r in names])
        with contextlib.suppress(OSError):  # another process put its copy there first: use that one
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
