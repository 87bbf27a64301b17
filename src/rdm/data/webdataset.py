"""Webdataset tar shards (the img2dataset layout) as an image source, read by offset.

Specs: ``shards/{00000..00099}.tar`` (brace ranges keep their zero padding, ``{a,b}`` lists and
several groups expand as in bash), a comma list ``a.tar,b.tar``, one ``.tar`` file, or a
directory whose top level holds ``*.tar`` shards and no images or sub-folders (img2dataset's
output folder, with its ``.parquet`` and ``_stats.json`` files beside the shards). Every shard of
a range must exist: a missing one is a :class:`SourceError` naming the first and the count.
Shards are uncompressed tars (``.tar.gz`` cannot be read by offset).

Samples are the tar members grouped by key, as webdataset does: the member name up to the first
dot of its basename (``000010023.jpg``, ``000010023.txt``, ``000010023.json`` are one sample,
key ``000010023``). The image is the first present of :data:`IMAGE_EXTENSIONS`; the caption is
the first non-empty of the ``.txt`` member (stripped), the ``.json`` member's ``"caption"``, the
``caption`` column of the per-shard ``NNNNN.parquet`` beside ``NNNNN.tar`` (img2dataset's, looked
up by its ``key`` column), else ``""``. A sample's key is ``"<shard stem>/<member key>"``, so the
sha1(key) split rule (:func:`rdm.data.key_fraction`) sends it to the same split whichever other
shards are listed. Hidden members (``._x.jpg``) and names without an extension are ignored.

Ids (stable, sparse, ascending in the canonical order)::

    id = shard_number * STRIDE + position of the sample in its tar (first member of its key)

``shard_number`` is the shard's file name read as a number when every shard's stem is decimal
(img2dataset names them ``00000.tar`` ...), so an id never depends on which other shards are
listed; otherwise it is the shard's position in the sorted list of shards (ids then stay put
when shards are added after the last one). ``STRIDE`` is fixed (10^6), never derived from the
data, so adding a larger shard cannot move existing ids; a shard with more samples is refused.
An unreadable member keeps its id (it fails in :meth:`WebDatasetSource.load` with
:class:`BadImage`, naming the shard and the member, and ``rdm db build`` records it in
``skipped.jsonl``); a tar cut short loses only the samples whose headers are gone. The rule is
recorded in manifests through :meth:`WebDatasetSource.split_rule`. As for every source, ids are
not rows: a database's ``row`` numbers are dense and its ``id`` column keeps these ids.

Opening reads tar headers only (one ``os.pread`` of 512 bytes per header, skipping the data;
``tarfile`` for dialects that reader does not know) into one small numpy record per sample
(:data:`_RECORD`: key, offsets and sizes, 58 bytes for img2dataset's 9-character keys; no
TarInfo objects), cached on disk per shard (``$RDM_CACHE/webdataset`` or
``~/.cache/rdm/webdataset``, keyed by the shard's path, size, mtime and inode) and
memory-mapped (a few shards at a time: each map holds a descriptor), so reopening costs a file
open per shard. Loading an item reads its member alone with ``os.pread`` on a descriptor kept
per process (opened afresh after a fork: DataLoader and Ray workers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import sys
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from rdm.data import BadImage, Source, SourceError, check_split, key_fraction
from rdm.data.images import MAX_PIXELS, decode_image_bytes
from rdm.errors import RdmError

#: image members, in order of preference when a sample has several
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: ids left for the samples of one shard (img2dataset writes 10^4 per shard by default)
STRIDE = 1_000_000
#: open shard file descriptors kept per process (random access over thousands of shards)
MAX_OPEN_SHARDS = 32
#: shard indexes kept memory-mapped at once (each map holds a descriptor too)
MAX_MAPPED_SHARDS = 32
#: the on-disk index layout; part of the cache file's key, so a new layout never reads an old one
CACHE_FORMAT = "rdm-wds-index/1"
_CACHE_ENV = "RDM_CACHE"
_DEFAULT_CACHE = object()  # sentinel: the default cache directory

# One record per sample; offsets/sizes of -1 mean "no such member". ``image`` is 1 + the index in
# IMAGE_EXTENSIONS, 0 for a sample without an image. The key field's width is set per shard.
_RECORD = [
    ("image", "u1"),
    ("image_offset", "<i8"),
    ("image_size", "<i8"),
    ("txt_offset", "<i8"),
    ("txt_size", "<i8"),
    ("json_offset", "<i8"),
    ("json_size", "<i8"),
]
_MAX_NUMBER = (2**63 - 1) // STRIDE - 1  # largest shard number whose ids fit in int64
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def is_webdataset_spec(spec: str) -> bool:
    """True for a spec this module opens: a ``.tar`` path or list, a brace range, or a
    directory of ``.tar`` shards (see the module docstring)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _is_shard_dir(path)
    return bool(re.search(r"\.tar(,|$)", spec) or re.search(r"\{-?\d+\.\.-?\d+\}", spec))


