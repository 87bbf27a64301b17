"""Building the retrieval database D: plan, embed in resumable shards, finish (metadata, index,
manifest). Opening, searching and verifying live in :mod:`rdm.database`.

The build walks the split's ids in fixed shards of ``shard_size`` ids. Each finished shard is
written atomically to ``_build/`` (its ``.npy`` first, then its ``.json`` record, which marks it
done), so a killed build resumes from the finished shards and ends with exactly the rows an
unbroken build has. Items whose image is unusable are recorded in ``skipped.jsonl`` and never
shift ids: the database's ``row`` numbers are dense, its ``id`` column keeps the source's ids.
The output directory is checked for writability before anything is encoded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rdm import index as faiss_index
from rdm.data import Source
from rdm.database import (
    BUILD,
    EMBEDDINGS,
    FORMAT,
    INDEX,
    MANIFEST,
    METADATA,
    SKIPPED,
    DatabaseError,
    IdsDigest,
    checksum_of,
    content_identity,
    fingerprint_of,
    ids_sha256,
    read_json,
    verify,
)
from rdm.embedding import encode_source
from rdm.encoders import Encoder, describe_identity, identity_fingerprint
from rdm.io import atomic_write, require_writable, save_npy, sha256_file, write_json

#: default memory budget for the index (the --memory-budget of `rdm db build`)
DEFAULT_MEMORY_BUDGET = 2_000_000_000
#: recall of approximate indexes is tuned and recorded at these k: 4 neighbours condition the
#: model (paper's k), the neighbours file stores 20
RECALL_KS = (4, 20)
RECALL_QUERIES = 1000


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
    run_shards: Callable[[Path, dict[int, np.ndarray], Source, int, Any], None] | None = None,
) -> Path:
    """Embed ``source``'s ``split`` with ``encoder`` into the database directory ``out_dir``.

    Resumes a partial build made with the same source, split, fraction, encoder and shard size;
    refuses one made with other options, and refuses a directory holding anything else. Returns
    ``out_dir``; when it already holds this very database, says so and returns it unchanged.

    ``run_shards(out, pending, source, batch_size, bar)``: an engine (:mod:`rdm.engines`) that
    runs :func:`build_shard` for each ``{shard number: ids}`` of ``pending`` elsewhere (e.g. on
    a Ray cluster) and advances the tqdm ``bar``; None runs them here, one after another."""
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
    done = {s for s in range(len(shards)) if _shard_record_path(out, s).is_file()}
    pending = {s: shard_ids for s, shard_ids in enumerate(shards) if s not in done}
    with _progress_bar(len(ids), len(ids) - sum(map(len, pending.values())), progress) as bar:
        if run_shards is None:
            for s, shard_ids in pending.items():
                build_shard(out, s, shard_ids, source, encoder, batch_size, bar)
        else:
            run_shards(out, pending, source, batch_size, bar)

    _finish(out, plan, source, split, db_fraction, len(shards), memory_budget, progress)
    return out


# ---- plan ---------------------------------------------------------------------------------------


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
            "ids_sha256": ids_sha256(ids),
        },
        encoder=dict(encoder.identity),
        shard_size=int(shard_size),
    )


def _already_built(out: Path, plan: _Plan) -> bool:
    """True when ``out`` holds this database complete and sound; refuse when it holds a different
    or a damaged one (a rerun must never report "nothing to do" over damaged files)."""
    if not (out / MANIFEST).is_file():
        return False
    manifest = read_json(out / MANIFEST, "database manifest")
    built = {"source": manifest.get("source", {}), "encoder": manifest.get("encoder", {})}
    diffs = plan.differences({**built, "shard_size": plan.shard_size})
    if diffs:
        raise DatabaseError(
            f"{out} already holds a complete database built with other options "
            f"({'; '.join(diffs)}); it is never overwritten: choose another --out, or delete {out}"
        )
    problems = verify(out)
    if problems:
        raise DatabaseError(
            f"{out} holds this database, but damaged ({problems[0]}; {len(problems)} problem(s), "
            f"see 'rdm db verify {out}'); build into another --out, or delete {out} and rerun"
        )
    _note(f"{out} already holds this database ({manifest['count']} rows): nothing to do")
    if (out / BUILD).exists():  # killed between writing the manifest and cleaning up
        shutil.rmtree(out / BUILD)
    return True


def _start_or_resume(out: Path, plan: _Plan) -> None:
    """Check ``out`` can hold this build (and can be written) before anything is encoded."""
    state_path = out / BUILD / "state.json"
    if state_path.is_file():
        diffs = plan.differences(read_json(state_path, "build state"))
        if diffs:
            raise DatabaseError(
                f"{out} holds a partial build made with other options ({'; '.join(diffs)}); "
                f"rerun the original command to finish it, or delete {out / BUILD} to start over"
            )
        require_writable(out / BUILD, is_dir=True, what="database build directory")
        _note(f"resuming the partial build in {out}")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatabaseError(
            f"{out} exists and is not an empty directory, a database or a partial build: "
            "choose a new --out directory"
        )
    require_writable(out, is_dir=True, what="database directory")
    (out / BUILD).mkdir(exist_ok=True)
    write_json(state_path, plan.as_dict())


# ---- shards -------------------------------------------------------------------------------------


def build_shard(
    out: Path,
    s: int,
    shard_ids: np.ndarray,
    source: Source,
    encoder: Encoder,
    batch_size: int,
    bar=None,
) -> None:
    """The unit of work of a build: embed shard ``s``'s ids; write ``_build/shard-s.npy`` then
    its record ``shard-s.json`` (which marks it done). A shard already recorded is left as it is,
    and one written twice holds the same rows, so any engine may run shards in any order, in any
    process, and rerun them. ``bar``: an optional tqdm bar advanced by the ids consumed."""
    if _shard_record_path(out, s).is_file():
        return
    rows: list[dict] = []  # {id, key, caption, content_hash} of embedded items, in id order
    skipped: list[dict] = []  # {id, key, reason}
    chunks: list[np.ndarray] = []
    for batch in encode_source(source, shard_ids, encoder, batch_size, skipped):
        for i, h in zip(map(int, batch.ids), batch.hashes, strict=True):
            rows.append(
                {"id": i, "key": source.key(i), "caption": source.caption(i), "content_hash": h}
            )
        chunks.append(batch.embeddings)
        if bar is not None:
            bar.update(batch.seen)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    npy = save_npy(_shard_build_path(out, s), _unit_float16(emb))  # (rows, d) float16
    record = {"shard": s, "rows": rows, "skipped": skipped, "sha256": sha256_file(npy)}
    write_json(_shard_record_path(out, s), record)


def _unit_float16(z: np.ndarray) -> np.ndarray:
    """Renormalise in float32, then store as float16 (norm error ≤ ~1e-3)."""
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.maximum(norms, 1e-12)).astype(np.float16)


def _shard_build_path(out: Path, s: int) -> Path:
    return out / BUILD / f"shard-{s:05d}.npy"


def _shard_record_path(out: Path, s: int) -> Path:
    return out / BUILD / f"shard-{s:05d}.json"


# ---- finish -------------------------------------------------------------------------------------


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
    Every step can be redone, so a build killed here also resumes.

    The shard records are read one at a time (twice: for the metadata, then for the skipped
    items), so no step holds a row record per image: the metadata is written row group by row
    group, the ids are hashed as they pass."""
    records = _ShardRecords(out, n_shards)
    shards = _move_shards(out, records)
    ids = IdsDigest()
    _write_metadata(out / METADATA, records, _split_labeller(source, split, db_fraction), ids)
    skipped = _write_skipped(out / SKIPPED, records)
    if not ids.count:
        raise DatabaseError(
            f"no image of {source.spec} split {split!r} could be used ({skipped} skipped; "
            f"reasons in {out / BUILD}); nothing to index"
        )
    # (N, d) float16 rows read from the memory-mapped shards, never concatenated in RAM, and
    # only a few shards mapped at a time (each map holds a file descriptor)
    paths = [out / s["file"] for s in shards]
    emb = faiss_index.ShardRows(
        faiss_index.MappedShards(paths), [s["rows"] for s in shards], plan_dim(paths[0]), np.float16
    )
    index_info = _build_and_save_index(out, emb, memory_budget, progress)
    identity = content_identity(plan.source, ids, plan.encoder)
    manifest = {
        "format": FORMAT,
        "encoder": plan.encoder,
        "dim": int(emb.shape[1]),
        "count": ids.count,
        "source": {**plan.source, "rule": source.split_rule(db_fraction)},
        "shards": shards,
        "metadata": {"file": METADATA, "sha256": sha256_file(out / METADATA)},
        "index": index_info,
        "skipped": skipped,
        "identity": identity,  # what the database holds: the pairing guards compare this ...
        "fingerprint": fingerprint_of(identity),
        "checksum": checksum_of(shards),  # ... and this checks its bytes
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rdm_version": _rdm_version(),
    }
    write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / BUILD)
    _note(
        f"built {out}: {ids.count} rows, {skipped} skipped, d={manifest['dim']}, "
        f"index {index_info['type']} recall@{index_info['k']} = {index_info['recall_at_k']:.3f}, "
        f"fingerprint {manifest['fingerprint']}"
    )


