"""The training loop: exact resume, atomic checkpoints, NaN stop, run-dir checks, the dataset."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rdm.train
from rdm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_run
from rdm.config import preset
from rdm.errors import IdentityMismatch, RdmError
from rdm.model import RetrievalUNet
from rdm.neighbors import Neighbors
from rdm.train import (
    InMemoryDataset,
    RetrievalDataset,
    StepBatches,
    TrainingDiverged,
    read_loss_csv,
    train,
)


def tiny_cfg(steps=6, checkpoint_every=3):
    cfg = preset("tiny")
    cfg.train = replace(cfg.train, steps=steps, checkpoint_every=checkpoint_every, keep_last=2)
    return cfg


def tiny_dataset(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    contexts = torch.nn.functional.normalize(torch.randn(n, 4, 16, generator=g), dim=-1)
    return InMemoryDataset(images, contexts)


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def patch_loss(monkeypatch, n: int, what: str):
    """Make the n-th training loss ``what``: "kill" (the process dies) or "nan"."""
    calls = {"n": 0}
    real = rdm.train.diffusion_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n and what == "kill":
            raise KeyboardInterrupt
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == n else value

    monkeypatch.setattr(rdm.train, "diffusion_loss", loss)


def test_killed_and_resumed_run_equals_unbroken_run(tmp_path, monkeypatch):
    cfg, data = tiny_cfg(steps=6, checkpoint_every=3), tiny_dataset()
    unbroken = train(cfg, tmp_path / "a", data, progress=False)
    assert unbroken.step == 6

    # killed during step 5: the checkpoint of step 3 survives, steps 4-5 are redone
    patch_loss(monkeypatch, 5, "kill")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", data, progress=False)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000003"
    monkeypatch.undo()
    resumed = train(cfg, tmp_path / "b", data, resume=True, progress=False)

    assert read_loss_csv(tmp_path / "a/loss.csv") == read_loss_csv(tmp_path / "b/loss.csv")
    assert [s for s, _ in read_loss_csv(tmp_path / "b/loss.csv")] == [1, 2, 3, 4, 5, 6]
    assert resumed.loss == unbroken.loss
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(tmp_path / "a" / name, tmp_path / "b" / name)
    assert (tmp_path / "b/loss.png").stat().st_size > 0


def test_training_time_is_summed_over_killed_and_resumed_chunks(tmp_path, monkeypatch):
    """Each step takes 10 s of a fake clock: a run killed during step 5 and resumed records the
    unbroken run's 60 s (the killed steps after checkpoint 3 are trained, and counted, again);
    resumed from a checkpoint that kept no time, the count starts at its step."""
    clock = {"t": 0.0}
    monkeypatch.setattr(rdm.train._TrainClock, "_now", staticmethod(lambda: clock["t"]))
    real, calls = rdm.train.diffusion_loss, {"n": 0, "kill": 5}

    def loss(*args, **kwargs):
        calls["n"] += 1
        clock["t"] += 10.0
        if calls["n"] == calls["kill"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rdm.train, "diffusion_loss", loss)
    cfg, data = tiny_cfg(steps=6, checkpoint_every=3), tiny_dataset()
    calls["kill"] = 0
    unbroken = train(cfg, tmp_path / "a", data, progress=False)
    assert (unbroken.train_seconds, unbroken.train_seconds_from) == (60.0, 0)
    state = json.loads((latest_checkpoint(tmp_path / "a") / "state.json").read_text())
    assert (state["train_seconds"], state["train_seconds_from"]) == (60.0, 0)

    calls.update(n=0, kill=5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", data, progress=False)
    resumed = train(cfg, tmp_path / "b", data, resume=True, progress=False)
    assert (resumed.train_seconds, resumed.train_seconds_from) == (60.0, 0)

    # a checkpoint from before rdm kept the time: counted from its step
    calls.update(n=0, kill=0)
    for name in ("c", "d"):
        train(tiny_cfg(steps=3, checkpoint_every=3), tmp_path / name, data, progress=False)
    path = latest_checkpoint(tmp_path / "d") / "state.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("train_s")}
    path.write_text(json.dumps(old))
    longer = {}
    for name in ("c", "d"):
        longer[name] = train(cfg, tmp_path / name, data, resume=True, progress=False)
    assert (longer["c"].train_seconds, longer["c"].train_seconds_from) == (60.0, 0)
    assert (longer["d"].train_seconds, longer["d"].train_seconds_from) == (30.0, 3)


def test_bf16_autocast_trains(tmp_path):
    cfg = tiny_cfg(steps=2, checkpoint_every=2)
    cfg.train.mixed_precision = "bf16"
    result = train(cfg, tmp_path, tiny_dataset(), progress=False)
    assert result.step == 2 and 0.1 < result.loss < 10
    assert weights(tmp_path / "model.safetensors")["null"].dtype == torch.float32  # fp32 master


def test_runs_in_one_process_switch_precision_without_resetting_accelerate(tmp_path, monkeypatch):
    """fp32, bf16, fp32 in one process: each run's forward pass computes in its own precision,
    and accelerate's process-wide state is never reset (its private _reset_state refuses)."""
    from accelerate.state import AcceleratorState

    def refuse(*args, **kwargs):
        raise AssertionError("train() reset accelerate's private state")

    monkeypatch.setattr(AcceleratorState, "_reset_state", staticmethod(refuse))
    conv_dtypes: list[torch.dtype] = []
    real_loss = rdm.train.diffusion_loss

    def loss_recording_conv_dtype(model, *args, **kwargs):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
        try:
            return real_loss(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(rdm.train, "diffusion_loss", loss_recording_conv_dtype)
    results, dtypes = [], []
    for i, precision in enumerate(("no", "bf16", "no")):
        cfg = tiny_cfg(steps=2, checkpoint_every=2)
        cfg.train.mixed_precision = precision
        conv_dtypes.clear()
        results.append(train(cfg, tmp_path / str(i), tiny_dataset(), progress=False))
        dtypes.append(set(conv_dtypes))
    assert dtypes == [{torch.float32}, {torch.bfloat16}, {torch.float32}]
    assert results[2].loss == results[0].loss  # the bf16 run left nothing behind
    assert_same_weights(tmp_path / "0/model.safetensors", tmp_path / "2/model.safetensors")


def test_loss_csv_is_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss,lr\n1,0.5,0.1\n2,0.4,0.1\n3,0.3,0.1\n4,0.2")  # a torn last row
    assert rdm.train.last_logged_step(tmp_path) == 3  # the torn row does not count
    rdm.train._truncate_loss_csv(path, 2)
    assert read_loss_csv(path) == [(1, 0.5), (2, 0.4)]
    rdm.train._truncate_loss_csv(path, 0)  # a fresh run: the header only
    assert path.read_text().splitlines() == ["step,loss,lr"]
    assert rdm.train.last_logged_step(tmp_path) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["loss.csv"]  # no temporary file left


def test_checkpoint_contents_and_keep_last(tmp_path):
    cfg = tiny_cfg(steps=4, checkpoint_every=1)
    train(cfg, tmp_path, tiny_dataset(), progress=False)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-0000003", "step-0000004"]  # keep_last=2
    files = sorted(p.name for p in kept[-1].iterdir())
    assert files == sorted(
        [
            "config.json",
            "ema.safetensors",
            "model.safetensors",
            "optimizer.json",
            "optimizer.safetensors",
            "rng.json",
            "rng.safetensors",
            "state.json",
        ]
    )
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["step"] == 4 and state["data"]["batch_size"] == 4
    # no pickle anywhere: every weights/optimizer/RNG file is safetensors or JSON
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    # optimizer state round-trips: the moments are the ones AdamW holds
    model = RetrievalUNet(cfg.model)
    ema = RetrievalUNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    load_checkpoint(kept[-1], model, ema, opt)
    assert len(opt.state) == len(list(model.parameters()))
    assert float(opt.state[model.unet.conv_in.weight]["step"]) == 4.0


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(steps=6, checkpoint_every=3)
    data = tiny_dataset()
    train(replace(cfg, train=replace(cfg.train, steps=3)), tmp_path, data, progress=False)
    good = latest_checkpoint(tmp_path)

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        if Path(filename).name == "optimizer.safetensors":
            real_save(tensors, filename, *a, **k)  # half the checkpoint is on disk ...
            raise OSError(28, "No space left on device")  # ... when the disk fills
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError, match="No space"):
        train(cfg, tmp_path, data, resume=True, progress=False)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == good  # the half-written step 6 does not count
    assert any(p.name.startswith(".tmp-step-0000006") for p in (tmp_path / "checkpoints").iterdir())
    model, ema = RetrievalUNet(cfg.model), RetrievalUNet(cfg.model)
    state = load_checkpoint(good, model, ema, torch.optim.AdamW(model.parameters()))
    assert state["step"] == 3
    # and resuming from it still works; the stale temporary directory is cleaned up
    assert train(cfg, tmp_path, data, resume=True, progress=False).step == 6
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(steps=6, checkpoint_every=3)
    patch_loss(monkeypatch, 5, "nan")
    with pytest.raises(TrainingDiverged, match=r"nan at step 5.*step-0000003"):
        train(cfg, tmp_path, tiny_dataset(), progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003"]
    assert not (tmp_path / "model.safetensors").exists()


def test_run_dir_errors(tmp_path):
    cfg, data = tiny_cfg(steps=2, checkpoint_every=2), tiny_dataset()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RdmError, match="cannot write run directory .*file"):
        train(cfg, tmp_path / "file" / "run", data, progress=False)

    train(cfg, tmp_path / "run", data, progress=False)
    with pytest.raises(RdmError, match="already holds a run.*--resume"):
        train(cfg, tmp_path / "run", data, progress=False)
    other = replace(cfg, preset="small", model=replace(cfg.model, block_out_channels=(16, 16)))
    with pytest.raises(RdmError, match="preset 'tiny'.*'small'"):
        train(other, tmp_path / "run", data, resume=True, progress=False)
    changed_seed = replace(cfg, train=replace(cfg.train, seed=1))
    with pytest.raises(RdmError, match="seed: 0 -> 1"):
        train(changed_seed, tmp_path / "run", data, resume=True, progress=False)
    identity = {"arch": "a", "weights_sha256": "1", "dim": 16}
    train(replace(cfg, encoder=identity), tmp_path / "enc", data, progress=False)
    other_encoder = replace(cfg, encoder={**identity, "weights_sha256": "2"})
    with pytest.raises(IdentityMismatch, match="encoder"):
        train(other_encoder, tmp_path / "enc", data, resume=True, progress=False)
    other_db = replace(cfg, db_fingerprint="0123456789abcdef")
    with pytest.raises(IdentityMismatch, match="0123456789abcdef"):
        train(other_db, tmp_path / "run", data, resume=True, progress=False)
    wrong_k = replace(cfg, model=replace(cfg.model, k=3))
    with pytest.raises(RdmError, match=r"\(k, d\) = \(3, 16\)"):
        train(wrong_k, tmp_path / "new", data, progress=False)