class WebDatasetSource(Source):
    """The samples of local webdataset tar shards (module docstring: specs, ids, captions)."""

    def __init__(
        self, spec: str, max_pixels: int = MAX_PIXELS, cache_dir: object = _DEFAULT_CACHE
    ) -> None:
        self.max_pixels = max_pixels
        self.spec, shards = _resolve(spec)
        self.cache_dir = _default_cache_dir() if cache_dir is _DEFAULT_CACHE else cache_dir
        self.shards, self._numbers, self.id_rule = _number_shards(shards)
        self.stems = [p.name[: -len(".tar")] for p in self.shards]
        self._resident: dict[int, np.ndarray] = {}  # tables held in memory (no cache)
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()  # memory-mapped, a few
        counts = [len(self._keep(s, self._index(p))) for s, p in enumerate(self.shards)]
        self._counts = np.array(counts, dtype=np.int64)  # (shards,) samples per shard
        self._check_stride()
        if not self._counts.sum():
            raise SourceError(
                f"the webdataset shards of {self.spec!r} hold no samples: every tar is empty"
            )
        self._fractions: np.ndarray | None = None  # (n,) key_fraction of every key, on demand
        self._reset_handles()

    # ---- Source ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._counts.sum())

    def key(self, i: int) -> str:
        s, j = self._locate(i)
        return f"{self.stems[s]}/{self._member_key(s, j)}"

    def caption(self, i: int) -> str:
        s, j = self._locate(i)
        rec = self._table(s)[j]
        for kind in ("txt", "json"):
            size = int(rec[f"{kind}_size"])
            if size < 0:
                continue
            data = self._read(s, int(rec[f"{kind}_offset"]), size, missing_ok=True)
            text = _caption_from(kind, data) if data is not None and len(data) == size else ""
            if text:
                return text
        return self._parquet_captions(s).get(self._member_key(s, j), "")

    def load(self, i: int) -> Image.Image:
        s, j = self._locate(i)
        rec = self._table(s)[j]
        key, where = self._member_key(s, j), self.shards[s]
        if rec["image"] == 0:
            raise BadImage(
                f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) for key {key} in {where}"
            )
        member = f"{key}.{IMAGE_EXTENSIONS[int(rec['image']) - 1]}"
        size = int(rec["image_size"])
        data = self._read(s, int(rec["image_offset"]), size)
        if len(data) < size:
            raise BadImage(
                f"truncated: member {member} of {where} has {len(data)} of {size} bytes "
                "(the tar is cut short)"
            )
        try:
            return decode_image_bytes(data, self.max_pixels)
        except BadImage as exc:
            raise BadImage(f"{exc} (member {member} of {where})") from None

    def split_ids(self, split: str, db_fraction: float = 0.5) -> np.ndarray:
        """As :meth:`Source.split_ids` (sha1 of each key against ``db_fraction``), over the
        sparse ids of this source."""
        check_split(split)
        ids = self.ids()
        if split == "all":
            return ids
        if split == "test":
            return ids[:0]
        in_db = self._key_fractions() < db_fraction
        return ids[in_db] if split == "db" else ids[~in_db]

    def split_rule(self, db_fraction: float = 0.5) -> str:
        return f"{super().split_rule(db_fraction)}; ids: {self.id_rule}"

    # ---- ids ------------------------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        """Every id, ascending (int64, (n,)): shard by shard, samples in tar order."""
        parts = [
            n * STRIDE + np.arange(c) for n, c in zip(self._numbers, self._counts, strict=True)
        ]
        return np.concatenate(parts).astype(np.int64)

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard index, sample position in it) of id ``i``."""
        number, j = divmod(int(i), STRIDE)
        s = int(np.searchsorted(self._numbers, number))
        if i < 0 or s == len(self._numbers) or self._numbers[s] != number or j >= self._counts[s]:
            raise SourceError(f"{i} is not an id of {self.spec!r} ({self.id_rule})")
        return s, j

    def _check_stride(self) -> None:
        big = int(np.argmax(self._counts))
        if self._counts[big] > STRIDE:
            raise SourceError(
                f"shard {self.shards[big]} holds {self._counts[big]} samples, more than the "
                f"{STRIDE} ids a shard has room for; write smaller shards (img2dataset "
                "--number_sample_per_shard)"
            )

    def _key_fractions(self) -> np.ndarray:
        if self._fractions is None:
            self._fractions = np.array(
                [
                    key_fraction(f"{stem}/{k.decode('utf-8', 'replace')}")
                    for s, stem in enumerate(self.stems)
                    for k in self._table(s)["key"].tolist()
                ],
                dtype=np.float64,
            )
        return self._fractions

    # ---- the per-shard index ------------------------------------------------------------------

    def _table(self, s: int) -> np.ndarray:
        """The sample records of shard ``s`` (mapped again from the cache when evicted or after
        unpickling)."""
        if s in self._resident:
            return self._resident[s]
        if s in self._mapped:
            self._mapped.move_to_end(s)
            return self._mapped[s]
        table = self._index(self.shards[s])
        if len(table) != self._counts[s]:
            raise SourceError(
                f"shard {self.shards[s]} changed since {self.spec!r} was opened "
                f"({self._counts[s]} samples then, {len(table)} now): open the source again"
            )
        return self._keep(s, table)

    def _keep(self, s: int, table: np.ndarray) -> np.ndarray:
        # every memory map holds a file descriptor: keep a few (thousands of shards would pass
        # the process's open-file limit), map the others again when they are read
        if not isinstance(table, np.memmap):
            self._resident[s] = table
            return table
        self._mapped[s] = table
        while len(self._mapped) > MAX_MAPPED_SHARDS:
            self._mapped.popitem(last=False)
        return table

    def _member_key(self, s: int, j: int) -> str:
        return self._table(s)["key"][j].decode("utf-8", "replace")

    def _index(self, path: Path) -> np.ndarray:
        """The shard's records: from the cache (memory-mapped) or by reading its headers."""
        cache = self._cache_path(path)
        if cache is not None and cache.is_file():
            try:
                return _load_table(cache)
            except (OSError, ValueError):
                pass  # a damaged cache entry is rebuilt below
        table = index_shard(path)
        if cache is None:
            return table
        from rdm.io import save_npy

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_npy(cache, table)
        except (OSError, RdmError) as exc:
            _note_once(
                f"cannot cache webdataset shard indexes in {cache.parent} ({exc}): "
                "shards are re-indexed on every open; set $RDM_CACHE to a writable folder"
            )
            return table
        return _load_table(cache)

    def _cache_path(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        st = path.stat()
        stamp = json.dumps([CACHE_FORMAT, str(path), st.st_size, st.st_mtime_ns, st.st_ino])
        return (
            Path(self.cache_dir)
            / f"{path.stem}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.npy"
        )

    def _parquet_captions(self, s: int) -> dict[str, str]:
        """``key -> caption`` of the img2dataset parquet beside shard ``s`` (a few kept)."""
        if s in self._parquet:
            self._parquet.move_to_end(s)
            return self._parquet[s]
        captions = _read_parquet_captions(self.shards[s].with_suffix(".parquet"))
        self._parquet[s] = captions
        if len(self._parquet) > 4:
            self._parquet.popitem(last=False)
        return captions

    # ---- reading members (one descriptor per shard and process) -------------------------------

    def _read(self, s: int, offset: int, size: int, missing_ok: bool = False) -> bytes | None:
        try:
            return os.pread(self._fd(s), size, offset)
        except OSError as exc:
            if missing_ok:
                return None
            raise BadImage(f"unreadable: {exc.strerror or exc} ({self.shards[s]})") from None

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():
            # a forked worker (DataLoader, Ray) opens its own descriptors: closing one of them
            # then never touches the parent's, and its LRU starts empty
            self._reset_handles()
        fds = self._fds
        if s in fds:
            fds.move_to_end(s)
            return fds[s]
        fds[s] = os.open(self.shards[s], os.O_RDONLY)
        if len(fds) > MAX_OPEN_SHARDS:
            os.close(fds.popitem(last=False)[1])
        return fds[s]

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._parquet: OrderedDict[int, dict[str, str]] = OrderedDict()

    def close(self) -> None:
        """Close this process's shard descriptors (they reopen on the next read)."""
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):  # already closed elsewhere: nothing to free
                    os.close(fd)
        self._reset_handles()

    def __del__(self) -> None:
        if getattr(self, "_fds", None) is not None:
            self.close()

    def __getstate__(self) -> dict:
        # Workers get the shard list and counts, not descriptors; memory-mapped tables are
        # re-mapped from the cache there instead of being copied through the pickle.
        state = dict(self.__dict__)
        state.update(_fds=None, _parquet=None, _pid=None, _fractions=None, _mapped=OrderedDict())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()


