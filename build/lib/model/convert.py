"""Key maps between checkpoint layouts and this model's state dict. Pure functions on tensors.

Layouts: OpenAI CLIP (``visual.*``, also open_clip's), Meta LLaMA (``tok_embeddings``,
``layers.N.attention.wq`` ...), Hugging Face LLaMA (``model.layers.N.self_attn.q_proj``
...), and the released NxTP checkpoints (``vision_encoder.*`` in OpenAI naming plus
``language_decoder.*`` in Meta naming, vocabulary 32000 + 2 special rows).

Every conversion fails loudly: a source key that is not used raises unless it is in a
named ignore list (and is then reported), a missing key raises, and
:func:`load_state_strict` checks every key and shape against the model.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from model.config import DecoderConfig, VisionConfig


class WeightError(ValueError):
    """A checkpoint does not fit: the message names the first offending key."""


class KeyMapper:
    """Moves tensors from ``source`` to new keys, remembering which source keys were used."""

    def __init__(self, source: dict[str, torch.Tensor], where: str):
        self.source, self.where = source, where
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise WeightError(f"{self.where}: missing key '{key}'")
        self.used.add(key)
        return self.source[key]

    def take(self, src: str, dst: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        t = self.get(src)
        self.out[dst] = fn(t) if fn else t

    def finish(self, ignore: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(mapped tensors, ignored source keys); raises on a source key neither used nor ignored."""
        patterns = list(ignore)
        unused = [k for k in self.source if k not in self.used]
        ignored = [k for k in unused if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        rest = [k for k in unused if k not in set(ignored)]
        if rest:
            raise WeightError(f"{self.where}: unexpected key '{rest[0]}' ({len(rest)} source key(s) not used)")
        return self.out, ignored


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- rotary layout


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> Hugging Face's rotate-half halves (rows of wq / wk)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ----------------------------------------------------------------------------- vision


_VIT_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
_VIT_STEM = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias")


def vision_config_from_openai(sd: dict[str, torch.Tensor], prefix: str) -> VisionConfig:
    """The ViT shape read from OpenAI-layout weights under ``prefix``: width and patch from
    conv1, layers from the block count, resolution from the positional embedding, heads = width / 64."""
    conv = sd.get(prefix + "conv1.weight")
    pos = sd.get(prefix + "positional_embedding")
    if conv is None or pos is None:
        raise WeightError(f"no ViT under '{prefix}': missing '{prefix}conv1.weight' or '{prefix}positional_embedding'")
    layers = len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", k))})
    grid = round((pos.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != pos.shape[0]:
        raise WeightError(f"'{prefix}positional_embedding' has {pos.shape[0]} rows, not a square grid + class token")
    width, patch = conv.shape[0], conv.shape[-1]
    return VisionConfig(name=None, image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=width // 64, quick_gelu=True)


def vision_from_openai(m: KeyMapper, prefix: str, cfg: VisionConfig, with_projection: bool) -> None:
    """Map OpenAI-layout ViT keys under ``prefix`` to ``vision.vit.*`` (and ``vision.proj``)."""
    for name in _VIT_STEM:
        m.take(prefix + name, "vision.vit." + name)
    for i in range(cfg.layers):
        for name in _VIT_BLOCK:
            m.take(f"{prefix}transformer.resblocks.{i}.{name}", f"vision.vit.transformer.resblocks.{i}.{name}")
    if with_projection:  # NxTP's token projection [decoder dim, width]; CLIP's pooled `proj` is a different thing
        m.take(prefix + "proj.weight", "vision.proj.weight")


def vision_to_openai(sd: dict[str, torch.Tensor], prefix: str, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    out = {prefix + name: sd["vision.vit." + name] for name in _VIT_STEM}
    for i in range(cfg.layers):
        for name in _VIT_BLOCK:
            out[f"{prefix}transformer.resblocks.{i}.{name}"] = sd[f"vision.vit.transformer.resblocks.{i}.{name}"]
    out[prefix + "proj.weight"] = sd["vision.proj.weight"]
    return out


# ----------------------------------------------------------------------------- decoder

_META_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def decoder_from_meta(m: KeyMapper, prefix: str, cfg: DecoderConfig, extended: bool) -> None:
    """Map Meta-layout LLaMA keys under ``prefix`` to ``decoder.*``, permuting wq / wk.

    ``extended``: the embedding and output matrices already hold the 2 special rows
    (a released NxTP checkpoint); otherwise they hold the base vocabulary only and the
    special rows are left to :func:`model.nxtp.init_special_rows`.
    """
    V = cfg.vocab_size
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    emb = m.get(prefix + "tok_embeddings.weight")
    m.out["decoder.embed.base.weight"] = emb[:V]
    if extended:
        m.out["decoder.embed.special"] = emb[V:]
    m.take(prefix + "output.weight", "decoder.lm_head.weight")
    m.take(prefix + "norm.weight", "decoder.norm.weight")
    for i in range(cfg.n_layers):
        for src, dst in _META_LAYER.items():
            fn = None
            if src == "attention.wq.weight":
                fn = lambda w: meta_to_hf_rotary(w, cfg.n_heads)  # noqa: E731
            elif src == "attention.wk.weight":
                fn = lambda w: meta_to_hf_rotary(w, kv_heads)  # noqa: E731
            m.take(f"{prefix}layers.{i}.{src}", f"decoder.layers.{i}.{dst}", fn)


def decoder_to_meta(sd: dict[str, torch.Tensor], prefix: str, cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    out = {
        prefix + "tok_embeddings.weight": torch.cat([sd["decoder.embed.base.weight"], sd["decoder.embed.special"]]),
        prefix + "output.weight": sd["decoder.lm_head.weight"],
        prefix + "norm.weight": sd["decoder.norm.weight"],
    }
    for i in range(cfg.n_layers):
        for src, dst in _META_LAYER.items():
            w = sd[f"decoder.layers.{i}.{dst}"]
            if src == "attention.wq.weight":
                w = hf_to_meta_rotary(w, cfg.n_heads)
            elif src == "attention.wk.weight":
                w = hf_to_meta_rotary(w, kv_heads)
            out[f"{prefix}layers.{i}.{src}"] = w
    return out


def decoder_from_hf(m: KeyMapper, cfg: DecoderConfig) -> None:
    """Map a Hugging Face ``LlamaForCausalLM`` state dict to ``decoder.*`` (base vocabulary rows)."""
    m.take("model.embed_tokens.weight", "decoder.embed.base.weight")
    if "lm_head.weight" in m.source:
        m.take("lm_head.weight", "decoder.lm_head.weight")
    else:  # tied embeddings
        m.out["decoder.lm_head.weight"] = m.get("model.embed_tokens.weight")
    m.take("model.norm.weight", "decoder.norm.weight")
    for i in range(cfg.n_layers):
        for name in _HF_LAYER:
            m.take(f"model.layers.{i}.{name}", f"decoder.layers.{i}.{name}")


# ----------------------------------------------------------------------------- the whole model


def load_state_strict(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load ``sd`` into ``model``: every key present, none extra, every shape equal, else a named error."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in sd:
            raise WeightError(f"{where}: missing key '{key}' (model expects shape {tuple(value.shape)})")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise WeightError(f"{where}: key '{key}' has shape {tuple(sd[key].shape)}, model expects {tuple(value.shape)}")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise WeightError(f"{where}: unexpected key '{extra[0]}'")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
