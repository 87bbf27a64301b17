"""Training neighbours: self, exact-duplicate and near-duplicate exclusion (also across splits that
are disjoint by construction) against a brute-force reference with counts, the derived or given
threshold recorded, exactly k per query, p(x̃) against a brute-force count, file round trip,
guards (unwritable output before work, database without content hashes, old files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource
from PIL import Image

from rdm import index as fi
from rdm.database import Database, build_database
from rdm.embedding import content_hash
from rdm.errors import IdentityMismatch
from rdm.neighbors import (
    NeighborsError,
    compute_neighbors,
    load_neighbors,
    pseudo_query_distribution,
)

BUILD = {"batch_size": 8, "shard_size": 16, "progress": False}
# ids 41 and 42 repeat the images of 5 and 6: near-duplicates inside one source
SOURCE = TinySource(60, bad={7}, copies={41: 5, 42: 6})


@pytest.fixture(scope="module")
def db_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("n") / "all"
    return Database.open(build_database(SOURCE, "all", ProjectionEncoder(), root, **BUILD))


@pytest.fixture(scope="module")
def db_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("n") / "db"
    return Database.open(build_database(SOURCE, "db", ProjectionEncoder(), root, **BUILD))


def run(db: Database, tmp_path, source=SOURCE, split="train", **kwargs):
    """Neighbours of ``source``'s ``split`` in ``db``, written to and read back from tmp_path."""
    kwargs = {"out": tmp_path / "n.safetensors", "progress": False, **kwargs}
    return load_neighbors(compute_neighbors(db, source, split, ProjectionEncoder(), **kwargs))


def brute_force(db: Database, source, ids, k, threshold):
    """Reference: rank all rows exactly per query and walk down, skipping the query's own row
    (same source and id), rows with its content hash and rows with cosine > ``threshold``.
    Returns rows (N, k), scores (N, k) and the exclusions {self, exact, near} among the
    candidates ranked above each query's k-th kept one."""
    images = [source.load(int(i)) for i in ids]
    z = ProjectionEncoder().encode_images(images)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    D, I = fi.exact_search(db.vectors(np.arange(db.count)), z, db.count)
    same_source = db.source_spec == source.spec
    rows, scores, counts = [], [], {"self": 0, "exact": 0, "near": 0}
    for q, i in enumerate(ids):
        kept = []
        for r, d in zip(I[q], D[q], strict=True):
            if len(kept) == k:
                break
            if same_source and db.ids[r] == i:
                counts["self"] += 1
            elif db.content_hashes[r] == content_hash(images[q]):
                counts["exact"] += 1
            elif d > threshold:
                counts["near"] += 1
            else:
                kept.append((r, d))
        rows.append([r for r, _ in kept])
        scores.append([d for _, d in kept])
    return np.array(rows), np.array(scores), counts


def assert_same_neighbours(nb, reference, atol=1e-5):
    """Scores agree; rows may differ only among ties with the k-th score (exact duplicates)."""
    ref_rows, ref_scores = reference[:2]
    np.testing.assert_allclose(nb.nn_scores, ref_scores, atol=atol)
    for q in range(len(ref_rows)):
        above = ref_scores[q] > ref_scores[q][-1] + atol
        assert set(nb.nn_rows[q][above]) == set(ref_rows[q][above])


def assert_counts(nb, counts):
    ex = nb.meta["exclusion"]
    assert (
        ex["excluded_self"],
        ex["excluded_exact_duplicates"],
        ex["excluded_near_duplicates"],
    ) == (counts["self"], counts["exact"], counts["near"])