# ---- reading a shard's headers ------------------------------------------------------------------


def index_shard(path: str | Path) -> np.ndarray:
    """One record (:data:`_RECORD` + ``key``) per sample of the tar at ``path``, in tar order,
    from its headers alone. A tar that cannot be opened is a :class:`SourceError`; one cut short
    keeps the samples whose headers were read (a cut member fails when loaded)."""
    path = Path(path)
    samples: dict[str, list[int]] = {}  # key -> [image, img off, img size, txt ..., json ...]
    try:
        members = list(_read_headers(path))
    except _NotPlainTar:
        members = _read_headers_with_tarfile(path)
    for name, offset, size in members:
        _add_member(samples, name, offset, size)
    return _records(samples)


class _NotPlainTar(Exception):
    """The first header is not one :func:`_read_headers` reads; tarfile decides."""


_ZERO_BLOCK = bytes(512)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular (old and new flag) and contiguous files


def _read_headers(path: Path):
    """``(name, data offset, size)`` of the regular files of an uncompressed ustar / GNU / pax
    tar, one ``os.pread`` of 512 bytes per header (≈20x faster than ``tarfile``, which builds a
    TarInfo and verifies every field: at 60M members that is minutes instead of hours)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"cannot open webdataset shard {path}: {exc.strerror or exc}") from None
    try:
        offset, long_name, pax = 0, None, {}
        while True:
            block = os.pread(fd, 512, offset)
            if len(block) < 512 or block == _ZERO_BLOCK:
                if offset == 0:
                    raise _NotPlainTar  # empty or tiny file: tarfile words the error
                return  # the end-of-archive marker, or a tar cut short inside a header
            if not _checksum_ok(block):
                if offset == 0:
                    raise _NotPlainTar
                return  # a damaged header: keep the members before it (as tarfile does)
            size, kind, data = _number(block[124:136]), block[156:157], offset + 512
            if kind in (b"L", b"x"):  # GNU long name / pax extended header for the next member
                payload = os.pread(fd, size, data)
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax = _pax_records(payload)
            elif kind not in (b"K", b"g"):  # long link names and global headers change nothing
                size = int(pax.get("size", size))
                name = pax.get("path") or long_name or _ustar_name(block)
                if kind in _FILE_TYPES:
                    yield name, data, size
                long_name, pax = None, {}
            offset = data + (size + 511) // 512 * 512
    finally:
        os.close(fd)


def _checksum_ok(block: bytes) -> bool:
    # the checksum field counts as eight spaces (POSIX ustar); some writers use signed bytes
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    return stored == unsigned or stored == unsigned - 256 * sum(b >= 128 for b in block)


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else value - 256 ** (len(field) - 1)
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(payload: bytes) -> dict[str, str]:
    """``"LEN key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            break
        length = int(payload[pos:space] or b"0")
        if length <= 0:
            break
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_headers_with_tarfile(path: Path) -> list[tuple[str, int, int]]:
    """The same via ``tarfile`` for what :func:`_read_headers` does not read (and its errors)."""
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(
            f"cannot open webdataset shard {path} as an uncompressed tar ({exc}); re-download "
            "or recreate it, or leave it out of the spec (compressed .tar.gz shards are not "
            "supported: decompress them)"
        ) from None
    members = []
    with tar:
        while True:
            try:
                info = tar.next()  # reads one header, seeks over the member's data
            except tarfile.TarError:
                break  # a later header is damaged: keep the samples before it
            if info is None:
                break
            if info.isfile():
                members.append((info.name, info.offset_data, info.size))
            tar.members.clear()  # tarfile keeps every TarInfo otherwise: O(members) memory
    return members


