"""Captions: the text the model writes after the caption prompt, by greedy or beam search.

The caption branch of training (``caption_weight``) teaches the decoder to continue
``CAPTION_PROMPT`` ("A brief description of the given image is that") with the image's
caption, ended by EOS. Generation reads the same sequence:

1. ``NxTP.prefill`` encodes the image tokens and the prompt once (image block
   bidirectional, text causal); its keys and values fill a cache with room for
   ``max_length`` new tokens;
2. each step runs only the newest token through the decoder blocks; it attends to every
   earlier position (the cache), which is what the prefix mask gives a text position;
3. greedy search takes the most probable token each step; beam search keeps the
   ``beams`` most probable continuations of each image. Both stop at EOS or after
   ``max_length`` new tokens.

A hypothesis's score is its summed token log-probability (EOS included when it was
generated) divided by ``length ** length_penalty`` (length in generated tokens, EOS
included): 0 ranks by total probability, 1 (the default) by mean log-probability per
token, which keeps beam search from preferring short captions.

With ``use_cache=False`` every step recomputes the whole sequence through
``Decoder.forward`` under the prefix mask: the reference the cached path is tested
against (as model/sampling.py does for one-shot sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import CAPTION_PROMPT
from model.decoder import Decoder, apply_rotary
from model.nxtp import NxTP
from model.prompt import prefix_mask
from model.tokenizer import Tokenizer


@dataclass
class Caption:
    """One image's caption."""

    text: str
    tokens: list[int]  # generated ids, EOS excluded
    log_prob: float  # summed log-probability of the generated tokens, EOS included when generated
    ended: bool  # the model wrote EOS (False: cut at max_length)


# ----------------------------------------------------------------------------- the cache


