"""The language decoder: LLaMA's blocks (RMSNorm, rotary attention, SwiGLU), truncated.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ...) so that its checkpoints map one to one; the rotary embedding uses
its rotate-half layout (Meta checkpoints are permuted on import, see model/convert.py).

Two ways through the blocks:

- ``forward``: a whole sequence under an explicit boolean mask (training, and the prompt
  prefill at inference), optionally returning every layer's keys and values;
- ``decode``: one new token for each of K labels per image, attending to the image's
  shared prefix cache (read once, never copied K times nor per head group) and to the
  label's own earlier tokens. This is what makes one-shot sampling of 100 labels cheap.

Numerics (see model/precision.py): rotary tables, norm statistics, attention softmax and
the output layer's logits are float32 whatever the weights' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DecoderConfig
from model.precision import linear_fp32, matmul_fp32


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
    """cos/sin tables of the rotary embedding for given positions (rotate-half layout), in float32.

    The frequencies are made at each call rather than held in a buffer: ``model.to(bfloat16)``
    casts buffers, and bf16 frequencies put the angles off by ~0.35 rad at positions 256-289.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # [head_dim / 2]
        freqs = positions.float()[..., None] * inv_freq  # [..., head_dim / 2]
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
        """One new token for each of K labels per image; scores and softmax in float32.

        x: [B, K, D], one token per label; cos/sin: [hd] (one position shared by all labels).
        prefix_k/v: [B, Hkv, P, hd], the image and prompt, shared by the image's K labels.
        cache_k/v: [B, Hkv, K, T, hd], each label's own tokens. With ``step``, a preallocated
        cache whose slot ``step`` is written here; with ``step=None``, exactly the label's
        earlier tokens (T may be 0), this token's key and value appended to a new tensor
        (an exported graph cannot write into its inputs).
        Returns (output [B, K, D], the label keys and values attended [B, Hkv, K, t, hd]).
        Nothing is copied per label or per head group: query head h = kv * G + g reads kv
        head kv, so the G query heads of a kv head and the K labels are the rows of one
        product with that head's prefix, and each label's rows meet its own cache slots.
        """
        B, K, _ = x.shape
        Hkv, hd = self.n_kv_heads, self.head_dim
        G = self.n_heads // Hkv
        q = apply_rotary(self.q_proj(x).view(B, K, Hkv, G, hd), cos, sin)
        q = q.permute(0, 2, 1, 3, 4).contiguous()  # [B, Hkv, K, G, hd]
        k_new = apply_rotary(self.k_proj(x).view(B, K, Hkv, hd), cos, sin).transpose(1, 2)  # [B, Hkv, K, hd]
        v_new = self.v_proj(x).view(B, K, Hkv, hd).transpose(1, 2)
        if step is None:
            label_k, label_v = torch.cat([cache_k, k_new[:, :, :, None]], 3), torch.cat([cache_v, v_new[:, :, :, None]], 3)
        else:
            cache_k[:, :, :, step], cache_v[:, :, :, step] = k_new, v_new
            label_k, label_v = cache_k[:, :, :, : step + 1], cache_v[:, :, :, : step + 1]  # [B, Hkv, K, t, hd], views
        scale = 1.0 / math.sqrt(hd)
        s_prefix = matmul_fp32(q.view(B, Hkv, K * G, hd), prefix_k.transpose(-1, -2)).mul_(scale)  # [B, Hkv, K*G, P]
        s_label = matmul_fp32(q, label_k.transpose(-1, -2)).mul_(scale)  # [B, Hkv, K, G, t]
        s_prefix = s_prefix.view(B, Hkv, K, G, -1)
        # one softmax over prefix and label keys together, without concatenating the scores
        top = torch.maximum(s_prefix.amax(-1, keepdim=True), s_label.amax(-1, keepdim=True))  # [B, Hkv, K, G, 1]
        e_prefix, e_label = (s_prefix - top).exp_(), (s_label - top).exp_()
        total = e_prefix.sum(-1, keepdim=True) + e_label.sum(-1, keepdim=True)
        p_prefix, p_label = (e_prefix / total).to(x.dtype), (e_label / total).to(x.dtype)
        out = matmul_fp32(p_prefix.view(B, Hkv, K * G, -1), prefix_v).view(B, Hkv, K, G, hd)
        out += matmul_fp32(p_label, label_v)  # [B, Hkv, K, G, hd]
        out = out.to(x.dtype).permute(0, 2, 1, 3, 4).reshape(B, K, Hkv * G * hd)
        return self.o_proj(out), label_k, label_v

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
        attn, label_k, label_v = self.self_attn.decode(self.input_layernorm(x), cos, sin, prefix_k, prefix_v, cache_k, cache_v, step)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), label_k, label_v


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


class OutputLayer(nn.Linear):
    """The vocabulary-wide output layer: float32 logits whatever the weights' dtype.

    A module of its own (not a function of ``lm_head.weight``) so that parameter hooks
    such as ZeRO-3's gathering run around it.
    """

    def __init__(self, dim: int, vocab: int):
        super().__init__(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp32(x, self.weight)  # [..., D] -> [..., V] float32


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, n_special: int):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, n_special, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = OutputLayer(cfg.dim, cfg.vocab_size + n_special)
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

    def decode(self, h, position: int | torch.Tensor, prefix_kv, caches, step: int | None):
        """h: [B, K, D], one token per label at ``position`` -> (normed hidden [B, K, D], per layer (k, v) of the labels).

        ``prefix_kv``: per layer (k, v) [B, Hkv, P, hd] from ``forward(return_kv=True)``;
        ``caches``: per layer (k, v) [B, Hkv, K, T, hd]: slot ``step`` written by this call,
        or with ``step=None`` the labels' earlier tokens, which the returned (k, v)
        [B, Hkv, K, T + 1, hd] extend by this one (see ``Attention.decode``).
        """
        if not isinstance(position, torch.Tensor):  # a tensor: an exported graph's input
            position = torch.tensor(position, device=h.device)
        cos, sin = self.rotary(position)
        label_kv = []
        for layer, (pk, pv), (ck, cv) in zip(self.layers, prefix_kv, caches):
            h, k, v = layer.decode(h, cos, sin, pk, pv, ck, cv, step)
            label_kv.append((k, v))
        return self.norm(h), label_kv
