"""One-shot sampling throughput: KV-cached versus recompute-every-step, side by side.

    python -m benchmarks.sampling_bench --device cpu --config small          # this machine
    python -m benchmarks.sampling_bench --device cuda --config g3m --batch 64  # H100 / H200

Random weights; the delimiter's output row is biased so that labels end after a few
tokens, as a trained model's do: the bias is calibrated on 4 of the images so that the mean
label runs to ``--label-tokens`` (default 3; 0 keeps a fixed bias, with which random weights
at g3m shapes run to about 15 tokens). The mean sampled label length of every run is reported. The two
methods alternate (A/B) ``--repeats`` times on the same images; the figure is the median
images/s of each and their ratio. The recompute baseline (the reference's way: every
label's whole sequence again at each step) runs on the first ``recompute_batch`` images,
sized to fit the device's memory (``recompute_batch``, or ``--recompute-batch``); its
images/s is per image. Its tokens are compared with the cached run's on the same images
(``agreement``: the share of labels with the same tokens; 1.0 in fp32, near-ties may
differ in bf16). ``--precision`` as ``jobs.infer`` takes it (auto: bf16 on a GPU).

Results go to benchmarks/results/sampling_<device>_<config>.json (``--out``), rewritten
after each k, so that a run cut short keeps the figures it has.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from model.config import DecoderConfig, NxTPConfig, VisionConfig, g3m_config
from model.nxtp import NxTP
from model.precision import PRECISIONS, place, resolve_dtype
from model.sampling import sample_tokens
from model.tokenizer import Tokenizer
from pipeline.outputs import write_json

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


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def recompute_row_bytes(cfg: NxTPConfig, prompt_len: int, max_steps: int, dtype: torch.dtype) -> int:
    """Peak activation bytes of one label sequence in the recompute baseline, at its longest.

    The decoder over image tokens + prompt + max_steps - 2 label tokens: the input and
    residual (2 x L x D), per layer the float32 temporaries of the norm and the rotary
    embedding (about 6 x L x D x 4), the MLP's three L x hidden tensors, attention scores
    (H x L x L float32, as the math backend holds them), and the float32 logits and
    softmax at the last position. Layers run one at a time, so one layer's worth counts.
    """
    d = cfg.decoder
    e = torch.finfo(dtype).bits // 8
    L = cfg.vision.n_tokens + prompt_len + max_steps - 2
    return L * (2 * d.dim * e + 6 * d.dim * 4 + 3 * d.hidden_dim * e) + d.n_heads * L * L * 4 + 2 * (cfg.decoder.vocab_size + cfg.n_special) * 4


def recompute_batch(device_bytes: int, cfg: NxTPConfig, k: int, batch: int, prompt_len: int, max_steps: int, dtype: torch.dtype,
                    share: float = 0.6, margin: float = 1.5) -> int:  # fmt: skip
    """Images for the recompute baseline on a device of ``device_bytes``: as many as fit, at most ``batch``.

    Budget: ``share`` of the device less the weights; each image costs ``k`` label
    sequences of ``recompute_row_bytes``, times ``margin`` for the allocator and the
    tensors this estimate leaves out.
    """
    with torch.device("meta"):
        n_params = sum(p.numel() for p in NxTP(cfg).parameters())
    budget = share * device_bytes - n_params * (torch.finfo(dtype).bits // 8)
    per_image = margin * k * recompute_row_bytes(cfg, prompt_len, max_steps, dtype)
    fits = int(budget // per_image)
    if fits < 1:
        raise ValueError(
            f"the recompute baseline needs {per_image / 2**30:.1f} GiB for one image at top-{k}; "
            f"{share:.0%} of the device's {device_bytes / 2**30:.1f} GiB less the weights leaves {max(budget, 0) / 2**30:.1f} GiB"
        )
    return min(batch, fits)


def build_model(cfg: NxTPConfig, tok: Tokenizer, seed: int = 0, bias: float = 2.0) -> NxTP:
    """Random weights; the delimiter's output row biased by ``bias`` (labels end sooner the larger it is)."""
    torch.manual_seed(seed)
    model = NxTP(cfg)
    model.init_weights()
    with torch.no_grad():
        model.decoder.embed.base.weight[:, 0] = 0.05
        model.decoder.embed.special[:, 0] = 0.05
    set_delimiter_bias(model, tok.delimiter_id, bias)
    return model


def set_delimiter_bias(model: NxTP, delimiter_id: int, bias: float) -> None:
    with torch.no_grad():
        model.decoder.lm_head.weight[delimiter_id, 0] = bias


