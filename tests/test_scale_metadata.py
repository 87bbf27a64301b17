"""Metadata in bounded memory: the build writes metadata.parquet row group by row group from the
shard records (same table, same neighbours), content hashes are held as 64-bit codes with every
match confirmed on the full hash, and the neighbour path never reads the whole table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource

from rdm import db_build
from rdm.database import ContentHashes, Database, build_database, hash_codes
from rdm.neighbors import compute_neighbors, load_neighbors

SOURCE = TinySource(160, bad={7}, copies={41: 5, 42: 6, 100: 3})
BUILD = {"batch_size": 32, "shard_size": 64, "progress": False}
NEIGHBOURS = {"k": 5, "k_p": 2, "exclude_threshold": 0.95, "progress": False}


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    """The same database with metadata in one row group, and in row groups of 50 rows."""
    root = tmp_path_factory.mktemp("meta")
    one = build_database(SOURCE, "all", ProjectionEncoder(), root / "one", **BUILD)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(db_build, "METADATA_ROW_GROUP", 50)
        many = build_database(SOURCE, "all", ProjectionEncoder(), root / "many", **BUILD)
    return Database.open(one), Database.open(many)


def test_metadata_is_written_in_row_groups_with_the_same_table(dbs):
    one, many = dbs
    assert pq.ParquetFile(one.root / "metadata.parquet").num_row_groups == 1
    assert pq.ParquetFile(many.root / "metadata.parquet").num_row_groups == 4  # 159 rows / 50
    assert many.metadata.equals(one.metadata)
    table = one.metadata
    assert table.column("row").to_pylist() == list(range(159))
    assert 7 not in table.column("id").to_pylist()  # the unreadable image is skipped
    assert table.column("split").to_pylist() == [
        "train" if i in set(SOURCE.split_ids("train", 0.5)) else "db"
        for i in table.column("id").to_pylist()
    ]
    assert many.fingerprint == one.fingerprint and many.manifest["skipped"] == 1


def test_content_hashes_are_codes_of_the_full_hashes_read_by_row_group(dbs):
    one, many = dbs
    strings = np.asarray(one.metadata.column("content_hash").to_pylist(), dtype=object)
    hashes = many.content_hashes
    assert isinstance(hashes, ContentHashes) and len(hashes) == 159
    assert hashes.codes.dtype == np.uint64
    assert [int(c) for c in hashes.codes[:3]] == [int(h[:16], 16) for h in strings[:3]]
    rows = np.array([158, 0, 49, 50, 101])  # across row groups, unsorted
    assert hashes.strings(rows).tolist() == strings[rows].tolist()
    assert hashes[3] == strings[3] and (hashes[:, None] == strings[:, None]).all()
    row_of = {i: r for r, i in enumerate(one.ids)}
    # the copies share their original's hash; others do not
    assert hashes.same_as_rows(np.array([[row_of[5], row_of[6]]]), [row_of[41]]).tolist() == [
        [True, False]
    ]


def test_a_64_bit_coincidence_is_not_an_exact_duplicate(tmp_path):
    prefix = "ab" * 8  # the first 8 bytes, equal
    stored = [prefix + "11" * 8, prefix + "22" * 8, "", "00" * 16]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"content_hash": pa.array(stored, pa.string())}), str(path))
    hashes = ContentHashes(path, 4)
    assert hashes.codes.tolist() == [0xABABABABABABABAB, 0xABABABABABABABAB, 0, 1]
    rows = np.array([[0, 1, 2, 3]])
    assert hashes.matches(rows, [stored[1]]).tolist() == [[False, True, False, False]]
    assert hashes.matches(rows, [""]).tolist() == [[False] * 4]  # no hash matches nothing
    assert hashes.matches(rows, ["00" * 16]).tolist() == [[False, False, False, True]]
    assert hash_codes(["é"]).tolist() == hash_codes(["é"]).tolist() != [0]


def test_neighbours_read_no_whole_table_and_equal_across_row_groups(dbs, tmp_path):
    one, many = dbs
    fresh = Database.open(many.root)
    a = load_neighbors(
        compute_neighbors(
            one, SOURCE, "train", ProjectionEncoder(), out=tmp_path / "a", **NEIGHBOURS
        )
    )
    b = load_neighbors(
        compute_neighbors(
            fresh, SOURCE, "train", ProjectionEncoder(), out=tmp_path / "b", **NEIGHBOURS
        )
    )
    assert "metadata" not in fresh.__dict__  # ids and hashes were read as single columns
    for name in ("query_ids", "nn_rows", "nn_ids", "nn_scores", "pq_counts", "pq_prob"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    ex = b.meta["exclusion"]
    assert (
        ex["content_hashes"]
        and ex["excluded_exact_duplicates"] == a.meta["exclusion"]["excluded_exact_duplicates"] > 0
    )
