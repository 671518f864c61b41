"""NxTP: the vision encoder's tokens as a prefix to the truncated decoder, and its training loss.

``NxTP.from_pretrained(folder_or_hub_id)``, ``save_pretrained`` and ``push_to_hub`` come
from huggingface_hub's ``PyTorchModelHubMixin``; the folder layout is model/export.py's.
A loaded model saves what its folder held beyond the model (config.json's ``step`` and
``checkpoint``, the model card) back: ``NxTP.from_pretrained(a).save_pretrained(b)`` gives
``b`` the config.json and README.md of ``a`` (format 1 folders are rewritten in format 2).
``save_pretrained(b, model_card_kwargs=...)`` writes a new card from those arguments instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from model.config import NxTPConfig
from model.decoder import Decoder
from model.prompt import IGNORE, decoupled_label_mask, prefix_mask
from model.vision import VisionEncoder

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer


class NxTP(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="nxtp",
    tags=["nxtp", "object-recognition", "open_clip", "llama"],
    pipeline_tag="image-to-text",
    paper_url="https://arxiv.org/abs/2312.02142",
):
    def __init__(self, cfg: NxTPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision, cfg.decoder.dim)
        self.decoder = Decoder(cfg.decoder, cfg.n_special)
        # the tokenizer the vocabulary was built from: set by the loaders, needed to save
        self.tokenizer: Tokenizer | None = None
        # what the folder it was loaded from held beyond the model (model.export.load_folder), written back when saving:
        # config.json's other keys (step, checkpoint) and the model card README.md
        self.export_extra: dict = {}
        self.export_card: str | None = None

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
        n_targets: int | None = None,
        n_caption_targets: int | None = None,
        sample_losses: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Training loss.

        images [B, 3, S, S]; ids, targets, segments [B, T] from model.prompt (label
        sequence); optional caption branch ids/targets [C, T'] of the batch's first C <= B
        images, weighted by ``caption_weight``.
        n_targets / n_caption_targets: the number of positions with a target, when the caller
        knows it (counted on the CPU): the loss then never waits for the device.
        sample_losses: also return ``sample_losses`` [B], each sample's label loss summed over
        its target positions (fp32, no gradient), e.g. for losses per dataset.
        """
        image_tokens = self.vision(images)  # [B, N, D]
        n = image_tokens.shape[1]
        h = torch.cat([image_tokens, self.decoder.embed(ids)], dim=1)  # [B, N + T, D]
        hidden, _ = self.decoder(h, decoupled_label_mask(segments, n))
        label_loss, n_tokens, per_sample = self._text_loss(hidden[:, n:], targets, n_targets, sample_losses)
        out = {"label_loss": label_loss, "loss": label_loss, "tokens": n_tokens}
        if sample_losses:
            out["sample_losses"] = per_sample
        if caption_weight > 0 and caption_ids is not None:
            h = torch.cat([image_tokens[: caption_ids.shape[0]], self.decoder.embed(caption_ids)], dim=1)
            hidden, _ = self.decoder(h, prefix_mask(n, caption_ids.shape[1], h.device))
            caption_loss, _, _ = self._text_loss(hidden[:, n:], caption_targets, n_caption_targets)
            out["caption_loss"] = caption_loss
            out["loss"] = label_loss + caption_weight * caption_loss
        return out

    def _text_loss(self, hidden: torch.Tensor, targets: torch.Tensor, n: int | None = None, per_sample: bool = False):
        """(mean loss over the target positions, their count, and with ``per_sample`` each sample's summed loss [B] or None)."""
        # only positions with a target go through the (vocabulary-wide) output layer
        keep = targets != IGNORE  # [B, T]
        if n is None:
            rows = keep.flatten().nonzero().squeeze(1)  # data-dependent size: a GPU waits here
        else:
            rows = torch.nonzero_static(keep.flatten(), size=n).squeeze(1)  # [M]: no wait
        logits = self.decoder.lm_head(hidden.flatten(0, 1)[rows])  # [M, V]
        if not per_sample:
            return F.cross_entropy(logits.float(), targets.flatten()[rows]), keep.sum(), None
        losses = F.cross_entropy(logits.float(), targets.flatten()[rows], reduction="none")  # [M]
        sums = losses.new_zeros(targets.shape[0]).index_add_(0, rows // targets.shape[1], losses.detach())  # [B]
        return losses.mean(), keep.sum(), sums

    def prefill(self, images: torch.Tensor, prompt_ids: torch.Tensor):
        """Encode images and the prompt: (float32 logits at the last prompt position [B, V], per-layer (k, v), prefix embeddings [B, P, D]).

        P = image tokens + prompt tokens; the prefix embeddings are what the decoder read,
        for sampling that recomputes the whole sequence (``use_cache=False``).
        """
        image_tokens = self.vision(images)
        h = torch.cat([image_tokens, self.decoder.embed(prompt_ids)], dim=1)
        hidden, kv = self.decoder(h, prefix_mask(image_tokens.shape[1], prompt_ids.shape[1], h.device), return_kv=True)
        return self.decoder.lm_head(hidden[:, -1]), kv, h

    # -- Hugging Face folders (huggingface_hub's mixin calls these from save_pretrained / push_to_hub / from_pretrained)

    def _save_pretrained(self, save_directory: Path) -> None:
        from model.export import write_folder

        if self.tokenizer is None:
            raise ValueError("saving needs the tokenizer the vocabulary was built from: set model.tokenizer = Tokenizer(path) first")
        write_folder(self, self.tokenizer, str(save_directory), self.export_extra)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False, token=None, cache_dir=None,
                        local_files_only: bool = False, revision: str | None = None, **model_kwargs) -> NxTP:  # fmt: skip
        """huggingface_hub's ``from_pretrained`` on the resolved folder, whose config.json is checked first.

        The mixin parses config.json itself before calling :meth:`_from_pretrained`: a damaged
        one is refused here with model.export's WeightError naming it, not a bare JSON error.
        """
        from model.export import read_config
        from model.hub import resolve

        folder = resolve(str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                         force_download=force_download, token=token)  # fmt: skip
        read_config(folder)
        return super().from_pretrained(folder, force_download=force_download, token=token, cache_dir=cache_dir,
                                       local_files_only=local_files_only, revision=revision, **model_kwargs)  # fmt: skip

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool, local_files_only: bool,
                         token, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> NxTP:  # fmt: skip
        """An export folder or hub id (format 1 or 2) in eval mode, its tokenizer as ``model.tokenizer``."""
        from model.export import load_folder
        from model.hub import resolve

        folder = resolve(model_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                         force_download=force_download, token=token)  # fmt: skip
        model, _ = load_folder(folder, device, dtype)
        return model

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The README.md of an export; ``kwargs`` as :func:`model.card.model_card` takes them (training config, evaluation...).

        Without ``kwargs``, a model loaded from a folder gives that folder's card (its
        training config, data and evaluation are known only there).
        """
        from model.card import model_card

        if not kwargs and self.export_card is not None:
            return ModelCard(self.export_card)
        return ModelCard(model_card(self, self._hub_mixin_info.model_card_data, **kwargs))


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