def test_load_run_gives_the_ema_model(tmp_path):
    cfg = tiny_cfg(steps=2, checkpoint_every=2)
    train(cfg, tmp_path, tiny_dataset(), progress=False)
    model, loaded_cfg = load_run(tmp_path)
    assert loaded_cfg == cfg and not model.training
    ema = weights(tmp_path / "ema.safetensors")
    assert torch.equal(model.unet.conv_in.weight, ema["unet.conv_in.weight"])
    model_w, _ = load_run(tmp_path, weights="model")
    assert not torch.equal(model_w.unet.conv_in.weight, model.unet.conv_in.weight)


def test_sample_grid_written(tmp_path):
    cfg = tiny_cfg(steps=1, checkpoint_every=1)
    cfg.train.sample_every = 1
    cfg.sample = replace(cfg.sample, steps=2, grid_size=2)
    train(cfg, tmp_path, tiny_dataset(), progress=False)
    grid = Image.open(tmp_path / "samples/step-0000001.png")
    assert grid.size[0] > 2 * 32 and grid.size[1] > 3 * 32  # 3 rows of 2 cells


def test_step_batches_depend_only_on_seed_and_step():
    full = list(StepBatches(10, 4, seed=1, first_step=1, last_step=6))
    tail = list(StepBatches(10, 4, seed=1, first_step=4, last_step=6))
    assert full[3:] == tail
    first_epoch = [i for batch in full[:2] for i, _ in batch] + [i for i, _ in full[2][:2]]
    assert sorted(first_epoch) == list(range(10))  # an epoch is a permutation
    ranks = [list(StepBatches(10, 2, 1, 1, 1, rank=r, world=2))[0] for r in (0, 1)]
    assert [i for i, _ in ranks[0] + ranks[1]] == [i for i, _ in full[0]]


