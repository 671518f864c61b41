"""The NxTP network: against transformers' LLaMA, against an independent reference of the
released inference, masks cell by cell, cached sampling against recomputation, imports."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from model import convert
from model.attention import first_label_ids, label_attention, label_maps, select
from model.checkpoint import (
    build_from_pretrained,
    import_nxtp,
    load_hf_llama,
    load_meta_llama,
)
from model.config import DecoderConfig, NxTPConfig, VisionConfig, tiny_config
from model.decoder import Decoder
from model.nxtp import NxTP
from model.prompt import IGNORE, decoupled_label_mask, label_segments, prefix_mask, training_text
from model.sampling import one_shot, sample_tokens
from model.tokenizer import Tokenizer
from tests.model_fixtures import is_frozen_vision_key, official_state_dict
from tests.reference_nxtp import llama_logits_last, reference_labels

pytestmark = pytest.mark.usefixtures("no_grad")  # forward only: gradients off in this module's tests


def _hf_llama(
    vocab: int, layers: int = 4, dim: int = 64, heads: int = 4, kv_heads: int = 2, hidden: int = 112
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # norms away from 1 so that a misplaced norm shows
        p.add_(0.05 * torch.randn_like(p))
    return model


def test_truncated_decoder_matches_transformers_llama():
    from transformers import LlamaForCausalLM

    hf = _hf_llama(vocab=300)
    dcfg, _ = DecoderConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=112, vocab_size=300), None
    mapper = convert.KeyMapper(hf.state_dict(), "hf")
    convert.decoder_from_hf(mapper, dcfg)
    mapped, _ = mapper.finish(ignore=["model.layers.*"])
    ours = Decoder(dcfg, n_special=2)
    full = ours.state_dict()
    mapped["decoder.lm_head.weight"] = torch.cat(
        [mapped["decoder.lm_head.weight"], full["lm_head.weight"][300:]]
    )
    mapped["decoder.embed.special"] = full["embed.special"]
    ours.load_state_dict({k.removeprefix("decoder."): v for k, v in mapped.items()})
    # the same weights, truncated to 2 blocks, in transformers' own implementation
    hf.config.num_hidden_layers = 2
    hf.model.layers = hf.model.layers[:2]
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(0, 300, (3, 17))
    expected = hf(input_ids=ids).logits
    hidden, _ = ours(ours.embed(ids), prefix_mask(0, 17))
    torch.testing.assert_close(ours.lm_head(hidden)[..., :300], expected, rtol=1e-5, atol=1e-5)


def test_attention_probs_match_transformers_llama():
    hf = _hf_llama(vocab=300, layers=2)
    hf.config._attn_implementation = "eager"  # the implementation that returns its attention weights
    dcfg = DecoderConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=112, vocab_size=300)
    mapper = convert.KeyMapper(hf.state_dict(), "hf")
    convert.decoder_from_hf(mapper, dcfg)
    mapped, _ = mapper.finish()
    ours = Decoder(dcfg, n_special=2)
    full = ours.state_dict()
    mapped["decoder.lm_head.weight"] = torch.cat(
        [mapped["decoder.lm_head.weight"], full["lm_head.weight"][300:]]
    )
    mapped["decoder.embed.special"] = full["embed.special"]
    ours.load_state_dict({k.removeprefix("decoder."): v for k, v in mapped.items()})
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    expected = torch.stack(hf(input_ids=ids, output_attentions=True).attentions)  # [layers, B, H, L, L]
    positions = [0, 5, 16]
    probs = ours.attention_probs(ours.embed(ids), prefix_mask(0, 17), positions)
    torch.testing.assert_close(probs, expected[:, :, :, positions], rtol=1e-5, atol=1e-6)


def test_label_attention_keeps_images_and_labels_apart(tok):
    model = _tiny_model(tok)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompt = tok.prompt_ids(model.cfg.prompt)
    labels = [["circle", "star", "table"], ["mouse", "leaf", "sky"]]
    first = torch.tensor([first_label_ids(tok, model.cfg.prompt, row) for row in labels])
    maps = label_attention(model, images, prompt, first)  # [B, K, layers, heads, g, g]
    assert maps.shape == (2, 3, 3, 4, 2, 2)
    total = maps.sum(dim=(-2, -1))
    assert bool((total > 0).all()) and bool((total <= 1 + 1e-6).all())
    for b in range(2):  # one image and one label at a time gives the same maps: batching mixes nothing
        for j in range(3):
            alone = label_attention(model, images[b : b + 1], prompt, first[b : b + 1, j : j + 1])
            torch.testing.assert_close(alone[0, 0], maps[b, j], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(maps[0, 0], maps[0, 1]), "the label's own token changes where it looks"
    torch.testing.assert_close(select(maps), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(select(maps, layer=-1, head=2), maps[:, :, 2, 2])
    torch.testing.assert_close(select(maps, head=1), maps[:, :, :, 1].mean(dim=2))
    with pytest.raises(ValueError, match="layer 3 is out of range: the decoder has 3 layers"):
        select(maps, layer=3)
    with pytest.raises(ValueError, match="does not tokenize as a continuation"):
        first_label_ids(tok, model.cfg.prompt, [""])
    by_label = label_maps(model, tok, images[1], ["", *labels[1]], layer=0)  # an empty label has no map
    assert list(by_label) == labels[1]
    for j, label in enumerate(labels[1]):
        torch.testing.assert_close(by_label[label], select(maps[1, j], layer=0), rtol=1e-5, atol=1e-7)


def _meta_from_hf(hf_sd: dict, heads: int, kv_heads: int) -> dict:
    """Meta layout written by hand from an HF state dict (interleaved rotary pairs)."""

    def to_meta(w, n):
        d_out, d_in = w.shape
        return w.view(n, 2, d_out // n // 2, d_in).transpose(1, 2).reshape(d_out, d_in)

    names = {
        "q_proj": "attention.wq",
        "k_proj": "attention.wk",
        "v_proj": "attention.wv",
        "o_proj": "attention.wo",
        "gate_proj": "feed_forward.w1",
        "down_proj": "feed_forward.w2",
        "up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = {
        "tok_embeddings.weight": hf_sd["model.embed_tokens.weight"],
        "norm.weight": hf_sd["model.norm.weight"],
        "output.weight": hf_sd["lm_head.weight"],
        "rope.freqs": torch.zeros(8),
    }
    for k, v in hf_sd.items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers.") :].split(".", 1)
            parts = rest.split(".")
            mod = parts[1] if parts[0] in ("self_attn", "mlp") else parts[0]
            w = to_meta(v, heads) if mod == "q_proj" else to_meta(v, kv_heads) if mod == "k_proj" else v
            out[f"layers.{i}.{names[mod]}.weight"] = w
    return out


def test_meta_import_matches_hf_import_and_meta_reference(tmp_path, tok):
    hf = _hf_llama(vocab=tok.n_base, kv_heads=4)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    meta = _meta_from_hf(hf.state_dict(), heads=4, kv_heads=4)
    torch.save(meta, meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 4,
                "n_heads": 4,
                "multiple_of": 16,
                "ffn_dim_multiplier": 112 / int(2 * 4 * 64 / 3),
                "norm_eps": 1e-5,
                "vocab_size": -1,
            }
        )
    )
    cfg_hf, sd_hf = load_hf_llama(str(hf_dir), n_layers=3)
    cfg_meta, sd_meta = load_meta_llama(str(meta_dir / "params.json"), n_layers=3, vocab_size=tok.n_base)
    assert (cfg_hf.hidden_dim, cfg_hf.n_layers) == (cfg_meta.hidden_dim, cfg_meta.n_layers) == (112, 3)
    assert not any(k.startswith("layers.3.") for k in sd_meta), "blocks beyond the truncation are not loaded"
    m_hf, m_meta = convert.KeyMapper(sd_hf, "hf"), convert.KeyMapper(sd_meta, "meta")
    convert.decoder_from_hf(m_hf, cfg_hf)
    convert.decoder_from_meta(m_meta, "", cfg_meta, extended=False)
    a, b = m_hf.finish()[0], m_meta.finish()[0]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the permutation is right: Meta's own complex-number rotary gives the same logits
    dec = Decoder(cfg_meta, 2)
    state = dec.state_dict()
    state.update({k.removeprefix("decoder."): v for k, v in b.items() if k != "decoder.lm_head.weight"})
    state["lm_head.weight"][: tok.n_base] = b["decoder.lm_head.weight"]
    dec.load_state_dict(state)
    ids = torch.randint(0, tok.n_base, (2, 11))
    hidden, _ = dec(dec.embed(ids), prefix_mask(0, 11))
    ref_sd = {"language_decoder." + k: v for k, v in meta.items() if not k.startswith("layers.3.")}
    ref = llama_logits_last(
        ref_sd, ref_sd["language_decoder.tok_embeddings.weight"][ids], n_image=0, n_heads=4
    )
    torch.testing.assert_close(dec.lm_head(hidden[:, -1])[:, : tok.n_base], ref, rtol=1e-4, atol=1e-5)


def test_masks_cell_by_cell():
    # text: <img> BOS The are | cat , big dog , sun EOS pad ; delimiter id 9, "are" at 3
    ids = torch.tensor([[100, 1, 20, 21, 30, 9, 31, 32, 9, 33, 2, 101]])
    seg = label_segments(ids, torch.tensor([3]), delimiter_id=9)
    assert seg.tolist() == [[-1, -1, -1, -1, 0, 0, 1, 1, 1, 2, 2, 2]]
    m = decoupled_label_mask(seg, n_image=2)[0, 0].int()
    expected = [
        # image image <img> BOS The are cat , big dog , sun EOS pad
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # image 0 sees the whole image block
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # <|image|>
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # BOS
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # The
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # are
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # cat: prefix + itself
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # , (ends cat)
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # big: prefix only, not cat
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],  # dog
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0],  # , (ends big dog)
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0],  # sun
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],  # EOS
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],  # pad
    ]
    assert m.tolist() == expected
    p = prefix_mask(2, 3)[0, 0].int().tolist()
    assert p == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_training_text_targets(tok):
    ids, targets, answer = training_text(
        ["circle", "table"], tok, random.Random(0), templates=["The objects in the image are"]
    )
    prompt = tok.prompt_ids("The objects in the image are")
    assert ids[: len(prompt)] == prompt and answer == len(prompt) - 1
    assert ids[0] == tok.image_id and ids[1] == tok.bos_id and ids[-1] == tok.eos_id
    assert targets[0] == tok.bos_id, "the <|image|> position predicts BOS"
    assert targets[: len(ids) - 2] == ids[1:-1] and targets[-2:] == [IGNORE, IGNORE], "EOS is no target"
    body = tok.decode(ids[len(prompt) : -1]).strip()
    assert body in ("circle, table", "table, circle")
    assert ids.count(tok.delimiter_id) == 1


def test_tokenizer_ids_from_the_tokenizer(tok, repo_root):
    paths = [tok.path]
    llama2 = os.environ.get("NXTP_TOKENIZER", "")  # LLaMA-2's tokenizer.model, where the machine has it
    if os.path.isfile(llama2):
        paths.append(llama2)
    for path in paths:
        t = Tokenizer(path)
        assert t.sp.id_to_piece(t.delimiter_id) == ","
        assert t.sp.encode(", ")[0] != t.delimiter_id, "a lone ', ' does not start with the delimiter piece"
        ids = t.prompt_ids("The objects in the image are")
        assert ids[:2] == [t.image_id, t.bos_id] and t.sp.id_to_piece(ids[-1]) == "▁are"
        assert (t.image_id, t.pad_id) == (t.n_base, t.n_base + 1)
        if path == llama2:  # the real LLaMA-2 ids the reference hard-codes
            assert (t.n_base, t.delimiter_id, ids[-1]) == (32000, 29892, 526)
            assert t.sp.encode(", ") == [1919, 29871]  # a lone ", " is "▁," then "▁"
            assert ids == [32000, 1, 450, 3618, 297, 278, 1967, 526]


def _tiny_model(tok, seed=0) -> NxTP:
    torch.manual_seed(seed)
    model = NxTP(tiny_config(tok.n_base, image_size=32))
    model.init_weights()
    return _labels_end(model, tok)


def _labels_end(model: NxTP, tok: Tokenizer) -> NxTP:
    """Make a random model's labels end: a constant feature that the delimiter row reads."""
    with torch.no_grad():
        model.decoder.embed.base.weight[:, 0] = 0.02
        model.decoder.embed.special[:, 0] = 0.02
        model.decoder.lm_head.weight[tok.delimiter_id, 0] = 0.5
    return model.eval()


