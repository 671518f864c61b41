"""The sequence the decoder reads, its targets and its attention masks (the paper's method).

Sequence: N image tokens, then the text ids

    <|image|>, BOS, The, objects, in, the, image, are, label1 ..., ",", label2 ..., EOS, pad ...

(the prompt string is ``<|image|>`` + template, tokenized with BOS first and the first
two ids swapped; labels are shuffled and joined by ", " at training time). Rotary
positions run 0..L-1 over the whole sequence, image tokens included.

Attention: causal, except that the image block attends to itself fully; at training,
each label's tokens (its delimiter included) attend to the prefix (image and prompt up
to "are") and to their own label's earlier tokens only, never to other labels. The last
label, which ends with EOS instead of a delimiter, is a label like the others (the
released code lets it see only the prefix; its EOS target is dropped anyway).

Targets: next-token targets on every text position after <|image|> (BOS, the prompt
words, labels, delimiters), EOS removed from the targets, padding ignored.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from model.config import PROMPT_TEMPLATES
from model.tokenizer import Tokenizer

IGNORE = -100  # target value that takes no loss


def training_text(
    labels: Sequence[str],
    tokenizer: Tokenizer,
    rng: random.Random,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    max_text_len: int = 256,
) -> tuple[list[int], list[int], int]:
    """(ids, targets, answer position) of one training sample with ``labels``.

    Labels are shuffled with ``rng`` and one template is drawn from ``templates``.
    ``answer position`` is the index of the prompt's last token ("are") in ``ids``.
    """
    if not labels:
        raise ValueError("a training sample needs at least one label")
    order = list(labels)
    rng.shuffle(order)
    template = rng.choice(list(templates))
    prompt = tokenizer.prompt_ids(template)
    body = tokenizer.encode(f"{template} {', '.join(order)}")
    if body[: len(prompt) - 2] != prompt[2:]:
        raise ValueError(f"the prompt {template!r} does not tokenize the same with labels after it")
    ids = ([tokenizer.image_id, tokenizer.bos_id] + body + [tokenizer.eos_id])[:max_text_len]
    return ids, next_token_targets(ids, tokenizer.eos_id), len(prompt) - 1


def caption_text(caption: str, tokenizer: Tokenizer, template: str, max_text_len: int = 256) -> tuple[list[int], list[int]]:
    """(ids, targets) of the optional caption branch: the caption after ``template``, EOS kept."""
    ids = ([tokenizer.image_id, tokenizer.bos_id] + tokenizer.encode(f"{template} {caption}") + [tokenizer.eos_id])[:max_text_len]
    return ids, next_token_targets(ids, eos_id=None)


def next_token_targets(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """targets[i] = ids[i + 1] (EOS excluded when ``eos_id`` is given); the last position has none."""
    targets = [t if t != eos_id else IGNORE for t in ids[1:]]
    return targets + [IGNORE]


def pad_batch(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def label_segments(ids: torch.Tensor, answer_pos: torch.Tensor, delimiter_id: int) -> torch.Tensor:
    """Which label each text position belongs to: -1 up to the answer position, then 0, 1, ...

    ids: [B, T]; answer_pos: [B]. A delimiter belongs to the label it ends.
    """
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, T]
    after = pos > answer_pos[:, None]  # [B, T]
    is_delim = (ids == delimiter_id) & after
    before = torch.cumsum(is_delim.long(), dim=1) - is_delim.long()  # delimiters strictly before
    return torch.where(after, before, torch.full_like(before, -1))


def prefix_mask(n_image: int, n_text: int, device=None) -> torch.Tensor:
    """Causal mask with a bidirectional image block: bool [1, 1, L, L], True = may attend."""
    L = n_image + n_text
    mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask[:n_image, :n_image] = True
    return mask[None, None]


def decoupled_label_mask(segments: torch.Tensor, n_image: int) -> torch.Tensor:
    """The training mask: bool [B, 1, L, L] from ``label_segments`` [B, T]."""
    B, T = segments.shape
    image = torch.full((B, n_image), -1, dtype=segments.dtype, device=segments.device)
    seg = torch.cat([image, segments], dim=1)  # [B, L]
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()[None]
    prefix_key = (seg == -1)[:, None, :]  # keys in the image or prompt
    same_label = seg[:, :, None] == seg[:, None, :]
    mask = causal & (prefix_key | same_label)
    mask[:, :n_image, :n_image] = True
    return mask[:, None]
