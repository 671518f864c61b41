"""Labels, evaluation and ingestion on a local cluster of three nodes, one of which is lost mid-job.

The cluster is real: a head (``ray start --head``, no CPUs of its own, so it runs only the
drivers and Ray's services, as on a real cluster) and two worker nodes (``ray start
--address``) of one CPU each, every node its own process group. In each test one worker
node is SIGKILLed while it holds work of the job, and a new node joins: the job finishes
with every sample exactly once and the same outputs as without a loss.

The kill is never timed by a sleep. Labels and evaluation run with a stage subclass that,
on the first call to reach a chosen point (a given shard; the predictor's third batch),
writes which node it runs on and waits there; the test kills that node. Ingestion's
downloads all wait at a gate of the synthetic HTTP server, so a download task is
in flight on the node when it is killed, and the gate opens only after the new node
joined. The same thing is tested on a fast machine and on a loaded one.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from pipeline import evaluation, labels, ray_local
from pipeline.shards import find_shards
from schemas import LABEL_TABLE, read_table

pytestmark = pytest.mark.cluster

HOLD_LIMIT_S = 120  # a held stage gives up (and fails the test) if its node is not killed by then
JOB_LIMIT_S = 180  # a bound, not a target


class LocalCluster:
    """The head, its live worker nodes, and the means to lose one and add another."""

    def __init__(self, head: ray_local.RayHead):
        self.head = head
        self.workers: dict[str, ray_local.RayWorker] = {}
        self.joined = 0

    def join(self) -> ray_local.RayWorker:
        name = f"node_{chr(ord('a') + self.joined)}"
        self.joined += 1
        self.workers[name] = ray_local.start_worker(self.head, name, num_cpus=1, object_store_mb=128)
        return self.workers[name]

    def lose(self, node_id: str) -> ray_local.RayWorker:
        """SIGKILL the worker node ``node_id`` (never the head); wait until the cluster sees it gone."""
        (worker,) = [w for w in self.workers.values() if w.node_id == node_id]
        del self.workers[worker.name]
        worker.kill()
        deadline = time.time() + 60
        while any(n["node_id"] == node_id for n in ray_local.alive_nodes(self.head)):
            assert time.time() < deadline, f"the cluster still lists {worker.name} alive a minute after its kill"
            time.sleep(0.2)
        return worker

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.head.stop()


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + node_a + node_b (1 CPU each), with this process as a driver connected to it."""
    import ray

    cluster = LocalCluster(ray_local.start_head(num_cpus=0, object_store_mb=256))
    try:
        cluster.join()
        cluster.join()
        ray.init(address=cluster.head.gcs_address, logging_level=logging.WARNING)
        nodes = ray_local.alive_nodes(cluster.head)
        (head_node,) = [n["node_id"] for n in nodes if n["is_head"]]
        assert ray.get_runtime_context().get_node_id() == head_node  # drivers on the head: never on a node that is killed
        assert sorted(n["resources"].get("CPU", 0) for n in nodes) == [0, 1, 1]
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def wait_for_file(path: str, job: concurrent.futures.Future | None = None, limit_s: float = HOLD_LIMIT_S) -> str:
    """The content of ``path`` once it exists; fails when ``job`` ends first or after ``limit_s``."""
    deadline = time.time() + limit_s
    while not os.path.exists(path):
        if job is not None and job.done():
            job.result()  # raises the job's error
            pytest.fail(f"the job finished before it reached the point where its node is killed ({path})")
        assert time.time() < deadline, f"{path} did not appear within {limit_s} s"
        time.sleep(0.05)
    with open(path) as f:
        return f.read()


def hold(marker: str, what: str) -> None:
    """Write where this process runs (node id) and what it holds to ``marker``, then wait to be killed."""
    import ray

    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"node_id": ray.get_runtime_context().get_node_id(), "holds": what}, f)
    os.replace(tmp, marker)
    time.sleep(HOLD_LIMIT_S)
    raise RuntimeError(f"held {what} for {HOLD_LIMIT_S} s and the node was never killed")


