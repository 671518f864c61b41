"""Training pieces without the launcher: the schedule, the global batch, the loader across
checkpoints, activation checkpointing and compile, and a step that never waits for the device."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from jobs.train import TrainConfig
from model.config import tiny_config
from model.nxtp import NxTP
from model.prompt import IGNORE, label_segments
from pipeline import ray_local
from pipeline.ds_config import DeepSpeedConfigError, gradient_accumulation
from pipeline.loader import DatasetSpec, TrainStream, train_loader
from pipeline.training import MetricsLog, compile_blocks, enable_activation_checkpointing, lr_schedule
from tests.test_mixture import REFERENCE, dataset


def _hand_written_lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The schedule pipeline/training.py computed by hand before it used transformers' (kept to compare)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    "warmup, total, lr, min_lr", [(5, 40, 2e-3, 1e-4), (2000, 21360, 1e-5, 0.0), (50, 1000, 2e-3, 1e-4)]
)
def test_lr_schedule_is_the_hand_written_curve_with_the_warmup_one_step_later(warmup, total, lr, min_lr):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = lr_schedule(optimizer, warmup, total, min_lr)
    library = []
    for _ in range(total):
        library.append(schedule.get_last_lr()[0])  # the lr the update of this step uses
        optimizer.step()
        schedule.step()
    before = [lr * _hand_written_lr_multiplier(s, warmup, total, min_lr / lr) for s in range(total)]
    # from the end of the warmup on, point by point the same cosine
    for s in [warmup, warmup + 1, (warmup + total) // 2, total - 2, total - 1]:
        assert library[s] == pytest.approx(before[s], rel=1e-12, abs=1e-15), s
    # during the warmup the library's ramp is the hand-written one a step later: it starts at 0
    # and reaches the peak once, at step `warmup` (the hand-written one held it at warmup-1 and warmup)
    assert library[0] == 0.0
    for s in [1, warmup // 2, warmup - 1]:
        assert library[s] == pytest.approx(before[s - 1], rel=1e-12), s
    assert before[warmup - 1] == before[warmup] == pytest.approx(lr)
    assert library[warmup - 1] < library[warmup] == pytest.approx(lr)
    assert max(library) == pytest.approx(lr) and library.count(max(library)) == 1
    assert library[-1] > min_lr  # min_lr would be reached at step `total`, after the last update (as before)


@pytest.mark.parametrize("world, accum", [(1, 32), (2, 16), (4, 8), (8, 4), (16, 2), (32, 1)])
def test_gradient_accumulation_from_the_global_batch(world, accum):
    assert gradient_accumulation(512, 16, world) == accum


@pytest.mark.parametrize(
    "global_batch, micro, world", [(512, 16, 3), (512, 16, 64), (500, 16, 1), (512, 24, 2)]
)
def test_global_batch_that_does_not_divide_is_an_error(global_batch, micro, world):
    with pytest.raises(
        DeepSpeedConfigError,
        match=f"global_batch {global_batch} is not a multiple of batch_size {micro} x world size {world}",
    ):
        gradient_accumulation(global_batch, micro, world)


def _g3m_config(tmp_path, **changes) -> TrainConfig:
    """The G3M preset over three dataset folders whose manifests hold the reference's sample counts,
    resolved as jobs.train resolves it (auto weights, the epoch's length)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "g3m.yaml")) as f:
        values = yaml.safe_load(f)
    for d in values["data"]:  # the preset's paths are examples
        if not (tmp_path / d["name"]).exists():  # two shards each (empty tars), counted by the manifest
            n = REFERENCE[d["name"]]
            dataset(tmp_path, d["name"], [n // 2, n - n // 2])
        d["shards"], d["labels"] = str(tmp_path / d["name"]), str(tmp_path / (d["name"] + "_labels"))
    cfg = TrainConfig(**({"deepspeed": "jobs/configs/zero2.json"} | values | changes))
    cfg.resolve_data()
    return cfg


def test_g3m_preset_is_the_papers_512_x_21360_steps_on_any_number_of_gpus(tmp_path):
    cfg = _g3m_config(tmp_path)
    assert cfg.global_batch == 512 and cfg.batch_size == 16
    assert cfg.samples_per_epoch == sum(REFERENCE.values()) == 3_645_221
    for world in (1, 8, 32):  # one GPU, the README's 8-GPU command, the paper's 32 GPUs
        assert cfg.batch_size * cfg.gradient_accumulation(world) * world == 512
        assert cfg.total_steps(world) == 21360
    assert cfg.gradient_accumulation(8) == 4
    with pytest.raises(DeepSpeedConfigError, match="world size 3"):
        cfg.total_steps(3)


def test_total_steps_needs_the_epochs_length(tmp_path):
    unresolved = TrainConfig(**{"deepspeed": "jobs/configs/zero2.json", "run_dir": str(tmp_path / "run"), "model": "tiny",
                                "tokenizer": str(tmp_path), "data": [DatasetSpec("a", str(tmp_path), str(tmp_path), 1.0)],
                                "epochs": 1, "samples_per_epoch": 0})  # fmt: skip
    with pytest.raises(ValueError, match="samples_per_epoch is not known yet"):
        unresolved.total_steps(1)


def test_global_batch_and_grad_accum_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="set global_batch .* or grad_accum"):
        _g3m_config(tmp_path, grad_accum=2)
    with pytest.raises(ValueError, match="global_batch 500 is not a multiple of batch_size 16"):
        _g3m_config(tmp_path, global_batch=500)
    without = _g3m_config(tmp_path, global_batch=0, grad_accum=2)
    assert without.gradient_accumulation(8) == 2 and without.total_steps(8) == 3 * math.ceil(3_645_221 / 256)
    fixed = _g3m_config(tmp_path, samples_per_epoch=3_645_000)  # a fixed epoch length wins over the count
    assert fixed.total_steps(8) == 3 * math.ceil(3_645_000 / 512)


def _batches(stream_args: dict, start_step: int, n: int, workers: int) -> list[torch.Tensor]:
    stream = TrainStream(**stream_args, start_step=start_step)
    it = iter(train_loader(stream, workers))
    out = []
    for _ in range(n):
        batch = next(it)
        out.append(torch.cat([batch["ids"].flatten().float(), batch["images"].flatten()[:64]]))
    del it
    return out


@pytest.mark.parametrize("segment_steps, accum", [(3, 1), (2, 2)])
def test_one_loader_reads_what_a_run_resumed_at_each_checkpoint_reads(
    labelled_shards, world, segment_steps, accum
):
    shards, labels = labelled_shards["train"]
    args = dict(
        datasets=[DatasetSpec("world", shards, labels)], tokenizer_path=world.tokenizer, image_size=64, batch_size=2, seed=5,
        shuffle_buffer=4, max_text_len=48, segment_steps=segment_steps, batches_per_step=accum,
    )  # fmt: skip
    workers = 2  # segments of an odd number of batches: the workers' turns shift at every checkpoint
    steps = 3 * segment_steps
    whole = _batches(args, 0, steps * accum, workers)
    for k in (1, 2):
        start = k * segment_steps
        resumed = _batches(args, start, (steps - start) * accum, workers)
        for i, (a, b) in enumerate(zip(resumed, whole[start * accum :])):
            assert torch.equal(a, b), f"resumed at step {start}: batch {i} differs"
    # each segment is a fresh stream seeded with its first step, not a continuation
    fresh = _batches(dict(args, segment_steps=0), segment_steps, segment_steps * accum, workers)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh, whole[segment_steps * accum : 2 * segment_steps * accum])
    )
    assert not torch.equal(whole[0], whole[segment_steps * accum])


