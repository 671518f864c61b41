"""Labels for images: ``python -m jobs.infer --checkpoint CKPT --image a.jpg [b.jpg ...]``.

``--checkpoint`` is an exported model folder (``jobs.train`` writes one), its hub id
(``owner/name``: from the local Hugging Face cache when ``HF_HUB_OFFLINE=1``, else
downloaded by huggingface_hub), or a released NxTP ``.pth``; the latter also needs ``--tokenizer`` (LLaMA-2's tokenizer.model), the
base CLIP weights for the frozen blocks (``--clip-weights ViT-L-14.pt``) unless the file
holds every key, and LLaMA-2's ``--llama-params params.json``. Prints the reference's
"| prob: 0.05742 - coffee" lines, or JSON with ``--format json``. Uses CUDA when present,
else the CPU; ``--precision auto`` runs bf16 on a GPU and fp32 on a CPU (see model/precision.py).
Images are decoded as ingestion decodes them (pipeline/images.py: upright, transparency on
white, a decompression bomb refused); one that cannot be read is reported and the others
labelled, with exit status 1.

``--onnx DIR`` runs the same one-shot sampling with the ONNX graphs that
``jobs.export_onnx`` writes, in onnxruntime on the CPU, instead of a PyTorch checkpoint:
the same labels and probabilities (within 1e-4), float32.

``--caption`` writes a caption of each image instead (the text the model continues the
caption prompt with, greedy or ``--beams N`` beam search, at most ``--max-length``
tokens; see model/generate.py): a model trained with ``caption_weight > 0`` has learned it.
``--caption`` and ``--attention-map`` (the labels' attention maps) exclude each other: run
the job once for each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import tyro

from jobs._cli import parse
from model.precision import PRECISIONS


@dataclass
class InferConfig:
    images: Annotated[list[str], tyro.conf.arg(name="image", aliases=("--images",))]
    """image file(s) to label"""
    checkpoint: str | None = None
    """exported model folder, its hub id (owner/name) in the local Hugging Face cache, or a released NxTP .pth"""
    onnx: str | None = None
    """instead of --checkpoint: a folder of ONNX graphs from jobs.export_onnx, run by onnxruntime on the CPU"""
    num_labels: Annotated[int, tyro.conf.arg(aliases=("--k",))] = 10
    """k of one-shot sampling: labels per image (after merging duplicates, possibly fewer)"""
    format: Literal["text", "json"] = "text"
    """text (the reference's lines) or json"""
    tokenizer: str | None = None
    """LLaMA tokenizer.model, for a released .pth"""
    clip_weights: str | None = None
    """base CLIP weights (OpenAI .pt or open_clip file), for a released .pth holding only trained keys"""
    llama_params: str | None = None
    """Meta's params.json of the decoder, for a released .pth"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (cuda if present), cuda or cpu"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """weights and activations: auto (bf16 on a GPU that has it, fp16 on an older GPU, fp32 on a CPU), bf16, fp16 or fp32; rotary tables, norm statistics, softmaxes and logits stay fp32"""
    batch_size: int = 16
    """images per forward pass"""
    max_steps: int | None = None
    """one-shot sampling step limit (default: the model config's, 20)"""
    caption: bool = False
    """write a caption of each image (after the caption prompt) instead of its labels"""
    max_length: int = 30
    """--caption: at most this many generated tokens per caption"""
    beams: int = 1
    """--caption: 1 for greedy search, more for beam search with that many beams"""
    length_penalty: float = 1.0
    """--caption with beams > 1: a hypothesis scores log-probability / length ** length_penalty (0: total probability)"""
    attention_map: str | None = None
    """folder for one PNG per image: each label's attention (its first token's) over the image patches"""
    layer: int | None = None
    """decoder layer of the attention maps, 0-based, negative from the last (default: mean over layers)"""
    head: int | None = None
    """attention head of the attention maps (default: mean over heads)"""

    def __post_init__(self):
        if not self.images:
            raise ValueError("--image needs at least one file")
        if (self.checkpoint is None) == (self.onnx is None):
            raise ValueError("give the model as --checkpoint (PyTorch) or --onnx (ONNX graphs), one of them")
        if self.onnx and (self.caption or self.attention_map):
            raise ValueError("--onnx runs one-shot labels only: --caption and --attention-map need the PyTorch model (--checkpoint)")
        if self.onnx and (self.device == "cuda" or self.precision not in ("auto", "fp32")):
            raise ValueError("--onnx runs on the CPU in float32: --device cuda and --precision bf16/fp16 need --checkpoint")
        if self.max_steps is not None and self.max_steps < 2:
            raise ValueError(f"--max-steps must be >= 2 (a label's first token, then its end), not {self.max_steps}")
        if self.num_labels < 1:
            raise ValueError("--num-labels must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.max_length < 1 or self.beams < 1:
            raise ValueError("--max-length and --beams must be >= 1")
        if (self.layer is not None or self.head is not None) and not self.attention_map:
            raise ValueError("--layer and --head choose the attention maps: they need --attention-map DIR")
        if self.caption and self.attention_map:
            raise ValueError("--attention-map draws the labels' attention and --caption writes no labels: give one of them per run")


def main(argv: list[str] | None = None) -> int:
    cfg = parse(InferConfig, argv, prog="python -m jobs.infer", description=__doc__)
    log = sys.stderr if cfg.format == "json" else sys.stdout
    print(f"infer config: {json.dumps(asdict(cfg))}", file=log)
    from model.checkpoint import load_model
    from model.generate import generate
    from model.precision import place, resolve_device, resolve_dtype
    from model.sampling import one_shot
    from model.vision import preprocess

    try:
        device = torch.device("cpu") if cfg.onnx else resolve_device(cfg.device)
        if cfg.onnx:
            if importlib.util.find_spec("onnxruntime") is None:
                print("error: --onnx needs onnxruntime: pip install 'nxtp[onnx]'", file=sys.stderr)
                return 2
            from model.onnx_runtime import load_onnx

            model, tok = load_onnx(cfg.onnx)
            notes = []
        else:
            model, tok, notes = load_model(cfg.checkpoint, cfg.tokenizer, cfg.clip_weights, cfg.llama_params)
    except (FileNotFoundError, ValueError) as err:  # WeightError included: a damaged export names its file and key
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=log)
    vocab = model.cfg.n_logits
    if cfg.num_labels > vocab and not cfg.caption:
        print(f"error: --num-labels {cfg.num_labels} is larger than the model's vocabulary of {vocab} tokens: k can be at most {vocab}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(cfg.precision, device)
    if cfg.onnx:
        print(f"model: {model.n_parameters / 1e6:.1f}M parameters, ONNX graphs in onnxruntime on the CPU in float32", file=log)
    else:
        model = place(model, device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.1f}M parameters on {device} in {str(dtype).removeprefix('torch.')}", file=log)
    transform = preprocess(model.cfg.vision.image_size)
    if cfg.attention_map:
        from model.attention import check_layer_head

        try:
            check_layer_head(model.cfg.decoder.n_layers, model.cfg.decoder.n_heads, cfg.layer, cfg.head)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        os.makedirs(cfg.attention_map, exist_ok=True)

    results, failed, written = [], 0, set()
    for start in range(0, len(cfg.images), cfg.batch_size):
        paths, tensors = [], []
        for path in cfg.images[start : start + cfg.batch_size]:
            try:
                tensors.append(transform(_read_image(path)))
                paths.append(path)
            except (OSError, ValueError) as err:  # ImageRefused included: not an image, undecodable, a decompression bomb
                print(f"error: {path}: cannot read the image ({err})", file=sys.stderr)
                failed += 1
        if not tensors:
            continue
        t0 = time.perf_counter()
        batch = torch.stack(tensors).to(device, dtype)
        if cfg.caption:
            try:
                with torch.inference_mode():
                    captions = generate(model, batch, tok, max_length=cfg.max_length, beams=cfg.beams, length_penalty=cfg.length_penalty)
            except ValueError as err:  # a max_length the model cannot hold
                print(f"error: {err}", file=sys.stderr)
                return 2
            seconds = time.perf_counter() - t0
            for path, out in zip(paths, captions):
                results.append({"image": path, "caption": out.text, "log_prob": round(out.log_prob, 5), "tokens": len(out.tokens), "ended": out.ended})
                if cfg.format == "text":
                    search = "greedy" if cfg.beams == 1 else f"beam search, {cfg.beams} beams"
                    print(f"\n{path} (inference time: {seconds:.3f}s for {len(paths)} image(s), {search})")
                    print(f"caption: {out.text}" + ("" if out.ended else f"  [cut at --max-length {cfg.max_length}]"))
            continue
        with torch.inference_mode():
            labels = one_shot(model, batch, tok, k=cfg.num_labels, max_steps=cfg.max_steps)
        seconds = time.perf_counter() - t0
        for path, image, out in zip(paths, tensors, labels):
            results.append({"image": path, "labels": out.labels, "probs": [round(p, 5) for p in out.probs]})
            if cfg.attention_map:
                results[-1]["attention_map"] = _write_attention_map(cfg, model, tok, path, image.to(device, dtype), out, written, log)
            if cfg.format == "text":
                print(f"\n{path} (inference time: {seconds:.3f}s for {len(paths)} image(s))")
                print(f"top-{cfg.num_labels} predictions:")
                for label, prob in zip(out.labels, out.probs):
                    print(f"| prob: {prob:.5f} - {label}")
            if cfg.attention_map:
                print(f"attention map: {results[-1]['attention_map']}", file=log)
    if cfg.format == "json":
        json.dump(results, sys.stdout, indent=2)
        print()
    return 1 if failed else 0


def _read_image(path: str):
    """The upright RGB picture of an image file, decoded as ingestion decodes it (pipeline.images); raises OSError or ImageRefused."""
    from pipeline.images import decode_image

    with open(path, "rb") as f:
        return decode_image(f.read())


def _write_attention_map(cfg: InferConfig, model, tok, path: str, image: torch.Tensor, out, written: set[str], log) -> str:
    """The PNG of one image's label attention maps in ``cfg.attention_map``; returns its path."""
    from model.attention import label_maps
    from pipeline.attention_maps import write_figure

    with torch.inference_mode():
        maps = label_maps(model, tok, image, out.labels, cfg.layer, cfg.head)
    for label in out.labels:
        if label not in maps:
            print(f"note: {path}: no attention map for the label {label!r} (it does not tokenize after the prompt)", file=log)
    kept = [(label, prob) for label, prob in zip(out.labels, out.probs) if label in maps]
    which = f"layer {'mean' if cfg.layer is None else cfg.layer}, head {'mean' if cfg.head is None else cfg.head}"
    stem = os.path.splitext(os.path.basename(path))[0]
    target, n = os.path.join(cfg.attention_map, f"{stem}.png"), 1
    while target in written:  # two inputs with one file name: keep both
        n += 1
        target = os.path.join(cfg.attention_map, f"{stem}-{n}.png")
    written.add(target)
    write_figure(
        target, _read_image(path), [label for label, _ in kept], [p for _, p in kept], [maps[label].float().cpu().numpy() for label, _ in kept],
        caption=f"{os.path.basename(path)}: first label token's attention, {which}",
    )
    return target


if __name__ == "__main__":
    sys.exit(main())
