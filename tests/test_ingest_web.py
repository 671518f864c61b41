"""Ingestion as the web really is: transient failures retried, failed rows re-fetched, every image a
browser shows stored upright, bombs refused, opt-outs honoured; against the world's HTTP server.

Every fault is placed by the server's paths (pipeline.synthetic: /flaky/<n>/<code>/, /hang/<n>/,
/reset/<n>/, /status/<code>/, /header/<Name>/<value>/): counted per URL, never timed, so each
run gives the same outcome on every machine.
"""

from __future__ import annotations

import io
import json
import os

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import ingest, synthetic
from pipeline.images import ImageResizer, decode_image
from schemas import SHARD_MANIFEST, read_table
from tests.test_ingest import ray_driver, row_outcomes, run_job, shard_samples, summary_of, time_limit  # noqa: F401, F811 - fixtures

W, H = 120, 80  # a landscape picture: left half red, right half blue, top quarter green
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def pattern(w: int = W, h: int = H) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :], a[: h // 4] = RED, BLUE, GREEN
    return Image.fromarray(a)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rotated_jpeg(orientation: int) -> bytes:
    """A JPEG whose pixels are stored turned, with the EXIF orientation that turns them back to ``pattern()``."""
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pattern().transpose(turn), "JPEG", quality=95, exif=exif.tobytes())


def _four_colours() -> Image.Image:
    pal = Image.new("P", (1, 1))
    pal.putpalette([*RED, *BLUE, *GREEN, 255, 255, 0])
    return pal


