"""jobs.ingest end to end against the synthetic world served on 127.0.0.1, on a real Ray head.

Each run downloads for real through img2dataset on Ray; the ground truth of every row
(good, dead_url, not_image, truncated_jpeg, empty_caption) says where it must end up.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from jobs._cli import SUBMITTED
from pipeline import ingest, synthetic
from pipeline.images import ImageResizer
from pipeline.shards import find_shards, index_tar
from schemas import SHARD_MANIFEST, URL_TABLE, read_table, reason_counts

EXPECTED_REASON = {"dead_url": "http_404", "not_image": "not_an_image", "truncated_jpeg": "decode_error"}
TEST_LIMIT_S = 150  # a bound, not a target: the runs take 10-40 s, more when the machine is busy


@pytest.fixture(autouse=True)
def time_limit():
    """Every test here ends within TEST_LIMIT_S seconds, in-process Ray calls included."""

    def expire(signum, frame):
        raise TimeoutError(f"test ran past {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_driver(ray_head):
    """This process connected to the shared head: in-process ``main([...])`` calls reuse it (and its workers)."""
    import ray

    ray.init(address=ray_head.gcs_address, logging_level=logging.WARNING)
    yield ray_head
    ray.shutdown()


# ----------------------------------------------------------------------------- reading outputs


def shard_samples(out: str) -> dict[str, list[dict]]:
    """uid -> every sample carrying it in the output's tars (key, caption, json, image size)."""
    found: dict[str, list[dict]] = {}
    keys = []
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, files in members.items():
            meta = json.loads(files["json"])
            keys.append(key)
            assert meta["key"] == key
            found.setdefault(meta["uid"], []).append(
                {"key": key, "txt": files["txt"].decode(), "json": meta, "size": Image.open(io.BytesIO(files["jpg"])).size, "shard": path}
            )
    assert len(keys) == len(set(keys)), "a sample key appears twice"
    return found


def row_outcomes(out: str) -> dict[str, str]:
    """uid -> "success" or the failure reason, from the per-shard parquet files."""
    outcomes = {}
    for path in sorted(glob.glob(os.path.join(out, "[0-9]*.parquet"))):
        for row in pq.read_table(path, columns=["uid", "status", "error_message"]).to_pylist():
            assert row["uid"] not in outcomes, f"{row['uid']} in two shards"
            outcomes[row["uid"]] = "success" if row["status"] == "success" else ingest.classify_error(row["error_message"])
    return outcomes


def summary_of(out: str) -> dict:
    with open(os.path.join(out, "ingest_summary.json")) as f:
        return json.load(f)


def clean(text: str) -> str:
    return "\n".join(" ".join(line.split()) for line in text.split("\n") if line.split())


def check_against_world(out: str, samples: list[dict], uid, caption) -> None:
    """Every good row lands exactly once with its caption; every bad row is counted under its reason."""
    landed, outcomes, summary = shard_samples(out), row_outcomes(out), summary_of(out)
    good = {uid(s): s for s in samples if s["kind"] == "good"}
    assert set(landed) == set(good)
    for key, s in good.items():
        assert len(landed[key]) == 1
        assert landed[key][0]["txt"] == clean(caption(s))
        assert outcomes[key] == "success"
    for s in samples:
        if s["kind"] in EXPECTED_REASON:
            assert outcomes[uid(s)] == EXPECTED_REASON[s["kind"]], (uid(s), s["kind"])
    kinds = Counter(s["kind"] for s in samples)
    assert summary["filtered"].get("empty_caption", 0) == kinds["empty_caption"]
    assert summary["failed"] == {EXPECTED_REASON[k]: n for k, n in kinds.items() if k in EXPECTED_REASON}
    assert summary["downloaded"] == kinds["good"]
    assert summary["selected"] == summary["downloaded"] + sum(summary["failed"].values()) + summary["pending"]
    assert summary["pending"] == 0
    manifest = read_table(os.path.join(out, "manifest.parquet"), SHARD_MANIFEST)
    assert sum(manifest.column("successes").to_pylist()) == kinds["good"]
    from_manifest: Counter = Counter()
    for rows in manifest.column("failures_by_reason").to_pylist():
        from_manifest.update(reason_counts(rows))
    assert dict(from_manifest) == summary["failed"]
    assert all(os.path.exists(p) for p in manifest.column("shard").to_pylist())
    assert not os.path.exists(os.path.join(out, ingest.TMP))


