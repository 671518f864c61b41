"""Evaluation on Ray Data: one-shot top-k labels of validation shards, scored against their label tables.

    driver: plan_reads                           tar headers indexed; one spec per batch of samples
      -> read_samples_batch  tasks               SAMPLES: key, shard, image bytes, targets (joined by key), error,
                                                 classes (--classes), references (--task caption)
      -> decode_batch        tasks, CPU          IMAGES: + image [3, S, S] (CLIP's eval transform), has_image
      -> Predict             actor pool, GPU/CPU PREDICTED: key, shard, targets, error, predictions, probabilities,
                                                 classes, references, caption
      -> Score               actor pool, CPU     SCORED: PREDICTIONS columns + every figure at every k
                                                 (+ closed-set columns with a class list)
      -> driver              predictions.parquet, report.parquet, report.png, gallery.html; closed_set.parquet,
                             confusion.parquet (--classes); captions.parquet, caption_report.parquet
                             (--task caption) (see jobs.evaluate)

Two tasks share the pipeline: ``labels`` (one-shot top-k labels, scored by R / P / F1,
and with a class list by closed-set accuracy, see ``pipeline.closed_set``) and
``caption`` (a generated caption, scored at the driver by CIDEr-D and BLEU against the
references, see ``pipeline.captions``: corpus-level metrics need every caption at once).

A shard is read in tasks of one predictor batch each (the driver indexes the tar's
headers first), so that one big validation shard is still read and decoded in parallel
and every stage streams batch by batch. The model loads once per ``Predict`` actor, the
embedding model(s) once per ``Score`` actor. Images stop at the predictor: what leaves
it is keys, labels and probabilities. One sampling pass serves every k: the predictor
takes the top-``max(ks)`` labels and the scorer cuts them for smaller k (so top-5 here
is the first 5 of the top-10, which can differ slightly from a top-5 sampling run, where
fewer first tokens are merged).

Every sample appears exactly once in the output:

- the read plan holds each sample of each tar once (members grouped by key, as
  webdataset does), plus each sample a damaged tar lost and each label-table key the tar
  does not hold, as ``unread`` rows: nothing is dropped without a trace;
- rows that cannot be scored carry the reason in ``error`` (see ``ERROR_CODES``), and are
  counted in the report instead of vanishing;
- the actor pools restart dead actors (up to ``max_retries`` times) and retry their batches
  on the restarted actor, however long a lost node's actors wait for room; a
  retried batch replaces its lost output, and the driver refuses to write a result
  holding a (shard, key) twice.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outputs, storage
from pipeline.shards import Shard, index_tar, label_table_path, read_label_table
from schemas import (
    CAPTION_REPORT,
    CAPTIONS,
    CONFUSION,
    PREDICTIONS,
    REPORT,
    closed_set_schema,
    per_k_columns,
    predictions_schema,
)

TASKS = ("labels", "caption")

# ----------------------------------------------------------------------------- row errors

NO_TARGETS = "no_targets"  # the label table lists no label for the sample: predicted, not scored
NO_LABEL_ROW = "no_label_row"  # the label table has no row for the sample: predicted, not scored
MISSING_IMAGE = "missing_image"  # the sample has no image member in the tar
DECODE_ERROR = "decode_error"  # the image bytes cannot be decoded
UNREAD = "unread"  # listed in the label table, but not found in (or not readable from) the tar
ERROR_CODES = (NO_TARGETS, NO_LABEL_ROW, MISSING_IMAGE, DECODE_ERROR, UNREAD)
IMAGE_ERRORS = (MISSING_IMAGE, DECODE_ERROR, UNREAD)  # no image reached the model: nothing predicted
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def error_code(error: str | None) -> str | None:
    """The code an ``error`` value starts with (``"decode_error: OSError: ..."`` -> ``"decode_error"``)."""
    return None if error is None else error.split(":", 1)[0]


# ----------------------------------------------------------------------------- stage schemas (not written)

SAMPLES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("image", pa.binary()),  # the encoded image member; null when missing
        pa.field("targets", pa.list_(pa.string()), nullable=False),
        pa.field("error", pa.string()),
        pa.field("classes", pa.list_(pa.string()), nullable=False),  # the sample's class(es) as its data writes them; [] without --classes
        pa.field("references", pa.list_(pa.string()), nullable=False),  # reference captions; [] without --task caption
    ]
)
PREDICTED = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("targets", pa.list_(pa.string()), nullable=False),
        pa.field("error", pa.string()),
        pa.field("predictions", pa.list_(pa.string()), nullable=False),  # most likely first; [] without an image or the labels task
        pa.field("probabilities", pa.list_(pa.float64()), nullable=False),
        pa.field("classes", pa.list_(pa.string()), nullable=False),
        pa.field("references", pa.list_(pa.string()), nullable=False),
        pa.field("caption", pa.string()),  # the generated caption; null without an image or the caption task
    ]
)
# the PREDICTIONS columns, plus every figure at every k (null on rows that are not scored):
# *_at hold len(embedders) * len(ks) values, embedder-major; exact_*_at hold len(ks) values
SCORE_LISTS = ("recall_at", "precision_at", "f1_at", "exact_recall_at", "exact_precision_at")
# closed-set columns (null without a class list, or where the sample has no image): see pipeline.closed_set
CLASS_COLUMNS = [
    pa.field("class_ids", pa.list_(pa.int64())),  # the sample's classes; null when it names none or an unknown one
    pa.field("class_error", pa.string()),  # why not (no_class / unknown_class)
    pa.field("label_class_ids", pa.list_(pa.int64())),  # the class of each predicted label
    pa.field("label_similarity", pa.list_(pa.float64())),  # 1.0 exact synonym, else cosine to the nearest synonym
    pa.field("ranked_class_ids", pa.list_(pa.int64())),  # classes at the largest k, best first (at most 5)
    pa.field("ranked_class_scores", pa.list_(pa.float64())),
    pa.field("top1_at", pa.list_(pa.float64())),  # per k: 1.0 / 0.0; null when the sample has no class
    pa.field("top5_at", pa.list_(pa.float64())),
    pa.field("top1_class_at", pa.list_(pa.int64())),  # per k: the best class, -1 when no label
]
SCORED = pa.schema(
    list(PREDICTIONS)
    + [pa.field(name, pa.list_(pa.float64())) for name in SCORE_LISTS]
    + [PREDICTED.field("classes"), PREDICTED.field("references"), PREDICTED.field("caption")]
    + CLASS_COLUMNS
)


# ----------------------------------------------------------------------------- inputs


def _read_parquet(path: str, columns: list[str]) -> pa.Table:
    fs, fs_path = storage.filesystem(path)
    return pq.read_table(fs_path, columns=columns, filesystem=fs)


def read_label_rows(path: str, columns: Sequence[str] = ()) -> dict[str, dict]:
    """key -> {"labels": [...], column: value, ...} of one shard's label table, with ``columns`` besides the labels."""
    names = list(dict.fromkeys(["key", "labels", *columns]))
    table = _read_parquet(path, names)
    keys = table.column("key").to_pylist()
    values = {name: table.column(name).to_pylist() for name in names[1:]}
    return {key: {name: values[name][i] for name in names[1:]} for i, key in enumerate(keys)}


