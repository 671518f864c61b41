"""The whole chain with every input and output in a bucket of a real S3 server on 127.0.0.1 (moto).

Ingestion, labels and evaluation are submitted with `ray job submit` to the session's Ray head,
with the endpoint and credentials in the job's runtime env (as on a cluster); training runs
under the deepspeed launcher, whose ranks inherit them. The faults (no such bucket, no
credentials, a prefix without shards, a half-written output) each get a clear error naming
the URL, and nothing is overwritten.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import ray_local, storage
from pipeline.outputs import MARKER
from pipeline.shards import find_shards
from schemas import CURATION, LABEL_TABLE, PREDICTIONS, SHARD_MANIFEST, URL_TABLE
from tests import s3_server

pytestmark = [pytest.mark.s3, pytest.mark.cluster, pytest.mark.launcher]
ROOT = "s3://nxtp/chain"
STEPS = 4


def _s3() -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def _read_parquet(url: str, schema):
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    from schemas import validate

    validate(table, schema, where=url)
    return table


def _submit(ray_head, repo_root, env, *entry: str, timeout: float = 300) -> str:
    runtime_env = json.dumps({"env_vars": env})
    proc = ray_head.submit(["python", "-m", *entry], working_dir=repo_root, timeout=timeout, extra_args=["--runtime-env-json", runtime_env])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def _train(repo_root: str, tmp: str, world, export_to: str) -> str:
    config = {
        "model": "tiny",
        "tokenizer": world.tokenizer,
        "image_size": 64,
        "data": [{"name": "laion", "shards": f"{ROOT}/shards/train", "labels": f"{ROOT}/labels/train", "weight": 1.0}],
        "train_vision_blocks": -1,
        "train_embeddings": "all",
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "steps": STEPS,
        "save_every": STEPS,
        "log_every": 1,
        "num_workers": 1,
        "shuffle_buffer": 8,
        "max_text_len": 48,
        "run_dir": os.path.join(tmp, "run"),
        "export_to": export_to,
    }
    cfg_path = os.path.join(tmp, "train.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(ray_local.free_port()), "jobs/train.py", "--config", cfg_path, "--deepspeed", "jobs/configs/zero2.json"]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope="module")
def chain(s3, served_world, ray_head, repo_root, tmp_path_factory):
    """Every stage, inputs and outputs in s3://nxtp/chain: the list parts, shards, curated shards, labels, the exported model, the report."""
    world, _, paths = served_world
    _, env = s3
    fs = _s3()
    train = pq.read_table(paths["train"]["laion"])
    half = train.num_rows // 2
    for i, part in enumerate((train.slice(0, half), train.slice(half))):  # LAION metadata comes as parts
        with fs.open(f"{ROOT}/lists/train/part-{i:05d}.parquet", "wb") as f:
            pq.write_table(part, f)
    fs.put_file(paths["val"]["laion"], f"{ROOT}/lists/val/val.parquet")
    common = ["--source", "laion", "--image-size", "64", "--resize-mode", "center_crop", "--samples-per-shard", "16", "--threads", "4"]
    logs = {}
    logs["ingest"] = _submit(ray_head, repo_root, env, "jobs.ingest", "--input", f"{ROOT}/lists/train/part-*.parquet", "--output", f"{ROOT}/shards/train", *common)
    logs["ingest_val"] = _submit(ray_head, repo_root, env, "jobs.ingest", "--input", f"{ROOT}/lists/val/val.parquet", "--split", "val", "--output", f"{ROOT}/shards/val", *common)
    logs["curate"] = _submit(ray_head, repo_root, env, "jobs.curate", "--shards", f"{ROOT}/shards/train", "--output", f"{ROOT}/shards/curated",
                             "--exclude-near", f"{ROOT}/shards/val", "--concurrency", "1")  # fmt: skip
    for split in ("train", "val"):
        logs[f"labels_{split}"] = _submit(ray_head, repo_root, env, "jobs.labels", "--shards", f"{ROOT}/shards/{split}", "--output", f"{ROOT}/labels/{split}")
    tmp = str(tmp_path_factory.mktemp("s3_train"))
    logs["train"] = _train(repo_root, tmp, world, f"{ROOT}/models/tiny")
    logs["evaluate"] = _submit(
        ray_head, repo_root, env, "jobs.evaluate", "--checkpoint", f"{ROOT}/models/tiny", "--shards", f"{ROOT}/shards/val",
        "--labels", f"{ROOT}/labels/val", "--output", f"{ROOT}/reports/tiny", "--k", "5", "--batch-size", "8", "--cpus-per-actor", "0.5",
    )  # fmt: skip
    return world, logs, tmp