# --- RetrievalDataset on fake source / database / neighbours ----------------------------------


class FakeSource:
    spec = "fake"

    def load(self, i):
        return Image.new("RGB", (12, 10), (i * 20 % 256, 100, 200))


class FakeDb:
    fingerprint = "dbfp000000000001"
    identity = {"arch": "fake", "weights_sha256": "0", "dim": 8, "spec": "x"}
    dim = 8
    root = Path("/dbs/fake")

    def __init__(self, n=30):
        rng = np.random.default_rng(0)
        v = rng.normal(size=(n, 8)).astype(np.float32)
        self.table = v / np.linalg.norm(v, axis=1, keepdims=True)

    def vectors(self, rows):
        return self.table[np.asarray(rows)]


def fake_neighbors(n=5, stored=6, fingerprint="dbfp000000000001"):
    rng = np.random.default_rng(1)
    nn_rows = np.stack([rng.permutation(30)[:stored] for _ in range(n)])
    return Neighbors(
        query_ids=np.arange(n, dtype=np.int64) * 2,
        nn_rows=nn_rows,
        nn_ids=nn_rows,
        nn_scores=np.ones((n, stored), np.float32),
        pq_counts=np.zeros(30, np.int64),
        pq_prob=np.zeros(30),
        meta={
            "db_fingerprint": fingerprint,
            "encoder": FakeDb.identity,
            "queries": {"spec": "fake", "split": "train"},
            "k": stored,
        },
    )


