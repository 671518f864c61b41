"""Curation of webdataset shards on Ray Data: dedup, CLIP score, classifier, into a new shard set.

    shards/<name>.tar (+ <name>.parquet)
      │  hash_shards (Ray Data tasks, one shard per call)   sha256 of each image, 256-bit perceptual
      │                                                    hash (imagehash), 4x4 colour thumbnail,
      │                                                    caption, original size
      ▼  <output>/_curate/hashes/<name>.parquet            (also the --exclude-near shards)
    driver: dedup (pipeline.dedup)                         eval leaks, exact and near duplicates
      │  ClipScorer actor pool (GPU when present)          image-caption cosine of an open_clip
      │                                                    model; classifier over its image embedding
      ▼  <output>/_curate/scores/<name>.parquet            (only samples dedup kept)
    driver: filters                                        --max-classifier-score, --min-clip-score,
      │                                                    --top-fraction; curation.parquet
      │  write_shards (Ray Data tasks)                     kept samples' members copied as they are
      ▼  <output>/<name>.tar + <name>.parquet + <name>_stats.json, manifest.parquet

The output is laid out as ``jobs.ingest`` lays out its own (one output shard per input
shard, keys unchanged, img2dataset's per-shard parquet restricted to the kept rows), so
labels, training and evaluation read it unchanged.

Resumable and exactly once: every per-shard file (hash table, score table, output shard)
is written whole under a temporary name and renamed, an output shard's ``_stats.json``
last, as ingestion marks a shard done. A re-run (or Ray's retry of a task whose worker
died) redoes only what is missing, and every decision is a pure function of the cached
tables, so the result is the same however often a worker dies.

Paths may be URLs (``s3://bucket/shards/laion_curated``): everything is read and written
through ``pipeline.storage`` as ingestion does, so the workers of any node reach it, and on
object storage each per-shard file appears whole when its upload completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.dedup import clusters, colour_close, colour_thumbnail, from_hex, near_pairs, thumbnails
from pipeline.outputs import atomic_file, write_json
from pipeline.shards import STATS_SUFFIX, Shard, TarReader, index_tar, require_tars, write_in_key_order
from schemas import CURATION, SHARD_MANIFEST, reason_rows, validate

WORK = "_curate"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
HASHES = pa.schema(
    [
        ("key", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),  # 256-bit perceptual hash, 64 hex digits; null when the image does not decode
        ("caption", pa.string()),
        ("colour", pa.string()),  # 4x4 RGB thumbnail, 96 hex digits (pipeline.dedup.colour_thumbnail)
        ("area", pa.int64()),  # the original picture's width x height (json), else the stored one's
        ("error", pa.string()),
    ]
)
SCORES = pa.schema([("key", pa.string()), ("clip_score", pa.float64()), ("classifier_score", pa.float64())])
# why a sample is dropped, first that applies (curation.parquet "reason")
REASONS = ("unreadable", "eval_duplicate", "exact_duplicate", "near_duplicate", "classifier", "low_clip_score", "below_top_fraction")
DEDUP_METHODS = ("phash", "dhash", "exact", "none")


@dataclass(frozen=True)
class CurateSettings:
    """What decides which samples stay (``jobs.curate`` flags of the same names)."""

    dedup: str = "phash"  # phash | dhash (near + exact), exact (content hash only), none
    dedup_distance: int = 50  # bits of 256; chosen from the measurements in benchmarks/results/curate.md
    colour_tolerance: float = 6.0  # near pairs' 4x4 colour thumbnails: mean absolute difference, 0-255
    clip_model: str | None = None  # an open_clip name (ViT-B-32) or local-dir:<folder>; None: no CLIP score
    clip_weights: str | None = None  # a local weights file for a named model
    min_clip_score: float | None = None
    top_fraction: float | None = None  # keep this share of the samples left, by CLIP score
    classifier: str | None = None  # a .pt (TorchScript) or .onnx model: image embedding -> score
    max_classifier_score: float | None = None
    batch_size: int = 64  # images per CLIP forward pass
    concurrency: int = 1  # CLIP actors
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # restarts of a dead actor and retries of its shard

    def __post_init__(self):
        if self.dedup not in DEDUP_METHODS:
            raise ValueError(f"dedup {self.dedup!r}: expected one of {', '.join(DEDUP_METHODS)}")
        if not 0 <= self.dedup_distance <= 128:
            raise ValueError(f"dedup_distance must be in [0, 128] bits (of 256), not {self.dedup_distance}")
        if not 0 <= self.colour_tolerance <= 255:  # nan too: it would turn near dedup off
            raise ValueError(f"colour_tolerance must be in [0, 255] (mean absolute difference of 0-255 levels), not {self.colour_tolerance}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], not {self.top_fraction}")
        for name in ("min_clip_score", "max_classifier_score"):  # inf / -inf are thresholds (keep nothing / everything)
            if getattr(self, name) is not None and math.isnan(getattr(self, name)):
                raise ValueError(f"{name} must be a number, not nan (it would filter nothing)")
        if self.clip_model is None and (self.min_clip_score is not None or self.top_fraction is not None or self.classifier):
            raise ValueError("--min-clip-score, --top-fraction and --classifier need a CLIP model (--clip-model)")
        if (self.classifier is None) != (self.max_classifier_score is None):
            raise ValueError("--classifier and --max-classifier-score go together")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")
        if self.max_retries < 0:  # Ray reads -1 as restarts without end
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries}")

    def decision_fields(self) -> dict:
        """The settings a re-run on the same output must keep (the others only change speed)."""
        keep = ("dedup", "dedup_distance", "colour_tolerance", "clip_model", "clip_weights", "min_clip_score", "top_fraction", "classifier", "max_classifier_score")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class CurateProgress:
    stage: str  # hash | score | write
    done: int
    total: int


join = storage.join  # a path under a folder or URL prefix


def exists(path: str) -> bool:
    """Whether ``path`` exists now (other processes' writes included: no cached listing is trusted)."""
    fs, p = storage.fresh(path)
    return fs.exists(p)


def write_parquet(table: pa.Table, path: str) -> None:
    with atomic_file(path) as f:
        pq.write_table(table, f)


def read_parquet(path: str) -> pa.Table:
    with storage.open_file(path, "rb") as f:
        return pq.read_table(f)


# ----------------------------------------------------------------------------- hashing


HASH_SIZE = 16  # 256-bit hashes: on the synthetic world's look-alike scenes, 64-bit ones merge distinct images


def perceptual_hash(img, method: str = "phash", hash_size: int = HASH_SIZE) -> str:
    """Perceptual hash of a PIL image (imagehash's phash or dhash, hash_size^2 bits), as hex digits."""
    import imagehash

    h = imagehash.dhash(img, hash_size=hash_size) if method == "dhash" else imagehash.phash(img, hash_size=hash_size)
    return str(h)


def _image_member(sample) -> str | None:
    return sample.first(IMAGE_EXTS)


def _caption(sample) -> str | None:
    if "txt" in sample.data:
        return sample.data["txt"].decode("utf-8", errors="replace")
    if "json" in sample.data:
        try:
            meta = json.loads(sample.data["json"])
        except ValueError:
            return None
        return meta.get("caption") if isinstance(meta, dict) else None
    return None


def _area(sample, img) -> int:
    try:
        meta = json.loads(sample.data.get("json", b"{}"))
        w, h = meta.get("original_width"), meta.get("original_height")
        if w and h:
            return int(w) * int(h)
    except (ValueError, TypeError, AttributeError):
        pass
    return img.width * img.height if img is not None else 0


def hash_shard(tar: str, method: str = "phash") -> tuple[pa.Table, str | None]:
    """(HASHES rows of every sample of a tar, in tar order; the tar's damage or None)."""
    from PIL import Image

    rows = []
    reader = TarReader(tar)
    for sample in reader:
        ext = _image_member(sample)
        row = {"key": sample.key, "sha256": None, "phash": None, "caption": _caption(sample), "colour": None, "area": 0, "error": None}
        if ext is None:
            row["error"] = "no image member"
        else:
            data = sample.data[ext]
            row["sha256"] = hashlib.sha256(data).hexdigest()
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
                img = img.convert("RGB")
                row["phash"] = perceptual_hash(img, method) if method in ("phash", "dhash") else None
                row["colour"] = colour_thumbnail(img)
                row["area"] = _area(sample, img)
            except Exception as err:  # noqa: BLE001 - an undecodable image is a counted drop, never a crash
                row["error"] = f"undecodable image: {type(err).__name__}"
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=HASHES), reader.damage