def _tar_keys(url: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def test_ingestion_from_list_parts_in_the_bucket_to_shards_in_the_bucket(chain):
    world, logs, _ = chain
    fs = _s3()
    names = sorted(os.path.basename(p) for p in fs.ls(f"{ROOT}/shards/train", detail=False))
    assert ".ingest.lock" not in names and "_tmp" not in names  # lease released, staging removed
    manifest = _read_parquet(f"{ROOT}/shards/train/manifest.parquet", SHARD_MANIFEST)
    shards = manifest.column("shard").to_pylist()
    assert all(s.startswith(f"{ROOT}/shards/train/") for s in shards) and {f"{os.path.basename(s)}" for s in shards} <= set(names)
    summary = storage.read_json(f"{ROOT}/shards/train/ingest_summary.json")
    samples = world.samples("train")
    assert summary["rows_read"] == len(samples) and summary["pending"] == 0 and "(2 files)" in summary["input"]
    urls = _read_parquet(f"{ROOT}/shards/train/urls.parquet", URL_TABLE)
    assert urls.column("key")[0].as_py() == "laion-part-00000-000000000"  # each part keys its own rows
    landed = sum(len(_tar_keys(s)) for s in shards)
    assert landed == summary["downloaded"] == sum(manifest.column("successes").to_pylist()) > 0
    assert summary["downloaded"] + sum(summary["failed"].values()) == summary["selected"]  # every row lands once or is counted


def test_curation_reads_and_writes_the_bucket(chain):
    _, logs, _ = chain
    out = f"{ROOT}/shards/curated"
    curation = _read_parquet(f"{out}/curation.parquet", CURATION)
    manifest = _read_parquet(f"{ROOT}/shards/train/manifest.parquet", SHARD_MANIFEST)
    ingested = sorted((os.path.basename(s).removesuffix(".tar"), k) for s in manifest.column("shard").to_pylist() for k in _tar_keys(s))
    assert sorted(zip(curation.column("shard").to_pylist(), curation.column("key").to_pylist())) == ingested  # every sample once
    kept = sorted((s, k) for s, k, ok in zip(curation.column("shard").to_pylist(), curation.column("key").to_pylist(), curation.column("kept").to_pylist()) if ok)
    found = find_shards(out)
    assert [s.tar for s in found] == [f"{out}/{name}.tar" for name in sorted({n for n, _ in ingested})]
    assert sorted((s.name, k) for s in found for k in _tar_keys(s.tar)) == kept  # the kept samples, nothing else
    curated = _read_parquet(f"{out}/manifest.parquet", SHARD_MANIFEST)
    assert sum(curated.column("successes").to_pylist()) == len(kept) and sum(curated.column("samples").to_pylist()) == len(ingested)
    summary = storage.read_json(f"{out}/curate_summary.json")
    assert summary["samples"] == len(ingested) and summary["kept"] == len(kept)
    assert not [p for p in _s3().find(out) if "/_tmp" in p or "/." in p]  # no temporary object left


def test_labels_are_published_whole_in_the_bucket(chain):
    _, logs, _ = chain
    out = f"{ROOT}/labels/train"
    marker = storage.read_json(f"{out}/{MARKER}")
    assert {"summary.json", "vocab.parquet", "config.json"} <= set(marker["files"])
    assert not [p for p in _s3().ls(f"{ROOT}/labels", detail=False) if os.path.basename(p).startswith(".")]  # no staging prefix left
    manifest = _read_parquet(f"{ROOT}/shards/train/manifest.parquet", SHARD_MANIFEST)
    for shard in manifest.column("shard").to_pylist():
        name = os.path.basename(shard).removesuffix(".tar")
        table = _read_parquet(f"{out}/labels/{name}.parquet", LABEL_TABLE)
        assert table.column("key").to_pylist() == _tar_keys(shard)
        assert marker["files"][f"labels/{name}.parquet"] == _s3().size(f"{out}/labels/{name}.parquet")


def test_training_reads_the_bucket_and_exports_to_it(chain):
    _, logs, tmp = chain
    assert f"copied the exported model to {ROOT}/models/tiny" in logs["train"]
    metrics = [json.loads(line) for line in open(os.path.join(tmp, "run", "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)) and metrics[-1]["data"]["samples"] > 0
    assert metrics[-1]["data"].get("missing_label_tables", 0) == 0
    marker = storage.read_json(f"{ROOT}/models/tiny/{MARKER}")
    local = os.path.join(tmp, "run", "export")
    files = {os.path.relpath(os.path.join(d, n), local): os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(local) for n in names}
    assert marker["files"] == files and "config.json" in files


def test_evaluation_of_the_exported_model_writes_its_report_to_the_bucket(chain):
    _, logs, _ = chain
    out = f"{ROOT}/reports/tiny"
    assert set(storage.read_json(f"{out}/{MARKER}")["files"]) == {"config.json", "gallery.html", "predictions.parquet", "report.parquet", "report.png", "summary.json"}
    predictions = _read_parquet(f"{out}/predictions.parquet", PREDICTIONS)
    manifest = _read_parquet(f"{ROOT}/shards/val/manifest.parquet", SHARD_MANIFEST)
    expected = sorted((os.path.basename(s).removesuffix(".tar"), k) for s in manifest.column("shard").to_pylist() for k in _tar_keys(s))
    assert list(zip(predictions.column("shard").to_pylist(), predictions.column("key").to_pylist())) == expected  # every sample once
    summary = storage.read_json(f"{out}/summary.json")
    assert summary["checkpoint"]["checkpoint"] == f"{ROOT}/models/tiny" and summary["checkpoint"]["step"] == STEPS
    assert "wrote " + out in logs["evaluate"]


# ----------------------------------------------------------------------------- faults


def _job(repo_root: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=180)


def test_a_bucket_that_does_not_exist_is_named(s3, repo_root, tmp_path):
    env = dict(os.environ)
    proc = _job(repo_root, env, "jobs.labels", "--shards", "s3://no-such-bucket/shards", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "s3://no-such-bucket/shards: the bucket s3://no-such-bucket does not exist" in proc.stderr, proc.stderr
    (tmp_path / "list.tsv").write_text("a cup\thttp://127.0.0.1:9/a.jpg\n")
    proc = _job(repo_root, env, "jobs.ingest", "--source", "cc3m", "--input", str(tmp_path / "list.tsv"), "--output", "s3://no-such-bucket/shards")
    assert proc.returncode == 2 and "s3://no-such-bucket/shards: the bucket s3://no-such-bucket does not exist" in proc.stderr, proc.stderr
    proc = _job(repo_root, env, "jobs.curate", "--shards", "s3://no-such-bucket/shards", "--output", str(tmp_path / "curated"))
    assert proc.returncode == 2 and "s3://no-such-bucket/shards: the bucket s3://no-such-bucket does not exist" in proc.stderr, proc.stderr
    assert not _s3().exists("no-such-bucket")  # never created by a job


def test_missing_credentials_are_named(s3, repo_root, tmp_path):
    env = s3_server.without_credentials(dict(os.environ))
    proc = _job(repo_root, env, "jobs.labels", "--shards", "s3://nxtp/anything", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "s3://nxtp/anything: no credentials for s3://" in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr, proc.stderr


def test_a_prefix_without_shards_is_named(s3, repo_root, tmp_path):
    fs = _s3()
    fs.pipe("nxtp/noshards/readme.txt", b"no tar here")
    proc = _job(repo_root, dict(os.environ), "jobs.labels", "--shards", "s3://nxtp/noshards", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "s3://nxtp/noshards: holds no webdataset shard" in proc.stderr, proc.stderr
    proc = _job(repo_root, dict(os.environ), "jobs.labels", "--shards", "s3://nxtp/nothing-here", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "s3://nxtp/nothing-here: no such folder or shard" in proc.stderr, proc.stderr


def test_a_half_written_output_is_refused_by_writers_and_readers(chain, repo_root, tmp_path):
    """What a labels job killed while publishing leaves: objects without the _SUCCESS marker."""
    fs = _s3()
    half = f"{ROOT}/labels/half"
    fs.copy(f"{ROOT}/labels/train/labels", f"{half}/labels", recursive=True)
    before = {p: fs.info(p)["ETag"] for p in fs.find(half)}
    env = dict(os.environ)
    proc = _job(repo_root, env, "jobs.labels", "--shards", f"{ROOT}/shards/train", "--output", half)
    assert proc.returncode == 2 and f"{half}: holds {len(before)} object(s) but no _SUCCESS marker" in proc.stderr, proc.stderr
    proc = _job(repo_root, env, "jobs.evaluate", "--checkpoint", f"{ROOT}/models/tiny", "--shards", f"{ROOT}/shards/train",
                "--labels", half, "--output", str(tmp_path / "report"))  # fmt: skip
    assert proc.returncode == 2 and f"{half}: not a published labels output (no _SUCCESS marker)" in proc.stderr, proc.stderr
    from pipeline.loader import DatasetSpec, TrainStream
    from pipeline.outputs import UnpublishedOutputError

    world = chain[0]
    with pytest.raises(UnpublishedOutputError, match=f"{half}: not a published labels output"):
        TrainStream([DatasetSpec("half", f"{ROOT}/shards/train", half)], world.tokenizer, 64, 4, seed=0)
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(half)} == before  # nothing overwritten
    assert not os.path.exists(tmp_path / "report")
