"""Source adapters: each real url-list format normalized into ``schemas.URL_TABLE``.

    read_tsv         CC3M / CC12M and any delimited list (.tsv, .csv): caption and url columns,
                     header row optional, spreadsheet quoting, any common encoding
    read_coco        COCO captions json: images[].coco_url, all captions of an image "\\n"-joined;
                     or, with ``images_dir``, the local image files (packed without download)
    read_laion       LAION parquet: URL / TEXT, optional min width / height / similarity filters
    read_openimages  OpenImages localized narratives jsonl + image id -> OriginalURL csv

Keys are stable: the same input always gives the same keys ("cc3m-000000042" from the
data row, "coco-<image id>", "laion-<row>", "openimages-<image id>"). An input of several
files (:func:`read_many`: LAION's parquet parts, DataComp's shards, a glob or a brace
pattern, local or URLs) keys each row by its file too: "laion-part-00003-000000042". An
adapter never drops a row in silence: rows it cannot use are counted in
``SourceRows.skipped`` under a reason, with one example each in ``SourceRows.examples``.
Every file is opened through fsspec (``pipeline.storage``): local paths and URLs alike.

Then, for every source:

    filter_urls      scheme allowlist (http/https only), host/URL blocklist, caption
                     cleanup (strip, collapse whitespace within each line, drop empty; a
                     line break in a one-caption row becomes a space), exact-URL dedup;
                     each drop counted by reason
    select_subset    --limit / --fraction with a seed, reproducible and nested (the rows of
                     --limit 1000 are among those of --limit 2000 with the same seed)
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from schemas import URL_TABLE, conform

SOURCES = ("cc3m", "cc12m", "coco", "laion", "openimages")
# sources whose rows hold all the captions of an image, "\n"-joined; a row of any other holds one
MULTI_CAPTION = ("coco", "openimages")

# Tor gateways (xxx.onion.link, xxx.onion.to, ...) and onion hosts: the CC3M list holds some
DEFAULT_BLOCKLIST = ("*.onion", "*.onion.*")

_CHUNK = 200_000  # rows accumulated in Python lists before they become Arrow arrays


class SourceError(ValueError):
    """An input file cannot be read as the format it was given as; the message names file and row."""


@dataclass
class SourceRows:
    """A normalized URL table plus the rows the adapter could not use, counted by reason."""

    table: pa.Table  # schemas.URL_TABLE
    rows_read: int  # data rows (lines, images, narratives) seen in the input
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one example, naming file and row
    notes: list[str] = field(default_factory=list)  # how the input was read, where it was not plain (encoding)

    def skip(self, reason: str, example: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.examples.setdefault(reason, example)


def _key(source: str, part: str | None, ident: str) -> str:
    return f"{source}-{part}-{ident}" if part else f"{source}-{ident}"


class _TableBuilder:
    """Accumulates rows in bounded Python lists and turns them into Arrow chunks."""

    def __init__(self, source: str, split: str, part: str | None = None):
        self.source, self.split, self.part = source, split, part
        self.chunks: list[pa.Table] = []
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.captions: list[str] = []

    def add(self, ident: str, url: str, caption: str) -> None:
        """A row keyed ``<source>[-<part>]-<ident>``."""
        self.keys.append(_key(self.source, self.part, ident))
        self.urls.append(url)
        self.captions.append(caption)
        if len(self.keys) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.keys:
            n = len(self.keys)
            self.chunks.append(
                pa.table(
                    {
                        "key": pa.array(self.keys, pa.string()),
                        "url": pa.array(self.urls, pa.string()),
                        "caption": pa.array(self.captions, pa.string()),
                        "source": pa.array([self.source] * n, pa.string()),
                        "split": pa.array([self.split] * n, pa.string()),
                    }
                )
            )
            self.keys, self.urls, self.captions = [], [], []

    def table(self) -> pa.Table:
        self._flush()
        if not self.chunks:
            return URL_TABLE.empty_table()
        return conform(pa.concat_tables(self.chunks), URL_TABLE)


def _require_file(path: str, what: str) -> None:
    with storage.reported(path):
        if not storage.isfile(path):
            raise FileNotFoundError(f"{path}: {what} not found")


# ----------------------------------------------------------------------------- several files


def part_name(path: str) -> str:
    """The name that keys the rows of one file among several: its file name without the last extension."""
    name = storage.basename(path)
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(ext)
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def read_many(paths: Sequence[str], read_one: Callable[[str, str | None], SourceRows]) -> SourceRows:
    """The rows of every file in ``paths``, in order, read by ``read_one(path, part)``, as one table.

    One file: ``part`` is None and keys are as the adapter makes them. Several: ``part`` is
    each file's :func:`part_name`, so keys stay unique and stable when files are added;
    two files with the same part name are refused.
    """
    if len(paths) == 1:
        return read_one(paths[0], None)
    seen: dict[str, str] = {}
    for path in paths:
        name = part_name(path)
        if name in seen:
            raise SourceError(f"{seen[name]} and {path} have the same name ({name}), which keys their rows: rename one")
        seen[name] = path
    parts = [read_one(path, part_name(path)) for path in paths]
    merged = SourceRows(conform(pa.concat_tables([p.table for p in parts]), URL_TABLE), sum(p.rows_read for p in parts))
    for p in parts:
        for reason, n in p.skipped.items():
            merged.skip(reason, p.examples[reason], n)
        merged.notes += p.notes
    return merged


# ----------------------------------------------------------------------------- delimited text

_URL_NAMES = ("url", "image_url", "imageurl", "link", "originalurl", "original_url")
_CAPTION_NAMES = ("caption", "text", "title", "alt", "alt_text", "description")
_ENCODINGS = (("utf-8-sig", "UTF-8"), ("cp1252", "Windows-1252 (Latin-1)"), ("latin-1", "Latin-1"))


def _delimiter(path: str, first_line: str) -> str:
    name = storage.basename(path).lower()
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(ext)
    if name.endswith(".csv"):
        return ","
    if name.endswith((".tsv", ".tab")) or "\t" in first_line or "," not in first_line:
        return "\t"
    return ","


class _Lines:
    """Lines of a text stream, with the lines of the record being read kept, and a way to push lines back."""

    def __init__(self, lines: Iterable[str]):
        self.lines = iter(lines)
        self.back: list[str] = []
        self.taken: list[str] = []
        self.number = 0  # physical lines handed out (the last one's 1-based number)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.back.pop() if self.back else next(self.lines)
        self.taken.append(line)
        self.number += 1
        return line

    def push_back(self, lines: list[str]) -> None:
        self.back.extend(reversed(lines))
        self.number -= len(lines)


def _records(lines: Iterable[str], delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(first physical line number, fields) of each record of a delimited text, as a person reads it.

    A field wholly in double quotes is a spreadsheet's quoting: it may hold the delimiter,
    line breaks and doubled quotes (``""``). Quotes anywhere else are text: a line whose
    quoting does not parse that way (``"the cat" said``, an opening quote never closed) is
    split at its delimiters as written.
    """
    src = _Lines(lines)
    while True:
        src.taken = []
        start = src.number + 1
        reader = csv.reader(src, delimiter=delimiter, quotechar='"', doublequote=True, strict=True)
        try:
            for row in reader:
                if len(src.taken) > 1 and _holds_a_record(row, delimiter):
                    break  # a stray opening quote took the next line's record into this field
                yield start, row
                src.taken = []
                start = src.number + 1
            else:
                return
        except csv.Error:
            pass
        first, rest = src.taken[0], src.taken[1:]
        src.push_back(rest)
        yield start, first.rstrip("\r\n").split(delimiter)