def calibrate_label_length(model: NxTP, images: torch.Tensor, prompt: list[int], delimiter_id: int, k: int, max_steps: int,
                           target: float, tries: int = 12) -> tuple[float, float]:  # fmt: skip
    """(bias, mean label tokens): the delimiter bias whose top-``k`` labels on ``images`` run to ``target`` tokens on average.

    Random weights give labels of any length (about 15 tokens at g3m shapes with a fixed bias,
    6 at small ones), and the cost of one-shot sampling grows with it; a trained model's labels
    are nouns of a few tokens. A bisection on the bias (the mean length falls as it grows), at
    most ``tries`` sampling runs, stops within a quarter token of the target.
    """
    low, high = 0.0, 256.0
    best = (float("inf"), 0.0, 0.0)  # (distance, bias, length)
    for _ in range(tries):
        bias = (low + high) / 2
        set_delimiter_bias(model, delimiter_id, bias)
        _, _, lengths = sample_tokens(model, images, prompt, delimiter_id, k, max_steps)
        length = float(lengths.float().mean())
        best = min(best, (abs(length - target), bias, length))
        if abs(length - target) <= 0.25:
            break
        low, high = (bias, high) if length > target else (low, bias)
    set_delimiter_bias(model, delimiter_id, best[1])
    return best[1], best[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["small", "g3m"], default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--tokenizer", help="LLaMA-2's tokenizer.model (default: $NXTP_TOKENIZER)")
    p.add_argument("--recompute-batch", type=int, default=None, help="images for the recompute runs (default: as many as fit, at most --batch)")
    p.add_argument(
        "--label-tokens", type=float, default=3.0,
        help="the mean label length to sample, as a trained model's nouns run (default 3 tokens): the delimiter's bias is "
             "calibrated to it on 4 of the images; 0: a fixed bias (labels as long as random weights make them)",
    )  # fmt: skip
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.label_tokens < 0 or args.label_tokens != args.label_tokens:
        p.error("--label-tokens must be 0 (no calibration) or a positive mean length")
    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    tok = Tokenizer(find_tokenizer(args.tokenizer))
    cfg = g3m_config() if args.config == "g3m" else small_config(tok.n_base)
    if cfg.decoder.vocab_size != tok.n_base:
        raise SystemExit(f"{args.config} needs a {cfg.decoder.vocab_size}-piece tokenizer, got {tok.n_base}")
    prompt = tok.prompt_ids(cfg.prompt)
    steps = cfg.max_label_steps
    memory = device_memory(device)
    model = place(build_model(cfg, tok), device, dtype)
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    bias, calibrated = 2.0, None
    if args.label_tokens:
        with torch.inference_mode():
            bias, calibrated = calibrate_label_length(model, images[:4], prompt, tok.delimiter_id, min(args.ks), steps, args.label_tokens)
        print(f"delimiter bias {bias:g}: labels of {calibrated:.2f} tokens on average (target {args.label_tokens:g})", flush=True)

    def run(batch: torch.Tensor, k: int, cached: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        sync(device)
        t0 = time.perf_counter()
        tokens, _, lengths = sample_tokens(model, batch, prompt, tok.delimiter_id, k, steps, use_cache=cached)
        sync(device)
        return batch.shape[0] / (time.perf_counter() - t0), tokens, lengths

    out = args.out or os.path.join(REPO, "benchmarks", "results", f"sampling_{device.type}_{args.config}.json")
    result = {
        "benchmark": "one-shot sampling, KV-cached vs recompute-every-step",
        "command": "python -m benchmarks.sampling_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "device_memory_gib": round(memory / 2**30, 1),
        "dtype": str(dtype).removeprefix("torch."),
        "config": args.config,
        "parameters": sum(x.numel() for x in model.parameters()),
        "image_tokens": cfg.vision.n_tokens,
        "batch": args.batch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "label_tokens_target": args.label_tokens or None,
        "delimiter_bias": bias,
        "goal": "cached >= 5x recompute for top-10 on the same device; on one H100 at g3m shapes and batch 64: top-10 >= 500 images/s, "
                "top-100 >= 150 images/s, cached >= 10x recompute for top-10",
        "results": [],
    }  # fmt: skip
    with torch.inference_mode():
        for k in args.ks:
            rb = args.recompute_batch or recompute_batch(memory, cfg, k, args.batch, len(prompt), steps, dtype)
            small = images[:rb]
            run(images, k, True), run(small[:1], k, False)  # warm-up
            cached, recompute, length = [], [], 0.0
            for _ in range(args.repeats):
                ips, _, lengths = run(images, k, True)
                cached.append(ips)
                length = float(lengths.float().mean())
                recompute.append(run(small, k, False)[0])
            _, a, _ = run(small, k, True)
            _, b, _ = run(small, k, False)
            width = min(a.shape[-1], b.shape[-1])
            agreement = float((a[..., :width] == b[..., :width]).all(-1).float().mean())
            row = {
                "k": k,
                "cached_images_per_s": round(statistics.median(cached), 3),
                "recompute_images_per_s": round(statistics.median(recompute), 3),
                "speedup": round(statistics.median(cached) / statistics.median(recompute), 2),
                "recompute_batch": rb,
                "agreement": round(agreement, 4),
                "mean_label_tokens": round(length, 2),
                "runs": {"cached": [round(x, 3) for x in cached], "recompute": [round(x, 3) for x in recompute]},
            }
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            result["results"].append(row)
            write_json(out, result)
            print(f"top-{k:<4d} cached {row['cached_images_per_s']:9.2f} img/s   recompute {row['recompute_images_per_s']:9.2f} img/s "
                  f"(batch {rb})   x{row['speedup']:.1f}   agreement {agreement:.3f}", flush=True)  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
