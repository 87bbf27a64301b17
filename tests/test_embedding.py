"""The shared load-skip-encode loop and the content hash of a picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource
from PIL import Image

from rdm.embedding import EncodingError, content_hash, encode_source


def test_content_hash_follows_the_pixels_not_the_file():
    a = TinySource(4).load(1)
    png = io.BytesIO()
    a.save(png, format="PNG")
    again = Image.open(io.BytesIO(png.getvalue()))
    assert content_hash(again) == content_hash(a)  # same pixels, other container
    assert content_hash(a.convert("RGBA")) == content_hash(a)  # same RGB pixels
    shifted = Image.fromarray(np.roll(np.asarray(a), 1, axis=1))
    assert content_hash(shifted) != content_hash(a)
    assert content_hash(a.crop((0, 0, 16, 15))) != content_hash(a.crop((0, 1, 16, 16)))


def test_encode_source_skips_unreadable_items_without_shifting_ids():
    source, enc = TinySource(10, bad={2, 7}), ProjectionEncoder(dim=8)
    skipped: list[dict] = []
    batches = list(encode_source(source, np.arange(10), enc, 4, skipped))
    assert [b.seen for b in batches] == [4, 4, 2]
    ids = np.concatenate([b.ids for b in batches])
    assert ids.tolist() == [0, 1, 3, 4, 5, 6, 8, 9]
    z = np.concatenate([b.embeddings for b in batches])
    np.testing.assert_allclose(z, enc.encode_images([source.load(int(i)) for i in ids]))
    assert [b.hashes for b in batches][0] == [content_hash(source.load(i)) for i in (0, 1, 3)]
    assert [s["id"] for s in skipped] == [2, 7] and skipped[0]["key"] == "img/0002.png"


def test_encode_source_refuses_nan_embeddings():
    class NaNEncoder(ProjectionEncoder):
        def encode_images(self, images):
            return np.full((len(images), self.dim), np.nan, np.float32)

    with pytest.raises(EncodingError, match="NaN"):
        list(encode_source(TinySource(3), [0, 1], NaNEncoder(dim=4), 2, []))
