"""The retrieval database D, opened read-only: frozen-encoder embeddings of one source split, plus
metadata and index; searched, verified, and checked against what its manifest records.

On disk (see docs/design.md, "Database directory")::

    DIR/manifest.json               written last: a valid manifest = a complete build
    DIR/embeddings/shard-00000.npy  float16 (rows, d), unit norm, rows in id order
    DIR/metadata.parquet            row, id, key, caption, content_hash, split
    DIR/index.faiss                 FAISS index over the embeddings (inner product = cosine)
    DIR/index.faiss.ivfdata         its inverted lists, when the index lives on disk
    DIR/skipped.jsonl               {"id", "key", "reason"} per item that was not embedded

Building lives in :mod:`rdm.db_build` (``build_database`` is re-exported here).

Two hashes describe a database, for two different questions:

- :attr:`Database.fingerprint` — *which* database this is, for the pairing guards (neighbours
  files, a run's ``db_fingerprint``, the pipeline's swap check): a hash of its content identity
  (source spec, split, db fraction, the ids of the rows it holds, the encoder's identity, how the
  vectors are stored). It does not depend on the embedding bytes, which differ between CPUs for
  the same encoder (bf16 autocast rounds differently on different microarchitectures), so
  neighbours and models made on one machine fit the same database rebuilt on another.
- :attr:`Database.checksum` — whether its *bytes* are intact: a hash of the shards' sha256s.
  Every file is checked against the sha256 its manifest records the first time it is read
  (once per :class:`Database`); ``rdm db verify`` checks everything at once.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from functools import cached_property
from pathlib import Path

import numpy as np

from rdm import index as faiss_index
from rdm.encoders import Encoder, identity_fingerprint, require_same_identity
from rdm.errors import RdmError
from rdm.io import sha256_file

FORMAT = "rdm-db/1"
IDENTITY_FORMAT = "rdm-db-identity/1"
#: how stored vectors are made from the encoder's output (part of the content identity)
VECTORS = "float16, renormalised to unit norm in float32"
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


def __getattr__(name: str):
    # `from rdm.database import build_database` keeps working; building lives in rdm.db_build,
    # which imports this module (a lazy re-export avoids the import cycle)
    if name in ("build_database", "DEFAULT_MEMORY_BUDGET", "RECALL_KS"):
        from rdm import db_build

        return getattr(db_build, name)
    raise AttributeError(f"module 'rdm.database' has no attribute {name!r}")


# ---- identity and checksum ----------------------------------------------------------------------


def ids_sha256(ids: np.ndarray) -> str:
    """sha256 of int64 little-endian ids: which items a split (or a database) holds."""
    return hashlib.sha256(np.ascontiguousarray(ids, "<i8").tobytes()).hexdigest()


class IdsDigest:
    """:func:`ids_sha256` and the count of ids given in consecutive chunks, so a build can hash
    its rows' ids without holding them all."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self.count = 0

    def update(self, ids: np.ndarray) -> None:
        self._sha.update(np.ascontiguousarray(ids, "<i8").tobytes())
        self.count += len(ids)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def content_identity(
    source: dict, row_ids: np.ndarray | IdsDigest, encoder: dict, vectors: str = VECTORS
) -> dict:
    """What a database holds, independent of the exact bytes of its embeddings.

    ``source``: the manifest's ``{spec, split, db_fraction}``; ``row_ids`` (N,) the source ids of
    its rows (the split's ids minus the skipped ones), or their :class:`IdsDigest`; ``encoder``:
    the encoder identity, reduced to :func:`rdm.encoders.identity_fingerprint` (what it
    computes, not where it was loaded); ``vectors``: how the stored vectors were made (imports
    keep theirs: rdm.official.db_import)."""
    if not isinstance(row_ids, IdsDigest):
        digest = IdsDigest()
        digest.update(row_ids)
        row_ids = digest
    return {
        "format": IDENTITY_FORMAT,
        "source": source["spec"],
        "split": source["split"],
        "db_fraction": float(source["db_fraction"]),
        "rows": int(row_ids.count),
        "ids_sha256": row_ids.hexdigest(),
        "encoder": identity_fingerprint(encoder),
        "vectors": vectors,
    }


