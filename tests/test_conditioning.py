"""The conditioning builders check values, not shapes: every context row is compared with the
encoder's embedding or ``db.vectors`` of a numpy brute-force search, pseudo-query and class-pool
draws with a fixed-seed chi-square test, and the grid's cells with the database images."""

from __future__ import annotations

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource
from PIL import Image

from rdm import conditioning as C
from rdm import pseudo_query
from rdm.database import Database, build_database
from rdm.errors import RdmError

SOURCE = TinySource(40)
K = 4


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond") / "db"
    enc = ProjectionEncoder()
    return Database.open(build_database(SOURCE, "all", enc, root, batch_size=16, progress=False))


@pytest.fixture(scope="module")
def enc():
    return ProjectionEncoder()


def exact_top(db: Database, q: np.ndarray, k: int) -> np.ndarray:
    """Reference ξ_k: rows of the k largest cosines of ``q`` (d,) over all of D, numpy only."""
    scores = db.vectors(np.arange(len(db))) @ (q / np.linalg.norm(q))  # (N,)
    return np.argsort(-scores, kind="stable")[:k]


def chi_square(counts: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Pearson's statistic and its 0.9995 quantile (Wilson–Hilferty), for len(counts) − 1 dof."""
    stat = float(((counts - expected) ** 2 / expected).sum())
    nu = len(counts) - 1
    crit = nu * (1 - 2 / (9 * nu) + 3.29 * np.sqrt(2 / (9 * nu))) ** 3
    return stat, crit


def query_image() -> Image.Image:
    """An image that is not in D (so its neighbours are not trivially itself)."""
    return TinySource(1000).load(999)


# --- image and text modes -------------------------------------------------------------------------


def test_image_context_is_the_exact_top_k_of_the_query_embedding(db, enc):
    image = query_image()
    cond = C.image_context(db, enc, K, image, 3)
    q = enc.encode_images([image])[0]
    expected = exact_top(db, q, K)
    assert cond.context.shape == (3, K, db.dim)
    for i in range(3):
        assert cond.rows[i] == expected.tolist()
        np.testing.assert_array_equal(cond.context[i], db.vectors(expected))
        assert cond.query_images[i] is image


def test_include_query_puts_the_query_embedding_first(db, enc):
    image = query_image()
    cond = C.image_context(db, enc, K, image, 2, include_query=True)
    q = enc.encode_images([image])[0]
    expected = exact_top(db, q, K - 1)
    assert cond.context.shape == (2, K, db.dim)
    np.testing.assert_allclose(cond.context[:, 0], np.stack([q, q]), atol=1e-7)
    np.testing.assert_array_equal(cond.context[0, 1:], db.vectors(expected))
    assert cond.rows[0] == expected.tolist()


def test_text_neighbors_mode_is_the_exact_top_k_of_the_text_embedding(db, enc):
    cond = C.text_context(db, enc, K, "a shirt", 2)
    t = enc.encode_texts(["a shirt"])[0]
    expected = exact_top(db, t, K)
    assert cond.rows == [expected.tolist()] * 2
    np.testing.assert_array_equal(cond.context[1], db.vectors(expected))


def test_text_plus_neighbors_is_the_text_token_then_k_minus_1_neighbours(db, enc):
    cond = C.text_context(db, enc, K, "a shirt", 2, mode="text+neighbors")
    t = enc.encode_texts(["a shirt"])[0]
    expected = exact_top(db, t, K - 1)
    assert cond.context.shape == (2, K, db.dim)
    np.testing.assert_allclose(cond.context[:, 0], np.stack([t, t]), atol=1e-7)
    np.testing.assert_array_equal(cond.context[0, 1:], db.vectors(expected))
    assert cond.rows[0] == expected.tolist()


def test_text_mode_is_the_text_embedding_alone(db, enc):
    cond = C.text_context(db, enc, K, "a shirt", 3, mode="text")
    t = enc.encode_texts(["a shirt"])
    assert cond.context.shape == (3, 1, db.dim) and cond.rows == [[]] * 3
    np.testing.assert_allclose(cond.context[2], t, atol=1e-7)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda db, enc: C.text_context(db, enc, K, "x", 1, mode="pictures"), "text mode"),
        (lambda db, enc: C.text_context(db, enc, K, "  ", 1), "empty"),
        (lambda db, enc: C.image_context(db, enc, 41, query_image(), 1), "holds only 40"),
        (lambda db, enc: C.class_pool_context(db, enc, K, "x", 1, pool_size=3), "--pool-size"),
    ],
)
def test_bad_arguments_get_a_clear_error(db, enc, call, message):
    with pytest.raises(RdmError, match=message):
        call(db, enc)


# --- class pool -----------------------------------------------------------------------------------


def test_class_pool_draws_k_distinct_rows_of_the_prompts_top_l_uniformly(db, enc):
    L, n = 8, 600
    cond = C.class_pool_context(db, enc, K, "a bag", n, pool_size=L, seed=3)
    pool = exact_top(db, enc.encode_texts(["a bag"])[0], L)
    rows = np.array(cond.rows)  # (n, K)
    assert all(len(set(r)) == K for r in cond.rows)  # distinct within a sample
    assert set(rows.ravel()) == set(pool.tolist())  # only, and all of, the top-L
    np.testing.assert_array_equal(cond.context, db.vectors(rows))
    counts = np.array([(rows == r).sum() for r in pool])
    stat, crit = chi_square(counts, np.full(L, n * K / L))
    assert stat < crit, (stat, crit)
    assert len({tuple(sorted(r)) for r in cond.rows}) > 50  # a new draw per sample


