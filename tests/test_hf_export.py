"""The export as a Hugging Face model folder: round trip, the decoder in transformers, the ViT in
open_clip, hub ids from a local Hugging Face cache, folders of the earlier format, damaged folders."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import infer
from model import export as export_format
from model.checkpoint import check_pretrained, load_model, load_pretrained, save_pretrained
from model.convert import WeightError
from model.hub import is_hub_id, resolve
from model.nxtp import NxTP
from model.prompt import prefix_mask
from model.sampling import one_shot
from model.tokenizer import Tokenizer
from pipeline.evaluation import CheckpointIdentity, checkpoint_identity
from pipeline.scoring import default_minilm_path
from tests.test_model import _tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")  # forward only: gradients off in this module's tests


FILES = [
    "README.md",
    "config.json",
    "configuration_nxtp.py",
    "decoder/config.json",
    "decoder/model.safetensors",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vision/open_clip_config.json",
    "vision/open_clip_model.safetensors",
]
CARD = {
    "train_config": {
        "lr": 3e-4,
        "steps": 7,
        "data": [{"name": "world", "shards": "/data/shards", "labels": "/data/labels", "weight": 1.0}],
    },
    "step": 7,
    "data_stats": {"samples": 112, "no_labels": 3},
    "evaluation": [{"dataset": "world_val", "k": 10, "R": 0.8125, "P": 0.4375, "F1": 0.5687}],
}


@pytest.fixture(scope="module")
def model(tok) -> NxTP:
    return _tiny_model(tok, seed=5)


@pytest.fixture(scope="module")
def export(model, tok, tmp_path_factory) -> str:
    return save_pretrained(
        model,
        tok,
        str(tmp_path_factory.mktemp("hf") / "export"),
        extra={"step": 7, "checkpoint": "step7"},
        card=CARD,
    )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def expected(model, tok, images) -> list:
    """The model's own one-shot labels (sampling costs about a second here: computed once)."""
    return one_shot(model, images, tok, k=6, max_steps=8)


