"""An independent re-implementation of the released NxTP inference, for equivalence tests.

It reads the released checkpoint layout directly (OpenAI-CLIP ViT names under
``vision_encoder.``, Meta-LLaMA names under ``language_decoder.``), uses Meta's
complex-number rotary embedding, recomputes the whole sequence at every step, and
finalizes labels the way the reference's one-shot decoder and infer script do. It
shares no code with ``model/``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import sentencepiece as spm
import torch
import torch.nn.functional as F


def _layer_norm(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], 1e-5)


def vit_tokens(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """OpenAI ViT forward; ln_post and the projection on every token; class token dropped."""
    p = "vision_encoder."
    conv = sd[p + "conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    heads = width // 64
    x = F.conv2d(images, conv, stride=patch)  # [B, W, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
    cls = sd[p + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[p + "positional_embedding"]
    x = _layer_norm(x, sd, p + "ln_pre")
    i = 0
    while f"{p}transformer.resblocks.{i}.attn.in_proj_weight" in sd:
        b = f"{p}transformer.resblocks.{i}."
        h = _layer_norm(x, sd, b + "ln_1")
        qkv = h @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        B, L, _ = q.shape
        q, k, v = (t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, L, width)
        x = x + att @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        h = _layer_norm(x, sd, b + "ln_2")
        h = h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
        i += 1
    x = _layer_norm(x, sd, p + "ln_post")
    x = x @ sd[p + "proj.weight"].T
    return x[:, 1:]


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotary(x, freqs_cis):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def llama_logits_last(sd: dict, h: torch.Tensor, n_image: int, n_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """Meta-layout LLaMA over embeddings ``h`` [B, L, D]; causal mask with a full image block."""
    p = "language_decoder."
    B, L, D = h.shape
    hd = D // n_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(L, hd // 2), torch.outer(torch.arange(L).float(), freqs))
    mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
    mask[:n_image, :n_image] = 0.0
    i = 0
    while f"{p}layers.{i}.attention.wq.weight" in sd:
        b = f"{p}layers.{i}."
        x = _rms(h, sd[b + "attention_norm.weight"], eps)
        q = (x @ sd[b + "attention.wq.weight"].T).view(B, L, n_heads, hd)
        k = (x @ sd[b + "attention.wk.weight"].T).view(B, L, n_heads, hd)
        v = (x @ sd[b + "attention.wv.weight"].T).view(B, L, n_heads, hd)
        q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(B, L, D) @ sd[b + "attention.wo.weight"].T
        x = _rms(h, sd[b + "ffn_norm.weight"], eps)
        ff = F.silu(x @ sd[b + "feed_forward.w1.weight"].T) * (x @ sd[b + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[b + "feed_forward.w2.weight"].T
        i += 1
    h = _rms(h, sd[p + "norm.weight"], eps)
    return h[:, -1] @ sd[p + "output.weight"].T


@torch.no_grad()
def reference_labels(sd: dict, images: torch.Tensor, tokenizer_path: str, k: int, n_heads: int, max_update_iter: int = 20):
    """[(labels, probs)] per image, as the released one-shot decoder and infer script produce them."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    n_base = sp.vocab_size()
    image_id, delim = n_base, sp.piece_to_id(",")
    wte = sd["language_decoder.tok_embeddings.weight"]
    ids = [sp.bos_id(), image_id] + sp.encode("The objects in the image are")
    ids[0], ids[1] = ids[1], ids[0]  # the reference swaps BOS and <|image|>
    img = vit_tokens(sd, images)
    B, n_image = img.shape[:2]
    x = torch.cat([img, wte[torch.tensor(ids)].expand(B, -1, -1)], dim=1)
    probs = torch.softmax(llama_logits_last(sd, x, n_image, n_heads), dim=-1)
    top_p, top_i = probs.topk(k)
    tokens = top_i.reshape(-1, 1)
    token_probs = top_p.reshape(-1, 1)
    x = x.repeat_interleave(k, dim=0)
    live = torch.ones(B * k, dtype=torch.bool)
    updates, forced = 1, False
    while True:
        if updates >= max_update_iter - 1:
            forced = True
            break
        x = torch.cat([x, wte[tokens[:, -1:]]], dim=1)
        p = torch.softmax(llama_logits_last(sd, x, n_image, n_heads), dim=-1)
        tp, ti = p.topk(1)
        tokens = torch.cat([tokens, ti], dim=1)
        token_probs = torch.cat([token_probs, tp], dim=1)
        live &= ti[:, 0] != delim
        updates += 1
        if not live.any():
            break
    if forced:
        tokens = torch.cat([tokens, torch.full_like(tokens[:, :1], delim)], dim=1)
    out = []
    for b in range(B):
        groups = defaultdict(list)
        for j in range(k):
            row = tokens[b * k + j].tolist()
            end = row.index(delim) + 1
            label_tokens, label_probs = row[:end], token_probs[b * k + j, :end]
            text = _decode(sp, label_tokens, n_base)
            groups[text].append(label_probs.prod())
        merged = {t: float(torch.stack(ps).sum()) for t, ps in groups.items()}
        ranked = sorted(merged.items(), key=lambda kv: kv[1], reverse=True)
        out.append(([t.replace(",", "") for t, _ in ranked], [p for _, p in ranked]))
    return out