def _add_member(samples: dict[str, list[int]], name: str, offset: int, size: int) -> None:
    base = posixpath.basename(name)
    dot = base.find(".")
    if base.startswith(".") or dot <= 0:
        return  # hidden files (._x.jpg) and names without an extension are not sample parts
    key = name[: len(name) - len(base) + dot]
    ext = base[dot + 1 :].lower()
    rec = samples.setdefault(key, [0, -1, -1, -1, -1, -1, -1])
    where = (offset, size)
    if ext in IMAGE_EXTENSIONS:
        code = IMAGE_EXTENSIONS.index(ext) + 1
        if rec[0] == 0 or code < rec[0]:
            rec[0:3] = [code, *where]
    elif ext == "txt" and rec[3] < 0:
        rec[3:5] = where
    elif ext == "json" and rec[5] < 0:
        rec[5:7] = where


def _records(samples: dict[str, list[int]]) -> np.ndarray:
    keys = [k.encode("utf-8", "surrogateescape") for k in samples]
    width = max((len(k) for k in keys), default=1)
    table = np.zeros(len(keys), dtype=[("key", f"S{width}"), *_RECORD])
    if keys:
        table["key"] = keys
        values = np.array(list(samples.values()), dtype=np.int64)  # (n, 7)
        for c, (name, _) in enumerate(_RECORD):
            table[name] = values[:, c]
    return table


