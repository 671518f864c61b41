"""Evaluation on Ray Data: one-shot top-k labels of validation shards, scored against their label tables.

    driver: plan_reads                           tar headers indexed; one spec per batch of samples
      -> read_samples_batch  tasks               SAMPLES: key, shard, image bytes, targets (joined by key), error
      -> decode_batch        tasks, CPU          IMAGES: + image [3, S, S] (CLIP's eval transform), has_image
      -> Predict             actor pool, GPU/CPU PREDICTED: key, shard, targets, error, predictions, probabilities
      -> Score               actor pool, CPU     SCORED: PREDICTIONS columns + every figure at every k
      -> driver              predictions.parquet, report.parquet, report.png (see jobs.evaluate)

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

from pipeline import outputs
from pipeline.shards import Shard, index_tar, label_table_path
from schemas import PREDICTIONS, REPORT, per_k_columns, predictions_schema

# ----------------------------------------------------------------------------- row errors

NO_TARGETS = "no_targets"  # the label table lists no label for the sample: predicted, not scored
NO_LABEL_ROW = "no_label_row"  # the label table has no row for the sample: predicted, not scored
MISSING_IMAGE = "missing_image"  # the sample has no image member in the tar
DECODE_ERROR = "decode_error"  # the image bytes cannot be decoded
UNREAD = "unread"  # listed in the label table, but not found in (or not readable from) the tar
ERROR_CODES = (NO_TARGETS, NO_LABEL_ROW, MISSING_IMAGE, DECODE_ERROR, UNREAD)
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
    ]
)
PREDICTED = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("targets", pa.list_(pa.string()), nullable=False),
        pa.field("error", pa.string()),
        pa.field("predictions", pa.list_(pa.string()), nullable=False),  # most likely first; [] without an image
        pa.field("probabilities", pa.list_(pa.float64()), nullable=False),
    ]
)
# the PREDICTIONS columns, plus every figure at every k (null on rows that are not scored):
# *_at hold len(embedders) * len(ks) values, embedder-major; exact_*_at hold len(ks) values
SCORE_LISTS = ("recall_at", "precision_at", "f1_at", "exact_recall_at", "exact_precision_at")
SCORED = pa.schema(list(PREDICTIONS) + [pa.field(name, pa.list_(pa.float64())) for name in SCORE_LISTS])


# ----------------------------------------------------------------------------- inputs


def read_label_table(path: str) -> dict[str, list[str]]:
    """key -> target labels of one shard's label table."""
    table = pq.read_table(path, columns=["key", "labels"])
    return dict(zip(table.column("key").to_pylist(), table.column("labels").to_pylist()))


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
        name = os.path.basename(shard.tar)
        missing = f"not among the intact samples of {name}, which is damaged: {index.damage}" if index.damage else f"not in {name}"
        intact = set(index.keys)
        label_keys = pq.read_table(label_file, columns=["key"]).column("key").to_pylist()
        unread = [key for key in label_keys if key not in intact]
        base = {"shard": shard.name, "tar": shard.tar, "labels": label_file}
        images = [(s.key, *(s.members[ext] if (ext := s.first(IMAGE_EXTENSIONS)) else (-1, 0))) for s in index.samples]
        for start in range(0, len(images), samples_per_task):
            chunk = images[start : start + samples_per_task]
            specs.append({**base, "keys": [c[0] for c in chunk], "offsets": [c[1] for c in chunk], "sizes": [c[2] for c in chunk],
                          "unread_keys": [], "unread_reasons": []})  # fmt: skip
        if unread:
            specs.append({**base, "keys": [], "offsets": [], "sizes": [], "unread_keys": unread, "unread_reasons": [missing] * len(unread)})
    return specs


@functools.lru_cache(maxsize=16)
def _label_table(path: str, mtime_ns: int) -> dict[str, list[str]]:
    return read_label_table(path)


