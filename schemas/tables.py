"""Every Arrow table the pipeline writes, declared once.

Each stage reads only what the stage before it wrote, through these schemas:

    URL_TABLE        jobs.ingest    normalized url list, one row per image to fetch
    SHARD_MANIFEST   jobs.ingest    manifest.parquet, one row per webdataset shard
    LABEL_TABLE      jobs.labels    <labels>/labels/<shard>.parquet, one row per downloaded sample
    VOCAB            jobs.labels    <labels>/vocab.parquet, one row per label
    PREDICTIONS      jobs.evaluate  predictions.parquet, one row per validation sample, plus a
                                    column per (metric, k) asked (predictions_schema(ks))
    REPORT           jobs.evaluate  report.parquet, one row per (dataset, k, embedding model)
    CURATION         jobs.curate    curation.parquet, one row per input sample: hashes, scores, kept or why not

A schema may allow columns beyond the declared ones: its metadata's ``extra_columns`` is a
regular expression their names match (they are float64).

The version lives in each schema's metadata (``schema_name``, ``schema_version``); bump
it whenever a field changes so that a reader meets a clear error instead of a silent
mismatch.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "CURATION",
    "LABEL_TABLE",
    "PER_K_METRICS",
    "PREDICTIONS",
    "REPORT",
    "SCHEMAS",
    "SHARD_MANIFEST",
    "URL_TABLE",
    "VOCAB",
    "per_k_columns",
    "predictions_schema",
    "reason_counts",
    "reason_rows",
]


def _schema(name: str, version: int, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"schema_name": name, "schema_version": str(version)})


URL_TABLE = _schema(
    "url_table",
    1,
    [
        # stable, unique within a source: the same input always yields the same keys
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        # several captions of one image (COCO, OpenImages narratives) are joined by "\n"
        pa.field("caption", pa.string()),
        pa.field("source", pa.string(), nullable=False),  # cc3m | coco | laion | openimages | folder
        pa.field("split", pa.string(), nullable=False),
    ],
)

# a manifest's failure counts: one struct per reason, so that every reader sees named fields
# (a Parquet map reads as a list of tuples in pandas); DuckDB: unnest(failures_by_reason)
REASON_COUNT = pa.struct([pa.field("reason", pa.string(), nullable=False), pa.field("count", pa.int64(), nullable=False)])

SHARD_MANIFEST = _schema(
    "shard_manifest",
    2,
    [
        pa.field("shard", pa.string(), nullable=False),  # path of the .tar
        pa.field("samples", pa.int64(), nullable=False),  # url rows assigned to the shard
        pa.field("successes", pa.int64(), nullable=False),  # samples written into the tar
        pa.field("failures", pa.int64(), nullable=False),
        # [{reason, count}] sorted by reason (http_404, not_an_image, decode_error, timeout, ...)
        pa.field("failures_by_reason", pa.list_(REASON_COUNT), nullable=False),
        pa.field("attempts", pa.int64(), nullable=False),  # 1 + retries the job spent on it
        pa.field("seconds", pa.float64(), nullable=False),
    ],
)

LABEL_TABLE = _schema(
    "label_table",
    1,
    [
        # the webdataset sample key (__key__ in the tar, "key" in its json)
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # shard name without extension, e.g. "00012"
        pa.field("caption", pa.string()),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("extractor", pa.string(), nullable=False),  # spacy | nltk
    ],
)

VOCAB = _schema(
    "vocab",
    1,
    [
        pa.field("label", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # captions whose label list holds it
        pa.field("document_frequency", pa.float64(), nullable=False),  # count / captions
    ],
)

# per-sample figures at each k asked, one float64 column each (null on rows that are not scored):
# recall_at_<k>, precision_at_<k>, f1_at_<k> (semantic, the run's sentence model) and
# exact_recall_at_<k>, exact_precision_at_<k>; see predictions_schema()
PER_K_METRICS = ("recall", "precision", "f1", "exact_recall", "exact_precision")
PER_K_COLUMN = r"^(exact_recall|exact_precision|recall|precision|f1)_at_[0-9]+$"

PREDICTIONS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("targets", pa.list_(pa.string()), nullable=False),
        pa.field("predictions", pa.list_(pa.string()), nullable=False),  # sorted, most likely first
        pa.field("probabilities", pa.list_(pa.float64()), nullable=False),
        pa.field("error", pa.string()),  # why the sample could not be scored, e.g. a decode error
    ],
    metadata={"schema_name": "predictions", "schema_version": "2", "extra_columns": PER_K_COLUMN},
)


def reason_rows(counts) -> list[dict]:
    """A manifest's ``failures_by_reason`` value from {reason: count} (zero counts left out)."""
    return [{"reason": r, "count": int(n)} for r, n in sorted(dict(counts).items()) if n]


