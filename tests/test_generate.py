"""Caption generation (model/generate.py): the cache against recompute, beam search against brute force."""

from __future__ import annotations

import pytest
import torch

from model.config import CAPTION_PROMPT
from model.generate import beam_search, generate, greedy_search, log_probs
from model.prompt import prefix_mask
from tests.test_model import _tiny_model


@pytest.fixture(scope="module")
def model(tok):
    """A random tiny model whose EOS row reads a constant feature: some captions end early, others run to max_length."""
    m = _tiny_model(tok)
    with torch.no_grad():
        m.decoder.lm_head.weight[tok.eos_id, 0] = 0.4
    return m


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _banned(tok):
    return (tok.bos_id, tok.image_id, tok.pad_id)


def _sequence_log_prob(model, tok, image: torch.Tensor, tokens: list[int], ended: bool) -> float:
    """The log-probability of ``tokens`` (+ EOS when ``ended``) after the caption prompt, from one full forward."""
    prompt = tok.prompt_ids(CAPTION_PROMPT)
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        image_tokens = model.vision(image[None])
        h = torch.cat([image_tokens, model.decoder.embed(ids)], dim=1)
        hidden, _ = model.decoder(h, prefix_mask(model.n_image_tokens, ids.shape[1]))
        logp = log_probs(model.decoder.lm_head(hidden[0, model.n_image_tokens + len(prompt) - 1 :]), _banned(tok))
    targets = tokens + ([tok.eos_id] if ended else [])
    return float(sum(logp[i, t] for i, t in enumerate(targets)))


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_generation_equals_recompute(model, tok, beams):
    images = _images(4)
    cached = generate(model, images, tok, max_length=8, beams=beams)
    recomputed = generate(model, images, tok, max_length=8, beams=beams, use_cache=False)
    for a, b in zip(cached, recomputed):
        assert a.tokens == b.tokens and a.ended == b.ended and a.text == b.text
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)
    assert {c.ended for c in cached} == {True, False}, "both ended and cut captions are covered"
    assert all(len(c.tokens) <= 8 for c in cached) and all(len(c.tokens) == 8 for c in cached if not c.ended)


@pytest.mark.parametrize("beams", [1, 4])
def test_reported_log_prob_is_the_models(model, tok, beams):
    images = _images(3, seed=2)
    for image, caption in zip(images, generate(model, images, tok, max_length=6, beams=beams)):
        assert caption.log_prob == pytest.approx(_sequence_log_prob(model, tok, image, caption.tokens, caption.ended), abs=1e-4)
        assert not set(caption.tokens) & set(_banned(tok)), "BOS and the special tokens are never written"


def test_one_beam_without_length_penalty_is_greedy(model, tok):
    images = _images(5, seed=3)
    prompt = tok.prompt_ids(CAPTION_PROMPT)
    tokens, total, lengths, ended = greedy_search(model, images, prompt, tok.eos_id, 7, _banned(tok))
    beam = beam_search(model, images, prompt, tok.eos_id, 7, beams=1, length_penalty=0.0, banned=_banned(tok))
    for b, h in enumerate(beam):
        assert h.tokens == tokens[b, : lengths[b]].tolist() and h.ended == bool(ended[b])
        assert h.log_prob == pytest.approx(float(total[b]), abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_full_width_beam_search_finds_the_best_two_token_caption(model, tok, length_penalty):
    """With as many beams as tokens, two steps of beam search are exhaustive: compare with brute force."""
    image = _images(1, seed=4)
    prompt = tok.prompt_ids(CAPTION_PROMPT)
    banned = _banned(tok)
    (found,) = beam_search(model, image, prompt, tok.eos_id, 2, beams=model.decoder.lm_head.out_features, length_penalty=length_penalty, banned=banned)
    with torch.no_grad():
        first = log_probs(model.prefill(image, torch.tensor([prompt]))[0], banned)[0]  # [V]
        allowed = [v for v in range(first.shape[0]) if v not in banned and v != tok.eos_id]
        ids = torch.tensor([prompt + [v] for v in allowed])
        image_tokens = model.vision(image).expand(len(allowed), -1, -1)
        h = torch.cat([image_tokens, model.decoder.embed(ids)], dim=1)
        hidden, _ = model.decoder(h, prefix_mask(model.n_image_tokens, ids.shape[1]))
        second = log_probs(model.decoder.lm_head(hidden[:, -1]), banned)  # [len(allowed), V]
    options = [(float(first[tok.eos_id]) / 1**length_penalty, [], True)]  # EOS at once
    totals = first[allowed][:, None] + second  # [A, V]: two tokens, the second may be EOS (ended) or not (cut)
    best = int(totals.argmax())
    a, v = divmod(best, totals.shape[1])
    options.append((float(totals.max()) / 2**length_penalty, [allowed[a]] + ([] if v == tok.eos_id else [v]), v == tok.eos_id))
    score, tokens, ended = max(options, key=lambda o: o[0])
    assert found.tokens == tokens and found.ended == ended
    assert found.score == pytest.approx(score, abs=1e-4)


def test_too_long_a_caption_is_refused(model, tok):
    with pytest.raises(ValueError, match="exceed the model's max_seq_len"):
        generate(model, _images(1), tok, max_length=model.cfg.decoder.max_seq_len)
