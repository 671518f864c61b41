"""Download a URL table into webdataset shards on Ray, composed from img2dataset's parts.

    urls (schemas.URL_TABLE, already filtered)
      │  img2dataset.reader.Reader          one arrow file per shard of ``samples_per_shard`` rows
      ▼
    ray_download tasks                      img2dataset.distributor's Ray task, one per shard,
      │  img2dataset.downloader.Downloader  at most ``processes`` at once, failed shards retried
      │  ClassifyingResizer                 tells an HTML body (not_an_image) from a broken image
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
files of ``_tmp/`` then live in the bucket too, so that workers on any node read them. On
object storage each object appears whole when its upload completes; a shard's parquet is
moved into place before its tar, its stats file after both. The output is guarded by
:func:`output_lock` (an flock, or a lease object on a bucket).

Failure reasons (manifest ``failures_by_reason``, summary): ``http_<code>``,
``not_an_image``, ``decode_error``, ``timeout``, ``connection_error``, ``ssl_error``,
``disallowed_by_robots``, ``image_too_small``, ``image_area_too_large``,
``aspect_ratio_too_large``, ``file_not_found``, ``other``.
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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader, compute_key
from img2dataset.logger import CappedCounter, write_stats
from img2dataset.reader import Reader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter

from pipeline import storage
from pipeline.outputs import write_json
from schemas import SHARD_MANIFEST, URL_TABLE, validate, write_table

log = logging.getLogger(__name__)

ADDITIONAL_COLUMNS = ["uid", "source", "split"]  # saved into each sample's json (uid = the URL table key)
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
STATS_SUFFIX = "_stats.json"
TMP = "_tmp"

# ----------------------------------------------------------------------------- failure reasons

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (b"BM", "bmp"),
)
_FTYP_IMAGES = {b"avif", b"avis", b"heic", b"heix", b"hevc", b"mif1", b"msf1"}


def image_format(head: bytes) -> str | None:
    """The raster image format announced by a body's first bytes, or None when it announces none."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_IMAGES:
        return "heif"
    return None


def _body_kind(head: bytes) -> str:
    text = head.lstrip().lower()
    if not head:
        return "empty"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "html"
    if b"<svg" in text:
        return "svg"
    if text.startswith((b"<?xml", b"<")):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "json"
    return "unknown"


class ClassifyingResizer(Resizer):
    """img2dataset's Resizer, but an undecodable body says why.

    The stock Resizer answers "Image decoding error" both for an HTML page served with
    status 200 and for a truncated JPEG. Here the body's magic bytes decide:
    ``not_an_image: html`` when they announce no image format, ``decode_error: jpeg`` when
    they announce one that did not decode.
    """

    def __call__(self, img_stream, blurring_bbox_list=None):
        out = super().__call__(img_stream, blurring_bbox_list)
        error = out[-1]
        if error is None or not (error == "Image decoding error" or "buf.empty()" in error):
            return out
        img_stream.seek(0)
        head = img_stream.read(64)
        fmt = image_format(head)
        reason = f"decode_error: {fmt}" if fmt else f"not_an_image: {_body_kind(head)}"
        return (*out[:-1], reason)


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
    for known in ("image too small", "image area too large", "aspect ratio too large"):
        if low.startswith(known):
            return known.replace(" ", "_")
    return "other"


def failures_by_reason(status_dict: dict[str, int]) -> Counter:
    """Group an img2dataset ``status_dict`` (message -> count) by reason, successes left out."""
    reasons: Counter = Counter()
    for message, count in status_dict.items():
        if message != "success":
            reasons[classify_error(message)] += count
    return reasons


# ----------------------------------------------------------------------------- shard workers


class AtomicWebDatasetWriter(WebDatasetSampleWriter):
    """img2dataset's webdataset writer, writing under ``<output>/_tmp`` and renaming on close.

    A crash leaves no half-written ``<id>.tar`` that looks whole; the stats file that
    marks a shard done is written by the Downloader after ``close``. On object storage
    the files are moved into place by server-side copies (each object appears whole),
    the parquet before the tar.
    """

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        self.final_folder = output_folder
        self.shard_name = f"{shard_id:0{oom_shard_count}d}"
        self.work_folder = storage.join(output_folder, TMP, f"writing-{self.shard_name}-{uuid.uuid4().hex[:8]}")
        storage.makedirs(self.work_folder)
        super().__init__(shard_id, self.work_folder, save_caption, oom_shard_count, schema, encode_format)

    def close(self):
        super().close()
        fs, work = storage.filesystem(self.work_folder)
        _, final = storage.filesystem(self.final_folder)
        for ext in ("parquet", "tar"):  # the tar last: it never appears without its parquet
            name = f"{self.shard_name}.{ext}"
            if storage.is_url(self.final_folder):
                fs.mv(posixpath.join(work, name), posixpath.join(final, name))
            else:
                os.replace(os.path.join(work, name), os.path.join(final, name))
        storage.remove(self.work_folder, recursive=True)


