"""FAISS only here: choose, build, save, load and search an inner-product index -> ``(D, I)``.

Numpy in, numpy out, with FAISS's names: ``xb`` (N, d) database vectors, ``xq`` (B, d) queries,
``k`` neighbours, ``D`` (B, k) float32 scores (inner product = cosine for unit vectors), ``I``
(B, k) int64 row numbers into ``xb`` (-1 where fewer than ``k`` were found).

Which index, by size and memory budget (:func:`choose_index`):

- ``flat``: exact ``IndexFlatIP`` while N ≤ 200k and the float32 vectors fit the budget;
- ``hnsw``: ``IndexHNSWFlat`` (inner product, graph over float32 vectors) when those fit;
- ``ivfpq``: ``IndexIVFPQ`` (nlist ≈ 4·√N cells, d/8 bytes per code) wrapped in an
  ``IndexRefine`` that re-ranks ``k_factor·k`` candidates with the stored vectors. The refine
  store is float16 (``SQfp16``), which is *exact* re-ranking for our databases because their
  embeddings are stored as float16 to begin with; under a tighter budget 8-bit (``SQ8``);
- ``ivf`` on disk, when not even that fits: ``IndexIVFScalarQuantizer`` with float16 codes of
  the vectors themselves (not residuals, so a code *is* the stored float16 vector and scores
  inside the probed cells are exact), its inverted lists in ``index.ivfdata`` beside the index
  file (faiss ``OnDiskInvertedLists``, written here with ``pwrite`` in two passes over the rows:
  :func:`_fill_on_disk`) and memory-mapped when searched. RAM holds only the centroids; recall
  depends on ``nprobe`` alone.

Why one on-disk IVF rather than several smaller indexes searched together: the coarse quantizer
is searched once per query and each probed cell is one contiguous run of the file (one read),
where S shard indexes would cost S coarse searches, S reads per cell and a merge of S result
heaps. And why float16 codes rather than PQ codes on disk: PQ alone cannot reach the recall
target (it needs the re-ranking store, in RAM), while a float16 code costs the same 2·d bytes as
the database's own shards and needs no training beyond the centroids. (IVF-PQ without
re-ranking, rdm's last resort before, is therefore never chosen.)

Every index is trained on a uniform random sample of rows (:func:`training_rows`, seeded; not
the first rows, which in a database sorted by source or crawl order are a biased sample) and
filled in chunks read from ``xb``, which may be a memory map or a :class:`ShardRows` view over
the shards, so no step holds all vectors in RAM.

Resident memory is bounded too, not only what the process allocates: file pages mapped into the
process count in its resident set (``VmRSS`` / ``VmHWM``) until unmapped or released, page cache
or not. So nothing here maps a whole file and walks it: the shards are released after every read
(:class:`ShardRows`), the on-disk lists are written with ``pwrite`` rather than through faiss's
read-write mapping of the whole file (``merge_ondisk`` makes the process resident in all of it),
and searching on-disk lists releases the pages it touched after every few queries
(:func:`search`, :func:`release_lists`).

Approximate indexes get their search knobs (``efSearch``; ``nprobe`` and ``k_factor``) tuned after
the build until sampled queries reach :data:`TARGET_RECALL` against exact search
(:func:`tune_index`). Where ``faiss`` has GPU support and a GPU is present, in-memory indexes are
searched on it (:func:`to_gpu`); never required.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdm.errors import RdmError
from rdm.io import atomic_write

#: at most this many vectors are searched exactly (a 200k × 512 flat scan costs ~0.1 GFLOP/query)
EXACT_MAX_N = 200_000
#: approximate indexes are tuned until recall@k on sampled queries reaches this
TARGET_RECALL = 0.95
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: rows handed to FAISS per call while adding / scanning, to bound float32 copies (~128 MB at d=512);
#: fewer under a small memory budget (:func:`chunk_rows`)
CHUNK = 65_536
#: training rows per IVF cell (FAISS wants ≥ 39), sampled uniformly at random
TRAIN_PER_CELL = 40
#: the on-disk inverted lists, beside the index file
IVFDATA_SUFFIX = ".ivfdata"
#: bytes of on-disk lists one search call may touch before its pages are released (nprobe cells
#: of the average size per query)
ON_DISK_SEARCH_BYTES = 64 << 20


class FaissIndexError(RdmError):
    """An index file that cannot be read, or a request the index cannot answer."""


@dataclass
class IndexSpec:
    """What to build: ``type`` in {"flat", "hnsw", "ivfpq", "ivf"}, ``params`` JSON-serialisable
    (``ivf`` is the on-disk index: ``params["on_disk"]`` is True)."""

    type: str
    params: dict = field(default_factory=dict)

    def factory(self, d: int) -> str:
        """The ``faiss.index_factory`` string for this spec."""
        if self.type == "flat":
            return "Flat"
        if self.type == "hnsw":
            return f"HNSW{self.params['M']}"
        if self.type == "ivfpq":
            refine = {"fp16": ",Refine(SQfp16)", "sq8": ",Refine(SQ8)", "none": ""}
            return f"IVF{self.params['nlist']},PQ{self.params['m']}{refine[self.params['refine']]}"
        if self.type == "ivf":
            return f"IVF{self.params['nlist']},SQfp16"
        raise FaissIndexError(
            f"unknown index type {self.type!r}; expected flat, hnsw, ivfpq or ivf"
        )

    def memory_bytes(self, n: int, d: int) -> float:
        """Approximate RAM the built index of ``n`` vectors holds: for an on-disk index only its
        centroids (its lists are memory-mapped: page cache the kernel may reclaim)."""
        centroids = 4 * d * self.params.get("nlist", 0)
        return centroids + (0 if self.on_disk else n * self.bytes_per_vector(d))

    @property
    def on_disk(self) -> bool:
        """Whether the inverted lists live in a file beside the index (memory-mapped)."""
        return bool(self.params.get("on_disk", False))

    def bytes_per_vector(self, d: int) -> float:
        """Approximate bytes per database vector once built: in RAM, or on disk when
        :attr:`on_disk` (then RAM holds only the centroids)."""
        if self.type == "flat":
            return 4 * d
        if self.type == "hnsw":
            # float32 vector + level-0 links (2M int32) + ~1/M upper-level links
            return 4 * d + 2 * self.params["M"] * 4 * (1 + 1 / self.params["M"])
        if self.type == "ivf":
            return 2 * d + 8  # float16 code + int64 id in the on-disk inverted list
        refine_bytes = {"fp16": 2 * d, "sq8": d, "none": 0}[self.params["refine"]]
        return self.params["m"] + 8 + refine_bytes  # PQ code + int64 id in the inverted list


# ---- choose -------------------------------------------------------------------------------------


def choose_index(n: int, d: int, memory_budget_bytes: float) -> IndexSpec:
    """The most accurate index for ``n`` vectors of dimension ``d`` whose RAM fits the budget:
    in memory if one that re-ranks with the stored vectors fits, else on disk."""
    if n < 1:
        raise FaissIndexError("cannot index an empty database (n = 0)")
    if n <= EXACT_MAX_N and 4 * d * n <= memory_budget_bytes:
        return IndexSpec("flat", {})
    hnsw = IndexSpec("hnsw", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": 64})
    if n * hnsw.bytes_per_vector(d) <= memory_budget_bytes:
        return hnsw
    nlist = _nlist(n)
    centroid_bytes = 4 * d * nlist
    for refine in ("fp16", "sq8"):
        spec = IndexSpec(
            "ivfpq",
            {
                "nlist": nlist,
                "m": pq_subquantizers(d),
                "nprobe": 16,
                "refine": refine,
                "k_factor": 4,
            },
        )
        if n * spec.bytes_per_vector(d) + centroid_bytes <= memory_budget_bytes:
            return spec
    # On disk: RAM holds the centroids and, while training, a float32 sample of 40 rows per
    # cell; both must fit a quarter of the budget (the rest: k-means' own arrays, one chunk being
    # added (chunk_rows: an eighth), the (N,) int32 cell of every row while the lists are
    # written, the interpreter and libraries), which caps the number of cells.
    nlist = max(1, min(nlist, int(memory_budget_bytes / 4 / (4 * d * TRAIN_PER_CELL))))
    if 4 * 4 * d * training_size(n, nlist) > memory_budget_bytes:
        raise FaissIndexError(
            f"a memory budget of {memory_budget_bytes / 1e9:.3g} GB cannot hold an index of {n} "
            f"vectors of dimension {d}, not even on disk (training its cells needs about "
            f"{4 * 4 * d * training_size(n, nlist) / 1e9:.3g} GB): raise --memory-budget"
        )
    return IndexSpec("ivf", {"nlist": nlist, "nprobe": 16, "on_disk": True})


def _nlist(n: int) -> int:
    """IVF cells: ≈ 4·√n, with at least 39 training points per cell (FAISS warns below that)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def pq_subquantizers(d: int) -> int:
    """Bytes per PQ code: d/8 (8 dims per 8-bit sub-quantizer), a divisor of d."""
    m = max(1, d // 8)
    while d % m:
        m -= 1
    return m


# ---- build / save / load ------------------------------------------------------------------------


def build_index(
    xb: np.ndarray,
    spec: IndexSpec,
    *,
    seed: int = 0,
    data_path: str | Path | None = None,
    chunk: int = CHUNK,
):
    """Build the index of ``spec`` over ``xb`` (N, d) unit-norm rows (float16/float32, may be a
    memmap or a :class:`ShardRows` view): trained on :func:`training_rows` of ``seed``, then
    filled in chunks of ``chunk`` rows so only one float32 chunk is materialised at a time.

    An on-disk spec writes its inverted lists to ``data_path`` (required then; name it
    ``<index file>`` + :data:`IVFDATA_SUFFIX`: the index file refers to it by that name)."""
    import faiss

    n, d = xb.shape
    index = faiss.index_factory(d, spec.factory(d), faiss.METRIC_INNER_PRODUCT)
    if spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = spec.params["efConstruction"]
    if spec.type == "ivfpq":
        ivf = _ivf_of(index)
        ivf.do_polysemous_training = False  # Hamming filtering is unused and costs minutes
        # PQ k-means on 64 points per centroid for 10 iterations: 2.5x faster to train than
        # FAISS's defaults (256, 25) at the same recall (measured at 300k x 512, see bench/)
        ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = 10, 64
        ivf.cp.seed = ivf.pq.cp.seed = seed
    if spec.type == "ivf":
        ivf = _ivf_of(index)
        ivf.by_residual = False  # codes are the float16 vectors themselves: exact scores
        ivf.cp.seed = seed
    if spec.type in ("ivfpq", "ivf"):
        rows = training_rows(n, training_size(n, spec.params["nlist"]), seed)
        index.train(_f32_rows(xb, rows, chunk))
    if spec.on_disk:
        if data_path is None:
            raise FaissIndexError("an on-disk index needs data_path for its inverted lists")
        _fill_on_disk(index, xb, Path(data_path), chunk)
    else:
        for start in range(0, n, chunk):
            index.add(_f32(xb[start : start + chunk]))
    set_search_params(index, spec)
    return index


def chunk_rows(d: int, memory_budget: float) -> int:
    """Rows per chunk under ``memory_budget``: a chunk's float32 copy and what is made from it
    (codes, a sorted copy: about three float32 copies) take at most an eighth of the budget;
    between 1024 and :data:`CHUNK` rows."""
    return int(min(CHUNK, max(1024, memory_budget / 8 / (3 * 4 * d))))


def training_size(n: int, nlist: int) -> int:
    """Rows the coarse quantizer (and PQ) train on: 40 per cell, at least 10k, at most n."""
    return min(n, max(TRAIN_PER_CELL * nlist, 10_000))


def training_rows(n: int, size: int, seed: int) -> np.ndarray:
    """(size,) int64 rows of ``0..n-1`` drawn uniformly without replacement with ``seed``,
    ascending (so reading them from memory-mapped shards walks each shard once)."""
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _fill_on_disk(trained, xb, data_path: Path, chunk: int) -> None:
    """Fill the trained on-disk ``trained`` index with ``xb``: its lists are written to
    ``data_path`` in faiss's ``OnDiskInvertedLists`` layout, which is what
    ``faiss.contrib.ondisk.merge_ondisk`` writes: cell after cell, each its ``size`` codes then
    its ``size`` int64 ids, rows in ascending order within a cell.

    Two passes over ``xb`` in chunks: the first finds every row's cell ((N,) int32, the only
    per-row array held), which fixes where each cell starts; the second encodes each chunk and
    ``pwrite``s its rows, grouped by cell, behind those already written. Written pages go to the
    page cache and are never mapped into this process, where faiss's own merge maps the whole
    file read-write and so makes the process resident in all of it. The file is then mapped
    read-only for the tuning searches, whose pages :func:`search` releases."""
    import faiss

    n = xb.shape[0]
    ivf = _ivf_of(trained)
    nlist, code_size = ivf.nlist, ivf.code_size
    cells = np.empty(n, np.int32)  # (N,) the cell of each row
    for start in range(0, n, chunk):
        _, assign = ivf.quantizer.search(_f32(xb[start : start + chunk]), 1)  # (c, 1)
        cells[start : start + len(assign)] = assign[:, 0]
    sizes = np.bincount(cells, minlength=nlist).astype(np.uint64)  # (nlist,)
    begins = np.concatenate([[0], np.cumsum(sizes * (code_size + 8))[:-1]]).astype(np.int64)
    total = int(sizes.sum()) * (code_size + 8)
    written = np.zeros(nlist, np.int64)  # rows of each cell written so far
    fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        for start in range(0, n, chunk):
            x = _f32(xb[start : start + chunk])  # (c, d)
            codes = ivf.sq.compute_codes(x)  # (c, code_size) uint8: what faiss's add stores
            order = np.argsort(cells[start : start + len(x)], kind="stable")  # by cell, then row
            cell = cells[start : start + len(x)][order]
            codes, ids = codes[order], np.arange(start, start + len(x), dtype="<i8")[order]
            cuts = np.flatnonzero(np.diff(cell)) + 1
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(cell)], strict=True):
                c, at = int(cell[a]), int(written[cell[a]])
                os.pwrite(fd, codes[a:b], int(begins[c]) + at * code_size)
                os.pwrite(fd, ids[a:b], int(begins[c] + sizes[c] * code_size) + at * 8)
                written[c] += b - a
        os.fsync(fd)
    finally:
        os.close(fd)
    lists = faiss.OnDiskInvertedLists(nlist, code_size, str(data_path))
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))  # offsets as computed above
    lists.totsize, lists.read_only = total, True
    lists.do_mmap()  # read-only, for the tuning searches
    _no_prefetch(lists)
    # the index file names its lists file; only the base name is kept, and load_index looks for
    # it beside the index file (IO_FLAG_ONDISK_SAME_DIR), so the database directory can move
    lists.filename = data_path.name
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    trained.ntotal = ivf.ntotal = n


