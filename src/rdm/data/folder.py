"""A folder of images, searched recursively, with optional captions.

Item ids are ranks in the sorted list of relative POSIX paths, so they depend only on the file
names: an unreadable file keeps its id and fails in :meth:`FolderSource.load` with
:class:`BadImage`. Captions come from, in order of preference:

1. a sidecar text file with the image's stem (``cat.png`` -> ``cat.txt``), stripped;
2. a mapping file at the root: ``captions.csv`` (columns ``file,caption``) or ``captions.jsonl``
   (one ``{"file": ..., "caption": ...}`` per line), ``file`` relative to the root;
3. ``""``.

Hidden files and folders (names starting with ``.``) are skipped: they are thumbnails, macOS
resource forks (``._cat.jpg``) and tool caches, never the user's images.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from pathlib import Path

from PIL import Image

from rdm.data import Source, SourceError
from rdm.data.images import MAX_PIXELS, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FILES = ("captions.csv", "captions.jsonl")


class FolderSource(Source):
    """Every image under ``root`` (extensions :data:`IMAGE_EXTENSIONS`, any case)."""

    def __init__(self, root: str | Path, max_pixels: int = MAX_PIXELS) -> None:
        given = Path(root).expanduser()
        if not given.is_dir():
            what = "does not exist" if not given.exists() else "is not a directory"
            raise SourceError(f"image folder {str(given)!r} {what}: give a folder of images")
        self.root = given.resolve()
        self.spec = str(self.root)
        self.max_pixels = max_pixels
        self._rel, sidecars = _scan(self.root)
        if not self._rel:
            raise SourceError(
                f"image folder {self.spec!r} holds no images: looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)} files"
            )
        self._sidecars = sidecars  # relative image path -> relative .txt path
        self._mapped = _read_caption_file(self.root)

    def __len__(self) -> int:
        return len(self._rel)

    def key(self, i: int) -> str:
        return self._rel[i]

    def path(self, i: int) -> Path:
        return self.root / self._rel[i]

    def caption(self, i: int) -> str:
        rel = self._rel[i]
        if rel in self._sidecars:
            try:
                return (self.root / self._sidecars[rel]).read_text("utf-8", "replace").strip()
            except OSError:
                pass  # an unreadable sidecar falls back like a missing one
        return self._mapped.get(rel, "")

    def load(self, i: int) -> Image.Image:
        return decode_image(self.path(i), self.max_pixels)


def _scan(root: Path) -> tuple[list[str], dict[str, str]]:
    """Sorted relative POSIX paths of the images and their same-stem ``.txt`` sidecars."""
    images: list[str] = []
    texts: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            suffix = posixpath.splitext(name)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(rel)
            elif suffix == ".txt":
                texts.add(rel)
    images.sort()
    sidecars = {rel: t for rel in images if (t := posixpath.splitext(rel)[0] + ".txt") in texts}
    return images, sidecars


def _raise_walk_error(exc: OSError) -> None:
    # A folder we cannot list would silently drop its images and shift every later id.
    raise SourceError(f"cannot list folder {exc.filename!r}: {exc.strerror or exc}")


def _read_caption_file(root: Path) -> dict[str, str]:
    """Captions from ``captions.csv`` or ``captions.jsonl`` at the root, keyed by relative path."""
    for name in CAPTION_FILES:
        path = root / name
        if path.is_file():
            rows = _csv_rows(path) if name.endswith(".csv") else _jsonl_rows(path)
            return {_normalise(f): str(c).strip() for f, c in rows}
    return {}


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fp:
        reader = csv.DictReader(fp)
        if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
            raise SourceError(
                f"caption file {str(path)!r} needs a header row with columns 'file,caption'; "
                f"found {reader.fieldnames}"
            )
        return [(row["file"] or "", row["caption"] or "") for row in reader]


def _jsonl_rows(path: Path) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8-sig") as fp:
        for n, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((str(obj["file"]), str(obj.get("caption") or "")))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SourceError(
                    f"caption file {str(path)!r} line {n} is not a JSON object with 'file' and "
                    f"'caption': {exc}"
                ) from None
    return rows


def _normalise(file: str) -> str:
    # "./a/b.png", "a\\b.png" and "a//b.png" all name the key "a/b.png"
    return posixpath.normpath(file.strip().replace("\\", "/"))
