"""Feature extractors through their real loading paths (random-initialised weights saved to disk),
the model view of real images, colour / faithfulness / memorisation statistics, and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rdm.errors import RdmError
from rdm.evaluation import cache, classifier, inception, stats
from rdm.evaluation.features import ClassifierExtractor, load_extractor
from rdm.evaluation.images import ImageFormatError, View, as_pixels, model_view, require_view

# --- the FID Inception --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random FID Inception saved as a .pth state dict, as pytorch-fid ships its weights."""
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_NAME
    state = inception.random_state()
    torch.save(state, path)
    return path, state


def test_inception_loads_from_a_file_and_gives_pool3(inception_file, monkeypatch):
    path, _ = inception_file
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    ex = load_extractor("inception")  # through the environment variable
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    f = ex.features(pixels, progress=False)
    assert f.shape == (2, 2048) and f.dtype == np.float32 and f.std() > 0
    # grey is repeated into RGB; a row does not depend on its batch
    rgb = ex.features(np.repeat(pixels[1:], 3, axis=-1), progress=False)
    np.testing.assert_allclose(rgb[0], f[1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(f[0], f[1])
    assert len(ex.identity["weights_sha256"]) == 64


@pytest.mark.slow
def test_inception_blocks_match_torch_fidelitys_tensorflow_port(inception_file):
    """Same weights file in torch-fidelity's InceptionV3 (a bit-exact port of the TF graph): equal
    pool3. Inputs at 299 px so neither resizes; torch-fidelity's (u − 128) / 128 equals our
    2x − 1 for x = u / 256. (slow: two 299 px Inception forwards; run with -m slow)"""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path, state = inception_file
    net = inception.load(path)
    ref = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    u = torch.from_numpy(
        np.random.default_rng(1).integers(0, 256, (1, 3, 299, 299), dtype=np.uint8)
    )
    with torch.no_grad():
        (want,) = ref(u)
        got = inception.pool3(net, u.float() / 256)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


def test_inception_without_weights_says_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(RdmError, match="RDM_INCEPTION_WEIGHTS"):
        load_extractor("inception")
    with pytest.raises(RdmError, match="does not exist"):
        load_extractor("inception", inception_weights=tmp_path / "nope.pth")


def _layout_error(tmp_path, state: dict) -> str:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(RdmError) as info:
        inception.load(path)
    return str(info.value)


def test_inception_wrong_layouts_are_named(tmp_path, inception_file):
    _, good = inception_file
    state = {k: torch.zeros(1) for k in good}
    assert "566 of another shape" in _layout_error(tmp_path, state)
    aux = {**state, "AuxLogits.fc.weight": torch.zeros(1)}
    assert "torchvision's ImageNet inception_v3" in _layout_error(tmp_path, aux)
    assert "missing (e.g. Conv2d_1a_3x3.conv.weight" in _layout_error(
        tmp_path, {"fc.weight": torch.zeros(1)}
    )
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RdmError, match="cannot read Inception weights"):
        inception.load(junk)
    pickled = tmp_path / "object.pth"
    torch.save({"model": object.__new__(torch.nn.Identity)}, pickled)  # a pickled module
    with pytest.raises(RdmError, match="cannot read Inception weights"):
        inception.load(pickled)


# --- the domain classifier ------------------------------------------------------------------------


def _tiny_classifier(tmp_path, classes=("dark", "bright"), resolution=8, seed=0):
    cfg = classifier.ClassifierConfig(
        classes=list(classes), resolution=resolution, channels=(4, 8), feature_dim=6
    )
    torch.manual_seed(seed)
    model = classifier.DomainCNN(cfg).eval()
    return classifier.save(model, cfg, {"test_accuracy": 0.5}, tmp_path / "clf"), model, cfg


def test_classifier_round_trip_features_and_predictions(tmp_path):
    path, model, cfg = _tiny_classifier(tmp_path)
    ex = load_extractor("classifier", classifier=path)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    with torch.no_grad():
        f, logits = model(classifier.normalise(grey, cfg))
    np.testing.assert_allclose(ex.features(rgb, progress=False), f.numpy(), rtol=1e-5, atol=1e-6)
    assert (ex.predict(rgb) == logits.argmax(1).numpy()).all()
    assert ex.identity["classes"] == ["dark", "bright"] and ex.dim == 6


def test_classifier_refuses_other_sizes_classes_and_tampered_weights(tmp_path):
    path, _, _ = _tiny_classifier(tmp_path)
    ex = ClassifierExtractor(path)
    with pytest.raises(ImageFormatError, match="reads 8x8 images, these are 16x16"):
        ex.features(np.zeros((2, 16, 16, 1), np.uint8), progress=False)
    with pytest.raises(RdmError, match="trained on other classes"):
        ex.class_ids(["dark", "Sneaker"], "the database")
    assert list(ex.class_ids(["bright", "dark"], "x")) == [1, 0]
    weights = path / classifier.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RdmError, match="checksum"):
        ClassifierExtractor(path)