def test_class_pool_is_seeded(db, enc):
    a = C.class_pool_context(db, enc, K, "a bag", 5, pool_size=8, seed=1)
    b = C.class_pool_context(db, enc, K, "a bag", 5, pool_size=8, seed=1)
    c = C.class_pool_context(db, enc, K, "a bag", 5, pool_size=8, seed=2)
    assert a.rows == b.rows and a.rows != c.rows


# --- pseudo-queries -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prob(db):
    """p(x̃) on half of D, proportional to 1 … 20 in a shuffled order (distinct values)."""
    rng = np.random.default_rng(0)
    support = rng.permutation(len(db))[:20]
    p = np.zeros(len(db))
    p[support] = np.arange(1, 21)
    return p / p.sum()


def _check_context_of_pseudo_queries(db, cond):
    """Each context is ξ_k(x̃, D), with x̃ itself (cosine 1) first."""
    for picked, rows, ctx in zip(cond.query_rows, cond.rows, cond.context, strict=True):
        assert rows == exact_top(db, db.vectors(picked), K).tolist() and rows[0] == picked
        np.testing.assert_array_equal(ctx, db.vectors(rows))


def test_pseudo_queries_follow_p(db, prob):
    n = 3000
    cond = C.pseudo_query_context(db, K, n, prob=prob, seed=0)
    picks = np.array(cond.query_rows)
    support = np.flatnonzero(prob)
    assert set(picks) <= set(support)
    counts = np.array([(picks == r).sum() for r in support])
    stat, crit = chi_square(counts, n * prob[support])
    assert stat < crit, (stat, crit)
    _check_context_of_pseudo_queries(db, C.pseudo_query_context(db, K, 20, prob=prob, seed=0))


@pytest.mark.parametrize("weighted", [False, True])
def test_top_m_draws_only_from_the_most_probable_fraction(db, prob, weighted):
    n, m = 2000, 0.22  # ceil(0.22 · 20) = 5 rows of the support
    cond = C.pseudo_query_context(db, K, n, prob=prob, top_m=m, weighted=weighted, seed=1)
    picks = np.array(cond.query_rows)
    top = np.argsort(-prob, kind="stable")[:5]
    assert set(picks) == set(top.tolist())  # only the top 5, and each of them
    counts = np.array([(picks == r).sum() for r in top])
    share = prob[top] / prob[top].sum() if weighted else np.full(5, 0.2)
    stat, crit = chi_square(counts, n * share)
    assert stat < crit, (stat, crit)
    # drawn where p(x̃) is drawn, nowhere else
    assert (
        cond.query_rows == pseudo_query.draw(prob, n, top_m=m, weighted=weighted, seed=1).tolist()
    )
    small = C.pseudo_query_context(db, K, 20, prob=prob, top_m=m, weighted=weighted, seed=1)
    _check_context_of_pseudo_queries(db, small)


def test_uniform_pseudo_queries_cover_all_of_d(db):
    n = 2000
    cond = C.pseudo_query_context(db, K, n, prob=None, uniform=True, seed=2)
    counts = np.bincount(cond.query_rows, minlength=len(db))
    stat, crit = chi_square(counts, np.full(len(db), n / len(db)))
    assert stat < crit, (stat, crit)


def test_pseudo_queries_without_p_name_the_command_that_makes_it(db, prob):
    with pytest.raises(RdmError, match="rdm db neighbors"):
        C.pseudo_query_context(db, K, 2, prob=None)
    with pytest.raises(RdmError, match="entries"):
        C.pseudo_query_context(db, K, 2, prob=prob[:-1])
    a = C.pseudo_query_context(db, K, 5, prob=prob, seed=4)
    b = C.pseudo_query_context(db, K, 5, prob=prob, seed=4)
    assert a.query_rows == b.query_rows


# --- grids ----------------------------------------------------------------------------------------


def test_grid_shows_query_neighbours_then_sample(db, enc):
    cell, gap = 64, 2  # 16 px images scale exactly 4x (nearest) into a cell
    image = query_image()
    cond = C.concat(
        [
            C.image_context(db, enc, K, image, 1),
            C.text_context(db, enc, K, "x", 1, mode="text+neighbors"),
        ]
    )
    samples = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    sheet = C.grid(cond, samples, db, source=SOURCE, cell=cell)
    cols = 1 + K + 1  # query, K neighbours, sample
    left = sheet.width - cols * (cell + gap) - gap  # the row labels' width

    def at(r, c):
        x, y = left + gap + c * (cell + gap), gap + r * (cell + gap)
        return np.asarray(sheet.crop((x, y, x + cell, y + cell)))

    def big(im):
        return np.asarray(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST))

    assert sheet.height == 2 * (cell + gap) + gap
    np.testing.assert_array_equal(at(0, 0), big(image))
    for j, row in enumerate(cond.rows[0]):
        np.testing.assert_array_equal(at(0, 1 + j), big(SOURCE.load(int(db.ids[row]))))
    np.testing.assert_array_equal(at(0, cols - 1), big(samples[0]))
    # text + neighbours: no query image, K - 1 neighbours, empty cells, the sample last
    for j, row in enumerate(cond.rows[1]):
        np.testing.assert_array_equal(at(1, j), big(SOURCE.load(int(db.ids[row]))))
    empty = at(1, K - 1)
    assert (empty == empty[0, 0]).all() and (at(1, K) == empty).all()
    np.testing.assert_array_equal(at(1, cols - 1), big(samples[1]))
    with pytest.raises(RdmError, match="different shapes"):
        C.concat([cond, C.text_context(db, enc, K, "x", 1, mode="text")])
    with pytest.raises(RdmError, match="2 conditionings"):
        C.grid(cond, samples[:1], db, source=SOURCE)
