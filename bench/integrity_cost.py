"""What checking loaded files against their recorded sha256 costs, next to the commands it guards.

    python bench/integrity_cost.py --db DB_DIR [--run RUN_DIR] [--repeats 5]

Prints, side by side in one process: sha256 throughput; the hash time of the database's shards,
index and metadata and of the run's weights; the in-process work of ``rdm db query --id`` and of
``load_run`` with the checks on and off; and the wall time of the whole ``rdm db query --id``
and ``rdm sample`` commands (subprocesses). Files are in the page cache (warm) after the first
repeat; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rdm import database as dbm
from rdm.io import sha256_file


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def query_by_id(db_dir: Path) -> None:
    """What `rdm db query DIR --id ID -k 8` does in-process: open, vector, search, captions."""
    db = dbm.Database.open(db_dir)
    row = int(db.rows_of([int(db.ids[0])])[0])
    _, rows = db.search(db.vectors([row]), 8)
    [db.captions[r] for r in rows[0]]


def unchecked(fn, monkey_targets: list[tuple[object, str, object]]):
    """Run ``fn`` with the checksum functions replaced by ones that return the recorded value."""

    def run():
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in monkey_targets]
        try:
            for obj, name, value in monkey_targets:
                setattr(obj, name, value)
            fn()
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    return run


def command_time(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="run directory (default: the shipped demo model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=50)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from rdm import checkpoint
    from rdm.demo import SHIPPED_RUN

    run_dir = args.run or SHIPPED_RUN
    db = dbm.Database.open(args.db)
    m = db.manifest
    files = {
        "shards": [args.db / s["file"] for s in m["shards"]],
        "index": [args.db / m["index"]["file"]],
        "metadata": [args.db / m["metadata"]["file"]],
        "weights": [run_dir / "ema.safetensors"],
    }
    r = args.repeats
    print(f"database {args.db}: {db.count} rows, d={db.dim}; run {run_dir}")
    total_db = 0.0
    for what, paths in files.items():
        size = sum(p.stat().st_size for p in paths)
        t = median_time(lambda paths=paths: [sha256_file(p) for p in paths], r)
        total_db += t if what != "weights" else 0.0
        print(
            f"sha256 {what:<9} {size / 1e6:7.1f} MB  {t * 1e3:7.1f} ms  ({size / t / 1e9:.2f} GB/s)"
        )

    # In-process: the same work with the hashing replaced by the recorded values.
    recorded = {}
    for entry in [*m["shards"], m["index"], m["metadata"]]:
        recorded[str(args.db / entry["file"])] = entry["sha256"]
    cfg = checkpoint.RunConfig.from_json(run_dir / "config.json")
    for name, digest in cfg.weights_sha256.items():
        recorded[str(run_dir / name)] = digest
    fake = [
        (dbm, "sha256_file", lambda p: recorded[str(p)]),
        (checkpoint, "sha256_file", lambda p: recorded[str(p)]),
    ]
    cost = {}
    for label, fn in {
        "db query --id (open, vector, search)": lambda: query_by_id(args.db),
        "load_run (config + ema weights)": lambda: checkpoint.load_run(run_dir),
    }.items():
        on = median_time(fn, r)
        off = median_time(unchecked(fn, fake), r)
        cost[label] = on - off
        print(
            f"{label:<40} checked {on * 1e3:7.1f} ms, unchecked {off * 1e3:7.1f} ms, "
            f"cost {(on - off) * 1e3:6.1f} ms"
        )

    # Whole commands (python start-up, imports, torch), one run each after a warm-up.
    rdm = [str(Path(sys.executable).with_name("rdm"))]
    query = [*rdm, "db", "query", str(args.db), "--id", str(int(db.ids[0])), "-k", "8"]
    command_time(query)
    t_query = statistics.median(command_time(query) for _ in range(3))
    out = Path("/tmp/rdm-integrity-bench")
    sample = [*rdm, "sample", str(run_dir), "--db", str(args.db), "--unconditional", "--uniform"]
    sample += ["-n", "4", "--steps", str(args.sample_steps), "--out", str(out)]
    t_sample = command_time(sample)
    t_weights = median_time(lambda: sha256_file(files["weights"][0]), r)
    c_query = cost["db query --id (open, vector, search)"]
    print(
        f"rdm db query --id -k 8: {t_query:.2f} s wall; its checks {c_query * 1e3:.0f} ms "
        f"= {100 * c_query / t_query:.1f}% (hashing every database file: {total_db * 1e3:.0f} ms "
        f"= {100 * total_db / t_query:.1f}%)"
    )
    print(
        f"rdm sample -n 4 --steps {args.sample_steps}: {t_sample:.1f} s wall; hashes at most (every "
        f"database file + weights) {(total_db + t_weights) * 1e3:.0f} ms = "
        f"{100 * (total_db + t_weights) / t_sample:.2f}%"
    )


if __name__ == "__main__":
    main()
