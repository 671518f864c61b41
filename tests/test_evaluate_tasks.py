"""The evaluation's closed-set and caption tasks and its gallery, stage by stage on plain batches (no cluster).

The whole job with both tasks runs in the demo (tests/test_demo.py) on the trained demo model.
"""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import evaluate as job
from model.checkpoint import load_pretrained
from model.generate import generate
from pipeline import evaluation, gallery
from pipeline.closed_set import parse_class_list
from pipeline.evaluation import PREDICTED, SCORED
from schemas import (
    CAPTION_REPORT,
    CAPTIONS,
    CLOSED_SET,
    CONFUSION,
    closed_set_schema,
    read_table,
    write_table,
)
from tests.test_evaluate import _jpeg, _numpy_batch, _predicted, _write_labels, export  # noqa: F401 - fixtures
from tests.test_shards import write_tar

CLASSES = parse_class_list("0: circle, circles\n1: star, stars\n2: cup, cups\n3: table\n4: sky\n", "mini.txt")


def _read(tar: str, labels_dir: str, **read) -> list[dict]:
    rows = []
    for spec in evaluation.plan_reads([evaluation.Shard("00000", tar)], labels_dir, 256):
        rows += evaluation.read_samples_batch(pa.Table.from_pylist([spec]), **read).to_pylist()
    return rows


@pytest.fixture
def shard(tmp_path, world) -> tuple[str, str]:
    """(tar, labels folder): four samples with a class in their json, captions in their label table, a class column."""
    good = _jpeg(world, 3)
    members = [
        ("a", {"jpg": good[0], "json": json.dumps({"label": "star", "caption": "a star\nA white star in the sky"}).encode()}),
        ("b", {"jpg": good[1], "json": json.dumps({"label": 2}).encode()}),
        ("c", {"jpg": good[2], "json": b"{not json"}),
        ("d", {"txt": b"a cup"}),  # no image; its caption is the label table's (made from this tar)
    ]
    tar = write_tar(tmp_path / "00000.tar", members)
    labels = str(tmp_path / "labels")
    path = _write_labels(labels, "00000", {"a": ["star", "sky"], "b": ["cup"], "c": ["circle"], "d": ["cup"]})
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(["a star\nA white star in the sky", "a cup", None, "a cup"]))
    pq.write_table(table.append_column("class", pa.array(["star", "cups", "circle", None])), path)
    return tar, labels


def test_read_stage_takes_classes_from_json_or_a_label_column_and_references_from_captions(shard):
    tar, labels = shard
    by_json = {r["key"]: r for r in _read(tar, labels, class_source="json", class_field="label", references=True)}
    assert [by_json[k]["classes"] for k in "abcd"] == [["star"], ["2"], [], []]  # c: json that does not parse, d: no json
    assert by_json["a"]["references"] == ["a star", "A white star in the sky"] and by_json["c"]["references"] == []
    by_column = {r["key"]: r for r in _read(tar, labels, class_source="labels", class_field="class")}
    assert [by_column[k]["classes"] for k in "abcd"] == [["star"], ["cups"], ["circle"], []]
    assert by_column["a"]["references"] == []  # not asked
    by_labels = {r["key"]: r for r in _read(tar, labels, class_source="labels", class_field="labels")}
    assert by_labels["a"]["classes"] == ["star", "sky"]  # a list: a multi-label sample
    plain = _read(tar, labels)
    assert all(r["classes"] == [] and r["references"] == [] for r in plain)