def set_search_params(index, spec: IndexSpec) -> None:
    """Apply the search-time knobs stored in ``spec.params`` (they are not kept by index files)."""
    import faiss

    if spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(spec.params["efSearch"])
    elif spec.type in ("ivfpq", "ivf"):
        _ivf_of(index).nprobe = int(spec.params["nprobe"])
        if spec.type == "ivfpq" and spec.params["refine"] != "none":
            faiss.downcast_index(index).k_factor = float(spec.params["k_factor"])


def save_index(index, path: str | Path) -> None:
    """Write ``index`` to ``path`` atomically (:func:`rdm.io.atomic_write`); raises
    :class:`rdm.io.OutputError` when it cannot be written."""
    import faiss

    def write(tmp: Path) -> None:
        # Python opens and writes the file, so a failure is an OSError (FAISS's own file writer
        # raises RuntimeError); the bytes are those of faiss.write_index(index, filename)
        with open(tmp, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))

    atomic_write(path, write)


def load_index(path: str | Path, spec: IndexSpec | None = None):
    """Read an index written by :func:`save_index`; apply ``spec``'s search knobs if given. An
    on-disk index's inverted lists are memory-mapped from the file beside it, not read."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FaissIndexError(f"index file {path} is missing")
    try:
        with _c_stdout_to_stderr():  # faiss printf()s where it found on-disk lists
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # lists mmapped r/o
            index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise FaissIndexError(
            f"index file {path} cannot be read ({str(exc).splitlines()[0]}); it is damaged or "
            "truncated: rebuild the database"
        ) from None
    lists = on_disk_lists(index)
    if lists is not None:
        _no_prefetch(lists)
    if spec is not None:
        set_search_params(index, spec)
    return index


def _no_prefetch(lists) -> None:
    """Turn off faiss's prefetch threads for on-disk ``lists``: they read the probed cells in
    the background, also after a search returned, so pages released by :func:`search` would be
    faulted back in behind it."""
    lists.prefetch_nthread = 0


def data_path_of(path: str | Path) -> Path:
    """The inverted-lists file of an on-disk index file ``path``."""
    path = Path(path)
    return path.with_name(path.name + IVFDATA_SUFFIX)


# ---- GPU ----------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """Whether FAISS can search on a GPU here: a faiss build with GPU support, at least one GPU,
    and ``RDM_FAISS_GPU`` not set to 0."""
    import faiss

    if os.environ.get("RDM_FAISS_GPU", "auto") == "0":
        return False
    return hasattr(faiss, "index_cpu_to_gpu") and faiss.get_num_gpus() > 0


def to_gpu(index, spec: IndexSpec):
    """``index`` copied to every GPU when :func:`gpu_available` and the kind runs there (flat and
    IVF-PQ; HNSW and on-disk lists stay on the CPU); else ``index`` itself. Scores then differ
    from the CPU's in their last float bits."""
    if spec.type not in ("flat", "ivfpq") or spec.on_disk or not gpu_available():
        return index
    import faiss

    try:
        gpu = faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:  # e.g. a refine wrapper this faiss cannot clone to GPU
        print(f"FAISS index stays on the CPU ({str(exc).splitlines()[0]})", file=sys.stderr)
        return index
    set_search_params(gpu, spec)
    return gpu


