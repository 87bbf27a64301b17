"""p(x̃)'s candidates break ties by row, and ``draw``'s default seed is 0.

Found by mutation testing (docs/testing.md): ``argsort(..., kind="stable")`` with the kind dropped
passed the suite, because no test had more than a handful of tied probabilities (numpy's default
introsort is stable on short arrays only). p(x̃) is a count over k_p·N neighbours, so ties are the
rule, and without a stable order the top-m set of a database would depend on the sort algorithm.
"""

from __future__ import annotations

import numpy as np

from rdm import pseudo_query


def test_top_m_candidates_break_ties_by_row_index():
    counts = (np.arange(60) * 7) % 3 + 1  # (60,) three tied levels 1, 2, 3, interleaved
    prob = counts / counts.sum()
    rows, weights = pseudo_query.candidates(prob, top_m=0.3)
    reference = sorted(range(60), key=lambda r: (-prob[r], r))[:18]  # ceil(0.3 · 60)
    np.testing.assert_array_equal(rows, reference)
    assert weights is None  # uniform inside the top-m set


def test_draw_default_seed_is_zero():
    prob = np.array([0.1, 0.0, 0.3, 0.6])
    np.testing.assert_array_equal(pseudo_query.draw(prob, 8), pseudo_query.draw(prob, 8, seed=0))
    expected = np.random.default_rng(0).choice([3, 2, 0], size=8, replace=True, p=[0.6, 0.3, 0.1])
    np.testing.assert_array_equal(pseudo_query.draw(prob, 8), expected)