def test_predict_stage_writes_captions_as_generate_does(shard, export):  # noqa: F811
    tar, labels = shard
    samples = pa.Table.from_pylist(_read(tar, labels, references=True), schema=evaluation.SAMPLES)
    batch = _numpy_batch(evaluation.decode_batch(samples, image_size=32))
    search = {"max_length": 5, "beams": 2, "length_penalty": 1.0}
    out = evaluation.Predict(export, k=4, tasks=["caption"], caption=search)(batch)
    assert out.schema.equals(PREDICTED)
    rows = out.to_pylist()
    model, tokenizer = load_pretrained(export)
    expected = generate(model, torch.from_numpy(batch["image"][:3]), tokenizer, **search)
    assert [r["caption"] for r in rows] == [c.text for c in expected] + [None]  # d has no image
    assert all(r["predictions"] == [] for r in rows)  # the labels task was not asked
    assert rows[0]["references"] == ["a star", "A white star in the sky"]
    both = evaluation.Predict(export, k=4, tasks=["labels", "caption"], caption=search)(batch).to_pylist()
    assert [r["caption"] for r in both] == [r["caption"] for r in rows] and all(r["predictions"] for r in both[:3])
    with pytest.raises(ValueError, match="tasks must be among"):
        evaluation.Predict(export, k=4, tasks=["segment"])


def _rows() -> pa.Table:
    return _predicted(
        [
            # a star and the sky: the top label is right
            {"key": "a", "shard": "0", "targets": ["star", "sky"], "error": None, "predictions": ["stars", "sky", "cup"], "probabilities": [0.5, 0.3, 0.1],
             "classes": ["star"], "references": ["a star in the sky"], "caption": "a star in the sky"},
            # a cup, predicted a circle first: wrong at top-1, right at top-5
            {"key": "b", "shard": "0", "targets": ["cup"], "error": None, "predictions": ["circle", "mug"], "probabilities": [0.6, 0.3],
             "classes": ["2"], "references": ["a cup on a table", "one cup"], "caption": "a circle"},
            # no label row, a class all the same: scored for accuracy, not for R / P / F1
            {"key": "c", "shard": "0", "targets": [], "error": "no_label_row: none", "predictions": ["table"], "probabilities": [0.9],
             "classes": ["table"], "references": [], "caption": "a table"},
            # an unknown class, and no image
            {"key": "d", "shard": "0", "targets": ["cup"], "error": None, "predictions": ["cup"], "probabilities": [0.9], "classes": ["horse"], "references": ["a cup"], "caption": "a cup"},
            {"key": "e", "shard": "0", "targets": ["cup"], "error": "decode_error: OSError", "predictions": [], "probabilities": [], "classes": ["cup"], "references": ["a cup"]},
        ]
    )  # fmt: skip


def test_score_stage_adds_closed_set_columns_and_the_driver_writes_its_tables(tmp_path):
    out = evaluation.Score(ks=[1, 2], classes=CLASSES)(_rows())
    assert out.schema.equals(SCORED)
    a, b, c, d, e = out.to_pylist()
    assert a["class_ids"] == [1] and a["label_class_ids"][:2] == [1, 4] and a["label_similarity"][:2] == [1.0, 1.0]
    assert a["top1_at"] == [1.0, 1.0] and a["top5_at"] == [1.0, 1.0]
    assert b["label_class_ids"][0] == 0 and b["label_class_ids"][1] == 2  # "mug": nearest class by the sentence model
    assert b["top1_at"] == [0.0, 0.0] and b["top5_at"] == [0.0, 1.0] and b["top1_class_at"] == [0, 0]
    assert c["top1_at"] == [1.0, 1.0] and c["recall_at"] is None
    assert d["class_ids"] is None and d["class_error"].startswith("unknown_class: 'horse'") and d["top1_at"] is None
    assert e["label_class_ids"] is None and e["top1_at"] is None
    checkpoint = evaluation.CheckpointIdentity("m", "0" * 64, 3)
    report = evaluation.build_report(out, dataset="d", ks=[1, 2], embedders=["all-MiniLM-L6-v2"], checkpoint=checkpoint,
                                     code_version="git:x", wall_time_s=1.0, images_per_s=1.0, classified=True).to_pylist()  # fmt: skip
    assert [(r["k"], r["top1_accuracy"], r["top5_accuracy"], r["classified"]) for r in report] == [(1, 2 / 3, 2 / 3, 3), (2, 2 / 3, 1.0, 3)]
    closed = evaluation.closed_set_table(out, CLASSES, [1, 2])
    write_table(closed, tmp_path / "closed_set.parquet", closed_set_schema([1, 2]))
    rows = {r["key"]: r for r in read_table(tmp_path / "closed_set.parquet", CLOSED_SET).to_pylist()}
    assert rows["b"]["predicted_classes"] == ["circle", "cup"] and rows["b"]["class_names"] == ["cup"]
    assert rows["b"]["top1_correct_at_1"] == 0.0 and rows["b"]["top5_correct_at_2"] == 1.0
    assert rows["a"]["label_classes"] == ["star", "sky", "cup"]
    assert rows["d"]["error"].startswith("unknown_class") and rows["e"]["error"] == "decode_error: OSError"
    confusion = evaluation.confusion_table(out, CLASSES, [1, 2])
    write_table(confusion, tmp_path / "confusion.parquet", CONFUSION)
    assert [(r["k"], r["true_class"], r["predicted_class"], r["count"], r["share"]) for r in confusion.to_pylist()] == [(1, "cup", "circle", 1, 1.0), (2, "cup", "circle", 1, 1.0)]
    assert "cup -> circle: 1 (100%)" in evaluation.format_confusion(confusion, 5, classified=3)
    empty = confusion.slice(0, 0)
    assert evaluation.format_confusion(empty, 5, classified=3) == "no confused pair: every top-1 class was right"
    assert evaluation.format_confusion(empty, 5, classified=0) == "no confused pair: no sample has a class of the list"


