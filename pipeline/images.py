"""Images as the web serves them: decode whatever a browser would display, upright, in bounded memory.

:func:`decode_image` turns a body into an upright RGB picture:

- every raster format Pillow reads (JPEG baseline and progressive, CMYK and Adobe-inverted
  CMYK JPEG, PNG in every colour type and bit depth, palette images with transparency,
  GIF / APNG / animated WebP (their first frame), WebP, AVIF, BMP, TIFF, ICO);
- 16-bit samples scaled to 8 bits (Pillow's own conversion would clip them), transparency
  composited on white (as img2dataset does), an embedded ICC profile converted to sRGB
  (as a browser colour-manages), the EXIF orientation applied so photos are stored upright;
- a decompression bomb is refused before its pixels are allocated: the header's width x
  height is checked against ``max_image_area`` (and Pillow's own limit, which also applies);
  a large JPEG is decoded at a reduced DCT scale when only a smaller picture is needed, so
  peak memory follows the output size, not the file's.

Decoding needs only Pillow and numpy (``jobs.infer`` and ``jobs.serve`` decode with it in the
``infer`` extra's install); resizing and re-encoding use OpenCV (the ``data`` extra's).

:class:`ImageResizer` has img2dataset's ``Resizer`` interface (a stream in; image bytes,
sizes and an error message out), with the same resize modes and failure messages that
:func:`pipeline.ingest.classify_error` reads: ``not_an_image: <kind>`` when the body
announces no image format (an HTML page served with status 200), ``decode_error: <format>``
when it announces one that does not decode, ``image area too large: ...`` for a bomb.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# 8192 x 8192: larger than any camera's photo a web page shows, and 64x smaller than a 64k x 64k bomb;
# decoding one such image takes about 200 MB (RGB), 270 MB with an alpha channel.
DEFAULT_MAX_IMAGE_AREA = 8192 * 8192
MAX_SIDE = 65500  # the longest side a JPEG (and OpenCV's encoder) can hold
# Pillow refuses larger images on its own (DecompressionBombError, 2 x Image.MAX_IMAGE_PIXELS)
PILLOW_AREA_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (b"BM", "bmp"),
)
_FTYP_IMAGES = {b"avif", b"avis", b"heic", b"heix", b"hevc", b"mif1", b"msf1"}
_SRGB = ImageCms.createProfile("sRGB")


def image_format(head: bytes) -> str | None:
    """The raster image format announced by a body's first bytes, or None when it announces none."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_IMAGES:
        return "avif" if head[8:12] in (b"avif", b"avis") else "heif"
    return None


def body_kind(head: bytes) -> str:
    """What a body that is not a raster image looks like: html, svg, xml, json, empty or unknown."""
    text = head.lstrip().lower()
    if not head:
        return "empty"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "html"
    if b"<svg" in text:
        return "svg"
    if text.startswith((b"<?xml", b"<")):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "json"
    return "unknown"


class ImageRefused(ValueError):
    """A body that is stored as a counted failure; the message starts with its reason."""


def _undecodable(data: bytes) -> ImageRefused:
    head = data[:64]
    fmt = image_format(head)
    return ImageRefused(f"decode_error: {fmt}" if fmt else f"not_an_image: {body_kind(head)}")


