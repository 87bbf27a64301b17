"""Integrity of everything loaded (issue 6, parts 3 and 4): damaged database files and weights are
refused with one line naming the file and the fix; FAISS's -1 "no result" never becomes a row;
the fingerprint identifies a database's content (not its bytes, which differ between CPUs);
unwritable outputs are refused before any work, without a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fakes_retrieval import ProjectionEncoder, TinySource

from rdm import database as dbm
from rdm import index as fi
from rdm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_run,
    save_checkpoint,
    save_weights,
)
from rdm.cli import main
from rdm.config import RunConfig, preset
from rdm.database import Database, DatabaseError, verify
from rdm.db_build import build_database
from rdm.errors import IdentityMismatch, RdmError
from rdm.io import OutputError, sha256_file
from rdm.model import RetrievalUNet
from rdm.neighbors import compute_neighbors

BUILD = {"batch_size": 8, "shard_size": 16, "progress": False}


def flip(path, offset: int = -4096, n: int = 4096) -> None:
    """XOR ``n`` bytes of ``path`` from ``offset`` (negative: from the end) with 0xFF: same size,
    other bytes, as a bad disk block or a bad copy leaves them."""
    data = bytearray(path.read_bytes())
    start = offset % len(data) if offset < 0 else offset
    start = max(0, min(start, len(data) - n))
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def one_line_error(capsys, *names: str) -> str:
    """The CLI's stderr: exactly one line, no traceback, naming each of ``names``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert "Traceback" not in err and len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


