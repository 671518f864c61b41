"""Paths are URLs: a local path, ``file://``, ``s3://``, ``gs://`` or ``memory://`` opens alike.

Every stage opens what it reads and writes through these helpers (fsspec underneath, the
library img2dataset, webdataset and Ray Data use too), so a local folder and a bucket
prefix behave the same. Credentials and endpoints never pass through this code: the
storage libraries read them where they always do, in every process that opens a URL:

- S3 and S3-compatible servers (s3fs / botocore, pyarrow): ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an instance role,
  ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a server other than AWS,
  ``AWS_DEFAULT_REGION``;
- any fsspec option as ``FSSPEC_<PROTOCOL>_<OPTION>`` (``FSSPEC_S3_ENDPOINT_URL``),
  fsspec's own configuration;
- GCS (gcsfs, installed separately): ``GOOGLE_APPLICATION_CREDENTIALS`` or the VM's account.

What a storage system refuses (no such bucket, no credentials, access denied) becomes a
:class:`StorageError` naming the URL and what to do (:func:`check_reachable`).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from typing import IO, Any

import fsspec
from braceexpand import braceexpand

_GLOB_CHARS = "*?["
BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs")  # URLs whose first path part is a bucket


class StorageError(OSError):
    """A storage system refused a URL (no such bucket, no credentials, access denied); the message names it."""


def is_url(path: str) -> bool:
    """True for a URL of a storage system (``s3://bucket/x``); a local path or ``file://`` is not one."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """A local path or ``file://`` URL as an absolute local path."""
    return os.path.abspath(path.removeprefix("file://"))


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) of a local path or URL."""
    return fsspec.core.url_to_fs(path)


def fresh(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """:func:`filesystem`, with its cached listings of ``path`` dropped: for listing what other processes wrote."""
    fs, p = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(p)
    return fs, p


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (a URL keeps its scheme and uses "/")."""
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path.rstrip(os.sep))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def isfile(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isfile(p)


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    """Create a local folder (and its parents); a URL's prefix needs no creating (and a bucket is never created)."""
    if not is_url(path):
        os.makedirs(local_path(path), exist_ok=True)


def remove(path: str, recursive: bool = False) -> None:
    """Remove a file (or, ``recursive``, a folder / prefix); a missing one is no error."""
    fs, p = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p, recursive=recursive)


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """``fsspec.open(path, mode).open()``: a file object to use in a ``with`` block."""
    return fsspec.open(path, mode, **kwargs).open()


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    return fs.cat_file(p)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside ``fs`` as the caller can open it again: local paths stay plain, others keep their protocol."""
    protocols = [fs.protocol] if isinstance(fs.protocol, str) else list(fs.protocol)
    return path if "file" in protocols else fs.unstrip_protocol(path)


def expand(patterns: str | Sequence[str], what: str = "file") -> list[str]:
    """Every file named by ``patterns`` (paths or URLs, each possibly a glob or a brace pattern), in order.

    Each pattern's matches are sorted; the patterns keep their order; a file named twice
    is listed once. Raises ``FileNotFoundError`` naming a pattern that matches nothing
    (or a brace-pattern file that does not exist).
    """
    found: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for one in braceexpand(pattern) if "{" in pattern else [pattern]:
            fs, p = fresh(one)
            if any(c in p for c in _GLOB_CHARS):
                matches = sorted(m for m in fs.glob(p) if fs.isfile(m))
                if not matches:
                    raise FileNotFoundError(f"{one}: matches no {what}")
                found += [url_of(fs, m) for m in matches]
            elif fs.isfile(p):
                found.append(one if is_url(one) else local_path(one))
            else:
                raise FileNotFoundError(f"{one}: no such {what}")
    return list(dict.fromkeys(found))


# ----------------------------------------------------------------------------- errors


def _bucket(url: str) -> str:
    fs, p = filesystem(url)
    return url_of(fs, p.split("/")[0])


def explain(url: str, err: BaseException) -> StorageError | None:
    """The :class:`StorageError` a storage failure on ``url`` means, or None when it is no storage refusal."""
    name = type(err).__name__
    text = str(err)
    scheme = url.split("://")[0] if is_url(url) else "file"
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError") or "credentials" in text.lower() and "unable to locate" in text.lower():
        return StorageError(
            f"{url}: no credentials for {scheme}:// ({text}); set them in the environment of every process that "
            "opens it (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role; "
            "see README 'On a cluster')"
        )
    if "bucket does not exist" in text.lower() or name == "NoSuchBucket":
        return StorageError(f"{url}: the bucket {_bucket(url)} does not exist (create it, or check the name and AWS_ENDPOINT_URL)")
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return StorageError(f"{url}: access denied ({text}); check the credentials and the bucket's policy")
    return None


@contextlib.contextmanager
def reported(url: str) -> Iterator[None]:
    """Turn a storage system's refusal inside the block into a :class:`StorageError` naming ``url``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        explained = explain(url, err)
        if explained is None:
            raise
        raise explained from err


def check_reachable(url: str) -> None:
    """Raise :class:`StorageError` when ``url``'s storage cannot be used: its bucket does not exist,
    there are no credentials, or access is denied. Local paths are not checked here."""
    if not is_url(url) or url.split("://")[0] not in BUCKET_SCHEMES:
        return
    fs, p = filesystem(url)
    bucket = p.split("/")[0]
    with reported(url):
        try:
            fs.ls(bucket, detail=False, refresh=True)  # exists() answers False for what it may not see; listing says why
        except FileNotFoundError as err:
            raise explain(url, err) or StorageError(f"{url}: the bucket {_bucket(url)} does not exist") from err
