"""Attention maps: box geometry and pictures by hand, then the trained demo model's maps against the world's boxes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.attention import first_label_ids, label_attention, select
from model.checkpoint import load_pretrained
from model.vision import preprocess
from pipeline import attention_maps, synthetic


def test_box_cover_on_the_patch_grid():
    quarter = {"x0": 0, "y0": 0, "x1": 128, "y1": 128}
    np.testing.assert_array_equal(attention_maps.box_cover([quarter], (256, 256), 4), np.kron([[1, 0], [0, 0]], np.ones((2, 2))))
    half_patch = {"x0": 192, "y0": 224, "x1": 256, "y1": 256}  # the lower half of the bottom-right patch
    assert attention_maps.box_cover([half_patch], (256, 256), 4)[3, 3] == 0.5
    # a wide image: the model sees its centre square, so a box on the cropped margin covers nothing
    wide = attention_maps.box_cover([{"x0": 0, "y0": 0, "x1": 64, "y1": 256}, {"x0": 64, "y0": 0, "x1": 128, "y1": 64}], (384, 256), 4)
    np.testing.assert_array_equal(wide, np.pad([[1.0]], ((0, 3), (0, 3))))


def test_density_ratio():
    cover = np.kron([[1, 0], [0, 0]], np.ones((2, 2)))  # a quarter of the image
    assert attention_maps.density_ratio(np.ones((4, 4)), cover) == pytest.approx(1.0)
    assert attention_maps.density_ratio(1 + 2 * cover, cover) == pytest.approx(3.0)
    assert attention_maps.density_ratio(1 + cover, 1 - cover) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cover none or all"):
        attention_maps.density_ratio(np.ones((4, 4)), np.zeros((4, 4)))


def test_heat_overlay_and_figure(tmp_path):
    image = Image.new("RGB", (100, 80), (0, 0, 0))
    hot = np.zeros((2, 2))
    hot[0, 1] = 1.0
    overlay = np.asarray(attention_maps.heat_overlay(image, hot))
    assert overlay.shape == (256, 256, 3)  # the 80 px centre square, enlarged
    top_right, bottom_left = overlay[64, 192].astype(int), overlay[192, 64].astype(int)
    assert top_right[0] > top_right[2] and bottom_left[2] > bottom_left[0], "hot patch red, cold patch blue"
    path = attention_maps.write_figure(str(tmp_path / "a.png"), image, ["cup", "star"], [0.6, 0.3], [hot, 1 - hot], caption="x")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 3 * 200
    assert os.listdir(tmp_path) == ["a.png"], "no temporary file left behind"
    with pytest.raises(ValueError, match="do not match"):
        attention_maps.write_figure(str(tmp_path / "b.png"), image, ["cup"], [0.6, 0.3], [hot])


def _ratios(export: str, world: synthetic.World, layer: int | None = None) -> np.ndarray:
    """Density ratio of each ground-truth object noun's map (one decoder layer's, or the mean over layers; the mean
    over heads) on its own boxes."""
    model, tok = load_pretrained(export)
    model.eval()
    transform = preprocess(model.cfg.vision.image_size)
    prompt_ids = tok.prompt_ids(model.cfg.prompt)
    ratios = []
    for row in world.samples("val"):
        if row["kind"] != "good":
            continue
        with Image.open(os.path.join(world.root, row["file"])) as img:
            size, image = img.size, transform(img.convert("RGB"))
        nouns = sorted(set(row["objects"]))
        first = torch.tensor([first_label_ids(tok, model.cfg.prompt, nouns)])
        maps = select(label_attention(model, image[None], prompt_ids, first)[0], layer).numpy()  # [K, g, g]
        for noun, grid in zip(nouns, maps):
            cover = attention_maps.box_cover([b for b in row["boxes"] if b["noun"] == noun], size, grid.shape[0])
            ratios.append(attention_maps.density_ratio(grid, cover))
    return np.array(ratios)


def test_demo_model_looks_at_the_objects_it_names(demo_run):
    """A label's attention in the decoder's last layer is denser on the boxes of the object it names than on the
    rest of the image.

    Geometric mean over every object of the held-out images; the untrained model (same
    architecture and initialization) shows no such preference, so it is learned, not geometry.
    The last layer, not the mean over layers: the first layers of the demo model do not
    localize, and how much they dilute the mean depends on the training stream (two
    demo models of 1000 steps on the same world whose streams differ: mean over layers
    1.04 and 1.29, last layer 1.29 and 1.25; earlier ones: mean 1.10).
    """
    out, proc = demo_run
    assert proc.returncode == 0, f"jobs.demo exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    world = synthetic.load_world(os.path.join(out, "world"))
    trained = _ratios(os.path.join(out, "run", "export"), world, layer=-1)
    untrained = _ratios(os.path.join(out, "untrained"), world, layer=-1)
    assert len(trained) >= 150
    geo = float(np.exp(np.log(trained).mean()))
    geo_untrained = float(np.exp(np.log(untrained).mean()))
    # measured on the demo's training (2-core CPU, 2026-11-26): last layer's geometric mean 1.29 and 0.69 of the
    # objects above 1, untrained 1.00 and 0.46; the bounds leave room, since the demo's model differs between runs
    assert geo >= 1.15 and (trained > 1).mean() >= 0.6, (geo, (trained > 1).mean())
    assert geo >= geo_untrained + 0.1, (geo, geo_untrained)