def label_table_columns(path: str) -> list[str]:
    """The column names of a label table (its Parquet schema; no row is read)."""
    fs, fs_path = storage.filesystem(path)
    return pq.read_schema(fs_path, filesystem=fs).names


# ----------------------------------------------------------------------------- stage 1: read and join


def plan_reads(found: Sequence[Shard], labels: str, samples_per_task: int) -> list[dict]:
    """Read-task specs (rows for ``ray.data.from_items``) covering every sample of every shard once.

    ``found`` are shards with a label table each under ``labels`` (``find_shards(..., labels=)``).
    The samples are the tar's intact ones (``pipeline.shards``' rule; read in tasks of
    ``samples_per_task``, so that a shard is read and decoded in parallel), plus an
    ``unread`` entry for each label-table key the tar does not hold intact (a damaged or
    replaced tar): nothing is dropped without a row saying why.
    """
    specs = []
    for shard in found:
        index = index_tar(shard.tar)
        label_file = label_table_path(labels, shard.name)
        name = storage.basename(shard.tar)
        missing = f"not among the intact samples of {name}, which is damaged: {index.damage}" if index.damage else f"not in {name}"
        intact = set(index.keys)
        label_keys = read_label_table(label_file, ["key"]).column("key").to_pylist()
        unread = [key for key in label_keys if key not in intact]
        base = {"shard": shard.name, "tar": shard.tar, "labels": label_file}
        images = [(s.key, *(s.members[ext] if (ext := s.first(IMAGE_EXTENSIONS)) else (-1, 0)), *s.members.get("json", (-1, 0))) for s in index.samples]
        for start in range(0, len(images), samples_per_task):
            chunk = images[start : start + samples_per_task]
            specs.append({**base, "keys": [c[0] for c in chunk], "offsets": [c[1] for c in chunk], "sizes": [c[2] for c in chunk],
                          "json_offsets": [c[3] for c in chunk], "json_sizes": [c[4] for c in chunk],
                          "unread_keys": [], "unread_reasons": []})  # fmt: skip
        if unread:
            specs.append({**base, "keys": [], "offsets": [], "sizes": [], "json_offsets": [], "json_sizes": [],
                          "unread_keys": unread, "unread_reasons": [missing] * len(unread)})  # fmt: skip
    return specs


@functools.lru_cache(maxsize=16)
def _label_rows(path: str, version: str, columns: tuple[str, ...]) -> dict[str, dict]:
    return read_label_rows(path, columns)


def _version(path: str) -> str:
    """What changes when the file at ``path`` is rewritten: its modification time (and ETag on object storage)."""
    fs, p = storage.filesystem(path)
    info = fs.info(p)
    return f"{info.get('mtime') or info.get('LastModified')}:{info.get('ETag') or info.get('size')}"


def _sample_row(key: str, shard: str, image: bytes | None, labels: list[str] | None, label_file: str) -> dict:
    error = None
    if image is None:
        error = f"{MISSING_IMAGE}: no {'/'.join(IMAGE_EXTENSIONS)} member in the tar"
    elif labels is None:
        error = f"{NO_LABEL_ROW}: {label_file} has no row for this key"
    elif not any((label or "").strip() for label in labels):
        error = f"{NO_TARGETS}: the label table lists no label for this sample"
    return {"key": key, "shard": shard, "image": image, "targets": labels or [], "error": error}


def _json_field(data: bytes | None, name: str):
    """Field ``name`` of a sample's json member (None when the member, the field or valid JSON is missing)."""
    import json

    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    return meta.get(name) if isinstance(meta, dict) else None


