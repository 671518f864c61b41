"""Paths are URLs: pipeline.storage and the atomic-output rule of pipeline.outputs on a real S3 server (moto, 127.0.0.1)."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import pytest

from pipeline import ingest, outputs, storage
from pipeline.shards import TarReader, find_shards
from tests.test_shards import SAMPLES, tar_bytes


@pytest.fixture
def prefix(s3) -> str:
    """A fresh prefix in the session's bucket."""
    return f"s3://nxtp/t/{uuid.uuid4().hex[:8]}"


def _fs():
    return fsspec.filesystem("s3")


def _objects(url: str) -> dict[str, bytes]:
    fs, root = storage.fresh(url)
    return {os.path.relpath(p, root): fs.cat_file(p) for p in fs.find(root)} if fs.isdir(root) else {}


def test_staged_output_on_a_bucket_publishes_with_a_marker(prefix):
    out = f"{prefix}/labels"
    with pytest.raises(RuntimeError, match="crash"):
        with outputs.staged_output(out) as staging:
            assert staging.startswith(f"{prefix}/.labels.tmp-")
            outputs.write_json(storage.join(staging, "summary.json"), {"n": 1})
            raise RuntimeError("crash")
    assert _objects(prefix) == {}  # neither the output nor the temporary prefix
    with outputs.staged_output(out) as staging:
        outputs.write_json(storage.join(staging, "summary.json"), {"n": 1})
        storage.open_file(storage.join(staging, "labels", "00000.parquet"), "wb").close()
        assert _objects(out) == {} and not outputs.is_published(out)
    marker = json.loads(_objects(out)[outputs.MARKER])
    assert marker["files"] == {"labels/00000.parquet": 0, "summary.json": len(b'{\n  "n": 1\n}\n')}
    assert set(_objects(prefix)) == {"labels/_SUCCESS", "labels/summary.json", "labels/labels/00000.parquet"}
    outputs.require_published(out)

    def own(path: str) -> bool:
        return storage.isfile(storage.join(path, "summary.json"))

    def check(path: str) -> None:
        outputs.check_replaceable(path, own, "is not ours")

    with outputs.staged_output(out, check) as staging:  # a previous output is replaced whole
        outputs.write_json(storage.join(staging, "summary.json"), {"n": 2})
    assert set(_objects(out)) == {outputs.MARKER, "summary.json"} and storage.read_json(f"{out}/summary.json") == {"n": 2}


def test_a_half_written_prefix_is_refused_and_never_overwritten(prefix):
    out = f"{prefix}/labels"
    _fs().pipe(f"{out}/labels/00000.parquet".removeprefix("s3://"), b"half")  # what a job killed while publishing leaves
    with pytest.raises(FileExistsError, match=f"{out}: holds 1 object\\(s\\) but no _SUCCESS marker: a half-written output"):
        outputs.check_replaceable(out, lambda p: True, "-")
    with pytest.raises(FileExistsError, match="half-written"):
        with outputs.staged_output(out, lambda p: outputs.check_replaceable(p, lambda q: True, "-")):
            pass
    with pytest.raises(outputs.UnpublishedOutputError, match=f"{out}: not a published labels output \\(no _SUCCESS marker\\)"):
        outputs.require_published(out, "labels output")
    assert _objects(out) == {"labels/00000.parquet": b"half"}
    _fs().pipe(f"{prefix}/file".removeprefix("s3://"), b"x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        outputs.check_replaceable(f"{prefix}/file", lambda p: True, "-")


def test_storage_refusals_name_the_url(prefix):
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/x: the bucket s3://no-such-bucket does not exist"):
        storage.check_reachable("s3://no-such-bucket/x")
    storage.check_reachable(f"{prefix}/anything")  # the bucket exists: a missing prefix is for the job to judge
    with pytest.raises(FileNotFoundError, match=f"{prefix}/lists/\\*.parquet: matches no file"):
        storage.expand([f"{prefix}/lists/*.parquet"])
    with pytest.raises(FileNotFoundError, match=f"{prefix}/shards: no such folder or shard"):
        find_shards(f"{prefix}/shards")


def test_shards_and_globs_on_a_bucket(prefix):
    fs = _fs()
    for i in range(3):
        fs.pipe(f"{prefix}/shards/{i:05d}.tar".removeprefix("s3://"), tar_bytes(SAMPLES))
    found = find_shards(f"{prefix}/shards")
    assert [s.tar for s in found] == [f"{prefix}/shards/{i:05d}.tar" for i in range(3)]
    assert find_shards(f"{prefix}/shards/{{00000..00001}}.tar") == found[:2]
    assert storage.expand([f"{prefix}/shards/*.tar", f"{prefix}/shards/00000.tar"]) == [s.tar for s in found]
    reader = TarReader(found[1].tar)
    assert [s.key for s in reader] == [key for key, _ in SAMPLES] and reader.damage is None


def test_a_bucket_output_is_guarded_by_a_lease(prefix):
    out = f"{prefix}/shards"
    with ingest.output_lock(out):
        lock = storage.read_json(f"{out}/{ingest.LOCK_FILE}")
        assert lock["pid"] == os.getpid()
        with pytest.raises(ingest.OutputBusyError, match=f"{out}: another ingestion is writing to this output \\(lease {out}/.ingest.lock, renewed"):
            with ingest.output_lock(out):
                pass
    assert not storage.exists(f"{out}/{ingest.LOCK_FILE}")  # released at the end
    _fs().pipe(f"{out}/{ingest.LOCK_FILE}".removeprefix("s3://"), b'{"pid": 1, "host": "a killed run"}')
    with pytest.raises(ingest.OutputBusyError, match="a killed run"):
        with ingest.output_lock(out):
            pass
    with ingest.output_lock(out, lease_s=0):  # a lease nobody renewed is taken over
        assert storage.read_json(f"{out}/{ingest.LOCK_FILE}")["pid"] == os.getpid()


def test_copy_folder_and_local_copy_of_a_published_model(prefix, tmp_path):
    src = tmp_path / "export"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 100)
    url = outputs.copy_folder(str(src), f"{prefix}/models/m")
    assert set(_objects(url)) == {"config.json", "sub/w.bin", outputs.MARKER}
    local = outputs.local_copy(url, str(tmp_path / "cache"))
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\0" * 100
    assert outputs.local_copy(url, str(tmp_path / "cache")) == local and os.listdir(tmp_path / "cache") == [os.path.basename(local)]
    with pytest.raises(outputs.UnpublishedOutputError, match=f"{prefix}/models/none: not a published"):
        outputs.local_copy(f"{prefix}/models/none", str(tmp_path / "cache"))


