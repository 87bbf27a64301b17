"""Safe image decoding: any file in, an RGB PIL image or a :class:`BadImage` with a short reason out.

Every failure a folder of real images produces (missing or empty files, text named ``.png``,
truncated downloads, decompression bombs, 16-bit scans, palettes with transparency, CMYK JPEGs,
animations) ends here, so sources and the CLI never see a raw Pillow exception.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rdm.data import BadImage

#: refuse images with more pixels than this (Pillow's own warning starts at ~89M)
MAX_PIXELS = 64_000_000

#: formats we decode; the rest stay "not an image". EPS (runs Ghostscript) and exotic scientific
#: or vendor formats are a larger attack surface than a folder of pictures needs.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "QOI", "AVIF")

# Exceptions Pillow's decoders raise on corrupt data (zlib/struct leak out of some plugins).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def decode_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Fully decode the image file at ``path`` into RGB; raise :class:`BadImage` when unusable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as exc:
        raise BadImage(f"unreadable: {exc.strerror or exc}") from None
    if not path.is_file():
        raise BadImage("not a file")
    if size == 0:
        raise BadImage("zero-byte file")
    try:
        with open(path, "rb") as fp:
            return _decode(fp, max_pixels)
    except PermissionError:
        raise BadImage("unreadable: permission denied") from None


def decode_image_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Like :func:`decode_image` for an in-memory encoded image (an upload, a parquet cell)."""
    if not data:
        raise BadImage("zero-byte file")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(fp: BinaryIO, max_pixels: int) -> Image.Image:
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; below our own limit the
    # warning is only noise, above it the warning is a refusal.
    action = "error" if max_pixels <= (Image.MAX_IMAGE_PIXELS or 0) else "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        try:
            im = Image.open(fp, formats=_formats())  # reads the header only
            _check_pixels(im.size, max_pixels)
            im.load()  # full decode of the first frame: truncation and corruption surface here
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise BadImage(_bomb_reason(exc, max_pixels)) from None
        except UnidentifiedImageError as exc:
            raise BadImage(f"not an image: {_first_line(exc)}") from None
        except _DECODE_ERRORS as exc:
            raise BadImage(_corrupt_reason(exc)) from None
        except MemoryError:
            raise BadImage("out of memory while decoding") from None
    return to_rgb(im)


@lru_cache(maxsize=1)
def _formats() -> tuple[str, ...]:
    Image.init()  # registers the plugins; older Pillow lacks some formats (AVIF, QOI)
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise BadImage(f"corrupt: empty image size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w * h} pixels > limit {max_pixels}")


def _bomb_reason(exc: BaseException, max_pixels: int) -> str:
    # Pillow refused in Image.open, before we saw the size; its message carries the pixel count.
    # Its hard error fires above 2 x Image.MAX_IMAGE_PIXELS even when max_pixels allows more.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"decompression bomb: {_first_line(exc)}"
    limit = max_pixels
    if isinstance(exc, Image.DecompressionBombError):
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0))
    return f"decompression bomb: {found[1]} pixels > limit {limit}"


def _corrupt_reason(exc: BaseException) -> str:
    msg = _first_line(exc)
    if "truncated" in msg.lower() or isinstance(exc, EOFError):
        return f"truncated: {msg}" if msg else "truncated"
    return f"corrupt: {msg or type(exc).__name__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # UnidentifiedImageError names the file object (e.g. <_io.BufferedReader ...>); drop that part.
    text = text.split(" <")[0].split(" '")[0] if "cannot identify" in text else text
    return text.splitlines()[0][:200] if text else ""


_HIGH_BIT_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB; transparency is composited on white."""
    try:
        im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with an EXIF flag
    except _DECODE_ERRORS:
        pass  # a broken EXIF block is not worth refusing the pixels for
    if im.mode in _HIGH_BIT_GREY:
        im = Image.fromarray(_scale_to_uint8(np.asarray(im), im.mode), mode="L")
    if im.mode in ("P", "PA", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")  # palettes (RGBA ones too) and tRNS colour keys become alpha
    if im.mode in ("LA", "RGBA"):
        im = _on_white(im)
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV
        except ValueError as exc:
            raise BadImage(f"unsupported image mode {im.mode}: {exc}") from None
    return im


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth grey (H, W) to uint8 by its bit range, not by clipping at 255.

    ``I;16*`` files are 16-bit by format (PNG scales all samples to the full range). ``I`` and ``F``
    carry no depth, so the range the values actually use decides: 0-1 floats, 8/16-bit integers,
    or min-max for anything signed or larger.
    """
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        top = 65535.0
    elif lo >= 0 and mode == "F" and hi <= 1.0:
        top = 1.0
    elif lo >= 0 and hi <= 255:
        top = 255.0
    elif lo >= 0 and hi <= 65535:
        top = 65535.0
    else:  # signed or out-of-range floats: stretch what is there
        a, top = a - lo, max(hi - lo, 1e-12)
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
