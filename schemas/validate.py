"""Checking a table against its declared schema, with errors that name the column."""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.parquet as pq


class SchemaError(ValueError):
    """A table does not match the schema its reader expects."""


def _name(schema: pa.Schema) -> str:
    meta = schema.metadata or {}
    return meta.get(b"schema_name", b"table").decode()


def validate(table: pa.Table | pa.Schema, schema: pa.Schema, where: str = "", strict_version: bool = True) -> None:
    """Raise :class:`SchemaError` naming the first column that does not match ``schema``.

    Checks, in order: every declared column is present, has the declared type, holds no
    nulls where the schema forbids them; no undeclared column is present; and, when the
    table carries a schema version in its metadata, that it is the declared one.
    ``where`` (a file path, a stage name) is prefixed to the message.
    """
    prefix = f"{where}: " if where else ""
    name = _name(schema)
    actual = table if isinstance(table, pa.Schema) else table.schema
    for field in schema:
        if field.name not in actual.names:
            raise SchemaError(f"{prefix}{name}: missing column '{field.name}' (expected {field.type})")
        got = actual.field(field.name).type
        if not got.equals(field.type):
            raise SchemaError(f"{prefix}{name}: column '{field.name}' has type {got}, expected {field.type}")
        if not field.nullable and isinstance(table, pa.Table) and table.column(field.name).null_count:
            nulls = table.column(field.name).null_count
            raise SchemaError(f"{prefix}{name}: column '{field.name}' holds {nulls} null value(s), none allowed")
    allowed = (schema.metadata or {}).get(b"extra_columns")
    extra = [n for n in actual.names if n not in schema.names and not (allowed and re.match(allowed.decode(), n))]
    if allowed:
        for n in actual.names:
            if n not in schema.names and not actual.field(n).type.equals(pa.float64()):
                raise SchemaError(f"{prefix}{name}: column '{n}' has type {actual.field(n).type}, expected double")
    if extra:
        raise SchemaError(f"{prefix}{name}: unexpected column '{extra[0]}' (declared: {', '.join(schema.names)})")
    meta = actual.metadata or {}
    if strict_version and b"schema_version" in meta:
        want = schema.metadata[b"schema_version"]
        if meta.get(b"schema_name") == schema.metadata[b"schema_name"] and meta[b"schema_version"] != want:
            raise SchemaError(
                f"{prefix}{name}: written with schema version {meta[b'schema_version'].decode()}, "
                f"this code reads version {want.decode()}"
            )


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder ``table``'s columns as declared and attach the schema's metadata, then validate."""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise SchemaError(f"{_name(schema)}: missing column '{missing[0]}'")
    table = table.select(schema.names)
    table = table.cast(schema) if not table.schema.equals(schema, check_metadata=False) else table
    table = table.replace_schema_metadata(schema.metadata)
    validate(table, schema)
    return table


def write_table(table: pa.Table, path: str | os.PathLike, schema: pa.Schema) -> None:
    """Validate ``table`` and write it to ``path`` atomically (temporary name, then rename)."""
    from pipeline.outputs import atomic_file

    table = conform(table, schema)
    with atomic_file(path) as f:
        pq.write_table(table, f)


def read_table(path: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """Read a Parquet file or folder (a local path or a URL) and validate it; the error names the file."""
    from pipeline import storage

    path = os.fspath(path)
    fs, p = storage.fresh(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path}: no such table")
    table = pq.read_table(p, schema=None, filesystem=fs)
    validate(table, schema, where=path)
    return table
