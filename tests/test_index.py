"""FAISS wrapper: index choice by size and budget, results against numpy brute force (ties
tolerated), recall measurement, tuning, atomic save / load."""

from __future__ import annotations

import numpy as np
import pytest

from rdm import index as fi
from rdm.index import IndexSpec, choose_index


def clustered(n: int, d: int, centres: int = 50, noise: float = 0.6, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centres`` random directions: structure an ANN index can exploit."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_knn(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full sort of all scores."""
    scores = xq @ xb.T
    I = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, I, 1), I


def check_knn_with_ties(D_ref, I_ref, D, I, atol=1e-5):
    """Scores must agree; ids may differ only among equal scores, and among those tied at the
    k-th place (faiss.contrib.evaluation.check_ref_knn_with_draws, which raises otherwise)."""
    from faiss.contrib.evaluation import check_ref_knn_with_draws

    check_ref_knn_with_draws(D_ref, I_ref, D, I, rtol=0, atol=atol)


# ---- choice -------------------------------------------------------------------------------------


def test_small_databases_are_exact():
    assert choose_index(1000, 512, 2e9).type == "flat"
    assert choose_index(fi.EXACT_MAX_N, 512, 2e9).type == "flat"


def test_large_databases_get_hnsw_when_the_graph_fits():
    spec = choose_index(fi.EXACT_MAX_N + 1, 512, 8e9)
    assert spec.type == "hnsw" and spec.params["M"] == fi.HNSW_M


def test_budget_below_float32_forces_ivfpq_with_lighter_reranking():
    n, d = 1_000_000, 512
    default = choose_index(n, d, 2e9)  # 2.05 GB of float32 vectors do not fit 2 GB
    assert default.type == "ivfpq" and default.params["refine"] == "fp16"
    assert default.params["nlist"] == 4000 and default.params["m"] == 64
    assert choose_index(n, d, 0.6e9).params["refine"] == "sq8"
    assert choose_index(n, d, 0.1e9).on_disk  # no PQ-only index: IVF-fp16 lists on disk
    for budget in (2e9, 0.6e9, 0.1e9):
        spec = choose_index(n, d, budget)
        assert n * spec.bytes_per_vector(d) <= budget or spec.on_disk
        assert spec.memory_bytes(n, d) <= budget


def test_small_but_over_budget_is_not_exact():
    spec = choose_index(10_000, 64, 1e6)  # float32 would be 2.56 MB
    assert spec.type == "ivfpq" and spec.params["nlist"] == 10_000 // 39


def test_budget_too_small_and_empty_database_are_refused():
    with pytest.raises(fi.FaissIndexError, match="memory-budget"):
        choose_index(1_000_000, 512, 1e6)
    with pytest.raises(fi.FaissIndexError, match="empty"):
        choose_index(0, 512, 2e9)


def test_pq_subquantizers_divide_d():
    assert fi.pq_subquantizers(512) == 64
    assert fi.pq_subquantizers(100) == 10 and 100 % fi.pq_subquantizers(100) == 0
    assert fi.pq_subquantizers(7) == 1


# ---- results ------------------------------------------------------------------------------------


