"""jobs/train.py through the real deepspeed launcher: 2 ranks on DeepSpeed's CPU accelerator."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
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
from pipeline.shards import TarReader, label_table_path
from pipeline.training import MetricsLog
from schemas import LABEL_TABLE, read_table, write_table
from tests.test_shards import write_tar

pytestmark = pytest.mark.launcher
STEPS = 16


def _launch(repo_root: str, config: dict, ds: str, run_dir: str, wait: bool = True, expect_code: int = 0, ranks: int = 2,
            console_script: bool = False):  # fmt: skip
    """Train with ``config`` under the launcher on ``ranks`` ranks; ``ds``: a jobs/configs name or a JSON file's path.
    ``console_script``: through ``nxtp-train`` (the installed wrapper that execs the launcher) instead of ``deepspeed``."""
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "..", os.path.basename(run_dir) + ".yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(dict(config, run_dir=run_dir), f)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = ray_local.free_port()
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), "jobs/train.py", "--config", cfg_path, "--deepspeed", ds if ds.endswith(".json") else f"jobs/configs/{ds}.json"]
    if console_script:
        cmd = [os.path.join(os.path.dirname(sys.executable), "nxtp-train"), *cmd[1:5], "--", *cmd[6:]]
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
    # DeepSpeed's CPU all-reduce segments (66 MB per rank) are not left in /dev/shm
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"), "shared-memory segments left behind"
    return output


def _damaged_dataset(root, good_shards: str, good_labels: str) -> dict:
    """A dataset of two shards, each of which holds bad data, so that every read of either meets some:

    00090: the first third of a good shard (a truncated tar; its intact samples have labels);
    00091: three good labelled samples, one whose JPEG is corrupt, one whose label list is empty.
    """
    shards, labels = os.path.join(root, "damaged"), os.path.join(root, "damaged_labels")
    os.makedirs(shards)
    good = sorted(f for f in os.listdir(good_shards) if f.endswith(".tar"))[0].removesuffix(".tar")
    data = open(os.path.join(good_shards, f"{good}.tar"), "rb").read()
    with open(os.path.join(shards, "00090.tar"), "wb") as f:
        f.write(data[: len(data) // 3])
    table = read_table(label_table_path(good_labels, good), LABEL_TABLE)
    write_table(table.set_column(1, "shard", pa.array(["00090"] * table.num_rows)), label_table_path(labels, "00090"), LABEL_TABLE)
    images = [s.data["jpg"] for s in TarReader(os.path.join(good_shards, f"{good}.tar"))][:4]
    members = [(f"00910000{i}", {"jpg": image, "txt": b"a star"}) for i, image in enumerate(images)]
    members[3][1]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    members.append(("009100009", {"jpg": images[0], "txt": b""}))
    write_tar(os.path.join(shards, "00091.tar"), members)
    keys = [key for key, _ in members]
    rows = {"key": keys, "shard": ["00091"] * 5, "caption": ["a star"] * 4 + [""], "labels": [["star"]] * 4 + [[]], "extractor": ["spacy"] * 5}
    write_table(pa.table(rows), label_table_path(labels, "00091"), LABEL_TABLE)
    return {"name": "damaged", "shards": shards, "labels": labels, "weight": 0.5}


@pytest.fixture(scope="module")
def train_setup(labelled_shards, world, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    shards, labels = str(root / "shards"), str(root / "labels")
    shutil.copytree(labelled_shards["train"][0], shards)
    shutil.copytree(labelled_shards["train"][1], labels)
    config = {
        "model": "tiny",
        "tokenizer": world.tokenizer,
        "image_size": 64,
        "data": [{"name": "world", "shards": shards, "labels": labels, "weight": 1.0}, _damaged_dataset(str(root), shards, labels)],
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


def test_stream_counts_each_kind_of_bad_data(train_setup, world):
    """The loader driven directly, one shard per stream, so that the bad data is certainly read."""
    from pipeline.loader import DatasetSpec, TrainStream

    _, config = train_setup
    damaged = config["data"][1]

    def first_batch_stats(shard: str, batch: int) -> dict:
        spec = DatasetSpec("d", os.path.join(damaged["shards"], f"{shard}.tar"), damaged["labels"])
        stream = TrainStream([spec], world.tokenizer, 64, batch, seed=0, shuffle_buffer=1, max_text_len=48)
        return next(iter(stream))["stats"]

    # more samples per batch than the shard's intact (or usable) ones: the batch needs a second read of it
    truncated = first_batch_stats("00090", batch=32)
    assert truncated["bad_shards"] >= 1 and truncated["samples"] == 32, truncated
    bad_rows = first_batch_stats("00091", batch=4)
    assert bad_rows["corrupt_images"] >= 1 and bad_rows["no_labels"] >= 1 and "bad_shards" not in bad_rows, bad_rows


@pytest.fixture(scope="module")
def zero2_run(train_setup, repo_root):
    root, config = train_setup
    run = str(root / "zero2")
    output = _launch(repo_root, dict(config, report_to=["tensorboard", "wandb"], wandb_mode="offline"), "zero2", run)
    return run, output


def test_zero2_loss_falls_and_bad_data_is_counted(zero2_run):
    run, output = zero2_run
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    # each dataset's own label loss, where the logged step drew it (world: 2 of 3 draws, always)
    assert all(r["loss/world"] > 0 for r in rows) and any("loss/damaged" in r for r in rows), rows
    data = rows[-1]["data"]
    assert data["bad_shards"] >= 1 and data["corrupt_images"] >= 1, data
    assert data["no_labels"] >= 1, data
    assert "data skipped so far" in output and "bad_shards" in output
    checkpoints = set(os.listdir(os.path.join(run, "checkpoints")))
    assert {"latest", f"step{STEPS}"} <= checkpoints
    assert not os.path.exists(os.path.join(run, "checkpoints", "step8")), "keep_checkpoints: 1 pruned the older one"
    assert os.path.getsize(os.path.join(run, "loss.png")) > 1000
    assert json.load(open(os.path.join(run, "train_config.json")))["steps"] == STEPS
    filled = json.load(open(os.path.join(run, "ds_config.json")))
    assert "auto" not in json.dumps(filled) and filled["train_batch_size"] == 2 * 8, "jobs/configs/zero2.json's autos, filled"


def test_metrics_reach_tensorboard_and_an_offline_wandb_run(zero2_run):
    """--report-to tensorboard,wandb: every logged step's loss in both, equal to metrics.jsonl's."""
    from tests.test_tracking import tensorboard_scalars
    from tests.wandb_records import history, run_id

    run, _ = zero2_run
    losses = [(r["step"], r["loss"]) for r in MetricsLog.read(os.path.join(run, "metrics.jsonl"))]
    scalars = tensorboard_scalars(run)
    board = scalars["train/loss"]
    assert [s for s, _ in board] == [s for s, _ in losses]
    assert [v for _, v in board] == pytest.approx([v for _, v in losses], rel=1e-6)  # float32 in the event file
    world_losses = [(r["step"], r["loss/world"]) for r in MetricsLog.read(os.path.join(run, "metrics.jsonl"))]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["train/loss/world"]] == world_losses
    (folder,) = glob.glob(os.path.join(run, "wandb", "offline-run-*"))
    with open(os.path.join(run, "wandb_run_id.txt")) as f:
        assert run_id(folder) == f.read().strip()
    logged = [(row["_step"], row["train/loss"]) for row in history(folder) if "train/loss" in row]
    assert logged == [(s, pytest.approx(v)) for s, v in losses]
    assert [(row["_step"], row["train/loss/world"]) for row in history(folder) if "train/loss" in row] == [(s, pytest.approx(v)) for s, v in world_losses]


def test_exported_model_loads_in_infer(zero2_run, world, capsys):
    from jobs import infer

    run, _ = zero2_run
    image = next(f"{world.root}/{s['file']}" for s in world.samples("val") if s["kind"] == "good")
    assert infer.main(["--checkpoint", os.path.join(run, "export"), "--image", image, "--format", "json", "--num-labels", "5"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["labels"] and len(result["labels"]) <= 5
    card = open(os.path.join(run, "export", "README.md")).read()  # the model card says what the trainer knew
    assert f"Trained for {STEPS} optimizer steps" in card and "| bad_shards |" in card and "| lr | 0.002 |" in card


def test_killed_run_resumes_with_the_same_losses(train_setup, zero2_run, repo_root):
    root, config = train_setup
    run = str(root / "killed")
    proc, log = _launch(repo_root, config, "zero2", run, wait=False)
    latest = os.path.join(run, "checkpoints", "latest")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(latest) and open(latest).read().strip() == "step8":
                os.killpg(proc.pid, signal.SIGSTOP)  # frozen at once: 8 more steps could not have run
                break
            time.sleep(0.01)
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
        assert a["loss/world"] == pytest.approx(b["loss/world"], rel=1e-5), (a["step"], a["loss/world"], b["loss/world"])


def test_zero3_with_the_papers_freezing_policy_and_per_dataset_batches(train_setup, world, repo_root, tmp_path):
    """ZeRO-3 with the paper's freezing; the data as per-dataset batch sizes: 6 world + 2 damaged samples in
    every micro-batch of both ranks, so that every logged step has both datasets' losses."""
    root, config = train_setup
    tok = Tokenizer(world.tokenizer)
    torch.manual_seed(0)
    initial = NxTP(tiny_config(tok.n_base, image_size=64))
    initial.init_weights()
    init_dir = save_pretrained(initial, tok, str(tmp_path / "init"))
    run = str(root / "zero3")
    data = [{k: v for k, v in d.items() if k != "weight"} for d in config["data"]]
    frozen_cfg = dict(config, model=init_dir, tokenizer=None, train_vision_blocks=1, train_embeddings="special", steps=8, save_every=8, lr=5e-3,
                      data=data, batch_sizes={"world": 6, "damaged": 2})  # fmt: skip
    output = _launch(repo_root, frozen_cfg, "zero3", run)
    assert "world: 6 of every micro-batch's 8 samples (75.0%)" in output and "damaged: 2 of every micro-batch's 8 samples (25.0%)" in output
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    assert all(r["loss/world"] > 0 and r["loss/damaged"] > 0 for r in rows), rows
    assert json.load(open(os.path.join(run, "train_config.json")))["batch_sizes"] == {"world": 6, "damaged": 2}
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


def test_a_labels_folder_without_label_tables_is_refused_before_the_model_is_built(repo_root, tmp_path):
    """An input the loader would fail on after the model is built: said once (rank 0), exit 2, the run folder left empty."""
    shards, labels = tmp_path / "shards", tmp_path / "not_labels"
    os.makedirs(shards)
    os.makedirs(labels)
    open(shards / "00000.tar", "wb").close()
    (tmp_path / "tokenizer.model").write_bytes(b"")
    config = {"model": "tiny", "tokenizer": str(tmp_path / "tokenizer.model"), "data": [{"name": "a", "shards": str(shards), "labels": str(labels)}],
              "steps": 2, "num_workers": 0, "report_to": ["none"]}  # fmt: skip
    run = str(tmp_path / "run")
    output = _launch(repo_root, config, "zero2", run, expect_code=2)
    assert output.count(f"error: dataset a: no label tables in {labels}/labels") == 1, output[-3000:]  # 2 ranks, said once
    assert "Traceback" not in output, output[-3000:]
    assert os.listdir(run) == []  # no train_config.json, ds_config.json or metrics.jsonl
