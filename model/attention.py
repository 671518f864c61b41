"""Where a label looks: the decoder's attention from a label's first token to the image patches.

For each label the decoder reads what one-shot sampling reads when it continues that
label: the image tokens, the prompt, and the label's first token. The attention of that
last position over the N image tokens, in every layer and head, is the label's map
(the rest of its attention falls on the prompt and on the token itself). NxTP's own
figures draw such maps; ``pipeline/attention_maps.py`` plots them.
"""

from __future__ import annotations

import math

import torch

from model.nxtp import NxTP
from model.prompt import prefix_mask
from model.tokenizer import Tokenizer


def first_label_ids(tokenizer: Tokenizer, prompt: str, labels: list[str]) -> list[int]:
    """The first token of each label as it follows ``prompt`` (how training wrote it, and sampling reads it)."""
    head = tokenizer.encode(prompt)
    out = []
    for label in labels:
        ids = tokenizer.encode(f"{prompt} {label}")
        if ids[: len(head)] != head or len(ids) == len(head):
            raise ValueError(f"the label {label!r} does not tokenize as a continuation of the prompt {prompt!r}")
        out.append(ids[len(head)])
    return out


@torch.no_grad()
def label_attention(model: NxTP, images: torch.Tensor, prompt_ids: list[int], first_ids: torch.Tensor) -> torch.Tensor:
    """Attention of each label's first token over the image patches.

    images [B, 3, S, S]; prompt_ids as for sampling; first_ids [B, K], one token per label
    -> probabilities [B, K, layers, heads, g, g] on the g x g patch grid (row-major, as the
    ViT reads the image), float32. They sum to at most 1 over the grid.
    """
    B, K = first_ids.shape
    image_tokens = model.vision(images)  # [B, N, D]
    N = image_tokens.shape[1]
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"{N} image tokens do not form a square patch grid")
    prompt = torch.as_tensor(prompt_ids, device=images.device).expand(B, -1)
    prefix = torch.cat([image_tokens, model.decoder.embed(prompt)], dim=1)  # [B, P, D]
    h = torch.cat([prefix.repeat_interleave(K, dim=0), model.decoder.embed(first_ids.reshape(B * K, 1))], dim=1)  # [B*K, P+1, D]
    L = h.shape[1]
    probs = model.decoder.attention_probs(h, prefix_mask(N, L - N, h.device), positions=[L - 1])  # [layers, B*K, H, 1, L]
    n_layers, _, H = probs.shape[:3]
    return probs[:, :, :, 0, :N].reshape(n_layers, B, K, H, g, g).permute(1, 2, 0, 3, 4, 5)


def check_layer_head(n_layers: int, n_heads: int, layer: int | None, head: int | None) -> None:
    """Raise ValueError, naming the range, when ``layer`` or ``head`` (None: the mean) does not exist."""
    for name, value, n in (("layer", layer, n_layers), ("head", head, n_heads)):
        if value is not None and not -n <= value < n:
            raise ValueError(f"{name} {value} is out of range: the decoder has {n} {name}s (0..{n - 1})")


def select(maps: torch.Tensor, layer: int | None = None, head: int | None = None) -> torch.Tensor:
    """One layer and head of ``label_attention``'s maps [..., layers, heads, g, g], or the mean over those left None -> [..., g, g]."""
    check_layer_head(maps.shape[-4], maps.shape[-3], layer, head)
    maps = maps.mean(dim=-4) if layer is None else maps[..., layer, :, :, :]
    return maps.mean(dim=-3) if head is None else maps[..., head, :, :]


def label_maps(
    model: NxTP, tokenizer: Tokenizer, image: torch.Tensor, labels: list[str], layer: int | None = None, head: int | None = None
) -> dict[str, torch.Tensor]:
    """{label: [g, g] map} of one preprocessed image [3, S, S], one layer and head or the mean (see ``select``).

    Labels that do not tokenize as a continuation of the prompt (an empty label) have no map and are left out.
    """
    usable, first = [], []
    for label in labels:
        try:
            first += first_label_ids(tokenizer, model.cfg.prompt, [label])
            usable.append(label)
        except ValueError:
            continue
    if not usable:
        return {}
    ids = torch.tensor([first], device=image.device)
    maps = select(label_attention(model, image[None], tokenizer.prompt_ids(model.cfg.prompt), ids)[0], layer, head)  # [K, g, g]
    return dict(zip(usable, maps))
