"""jobs/train.py through the real deepspeed launcher: 2 ranks on DeepSpeed's CPU accelerator."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pytest
import torch
import yaml

from model.checkpoint import load_pretrained, save_pretrained
from model.config import tiny_config
from model.nxtp import NxTP
from model.tokenizer import Tokenizer
from pipeline import ray_local
from pipeline.training import MetricsLog
from schemas import LABEL_TABLE, write_table

pytestmark = pytest.mark.launcher
STEPS = 16


def _launch(repo_root: str, config: dict, ds: str, run_dir: str, wait: bool = True, expect_code: int = 0):
    """Train with ``config`` under the launcher; ``ds``: a jobs/configs name or a JSON file's path."""
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "..", os.path.basename(run_dir) + ".yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(dict(config, run_dir=run_dir), f)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(ray_local.free_port()), "jobs/train.py", "--config", cfg_path, "--deepspeed", ds if ds.endswith(".json") else f"jobs/configs/{ds}.json"]
    log = open(os.path.join(run_dir, "..", os.path.basename(run_dir) + ".log"), "w")
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if not wait:
        return proc, log.name
    try:
        code = proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = open(log.name).read()
    assert code == expect_code, f"training exited {code}, not {expect_code}:\n{output[-4000:]}"
    return output


def _add_bad_shards(shards: str, labels: str) -> None:
    """A truncated tar, and a readable shard whose one sample has a corrupt JPEG."""
    good = sorted(f for f in os.listdir(shards) if f.endswith(".tar"))[0]
    data = open(os.path.join(shards, good), "rb").read()
    with open(os.path.join(shards, "00090.tar"), "wb") as f:
        f.write(data[: len(data) // 3])
    write_table(
        pa.table({"key": ["009100000"], "shard": ["00091"], "caption": ["a red star on the table"], "labels": [["star", "table"]], "extractor": ["spacy"]}),
        os.path.join(labels, "labels", "00091.parquet"),
        LABEL_TABLE,
    )
    write_table(
        pa.table({"key": ["009000000"], "shard": ["00090"], "caption": ["a red star on the table"], "labels": [["star", "table"]], "extractor": ["spacy"]}),
        os.path.join(labels, "labels", "00090.parquet"),
        LABEL_TABLE,
    )
    with tarfile.open(os.path.join(shards, "00091.tar"), "w") as tar:
        for name, payload in (("009100000.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"), ("009100000.txt", b"a red star on the table")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def train_setup(labelled_shards, world, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    shards, labels = str(root / "shards"), str(root / "labels")
    shutil.copytree(labelled_shards["train"][0], shards)
    shutil.copytree(labelled_shards["train"][1], labels)
    _add_bad_shards(shards, labels)
    config = {
        "model": "tiny",
        "tokenizer": world.tokenizer,
        "image_size": 64,
        "data": [{"name": "world", "shards": shards, "labels": labels, "weight": 1.0}],
        "train_vision_blocks": -1,
        "train_embeddings": "all",
        "batch_size": 8,
        "lr": 2e-3,
        "warmup_steps": 3,
        "steps": STEPS,
        "save_every": 8,
        "keep_checkpoints": 1,
        "log_every": 1,
        "num_workers": 1,
        "shuffle_buffer": 16,
        "max_text_len": 48,
        "seed": 3,
    }
    return root, config


@pytest.fixture(scope="module")
def zero2_run(train_setup, repo_root):
    root, config = train_setup
    run = str(root / "zero2")
    output = _launch(repo_root, config, "zero2", run)
    return run, output


def test_zero2_loss_falls_and_bad_data_is_counted(zero2_run):
    run, output = zero2_run
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    data = rows[-1]["data"]
    assert data["bad_shards"] >= 1 and data["corrupt_images"] >= 1, data
    assert data["no_labels"] >= 1, "the world's empty captions give samples without labels"
    assert "data skipped so far" in output and "bad_shards" in output
    checkpoints = set(os.listdir(os.path.join(run, "checkpoints")))
    assert {"latest", f"step{STEPS}"} <= checkpoints
    assert not os.path.exists(os.path.join(run, "checkpoints", "step8")), "keep_checkpoints: 1 pruned the older one"
    assert os.path.getsize(os.path.join(run, "loss.png")) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))
    assert json.load(open(os.path.join(run, "train_config.json")))["steps"] == STEPS
    filled = json.load(open(os.path.join(run, "ds_config.json")))
    assert "auto" not in json.dumps(filled) and filled["train_batch_size"] == 2 * 8, "jobs/configs/zero2.json's autos, filled"


def test_exported_model_loads_in_infer(zero2_run, world, capsys):
    from jobs import infer

    run, _ = zero2_run
    image = next(f"{world.root}/{s['file']}" for s in world.samples("val") if s["kind"] == "good")
    assert infer.main(["--checkpoint", os.path.join(run, "export"), "--image", image, "--format", "json", "--num-labels", "5"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["labels"] and len(result["labels"]) <= 5


def test_killed_run_resumes_with_the_same_losses(train_setup, zero2_run, repo_root):
    root, config = train_setup
    run = str(root / "killed")
    proc, log = _launch(repo_root, config, "zero2", run, wait=False)
    latest = os.path.join(run, "checkpoints", "latest")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(latest) and open(latest).read().strip() == "step8":
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{open(log).read()[-3000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert len(MetricsLog.read(os.path.join(run, "metrics.jsonl"))) < STEPS
    output = _launch(repo_root, config, "zero2", run)
    assert f"resumed from {os.path.join(run, 'checkpoints', 'step8')} at step 8" in output
    resumed = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    reference = MetricsLog.read(os.path.join(zero2_run[0], "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])


def test_zero3_with_the_papers_freezing_policy(train_setup, world, repo_root, tmp_path):
    root, config = train_setup
    tok = Tokenizer(world.tokenizer)
    torch.manual_seed(0)
    initial = NxTP(tiny_config(tok.n_base, image_size=64))
    initial.init_weights()
    init_dir = save_pretrained(initial, tok, str(tmp_path / "init"))
    run = str(root / "zero3")
    frozen_cfg = dict(config, model=init_dir, tokenizer=None, train_vision_blocks=1, train_embeddings="special", steps=8, save_every=8, lr=5e-3)
    _launch(repo_root, frozen_cfg, "zero3", run)
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    trained, _ = load_pretrained(os.path.join(run, "export"))
    before, after = initial.state_dict(), trained.state_dict()
    last = len(initial.vision.vit.transformer.resblocks) - 1
    for key in before:
        changed = not torch.equal(before[key], after[key])
        trains = (
            key.startswith(("decoder.layers.", "decoder.norm.", "decoder.lm_head.", "vision.proj.", "vision.vit.ln_post."))
            or key.startswith(f"vision.vit.transformer.resblocks.{last}.")
            or key == "decoder.embed.special"
        )
        assert changed == trains, f"{key}: {'changed' if changed else 'unchanged'}"
    assert torch.equal(before["decoder.embed.base.weight"], after["decoder.embed.base.weight"]), "ordinary embedding rows stay"