def test_classifier_training_learns_a_separable_task():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    images = (labels[:, None, None] * 150 + rng.uniform(0, 100, (256, 8, 8))).astype(np.float32)
    cfg = classifier.ClassifierConfig(
        classes=["dark", "bright"], resolution=8, channels=(4, 8), feature_dim=6
    )
    settings = classifier.TrainSettings(epochs=3, batch_size=32, lr=1e-2)
    model, record = classifier.train(
        images, labels, images[:64], labels[:64], cfg, settings, progress=False
    )
    assert record["test_accuracy"] == 1.0
    assert [h["epoch"] for h in record["training"]["history"]] == [1, 2, 3]


def test_shipped_classifier_meets_its_record():
    """The shipped classifier loads, says ≥ 90 % test accuracy, and classifies real test images."""
    from rdm.data import SourceError, open_source

    ex = ClassifierExtractor()
    assert ex.identity["test_accuracy"] >= 0.9
    try:
        source = open_source("fashion-mnist")
    except SourceError:
        pytest.skip("Fashion-MNIST is not installed")
    ids = source.split_ids("test")[:300]
    pixels = model_view([source.load(int(i)) for i in ids], View(32, 1))
    labels = ex.class_ids([source.caption(int(i)) for i in ids], "test")
    assert (ex.predict(pixels) == labels).mean() >= 0.85


# --- images in the model view ---------------------------------------------------------------------


def test_as_pixels_and_view_checks():
    grey = Image.fromarray(np.zeros((8, 8), np.uint8))
    rgb = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    assert as_pixels([grey, grey]).shape == (2, 8, 8, 1)
    assert as_pixels([rgb]).shape == (1, 8, 8, 3)
    with pytest.raises(ImageFormatError, match="mode RGBA"):
        as_pixels([rgb.convert("RGBA")])
    with pytest.raises(ImageFormatError, match="samples\\[1\\] is 8x8 with 1 channel but"):
        as_pixels([rgb, grey], "samples")
    with pytest.raises(
        ImageFormatError, match="are 8x8 with 1 channel but the real reference is 32x32 grey"
    ):
        require_view(as_pixels([rgb]), View(32, 1), "the samples")  # grey RGB -> 1 channel
    red = Image.fromarray(np.full((8, 8, 3), (200, 0, 0), np.uint8))
    with pytest.raises(ImageFormatError, match="have colour.*8x8 grey"):
        require_view(as_pixels([red]), View(8, 1), "the samples")
    with pytest.raises(ImageFormatError, match="are 8x8 with 1 channel but.*8x8 RGB"):
        require_view(as_pixels([grey]), View(8, 3), "the samples")


