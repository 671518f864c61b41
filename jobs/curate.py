"""Curate webdataset shards: dedup, CLIP score and classifier filters, as a Ray Data job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.curate --shards /data/shards/laion --output /data/shards/laion_curated \\
            --clip-model ViT-B-32 --clip-weights /ckpt/ViT-B-32.pt --min-clip-score 0.28 --dedup phash

also runs directly (``python -m jobs.curate ...``), joining ``--address`` / ``$RAY_ADDRESS``
or starting a local Ray instance. Writes into ``--output`` (see ``pipeline.curate``): the
curated shards in the layout of ``jobs.ingest`` (``<name>.tar`` + ``<name>.parquet`` +
``<name>_stats.json``, ``manifest.parquet``), ``curation.parquet`` (``schemas.CURATION``:
every input sample's hashes, scores, and whether it was kept or why not),
``curate_summary.json``, ``clip_scores.png`` (when CLIP scores were computed) and
``curate_config.json``. Re-running the same command on the same output completes what
is missing. Exit status: 0 done, 1 failed, 2 usage or input error, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from jobs._cli import is_url, parse, print_path_error, ray_session, resolve_paths
from pipeline import storage


@dataclass
class CurateConfig:
    """Everything one curation run depends on; saved as ``<output>/curate_config.json``."""

    shards: str
    """Input shards (jobs.ingest's output): a folder, a glob or a brace pattern, local or a URL."""
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """Folder or URL prefix (s3://bucket/shards/laion_curated) for the curated shards and tables; re-running on it completes what is missing."""
    dedup: Literal["phash", "dhash", "exact", "none"] = "phash"
    """phash / dhash: exact (content hash) and near duplicates (256-bit perceptual hash); exact: content hash only; none."""
    dedup_distance: int = 50
    """Near duplicates: at most this many of the 256 hash bits differ (chosen from measurements: BENCHMARKS.md, curation)."""
    colour_tolerance: float = 6.0
    """Near duplicates must also have 4x4 colour thumbnails within this mean absolute difference (0-255)."""
    exclude_near: str | None = None
    """Shards of an evaluation set: samples that duplicate one of their images are dropped (no validation leak)."""
    clip_model: str | None = None
    """open_clip model name (ViT-B-32, ViT-L-14, ...) or local-dir:<folder>; unset: no CLIP score."""
    clip_weights: str | None = None
    """Local weights file for --clip-model (open_clip or OpenAI .pt); never downloaded."""
    min_clip_score: float | None = None
    """Drop samples whose image-caption cosine is below this (DataComp's threshold style; 0.28 for OpenAI ViT-B/32)."""
    top_fraction: float | None = None
    """Keep this share of the samples left, the highest CLIP scores (DataComp's top-k style, e.g. 0.3)."""
    classifier: str | None = None
    """A small TorchScript (.pt) or ONNX (.onnx) model mapping a CLIP image embedding to a score (safety, quality)."""
    max_classifier_score: float | None = None
    """Drop samples whose --classifier score is above this."""
    batch_size: int = 64
    """Images per CLIP forward pass."""
    concurrency: int = 0
    """CLIP actors; 0: one per GPU of the cluster, else one per 2 CPUs (at least 1)."""
    cpus_per_actor: int = 1
    """CPUs (torch threads) per CLIP actor."""
    max_retries: int = 3
    """Restarts of a dead CLIP actor, and retries of the shard it held."""
    address: str | None = None
    """Ray cluster to join; default: $RAY_ADDRESS (set by ray job submit), else a new local instance."""

    def __post_init__(self):
        if self.concurrency < 0 or self.cpus_per_actor < 1:
            raise ValueError("--concurrency must be >= 0 and --cpus-per-actor >= 1")
        if self.exclude_near and self.dedup == "none":
            raise ValueError("--exclude-near drops the copies of an evaluation set's images, a dedup: give --dedup exact, phash or dhash with it, not none")
        self.settings(1, 0)  # checks the filters

    def settings(self, concurrency: int, gpus: float):
        from pipeline.curate import CurateSettings

        return CurateSettings(
            dedup=self.dedup,
            dedup_distance=self.dedup_distance,
            colour_tolerance=self.colour_tolerance,
            clip_model=self.clip_model,
            clip_weights=self.clip_weights,
            min_clip_score=self.min_clip_score,
            top_fraction=self.top_fraction,
            classifier=self.classifier,
            max_classifier_score=self.max_classifier_score,
            batch_size=self.batch_size,
            concurrency=concurrency,
            gpus_per_actor=gpus,
            cpus_per_actor=self.cpus_per_actor,
            max_retries=self.max_retries,
        )


PATHS = ("shards", "output", "exclude_near", "clip_weights", "classifier")


def check_files(cfg: CurateConfig) -> None:
    for name in ("clip_weights", "classifier"):
        path = getattr(cfg, name)
        if path is not None and not is_url(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file")
    if cfg.clip_model and cfg.clip_model.startswith("local-dir:") and not os.path.isdir(cfg.clip_model.removeprefix("local-dir:")):
        raise FileNotFoundError(f"--clip-model {cfg.clip_model}: no such folder")


def check_resume(cfg: CurateConfig, settings, input_shards: list[str]) -> None:
    """A re-run on an output must decide by the same rules on the same shards (else the cached
    tables would mix two runs, and the shards written before would keep what the new decision drops)."""
    path = storage.join(cfg.output, "curate_config.json")
    if not storage.exists(path):
        return
    before = storage.read_json(path)
    now = {"shards": cfg.shards, "exclude_near": cfg.exclude_near, **settings.decision_fields()}
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
    if changed:
        raise ValueError(f"{cfg.output} holds a curation made with other settings ({'; '.join(changed)}): use a new --output")
    if "input_shards" in before and before["input_shards"] != input_shards:
        added, gone = sorted(set(input_shards) - set(before["input_shards"])), sorted(set(before["input_shards"]) - set(input_shards))
        said = ", ".join(f"{len(names)} {what} (e.g. {names[0]})" for names, what in ((added, "added"), (gone, "gone")) if names)
        raise ValueError(f"{cfg.output} holds a curation of other shards: since it began, {cfg.shards} has {said}; "
                         "dedup and the top fraction decide over every shard at once: use a new --output")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:  # Ctrl-C: no traceback; Ray was shut down on the way out
        print("\ninterrupted: re-running the same command completes what is missing in --output", file=sys.stderr)
        return 130


def run(argv: list[str] | None) -> int:
    cfg = parse(CurateConfig, argv, prog="python -m jobs.curate", description=__doc__)
    print("curate config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
    from pipeline import curate, shards
    from pipeline.outputs import write_json
    from schemas import CURATION, SHARD_MANIFEST, write_table

    try:
        resolve_paths(cfg, PATHS)
        for path in (cfg.shards, cfg.output, cfg.exclude_near):
            if path is not None:
                storage.check_reachable(path)
        with storage.reported(cfg.shards):
            found = shards.find_shards(cfg.shards)
        exclude = []
        if cfg.exclude_near:
            with storage.reported(cfg.exclude_near):
                exclude = shards.find_shards(cfg.exclude_near)
                curate.check_exclude(exclude)  # a damaged or empty set would let leaks through: refused before any output
        check_files(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, storage.StorageError) as err:
        print_path_error(err)
        return 2
    import ray
    from tqdm import tqdm

    started = time.time()
    try:
        with ray_session(cfg.address):
            gpus = ray.cluster_resources().get("GPU", 0)
            cpus = ray.cluster_resources().get("CPU", 1)
            concurrency = cfg.concurrency or (int(gpus) if gpus >= 1 else max(1, int(cpus) // 2))
            settings = cfg.settings(concurrency, 1.0 if gpus >= 1 else 0.0)
            check_resume(cfg, settings, [s.name for s in found])
            storage.makedirs(cfg.output)
            record = {**dataclasses.asdict(cfg), **settings.decision_fields(), "input_shards": [s.name for s in found]}
            write_json(curate.join(cfg.output, "curate_config.json"), record)
            bars: dict = {}

            def progress(p) -> None:
                if p.stage not in bars:  # from the shards done before (a resume's cached ones)
                    bars[p.stage] = tqdm(total=p.total, initial=p.done, unit="shard", desc=p.stage, mininterval=1.0 if sys.stderr.isatty() else 10.0)
                bars[p.stage].update(p.done - bars[p.stage].n)

            try:
                result = curate.curate(found, cfg.output, settings, exclude=exclude, log=lambda m: print(m, flush=True), progress=progress)
            finally:
                for bar in bars.values():
                    bar.close()
    except (FileNotFoundError, storage.StorageError) as err:
        print_path_error(err)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_table(result.table, curate.join(cfg.output, "curation.parquet"), CURATION)
    write_table(result.manifest, curate.join(cfg.output, "manifest.parquet"), SHARD_MANIFEST)
    if result.summary["clip_scores"]:
        curate.plot_scores(result.table, settings, result.summary["clip_scores"]["top_fraction_threshold"], curate.join(cfg.output, "clip_scores.png"))
    result.summary["seconds"]["job"] = round(time.time() - started, 3)
    write_json(curate.join(cfg.output, "curate_summary.json"), result.summary)
    print(curate.format_summary(result.summary, cfg.output), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