def fingerprint_of(identity: dict) -> str:
    """16 hex chars of the sha256 of a content identity (canonical JSON): ``Database.fingerprint``."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checksum_of(shards: list[dict]) -> str:
    """16 hex chars of the sha256 of the shards' sha256s (one per line): ``Database.checksum``.
    (Before rdm separated identity from integrity this was the manifest's ``fingerprint``.)"""
    blob = "\n".join(s["sha256"] for s in shards).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def rebuild_command(manifest: dict, out: str | Path = "NEW_DIR") -> str:
    """The ``rdm db build`` command that makes this database again (same fingerprint)."""
    if "import" in manifest:  # imported (rdm.official.db_import): the import command remakes it
        return shlex.join([*manifest["import"]["argv"], "--out", str(out)])
    src = manifest["source"]
    args = [
        "rdm", "db", "build", src["spec"], "--split", src["split"],
        "--db-fraction", str(src["db_fraction"]),
        "--encoder", str(manifest["encoder"].get("spec", "SPEC")), "--out", str(out),
    ]  # fmt: skip
    return shlex.join(args)


# ---- open ---------------------------------------------------------------------------------------


class Database:
    """A complete database directory, opened read-only. Rows are dense 0..N-1 in id order.

    Files are read lazily and each is checked against its manifest sha256 when first read."""

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
        manifest = read_json(root / MANIFEST, "database manifest")
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

    @property
    def unit_norm(self) -> bool:
        """Whether the stored vectors are unit norm; imported ones may not be (they are kept as
        the model was trained with), and are then normalised for every cosine search."""
        return bool(self.manifest.get("unit_norm", True))

    def __len__(self) -> int:
        return self.count

    @property
    def fingerprint(self) -> str:
        """Content identity (see the module docstring): what the pairing guards compare.

        A database built before rdm recorded its identity keeps the fingerprint it was built with
        (then a hash of its shard checksums), so the neighbours files and runs made for it still
        fit; rebuild it to get a fingerprint that is the same on every machine."""
        return self.manifest["fingerprint"]

    @property
    def checksum(self) -> str:
        """Hash of the shards' sha256s: changes with any byte of the embeddings."""
        return self.manifest.get("checksum") or checksum_of(self.manifest["shards"])

    @property
    def source_spec(self) -> str:
        return self.manifest["source"]["spec"]

    @property
    def split(self) -> str:
        return self.manifest["source"]["split"]

    def __repr__(self) -> str:
        return f"Database({str(self.root)!r}, count={self.count}, dim={self.dim})"

    def rebuild_hint(self) -> str:
        """What to tell a user whose copy of this database is damaged."""
        return (
            f"rebuild it with '{rebuild_command(self.manifest)}' (same fingerprint: its "
            f"neighbours files and models still fit), or restore {self.root} from a copy"
        )

    # -- metadata --

    @cached_property
    def metadata(self):
        """The whole metadata table (pyarrow): row, id, key, caption, content_hash, split. For
        small databases and inspection: the build, search and neighbour paths read single
        columns (:attr:`ids`, :attr:`content_hashes`), never the whole table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._metadata_path
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise DatabaseError(
                f"metadata {path} cannot be read ({exc}); {self.rebuild_hint()}"
            ) from None

    @cached_property
    def _metadata_path(self) -> Path:
        """metadata.parquet, checked against its sha256 once."""
        return self._checked_file(self.manifest["metadata"], "metadata")

    def _column(self, name: str):
        """One metadata column (a pyarrow ChunkedArray), read alone from the parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._metadata_path
        try:
            return pq.read_table(path, columns=[name]).column(name)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise DatabaseError(
                f"metadata {path} cannot be read ({exc}); {self.rebuild_hint()}"
            ) from None

    @cached_property
    def ids(self) -> np.ndarray:
        """(N,) int64 source ids, ascending; ``ids[row]`` is the id of a row (8 bytes a row)."""
        return self._column("id").to_numpy().astype(np.int64)

    @cached_property
    def keys(self) -> list[str]:
        return self._column("key").to_pylist()

    @cached_property
    def captions(self) -> list[str]:
        return self._column("caption").to_pylist()

    @cached_property
    def content_hashes(self) -> ContentHashes | None:
        """The content hash of each row's pixels (:class:`ContentHashes`: 8 bytes a row in RAM),
        or None for a database built before rdm recorded them (rebuild it to enable exact-
        duplicate exclusion)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._metadata_path
        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowException) as exc:
            raise DatabaseError(
                f"metadata {path} cannot be read ({exc}); {self.rebuild_hint()}"
            ) from None
        return ContentHashes(path, self.count) if "content_hash" in names else None

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
    def embeddings(self) -> faiss_index.ShardRows:
        """(N, d) float16, unit norm, rows in id order: a read-only view over the memory-mapped
        shards (every shard checked on first use), never concatenated in RAM. Slice it or index
        it with rows to get an array; ``np.asarray`` reads it all (small databases only)."""
        shards = self.manifest["shards"]
        lengths = [int(s["rows"]) for s in shards]
        return faiss_index.ShardRows(_Shards(self), lengths, self.dim, np.float16)

    def vectors(self, rows) -> np.ndarray:
        """Embeddings of ``rows`` (any shape of ints) as float32 (…, d).

        Only the shards holding ``rows`` are checked (once each) and read, and only those rows
        of them, so a query touching a few rows of a large database does not hash all of it."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise DatabaseError(f"rows must lie in 0..{self.count - 1} for database {self.root}")
        out = self.embeddings[rows.ravel()].astype(np.float32)  # gathered from the memmaps
        return out.reshape(*rows.shape, self.dim)

    @cached_property
    def _unit_rows(self) -> faiss_index.UnitRows:
        """The stored vectors normalised as they are read (cosine over vectors not unit norm)."""
        lengths = [int(s["rows"]) for s in self.manifest["shards"]]
        return faiss_index.UnitRows(_Shards(self), lengths, self.dim, np.float16)

    def _shard(self, s: int) -> np.ndarray:
        """Shard ``s`` (rows, d) float16, memory-mapped; checked against its sha256 on first use.
        A few shards stay mapped (:class:`rdm.index.MappedShards`: each map holds a file
        descriptor); one evicted is mapped again when read again, not checked again."""
        checked = self.__dict__.setdefault("_checked_shards", set())
        if s not in checked:
            self._read_shard(self.manifest["shards"][s])
            checked.add(s)
        return self._mapped_shards[s]

    @cached_property
    def _mapped_shards(self) -> faiss_index.MappedShards:
        return faiss_index.MappedShards([self.root / e["file"] for e in self.manifest["shards"]])

    # -- search --

    @cached_property
    def index(self):
        """The FAISS index, with its tuned search knobs; an on-disk index's inverted lists are
        memory-mapped, not read into RAM. On a GPU where faiss has GPU support (in-memory kinds)."""
        info = self.manifest["index"]
        path = self._checked_file(info, "index")
        if info.get("data_file"):  # on-disk inverted lists, beside the index file
            self._checked_file({"file": info["data_file"], "sha256": info["data_sha256"]}, "index")
        spec = faiss_index.IndexSpec(info["type"], info["params"])
        return faiss_index.to_gpu(faiss_index.load_index(path, spec), spec)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by cosine: ``xq`` (B, d) or (d,) -> ``D`` (B, k) float32, ``I`` (B, k)
        int64 rows, every one a real row. Queries are renormalised (cosine needs unit vectors
        on both sides)."""
        if not 1 <= k <= self.count:
            raise DatabaseError(
                f"k must lie in 1..{self.count} (the database's size) for {self.root}, got {k}"
            )
        xq = np.atleast_2d(np.asarray(xq, dtype=np.float32))
        if xq.shape[1] != self.dim:
            raise DatabaseError(
                f"queries have dimension {xq.shape[1]} but database {self.root} has d={self.dim}"
            )
        if not np.isfinite(xq).all():
            raise DatabaseError(
                f"a query vector for database {self.root} holds NaN or inf; check where it came "
                f"from ('rdm db verify {self.root}' checks the stored vectors)"
            )
        xq = xq / np.maximum(np.linalg.norm(xq, axis=1, keepdims=True), 1e-12)
        D, I = faiss_index.search(self.index, xq, k)  # (B, k); I = -1 where FAISS found < k
        short = (I < 0).any(axis=1)
        if short.any():
            # An approximate index can return fewer than k rows (an IVF probing lists that hold
            # fewer vectors); FAISS pads with row -1, score -3.4e38. Search those queries exactly.
            xb = self.embeddings if self.unit_norm else self._unit_rows
            D[short], I[short] = faiss_index.exact_search(xb, xq[short], k)
        if (I < 0).any():  # unreachable for k <= count; never hand -1 on as a row
            raise DatabaseError(f"search of {self.root} found fewer than k = {k} rows")
        return D, I

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

    # -- checked reading --

    def _checked_file(self, entry: dict, what: str) -> Path:
        """``root / entry["file"]`` after checking its bytes against ``entry["sha256"]``."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise DatabaseError(f"{what} {path} is missing; {self.rebuild_hint()}")
        if sha256_file(path) != entry["sha256"]:
            raise DatabaseError(
                f"{what} {path} does not match the sha256 in {self.root / MANIFEST} (damaged, "
                f"truncated or modified); {self.rebuild_hint()}"
            )
        return path

    def _read_shard(self, shard: dict) -> np.ndarray:
        """One embeddings shard, checked: (rows, d) float16 (memory-mapped)."""
        path = self._checked_file(shard, "embeddings shard")
        problem = _shard_problem(path, shard["rows"], self.dim)
        if problem:
            raise DatabaseError(f"{problem}; {self.rebuild_hint()}")
        return np.load(path, mmap_mode="r", allow_pickle=False)


class _Shards:
    """The shards of ``db`` as a sequence that opens (and checks) each one on first use."""

    def __init__(self, db: Database):
        self.db = db

    def __len__(self) -> int:
        return len(self.db.manifest["shards"])

    def __getitem__(self, s: int) -> np.ndarray:
        return self.db._shard(int(s))


# ---- content hashes -----------------------------------------------------------------------------


class ContentHashes:
    """The ``content_hash`` column of a database (hex sha256 of each row's decoded pixels,
    rdm.embedding.content_hash; "" where unknown), held compactly for duplicate exclusion.

    :attr:`codes` (N,) uint64 are the first 8 bytes of each hash (0 = no hash), streamed from
    the parquet file one row group at a time: 8 bytes a row in RAM (167 MB at 20.9M rows) where
    the strings took ~90. Equal hashes have equal codes; :meth:`matches` compares codes first and
    confirms every pair whose codes agree with the full strings, read from the parquet row groups
    holding those rows, so an exclusion is never decided on 64 bits alone.

    ``hashes[rows]`` gives the full strings (any key numpy accepts: a row, rows, a slice)."""

    #: rows per batch when streaming the column
    BATCH = 65_536

    def __init__(self, path: Path, count: int):
        self.path = Path(path)
        self.count = count
        self._group: tuple[int, list[str]] | None = None  # the last row group read

    def __len__(self) -> int:
        return self.count

    @cached_property
    def codes(self) -> np.ndarray:
        """(N,) uint64: the first 8 bytes of each row's hash, 0 for a row without one."""
        out = np.empty(self.count, np.uint64)
        at = 0
        for batch in self._file.iter_batches(batch_size=self.BATCH, columns=["content_hash"]):
            codes = hash_codes(batch.column(0).to_pylist())
            out[at : at + len(codes)] = codes
            at += len(codes)
        if at != self.count:
            raise DatabaseError(f"metadata {self.path} holds {at} rows, expected {self.count}")
        return out

    def __getitem__(self, key) -> str | np.ndarray:
        rows = np.arange(self.count)[key]
        if np.ndim(rows) == 0:
            return str(self.strings(np.array([rows]))[0])
        return self.strings(rows.ravel()).reshape(rows.shape)

    def strings(self, rows: np.ndarray) -> np.ndarray:
        """(n,) object array of the full hashes of ``rows``, read by row group."""
        rows = np.asarray(rows, np.int64)
        out = np.empty(len(rows), dtype=object)
        group_of = np.searchsorted(self._group_starts, rows, side="right") - 1
        for g in np.unique(group_of):
            where = np.flatnonzero(group_of == g)
            values = self._read_group(int(g))
            out[where] = [values[r] for r in rows[where] - self._group_starts[g]]
        return out

    def matches(self, rows: np.ndarray, hashes) -> np.ndarray:
        """(B, m) bool: whether the stored hash of ``rows[b, j]`` is ``hashes[b]`` (hex
        strings; a row without a hash matches nothing)."""
        rows = np.asarray(rows, np.int64)
        given = np.asarray(hashes, dtype=object)  # (B,)
        stored = self.codes[rows]  # (B, m)
        same = (stored == hash_codes(list(given))[:, None]) & (stored != 0)
        b, j = np.nonzero(same)
        if len(b):  # confirm on the full strings: no exclusion on a 64-bit coincidence
            same[b, j] = self.strings(rows[b, j]) == given[b]
        return same

    def same_as_rows(self, rows: np.ndarray, of: np.ndarray) -> np.ndarray:
        """(B, m) bool: whether ``rows[b, j]`` holds the same (non-empty) hash as row ``of[b]``."""
        rows, of = np.asarray(rows, np.int64), np.asarray(of, np.int64)
        stored = self.codes[rows]  # (B, m)
        same = (stored == self.codes[of][:, None]) & (stored != 0)
        b, j = np.nonzero(same)
        if len(b):
            same[b, j] = self.strings(rows[b, j]) == self.strings(of[b])
        return same

    @cached_property
    def _file(self):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path)

    @cached_property
    def _group_starts(self) -> np.ndarray:
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        return np.cumsum([0] + sizes)  # (G + 1,)

    def _read_group(self, g: int) -> list[str]:
        if self._group is None or self._group[0] != g:
            table = self._file.read_row_group(g, columns=["content_hash"])
            self._group = (g, table.column(0).to_pylist())
        return self._group[1]


