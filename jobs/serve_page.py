"""The page of ``jobs.serve`` (a Streamlit script): ``streamlit run jobs/serve_page.py -- --checkpoint CKPT``.

Streamlit runs this file top to bottom on every interaction; the model is loaded once per
server (``st.cache_resource``) and the labels of an image are kept per (image, k).
"""

from __future__ import annotations

import html
import sys
from dataclasses import astuple

import streamlit as st

from jobs.serve import Predictor, ServeConfig, parse_args
from pipeline.images import ImageRefused, decode_image

IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif"]


@st.cache_resource(show_spinner="loading the model ...")
def predictor(key: tuple) -> Predictor:
    return Predictor(ServeConfig(*key))


@st.cache_data(max_entries=32, show_spinner=False)
def top_labels(key: tuple, data: bytes, k: int) -> tuple[list[str], list[float]]:
    return predictor(key).labels(decode_image(data), k)


def bars(labels: list[str], probs: list[float]) -> str:
    """The labels with probability bars, as HTML (each row carries its label and probability as data attributes)."""
    rows = []
    for label, p in zip(labels, probs):
        rows.append(
            f'<div class="nxtp-label" data-label="{html.escape(label)}" data-prob="{p:.5f}" '
            'style="display:grid;grid-template-columns:9em 1fr 5em;gap:0.6em;align-items:center;margin:0.15em 0">'
            f'<span class="nxtp-name" style="font-weight:600">{html.escape(label)}</span>'
            f'<span style="background:#e8ecf3;border-radius:3px;height:0.9em">'
            f'<span class="nxtp-bar" style="display:block;width:{100 * p:.2f}%;height:100%;background:#3b6fb6;border-radius:3px"></span></span>'
            f'<span class="nxtp-prob" style="font-family:monospace">{p:.5f}</span></div>'
        )
    return '<div class="nxtp-labels">' + "".join(rows) + "</div>"


def main() -> None:
    cfg = parse_args(sys.argv[1:])
    key = astuple(cfg)
    st.set_page_config(page_title="NxTP: the objects in an image", layout="wide")
    st.title("NxTP: the objects in an image")
    try:
        model = predictor(key)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: cannot load {cfg.checkpoint}: {err}", file=sys.stderr)
        st.error(f"cannot load the model {cfg.checkpoint}: {err}")
        st.stop()
    st.caption(
        f"{cfg.checkpoint} · {model.n_params / 1e6:.1f}M parameters on {model.device} · one-shot sampling: "
        "the top-k first tokens in one step, each completed into a label in parallel"
    )
    upload = st.file_uploader("Drop an image here, or browse", type=IMAGE_TYPES)
    largest = min(100, model.max_k)
    k = st.slider("k: labels to sample", min_value=1, max_value=largest, value=min(cfg.num_labels, largest))
    if upload is None:
        st.info("Upload an image to see its labels.")
        st.stop()
    data = upload.getvalue()
    try:
        image = decode_image(data)  # as ingestion decodes it: upright, transparency on white, a decompression bomb refused
    except ImageRefused as err:
        st.error(f"cannot read {upload.name} as an image: {err}")
        st.stop()
    labels, probs = top_labels(key, data, k)
    left, right = st.columns(2)
    with left:
        st.subheader(f"top-{k} labels")
        st.html(bars(labels, probs))
    with right:
        st.subheader("attention map")
        if not labels:
            st.info("no labels to show")
            st.stop()
        label = st.selectbox("label", labels, index=0)
        n_layers, n_heads = model.model.cfg.decoder.n_layers, model.model.cfg.decoder.n_heads
        c1, c2 = st.columns(2)
        layer = c1.selectbox("decoder layer", ["mean", *range(n_layers)])
        head = c2.selectbox("head", ["mean", *range(n_heads)])
        layer_i, head_i = (None if v == "mean" else int(v) for v in (layer, head))
        overlay = model.attention(image, label, layer_i, head_i)
        if overlay is None:
            st.info(f"the label {label!r} has no attention map (it does not tokenize after the prompt)")
        else:
            st.image(
                overlay,
                caption=f"{label}: its first token's attention over the image patches (layer {layer}, head {head})",
                alt=f"attention map of {label}",
                width=360,
            )


main()
