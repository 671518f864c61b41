"""Training pieces the job assembles: what trains, optimizer groups, the schedule, logs, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.nxtp import NxTP
from model.prompt import IGNORE
from pipeline import resume
from pipeline.outputs import atomic_file
from pipeline.resume import checkpoint_tags, latest_tag

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


def lr_schedule(optimizer, warmup_steps: int, total_steps: int, min_lr: float):
    """Linear warmup from 0 to the optimizer's lr over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (a ``LambdaLR``): the update of
    step s (0-based) uses lr x s / warmup during the warmup, so the first update has lr 0 and
    the peak comes exactly once, at step ``warmup_steps``, where the cosine starts.
    """
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr=min_lr)


def adamw(params, lr: float, cuda: bool, offload: bool):
    """The recipe's AdamW (betas 0.9/0.98, eps 1e-6): fused on CUDA, DeepSpeed's CPU Adam when ZeRO offloads
    the optimizer states (DeepSpeed refuses a torch optimizer there), torch's otherwise."""
    from pipeline.ds_config import ADAM_BETAS, ADAM_EPS

    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=cuda or None)


def enable_activation_checkpointing(model: NxTP) -> None:
    """Recompute every transformer block's activations in the backward instead of keeping them
    (``torch.utils.checkpoint``, non-reentrant): the ViT's blocks through open_clip's own switch,
    the decoder's by wrapping each block's forward. Parameter names do not change."""
    model.vision.vit.set_grad_checkpointing(True)
    for block in model.decoder.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: NxTP, backend: str = "inductor") -> int:
    """``torch.compile`` each ViT and decoder block in place (``nn.Module.compile``: names and state
    dict unchanged, the rest of the model stays eager); returns the number of blocks."""
    blocks = [*model.vision.vit.transformer.resblocks, *model.decoder.layers]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def zero_memory_estimate(model: nn.Module, ds: dict, world_size: int, ranks_per_node: int) -> dict:
    """DeepSpeed's own estimate of the memory for parameters, gradients and optimizer states.

    ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` (what
    their ``*_all_live`` printers compute) for this run's stage, offload settings and ranks:
    once for all parameters (DeepSpeed's convention, as if all trained) and once for the
    trainable ones (frozen parameters keep no gradients or optimizer states).
    """
    from pipeline.ds_config import optimizer_offloaded

    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        return {"zero_stage": stage, "note": f"DeepSpeed has memory estimates for ZeRO stages 2 and 3, not {stage}"}
    per_node = max(1, min(ranks_per_node, world_size))
    nodes = max(1, world_size // per_node)
    offload_opt = optimizer_offloaded(ds)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    counts = {
        "all_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    out = {"zero_stage": stage, "ranks_per_node": per_node, "nodes": nodes, "offload_optimizer": offload_opt}
    for name, n in counts.items():
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            cpu, dev = estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=offload_opt)
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            out["offload_param"] = offload_param
            cpu, dev, _ = estimate_zero3_model_states_mem_needs(n, largest, per_node, nodes, offload_opt, offload_param, zero_init=False)
        out[name] = {"parameters": n, "per_device_GiB": round(dev / 2**30, 3), "cpu_per_node_GiB": round(cpu / 2**30, 3)}
    return out


REPLACED = ".replaced"  # suffix of a same-numbered checkpoint of the run before a change of its global batch, while its successor is written


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
    """One JSON line per logged step in ``<run>/metrics.jsonl``; on resume, the lines written after the
    checkpoint are dropped: those past its samples seen (``samples``, which runs through a change of the
    global batch, when steps are renumbered), or past its step in lines without that count."""

    def __init__(self, path: str, resume_step: int, resume_samples: int | None = None):
        self.path = path
        rows = self.read(path)
        kept = [r for r in rows if (r["samples"] <= resume_samples if resume_samples is not None and "samples" in r else r["step"] <= resume_step)]
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


def check_not_past_end(ckpt, global_batch: int, total: int) -> None:
    """Raise ResumeError when the checkpoint (its run_state.json) has seen more samples than the config's
    ``total`` steps of ``global_batch`` hold: the run would resume past its end, train nothing and export the
    checkpoint as it is. A checkpoint exactly at the end (a finished run's, or one killed before its export)
    passes; one without run_state.json is only known once loaded (Trainer.run warns then)."""
    if ckpt.state is None or "samples" not in ckpt.state:
        return
    step, _ = resume.resume_step(ckpt.state["samples"], global_batch)
    if step > total:
        raise resume.ResumeError(
            f"{ckpt.path} has seen {ckpt.state['samples']:,} samples: step {step} at a global batch of {global_batch}, past "
            f"this run's last step {total}; nothing would train: give more than {step} --steps (or the --epochs that make them) to continue it, "
            "or --model with its export to start a new run from it"
        )


def plot_loss(metrics_path: str, out_png: str) -> bool:
    """The loss curve (and learning rate) of a run as a PNG; False (nothing written) when no step was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    if not rows:
        return False
    by_samples = all("samples" in r for r in rows)  # steps are renumbered where a resume changed the global batch
    axis = "samples" if by_samples else "step"
    x = [r[axis] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["loss"] for r in rows], label="loss", color="tab:blue")
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):  # per dataset (Trainer)
        points = [(r[axis], r[key]) for r in rows if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], label=key, linestyle="--", linewidth=1)
    ax.set_xlabel("samples seen" if by_samples else "step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(x, [r["lr"] for r in rows], label="lr", color="tab:orange", alpha=0.6)
    lr_ax.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "training")
    fig.tight_layout()
    with atomic_file(out_png) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return True


def state_dict_from_checkpoint(save_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed ZeRO checkpoint (stage 1-3, frozen parameters included)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)


class Trainer:
    """The DeepSpeed training loop of ``jobs/train.py``; reports through callbacks.

    ``ds_config`` is the DeepSpeed JSON as the user wrote it; ``run`` fills and checks it
    (``pipeline.ds_config``) before the model is built. ``on_start(info)`` once (run facts,
    the filled DeepSpeed config, DeepSpeed's memory estimate), ``on_step(metrics)`` after every
    optimizer step: ``metrics['logged']`` on the steps written to metrics.jsonl, and only
    those carry the loss and throughput (means since the previous logged step, read from
    the device once per logged step: the step itself never waits for the device).
    ``on_message(text)`` for notes. Call it on every rank after ``deepspeed.init_distributed()``.
    With two or more datasets the logged steps also carry ``loss/<dataset>``: the label loss of
    that dataset's samples (summed per sample in the forward, pooled over the logged steps'
    micro-batches and ranks, divided by their target tokens; the caption loss is not split).
    """

    def __init__(self, cfg, ds_config: dict, on_start=None, on_step=None, on_message=None, ranks_per_node: int = 1):
        self.cfg, self.ds_raw = cfg, ds_config
        self.on_start = on_start or (lambda info: None)
        self.on_step = on_step or (lambda m: None)
        self.on_message = on_message or (lambda text: None)
        self.ranks_per_node = ranks_per_node
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

    def _data(self, start_step: int, start_samples: int, rank: int, world: int, grad_accum: int, pin_memory: bool):
        """One loader for the whole run: its workers live until the end, and the stream reseeds itself
        at every checkpoint step, so that a run resumed there reads what this one reads. The seeds are
        positions in samples (``start_samples``: seen before ``start_step``), so that a run resumed with
        another global batch, whose steps are renumbered, does not read again the batches it trained."""
        from pipeline.loader import TrainStream, train_loader

        cfg = self.cfg
        stream = TrainStream(
            cfg.data,
            self.tokenizer.path,
            cfg.image_size,
            cfg.batch_size,
            cfg.seed,
            rank=rank,
            world_size=world,
            start_step=start_step,
            max_text_len=min(cfg.max_text_len, self.model_cfg.decoder.max_seq_len - self.model_cfg.vision.n_tokens),
            prompt_augmentation=cfg.prompt_augmentation,
            caption_loss=cfg.caption_weight > 0,
            caption_fraction=cfg.caption_fraction,
            shuffle_buffer=cfg.shuffle_buffer,
            protocol=cfg.protocol,
            segment_steps=cfg.save_every,
            batches_per_step=grad_accum,
            start_samples=start_samples,
        )
        return iter(train_loader(stream, cfg.num_workers, pin_memory=pin_memory))

    def _configure(self, world: int, cuda: bool, accelerator):
        """(Recipe, DeepSpeed JSON filled but for the model sizes); raises on a JSON that cannot be used."""
        from pipeline.ds_config import Recipe, fill_deepspeed_config, resolve_precision

        cfg = self.cfg
        precision = resolve_precision(
            cfg.precision, self.ds_raw, cuda=cuda, bf16_supported=accelerator.is_bf16_supported(), fp16_supported=bool(accelerator.is_fp16_supported())
        )
        accum = cfg.gradient_accumulation(world)
        recipe = Recipe(cfg.batch_size, accum, world, cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.warmup_steps, cfg.total_steps(world), cfg.grad_clip, precision)
        return recipe, fill_deepspeed_config(self.ds_raw, recipe)

    # -- running

    def run(self) -> None:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        from pipeline.ds_config import describe, fill_model_sizes, optimizer_offloaded

        cfg = self.cfg
        rank, world = dist.get_rank(), dist.get_world_size()
        accelerator = get_accelerator()
        cuda = accelerator.device_name() == "cuda"
        recipe, ds = self._configure(world, cuda, accelerator)  # a bad JSON fails before the model is built
        total, accum = recipe.total_steps, recipe.grad_accum
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        ckpt = resume.find_checkpoint(cfg.resume, self.save_dir)
        if ckpt is not None:
            if ckpt.note:
                self.on_message(ckpt.note)
            self._say_changes(ckpt, world, recipe.global_batch, stage)  # and refuse a change that breaks the run
            resume.check_stage(ckpt, stage)
            check_not_past_end(ckpt, recipe.global_batch, total)
        model, self.tokenizer = self._build_model()
        self.model_cfg = model.cfg
        ds = fill_model_sizes(ds, max(model.cfg.decoder.dim, model.cfg.vision.width))
        counts = apply_freezing(model, cfg.train_vision_blocks, cfg.train_embeddings)
        self._facts = {
            "world_size": world, "global_batch": recipe.global_batch, "micro_batch": recipe.micro_batch, "grad_accum": accum,
            "zero_stage": stage, "precision": recipe.precision, "parameters": counts, "deepspeed": deepspeed.__version__,
            "train_config": dataclasses.asdict(cfg), "model_config": model.cfg.to_dict(),
            "tokenizer": {"path": self.tokenizer.path, "sha256": resume.tokenizer_fingerprint(self.tokenizer.path)},
        }  # fmt: skip
        universal = None
        if ckpt is not None:
            if ckpt.state:
                resume.check_model(ckpt.state, self._facts["model_config"], self._facts["tokenizer"]["sha256"])
            if resume.needs_universal(ckpt, world):
                universal = self._universal(ckpt, rank)
                resume.load_frozen(model, universal)  # the conversion leaves them out: the checkpoint's, not a rebuild's
                ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.compile:
            compile_blocks(model)
        if stage == 3:
            from deepspeed.utils import set_z3_leaf_modules

            # nn.MultiheadAttention reads out_proj's weight without calling out_proj
            set_z3_leaf_modules(model, [nn.MultiheadAttention])
        memory = zero_memory_estimate(model, ds, world, self.ranks_per_node)
        optimizer = schedule = None
        if "optimizer" not in ds:
            optimizer = functools.partial(adamw, lr=cfg.lr, cuda=cuda, offload=optimizer_offloaded(ds))
        if "scheduler" not in ds:
            schedule = functools.partial(lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=total, min_lr=cfg.min_lr)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), optimizer=optimizer, lr_scheduler=schedule, config=ds
        )
        step, samples, stats = 0, 0, {}
        self._exported_from = None
        self._skipped_base = (0, 0, recipe.global_batch)  # fp16's skipped updates: (their samples, engine count, global batch) at the start
        if ckpt is not None:
            step, samples, stats = self._load(engine, ckpt, universal, recipe.global_batch, total)
            if step >= total:  # known only now for a checkpoint without its run_state.json
                self.on_message(
                    f"warning: nothing to train: the run resumes at step {step}, and the config's last step is {total}"
                    + (f" (the checkpoint is {step - total} step(s) past it)" if step > total else "")
                    + ("; exporting the checkpoint's weights as they are" if cfg.export else "")
                )
        log = MetricsLog(os.path.join(cfg.run_dir, "metrics.jsonl"), step, samples if ckpt is not None else None) if rank == 0 else None
        self.on_start(
            {
                "world_size": world,
                "device": str(engine.device),
                "zero_stage": engine.zero_optimization_stage(),
                "parameters": counts,
                "global_batch": recipe.global_batch,
                "grad_accum": accum,
                "total_steps": total,
                "start_step": step,
                "start_samples": samples,
                **describe(ds, recipe, cuda),
                "optimizer_groups": [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in engine.basic_optimizer.param_groups],
                "activation_checkpointing": cfg.activation_checkpointing,
                "compile": cfg.compile,
                "zero_memory_estimate": memory,
                "deepspeed_config": ds,
            }
        )
        data = self._data(step, samples, rank, world, accum, pin_memory=cuda) if step < total else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision, torch.float32)
        per_dataset = [d.name for d in cfg.data] if len(cfg.data) > 1 else []
        window = _Window(engine.device, per_dataset)
        worker_stats: dict[int, dict] = {}
        worker_reads: dict[int, dict] = {}  # the shards each worker read in this segment
        mine: dict = {"stats": {}, "shards_read": {}}  # what this rank read since this launch, up to the last checkpoint
        resumed_stats = stats  # the run's counters up to the checkpoint this launch resumed from
        while step < total:
            lr = engine.get_lr()[0]  # what this step's update uses
            for _ in range(accum):
                tw = time.perf_counter()
                batch = next(data)
                window.wait += time.perf_counter() - tw
                ws = batch.pop("stats")
                worker_reads[ws["worker"]] = ws.pop("shards_read", {})
                worker_stats[ws.pop("worker")] = ws
                dataset = batch.pop("dataset")
                inputs, tokens = self._host_side(batch)
                loss, sample_losses = self._device_step(engine, inputs, dtype, sample_losses=bool(per_dataset))
                window.add(loss, tokens)
                if per_dataset:
                    window.add_datasets(dataset, sample_losses, batch["targets"])
            step += 1
            samples += recipe.global_batch
            window.steps += 1
            metrics = {"step": step, "samples": samples, "lr": lr, "logged": step % cfg.log_every == 0 or step == total}
            if metrics["logged"]:
                metrics |= window.read(world, recipe.global_batch)
                if recipe.precision == "fp16":  # dynamic loss scaling: the scale now, and the updates it skipped
                    metrics |= {"loss_scale": float(engine.optimizer.loss_scale), "skipped_steps": engine.skipped_steps}
                if log is not None:
                    log.write({k: v for k, v in metrics.items() if k != "logged"} | {"data": _sum_stats(stats, worker_stats)})
            self.on_step(metrics)
            final = step == total
            if (step % cfg.save_every == 0 and not final) or (final and cfg.export):
                t_save = time.perf_counter()
                mine = {"stats": _sum_stats(mine["stats"], worker_stats), "shards_read": _sum_stats(mine["shards_read"], worker_reads)}
                everyone = [None] * world
                dist.all_gather_object(everyone, mine)
                stats = _sum_stats(resumed_stats, dict(enumerate(r["stats"] for r in everyone)))  # the run's, as of this step
                worker_stats, worker_reads = {}, {}
                self._save(engine, step, samples, stats, everyone, rank)
                window.paused += time.perf_counter() - t_save
        del data  # ends the loader's workers
        if rank == 0 and cfg.export:
            self._finish(step, stats)
        dist.barrier()

    def _say_changes(self, ckpt, world: int, global_batch: int, stage: int) -> None:
        """What the checkpoint was and what changed since (``field: old -> new``); raises ResumeError on a change that breaks the run."""
        if ckpt.state is None:
            self.on_message(
                f"resuming from {ckpt.path}: it has no {resume.RUN_STATE} (the run stopped between DeepSpeed's save and that "
                f"file, or an older version wrote it): {ckpt.world_size} rank(s) and ZeRO-{ckpt.zero_stage} read from its files; "
                "the config cannot be compared with it"
            )
            return
        state = ckpt.state
        self.on_message(
            f"resuming from {ckpt.path}: step {state['step']}, {state['samples']:,} samples seen, written by {ckpt.world_size} "
            f"rank(s) (global batch {state['global_batch']}, ZeRO-{ckpt.zero_stage})"
        )
        new = dataclasses.asdict(self.cfg)
        changes = [
            f"{name}: {old} -> {now}"
            for name, old, now in (("world size", ckpt.world_size, world), ("global batch", state["global_batch"], global_batch), ("ZeRO stage", ckpt.zero_stage, stage))
            if old != now
        ] + resume.config_changes(state.get("train_config", {}), new)
        self.on_message("changes since that checkpoint:\n  " + "\n  ".join(changes) if changes else "no changes since that checkpoint")
        resume.check_unchanged(state, new)

    def _universal(self, ckpt, rank: int) -> str:
        """Rank 0 converts the checkpoint to a universal one while the others wait; every rank gets its folder (or the error)."""
        import torch.distributed as dist

        out = [None, None]
        if rank == 0:
            self.on_message(
                f"{ckpt.path} was written by {ckpt.world_size} rank(s): converting it to a DeepSpeed "
                f"universal checkpoint in {os.path.join(resume.universal_dir(self.save_dir), ckpt.tag)} (reused if already there)"
            )
            try:
                out[0] = resume.convert_to_universal(ckpt, self.save_dir)
            except Exception as err:  # noqa: BLE001 - said on every rank below, not left waiting
                out[1] = str(err)
        dist.broadcast_object_list(out, src=0)
        if out[1]:
            raise RuntimeError(out[1])
        return out[0]

    def _load(self, engine, ckpt, universal: str | None, global_batch: int, total: int) -> tuple[int, int, dict]:
        """Load the checkpoint (its universal conversion when there is one); (step, samples seen, run-wide data counters).

        The step is samples seen // this run's global batch: the schedule and the data stream
        continue by samples. The optimizer's hyperparameters stay this config's (DeepSpeed's load
        puts back the checkpoint's; its ZeRO-3 universal load even gives every group the first's)."""
        mine = [{k: v for k, v in group.items() if k != "params"} for group in engine.basic_optimizer.param_groups]
        load_dir = os.path.dirname(universal) if universal else ckpt.save_dir
        _, client = engine.load_checkpoint(load_dir, ckpt.tag, load_lr_scheduler_states=False)
        for group, settings in zip(engine.basic_optimizer.param_groups, mine):
            group.update(settings)
        samples = client.get("samples", engine.global_samples)
        step, extra = resume.resume_step(samples, global_batch)
        # fp16: DeepSpeed steps no schedule on an update its loss scaling skipped (engine.skipped_steps, restored by the load)
        skipped = client.get("skipped_samples")
        if skipped is None:  # a checkpoint written before they were counted in samples: its updates were of its own global batch
            skipped = engine.skipped_steps * ((ckpt.state or {}).get("global_batch") or global_batch)
        self._skipped_base = (skipped, engine.skipped_steps, global_batch)
        schedule_step = resume.schedule_step(samples, global_batch, skipped)
        if engine.lr_scheduler is not None:
            resume.set_schedule_step(engine.lr_scheduler, schedule_step)
        engine.global_steps, engine.global_samples = step, samples
        self._exported_from = (ckpt.save_dir, ckpt.tag)
        how = f" (universal checkpoint {universal})" if universal else ""
        by_samples = f"{samples:,} samples seen / global batch {global_batch} = step {step}" + (f", {extra} samples past it (not a multiple)" if extra else "")
        if schedule_step == step:
            goes_on = f"the learning-rate schedule and the data stream continue from step {step} of {total}"
        else:
            goes_on = (
                f"the data stream continues from step {step} of {total}, the learning-rate schedule from its step {schedule_step}: "
                f"fp16's loss scaling skipped {engine.skipped_steps} update(s) ({skipped:,} samples), which do not step it"
            )
        self.on_message(f"resumed from {ckpt.path} at step {step}{how}: {by_samples}; {goes_on}")
        return step, samples, client.get("data_stats", {})  # the run-wide counters (on every rank: each saves them)

    def _skipped_samples(self, engine) -> int:
        """The samples of the run's updates that fp16's loss scaling skipped (they did not step the schedule), as of now:
        those the checkpoint this launch resumed from recorded, plus the updates skipped since, of this global batch."""
        samples, steps, global_batch = self._skipped_base
        return samples + (engine.skipped_steps - steps) * global_batch

    def _host_side(self, batch: dict) -> tuple[dict, int]:
        """The model's inputs with the target counts, and the batch's tokens (image + target), all counted
        on the CPU before the batch moves, so that neither the loss nor the metrics read the device."""
        inputs = dict(batch, n_targets=int((batch["targets"] != IGNORE).sum()))
        if "caption_targets" in batch:
            inputs["n_caption_targets"] = int((batch["caption_targets"] != IGNORE).sum())
        return inputs, batch["images"].shape[0] * self.model_cfg.vision.n_tokens + inputs["n_targets"]

    def _device_step(self, engine, inputs: dict, dtype: torch.dtype, sample_losses: bool = False):
        """One micro-batch: copy in (non-blocking, from pinned memory on GPUs), forward, backward, and
        DeepSpeed's step (an optimizer update at the accumulation boundary). Returns the loss and, with
        ``sample_losses``, each sample's summed label loss [B] (else None), on the device."""
        device = engine.device
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        moved["images"] = moved["images"].to(dtype)
        out = engine(**moved, caption_weight=self.cfg.caption_weight, sample_losses=sample_losses)
        engine.backward(out["loss"])
        engine.step()
        return out["loss"].detach(), out.get("sample_losses")

    def _save(self, engine, step: int, samples: int, stats: dict, by_rank: list[dict], rank: int) -> None:
        """A checkpoint, then (rank 0, once every rank saved) its run_state.json, the pruning of older ones, and
        the removal of a universal conversion this run resumed from (its own checkpoint now stands in for it)."""
        import torch.distributed as dist
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        tag = f"step{step}"
        # a checkpoint of this step from before a change of the global batch (possibly the one this run resumed
        # from): its files for another world size must not mix with the new ones, and it is kept, under a name that
        # is no checkpoint tag, until the new one is complete, so that a crash during this save loses neither
        replaced = os.path.join(self.save_dir, f"{tag}{REPLACED}")
        if rank == 0 and os.path.isdir(os.path.join(self.save_dir, tag)):
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(os.path.join(self.save_dir, tag), replaced)
            self.on_message(f"step {step}: the checkpoint {tag} of the run before its global batch changed is kept as {replaced} until the new {tag} is written")
        dist.barrier()
        client = {"step": step, "samples": samples, "skipped_samples": self._skipped_samples(engine), "data_stats": stats,
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}  # fmt: skip
        engine.save_checkpoint(self.save_dir, tag=tag, client_state=client)
        dist.barrier()
        self._exported_from = (self.save_dir, tag)
        if rank == 0:
            state = {"step": step, "samples": samples, **self._facts, "data_stats": stats, "data_by_rank": by_rank}
            resume.write_run_state(os.path.join(self.save_dir, tag), state)
            shutil.rmtree(replaced, ignore_errors=True)
            if os.path.isdir(resume.universal_dir(self.save_dir)):
                shutil.rmtree(resume.universal_dir(self.save_dir), ignore_errors=True)
            for old in prune_checkpoints(self.save_dir, self.cfg.keep_checkpoints):
                self.on_message(f"removed old checkpoint {old}")
            skipped = {k: v for k, v in stats.items() if k != "samples" and v}
            self.on_message(f"step {step}: checkpoint {os.path.join(self.save_dir, tag)}; data skipped so far: {skipped or 'none'}")

    def _finish(self, step: int, data_stats: dict) -> None:
        from model.checkpoint import save_pretrained
        from model.convert import load_state_strict

        save_dir, tag = self._exported_from or (self.save_dir, latest_tag(self.save_dir))
        model = NxTP(self.model_cfg)
        load_state_strict(model, state_dict_from_checkpoint(save_dir, tag), os.path.join(save_dir, tag))
        card = {"train_config": dataclasses.asdict(self.cfg), "step": step, "data_stats": data_stats}  # for the model card
        out = save_pretrained(model, self.tokenizer, os.path.join(self.cfg.run_dir, "export"), extra={"step": step, "checkpoint": tag}, card=card)
        if getattr(self.cfg, "export_to", None):
            self.on_message(f"copied the exported model to {export_copy(out, self.cfg.export_to)}")
        png = os.path.join(self.cfg.run_dir, "loss.png")
        plotted = plot_loss(os.path.join(self.cfg.run_dir, "metrics.jsonl"), png)
        self.on_message(f"exported {out} (step {step})" + (f"; loss curve {png}" if plotted else "; no loss curve: metrics.jsonl has no logged step"))


class _Window:
    """What happened since the last logged step: the loss stays on the device until ``read``.

    ``datasets``: names whose losses are kept apart (``loss/<name>``), in the order of the
    batches' dataset indices; empty: none.
    """

    def __init__(self, device, datasets: list[str] | tuple = ()):
        self.device = device
        self.datasets = list(datasets)
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.dataset_loss = torch.zeros(len(self.datasets), device=self.device)  # summed label loss per dataset
        self.dataset_tokens = torch.zeros(len(self.datasets), dtype=torch.float64)  # their target tokens, on the CPU
        self.micro = self.steps = self.tokens = 0
        self.wait = self.paused = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss.float()
        self.micro += 1
        self.tokens += tokens

    def add_datasets(self, dataset: torch.Tensor, sample_losses: torch.Tensor, targets: torch.Tensor) -> None:
        """One micro-batch's per-sample label losses (on the device) into their datasets' sums; ``dataset``
        [B] and ``targets`` [B, T] are the batch's CPU tensors, its target tokens counted there."""
        tokens = (targets != IGNORE).sum(1).to(torch.float64)  # [B]
        self.dataset_tokens.index_add_(0, dataset, tokens)
        self.dataset_loss.index_add_(0, dataset.to(self.device, non_blocking=True), sample_losses.float())

    def read(self, world: int, global_batch: int) -> dict:
        """Loss (mean over ranks and micro-batches), per-dataset losses and throughput; the one wait for the device."""
        import torch.distributed as dist

        # one all-reduce: [loss, per-dataset loss sums, per-dataset target tokens]
        packed = torch.cat([self.loss.reshape(1).double(), self.dataset_loss.double(), self.dataset_tokens.to(self.device)])
        dist.all_reduce(packed)
        mean = packed[0].item() / (world * self.micro)
        k = len(self.datasets)
        summed = packed[1:].tolist()  # ready after .item(): no second wait
        per_dataset = {f"loss/{name}": summed[i] / summed[k + i] for i, name in enumerate(self.datasets) if summed[k + i] > 0}
        elapsed = max(1e-9, time.perf_counter() - self.t0 - self.paused)  # after .item(): the window's work is done
        out = {
            "loss": mean,
            **per_dataset,
            "samples_per_s": global_batch * self.steps / elapsed,
            "tokens_per_s": self.tokens * world / elapsed,
            "data_wait": self.wait / elapsed,
            "step_seconds": elapsed / self.steps,
        }
        self._reset()
        return out


def check_export_to(dest: str) -> None:
    """Raise when ``dest`` cannot take an exported model: unreachable storage, or something else already there."""
    from pipeline import outputs, storage

    storage.check_reachable(dest)
    with storage.reported(dest):
        outputs.check_replaceable(dest, lambda p: storage.isfile(storage.join(p, "config.json")), "is not an exported model (no config.json)")


def export_copy(export: str, dest: str) -> str:
    """Copy an exported model folder to ``dest`` (a URL or path), published whole; refuses to replace anything but a model."""
    from pipeline import outputs

    return outputs.copy_folder(export, dest, check_export_to)


def _sum_stats(base: dict, per_worker: dict[int, dict]) -> dict:
    """Data counters of the run so far: those of earlier streams plus each current worker's."""
    total = dict(base)
    for ws in per_worker.values():
        for k, v in ws.items():
            total[k] = total.get(k, 0) + v
    return total
