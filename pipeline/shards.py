"""Webdataset shards: finding them, splitting member names, indexing and reading a tar.

One module for the rules every stage (labels, training, evaluation) follows, so that
they cannot drift apart.

Finding (:func:`find_shards`): a shard location is a folder, a glob (``/data/*.tar``), a
brace pattern (``/data/{00000..00329}.tar``), or a URL of any of these (``s3://``,
``gs://``, ``file://``, ``memory://``: every path goes through fsspec). A folder's shards
are its ``<name>.tar`` files, plus each ``<digits>.parquet`` (img2dataset's per-shard
table) whose tar is missing, so that the missing tar is reported rather than skipped.
A shard's name is its file name without ``.tar``; shards are sorted by name. A folder
still being written is refused (``ValueError``): when some of its shards have the
``<name>_stats.json`` that ingestion and curation write last, a tar without its own is
one whose run has not finished, and its samples may still change (a folder with no stats
file at all is another tool's and is read as it is).

Samples (:func:`split_member`): a tar member ``a/b.seg.jpg`` belongs to the sample with
key ``a/b`` (extension ``seg.jpg``), webdataset's rule; a sample is a run of adjacent
members sharing a key.

The rule for a damaged tar, the same in every stage. A tar is read from its start, member
by member; reading stops at the first defect, and what came before it is intact:

- truncated (a member runs past the end of the file, or the end-of-archive marker is
  missing) or corrupt (a header that does not parse): the samples wholly before the
  defect are intact; the sample the defect cuts and everything after it are lost;
- the members of one key are not adjacent (the key starts again later in the tar):
  a defect at the key's second run; the samples before it are intact;
- a tar that cannot be opened at all: a defect at its start, no sample.

Order (:func:`write_in_key_order`): every shard this project writes holds its samples
sorted by key, so that a stage reading a shard from its start sees the same stream on
every run, whatever order a writer's threads finished in.

:class:`TarIndex` / :class:`TarReader` give the intact samples and the defect
(``damage``, a reason naming the member); they never raise for a damaged tar. What each
stage does with a damaged shard:

- labels: the shard is unreadable (a label table must cover its whole shard): the job
  stops naming it, or with ``--skip-bad-shards`` counts it and writes no table for it;
- training: the intact samples train; the shard is counted in ``bad_shards`` each
  time it is read;
- evaluation: the intact samples are scored; every label-table key that is not among
  them is a row with the error ``unread`` naming the defect.

A missing label table (``<labels>/labels/<name>.parquet``, :func:`label_table_path`):
training counts the shard in ``missing_label_tables`` and skips its samples;
evaluation refuses to start, naming the shard (:func:`find_shards` with ``labels``).
A label table whose ``key`` or ``labels`` column is missing or of another type
(:func:`check_label_table`): training counts it in ``bad_label_tables`` and skips its
samples; evaluation refuses to start, naming the file and the column.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import fsspec
from braceexpand import braceexpand

LABELS_DIR = "labels"
_TAR_END = 2 * 512  # a tar ends with two zero blocks
# webdataset's rule (tariterators.base_plus_ext), without importing webdataset (which imports torch)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_GLOB = re.compile(r"[*?\[]")


class ShardReadError(RuntimeError):
    """A shard cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Shard:
    """One webdataset shard: its name ("00012") and files (paths or URLs); a missing file is None."""

    name: str
    tar: str | None
    parquet: str | None = None


# ----------------------------------------------------------------------------- finding


