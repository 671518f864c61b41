"""jobs.infer on an exported model and on a released-layout checkpoint."""

import json
import os

import pytest
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
