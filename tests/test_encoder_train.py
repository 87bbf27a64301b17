"""Contrastive CLIP training: batch composition, metrics, and a few real steps on a tiny folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rdm.encoder_train import (
    ARCH,
    RECORD_NAME,
    BatchSampler,
    CaptionedImages,
    ClipTrainConfig,
    image_retrieval_precision,
    text_retrieval_precision,
    train_clip,
)
from rdm.encoders import Encoder, load_encoder

COLOURS = {"red square": (220, 30, 30), "green disc": (30, 200, 40), "blue bar": (40, 40, 220)}


def make_folder(root, per_class: int = 24, unique: int = 10):
    """Three class captions (24 noisy images each) and ``unique`` one-off captions."""
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for c, (caption, rgb) in enumerate(COLOURS.items()):
        for i in range(per_class):
            pixels = np.clip(rng.normal(rgb, 25, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}_{i:02d}.png")
            lines.append(json.dumps({"file": f"c{c}_{i:02d}.png", "caption": caption}))
    for i in range(unique):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"u{i:02d}.png")
        lines.append(json.dumps({"file": f"u{i:02d}.png", "caption": f"pattern number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_config(tmp_path, source, **overrides) -> ClipTrainConfig:
    values = dict(
        out=tmp_path / "clip",
        sources=(str(source),),
        steps=40,
        batch_size=8,
        class_groups=3,
        class_min_images=20,
        lr=3e-3,
        warmup_steps=5,
        autocast=False,
        evaluate=False,
        embed_dim=16,
        image_size=16,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        text_width=32,
        text_layers=1,
        context_length=8,
    )
    return ClipTrainConfig(**(values | overrides))


def test_train_clip_learns_and_saves_a_loadable_encoder(tmp_path):
    source = make_folder(tmp_path / "data")
    out = train_clip(tiny_config(tmp_path, source), command="test")
    record = json.loads((out / RECORD_NAME).read_text())
    losses = [loss for _, loss in record["loss_history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert record["command"] == "test" and record["steps"] == 40 and record["seed"] == 0
    assert record["data"] == {
        "images": 82,
        "captions": 13,
        "class_captions": 3,
        "unique_captions": 10,
        "skipped": {},
    }

    encoder = load_encoder(str(out))
    assert encoder.identity["arch"] == ARCH and encoder.dim == 16
    z_text = encoder.encode_texts(list(COLOURS))  # (3, 16)
    z_image = encoder.encode_images([Image.new("RGB", (16, 16), rgb) for rgb in COLOURS.values()])
    # each colour's caption is closest to that colour's image
    assert ((z_text @ z_image.T).argmax(axis=1) == np.arange(3)).all()


def test_training_is_reproducible_from_the_seed(tmp_path):
    source = make_folder(tmp_path / "data")
    a = train_clip(tiny_config(tmp_path, source, out=tmp_path / "a", steps=4), command="a")
    b = train_clip(tiny_config(tmp_path, source, out=tmp_path / "b", steps=4), command="b")
    ident = [load_encoder(str(p)).identity["weights_sha256"] for p in (a, b)]
    assert ident[0] == ident[1]


def test_batches_never_pair_two_items_with_one_caption():
    # captions 0-2 are classes (30 images each), 3-22 unique (two "styles" each, like emoji)
    caption_ids = np.concatenate([np.repeat([0, 1, 2], 30), np.repeat(np.arange(3, 23), 2)])
    data = CaptionedImages(
        pixels=np.zeros((len(caption_ids), 3, 4, 4), np.uint8),
        caption_ids=caption_ids,
        captions=[str(i) for i in range(23)],
    )
    cfg = ClipTrainConfig(batch_size=12, class_groups=4, class_min_images=20)
    sampler = BatchSampler(data, cfg, np.random.default_rng(0))
    seen = []
    for _ in range(30):
        batch = sampler.sample()
        assert batch.class_images.shape == (4, 3) and len(batch.unique_images) == 9
        captions = np.concatenate([batch.class_captions, batch.unique_captions])
        assert len(np.unique(captions)) == len(captions)  # distinct within every ClipLoss term
        # every image carries the caption it is paired with
        np.testing.assert_array_equal(
            caption_ids[batch.class_images], np.tile(batch.class_captions, (4, 1))
        )
        np.testing.assert_array_equal(caption_ids[batch.unique_images], batch.unique_captions)
        seen.extend(batch.unique_captions)
    counts = np.bincount(seen, minlength=23)[3:]
    assert counts.max() - counts.min() <= 1  # unique captions are drawn in epochs


class LabelEncoder(Encoder):
    """Texts are one-hot class vectors; lets the text metric run on given embeddings."""

    identity = {"dim": 10}

    def encode_images(self, images):
        raise NotImplementedError

    def encode_texts(self, texts):
        return np.eye(10, dtype=np.float32)[: len(texts)]


def test_retrieval_precision_metrics_on_known_embeddings():
    labels = np.repeat(np.arange(10), 6)  # 60 images, 6 per class
    rng = np.random.default_rng(0)
    clean = np.eye(10, dtype=np.float32)[labels] + 0.01 * rng.standard_normal((60, 10)).astype(
        np.float32
    )
    assert text_retrieval_precision(LabelEncoder(), k=4, test_set=(clean, labels)) == 1.0
    assert image_retrieval_precision(clean, labels, k=4) == 1.0
    # half the classes point at the wrong images: exactly half the retrieved images are right
    mixed = clean.copy()
    mixed[labels < 5] = np.eye(10, dtype=np.float32)[(labels[labels < 5] + 1) % 5]
    assert text_retrieval_precision(LabelEncoder(), k=4, test_set=(mixed, labels)) == 0.5


def test_sources_without_captions_are_refused(tmp_path):
    from rdm.encoder_train import TrainDataError

    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a.png")
    with pytest.raises(TrainDataError, match="no captioned training images"):
        train_clip(tiny_config(tmp_path, tmp_path / "data"))


def test_cli_trains_and_evaluates(tmp_path, capsys):
    from rdm.cli import main

    source = make_folder(tmp_path / "data")
    flags = "--steps 2 --batch-size 8 --class-groups 2 --no-autocast --no-evaluate --embed-dim 16"
    flags += " --image-size 16 --patch-size 8 --vision-width 32 --vision-layers 1 --text-width 32"
    flags += " --text-layers 1 --context-length 8"
    argv = [
        "encoder",
        "train",
        "--out",
        str(tmp_path / "enc"),
        "--sources",
        str(source),
        *flags.split(),
    ]
    assert main(argv) == 0
    assert load_encoder(str(tmp_path / "enc")).dim == 16
    assert "saved" in capsys.readouterr().out
    assert main(["encoder", "eval", "NoSuchNet:x"]) == 2
    assert "unknown open_clip architecture 'NoSuchNet'" in capsys.readouterr().err
