"""Reading and writing weights: this project's exports, local CLIP and LLaMA weights, released NxTP files.

This project's format (``save_pretrained`` / ``load_pretrained``) is a Hugging Face model
folder whose decoder loads in transformers and whose ViT loads in open_clip; its layout
is described in model/export.py. Folders of the earlier format (config.json +
model.safetensors + tokenizer.model) still load.

Nothing is fetched from a network here: every path is a local file the user already
has, except a hub id given to ``load_model``, which huggingface_hub resolves (from its
cache when offline). Pickled files are read with ``weights_only=True`` (no arbitrary code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile

import torch

from model import export, hub
from model.config import DecoderConfig, NxTPConfig
from model.convert import (
    KeyMapper,
    WeightError,
    decoder_from_hf,
    decoder_from_meta,
    load_state_strict,
    strip_prefix,
    vision_config_from_openai,
    vision_from_openai,
)
from model.nxtp import NxTP, init_special_rows
from model.tokenizer import Tokenizer
from model.vision import vision_config_from_open_clip

# ----------------------------------------------------------------------------- this project's format


def save_pretrained(model: NxTP, tokenizer: Tokenizer, out_dir: str, extra: dict | None = None, card: dict | None = None) -> str:
    """Write the export folder ``out_dir`` atomically (a temporary sibling folder renamed when complete).

    ``extra`` goes into config.json (e.g. the step); ``card`` is what the model card
    README.md says beyond the model itself (``model.card.model_card``'s keyword arguments).
    """
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    previous, model.tokenizer = model.tokenizer, tokenizer
    try:
        export.write_folder(model, tokenizer, tmp, extra)
        model.generate_model_card(**(card or {})).save(os.path.join(tmp, "README.md"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.tokenizer = previous
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def read_config(path: str) -> tuple[NxTPConfig, dict]:
    """(model config, the whole config.json) of an exported model folder."""
    return export.read_config(path)


def check_pretrained(path: str) -> NxTPConfig:
    """Check an exported model against its config without loading tensors (every file, key and shape)."""
    return export.check_folder(path)


def load_pretrained(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[NxTP, Tokenizer]:
    """An exported model folder, in eval mode, and its tokenizer."""
    return export.load_folder(path, device, dtype)


# ----------------------------------------------------------------------------- files of other projects


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors, a (weights-only) torch file, or a TorchScript archive."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if _is_torchscript(path):  # OpenAI's CLIP releases: parameters only, no code is run
        return dict(torch.jit.load(path, map_location="cpu").state_dict())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:
        raise WeightError(f"{path}: cannot be read as weights only ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightError(f"{path}: holds {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_clip_visual(path: str) -> dict[str, torch.Tensor]:
    """The ``visual.*`` tensors of an OpenAI or open_clip CLIP checkpoint (text tower left out)."""
    sd = load_tensors(path)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    if not visual:
        raise WeightError(f"{path}: no 'visual.*' keys: not a CLIP checkpoint")
    if "visual.conv1.weight" not in visual:
        raise WeightError(f"{path}: the vision tower is not a ViT (no 'visual.conv1.weight')")
    return visual


def meta_decoder_config(params_path: str, n_layers: int, vocab_size: int, max_seq_len: int = 512) -> DecoderConfig:
    """A DecoderConfig from Meta's ``params.json``."""
    with open(params_path) as f:
        p = json.load(f)
    dim = p["dim"]
    hidden = int(2 * 4 * dim / 3)
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    multiple = p.get("multiple_of", 256)
    hidden = multiple * ((hidden + multiple - 1) // multiple)
    if n_layers > p["n_layers"]:
        raise ValueError(f"{params_path}: the model has {p['n_layers']} layers, cannot keep {n_layers}")
    return DecoderConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads"),
        hidden_dim=hidden,
        norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=p.get("rope_theta", 10000.0),
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
    )


def load_meta_llama(params_path: str, n_layers: int, vocab_size: int) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Meta's ``consolidated.*.pth`` beside ``params.json`` (model-parallel shards are merged)."""
    folder = os.path.dirname(os.path.abspath(params_path))
    shards = sorted(f for f in os.listdir(folder) if re.fullmatch(r"consolidated\.\d+\.pth", f))
    if not shards:
        raise FileNotFoundError(f"{folder}: no consolidated.*.pth beside params.json")
    cfg = meta_decoder_config(params_path, n_layers, vocab_size)
    parts = [torch.load(os.path.join(folder, s), map_location="cpu", weights_only=True, mmap=True) for s in shards]
    keep = re.compile(r"(tok_embeddings|output|norm)\.weight$|layers\.(\d+)\.")
    sd = {}
    for key in parts[0]:
        m = keep.match(key)
        if not m or (m.group(2) is not None and int(m.group(2)) >= n_layers):
            continue  # rope.freqs, and the blocks the truncation drops
        tensors = [p[key] for p in parts]
        if len(tensors) == 1 or key.endswith("norm.weight"):
            sd[key] = tensors[0]
        else:  # model-parallel split: rows for wq/wk/wv/w1/w3/output, columns for wo/w2/tok_embeddings
            dim = 1 if re.search(r"(wo|w2)\.weight$|tok_embeddings", key) else 0
            sd[key] = torch.cat(tensors, dim=dim)
    return cfg, sd


def load_hf_llama(folder: str, n_layers: int) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """A local Hugging Face LLaMA folder (config.json + safetensors or .bin weights), first ``n_layers`` blocks."""
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{folder}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (default only)")
    if n_layers > c["num_hidden_layers"]:
        raise ValueError(f"{folder}: the model has {c['num_hidden_layers']} layers, cannot keep {n_layers}")
    cfg = DecoderConfig(
        dim=c["hidden_size"],
        n_layers=n_layers,
        n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads"),
        hidden_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
        vocab_size=c["vocab_size"],
        max_seq_len=512,
    )
    wanted = re.compile(r"model\.(embed_tokens|norm)\.weight$|lm_head\.weight$|model\.layers\.(\d+)\.")

    def needed(key: str) -> bool:
        m = wanted.match(key)
        return bool(m) and (m.group(2) is None or int(m.group(2)) < n_layers)

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) or sorted(
        f for f in os.listdir(folder) if re.fullmatch(r"pytorch_model.*\.bin", f)
    )
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for name in files:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                sd.update({k: f.get_tensor(k) for k in f.keys() if needed(k)})
        else:
            sd.update({k: v for k, v in load_tensors(path).items() if needed(k)})
    return cfg, sd


