"""Webdataset shards: finding them, splitting member names, indexing and reading a tar.

One module for the rules every stage (labels, training, evaluation) follows, so that
they cannot drift apart.

Finding (:func:`find_shards`): a shard location is a folder, a glob (``/data/*.tar``), a
brace pattern (``/data/{00000..00329}.tar``), or a URL of any of these (``s3://``,
``gs://``, ``file://``, ``memory://``: every path goes through fsspec). A folder's shards
are its ``<name>.tar`` files, plus each ``<digits>.parquet`` (img2dataset's per-shard
table) whose tar is missing, so that the missing tar is reported rather than skipped.
A shard's name is its file name without ``.tar``; shards are sorted by name.

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
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
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
    shards = []
    for tar in sorted(set(tars)):
        parent, base = posixpath.split(tar)
        name = base.removesuffix(".tar")
        parquet = posixpath.join(parent, f"{name}.parquet") if f"{name}.parquet" in siblings[parent] else None
        shards.append(Shard(name, _url(fs, tar), _url(fs, parquet) if parquet else None))
    return shards


def _folder_shards(fs, folder: str, location: str) -> list[Shard]:
    tars, parquets = {}, {}
    for entry in fs.ls(folder, detail=True):
        if entry["type"] != "file":
            continue
        base = posixpath.basename(entry["name"].rstrip("/"))
        stem, dot, ext = base.rpartition(".")
        if dot and ext == "tar":
            tars[stem] = entry["name"]
        elif dot and ext == "parquet" and stem.isdigit():
            parquets[stem] = entry["name"]
    names = sorted(set(tars) | set(parquets))
    if not names:
        raise FileNotFoundError(f"{location}: holds no webdataset shard (<name>.tar)")
    return [
        Shard(n, _url(fs, tars[n]) if n in tars else None, _url(fs, parquets[n]) if n in parquets else None) for n in names
    ]


def label_table_path(labels: str, shard: str) -> str:
    """Where ``jobs.labels`` writes the label table of shard ``shard`` under its output ``labels``."""
    return posixpath.join(labels.rstrip("/"), LABELS_DIR, f"{shard}.parquet")


# ----------------------------------------------------------------------------- samples


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
