"""ONNX export (jobs.export_onnx) and one-shot sampling in onnxruntime (jobs.infer --onnx) against the PyTorch model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
import torch
from PIL import Image

from jobs import export_onnx, infer
from model.checkpoint import load_pretrained, save_pretrained
from model.onnx_export import WEIGHTS
from model.onnx_export import export_onnx as write_onnx
from model.onnx_runtime import load_onnx
from model.sampling import one_shot, sample_tokens
from model.vision import preprocess
from tests.test_model import _tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


def _external(path: str) -> dict[str, tuple[int, int]]:
    """(offset, length) in weights.bin of each initializer of the graph at ``path`` that lies there."""
    graph = onnx.load(path, load_external_data=False)
    out = {}
    for t in graph.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == WEIGHTS
            out[t.name] = (int(info["offset"]), int(info["length"]))
    return out


def _val_images(world, n: int) -> list[str]:
    return [os.path.join(world.root, s["file"]) for s in world.samples("val") if s["kind"] == "good"][:n]


def _assert_same_labels(expected, got, tol=1e-4):
    for a, b in zip(expected, got, strict=True):
        assert a.labels == b.labels
        torch.testing.assert_close(torch.tensor(b.probs), torch.tensor(a.probs), rtol=0, atol=tol)


@pytest.mark.parametrize("external", ["auto", "always"])
def test_onnx_graphs_sample_what_pytorch_samples(tmp_path, tok, external):
    """Tokens, probabilities and label lengths of one-shot sampling, on a batch and k other than the traced ones."""
    model = _tiny_model(tok)
    config = write_onnx(model, tok, str(tmp_path), external)
    onnx_model, onnx_tok = load_onnx(str(tmp_path))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompt = tok.prompt_ids(model.cfg.prompt)
    ref = sample_tokens(model, images, prompt, tok.delimiter_id, k=6, max_steps=9)
    got = sample_tokens(onnx_model, images, prompt, tok.delimiter_id, k=6, max_steps=9)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-5)
    lengths = ref[2].flatten().tolist()
    assert min(lengths) <= 1 and max(lengths) == 8, "labels that end at once and labels cut at the step limit are covered"
    _assert_same_labels(one_shot(model, images, tok, k=6, max_steps=9), one_shot(onnx_model, images, onnx_tok, k=6, max_steps=9))

    if external == "auto":  # a small model: the weights stay in the graphs
        assert config["external_data"] is None and not os.path.exists(tmp_path / WEIGHTS)
        assert not _external(str(tmp_path / "prefill.onnx"))
        return
    prefill, decode = _external(str(tmp_path / "prefill.onnx")), _external(str(tmp_path / "decode.onnx"))
    assert "model.decoder.embed.base.weight" in decode
    # the decoder's weights, which both graphs hold, are stored once: the decode graph points at the prefill graph's
    assert set(decode.values()) <= set(prefill.values())
    assert os.path.getsize(tmp_path / WEIGHTS) == config["external_data_bytes"] == max(o + n for o, n in prefill.values())
    assert os.path.getsize(tmp_path / "decode.onnx") < 100_000


def test_auto_moves_weights_past_the_limit_to_external_data(tmp_path, tok, monkeypatch):
    """What "auto" does past protobuf's 2 GiB, with the limit lowered to 1 MB (the tiny graphs hold 3-7 MB)."""
    from model import onnx_export as onnx_module

    monkeypatch.setattr(onnx_module, "INLINE_LIMIT", 1_000_000)
    model = _tiny_model(tok)
    assert write_onnx(model, tok, str(tmp_path), "auto")["external_data"] == WEIGHTS
    assert _external(str(tmp_path / "decode.onnx"))
    onnx_model, onnx_tok = load_onnx(str(tmp_path))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _assert_same_labels(one_shot(model, images, tok, k=4), one_shot(onnx_model, images, onnx_tok, k=4))