def _decode(sp, ids, n_base):
    text, run = [], []
    for t in ids:
        if t >= n_base:
            text.append(sp.decode(run))
            text.append("<|image|>" if t == n_base else "<|empty|>")
            run = []
        else:
            run.append(t)
    text.append(sp.decode(run))
    return "".join(text)


def training_mask(input_tokens: torch.Tensor, n_image: int, answer_id: int, delimiter_id: int) -> torch.Tensor:
    """The released training mask, transcribed from ``LLaMATransformer.forward`` (src/models/lang.py)
    with ``prefix_image_tok_embeds`` and ``decouple_label_tok_embeds`` on, ``is_train`` True,
    ``start_pos`` 0 and the image at ``dummy_token_index`` 0 (its G3M config).

    ``input_tokens`` [B, L]: the whole sequence, a placeholder id in the ``n_image`` image
    positions then the text (as ``construct_embd_inputs`` pads them); ``answer_id`` and
    ``delimiter_id`` stand for the hard-coded 526 ("are") and 29892 (","). Returns an
    additive float mask [B, 1, L, L] (0 = may attend, -inf = may not).
    """
    bs, seqlen = input_tokens.shape
    dummy_token_index, offset = 0, n_image
    mask = torch.full((bs, 1, seqlen, seqlen), float("-inf"))
    mask = torch.triu(mask, diagonal=1)
    ii, ij = dummy_token_index, dummy_token_index + offset
    mask[:, :, ii:ij, ii:ij] = 0.0
    answer_index = torch.nonzero(input_tokens[-1] == answer_id)[0][0]
    assert answer_index > dummy_token_index
    delimiters_indices = torch.nonzero(input_tokens == delimiter_id)
    mask[:, :, :, answer_index + 1 :] = float("-inf")
    prev_batch_index = 0
    prev_token_index = answer_index
    for delimiter in delimiters_indices:
        batch_index, token_index = delimiter
        token_index += 1
        if batch_index != prev_batch_index:
            prev_batch_index = batch_index
            prev_token_index = answer_index
        tri_size = token_index - prev_token_index
        tri_mask = prev_token_index + torch.tril_indices(tri_size, tri_size)
        mask[batch_index, 0, tri_mask[0], tri_mask[1]] = 0.0
        prev_token_index = token_index
    return mask


def filter_input_text(text: str) -> str:
    """The released ``filter_input_text`` (src/utils.py), verbatim but for names."""
    import re

    text = text.lower()
    text = text.replace("\n", " ")
    noise_words = [
        "person", "persons", "stock", "illustration", "foreground", "background", "photography",
        "image", "images", "front", "day", "ounce", "top",
    ]  # fmt: skip
    for nw in noise_words:
        text = text.replace(nw, " ")
    text = re.sub(r"[^a-zA-Z' 0-9.,&-]", "", text)
    for c in [",", "&"]:
        text = text.replace(c, " ")
    text = re.sub(r"\s+", " ", text).strip()
    return text


def released_topk(batch_preds: list[list[str]], k: int) -> list[list[str]]:
    """The top-k that ``evaluate`` (src/evals/engine.py) scores without CLIP ranking."""
    topk_objs = []
    for p in batch_preds:
        p = p[:k]
        if len(p) == 0:
            p = [""]  # dummy voc
        topk_objs.append(p)
    return topk_objs


def semantic_fscore(values: list[list[str]], targets: list[list[str]], encode) -> list[tuple[float, float, float]]:
    """Per-sample (R, P, F) of ``SemanticFScore.update`` (src/evals/metrics.py); ``encode``: str -> [D]."""
    out = []
    for vals, tgts in zip(values, targets):
        x_tgts = F.normalize(torch.stack([encode(t) for t in tgts]), dim=1)
        x_vals = F.normalize(torch.stack([encode(v) for v in vals]), dim=1)
        s = x_tgts @ x_vals.T
        r = s.max(dim=1).values.mean()
        p = s.max(dim=0).values.mean()
        f = torch.nan_to_num(2 * r * p / (r + p))
        out.append((float(r), float(p), float(f)))
    return out
