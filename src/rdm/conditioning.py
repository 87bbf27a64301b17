"""What conditions each sample: the paper's inference modes as plain functions, and their grids.

A sampling request has two halves: a *conditioning* — the (k', d) context set of every sample and
the database rows it came from — and the sampling itself (:class:`rdm.pipeline.RDMPipeline`),
which sees the context only through the denoiser. Each builder here is a plain function of a
database D, an encoder φ and the model's k; none of them touches a model:

- :func:`image_context`        ξ_k(x, D) of a query image (optionally φ(x) as the first token)
- :func:`text_context`         the text embedding retrieves from D, joins k − 1 neighbours, or
                               is the whole context (the paper's three text modes, §4.2)
- :func:`pseudo_query_context` x̃ ~ p(x̃) (optionally top-m truncated; :mod:`rdm.pseudo_query`),
                               then ξ_k(x̃, D) (§3.3)
- :func:`class_pool_context`   k drawn at random per sample from a prompt's top-L neighbours

Swapping the database means passing another ``db``. :func:`grid` draws one row per sample: the
query image (if any), the neighbours that conditioned it, then the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rdm import pseudo_query
from rdm.errors import RdmError

if TYPE_CHECKING:
    from rdm.database import Database
    from rdm.encoders import Encoder

TEXT_MODES = ("neighbors", "text+neighbors", "text")


@dataclass
class Conditioning:
    """What conditions each of B samples."""

    context: np.ndarray  # (B, k', d) float32: database vectors and/or query / text embeddings
    rows: list[list[int]]  # per sample: the database rows in its context (shown in grids)
    labels: list[str]  # per sample: a short description of the condition
    query_images: list[Image.Image | None] = field(default_factory=list)
    query_rows: list[int | None] = field(default_factory=list)  # pseudo-query x̃ (a row of D)

    def __post_init__(self) -> None:
        self.query_images = self.query_images or [None] * len(self.context)
        self.query_rows = self.query_rows or [None] * len(self.context)

    def __len__(self) -> int:
        return len(self.context)


# --- the inference modes --------------------------------------------------------------------------


def image_context(
    db: Database,
    encoder: Encoder,
    k: int,
    image: Image.Image,
    n: int,
    *,
    include_query: bool = False,
    raw_query: bool = False,
) -> Conditioning:
    """ξ_k(x, D) of a query image for ``n`` samples; with ``include_query`` φ(x) is the first of
    the k tokens and k − 1 neighbours follow. ``raw_query``: that token is φ(x) as the encoder
    outputs it, not unit norm (the CompVis release's ``sample_with_query``, whose database rows
    are raw CLIP features too); the search is cosine either way."""
    q = _query(encoder.encode_images, [image.convert("RGB")], raw_query)  # (1, d)
    rows = _search(db, q, k - 1 if include_query else k)[0]  # (k,) or (k - 1,)
    context = db.vectors(rows)
    if include_query:
        context = np.concatenate([q, context])  # (k, d): φ(x) first
    label = "query image" + (" + its embedding" if include_query else "")
    return _repeat(context, rows, label, n, query=image)


def text_context(
    db: Database,
    encoder: Encoder,
    k: int,
    text: str,
    n: int,
    *,
    mode: str = "neighbors",
    raw_query: bool = False,
) -> Conditioning:
    """The text embedding retrieves k neighbours from D (``neighbors``), is the first token
    followed by k − 1 retrieved neighbours (``text+neighbors``), or is the whole (1, d) context
    (``text``): the paper's three ways of conditioning on text through a CLIP database.
    ``raw_query``: the text token is not unit norm (the release's ``rdm_sample.py --caption``
    feeds ``clip.encode_text`` as it comes; ``--only_caption`` is ``text``, ``--omit_query``
    ``neighbors``)."""
    if mode not in TEXT_MODES:
        raise RdmError(f"text mode {mode!r}: choose one of {', '.join(TEXT_MODES)}")
    if not text.strip():
        raise RdmError("the text prompt is empty")
    q = _query(encoder.encode_texts, [text], raw_query)  # (1, d)
    if mode == "text":
        return _repeat(q, np.zeros(0, dtype=np.int64), f"text: {text}", n)
    with_text = mode == "text+neighbors"
    n_rows = k - 1 if with_text else k
    rows = _search(db, q, n_rows)[0] if n_rows else np.zeros(0, dtype=np.int64)
    context = db.vectors(rows)  # (n_rows, d)
    if with_text:
        context = np.concatenate([q, context])  # (k, d): the text token first
    return _repeat(context, rows, f"text ({mode}): {text}", n)


def pseudo_query_context(
    db: Database,
    k: int,
    n: int,
    *,
    prob: np.ndarray | None,
    top_m: float | None = None,
    weighted: bool = False,
    uniform: bool = False,
    seed: int = 0,
    top_m_rounding: str = "ceil",
) -> Conditioning:
    """x̃ ~ p(x̃) (``prob`` (N_db,), from the database's neighbours file), then ξ_k(x̃, D), x̃ itself
    usually first. ``top_m`` keeps the most probable fraction of the items with p > 0 (the
    paper's best FID is at m = 0.01), drawn uniformly (the official default) or ∝ p with
    ``weighted``; ``uniform`` draws x̃ uniformly from all of D when no p(x̃) is at hand.
    ``top_m_rounding`` "floor" keeps ⌊m · L⌋ of the L candidates as the release does, "ceil"
    (rdm's) ⌈m · L⌉ (:func:`rdm.pseudo_query.candidates`). As in the release's
    ``sample_from_rdata`` the context is the k stored rows found for x̃, with no query token."""
    if uniform:
        prob = None
    elif prob is None:
        raise RdmError(
            f"unconditional sampling draws pseudo-queries from p(x̃), which needs a neighbours "
            f"file of database {db.root}: run 'rdm db neighbors {db.root} --queries SOURCE "
            "--split train' or pass --neighbors FILE (or --uniform to draw from all of D)"
        )
    elif len(prob) != len(db):
        raise RdmError(f"p(x̃) has {len(prob)} entries but database {db.root} has {len(db)} rows")
    picks = pseudo_query.draw(
        prob, n, top_m=top_m, weighted=weighted, seed=seed, n_db=len(db), rounding=top_m_rounding
    )
    rows = _search(db, db.vectors(picks), k)  # (n, k)
    labels = [f"pseudo-query id {db.ids[p]}" for p in picks]
    return Conditioning(
        db.vectors(rows), [list(r) for r in rows], labels, query_rows=[int(p) for p in picks]
    )


def class_pool_context(
    db: Database,
    encoder: Encoder,
    k: int,
    prompt: str,
    n: int,
    *,
    pool_size: int,
    seed: int = 0,
) -> Conditioning:
    """Retrieve a pool of the prompt's L = ``pool_size`` ≥ k nearest rows and draw k distinct
    ones at random per sample (seeded): samples of one class that differ in their neighbours."""
    if pool_size < k:
        raise RdmError(f"--pool-size {pool_size} must be at least k = {k}")
    if not prompt.strip():
        raise RdmError("the class-pool prompt is empty")
    pool = _search(db, encoder.encode_texts([prompt]), pool_size)[0]  # (L,)
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.choice(pool, k, replace=False) for _ in range(n)])  # (n, k)
    labels = [f"class pool ({pool_size}): {prompt}"] * n
    return Conditioning(db.vectors(rows), [list(r) for r in rows], labels)


def concat(conds: Sequence[Conditioning]) -> Conditioning:
    """Several conditionings as one (their contexts must share k')."""
    sizes = sorted({c.context.shape[1:] for c in conds})
    if len(sizes) > 1:
        raise RdmError(f"cannot join contexts of different shapes {sizes} into one batch")
    return Conditioning(
        np.concatenate([c.context for c in conds]),
        [r for c in conds for r in c.rows],
        [lab for c in conds for lab in c.labels],
        [q for c in conds for q in c.query_images],
        [q for c in conds for q in c.query_rows],
    )


def _query(encode, items: list, raw: bool) -> np.ndarray:
    """``encode(items)`` (B, d): unit norm, or the raw features with ``raw`` (an encoder that
    cannot give them, e.g. a test fake, is refused rather than silently normalised)."""
    import inspect

    if not raw:
        return encode(items)
    if "unit" not in inspect.signature(encode).parameters:
        raise RdmError(
            "this encoder gives only unit-norm embeddings, but the model reads the raw query "
            "features (an imported CompVis run): load the encoder by its spec (--encoder SPEC)"
        )
    return encode(items, unit=False)


def _search(db: Database, q: np.ndarray, k: int) -> np.ndarray:
    """Rows (B, k) of the top-k of ``q`` (B, d); a k larger than D is an input error."""
    if k > len(db):
        raise RdmError(f"k = {k} but database {db.root} holds only {len(db)} items")
    _, rows = db.search(np.ascontiguousarray(q, dtype=np.float32), k)
    return rows


def _repeat(context, rows, label: str, n: int, query=None) -> Conditioning:
    """One (k', d) context for ``n`` samples."""
    ctx = np.repeat(np.asarray(context, dtype=np.float32)[None], n, axis=0)  # (n, k', d)
    return Conditioning(ctx, [[int(r) for r in rows]] * n, [label] * n, [query] * n)


# --- looking at results ---------------------------------------------------------------------------


def neighbor_images(db: Database, rows: Sequence[int], source) -> list[Image.Image | None]:
    """Images of database ``rows`` loaded from ``source`` (see :func:`database_source`); None
    where the source is None or an image cannot be read."""
    from rdm.data import BadImage

    out: list[Image.Image | None] = []
    for r in rows:
        try:
            out.append(source.load(int(db.ids[r])) if source is not None else None)
        except BadImage:
            out.append(None)
    return out


def database_source(db: Database):
    """The source ``db`` was built from, or None when it is not on this machine (grids only)."""
    from rdm.data import SourceError, open_source

    try:
        return open_source(db.source_spec)
    except SourceError:
        return None


def grid(
    cond: Conditioning,
    samples: Sequence[Image.Image],
    db: Database,
    *,
    source=None,
    cell: int = 64,
) -> Image.Image:
    """One row per sample: [query image] + the neighbours that conditioned it + the sample.

    Rows are padded so that every sample sits in the last column; neighbours whose images are
    not at hand are grey cells.
    """
    from rdm.sheets import image_grid

    if len(samples) != len(cond):
        raise RdmError(f"{len(samples)} samples for {len(cond)} conditionings")
    source = source if source is not None else database_source(db)
    rows = []
    for i in range(len(samples)):
        query = cond.query_images[i]
        neighbours = neighbor_images(db, cond.rows[i], source)
        rows.append(([query] if query is not None else []) + neighbours)
    width = max(len(r) for r in rows)
    rows = [r + [None] * (width - len(r)) + [s] for r, s in zip(rows, samples, strict=True)]
    return image_grid(rows, row_labels=cond.labels, cell=cell)
