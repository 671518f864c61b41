"""The evaluation stage: each Ray stage on a plain batch, the driver's checks, and the job via `ray job submit`."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import evaluate as job
from jobs._cli import SUBMITTED, parse
from model.checkpoint import check_pretrained, load_pretrained, save_pretrained
from model.sampling import one_shot
from model.tokenizer import Tokenizer
from model.vision import preprocess
from pipeline import evaluation
from pipeline.evaluation import PREDICTED, SAMPLES, SCORED, error_code
from pipeline.shards import Shard, TarReader, find_shards, index_tar
from pipeline.tracking import RunLog
from schemas import CONFUSION, LABEL_TABLE, PREDICTIONS, REPORT, per_k_columns, read_table, write_table
from tests.test_model import _tiny_model
from tests.test_shards import write_tar

# ----------------------------------------------------------------------------- small inputs made here


def _jpeg(world, n: int = 1, size: int = 64) -> list[bytes]:
    """JPEG bytes of ``n`` good validation images of the world, at ``size`` px (as the shards hold them)."""
    out = []
    for s in [s for s in world.samples("val") if s["kind"] == "good"][:n]:
        with Image.open(os.path.join(world.root, s["file"])) as img:
            buf = io.BytesIO()
            img.convert("RGB").resize((size, size)).save(buf, format="JPEG")
            out.append(buf.getvalue())
    return out


def _write_labels(labels_dir, shard: str, rows: dict[str, list[str]]) -> str:
    os.makedirs(os.path.join(labels_dir, "labels"), exist_ok=True)
    table = pa.table(
        {
            "key": list(rows),
            "shard": [shard] * len(rows),
            "caption": [" ".join(v) for v in rows.values()],
            "labels": list(rows.values()),
            "extractor": ["spacy"] * len(rows),
        }
    )
    path = os.path.join(labels_dir, "labels", f"{shard}.parquet")
    write_table(table, path, LABEL_TABLE)
    return path


def _read_all(tar: str, labels_dir, samples_per_task: int = 256) -> list[dict]:
    """The read stage's rows for shard 00000: the driver's plan, then each read task on its spec."""
    rows = []
    for spec in evaluation.plan_reads([Shard("00000", str(tar))], str(labels_dir), samples_per_task):
        assert len(spec["keys"]) <= samples_per_task
        block = evaluation.read_samples_batch(pa.Table.from_pylist([spec]))
        assert block.schema.equals(SAMPLES)
        rows += block.to_pylist()
    return rows


@pytest.fixture
def export(tmp_path, tok) -> str:
    return save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))


@pytest.fixture
def small_dataset(tmp_path, world) -> tuple[str, str]:
    """(shards, labels): one shard of two good samples, for checks that stop before any work."""
    shards, labels = tmp_path / "shards", tmp_path / "labels_out"
    shards.mkdir()
    good = _jpeg(world, 2)
    write_tar(shards / "00000.tar", [("000000000", {"jpg": good[0]}), ("000000001", {"jpg": good[1]})])
    _write_labels(str(labels), "00000", {"000000000": ["circle"], "000000001": ["star"]})
    return str(shards), str(labels)


# ----------------------------------------------------------------------------- stage 1: read and join


def test_read_joins_labels_by_key_and_reports_every_sample(tmp_path, world):
    good = _jpeg(world, 3)
    tar = write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000", {"jpg": good[0], "txt": b"a red circle on a table", "json": b"{}"}),
            ("000000001", {"txt": b"no image here"}),
            ("000000002", {"jpg": good[1]}),
            ("000000003", {"jpg": good[2], "txt": b""}),
        ],
    )
    labels = _write_labels(tmp_path, "00000", {"000000000": ["circle", "table"], "000000001": ["cup"], "000000003": [], "000000009": ["star"]})
    rows = _read_all(tar, tmp_path, samples_per_task=2)
    assert [r["key"] for r in rows] == ["000000000", "000000001", "000000002", "000000003", "000000009"]
    by_key = {r["key"]: r for r in rows}
    assert by_key["000000000"]["error"] is None and by_key["000000000"]["image"] == good[0]
    assert by_key["000000000"]["targets"] == ["circle", "table"] and by_key["000000000"]["shard"] == "00000"
    assert error_code(by_key["000000001"]["error"]) == "missing_image"
    assert by_key["000000001"]["targets"] == ["cup"]  # kept: the row says what could not be scored
    assert error_code(by_key["000000002"]["error"]) == "no_label_row" and labels in by_key["000000002"]["error"]
    assert error_code(by_key["000000003"]["error"]) == "no_targets"
    assert error_code(by_key["000000009"]["error"]) == "unread" and "not in 00000.tar" in by_key["000000009"]["error"]


def test_truncated_tar_keeps_what_was_read_and_names_the_rest(tmp_path, world):
    images = _jpeg(world, 4, size=256)
    keys = [f"00000000{i}" for i in range(4)]
    tar = write_tar(tmp_path / "whole.tar", [(k, {"jpg": img, "txt": b"x"}) for k, img in zip(keys, images)])
    data = open(tar, "rb").read()
    cut = tmp_path / "00000.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    _write_labels(tmp_path, "00000", {k: ["star"] for k in keys})
    index = index_tar(str(cut))
    assert index.damage and "truncated" in index.damage
    rows = _read_all(str(cut), tmp_path, samples_per_task=1)
    assert sorted(r["key"] for r in rows) == keys  # every sample once, read or not
    read = [r for r in rows if r["error"] is None]
    unread = [r for r in rows if error_code(r["error"]) == "unread"]
    assert read and unread and len(read) + len(unread) == 4
    assert all("00000.tar" in r["error"] and "truncated" in r["error"] and r["image"] is None for r in unread)
    assert [r["image"] for r in read] == images[: len(read)]


def test_a_sample_split_across_the_tar_is_read_up_to_the_split(tmp_path):
    """pipeline.shards' rule: a key whose members are not adjacent is a defect; the samples before it are intact."""
    tar = write_tar(tmp_path / "00000.tar", [("a", {"jpg": b"1"}), ("b", {"jpg": b"2"}), ("a", {"txt": b"3"})])
    _write_labels(tmp_path, "00000", {"a": ["star"], "b": ["cup"], "c": ["leaf"]})
    assert "'a' are not adjacent" in index_tar(tar).damage
    rows = {r["key"]: r for r in _read_all(tar, tmp_path)}
    assert (rows["a"]["image"], rows["b"]["image"]) == (b"1", b"2") and rows["a"]["error"] is None
    assert error_code(rows["c"]["error"]) == "unread" and "'a' are not adjacent" in rows["c"]["error"]