def read_samples_batch(batch: pa.Table, class_source: str | None = None, class_field: str | None = None, references: bool = False) -> pa.Table:
    """Ray stage: read-task specs (``plan_reads``) -> SAMPLES rows.

    Each image is read at its offset in the tar; the targets are joined by key from the
    shard's label table (loaded once per worker process). With ``class_source`` each
    sample's class comes from the label table's column ``class_field`` (``"labels"``) or
    from the field ``class_field`` of its json member in the tar (``"json"``); with
    ``references`` its reference captions come from the label table's ``caption`` column.
    """
    from pipeline.captions import references_of
    from pipeline.closed_set import class_values

    columns = tuple(c for c in ((class_field if class_source == "labels" else None), ("caption" if references else None)) if c)

    def extra(row: dict, meta: bytes | None) -> dict:
        value = _json_field(meta, class_field) if class_source == "json" else row.get(class_field) if class_source else None
        return {"classes": class_values(value), "references": references_of(row.get("caption")) if references else []}

    rows = []
    for spec in batch.to_pylist():
        table = _label_rows(spec["labels"], _version(spec["labels"]), columns)

        with fsspec.open(spec["tar"], "rb") as f:
            json_offsets = spec.get("json_offsets") or [-1] * len(spec["keys"])
            json_sizes = spec.get("json_sizes") or [0] * len(spec["keys"])
            for key, offset, size, json_offset, json_size in zip(spec["keys"], spec["offsets"], spec["sizes"], json_offsets, json_sizes):
                image = meta = None
                if offset >= 0:
                    f.seek(offset)
                    image = f.read(size)
                if class_source == "json" and json_offset >= 0:
                    f.seek(json_offset)
                    meta = f.read(json_size)
                row = table.get(key)
                sample = _sample_row(key, spec["shard"], image, None if row is None else row["labels"], spec["labels"])
                rows.append({**sample, **extra(row or {}, meta)})
        for key, reason in zip(spec["unread_keys"], spec["unread_reasons"]):
            row = table.get(key) or {}
            rows.append({"key": key, "shard": spec["shard"], "image": None, "targets": row.get("labels") or [], "error": f"{UNREAD}: {reason}", **extra(row, None)})
    return pa.Table.from_pylist(rows, schema=SAMPLES)


# ----------------------------------------------------------------------------- stage 2: decode


@functools.lru_cache(maxsize=4)
def _eval_transform(image_size: int):
    from model.vision import preprocess

    return preprocess(image_size)


def decode_batch(batch: pa.Table, image_size: int) -> pa.Table:
    """Ray stage (CPU): SAMPLES -> IMAGES. Decodes and preprocesses; a failure becomes the row's error.

    The image column is a tensor column [3, S, S] float32 (zeros where there is no image).
    """
    from ray.data.extensions import ArrowTensorArray

    transform = _eval_transform(image_size)
    n = batch.num_rows
    images = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    has_image = np.zeros(n, dtype=bool)
    errors = batch.column("error").to_pylist()
    for i, data in enumerate(batch.column("image").to_pylist()):
        if data is None:
            continue
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                images[i] = transform(img.convert("RGB")).numpy()
            has_image[i] = True
        except Exception as err:  # noqa: BLE001 - any failure to decode one sample is that sample's error
            errors[i] = f"{DECODE_ERROR}: {type(err).__name__}: {err}"
    return pa.table(
        {
            "key": batch.column("key"),
            "shard": batch.column("shard"),
            "targets": batch.column("targets"),
            "error": pa.array(errors, pa.string()),
            "classes": batch.column("classes"),
            "references": batch.column("references"),
            "has_image": pa.array(has_image),
            "image": ArrowTensorArray.from_numpy(images),
        }
    )


# ----------------------------------------------------------------------------- stage 3: predict


def _strings(values) -> list:
    return [None if v is None else str(v) for v in values]


def _lists(values) -> list[list[str]]:
    """Lists of strings; a null list is empty and a null item is left out (never the text "None")."""
    return [[str(x) for x in v if x is not None] if v is not None else [] for v in values]


class Predict:
    """Ray stage (actor): IMAGES (numpy batch) -> PREDICTED. The model loads once, in ``__init__``.

    ``checkpoint`` is an exported model folder or a released NxTP ``.pth`` (with
    ``tokenizer``, ``clip_weights``, ``llama_params``, as ``model.checkpoint.load_model``
    takes them). ``precision`` as ``model.precision.resolve_dtype`` takes it (auto: bf16
    on CUDA, fp32 on the CPU); on the CPU ``threads`` intra-op threads. ``tasks``: ``labels`` (one-shot top-k) and/or ``caption`` (a caption
    by ``model.generate.generate`` with the keyword arguments ``caption``: max_length,
    beams, length_penalty).
    """

    def __init__(
        self,
        checkpoint: str,
        k: int,
        tokenizer: str | None = None,
        clip_weights: str | None = None,
        llama_params: str | None = None,
        max_steps: int | None = None,
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "auto",
        tasks: Sequence[str] = ("labels",),
        caption: Mapping | None = None,
    ):
        import torch

        from model.checkpoint import load_model
        from model.precision import place, resolve_dtype

        checkpoint = model_copy(checkpoint)
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(precision, self.device)
        model, self.tokenizer, _ = load_model(checkpoint, tokenizer, clip_weights, llama_params)
        self.model = place(model, self.device, self.dtype)
        self.k, self.max_steps = k, max_steps
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise ValueError(f"tasks must be among {TASKS}, not {list(tasks)}")
        self.tasks, self.caption = tuple(tasks), dict(caption or {})

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        import torch

        from model.generate import generate
        from model.sampling import one_shot

        n = len(batch["key"])
        predictions: list[list[str]] = [[] for _ in range(n)]
        probabilities: list[list[float]] = [[] for _ in range(n)]
        captions: list[str | None] = [None] * n
        rows = np.flatnonzero(np.asarray(batch["has_image"], dtype=bool))
        if rows.size:
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][rows])).to(self.device, self.dtype)
            with torch.inference_mode():
                if "labels" in self.tasks:
                    labels = one_shot(self.model, images, self.tokenizer, k=self.k, max_steps=self.max_steps)
                    for i, out in zip(rows.tolist(), labels):
                        predictions[i], probabilities[i] = out.labels, [float(p) for p in out.probs]
                if "caption" in self.tasks:
                    for i, out in zip(rows.tolist(), generate(self.model, images, self.tokenizer, **self.caption)):
                        captions[i] = out.text
        return pa.table(
            {
                "key": _strings(batch["key"]),
                "shard": _strings(batch["shard"]),
                "targets": _lists(batch["targets"]),
                "error": _strings(batch["error"]),
                "predictions": predictions,
                "probabilities": probabilities,
                "classes": _lists(batch["classes"]),
                "references": _lists(batch["references"]),
                "caption": captions,
            },
            schema=PREDICTED,
        )


