"""The Ray engine against the local engine: the same database built both ways, side by side.

Builds the first N (default 20,000) ids of Fashion-MNIST's ``db`` split with the shipped small
CLIP twice in one run: ``--engine local`` (this process, ``--threads`` torch threads) and
``--engine ray`` (a local Ray cluster started here, ``--workers`` encoder actors of
``--threads`` threads each), with the same shards and batches. Checks that the two databases hold
the same rows and bits (every shard, the metadata and the index byte for byte; the manifest's
identity and checksum) and prints wall times and the Ray / local ratio, with the cluster's start
counted apart. Results: docs/scale.md, "Ray engine vs local".

    nice -n 10 env OMP_NUM_THREADS=1 python bench/ray_engine.py [--n 20000] [--workers 2]
        [--threads 1] [--shard-size 2048] [--batch-size 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rdm.data import Source, open_source
from rdm.db_build import build_database
from rdm.encoders import load_encoder


class FirstIds(Source):
    """The first ``n`` ids of each split of ``inner`` (the same items for both engines)."""

    def __init__(self, inner: Source, n: int) -> None:
        self.inner, self.n = inner, n
        self.spec = f"{inner.spec}#first={n}"
        self.grayscale = inner.grayscale

    def __len__(self) -> int:
        return len(self.inner)

    def key(self, i: int) -> str:
        return self.inner.key(i)

    def caption(self, i: int) -> str:
        return self.inner.caption(i)

    def load(self, i: int):
        return self.inner.load(i)

    def split_ids(self, split: str, db_fraction: float = 0.5) -> np.ndarray:
        return self.inner.split_ids(split, db_fraction)[: self.n]

    def split_rule(self, db_fraction: float = 0.5) -> str:
        return f"the first {self.n} ids of: {self.inner.split_rule(db_fraction)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images (ids of the db split)")
    parser.add_argument("--workers", type=int, default=2, help="Ray encoder actors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both engines")
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, help="keep the two databases here (default: temp)")
    args = parser.parse_args()
    print(machine())
    import torch

    from rdm.engines.ray import RayEngine

    torch.set_num_threads(args.threads)
    source = FirstIds(open_source("fashion-mnist"), args.n)
    encoder = load_encoder("default")
    options = {"batch_size": args.batch_size, "shard_size": args.shard_size, "progress": False}
    root = args.out or Path(tempfile.mkdtemp(prefix="ray-bench-"))

    t0 = time.perf_counter()
    local = build_database(source, "db", encoder, root / "local", **options)
    t_local = time.perf_counter() - t0
    load_local = os.getloadavg()[0]

    t0 = time.perf_counter()
    with RayEngine(load_encoder, workers=args.workers, threads=args.threads) as engine:
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray_db = engine.build_database(source, "db", encoder, root / "ray", **options)
        t_ray = time.perf_counter() - t0
    load_ray = os.getloadavg()[0]

    same, rows = compare(local, ray_db)
    shards = -(-args.n // args.shard_size)
    print(
        f"{rows} rows, {shards} shards of {args.shard_size}, batch {args.batch_size}, "
        f"{args.threads} torch thread(s) per process; Ray: {args.workers} workers"
    )
    print(
        f"local engine: {t_local:8.1f} s  ({rows / t_local:6.0f} img/s; load avg {load_local:.1f})"
    )
    print(f"ray cluster start: {t_init:5.1f} s")
    print(f"ray engine:   {t_ray:8.1f} s  ({rows / t_ray:6.0f} img/s; load avg {load_ray:.1f})")
    print(
        f"ratio ray / local: {t_ray / t_local:.2f} (build), "
        f"{(t_init + t_ray) / t_local:.2f} (with the cluster's start)"
    )
    print(f"same rows and bits: {same}")
    if not same:
        sys.exit(1)


def compare(a: Path, b: Path) -> tuple[bool, int]:
    """Whether databases ``a`` and ``b`` hold the same bytes (shards, metadata, index, skipped
    list) and the same manifest identity and checksum; and their row count."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    files = [s["file"] for s in ma["shards"]] + ["metadata.parquet", "index.faiss", "skipped.jsonl"]
    differ = [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
    keys = ("identity", "fingerprint", "checksum", "shards", "count", "source", "encoder")
    differ += [k for k in keys if ma[k] != mb[k]]
    if differ:
        print(f"differ: {', '.join(differ)}")
    return not differ, int(ma["count"])


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
