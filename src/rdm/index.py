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
  embeddings are stored as float16 to begin with; under tighter budgets 8-bit (``SQ8``), then none.

Approximate indexes get their search knobs (``efSearch``; ``nprobe`` and ``k_factor``) tuned after
the build until sampled queries reach :data:`TARGET_RECALL` against exact search
(:func:`tune_index`).
"""

from __future__ import annotations

import math
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
#: rows handed to FAISS per call while adding / scanning, to bound float32 copies (~128 MB at d=512)
CHUNK = 65_536


class FaissIndexError(RdmError):
    """An index file that cannot be read, or a request the index cannot answer."""


@dataclass
class IndexSpec:
    """What to build: ``type`` in {"flat", "hnsw", "ivfpq"}, ``params`` JSON-serialisable."""

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
        raise FaissIndexError(f"unknown index type {self.type!r}; expected flat, hnsw or ivfpq")

    def bytes_per_vector(self, d: int) -> float:
        """Approximate memory per database vector once built."""
        if self.type == "flat":
            return 4 * d
        if self.type == "hnsw":
            # float32 vector + level-0 links (2M int32) + ~1/M upper-level links
            return 4 * d + 2 * self.params["M"] * 4 * (1 + 1 / self.params["M"])
        refine_bytes = {"fp16": 2 * d, "sq8": d, "none": 0}[self.params["refine"]]
        return self.params["m"] + 8 + refine_bytes  # PQ code + int64 id in the inverted list


# ---- choose -------------------------------------------------------------------------------------


def choose_index(n: int, d: int, memory_budget_bytes: float) -> IndexSpec:
    """The most accurate index for ``n`` vectors of dimension ``d`` that fits the budget."""
    if n < 1:
        raise FaissIndexError("cannot index an empty database (n = 0)")
    if n <= EXACT_MAX_N and 4 * d * n <= memory_budget_bytes:
        return IndexSpec("flat", {})
    hnsw = IndexSpec("hnsw", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": 64})
    if n * hnsw.bytes_per_vector(d) <= memory_budget_bytes:
        return hnsw
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants ≥ 39 training points per cell
    centroid_bytes = 4 * d * nlist
    for refine in ("fp16", "sq8", "none"):
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
    need = n * spec.bytes_per_vector(d) + centroid_bytes
    raise FaissIndexError(
        f"a memory budget of {memory_budget_bytes / 1e9:.3g} GB cannot hold an index of {n} "
        f"vectors of dimension {d}; the smallest (IVF-PQ without re-ranking) needs about "
        f"{need / 1e9:.3g} GB: raise --memory-budget"
    )


def pq_subquantizers(d: int) -> int:
    """Bytes per PQ code: d/8 (8 dims per 8-bit sub-quantizer), a divisor of d."""
    m = max(1, d // 8)
    while d % m:
        m -= 1
    return m


# ---- build / save / load ------------------------------------------------------------------------


def build_index(xb: np.ndarray, spec: IndexSpec, *, seed: int = 0):
    """Build the index of ``spec`` over ``xb`` (N, d) unit-norm rows (float16/float32, may be a
    memmap or a :class:`UnitRows` view); rows are added in chunks so only one float32 chunk is
    materialised at a time."""
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
        index.train(_training_sample(xb, ivf.nlist, seed))
    for start in range(0, n, CHUNK):
        index.add(_f32(xb[start : start + CHUNK]))
    set_search_params(index, spec)
    return index


def set_search_params(index, spec: IndexSpec) -> None:
    """Apply the search-time knobs stored in ``spec.params`` (they are not kept by index files)."""
    import faiss

    if spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(spec.params["efSearch"])
    elif spec.type == "ivfpq":
        _ivf_of(index).nprobe = int(spec.params["nprobe"])
        if spec.params["refine"] != "none":
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
    """Read an index written by :func:`save_index`; apply ``spec``'s search knobs if given."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FaissIndexError(f"index file {path} is missing")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise FaissIndexError(
            f"index file {path} cannot be read ({str(exc).splitlines()[0]}); it is damaged or "
            "truncated: rebuild the database"
        ) from None
    if spec is not None:
        set_search_params(index, spec)
    return index


