"""Databases from precomputed embeddings: the CompVis RDM release's ``.npz`` parts and its
``nn_memory`` pickles, or any ``.npy`` + parquet embeddings (the clip-retrieval layout).

The release's database is ``{N}x{d}-part_{n}.npz`` files (``np.savez_compressed`` of
``embedding`` (N, d) float16 CLIP image embeddings, ``img_id`` (N,) int64, ``patch_coords``
(N, 4) int64 ``[x_tl, y_tl, x_br, y_br]``, sometimes more per-row keys). Its loader concatenates
the parts in unsorted ``glob`` order (and, with fewer processes than parts, keeps only the
first file's rows); here the parts are sorted by part number (or kept as given, ``order=
"given"``), the order is recorded in the manifest, and part numbers must run 1..n, so that the
row ids of ``nn_memory`` and of the release's model inputs refer to the rows they meant.

What is kept exactly:

- Vectors: the release feeds ``data_pool["embedding"][nns]`` to the UNet as stored, *not*
  re-normalised (CLIP ViT-B/32 image features have norm ≈ 10), so the shards hold the parts'
  float16 values bit for bit and ``Database.vectors`` returns them. Cosine search, as the
  release's ScaNN searcher, runs over the normalised vectors: the FAISS index is built over
  :class:`rdm.index.UnitRows` (each row divided by its norm as it is read) and queries are
  normalised as always, so the index answers cosine nearest neighbours while the stored
  vectors stay what the model was trained with. The manifest says ``unit_norm: false``.
- Per-row keys other than ``embedding`` become metadata columns (``img_id``, ``patch_coords``),
  beside rdm's own (``row``, ``id`` = row, ``key`` = ``PART:ROW``, ...).

Memory: one part at a time. Each part's embedding array is streamed out of its zip member into
a float16 ``.npy`` shard in :data:`READ_ROWS`-row steps, so the import holds one step of one
part (plus that part's small per-row keys), and the index reads the memory-mapped shards.

The import is resumable per part (``_build/``, like ``rdm db build``) and writes the manifest
last. Without an encoder the database records :func:`rdm.encoders.release_identity` (OpenAI CLIP
ViT-B/32, QuickGELU, the release's preprocessing, the parts' d), so it pairs with an imported
release model for unconditional sampling with no CLIP weights at hand.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rdm.database import (
    BUILD,
    FORMAT,
    MANIFEST,
    METADATA,
    NORM_TOLERANCE,
    SKIPPED,
    Database,
    DatabaseError,
    checksum_of,
    content_identity,
    fingerprint_of,
    ids_sha256,
    read_json,
    verify,
)
from rdm.db_build import DEFAULT_MEMORY_BUDGET, build_and_save_index, publish_shard
from rdm.encoders import Encoder, describe_identity, identity_fingerprint, release_identity
from rdm.io import atomic_write, require_writable, sha256_file, write_json, write_text

STATE_FORMAT = "rdm-db-import/1"
RELEASE, EMBEDDINGS_KIND = "compvis-rdm", "embeddings"
#: how the stored vectors are made (part of the content identity)
IMPORTED_VECTORS = "float16 as imported, not renormalised (cosine search normalises them)"
#: rows copied per step while streaming a part into its shard: 16 MB of float16 at d = 512
#: (48 MB with the float32 copy its norms are checked on)
READ_ROWS = 16_384
#: rdm's own metadata columns; a part's per-row key of the same name is kept as source_NAME
BASE_COLUMNS = ("row", "id", "key", "caption", "content_hash", "split")
ORDERS = ("number", "given")
NEIGHBORS_FILE = "neighbors-train.safetensors"  # the pipeline's default p(x̃) file


class DbImportError(DatabaseError):
    """Parts, embeddings or an ``nn_memory`` file that cannot be imported; names the file."""


@dataclass
class Part:
    """One input file, read as far as its headers."""

    path: Path
    number: int | None  # the last integer of its name (part_3 -> 3, img_emb_0 -> 0)
    rows: int
    dim: int
    dtype: str  # of its embeddings, e.g. "<f2"
    columns: tuple[str, ...]  # its other per-row keys (npz) or metadata columns (parquet)
    metadata: Path | None = None  # .npy: the parquet that describes its rows

    def as_dict(self) -> dict:
        return {
            "file": self.path.name,
            "path": str(self.path),
            "bytes": self.path.stat().st_size,
            "number": self.number,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "columns": list(self.columns),
            "metadata": str(self.metadata) if self.metadata else None,
        }


# ---- plan ---------------------------------------------------------------------------------------


def plan_parts(
    inputs: list[str | Path],
    order: str = "number",
    metadata: list[str | Path] | None = None,
) -> tuple[str, list[Part]]:
    """(kind, parts in database order) of ``inputs``: ``.npz`` release parts, or ``.npy``
    embeddings (with their parquet metadata), or directories holding either. Only headers are
    read; every part must have the same d (and, for the release, the d its name says)."""
    if order not in ORDERS:
        raise DbImportError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    files = _expand(inputs)
    kinds = {RELEASE if f.suffix == ".npz" else EMBEDDINGS_KIND for f in files}
    if len(kinds) > 1:
        raise DbImportError(
            "give either the release's .npz parts or .npy embeddings, not both: "
            + ", ".join(str(f) for f in files)
        )
    kind = kinds.pop()
    if metadata is not None and len(metadata) != len(files):
        raise DbImportError(
            f"--metadata lists {len(metadata)} files for {len(files)} embeddings files; give one "
            "parquet per .npy, in the same order"
        )
    if kind == RELEASE:
        parts = [_read_npz_header(f) for f in files]
    else:
        meta = [Path(m) for m in metadata] if metadata else [None] * len(files)
        parts = [_read_npy_header(f, m) for f, m in zip(files, meta, strict=True)]
    if order == "number":
        parts = _sorted_by_number(parts, require_contiguous=kind == RELEASE)
    _check_same_layout(parts)
    return kind, parts


def _expand(inputs: list[str | Path]) -> list[Path]:
    """Files in the order given; a directory stands for its ``.npz`` / ``.npy`` files (or, in
    the clip-retrieval layout, those of its ``img_emb/``)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item / "img_emb" if (item / "img_emb").is_dir() else item
            found = sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".npy"))
            if not found:
                raise DbImportError(f"{item} holds no .npz or .npy embeddings files")
            files += found
        elif not item.is_file():
            raise DbImportError(f"{item} does not exist")
        elif item.suffix not in (".npz", ".npy"):
            raise DbImportError(
                f"{item} is neither a release part (.npz) nor an embeddings file (.npy)"
            )
        else:
            files.append(item)
    resolved = [f.resolve() for f in files]
    duplicates = {str(f) for f in resolved if resolved.count(f) > 1}
    if duplicates:
        raise DbImportError(f"{', '.join(sorted(duplicates))} given more than once")
    return resolved


