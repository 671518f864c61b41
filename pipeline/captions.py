"""Caption scores: CIDEr-D and BLEU-1..4 of generated captions against their references, as COCO scores them.

The scorers are pycocoevalcap's (the COCO caption evaluation code; its ``Cider`` is
CIDEr-D: n-grams 1-4, tf-idf weights, clipped counts, a Gaussian length penalty with
sigma 6, times 10; its ``Bleu`` is BLEU-1..4 with the closest reference length). Both are
pure Python; Java is only needed by pycocoevalcap's tokenizer, METEOR and SPICE, which
are not used.

Tokenization. COCO lowercases every caption, tokenizes it with Stanford's PTBTokenizer
(Java) and drops punctuation tokens. Here: NLTK's ``TreebankWordTokenizer`` (the same
Penn Treebank rules, pure Python) on the lowercased text, dropping every token without a
letter or digit. The two tokenizers can disagree on rare constructions (quotes,
brackets), so a figure may differ slightly from the COCO server's on such text.

CIDEr-D's document frequencies are computed over the references of the evaluated set
itself (pycocoevalcap's rule): compare CIDEr figures only between runs on the same set.
A corpus of one image scores CIDEr 0 by construction (every n-gram's idf is 0).

References. COCO carries several captions per image; ingestion writes them ``"\\n"``-joined
into the shard's txt and json, and the labels stage copies that text into the label
table's ``caption`` column, which is where the evaluation reads them
(:func:`references_of`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NO_REFERENCES = "no_references"  # the label table has no caption for the sample: captioned, not scored


def references_of(caption: str | None) -> list[str]:
    """The reference captions in a label table's ``caption`` value (``"\\n"``-joined), blank ones dropped."""
    return [line.strip() for line in (caption or "").split("\n") if line.strip()]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize(text: str) -> str:
    """COCO's normalization: lowercase Penn Treebank tokens, punctuation dropped, joined by single spaces."""
    tokens = _tokenizer().tokenize(" ".join(text.lower().split()))
    return " ".join(t for t in tokens if any(c.isalnum() for c in t))


@dataclass
class CaptionScores:
    """Corpus figures and per-sample ones (in the order the captions were given)."""

    cider: float
    bleu: list[float]  # BLEU-1..4 of the corpus
    sample_cider: np.ndarray  # [N]
    sample_bleu4: np.ndarray  # [N]


def score_captions(captions: Sequence[str], references: Sequence[Sequence[str]]) -> CaptionScores:
    """CIDEr-D and BLEU of ``captions[i]`` against ``references[i]`` (each at least one caption)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
    if not captions:
        raise ValueError("no caption to score")
    res, gts = {}, {}
    for i, (caption, refs) in enumerate(zip(captions, references)):
        refs = [tokenize(r) for r in refs]
        if not refs:
            raise ValueError(f"caption {i} has no reference")
        res[i], gts[i] = [tokenize(caption)], refs
    cider, sample_cider = Cider().compute_score(gts, res)
    bleu, sample_bleu = Bleu(4).compute_score(gts, res, verbose=0)
    return CaptionScores(float(cider), [float(b) for b in bleu], np.asarray(sample_cider, dtype=np.float64), np.asarray(sample_bleu[3], dtype=np.float64))
