"""The near-duplicate threshold derived from the encoder (rdm.duplicates), and what it excludes.

Known answers for the copy transforms and the threshold rule; the nearest-distinct measurement
against brute force; an encoder that crowds distinct images above the old fixed 0.98 (they must
not be excluded, re-saved copies must); a folder holding the same picture under two names and
as a re-saved JPEG, split across X and D by name, through the CLI; the build's default split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes_retrieval import ProjectionEncoder, TinySource
from PIL import Image

from rdm import index as fi
from rdm.data import Source, key_fraction
from rdm.database import Database, build_database
from rdm.duplicates import (
    calibrate,
    derive_threshold,
    jpeg_copy,
    nearest_distinct_cosines,
    resized_copy,
    shifted_copy,
)
from rdm.embedding import content_hash
from rdm.neighbors import compute_neighbors, load_neighbors

BUILD = {"batch_size": 8, "shard_size": 16, "progress": False}


def smooth_image(seed: int, size: int = 24) -> Image.Image:
    """A smooth picture (seeded 4x4 colours upsampled): JPEG keeps it nearly intact."""
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.BICUBIC)


class SmoothSource(Source):
    """``n`` smooth pictures; ``jpeg_of`` maps an id to the id whose JPEG re-save it holds."""

    def __init__(self, n: int, jpeg_of=None):
        self.n, self.jpeg_of, self.spec = n, dict(jpeg_of or {}), "fake:smooth"

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return f"img/{i:04d}.png"

    def caption(self, i: int) -> str:
        return f"item {i}"

    def load(self, i: int) -> Image.Image:
        if i in self.jpeg_of:
            return jpeg_copy(smooth_image(self.jpeg_of[i]))
        return smooth_image(i)


class CrowdedEncoder(ProjectionEncoder):
    """φ(x) = [7, p(x)] / √50 with p the unit ProjectionEncoder vector: cos(x, y) = 0.98 +
    (p·p')/50, so every pair whose projections agree at all scores above the old 0.98."""

    def __init__(self):
        super().__init__(dim=16, seed=0)
        self.identity = {**self.identity, "arch": "fake-crowded", "dim": 17, "spec": "crowded"}

    def encode_images(self, images) -> np.ndarray:
        p = super().encode_images(images)  # (B, 16), unit norm
        return np.hstack([np.full((len(p), 1), 7.0, np.float32), p]) / np.sqrt(50.0)


# ---- transforms ---------------------------------------------------------------------------------


def test_shifted_copy_moves_the_picture_one_pixel_right():
    a = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = np.asarray(shifted_copy(Image.fromarray(a)))
    np.testing.assert_array_equal(out[:, 1:], a[:, :-1])
    np.testing.assert_array_equal(out[:, 0], a[:, 0])  # the edge column is repeated


def test_resized_and_jpeg_copies_keep_the_size_and_change_pixels_a_little():
    image = smooth_image(3)
    original = np.asarray(image, np.float32)
    for copy in (resized_copy(image), jpeg_copy(image)):
        assert copy.size == image.size and copy.mode == "RGB"
        diff = np.abs(np.asarray(copy, np.float32) - original).mean()
        assert 0 < diff < 8  # a re-encoded copy, not the same pixels and not another picture
    rough = np.abs(np.asarray(jpeg_copy(image, quality=10), np.float32) - original).mean()
    assert rough > np.abs(np.asarray(jpeg_copy(image), np.float32) - original).mean()


# ---- the rule -----------------------------------------------------------------------------------


def test_separated_distributions_give_the_copies_low_quantile():
    copies = {"jpeg": np.linspace(0.999, 1.0, 101)}
    distinct = np.linspace(0.0, 0.9, 100)
    cal = derive_threshold(copies, distinct)
    # 1% quantile, observed value below: sorted index floor(100 * 0.01) = 1
    assert cal.copy_low == pytest.approx(0.99901)
    # 99% quantile, observed value above: sorted index ceil(99 * 0.99) = 99
    assert cal.distinct_high == pytest.approx(0.9)
    assert cal.threshold == pytest.approx(0.99901) and not cal.overlap
    assert cal.recognised == {"jpeg": pytest.approx(99 / 101)}


def test_overlapping_distributions_follow_the_distinct_images():
    copies = {"jpeg": np.full(100, 0.9999), "shift": np.linspace(0.9, 1.0, 100)}
    distinct = np.r_[np.full(980, 0.5), np.full(20, 0.995)]  # 2% of images have a close twin
    cal = derive_threshold(copies, distinct)
    assert cal.copy_low == pytest.approx(0.9 + 0.1 / 99)  # pooled 200: index floor(1.99) = 1
    assert cal.distinct_high == pytest.approx(0.995)  # index ceil(999 * 0.99) = 990 -> a twin
    # the margin: 2e-3 row noise moves a cosine of 0.995 by at most 2e-3 * sqrt(1 - 0.995²)
    assert cal.overlap and cal.threshold == pytest.approx(0.995 + 2e-3 * 0.0998749)
    # shift copies 0.9 + i/990 above 0.9952: i = 95..99
    assert cal.recognised == {"jpeg": 1.0, "shift": pytest.approx(0.05)}
    assert cal.record["overlap"] and cal.record["copies_recognised"] == cal.recognised


def test_a_few_close_distinct_pairs_do_not_move_the_threshold():
    distinct = np.r_[np.full(995, 0.5), np.full(5, 0.999)]  # 0.5% above: beyond the 99% quantile
    cal = derive_threshold({"jpeg": np.full(10, 0.9)}, distinct)
    assert cal.distinct_high == 0.5 and cal.threshold == pytest.approx(0.9)


def test_summary_says_when_no_kind_of_copy_is_recognised():
    # a database whose nearest-distinct pairs sit at the copies' cosines (e.g. it holds re-saved
    # copies of its own images): the threshold rises above every copy, and the summary says so
    cal = derive_threshold({"jpeg": np.full(50, 0.999)}, np.full(50, 0.9995))
    assert cal.recognised == {"jpeg": 0.0}
    assert "no kind of copy is recognised" in cal.summary() and "overlap" in cal.summary()
    clean = derive_threshold({"jpeg": np.linspace(0.999, 1, 50)}, np.full(50, 0.5))
    assert "no kind of copy" not in clean.summary() and "overlap" not in clean.summary()


def test_nothing_measured_excludes_only_exact_duplicates():
    cal = derive_threshold({}, np.zeros(0))
    assert cal.threshold == 1.0 and cal.copy_low is None and cal.distinct_high is None


# ---- the measurements ---------------------------------------------------------------------------


def test_nearest_distinct_cosine_matches_brute_force(tmp_path):
    src = TinySource(30, copies={20: 3, 21: 3, 22: 4})  # exact copies: never "distinct"
    db = Database.open(build_database(src, "all", ProjectionEncoder(), tmp_path / "d", **BUILD))
    rows = np.arange(db.count)
    got = nearest_distinct_cosines(db, rows)
    x = db.vectors(rows)  # float16 rows: unit norm only to ~1e-4, and queries are renormalised
    S = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ x.T  # (N, N) exact cosines
    same = db.content_hashes[:, None] == db.content_hashes[None, :]  # includes the diagonal
    expected = np.where(same, -np.inf, S).max(axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # a database without content hashes: only the row itself is left out, copies count
    db.__dict__["content_hashes"] = None
    expected = np.where(np.eye(db.count, dtype=bool), -np.inf, S).max(axis=1)
    np.testing.assert_allclose(nearest_distinct_cosines(db, rows), expected, atol=1e-5)
    assert np.sum(expected > 0.999) == 5  # rows of 3, 20, 21 and of 4, 22: exact copies


def test_copy_cosines_and_calibration_record(tmp_path):
    src = SmoothSource(40)
    db = Database.open(build_database(src, "all", ProjectionEncoder(), tmp_path / "d", **BUILD))
    ids = np.arange(40)
    cal = calibrate(db, src, ids, ProjectionEncoder(), copy_sample=16, distinct_sample=25, seed=3)
    rec = cal.record
    assert rec["seed"] == 3 and rec["copies"]["sample"] == 16 and rec["distinct"]["sample"] == 25
    assert rec["copies"]["transforms"]["jpeg"] == "re-saved as JPEG, quality 90"
    # known answer: the same draws, encoded by hand
    rng = np.random.default_rng(3)
    sample = np.sort(rng.choice(ids, 16, replace=False))
    enc = ProjectionEncoder()
    z = enc.encode_images([src.load(int(i)) for i in sample])
    zj = enc.encode_images([jpeg_copy(src.load(int(i))) for i in sample])
    jpeg_cos = np.sum(z * zj, axis=1)
    assert rec["copies"]["quantiles"]["jpeg"]["min"] == pytest.approx(jpeg_cos.min(), abs=1e-6)
    rows = np.sort(rng.choice(np.arange(db.count), 25, replace=False))
    distinct = nearest_distinct_cosines(db, rows)
    assert cal.distinct_high == pytest.approx(np.quantile(distinct, 0.99, method="higher"))
    again = calibrate(db, src, ids, ProjectionEncoder(), copy_sample=16, distinct_sample=25, seed=3)
    assert again.threshold == cal.threshold and again.record["copies"] == rec["copies"]


# ---- what the derived threshold excludes --------------------------------------------------------


@pytest.mark.parametrize("db_split", ["all", "db"])
def test_distinct_images_above_the_old_fixed_threshold_are_kept(tmp_path, db_split):
    """With an encoder that crowds distinct pictures together, the old constant 0.98 excluded
    distinct images wholesale; the derived threshold excludes only re-saved copies. D = "all"
    holds every query; D = "db" is disjoint by name, with three training images that are JPEG
    re-saves of database images."""
    plain = SmoothSource(60)
    train, in_db = plain.split_ids("train"), plain.split_ids("db")
    copy_of = {int(train[j]): int(in_db[j]) for j in range(3)} if db_split == "db" else {}
    src, enc = SmoothSource(60, jpeg_of=copy_of), CrowdedEncoder()
    db = Database.open(build_database(src, db_split, enc, tmp_path / "d", **BUILD))

    def neighbours(name, **kwargs):
        path = compute_neighbors(db, src, "train", enc, k=4, out=tmp_path / name, **kwargs)
        return load_neighbors(path)

    old, new = neighbours("old", exclude_threshold=0.98), neighbours("new")

    # brute force: each query's nearest rows, leaving out by hand itself and its original
    origin = {i: copy_of.get(i, i) for i in range(len(src))}
    z = enc.encode_images([src.load(int(i)) for i in train])
    scores, ranked = fi.exact_search(db.vectors(np.arange(db.count)), z, db.count)  # (n, N)
    distinct_above = 0
    for q, i in enumerate(train):
        others = [
            (r, d)
            for r, d in zip(ranked[q], scores[q], strict=True)
            if origin[db.ids[r]] != origin[i]
        ]
        np.testing.assert_array_equal(new.nn_rows[q], [r for r, _ in others[:4]])
        distinct_above += sum(d > 0.98 for _, d in others[:4])
    assert distinct_above > len(train)  # distinct neighbours above 0.98 abound ...
    assert (new.nn_scores > 0.98).sum() == distinct_above  # ... and are kept now
    ex_new, ex_old = new.meta["exclusion"], old.meta["exclusion"]
    assert ex_new["excluded_near_duplicates"] == len(copy_of)
    assert ex_new["excluded_self"] == (len(train) if db_split == "all" else 0)
    assert ex_new["excluded_exact_duplicates"] == 0
    assert ex_old["excluded_near_duplicates"] > 10 * len(train)  # the old constant's damage
    assert np.all(old.nn_scores <= 0.98)


def test_folder_copy_under_another_name_is_excluded_across_a_name_split(
    tmp_path, monkeypatch, capsys
):
    """The same picture as two files and a re-saved JPEG, with the original in D and the copies
    in X (splits are by file name): only the exact and near-duplicate checks can catch them."""
    import rdm.encoders
    from rdm.cli import build_parser, main
    from rdm.data.folder import FolderSource

    monkeypatch.setattr(
        rdm.encoders, "load_encoder", lambda spec, device="cpu": ProjectionEncoder()
    )
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        smooth_image(100 + i).save(folder / f"img-{i:02d}.png")
    names = iter(f"photo-{i}" for i in range(1000))
    original = next(n for n in names if key_fraction(f"{n}.png") < 0.5)  # -> split db
    twin = next(n for n in names if key_fraction(f"{n}.png") >= 0.5)  # -> split train
    resaved = next(n for n in names if key_fraction(f"{n}.jpg") >= 0.5)
    picture = smooth_image(7)
    picture.save(folder / f"{original}.png")
    picture.save(folder / f"{twin}.png")
    picture.save(folder / f"{resaved}.jpg", quality=90)

    assert build_parser().parse_args(["db", "build", "x", "--out", "y"]).split == "db"
    db_dir = tmp_path / "db"
    assert main(["db", "build", str(folder), "--out", str(db_dir), "--no-progress"]) == 0
    db = Database.open(db_dir)
    assert db.split == "db" and f"{original}.png" in db.keys  # default split: db, not all
    assert f"{twin}.png" not in db.keys and f"{resaved}.jpg" not in db.keys

    out = tmp_path / "nb.safetensors"
    args = ["db", "neighbors", str(db_dir), "--queries", str(folder), "-k", "3", "--k-p", "2"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    nb = load_neighbors(out)
    src = FolderSource(folder)
    keys = [src.key(int(i)) for i in nb.query_ids]
    original_row = db.keys.index(f"{original}.png")
    for name in (f"{twin}.png", f"{resaved}.jpg"):
        q = keys.index(name)
        # without exclusion the original is the copy's nearest database row ...
        z = ProjectionEncoder().encode_images([src.load(int(nb.query_ids[q]))])
        assert db.search(z, 1)[1][0, 0] == original_row
        # ... with it, the original is never a neighbour
        assert original_row not in nb.nn_rows[q]
    ex = nb.meta["exclusion"]
    assert ex["items_disjoint"] and ex["excluded_self"] == 0
    assert ex["excluded_exact_duplicates"] == 1  # the twin: same pixels, other name
    assert ex["excluded_near_duplicates"] == 1  # the JPEG: caught by the derived threshold
    twin_id = [src.key(i) for i in range(len(src))].index(f"{twin}.png")
    assert content_hash(src.load(twin_id)) == db.content_hashes[original_row]
    err = capsys.readouterr().err
    assert "excluded 0 self matches, 1 exact duplicates and 1 near-duplicates" in err

    # an unwritable --out is refused in one line, before anything is encoded
    assert main([*args, "--out", "/proc/rdm-test/nb.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "rdm db: error: cannot write neighbours file /proc/rdm-test/nb.safetensors (No such "
        "file or directory); choose another path"
    ]


# ---- the real encoder on Fashion-MNIST (slow) ---------------------------------------------------


@pytest.mark.slow
def test_fashion_mnist_d_equals_x_agrees_like_disjoint_splits(tmp_path):
    """D = X: class agreement of the 4 neighbours equals the disjoint-split figure (≈ 0.76),
    and exclusion beyond the self matches stays a small share (run: pytest -m slow -k fashion)."""
    from rdm.data import open_source
    from rdm.encoders import load_encoder

    src, enc = open_source("fashion-mnist"), load_encoder("default")
    agreement = {}
    for name in ("train", "db"):
        db = Database.open(build_database(src, name, enc, tmp_path / name, progress=False))
        nb = load_neighbors(
            compute_neighbors(
                db, src, "train", enc, k=20, out=tmp_path / f"{name}.st", progress=False
            )
        )
        captions = np.asarray(db.captions, dtype=object)
        query_captions = np.array([src.caption(int(i)) for i in nb.query_ids], dtype=object)
        agreement[name] = float(np.mean(captions[nb.nn_rows[:, :4]] == query_captions[:, None]))
        ex = nb.meta["exclusion"]
        assert ex["excluded_share"] < 0.01, json.dumps(ex)[:2000]
        if name == "train":
            assert ex["excluded_self"] == len(nb.query_ids)
    assert agreement["train"] == pytest.approx(agreement["db"], abs=0.01)
    assert agreement["train"] > 0.7
