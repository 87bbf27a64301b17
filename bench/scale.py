"""Index a synthetic database under a memory budget and measure it: peak memory, build time,
recall@4 against exact search, bytes per vector, query rates; then the arithmetic for the paper's
20.9M x 512 OpenImages database and 1.28M ImageNet queries at those rates.

The data is a clustered mixture (not uniform random unit vectors, on which no index has
structure to exploit and IVF recall says little about real embeddings): 4096 random unit centres
(seeded), each row a centre plus isotropic Gaussian noise of norm ≈ 1.4 (``--noise`` 0.06 per
dimension at d=512), renormalised; cosine to its own centre ≈ 0.6, like CLIP images of one
concept. Queries are held out: fresh draws from the same mixture.

The index step is the build's own (``rdm.db_build.build_and_save_index`` over a
``rdm.index.ShardRows`` view of memory-mapped float16 shards), so what is measured is what
``rdm db build --memory-budget`` does after encoding.

Memory: a thread samples /proc/self/status every 0.1 s: ``RssAnon`` (memory the process owns:
heap, numpy and faiss buffers), ``RssFile`` (file pages mapped into it: shards, on-disk lists,
libraries) and ``VmRSS`` (their sum, with ``RssShmem``); ``VmHWM`` (the kernel's own peak of
``VmRSS``, = ``ru_maxrss``) is reset before each phase (``/proc/self/clear_refs``) and read after
it. The budget bounds the index step's growth of the *whole* resident set, file pages included:
peak ``VmHWM`` minus the resident set before the step (interpreter and libraries, reported as the
overhead) must stay under ``--budget``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --rows 200000 --budget 100MB
    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --rows 2000000 --budget 1GB --noise 0.03

(figures and their reading: docs/scale.md)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from rdm import index as fi
from rdm.cli.db import parse_size
from rdm.db_build import build_and_save_index

PAPER_DB, PAPER_QUERIES, PAPER_K = 20_900_000, 1_280_000, 20


def status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB."""
    out = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in out:
                out[name] = int(line.split()[1])
    return out


FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM")


class Memory:
    """Peaks of RssAnon / RssFile / VmRSS (kB) sampled every 0.1 s while running, a timeline
    every ``every`` s, and the kernel's VmHWM over the phase (reset when it starts)."""

    def __init__(self, every: float = 5.0):
        self.peak = dict.fromkeys(FIELDS, 0)
        self.timeline: list[dict] = []
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = last = time.perf_counter()
        while not self._stop.is_set():
            now = status_kb(*FIELDS)
            self.peak = {k: max(self.peak[k], now[k]) for k in FIELDS}
            if time.perf_counter() - last >= self.every:
                last = time.perf_counter()
                self.timeline.append({"t": round(last - t0, 1), **{k: now[k] for k in FIELDS[:3]}})
            self._stop.wait(0.1)

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS (Linux >= 4.0)
        self.before = status_kb(*FIELDS)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak["VmHWM"] = status_kb("VmHWM")["VmHWM"]

    def figures(self) -> dict:
        """MB: the resident set before, the sampled peaks, VmHWM and its growth over before."""
        mb = {f"before_{k}": v / 1e3 for k, v in self.before.items() if k != "VmHWM"}
        mb |= {f"peak_{k}": v / 1e3 for k, v in self.peak.items()}
        mb["VmHWM_minus_before_VmRSS"] = (self.peak["VmHWM"] - self.before["VmRSS"]) / 1e3
        return mb