def test_caption_tables_score_what_has_an_image_and_references(tmp_path):
    out = evaluation.Score(ks=[1], score_labels=False)(_rows())
    assert out.column("recall_at").null_count == out.num_rows  # no labels task: nothing scored, no model loaded
    search = {"max_length": 30, "beams": 1, "length_penalty": 1.0}
    captions, report = evaluation.caption_tables(out, dataset="d", search=search, checkpoint=evaluation.CheckpointIdentity("m", "0" * 64, None),
                                                 code_version="git:x", wall_time_s=1.0, images_per_s=2.0)  # fmt: skip
    write_table(captions, tmp_path / "captions.parquet", CAPTIONS)
    write_table(report, tmp_path / "caption_report.parquet", CAPTION_REPORT)
    rows = {r["key"]: r for r in captions.to_pylist()}
    assert [k for k, r in rows.items() if r["error"] is None] == ["a", "b", "d"]
    assert rows["c"]["error"].startswith("no_references") and rows["e"]["error"] == "decode_error: OSError"
    assert rows["a"]["bleu4"] == pytest.approx(1.0) and rows["a"]["cider"] > rows["b"]["cider"]
    (r,) = report.to_pylist()
    assert (r["samples"], r["failed"], r["no_references"], r["search"]) == (3, 1, 1, "greedy")
    assert r["cider"] == pytest.approx(np.mean([rows[k]["cider"] for k in "abd"]))
    assert "greedy" in evaluation.format_caption_report(report)


class _Gallery(HTMLParser):
    """What a person sees on gallery.html: per figure its key, targets and predictions with their marks."""

    def __init__(self):
        super().__init__()
        self.samples, self.images, self._field = [], 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "figure" and "sample" in classes:
            self.samples.append({"shard": a["data-shard"], "key": a["data-key"], "targets": [], "predictions": []})
        elif tag == "img" and a.get("src", "").startswith("data:image/jpeg;base64,"):
            self.images += 1
        elif tag == "li" and "target" in classes:
            self._field = ("targets", "found" in classes)
        elif tag == "li" and "prediction" in classes:
            self.samples[-1]["predictions"].append([None, "correct" in classes, float(a["data-probability"])])
        elif tag == "span" and "label" in classes:
            self.samples[-1]["predictions"][-1][0] = ""  # an empty label (a branch that ended at once) shows nothing
            self._field = ("prediction", None)

    def handle_endtag(self, tag):
        self._field = None  # text after an element's end is not its content

    def handle_data(self, data):
        if self._field and self._field[0] == "targets":
            self.samples[-1]["targets"].append((data, self._field[1]))
        elif self._field and self._field[0] == "prediction":
            self.samples[-1]["predictions"][-1][0] = data
        self._field = None