class KVCache:
    """Every layer's keys and values for N sequences, with room for ``capacity`` positions.

    Keys are stored rotated (as ``Attention.forward`` returns them); ``length`` positions are filled.
    """

    def __init__(self, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], capacity: int, repeat: int = 1):
        n, heads, length, head_dim = prefix_kv[0][0].shape  # [B, Hkv, P, hd]
        self.keys, self.values = [], []
        for k, v in prefix_kv:
            ck = k.new_zeros(n * repeat, heads, capacity, head_dim)
            cv = v.new_zeros(n * repeat, heads, capacity, head_dim)
            ck[:, :, :length] = k.repeat_interleave(repeat, dim=0)
            cv[:, :, :length] = v.repeat_interleave(repeat, dim=0)
            self.keys.append(ck)
            self.values.append(cv)
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes row ``index[i]`` (beam search keeps the continuations it chose)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def decode_step(decoder: Decoder, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """h: [N, D], the newest token's embedding at position ``cache.length`` -> normed hidden [N, D].

    Writes the token's keys and values into ``cache`` and advances it by one position.
    """
    pos = cache.length
    if pos >= cache.keys[0].shape[2]:
        raise ValueError(f"the cache holds {cache.keys[0].shape[2]} positions; position {pos} does not fit")
    cos, sin = decoder.rotary(torch.tensor([pos], device=h.device))  # [1, hd]
    x = h[:, None]  # [N, 1, D]
    n = x.shape[0]
    for layer, keys, values in zip(decoder.layers, cache.keys, cache.values):
        attn = layer.self_attn
        a = layer.input_layernorm(x)
        q = apply_rotary(attn.q_proj(a).view(n, 1, attn.n_heads, attn.head_dim).transpose(1, 2), cos, sin)  # [N, H, 1, hd]
        keys[:, :, pos] = apply_rotary(attn.k_proj(a).view(n, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2), cos, sin)[:, :, 0]
        values[:, :, pos] = attn.v_proj(a).view(n, attn.n_kv_heads, attn.head_dim)
        groups = attn.n_heads // attn.n_kv_heads
        k = keys[:, :, : pos + 1].repeat_interleave(groups, dim=1)  # [N, H, pos + 1, hd]
        v = values[:, :, : pos + 1].repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: the newest position sees all earlier ones
        x = x + attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.length += 1
    return decoder.norm(x)[:, 0]


class _Continuation:
    """Next-token logits of N running sequences after a shared prefill, cached or recomputed."""

    def __init__(self, model: NxTP, prefix_kv, prefix_h: torch.Tensor, max_length: int, repeat: int, use_cache: bool):
        self.model = model
        self.prefix_h = prefix_h.repeat_interleave(repeat, dim=0)  # [N, P, D]
        self.cache = KVCache(prefix_kv, prefix_h.shape[1] + max_length, repeat) if use_cache else None

    def reorder(self, index: torch.Tensor) -> None:
        self.prefix_h = self.prefix_h.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        """history: [N, t] generated ids so far (t >= 1) -> logits of the next token [N, V] (float32)."""
        decoder = self.model.decoder
        if self.cache is not None:
            hidden = decode_step(decoder, decoder.embed(history[:, -1]), self.cache)
        else:
            h = torch.cat([self.prefix_h, decoder.embed(history)], dim=1)
            n_image = self.model.n_image_tokens
            out, _ = decoder(h, prefix_mask(n_image, h.shape[1] - n_image, h.device))
            hidden = out[:, -1]
        return decoder.lm_head(hidden).float()


def log_probs(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary in float32, ``banned`` ids excluded (their probability goes to the others)."""
    logits = logits.float()
    if banned:
        logits = logits.index_fill(-1, torch.as_tensor(list(banned), device=logits.device), -math.inf)
    return torch.log_softmax(logits, dim=-1)


# ----------------------------------------------------------------------------- search


@torch.no_grad()
def greedy_search(
    model: NxTP, images: torch.Tensor, prompt_ids: list[int], eos_id: int, max_length: int, banned: Sequence[int] = (), use_cache: bool = True
):
    """(tokens [B, T], summed log-probs [B], lengths [B], ended [B]): the most probable token each step.

    ``lengths`` counts the tokens before EOS; positions past it hold EOS. ``banned`` ids are never chosen.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, not {max_length}")
    B = images.shape[0]
    logits, prefix_kv, prefix_h = model.prefill(images, torch.as_tensor(prompt_ids, device=images.device).expand(B, -1))
    run = _Continuation(model, prefix_kv, prefix_h, max_length, 1, use_cache)
    done = torch.zeros(B, dtype=torch.bool, device=images.device)
    total = torch.zeros(B, device=images.device)
    lengths = torch.full((B,), max_length, dtype=torch.long, device=images.device)
    tokens: list[torch.Tensor] = []
    for t in range(max_length):
        logp, nxt = log_probs(logits, banned).max(dim=-1)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        total += torch.where(done, torch.zeros_like(logp), logp)
        tokens.append(nxt)
        ends = (nxt == eos_id) & ~done
        lengths[ends] = t
        done |= ends
        if bool(done.all()) or t == max_length - 1:
            break
        logits = run.logits(torch.stack(tokens, dim=1))
    return torch.stack(tokens, dim=1), total, lengths, done


@dataclass
class _Hypothesis:
    score: float  # log_prob / length ** length_penalty
    log_prob: float
    tokens: list[int]  # EOS excluded
    ended: bool


@torch.no_grad()
def beam_search(
    model: NxTP,
    images: torch.Tensor,
    prompt_ids: list[int],
    eos_id: int,
    max_length: int,
    beams: int,
    length_penalty: float = 1.0,
    banned: Sequence[int] = (),
    use_cache: bool = True,
) -> list[_Hypothesis]:
    """The best hypothesis of each image under beam search with ``beams`` beams (see the module docstring).

    Each step ranks the ``2 * beams`` best continuations of an image's beams: an EOS
    among the first ``beams`` of them finishes a hypothesis, the best ``beams`` others
    continue. An image is done when it holds ``beams`` finished hypotheses and no running
    beam can still beat the worst of them (an exact bound for ``length_penalty >= 0``:
    log-probabilities only fall as a beam grows); at ``max_length`` the running beams end
    as they are.
    """
    if max_length < 1 or beams < 1:
        raise ValueError(f"max_length and beams must be >= 1, not {max_length} and {beams}")
    B, W = images.shape[0], beams
    device = images.device
    logits, prefix_kv, prefix_h = model.prefill(images, torch.as_tensor(prompt_ids, device=device).expand(B, -1))
    run = _Continuation(model, prefix_kv, prefix_h, max_length, W, use_cache)
    logp = log_probs(logits, banned).repeat_interleave(W, dim=0)  # [B * W, V]
    V = logp.shape[-1]
    scores = torch.full((B, W), -math.inf, device=device)
    scores[:, 0] = 0.0  # one live beam per image at the start: the others would repeat it
    history = torch.zeros(B * W, 0, dtype=torch.long, device=device)
    finished: list[list[_Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    def norm(log_prob: float, length: int) -> float:
        return log_prob / (length**length_penalty)

    for t in range(max_length):
        candidates = (scores.reshape(-1, 1) + logp).reshape(B, W * V)
        top_scores, top_index = candidates.topk(min(2 * W, W * V), dim=-1)  # [B, 2W]
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        keep_scores = torch.full((B, W), -math.inf, device=device)
        keep_source = torch.zeros(B, W, dtype=torch.long, device=device)
        keep_token = torch.full((B, W), eos_id, dtype=torch.long, device=device)
        past = history.tolist()
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for rank, (score, flat) in enumerate(zip(top_scores[b], top_index[b])):
                if score == -math.inf or kept == W:
                    break
                beam, token = divmod(flat, V)
                if token == eos_id:
                    if rank < W:
                        finished[b].append(_Hypothesis(norm(score, t + 1), score, past[b * W + beam], True))
                    continue
                keep_scores[b, kept], keep_source[b, kept], keep_token[b, kept] = score, beam, token
                if t == max_length - 1:
                    finished[b].append(_Hypothesis(norm(score, t + 1), score, past[b * W + beam] + [token], False))
                kept += 1
            finished[b] = sorted(finished[b], key=lambda h: h.score, reverse=True)[:W]
            best_running = float(keep_scores[b].max())
            bound = norm(best_running, max_length if length_penalty >= 0 else t + 2)
            done[b] = t == max_length - 1 or (len(finished[b]) == W and (best_running == -math.inf or finished[b][-1].score >= bound))
        if all(done):
            break
        index = (torch.arange(B, device=device)[:, None] * W + keep_source).reshape(-1)
        history = torch.cat([history.index_select(0, index), keep_token.reshape(-1, 1)], dim=1)
        scores = keep_scores
        run.reorder(index)
        logp = log_probs(run.logits(history), banned)
    return [f[0] for f in finished]


def generate(
    model: NxTP,
    images: torch.Tensor,
    tokenizer: Tokenizer,
    max_length: int = 30,
    beams: int = 1,
    length_penalty: float = 1.0,
    prompt: str = CAPTION_PROMPT,
    use_cache: bool = True,
) -> list[Caption]:
    """A caption of each image: greedy search with ``beams=1`` (``length_penalty`` unused), else beam search.

    BOS and the two special tokens (``<|image|>``, the pad token) are never generated: no
    training target is one of them after the prompt.
    """
    prompt_ids = tokenizer.prompt_ids(prompt)
    max_seq = model.cfg.decoder.max_seq_len
    if model.n_image_tokens + len(prompt_ids) + max_length > max_seq:
        raise ValueError(
            f"{model.n_image_tokens} image tokens + {len(prompt_ids)} prompt tokens + max_length {max_length} "
            f"exceed the model's max_seq_len {max_seq}"
        )
    eos = tokenizer.eos_id
    banned = (tokenizer.bos_id, tokenizer.image_id, tokenizer.pad_id)
    if beams == 1:
        tokens, total, lengths, ended = greedy_search(model, images, prompt_ids, eos, max_length, banned, use_cache)
        tokens, total, lengths, ended = tokens.tolist(), total.tolist(), lengths.tolist(), ended.tolist()
        found = [_Hypothesis(0.0, total[b], tokens[b][: lengths[b]], ended[b]) for b in range(len(tokens))]
    else:
        found = beam_search(model, images, prompt_ids, eos, max_length, beams, length_penalty, banned, use_cache)
    return [Caption(tokenizer.decode(h.tokens).strip(), h.tokens, h.log_prob, h.ended) for h in found]
