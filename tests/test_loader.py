"""The training stream driven directly (no launcher): its seeds across a resume that changes the global batch,
and a rank whose own shards of a dataset give no usable sample."""

from __future__ import annotations

import io
import os
from collections import Counter

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.loader import DatasetSpec, TrainStream, train_loader
from pipeline.shards import label_table_path
from schemas import LABEL_TABLE, write_table
from tests.test_shards import write_tar


def _dataset(root, shards: int = 4, per: int = 8) -> DatasetSpec:
    """``shards`` shards of ``per`` labelled samples, each image one colour that names its shard and place in it."""
    folder, labels = os.path.join(root, "d"), os.path.join(root, "d_labels")
    os.makedirs(folder)
    for s in range(shards):
        keys = [f"{s:05d}{j:04d}" for j in range(per)]
        members = []
        for j, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (30 + 50 * s, 20 + 25 * j, 0)).save(buf, "JPEG")
            members.append((key, {"jpg": buf.getvalue(), "txt": b"a dog"}))
        write_tar(os.path.join(folder, f"{s:05d}.tar"), members)
        rows = {"key": keys, "shard": [f"{s:05d}"] * per, "caption": ["a dog"] * per, "labels": [["dog"]] * per, "extractor": ["spacy"] * per}
        write_table(pa.table(rows), label_table_path(labels, f"{s:05d}"), LABEL_TABLE)
    return DatasetSpec("d", folder, labels)


def _samples(batch: dict) -> list[tuple]:
    """Which sample (its image's colour) with which text, in the batch's order."""
    return list(zip(batch["images"][:, 0, 0, 0].tolist(), batch["images"][:, 1, 0, 0].tolist(), batch["ids"].sum(1).tolist()))


def _read(spec: DatasetSpec, tokenizer: str, n: int, workers: int = 0, **kwargs) -> list[list[tuple]]:
    args = dict(image_size=32, batch_size=4, seed=42, shuffle_buffer=4, max_text_len=32) | kwargs
    it = iter(train_loader(TrainStream([spec], tokenizer, **args), workers))
    out = [_samples(next(it)) for _ in range(n)]
    del it
    return out


