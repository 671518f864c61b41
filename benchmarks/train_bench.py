"""Training throughput: tokens/s, samples/s, data wait and model FLOPs utilization.

    python -m benchmarks.train_bench                      # the demo preset, 2 ranks, CPU (this machine)
    python -m benchmarks.train_bench --ranks 1 --steps 80
    python -m benchmarks.train_bench --shapes g3m --ranks 1 --batch 16 --steps 60   # one H100 / H200, bf16

What runs: the real ``deepspeed`` launcher on ``jobs/train.py`` with ZeRO-2, on shards of the
synthetic world written at the model's image size (what ``jobs.ingest`` would write) with
their ground-truth label tables. ``--shapes preset`` trains the preset's tiny model with its
recipe (``jobs/configs/demo.yaml``); ``small`` / ``g3m`` train random weights of those shapes
with the G3M preset's recipe (``jobs/configs/g3m.yaml``: freezing, lr, clipping, precision),
at ``--batch`` per rank without accumulation. No checkpoint is written and nothing is
exported unless ``--export`` (at 1.78B they cost tens of GB and minutes). The figures come
from the run's own ``metrics.jsonl`` (one line per ``--log-every`` steps: means over those
steps, read from the device once per line), past the first ``--skip`` steps (start-up, the
workers' first batches): median step time, samples/s = global batch / step time, tokens/s
(image tokens + target tokens, the run's own count), and the data wait's share of step time.

MFU = train FLOPs per sample (``benchmarks.flops``, the formula stated there) x samples/s
/ peak. On a CPU the peak is measured here: the best fp32 matmul rate of
``torch.matmul`` on all cores (so MFU says how close the tiny model gets to what the
same BLAS reaches on large square matrices). On a GPU it is the vendor's dense bf16 peak.
Results: benchmarks/results/train_<device>_<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from benchmarks.evaluate_bench import write_shards
from benchmarks.flops import sample_flops
from benchmarks.sampling_bench import device_name, find_tokenizer, small_config
from pipeline.outputs import atomic_file, write_json
from pipeline.ray_local import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def write_inputs(work: str, n: int, image_size: int, seed: int = 0) -> tuple[str, str, str]:
    """(shards, labels, tokenizer): ``n`` synthetic training samples as shards of 250, at ``image_size``."""
    from pipeline import synthetic

    world = synthetic.write_world(os.path.join(work, "world"), n_train=n, n_val=0, seed=seed, bad_fraction=0.0)
    shards, labels = os.path.join(work, "shards"), os.path.join(work, "labels")
    write_shards(world, "train", shards, labels, per_shard=250, image_size=image_size)
    return shards, labels, world.tokenizer


def text_lengths(preset: dict, shards: str, labels: str, tokenizer: str, batches: int = 20) -> tuple[float, float]:
    """(padded text positions, target positions) per sample, averaged over batches of the real loader."""
    from pipeline.loader import DatasetSpec, TrainStream

    stream = TrainStream(
        [DatasetSpec("bench", shards, labels)], tokenizer, preset["image_size"], preset["batch_size"], seed=0,
        max_text_len=preset["max_text_len"], prompt_augmentation=preset["prompt_augmentation"],
    )  # fmt: skip
    text, target = [], []
    for i, batch in enumerate(stream):
        text.append(batch["ids"].shape[1])
        target.append(float((batch["targets"] != -100).sum()) / batch["ids"].shape[0])
        if i + 1 == batches:
            break
    return statistics.mean(text), statistics.mean(target)


def random_model(folder: str, shapes: str, tokenizer: str):
    """An exported model with random weights (``small`` or ``g3m`` shapes): (folder, its model config)."""
    from model.checkpoint import save_pretrained
    from model.config import g3m_config
    from model.nxtp import NxTP
    from model.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    cfg = g3m_config() if shapes == "g3m" else small_config(tok.n_base)
    torch.manual_seed(0)
    model = NxTP(cfg)
    model.init_weights()
    save_pretrained(model, tok, folder)
    return folder, cfg


def parameter_count(cfg) -> int:
    """Parameters of a model of config ``cfg``, counted on the meta device (nothing allocated)."""
    from model.nxtp import NxTP

    with torch.device("meta"):
        return sum(t.numel() for t in NxTP(cfg).parameters())


def cpu_matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of a square matmul on every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def run_training(work: str, preset_path: str, ranks: int, steps: int, shards: str, labels: str, tokenizer: str, extra: list[str]) -> str:
    from jobs.launch_train import launcher

    deepspeed = launcher()
    run = os.path.join(work, "run")
    cmd = [
        deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "jobs/train.py",
        "--config", preset_path, "--deepspeed", "jobs/configs/zero2.json", "--run-dir", run, "--tokenizer", tokenizer,
        "--data", f"bench={shards},{labels}", "--steps", str(steps), "--warmup-steps", str(min(10, steps // 4)), *extra,
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"training exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="training preset (default: demo.yaml for --shapes preset, g3m.yaml for small / g3m)")
    p.add_argument(
        "--shapes", choices=["preset", "small", "g3m"], default="preset",
        help="preset: the preset's tiny model; small / g3m: that architecture with random weights (sampling_bench's "
             "small config, or the published 1.78B shapes), trained with the G3M preset's recipe",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="micro-batch per rank (default: the preset's; 16 for small / g3m)")
    p.add_argument("--tokenizer", help="small / g3m: LLaMA-2's tokenizer.model (default: $NXTP_TOKENIZER)")
    p.add_argument("--ranks", type=int, default=2, help="deepspeed ranks (processes; GPUs when there are GPUs)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=20, help="first steps left out of the figures")
    p.add_argument("--log-every", type=int, default=None, help="steps per metrics line (default: 1 for the preset, 10 for small / g3m)")
    p.add_argument("--images", type=int, default=2000, help="synthetic training images")
    p.add_argument("--compile", action="store_true", help="train with --compile (torch.compile of each ViT and decoder block)")
    p.add_argument("--export", action="store_true", help="also write the final checkpoint and export/ (off: they are not what is measured)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    shaped = args.shapes != "preset"
    args.preset = args.preset or os.path.join("jobs", "configs", "g3m.yaml" if shaped else "demo.yaml")
    args.log_every = args.log_every or (10 if shaped else 1)
    if args.steps <= args.skip + 5 * args.log_every:
        p.error("--steps must exceed --skip by more than 5 metric lines (5 x --log-every)")
    with open(os.path.join(REPO, args.preset)) as f:
        args.preset_config = yaml.safe_load(f)
    if not shaped and args.preset_config.get("model") != "tiny":
        p.error(f"{args.preset}: with --shapes preset the preset must be a tiny-model one (the benchmark makes its own data)")
    return args


def run_flags(args: argparse.Namespace) -> list[str]:
    """What the benchmark adds to the preset's recipe: no checkpoint before the end, none at the end and
    no export unless ``--export``, metrics every ``--log-every`` steps."""
    flags = ["--save-every", str(args.steps + 1), "--log-every", str(args.log_every), "--export" if args.export else "--no-export"]
    return flags + (["--compile"] if args.compile else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shaped, preset = args.shapes != "preset", args.preset_config
    work = args.work or tempfile.mkdtemp(prefix="train_bench_")
    try:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        extra = run_flags(args)
        if not shaped:
            from model.config import tiny_config
            from model.tokenizer import Tokenizer

            shards, labels, tokenizer = write_inputs(work, args.images, preset["image_size"])
            model_cfg = tiny_config(Tokenizer(tokenizer).n_base, image_size=preset["image_size"], patch_size=preset.get("patch_size", 16))
        else:
            init, model_cfg = random_model(os.path.join(work, "init"), args.shapes, find_tokenizer(args.tokenizer))
            shards, labels, _ = write_inputs(work, args.images, model_cfg.vision.image_size)
            tokenizer = os.path.join(init, "tokenizer.model")
            # the G3M recipe (freezing, lr, clipping, precision, text length) on these weights, one micro-batch per step
            preset.update(image_size=model_cfg.vision.image_size, batch_size=16)
            extra += ["--model", init, "--image-size", str(model_cfg.vision.image_size), "--global-batch", "0", "--grad-accum", "1"]
        if args.batch or shaped:
            preset["batch_size"] = args.batch or preset["batch_size"]
            extra += ["--batch-size", str(preset["batch_size"])]
        text_len, target_len = text_lengths(preset, shards, labels, tokenizer)
        run = run_training(work, args.preset, args.ranks, args.steps, shards, labels, tokenizer, extra)
        with open(os.path.join(run, "train_config.json")) as f:
            train_cfg = json.load(f)
        with open(os.path.join(run, "ds_config.json")) as f:
            ds_cfg = json.load(f)
        rows = [r for r in (json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))) if r["step"] > args.skip]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    cuda = torch.cuda.is_available()
    device = device_name(torch.device("cuda" if cuda else "cpu"))
    if cuda:
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in device), None)
        peak_note = "vendor dense bf16 peak per GPU x ranks"
        peak = peak * args.ranks if peak else None
    else:
        peak = cpu_matmul_peak()
        peak_note = "measured: best fp32 torch.matmul 2048x2048 on all cores"
    step_s = statistics.median(r["step_seconds"] for r in rows)
    global_batch = ds_cfg["train_batch_size"]
    samples_per_s = global_batch / step_s
    precision = "bf16" if ds_cfg.get("bf16", {}).get("enabled") else "fp16" if ds_cfg.get("fp16", {}).get("enabled") else "fp32"
    flops = sample_flops(model_cfg, text_len, target_len, train_cfg["train_vision_blocks"])
    result = {
        "benchmark": "training throughput: deepspeed launcher, ZeRO-2, the preset's recipe",
        "command": "python -m benchmarks.train_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": device,
        "ranks": args.ranks,
        "preset": args.preset,
        "shapes": args.shapes,
        "precision": precision,
        "grad_clip": train_cfg["grad_clip"],
        "compile": bool(train_cfg.get("compile")),
        "parameters": parameter_count(model_cfg),
        "image_tokens": model_cfg.vision.n_tokens,
        "text_positions_per_sample": round(text_len, 2),
        "target_positions_per_sample": round(target_len, 2),
        "global_batch": global_batch,
        "steps_measured": rows[-1]["step"] - args.skip if rows else 0,
        "log_every": args.log_every,
        "median_step_s": round(step_s, 4),
        "samples_per_s": round(samples_per_s, 2),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
        "data_wait_fraction": round(statistics.mean(r["data_wait"] for r in rows), 4),
        "train_flops_per_sample": flops.train,
        "model_flops_per_s": flops.train * samples_per_s,
        "peak_flops_per_s": peak,
        "peak": peak_note,
        "mfu": round(flops.mfu(samples_per_s, peak), 4) if peak else None,
        "flop_formula": "benchmarks/flops.py: matmul FLOPs, 3x forward for trained parts, 1x for frozen leading ViT blocks",
        "goal": "GPU: >= 40% MFU on an H100 with the paper's freezing policy; data wait < 5% of step time",
    }
    tag = "cuda" if cuda else "cpu"
    name = os.path.splitext(os.path.basename(args.preset))[0] if not shaped else args.shapes
    write_json(os.path.join(args.out, f"train_{tag}_{name}.json"), result)
    with atomic_file(os.path.join(args.out, f"train_{tag}_{name}.md"), "w") as f:
        f.write(f"# Training throughput ({name})\n\n")
        f.write(f"- date: {result['date']}\n- device: {device}, {args.ranks} rank(s)\n- command: `{result['command']}`\n")
        f.write(f"- recipe: {args.preset}, {precision}, gradient clipping {train_cfg['grad_clip']}; {'torch.compile of each block; ' if result['compile'] else ''}metrics every {args.log_every} step(s)\n")
        f.write(f"- model: {result['parameters'] / 1e6:.2f}M parameters, {result['image_tokens']} image tokens, "
                f"{text_len:.1f} text positions ({target_len:.1f} with a target) per sample\n")  # fmt: skip
        f.write(f"- FLOP formula: {result['flop_formula']}; peak: {peak_note}\n\n")
        f.write("| global batch | step (s) | samples/s | tokens/s | data wait | train GFLOP/sample | model GFLOP/s | peak GFLOP/s | MFU |\n")
        f.write("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        f.write(
            f"| {global_batch} | {step_s:.3f} | {samples_per_s:.1f} | {result['tokens_per_s']:.0f} | {result['data_wait_fraction']:.1%} | "
            f"{flops.train / 1e9:.3f} | {flops.train * samples_per_s / 1e9:.1f} | {peak / 1e9 if peak else float('nan'):.1f} | "
            f"{result['mfu'] if result['mfu'] is not None else float('nan'):.1%} |\n"
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
