"""pipeline.shards: finding shards, member names, and the one rule for damaged tars."""

from __future__ import annotations

import io
import os
import re
import tarfile

import fsspec
import pytest

from pipeline.shards import (
    Shard,
    ShardReadError,
    TarReader,
    check_label_table,
    check_labels_made_from,
    find_shards,
    index_tar,
    label_table_path,
    location_name,
    require_tars,
    split_member,
    write_in_key_order,
)


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar holding ``samples`` (key, {extension: data}), members in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with open(path, "wb") as f:
        f.write(tar_bytes(samples))
    return str(path)


SAMPLES = [(f"{i:03d}", {"jpg": bytes([i]) * 700, "txt": f"caption {i}".encode()}) for i in range(6)]


@pytest.fixture
def folder(tmp_path) -> str:
    for i in range(4):
        write_tar(tmp_path / f"{i:05d}.tar", SAMPLES)
    (tmp_path / "00000.parquet").write_bytes(b"per-shard table")
    (tmp_path / "00007.parquet").write_bytes(b"a table whose tar is missing")
    (tmp_path / "manifest.parquet").write_bytes(b"not a shard")
    (tmp_path / "notes.txt").write_text("not a shard")
    return str(tmp_path)


def test_a_folder_glob_and_brace_pattern_find_the_same_shards(folder):
    found = find_shards(folder)
    assert [s.name for s in found] == ["00000", "00001", "00002", "00003", "00007"]
    assert found[0] == Shard("00000", os.path.join(folder, "00000.tar"), os.path.join(folder, "00000.parquet"))
    assert found[1].parquet is None and found[4] == Shard("00007", None, os.path.join(folder, "00007.parquet"))
    tars = found[:4]
    assert find_shards(os.path.join(folder, "*.tar")) == tars
    assert find_shards(os.path.join(folder, "{00000..00003}.tar")) == tars
    assert find_shards(f"file://{folder}/0000[0-3].tar") == tars
    assert find_shards([os.path.join(folder, "00002.tar"), os.path.join(folder, "00000.tar")]) == [tars[0], tars[2]]


