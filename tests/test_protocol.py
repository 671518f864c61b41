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


# ----------------------------------------------------------------------------- scoring

TARGETS = [["dog", "grass"], ["tree"], ["cup", "cup", "table"]]
PREDICTIONS = [["dog", "", "dog", "cat", "sofa"], [], ["", "table", " cup"]]


@pytest.fixture(scope="module")
def minilm():
    from pipeline.scoring import SentenceEmbedder

    return SentenceEmbedder()


def test_reference_scoring_is_the_released_metric_with_blank_predictions(minilm):
    from pipeline.scoring import LabelScorer

    ks = [1, 2, 3, 10]
    s = LabelScorer([minilm], ks, protocol="reference")(TARGETS, PREDICTIONS)
    encode = lambda text: minilm([text])[0]  # noqa: E731
    for j, k in enumerate(ks):
        released = reference_nxtp.semantic_fscore(reference_nxtp.released_topk(PREDICTIONS, k), TARGETS, encode)
        for i, (r, p, f) in enumerate(released):
            assert s.recall[minilm.name][i, j] == pytest.approx(r, abs=1e-5)
            assert s.precision[minilm.name][i, j] == pytest.approx(p, abs=1e-5)
            assert s.f1[minilm.name][i, j] == pytest.approx(f, abs=1e-5)


def test_blank_predictions_count_in_the_reference_and_not_here(minilm):
    from pipeline.scoring import LabelScorer

    ref = LabelScorer([minilm], [2, 3], protocol="reference")(TARGETS, PREDICTIONS)
    own = LabelScorer([minilm], [2, 3])(TARGETS, PREDICTIONS)
    name = minilm.name
    # top-2 of sample 0: the reference scores ["dog", ""], this project ["dog", "cat"] (the blank and the repeat skipped)
    blank, cat = minilm(["", "cat"])
    dog, grass = minilm(["dog", "grass"])
    assert ref.precision[name][0, 0] == pytest.approx((1.0 + max(blank @ dog, blank @ grass).item()) / 2, abs=1e-5)
    assert own.precision[name][0, 0] == pytest.approx((1.0 + max(cat @ dog, cat @ grass).item()) / 2, abs=1e-5)
    # top-3 of sample 0: "dog" twice in the reference, so its precision averages 1.0 twice
    assert ref.precision[name][0, 1] == pytest.approx((2.0 + max(blank @ dog, blank @ grass).item()) / 3, abs=1e-5)
    # no prediction: one blank label in the reference (a nonzero figure), 0 here
    assert ref.recall[name][1, 0] == pytest.approx((blank @ minilm(["tree"])[0]).item(), abs=1e-5)
    assert own.recall[name][1, 0] == 0.0 and own.f1[name][1, 0] == 0.0
    # exact scores on the same top-k: the reference's top-2 of sample 2 holds one real label
    assert ref.exact_precision[2, 0] == 1.0 and ref.exact_recall[2, 0] == pytest.approx(1 / 2)
    assert own.exact_recall[2, 0] == 1.0


def test_a_blank_only_target_is_scored_in_the_reference(minilm):
    from pipeline.scoring import LabelScorer

    s = LabelScorer([minilm], [5], protocol="reference")([[]], [["cup"]])
    assert s.recall[minilm.name][0, 0] == pytest.approx((minilm([""])[0] @ minilm(["cup"])[0]).item(), abs=1e-5)
    assert s.exact_recall[0, 0] == 0.0
    with pytest.raises(ValueError, match="no target"):
        LabelScorer([minilm], [5])([[]], [["cup"]])


def test_the_evaluation_scorer_stage_applies_the_protocol(minilm):
    import pyarrow as pa

    from pipeline.evaluation import PREDICTED, Score

    batch = pa.table(
        {
            "key": ["a", "b"],
            "shard": ["s", "s"],
            "targets": [["dog", "grass"], ["tree"]],
            "error": [None, None],
            "predictions": [["dog", "", "dog"], []],
            "probabilities": [[0.5, 0.2, 0.1], []],
            "classes": [[], []],
            "references": [[], []],
            "caption": [None, None],
        },
        schema=PREDICTED,
    )
    ref = Score([3], protocol="reference")(batch).column("precision_at").to_pylist()
    own = Score([3])(batch).column("precision_at").to_pylist()
    expected = reference_nxtp.semantic_fscore(
        reference_nxtp.released_topk([["dog", "", "dog"], []], 3), [["dog", "grass"], ["tree"]], lambda t: minilm([t])[0]
    )
    assert [row[0] for row in ref] == pytest.approx([p for _, p, _ in expected], abs=1e-5)
    assert own[0] == pytest.approx([1.0], abs=1e-5) and own[1] == [0.0]


@pytest.mark.parametrize("job", ["train", "labels", "evaluate"])
def test_each_job_takes_protocol_reference(job, tmp_path):
    from jobs import evaluate, labels, train
    from jobs._cli import parse

    for name in ("shards", "labels"):
        (tmp_path / name).mkdir()
    (tmp_path / "tokenizer.model").write_bytes(b"")
    argv = {
        "train": ["--deepspeed", "jobs/configs/zero2.json", "--run-dir", "runs/x", "--data", f"d={tmp_path}/shards,{tmp_path}/labels", "--tokenizer", f"{tmp_path}/tokenizer.model", "--steps", "1"],
        "labels": ["--shards", "s", "--output", "o"],
        "evaluate": ["--checkpoint", "c", "--shards", "s", "--labels", "l", "--output", "o"],
    }[job]
    cls = {"train": train.TrainConfig, "labels": labels.LabelsConfig, "evaluate": evaluate.EvaluateConfig}[job]
    assert parse(cls, argv + ["--protocol", "reference"], prog=job, description=None).protocol == "reference"
    assert parse(cls, argv, prog=job, description=None).protocol == "nxtp"
