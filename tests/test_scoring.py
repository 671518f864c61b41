"""Scoring: semantic R / P / F1 against hand-computed values, exact recall / precision, CLIP's text tower."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.scoring import (
    ClipTextEmbedder,
    LabelScorer,
    MiniLMEmbedder,
    clean_labels,
    default_minilm_path,
    exact_scores,
    f1_score,
    semantic_scores,
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def _unit(*rows) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_semantic_scores_on_hand_made_vectors():
    # targets e1, e2; predictions e1, (e1 + e2) / sqrt 2, e3: cosines [[1, .7071, 0], [0, .7071, 0]]
    targets = _unit([1, 0, 0], [0, 1, 0])
    predictions = _unit([1, 0, 0], [1, 1, 0], [0, 0, 1])
    s = semantic_scores(targets, predictions)
    c = 1 / math.sqrt(2)
    recall, precision = (1 + c) / 2, (1 + c + 0) / 3
    assert s.recall == pytest.approx(recall, abs=1e-6)
    assert s.precision == pytest.approx(precision, abs=1e-6)
    assert s.f1 == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-6)
    assert semantic_scores(targets, torch.zeros(0, 3)).f1 == 0.0
    with pytest.raises(ValueError, match="without targets"):
        semantic_scores(torch.zeros(0, 3), predictions)


def test_f1_and_label_cleaning():
    assert f1_score(0.5, 1.0) == pytest.approx(2 / 3)
    assert f1_score(0.0, 0.0) == 0.0
    assert f1_score(0.3, -0.3) == 0.0  # undefined: 0
    assert clean_labels([" cup", "cup", "", "  ", None, "Star", "star"]) == ["cup", "Star", "star"]


def test_exact_recall_and_precision_by_hand():
    targets = ["cup", "table", "star"]
    predictions = ["cup", "Star ", "tree", "moon"]
    assert exact_scores(targets, predictions[:2]) == (pytest.approx(2 / 3), 1.0)
    assert exact_scores(targets, predictions) == (pytest.approx(2 / 3), 0.5)
    assert exact_scores(targets, ["tree"]) == (0.0, 0.0)
    assert exact_scores(targets, []) == (0.0, 0.0)
    assert exact_scores(["cup", "cup"], ["cup", "cup", "mug"]) == (1.0, 0.5)  # sets: repeats count once


def test_identical_lists_score_one(minilm):
    labels = ["circle", "wooden table", "star"]
    scorer = LabelScorer([minilm], ks=[3])
    s = scorer([labels], [list(reversed(labels))])
    assert s.recall[minilm.name][0, 0] == pytest.approx(1.0, abs=1e-5)
    assert s.precision[minilm.name][0, 0] == pytest.approx(1.0, abs=1e-5)
    assert s.f1[minilm.name][0, 0] == pytest.approx(1.0, abs=1e-5)
    assert s.exact_recall[0, 0] == 1.0 and s.exact_precision[0, 0] == 1.0


def test_unrelated_lists_score_low(minilm):
    scorer = LabelScorer([minilm], ks=[2])
    same = scorer([["dog", "cat"]], [["puppy", "kitten"]])
    unrelated = scorer([["dog", "cat"]], [["mortgage", "carburetor"]])
    r_unrelated = unrelated.recall[minilm.name][0, 0]
    assert r_unrelated < 0.4 and unrelated.precision[minilm.name][0, 0] < 0.4
    assert same.recall[minilm.name][0, 0] > r_unrelated + 0.3  # synonyms score far above unrelated words
    assert unrelated.exact_recall[0, 0] == 0.0


def test_minilm_matches_sentence_transformers():
    """The embedder equals sentence-transformers' own pipeline on the same files (pooling, normalization)."""
    from sentence_transformers import SentenceTransformer

    texts = ["cup", "a red circle", "hot air balloon", "tree"]
    reference = SentenceTransformer(default_minilm_path(), device="cpu", local_files_only=True)
    expected = reference.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()
    got = MiniLMEmbedder()(texts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(texts)), atol=1e-5, rtol=0)


def test_scores_at_several_k_match_independent_cosines(minilm):
    """Known cosine values: the embeddings taken independently, the scores worked out here with numpy."""
    targets = ["circle", "table", "star"]
    predictions = ["ring", "star", "desk", "banana", "circle"]
    vectors = {t: v.numpy() for t, v in zip(targets + predictions, minilm(targets + predictions))}
    scorer = LabelScorer([minilm], ks=[5, 2])
    s = scorer([targets], [predictions])
    for j, k in enumerate([2, 5]):  # ks are sorted
        cos = np.array([[vectors[t] @ vectors[p] for p in predictions[:k]] for t in targets])
        recall, precision = cos.max(axis=1).mean(), cos.max(axis=0).mean()
        assert s.recall[minilm.name][0, j] == pytest.approx(recall, abs=1e-5)
        assert s.precision[minilm.name][0, j] == pytest.approx(precision, abs=1e-5)
        assert s.f1[minilm.name][0, j] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-5)
    assert s.exact_recall[0].tolist() == pytest.approx([1 / 3, 2 / 3])
    assert s.exact_precision[0].tolist() == pytest.approx([1 / 2, 2 / 5])


def test_blank_and_repeated_predictions_are_ignored(minilm):
    scorer = LabelScorer([minilm], ks=[10])
    a = scorer([["cup", "tree"]], [["cup", " ", "cup", "house"]])
    b = scorer([["cup", "tree"]], [["cup", "house"]])
    assert a.recall[minilm.name][0, 0] == pytest.approx(b.recall[minilm.name][0, 0], abs=1e-6)
    assert a.precision[minilm.name][0, 0] == pytest.approx(b.precision[minilm.name][0, 0], abs=1e-6)
    nothing = scorer([["cup"]], [[""]])
    assert nothing.recall[minilm.name][0, 0] == 0.0 and nothing.f1[minilm.name][0, 0] == 0.0
    with pytest.raises(ValueError, match="no target"):
        scorer([[" "]], [["cup"]])


def _tiny_clip(seed: int = 0):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    )
    return model.eval()


def test_clip_text_tower_from_a_clip_file(tmp_path, minilm):
    import open_clip

    model = _tiny_clip()
    path = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    texts = ["circle", "star", "wooden table"]
    with torch.no_grad():
        expected = model.encode_text(open_clip.tokenize(texts), normalize=True)
    embedder = ClipTextEmbedder(str(path))
    assert embedder.name == "clip-text:tiny_clip.pt"
    torch.testing.assert_close(embedder(texts), expected, atol=1e-5, rtol=1e-4)

    scorer = LabelScorer([minilm, embedder], ks=[2])
    s = scorer([["circle", "star"]], [["star", "wooden table"]])
    cos = (expected[:2] @ expected[[1, 2]].T).numpy()
    assert s.recall[embedder.name][0, 0] == pytest.approx(cos.max(axis=1).mean(), abs=1e-5)
    assert s.precision[embedder.name][0, 0] == pytest.approx(cos.max(axis=0).mean(), abs=1e-5)
    assert s.recall[minilm.name][0, 0] != pytest.approx(s.recall[embedder.name][0, 0], abs=1e-3)  # two models, two figures

    with pytest.raises(ValueError, match="no CLIP text tower"):
        torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "visual_only.pt")
        ClipTextEmbedder(str(tmp_path / "visual_only.pt"))