def test_overlapping_split_excludes_self_and_duplicates(db_all, tmp_path):
    nb = run(db_all, tmp_path, k=5, k_p=2)
    train = SOURCE.split_ids("train")
    readable = train[train != 7]
    np.testing.assert_array_equal(nb.query_ids, readable)
    assert nb.nn_rows.shape == (len(readable), 5)
    # never the query itself, never a copy of it (41 <-> 5, 42 <-> 6)
    assert not np.any(nb.nn_ids == nb.query_ids[:, None])
    copies = {(5, 41), (41, 5), (6, 42), (42, 6)}
    assert not any(
        (q, n) in copies for q, row in zip(nb.query_ids, nb.nn_ids, strict=True) for n in row
    )
    ex = nb.meta["exclusion"]
    assert ex["enabled"] and ex["threshold_from"] == "derived" and ex["content_hashes"]
    reference = brute_force(db_all, SOURCE, readable, 5, ex["threshold"])
    assert_same_neighbours(nb, reference)
    assert_counts(nb, reference[2])
    np.testing.assert_array_equal(nb.nn_ids, db_all.ids[nb.nn_rows])
    assert np.all(np.diff(nb.nn_scores, axis=1) <= 1e-6)  # best first
    assert ex["excluded_self"] == len(readable)  # every query is in an "all" database
    # the copies are pixel-identical: caught by the content hash, not by cosine
    assert ex["excluded_exact_duplicates"] == len({5, 6, 41, 42} & set(readable.tolist()))
    assert ex["excluded_near_duplicates"] == 0  # seeded noise images: nothing else is a copy
    assert ex["candidates_kept"] == 5 * len(readable)
    assert ex["excluded_share"] == pytest.approx(ex["excluded_exact_duplicates"] / (5 * 34))
    skipped = (
        [{"id": 7, "key": "img/0007.png", "reason": "corrupt test image"}] if 7 in train else []
    )
    assert nb.meta["queries"]["skipped"] == skipped


def test_disjoint_splits_still_exclude_duplicates(db_split, tmp_path, capsys):
    """train and db share no id, but 41/42 repeat the pictures of 5/6: a copy across the split
    must not become a neighbour (before, nothing was checked for disjoint splits)."""
    nb = run(db_split, tmp_path, k=4)
    assert "share no item by construction, but may still share pictures" in capsys.readouterr().err
    ex = nb.meta["exclusion"]
    assert ex["enabled"] and ex["items_disjoint"]
    train = set(SOURCE.split_ids("train").tolist()) - {7}
    db = set(db_split.ids.tolist())
    crossing = [(q, c) for q, c in ((5, 41), (41, 5), (6, 42), (42, 6)) if q in train and c in db]
    assert crossing, "the fixture must put a copy on each side of the split"
    assert ex["excluded_self"] == 0
    assert ex["excluded_exact_duplicates"] == len(crossing)
    by_query = dict(zip(nb.query_ids.tolist(), nb.nn_ids.tolist(), strict=True))
    assert all(c not in by_query[q] for q, c in crossing)
    reference = brute_force(db_split, SOURCE, nb.query_ids, 4, ex["threshold"])
    assert_same_neighbours(nb, reference)
    assert_counts(nb, reference[2])
    assert not set(nb.nn_ids.ravel()) & train


def test_exclusion_searches_deeper_when_the_first_candidates_are_excluded(
    db_all, tmp_path, monkeypatch
):
    import rdm.neighbors as nbm

    # the first search returns exactly k candidates, so self must be replaced by a deeper search
    monkeypatch.setattr(nbm, "EXTRA", 0)
    nb = run(db_all, tmp_path, k=3, k_p=2)
    reference = brute_force(db_all, SOURCE, nb.query_ids, 3, nb.meta["exclusion"]["threshold"])
    assert_same_neighbours(nb, reference)
    assert_counts(nb, reference[2])


def test_user_threshold_overrides_and_is_recorded(db_all, tmp_path, capsys):
    nb = run(db_all, tmp_path, k=4, exclude_threshold=0.3)
    ex = nb.meta["exclusion"]
    assert ex["threshold"] == 0.3 and ex["threshold_from"] == "user" and ex["calibration"] is None
    assert np.all(nb.nn_scores <= 0.3)
    reference = brute_force(db_all, SOURCE, nb.query_ids, 4, 0.3)
    assert_same_neighbours(nb, reference)
    assert_counts(nb, reference[2])
    assert reference[2]["near"] > 0.01 * 4 * len(nb.query_ids)
    err = capsys.readouterr().err
    assert "given by --exclude-threshold" in err and "warning: exclusion removed" in err


def test_derived_threshold_is_recorded_with_its_calibration(db_all, tmp_path, capsys):
    from rdm.duplicates import TRANSFORMS

    nb = run(db_all, tmp_path, k=4)
    ex = nb.meta["exclusion"]
    cal = ex["calibration"]
    assert cal["threshold"] == ex["threshold"] and cal["seed"] == 0
    assert set(cal["copies"]["transforms"]) == set(TRANSFORMS) == {"jpeg", "resize", "shift"}
    assert cal["copies"]["sample"] == 34 and cal["distinct"]["sample"] == db_all.count
    assert ex["threshold"] == pytest.approx(
        max(cal["copy_low"], cal["distinct_high"] + cal["margin"])
    )
    assert "near-duplicate threshold" in capsys.readouterr().err
    # the same seed derives the same threshold
    again = run(db_all, tmp_path / "again", k=4).meta["exclusion"]
    assert again["threshold"] == ex["threshold"]


