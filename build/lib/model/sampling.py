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

The continuation reuses the prefix's keys and values (``Decoder.decode``); with
``use_cache=False`` it recomputes the whole sequence every step instead, as the
reference implementation does (kept for tests and the benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.nxtp import NxTP
from model.prompt import prefix_mask
from model.tokenizer import Tokenizer


@dataclass
class Labels:
    """One image's labels, most probable first."""

    labels: list[str]
    probs: list[float]


@torch.no_grad()
def sample_tokens(
    model: NxTP,
    images: torch.Tensor,
    prompt_ids: list[int],
    delimiter_id: int,
    k: int,
    max_steps: int = 20,
    use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [B, k, T] and probabilities [B, k, T] of each label, and its length [B, k].

    A label's length counts its tokens before the delimiter; ``probs[..., :length + 1]``
    holds its factors (the delimiter's last, absent when it was forced).
    """
    B = images.shape[0]
    ids = torch.as_tensor(prompt_ids, device=images.device).expand(B, -1)
    logits, prefix_kv, prefix_h = model.prefill(images, ids)
    probs0, first = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [B, k]
    tokens, probs = [first], [probs0]
    done = first == delimiter_id
    P = prefix_h.shape[1]
    cache = _label_cache(model, prefix_kv[0][0], B, k, max_steps) if use_cache else None
    step = 0
    while not bool(done.all()) and len(tokens) < max_steps - 1:
        if use_cache:
            h = model.decoder.decode(model.decoder.embed(tokens[-1]), P + step, prefix_kv, cache, step)  # [B, k, D]
        else:
            h = _recompute_last(model, prefix_h, torch.stack(tokens, dim=-1))
        p, nxt = torch.softmax(model.decoder.lm_head(h).float(), dim=-1).max(dim=-1)  # [B, k]
        tokens.append(nxt)
        probs.append(p)
        done |= nxt == delimiter_id
        step += 1
    tokens_t, probs_t = torch.stack(tokens, dim=-1), torch.stack(probs, dim=-1)  # [B, k, T]
    is_delim = tokens_t == delimiter_id
    lengths = torch.where(is_delim.any(-1), is_delim.float().argmax(-1), torch.full_like(tokens_t[..., 0], tokens_t.shape[-1]))
    return tokens_t, probs_t, lengths


def _label_cache(model: NxTP, like: torch.Tensor, B: int, k: int, max_steps: int):
    cfg = model.cfg.decoder
    shape = (B, k, cfg.n_kv_heads or cfg.n_heads, max_steps, cfg.head_dim)
    return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in model.decoder.layers]


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
    model: NxTP,
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