def _url(fs, path: str) -> str:
    """A path as the caller can open it again: local paths stay plain, others keep their protocol."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    return "file" in ([fs.protocol] if isinstance(fs.protocol, str) else list(fs.protocol))


def find_shards(location: str | Sequence[str], labels: str | None = None) -> list[Shard]:
    """Every shard at ``location`` (a folder, glob, brace pattern or URL, or a list of them), sorted by name.

    Raises ``FileNotFoundError`` naming what is missing: the location, a file a brace
    pattern names, or, when ``labels`` (a ``jobs.labels`` output) is given, the label
    table of any shard. Raises ``ValueError`` when two shards share a name.
    """
    locations = [location] if isinstance(location, str) else list(location)
    found: dict[str, Shard] = {}
    for loc in locations:
        for shard in _find_one(loc):
            if shard.name in found:
                raise ValueError(f"two shards are named {shard.name}: {found[shard.name].tar} and {shard.tar}")
            found[shard.name] = shard
    shards = [found[name] for name in sorted(found)]
    if labels is not None:
        fs, root = fsspec.core.url_to_fs(labels)
        if not fs.isdir(root):
            raise FileNotFoundError(f"{labels}: no such labels folder (jobs.labels writes it)")
        tables = posixpath.join(root.rstrip("/"), LABELS_DIR)
        present = {posixpath.basename(p) for p in fs.ls(tables, detail=False)} if fs.isdir(tables) else set()
        missing = [s.name for s in shards if f"{s.name}.parquet" not in present]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) have no label table, e.g. {label_table_path(labels, missing[0])} "
                f"(run jobs.labels on {location})"
            )
    return shards


def require_tars(found: Sequence[Shard]) -> None:
    """``FileNotFoundError`` naming the first shard found as a parquet without its tar (a stage that needs every tar)."""
    missing = [s for s in found if s.tar is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) have no tar, e.g. {missing[0].parquet}: its tar {missing[0].name}.tar is missing")


def _find_one(location: str) -> list[Shard]:
    fs, path = fsspec.core.url_to_fs(location)
    path = path.rstrip("/") or "/"
    if "{" in path:
        patterns = list(braceexpand(path))
    elif not _GLOB.search(path) and fs.isdir(path):
        return _folder_shards(fs, path, location)
    else:
        patterns = [path]
    tars: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        if _GLOB.search(pattern):
            tars += [p for p in fs.glob(pattern) if p.endswith(".tar")]
        elif fs.isfile(pattern):
            if not pattern.endswith(".tar"):
                raise ValueError(f"{_url(fs, pattern)}: not a webdataset shard (<name>.tar); name a shard, a folder of them, a glob or a brace pattern")
            tars.append(pattern)
        elif pattern == path:
            raise FileNotFoundError(f"{location}: no such folder or shard")
        else:
            missing.append(_url(fs, pattern))
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) named by {location} do not exist: {listed}")
    if not tars:
        raise FileNotFoundError(f"{location}: matches no webdataset shard (<name>.tar)")
    siblings: dict[str, set[str]] = {}
    for parent in {posixpath.dirname(t) for t in tars}:
        siblings[parent] = {posixpath.basename(p) for p in fs.ls(parent, detail=False)}
        _check_finished(fs, parent, [posixpath.basename(t).removesuffix(".tar") for t in tars if posixpath.dirname(t) == parent], siblings[parent])
    shards = []
    for tar in sorted(set(tars)):
        parent, base = posixpath.split(tar)
        name = base.removesuffix(".tar")
        parquet = posixpath.join(parent, f"{name}.parquet") if f"{name}.parquet" in siblings[parent] else None
        shards.append(Shard(name, _url(fs, tar), _url(fs, parquet) if parquet else None))
    return shards


def _folder_shards(fs, folder: str, location: str) -> list[Shard]:
    tars, parquets, files = {}, {}, set()
    for entry in fs.ls(folder, detail=True):
        if entry["type"] != "file":
            continue
        base = posixpath.basename(entry["name"].rstrip("/"))
        files.add(base)
        stem, dot, ext = base.rpartition(".")
        if dot and ext == "tar":
            tars[stem] = entry["name"]
        elif dot and ext == "parquet" and stem.isdigit():
            parquets[stem] = entry["name"]
    names = sorted(set(tars) | set(parquets))
    if not names:
        raise FileNotFoundError(f"{location}: holds no webdataset shard (<name>.tar)")
    _check_finished(fs, folder, list(tars), files)
    return [
        Shard(n, _url(fs, tars[n]) if n in tars else None, _url(fs, parquets[n]) if n in parquets else None) for n in names
    ]


STATS_SUFFIX = "_stats.json"  # what ingestion and curation write last for each shard (img2dataset's rule for a finished one)


def _check_finished(fs, folder: str, names: Sequence[str], files: Collection[str]) -> None:
    """``ValueError`` when ``folder`` holds shards of a run that has not finished: some of its shards have their
    ``<name>_stats.json`` (ingestion and curation write it last) and one of ``names`` has a tar without it, so
    that its samples may still change when the run is re-run (a folder with no stats file at all is another
    tool's, and is taken as it is)."""
    if not any(f.endswith(STATS_SUFFIX) for f in files):
        return
    unfinished = sorted(n for n in names if f"{n}{STATS_SUFFIX}" not in files)
    if unfinished:
        raise ValueError(
            f"{_url(fs, folder)}: {len(unfinished)} shard(s) have no {STATS_SUFFIX} beside their tar, e.g. {unfinished[0]}.tar: "
            "the ingestion or curation writing this folder has not finished (or was stopped); re-run it to complete the folder first"
        )


def location_name(location: str) -> str:
    """A short name for a shard location: the last folder of its path without a glob or brace
    pattern (``/data/coco_val/{00000..00009}.tar`` and ``s3://b/coco_val/`` -> ``coco_val``)."""
    parts = [p for p in fsspec.core.split_protocol(location)[1].split("/") if p]
    while parts and (_GLOB.search(parts[-1]) or "{" in parts[-1] or parts[-1].endswith(".tar")):
        parts.pop()
    return parts[-1] if parts else "shards"


def label_table_path(labels: str, shard: str) -> str:
    """Where ``jobs.labels`` writes the label table of shard ``shard`` under its output ``labels``."""
    return posixpath.join(labels.rstrip("/"), LABELS_DIR, f"{shard}.parquet")


def check_label_table(schema, where: str) -> None:
    """``SchemaError`` (a ``ValueError``) naming ``where`` and the column when a label table's
    ``key`` or ``labels`` column, the two every stage reads, is missing or not of
    ``schemas.LABEL_TABLE``'s type (a ``labels`` column of comma-joined strings, say), or
    when ``schema``'s metadata names another version of ``label_table``."""
    import pyarrow as pa

    from schemas import LABEL_TABLE
    from schemas.validate import validate

    wanted = pa.schema([LABEL_TABLE.field("key"), LABEL_TABLE.field("labels")], metadata=LABEL_TABLE.metadata)
    # the file's metadata comes along, so that a table of a newer schema version is refused by name
    validate(pa.schema([schema.field(n) for n in wanted.names if n in schema.names], metadata=schema.metadata), wanted, where=where)


def read_label_table(url: str, columns: Sequence[str] = ("key", "labels")):
    """``columns`` of the label table at ``url`` (a ``pyarrow.Table``), its ``key`` and ``labels``
    checked first (:func:`check_label_table`); the file is opened once."""
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f)
        check_label_table(table.schema_arrow, url)
        return table.read(columns=list(columns))


