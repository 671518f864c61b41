"""jobs.infer on an exported model and on a released-layout checkpoint."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import infer
from model.checkpoint import import_nxtp, save_pretrained
from model.sampling import one_shot
from model.tokenizer import Tokenizer
from model.vision import preprocess
from tests.model_fixtures import official_state_dict
from tests.test_model import _params, _save_official, _tiny_model


def _images(world, n=2):
    good = [s for s in world.samples("val") if s["kind"] == "good"][:n]
    return [f"{world.root}/{s['file']}" for s in good]


def test_infer_exported_model_json(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    model = _tiny_model(tok)
    export = save_pretrained(model, tok, str(tmp_path / "export"))
    images = _images(world)
    assert infer.main(["--checkpoint", export, "--image", *images, "--format", "json", "--num-labels", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == images
    for r in out:
        assert 1 <= len(r["labels"]) <= 5 and r["probs"] == sorted(r["probs"], reverse=True)


def test_infer_released_checkpoint_text_format(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    sd = official_state_dict(tok.n_base, tok.delimiter_id)
    _save_official(tmp_path / "nxtp.pth", sd)
    args = ["--checkpoint", str(tmp_path / "nxtp.pth"), "--tokenizer", tok.path, "--llama-params", _params(tmp_path), "--image", _images(world, 1)[0], "--num-labels", "4"]
    assert infer.main(args) == 0
    lines = [line for line in capsys.readouterr().out.split("\n") if line.startswith("| prob: ")]
    model, _, _ = import_nxtp(str(tmp_path / "nxtp.pth"), tok.path, llama_params=_params(tmp_path))
    with Image.open(args[args.index("--image") + 1]) as img:
        image = preprocess(model.cfg.vision.image_size)(img.convert("RGB"))
    (expected,) = one_shot(model, image[None], tok, k=4)
    assert lines == [f"| prob: {p:.5f} - {label}" for label, p in zip(expected.labels, expected.probs)]


def test_infer_reports_unreadable_image(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>not an image</html>")
    good = _images(world, 1)[0]
    assert infer.main(["--checkpoint", export, "--image", str(broken), good]) == 1
    captured = capsys.readouterr()
    assert f"{broken}: cannot read the image" in captured.err
    assert good in captured.out and "| prob: " in captured.out


def test_infer_caption_greedy_and_beam_as_generate_writes_them(tmp_path, world, capsys):
    import torch

    from model.generate import generate

    tok = Tokenizer(world.tokenizer)
    model = _tiny_model(tok)
    export = save_pretrained(model, tok, str(tmp_path / "export"))
    images = _images(world)
    with torch.no_grad():
        batch = torch.stack([preprocess(model.cfg.vision.image_size)(Image.open(p).convert("RGB")) for p in images])
    for beams in (1, 3):
        assert infer.main(["--checkpoint", export, "--image", *images, "--caption", "--beams", str(beams), "--max-length", "6", "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        expected = generate(model, batch, tok, max_length=6, beams=beams)
        assert [r["caption"] for r in out] == [c.text for c in expected]
        assert [r["tokens"] for r in out] == [len(c.tokens) for c in expected] and all(r["tokens"] <= 6 for r in out)
    assert infer.main(["--checkpoint", export, "--image", images[0], "--caption", "--max-length", "2"]) == 0
    assert "\ncaption: " in capsys.readouterr().out
    assert infer.main(["--checkpoint", export, "--image", images[0], "--caption", "--max-length", "1000"]) == 2
    assert "exceed the model's max_seq_len" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give one of them per run"):
        infer.InferConfig(checkpoint=export, images=images, caption=True, attention_map=str(tmp_path / "maps"))
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", export, "--image", images[0], "--caption", "--attention-map", str(tmp_path / "maps")])
    assert not (tmp_path / "maps").exists()


def test_infer_precision_flag(tmp_path, world, capsys):
    import torch

    from model.checkpoint import load_pretrained
    from model.precision import place

    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    image = _images(world, 1)[0]
    assert infer.main(["--checkpoint", export, "--image", image, "--format", "json", "--num-labels", "5", "--precision", "bf16"]) == 0
    captured = capsys.readouterr()
    assert "on cpu in bfloat16" in captured.err
    model, _ = load_pretrained(export)
    with Image.open(image) as img:
        pixels = preprocess(model.cfg.vision.image_size)(img.convert("RGB"))
    (expected,) = one_shot(place(model, "cpu", torch.bfloat16), pixels[None].bfloat16(), tok, k=5)
    (got,) = json.loads(captured.out)
    assert got["labels"] == expected.labels and got["probs"] == [round(p, 5) for p in expected.probs]
    assert infer.main(["--checkpoint", export, "--image", image]) == 0
    assert "on cpu in float32" in capsys.readouterr().out, "auto is fp32 on a CPU"
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", export, "--image", image, "--precision", "half"])
    assert "invalid choice 'half' for argument '--precision'" in capsys.readouterr().err


def test_infer_writes_an_attention_map_per_image(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    images = _images(world, 2)
    out_dir = tmp_path / "maps"
    args = ["--checkpoint", export, "--image", *images, "--num-labels", "3", "--format", "json", "--attention-map", str(out_dir)]
    assert infer.main([*args, "--layer", "-1", "--head", "0"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["attention_map"] for r in results] == [str(out_dir / os.path.basename(p).replace(".jpg", ".png")) for p in images]
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(r["attention_map"]) for r in results)
    for r in results:
        with Image.open(r["attention_map"]) as png:
            assert png.format == "PNG"
    # the same file name twice: both maps are kept
    assert infer.main(["--checkpoint", export, "--image", images[0], images[0], "--format", "json", "--attention-map", str(out_dir)]) == 0
    paths = [r["attention_map"] for r in json.loads(capsys.readouterr().out)]
    assert len(set(paths)) == 2 and all(os.path.isfile(p) for p in paths)
    assert infer.main([*args, "--layer", "3"]) == 2
    assert "layer 3 is out of range: the decoder has 3 layers (0..2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", export, "--image", images[0], "--head", "1"])
    with pytest.raises(ValueError, match="they need --attention-map DIR"):
        infer.InferConfig(checkpoint=export, images=images, head=1)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (RGB, 8 bit) and that holds no pixels: a decompression bomb's first bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _odd_images(tmp_path, world) -> tuple[list[str], list[Image.Image]]:
    """Files that Pillow's plain ``convert("RGB")`` reads wrongly, and the upright RGB pictures ingestion makes of them."""
    photo = Image.open(_images(world, 1)[0]).convert("RGB").resize((48, 36))
    # a JPEG stored on its side, EXIF orientation 6: shown (and ingested) turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif6.jpg", exif=exif)
    with Image.open(tmp_path / "exif6.jpg") as img:
        stored = img.convert("RGB")
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    # a palette PNG whose colour 0 (black) is transparent: on white, as ingestion composites it
    index = np.zeros((40, 40), np.uint8)
    index[5:20, 5:35], index[22:36, 10:30] = 1, 2
    palette = Image.fromarray(index, "P")
    palette.putpalette([0, 0, 0, 220, 30, 30, 30, 60, 200])
    palette.save(tmp_path / "pal_t.png", transparency=0)
    composited = Image.fromarray(np.array([[255, 255, 255], [220, 30, 30], [30, 60, 200]], np.uint8)[index], "RGB")
    # a 16-bit grey gradient: scaled to 8 bits (65535 -> 255), not clipped to white
    grey16 = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    scaled = Image.fromarray(np.rint(grey16 / 257.0).astype(np.uint8), "L").convert("RGB")
    files = [str(tmp_path / name) for name in ("exif6.jpg", "pal_t.png", "g16.png")]
    for path, picture in zip(files, (upright, composited, scaled)):
        with Image.open(path) as img:
            assert np.asarray(img.convert("RGB")).tolist() != np.asarray(picture).tolist(), f"{path}: Pillow alone reads it right"
    return files, [upright, composited, scaled]