def test_missing_shards_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"6 shard\(s\) named by .* do not exist: .*00004.tar, .*00005.tar, .*00006.tar and 3 more"):
        find_shards(os.path.join(folder, "{00000..00009}.tar"))
    with pytest.raises(FileNotFoundError, match="no such folder or shard"):
        find_shards(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="matches no webdataset shard"):
        find_shards(os.path.join(folder, "*.tgz"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no webdataset shard"):
        find_shards(str(empty))


def test_label_tables_are_required_when_asked(folder, tmp_path):
    labels = tmp_path / "labels_out"
    os.makedirs(labels / "labels")
    for name in ("00000", "00001", "00002"):
        (labels / "labels" / f"{name}.parquet").write_bytes(b"x")
    assert label_table_path(str(labels), "00001") == str(labels / "labels" / "00001.parquet")
    pattern = os.path.join(folder, "{00000..00002}.tar")
    assert len(find_shards(pattern, labels=str(labels))) == 3
    with pytest.raises(FileNotFoundError, match="1 shard\\(s\\) have no label table, e.g. .*00003.parquet"):
        find_shards(os.path.join(folder, "*.tar"), labels=str(labels))
    with pytest.raises(FileNotFoundError, match="no such labels folder"):
        find_shards(pattern, labels=str(tmp_path / "nowhere"))


def test_a_file_that_is_no_tar_and_a_parquet_without_its_tar_are_named(folder):
    with pytest.raises(ValueError, match=r"00000.parquet: not a webdataset shard \(<name>.tar\)"):
        find_shards(os.path.join(folder, "00000.parquet"))
    found = find_shards(folder)
    require_tars(found[:4])
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) have no tar, e.g. .*00007.parquet: its tar 00007.tar is missing"):
        require_tars(found)


def test_a_location_is_named_by_its_last_plain_folder():
    for location in ("/data/coco_val/", "/data/coco_val/*.tar", "/data/coco_val/{00000..00329}.tar", "s3://b/coco_val/0000[0-3].tar", "/data/coco_val/00012.tar"):
        assert location_name(location) == "coco_val", location
    assert location_name("/") == "shards"


def test_a_label_table_of_other_types_is_named_by_file_and_column():
    import pyarrow as pa

    from schemas import LABEL_TABLE
    from schemas.validate import SchemaError

    check_label_table(LABEL_TABLE, "t.parquet")
    check_label_table(pa.schema([("key", pa.string()), ("labels", pa.list_(pa.string())), ("class", pa.int64())]), "t.parquet")  # extra columns are the user's
    for fields, said in (
        ([("key", pa.string()), ("labels", pa.string())], "column 'labels' has type string, expected list<item: string>"),
        ([("key", pa.int64()), ("labels", pa.list_(pa.string()))], "column 'key' has type int64, expected string"),
        ([("key", pa.string())], "missing column 'labels'"),
    ):
        with pytest.raises(SchemaError, match=f"^t.parquet: label_table: {re.escape(said)}"):
            check_label_table(pa.schema(fields), "t.parquet")


def test_a_label_table_of_a_newer_schema_version_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.shards import read_label_table
    from schemas import LABEL_TABLE
    from schemas.validate import SchemaError

    table = pa.table({"key": ["000"], "shard": ["00000"], "caption": ["a dog"], "labels": [["dog"]], "extractor": ["spacy"]}, schema=LABEL_TABLE)
    current = tmp_path / "current.parquet"
    pq.write_table(table, current)
    assert read_label_table(str(current)).to_pylist() == [{"key": "000", "labels": ["dog"]}]
    newer = tmp_path / "newer.parquet"
    pq.write_table(table.replace_schema_metadata({**LABEL_TABLE.metadata, b"schema_version": b"99"}), newer)
    with pytest.raises(SchemaError, match=f"^{re.escape(str(newer))}: label_table: written with schema version 99, this code reads version"):
        read_label_table(str(newer))
    with pytest.raises(SchemaError, match="schema version 99"):
        check_label_table(pq.read_schema(newer), "t.parquet")


def test_labels_made_from_other_shards_are_named(tmp_path):
    """Keys are per-shard counters in every ingestion: a table of other shards matches by key, not by caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = Shard("00000", write_tar(tmp_path / "00000.tar", [("000", {"jpg": b"x", "txt": b"a dog"}), ("001", {"jpg": b"y", "json": b'{"caption": "a cup"}'})]))
    labels = tmp_path / "labels"
    os.makedirs(labels / "labels")
    check_labels_made_from(shard, str(labels))  # no table: the stage's own rule applies
    for captions, wrong in ((["a dog", "a cup"], None), (["a dog", None], None), (["a dog", "a fish on a plate"], "001"), (["a star", "a cup"], "000")):
        pq.write_table(pa.table({"key": ["000", "001"], "caption": captions, "labels": [["dog"], ["cup"]]}), label_table_path(str(labels), "00000"))
        if wrong is None:
            check_labels_made_from(shard, str(labels))
        else:
            with pytest.raises(ValueError, match=f"00000.parquet was not made from .*00000.tar: sample {wrong}'s caption is"):
                check_labels_made_from(shard, str(labels))


def test_two_shards_with_one_name_are_refused(folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_tar(other / "00001.tar", SAMPLES)
    with pytest.raises(ValueError, match="two shards are named 00001"):
        find_shards([folder, str(other)])


def test_shards_on_object_storage():
    """Any fsspec URL: the in-memory file system stands for s3:// or gs:// here."""
    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"/bucket/shards/{i:05d}.tar", "wb") as f:
            f.write(tar_bytes(SAMPLES[:2]))
    found = find_shards("memory://bucket/shards")
    assert [s.tar for s in found] == [f"memory:///bucket/shards/{i:05d}.tar" for i in range(3)]
    assert find_shards("memory://bucket/shards/{00001..00002}.tar") == found[1:]
    index = index_tar(found[0].tar)
    assert index.damage is None and index.keys == ["000", "001"]
    assert [s.data["txt"] for s in TarReader(found[2].tar)] == [b"caption 0", b"caption 1"]


def test_split_member_follows_webdataset():
    from webdataset.tariterators import base_plus_ext

    for member in ("0000001.jpg", "0000001.txt", "a/b/000.seg.txt", "dir.v2/abc.json", "noext", "x/.hidden", "k.tar.gz"):
        assert split_member(member) == base_plus_ext(member), member


# ----------------------------------------------------------------------------- the rule for damaged tars


def test_a_whole_tar_is_read_completely(tmp_path):
    tar = write_tar(tmp_path / "a.tar", SAMPLES)
    index = index_tar(tar)
    assert index.damage is None and index.keys == [k for k, _ in SAMPLES]
    assert set(index.samples[0].members) == {"jpg", "txt"} and index.samples[0].data == {}
    read = list(TarReader(tar, read=lambda ext: ext == "txt"))
    assert [s.data for s in read] == [{"txt": m["txt"]} for _, m in SAMPLES]


