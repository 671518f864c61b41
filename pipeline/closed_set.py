"""Closed-set evaluation (the paper's ImageNet experiments): open-ended labels mapped to a class list.

A class list is a text file with one class per line, its synonyms comma-separated, as the
usual ImageNet lists write it. :func:`parse_class_list` reads the common layouts:

    tench, Tinca tinca                      plain (the class index is the line's rank)
    0: tench, Tinca tinca                   an index prefix (the reference implementation's in1k_label.name)
    n01440764 tench, Tinca tinca            a WordNet id prefix (LOC_synset_mapping.txt)
    {0: 'tench, Tinca tinca',               a Python dict literal (the widespread imagenet1000_clsidx_to_labels.txt)
    {"0": ["n01440764", "tench"], ...}      JSON: imagenet_class_index.json, a list of names, or index -> name(s)

with or without a byte-order mark, CRLF line ends, blank lines, ``#`` comments, quotes
around names or a trailing comma. Indices, when given, must number the classes 0..N-1
(in any order). The first synonym is the class's name in reports.

Mapping (:class:`ClassMapper`). Each predicted label goes to one class: the class one of
whose synonyms it equals (case, surrounding space, ``_`` vs space ignored; a synonym that
several classes share, like ImageNet's two "crane"s, goes to the first), else the class
of the synonym nearest to it under the evaluation's sentence-embedding model (cosine of
normalized embeddings). An image's classes are ranked by the summed probability of the
labels mapped to them (ties: the class of the more probable label first), as one-shot
sampling merges identical labels.

Accuracy. An image's class (or classes) comes from its data: a class name (any synonym)
or a 0-based index into the list; several of them make a multi-label image, correct when
the predicted class is any of them (as ImageNet-ReaL scores). Top-1 is correct when the
best-ranked class is one of the image's, top-5 when one of the first five is; an image
with no predicted label is wrong. The confusion table counts, for each wrong top-1, the
pair (true class, predicted class), once for each of the image's classes.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.scoring import label_key

NO_CLASS = "no_class"  # the sample's data names no class: predicted, not scored for accuracy
UNKNOWN_CLASS = "unknown_class"  # the sample's class is not in the class list
TOP = 5  # classes kept per image (top-5 accuracy)


def normalize(name: str) -> str:
    """The form synonyms are compared in: lowercase, ``_`` as a space, whitespace collapsed."""
    return " ".join(name.replace("_", " ").lower().split())


@dataclass(frozen=True)
class ClassList:
    """Classes in index order, each a tuple of its synonyms (the first is its name)."""

    synonyms: tuple[tuple[str, ...], ...]
    source: str = ""  # where it was read from (a file name), for messages
    lookup: dict[str, int] = field(init=False, repr=False, compare=False)  # normalized synonym -> first class

    def __post_init__(self):
        if not self.synonyms:
            raise ValueError(f"{self.source or 'class list'}: no class")
        lookup: dict[str, int] = {}
        for i, names in enumerate(self.synonyms):
            if not names:
                raise ValueError(f"{self.source or 'class list'}: class {i} has no name")
            for name in names:
                lookup.setdefault(normalize(name), i)
        object.__setattr__(self, "lookup", lookup)

    def __len__(self) -> int:
        return len(self.synonyms)

    @property
    def names(self) -> list[str]:
        return [names[0] for names in self.synonyms]

    @property
    def shared_synonyms(self) -> list[str]:
        """Synonyms that name more than one class (they map to the first)."""
        seen: dict[str, set[int]] = {}
        for i, names in enumerate(self.synonyms):
            for name in names:
                seen.setdefault(normalize(name), set()).add(i)
        return sorted(name for name, classes in seen.items() if len(classes) > 1)

    def resolve(self, value: str) -> int:
        """The class a sample's value names: an index (``"17"``) or a synonym; ``KeyError`` when neither."""
        text = str(value).strip()
        if re.fullmatch(r"\d+", text):
            index = int(text)
            if index < len(self):
                return index
            raise KeyError(f"class index {index} is past the list's {len(self)} classes")
        found = self.lookup.get(normalize(text))
        if found is None:
            raise KeyError(f"{text!r} is not a class of {self.source or 'the class list'}")
        return found


# ----------------------------------------------------------------------------- reading a class list

_INDEXED = re.compile(r"^(\d+)\s*[:\t=]\s*(.*)$|^(\d+)\s+(\D.*)$")
_WNID = re.compile(r"^n\d{8}[\s,:]+")


def _synonyms(text: str) -> tuple[str, ...]:
    return tuple(s for s in (part.strip().strip("'\"").strip() for part in text.split(",")) if s)


