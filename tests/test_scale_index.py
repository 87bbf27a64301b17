"""Bounded memory: the embeddings are read from memory-mapped shards with the bytes the old
in-memory concatenation had; the index trains on a seeded random sample (not the first rows);
an index forced onto disk is memory-mapped when opened and finds the in-memory index's
neighbours within the recall its manifest records."""

from __future__ import annotations

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource

from rdm import index as fi
from rdm.database import Database, build_database
from rdm.neighbors import compute_neighbors, load_neighbors

BUILD = {"batch_size": 64, "shard_size": 128, "progress": False}
SOURCE = TinySource(420)
NEIGHBOURS = {"k": 4, "k_p": 2, "exclude_threshold": 0.99, "progress": False}


def on_disk_spec(n: int, d: int, budget: float) -> fi.IndexSpec:
    """What choose_index returns above the budget, at a size where tiny tests can reach it."""
    return fi.IndexSpec("ivf", {"nlist": 16, "nprobe": 1, "on_disk": True})


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    """The same database twice: exact index in memory, and IVF-fp16 lists forced onto disk."""
    root = tmp_path_factory.mktemp("scale")
    memory = build_database(SOURCE, "all", ProjectionEncoder(), root / "memory", **BUILD)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fi, "choose_index", on_disk_spec)
        disk = build_database(SOURCE, "all", ProjectionEncoder(), root / "disk", **BUILD)
    return Database.open(memory), Database.open(disk)


def test_memmapped_embeddings_equal_the_in_memory_values_bit_for_bit(dbs):
    db = dbs[0]
    assert len(db.manifest["shards"]) == 4  # 420 rows in shards of 128
    # the old Database.embeddings: every shard read into RAM and concatenated
    old = np.concatenate([np.load(db.root / s["file"]) for s in db.manifest["shards"]])
    view = db.embeddings
    assert isinstance(view, fi.ShardRows) and view.shape == old.shape and view.dtype == np.float16
    assert all(isinstance(db._shard(s), np.memmap) for s in range(4))  # read from the maps
    assert view[:].tobytes() == old.tobytes() and np.asarray(view).tobytes() == old.tobytes()
    rows = np.array([[419, 0], [128, 127], [5, 300]])  # across shard boundaries, unsorted
    assert view[rows].tobytes() == old[rows].tobytes()
    assert view[100:300:7].tobytes() == old[100:300:7].tobytes()
    assert db.vectors(rows).tobytes() == old[rows].astype(np.float32).tobytes()