def test_a_resume_with_a_larger_global_batch_reads_no_batch_it_trained(tmp_path, world):
    """10 steps of 4 samples (a checkpoint every 5), then resumed from the 40 samples seen with accumulation 2
    (step 40 // 8 = 5, the steps renumbered) or a batch of 8: the streams are seeded by samples, so the resumed
    run does not read again the batches of steps 6-10 (seeded by step, it read exactly those, in that order)."""
    spec = _dataset(str(tmp_path))
    whole = _read(spec, world.tokenizer, 10, segment_steps=5)
    for accum in (2, 4):
        resumed = _read(spec, world.tokenizer, 10, segment_steps=5, batches_per_step=accum, start_step=40 // (4 * accum), start_samples=40)
        assert not {tuple(b) for b in resumed} & {tuple(b) for b in whole}, f"accumulation {accum}: a batch trained before the checkpoint"
    larger = _read(spec, world.tokenizer, 2, segment_steps=5, batch_size=8, start_step=5, start_samples=40)
    assert [s for b in larger for s in b] != [s for b in whole[5:9] for s in b], "a batch of 8 reads the samples of steps 6-10 again"
    # the same config resumed at its checkpoint reads what the whole run read, start_samples given or not (step x global batch)
    for start_samples in (None, 20):
        assert _read(spec, world.tokenizer, 5, segment_steps=5, start_step=5, start_samples=start_samples) == whole[5:]
    # the resumed run resumed again at its own next checkpoint (step 10, 40 + 5 x 8 samples) reads what it read from there
    resumed = _read(spec, world.tokenizer, 14, segment_steps=5, batches_per_step=2, start_step=5, start_samples=40)
    again = _read(spec, world.tokenizer, 4, segment_steps=5, batches_per_step=2, start_step=10, start_samples=80)
    assert again == resumed[10:]


def test_segments_are_seeded_by_their_first_sample(tmp_path, world):
    spec = _dataset(str(tmp_path), shards=1, per=2)
    stream = TrainStream([spec], world.tokenizer, 32, 4, seed=0, world_size=3, start_step=7, batches_per_step=2, start_samples=170)
    assert stream.global_batch == 4 * 2 * 3
    assert stream.segment_samples(7) == 170 and stream.segment_samples(10) == 170 + 3 * 24
    assert TrainStream([spec], world.tokenizer, 32, 4, seed=0, world_size=3, start_step=7, batches_per_step=2).segment_samples(10) == 10 * 24
    with pytest.raises(ValueError, match="start_samples must be >= 0"):
        TrainStream([spec], world.tokenizer, 32, 4, seed=0, start_samples=-1)


def _first(spec: DatasetSpec, tokenizer: str, n: int, **kwargs) -> list[dict]:
    it = iter(TrainStream([spec], tokenizer, 32, 4, seed=1, shuffle_buffer=2, max_text_len=32, **kwargs))
    return [next(it) for _ in range(n)]


def test_ranks_draw_every_shard_equally_often_when_the_shards_do_not_divide_evenly(tmp_path, world):
    """5 one-sample shards on 2 ranks, 300 draws each: rank 0 owns 2, rank 1 owns 2, both read the 5th at half an
    own shard's weight, so that over the ranks each shard gives about 120 of the 600 samples (the old split, 3 shards
    on rank 0 and 2 on rank 1, gave rank 1's 150 each and rank 0's 100). The draws are seeded: the same counts on
    every run."""
    spec = _dataset(str(tmp_path), shards=5, per=1)
    drawn = Counter()
    for rank in (0, 1):
        stats = _first(spec, world.tokenizer, 75, rank=rank, world_size=2)[-1]["stats"]
        assert stats["samples"] == 300, stats
        drawn.update(stats["shards_read"])
        assert set(stats["shards_read"]) == {f"d/{s:05d}" for s in ((0, 2, 4) if rank == 0 else (1, 3, 4))}, stats
    assert sum(drawn.values()) >= 600 and all(95 <= n <= 145 for n in drawn.values()), drawn


def test_a_rank_whose_only_shard_is_damaged_reads_the_others(tmp_path, world):
    """4 shards on 4 ranks: rank 3's one shard is not a tar. It reads the dataset's other shards (counted), not a
    RuntimeError that stops every rank; the other ranks keep to their own."""
    spec = _dataset(str(tmp_path))
    with open(os.path.join(spec.shards, "00003.tar"), "wb") as f:
        f.write(b"\0garbage" * 100)
    batches = _first(spec, world.tokenizer, 20, rank=3, world_size=4)
    stats = batches[-1]["stats"]
    assert stats["samples"] == 80 and stats["bad_shards"] >= 1 and stats["outside_share_reads"] >= 1, stats
    assert stats["shards_read"]["d/00003"] == 1, "its own shard, read once: then the dataset's others"
    assert set(stats["shards_read"]) - {"d/00003"} <= {"d/00000", "d/00001", "d/00002"} and len(stats["shards_read"]) > 1, stats
    colours = {round(x, 3) for b in batches for x in b["images"][:, 0, 0, 0].tolist()}
    assert len(colours) > 1, "samples of the other shards"
    own = _first(spec, world.tokenizer, 5, rank=1, world_size=4)[-1]["stats"]
    assert set(own["shards_read"]) == {"d/00001"} and "outside_share_reads" not in own, own
    # a whole world of one rank with a damaged shard among good ones: as before, it is read and counted, no fallback
    alone = _first(spec, world.tokenizer, 20)[-1]["stats"]
    assert alone["bad_shards"] >= 1 and "outside_share_reads" not in alone, alone


def test_a_rank_whose_only_shard_has_no_label_table_reads_the_others(tmp_path, world):
    spec = _dataset(str(tmp_path))
    os.remove(label_table_path(spec.labels, "00002"))
    stats = _first(spec, world.tokenizer, 10, rank=2, world_size=4)[-1]["stats"]
    assert stats["samples"] == 40 and stats["no_labels"] == 8 and stats["missing_label_tables"] == 1, stats
    assert stats["outside_share_reads"] >= 1 and stats["shards_read"]["d/00002"] == 1, stats


def test_only_a_dataset_none_of_whose_shards_gives_a_sample_stops_the_run(tmp_path, world):
    spec = _dataset(str(tmp_path))
    for s in range(4):
        os.remove(label_table_path(spec.labels, f"{s:05d}"))
    for rank, world_size in ((0, 1), (3, 4)):
        with pytest.raises(RuntimeError, match=r"dataset d: none of its 4 shard\(s\) gives a usable sample: (\d+) draws \(4 distinct shards\) in a row gave none \(last: .*: no sample with labels\)"):
            _first(spec, world.tokenizer, 1, rank=rank, world_size=world_size)
    # the count of draws is the reads, and the distinct shards among them (a share of 1 is drawn once)
    with pytest.raises(RuntimeError, match=r": 4 draws \(4 distinct shards\)"):
        _first(spec, world.tokenizer, 1, rank=3, world_size=4)


def test_the_fallback_stream_is_the_same_on_resume(tmp_path, world):
    """A damaged share changes no determinism: the loader started at the checkpoint reads what the whole run read."""
    spec = _dataset(str(tmp_path))
    with open(os.path.join(spec.shards, "00001.tar"), "wb") as f:
        f.write(b"\0garbage" * 100)
    args = dict(rank=1, world_size=4, segment_steps=3, batches_per_step=2)
    whole = _read(spec, world.tokenizer, 12, workers=2, **args)
    assert _read(spec, world.tokenizer, 6, workers=2, start_step=3, **args) == whole[6:]