def test_kv_cached_sampling_equals_recompute(tok):
    model = _tiny_model(tok)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompt = tok.prompt_ids(model.cfg.prompt)
    a = sample_tokens(model, images, prompt, tok.delimiter_id, k=6, max_steps=9, use_cache=True)
    b = sample_tokens(model, images, prompt, tok.delimiter_id, k=6, max_steps=9, use_cache=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-7)
    lengths = a[2].flatten().tolist()
    assert min(lengths) <= 1 and max(lengths) == 8, "both short and forced labels are covered"
    for x, y in zip(
        one_shot(model, images, tok, k=6, max_steps=9),
        one_shot(model, images, tok, k=6, max_steps=9, use_cache=False),
    ):
        assert x.labels == y.labels
        torch.testing.assert_close(torch.tensor(x.probs), torch.tensor(y.probs), rtol=1e-5, atol=0)


def _params(tmp_path) -> str:
    """Meta's params.json for the tiny decoder of official_state_dict (2 heads, ffn 96)."""
    path = tmp_path / "params.json"
    path.write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 32,
                "n_heads": 2,
                "multiple_of": 32,
                "ffn_dim_multiplier": 0.55,
                "norm_eps": 1e-5,
                "vocab_size": -1,
            }
        )
    )
    return str(path)


