"""Arrow schemas of every table the pipeline writes, and the helpers that check them."""

from schemas.tables import (
    CURATION,
    LABEL_TABLE,
    PREDICTIONS,
    REPORT,
    SCHEMAS,
    SHARD_MANIFEST,
    URL_TABLE,
    VOCAB,
)
from schemas.validate import SchemaError, conform, read_table, validate, write_table

__all__ = [
    "CURATION",
    "LABEL_TABLE",
    "PREDICTIONS",
    "REPORT",
    "SCHEMAS",
    "SHARD_MANIFEST",
    "URL_TABLE",
    "VOCAB",
    "SchemaError",
    "conform",
    "read_table",
    "validate",
    "write_table",
]