class JitterEncoder(ProjectionEncoder):
    """The same encoder (same identity) computing slightly different floats, as bf16 autocast does
    on another CPU: outputs differ by ~1e-3, i.e. in the last float16 bits."""

    def encode_images(self, images) -> np.ndarray:
        z = super().encode_images(images)
        z = z + 1e-3 * np.random.default_rng(len(images)).standard_normal(z.shape)
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity") / "db"
    return build_database(TinySource(40), "all", ProjectionEncoder(), root, **BUILD)


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the database, to damage."""
    return shutil.copytree(built, tmp_path / "db")


# ---- damaged database files are refused on use ---------------------------------------------------


def test_a_shard_with_flipped_bytes_is_refused_on_use_naming_it_and_the_rebuild(copy):
    shard = copy / "embeddings" / "shard-00001.npy"
    size = shard.stat().st_size
    flip(shard, offset=200, n=256)  # inside the data: values change, the file still parses
    assert shard.stat().st_size == size and np.load(shard).shape == (16, 16)
    db = Database.open(copy)
    rebuild = "rdm db build fake:tiny --split all --db-fraction 0.5 --encoder fake-projection:0"
    db.vectors([0, 15])  # rows of shard 0: shard 1 is not read
    with pytest.raises(DatabaseError, match=f"shard {shard} does not match the sha256") as exc:
        db.vectors([0, 16])
    assert rebuild in str(exc.value) and "\n" not in str(exc.value)
    assert any("shard-00001.npy does not match its checksum" in p for p in verify(copy))


@pytest.mark.parametrize(
    "name, what",
    [
        ("embeddings/shard-00000.npy", "embeddings shard"),
        ("index.faiss", "index"),
        ("metadata.parquet", "metadata"),
    ],
)
def test_truncated_or_missing_files_are_refused_with_the_path(copy, name, what):
    path = copy / name
    truncate(path)
    use = {
        "embeddings shard": lambda db: db.embeddings[:],  # a shard is checked when first read
        "index": lambda db: db.search(np.ones(16, np.float32), 2),
        "metadata": lambda db: db.ids,
    }[what]
    with pytest.raises(DatabaseError, match=f"{what} {path} does not match the sha256"):
        use(Database.open(copy))
    path.unlink()
    with pytest.raises(DatabaseError, match=f"{what} {path} is missing"):
        use(Database.open(copy))


def test_each_file_is_hashed_once_and_only_the_shards_used(built, monkeypatch):
    calls = []
    real = dbm.sha256_file
    monkeypatch.setattr(dbm, "sha256_file", lambda p: calls.append(p.name) or real(p))
    db = Database.open(built)  # 40 rows in shards of 16, 16, 8
    for _ in range(3):
        db.vectors([0, 1]), db.search(db.vectors([2]), 3), db.ids
    assert sorted(calls) == ["index.faiss", "metadata.parquet", "shard-00000.npy"]
    np.testing.assert_array_equal(db.vectors([[39, 0]]), db.embeddings[[[39, 0]]])
    assert sorted(calls)[-1] == "shard-00002.npy"  # the embeddings view is as lazy as vectors
    assert len(calls) == 4
    db.embeddings[:]
    assert sorted(calls)[-2:] == ["shard-00001.npy", "shard-00002.npy"] and len(calls) == 5


def test_a_damaged_complete_database_is_not_reported_as_built(copy):
    flip(copy / "embeddings" / "shard-00000.npy", offset=200, n=64)
    with pytest.raises(DatabaseError, match="holds this database, but damaged.*shard-00000"):
        build_database(TinySource(40), "all", ProjectionEncoder(), copy, **BUILD)


# ---- FAISS's -1 never becomes a row --------------------------------------------------------------


def test_search_never_returns_faiss_minus_one_rows(tmp_path):
    """An IVF index probing 1 of 64 lists finds fewer than k vectors for most queries: FAISS pads
    with row -1 and score -3.4e38. Database.search answers those queries exactly instead."""
    root = build_database(TinySource(400), "all", ProjectionEncoder(), tmp_path / "d", **BUILD)
    db = Database.open(root)
    spec = fi.IndexSpec("ivfpq", {"nlist": 64, "nprobe": 1, "m": 4, "refine": "none"})
    index = fi.build_index(db.embeddings, spec)
    fi.set_search_params(index, spec)
    xq = db.vectors(np.arange(30))
    assert (fi.search(index, xq, 20)[1] < 0).any()  # the raw index does return -1
    fi.save_index(index, root / "index.faiss")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["index"] |= {"type": "ivfpq", "params": spec.params}
    manifest["index"]["sha256"] = sha256_file(root / "index.faiss")
    (root / "manifest.json").write_text(json.dumps(manifest))

    scores, rows = Database.open(root).search(xq, 20)
    assert rows.min() >= 0 and scores.min() > -1.01
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)  # search renormalises queries
    ref_scores, _ = fi.exact_search(db.vectors(np.arange(400)), xq, 20)
    short = (fi.search(index, xq, 20)[1] < 0).any(axis=1)
    np.testing.assert_allclose(scores[short], ref_scores[short], atol=1e-5)
    assert rows[short, 0].tolist() == np.flatnonzero(short).tolist()  # each finds itself first


def test_a_query_holding_nan_is_refused(built):
    xq = np.full(16, np.nan, np.float32)
    with pytest.raises(DatabaseError, match="NaN or inf"):
        Database.open(built).search(xq, 3)


# ---- fingerprint = content identity; checksum = bytes --------------------------------------------


def test_same_content_with_other_bytes_has_the_same_fingerprint(
    built, neighbors_of_built, tmp_path
):
    """A rebuild on another CPU (same source, split, encoder; other float bits) is the same
    database for the guards: neighbours computed on one fit the other. The checksum differs."""
    other = Database.open(
        build_database(TinySource(40), "all", JitterEncoder(), tmp_path / "other", **BUILD)
    )
    db = Database.open(built)
    assert other.embeddings.tobytes() != db.embeddings.tobytes()
    assert other.fingerprint == db.fingerprint and other.checksum != db.checksum
    assert verify(other.root) == []
    nb = neighbors_of_built
    assert nb.meta["db_fingerprint"] == db.fingerprint
    nb.require_database(other)  # rows index the same items in the rebuilt database
    np.testing.assert_array_equal(other.ids[nb.nn_rows], nb.nn_ids)


def test_last_bit_perturbation_with_consistent_checksums_keeps_the_fingerprint(copy, built):
    shard = copy / "embeddings" / "shard-00001.npy"
    emb = np.load(shard)
    np.save(shard, (emb.view(np.uint16) ^ 1).view(np.float16))  # last mantissa bit of every value
    m = json.loads((copy / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_file(shard)
    m["checksum"] = dbm.checksum_of(m["shards"])
    (copy / "manifest.json").write_text(json.dumps(m))
    perturbed, original = Database.open(copy), Database.open(built)
    assert perturbed.fingerprint == original.fingerprint
    assert perturbed.checksum != original.checksum
    assert verify(copy) == []
    np.testing.assert_allclose(perturbed.vectors([20]), original.vectors([20]), atol=1e-3)
    flip(shard, offset=200, n=64)  # now bytes change without the checksum: refused
    with pytest.raises(DatabaseError, match="shard-00001.npy does not match the sha256"):
        Database.open(copy).vectors([20])


@pytest.fixture(scope="module")
def neighbors_of_built(built, tmp_path_factory):
    from rdm.neighbors import load_neighbors

    out = tmp_path_factory.mktemp("nb") / "nb.safetensors"
    db = Database.open(built)
    return load_neighbors(
        compute_neighbors(
            db, TinySource(40), "train", ProjectionEncoder(), k=4, out=out, progress=False
        )
    )


@pytest.mark.parametrize(
    "source, split, encoder",
    [
        (TinySource(40), "train", ProjectionEncoder()),  # another split
        (TinySource(41), "all", ProjectionEncoder()),  # more items
        (TinySource(40, bad={5}), "all", ProjectionEncoder()),  # other rows (one unreadable)
        (TinySource(40, name="other"), "all", ProjectionEncoder()),  # another source
        (TinySource(40), "all", ProjectionEncoder(seed=1)),  # another encoder
    ],
)
def test_other_content_has_another_fingerprint(
    built, neighbors_of_built, tmp_path, source, split, encoder
):
    other = Database.open(build_database(source, split, encoder, tmp_path / "o", **BUILD))
    assert other.fingerprint != Database.open(built).fingerprint
    with pytest.raises(IdentityMismatch, match="recompute them"):
        neighbors_of_built.require_database(other)


def test_the_identity_is_recorded_and_checked_by_verify(copy):
    m = json.loads((copy / "manifest.json").read_text())
    assert m["identity"] == dbm.content_identity(m["source"], Database.open(copy).ids, m["encoder"])
    assert m["fingerprint"] == dbm.fingerprint_of(m["identity"])
    assert m["identity"]["rows"] == 40 and m["identity"]["encoder"] != m["encoder"]["spec"]
    m["identity"]["split"] = "db"
    (copy / "manifest.json").write_text(json.dumps(m))
    assert any("identity does not describe" in p for p in verify(copy))


def test_a_database_built_before_identities_keeps_its_fingerprint(copy):
    """Old manifests: 'fingerprint' was the shard checksum; their neighbours files and runs
    recorded it, so it stays what the guards compare."""
    m = json.loads((copy / "manifest.json").read_text())
    legacy = dbm.checksum_of(m["shards"])
    for key in ("identity", "checksum"):
        del m[key]
    m["fingerprint"] = legacy
    (copy / "manifest.json").write_text(json.dumps(m))
    db = Database.open(copy)
    assert db.fingerprint == legacy == db.checksum
    assert verify(copy) == []


def test_the_shipped_demo_records_the_identity_of_the_database_rdm_demo_builds():
    """The demo database is fashion-mnist split db with the default encoder; its identity does
    not depend on the machine, so it is computed here from the split's ids alone."""
    from rdm.data import open_source
    from rdm.demo import SHIPPED_RUN

    cfg = RunConfig.from_json(SHIPPED_RUN / "config.json")
    try:
        source = open_source(cfg.data.source)
    except RdmError as exc:  # the dataset is an optional system package
        pytest.skip(f"Fashion-MNIST not installed ({exc})")
    ids = source.split_ids("db", 0.5)
    identity = dbm.content_identity(
        {"spec": source.spec, "split": "db", "db_fraction": 0.5}, ids, cfg.encoder
    )
    assert cfg.db_fingerprint == dbm.fingerprint_of(identity)
    assert cfg.neighbors_meta["db_fingerprint"] == cfg.db_fingerprint
    assert cfg.weights_sha256["ema.safetensors"] == sha256_file(SHIPPED_RUN / "ema.safetensors")