class _ShardRecords:
    """The ``_build/shard-NNNNN.json`` records of a build, read one at a time when iterated."""

    def __init__(self, out: Path, n_shards: int):
        self.out, self.n_shards = out, n_shards

    def __iter__(self):
        for s in range(self.n_shards):
            yield read_json(_shard_record_path(self.out, s), "shard record")


def plan_dim(path: Path) -> int:
    """d of a float16 (rows, d) shard file, from its header."""
    return int(np.load(path, mmap_mode="r").shape[1])


def _move_shards(out: Path, records: list[dict]) -> list[dict]:
    """Move non-empty ``_build`` shards to ``embeddings/`` (idempotent); their manifest entries."""
    return [
        publish_shard(
            out,
            r["shard"],
            _shard_build_path(out, r["shard"]),
            r["sha256"],
            len(r["rows"]),
            f"embeddings shard {r['shard']} of the partial build in {out} is missing or damaged; "
            f"delete {_shard_record_path(out, r['shard'])} and rerun the build to recompute it",
        )
        for r in records
        if r["rows"]
    ]


def publish_shard(
    out: Path,
    number: int,
    built: Path,
    sha256: str,
    rows: int,
    damaged: str,
    error: type[DatabaseError] = DatabaseError,
) -> dict:
    """Move the finished shard ``built`` to ``embeddings/shard-NNNNN.npy`` (idempotent: a rerun
    finds it there), check it against its recorded sha256 and return its manifest entry; a
    missing or damaged shard raises ``error(damaged)``."""
    (out / EMBEDDINGS).mkdir(exist_ok=True)
    final = out / EMBEDDINGS / f"shard-{number:05d}.npy"
    if built.is_file():
        os.replace(built, final)
    if not final.is_file() or sha256_file(final) != sha256:
        raise error(damaged)
    return {"file": f"{EMBEDDINGS}/{final.name}", "rows": rows, "sha256": sha256}


