import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (
    LABEL_TABLE,
    PREDICTIONS,
    REPORT,
    SCHEMAS,
    SHARD_MANIFEST,
    URL_TABLE,
    VOCAB,
    SchemaError,
    conform,
    per_k_columns,
    predictions_schema,
    read_table,
    reason_counts,
    reason_rows,
    validate,
    write_table,
)


def _label_rows():
    return pa.table(
        {
            "key": ["000000000", "000000001"],
            "shard": ["00000", "00000"],
            "caption": ["a red star on the table", None],
            "labels": [["star", "table"], []],
            "extractor": ["spacy", "spacy"],
        }
    )


def test_every_schema_is_versioned_and_named():
    assert set(SCHEMAS) == {"url_table", "shard_manifest", "label_table", "vocab", "predictions", "report", "curation"}
    for name, schema in SCHEMAS.items():
        assert schema.metadata[b"schema_name"].decode() == name
        assert int(schema.metadata[b"schema_version"]) >= 1


def test_declared_columns():
    assert URL_TABLE.names == ["key", "url", "caption", "source", "split"]
    assert LABEL_TABLE.field("labels").type == pa.list_(pa.string())
    assert {"shard", "samples", "successes", "failures_by_reason"} <= set(SHARD_MANIFEST.names)
    assert {"label", "count", "document_frequency"} <= set(VOCAB.names)
    assert {"key", "targets", "predictions", "probabilities", "error"} <= set(PREDICTIONS.names)
    assert {"dataset", "k", "samples", "recall", "precision", "f1", "exact_recall", "checkpoint", "checkpoint_sha256", "step", "code_version", "wall_time_s", "images_per_s"} <= set(REPORT.names)
    assert REPORT.field("recall").nullable and REPORT.field("step").type == pa.int64()


def test_per_k_columns_are_declared_by_pattern(tmp_path):
    """A predictions table holds a float column per (metric, k) asked; other extra columns are refused."""
    schema = predictions_schema([10, 5])
    assert schema.names[len(PREDICTIONS.names) :] == per_k_columns([5, 10]) and per_k_columns([5])[0] == "recall_at_5"
    row = {"key": "a", "shard": "0", "targets": ["x"], "predictions": ["x"], "probabilities": [1.0], "error": None}
    table = pa.Table.from_pylist([{**row, **dict.fromkeys(per_k_columns([5, 10]), 0.5)}], schema=schema)
    write_table(table, tmp_path / "p.parquet", schema)
    assert read_table(tmp_path / "p.parquet", PREDICTIONS).column("f1_at_10").to_pylist() == [0.5]  # read without knowing ks
    with pytest.raises(SchemaError, match="unexpected column 'rogue'"):
        validate(table.append_column("rogue", pa.array([1.0])), PREDICTIONS)
    with pytest.raises(SchemaError, match="column 'recall_at_7' has type string"):
        validate(table.append_column("recall_at_7", pa.array(["high"])), PREDICTIONS)


def test_conform_round_trip(tmp_path):
    path = tmp_path / "labels.parquet"
    write_table(_label_rows(), path, LABEL_TABLE)
    table = read_table(path, LABEL_TABLE)
    assert table.column("labels").to_pylist() == [["star", "table"], []]
    assert table.schema.metadata[b"schema_version"] == b"1"
    assert not list(tmp_path.glob("*.tmp-*")), "atomic write left its temporary file"


def test_manifest_failure_reasons_read_as_named_fields(tmp_path):
    """The README's one-liners: DuckDB unnests the reasons, pandas and polars see named fields."""
    import duckdb
    import pandas as pd
    import polars as pl

    from pipeline.ingest import failures_by_reason

    path = str(tmp_path / "manifest.parquet")
    status = [{"success": 3, "HTTP Error 404: Not Found": 2, "<urlopen error timed out>": 1}, {"success": 4}]
    rows = [
        {"shard": f"/s/{i:05d}.tar", "samples": sum(d.values()), "successes": d["success"], "failures": sum(d.values()) - d["success"],
         "failures_by_reason": reason_rows(failures_by_reason(d)), "attempts": 1, "seconds": 1.0}
        for i, d in enumerate(status)
    ]
    write_table(pa.Table.from_pylist(rows, schema=SHARD_MANIFEST), path, SHARD_MANIFEST)
    assert read_table(path, SHARD_MANIFEST).schema.metadata[b"schema_version"] == b"2"
    sql = f"SELECT r.reason, sum(r.count) AS n FROM (SELECT unnest(failures_by_reason) AS r FROM '{path}') GROUP BY 1 ORDER BY 1"
    assert duckdb.sql(sql).fetchall() == [("http_404", 2), ("timeout", 1)]
    assert pd.read_parquet(path)["failures_by_reason"].map(list).map(len).tolist() == [2, 0]
    assert list(pd.read_parquet(path)["failures_by_reason"][0][0]) == ["reason", "count"]
    frame = pl.read_parquet(path).explode("failures_by_reason").unnest("failures_by_reason").drop_nulls("reason")
    assert sorted(zip(frame["reason"], frame["count"])) == [("http_404", 2), ("timeout", 1)]
    assert reason_counts(read_table(path, SHARD_MANIFEST).column("failures_by_reason")[0].as_py()) == {"http_404": 2, "timeout": 1}


def test_missing_column_is_named():
    with pytest.raises(SchemaError, match="missing column 'extractor'"):
        validate(_label_rows().drop(["extractor"]), LABEL_TABLE)


def test_wrong_type_is_named():
    bad = _label_rows().set_column(3, "labels", pa.array(["star,table", ""]))
    with pytest.raises(SchemaError, match="column 'labels' has type string"):
        validate(bad, LABEL_TABLE)


def test_null_in_required_column_is_named():
    bad = _label_rows().set_column(0, "key", pa.array(["a", None]))
    with pytest.raises(SchemaError, match="column 'key' holds 1 null"):
        validate(bad, LABEL_TABLE)


def test_unexpected_column_is_named():
    with pytest.raises(SchemaError, match="unexpected column 'score'"):
        validate(_label_rows().append_column("score", pa.array([1.0, 2.0])), LABEL_TABLE)


def test_other_schema_version_is_refused(tmp_path):
    table = conform(_label_rows(), LABEL_TABLE)
    meta = dict(table.schema.metadata)
    meta[b"schema_version"] = b"99"
    path = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(SchemaError, match=r"future.parquet: label_table: written with schema version 99"):
        read_table(path, LABEL_TABLE)


def test_conform_reorders_and_casts():
    shuffled = _label_rows().select(["labels", "extractor", "key", "caption", "shard"])
    assert conform(shuffled, LABEL_TABLE).column_names == LABEL_TABLE.names
