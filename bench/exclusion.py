"""Near-duplicate exclusion on Fashion-MNIST: D = X versus disjoint splits, derived threshold
versus fixed ones, measured side by side.

For each case it prints the threshold and how it was derived, the excluded candidates by kind
(self, exact duplicate, near-duplicate) and the share of the k = 4 neighbours whose class
(caption) is the query's. Databases and neighbours files already present under ``--work`` (for
example made by the documented ``rdm db`` commands) are reused, not recomputed.

    OMP_NUM_THREADS=1 python bench/exclusion.py --work /tmp/h1 --fixed 0.98 1.0

Cases: ``fm-train-db`` (D = the ``train`` split, queries ``train``: every query is in D) and
``fm-db`` (D = ``db``, queries ``train``: disjoint by construction). ``--fixed T`` adds D = X
runs with ``--exclude-threshold T`` (0.98 was the old constant; 1.0 excludes only self and exact
duplicates).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

CASES = {"fm-train-db": "train", "fm-db": "db"}  # database dir -> split it embeds
K_AGREE = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/h1"), help="databases go here")
    parser.add_argument("--source", default="fashion-mnist")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="calibration seed")
    parser.add_argument("--fixed", type=float, nargs="*", default=[], help="fixed thresholds")
    parser.add_argument(
        "--pixels",
        action="store_true",
        help="D = X: how different in pixels the pairs above the derived threshold are",
    )
    args = parser.parse_args()

    import torch

    from rdm.data import open_source
    from rdm.encoders import load_encoder

    torch.set_num_threads(1)
    print(f"machine: {_cpu()}, torch threads 1; commit {_commit()}")
    source, encoder = open_source(args.source), load_encoder(args.encoder)
    runs = [(name, split, None) for name, split in CASES.items()]
    runs += [("fm-train-db", "train", t) for t in args.fixed]
    for name, split, fixed in runs:
        db = _database(args.work / name, source, split, encoder)
        suffix = "" if fixed is None else f"-fixed{fixed:g}"
        path = db.root / f"neighbors-train{suffix}.safetensors"
        seconds = _neighbours(db, source, encoder, path, args.k, fixed, args.seed)
        _print_case(name, db, source, path, seconds)
    if args.pixels:
        _pixel_differences(args.work / "fm-train-db", source, args.seed)


def _database(root: Path, source, split: str, encoder):
    from rdm.database import Database
    from rdm.db_build import build_database

    if not (root / "manifest.json").is_file():
        build_database(source, split, encoder, root, progress=False)
    return Database.open(root)


def _neighbours(db, source, encoder, path: Path, k: int, fixed, seed: int) -> float | None:
    """Compute the neighbours file unless present; seconds taken (None when reused)."""
    from rdm.neighbors import compute_neighbors

    if path.is_file():
        return None
    t0 = time.perf_counter()
    compute_neighbors(
        db, source, "train", encoder, k=k, exclude_threshold=fixed, out=path, seed=seed,
        progress=False,
    )  # fmt: skip
    return time.perf_counter() - t0


def _print_case(name: str, db, source, path: Path, seconds: float | None) -> None:
    from rdm.neighbors import load_neighbors

    nb = load_neighbors(path)
    ex = nb.meta["exclusion"]
    n, k = len(nb.query_ids), nb.k
    captions = np.asarray(db.captions, dtype=object)
    query_captions = np.array([source.caption(int(i)) for i in nb.query_ids], dtype=object)
    agree = float(np.mean(captions[nb.nn_rows[:, :K_AGREE]] == query_captions[:, None]))
    took = "reused" if seconds is None else f"{seconds:.0f} s"
    print(f"\n{name}: D = {db.split!r} ({db.count} rows), queries 'train' ({n}), k = {k} ({took})")
    print(f"  {path}")
    print(f"  threshold {ex['threshold']:.5f} ({ex['threshold_from']})")
    cal = ex.get("calibration")
    if cal:
        copies, distinct = cal["copies"], cal["distinct"]
        print(
            f"  calibration: seed {cal['seed']}, {copies['sample']} query images x "
            f"{len(copies['transforms'])} copies, {distinct['sample']} database rows, "
            f"{cal['seconds']} s"
        )
        for kind, q in copies["quantiles"].items():
            desc = copies["transforms"].get(kind, "all copies pooled")
            print(f"    cos(image, copy) {kind:>6}: {_q(q)}   ({desc})")
        print(f"    cos(db image, nearest other): {_q(distinct['quantiles'])}")
        print(
            f"    copy_low {cal['copy_low']:.5f}, distinct_high {cal['distinct_high']:.5f}, "
            f"overlap {cal['overlap']}; copies recognised "
            + ", ".join(f"{t} {100 * s:.0f}%" for t, s in cal["copies_recognised"].items())
        )
    kept = k * n
    print(
        f"  excluded: self {ex['excluded_self']}, exact duplicates "
        f"{ex['excluded_exact_duplicates']}, near-duplicates {ex['excluded_near_duplicates']} "
        f"({ex['excluded_near_duplicates'] / n:.3f} per query; exact + near = "
        f"{100 * ex['excluded_share']:.3f}% of k*N = {kept})"
    )
    print(f"  class agreement of the {K_AGREE} neighbours: {agree:.4f}")


def _pixel_differences(root: Path, source, seed: int) -> None:
    """Mean |pixel difference| (0..255) of the D = X pairs the derived threshold excludes (stored
    vectors, each row against its nearest other rows), beside that of a JPEG re-save."""
    from rdm.database import Database
    from rdm.duplicates import jpeg_copy
    from rdm.neighbors import EXTRA, load_neighbors

    db = Database.open(root)
    nb = load_neighbors(root / "neighbors-train.safetensors")
    t, depth = nb.meta["exclusion"]["threshold"], nb.k + EXTRA
    scores, rows = db.search(db.vectors(np.arange(db.count)), depth + 1)  # (N, depth + 1)
    a, j = np.nonzero((scores > t) & (rows != np.arange(db.count)[:, None]))  # not the row itself
    pixels = source.pixels(db.ids).astype(np.float32)  # (N, 28, 28), Fashion-MNIST only
    diff = np.abs(pixels[a] - pixels[rows[a, j]]).mean(axis=(1, 2))  # (pairs,)
    rng = np.random.default_rng(seed)
    sample = rng.choice(db.count, 256, replace=False)
    jpeg = [
        np.abs(np.asarray(jpeg_copy(source.load(int(db.ids[r]))).convert("L"), np.float32)
               - pixels[r]).mean()
        for r in sample
    ]  # fmt: skip
    random_pairs = np.abs(pixels[sample] - pixels[rng.choice(db.count, 256)]).mean(axis=(1, 2))
    print(
        f"\npixels, D = X: {len(a)} (row, other row) pairs above {t:.5f} among each row's "
        f"{depth} nearest; mean |pixel difference| of those pairs: "
        + "  ".join(f"{q:g}% {np.percentile(diff, q):.2f}" for q in (10, 50, 90))
        + f"; a JPEG q90 re-save: median {np.median(jpeg):.2f}; random pairs: median "
        f"{np.median(random_pairs):.2f} (grey levels of 255)"
    )


def _q(quantiles: dict) -> str:
    return "  ".join(f"{key} {value:.5f}" for key, value in quantiles.items())


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return name


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
