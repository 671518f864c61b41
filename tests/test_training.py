"""Training pieces without the launcher: the schedule, the global batch, the loader across
checkpoints, activation checkpointing and compile, and a step that never waits for the device."""

from __future__ import annotations

import copy
import dataclasses
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


def test_a_label_table_of_other_types_is_counted_and_trains_nothing(tmp_path):
    """Labels as one comma-joined string (a CSV round trip) would train on single letters: the
    table is counted in ``bad_label_tables`` instead, apart from a missing one."""
    from collections import Counter, OrderedDict

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.loader import _shard_labels
    from pipeline.shards import Shard, label_table_path

    spec = DatasetSpec("d", str(tmp_path / "shards"), str(tmp_path / "labels"))
    os.makedirs(tmp_path / "labels" / "labels")
    good = pa.table({"key": ["a", "b"], "labels": [["dog", "cup"], ["sky"]]})
    pq.write_table(good, label_table_path(spec.labels, "00000"))
    pq.write_table(good.set_column(1, "labels", pa.array(["dog, cup", "sky"])), label_table_path(spec.labels, "00001"))
    stats, cache = Counter(), OrderedDict()
    assert _shard_labels(spec, Shard("00000", "x.tar"), stats, cache) == {"a": ["dog", "cup"], "b": ["sky"]}
    assert _shard_labels(spec, Shard("00001", "x.tar"), stats, cache) == {}
    assert _shard_labels(spec, Shard("00002", "x.tar"), stats, cache) == {}
    assert stats == Counter(bad_label_tables=1, missing_label_tables=1)


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


# ----------------------------------------------------------------------------- inputs refused up front


def _small_config(tmp_path, **changes) -> TrainConfig:
    """A tiny-model config over one local dataset (an empty tar, labels/ with no tables): what __post_init__ checks."""
    shards, labels = tmp_path / "shards", tmp_path / "labels"
    os.makedirs(shards, exist_ok=True)
    os.makedirs(labels / "labels", exist_ok=True)
    (shards / "00000.tar").touch()
    (tmp_path / "tokenizer.model").touch()
    values = {"deepspeed": "jobs/configs/zero2.json", "run_dir": str(tmp_path / "run"), "model": "tiny",
              "tokenizer": str(tmp_path / "tokenizer.model"), "data": [DatasetSpec("a", str(shards), str(labels), 1.0)], "steps": 4}  # fmt: skip
    return TrainConfig(**(values | changes))


def test_export_to_with_no_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--export-to .* with --no-export: nothing would be exported"):
        _small_config(tmp_path, export=False, export_to=str(tmp_path / "out"))
    assert _small_config(tmp_path, export=False).export_to is None
    assert _small_config(tmp_path, export_to=str(tmp_path / "out")).export


@pytest.mark.parametrize(
    "field, value",
    [("warmup_steps", -5), ("caption_weight", -1.0), ("weight_decay", -0.1), ("grad_clip", -1.0), ("steps", -3), ("epochs", -1.0),
     ("samples_per_epoch", -1), ("num_workers", -1), ("shuffle_buffer", -1), ("keep_checkpoints", -1), ("min_lr", -1e-6),
     ("caption_fraction", 0.0), ("caption_fraction", 1.5), ("caption_fraction", -0.5), ("train_vision_blocks", -2),
     ("max_text_len", 0), ("image_size", 0), ("patch_size", 0), ("decoder_layers", 0)],
)  # fmt: skip
def test_values_out_of_range_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _small_config(tmp_path, **{field: value})


def test_edges_of_the_ranges_are_taken(tmp_path):
    cfg = _small_config(tmp_path, warmup_steps=0, caption_weight=0.0, weight_decay=0.0, grad_clip=0.0, keep_checkpoints=0, num_workers=0,
                        shuffle_buffer=0, min_lr=0.0, caption_fraction=1.0, train_vision_blocks=-1)  # fmt: skip
    assert cfg.keep_checkpoints == 0