def _tiny_batch(vocab: int = 100):
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    ids = torch.randint(0, vocab, (4, 12))
    targets = ids.clone()
    targets[:, :5] = IGNORE
    return dict(images=images, ids=ids, targets=targets, segments=label_segments(ids, torch.full((4,), 4), 7))


def _loss_and_grads(model: NxTP, batch: dict, **kwargs):
    out = model(**batch, **kwargs)
    out["loss"].backward()
    return out["loss"].detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_target_count_from_the_cpu_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = NxTP(tiny_config(100, image_size=64))
    model.init_weights()
    batch = _tiny_batch()
    loss, grads = _loss_and_grads(copy.deepcopy(model), batch)
    counted_loss, counted_grads = _loss_and_grads(
        copy.deepcopy(model), batch, n_targets=int((batch["targets"] != IGNORE).sum())
    )
    torch.testing.assert_close(counted_loss, loss, rtol=0, atol=0)
    for key in grads:
        torch.testing.assert_close(counted_grads[key], grads[key], rtol=0, atol=0)


def test_sample_losses_are_each_samples_own_and_sum_to_the_batch_loss():
    """The per-sample sums behind the per-dataset losses: a sample's equals its loss alone in a batch of
    one (x its target count), they add up to the batch's loss, and asking for them changes no gradient."""
    torch.manual_seed(0)
    model = NxTP(tiny_config(100, image_size=64))
    model.init_weights()
    batch = _tiny_batch()
    batch["targets"][1, 5:9] = IGNORE  # samples with different target counts
    counts = (batch["targets"] != IGNORE).sum(1)
    loss, grads = _loss_and_grads(copy.deepcopy(model), batch)
    with_sums = copy.deepcopy(model)
    out = with_sums(**batch, n_targets=int(counts.sum()), sample_losses=True)
    out["loss"].backward()
    assert out["sample_losses"].shape == (4,) and not out["sample_losses"].requires_grad
    torch.testing.assert_close(out["loss"].detach(), loss)
    torch.testing.assert_close(out["sample_losses"].sum() / counts.sum(), loss)
    for key, p in with_sums.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], msg=key)
    with torch.no_grad():
        for i in range(4):
            alone = model(**{k: v[i : i + 1] for k, v in batch.items()})["label_loss"]
            torch.testing.assert_close(out["sample_losses"][i], alone * counts[i], msg=f"sample {i}")