def _holds_a_record(row: list[str], delimiter: str) -> bool:
    """A field spanning lines holds, after a delimiter, a URL: a record of its own, which a
    stray opening quote (``"Best of<TAB>https://...``) made part of the field."""
    return any(
        any(_looks_like_url(part) for line in field.splitlines() for part in line.split(delimiter)[1:])
        for field in row
        if "\n" in field or "\r" in field
    )


def _open_text(path: str, encoding: str):
    raw = storage.open_file(path, "rb", compression="infer")
    head = raw.read(4)
    # a UTF-8 byte-order mark is no text, also in a file read as Latin-1 after a non-UTF-8 byte
    raw.seek(3 if head.startswith(b"\xef\xbb\xbf") else 0)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # spreadsheets' "Unicode text" export
        encoding = "utf-16"
    return io.TextIOWrapper(raw, encoding=encoding, errors="strict", newline="")


def _column_index(spec: str | None, names: list[str] | None, defaults: tuple[str, ...], what: str, flag: str, path: str) -> int | None:
    """The index of column ``spec`` (a header name, or a 0-based number) or of the first of ``defaults``."""
    if spec is not None and spec.isdigit():
        return int(spec)
    if names is None:
        if spec is not None:
            raise SourceError(f"{path}: {flag} {spec!r} names a column, but the file has no header row (give a 0-based column number)")
        return None
    lower = [n.strip().lower() for n in names]
    wanted = (spec.lower(),) if spec is not None else defaults
    for w in wanted:
        if w in lower:
            return lower.index(w)
    raise SourceError(
        f"{path}:1: header {names!r} names no {what} column (looked for {'/'.join(wanted)}; set {flag}); "
        "if line 1 is data rather than a header, none of its fields is a URL with a scheme (https://...)"
    )


