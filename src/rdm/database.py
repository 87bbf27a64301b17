"""The retrieval database D: frozen-encoder embeddings of one source split, plus metadata and index.

On disk (see docs/design.md, "Database directory")::

    DIR/manifest.json               written last: a valid manifest = a complete build
    DIR/embeddings/shard-00000.npy  float16 (rows, d), unit norm, rows in id order
    DIR/metadata.parquet            row, id, key, caption, split
    DIR/index.faiss                 FAISS index over the embeddings (inner product = cosine)
    DIR/skipped.jsonl               {"id", "key", "reason"} per item that was not embedded
    DIR/_build/                     resume state while building

The build walks the split's ids in fixed shards of ``shard_size`` ids. Each finished shard is
written atomically to ``_build/`` (its ``.npy`` first, then its ``.json`` record, which marks it
done), so a killed build resumes from the finished shards and ends with exactly the rows an
unbroken build has. Items whose image is unusable are recorded in ``skipped.jsonl`` and never
shift ids: the database's ``row`` numbers are dense, its ``id`` column keeps the source's ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np

from rdm import index as faiss_index
from rdm.data import Source
from rdm.embedding import encode_source
from rdm.encoders import Encoder, describe_identity, identity_fingerprint, require_same_identity
from rdm.errors import RdmError

FORMAT = "rdm-db/1"
#: default memory budget for the index (the --memory-budget of `rdm db build`)
DEFAULT_MEMORY_BUDGET = 2_000_000_000
#: recall of approximate indexes is tuned and recorded at these k: 4 neighbours condition the
#: model (paper's k), the neighbours file stores 20
RECALL_KS = (4, 20)
RECALL_QUERIES = 1000
#: embeddings are stored float16, so their norms are 1 only up to float16 rounding
NORM_TOLERANCE = 1e-2

MANIFEST = "manifest.json"
METADATA = "metadata.parquet"
INDEX = "index.faiss"
SKIPPED = "skipped.jsonl"
BUILD = "_build"
EMBEDDINGS = "embeddings"


class DatabaseError(RdmError):
    """A database directory that is missing, incomplete, damaged, or built with other options."""


# ---- build --------------------------------------------------------------------------------------


def build_database(
    source: Source,
    split: str,
    encoder: Encoder,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    shard_size: int = 4096,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    db_fraction: float = 0.5,
    progress: bool = True,
) -> Path:
    """Embed ``source``'s ``split`` with ``encoder`` into the database directory ``out_dir``.

    Resumes a partial build made with the same source, split, fraction, encoder and shard size;
    refuses one made with other options, and refuses a directory holding anything else. Returns
    ``out_dir``; when it already holds this very database, says so and returns it unchanged."""
    out = Path(out_dir)
    if batch_size < 1 or shard_size < 1:
        raise DatabaseError(
            f"--batch-size and --shard-size must be positive, got {batch_size} and {shard_size}"
        )
    ids = source.split_ids(split, db_fraction)  # (n,) int64 ascending
    plan = _plan(source, split, db_fraction, encoder, shard_size, ids)
    if _already_built(out, plan):
        return out
    _start_or_resume(out, plan)

    shards = [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]
    done = [s for s in range(len(shards)) if _shard_record_path(out, s).is_file()]
    with _progress_bar(len(ids), sum(len(shards[s]) for s in done), progress) as bar:
        for s, shard_ids in enumerate(shards):
            if s not in done:
                _build_shard(out, s, shard_ids, source, encoder, batch_size, bar)

    _finish(out, plan, source, split, db_fraction, len(shards), memory_budget, progress)
    return out


@dataclass
class _Plan:
    """Everything a partial build must agree on to be resumed (written to ``_build/state.json``)."""

    source: dict  # {spec, split, db_fraction, ids_count, ids_sha256}
    encoder: dict  # identity
    shard_size: int

    def as_dict(self) -> dict:
        return {"format": FORMAT, **self.__dict__}

    def differences(self, other: dict) -> list[str]:
        """Human-readable differences between this plan and a stored one."""
        old = other["source"]
        diffs = [
            f"source {key} {old.get(key)!r} -> {self.source[key]!r}"
            for key in ("spec", "split", "db_fraction")
            if old.get(key) != self.source[key]
        ]
        if not diffs and old.get("ids_sha256") != self.source["ids_sha256"]:
            diffs.append(
                f"the split's items changed ({old.get('ids_count')} ids -> "
                f"{self.source['ids_count']}, other checksum)"
            )
        if identity_fingerprint(other["encoder"]) != identity_fingerprint(self.encoder):
            diffs.append(
                f"encoder {describe_identity(other['encoder'])} -> {describe_identity(self.encoder)}"
            )
        if other.get("shard_size") != self.shard_size:
            diffs.append(f"shard size {other.get('shard_size')} -> {self.shard_size}")
        return diffs


def _plan(
    source: Source, split: str, db_fraction: float, encoder: Encoder, shard_size: int, ids
) -> _Plan:
    return _Plan(
        source={
            "spec": source.spec,
            "split": split,
            "db_fraction": float(db_fraction),
            "ids_count": int(len(ids)),
            "ids_sha256": hashlib.sha256(np.ascontiguousarray(ids, "<i8").tobytes()).hexdigest(),
        },
        encoder=dict(encoder.identity),
        shard_size=int(shard_size),
    )


def _already_built(out: Path, plan: _Plan) -> bool:
    """True when ``out`` holds this database complete; refuse when it holds a different one."""
    if not (out / MANIFEST).is_file():
        return False
    manifest = _read_json(out / MANIFEST, "database manifest")
    built = {"source": manifest.get("source", {}), "encoder": manifest.get("encoder", {})}
    diffs = plan.differences({**built, "shard_size": plan.shard_size})
    if diffs:
        raise DatabaseError(
            f"{out} already holds a complete database built with other options "
            f"({'; '.join(diffs)}); it is never overwritten: choose another --out, or delete {out}"
        )
    _note(f"{out} already holds this database ({manifest['count']} rows): nothing to do")
    if (out / BUILD).exists():  # killed between writing the manifest and cleaning up
        shutil.rmtree(out / BUILD)
    return True


def _start_or_resume(out: Path, plan: _Plan) -> None:
    state_path = out / BUILD / "state.json"
    if state_path.is_file():
        diffs = plan.differences(_read_json(state_path, "build state"))
        if diffs:
            raise DatabaseError(
                f"{out} holds a partial build made with other options ({'; '.join(diffs)}); "
                f"rerun the original command to finish it, or delete {out / BUILD} to start over"
            )
        _note(f"resuming the partial build in {out}")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatabaseError(
            f"{out} exists and is not an empty directory, a database or a partial build: "
            "choose a new --out directory"
        )
    (out / BUILD).mkdir(parents=True, exist_ok=True)
    _write_json(state_path, plan.as_dict())


def _build_shard(
    out: Path, s: int, shard_ids: np.ndarray, source: Source, encoder: Encoder, batch_size: int, bar
) -> None:
    """Embed one shard's ids; write ``_build/shard-s.npy`` then its record ``shard-s.json``."""
    rows: list[dict] = []  # {id, key, caption, content_hash} of embedded items, in id order
    skipped: list[dict] = []  # {id, key, reason}
    chunks: list[np.ndarray] = []
    for batch in encode_source(source, shard_ids, encoder, batch_size, skipped):
        for i, h in zip(map(int, batch.ids), batch.hashes, strict=True):
            rows.append(
                {"id": i, "key": source.key(i), "caption": source.caption(i), "content_hash": h}
            )
        chunks.append(batch.embeddings)
        bar.update(batch.seen)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    emb = _unit_float16(emb)  # (rows, d) float16
    npy = _shard_build_path(out, s)
    _save_npy(npy, emb)
    record = {"shard": s, "rows": rows, "skipped": skipped, "sha256": _sha256(npy)}
    _write_json(_shard_record_path(out, s), record)