def _sample_row(key: str, shard: str, image: bytes | None, labels: list[str] | None, label_file: str) -> dict:
    error = None
    if image is None:
        error = f"{MISSING_IMAGE}: no {'/'.join(IMAGE_EXTENSIONS)} member in the tar"
    elif labels is None:
        error = f"{NO_LABEL_ROW}: {label_file} has no row for this key"
    elif not any(label.strip() for label in labels):
        error = f"{NO_TARGETS}: the label table lists no label for this sample"
    return {"key": key, "shard": shard, "image": image, "targets": labels or [], "error": error}


def read_samples_batch(batch: pa.Table) -> pa.Table:
    """Ray stage: read-task specs (``plan_reads``) -> SAMPLES rows.

    Each image is read at its offset in the tar; the targets are joined by key from the
    shard's label table (loaded once per worker process).
    """
    rows = []
    for spec in batch.to_pylist():
        targets = _label_table(spec["labels"], os.stat(spec["labels"]).st_mtime_ns)
        with fsspec.open(spec["tar"], "rb") as f:
            for key, offset, size in zip(spec["keys"], spec["offsets"], spec["sizes"]):
                image = None
                if offset >= 0:
                    f.seek(offset)
                    image = f.read(size)
                rows.append(_sample_row(key, spec["shard"], image, targets.get(key), spec["labels"]))
        for key, reason in zip(spec["unread_keys"], spec["unread_reasons"]):
            rows.append({"key": key, "shard": spec["shard"], "image": None, "targets": targets.get(key) or [], "error": f"{UNREAD}: {reason}"})
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
            "has_image": pa.array(has_image),
            "image": ArrowTensorArray.from_numpy(images),
        }
    )


# ----------------------------------------------------------------------------- stage 3: predict


def _strings(values) -> list:
    return [None if v is None else str(v) for v in values]


def _lists(values) -> list[list[str]]:
    return [[str(x) for x in v] if v is not None else [] for v in values]


