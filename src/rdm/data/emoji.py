"""Emoji rendered with Pillow: colour from Noto Color Emoji, monochrome from Symbola.

Both styles hold the same items: single-codepoint emoji that *both* fonts draw and that Python's
``unicodedata`` names, ranked by codepoint. So ``emoji-color`` and ``emoji-mono`` share ids, keys
(``"U+1F600"``), captions (``"grinning face"``) and splits, and a database of one style can be
swapped for the other at inference. The set depends on the installed fonts and on Python's
Unicode version; keys say exactly which emoji an id is.
"""

from __future__ import annotations

import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from rdm.data import BadImage, Source, SourceError

STYLES = ("color", "mono")
MARGIN = 0.06  # blank border around the glyph, as a fraction of the square's side


@dataclass(frozen=True)
class FontSpec:
    family: str  # as fontconfig names it
    default: Path
    package: str  # Debian package that installs it
    pixels: int  # render size: Noto Color Emoji is a bitmap font with a single 109 px strike


FONTS = {
    "color": FontSpec(
        "Noto Color Emoji",
        Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
        "fonts-noto-color-emoji",
        109,
    ),
    "mono": FontSpec(
        "Symbola",
        Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"),
        "fonts-symbola",
        128,
    ),
}

# Blocks that hold emoji (Unicode's Emoji property is not in unicodedata); the intersection with
# both fonts' cmaps does the fine selection.
_EMOJI_RANGES = (
    (0x00A9, 0x00A9),  # copyright
    (0x00AE, 0x00AE),  # registered
    (0x2000, 0x2BFF),  # punctuation, letterlike, arrows, technical, geometric, symbols, dingbats
    (0x3030, 0x3030),
    (0x303D, 0x303D),
    (0x3297, 0x3297),
    (0x3299, 0x3299),
    (0x1F000, 0x1FAFF),  # the supplementary emoji blocks
)
# Parts of the emoji blocks that are not pictures on their own.
_EXCLUDED = (
    (0x1F1E6, 0x1F1FF),  # regional indicator letters (halves of flags)
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers (colour swatches)
)


class EmojiSource(Source):
    """Emoji drawn on white, centred, cropped to the glyph and resized to ``size`` x ``size``."""

    def __init__(self, style: str = "color", size: int = 64) -> None:
        if style not in STYLES:
            raise SourceError(f"unknown emoji style {style!r}; choose 'color' or 'mono'")
        if not 8 <= size <= 1024:
            raise SourceError(f"emoji size {size} is out of range: give 8..1024 pixels")
        self.style, self.size = style, size
        self.spec = f"emoji-{style}:{size}"
        paths = {s: find_font(s) for s in STYLES}  # both: the content is their intersection
        self.font_path = paths[style]
        self.codepoints = _shared_codepoints(paths["color"], paths["mono"])

    def __len__(self) -> int:
        return len(self.codepoints)

    def key(self, i: int) -> str:
        return f"U+{self.codepoints[i]:04X}"

    def caption(self, i: int) -> str:
        return unicodedata.name(chr(self.codepoints[i])).lower()

    def load(self, i: int) -> Image.Image:
        spec = FONTS[self.style]
        font = _font(self.font_path, spec.pixels)
        glyph = _draw(chr(self.codepoints[i]), font, colour=self.style == "color")
        return _square_on_white(glyph, self.size)


def find_font(style: str) -> Path:
    """Path of the font for ``style``: the Debian location, else what fontconfig knows."""
    spec = FONTS[style]
    if spec.default.is_file():
        return spec.default
    found = _fc_match(spec.family)
    if found is None:
        raise SourceError(
            f"font {spec.family!r} not found (looked at {spec.default} and asked fc-match): "
            f"install it with 'sudo apt-get install {spec.package}'; emoji-color and emoji-mono "
            "both need it because they draw the same emoji"
        )
    return found


def _fc_match(family: str) -> Path | None:
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(
            ["fc-match", "-f", "%{family}\t%{file}", family],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    families, _, file = out.partition("\t")
    # fc-match always answers with *some* font; accept it only if it is the family we asked for
    if family.lower() not in families.lower() or not Path(file).is_file():
        return None
    return Path(file)


@lru_cache(maxsize=4)
def _shared_codepoints(colour_font: Path, mono_font: Path) -> tuple[int, ...]:
    """Emoji codepoints both fonts map and unicodedata names, ascending."""
    shared = _cmap(colour_font) & _cmap(mono_font)
    return tuple(cp for cp in sorted(shared) if _is_emoji(cp))


def _cmap(path: Path) -> set[int]:
    from fontTools.ttLib import TTFont, TTLibError  # arrives with matplotlib

    try:
        with TTFont(path, lazy=True) as font:
            return set(font.getBestCmap() or {})
    except (OSError, TTLibError) as exc:
        raise SourceError(f"cannot read the font {str(path)!r}: {exc}") from None


def _is_emoji(cp: int) -> bool:
    in_range = any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES)
    excluded = any(lo <= cp <= hi for lo, hi in _EXCLUDED)
    # marks, controls/format characters and spaces draw nothing on their own
    drawable = unicodedata.category(chr(cp))[0] not in "MCZ"
    return in_range and not excluded and drawable and bool(unicodedata.name(chr(cp), ""))


@lru_cache(maxsize=4)
def _font(path: Path, pixels: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(path), pixels, layout_engine=ImageFont.Layout.BASIC)
    except OSError as exc:
        raise SourceError(f"cannot load the font {str(path)!r} at {pixels} px: {exc}") from None


def _draw(ch: str, font: ImageFont.FreeTypeFont, colour: bool) -> Image.Image:
    """The glyph on a transparent canvas, cropped to its ink (RGBA)."""
    left, top, right, bottom = font.getbbox(ch)
    pad = 4
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (pad - left, pad - top), ch, font=font, fill=(0, 0, 0, 255), embedded_color=colour
    )
    ink = canvas.getchannel("A").getbbox()
    if ink is None:
        raise BadImage(f"the font draws nothing for U+{ord(ch):04X}")
    return canvas.crop(ink)


def _square_on_white(glyph: Image.Image, size: int) -> Image.Image:
    """Centre ``glyph`` on a white square with a MARGIN border; resize to (size, size) RGB."""
    side = round(max(glyph.size) * (1 + 2 * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