# ----------------------------------------------------------------------------- building models


def build_from_pretrained(
    tokenizer_path: str,
    llama: str,
    n_layers: int = 6,
    clip_weights: str | None = None,
    vision_name: str = "ViT-L-14",
    image_size: int | None = None,
) -> tuple[NxTP, Tokenizer]:
    """A model to train: CLIP's ViT and LLaMA's first ``n_layers`` blocks from local files.

    ``llama`` is a Hugging Face folder or Meta's ``params.json`` (with its
    consolidated.*.pth beside it). New parameters (the token projection, the special
    rows) are initialized as in the paper. Without ``clip_weights`` the ViT is random.
    """
    tok = Tokenizer(tokenizer_path)
    if os.path.isdir(llama):
        dcfg, dsd = load_hf_llama(llama, n_layers)
        mapper = KeyMapper(dsd, llama)
        decoder_from_hf(mapper, dcfg)
    else:
        dcfg, dsd = load_meta_llama(llama, n_layers, tok.n_base)
        mapper = KeyMapper(dsd, llama)
        decoder_from_meta(mapper, "", dcfg, extended=False)
    if dcfg.vocab_size != tok.n_base:
        raise WeightError(f"{llama}: vocabulary of {dcfg.vocab_size}, tokenizer {tokenizer_path} has {tok.n_base}")
    decoder_sd, _ = mapper.finish(ignore=["lm_head.weight"])
    vision_sd: dict[str, torch.Tensor] = {}
    if clip_weights:
        visual = load_clip_visual(clip_weights)
        vcfg = vision_config_from_openai(visual, "visual.")
        if image_size and image_size != vcfg.image_size:
            raise ValueError(f"{clip_weights} is a {vcfg.image_size}px ViT; image_size {image_size} would need new position embeddings")
        vmap = KeyMapper(visual, clip_weights)
        vision_from_openai(vmap, "visual.", vcfg, with_projection=False)
        vision_sd, _ = vmap.finish(ignore=["visual.proj"])  # CLIP's pooled projection: unused
    else:
        vcfg = vision_config_from_open_clip(vision_name, image_size=image_size)
    model = NxTP(NxTPConfig(vision=vcfg, decoder=dcfg))
    init_special_rows(model.decoder)
    state = model.state_dict()
    lm_head = state["decoder.lm_head.weight"].clone()
    lm_head[: dcfg.vocab_size] = decoder_sd.pop("decoder.lm_head.weight")
    merged = {**state, **vision_sd, **decoder_sd, "decoder.lm_head.weight": lm_head}
    load_state_strict(model, merged, f"{llama} + {clip_weights or 'random ViT'}")
    model.tokenizer = tok
    return model, tok


