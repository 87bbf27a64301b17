"""What "near-duplicate" means for one encoder: the exclusion threshold, measured, not assumed.

A training image x must not find itself in the database under another name or after a re-save
(paper §3: D is disjoint from X, so ξ_k(x, D) never returns x). Exact copies share their decoded
pixels and are caught by the content hash (:func:`rdm.embedding.content_hash`). Re-encoded copies
are caught by cosine, and the cosine a copy keeps depends entirely on the encoder: with the
shipped clip-small on Fashion-MNIST a 1-pixel shift drops it to 0.93-0.99 while distinct trousers
reach 0.999, so a fixed constant (0.98 before) excluded hundreds of distinct images per query.

:func:`calibrate` measures two distributions and derives the threshold from them:

- *copies*: cos(φ(x), φ(T(x))) for a seeded sample of query images x and each transform T in
  :data:`TRANSFORMS` (JPEG re-save, resize by a few pixels and back, 1-pixel shift);
- *distinct*: for a seeded sample of database rows, the cosine to the nearest *other* row (not
  the row itself, not an exact pixel duplicate of it): the closest a different image comes, at
  the scale of this database. Random pairs would not do: a query's candidates are the top of N
  database items, so the relevant tail is the nearest neighbour's, not a random pair's.

threshold = max(copy_low, distinct_high + margin), with copy_low the :data:`COPY_QUANTILE` (1%)
quantile of all copy cosines and distinct_high the :data:`DISTINCT_QUANTILE` (99%) quantile of the
nearest-distinct cosines (both taken as observed values, ``method="lower"`` / ``"higher"``), and
margin the most float16 storage / bf16 batch noise moves that cosine (:data:`ROW_NOISE`,
:func:`noise_margin`: 7e-5 at c = 0.9993). When the two separate,
everything as similar as 99% of the copies is excluded; when they overlap
(copy_low < distinct_high: the encoder cannot tell some copies from distinct images) the
threshold follows the distinct images, so at most ~1% of database images lose a distinct
neighbour, and the calibration records which share of each kind of copy is still recognised.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rdm.data import Source
from rdm.embedding import encode_source
from rdm.encoders import Encoder

if TYPE_CHECKING:
    from rdm.database import Database

#: quantile of the copy cosines below which a pair no longer counts as "the same picture"
COPY_QUANTILE = 0.01
#: quantile of the nearest-distinct cosines the threshold never goes below
DISTINCT_QUANTILE = 0.99
#: query images re-encoded per transform, and database rows whose nearest other row is measured
COPY_SAMPLE = 256
DISTINCT_SAMPLE = 1024
#: neighbours searched per sampled database row to find its nearest distinct one
DISTINCT_DEPTH = 16
#: how far a query's embedding may sit from the stored embedding of the same picture: float16
#: storage rounds each coordinate to 11 significant bits (||q - q16|| <= 2^-11), and under bf16
#: autocast a row changes by ~1e-3 with the batch it is encoded in. Moving a unit vector by δ
#: changes its cosine c to another one by at most δ·sqrt(1 - c²), so the threshold sits
#: ROW_NOISE·sqrt(1 - c²) above the distinct images' quantile c: the most similar distinct pair
#: measured here is not excluded at query time by rounding alone
ROW_NOISE = 2e-3
JPEG_QUALITY = 90
RESIZE_PIXELS = 4
SHIFT_PIXELS = 1
#: quantiles written to the record for each distribution
REPORTED = {"copies": (0.0, 0.01, 0.05, 0.5), "distinct": (0.5, 0.9, 0.99, 0.999, 1.0)}


def jpeg_copy(image: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """The image re-saved as a JPEG of ``quality`` and decoded again (RGB)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def resized_copy(image: Image.Image, pixels: int = RESIZE_PIXELS) -> Image.Image:
    """The image enlarged by ``pixels`` in width and height and resized back (bicubic both ways)."""
    w, h = image.size
    bigger = image.convert("RGB").resize((w + pixels, h + pixels), Image.BICUBIC)
    return bigger.resize((w, h), Image.BICUBIC)


def shifted_copy(image: Image.Image, pixels: int = SHIFT_PIXELS) -> Image.Image:
    """The image moved ``pixels`` to the right; the left edge column is repeated."""
    a = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    shifted = np.concatenate([np.repeat(a[:, :1], pixels, axis=1), a[:, :-pixels]], axis=1)
    return Image.fromarray(shifted)


#: name -> (transform, description for the record)
TRANSFORMS: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "jpeg": (jpeg_copy, f"re-saved as JPEG, quality {JPEG_QUALITY}"),
    "resize": (resized_copy, f"resized {RESIZE_PIXELS} px larger and back, bicubic"),
    "shift": (shifted_copy, f"shifted {SHIFT_PIXELS} px right, edge column repeated"),
}