def test_export_refuses_missing_weights_and_a_foreign_output(tmp_path, tok, capsys):
    from safetensors.torch import load_file, save_file

    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    decoder = os.path.join(export, "decoder", "model.safetensors")
    tensors = load_file(decoder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, decoder, metadata={"format": "pt"})
    out = tmp_path / "onnx"
    assert export_onnx.main(["--checkpoint", export, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{decoder}: missing key 'model.layers.1.mlp.up_proj.weight'" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".onnx")], "nothing half-written"

    os.remove(decoder)
    assert export_onnx.main(["--checkpoint", export, "--output", str(out)]) == 2
    assert f"{decoder}: missing (the export's weights are incomplete)" in capsys.readouterr().err

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert export_onnx.main(["--checkpoint", export, "--output", str(foreign)]) == 2
    assert "not an ONNX export of this project" in capsys.readouterr().err
    assert os.listdir(foreign) == ["todo.txt"]


def test_infer_onnx_refuses_what_only_pytorch_does(tmp_path):
    for extra in (["--caption"], ["--attention-map", str(tmp_path)], ["--precision", "bf16"], ["--checkpoint", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_:
            infer.main(["--onnx", str(tmp_path), "--image", "a.jpg", *extra])
        assert exit_.value.code == 2


def test_cli_exports_then_infers_with_onnxruntime(tmp_path, world, tok, repo_root):
    """`python -m jobs.export_onnx` then `python -m jobs.infer --onnx`: the labels PyTorch gives those images."""
    model = _tiny_model(tok)
    export = save_pretrained(model, tok, str(tmp_path / "export"))
    out = str(tmp_path / "model_onnx")
    run = subprocess.run(
        [sys.executable, "-m", "jobs.export_onnx", "--checkpoint", export, "--output", out, "--external-data", "always"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "check: onnxruntime and PyTorch agree on 2 random image(s)" in run.stdout
    assert sorted(os.listdir(out)) == ["config.json", "decode.onnx", "prefill.onnx", "tokenizer.model", WEIGHTS]
    assert json.load(open(os.path.join(out, "config.json")))["export"]["checkpoint"] == export

    images = _val_images(world, 3)
    run = subprocess.run(
        [sys.executable, "-m", "jobs.infer", "--onnx", out, "--image", *images, "--k", "5", "--format", "json", "--batch-size", "2"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)
    transform = preprocess(model.cfg.vision.image_size)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    expected = one_shot(model, batch, tok, k=5)
    assert [r["image"] for r in got] == images
    for r, e in zip(got, expected):
        assert r["labels"] == e.labels
        torch.testing.assert_close(torch.tensor(r["probs"]), torch.tensor(e.probs), rtol=0, atol=1e-4)  # printed with 5 decimals


def test_demo_model_in_onnxruntime_gives_its_pytorch_labels(demo_run, tmp_path):
    """The trained demo model, 16 held-out images, top-10 labels: the same labels, probabilities within 1e-4."""
    from pipeline.synthetic import load_world

    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    model, tok = load_pretrained(os.path.join(out, "run", "export"))
    write_onnx(model, tok, str(tmp_path))
    onnx_model, onnx_tok = load_onnx(str(tmp_path))
    transform = preprocess(model.cfg.vision.image_size)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in _val_images(load_world(os.path.join(out, "world")), 16)])
    expected = one_shot(model, images, tok, k=10)
    assert all(e.probs[0] > 0.2 for e in expected), "a trained model: its labels are not a flat spread"
    _assert_same_labels(expected, one_shot(onnx_model, images, onnx_tok, k=10))


def test_onnx_bench_records_both_runtimes_side_by_side(tmp_path, tok):
    """The benchmark's plumbing on a tiny model (its figures are recorded in benchmarks/results, not asserted)."""
    from benchmarks import onnx_bench

    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    out = tmp_path / "onnx_cpu_tiny.json"
    args = ["--checkpoint", export, "--name", "tiny", "--batch", "2", "--ks", "3", "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert onnx_bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["command"] == "python -m benchmarks.onnx_bench " + " ".join(args)
    (row,) = result["results"]
    assert row["k"] == 3 and row["agreement"].startswith("2/2 images with identical labels")
    for figures in (row, result["prefill"]):
        assert figures["pytorch_images_per_s"] > 0 and figures["onnxruntime_images_per_s"] > 0
        assert figures["ratio"] == pytest.approx(figures["onnxruntime_images_per_s"] / figures["pytorch_images_per_s"], rel=0.02)