def _save_official(path, sd, prefix_module=False, **extra):
    model = {("module." if prefix_module else "") + k: v for k, v in sd.items()}
    torch.save({"model": model, "epoch": 3, "global_step": 21360, **extra}, path)


def test_official_checkpoint_import_matches_reference(tmp_path, tok):
    sd = official_state_dict(tok.n_base, tok.delimiter_id)
    full = dict(sd, **{"vision_encoder.logit_scale": torch.tensor(4.6)})
    _save_official(
        tmp_path / "full.pth",
        full,
        prefix_module=True,
        optimizer={"state": {}, "param_groups": [{"lr": 1e-5}]},
    )
    model, t, notes = import_nxtp(str(tmp_path / "full.pth"), tok.path, llama_params=_params(tmp_path))
    assert any("vision_encoder.logit_scale" in n and "ignored" in n for n in notes)
    assert model.cfg.vision.n_tokens == 16 and model.cfg.vision.quick_gelu
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = one_shot(model, images, t, k=16, max_steps=20)
    ref = reference_labels(sd, images, tok.path, k=16, n_heads=2)
    for got, (labels, probs) in zip(ours, ref):
        assert got.labels == labels
        torch.testing.assert_close(torch.tensor(got.probs), torch.tensor(probs), rtol=0, atol=1e-4)
    assert any(len(t.encode(label)) >= 13 for r in ref for label in r[0]), "a label ran to the step limit"