def _same_weights(a: NxTP, b: NxTP) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _files(folder: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- round trip


def test_round_trip_through_from_pretrained(export, model, tok, images, expected):
    assert _files(export) == FILES
    config = json.load(open(os.path.join(export, "config.json")))
    assert (config["model_type"], config["format_version"], config["step"]) == ("nxtp", 2, 7)
    assert (config["image_token_id"], config["pad_token_id"]) == (tok.image_id, tok.pad_id)
    loaded = NxTP.from_pretrained(export)
    assert not loaded.training and loaded.tokenizer.n_base == tok.n_base
    _same_weights(loaded, model)
    assert one_shot(loaded, images, loaded.tokenizer, k=6, max_steps=8) == expected


def test_every_weight_is_stored_once(export, model):
    from safetensors import safe_open

    stored = 0
    for path in export_format.weight_files(export):
        with safe_open(path, framework="pt") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == sum(v.numel() for v in model.state_dict().values())


def test_mixin_save_pretrained_writes_the_same_folder(export, model, tok, tmp_path):
    """What push_to_hub uploads: huggingface_hub's save_pretrained into a folder, through NxTP._save_pretrained."""
    model.tokenizer = tok
    try:
        model.save_pretrained(tmp_path / "mixin", model_card_kwargs=CARD)
    finally:
        model.tokenizer = None
    assert _files(str(tmp_path / "mixin")) == FILES
    for rel in FILES:
        if rel != "config.json":  # the trainer's extra (step, checkpoint) is in the export's only
            assert (tmp_path / "mixin" / rel).read_bytes() == Path(export, rel).read_bytes(), rel
    with pytest.raises(ValueError, match="needs the tokenizer"):
        model.save_pretrained(tmp_path / "no_tokenizer")


def test_loaded_model_saves_the_same_config_and_card(export, tmp_path, monkeypatch):
    """from_pretrained(...).save_pretrained(...) and push_to_hub keep config.json's step and checkpoint and the whole card."""
    from huggingface_hub import HfApi

    loaded = NxTP.from_pretrained(export)
    assert loaded.export_extra == {"step": 7, "checkpoint": "step7"}
    loaded.save_pretrained(tmp_path / "again")
    assert _files(str(tmp_path / "again")) == FILES
    for rel in FILES:  # config.json and README.md included: every file as the export wrote it
        assert (tmp_path / "again" / rel).read_bytes() == Path(export, rel).read_bytes(), rel
    card = (tmp_path / "again" / "README.md").read_text()
    assert "Trained for 7 optimizer steps" in card and "world_val" in card and "| no_labels | 3 |" in card
    # push_to_hub uploads what save_pretrained writes (the Hub replaced by a copy of the folder it is given)
    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("Repo", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, folder_path, **kw: shutil.copytree(folder_path, uploaded))
    loaded.push_to_hub("nxtp-test/again")
    assert _files(str(uploaded)) == FILES
    assert all((uploaded / rel).read_bytes() == Path(export, rel).read_bytes() for rel in FILES)
    # new card arguments give a new card from them alone; the config keeps its step
    loaded.save_pretrained(tmp_path / "new_card", model_card_kwargs={"evaluation": CARD["evaluation"]})
    new_card = (tmp_path / "new_card" / "README.md").read_text()
    assert "world_val" in new_card and "Trained for 7" not in new_card
    assert (tmp_path / "new_card" / "config.json").read_bytes() == Path(export, "config.json").read_bytes()


def test_model_card(export):
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(export, "README.md"))
    assert card.data.library_name == "nxtp" and card.data.pipeline_tag == "image-to-text"
    assert {"nxtp", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    assert "| world_val | 10 | 0.8125 | 0.4375 | 0.5687 |" in text
    assert "Trained for 7 optimizer steps" in text and "| lr | 0.0003 |" in text
    assert "| world | /data/shards | /data/labels | 1 |" in text and "| no_labels | 3 |" in text
    assert 'LlamaForCausalLM.from_pretrained("owner/name", subfolder="decoder")' in text
    assert "mixed by weight" in text


def test_model_card_of_per_dataset_batches(model):
    from model.card import model_card

    data = [{"name": n, "shards": f"/data/{n}", "labels": f"/data/{n}_labels", "weight": 1.0, "batch_size": b} for n, b in (("coco", 8), ("lvis", 16))]
    text = model_card(model, model._hub_mixin_info.model_card_data, train_config={"batch_size": 24, "batch_sizes": {"coco": 8, "lvis": 16}, "data": data})
    assert "each micro-batch holding batch_size samples of each dataset" in text
    assert "| name | shards | labels | weight | batch_size |" in text and "| lvis | /data/lvis | /data/lvis_labels | 1 | 16 |" in text
    assert "| batch_sizes |" not in text, "said once, in the data table"


# ----------------------------------------------------------------------------- the parts in their own libraries


def test_decoder_in_transformers_gives_the_same_logits(export, model, tok, images):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    assert AutoConfig.from_pretrained(os.path.join(export, "decoder")).vocab_size == tok.n_base + len(
        tok.specials
    )
    hf = LlamaForCausalLM.from_pretrained(os.path.join(export, "decoder")).eval()
    # token ids alone, the special ones included: embedded and scored as inside NxTP
    ids = torch.tensor(
        [tok.prompt_ids(model.cfg.prompt) + [tok.pad_id, tok.image_id] + tok.encode("red circle, star")]
    )
    hidden, _ = model.decoder(model.decoder.embed(ids), prefix_mask(0, ids.shape[1]))
    torch.testing.assert_close(hf(input_ids=ids).logits, model.decoder.lm_head(hidden), rtol=1e-5, atol=1e-5)
    # NxTP's prefill: projected image tokens as inputs_embeds before the prompt, the image block bidirectional
    prompt = torch.tensor([tok.prompt_ids(model.cfg.prompt)]).expand(len(images), -1)
    logits, _, h = model.prefill(images, prompt)
    mask = prefix_mask(model.n_image_tokens, prompt.shape[1])
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(
        hf(inputs_embeds=h, attention_mask=additive).logits[:, -1], logits, rtol=1e-5, atol=1e-5
    )
    # the tokenizer files declare <|image|> and the pad token with NxTP's ids
    hf_tok = AutoTokenizer.from_pretrained(export)
    assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<|empty|>", tok.pad_id)
    assert (
        hf_tok.convert_tokens_to_ids("<|image|>") == tok.image_id and "<|image|>" in hf_tok.all_special_tokens
    )
    assert hf_tok(model.cfg.prompt, add_special_tokens=False)["input_ids"] == tok.encode(model.cfg.prompt)


def test_autoconfig_reads_the_export(export, tmp_path):
    """AutoConfig, the first thing tools call on a model folder: with the folder's own code where this
    package is absent (a fresh process with no `model` import), and without it once registered here."""
    from transformers import AutoConfig

    from model import hf_config

    config = json.load(open(os.path.join(export, "config.json")))
    assert config["model_type"] == hf_config.MODEL_TYPE == "nxtp"
    assert Path(export, "configuration_nxtp.py").read_bytes() == Path(hf_config.__file__).read_bytes()
    code = f"""
import json, sys
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained({export!r})
except ValueError as err:
    print("untrusted:", "trust_remote_code=True" in str(err))
c = AutoConfig.from_pretrained({export!r}, trust_remote_code=True)
print(json.dumps([c.model_type, c.model, c.step, c.image_token_id, c.pad_token_id, "model" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    # refused with the way out named (transformers' prompt text comes first), not "unknown model type"
    assert lines[-2].endswith("untrusted: True"), out.stdout
    assert json.loads(lines[-1]) == ["nxtp", config["model"], 7, config["image_token_id"], config["pad_token_id"], False]
    hf_config.register()
    here = AutoConfig.from_pretrained(export)
    assert isinstance(here, hf_config.NxTPHFConfig) and (here.model, here.format_version) == (config["model"], 2)


def test_vision_tower_in_open_clip_gives_the_same_features(export, model, world):
    import open_clip
    from PIL import Image

    from model.vision import preprocess

    clip, _, transform = open_clip.create_model_and_transforms(
        f"local-dir:{export}/vision", load_weights=False
    )
    result = open_clip.load_checkpoint(clip, f"{export}/vision/open_clip_model.safetensors", strict=False)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if k.startswith("visual.")] == [
        "visual.proj"
    ]  # CLIP's pooled projection: not NxTP's
    clip.eval()
    with Image.open(
        os.path.join(world.root, next(s["file"] for s in world.samples("val") if s["kind"] == "good"))
    ) as img:
        pixels = transform(img.convert("RGB"))
        torch.testing.assert_close(
            pixels, preprocess(model.cfg.vision.image_size)(img.convert("RGB")), rtol=0, atol=0
        )
    _, tokens = clip.visual(pixels[None])
    torch.testing.assert_close(tokens, model.vision.vit(pixels[None])[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.vision.proj(tokens), model.vision(pixels[None]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- hub ids from the local Hugging Face cache


def put_in_hf_cache(folder: str, cache: Path, repo_id: str, commit: str) -> str:
    """``folder`` as huggingface_hub caches a download of ``repo_id`` at ``commit`` (its documented cache layout:
    blobs named by hash, a snapshot of relative symlinks, refs/main naming the commit); the snapshot path."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for rel in _files(folder):
        data = Path(folder, rel).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return str(snapshot)


@pytest.fixture(scope="module")
def hf_cache(export, tmp_path_factory) -> tuple[Path, str]:
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    snapshot = put_in_hf_cache(export, cache, "nxtp-test/tiny", "a" * 40)
    damaged = tmp_path_factory.mktemp("damaged") / "export"
    shutil.copytree(export, damaged)
    _replace_tensor(
        str(damaged / "decoder" / "model.safetensors"),
        "model.layers.1.self_attn.v_proj.weight",
        torch.zeros(64, 128),
    )
    put_in_hf_cache(str(damaged), cache, "nxtp-test/damaged", "b" * 40)
    put_in_hf_cache(default_minilm_path(), cache, "acme/label-embedder", "c" * 40)  # a sentence model, for --embedding-model
    return cache, snapshot


def test_hub_id_resolves_from_the_cache(hf_cache, export, model, tok):
    from huggingface_hub import scan_cache_dir
    from transformers import LlamaForCausalLM

    cache, snapshot = hf_cache
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}  # huggingface_hub reads the layout as its own
    assert {len(r.revisions) for r in repos.values()} == {1} and len(
        next(iter(repos["nxtp-test/tiny"].revisions)).files
    ) == len(FILES)
    assert is_hub_id("nxtp-test/tiny") and not is_hub_id(export) and not is_hub_id("nxtp.pth")
    assert resolve("nxtp-test/tiny", cache_dir=str(cache), local_files_only=True) == snapshot
    loaded = NxTP.from_pretrained("nxtp-test/tiny", cache_dir=str(cache), local_files_only=True)
    _same_weights(loaded, model)
    assert loaded.tokenizer.path == os.path.join(snapshot, "tokenizer.model")
    hf = LlamaForCausalLM.from_pretrained(
        "nxtp-test/tiny", subfolder="decoder", cache_dir=str(cache), local_files_only=True
    )
    assert hf.config.vocab_size == tok.n_base + len(tok.specials)
    with pytest.raises(
        FileNotFoundError,
        match=f"nxtp-test/absent: no such local folder, and no model of that id in the Hugging Face cache {cache}",
    ):
        resolve("nxtp-test/absent", cache_dir=str(cache), local_files_only=True)