# ----------------------------------------------------------------------------- CC3M / CC12M


_URL_START = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
_PEEK_ROWS = 50  # rows read ahead to tell the url column (a caption may quote a URL; a row's URL may be empty)


def _looks_like_url(text: str) -> bool:
    """The field starts with a scheme and "://" (a caption that quotes a URL does not)."""
    return _URL_START.match(text) is not None


def _is_header(fields: list[str], later: list[list[str]]) -> bool:
    """No field is a URL and none is empty, trailing ones apart, and the column holding URLs in
    the ``later`` rows is one it names (a header names every column; a first data row whose URL
    is empty is data, its URL then filtered, not a header naming nothing)."""
    named = fields[: max((i for i, f in enumerate(fields) if f.strip()), default=-1) + 1]  # a trailing delimiter names nothing
    if not named or any(_looks_like_url(f) for f in named) or not all(f.strip() for f in named):
        return False
    votes = _url_votes(later)
    return not votes or min(votes, key=lambda i: (-votes[i], i)) < len(named)


def _url_votes(rows: list[list[str]], skip: int | None = None) -> Counter:
    """Per column, the rows whose field there starts with a URL scheme (column ``skip`` left out)."""
    return Counter(i for row in rows for i, f in enumerate(row) if i != skip and _looks_like_url(f))


def read_tsv(
    path: str,
    split: str,
    source: str = "cc3m",
    url_col: str | None = None,
    caption_col: str | None = None,
    part: str | None = None,
) -> SourceRows:
    """A delimited URL list: CC3M / CC12M tsv, or any .tsv / .csv with a url and a caption column.

    Read as a person reading the file would: the delimiter is a tab (a comma for .csv);
    a UTF-8 byte-order mark is dropped, UTF-16 with a BOM is decoded, and a file that is
    not UTF-8 is read as Windows-1252 / Latin-1 (said in ``notes``); CRLF and LF line ends
    alike; fields wholly in double quotes may hold tabs, commas, line breaks and doubled
    quotes (spreadsheet exports), quotes elsewhere are text; blank lines are no rows;
    ``.gz`` / ``.bz2`` / ``.xz`` / ``.zst`` files are decompressed.

    Columns: a first row in which no field starts with a URL scheme ("https://") and no
    field is empty is a header; ``url_col`` / ``caption_col`` name its
    columns (default: url / image_url / link ..., caption / text / title / alt ...).
    Without a header they are 0-based column numbers; by default the URL is the column
    whose fields start with a scheme in most of the first 50 rows (a caption quoting a URL
    does not start with one) and, with two columns, the other one the caption (CC3M writes
    caption<TAB>url, CC12M url<TAB>caption). The key is the
    0-based data row (header excluded, blank lines counted): "<source>-000000042". Rows
    with too few fields are counted as ``malformed_row``.
    """
    _require_file(path, f"{source} list")
    errors: list[UnicodeDecodeError] = []
    for encoding, label in _ENCODINGS:
        try:
            with storage.reported(path), _open_text(path, encoding) as text:
                result = _read_delimited(text, path, split, source, url_col, caption_col, part)
        except UnicodeDecodeError as err:
            errors.append(err)
            continue
        if encoding != "utf-8-sig":
            result.notes.append(f"{path}: not UTF-8 ({errors[0].reason} at byte {_first_bad_utf8(path)}), read as {label}")
        return result
    raise SourceError(f"{path}: cannot decode the text ({errors[-1]})")


