"""One-shot sampling: the top-k labels of each image in one pass.

1. One forward over the prefix (image tokens + prompt); softmax over the whole extended
   vocabulary at the last prompt position ("are"); its top-k tokens start k labels.
2. Each label is continued greedily, all k (for every image of the batch) in parallel,
   until it emits the delimiter ",". A label gets at most ``max_steps - 1`` sampled
   tokens (the first one from the top-k, then greedy ones); one that has not ended by
   then is ended with a forced delimiter, as in the reference implementation.
3. A label's probability is the product of its token probabilities, delimiter included
   (a forced delimiter counts 1); labels with the same text are merged by summing;
   results are sorted by probability.

The continuation reuses the prefix's keys and values (``Decoder.decode``) and computes
only the labels still running (``_LabelDecoder``); with ``use_cache=False`` it recomputes
every label's whole sequence every step instead, as the reference implementation does
(kept for tests and the benchmark). Softmaxes are float32 whatever the model's dtype.

The model is asked for two things only (:class:`Steps`): the prefill and one decoding
step. An ``NxTP`` module answers through :class:`TorchSteps`; the exported ONNX graphs
answer through ``model.onnx_runtime.OnnxModel``, so both run this same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from model.config import NxTPConfig
from model.nxtp import NxTP
from model.prompt import prefix_mask
from model.tokenizer import Tokenizer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer (keys, values)


@dataclass
class Labels:
    """One image's labels, most probable first."""

    labels: list[str]
    probs: list[float]


