"""Database build / open / search / verify with a tiny in-memory source and a projection encoder;
resume after a simulated crash; bad images; refusal of mismatched rebuilds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource

from rdm import database as dbm
from rdm import db_build
from rdm import index as fi
from rdm.database import Database, DatabaseError, verify
from rdm.db_build import build_database
from rdm.errors import IdentityMismatch

BUILD = {"batch_size": 4, "shard_size": 8, "progress": False}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("db") / "db"
    return build_database(TinySource(50, bad={3, 17}), "all", ProjectionEncoder(), root, **BUILD)


def test_round_trip_build_open_search(built):
    db = Database.open(built)
    src, enc = TinySource(50, bad={3, 17}), ProjectionEncoder()
    expected_ids = [i for i in range(50) if i not in (3, 17)]
    assert db.count == len(db) == 48 and db.dim == 16
    np.testing.assert_array_equal(db.ids, expected_ids)
    assert db.keys[3] == "img/0004.png" and db.captions[3] == "item 4"  # id 3 was skipped
    assert db.embeddings.dtype == np.float16 and db.embeddings.shape == (48, 16)
    # rows hold the encoder's embeddings of their ids, in id order
    want = enc.encode_images([src.load(i) for i in expected_ids])
    np.testing.assert_allclose(db.vectors(np.arange(48)), want, atol=2e-3)
    assert db.vectors([[0, 1], [2, 3]]).shape == (2, 2, 16)
    # search agrees with brute force over the stored vectors; each row finds itself first
    xb = db.vectors(np.arange(48))
    D, I = db.search(xb, 5)
    xq = xb / np.linalg.norm(xb, axis=1, keepdims=True)  # search renormalises queries
    ref_D, _ = fi.exact_search(xb, xq, 5)
    np.testing.assert_allclose(D, ref_D, atol=1e-5)
    np.testing.assert_array_equal(I[:, 0], np.arange(48))
    assert db.identity == enc.identity and len(db.fingerprint) == 16
    assert verify(built) == []


def test_manifest_follows_the_contract(built):
    m = json.loads((built / "manifest.json").read_text())
    assert m["format"] == "rdm-db/1" and m["count"] == 48 and m["skipped"] == 2
    assert {"spec", "split", "rule", "db_fraction"} <= set(m["source"])
    assert {"type", "params", "file", "sha256", "recall_at_k", "k", "measured_on"} <= set(
        m["index"]
    )
    assert m["index"]["type"] == "flat" and m["index"]["recall_at_k"] == 1.0
    assert sum(s["rows"] for s in m["shards"]) == 48
    assert m["checksum"] == dbm.checksum_of(m["shards"])
    assert m["fingerprint"] == dbm.fingerprint_of(m["identity"])
    assert not (built / "_build").exists()


def test_metadata_split_column_tells_train_from_db(built):
    db = Database.open(built)
    src = TinySource(50)
    splits = db.metadata.column("split").to_pylist()
    train = set(src.split_ids("train").tolist())
    assert all((s == "train") == (i in train) for s, i in zip(splits, db.ids, strict=True))
    assert set(splits) == {"train", "db"}


def test_bad_images_are_skipped_with_reasons_and_ids_kept(built):
    lines = (built / "skipped.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in lines]
    assert skipped == [
        {"id": 3, "key": "img/0003.png", "reason": "corrupt test image"},
        {"id": 17, "key": "img/0017.png", "reason": "corrupt test image"},
    ]
    db = Database.open(built)
    assert db.rows_of([4, 18]).tolist() == [3, 16]  # later ids keep their own id
    with pytest.raises(DatabaseError, match="id 3 is not in the database"):
        db.rows_of([3])


def test_resume_after_a_crash_equals_an_unbroken_build(tmp_path, built):
    src = TinySource(50, bad={3, 17})
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_database(src, "all", ProjectionEncoder(fail_after=5), tmp_path / "db", **BUILD)
    assert not (tmp_path / "db" / "manifest.json").exists()
    finished = sorted(p.name for p in (tmp_path / "db" / "_build").glob("shard-*.json"))
    assert finished == ["shard-00000.json", "shard-00001.json"]  # 2 shards of 2 batches each
    with pytest.raises(DatabaseError, match="incomplete build.*rerun 'rdm db build fake:tiny"):
        Database.open(tmp_path / "db")

    encoder = ProjectionEncoder()
    build_database(src, "all", encoder, tmp_path / "db", **BUILD)
    assert encoder.calls == 13 - 4  # 13 batches in all; the 4 of the finished shards not redone
    a, b = Database.open(tmp_path / "db"), Database.open(built)
    assert a.embeddings.tobytes() == b.embeddings.tobytes()
    assert a.metadata.equals(b.metadata)
    assert a.fingerprint == b.fingerprint
    assert (tmp_path / "db" / "skipped.jsonl").read_bytes() == (
        built / "skipped.jsonl"
    ).read_bytes()
    assert verify(tmp_path / "db") == []


def test_crash_while_finishing_also_resumes(tmp_path, monkeypatch):
    src, enc = TinySource(20), ProjectionEncoder()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(db_build, "_build_and_save_index", crash)
    with pytest.raises(KeyboardInterrupt):
        build_database(src, "all", enc, tmp_path / "db", **BUILD)
    assert list((tmp_path / "db" / "embeddings").glob("*.npy"))  # shards already moved
    monkeypatch.undo()
    build_database(src, "all", enc, tmp_path / "db", **BUILD)
    assert verify(tmp_path / "db") == [] and Database.open(tmp_path / "db").count == 20


def test_rerun_of_a_complete_build_says_so(built, capsys):
    before = (built / "manifest.json").read_bytes()
    build_database(TinySource(50, bad={3, 17}), "all", ProjectionEncoder(), built, **BUILD)
    assert "already holds this database" in capsys.readouterr().err
    assert (built / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    "source, split, encoder, message",
    [
        (
            TinySource(50, name="other"),
            "all",
            ProjectionEncoder(),
            "source spec 'fake:tiny' -> 'fake:other'",
        ),
        (TinySource(50), "train", ProjectionEncoder(), "source split 'all' -> 'train'"),
        (TinySource(50), "all", ProjectionEncoder(seed=1), "encoder fake-projection"),
        (TinySource(51), "all", ProjectionEncoder(), "items changed"),
    ],
)
def test_a_different_build_into_a_complete_database_is_refused(
    built, source, split, encoder, message
):
    with pytest.raises(
        DatabaseError, match=f"complete database built with other options.*{message}"
    ):
        build_database(source, split, encoder, built, **BUILD)


def test_a_different_build_into_a_partial_build_is_refused(tmp_path):
    with pytest.raises(RuntimeError):
        build_database(
            TinySource(30), "all", ProjectionEncoder(fail_after=2), tmp_path / "d", **BUILD
        )
    with pytest.raises(DatabaseError, match="partial build made with other options.*encoder"):
        build_database(TinySource(30), "all", ProjectionEncoder(seed=3), tmp_path / "d", **BUILD)
    with pytest.raises(DatabaseError, match="shard size 8 -> 16"):
        build_database(
            TinySource(30),
            "all",
            ProjectionEncoder(),
            tmp_path / "d",
            **{**BUILD, "shard_size": 16},
        )


def test_a_directory_with_other_files_is_never_used(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatabaseError, match="not an empty directory"):
        build_database(TinySource(10), "all", ProjectionEncoder(), tmp_path, **BUILD)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_split_with_no_readable_image_is_refused(tmp_path):
    with pytest.raises(DatabaseError, match="no image of fake:tiny split 'all' could be used"):
        build_database(
            TinySource(5, bad=range(5)), "all", ProjectionEncoder(), tmp_path / "d", **BUILD
        )


def test_open_errors_name_the_directory(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist; build one with"):
        Database.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatabaseError, match="is a file"):
        Database.open(tmp_path / "file")
    with pytest.raises(DatabaseError, match="not an rdm database"):
        Database.open(tmp_path)


def test_search_rejects_bad_k_and_dimension(built):
    db = Database.open(built)
    for k in (0, -1, 49):
        with pytest.raises(DatabaseError, match=r"k must lie in 1\.\.48"):
            db.search(db.vectors([0]), k)
    with pytest.raises(DatabaseError, match="dimension 8 but database"):
        db.search(np.ones((1, 8), np.float32), 3)
    with pytest.raises(DatabaseError, match="rows must lie in"):
        db.vectors([48])


def test_verify_detects_tampering(tmp_path):
    root = build_database(TinySource(30), "all", ProjectionEncoder(), tmp_path / "d", **BUILD)
    shard = root / "embeddings" / "shard-00001.npy"
    emb = np.load(shard)
    emb[0] = -emb[0]
    np.save(shard, emb)
    index = root / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    problems = verify(root)
    assert any("shard-00001.npy does not match its checksum" in p for p in problems)
    assert any("index" in p and "truncated" in p for p in problems)
    np.save(shard, np.zeros_like(emb))
    assert any("not unit norm" in p for p in verify(root))
    (root / "metadata.parquet").write_bytes(b"junk")
    assert any("metadata.parquet does not match its checksum" in p for p in verify(root))


def test_verify_of_something_that_is_not_a_database(tmp_path):
    assert "not an rdm database" in verify(tmp_path)[0]


def test_large_database_gets_a_tuned_approximate_index(tmp_path, monkeypatch):
    monkeypatch.setattr(fi, "EXACT_MAX_N", 50)
    root = build_database(
        TinySource(300), "all", ProjectionEncoder(), tmp_path / "d", **BUILD, memory_budget=1e9
    )
    m = Database.open(root).manifest["index"]
    assert m["type"] == "hnsw" and m["k"] == 4 and set(m["recall_by_k"]) == {"4", "20"}
    assert m["recall_at_k"] == m["recall_by_k"]["4"] >= fi.TARGET_RECALL
    assert "own row" in m["measured_on"]
    db = Database.open(root)
    D, I = db.search(db.vectors(np.arange(10)), 1)
    np.testing.assert_array_equal(I[:, 0], np.arange(10))
    assert verify(root) == []


def test_database_pairing_guards(built, tmp_path):
    db = Database.open(built)
    other = Database.open(
        build_database(TinySource(12), "all", ProjectionEncoder(seed=7), tmp_path / "o", **BUILD)
    )
    same = Database.open(
        build_database(TinySource(12), "all", ProjectionEncoder(), tmp_path / "s", **BUILD)
    )
    db.require_compatible(same)
    db.require_encoder(ProjectionEncoder())
    with pytest.raises(IdentityMismatch, match=f"database {built}.*database {tmp_path / 'o'}"):
        db.require_compatible(other)
    with pytest.raises(IdentityMismatch, match="the query encoder"):
        db.require_encoder(ProjectionEncoder(seed=7))