def browser_formats() -> dict[str, bytes]:
    """The pattern in every encoding a browser displays (and that decodes to the same picture)."""
    p = pattern()
    rgba = p.convert("RGBA")
    rgba.putpixel((0, H - 1), (0, 0, 0, 0))
    palette = p.quantize(palette=_four_colours())  # indices 0-2 used; 3 (yellow) is transparent
    palette.putpixel((0, H - 1), 3)
    frames = [p, Image.new("RGB", (W, H), (255, 255, 0))]
    gray16 = (np.asarray(p.convert("L")).astype(np.uint16) * 257)
    rgb16 = np.asarray(p)[..., ::-1].astype(np.uint16) * 257  # cv2 writes BGR
    return {
        "baseline.jpg": encode(p, "JPEG", quality=95),
        "progressive.jpg": encode(p, "JPEG", quality=95, progressive=True),
        "cmyk.jpg": encode(p.convert("CMYK"), "JPEG", quality=95),
        "rot3.jpg": rotated_jpeg(3),
        "rot6.jpg": rotated_jpeg(6),
        "rot8.jpg": rotated_jpeg(8),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(palette, "PNG", transparency=3),
        "gray16.png": cv2.imencode(".png", gray16)[1].tobytes(),
        "rgb16.png": cv2.imencode(".png", rgb16)[1].tobytes(),
        "la.png": encode(p.convert("LA"), "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "lossless.webp": encode(p, "WEBP", lossless=True),
        "animated.webp": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "photo.avif": encode(p, "AVIF", quality=90),
        "bitmap.bmp": encode(p, "BMP"),
        "scan.tiff": encode(p, "TIFF"),
    }


def assert_pattern(pixels: np.ndarray, grey: bool = False) -> None:
    """The picture is ``pattern()`` the right way up (colours within codec error)."""
    h, w = pixels.shape[:2]
    assert w > h, f"stored {w}x{h}: not upright"
    left, right, top = pixels[h * 3 // 4, w // 8].astype(int), pixels[h * 3 // 4, w * 7 // 8].astype(int), pixels[h // 10, w // 2].astype(int)
    if grey:  # luminance of red > green > blue is not the point here; the three areas differ and stay in place
        assert top[0] > left[0] > right[0]
        return
    for got, want in ((left, RED), (right, BLUE), (top, GREEN)):
        assert np.abs(got - np.array(want)).max() < 40, (got, want)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(browser_formats()))
def test_every_browser_format_is_stored_upright(name):
    data = browser_formats()[name]
    img, width, height, original_width, original_height, error = ImageResizer(40, "keep_ratio")(io.BytesIO(data))
    assert error is None, error
    assert (width, height) == (60, 40) and (original_width, original_height) == (W, H)
    stored = np.asarray(Image.open(io.BytesIO(img)))
    assert stored.shape == (40, 60, 3) and img[:3] == b"\xff\xd8\xff"
    assert_pattern(stored, grey=name in ("gray16.png", "la.png"))


def test_decoding_details():
    # transparent -> white, as img2dataset composites
    for name in ("palette.png", "rgba.png"):
        assert tuple(np.asarray(decode_image(browser_formats()[name]))[H - 1, 0]) == (255, 255, 255), name
    gray = np.asarray(pattern().convert("L"))
    gray16 = np.asarray(decode_image(browser_formats()["gray16.png"]))[..., 0]
    assert np.abs(gray16.astype(int) - gray).max() <= 1  # scaled from 16 bits, not clipped (all 255)
    big = encode(pattern(1600, 1200), "JPEG", quality=90)  # decoded at a reduced DCT scale, sizes still the file's
    img, width, height, original_width, original_height, error = ImageResizer(100, "center_crop")(io.BytesIO(big))
    assert error is None and (width, height, original_width, original_height) == (100, 100, 1600, 1200)


def test_decompression_bombs_are_refused_before_decoding():
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 Mpx in a small file, past Pillow's own limit
    assert len(bomb) < 200_000
    resizer = ImageResizer(64)
    error = resizer(io.BytesIO(bomb))[-1]
    assert error.startswith("image area too large") and ingest.classify_error(error) == "image_area_too_large"
    big = encode(Image.new("L", (3000, 2000)), "PNG")  # 6 Mpx: under Pillow's limit, over ours
    error = ImageResizer(64, max_image_area=5_000_000)(io.BytesIO(big))[-1]
    assert error == "image area too large: 3000x2000 = 6.0 Mpx > 5.0 Mpx (max_image_area)"
    assert ImageResizer(64, max_image_area=6_000_000)(io.BytesIO(big))[-1] is None
    with pytest.raises(ValueError, match="Pillow's own bomb limit"):
        ImageResizer(64, max_image_area=10**12)


def test_slivers_that_resizing_would_blow_up_are_refused():
    """A 65536 x 1 PNG of a few bytes would scale to 16,777,216 x 256 (about 13 GB) in keep_ratio."""
    sliver = encode(Image.new("L", (65536, 1)), "PNG")
    assert len(sliver) < 1000
    for mode in ("keep_ratio", "center_crop"):
        error = ImageResizer(256, mode)(io.BytesIO(sliver))[-1]
        assert error.startswith("aspect ratio too large: 65536x1 would be scaled to 16777216x256"), error
        assert ingest.classify_error(error) == "aspect_ratio_too_large"
    assert ImageResizer(256, "border")(io.BytesIO(sliver))[-1] is None  # scaled down to 256 x 1, then padded
    wide = encode(Image.new("L", (400, 1)), "PNG")  # 102,400 x 256: over the 65,500 px a JPEG can hold on a side
    assert ImageResizer(256)(io.BytesIO(wide))[-1].startswith("aspect ratio too large: 400x1")
    img, width, height = ImageResizer(256)(io.BytesIO(encode(Image.new("L", (100, 1)), "PNG")))[:3]  # 25,600 x 256: kept
    assert (width, height) == (25600, 256) and img[:3] == b"\xff\xd8\xff"


def test_undecodable_bodies_say_why():
    resizer = ImageResizer(64)
    jpeg = browser_formats()["baseline.jpg"]
    assert resizer(io.BytesIO(jpeg[: len(jpeg) // 2]))[-1] == "decode_error: jpeg"
    assert resizer(io.BytesIO(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"))[-1] == "not_an_image: svg"
    assert resizer(io.BytesIO(b"<!doctype html><p>gone</p>"))[-1] == "not_an_image: html"


# ----------------------------------------------------------------------------- fetching


def test_reasons_and_transience():
    assert ingest.check_reasons(["timeout", "http_5xx", "http_429", "http_404"]) == ("timeout", "http_5xx", "http_429", "http_404")
    with pytest.raises(ValueError, match="unknown failure reason"):
        ingest.check_reasons(["timeouts"])
    assert [ingest.is_transient(r) for r in ("timeout", "connection_error", "http_503", "http_429", "http_404", "not_an_image", "decode_error")] == [
        True, True, True, True, False, False, False,
    ]  # fmt: skip
    assert ingest.reason_matches("http_502", "http_5xx") and not ingest.reason_matches("http_404", "http_5xx")
    assert ingest.classify_error("file too large: 5 bytes > 4 (max_image_bytes)") == "file_too_large"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A served folder: the pattern in every format, a bomb, a body over the size cap; yields (base URL, folder)."""
    root = tmp_path_factory.mktemp("site")
    for name, data in browser_formats().items():
        (root / name).write_bytes(data)
    (root / "bomb.png").write_bytes(encode(Image.new("1", (20000, 20000)), "PNG"))
    (root / "over-cap.png").write_bytes(encode(Image.new("1", (9000, 9000)), "PNG"))  # 81 Mpx > the default 67 Mpx
    noise = np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    (root / "heavy.png").write_bytes(encode(Image.fromarray(noise), "PNG"))  # about 3 MB
    (root / "page.html").write_bytes(b"<!doctype html><html><body>not here</body></html>")
    with synthetic.serve(str(root)) as base:
        yield base, root


# a /hang/ request costs this long; an answered one on 127.0.0.1 must never take as long, also on a loaded
# 2-core machine (at 1 s, one suite run saw a spurious timeout: a retry too many in the count asserted below)
TIMEOUT_S = 4


def test_fetch_retries_transient_failures_with_backoff(site):
    base, _ = site
    pauses: list[float] = []
    policy = ingest.FetchPolicy(timeout=TIMEOUT_S, retries=2, backoff_s=0.4)

    def fetch(path: str) -> ingest.Fetched:
        pauses.clear()
        return ingest.fetch_url(f"{base}/{path}?t=fetch", policy, sleep=pauses.append)

    ok = fetch("flaky/2/500/baseline.jpg")
    assert ok.data == browser_formats()["baseline.jpg"] and ok.retries == 2
    assert 0.2 <= pauses[0] <= 0.4 and 0.4 <= pauses[1] <= 0.8  # backoff, doubling (with jitter)
    assert fetch("flaky/1/429/baseline.jpg").retries == 1 and pauses == [0.0]  # the server's Retry-After: 0 wins
    failed = fetch("flaky/3/503/baseline.jpg")
    assert failed.data is None and ingest.classify_error(failed.error) == "http_503" and failed.retries == 2
    assert fetch("hang/1/baseline.jpg").retries == 1  # a timeout, then the answer
    assert fetch("reset/2/baseline.jpg").retries == 2  # closed unanswered twice
    for permanent in ("status/404/baseline.jpg", "status/403/baseline.jpg"):
        assert fetch(permanent).retries == 0 and pauses == []
    assert fetch("page.html").error is None  # an HTML body downloads; the decoder calls it not_an_image, never retried
    refused = ingest.fetch_url("http://127.0.0.1:9/x.jpg", policy, sleep=pauses.append)
    assert ingest.classify_error(refused.error) == "connection_error" and refused.retries == 2
    capped = ingest.fetch_url(f"{base}/heavy.png", ingest.FetchPolicy(max_bytes=100_000))
    assert capped.data is None and ingest.classify_error(capped.error) == "file_too_large"


def test_x_robots_tag_directives_and_user_agent_token(site):
    base, _ = site

    def error(value: str, **policy) -> str | None:
        quoted = value.replace(":", "%3A").replace(" ", "%20").replace(",", "%2C")
        return ingest.fetch_url(f"{base}/header/X-Robots-Tag/{quoted}/baseline.jpg", ingest.FetchPolicy(**policy)).error

    for directive in ("noai", "noimageai", "noindex", "noimageindex", "noindex, nofollow"):
        assert ingest.classify_error(error(directive)) == "disallowed_by_robots", directive
    assert error("nofollow") is None
    assert error("otherbot: noai", user_agent_token="mybot") is None  # addressed to another crawler
    assert ingest.classify_error(error("mybot: noimageai", user_agent_token="MyBot")) == "disallowed_by_robots"
    assert error("noai", disallowed_header_directives=()) is None
    assert ingest.classify_error(error("noai", disallowed_header_directives=("NoAI ",))) == "disallowed_by_robots"  # any case


def test_urls_are_sent_as_a_browser_sends_them(site):
    """Spaces and non-ASCII letters percent-encoded (the file is found), a URL's own text never a reason."""
    base, root = site
    (root / "café photo.jpg").write_bytes((root / "baseline.jpg").read_bytes())
    fetched = ingest.fetch_url(f"{base}/café photo.jpg", ingest.FetchPolicy())
    assert fetched.error is None and fetched.data == (root / "baseline.jpg").read_bytes()
    assert ingest.request_url("http://bücher.example/a b.jpg?q=é#top") == "http://xn--bcher-kva.example/a%20b.jpg?q=%C3%A9"
    assert ingest.request_url(f"{base}/a%20b.jpg") == f"{base}/a%20b.jpg"  # already encoded: kept
    named = ingest.fetch_url(f"{base}/status/404/timeout.jpg", ingest.FetchPolicy())
    assert ingest.classify_error(named.error) == "http_404" and named.retries == 0
    bad_host = ingest.fetch_url("http://" + "a" * 70 + "é.example/timeout.jpg", ingest.FetchPolicy(retries=2))
    assert bad_host.error == "invalid URL (UnicodeError)" and ingest.classify_error(bad_host.error) == "other" and bad_host.retries == 0


# ----------------------------------------------------------------------------- the job


def write_list(path, rows: list[tuple[str, str]]) -> str:
    path.write_text("".join(f"{caption}\t{url}\n" for caption, url in rows))
    return str(path)


@pytest.mark.cluster
def test_web_ingestion_retries_refetches_and_stores_every_format(site, ray_driver, tmp_path):  # noqa: F811
    """One URL list with every fault, format and opt-out; then --retry-failed twice."""
    base, _ = site
    t = f"?t={tmp_path.name}"
    rows = {
        # name: (url, outcome of the first run, download retries it spends)
        "flaky503": (f"{base}/flaky/2/503/baseline.jpg{t}", "success", 2),
        "flaky429": (f"{base}/flaky/1/429/baseline.jpg{t}", "success", 1),
        "hang1": (f"{base}/hang/1/baseline.jpg{t}", "success", 1),
        "reset1": (f"{base}/reset/1/baseline.jpg{t}", "success", 1),
        "flaky5": (f"{base}/flaky/5/500/baseline.jpg{t}", "http_500", 2),  # 3 tries now, 3 in the retry round
        "hang3": (f"{base}/hang/3/baseline.jpg{t}", "timeout", 2),
        "refused": ("http://127.0.0.1:9/gone.jpg", "connection_error", 2),
        "gone": (f"{base}/status/404/baseline.jpg{t}", "http_404", 0),
        "page": (f"{base}/page.html{t}", "not_an_image", 0),
        "noai": (f"{base}/header/X-Robots-Tag/noai/baseline.jpg{t}", "disallowed_by_robots", 0),
        "mine": (f"{base}/header/X-Robots-Tag/mybot%3A%20noimageai/baseline.jpg{t}", "disallowed_by_robots", 0),
        "theirs": (f"{base}/header/X-Robots-Tag/otherbot%3A%20noai/baseline.jpg{t}", "success", 0),
        "bomb": (f"{base}/bomb.png", "image_area_too_large", 0),
        "over": (f"{base}/over-cap.png", "image_area_too_large", 0),
        "heavy": (f"{base}/heavy.png", "file_too_large", 0),
        **{name: (f"{base}/{name}", "success", 0) for name in sorted(browser_formats())},
    }
    url_list = write_list(tmp_path / "web.tsv", [(name, url) for name, (url, _, _) in rows.items()])
    uid = {name: f"cc3m-{i:09d}" for i, name in enumerate(rows)}
    out = str(tmp_path / "out")
    args = [
        "--source", "cc3m", "--input", url_list, "--output", out, "--samples-per-shard", "8", "--timeout", str(TIMEOUT_S),
        "--retries", "2", "--retry-backoff", "0.01", "--user-agent-token", "mybot", "--max-image-bytes", "1000000",
    ]  # fmt: skip
    assert run_job(*args) == 0
    outcomes = row_outcomes(out)
    assert {name: outcomes[uid[name]] for name in rows} == {name: want for name, (_, want, _) in rows.items()}
    summary = summary_of(out)
    assert summary["download_retries_this_run"] == sum(n for _, _, n in rows.values())
    landed = shard_samples(out)
    for name in browser_formats():  # every format stored, upright, at the image size
        (sample,) = landed[uid[name]]
        assert sample["size"] == (96, 64)
    main_shards = summary["shards"]["total"]

    # round 1: the transient failures of done shards, into a new shard with new keys
    assert run_job(*args, "--retry-failed", "timeout", "connection_error", "http_5xx", "http_429") == 0
    rounds = json.load(open(os.path.join(out, ingest.RETRY_ROUNDS)))
    assert [(r["round"], r["first_shard"], r["shards"], r["rows"]) for r in rounds] == [(1, main_shards, 1, 3)]
    retry_table = pq.read_table(os.path.join(out, rounds[0]["urls"])).to_pylist()
    assert sorted(r["uid"] for r in retry_table) == sorted(uid[n] for n in ("flaky5", "hang3", "refused"))
    landed = shard_samples(out)  # asserts that no key appears twice
    assert all(len(v) == 1 for v in landed.values())
    assert len(landed[uid["flaky5"]]) == 1 and len(landed[uid["hang3"]]) == 1 and uid["refused"] not in landed
    retry_name = f"{main_shards:05d}"
    assert os.path.basename(landed[uid["hang3"]][0]["shard"]) == f"{retry_name}.tar"
    assert landed[uid["hang3"]][0]["key"].startswith(retry_name)
    summary = summary_of(out)
    assert summary["failed"]["connection_error"] == 1 and "timeout" not in summary["failed"] and "http_500" not in summary["failed"]
    assert summary["downloaded"] == sum(want == "success" for _, want, _ in rows.values()) + 2
    assert summary["selected"] == summary["downloaded"] + sum(summary["failed"].values()) and summary["pending"] == 0
    assert summary["retry_rounds"]["replaced_failures"] == {"connection_error": 1, "http_500": 1, "timeout": 1}
    manifest = read_table(os.path.join(out, "manifest.parquet"), SHARD_MANIFEST)
    assert manifest.num_rows == main_shards + 1 and manifest.column("shard").to_pylist()[-1].endswith(f"{retry_name}.tar")

    # round 2: only the row whose latest outcome still failed; a 404 is never retried unless named
    assert run_job(*args, "--retry-failed", "connection_error", "http_5xx") == 0
    rounds = json.load(open(os.path.join(out, ingest.RETRY_ROUNDS)))
    assert [(r["round"], r["first_shard"], r["rows"]) for r in rounds][-1] == (2, main_shards + 1, 1)
    summary = summary_of(out)
    assert summary["failed"]["connection_error"] == 1 and summary["failed"]["http_404"] == 1
    assert summary["selected"] == summary["downloaded"] + sum(summary["failed"].values())
    assert (summary["shards"]["done_before"], summary["shards"]["done_this_run"]) == (main_shards + 1, 1)  # round 1's shard counted before
    # nothing qualifies: no round is planned
    assert run_job(*args, "--retry-failed", "http_5xx") == 0
    assert len(json.load(open(os.path.join(out, ingest.RETRY_ROUNDS)))) == 2
    shards = summary_of(out)["shards"]
    assert (shards["done"], shards["done_before"], shards["done_this_run"]) == (main_shards + 2, main_shards + 2, 0)
