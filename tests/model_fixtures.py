"""Tiny checkpoints made by code, in the layouts the model imports."""

from __future__ import annotations

import torch


def official_state_dict(n_base: int, delimiter_id: int, seed: int = 0, width: int = 128, patch: int = 8, image: int = 32,
                        vision_layers: int = 2, dim: int = 64, heads: int = 2, layers: int = 2, hidden: int = 96) -> dict:
    """A random checkpoint in the released NxTP layout (OpenAI ViT + Meta LLaMA names, 2 special rows).

    Every token embedding carries a constant in dimension 0 and the delimiter's output row
    reads it, so that random labels end after a few tokens (some end at once, some run to
    the step limit): every path of one-shot sampling is exercised.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=None):
        return torch.randn(*shape, generator=g) * (std if std is not None else shape[-1] ** -0.5)

    def norm(n):
        return 1 + 0.1 * r(n, std=1.0), 0.1 * r(n, std=1.0)

    sd, v, W = {}, "vision_encoder.", width
    sd[v + "conv1.weight"] = r(W, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd[v + "class_embedding"] = r(W)
    sd[v + "positional_embedding"] = r((image // patch) ** 2 + 1, W)
    for n in ("ln_pre", "ln_post"):
        sd[v + n + ".weight"], sd[v + n + ".bias"] = norm(W)
    for i in range(vision_layers):
        b = f"{v}transformer.resblocks.{i}."
        for n in ("ln_1", "ln_2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = norm(W)
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = r(3 * W, W), 0.1 * r(3 * W, std=1.0)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = r(W, W), 0.1 * r(W, std=1.0)
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = r(4 * W, W), 0.1 * r(4 * W, std=1.0)
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = r(W, 4 * W), 0.1 * r(W, std=1.0)
    sd[v + "proj.weight"] = r(dim, W)
    d = "language_decoder."
    emb = r(n_base + 2, dim, std=1.0)
    emb[:, 0] = 2.0
    sd[d + "tok_embeddings.weight"] = emb
    for i in range(layers):
        b = f"{d}layers.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            sd[b + f"attention.{n}.weight"] = r(dim, dim)
        sd[b + "feed_forward.w1.weight"], sd[b + "feed_forward.w3.weight"] = r(hidden, dim), r(hidden, dim)
        sd[b + "feed_forward.w2.weight"] = r(dim, hidden)
        sd[b + "attention_norm.weight"], _ = norm(dim)
        sd[b + "ffn_norm.weight"], _ = norm(dim)
    sd[d + "norm.weight"] = torch.ones(dim)
    out = 3 * r(n_base + 2, dim, std=dim**-0.5)
    out[delimiter_id, 0] = 4.0
    sd[d + "output.weight"] = out
    return sd


# what the released G3M file leaves out: the frozen ViT stem and its first blocks
def is_frozen_vision_key(key: str, trained_blocks: set[int]) -> bool:
    if not key.startswith("vision_encoder."):
        return False
    if ".resblocks." in key:
        return int(key.split(".resblocks.")[1].split(".")[0]) not in trained_blocks
    return not key.startswith(("vision_encoder.proj", "vision_encoder.ln_post"))
