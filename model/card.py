"""The model card (README.md) of an export: what the model is, how it was trained and scored, how to load it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

    from model.nxtp import NxTP

PAPER = "[Object Recognition as Next Token Prediction](https://arxiv.org/abs/2312.02142) (CVPR 2024)"


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value)
    else:
        text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _records_table(records: list[dict]) -> str:
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    return _table(columns, [[r.get(c) for c in columns] for r in records])


def model_card(
    model: NxTP,
    card_data: ModelCardData,
    *,
    train_config: dict | None = None,
    step: int | None = None,
    data_stats: dict | None = None,
    evaluation: list[dict] | None = None,
    model_id: str | None = None,
) -> str:
    """Markdown with YAML metadata. Sections without facts say so rather than guess.

    ``train_config``: the training job's config (its ``data`` list becomes the Data
    section); ``step``: optimizer steps trained; ``data_stats``: the loader's counters;
    ``evaluation``: rows of a report (e.g. dataset, k, R, P, F1); ``model_id``: the hub id
    or folder the loading examples name.
    """
    cfg, v, d = model.cfg, model.cfg.vision, model.cfg.decoder
    tok = model.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    name = model_id or "owner/name"
    out = [f"---\n{card_data.to_yaml()}\n---", "# NxTP: object recognition as next-token prediction"]
    out.append(
        f"A CLIP ViT whose patch tokens, projected, are the prefix of a LLaMA decoder truncated to its first "
        f"{d.n_layers} blocks; after the prompt \"{cfg.prompt}\" it writes the objects in the image as labels, "
        f"all k labels sampled at once (one-shot sampling). Paper: {PAPER}. {n_params / 1e6:.1f}M parameters."
    )
    out.append("## Model")
    special = f"`{tok.specials[tok.image_id]}` = {tok.image_id}, `{tok.specials[tok.pad_id]}` (pad) = {tok.pad_id}" if tok else "2 appended"
    out.append(_table(["part", "shape"], [
        ["vision", f"ViT{' ' + v.name if v.name else ''}: {v.image_size} px, patch {v.patch_size}, width {v.width}, {v.layers} layers, "
                   f"{v.heads} heads, {'QuickGELU' if v.quick_gelu else 'GELU'}; {v.n_tokens} image tokens"],
        ["projection", f"{v.width} -> {d.dim}, every token"],
        ["decoder", f"LLaMA blocks: dim {d.dim}, {d.n_layers} layers, {d.n_heads} heads ({d.n_kv_heads or d.n_heads} kv), "
                    f"SwiGLU {d.hidden_dim}, rope base {d.rope_theta:g}, max {d.max_seq_len} positions"],
        ["vocabulary", f"{d.vocab_size} SentencePiece pieces + special tokens {special}"],
    ]))  # fmt: skip

    out.append("## Training")
    if train_config:
        steps = f"Trained for {step} optimizer steps. " if step is not None else ""
        out.append(steps + "The training job's configuration:")
        out.append(_table(["setting", "value"], [[k, val] for k, val in train_config.items() if k not in ("data", "batch_sizes")]))
    else:
        out.append("Not recorded with this export." + (f" Trained for {step} optimizer steps." if step is not None else ""))
    out.append("## Data")
    datasets = (train_config or {}).get("data") or []
    if datasets:
        fixed = any(x.get("batch_size") is not None for x in datasets)
        mixed = "each micro-batch holding batch_size samples of each dataset" if fixed else "mixed by weight"
        out.append(f"Image-caption shards and the nouns of their captions as labels, {mixed}:")
        out.append(_records_table([{k: v for k, v in dict(x).items() if v is not None} for x in datasets]))  # no empty batch_size column
    else:
        out.append("Not recorded with this export.")
    if data_stats:
        out.append("Samples read during training, and those skipped by reason:")
        out.append(_table(["counter", "value"], [[k, val] for k, val in data_stats.items()]))
    out.append("## Evaluation")
    if evaluation:
        out.append("Semantic recall (R), precision (P) and F1 of the top-k labels against the labels of each sample's caption:")
        out.append(_records_table(evaluation))
    else:
        out.append(f"Not evaluated yet: `python -m jobs.evaluate --checkpoint {name} --shards ... --labels ... --output ...` scores it.")
    out.append("## How to load")
    out.append(f"""The whole model (this project's `model` package), then labels for an image:

```python
from PIL import Image
import torch
from model.nxtp import NxTP
from model.sampling import one_shot
from model.vision import preprocess

model = NxTP.from_pretrained("{name}")  # a folder, or a hub id (from the local cache when HF_HUB_OFFLINE=1)
image = preprocess(model.cfg.vision.image_size)(Image.open("photo.jpg").convert("RGB"))
with torch.inference_mode():
    print(one_shot(model, image[None], model.tokenizer, k=10)[0])
```

or `python -m jobs.infer --checkpoint {name} --image photo.jpg`.

The decoder alone is a `transformers` Llama whose vocabulary includes `<|image|>` and the pad token
(NxTP feeds the projected image tokens as `inputs_embeds` before the prompt, under a mask that lets
them see each other):

```python
from transformers import AutoTokenizer, LlamaForCausalLM
decoder = LlamaForCausalLM.from_pretrained("{name}", subfolder="decoder")
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

The ViT alone is an `open_clip` vision tower (`visual.*`; CLIP's pooled projection and the text tower
are not part of NxTP and stay as open_clip initializes them):

```python
import open_clip
clip = open_clip.create_model("local-dir:<this folder>/vision", load_weights=False)
result = open_clip.load_checkpoint(clip, "<this folder>/vision/open_clip_model.safetensors", strict=False)
assert not result.unexpected_keys
_, tokens = clip.visual(images)  # the patch tokens NxTP projects into its decoder
```""")
    out.append("## Files")
    out.append(_table(["file", "holds"], [
        ["config.json", "the NxTP config (`model`), format version"],
        ["configuration_nxtp.py", "`AutoConfig`'s class for `model_type: nxtp` (`config.json`'s `auto_map`; `trust_remote_code=True`)"],
        ["model.safetensors", "the token projection `vision.proj.weight` (what the two parts below do not hold)"],
        ["decoder/", "`config.json` + `model.safetensors`: a `LlamaForCausalLM`"],
        ["vision/", "`open_clip_config.json` + `open_clip_model.safetensors`: an open_clip ViT"],
        ["tokenizer.model, tokenizer_config.json, special_tokens_map.json", "the SentencePiece tokenizer and its special tokens"],
    ]))  # fmt: skip
    return "\n\n".join(out) + "\n"
