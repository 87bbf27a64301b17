"""Training neighbours ξ_k(x, D) of every training image x, and the pseudo-query distribution p(x̃).

The model is trained on ε_θ(z_t, t, {φ(y) : y ∈ ξ_k(x, D)}), so each training image's k nearest
database rows are computed once and stored (k = 20 stored, the first 4 used in the paper).

A training image must not retrieve itself (paper §3: D is disjoint from X). Whatever the
splits, three kinds of candidate are dropped, and the search goes deeper until exactly k remain:
the query's own row (same source, same id), exact pixel duplicates (same content hash, e.g. the
same picture under two names) and near-duplicates (cosine > the threshold that
:mod:`rdm.duplicates` derives from what the encoder does to re-encoded copies of a picture, or
``exclude_threshold`` when given). Splits that are disjoint by construction (``train`` vs ``db``)
share no item, but a folder split by file name, or a dataset holding the same photo twice, may
still share pictures, so the check always runs. The counts of each kind are reported and stored.

For unconditional sampling, a pseudo-query x̃ is drawn from the database with (paper §3.3)

    p(x̃) = |{x ∈ X : x̃ ∈ ξ_{k_p}(x, D)}| / (k_p · |X|),

how often x̃ is among the first k_p neighbours of the training images (sums to 1 over D).

File (docs/design.md, "Neighbours file"): safetensors with ``query_ids`` (N,), ``nn_rows``,
``nn_ids`` (N, K) int64, ``nn_scores`` (N, K) float32, ``pq_counts`` (N_db,) int64,
``pq_prob`` (N_db,) float64, and metadata ``meta`` (JSON).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdm.data import Source, splits_disjoint
from rdm.database import ContentHashes, Database, ids_sha256, rebuild_command
from rdm.duplicates import calibrate
from rdm.embedding import encode_source
from rdm.encoders import Encoder, require_same_identity
from rdm.errors import IdentityMismatch, RdmError
from rdm.io import atomic_write, require_writable, write_json
from rdm.pseudo_query import distribution as pseudo_query_distribution

FORMAT = "rdm-neighbors/1"
#: candidates searched beyond k (doubled for queries that need more after exclusion)
EXTRA = 8
#: warn when exact and near-duplicate exclusions exceed this share of the k·N kept neighbours
WARN_SHARE = 0.01
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
    exclude_threshold: float | None = None,
    batch_size: int = 256,
    out: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    block_size: int | None = None,
) -> Path:
    """Find the ``k`` database neighbours of every readable image of ``source``'s ``split`` and
    write the neighbours file (default ``DB/neighbors-<split>.safetensors``). Returns its path.

    Candidates that are the query itself, an exact pixel duplicate of it, or a near-duplicate
    (cosine > ``exclude_threshold``; None = derived from the encoder by
    :func:`rdm.duplicates.calibrate` with ``seed``) are excluded, whatever the splits.

    The queries are worked in blocks of ``block_size`` (default :data:`BLOCK_SIZE`), each written
    to ``OUT.partial/`` when done (:func:`neighbor_block`), so a killed run resumes from its
    finished blocks and ends with exactly the bytes of an unbroken run."""
    plan = plan_neighbors(
        db, source, split, encoder, k, k_p, exclude_threshold, batch_size, out, seed, block_size
    )
    pending = plan.pending()
    with _progress_bar(plan.ids_count, progress) as bar:
        bar.update(plan.ids_count - sum(len(plan.block_ids(source, b)) for b in pending))
        for b in pending:
            neighbor_block(db, source, encoder, plan, b, bar=bar)
    return finish_neighbors(db, plan)


#: queries per resumable block: 8192 x 20 neighbours is 2.6 MB of results, a few minutes of CLIP
BLOCK_SIZE = 8192
PLAN = "plan.json"


@dataclass
class NeighborPlan:
    """Everything a neighbours run decides once, shared by all its blocks.

    Written to ``partial/plan.json`` before the first block, and read back by a resumed run (and
    by every worker of a distributed one), so every block of one run uses the same threshold even
    where calibration would differ between machines. ``blocks`` are ``[start, stop)`` ranges into
    the query split's ids (:meth:`block_ids`); block ``b`` is done when
    ``partial/block-<b>.npz`` exists (:meth:`block_path`)."""

    out: str  # the neighbours file
    db_fingerprint: str
    encoder: dict  # the database's encoder identity (the query encoder was checked against it)
    queries: dict  # {spec, split, db_fraction, ids_count, ids_sha256}
    k: int
    k_p: int
    batch_size: int
    exclusion: dict  # {threshold, threshold_from, calibration, same_source, items_disjoint}
    blocks: list[list[int]]  # [[start, stop), ...] into the split's ids, in order

    @property
    def partial(self) -> Path:
        """The directory of finished blocks: ``OUT.partial`` beside the neighbours file."""
        out = Path(self.out)
        return out.with_name(out.name + ".partial")

    @property
    def ids_count(self) -> int:
        return int(self.queries["ids_count"])

    def block_path(self, b: int) -> Path:
        return self.partial / f"block-{b:05d}.npz"

    def block_ids(self, source: Source, b: int) -> np.ndarray:
        """(n_b,) int64 query ids of block ``b``, ascending."""
        start, stop = self.blocks[b]
        ids = source.split_ids(self.queries["split"], self.queries["db_fraction"])
        return ids[start:stop]

    def pending(self) -> list[int]:
        """Blocks not yet written, in order."""
        return [b for b in range(len(self.blocks)) if not self.block_path(b).is_file()]

    def as_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **self.__dict__}


PLAN_FORMAT = "rdm-neighbors-plan/1"


def plan_neighbors(
    db: Database,
    source: Source,
    split: str,
    encoder: Encoder,
    k: int = 20,
    k_p: int = 4,
    exclude_threshold: float | None = None,
    batch_size: int = 256,
    out: str | Path | None = None,
    seed: int = 0,
    block_size: int | None = None,
) -> NeighborPlan:
    """Check the request, decide the exclusion (calibrating the threshold when none is given) and
    the blocks, and write them to ``OUT.partial/plan.json``; or read them back from there when a
    run with the same options was interrupted (then nothing is recalibrated)."""
    _check_arguments(db, k, k_p, exclude_threshold, batch_size)
    block_size = BLOCK_SIZE if block_size is None else block_size
    if block_size < 1:
        raise NeighborsError(f"the block size must be positive, got {block_size}")
    # a whole number of encoder batches per block: the blocks then encode exactly the batches of
    # one unbroken pass (an encoder's last bits can depend on what shares its batch)
    block_size = -(-block_size // batch_size) * batch_size
    path = Path(out) if out is not None else db.root / f"neighbors-{split}.safetensors"
    require_writable(path, what="neighbours file")
    db.require_encoder(encoder, f"query encoder {encoder.identity.get('spec', '?')}")
    db_fraction = float(db.manifest["source"]["db_fraction"])
    ids = source.split_ids(split, db_fraction)  # (n,) int64 ascending
    queries = {
        "spec": source.spec,
        "split": split,
        "db_fraction": db_fraction,
        "ids_count": int(len(ids)),
        "ids_sha256": ids_sha256(ids),
    }
    blocks = [[i, min(i + block_size, len(ids))] for i in range(0, len(ids), block_size)]
    settings = {
        "out": str(path),
        "db_fingerprint": db.fingerprint,
        "encoder": db.identity,
        "queries": queries,
        "k": k,
        "k_p": k_p,
        "batch_size": batch_size,
        "blocks": blocks,
    }
    partial = path.with_name(path.name + ".partial")
    stored = _stored_plan(partial, settings, exclude_threshold)
    if stored is not None:
        done = len(stored.blocks) - len(stored.pending())
        _note(f"resuming the neighbours in {partial}: {done} of {len(blocks)} blocks done")
        return stored
    exclusion = _exclusion(db, source, split, ids, encoder, exclude_threshold, batch_size, seed)
    decided = {
        "threshold": exclusion.threshold,
        "threshold_from": exclusion.threshold_from,
        "calibration": exclusion.calibration,
        "same_source": exclusion.same_source,
        "items_disjoint": exclusion.items_disjoint,
    }
    require_writable(partial, is_dir=True, what="neighbours block directory")
    plan = NeighborPlan(**settings, exclusion=decided)
    write_json(partial / PLAN, plan.as_dict())
    # every run, fresh or resumed, goes on from the plan as JSON gives it back: same bytes after
    return _read_plan(partial / PLAN)


def _stored_plan(partial: Path, settings: dict, threshold: float | None) -> NeighborPlan | None:
    """The plan of an interrupted run with these settings; refuse one made with others."""
    if not (partial / PLAN).is_file():
        return None
    plan = _read_plan(partial / PLAN)
    stored = plan.as_dict()
    diffs = [key for key in settings if stored[key] != json.loads(json.dumps(settings[key]))]
    if threshold is not None and plan.exclusion["threshold"] != float(threshold):
        diffs.append("exclude_threshold")
    if threshold is None and plan.exclusion["threshold_from"] != "derived":
        diffs.append("exclude_threshold")
    if diffs:
        raise NeighborsError(
            f"{partial} holds the blocks of an interrupted neighbours run with other options "
            f"({', '.join(diffs)} differ); rerun the original command to finish it, or delete "
            f"{partial} to start over"
        )
    return plan


def _read_plan(path: Path) -> NeighborPlan:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeighborsError(
            f"neighbours plan {path} cannot be read ({exc}); delete {path.parent} and rerun"
        ) from None
    if data.pop("format", None) != PLAN_FORMAT:
        raise NeighborsError(f"{path} is not a neighbours plan; delete {path.parent} and rerun")
    return NeighborPlan(**data)


def neighbor_block(
    db: Database, source: Source, encoder: Encoder, plan: NeighborPlan, b: int, bar=None
) -> Path:
    """The unit of work of a neighbours run: encode block ``b``'s query images, find each one's
    ``plan.k`` neighbours after exclusion, and write ``plan.block_path(b)`` atomically.

    Idempotent and independent of every other block, so any engine may run the blocks in any
    order, in any number of processes, and rerun any of them: a block already written is left as
    it is, and a block written twice holds the same bytes (same plan, same database). ``bar``: an
    optional tqdm bar advanced by the images consumed. Returns the block's path."""
    path = plan.block_path(b)
    if path.is_file():
        return path
    ids = plan.block_ids(source, b)
    ex = _Exclusion(**plan.exclusion, db_hashes=db.content_hashes)
    query_ids, skipped, rows, scores, grey = [], [], [], [], True
    for batch in encode_source(source, ids, encoder, plan.batch_size, skipped):
        if len(batch.ids):
            I, D = _neighbours(db, batch.ids, batch.hashes, batch.embeddings, plan.k, ex)
            query_ids.append(batch.ids)
            grey = grey and all(batch.grey)
            rows.append(I)
            scores.append(D)
        if bar is not None:
            bar.update(batch.seen)
    k = plan.k
    info = {"skipped": skipped, "grey": grey, "counts": [ex.n_self, ex.n_exact, ex.n_near]}
    arrays = {
        "query_ids": np.concatenate(query_ids or [np.zeros(0, np.int64)]).astype(np.int64),
        "nn_rows": np.concatenate(rows or [np.zeros((0, k), np.int64)]),  # (n_b, k) int64
        "nn_scores": np.concatenate(scores or [np.zeros((0, k), np.float32)]),  # (n_b, k) float32
        "info": np.array(json.dumps(info, ensure_ascii=False)),  # a str array: no pickle
    }
    atomic_write(path, lambda tmp: _save_npz(tmp, arrays))
    return path