def test_database_without_content_hashes_is_named(db_split, tmp_path, capsys):
    db = Database.open(db_split.root)
    db.__dict__["content_hashes"] = None  # as a database built before rdm recorded them
    nb = run(db, tmp_path, k=4)
    err = capsys.readouterr().err
    assert f"warning: database {db.root} was built before rdm recorded content hashes" in err
    assert "rdm db build fake:tiny --split db" in err
    assert nb.meta["exclusion"]["content_hashes"] is False
    assert nb.meta["exclusion"]["excluded_exact_duplicates"] == 0


def test_unwritable_output_fails_before_any_encoding(db_split, tmp_path):
    from rdm.io import OutputError

    encoder = ProjectionEncoder()
    with pytest.raises(OutputError, match="cannot write neighbours file /proc/rdm-x/n.safetensors"):
        compute_neighbors(db_split, SOURCE, "train", encoder, out="/proc/rdm-x/n.safetensors")
    with pytest.raises(OutputError, match=f"neighbours file {tmp_path} is a directory"):
        compute_neighbors(db_split, SOURCE, "train", encoder, out=tmp_path)
    assert encoder.calls == 0  # refused before calibration or any query was encoded


def test_old_neighbours_files_still_load(tmp_path):
    """A file written before exclusion recorded kinds and calibration (same format string)."""
    from safetensors.numpy import save_file

    meta = {
        "format": "rdm-neighbors/1",
        "db_fingerprint": "0123456789abcdef",
        "encoder": ProjectionEncoder().identity,
        "queries": {"spec": "fake:tiny", "split": "train"},
        "k": 2,
        "k_p": 1,
        "exclusion": {"enabled": False, "threshold": 0.98, "excluded_self": 0},
    }
    tensors = {
        "query_ids": np.array([1, 2]),
        "nn_rows": np.array([[0, 1], [1, 0]]),
        "nn_ids": np.array([[3, 4], [4, 3]]),
        "nn_scores": np.array([[0.9, 0.8], [0.7, 0.6]], np.float32),
        "pq_counts": np.array([1, 1]),
        "pq_prob": np.array([0.5, 0.5]),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"meta": json.dumps(meta)})
    nb = load_neighbors(tmp_path / "old.safetensors")
    assert nb.k == 2 and nb.k_p == 1 and nb.meta["exclusion"]["threshold"] == 0.98
    np.testing.assert_array_equal(nb.nn_ids, tensors["nn_ids"])


def test_pseudo_query_distribution_matches_a_brute_force_count(db_all, tmp_path):
    nb = run(db_all, tmp_path, k=6, k_p=3)
    counts = np.zeros(db_all.count, np.int64)
    for row in nb.nn_rows:
        for r in row[:3]:
            counts[r] += 1
    np.testing.assert_array_equal(nb.pq_counts, counts)
    np.testing.assert_allclose(nb.pq_prob, counts / (3 * len(nb.query_ids)))
    assert nb.pq_prob.dtype == np.float64 and nb.pq_prob.sum() == pytest.approx(1.0, abs=1e-12)
    assert nb.k == 6 and nb.k_p == 3


def test_pseudo_query_distribution_formula():
    nn_rows = np.array([[0, 1, 2], [0, 2, 3]])
    pq = pseudo_query_distribution(nn_rows, 2, 5)
    np.testing.assert_array_equal(pq["pq_counts"], [2, 1, 1, 0, 0])
    np.testing.assert_allclose(pq["pq_prob"], [0.5, 0.25, 0.25, 0, 0])


def test_file_follows_the_contract(db_split, tmp_path):
    from safetensors.numpy import load_file

    meta = run(db_split, tmp_path, k=4).meta
    tensors = load_file(str(tmp_path / "n.safetensors"))
    assert {k: (v.dtype, v.ndim) for k, v in tensors.items()} == {
        "query_ids": (np.int64, 1),
        "nn_rows": (np.int64, 2),
        "nn_ids": (np.int64, 2),
        "nn_scores": (np.float32, 2),
        "pq_counts": (np.int64, 1),
        "pq_prob": (np.float64, 1),
    }
    assert meta["format"] == "rdm-neighbors/1" and meta["db_fingerprint"] == db_split.fingerprint
    assert meta["queries"]["spec"] == "fake:tiny" and meta["queries"]["split"] == "train"
    assert meta["encoder"] == ProjectionEncoder().identity and meta["k_p"] == 4
    ex = meta["exclusion"]
    assert ex["enabled"] is True and ex["threshold_from"] == "derived"
    assert 0 < ex["threshold"] <= 1 and ex["calibration"]["threshold"] == ex["threshold"]
    assert {"excluded_self", "excluded_exact_duplicates", "excluded_near_duplicates"} <= set(ex)