def test_retrieval_dataset_items():
    db, nb = FakeDb(), fake_neighbors()
    ds = RetrievalDataset(FakeSource(), "train", db, nb, k=4, resolution=8)
    image, context, index = ds[(2, 17)]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert torch.equal(context, torch.from_numpy(db.table[nb.nn_rows[2, :4]]))
    assert index == 2 and len(ds) == 5
    assert ds.provenance()["db_fingerprint"] == db.fingerprint


def test_retrieval_dataset_random_top_n_is_reproducible():
    db, nb = FakeDb(), fake_neighbors(stored=6)
    ds = RetrievalDataset(FakeSource(), "train", db, nb, k=2, resolution=8, k_random_from_top_n=5)
    draws = [ds[(1, d)][1] for d in range(20)]
    assert torch.equal(draws[3], ds[(1, 3)][1])  # same draw -> same neighbours
    top5 = {tuple(v) for v in db.table[nb.nn_rows[1, :5]].tolist()}
    chosen = {tuple(v) for c in draws for v in c.tolist()}
    assert chosen <= top5 and len(chosen) > 2  # varies, never outside the top 5


def test_retrieval_dataset_refusals():
    src, db = FakeSource(), FakeDb()
    with pytest.raises(RdmError, match="k=7.*stores 6"):
        RetrievalDataset(src, "train", db, fake_neighbors(stored=6), k=7, resolution=8)
    with pytest.raises(IdentityMismatch, match="ffffffffffffffff.*dbfp000000000001"):
        RetrievalDataset(src, "train", db, fake_neighbors(fingerprint="ffffffffffffffff"), 4, 8)
    with pytest.raises(RdmError, match="split 'train', not 'fake' split 'db'"):
        RetrievalDataset(src, "db", db, fake_neighbors(), k=4, resolution=8)


