"""The caption branch of training: which samples carry a caption, which caption, and the loss on them."""

from __future__ import annotations

import os

import pyarrow as pa
import torch

from model.config import CAPTION_PROMPT
from model.tokenizer import Tokenizer
from pipeline.loader import DatasetSpec, TrainStream
from pipeline.shards import label_table_path
from schemas import LABEL_TABLE, write_table
from tests.test_evaluate import _jpeg
from tests.test_model import _tiny_model
from tests.test_shards import write_tar

CAPTIONS = ["a white star on the table", "one star placed on a wooden table", "a star"]


def _dataset(root: str, world) -> DatasetSpec:
    """One shard of 12 samples, each with COCO's three captions "\\n"-joined in its txt."""
    shards, labels = os.path.join(root, "shards"), os.path.join(root, "labels")
    os.makedirs(shards)
    images = _jpeg(world, 12)
    keys = [f"0000000{i:02d}" for i in range(12)]
    write_tar(os.path.join(shards, "00000.tar"), [(k, {"jpg": img, "txt": "\n".join(CAPTIONS).encode()}) for k, img in zip(keys, images)])
    rows = {"key": keys, "shard": ["00000"] * 12, "caption": ["\n".join(CAPTIONS)] * 12, "labels": [["star", "table"]] * 12, "extractor": ["spacy"] * 12}
    write_table(pa.table(rows), label_table_path(labels, "00000"), LABEL_TABLE)
    return DatasetSpec("coco", shards, labels)


def test_a_fraction_of_each_batch_trains_the_caption_branch_on_one_of_its_captions(tmp_path, world):
    tok = Tokenizer(world.tokenizer)
    spec = _dataset(str(tmp_path), world)
    stream = TrainStream([spec], world.tokenizer, 32, batch_size=8, seed=0, shuffle_buffer=1, max_text_len=48, caption_loss=True, caption_fraction=0.25)
    seen = set()
    for _, batch in zip(range(6), stream):
        assert batch["images"].shape[0] == 8 and batch["caption_ids"].shape[0] == 2
        for row in batch["caption_ids"].tolist():
            text = tok.decode([t for t in row if t not in (tok.pad_id, tok.image_id, tok.bos_id, tok.eos_id)])
            assert text.startswith(CAPTION_PROMPT + " ")
            caption = text.removeprefix(CAPTION_PROMPT + " ")
            assert caption in CAPTIONS  # one caption of the image, never the joined text
            seen.add(caption)
    assert seen == set(CAPTIONS), "each caption is drawn, not always the first"
    whole = TrainStream([spec], world.tokenizer, 32, batch_size=8, seed=0, shuffle_buffer=1, max_text_len=48, caption_loss=True)
    assert next(iter(whole))["caption_ids"].shape[0] == 8
    assert "caption_ids" not in next(iter(TrainStream([spec], world.tokenizer, 32, batch_size=8, seed=0, shuffle_buffer=1, max_text_len=48)))


def test_the_caption_loss_of_the_first_images_is_theirs_alone(tmp_path, world):
    tok = Tokenizer(world.tokenizer)
    stream = TrainStream([_dataset(str(tmp_path), world)], world.tokenizer, 32, batch_size=6, seed=1, shuffle_buffer=1,
                         max_text_len=48, caption_loss=True, caption_fraction=0.5)  # fmt: skip
    batch = next(iter(stream))
    batch.pop("stats"), batch.pop("dataset")
    model = _tiny_model(tok)
    with torch.no_grad():
        out = model(**batch, caption_weight=0.5)
        first = {k: v[:3] for k, v in batch.items() if not k.startswith("caption")}
        alone = model(**first, caption_ids=batch["caption_ids"], caption_targets=batch["caption_targets"], caption_weight=0.5)
    torch.testing.assert_close(out["caption_loss"], alone["caption_loss"])
    torch.testing.assert_close(out["loss"], out["label_loss"] + 0.5 * out["caption_loss"])
