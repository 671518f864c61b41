"""Scoring: semantic R / P / F1 against hand-computed values, exact recall / precision, CLIP's text tower."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.scoring import (
    ClipTextEmbedder,
    LabelScorer,
    SentenceEmbedder,
    clean_labels,
    default_minilm_path,
    exact_scores,
    f1_score,
    semantic_scores,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    return SentenceEmbedder()


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
    assert clean_labels([" cup", "cup", "", "  ", None, "Star", "star", "hot  dog", "Hot dog "]) == ["cup", "Star", "hot  dog"]


def test_case_repeats_take_one_top_k_slot(minilm):
    """"dog" and "Dog" are one label (the sentence model is uncased): a case repeat must not push "cat" out of the top-2."""
    scorer = LabelScorer([minilm], ks=[2])
    repeated = scorer([["dog", "cat"]] * 2, [["dog", "Dog", "cat"], ["dog", "cat"]])
    assert repeated.exact_recall[0, 0] == repeated.exact_recall[1, 0] == 1.0
    assert repeated.recall[minilm.name][0, 0] == pytest.approx(repeated.recall[minilm.name][1, 0], abs=1e-6)
    doubled_target = scorer([["Dog", "dog", "cat"]], [["dog"]])
    single_target = scorer([["dog", "cat"]], [["dog"]])
    assert doubled_target.recall[minilm.name][0, 0] == pytest.approx(single_target.recall[minilm.name][0, 0], abs=1e-6)


class _Counting:
    """A toy embedder: one-hot vectors by first letter, and a count of the texts it was asked for."""

    name = "toy"

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, texts):
        self.asked += list(texts)
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(ord(t[0]) % 8), 8).float() for t in texts]) if texts else torch.zeros(0, 8)


def test_a_full_embedding_cache_keeps_serving():
    """Past max_entries the cache starts over with the call's own texts, and no lookup fails."""
    from pipeline.scoring import CachedEmbedder

    toy = _Counting()
    cache = CachedEmbedder(toy, max_entries=3)
    first = cache.lookup(["a", "b"])
    second = cache.lookup(["a", "c", "d"])  # "a" cached; "c", "d" overflow the cache
    assert set(second) == {"a", "c", "d"} and torch.equal(second["a"], first["a"])
    assert toy.asked == ["a", "b", "c", "d"], "a cached text is not embedded again"
    assert set(cache.cache) == {"a", "c", "d"}
    cache.lookup(["e", "a"])
    assert set(cache.cache) == {"a", "e"} and toy.asked[-1] == "e"


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


ODD_TEXTS = [
    "cup", "a red circle", "hot air balloon", "",
    "tab\there", "line\nbreak", "nul\x00byte", "bell\x07", "\u200bzero width", "emoji 🎈🐶", "🎈", "ÇA VA, crème brûlée",
    "l" * 200, "word " * 60, "   padded   ", "日本語のラベル", "<|image|>", "[CLS] [SEP] [MASK]",
]  # fmt: skip


def test_embeddings_are_the_librarys_on_odd_strings(minilm):
    """R / P / F1 are the paper's metric only if the embeddings are sentence-transformers' own, on any text."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(default_minilm_path(), device="cpu", local_files_only=True)
    expected = reference.encode(ODD_TEXTS, convert_to_tensor=True, normalize_embeddings=True).cpu()
    got = minilm(ODD_TEXTS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    one_at_a_time = torch.stack([minilm([t])[0] for t in ODD_TEXTS])  # batching changes nothing that matters
    torch.testing.assert_close(one_at_a_time, expected, atol=1e-6, rtol=0)
    assert minilm.name == "all-MiniLM-L6-v2" and minilm([]).shape == (0, expected.shape[1])


def test_a_model_from_a_local_folder_or_the_hf_cache(tmp_path):
    """--embedding-model: a folder (named by its folder) or a hub id found in the local cache, offline."""
    import shutil

    from huggingface_hub import snapshot_download

    folder = shutil.copytree(default_minilm_path(), tmp_path / "my-minilm")
    assert SentenceEmbedder(str(folder)).name == "my-minilm"
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--label-embedder" / "snapshots" / ("0" * 40)
    shutil.copytree(default_minilm_path(), snapshot)
    (cache / "models--acme--label-embedder" / "refs").mkdir()
    (cache / "models--acme--label-embedder" / "refs" / "main").write_text("0" * 40)
    assert snapshot_download("acme/label-embedder", cache_dir=str(cache), local_files_only=True) == str(snapshot)
    # the cache location is read when huggingface_hub is imported: a fresh process, as a job would be
    code = "from pipeline.scoring import SentenceEmbedder as E; e = E('acme/label-embedder'); print(e.name, e(['cup'])[0, :4].tolist())"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    name, values = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "acme/label-embedder"
    torch.testing.assert_close(torch.tensor(json.loads(values)), SentenceEmbedder()(["cup"])[0, :4], atol=1e-6, rtol=0)


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