@contextlib.contextmanager
def _utf8_only(path: str) -> Iterator[None]:
    """A file that must be UTF-8 (JSON lines, a blocklist): a byte that is not is a SourceError naming the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: not UTF-8 ({err.reason} at byte {_first_bad_utf8(path)}); save it as UTF-8") from None


def _first_bad_utf8(path: str) -> int:
    """The offset in the (decompressed) file of its first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with storage.open_file(path, "rb", compression="infer") as raw:
        while chunk := raw.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return offset + err.start - len(decoder.getstate()[0])
            offset += len(chunk)
    return offset


def _read_delimited(text, path: str, split: str, source: str, url_col: str | None, caption_col: str | None, part: str | None) -> SourceRows:
    out = _TableBuilder(source, split, part)
    result = SourceRows(URL_TABLE.empty_table(), 0)
    first_line = text.readline()
    if not first_line:
        return result
    delimiter = _delimiter(path, first_line)
    records = _records(_chain_first(first_line, text), delimiter)
    header: list[str] | None = None
    first: tuple[int, list[str]] | None = None
    for number, fields in records:
        if any(f.strip() for f in fields):
            first = (number, fields)
            break
    if first is None:
        return result
    ahead = list(itertools.islice(records, _PEEK_ROWS))
    records = itertools.chain(ahead, records)
    if _is_header(first[1], [row for _, row in ahead]):
        header = first[1]
    url_i = _column_index(url_col, header, _URL_NAMES, "url", "--url-col", path)
    caption_i = _column_index(caption_col, header, _CAPTION_NAMES, "caption", "--caption-col", path)
    if header is None:
        fields = first[1]
        if url_i is None:  # the column whose fields are URLs in most of the first rows (CC3M: caption<TAB>url, CC12M: url<TAB>caption)
            votes = _url_votes([first[1], *(row for _, row in ahead)], skip=caption_i)
            url_i = min(votes, key=lambda i: (-votes[i], i)) if votes else 1
        if caption_i is None:
            if len(fields) != 2:
                raise SourceError(f"{path}:{first[0]}: {len(fields)} columns and no header row: say which is the caption with --caption-col N (0-based)")
            caption_i = 1 - url_i
    need = max(url_i, caption_i) + 1
    data = records if header is not None else _chain_first(first, records)
    index = -1
    for number, fields in data:
        index += 1
        if not any(f.strip() for f in fields):
            continue  # a blank line: no row (its index is kept, so keys never shift)
        result.rows_read += 1
        if len(fields) < need:
            result.skip("malformed_row", f"{path}:{number}: {len(fields)} field(s), expected {len(header or first[1])}")
            continue
        out.add(f"{index:09d}", fields[url_i].strip(), fields[caption_i])
    result.table = out.table()
    return result


def _chain_first(first, rest: Iterable) -> Iterable:
    yield first
    yield from rest


# ----------------------------------------------------------------------------- COCO


