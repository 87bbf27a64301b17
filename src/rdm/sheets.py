"""PNG contact sheets and image grids, for looking at retrievals and samples.

``contact_sheet`` lays out images with their caption and score underneath (database queries,
pseudo-query draws); ``image_grid`` lays out rows of images with a label on the left (each row:
a query's neighbours, then its samples). ``save_png`` writes either atomically.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from rdm.errors import RdmError
from rdm.io import atomic_write, require_writable

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
EMPTY = (235, 235, 235)  # a cell with no image (ragged rows, missing neighbours)
PAD = 4  # pixels between cells and around text


def contact_sheet(
    images: list[Image.Image],
    captions: list[str] | None = None,
    scores: list[float] | None = None,
    cols: int | None = None,
    cell: int = 96,
    title: str | None = None,
) -> Image.Image:
    """Images in a ``cols``-wide grid (default: about square), caption and score under each cell."""
    if not images:
        raise RdmError("contact sheet: no images to show")
    _check_length("captions", captions, len(images))
    _check_length("scores", scores, len(images))
    cols = max(1, min(cols or math.ceil(math.sqrt(len(images))), len(images)))
    rows = math.ceil(len(images) / cols)
    font = _font(max(9, cell // 9))
    line = _line_height(font)
    label_h = line * ((captions is not None) + (scores is not None))
    title_font = _font(max(12, cell // 6))
    title_h = _line_height(title_font) + PAD if title else 0

    width = cols * (cell + PAD) + PAD
    sheet = Image.new("RGB", (width, title_h + rows * (cell + label_h + PAD) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), _fit(title, title_font, width - 2 * PAD), font=title_font, fill=TEXT)
    for i, image in enumerate(images):
        x = PAD + (i % cols) * (cell + PAD)
        y = title_h + PAD + (i // cols) * (cell + label_h + PAD)
        _paste_fitted(sheet, image, (x, y), cell)
        y += cell
        if captions is not None:
            draw.text((x, y), _fit(captions[i], font, cell), font=font, fill=TEXT)
            y += line
        if scores is not None:
            draw.text((x, y), _fit(f"{scores[i]:.3f}", font, cell), font=font, fill=MUTED)
    return sheet


def image_grid(
    rows: list[list[Image.Image | None]],
    row_labels: list[str] | None = None,
    cell: int = 64,
    gap: int = 2,
) -> Image.Image:
    """Rows of images (ragged rows and ``None`` leave grey cells), a label left of each row."""
    if not rows or not any(rows):
        raise RdmError("image grid: no images to show")
    _check_length("row_labels", row_labels, len(rows))
    cols = max(len(r) for r in rows)
    font = _font(max(9, min(cell // 5, 14)))
    label_w = 0
    if row_labels:
        widest = max(font.getlength(label) for label in row_labels)
        label_w = int(min(widest, 3 * cell)) + 2 * PAD  # long labels are truncated, not the grid

    grid = Image.new(
        "RGB",
        (label_w + cols * (cell + gap) + gap, len(rows) * (cell + gap) + gap),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = gap + r * (cell + gap)
        if row_labels:
            text = _fit(row_labels[r], font, label_w - 2 * PAD)
            draw.text((PAD, y + cell // 2), text, font=font, fill=TEXT, anchor="lm")
        for c in range(cols):
            x = label_w + gap + c * (cell + gap)
            image = row[c] if c < len(row) else None
            if image is None:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=EMPTY)
            else:
                _paste_fitted(grid, image, (x, y), cell)
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG to ``path`` atomically (:func:`rdm.io.atomic_write`); create
    parents. Raises :class:`rdm.io.OutputError` naming ``path`` when it cannot be written."""
    require_writable(path, what="PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _paste_fitted(canvas: Image.Image, image: Image.Image, xy: tuple[int, int], cell: int) -> None:
    """Paste ``image`` centred in the (cell, cell) square at ``xy``, aspect ratio kept."""
    image = _to_rgb(image)
    scale = cell / max(image.size)
    if scale >= 2:
        # small images (28 px Fashion-MNIST, 32 px samples): whole-pixel blocks stay crisp
        scale = math.floor(scale)
        resample = Image.Resampling.NEAREST
    else:
        resample = Image.Resampling.LANCZOS
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, resample)
    canvas.paste(image, (xy[0] + (cell - size[0]) // 2, xy[1] + (cell - size[1]) // 2))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        white = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text`` on one line, cut with an ellipsis so it is at most ``width`` pixels wide."""
    text = " ".join(text.split())
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)  # longest prefix that fits together with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…" if lo else ""


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _check_length(name: str, values: list | None, n: int) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} images")