def check_labels_made_from(shard: Shard, labels: str, samples: int = 16) -> None:
    """``ValueError`` when ``shard``'s label table under ``labels`` was made from other samples:
    the captions it stored for the tar's first ``samples`` captioned samples are not theirs.

    Keys are per-shard counters in every ingestion (``00000000``...), so a label table of
    another dataset (the train labels beside the validation shards, say) matches by key
    alone; its captions do not. A missing table is left to the stage's own rule.
    """
    import pyarrow.parquet as pq

    from pipeline import storage

    if shard.tar is None:
        return
    url = label_table_path(labels, shard.name)
    if not storage.isfile(url):
        return
    fs, path = storage.filesystem(url)
    table = pq.read_table(path, columns=["key", "caption"], filesystem=fs)
    stored = dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    checked = 0
    for sample in TarReader(shard.tar, read=lambda ext: ext.lower() in ("txt", "json")):
        try:
            caption = sample_caption(sample.data)
        except ValueError:
            continue
        if caption is None or stored.get(sample.key) is None:
            continue
        if stored[sample.key] != caption:
            raise ValueError(
                f"{url} was not made from {shard.tar}: sample {sample.key}'s caption is {caption[:60]!r} in the tar "
                f"but {stored[sample.key][:60]!r} in the label table (the labels of other shards? run jobs.labels on these)"
            )
        checked += 1
        if checked >= samples:
            return


