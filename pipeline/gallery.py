"""gallery.html: a static page of a sample of validation images, their targets and top-k predictions.

One self-contained file (no script, no external asset): each image is inlined as a small
base64 JPEG thumbnail, so the page can be mailed, attached to a run or opened from
object storage as it is. The sample is fixed by a seed (``sample_indices``): the same
evaluation shows the same images, and two models evaluated on the same shards show the
same images side by side.

Markup (stable, for people and for parsers):

    <figure class="sample" data-shard=".." data-key="..">
      <img src="data:image/jpeg;base64,..">
      <ul class="targets"><li class="target found|missed">cup</li>...</ul>
      <ol class="predictions"><li class="prediction correct|wrong" data-probability="0.43298">
          <span class="label">floor</span> <span class="probability">0.433</span></li>...</ol>
      <p class="caption">..</p>            (with --task caption)
      <p class="classes">..</p>            (with --classes)
    </figure>

A prediction is correct when it equals a target (case and surrounding space ignored, as
the exact scores compare them); a target is found when a prediction equals it.
"""

from __future__ import annotations

import base64
import html
import io
import random
from collections.abc import Mapping, Sequence

from pipeline.outputs import atomic_file

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; margin-bottom: .2rem; } p.summary { color: #555; margin-top: 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 1rem; }
figure.sample { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; background: #fafafa; }
figure.sample img { display: block; width: 100%; height: auto; image-rendering: pixelated; border-radius: 4px; }
.id { font-family: monospace; font-size: .75rem; color: #777; margin: .3rem 0; }
ul.targets { list-style: none; padding: 0; margin: .2rem 0; display: flex; flex-wrap: wrap; gap: .25rem; }
li.target { padding: 0 .35rem; border-radius: 3px; font-size: .85rem; }
li.found { background: #d8f0d8; } li.missed { background: #f6dada; }
ol.predictions { margin: .3rem 0 0 0; padding-left: 1.4rem; font-size: .85rem; }
li.correct { color: #16691b; font-weight: 600; } li.correct::after { content: " \\2713"; }
li.wrong { color: #444; } span.probability { color: #888; font-variant-numeric: tabular-nums; }
p.caption, p.classes { font-size: .8rem; margin: .3rem 0 0 0; color: #333; }
"""


def sample_indices(candidates: Sequence[int], size: int, seed: int = 0) -> list[int]:
    """``size`` of ``candidates`` (row indices, in the table's order) drawn with ``seed``, kept in that order."""
    if size >= len(candidates):
        return list(candidates)
    chosen = set(random.Random(seed).sample(range(len(candidates)), size))
    return [c for i, c in enumerate(candidates) if i in chosen]


def thumbnail(data: bytes, size: int = 160) -> str:
    """A data: URI of a JPEG thumbnail of the image ``data`` (its longer side ``size`` pixels at most)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _same(label: str) -> str:
    return label.strip().lower()


def sample_html(row: Mapping, image_uri: str | None) -> str:
    """One ``<figure>``: ``row`` holds shard, key, targets, predictions, probabilities, and optionally
    caption, references, classes (true class names) and predicted_classes."""
    esc = html.escape
    wanted = {_same(t) for t in row["targets"] if t.strip()}
    made = {_same(p) for p in row["predictions"] if p.strip()}
    parts = [f'<figure class="sample" data-shard="{esc(row["shard"])}" data-key="{esc(row["key"])}">']
    alt = esc(f"{row['shard']}/{row['key']}")
    parts.append(f'<img src="{image_uri}" alt="{alt}">' if image_uri else f'<div class="noimage">{alt}: image not readable</div>')
    parts.append(f'<div class="id">{alt}</div>')
    targets = "".join(f'<li class="target {"found" if _same(t) in made else "missed"}">{esc(t)}</li>' for t in row["targets"])
    parts.append(f'<ul class="targets" title="targets">{targets}</ul>')
    predictions = "".join(
        f'<li class="prediction {"correct" if _same(p) in wanted else "wrong"}" data-probability="{prob:.5f}">'
        f'<span class="label">{esc(p)}</span> <span class="probability">{prob:.3f}</span></li>'
        for p, prob in zip(row["predictions"], row["probabilities"])
    )
    parts.append(f'<ol class="predictions" title="top-k predictions">{predictions}</ol>')
    if row.get("caption") is not None:
        reference = f' <span class="reference">(reference: {esc(row["references"][0])})</span>' if row.get("references") else ""
        parts.append(f'<p class="caption">caption: <q>{esc(row["caption"])}</q>{reference}</p>')
    if row.get("classes") is not None:
        predicted = row.get("predicted_classes") or []
        mark = "correct" if predicted and predicted[0] in row["classes"] else "wrong"
        parts.append(f'<p class="classes {mark}">class: {esc(", ".join(row["classes"]))}; top-1: {esc(predicted[0] if predicted else "-")}</p>')
    parts.append("</figure>")
    return "".join(parts)


def write_gallery(path: str, rows: Sequence[Mapping], images: Mapping[tuple[str, str], bytes | None], *, title: str, summary: str) -> None:
    """Write the page (atomically): one figure per row, its image from ``images[(shard, key)]``."""
    figures = []
    for row in rows:
        data = images.get((row["shard"], row["key"]))
        uri = None
        if data is not None:
            try:
                uri = thumbnail(data)
            except Exception:  # noqa: BLE001 - an image that does not decode is shown as such, the page is still written
                uri = None
        figures.append(sample_html(row, uri))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"summary\">{html.escape(summary)}</p>\n"
        f'<div class="grid">\n' + "\n".join(figures) + "\n</div>\n</body></html>\n"
    )
    with atomic_file(path) as f:
        f.write(page.encode("utf-8"))