def _number(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.stem)  # the last one: 1999998x512-part_10 -> 10
    return int(numbers[-1]) if numbers else None


def _sorted_by_number(parts: list[Part], require_contiguous: bool) -> list[Part]:
    """Parts by the number in their names (part_2 before part_10); for the release, numbers
    must run 1..n: a missing part would shift every later row under nn_memory's ids."""
    if len(parts) == 1 and parts[0].number is None:  # one file: nothing to sort
        return parts
    unnumbered = [p.path for p in parts if p.number is None]
    if unnumbered:
        raise DbImportError(
            f"{unnumbered[0]} has no part number in its name, so the parts cannot be sorted; "
            "rename it, or keep the order given with --order given"
        )
    parts = sorted(parts, key=lambda p: p.number)
    numbers = [p.number for p in parts]
    if len(set(numbers)) != len(numbers):
        same = [str(p.path) for p in parts if numbers.count(p.number) > 1]
        raise DbImportError(f"{' and '.join(same)} have the same part number")
    expected = list(range(1, len(parts) + 1))
    if require_contiguous and numbers != expected:
        missing = sorted(set(expected) - set(numbers)) or [n for n in numbers if n > len(parts)]
        raise DbImportError(
            f"the release's parts are numbered 1..n, but part {missing[0]} is missing from "
            f"{', '.join(p.path.name for p in parts)} (every later row would shift); give all "
            "parts, or --order given to import exactly these in the order given"
        )
    return parts


