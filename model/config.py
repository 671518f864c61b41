"""The model's configuration: everything needed to rebuild the network (and saved with it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PROMPT = "The objects in the image are"
# the paper's prompt augmentation at training time (all end in "are": the answer starts after it)
PROMPT_TEMPLATES = (
    "The objects in the image are",
    "The items present in the picture are",
    "The elements depicted in the image are",
    "The objects shown in the photograph are",
    "The items visible in the image are",
    "The objects that appear in the picture are",
    "The elements featured in the image are",
    "The items captured in the photograph are",
    "The elements seen in the picture are",
    "The items represented in the image are",
)
CAPTION_PROMPT = "A brief description of the given image is that"
IMAGE_TOKEN = "<|image|>"
PAD_TOKEN = "<|empty|>"  # the paper's pad token: the last row of the extended vocabulary


@dataclass
class VisionConfig:
    """A CLIP ViT (OpenAI layout: class token first, pre-norm blocks)."""

    name: str | None = "ViT-L-14"  # open_clip model name it was built from, None for a custom shape
    image_size: int = 224  # input resolution (pixels)
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    quick_gelu: bool = True  # OpenAI weights were trained with QuickGELU

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def n_tokens(self) -> int:
        """Image tokens handed to the decoder (the class token is dropped)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class DecoderConfig:
    """A LLaMA decoder truncated to its first ``n_layers`` blocks."""

    dim: int = 4096
    n_layers: int = 6  # blocks kept (LLaMA-2-7B has 32)
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    hidden_dim: int = 11008  # SwiGLU width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 32000  # the base tokenizer's vocabulary, before the 2 special tokens
    max_seq_len: int = 512  # image tokens + text tokens

    def __post_init__(self):
        kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads or self.n_heads % kv:
            raise ValueError(f"dim {self.dim}, heads {self.n_heads}, kv heads {kv} do not divide")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("the rotary embedding needs an even head dimension")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class NxTPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    prompt: str = PROMPT  # inference prompt; must end with the token after which labels start
    max_label_steps: int = 20  # one-shot sampling: a label gets at most this many updates, then "," is forced

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**self.decoder)
        if self.vision.n_tokens >= self.decoder.max_seq_len:
            raise ValueError(f"{self.vision.n_tokens} image tokens leave no room in max_seq_len {self.decoder.max_seq_len}")
        if self.max_label_steps < 2:
            raise ValueError("max_label_steps must be >= 2")

    @property
    def n_special(self) -> int:
        return 2  # <|image|> and the pad token

    @property
    def n_logits(self) -> int:
        """The output layer's width: the base vocabulary and the special tokens (one-shot sampling's top-k is of these)."""
        return self.decoder.vocab_size + self.n_special

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NxTPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        return cls(**d)


def g3m_config() -> NxTPConfig:
    """The published 1.78B model: ViT-L/14 at 224 px + the first 6 blocks of LLaMA-2-7B."""
    return NxTPConfig(VisionConfig(), DecoderConfig())


def tiny_config(vocab_size: int, image_size: int = 64, patch_size: int = 16) -> NxTPConfig:
    """A model that trains in minutes on a CPU (the synthetic world's demo model).

    At 64 px with 16 px patches the ViT reads 16 tokens: each object of the synthetic
    world spans about 2x2 of them.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return NxTPConfig(
        VisionConfig(name=None, image_size=image_size, patch_size=patch_size, width=128, layers=4, heads=4, quick_gelu=False),
        DecoderConfig(dim=128, n_layers=3, n_heads=4, hidden_dim=344, vocab_size=vocab_size, max_seq_len=160),
    )
