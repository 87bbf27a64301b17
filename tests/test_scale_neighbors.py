"""Training neighbours in resumable blocks: several blocks give the bytes of one, a run that fails
mid-way resumes from its finished blocks (never recomputing them) to the bytes of an unbroken run,
and a partial run made with other options is refused."""

from __future__ import annotations

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource

from rdm import neighbors as nbm
from rdm.database import Database, build_database

SOURCE = TinySource(60, bad={7}, copies={41: 5, 42: 6})
OPTIONS = {"k": 5, "k_p": 2, "exclude_threshold": 0.9, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks") / "all"
    build = {"batch_size": 8, "shard_size": 16, "progress": False}
    return Database.open(build_database(SOURCE, "all", ProjectionEncoder(), root, **build))


@pytest.fixture(scope="module")
def one_block(db, tmp_path_factory):
    """The reference: every query in one block."""
    out = tmp_path_factory.mktemp("one") / "n.safetensors"
    nbm.compute_neighbors(db, SOURCE, "train", ProjectionEncoder(), out=out, **OPTIONS)
    return out.read_bytes()


def test_blocks_give_the_bytes_of_one_block(db, one_block, tmp_path):
    out = tmp_path / "n.safetensors"
    nbm.compute_neighbors(
        db, SOURCE, "train", ProjectionEncoder(), out=out, block_size=7, **OPTIONS
    )
    assert out.read_bytes() == one_block
    assert not (tmp_path / "n.safetensors.partial").exists()  # removed once joined


class BatchMixingEncoder(ProjectionEncoder):
    """The projection plus a little of its batch's mean: what a row gets depends on its batch
    (as an encoder's last bits can), so only identical batches give identical bytes."""

    def encode_images(self, images) -> np.ndarray:
        z = super().encode_images(images)
        z = z + 0.05 * z.mean(axis=0, keepdims=True)
        return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_blocks_hold_whole_batches(db, tmp_path):
    """A block size that is not a multiple of the batch size is rounded up to one, so the blocks
    encode the batches of one unbroken pass (6 with batches of 4 would split a batch)."""
    ref = tmp_path / "one.safetensors"
    nbm.compute_neighbors(db, SOURCE, "train", BatchMixingEncoder(), out=ref, **OPTIONS)
    out = tmp_path / "blocks.safetensors"
    nbm.compute_neighbors(
        db, SOURCE, "train", BatchMixingEncoder(), out=out, block_size=6, **OPTIONS
    )
    assert out.read_bytes() == ref.read_bytes()


def test_a_failed_run_resumes_to_identical_bytes(db, one_block, tmp_path, monkeypatch):
    out = tmp_path / "n.safetensors"
    real, calls, armed = nbm._neighbours, [], [True]

    def failing(*args, **kwargs):
        calls.append(len(args[1]))
        if armed[0] and len(calls) == 6:  # block 2 of 8-query blocks in batches of 4: mid-block
            armed[0] = False
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(nbm, "_neighbours", failing)
    with pytest.raises(RuntimeError, match="killed"):
        nbm.compute_neighbors(
            db, SOURCE, "train", ProjectionEncoder(), out=out, block_size=8, **OPTIONS
        )
    partial = tmp_path / "n.safetensors.partial"
    assert sorted(p.name for p in partial.glob("block-*")) == ["block-00000.npz", "block-00001.npz"]
    assert not out.exists()

    calls.clear()
    plan = nbm.plan_neighbors(
        db, SOURCE, "train", ProjectionEncoder(), 5, 2, 0.9, 4, out, block_size=8
    )
    assert plan.pending()[0] == 2
    nbm.compute_neighbors(
        db, SOURCE, "train", ProjectionEncoder(), out=out, block_size=8, **OPTIONS
    )
    assert out.read_bytes() == one_block
    # the finished blocks were not recomputed: only the queries of blocks 2.. were searched
    query_ids = nbm.load_neighbors(out).query_ids
    first_two = SOURCE.split_ids("train", 0.5)[:16]
    assert sum(calls) == len(query_ids) - np.isin(query_ids, first_two).sum()


def test_a_partial_run_with_other_options_is_refused(db, tmp_path, monkeypatch):
    out = tmp_path / "n.safetensors"
    monkeypatch.setattr(nbm, "finish_neighbors", lambda db, plan: None)  # stop before joining
    nbm.compute_neighbors(
        db, SOURCE, "train", ProjectionEncoder(), out=out, block_size=7, **OPTIONS
    )
    with pytest.raises(nbm.NeighborsError, match=r"other options \(k differ\).*delete"):
        nbm.compute_neighbors(
            db, SOURCE, "train", ProjectionEncoder(), out=out, block_size=7, **{**OPTIONS, "k": 4}
        )
    with pytest.raises(nbm.NeighborsError, match="exclude_threshold"):
        nbm.compute_neighbors(
            db, SOURCE, "train", ProjectionEncoder(), out=out, block_size=7,
            **{**OPTIONS, "exclude_threshold": 0.8},
        )  # fmt: skip


def test_a_block_is_idempotent(db, tmp_path, monkeypatch):
    out = tmp_path / "n.safetensors"
    plan = nbm.plan_neighbors(
        db, SOURCE, "train", ProjectionEncoder(), 5, 2, 0.9, 4, out, block_size=7
    )
    first = nbm.neighbor_block(db, SOURCE, ProjectionEncoder(), plan, 1).read_bytes()
    nbm.neighbor_block(db, SOURCE, ProjectionEncoder(), plan, 1)  # done: left as it is
    plan.block_path(1).unlink()
    again = nbm.neighbor_block(db, SOURCE, ProjectionEncoder(), plan, 1).read_bytes()
    assert again == first and plan.pending() == [b for b in range(len(plan.blocks)) if b != 1]
