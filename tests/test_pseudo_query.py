"""p(x̃): the counting formula, top-m truncation and the draws."""

from __future__ import annotations

import numpy as np
import pytest

from rdm.errors import RdmError
from rdm.pseudo_query import candidates, distribution, draw


def test_distribution_counts_the_first_k_p_neighbours():
    nn_rows = np.array([[0, 1, 4], [0, 2, 4]])  # column 2 is beyond k_p = 2
    pq = distribution(nn_rows, 2, 5)
    np.testing.assert_array_equal(pq["pq_counts"], [2, 1, 1, 0, 0])
    np.testing.assert_allclose(pq["pq_prob"], [0.5, 0.25, 0.25, 0, 0])  # counts / (k_p · N)


def test_top_m_keeps_the_most_probable_fraction_of_the_support():
    p = np.array([0.0, 0.1, 0.4, 0.0, 0.3, 0.2])
    rows, w = candidates(p, top_m=0.5)  # support of 4 -> the 2 most probable, uniform
    assert rows.tolist() == [2, 4] and w is None
    rows, w = candidates(p, top_m=0.5, weighted=True)
    np.testing.assert_allclose(w, [0.4 / 0.7, 0.3 / 0.7])
    assert candidates(p, top_m=0.01)[0].tolist() == [2]  # at least one row
    rows, w = candidates(p)  # no truncation: p itself over its support
    assert rows.tolist() == [2, 4, 5, 1]
    np.testing.assert_allclose(w, [0.4, 0.3, 0.2, 0.1])
    with pytest.raises(RdmError, match="top-m"):
        candidates(p, top_m=1.5)
    with pytest.raises(RdmError, match="zero everywhere"):
        candidates(np.zeros(3))


def test_draws_follow_p_and_are_seeded():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    x = draw(p, 20_000, seed=1)
    freq = np.bincount(x, minlength=4) / len(x)
    # 3-sigma binomial bound at n = 20k is about 0.011
    np.testing.assert_allclose(freq, p, atol=0.011)
    assert np.array_equal(x, draw(p, 20_000, seed=1))
    uniform_top = draw(p, 20_000, top_m=0.6, seed=2)  # the 2 most probable, uniformly
    assert set(uniform_top.tolist()) == {0, 1}
    assert abs(np.mean(uniform_top == 0) - 0.5) < 0.011
    everywhere = draw(None, 20_000, seed=3, n_db=4)
    np.testing.assert_allclose(np.bincount(everywhere) / 20_000, 0.25, atol=0.011)
