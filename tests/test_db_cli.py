"""`rdm db build | verify | query | neighbors` end to end through ``rdm.cli.main`` with a tiny
folder of images and a tiny random open_clip model saved to disk and loaded by its spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rdm.cli import main
from rdm.database import Database
from rdm.neighbors import load_neighbors

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS = {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128,) * 3}


def tiny_encoder_dir(path, seed: int):
    import open_clip
    import torch

    from rdm.encoders import save_local_dir

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CFG)
    return save_local_dir(model, TINY_CFG, PREPROCESS, path, arch="rdm-test-tiny")


def colour_squares(folder, n: int, size: int):
    """``n`` noisy squares cycling through COLOURS, each with a caption sidecar 'a red square'."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        name = list(COLOURS)[i % 4]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {name} square")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder of 24 noisy colour squares with sidecar captions (one broken file), two encoders,
    and a database built from it through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    images = colour_squares(root / "images", 24, size=20)
    (images / "99-broken.png").write_text("not an image")
    enc = tiny_encoder_dir(root / "enc", seed=0)
    other = tiny_encoder_dir(root / "other", seed=1)
    db = root / "db"
    args = ["db", "build", str(images), "--encoder", str(enc), "--split", "all", "--out", str(db)]
    assert main([*args, "--shard-size", "10", "--batch-size", "4", "--no-progress"]) == 0
    return {"root": root, "images": images, "enc": enc, "other": other, "db": db}


def test_build_then_verify(setup, capsys):
    db = Database.open(setup["db"])
    assert db.count == 24 and db.dim == 32 and db.identity["spec"] == str(setup["enc"])
    skipped = [json.loads(x) for x in (setup["db"] / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["id"] == 24 and skipped[0]["key"] == "99-broken.png"
    assert main(["db", "verify", str(setup["db"])]) == 0
    assert "ok — 24 rows" in capsys.readouterr().out


def test_rebuild_is_a_no_op_and_a_different_encoder_is_refused(setup, capsys):
    images, db = str(setup["images"]), str(setup["db"])
    base = ["db", "build", images, "--split", "all", "--out", db, "--no-progress"]
    assert main([*base, "--encoder", str(setup["enc"])]) == 0
    assert "already holds this database" in capsys.readouterr().err
    assert main([*base, "--encoder", str(setup["other"])]) == 2
    assert "complete database built with other options" in capsys.readouterr().err


def test_verify_fails_with_the_list_of_problems(setup, tmp_path, capsys):
    import shutil

    copy = tmp_path / "db"
    shutil.copytree(setup["db"], copy)
    index = copy / "index.faiss"
    index.write_bytes(index.read_bytes()[:-50])
    assert main(["db", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "problem(s)" in err and "index" in err and "truncated" in err


def test_query_by_id_prints_ranked_neighbours_and_a_sheet(setup, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert (
        main(["db", "query", str(setup["db"]), "--id", "4", "-k", "3", "--sheet", str(sheet)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "caption"]
    first = lines[1].split()
    assert first[:2] == ["1", "4"] and float(first[2]) == pytest.approx(1.0, abs=2e-3)
    assert len(lines) == 4
    assert Image.open(sheet).size[0] > 96  # query + 3 neighbours laid out in a grid


def test_query_by_image_and_text(setup, tmp_path, capsys):
    image = setup["images"] / "05.png"
    assert main(["db", "query", str(setup["db"]), "--image", str(image), "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[1] == "5"  # the image itself is in the database
    assert main(["db", "query", str(setup["db"]), "--text", "a red square", "-k", "24"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 25 and sorted(int(line.split()[1]) for line in out[1:]) == list(range(24))


def test_k_larger_than_the_database_is_clipped_with_a_note(setup, capsys):
    assert main(["db", "query", str(setup["db"]), "--id", "0", "-k", "100"]) == 0
    captured = capsys.readouterr()
    assert "holds only 24 items" in captured.err and len(captured.out.splitlines()) == 25


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--id", "0", "-k", "0"], "-k must be at least 1"),
        (["--id", "0", "-k", "-3"], "-k must be at least 1"),
        (["--id", "24"], "id 24 is not in the database"),
        (["--id", "999"], "id 999 is not in the database"),
        (["--image", "{images}"], "is a directory"),
        (["--image", "{images}/missing.png"], "does not exist"),
        (["--image", "{images}/00.txt"], "cannot be used as an image"),
        (["--image", "{images}/99-broken.png"], "cannot be used as an image"),
        (["--text", " "], "--text is empty"),
        (["--id", "0", "--encoder", "{other}"], "was made with encoder"),
        (["--text", "x", "--encoder", "{other}"], "was made with encoder"),
    ],
)
def test_query_errors(setup, capsys, extra, message):
    extra = [a.format(images=setup["images"], other=setup["other"]) for a in extra]
    assert main(["db", "query", str(setup["db"]), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_query_of_something_that_is_not_a_database(tmp_path, capsys):
    assert main(["db", "query", str(tmp_path), "--id", "0"]) == 2
    assert "not an rdm database" in capsys.readouterr().err
    assert main(["db", "query", str(tmp_path / "nope"), "--id", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_memory_budget_is_refused_by_the_parser(setup, capsys):
    with pytest.raises(SystemExit):
        main(["db", "build", str(setup["images"]), "--out", "x", "--memory-budget", "lots"])
    assert "is not a size" in capsys.readouterr().err


def test_parse_size():
    from rdm.cli.db import parse_size

    assert parse_size("2GB") == 2e9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000 and parse_size("1.5 gb") == 1.5e9


def test_neighbors_cli_writes_the_file(setup, tmp_path, capsys):
    out = tmp_path / "nb.safetensors"
    args = ["db", "neighbors", str(setup["db"]), "--queries", str(setup["images"])]
    assert (
        main(
            [*args, "--split", "train", "-k", "3", "--k-p", "2", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    nb = load_neighbors(out)
    nb.require_database(Database.open(setup["db"]))
    assert nb.nn_rows.shape[1] == 3 and nb.meta["exclusion"]["enabled"]  # 'all' db overlaps 'train'
    assert not np.any(nb.nn_ids == nb.query_ids[:, None])
    assert nb.pq_prob.sum() == pytest.approx(1.0)
    bad = [*args, "--encoder", str(setup["other"]), "--out", str(tmp_path / "x.safetensors")]
    assert main(bad) == 2
    assert "was made with encoder" in capsys.readouterr().err
