"""Ingest a CC3M / CC12M / COCO / LAION / OpenImages subset into webdataset shards, on Ray.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.ingest --source cc3m --input /data/cc3m_train.tsv --output /data/shards/cc3m \\
            --limit 500000 --seed 0 --image-size 512

or directly, ``python -m jobs.ingest ...``, which connects to ``--ray-address`` (default:
$RAY_ADDRESS) or starts a local Ray instance. ``--input`` takes several files, globs and
brace patterns, ``--input`` and ``--output`` local paths or URLs (``s3://bucket/laion/part-*.parquet``).
Writes into ``--output``: the shards
(``00000.tar`` + ``00000.parquet`` + ``00000_stats.json`` ...), ``manifest.parquet``,
``urls.parquet`` (the URL table that was sharded), ``ingest_config.json``,
``ingest_summary.json`` and ``ingest_attempts.json`` (attempts per shard, across runs). Re-running the same command completes the missing shards.
Exit status: 0 when every shard is done, 1 when some failed after retries (re-run to
retry them), 2 on a usage or input error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from jobs._cli import parse, print_path_error, ray_session, resolve_paths

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before img2dataset imports albumentations

import pyarrow as pa  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline import ingest, sources, storage  # noqa: E402
from pipeline.outputs import write_json  # noqa: E402
from schemas import URL_TABLE, read_table, write_table  # noqa: E402

WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations would call home from every worker
    # Ray starts workers at nice 15; the download tasks run at 0, like img2dataset's own processes
    # and Ray's job supervisor, so that other work on a busy node does not starve them
    "RAY_worker_niceness": "0",
}


@dataclass
class IngestConfig:
    """Everything one ingestion run depends on; saved as ``<output>/ingest_config.json``."""

    source: Literal[sources.SOURCES]
    """Format of --input: cc3m | cc12m (tsv or csv), coco (captions json), laion (parquet; also DataComp's), openimages (narratives jsonl)."""
    input: list[str]
    """The URL list(s): files, globs or brace patterns ('s3://b/laion/part-*.parquet', 'part-{00000..00127}.parquet'), local or URLs."""
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """Folder or bucket prefix for shards, manifest and URL table; re-running on it completes missing shards."""
    url_col: str | None = None
    """The URL column of a tsv / csv / parquet list whose name differs (a header name; a 0-based number for a list without header)."""
    caption_col: str | None = None
    """The caption column of a tsv / csv / parquet list whose name differs (as --url-col)."""
    split: str = "train"
    """Written into the split column of every row (and each sample's json)."""
    limit: int | None = None
    """Keep at most this many URLs (after filtering), chosen reproducibly from --seed."""
    fraction: float | None = None
    """Keep about this share of the URLs (after filtering, before --limit), chosen from --seed."""
    seed: int = 0
    """Seed of the --limit / --fraction selection: the same seed selects the same keys."""
    images_dir: str | None = None
    """coco only: pack the images of this local folder (file_name of each image) instead of downloading."""
    url_map: str | None = None
    """openimages only: csv with ImageID and OriginalURL columns mapping image ids to URLs."""
    blocklist: str | None = None
    """File of host / URL patterns never to download, one per line, added to the default (.onion hosts)."""
    min_width: int = 0
    """laion only: drop rows whose WIDTH is known and smaller."""
    min_height: int = 0
    """laion only: drop rows whose HEIGHT is known and smaller."""
    min_similarity: float = 0.0
    """laion only: drop rows whose CLIP similarity is below this."""
    image_size: int = 256
    """Target image size in pixels, applied according to --resize-mode."""
    resize_mode: Literal[ingest.RESIZE_MODES] = "keep_ratio"
    """img2dataset resize mode: keep_ratio (smaller side = size) | center_crop | border | keep_ratio_largest | no."""
    processes: int = 0
    """Shards downloaded at once, one Ray task (1 CPU) each; 0: every CPU of the Ray cluster."""
    threads: int = 32
    """Download threads inside each shard task."""
    samples_per_shard: int = 1000
    """URL rows per shard (a shard holds the successes among them)."""
    timeout: int = 10
    """Seconds before one image download is given up (counted as timeout)."""
    max_shard_retries: int = 2
    """Times a failed shard is retried before the run gives up on it (a re-run tries again)."""
    retries: int = 2
    """Times one download is retried after a transient failure (timeout, connection_error, http_429, http_5xx), with backoff; never after another (404, not an image)."""
    retry_backoff: float = 1.0
    """Seconds before the first retry of a download, doubling each time (a server's Retry-After wins; at most 60)."""
    retry_failed: list[str] = dataclasses.field(default_factory=list)
    """Download again the failed rows of done shards whose reason is listed (e.g. timeout connection_error http_5xx http_429), into new shards."""
    max_image_area: int = ingest.DEFAULT_MAX_IMAGE_AREA
    """Largest width x height decoded; a larger image (a decompression bomb) is refused, counted as image_area_too_large."""
    max_image_bytes: int = ingest.DEFAULT_MAX_IMAGE_BYTES
    """Largest body downloaded; a longer one is refused, counted as file_too_large."""
    user_agent_token: str | None = None
    """Token added to the User-Agent (e.g. img2dataset); X-Robots-Tag lines addressed to it apply."""
    disallowed_header_directives: list[str] = dataclasses.field(default_factory=lambda: list(ingest.X_ROBOTS_DIRECTIVES))
    """X-Robots-Tag directives that skip an image (counted as disallowed_by_robots); give none to honour none."""
    address: Annotated[str | None, tyro.conf.arg(aliases=("--ray-address",))] = None
    """Ray cluster to join; default: $RAY_ADDRESS (set by ray job submit), else a new local instance."""

    def __post_init__(self):
        self.input = [self.input] if isinstance(self.input, str) else list(self.input)
        if not self.input:
            raise ValueError("--input: give at least one file, glob or brace pattern")
        if (self.url_col or self.caption_col) and self.source not in ("cc3m", "cc12m", "laion"):
            raise ValueError("--url-col / --caption-col apply to tsv / csv (cc3m, cc12m) and parquet (laion) lists")
        if self.source not in sources.SOURCES:
            raise ValueError(f"--source {self.source!r}: expected one of {', '.join(sources.SOURCES)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.images_dir is not None and self.source != "coco":
            raise ValueError("--images-dir is for --source coco (pack a local COCO images folder)")
        if (self.url_map is None) != (self.source != "openimages"):
            raise ValueError("--url-map (ImageID -> OriginalURL csv) is required by, and only by, --source openimages")
        if self.source != "laion" and (self.min_width or self.min_height or self.min_similarity):
            raise ValueError("--min-width / --min-height / --min-similarity apply to --source laion only")
        if min(self.min_width, self.min_height) < 0 or self.min_similarity < 0:
            raise ValueError("--min-width / --min-height / --min-similarity must be >= 0")
        if self.processes < 0 or self.max_shard_retries < 0:
            raise ValueError("--processes and --max-shard-retries must be >= 0")
        if not self.split or "/" in self.split:
            raise ValueError(f"--split {self.split!r}: a plain name such as train or val")
        ingest.check_reasons(self.retry_failed)
        self.shard_settings()  # checks image size, resize mode, threads, shard size, timeout

    def shard_settings(self) -> ingest.ShardSettings:
        return ingest.ShardSettings(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            samples_per_shard=self.samples_per_shard,
            threads=self.threads,
            timeout=self.timeout,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            max_image_area=self.max_image_area,
            max_image_bytes=self.max_image_bytes,
            user_agent_token=self.user_agent_token,
            disallowed_header_directives=tuple(self.disallowed_header_directives),
        )

    def paths(self) -> dict[str, str]:
        """The path options that are set, by flag."""
        names = ("output", "images_dir", "url_map", "blocklist")
        found = {f"--{n.replace('_', '-')}": getattr(self, n) for n in names if getattr(self, n) is not None}
        return {"--input": " ".join(self.input), **found}


# fields that decide which rows go into which shard and how they look: a re-run must keep them
DATASET_FIELDS = (
    "source", "input", "url_col", "caption_col", "split", "limit", "fraction", "seed", "images_dir", "url_map",
    "blocklist", "min_width", "min_height", "min_similarity", "image_size", "resize_mode", "samples_per_shard",
)  # fmt: skip


def check_paths(cfg: IngestConfig) -> list[str]:
    """The input files; absolute paths, and clear errors for paths the job cannot use (they are resolved where the job runs)."""
    names = ("input", "output", "images_dir", "url_map", "blocklist")
    resolve_paths(cfg, names)
    for path in [*cfg.input, cfg.output, cfg.url_map, cfg.blocklist]:
        if path is not None:
            storage.check_reachable(path)
    try:
        files = storage.expand(cfg.input, what="file")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--input {err}") from None
    for flag, path in cfg.paths().items():
        if flag not in ("--output", "--input") and not storage.exists(path):
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if cfg.images_dir is not None and not os.path.isdir(cfg.images_dir):
        raise FileNotFoundError(f"--images-dir {cfg.images_dir}: not a folder (a local folder of every Ray node)")
    return files


def read_source(cfg: IngestConfig, files: list[str]) -> sources.SourceRows:
    def read_one(path: str, part: str | None) -> sources.SourceRows:
        if cfg.source in ("cc3m", "cc12m"):
            return sources.read_tsv(path, cfg.split, source=cfg.source, url_col=cfg.url_col, caption_col=cfg.caption_col, part=part)
        if cfg.source == "coco":
            return sources.read_coco(path, cfg.split, images_dir=cfg.images_dir, part=part)
        if cfg.source == "laion":
            return sources.read_laion(path, cfg.split, cfg.min_width, cfg.min_height, cfg.min_similarity, cfg.url_col, cfg.caption_col, part=part)
        return sources.read_openimages(path, cfg.url_map, cfg.split, part=part)

    return sources.read_many(files, read_one)


def check_resume(cfg: IngestConfig, urls: pa.Table) -> None:
    """A re-run must describe the same shards as the run that wrote the output."""
    config_path = storage.join(cfg.output, "ingest_config.json")
    if not storage.exists(config_path) and ingest.done_shards(cfg.output):
        raise ValueError(f"{cfg.output} holds shards that jobs.ingest did not write (no ingest_config.json): use a new --output")
    if storage.exists(config_path):
        before = storage.read_json(config_path)
        if isinstance(before.get("input"), str):  # written when --input took one file
            before["input"] = [before["input"]]
        changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {getattr(cfg, k)!r}" for k in DATASET_FIELDS if before.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(
                f"{cfg.output} holds an ingestion made with other settings ({'; '.join(changed)}): "
                "use a new --output, or delete this one to start over"
            )
    urls_path = storage.join(cfg.output, "urls.parquet")
    if storage.exists(urls_path):
        before = read_table(urls_path, URL_TABLE)
        same = before.num_rows == urls.num_rows and all(before.column(c).equals(urls.column(c)) for c in ("key", "url"))
        if not same:
            raise ValueError(
                f"{cfg.input} now gives a different URL table ({urls.num_rows} rows) than the one the shards in "
                f"{cfg.output} were made from ({urls_path}, {before.num_rows} rows): the input changed; "
                "use a new --output"
            )


def run(cfg: IngestConfig, files: list[str]) -> int:
    storage.makedirs(cfg.output)
    with ingest.output_lock(cfg.output):
        t0 = time.time()
        rows = read_source(cfg, files)
        for note in rows.notes:
            print(f"note: {note}", flush=True)
        local_root = cfg.images_dir
        blocklist = sources.Blocklist.from_file(cfg.blocklist)
        filtered = sources.filter_urls(rows.table, blocklist, local_root=local_root)
        urls = sources.select_subset(filtered.table, cfg.limit, cfg.fraction, cfg.seed)
        print(
            f"read {rows.rows_read} input rows -> {rows.table.num_rows} urls, {filtered.table.num_rows} after filters, "
            f"{urls.num_rows} selected ({time.time() - t0:.1f} s); blocklist: {', '.join(blocklist.patterns())}",
            flush=True,
        )
        check_resume(cfg, urls)
        write_table(urls, storage.join(cfg.output, "urls.parquet"), URL_TABLE)
        write_json(storage.join(cfg.output, "ingest_config.json"), dataclasses.asdict(cfg))

        bar = tqdm(total=urls.num_rows, unit="img", desc="ingest", mininterval=1.0 if sys.stderr.isatty() else 10.0)

        def progress(p: ingest.Progress) -> None:
            bar.total = p.samples_total  # a retry round adds rows
            bar.set_description(f"shards {p.shards_done}/{p.shards_total}", refresh=False)
            bar.set_postfix(ok=p.successes, refresh=False)
            bar.update(p.samples_done - bar.n)  # prints at most every mininterval

        import ray

        # joined to the caller's Ray: the download tasks take the worker env per task; else the job's runtime env has it
        task_env = dict(WORKER_ENV) if ray.is_initialized() else None
        try:
            with ray_session(cfg.address, env_vars=WORKER_ENV, num_cpus=cfg.processes or None):
                result = ingest.run_ingest(
                    urls,
                    cfg.output,
                    cfg.shard_settings(),
                    processes=cfg.processes,
                    max_shard_retries=cfg.max_shard_retries,
                    local_root=local_root,
                    worker_env=task_env,
                    progress=progress,
                    retry_failed=cfg.retry_failed,
                )
        finally:
            bar.close()
        summary = ingest.summarize(
            source=cfg.source,
            input_path=" ".join(cfg.input) if len(files) == 1 else f"{' '.join(cfg.input)} ({len(files)} files)",
            output=cfg.output,
            rows_read=rows.rows_read,
            url_rows=rows.table.num_rows,
            skipped=rows.skipped,
            filtered=filtered.dropped,
            examples={**rows.examples, **filtered.examples},
            selected=urls.num_rows,
            result=result,
        )
        write_json(storage.join(cfg.output, "ingest_summary.json"), summary)
        print(ingest.format_summary(summary), flush=True)
        if result.shards_failed:
            print(f"{len(result.shards_failed)} shard(s) failed after {cfg.max_shard_retries} retries: re-run the same command to retry them", file=sys.stderr)
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse(IngestConfig, argv, prog="python -m jobs.ingest", description=__doc__)
    print("ingest config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
    try:
        files = check_paths(cfg)
    except (FileNotFoundError, storage.StorageError) as e:
        print_path_error(e)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(cfg, files)
    except (FileNotFoundError, ValueError, ingest.OutputBusyError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
