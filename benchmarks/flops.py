"""Model FLOPs of one NxTP training sample, for model FLOPs utilization (MFU).

The count is of matrix multiplications only (2 FLOPs per multiply-add; norms, softmax,
activations and the optimizer are left out, as MFU figures usually do):

ViT, per image token t of T_img + 1 (class token), per block of width w:
    projections 4 w^2 + MLP 2 * w * (mlp_ratio w)     multiply-adds
    attention   2 (T_img + 1) w                       (scores and weighted sum)
  plus the patch embedding (3 p^2 w per patch) and the projection to the decoder (w d per token).
Decoder, per position of the sequence S = T_img + L_text, per block of width d:
    q, o: 2 d^2; k, v: 2 d d_kv; SwiGLU MLP: 3 d h; attention 2 S d (full square, no causal saving)
  plus the output layer d V at the L_target positions that carry a target (the model only
  sends those through it).

Training = forward + backward. The backward of a block whose weights train costs twice
its forward (gradients of activations and of weights). The frozen parts of the recipes
here are the first ViT blocks (and the patch embedding), before every trained part, so
they need no backward at all:

    train FLOPs / sample = 3 F(trained) + F(frozen)
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import NxTPConfig


@dataclass(frozen=True)
class Flops:
    forward: float  # one sample's forward
    train: float  # forward + backward under the freezing policy

    def mfu(self, samples_per_s: float, peak_flops: float) -> float:
        return self.train * samples_per_s / peak_flops


def sample_flops(cfg: NxTPConfig, text_len: float, target_len: float, train_vision_blocks: int = -1) -> Flops:
    """FLOPs of one sample with ``text_len`` text positions, ``target_len`` of them with a target.

    ``train_vision_blocks``: the last ViT blocks that train (-1: all, the patch embedding
    included; the G3M recipe: 6). Every decoder block trains.
    """
    v, d = cfg.vision, cfg.decoder
    t_img = v.n_tokens
    t_vit = t_img + 1
    vit_block = t_vit * (4 * v.width**2 + 2 * v.width * int(v.mlp_ratio * v.width) + 2 * t_vit * v.width)
    patch = t_img * 3 * v.patch_size**2 * v.width
    proj = t_img * v.width * d.dim
    s = t_img + text_len
    kv = d.dim // d.n_heads * (d.n_kv_heads or d.n_heads)
    dec_block = s * (2 * d.dim**2 + 2 * d.dim * kv + 3 * d.dim * d.hidden_dim + 2 * s * d.dim)
    head = target_len * d.dim * (d.vocab_size + 2)
    macs_forward = patch + v.layers * vit_block + proj + d.n_layers * dec_block + head
    trained_vit = v.layers if train_vision_blocks < 0 else min(train_vision_blocks, v.layers)
    frozen_vit = v.layers - trained_vit
    # trained: 3x forward; frozen ViT blocks before the first trained one: forward only
    macs_train = 3 * (trained_vit * vit_block + proj + d.n_layers * dec_block + head) + frozen_vit * vit_block
    macs_train += 3 * patch if train_vision_blocks < 0 else patch
    return Flops(forward=2.0 * macs_forward, train=2.0 * macs_train)