def test_keep_checkpoints_0_keeps_all_and_says_so(tmp_path):
    import inspect

    from pipeline.training import prune_checkpoints

    save = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        os.makedirs(save / f"step{step}")
    (save / "latest").write_text("step3")
    assert prune_checkpoints(str(save), 0) == [] and len(os.listdir(save)) == 4
    assert sorted(prune_checkpoints(str(save), 1)) == ["step1", "step2"]
    assert '"""newest checkpoints kept on disk (0: keep all)"""' in inspect.getsource(TrainConfig)  # the --help text


def test_data_flag_keeps_commas_inside_braces(tmp_path):
    from jobs.train import _dataset

    spec = _dataset(["a=/shards/{00000,00003}.tar,/labels"])
    assert (spec.name, spec.shards, spec.labels, spec.weight, spec.batch_size) == ("a", "/shards/{00000,00003}.tar", "/labels", 1.0, None)
    spec = _dataset(["a=/s/{00000..00003}-{a,b}.tar,/l/{x,y},0.5,8"])
    assert (spec.shards, spec.labels, spec.weight, spec.batch_size) == ("/s/{00000..00003}-{a,b}.tar", "/l/{x,y}", 0.5, 8)
    with pytest.raises(ValueError, match="expected NAME=SHARDS,LABELS"):
        _dataset(["a=/shards/{00000,00003}.tar"])


def _parse(argv: list[str], capsys) -> tuple[int | None, str]:
    from jobs.train import parse_args

    try:
        parse_args(argv)
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def test_data_flag_with_a_brace_pattern_parses(tmp_path, capsys):
    cfg = _small_config(tmp_path)
    (tmp_path / "shards" / "00003.tar").touch()
    from jobs.train import parse_args

    parsed, _ = parse_args(["--deepspeed", "jobs/configs/zero2.json", "--tokenizer", cfg.tokenizer, "--run-dir", cfg.run_dir, "--steps", "2",
                            "--data", f"a={tmp_path}/shards/{{00000,00003}}.tar,{tmp_path}/labels"])  # fmt: skip
    assert parsed.data[0].shards == f"{tmp_path}/shards/{{00000,00003}}.tar" and parsed.data[0].weight == 1.0


@pytest.mark.parametrize("flags, message", [(["--warmup-steps", "-5"], "warmup_steps must be >= 0"), (["--caption-weight", "-1"], "caption_weight must be >= 0"),
                                            (["--no-export", "--export-to", "/tmp/x"], "with --no-export")])  # fmt: skip
def test_range_errors_are_usage_errors(tmp_path, capsys, flags, message):
    cfg = _small_config(tmp_path)
    base = ["--deepspeed", "jobs/configs/zero2.json", "--tokenizer", cfg.tokenizer, "--run-dir", cfg.run_dir, "--steps", "2",
            "--data", f"a={tmp_path}/shards,{tmp_path}/labels"]  # fmt: skip
    code, err = _parse(base + flags, capsys)
    assert code == 2 and message in " ".join(err.replace("│", " ").split()), err


def test_a_missing_or_invalid_deepspeed_json_is_a_usage_error(tmp_path, capsys):
    cfg = _small_config(tmp_path)
    base = ["--tokenizer", cfg.tokenizer, "--run-dir", cfg.run_dir, "--steps", "2", "--data", f"a={tmp_path}/shards,{tmp_path}/labels"]
    (tmp_path / "notes.md").write_text("# not JSON\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    for path, said in [(tmp_path / "nope.json", "no such file"), (tmp_path / "notes.md", "not a JSON file (Expecting value"),
                       (tmp_path / "list.json", "not a DeepSpeed config (a JSON object), but a JSON list"), (tmp_path, "cannot be read")]:  # fmt: skip
        code, err = _parse(["--deepspeed", str(path), *base], capsys)
        assert code == 2 and err.startswith(f"error: --deepspeed {path}: {said}") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err


def test_inputs_that_would_fail_after_the_model_is_built_are_named(tmp_path):
    cfg = _small_config(tmp_path)
    cfg.check_inputs()
    os.rmdir(tmp_path / "labels" / "labels")  # a folder that is no jobs.labels output
    with pytest.raises(FileNotFoundError, match=r"dataset a: no label tables in .*/labels/labels \(not a jobs.labels output"):
        cfg.check_inputs()
    os.makedirs(tmp_path / "labels" / "labels")
    cfg.check_inputs()
    cfg.tokenizer = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=f"tokenizer {tmp_path}/nope.model: no such file"):
        cfg.check_inputs()
    cfg.tokenizer = str(tmp_path)  # a folder
    with pytest.raises(FileNotFoundError, match="tokenizer .*: no such file"):
        cfg.check_inputs()


