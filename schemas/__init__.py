"""Arrow schemas of every table the pipeline writes, and the helpers that check them."""

from schemas.tables import (
    CURATION,
    LABEL_TABLE,
    PER_K_METRICS,
    PREDICTIONS,
    REPORT,
    SCHEMAS,
    SHARD_MANIFEST,
    URL_TABLE,
    VOCAB,
    per_k_columns,
    predictions_schema,
    reason_counts,
    reason_rows,
)
from schemas.validate import SchemaError, conform, read_table, validate, write_table

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
    "SchemaError",
    "conform",
    "per_k_columns",
    "predictions_schema",
    "read_table",
    "reason_counts",
    "reason_rows",
    "validate",
    "write_table",
]