def test_finalize_merges_sums_and_sorts(tok):
    from model.sampling import finalize

    star, table = tok.encode("star"), tok.encode("table")
    d = tok.delimiter_id
    width = max(len(star), len(table)) + 2
    rows = [star + [d], table + [d], star + [d], table + table]  # the last never ends: forced delimiter
    tokens = torch.tensor([[r + [d] * (width - len(r)) for r in rows]])
    probs = torch.full(tokens.shape, 0.5)
    lengths = torch.tensor([[len(star), len(table), len(star), width]])
    (out,) = finalize(tokens, probs, lengths, tok)
    p_star = 2 * 0.5 ** (len(star) + 1)
    p_table = 0.5 ** (len(table) + 1)
    assert out.labels[:2] == (["star", "table"] if p_star > p_table else ["table", "star"])
    assert dict(zip(out.labels, out.probs))["star"] == pytest.approx(p_star)
    assert dict(zip(out.labels, out.probs))["table"] == pytest.approx(p_table)
    forced = [label for label in out.labels if label not in ("star", "table")]
    assert forced and dict(zip(out.labels, out.probs))[forced[0]] == pytest.approx(0.5**width)
    assert out.probs == sorted(out.probs, reverse=True)


def test_trained_only_checkpoint_needs_base_clip_weights(tmp_path, tok):
    sd = official_state_dict(tok.n_base, tok.delimiter_id, vision_layers=3)
    trained = {k: v for k, v in sd.items() if not is_frozen_vision_key(k, trained_blocks={2})}
    _save_official(tmp_path / "trained.pth", trained)
    base = {
        "visual." + k.removeprefix("vision_encoder."): v
        for k, v in sd.items()
        if k.startswith("vision_encoder.") and k != "vision_encoder.proj.weight"
    }
    base["visual.proj"] = torch.randn(128, 32)  # CLIP's pooled projection: not NxTP's token projection
    base["visual.transformer.resblocks.2.ln_1.weight"] = torch.zeros(
        128
    )  # a trained block: the NxTP file wins
    base.update(
        {
            "positional_embedding": torch.randn(8, 32),
            "token_embedding.weight": torch.randn(10, 32),
            "logit_scale": torch.tensor(4.6),
        }
    )
    torch.save(base, tmp_path / "clip.pt")
    with pytest.raises(
        convert.WeightError, match=r"missing key 'vision_encoder.conv1.weight'.*--clip-weights"
    ):
        import_nxtp(str(tmp_path / "trained.pth"), tok.path, llama_params=_params(tmp_path))
    model, _, notes = import_nxtp(
        str(tmp_path / "trained.pth"),
        tok.path,
        clip_weights=str(tmp_path / "clip.pt"),
        llama_params=_params(tmp_path),
    )
    _save_official(tmp_path / "full.pth", sd)
    reference, _, _ = import_nxtp(str(tmp_path / "full.pth"), tok.path, llama_params=_params(tmp_path))
    state = model.state_dict()
    torch.testing.assert_close(
        state["vision.vit.transformer.resblocks.2.ln_1.weight"],
        sd["vision_encoder.transformer.resblocks.2.ln_1.weight"],
    )
    torch.testing.assert_close(state["vision.vit.conv1.weight"], sd["vision_encoder.conv1.weight"])
    assert any("taken from" in n for n in notes)
    assert reference.cfg == model.cfg
    for key, value in reference.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_official_round_trip(tmp_path, tok):
    sd = official_state_dict(tok.n_base, tok.delimiter_id, seed=3)
    _save_official(tmp_path / "a.pth", sd)
    model, _, _ = import_nxtp(str(tmp_path / "a.pth"), tok.path, llama_params=_params(tmp_path))
    back = {
        **convert.vision_to_openai(model.state_dict(), "vision_encoder.", model.cfg.vision),
        **convert.decoder_to_meta(model.state_dict(), "language_decoder.", model.cfg.decoder),
    }
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_import_errors_name_the_key(tmp_path, tok):
    sd = official_state_dict(tok.n_base, tok.delimiter_id)
    bad = dict(sd)
    bad["language_decoder.layers.1.attention.wv.weight"] = torch.randn(64, 32)
    _save_official(tmp_path / "shape.pth", bad)
    with pytest.raises(
        convert.WeightError, match=r"decoder.layers.1.self_attn.v_proj.weight' has shape \(64, 32\)"
    ):
        import_nxtp(str(tmp_path / "shape.pth"), tok.path, llama_params=_params(tmp_path))
    extra = dict(sd, **{"language_decoder.layers.0.attention.bias": torch.zeros(3)})
    _save_official(tmp_path / "extra.pth", extra)
    with pytest.raises(
        convert.WeightError, match=r"unexpected key 'language_decoder.layers.0.attention.bias'"
    ):
        import_nxtp(str(tmp_path / "extra.pth"), tok.path, llama_params=_params(tmp_path))
    torch.save({"model": sd, "hook": random.Random(0)}, tmp_path / "pickle.pth")
    with pytest.raises(convert.WeightError, match="weights only"):
        import_nxtp(str(tmp_path / "pickle.pth"), tok.path, llama_params=_params(tmp_path))


