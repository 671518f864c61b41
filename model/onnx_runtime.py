"""An ONNX folder (model/onnx_export.py) run by onnxruntime on the CPU, as one-shot sampling's model.

``OnnxModel`` answers the calls of ``model.sampling.Steps`` with the two graphs, so
``one_shot(OnnxModel(folder), images, tokenizer)`` runs the very algorithm the PyTorch model
runs (the same top-k, greedy continuation, label cache compaction, merging and sorting):
only the network's arithmetic happens in onnxruntime. Tensors cross into and out of the
sessions as numpy arrays that share their memory.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from model.config import NxTPConfig
from model.onnx_export import kv_names, pairs, read_onnx_config
from model.sampling import KV
from model.tokenizer import Tokenizer


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())  # a view when already contiguous


class OnnxModel:
    """The prefill and decode graphs of an ONNX folder in onnxruntime CPU sessions."""

    def __init__(self, folder: str, threads: int | None = None):
        """``threads``: onnxruntime's intra-op threads (None: its default, the machine's cores)."""
        import onnxruntime as ort

        config = read_onnx_config(folder)
        self.folder, self.config = folder, config
        self.cfg = NxTPConfig.from_dict(config["model"])
        self.n_parameters = int(config["parameters"])
        self.tokenizer = Tokenizer(os.path.join(folder, config["tokenizer"]))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.prefill_session, self.decode_session = (
            ort.InferenceSession(os.path.join(folder, config["graphs"][name]), options, providers=["CPUExecutionProvider"])
            for name in ("prefill", "decode")
        )
        n = self.cfg.decoder.n_layers
        self._prefix, self._past = kv_names("prefix", n), kv_names("past", n)

    def prefill(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, KV]:
        out = self.prefill_session.run(None, {"images": _array(images.float()), "prompt_ids": _array(prompt_ids.long())})
        return torch.from_numpy(out[0]), pairs([torch.from_numpy(a) for a in out[1:]])

    def new_cache(self, like: torch.Tensor, B: int, k: int, slots: int) -> KV:
        """An empty cache: the decode graph appends each step's keys and values to it."""
        d = self.cfg.decoder
        shape = (B, d.n_kv_heads or d.n_heads, k, 0, d.head_dim)
        return [(like.new_empty(shape), like.new_empty(shape)) for _ in range(d.n_layers)]

    def step(self, tokens: torch.Tensor, position: int, prefix_kv: KV, cache: KV, step: int) -> tuple[torch.Tensor, torch.Tensor, KV]:
        feeds = {"tokens": _array(tokens), "position": np.array(position, dtype=np.int64)}
        feeds.update(zip(self._prefix, (_array(t) for layer in prefix_kv for t in layer)))
        feeds.update(zip(self._past, (_array(t) for layer in cache for t in layer)))
        out = self.decode_session.run(None, feeds)
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]), pairs([torch.from_numpy(a) for a in out[2:]])


def load_onnx(folder: str, threads: int | None = None) -> tuple[OnnxModel, Tokenizer]:
    """An ONNX folder's model and its tokenizer."""
    model = OnnxModel(folder, threads)
    return model, model.tokenizer