def reason_counts(rows) -> dict[str, int]:
    """{reason: count} from a manifest's ``failures_by_reason`` value (as ``to_pylist`` gives it)."""
    return {row["reason"]: row["count"] for row in rows or ()}


def per_k_columns(ks) -> list[str]:
    """The per-sample metric columns of a predictions table for ``ks``, in order (k-major)."""
    return [f"{metric}_at_{k}" for k in sorted(set(ks)) for metric in PER_K_METRICS]


def predictions_schema(ks) -> pa.Schema:
    """PREDICTIONS with the per-k metric columns of ``ks``: the exact schema a run writes."""
    fields = list(PREDICTIONS) + [pa.field(name, pa.float64()) for name in per_k_columns(ks)]
    return pa.schema(fields, metadata=PREDICTIONS.metadata)


REPORT = _schema(
    "report",
    3,
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("k", pa.int64(), nullable=False),
        # the model that embeds labels for R / P / F1: all-MiniLM-L6-v2 (the paper's), another sentence model, or clip-text:<file>
        pa.field("embedding", pa.string(), nullable=False),
        pa.field("samples", pa.int64(), nullable=False),  # scored samples
        pa.field("failed", pa.int64(), nullable=False),  # samples without a usable image (unreadable, undecodable)
        pa.field("no_targets", pa.int64(), nullable=False),  # samples with no target label: predicted, not scored
        pa.field("recall", pa.float64()),  # semantic R, the paper's headline; null when nothing was scored
        pa.field("precision", pa.float64()),
        pa.field("f1", pa.float64()),
        pa.field("exact_recall", pa.float64()),  # exact-match recall@k; null when nothing was scored
        pa.field("exact_precision", pa.float64()),  # exact-match precision@k
        pa.field("checkpoint", pa.string(), nullable=False),  # the model's path or hub id, as given
        pa.field("checkpoint_sha256", pa.string(), nullable=False),  # of its weight file(s)
        pa.field("step", pa.int64()),  # training step of an exported model; null when unknown
        pa.field("code_version", pa.string(), nullable=False),  # git:<commit>[+dirty] or source:<sha256 of the code>
        pa.field("wall_time_s", pa.float64(), nullable=False),  # the whole job
        pa.field("images_per_s", pa.float64(), nullable=False),  # samples / seconds of the Ray pipeline
    ],
)

CURATION = _schema(
    "curation",
    1,
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # input (and output) shard name, e.g. "00012"
        pa.field("caption", pa.string()),
        pa.field("sha256", pa.string()),  # of the stored image bytes: exact duplicates share it
        pa.field("phash", pa.string()),  # 256-bit perceptual hash (phash or dhash), 64 hex digits
        pa.field("clip_score", pa.float64()),  # image-caption cosine; null when not scored (dropped by dedup)
        pa.field("classifier_score", pa.float64()),  # --classifier's score of the image embedding
        pa.field("kept", pa.bool_(), nullable=False),
        # null when kept, else: unreadable | eval_duplicate | exact_duplicate | near_duplicate
        # | classifier | low_clip_score | below_top_fraction (the first that applies)
        pa.field("reason", pa.string()),
        pa.field("duplicate_of", pa.string()),  # the kept key it duplicates (eval duplicates: <eval shard>/<key>)
        pa.field("phash_distance", pa.int64()),  # bits between the two perceptual hashes
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    s.metadata[b"schema_name"].decode(): s
    for s in (URL_TABLE, SHARD_MANIFEST, LABEL_TABLE, VOCAB, PREDICTIONS, REPORT, CURATION)
}
