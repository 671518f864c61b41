"""ONNX graphs of a model: ``python -m jobs.export_onnx --checkpoint CKPT --output model_onnx/``.

``--checkpoint`` is what ``jobs.infer --checkpoint`` takes: an exported model folder, its
hub id, or a released NxTP ``.pth`` with ``--tokenizer`` (and ``--clip-weights``,
``--llama-params`` as jobs.infer needs them). Writes, all at once when complete, the
folder ``jobs.infer --onnx`` reads (layout in model/onnx_export.py): the prefill graph
(image and prompt -> logits of the first label token and the prefix's keys and values),
the one-step decoder of every label with its cache, the tokenizer and config.json. Weights
past protobuf's 2 GiB limit (the published 1.78B model) go to one external ``weights.bin``
that both graphs share; ``--external-data always`` writes it for any model.

Then, unless ``--check-images 0``, runs one-shot sampling on that many random images with
the PyTorch model and with onnxruntime and compares the labels and probabilities: the job
fails (exit status 1) when they differ by more than ``--tolerance``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

from jobs._cli import parse
from pipeline.storage import is_url


@dataclass
class ExportOnnxConfig:
    checkpoint: str
    """exported model folder, its hub id (owner/name), or a released NxTP .pth (as jobs.infer takes it)"""
    output: str
    """folder to write the ONNX graphs, tokenizer and config.json into (replaced when it exists)"""
    external_data: Literal["auto", "always"] = "auto"
    """weights in one external weights.bin: auto (when a graph's weights pass 2 GiB) or always"""
    check_images: int = 2
    """random images to compare onnxruntime's labels with PyTorch's after export (0: no check)"""
    tolerance: float = 1e-4
    """largest difference of a label's probability that the check accepts"""
    tokenizer: str | None = None
    """LLaMA tokenizer.model, for a released .pth"""
    clip_weights: str | None = None
    """base CLIP weights (OpenAI .pt or open_clip file), for a released .pth holding only trained keys"""
    llama_params: str | None = None
    """Meta's params.json of the decoder, for a released .pth"""

    def __post_init__(self):
        if is_url(self.output):
            raise ValueError(f"--output {self.output}: onnxruntime reads local files, so the ONNX folder is written to a local path")
        if self.check_images < 0 or not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"--check-images must be >= 0 and --tolerance a number > 0, not {self.check_images} and {self.tolerance}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse(ExportOnnxConfig, argv, prog="python -m jobs.export_onnx", description=__doc__)
    print(f"export_onnx config: {json.dumps(asdict(cfg))}", flush=True)
    needed = ["onnx"] + (["onnxruntime"] if cfg.check_images else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: exporting needs {' and '.join(missing)}: pip install 'nxtp[onnx]'", file=sys.stderr)
        return 2
    from model.checkpoint import load_model
    from model.onnx_export import export_onnx
    from pipeline.outputs import staged_output

    try:
        _replaceable(cfg.output)  # before the model loads, not after
        model, tok, notes = load_model(cfg.checkpoint, cfg.tokenizer, cfg.clip_weights, cfg.llama_params)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # WeightError included: a damaged export names its file and key
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    t0 = time.perf_counter()
    with staged_output(cfg.output, check=_replaceable) as staging:
        written = export_onnx(model, tok, staging, cfg.external_data, progress=lambda m: print(m, flush=True), extra={"export": asdict(cfg)})
    print(f"exported in {time.perf_counter() - t0:.1f}s to {cfg.output}:")
    for name in sorted(os.listdir(cfg.output)):
        print(f"  {name:16s} {_size(os.path.getsize(os.path.join(cfg.output, name))):>10s}")
    if written["external_data"]:
        print(f"weights in {written['external_data']} (external data), each tensor once for both graphs")
    if cfg.check_images and not _check(model, tok, cfg):
        return 1
    print(f"run it: python -m jobs.infer --onnx {cfg.output} --image IMAGE.jpg")
    return 0


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _replaceable(output: str) -> None:
    """Raise unless ``output`` is missing, empty or an earlier ONNX export (which the new one replaces)."""
    from model.onnx_export import FORMAT

    if not os.path.isdir(output):
        if os.path.exists(output):
            raise FileExistsError(f"--output {output} is a file, not a folder")
        return
    if not os.listdir(output):
        return
    try:
        with open(os.path.join(output, "config.json")) as f:
            if json.load(f).get("format") == FORMAT:
                return
    except (OSError, ValueError, AttributeError):
        pass
    raise FileExistsError(f"--output {output} holds files that are not an ONNX export of this project: choose another folder")


def _check(model, tok, cfg: ExportOnnxConfig) -> bool:
    """One-shot labels of random images, PyTorch against onnxruntime; prints and returns whether they agree."""
    import torch

    from model.onnx_runtime import load_onnx
    from model.sampling import one_shot

    size = model.cfg.vision.image_size
    images = torch.randn(cfg.check_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    onnx_model, onnx_tok = load_onnx(cfg.output)
    with torch.inference_mode():
        expected = one_shot(model, images, tok, k=10)
    got = one_shot(onnx_model, images, onnx_tok, k=10)
    worst, same = 0.0, True
    for a, b in zip(expected, got):
        same &= a.labels == b.labels
        worst = max([worst] + [abs(p - q) for p, q in zip(a.probs, b.probs)])
    ok = same and worst <= cfg.tolerance
    verdict = "agree" if ok else "DIFFER"
    print(f"check: onnxruntime and PyTorch {verdict} on {cfg.check_images} random image(s), top-10 labels "
          f"{'identical' if same else 'not identical'}, largest probability difference {worst:.2e} (tolerance {cfg.tolerance:g})")  # fmt: skip
    if not ok:
        print(f"error: the ONNX graphs in {cfg.output} do not reproduce the PyTorch model's labels", file=sys.stderr)
    return ok


if __name__ == "__main__":
    sys.exit(main())