# ----------------------------------------------------------------------------- stage 4: score


class Score:
    """Ray stage (actor): PREDICTED -> SCORED. The embedding model(s) load once, in ``__init__``.

    The sentence model (``embedding_model``; default all-MiniLM-L6-v2, the paper's) always,
    CLIP's text tower too when ``clip_text_weights`` is given. With ``classes`` (a
    ``pipeline.closed_set.ClassList``) it also maps each sample's labels to the classes
    (nearest by the sentence model) and scores top-1 / top-5 at each k. Without the labels
    task (``score_labels=False``) rows pass through unscored and no model loads.
    ``protocol``: how the top-k is scored (``pipeline.scoring``; "reference" keeps blank and
    repeated predictions).
    """

    def __init__(
        self,
        ks: Sequence[int],
        embedding_model: str | None = None,
        clip_text_weights: str | None = None,
        clip_text_quick_gelu: bool = True,
        threads: int | None = None,
        score_labels: bool = True,
        classes=None,
        protocol: str = "nxtp",
    ):
        import torch

        from pipeline.closed_set import ClassMapper
        from pipeline.scoring import ClipTextEmbedder, LabelScorer, SentenceEmbedder

        if threads:
            torch.set_num_threads(threads)
        self.ks = sorted(set(ks))
        self.protocol = protocol
        self.scorer = self.mapper = None
        if score_labels:
            embedders = [SentenceEmbedder(embedding_model)]
            if clip_text_weights:
                embedders.append(ClipTextEmbedder(clip_text_weights, quick_gelu=clip_text_quick_gelu))
            self.scorer = LabelScorer(embedders, ks, protocol)
            if classes is not None:
                self.mapper = ClassMapper(classes, self.scorer.embedders[0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        scored = [i for i in range(n) if errors[i] is None] if self.scorer else []
        columns: dict[str, list] = {name: [None] * n for name in SCORE_LISTS + tuple(f.name for f in CLASS_COLUMNS)}
        if self.mapper is not None:
            self._classify(batch, errors, columns)
        if scored:
            targets = batch.column("targets").to_pylist()
            predictions = batch.column("predictions").to_pylist()
            s = self.scorer([targets[i] for i in scored], [predictions[i] for i in scored])
            names = self.scorer.names
            recall = np.concatenate([s.recall[e] for e in names], axis=1)  # [scored, E * K]
            precision = np.concatenate([s.precision[e] for e in names], axis=1)
            f1 = np.concatenate([s.f1[e] for e in names], axis=1)
            for row, i in enumerate(scored):
                columns["recall_at"][i] = recall[row].tolist()
                columns["precision_at"][i] = precision[row].tolist()
                columns["f1_at"][i] = f1[row].tolist()
                columns["exact_recall_at"][i] = s.exact_recall[row].tolist()
                columns["exact_precision_at"][i] = s.exact_precision[row].tolist()
        names = ("key", "shard", "targets", "predictions", "probabilities", "error", "classes", "references", "caption")
        table = {name: batch.column(name) for name in names}
        return pa.table({**table, **columns}).select(SCORED.names).cast(SCORED)

    def _classify(self, batch: pa.Table, errors: list, columns: dict[str, list]) -> None:
        """The closed-set columns of every row whose image was read (see ``pipeline.closed_set``)."""
        from pipeline.closed_set import resolve_targets, score_sample

        classes = self.mapper.classes
        values = batch.column("classes").to_pylist()
        predictions = batch.column("predictions").to_pylist()
        probabilities = batch.column("probabilities").to_pylist()
        for i, error in enumerate(errors):
            if error_code(error) in IMAGE_ERRORS:
                continue
            targets, columns["class_error"][i] = resolve_targets(values[i], classes)
            got = score_sample(self.mapper, predictions[i], probabilities[i], targets or [], self.ks, self.protocol)
            columns["class_ids"][i] = targets
            columns["label_class_ids"][i], columns["label_similarity"][i] = got.label_classes, got.label_similarity
            columns["ranked_class_ids"][i], columns["ranked_class_scores"][i] = got.ranked, got.ranked_scores
            if targets is not None:
                columns["top1_at"][i], columns["top5_at"][i], columns["top1_class_at"][i] = got.top1, got.top5, got.top1_class


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class StagePlan:
    """Batch sizes, pool sizes and resources of the stages."""

    batch_size: int = 32  # images per predictor call
    concurrency: int = 1  # predictor actors
    predictor_gpus: float = 0.0  # per predictor actor (1 on a GPU cluster)
    predictor_cpus: float = 1.0  # per predictor actor
    threads: int = 1  # torch threads of a CPU predictor actor
    scorer_cpus: float = 0.5
    read_cpus: float = 0.25
    decode_cpus: float = 0.5
    max_retries: int = 3  # restarts of a dead actor (the batch it held waits for the restart)
    worker_env: dict[str, str] = field(default_factory=dict)  # environment of the actor stages

    def cpus_needed(self) -> float:
        """CPUs that must be free at once: every predictor, one scorer (up to ``concurrency`` when free), one decode task."""
        return self.concurrency * self.predictor_cpus + self.scorer_cpus + self.decode_cpus


@dataclass
class EvaluationRun:
    table: pa.Table  # SCORED, sorted by (shard, key)
    seconds: float  # from the pipeline's start to its last row
    first_rows_s: float  # from the pipeline's start to the first scored rows at the driver
    arrivals: list[tuple[float, int]]  # (seconds since the start, rows scored so far), one per batch at the driver

    @property
    def steady_images_per_s(self) -> float:
        return steady_rate(self.arrivals)


def steady_rate(arrivals: Sequence[tuple[float, int]], window: tuple[float, float] = (0.2, 0.9)) -> float:
    """The pipeline's pace: rows per second, the least-squares slope of rows over time within ``window``.

    Only arrivals that bring the count within the window's fractions of all rows are
    fitted: past actor startup and the catch-up of the batches that queued while the
    slowest stage was starting, before the final drain. NaN with fewer than 3 such points.
    """
    total = arrivals[-1][1] if arrivals else 0
    points = np.asarray([(t, n) for t, n in arrivals if window[0] * total <= n <= window[1] * total], dtype=np.float64)
    if len(points) < 3 or np.ptp(points[:, 0]) <= 0:
        return float("nan")
    return float(np.polyfit(points[:, 0], points[:, 1], 1)[0])


def build_dataset(reads: Sequence[dict], *, image_size: int, predictor: Mapping, scorer: Mapping, plan: StagePlan,
                  predictor_cls: type | None = None, read: Mapping | None = None):  # fmt: skip
    """The lazy Ray Dataset of SCORED rows (read -> decode -> Predict -> Score) for ``plan_reads`` specs.

    ``predictor_cls``: the predictor stage's class (default :class:`Predict`; a subclass may add behaviour).
    ``read``: keyword arguments of :func:`read_samples_batch` (class_source, class_field, references).
    """
    import ray.data

    # restarts bounded (an actor that keeps dying ends the job); a batch waits for its actor's restart however
    # long that takes: a lost node's actors restart only once the cluster has room, and each try meanwhile counts
    actor_args = {"max_restarts": plan.max_retries, "max_task_retries": -1}
    if plan.worker_env:
        actor_args["runtime_env"] = {"env_vars": dict(plan.worker_env)}
    return (
        ray.data.from_items(list(reads), override_num_blocks=max(1, len(reads)))
        .map_batches(read_samples_batch, fn_kwargs=dict(read or {}), batch_size=1, batch_format="pyarrow", num_cpus=plan.read_cpus)
        .map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=plan.batch_size, batch_format="pyarrow", num_cpus=plan.decode_cpus)
        .map_batches(
            predictor_cls or Predict,
            fn_constructor_kwargs=dict(predictor),
            compute=ray.data.ActorPoolStrategy(size=plan.concurrency),
            batch_size=plan.batch_size,
            batch_format="numpy",
            num_cpus=plan.predictor_cpus,
            num_gpus=plan.predictor_gpus or None,
            **actor_args,
        )
        .map_batches(
            Score,
            fn_constructor_kwargs=dict(scorer),
            # scoring is cheap once a label's embedding is cached; more scorers only while a new vocabulary streams in
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.concurrency),
            batch_size=plan.batch_size,
            batch_format="pyarrow",
            num_cpus=plan.scorer_cpus,
            **actor_args,
        )
    )


