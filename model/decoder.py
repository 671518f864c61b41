"""The language decoder: LLaMA's blocks (RMSNorm, rotary attention, SwiGLU), truncated.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ...) so that its checkpoints map one to one; the rotary embedding uses
its rotate-half layout (Meta checkpoints are permuted on import, see model/convert.py).

Two ways through the blocks:

- ``forward``: a whole sequence under an explicit boolean mask (training, and the prompt
  prefill at inference), optionally returning every layer's keys and values;
- ``decode``: one new token for each of K labels per image, attending to the image's
  shared prefix cache (read once, never copied K times) and to the label's own earlier
  tokens. This is what makes one-shot sampling of 100 labels cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables of the rotary embedding for given positions (rotate-half layout)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [..., head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [..., head_dim]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., L, head_dim] by position; computed in float32 like Meta's reference."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def _repeat_kv(x: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    return x if times == 1 else x.repeat_interleave(times, dim=dim)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        # x: [B, L, D]; cos/sin: [L, hd]; mask: bool [B or 1, 1, L, L], True = may attend
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.n_heads // self.n_kv_heads
        out = F.scaled_dot_product_attention(q, _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), k, v

    def decode(self, x, cos, sin, prefix_k, prefix_v, cache_k, cache_v, step: int):
        # x: [B, K, D], one token per label; cos/sin: [hd] (one position shared by all labels)
        # prefix_k/v: [B, Hkv, P, hd]; cache_k/v: [B, K, Hkv, T, hd], slot `step` is written here
        B, K, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, K, self.n_heads, self.head_dim), cos, sin)
        cache_k[:, :, :, step] = apply_rotary(self.k_proj(x).view(B, K, self.n_kv_heads, self.head_dim), cos, sin)
        cache_v[:, :, :, step] = self.v_proj(x).view(B, K, self.n_kv_heads, self.head_dim)
        groups = self.n_heads // self.n_kv_heads
        label_k = _repeat_kv(cache_k[:, :, :, : step + 1], groups, 2)  # [B, K, H, t, hd]
        label_v = _repeat_kv(cache_v[:, :, :, : step + 1], groups, 2)
        q = q.transpose(1, 2)  # [B, H, K, hd]: the K labels are K queries against one prefix
        scale = 1.0 / math.sqrt(self.head_dim)
        s_prefix = torch.matmul(q, _repeat_kv(prefix_k, groups, 1).transpose(-1, -2)) * scale  # [B, H, K, P]
        s_label = torch.einsum("bhkd,bkhtd->bhkt", q, label_k) * scale  # [B, H, K, t]
        P = s_prefix.shape[-1]
        p = torch.softmax(torch.cat([s_prefix, s_label], dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.matmul(p[..., :P], _repeat_kv(prefix_v, groups, 1))  # [B, H, K, hd]
        out = out + torch.einsum("bhkt,bkhtd->bhkd", p[..., P:], label_v)
        return self.o_proj(out.transpose(1, 2).reshape(B, K, -1))

    def probs(self, x, cos, sin, mask, positions: list[int]) -> torch.Tensor:
        """The attention probabilities ``forward`` applies at the query ``positions``: [B, H, Q, L], float32.

        An opt-in read-out for attention maps; ``forward`` itself never materializes them.
        """
        B, L, _ = x.shape
        q = self.q_proj(x[:, positions]).view(B, len(positions), self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, Q, hd]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rotary(q, cos[positions], sin[positions]), apply_rotary(k, cos, sin)
        k = _repeat_kv(k, self.n_heads // self.n_kv_heads, 1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, Q, L]
        return torch.softmax(scores.masked_fill(~mask[..., positions, :], float("-inf")), dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v

    def decode(self, x, cos, sin, prefix_k, prefix_v, cache_k, cache_v, step):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, prefix_k, prefix_v, cache_k, cache_v, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class TokenEmbedding(nn.Module):
    """The base vocabulary's table, and the special tokens' rows as a parameter of their own.

    In the paper's recipe only the special rows train; a separate small parameter does
    that without a gradient mask on the whole table (which ZeRO-3 partitioning fights).
    """

    def __init__(self, n_base: int, n_special: int, dim: int):
        super().__init__()
        self.n_base = n_base
        self.base = nn.Embedding(n_base, dim)
        self.special = nn.Parameter(torch.zeros(n_special, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_special = (ids >= self.n_base)[..., None]
        base = self.base(ids.clamp(0, self.n_base - 1))
        special = self.special[(ids - self.n_base).clamp(0, self.special.shape[0] - 1)]
        return torch.where(is_special, special, base)  # [..., D]


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, n_special: int):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, n_special, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size + n_special, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, return_kv: bool = False):
        """h: [B, L, D] input embeddings at positions 0..L-1 -> (normed hidden [B, L, D], [(k, v)] per layer)."""
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        kv = []
        for layer in self.layers:
            h, k, v = layer(h, cos, sin, mask)
            if return_kv:
                kv.append((k, v))
        return self.norm(h), kv

    def attention_probs(self, h: torch.Tensor, mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """The attention of the queries at ``positions`` over all L keys, every layer and head.

        h: [B, L, D] and mask as for ``forward`` -> [n_layers, B, H, len(positions), L], float32.
        A separate pass for attention maps: ``forward`` and ``decode`` stay as they are.
        """
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        maps = []
        for layer in self.layers:
            maps.append(layer.self_attn.probs(layer.input_layernorm(h), cos, sin, mask, positions))
            h, _, _ = layer(h, cos, sin, mask)
        return torch.stack(maps)

    def decode(self, h, position: int, prefix_kv, caches, step: int) -> torch.Tensor:
        """h: [B, K, D], one token per label at ``position`` -> normed hidden [B, K, D]."""
        cos, sin = self.rotary(torch.tensor(position, device=h.device))
        for layer, (pk, pv), (ck, cv) in zip(self.layers, prefix_kv, caches):
            h = layer.decode(h, cos, sin, pk, pv, ck, cv, step)
        return self.norm(h)
