"""Attention maps as pictures, and how much of a map falls on an object's box.

The maps come from ``model.attention.label_attention``: one g x g grid of attention per
label over the patches of the model's view of the image (CLIP's eval transform: the
short side resized, the centre square cropped). Here they are drawn over that square as
heat maps, and scored against boxes (the synthetic world records each object's box).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

MIN_PANEL = 256  # pixels: small images are enlarged so that the patch grid stays visible


def model_view(image: Image.Image, min_size: int = MIN_PANEL) -> Image.Image:
    """The centre square of ``image`` (what the model reads), RGB, at least ``min_size`` pixels wide."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = round((w - side) / 2), round((h - side) / 2)
    square = image.crop((left, top, left + side, top + side))
    return square.resize((min_size, min_size), Image.BICUBIC) if side < min_size else square


def heat_overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """``attention`` [g, g] as a heat map over ``model_view(image)`` (each patch one flat cell, scaled to its maximum)."""
    from matplotlib import colormaps

    view = model_view(image)
    a = np.asarray(attention, dtype=np.float64)
    peak = a.max()
    a = a / peak if peak > 0 else a
    colours = (colormaps[cmap](a)[..., :3] * 255).astype(np.uint8)  # [g, g, 3]
    heat = Image.fromarray(colours).resize(view.size, Image.NEAREST)
    return Image.blend(view, heat, alpha)


def write_figure(
    path: str,
    image: Image.Image,
    labels: Sequence[str],
    probs: Sequence[float],
    maps: Sequence[np.ndarray],
    caption: str = "",
    columns: int = 4,
) -> str:
    """One PNG: the model's view of ``image``, then one heat-map panel per label ("label 0.93" above it).

    Written under a temporary name and renamed when complete; returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not (len(labels) == len(probs) == len(maps)):
        raise ValueError(f"{len(labels)} labels, {len(probs)} probabilities and {len(maps)} maps do not match")
    titles = [f"{label if label.isprintable() else repr(label)} {p:.3f}" for label, p in zip(labels, probs)]  # a label may hold control characters
    panels = [(model_view(image), "image")] + [(heat_overlay(image, m), title) for title, m in zip(titles, maps)]
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + (0.3 if caption else 0)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (panel, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(panel)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def box_cover(boxes: Sequence[dict], image_size: tuple[int, int], grid: int) -> np.ndarray:
    """The fraction [grid, grid] of each patch of the model's view covered by the union of ``boxes``.

    Boxes are ``{"x0", "y0", "x1", "y1"}`` in pixels of the full image (x1, y1 exclusive), as
    the synthetic world records them; the view is the image's centre square.
    """
    w, h = image_size
    side = min(w, h)
    left, top = round((w - side) / 2), round((h - side) / 2)
    mask = np.zeros((side, side), dtype=bool)
    for b in boxes:
        x0, x1 = max(0, b["x0"] - left), min(side, b["x1"] - left)
        y0, y1 = max(0, b["y0"] - top), min(side, b["y1"] - top)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    edges = np.linspace(0, side, grid + 1).round().astype(int)
    return np.array([[mask[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].mean() for j in range(grid)] for i in range(grid)])


def density_ratio(attention: np.ndarray, cover: np.ndarray) -> float:
    """Attention per unit of area inside the covered region, over the same outside it (1: no preference).

    ``attention`` and ``cover`` are [g, g]; a patch's attention is spread evenly over its area.
    """
    a = np.asarray(attention, dtype=np.float64)
    a = a / a.sum()
    inside, outside = cover.sum(), (1 - cover).sum()
    if inside <= 0 or outside <= 0:
        raise ValueError("the boxes cover none or all of the image: no inside/outside to compare")
    return float(((a * cover).sum() / inside) / ((a * (1 - cover)).sum() / outside))
