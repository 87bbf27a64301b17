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
