"""Numerics: float32 tables, norms, softmaxes and logits under bf16/fp16 weights; bf16 and fp16
inference against fp32 on the trained demo model and on the released checkpoint layout;
one-shot sampling's label cache (grouped KV heads, finished labels leaving the block)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from model.checkpoint import import_nxtp, load_pretrained
from model.config import DecoderConfig, NxTPConfig, VisionConfig, tiny_config
from model.decoder import apply_rotary
from model.nxtp import NxTP
from model.precision import _matmul_out_fp32, matmul_fp32, model_dtype, place, resolve_dtype
from model.sampling import one_shot, sample_tokens
from tests.model_fixtures import official_state_dict
from tests.reference_nxtp import reference_labels
from tests.test_model import _labels_end, _params

pytestmark = pytest.mark.usefixtures("no_grad")  # forward only: gradients off in this module's tests


def test_rotary_tables_stay_fp32_after_a_bf16_cast(tok):
    model = NxTP(tiny_config(tok.n_base, image_size=32))
    positions = torch.arange(256, 290)  # where bf16 frequencies were off by ~0.35 rad
    cos32, sin32 = model.decoder.rotary(positions)
    model.to(torch.bfloat16)
    cos, sin = model.decoder.rotary(positions)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, cos32) and torch.equal(sin, sin32)
    assert not [name for name, b in model.named_buffers() if b.dtype == torch.bfloat16]
    # a bf16 query rotated at those positions is the exact rotation of its values, rounded once
    hd = model.cfg.decoder.head_dim
    x = torch.randn(2, len(positions), hd).bfloat16()
    got = apply_rotary(x, cos, sin)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = positions.double()[:, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    x64 = x.double()
    rotated = torch.cat([-x64[..., hd // 2 :], x64[..., : hd // 2]], -1)
    exact = x64 * angles.cos() + rotated * angles.sin()
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=2**-8 * x64.abs().max().item())


def test_place_casts_weights_and_refuses_to_narrow_a_buffer(tok):
    model = place(NxTP(tiny_config(tok.n_base, image_size=32)), "cpu", torch.bfloat16)
    assert model_dtype(model) == torch.bfloat16 and not model.training
    table = nn.Module()
    table.register_buffer("freqs", torch.ones(4))
    with pytest.raises(RuntimeError, match="freqs.*stay float32"):
        place(table, "cpu", torch.float16)
    assert place(table, "cpu", torch.float32).freqs.dtype == torch.float32


def test_precision_names():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("fp16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32"):
        resolve_dtype("half", "cpu")


def test_matmul_fp32_keeps_the_product_in_float32():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, 64, generator=g).bfloat16(), torch.randn(2, 3, 64, 7, generator=g).bfloat16()
    got = matmul_fp32(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, a.double().matmul(b.double()).float(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, (a @ b).float()), "a bf16 product is rounded: this one is not"
    # the CUDA branch (cuBLAS with a float32 output), checked for shapes and dtypes on the meta device
    for x, y in ((a, b), (a, b[0, 0]), (a, b.transpose(-1, -2).contiguous().transpose(-1, -2))):
        out = _matmul_out_fp32(x.to("meta"), y.to("meta"))
        assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_fp32(a.float(), b.float()).dtype == torch.float32


def test_output_layer_gives_float32_logits_from_bf16_weights(tok):
    model = place(NxTP(tiny_config(tok.n_base, image_size=32)), "cpu", torch.bfloat16)
    h = torch.randn(3, model.cfg.decoder.dim).bfloat16()
    logits = model.decoder.lm_head(h)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(
        logits, h.double().matmul(model.decoder.lm_head.weight.double().T).float(), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- the label cache


def _gqa_model(tok) -> NxTP:
    torch.manual_seed(0)
    cfg = NxTPConfig(
        VisionConfig(name=None, image_size=32, patch_size=16, width=64, layers=2, heads=2, quick_gelu=False),
        DecoderConfig(
            dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=tok.n_base, max_seq_len=64
        ),
    )
    model = NxTP(cfg)
    model.init_weights()
    return _labels_end(model, tok)


def test_grouped_kv_heads_and_finished_labels_leave_the_block(tok):
    model = _gqa_model(tok)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompt = tok.prompt_ids(model.cfg.prompt)
    rows: list[int] = []
    hook = model.decoder.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    tokens, probs, lengths = sample_tokens(
        model, images, prompt, tok.delimiter_id, k=8, max_steps=12, use_cache=True
    )
    hook.remove()
    ref = sample_tokens(model, images, prompt, tok.delimiter_id, k=8, max_steps=12, use_cache=False)
    assert torch.equal(tokens, ref[0]) and torch.equal(lengths, ref[2])
    torch.testing.assert_close(probs, ref[1], rtol=1e-5, atol=1e-7)
    # rows through the output layer: the 4 images at the prompt, then each decode step's block, which
    # holds every running label and shrinks when a quarter of it would compute finished ones
    decode_rows = rows[1:]
    assert rows[0] == 4 and len(decode_rows) == tokens.shape[-1] - 1
    for n, r in enumerate(decode_rows, start=1):
        running = (lengths >= n).sum(1)  # per image, labels without a delimiter in their first n tokens
        compact = int((running > 0).sum()) * int(running.max())
        assert compact <= r <= compact / 0.75, (n, r, running.tolist())
    assert decode_rows[-1] < decode_rows[0] and sum(decode_rows) < 0.5 * 4 * 8 * len(decode_rows)
    assert min(lengths.flatten().tolist()) <= 1 and max(lengths.flatten().tolist()) == 11, (
        "short and forced labels are covered"
    )


# ----------------------------------------------------------------------------- reduced precision against fp32


def _labels_at(model, images, tok, dtype, k):
    return one_shot(place(model, "cpu", dtype), images.to(dtype), tok, k=k)


# (dtype, images with fp32's top-10 labels, top-10 probability mass (L1, relative), single label (relative),
#  fp32 ratio below which two labels are a tie that the dtype may order either way)
AGREEMENT = (
    # issue 13's goal, met with room: 32/32, 0.2%, 0.7%, no reordering
    (torch.float16, 31, 0.02, 0.02, 1.02),
    # bf16's 8-bit mantissa: 30-31/32, 1.2-2.0%, 2.4-6.4%, ties up to 1.042
    (torch.bfloat16, 29, 0.03, 0.10, 1.08),
)


def test_bf16_and_fp16_agree_with_fp32_on_the_trained_demo_model(demo_run):
    """32 held-out images of the demo world through the trained demo model, fp32 against fp16 and bf16.

    Measured on three trainings of the demo model (2-core Xeon), in the comments of
    AGREEMENT. fp16 meets the goal of label probabilities within 2% and the same top-10
    labels on at least 31 of 32 images; bf16 does not reliably: rounding the weights alone
    to bf16 moves labels by up to 1.5%, and bf16 activations add as much again, so labels
    move by 2.4-6.4% and near-ties swap. Its bounds here are what it does reach, with room.
    """
    from PIL import Image

    from model.vision import preprocess
    from pipeline.synthetic import load_world

    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    world = load_world(os.path.join(out, "world"))
    good = [s for s in world.samples("val") if s["kind"] == "good"][:32]
    assert len(good) == 32
    export = os.path.join(out, "run", "export")
    model, tok = load_pretrained(export)
    transform = preprocess(model.cfg.vision.image_size)
    images = torch.stack(
        [transform(Image.open(os.path.join(world.root, s["file"])).convert("RGB")) for s in good]
    )
    # k = 20 candidates each, so that a label just outside one run's top-10 has a probability in the other
    ref = _labels_at(load_pretrained(export)[0], images, tok, torch.float32, k=20)
    for dtype, same_sets, mass, single, tie in AGREEMENT:
        got = _labels_at(load_pretrained(export)[0], images, tok, dtype, k=20)
        n_same = 0
        for a, b in zip(ref, got):
            p_ref, p_got = dict(zip(a.labels, a.probs)), dict(zip(b.labels, b.probs))
            top_ref, top_got = a.labels[:10], b.labels[:10]
            n_same += set(top_ref) == set(top_got)
            ref_p = torch.tensor(a.probs[:10], dtype=torch.float64)
            got_p = torch.tensor([p_got.get(label, 0.0) for label in top_ref], dtype=torch.float64)
            assert float((got_p - ref_p).abs().sum() / ref_p.sum()) <= mass, (
                dtype,
                top_ref,
                a.probs[:10],
                got_p.tolist(),
            )
            assert float(((got_p - ref_p).abs() / ref_p).max()) <= single, (
                dtype,
                top_ref,
                a.probs[:10],
                got_p.tolist(),
            )
            # any difference of order or membership is between labels that fp32 calls a tie
            for i, x in enumerate(top_got):
                for y in top_got[i + 1 :] + [label for label in top_ref if label not in top_got]:
                    assert x in p_ref and p_ref[x] * tie >= p_ref.get(y, 0.0), (
                        dtype,
                        x,
                        y,
                        p_ref.get(x),
                        p_ref.get(y),
                    )
        assert n_same >= same_sets, (dtype, n_same)


def test_released_checkpoint_in_bf16_and_fp16_gives_the_reference_labels(tmp_path, tok):
    sd = official_state_dict(tok.n_base, tok.delimiter_id)
    torch.save({"model": sd}, tmp_path / "nxtp.pth")
    params = _params(tmp_path)  # Meta's params.json of that tiny decoder
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = reference_labels(sd, images, tok.path, k=16, n_heads=2)  # float32, recomputing every step
    for dtype in (torch.float16, torch.bfloat16):
        model, t, _ = import_nxtp(str(tmp_path / "nxtp.pth"), tok.path, llama_params=params)
        got = one_shot(place(model, "cpu", dtype), images.to(dtype), t, k=16, max_steps=20)
        for ours, (labels, probs) in zip(got, ref):
            # this random checkpoint's labels are flat (top-1 at 0.6-12%) and long: labels far below the top one
            # are near-ties at bf16's precision; those within a factor of 10 (fp16: 100) must match
            floor, rtol = (0.01, 0.02) if dtype == torch.float16 else (0.1, 0.15)
            found = dict(zip(ours.labels, ours.probs))
            assert ours.labels[0] == labels[0]
            for label, p in zip(labels, probs):
                if p >= floor * probs[0]:
                    assert label in found and abs(found[label] - p) <= rtol * p, (
                        dtype,
                        label,
                        p,
                        found.get(label),
                    )
