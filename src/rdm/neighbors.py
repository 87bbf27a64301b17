"""Training neighbours ξ_k(x, D) of every training image x, and the pseudo-query distribution p(x̃).

The model is trained on ε_θ(z_t, t, {φ(y) : y ∈ ξ_k(x, D)}), so each training image's k nearest
database rows are computed once and stored (k = 20 stored, the first 4 used in the paper).

A training image must not retrieve itself: when the query split and the database may share items
(same source and overlapping splits, or different sources that may hold the same picture), the
query's own row (same source, same id) and near-duplicates (cosine > ``exclude_threshold``) are
dropped, and the search goes deeper until exactly k neighbours remain. When the splits are disjoint
by construction (``train`` vs ``db`` of one source), nothing is excluded.

For unconditional sampling, a pseudo-query x̃ is drawn from the database with (paper §3.3)

    p(x̃) = |{x ∈ X : x̃ ∈ ξ_{k_p}(x, D)}| / (k_p · |X|),

how often x̃ is among the first k_p neighbours of the training images (sums to 1 over D).

File (docs/design.md, "Neighbours file"): safetensors with ``query_ids`` (N,), ``nn_rows``,
``nn_ids`` (N, K) int64, ``nn_scores`` (N, K) float32, ``pq_counts`` (N_db,) int64,
``pq_prob`` (N_db,) float64, and metadata ``meta`` (JSON).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdm.data import BadImage, Source, splits_disjoint
from rdm.database import Database
from rdm.encoders import Encoder, require_same_identity
from rdm.errors import IdentityMismatch, RdmError
from rdm.pseudo_query import distribution as pseudo_query_distribution

FORMAT = "rdm-neighbors/1"
#: candidates searched beyond k when exclusion is on (doubled for queries that need more)
EXTRA = 8
TENSORS = ("query_ids", "nn_rows", "nn_ids", "nn_scores", "pq_counts", "pq_prob")


class NeighborsError(RdmError):
    """A neighbours request or file that cannot be used; the message names the argument or path."""


@dataclass
class Neighbors:
    """A neighbours file in memory: tensors as numpy arrays plus the ``meta`` dict."""

    query_ids: np.ndarray  # (N,) int64 source ids of the query split, ascending
    nn_rows: np.ndarray  # (N, K) int64 database rows, best first
    nn_ids: np.ndarray  # (N, K) int64 database source ids
    nn_scores: np.ndarray  # (N, K) float32 cosine similarities
    pq_counts: np.ndarray  # (N_db,) int64 |{x : row ∈ ξ_{k_p}(x, D)}|
    pq_prob: np.ndarray  # (N_db,) float64 p(x̃), sums to 1
    meta: dict
    path: Path | None = None

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def k_p(self) -> int:
        return int(self.meta["k_p"])

    def require_database(self, db: Database) -> None:
        """Refuse a database other than the one these neighbours index (rows would be wrong)."""
        if self.meta["db_fingerprint"] != db.fingerprint:
            raise IdentityMismatch(
                f"neighbours {self.path} were computed against the database with fingerprint "
                f"{self.meta['db_fingerprint']} ({self.meta.get('db', '?')}), but database "
                f"{db.root} has fingerprint {db.fingerprint}; recompute them with "
                f"'rdm db neighbors {db.root} --queries ...'"
            )

    def require_encoder(self, identity: dict, name: str) -> None:
        """Refuse pairing these neighbours with an artifact (``name``) made by another encoder."""
        require_same_identity(self.meta["encoder"], f"neighbours {self.path}", identity, name)


# ---- compute ------------------------------------------------------------------------------------


def compute_neighbors(
    db: Database,
    source: Source,
    split: str,
    encoder: Encoder,
    k: int = 20,
    k_p: int = 4,
    exclude_threshold: float = 0.98,
    batch_size: int = 256,
    out: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Find the ``k`` database neighbours of every readable image of ``source``'s ``split`` and
    write the neighbours file (default ``DB/neighbors-<split>.safetensors``). Returns its path."""
    _check_arguments(db, k, k_p, exclude_threshold, batch_size)
    db.require_encoder(encoder, f"query encoder {encoder.identity.get('spec', '?')}")
    db_fraction = float(db.manifest["source"]["db_fraction"])
    ids = source.split_ids(split, db_fraction)  # (n,) int64 ascending
    overlap = not splits_disjoint(db.source_spec, db.split, source.spec, split)
    if not overlap:
        _note(
            f"{source.spec} split {split!r} and the database are disjoint by construction: no exclusion"
        )
    exclusion = _Exclusion(overlap, exclude_threshold, db.source_spec == source.spec)

    query_ids, skipped, rows, scores = [], [], [], []
    for batch_ids, z in _encoded_batches(source, ids, encoder, batch_size, skipped, progress):
        I, D = _neighbours(db, batch_ids, z, k, exclusion)
        query_ids.append(batch_ids)
        rows.append(I)
        scores.append(D)
    if not query_ids:
        raise NeighborsError(
            f"no image of {source.spec} split {split!r} could be read; no neighbours"
        )

    nn_rows = np.concatenate(rows)  # (N, k) int64
    tensors = {
        "query_ids": np.concatenate(query_ids).astype(np.int64),
        "nn_rows": nn_rows,
        "nn_ids": db.ids[nn_rows],
        "nn_scores": np.concatenate(scores).astype(np.float32),
        **pseudo_query_distribution(nn_rows, k_p, db.count),
    }
    meta = {
        "format": FORMAT,
        "db_fingerprint": db.fingerprint,
        "db": str(db.root),
        "encoder": db.identity,
        "queries": {
            "spec": source.spec,
            "split": split,
            "db_fraction": db_fraction,
            "count": len(tensors["query_ids"]),
            "skipped": skipped,
        },
        "k": k,
        "k_p": k_p,
        "exclusion": exclusion.as_meta(),
    }
    path = Path(out) if out is not None else db.root / f"neighbors-{split}.safetensors"
    _save(path, tensors, meta)
    _note(
        f"wrote {path}: {len(nn_rows)} queries x {k} neighbours ({len(skipped)} unreadable "
        f"queries skipped; excluded {exclusion.n_self} self and {exclusion.n_near} near-duplicate "
        f"matches); p(x̃) covers {int(np.sum(tensors['pq_counts'] > 0))} of {db.count} rows"
    )
    return path