@pytest.fixture
def s3_without_credentials(s3, monkeypatch):
    """The session's S3 server, reached with no credentials from this process (s3fs's cached clients dropped before and after)."""
    import s3fs

    from tests import s3_server

    for key in set(os.environ) - set(s3_server.without_credentials(dict(os.environ))):
        monkeypatch.delenv(key)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.s3
def test_s3_data_without_credentials_is_a_usage_error(tmp_path, s3_without_credentials):
    with pytest.raises(ValueError, match=r"dataset a: s3://nxtp/shards: no credentials for s3:// .*AWS_ACCESS_KEY_ID"):
        _small_config(tmp_path, data=[DatasetSpec("a", "s3://nxtp/shards", str(tmp_path / "labels"), 1.0)])


@pytest.mark.s3
def test_s3_labels_without_their_success_marker_are_named(tmp_path, s3):
    import fsspec

    from pipeline.outputs import UnpublishedOutputError

    fs = fsspec.filesystem("s3")
    fs.pipe("nxtp/train-labels-unpublished/labels/00000.parquet", b"not read")
    cfg = _small_config(tmp_path, data=[DatasetSpec("a", str(tmp_path / "shards"), "s3://nxtp/train-labels-unpublished", 1.0)])
    with pytest.raises(UnpublishedOutputError, match="s3://nxtp/train-labels-unpublished: not a published labels output"):
        cfg.check_inputs()
    fs.pipe("nxtp/train-labels-unpublished/_SUCCESS", b"")
    cfg.check_inputs()


# ----------------------------------------------------------------------------- resuming


