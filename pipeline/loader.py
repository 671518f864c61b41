"""The training data: webdataset shards plus label tables, as batches of model inputs.

Each dataset is a folder of shards (``jobs.ingest``) and a label folder (``jobs.labels``,
one ``labels/<shard>.parquet`` per shard). The stream of one rank's data-loader worker:

1. picks a dataset by its mixture weight, then a shard of its rank's share at random
   (resampled, as open_clip's ``--dataset-resampled``: no epoch boundary, every rank
   and worker draws with its own seed); with per-dataset batch sizes (OSM's
   ``--batch_size_coco 8 --batch_size_lvis 16``) each micro-batch instead holds exactly that
   many samples of each dataset, in an order drawn anew for every batch, each dataset read
   through its own shuffle buffer (a share of ``shuffle_buffer`` as large as its share of
   the batch). A rank's share of a dataset (:func:`rank_shards`): when the dataset has at
   least as many shards as there are ranks, shard i belongs to rank i % world size, so the
   ranks read disjoint shards (the workers of one rank draw from the same share); when the
   shards do not divide evenly, the last N mod W shards are read by every rank, each at
   1/W of the weight of a rank's own shards (:func:`share_weights`), so that over the ranks
   every shard is drawn equally often (12 shards on 8 ranks would otherwise draw the shards
   of the 1-shard ranks twice as often as the others); a dataset with fewer shards than ranks
   is read whole by every rank. Ranks may then draw the same samples of the shards they share
   (``Mixture.describe`` says so for each dataset);
2. reads the shard's intact samples (``pipeline.shards``' rule); a damaged shard is
   counted (``bad_shards``) each time it is read, never a crash;
3. joins each sample's labels by key from that shard's label table (loaded once per
   shard); a sample without labels is counted (``no_labels``) and skipped;
4. decodes and preprocesses the image (CLIP's transform); a corrupt image is counted
   (``corrupt_images``) and skipped;
5. builds the token ids, targets and label segments (labels shuffled, a prompt template
   drawn) and collates batches, all in the worker; each batch's ``dataset`` holds every
   sample's dataset index (its position in the mixture), for per-dataset losses.

Determinism: the batches are a pure function of (seed, rank, world size, number of workers,
start step, samples seen at the start, checkpoint interval, batch size, accumulation). The
stream restarts itself at every checkpoint step, inside the same worker processes, so that a
run resumed from a checkpoint reads exactly the batches the uninterrupted run read, without
new workers at every checkpoint. A segment's worker streams are seeded with its position in
samples (the samples the run has trained before it), not its step number: with an unchanged
global batch that is step x global batch (the same batches on resume), and a run resumed
with another global batch, which renumbers its steps, draws fresh data instead of repeating
batches it already trained.

When none of a rank's own shards of a dataset gives a usable sample (each one's last read was
damaged, or held no sample with labels), that rank reads the dataset's other shards instead
(each such read counted in ``outside_share_reads``); only a dataset none of whose shards
gives a usable sample stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.config import CAPTION_PROMPT, PROMPT, PROMPT_TEMPLATES
from model.prompt import IGNORE, caption_text, label_segments, pad_batch, training_text
from model.protocol import check_protocol
from model.tokenizer import Tokenizer
from model.vision import preprocess
from pipeline import storage
from pipeline.outputs import require_published
from pipeline.shards import (
    Shard,
    TarReader,
    check_labels_made_from,
    find_shards,
    label_table_path,
    read_label_table,
)
from schemas.validate import SchemaError


@dataclass
class DatasetSpec:
    name: str
    shards: str  # webdataset shards: a folder, a glob or a brace pattern, local or a URL (pipeline.shards)
    labels: str  # jobs.labels output folder (holding labels/<shard>.parquet)
    weight: float | str = 1.0  # mixture weight, or "auto": proportional to the samples ingested (resolve_mixture)
    batch_size: int | None = None  # samples of this dataset in every micro-batch (batch_composition); None: drawn by weight

    def find(self) -> list[Shard]:
        """The dataset's shards that have a tar (a parquet without its tar is not a shard to train on)."""
        found = [s for s in find_shards(self.shards) if s.tar]
        if not found:
            raise FileNotFoundError(f"dataset {self.name}: no shards at {self.shards}")
        return found