_JOBS_SCRIPT = """
import contextlib, io, json, sys
from jobs import evaluate, infer

p = json.load(open(sys.argv[1]))
out, stdout, stderr = {}, io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(stdout):
    out["infer_rc"] = infer.main(["--checkpoint", "nxtp-test/tiny", "--image", *p["images"], "--format", "json", "--num-labels", "6", "--max-steps", "8"])
out["infer"] = json.loads(stdout.getvalue())
cfg = evaluate.EvaluateConfig(checkpoint="nxtp-test/tiny", shards=p["shards"], labels=p["labels"], output=p["output"])
out["checkpoint_flag"] = cfg.checkpoint
_, _, out["image_size"], out["model_path"], _ = evaluate.check_inputs(cfg)
for name in ("damaged", "absent"):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        out[name + "_rc"] = evaluate.main(["--checkpoint", "nxtp-test/" + name, "--shards", p["shards"], "--labels", p["labels"], "--output", p["output"]])
evaluate.check_embedding_model("acme/label-embedder")  # --embedding-model: a model name in the HF cache
for name, embedder in (("embedder_absent", "acme/absent-embedder"), ("embedder_folder", p["shards"])):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        out[name + "_rc"] = evaluate.main(["--checkpoint", "nxtp-test/tiny", "--shards", p["shards"], "--labels", p["labels"],
                                           "--output", p["output"], "--embedding-model", embedder])
out["stderr"] = stderr.getvalue()
json.dump(out, open(sys.argv[2], "w"))
"""