def lose_the_holder_and_join(cluster: LocalCluster, marker: str, job: concurrent.futures.Future) -> tuple[dict, str]:
    """Wait until a stage holds at ``marker``, kill its node, add a new one: (what the marker said, the new node's id)."""
    held = json.loads(wait_for_file(marker, job))
    before = {n["node_id"] for n in ray_local.alive_nodes(cluster.head)}
    assert held["node_id"] in {w.node_id for w in cluster.workers.values()}, (held, before)
    cluster.lose(held["node_id"])
    new = cluster.join()
    assert new.node_id not in before
    return held, new.node_id


# ----------------------------------------------------------------------------- labels


def test_labels_survive_a_lost_node(cluster, shards, tmp_path):
    """The actor holding shard 00001 loses its node: the shard is labelled again on the node that joins,
    and every table, count and the vocabulary equal the labels written without Ray."""
    from tests.conftest import write_label_tables

    marker = str(tmp_path / "held")
    found = find_shards(shards["train"])
    assert [s.name for s in found] == ["00000", "00001", "00002"]

    class HoldsShard00001(labels.LabelShards):
        def __call__(self, batch):
            if batch["shard"][0].as_py() == "00001" and not os.path.exists(marker):
                hold(marker, "shard 00001")
            return super().__call__(batch)

    out = tmp_path / "out"
    settings = labels.LabelSettings("spacy", batch_size=16, concurrency=2)  # one actor per worker node
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(labels.label_shards, found, str(out), settings, stage_cls=HoldsShard00001)
        held, _ = lose_the_holder_and_join(cluster, marker, job)
        summary = job.result(timeout=JOB_LIMIT_S)
    assert held["holds"] == "shard 00001"

    reference = write_label_tables(shards["train"], str(tmp_path / "one_node"))
    names = sorted(os.listdir(os.path.join(reference, "labels")))
    assert sorted(os.listdir(out / "labels")) == names == ["00000.parquet", "00001.parquet", "00002.parquet"]
    rows = 0
    for name in names:
        got = read_table(out / "labels" / name, LABEL_TABLE)
        want = read_table(os.path.join(reference, "labels", name), LABEL_TABLE).sort_by("key")
        keys = got["key"].to_pylist()
        assert keys == labels.read_tar_keys(os.path.join(shards["train"], name.replace(".parquet", ".tar")))  # each sample once
        assert got.select(LABEL_TABLE.names).to_pylist() == want.select(LABEL_TABLE.names).to_pylist(), name
        rows += got.num_rows
    assert (summary["shards"], summary["shards_written"], summary["shards_skipped"], summary["captions"]) == (3, 3, 0, rows)
    vocab, expected = labels.merge_stats({n: labels.shard_stats(read_table(os.path.join(reference, "labels", n), LABEL_TABLE)) for n in names})
    assert {k: summary[k] for k in expected} == expected
    assert pq.read_table(out / labels.VOCAB_FILE).to_pylist() == vocab.to_pylist()


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_survives_a_lost_node(cluster, labelled_shards, world, tmp_path):
    """The predictor loses its node on its third batch (the scorer and read tasks there go with it): every
    sample comes back exactly once, with the predictions and figures of the same stages run without Ray."""
    import numpy as np
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from jobs.evaluate import WORKER_ENV
    from model.checkpoint import check_pretrained, save_pretrained
    from model.tokenizer import Tokenizer
    from tests.test_evaluate import _tar_keys
    from tests.test_model import _tiny_model

    shards, labels_dir = labelled_shards["val"]
    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    marker = str(tmp_path / "held")

    class HoldsItsThirdBatch(evaluation.Predict):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 3 and not os.path.exists(marker):
                hold(marker, "the predictor's third batch")
            return super().__call__(batch)

    plan = evaluation.StagePlan(batch_size=4, predictor_cpus=0.5, worker_env=dict(WORKER_ENV))
    reads = evaluation.plan_reads(find_shards(shards, labels=labels_dir), labels_dir, plan.batch_size)
    image_size = check_pretrained(export).vision.image_size
    predictor, scorer = {"checkpoint": export, "k": 10, "threads": 1}, {"ks": [10], "threads": 1}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(
            evaluation.run_evaluation, reads, image_size=image_size, predictor=predictor, scorer=scorer, plan=plan, predictor_cls=HoldsItsThirdBatch
        )
        lose_the_holder_and_join(cluster, marker, job)
        run = job.result(timeout=JOB_LIMIT_S)

    keys = list(zip(run.table.column("shard").to_pylist(), run.table.column("key").to_pylist()))
    assert keys == _tar_keys(shards) and len(keys) > 15  # each sample exactly once, none lost with the node

    # the same stages on plain batches, in this process
    predict, score = evaluation.Predict(**predictor), evaluation.Score(**scorer)
    parts = []
    for spec in reads:
        samples = evaluation.read_samples_batch(pa.Table.from_pylist([spec]))
        decoded = evaluation.decode_batch(samples, image_size=image_size)
        parts.append(score(predict(BlockAccessor.for_block(decoded).to_batch_format("numpy"))))
    want = pa.concat_tables(parts).sort_by([("shard", "ascending"), ("key", "ascending")]).to_pylist()
    got = run.table.to_pylist()
    assert [(r["key"], r["error"], r["targets"], r["predictions"]) for r in got] == [(r["key"], r["error"], r["targets"], r["predictions"]) for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["probabilities"], w["probabilities"], rtol=1e-4)
        if w["recall_at"] is not None:
            np.testing.assert_allclose(g["recall_at"], w["recall_at"], atol=1e-5)