def _unit_float16(z: np.ndarray) -> np.ndarray:
    """Renormalise in float32, then store as float16 (norm error ≤ ~1e-3)."""
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.maximum(norms, 1e-12)).astype(np.float16)


def _finish(
    out: Path,
    plan: _Plan,
    source: Source,
    split: str,
    db_fraction: float,
    n_shards: int,
    memory_budget: float,
    progress: bool,
) -> None:
    """All shards done: move them into place, write metadata, index and (last) the manifest.
    Every step can be redone, so a build killed here also resumes."""
    records = [_read_json(_shard_record_path(out, s), "shard record") for s in range(n_shards)]
    shards = _move_shards(out, records)
    rows = [row for r in records for row in r["rows"]]
    skipped = [item for r in records for item in r["skipped"]]
    if not rows:
        raise DatabaseError(
            f"no image of {source.spec} split {split!r} could be used ({len(skipped)} skipped; "
            f"reasons in {out / BUILD}); nothing to index"
        )
    _write_metadata(out / METADATA, rows, _split_labels(source, split, db_fraction, rows))
    _write_skipped(out / SKIPPED, skipped)
    emb = _concat_shards(out, shards)
    index_info = _build_and_save_index(out, emb, memory_budget, progress)
    manifest = {
        "format": FORMAT,
        "encoder": plan.encoder,
        "dim": int(emb.shape[1]),
        "count": len(rows),
        "source": {**plan.source, "rule": source.split_rule(db_fraction)},
        "shards": shards,
        "metadata": {"file": METADATA, "sha256": _sha256(out / METADATA)},
        "index": index_info,
        "skipped": len(skipped),
        "fingerprint": fingerprint_of(shards),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rdm_version": _rdm_version(),
    }
    _write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / BUILD)
    _note(
        f"built {out}: {len(rows)} rows, {len(skipped)} skipped, d={manifest['dim']}, "
        f"index {index_info['type']} recall@{index_info['k']} = {index_info['recall_at_k']:.3f}"
    )


