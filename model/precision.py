"""Numerics: which dtype a model runs in, putting it there, and the products kept in float32.

The rule, in training and inference alike: weights and activations may be bf16 or fp16,
but these are computed in float32 whatever the weights' dtype:

- rotary angles and their cos/sin tables (``model.decoder.Rotary`` holds no buffer that a
  ``.to(dtype)`` could cast: the tables are made in float32 at each call);
- RMSNorm statistics (``RMSNorm.forward`` upcasts before the mean of squares);
- attention softmax: ``F.scaled_dot_product_attention`` keeps the scores and the softmax
  in float32 for bf16/fp16 inputs in every backend (flash and memory-efficient kernels
  accumulate in float32 on CPU and CUDA; the math backend upcasts q, k, v to float32
  unless ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`` was called), so
  the training forward keeps SDPA and its fused GPU kernels; one-shot decoding computes
  its scores with ``matmul_fp32`` and its softmax in float32;
- the output layer: logits come out of ``matmul_fp32`` (float32 result of the reduced
  precision product), its softmax and the loss in float32. A bf16 logit of 20 is off by up
  to 0.06, which moves a label's probability by 6%.

``place`` is the one way to put a model on a device in a precision.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REDUCED = (torch.bfloat16, torch.float16)


def resolve_device(choice: str) -> torch.device:
    """``auto``: a CUDA GPU when one is visible, else the CPU; ``cuda`` where none is: a ValueError saying so."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of ``precision`` on ``device``.

    ``auto``: bf16 on a CUDA GPU that supports it, fp16 on an older one (the reference's
    own inference precision), fp32 on a CPU. An explicit choice is taken as given (torch
    runs bf16 and fp16 on a CPU too, slowly: useful for checking numerics).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return DTYPES[precision]
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def place(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` on ``device`` with its floating-point weights in ``dtype``, in eval mode.

    Checks the float32 rule: no floating-point buffer may be cast (the model keeps its
    float32 tables out of buffers; a buffer added later would be caught here).
    """
    model = model.to(device=device, dtype=dtype)
    if dtype != torch.float32:
        narrowed = [name for name, b in model.named_buffers() if b.dtype == dtype]
        if narrowed:
            raise RuntimeError(f"buffer(s) {narrowed} were cast to {dtype}: tables stay float32 (see model.precision)")
    return model.eval()


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs must have: the first floating-point parameter's."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32 for inputs of any floating dtype: float32 accumulation and result.

    ``a`` [..., M, K], ``b`` [..., K, N] with the same leading dims (or ``b`` 2-D). On CUDA
    bf16/fp16 inputs go to cuBLAS with a float32 output (``out_dtype``: no float32 copy of
    the operands, bf16 tensor-core speed); elsewhere, or when gradients are needed (that
    path has no backward), the operands are upcast.
    """
    if torch.is_autocast_enabled(a.device.type):  # autocast would run the product in its own dtype
        with torch.autocast(a.device.type, enabled=False):
            return matmul_fp32(a, b)
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and a.dtype in REDUCED and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return _matmul_out_fp32(a, b)
    return a.float() @ b.float()


def _matmul_out_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.dim() == 2:
        out = torch.mm(a.reshape(-1, a.shape[-1]), b, out_dtype=torch.float32)
        return out.view(*a.shape[:-1], b.shape[-1])
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"matmul_fp32: leading dims differ, {tuple(a.shape)} @ {tuple(b.shape)}")
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
    return out.view(*a.shape[:-1], b.shape[-1])


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) with a float32 result: see ``matmul_fp32``."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.linear(x, weight)
    return matmul_fp32(x, weight.t())