def _split_labeller(source: Source, split: str, db_fraction: float):
    """A function from (n,) ids to the split each belongs to; for ``all``, the finer train / db /
    test membership (each split's ids held once, sorted)."""
    if split != "all":
        return lambda ids: [split] * len(ids)
    members = {name: source.split_ids(name, db_fraction) for name in ("train", "db", "test")}

    def labels(ids: np.ndarray) -> list[str]:
        out = np.full(len(ids), "all", dtype=object)
        for name, m in members.items():  # m ascending: membership by binary search
            at = np.minimum(np.searchsorted(m, ids), max(len(m) - 1, 0))
            out[(m[at] == ids) if len(m) else np.zeros(len(ids), bool)] = name
        return out.tolist()

    return labels


def build_and_save_index(
    out: Path, emb, memory_budget: float = DEFAULT_MEMORY_BUDGET, progress: bool = True
) -> dict:
    """Choose, build, tune and save the index of ``emb`` (N, d) unit rows (an array, a memmap,
    :class:`rdm.index.ShardRows` or :class:`rdm.index.UnitRows`) as ``out/index.faiss`` (and,
    for an on-disk index, its lists ``out/index.faiss.ivfdata``); returns the manifest's
    ``index`` entry. The one index step of every database (built here, imported by
    rdm.official.db_import)."""
    return _build_and_save_index(out, emb, memory_budget, progress)


#: the seed of the index's training sample and of the recall queries (recorded in the manifest)
INDEX_SEED = 0


