"""The benchmarks' stand-in for LLaMA-2's tokenizer: its size, and the synthetic tokenizer's encoding kept."""

from __future__ import annotations

from benchmarks.stand_in_tokenizer import build
from model.tokenizer import Tokenizer


def test_padded_to_the_asked_size_and_encodes_as_before(tmp_path, world):
    out = build(str(tmp_path / "t.model"), pieces=4000, base=world.tokenizer)
    padded, base = Tokenizer(out), Tokenizer(world.tokenizer)
    assert padded.n_base == 4000 > base.n_base
    assert (padded.bos_id, padded.eos_id, padded.delimiter_id) == (base.bos_id, base.eos_id, base.delimiter_id)
    for text in ("The objects in the image are a dog, frisbee, grass", "a red kite over a beach", "Zebra 42 ünïcödé"):
        assert padded.encode(text) == base.encode(text)
        assert max(padded.encode(text)) < base.n_base  # the padding pieces are never produced