def test_infer_decodes_images_as_ingestion_does(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    model = _tiny_model(tok)
    export = save_pretrained(model, tok, str(tmp_path / "export"))
    files, pictures = _odd_images(tmp_path, world)
    assert infer.main(["--checkpoint", export, "--image", *files, "--format", "json", "--num-labels", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    transform = preprocess(model.cfg.vision.image_size)
    expected = one_shot(model, torch.stack([transform(p) for p in pictures]), tok, k=5)
    assert [r["image"] for r in out] == files
    assert [(r["labels"], r["probs"]) for r in out] == [(e.labels, [round(p, 5) for p in e.probs]) for e in expected]


def test_infer_refuses_a_decompression_bomb_and_labels_the_rest(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    huge = tmp_path / "bomb.png"  # past Pillow's own limit
    huge.write_bytes(_png_header_only(100_000, 100_000))
    large = tmp_path / "large.png"  # under Pillow's limit, over ingestion's max_image_area (8192 x 8192)
    large.write_bytes(_png_header_only(10_000, 10_000))
    truncated = tmp_path / "trunc.jpg"
    good = _images(world, 2)
    truncated.write_bytes(open(good[0], "rb").read()[:600])
    assert infer.main(["--checkpoint", export, "--image", str(huge), good[0], str(large), str(truncated), good[1], "--k", "2", "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert f"error: {huge}: cannot read the image (image area too large: " in captured.err
    assert f"error: {large}: cannot read the image (image area too large: 10000x10000 = 100.0 Mpx > 67.1 Mpx (max_image_area))" in captured.err
    assert f"error: {truncated}: cannot read the image (decode_error: jpeg)" in captured.err
    assert [r["image"] for r in json.loads(captured.out)] == good


def test_infer_k_is_at_most_the_vocabulary_and_given_once(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    model = _tiny_model(tok)
    export = save_pretrained(model, tok, str(tmp_path / "export"))
    image = _images(world, 1)[0]
    vocab = tok.n_base + 2
    assert model.decoder.lm_head.weight.shape[0] == vocab
    assert infer.main(["--checkpoint", export, "--image", image, "--k", str(vocab + 1)]) == 2
    assert f"--num-labels {vocab + 1} is larger than the model's vocabulary of {vocab} tokens: k can be at most {vocab}" in capsys.readouterr().err
    assert infer.main(["--checkpoint", export, "--image", image, "--k", str(vocab), "--max-steps", "2", "--format", "json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)
    assert 1 <= len(got["labels"]) <= vocab
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--checkpoint", export, "--image", image, "--k", "3", "--num-labels", "5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: --k 3 and --num-labels 5: these are one flag under two names" in err
    assert infer.main(["--checkpoint", export, "--image", image, "--k=3", "--num-labels", "3", "--format", "json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)
    assert 1 <= len(got["labels"]) <= 3
    for bad in ("0", "-4"):  # 0 meant the default and a negative number was clamped, in silence
        with pytest.raises(SystemExit) as exit_:
            infer.main(["--checkpoint", export, "--image", image, "--max-steps", bad])
        assert exit_.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path, world, capsys):
    """Said before any model is loaded, by infer and by the page's launcher."""
    from jobs import serve

    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    assert infer.main(["--checkpoint", export, "--image", _images(world, 1)[0], "--device", "cuda"]) == 2
    assert "error: --device cuda: no CUDA GPU is visible here" in capsys.readouterr().err
    assert serve.main(["--checkpoint", export, "--device", "cuda"]) == 2
    assert "error: --device cuda: no CUDA GPU is visible here" in capsys.readouterr().err


def test_infer_says_what_a_checkpoint_file_is(tmp_path, world, capsys):
    tok = Tokenizer(world.tokenizer)
    image = _images(world, 1)[0]
    assert infer.main(["--checkpoint", image, "--image", image]) == 2
    err = capsys.readouterr().err
    assert f"error: {image} is not a checkpoint: neither an exported model folder nor a released NxTP checkpoint" in err
    assert "released NxTP checkpoint: pass the LLaMA tokenizer" not in err
    sd = official_state_dict(tok.n_base, tok.delimiter_id)
    for name in ("nxtp.pth", "nxtp_weights"):  # by its name, or by its contents (torch.save's zip archive)
        _save_official(tmp_path / name, sd)
        assert infer.main(["--checkpoint", str(tmp_path / name), "--image", image]) == 2
        assert f"error: {tmp_path / name} is a released NxTP checkpoint: pass the LLaMA tokenizer" in capsys.readouterr().err
    buffer = io.BytesIO()
    torch.save({"model": sd}, buffer, _use_new_zipfile_serialization=False)  # the legacy pickle format
    (tmp_path / "legacy").write_bytes(buffer.getvalue())
    assert infer.main(["--checkpoint", str(tmp_path / "legacy"), "--image", image]) == 2
    assert "is a released NxTP checkpoint: pass the LLaMA tokenizer" in capsys.readouterr().err
