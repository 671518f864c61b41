"""Training pieces the job assembles: what trains, optimizer groups, the schedule, logs, checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

import torch
from torch import nn

from model.nxtp import NxTP
from model.prompt import IGNORE
from pipeline.outputs import atomic_file

EMBEDDING_TABLES = ("decoder.embed.base.weight", "decoder.embed.special", "vision.vit.positional_embedding")


def apply_freezing(model: NxTP, vision_blocks: int, embeddings: str) -> dict[str, int]:
    """Set ``requires_grad`` as the paper's recipe; returns trainable / frozen parameter counts.

    vision_blocks: the last N ViT blocks train, with ``ln_post`` (-1: the whole ViT); the
    token projection always trains. The decoder's blocks, final norm and output layer train.
    embeddings: ``special`` (only the ``<|image|>`` and pad rows), ``all`` or ``none``.
    """
    if embeddings not in ("special", "all", "none"):
        raise ValueError(f"embeddings must be special, all or none, not {embeddings!r}")
    for p in model.parameters():
        p.requires_grad = False
    vit = model.vision.vit
    blocks = vit.transformer.resblocks
    if vision_blocks < 0 or vision_blocks >= len(blocks):
        trainable: list[nn.Module | nn.Parameter] = [vit]
    else:
        trainable = [*blocks[len(blocks) - vision_blocks :], vit.ln_post]
    trainable += [model.vision.proj, model.decoder.layers, model.decoder.norm, model.decoder.lm_head]
    if embeddings in ("special", "all"):
        trainable.append(model.decoder.embed.special)
    if embeddings == "all":
        trainable.append(model.decoder.embed.base)
    for item in trainable:
        for p in [item] if isinstance(item, nn.Parameter) else item.parameters():
            p.requires_grad = True
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": n_train, "frozen": sum(p.numel() for p in model.parameters()) - n_train}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on trainable matrices only (not norms, biases or embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in EMBEDDING_TABLES else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine decay to ``min_ratio`` of the peak at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoint_tags(save_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints in ``save_dir``, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = [(int(m.group(1)), d) for d in os.listdir(save_dir) if (m := re.fullmatch(r"step(\d+)", d))]
    return sorted(tags)


def latest_tag(save_dir: str) -> str | None:
    """The tag DeepSpeed recorded as complete (its ``latest`` file is written after the save)."""
    path = os.path.join(save_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(save_dir, tag)) else None


def prune_checkpoints(save_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    latest = latest_tag(save_dir)
    removed = []
    for _, tag in checkpoint_tags(save_dir)[:-keep] if keep > 0 else []:
        if tag != latest:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
            removed.append(tag)
    return removed


class MetricsLog:
    """One JSON line per logged step in ``<run>/metrics.jsonl``; truncated on resume."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        rows = self.read(path)
        kept = [r for r in rows if r["step"] <= resume_step]
        if len(kept) != len(rows) or not os.path.exists(path):
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path: str) -> list[dict]:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, out_png: str) -> None:
    """The loss curve (and learning rate) of a run as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], label="lr", color="tab:orange", alpha=0.6)
    lr_ax.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "training")
    fig.tight_layout()
    with atomic_file(out_png) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def state_dict_from_checkpoint(save_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed ZeRO checkpoint (stage 1-3, frozen parameters included)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)


class Trainer:
    """The DeepSpeed training loop of ``jobs/train.py``; reports through callbacks.

    ``on_start(info)`` once (run facts), ``on_step(metrics)`` after every optimizer step
    (``metrics['logged']`` on the steps written to metrics.jsonl), ``on_message(text)``
    for notes. Call it on every rank after ``deepspeed.init_distributed()``.
    """

    def __init__(self, cfg, ds_config: dict, on_start=None, on_step=None, on_message=None):
        self.cfg, self.ds_config = cfg, ds_config
        self.on_start = on_start or (lambda info: None)
        self.on_step = on_step or (lambda m: None)
        self.on_message = on_message or (lambda text: None)
        self.save_dir = os.path.join(cfg.run_dir, "checkpoints")

    # -- building

    def _build_model(self):
        from model.checkpoint import build_from_pretrained, load_pretrained
        from model.config import tiny_config
        from model.tokenizer import Tokenizer

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.model == "tiny":
            tok = Tokenizer(cfg.tokenizer)
            model = NxTP(tiny_config(tok.n_base, image_size=cfg.image_size, patch_size=cfg.patch_size))
            model.init_weights()
        elif cfg.model == "pretrained":
            model, tok = build_from_pretrained(cfg.tokenizer, cfg.llama, cfg.decoder_layers, cfg.clip_weights, cfg.vision, cfg.image_size)
        else:
            model, tok = load_pretrained(cfg.model)
        if model.cfg.vision.image_size != cfg.image_size:
            raise ValueError(f"the model reads {model.cfg.vision.image_size}px images, the config says image_size {cfg.image_size}")
        return model.train(), tok

    def _data(self, start_step: int, rank: int):
        from pipeline.loader import TrainStream, train_loader

        cfg = self.cfg
        stream = TrainStream(
            cfg.data,
            self.tokenizer.path,
            cfg.image_size,
            cfg.batch_size,
            cfg.seed,
            rank=rank,
            start_step=start_step,
            max_text_len=min(cfg.max_text_len, self.model_cfg.decoder.max_seq_len - self.model_cfg.vision.n_tokens),
            prompt_augmentation=cfg.prompt_augmentation,
            caption_loss=cfg.caption_weight > 0,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        return iter(train_loader(stream, cfg.num_workers))

    # -- running

    def run(self) -> None:
        import deepspeed
        import torch.distributed as dist

        cfg = self.cfg
        rank, world = dist.get_rank(), dist.get_world_size()
        model, self.tokenizer = self._build_model()
        self.model_cfg = model.cfg
        counts = apply_freezing(model, cfg.train_vision_blocks, cfg.train_embeddings)
        if self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            from deepspeed.utils import set_z3_leaf_modules

            # nn.MultiheadAttention reads out_proj's weight without calling out_proj
            set_z3_leaf_modules(model, [nn.MultiheadAttention])
        total = cfg.total_steps(world)
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = lambda params: torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)  # noqa: E731
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_multiplier(s, cfg.warmup_steps, total, cfg.min_lr / cfg.lr)
        )
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
        step, stats = 0, {}
        tag = latest_tag(self.save_dir)
        if tag:
            _, client = engine.load_checkpoint(self.save_dir, tag)
            step = client["step"]
            stats = client.get("data_stats", {}) if rank == 0 else {}  # run-wide counters live on rank 0
            self.on_message(f"resumed from {os.path.join(self.save_dir, tag)} at step {step}")
        log = MetricsLog(os.path.join(cfg.run_dir, "metrics.jsonl"), step) if rank == 0 else None
        self.on_start(
            {
                "world_size": world,
                "device": str(engine.device),
                "bf16": engine.bfloat16_enabled(),
                "zero_stage": engine.zero_optimization_stage(),
                "parameters": counts,
                "global_batch": cfg.batch_size * cfg.grad_accum * world,
                "total_steps": total,
                "start_step": step,
            }
        )
        data = self._data(step, rank) if step < total else None
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        worker_stats: dict[int, dict] = {}
        while step < total:
            t0, wait, losses, tokens = time.perf_counter(), 0.0, [], 0
            for _ in range(cfg.grad_accum):
                tw = time.perf_counter()
                batch = next(data)
                wait += time.perf_counter() - tw
                ws = batch.pop("stats")
                worker_stats[ws.pop("worker")] = ws
                batch = {k: v.to(engine.device, dtype=dtype if k == "images" else None) for k, v in batch.items()}
                tokens += batch["images"].shape[0] * self.model_cfg.vision.n_tokens + int((batch["targets"] != IGNORE).sum())
                out = engine(**batch, caption_weight=cfg.caption_weight)
                engine.backward(out["loss"])
                engine.step()
                losses.append(out["loss"].detach().float())
            step += 1
            loss = torch.stack(losses).mean()
            dist.all_reduce(loss)
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": step,
                "loss": loss.item() / world,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": cfg.batch_size * cfg.grad_accum * world / elapsed,
                "tokens_per_s": tokens * world / elapsed,
                "data_wait": wait / elapsed,
                "step_seconds": elapsed,
                "logged": step % cfg.log_every == 0 or step == total,
            }
            if log is not None and metrics["logged"]:
                log.write({k: v for k, v in metrics.items() if k != "logged"} | {"data": _sum_stats(stats, worker_stats)})
            self.on_step(metrics)
            if step % cfg.save_every == 0 or step == total:
                everyone = [None] * world
                dist.all_gather_object(everyone, _sum_stats(stats, worker_stats))
                run_stats = _sum_stats({}, dict(enumerate(everyone)))
                stats, worker_stats = (run_stats if rank == 0 else {}), {}
                self._save(engine, step, run_stats, rank)
                data = self._data(step, rank) if step < total else None
        if rank == 0:
            self._finish(step)
        dist.barrier()

    def _save(self, engine, step: int, stats: dict, rank: int) -> None:
        import torch.distributed as dist

        engine.save_checkpoint(self.save_dir, tag=f"step{step}", client_state={"step": step, "data_stats": stats})
        dist.barrier()
        if rank == 0:
            for tag in prune_checkpoints(self.save_dir, self.cfg.keep_checkpoints):
                self.on_message(f"removed old checkpoint {tag}")
            skipped = {k: v for k, v in stats.items() if k != "samples" and v}
            self.on_message(f"step {step}: checkpoint {os.path.join(self.save_dir, f'step{step}')}; data skipped so far: {skipped or 'none'}")

    def _finish(self, step: int) -> None:
        from model.checkpoint import save_pretrained
        from model.convert import load_state_strict

        tag = latest_tag(self.save_dir)
        model = NxTP(self.model_cfg)
        load_state_strict(model, state_dict_from_checkpoint(self.save_dir, tag), os.path.join(self.save_dir, tag))
        out = save_pretrained(model, self.tokenizer, os.path.join(self.cfg.run_dir, "export"), extra={"step": step, "checkpoint": tag})
        plot_loss(os.path.join(self.cfg.run_dir, "metrics.jsonl"), os.path.join(self.cfg.run_dir, "loss.png"))
        self.on_message(f"exported {out} (step {step}); loss curve {os.path.join(self.cfg.run_dir, 'loss.png')}")


def _sum_stats(base: dict, per_worker: dict[int, dict]) -> dict:
    """Data counters of the run so far: those of earlier streams plus each current worker's."""
    total = dict(base)
    for ws in per_worker.values():
        for k, v in ws.items():
            total[k] = total.get(k, 0) + v
    return total