def test_jobs_take_a_hub_id_from_the_cache_offline(hf_cache, model, tok, world, tmp_path, repo_root):
    """jobs.infer and jobs.evaluate in a process whose HF_HUB_CACHE is the test cache, offline (huggingface_hub reads both at import)."""
    from model.vision import preprocess
    from tests.test_evaluate import _jpeg, _write_labels
    from tests.test_shards import write_tar as _write_tar

    cache, snapshot = hf_cache
    shards, labels = tmp_path / "shards", tmp_path / "labels"
    shards.mkdir()
    _write_tar(shards / "00000.tar", [("000000000", {"jpg": _jpeg(world)[0]})])
    _write_labels(str(labels), "00000", {"000000000": ["circle"]})
    image_paths = [os.path.join(world.root, s["file"]) for s in world.samples("val") if s["kind"] == "good"][
        :1
    ]
    params = {
        "images": image_paths,
        "shards": str(shards),
        "labels": str(labels),
        "output": str(tmp_path / "report"),
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "script.py").write_text(_JOBS_SCRIPT)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=repo_root)
    run = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "params.json"), str(tmp_path / "out.json")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    from PIL import Image

    pixels = []
    for path in image_paths:
        with Image.open(path) as img:
            pixels.append(preprocess(model.cfg.vision.image_size)(img.convert("RGB")))
    labels = one_shot(model, torch.stack(pixels), tok, k=6, max_steps=8)
    assert out["infer_rc"] == 0
    assert [r["labels"] for r in out["infer"]] == [x.labels for x in labels]
    assert (
        out["checkpoint_flag"] == "nxtp-test/tiny"
        and out["model_path"] == snapshot
        and out["image_size"] == 32
    )
    assert out["damaged_rc"] == 2 and out["absent_rc"] == 2
    damaged_file = str(
        cache / "models--nxtp-test--damaged" / "snapshots" / ("b" * 40) / "decoder" / "model.safetensors"
    )
    assert (
        f"{damaged_file}: key 'model.layers.1.self_attn.v_proj.weight' has shape (64, 128)" in out["stderr"]
    )
    assert (
        "nxtp-test/absent: no such local folder, and no model of that id in the Hugging Face cache"
        in out["stderr"]
    )
    # --embedding-model: found in the cache above; a name not cached, or a folder without a model, stops the job
    assert out["embedder_absent_rc"] == 2 and out["embedder_folder_rc"] == 2
    assert "acme/absent-embedder: no such local folder, and no model of that id in the Hugging Face cache" in out["stderr"]
    assert f"{shards}: no sentence-transformers model there" in out["stderr"]
    assert not (tmp_path / "report").exists()