def _move_shards(out: Path, records: list[dict]) -> list[dict]:
    """Move non-empty ``_build`` shards to ``embeddings/`` (idempotent); their manifest entries."""
    (out / EMBEDDINGS).mkdir(exist_ok=True)
    shards = []
    for r in records:
        if not r["rows"]:
            continue
        final = out / EMBEDDINGS / f"shard-{r['shard']:05d}.npy"
        built = _shard_build_path(out, r["shard"])
        if built.is_file():
            os.replace(built, final)
        if not final.is_file() or _sha256(final) != r["sha256"]:
            raise DatabaseError(
                f"embeddings shard {r['shard']} of the partial build in {out} is missing or "
                f"damaged; delete {_shard_record_path(out, r['shard'])} and rerun the build to "
                "recompute it"
            )
        shards.append(
            {"file": f"{EMBEDDINGS}/{final.name}", "rows": len(r["rows"]), "sha256": r["sha256"]}
        )
    return shards


def _split_labels(source: Source, split: str, db_fraction: float, rows: list[dict]) -> list[str]:
    """The split each row belongs to; for ``all``, the finer train / db / test membership."""
    if split != "all":
        return [split] * len(rows)
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    labels = np.full(len(ids), "all", dtype=object)
    for name in ("train", "db", "test"):
        labels[np.isin(ids, source.split_ids(name, db_fraction))] = name
    return labels.tolist()


def _build_and_save_index(out: Path, emb: np.ndarray, memory_budget: float, progress: bool) -> dict:
    n, d = emb.shape
    spec = faiss_index.choose_index(n, d, memory_budget)
    if progress:
        _note(f"indexing {n} vectors: {spec.factory(d)} (inner product)")
    index = faiss_index.build_index(emb, spec)
    ks = tuple(sorted({min(k, n - 1) for k in RECALL_KS} - {0}))
    if spec.type == "flat" or not ks:
        recall, measured_on = (
            {k: 1.0 for k in RECALL_KS},
            "exact index (IndexFlatIP): recall 1 by construction",
        )
    else:
        spec, recall = faiss_index.tune_index(index, spec, emb, ks, n_queries=RECALL_QUERIES)
        measured_on = (
            f"{min(RECALL_QUERIES, n)} database rows as queries (seed 0), each query's own row "
            "left out, against exact search"
        )
    faiss_index.save_index(index, out / INDEX)
    return {
        "type": spec.type,
        "params": spec.params,
        "factory": spec.factory(d),
        "file": INDEX,
        "sha256": _sha256(out / INDEX),
        "recall_at_k": float(recall[min(recall)]),
        "k": int(min(recall)),
        "recall_by_k": {str(k): float(r) for k, r in recall.items()},
        "measured_on": measured_on,
        "bytes_per_vector": spec.bytes_per_vector(d),
        "memory_budget": float(memory_budget),
    }


# ---- open ---------------------------------------------------------------------------------------