# ---- weights are checked against the recorded sha256 ---------------------------------------------


@pytest.fixture
def run(tmp_path):
    """A run directory as save_pretrained writes it: config.json first, then ema.safetensors."""
    cfg = preset("tiny")
    run = tmp_path / "run"
    run.mkdir()
    cfg.to_json(run / "config.json")
    torch.manual_seed(0)
    digest = save_weights(RetrievalUNet(cfg.model), run / "ema.safetensors")
    assert digest == sha256_file(run / "ema.safetensors")
    return run


def test_save_weights_records_the_checksum_and_load_run_checks_it(run, capsys):
    recorded = RunConfig.from_json(run / "config.json").weights_sha256
    assert recorded == {"ema.safetensors": sha256_file(run / "ema.safetensors")}
    load_run(run)
    assert "no checksum" not in capsys.readouterr().err
    flip(run / "ema.safetensors", offset=-8192, n=4096)  # 4 KiB of weights, header intact
    with pytest.raises(CheckpointError, match="ema.safetensors does not match the sha256"):
        load_run(run)


def test_a_truncated_weights_file_is_a_checkpoint_error(run):
    truncate(run / "ema.safetensors")
    with pytest.raises(CheckpointError, match="ema.safetensors does not match"):
        load_run(run)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["weights_sha256"]  # a run saved before checksums: still no SafetensorError
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ema.safetensors cannot be read"):
        load_run(run)


