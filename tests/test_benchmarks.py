"""Benchmark plumbing that must hold on any device: the sampling benchmark's memory sizing,
its result file, and the GPU suite's command line (run for real at CPU shapes elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml

from benchmarks import sampling_bench, train_bench
from model.config import g3m_config

GIB = 2**30
PROMPT = 8  # <|image|>, BOS and "The objects in the image are" in LLaMA-2's pieces


def _estimate(cfg, batch: int, k: int, dtype=torch.bfloat16) -> float:
    """What recompute_batch budgets for ``batch`` images: weights plus the margin on the activations."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in sampling_bench.NxTP(cfg).parameters())
    act = batch * k * sampling_bench.recompute_row_bytes(cfg, PROMPT, cfg.max_label_steps, dtype)
    return n_params * (torch.finfo(dtype).bits // 8) + 1.5 * act


@pytest.mark.parametrize("device_gib", [24, 40, 80, 141])
def test_recompute_batch_fits_a_fake_device(device_gib):
    cfg = g3m_config()
    memory = device_gib * GIB
    sizes = {}
    for k in (10, 100):
        b = sampling_bench.recompute_batch(memory, cfg, k, 64, PROMPT, cfg.max_label_steps, torch.bfloat16)
        assert 1 <= b <= 64
        assert _estimate(cfg, b, k) <= 0.6 * memory, "the chosen batch fits the budget"
        assert b == 64 or _estimate(cfg, b + 1, k) > 0.6 * memory, "and one more image would not"
        sizes[k] = b
    assert sizes[100] <= sizes[10]


def test_recompute_batch_grows_with_the_device_and_refuses_what_cannot_fit():
    cfg = g3m_config()
    sizes = [sampling_bench.recompute_batch(g * GIB, cfg, 100, 1000, PROMPT, 20, torch.bfloat16) for g in (24, 80, 141)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # one g3m image at top-100 holds 100 sequences of ~282 positions: tens of MiB each
    row = sampling_bench.recompute_row_bytes(cfg, PROMPT, 20, torch.bfloat16)
    assert 20 * 2**20 < row < 200 * 2**20
    with pytest.raises(ValueError, match="recompute baseline needs .* GiB for one image at top-100"):
        sampling_bench.recompute_batch(8 * GIB, cfg, 100, 64, PROMPT, 20, torch.bfloat16)


def test_sampling_bench_writes_each_k_as_it_goes(tmp_path, world):
    out = tmp_path / "sampling_cpu_small.json"
    # a tiny vocabulary: the synthetic world's tokenizer; small shapes, one repeat
    args = ["--device", "cpu", "--config", "small", "--ks", "2", "3", "--batch", "1", "--repeats", "1", "--tokenizer", world.tokenizer, "--out", str(out),
            "--label-tokens", "2"]  # fmt: skip
    seen = []
    real_write = sampling_bench.write_json

    def spy(path, result):
        real_write(path, result)
        seen.append([row["k"] for row in json.load(open(path))["results"]])

    sampling_bench.write_json = spy
    try:
        assert sampling_bench.main(args) == 0
    finally:
        sampling_bench.write_json = real_write
    assert seen == [[2], [2, 3]], "the file holds each k's figures as soon as they exist"
    result = json.load(open(out))
    assert result["dtype"] == "float32" and result["device_memory_gib"] > 0 and result["label_tokens_target"] == 2.0
    for row in result["results"]:
        assert row["cached_images_per_s"] > 0 and row["recompute_images_per_s"] > 0 and row["recompute_batch"] == 1
        assert row["agreement"] == 1.0, "fp32: the cached labels are the recomputed ones"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    # the suite's summary turns it into BENCHMARKS.md rows
    from benchmarks import suite_report

    assert suite_report.main([str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| model | one-shot top-2, KV-cached vs recompute, small shapes, batch 1, float32 |" in summary
    assert "| model | one-shot top-3," in summary and "python -m benchmarks.sampling_bench --device cpu" in summary


def test_sampling_bench_calibrates_the_label_length(world):
    """The delimiter bias found gives labels of about the asked length, and a larger bias shorter labels."""
    from model.tokenizer import Tokenizer

    tok = Tokenizer(world.tokenizer)
    cfg = sampling_bench.small_config(tok.n_base)
    model = sampling_bench.build_model(cfg, tok).eval()
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    prompt = tok.prompt_ids(cfg.prompt)
    lengths = {}
    with torch.inference_mode():
        for target in (2.0, 4.0):
            bias, length = sampling_bench.calibrate_label_length(model, images, prompt, tok.delimiter_id, 5, cfg.max_label_steps, target)
            assert abs(length - target) <= 0.75, (target, bias, length)
            assert model.decoder.lm_head.weight[tok.delimiter_id, 0].item() == bias, "the model keeps the bias found"
            _, _, sampled = sampling_bench.sample_tokens(model, images, prompt, tok.delimiter_id, 5, cfg.max_label_steps)
            assert float(sampled.float().mean()) == length, "what was measured is what the model now samples"
            lengths[target] = (bias, length)
    assert lengths[2.0][0] > lengths[4.0][0]


def test_gpu_suite_refuses_unknown_options(repo_root):
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--bogus"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: benchmarks/gpu_suite.sh" in proc.stderr
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for needle in ("benchmarks.train_bench --shapes g3m --ranks 1 --batch 16", "benchmarks.sampling_bench --device cuda --config g3m --batch 64 --ks 10 100",
                   "benchmarks.evaluate_bench --device cuda --config g3m --batch 64"):  # fmt: skip
        assert needle in proc.stdout, needle
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--cpu", "--dry-run"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--device cpu --config small" in proc.stdout and "--shapes g3m" not in proc.stdout


def test_gpu_suite_sweeps_the_batches_given_then_compiles_the_largest(repo_root):
    run = lambda *a: subprocess.run(["bash", "benchmarks/gpu_suite.sh", *a], cwd=repo_root, capture_output=True, text=True, timeout=60)  # noqa: E731
    proc = run("--dry-run", "--only", "train,curate", "--batches", "32 64", "--compile-ab")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert len(lines) == 4 and "benchmarks.curate_bench --clip-only" in lines[0] and "--clip-threads 1 4 8" in lines[0]
    assert ["--batch 32" in lines[1], "--batch 64" in lines[2], "--batch 64" in lines[3]] == [True] * 3
    assert "--compile" in lines[3].split() and "--compile" not in lines[1].split() + lines[2].split()
    assert "--steps 60" in lines[1] and "--steps 40" in lines[2], "the first batch runs longer, the sweep shorter"
    for bad in (["--batches", "0"], ["--batches", "16 x"], ["--only", "train,bogus"]):
        proc = run("--dry-run", *bad)
        assert proc.returncode == 2 and "usage: benchmarks/gpu_suite.sh" in proc.stderr, bad


def test_suite_report_has_a_row_for_clip_scoring(tmp_path):
    from benchmarks import suite_report

    result = {"command": "python -m benchmarks.curate_bench --clip-only", "device": "a GPU", "date": "2026-11-26", "samples": 1024, "batch": 256,
              "actor_by_threads": {"1": {"images_per_s": 300.0}, "8": {"images_per_s": 1900.0}}, "actor_images_per_s": 1900.0,
              "model_only_images_per_s": 2500.0}  # fmt: skip
    (tmp_path / "curate_clip_cuda.json").write_text(json.dumps(result))
    assert suite_report.main([str(tmp_path)]) == 0
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| curation |"))
    assert "300.0 with 1 decode thread(s), 1,900.0 with 8 decode thread(s); model only 2,500.0 images/s" in row and "| a GPU |" in row


@pytest.mark.parametrize("shapes", ["small", "g3m"])
def test_train_bench_measures_the_recipe_it_names(shapes):
    """At G3M shapes the G3M preset's recipe (clipping, precision), not the demo's; no checkpoint and
    no export unless asked (at 1.78B they cost tens of GB and minutes)."""
    args = train_bench.parse_args(["--shapes", shapes, "--steps", "90"])
    with open(os.path.join(train_bench.REPO, "jobs", "configs", "g3m.yaml")) as f:
        g3m = yaml.safe_load(f)
    assert args.preset == os.path.join("jobs", "configs", "g3m.yaml")
    assert (args.preset_config["grad_clip"], args.preset_config["precision"]) == (g3m["grad_clip"], g3m["precision"])
    demo = train_bench.parse_args([])
    assert demo.preset_config["grad_clip"] != g3m["grad_clip"]  # the two recipes differ where it matters here
    flags = train_bench.run_flags(args)
    assert flags[flags.index("--save-every") + 1] == "91" and "--no-export" in flags and "--export" not in flags
    assert "--export" in train_bench.run_flags(train_bench.parse_args(["--shapes", shapes, "--export"]))
    assert "--compile" not in flags and "--compile" in train_bench.run_flags(train_bench.parse_args(["--shapes", shapes, "--compile"]))


def test_suite_profile_counts_cpu_by_test_and_kind(tmp_path, repo_root):
    """A child started while a test runs carries that test: its CPU is counted under it and its kind."""
    import sys

    from benchmarks import suite_profile

    child = (
        "import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 1.0: pass\n"
        "time.sleep(1.0)\n"  # alive for two more samples after its work: none of its CPU is lost
    )
    parent = (
        "import os, subprocess, sys\n"
        "env = dict(os.environ, PYTEST_CURRENT_TEST='tests/test_x.py::test_y (call)')\n"
        f"subprocess.run([sys.executable, '-c', {child!r}], env=env, check=True)\n"
        "sys.exit(3)\n"
    )
    out = tmp_path / "profile.json"
    code = suite_profile.main(["--interval", "0.2", "--output", str(out), "--", sys.executable, "-c", parent])
    assert code == 3, "the command's exit status is returned"
    result = json.loads(out.read_text())
    test = result["by_test"]["tests/test_x.py::test_y call"]
    assert test["processes"] == 1 and 0.9 <= test["cpu_s"] <= 1.5, result["by_test"]
    assert result["by_kind"]["python -c"]["cpu_s"] >= 0.9, result["by_kind"]
    assert result["busy_cpu_s"] >= 0.9 and 0 < result["busy_fraction"] <= 1
    assert suite_profile.kind(["/x/bin/python", "-u", "/x/ray/_private/log_monitor.py", "--a"], "python") == "ray log_monitor"
    assert suite_profile.kind(["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/r"], "raylet") == "ray raylet"
    assert suite_profile.kind(["/x/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="], "python") == "deepspeed.launcher.launch"
    assert suite_profile.kind(["python", "/x/ray/_private/workers/default_worker.py"], "python") == "ray worker"
