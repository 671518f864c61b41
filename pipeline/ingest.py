"""Download a URL table into webdataset shards on Ray, composed from img2dataset's parts.

    urls (schemas.URL_TABLE, already filtered)
      │  img2dataset.reader.Reader          one arrow file per shard of ``samples_per_shard`` rows
      ▼
    ray_download tasks                      img2dataset.distributor's Ray task, one per shard,
      │  WebDownloader (ShardWorker)        at most ``processes`` at once, failed shards retried;
      │                                     fetch_url: transient failures retried with backoff,
      │                                     X-Robots-Tag opt-outs honoured, bodies size-capped
      │  pipeline.images.ImageResizer       any browser image format, upright, bombs refused,
      │                                     an HTML body (not_an_image) told from a broken image
      │  AtomicWebDatasetWriter             a shard's tar appears whole or not at all
      ▼
    <output>/00000.tar 00000.parquet 00000_stats.json …   manifest.parquet (schemas.SHARD_MANIFEST)

A shard is done when its ``<id>_stats.json`` exists (img2dataset's incremental rule): a
second run on the same output does only the shards that are not, and since img2dataset's
sample keys come from (shard id, row in shard) and the rows of a shard are fixed by the
URL table, a key never appears twice. Folder mode (``local_root``) packs image files that
are already on disk with the same writer, resizer and stats instead of downloading.

The output may be a folder or a URL prefix (``s3://bucket/shards/laion``): every file goes
through fsspec (``pipeline.storage``), img2dataset's own parts included; the per-shard arrow
files of ``_tmp/`` then live in the bucket too, so that workers on any node read them, while
a shard being written lives in a local temporary folder of its worker's node (``$TMPDIR``)
and is uploaded once, sorted by key. On object storage each object appears whole when its
upload completes; a shard's parquet is uploaded before its tar, its stats file after both. The output is guarded by
:func:`output_lock` (an flock, or a lease object on a bucket).

Failure reasons (manifest ``failures_by_reason``, summary): ``http_<code>``,
``not_an_image``, ``decode_error``, ``timeout``, ``connection_error``, ``ssl_error``,
``disallowed_by_robots``, ``image_too_small``, ``image_area_too_large``,
``aspect_ratio_too_large``, ``file_too_large``, ``file_not_found``, ``other``. The
transient ones (``TRANSIENT_REASONS``: timeout, connection_error, http_429, http_5xx) are
retried inside the shard with backoff; the rows of done shards that failed for reasons a
user names are downloaded again as a retry round of new shards (:func:`plan_retry_round`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from img2dataset.downloader import compute_key
from img2dataset.logger import CappedCounter
from img2dataset.reader import Reader
from img2dataset.writer import WebDatasetSampleWriter

from pipeline import storage
from pipeline.images import DEFAULT_MAX_IMAGE_AREA, RESIZE_MODES, ImageResizer, image_format  # noqa: F401 - image_format re-exported
from pipeline.outputs import atomic_file, write_json
from pipeline.shards import STATS_SUFFIX, write_in_key_order
from schemas import SHARD_MANIFEST, URL_TABLE, reason_counts, reason_rows, validate, write_table

log = logging.getLogger(__name__)

ADDITIONAL_COLUMNS = ["uid", "source", "split"]  # saved into each sample's json (uid = the URL table key)
TMP = "_tmp"

# ----------------------------------------------------------------------------- failure reasons

_HTTP_CODE = re.compile(r"HTTP Error (\d{3})")
_TIMEOUT = ("timed out", "timeout")
_CONNECTION = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "name or service not known",
    "temporary failure in name resolution",
    "no address associated",
    "nodename nor servname",
    "no route to host",
    "network is unreachable",
    "incompleteread",
    "broken pipe",
    "eof occurred",
)
# reasons named without an HTTP status; http_<code> (http_404) and http_<digit>xx (http_5xx) name HTTP statuses
REASONS = (
    "not_an_image", "decode_error", "timeout", "connection_error", "ssl_error", "disallowed_by_robots",
    "image_too_small", "image_area_too_large", "aspect_ratio_too_large", "file_too_large", "file_not_found", "other",
)  # fmt: skip
# failures that may not happen again: retried within a run, with backoff; any other reason never is
TRANSIENT_REASONS = ("timeout", "connection_error", "http_429", "http_5xx")
# img2dataset's X-Robots-Tag directives that opt an image out of datasets
X_ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
_REASON_SPEC = re.compile(r"^http_(\d{3}|\dxx)$")


def classify_error(message: str) -> str:
    """The summary reason of an img2dataset error message (``http_404``, ``timeout``, ...)."""
    text = (message or "").strip()
    for prefix in ("not_an_image", "decode_error", "file_not_found"):
        if text.startswith(prefix):
            return prefix
    m = _HTTP_CODE.search(text)
    if m:
        return f"http_{m.group(1)}"
    low = text.lower()
    if any(t in low for t in _TIMEOUT):
        return "timeout"
    if "ssl" in low or "certificate" in low:
        return "ssl_error"
    if any(t in low for t in _CONNECTION):
        return "connection_error"
    if "x-robots-tag" in low:
        return "disallowed_by_robots"
    for known in ("image too small", "image area too large", "aspect ratio too large", "file too large"):
        if low.startswith(known):
            return known.replace(" ", "_")
    return "other"


def reason_matches(reason: str, spec: str) -> bool:
    """True when ``reason`` (``http_503``) is named by ``spec`` (``http_503``, ``http_5xx``)."""
    if spec.endswith("xx") and spec.startswith("http_"):
        return reason.startswith("http_") and len(reason) == 8 and reason[5] == spec[5]
    return reason == spec


def is_transient(reason: str) -> bool:
    return any(reason_matches(reason, spec) for spec in TRANSIENT_REASONS)


def check_reasons(specs) -> tuple[str, ...]:
    """``specs`` as a tuple, each a known reason or an HTTP status (``http_404``, ``http_5xx``); ValueError otherwise."""
    bad = [s for s in specs if s not in REASONS and not _REASON_SPEC.match(s)]
    if bad:
        raise ValueError(f"unknown failure reason(s) {', '.join(bad)}: expected http_<code>, http_<digit>xx or one of {', '.join(REASONS)}")
    return tuple(specs)


def failures_by_reason(status_dict: dict[str, int]) -> Counter:
    """Group an img2dataset ``status_dict`` (message -> count) by reason, successes left out."""
    reasons: Counter = Counter()
    for message, count in status_dict.items():
        if message != "success":
            reasons[classify_error(message)] += count
    return reasons


# ----------------------------------------------------------------------------- fetching

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class FetchPolicy:
    """How one URL is fetched: time limit, retries of transient failures, size cap, opt-outs."""

    timeout: float = 10.0
    retries: int = 2  # further attempts after a transient failure (TRANSIENT_REASONS); never after another
    backoff_s: float = 1.0  # pause before retry n: backoff_s * 2**(n-1), or the server's Retry-After (both capped)
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # a longer body is refused (file_too_large), never held whole
    user_agent_token: str | None = None  # added to the User-Agent; X-Robots-Tag lines for another token are ignored
    disallowed_header_directives: tuple[str, ...] = X_ROBOTS_DIRECTIVES  # () honours none

    def __post_init__(self):
        if self.retries < 0 or not 0 <= self.backoff_s < math.inf or not 0 < self.timeout < math.inf or self.max_bytes < 1:
            raise ValueError("retries and backoff must be >= 0, timeout and max_bytes > 0 (finite numbers)")
        # X-Robots-Tag directives are compared lower-cased (img2dataset lower-cases the header's)
        object.__setattr__(self, "disallowed_header_directives", tuple(d.strip().lower() for d in self.disallowed_header_directives if d.strip()))

    def user_agent(self) -> str:
        if not self.user_agent_token:
            return USER_AGENT
        return f"{USER_AGENT} (compatible; {self.user_agent_token}; +https://github.com/rom1504/img2dataset)"


@dataclass
class Fetched:
    data: bytes | None
    error: str | None
    retries: int = 0  # attempts after the first


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        import email.utils

        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _fetch_once(url: str, policy: FetchPolicy) -> tuple[bytes | None, str | None, float | None]:
    """(body, None, None), or (None, error message, the server's Retry-After in seconds or None)."""
    import urllib.error
    import urllib.request

    from img2dataset.downloader import is_disallowed

    token = (policy.user_agent_token or "").strip().lower() or None
    try:
        request = urllib.request.Request(request_url(url), headers={"User-Agent": policy.user_agent()})
    except ValueError as err:  # UnicodeError (a host IDNA refuses) included; never quote the URL: its text would be classified
        return None, f"invalid URL ({type(err).__name__})", None
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as r:
            if policy.disallowed_header_directives and is_disallowed(r.headers, token, set(policy.disallowed_header_directives)):
                return None, "Use of image disallowed by X-Robots-Tag directive", None
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                return None, f"file too large: {int(length)} bytes > {policy.max_bytes} (max_image_bytes)", None
            data = r.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                return None, f"file too large: more than {policy.max_bytes} bytes (max_image_bytes)", None
            return data, None, None
    except urllib.error.HTTPError as err:
        return None, str(err), _retry_after(err.headers)
    except Exception as err:  # noqa: BLE001 - every network failure is a counted reason, as in img2dataset
        return None, str(err) or type(err).__name__, None


def request_url(url: str) -> str:
    """``url`` as a browser sends it: a non-ASCII host IDNA-encoded; spaces and non-ASCII
    characters of the path and query percent-encoded as UTF-8 (``%XX`` already there kept);
    the fragment, which is never sent, dropped. ``ValueError`` for a host IDNA refuses."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url.strip())
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        netloc = userinfo + at + host.encode("idna").decode("ascii") + colon + port
    safe = "/%:@!$&'()*+,;=-._~"
    return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=safe), urllib.parse.quote(parts.query, safe=safe + "?"), ""))


def fetch_url(url: str, policy: FetchPolicy, sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """Download ``url``; transient failures are retried up to ``policy.retries`` times with backoff."""
    import random

    retries = 0
    while True:
        data, error, retry_after = _fetch_once(url, policy)
        if error is None or retries >= policy.retries or not is_transient(classify_error(error)):
            return Fetched(data, error, retries)
        retries += 1
        pause = retry_after if retry_after is not None else policy.backoff_s * 2 ** (retries - 1) * random.uniform(0.5, 1.0)
        sleep(min(pause, MAX_BACKOFF_S))


# ----------------------------------------------------------------------------- shard workers


class AtomicWebDatasetWriter(WebDatasetSampleWriter):
    """img2dataset's webdataset writer, writing under ``<output>/_tmp`` (on object storage: a
    local temporary folder, so that the shard is uploaded once and never read back); on close
    the shard is copied into place with its samples in key order
    (:func:`pipeline.shards.write_in_key_order`).

    The samples arrive in the order the download threads finish, which differs from run
    to run; the published tar and parquet hold them sorted by key, so that the same URL
    table gives the same shards. A crash leaves no half-written ``<id>.tar`` that looks
    whole: each file appears whole (a rename on a disk, one upload on object storage),
    the parquet before the tar; the stats file that marks a shard done is written by the
    shard worker after ``close``.
    """

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        self.final_folder = output_folder
        self.shard_name = f"{shard_id:0{oom_shard_count}d}"
        if storage.is_url(output_folder):
            self.work_folder = tempfile.mkdtemp(prefix=f"nxtp-writing-{self.shard_name}-")
        else:
            self.work_folder = storage.join(output_folder, TMP, f"writing-{self.shard_name}-{uuid.uuid4().hex[:8]}")
            storage.makedirs(self.work_folder)
        super().__init__(shard_id, self.work_folder, save_caption, oom_shard_count, schema, encode_format)

    def discard(self) -> None:
        """Drop the unfinished shard (a shard task that failed; the job retries it)."""
        with contextlib.suppress(Exception):
            super().close()
        storage.remove(self.work_folder, recursive=True)

    def close(self):
        super().close()
        parquet, tar = f"{self.shard_name}.parquet", f"{self.shard_name}.tar"
        with storage.open_file(storage.join(self.work_folder, parquet), "rb") as f:
            table = pq.read_table(f)
        with atomic_file(storage.join(self.final_folder, parquet)) as f:  # the tar last: it never appears without its parquet
            pq.write_table(table.sort_by("key"), f)
        with atomic_file(storage.join(self.final_folder, tar)) as f:
            write_in_key_order(storage.join(self.work_folder, tar), f)
        storage.remove(self.work_folder, recursive=True)


class ShardWorker:
    """One shard task: its rows' bodies fetched by ``threads`` threads, decoded and written by this one.

    The interface of img2dataset's Downloader (``__call__((shard_id, arrow_file)) -> (ok,
    row)``), its sample keys (``compute_key``), json fields, per-shard parquet and stats, and
    its memory rule: at most ``2 x threads`` fetched bodies wait for the decoder, which
    holds one image at a time. Subclasses say how a body is fetched (:meth:`fetch`).
    """

    def __init__(self, sample_writer_class, resizer, output_folder, column_list, number_sample_per_shard, oom_shard_count, threads=1, compute_hash="sha256", encode_format="jpg"):  # fmt: skip
        self.sample_writer_class = sample_writer_class
        self.resizer = resizer
        self.output_folder = output_folder
        self.column_list = column_list
        self.number_sample_per_shard = number_sample_per_shard
        self.oom_shard_count = oom_shard_count
        self.threads = max(1, threads)
        self.compute_hash = compute_hash
        self.encode_format = encode_format

    def fetch(self, url: str) -> Fetched:
        raise NotImplementedError

    def __call__(self, row):
        try:
            self.write_shard(row)
            return True, row
        except Exception:  # noqa: BLE001 - like img2dataset's Downloader: reported, and the job retries the shard
            log.exception("shard %s failed", row[0])
            return False, row

    def _schema(self, schema: pa.Schema) -> pa.Schema:
        for name, typ in (("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())):
            schema = schema.append(pa.field(name, typ))
        for name in ("width", "height", "original_width", "original_height"):
            schema = schema.append(pa.field(name, pa.int32()))
        if self.compute_hash and self.compute_hash not in schema.names:
            schema = schema.append(pa.field(self.compute_hash, pa.string()))
        return schema

    def write_shard(self, row) -> None:
        from multiprocessing.pool import ThreadPool
        from threading import Event, Semaphore

        shard_id, shard_file = row
        start = time.time()
        with storage.open_file(shard_file, "rb") as f:
            df = pa.ipc.open_file(f).read_all()
        columns = df.select(self.column_list).to_pydict()
        rows = list(zip(*(columns[c] for c in self.column_list)))
        writer = self.sample_writer_class(shard_id, self.output_folder, True, self.oom_shard_count, self._schema(df.schema), self.encode_format)
        del df, columns
        oom_sample = math.ceil(math.log10(self.number_sample_per_shard))
        url_index = self.column_list.index("url")
        status = CappedCounter()
        successes = failed_download = failed_resize = retries = 0
        in_flight = Semaphore(self.threads * 2)  # bodies fetched but not yet decoded: the memory bound
        stop = Event()

        def jobs():
            for i, values in enumerate(rows):
                while not in_flight.acquire(timeout=0.5):
                    if stop.is_set():  # the loop below failed: let the pool's feeder end
                        return
                yield i, values[url_index]

        with _discard_on_error(writer), ThreadPool(self.threads) as pool, _set_on_error(stop):
            for i, fetched in pool.imap_unordered(lambda job: (job[0], self.fetch(job[1])), jobs()):
                try:
                    meta = dict(zip(self.column_list, rows[i]))
                    key = compute_key(i, shard_id, oom_sample, self.oom_shard_count)
                    meta.update(key=key, status=None, error_message=None, width=None, height=None, original_width=None, original_height=None)
                    if self.compute_hash:
                        meta[self.compute_hash] = None
                    retries += fetched.retries
                    img, error = None, fetched.error
                    if error is None:
                        img, width, height, original_width, original_height, error = self.resizer(io.BytesIO(fetched.data))
                        if error is None:
                            meta.update(width=width, height=height, original_width=original_width, original_height=original_height)
                            if self.compute_hash:
                                meta[self.compute_hash] = getattr(hashlib, self.compute_hash)(fetched.data).hexdigest()
                            meta["status"] = "success"
                            successes += 1
                            status.increment("success")
                        else:
                            meta.update(status="failed_to_resize", error_message=error)
                            failed_resize += 1
                            status.increment(error)
                    else:
                        meta.update(status="failed_to_download", error_message=error)
                        failed_download += 1
                        status.increment(error)
                    fetched.data = None
                    writer.write(img, key, meta.get("caption"), meta)
                finally:
                    in_flight.release()
            writer.close()  # in the block: a shard whose close fails leaves no work files either
        name = f"{shard_id:0{self.oom_shard_count}d}"
        stats = {
            "count": len(rows),
            "successes": successes,
            "failed_to_download": failed_download,
            "failed_to_resize": failed_resize,
            "download_retries": retries,
            "duration": time.time() - start,
            "start_time": start,
            "end_time": time.time(),
            "status_dict": dict(status.dump()),
        }
        write_json(storage.join(self.output_folder, f"{name}{STATS_SUFFIX}"), stats, indent=4)  # marks the shard done
        storage.remove(shard_file)


@contextlib.contextmanager
def _discard_on_error(writer) -> Iterator[None]:
    """A shard whose task fails leaves no work files behind (on a bucket they are on local disk)."""
    try:
        yield
    except BaseException:
        if hasattr(writer, "discard"):
            writer.discard()
        raise


@contextlib.contextmanager
def _set_on_error(event) -> Iterator[None]:
    try:
        yield
    except BaseException:
        event.set()
        raise


class WebDownloader(ShardWorker):
    """Shard worker for http(s) URLs (:func:`fetch_url` with ``policy``)."""

    def __init__(self, *args, policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def fetch(self, url: str) -> Fetched:
        return fetch_url(url, self.policy)


class LocalImagePacker(ShardWorker):
    """Shard worker for images already on disk: the ``url`` column holds file paths, each inside ``root``."""

    def __init__(self, *args, root: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.root = os.path.abspath(root) + os.sep  # the images are local files; the output may be a URL
        self.max_bytes = max_bytes

    def fetch(self, path: str) -> Fetched:
        if not os.path.abspath(path).startswith(self.root):
            return Fetched(None, f"file_not_found: outside {self.root}")
        try:
            if os.path.getsize(path) > self.max_bytes:
                return Fetched(None, f"file too large: {os.path.getsize(path)} bytes > {self.max_bytes} (max_image_bytes)")
            with open(path, "rb") as f:
                return Fetched(f.read(), None)
        except FileNotFoundError:
            return Fetched(None, "file_not_found")
        except OSError as e:
            return Fetched(None, f"other: {e.strerror}")


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ShardSettings:
    """How rows become shards; everything the shard workers need besides the rows."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    samples_per_shard: int = 1000
    threads: int = 32
    timeout: int = 10
    encode_quality: int = 95
    retries: int = 2  # of a transient failure, within the run (FetchPolicy)
    retry_backoff: float = 1.0  # seconds before the first retry, doubling
    max_image_area: int = DEFAULT_MAX_IMAGE_AREA  # pixels; a larger image is refused before it is decoded
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = X_ROBOTS_DIRECTIVES

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        for name in ("image_size", "samples_per_shard", "threads", "timeout", "max_image_area", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.policy()  # checks retries and backoff
        self.resizer()  # checks max_image_area against Pillow's own limit

    def policy(self) -> FetchPolicy:
        return FetchPolicy(
            timeout=self.timeout,
            retries=self.retries,
            backoff_s=self.retry_backoff,
            max_bytes=self.max_image_bytes,
            user_agent_token=self.user_agent_token,
            disallowed_header_directives=tuple(self.disallowed_header_directives),
        )

    def resizer(self) -> ImageResizer:
        return ImageResizer(self.image_size, self.resize_mode, self.max_image_area, self.encode_quality)


def shard_count(rows: int, samples_per_shard: int) -> int:
    return math.ceil(rows / samples_per_shard)


def shard_digits(shards: int) -> int:
    """Digits of a shard name: img2dataset's 5, more when there are more shards."""
    return max(5, len(str(max(shards - 1, 0))))


def _stats_files(output: str) -> list[str]:
    """The ``<id>_stats.json`` files in ``output`` (a folder or URL prefix), as paths or URLs, sorted."""
    fs, root = storage.fresh(output)
    if not fs.isdir(root):
        return []
    names = [posixpath.basename(p) for p in fs.ls(root, detail=False)]
    return sorted(storage.join(output, n) for n in names if n.endswith(STATS_SUFFIX) and n[: -len(STATS_SUFFIX)].isdigit())


def done_shards(output: str) -> set[int]:
    """Shard ids whose ``<id>_stats.json`` exists: img2dataset's rule for a finished shard."""
    return {int(storage.basename(path)[: -len(STATS_SUFFIX)]) for path in _stats_files(output)}


def read_stats(output: str, shard_id: int, digits: int) -> dict | None:
    """A done shard's stats, or None when it is not done."""
    try:
        return storage.read_json(storage.join(output, f"{shard_id:0{digits}d}{STATS_SUFFIX}"))
    except FileNotFoundError:
        return None


def drop_unreadable_stats(output: str) -> list[str]:
    """Remove stats files cut short by a crash (img2dataset writes them in place): their shards are redone."""
    dropped = []
    for path in _stats_files(output):
        try:
            stats = storage.read_json(path)
            if not {"count", "successes", "duration", "status_dict"} <= set(stats):
                raise ValueError("fields missing")
        except (ValueError, OSError) as e:
            log.warning("%s: unreadable shard stats (%s): the shard will be redone", path, e)
            storage.remove(path)
            dropped.append(path)
    return dropped


def check_urls(urls: pa.Table, local_root: str | None) -> None:
    """Refuse a table holding anything the shard workers must never fetch.

    Download mode: every URL is http(s) (urllib would read ``file://`` URLs from local
    disk). Folder mode: every path lies inside ``local_root``. The filters in
    ``pipeline.sources`` already drop such rows; this is the last gate before a worker.
    """
    validate(urls, URL_TABLE, where="url table")
    col = urls.column("url")
    if local_root is None:
        bad = pc.invert(pc.match_substring_regex(col, r"^(?i)https?://"))
        what = "a URL that is not http(s)"
    else:
        bad = pc.invert(pc.starts_with(col, os.path.abspath(local_root) + os.sep))
        what = f"a path outside {local_root}"
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise ValueError(f"url table row {i} (key {urls.column('key')[i].as_py()}) holds {what}: {col[i].as_py()!r}")


# ----------------------------------------------------------------------------- running


@dataclass
class Progress:
    """Reported after each shard that finishes (or fails for good)."""

    shards_done: int
    shards_total: int
    samples_done: int  # rows of done shards, this run and before
    successes: int  # samples written, this run and before
    samples_total: int


@dataclass
class IngestResult:
    output: str
    manifest: pa.Table  # schemas.SHARD_MANIFEST, one row per done shard
    shards_total: int
    shards_done_before: int  # done when this run started
    shards_done_now: list[int] = field(default_factory=list)  # finished by this run
    shards_failed: dict[int, str] = field(default_factory=dict)  # shard -> last error, retries spent
    retries: int = 0
    seconds: float = 0.0  # this run's shard phase, first submit to last result
    successes_now: int = 0  # samples written by this run
    download_retries: int = 0  # transient download failures retried inside the shards this run finished
    retry_round: int | None = None  # the retry round this run planned (--retry-failed), if any
    retried: dict = field(default_factory=dict)  # retry_accounting(): every round so far

    @property
    def images_per_s(self) -> float:
        return self.successes_now / self.seconds if self.seconds > 0 else 0.0


class OutputBusyError(RuntimeError):
    """Another run holds the output's lock."""


LOCK_FILE = ".ingest.lock"
LEASE_S = 120.0  # a bucket lock not renewed for this long was left by a killed run
RENEW_S = 20.0


@contextlib.contextmanager
def output_lock(output: str, lease_s: float = LEASE_S, renew_s: float = RENEW_S) -> Iterator[None]:
    """Hold ``<output>/.ingest.lock``: two runs never write one output at once.

    On a local or shared file system an flock, so a killed run releases it with its
    process. On object storage, which has no locks, a lease object: created with a
    conditional write (S3's ``If-None-Match: *``, which fails when the object exists),
    renewed every ``renew_s`` seconds by a thread of the holder (which checks that the
    object is still its own), removed at the end. A lease not renewed for ``lease_s``
    seconds (by the object's modification time) was left by a killed run and is taken over.
    """
    if storage.is_url(output):
        with _lease(storage.join(output, LOCK_FILE), output, lease_s, renew_s):
            yield
        return
    os.makedirs(output, exist_ok=True)
    fd = os.open(os.path.join(output, LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(f"{output}: another ingestion is writing to this output (lock {output}/{LOCK_FILE})") from None
        yield
    finally:
        os.close(fd)


def _create(fs, path: str, body: bytes) -> None:
    """Write ``path`` only if it does not exist (``FileExistsError`` otherwise): a conditional write where the
    filesystem has one (s3fs), else a check then a write, which two runs starting at the same instant can both pass."""
    try:
        fs.pipe_file(path, body, mode="create")
    except TypeError:  # a filesystem whose pipe_file takes no mode
        if fs.exists(path):
            raise FileExistsError(path) from None
        fs.pipe_file(path, body)


def _lease_age(fs, path: str) -> float:
    modified = fs.modified(path)
    return time.time() - modified.timestamp()


@contextlib.contextmanager
def _lease(url: str, output: str, lease_s: float, renew_s: float) -> Iterator[None]:
    fs, path = storage.filesystem(url)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": secrets.token_hex(8)}
    body = json.dumps(owner).encode()
    with storage.reported(output):
        try:
            _create(fs, path, body)
        except FileExistsError:
            fs.invalidate_cache(path)
            age = _lease_age(fs, path)
            if age < lease_s:
                held = fs.cat_file(path).decode(errors="replace")
                raise OutputBusyError(
                    f"{output}: another ingestion is writing to this output (lease {url}, renewed {age:.0f} s ago by "
                    f"{held}); a lease not renewed for {lease_s:.0f} s is taken over"
                ) from None
            log.warning("%s: taking over a lease not renewed for %.0f s (a killed run's)", url, age)
            fs.rm_file(path)
            _create(fs, path, body)  # a second run taking it over at the same moment fails here
    stop = threading.Event()
    lost: list[str] = []

    def renew() -> None:
        while not stop.wait(renew_s):
            try:
                fs.invalidate_cache(path)
                if fs.cat_file(path) != body:
                    lost.append(fs.cat_file(path).decode(errors="replace"))
                    return
                fs.pipe_file(path, body)
            except Exception as err:  # noqa: BLE001 - a renewal that fails is retried at the next period
                log.warning("%s: could not renew the lease: %s", url, err)

    thread = threading.Thread(target=renew, name="ingest-lease", daemon=True)
    thread.start()
    try:
        yield
        if lost:
            raise OutputBusyError(f"{output}: the lease {url} was taken over by {lost[0]} while this run held it")
    finally:
        stop.set()
        thread.join()
        if not lost:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)


def _load_attempts(path: str) -> dict[int, int]:
    try:
        return {int(k): int(v) for k, v in storage.read_json(path).items()}
    except FileNotFoundError:
        return {}


def build_manifest(output: str, shard_ids, attempts: dict[int, int], digits: int) -> pa.Table:
    """One row per done shard among ``shard_ids``, from its stats file (schemas.SHARD_MANIFEST)."""
    rows = []
    for shard_id in sorted(s for s in done_shards(output) if s in set(shard_ids)):
        stats = read_stats(output, shard_id, digits)
        if stats is None:
            continue
        reasons = failures_by_reason(stats.get("status_dict", {}))
        rows.append(
            {
                "shard": storage.join(output, f"{shard_id:0{digits}d}.tar"),
                "samples": int(stats["count"]),
                "successes": int(stats["successes"]),
                "failures": int(stats["count"]) - int(stats["successes"]),
                "failures_by_reason": reason_rows(reasons),
                "attempts": max(1, attempts.get(shard_id, 1)),
                "seconds": float(stats["duration"]),
            }
        )
    return pa.Table.from_pylist(rows, schema=SHARD_MANIFEST)


def _make_worker(output: str, settings: ShardSettings, column_list: list[str], digits: int, local_root: str | None):
    args = (AtomicWebDatasetWriter, settings.resizer(), output, column_list, settings.samples_per_shard, digits)
    if local_root is not None:
        return LocalImagePacker(*args, threads=settings.threads, root=local_root, max_bytes=settings.max_image_bytes)
    return WebDownloader(*args, threads=settings.threads, policy=settings.policy())


def _reader(table: str, settings: ShardSettings, skip: set[int], tmp: str) -> Reader:
    return Reader(table, "parquet", "url", "caption", None, None, list(ADDITIONAL_COLUMNS), settings.samples_per_shard, skip, tmp)


def run_ingest(
    urls: pa.Table,
    output: str,
    settings: ShardSettings,
    *,
    processes: int,
    max_shard_retries: int = 2,
    local_root: str | None = None,
    worker_env: dict[str, str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    manifest_every_s: float = 10.0,
    retry_failed: Sequence[str] = (),
) -> IngestResult:
    """Download (or pack) the rows of ``urls`` into shards under ``output``; Ray must be initialized.

    Shards already done are kept. The others run as img2dataset's ``ray_download`` task,
    at most ``processes`` at once (one CPU each); a shard that fails is retried up to
    ``max_shard_retries`` times. ``manifest.parquet`` is rewritten every
    ``manifest_every_s`` seconds and at the end, so that a killed run leaves a true one.
    ``worker_env`` is set in the workers' environment.

    ``retry_failed`` (reasons such as ``timeout``, ``http_5xx``): once every shard is done,
    the rows of done shards whose latest outcome is a failure with one of these reasons are
    downloaded again, as a retry round (:func:`plan_retry_round`) of new shards numbered
    after every existing one, so that their keys are new too. A round cut short by a crash
    is completed by the next run before any new round is planned.
    """
    import ray
    from img2dataset.distributor import ray_download

    check_urls(urls, local_root)
    retry_failed = check_reasons(retry_failed)
    output = output if storage.is_url(output) else os.path.abspath(output)
    tmp = storage.join(output, TMP)
    storage.makedirs(tmp)
    urls_path = storage.join(tmp, "download_list.parquet")
    download = urls.rename_columns(["uid" if n == "key" else n for n in urls.column_names])
    with storage.open_file(urls_path, "wb") as f:
        pq.write_table(download, f)

    shards = shard_count(urls.num_rows, settings.samples_per_shard)
    digits = shard_digits(shards)
    drop_unreadable_stats(output)
    batches = [ShardBatch(urls_path, 0, shards, urls.num_rows)] + load_retry_rounds(output)
    planned = {s for b in batches for s in b.ids}
    done = {s for s in done_shards(output) if s in planned}
    attempts_path = storage.join(output, "ingest_attempts.json")
    attempts = _load_attempts(attempts_path)
    result = IngestResult(output, build_manifest(output, planned, attempts, digits), shards, len(done))
    manifest_path = storage.join(output, "manifest.parquet")
    samples_done = sum(result.manifest.column("samples").to_pylist())
    successes = sum(result.manifest.column("successes").to_pylist())

    def report() -> None:
        if progress is not None:
            progress(Progress(len(done), len(planned), samples_done, successes, sum(b.rows for b in batches)))

    report()
    column_list = _reader(urls_path, settings, set(range(shards)), tmp).column_list
    worker = ray.put(_make_worker(output, settings, column_list, digits, local_root))
    options = {"num_cpus": 1, "max_retries": 0}
    if worker_env:
        options["runtime_env"] = {"env_vars": dict(worker_env)}
    task = ray_download.options(**options)
    if processes < 1:
        processes = max(1, int(ray.cluster_resources().get("CPU", 1)))
    files: dict[int, str] = {}

    def arrow_file(shard_id: int) -> str:
        if shard_id not in files or not storage.exists(files[shard_id]):
            batch = next(b for b in batches if shard_id in b.ids)
            files.update(batch.arrow_files(settings, {shard_id}, storage.join(tmp, f"batch-{batch.first}")))
        return files[shard_id]

    in_flight: dict = {}
    tries_now: Counter = Counter()
    start = time.time()

    def run(todo: list[int]) -> None:
        nonlocal samples_done, successes
        queue = list(todo)
        last_manifest = time.time()
        while queue or in_flight:
            while queue and len(in_flight) < processes:
                shard_id = queue.pop(0)
                attempts[shard_id] = attempts.get(shard_id, 0) + 1
                tries_now[shard_id] += 1
                write_json(attempts_path, {str(k): v for k, v in sorted(attempts.items())})
                in_flight[task.remote(worker, (shard_id, arrow_file(shard_id)))] = shard_id
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                shard_id = in_flight.pop(ref)
                try:
                    ok, _row = ray.get(ref)
                    error = "" if ok else "the shard worker raised (see the worker's traceback above)"
                except ray.exceptions.RayError as e:
                    ok, error = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                stats = read_stats(output, shard_id, digits) if ok else None
                if stats is not None:
                    done.add(shard_id)
                    result.shards_done_now.append(shard_id)
                    samples_done += int(stats["count"])
                    successes += int(stats["successes"])
                    result.successes_now += int(stats["successes"])
                    result.download_retries += int(stats.get("download_retries", 0))
                    result.shards_failed.pop(shard_id, None)
                    report()
                    continue
                error = error or "the shard worker returned without writing its stats file"
                if tries_now[shard_id] <= max_shard_retries:
                    result.retries += 1
                    log.warning("shard %d failed (attempt %d): %s; retrying", shard_id, tries_now[shard_id], error)
                    queue.append(shard_id)
                else:
                    result.shards_failed[shard_id] = error
                    log.error("shard %d failed %d time(s), giving up: %s", shard_id, tries_now[shard_id], error)
                    report()
            if time.time() - last_manifest > manifest_every_s:
                write_table(build_manifest(output, planned, attempts, digits), manifest_path, SHARD_MANIFEST)
                last_manifest = time.time()

    try:
        run(sorted(planned - done))
        if retry_failed and not result.shards_failed:
            batch = plan_retry_round(output, batches, done, retry_failed, settings.samples_per_shard, digits)
            if batch is not None:
                batches.append(batch)
                planned.update(batch.ids)
                result.retry_round = batch.round
                report()
                run(list(batch.ids))
        result.seconds = time.time() - start
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        result.manifest = build_manifest(output, planned, attempts, digits)
        result.retried = retry_accounting(batches, done, settings.samples_per_shard)
        write_table(result.manifest, manifest_path, SHARD_MANIFEST)
        if not in_flight:
            storage.remove(tmp, recursive=True)
    return result


# ----------------------------------------------------------------------------- retry rounds

RETRY_ROUNDS = "ingest_retries.json"
RETRY_DIR = "retries"


@dataclass
class ShardBatch:
    """Shards cut from one URL table, ``samples_per_shard`` rows each, with ids ``first`` .. ``first + shards - 1``.

    The main batch is the URL table (ids from 0); each retry round is a batch of its own,
    numbered after every shard planned before it, so its keys never meet an earlier key.
    """

    table: str  # parquet with the download columns (uid, url, caption, source, split[, previous_reason, previous_shard])
    first: int
    shards: int
    rows: int
    round: int = 0  # 0: the main batch
    reasons: tuple[str, ...] = ()

    @property
    def ids(self) -> range:
        return range(self.first, self.first + self.shards)

    def arrow_files(self, settings: ShardSettings, wanted: set[int], tmp: str) -> dict[int, str]:
        """The arrow file of each wanted shard (img2dataset's Reader; its chatter goes to the log)."""
        local = {s - self.first for s in wanted}
        storage.makedirs(tmp)
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            files = dict(_reader(self.table, settings, set(range(self.shards)) - local, tmp))
        for line in chatter.getvalue().splitlines():
            log.debug("img2dataset reader: %s", line)
        return {self.first + k: v for k, v in files.items()}

    def rows_of(self, shard_id: int, samples_per_shard: int) -> pa.Table:
        k = shard_id - self.first
        with storage.open_file(self.table, "rb") as f:
            return pq.read_table(f).slice(k * samples_per_shard, samples_per_shard)


def load_retry_rounds(output: str) -> list[ShardBatch]:
    """The retry rounds planned in ``output`` so far (``ingest_retries.json``), in order."""
    try:
        rounds = storage.read_json(storage.join(output, RETRY_ROUNDS))
    except FileNotFoundError:
        return []
    return [
        ShardBatch(storage.join(output, r["urls"]), r["first_shard"], r["shards"], r["rows"], r["round"], tuple(r["reasons"]))
        for r in rounds
    ]


def latest_outcomes(output: str, shard_ids, digits: int) -> dict[str, dict]:
    """uid -> the row of its latest outcome (the done shard with the highest id holding it)."""
    latest: dict[str, dict] = {}
    columns = ["uid", "key", "url", "caption", "source", "split", "status", "error_message"]
    for shard_id in sorted(shard_ids):
        with storage.open_file(storage.join(output, f"{shard_id:0{digits}d}.parquet"), "rb") as f:
            table = pq.read_table(f, columns=columns)
        for row in table.to_pylist():
            row["shard"] = shard_id
            latest[row["uid"]] = row
    return latest


def plan_retry_round(output: str, batches: list[ShardBatch], done: set[int], reasons: Sequence[str], samples_per_shard: int, digits: int) -> ShardBatch | None:
    """Write the next retry round (its URL table and its line in ``ingest_retries.json``); None when no row qualifies.

    A row qualifies when its latest outcome, among the done shards, is a failure whose
    reason one of ``reasons`` names, and it is not waiting in a shard of an earlier round.
    """
    waiting = set()
    for batch in batches[1:]:
        for shard_id in batch.ids:
            if shard_id not in done:
                waiting.update(batch.rows_of(shard_id, samples_per_shard).column("uid").to_pylist())
    rows = []
    for row in latest_outcomes(output, done, digits).values():
        if row["status"] == "success" or row["uid"] in waiting:
            continue
        reason = classify_error(row["error_message"])
        if any(reason_matches(reason, spec) for spec in reasons):
            rows.append({**{c: row[c] for c in ("uid", "url", "caption", "source", "split")}, "previous_reason": reason, "previous_shard": row["shard"]})
    if not rows:
        return None
    rows.sort(key=lambda r: (r["previous_shard"], r["uid"]))
    number = len(batches)  # the main batch is round 0
    first = max(s for b in batches for s in b.ids) + 1
    name = posixpath.join(RETRY_DIR, f"round-{number:05d}.parquet")  # relative to the output, "/" on every system
    table = pa.Table.from_pylist(rows)
    with atomic_file(storage.join(output, name)) as f:
        pq.write_table(table, f)
    batch = ShardBatch(storage.join(output, name), first, shard_count(len(rows), samples_per_shard), len(rows), number, tuple(reasons))
    rounds = [
        {"round": b.round, "reasons": list(b.reasons), "first_shard": b.first, "shards": b.shards, "rows": b.rows, "urls": name_in(output, b.table)}
        for b in [*batches[1:], batch]
    ]
    write_json(storage.join(output, RETRY_ROUNDS), rounds)
    return batch


def name_in(output: str, path: str) -> str:
    """``path`` relative to ``output`` (both local paths or both URLs), with "/" separators."""
    if storage.is_url(output):
        return posixpath.relpath(path, output.rstrip("/"))
    return os.path.relpath(path, output).replace(os.sep, "/")


def retry_accounting(batches: list[ShardBatch], done: set[int], samples_per_shard: int) -> dict:
    """What the retry rounds did: rows retried in done shards, and the failures they replace (by reason)."""
    superseded: Counter = Counter()
    rows_done = 0
    for batch in batches[1:]:
        for shard_id in batch.ids:
            if shard_id in done:
                rows = batch.rows_of(shard_id, samples_per_shard)
                rows_done += rows.num_rows
                superseded.update(rows.column("previous_reason").to_pylist())
    return {
        "rounds": len(batches) - 1,
        "rows": sum(b.rows for b in batches[1:]),
        "rows_done": rows_done,
        "superseded": dict(sorted(superseded.items())),
        "retry_shards": sorted(s for b in batches[1:] for s in b.ids),
    }


# ----------------------------------------------------------------------------- summary


def summarize(
    *,
    source: str,
    input_path: str,
    output: str,
    rows_read: int,
    url_rows: int,
    skipped: Counter,
    filtered: Counter,
    examples: dict[str, str],
    selected: int,
    result: IngestResult,
) -> dict:
    """Every count of a run, machine-readable (``ingest_summary.json``).

    ``url_rows = sum(filtered) + not_selected + selected`` and
    ``selected = downloaded + sum(failed) + pending``: a row counts once, by its latest
    outcome (a failure that a retry round downloaded again counts only there).
    """
    manifest = result.manifest
    retried = result.retried or {"rounds": 0, "rows": 0, "rows_done": 0, "superseded": {}, "retry_shards": []}
    failed: Counter = Counter()
    for reasons in manifest.column("failures_by_reason").to_pylist():
        failed.update(reason_counts(reasons))
    failed.subtract(retried["superseded"])
    failed = +failed
    downloaded = sum(manifest.column("successes").to_pylist())
    processed = sum(manifest.column("samples").to_pylist()) - retried["rows_done"]
    return {
        "source": source,
        "input": input_path,
        "output": output,
        "rows_read": rows_read,
        "skipped_reading": dict(sorted(skipped.items())),
        "url_rows": url_rows,
        "filtered": dict(sorted(filtered.items())),
        "examples": dict(sorted(examples.items())),
        "not_selected": url_rows - sum(filtered.values()) - selected,
        "selected": selected,
        "downloaded": downloaded,
        "failed": dict(sorted(failed.items(), key=lambda kv: (-kv[1], kv[0]))),
        "pending": selected - processed,
        "shards": {
            "total": result.shards_total + len(retried["retry_shards"]),
            "done": manifest.num_rows,
            "done_before": result.shards_done_before,
            "done_this_run": len(result.shards_done_now),
            "failed": {str(k): v for k, v in sorted(result.shards_failed.items())},
            "retries_this_run": result.retries,
        },
        "download_retries_this_run": result.download_retries,
        "retry_rounds": {
            "rounds": retried["rounds"],
            "planned_this_run": result.retry_round,
            "rows": retried["rows"],
            "rows_done": retried["rows_done"],
            "replaced_failures": retried["superseded"],
        },
        "this_run": {
            "downloaded": result.successes_now,
            "seconds": round(result.seconds, 3),
            "images_per_s": round(result.images_per_s, 2),
        },
    }


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.items()) if counter else "-"


def format_summary(s: dict) -> str:
    """The human summary printed at the end of a run."""
    pct = 100.0 * s["downloaded"] / s["selected"] if s["selected"] else 0.0
    shards = s["shards"]
    lines = [
        f"ingestion summary: {s['source']} {s['input']} -> {s['output']}",
        f"  input rows   {s['rows_read']:>10}   skipped while reading: {_counts(s['skipped_reading'])}",
        f"  urls         {s['url_rows']:>10}",
        f"  filtered     {sum(s['filtered'].values()):>10}   {_counts(s['filtered'])}",
        f"  not selected {s['not_selected']:>10}   (--limit / --fraction)",
        f"  selected     {s['selected']:>10}",
        f"  downloaded   {s['downloaded']:>10}   {pct:.1f}% of selected",
        f"  failed       {sum(s['failed'].values()):>10}   {_counts(s['failed'])}",
        f"  pending      {s['pending']:>10}   (rows of shards not done: re-run the same command)",
        f"  shards       {shards['done']:>10} / {shards['total']} done ({shards['done_before']} before this run), "
        f"{len(shards['failed'])} failed after retries, {shards['retries_this_run']} retries",
        f"  retried      {s['download_retries_this_run']:>10}   transient download failures retried in this run's shards",
        f"  speed        {s['this_run']['images_per_s']:>10.1f}   images/s this run "
        f"({s['this_run']['downloaded']} images in {s['this_run']['seconds']:.1f} s)",
    ]
    rounds = s["retry_rounds"]
    if rounds["rounds"]:
        lines.append(
            f"  re-fetched   {rounds['rows_done']:>10}   failed rows downloaded again in {rounds['rounds']} retry round(s) "
            f"(was: {_counts(rounds['replaced_failures'])})"
        )
    for reason, example in s["examples"].items():
        lines.append(f"  e.g. {reason}: {example}")
    return "\n".join(lines)
