"""Experiment tracking (pipeline.tracking): a run's TensorBoard events and its W&B run in
offline mode, written by training's scalars and an evaluation logged into the same run."""

from __future__ import annotations

import glob
import os

import pytest
from PIL import Image

from pipeline.tracking import WANDB_ID_FILE, RunLog, check_reporters
from tests.wandb_records import history, run_id


def tensorboard_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(os.path.join(run_dir, "tensorboard"))
    mux.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in mux.Scalars(run, tag))
    return {tag: sorted(v) for tag, v in out.items()}


def tensorboard_texts_and_images(run_dir: str) -> tuple[dict[str, list[tuple[int, str]]], dict[str, list[tuple[int, bytes]]]]:
    """({tag: [(step, text)]}, {tag: [(step, encoded image)]}) of a run folder's TensorBoard events."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.util import tensor_util

    mux = EventMultiplexer(size_guidance={"tensors": 0, "images": 0})
    mux.AddRunsFromDirectory(os.path.join(run_dir, "tensorboard"))
    mux.Reload()
    texts: dict[str, list[tuple[int, str]]] = {}
    images: dict[str, list[tuple[int, bytes]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("tensors", []):
            for e in mux.Tensors(run, tag):
                texts.setdefault(tag, []).append((e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()))
        for tag in tags.get("images", []):
            images.setdefault(tag, []).extend((e.step, e.encoded_image_string) for e in mux.Images(run, tag))
    return texts, images


def report_rows(dataset: str, step: int) -> list[dict]:
    rows = []
    for embedding in ("all-MiniLM-L6-v2", "clip-text:ViT-B-16.pt"):
        for k, recall in ((5, 0.41), (10, 0.57)):
            rows.append({"dataset": dataset, "k": k, "embedding": embedding, "samples": 32, "recall": recall + (embedding != "all-MiniLM-L6-v2") * 0.1,
                         "precision": 0.3, "f1": None, "exact_recall": 0.2, "exact_precision": 0.1, "step": step})  # fmt: skip
    return rows


def test_reporters_are_checked():
    assert check_reporters(["tensorboard,wandb"]) == ("tensorboard", "wandb")
    assert check_reporters(["WandB", "tensorboard", "wandb"]) == ("wandb", "tensorboard")
    assert check_reporters(["none"]) == ()
    with pytest.raises(ValueError, match="unknown reporter 'mlflow'"):
        check_reporters(["tensorboard,mlflow"])


def test_training_and_its_evaluation_share_one_run(tmp_path):
    run_dir = str(tmp_path / "run")
    with RunLog(run_dir, ["tensorboard", "wandb"], config={"lr": 1e-4}, wandb_mode="offline") as log:
        for step in (1, 2, 3):
            log.scalars({"loss": 1.0 / step, "lr": 1e-4}, step)
        train_id = log.wandb_id
    chart = str(tmp_path / "report.png")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(chart)
    # the evaluation of the model exported at step 2, logged into the same run afterwards
    with RunLog(run_dir, ["tensorboard", "wandb"], job_type="eval", wandb_mode="offline") as log:
        logged = log.evaluation(report_rows("coco", 2), step=2, chart=chart)
        assert log.wandb_id == train_id
    with open(os.path.join(run_dir, WANDB_ID_FILE)) as f:
        assert f.read().strip() == train_id
    # only the first embedding model's figures are scalars; a null figure is left out
    assert logged == {"eval/coco/recall@5": 0.41, "eval/coco/precision@5": 0.3, "eval/coco/exact_recall@5": 0.2, "eval/coco/exact_precision@5": 0.1,
                      "eval/coco/recall@10": 0.57, "eval/coco/precision@10": 0.3, "eval/coco/exact_recall@10": 0.2, "eval/coco/exact_precision@10": 0.1}  # fmt: skip

    board = tensorboard_scalars(run_dir)
    assert [s for s, _ in board["train/loss"]] == [1, 2, 3]
    assert [round(v, 6) for _, v in board["train/loss"]] == [1.0, 0.5, round(1 / 3, 6)]
    assert board["eval/coco/recall@10"] == [(2, pytest.approx(0.57))]

    folders = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
    assert len(folders) == 2 and all(run_id(f) == train_id for f in folders)
    # the evaluation's run was finished in this process a moment ago: its last row may still be on its way
    rows = history(folders[0]) + history(folders[1], until=lambda rows: any("eval/step" in row for row in rows))
    train = [(row["_step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert train == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    (ev,) = [row for row in rows if "eval/step" in row]
    assert ev["eval/step"] == 2 and ev["eval/coco/recall@10"] == pytest.approx(0.57)
    assert ev["eval/coco/report/nrows"] == 4 and ev["eval/coco/chart/_type"] == "image-file"


def test_resumed_training_drops_the_steps_it_writes_again(tmp_path):
    run_dir = str(tmp_path / "run")
    with RunLog(run_dir, ["tensorboard"]) as log:
        for step in (1, 2, 3, 4):
            log.scalars({"loss": float(step)}, step)
    with RunLog(run_dir, ["tensorboard"], purge_from=3) as log:  # resumed from the checkpoint of step 2
        for step in (3, 4):
            log.scalars({"loss": 10.0 * step}, step)
    assert tensorboard_scalars(run_dir)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert not os.path.exists(os.path.join(run_dir, "wandb"))


def test_no_reporters_write_nothing(tmp_path):
    with RunLog(str(tmp_path / "run"), ["none"]) as log:
        log.scalars({"loss": 1.0}, 1)
        assert log.evaluation(report_rows("coco", 1), step=1) != {}
    assert not os.path.exists(tmp_path / "run")