def _check_same_layout(parts: list[Part]) -> None:
    first = parts[0]
    for p in parts[1:]:
        if p.dim != first.dim:
            raise DbImportError(
                f"{p.path} holds vectors of d={p.dim} but {first.path} of d={first.dim}: parts "
                "of one database must have the same dimension"
            )
        if p.columns != first.columns:
            raise DbImportError(
                f"{p.path} has per-row keys {list(p.columns)} but {first.path} has "
                f"{list(first.columns)}: parts of one database must hold the same keys"
            )


_NAME = re.compile(r"^(\d+)x(\d+)-part_\d+$")


def _read_npz_header(path: Path) -> Part:
    """A release part's layout from its zip members' ``.npy`` headers (nothing decompressed
    beyond them)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n.removesuffix(".npy") for n in z.namelist()]
            if "embedding" not in names:
                raise DbImportError(
                    f"{path} has no 'embedding' array (keys: {', '.join(names) or 'none'}); the "
                    "release's parts hold embedding, img_id and patch_coords"
                )
            headers = {}
            for name in names:
                with z.open(f"{name}.npy") as f:
                    headers[name] = _npy_header(f, path, name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise _damaged(path, exc) from None
    shape, dtype = headers.pop("embedding")
    if len(shape) != 2:
        raise DbImportError(f"{path}: 'embedding' has shape {shape}, expected (rows, d)")
    n, d = shape
    for name, (other, _) in headers.items():
        if not other or other[0] != n:
            raise DbImportError(
                f"{path}: '{name}' has shape {other} but 'embedding' has {n} rows; the part is "
                "inconsistent"
            )
    named = _NAME.match(path.stem)
    if named and int(named.group(2)) != d:
        raise DbImportError(
            f"{path} is named for d={named.group(2)} but holds vectors of d={d}; the file is "
            "not what its name says"
        )
    if named and int(named.group(1)) != n:
        _note(f"note: {path.name} is named for {named.group(1)} rows but holds {n}")
    return Part(path, _number(path), int(n), int(d), dtype.str, tuple(sorted(headers)))


def _npy_header(f, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
        if version not in readers:
            raise DbImportError(f"{path}: '{name}' is a .npy of unsupported version {version}")
        shape, fortran, dtype = readers[version](f)
    except ValueError as exc:
        raise DbImportError(f"{path}: '{name}' is not a .npy array ({exc})") from None
    if fortran and len(shape) > 1:
        raise DbImportError(f"{path}: '{name}' is stored in Fortran order, which is not supported")
    return tuple(int(s) for s in shape), dtype


def _read_npy_header(path: Path, metadata: Path | None) -> Part:
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise _damaged(path, exc) from None
    if emb.ndim != 2 or emb.dtype.kind != "f":
        raise DbImportError(f"{path} holds {emb.dtype} {emb.shape}, expected float (rows, d)")
    metadata = metadata or _metadata_beside(path)
    columns: tuple[str, ...] = ()
    if metadata is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            info = pq.read_metadata(metadata)
        except (OSError, pa.ArrowException) as exc:
            raise DbImportError(f"metadata {metadata} cannot be read ({exc})") from None
        if info.num_rows != emb.shape[0]:
            raise DbImportError(
                f"metadata {metadata} has {info.num_rows} rows but {path} has {emb.shape[0]} "
                "vectors; they do not describe each other"
            )
        columns = tuple(info.schema.to_arrow_schema().names)
    return Part(path, _number(path), *map(int, emb.shape), emb.dtype.str, columns, metadata)


def _metadata_beside(path: Path) -> Path | None:
    """``X.parquet`` beside ``X.npy``, or clip-retrieval's ``metadata/metadata_N.parquet`` for
    ``img_emb/img_emb_N.npy``."""
    beside = path.with_suffix(".parquet")
    if beside.is_file():
        return beside
    number = _number(path)
    layout = path.parent.parent / "metadata" / f"metadata_{number}.parquet"
    return layout if number is not None and layout.is_file() else None


# ---- import -------------------------------------------------------------------------------------


def import_database(
    inputs: list[str | Path],
    out: str | Path,
    *,
    encoder: Encoder | dict | None = None,
    order: str = "number",
    metadata: list[str | Path] | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    nn_memory: str | Path | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Import ``inputs`` (release ``.npz`` parts or ``.npy`` embeddings) into the database
    directory ``out``; with ``nn_memory``, also the release's p(x̃) beside it
    (:func:`import_nn_memory`). Returns ``out``.

    ``encoder`` (an :class:`Encoder` or an identity) is the one that made the vectors; without
    it the release's (:func:`rdm.encoders.release_identity`). ``argv`` is the command recorded
    for remaking the database (``rdm db import ...`` without ``--out``)."""
    out = Path(out)
    kind, parts = plan_parts(inputs, order, metadata)
    identity = _encoder_identity(encoder, kind, parts[0])
    plan = {
        "format": STATE_FORMAT,
        "kind": kind,
        "order": order,
        "parts": [p.as_dict() for p in parts],
        "encoder": identity,
    }
    if not _already_imported(out, plan):
        _start_or_resume(out, plan)
        offsets = np.cumsum([0] + [p.rows for p in parts])
        with _progress_bar(int(offsets[-1]), progress) as bar:
            for i, part in enumerate(parts):
                if _record_path(out, i).is_file():
                    bar.update(part.rows)
                    continue
                _import_part(out, i, part, kind, int(offsets[i]), bar)
        argv = argv or _default_argv(parts, order, encoder)
        _finish(out, plan, parts, argv, memory_budget, progress)
    if nn_memory is not None:
        import_nn_memory(nn_memory, out)
    return out


