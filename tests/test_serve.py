"""``jobs.serve``: its flags and model wrapper, then its page in a real headless Chromium, driven by Selenium, on the trained demo model.

Chromium and chromedriver are Debian's (``python -m jobs.setup_browser`` installs them;
``make test`` runs it). The server and the browser are real processes on 127.0.0.1;
every wait is bounded.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from PIL import Image

from jobs import infer, serve, setup_browser
from model.checkpoint import save_pretrained
from model.precision import place
from model.sampling import one_shot
from model.tokenizer import Tokenizer
from model.vision import preprocess
from pipeline import synthetic
from pipeline.ray_local import free_port
from tests.test_model import _tiny_model

SERVER_START_S = 120
PAGE_S = 120


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    chromium, driver = setup_browser.find()
    if chromium is None or driver is None:
        pytest.fail("Chromium or chromedriver is missing: run `python -m jobs.setup_browser` (`make test` does)")
    return chromium, driver


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"jobs.serve exited {proc.returncode} before answering:\n{proc.stdout.read()}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"jobs.serve did not answer at {url} within {timeout:.0f}s")


def _chrome(chromium: str, driver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,1300",
    ):  # fmt: skip
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(PAGE_S)
    return chrome


def test_serve_refuses_a_missing_checkpoint_and_bad_flags(tmp_path, capsys):
    assert serve.main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--checkpoint", str(tmp_path), "--num-labels", "0"])
    with pytest.raises(ValueError, match="--num-labels must be in 1..100"):
        serve.ServeConfig(checkpoint=str(tmp_path), num_labels=101)
    with pytest.raises(ValueError, match="--port must be in 1..65535"):
        serve.ServeConfig(checkpoint=str(tmp_path), port=0)


def test_predictor_gives_one_shot_labels_and_attention_pictures(tmp_path, world):
    tok = Tokenizer(world.tokenizer)
    model = _tiny_model(tok)
    export = save_pretrained(model, tok, str(tmp_path / "export"))
    predictor = serve.Predictor(serve.ServeConfig(checkpoint=export, device="cpu"))
    path = next(f"{world.root}/{s['file']}" for s in world.samples("val") if s["kind"] == "good")
    with Image.open(path) as img:
        image = img.convert("RGB")
    labels, probs = predictor.labels(image, 4)
    (expected,) = one_shot(model, preprocess(model.cfg.vision.image_size)(image)[None], tok, k=4)
    assert (labels, probs) == (expected.labels, expected.probs)
    picture = predictor.attention(image, labels[0], layer=-1)
    assert picture.size == (256, 256) and picture.mode == "RGB"
    assert predictor.attention(image, "") is None  # no first token: no map
    # --precision as jobs.infer takes it: the model placed by model.precision.place
    half = serve.Predictor(serve.ServeConfig(checkpoint=export, device="cpu", precision="bf16"))
    assert half.dtype == torch.bfloat16 and half.model.decoder.lm_head.weight.dtype == torch.bfloat16
    (expected,) = one_shot(place(model, "cpu", torch.bfloat16), preprocess(model.cfg.vision.image_size)(image)[None].bfloat16(), tok, k=4)
    assert half.labels(image, 4) == (expected.labels, expected.probs)


def test_page_decodes_uploads_as_infer_does_and_refuses_a_bomb(tmp_path, world, monkeypatch, capsys):
    """The page in Streamlit's own test runner (no server, no browser): an upload is decoded as ``jobs.infer`` decodes a file."""
    from streamlit.testing.v1 import AppTest

    from tests.test_infer import _odd_images, _png_header_only

    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    monkeypatch.setattr(sys, "argv", [serve.PAGE, "--checkpoint", export, "--device", "cpu", "--num-labels", "3"])
    page = AppTest.from_file(serve.PAGE, default_timeout=120)
    page.run()
    assert not page.exception and not page.error
    page.file_uploader[0].set_value(("bomb.png", _png_header_only(100_000, 100_000), "image/png")).run()
    assert not page.exception, "a decompression bomb is a message on the page, not a traceback"
    assert len(page.error) == 1 and page.error[0].value.startswith("cannot read bomb.png as an image: image area too large: ")
    assert not page.html, "no labels for it"
    files, _ = _odd_images(tmp_path, world)
    for path in files:
        with open(path, "rb") as f:
            page.file_uploader[0].set_value((os.path.basename(path), f.read(), "image/png")).run()
        assert not page.exception and not page.error
        assert infer.main(["--checkpoint", export, "--image", path, "--num-labels", "3", "--format", "json"]) == 0
        (expected,) = json.loads(capsys.readouterr().out)
        shown = re.findall(r'data-label="(.*?)" data-prob="([0-9.]+)"', page.html[0].value)
        assert [html.unescape(label) for label, _ in shown] == expected["labels"], path
        assert [float(p) for _, p in shown] == pytest.approx(expected["probs"], abs=1e-5)
    # k: at most the vocabulary's size (one-shot sampling's top-k of the logits)
    predictor = serve.Predictor(serve.ServeConfig(checkpoint=export, device="cpu"))
    assert predictor.max_k == tok.n_base + 2
    with Image.open(files[0]) as img, pytest.raises(ValueError, match=f"vocabulary has {tok.n_base + 2} tokens, k must be in 1..{tok.n_base + 2}"):
        predictor.labels(img.convert("RGB"), tok.n_base + 3)