# --- the command line, end to end on a folder source and a real database ----------------------


@pytest.fixture(scope="module")
def retrieval_setup(tmp_path_factory):
    """A folder of 30 images, a database of its 'db' split, neighbours of its 'train' split."""
    from fakes_retrieval import ProjectionEncoder

    from rdm.data import open_source
    from rdm.database import build_database
    from rdm.neighbors import compute_neighbors

    root = tmp_path_factory.mktemp("train-cli")
    rng = np.random.default_rng(0)
    for i in range(30):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
    source = open_source(str(root))
    opts = {"batch_size": 8, "shard_size": 16, "progress": False}
    db = build_database(source, "db", ProjectionEncoder(), tmp_path_factory.mktemp("db"), **opts)
    other_db = build_database(
        source, "all", ProjectionEncoder(), tmp_path_factory.mktemp("db2"), **opts
    )
    from rdm.database import Database

    nb = compute_neighbors(
        Database.open(db), source, "train", ProjectionEncoder(), k=6, progress=False
    )
    return {"data": str(root), "db": db, "other_db": other_db, "neighbors": nb}


def cli(*argv):
    from rdm.cli import main

    return main(["train", *map(str, argv)])


def test_cli_trains_resumes_and_refuses_mismatches(retrieval_setup, tmp_path, capsys):
    s = retrieval_setup
    common = ["--data", s["data"], "--db", s["db"], "--neighbors", s["neighbors"]]
    run = tmp_path / "run"
    assert (
        cli(*common, "--preset", "tiny", "--out", run, "--steps", 2, "--checkpoint-every", 1) == 0
    )
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["context_dim"] == 16 and cfg["db_fingerprint"]
    assert cfg["encoder"]["arch"] == "fake-projection" and cfg["neighbors_meta"]["k"] == 6

    # the depth and widths are options; the model built from the saved config has them
    deep = tmp_path / "deep"
    argv = ["--layers-per-block", 2, "--channels", "32,64", "--steps", 1]
    assert cli(*common, "--preset", "tiny", "--out", deep, *argv) == 0
    deep_model, _ = load_run(deep)
    assert [len(b.resnets) for b in deep_model.unet.down_blocks] == [2, 2]
    assert [b.out_channels for b in deep_model.unet.down_blocks[0].resnets] == [32, 32]

    # resume: data, db and neighbours default to the run's; only --steps is raised
    assert cli("--out", run, "--resume", "--steps", 3) == 0
    assert [s for s, _ in read_loss_csv(run / "loss.csv")] == [1, 2, 3]
    capsys.readouterr()

    def error(*argv) -> str:
        assert cli(*argv) == 2
        return capsys.readouterr().err

    assert "preset 'tiny', not 'small'" in error("--out", run, "--resume", "--preset", "small")
    assert "k=8" in error(*common, "--preset", "tiny", "--out", tmp_path / "r2", "--k", 8)
    msg = error(
        *common[:2],
        "--db",
        s["other_db"],
        "--neighbors",
        s["neighbors"],
        "--preset",
        "tiny",
        "--out",
        tmp_path / "r3",
    )
    assert "fingerprint" in msg and str(s["other_db"]) in msg
    (tmp_path / "file").write_text("")
    assert "cannot write" in error(*common, "--preset", "tiny", "--out", tmp_path / "file" / "r")
    assert "--resume" in error(*common, "--preset", "tiny", "--out", run)