@dataclass
class Calibration:
    """The derived threshold and how it was derived (``record`` goes into the neighbours meta)."""

    threshold: float
    copy_low: float | None  # COPY_QUANTILE quantile of all copy cosines (None: no copy measured)
    distinct_high: float | None  # DISTINCT_QUANTILE quantile of nearest-distinct cosines
    overlap: bool  # copy_low < distinct_high: some copies look more different than distinct images
    recognised: dict[str, float]  # share of each transform's copies above the threshold
    record: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One paragraph for stderr."""
        copies, distinct = self.record.get("copies", {}), self.record.get("distinct", {})
        parts = [
            f"{name} {q[_key(COPY_QUANTILE)]:.4f}"
            for name, q in copies.get("quantiles", {}).items()
            if name != "all" and q
        ]
        text = (
            f"near-duplicate threshold {self.threshold:.5f}, derived from the encoder: "
            f"{_key(COPY_QUANTILE)} quantile of the cosine between {copies.get('sample', '?')} "
            f"query images and their copies ({', '.join(parts) or 'none measured'}); "
            f"{_key(DISTINCT_QUANTILE)} quantile of the cosine between "
            f"{distinct.get('sample', '?')} database images and their nearest other image "
            f"({_fmt(self.distinct_high)}); seed {self.record.get('seed', '?')}"
        )
        if self.overlap:
            shares = ", ".join(f"{n} {100 * s:.0f}%" for n, s in self.recognised.items())
            text += (
                "; the two distributions overlap (this encoder cannot tell some copies from "
                "distinct images), so the threshold follows the distinct images and recognises "
                f"{shares} of the copies"
            )
        if self.recognised and max(self.recognised.values()) < 0.5:
            text += (
                "; no kind of copy is recognised: either the encoder scores distinct images as "
                "close as copies, or more than 1% of the database images have a re-saved copy "
                "inside the database (check with 'rdm db query DB --id ID'); an explicit "
                "--exclude-threshold overrides"
            )
        return text


def derive_threshold(copies: dict[str, np.ndarray], distinct: np.ndarray) -> Calibration:
    """threshold = max(copy_low, distinct_high) from copy cosines per transform (n,) and
    nearest-distinct cosines (m,); see the module docstring. With neither measured, 1.0 (only
    exact duplicates are excluded)."""
    pooled = np.concatenate([np.asarray(c, np.float64) for c in copies.values()] or [[]])
    distinct = np.asarray(distinct, np.float64)
    copy_low = float(np.quantile(pooled, COPY_QUANTILE, method="lower")) if pooled.size else None
    distinct_high = (
        float(np.quantile(distinct, DISTINCT_QUANTILE, method="higher")) if distinct.size else None
    )
    margin = 0.0 if distinct_high is None else noise_margin(distinct_high)
    floor = None if distinct_high is None else distinct_high + margin
    measured = [v for v in (copy_low, floor) if v is not None]
    threshold = min(1.0, max(measured)) if measured else 1.0
    overlap = copy_low is not None and distinct_high is not None and copy_low < distinct_high
    recognised = {name: float(np.mean(np.asarray(c) > threshold)) for name, c in copies.items()}
    record = {
        "rule": (
            "threshold = min(1, max(copy_low, distinct_high + margin)): copy_low = "
            f"{_key(COPY_QUANTILE)} quantile of cos(image, copy) over all transforms; "
            f"distinct_high = {_key(DISTINCT_QUANTILE)} quantile of cos(database image, nearest "
            "other database image that is not an exact pixel duplicate); margin = row_noise * "
            "sqrt(1 - distinct_high^2), the most a query's float16 / bf16 rounding moves that "
            "cosine"
        ),
        "row_noise": ROW_NOISE,
        "margin": margin,
        "copy_quantile": COPY_QUANTILE,
        "distinct_quantile": DISTINCT_QUANTILE,
        "copy_low": copy_low,
        "distinct_high": distinct_high,
        "overlap": overlap,
        "copies_recognised": recognised,
        "copies": {
            "quantiles": {
                **{name: _quantiles(c, REPORTED["copies"]) for name, c in copies.items()},
                "all": _quantiles(pooled, REPORTED["copies"]),
            },
        },
        "distinct": {"quantiles": _quantiles(distinct, REPORTED["distinct"])},
        "note": (
            "reported quantiles interpolate linearly; copy_low and distinct_high are observed "
            "values (numpy quantile method 'lower' and 'higher')"
        ),
    }
    return Calibration(threshold, copy_low, distinct_high, overlap, recognised, record)


def noise_margin(c: float) -> float:
    """The most a cosine ``c`` moves when one of its unit vectors moves by :data:`ROW_NOISE`."""
    return ROW_NOISE * float(np.sqrt(max(0.0, 1.0 - c * c)))


def copy_cosines(
    source: Source, ids: np.ndarray, encoder: Encoder, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """cos(φ(x), φ(T(x))) (n,) per transform T for the readable images of ``ids``."""
    originals = _encode_all(source, ids, encoder, batch_size)  # (n, d)
    out = {}
    for name, (transform, _) in TRANSFORMS.items():
        copies = _encode_all(_Transformed(source, transform, name), ids, encoder, batch_size)
        out[name] = np.sum(originals * copies, axis=1)  # (n,) cosines of unit vectors
    return out


def nearest_distinct_cosines(db: Database, rows: np.ndarray) -> np.ndarray:
    """For each database row of ``rows``, the cosine to its nearest other row that is not an
    exact pixel duplicate (same content hash) of it; rows with none within
    :data:`DISTINCT_DEPTH` neighbours are left out. Returns (m,) float32."""
    rows = np.asarray(rows, dtype=np.int64)
    if db.count < 2 or not len(rows):
        return np.zeros(0, np.float32)
    depth = min(DISTINCT_DEPTH, db.count)
    scores, found = db.search(db.vectors(rows), depth)  # (m, depth)
    other = (found >= 0) & (found != rows[:, None])
    hashes = db.content_hashes
    if hashes is not None:  # rdm.database.ContentHashes: codes compared, matches confirmed
        other &= ~hashes.same_as_rows(np.maximum(found, 0), rows)
    has = other.any(axis=1)
    first = np.argmax(other, axis=1)  # rank of the first distinct row (search is best first)
    return scores[np.arange(len(rows)), first][has].astype(np.float32)


def calibrate(
    db: Database,
    source: Source,
    query_ids: np.ndarray,
    encoder: Encoder,
    *,
    seed: int = 0,
    copy_sample: int = COPY_SAMPLE,
    distinct_sample: int = DISTINCT_SAMPLE,
    batch_size: int = 256,
) -> Calibration:
    """Measure copies on ``copy_sample`` of ``query_ids`` of ``source`` and nearest-distinct
    cosines on ``distinct_sample`` rows of the database ``db`` (both drawn with ``seed``), then
    :func:`derive_threshold`."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample_ids = _sample(rng, np.asarray(query_ids, np.int64), copy_sample)
    sample_rows = _sample(rng, np.arange(db.count, dtype=np.int64), distinct_sample)
    copies = copy_cosines(source, sample_ids, encoder, batch_size)
    distinct = nearest_distinct_cosines(db, sample_rows)
    cal = derive_threshold(copies, distinct)
    n_copies = len(next(iter(copies.values()))) if copies else 0
    cal.record = {
        "threshold": cal.threshold,
        "seed": seed,
        **cal.record,
        "copies": {
            "sample": n_copies,
            "drawn_from": {"spec": source.spec, "ids": int(len(query_ids))},
            "transforms": {name: desc for name, (_, desc) in TRANSFORMS.items()},
            **cal.record["copies"],
        },
        "distinct": {
            "sample": int(len(distinct)),
            "drawn_from": f"{db.count} database rows",
            "depth": min(DISTINCT_DEPTH, db.count),
            **cal.record["distinct"],
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return cal


# ---- helpers ------------------------------------------------------------------------------------


class _Transformed(Source):
    """``source`` seen through an image transform (same ids, keys and captions)."""

    def __init__(self, source: Source, transform: Callable, name: str):
        self.source, self.transform = source, transform
        self.spec = f"{source.spec}#{name}"

    def __len__(self) -> int:
        return len(self.source)

    def key(self, i: int) -> str:
        return self.source.key(i)

    def caption(self, i: int) -> str:
        return self.source.caption(i)

    def load(self, i: int) -> Image.Image:
        return self.transform(self.source.load(i))


def _encode_all(source: Source, ids: np.ndarray, encoder: Encoder, batch_size: int) -> np.ndarray:
    """(n, d) float32 unit embeddings of the readable images of ``ids`` (unreadable ones left
    out; the same ones for every transform, since a transform never makes an image readable)."""
    parts = [b.embeddings for b in encode_source(source, ids, encoder, batch_size, skipped=[])]
    z = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def _sample(rng: np.random.Generator, ids: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``ids`` without replacement (all when fewer), ascending."""
    if len(ids) <= n:
        return ids
    return np.sort(rng.choice(ids, size=n, replace=False))


def _quantiles(values: np.ndarray, qs: tuple[float, ...]) -> dict[str, float]:
    values = np.asarray(values, np.float64)
    if not values.size:
        return {}
    return {_key(q): round(float(np.quantile(values, q)), 6) for q in qs}


def _key(q: float) -> str:
    return "max" if q == 1.0 else "min" if q == 0.0 else f"{100 * q:g}%"


def _fmt(value: float | None) -> str:
    return "none measured" if value is None else f"{value:.5f}"
