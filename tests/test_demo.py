"""The whole chain, as `make demo` runs it, at a smaller size: the demo model must learn.

``python -m jobs.demo`` in a subprocess: the synthetic world served on 127.0.0.1, its own
Ray head, ``ray job submit`` ingestion / labels / evaluation, the ``deepspeed`` launcher
with 2 ranks. Fixed seeds (world, training, data stream) make the figures reproducible.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from schemas import (
    CAPTION_REPORT,
    CAPTIONS,
    CLOSED_SET,
    CONFUSION,
    LABEL_TABLE,
    PREDICTIONS,
    REPORT,
    SHARD_MANIFEST,
    read_table,
)

pytestmark = [pytest.mark.cluster, pytest.mark.launcher]


def test_demo_model_learns(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, f"jobs.demo exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    summary = json.load(open(os.path.join(out, "summary.json")))
    trained, untrained = summary["trained_exact_recall_at_5"], summary["untrained_exact_recall_at_5"]
    assert trained >= 0.7, summary
    assert trained >= 3 * untrained, summary
    assert summary["trained_semantic_recall_at_5"] >= summary["untrained_semantic_recall_at_5"] + 0.15, summary
    assert summary["learned"] is True
    assert "learning check" in proc.stdout and ": PASS" in proc.stdout


def _readme_table_lines(repo_root: str) -> list[str]:
    """The shell lines of the README's "Every table in one line" block, as written."""
    text = open(os.path.join(repo_root, "README.md")).read()
    section = text.split("### Every table in one line", 1)[1].split("\n#", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_one_liners_read_every_table_of_the_demo(demo_run, repo_root, tmp_path):
    """Each DuckDB / pandas / polars line of the README, run by the shell as written, from a folder
    where demo/ is the demo's output: it reads its table and prints rows."""
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = _readme_table_lines(repo_root)
    files = {m for line in lines for m in re.findall(r"'demo/([^']+\.parquet)'", line)}
    wanted = {"shards/train/urls.parquet", "shards/train/manifest.parquet", "shards/train_curated/curation.parquet",
              "labels/train/labels/*.parquet", "labels/train/vocab.parquet", "reports/trained/report.parquet",
              "reports/trained/predictions.parquet", "reports/trained/closed_set.parquet", "reports/trained/confusion.parquet",
              "reports/trained/captions.parquet", "reports/trained/caption_report.parquet"}  # fmt: skip
    assert wanted <= files, sorted(wanted - files)  # every table the chain writes has its line
    os.symlink(out, tmp_path / "demo")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # the confusion table holds the pairs the model got wrong: none when every top-1 class was right
    # (a model trained on one machine's numerics may get all 96 held-out images right)
    confused = read_table(os.path.join(out, "reports", "trained", "confusion.parquet"), CONFUSION).num_rows
    for line in lines:
        run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{line}\n{run.stderr[-2000:]}"
        empty = "confusion.parquet" in line and confused == 0
        assert run.stdout.strip() and ("0 rows" in run.stdout) == empty, f"{line}\n{run.stdout}"
    if not confused:
        closed = read_table(os.path.join(out, "reports", "trained", "closed_set.parquet"), CLOSED_SET)
        assert all(v == 1.0 for v in closed.column("top1_correct_at_5").to_pylist() if v is not None)


def test_demo_reports_every_held_out_sample_with_valid_tables(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    from pipeline import synthetic

    world = synthetic.load_world(os.path.join(out, "world"))
    good = [s for s in world.samples("val") if s["kind"] == "good"]
    manifest = read_table(os.path.join(out, "shards", "val", "manifest.parquet"), SHARD_MANIFEST)
    downloaded = sum(manifest.column("successes").to_pylist())
    assert downloaded == len(good)  # every good held-out image, and none of the bad rows
    labels_dir = os.path.join(out, "labels", "val", "labels")
    label_rows = sum(read_table(os.path.join(labels_dir, f), LABEL_TABLE).num_rows for f in os.listdir(labels_dir))
    assert label_rows == downloaded
    for name in ("trained", "untrained"):
        report = read_table(os.path.join(out, "reports", name, "report.parquet"), REPORT).to_pylist()
        assert sorted(r["k"] for r in report) == [5, 10]
        assert {(r["samples"], r["failed"], r["no_targets"]) for r in report} == {(downloaded, 0, 0)}
        predictions = read_table(os.path.join(out, "reports", name, "predictions.parquet"), PREDICTIONS)
        keys = list(zip(predictions.column("shard").to_pylist(), predictions.column("key").to_pylist()))
        assert len(keys) == len(set(keys)) == downloaded  # exactly once each
        # the targets are the labels spaCy extracted from the captions: exactly the world's ground truth
        targets = Counter(tuple(sorted(t)) for t in predictions.column("targets").to_pylist())
        assert targets == Counter(tuple(sorted(s["labels"])) for s in good)


def test_demo_closed_set_accuracy_and_captions_beat_the_untrained_model(demo_run):
    """The world's 24 nouns as a class list (labels column: a multi-label closed set), and greedy captions."""
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    # chance: a random class is one of a sample's 2-4 nouns about 3 times in 24
    assert summary["trained_top1_accuracy_at_5"] >= 0.6, summary
    assert summary["trained_top1_accuracy_at_5"] >= 2 * summary["untrained_top1_accuracy_at_5"], summary
    assert summary["trained_cider"] >= 0.5 and summary["trained_cider"] >= 3 * summary["untrained_cider"], summary
    assert "CIDEr-D" in proc.stdout and "most confused classes" in proc.stdout
    for name in ("trained", "untrained"):
        folder = os.path.join(out, "reports", name)
        predictions = read_table(os.path.join(folder, "predictions.parquet"), PREDICTIONS)
        keys = set(zip(predictions.column("shard").to_pylist(), predictions.column("key").to_pylist()))
        closed = read_table(os.path.join(folder, "closed_set.parquet"), CLOSED_SET)
        captions = read_table(os.path.join(folder, "captions.parquet"), CAPTIONS)
        for table in (closed, captions):
            assert set(zip(table.column("shard").to_pylist(), table.column("key").to_pylist())) == keys and table.num_rows == len(keys)
        assert closed.column("error").null_count == closed.num_rows  # every sample's nouns are classes of the list
        mean_top1 = sum(closed.column("top1_correct_at_5").to_pylist()) / closed.num_rows
        report = read_table(os.path.join(folder, "report.parquet"), REPORT).to_pylist()
        assert [r["top1_accuracy"] for r in report if r["k"] == 5] == [pytest.approx(mean_top1)] and {r["classified"] for r in report} == {len(keys)}
        read_table(os.path.join(folder, "confusion.parquet"), CONFUSION)
        (caption_report,) = read_table(os.path.join(folder, "caption_report.parquet"), CAPTION_REPORT).to_pylist()
        assert caption_report["samples"] == len(keys) and caption_report["search"] == "greedy"
        assert all(len(r) >= 3 for r in captions.column("references").to_pylist())  # COCO format: every caption of the image


def test_demo_gallery_shows_what_the_predictions_table_holds(demo_run):
    from tests.test_evaluate_tasks import check_gallery_against_predictions, parse_gallery

    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    folder = os.path.join(out, "reports", "trained")
    page = parse_gallery(os.path.join(folder, "gallery.html"))
    predictions = read_table(os.path.join(folder, "predictions.parquet"), PREDICTIONS).to_pylist()
    assert len(page.samples) == min(48, len(predictions)) and page.images == len(page.samples)
    check_gallery_against_predictions(page, predictions)
    assert any(c for s in page.samples for _, c, _ in s["predictions"]), "a trained model gets some labels right"


def test_demo_infer_names_the_objects_of_a_held_out_image(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = re.findall(r"\| prob: ([0-9.]+) - (\S.*)", proc.stdout)
    truth = re.search(r"ground truth of \S+: (.+?)  \(caption", proc.stdout).group(1).split(", ")
    predicted = [label.strip() for _, label in lines[:5]]
    assert predicted, proc.stdout[-3000:]
    assert sum(t in predicted for t in truth) >= len(truth) - 1, (truth, predicted)


def test_demo_lists_its_outputs_and_stops_its_ray_head(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    for rel in ("run/export/model.safetensors", "run/loss.png", "reports/trained/report.png", "logs/train.log", "summary.json"):
        assert os.path.isfile(os.path.join(out, rel)), rel
        assert os.path.join(out, rel.split("/")[0]) in proc.stdout
    assert "Ray head stopped" in proc.stdout
    metrics = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))]
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_interrupted_demo_stops_its_stage_and_its_ray_head(repo_root, tmp_path):
    """SIGTERM (as Ctrl-C) during ingestion: exit 130, the stage's job and the Ray head are stopped."""
    out = str(tmp_path / "out")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.demo", "--out", out, "--n", "300", "--val", "40"],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    received: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [received.put(line) for line in proc.stdout] + [received.put(None)], daemon=True).start()
    lines, head_port = [], None
    try:
        deadline = time.time() + 240
        while True:
            line = received.get(timeout=max(1.0, deadline - time.time()))
            assert line is not None and time.time() < deadline, "".join(lines)
            lines.append(line)
            if line.startswith("ray head: 127.0.0.1:"):
                head_port = int(line.split(":")[2].split(",")[0])
            if line.startswith("=== [1] ingest"):
                break
        assert head_port and _listening(head_port), "".join(lines)
        time.sleep(3)  # the ingestion stage is under way
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        while (line := received.get(timeout=30)) is not None:
            lines.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted: the running stage and the Ray head were stopped" in output
    assert "=== Ray head stopped" in output
    deadline = time.time() + 30
    while _listening(head_port) and time.time() < deadline:
        time.sleep(0.5)
    assert not _listening(head_port), "the Ray head still listens after the demo ended"


def test_demo_curates_the_train_shards(demo_run):
    """The curate stage finds the world's labelled copies (recall and precision >= 0.95 at the demo's
    6,000 images) and drops mismatched captions more often."""
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    curation = json.load(open(os.path.join(out, "summary.json")))["curation"]
    assert curation["copies_in_world"] > 0
    assert curation["copies_dropped_as_duplicates"] >= 0.95 * curation["copies_in_world"], curation
    assert curation["duplicate_drops_that_are_copies"] >= 0.95 * curation["duplicate_drops"], curation
    assert curation["mismatch_drop_rate"] > curation["match_drop_rate"], curation
    assert "=== curation of the train shards" in proc.stdout
