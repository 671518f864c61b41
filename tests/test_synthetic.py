import io
import json
import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import synthetic


def test_world_is_deterministic(tmp_path):
    a = synthetic.write_world(str(tmp_path / "a"), 12, 4, seed=7, bad_fraction=0.3)
    b = synthetic.write_world(str(tmp_path / "b"), 12, 4, seed=7, bad_fraction=0.3)
    ta = pq.read_table(os.path.join(a.root, "ground_truth.parquet"))
    tb = pq.read_table(os.path.join(b.root, "ground_truth.parquet"))
    assert ta.equals(tb)
    for row in ta.to_pylist():
        pa_, pb_ = os.path.join(a.root, row["file"]), os.path.join(b.root, row["file"])
        assert os.path.exists(pa_) == os.path.exists(pb_)
        if os.path.exists(pa_):
            assert open(pa_, "rb").read() == open(pb_, "rb").read()
    c = synthetic.write_world(str(tmp_path / "c"), 12, 4, seed=8, bad_fraction=0.3)
    assert not pq.read_table(os.path.join(c.root, "ground_truth.parquet")).equals(ta)


def test_boxes_bound_each_drawn_object(tmp_path):
    world = synthetic.write_world(str(tmp_path), 40, 0, seed=5, bad_fraction=0.2)
    for row in world.samples("train"):
        sample = synthetic.make_sample(5, "train", row["index"], bad_fraction=0.2)
        assert sorted(b["noun"] for b in row["boxes"]) == sorted(n for n, _, _, count in sample.objects for _ in range(count))
        img, boxes = synthetic.render_with_boxes(sample, 5)
        assert boxes == row["boxes"]  # recorded for bad rows too
        # the objects are what differs from the bare scene (drawn from the same stream): inside the boxes only,
        # and reaching every edge of each box
        bare = synthetic.render(synthetic.Sample(sample.split, sample.index, sample.kind, sample.scene, []), 5)
        changed = np.any(np.asarray(img) != np.asarray(bare), axis=-1)
        covered = np.zeros_like(changed)
        for b in boxes:
            covered[b["y0"] : b["y1"], b["x0"] : b["x1"]] = True
            ys, xs = np.nonzero(changed[b["y0"] : b["y1"], b["x0"] : b["x1"]])
            assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (0, 0, b["y1"] - b["y0"], b["x1"] - b["x0"])
        assert not (changed & ~covered).any()
        if row["kind"] in ("good", "empty_caption"):
            with Image.open(os.path.join(world.root, row["file"])) as written:
                assert np.array_equal(np.asarray(written), np.asarray(Image.open(io.BytesIO(synthetic.jpeg_bytes(img)))))


def test_vocabulary_and_scenes():
    assert len(synthetic.OBJECTS) >= 16
    assert len(synthetic.SCENES) >= 4
    sample = synthetic.make_sample(0, "train", 3)
    assert 1 <= sum(count for *_, count in sample.objects) <= 4
    assert sample.labels[-1] == sample.scene
    for caption in sample.captions:
        for noun, *_ in sample.objects:
            assert noun in caption or synthetic.OBJECTS[noun] in caption


def test_every_bad_kind_is_present_and_labelled(tmp_path):
    world = synthetic.write_world(str(tmp_path), 200, 0, seed=1, bad_fraction=0.2)
    gt = pq.read_table(os.path.join(world.root, "ground_truth.parquet")).to_pylist()
    kinds = {r["kind"] for r in gt}
    assert kinds == {"good", *synthetic.BAD_KINDS}
    for r in gt:
        path = os.path.join(world.root, r["file"])
        if r["kind"] == "dead_url":
            assert not os.path.exists(path)
            continue
        data = open(path, "rb").read()
        if r["kind"] == "not_image":
            assert data.lstrip().lower().startswith(b"<!doctype html")
        elif r["kind"] == "truncated_jpeg":
            assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")
            with pytest.raises(OSError):
                Image.open(path).load()
        else:
            assert Image.open(path).size == (256, 256)
        if r["kind"] == "empty_caption":
            assert r["caption"].strip() == ""
        else:
            assert r["caption"].strip()


def test_sources_parse_with_real_readers(served_world):
    world, base_url, sources = served_world
    for split in ("train", "val"):
        samples = world.samples(split)
        paths = sources[split]
        tsv = pd.read_csv(paths["cc3m"], sep="\t", header=None, names=["caption", "url"], keep_default_na=False, quoting=3)
        assert len(tsv) == len(samples)
        assert tsv.url.str.startswith(base_url).all()
        coco = json.load(open(paths["coco"]))
        assert len(coco["images"]) == len(samples)
        per_image = pd.Series([a["image_id"] for a in coco["annotations"]]).value_counts()
        good = [s for s in samples if s["kind"] != "empty_caption"]
        assert per_image.max() >= 3 and len(coco["annotations"]) >= 3 * len(good)
        laion = pq.read_table(paths["laion"]).to_pandas()
        assert list(laion.columns[:4]) == ["URL", "TEXT", "WIDTH", "HEIGHT"] and len(laion) == len(samples)
        oi = pd.read_json(paths["openimages"], lines=True)
        urls = pd.read_csv(paths["openimages_urls"], dtype=str)
        assert set(oi.image_id) == set(urls.ImageID) and len(urls) == len(samples)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_serves_good_404s_dead_and_closes(world):
    gt = {r["kind"]: r for r in world.samples("train")}
    with synthetic.serve(world.root) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        body = urllib.request.urlopen(f"{base_url}/{gt['good']['file']}", timeout=5).read()
        assert body == open(os.path.join(world.root, gt["good"]["file"]), "rb").read()
        assert body[:2] == b"\xff\xd8"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base_url}/{gt['dead_url']['file']}", timeout=5)
        assert err.value.code == 404
        assert _listening(port)
    assert not _listening(port), "server left a listening socket behind"


def test_server_shuts_down_on_error(world):
    with pytest.raises(RuntimeError), synthetic.serve(world.root) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        raise RuntimeError("boom")
    assert not _listening(port)


def test_tokenizer_splits_labels_and_delimiter(world):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=world.tokenizer)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    pieces = sp.encode("The objects in the image are circle, mouse, table", out_type=str)
    assert pieces[-5:] == ["▁circle", ",", "▁mouse", ",", "▁table"]


def test_server_reports_its_errors_but_not_clients_that_leave(world, capfd):
    """A client gone mid-answer is normal for the world's server; any other error is printed, with its traceback."""
    server = synthetic._Server(("127.0.0.1", 0), synthetic._Handler)
    try:
        for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), TimeoutError("timed out")):
            try:
                raise gone
            except OSError:
                server.handle_error(None, ("127.0.0.1", 1))
        assert capfd.readouterr().err == ""
        try:
            raise ValueError("a bug in the handler")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 2))
        err = capfd.readouterr().err
        assert "error while answering ('127.0.0.1', 2)" in err and "Traceback" in err and "ValueError: a bug in the handler" in err
    finally:
        server.server_close()
