"""Image sources: anything that yields (id, image, caption) with deterministic, disjoint splits.

A *source* is an indexable collection of images. Item ``i`` of a source has a stable integer
id (its position in the source's canonical order, never shifted by unreadable items), a key
(a relative path or ``"train/123"``), a caption (possibly empty) and an image that is loaded
lazily and may fail with :class:`BadImage`.

A *split* selects a deterministic subset of ids. ``"train"`` and ``"db"`` are disjoint by
construction, so a database built from ``db`` never contains a training image of ``train``.

Specs understood by :func:`open_source`:

- ``fashion-mnist`` or ``fashion-mnist:DIR``  the four IDX files (Debian's dataset-fashion-mnist)
- ``emoji-color`` / ``emoji-mono``  emoji rendered from Noto Color Emoji / Symbola
- ``shards/{00000..00099}.tar``       webdataset tar shards (img2dataset): a brace range, a comma
  list of ``.tar`` files, or a folder holding only shards (:mod:`rdm.data.webdataset`)
- any directory path                 a folder of images, recursive
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rdm.errors import RdmError

SPLITS = ("all", "train", "db", "test")


class BadImage(RdmError):
    """An item whose image cannot be used; ``str(exc)`` is the reason written to reports."""


class SourceError(RdmError, ValueError):
    """A source spec or split that cannot be opened; the message names the path or argument."""


@dataclass(frozen=True)
class Item:
    id: int
    key: str
    caption: str
    image: Image.Image  # RGB


class Source(ABC):
    """An indexable image collection. Subclasses implement the four abstract members."""

    #: canonical spec, e.g. ``"fashion-mnist:/usr/share/datasets/fashion-mnist"``; stored in manifests
    spec: str
    #: every image is grey (R = G = B) by construction; for sources that cannot say, the
    #: neighbours computation records what it saw (rdm.train.default_image_channels)
    grayscale: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def key(self, i: int) -> str:
        """Stable key of item ``i`` (relative path, ``"train/123"``, emoji codepoints ...)."""

    @abstractmethod
    def caption(self, i: int) -> str:
        """Caption of item ``i``; ``""`` when the source has none."""

    @abstractmethod
    def load(self, i: int) -> Image.Image:
        """RGB image of item ``i``; raises :class:`BadImage` with a reason when unusable."""

    def split_ids(self, split: str, db_fraction: float = 0.5) -> np.ndarray:
        """Ids of ``split`` in ascending order (int64).

        Default rule for sources without a natural test set: ``db`` holds the items whose key hashes
        below ``db_fraction``, ``train`` the rest, ``test`` is empty, ``all`` is everything.
        """
        check_split(split)
        ids = np.arange(len(self), dtype=np.int64)
        if split == "all":
            return ids
        if split == "test":
            return ids[:0]
        in_db = np.array([key_fraction(self.key(int(i))) < db_fraction for i in ids], dtype=bool)
        return ids[in_db] if split == "db" else ids[~in_db]

    def split_rule(self, db_fraction: float = 0.5) -> str:
        """Human-readable description of how splits are made (written into manifests)."""
        return (
            f"db = items whose sha1(key) fraction < {db_fraction}; train = the rest; "
            "db and train are disjoint by construction"
        )

    def item(self, i: int) -> Item:
        return Item(id=i, key=self.key(i), caption=self.caption(i), image=self.load(i))


def key_fraction(key: str) -> float:
    """Deterministic number in [0, 1) from a key (first 8 bytes of sha1)."""
    h = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def splits_disjoint(spec_a: str, split_a: str, spec_b: str, split_b: str) -> bool:
    """True when the two (source, split) pairs cannot share an item by construction."""
    if spec_a != spec_b:
        return False  # different sources may still hold the same picture: treat as overlapping
    return {split_a, split_b} in ({"train", "db"}, {"train", "test"}, {"db", "test"})


def open_source(spec: str) -> Source:
    """Open a source from its spec (see module docstring)."""
    from pathlib import Path

    name, _, arg = spec.partition(":")
    if name == "fashion-mnist":
        from .fashion_mnist import FashionMNIST

        return FashionMNIST(arg or None)
    if name in ("emoji-color", "emoji-mono"):
        from .emoji import EmojiSource

        if arg and not arg.isdigit():
            raise SourceError(
                f"emoji size in {spec!r} must be a whole number of pixels, e.g. '{name}:64'"
            )
        return EmojiSource(style=name.removeprefix("emoji-"), size=int(arg) if arg else 64)
    from .webdataset import WebDatasetSource, is_webdataset_spec

    if is_webdataset_spec(spec):
        return WebDatasetSource(spec)
    path = Path(spec)
    if not path.exists():
        raise SourceError(
            f"source {spec!r} does not exist: give a folder of images, webdataset shards "
            "('shards/{00000..00099}.tar'), 'fashion-mnist[:DIR]', 'emoji-color' or 'emoji-mono'"
        )
    from .folder import FolderSource

    return FolderSource(path)