def test_training_config_takes_urls_but_keeps_checkpoints_on_a_file_system(prefix, tmp_path):
    from jobs.train import TrainConfig
    from pipeline.loader import DatasetSpec

    _fs().pipe(f"{prefix}/shards/00000.tar".removeprefix("s3://"), tar_bytes(SAMPLES))
    _fs().pipe(f"{prefix}/labels/summary.json".removeprefix("s3://"), b"{}")
    data = [DatasetSpec("a", f"{prefix}/shards/{{00000..00000}}.tar", f"{prefix}/labels")]
    common = {"deepspeed": "jobs/configs/zero2.json", "tokenizer": "t.model", "steps": 1}
    cfg = TrainConfig(**common, data=data, run_dir=str(tmp_path / "run"), export_to=f"{prefix}/models/m")
    assert cfg.export_to == f"{prefix}/models/m"
    with pytest.raises(ValueError, match=f"dataset a: {prefix}/nope does not exist"):
        TrainConfig(**common, data=[DatasetSpec("a", f"{prefix}/shards", f"{prefix}/nope")])
    with pytest.raises(ValueError, match="DeepSpeed checkpoints need a POSIX path"):
        TrainConfig(**common, data=data, run_dir=f"{prefix}/run")


def test_export_to_refuses_what_is_not_a_model_and_copies_to_a_folder_too(prefix, tmp_path):
    from pipeline.training import check_export_to, export_copy

    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"w")
    local = export_copy(str(src), str(tmp_path / "copy"))
    assert sorted(os.listdir(local)) == ["config.json", "model.safetensors"]
    export_copy(str(src), local)  # a previous model is replaced
    _fs().pipe(f"{prefix}/precious/data.txt".removeprefix("s3://"), b"keep")
    with pytest.raises(FileExistsError, match=f"{prefix}/precious: holds 1 object"):
        check_export_to(f"{prefix}/precious")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not an exported model"):
        check_export_to(str(tmp_path / "other"))
    with pytest.raises(storage.StorageError, match="does not exist"):
        check_export_to("s3://no-such-bucket/m")


def test_tables_are_written_and_read_back_in_a_bucket(prefix):
    """schemas.write_table / read_table take URLs (a re-run of ingestion reads its urls.parquet back from the bucket)."""
    import pyarrow as pa

    from schemas import URL_TABLE, read_table, write_table

    table = pa.table({"key": ["k0", "k1"], "url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"], "caption": ["a cup", "a star"],
                      "source": ["laion"] * 2, "split": ["train"] * 2})  # fmt: skip
    write_table(table, f"{prefix}/urls.parquet", URL_TABLE)
    back = read_table(f"{prefix}/urls.parquet", URL_TABLE)
    assert back.column("key").to_pylist() == ["k0", "k1"] and back.column("caption").to_pylist() == ["a cup", "a star"]
    with pytest.raises(FileNotFoundError, match=f"{prefix}/other.parquet: no such table"):
        read_table(f"{prefix}/other.parquet", URL_TABLE)