def test_flat_index_matches_numpy_brute_force():
    xb = clustered(3000, 32)
    xq = clustered(50, 32, seed=1)
    index = fi.build_index(xb, IndexSpec("flat"))
    D, I = fi.search(index, xq, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and I.shape == (50, 10)
    check_knn_with_ties(*numpy_knn(xb, xq, 10), D, I)


def test_exact_search_matches_reference_across_chunks(monkeypatch):
    monkeypatch.setattr(fi, "CHUNK", 700)  # several chunks, ragged last one
    xb = clustered(3000, 16)
    xq = clustered(20, 16, seed=2)
    check_knn_with_ties(*numpy_knn(xb, xq, 7), *fi.exact_search(xb, xq, 7))
    # k beyond the database (and beyond a chunk) gives every row once, never a -1 filler
    D, I = fi.exact_search(xb[:900], xq, 1000)
    assert I.shape == (20, 900) and (np.sort(I, axis=1) == np.arange(900)).all()
    check_knn_with_ties(*numpy_knn(xb[:900], xq, 900), D, I)


def test_exact_search_orders_ties_by_row():
    xb = np.repeat(clustered(50, 8), 3, axis=0)  # rows 3i, 3i+1, 3i+2 are the same vector
    D, I = fi.exact_search(xb, xb[::3], 6)
    np.testing.assert_array_equal(I[:, :3], np.arange(0, 150, 3)[:, None] + np.arange(3))
    assert (np.diff(D, axis=1) <= 0).all()


def test_ties_are_tolerated():
    xb = np.repeat(clustered(100, 8), 3, axis=0)  # every vector three times
    xq = xb[::30]
    D, I = fi.search(fi.build_index(xb, IndexSpec("flat")), xq, 4)
    check_knn_with_ties(*numpy_knn(xb, xq, 4), D, I)
    assert fi.measure_recall(fi.build_index(xb, IndexSpec("flat")), xb, 4, n_queries=50) == 1.0


def test_float16_memmap_input_builds_the_same_index(tmp_path):
    xb = clustered(500, 16).astype(np.float16)
    np.save(tmp_path / "x.npy", xb)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    xq = xb[:5].astype(np.float32)
    a = fi.search(fi.build_index(mm, IndexSpec("flat")), xq, 5)
    b = fi.exact_search(xb, xq, 5)
    check_knn_with_ties(*b, *a)


@pytest.mark.parametrize("budget, kind", [(4e6, "hnsw"), (1.2e6, "ivfpq")])
def test_approximate_indexes_are_tuned_to_the_recall_target(budget, kind, monkeypatch):
    monkeypatch.setattr(fi, "EXACT_MAX_N", 1000)  # so a tiny database is "large"
    x = clustered(6200, 32)
    xb, held_out = x[:6000], x[6000:]  # held-out queries from the same distribution
    spec = choose_index(len(xb), 32, budget)
    assert spec.type == kind
    index = fi.build_index(xb, spec)
    tuned, recall = fi.tune_index(index, spec, xb, ks=(1, 10), n_queries=200)
    assert min(recall.values()) >= fi.TARGET_RECALL and set(recall) == {1, 10}
    # an independent measurement (other queries, held out) agrees with the tuned figure
    for k in (1, 10):
        assert fi.measure_recall(index, xb, k, xq=held_out) >= fi.TARGET_RECALL - 0.03


def test_measure_recall_reports_a_bad_index():
    xb = clustered(2000, 16)
    wrong = fi.build_index(clustered(2000, 16, seed=9), IndexSpec("flat"))  # other vectors
    assert fi.measure_recall(wrong, xb, 5, n_queries=100) < 0.2


# ---- files --------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_search_params(tmp_path, monkeypatch):
    monkeypatch.setattr(fi, "EXACT_MAX_N", 100)
    xb = clustered(2000, 16)
    spec = IndexSpec("hnsw", {"M": 8, "efConstruction": 40, "efSearch": 48})
    index = fi.build_index(xb, spec)
    fi.save_index(index, tmp_path / "i.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["i.faiss"]  # no temporary file left
    loaded = fi.load_index(tmp_path / "i.faiss", spec)
    import faiss

    assert faiss.downcast_index(loaded).hnsw.efSearch == 48
    np.testing.assert_array_equal(fi.search(loaded, xb[:5], 3)[1], fi.search(index, xb[:5], 3)[1])


def test_save_index_writes_faiss_bytes_and_names_an_unwritable_path(tmp_path):
    import faiss

    from rdm.io import OutputError

    index = fi.build_index(clustered(300, 8), IndexSpec("flat"))
    fi.save_index(index, tmp_path / "ours.faiss")
    faiss.write_index(index, str(tmp_path / "faiss.faiss"))
    assert (tmp_path / "ours.faiss").read_bytes() == (tmp_path / "faiss.faiss").read_bytes()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write") as info:  # not FAISS's RuntimeError
        fi.save_index(index, tmp_path / "file" / "i.faiss")
    assert str(tmp_path / "file" / "i.faiss") in str(info.value)


def test_truncated_or_missing_index_file_is_a_clear_error(tmp_path):
    index = fi.build_index(clustered(100, 8), IndexSpec("flat"))
    fi.save_index(index, tmp_path / "i.faiss")
    data = (tmp_path / "i.faiss").read_bytes()
    (tmp_path / "i.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(fi.FaissIndexError, match="damaged or truncated"):
        fi.load_index(tmp_path / "i.faiss")
    with pytest.raises(fi.FaissIndexError, match="missing"):
        fi.load_index(tmp_path / "none.faiss")


def test_search_rejects_bad_queries():
    index = fi.build_index(clustered(100, 8), IndexSpec("flat"))
    with pytest.raises(fi.FaissIndexError, match="dimension 4"):
        fi.search(index, np.zeros((1, 4), np.float32), 3)
    with pytest.raises(fi.FaissIndexError, match="k must be at least 1"):
        fi.search(index, np.zeros((1, 8), np.float32), 0)