@dataclass
class _Exclusion:
    """What to drop from a query's candidates, and how many were dropped (for the record)."""

    enabled: bool
    threshold: float
    same_source: bool
    n_self: int = 0
    n_near: int = 0

    def as_meta(self) -> dict:
        return {
            "enabled": self.enabled,
            "threshold": self.threshold,
            "excluded_self": self.n_self,
            "excluded_near_duplicates": self.n_near,
        }


def _neighbours(
    db: Database, query_ids: np.ndarray, z: np.ndarray, k: int, ex: _Exclusion
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``k`` neighbour rows (B, k) and scores (B, k) per query, after exclusion."""
    depth = min(k + EXTRA * ex.enabled, db.count)
    out_I = np.empty((len(z), k), np.int64)
    out_D = np.empty((len(z), k), np.float32)
    todo = np.arange(len(z))
    while len(todo):
        D, I = db.search(z[todo], depth)  # (b, depth)
        is_self = ex.enabled & ex.same_source & (db.ids[np.maximum(I, 0)] == query_ids[todo, None])
        is_near = ex.enabled & (D > ex.threshold) & ~is_self
        keep = (I >= 0) & ~is_self & ~is_near
        enough = keep.sum(axis=1) >= k
        first_k = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # first k kept, rank order
        out_I[todo[enough]] = np.take_along_axis(I, first_k, 1)[enough]
        out_D[todo[enough]] = np.take_along_axis(D, first_k, 1)[enough]
        scanned = (np.cumsum(keep, axis=1) - keep < k)[enough]  # ranks up to the k-th kept one
        ex.n_self += int(is_self[enough][scanned].sum())
        ex.n_near += int(is_near[enough][scanned].sum())
        todo = todo[~enough]
        if len(todo) and depth == db.count:
            raise NeighborsError(
                f"query id {query_ids[todo[0]]} has fewer than k={k} database neighbours left after "
                f"excluding itself and near-duplicates (cosine > {ex.threshold}) from {db.count} "
                "rows: lower -k or raise --exclude-threshold"
            )
        depth = min(2 * depth, db.count)
    return out_I, out_D


def _encoded_batches(source: Source, ids, encoder: Encoder, batch_size: int, skipped, progress):
    """Yield (batch ids (b,) int64, embeddings (b, d) float32) of the readable images of ``ids``;
    unreadable ones are appended to ``skipped`` as {id, key, reason}."""
    from tqdm import tqdm

    with tqdm(total=len(ids), unit="img", desc="neighbours", disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch, images = [], []
            for i in map(int, ids[start : start + batch_size]):
                try:
                    images.append(source.load(i))
                    batch.append(i)
                except BadImage as exc:
                    skipped.append({"id": i, "key": source.key(i), "reason": str(exc)})
            if images:
                yield (
                    np.array(batch, np.int64),
                    np.asarray(encoder.encode_images(images), np.float32),
                )
            bar.update(len(ids[start : start + batch_size]))


def _check_arguments(db: Database, k: int, k_p: int, threshold: float, batch_size: int) -> None:
    if not 1 <= k <= db.count:
        raise NeighborsError(f"-k must lie in 1..{db.count} (the size of {db.root}), got {k}")
    if not 1 <= k_p <= k:
        raise NeighborsError(f"--k-p must lie in 1..k={k}, got {k_p}")
    if not -1 <= threshold <= 1:
        raise NeighborsError(f"--exclude-threshold is a cosine in [-1, 1], got {threshold}")
    if batch_size < 1:
        raise NeighborsError(f"--batch-size must be positive, got {batch_size}")


# ---- files --------------------------------------------------------------------------------------


def _save(path: Path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in TENSORS}
    save_file(arrays, str(tmp), metadata={"meta": json.dumps(meta, ensure_ascii=False)})
    os.replace(tmp, path)


def load_neighbors(path: str | Path) -> Neighbors:
    """Read a neighbours file written by :func:`compute_neighbors`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise NeighborsError(
            f"neighbours file {path} does not exist; compute it with "
            "'rdm db neighbors DB --queries SOURCE --split train'"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            tensors = {name: f.get_tensor(name) for name in TENSORS if name in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise NeighborsError(
            f"neighbours file {path} cannot be read ({exc}); recompute it"
        ) from None
    missing = [name for name in TENSORS if name not in tensors]
    if meta.get("format") != FORMAT or missing:
        raise NeighborsError(
            f"{path} is not an rdm neighbours file (format {meta.get('format')!r}, missing "
            f"{', '.join(missing) or 'nothing'}); recompute it with 'rdm db neighbors'"
        )
    return Neighbors(**tensors, meta=meta, path=path)


def _note(message: str) -> None:
    print(message, file=sys.stderr)