def read_coco(path: str, split: str, images_dir: str | None = None, part: str | None = None) -> SourceRows:
    """COCO captions json (``captions_train2017.json`` layout): one row per image.

    The captions of an image are joined by "\\n" in annotation id order. The URL is the
    image's ``coco_url`` (``flickr_url`` when absent); with ``images_dir`` it is the local
    file ``images_dir/<file_name>`` instead, and nothing is downloaded. Images with no URL
    (or whose file name points outside ``images_dir``) are counted.
    """
    _require_file(path, "COCO captions json")
    try:
        with storage.reported(path), storage.open_file(path, "rb", compression="infer") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid json: {e}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise SourceError(f"{path}: not a COCO captions file (expected top-level 'images' and 'annotations')")
    captions: dict[int, list[tuple[int, str]]] = {}
    for i, ann in enumerate(data["annotations"]):
        try:
            captions.setdefault(ann["image_id"], []).append((ann.get("id", i), ann["caption"]))
        except (KeyError, TypeError):
            raise SourceError(f"{path}: annotations[{i}] has no image_id / caption") from None
    root = os.path.abspath(images_dir) if images_dir is not None else None
    out = _TableBuilder("coco", split, part)
    result_skips: list[tuple[str, str]] = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise SourceError(f"{path}: images[{i}] has no id")
        image_id = image["id"]
        if root is not None:
            name = image.get("file_name") or ""
            url = os.path.abspath(os.path.join(root, name))
            if not name or not url.startswith(root + os.sep):
                result_skips.append(("outside_images_dir", f"{path}: images[{i}] (id {image_id}): file_name {name!r} is not inside {root}"))
                continue
        else:
            url = image.get("coco_url") or image.get("flickr_url") or ""
            if not url:
                result_skips.append(("no_url", f"{path}: images[{i}] (id {image_id}) has no coco_url / flickr_url"))
                continue
        texts = [c for _, c in sorted(captions.get(image_id, []), key=lambda t: t[0])]
        out.add(str(image_id), url, "\n".join(t for t in texts if isinstance(t, str)))
    result = SourceRows(out.table(), len(data["images"]))
    for reason, example in result_skips:
        result.skip(reason, example)
    return result


# ----------------------------------------------------------------------------- LAION


def _column(names: list[str], wanted: tuple[str, ...], path: str, needed_by: str = "") -> str:
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w.lower() in lower:
            return lower[w.lower()]
    why = f", needed by {needed_by}" if needed_by else ""
    raise SourceError(f"{path}: no {wanted[0]} column{why} (looked for {', '.join(wanted)}; the file has {', '.join(names)})")


