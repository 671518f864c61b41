"""The vision encoder: an open_clip ViT whose every token is projected into the decoder.

CLIP normally pools the class token; NxTP keeps all tokens: ``ln_post`` on every token,
a bias-free linear projection from the ViT width to the decoder width, and the class
token dropped (256 image tokens for ViT-L/14 at 224 px).
"""

from __future__ import annotations

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

from model.config import VisionConfig

_UNSUPPORTED = ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool", "pos_embed_type", "block_type", "qk_norm")


def vision_config_from_open_clip(name: str, quick_gelu: bool = True, image_size: int | None = None) -> VisionConfig:
    """The ViT shape of an open_clip model by name (e.g. ``ViT-L-14``, ``ViT-B-16``).

    ``quick_gelu`` must match the weights: OpenAI's were trained with QuickGELU.
    """
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"open_clip has no model named {name!r} (see open_clip.list_models())")
    v = cfg["vision_cfg"]
    if not isinstance(v.get("layers"), int):
        raise ValueError(f"{name} is not a ViT (vision layers {v.get('layers')!r}); NxTP needs patch tokens")
    unsupported = [k for k in _UNSUPPORTED if v.get(k) not in (None, False, "learnable", 0)]
    if unsupported:
        raise ValueError(f"{name}: open_clip option {unsupported[0]}={v[unsupported[0]]!r} is not supported")
    width = v["width"]
    return VisionConfig(
        name=name,
        image_size=image_size or v["image_size"],
        patch_size=v["patch_size"],
        width=width,
        layers=v["layers"],
        heads=width // v.get("head_width", 64),
        mlp_ratio=v.get("mlp_ratio", 4.0),
        quick_gelu=quick_gelu or bool(cfg.get("quick_gelu", False)),
    )


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.vit = OpenClipViT(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            layers=cfg.layers,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=out_dim,
            act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
            output_tokens=True,
        )
        self.vit.proj = None  # CLIP's pooled projection is unused: every token goes through self.proj
        self.proj = nn.Linear(cfg.width, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, S, S] -> tokens [B, (S/patch)^2, width], ln_post applied, class token dropped
        _, tokens = self.vit(images)
        return self.proj(tokens)  # [B, N, out_dim]


def preprocess(image_size: int):
    """CLIP's eval transform: bicubic resize of the short side, center crop, CLIP mean/std."""
    from open_clip.transform import image_transform

    return image_transform(image_size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD, interpolation="bicubic", resize_mode="shortest")