def run_job(*args: str) -> int:
    return ingest_job.main([*args, "--image-size", "64", "--threads", "4", "--processes", "2"])


# ----------------------------------------------------------------------------- units


def test_classify_error_messages():
    assert ingest.classify_error("HTTP Error 404: File not found") == "http_404"
    assert ingest.classify_error("HTTP Error 503: Service Unavailable") == "http_503"
    assert ingest.classify_error("<urlopen error timed out>") == "timeout"
    assert ingest.classify_error("The read operation timed out") == "timeout"
    assert ingest.classify_error("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert ingest.classify_error("<urlopen error [Errno -2] Name or service not known>") == "connection_error"
    assert ingest.classify_error("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>") == "ssl_error"
    assert ingest.classify_error("Use of image disallowed by X-Robots-Tag directive") == "disallowed_by_robots"
    assert ingest.classify_error("not_an_image: html") == "not_an_image"
    assert ingest.classify_error("decode_error: jpeg") == "decode_error"
    assert ingest.classify_error("image too small") == "image_too_small"
    assert ingest.classify_error("something new") == "other"
    assert ingest.failures_by_reason({"success": 5, "HTTP Error 404: Not Found": 2, "HTTP Error 404: File not found": 1}) == {"http_404": 3}


def test_resizer_tells_html_from_a_broken_image():
    sample = synthetic.make_sample(0, "train", 0)
    jpeg = synthetic.jpeg_bytes(synthetic.render(sample, 0))
    png = io.BytesIO()
    synthetic.render(sample, 0).save(png, "PNG")
    resizer = ImageResizer(image_size=64, resize_mode="center_crop")
    img, width, height, *_, error = resizer(io.BytesIO(jpeg))
    assert error is None and (width, height) == (64, 64) and img[:3] == b"\xff\xd8\xff"
    assert resizer(io.BytesIO(jpeg[: len(jpeg) * 4 // 10]))[-1] == "decode_error: jpeg"
    assert resizer(io.BytesIO(png.getvalue()[:300]))[-1] == "decode_error: png"
    assert resizer(io.BytesIO(b"<!doctype html><html><body>Moved</body></html>"))[-1] == "not_an_image: html"
    assert resizer(io.BytesIO(b'{"error": "not found"}'))[-1] == "not_an_image: json"
    assert resizer(io.BytesIO(b""))[-1] == "not_an_image: empty"


def test_last_gate_refuses_non_http_urls(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"key": "a", "url": "http://127.0.0.1/a.jpg", "caption": "a", "source": "cc3m", "split": "train"},
            {"key": "b", "url": "file:///etc/passwd", "caption": "b", "source": "cc3m", "split": "train"},
        ],
        schema=URL_TABLE,
    )
    with pytest.raises(ValueError, match=r"row 1 \(key b\) holds a URL that is not http\(s\): 'file:///etc/passwd'"):
        ingest.check_urls(table, None)
    with pytest.raises(ValueError, match="path outside"):
        ingest.check_urls(table, str(tmp_path))


def test_usage_errors_name_the_path(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.tsv")
    assert ingest_job.main(["--source", "cc3m", "--input", missing, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--input {missing}: no such file" in err and "resolved" in err
    cfg = ingest_job.IngestConfig(source="cc3m", input="data/cc3m.tsv", output="/abs/out")
    monkeypatch.setenv(SUBMITTED, "{}")
    with pytest.raises(ValueError, match="--input data/cc3m.tsv is relative: .*on the cluster"):
        ingest_job.check_paths(cfg)
    monkeypatch.delenv(SUBMITTED)
    with pytest.raises(ValueError, match="--url-map"):
        ingest_job.IngestConfig(source="openimages", input="/x", output="/y")
    with pytest.raises(SystemExit):
        ingest_job.main(["--source", "cc3m", "--input", "/x", "--output", "/y", "--resize-mode", "stretch"])
    url_list = tmp_path / "list.tsv"
    url_list.write_text("a caption\thttp://127.0.0.1:9/a.jpg\n")
    foreign = tmp_path / "foreign"  # shards some other tool wrote
    foreign.mkdir()
    (foreign / "00000_stats.json").write_text("{}")
    assert ingest_job.main(["--source", "cc3m", "--input", str(url_list), "--output", str(foreign)]) == 2
    assert "did not write" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


@pytest.mark.cluster
def test_submit_cc3m_every_row_lands_once_or_is_counted(served_world, ray_head, repo_root, tmp_path):
    """`ray job submit` of the CC3M tsv (no header): the full contract on real downloads."""
    world, _, paths = served_world
    out = str(tmp_path / "cc3m")
    entry = [
        "python", "-m", "jobs.ingest", "--source", "cc3m", "--input", paths["train"]["cc3m"], "--output", out,
        "--image-size", "64", "--resize-mode", "center_crop", "--samples-per-shard", "16", "--threads", "4",
    ]  # fmt: skip
    proc = ray_head.submit(entry, working_dir=repo_root, timeout=TEST_LIMIT_S - 10)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "ingestion summary: cc3m" in logs and "ingest config:" in logs
    samples = world.samples("train")
    check_against_world(out, samples, lambda s: f"cc3m-{s['index']:09d}", lambda s: s["caption"].split("\n")[0])
    landed = shard_samples(out)
    one = next(iter(landed.values()))[0]
    assert one["size"] == (64, 64)
    assert {k: one["json"][k] for k in ("source", "split")} == {"source": "cc3m", "split": "train"}
    assert one["json"]["url"].startswith("http://127.0.0.1:")
    urls = read_table(os.path.join(out, "urls.parquet"), URL_TABLE)
    assert urls.num_rows == sum(s["kind"] != "empty_caption" for s in samples)
    manifest = read_table(os.path.join(out, "manifest.parquet"), SHARD_MANIFEST)
    assert manifest.num_rows == -(-urls.num_rows // 16) and set(manifest.column("attempts").to_pylist()) == {1}
    with open(os.path.join(out, "ingest_config.json")) as f:
        assert json.load(f)["input"] == [paths["train"]["cc3m"]]
    # 4 download threads finish in any order; every shard holds its samples in key order all the same
    for shard in find_shards(out):
        keys = index_tar(shard.tar).keys
        assert keys == sorted(keys) and len(keys) > 1, shard.name
        rows = pq.read_table(shard.parquet, columns=["key", "status"]).to_pylist()
        assert [r["key"] for r in rows] == sorted(r["key"] for r in rows), shard.name
        assert [r["key"] for r in rows if r["status"] == "success"] == keys, shard.name


@pytest.mark.cluster
def test_file_urls_never_land_and_filters_are_counted(served_world, ray_driver, tmp_path):
    """A URL list (with a header line) holding file:// URLs to real local images, blocked hosts, dupes."""
    world, base_url, _ = served_world
    good = [s for s in world.samples("train") if s["kind"] == "good"][:6]
    local_image = os.path.join(world.root, good[0]["file"])
    assert os.path.getsize(local_image) > 0
    port = base_url.rsplit(":", 1)[1]
    rows = [("caption", "url")]
    rows += [(f"  {s['caption'].split(chr(10))[0]} \u00a0 with   spaces ", f"{base_url}/{s['file']}") for s in good]
    rows += [
        ("a local file", f"file://{local_image}"),
        ("a local file again", f"FILE://{local_image}"),
        ("a local path", local_image),
        ("a tor gateway", "http://dstormer6em3i4km.onion.link/a.jpg"),
        ("a blocked host", f"http://localhost:{port}/{good[1]['file']}"),
        ("a blocked path", f"{base_url}/blocked/{good[2]['file']}"),
        ("the same URL again", f"{base_url}/{good[3]['file']}"),
    ]
    url_list = tmp_path / "urls.tsv"
    url_list.write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# loopback by name\nlocalhost\n*/blocked/*\n")
    out = str(tmp_path / "out")
    assert run_job("--source", "cc3m", "--input", str(url_list), "--output", out, "--blocklist", str(blocklist), "--samples-per-shard", "4") == 0
    summary = summary_of(out)
    assert summary["filtered"] == {"bad_scheme": 3, "blocklisted": 3, "duplicate_url": 1}
    landed = shard_samples(out)
    assert sorted(landed) == [f"cc3m-{i:09d}" for i in range(len(good))]
    assert all(e["json"]["url"].startswith(base_url + "/images/") for v in landed.values() for e in v)
    assert landed["cc3m-000000000"][0]["txt"] == clean(good[0]["caption"].split("\n")[0]) + " with spaces"
    urls = read_table(os.path.join(out, "urls.parquet"), URL_TABLE).column("url").to_pylist()
    assert not any(u.lower().startswith("file:") or u.startswith("/") for u in urls)


def _download_workers() -> list:
    """Live Ray worker processes running img2dataset's shard task."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("ray_download" in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.cluster
def test_killed_run_resumes_without_duplicates(served_world, ray_head, repo_root, tmp_path):
    """SIGKILL while shards are being written, then the same command again: every key once, none missing.

    Shard 0's URLs answer at once; every other shard's URLs wait at a gate of the test server,
    so the kill lands with exactly shard 0 done whatever the machine's speed. The gate opens only
    after the killed run's download tasks are gone.
    """
    world, base_url, _ = served_world
    samples = world.samples("val")
    gate = f"kill-{os.path.basename(tmp_path)}"
    kept = 0  # rows that pass the filters (empty captions do not) are sharded in order, 4 per shard
    with open(tmp_path / "gated.tsv", "w") as url_list:
        for s in samples:
            url_list.write(f"{s['caption'].split(chr(10))[0]}\t{base_url}/{'' if kept < 4 else f'gate/{gate}/'}{s['file']}\n")
            kept += s["kind"] != "empty_caption"
    out = str(tmp_path / "out")
    cmd = [
        sys.executable, "-m", "jobs.ingest", "--source", "cc3m", "--input", str(tmp_path / "gated.tsv"), "--output", out,
        "--image-size", "64", "--samples-per-shard", "4", "--threads", "2", "--processes", "2",
        "--timeout", "100",  # held downloads wait at the gate, never time out
        "--address", ray_head.gcs_address,
    ]  # fmt: skip
    shards = -(-kept // 4)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(cmd, cwd=repo_root, env=ray_head.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while not ingest.done_shards(out) and first.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
    deadline = time.time() + 60
    while _download_workers() and time.time() < deadline:  # Ray ends the tasks of a driver that died
        time.sleep(0.2)
    assert not _download_workers(), "the killed run's download tasks are still alive"
    assert ingest.done_shards(out) == {0}, log_path.read_text()[-3000:]
    for tar in glob.glob(os.path.join(out, "*.tar")):  # a shard's tar appears whole or not at all
        assert os.path.exists(tar[: -len(".tar")] + ".parquet")
        with tarfile.open(tar) as t:
            t.getmembers()

    urllib.request.urlopen(f"{base_url}/open/{gate}", timeout=10).read()
    second = subprocess.run(cmd, cwd=repo_root, env=ray_head.env, capture_output=True, text=True, timeout=TEST_LIMIT_S - 60)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = summary_of(out)
    assert summary["shards"]["done_before"] == 1
    assert summary["shards"]["done_this_run"] == shards - 1
    check_against_world(out, samples, lambda s: f"cc3m-{s['index']:09d}", lambda s: s["caption"].split("\n")[0])


@pytest.mark.cluster
def test_failed_shard_is_retried_then_completed_by_a_rerun(served_world, ray_driver, tmp_path):
    """A shard whose tar cannot be put in place fails on every attempt: bounded retries, exit 1, then a
    re-run finishes it (and redoes a shard whose stats file a crash cut short)."""
    world, _, paths = served_world
    out = tmp_path / "out"
    (out / "00001.tar").mkdir(parents=True)  # a folder where shard 1's tar must go
    (out / "00001.tar" / "in_the_way").write_text("x")
    args = ["--source", "cc3m", "--input", paths["val"]["cc3m"], "--output", str(out), "--samples-per-shard", "8", "--max-shard-retries", "2"]
    assert run_job(*args) == 1
    summary = summary_of(str(out))
    assert list(summary["shards"]["failed"]) == ["1"] and summary["shards"]["retries_this_run"] == 2
    assert summary["pending"] == 8
    with open(out / "ingest_attempts.json") as f:
        assert json.load(f)["1"] == 3

    shutil.rmtree(out / "00001.tar")
    (out / "00000_stats.json").write_text('{"count": 8, "succ')  # as if a crash cut it short
    assert run_job(*args) == 0
    manifest = read_table(str(out / "manifest.parquet"), SHARD_MANIFEST).to_pylist()
    assert {os.path.basename(r["shard"]): r["attempts"] for r in manifest} == {"00000.tar": 2, "00001.tar": 4, "00002.tar": 1}
    assert summary_of(str(out))["shards"]["done_before"] == 1
    samples = world.samples("val")
    check_against_world(str(out), samples, lambda s: f"cc3m-{s['index']:09d}", lambda s: s["caption"].split("\n")[0])


@pytest.mark.cluster
def test_coco_captions_json(served_world, ray_driver, tmp_path):
    world, _, paths = served_world
    out = str(tmp_path / "coco")
    assert run_job("--source", "coco", "--input", paths["val"]["coco"], "--output", out, "--split", "val", "--samples-per-shard", "10") == 0
    samples = world.samples("val")
    check_against_world(out, samples, lambda s: f"coco-{100000 + s['index']}", lambda s: s["caption"])
    assert any("\n" in e["txt"] for v in shard_samples(out).values() for e in v)  # all captions of an image
    assert {e["json"]["split"] for v in shard_samples(out).values() for e in v} == {"val"}


@pytest.mark.cluster
def test_coco_local_images_folder_is_packed_without_download(served_world, ray_driver, tmp_path):
    world, _, paths = served_world
    with open(paths["val"]["coco"]) as f:
        coco = json.load(f)
    for image in coco["images"]:  # nothing answers on port 9: a download attempt would fail
        image["coco_url"] = "http://127.0.0.1:9/unreachable.jpg"
    captions = tmp_path / "captions_val.json"
    captions.write_text(json.dumps(coco))
    out = str(tmp_path / "coco_local")
    images_dir = os.path.join(world.root, "images", "val")
    assert run_job("--source", "coco", "--input", str(captions), "--images-dir", images_dir, "--output", out, "--split", "val", "--samples-per-shard", "10") == 0
    samples = world.samples("val")
    landed, outcomes = shard_samples(out), row_outcomes(out)
    good = {f"coco-{100000 + s['index']}": s for s in samples if s["kind"] == "good"}
    assert set(landed) == set(good)
    assert all(len(v) == 1 and v[0]["txt"] == clean(good[k]["caption"]) for k, v in landed.items())
    local_reason = {"dead_url": "file_not_found", "not_image": "not_an_image", "truncated_jpeg": "decode_error"}
    for s in samples:
        if s["kind"] in local_reason:
            assert outcomes[f"coco-{100000 + s['index']}"] == local_reason[s["kind"]]
    assert all(e["json"]["url"].startswith(images_dir + os.sep) for v in landed.values() for e in v)


@pytest.mark.cluster
def test_laion_filters_and_reproducible_limit(served_world, ray_driver, tmp_path):
    world, _, paths = served_world
    raw = pq.read_table(paths["train"]["laion"]).to_pylist()
    threshold = sorted(r["similarity"] for r in raw)[len(raw) // 4]
    out = str(tmp_path / "laion")
    args = ["--source", "laion", "--input", paths["train"]["laion"], "--output", out, "--min-similarity", str(threshold), "--min-width", "128", "--limit", "20", "--seed", "3", "--samples-per-shard", "8"]  # fmt: skip
    assert run_job(*args) == 0
    summary = summary_of(out)
    low = sum(r["similarity"] < threshold for r in raw)
    assert summary["skipped_reading"] == {"low_similarity": low}
    assert summary["selected"] == 20
    urls = read_table(os.path.join(out, "urls.parquet"), URL_TABLE)
    assert urls.num_rows == 20
    by_key = {f"laion-{s['index']:09d}": s for s in world.samples("train")}
    assert all(raw[int(k.split("-")[1])]["similarity"] >= threshold for k in urls.column("key").to_pylist())
    landed, outcomes = shard_samples(out), row_outcomes(out)
    assert set(landed) == {k for k in urls.column("key").to_pylist() if by_key[k]["kind"] == "good"}
    for k in urls.column("key").to_pylist():
        if by_key[k]["kind"] in EXPECTED_REASON:
            assert outcomes[k] == EXPECTED_REASON[by_key[k]["kind"]]
    # the same command again finds every shard done and selects the very same rows
    assert run_job(*args) == 0
    assert summary_of(out)["shards"]["done_this_run"] == 0
    assert read_table(os.path.join(out, "urls.parquet"), URL_TABLE).equals(urls)
    # another seed on the same output is refused: it would describe other shards
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert run_job(*[a if a != "3" else "4" for a in args]) == 2
    assert "--seed 3 -> 4" in err.getvalue()


@pytest.mark.cluster
def test_openimages_direct_run_starts_its_own_ray(served_world, repo_root, tmp_path):
    """`python -m jobs.ingest` with no cluster address: a private local Ray, stopped at the end."""
    world, _, paths = served_world
    out = str(tmp_path / "openimages")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable, "-m", "jobs.ingest", "--source", "openimages", "--input", paths["val"]["openimages"],
        "--url-map", paths["val"]["openimages_urls"], "--output", out, "--split", "val",
        "--image-size", "64", "--samples-per-shard", "12", "--threads", "4", "--processes", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=TEST_LIMIT_S - 10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = world.samples("val")
    check_against_world(out, samples, lambda s: f"openimages-{s['index']:016x}", lambda s: "\n".join(s["caption"].split("\n")[:2]))


class _FailingPacker(ingest.LocalImagePacker):
    """The real shard worker, its third image unreadable in a way no reason covers: the shard task fails."""

    def fetch(self, path: str) -> ingest.Fetched:
        if path.endswith("2.jpg"):
            raise RuntimeError("the disk went away")
        return super().fetch(path)


@pytest.mark.parametrize("worker_class", [ingest.LocalImagePacker, _FailingPacker])
def test_a_shard_for_a_bucket_is_written_on_local_disk_and_never_left_behind(worker_class, world, tmp_path, monkeypatch):
    """Output on object storage (fsspec's memory:// here): the shard is written in a local temporary folder
    and uploaded once in key order; a shard task that fails leaves nothing, locally or in the bucket."""
    import fsspec

    local_tmp = tmp_path / "local_tmp"
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))  # where the worker's mkdtemp goes
    images = [os.path.join(world.root, s["file"]) for s in world.samples("val") if s["kind"] == "good"][:4]
    root = tmp_path / "images"
    root.mkdir()
    paths = []
    for i, src in enumerate(images):
        paths.append(str(root / f"{i}.jpg"))
        shutil.copyfile(src, paths[-1])
    out = f"memory://bucket-{worker_class.__name__}/shards"
    rows = pa.table({"uid": [f"u{i}" for i in range(4)], "url": paths, "caption": [f"caption {i}" for i in range(4)]})
    arrow = f"{out}/_tmp/0.feather"
    with fsspec.open(arrow, "wb") as f, pa.ipc.new_file(f, rows.schema) as writer:
        writer.write_table(rows)
    worker = worker_class(ingest.AtomicWebDatasetWriter, ingest.ShardSettings(image_size=32).resizer(), out, rows.column_names, 10, 5, threads=2, root=str(root))
    ok, _ = worker((0, arrow))
    fs = fsspec.filesystem("memory")
    left = sorted(p for p in fs.find(out.removeprefix("memory://")) if not p.endswith("0.feather"))
    assert os.listdir(local_tmp) == []  # the work folder is gone in both cases
    if worker_class is _FailingPacker:
        assert not ok and left == []  # nothing published, no work files in the bucket
        return
    assert ok and [os.path.basename(p) for p in left] == ["00000.parquet", "00000.tar", "00000_stats.json"]
    keys = [sample.key for sample in index_tar(f"{out}/00000.tar").samples]
    assert len(keys) == 4 and keys == sorted(keys)  # every image, in key order