def read_laion(
    path: str,
    split: str,
    min_width: int = 0,
    min_height: int = 0,
    min_similarity: float = 0.0,
    url_col: str | None = None,
    caption_col: str | None = None,
    part: str | None = None,
) -> SourceRows:
    """A LAION metadata parquet (URL, TEXT, WIDTH, HEIGHT, similarity): one row per row.

    Also DataComp's (url, text) and any parquet whose columns ``url_col`` / ``caption_col``
    name (default: URL or url, TEXT, caption or text; names match case-insensitively).
    The key is the row number: "laion-000000042". ``min_width`` / ``min_height`` drop rows
    whose WIDTH / HEIGHT is known and smaller (``too_small``); ``min_similarity`` drops
    rows whose CLIP similarity is below it (``low_similarity``). A filter asked for on a
    file without its column is an error, not a silent pass.
    """
    _require_file(path, "LAION parquet")
    fs, fs_path = storage.filesystem(path)
    try:
        with storage.reported(path):
            names = pq.read_schema(fs_path, filesystem=fs).names
    except pa.ArrowInvalid as e:
        raise SourceError(f"{path}: not a parquet file: {e}") from None
    url_col = _column(names, (url_col,) if url_col else ("URL", "url"), path, "--url-col" if url_col else "")
    text_col = _column(names, (caption_col,) if caption_col else ("TEXT", "caption", "text"), path, "--caption-col" if caption_col else "")
    columns = [url_col, text_col]
    width_col = height_col = sim_col = None
    if min_width > 0 or min_height > 0:
        width_col = _column(names, ("WIDTH",), path, "--min-width / --min-height")
        height_col = _column(names, ("HEIGHT",), path, "--min-width / --min-height")
        columns += [width_col, height_col]
    if min_similarity > 0:
        sim_col = _column(names, ("similarity",), path, "--min-similarity")
        columns.append(sim_col)
    with storage.reported(path):
        raw = pq.read_table(fs_path, columns=list(dict.fromkeys(columns)), filesystem=fs)
    n = raw.num_rows
    keys = pa.array([_key("laion", part, f"{i:09d}") for i in range(n)], pa.string())
    table = pa.table(
        {
            "key": keys,
            "url": pc.fill_null(pc.cast(raw.column(url_col), pa.string()), ""),
            "caption": pc.cast(raw.column(text_col), pa.string()),
            "source": pa.array(["laion"] * n, pa.string()),
            "split": pa.array([split] * n, pa.string()),
        }
    )
    result = SourceRows(URL_TABLE.empty_table(), n)
    keep = pa.array(np.ones(n, dtype=bool))

    def drop(mask: pa.ChunkedArray | pa.Array, reason: str, detail: str) -> None:
        nonlocal keep
        mask = pc.and_(pc.fill_null(mask, False), keep)
        count = pc.sum(mask).as_py() or 0
        if count:
            first = pc.index(mask, True).as_py()
            result.skip(reason, f"{path}: row {first}: {detail}", count)
        keep = pc.and_(keep, pc.invert(mask))

    if width_col is not None:
        small = pc.or_(
            pc.less(raw.column(width_col), min_width),
            pc.less(raw.column(height_col), min_height),
        )
        drop(small, "too_small", f"smaller than {min_width}x{min_height}")
    if sim_col is not None:
        drop(pc.less(raw.column(sim_col), min_similarity), "low_similarity", f"similarity below {min_similarity}")
    result.table = conform(table.filter(keep), URL_TABLE)
    return result


# ----------------------------------------------------------------------------- OpenImages