# ----------------------------------------------------------------------------- folders of format 1


def _write_format_1(model: NxTP, tok: Tokenizer, folder: Path) -> None:
    """An export as this project wrote them before format 2 (config.json + the whole state dict + tokenizer.model)."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
        metadata={"format": "nxtp"},
    )
    shutil.copyfile(tok.path, folder / "tokenizer.model")
    config = {
        "format": "nxtp",
        "format_version": 1,
        "model": model.cfg.to_dict(),
        "tokenizer": "tokenizer.model",
        "step": 3,
        "checkpoint": "step3",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def test_format_1_folders_still_load(model, tok, images, expected, tmp_path, world, capsys):
    old = tmp_path / "export_v1"
    _write_format_1(model, tok, old)
    assert check_pretrained(str(old)) == model.cfg
    loaded = NxTP.from_pretrained(str(old))
    assert one_shot(loaded, images, loaded.tokenizer, k=6, max_steps=8) == expected
    for other in (load_pretrained(str(old))[0], load_model(str(old))[0]):
        _same_weights(other, model)
    digest = hashlib.sha256(b"model.safetensors\0" + (old / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoint_identity(str(old)) == CheckpointIdentity(
        str(old), digest, 3
    )  # the reports' identity of a format-1 folder
    image = next(os.path.join(world.root, s["file"]) for s in world.samples("val") if s["kind"] == "good")
    assert (
        infer.main(["--checkpoint", str(old), "--image", image, "--num-labels", "3", "--max-steps", "4"]) == 0
    )
    assert "| prob: " in capsys.readouterr().out
    # rewritten in format 2 (the README's recipe), config.json's step and checkpoint are kept
    loaded.save_pretrained(tmp_path / "export_v2")
    config = json.loads((tmp_path / "export_v2" / "config.json").read_text())
    assert (config["format_version"], config["step"], config["checkpoint"], config["model"]) == (2, 3, "step3", model.cfg.to_dict())
    assert list(config)[-2:] == ["step", "checkpoint"]
    # a format-1 folder that does not match its config names the file and key, as before
    config = json.loads((old / "config.json").read_text())
    config["model"]["decoder"]["hidden_dim"] += 8
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightError, match=r"model.safetensors: key 'decoder.layers.0.mlp.gate_proj.weight' has shape"
    ):
        check_pretrained(str(old))


# ----------------------------------------------------------------------------- damaged folders


def _replace_tensor(path: str, key: str, value: torch.Tensor | None, extra: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file({**tensors, **(extra or {})}, path, metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _damaged(export: str, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(export, folder)
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: os.remove(f / "vision" / "open_clip_model.safetensors"), r"vision/open_clip_model.safetensors: missing"),
        (lambda f: _replace_tensor(str(f / "decoder" / "model.safetensors"), "model.layers.2.mlp.up_proj.weight", torch.zeros(344, 64)),
         r"decoder/model.safetensors: key 'model.layers.2.mlp.up_proj.weight' has shape \(344, 64\), config.json expects \(344, 128\)"),
        (lambda f: _replace_tensor(str(f / "vision" / "open_clip_model.safetensors"), "visual.ln_post.bias", None),
         r"vision/open_clip_model.safetensors: missing key 'visual.ln_post.bias'"),
        (lambda f: _replace_tensor(str(f / "model.safetensors"), "vision.proj.weight", None, {"vision.proj.weight": torch.zeros(128, 128), "vision.proj.bias": torch.zeros(128)}),
         r"/model.safetensors: unexpected key 'vision.proj.bias'"),
        (lambda f: (f / "decoder" / "model.safetensors").write_bytes((f / "decoder" / "model.safetensors").read_bytes()[:1000]),
         r"decoder/model.safetensors: not a readable safetensors file"),
        (lambda f: (f / "decoder" / "config.json").write_text((f / "decoder" / "config.json").read_text().replace('"intermediate_size": 344', '"intermediate_size": 352')),
         r"decoder/config.json: intermediate_size is 352, config.json's model needs 344"),
        (lambda f: os.remove(f / "tokenizer.model"), r"tokenizer.model: missing"),
        (lambda f: _edit_config(f, lambda c: c.pop("model")), r"/config.json: missing key 'model' \(the NxTP config\)"),
        (lambda f: (f / "config.json").write_text('{"format": "nxtp", "model": '), r"/config.json: not valid JSON \(Expecting value"),
        (lambda f: (f / "tokenizer.model").write_bytes((f / "tokenizer.model").read_bytes()[:1000]),
         r"tokenizer.model: not a readable SentencePiece model \(.*could not parse ModelProto"),
        (lambda f: _edit_config(f, lambda c: c["model"]["decoder"].update(n_heads="four")),
         r"/config.json: key 'model' is not a valid NxTP config \(TypeError"),
        (lambda f: _edit_config(f, lambda c: c.update(model=[1, 2])), r"/config.json: key 'model' holds a JSON list, not the NxTP config"),
        (lambda f: (f / "config.json").write_text("[]"), r"/config.json: holds a JSON list, not an object"),
        (lambda f: (f / "vision" / "open_clip_config.json").write_text("{"), r"vision/open_clip_config.json: not valid JSON"),
    ],
    ids=["missing file", "wrong shape", "missing key", "unexpected key", "truncated file", "decoder config", "no tokenizer",
         "config without model", "config not JSON", "truncated tokenizer", "model config of wrong types", "model not an object",
         "config a list", "vision config not JSON"],
)  # fmt: skip
def test_damaged_folder_names_the_file_and_key(export, tmp_path, damage, message, world, capsys):
    folder = _damaged(export, tmp_path, "damaged")
    damage(folder)
    with pytest.raises(WeightError, match=message):
        check_pretrained(str(folder))
    with pytest.raises(WeightError, match=message):
        NxTP.from_pretrained(str(folder))
    image = next(os.path.join(world.root, s["file"]) for s in world.samples("val") if s["kind"] == "good")
    assert infer.main(["--checkpoint", str(folder), "--image", image]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: _edit_config(f, lambda c: c.pop("model")), "config.json: missing key 'model' (the NxTP config)"),
        (lambda f: (f / "tokenizer.model").write_bytes((f / "tokenizer.model").read_bytes()[:1000]),
         "tokenizer.model: not a readable SentencePiece model ("),
        (lambda f: (f / "config.json").write_text('{"model": '), "config.json: not valid JSON (Expecting value: line 1 column 11"),
    ],
    ids=["config without model", "truncated tokenizer", "config not JSON"],
)  # fmt: skip
def test_damaged_folder_is_one_error_line_in_every_job(export, tmp_path, damage, message, world, capsys):
    """jobs.infer, jobs.evaluate and jobs.export_onnx refuse the folder with exit status 2 and an error line naming the file."""
    from jobs import evaluate, export_onnx
    from tests.test_evaluate import _jpeg, _write_labels
    from tests.test_shards import write_tar

    folder = _damaged(export, tmp_path, "damaged")
    damage(folder)
    shards, labels = tmp_path / "shards", tmp_path / "labels"
    shards.mkdir()
    write_tar(shards / "00000.tar", [("000000000", {"jpg": _jpeg(world)[0]})])
    _write_labels(str(labels), "00000", {"000000000": ["circle"]})
    image = next(os.path.join(world.root, s["file"]) for s in world.samples("val") if s["kind"] == "good")
    runs = {
        "infer": lambda: infer.main(["--checkpoint", str(folder), "--image", image]),
        "evaluate": lambda: evaluate.main(["--checkpoint", str(folder), "--shards", str(shards), "--labels", str(labels),
                                           "--output", str(tmp_path / "report")]),
        "export_onnx": lambda: export_onnx.main(["--checkpoint", str(folder), "--output", str(tmp_path / "onnx")]),
    }  # fmt: skip
    capsys.readouterr()
    for job, run in runs.items():
        assert run() == 2, job
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (job, err)
        assert err.startswith(f"error: {folder}/") and message in err, (job, err)
    assert not (tmp_path / "report").exists() and not (tmp_path / "onnx").exists()
