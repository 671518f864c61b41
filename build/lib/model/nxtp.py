"""NxTP: the vision encoder's tokens as a prefix to the truncated decoder, and its training loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import NxTPConfig
from model.decoder import Decoder
from model.prompt import IGNORE, decoupled_label_mask, prefix_mask
from model.vision import VisionEncoder


class NxTP(nn.Module):
    def __init__(self, cfg: NxTPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision, cfg.decoder.dim)
        self.decoder = Decoder(cfg.decoder, cfg.n_special)

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.vision.n_tokens

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialization for a model trained from scratch (decoder linears and table)."""
        for module in self.decoder.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        init_special_rows(self.decoder)

    def forward(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        targets: torch.Tensor,
        segments: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        caption_targets: torch.Tensor | None = None,
        caption_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Training loss.

        images [B, 3, S, S]; ids, targets, segments [B, T] from model.prompt (label
        sequence); optional caption branch ids/targets [B, T'] weighted by ``caption_weight``.
        """
        image_tokens = self.vision(images)  # [B, N, D]
        n = image_tokens.shape[1]
        h = torch.cat([image_tokens, self.decoder.embed(ids)], dim=1)  # [B, N + T, D]
        hidden, _ = self.decoder(h, decoupled_label_mask(segments, n))
        label_loss, n_tokens = self._text_loss(hidden[:, n:], targets)
        out = {"label_loss": label_loss, "loss": label_loss, "tokens": n_tokens}
        if caption_weight > 0 and caption_ids is not None:
            h = torch.cat([image_tokens, self.decoder.embed(caption_ids)], dim=1)
            hidden, _ = self.decoder(h, prefix_mask(n, caption_ids.shape[1], h.device))
            caption_loss, _ = self._text_loss(hidden[:, n:], caption_targets)
            out["caption_loss"] = caption_loss
            out["loss"] = label_loss + caption_weight * caption_loss
        return out

    def _text_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # only positions with a target go through the (vocabulary-wide) output layer
        keep = targets != IGNORE
        logits = self.decoder.lm_head(hidden[keep])  # [M, V]
        return F.cross_entropy(logits.float(), targets[keep]), keep.sum()

    def prefill(self, images: torch.Tensor, prompt_ids: torch.Tensor):
        """Encode images and the prompt: (logits at the last prompt position [B, V], per-layer (k, v), prefix embeddings [B, P, D]).

        P = image tokens + prompt tokens; the prefix embeddings are what the decoder read,
        for sampling that recomputes the whole sequence (``use_cache=False``).
        """
        image_tokens = self.vision(images)
        h = torch.cat([image_tokens, self.decoder.embed(prompt_ids)], dim=1)
        hidden, kv = self.decoder(h, prefix_mask(image_tokens.shape[1], prompt_ids.shape[1], h.device), return_kv=True)
        return self.decoder.lm_head(hidden[:, -1]), kv, h


@torch.no_grad()
def init_special_rows(decoder: Decoder) -> None:
    """The paper's initialization of the rows appended for ``<|image|>`` and the pad token.

    Embeddings: N(0, 1). Output layer: ``<|image|>``'s row uniform in +-1/sqrt(dim)
    (kaiming-uniform with a=sqrt(5)), the pad row zero.
    """
    decoder.embed.special.normal_(0.0, 1.0)
    n_base, dim = decoder.embed.n_base, decoder.cfg.dim
    bound = 1.0 / math.sqrt(dim)
    decoder.lm_head.weight[n_base:-1].uniform_(-bound, bound)
    decoder.lm_head.weight[-1].zero_()
