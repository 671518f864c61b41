"""One-shot sampling as two ONNX graphs: the prefill and one decoding step of every label.

An ONNX folder (written by :func:`export_onnx`, run by ``model.onnx_runtime.OnnxModel``)::

    config.json        {"format": "nxtp-onnx", "format_version": 1, "model": NxTPConfig, "graphs": ..., "external_data": ...}
    tokenizer.model    the SentencePiece model (prompt ids in, label texts out, as for the PyTorch model)
    prefill.onnx       images [B, 3, S, S] float32, prompt_ids [B, T] int64
                       -> logits [B, V] float32 (the last prompt position),
                          prefix_key.{i}, prefix_value.{i} [B, Hkv, P, hd] per decoder layer i (P = image tokens + T)
    decode.onnx        tokens [B, K] int64, position [] int64 (P + the labels' earlier tokens t),
                       prefix_key.{i}, prefix_value.{i}, past_key.{i}, past_value.{i} [B, Hkv, K, t, hd] (t may be 0)
                       -> prob [B, K] float32, next [B, K] int64 (the greedy next token and its probability),
                          present_key.{i}, present_value.{i} [B, Hkv, K, t + 1, hd]
    weights.bin        with external data: the weights of both graphs, each distinct tensor stored once

The graphs are traced from the PyTorch modules that sampling runs (``NxTP.prefill`` and
``model.sampling.decode_step``), so they compute the same numbers, float32 throughout.
Weights go to ``weights.bin`` when a graph's would pass protobuf's 2 GiB limit of one file
(the published 1.78B model: 7 GB in float32), or always with ``external_data="always"``;
the decoder's weights, which both graphs hold, are then written once.

Exporting uses the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``): it needs
only the ``onnx`` package and traces the demo model's two graphs in about a second. The
torch.export-based one (``dynamo=True``) needs onnxscript and onnx-ir besides, took 14 s for
the demo model's prefill alone (same numbers within 4e-6), and specializes dimensions of
size 0 and 1, which the empty label cache of the first decoding step has. torch deprecates
the TorchScript exporter; it is there in the torch this project pins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable

import torch
from torch import nn

from model.nxtp import NxTP
from model.sampling import decode_step
from model.tokenizer import Tokenizer

FORMAT, FORMAT_VERSION = "nxtp-onnx", 1
OPSET = 17
PREFILL, DECODE, WEIGHTS = "prefill.onnx", "decode.onnx", "weights.bin"
EXTERNAL_CHOICES = ("auto", "always")
INLINE_LIMIT = 2**31 - 2**27  # protobuf's 2 GiB per file, less room for the graph itself
_MIN_EXTERNAL = 1024  # smaller tensors stay in the graph (onnx.save_model's default threshold)
_ALIGN = 4096  # offsets of tensors in weights.bin: page-aligned, so that a runtime may map them


def kv_names(prefix: str, n_layers: int) -> list[str]:
    """``{prefix}_key.0, {prefix}_value.0, {prefix}_key.1, ...``: a graph's per-layer keys and values."""
    return [f"{prefix}_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]


def pairs(flat) -> list[tuple]:
    """(k0, v0, k1, v1, ...) -> [(k0, v0), (k1, v1), ...]."""
    return list(zip(flat[0::2], flat[1::2]))


class PrefillGraph(nn.Module):
    """``NxTP.prefill`` without the prefix embeddings: (logits, k0, v0, k1, v1, ...)."""

    def __init__(self, model: NxTP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, prompt_ids: torch.Tensor):
        logits, kv, _ = self.model.prefill(images, prompt_ids)
        return (logits, *[t for layer in kv for t in layer])


class DecodeGraph(nn.Module):
    """``decode_step`` on a cache that grows by appending: (prob, next, present k0, v0, ...)."""

    def __init__(self, model: NxTP):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *kv: torch.Tensor):
        n = 2 * self.model.cfg.decoder.n_layers
        p, nxt, present = decode_step(self.model, tokens, position, pairs(kv[:n]), pairs(kv[n:]), None)
        return (p, nxt, *[t for layer in present for t in layer])


