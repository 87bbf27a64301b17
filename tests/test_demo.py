"""`rdm demo --train` end to end on a tiny folder source with a tiny encoder and the tiny preset:
database, neighbours, a resumable training run and the three grids."""

from __future__ import annotations

from PIL import Image
from test_db_cli import colour_squares, tiny_encoder_dir

from rdm.checkpoint import list_checkpoints
from rdm.cli import main


def test_demo_train_builds_everything_and_writes_three_grids(tmp_path, capsys):
    images = colour_squares(tmp_path / "images", 24, size=12)
    enc = tiny_encoder_dir(tmp_path / "enc", seed=0)
    out = tmp_path / "demo"
    args = [
        "demo",
        "--train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--data",
        str(images),
        "--encoder",
        str(enc),
        "--out",
        str(out),
        "-n",
        "1",
        "--sampler-steps",
        "2",
    ]
    assert main(args) == 0
    for name in ("image", "text", "unconditional"):
        assert Image.open(out / f"{name}.png").size[0] > 8
    assert (out / "db" / "manifest.json").is_file()
    assert (out / "db" / "neighbors-train.safetensors").is_file()
    assert list_checkpoints(out / "run")
    # a second run reuses the database and resumes (here: finds the run finished) instead of redoing
    assert main(args) == 0
    assert "already holds this database" in capsys.readouterr().err


def test_demo_train_recreates_the_shipped_models_recipe():
    """`rdm demo --train` with its defaults trains what src/rdm/assets/demo-fashion was trained
    with: the same model, diffusion, sampling defaults and trajectory (batch, lr, steps, seed,
    EMA ...); only the settings that may change on resume (checkpoint and log intervals) differ."""
    import dataclasses

    from rdm.config import RunConfig
    from rdm.demo import SHIPPED_RUN, DemoConfig, demo_train_config
    from rdm.train import RESUMABLE_CHANGES

    shipped = RunConfig.from_json(SHIPPED_RUN / "config.json")
    d = DemoConfig()
    built = demo_train_config(
        d.preset, shipped.model.context_dim, d.steps, d.batch_size, d.seed, in_channels=1
    )
    assert built.model == shipped.model
    assert built.diffusion == shipped.diffusion
    assert built.sample == shipped.sample
    assert built.train.steps == shipped.train.steps
    # fp32 was the shipped run's 'auto' on its CPU (no native bf16); another CPU may pick bf16
    assert (built.train.mixed_precision, shipped.train.mixed_precision) == ("auto", "no")
    ignore = {*RESUMABLE_CHANGES, "mixed_precision"}
    for f in dataclasses.fields(built.train):
        if f.name not in ignore:
            assert getattr(built.train, f.name) == getattr(shipped.train, f.name), f.name
