"""Claim 4, database size: the shipped recipe (1600 steps, trained with the full D) sampled with
D subsampled to 1%, 10% and 100%, and a model trained with the 10% database (600 steps), against
the full-D model at 600 steps, both sampled with the 10% database: how quality and faithfulness
depend on |D|.

The subsets are the db split at a smaller db fraction: the items whose sha1(key) fraction is
below 0.005 (1% of D) or 0.05 (10% of D), so each subset lies inside the next and inside D.
The small-D model's X is that database's train split, i.e. the rest of the training file (95%
of it, not the 50% the other arms see): the split rule ties X to the database.

    python experiments/database_size.py
"""

from __future__ import annotations

import os
import time

from claims import (
    DB,
    METRIC_HEADER,
    RUNS,
    Arm,
    Eval,
    bar_plot,
    ensure_db,
    row,
    table,
    trained_steps,
    write,
)  # fmt: skip
from shipped import RDM_600, RDM_1600

DB_1 = RUNS / "db-1pct"
DB_10 = RUNS / "db-10pct"
SMALL_D = Arm("rdm-k4-600-db10", steps=600, db=DB_10)
SMALL_D_LABEL = "600 steps, trained with 10% of D, sampled with it"


def main() -> None:
    started = time.time()
    ensure_db()
    ensure_db(DB_1, 0.005, neighbours=False)  # image-conditioned sampling needs no p(x̃)
    ensure_db(DB_10, 0.05, neighbours=False)
    RDM_1600.train()
    image: list[str] = []  # --mode image, the default
    plan = [
        ("1600 steps, full D, sampled with 1% of D", RDM_1600, DB_1),
        ("1600 steps, full D, sampled with 10% of D", RDM_1600, DB_10),
        ("1600 steps, full D, sampled with all of D", RDM_1600, DB),
        ("600 steps, full D, sampled with 10% of D", RDM_600, DB_10),
        (SMALL_D_LABEL, SMALL_D, DB_10),
    ]
    evals, reports = [], []
    for label, arm, db in plan:
        if os.environ.get("ONLY_TRAINED") == "1" and trained_steps(arm.run) < arm.steps:
            continue
        if arm is SMALL_D:
            ensure_db(DB_10, 0.05)  # its training neighbours
        arm.train()
        e = Eval(f"db-size-{label}", arm, image, db=db)
        evals.append(e)
        reports.append((label, e.run()))
    rows = [row(label, r, str(r["database"]["rows"])) for label, r in reports]
    fd = {label: r["metrics"]["model"]["fd"] for label, r in reports}
    fa = {label: r["faithfulness"]["share"] for label, r in reports}
    sizes = [label for label, _, _ in plan[:3] if label in fd]
    body = (
        "Image-conditioned samples: each test image's k = 4 neighbours in the given database.\n\n"
        + table(["arm", "|D|", *METRIC_HEADER], rows)
        + "\nWith the full-D model, from 1% to 100% of D: FD "
        + " → ".join(f"{fd[s]:.1f}" for s in sizes)
        + ", faithfulness "
        + " → ".join(f"{fa[s]:.2f}" for s in sizes)
        + (
            f": a {100 * (fd[sizes[0]] - fd[sizes[-1]]) / fd[sizes[-1]]:.0f} % change in FD for "
            "100 times the database"
            if len(sizes) == 3
            else ""
        )
        + ".\n"
        + _small_d(dict(reports))
        + _missing(plan, [label for label, _ in reports])
    )
    arms = [RDM_1600, RDM_600, SMALL_D]
    write("database_size", "Claim 4: database size", body, arms, evals, started)
    bar_plot("database_size", [label.replace("sampled with", "D:") for label, _ in reports],
             [r for _, r in reports], "Database size")  # fmt: skip


def _small_d(reports: dict) -> str:
    """The sentence on the model trained with the small D against the full-D model, both at 600
    steps and both sampled with the small D."""
    full, small = "600 steps, full D, sampled with 10% of D", SMALL_D_LABEL
    if full not in reports or small not in reports:
        return ""
    (f, s) = (reports[full]["metrics"]["model"], reports[small]["metrics"]["model"])
    (fa, sa) = (reports[full]["faithfulness"]["share"], reports[small]["faithfulness"]["share"])
    within = abs(f["kid"] - s["kid"]) < max(f["kid_std"], s["kid_std"])
    verdict = "helps" if s["fd"] < f["fd"] else "does not help"
    return (
        f"\nSampled with 10% of D, the model trained with that small D reaches FD {s['fd']:.1f} "
        f"and faithfulness {sa:.2f}, against {f['fd']:.1f} and {fa:.2f} for the model trained "
        f"with the full D at the same 600 steps: training with the small D {verdict} when "
        f"sampling with it{', though by less than KID resolves' if within else ''} (KID "
        f"{s['kid']:.1f} ± {s['kid_std']:.1f} against {f['kid']:.1f} ± {f['kid_std']:.1f}). Its "
        "training set X is the rest of the training file (95 %, 57k images, not 50 %); both "
        "models see the same 38,400 images in 600 steps, 0.67 epochs of its X and 1.3 of the "
        "full-D model's.\n"
    )


def _missing(plan, done: list[str]) -> str:
    left = [label for label, _, _ in plan if label not in done]
    if not left:
        return ""
    return (
        "\nNot measured yet (its arm is not trained; rerun without ONLY_TRAINED=1): "
        + "; ".join(left)
        + ".\n"
    )


if __name__ == "__main__":
    main()