def _encoder_identity(encoder: Encoder | dict | None, kind: str, part: Part) -> dict:
    if encoder is None:
        if kind != RELEASE:
            raise DbImportError(
                f"{part.path}: .npy embeddings do not say which encoder made them; pass "
                "--encoder SPEC (e.g. 'ViT-B-32-quickgelu:/models/vit-b-32.safetensors')"
            )
        return release_identity(part.dim)
    identity = dict(encoder.identity if isinstance(encoder, Encoder) else encoder)
    if int(identity["dim"]) != part.dim:
        raise DbImportError(
            f"{part.path} holds vectors of d={part.dim} but the encoder "
            f"{describe_identity(identity)} makes d={identity['dim']}"
        )
    return identity


def _default_argv(parts: list[Part], order: str, encoder) -> list[str]:
    argv = ["rdm", "db", "import", *(str(p.path) for p in parts)]
    if order != "number":
        argv += ["--order", order]
    if encoder is not None:
        spec = (encoder.identity if isinstance(encoder, Encoder) else encoder).get("spec")
        argv += ["--encoder", str(spec)]
    return argv


def _already_imported(out: Path, plan: dict) -> bool:
    """True when ``out`` holds this import complete and sound; refuse a different or damaged one."""
    if not (out / MANIFEST).is_file():
        return False
    manifest = read_json(out / MANIFEST, "database manifest")
    done = manifest.get("import", {})
    same = (
        done.get("kind") == plan["kind"]
        and done.get("order") == plan["order"]
        and [_part_key(p) for p in done.get("parts", [])] == [_part_key(p) for p in plan["parts"]]
        and identity_fingerprint(manifest.get("encoder", {}))
        == identity_fingerprint(plan["encoder"])
    )
    if not same:
        raise DbImportError(
            f"{out} already holds a database made from other inputs or options; it is never "
            f"overwritten: choose another --out, or delete {out}"
        )
    problems = verify(out)
    if problems:
        raise DbImportError(
            f"{out} holds this import, but damaged ({problems[0]}; see 'rdm db verify {out}'); "
            f"delete {out} and import again"
        )
    _note(f"{out} already holds this import ({manifest['count']} rows): nothing to do")
    return True


def _part_key(p: dict) -> tuple:
    return (p["file"], p["bytes"], p["rows"], p["dim"])