@pytest.mark.cluster
@pytest.mark.launcher
@pytest.mark.browser
def test_page_shows_the_labels_of_an_uploaded_image(demo_run, browser_paths, tmp_path, capsys, repo_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    out, proc = demo_run
    assert proc.returncode == 0, f"jobs.demo exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    export = os.path.join(out, "run", "export")
    world = synthetic.load_world(os.path.join(out, "world"))
    held_out = [s for s in world.samples("val") if s["kind"] == "good"][-1]
    image = os.path.join(world.root, held_out["file"])
    assert infer.main(["--checkpoint", export, "--image", image, "--num-labels", "5", "--format", "json"]) == 0
    (expected,) = json.loads(capsys.readouterr().out)

    printed = re.search(r"^    page \(.*?\): (.+ -m jobs\.serve .+)$", proc.stdout, re.MULTILINE)
    assert printed, f"jobs.demo ends with the page's command:\n{proc.stdout[-2000:]}"
    command = shlex.split(printed.group(1))
    assert command[command.index("--checkpoint") + 1] == export
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [*command, "--port", str(port), "--num-labels", "5"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    chrome = None
    try:
        _wait_healthy(url, server, SERVER_START_S)
        chrome = _chrome(*browser_paths, str(tmp_path / "profile"))
        chrome.get(url)
        wait = WebDriverWait(chrome, PAGE_S)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]"))).send_keys(image)
        # the page's last element: the top label's attention map, drawn once its labels are shown
        top = expected["labels"][0]
        heat = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'img[alt="attention map of {top}"]')))
        wait.until(lambda c: c.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat))
        rows = chrome.find_elements(By.CSS_SELECTOR, ".nxtp-label")
        shown = [(r.get_attribute("data-label"), float(r.get_attribute("data-prob"))) for r in rows]
        assert [label for label, _ in shown] == expected["labels"]
        for (_, p), q in zip(shown, expected["probs"]):
            assert p == pytest.approx(q, abs=1e-5)
        assert [r.find_element(By.CSS_SELECTOR, ".nxtp-name").text for r in rows] == expected["labels"]
        # choose another label: its map replaces the first one
        second = expected["labels"][1]
        choose = chrome.find_element(By.CSS_SELECTOR, '[data-testid="stSelectbox"] input')
        choose.click()
        choose.send_keys(second, Keys.ENTER)
        heat = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'img[alt="attention map of {second}"]')))
        wait.until(lambda c: c.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat))
        shot = tmp_path / "page.png"
        assert chrome.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        if chrome is not None:
            chrome.quit()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