def parse_weight(value) -> float | str:
    """A mixture weight as written (a number, or ``auto``); ValueError for anything else."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"mixture weight {value!r}: a number > 0 or auto") from None
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"mixture weight {value!r}: a number > 0 or auto")
    return weight


def batch_composition(datasets: Sequence[DatasetSpec], batch_size: int) -> list[int] | None:
    """Samples of each dataset in every micro-batch of every rank, or None: weighted sampling.

    Per-dataset batch sizes are all given or none; each is >= 1 and they sum to ``batch_size``
    (the micro-batch per rank; the global batch holds ``world size x accumulation`` times each).
    A weight other than the default 1 beside them is refused: the composition is fixed, a
    weight would be ignored. Dataset names must differ (losses are logged by name).
    ValueError, naming what is wrong, otherwise.
    """
    names = [d.name for d in datasets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"dataset names must differ: {', '.join(twice)} given more than once")
    given = [d for d in datasets if d.batch_size is not None]
    if not given:
        return None
    if len(given) != len(datasets):
        missing = [d.name for d in datasets if d.batch_size is None]
        raise ValueError(
            f"per-dataset batch sizes are given for {', '.join(d.name for d in given)} but not for {', '.join(missing)}: "
            "give every dataset one (a fixed number of its samples in each batch) or none (weighted sampling)"
        )
    for d in datasets:
        if isinstance(d.batch_size, bool) or not isinstance(d.batch_size, int) or d.batch_size < 1:
            raise ValueError(f"dataset {d.name}: batch size {d.batch_size!r} must be a whole number >= 1 (leave a dataset out rather than give it 0)")
        if d.weight != 1.0:
            raise ValueError(
                f"dataset {d.name}: weight {d.weight if isinstance(d.weight, str) else f'{d.weight:g}'} beside batch size {d.batch_size}: per-dataset batch sizes fix each "
                "batch's composition, so a weight would be ignored; leave the weights out"
            )
    total = sum(d.batch_size for d in datasets)
    if total != batch_size:
        sizes = " + ".join(f"{d.batch_size} ({d.name})" for d in datasets)
        raise ValueError(f"per-dataset batch sizes {sizes} = {total} must sum to batch_size {batch_size} (the micro-batch per rank): set batch_size {total}")
    return [d.batch_size for d in datasets]


@dataclass
class Mixture:
    """The datasets with their weights resolved, and what an epoch is."""

    datasets: list[DatasetSpec]
    samples: dict[str, int]  # dataset name -> samples ingested (only counted where something was auto)
    sources: dict[str, str]  # dataset name -> where the count came from (manifest, label tables)
    samples_per_epoch: int
    auto: frozenset[str] = frozenset()  # the datasets whose weight was auto
    shards: dict[str, int] = field(default_factory=dict)  # dataset name -> shards found

    def describe(self, world_size: int = 1) -> list[str]:
        """One line per dataset: its samples, weight and share of the draws, and on several ranks how they split its shards."""
        total = sum(d.weight for d in self.datasets)
        per_batch = sum(d.batch_size or 0 for d in self.datasets)
        lines = []
        for d in self.datasets:
            n = self.samples.get(d.name)
            have = f"{n:,} samples ({self.sources[d.name]}), " if n is not None else ""
            if d.batch_size is not None:
                lines.append(f"{d.name}: {have}{d.batch_size} of every micro-batch's {per_batch} samples ({d.batch_size / per_batch:.1%})" + _split(self.shards.get(d.name), world_size))
                continue
            weight = "auto" if d.name in self.auto else f"{d.weight:g}"
            lines.append(f"{d.name}: {have}weight {weight} = {d.weight / total:.1%} of the draws" + _split(self.shards.get(d.name), world_size))
        return lines


def _split(shards: int | None, world_size: int) -> str:
    if world_size <= 1 or shards is None:
        return ""
    if shards < world_size:
        return f"; only {shards} shard(s) for {world_size} ranks: every rank reads all of them, so ranks may draw the same samples"
    split = f"; {shards} shards over {world_size} ranks: each rank reads only its own (shard i on rank i mod {world_size})"
    shared = shards % world_size
    if not shared:
        return split + ", disjoint"
    return (
        f"{split} and every rank the last {shared} (of the {shards} not dividing evenly), each at 1/{world_size} of an own shard's "
        "weight so that every shard is drawn equally often; ranks may draw the same samples of those"
    )


def rank_shards(shards: Sequence, rank: int, world_size: int) -> list:
    """The shards rank ``rank`` of ``world_size`` resamples from, with N shards: all of them when N < world_size (the
    ranks overlap); else shard i of the first world_size x (N // world_size) on rank i % world_size (disjoint), then the
    last N % world_size, which every rank reads (drawn with :func:`share_weights`, so that every shard is drawn
    equally often over the ranks)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if len(shards) < world_size:
        return list(shards)
    even = len(shards) - len(shards) % world_size
    return list(shards[rank:even:world_size]) + list(shards[even:])


def share_weights(shards: int, world_size: int) -> list[int] | None:
    """The draw weights of the shards of a rank's share (:func:`rank_shards`' order) when a dataset has ``shards``
    shards: None where the share is drawn uniformly (the shards divide evenly, or every rank reads all); else
    world_size for each of the rank's own shards and 1 for each shared one. A rank then draws an own shard with
    probability world_size / shards and a shared one 1 / shards, which the world_size ranks sum to world_size / shards:
    every shard alike."""
    if shards < world_size or shards % world_size == 0:
        return None
    return [world_size] * (shards // world_size) + [1] * (shards % world_size)


def resolve_mixture(datasets: Sequence[DatasetSpec], samples_per_epoch: int | None = 0) -> Mixture:
    """Weights of ``auto`` become the dataset's ingested samples (``pipeline.shards.ingested_samples``),
    so that a mixture of auto weights draws as a concatenation of the datasets would (auto beside
    a number is refused: the two are not on one scale); a
    ``samples_per_epoch`` of 0 becomes the datasets' samples summed (an epoch counts samples);
    None: no epoch length is needed (a run of fixed steps)."""
    from pipeline.shards import ingested_samples

    count_all = samples_per_epoch is not None and samples_per_epoch <= 0
    given = {d.name: parse_weight(d.weight) for d in datasets}
    if "auto" in given.values() and any(w != "auto" for w in given.values()):
        fixed = next(name for name, w in given.items() if w != "auto")
        raise ValueError(
            f"dataset {fixed}: weight {given[fixed]:g} beside auto weights: an auto weight becomes the dataset's sample count "
            "(millions at scale), so a number beside it would draw that dataset almost never; give every dataset auto or every one a number"
        )
    samples, sources, resolved, shards = {}, {}, [], {}
    for d in datasets:
        weight = parse_weight(d.weight)
        found = d.find()
        check_labels_made_from(found[0], d.labels)  # labels of other shards match by key alone
        shards[d.name] = len(found)
        if weight == "auto" or count_all:
            samples[d.name], sources[d.name] = ingested_samples(found, d.labels)
            if samples[d.name] == 0 and weight == "auto":
                raise ValueError(f"dataset {d.name}: no samples ingested at {d.shards}, so its auto weight would be 0")
        resolved.append(dataclasses.replace(d, weight=float(samples[d.name]) if weight == "auto" else weight))
    auto = frozenset(d.name for d in datasets if parse_weight(d.weight) == "auto")
    return Mixture(resolved, samples, sources, sum(samples.values()) if count_all else samples_per_epoch or 0, auto, shards)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class TrainStream(IterableDataset):
    """Collated batches for one rank; see the module docstring."""

    def __init__(
        self,
        datasets: Sequence[DatasetSpec],
        tokenizer_path: str,
        image_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        max_text_len: int = 256,
        prompt_augmentation: bool = True,
        caption_loss: bool = False,
        shuffle_buffer: int = 256,
        caption_fraction: float = 1.0,
        protocol: str = "nxtp",
        segment_steps: int = 0,
        batches_per_step: int = 1,
        start_samples: int | None = None,
    ):
        self.datasets = list(datasets)
        self.all_shards = [d.find() for d in self.datasets]  # every shard of each (read when the rank's own give nothing)
        self.shards = [rank_shards(found, rank, world_size) for found in self.all_shards]  # this rank's share of each
        self.share_weights = [share_weights(len(found), world_size) for found in self.all_shards]  # None: uniform
        for d in self.datasets:
            require_published(d.labels, "labels output")  # on object storage: only a whole one
            if not storage.isdir(storage.join(d.labels, "labels")):
                raise FileNotFoundError(f"dataset {d.name}: no label tables in {d.labels}/labels (run jobs.labels)")
        self.composition = batch_composition(self.datasets, batch_size)  # None: drawn by weight
        if any(isinstance(d.weight, str) for d in self.datasets):
            raise ValueError("auto mixture weights must be resolved first (resolve_mixture)")
        total = sum(d.weight for d in self.datasets)
        if total <= 0:
            raise ValueError("dataset weights must sum to a positive number")
        self.weights = [d.weight / total for d in self.datasets]
        self.tokenizer_path = tokenizer_path
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.max_text_len = max_text_len
        self.templates = PROMPT_TEMPLATES if prompt_augmentation else (PROMPT,)
        self.caption_loss = caption_loss
        # the first ones of each batch also train the caption branch (at least one)
        self.caption_samples = max(1, math.ceil(caption_fraction * batch_size))
        self.shuffle_buffer = shuffle_buffer
        self.protocol = check_protocol(protocol)  # the label mask's (model.prompt.label_segments)
        self.segment_steps = segment_steps  # the checkpoint interval (0: one segment from start_step on)
        self.batches_per_step = batches_per_step  # gradient accumulation
        self.global_batch = batch_size * batches_per_step * world_size  # samples per optimizer step, all ranks
        # samples the run has trained before start_step (None: start_step x global batch, an unchanged global batch)
        self.start_samples = start_step * self.global_batch if start_samples is None else start_samples
        if self.start_samples < 0:
            raise ValueError(f"start_samples must be >= 0, not {start_samples}")

    def segment_samples(self, step: int) -> int:
        """The position in samples of step ``step`` (>= start_step): the samples trained before it, which seed the
        streams of a segment that starts there."""
        return self.start_samples + (step - self.start_step) * self.global_batch

    def __iter__(self) -> Iterator[dict]:
        """Worker w of W yields batches w, w+W, ... (the DataLoader's order), counted from step 0.

        Batches are grouped in segments that start at ``start_step`` and at every multiple of
        ``segment_steps`` after it. Within a segment, batch j is the (j // W)-th batch of the
        segment's stream number j % W, seeded with the segment's first sample (:meth:`segment_samples`):
        what a loader started at that step with those samples seen yields, whichever worker produces it.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first = self.start_step * self.batches_per_step
        per_segment = self.segment_steps * self.batches_per_step
        b, current, batches = first + worker, None, None
        while True:
            start = max(first, b - b % per_segment) if per_segment > 0 else first
            if start != current:
                current, batches = start, self._batches(worker, (b - start) % workers, self.segment_samples(start // self.batches_per_step))
            yield next(batches)
            b += workers

    def _batches(self, worker: int, stream: int, start_samples: int) -> Iterator[dict]:
        """Collated batches of one segment's stream ``stream``, produced by ``worker``; the segment starts after
        ``start_samples`` samples of the run (its seed: a run resumed with another global batch, whose steps are
        renumbered, reads no segment it already trained)."""
        rng = random.Random(_seed(self.seed, self.rank, stream, start_samples))
        tok = Tokenizer(self.tokenizer_path)
        transform = preprocess(self.image_size)
        stats: Counter = Counter(shards_read=Counter())  # counters, and "dataset/shard" -> reads of it
        cache: OrderedDict = OrderedDict()
        if self.composition is None:  # one source: the weighted mixture
            sources = [self._shuffled(self._mixture(rng, stats, cache), rng, self.shuffle_buffer)]
            slots = [0] * self.batch_size
        else:  # one source per dataset, each with its share of the shuffle buffer
            sources = [
                self._shuffled(self._dataset_samples(i, rng, stats, cache), rng, max(1, math.ceil(self.shuffle_buffer * n / self.batch_size)))
                for i, n in enumerate(self.composition)
            ]
            slots = [i for i, n in enumerate(self.composition) for _ in range(n)]
        while True:
            # a fixed composition in a drawn order, so that the caption samples (the first ones) come from every dataset
            order = slots if self.composition is None else rng.sample(slots, len(slots))
            batch = [self._example(sources[i], position, tok, transform, rng, stats) for position, i in enumerate(order)]
            yield collate(batch, tok, {"worker": worker, **stats, "shards_read": dict(stats["shards_read"])}, self.protocol)

    def _example(self, samples: Iterator[dict], position: int, tok: Tokenizer, transform, rng: random.Random, stats: Counter) -> dict:
        """The next sample of ``samples`` whose image decodes, as model inputs (``position``: its place in the batch)."""
        while True:  # the sample streams are endless
            sample = next(samples)
            try:
                with Image.open(io.BytesIO(sample["jpg"])) as img:
                    image = transform(img.convert("RGB"))
            except Exception:  # noqa: BLE001 - any decode failure of one sample: counted, skipped
                stats["corrupt_images"] += 1
                continue
            ids, targets, answer = training_text(sample["labels"], tok, rng, self.templates, self.max_text_len)
            example = {"image": image, "ids": ids, "targets": targets, "answer": answer, "dataset": sample["dataset"]}
            if self.caption_loss and position < self.caption_samples:
                example["caption_ids"], example["caption_targets"] = caption_text(sample["caption"], tok, CAPTION_PROMPT, self.max_text_len)
            stats["samples"] += 1
            return example

    def _mixture(self, rng: random.Random, stats: Counter, cache: OrderedDict) -> Iterator[dict]:
        streams = [self._dataset_samples(i, rng, stats, cache) for i in range(len(self.datasets))]
        while True:
            i = rng.choices(range(len(streams)), weights=self.weights)[0]
            yield next(streams[i])

    def _dataset_samples(self, i: int, rng: random.Random, stats: Counter, cache: OrderedDict) -> Iterator[dict]:
        """Dataset ``i``'s usable samples, from shards of this rank's share drawn at random; once every shard of the
        share has given none at its last read, from the dataset's shards that may still give some (the others'
        shares, each read counted in ``outside_share_reads``); RuntimeError once none of its shards gives any."""
        spec, shards, every, weights = self.datasets[i], self.shards[i], self.all_shards[i], self.share_weights[i]
        own = {s.name for s in shards}
        failed: set[str] = set()  # the shards whose last read gave no usable sample
        draws, distinct = 0, set()  # the reads in a row that gave none, and their shards
        while True:
            if not own <= failed:
                shard = rng.choice(shards) if weights is None else rng.choices(shards, weights)[0]
            else:  # the rank's whole share is unusable: the dataset's other shards, rather than stopping the run
                shard = rng.choice([s for s in every if s.name not in failed])
                stats["outside_share_reads"] += 1
            stats["shards_read"][f"{spec.name}/{shard.name}"] += 1
            labels = _shard_labels(spec, shard, stats, cache)
            reader = TarReader(shard.tar)
            yielded = 0
            for sample in reader:
                if "jpg" not in sample.data:
                    stats["missing_image"] += 1
                    continue
                found = labels.get(sample.key)
                if not found:
                    stats["no_labels"] += 1
                    continue
                yielded += 1
                # several captions of one image (COCO's) are "\n"-joined in its txt: the caption branch reads one, drawn anew each time
                captions = [c for c in sample.data.get("txt", b"").decode("utf-8", "replace").split("\n") if c.strip()] or [""]
                caption = captions[0] if len(captions) == 1 else rng.choice(captions)
                yield {"jpg": sample.data["jpg"], "labels": found, "caption": caption, "key": sample.key, "dataset": i}
            if reader.damage:
                stats["bad_shards"] += 1
            if yielded:
                failed.discard(shard.name)
                draws, distinct = 0, set()
                continue
            failed.add(shard.name)
            draws += 1
            distinct.add(shard.name)
            if len(failed) == len(every):
                raise RuntimeError(
                    f"dataset {spec.name}: none of its {len(every)} shard(s) gives a usable sample: {draws} draws ({len(distinct)} distinct shards) "
                    f"in a row gave none (last: {shard.tar}: {reader.damage or 'no sample with labels'})"
                )

    @staticmethod
    def _shuffled(samples: Iterator[dict], rng: random.Random, size: int) -> Iterator[dict]:
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= size:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()


def _shard_labels(spec: DatasetSpec, shard: Shard, stats: Counter, cache: OrderedDict, size: int = 64) -> dict:
    """key -> labels of one shard, from its label table (a small LRU of shards per worker)."""
    entry = (spec.name, shard.name)
    if entry not in cache:
        try:
            table = read_label_table(label_table_path(spec.labels, shard.name))
            cache[entry] = dict(zip(table.column("key").to_pylist(), table.column("labels").to_pylist()))
        except SchemaError:
            stats["bad_label_tables"] += 1
            cache[entry] = {}
        except (OSError, ValueError):
            stats["missing_label_tables"] += 1
            cache[entry] = {}
        if len(cache) > size:
            cache.popitem(last=False)
    return cache[entry]


def collate(examples: list[dict], tok: Tokenizer, stats: dict, protocol: str = "nxtp") -> dict:
    ids = pad_batch([e["ids"] for e in examples], tok.pad_id)
    answer = torch.tensor([e["answer"] for e in examples])
    batch = {
        "images": torch.stack([e["image"] for e in examples]),
        "ids": ids,
        "targets": pad_batch([e["targets"] for e in examples], IGNORE),
        "segments": label_segments(ids, answer, tok.delimiter_id, protocol),
        "stats": stats,
    }
    if "dataset" in examples[0]:  # TrainStream's examples: each one's dataset index in the mixture
        batch["dataset"] = torch.tensor([e["dataset"] for e in examples])
    captioned = [e for e in examples if "caption_ids" in e]  # the batch's first samples (TrainStream's caption_fraction)
    if captioned:
        batch["caption_ids"] = pad_batch([e["caption_ids"] for e in captioned], tok.pad_id)
        batch["caption_targets"] = pad_batch([e["caption_targets"] for e in captioned], IGNORE)
    return batch


def train_loader(stream: TrainStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches are made in the workers (batch_size=None); worker w serves batches w, w+W, ...

    pin_memory: page-locked batches, for non-blocking copies to a GPU.
    """
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None
    )