def _example_inputs(model: NxTP, tok: Tokenizer, B: int = 2, K: int = 3, t: int = 2):
    """Inputs to trace with: prefill's, and decode's from the prefill's own outputs."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    prompt = torch.tensor(tok.prompt_ids(cfg.prompt)).expand(B, -1).contiguous()
    with torch.no_grad():
        prefix_kv = PrefillGraph(model)(images, prompt)[1:]
    P = prefix_kv[0].shape[2]
    d = cfg.decoder
    past = [torch.randn(B, d.n_kv_heads or d.n_heads, K, t, d.head_dim, generator=g) for _ in range(2 * d.n_layers)]
    tokens = torch.randint(0, d.vocab_size, (B, K), generator=g)
    decode = (tokens, torch.tensor(P + t), *prefix_kv, *past)
    return (images, prompt), decode


def _export_graphs(model: NxTP, tok: Tokenizer, scratch: str) -> tuple[str, str]:
    """Trace both graphs into ``scratch`` (torch writes a graph past 2 GiB with its weights beside it)."""
    n = model.cfg.decoder.n_layers
    prefill_inputs, decode_inputs = _example_inputs(model, tok)
    prefix, past, present = kv_names("prefix", n), kv_names("past", n), kv_names("present", n)
    paths = os.path.join(scratch, "prefill", PREFILL), os.path.join(scratch, "decode", DECODE)
    for path in paths:
        os.makedirs(os.path.dirname(path))
    batch = {0: "batch"}
    torch.onnx.export(
        PrefillGraph(model), prefill_inputs, paths[0], dynamo=False, opset_version=OPSET,
        input_names=["images", "prompt_ids"], output_names=["logits", *prefix],
        dynamic_axes={"images": batch, "prompt_ids": {0: "batch", 1: "prompt"}, "logits": batch,
                      **{name: {0: "batch", 2: "prefix"} for name in prefix}},
    )  # fmt: skip
    labels = {0: "batch", 1: "labels"}
    torch.onnx.export(
        DecodeGraph(model), decode_inputs, paths[1], dynamo=False, opset_version=OPSET,
        input_names=["tokens", "position", *prefix, *past], output_names=["prob", "next", *present],
        dynamic_axes={"tokens": labels, "prob": labels, "next": labels,
                      **{name: {0: "batch", 2: "prefix"} for name in prefix},
                      **{name: {0: "batch", 2: "labels", 3: "past"} for name in past},
                      **{name: {0: "batch", 2: "labels", 3: "past_and_this"} for name in present}},
    )  # fmt: skip
    return paths


def _weight_bytes(graph) -> int:
    return sum(len(t.raw_data) for t in graph.graph.initializer)


def _to_external(graphs: dict, folder: str) -> int:
    """Move every initializer of ``graphs`` (name -> ModelProto) into ``folder/weights.bin``, equal tensors once.

    Returns the bytes written. The graphs' tensors point into the file (location, offset, length).
    """
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    stored: dict[tuple, tuple[int, int]] = {}
    with open(os.path.join(folder, WEIGHTS), "wb") as f:
        for graph in graphs.values():
            for tensor in graph.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < _MIN_EXTERNAL:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).hexdigest())
                if key not in stored:
                    f.seek(-f.tell() % _ALIGN, os.SEEK_CUR)
                    stored[key] = (f.tell(), len(tensor.raw_data))
                    f.write(tensor.raw_data)
                offset, length = stored[key]
                set_external_data(tensor, WEIGHTS, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
        return f.tell()


def export_onnx(
    model: NxTP,
    tok: Tokenizer,
    folder: str,
    external_data: str = "auto",
    progress: Callable[[str], None] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the ONNX folder of ``model`` (float32, on the CPU) into the existing empty ``folder``; returns its config.

    ``external_data``: "auto" (weights.bin when a graph's weights pass protobuf's 2 GiB) or "always".
    ``progress`` is told what is being done (tracing a large model takes minutes); ``extra``
    goes into config.json (e.g. the exporting job's settings).
    """
    import onnx

    if external_data not in EXTERNAL_CHOICES:
        raise ValueError(f"external_data must be one of {', '.join(EXTERNAL_CHOICES)}, not {external_data!r}")
    say = progress or (lambda message: None)
    model = model.float().cpu().eval()
    graphs = {}
    # nn.MultiheadAttention's fused inference kernel (open_clip's ViT blocks) has no ONNX form: trace the plain ops
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".trace-") as scratch, torch.no_grad(), warnings.catch_warnings():
            # multi_head_attention_forward's checks of its own shapes, which tracing cannot record (they hold by construction)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
            for path in _export_graphs(model, tok, scratch):
                say(f"traced {os.path.basename(path)}")
                graphs[os.path.basename(path)] = onnx.load(path)  # with the weights torch wrote beside a large graph
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    external = external_data == "always" or max(_weight_bytes(g) for g in graphs.values()) > INLINE_LIMIT
    weight_bytes = _to_external(graphs, folder) if external else None
    for name, graph in graphs.items():
        onnx.save_model(graph, os.path.join(folder, name))
        onnx.checker.check_model(os.path.join(folder, name))  # by path: a graph with external data is checked whole
        say(f"wrote {name}" + (f" (weights in {WEIGHTS})" if external else ""))
    shutil.copyfile(tok.path, os.path.join(folder, "tokenizer.model"))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "tokenizer": "tokenizer.model",
        "graphs": {"prefill": PREFILL, "decode": DECODE},
        "opset": OPSET,
        "external_data": WEIGHTS if external else None,
        "external_data_bytes": weight_bytes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__},
        **(extra or {}),
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return config


def read_onnx_config(folder: str) -> dict:
    """config.json of an ONNX folder, checked: its format, version and files."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: not an ONNX export of an NxTP model (no config.json)")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        hint = " (an exported PyTorch model: pass it as --checkpoint)" if config.get("format") == "nxtp" else ""
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}{hint}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {config.get('format_version')}, this code reads {FORMAT_VERSION}")
    files = [*config["graphs"].values(), config["tokenizer"]] + ([config["external_data"]] if config["external_data"] else [])
    for rel in files:
        if not os.path.isfile(os.path.join(folder, rel)):
            raise FileNotFoundError(f"{os.path.join(folder, rel)}: missing (the ONNX export is incomplete)")
    return config
