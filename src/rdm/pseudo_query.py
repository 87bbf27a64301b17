"""The pseudo-query distribution p(x̃) of unconditional sampling: built once, drawn from here.

For unconditional sampling a pseudo-query x̃ is drawn from the database with (paper §3.3)

    p(x̃) = |{x ∈ X : x̃ ∈ ξ_{k_p}(x, D)}| / (k_p · |X|),

how often x̃ is among the first k_p neighbours of the training images (it sums to 1 over D). The
paper's best FID truncates it to the top-m fraction of the items with p > 0 (m = 0.01), drawing
uniformly inside that set (the official default) or proportionally to p.
"""

from __future__ import annotations

import numpy as np

from rdm.errors import RdmError


def distribution(nn_rows: np.ndarray, k_p: int, n_db: int) -> dict[str, np.ndarray]:
    """``pq_counts`` (N_db,) int64 = how often each row is among the first ``k_p`` neighbours of
    a query (``nn_rows`` (N, K), rows best first); ``pq_prob`` = counts / (k_p · N), sums to 1."""
    counts = np.bincount(nn_rows[:, :k_p].ravel(), minlength=n_db).astype(np.int64)
    return {"pq_counts": counts, "pq_prob": counts / (k_p * len(nn_rows))}


def candidates(
    prob: np.ndarray,
    top_m: float | None = None,
    weighted: bool = False,
    *,
    rounding: str = "ceil",
) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows x̃ may be drawn from, most probable first, and their draw weights (None =
    uniform). Without ``top_m`` the draw follows p itself; with it, the ``top_m`` fraction of the
    support, uniform unless ``weighted``: ⌈top_m · L⌉ rows of the L with p > 0 (``rounding``
    "ceil", at least one), or ⌊top_m · L⌋ ("floor", the CompVis release's ``get_qids``:
    ``int(memsize * len(nn_memory))``; a fraction that keeps no row is refused)."""
    support = np.flatnonzero(prob > 0)
    if not len(support):
        raise RdmError("p(x̃) is zero everywhere: the neighbours file is empty or damaged")
    order = support[np.argsort(-prob[support], kind="stable")]  # most probable first
    if top_m is not None:
        if not 0 < top_m <= 1:
            raise RdmError(f"--top-m {top_m} must be a fraction in (0, 1]")
        if rounding not in ("ceil", "floor"):
            raise RdmError(f"top-m rounding {rounding!r}: use 'ceil' or 'floor'")
        if rounding == "floor":
            keep = int(top_m * len(order))  # the release's int(), in float64 as numpy computes it
            if keep < 1:
                raise RdmError(
                    f"--top-m {top_m} keeps int({top_m} × {len(order)}) = 0 of the {len(order)} "
                    f"pseudo-queries with p > 0 (the release's rounding); give a fraction of at "
                    f"least 1/{len(order)}"
                )
        else:
            keep = max(1, int(np.ceil(top_m * len(order))))
        order = order[:keep]
    elif not weighted:
        weighted = True  # without truncation, draw from p_D itself
    weights = prob[order] / prob[order].sum() if weighted else None
    return order, weights


def draw(
    prob: np.ndarray | None,
    n: int,
    *,
    top_m: float | None = None,
    weighted: bool = False,
    seed: int = 0,
    n_db: int | None = None,
    rounding: str = "ceil",
) -> np.ndarray:
    """``n`` database rows x̃ drawn with replacement from p (see :func:`candidates`, which gets
    ``rounding``). With ``prob=None`` they are drawn uniformly from all ``n_db`` rows."""
    rng = np.random.default_rng(seed)
    if prob is None:
        if not n_db:
            raise RdmError("drawing pseudo-queries uniformly needs the database size")
        return rng.integers(0, n_db, size=n)
    rows, weights = candidates(prob, top_m, weighted, rounding=rounding)
    return rng.choice(rows, size=n, replace=True, p=weights)
