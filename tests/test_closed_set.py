"""Closed-set evaluation on hand-built cases: class lists as real files write them, mapping, accuracy, confusion."""

from __future__ import annotations

import json

import pytest

from pipeline.closed_set import (
    ClassList,
    ClassMapper,
    class_values,
    confusion_pairs,
    parse_class_list,
    rank_classes,
    read_class_list,
    resolve_targets,
    score_sample,
)
from pipeline.scoring import CachedEmbedder, SentenceEmbedder

EXPECTED = (("tench", "Tinca tinca"), ("goldfish", "Carassius auratus"), ("crane",), ("tabby", "tabby cat"), ("crane",))

LAYOUTS = {
    "plain": "tench, Tinca tinca\ngoldfish, Carassius auratus\ncrane\ntabby, tabby cat\ncrane\n",
    # the reference implementation's in1k_label.name, with a BOM, CRLF and blank lines
    "index prefix": "\ufeff0: tench, Tinca tinca\r\n1: goldfish, Carassius auratus\r\n\r\n2: crane\r\n3: tabby, tabby cat\r\n4: crane\r\n\r\n",
    "index prefix out of order": "3: tabby, tabby cat\n0: tench, Tinca tinca\n4: crane\n1: goldfish, Carassius auratus\n2: crane\n",
    "tab separated index": "0\ttench, Tinca tinca\n1\tgoldfish, Carassius auratus\n2\tcrane\n3\ttabby, tabby cat\n4\tcrane\n",
    "wordnet ids": "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn02012849 crane\nn02123045 tabby, tabby cat\nn03126707 crane\n",
    "quoted with comments": '# ImageNet-like\n"tench, Tinca tinca",\n"goldfish, Carassius auratus",\n\'crane\',\n"tabby, tabby cat",\n"crane"\n',
    "python dict literal": "{0: 'tench, Tinca tinca',\n 1: 'goldfish, Carassius auratus',\n 2: 'crane',\n 3: 'tabby, tabby cat',\n 4: 'crane'}\n",
    "imagenet_class_index.json": json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"], "2": ["n02012849", "crane"], "3": ["n02123045", "tabby"], "4": ["n03126707", "crane"]}),
    "json list": json.dumps(["tench, Tinca tinca", "goldfish, Carassius auratus", "crane", "tabby, tabby cat", "crane"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_class_lists_in_the_usual_layouts(tmp_path, layout):
    path = tmp_path / "classes.txt"
    path.write_bytes(LAYOUTS[layout].encode("utf-8"))
    classes = read_class_list(str(path))
    if layout == "imagenet_class_index.json":  # that file holds one name per class
        assert classes.synonyms == tuple(names[:1] for names in EXPECTED)
    else:
        assert classes.synonyms == EXPECTED
    assert classes.names == ["tench", "goldfish", "crane", "tabby", "crane"]
    assert classes.resolve("Tinca  tinca" if layout != "imagenet_class_index.json" else "TENCH") == 0
    assert classes.resolve("3") == 3 and classes.resolve("crane") == 2  # a shared name goes to the first class
    assert classes.shared_synonyms == ["crane"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no class"),
        ("\n  \n# only a comment\n", "no class"),
        ("0: tench\ngoldfish\n", ":2: some lines start with a class index"),
        ("0: tench\n0: goldfish\n", ":2: class index 0 is repeated"),
        ("0: tench\n2: goldfish\n", ":2: class index 2 is repeated or past 0..1"),
        ("tench\n , ,\n", ":2: no class name"),
        ('{"a": "tench"}', "keys of a class mapping must be class indices"),
        ("[1, 2", "parses as neither"),
    ],
)
def test_bad_class_lists_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_class_list(text, "bad.txt")


def test_a_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes(b"\xff\xfe\x00t\x00e")
    with pytest.raises(ValueError, match="classes.txt: not UTF-8 text"):
        read_class_list(str(path))


def test_sample_class_values_and_their_resolution():
    classes = ClassList((("cat", "kitty"), ("dog",), ("car", "automobile")), "pets.txt")
    assert class_values(None) == [] and class_values("  ") == []
    assert class_values("Dog") == ["Dog"] and class_values(2) == ["2"] and class_values(1.0) == ["1"]
    assert class_values(["cat", 2, None]) == ["cat", "2"]
    assert resolve_targets(["Kitty", "2"], classes) == ([0, 2], None)
    assert resolve_targets([], classes) == (None, "no_class: the sample's data names no class")
    ids, error = resolve_targets(["cat", "horse"], classes)
    assert ids is None and error == "unknown_class: 'horse' is not a class of pets.txt"
    assert resolve_targets(["7"], classes)[1] == "unknown_class: class index 7 is past the list's 3 classes"


def test_ranking_sums_the_probabilities_of_a_class_and_keeps_ties_in_label_order():
    assert rank_classes([2, 0, 2, 1, 3], [0.3, 0.4, 0.2, 0.05, 0.05]) == ([2, 0, 1, 3], pytest.approx([0.5, 0.4, 0.05, 0.05]))
    assert rank_classes(list(range(7)), [0.1] * 7)[0] == [0, 1, 2, 3, 4]
    assert rank_classes([], []) == ([], [])


@pytest.fixture(scope="module")
def mapper():
    classes = parse_class_list("0: tench, Tinca tinca\n1: goldfish\n2: tabby, tabby cat\n3: sports car, sport car\n4: golden retriever\n5: banana\n", "mini.txt")
    return ClassMapper(classes, CachedEmbedder(SentenceEmbedder()))


def test_exact_synonyms_first_then_the_nearest_class_by_the_sentence_model(mapper):
    ids, sims = mapper.map_labels(["Tabby Cat", "goldfish", "kitten", "automobile", "puppy", "fruit"])
    assert ids == [2, 1, 2, 3, 4, 5]
    assert sims[:2] == [1.0, 1.0] and all(0.3 < s < 1.0 for s in sims[2:])
    # an exact match wins even where another class's synonym lies nearer in the embedding
    ids, _ = mapper.map_labels(["banana"])
    assert ids == [5]


def test_top1_top5_per_k_and_the_confusion_pairs(mapper):
    # labels most probable first: the dog's words, then fruit; a cat picture with a car in it
    got = score_sample(mapper, ["puppy", "banana", "kitten", "car"], [0.4, 0.3, 0.2, 0.1], targets=[2], ks=[1, 3, 4])
    assert got.label_classes == [4, 5, 2, 3]
    assert got.top1 == [0.0, 0.0, 0.0] and got.top5 == [0.0, 1.0, 1.0]
    assert got.top1_class == [4, 4, 4] and got.ranked == [4, 5, 2, 3]
    multi = score_sample(mapper, ["kitten", "tabby"], [0.6, 0.3], targets=[2, 3], ks=[1, 2])
    assert multi.top1 == [1.0, 1.0] and multi.ranked == [2] and multi.ranked_scores == pytest.approx([0.9])
    nothing = score_sample(mapper, [], [], targets=[0], ks=[5])
    assert nothing.top1 == [0.0] and nothing.top5 == [0.0] and nothing.top1_class == [-1]
    pairs = confusion_pairs([[2], [2], [2, 3], [0], [1]], [4, 4, 5, 0, -1])
    assert pairs == {(2, 4): 2, (2, 5): 1, (3, 5): 1}


def test_blank_and_repeated_labels_are_cut_as_recall_counts_them(mapper):
    """A blank label is no class; with the nxtp protocol blanks are skipped and case repeats merged before
    the top-k is cut (as R / P / F1 do); the reference protocol keeps the labels as made."""
    ids, sims = mapper.map_labels(["", "  ", "tabby"])
    assert ids == [-1, -1, 2] and sims == [None, None, 1.0]
    got = score_sample(mapper, ["", "tabby", "banana"], [0.6, 0.3, 0.1], targets=[2], ks=[1])
    assert got.top1 == [1.0] and got.top1_class == [2], "the blank took no top-1 slot and no class"
    repeat = score_sample(mapper, ["Banana", "banana ", "tabby", "goldfish"], [0.3, 0.2, 0.4, 0.1], targets=[1], ks=[2])
    assert repeat.ranked == [5, 2] and repeat.ranked_scores == pytest.approx([0.5, 0.4]), "the repeat merged, tabby still in the top-2"
    assert repeat.top5 == [0.0] and score_sample(mapper, ["Banana", "banana ", "tabby", "goldfish"], [0.3, 0.2, 0.4, 0.1], [1], [3]).top5 == [1.0]
    raw = score_sample(mapper, ["", "tabby", "banana"], [0.6, 0.3, 0.1], targets=[2], ks=[1], protocol="reference")
    assert raw.top1 == [0.0] and raw.top1_class == [-1], "reference: the blank used the one slot"
    assert rank_classes([-1, 3], [0.9, 0.1]) == ([3], pytest.approx([0.1]))