def read_openimages(path: str, url_map: str, split: str, part: str | None = None) -> SourceRows:
    """OpenImages localized narratives (jsonl) with an image id -> URL map (csv).

    ``url_map`` is a csv with ImageID and OriginalURL columns (OpenImages'
    ``*-images-with-labels-with-rotation.csv`` / ``image_ids_and_rotation.csv``). One row
    per image, in order of first appearance, with all its narratives joined by "\\n". The
    key is "openimages-<ImageID>". Narratives whose image has no URL in the map are
    counted as ``no_url``; unreadable lines as ``malformed_row``.
    """
    _require_file(path, "OpenImages narratives jsonl")
    _require_file(url_map, "OpenImages image id -> URL csv (--url-map)")
    urls: dict[str, str] = {}
    with storage.reported(url_map), _open_text(url_map, "utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "ImageID" not in fields or "OriginalURL" not in fields:
            raise SourceError(f"{url_map}: needs ImageID and OriginalURL columns; it has {', '.join(fields) or 'none'}")
        for row in reader:
            if row["ImageID"] and row["OriginalURL"]:
                urls[row["ImageID"]] = row["OriginalURL"]
    narratives: dict[str, list[str]] = {}
    result = SourceRows(URL_TABLE.empty_table(), 0)
    with _utf8_only(path), storage.reported(path), _open_text(path, "utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            result.rows_read += 1
            try:
                record = json.loads(line)
                image_id, caption = record["image_id"], record["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                result.skip("malformed_row", f"{path}:{number}: not a json object with image_id and caption")
                continue
            if image_id not in urls:
                result.skip("no_url", f"{path}:{number}: image {image_id} is not in {url_map}")
                continue
            narratives.setdefault(image_id, []).append(caption if isinstance(caption, str) else "")
    out = _TableBuilder("openimages", split, part)
    for image_id, texts in narratives.items():
        out.add(image_id, urls[image_id], "\n".join(texts))
    result.table = out.table()
    return result


# ----------------------------------------------------------------------------- filters

# horizontal whitespace: ASCII blanks and every Unicode separator (no-break space, em space, ...)
_BLANKS = r"[\pZ\t\x0b\x0c\r]+"
_HTTP = r"^(?i)https?://[^/?#\s]"
_HOST = r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/]*\]|[^:/?#]*)"


def clean_captions(captions: pa.ChunkedArray | pa.Array, one_caption=None) -> pa.ChunkedArray | pa.Array:
    """Strip, collapse whitespace within each line, drop empty lines; null becomes "".

    ``one_caption`` (a boolean array) marks rows that hold one caption: a
    line break inside one (a quoted field of a web list, alt text) becomes a space, since
    labels, CLIP scoring and training read each line of a sample's text as a caption.
    """
    text = pc.fill_null(captions, "")
    text = pc.replace_substring_regex(text, r"\r\n?", "\n")
    if one_caption is not None:
        text = pc.if_else(one_caption, pc.replace_substring(text, "\n", " "), text)
    text = pc.replace_substring_regex(text, _BLANKS, " ")
    text = pc.replace_substring_regex(text, r" ?\n ?", "\n")
    text = pc.replace_substring_regex(text, r"\n+", "\n")
    return pc.utf8_trim(text, " \n")


def _glob_regex(pattern: str) -> str:
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


@dataclass(frozen=True)
class Blocklist:
    """Hosts and URL patterns that are never downloaded.

    A line without "/" is a host pattern, matched case-insensitively against the URL's
    host: a plain name blocks the host and its subdomains (``example.com`` blocks
    ``img.example.com``), ``*`` and ``?`` are wildcards (``*.onion.*``). A line with "/"
    is a wildcard pattern matched against the whole URL (``*://*/ads/*``). Blank lines and
    lines starting with "#" are ignored.
    """

    hosts: frozenset[str] = frozenset()
    host_globs: tuple[str, ...] = DEFAULT_BLOCKLIST
    url_globs: tuple[str, ...] = ()

    @classmethod
    def parse(cls, lines: Iterable[str], defaults: Iterable[str] = DEFAULT_BLOCKLIST) -> Blocklist:
        hosts, host_globs, url_globs = set(), list(defaults), []
        for line in lines:
            p = line.strip()
            if not p or p.startswith("#"):
                continue
            if "/" in p:
                url_globs.append(p)
            elif "*" in p or "?" in p:
                host_globs.append(p.lower())
            else:
                hosts.add(p.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(dict.fromkeys(host_globs)), tuple(url_globs))

    @classmethod
    def from_file(cls, path: str | None) -> Blocklist:
        if path is None:
            return cls()
        _require_file(path, "blocklist")
        with _utf8_only(path), storage.reported(path), _open_text(path, "utf-8-sig") as f:
            return cls.parse(f)

    def patterns(self) -> list[str]:
        return sorted(self.hosts) + list(self.host_globs) + list(self.url_globs)

    def matches(self, urls: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
        """Boolean per URL: blocked. URLs must already be http(s)."""
        host = pc.struct_field(pc.extract_regex(urls, _HOST), "host")
        host = pc.utf8_rtrim(pc.utf8_lower(pc.fill_null(host, "")), ".")
        listed = pa.array(sorted(self.hosts), pa.string())
        blocked = pc.is_in(host, value_set=listed)
        parent = host
        while self.hosts and pc.any(pc.not_equal(parent, "")).as_py():  # parent domains, one label at a time, to the root
            parent = pc.replace_substring_regex(parent, r"^[^.]*\.?", "")
            blocked = pc.or_(blocked, pc.is_in(parent, value_set=listed))
        if self.host_globs:
            regex = "^(?:" + "|".join(_glob_regex(g) for g in self.host_globs) + ")$"
            blocked = pc.or_(blocked, pc.match_substring_regex(host, regex))
        if self.url_globs:
            regex = "^(?i)(?:" + "|".join(_glob_regex(g) for g in self.url_globs) + ")$"
            blocked = pc.or_(blocked, pc.match_substring_regex(urls, regex))
        return pc.fill_null(blocked, False)


@dataclass
class FilterResult:
    table: pa.Table  # schemas.URL_TABLE, cleaned captions, rows in input order
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    examples: dict[str, str] = field(default_factory=dict)  # reason -> "key url"


def filter_urls(table: pa.Table, blocklist: Blocklist | None = None, local_root: str | None = None) -> FilterResult:
    """Drop rows that must not be downloaded, each counted under the first reason it meets.

    In order: ``bad_scheme`` (anything but http:// or https://, e.g. file://, ftp://, an
    empty URL), ``blocklisted``, ``empty_caption`` (after cleanup), ``duplicate_url``
    (exact URL seen on an earlier row). With ``local_root`` (images packed from a local
    folder) the URL column holds file paths instead, and every one must lie inside
    ``local_root`` (``outside_images_dir``); the blocklist does not apply.
    """
    blocklist = blocklist if blocklist is not None else Blocklist()
    result = FilterResult(table)
    n = table.num_rows
    keep = pa.array(np.ones(n, dtype=bool))
    urls = table.column("url")

    def drop(mask, reason: str) -> None:
        nonlocal keep
        mask = pc.and_(pc.fill_null(mask, True), keep)
        count = pc.sum(mask).as_py() or 0
        if count:
            first = pc.index(mask, True).as_py()
            result.dropped[reason] += count
            result.examples.setdefault(reason, f"{table.column('key')[first].as_py()} {urls[first].as_py()!r}")
        keep = pc.and_(keep, pc.invert(mask))

    if local_root is None:
        drop(pc.invert(pc.match_substring_regex(urls, _HTTP)), "bad_scheme")
        drop(blocklist.matches(pc.if_else(keep, urls, "")), "blocklisted")
    else:
        root = os.path.abspath(local_root) + os.sep
        drop(pc.invert(pc.starts_with(urls, root)), "outside_images_dir")
    one_caption = pc.invert(pc.is_in(table.column("source"), value_set=pa.array(MULTI_CAPTION, pa.string())))
    captions = clean_captions(table.column("caption"), one_caption)
    drop(pc.equal(captions, ""), "empty_caption")
    index = pa.array(np.arange(n, dtype=np.int64))
    alive = pa.table({"url": urls, "i": index}).filter(keep)
    first_seen = alive.group_by("url", use_threads=False).aggregate([("i", "min")]).column("i_min")
    is_first = pc.is_in(index, value_set=first_seen)
    drop(pc.invert(is_first), "duplicate_url")
    cleaned = table.set_column(table.schema.get_field_index("caption"), "caption", captions)
    result.table = conform(cleaned.filter(keep), URL_TABLE)
    return result


# ----------------------------------------------------------------------------- subsets


def _scores(keys: list[str], seed: int) -> np.ndarray:
    salt = f"{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") for k in keys),
        dtype=np.uint64,
        count=len(keys),
    )


def select_subset(table: pa.Table, limit: int | None = None, fraction: float | None = None, seed: int = 0) -> pa.Table:
    """A reproducible subset, rows kept in input order.

    Each key gets a pseudo-random score from (seed, key): ``fraction`` keeps the keys whose
    score falls below it (about that share, independent of the other rows), ``limit``
    then keeps the ``limit`` lowest scores. The same input, seed and flags always select
    the same keys, and a smaller limit selects a subset of a larger one.
    """
    if limit is None and fraction is None:
        return table
    scores = _scores(table.column("key").to_pylist(), seed)
    keep = np.ones(len(scores), dtype=bool)
    if fraction is not None:
        keep &= scores < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    if limit is not None and keep.sum() > limit:
        candidates = np.flatnonzero(keep)
        order = np.argsort(scores[candidates], kind="stable")[:limit]
        keep[:] = False
        keep[candidates[order]] = True
    return table.filter(pa.array(keep))
