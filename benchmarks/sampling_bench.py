"""One-shot sampling throughput: KV-cached versus recompute-every-step, side by side.

    python -m benchmarks.sampling_bench --device cpu --config small          # this machine
    python -m benchmarks.sampling_bench --device cuda --config g3m --batch 64  # H100 / H200

Random weights; the delimiter's output row is biased so that labels end after a few
tokens, as a trained model's do (the mean sampled label length is reported). The two
methods alternate (A/B) ``--repeats`` times on the same images; the figure is the median
images/s of each and their ratio. Results go to benchmarks/results/sampling_<device>_<config>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from model.config import DecoderConfig, NxTPConfig, VisionConfig, g3m_config
from model.nxtp import NxTP
from model.sampling import sample_tokens
from model.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(vocab: int) -> NxTPConfig:
    """A CPU-sized model with the published structure: 224 px, patch 16 (196 image tokens)."""
    return NxTPConfig(
        VisionConfig(name=None, image_size=224, patch_size=16, width=256, layers=4, heads=4),
        DecoderConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=688, vocab_size=vocab, max_seq_len=512),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_tokenizer(path: str | None) -> str:
    """``path``, else $NXTP_TOKENIZER: LLaMA-2's tokenizer.model (32k pieces, the published output layer)."""
    path = path or os.environ.get("NXTP_TOKENIZER")
    if path and os.path.isfile(path):
        return path
    raise SystemExit(
        f"no tokenizer{' at ' + path if path else ''}: pass --tokenizer (LLaMA-2's tokenizer.model, "
        "or a synthetic world's for a small vocabulary) or set NXTP_TOKENIZER"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["small", "g3m"], default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizer", help="LLaMA-2's tokenizer.model (default: $NXTP_TOKENIZER)")
    p.add_argument("--recompute-batch", type=int, default=None, help="smaller batch for the recompute runs (memory); images/s is per image")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    tok = Tokenizer(find_tokenizer(args.tokenizer))
    cfg = g3m_config() if args.config == "g3m" else small_config(tok.n_base)
    if cfg.decoder.vocab_size != tok.n_base:
        raise SystemExit(f"{args.config} needs a {cfg.decoder.vocab_size}-piece tokenizer, got {tok.n_base}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = NxTP(cfg)
    model.init_weights()
    with torch.no_grad():  # labels end after a few tokens, as a trained model's do
        model.decoder.embed.base.weight[:, 0] = 0.05
        model.decoder.embed.special[:, 0] = 0.05
        model.decoder.lm_head.weight[tok.delimiter_id, 0] = 2.0
    model = model.to(device=device, dtype=dtype).eval()
    prompt = tok.prompt_ids(cfg.prompt)
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=dtype)

    def run(k: int, cached: bool) -> tuple[float, float]:
        batch = images if cached or not args.recompute_batch else images[: args.recompute_batch]
        sync(device)
        t0 = time.perf_counter()
        _, _, lengths = sample_tokens(model, batch, prompt, tok.delimiter_id, k, cfg.max_label_steps, use_cache=cached)
        sync(device)
        return batch.shape[0] / (time.perf_counter() - t0), float(lengths.float().mean())

    rows = []
    with torch.inference_mode():
        for k in args.ks:
            run(k, True), run(k, False)  # warm-up
            cached, recompute, length = [], [], 0.0
            for _ in range(args.repeats):
                ips, length = run(k, True)
                cached.append(ips)
                recompute.append(run(k, False)[0])
            row = {
                "k": k,
                "cached_images_per_s": round(statistics.median(cached), 3),
                "recompute_images_per_s": round(statistics.median(recompute), 3),
                "speedup": round(statistics.median(cached) / statistics.median(recompute), 2),
                "mean_label_tokens": round(length, 2),
                "runs": {"cached": [round(x, 3) for x in cached], "recompute": [round(x, 3) for x in recompute]},
            }
            rows.append(row)
            print(f"top-{k:<4d} cached {row['cached_images_per_s']:9.2f} img/s   recompute {row['recompute_images_per_s']:9.2f} img/s   x{row['speedup']:.1f}")
    n_params = sum(x.numel() for x in model.parameters())
    result = {
        "benchmark": "one-shot sampling, KV-cached vs recompute-every-step",
        "command": "python -m benchmarks.sampling_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "config": args.config,
        "parameters": n_params,
        "image_tokens": cfg.vision.n_tokens,
        "batch": args.batch,
        "recompute_batch": args.recompute_batch or args.batch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "goal": "cached >= 5x recompute for top-10 on the same device; >= 300 images/s top-10 at batch 64 on an H100 (g3m shapes)",
        "results": rows,
    }
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"sampling_{device.type}_{args.config}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