class Predict:
    """Ray stage (actor): IMAGES (numpy batch) -> PREDICTED. The model loads once, in ``__init__``.

    ``checkpoint`` is an exported model folder or a released NxTP ``.pth`` (with
    ``tokenizer``, ``clip_weights``, ``llama_params``, as ``model.checkpoint.load_model``
    takes them). On CUDA the model runs in bf16, on the CPU in fp32 with ``threads``
    intra-op threads.
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
    ):
        import torch

        from model.checkpoint import load_model

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model, self.tokenizer, _ = load_model(checkpoint, tokenizer, clip_weights, llama_params)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.k, self.max_steps = k, max_steps

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        import torch

        from model.sampling import one_shot

        n = len(batch["key"])
        predictions: list[list[str]] = [[] for _ in range(n)]
        probabilities: list[list[float]] = [[] for _ in range(n)]
        rows = np.flatnonzero(np.asarray(batch["has_image"], dtype=bool))
        if rows.size:
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][rows])).to(self.device, self.dtype)
            with torch.inference_mode():
                labels = one_shot(self.model, images, self.tokenizer, k=self.k, max_steps=self.max_steps)
            for i, out in zip(rows.tolist(), labels):
                predictions[i], probabilities[i] = out.labels, [float(p) for p in out.probs]
        return pa.table(
            {
                "key": _strings(batch["key"]),
                "shard": _strings(batch["shard"]),
                "targets": _lists(batch["targets"]),
                "error": _strings(batch["error"]),
                "predictions": predictions,
                "probabilities": probabilities,
            },
            schema=PREDICTED,
        )


# ----------------------------------------------------------------------------- stage 4: score


class Score:
    """Ray stage (actor): PREDICTED -> SCORED. The embedding model(s) load once, in ``__init__``.

    The sentence model (``embedding_model``; default all-MiniLM-L6-v2, the paper's) always,
    CLIP's text tower too when ``clip_text_weights`` is given.
    """

    def __init__(
        self,
        ks: Sequence[int],
        embedding_model: str | None = None,
        clip_text_weights: str | None = None,
        clip_text_quick_gelu: bool = True,
        threads: int | None = None,
    ):
        import torch

        from pipeline.scoring import ClipTextEmbedder, LabelScorer, SentenceEmbedder

        if threads:
            torch.set_num_threads(threads)
        embedders = [SentenceEmbedder(embedding_model)]
        if clip_text_weights:
            embedders.append(ClipTextEmbedder(clip_text_weights, quick_gelu=clip_text_quick_gelu))
        self.scorer = LabelScorer(embedders, ks)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        scored = [i for i in range(n) if errors[i] is None]
        columns: dict[str, list] = {name: [None] * n for name in SCORE_LISTS}
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
        table = {name: batch.column(name) for name in ("key", "shard", "targets", "predictions", "probabilities", "error")}
        return pa.table({**table, **columns}).select(SCORED.names).cast(SCORED)


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


def build_dataset(reads: Sequence[dict], *, image_size: int, predictor: Mapping, scorer: Mapping, plan: StagePlan, predictor_cls: type | None = None):
    """The lazy Ray Dataset of SCORED rows (read -> decode -> Predict -> Score) for ``plan_reads`` specs.

    ``predictor_cls``: the predictor stage's class (default :class:`Predict`; a subclass may add behaviour).
    """
    import ray.data

    # restarts bounded (an actor that keeps dying ends the job); a batch waits for its actor's restart however
    # long that takes: a lost node's actors restart only once the cluster has room, and each try meanwhile counts
    actor_args = {"max_restarts": plan.max_retries, "max_task_retries": -1}
    if plan.worker_env:
        actor_args["runtime_env"] = {"env_vars": dict(plan.worker_env)}
    return (
        ray.data.from_items(list(reads), override_num_blocks=max(1, len(reads)))
        .map_batches(read_samples_batch, batch_size=1, batch_format="pyarrow", num_cpus=plan.read_cpus)
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
) -> EvaluationRun:
    """Run the pipeline on the Ray instance the caller initialized; the SCORED rows of every sample.

    ``reads`` come from :func:`plan_reads` (with ``samples_per_task`` = the batch size).

    ``predictor`` / ``scorer`` are the keyword arguments of :class:`Predict` (or
    ``predictor_cls``) / :class:`Score`. Raises ``RuntimeError`` when a (shard, key) came back twice.
    """
    log = log or (lambda message: None)
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as extra remote args, which it flags as deprecated
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = build_dataset(reads, image_size=image_size, predictor=predictor, scorer=scorer, plan=plan, predictor_cls=predictor_cls)
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
) -> pa.Table:
    """REPORT rows, one per (k, embedder): means over the scored samples, counts of the others.

    The figures are null when no sample could be scored.
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
                    "checkpoint": checkpoint.checkpoint,
                    "checkpoint_sha256": checkpoint.sha256,
                    "step": checkpoint.step,
                    "code_version": code_version,
                    "wall_time_s": float(wall_time_s),
                    "images_per_s": float(images_per_s),
                }
            )
    return pa.Table.from_pylist(rows, schema=REPORT)


def _figure(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def format_report(report: pa.Table) -> str:
    """The report as a fixed-width text table (``-`` where nothing was scored)."""
    header = f"{'dataset':<14} {'k':>4} {'embedding':<22} {'samples':>8} {'failed':>7} {'no tgt':>7} {'R':>7} {'P':>7} {'F1':>7} {'exact R':>8} {'exact P':>8}"
    lines = [header, "-" * len(header)]
    for r in report.to_pylist():
        figures = " ".join(_figure(r[m], 7) for m in ("recall", "precision", "f1")) + " " + " ".join(_figure(r[m], 8) for m in ("exact_recall", "exact_precision"))
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

OUTPUT_FILES = ("predictions.parquet", "report.parquet")


def is_evaluation_output(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in OUTPUT_FILES)


def check_replaceable(output: str) -> None:
    """Raise ``FileExistsError`` unless ``output`` is absent, empty, or a previous evaluation output."""
    outputs.check_replaceable(output, is_evaluation_output, f"is not an evaluation output (no {' and '.join(OUTPUT_FILES)})")


def staged_output(output: str):
    """The evaluation's output folder, written whole or not at all (``pipeline.outputs.staged_output``)."""
    return outputs.staged_output(output, check_replaceable)