def test_training_sample_is_random_not_the_first_rows(monkeypatch):
    rows = fi.training_rows(10_000, 500, seed=0)
    assert len(np.unique(rows)) == 500 and (np.diff(rows) > 0).all()
    assert not np.array_equal(rows, np.arange(500)) and rows.max() > 9_000  # spread over all
    assert np.array_equal(rows, fi.training_rows(10_000, 500, seed=0))
    assert not np.array_equal(rows, fi.training_rows(10_000, 500, seed=1))
    # the index is trained on exactly those rows: the quantizer equals k-means on them
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((12_000, 8)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xb[:4000] = xb[0]  # the first rows alone are one point: a first-rows sample would collapse
    spec = fi.IndexSpec(
        "ivfpq", {"nlist": 20, "m": 2, "nprobe": 4, "refine": "fp16", "k_factor": 4}
    )
    index = fi.build_index(xb, spec, seed=3)
    sample = xb[fi.training_rows(len(xb), fi.training_size(len(xb), 20), 3)]
    assert len(sample) == 10_000
    reference = faiss.index_factory(8, spec.factory(8), faiss.METRIC_INNER_PRODUCT)
    ivf = fi._ivf_of(reference)
    ivf.do_polysemous_training = False
    ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = 10, 64
    ivf.cp.seed = ivf.pq.cp.seed = 3
    reference.train(sample)
    centroids = fi._ivf_of(index).quantizer.reconstruct_n(0, 20)
    expected = ivf.quantizer.reconstruct_n(0, 20)
    np.testing.assert_array_equal(centroids, expected)


def test_on_disk_index_is_memory_mapped_and_recorded(dbs):
    import faiss

    db = dbs[1]
    info = db.manifest["index"]
    assert info["type"] == "ivf" and info["on_disk"] and info["factory"] == "IVF16,SQfp16"
    assert (db.root / info["data_file"]).stat().st_size >= db.count * (2 * db.dim + 8)
    assert info["training"] == {"rows": 420, "seed": 0, "sample": "uniform without replacement"}
    assert info["recall_at_k"] >= fi.TARGET_RECALL and info["params"]["nprobe"] > 1  # tuned
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(db.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    assert db.index.ntotal == db.count
    # float16 codes of the vectors themselves: probing every cell is exact search
    faiss.extract_index_ivf(db.index).nprobe = 16
    xq = db.vectors(np.arange(0, 420, 7))
    D, _ = db.search(xq, 4)
    D_ref, _ = dbs[0].search(xq, 4)
    np.testing.assert_allclose(D, D_ref, atol=1e-6)
    db.__dict__.pop("index")  # reopen with the tuned nprobe


def test_on_disk_neighbours_match_in_memory_within_the_recorded_recall(dbs, tmp_path):
    memory, disk = dbs
    exact = load_neighbors(
        compute_neighbors(
            memory, SOURCE, "train", ProjectionEncoder(), out=tmp_path / "m.st", **NEIGHBOURS
        )
    )
    approx = load_neighbors(
        compute_neighbors(
            disk, SOURCE, "train", ProjectionEncoder(), out=tmp_path / "d.st", **NEIGHBOURS
        )
    )
    np.testing.assert_array_equal(exact.query_ids, approx.query_ids)
    found = np.mean(
        [len(set(a) & set(b)) / 4 for a, b in zip(exact.nn_rows, approx.nn_rows, strict=True)]
    )
    recorded = disk.manifest["index"]["recall_by_k"]["4"]
    assert found >= recorded - 0.05  # other queries than the tuning ones: a margin
    # whatever the index found is scored exactly (float16 codes): no score is above the truth
    assert (approx.nn_scores <= exact.nn_scores[:, :1] + 1e-6).all()


def mapped_kb(lists) -> int:
    """Resident kB of faiss's mapping of on-disk ``lists`` in this process (/proc/self/smaps)."""
    start, inside = int(lists.ptr), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:  # a mapping's header line: its address range
                inside = int(head.split("-")[0], 16) == start
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("the lists are not mapped")


def test_on_disk_lists_are_faiss_own_and_searching_them_stays_unmapped(tmp_path, monkeypatch):
    """The lists written with pwrite hold, cell by cell, the codes and ids faiss's own add
    stores; searching releases the pages it touched, so the process never holds the file."""
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((3000, 64)).astype(np.float32)
    xb = (xb / np.linalg.norm(xb, axis=1, keepdims=True)).astype(np.float16)
    spec = fi.IndexSpec("ivf", {"nlist": 8, "nprobe": 8, "on_disk": True})
    data = tmp_path / "index.faiss.ivfdata"
    index = fi.build_index(xb, spec, seed=1, data_path=data, chunk=1024)  # 3 chunks
    reference = fi.build_index(xb, fi.IndexSpec("ivf", {"nlist": 8, "nprobe": 8}), seed=1)
    ours = faiss.downcast_InvertedLists(fi._ivf_of(index).invlists)
    theirs = fi._ivf_of(reference).invlists
    assert isinstance(ours, faiss.OnDiskInvertedLists) and index.ntotal == 3000
    for c in range(8):
        n = theirs.list_size(c)
        assert ours.list_size(c) == n > 0
        codes = faiss.rev_swig_ptr(theirs.get_codes(c), n * index.code_size).tobytes()
        ids = faiss.rev_swig_ptr(theirs.get_ids(c), n).tobytes()
        assert faiss.rev_swig_ptr(ours.get_codes(c), n * index.code_size).tobytes() == codes
        assert faiss.rev_swig_ptr(ours.get_ids(c), n).tobytes() == ids
    assert data.stat().st_size == 3000 * (index.code_size + 8)

    fi.save_index(index, tmp_path / "index.faiss")
    loaded = fi.load_index(tmp_path / "index.faiss", spec)
    monkeypatch.setattr(fi, "ON_DISK_SEARCH_BYTES", 1)  # release after every query
    D, _ = fi.search(loaded, xb[:50], 5)  # nprobe = nlist: every page of the file is read
    D_ref, _ = fi.exact_search(xb, xb[:50], 5)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)
    lists = fi.on_disk_lists(loaded)
    assert lists.read_only and mapped_kb(lists) <= 8  # ~400 kB were read; ≤ 2 pages resident
    loaded.search(fi._f32(xb[:50]), 5)  # faiss's own search alone leaves all of it resident
    assert mapped_kb(lists) > 300
    # a bound below one query's 8 probed cells: cells scanned in groups, the groups merged
    fi.release_lists(lists)
    monkeypatch.setattr(fi, "ON_DISK_SEARCH_BYTES", 2 * lists.totsize // 8)  # 2 cells a call
    D2, I2 = fi.search(loaded, xb[:50], 5)
    np.testing.assert_allclose(D2, D_ref, atol=1e-5)
    np.testing.assert_array_equal(D2, D)
    assert mapped_kb(lists) <= 8