def _start_or_resume(out: Path, plan: dict) -> None:
    state_path = out / BUILD / "state.json"
    if state_path.is_file():
        state = read_json(state_path, "import state")
        if state != json.loads(json.dumps(plan)):
            raise DbImportError(
                f"{out} holds a partial import of other inputs or options; rerun the original "
                f"command to finish it, or delete {out / BUILD} to start over"
            )
        require_writable(out / BUILD, is_dir=True, what="database build directory")
        _note(f"resuming the partial import in {out}")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DbImportError(f"{out} exists and is not an empty directory: choose a new --out")
    require_writable(out, is_dir=True, what="database directory")
    (out / BUILD).mkdir(exist_ok=True)
    write_json(state_path, plan)


# ---- one part -----------------------------------------------------------------------------------


def _import_part(out: Path, i: int, part: Part, kind: str, offset: int, bar) -> None:
    """Stream part ``i``'s vectors into ``_build/part-i.npy``, its rows' metadata into
    ``_build/part-i.parquet``, then write the record ``part-i.json`` that marks it done."""
    import hashlib

    digest = hashlib.sha256()  # of the float16 values: the data's identity, any .npy header
    worst = [0.0]  # largest |norm - 1| seen (is the part unit norm?)

    def write(tmp: Path) -> None:
        from numpy.lib import format as npy

        header = {"descr": "<f2", "fortran_order": False, "shape": (part.rows, part.dim)}
        start = 0
        with open(tmp, "wb") as f:  # plain sequential writes: no part-sized mapping or buffer
            npy.write_array_header_1_0(f, header)
            for block in _blocks(part, kind):  # (b, d) in file order
                block = np.ascontiguousarray(block, dtype="<f2")  # float32 input: rounded here
                if not np.isfinite(block).all():
                    raise DbImportError(f"{part.path} holds NaN or inf vectors near row {start}")
                f.write(block.data)
                digest.update(block.data)
                norms = np.linalg.norm(block.astype(np.float32), axis=1)
                worst[0] = max(worst[0], float(np.abs(norms - 1).max(initial=0)))
                start += len(block)
                bar.update(len(block))
        if start != part.rows:
            raise DbImportError(f"{part.path} holds {start} rows, its header says {part.rows}")

    npy = atomic_write(_shard_path(out, i), write)
    if np.dtype(part.dtype) != np.float16:
        _note(f"note: {part.path} holds {part.dtype} vectors, stored as float16 (rounded)")
    _write_part_metadata(out, i, part, kind, offset)
    record = {
        "part": i,
        "rows": part.rows,
        "sha256": sha256_file(npy),
        "data_sha256": digest.hexdigest(),
        "max_norm_error": worst[0],
    }
    write_json(_record_path(out, i), record)


def _blocks(part: Part, kind: str):
    """The part's embedding rows in :data:`READ_ROWS` blocks, never the whole array."""
    if kind != RELEASE:
        emb = np.load(part.path, mmap_mode="r", allow_pickle=False)
        for start in range(0, part.rows, READ_ROWS):
            yield emb[start : start + READ_ROWS]
        return
    dtype = np.dtype(part.dtype)
    try:
        with zipfile.ZipFile(part.path) as z, z.open("embedding.npy") as f:
            _npy_header(f, part.path, "embedding")
            for start in range(0, part.rows, READ_ROWS):
                n = min(READ_ROWS, part.rows - start)
                buf = f.read(n * part.dim * dtype.itemsize)
                if len(buf) != n * part.dim * dtype.itemsize:
                    raise DbImportError(
                        f"{part.path}: 'embedding' ends after {start} of {part.rows} rows; the "
                        "file is truncated: download it again"
                    )
                yield np.frombuffer(buf, dtype).reshape(n, part.dim)
            if f.read(1):  # also makes zipfile check the member's CRC
                raise DbImportError(
                    f"{part.path}: 'embedding' holds more data than its header says"
                )
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise _damaged(part.path, exc) from None