def test_default_path_is_inside_the_database(db_split):
    path = compute_neighbors(
        db_split, SOURCE, "train", ProjectionEncoder(), k=2, k_p=1, progress=False
    )
    assert path == db_split.root / "neighbors-train.safetensors" and path.is_file()


def test_guards(db_all, db_split, tmp_path):
    with pytest.raises(
        IdentityMismatch, match=f"database {db_all.root}.*query encoder fake-projection:9"
    ):
        compute_neighbors(db_all, SOURCE, "train", ProjectionEncoder(seed=9), progress=False)
    nb = run(db_split, tmp_path, k=2, k_p=1)
    nb.require_database(db_split)
    with pytest.raises(
        IdentityMismatch, match=f"fingerprint {db_split.fingerprint}.*{db_all.root}"
    ):
        nb.require_database(db_all)
    nb.require_encoder(ProjectionEncoder().identity, "the model")
    with pytest.raises(IdentityMismatch, match="but the model with fake-projection"):
        nb.require_encoder(ProjectionEncoder(seed=2).identity, "the model")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "-k must lie in 1.."),
        ({"k": 1000}, "-k must lie in 1.."),
        ({"k": 4, "k_p": 5}, "--k-p must lie in 1..k=4"),
        ({"exclude_threshold": 1.5}, "--exclude-threshold"),
        ({"batch_size": 0}, "--batch-size"),
    ],
)
def test_bad_arguments(db_all, kwargs, message):
    with pytest.raises(NeighborsError, match=message):
        compute_neighbors(db_all, SOURCE, "train", ProjectionEncoder(), progress=False, **kwargs)


def test_too_few_neighbours_left_after_exclusion_is_explained(tmp_path):
    src = TinySource(6, copies={i: 0 for i in range(6)})  # six copies of one image
    db = Database.open(build_database(src, "all", ProjectionEncoder(), tmp_path / "d", **BUILD))
    with pytest.raises(NeighborsError, match="fewer than k=2 database neighbours left"):
        compute_neighbors(db, src, "all", ProjectionEncoder(), k=2, k_p=1, progress=False)


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(NeighborsError, match="does not exist"):
        load_neighbors(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NeighborsError, match="cannot be read"):
        load_neighbors(tmp_path / "bad.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(NeighborsError, match="not an rdm neighbours file"):
        load_neighbors(tmp_path / "other.safetensors")


class GreyTinySource(TinySource):
    """TinySource's pictures with R = G = B (saved as RGB, as most grey datasets are)."""

    def load(self, i: int) -> Image.Image:
        return super().load(i).convert("L").convert("RGB")


def test_grey_training_images_are_recorded_and_pick_a_one_channel_model(db_split, tmp_path):
    from rdm.embedding import is_grey
    from rdm.train import default_image_channels

    colour = run(db_split, tmp_path, k=4)
    assert colour.meta["queries"]["grayscale"] is False and default_image_channels(colour) == 3
    grey = run(db_split, tmp_path, source=GreyTinySource(60, name="tiny"), k=4, out=tmp_path / "g")
    assert grey.meta["queries"]["grayscale"] is True and default_image_channels(grey) == 1
    one_coloured = Image.new("RGB", (4, 4), (9, 9, 9))
    assert is_grey(one_coloured) and is_grey(one_coloured.convert("L"))
    one_coloured.putpixel((3, 3), (9, 9, 10))
    assert not is_grey(one_coloured)
    del grey.meta["queries"]["grayscale"]  # files written before the flag: the source's word
    assert default_image_channels(grey) == 3
    assert default_image_channels(grey, GreyTinySource(60)) == 3  # it declares nothing
    declared = GreyTinySource(60)
    declared.grayscale = True
    assert default_image_channels(grey, declared) == 1
    assert default_image_channels(colour, declared) == 3  # what was seen wins