def run_evaluation(
    reads: Sequence[dict],
    *,
    image_size: int,
    predictor: Mapping,
    scorer: Mapping,
    plan: StagePlan,
    log: Callable[[str], None] | None = None,
    progress_every_s: float = 30.0,
    predictor_cls: type | None = None,
    read: Mapping | None = None,
) -> EvaluationRun:
    """Run the pipeline on the Ray instance the caller initialized; the SCORED rows of every sample.

    ``reads`` come from :func:`plan_reads` (with ``samples_per_task`` = the batch size).

    ``predictor`` / ``scorer`` / ``read`` are the keyword arguments of :class:`Predict` (or
    ``predictor_cls``) / :class:`Score` / :func:`read_samples_batch`. Raises ``RuntimeError``
    when a (shard, key) came back twice.
    """
    log = log or (lambda message: None)
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as extra remote args, which it flags as deprecated
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = build_dataset(reads, image_size=image_size, predictor=predictor, scorer=scorer, plan=plan, predictor_cls=predictor_cls, read=read)
    parts: list[pa.Table] = []
    arrivals: list[tuple[float, int]] = []
    rows = 0
    start = last_log = time.perf_counter()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        now = time.perf_counter()
        parts.append(batch)
        rows += batch.num_rows
        arrivals.append((now - start, rows))
        if len(arrivals) == 1:
            log(f"first {batch.num_rows} sample(s) scored after {now - start:.1f} s (startup)")
        elif now - last_log >= progress_every_s:
            last_log = now
            log(f"{rows} sample(s) scored, {rows / (now - start):.1f} images/s")
    end = time.perf_counter()
    table = pa.concat_tables([p.cast(SCORED) for p in parts]) if parts else SCORED.empty_table()
    check_exactly_once(table)
    return EvaluationRun(
        table=table.sort_by([("shard", "ascending"), ("key", "ascending")]),
        seconds=end - start,
        first_rows_s=arrivals[0][0] if arrivals else end - start,
        arrivals=arrivals,
    )