def finish_neighbors(db: Database, plan: NeighborPlan) -> Path:
    """All blocks done: join them in order into the neighbours file, then remove the partial
    directory. Returns the neighbours file's path."""
    missing = plan.pending()
    if missing:
        raise NeighborsError(
            f"{len(missing)} of {len(plan.blocks)} neighbour blocks are not done (first: "
            f"{plan.block_path(missing[0])}); run them before finishing"
        )
    blocks = [_load_block(plan.block_path(b)) for b in range(len(plan.blocks))]
    infos = [blk["info"] for blk in blocks]
    q = plan.queries
    if not any(len(blk["query_ids"]) for blk in blocks):
        raise NeighborsError(
            f"no image of {q['spec']} split {q['split']!r} could be read; no neighbours"
        )
    ex = _Exclusion(**plan.exclusion, db_hashes=db.content_hashes)
    ex.n_self, ex.n_exact, ex.n_near = (sum(i["counts"][j] for i in infos) for j in range(3))
    skipped = [item for i in infos for item in i["skipped"]]
    nn_rows = np.concatenate([blk["nn_rows"] for blk in blocks])  # (N, k) int64
    k, k_p = plan.k, plan.k_p
    tensors = {
        "query_ids": np.concatenate([blk["query_ids"] for blk in blocks]),
        "nn_rows": nn_rows,
        "nn_ids": db.ids[nn_rows],
        "nn_scores": np.concatenate([blk["nn_scores"] for blk in blocks]).astype(np.float32),
        **pseudo_query_distribution(nn_rows, k_p, db.count),
    }
    meta = {
        "format": FORMAT,
        "db_fingerprint": db.fingerprint,
        "db": str(db.root),
        "encoder": db.identity,
        "queries": {
            "spec": q["spec"],
            "split": q["split"],
            "db_fraction": q["db_fraction"],
            "count": len(tensors["query_ids"]),
            "skipped": skipped,
            # every readable query image is grey (R = G = B): rdm train then trains a 1-channel
            # model by default (docs/training.md)
            "grayscale": all(i["grey"] for i in infos),
        },
        "k": k,
        "k_p": k_p,
        "exclusion": ex.as_meta(k * len(nn_rows)),
    }
    path = Path(plan.out)
    save_neighbors(path, tensors, meta)
    shutil.rmtree(plan.partial)
    _report(path, ex, k, len(nn_rows), len(skipped), tensors["pq_counts"], db.count)
    return path


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(f, **arrays)