# ---- search -------------------------------------------------------------------------------------


def search(index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: ``xq`` (B, d) -> ``D`` (B, k) float32, ``I`` (B, k) int64."""
    xq = _f32(np.atleast_2d(xq))
    if xq.shape[1] != index.d:
        raise FaissIndexError(f"queries have dimension {xq.shape[1]} but the index has {index.d}")
    if k < 1:
        raise FaissIndexError(f"k must be at least 1, got {k}")
    D, I = index.search(xq, k)
    return D, I.astype(np.int64, copy=False)


def exact_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by brute force, the reference for recall: faiss.contrib's
    ``knn_ground_truth`` (a flat inner-product scan per chunk of ``xb``, merged in a result heap),
    so only one float32 chunk of a float16 memmap is materialised at a time. Same ``(D, I)``
    convention as :func:`search`, sorted by score then row."""
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    xq = _f32(np.atleast_2d(xq))
    k = min(k, xb.shape[0])
    chunks = (_f32(xb[start : start + CHUNK]) for start in range(0, xb.shape[0], CHUNK))
    D, I = knn_ground_truth(xq, chunks, k, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
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
    xb: np.ndarray, k: int, n_queries: int = 1000, seed: int = 0, xq: np.ndarray | None = None
) -> GroundTruth:
    """Exact top-k for recall queries: ``xq[:n_queries]`` when given (held out), else
    ``n_queries`` rows sampled from ``xb``, whose own row is then left out of the answers (it is
    trivially found and would inflate recall)."""
    n = xb.shape[0]
    if xq is not None:
        queries = _f32(xq[:n_queries])
        return GroundTruth(queries, None, exact_search(xb, queries, min(k, n))[0])
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    queries = _f32(xb[rows])
    width = min(k, n - 1)
    D, I = exact_search(xb, queries, width + 1)
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
) -> tuple[IndexSpec, dict[int, float]]:
    """Raise the search knobs of an approximate index until recall@k reaches ``target`` for every
    k in ``ks``, on ``n_queries`` database rows sampled with ``seed``.

    HNSW doubles efSearch (16 … 1024). IVF-PQ starts at nprobe 1 and k_factor 2 and, greedily,
    doubles whichever of the two raises recall more (small k needs deeper re-ranking, recall
    across cells needs more probes), until the target is met, neither helps, or both are at their
    limits (nlist, 64). Returns the tuned spec (applied to ``index``) and its recall per k."""
    if spec.type == "flat":
        return spec, {k: 1.0 for k in ks}
    truth = ground_truth(xb, max(ks), n_queries, seed)

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


# ---- vectors that are not unit norm --------------------------------------------------------------


class UnitRows:
    """Several (n_i, d) arrays (float16 memmaps) read as one (N, d) ``xb`` of unit rows.

    Cosine search over stored vectors that are not unit norm (an imported database keeps the
    vectors its model was trained with): every function here takes it as ``xb``, and each read
    (a slice or an array of rows) returns float32 rows divided by their norms, so the index is
    built and checked over the normalised vectors while only the rows read are materialised."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # (P + 1,)
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            rows = np.arange(start, stop, step)
        else:
            rows = np.asarray(key, dtype=np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1  # (n,)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for p in np.unique(part):
            pick = part == p
            out[pick] = self.parts[p][rows[pick] - self.starts[p]]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# ---- helpers ------------------------------------------------------------------------------------


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _ivf_of(index):
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    return faiss.downcast_index(faiss.extract_index_ivf(inner))


def _training_sample(xb: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Rows to train the coarse quantizer and PQ on: 40 per cell (FAISS wants ≥ 39), at least
    10k, sampled without replacement."""
    n = xb.shape[0]
    size = min(n, max(40 * nlist, 10_000))
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return _f32(xb[rows])