def _area_error(width: int, height: int, limit: int) -> ImageRefused:
    return ImageRefused(
        f"image area too large: {width}x{height} = {width * height / 1e6:.1f} Mpx > {limit / 1e6:.1f} Mpx (max_image_area)"
    )


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: 16-bit scaled, transparency on white, ICC profile applied."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr.astype(np.float32) / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK"):
        img = _to_srgb(img, icc)
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.getchannel("A"))
        img = white
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """Colour-manage to sRGB as a browser does; a profile that cannot be read leaves the pixels as they are."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower():
            return img
        alpha = img.getchannel("A") if img.mode == "RGBA" else None
        source = img.convert("RGB") if img.mode == "RGBA" else img
        out = ImageCms.profileToProfile(source, profile, _SRGB, outputMode="RGB")
        if out is None:
            return img
        if alpha is not None:
            out.putalpha(alpha)
        return out
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img


def decode_image(data: bytes, max_image_area: int = DEFAULT_MAX_IMAGE_AREA, min_size: tuple[int, int] | None = None) -> Image.Image:
    """An upright RGB picture of ``data`` (its first frame); raises :class:`ImageRefused` naming the reason.

    ``min_size`` (width, height): the smallest size the caller needs; a JPEG larger than
    twice that is decoded at a reduced DCT scale (still at least that large).
    """
    return _decode(data, max_image_area, min_size)[0]


def _decode(data: bytes, max_image_area: int, min_size: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    """(upright RGB picture, its full-resolution upright size): a draft-decoded JPEG is smaller than its header says."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRefused(f"image area too large: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise _undecodable(data) from None
    width, height = img.size
    if width * height > max_image_area:
        raise _area_error(width, height, max_image_area)
    if width < 1 or height < 1:
        raise _undecodable(data)
    try:
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, KeyError, IndexError):
        orientation = 1
    original = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    try:
        if min_size is not None and img.format == "JPEG":
            # the needed size in the stored (not yet rotated) orientation: the scale is the same either way
            scale = max(min_size[0] / width, min_size[1] / height, min_size[0] / height, min_size[1] / width)
            if scale < 0.5:
                img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_8bit_rgb(img), original
    except Image.DecompressionBombError as err:
        raise ImageRefused(f"image area too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, ZeroDivisionError):
        raise _undecodable(data) from None


def target_size(width: int, height: int, image_size: int, resize_mode: str) -> tuple[int, int]:
    """(width, height) a picture is scaled to before any crop or border (img2dataset's rules)."""
    if resize_mode == "no":
        return width, height
    side = min(width, height) if resize_mode in ("keep_ratio", "center_crop") else max(width, height)
    scale = image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


class ImageResizer:
    """Decode, orient, resize and re-encode one image (img2dataset's ``Resizer`` interface).

    ``__call__(stream) -> (jpeg bytes, width, height, original_width, original_height, error)``;
    on failure every value but ``error`` is None. ``original_*`` are the upright picture's size.
    """

    def __init__(
        self,
        image_size: int,
        resize_mode: str = "keep_ratio",
        max_image_area: int = DEFAULT_MAX_IMAGE_AREA,
        encode_quality: int = 95,
        min_image_size: int = 0,
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        if not 1 <= max_image_area <= PILLOW_AREA_LIMIT:
            raise ValueError(f"max_image_area must be in [1, {PILLOW_AREA_LIMIT}] (Pillow's own bomb limit), not {max_image_area}")
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.max_image_area = max_image_area
        self.encode_quality = encode_quality
        self.min_image_size = min_image_size

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        try:
            return (*self.resize(data), None)
        except ImageRefused as err:
            return None, None, None, None, None, str(err)

    def resize(self, data: bytes) -> tuple[bytes, int, int, int, int]:
        """(jpeg bytes, width, height, original width, original height); raises :class:`ImageRefused`."""
        needed = None if self.resize_mode == "no" else (self.image_size, self.image_size)
        img, original = _decode(data, self.max_image_area, needed)
        if min(original) < self.min_image_size:
            raise ImageRefused("image too small")
        import cv2  # the data stack's: decoding alone (jobs.infer, the infer extra) needs only Pillow

        size = target_size(*original, self.image_size, self.resize_mode)
        if size[0] * size[1] > self.max_image_area or max(size) > MAX_SIDE:  # a sliver (65536 x 1) scaled up: gigabytes
            raise ImageRefused(
                f"aspect ratio too large: {original[0]}x{original[1]} would be scaled to {size[0]}x{size[1]} "
                f"(more than {self.max_image_area:,} pixels (--max-image-area) or {MAX_SIDE:,} on a side)"
            )
        pixels = np.asarray(img)
        try:
            if size != (img.width, img.height):
                shrink = size[0] * size[1] < img.width * img.height
                pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
            pixels = self._crop_or_pad(pixels)
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), self.encode_quality])
        except cv2.error as err:  # whatever OpenCV refuses is this image's failure, never its shard's
            raise ImageRefused(f"decode_error: could not resize or re-encode ({str(err).strip().splitlines()[-1]})") from None
        if not ok:  # pragma: no cover - an RGB uint8 array always encodes
            raise ImageRefused("decode_error: could not re-encode")
        return encoded.tobytes(), pixels.shape[1], pixels.shape[0], original[0], original[1]

    def _crop_or_pad(self, pixels: np.ndarray) -> np.ndarray:
        s = self.image_size
        h, w = pixels.shape[:2]
        if self.resize_mode == "center_crop":
            top, left = (h - s) // 2, (w - s) // 2
            return np.ascontiguousarray(pixels[max(0, top) : max(0, top) + s, max(0, left) : max(0, left) + s])
        if self.resize_mode == "border":
            import cv2

            top, left = (s - h) // 2, (s - w) // 2
            return cv2.copyMakeBorder(pixels, top, s - h - top, left, s - w - left, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return pixels