# ----------------------------------------------------------------------------- ingestion


def _running_downloads(cluster: LocalCluster) -> list:
    from ray.util.state import list_tasks

    return list_tasks(address=cluster.head.dashboard_url, filters=[("name", "=", "ray_download"), ("state", "=", "RUNNING")], raise_on_missing_output=False)


def test_ingestion_survives_a_lost_node(cluster, served_world, repo_root, tmp_path):
    """Every download waits at a gate: a shard task is in flight on each worker node when one node is killed.
    The job retries that shard (on the node that joined, or the other one once it is free): every good row
    lands exactly once, every bad row is counted, and only the lost shard took a second attempt."""
    from tests.test_ingest import check_against_world, summary_of

    world, base_url, _ = served_world
    samples = world.samples("val")
    gate = f"lost-node-{os.path.basename(tmp_path)}"
    (tmp_path / "gated.tsv").write_text("".join(f"{s['caption'].split(chr(10))[0]}\t{base_url}/gate/{gate}/{s['file']}\n" for s in samples))
    out = str(tmp_path / "out")
    cmd = [
        sys.executable, "-m", "jobs.ingest", "--source", "cc3m", "--input", str(tmp_path / "gated.tsv"), "--output", out,
        "--image-size", "64", "--samples-per-shard", "4", "--threads", "2", "--processes", "2",
        "--timeout", "100",  # held downloads wait at the gate, never time out
        "--address", cluster.head.gcs_address,
    ]  # fmt: skip
    log_path = tmp_path / "ingest.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=cluster.head.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            workers = {w.node_id for w in cluster.workers.values()}
            deadline = time.time() + HOLD_LIMIT_S
            while not (running := [t for t in _running_downloads(cluster) if t.node_id in workers]):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no download task started on a worker node"
                time.sleep(0.2)
            cluster.lose(running[0].node_id)
            cluster.join()
            urllib.request.urlopen(f"{base_url}/open/{gate}", timeout=10).read()
            rc = proc.wait(timeout=JOB_LIMIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = log_path.read_text()
    assert rc == 0, logs[-3000:]
    check_against_world(out, samples, lambda s: f"cc3m-{s['index']:09d}", lambda s: s["caption"].split("\n")[0])
    summary = summary_of(out)
    shards = summary["shards"]
    assert shards["retries_this_run"] == 1 and not shards["failed"], shards
    attempts = json.loads((tmp_path / "out" / "ingest_attempts.json").read_text())
    assert sorted(attempts.values()) == [1] * (len(attempts) - 1) + [2]