def _write_part_metadata(out: Path, i: int, part: Part, kind: str, offset: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = pa.array(np.arange(offset, offset + part.rows, dtype=np.int64))
    extra = _extra_columns(part, kind)
    # key: the source's own (clip-retrieval's key / image_path / url), else PART:ROW-IN-PART
    named = [extra[c] for c in ("key", "image_path", "url") if c in extra]
    in_part = pc.cast(pa.array(np.arange(part.rows, dtype=np.int64)), pa.string())
    key = named[0] if named else pc.binary_join_element_wise(part.path.stem, in_part, ":")
    extra.pop("key", None)  # kept as rdm's key
    columns = {
        "row": rows,
        "id": rows,  # ids are rows: the release's nn_memory ids index rows
        "key": key.cast(pa.string()),
        "caption": extra.pop("caption").cast(pa.string())
        if "caption" in extra
        else _empty(part.rows),
        "content_hash": _empty(part.rows),  # no pixels at hand: exact duplicates unknown
        "split": pa.repeat("db", part.rows),
    }
    for name, column in extra.items():
        columns[f"source_{name}" if name in BASE_COLUMNS else name] = column
    table = pa.table(columns)
    atomic_write(_part_metadata_path(out, i), lambda tmp: pq.write_table(table, str(tmp)))


def _extra_columns(part: Part, kind: str) -> dict:
    """The part's per-row keys (npz) or metadata columns (parquet) as arrow arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind != RELEASE:
        if part.metadata is None:
            return {}
        table = pq.read_table(part.metadata)
        return {name: table.column(name).combine_chunks() for name in table.column_names}
    columns = {}
    try:
        with np.load(part.path, allow_pickle=False) as npz:
            for name in part.columns:
                values = npz[name]  # (N,) or (N, m): small beside the embeddings
                if values.ndim == 1:
                    columns[name] = pa.array(values)
                else:
                    flat = pa.array(values.reshape(len(values), -1).ravel())
                    columns[name] = pa.FixedSizeListArray.from_arrays(flat, values[0].size)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise _damaged(part.path, exc) from None
    return columns


def _empty(n: int):
    import pyarrow as pa

    return pa.repeat("", n)  # pa.array([""] * n) without the Python list


def _shard_path(out: Path, i: int) -> Path:
    return out / BUILD / f"part-{i:05d}.npy"


def _part_metadata_path(out: Path, i: int) -> Path:
    return out / BUILD / f"part-{i:05d}.parquet"


def _record_path(out: Path, i: int) -> Path:
    return out / BUILD / f"part-{i:05d}.json"


# ---- finish -------------------------------------------------------------------------------------


def _finish(
    out: Path, plan: dict, parts: list[Part], argv: list[str], memory_budget: float, progress
) -> None:
    """All parts done: shards into place, metadata, index over the normalised vectors, manifest."""
    from rdm.index import UnitRows

    records = [read_json(_record_path(out, i), "import record") for i in range(len(parts))]
    shards = _move_shards(out, records)
    _concat_metadata(out, len(parts))
    write_text(out / SKIPPED, "")
    n, d = sum(p.rows for p in parts), parts[0].dim
    unit_norm = max(r["max_norm_error"] for r in records) <= NORM_TOLERANCE
    xb = UnitRows([np.load(out / s["file"], mmap_mode="r") for s in shards])  # (N, d) views
    index_info = build_and_save_index(out, xb, memory_budget, progress)
    digest = checksum_of([{"sha256": r["data_sha256"]} for r in records])
    ids = np.arange(n, dtype=np.int64)
    source = {
        "spec": f"import:{plan['kind']}:{digest}",  # names the data: the parts' values in order
        "split": "db",
        "db_fraction": 1.0,
        "ids_count": n,
        "ids_sha256": ids_sha256(ids),
        "rule": f"imported from {len(parts)} part(s) in {plan['order']} order; ids are rows",
    }
    identity = content_identity(source, ids, plan["encoder"], vectors=IMPORTED_VECTORS)
    parts_info = [
        {**p, "data_sha256": r["data_sha256"]} for p, r in zip(plan["parts"], records, strict=True)
    ]
    manifest = {
        "format": FORMAT,
        "encoder": plan["encoder"],
        "dim": d,
        "count": n,
        "source": source,
        "import": {
            "kind": plan["kind"],
            "order": plan["order"],
            "parts": parts_info,
            "argv": argv,
            "vectors": IMPORTED_VECTORS,
        },
        "unit_norm": unit_norm,
        "shards": shards,
        "metadata": {"file": METADATA, "sha256": sha256_file(out / METADATA)},
        "index": index_info,
        "skipped": 0,
        "identity": identity,
        "fingerprint": fingerprint_of(identity),
        "checksum": checksum_of(shards),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rdm_version": _rdm_version(),
    }
    write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / BUILD)
    norms = "unit norm" if unit_norm else "kept as stored, not unit norm"
    _note(
        f"imported {out}: {n} rows of d={d} from {len(parts)} part(s) ({plan['order']} order: "
        f"{', '.join(p.path.name for p in parts)}), vectors {norms}; encoder "
        f"{describe_identity(plan['encoder'])}; index {index_info['type']} "
        f"recall@{index_info['k']} = {index_info['recall_at_k']:.3f}; fingerprint "
        f"{manifest['fingerprint']}"
    )


def _move_shards(out: Path, records: list[dict]) -> list[dict]:
    return [
        publish_shard(
            out,
            r["part"],
            _shard_path(out, r["part"]),
            r["sha256"],
            r["rows"],
            f"the shard of part {r['part']} in {out} is missing or damaged; delete "
            f"{_record_path(out, r['part'])} and rerun the import to redo that part",
            DbImportError,
        )
        for r in records
    ]


def _concat_metadata(out: Path, n_parts: int) -> None:
    """The parts' metadata tables, one after another, into ``metadata.parquet`` (streamed)."""
    import pyarrow.parquet as pq

    def write(tmp: Path) -> None:
        writer = None
        try:
            for i in range(n_parts):
                table = pq.read_table(_part_metadata_path(out, i))
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                elif not table.schema.equals(writer.schema):
                    raise DbImportError(
                        f"the metadata of part {i} has columns {table.schema.names} of other "
                        f"types than part 0 ({writer.schema.names}); make them agree"
                    )
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()

    atomic_write(out / METADATA, write)


# ---- nn_memory ----------------------------------------------------------------------------------


def import_nn_memory(path: str | Path, db: str | Path | Database) -> Path:
    """The release's ``nn_memory`` pickle as rdm's p(x̃), written as ``DB/neighbors-train.
    safetensors`` (the file ``rdm sample --unconditional`` reads by default). Returns its path.

    The pickle (``{"nn_memory": int64 ids by count, "id_count": {id: count}}``) is read by the
    allowlisting unpickler (:func:`rdm.official.unpickle.load_pickle`); a file naming any other
    global is refused, and nothing it names is imported or run. The release draws pseudo-queries
    from the first ``top_m`` fraction of ``nn_memory``, uniformly or ∝ ``id_count``
    (``get_qids``); rdm draws from ``pq_prob`` = count / total (:mod:`rdm.pseudo_query`), ranked
    by count with ties by row. The release's own ranking is stored as ``pq_ranked_rows``, and
    whether the two agree is recorded and reported."""
    from rdm.neighbors import FORMAT as NEIGHBORS_FORMAT
    from rdm.neighbors import save_neighbors
    from rdm.official.unpickle import load_pickle
    from rdm.pseudo_query import candidates

    path = Path(path)
    db = db if isinstance(db, Database) else Database.open(db)
    if "import" not in db.manifest:
        raise DbImportError(
            f"nn_memory {path}: its ids are rows of the release's database, but {db.root} was "
            "built by rdm; import the release's parts first ('rdm db import PARTS --out DIR "
            f"--nn-memory {path}')"
        )
    obj, stubbed = load_pickle(path, "nn_memory")
    if stubbed:
        raise DbImportError(
            f"nn_memory {path} names globals outside the allowlist ({', '.join(stubbed)}); none "
            "was imported or run. The release's nn_memory holds only numpy arrays and ints, so "
            "this file is something else: use the release's file"
        )
    ids, counts, ranked = _nn_memory_arrays(obj, path)
    for name, values in (("id_count", ids), ("nn_memory", ranked)):
        if len(values) and (values.min() < 0 or values.max() >= db.count):
            bad = values[(values < 0) | (values >= db.count)]
            raise DbImportError(
                f"nn_memory {path}: {name} holds id {bad[0]} ({len(bad)} ids outside 0.."
                f"{db.count - 1}), but database {db.root} has {db.count} rows; the file belongs "
                "to another database (oi_*.p: OpenImages, in_*.p: ImageNet), or parts are missing"
            )
    pq_counts = np.zeros(db.count, np.int64)  # (N_db,)
    pq_counts[ids] = counts
    total = int(pq_counts.sum())
    if total == 0:
        raise DbImportError(f"nn_memory {path}: every count in id_count is 0")
    pq_prob = pq_counts / total  # (N_db,) sums to 1, = count / (k_p · |X|) of the release
    ours = candidates(pq_prob, top_m=1.0)[0]  # rdm's ranking: by count, ties by row
    agrees = np.array_equal(ours, ranked)
    meta = {
        "format": NEIGHBORS_FORMAT,
        "db_fingerprint": db.fingerprint,
        "db": str(db.root),
        "encoder": db.identity,
        "queries": {"spec": "import:nn_memory", "split": "train", "count": 0, "skipped": []},
        "k": 0,  # no per-query neighbours: this file holds p(x̃) only
        "k_p": 0,
        "exclusion": {"enabled": False, "reason": "imported from the release's nn_memory"},
        "imported": {
            "file": str(path.resolve()),
            "sha256": sha256_file(path),
            "ids": int(len(ids)),
            "hits": total,
            "nn_memory": int(len(ranked)),
            "ranking_agrees": bool(agrees),
        },
    }
    tensors = {
        "query_ids": np.zeros(0, np.int64),
        "nn_rows": np.zeros((0, 0), np.int64),
        "nn_ids": np.zeros((0, 0), np.int64),
        "nn_scores": np.zeros((0, 0), np.float32),
        "pq_counts": pq_counts,
        "pq_prob": pq_prob,
        "pq_ranked_rows": ranked,  # the release's order of nn_memory (ids are rows)
    }
    target = db.root / NEIGHBORS_FILE
    save_neighbors(target, tensors, meta)
    ranking = (
        "its ranking agrees with rdm's (count, then row)"
        if agrees
        else f"its ranking differs from rdm's (count, then row) at "
        f"{int(np.sum(ours[: len(ranked)] != ranked[: len(ours)]))} positions: top-m sets may "
        "differ among rows of equal count"
    )
    _note(
        f"wrote {target}: p(x̃) over {len(ids)} of {db.count} rows from {total} neighbour hits "
        f"in {path.name}; {ranking}"
    )
    return target


def _nn_memory_arrays(obj, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, counts, ranked ids) of an unpickled nn_memory, checked to be integers."""
    if not isinstance(obj, dict) or "id_count" not in obj or not isinstance(obj["id_count"], dict):
        raise DbImportError(
            f"nn_memory {path} is not the release's nn_memory (a dict with 'nn_memory' and an "
            f"'id_count' dict; got {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else "")
            + ")"
        )
    try:
        ids = np.array([_integer(k) for k in obj["id_count"]], dtype=np.int64)
        counts = np.array([_integer(v) for v in obj["id_count"].values()], dtype=np.int64)
        ranked = np.array([_integer(v) for v in np.ravel(obj.get("nn_memory", []))], np.int64)
    except (TypeError, ValueError) as exc:
        raise DbImportError(
            f"nn_memory {path} holds ids or counts that are not integers ({exc})"
        ) from None
    if len(counts) and counts.min() < 0:
        raise DbImportError(f"nn_memory {path}: id_count holds a negative count")
    if "nn_memory" not in obj:
        ranked = ids[np.lexsort((ids, -counts))]
    elif set(ranked.tolist()) != set(ids.tolist()):
        _note(f"note: nn_memory {path} ranks other ids than id_count counts; p(x̃) follows id_count")
    return ids, counts, ranked


def _integer(value) -> int:
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


# ---- helpers ------------------------------------------------------------------------------------


def _damaged(path: Path, exc: Exception) -> DbImportError:
    return DbImportError(
        f"{path} cannot be read ({type(exc).__name__}: {exc}); it is damaged or truncated: "
        "download it again"
    )


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", unit_scale=True, desc="importing", disable=not enabled)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _rdm_version() -> str:
    from rdm import __version__

    return __version__
