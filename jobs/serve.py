"""A page to try a model: ``python -m jobs.serve --checkpoint runs/demo/export [--port N]``.

Starts a small Streamlit app on 127.0.0.1 (``--host`` to change): drop or upload an
image, choose k, and see the top-k labels of one-shot sampling with probability bars,
and the attention map of a chosen label (its first token over the image patches, a
decoder layer and head or their mean, as ``jobs.infer --attention-map`` draws it).
``--checkpoint`` takes what ``jobs.infer`` takes (an exported folder, its hub id, or a
released NxTP .pth with ``--tokenizer``, ``--clip-weights``, ``--llama-params``). Uses CUDA
when present, else the CPU; ``--precision`` as ``jobs.infer`` takes it (auto: bf16 on a GPU,
fp32 on a CPU; see model/precision.py). Ctrl-C stops the server.

The page itself is ``jobs/serve_page.py``, run by Streamlit's own launcher; this job
checks that the checkpoint exists, then runs ``streamlit run jobs/serve_page.py -- <these flags>``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Literal

from jobs._cli import parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "jobs", "serve_page.py")


@dataclass
class ServeConfig:
    checkpoint: str
    """exported model folder, its hub id (owner/name) in the local Hugging Face cache, or a released NxTP .pth"""
    port: int = 8501
    """port of the page"""
    host: str = "127.0.0.1"
    """address the server listens on (127.0.0.1: this machine only)"""
    num_labels: int = 10
    """k shown first (the page's slider goes from 1 to 100)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (cuda if present), cuda or cpu"""
    tokenizer: str | None = None
    """LLaMA tokenizer.model, for a released .pth"""
    clip_weights: str | None = None
    """base CLIP weights, for a released .pth holding only trained keys"""
    llama_params: str | None = None
    """Meta's params.json of the decoder, for a released .pth"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """weights and activations: auto (bf16 on a GPU that has it, fp16 on an older GPU, fp32 on a CPU), bf16, fp16 or fp32; rotary tables, norm statistics, softmaxes and logits stay fp32"""

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")
        if not 1 <= self.num_labels <= 100:
            raise ValueError("--num-labels must be in 1..100")


def parse_args(argv: list[str] | None) -> ServeConfig:
    return parse(ServeConfig, argv, prog="python -m jobs.serve", description=__doc__)


class Predictor:
    """The model behind the page: loaded once; labels and attention maps of PIL images.

    The page decodes an upload with ``pipeline.images.decode_image``, as ingestion and
    ``jobs.infer`` do, so the model sees the picture training saw.
    """

    def __init__(self, cfg: ServeConfig):
        from model.checkpoint import load_model
        from model.precision import place, resolve_device, resolve_dtype
        from model.vision import preprocess

        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.precision, self.device)
        model, self.tokenizer, self.notes = load_model(cfg.checkpoint, cfg.tokenizer, cfg.clip_weights, cfg.llama_params)
        self.model = place(model, self.device, self.dtype)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.max_k = self.model.cfg.n_logits
        self.transform = preprocess(self.model.cfg.vision.image_size)

    def _tensor(self, image):
        return self.transform(image.convert("RGB")).to(self.device, self.dtype)

    def labels(self, image, k: int) -> tuple[list[str], list[float]]:
        import torch

        from model.sampling import one_shot

        if not 1 <= k <= self.max_k:
            raise ValueError(f"k {k}: the model's vocabulary has {self.max_k} tokens, k must be in 1..{self.max_k}")
        with torch.inference_mode():
            (out,) = one_shot(self.model, self._tensor(image)[None], self.tokenizer, k=k)
        return out.labels, out.probs

    def attention(self, image, label: str, layer: int | None = None, head: int | None = None):
        """The heat-map picture of ``label``'s attention over ``image``, or None when the label has no map."""
        import torch

        from model.attention import label_maps
        from pipeline.attention_maps import heat_overlay

        with torch.inference_mode():
            maps = label_maps(self.model, self.tokenizer, self._tensor(image), [label], layer, head)
        return heat_overlay(image, maps[label].float().cpu().numpy()) if label in maps else None


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    print(f"serve config: {json.dumps(asdict(cfg))}", flush=True)
    from model import hub

    if not os.path.exists(cfg.checkpoint) and not hub.is_hub_id(cfg.checkpoint):
        print(f"error: checkpoint not found: {cfg.checkpoint}", file=sys.stderr)
        return 2
    if cfg.device == "cuda":
        from model.precision import resolve_device

        try:
            resolve_device(cfg.device)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if importlib.util.find_spec("streamlit") is None:
        print("error: the page needs Streamlit: pip install 'nxtp[serve]'", file=sys.stderr)
        return 2
    cmd = [
        sys.executable, "-m", "streamlit", "run", PAGE,
        "--server.address", cfg.host, "--server.port", str(cfg.port), "--server.headless", "true",
        "--server.fileWatcherType", "none", "--server.showEmailPrompt", "false",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal", "--theme.base", "light",
        "--", *argv,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    print(f"serving the page at http://{cfg.host}:{cfg.port} (Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    proc = subprocess.Popen(cmd, env=env)  # in the caller's folder: relative paths in argv stay valid
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print("server stopped", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