#: hex digit values by ASCII code; any other byte counts by its low 4 bits (codes only need to
#: be equal for equal strings: every match is confirmed on the strings)
_HEX = np.arange(256, dtype=np.uint64) & np.uint64(15)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def hash_codes(hashes: list[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of each hex hash (its first 16 hex digits), 0 for "" and
    1 for a non-empty hash whose first 8 bytes are 0 (0 is kept for "no hash")."""
    try:
        chars = np.asarray(hashes, dtype="S16")  # first 16 characters, NUL-padded
    except UnicodeEncodeError:  # not ASCII: not an rdm hash; code its UTF-8 bytes instead
        chars = np.asarray([h.encode()[:16] for h in hashes], dtype="S16")
    nibbles = _HEX[chars.reshape(-1, 1).view(np.uint8)]  # (n, 16), most significant first
    nibbles[chars.reshape(-1, 1).view(np.uint8) == 0] = 0  # NUL padding of short strings
    codes = np.zeros(len(chars), np.uint64)
    for i in range(16):
        codes = (codes << np.uint64(4)) | nibbles[:, i]
    empty = np.array([not h for h in hashes], dtype=bool)
    codes[(codes == 0) & ~empty] = 1
    codes[empty] = 0
    return codes


def _shard_problem(path: Path, rows: int, dim: int) -> str | None:
    """What is wrong with a shard file's header (None when it is float16 (rows, dim))."""
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        return f"embeddings shard {path} cannot be read ({exc})"
    if emb.dtype != np.float16 or emb.shape != (rows, dim):
        return f"embeddings shard {path} is {emb.dtype} {emb.shape}, expected float16 {(rows, dim)}"
    return None


def _not_a_database_message(root: Path) -> str:
    state_path = root / BUILD / "state.json"
    if not state_path.is_file():
        return (
            f"{root} is not an rdm database (no {MANIFEST}); build one with "
            f"'rdm db build SOURCE --out {root}'"
        )
    state = read_json(state_path, "build state")
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
    if m.get("checksum", checksum_of(m["shards"])) != checksum_of(m["shards"]):
        problems.append("manifest checksum does not match the shard checksums")
    if "identity" in m and not problems:
        problems += _verify_identity(db)
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
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"embeddings shard {path} does not match its checksum (modified?)")
        problem = _shard_problem(path, shard["rows"], m["dim"])
        if problem:
            problems.append(problem)
            continue
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
        norms = np.linalg.norm(emb.astype(np.float32), axis=1)
        if not m.get("unit_norm", True):  # imported as the model was trained with: finite only
            if not np.isfinite(norms).all():
                problems.append(f"embeddings shard {path} has rows that are not finite")
        elif emb.size and not (np.abs(norms - 1) <= NORM_TOLERANCE).all():  # NaN fails too
            problems.append(f"embeddings shard {path} has rows that are not unit norm")
    if total != m["count"]:
        problems.append(f"shards hold {total} rows, the manifest says {m['count']}")
    return problems


def _verify_metadata(db: Database) -> list[str]:
    path = db.root / METADATA
    if not path.is_file():
        return [f"{path} is missing"]
    if sha256_file(path) != db.manifest["metadata"]["sha256"]:
        return [f"{path} does not match its checksum (modified?)"]
    problems = []
    rows = db._column("row").to_numpy()
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
    if sha256_file(path) != m["index"]["sha256"]:
        problems.append(f"index {path} does not match its checksum (modified or truncated?)")
    if m["index"].get("data_file"):  # an on-disk index's inverted lists
        data = root / m["index"]["data_file"]
        if not data.is_file():
            return problems + [f"index lists {data} are missing"]
        if sha256_file(data) != m["index"]["data_sha256"]:
            problems.append(f"index lists {data} do not match their checksum (modified?)")
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


def _verify_identity(db: Database) -> list[str]:
    """The recorded identity describes these rows and this encoder, and hashes to the fingerprint."""
    m = db.manifest
    problems = []
    vectors = m["identity"].get("vectors", VECTORS)
    if content_identity(m["source"], db.ids, m["encoder"], vectors) != m["identity"]:
        problems.append(f"{MANIFEST} identity does not describe the rows and encoder it lists")
    if fingerprint_of(m["identity"]) != m["fingerprint"]:
        problems.append(f"{MANIFEST} fingerprint is not the hash of its identity")
    return problems


# ---- files --------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatabaseError(f"{what} {path} cannot be read ({exc}); it is damaged") from None


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