@pytest.mark.parametrize("fraction", [0.15, 0.4, 0.55, 0.8, 0.97])
def test_a_truncated_tar_gives_its_intact_samples_and_the_defect(tmp_path, fraction):
    tar = write_tar(tmp_path / "whole.tar", SAMPLES)
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    cut = tmp_path / "cut.tar"  # cut at a fraction of the members' bytes (a tar is padded with zeros after them)
    cut.write_bytes(open(tar, "rb").read()[: int((last.offset_data + last.size) * fraction)])
    reader = TarReader(str(cut))
    samples = list(reader)
    assert reader.damage and "truncated" in reader.damage
    assert len(samples) < len(SAMPLES)
    for sample, (key, members) in zip(samples, SAMPLES):  # every sample given is whole and in order
        assert sample.key == key and sample.data == members
    assert index_tar(str(cut)).keys == [s.key for s in samples]


def test_a_tar_without_its_end_marker_loses_its_last_sample(tmp_path):
    tar = write_tar(tmp_path / "whole.tar", SAMPLES)
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    end = -(-(last.offset_data + last.size) // 512) * 512  # the last member whole, no end-of-archive blocks
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(tar, "rb").read()[:end])
    index = index_tar(str(cut))
    assert "end-of-archive" in index.damage and index.keys == [k for k, _ in SAMPLES[:-1]]


def test_members_of_one_key_that_are_not_adjacent_stop_the_reading(tmp_path):
    tar = write_tar(tmp_path / "split.tar", [SAMPLES[0], SAMPLES[1], ("000", {"json": b"{}"}), SAMPLES[2]])
    index = index_tar(tar)
    assert "'000' are not adjacent" in index.damage and index.keys == ["000", "001"]


def test_garbage_and_missing_files_are_defects_with_no_sample(tmp_path):
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"this is not a tar archive" * 50)
    assert index_tar(str(garbage)).damage.startswith("not a readable tar") and index_tar(str(garbage)).keys == []
    assert index_tar(str(tmp_path / "absent.tar")).damage == "no such file"
    whole = bytearray(open(write_tar(tmp_path / "whole.tar", SAMPLES), "rb").read())
    header = whole.index(b"002.jpg")  # corrupt the header of sample 002: a bad checksum
    whole[header + 148 : header + 156] = b"9999999\0"
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(bytes(whole))
    index = index_tar(str(corrupt))
    assert index.damage and index.keys == ["000"]  # 001 may continue past the bad header: not intact


def test_a_copy_in_key_order_depends_only_on_the_samples(tmp_path):
    """Two tars holding the same samples in different orders (threads finishing in any order) copy to the same bytes."""
    one = write_tar(tmp_path / "one.tar", SAMPLES[::-1])
    two = write_tar(tmp_path / "two.tar", [SAMPLES[i] for i in (3, 0, 5, 1, 4, 2)])
    copies = []
    for src in (one, two):
        buf = io.BytesIO()
        assert write_in_key_order(src, buf) == [key for key, _ in SAMPLES]
        copies.append(buf.getvalue())
    assert copies[0] == copies[1]
    (tmp_path / "copy.tar").write_bytes(copies[0])
    assert [(s.key, s.data) for s in TarReader(str(tmp_path / "copy.tar"))] == [(k, m) for k, m in SAMPLES]
    buf = io.BytesIO()  # a subset, as curation writes its kept samples
    assert write_in_key_order(two, buf, keep={"004", "001"}) == ["001", "004"]


def test_a_copy_of_a_damaged_tar_is_refused_or_keeps_what_is_intact(tmp_path):
    data = tar_bytes(SAMPLES)
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardReadError, match="truncated"):
        write_in_key_order(str(path), io.BytesIO())
    intact = index_tar(str(path)).keys
    assert 0 < len(intact) < len(SAMPLES)
    assert write_in_key_order(str(path), io.BytesIO(), allow_damage=True) == intact


def test_a_folder_whose_run_has_not_finished_is_refused(tmp_path):
    """Ingestion and curation write a shard's _stats.json last: a tar without it, beside shards that have
    theirs, is one still being written (or whose run was stopped), and its samples may yet change."""
    for name in ("00000", "00001"):
        write_tar(str(tmp_path / f"{name}.tar"), [("a", {"jpg": b"x"})])
    assert [s.name for s in find_shards(str(tmp_path))] == ["00000", "00001"], "no stats file at all: another tool's folder"
    (tmp_path / "00000_stats.json").write_text("{}")
    for location in (str(tmp_path), str(tmp_path / "*.tar"), str(tmp_path / "{00000..00001}.tar")):
        with pytest.raises(ValueError, match=r"1 shard\(s\) have no _stats.json beside their tar, e.g. 00001.tar: the ingestion or curation"):
            find_shards(location)
    assert [s.name for s in find_shards(str(tmp_path / "00000.tar"))] == ["00000"], "the finished shard alone is fine"
    (tmp_path / "00001_stats.json").write_text("{}")
    assert len(find_shards(str(tmp_path))) == 2
