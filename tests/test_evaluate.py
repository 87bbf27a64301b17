"""``rdm eval`` end to end on a tiny world: a folder of captioned colour squares split into a
database and a training set, a tiny encoder and a 3-step run (from test_pipeline's fixture), and
a tiny classifier trained through ``rdm eval train-classifier``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_pipeline import world  # noqa: F401  (the module-scoped tiny run)

from rdm.cli import main
from rdm.evaluation import metrics
from rdm.evaluation.evaluate import distribution_metrics, parse_real


@pytest.fixture(scope="module")
def clf(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("clf") / "classifier"
    args = ["eval", "train-classifier", "--data", str(world["images"]), "--train-split", "train"]
    args += ["--test-split", "db", "--resolution", "8", "--epochs", "2", "--min-accuracy", "0"]
    assert main([*args, "--out", str(out)]) == 0
    return out


def _eval_args(world, clf, out, *extra):  # noqa: F811
    real = f"{world['images']}:db"
    args = ["eval", str(world["run"]), "--db", str(world["db"]), "--real", real]
    args += ["--floor-split", "train", "--classifier", str(clf), "--cache", str(out / "cache")]
    return [*args, "--steps", "2", "--out", str(out / "report"), *extra]


@pytest.fixture(scope="module")
def report(world, clf, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("eval")
    assert main(_eval_args(world, clf, out, "--n", "6", "--mode", "image")) == 0
    return out, json.loads((out / "report" / "eval.json").read_text())


def test_report_holds_every_measure_with_the_floor(report):
    out, r = report
    assert r["n"] == 6 and r["extractor"]["name"] == "classifier"
    for which in ("model", "floor"):
        m = r["metrics"][which]
        for key in ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage"):
            assert np.isfinite(m[key]), (which, key)
        assert m["kid_subset_size"] == 3 and m["pr_k"] == 3 and m["dc_k"] == 5
    assert set(r["colour"]) == {"samples", "real", "floor"}
    assert 0 <= r["faithfulness"]["share"] <= 1 and r["faithfulness"]["n"] == 6
    # the tiny folder source has no split disjoint from both X and D: said, not faked
    assert "no real set disjoint" in r["memorisation"]["note"]
    assert r["machine"]["cpu"] and r["seed"] == 0
    md = (out / "report" / "eval.md").read_text()
    assert "| FD |" in md and "real floor" in md and "Faithfulness" in md
    samples = sorted((out / "report" / "samples").glob("*.png"))
    assert len(samples) == 6 and (out / "report" / "samples" / "conditioning.jsonl").is_file()


def test_figures_recompute_from_the_written_samples_and_the_cache(world, clf, report):  # noqa: F811
    """--samples reads the PNGs back: every figure is the same, real features come from the cache
    (a grid.png beside the samples, as 'rdm sample' writes one, is not a sample)."""
    out, r = report
    Image.new("RGB", (40, 20)).save(out / "report" / "samples" / "grid.png")
    again = out / "again"
    args = _eval_args(world, clf, out, "--samples", str(out / "report" / "samples"))
    args[args.index("--out") + 1] = str(again)
    assert main(args) == 0
    r2 = json.loads((again / "eval.json").read_text())
    assert r2["metrics"] == r["metrics"]
    assert r2["faithfulness"] == r["faithfulness"]
    assert r2["colour"] == r["colour"]


def test_floor_is_the_metrics_of_two_real_sets(report, world, clf):  # noqa: F811
    """The floor in the report equals the metrics recomputed from the cached real features."""
    from safetensors.numpy import load_file

    out, r = report
    cached = {}
    for p in (out / "cache").glob("classifier-*.safetensors"):
        meta_key = json.loads(_metadata(p)["key"])
        cached[meta_key["set"]] = load_file(p)["features"]
    want = distribution_metrics(cached["ref"], cached["floor"], seed=0)
    assert r["metrics"]["floor"] == pytest.approx(want)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return f.metadata()


@pytest.mark.parametrize("mode", ["text", "unconditional", "class-pool"])
def test_other_modes_run(world, clf, tmp_path, mode):  # noqa: F811
    args = _eval_args(world, clf, tmp_path, "--n", "6", "--mode", mode, "--memo-n", "0")
    if mode == "class-pool":
        args += ["--pool-size", "4"]
    assert main(args) == 0
    r = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert r["mode"] == mode and "memorisation" not in r
    if mode in ("text", "class-pool"):
        assert r["faithfulness"]["target"] == "prompt class"


@pytest.mark.parametrize(
    "text_mode, n_rows", [("text", 0), ("text+neighbors", 2), ("neighbors", 3)]
)
def test_text_modes_retrieve_as_many_rows_as_they_say(world, clf, tmp_path, text_mode, n_rows):  # noqa: F811
    """The paper's three text conditionings: the prompt alone, the prompt before k-1 retrieved
    neighbours, or k neighbours retrieved by the prompt (the tiny run has k = 3)."""
    args = _eval_args(world, clf, tmp_path, "--n", "6", "--mode", "text", "--memo-n", "0")
    assert main([*args, "--text-mode", text_mode]) == 0
    r = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert r["sampling"]["text_mode"] == text_mode
    records = (tmp_path / "report" / "samples" / "conditioning.jsonl").read_text().splitlines()
    assert [len(json.loads(line)["rows"]) for line in records] == [n_rows] * 6


def test_clip_features_are_the_database_encoders(world, clf, tmp_path):  # noqa: F811
    args = _eval_args(world, clf, tmp_path, "--n", "6", "--features", "clip", "--memo-n", "0")
    assert main(args) == 0
    r = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert r["extractor"]["name"] == "clip" and r["extractor"]["dim"] == 32
    assert "faithfulness" not in r  # a classifier's measure
    assert np.isfinite(r["metrics"]["model"]["fd"])


# --- bad input --------------------------------------------------------------------------------------


def _error(capsys, args) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_too_few_samples_say_how_many(world, clf, tmp_path, capsys):  # noqa: F811
    err = _error(capsys, _eval_args(world, clf, tmp_path, "--n", "3", "--memo-n", "0"))
    assert "3 samples are too few" in err and "at least 6 samples" in err
    assert not (tmp_path / "report" / "samples").exists()  # refused before sampling


def test_samples_of_another_size_are_refused(world, clf, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"s{i}.png")
    err = _error(capsys, _eval_args(world, clf, tmp_path, "--samples", str(folder)))
    assert "16x16 with 3 channels but the real reference is 8x8 RGB" in err


def test_a_classifier_of_other_classes_is_refused(world, tmp_path, capsys):  # noqa: F811
    # the shipped Fashion-MNIST classifier on colour squares: other classes (and another size)
    args = _eval_args(world, tmp_path, tmp_path, "--n", "6")
    args[args.index("--classifier") : args.index("--classifier") + 2] = []
    err = _error(capsys, args)
    assert "trained on other classes" in err


def test_an_inception_file_of_another_layout_is_refused(world, clf, tmp_path, capsys):  # noqa: F811
    import torch

    bad = tmp_path / "inception_v3_google.pth"
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768)}, bad)
    args = _eval_args(world, clf, tmp_path, "--n", "6", "--features", "inception")
    err = _error(capsys, [*args, "--inception-weights", str(bad)])
    assert "not the FID Inception layout" in err and "ImageNet" in err


def test_more_samples_than_the_real_split_holds(world, clf, tmp_path, capsys):  # noqa: F811
    err = _error(capsys, _eval_args(world, clf, tmp_path, "--n", "500"))
    assert "lower --n" in err


def test_parse_real():
    assert parse_real("fashion-mnist") == ("fashion-mnist", "test")
    assert parse_real("fashion-mnist:train") == ("fashion-mnist", "train")
    assert parse_real("fashion-mnist:/data/fm:db") == ("fashion-mnist:/data/fm", "db")
    assert parse_real("emoji-color:32") == ("emoji-color:32", "test")


def test_distribution_metrics_are_the_metric_functions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1, size=(30, 4))
    m = distribution_metrics(x, y, seed=3)
    assert m["fd"] == metrics.frechet_distance(x, y)
    assert (m["kid"], m["kid_std"], m["kid_subset_size"]) == metrics.kid(x, y, seed=3)
    assert (m["precision"], m["recall"]) == metrics.precision_recall(x, y)


class _ColourClassifier:
    """Names a square's colour from its mean pixel: grey when the channels agree, else the
    strongest channel (exact on the noisy squares of the tiny world)."""

    classes = ("red", "green", "blue", "grey")

    def predict(self, pixels):
        mean = pixels.reshape(len(pixels), -1, pixels.shape[-1]).mean(1)
        return np.where(np.ptp(mean, axis=1) < 40, 3, mean.argmax(1))


def test_neighbour_copy_share_reads_each_rows_image(world):  # noqa: F811
    """Copying a neighbour scores the share of (sample, row) pairs whose row image is of the
    sample's target class: with a classifier that is right on every image, that is the share the
    database captions give, row by row; samples without a target are skipped."""
    from rdm.database import Database
    from rdm.evaluation.evaluate import EvalRequest, _neighbour_copy_share
    from rdm.evaluation.images import View

    db = Database.open(world["db"])
    colour = [_ColourClassifier.classes.index(c.split()[1]) for c in db.captions]
    order = np.random.default_rng(0).permutation(len(db.captions)).tolist()
    records, start = [{"rows": [order[0], order[0]]}], 0  # a repeated row
    for size in [1, 4, 2, 3] * 3:  # records of mixed lengths, as text+neighbours has
        if order[start : start + size]:
            records.append({"rows": order[start : start + size]})
        start += size
    target = np.array([colour[rec["rows"][0]] for rec in records])
    target[1] = -1
    pairs = zip(records, target, strict=True)
    want = np.mean([t == colour[r] for rec, t in pairs if t >= 0 for r in rec["rows"]])
    assert 0 < want < 1  # the rows mix colours: a wrong row-to-image map would show
    req = EvalRequest(run=world["run"], db=world["db"], n=len(records), progress=False)
    got = _neighbour_copy_share(_ColourClassifier(), records, target, db, View(8, 3), req)
    assert got == pytest.approx(want)