class Database:
    """A complete database directory, opened read-only. Rows are dense 0..N-1 in id order."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path) -> Database:
        root = Path(root)
        if not root.exists():
            raise DatabaseError(
                f"database directory {root} does not exist; build one with "
                f"'rdm db build SOURCE --out {root}'"
            )
        if not root.is_dir():
            raise DatabaseError(f"{root} is a file, not a database directory")
        if not (root / MANIFEST).is_file():
            raise DatabaseError(_not_a_database_message(root))
        manifest = _read_json(root / MANIFEST, "database manifest")
        if manifest.get("format") != FORMAT:
            raise DatabaseError(
                f"{root / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}: "
                "rebuild the database with this version of rdm"
            )
        return cls(root, manifest)

    # -- what it is --

    @property
    def identity(self) -> dict:
        """The encoder identity the embeddings were made with."""
        return self.manifest["encoder"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def source_spec(self) -> str:
        return self.manifest["source"]["spec"]

    @property
    def split(self) -> str:
        return self.manifest["source"]["split"]

    def __repr__(self) -> str:
        return f"Database({str(self.root)!r}, count={self.count}, dim={self.dim})"

    # -- metadata --

    @cached_property
    def metadata(self):
        """The metadata table (pyarrow): row, id, key, caption, split."""
        import pyarrow.parquet as pq

        return pq.read_table(self.root / METADATA)

    @cached_property
    def ids(self) -> np.ndarray:
        """(N,) int64 source ids, ascending; ``ids[row]`` is the id of a row."""
        return self.metadata.column("id").to_numpy().astype(np.int64)

    @cached_property
    def keys(self) -> list[str]:
        return self.metadata.column("key").to_pylist()

    @cached_property
    def captions(self) -> list[str]:
        return self.metadata.column("caption").to_pylist()

    @cached_property
    def content_hashes(self) -> np.ndarray | None:
        """(N,) content hash of each row's pixels, or None for a database built before rdm
        recorded them (rebuild it to enable exact-duplicate exclusion)."""
        if "content_hash" not in self.metadata.column_names:
            return None
        return np.asarray(self.metadata.column("content_hash").to_pylist(), dtype=object)

    def rows_of(self, ids) -> np.ndarray:
        """Rows holding source ``ids``; a :class:`DatabaseError` names ids the database lacks."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, ids)
        rows = np.minimum(rows, self.count - 1)
        missing = ids[self.ids[rows] != ids]
        if missing.size:
            raise DatabaseError(
                f"id {missing[0]} is not in the database {self.root} ({self.count} rows from "
                f"{self.source_spec} split {self.split!r}; skipped items are in {SKIPPED})"
            )
        return rows

    # -- vectors --

    @cached_property
    def embeddings(self) -> np.ndarray:
        """(N, d) float16, unit norm, rows in id order (all shards concatenated in memory)."""
        return _concat_shards(self.root, self.manifest["shards"])

    def vectors(self, rows) -> np.ndarray:
        """Embeddings of ``rows`` (any shape of ints) as float32 (…, d)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise DatabaseError(f"rows must lie in 0..{self.count - 1} for database {self.root}")
        return self.embeddings[rows].astype(np.float32)

    # -- search --

    @cached_property
    def index(self):
        spec = faiss_index.IndexSpec(
            self.manifest["index"]["type"], self.manifest["index"]["params"]
        )
        return faiss_index.load_index(self.root / self.manifest["index"]["file"], spec)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by cosine: ``xq`` (B, d) or (d,) -> ``D`` (B, k) float32, ``I`` (B, k)
        int64 rows. Queries are renormalised (cosine needs unit vectors on both sides)."""
        if not 1 <= k <= self.count:
            raise DatabaseError(
                f"k must lie in 1..{self.count} (the database's size) for {self.root}, got {k}"
            )
        xq = np.atleast_2d(np.asarray(xq, dtype=np.float32))
        if xq.shape[1] != self.dim:
            raise DatabaseError(
                f"queries have dimension {xq.shape[1]} but database {self.root} has d={self.dim}"
            )
        xq = xq / np.maximum(np.linalg.norm(xq, axis=1, keepdims=True), 1e-12)
        return faiss_index.search(self.index, xq, k)

    # -- pairing guards --

    def require_encoder(self, encoder: Encoder, encoder_name: str = "the query encoder") -> None:
        """Refuse an encoder whose identity differs from the one the database was built with."""
        require_same_identity(
            self.identity, f"database {self.root}", encoder.identity, encoder_name
        )

    def require_compatible(self, other: Database) -> None:
        """Refuse swapping in ``other`` unless it was embedded by the same encoder (same d)."""
        require_same_identity(
            self.identity, f"database {self.root}", other.identity, f"database {other.root}"
        )
        if other.dim != self.dim:  # the identity fixes d; kept explicit for hand-edited manifests
            raise DatabaseError(
                f"database {other.root} has d={other.dim} but {self.root} has d={self.dim}"
            )


def _not_a_database_message(root: Path) -> str:
    state_path = root / BUILD / "state.json"
    if not state_path.is_file():
        return (
            f"{root} is not an rdm database (no {MANIFEST}); build one with "
            f"'rdm db build SOURCE --out {root}'"
        )
    state = _read_json(state_path, "build state")
    src = state["source"]
    return (
        f"{root} holds an incomplete build of {src['spec']} split {src['split']!r}; rerun "
        f"'rdm db build {src['spec']} --split {src['split']} --encoder {state['encoder'].get('spec')} "
        f"--shard-size {state['shard_size']} --out {root}' to resume it"
    )