# ----------------------------------------------------------------------------- stages 2-4 on plain batches


def _samples_batch(world) -> pa.Table:
    good = _jpeg(world, 2)
    rows = [
        {"key": "a", "shard": "00000", "image": good[0], "targets": ["circle", "table"], "error": None},
        {"key": "b", "shard": "00000", "image": good[0][: len(good[0]) // 3], "targets": ["star"], "error": None},
        {"key": "c", "shard": "00000", "image": None, "targets": ["cup"], "error": "missing_image: no jpg member"},
        {"key": "d", "shard": "00000", "image": good[1], "targets": [], "error": "no_targets: the label table lists no label"},
    ]
    return pa.Table.from_pylist([{"classes": [], "references": [], **r} for r in rows], schema=SAMPLES)


def _numpy_batch(table: pa.Table) -> dict:
    """The batch a ``batch_format="numpy"`` stage receives from Ray Data."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_batch_format("numpy")


def test_decode_stage_is_clips_transform_and_reports_bad_bytes(world):
    samples = _samples_batch(world)
    out = evaluation.decode_batch(samples, image_size=32)
    batch = _numpy_batch(out)
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == np.float32
    assert batch["has_image"].tolist() == [True, False, False, True]
    with Image.open(io.BytesIO(samples.column("image")[0].as_py())) as img:
        expected = preprocess(32)(img.convert("RGB")).numpy()
    np.testing.assert_array_equal(batch["image"][0], expected)
    errors = out.column("error").to_pylist()
    assert errors[0] is None and error_code(errors[1]) == "decode_error" and "OSError" in errors[1]
    assert errors[2] == "missing_image: no jpg member" and error_code(errors[3]) == "no_targets"


def test_predict_stage_equals_one_shot_and_carries_no_image(world, export):
    batch = _numpy_batch(evaluation.decode_batch(_samples_batch(world), image_size=32))
    stage = evaluation.Predict(export, k=6)
    out = stage(batch)
    assert out.schema.equals(PREDICTED) and "image" not in out.column_names
    model, tok = load_pretrained(export)
    expected = one_shot(model, torch.from_numpy(batch["image"][[0, 3]]), tok, k=6)
    rows = out.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c", "d"]
    for row, want in zip([rows[0], rows[3]], expected):
        assert row["predictions"] == want.labels and 1 <= len(want.labels) <= 6
        np.testing.assert_allclose(row["probabilities"], want.probs, rtol=1e-5)
    assert rows[1]["predictions"] == [] and rows[2]["predictions"] == []  # no image: nothing predicted
    assert rows[0]["targets"] == ["circle", "table"] and rows[3]["targets"] == []


def test_predict_stage_runs_in_the_precision_asked(world, export):
    from model.precision import place

    batch = _numpy_batch(evaluation.decode_batch(_samples_batch(world), image_size=32))
    stage = evaluation.Predict(export, k=6, precision="bf16")
    assert stage.dtype == torch.bfloat16 and stage.model.decoder.lm_head.weight.dtype == torch.bfloat16
    rows = stage(batch).to_pylist()
    model, tok = load_pretrained(export)
    expected = one_shot(place(model, "cpu", torch.bfloat16), torch.from_numpy(batch["image"][[0, 3]]).bfloat16(), tok, k=6)
    for row, want in zip([rows[0], rows[3]], expected):
        assert row["predictions"] == want.labels
        np.testing.assert_allclose(row["probabilities"], want.probs, rtol=1e-6)
    assert evaluation.Predict(export, k=6).dtype == torch.float32, "auto is fp32 on a CPU"
    with pytest.raises(ValueError, match="--precision must be one of auto, bf16, fp16, fp32"):
        job.EvaluateConfig(checkpoint="/m", shards="/s", labels="/l", output="/o", precision="half")


def _predicted(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"classes": [], "references": [], "caption": None, **r} for r in rows], schema=PREDICTED)


def test_score_stage_scores_only_usable_rows():
    stage = evaluation.Score(ks=[1, 2])
    batch = _predicted(
        [
            {"key": "a", "shard": "0", "targets": ["circle", "table"], "error": None, "predictions": ["circle", "desk", "tree"], "probabilities": [0.5, 0.3, 0.1]},
            {"key": "b", "shard": "0", "targets": ["cup"], "error": None, "predictions": ["cup"], "probabilities": [0.9]},
            {"key": "c", "shard": "0", "targets": [], "error": "no_targets: none", "predictions": ["star"], "probabilities": [0.4]},
            {"key": "d", "shard": "0", "targets": ["cup"], "error": "decode_error: OSError", "predictions": [], "probabilities": []},
        ]
    )
    out = stage(batch)
    assert out.schema.equals(SCORED)
    rows = out.to_pylist()
    a, b, c, d = rows
    assert len(a["recall_at"]) == 2 and len(a["exact_recall_at"]) == 2
    assert a["exact_recall_at"] == [0.5, 0.5] and a["exact_precision_at"] == [1.0, 0.5]
    assert a["recall_at"][0] < 1.0 and a["precision_at"][0] == pytest.approx(1.0, abs=1e-5)  # top-1 "circle" is a target
    assert b["recall_at"][1] == pytest.approx(1.0, abs=1e-5) and b["precision_at"][1] == pytest.approx(1.0, abs=1e-5)
    for row in (c, d):
        assert row["recall_at"] is None and row["exact_recall_at"] is None
    predictions = evaluation.predictions_table(out, [2, 1])
    assert predictions.column_names[6:] == per_k_columns([1, 2]) == [
        "recall_at_1", "precision_at_1", "f1_at_1", "exact_recall_at_1", "exact_precision_at_1",
        "recall_at_2", "precision_at_2", "f1_at_2", "exact_recall_at_2", "exact_precision_at_2",
    ]  # fmt: skip
    first = predictions.to_pylist()[0]
    assert (first["recall_at_2"], first["exact_precision_at_1"], first["f1_at_1"]) == (a["recall_at"][1], a["exact_precision_at"][0], a["f1_at"][0])
    assert predictions.to_pylist()[3]["recall_at_1"] is None
    assert c["predictions"] == ["star"] and d["error"] == "decode_error: OSError"


def test_score_stage_adds_clip_text_figures(tmp_path):
    """With --clip-text-weights each row holds every k for MiniLM, then every k for CLIP's text tower."""
    from pipeline.scoring import ClipTextEmbedder, LabelScorer, SentenceEmbedder, embedding_names
    from tests.test_scoring import _tiny_clip

    path = str(tmp_path / "clip.pt")
    torch.save(_tiny_clip().state_dict(), path)
    row = {"key": "a", "shard": "0", "targets": ["circle", "table"], "error": None, "predictions": ["circle", "desk", "tree"], "probabilities": [0.5, 0.3, 0.1]}
    out = evaluation.Score(ks=[1, 3], clip_text_weights=path)(_predicted([row])).to_pylist()[0]
    expected = LabelScorer([SentenceEmbedder(), ClipTextEmbedder(path)], ks=[1, 3])([row["targets"]], [row["predictions"]])
    names = embedding_names(None, path)
    assert names == ["all-MiniLM-L6-v2", "clip-text:clip.pt"]
    want = [expected.recall[n][0, j] for n in names for j in range(2)]
    np.testing.assert_allclose(out["recall_at"], want, atol=1e-6)


def _scored_row(key, error=None, recall_at=None, exact=None):
    return {
        "key": key, "shard": "00000", "targets": ["x"], "predictions": ["x"], "probabilities": [1.0],
        "error": error,
        "recall_at": recall_at, "precision_at": recall_at, "f1_at": recall_at,
        "exact_recall_at": exact, "exact_precision_at": exact, "classes": [], "references": [],
    }  # fmt: skip


def test_report_means_and_counts(tmp_path):
    scored = pa.Table.from_pylist(
        [
            _scored_row("a", recall_at=[0.5, 0.7, 0.2, 0.4], exact=[0.0, 1.0]),
            _scored_row("b", recall_at=[0.9, 1.0, 0.6, 0.8], exact=[1.0, 1.0]),
            _scored_row("c", error="decode_error: OSError: broken"),
            _scored_row("d", error="unread: 00000.tar broke off"),
            _scored_row("e", error="no_targets: none"),
        ],
        schema=SCORED,
    )
    report = evaluation.build_report(
        scored, dataset="coco", ks=[10, 5], embedders=["all-MiniLM-L6-v2", "clip-text:ViT-L-14.pt"],
        checkpoint=evaluation.CheckpointIdentity("/runs/x/export", "ab" * 32, 1000), code_version="git:abc", wall_time_s=12.0, images_per_s=3.5,
    )  # fmt: skip
    rows = report.to_pylist()
    assert [(r["embedding"], r["k"]) for r in rows] == [("all-MiniLM-L6-v2", 5), ("all-MiniLM-L6-v2", 10), ("clip-text:ViT-L-14.pt", 5), ("clip-text:ViT-L-14.pt", 10)]
    assert {(r["samples"], r["failed"], r["no_targets"]) for r in rows} == {(2, 2, 1)}
    assert [r["recall"] for r in rows] == pytest.approx([0.7, 0.85, 0.4, 0.6])
    assert [r["exact_recall"] for r in rows] == pytest.approx([0.5, 1.0, 0.5, 1.0])
    assert {(r["checkpoint"], r["checkpoint_sha256"], r["step"]) for r in rows} == {("/runs/x/export", "ab" * 32, 1000)}
    assert "0.7000" in evaluation.format_report(report)
    write_table(report, tmp_path / "report.parquet", REPORT)
    assert read_table(tmp_path / "report.parquet", REPORT).num_rows == 4
    nothing = evaluation.build_report(
        scored.slice(2), dataset="coco", ks=[5], embedders=["all-MiniLM-L6-v2"],
        checkpoint=evaluation.CheckpointIdentity("m.pth", "0" * 64, None), code_version="git:abc", wall_time_s=1.0, images_per_s=0.0,
    ).to_pylist()[0]  # fmt: skip
    assert (nothing["samples"], nothing["recall"], nothing["exact_recall"], nothing["step"]) == (0, None, None, None)
    evaluation.plot_report(report, str(tmp_path / "report.png"))
    assert open(tmp_path / "report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the driver's checks, before any work


def _argv(checkpoint, shards, labels, output, *extra) -> list[str]:
    return ["--checkpoint", checkpoint, "--shards", shards, "--labels", labels, "--output", output, *extra]


def test_config_mismatch_fails_before_any_work(tmp_path, export, small_dataset, capsys):
    import ray

    cfg_path = os.path.join(export, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["decoder"]["hidden_dim"] += 8
    json.dump(cfg, open(cfg_path, "w"))
    out = tmp_path / "report_out"
    assert job.main(_argv(export, *small_dataset, str(out))) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "has shape" in err and "config.json expects" in err
    assert not out.exists() and not ray.is_initialized()  # nothing written, no Ray started


def test_missing_inputs_are_named(tmp_path, export, small_dataset, capsys):
    shards, labels = small_dataset
    assert job.main(_argv(export, str(tmp_path / "nowhere"), labels, str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: no such folder or shard" in err and "resolved where the job runs" in err
    picture = tmp_path / "photo.jpg"  # a file that is no checkpoint is not taken for a released one
    Image.new("RGB", (8, 8)).save(picture)
    assert job.main(_argv(str(picture), shards, labels, str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert f"{picture} is not a checkpoint" in err and "pass the LLaMA tokenizer" not in err
    os.remove(os.path.join(labels, "labels", "00000.parquet"))
    assert job.main(_argv(export, shards, labels, str(tmp_path / "o"))) == 2
    assert "00000.parquet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unusable_inputs_are_refused_before_any_work(tmp_path, export, small_dataset, capsys):
    """A label table of the wrong types, a parquet without its tar, --k past the vocabulary, a
    file that is no shard: exit 2 naming the file (or the figure), nothing written, no Ray."""
    import ray

    shards, labels = small_dataset
    table = os.path.join(labels, "labels", "00000.parquet")
    good = pq.read_table(table)
    out = str(tmp_path / "o")
    joined = good.set_column(good.schema.get_field_index("labels"), "labels", pa.array([", ".join(v) for v in good.column("labels").to_pylist()]))
    pq.write_table(joined, table)  # labels as one comma-joined string, as a CSV round trip writes them
    assert job.main(_argv(export, shards, labels, out)) == 2
    assert f"{table}: label_table: column 'labels' has type string, expected list<item: string>" in capsys.readouterr().err
    pq.write_table(good.set_column(0, "key", pa.array(range(good.num_rows), pa.int64())), table)
    assert job.main(_argv(export, shards, labels, out)) == 2
    assert f"{table}: label_table: column 'key' has type int64" in capsys.readouterr().err
    pq.write_table(good, table)
    tar = os.path.join(shards, "00000.tar")
    write_tar(tar, [(key, {"jpg": sample.data["jpg"], "txt": b"a red circle"}) for key, sample in zip(("000000000", "000000001"), TarReader(tar))])
    assert job.main(_argv(export, shards, labels, out)) == 2  # the table's captions are "circle" and "star": made from other samples
    assert f"{table} was not made from {tar}: sample 000000000's caption is 'a red circle' in the tar but 'circle'" in capsys.readouterr().err
    pq.write_table(good.set_column(2, "caption", pa.array(["a red circle"] * good.num_rows)), table)
    assert job.main(_argv(export, shards, labels, out, "--k", "5", "100000")) == 2
    assert "--k 100000 is larger than the model's vocabulary of" in capsys.readouterr().err
    parquet = os.path.join(shards, "00000.parquet")
    pq.write_table(good, parquet)  # img2dataset's per-shard table beside its tar
    assert job.main(_argv(export, parquet, labels, out)) == 2
    assert f"{parquet}: not a webdataset shard (<name>.tar)" in capsys.readouterr().err
    os.rename(os.path.join(shards, "00000.tar"), tmp_path / "moved.tar")  # the tar gone, its table left
    assert job.main(_argv(export, shards, labels, out)) == 2
    assert f"1 shard(s) have no tar, e.g. {parquet}: its tar 00000.tar is missing" in capsys.readouterr().err
    assert not os.path.exists(out) and not ray.is_initialized()


def test_a_run_that_scored_nothing_fails():
    """Each task ran is judged by its own count: a caption run whose samples have no references scored nothing,
    however many images were read (the top-level count is the labels task's rule)."""
    labels = {"tasks": ["labels"], "samples": 96}
    assert job.nothing_scored({**labels, "scored": 3, "labels": {"scored": 3}}, "/o") is None
    assert job.nothing_scored({**labels, "scored": 0, "labels": {"scored": 0}}, "/o") == (
        "no sample could be scored for --task labels (96 sample(s); the errors above, and each sample's row in /o, say why)")
    caption = {"tasks": ["caption"], "samples": 96, "scored": 96}
    assert job.nothing_scored({**caption, "caption": {"samples": 90}}, "/o") is None
    assert "for --task caption (96 sample(s)" in job.nothing_scored({**caption, "caption": {"samples": 0}}, "/o")
    both = {"tasks": ["labels", "caption"], "samples": 96, "scored": 5, "labels": {"scored": 5}, "caption": {"samples": 0}}
    assert "for --task caption (" in job.nothing_scored(both, "/o")


def test_unusable_label_items_are_left_out_and_a_confusion_table_of_none_is_empty():
    """A null item in a label table's list is no target (never the text "None"); --confusion-top 0 prints nothing."""
    assert evaluation._lists([["dog", None], None, [None]]) == [["dog"], [], []]
    row = evaluation._sample_row("k", "00000", b"jpg", [None, " "], "l.parquet")
    assert row["error"].startswith(evaluation.NO_TARGETS)
    assert evaluation._sample_row("k", "00000", b"jpg", [None, "dog"], "l.parquet")["error"] is None
    confusion = pa.Table.from_pylist(
        [{"k": 5, "true_class_id": 0, "true_class": "cat", "predicted_class_id": 1, "predicted_class": "dog", "count": 2, "share": 0.5}], CONFUSION
    )
    assert evaluation.format_confusion(confusion, 0, 4) == ""
    assert "cat -> dog: 2 (50%)" in evaluation.format_confusion(confusion, 10, 4)


def test_relative_paths_are_refused_under_job_submission(monkeypatch, capsys):
    monkeypatch.setenv(SUBMITTED, "{}")
    assert job.main(["--checkpoint", "/m", "--shards", "data/val", "--labels", "/l", "--output", "/o"]) == 2
    assert "paths are resolved on the cluster" in capsys.readouterr().err
    cfg = job.EvaluateConfig(checkpoint="/m", shards="/data/coco_val/", labels="/l", output="/o", k=[10, 5, 10])
    assert cfg.dataset == "coco_val" and cfg.k == [5, 10]


def test_one_flag_under_two_names_takes_one_value(capsys):
    """--k and --num-labels (and --out and --output) name one flag: two different values are refused."""
    flags = ["--checkpoint", "/m", "--shards", "/s", "--labels", "/l"]
    for extra, said in (
        (["--output", "/o", "--k", "5", "10", "--num-labels", "5"], "--k 5 10 and --num-labels 5"),
        (["--out", "/o", "--num_labels=3", "--output", "/p"], "--out /o and --output /p"),
    ):
        with pytest.raises(SystemExit) as exit_:
            job.main(flags + extra)
        assert exit_.value.code == 2 and f"error: {said}: these are one flag under two names" in capsys.readouterr().err
    cfg = parse(job.EvaluateConfig, flags + ["--output", "/o", "--k", "5", "10", "--num-labels", "5", "10"], prog="evaluate", description=None)
    assert cfg.k == [5, 10]


def test_one_flag_given_twice_takes_one_value(capsys):
    """A repeated flag (a list, a scalar, a boolean's two forms) with different values is refused, not cut to its last value."""
    from jobs.labels import LabelsConfig

    flags = ["--checkpoint", "/m", "--shards", "/s", "--labels", "/l", "--output", "/o"]
    for extra, said in (
        (["--k", "5", "--k", "10"], "--k 5 and --k 10: the flag is given twice with different values"),
        (["--task", "labels", "--task", "caption"], "--task labels and --task caption: the flag is given twice"),
        (["--batch-size", "8", "--batch-size=16"], "--batch-size 8 and --batch-size 16: the flag is given twice"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse(job.EvaluateConfig, flags + extra, prog="evaluate", description=None)
        assert exit_.value.code == 2 and f"error: {said}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        parse(LabelsConfig, ["--shards", "/s", "--output", "/o", "--keep-numbers", "--no-keep-numbers"], prog="labels", description=None)
    assert exit_.value.code == 2 and "--keep-numbers and --no-keep-numbers: these contradict each other" in capsys.readouterr().err
    for extra in (["--cpus-per-actor", "inf"], ["--length-penalty=nan"]):
        with pytest.raises(SystemExit) as exit_:
            parse(job.EvaluateConfig, flags + extra, prog="evaluate", description=None)
        assert exit_.value.code == 2 and f"error: {' '.join(extra).replace('=', ' ')}: this flag takes a finite number" in capsys.readouterr().err
    cfg = parse(job.EvaluateConfig, flags + ["--k", "5", "--k", "5", "--task", "labels", "caption"], prog="evaluate", description=None)
    assert cfg.k == [5] and cfg.task == ["labels", "caption"]  # the same value twice is one value


def test_stage_plan_follows_the_cluster():
    cfg = job.EvaluateConfig(checkpoint="/m", shards="/s", labels="/l", output="/o")
    plan, device = job.plan_stages(cfg, {"CPU": 32.0, "GPU": 4.0})
    assert device == "cuda" and plan.concurrency == 4 and plan.predictor_gpus == 1.0
    plan, device = job.plan_stages(cfg, {"CPU": 4.0})
    assert device == "cpu" and plan.concurrency == 1 and plan.predictor_gpus == 0.0 and plan.threads == 1
    with pytest.raises(ValueError, match="cluster has 2"):
        job.plan_stages(job.EvaluateConfig(checkpoint="/m", shards="/s", labels="/l", output="/o", concurrency=2), {"CPU": 2.0})
    with pytest.raises(ValueError, match="no GPU"):
        job.plan_stages(job.EvaluateConfig(checkpoint="/m", shards="/s", labels="/l", output="/o", device="cuda"), {"CPU": 8.0})


# ----------------------------------------------------------------------------- the job on a real Ray head


def _tar_keys(shards_dir: str) -> list[tuple[str, str]]:
    """(shard, key) of every sample in the tars, read here with tarfile."""
    keys = set()
    for name in sorted(os.listdir(shards_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shards_dir, name)) as tar:
                keys |= {(name.removesuffix(".tar"), m.name.split(".", 1)[0]) for m in tar.getmembers() if m.isfile()}
    return sorted(keys)


@pytest.fixture(scope="module")
def job_inputs(labelled_shards, world, tmp_path_factory):
    """The served world's validation shards and labels, plus a shard "00090" of awkward samples:

    090000000 fine; 090000001 a corrupt JPEG; 090000002 an empty label list; 090000003 no
    label row; 090000009 a label row whose sample is not in the tar.
    """
    src_shards, src_labels = labelled_shards["val"]
    root = tmp_path_factory.mktemp("eval_inputs")
    shards, labels = root / "val", root / "val_labels"
    shards.mkdir()
    for name in os.listdir(src_shards):
        if name.endswith(".tar"):
            shutil.copy(os.path.join(src_shards, name), shards / name)
    shutil.copytree(os.path.join(src_labels, "labels"), labels / "labels")
    good = _jpeg(world, 3)
    samples = [("090000000", good[0]), ("090000001", good[1][:300]), ("090000002", good[1]), ("090000003", good[2])]
    write_tar(shards / "00090.tar", [(key, {"jpg": data, "txt": b"caption"}) for key, data in samples])
    _write_labels(str(labels), "00090", {"090000000": ["circle"], "090000001": ["star"], "090000002": [], "090000009": ["cup"]})
    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(root / "export"))
    return str(shards), str(labels), export


def _train_run(out: str) -> str:
    return os.path.join(os.path.dirname(out), "train_run")


@pytest.fixture(scope="module")
def job_run(ray_head, repo_root, job_inputs, tmp_path_factory):
    shards, labels, export = job_inputs
    out = str(tmp_path_factory.mktemp("eval_run") / "report")
    # a training run's folder with TensorBoard events and an offline W&B run, as jobs.train --report-to writes it
    with RunLog(_train_run(out), ["tensorboard", "wandb"], wandb_mode="offline") as run_log:
        run_log.scalars({"loss": 2.5}, 1)
    cmd = ["python", "-m", "jobs.evaluate", *_argv(export, shards, labels, out), "--dataset", "synthetic",
           "--k", "5", "10", "--batch-size", "8", "--cpus-per-actor", "0.5", "--log-to", _train_run(out), "--wandb-mode", "offline"]  # fmt: skip
    result = ray_head.submit(cmd, working_dir=repo_root, timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    return out, log


@pytest.mark.cluster
def test_job_writes_every_sample_once_with_valid_schemas(job_run, job_inputs):
    out, log = job_run
    shards, labels, export = job_inputs
    assert sorted(os.listdir(out)) == ["config.json", "gallery.html", "predictions.parquet", "report.parquet", "report.png", "summary.json"]
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]  # no temporary folder left
    predictions = read_table(os.path.join(out, "predictions.parquet"), PREDICTIONS)
    assert predictions.schema.metadata[b"schema_name"] == b"predictions"
    keys = list(zip(predictions.column("shard").to_pylist(), predictions.column("key").to_pylist()))
    assert keys == sorted(_tar_keys(shards) + [("00090", "090000009")])  # every sample, exactly once, sorted
    report = read_table(os.path.join(out, "report.parquet"), REPORT)
    rows = report.to_pylist()
    assert [(r["dataset"], r["k"], r["embedding"]) for r in rows] == [("synthetic", 5, "all-MiniLM-L6-v2"), ("synthetic", 10, "all-MiniLM-L6-v2")]
    assert open(os.path.join(out, "report.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "synthetic" in log and "exact R" in log and "wrote " + out in log  # the table is printed at the end


def _same_pixels(encoded: bytes, png: str) -> bool:
    """An image TensorBoard stored (re-encoded) shows the pixels of ``png``."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as a, Image.open(png) as b:
        return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.mark.cluster
def test_evaluation_is_logged_into_the_training_run(job_run):
    """--log-to: the report's figures in the run's TensorBoard events and its W&B run, beside training's."""
    from tests.test_tracking import tensorboard_scalars, tensorboard_texts_and_images
    from tests.wandb_records import history
    from tests.wandb_records import run_id as wandb_run_id

    out, log = job_run
    run_dir = _train_run(out)
    report = {(r["k"], r["embedding"]): r for r in read_table(os.path.join(out, "report.parquet"), REPORT).to_pylist()}
    recall = {k: r["recall"] for (k, _), r in report.items()}
    board = tensorboard_scalars(run_dir)
    assert board["train/loss"] == [(1, 2.5)]
    assert {k: board[f"eval/synthetic/recall@{k}"] for k in (5, 10)} == {k: [(0, pytest.approx(recall[k]))] for k in (5, 10)}
    # the report as a table (TensorBoard's text: markdown) and its chart, report.png itself
    texts, images = tensorboard_texts_and_images(run_dir)
    ((step, table),) = texts["eval/synthetic/report/text_summary"]
    lines = table.splitlines()
    assert step == 0 and lines[0].startswith("| dataset | k | embedding | samples | recall |") and len(lines) == 2 + len(report)
    for line, ((k, embedding), row) in zip(lines[2:], report.items()):  # in the report's order
        assert line.startswith(f"| synthetic | {k} | {embedding} | {row['samples']} | {row['recall']:.4f} |"), line
    ((step, chart),) = images["eval/synthetic/chart"]
    assert step == 0 and _same_pixels(chart, os.path.join(out, "report.png"))
    folders = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
    with open(os.path.join(run_dir, "wandb_run_id.txt")) as f:
        run_id = f.read().strip()
    assert len(folders) == 2 and all(wandb_run_id(f) == run_id for f in folders)  # one W&B run, resumed
    (row,) = [r for folder in folders for r in history(folder) if "eval/step" in r]
    assert row["eval/synthetic/recall@10"] == pytest.approx(recall[10]) and row["eval/synthetic/report/nrows"] == 2
    assert f"logged 10 figures, the report and its chart to {run_dir} (tensorboard and wandb) at step 0" in log


@pytest.mark.cluster
def test_reports_open_cleanly_in_duckdb_pandas_and_polars(job_run):
    """The README's one-liners on the job's real tables: separate columns, nulls for what was not scored."""
    import duckdb
    import pandas as pd
    import polars as pl

    out, _ = job_run
    report, predictions = os.path.join(out, "report.parquet"), os.path.join(out, "predictions.parquet")
    rows = duckdb.sql(f"SELECT k, recall, checkpoint, checkpoint_sha256, step FROM '{report}' ORDER BY k").fetchall()
    assert [r[0] for r in rows] == [5, 10] and all(0 <= r[1] <= 1 for r in rows)
    assert {(r[2], len(r[3]), r[4]) for r in rows} == {(rows[0][2], 64, None)}  # a folder saved without a step
    per_k = duckdb.sql(f"SELECT avg(recall_at_5), avg(recall_at_10), count(*) - count(recall_at_10) FROM '{predictions}'").fetchall()[0]
    assert per_k[0] == pytest.approx(rows[0][1], abs=1e-9) and per_k[1] == pytest.approx(rows[1][1], abs=1e-9)
    unscored = pd.read_parquet(predictions).query("error.notna()")
    assert per_k[2] == len(unscored) > 0 and unscored["recall_at_10"].isna().all()  # null, not NaN or a sentinel
    frame = pl.read_parquet(predictions)
    assert frame.schema["exact_precision_at_5"] == pl.Float64 and frame["recall_at_5"].null_count() == len(unscored)


@pytest.mark.cluster
def test_job_reports_decode_errors_and_samples_without_targets(job_run, job_inputs):
    out, _ = job_run
    shards, labels, _ = job_inputs
    rows = {(r["shard"], r["key"]): r for r in pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()}
    bad = rows[("00090", "090000001")]
    assert error_code(bad["error"]) == "decode_error" and bad["predictions"] == [] and bad["recall_at_10"] is None
    lost = rows[("00090", "090000009")]
    assert error_code(lost["error"]) == "unread" and lost["targets"] == ["cup"] and lost["predictions"] == []
    label_rows = {(r["shard"], r["key"]): r["labels"] for name in os.listdir(os.path.join(labels, "labels"))
                  for r in pq.read_table(os.path.join(labels, "labels", name)).to_pylist()}  # fmt: skip
    empty = sorted({k for k, v in label_rows.items() if not v} | (set(_tar_keys(shards)) - set(label_rows)))
    assert ("00090", "090000002") in empty and ("00090", "090000003") in empty
    for key in empty:
        assert error_code(rows[key]["error"]) in ("no_targets", "no_label_row") and rows[key]["recall_at_10"] is None
        assert rows[key]["predictions"], "a sample without targets is still predicted"
    report = pq.read_table(os.path.join(out, "report.parquet")).to_pylist()
    for r in report:
        assert (r["failed"], r["no_targets"], r["samples"]) == (2, len(empty), len(rows) - 2 - len(empty))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["errors"] == {"decode_error": 1, "no_label_row": 1, "no_targets": len(empty) - 1, "unread": 1}


@pytest.mark.cluster
def test_job_figures_match_the_model_and_the_scorer(job_run, job_inputs):
    """Predictions equal one-shot sampling of the exported model; R and exact recall agree with a local scorer."""
    from pipeline.scoring import LabelScorer, SentenceEmbedder

    out, _ = job_run
    shards, _, export = job_inputs
    predictions = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    model, tok = load_pretrained(export)
    transform = preprocess(model.cfg.vision.image_size)
    with tarfile.open(os.path.join(shards, "00000.tar")) as tar:
        images = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    checked = [r for r in predictions if r["shard"] == "00000" and r["key"] in images][:4]
    batch = torch.stack([transform(Image.open(io.BytesIO(images[r["key"]])).convert("RGB")) for r in checked])
    for row, want in zip(checked, one_shot(model, batch, tok, k=10)):
        assert row["predictions"] == want.labels
        np.testing.assert_allclose(row["probabilities"], want.probs, rtol=1e-4)

    scored = [r for r in predictions if r["error"] is None]
    minilm = SentenceEmbedder()
    s = LabelScorer([minilm], ks=[5, 10])([r["targets"] for r in scored], [r["predictions"] for r in scored])
    np.testing.assert_allclose([r["recall_at_10"] for r in scored], s.recall[minilm.name][:, 1], atol=1e-5)
    np.testing.assert_allclose([r["exact_precision_at_5"] for r in scored], s.exact_precision[:, 0], atol=1e-9)
    report = {r["k"]: r for r in pq.read_table(os.path.join(out, "report.parquet")).to_pylist()}
    assert report[10]["recall"] == pytest.approx(float(np.mean(s.recall[minilm.name][:, 1])), abs=1e-6)
    assert report[5]["recall"] == pytest.approx(float(np.mean(s.recall[minilm.name][:, 0])), abs=1e-6)
    assert report[5]["exact_recall"] == pytest.approx(float(np.mean(s.exact_recall[:, 0])), abs=1e-9)
    assert report[10]["f1"] == pytest.approx(float(np.mean(s.f1[minilm.name][:, 1])), abs=1e-6)
    assert report[10]["checkpoint"] == export and report[10]["checkpoint_sha256"] == _sha256_of_export(export)
    assert report[10]["code_version"].startswith(("git:", "source:")) and report[10]["images_per_s"] > 0


def _sha256_of_export(folder: str) -> str:
    """The reports' rule, worked out here: each weight file's name and bytes, in the export's order."""
    from model.export import weight_files

    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(os.path.relpath(path, folder).encode() + b"\0")
    for path in weight_files(folder):
        digest.update(open(path, "rb").read())
    return digest.hexdigest()


def _replicate(shards_dir: str, labels_dir: str, out, copies: int) -> tuple[str, str]:
    """``copies`` renamed copies of every shard and its label table: new shard names, new keys."""
    shards, labels = out / "shards", out / "labels_out"
    shards.mkdir()
    for c in range(copies):
        for name in sorted(n for n in os.listdir(shards_dir) if n.endswith(".tar")):
            stem = name.removesuffix(".tar")
            new = f"{c + 1}{stem[1:]}"
            with tarfile.open(os.path.join(shards_dir, name)) as src, tarfile.open(shards / f"{new}.tar", "w") as dst:
                for m in src.getmembers():
                    data = src.extractfile(m).read()
                    m.name = f"{c + 1}{m.name}"
                    dst.addfile(m, io.BytesIO(data))
            table = pq.read_table(os.path.join(labels_dir, "labels", f"{stem}.parquet")).to_pylist()
            rows = {f"{c + 1}{r['key']}": r["labels"] for r in table}
            _write_labels(str(labels), new, rows)
    return str(shards), str(labels)


@pytest.mark.cluster
def test_exactly_once_when_a_predictor_actor_is_killed(ray_head, labelled_shards, world, tmp_path):
    """The predictor actor is SIGKILLed on its third batch: Ray restarts it, retries the batch, and every
    sample still comes back exactly once. The kill comes from inside the actor, so it lands mid-run on any machine."""
    import ray
    from ray.util.state import list_actors

    shards, labels = _replicate(*labelled_shards["val"], tmp_path, copies=2)
    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    marker = str(tmp_path / "killed")

    class DiesOnItsThirdBatch(evaluation.Predict):
        def __init__(self, marker: str, **kwargs):
            super().__init__(**kwargs)
            self.marker, self.calls = marker, 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 3 and not os.path.exists(self.marker):  # once: the restarted actor lives
                with open(self.marker, "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    found = find_shards(shards, labels=labels)
    plan = evaluation.StagePlan(batch_size=1, predictor_cpus=0.5, worker_env=dict(job.WORKER_ENV))
    ray.init(address=ray_head.gcs_address)
    try:
        run = evaluation.run_evaluation(
            evaluation.plan_reads(found, labels, plan.batch_size),
            image_size=check_pretrained(export).vision.image_size,
            predictor={"checkpoint": export, "k": 10, "threads": 1, "marker": marker},
            scorer={"ks": [10], "threads": 1},
            plan=plan,
            predictor_cls=DiesOnItsThirdBatch,
        )
        restarted = [a for a in list_actors(address=ray_head.dashboard_url, detail=True, limit=1000) if "DiesOnItsThirdBatch" in (a.repr_name or a.class_name or "")]
    finally:
        ray.shutdown()
    assert os.path.exists(marker), "the predictor was never killed"
    assert any(a.num_restarts >= 1 for a in restarted), [(a.class_name, a.repr_name, a.num_restarts) for a in restarted]
    keys = list(zip(run.table.column("shard").to_pylist(), run.table.column("key").to_pylist()))
    assert keys == _tar_keys(shards) and len(keys) > 30  # each sample exactly once, none lost to the kill
    assert all(p for p in run.table.column("predictions").to_pylist())  # the retried batch was predicted


def test_an_embedding_model_by_folder_by_bare_name_or_missing(tmp_path, monkeypatch):
    """--embedding-model takes a folder, an owner/name id or sentence-transformers' bare name from the local
    Hugging Face cache; what cannot be found is named with the flag."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--sentence-transformers--tiny-st" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--sentence-transformers--tiny-st" / "refs").mkdir()
    (cache / "models--sentence-transformers--tiny-st" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    job.check_embedding_model(str(snapshot))
    job.check_embedding_model("tiny-st")
    job.check_embedding_model("sentence-transformers/tiny-st")
    with pytest.raises(FileNotFoundError, match=r"^--embedding-model all-MiniLM-L12-v2: sentence-transformers/all-MiniLM-L12-v2: no such local folder"):
        job.check_embedding_model("all-MiniLM-L12-v2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^--embedding-model {empty}: {empty}: no sentence-transformers model there"):
        job.check_embedding_model(str(empty))
