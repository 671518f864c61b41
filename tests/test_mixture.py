"""Mixture weights: `auto` is proportional to the samples ingested (the shards' manifests, else the
label tables), and an epoch counts samples; the G3M preset's datasets as the reference concatenates them."""

from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.train import TrainConfig
from pipeline.loader import DatasetSpec, TrainStream, parse_weight, resolve_mixture
from pipeline.shards import find_shards, ingested_samples
from schemas import LABEL_TABLE, SHARD_MANIFEST, reason_rows, write_table

REFERENCE = {"cc3m": 2_698_118, "sbu": 828_816, "coco": 118_287}  # the reference's G3M concatenation


def dataset(root, name: str, successes: list[int], manifest: bool = True, label_rows: int = 3) -> DatasetSpec:
    """A dataset folder of len(successes) (empty) tars, its manifest, and a label table per shard."""
    shards, labels = os.path.join(root, name), os.path.join(root, name + "_labels")
    os.makedirs(os.path.join(labels, "labels"))
    os.makedirs(shards)
    rows = []
    for i, n in enumerate(successes):
        open(os.path.join(shards, f"{i:05d}.tar"), "wb").close()
        rows.append({"shard": os.path.join(shards, f"{i:05d}.tar"), "samples": n + 1, "successes": n, "failures": 1,
                     "failures_by_reason": reason_rows({"http_404": 1}), "attempts": 1, "seconds": 1.0})  # fmt: skip
        keys = [f"{name}-{i}-{j}" for j in range(label_rows)]
        write_table(pa.table({"key": keys, "shard": [f"{i:05d}"] * label_rows, "caption": ["a dog"] * label_rows,
                              "labels": [["dog"]] * label_rows, "extractor": ["spacy"] * label_rows}, schema=LABEL_TABLE),
                    os.path.join(labels, "labels", f"{i:05d}.parquet"), LABEL_TABLE)  # fmt: skip
    if manifest:
        write_table(pa.Table.from_pylist(rows, schema=SHARD_MANIFEST), os.path.join(shards, "manifest.parquet"), SHARD_MANIFEST)
    return DatasetSpec(name, shards, labels, "auto")


def test_weights_are_numbers_or_auto():
    assert parse_weight("auto") == "auto" and parse_weight(" AUTO ") == "auto"
    assert parse_weight("0.5") == 0.5 and parse_weight(3) == 3.0
    for bad in ("0", "-1", "inf", "nan", "heavy", None):
        with pytest.raises(ValueError, match="a number > 0 or auto"):
            parse_weight(bad)


def test_auto_weights_are_the_manifests_sample_shares(tmp_path):
    """The G3M preset's three datasets with the reference's counts: the draws are the concatenation's shares."""
    specs = [dataset(tmp_path, name, [n // 2, n - n // 2]) for name, n in REFERENCE.items()]
    mixture = resolve_mixture(specs, samples_per_epoch=0)
    total = sum(REFERENCE.values())
    assert mixture.samples == REFERENCE and mixture.samples_per_epoch == total == 3_645_221
    weights = {d.name: d.weight for d in mixture.datasets}
    shares = {name: w / sum(weights.values()) for name, w in weights.items()}
    assert shares == pytest.approx({name: n / total for name, n in REFERENCE.items()})
    # the preset's earlier fixed weights drew COCO about 3.9x as often as the concatenation
    assert (0.6 / (3.3 + 0.85 + 0.6)) / shares["coco"] == pytest.approx(3.89, abs=0.01)
    assert math.ceil(3 * math.ceil(mixture.samples_per_epoch / 512)) == 21_360
    print("\n".join(mixture.describe()))
    assert mixture.describe()[2] == "coco: 118,287 samples (manifest), weight auto = 3.2% of the draws"
    # the loader refuses weights that were never resolved, and takes resolved ones
    with pytest.raises(ValueError, match="resolve_mixture"):
        TrainStream(specs, "unused.model", 32, 2, seed=0)


def test_fixed_weights_stay_and_a_shard_without_manifest_counts_its_label_rows(tmp_path):
    a = dataset(tmp_path, "a", [10, 20])
    b = dataset(tmp_path, "b", [5], manifest=False, label_rows=4)
    assert ingested_samples(find_shards(b.shards), b.labels) == (4, "label tables")
    mixture = resolve_mixture([DatasetSpec("a", a.shards, a.labels, 2.0), b], samples_per_epoch=0)
    assert [(d.name, d.weight) for d in mixture.datasets] == [("a", 2.0), ("b", 4.0)]
    assert mixture.samples_per_epoch == 34 and mixture.sources == {"a": "manifest", "b": "label tables"}
    # a fixed epoch length is kept; a run of fixed steps counts only what is auto
    assert resolve_mixture([a, b], samples_per_epoch=1000).samples_per_epoch == 1000
    only_b = resolve_mixture([DatasetSpec("a", a.shards, a.labels, 2.0), b], samples_per_epoch=None)
    assert only_b.samples == {"b": 4} and only_b.samples_per_epoch == 0
    # a shard neither in a manifest nor labelled cannot be counted
    os.remove(os.path.join(b.labels, "labels", "00000.parquet"))
    with pytest.raises(FileNotFoundError, match="not in its folder's manifest.parquet and no label table"):
        resolve_mixture([b])


def test_the_training_config_takes_auto_and_resolves_the_epoch(tmp_path, world):
    a = dataset(tmp_path, "a", [100, 28])
    b = dataset(tmp_path, "b", [64])
    cfg = TrainConfig(deepspeed="jobs/configs/zero2.json", run_dir=str(tmp_path / "run"), tokenizer=world.tokenizer,
                      data=[{"name": "a", "shards": a.shards, "labels": a.labels, "weight": "auto"}, b], epochs=2, steps=0,
                      batch_size=8, global_batch=64)  # fmt: skip
    with pytest.raises(ValueError, match="resolve the mixture first"):
        cfg.total_steps(world_size=2)
    cfg.resolve_data()
    assert cfg.samples_per_epoch == 192 and [d.weight for d in cfg.data] == [128.0, 64.0]
    assert cfg.total_steps(world_size=2) == 2 * math.ceil(192 / 64)
    assert pq.read_metadata(os.path.join(a.shards, "manifest.parquet")).num_rows == 2