def test_model_view_is_the_training_transform():
    from rdm.train import image_tensor

    im = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    ).convert("RGB")
    grey, rgb = model_view([im], View(32, 1)), model_view([im], View(32, 3))
    want = ((image_tensor(im, 32).permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert grey.shape == (1, 32, 32, 1) and rgb.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(rgb[0], want.clip(0, 255).astype(np.uint8))
    np.testing.assert_array_equal(grey[0, ..., 0], rgb[0, ..., 0])


# --- statistics -----------------------------------------------------------------------------------


def test_colour_stats_known_answers():
    red = np.zeros((2, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    s = stats.colour_stats(red)
    assert s == pytest.approx(
        {"brightness": 1 / 3, "background": 1 / 3, "saturation": 1.0, "spread": 1.0, "cast": 1.0}
    )
    grey = np.full((3, 8, 8, 3), 51, np.uint8)
    grey[:, 2:-2, 2:-2] = 255  # bright centre, 0.2 frame
    g = stats.colour_stats(grey)
    assert g["background"] == pytest.approx(0.2) and g["spread"] == 0 and g["cast"] == 0
    assert g["brightness"] == pytest.approx((48 * 0.2 + 16 * 1.0) / 64)
    assert stats.colour_stats(grey[..., :1]) == pytest.approx(g)


def test_majority_breaks_ties_by_the_nearest():
    assert stats.majority(["Bag", "Coat", "Coat", "Bag"]) == "Bag"
    assert stats.majority(["Coat", "Bag", "Bag"]) == "Bag"
    assert stats.majority([]) is None


def test_share_closer_known_answers():
    real = np.array([1.0, 2.0, 3.0])
    assert stats.share_closer(np.array([0.5, 0.5]), real) == 1.0
    assert stats.share_closer(np.array([4.0]), real) == 0.0
    assert stats.share_closer(np.array([2.0]), real) == pytest.approx(0.5)  # 1 farther, 1 tie
    rng = np.random.default_rng(0)
    a, b = rng.random(4000), rng.random(4000)
    assert stats.share_closer(a, b) == pytest.approx(0.5, abs=0.02)


def test_faithfulness_skips_samples_without_a_target():
    got = stats.faithfulness(np.array([0, 1, 2, 2]), np.array([0, -1, 1, 2]))
    assert got == {"share": pytest.approx(2 / 3), "n": 3}


def test_memorisation_tells_copies_from_fresh_samples():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 5))
    ids = np.arange(1000, 1400)
    unseen = rng.normal(size=(100, 5))  # real images the training set does not contain
    fresh = rng.normal(size=(100, 5))  # a model that generalises: as far as unseen images
    copies = train[:100] + rng.normal(0, 1e-3, (100, 5))  # a model that memorised
    m_fresh = stats.memorisation_against(fresh, unseen, train, ids)
    m_copy = stats.memorisation_against(copies, unseen, train, ids)
    assert m_fresh["share_closer_than_real"] == pytest.approx(0.5, abs=0.1)
    assert m_copy["share_closer_than_real"] == 1.0 and m_copy["share_below_real_min"] == 1.0
    assert m_copy["searched"] == 400 and len(m_copy["closest"]) == 8
    assert all(c["id"] == 1000 + c["sample"] for c in m_copy["closest"])  # found its original
    assert m_copy["samples"]["median"] < 0.01 < m_copy["real"]["median"]


# --- the real-feature cache -------------------------------------------------------------------------


def test_cache_hits_misses_and_recovers_from_a_bad_file(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(3, 2)

    key = {"source": "s", "n": 3, "extractor": {"name": "clip", "dim": 2}}
    f1, hit1 = cache.cached_features(tmp_path, key, compute)
    f2, hit2 = cache.cached_features(tmp_path, key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(f1, f2)
    _, hit3 = cache.cached_features(tmp_path, {**key, "n": 4}, compute)
    assert not hit3 and len(calls) == 2
    (file,) = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"][:1]
    file.write_bytes(b"garbage")
    for p in tmp_path.glob("*.safetensors"):
        p.write_bytes(b"garbage")
    _, hit4 = cache.cached_features(tmp_path, key, compute)
    assert not hit4 and len(calls) == 3
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.npz"))
