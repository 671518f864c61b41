"""Mixture weights: `auto` is proportional to the samples ingested (the shards' manifests, else the
label tables), and an epoch counts samples; the G3M preset's datasets as the reference concatenates them.
Per-dataset batch sizes: every batch of every rank holds the requested samples of each dataset."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.train import TrainConfig
from model.config import PROMPT
from model.prompt import IGNORE
from model.tokenizer import Tokenizer
from pipeline.loader import (
    DatasetSpec,
    TrainStream,
    batch_composition,
    parse_weight,
    resolve_mixture,
    train_loader,
)
from pipeline.shards import find_shards, ingested_samples, label_table_path
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
    fixed = [DatasetSpec("a", a.shards, a.labels, 2.0), DatasetSpec("b", b.shards, b.labels, 0.5)]
    mixture = resolve_mixture(fixed, samples_per_epoch=0)
    assert [(d.name, d.weight) for d in mixture.datasets] == [("a", 2.0), ("b", 0.5)]
    assert mixture.samples_per_epoch == 34 and mixture.sources == {"a": "manifest", "b": "label tables"}
    assert [(d.name, d.weight) for d in resolve_mixture([a, b]).datasets] == [("a", 30.0), ("b", 4.0)]
    # a fixed epoch length is kept; a run of fixed steps counts only what is auto
    assert resolve_mixture([a, b], samples_per_epoch=1000).samples_per_epoch == 1000
    steps_only = resolve_mixture(fixed, samples_per_epoch=None)
    assert steps_only.samples == {} and steps_only.samples_per_epoch == 0
    # a shard neither in a manifest nor labelled cannot be counted
    os.remove(os.path.join(b.labels, "labels", "00000.parquet"))
    with pytest.raises(FileNotFoundError, match="not in its folder's manifest.parquet and no label table"):
        resolve_mixture([b])


def test_auto_beside_a_number_is_refused(tmp_path):
    """An auto weight becomes a sample count: a number beside it would draw its dataset almost never."""
    a = dataset(tmp_path, "a", [10, 20])
    b = dataset(tmp_path, "b", [5])
    with pytest.raises(ValueError, match="dataset b: weight 2 beside auto weights: .* give every dataset auto or every one a number"):
        resolve_mixture([a, DatasetSpec("b", b.shards, b.labels, 2.0)])


def test_labels_of_other_shards_are_refused(tmp_path):
    """The validation shards with the train labels: same keys, other captions."""
    from tests.test_shards import write_tar

    a = dataset(tmp_path, "a", [2])
    write_tar(os.path.join(a.shards, "00000.tar"), [(f"a-0-{j}", {"jpg": b"x", "txt": b"a dog"}) for j in range(2)])
    resolve_mixture([a])  # the table's captions are "a dog"
    write_tar(os.path.join(a.shards, "00000.tar"), [(f"a-0-{j}", {"jpg": b"x", "txt": b"a cat on a mat"}) for j in range(2)])
    with pytest.raises(ValueError, match="00000.parquet was not made from .*00000.tar: sample a-0-0's caption is 'a cat on a mat' in the tar"):
        resolve_mixture([a])


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


# -- per-dataset batch sizes


def _spec(name: str, weight=1.0, batch=None) -> DatasetSpec:
    return DatasetSpec(name, "unused", "unused", weight, batch)


def test_batch_composition_is_all_or_none_sums_to_the_batch_and_refuses_weights():
    assert batch_composition([_spec("a"), _spec("b", 2.0)], 8) is None  # weighted sampling
    assert batch_composition([_spec("a", batch=6), _spec("b", batch=2)], 8) == [6, 2]
    bad = [
        ([_spec("a", batch=6), _spec("b")], 8, "given for a but not for b: give every dataset one"),
        ([_spec("a", batch=6), _spec("b", batch=3)], 8, r"6 \(a\) \+ 3 \(b\) = 9 must sum to batch_size 8 .*set batch_size 9"),
        ([_spec("a", batch=8), _spec("b", batch=0)], 8, "dataset b: batch size 0 must be a whole number >= 1"),
        ([_spec("a", batch=7), _spec("b", batch=1.0)], 8, "dataset b: batch size 1.0 must be a whole number"),
        ([_spec("a", 2.0, batch=6), _spec("b", batch=2)], 8, "dataset a: weight 2 beside batch size 6: .* a weight would be ignored"),
        ([_spec("a", "auto", batch=6), _spec("b", batch=2)], 8, "dataset a: weight auto beside batch size 6"),
        ([_spec("a"), _spec("a")], 8, "dataset names must differ: a given more than once"),
    ]
    for specs, batch, message in bad:
        with pytest.raises(ValueError, match=message):
            batch_composition(specs, batch)


def test_batch_sizes_from_the_data_flag_the_mapping_flag_and_the_yaml(tmp_path, world, capsys):
    """--data NAME=SHARDS,LABELS,,BATCH, --batch-sizes NAME=N, and the YAML's batch_sizes or data entries:
    one composition; the mixture says it at start."""
    from jobs.train import parse_args

    a, b = dataset(tmp_path, "a", [30]), dataset(tmp_path, "b", [10])
    common = ["--deepspeed", "jobs/configs/zero2.json", "--tokenizer", world.tokenizer, "--steps", "4", "--batch-size", "8"]
    flag, _ = parse_args([*common, "--data", f"a={a.shards},{a.labels},,6", "--data", f"b={b.shards},{b.labels},,2"])
    assert [(d.name, d.weight, d.batch_size) for d in flag.data] == [("a", 1.0, 6), ("b", 1.0, 2)]
    assert flag.batch_sizes == {"a": 6, "b": 2}
    mapping, _ = parse_args([*common, "--data", f"a={a.shards},{a.labels}", "--data", f"b={b.shards},{b.labels}", "--batch-sizes", "a=6", "b=2"])
    assert [d.batch_size for d in mapping.data] == [6, 2] and mapping.batch_sizes == flag.batch_sizes
    preset = tmp_path / "preset.yaml"
    entries = [{"name": "a", "shards": a.shards, "labels": a.labels}, {"name": "b", "shards": b.shards, "labels": b.labels}]
    preset.write_text(json.dumps({"data": entries, "batch_sizes": {"a": 6, "b": 2}}))  # JSON is YAML
    from_yaml, _ = parse_args([*common, "--config", str(preset)])
    assert [d.batch_size for d in from_yaml.data] == [6, 2]
    preset.write_text(json.dumps({"data": [dict(entries[0], batch_size=6), dict(entries[1], batch_size=2)]}))
    entry_form, _ = parse_args([*common, "--config", str(preset)])
    assert entry_form.batch_sizes == {"a": 6, "b": 2}
    # the flag's form round-trips through the saved config (train_config.json)
    assert TrainConfig(**json.loads(json.dumps(dataclasses.asdict(entry_form)))).batch_sizes == {"a": 6, "b": 2}
    assert flag.resolve_data().describe() == [
        "a: 6 of every micro-batch's 8 samples (75.0%)",
        "b: 2 of every micro-batch's 8 samples (25.0%)",
    ]
    epoch = TrainConfig(**dict(dataclasses.asdict(entry_form), steps=0, epochs=1))
    assert epoch.resolve_data().describe()[0] == "a: 30 samples (manifest), 6 of every micro-batch's 8 samples (75.0%)"

    def refused(*args) -> str:
        """The usage error's text, out of tyro's box."""
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            parse_args([*common, *args])
        assert exit_info.value.code == 2
        return " ".join(re.sub("[\u2500-\u257f]", " ", capsys.readouterr().err).split())

    data = ["--data", f"a={a.shards},{a.labels}", "--data", f"b={b.shards},{b.labels}"]
    cases = {
        ("--data", f"a={a.shards},{a.labels},,six"): "BATCH 'six' is not a whole number",
        ("--data", f"a={a.shards},{a.labels},1,6,9"): "expected NAME=SHARDS,LABELS[,WEIGHT[,BATCH]]",
        (*data, "--batch-sizes", "a=6", "c=2"): "batch_sizes names c, not among the datasets (a, b)",
        (*data, "--batch-sizes", "a=six"): "expected NAME=N",
        (*data, "--batch-sizes", "a=6", "b=3"): "must sum to batch_size 8",
        (*data, "--batch-sizes", "a=8"): "given for a but not for b",
        ("--data", f"a={a.shards},{a.labels},,5", "--data", f"b={b.shards},{b.labels},,3", "--batch-sizes", "a=6", "b=2"): "dataset a: batch size 5 in its --data",
        ("--data", f"a={a.shards},{a.labels},auto,6", "--data", f"b={b.shards},{b.labels},,2"): "dataset a: weight auto beside batch size 6",
    }
    for args, message in cases.items():
        assert message in refused(*args), args


def _labelled_dataset(root: str, name: str, label: str, images: list[bytes], corrupt: bool = False) -> DatasetSpec:
    """Two shards of 5 samples whose one label is ``label``; with ``corrupt``, one JPEG of each shard is not one."""
    from tests.test_shards import write_tar

    shards, labels = os.path.join(root, name), os.path.join(root, name + "_labels")
    os.makedirs(shards)
    for s in range(2):
        keys = [f"{s:05d}{i:04d}" for i in range(5)]
        jpegs = [images[(s * 5 + i) % len(images)] for i in range(5)]
        if corrupt:
            jpegs[2] = b"\xff\xd8\xff\xe0 not a jpeg"
        write_tar(os.path.join(shards, f"{s:05d}.tar"), [(k, {"jpg": j, "txt": f"a {label}".encode()}) for k, j in zip(keys, jpegs)])
        rows = {"key": keys, "shard": [f"{s:05d}"] * 5, "caption": [f"a {label}"] * 5, "labels": [[label]] * 5, "extractor": ["spacy"] * 5}
        write_table(pa.table(rows), label_table_path(labels, f"{s:05d}"), LABEL_TABLE)
    return DatasetSpec(name, shards, labels)


def _read(stream_args: dict, rank: int, start_step: int, n: int, workers: int) -> list[dict]:
    it = iter(train_loader(TrainStream(**stream_args, rank=rank, start_step=start_step), workers))
    out = [next(it) for _ in range(n)]
    del it
    return out


def test_every_batch_of_every_rank_has_the_requested_composition(tmp_path, world):
    """3 datasets whose samples name their dataset, 2 ranks x 2 workers, accumulation 2, a checkpoint every
    2 steps: each micro-batch holds 4 + 2 + 2 samples and each sample's targets are its dataset's label
    (the corrupt images of one dataset are replaced by its own samples); a loader started at a checkpoint
    reads what the whole run read from there."""
    from tests.test_evaluate import _jpeg

    tok = Tokenizer(world.tokenizer)
    images = _jpeg(world, 4, size=32)
    label_of = {"a": "circle", "b": "star", "c": "cup"}
    specs = [_labelled_dataset(str(tmp_path), n, label, images, corrupt=n == "c") for n, label in label_of.items()]
    for spec, size in zip(specs, (4, 2, 2)):
        spec.batch_size = size
    args = dict(datasets=specs, tokenizer_path=world.tokenizer, image_size=32, batch_size=8, seed=7, shuffle_buffer=4, max_text_len=32,
                segment_steps=2, batches_per_step=2, prompt_augmentation=False, world_size=2)  # fmt: skip
    steps, workers = 4, 2
    firsts = set()
    for rank in (0, 1):
        whole = _read(args, rank, 0, steps * 2, workers)
        for i, batch in enumerate(whole):
            where = f"rank {rank}, micro-batch {i}"
            assert torch.bincount(batch["dataset"], minlength=3).tolist() == [4, 2, 2], where
            for d, targets in zip(batch["dataset"].tolist(), batch["targets"].tolist()):
                text = tok.decode([t for t in targets if t != IGNORE and t not in (tok.eos_id, tok.delimiter_id)])
                assert text.strip() == f"{PROMPT} {label_of['abc'[d]]}", f"{where}: a sample of {'abc'[d]} reads {text!r}"
            firsts.add(batch["dataset"][0].item())
        assert sum(b["stats"]["corrupt_images"] for b in whole[-workers:]) >= 1, "the corrupt images were read"
        resumed = _read(args, rank, 2, (steps - 2) * 2, workers)
        for i, (a, b) in enumerate(zip(resumed, whole[4:])):
            for key in ("images", "ids", "targets", "dataset"):
                assert torch.equal(a[key], b[key]), f"rank {rank}: resumed at step 2, micro-batch {i}: {key} differs"
    assert firsts == {0, 1, 2}, "each batch's order is drawn: every dataset comes first in some batch"
    other_rank = _read(args, 1, 0, 1, 1)[0]
    assert not torch.equal(other_rank["ids"], _read(args, 0, 0, 1, 1)[0]["ids"]), "ranks read different samples"