def test_a_run_saved_before_checksums_loads_with_a_note(run, capsys):
    cfg = json.loads((run / "config.json").read_text())
    del cfg["weights_sha256"]
    (run / "config.json").write_text(json.dumps(cfg))
    model, _ = load_run(run)
    assert "no checksum is recorded for" in capsys.readouterr().err
    assert not model.training


def test_checkpoints_record_and_check_every_tensor_file(tmp_path, capsys):
    cfg = preset("tiny")
    model = RetrievalUNet(cfg.model)
    ema = RetrievalUNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    model(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 16)
    ).sum().backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path, 3, model, ema, opt, {"loss": 0.5}, cfg, keep_last=2)
    state = json.loads((ckpt / "state.json").read_text())
    names = ("model", "ema", "optimizer", "rng")
    assert state["weights_sha256"] == {
        f"{n}.safetensors": sha256_file(ckpt / f"{n}.safetensors") for n in names
    }
    load_checkpoint(ckpt, RetrievalUNet(cfg.model), RetrievalUNet(cfg.model), opt)
    for name in ("ema", "optimizer"):
        broken = shutil.copytree(ckpt, tmp_path / f"broken-{name}")
        flip(broken / f"{name}.safetensors", offset=-2048, n=1024)
        with pytest.raises(CheckpointError, match=f"{name}.safetensors.*sha256.*delete it"):
            load_checkpoint(broken, RetrievalUNet(cfg.model), RetrievalUNet(cfg.model), opt)