# ---- search -------------------------------------------------------------------------------------


def search(index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: ``xq`` (B, d) -> ``D`` (B, k) float32, ``I`` (B, k) int64.

    An index with on-disk lists is searched so that one call to faiss touches about
    :data:`ON_DISK_SEARCH_BYTES` of cells (:func:`_search_on_disk`), and the pages each call
    touched are released before the next (:func:`release_lists`)."""
    xq = _f32(np.atleast_2d(xq))
    if xq.shape[1] != index.d:
        raise FaissIndexError(f"queries have dimension {xq.shape[1]} but the index has {index.d}")
    if k < 1:
        raise FaissIndexError(f"k must be at least 1, got {k}")
    lists = on_disk_lists(index)
    if lists is None:
        D, I = index.search(xq, k)
        return D, I.astype(np.int64, copy=False)
    return _search_on_disk(index, lists, xq, k)


def _search_on_disk(index, lists, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search on-disk lists a block of queries and a group of their probed cells at a time,
    ``queries x cells x mean cell bytes`` ≈ :data:`ON_DISK_SEARCH_BYTES` per faiss call (at
    least one cell of one query), releasing the lists' pages after each call.

    With every probe in one group (the usual case: nprobe mean cells fit the bound) a block is
    one ``index.search``; otherwise each query's nprobe cells (found once by the coarse
    quantizer) are scanned group by group with ``search_preassigned`` and the groups' top-k
    merged: the same candidates are scored, ties among equal scores may come in another order."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    nprobe = min(int(ivf.nprobe), int(lists.nlist))
    cell = max(1.0, lists.totsize / max(int(lists.nlist), 1))  # mean bytes of one cell
    group = max(1, min(nprobe, int(ON_DISK_SEARCH_BYTES / cell)))  # cells per query per call
    step = max(1, int(ON_DISK_SEARCH_BYTES / (group * cell)))  # queries per call
    D = np.empty((len(xq), k), np.float32)
    I = np.empty((len(xq), k), np.int64)
    for start in range(0, len(xq), step):
        x = xq[start : start + step]
        if group == nprobe:
            D[start : start + len(x)], I[start : start + len(x)] = index.search(x, k)
            release_lists(lists)
            continue
        Dq, Iq = ivf.quantizer.search(x, nprobe)  # (b, nprobe) probed cells, best first
        found_D, found_I = [], []
        try:
            for g in range(0, nprobe, group):
                cells = np.ascontiguousarray(Iq[:, g : g + group])
                ivf.nprobe = cells.shape[1]  # search_preassigned scans exactly nprobe cells
                Dg, Ig = ivf.search_preassigned(
                    x, k, cells, np.ascontiguousarray(Dq[:, g : g + group])
                )
                release_lists(lists)
                found_D.append(Dg)
                found_I.append(Ig)
        finally:
            ivf.nprobe = nprobe
        Dc, Ic = np.concatenate(found_D, axis=1), np.concatenate(found_I, axis=1)  # (b, G·k)
        best = np.argsort(-Dc, axis=1, kind="stable")[:, :k]
        D[start : start + len(x)] = np.take_along_axis(Dc, best, 1)
        I[start : start + len(x)] = np.take_along_axis(Ic, best, 1)
    return D, I


def on_disk_lists(index):
    """The memory-mapped ``OnDiskInvertedLists`` of an IVF index, or None (other kinds)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index (flat, HNSW)
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def release_lists(lists) -> None:
    """Drop the pages of memory-mapped on-disk lists from this process (``MADV_DONTNEED`` on
    faiss's shared, read-only mapping of the whole file: the page cache keeps them, the next
    search faults them back in), so searching all cells never makes the process resident in all
    of the file. No-op where the lists are not mapped."""
    address = int(lists.ptr) if lists.ptr is not None else 0
    if address and lists.totsize:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.madvise(address, lists.totsize, mmap.MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) of on-disk lists failed")


def exact_search(
    xb: np.ndarray, xq: np.ndarray, k: int, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by brute force, the reference for recall: faiss.contrib's
    ``knn_ground_truth`` (a flat inner-product scan per chunk of ``xb``, merged in a result heap),
    so only one float32 chunk (``chunk`` rows) of a float16 memmap is materialised at a time
    (twice: ours and the flat index's copy). Same ``(D, I)``
    convention as :func:`search`, sorted by score then row."""
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    xq = _f32(np.atleast_2d(xq))
    k = min(k, xb.shape[0])
    chunks = (_f32(xb[start : start + chunk]) for start in range(0, xb.shape[0], chunk))
    ngpu = -1 if gpu_available() else 0
    D, I = knn_ground_truth(xq, chunks, k, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=ngpu)
    order = np.lexsort((I, -D), axis=1)  # by score descending, then row ascending
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


# ---- recall -------------------------------------------------------------------------------------


@dataclass
class GroundTruth:
    """Exact answers for recall queries, up to some k."""

    queries: np.ndarray  # (B, d) float32
    self_rows: np.ndarray | None  # (B,) rows of sampled queries, None for held-out queries
    D: np.ndarray  # (B, width) float32 exact scores, best first; width = k, or less if n is tiny


def ground_truth(
    xb: np.ndarray,
    k: int,
    n_queries: int = 1000,
    seed: int = 0,
    xq: np.ndarray | None = None,
    chunk: int = CHUNK,
) -> GroundTruth:
    """Exact top-k for recall queries: ``xq[:n_queries]`` when given (held out), else
    ``n_queries`` rows sampled from ``xb``, whose own row is then left out of the answers (it is
    trivially found and would inflate recall)."""
    n = xb.shape[0]
    if xq is not None:
        queries = _f32(xq[:n_queries])
        return GroundTruth(queries, None, exact_search(xb, queries, min(k, n), chunk)[0])
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    queries = _f32(xb[rows])
    width = min(k, n - 1)
    D, I = exact_search(xb, queries, width + 1, chunk)
    # drop the query's own row (or, if an exact duplicate outranked it, the last answer)
    D = np.stack([d[i != r][:width] for d, i, r in zip(D, I, rows, strict=True)])
    return GroundTruth(queries, rows, D)


def recall_at_k(index, xb: np.ndarray, k: int, truth: GroundTruth) -> float:
    """Fraction of exact top-k answers the index finds. Ties are tolerated: an answer counts when
    its exact score reaches the k-th exact score (minus 1e-5)."""
    k = min(k, truth.D.shape[1])
    if k < 1:
        return 1.0
    extra = 0 if truth.self_rows is None else 1
    _, I = search(index, truth.queries, min(k + extra, xb.shape[0]))
    hits = 0
    for q, rows in enumerate(I):
        rows = rows[rows >= 0]
        if truth.self_rows is not None:
            rows = rows[rows != truth.self_rows[q]]
        rows = np.unique(rows[:k])
        if len(rows):
            scores = _f32(xb[rows]) @ truth.queries[q]
            hits += int(np.sum(scores >= truth.D[q, k - 1] - 1e-5))
    return hits / (k * len(truth.queries))


def measure_recall(
    index,
    xb: np.ndarray,
    k: int,
    n_queries: int = 1000,
    seed: int = 0,
    xq: np.ndarray | None = None,
) -> float:
    """recall@k of ``index`` against exact search over ``xb`` (see :func:`ground_truth`)."""
    return recall_at_k(index, xb, k, ground_truth(xb, k, n_queries, seed, xq))


def tune_index(
    index,
    spec: IndexSpec,
    xb: np.ndarray,
    ks: tuple[int, ...] = (4, 20),
    target: float = TARGET_RECALL,
    n_queries: int = 1000,
    seed: int = 0,
    chunk: int = CHUNK,
) -> tuple[IndexSpec, dict[int, float]]:
    """Raise the search knobs of an approximate index until recall@k reaches ``target`` for every
    k in ``ks``, on ``n_queries`` database rows sampled with ``seed``.

    HNSW doubles efSearch (16 … 1024). IVF-PQ starts at nprobe 1 and k_factor 2 and, greedily,
    doubles whichever of the two raises recall more (small k needs deeper re-ranking, recall
    across cells needs more probes), until the target is met, neither helps, or both are at their
    limits (nlist, 64). Returns the tuned spec (applied to ``index``) and its recall per k."""
    if spec.type == "flat":
        return spec, {k: 1.0 for k in ks}
    truth = ground_truth(xb, max(ks), n_queries, seed, chunk=chunk)

    def recalls(params: dict) -> dict[int, float]:
        set_search_params(index, IndexSpec(spec.type, params))
        return {k: recall_at_k(index, xb, k, truth) for k in ks}

    limits = (
        {"efSearch": (16, 1024)} if spec.type == "hnsw" else {"nprobe": (1, spec.params["nlist"])}
    )
    if spec.type == "ivfpq" and spec.params["refine"] != "none":
        limits["k_factor"] = (2, 64)
    params = {**spec.params, **{knob: low for knob, (low, _) in limits.items()}}
    current = recalls(params)
    while min(current.values()) < target:
        trials = [
            {**params, knob: min(2 * params[knob], high)}
            for knob, (_, high) in limits.items()
            if params[knob] < high
        ]
        if not trials:
            break
        scored = [(recalls(p), p) for p in trials]
        best, best_params = max(scored, key=lambda t: min(t[0].values()))
        if min(best.values()) < min(current.values()) + 1e-3 and spec.type == "ivfpq":
            break  # neither knob helps any more: PQ codes or the budget are the limit
        current, params = best, best_params
    tuned = IndexSpec(spec.type, params)
    set_search_params(index, tuned)
    return tuned, current


# ---- rows of several shards ---------------------------------------------------------------------


class ShardRows:
    """Several (n_i, d) arrays (the database's float16 shards, memory-mapped) read as one (N, d)
    ``xb``, without concatenating them: every function here takes it as ``xb``.

    Reading a slice or an array of rows copies only those rows out, in the shards' dtype (the
    stored bytes, unchanged), and then hands the pages it touched back to the kernel (they stay in
    the page cache), so a pass over all rows never makes the process resident in all of them.
    ``np.asarray(view)`` materialises everything: for small databases and tests only."""

    #: rows gathered from a shard per step, bounding the pages touched between releases
    GATHER = 16_384

    def __init__(self, parts, lengths: list[int] | None = None, dim: int | None = None, dtype=None):
        """``parts``: a sequence of (n_i, d) arrays. A sequence that opens (and checks) a shard
        only when it is first indexed stays lazy when ``lengths``, ``dim`` and ``dtype`` (of the
        stored rows) are given too: then only the shards a read touches are opened."""
        if not len(parts):
            raise FaissIndexError("ShardRows needs at least one shard")
        self.parts = parts
        lengths = [len(p) for p in parts] if lengths is None else lengths
        self.starts = np.cumsum([0] + list(lengths))  # (P + 1,)
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1] if dim is None else dim))
        stored = np.dtype(parts[0].dtype if dtype is None else dtype)
        self.dtype = self._read(np.zeros((0, self.shape[1]), stored)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            rows = np.arange(start, stop, step)
        else:
            rows = np.asarray(key, dtype=np.int64)
            if rows.ndim != 1:  # any shape of rows -> (*shape, d), as numpy indexing gives
                return self[rows.ravel()].reshape(*rows.shape, self.shape[1])
            rows = np.where(rows < 0, rows + self.shape[0], rows)
            if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
                raise IndexError(f"rows must lie in 0..{self.shape[0] - 1}")
        part = np.searchsorted(self.starts, rows, side="right") - 1  # (n,)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for p in np.unique(part):
            where = np.flatnonzero(part == p)
            for i in range(0, len(where), self.GATHER):
                pick = where[i : i + self.GATHER]
                out[pick] = self._read(self.parts[p][rows[pick] - self.starts[p]])
                _release(self.parts[p])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        """All rows as ``dtype``, as ``np.ndarray.astype`` (small databases only)."""
        return self[:].astype(dtype)

    def tobytes(self) -> bytes:
        """All rows' bytes, as ``np.ndarray.tobytes`` (small databases only)."""
        return self[:].tobytes()

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Rows as they are returned (here: as stored)."""
        return np.asarray(rows)


class MappedShards:
    """(n_i, d) ``.npy`` files as a sequence of read-only memory maps, at most ``keep`` of them
    mapped at a time (the least recently read is closed first): each map holds a file
    descriptor, and a database of thousands of shards would pass the open-file limit."""

    def __init__(self, paths, keep: int = 16):
        self.paths = [Path(p) for p in paths]
        self.keep = keep
        self._open: dict[int, np.ndarray] = {}  # insertion order = least recently read first

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, s: int) -> np.ndarray:
        s = int(s)
        if s in self._open:
            self._open[s] = self._open.pop(s)  # most recently read now
        else:
            while len(self._open) >= self.keep:
                self._open.pop(next(iter(self._open)))  # unmapped once no view is left
            self._open[s] = np.load(self.paths[s], mmap_mode="r", allow_pickle=False)
        return self._open[s]


class UnitRows(ShardRows):
    """:class:`ShardRows` whose reads are float32 rows divided by their norms.

    Cosine search over stored vectors that are not unit norm (an imported database keeps the
    vectors its model was trained with): the index is built and checked over the normalised
    vectors while only the rows read are materialised."""

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.asarray(rows, dtype=np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _release(part: np.ndarray) -> None:
    """Drop a memory map's pages from this process (MADV_DONTNEED on a read-only file mapping:
    the page cache keeps them, the next read faults them back in); no-op for arrays in RAM."""
    m = getattr(part, "_mmap", None)  # np.memmap's mapping, shared by its views
    if m is not None and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)


# ---- helpers ------------------------------------------------------------------------------------


@contextmanager
def _c_stdout_to_stderr():
    """Send what C code prints to stdout (file descriptor 1) to stderr meanwhile: stdout belongs
    to the CLI's results."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _f32_rows(xb, rows: np.ndarray, chunk: int) -> np.ndarray:
    """``xb[rows]`` as one float32 array, gathered ``chunk`` rows at a time (no float16 copy of
    all of them beside the float32 one)."""
    out = np.empty((len(rows), xb.shape[1]), np.float32)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = xb[rows[start : start + chunk]]
    return out


def _ivf_of(index):
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    return faiss.downcast_index(faiss.extract_index_ivf(inner))
