"""The inference pipeline end to end: a tiny encoder saved to disk, a folder source split into a
database and a training set, neighbours, a few training steps, then every sampling mode, the
database swap guard and save/from_pretrained — through the library and through ``rdm sample``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from test_db_cli import colour_squares, tiny_encoder_dir

from rdm.cli import main
from rdm.config import preset
from rdm.data import open_source
from rdm.database import Database, build_database
from rdm.encoders import load_encoder
from rdm.errors import IdentityMismatch, RdmError
from rdm.neighbors import compute_neighbors, load_neighbors
from rdm.pipeline import RDMPipeline
from rdm.train import RetrievalDataset, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    images = colour_squares(root / "images", 40, size=12)
    enc_dir = tiny_encoder_dir(root / "enc", seed=0)
    encoder = load_encoder(str(enc_dir))
    source = open_source(str(images))
    db_dir = build_database(source, "db", encoder, root / "db", progress=False)
    db = Database.open(db_dir)
    nn_path = compute_neighbors(db, source, "train", encoder, k=6, progress=False)

    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, context_dim=db.dim, k=3)
    cfg.train = dataclasses.replace(cfg.train, steps=3, checkpoint_every=3)
    dataset = RetrievalDataset(
        source, "train", db, load_neighbors(nn_path), k=3, resolution=cfg.model.resolution
    )
    for key, value in dataset.provenance().items():
        setattr(cfg, key, value)
    cfg.data = dataclasses.replace(
        cfg.data, source=source.spec, db=str(db_dir), neighbors=str(nn_path)
    )
    train(cfg, root / "run", dataset, progress=False)
    return {"root": root, "images": images, "enc": enc_dir, "db": db_dir, "run": root / "run"}


@pytest.fixture(scope="module")
def pipe(world):
    return RDMPipeline.from_pretrained(world["run"], world["db"])


def test_every_mode_gives_contexts_of_the_right_shape(pipe, world):
    d = pipe.db.dim
    query = Image.open(world["images"] / "00.png")
    assert pipe.image_context(query, 2).context.shape == (2, 3, d)
    with_query = pipe.image_context(query, 2, include_query=True)
    assert with_query.context.shape == (2, 3, d) and len(with_query.rows[0]) == 2
    assert pipe.text_context("a red square", 2).context.shape == (2, 3, d)
    assert pipe.text_context("a red square", 2, mode="text+neighbors").context.shape == (2, 3, d)
    assert pipe.text_context("a red square", 2, mode="text").context.shape == (2, 1, d)
    pool = pipe.class_pool_context("a red square", 5, pool_size=6, seed=1)
    assert pool.context.shape == (5, 3, d)
    assert len({tuple(r) for r in pool.rows}) > 1  # k drawn at random per sample


def test_image_query_retrieves_its_own_colour(pipe, world):
    cond = pipe.image_context(Image.open(world["images"] / "01.png"), 1)  # a green square
    captions = [pipe.db.captions[r] for r in cond.rows[0]]
    assert captions.count("a green square") >= 2


def test_pseudo_queries_follow_p_and_top_m(pipe):
    p = pipe.pseudo_query_prob
    assert p is not None and np.isclose(p.sum(), 1.0)
    cond = pipe.pseudo_query_context(50, top_m=0.01, seed=0)
    best = int(np.argmax(p))
    # top-m keeps at least one item: the most probable one, which is its own first neighbour
    assert all(rows[0] == best for rows in cond.rows)
    weighted = pipe.pseudo_query_context(200, weighted=True, seed=0)
    firsts = {rows[0] for rows in weighted.rows}
    assert firsts <= set(np.flatnonzero(p > 0).tolist())


def test_samples_depend_only_on_their_seed(pipe):
    cond = pipe.pseudo_query_context(3, seed=0)
    kw = dict(steps=3, sampler="ddim", eta=1.0, guidance_scale=2.0, progress=False)
    batch = pipe(cond, [7, 8, 9], batch_size=3, **kw)
    alone = pipe(dataclasses.replace(cond, context=cond.context[1:2]), [8], **kw)
    assert np.array_equal(np.asarray(batch[1]), np.asarray(alone[0]))
    assert batch[0].size == (8, 8)
    dpm = pipe(cond, [7, 8, 9], steps=3, sampler="dpm++", progress=False)
    assert len(dpm) == 3


def test_swapping_in_a_database_of_another_encoder_is_refused(world, tmp_path):
    other = load_encoder(str(tiny_encoder_dir(tmp_path / "other", seed=1)))
    other_db = build_database(
        open_source(str(world["images"])), "db", other, tmp_path / "db2", progress=False
    )
    with pytest.raises(IdentityMismatch) as err:
        RDMPipeline.from_pretrained(world["run"], other_db)
    assert str(other_db) in str(err.value) and str(world["run"]) in str(err.value)


def test_swapping_in_a_database_of_the_same_encoder_works(world, tmp_path):
    encoder = load_encoder(str(world["enc"]))
    swapped = build_database(
        open_source(str(world["images"])), "all", encoder, tmp_path / "all", progress=False
    )
    pipe = RDMPipeline.from_pretrained(world["run"], swapped)
    assert len(pipe.db) == 40 and pipe.pseudo_query_prob is None
    with pytest.raises(RdmError, match="rdm db neighbors"):
        pipe.pseudo_query_context(2)
    assert pipe.pseudo_query_context(2, uniform=True).context.shape == (2, 3, pipe.db.dim)


def test_save_pretrained_round_trip(pipe, world, tmp_path):
    out = pipe.save_pretrained(tmp_path / "saved")
    again = RDMPipeline.from_pretrained(out, world["db"])
    for a, b in zip(
        pipe.model.state_dict().values(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_cli_sample_writes_pngs_and_a_grid(world, tmp_path, capsys):
    base = ["sample", str(world["run"]), "--db", str(world["db"]), "-n", "2", "--steps", "2"]
    for i, mode in enumerate(
        (
            ["--image", str(world["images"] / "03.png")],
            ["--text", "a blue square", "--text-mode", "text"],
            ["--unconditional", "--top-m", "0.5"],
            ["--class-pool", "a grey square", "--pool-size", "5"],
        )
    ):
        out = tmp_path / f"out{i}"
        assert main([*base, *mode, "--out", str(out)]) == 0
        assert (out / "grid.png").is_file() and len(list(out.glob("sample-*.png"))) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "missing.png"], "missing.png"),
        (["--image", "."], "is a directory"),
        (["--text", "  "], "empty"),
        (["--class-pool", "x", "--pool-size", "1"], "--pool-size"),
        (["--unconditional", "--top-m", "2"], "--top-m"),
    ],
)
def test_cli_bad_input_gets_a_clear_error(world, tmp_path, capsys, extra, message):
    args = ["sample", str(world["run"]), "--db", str(world["db"]), "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_run_directory_that_is_not_one(world, tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--unconditional", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