class LocalImagePacker:
    """Shard worker for images already on disk: img2dataset's Downloader without the network.

    Same interface (``__call__((shard_id, arrow_file)) -> (ok, row)``), same sample keys,
    json fields, per-shard parquet and stats; the ``url`` column holds file paths, each of
    which must lie inside ``root``.
    """

    def __init__(self, sample_writer_class, resizer, output_folder, column_list, number_sample_per_shard, oom_shard_count, root, compute_hash="sha256", encode_format="jpg"):  # fmt: skip
        self.sample_writer_class = sample_writer_class
        self.resizer = resizer
        self.output_folder = output_folder
        self.column_list = column_list
        self.number_sample_per_shard = number_sample_per_shard
        self.oom_shard_count = oom_shard_count
        self.root = os.path.abspath(root) + os.sep  # the images are local files; the output may be a URL
        self.compute_hash = compute_hash
        self.encode_format = encode_format

    def __call__(self, row):
        try:
            self.pack_shard(row)
            return True, row
        except Exception:  # noqa: BLE001 - like img2dataset's Downloader: reported, and the job retries the shard
            log.exception("shard %s failed", row[0])
            return False, row

    def _read(self, path: str) -> tuple[bytes | None, str | None]:
        if not os.path.abspath(path).startswith(self.root):
            return None, f"file_not_found: outside {self.root}"
        try:
            with open(path, "rb") as f:
                return f.read(), None
        except FileNotFoundError:
            return None, "file_not_found"
        except OSError as e:
            return None, f"other: {e.strerror}"

    def pack_shard(self, row) -> None:
        shard_id, shard_file = row
        start = time.time()
        with storage.open_file(shard_file, "rb") as f:
            df = pa.ipc.open_file(f).read_all()
        schema = df.schema
        for name, typ in (("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())):
            schema = schema.append(pa.field(name, typ))
        for name in ("width", "height", "original_width", "original_height"):
            schema = schema.append(pa.field(name, pa.int32()))
        if self.compute_hash:
            schema = schema.append(pa.field(self.compute_hash, pa.string()))
        columns = df.select(self.column_list).to_pydict()
        rows = list(zip(*(columns[c] for c in self.column_list)))
        writer = self.sample_writer_class(shard_id, self.output_folder, True, self.oom_shard_count, schema, self.encode_format)
        oom_sample = math.ceil(math.log10(self.number_sample_per_shard))
        status = CappedCounter()
        successes = failed_download = failed_resize = 0
        for i, values in enumerate(rows):
            meta = dict(zip(self.column_list, values))
            key = compute_key(i, shard_id, oom_sample, self.oom_shard_count)
            meta.update(key=key, status=None, error_message=None, width=None, height=None, original_width=None, original_height=None)
            if self.compute_hash:
                meta[self.compute_hash] = None
            data, error = self._read(meta["url"])
            img = None
            if error is None:
                img, width, height, original_width, original_height, error = self.resizer(io.BytesIO(data))
                if error is None:
                    meta.update(width=width, height=height, original_width=original_width, original_height=original_height)
                    if self.compute_hash:
                        meta[self.compute_hash] = getattr(hashlib, self.compute_hash)(data).hexdigest()
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
            writer.write(img, key, meta.get("caption"), meta)
        writer.close()
        write_stats(self.output_folder, shard_id, len(rows), successes, failed_download, failed_resize, start, time.time(), status, self.oom_shard_count)
        storage.remove(shard_file)


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

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        for name in ("image_size", "samples_per_shard", "threads", "timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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


def build_manifest(output: str, shards: int, attempts: dict[int, int]) -> pa.Table:
    """One row per done shard, from its stats file (schemas.SHARD_MANIFEST)."""
    digits = shard_digits(shards)
    rows = []
    for shard_id in sorted(s for s in done_shards(output) if s < shards):
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
                "failures_by_reason": sorted(reasons.items()),
                "attempts": max(1, attempts.get(shard_id, 1)),
                "seconds": float(stats["duration"]),
            }
        )
    return pa.Table.from_pylist(rows, schema=SHARD_MANIFEST)


def _make_worker(output: str, settings: ShardSettings, column_list: list[str], digits: int, local_root: str | None):
    resizer = ClassifyingResizer(
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=settings.encode_quality,
        encode_format="jpg",
    )
    if local_root is not None:
        return LocalImagePacker(AtomicWebDatasetWriter, resizer, output, column_list, settings.samples_per_shard, digits, local_root)
    return Downloader(
        sample_writer_class=AtomicWebDatasetWriter,
        resizer=resizer,
        thread_count=settings.threads,
        save_caption=True,
        extract_exif=False,
        output_folder=output,
        column_list=column_list,
        timeout=settings.timeout,
        number_sample_per_shard=settings.samples_per_shard,
        oom_shard_count=digits,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=None,
        disallowed_header_directives={"noai", "noimageai", "noindex", "noimageindex"},
    )


def _reader(urls_path: str, output: str, settings: ShardSettings, skip: set[int]) -> Reader:
    return Reader(
        urls_path,
        "parquet",
        "url",
        "caption",
        None,
        None,
        list(ADDITIONAL_COLUMNS),
        settings.samples_per_shard,
        skip,
        storage.join(output, TMP),
    )


def _shard_files(urls_path: str, output: str, settings: ShardSettings, shards: int, wanted: set[int]) -> dict[int, str]:
    """Write the arrow file of each wanted shard with img2dataset's Reader (its chatter goes to the log)."""
    if not wanted:
        return {}
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        files = dict(_reader(urls_path, output, settings, set(range(shards)) - wanted))
    for line in chatter.getvalue().splitlines():
        log.debug("img2dataset reader: %s", line)
    return files


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
) -> IngestResult:
    """Download (or pack) the rows of ``urls`` into shards under ``output``; Ray must be initialized.

    Shards already done are kept. The others run as img2dataset's ``ray_download`` task,
    at most ``processes`` at once (one CPU each); a shard that fails is retried up to
    ``max_shard_retries`` times. ``manifest.parquet`` is rewritten every
    ``manifest_every_s`` seconds and at the end, so that a killed run leaves a true one.
    ``worker_env`` is set in the workers' environment.
    """
    import ray
    from img2dataset.distributor import ray_download

    check_urls(urls, local_root)
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
    done = {s for s in done_shards(output) if s < shards}
    attempts_path = storage.join(output, "ingest_attempts.json")
    attempts = _load_attempts(attempts_path)
    result = IngestResult(output, build_manifest(output, shards, attempts), shards, len(done))
    manifest_path = storage.join(output, "manifest.parquet")
    todo = sorted(set(range(shards)) - done)
    samples_done = sum(result.manifest.column("samples").to_pylist())
    successes = sum(result.manifest.column("successes").to_pylist())

    def report() -> None:
        if progress is not None:
            progress(Progress(len(done), shards, samples_done, successes, urls.num_rows))

    report()
    if not todo:
        write_table(result.manifest, manifest_path, SHARD_MANIFEST)
        storage.remove(tmp, recursive=True)
        return result

    files = _shard_files(urls_path, output, settings, shards, set(todo))
    column_list = _reader(urls_path, output, settings, set(range(shards))).column_list
    worker = ray.put(_make_worker(output, settings, column_list, digits, local_root))
    options = {"num_cpus": 1, "max_retries": 0}
    if worker_env:
        options["runtime_env"] = {"env_vars": dict(worker_env)}
    task = ray_download.options(**options)
    if processes < 1:
        processes = max(1, int(ray.cluster_resources().get("CPU", 1)))

    queue = list(todo)
    in_flight: dict = {}
    tries_now: Counter = Counter()
    last_manifest = start = time.time()
    try:
        while queue or in_flight:
            while queue and len(in_flight) < processes:
                shard_id = queue.pop(0)
                if shard_id not in files or not storage.exists(files[shard_id]):
                    files.update(_shard_files(urls_path, output, settings, shards, {shard_id}))
                attempts[shard_id] = attempts.get(shard_id, 0) + 1
                tries_now[shard_id] += 1
                write_json(attempts_path, {str(k): v for k, v in sorted(attempts.items())})
                in_flight[task.remote(worker, (shard_id, files[shard_id]))] = shard_id
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
                write_table(build_manifest(output, shards, attempts), manifest_path, SHARD_MANIFEST)
                last_manifest = time.time()
        result.seconds = time.time() - start
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        result.manifest = build_manifest(output, shards, attempts)
        write_table(result.manifest, manifest_path, SHARD_MANIFEST)
        if not in_flight:
            storage.remove(tmp, recursive=True)
    return result


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
    ``selected = downloaded + sum(failed) + pending``.
    """
    manifest = result.manifest
    failed: Counter = Counter()
    for reasons in manifest.column("failures_by_reason").to_pylist():
        failed.update(dict(reasons))
    downloaded = sum(manifest.column("successes").to_pylist())
    processed = sum(manifest.column("samples").to_pylist())
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
            "total": result.shards_total,
            "done": manifest.num_rows,
            "done_before": result.shards_done_before,
            "done_this_run": len(result.shards_done_now),
            "failed": {str(k): v for k, v in sorted(result.shards_failed.items())},
            "retries_this_run": result.retries,
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
        f"  speed        {s['this_run']['images_per_s']:>10.1f}   images/s this run "
        f"({s['this_run']['downloaded']} images in {s['this_run']['seconds']:.1f} s)",
    ]
    for reason, example in s["examples"].items():
        lines.append(f"  e.g. {reason}: {example}")
    return "\n".join(lines)