def import_nxtp(
    checkpoint: str,
    tokenizer_path: str,
    clip_weights: str | None = None,
    llama_params: str | None = None,
    max_seq_len: int = 512,
) -> tuple[NxTP, Tokenizer, list[str]]:
    """A released NxTP checkpoint (``torch.load`` dict with ``model``) as a model, with notes.

    The released files hold only the trained parameters, so the frozen ViT blocks come
    from ``clip_weights``; a file that holds every key needs none. The ViT shape is read
    from the weights; the decoder's heads and norm epsilon from Meta's ``params.json``
    (without it: head size 128 and epsilon 1e-5, LLaMA-2's values, and a note says so).
    """
    tok = Tokenizer(tokenizer_path)
    sd = load_tensors(checkpoint)
    notes = []
    if not any(k.startswith("language_decoder.") for k in sd):
        raise WeightError(f"{checkpoint}: no 'language_decoder.*' keys: not an NxTP checkpoint")
    if clip_weights:
        base = {"vision_encoder." + k: v for k, v in strip_prefix(load_clip_visual(clip_weights), "visual.").items()}
        taken = [k for k in base if k not in sd and k != "vision_encoder.proj"]
        sd = {**{k: base[k] for k in taken}, **sd}
        notes.append(f"{len(taken)} frozen vision tensors taken from {clip_weights}")
    if "vision_encoder.conv1.weight" not in sd:
        raise WeightError(
            f"{checkpoint}: missing key 'vision_encoder.conv1.weight': released NxTP checkpoints hold only "
            "the trained parameters; pass the base CLIP weights (--clip-weights ViT-L-14.pt)"
        )
    vcfg = vision_config_from_openai(sd, "vision_encoder.")
    emb = sd["language_decoder.tok_embeddings.weight"]
    if emb.shape[0] != tok.n_base + 2:
        raise WeightError(f"{checkpoint}: 'language_decoder.tok_embeddings.weight' has {emb.shape[0]} rows; the tokenizer's {tok.n_base} + 2 special tokens expected")
    n_layers = len({m.group(1) for k in sd if (m := re.match(r"language_decoder\.layers\.(\d+)\.attention\.wq\.weight$", k))})
    hidden = sd["language_decoder.layers.0.feed_forward.w1.weight"].shape[0]
    dim = emb.shape[1]
    if llama_params:
        dcfg = meta_decoder_config(llama_params, n_layers, tok.n_base, max_seq_len)
        if (dcfg.dim, dcfg.hidden_dim) != (dim, hidden):
            raise WeightError(f"{llama_params}: dim {dcfg.dim} / ffn {dcfg.hidden_dim} do not match the checkpoint's {dim} / {hidden}")
    elif dim % 128 == 0:
        dcfg = DecoderConfig(dim=dim, n_layers=n_layers, n_heads=dim // 128, hidden_dim=hidden, vocab_size=tok.n_base, max_seq_len=max_seq_len)
        notes.append(f"no params.json: assumed {dim // 128} heads of 128 and norm epsilon 1e-5 (LLaMA-2)")
    else:
        raise WeightError(f"{checkpoint}: decoder width {dim} is not LLaMA-2's; pass its params.json (--llama-params)")
    mapper = KeyMapper(sd, checkpoint)
    vision_from_openai(mapper, "vision_encoder.", vcfg, with_projection=True)
    decoder_from_meta(mapper, "language_decoder.", dcfg, extended=True)
    mapped, ignored = mapper.finish(ignore=["vision_encoder.logit_scale"])
    notes += [f"{k}: not used for recognition, ignored" for k in ignored]
    model = NxTP(NxTPConfig(vision=vcfg, decoder=dcfg))
    load_state_strict(model, mapped, checkpoint)
    model.tokenizer = tok
    return model.eval(), tok, notes


_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _looks_like_weights(path: str) -> bool:
    """A file ``load_tensors`` may read: a torch file (a zip archive or a legacy pickle) or one named as weights."""
    if path.lower().endswith(_WEIGHT_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"  # torch.save's zip archive; a pickle's protocol opcode


def check_checkpoint_file(checkpoint: str, tokenizer_path: str | None) -> None:
    """A checkpoint given as a file must be a released NxTP checkpoint, and those need the LLaMA tokenizer."""
    if not _looks_like_weights(checkpoint):
        raise ValueError(f"{checkpoint} is not a checkpoint: neither an exported model folder nor a released NxTP checkpoint (a torch .pth)")
    if not tokenizer_path:
        raise ValueError(f"{checkpoint} is a released NxTP checkpoint: pass the LLaMA tokenizer (--tokenizer tokenizer.model)")


def load_model(
    checkpoint: str,
    tokenizer_path: str | None = None,
    clip_weights: str | None = None,
    llama_params: str | None = None,
    local_files_only: bool = False,
) -> tuple[NxTP, Tokenizer, list[str]]:
    """An exported model (a folder, or a hub id: see ``model.hub.resolve``), or a released NxTP ``.pth`` (which needs ``tokenizer_path``)."""
    if os.path.isfile(checkpoint):
        check_checkpoint_file(checkpoint, tokenizer_path)
        return import_nxtp(checkpoint, tokenizer_path, clip_weights, llama_params)
    if not os.path.isdir(checkpoint) and not hub.is_hub_id(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model, tok = load_pretrained(hub.resolve(checkpoint, local_files_only=local_files_only))
    return model, tok, []