def check_exactly_once(table: pa.Table) -> None:
    """Raise ``RuntimeError`` naming a (shard, key) that occurs more than once."""
    counts = table.group_by(["shard", "key"]).aggregate([("key", "count")])
    dup = counts.filter(pc.greater(counts.column("key_count"), 1))
    if dup.num_rows:
        row = dup.slice(0, 1).to_pylist()[0]
        raise RuntimeError(f"{dup.num_rows} sample(s) came back more than once, e.g. shard {row['shard']} key {row['key']}")


# ----------------------------------------------------------------------------- outputs


def predictions_table(scored: pa.Table, ks: Sequence[int]) -> pa.Table:
    """PREDICTIONS rows with a column per (metric, k): the first embedding model's R / P / F1 and the exact figures."""
    ks = sorted(set(ks))
    columns = {name: scored.column(name) for name in PREDICTIONS.names}
    lists = {metric: scored.column(f"{metric}_at").to_pylist() for metric in ("recall", "precision", "f1", "exact_recall", "exact_precision")}
    for j, k in enumerate(ks):
        for metric, values in lists.items():
            columns[f"{metric}_at_{k}"] = pa.array([None if v is None else v[j] for v in values], pa.float64())
    assert list(columns) == PREDICTIONS.names + per_k_columns(ks)
    return pa.table(columns, schema=predictions_schema(ks))


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which model a report is about: as given, the sha256 of its weight file(s), its training step (or None)."""

    checkpoint: str
    sha256: str
    step: int | None


def build_report(
    scored: pa.Table,
    *,
    dataset: str,
    ks: Sequence[int],
    embedders: Sequence[str],
    checkpoint: CheckpointIdentity,
    code_version: str,
    wall_time_s: float,
    images_per_s: float,
    classified: bool = False,
) -> pa.Table:
    """REPORT rows, one per (k, embedder): means over the scored samples, counts of the others.

    The figures are null when no sample could be scored. With ``classified`` (a class list
    was given) the closed-set accuracy at each k too: means over the samples with an image
    and a known class (null when there is none).
    """
    ks = sorted(set(ks))
    codes = [error_code(e) for e in scored.column("error").to_pylist()]
    no_targets = sum(c in (NO_TARGETS, NO_LABEL_ROW) for c in codes)
    failed = sum(c is not None for c in codes) - no_targets
    ok = [i for i, c in enumerate(codes) if c is None]

    def matrix(name: str) -> np.ndarray:
        values = scored.column(name).to_pylist()
        width = len(values[ok[0]]) if ok else len(embedders) * len(ks)
        return np.array([values[i] for i in ok], dtype=np.float64).reshape(len(ok), width)

    def mean(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    recall, precision, f1 = matrix("recall_at"), matrix("precision_at"), matrix("f1_at")
    exact_recall, exact_precision = matrix("exact_recall_at"), matrix("exact_precision_at")
    top1 = [v for v in scored.column("top1_at").to_pylist() if v is not None] if "top1_at" in scored.column_names else []
    top5 = [v for v in scored.column("top5_at").to_pylist() if v is not None] if "top5_at" in scored.column_names else []
    top1, top5 = np.array(top1, dtype=np.float64).reshape(-1, len(ks)), np.array(top5, dtype=np.float64).reshape(-1, len(ks))
    classified = classified and len(top1) > 0
    rows = []
    for e, name in enumerate(embedders):
        for j, k in enumerate(ks):
            col = e * len(ks) + j
            rows.append(
                {
                    "dataset": dataset,
                    "k": k,
                    "embedding": name,
                    "samples": len(ok),
                    "failed": failed,
                    "no_targets": no_targets,
                    "recall": mean(recall[:, col]) if ok else None,
                    "precision": mean(precision[:, col]) if ok else None,
                    "f1": mean(f1[:, col]) if ok else None,
                    "exact_recall": mean(exact_recall[:, j]) if ok else None,
                    "exact_precision": mean(exact_precision[:, j]) if ok else None,
                    "top1_accuracy": mean(top1[:, j]) if classified else None,
                    "top5_accuracy": mean(top5[:, j]) if classified else None,
                    "classified": len(top1) if classified else None,
                    **run_columns(checkpoint, code_version, wall_time_s, images_per_s),
                }
            )
    return pa.Table.from_pylist(rows, schema=REPORT)


def run_columns(checkpoint: CheckpointIdentity, code_version: str, wall_time_s: float, images_per_s: float) -> dict:
    """The columns every report row shares: which model and code, how long, how fast."""
    return {
        "checkpoint": checkpoint.checkpoint,
        "checkpoint_sha256": checkpoint.sha256,
        "step": checkpoint.step,
        "code_version": code_version,
        "wall_time_s": float(wall_time_s),
        "images_per_s": float(images_per_s),
    }


def closed_set_table(scored: pa.Table, classes, ks: Sequence[int]) -> pa.Table:
    """CLOSED_SET rows (closed_set_schema(ks)), one per sample, from SCORED rows and the ``ClassList``."""
    ks = sorted(set(ks))
    names = classes.names

    def named(ids):
        return None if ids is None else [names[i] if i >= 0 else None for i in ids]  # -1: a blank label, no class

    rows = []
    for r in scored.select(["key", "shard", "error", "classes", *(f.name for f in CLASS_COLUMNS)]).to_pylist():
        image_error = r["error"] if error_code(r["error"]) in IMAGE_ERRORS else None
        row = {
            "key": r["key"],
            "shard": r["shard"],
            "classes": r["classes"],
            "class_ids": r["class_ids"],
            "class_names": named(r["class_ids"]),
            "predicted_class_ids": r["ranked_class_ids"],
            "predicted_classes": named(r["ranked_class_ids"]),
            "class_scores": r["ranked_class_scores"],
            "label_classes": named(r["label_class_ids"]),
            "label_similarity": r["label_similarity"],
            "error": image_error or r["class_error"],
        }
        for j, k in enumerate(ks):
            row[f"top1_correct_at_{k}"] = None if r["top1_at"] is None else r["top1_at"][j]
            row[f"top5_correct_at_{k}"] = None if r["top5_at"] is None else r["top5_at"][j]
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=closed_set_schema(ks))


def confusion_table(scored: pa.Table, classes, ks: Sequence[int]) -> pa.Table:
    """CONFUSION rows: for each k, every (true class, wrong top-1 class) pair, most frequent first."""
    from pipeline.closed_set import confusion_pairs

    ks = sorted(set(ks))
    rows_in = [r for r in scored.select(["class_ids", "top1_class_at"]).to_pylist() if r["top1_class_at"] is not None]
    per_class: dict[int, int] = {}
    for r in rows_in:
        for c in r["class_ids"]:
            per_class[c] = per_class.get(c, 0) + 1
    rows = []
    for j, k in enumerate(ks):
        pairs = confusion_pairs([r["class_ids"] for r in rows_in], [r["top1_class_at"][j] for r in rows_in])
        for (t, p), count in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append({"k": k, "true_class_id": t, "true_class": classes.names[t], "predicted_class_id": p,
                         "predicted_class": classes.names[p], "count": count, "share": count / per_class[t]})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CONFUSION)


def format_confusion(confusion: pa.Table, top: int, classified: int) -> str:
    """The ``top`` most confused pairs at the largest k, as text (``classified``: samples with a class)."""
    rows = confusion.to_pylist()
    if not classified:
        return "no confused pair: no sample has a class of the list"
    if not rows:
        return "no confused pair: every top-1 class was right"
    k = max(r["k"] for r in rows)
    rows = [r for r in rows if r["k"] == k][: max(top, 0)]
    if not rows:
        return ""
    width = max(len(r["true_class"]) for r in rows)
    lines = [f"most confused classes at k={k} (true -> predicted top-1: samples, share of the true class)"]
    lines += [f"  {r['true_class']:<{width}} -> {r['predicted_class']}: {r['count']} ({r['share']:.0%})" for r in rows]
    return "\n".join(lines)


def caption_tables(scored: pa.Table, *, dataset: str, search: Mapping, checkpoint: CheckpointIdentity, code_version: str,
                   wall_time_s: float, images_per_s: float) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """(CAPTIONS rows, CAPTION_REPORT row): CIDEr-D and BLEU of the generated captions (``pipeline.captions``).

    ``search``: max_length, beams, length_penalty, as the captions were generated.
    """
    from pipeline.captions import NO_REFERENCES, score_captions

    rows = scored.select(["key", "shard", "error", "caption", "references"]).to_pylist()
    for r in rows:
        r["error"] = r["error"] if error_code(r["error"]) in IMAGE_ERRORS else None
        if r["error"] is None and r["caption"] is None:
            r["error"] = f"{MISSING_IMAGE}: no caption was generated"
        if r["error"] is None and not r["references"]:
            r["error"] = f"{NO_REFERENCES}: the label table holds no caption for this sample"
        r["cider"] = r["bleu4"] = None
    ok = [r for r in rows if r["error"] is None]
    figures = {"cider": None, "bleu1": None, "bleu2": None, "bleu3": None, "bleu4": None}
    if ok:
        result = score_captions([r["caption"] for r in ok], [r["references"] for r in ok])
        for r, cider, bleu4 in zip(ok, result.sample_cider.tolist(), result.sample_bleu4.tolist()):
            r["cider"], r["bleu4"] = cider, bleu4
        figures = {"cider": result.cider, **{f"bleu{n + 1}": b for n, b in enumerate(result.bleu)}}
    codes = [error_code(r["error"]) for r in rows]
    report = {
        "dataset": dataset,
        "samples": len(ok),
        "failed": sum(c in IMAGE_ERRORS for c in codes),
        "no_references": sum(c == NO_REFERENCES for c in codes),
        **figures,
        "search": "greedy" if search["beams"] == 1 else "beam",
        "beams": search["beams"],
        "max_length": search["max_length"],
        "length_penalty": float(search["length_penalty"]),
        **run_columns(checkpoint, code_version, wall_time_s, images_per_s),
    }
    return pa.Table.from_pylist(rows, schema=CAPTIONS), pa.Table.from_pylist([report], schema=CAPTION_REPORT)


def format_caption_report(report: pa.Table) -> str:
    header = f"{'dataset':<14} {'search':<10} {'samples':>8} {'failed':>7} {'no ref':>7} {'CIDEr-D':>8} {'BLEU-1':>7} {'BLEU-4':>7}"
    lines = [header, "-" * len(header)]
    for r in report.to_pylist():
        search = r["search"] if r["beams"] == 1 else f"beam {r['beams']}"
        lines.append(f"{r['dataset'][:14]:<14} {search:<10} {r['samples']:>8} {r['failed']:>7} {r['no_references']:>7} "
                     f"{_figure(r['cider'], 8)} {_figure(r['bleu1'], 7)} {_figure(r['bleu4'], 7)}")  # fmt: skip
    return "\n".join(lines)


def _figure(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def format_report(report: pa.Table) -> str:
    """The report as a fixed-width text table (``-`` where nothing was scored)."""
    rows = report.to_pylist()
    closed = any(r.get("classified") is not None for r in rows)
    header = f"{'dataset':<14} {'k':>4} {'embedding':<22} {'samples':>8} {'failed':>7} {'no tgt':>7} {'R':>7} {'P':>7} {'F1':>7} {'exact R':>8} {'exact P':>8}"
    header += f" {'top-1':>7} {'top-5':>7}" if closed else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        figures = " ".join(_figure(r[m], 7) for m in ("recall", "precision", "f1")) + " " + " ".join(_figure(r[m], 8) for m in ("exact_recall", "exact_precision"))
        figures += " " + " ".join(_figure(r[m], 7) for m in ("top1_accuracy", "top5_accuracy")) if closed else ""
        lines.append(f"{r['dataset'][:14]:<14} {r['k']:>4} {r['embedding'][:22]:<22} {r['samples']:>8} {r['failed']:>7} {r['no_targets']:>7} {figures}")
    return "\n".join(lines)


def plot_report(report: pa.Table, path: str) -> None:
    """A bar chart of R / P / F1 per (dataset, k), one panel per embedding model; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.to_pylist()
    embeddings = list(dict.fromkeys(r["embedding"] for r in rows))
    fig, axes = plt.subplots(1, len(embeddings), figsize=(max(6.0, 2.2 * len(rows) / len(embeddings) + 3) * len(embeddings), 4.6), squeeze=False)
    metrics = (("recall", "R", "#1f77b4"), ("precision", "P", "#ff7f0e"), ("f1", "F1", "#2ca02c"))
    for ax, embedding in zip(axes[0], embeddings):
        group = [r for r in rows if r["embedding"] == embedding]
        x = np.arange(len(group))
        width = 0.26
        for m, (name, label, colour) in enumerate(metrics):
            values = [r[name] for r in group]
            bars = ax.bar(x + (m - 1) * width, [v or 0.0 for v in values], width, label=label, color=colour)
            ax.bar_label(bars, labels=["-" if v is None else f"{v:.3f}" for v in values], fontsize=8, padding=2)
        ax.set_xticks(x, [f"{r['dataset']}\ntop-{r['k']}" for r in group])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score")
        ax.set_title(f"semantic R / P / F1 ({embedding})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    if rows:
        r0 = rows[0]
        fig.suptitle(f"{os.path.basename(r0['checkpoint'].rstrip('/'))}: {r0['samples']} scored, {r0['failed']} failed, {r0['no_targets']} without targets", fontsize=10)
    fig.tight_layout()
    with outputs.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- provenance




def checkpoint_identity(path: str, name: str | None = None) -> CheckpointIdentity:
    """The checkpoint (``name`` as the user gave it, e.g. a hub id; default ``path``), the sha256 of
    its weights at ``path``, and the step an exported folder records.

    An export's digest covers its weight files in a fixed order (``model.export.weight_files``),
    each with its name; a single file's is the file's own.
    """
    from model.export import read_config, weight_files

    digest = hashlib.sha256()
    step = None
    if os.path.isdir(path):
        files = weight_files(path)
        step = read_config(path)[1].get("step")
        for file in files:
            digest.update(os.path.relpath(file, path).encode() + b"\0")
    else:
        files = [path]
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return CheckpointIdentity(name or path, digest.hexdigest(), step if isinstance(step, int) else None)


CODE_DIRS = ("model", "pipeline", "jobs", "schemas")


def code_version(repo_root: str) -> str:
    """``git:<commit>`` (``+dirty`` when tracked code differs), else ``source:<sha256 of the code>``.

    ``ray job submit`` packs the working dir without its ``.git``, so on a cluster the
    second form names the exact code that ran.
    """
    try:
        commit = subprocess.run(["git", "-C", repo_root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", repo_root, "status", "--porcelain", "--untracked-files=no", "--", *CODE_DIRS], capture_output=True, text=True, timeout=10)
            return f"git:{commit.stdout.strip()}" + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted(glob.glob(os.path.join(repo_root, folder, "**", "*.py"), recursive=True)):
            digest.update(os.path.relpath(path, repo_root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return f"source:{digest.hexdigest()[:12]}"


# ----------------------------------------------------------------------------- atomic output folder

OUTPUT_FILES = ("predictions.parquet", "report.parquet")  # the labels task's
CAPTION_OUTPUT_FILES = ("captions.parquet", "caption_report.parquet")  # the caption task's


def is_evaluation_output(path: str) -> bool:
    return any(all(storage.isfile(storage.join(path, name)) for name in files) for files in (OUTPUT_FILES, CAPTION_OUTPUT_FILES))


def model_copy(checkpoint: str) -> str:
    """``checkpoint`` itself when local; for an exported model at a URL (``jobs.train --export-to``) a local
    copy, fetched once per node into the temporary folder."""
    import tempfile

    return outputs.local_copy(checkpoint, os.path.join(tempfile.gettempdir(), "nxtp-models"), "exported model")


def check_replaceable(output: str) -> None:
    """Raise ``FileExistsError`` unless ``output`` is absent, empty, or a previous evaluation output."""
    outputs.check_replaceable(
        output, is_evaluation_output, f"is not an evaluation output (no {' and '.join(OUTPUT_FILES)}, nor {' and '.join(CAPTION_OUTPUT_FILES)})"
    )


def staged_output(output: str):
    """The evaluation's output folder, written whole or not at all (``pipeline.outputs.staged_output``)."""
    return outputs.staged_output(output, check_replaceable)
