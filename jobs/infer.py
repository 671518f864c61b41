"""Labels for images: ``python -m jobs.infer --checkpoint CKPT --image a.jpg [b.jpg ...]``.

``--checkpoint`` is an exported model folder (``jobs.train`` writes one) or a released
NxTP ``.pth``; the latter also needs ``--tokenizer`` (LLaMA-2's tokenizer.model), the
base CLIP weights for the frozen blocks (``--clip-weights ViT-L-14.pt``) unless the file
holds every key, and LLaMA-2's ``--llama-params params.json``. Prints the reference's
"| prob: 0.05742 - coffee" lines, or JSON with ``--format json``. Uses CUDA when present,
else the CPU; ``--precision auto`` runs bf16 on a GPU and fp32 on a CPU (see model/precision.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from model.precision import PRECISIONS


@dataclass
class InferConfig:
    checkpoint: str
    """exported model folder, or a released NxTP .pth"""
    images: list[str]
    """image files to label"""
    num_labels: int = 10
    """k of one-shot sampling: labels per image (after merging duplicates, possibly fewer)"""
    format: str = "text"
    """text (the reference's lines) or json"""
    tokenizer: str | None = None
    """LLaMA tokenizer.model, for a released .pth"""
    clip_weights: str | None = None
    """base CLIP weights (OpenAI .pt or open_clip file), for a released .pth holding only trained keys"""
    llama_params: str | None = None
    """Meta's params.json of the decoder, for a released .pth"""
    device: str = "auto"
    """auto (cuda if present), cuda or cpu"""
    precision: str = "auto"
    """weights and activations: auto (bf16 on a GPU that has it, fp16 on an older GPU, fp32 on a CPU), bf16, fp16 or fp32; rotary tables, norm statistics, softmaxes and logits stay fp32"""
    batch_size: int = 16
    """images per forward pass"""
    max_steps: int | None = None
    """one-shot sampling step limit (default: the model config's, 20)"""

    def __post_init__(self):
        if self.num_labels < 1:
            raise ValueError("--num-labels must be >= 1")
        if self.format not in ("text", "json"):
            raise ValueError("--format must be text or json")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError("--device must be auto, cuda or cpu")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")


def parse_args(argv: list[str] | None) -> InferConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported model folder, or a released NxTP .pth")
    p.add_argument("--image", dest="images", nargs="+", required=True, help="image file(s)")
    p.add_argument("--num-labels", type=int, default=10, help="labels per image (default 10)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--tokenizer", help="LLaMA tokenizer.model (for a released .pth)")
    p.add_argument("--clip-weights", help="base CLIP weights for the frozen ViT blocks (for a released .pth)")
    p.add_argument("--llama-params", help="Meta params.json of the decoder (for a released .pth)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto (bf16 on a GPU, fp32 on a CPU), bf16, fp16 or fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None, help="one-shot step limit (default: model config, 20)")
    try:
        return InferConfig(**vars(p.parse_args(argv)))
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    log = sys.stderr if cfg.format == "json" else sys.stdout
    print(f"infer config: {json.dumps(asdict(cfg))}", file=log)
    from model.checkpoint import load_model
    from model.precision import place, resolve_dtype
    from model.sampling import one_shot
    from model.vision import preprocess

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device)
    model, tok, notes = load_model(cfg.checkpoint, cfg.tokenizer, cfg.clip_weights, cfg.llama_params)
    for note in notes:
        print(f"note: {note}", file=log)
    dtype = resolve_dtype(cfg.precision, device)
    model = place(model, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters on {device} in {str(dtype).removeprefix('torch.')}", file=log)
    transform = preprocess(model.cfg.vision.image_size)

    results, failed = [], 0
    for start in range(0, len(cfg.images), cfg.batch_size):
        paths, tensors = [], []
        for path in cfg.images[start : start + cfg.batch_size]:
            try:
                with Image.open(path) as img:
                    tensors.append(transform(img.convert("RGB")))
                paths.append(path)
            except (OSError, ValueError) as err:
                print(f"error: {path}: cannot read the image ({err})", file=sys.stderr)
                failed += 1
        if not tensors:
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():
            labels = one_shot(model, torch.stack(tensors).to(device, dtype), tok, k=cfg.num_labels, max_steps=cfg.max_steps)
        seconds = time.perf_counter() - t0
        for path, out in zip(paths, labels):
            results.append({"image": path, "labels": out.labels, "probs": [round(p, 5) for p in out.probs]})
            if cfg.format == "text":
                print(f"\n{path} (inference time: {seconds:.3f}s for {len(paths)} image(s))")
                print(f"top-{cfg.num_labels} predictions:")
                for label, prob in zip(out.labels, out.probs):
                    print(f"| prob: {prob:.5f} - {label}")
    if cfg.format == "json":
        json.dump(results, sys.stdout, indent=2)
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
