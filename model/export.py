"""The exported model as a Hugging Face model folder, each part in its own library's layout.

Format 2, written by :func:`write_folder` (every weight stored once)::

    config.json                          {"model_type": "nxtp", "format": "nxtp", "format_version": 2, "model": NxTPConfig, ...}
    model.safetensors                    what neither part below holds: the token projection ``vision.proj.weight``
    decoder/config.json                  a ``LlamaForCausalLM`` config; vocabulary = the tokenizer's + <|image|> + <|empty|>
    decoder/model.safetensors            the truncated decoder in transformers' Llama names
    vision/open_clip_config.json         open_clip's model config for the ViT (see :func:`open_clip_config`)
    vision/open_clip_model.safetensors   the ViT in open_clip's names (``visual.*``), without CLIP's pooled projection
    tokenizer.model                      the SentencePiece model the vocabulary was built from
    tokenizer_config.json                transformers' declaration of the tokenizer: <|image|>, the pad token <|empty|>
    special_tokens_map.json
    configuration_nxtp.py                model/hf_config.py, named in config.json's ``auto_map`` (``AutoConfig``)
    README.md                            the model card (model/card.py)

Format 1 (config.json + the whole state dict in model.safetensors + tokenizer.model)
is still read. Hub ids are model/hub.py's.

A damaged folder is refused with a :class:`WeightError` naming the file and what is wrong
with it (a missing file or key, a shape, JSON that does not parse, a config.json without
its ``model``, a tokenizer.model SentencePiece cannot read), before any tensor is loaded.

A model read by :func:`load_folder` keeps what the folder holds beyond the model itself:
config.json's other keys (``step``, ``checkpoint``: ``model.export_extra``) and the model
card (``model.export_card``), which ``NxTP.save_pretrained`` / ``push_to_hub`` write back,
so that loading and saving again gives the same config.json (in format 2) and README.md.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from model import convert
from model.config import IMAGE_TOKEN, PAD_TOKEN, DecoderConfig, NxTPConfig, VisionConfig
from model.convert import KeyMapper, WeightError
from model.nxtp import NxTP
from model.precision import place
from model.tokenizer import Tokenizer

FORMAT, FORMAT_VERSION = "nxtp", 2
CONFIG_CODE = "configuration_nxtp.py"  # AutoConfig's class for config.json's model_type: model/hf_config.py, copied
READABLE_VERSIONS = (1, 2)
REST_FILE = "model.safetensors"
DECODER_FILE = "decoder/model.safetensors"
VISION_FILE = "vision/open_clip_model.safetensors"
DECODER_CONFIG = "decoder/config.json"
VISION_CONFIG = "vision/open_clip_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
CARD_FILE = "README.md"
# config.json's keys that write_folder writes itself; the others are its ``extra`` (kept by load_folder)
WRITTEN_KEYS = ("model_type", "auto_map", "format", "format_version", "model", "tokenizer", "image_token_id", "pad_token_id")
# what open_clip needs for a CLIP model when NxTP's ViT has no named base model: a text tower that no weights fill
PLACEHOLDER_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


# ----------------------------------------------------------------------------- the state dict, split by file


def split_state(sd: dict[str, torch.Tensor], cfg: NxTPConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The model's state dict as the tensors of each weight file (relative path -> tensors)."""
    parts = {
        DECODER_FILE: convert.decoder_to_hf(sd, cfg.decoder),
        VISION_FILE: convert.vision_to_openai(sd, "visual.", cfg.vision, with_projection=False),
    }
    parts[REST_FILE] = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "vision.vit."))}
    return parts