def test_build_from_pretrained_open_clip_and_hf(tmp_path, tok):
    import open_clip

    clip = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
        quick_gelu=True,
    ).eval()
    torch.save(
        {"state_dict": {"module." + k: v for k, v in clip.state_dict().items()}, "epoch": 1},
        tmp_path / "open_clip.pt",
    )
    hf = _hf_llama(vocab=tok.n_base)
    hf.save_pretrained(tmp_path / "llama")
    model, _ = build_from_pretrained(
        tok.path, str(tmp_path / "llama"), n_layers=2, clip_weights=str(tmp_path / "open_clip.pt")
    )
    images = torch.randn(2, 3, 32, 32)
    clip.visual.output_tokens = True
    _, tokens = clip.visual(images)
    torch.testing.assert_close(model.vision.vit(images)[1], tokens)
    torch.testing.assert_close(model.decoder.lm_head.weight[: tok.n_base], hf.lm_head.weight)
    assert model.decoder.lm_head.weight[-1].abs().sum() == 0, "pad row of the output layer starts at zero"
    assert 0.5 < model.decoder.embed.special.std() < 2.0, "special rows start N(0, 1)"


def test_open_clip_names_give_the_published_shapes():
    from model.vision import vision_config_from_open_clip

    v = vision_config_from_open_clip("ViT-L-14")
    assert (v.width, v.layers, v.heads, v.patch_size, v.n_tokens) == (1024, 24, 16, 14, 256)
    cfg = NxTPConfig(v, DecoderConfig())
    with torch.device("meta"):
        model = NxTP(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1.70e9 < n < 1.80e9, f"{n / 1e9:.3f}B parameters, the paper says 1.78B"
    with pytest.raises(ValueError, match="not a ViT"):
        vision_config_from_open_clip("RN50")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=100, patch_size=14)