class Steps(Protocol):
    """The model calls of one-shot sampling."""

    cfg: NxTPConfig

    def prefill(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """images [B, 3, S, S], prompt ids [B, T] -> (float32 logits at the last prompt position [B, V], per layer (k, v) [B, Hkv, P, hd])."""

    def new_cache(self, like: torch.Tensor, B: int, k: int, slots: int) -> KV:
        """An empty label cache for ``k`` labels of ``B`` images, up to ``slots`` tokens each (``like``: a prefix tensor)."""

    def step(self, tokens: torch.Tensor, position: int, prefix_kv: KV, cache: KV, step: int) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """Tokens [B, K] at ``position``, the ``step``-th of their labels -> (probability [B, K], id [B, K]) of the
        greedy next token, and the cache holding this step's keys and values."""


class TorchSteps:
    """:class:`Steps` of an ``NxTP`` module: a preallocated label cache, written in place."""

    def __init__(self, model: NxTP):
        self.model, self.cfg = model, model.cfg

    def prefill(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, KV]:
        logits, kv, _ = self.model.prefill(images, prompt_ids)
        return logits, kv

    def new_cache(self, like: torch.Tensor, B: int, k: int, slots: int) -> KV:
        cfg = self.cfg.decoder
        shape = (B, cfg.n_kv_heads or cfg.n_heads, k, slots, cfg.head_dim)
        return [(like.new_empty(shape), like.new_empty(shape)) for _ in range(cfg.n_layers)]

    def step(self, tokens: torch.Tensor, position: int, prefix_kv: KV, cache: KV, step: int) -> tuple[torch.Tensor, torch.Tensor, KV]:
        p, nxt, _ = decode_step(self.model, tokens, position, prefix_kv, cache, step)
        return p, nxt, cache


def decode_step(model: NxTP, tokens: torch.Tensor, position, prefix_kv: KV, cache: KV, step: int | None):
    """One greedy step of K labels per image: tokens [B, K] -> (probability [B, K], id [B, K], the labels' (k, v) per layer).

    ``cache`` and ``step`` as ``Decoder.decode`` takes them (``step=None``: the exported graph's way).
    """
    h, label_kv = model.decoder.decode(model.decoder.embed(tokens), position, prefix_kv, cache, step)
    p, nxt = greedy(model, h)
    return p, nxt, label_kv


@torch.no_grad()
def sample_tokens(
    model: NxTP | Steps,
    images: torch.Tensor,
    prompt_ids: list[int],
    delimiter_id: int,
    k: int,
    max_steps: int = 20,
    use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [B, k, T] and probabilities [B, k, T] of each label, and its length [B, k].

    A label's length counts its tokens before the delimiter; ``probs[..., :length + 1]``
    holds its factors (the delimiter's last, absent when it was forced). Past a label's
    delimiter its tokens are the delimiter and its probabilities 1. ``model``: an ``NxTP``
    module or other :class:`Steps` (``use_cache=False`` needs the module).
    """
    B = images.shape[0]
    ids = torch.as_tensor(prompt_ids, device=images.device).expand(B, -1)
    if use_cache:
        steps = TorchSteps(model) if isinstance(model, NxTP) else model
        logits, prefix_kv = steps.prefill(images, ids)
    elif isinstance(model, NxTP):
        logits, _, prefix_h = model.prefill(images, ids)
    else:
        raise ValueError("use_cache=False recomputes with the PyTorch module: pass an NxTP model")
    probs0, first = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [B, k]
    width = max(max_steps - 1, 1)  # a label's tokens, the first one from the top-k included
    tokens = first.new_full((B, k, width), delimiter_id)
    probs = probs0.new_ones((B, k, width))
    tokens[..., 0], probs[..., 0] = first, probs0
    done = first == delimiter_id
    labels = _LabelDecoder(steps, prefix_kv, max_steps) if use_cache else None
    n = 1  # tokens so far
    while n < width and not bool(done.all()):
        if labels is not None:
            p, nxt = labels.step(tokens[..., n - 1], done)
        else:
            p, nxt = greedy(model, _recompute_last(model, prefix_h, tokens[..., :n]))
        tokens[..., n] = torch.where(done, delimiter_id, nxt)
        probs[..., n] = torch.where(done, 1.0, p)
        done |= nxt == delimiter_id
        n += 1
    tokens, probs = tokens[..., :n], probs[..., :n]
    is_delim = tokens == delimiter_id
    lengths = torch.where(is_delim.any(-1), is_delim.float().argmax(-1), torch.full_like(tokens[..., 0], n))
    return tokens, probs, lengths


def greedy(model: NxTP, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, id) of the most probable next token; softmax in float32."""
    return torch.softmax(model.decoder.lm_head(hidden).float(), dim=-1).max(dim=-1)


class _LabelDecoder:
    """The KV-cached continuation of k labels per image, computing only labels still running.

    The decoder works on a compact block [B', K'] of (image, label) slots: the images that
    still have a running label, and for each the first K' of its labels with running ones
    first (K' = the most running labels of any image). Finished labels keep their slots
    only as padding of a shorter image; when finished labels would leave a quarter of the
    block idle, the block shrinks: the running labels' cache slots (and the prefixes of
    images still running) are gathered into a smaller block. A label's numbers do not
    depend on which slot or block it runs in.
    """

    SHRINK = 0.75  # rebuild the block when the running labels need at most this share of it

    def __init__(self, steps: Steps, prefix_kv: KV, max_steps: int):
        self.steps, self.prefix_kv = steps, prefix_kv
        B, _, self.prefix_len, _ = prefix_kv[0][0].shape
        self.slots = max(max_steps - 2, 1)  # the label tokens that are ever inputs
        self.images = torch.arange(B, device=prefix_kv[0][0].device)  # [B'] image of each block row
        self.labels: torch.Tensor | None = None  # [B', K'] label (of k) in each slot
        self.cache: KV = []
        self.step_index = 0  # label tokens already in the cache

    def step(self, last: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token (probability, id) [B, k] of every label, given the last tokens [B, k].

        Entries of labels that are done are left as filler (the caller masks them).
        """
        B, k = last.shape
        if self.labels is None:
            self.labels = torch.arange(k, device=last.device).expand(B, k)
        self._maybe_shrink(done)
        rows = self.images[:, None]  # [B', 1]
        position = self.prefix_len + self.step_index
        p_block, nxt_block, self.cache = self.steps.step(last[rows, self.labels], position, self.prefix_kv, self.cache, self.step_index)  # [B', K']
        self.step_index += 1
        p = p_block.new_ones((B, k))
        nxt = nxt_block.new_zeros((B, k))
        # the slots of a row hold distinct labels: a plain scatter
        p[rows, self.labels], nxt[rows, self.labels] = p_block, nxt_block
        return p, nxt

    def _maybe_shrink(self, done: torch.Tensor) -> None:
        running = ~done[self.images[:, None], self.labels]  # [B', K']
        per_image = running.sum(1)
        K_new = int(per_image.max())
        keep = torch.nonzero(per_image).squeeze(1)  # block rows with a running label
        rows_new = keep.numel()
        size = self.labels.numel()
        if self.cache and rows_new * K_new > self.SHRINK * size:
            return
        # running labels first in each row (stable: they keep their order), then finished ones as padding
        order = torch.argsort((~running[keep]).to(torch.int8), dim=1, stable=True)[:, :K_new]  # [B'', K'']
        self.labels = torch.gather(self.labels[keep], 1, order)
        if rows_new < self.images.numel():
            self.prefix_kv = [(pk[keep], pv[keep]) for pk, pv in self.prefix_kv]
        self.images = self.images[keep]
        if not self.cache:
            self.cache = self.steps.new_cache(self.prefix_kv[0][0], rows_new, K_new, self.slots)
            return
        filled = self.step_index
        self.cache = [(_gather_slots(ck, keep, order, filled), _gather_slots(cv, keep, order, filled)) for ck, cv in self.cache]


def _gather_slots(cache: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, filled: int) -> torch.Tensor:
    """A smaller cache [B'', Hkv, K'', T, hd]: slots ``order`` [B'', K''] of rows ``rows``, filled steps copied.

    T is the cache's: the slots of a preallocated one, or exactly ``filled`` (a cache that grows by appending).
    """
    _, Hkv, K, T, hd = cache.shape
    heads = torch.arange(Hkv, device=cache.device)
    flat = (rows[:, None, None] * Hkv + heads[None, :, None]) * K + order[:, None, :]  # [B'', Hkv, K'']
    out = cache.new_empty((*flat.shape, T, hd))
    out[..., :filled, :] = cache.view(-1, T, hd)[flat, :filled]
    return out


def _recompute_last(model: NxTP, prefix_h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's way: every label's whole sequence again, last position's hidden state."""
    B, k, t = tokens.shape
    P = prefix_h.shape[1]
    h = torch.cat([prefix_h.repeat_interleave(k, dim=0), model.decoder.embed(tokens.reshape(B * k, t))], dim=1)
    n_image = model.n_image_tokens
    hidden, _ = model.decoder(h, prefix_mask(n_image, P - n_image + t, h.device))
    return hidden[:, -1].reshape(B, k, -1)


def finalize(tokens: torch.Tensor, probs: torch.Tensor, lengths: torch.Tensor, tokenizer: Tokenizer) -> list[Labels]:
    """Decode, merge identical label texts by summing, sort by probability."""
    out = []
    for b in range(tokens.shape[0]):
        merged: dict[str, float] = {}
        for j in range(tokens.shape[1]):
            n = int(lengths[b, j])
            # like the reference: the text with its delimiter is the merge key, commas dropped after
            text = tokenizer.decode(tokens[b, j, :n].tolist() + [tokenizer.delimiter_id])
            merged[text] = merged.get(text, 0.0) + float(probs[b, j, : n + 1].prod())
        ranked = sorted(merged.items(), key=lambda kv: kv[1], reverse=True)
        out.append(Labels([text.replace(",", "") for text, _ in ranked], [p for _, p in ranked]))
    return out


def one_shot(
    model: NxTP | Steps,
    images: torch.Tensor,
    tokenizer: Tokenizer,
    k: int = 10,
    max_steps: int | None = None,
    use_cache: bool = True,
) -> list[Labels]:
    """The top-``k`` labels of each image (after merging, possibly fewer)."""
    tokens, probs, lengths = sample_tokens(
        model,
        images,
        tokenizer.prompt_ids(model.cfg.prompt),
        tokenizer.delimiter_id,
        k,
        max_steps or model.cfg.max_label_steps,
        use_cache,
    )
    return finalize(tokens.cpu(), probs.float().cpu(), lengths.cpu(), tokenizer)
