"""Claim 2, k: the recipe trained with k_train ∈ {1, 2, 4, 8} neighbours in its context (600
steps each), sampled unconditionally with the same k: FD, precision, recall (the paper: larger
k, higher recall).

    python experiments/k_neighbors.py
"""

from __future__ import annotations

import os
import time

from claims import (
    METRIC_HEADER,
    Arm,
    Eval,
    N,
    bar_plot,
    ensure_db,
    row,
    table,
    trained_steps,
    write,
)
from shipped import RDM_600

ARMS = {1: Arm("rdm-k1-600", ["--k", "1"]), 2: Arm("rdm-k2-600", ["--k", "2"]), 4: RDM_600,
        8: Arm("rdm-k8-600", ["--k", "8"])}  # fmt: skip


def main() -> None:
    started = time.time()
    ensure_db()
    only_trained = os.environ.get("ONLY_TRAINED") == "1"
    evals, reports = [], []
    for k, arm in ARMS.items():
        if only_trained and trained_steps(arm.run) < arm.steps:
            continue
        arm.train()
        e = Eval(f"k-{k}", arm, ["--mode", "unconditional"])
        evals.append(e)
        reports.append((k, e.run()))
    rows = [row(f"k = {k}", r) for k, r in reports]
    rec = [r["metrics"]["model"]["recall"] for _, r in reports]
    ks = [k for k, _ in reports]
    rising = all(b >= a for a, b in zip(rec, rec[1:], strict=False))
    # recall is a share of the N real images: its binomial standard deviation is the least noise
    sd = max((r * (1 - r) / N) ** 0.5 for r in rec) if rec else 0.0
    spread = max(rec) - min(rec) if rec else 0.0
    body = (
        "Unconditional samples (pseudo-queries from p(x̃), their k neighbours as the context).\n\n"
        + table(["k_train", *METRIC_HEADER], rows)
        + f"\nRecall over k = {ks}: {', '.join(f'{x:.2f}' for x in rec)}; the paper's claim (larger "
        f"k, higher recall) {'holds' if rising and len(rec) > 1 else 'does not hold'} here"
        f"{'' if len(ks) == len(ARMS) else ' (partial: not every arm is trained yet)'}. "
        f"The spread across k is {spread:.3f}, against a binomial standard deviation of "
        f"{sd:.3f} for a share of N = {N} real images"
        + (": a tie at this N." if spread < 2 * sd else ".")
        + "\n"
    )
    write("k_neighbors", "Claim 2: neighbours per context, k", body, [a for a in ARMS.values()],
          evals, started)  # fmt: skip
    bar_plot("k_neighbors", [f"k={k}" for k in ks], [r for _, r in reports], "k_train")


if __name__ == "__main__":
    main()