def hash_shards_batch(batch: pa.Table, method: str) -> pa.Table:
    """Ray stage: shard specs (name, tar, out) -> each shard's HASHES table written to ``out``; one row per shard."""
    names, errors = [], []
    for spec in batch.to_pylist():
        table, damage = hash_shard(spec["tar"], method)
        write_parquet(table.replace_schema_metadata({"damage": damage or ""}), spec["out"])
        names.append(spec["name"])
        errors.append(damage)
    return pa.table({"name": pa.array(names, pa.string()), "error": pa.array(errors, pa.string())})


# ----------------------------------------------------------------------------- CLIP scoring


def load_classifier(path: str):
    """A callable: float32 embeddings (N, D) -> scores (N,), from a TorchScript .pt or an .onnx file."""
    if path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda emb: np.asarray(session.run(None, {name: emb.astype(np.float32)})[0], dtype=np.float64).reshape(len(emb))
    import torch

    model = torch.jit.load(path, map_location="cpu").eval()

    def score(emb: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(emb.astype(np.float32))).double().numpy().reshape(len(emb))

    return score


def load_clip(model_name: str, weights: str | None, device: str):
    """(model, preprocess, tokenizer) of an open_clip model from local files only."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


class ClipScorer:
    """Ray stage (actor): shard specs (name, tar, keys, out) -> each shard's SCORES table written to ``out``.

    The model (and classifier) load once, in ``__init__``. A sample's score is the mean
    cosine between its image and each line of its caption (COCO-style samples hold several).
    Images are decoded and preprocessed by ``threads`` threads (the actor's CPUs; PIL and
    torch release the GIL), the next batch's while the model embeds the last one, so that
    a GPU is not left waiting on one decoding thread (on an H100 the model alone scores
    about 8x what one thread decodes).
    """

    def __init__(self, model_name: str, weights: str | None, classifier: str | None, batch_size: int, threads: int = 1):
        import torch

        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.preprocess, self.tokenizer = load_clip(model_name, weights, self.device)
        self.classifier = load_classifier(classifier) if classifier else None
        self.batch_size = batch_size

    def pixels(self, data: bytes):
        """One encoded image -> the model's input tensor [3, S, S] (on the CPU)."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return self.preprocess(img.convert("RGB"))

    def embed(self, pixels, captions: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(image-caption cosine per sample, image embeddings) of one batch: ``pixels`` [N, 3, S, S] from :meth:`pixels`."""
        import torch

        lines = [c for cs in captions for c in cs]
        owner = np.repeat(np.arange(len(captions)), [len(cs) for cs in captions])
        with torch.no_grad():
            image = self.model.encode_image(pixels.to(self.device, non_blocking=True), normalize=True).float()
            text = self.model.encode_text(self.tokenizer(lines).to(self.device), normalize=True).float()
            cos = (image[torch.from_numpy(owner).to(self.device)] * text).sum(-1).cpu().numpy()
        sums = np.bincount(owner, weights=cos, minlength=len(captions))
        return sums / np.maximum(1, [len(cs) for cs in captions]), image.cpu().numpy()

    def score_shard(self, tar: str, keys: Sequence[str]) -> pa.Table:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        wanted = set(keys)
        rows: list[dict] = []

        def score(batch: list[tuple[str, object, list[str]]]) -> None:
            pixels = torch.stack([future.result() for _, future, _ in batch])
            scores, embeddings = self.embed(pixels, [b[2] for b in batch])
            unsafe = self.classifier(embeddings) if self.classifier is not None else [None] * len(batch)
            for (key, _, _), s, c in zip(batch, scores, unsafe):
                rows.append({"key": key, "clip_score": float(s), "classifier_score": None if c is None else float(c)})

        # one batch decoding in the pool while the one before it is embedded
        current: list[tuple[str, object, list[str]]] = []
        previous: list[tuple[str, object, list[str]]] = []
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="clip-decode") as pool:
            for sample in TarReader(tar, read=lambda ext: ext.lower() in (*IMAGE_EXTS, "txt", "json")):
                if sample.key not in wanted:
                    continue
                lines = [line for line in (_caption(sample) or "").split("\n") if line.strip()] or [""]
                current.append((sample.key, pool.submit(self.pixels, sample.data[_image_member(sample)]), lines))
                if len(current) >= self.batch_size:
                    if previous:
                        score(previous)
                    previous, current = current, []
            for batch in (previous, current):
                if batch:
                    score(batch)
        return pa.Table.from_pylist(rows, schema=SCORES)

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = []
        for spec in batch.to_pylist():
            write_parquet(self.score_shard(spec["tar"], json.loads(spec["keys"])), spec["out"])
            names.append(spec["name"])
        return pa.table({"name": pa.array(names, pa.string())})


# ----------------------------------------------------------------------------- writing


def write_shard(tar: str, parquet: str | None, keep: Sequence[str], scores: Mapping[str, float | None], out_dir: str, name: str) -> dict:
    """Copy the kept samples of one shard (members as they are, key order) to ``out_dir``; stats last."""
    start = time.time()
    wanted = set(keep)
    with atomic_file(join(out_dir, f"{name}.tar")) as f:
        written = write_in_key_order(tar, f, keep=wanted, allow_damage=True)
    if written != sorted(wanted):
        raise RuntimeError(f"{tar}: {len(wanted) - len(written)} kept sample(s) not found in the tar")
    if parquet is not None:
        table = read_parquet(parquet)
        table = table.filter(pc.is_in(table["key"], pa.array(written, pa.string()))).sort_by("key")
    else:
        table = pa.table({"key": pa.array(written, pa.string()), "status": pa.array(["success"] * len(written), pa.string())})
    table = table.append_column("clip_score", pa.array([scores.get(k) for k in table["key"].to_pylist()], pa.float64()))
    write_parquet(table, join(out_dir, f"{name}.parquet"))
    # the tar above was renamed into place before the parquet; labels read them together once the stats exist
    stats = {"count": len(written), "successes": len(written), "duration": time.time() - start, "status_dict": {"success": len(written)}}
    write_json(join(out_dir, f"{name}{STATS_SUFFIX}"), stats)
    return stats


def write_shards_batch(batch: pa.Table) -> pa.Table:
    """Ray stage: write specs (name, tar, parquet, keep (json), scores (json), out_dir) -> one row per shard."""
    names = []
    for spec in batch.to_pylist():
        scores = json.loads(spec["scores"])
        write_shard(spec["tar"], spec["parquet"] or None, json.loads(spec["keep"]), scores, spec["out_dir"], spec["name"])
        names.append(spec["name"])
    return pa.table({"name": pa.array(names, pa.string())})


# ----------------------------------------------------------------------------- decisions


def decide_dedup(hashes: pa.Table, settings: CurateSettings, exclude: pa.Table | None) -> list[dict]:
    """Per sample of ``hashes`` (shard, key order): reason (or None), duplicate_of, phash_distance."""
    rows = hashes.to_pylist()
    out = [{"reason": None, "duplicate_of": None, "phash_distance": None} for _ in rows]
    ok = [i for i, r in enumerate(rows) if r["error"] is None]
    for i, r in enumerate(rows):
        if r["error"] is not None:
            out[i]["reason"] = "unreadable"
    near = settings.dedup in ("phash", "dhash")
    if settings.dedup == "none":
        return out
    ph = from_hex([rows[i]["phash"] for i in ok]) if near else np.zeros((len(ok), 1), np.uint64)
    if exclude is not None and exclude.num_rows:
        ex = [r for r in exclude.to_pylist() if r["error"] is None]
        by_sha = {r["sha256"]: r for r in ex}
        leaked: dict[int, tuple[str, int]] = {}
        for pos, i in enumerate(ok):
            if rows[i]["sha256"] in by_sha:
                leaked[pos] = (f"{by_sha[rows[i]['sha256']]['shard']}/{by_sha[rows[i]['sha256']]['key']}", 0)
        if near:
            ex_ph = from_hex([r["phash"] for r in ex])
            pairs = near_pairs(ph, settings.dedup_distance, other=ex_ph)
            pairs = colour_close(thumbnails([rows[i]["colour"] for i in ok]), pairs, settings.colour_tolerance, thumbnails([r["colour"] for r in ex]))
            for pos, j, d in pairs:
                if int(pos) not in leaked or d < leaked[int(pos)][1]:
                    leaked[int(pos)] = (f"{ex[j]['shard']}/{ex[j]['key']}", int(d))
        for pos, (what, d) in leaked.items():
            out[ok[pos]].update(reason="eval_duplicate", duplicate_of=what, phash_distance=d)
        ok = [i for pos, i in enumerate(ok) if pos not in leaked]
        ph = from_hex([rows[i]["phash"] for i in ok]) if near else np.zeros((len(ok), 1), np.uint64)
    colours = thumbnails([rows[i]["colour"] for i in ok]) if near else None
    groups = clusters([rows[i]["sha256"] for i in ok], ph, [rows[i]["area"] for i in ok], settings.dedup_distance if near else None, colours, settings.colour_tolerance)
    for pos, found in enumerate(groups):
        if found is not None:
            keep, reason, d = found
            out[ok[pos]].update(reason=reason, duplicate_of=rows[ok[keep]]["key"], phash_distance=d)
    return out


def decide_scores(table: pa.Table, settings: CurateSettings) -> tuple[list[str | None], float | None]:
    """The reasons after CLIP scoring (None: kept), and the score threshold --top-fraction set (or None)."""
    reasons = table["reason"].to_pylist()
    clip = table["clip_score"].to_pylist()
    unsafe = table["classifier_score"].to_pylist()
    for i, r in enumerate(reasons):
        if r is not None:
            continue
        if settings.max_classifier_score is not None and unsafe[i] is not None and unsafe[i] > settings.max_classifier_score:
            reasons[i] = "classifier"
        elif settings.min_clip_score is not None and clip[i] is not None and clip[i] < settings.min_clip_score:
            reasons[i] = "low_clip_score"
    threshold = None
    if settings.top_fraction is not None:
        left = [i for i, r in enumerate(reasons) if r is None and clip[i] is not None]
        keep = math.ceil(round(settings.top_fraction * len(left), 9))  # 0.07 x 100 is 7.000000000000001 in floats: 7
        keys = table["key"].to_pylist()
        ranked = sorted(left, key=lambda i: (-clip[i], keys[i]))
        for i in ranked[keep:]:
            reasons[i] = "below_top_fraction"
        threshold = clip[ranked[keep - 1]] if 0 < keep <= len(ranked) else None
    return reasons, threshold


# ----------------------------------------------------------------------------- the job


@dataclass
class CurateResult:
    table: pa.Table  # schemas.CURATION
    manifest: pa.Table  # schemas.SHARD_MANIFEST
    summary: dict


def _specs_todo(specs: list[dict], key: str = "out") -> list[dict]:
    return [s for s in specs if not exists(s[key])]


def _run(ds_specs: list[dict], fn, *, progress, stage: str, total: int, done_before: int, **map_args) -> list[dict]:
    """Run one Ray Data stage over per-shard specs (one shard per call); its result rows.

    ``progress`` hears of the ``done_before`` shards (cached, or done by an earlier call) first, then of each one done.
    """
    import ray.data

    progress(CurateProgress(stage, done_before, total))
    if not ds_specs:
        return []
    ds = ray.data.from_items(ds_specs, override_num_blocks=len(ds_specs)).map_batches(fn, batch_size=1, batch_format="pyarrow", **map_args)
    rows = []
    for row in ds.iter_rows():
        rows.append(row)
        progress(CurateProgress(stage, done_before + len(rows), total))
    return rows


def curate(
    shards: Sequence[Shard],
    output: str,
    settings: CurateSettings,
    *,
    exclude: Sequence[Shard] = (),
    log: Callable[[str], None] | None = None,
    progress: Callable[[CurateProgress], None] | None = None,
    scorer_cls: type | None = None,
) -> CurateResult:
    """Curate ``shards`` into ``output`` on the Ray instance the caller initialized (module docstring).

    ``exclude``: shards of an evaluation set; samples of ``shards`` that duplicate one of
    theirs are dropped (``eval_duplicate``); a damaged one, or a set without a usable image, is a
    ``ValueError`` (:func:`check_exclude`). ``scorer_cls``: the scoring stage's class
    (default :class:`ClipScorer`; a subclass may add behaviour).
    """
    import warnings

    import ray.data

    log = log or (lambda message: None)
    progress = progress or (lambda p: None)
    t0 = time.time()
    require_tars([*shards, *exclude])
    method = settings.dedup if settings.dedup in ("phash", "dhash") else "exact"
    work = join(output, WORK)

    # 1. hashes (cached per shard): the --exclude-near shards first, so that a set that cannot serve stops the job early
    exclude_specs = [{"name": s.name, "tar": s.tar, "out": join(work, "exclude", f"{s.name}.parquet")} for s in exclude]
    input_specs = [{"name": s.name, "tar": s.tar, "out": join(work, "hashes", f"{s.name}.parquet")} for s in shards]
    exclude_todo, input_todo = _specs_todo(exclude_specs), _specs_todo(input_specs)
    total = len(exclude_specs) + len(input_specs)
    cached = total - len(exclude_todo) - len(input_todo)
    log(f"hashing {total - cached} of {total} shard(s) ({cached} cached), {method}")
    t_hash = time.time()
    hash_args = {"progress": progress, "stage": "hash", "total": total, "fn_kwargs": {"method": method}, "num_cpus": 1}
    _run(exclude_todo, hash_shards_batch, done_before=cached, **hash_args)
    excluded = _exclude_hashes(exclude, join(work, "exclude")) if exclude else None
    _run(input_todo, hash_shards_batch, done_before=cached + len(exclude_todo), **hash_args)
    hash_seconds = time.time() - t_hash
    hashes = _concat(shards, join(work, "hashes"))
    damaged = {s.name: d for s in shards if (d := _damage(join(work, "hashes", f"{s.name}.parquet")))}
    for name, damage in damaged.items():
        log(f"shard {name}: {damage}; its intact samples are curated")
    if not hashes.num_rows:
        log("no sample to curate: the output is an empty shard set")

    # 2. dedup
    dedup = decide_dedup(hashes, settings, excluded)
    table = _base_table(hashes, dedup)

    # 3. CLIP scores of the samples dedup kept (cached per shard)
    threshold = None
    score_seconds = 0.0
    if settings.clip_model is not None:
        candidates: dict[str, list[str]] = {}
        for name, key, reason in zip(table["shard"].to_pylist(), table["key"].to_pylist(), table["reason"].to_pylist()):
            if reason is None:
                candidates.setdefault(name, []).append(key)
        tars = {s.name: s.tar for s in shards}
        score_specs = [
            {"name": n, "tar": tars[n], "keys": json.dumps(candidates.get(n, [])), "out": join(work, "scores", f"{n}.parquet")}
            for n in sorted(tars)
        ]
        todo = _specs_todo(score_specs)
        for spec in todo:
            if not candidates.get(spec["name"]):  # nothing left to score: no CLIP model loads for it
                write_parquet(SCORES.empty_table(), spec["out"])
        todo = [spec for spec in todo if candidates.get(spec["name"])]
        log(f"CLIP scores of {sum(len(candidates[s['name']]) for s in todo)} sample(s) in {len(todo)} of {len(score_specs)} shard(s) "
            f"with {settings.clip_model} ({settings.concurrency} actor(s){', GPU' if settings.gpus_per_actor else ''})")  # fmt: skip
        t_score = time.time()
        # as in evaluation: restarts bounded, a shard waits for its actor's restart (a lost node's actors come back
        # only once the cluster has room, and every try meanwhile would count)
        actor_args = {"max_restarts": settings.max_retries, "max_task_retries": -1}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            _run(todo, scorer_cls or ClipScorer, progress=progress, stage="score", total=len(score_specs),
                 done_before=len(score_specs) - len(todo),
                 fn_constructor_kwargs={"model_name": settings.clip_model, "weights": settings.clip_weights, "classifier": settings.classifier,
                                        "batch_size": settings.batch_size, "threads": max(1, int(settings.cpus_per_actor))},
                 compute=ray.data.ActorPoolStrategy(size=min(settings.concurrency, max(1, len(todo)))), num_cpus=settings.cpus_per_actor,
                 num_gpus=settings.gpus_per_actor or None, **actor_args)  # fmt: skip
        score_seconds = time.time() - t_score
        scores = pa.concat_tables([read_parquet(s["out"]) for s in score_specs]) if score_specs else SCORES.empty_table()
        by_key = {k: (c, u) for k, c, u in zip(scores["key"].to_pylist(), scores["clip_score"].to_pylist(), scores["classifier_score"].to_pylist())}
        keys = table["key"].to_pylist()
        table = table.set_column(table.schema.get_field_index("clip_score"), "clip_score", pa.array([by_key.get(k, (None, None))[0] for k in keys], pa.float64()))
        table = table.set_column(table.schema.get_field_index("classifier_score"), "classifier_score", pa.array([by_key.get(k, (None, None))[1] for k in keys], pa.float64()))
        reasons, threshold = decide_scores(table, settings)
        table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    kept = pc.is_null(table["reason"])
    table = table.set_column(table.schema.get_field_index("kept"), "kept", kept)
    validate(table, CURATION, where="curation table")

    # 4. output shards (skipping those already written)
    parquets = {s.name: s.parquet for s in shards}
    clip = dict(zip(table["key"].to_pylist(), table["clip_score"].to_pylist()))
    by_shard: dict[str, list[str]] = {s.name: [] for s in shards}
    for name, key, k in zip(table["shard"].to_pylist(), table["key"].to_pylist(), kept.to_pylist()):
        if k:
            by_shard[name].append(key)
    write_specs = [
        {"name": s.name, "tar": s.tar, "parquet": parquets[s.name] or "", "keep": json.dumps(by_shard[s.name]),
         "scores": json.dumps({k: clip[k] for k in by_shard[s.name]}), "out_dir": output, "out": join(output, f"{s.name}{STATS_SUFFIX}")}
        for s in shards
    ]  # fmt: skip
    todo = _specs_todo(write_specs)
    log(f"writing {len(todo)} output shard(s) ({len(write_specs) - len(todo)} already written)")
    _run(todo, write_shards_batch, progress=progress, stage="write", total=len(write_specs),
         done_before=len(write_specs) - len(todo), num_cpus=1)  # fmt: skip
    manifest = build_manifest(table, shards, output)
    summary = summarize(table, settings, threshold, len(shards), damaged, time.time() - t0, hash_seconds, score_seconds)
    return CurateResult(table, manifest, summary)


def check_exclude(exclude: Sequence[Shard]) -> int:
    """The samples of the ``--exclude-near`` shards, from their tar headers (no image is read).

    Raises ``ValueError`` naming a shard that is damaged or missing, or when the shards hold no
    sample: checked against fewer images than meant, the leak filter would let leaks through
    without a word. (:func:`curate` checks the hashed shards again; this finds it before any output.)
    """
    total = 0
    for s in exclude:
        index = index_tar(s.tar) if s.tar is not None else None
        damage = index.damage if index is not None else "no tar"
        if damage:
            raise ValueError(_exclude_damaged(s, damage))
        total += len(index.samples)
    if not total:
        raise ValueError(f"the --exclude-near shard(s) ({_named(exclude)}) hold no samples: nothing to check against")
    return total


def _named(shards: Sequence[Shard]) -> str:
    return ", ".join(s.tar or s.name for s in shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")


def _exclude_damaged(shard: Shard, damage: str) -> str:
    return (f"--exclude-near shard {shard.tar or shard.name}: {damage}; the leak filter would check against fewer images "
            "than the evaluation set holds: repair it or leave it out of --exclude-near")  # fmt: skip


def _exclude_hashes(exclude: Sequence[Shard], folder: str) -> pa.Table:
    """The cached hashes of the ``--exclude-near`` shards; ``ValueError`` (and the offending cache removed, so a
    re-run reads the shards again) when one is damaged or no image of theirs is usable (:func:`check_exclude`)."""
    for s in exclude:
        path = join(folder, f"{s.name}.parquet")
        if damage := _damage(path):
            storage.remove(path)
            raise ValueError(_exclude_damaged(s, damage))
    table = _concat(exclude, folder)
    if not pc.sum(pc.is_null(table["error"])).as_py():
        for s in exclude:
            storage.remove(join(folder, f"{s.name}.parquet"))
        raise ValueError(f"the --exclude-near shard(s) ({_named(exclude)}) hold no samples with a readable image: nothing to check against")
    return table


def _damage(path: str) -> str | None:
    with storage.open_file(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return meta.get(b"damage", b"").decode() or None


def _concat(shards: Sequence[Shard], folder: str) -> pa.Table:
    parts = []
    for s in shards:
        t = read_parquet(join(folder, f"{s.name}.parquet")).replace_schema_metadata(None).sort_by("key")  # (shard, key) order
        parts.append(t.append_column("shard", pa.array([s.name] * t.num_rows, pa.string())))
    return pa.concat_tables(parts) if parts else HASHES.append(pa.field("shard", pa.string())).empty_table()


def _base_table(hashes: pa.Table, dedup: list[dict]) -> pa.Table:
    n = hashes.num_rows
    return pa.table(
        {
            "key": hashes["key"],
            "shard": hashes["shard"],
            "caption": hashes["caption"],
            "sha256": hashes["sha256"],
            "phash": hashes["phash"],
            "clip_score": pa.nulls(n, pa.float64()),
            "classifier_score": pa.nulls(n, pa.float64()),
            "kept": pa.array([d["reason"] is None for d in dedup], pa.bool_()),
            "reason": pa.array([d["reason"] for d in dedup], pa.string()),
            "duplicate_of": pa.array([d["duplicate_of"] for d in dedup], pa.string()),
            "phash_distance": pa.array([d["phash_distance"] for d in dedup], pa.int64()),
        },
        schema=CURATION,
    )


def build_manifest(table: pa.Table, shards: Sequence[Shard], output: str) -> pa.Table:
    """One SHARD_MANIFEST row per output shard: samples in, kept (successes), dropped by reason (failures)."""
    rows = []
    for s in shards:
        stats = storage.read_json(join(output, f"{s.name}{STATS_SUFFIX}"))
        part = table.filter(pc.equal(table["shard"], s.name))
        reasons = Counter(r for r in part["reason"].to_pylist() if r is not None)
        rows.append(
            {
                "shard": join(output, f"{s.name}.tar"),
                "samples": part.num_rows,
                "successes": int(stats["successes"]),
                "failures": part.num_rows - int(stats["successes"]),
                "failures_by_reason": reason_rows(reasons),
                "attempts": 1,
                "seconds": float(stats["duration"]),
            }
        )
    return pa.Table.from_pylist(rows, schema=SHARD_MANIFEST)


def summarize(table: pa.Table, settings: CurateSettings, threshold: float | None, shards: int, damaged: dict, seconds: float, hash_s: float, score_s: float) -> dict:
    reasons = Counter(r for r in table["reason"].to_pylist() if r is not None)
    scores = np.array([s for s in table["clip_score"].to_pylist() if s is not None], dtype=np.float64)
    n = table.num_rows
    kept = n - sum(reasons.values())
    return {
        "shards": shards,
        "damaged_shards": damaged,
        "samples": n,
        "kept": kept,
        "dropped": {r: reasons.get(r, 0) for r in REASONS},
        "settings": asdict(settings),
        "clip_scores": None
        if not len(scores)
        else {
            "scored": int(len(scores)),
            "mean": float(scores.mean()),
            "percentiles": {str(q): float(np.percentile(scores, q)) for q in (5, 25, 50, 75, 95)},
            "min_clip_score": settings.min_clip_score,
            "top_fraction_threshold": threshold,
        },
        "seconds": {"total": round(seconds, 3), "hash": round(hash_s, 3), "score": round(score_s, 3)},
    }


def format_summary(s: dict, output: str) -> str:
    lines = [f"curation summary -> {output}", f"  samples          {s['samples']:>8}   in {s['shards']} shard(s)"]
    for reason, count in s["dropped"].items():
        lines.append(f"  {reason:16s} {count:>8}   dropped")
    pct = 100.0 * s["kept"] / s["samples"] if s["samples"] else 0.0
    lines.append(f"  kept             {s['kept']:>8}   {pct:.1f}%")
    if s["clip_scores"]:
        c = s["clip_scores"]
        p = c["percentiles"]
        lines.append(f"  clip score       mean {c['mean']:.3f}, p5 {p['5']:.3f}, p50 {p['50']:.3f}, p95 {p['95']:.3f} ({c['scored']} scored)")
        if c["min_clip_score"] is not None or c["top_fraction_threshold"] is not None:
            lines.append(f"  thresholds       min_clip_score {c['min_clip_score']}, top-fraction cut at {c['top_fraction_threshold']}")
    t = s["seconds"]
    lines.append(f"  time             {t['total']:.1f} s (hashing {t['hash']:.1f} s, CLIP {t['score']:.1f} s)")
    return "\n".join(lines)


def plot_scores(table: pa.Table, settings: CurateSettings, threshold: float | None, path: str) -> None:
    """Histogram of CLIP scores, kept and dropped stacked, thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = table["clip_score"].to_pylist()
    kept = table["kept"].to_pylist()
    kept_s = [s for s, k in zip(scores, kept) if s is not None and k]
    drop_s = [s for s, k in zip(scores, kept) if s is not None and not k]
    fig, ax = plt.subplots(figsize=(7, 4))
    values = kept_s + drop_s
    bins = np.linspace(min(values), max(values), 41) if values else 10
    ax.hist([kept_s, drop_s], bins=bins, stacked=True, label=["kept", "dropped"], color=["tab:green", "tab:red"])
    if settings.min_clip_score is not None:
        ax.axvline(settings.min_clip_score, color="black", linestyle="--", label=f"--min-clip-score {settings.min_clip_score}")
    if threshold is not None:
        ax.axvline(threshold, color="tab:blue", linestyle=":", label=f"--top-fraction {settings.top_fraction} (cut {threshold:.3f})")
    ax.set_xlabel(f"CLIP score (image-caption cosine, {settings.clip_model})")
    ax.set_ylabel("samples")
    ax.set_title(f"CLIP scores of {len(values)} samples left by dedup")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_file(path) as f:
        f.write(buf.getvalue())