def join_state(parts: dict[str, dict[str, torch.Tensor]], cfg: NxTPConfig, folder: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_state`; a key that is missing or not used raises, naming its file."""
    decoder = KeyMapper(parts[DECODER_FILE], os.path.join(folder, DECODER_FILE))
    convert.decoder_from_hf(decoder, cfg.decoder, extended=True)
    vision = KeyMapper(parts[VISION_FILE], os.path.join(folder, VISION_FILE))
    convert.vision_from_openai(vision, "visual.", cfg.vision, with_projection=False)
    return {**decoder.finish()[0], **vision.finish()[0], **parts[REST_FILE]}


# ----------------------------------------------------------------------------- configs of the parts


def llama_config(cfg: DecoderConfig, tok: Tokenizer, dtype: torch.dtype) -> dict:
    """transformers' ``LlamaConfig`` of the decoder (written by hand: exporting needs no transformers).

    The rope base is written both ways (``rope_theta``: transformers 4, ``rope_parameters``: 5).
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size + len(tok.specials),
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def open_clip_config(cfg: VisionConfig) -> dict:
    """open_clip's ``open_clip_config.json`` for the ViT, read by ``create_model("local-dir:<export>/vision")``.

    open_clip builds a whole CLIP: the text tower and the pooled projection ``visual.proj``
    are not part of NxTP, so they stay as open_clip initializes them (the named base
    model's text tower when the ViT has a name, else a one-block placeholder).
    """
    from open_clip import get_model_config
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    base = get_model_config(cfg.name) if cfg.name else None
    vision_cfg = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "width": cfg.width,
        "layers": cfg.layers,
        "head_width": cfg.width // cfg.heads,
        "mlp_ratio": cfg.mlp_ratio,
        "output_tokens": True,
    }
    return {
        "model_cfg": {
            "embed_dim": base["embed_dim"] if base else cfg.width,
            "quick_gelu": cfg.quick_gelu,
            "vision_cfg": vision_cfg,
            "text_cfg": base["text_cfg"] if base else PLACEHOLDER_TEXT_CFG,
        },
        # model/vision.py preprocess(): CLIP's eval transform
        "preprocess_cfg": {
            "size": cfg.image_size,
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def tokenizer_configs(tok: Tokenizer, max_length: int) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json): LLaMA's tokenizer with <|image|> and the pad token appended."""

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}

    unk = tok.sp.unk_id()
    specials = {
        "bos_token": tok.sp.id_to_piece(tok.bos_id),
        "eos_token": tok.sp.id_to_piece(tok.eos_id),
        "unk_token": tok.sp.id_to_piece(unk) if unk >= 0 else None,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IMAGE_TOKEN],
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "added_tokens_decoder": {str(i): added(text) for i, text in sorted(tok.specials.items())},
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": max_length,
        "sp_model_kwargs": {},
    }
    return config, specials


# ----------------------------------------------------------------------------- writing


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_folder(model: NxTP, tok: Tokenizer, folder: str, extra: dict | None = None) -> None:
    """Every file of the export but README.md into ``folder`` (made if missing). ``extra`` goes into config.json."""
    from safetensors.torch import save_file

    from model import hf_config  # transformers: imported for writing only

    cfg = model.cfg
    if tok.n_base != cfg.decoder.vocab_size:
        raise WeightError(f"{tok.path}: the tokenizer has {tok.n_base} pieces, the model {cfg.decoder.vocab_size}")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    parts = split_state(sd, cfg)
    lost = sorted(set(sd) - set(join_state(parts, cfg, folder)))
    if lost:
        raise WeightError(f"the export layout has no place for key '{lost[0]}'")
    for rel, tensors in parts.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        save_file(tensors, os.path.join(folder, rel), metadata={"format": "pt"})  # "pt": what transformers checks
    _write_json(os.path.join(folder, DECODER_CONFIG), llama_config(cfg.decoder, tok, sd["decoder.lm_head.weight"].dtype))
    _write_json(os.path.join(folder, VISION_CONFIG), open_clip_config(cfg.vision))
    shutil.copyfile(tok.path, os.path.join(folder, "tokenizer.model"))
    tok_config, specials = tokenizer_configs(tok, cfg.decoder.max_seq_len)
    _write_json(os.path.join(folder, "tokenizer_config.json"), tok_config)
    _write_json(os.path.join(folder, "special_tokens_map.json"), specials)
    shutil.copyfile(hf_config.__file__, os.path.join(folder, CONFIG_CODE))
    config = {  # WRITTEN_KEYS, then the extra
        "model_type": hf_config.MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{CONFIG_CODE.removesuffix('.py')}.{hf_config.NxTPHFConfig.__name__}"},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "tokenizer": "tokenizer.model",
        "image_token_id": tok.image_id,
        "pad_token_id": tok.pad_id,
        **(extra or {}),
    }
    _write_json(os.path.join(folder, "config.json"), config)


# ----------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; anything else raises a WeightError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise WeightError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise WeightError(f"{path}: holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_config(folder: str) -> tuple[NxTPConfig, dict]:
    """(model config, the whole config.json) of an export of a readable format version."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: not an exported NxTP model (no config.json)")
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        raise WeightError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise WeightError(f"{path}: format version {meta.get('format_version')}, this code reads {', '.join(map(str, READABLE_VERSIONS))}")
    if "model" not in meta:
        raise WeightError(f"{path}: missing key 'model' (the NxTP config)")
    if not isinstance(meta["model"], dict):
        raise WeightError(f"{path}: key 'model' holds a JSON {type(meta['model']).__name__}, not the NxTP config")
    try:
        cfg = NxTPConfig.from_dict(meta["model"])
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as err:
        raise WeightError(f"{path}: key 'model' is not a valid NxTP config ({type(err).__name__}: {err})") from err
    return cfg, meta


def read_tokenizer(path: str) -> Tokenizer:
    """The export's tokenizer.model; missing or unreadable raises a WeightError naming it."""
    if not os.path.isfile(path):
        raise WeightError(f"{path}: missing (the export needs its tokenizer)")
    try:
        return Tokenizer(path)
    except RuntimeError as err:  # sentencepiece: "could not parse ModelProto"
        raise WeightError(f"{path}: not a readable SentencePiece model ({str(err).strip()})") from err
    except ValueError as err:  # no BOS/EOS, no "," piece: the message names the file
        raise WeightError(str(err)) from err


def weight_files(folder: str) -> list[str]:
    """The weight files of an export, in a fixed order (format 1: model.safetensors only)."""
    _, meta = read_config(folder)
    rels = [REST_FILE] if meta["format_version"] == 1 else [REST_FILE, DECODER_FILE, VISION_FILE]
    return [os.path.join(folder, rel) for rel in rels]


def _expected_files(cfg: NxTPConfig, version: int) -> dict[str, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        sd = NxTP(cfg).state_dict()
    parts = {REST_FILE: sd} if version == 1 else split_state(sd, cfg)
    return {rel: {k: tuple(v.shape) for k, v in tensors.items()} for rel, tensors in parts.items()}


def _check_weights(path: str, expected: dict[str, tuple[int, ...]]) -> None:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise WeightError(f"{path}: missing (the export's weights are incomplete)")
    try:
        with safe_open(path, framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise WeightError(f"{path}: not a readable safetensors file ({err})") from err
    for key, shape in expected.items():
        if key not in found:
            raise WeightError(f"{path}: missing key '{key}' (config.json expects shape {shape})")
        if found[key] != shape:
            raise WeightError(f"{path}: key '{key}' has shape {found[key]}, config.json expects {shape}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise WeightError(f"{path}: unexpected key '{extra[0]}'")


def _check_part_config(path: str, expected: dict, section: str | None = None) -> None:
    """The values of ``expected`` equal those of the JSON file (of its ``section``), else a WeightError naming the file and key."""
    if not os.path.isfile(path):
        raise WeightError(f"{path}: missing (the export is incomplete)")
    found = _read_json(path)
    if section:
        found = found.get(section) if isinstance(found.get(section), dict) else {}
    for key, value in expected.items():
        if found.get(key) != value:
            name = f"{section}.{key}" if section else key
            raise WeightError(f"{path}: {name} is {found.get(key)!r}, config.json's model needs {value!r}")


def check_folder(folder: str) -> NxTPConfig:
    """Check an export against its config.json without loading tensors: every file, key and shape, the parts' configs."""
    cfg, meta = read_config(folder)
    version = meta["format_version"]
    for rel, expected in _expected_files(cfg, version).items():
        _check_weights(os.path.join(folder, rel), expected)
    tok_path = os.path.join(folder, "tokenizer.model")
    tok = read_tokenizer(tok_path)
    if tok.n_base != cfg.decoder.vocab_size:
        raise WeightError(f"{tok_path}: the tokenizer has {tok.n_base} pieces, the model {cfg.decoder.vocab_size}")
    if version >= 2:
        llama = llama_config(cfg.decoder, tok, torch.float32)
        shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")  # fmt: skip
        _check_part_config(os.path.join(folder, DECODER_CONFIG), {k: llama[k] for k in shape_keys})
        vision = open_clip_config(cfg.vision)["model_cfg"]
        _check_part_config(os.path.join(folder, VISION_CONFIG), {k: vision[k] for k in ("quick_gelu", "vision_cfg")}, "model_cfg")
    return cfg


def load_folder(folder: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[NxTP, Tokenizer]:
    """An export (format 1 or 2) in eval mode, and its tokenizer (also set as ``model.tokenizer``).

    The model keeps config.json's other keys as ``model.export_extra`` and README.md as
    ``model.export_card``, for ``save_pretrained`` to write back.
    """
    from safetensors.torch import load_file

    cfg = check_folder(folder)
    meta = read_config(folder)[1]
    if meta["format_version"] == 1:
        state = load_file(os.path.join(folder, REST_FILE))
    else:
        state = join_state({rel: load_file(os.path.join(folder, rel)) for rel in (REST_FILE, DECODER_FILE, VISION_FILE)}, cfg, folder)
    model = NxTP(cfg)
    convert.load_state_strict(model, state, folder)
    model = place(model, device, dtype or torch.float32)  # the float32 rule: model.precision
    model.tokenizer = Tokenizer(os.path.join(folder, "tokenizer.model"))
    model.export_extra = {k: v for k, v in meta.items() if k not in WRITTEN_KEYS}
    card = os.path.join(folder, CARD_FILE)
    if os.path.isfile(card):
        with open(card, encoding="utf-8", newline="") as f:  # as huggingface_hub's ModelCard.save wrote it
            model.export_card = f.read()
    return model, model.tokenizer
