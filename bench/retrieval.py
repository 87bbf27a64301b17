"""Retrieval benchmark, everything measured side by side in one run.

(a) Exact top-20 for a 30k-vs-30k Fashion-MNIST split (queries = ``train``, database = ``db``):
    FAISS ``IndexFlatIP`` against numpy brute force (matmul + argpartition) — time, speed ratio,
    agreement. Embeddings come from the default encoder (``load_encoder("default")``) when it is
    installed, else from a fixed random projection of the pixels (documented in the output).
(b) n (default 1M) × 512 synthetic *clustered* unit vectors (a Gaussian mixture): the index that
    ``rdm db build`` would choose under each memory budget (default 2GB, and tighter ones that
    force lighter re-ranking) against exact search — build and tuning time, recall@4 on held-out
    queries, queries/s, bytes per vector.

    python bench/retrieval.py [--n 1000000] [--budgets 2GB,600MB] [--seed 0] [--skip-fmnist]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from rdm import index as fi
from rdm.cli.db import parse_size
from rdm.database import RECALL_KS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic database size")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--centres", type=int, default=1000, help="mixture components")
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to a centre")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--budgets", default="2GB,600MB", help="memory budgets, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fmnist", action="store_true")
    args = parser.parse_args()
    print(machine())
    if not args.skip_fmnist:
        bench_fashion_mnist(args.seed)
    bench_synthetic(args)


def machine() -> str:
    model = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import faiss

    return (
        f"machine: {model}, {os.cpu_count()} cores; faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} threads), numpy {np.__version__}"
    )


# ---- (a) Fashion-MNIST, exact ---------------------------------------------------------------------


def bench_fashion_mnist(seed: int, k: int = 20) -> None:
    from rdm.data import open_source

    source = open_source("fashion-mnist")
    db_ids, q_ids = source.split_ids("db"), source.split_ids("train")
    (xb, xq), how = fashion_embeddings(source, [db_ids, q_ids], seed)
    print(
        f"\n(a) Fashion-MNIST exact top-{k}: {len(xq)} train queries vs {len(xb)} db items, d={xb.shape[1]}"
    )
    print(f"    embeddings: {how}")

    t = time.perf_counter()
    index = fi.build_index(xb, fi.IndexSpec("flat"))
    D_f, I_f = fi.search(index, xq, k)
    t_faiss = time.perf_counter() - t
    t = time.perf_counter()
    D_n, I_n = numpy_knn(xb, xq, k)
    t_numpy = time.perf_counter() - t

    same_lists = np.mean(np.all(I_f == I_n, axis=1))
    same_sets = np.mean([set(a) == set(b) for a, b in zip(I_f, I_n, strict=True)])
    # an id set may differ only where scores tie at the k-th place
    tie_ok = np.mean(
        [
            tie_tolerant_equal(df, i_f, dn, i_n)
            for df, i_f, dn, i_n in zip(D_f, I_f, D_n, I_n, strict=True)
        ]
    )
    print(
        f"    FAISS IndexFlatIP (build + search): {t_faiss:7.2f} s  ({len(xq) / t_faiss:8.0f} queries/s)"
    )
    print(
        f"    numpy matmul + argpartition:        {t_numpy:7.2f} s  ({len(xq) / t_numpy:8.0f} queries/s)"
    )
    print(f"    speed ratio numpy / FAISS: {t_numpy / t_faiss:.2f}x")
    print(
        f"    agreement: identical ranked lists {same_lists:.4f}, identical sets {same_sets:.4f}, "
        f"equal up to ties {tie_ok:.4f}, max |score difference| {np.abs(D_f - D_n).max():.2e}"
    )


def fashion_embeddings(source, id_sets, seed: int) -> tuple[list[np.ndarray], str]:
    """(n, d) float32 unit rows per id set: the default encoder if installed, else a fixed random
    projection of the pixels; and a sentence saying which."""
    from rdm.encoders import EncoderSpecError, load_encoder

    try:
        encoder = load_encoder("default")
    except EncoderSpecError as exc:
        w = np.random.default_rng(seed).standard_normal((28 * 28, 512)).astype(np.float32)
        how = (
            f"fixed random projection (pixels/255 - 0.5) @ W, W ~ N(0, 1) of shape 784x512 "
            f"(seed {seed}), L2-normalised; load_encoder('default') failed: {str(exc).split(':')[0]}"
        )
        return [
            _unit((source.pixels(ids).reshape(len(ids), -1) / 255 - 0.5) @ w) for ids in id_sets
        ], how
    how = f"default encoder {encoder.identity['arch']} d={encoder.dim}"
    # grey (n, 28, 28) -> RGB (n, 28, 28, 3) uint8
    return [
        encoder.encode_images(np.repeat(source.pixels(ids)[..., None], 3, -1)) for ids in id_sets
    ], how


def _unit(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def numpy_knn(xb: np.ndarray, xq: np.ndarray, k: int, batch: int = 2048):
    """Brute force in numpy, in query batches (bounds the (batch, N) score matrix): matmul +
    argpartition, sorted by score then row. (fi.exact_search is FAISS's knn_ground_truth.)"""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    D, I = [], []
    for i in range(0, len(xq), batch):
        scores = xq[i : i + batch] @ xb.T  # (batch, N)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        d = np.take_along_axis(scores, top, 1)
        order = np.lexsort((top, -d), axis=1)
        D.append(np.take_along_axis(d, order, 1))
        I.append(np.take_along_axis(top, order, 1))
    return np.concatenate(D), np.concatenate(I)


def tie_tolerant_equal(D_a, I_a, D_b, I_b, atol: float = 1e-5) -> bool:
    above = D_b > D_b[-1] + atol
    return np.allclose(D_a, D_b, atol=atol) and set(I_a[above]) == set(I_b[above])


# ---- (b) synthetic 1M, automatic index vs exact ---------------------------------------------------


def clustered(n: int, d: int, centres: np.ndarray, noise: float, rng) -> np.ndarray:
    """``n`` unit vectors: a random centre plus Gaussian noise of norm ≈ ``noise``, normalised;
    built in chunks as float16 (how databases store embeddings)."""
    out = np.empty((n, d), np.float16)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, d), np.float32) * (
            noise / np.sqrt(d)
        )
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_synthetic(args) -> None:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.d), np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t = time.perf_counter()
    xb = clustered(args.n, args.d, centres, args.noise, rng)  # (n, d) float16
    xq = clustered(args.queries, args.d, centres, args.noise, rng).astype(np.float32)  # held out
    print(
        f"\n(b) synthetic: {args.n} x {args.d} unit vectors, mixture of {args.centres} centres, "
        f"noise {args.noise} (seed {args.seed}; generated in {time.perf_counter() - t:.0f} s); "
        f"{len(xq)} held-out queries"
    )
    t = time.perf_counter()
    truth = fi.ground_truth(xb, 20, xq=xq)  # exact top-20; top-4 is its first 4 columns
    print(f"    ground truth (exact top-20, FAISS flat scan): {time.perf_counter() - t:.1f} s")
    header = f"    {'index':38} {'build s':>8} {'tune s':>7} {'recall@4':>9} {'recall@20':>10} {'queries/s':>10} {'bytes/vec':>10}"
    print(header)
    rows = [("exact (IndexFlatIP)", fi.IndexSpec("flat"), None)]
    for budget in args.budgets.split(","):
        rows.append(
            (f"auto, budget {budget}", fi.choose_index(args.n, args.d, parse_size(budget)), budget)
        )
    qps_exact = None
    for name, spec, _ in rows:
        t = time.perf_counter()
        index = fi.build_index(xb, spec, seed=args.seed)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        # tuned exactly as `rdm db build` does: sampled database rows, recall@4 and @20 targets
        spec, _ = fi.tune_index(index, spec, xb, RECALL_KS, seed=args.seed)
        t_tune = time.perf_counter() - t
        r4 = fi.recall_at_k(index, xb, 4, truth)
        r20 = fi.recall_at_k(index, xb, 20, truth)
        qps = queries_per_second(index, xq, 4)
        qps_exact = qps_exact or qps
        label = f"{name}: {spec.factory(args.d)}"
        print(
            f"    {label:38} {t_build:8.1f} {t_tune:7.1f} {r4:9.4f} {r20:10.4f} {qps:10.0f} "
            f"{file_bytes(index) / args.n:10.0f}"
        )
        if spec.type != "flat":
            knobs = {
                k: v for k, v in spec.params.items() if k in ("nprobe", "k_factor", "efSearch")
            }
            print(f"      tuned search params {knobs}; {qps / qps_exact:.1f}x the exact queries/s")
        del index


def queries_per_second(index, xq: np.ndarray, k: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fi.search(index, xq, k)
        best = min(best, time.perf_counter() - t)
    return len(xq) / best


def file_bytes(index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        fi.save_index(index, path)
        return path.stat().st_size


if __name__ == "__main__":
    main()