# ---- verify -------------------------------------------------------------------------------------


def verify(root: str | Path) -> list[str]:
    """Check a database directory end to end; returns the problems found (empty = sound)."""
    root = Path(root)
    try:
        db = Database.open(root)
    except DatabaseError as exc:
        return [str(exc)]
    m = db.manifest
    problems = _verify_shards(root, m)
    problems += _verify_metadata(db)
    problems += _verify_index(root, m)
    if m.get("fingerprint") != fingerprint_of(m["shards"]):
        problems.append("manifest fingerprint does not match the shard checksums")
    n_skipped = _count_lines(root / SKIPPED)
    if n_skipped != m.get("skipped"):
        problems.append(f"{SKIPPED} lists {n_skipped} items, the manifest says {m.get('skipped')}")
    return problems


def _verify_shards(root: Path, m: dict) -> list[str]:
    problems, total = [], 0
    for shard in m["shards"]:
        path = root / shard["file"]
        total += shard["rows"]
        if not path.is_file():
            problems.append(f"embeddings shard {path} is missing")
            continue
        if _sha256(path) != shard["sha256"]:
            problems.append(f"embeddings shard {path} does not match its checksum (modified?)")
        try:
            emb = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            problems.append(f"embeddings shard {path} cannot be read: {exc}")
            continue
        if emb.dtype != np.float16 or emb.shape != (shard["rows"], m["dim"]):
            problems.append(
                f"embeddings shard {path} is {emb.dtype} {emb.shape}, expected float16 "
                f"({shard['rows']}, {m['dim']})"
            )
            continue
        norms = np.linalg.norm(emb.astype(np.float32), axis=1)
        if emb.size and np.abs(norms - 1).max() > NORM_TOLERANCE:
            problems.append(f"embeddings shard {path} has rows that are not unit norm")
    if total != m["count"]:
        problems.append(f"shards hold {total} rows, the manifest says {m['count']}")
    return problems


def _verify_metadata(db: Database) -> list[str]:
    path = db.root / METADATA
    if not path.is_file():
        return [f"{path} is missing"]
    if _sha256(path) != db.manifest["metadata"]["sha256"]:
        return [f"{path} does not match its checksum (modified?)"]
    problems = []
    rows = db.metadata.column("row").to_numpy()
    if len(rows) != db.count or not np.array_equal(rows, np.arange(db.count)):
        problems.append(f"{path} rows are not 0..{db.count - 1}")
    if len(np.unique(db.ids)) != len(db.ids) or np.any(np.diff(db.ids) < 0):
        problems.append(f"{path} ids are not unique and ascending")
    return problems


def _verify_index(root: Path, m: dict) -> list[str]:
    path = root / m["index"]["file"]
    if not path.is_file():
        return [f"index {path} is missing"]
    problems = []
    if _sha256(path) != m["index"]["sha256"]:
        problems.append(f"index {path} does not match its checksum (modified or truncated?)")
    try:
        index = faiss_index.load_index(path)
    except RdmError as exc:
        return problems + [str(exc)]
    if index.ntotal != m["count"] or index.d != m["dim"]:
        problems.append(
            f"index {path} holds {index.ntotal} vectors of d={index.d}, expected "
            f"{m['count']} of d={m['dim']}"
        )
    return problems


# ---- files --------------------------------------------------------------------------------------


def fingerprint_of(shards: list[dict]) -> str:
    """sha256 of the shards' checksums (one per line), 16 hex chars: the database's identity."""
    blob = "\n".join(s["sha256"] for s in shards).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _concat_shards(root: Path, shards: list[dict]) -> np.ndarray:
    parts = [np.load(root / s["file"], mmap_mode="r", allow_pickle=False) for s in shards]
    return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])


def _write_metadata(path: Path, rows: list[dict], splits: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "row": pa.array(np.arange(len(rows)), pa.int64()),
            "id": pa.array([r["id"] for r in rows], pa.int64()),
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            # sha256 of the decoded pixels (rdm.embedding.content_hash): exact duplicates
            "content_hash": pa.array([r.get("content_hash", "") for r in rows], pa.string()),
            "split": pa.array(splits, pa.string()),
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_skipped(path: Path, skipped: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))


def _shard_build_path(out: Path, s: int) -> Path:
    return out / BUILD / f"shard-{s:05d}.npy"


def _shard_record_path(out: Path, s: int) -> Path:
    return out / BUILD / f"shard-{s:05d}.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatabaseError(f"{what} {path} cannot be read ({exc}); it is damaged") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="embedding",
        disable=not enabled,
        smoothing=0.1,
    )


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _rdm_version() -> str:
    from rdm import __version__

    return __version__
