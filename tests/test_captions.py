"""Caption scores (pipeline/captions.py): COCO's normalization, pycocoevalcap's CIDEr-D and BLEU, hand-built cases."""

from __future__ import annotations

import pytest

from pipeline.captions import references_of, score_captions, tokenize


def test_references_are_the_label_tables_caption_lines():
    assert references_of("a cup on the table\n  \nA red star in the sky \n") == ["a cup on the table", "A red star in the sky"]
    assert references_of(None) == [] and references_of("") == []


def test_tokenization_is_lowercase_treebank_without_punctuation():
    assert tokenize("A man's dog (brown),  isn't HERE.") == "a man 's dog brown is n't here"
    assert tokenize("...!?") == ""


def test_a_caption_equal_to_its_references_beats_a_partial_one_which_beats_a_wrong_one():
    refs = [
        ["a black cup on the table", "a cup on a wooden table"],
        ["a white star in the sky", "one star high in the sky"],
        ["two black fish in the water", "fish floating on calm water"],
        ["a leaf on the grass", "a green leaf in tall grass"],
    ]
    exact = score_captions([r[0] for r in refs], refs)
    partial = score_captions(["a cup", "a star", "a fish", "a leaf"], refs)
    wrong = score_captions(["house house house"] * 4, refs)
    assert exact.cider > partial.cider > wrong.cider == 0.0
    assert exact.bleu[3] == pytest.approx(1.0) and wrong.bleu[0] == pytest.approx(0.0, abs=1e-6)
    assert exact.sample_bleu4.tolist() == pytest.approx([1.0] * 4)
    assert exact.sample_cider.mean() == pytest.approx(exact.cider)
    # case and punctuation do not count, as in COCO's evaluation
    shouting = score_captions([r[0].upper() + "." for r in refs], refs)
    assert shouting.cider == pytest.approx(exact.cider) and shouting.bleu == pytest.approx(exact.bleu)


def test_cider_uses_the_sets_own_document_frequencies():
    """An n-gram every image's references hold (here "in the") weighs nothing: only the distinctive words score."""
    refs = [["a cup in the water"], ["a star in the sky"], ["a fish in the sand"]]
    common = score_captions(["in the", "in the", "in the"], refs)
    distinctive = score_captions(["cup water", "star sky", "fish sand"], refs)
    assert common.cider == pytest.approx(0.0) and distinctive.cider > 0.5


def test_inputs_that_cannot_be_scored_are_refused():
    with pytest.raises(ValueError, match="no caption to score"):
        score_captions([], [])
    with pytest.raises(ValueError, match="caption 1 has no reference"):
        score_captions(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 captions but 1 reference lists"):
        score_captions(["a", "b"], [["a"]])