def test_training_records_the_checksums_of_the_final_weights(tmp_path):
    from dataclasses import replace

    from rdm.train import InMemoryDataset, train

    cfg = preset("tiny")
    cfg.train = replace(cfg.train, steps=1, checkpoint_every=1)
    g = torch.Generator().manual_seed(0)
    data = InMemoryDataset(
        torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
        torch.nn.functional.normalize(torch.randn(4, 4, 16, generator=g), dim=-1),
    )
    train(cfg, tmp_path, data, progress=False)
    recorded = RunConfig.from_json(tmp_path / "config.json").weights_sha256
    assert recorded == {
        name: sha256_file(tmp_path / name) for name in ("model.safetensors", "ema.safetensors")
    }


# ---- the CLI: one line, the path, no traceback ---------------------------------------------------


def test_db_build_into_an_unwritable_place_fails_before_encoding(tmp_path, capsys, monkeypatch):
    import rdm.db_build

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / f"{i}.png")
    (tmp_path / "a-file").write_text("x")
    encoded = []
    monkeypatch.setattr(rdm.db_build, "encode_source", lambda *a: encoded.append(1) or iter(()))
    monkeypatch.setattr("rdm.encoders.load_encoder", lambda spec, device: ProjectionEncoder())
    for out in ("/proc/rdm-test/db", tmp_path / "a-file" / "db"):
        assert main(["db", "build", str(images), "--out", str(out), "--no-progress"]) == 2
        one_line_error(capsys, out)
    assert encoded == []
    with pytest.raises(OutputError, match="cannot write database directory /proc/rdm-test"):
        build_database(TinySource(4), "all", ProjectionEncoder(), "/proc/rdm-test", **BUILD)


@pytest.mark.parametrize("damage", [truncate, lambda p: flip(p, offset=200, n=64)])
def test_db_query_on_a_damaged_shard_is_one_line(copy, capsys, damage):
    shard = copy / "embeddings" / "shard-00000.npy"
    damage(shard)
    assert main(["db", "query", str(copy), "--id", "0", "-k", "3"]) == 2
    one_line_error(capsys, shard, "rdm db build fake:tiny")


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate-unrecorded"])
def test_sample_with_damaged_weights_is_one_line(run, built, tmp_path, capsys, damage):
    weights = run / "ema.safetensors"
    if damage == "flip":
        flip(weights, offset=-8192, n=4096)
    else:
        truncate(weights)
    if damage == "truncate-unrecorded":
        cfg = json.loads((run / "config.json").read_text())
        del cfg["weights_sha256"]
        (run / "config.json").write_text(json.dumps(cfg))
    args = ["sample", str(run), "--db", str(built), "--unconditional", "--uniform", "-n", "1"]
    args += ["--out", str(tmp_path / "samples")]
    assert main(args) == 2
    one_line_error(capsys, weights)


def test_an_unexpected_os_error_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path):
    import rdm.cli.db

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(rdm.cli.db, "run_verify", denied)
    assert main(["db", "verify", str(tmp_path)]) == 1
    one_line_error(capsys, tmp_path / "x", "Permission denied")


def test_publish_shard_moves_once_and_refuses_a_damaged_shard(tmp_path):
    """The shard step shared by `rdm db build` and `rdm db import`: idempotent, sha256-checked."""
    from rdm.db_build import publish_shard
    from rdm.io import sha256_file

    built = tmp_path / "_build" / "s.npy"
    built.parent.mkdir()
    built.write_bytes(b"shard bytes")
    digest = sha256_file(built)
    entry = publish_shard(tmp_path, 3, built, digest, 7, "redo shard 3")
    assert entry == {"file": "embeddings/shard-00003.npy", "rows": 7, "sha256": digest}
    assert not built.exists() and (tmp_path / entry["file"]).read_bytes() == b"shard bytes"
    assert publish_shard(tmp_path, 3, built, digest, 7, "redo shard 3") == entry  # rerun
    (tmp_path / entry["file"]).write_bytes(b"shard bytez")
    with pytest.raises(DatabaseError, match="redo shard 3"):
        publish_shard(tmp_path, 3, built, digest, 7, "redo shard 3")