def _load_block(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            block = {name: z[name] for name in ("query_ids", "nn_rows", "nn_scores")}
            block["info"] = json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise NeighborsError(
            f"neighbour block {path} cannot be read ({exc}); delete it and rerun to recompute it"
        ) from None
    return block


@dataclass
class _Exclusion:
    """What to drop from a query's candidates, and how many were dropped (for the record).

    Always: the query's own row (same source and id), rows with the query's content hash (exact
    pixel duplicates) and rows with cosine > ``threshold`` (near-duplicates)."""

    threshold: float
    threshold_from: str  # "derived" (rdm.duplicates.calibrate) or "user" (--exclude-threshold)
    same_source: bool
    items_disjoint: bool  # rdm.data.splits_disjoint: no shared item, which says nothing of pixels
    db_hashes: ContentHashes | None  # (N_db,) content hashes; None: a database built before them
    calibration: dict | None = None
    n_self: int = 0
    n_exact: int = 0
    n_near: int = 0

    def as_meta(self, n_kept: int) -> dict:
        return {
            "enabled": True,
            "threshold": self.threshold,
            "threshold_from": self.threshold_from,
            "calibration": self.calibration,
            "items_disjoint": self.items_disjoint,
            "content_hashes": self.db_hashes is not None,
            "excluded_self": self.n_self,
            "excluded_exact_duplicates": self.n_exact,
            "excluded_near_duplicates": self.n_near,
            "candidates_kept": n_kept,
            "excluded_share": self.share(n_kept),
        }

    def share(self, n_kept: int) -> float:
        """Exact and near-duplicate exclusions per kept neighbour (k·N); self matches are
        expected when D overlaps X and are not counted."""
        return (self.n_exact + self.n_near) / max(n_kept, 1)


def _exclusion(db, source, split, ids, encoder, threshold, batch_size, seed) -> _Exclusion:
    """Decide what is excluded for these queries, calibrating the threshold when none is given."""
    disjoint = splits_disjoint(db.source_spec, db.split, source.spec, split)
    if disjoint:
        _note(
            f"{source.spec} split {split!r} and the database (split {db.split!r}) share no item "
            "by construction, but may still share pictures: checking for exact and "
            "near-duplicates anyway"
        )
    hashes = db.content_hashes
    if hashes is None:
        _note(
            f"warning: database {db.root} was built before rdm recorded content hashes, so exact "
            "pixel duplicates of the queries are caught only if their cosine exceeds the "
            f"threshold; rebuild it with '{rebuild_command(db.manifest)}' to exclude them always"
        )
    calibration = None
    if threshold is None:
        cal = calibrate(db, source, ids, encoder, seed=seed, batch_size=batch_size)
        _note(cal.summary())
        threshold, calibration = cal.threshold, cal.record
    else:
        _note(f"near-duplicate threshold {threshold} (given by --exclude-threshold)")
    return _Exclusion(
        threshold=float(threshold),
        threshold_from="derived" if calibration else "user",
        same_source=db.source_spec == source.spec,
        items_disjoint=disjoint,
        db_hashes=hashes,
        calibration=calibration,
    )


def _neighbours(
    db: Database,
    query_ids: np.ndarray,
    query_hashes: list[str],
    z: np.ndarray,
    k: int,
    ex: _Exclusion,
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``k`` neighbour rows (B, k) and scores (B, k) per query, after exclusion."""
    depth = min(k + EXTRA, db.count)
    out_I = np.empty((len(z), k), np.int64)
    out_D = np.empty((len(z), k), np.float32)
    qh = np.asarray(query_hashes, dtype=object)  # (B,) hex content hashes
    todo = np.arange(len(z))
    while len(todo):
        D, I = db.search(z[todo], depth)  # (b, depth)
        valid = I >= 0  # FAISS marks missing results with -1
        rows = np.maximum(I, 0)
        is_self = valid & ex.same_source & (db.ids[rows] == query_ids[todo, None])
        is_exact = np.zeros_like(is_self)
        if ex.db_hashes is not None:  # same pixels: 64-bit codes, confirmed on the full hash
            is_exact = valid & ~is_self & ex.db_hashes.matches(rows, qh[todo])
        is_near = valid & ~is_self & ~is_exact & (D > ex.threshold)
        keep = valid & ~is_self & ~is_exact & ~is_near
        enough = keep.sum(axis=1) >= k
        first_k = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # first k kept, rank order
        out_I[todo[enough]] = np.take_along_axis(I, first_k, 1)[enough]
        out_D[todo[enough]] = np.take_along_axis(D, first_k, 1)[enough]
        scanned = (np.cumsum(keep, axis=1) - keep < k)[enough]  # ranks up to the k-th kept one
        ex.n_self += int(is_self[enough][scanned].sum())
        ex.n_exact += int(is_exact[enough][scanned].sum())
        ex.n_near += int(is_near[enough][scanned].sum())
        todo = todo[~enough]
        if len(todo) and depth == db.count:
            raise NeighborsError(
                f"query id {query_ids[todo[0]]} has fewer than k={k} database neighbours left after "
                f"excluding itself, exact duplicates and near-duplicates (cosine > "
                f"{ex.threshold:.5f}) from {db.count} rows: lower -k or raise --exclude-threshold"
            )
        depth = min(2 * depth, db.count)
    return out_I, out_D


def _report(path, ex: _Exclusion, k, n_queries, n_skipped, pq_counts, n_db) -> None:
    _note(
        f"wrote {path}: {n_queries} queries x {k} neighbours ({n_skipped} unreadable queries "
        f"skipped); excluded {ex.n_self} self matches, {ex.n_exact} exact duplicates and "
        f"{ex.n_near} near-duplicates (cosine > {ex.threshold:.5f}, {ex.threshold_from}); p(x̃) "
        f"covers {int(np.sum(pq_counts > 0))} of {n_db} rows"
    )
    share = ex.share(k * n_queries)
    if share > WARN_SHARE:
        _note(
            f"warning: exclusion removed {ex.n_exact + ex.n_near} candidates, "
            f"{100 * share:.1f}% of the {k * n_queries} neighbours kept (more than "
            f"{100 * WARN_SHARE:g}%): either the queries and the database share many pictures, or "
            f"the threshold {ex.threshold:.5f} excludes distinct images; raise --exclude-threshold "
            "if the excluded neighbours are not copies"
        )


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="neighbours", disable=not enabled)


def _check_arguments(
    db: Database, k: int, k_p: int, threshold: float | None, batch_size: int
) -> None:
    if not 1 <= k <= db.count:
        raise NeighborsError(f"-k must lie in 1..{db.count} (the size of {db.root}), got {k}")
    if not 1 <= k_p <= k:
        raise NeighborsError(f"--k-p must lie in 1..k={k}, got {k_p}")
    if threshold is not None and not -1 <= threshold <= 1:
        raise NeighborsError(f"--exclude-threshold is a cosine in [-1, 1], got {threshold}")
    if batch_size < 1:
        raise NeighborsError(f"--batch-size must be positive, got {batch_size}")


# ---- files --------------------------------------------------------------------------------------


def save_neighbors(path: Path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Write a neighbours file atomically: the :data:`TENSORS` (all required) plus any extra
    arrays given (e.g. the release's ranking of p(x̃), rdm.official.db_import), and ``meta``."""
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(tensors[name]) for name in (*TENSORS, *tensors)}
    metadata = {"meta": json.dumps(meta, ensure_ascii=False)}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


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
