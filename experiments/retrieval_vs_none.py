"""Claim 1, retrieval vs none: the RDM against the same UNet without retrieval (``--baseline``:
always the null context), equal images seen (batch 64), at 600 and 1600 steps, and a baseline
with twice the parameters (channels 32,96,96: 3.76M against 1.86M) at 600 steps, on
Fashion-MNIST 32 px with D = one half of the training file and X = the other.

The fair comparison is unconditional: the RDM samples from pseudo-queries x̃ ~ p(x̃) (its
neighbours come from D, not from any test image), the baselines from nothing. The RDM
conditioned on test images' neighbours is listed too, as what retrieval gives when a query
exists.

    python experiments/retrieval_vs_none.py
"""

from __future__ import annotations

import time

from claims import METRIC_HEADER, Arm, Eval, bar_plot, ensure_db, row, table, write
from shipped import RDM_600, RDM_1600

BASE_600 = Arm("baseline-600", ["--baseline"], steps=600)
BASE_1600 = Arm("baseline-1600", ["--baseline"], steps=1600, continues=BASE_600)
BASE2X_600 = Arm("baseline2x-600", ["--baseline", "--channels", "32,96,96"], steps=600)


def main() -> None:
    started = time.time()
    ensure_db()
    uncond = ["--mode", "unconditional"]
    plan = [  # (label, arm, eval flags), in training order so a short run is evaluated first
        ("RDM, 600 steps", RDM_600, uncond),
        ("baseline, 600 steps", BASE_600, uncond),
        ("baseline 2x params, 600 steps", BASE2X_600, uncond),
        ("RDM, 1600 steps", RDM_1600, uncond),
        ("baseline, 1600 steps", BASE_1600, uncond),
        ("RDM, 600 steps, test-image queries", RDM_600, []),  # --mode image, the default
        ("RDM, 1600 steps, test-image queries", RDM_1600, []),
    ]
    evals, reports = [], []
    for label, arm, flags in plan:
        if not _wanted(arm):
            continue
        arm.train()
        e = Eval(f"vs-none-{label}", arm, flags)
        evals.append(e)
        reports.append((label, e.run()))
    rows = [row(label, r) for label, r in reports]
    fd = {label: r["metrics"]["model"]["fd"] for label, r in reports}
    lines = []
    for steps in (600, 1600):
        a, b = fd.get(f"RDM, {steps} steps"), fd.get(f"baseline, {steps} steps")
        if a is not None and b is not None:
            lines.append(f"at {steps} steps the RDM's FD is {a:.1f} against the baseline's {b:.1f} "
                         f"({b / a:.1f}x)")  # fmt: skip
    if "baseline 2x params, 600 steps" in fd and "RDM, 600 steps" in fd:
        big, rdm = fd["baseline 2x params, 600 steps"], fd["RDM, 600 steps"]
        line = (f"the baseline with twice the parameters (3.76M) reaches {big:.1f} "
                f"({'worse' if big > rdm else 'better'} than the 1.86M RDM's {rdm:.1f}")  # fmt: skip
        small = fd.get("baseline, 600 steps")
        if small is not None:
            line += (f", and {'no better' if big >= small - 0.05 * small else 'better'} than "
                     f"the 1.86M baseline's {small:.1f}")  # fmt: skip
        lines.append(line + ")")
    body = (
        "Unconditional unless the row says otherwise; all arms the same recipe and images "
        "seen per step.\n\n"
        + table(["arm", *METRIC_HEADER], rows)
        + "\n"
        + (_sentence("; ".join(lines)) if lines else "")
        + " A baseline never sees neighbours, so its faithfulness (the share of samples of the "
        "class of neighbours it was not given) is chance, about 0.1." + "\n"
    )
    left = [label for label, arm, _ in plan if not _wanted(arm)]
    if left:
        body += (
            "\nNot measured yet (the arm is not trained; rerun without ONLY_TRAINED=1): "
            + "; ".join(left)
            + ".\n"
        )
    arms = list({id(a): a for _, a, _ in plan if _wanted(a)}.values())
    write("retrieval_vs_none", "Claim 1: retrieval vs none", body, arms, evals, started)
    bar_plot("retrieval_vs_none", [label for label, _ in reports], [r for _, r in reports],
             "Retrieval vs none (unconditional unless noted)")  # fmt: skip


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _wanted(arm: Arm) -> bool:
    """All arms, unless ``ONLY_TRAINED=1``: then the ones already trained (a partial table)."""
    import os

    from claims import trained_steps

    return os.environ.get("ONLY_TRAINED") != "1" or trained_steps(arm.run) >= arm.steps


if __name__ == "__main__":
    main()
