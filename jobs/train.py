"""Train NxTP with DeepSpeed ZeRO, through the ``deepspeed`` launcher.

    deepspeed --num_gpus 8 jobs/train.py --config jobs/configs/g3m.yaml --deepspeed jobs/configs/zero2.json
    deepspeed --num_gpus 2 jobs/train.py --config jobs/configs/demo.yaml --deepspeed jobs/configs/zero2.json  # CPU works too

Several nodes (every node sees the same paths: shards and labels on shared storage or a
bucket, the run folder on a shared file system). With ssh, the launcher starts every node's
ranks from the first node; ``hosts`` lists each node and its GPUs (``node1 slots=8``):

    deepspeed --hostfile hosts --master_addr node1 --master_port 29500 jobs/train.py --config jobs/configs/g3m.yaml --deepspeed jobs/configs/zero3.json

Without ssh (a scheduler starts one launcher per node: Kubernetes, a Slurm step per node), the
same command on every node with the same hostfile and that node's ``--node_rank``:

    deepspeed --hostfile hosts --no_ssh --node_rank 0 --master_addr node1 --master_port 29500 jobs/train.py ...  # on node1
    deepspeed --hostfile hosts --no_ssh --node_rank 1 --master_addr node1 --master_port 29500 jobs/train.py ...  # on node2

Every field of ``TrainConfig`` is a flag (``--lr 3e-5``); flags override the YAML preset.
The run folder gets ``train_config.json``, ``ds_config.json`` (the DeepSpeed JSON as filled),
DeepSpeed checkpoints (``checkpoints/step<N>``, each with ``run_state.json``; a re-run of the
same command resumes from the latest, ``--resume`` says otherwise, on any number of ranks:
pipeline/resume.py), ``metrics.jsonl``, TensorBoard events, ``loss.png`` and, at the end, the
exported model (``export/``) that ``jobs.infer`` and ``jobs.evaluate`` load. The DeepSpeed
JSON's "auto" values are filled from this config as the Hugging Face Trainer fills them
(pipeline/ds_config.py); explicit values that contradict the config are errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from jobs._cli import parse
from pipeline import storage
from pipeline.ds_config import PRECISIONS, DeepSpeedConfigError, gradient_accumulation
from pipeline.loader import DatasetSpec, Mixture, batch_composition, parse_weight, resolve_mixture
from pipeline.outputs import write_json
from pipeline.tracking import check_reporters

DATA_FLAG = "NAME=SHARDS,LABELS[,WEIGHT[,BATCH]]"


def _split_outside_braces(text: str) -> list[str]:
    """``text`` split on the commas that are not inside ``{...}`` (a brace pattern's alternatives stay whole)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _dataset(args: list[str]) -> DatasetSpec:
    """One --data value; an empty WEIGHT is the default 1 (``coco=SHARDS,LABELS,,8``: a batch size, no weight).
    Commas inside a brace pattern (``/shards/{00000,00003}.tar``) belong to the pattern."""
    (spec,) = args
    name, _, rest = spec.partition("=")
    parts = _split_outside_braces(rest)
    if not name or len(parts) not in (2, 3, 4) or not all(parts[:2]):
        raise ValueError(f"--data {spec!r}: expected {DATA_FLAG}")
    weight = parse_weight(parts[2]) if len(parts) > 2 and parts[2].strip() else 1.0
    batch = None
    if len(parts) == 4:
        try:
            batch = int(parts[3])
        except ValueError:
            raise ValueError(f"--data {spec!r}: BATCH {parts[3]!r} is not a whole number (samples of {name} in each micro-batch)") from None
    return DatasetSpec(name, parts[0], parts[1], weight, batch)


def _must_exist(path: str) -> str | None:
    """What must exist for a --data path to name anything: the path itself, or, for a glob or brace pattern, the
    folder holding its first component with a wildcard (``/data/cc3m/cc3m-{0000..0575}.tar`` and
    ``/data/cc3m/part-*.tar``: ``/data/cc3m``); None where the wildcard is in a bucket's name (left to find_shards,
    which names what is missing)."""
    wildcard = re.search(r"[*?\[{]", path)
    if wildcard is None:
        return path.rstrip("/") or "/"
    folder, slash, _ = path[: wildcard.start()].rpartition("/")
    if not slash:
        return "."  # a relative pattern in the working folder
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:/*", folder):  # s3://bucket-* (file:///x-*: the root)
        return "/" if folder.startswith("file:") else None
    return folder or "/"


def _dataset_str(d: DatasetSpec) -> list[str]:
    return [f"{d.name}={d.shards},{d.labels},{d.weight}" + (f",{d.batch_size}" if d.batch_size is not None else "")]


# one flag per dataset: --data NAME=SHARDS,LABELS[,WEIGHT[,BATCH]], repeatable
DatasetFlag = Annotated[
    DatasetSpec,
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1,
        metavar=DATA_FLAG,
        instance_from_str=_dataset,
        is_instance=lambda x: isinstance(x, DatasetSpec),
        str_from_instance=_dataset_str,
    ),
]


def _batch_sizes(args: list[str]) -> dict[str, int]:
    out = {}
    for arg in args:
        name, eq, size = arg.partition("=")
        try:
            out[name] = int(size)
        except ValueError:
            raise ValueError(f"--batch-sizes {arg!r}: expected NAME=N, N a whole number (samples of NAME in each micro-batch)") from None
        if not name or not eq:
            raise ValueError(f"--batch-sizes {arg!r}: expected NAME=N")
    return out


# --batch-sizes coco=8 lvis=16
BatchSizesFlag = Annotated[
    dict[str, int],
    tyro.constructors.PrimitiveConstructorSpec(
        nargs="*",
        metavar="NAME=N [NAME=N ...]",
        instance_from_str=_batch_sizes,
        is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda d: [f"{k}={v}" for k, v in d.items()],
    ),
]


@dataclass
class TrainConfig:
    deepspeed: str
    """DeepSpeed JSON config (jobs/configs/zero2.json, zero3.json, zero2_offload.json); its "auto" values are filled from this config"""
    config: str | None = None
    """YAML preset (jobs/configs/*.yaml) whose values are the defaults; flags override them (a --data flag replaces the preset's datasets)"""
    run_dir: str = "runs/demo"
    """folder for checkpoints, logs, TensorBoard events and the exported model: a POSIX path (local disk or a shared file system), DeepSpeed's checkpoints need one"""
    export_to: str | None = None
    """also copy the exported model here at the end, published whole: a URL (s3://bucket/models/g3m) or a path"""
    data: Annotated[list[DatasetFlag], tyro.conf.UseAppendAction] = field(default_factory=list)
    """a dataset: its name, shards (folder, glob or brace pattern, local or a URL), labels folder (jobs.labels output), mixture weight (a number, or auto: proportional to the samples ingested, read from the shards' manifest; may be left empty) and optionally its batch size (see batch_sizes)"""
    batch_sizes: BatchSizesFlag = field(default_factory=dict)
    """per-dataset batch sizes (OSM's --batch_size_coco 8 --batch_size_lvis 16), name -> samples of that dataset in every micro-batch of every rank, for every dataset or none; they sum to batch_size, and replace the weights (which must be left out); also the 4th part of --data"""
    model: str = "tiny"
    """tiny (random, sized for the synthetic world), pretrained (CLIP + LLaMA from local files), or an exported model folder to continue from"""
    tokenizer: str | None = None
    """SentencePiece model: LLaMA-2's tokenizer.model, or the synthetic world's for tiny"""
    clip_weights: str | None = None
    """pretrained: local CLIP weights (OpenAI .pt or open_clip file); without them the ViT is random"""
    vision: str = "ViT-L-14"
    """pretrained: open_clip ViT name"""
    llama: str | None = None
    """pretrained: Hugging Face LLaMA folder, or Meta's params.json beside consolidated.*.pth"""
    decoder_layers: int = 6
    """pretrained: decoder blocks kept"""
    image_size: int = 224
    """input resolution"""
    patch_size: int = 16
    """tiny: the ViT's patch size in pixels"""
    train_vision_blocks: int = 6
    """last ViT blocks that train, with ln_post (the projection always trains); -1: the whole ViT"""
    train_embeddings: Literal["special", "all", "none"] = "special"
    """token embeddings that train: special (the <|image|> and pad rows), all, none"""
    lr: float = 1e-5
    """peak learning rate (AdamW, betas 0.9/0.98, eps 1e-6; fused on CUDA)"""
    min_lr: float = 0.0
    """learning rate at the end of the cosine decay"""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only"""
    warmup_steps: int = 2000
    """linear warmup steps"""
    grad_clip: float = 0.0
    """gradient norm clipping (0: off)"""
    batch_size: int = 16
    """micro-batch per GPU (per rank on CPU)"""
    global_batch: int = 0
    """samples per optimizer step over all ranks (the paper: 512); gradient accumulation = global_batch / (batch_size x world size), which must divide; 0: batch_size x grad_accum x world size"""
    grad_accum: int = 1
    """gradient accumulation steps, when global_batch is 0"""
    epochs: float = 3.0
    """passes over samples_per_epoch samples (ignored when steps > 0)"""
    samples_per_epoch: int = 0
    """samples in one epoch of the mixture (the data is resampled, so this sets the length); 0: the datasets' ingested samples summed (their manifests)"""
    steps: int = 0
    """optimizer steps in all; 0: epochs x ceil(samples_per_epoch / global batch)"""
    save_every: int = 1000
    """DeepSpeed checkpoint every N steps (and at the end, with export)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept on disk (0: keep all)"""
    log_every: int = 10
    """steps between metric lines (metrics.jsonl, TensorBoard, W&B)"""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """where the metrics also go: tensorboard (<run_dir>/tensorboard), wandb (a W&B run in <run_dir>/wandb), both, or none"""
    wandb_project: str = "nxtp"
    """W&B project of the run (--report-to wandb)"""
    wandb_mode: Literal["online", "offline"] | None = None
    """W&B mode; default: W&B's own setting ($WANDB_MODE, else online after `wandb login`)"""
    num_workers: int = 4
    """data-loader worker processes per rank"""
    shuffle_buffer: int = 1000
    """samples in each worker's shuffle buffer"""
    max_text_len: int = 64
    """text tokens per sample (prompt + labels), longer ones are cut"""
    prompt_augmentation: bool = True
    """draw one of the paper's 10 prompt templates per sample"""
    caption_weight: float = 0.0
    """weight of the optional caption loss (0: off, as in the G3M recipe)"""
    caption_fraction: float = 1.0
    """share of each batch's samples (its first ones) that also train the caption branch; less makes a step cheaper"""
    protocol: Literal["nxtp", "reference"] = "nxtp"
    """nxtp: this project's training mask; reference: the released code's (the last label sees only the prefix; see the README)"""
    seed: int = 42
    """seed of weights and data order"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto (bf16 on a GPU that has it, fp16 on older GPUs, fp32 on CPU), bf16, fp16 (DeepSpeed's dynamic loss scaling) or fp32"""
    export: bool = True
    """at the end, save the last checkpoint and write export/ (false: neither, e.g. for benchmarks)"""
    activation_checkpointing: bool = False
    """recompute the ViT's and decoder's block activations in the backward (less memory, about a third more compute)"""
    compile: bool = False
    """torch.compile each ViT and decoder block (compiles at the first steps)"""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in run_dir/checkpoints, if any; never: start fresh (refused when run_dir holds checkpoints); or a checkpoint folder (checkpoints/step800, or a checkpoints folder with a latest file, e.g. another run's). On another number of ranks the checkpoint is converted to a universal one and the run continues by samples seen"""

    def __post_init__(self):
        self.report_to = list(check_reporters(self.report_to))
        self.data = [d if isinstance(d, DatasetSpec) else DatasetSpec(**d) for d in self.data]
        for d in self.data:
            d.weight = parse_weight(d.weight)
        if not self.data:
            raise ValueError(f"no datasets: give --data {DATA_FLAG} or a data: list in the YAML")
        self._merge_batch_sizes()
        if self.export_to and not self.export:
            raise ValueError(f"--export-to {self.export_to} with --no-export: nothing would be exported there; give one of them")
        for d in self.data:
            for path in (d.shards, d.labels):
                folder = _must_exist(path)  # a pattern's files are found (or named missing) by find_shards
                try:
                    storage.check_reachable(path)  # no credentials, no bucket, no access: said as such
                    with storage.reported(path):
                        found = folder is None or storage.exists(folder)
                except storage.StorageError as err:  # a usage error like the others here (exit 2)
                    raise ValueError(f"dataset {d.name}: {err}") from err
                if not found:
                    what = path if folder == (path.rstrip("/") or "/") else f"{path}: its folder {folder}"
                    raise ValueError(f"dataset {d.name}: {what} does not exist")
        if storage.is_url(self.run_dir):
            raise ValueError(f"run_dir {self.run_dir}: DeepSpeed checkpoints need a POSIX path (local or a shared file system); use --export-to for a URL")
        if self.model == "pretrained" and not self.llama:
            raise ValueError("model: pretrained needs llama: a Hugging Face folder or Meta params.json")
        if self.model in ("tiny", "pretrained") and not self.tokenizer:
            raise ValueError(f"model: {self.model} needs tokenizer:")
        if self.model not in ("tiny", "pretrained") and not os.path.isdir(self.model):
            raise ValueError(f"model: {self.model!r} is neither tiny, pretrained nor an exported model folder")
        if self.train_embeddings not in ("special", "all", "none"):
            raise ValueError("train_embeddings must be special, all or none")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.steps <= 0 and self.epochs <= 0:
            raise ValueError("set steps, or epochs (over samples_per_epoch, default the datasets' ingested samples)")
        for name in ("batch_size", "grad_accum", "save_every", "log_every", "image_size", "patch_size", "decoder_layers", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("steps", "epochs", "samples_per_epoch", "warmup_steps", "weight_decay", "grad_clip", "caption_weight", "num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0: keep all), not {self.keep_checkpoints}")
        if self.train_vision_blocks < -1:
            raise ValueError(f"train_vision_blocks must be >= 0, or -1 for the whole ViT, not {self.train_vision_blocks}")
        if self.global_batch < 0:
            raise ValueError("global_batch must be >= 0 (0: batch_size x grad_accum x world size)")
        if self.global_batch and self.grad_accum != 1:
            raise ValueError(f"set global_batch ({self.global_batch}) or grad_accum ({self.grad_accum}), not both: accumulation follows from global_batch")
        if self.global_batch % self.batch_size:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of batch_size {self.batch_size}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0 (min_lr {self.min_lr}, lr {self.lr})")
        if self.resume not in ("auto", "never") and not os.path.isdir(self.resume):
            raise ValueError(f"resume: {self.resume!r} is neither auto, never nor a checkpoint folder")
        if not 0 < self.caption_fraction <= 1:
            raise ValueError(f"caption_fraction must be in (0, 1], not {self.caption_fraction}")
        batch_composition(self.data, self.batch_size)

    def _merge_batch_sizes(self) -> None:
        """batch_sizes into the datasets (their own batch_size, from --data or the YAML's data list), then
        batch_sizes lists them all: one composition however it was written."""
        names = [d.name for d in self.data]
        unknown = sorted(set(self.batch_sizes) - set(names))
        if unknown:
            raise ValueError(f"batch_sizes names {', '.join(unknown)}, not among the datasets ({', '.join(names)})")
        for d in self.data:
            given = self.batch_sizes.get(d.name)
            if given is not None and d.batch_size is not None and given != d.batch_size:
                raise ValueError(f"dataset {d.name}: batch size {d.batch_size} in its --data (or data: entry) but {given} in batch_sizes")
            if given is not None:
                d.batch_size = given
        self.batch_sizes = {d.name: d.batch_size for d in self.data if d.batch_size is not None}

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on ``world_size`` ranks."""
        if not self.global_batch:
            return self.grad_accum
        return gradient_accumulation(self.global_batch, self.batch_size, world_size)

    def total_steps(self, world_size: int) -> int:
        """steps, or epochs x steps per epoch, an epoch ending with its partial last batch (as the
        reference's loader: 3 x ceil(3,645,221 / 512) = 21,360 steps for G3M)."""
        if self.steps > 0:
            return self.steps
        if self.samples_per_epoch <= 0:
            raise ValueError("samples_per_epoch is not known yet: resolve the mixture first (pipeline.loader.resolve_mixture)")
        global_batch = self.batch_size * self.gradient_accumulation(world_size) * world_size
        return math.ceil(self.epochs * math.ceil(self.samples_per_epoch / global_batch))

    def warmup_warning(self, world_size: int, own_schedule: bool = True) -> str | None:
        """A warning when the warmup does not end before the run does (``warmup_steps`` >= its steps): the learning
        rate never reaches ``lr`` and never decays. Not refused: a short debug run is legitimate. None otherwise, and
        where the steps are not known (a global batch the world size does not divide: the trainer says so).
        ``own_schedule``: the config's linear warmup (False: a DeepSpeed JSON scheduler block, whose warmup differs)."""
        try:
            total = self.total_steps(world_size)
        except (DeepSpeedConfigError, ValueError):
            return None
        if self.warmup_steps < total or total <= 0:
            return None
        last = self.lr * (total - 1) / self.warmup_steps  # the last update's lr (the warmup's lr x s / warmup_steps)
        reached = f" (the last update's is {last:.3g})" if own_schedule else ""
        return (
            f"warning: warmup_steps {self.warmup_steps} >= the run's {total} steps: the warmup is not finished by step {total}, so "
            f"the learning rate never reaches lr {self.lr:g}{reached} and never decays; fine for a short debug run, otherwise "
            "lower --warmup-steps or train longer"
        )

    def check_inputs(self) -> None:
        """Raise FileNotFoundError (or storage.StorageError) for an input the run would fail on only after the
        model is built: a tokenizer, LLaMA or CLIP file that is not there, a labels folder without label tables
        (not a jobs.labels output) or, on object storage, one without its _SUCCESS marker."""
        from pipeline.outputs import require_published

        local = {"tokenizer": self.tokenizer} if self.model in ("tiny", "pretrained") else {}
        if self.model == "pretrained":
            local |= {"llama": self.llama, "clip_weights": self.clip_weights}
        for name, path in local.items():
            if path and not (os.path.isfile(path) or (name == "llama" and os.path.isdir(path))):
                raise FileNotFoundError(f"{name} {path}: no such file" + (" (a local file)" if storage.is_url(path) else ""))
        for d in self.data:
            with storage.reported(d.labels):
                require_published(d.labels, "labels output")  # on object storage: only a whole one
                if not storage.isdir(storage.join(d.labels, "labels")):
                    raise FileNotFoundError(f"dataset {d.name}: no label tables in {d.labels}/labels (not a jobs.labels output: run jobs.labels)")

    def resolve_data(self) -> Mixture:
        """Auto weights and an auto epoch length from the datasets' manifests, in place; the mixture."""
        mixture = resolve_mixture(self.data, self.samples_per_epoch if self.steps <= 0 else None)
        self.data = mixture.datasets
        if self.steps <= 0:
            self.samples_per_epoch = mixture.samples_per_epoch
        return mixture


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, dict]:
    """The config from flags over the preset (``--local_rank``, which the launcher adds, is dropped), and the DeepSpeed JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for i, a in enumerate(args) if not (a.startswith(("--local_rank", "--local-rank")) or (i and args[i - 1] in ("--local_rank", "--local-rank")))]
    cfg = parse(TrainConfig, args, prog="deepspeed jobs/train.py", description=__doc__)
    return cfg, _read_deepspeed_json(cfg.deepspeed)


def _read_deepspeed_json(path: str) -> dict:
    """The DeepSpeed JSON at ``path`` (a local file); a usage error (exit 2) when it is missing or not a JSON object."""
    problem = None
    try:
        with open(path) as fh:
            value = json.load(fh)
    except FileNotFoundError:
        problem = "no such file"
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = f"not a JSON file ({err})"
    else:
        if not isinstance(value, dict):
            problem = f"not a DeepSpeed config (a JSON object), but a JSON {type(value).__name__}"
    if problem:
        print(f"error: --deepspeed {path}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return value


def _release_shm_names() -> None:
    """On a CPU, DeepSpeed's all-reduce maps one shared-memory segment per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, 66 MB) and never
    unlinks it, so every run, finished or killed, would leave them behind. Once every rank is past
    ``init_distributed`` each has mapped all the segments: the names can go, the mappings stay
    until the processes end."""
    import torch
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}"
    try:
        os.remove(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    cfg, ds_raw = parse_args(argv)
    if cfg.export_to:
        from pipeline.training import check_export_to

        try:
            check_export_to(cfg.export_to)  # before hours of training, not after
        except (OSError, ValueError) as err:
            print(f"error: --export-to {err}", file=sys.stderr)
            return 2
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import deepspeed
    import torch
    from tqdm import tqdm

    from pipeline.resume import ResumeError
    from pipeline.tracking import RunLog
    from pipeline.training import Trainer

    deepspeed.init_distributed()
    _release_shm_names()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # ranks on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:  # ranks share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        cfg.check_inputs()  # before the model is built and anything is written to the run folder
        mixture = cfg.resolve_data()  # every rank reads the same manifests: the same weights everywhere
    except (FileNotFoundError, ValueError, storage.StorageError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        torch.distributed.destroy_process_group()
        return 2
    bar = board = None
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        print("mixture:\n  " + "\n  ".join(mixture.describe(world))
              + (f"\n  an epoch: {cfg.samples_per_epoch:,} samples" if cfg.steps <= 0 else ""), flush=True)  # fmt: skip
        print(f"train config: {json.dumps(dataclasses.asdict(cfg), indent=2)}", flush=True)
        warning = cfg.warmup_warning(world, own_schedule="scheduler" not in ds_raw)
        if warning:
            print(warning, flush=True)

    def on_start(info: dict) -> None:
        nonlocal bar, board
        if rank == 0:  # the run goes ahead (a refused resume leaves the folder as it was)
            write_json(os.path.join(cfg.run_dir, "train_config.json"), dataclasses.asdict(cfg))
            ds = info.pop("deepspeed_config")
            print(f"deepspeed config (filled): {json.dumps(ds, indent=2)}", flush=True)
            write_json(os.path.join(cfg.run_dir, "ds_config.json"), ds)
            print(json.dumps(info, indent=2), flush=True)
            bar = tqdm(total=info["total_steps"], initial=info["start_step"], desc="train", unit="step", dynamic_ncols=True)
            board = RunLog(cfg.run_dir, cfg.report_to, config=dataclasses.asdict(cfg), project=cfg.wandb_project,
                           wandb_mode=cfg.wandb_mode, purge_from=info["start_step"] + 1)  # fmt: skip

    def on_step(m: dict) -> None:
        if bar is not None:
            bar.update(m["step"] - bar.n)
            if m["logged"]:
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", samples_s=f"{m['samples_per_s']:.1f}", wait=f"{m['data_wait']:.0%}", refresh=False)
        if board is not None and m["logged"]:
            keys = ("loss", "lr", "samples_per_s", "tokens_per_s", "data_wait", "loss_scale")
            board.scalars({key: v for key, v in m.items() if key in keys or key.startswith("loss/")}, m["step"])

    def on_message(text: str) -> None:
        if rank == 0:
            (bar.write if bar is not None else print)(text)

    trainer = Trainer(cfg, ds_raw, on_start, on_step, on_message, ranks_per_node=local_world)
    try:
        trainer.run()
    except (DeepSpeedConfigError, ResumeError) as err:  # the same on every rank: said once
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
