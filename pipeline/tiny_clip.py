"""A tiny open_clip model, trained in a minute on image-caption pairs, saved as an open_clip local folder.

No CLIP weights can be downloaded where the project is developed, and a randomly
initialized CLIP of any size scores every image-caption pair alike (its cosine is noise
around 0), so it cannot show that a CLIP-score filter drops mismatched captions. This
model is trained contrastively (open_clip's ``ClipLoss``) for a few hundred steps on the
synthetic world, whose captions name each picture's scene and objects: afterwards it
scores a matching caption above a mismatched one, which is all the curation tests and
the demo need from it. It is saved in open_clip's ``local-dir:`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so the curation job loads
it like any other open_clip model: ``--clip-model local-dir:<folder>``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence

from pipeline.outputs import write_json

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def train_tiny_clip(
    pairs: Sequence[tuple[bytes, str]],
    out_dir: str,
    *,
    steps: int = 150,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 2e-3,
    progress: Callable[[int, float], None] | None = None,
) -> str:
    """Train :data:`TINY_CLIP` on (image bytes, caption) pairs; write it to ``out_dir``; return ``local-dir:<out_dir>``."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP, output_dict=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
    size = TINY_CLIP["vision_cfg"]["image_size"]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)

    def pixels(data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std

    images = torch.stack([pixels(d) for d, _ in pairs])
    texts = tokenizer([c.split("\n")[0] for _, c in pairs])
    loss_fn = open_clip.ClipLoss()
    # the 49k-row token embedding stays as initialized (distinct random vectors): updating it densely
    # every step would cost more than the rest of the model together
    model.token_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.enable_grad():  # whatever the caller's grad mode
        for step in range(steps):
            idx = torch.randperm(len(pairs), generator=generator)[:batch_size]
            out = model(images[idx], texts[idx])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress is not None and (step + 1) % 50 == 0:
                progress(step + 1, float(loss.detach()))
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(out_dir, "open_clip_model.safetensors"),
    )
    preprocess = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "size": size,
    }
    write_json(
        os.path.join(out_dir, "open_clip_config.json"), {"model_cfg": TINY_CLIP, "preprocess_cfg": preprocess}
    )
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(
            f"tiny CLIP trained {steps} steps on {len(pairs)} synthetic image-caption pairs; config {json.dumps(TINY_CLIP)}\n"
        )
    return f"local-dir:{os.path.abspath(out_dir)}"
