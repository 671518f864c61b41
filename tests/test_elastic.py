"""Training on two nodes (the deepspeed launcher's per-node mode, --no_ssh, on this one machine) and
resuming on another number of ranks (a DeepSpeed universal checkpoint, the run continued by samples seen).

The launched runs share one module fixture each: a 2-node ZeRO-2 run that the resume tests continue
(on 1 rank from another run folder, on 3 ranks in a copy of its own), and a 2-node ZeRO-3 run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest
import torch

from model.checkpoint import load_pretrained
from pipeline import ray_local, resume
from pipeline.loader import DatasetSpec, TrainStream, rank_shards, resolve_mixture, share_weights
from pipeline.training import MetricsLog, lr_schedule, state_dict_from_checkpoint
from tests.test_ds_config import schedule_lrs
from tests.test_train import _launch, train_setup  # noqa: F401 - train_setup: the tiny world and damaged data, as a fixture here


def _share(names: list[str], rank: int, world: int) -> set[str]:
    """Rank ``rank``'s shards: all when there are fewer than ranks; else its own of the evenly dividing ones and
    the last len(names) % world, which every rank shares."""
    if len(names) < world:
        return set(names)
    even = len(names) - len(names) % world
    return set(names[rank:even:world]) | set(names[even:])


def _shared(names: list[str], world: int) -> set[str]:
    """The shards more than one rank reads."""
    return set(names) if len(names) < world else set(names[len(names) - len(names) % world :])


# ----------------------------------------------------------------------------- without the launcher


def test_rank_shards_are_disjoint_when_there_are_enough():
    shards = [f"{i:05d}" for i in range(7)]
    assert [rank_shards(shards[:6], r, 3) for r in range(3)] == [["00000", "00003"], ["00001", "00004"], ["00002", "00005"]]
    assert share_weights(6, 3) is None, "an even split: each rank draws its own uniformly"
    # 7 on 3: the 7th is every rank's, drawn at a third of an own shard's weight
    assert [rank_shards(shards, r, 3) for r in range(3)] == [["00000", "00003", "00006"], ["00001", "00004", "00006"], ["00002", "00005", "00006"]]
    assert share_weights(7, 3) == [3, 3, 1]
    assert rank_shards(shards[:2], 2, 3) == shards[:2], "fewer shards than ranks: every rank reads all"
    assert share_weights(2, 3) is None
    for n in range(1, 30):  # over the ranks, every shard is drawn equally often (exactly, in fractions)
        for world in range(1, 9):
            drawn = Counter()
            for rank in range(world):
                share, weights = rank_shards(list(range(n)), rank, world), share_weights(n, world)
                weights = weights or [1] * len(share)
                drawn.update({s: Fraction(w, sum(weights)) for s, w in zip(share, weights)})
            assert set(drawn) == set(range(n)) and set(drawn.values()) == {Fraction(world, n)}, (n, world, drawn)
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        rank_shards(shards, 3, 3)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_rank_streams_only_its_share(labelled_shards, world, world_size):
    """TrainStream driven directly for ranks 0..W-1 with one seed: the shards each rank's batches came from
    (the stream's own record) are its share, disjoint between ranks while there are at least W shards (but for
    the last 3 % W, which every rank reads)."""
    shards, labels = labelled_shards["train"]
    spec = DatasetSpec("world", shards, labels)
    names = [f"world/{s.name}" for s in spec.find()]
    assert len(names) == 3, names
    read = []
    for rank in range(world_size):
        share = _share(names, rank, world_size)
        stream = iter(TrainStream([spec], world.tokenizer, 64, 4, seed=5, rank=rank, world_size=world_size, shuffle_buffer=1, max_text_len=48))
        # until the rank has read its whole share (how many batches that takes depends on the shards' sizes,
        # which depend on what the download fixture got): every shard it reads on the way is in its share
        for _ in range(400):
            shards_read = set(next(stream)["stats"]["shards_read"])
            assert shards_read <= share, (rank, shards_read, share)
            if shards_read == share:
                break
        read.append(shards_read)
        assert read[-1] == share, (rank, read[-1], share)
    if world_size <= len(names):
        assert all(a & b == _shared(names, world_size) for i, a in enumerate(read) for b in read[i + 1 :]), read
        assert set().union(*read) == set(names)
    line = resolve_mixture([spec], None).describe(world_size)[0]
    if world_size == len(names):
        assert f"3 shards over {world_size} ranks: each rank reads only its own (shard i on rank i mod {world_size}), disjoint" in line
    elif world_size < len(names):
        assert (
            "3 shards over 2 ranks: each rank reads only its own (shard i on rank i mod 2) and every rank the last 1 (of the 3 not dividing "
            "evenly), each at 1/2 of an own shard's weight so that every shard is drawn equally often; ranks may draw the same samples of those"
        ) in line
    else:
        assert "only 3 shard(s) for 4 ranks: every rank reads all of them, so ranks may draw the same samples" in line


def test_schedule_is_put_where_the_same_number_of_steps_leaves_it():
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    for build in (lambda o: lr_schedule(o, 3, 20, 1e-4), lambda o: WarmupDecayLR(o, total_num_steps=20, warmup_max_lr=2e-3, warmup_num_steps=3)):
        stepped = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        placed = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        schedule, target = build(stepped), build(placed)
        for step in range(1, 12):
            stepped.step()
            schedule.step()
            resume.set_schedule_step(target, step)
            assert placed.param_groups[0]["lr"] == stepped.param_groups[0]["lr"], (type(schedule).__name__, step)


def test_config_changes_and_the_changes_that_break_a_run():
    old = {"lr": 0.002, "epochs": 1.0, "resume": "auto", "train_embeddings": "special", "data": [{"name": "a"}]}
    new = {"lr": 1e-12, "epochs": 1.0, "resume": "/x", "train_embeddings": "all", "data": [{"name": "b"}]}
    assert resume.config_changes(old, new) == ["lr: 0.002 -> 1e-12", 'train_embeddings: "special" -> "all"', 'data: [{"name": "a"}] -> [{"name": "b"}]']
    with pytest.raises(resume.ResumeError, match='train_embeddings changed: "special" in the checkpoint\'s run, "all" now'):
        resume.check_unchanged({"train_config": old}, new)
    resume.check_unchanged({"train_config": old}, dict(old, lr=1.0, epochs=3.0))  # the schedule may change
    state = {"model_config": {"decoder": {"dim": 64, "n_layers": 2}}, "tokenizer": {"path": "/a/tok.model", "sha256": "ab" * 32}}
    resume.check_model(state, {"decoder": {"dim": 64, "n_layers": 2}}, "ab" * 32)
    with pytest.raises(resume.ResumeError, match="model.decoder.dim: 64 -> 128"):
        resume.check_model(state, {"decoder": {"dim": 128, "n_layers": 2}}, "ab" * 32)
    with pytest.raises(resume.ResumeError, match="tokenizer changed: sha256 ababababab"):
        resume.check_model(state, {"decoder": {"dim": 64, "n_layers": 2}}, "cd" * 32)
    assert resume.resume_step(40, 12) == (3, 4) and resume.resume_step(32, 4) == (8, 0)
    written = resume.Checkpoint("/runs/a/checkpoints", "step4", world_size=2, zero_stage=3, state=None)
    resume.check_stage(written, 3)
    with pytest.raises(resume.ResumeError, match="ZeRO stage changed: 3 in the checkpoint's run .*, 2 now"):
        resume.check_stage(written, 2)


def test_metrics_log_keeps_the_lines_up_to_the_checkpoints_samples(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "samples": 8 * s, "loss": 1.0}) + "\n" for s in range(1, 7))
    MetricsLog(path, resume_step=3, resume_samples=40)  # 40 samples: the 3rd step of a global batch of 12
    assert [r["step"] for r in MetricsLog.read(path)] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- two nodes, then other world sizes


def _launch_nodes(repo_root: str, config: dict, ds: str, run_dir: str, nodes: int = 2) -> str:
    """Train under ``nodes`` launcher invocations, one per "node" of a hostfile, each with --no_ssh and its
    --node_rank (what a scheduler runs on each node); returns node 0's output."""
    import yaml

    os.makedirs(run_dir, exist_ok=True)
    base = os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir))
    with open(base + ".yaml", "w") as f:
        yaml.safe_dump(dict(config, run_dir=run_dir), f)
    with open(base + ".hosts", "w") as f:
        f.writelines(f"node{i} slots=1\n" for i in range(nodes))  # names that resolve nowhere: --no_ssh never uses them
    deepspeed, port = os.path.join(os.path.dirname(sys.executable), "deepspeed"), ray_local.free_port()
    # the "nodes" share this machine's cores (real nodes would each have their own)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = []
    for node in range(nodes):
        cmd = [deepspeed, "--hostfile", base + ".hosts", "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "jobs/train.py", "--config", base + ".yaml", "--deepspeed", f"jobs/configs/{ds}.json"]  # fmt: skip
        log = open(f"{base}.node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env), log.name))
    try:
        codes = [p.wait(timeout=420) for p, _ in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    outputs = [open(name).read() for _, name in procs]
    assert codes == [0] * nodes, f"exit codes {codes}:\n" + "\n".join(out[-3000:] for out in outputs)
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"), "shared-memory segments left behind"
    return outputs[0]


def _consolidated(save_dir: str, tag: str) -> dict[str, torch.Tensor]:
    with contextlib.redirect_stdout(io.StringIO()):
        return state_dict_from_checkpoint(save_dir, tag)


def _assert_export_is(run: str, weights: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    exported, _ = load_pretrained(os.path.join(run, "export"))
    state = exported.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=atol, msg=key)


def _assert_disjoint_reads(state: dict, names: dict[str, list[str]]) -> None:
    """The shards each rank read (run_state.json's per-rank record): its own share of each dataset with at
    least world-size shards, so that no two ranks read the same shard of it but the ones every rank shares."""
    world = state["world_size"]
    reads = [set(r["shards_read"]) for r in state["data_by_rank"]]
    assert len(reads) == world and all(reads), reads
    for dataset, shards in names.items():
        full = [f"{dataset}/{s}" for s in shards]
        mine = [{s for s in r if s.startswith(dataset + "/")} for r in reads]
        for rank in range(world):
            assert mine[rank] <= _share(full, rank, world), (dataset, rank, mine[rank])
        if len(full) >= world:
            assert all(a & b <= _shared(full, world) for i, a in enumerate(mine) for b in mine[i + 1 :]), (dataset, mine)


def _schedule_lrs(lr: float, warmup: int, total: int, min_lr: float = 0.0) -> list[float]:
    """lr of each update 0..total-1 of the config's schedule."""
    return schedule_lrs(lambda optimizer: lr_schedule(optimizer, warmup, total, min_lr), lr, total)


def _shard_names(config: dict) -> dict[str, list[str]]:
    return {d["name"]: [s.name for s in DatasetSpec(d["name"], d["shards"], d["labels"]).find()] for d in config["data"]}


@pytest.fixture(scope="module")
def elastic_setup(train_setup):  # noqa: F811
    """The tiny world and the damaged dataset (3 and 2 shards), 40 samples an epoch, a frozen ViT but for its
    last block, so that 2 ranks train 5 steps of global batch 8 with checkpoints at steps 2, 4 and 5."""
    root, config = train_setup
    return root, dict(config, steps=0, epochs=1, samples_per_epoch=40, batch_size=4, warmup_steps=2, save_every=2,
                      keep_checkpoints=2, train_vision_blocks=1, train_embeddings="special", report_to=["none"])  # fmt: skip


@pytest.fixture(scope="module")
def two_nodes(elastic_setup, repo_root):
    root, config = elastic_setup
    run = str(root / "two_nodes")
    return run, _launch_nodes(repo_root, config, "zero2", run)


@pytest.mark.launcher
def test_two_nodes_train_on_disjoint_shards_and_export_their_checkpoint(two_nodes, elastic_setup):
    run, output = two_nodes
    _, config = elastic_setup
    assert "world: weight 1 = 66.7% of the draws; 3 shards over 2 ranks: each rank reads only its own" in output
    assert '"world_size": 2' in output and '"nodes": 2' in output  # DeepSpeed's estimate saw 2 nodes of 1 rank
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert [(r["step"], r["samples"]) for r in rows] == [(s, 8 * s) for s in range(1, 6)]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step4", "step5", "zero_to_fp32.py", "zero_to_torch.py"]
    with open(os.path.join(run, "checkpoints", "step5", resume.RUN_STATE)) as f:
        state = json.load(f)
    assert {k: state[k] for k in ("step", "samples", "world_size", "global_batch", "zero_stage")} == {
        "step": 5, "samples": 40, "world_size": 2, "global_batch": 8, "zero_stage": 2}  # fmt: skip
    assert state["train_config"]["train_embeddings"] == "special" and state["model_config"]["decoder"]["dim"] > 0
    assert [r["stats"]["samples"] for r in state["data_by_rank"]] == [20, 20]  # 5 steps x 4 samples each
    _assert_disjoint_reads(state, _shard_names(config))
    _assert_export_is(run, _consolidated(os.path.join(run, "checkpoints"), "step5"))


@pytest.mark.launcher
def test_where_a_run_resumes_from(two_nodes, tmp_path):
    run, _ = two_nodes
    save_dir = os.path.join(run, "checkpoints")
    assert resume.find_checkpoint("auto", save_dir).tag == "step5"
    assert resume.find_checkpoint("auto", str(tmp_path / "fresh" / "checkpoints")) is None
    assert resume.find_checkpoint("never", str(tmp_path / "fresh" / "checkpoints")) is None
    with pytest.raises(resume.ResumeError, match="already holds checkpoints .*step5.* choose another --run-dir"):
        resume.find_checkpoint("never", save_dir)
    by_tag, by_folder = resume.find_checkpoint(os.path.join(save_dir, "step4"), str(tmp_path)), resume.find_checkpoint(save_dir, str(tmp_path))
    assert (by_tag.tag, by_tag.state["samples"], by_folder.tag) == ("step4", 32, "step5")
    other = tmp_path / "other" / "checkpoints"  # a run folder with checkpoints of its own
    shutil.copytree(save_dir, other)
    with pytest.raises(resume.ResumeError, match="already holds checkpoints of its own run .* mix the two"):
        resume.find_checkpoint(os.path.join(save_dir, "step4"), str(other))
    # without its run_state.json (a run killed between DeepSpeed's save and that file): counted from the files
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(save_dir, "step4"), bare / "step4")
    os.remove(bare / "step4" / resume.RUN_STATE)
    counted = resume.read_checkpoint(str(bare), "step4")
    assert (counted.world_size, counted.zero_stage, counted.state) == (2, 2, None)


@pytest.mark.launcher
def test_a_conversion_is_reused_and_keeps_the_frozen_parameters(two_nodes, tmp_path):
    run, _ = two_nodes
    ckpt = resume.read_checkpoint(os.path.join(run, "checkpoints"), "step4")
    out = resume.convert_to_universal(ckpt, str(tmp_path))
    assert out == str(tmp_path / "universal" / "step4") and sorted(os.listdir(tmp_path / "universal")) == ["step4"]
    stamp = os.path.getmtime(os.path.join(out, resume.SOURCE))
    assert resume.convert_to_universal(ckpt, str(tmp_path)) == out and os.path.getmtime(os.path.join(out, resume.SOURCE)) == stamp
    frozen = torch.load(os.path.join(out, resume.FROZEN), weights_only=True)
    weights = _consolidated(os.path.join(run, "checkpoints"), "step4")
    assert frozen and all(name.startswith(("vision.", "decoder.embed.base")) for name in frozen)  # the ViT but its last block, the embedding table
    for name, value in frozen.items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.launcher
def test_a_two_rank_checkpoint_resumes_on_one_rank_in_another_run(two_nodes, elastic_setup, repo_root):
    """From step4 of the 2-rank run (32 samples, global batch 8) on 1 rank (global batch 4): step 32 / 4 = 8 of
    40 / 4 = 10. DeepSpeed alone refuses this ("Automatic adjustment of ZeRO's optimizer state partitioning with
    a new world size is not currently supported"); the checkpoint is converted to a universal one. With a
    learning rate of 1e-12 the two steps leave the weights where they were: the run loaded what was saved."""
    run, _ = two_nodes
    root, config = elastic_setup
    new = str(root / "one_rank")
    output = _launch(repo_root, dict(config, resume=os.path.join(run, "checkpoints", "step4"), lr=1e-12), "zero2", new, ranks=1)
    assert f"resuming from {run}/checkpoints/step4: step 4, 32 samples seen, written by 2 rank(s) (global batch 8, ZeRO-2)" in output
    changes = output.split("changes since that checkpoint:\n")[1].split("\n")[:6]
    assert changes[:2] == ["  world size: 2 -> 1", "  global batch: 8 -> 4"], changes
    assert {f'  run_dir: "{run}" -> "{new}"', "  lr: 0.002 -> 1e-12"} <= set(changes), changes  # and the preset's path
    universal = os.path.join(new, "checkpoints", "universal", "step4")
    assert f"resumed from {run}/checkpoints/step4 at step 8 (universal checkpoint {universal}): 32 samples seen / global batch 4 = step 8;" in output
    rows = MetricsLog.read(os.path.join(new, "metrics.jsonl"))
    assert [(r["step"], r["samples"]) for r in rows] == [(9, 36), (10, 40)]
    expected = _schedule_lrs(1e-12, 2, 10)
    assert [r["lr"] for r in rows] == [pytest.approx(expected[8], rel=1e-9), pytest.approx(expected[9], rel=1e-9)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert not os.path.exists(os.path.join(new, "checkpoints", "universal")), "removed once the run had a checkpoint of its own"
    with open(os.path.join(new, "checkpoints", "step10", resume.RUN_STATE)) as f:
        state = json.load(f)
    assert (state["world_size"], state["global_batch"], state["samples"]) == (1, 4, 40)
    _assert_export_is(new, _consolidated(os.path.join(run, "checkpoints"), "step4"), atol=1e-9)
    assert not os.path.exists(os.path.join(run, "checkpoints", "universal")), "the other run's folder is only read"


@pytest.mark.launcher
def test_a_two_rank_run_continues_on_three_ranks_by_samples_seen(two_nodes, elastic_setup, repo_root):
    """The 2-rank run, copied, continued on 3 ranks for a second epoch: 40 samples seen / global batch 12 is
    step 3 (4 samples past it), of 2 x ceil(40 / 12) = 8; the schedule continues there and so does the loss."""
    run, _ = two_nodes
    root, config = elastic_setup
    copy = str(root / "three_ranks")
    shutil.copytree(run, copy)
    output = _launch(repo_root, dict(config, epochs=2), "zero2", copy, ranks=3)
    assert "changes since that checkpoint:\n  world size: 2 -> 3\n  global batch: 8 -> 12\n" in output
    assert re.search(r"\n  epochs: 1(\.0)? -> 2(\.0)?\n", output)
    assert "damaged: weight 0.5 = 33.3% of the draws; only 2 shard(s) for 3 ranks: every rank reads all of them" in output
    assert f"at step 3 (universal checkpoint {copy}/checkpoints/universal/step5): 40 samples seen / global batch 12 = step 3, 4 samples past it (not a multiple)" in output
    rows = MetricsLog.read(os.path.join(copy, "metrics.jsonl"))
    assert [(r["step"], r["samples"]) for r in rows] == [(s, 8 * s) for s in range(1, 6)] + [(s, 40 + 12 * (s - 3)) for s in range(4, 9)]
    expected = _schedule_lrs(config["lr"], 2, 8)
    assert [r["lr"] for r in rows[5:]] == [pytest.approx(expected[s - 1], rel=1e-9) for s in range(4, 9)]
    before, after = [r["loss"] for r in rows[:5]], [r["loss"] for r in rows[5:]]
    assert max(after[:2]) < min(before[:2]) - 0.3, (before, after)  # it went on from the trained weights
    with open(os.path.join(copy, "checkpoints", "step8", resume.RUN_STATE)) as f:
        state = json.load(f)
    assert (state["world_size"], state["samples"], state["step"]) == (3, 100, 8)
    _assert_disjoint_reads(state, _shard_names(config))
    assert os.path.isfile(os.path.join(copy, "export", "config.json"))


@pytest.mark.launcher
def test_a_change_that_breaks_the_run_is_refused_before_training(two_nodes, elastic_setup, repo_root):
    run, _ = two_nodes
    root, config = elastic_setup
    copy = str(root / "refused")
    shutil.copytree(run, copy)
    before = {p: os.path.getmtime(os.path.join(copy, p)) for p in ("train_config.json", "metrics.jsonl", "checkpoints/latest")}
    output = _launch(repo_root, dict(config, train_embeddings="all"), "zero2", copy, ranks=1, expect_code=2)
    assert 'error: train_embeddings changed: "special" in the checkpoint\'s run, "all" now; which parameters train cannot change within a run' in output
    assert "  train_embeddings: \"special\" -> \"all\"" in output  # the changes are said first
    assert {p: os.path.getmtime(os.path.join(copy, p)) for p in before} == before
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == sorted(os.listdir(os.path.join(run, "checkpoints")))


@pytest.mark.launcher
def test_two_nodes_with_zero3_then_one_rank(elastic_setup, repo_root):
    """ZeRO-3 over two nodes (2 steps), its export equal to its checkpoint; then on 1 rank with a learning rate
    of 1e-12: the universal checkpoint loads the weights saved, and the optimizer keeps this config's groups
    (DeepSpeed's ZeRO-3 universal load gives every group the first one's settings, here weight decay 0.1)."""
    root, config = elastic_setup
    run = str(root / "zero3_nodes")
    _launch_nodes(repo_root, dict(config, steps=2), "zero3", run)
    with open(os.path.join(run, "checkpoints", "step2", resume.RUN_STATE)) as f:
        state = json.load(f)
    assert (state["zero_stage"], state["world_size"], state["samples"]) == (3, 2, 16)
    _assert_disjoint_reads(state, _shard_names(config))
    weights = _consolidated(os.path.join(run, "checkpoints"), "step2")
    _assert_export_is(run, weights)
    new = str(root / "zero3_one_rank")
    output = _launch(repo_root, dict(config, steps=6, lr=1e-12, resume=os.path.join(run, "checkpoints")), "zero3", new, ranks=1)
    assert "16 samples seen / global batch 4 = step 4;" in output
    start = output.index('"optimizer_groups": ')
    groups, _ = json.JSONDecoder().raw_decode(output[start + len('"optimizer_groups": ') :])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # matrices, and the rest (TrainConfig's default weight decay)
    assert [r["step"] for r in MetricsLog.read(os.path.join(new, "metrics.jsonl"))] == [5, 6]
    _assert_export_is(new, weights, atol=1e-9)