@pytest.mark.parametrize("checkpointing, compiled", [(True, False), (False, True), (True, True)])
def test_activation_checkpointing_and_compile_keep_names_loss_and_gradients(checkpointing, compiled):
    """Compile with the aot_eager backend: graph capture and AOTAutograd, where these blocks could
    break; the default inductor backend generates code from the same graphs (40 s here, not tested)."""
    torch.manual_seed(0)
    base = NxTP(tiny_config(100, image_size=64))
    base.init_weights()
    batch = _tiny_batch()
    loss, grads = _loss_and_grads(copy.deepcopy(base), batch)
    model = copy.deepcopy(base)
    if checkpointing:
        enable_activation_checkpointing(model)
    if compiled:
        assert compile_blocks(model, backend="aot_eager") == len(
            model.vision.vit.transformer.resblocks
        ) + len(model.decoder.layers)
    got_loss, got_grads = _loss_and_grads(model, batch)
    assert list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(got_loss, loss)
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], msg=key)


@pytest.fixture(scope="module")
def sync_report(labelled_shards, world, tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("sync")
    shards, labels = labelled_shards["train"]
    config = {
        "run_dir": str(root / "run"), "model": "tiny", "tokenizer": world.tokenizer, "image_size": 64,
        # two datasets (the same shards) in batches of 3 + 1: the per-dataset losses are audited too
        "data": [{"name": "a", "shards": shards, "labels": labels}, {"name": "b", "shards": shards, "labels": labels}],
        "batch_sizes": {"a": 3, "b": 1}, "train_vision_blocks": -1, "train_embeddings": "all",
        "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 2, "steps": 3, "log_every": 3, "save_every": 100,
        "num_workers": 0, "shuffle_buffer": 8, "max_text_len": 48, "grad_clip": 1.0, "export": False,
    }  # fmt: skip
    with open(root / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(repo_root, "jobs", "configs", "zero2.json")) as f:
        ds = json.load(f)
    with open(root / "ds.json", "w") as f:
        json.dump(ds, f)
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ray_local.free_port()),
    )
    report = root / "report.json"
    cmd = [
        sys.executable,
        "tests/sync_audit.py",
        str(root / "config.yaml"),
        str(root / "ds.json"),
        str(report),
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text()), root / "run"


def test_the_training_step_never_waits_for_the_device(sync_report):
    """No read of a device value and no data-dependent shape in this project's code inside the step
    (copy in, forward, backward, DeepSpeed's step); the loss, and the per-dataset losses with it, are
    read once per logged step."""
    sync_report, run = sync_report
    (row,) = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert row["step"] == 3 and row["loss/a"] > 0 and row["loss/b"] > 0, row
    in_step = [r for r in sync_report if "_device_step" in r["functions"]]
    ours = [r for r in in_step if r["in_repo"] or "open_clip" in r["origin"]]
    assert not ours, json.dumps(ours, indent=1)
    # the audit does see waits: the logged loss (once per logged step) and the CPU-side target counts
    reads = [
        r
        for r in sync_report
        if "read" in r["functions"] and r["op"] == "_local_scalar_dense" and r["in_repo"]
    ]
    assert len(reads) == 1, json.dumps(sync_report, indent=1)
    counts = [r for r in sync_report if "_host_side" in r["functions"]]
    assert len(counts) == 3 * 2, "one CPU-side count per micro-batch"
