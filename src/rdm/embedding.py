"""The one "load, skip unreadable, encode" loop, shared by the database build and the neighbours.

:func:`encode_source` walks ids of a source in batches, loads each image (an unreadable one is
recorded in ``skipped`` and never shifts the others), hashes its pixels and encodes the readable
ones with the frozen encoder. :func:`content_hash` identifies a picture by its decoded pixels, so
the same picture under two names (or two sources) is recognised as an exact duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rdm.data import BadImage, Source
from rdm.encoders import Encoder, describe_identity
from rdm.errors import RdmError


class EncodingError(RdmError):
    """The encoder returned something other than (B, d) finite vectors."""


@dataclass
class EncodedBatch:
    ids: np.ndarray  # (b,) int64 source ids of the readable images, ascending within the batch
    embeddings: np.ndarray  # (b, d) float32, as the encoder returned them (unit norm)
    hashes: list[str]  # (b,) content_hash of each image
    grey: list[bool]  # (b,) is_grey of each image
    seen: int  # ids of the input consumed by this batch (readable or not): for progress bars


def content_hash(image: Image.Image) -> str:
    """sha256 (first 16 bytes, hex) of an image's RGB pixels and size: equal for the same picture
    stored under any name or format that decodes to the same pixels."""
    rgb = _rgb(image)
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()[:32]


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; sources already give RGB (Source.load), which is then not copied again
    for each of content_hash and is_grey in the encoding loop."""
    return image if image.mode == "RGB" else image.convert("RGB")


def is_grey(image: Image.Image) -> bool:
    """True when the picture has no colour: a grey mode, or RGB(A) pixels with R = G = B."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    rgb = np.asarray(_rgb(image))  # (H, W, 3) uint8
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def encode_source(
    source: Source,
    ids: Sequence[int] | np.ndarray,
    encoder: Encoder,
    batch_size: int,
    skipped: list[dict],
) -> Iterator[EncodedBatch]:
    """Yield an :class:`EncodedBatch` per ``batch_size`` ids (fewer rows where images were
    unreadable; a batch with none readable yields empty arrays). Unreadable items are appended to
    ``skipped`` as ``{"id", "key", "reason"}``."""
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        kept, images = [], []
        for i in map(int, chunk):
            try:
                images.append(source.load(i))
            except BadImage as exc:
                skipped.append({"id": i, "key": source.key(i), "reason": str(exc)})
                continue
            kept.append(i)
        z = (
            checked_embeddings(encoder, images)
            if images
            else np.zeros((0, encoder.dim), np.float32)
        )
        yield EncodedBatch(
            ids=np.array(kept, dtype=np.int64),
            embeddings=z,
            hashes=[content_hash(im) for im in images],
            grey=[is_grey(im) for im in images],
            seen=len(chunk),
        )


def checked_embeddings(encoder: Encoder, images: list[Image.Image]) -> np.ndarray:
    """``encoder.encode_images(images)`` as float32 (B, d), refusing a wrong shape or NaN."""
    z = np.asarray(encoder.encode_images(images), dtype=np.float32)  # (B, d)
    if z.shape != (len(images), encoder.dim):
        raise EncodingError(
            f"encoder {describe_identity(encoder.identity)} returned an array of shape {z.shape} "
            f"for {len(images)} images; expected ({len(images)}, {encoder.dim})"
        )
    if not np.isfinite(z).all():
        raise EncodingError(f"encoder {describe_identity(encoder.identity)} returned NaN or inf")
    return z