def _strip_quotes(text: str) -> str:
    text = text.strip().rstrip(",").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def _from_structure(data, source: str) -> ClassList:
    """A JSON / Python literal: a list of names, or a mapping index -> name, names or [wnid, name]."""

    def names(value) -> tuple[str, ...]:
        if isinstance(value, str):
            return _synonyms(_WNID.sub("", value))
        if isinstance(value, (list, tuple)):
            parts = [v for v in value if isinstance(v, str)]
            if len(parts) == 2 and re.fullmatch(r"n\d{8}", parts[0]):  # imagenet_class_index.json: [wnid, name]
                parts = parts[1:]
            return tuple(s for p in parts for s in _synonyms(p))
        raise ValueError(f"{source}: a class is {type(value).__name__} {value!r}, not a name or a list of names")

    if isinstance(data, dict):
        try:
            indexed = {int(k): v for k, v in data.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{source}: the keys of a class mapping must be class indices, e.g. {{\"0\": \"tench\"}}") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise ValueError(f"{source}: the class indices must be 0..{len(indexed) - 1}, each once")
        return ClassList(tuple(names(indexed[i]) for i in range(len(indexed))), source)
    if isinstance(data, list):
        return ClassList(tuple(names(v) for v in data), source)
    raise ValueError(f"{source}: expected a list of class names or a mapping index -> name")


def parse_class_list(text: str, source: str = "class list") -> ClassList:
    """A :class:`ClassList` from a file's text; ``ValueError`` naming the line that cannot be read."""
    text = text.lstrip("\ufeff")
    head = text.lstrip()
    if head.startswith(("{", "[")):
        for load in (json.loads, ast.literal_eval):
            try:
                data = load(head)
                break
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
        else:
            raise ValueError(f"{source}: starts like JSON or a Python literal but parses as neither")
        return _from_structure(data, source)
    rows: list[tuple[int | None, tuple[str, ...], int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        index = None
        match = _INDEXED.match(line)
        if match:
            index, line = int(match.group(1) or match.group(3)), match.group(2) if match.group(1) else match.group(4)
        line = _WNID.sub("", _strip_quotes(line))
        names = _synonyms(line)
        if not names:
            raise ValueError(f"{source}:{number}: no class name in {raw.strip()!r}")
        rows.append((index, names, number))
    if not rows:
        raise ValueError(f"{source}: no class (the file is empty)")
    indexed = [r for r in rows if r[0] is not None]
    if indexed and len(indexed) != len(rows):
        line = next(r[2] for r in rows if r[0] is None)
        raise ValueError(f"{source}:{line}: some lines start with a class index and this one does not")
    if indexed:
        by_index: dict[int, tuple[str, ...]] = {}
        for index, names, number in rows:
            if index in by_index or index >= len(rows):
                raise ValueError(f"{source}:{number}: class index {index} is repeated or past 0..{len(rows) - 1}")
            by_index[index] = names
        return ClassList(tuple(by_index[i] for i in range(len(rows))), source)
    return ClassList(tuple(names for _, names, _ in rows), source)


def read_class_list(path: str) -> ClassList:
    """The class list in the file ``path`` (UTF-8, see :func:`parse_class_list`)."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    return parse_class_list(text, os.path.basename(path.rstrip("/")) or path)


def class_values(value) -> list[str]:
    """A sample's class data (a name, an index, a list of them, or nothing) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [v for item in value for v in class_values(item)]
    if isinstance(value, bool):
        raise ValueError(f"a class is a name or an index, not {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return [text] if text else []


# ----------------------------------------------------------------------------- mapping and scoring


class ClassMapper:
    """Maps predicted labels to classes (exact synonym, else nearest synonym by ``embedder``).

    ``embedder`` is a :class:`pipeline.scoring.CachedEmbedder` (``lookup(texts) -> {text: unit vector}``),
    so that labels embedded for R / P / F1 are not embedded again.
    """

    def __init__(self, classes: ClassList, embedder):
        self.classes = classes
        self.embedder = embedder
        texts = [name for names in classes.synonyms for name in names]
        self.synonym_class = np.array([i for i, names in enumerate(classes.synonyms) for _ in names])
        vectors = embedder.lookup(texts)
        self.synonym_vectors = torch.stack([vectors[t] for t in texts])  # [S, D]

    def map_labels(self, labels: Sequence[str]) -> tuple[list[int], list[float | None]]:
        """(class, similarity) of each label; similarity 1.0 for an exact synonym, else the cosine to the nearest synonym.

        A blank label (one-shot sampling makes one when the delimiter is among the first tokens)
        is no label: class -1, similarity None.
        """
        ids: list[int] = [-1] * len(labels)
        sims: list[float | None] = [1.0] * len(labels)
        rest = []
        for i, label in enumerate(labels):
            if not (label or "").strip():
                sims[i] = None
                continue
            found = self.classes.lookup.get(normalize(label))
            if found is None:
                rest.append(i)
            else:
                ids[i] = found
        if rest:
            vectors = self.embedder.lookup([labels[i] for i in rest])
            cosine = torch.stack([vectors[labels[i]] for i in rest]) @ self.synonym_vectors.T  # [R, S]
            best = cosine.max(dim=1)
            for row, i in enumerate(rest):
                ids[i] = int(self.synonym_class[int(best.indices[row])])
                sims[i] = float(best.values[row])
        return ids, sims


def rank_classes(label_classes: Sequence[int], probabilities: Sequence[float], top: int = TOP) -> tuple[list[int], list[float]]:
    """(classes, scores) best first, at most ``top``: each class scores the summed probability of its labels
    (a label of class -1, a blank one, scores none)."""
    scores: dict[int, float] = {}
    for c, p in zip(label_classes, probabilities):
        if c >= 0:
            scores[c] = scores.get(c, 0.0) + float(p)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])  # stable: equal scores keep the order labels came in
    return [c for c, _ in ranked[:top]], [s for _, s in ranked[:top]]


def resolve_targets(values: Iterable[str], classes: ClassList) -> tuple[list[int] | None, str | None]:
    """(class ids, None) of a sample's class values, or (None, error) when it has none or names an unknown class."""
    values = list(values)
    if not values:
        return None, f"{NO_CLASS}: the sample's data names no class"
    ids = []
    for value in values:
        try:
            ids.append(classes.resolve(value))
        except KeyError as err:
            return None, f"{UNKNOWN_CLASS}: {err.args[0]}"
    return sorted(set(ids)), None


@dataclass
class SampleAccuracy:
    """One sample's closed-set result at each k (the first k predicted labels)."""

    label_classes: list[int]  # class of each predicted label (all of them)
    label_similarity: list[float]
    ranked: list[int]  # classes at the largest k, best first (at most TOP)
    ranked_scores: list[float]
    top1: list[float]  # per k: 1.0 correct, 0.0 wrong
    top5: list[float]
    top1_class: list[int]  # per k: the best class, -1 when no label was predicted


def top_k_labels(predictions: Sequence[str], probabilities: Sequence[float], protocol: str = "nxtp") -> tuple[list[int], list[float]]:
    """(index into ``predictions``, probability) of the labels a top-k is cut from, most probable first.

    As R / P / F1 count them (``pipeline.scoring.clean_labels``): with the ``nxtp`` protocol,
    blank labels are skipped and repeats (case and spacing aside) merged into their first,
    probabilities summed, before the top-k is cut; with ``reference``, every label as made.
    """
    if protocol == "reference":
        return list(range(len(predictions))), [float(p) for p in probabilities]
    first: dict[str, int] = {}
    order: list[int] = []
    merged: list[float] = []
    for i, (label, p) in enumerate(zip(predictions, probabilities)):
        key = label_key(label)
        if not key:
            continue
        if key in first:
            merged[first[key]] += float(p)
        else:
            first[key] = len(order)
            order.append(i)
            merged.append(float(p))
    return order, merged


def score_sample(mapper: ClassMapper, predictions: Sequence[str], probabilities: Sequence[float], targets: Sequence[int], ks: Sequence[int],
                 protocol: str = "nxtp") -> SampleAccuracy:  # fmt: skip
    """Top-1 / top-5 correctness of one sample at each k, from its labels (most probable first), each k's
    labels cut as ``top_k_labels`` gives them for ``protocol``."""
    label_classes, sims = mapper.map_labels(list(predictions)) if predictions else ([], [])
    order, merged = top_k_labels(list(predictions), list(probabilities), protocol)
    wanted = set(targets)
    top1, top5, top1_class = [], [], []
    ranked, scores = [], []
    for k in sorted(set(ks)):
        ranked, scores = rank_classes([label_classes[i] for i in order[:k]], merged[:k])
        top1.append(float(bool(ranked) and ranked[0] in wanted))
        top5.append(float(bool(wanted.intersection(ranked[:TOP]))))
        top1_class.append(ranked[0] if ranked else -1)
    return SampleAccuracy(label_classes, sims, ranked, scores, top1, top5, top1_class)


def confusion_pairs(targets: Sequence[Sequence[int]], top1_class: Sequence[int]) -> dict[tuple[int, int], int]:
    """(true class, predicted class) -> samples whose top-1 was that wrong class, over samples scored for accuracy."""
    pairs: dict[tuple[int, int], int] = {}
    for wanted, predicted in zip(targets, top1_class):
        if predicted < 0 or predicted in wanted:
            continue
        for t in wanted:
            pairs[(t, predicted)] = pairs.get((t, predicted), 0) + 1
    return pairs
