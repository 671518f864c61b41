"""Captioning throughput: greedy with the KV cache versus recompute-every-step, and beam search, side by side.

    python -m benchmarks.caption_bench --device cpu --config small          # this machine
    python -m benchmarks.caption_bench --device cuda --config g3m --batch 32  # H100 / H200

Random weights (the published structure at a CPU size, or the G3M shapes) and LLaMA-2's
tokenizer (32k-piece output layer); EOS is banned for the benchmark so that every caption
runs to ``--max-length`` tokens and the figures count a fixed amount of work (tokens/s =
images/s x max_length). The methods alternate (A/B) ``--repeats`` times on the same
images; the figure is the median of each. ``--checkpoint`` adds a trained model's greedy
captions of real images (e.g. the demo model on the synthetic world: real lengths, EOS
allowed). Results go to benchmarks/results/caption_<device>_<config>.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import statistics
import sys
import time

import torch

from benchmarks.sampling_bench import REPO, device_name, find_tokenizer, small_config, sync
from model.config import CAPTION_PROMPT, g3m_config
from model.generate import beam_search, generate, greedy_search
from model.nxtp import NxTP
from model.tokenizer import Tokenizer
from pipeline.outputs import write_json


def _trained(checkpoint: str, images_glob: str, batch: int, max_length: int, repeats: int, device) -> dict:
    """Greedy captions of a trained model on real images: images/s and generated tokens/s (median of ``repeats``)."""
    from PIL import Image

    from model.checkpoint import load_model
    from model.vision import preprocess

    model, tok, _ = load_model(checkpoint)
    model = model.to(device).eval()
    files = sorted(glob.glob(images_glob))[:batch]
    if len(files) < batch:
        raise SystemExit(f"--images {images_glob}: {len(files)} file(s), --batch needs {batch}")
    transform = preprocess(model.cfg.vision.image_size)
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files]).to(device)
    generate(model, images, tok, max_length=max_length)  # warm-up
    speeds, tokens = [], 0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        captions = generate(model, images, tok, max_length=max_length)
        sync(device)
        speeds.append(batch / (time.perf_counter() - t0))
        tokens = sum(len(c.tokens) + c.ended for c in captions)
    ips = statistics.median(speeds)
    return {
        "checkpoint": checkpoint,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens": model.n_image_tokens,
        "batch": batch,
        "greedy_images_per_s": round(ips, 2),
        "mean_generated_tokens": round(tokens / batch, 2),
        "generated_tokens_per_s": round(ips * tokens / batch, 1),
        "example": captions[0].text,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["small", "g3m"], default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--beams", type=int, nargs="+", default=[3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizer", help="LLaMA-2's tokenizer.model (default: $NXTP_TOKENIZER)")
    p.add_argument("--checkpoint", help="also time a trained model's greedy captions (an exported folder)")
    p.add_argument("--images", help="glob of images for --checkpoint")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    tok = Tokenizer(find_tokenizer(args.tokenizer))
    cfg = g3m_config() if args.config == "g3m" else small_config(tok.n_base)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = NxTP(cfg)
    model.init_weights()
    model = model.to(device=device, dtype=dtype).eval()
    prompt = tok.prompt_ids(CAPTION_PROMPT)
    banned = (tok.bos_id, tok.image_id, tok.pad_id, tok.eos_id)  # EOS too: every caption is max_length tokens
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=dtype)
    L = args.max_length

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return args.batch / (time.perf_counter() - t0)

    methods = {
        "greedy_cached": lambda: greedy_search(model, images, prompt, tok.eos_id, L, banned, use_cache=True),
        "greedy_recompute": lambda: greedy_search(model, images, prompt, tok.eos_id, L, banned, use_cache=False),
        **{f"beam{b}_cached": (lambda b=b: beam_search(model, images, prompt, tok.eos_id, L, b, 1.0, banned, use_cache=True)) for b in args.beams},
    }
    runs: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in methods.items():
                runs[name].append(timed(fn))
    rows = {}
    for name, values in runs.items():
        ips = statistics.median(values)
        rows[name] = {"images_per_s": round(ips, 3), "tokens_per_s": round(ips * L, 1), "runs": [round(v, 3) for v in values]}
        print(f"{name:18s} {ips:8.2f} images/s  {ips * L:9.1f} tokens/s")
    speedup = rows["greedy_cached"]["images_per_s"] / rows["greedy_recompute"]["images_per_s"]
    print(f"greedy: cached / recompute = x{speedup:.1f}")
    result = {
        "benchmark": "caption generation: greedy KV-cached vs recompute, beam search",
        "command": "python -m benchmarks.caption_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "config": args.config,
        "parameters": sum(x.numel() for x in model.parameters()),
        "image_tokens": cfg.vision.n_tokens,
        "prompt_tokens": len(prompt),
        "batch": args.batch,
        "max_length": L,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
        "goal": "cached greedy >= 3x recompute at 20 tokens (recorded; no throughput goal yet)",
        "results": rows,
        "greedy_speedup": round(speedup, 2),
    }
    if args.checkpoint:
        result["trained"] = _trained(args.checkpoint, args.images, args.batch, L, args.repeats, device)
        t = result["trained"]
        print(f"trained {args.checkpoint}: {t['greedy_images_per_s']} images/s greedy, {t['mean_generated_tokens']} tokens per caption: {t['example']!r}")
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"caption_{device.type}_{args.config}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