def _build_and_save_index(out: Path, emb, memory_budget: float, progress: bool) -> dict:
    n, d = emb.shape
    spec = faiss_index.choose_index(n, d, memory_budget)
    where = "inverted lists on disk" if spec.on_disk else "in memory"
    if progress:
        _note(f"indexing {n} vectors: {spec.factory(d)} (inner product, {where})")
    # built in a temporary directory inside out/, then moved into place: a killed build leaves
    # no half-written index where the manifest will point (the manifest is written last)
    with tempfile.TemporaryDirectory(dir=out, prefix=".index-") as tmp:
        built = Path(tmp) / INDEX
        data = faiss_index.data_path_of(built)
        chunk = faiss_index.chunk_rows(d, memory_budget)
        index = faiss_index.build_index(emb, spec, seed=INDEX_SEED, data_path=data, chunk=chunk)
        ks = tuple(sorted({min(k, n - 1) for k in RECALL_KS} - {0}))
        if spec.type == "flat" or not ks:
            recall, measured_on = (
                {k: 1.0 for k in RECALL_KS},
                "exact index (IndexFlatIP): recall 1 by construction",
            )
        else:
            spec, recall = faiss_index.tune_index(
                index, spec, emb, ks, n_queries=RECALL_QUERIES, seed=INDEX_SEED, chunk=chunk
            )
            measured_on = (
                f"{min(RECALL_QUERIES, n)} database rows as queries (seed {INDEX_SEED}), each "
                "query's own row left out, against exact search"
            )
        faiss_index.save_index(index, built)
        del index  # closes the on-disk lists' memory map before the file moves
        files = {}
        if spec.on_disk:
            files = {"data_file": data.name, "data_sha256": sha256_file(data)}
            os.replace(data, out / data.name)
        os.replace(built, out / INDEX)
    trained = spec.type in ("ivfpq", "ivf")
    return {
        "type": spec.type,
        "params": spec.params,
        "factory": spec.factory(d),
        "file": INDEX,
        "sha256": sha256_file(out / INDEX),
        **files,
        "on_disk": spec.on_disk,
        # what the coarse quantizer (and PQ) were trained on: rdm.index.training_rows
        "training": {
            "rows": faiss_index.training_size(n, spec.params["nlist"]) if trained else 0,
            "seed": INDEX_SEED,
            "sample": "uniform without replacement" if trained else "none (no training)",
        },
        "recall_at_k": float(recall[min(recall)]),
        "k": int(min(recall)),
        "recall_by_k": {str(k): float(r) for k, r in recall.items()},
        "measured_on": measured_on,
        "bytes_per_vector": spec.bytes_per_vector(d),
        "memory_budget": float(memory_budget),
    }


# ---- files --------------------------------------------------------------------------------------


#: rows per row group of metadata.parquet: a database of fewer rows is one group, as
#: pq.write_table writes it; at scale a group's content_hash column is ~2 MB, what
#: rdm.database.ContentHashes reads to confirm a match
METADATA_ROW_GROUP = 65_536


def _write_metadata(path: Path, records, labels, ids: IdsDigest) -> None:
    """Write metadata.parquet from the shard ``records`` (iterated once), a row group at a
    time; ``labels(ids)`` gives the split column; every id passes through ``ids``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.int64()),
            ("key", pa.string()),
            ("caption", pa.string()),
            # sha256 of the decoded pixels (rdm.embedding.content_hash): exact duplicates
            ("content_hash", pa.string()),
            ("split", pa.string()),
        ]
    )

    def write(tmp: Path) -> None:
        pending, size = [], 0
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for record in records:
                rows = record["rows"]
                shard_ids = np.array([r["id"] for r in rows], np.int64)
                table = pa.table(
                    {
                        "row": pa.array(np.arange(ids.count, ids.count + len(rows)), pa.int64()),
                        "id": pa.array(shard_ids, pa.int64()),
                        "key": pa.array([r["key"] for r in rows], pa.string()),
                        "caption": pa.array([r["caption"] for r in rows], pa.string()),
                        "content_hash": pa.array(
                            [r.get("content_hash", "") for r in rows], pa.string()
                        ),
                        "split": pa.array(labels(shard_ids), pa.string()),
                    },
                    schema=schema,
                )
                ids.update(shard_ids)
                pending.append(table)
                size += len(rows)
                while size >= METADATA_ROW_GROUP:
                    group = pa.concat_tables(pending)
                    writer.write_table(group.slice(0, METADATA_ROW_GROUP).combine_chunks())
                    pending, size = [group.slice(METADATA_ROW_GROUP)], size - METADATA_ROW_GROUP
            if size or ids.count == 0:  # the rest (an empty table keeps the file readable)
                group = pa.concat_tables(pending) if pending else schema.empty_table()
                writer.write_table(group.combine_chunks())

    atomic_write(path, write)


def _write_skipped(path: Path, records) -> int:
    """Write skipped.jsonl from the shard ``records`` (iterated once); returns the count."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                for item in record["skipped"]:
                    f.write(_json_line(item))
                    count += 1

    atomic_write(path, write)
    return count


def _json_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


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
