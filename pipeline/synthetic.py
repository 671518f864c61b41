"""The synthetic world: the embedded default dataset, deterministic from a seed.

Each sample is a 256x256 JPEG of one to four black or white objects (16 nouns: circle,
star, cup, ...) on one of 8 scenes (table, grass, sky, ...), each photo with its own exposure
and white balance (``LIGHTING``), with a natural caption that names
every object and the scene among distractors (colours, sizes, counts, verbs, noise words
such as "image" or "day"). The ground-truth labels of a sample are its object nouns plus
its scene noun, exactly what the noun extractor must recover from the caption.

The same world is written in each real source format, so that the real readers and the
real download path run on it:

    <out>/images/<split>/<index>.jpg       image files (also the local image folder)
    <out>/ground_truth.parquet             one row per sample: split, index, file, kind,
                                            caption, objects, scene, labels, boxes (each
                                            drawn object's noun and pixel bounds)
    <out>/tokenizer.model                  a small SentencePiece model for tiny models
    <out>/<split>/cc3m.tsv                 caption \\t url, no header (CC3M / CC12M layout)
    <out>/<split>/coco_captions.json       images[] with coco_url, annotations[] (3-5 per image)
    <out>/<split>/laion.parquet            URL, TEXT, WIDTH, HEIGHT, similarity
    <out>/<split>/openimages_narratives.jsonl + openimages_urls.csv
                                            localized narratives and the image id -> url map

The source files hold URLs, so they are rendered for a base URL (``render_sources``) once
the world is served (``serve``). A fraction of rows is deliberately bad, each kind listed
in ``ground_truth.parquet``:

    dead_url        the URL answers 404
    not_image       the body is HTML, not an image
    truncated_jpeg  the body is the first 40% of a JPEG
    empty_caption   the caption is empty or whitespace

and, only when asked (``write_world(duplicates=..., mismatches=...)``), rows appended
after each split's own, for data hygiene (dedup and CLIP-score filtering):

    duplicate       a copy of another good image (exact, re-encoded, resized or slightly
                    cropped; ``transform``, ``duplicate_of`` name it); in train some copy
                    a validation image
    mismatch        an image captioned with another picture's caption (other scene, none
                    of its objects); ``labels`` say what the image shows
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import math
import os
import random
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from model.config import CAPTION_PROMPT, PROMPT_TEMPLATES
from pipeline.outputs import write_bytes

IMAGE_SIZE = 256
SPLITS = ("train", "val")

OBJECTS: dict[str, str] = {  # noun -> plural as written in captions
    "circle": "circles",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "moon": "moons",
    "cross": "crosses",
    "arrow": "arrows",
    "diamond": "diamonds",
    "ring": "rings",
    "cup": "cups",
    "tree": "trees",
    "house": "houses",
    "flower": "flowers",
    "fish": "fish",
    "leaf": "leaves",
    "mouse": "mice",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 60),
    "yellow": (245, 215, 40),
    "pink": (240, 120, 190),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}

# the colours objects are drawn in: silhouettes, black or white (whichever stands out from the scene).
# A from-scratch model on a CPU learns shapes several times faster when colour does not vary
# within a shape; the scenes keep their own colours and textures.
PALETTE = ("black", "white")

# colour + noun pairs a tagger reads as a name ("red cross", "white house"): never drawn
NAME_LIKE = {
    ("red", "cross"), ("green", "cross"), ("pink", "cross"), ("white", "cross"),
    ("white", "house"), ("green", "house"), ("red", "house"),
    ("green", "mouse"), ("white", "mouse"), ("red", "mouse"),
    ("green", "cup"), ("white", "cup"), ("red", "cup"), ("yellow", "cross"), ("pink", "leaf"),
}

# scene noun -> (base colour, phrases placing objects in it); each phrase holds the noun once
SCENES: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "table": ((150, 100, 60), ("on a wooden table", "on the table", "on an old wooden table")),
    "grass": ((90, 160, 70), ("on the green grass", "in the grass", "in tall grass")),
    "sky": ((120, 175, 235), ("against a clear blue sky", "in the sky", "high in the sky")),
    "wall": ((170, 85, 65), ("against a plain wall", "on the wall", "painted on an old wall")),
    "snow": ((235, 238, 245), ("in the snow", "on fresh white snow", "in deep snow")),
    "sand": ((220, 195, 140), ("on the sand", "on warm sand", "in the sand")),
    "water": ((40, 110, 150), ("floating on calm water", "in the water", "on the dark water")),
    "floor": ((128, 128, 128), ("on a tiled floor", "on the floor", "on a grey floor")),
}

# each photo's exposure and white balance: the scene's colour shifted by up to "exposure" levels
# (all channels) and "cast" levels (each channel on its own), drawn from a stream of its own, so
# that the layout is the same as without it. Photos of one scene differ in light; without it
# two distinct images of one object in the same cell of one scene are copies of each other to
# any dedup (the demo's 6,000 images: 81 of 379 flagged samples; with it: 8 of 306).
LIGHTING = {"exposure": 20, "cast": 12}

SIZES = {"small": 0.72, "tiny": 0.64, "large": 1.0, "big": 0.96}
COUNT_WORDS = {2: ("two", "2"), 3: ("three", "3")}
OPENERS = ("", "", "", "an image of ", "a stock image of ", "here we see ")
VERBS = ("", "", "placed ", "shown ", "arranged ", "drawn ")
CLOSERS = ("", "", "", " on a sunny day", ", seen from above", " in the foreground", " at the top of the image")

BAD_KINDS = ("dead_url", "not_image", "truncated_jpeg", "empty_caption")


@dataclass
class Sample:
    """One synthetic sample: what is drawn and what the caption says."""

    split: str
    index: int
    kind: str  # good | one of BAD_KINDS
    scene: str
    objects: list[tuple[str, str, str, int]]  # (noun, colour, size word or "", count)
    captions: list[str] = field(default_factory=list)

    @property
    def file(self) -> str:
        return f"images/{self.split}/{self.index:06d}.jpg"

    @property
    def labels(self) -> list[str]:
        """Ground-truth labels: distinct object nouns, then the scene noun."""
        return sorted({noun for noun, *_ in self.objects}) + [self.scene]


def _rng(seed: int, split: str, index: int, salt: str = "") -> random.Random:
    return random.Random(f"{seed}/{split}/{index}/{salt}")


def _contrasting_colours(scene: str) -> list[str]:
    base = SCENES[scene][0]
    return [c for c in PALETTE if sum((a - b) ** 2 for a, b in zip(COLOURS[c], base)) > 110**2]


def make_sample(seed: int, split: str, index: int, bad_fraction: float = 0.0) -> Sample:
    """The sample at ``index`` of ``split``: a pure function of its arguments."""
    rng = _rng(seed, split, index)
    scene = rng.choice(sorted(SCENES))
    n_types = rng.choices([1, 2, 3], weights=[3, 4, 3])[0]
    nouns = rng.sample(sorted(OBJECTS), n_types)
    colours = _contrasting_colours(scene)
    objects, instances = [], 0
    for j, noun in enumerate(nouns):
        room = 4 - instances - (n_types - j - 1)  # instances left for this noun, at most 4 in all
        count = rng.choice([2, 2, 3]) if room >= 2 and rng.random() < 0.25 else 1
        count = min(count, room)
        size = rng.choice(["", "", ""] + sorted(SIZES)) if count == 1 else ""
        colour = rng.choice([c for c in colours if (c, noun) not in NAME_LIKE])
        objects.append((noun, colour, size, count))
        instances += count
    kind = "good"
    bad = _rng(seed, split, index, "kind")  # its own stream: which rows are bad does not move with the content
    if bad_fraction > 0 and bad.random() < bad_fraction:
        kind = bad.choice(BAD_KINDS)
    sample = Sample(split, index, kind, scene, objects)
    n_captions = 3 + rng.randrange(3)
    sample.captions = [_caption(sample, _rng(seed, split, index, f"caption{c}")) for c in range(n_captions)]
    if kind == "empty_caption":
        sample.captions = [rng.choice(["", " ", "\t"])]
    return sample


def _object_phrase(noun: str, colour: str, size: str, count: int, rng: random.Random) -> str:
    if count == 1:
        words = [w for w in (size, colour, noun) if w]
        article = "an" if words[0][0] in "aeiou" else "a"
        return f"{article} {' '.join(words)}"
    return f"{rng.choice(COUNT_WORDS[count])} {colour} {OBJECTS[noun]}"


def _caption(sample: Sample, rng: random.Random) -> str:
    phrases = [_object_phrase(*obj, rng) for obj in sample.objects]
    rng.shuffle(phrases)
    if len(phrases) == 1:
        things = phrases[0]
    else:
        joiner = rng.choice([" and ", " next to ", " beside ", " with "]) if len(phrases) == 2 else " and "
        things = ", ".join(phrases[:-1]) + joiner + phrases[-1]
    place = rng.choice(SCENES[sample.scene][1])
    caption = f"{rng.choice(OPENERS)}{things} {rng.choice(VERBS)}{place}{rng.choice(CLOSERS)}"
    return caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption


# ----------------------------------------------------------------------------- drawing


def _lit(scene: str, light: random.Random) -> tuple[int, int, int]:
    """The scene's colour under one photo's exposure and white balance (``LIGHTING``)."""
    shift = light.randint(-LIGHTING["exposure"], LIGHTING["exposure"])
    casts = [light.randint(-LIGHTING["cast"], LIGHTING["cast"]) for _ in range(3)]
    return tuple(max(0, min(255, c + shift + cast)) for c, cast in zip(SCENES[scene][0], casts))


def _background(draw: ImageDraw.ImageDraw, base: tuple[int, int, int], scene: str, rng: random.Random) -> None:
    s = IMAGE_SIZE
    draw.rectangle([0, 0, s, s], fill=base)

    def shade(d: int) -> tuple[int, int, int]:
        return tuple(max(0, min(255, c + d)) for c in base)

    if scene == "table":
        for y in range(0, s, 12):
            draw.line([(0, y + rng.randrange(4)), (s, y + rng.randrange(4))], fill=shade(-30), width=2)
    elif scene == "grass":
        for _ in range(220):
            x, y = rng.randrange(s), rng.randrange(s)
            draw.line([(x, y), (x + rng.randrange(-3, 4), y - 8)], fill=shade(rng.choice([-40, 30])), width=1)
    elif scene == "sky":
        for y in range(s):
            draw.line([(0, y), (s, y)], fill=shade(-y // 6))
        for _ in range(3):
            x, y = rng.randrange(s), rng.randrange(s // 2)
            draw.ellipse([x, y, x + 50, y + 18], fill=(245, 245, 250))
    elif scene == "wall":
        for row, y in enumerate(range(0, s, 16)):
            draw.line([(0, y), (s, y)], fill=(220, 210, 200), width=2)
            for x in range((row % 2) * 16, s, 32):
                draw.line([(x, y), (x, y + 16)], fill=(220, 210, 200), width=2)
    elif scene == "snow":
        for _ in range(300):
            x, y = rng.randrange(s), rng.randrange(s)
            draw.point((x, y), fill=(200, 205, 220))
    elif scene == "sand":
        for _ in range(500):
            x, y = rng.randrange(s), rng.randrange(s)
            draw.point((x, y), fill=shade(rng.choice([-35, 20])))
    elif scene == "water":
        for y in range(8, s, 14):
            pts = [(x, y + 3 * math.sin((x + rng.randrange(20)) / 9)) for x in range(0, s + 8, 8)]
            draw.line(pts, fill=shade(45), width=2)
    elif scene == "floor":
        for i, y in enumerate(range(0, s, 32)):
            for j, x in enumerate(range(0, s, 32)):
                if (i + j) % 2:
                    draw.rectangle([x, y, x + 31, y + 31], fill=shade(-25))


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + x * r, cy + y * r) for x, y in points]


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        a = -math.pi / 2 + i * math.pi / n
        rad = 1.0 if i % 2 == 0 else inner
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, noun: str, colour: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    fill = colour
    dark = tuple(max(0, c - 90) for c in colour)
    box = [cx - r, cy - r, cx + r, cy + r]
    if noun == "circle":
        draw.ellipse(box, fill=fill)
    elif noun == "triangle":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (1, 0.85), (-1, 0.85)]), fill=fill)
    elif noun == "star":
        draw.polygon(_polygon(cx, cy, r, _star()), fill=fill)
    elif noun == "heart":
        draw.ellipse([cx - r, cy - 0.8 * r, cx, cy + 0.1 * r], fill=fill)
        draw.ellipse([cx, cy - 0.8 * r, cx + r, cy + 0.1 * r], fill=fill)
        draw.polygon(_polygon(cx, cy, r, [(-0.97, -0.2), (0.97, -0.2), (0, 1)]), fill=fill)
    elif noun == "moon":
        angles = [-math.pi / 2 + i * math.pi / 24 for i in range(25)]
        outer = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in angles]
        inner = [(cx + 0.3 * r * math.cos(t), cy + 0.92 * r * math.sin(t)) for t in reversed(angles)]
        draw.polygon(outer + inner, fill=fill)
    elif noun == "cross":
        w = 0.3 * r
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif noun == "arrow":
        draw.polygon(_polygon(cx, cy, r, [(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)]), fill=fill)
    elif noun == "diamond":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]), fill=fill)
    elif noun == "ring":
        draw.ellipse(box, outline=fill, width=max(3, int(0.28 * r)))
    elif noun == "cup":
        draw.ellipse([cx + 0.35 * r, cy - 0.45 * r, cx + r, cy + 0.3 * r], outline=fill, width=max(3, int(0.16 * r)))
        draw.polygon(_polygon(cx, cy, r, [(-0.8, -0.7), (0.55, -0.7), (0.4, 0.8), (-0.65, 0.8)]), fill=fill)
    elif noun == "tree":
        draw.rectangle([cx - 0.15 * r, cy + 0.2 * r, cx + 0.15 * r, cy + r], fill=(110, 70, 30))
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.8, 0.35), (-0.8, 0.35)]), fill=fill)
    elif noun == "house":
        draw.rectangle([cx - 0.7 * r, cy - 0.1 * r, cx + 0.7 * r, cy + r], fill=fill)
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.95, -0.1), (-0.95, -0.1)]), fill=dark)
        draw.rectangle([cx - 0.15 * r, cy + 0.4 * r, cx + 0.15 * r, cy + r], fill=dark)
    elif noun == "flower":
        for i in range(6):
            a = i * math.pi / 3
            px, py = cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a)
            draw.ellipse([px - 0.4 * r, py - 0.4 * r, px + 0.4 * r, py + 0.4 * r], fill=fill)
        draw.ellipse([cx - 0.3 * r, cy - 0.3 * r, cx + 0.3 * r, cy + 0.3 * r], fill=(250, 220, 60) if colour != COLOURS["yellow"] else (120, 60, 20))
    elif noun == "fish":
        draw.ellipse([cx - r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r], fill=fill)
        draw.polygon(_polygon(cx, cy, r, [(0.35, 0), (1, -0.6), (1, 0.6)]), fill=fill)
        draw.ellipse([cx - 0.7 * r, cy - 0.2 * r, cx - 0.5 * r, cy], fill=dark)
    elif noun == "leaf":
        xs = [cx + r * (i / 12 - 1) for i in range(25)]
        upper = [(x, cy - 0.5 * r * (1 - ((x - cx) / r) ** 2)) for x in xs]
        lower = [(x, cy + 0.5 * r * (1 - ((x - cx) / r) ** 2)) for x in reversed(xs)]
        draw.polygon(upper + lower, fill=fill)
        draw.line([(cx - r, cy), (cx + r, cy)], fill=dark, width=max(2, int(0.08 * r)))
    elif noun == "mouse":
        draw.ellipse([cx - 0.8 * r, cy - 0.35 * r, cx + 0.5 * r, cy + 0.6 * r], fill=fill)
        draw.ellipse([cx + 0.15 * r, cy - 0.75 * r, cx + 0.65 * r, cy - 0.2 * r], fill=fill)
        draw.ellipse([cx + 0.3 * r, cy - 0.2 * r, cx + 0.95 * r, cy + 0.35 * r], fill=fill)
        draw.line([(cx - 0.8 * r, cy + 0.3 * r), (cx - r, cy - 0.6 * r)], fill=fill, width=max(2, int(0.1 * r)))
    else:  # pragma: no cover - OBJECTS and this table move together
        raise ValueError(f"no drawing for {noun!r}")


def render(sample: Sample, seed: int) -> Image.Image:
    """Draw ``sample`` (deterministic): scene texture, then each object in its own cell."""
    return render_with_boxes(sample, seed)[0]


def render_with_boxes(sample: Sample, seed: int) -> tuple[Image.Image, list[dict]]:
    """The image of ``sample`` and the box of each object drawn in it.

    A box is ``{"noun", "x0", "y0", "x1", "y1"}`` in pixels of the IMAGE_SIZE image, the
    tight bounds of the object's drawn pixels (x1, y1 exclusive); an object drawn twice or
    three times has one box per copy. The boxes are measured on a blank layer per object,
    so the image and the draw stream are the same as without them.
    """
    rng = _rng(seed, sample.split, sample.index, "draw")
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(img)
    _background(draw, _lit(sample.scene, _rng(seed, sample.split, sample.index, "light")), sample.scene, rng)
    instances = [(noun, colour, size) for noun, colour, size, count in sample.objects for _ in range(count)]
    cell = IMAGE_SIZE // 2
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], len(instances))
    boxes = []
    for (noun, colour, size), (cx, cy) in zip(instances, cells):
        scale = SIZES.get(size, 0.86) * rng.uniform(0.92, 1.0)
        r = 0.46 * cell * scale
        x = cx * cell + cell / 2 + rng.uniform(-1, 1) * (cell / 2 - r) * 0.8
        y = cy * cell + cell / 2 + rng.uniform(-1, 1) * (cell / 2 - r) * 0.8
        _draw_object(draw, noun, COLOURS[colour], x, y, r)
        layer = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # white on black: every part of the object is non-zero
        _draw_object(ImageDraw.Draw(layer), noun, COLOURS["white"], x, y, r)
        x0, y0, x1, y1 = layer.getbbox()
        boxes.append({"noun": noun, "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    return img, boxes


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing


@dataclass
class World:
    """Where a written world lives and how it was made."""

    root: str
    seed: int
    sizes: dict[str, int]

    def samples(self, split: str) -> list[dict]:
        table = pq.read_table(os.path.join(self.root, "ground_truth.parquet"), filters=[("split", "=", split)])
        return table.to_pylist()

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.root, "tokenizer.model")


def write_world(
    out: str,
    n_train: int,
    n_val: int = 0,
    seed: int = 0,
    bad_fraction: float = 0.1,
    tokenizer_vocab: int = 400,
    progress=None,
    duplicates: float = 0.0,
    mismatches: float = 0.0,
    hygiene_splits: tuple[str, ...] = SPLITS,
) -> World:
    """Write images, ground truth and tokenizer of a world of ``n_train`` + ``n_val`` samples.

    ``bad_fraction`` of the rows (validation too) get one of the bad kinds. ``progress``
    is called with (done, total) every few hundred images.

    ``duplicates`` and ``mismatches`` (shares of each split's size) append rows after the
    split's own, from a random stream of their own, so that every other row, image and
    caption is the same as in a world without them (:func:`hygiene_rows`): copies of good
    images (kind ``duplicate``: exact, re-encoded, resized or slightly cropped; in train,
    some copy a validation image) and images captioned with another picture's caption
    (kind ``mismatch``), in the splits named by ``hygiene_splits``. The tokenizer is
    trained on the splits' own rows only.
    """
    os.makedirs(out, exist_ok=True)
    sizes = {"train": n_train, "val": n_val}
    rows, total, done = [], n_train + n_val, 0
    for split, n in sizes.items():
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        for i in range(n):
            s = make_sample(seed, split, i, bad_fraction)
            path = os.path.join(out, s.file)
            img, boxes = render_with_boxes(s, seed)  # every row records its boxes, bad rows too
            if s.kind == "not_image":
                body = b"<!doctype html><html><body><h1>Moved</h1><p>This page has moved.</p></body></html>\n"
            elif s.kind == "truncated_jpeg":
                data = jpeg_bytes(img)
                body = data[: int(len(data) * 0.4)]
            else:
                body = jpeg_bytes(img)
            if s.kind != "dead_url":
                write_bytes(path, body)
            rows.append(
                {
                    "split": split,
                    "index": i,
                    "file": s.file,
                    "kind": s.kind,
                    "caption": "\n".join(s.captions),
                    "objects": [noun for noun, *_ in s.objects],
                    "scene": s.scene,
                    "labels": s.labels,
                    "transform": None,
                    "duplicate_of": None,
                    "boxes": boxes,
                }
            )
            done += 1
            if progress is not None and (done % 250 == 0 or done == total):
                progress(done, total)
    base_captions = [r["caption"] for r in rows]
    if duplicates > 0 or mismatches > 0:
        good = {split: [r["index"] for r in rows if r["split"] == split and r["kind"] == "good"] for split in SPLITS}
        for split, n in sizes.items():
            if split not in hygiene_splits:
                continue
            for row, body in hygiene_rows(seed, split, n, good, bad_fraction, duplicates, mismatches):
                write_bytes(os.path.join(out, row["file"]), body)
                rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=GROUND_TRUTH), os.path.join(out, "ground_truth.parquet"))
    train_tokenizer(base_captions, os.path.join(out, "tokenizer.model"), tokenizer_vocab)
    with open(os.path.join(out, "world.json"), "w") as f:
        meta = {"seed": seed, "sizes": sizes, "bad_fraction": bad_fraction}
        if duplicates > 0 or mismatches > 0:
            meta.update(duplicates=duplicates, mismatches=mismatches)
        json.dump(meta, f, indent=2)
    return World(out, seed, sizes)


DUPLICATE_TRANSFORMS = ("exact", "reencode", "resize", "crop")
CROSS_SPLIT_SHARE = 0.2  # of the train split's copies, those of a validation image (a leak --exclude-near must catch)


def _copy(img: Image.Image, original: bytes, transform: str, rng: random.Random) -> bytes:
    """A copy of an image as the web re-serves it: the same bytes, re-encoded, resized, or slightly cropped."""
    if transform == "exact":
        return original
    if transform == "reencode":
        return jpeg_bytes(img, quality=rng.randint(30, 70))
    if transform == "resize":
        side = round(IMAGE_SIZE * rng.uniform(0.5, 0.8))
        return jpeg_bytes(img.resize((side, side), Image.Resampling.LANCZOS))
    margins = [rng.randint(2, 6) for _ in range(4)]  # 1-2% of each side
    return jpeg_bytes(img.crop((margins[0], margins[1], IMAGE_SIZE - margins[2], IMAGE_SIZE - margins[3])))


def hygiene_rows(
    seed: int, split: str, n: int, good: dict[str, list[int]], bad_fraction: float, duplicates: float, mismatches: float
) -> Iterator[tuple[dict, bytes]]:
    """(ground-truth row, image body) of the rows appended after a split's ``n`` own rows.

    Their random stream is their own (salted "hygiene"), and what a copy copies is drawn
    from ``good`` (the good rows of each split), so adding them changes no other row.
    """
    n_dup, n_mis = round(duplicates * n), round(mismatches * n)
    plan = _rng(seed, split, n, "hygiene-plan")
    kinds = ["duplicate"] * n_dup + ["mismatch"] * n_mis
    plan.shuffle(kinds)
    own = list(good.get(split, []))
    sources = plan.sample(own, min(n_dup, len(own))) if own else []
    cross = list(good.get("val", [])) if split == "train" else []
    next_source = 0
    for j, kind in enumerate(kinds):
        index = n + j
        rng = _rng(seed, split, index, "hygiene")
        if kind == "duplicate" and (sources or cross):
            if cross and (rng.random() < CROSS_SPLIT_SHARE or next_source >= len(sources)):
                source = make_sample(seed, "val", rng.choice(cross), bad_fraction)
            else:
                source = make_sample(seed, split, sources[next_source], bad_fraction)
                next_source += 1
            img, boxes = render_with_boxes(source, seed)
            transform = rng.choice(DUPLICATE_TRANSFORMS)
            body = _copy(img, jpeg_bytes(img), transform, rng)
            caption = rng.choice(source.captions)
            sample, duplicate_of = source, source.file
            boxes = boxes if transform in ("exact", "reencode") else None
        else:
            kind, transform, duplicate_of = "mismatch", None, None
            sample = make_sample(seed, split, index)
            img, boxes = render_with_boxes(sample, seed)
            body = jpeg_bytes(img)
            caption = "\n".join(_mismatched_caption(seed, split, index, sample).captions)
        yield (
            {
                "split": split,
                "index": index,
                "file": f"images/{split}/{index:06d}.jpg",
                "kind": kind,
                "caption": caption,
                "objects": [noun for noun, *_ in sample.objects],
                "scene": sample.scene,
                "labels": sample.labels,
                "transform": transform,
                "duplicate_of": duplicate_of,
                "boxes": boxes,
            },
            body,
        )


def _mismatched_caption(seed: int, split: str, index: int, image: Sample) -> Sample:
    """Another picture's sample, with another scene and none of ``image``'s objects: its captions mismatch the image."""
    nouns = {noun for noun, *_ in image.objects}
    for attempt in range(1000):
        other = make_sample(seed, f"{split}-mismatch", index * 1000 + attempt)
        if other.scene != image.scene and not nouns & {noun for noun, *_ in other.objects}:
            return other
    raise RuntimeError(f"no mismatched caption found for {split}/{index}")  # pragma: no cover - 8 scenes, 16 nouns


def load_world(root: str) -> World:
    with open(os.path.join(root, "world.json")) as f:
        meta = json.load(f)
    return World(root, meta["seed"], meta["sizes"])


GROUND_TRUTH = pa.schema(
    [
        ("split", pa.string()),
        ("index", pa.int64()),
        ("file", pa.string()),
        ("kind", pa.string()),
        ("caption", pa.string()),  # all captions of the image, "\n"-joined
        ("objects", pa.list_(pa.string())),
        ("scene", pa.string()),
        ("labels", pa.list_(pa.string())),  # what the image shows (a mismatch row's caption says otherwise)
        ("transform", pa.string()),  # duplicate rows: exact | reencode | resize | crop
        ("duplicate_of", pa.string()),  # duplicate rows: the file of the image they copy
        # one per drawn object: its noun and tight pixel bounds in the IMAGE_SIZE image (x1, y1 exclusive);
        # null for a resized or cropped duplicate, whose pixels no longer sit where the boxes say
        ("boxes", pa.list_(pa.struct([("noun", pa.string()), ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32())]))),
    ]
)


def render_sources(world: World, base_url: str) -> dict[str, dict[str, str]]:
    """Write every source format of every split with URLs under ``base_url``.

    Returns {split: {format: path}}. The CC3M and LAION files hold one caption per row
    (the first caption of the image); COCO and OpenImages hold all of them.
    """
    base_url = base_url.rstrip("/")
    written: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        samples = world.samples(split)
        if not samples:
            continue
        folder = os.path.join(world.root, split)
        os.makedirs(folder, exist_ok=True)
        paths = {
            "cc3m": os.path.join(folder, "cc3m.tsv"),
            "coco": os.path.join(folder, "coco_captions.json"),
            "laion": os.path.join(folder, "laion.parquet"),
            "openimages": os.path.join(folder, "openimages_narratives.jsonl"),
            "openimages_urls": os.path.join(folder, "openimages_urls.csv"),
        }
        url = {s["index"]: f"{base_url}/{s['file']}" for s in samples}
        first = {s["index"]: s["caption"].split("\n")[0] for s in samples}
        with open(paths["cc3m"], "w") as f:
            for s in samples:
                caption = first[s["index"]].replace("\t", " ")  # a tab inside a field would split the row
                f.write(f"{caption}\t{url[s['index']]}\n")
        coco = {"info": {"description": "synthetic world", "version": "1"}, "images": [], "annotations": []}
        for s in samples:
            image_id = 100000 + s["index"]
            coco["images"].append(
                {"id": image_id, "file_name": os.path.basename(s["file"]), "coco_url": url[s["index"]], "width": IMAGE_SIZE, "height": IMAGE_SIZE}
            )
            for c, caption in enumerate(s["caption"].split("\n")):
                coco["annotations"].append({"id": image_id * 10 + c, "image_id": image_id, "caption": caption})
        with open(paths["coco"], "w") as f:
            json.dump(coco, f)
        rng = random.Random(f"{world.seed}/{split}/laion")
        pq.write_table(
            pa.table(
                {
                    "URL": [url[s["index"]] for s in samples],
                    "TEXT": [first[s["index"]] for s in samples],
                    "WIDTH": [IMAGE_SIZE] * len(samples),
                    "HEIGHT": [IMAGE_SIZE] * len(samples),
                    "similarity": [round(rng.uniform(0.26, 0.4), 4) for _ in samples],
                }
            ),
            paths["laion"],
        )
        with open(paths["openimages"], "w") as f, open(paths["openimages_urls"], "w") as g:
            g.write("ImageID,Subset,OriginalURL\n")
            for s in samples:
                image_id = f"{s['index']:016x}"
                g.write(f"{image_id},{split},{url[s['index']]}\n")
                for a, caption in enumerate(s["caption"].split("\n")[:2]):
                    f.write(json.dumps({"dataset_id": "open_images", "image_id": image_id, "annotator_id": 90 + a, "caption": caption}) + "\n")
        written[split] = paths
    return written


# ----------------------------------------------------------------------------- tokenizer

PROMPT_TEXT = [*PROMPT_TEMPLATES, CAPTION_PROMPT]  # what the model reads besides captions and labels


def train_tokenizer(captions: list[str], path: str, vocab_size: int = 400) -> None:
    """Train a byte-fallback BPE SentencePiece model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad).

    Besides the captions it sees the prompt templates and comma-joined label lists, so
    that every label is a short piece sequence and "," follows a word as its own piece,
    as in LLaMA-2.
    """
    import sentencepiece as spm

    text = [line for c in captions for line in c.split("\n") if line.strip()]
    text += PROMPT_TEXT * 20
    nouns = sorted(OBJECTS) + sorted(OBJECTS.values()) + sorted(SCENES)
    rng = random.Random(0)
    text += [", ".join(rng.sample(nouns, 4)) for _ in range(500)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=vocab_size + 256,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    write_bytes(path, model.getvalue())


# ----------------------------------------------------------------------------- serving


GATE_TIMEOUT_S = 120.0


class _Gates:
    """Named gates of one server: ``/gate/<name>/<path>`` waits until ``/open/<name>`` is requested."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._counts: dict[str, int] = {}

    def get(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def count(self, path: str) -> int:
        """How many times ``path`` was requested before, counting this request."""
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1
            return self._counts[path]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus paths that let a test decide how and when an answer comes.

    Each prefix takes the path of a served file after it, and prefixes combine:

    - ``/delay/<ms>/<path>`` answers after a pause (at most 10 s);
    - ``/gate/<name>/<path>`` answers once ``/open/<name>`` has been requested (a 503
      after ``GATE_TIMEOUT_S`` if it never is), so that a test can hold downloads back
      for exactly as long as it needs, whatever the machine's speed;
    - ``/header/<Name>/<value>/<path>`` adds a response header (the value URL-quoted), e.g.
      ``/header/X-Robots-Tag/noai/<path>``;
    - ``/status/<code>/<path>`` always answers with that HTTP status;
    - ``/flaky/<n>/<code>/<path>``: the first ``n`` requests of this exact URL answer
      ``<code>`` (with ``Retry-After: 0`` for 429 and 503), later ones the file;
    - ``/hang/<n>/<path>``: the first ``n`` requests of this exact URL get no answer until the
      client gives up (its timeout), later ones the file;
    - ``/reset/<n>/<path>``: the first ``n`` requests of this exact URL are closed unanswered.

    The counts of ``flaky``, ``hang`` and ``reset`` are per server and per full URL (query
    string included), so a test that adds ``?t=<its name>`` counts on its own.
    """

    gates: _Gates

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests and jobs print their own progress
        pass

    def end_headers(self):
        for name, value in getattr(self, "extra_headers", []):
            self.send_header(name, value)
        super().end_headers()

    def _hang_until_client_leaves(self) -> None:
        import select

        deadline = time.time() + GATE_TIMEOUT_S
        while time.time() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.1)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                break

    def do_GET(self):
        self.extra_headers = []
        parts = urllib.parse.urlsplit(self.path).path.split("/")
        if len(parts) == 3 and parts[1] == "open" and parts[2]:
            self.gates.get(parts[2]).set()
            body = f"gate {parts[2]} open\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        full = self.path
        while len(parts) > 3:
            kind = parts[1]
            if kind == "gate":
                if not self.gates.get(parts[2]).wait(GATE_TIMEOUT_S):
                    self.send_error(503, f"gate {parts[2]} was never opened")
                    return
                parts = parts[:1] + parts[3:]
            elif kind == "header" and len(parts) > 4:
                self.extra_headers.append((parts[2], urllib.parse.unquote(parts[3])))
                parts = parts[:1] + parts[4:]
            elif kind == "status" and parts[2].isdigit():
                self.send_error(int(parts[2]))
                return
            elif kind == "flaky" and len(parts) > 4 and parts[2].isdigit() and parts[3].isdigit():
                if self.gates.count(full) <= int(parts[2]):
                    code = int(parts[3])
                    if code in (429, 503):
                        self.extra_headers.append(("Retry-After", "0"))
                    self.send_error(code)
                    return
                parts = parts[:1] + parts[4:]
            elif kind in ("hang", "reset") and parts[2].isdigit():
                if self.gates.count(full) <= int(parts[2]):
                    if kind == "hang":
                        self._hang_until_client_leaves()
                    self.close_connection = True
                    return
                parts = parts[:1] + parts[3:]
            else:
                break
        self.path = "/".join(parts)
        super().do_GET()

    def translate_path(self, path):
        parts = urllib.parse.urlsplit(path).path.split("/")
        if len(parts) > 3 and parts[1] == "delay" and parts[2].isdigit():
            time.sleep(min(int(parts[2]), 10_000) / 1000)
            path = "/" + "/".join(parts[3:])
        return super().translate_path(path)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that leaves before its answer is complete (its timeout, a reset, the ``hang``
        and ``reset`` paths) is normal here and not reported; any other error is, through the
        interpreter's own excepthook (socketserver's default prints with the ``traceback``
        module, which parses source in this request thread: see pipeline/ast_guard.py)."""
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            return
        print(f"synthetic world server: error while answering {client_address}:", file=sys.stderr)
        sys.__excepthook__(*sys.exc_info())


@contextlib.contextmanager
def serve(root: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``root`` over HTTP on ``host`` (an ephemeral port by default); yields the base URL.

    The server always shuts down and releases its socket on exit.
    """

    handler = functools.partial(type("Handler", (_Handler,), {"gates": _Gates()}), directory=root)

    server = _Server((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------- its closed vocabulary


def class_list_text() -> str:
    """The world's closed vocabulary as a class list (``pipeline.closed_set``): its 16 objects, then its
    8 scenes, one per line with an index prefix, each object's plural as a synonym ("15: mouse, mice")."""
    names = [f"{noun}, {plural}" if plural != noun else noun for noun, plural in OBJECTS.items()] + list(SCENES)
    return "".join(f"{i}: {name}\n" for i, name in enumerate(names))
