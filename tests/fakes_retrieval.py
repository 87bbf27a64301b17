"""Tiny deterministic stand-ins for database / neighbour tests: an in-memory image source and a
fixed random projection of downsampled pixels as encoder (fast, no torch)."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from rdm.data import BadImage, Source
from rdm.encoders import Encoder


class TinySource(Source):
    """``n`` 16x16 images of seeded noise; ``bad`` ids raise BadImage; ``copies`` maps an id to
    the id whose image it repeats (near-duplicates for exclusion tests)."""

    def __init__(self, n: int = 40, bad=(), copies=None, name: str = "tiny"):
        self.n = n
        self.bad = set(bad)
        self.copies = dict(copies or {})
        self.spec = f"fake:{name}"

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return f"img/{i:04d}.png"

    def caption(self, i: int) -> str:
        return f"item {i}"

    def load(self, i: int) -> Image.Image:
        if i in self.bad:
            raise BadImage("corrupt test image")
        seed = self.copies.get(i, i)
        pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        return Image.fromarray(pixels)


class ProjectionEncoder(Encoder):
    """φ(x) = normalise(W · (downsample_8x8(x) - 0.5)), W a fixed (192, d) Gaussian of ``seed``.
    ``fail_after`` raises after that many ``encode_images`` calls (a simulated crash)."""

    def __init__(self, dim: int = 16, seed: int = 0, fail_after: int | None = None):
        self.w = np.random.default_rng(seed).standard_normal((8 * 8 * 3, dim)).astype(np.float32)
        self.fail_after = fail_after
        self.calls = 0
        self.identity = {
            "arch": "fake-projection",
            "weights_sha256": hashlib.sha256(self.w.tobytes()).hexdigest(),
            "dim": dim,
            "image_size": 8,
            "mean": [0.5, 0.5, 0.5],
            "std": [1.0, 1.0, 1.0],
            "resize": "bilinear",
            "spec": f"fake-projection:{seed}",
        }

    def encode_images(self, images) -> np.ndarray:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash while encoding")
        x = np.stack(
            [np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR)) for im in images]
        )
        z = (x.reshape(len(images), -1).astype(np.float32) / 255 - 0.5) @ self.w  # (B, d)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def encode_texts(self, texts) -> np.ndarray:
        seeds = [int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) for t in texts]
        z = np.stack([np.random.default_rng(s).standard_normal(self.dim) for s in seeds])
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
