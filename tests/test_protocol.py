"""``protocol="reference"`` reproduces the released code where this project differs (hand-built cases).

Masks are compared cell by cell with a transcription of the released mask code
(``tests/reference_nxtp.training_mask``); label extraction and scoring with the
released functions' rules on a few captions and predictions.
"""

from __future__ import annotations

import pytest
import torch

from model.prompt import PREFIX_ONLY, decoupled_label_mask, label_segments
from model.protocol import check_protocol
from tests import reference_nxtp

ARE, DELIM, PAD, EOS = 21, 9, 0, 2
N_IMAGE = 2


def _masks(ids: list[list[int]], answer: list[int], protocol: str) -> torch.Tensor:
    t = torch.tensor(ids)
    seg = label_segments(t, torch.tensor(answer), DELIM, protocol=protocol)
    return decoupled_label_mask(seg, N_IMAGE)


def _released(ids: list[list[int]]) -> torch.Tensor:
    full = torch.cat([torch.full((len(ids), N_IMAGE), PAD), torch.tensor(ids)], dim=1)
    return reference_nxtp.training_mask(full, N_IMAGE, answer_id=ARE, delimiter_id=DELIM) == 0


# text: <img> BOS The are | cat , big dog , sun moon EOS ; "are" at 3, labels cat / big dog / sun moon
ROW = [100, 1, 20, ARE, 30, DELIM, 31, 32, DELIM, 33, 34, EOS]
# a shorter sample padded: <img> BOS The are | cup , hat EOS pad pad pad pad
SHORT = [100, 1, 20, ARE, 40, DELIM, 41, EOS, PAD, PAD, PAD, PAD]
# a single label, no delimiter: <img> BOS The are | red sky EOS pad ...
SINGLE = [100, 1, 20, ARE, 50, 51, EOS, PAD, PAD, PAD, PAD, PAD]


def test_reference_mask_equals_the_released_code_cell_by_cell():
    ids = [ROW, SHORT, SINGLE]
    ours = _masks(ids, [3, 3, 3], "reference")
    assert torch.equal(ours, _released(ids))


def test_the_last_label_sees_only_the_prefix_in_the_reference_and_itself_here():
    ref = _masks([ROW], [3], "reference")[0, 0].int()
    own = _masks([ROW], [3], "nxtp")[0, 0].int()
    sun, moon, eos = (N_IMAGE + i for i in (9, 10, 11))
    prefix = list(range(N_IMAGE + 4))  # image, <img>, BOS, The, are
    # "moon" (second token of the last label): here it sees "sun"; in the reference only the prefix
    assert own[moon, sun] == 1 and ref[moon, sun] == 0
    assert ref[moon].nonzero().flatten().tolist() == prefix
    assert ref[sun].nonzero().flatten().tolist() == prefix  # not even itself
    assert own[sun].nonzero().flatten().tolist() == prefix + [sun]
    assert ref[eos].nonzero().flatten().tolist() == prefix
    # every other row is the same in both protocols
    differ = (ref != own).any(dim=1).nonzero().flatten().tolist()
    assert differ == [sun, moon, eos]


def test_a_single_label_sees_only_the_prefix_in_the_reference():
    seg = label_segments(torch.tensor([SINGLE]), torch.tensor([3]), DELIM, protocol="reference")
    assert seg.tolist() == [[-1, -1, -1, -1] + [PREFIX_ONLY] * 8]
    own = label_segments(torch.tensor([SINGLE]), torch.tensor([3]), DELIM)
    assert own.tolist() == [[-1, -1, -1, -1] + [0] * 8]


def test_reference_takes_the_answer_position_of_the_batchs_last_row():
    # prompt augmentation: the first row's template is one token longer ("are" at 4, not 3)
    long_row = [100, 1, 20, 22, ARE, 30, DELIM, 31, 32, DELIM, 33, EOS]
    ids = [long_row, ROW]
    ours = _masks(ids, [4, 3], "reference")
    assert torch.equal(ours, _released(ids))
    # the released code opens "are" of the long row (position 4) to its first label only
    are, second_label = N_IMAGE + 4, N_IMAGE + 7
    assert ours[0, 0, second_label, are].item() is False
    assert _masks(ids, [4, 3], "nxtp")[0, 0, second_label, are].item() is True


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="choose nxtp or reference"):
        check_protocol("paper")
    with pytest.raises(ValueError, match="unknown protocol"):
        label_segments(torch.tensor([ROW]), torch.tensor([3]), DELIM, protocol="released")


def test_the_loader_builds_the_protocols_segments(world):
    import random

    from model.prompt import training_text
    from model.tokenizer import Tokenizer
    from pipeline.loader import collate

    tok = Tokenizer(world.tokenizer)
    ids, targets, answer = training_text(["cat", "dog", "sun"], tok, random.Random(0), templates=("The objects in the image are",))
    example = {"image": torch.zeros(3, 4, 4), "ids": ids, "targets": targets, "answer": answer}
    own = collate([example], tok, {})["segments"][0]
    ref = collate([example], tok, {}, protocol="reference")["segments"][0]
    last = own > 1  # the third label (and EOS)
    assert last.any() and (ref[last] == PREFIX_ONLY).all()
    assert torch.equal(ref[~last], own[~last])


# ----------------------------------------------------------------------------- label extraction

CAPTIONS = [
    "A laptop on a desk in front of a stop sign",
    "Two persons with images of a dog/cat, today & tomorrow",
    "Stock photo: a birthday cake on TOP of a table\nA bounce house in the background",
    "an illustration of a topiary garden, 3 ounces of tea",
]


def test_reference_normalization_is_the_released_filter_input_text():
    from pipeline.nouns import normalize_reference

    for caption in CAPTIONS:
        assert normalize_reference(caption) == reference_nxtp.filter_input_text(caption)
    # by hand: the noise words go as substrings, in the released order ("persons" loses "person" first)
    assert normalize_reference(CAPTIONS[0]) == "a lap on a desk in of a s sign"
    assert normalize_reference(CAPTIONS[1]) == "two s with s of a dogcat to tomorrow"


def test_noise_words_the_reference_way_change_the_labels():
    from pipeline.nouns import NounExtractor, caption_lines

    own = NounExtractor("spacy")(CAPTIONS[:2])
    ref = NounExtractor("spacy", protocol="reference")(CAPTIONS[:2])
    assert "laptop" in own[0] and "stop" in own[0] and "lap" not in own[0]
    assert "lap" in ref[0] and "laptop" not in ref[0] and "stop" not in ref[0]
    assert {"dog", "cat"} <= set(own[1]) and "dogcat" not in own[1]
    assert "dogcat" in ref[1] and "dog" not in ref[1]
    # one text per caption in the reference (its COCO shards join the captions), lines here
    assert len(caption_lines(CAPTIONS[2])) == 2 and len(caption_lines(CAPTIONS[2], "reference")) == 1


def test_reference_keeps_a_lemma_twice_when_two_forms_give_it():
    from pipeline.nouns import NounExtractor

    caption = "a dog and two dogs on the beach"
    assert NounExtractor("spacy")([caption]) == [["dog", "beach"]]
    assert NounExtractor("spacy", protocol="reference")([caption]) == [["dog", "dog", "beach"]]


def test_the_labels_job_settings_carry_the_protocol():
    from pipeline.labels import LabelSettings, LabelShards

    table = LabelShards("unused", LabelSettings(protocol="reference")).label_table("s0", ["k0"], [CAPTIONS[0]])
    assert "lap" in table["labels"].to_pylist()[0]
    with pytest.raises(ValueError, match="unknown protocol"):
        LabelSettings(protocol="paper")