def _load_table(path: Path) -> np.ndarray:
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    if table.dtype.names is None or not {n for n, _ in _RECORD} <= set(table.dtype.names):
        raise ValueError(f"{path} is not a shard index")
    return table


# ---- captions -----------------------------------------------------------------------------------


def _caption_from(kind: str, data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    if kind == "txt":
        return text.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return ""  # a damaged .json falls back like a missing one
    caption = obj.get("caption") if isinstance(obj, dict) else None
    return caption.strip() if isinstance(caption, str) else ""


def _read_parquet_captions(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if not {"key", "caption"} <= set(names):
            return {}  # img2dataset without a caption column
        table = pq.read_table(path, columns=["key", "caption"])
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(
            f"caption file {path} cannot be read ({exc}); repair or delete it"
        ) from None
    keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
    return {str(k): (c or "").strip() for k, c in zip(keys, captions, strict=True) if k is not None}


# ---- specs --------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{00..03}`` (zero padding kept), ``{a,b}``, several groups."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    rng = _RANGE.fullmatch(body)
    if rng:
        a, b = rng.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [f"{n:0{width}d}" for n in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]  # literal braces
    return [head + o + t for o in options for t in expand_braces(tail)]


def _split_list(spec: str) -> list[str]:
    """Split a comma list at the commas outside braces."""
    parts, depth, start = [], 0, 0
    for n, ch in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(spec[start:n])
            start = n + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _resolve(spec: str) -> tuple[str, list[Path]]:
    """(canonical spec, the shard paths) of ``spec``; every shard must be an existing .tar."""
    given = Path(spec).expanduser()
    if given.is_dir():
        root = given.resolve()
        return str(root), sorted(p for p in root.glob("*.tar") if not p.name.startswith("."))
    patterns = [os.path.abspath(os.path.expanduser(p)) for p in _split_list(spec)]
    paths = [p for pattern in patterns for p in expand_braces(pattern)]
    not_tar = [p for p in paths if not p.endswith(".tar")]
    if not paths or not_tar:
        raise SourceError(
            f"{spec!r}: webdataset shards must be uncompressed .tar files "
            f"({not_tar[0] if not_tar else 'no path'}); e.g. 'shards/{{00000..00099}}.tar'"
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SourceError(
            f"{len(missing)} of the {len(paths)} shards of {spec!r} are missing, the first "
            f"{missing[0]}: fix the range or the folder"
        )
    return ",".join(patterns), [Path(p) for p in paths]


def _number_shards(shards: list[Path]) -> tuple[list[Path], np.ndarray, str]:
    """The shards in canonical order, their shard numbers (ascending) and the id rule."""
    stems = [p.name[: -len(".tar")] for p in shards]
    seen: dict[str, Path] = {}
    for stem, path in zip(stems, shards, strict=True):
        if stem in seen:
            raise SourceError(
                f"shards {seen[stem]} and {path} have the same name {stem}.tar: sample keys "
                "('<shard>/<key>') would collide; list each shard once, with distinct names"
            )
        seen[stem] = path
    numeric = [int(s) for s in stems if s.isdecimal()]
    if (
        len(numeric) == len(stems)
        and len(set(numeric)) == len(stems)
        and max(numeric) <= _MAX_NUMBER
    ):
        order = np.argsort(numeric, kind="stable")
        rule = f"shard number (its name, 00042.tar -> 42) x {STRIDE} + sample position in its tar"
        return [shards[o] for o in order], np.sort(np.array(numeric, np.int64)), rule
    shards = sorted(shards, key=str)
    rule = (
        f"position of the shard in the sorted shard paths x {STRIDE} + sample position in its tar"
    )
    return shards, np.arange(len(shards), dtype=np.int64), rule


def _is_shard_dir(path: Path) -> bool:
    from rdm.data.folder import IMAGE_EXTENSIONS as FOLDER_IMAGES

    try:
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    except OSError:
        return False
    has_tar = any(e.is_file() and e.name.endswith(".tar") for e in entries)
    blocked = any(e.is_dir() or e.name.lower().endswith(FOLDER_IMAGES) for e in entries)
    return has_tar and not blocked


def _default_cache_dir() -> Path:
    root = os.environ.get(_CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "rdm") / "webdataset"


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        print(f"note: {message}", file=sys.stderr)