def mixture(n: int, d: int, centres: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """(n, d) float32 unit rows: a centre each plus Gaussian noise, renormalised."""
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, d), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shards(root: Path, n: int, d: int, shard: int, centres, noise: float, seed: int) -> list:
    """The database's float16 shards, written shard by shard (never all in RAM)."""
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, n, shard)):
        path = root / "embeddings" / f"shard-{s:05d}.npy"
        if not path.is_file():  # resumable: shards are deterministic in (seed, s)
            x = mixture(min(shard, n - start), d, centres, noise, seed + 1 + s)
            np.save(path, x.astype(np.float16))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget", type=parse_size, default="1GB")
    p.add_argument("--shard-rows", type=int, default=131_072)
    p.add_argument("--centres", type=int, default=4096)
    p.add_argument("--noise", type=float, default=0.06)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path("/tmp/rdm-scale"))
    p.add_argument("--keep", action="store_true", help="keep the shards and index")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    n, d = args.rows, args.dim
    root = args.dir / f"{n}x{d}"
    need = n * (2 * d) * 2.1  # shards + on-disk lists + block files while merging
    free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
    if free < need:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; this run needs about {need / 1e9:.1f}")

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t = time.perf_counter()
    paths = write_shards(root, n, d, args.shard_rows, centres, args.noise, args.seed)
    print(f"shards: {len(paths)} x {args.shard_rows} rows, {time.perf_counter() - t:.0f} s")
    xq = mixture(args.queries, d, centres, args.noise, args.seed + 10_000)  # held out

    for f in ("index.faiss", "index.faiss.ivfdata"):
        (root / f).unlink(missing_ok=True)
    xb = fi.ShardRows([np.load(path, mmap_mode="r") for path in paths])
    with Memory() as build_mem:
        t = time.perf_counter()
        info = build_and_save_index(root, xb, args.budget, progress=True)
        build_s = time.perf_counter() - t

    # search: held-out queries against exact search by blocks of the memory-mapped shards
    with Memory() as search_mem:
        index = fi.load_index(root / "index.faiss", fi.IndexSpec(info["type"], info["params"]))
        t = time.perf_counter()
        truth = fi.ground_truth(xb, 20, xq=xq, chunk=fi.chunk_rows(d, args.budget))
        exact_s = time.perf_counter() - t
        t = time.perf_counter()
        recall4 = fi.recall_at_k(index, xb, 4, truth)
        search_s = time.perf_counter() - t  # includes gathering rows to score the answers
        t = time.perf_counter()
        fi.search(index, xq, PAPER_K + 8)
        query_s = (time.perf_counter() - t) / len(xq)
    disk = sum(path.stat().st_size for path in paths)
    index_disk = sum((root / f).stat().st_size for f in ("index.faiss", "index.faiss.ivfdata")
                     if (root / f).is_file())  # fmt: skip

    figures = {
        "rows": n,
        "dim": d,
        "budget_bytes": args.budget,
        "index": {k: info[k] for k in ("type", "factory", "params", "on_disk", "training")},
        "recall_by_k_tuning": info["recall_by_k"],
        "recall_at_4_held_out": recall4,
        "build_s": build_s,
        "build_memory_mb": build_mem.figures(),
        "build_within_budget": build_mem.figures()["VmHWM_minus_before_VmRSS"] * 1e6 <= args.budget,
        "search_memory_mb": search_mem.figures(),
        "build_timeline_kb": build_mem.timeline,
        "shards_bytes_per_vector": disk / n,
        "index_disk_bytes_per_vector": index_disk / n,
        "index_ram_bytes": fi.IndexSpec(info["type"], info["params"]).memory_bytes(n, d),
        "query_s_single_thread": query_s,
        "exact_vector_queries_per_s": n * len(xq) / exact_s,
        "recall_eval_s": search_s,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    arithmetic(figures)
    if not args.keep:
        shutil.rmtree(root)


def arithmetic(f: dict) -> None:
    """The paper's sizes at the measured rates."""
    n, d, big = f["rows"], f["dim"], PAPER_DB
    params = f["index"]["params"]
    per_cell_here = n / params["nlist"]
    nlist_big = fi.choose_index(big, d, f["budget_bytes"]).params["nlist"]
    per_cell_big = big / nlist_big
    # IVF search cost is the vectors scanned: nprobe cells of ~N/nlist rows
    query_big = f["query_s_single_thread"] * per_cell_big / per_cell_here
    exact_big = PAPER_QUERIES * big / f["exact_vector_queries_per_s"]
    lines = [
        f"20.9M x {d}: shards {big * 2 * d / 1e9:.1f} GB float16; on-disk lists "
        f"{big * (2 * d + 8) / 1e9:.1f} GB; RAM for the index {4 * d * nlist_big / 1e6:.0f} MB "
        f"of centroids (nlist {nlist_big} under {f['budget_bytes'] / 1e9:g} GB)",
        f"1.28M queries x top-{PAPER_K} at nprobe {params['nprobe']}: "
        f"{query_big * PAPER_QUERIES / 3600:.1f} core-hours at the measured "
        f"{1e3 * f['query_s_single_thread']:.2f} ms/query ({per_cell_here:.0f} rows/cell here, "
        f"{per_cell_big:.0f} there)",
        f"exact by blocks instead: {exact_big / 3600:.0f} core-hours at the measured "
        f"{f['exact_vector_queries_per_s'] / 1e9:.2f} G vector-queries/s per core; GPU rates "
        "were not measured (no GPU was lent)",
        f"neighbours file: {PAPER_QUERIES * PAPER_K * 20 / 1e6:.0f} MB (rows, ids, scores)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