# ----------------------------------------------------------------------------- samples


def sample_caption(members: Mapping[str, bytes]) -> str | None:
    """A sample's caption as jobs.labels reads it: its ``txt`` member (UTF-8), else the
    ``caption`` field of its ``json`` member; None without either. ``members``: extension ->
    data; ``ValueError`` for a json member that does not parse."""
    members = {ext.lower(): data for ext, data in members.items()}
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace")
    if "json" in members:
        meta = json.loads(members["json"])
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return caption if isinstance(caption, str) else None
    return None


def ingested_samples(found: Sequence[Shard], labels: str | None = None) -> tuple[int, str]:
    """(samples, where the count came from) of the shards ``found``: the samples written into them.

    Read from each folder's ``manifest.parquet`` (jobs.ingest and jobs.curate write one: its
    ``successes`` per shard); a shard its folder's manifest does not list is counted from its
    label table's rows under ``labels`` (one row per sample, jobs.labels), else refused.
    """
    import pyarrow.parquet as pq

    from pipeline import storage

    by_folder: dict[str, dict[str, int]] = {}
    total, sources = 0, set()
    for shard in found:
        folder = storage.parent(shard.tar)
        if folder not in by_folder:
            manifest = storage.join(folder, "manifest.parquet")
            by_folder[folder] = {}
            if storage.isfile(manifest):
                fs, path = storage.filesystem(manifest)
                table = pq.read_table(path, columns=["shard", "successes"], filesystem=fs)
                for name, n in zip(table.column("shard").to_pylist(), table.column("successes").to_pylist()):
                    by_folder[folder][storage.basename(name)] = int(n)
        count = by_folder[folder].get(storage.basename(shard.tar))
        if count is not None:
            sources.add("manifest")
        elif labels is not None and storage.isfile(label_table_path(labels, shard.name)):
            fs, path = storage.filesystem(label_table_path(labels, shard.name))
            count = pq.read_metadata(path, filesystem=fs).num_rows
            sources.add("label tables")
        else:
            raise FileNotFoundError(f"{shard.tar}: not in its folder's manifest.parquet and no label table to count its samples")
        total += count
    return total, " and ".join(sorted(sources))