def _fake_checkpoint(save_dir, step: int, samples: int, world: int = 1, resume: str = "auto") -> str:
    """A checkpoint folder as find_checkpoint sees it: DeepSpeed's model-states file, run_state.json, latest."""
    tag = os.path.join(save_dir, f"step{step}")
    os.makedirs(tag)
    open(os.path.join(tag, "mp_rank_00_model_states.pt"), "wb").close()
    state = {"step": step, "samples": samples, "world_size": world, "zero_stage": 2, "global_batch": samples // step, "train_config": {"resume": resume}}
    with open(os.path.join(tag, "run_state.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(f"step{step}")
    return tag


def test_rerunning_a_resume_into_a_new_run_dir_continues_its_own_checkpoints(tmp_path):
    from pipeline.resume import ResumeError, find_checkpoint

    other = _fake_checkpoint(str(tmp_path / "f" / "checkpoints"), 4, 64, world=2)
    save = str(tmp_path / "g3" / "checkpoints")
    first = find_checkpoint(other, save)  # the first launch: the other run's checkpoint, nothing said
    assert (first.save_dir, first.tag, first.note) == (os.path.dirname(other), "step4", None)
    _fake_checkpoint(save, 10, 80, resume=other)  # what that launch wrote, its config naming --resume
    for again in (other, other + "/", os.path.relpath(other)):  # the same command, the path as typed
        ckpt = find_checkpoint(again, save)
        assert (ckpt.save_dir, ckpt.tag) == (save, "step10")
        assert "already holds this run's own checkpoints, begun from that one: continuing from its latest" in ckpt.note
        assert ckpt.path in ckpt.note
    # a run folder whose own run began elsewhere still refuses, and says how to continue it
    elsewhere = _fake_checkpoint(str(tmp_path / "x" / "checkpoints"), 2, 32)
    with pytest.raises(ResumeError, match=r"already holds checkpoints of its own run \(step10\), which did not begin from .*--resume auto"):
        find_checkpoint(elsewhere, save)


def test_the_resume_recorded_in_train_config_counts_when_run_state_is_missing(tmp_path):
    from pipeline.resume import ResumeError, find_checkpoint

    other = _fake_checkpoint(str(tmp_path / "f" / "checkpoints"), 4, 64)
    save = str(tmp_path / "g" / "checkpoints")
    own = _fake_checkpoint(save, 6, 96, resume=other)
    os.remove(os.path.join(own, "run_state.json"))  # killed between DeepSpeed's save and run_state.json
    open(os.path.join(own, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb").close()
    with pytest.raises(ResumeError, match="which did not begin from"):
        find_checkpoint(other, save)
    (tmp_path / "g" / "train_config.json").write_text(json.dumps({"resume": other}))
    ckpt = find_checkpoint(other, save)
    assert (ckpt.tag, ckpt.state, ckpt.world_size) == ("step6", None, 1) and ckpt.note


def test_a_checkpoint_past_the_configured_end_is_refused_before_the_model_is_built(tmp_path):
    from pipeline.resume import ResumeError, read_checkpoint
    from pipeline.training import check_not_past_end

    tag = _fake_checkpoint(str(tmp_path / "checkpoints"), 4, 64, world=2)  # 2 ranks x 8: step 4, 64 samples
    ckpt = read_checkpoint(*os.path.split(tag))
    with pytest.raises(ResumeError, match=r"has seen 64 samples: step 8 at a global batch of 8, past this run's last step 6; nothing would train"):
        check_not_past_end(ckpt, 8, 6)  # 1 rank x 8: step 8 of 6
    check_not_past_end(ckpt, 8, 8)  # exactly at the end (a finished run re-run, or killed before its export): warned, exported
    check_not_past_end(ckpt, 16, 6)
    ckpt.state = None  # without run_state.json: known only once loaded
    check_not_past_end(ckpt, 8, 6)


def test_no_loss_curve_without_logged_steps(tmp_path):
    from pipeline.training import plot_loss

    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_loss(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png")) is False
    assert not (tmp_path / "loss.png").exists()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": 8, "loss": 2.0, "lr": 1e-3}) + "\n")
    assert plot_loss(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png")) is True
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_wildcard_in_a_file_name_is_checked_by_its_folder(tmp_path):
    """``cc3m-{0000..0575}.tar`` and ``part-*.tar``: the text before the wildcard is no path; its folder is what must exist."""
    from jobs.train import _must_exist

    assert _must_exist("/data/cc3m/cc3m-{0000..0575}.tar") == _must_exist("/data/cc3m/part-*.tar") == "/data/cc3m"
    assert _must_exist("/data/{a,b}/x.tar") == "/data" and _must_exist("/data/cc3m/") == "/data/cc3m" and _must_exist("/x-*.tar") == "/"
    assert _must_exist("s3://bucket/shards/part-{00..09}.tar") == "s3://bucket/shards" and _must_exist("s3://bucket/*.tar") == "s3://bucket"
    assert _must_exist("s3://bucket-*/x.tar") is None and _must_exist("part-*.tar") == "." and _must_exist("file:///x-*.tar") == "/"
    cfg = _small_config(tmp_path)
    (tmp_path / "shards" / "00001.tar").touch()
    for pattern in ("0000{0..1}.tar", "0000*.tar", "{00000,00001}.tar", "0000?.tar"):
        spec = DatasetSpec("a", f"{tmp_path}/shards/{pattern}", f"{tmp_path}/labels", 1.0)
        assert [s.name for s in spec.find()] == ["00000", "00001"], pattern
        _small_config(tmp_path, data=[spec])  # accepted, as find_shards accepts it
    missing = DatasetSpec("a", f"{tmp_path}/nope/part-*.tar", f"{tmp_path}/labels", 1.0)
    with pytest.raises(ValueError, match=f"dataset a: {tmp_path}/nope/part-\\*.tar: its folder {tmp_path}/nope does not exist"):
        _small_config(tmp_path, data=[missing])
    with pytest.raises(ValueError, match=f"dataset a: {tmp_path}/nope does not exist"):
        _small_config(tmp_path, data=[DatasetSpec("a", f"{tmp_path}/nope", f"{tmp_path}/labels", 1.0)])
    assert cfg.data[0].shards == str(tmp_path / "shards")


def test_a_warmup_longer_than_the_run_is_warned_and_described(tmp_path):
    from pipeline.ds_config import Recipe, describe

    short = Recipe(4, 1, 2, 2e-3, 1e-4, 0.1, 50, 4, 1.0, "fp32")  # the demo's warmup of 50 in a --steps 4 run
    assert describe({}, short, cuda=False)["lr_schedule"] == (
        "linear warmup over 50 steps to lr 0.002, warmup not finished by step 4; no decay (transformers' get_cosine_with_min_lr_schedule_with_warmup)"
    )
    assert "warmup not finished" in describe({}, dataclasses.replace(short, warmup_steps=4), cuda=False)["lr_schedule"]
    assert "cosine decay to min_lr 0.0001 at step 4" in describe({}, dataclasses.replace(short, warmup_steps=3), cuda=False)["lr_schedule"]
    warning = _small_config(tmp_path, warmup_steps=50, steps=4, lr=2e-3).warmup_warning(2)
    assert warning.startswith("warning: warmup_steps 50 >= the run's 4 steps: the warmup is not finished by step 4") and "never decays" in warning
    assert "the last update's is 0.00012" in warning  # 2e-3 x 3 / 50
    assert "last update" not in _small_config(tmp_path, warmup_steps=50, steps=4).warmup_warning(2, own_schedule=False)  # a JSON's WarmupLR
    assert _small_config(tmp_path, warmup_steps=4, steps=4).warmup_warning(1) is not None  # the peak would come after the last update
    assert _small_config(tmp_path, warmup_steps=3, steps=4).warmup_warning(1) is None
    assert _small_config(tmp_path, warmup_steps=0, steps=4).warmup_warning(1) is None
    # the steps of an epoch: 2 epochs x ceil(40 / (4 x 2 ranks)) = 10 steps
    assert "the run's 10 steps" in _small_config(tmp_path, warmup_steps=10, steps=0, epochs=2, samples_per_epoch=40, batch_size=4).warmup_warning(2)
    assert _small_config(tmp_path, global_batch=8, batch_size=4, steps=0, epochs=1, samples_per_epoch=40).warmup_warning(3) is None  # the trainer refuses it


class _Engine:
    """What Trainer._load uses of a DeepSpeed engine; its load puts back the checkpoint's skipped_steps, as DeepSpeed's does."""

    def __init__(self, scheduler, skipped_steps: int, client: dict):
        self.lr_scheduler, self.basic_optimizer = scheduler, scheduler.optimizer
        self.skipped_steps = self.global_steps = self.global_samples = 0
        self._restored = (skipped_steps, client)

    def load_checkpoint(self, load_dir, tag, load_lr_scheduler_states=True):
        assert not load_lr_scheduler_states
        self.skipped_steps = self._restored[0]
        return os.path.join(load_dir, tag), dict(self._restored[1])


def test_an_fp16_resume_puts_the_schedule_where_the_skipped_updates_left_it(tmp_path):
    """DeepSpeed steps no schedule on an update that fp16's loss scaling skipped: the uninterrupted run at step s
    uses the lr of step s - skipped, and so does the run resumed there (not the lr of step s)."""
    from types import SimpleNamespace

    from pipeline import resume
    from pipeline.training import Trainer

    def schedule():
        return lr_schedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3), 5, 40, 1e-4)

    run, lrs = schedule(), []
    for step in range(12):  # updates 3 and 6 overflow
        lrs.append(run.get_last_lr()[0])
        run.optimizer.step()
        if step not in (3, 6):
            run.step()
    unskipped = schedule()
    resume.set_schedule_step(unskipped, 10)
    assert unskipped.get_last_lr()[0] != pytest.approx(lrs[10])
    messages: list[str] = []
    trainer = Trainer(SimpleNamespace(run_dir=str(tmp_path)), {}, on_message=messages.append)
    ckpt = resume.Checkpoint(str(tmp_path), "step10", 1, 2, {"global_batch": 8})
    for client in ({"samples": 80, "skipped_samples": 16}, {"samples": 80}):  # the latter: a checkpoint from before skipped_samples
        engine = _Engine(schedule(), 2, client)
        assert trainer._load(engine, ckpt, None, 8, 40)[:2] == (10, 80)
        assert engine.lr_scheduler.get_last_lr()[0] == pytest.approx(lrs[10], rel=1e-12), client
        assert messages[-1].endswith("the data stream continues from step 10 of 40, the learning-rate schedule from its step 8: "
                                     "fp16's loss scaling skipped 2 update(s) (16 samples), which do not step it")  # fmt: skip
        assert trainer._skipped_samples(engine) == 16
        engine.skipped_steps += 1  # one more overflow after the resume: what the next checkpoint records
        assert trainer._skipped_samples(engine) == 24
    # with another global batch the schedule goes by the samples of the updates applied: (80 - 16) // 16
    engine = _Engine(schedule(), 2, {"samples": 80, "skipped_samples": 16})
    assert trainer._load(engine, ckpt, None, 16, 20)[:2] == (5, 80)
    placed = schedule()
    resume.set_schedule_step(placed, 4)
    assert engine.lr_scheduler.get_last_lr()[0] == placed.get_last_lr()[0]
    assert trainer._skipped_samples(engine) == 16 and resume.schedule_step(80, 16, 16) == 4
    # nothing skipped (bf16, fp32): the schedule at the step, said as before
    engine = _Engine(schedule(), 0, {"samples": 80})
    trainer._load(engine, ckpt, None, 8, 40)
    assert engine.lr_scheduler.get_last_lr()[0] == unskipped.get_last_lr()[0]
    assert messages[-1].endswith("the learning-rate schedule and the data stream continue from step 10 of 40")


def test_the_trainers_loader_is_seeded_by_the_samples_seen(tmp_path, world, monkeypatch):
    """Trainer._data gives the stream the samples seen at its start step, which seed its segments."""
    from types import SimpleNamespace

    from pipeline import loader
    from pipeline.training import Trainer
    from tests.test_loader import _dataset

    spec = _dataset(str(tmp_path))
    cfg = _small_config(tmp_path, data=[spec], tokenizer=world.tokenizer, batch_size=4, save_every=5, steps=20)
    trainer = Trainer(cfg, {})
    trainer.tokenizer = SimpleNamespace(path=world.tokenizer)
    trainer.model_cfg = SimpleNamespace(decoder=SimpleNamespace(max_seq_len=128), vision=SimpleNamespace(n_tokens=16))
    monkeypatch.setattr(loader, "train_loader", lambda stream, workers, pin_memory=False: [stream])
    stream = next(trainer._data(5, 44, 0, 2, 2, pin_memory=False))  # 44 samples seen: resumed from another global batch
    assert (stream.start_step, stream.start_samples, stream.global_batch) == (5, 44, 16)
    assert stream.segment_samples(10) == 44 + 5 * 16


def test_a_same_numbered_checkpoint_is_kept_until_its_successor_is_written(tmp_path):
    """After a change of the global batch the run renumbers its steps and may save a tag the run before it
    wrote (the one it resumed from): that one is moved aside, not deleted, until the new one is complete."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from pipeline import resume
    from pipeline.training import REPLACED, Trainer

    save_dir = tmp_path / "checkpoints"
    old = save_dir / "step4"
    old.mkdir(parents=True)
    (old / "weights").write_text("the run before")
    seen_during_save = {}

    class Engine:
        skipped_steps = 0

        def save_checkpoint(self, folder, tag, client_state):
            seen_during_save.update(old=sorted(os.listdir(folder)), samples=client_state["samples"])
            os.makedirs(os.path.join(folder, tag))
            with open(os.path.join(folder, tag, "weights"), "w") as f:
                f.write("this run")

    trainer = Trainer.__new__(Trainer)
    trainer.save_dir, trainer._skipped_base = str(save_dir), (0, 0, 4)
    trainer._facts = {"global_batch": 4, "world_size": 1, "zero_stage": 2}
    trainer.cfg = SimpleNamespace(keep_checkpoints=0)
    messages = []
    trainer.on_message = messages.append
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        trainer._save(Engine(), 4, 16, {}, [], 0)
    finally:
        dist.destroy_process_group()
    assert seen_during_save == {"old": [f"step4{REPLACED}"], "samples": 16}, "during the save the old checkpoint is aside, whole"
    assert sorted(os.listdir(save_dir)) == ["step4"] and (save_dir / "step4" / "weights").read_text() == "this run"
    assert resume.read_checkpoint(str(save_dir), "step4").state["samples"] == 16
    assert any(f"kept as {save_dir / ('step4' + REPLACED)}" in m for m in messages)