def parse_gallery(path: str) -> _Gallery:
    parser = _Gallery()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    return parser


def check_gallery_against_predictions(page: _Gallery, predictions: list[dict]) -> None:
    """Every shown target and prediction (and its mark) is the predictions table's."""
    by_id = {(r["shard"], r["key"]): r for r in predictions}
    for sample in page.samples:
        row = by_id[(sample["shard"], sample["key"])]
        assert [t for t, _ in sample["targets"]] == row["targets"]
        assert [p for p, _, _ in sample["predictions"]] == row["predictions"]
        assert [round(p, 5) for _, _, p in sample["predictions"]] == [round(p, 5) for p in row["probabilities"]]
        wanted = {t.lower() for t in row["targets"]}
        assert [c for _, c, _ in sample["predictions"]] == [p.lower() in wanted for p in row["predictions"]]
        assert [f for _, f in sample["targets"]] == [t.lower() in {p.lower() for p in row["predictions"]} for t in row["targets"]]


def test_gallery_is_a_seeded_sample_that_shows_the_predictions_table(tmp_path, world):
    rows = _rows().to_pylist()
    assert gallery.sample_indices(list(range(10)), 4, seed=0) == gallery.sample_indices(list(range(10)), 4, seed=0)
    assert gallery.sample_indices([3, 5], 4) == [3, 5]
    images = {("0", key): data for key, data in zip("abcd", _jpeg(world, 4))}
    images[("0", "d")] = b"not an image"
    rows[0]["targets"] = ["Star <b>", "sky"]  # markup in a label is shown as text
    gallery.write_gallery(str(tmp_path / "gallery.html"), rows[:4], images, title="t", summary="s")
    page = parse_gallery(str(tmp_path / "gallery.html"))
    assert [s["key"] for s in page.samples] == ["a", "b", "c", "d"] and page.images == 3  # d's bytes do not decode
    check_gallery_against_predictions(page, rows)
    assert page.samples[0]["predictions"][1][1] is True and page.samples[1]["predictions"][0][1] is False


def test_job_flags_for_the_new_tasks_are_checked():
    base = ["--checkpoint", "m", "--shards", "/s", "--labels", "/l", "--output", "/o"]
    cfg = job.parse(job.EvaluateConfig, [*base, "--task", "labels", "caption", "--classes", "c.txt", "--class-source", "json"], prog="x", description=None)
    assert cfg.task == ["labels", "caption"] and cfg.class_field == "label"
    assert job.parse(job.EvaluateConfig, [*base, "--classes", "c.txt"], prog="x", description=None).class_field == "labels"
    with pytest.raises(ValueError, match="--classes scores the labels task"):
        job.EvaluateConfig(checkpoint="m", shards="/s", labels="/l", output="/o", task=["caption"], classes="c.txt")
    with pytest.raises(ValueError, match="--max-length and --beams"):
        job.EvaluateConfig(checkpoint="m", shards="/s", labels="/l", output="/o", beams=0)
    with pytest.raises(ValueError, match="--log-to logs the labels report"):
        job.EvaluateConfig(checkpoint="m", shards="/s", labels="/l", output="/o", task=["caption"], log_to="/runs/r")


def test_a_missing_class_column_is_named_before_any_work(tmp_path, shard, export, capsys):  # noqa: F811
    tar, labels = shard
    classes = tmp_path / "classes.txt"
    classes.write_text("star\ncup\n")
    argv = ["--checkpoint", export, "--shards", os.path.dirname(tar), "--labels", labels, "--output", str(tmp_path / "out"), "--classes", str(classes)]
    assert job.main([*argv, "--class-field", "cls"]) == 2
    assert "no column 'cls' to take each sample's class from" in capsys.readouterr().err
    classes.write_text("0: star\n0: cup\n")
    assert job.main(argv) == 2
    assert "classes.txt:2: class index 0 is repeated" in capsys.readouterr().err
    assert job.main([*argv[:-2], "--task", "caption", "--max-length", "1000"]) == 2
    assert "--max-length 1000: 4 image tokens" in capsys.readouterr().err