def split_member(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member, as webdataset splits it: ``a/b.seg.txt`` -> (``a/b``, ``seg.txt``)."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class TarSample:
    """One sample's members: extension -> (offset of its data in the tar, size); and their data when read."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)

    def first(self, extensions: Sequence[str]) -> str | None:
        """The first member (in tar order) whose lower-cased extension is one of ``extensions``."""
        return next((ext for ext in self.members if ext.lower() in extensions), None)


@dataclass
class TarIndex:
    """The intact samples of a tar, in tar order, and the defect that stopped the reading (None: whole)."""

    samples: list[TarSample]
    damage: str | None

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]


def index_tar(url: str) -> TarIndex:
    """Index a tar from its headers alone (no data is read); see the module docstring for damaged tars."""
    reader = TarReader(url, read=lambda ext: False)
    return TarIndex(list(reader), reader.damage)


class TarReader:
    """The intact samples of one tar, read once from start to end (module docstring: the rule).

    Iterating yields :class:`TarSample` objects holding the data of the members for which
    ``read(extension)`` is true (default: every member); after the iteration ``damage``
    says why the reading stopped early, or is None when the tar was whole.
    """

    def __init__(self, url: str, read: Callable[[str], bool] | None = None):
        self.url = url
        self.read = read or (lambda ext: True)
        self.damage: str | None = None

    def __iter__(self) -> Iterator[TarSample]:
        self.damage = None
        try:
            fs, path = fsspec.core.url_to_fs(self.url)
            size = fs.size(path)
            with fs.open(path, "rb") as f:
                yield from self._samples(f, size)
        except FileNotFoundError:
            self.damage = "no such file"
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            self.damage = f"not a readable tar ({type(err).__name__}: {err})"

    def _samples(self, f, size: int) -> Iterator[TarSample]:
        tar = tarfile.open(fileobj=f, mode="r:")
        current: TarSample | None = None
        seen: set[str] = set()
        while True:
            try:
                info = tar.next()  # a header that does not parse past the first stops here quietly
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                self.damage = f"truncated or corrupt tar: the header at byte {tar.offset} does not parse ({type(err).__name__}: {err})"
                return
            if info is None:
                break
            if not info.isreg():
                continue
            key, ext = split_member(info.name)
            if key is None:
                continue
            if current is None or current.key != key:
                if current is not None:
                    yield current  # a new key starts: the previous sample is complete
                    current = None
                if key in seen:
                    self.damage = f"the members of sample {key!r} are not adjacent (it starts again at {info.name})"
                    return
                current = TarSample(key)
                seen.add(key)
            if info.offset_data + info.size > size:
                self.damage = f"truncated tar: member {info.name} runs past the end of the file"
                return
            current.members[ext] = (info.offset_data, info.size)
            if self.read(ext):
                f.seek(info.offset_data)
                current.data[ext] = f.read(info.size)
        f.seek(tar.offset)
        tail = f.read(_TAR_END)
        if len(tail) < _TAR_END or tail.strip(b"\0"):
            self.damage = f"truncated or corrupt tar: no end-of-archive marker after byte {tar.offset}"
            return
        if current is not None:
            yield current


def write_in_key_order(src: str, dest: IO[bytes], keep: Collection[str] | None = None, allow_damage: bool = False) -> list[str]:
    """Copy the intact samples of the tar at ``src`` (those in ``keep`` when given) to ``dest``
    as a tar sorted by key, each sample's members in their order; return the keys written.
    A damaged ``src`` raises :class:`ShardReadError`, unless ``allow_damage`` (then the
    samples before the defect are copied).

    The copy's bytes depend only on the samples (USTAR headers, mtime 0, mode 0644), never
    on the order in which a writer happened to receive them: ingestion's download threads
    finish in any order, and a stage that reads a shard from its start (training, dedup)
    must see the same stream on every run. Memory: one member at a time.
    """
    index = index_tar(src)
    if index.damage is not None and not allow_damage:
        raise ShardReadError(f"{src}: {index.damage}")
    samples = sorted((s for s in index.samples if keep is None or s.key in keep), key=lambda s: s.key)
    fs, path = fsspec.core.url_to_fs(src)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=dest, mode="w|", format=tarfile.USTAR_FORMAT) as out:
        for sample in samples:
            for ext, (offset, size) in sample.members.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mode, info.mtime = size, 0o644, 0
                f.seek(offset)
                out.addfile(info, _Window(f, size))
    return [s.key for s in samples]


class _Window(io.RawIOBase):
    """The next ``size`` bytes of ``f`` as a file (tarfile copies a member's data from it)."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read(min(len(buf), self.left))
        if not data and self.left:
            raise EOFError("the tar ended inside a member")
        buf[: len(data)] = data
        self.left -= len(data)
        return len(data)


def read_member(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the file at ``url`` (one member's data, from :func:`index_tar`)."""
    with fsspec.open(url, "rb") as f:
        f.seek(offset)
        return f.read(size)
