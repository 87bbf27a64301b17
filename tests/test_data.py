"""Image sources and safe decoding: bad files, odd modes, folders, Fashion-MNIST, emoji."""

from __future__ import annotations

import gzip
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdm.data import BadImage, SourceError, key_fraction, open_source
from rdm.data.fashion_mnist import CLASSES, DEFAULT_DIR, FashionMNIST
from rdm.data.folder import FolderSource
from rdm.data.images import decode_image, decode_image_bytes


def png_1bit(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, built row by row so a huge one costs ~0.1 s and ~50 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def reason(path: Path, **kwargs) -> str:
    with pytest.raises(BadImage) as info:
        decode_image(path, **kwargs)
    return str(info.value)


# --- decode_image: refusals ---------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    assert reason(tmp_path / "nope.png") == "missing file"
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason(tmp_path / "empty.png") == "zero-byte file"
    assert reason(tmp_path) == "not a file"
    with pytest.raises(BadImage, match="zero-byte"):
        decode_image_bytes(b"")


def test_text_named_png_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    assert reason(tmp_path / "notes.png") == "not an image: cannot identify image file"


def test_formats_outside_the_allow_list_are_refused(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # Pillow would hand it to Ghostscript
    (tmp_path / "x.png").write_bytes(eps)
    assert reason(tmp_path / "x.png") == "not an image: cannot identify image file"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    data = encoded(noise(64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert reason(path).startswith("truncated: ")
    path.write_bytes(data)  # the same file whole decodes
    assert decode_image(path).size == (64, 64)


def test_corrupt_png_data_is_refused(tmp_path):
    data = bytearray(encoded(noise(64), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)  # zeros inside the compressed stream
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert reason(tmp_path / "bad.png").startswith(("corrupt: ", "truncated: "))


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_1bit(20_000, 20_000))
    assert path.stat().st_size < 200_000  # 400M pixels in a small file: a bomb
    start = time.perf_counter()
    assert reason(path) == "decompression bomb: 400000000 pixels > limit 64000000"
    assert time.perf_counter() - start < 1.0  # refused from the header, never decoded


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    path.write_bytes(png_1bit(100, 60))
    assert reason(path, max_pixels=5_000) == "decompression bomb: 6000 pixels > limit 5000"
    assert decode_image(path, max_pixels=6_000).size == (100, 60)


def test_pillow_bomb_warning_becomes_a_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow warns above this
    path = tmp_path / "warn.png"
    path.write_bytes(png_1bit(40, 40))  # 1600 px: Pillow's warning, not yet its error
    assert reason(path, max_pixels=1_000) == "decompression bomb: 1600 pixels > limit 1000"


# --- decode_image: modes --------------------------------------------------------------------------


def decode(data: bytes, tmp_path: Path, name: str) -> np.ndarray:
    (tmp_path / name).write_bytes(data)
    image = decode_image(tmp_path / name)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    rgb = decode(encoded(Image.fromarray(values), "PNG"), tmp_path, "deep.png")
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_float_and_32_bit_grey(tmp_path):
    ramp = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    floats = decode(encoded(Image.fromarray(ramp), "TIFF"), tmp_path, "f.tif")
    assert floats[0, :, 0].tolist() == [0, 128, 255]  # 0..1 floats
    ints = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    # mode I carries no depth: values up to 65535 are read as 16-bit
    assert decode(encoded(ints, "TIFF"), tmp_path, "i.tif")[0, :, 0].tolist() == [0, 4, 255]


def test_palette_with_transparency_goes_on_white(tmp_path):
    pal = Image.new("P", (4, 1), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0])
    pal.putpixel((3, 0), 1)  # index 1 is the transparent one
    for fmt in ("PNG", "GIF"):
        rgb = decode(encoded(pal, fmt, transparency=1), tmp_path, f"p.{fmt}")
        assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 3].tolist() == [255, 255, 255]
    assert decode(encoded(pal, "PNG"), tmp_path, "opaque.png")[0, 3].tolist() == [0, 255, 0]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgb = decode(encoded(rgba, "PNG"), tmp_path, "a.png")
    assert rgb[0, 0].tolist() == [255, 255, 255] and 120 <= rgb[0, 1, 0] <= 135
    la = decode(encoded(Image.new("LA", (1, 1), (0, 0)), "PNG"), tmp_path, "la.png")
    assert la[0, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg_and_one_bit(tmp_path):
    red = decode(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), tmp_path, "c.jpg")
    r, g, b = red[4, 4].tolist()
    assert r > 230 and g < 30 and b < 30
    one = decode(encoded(Image.new("1", (3, 3), 1), "BMP"), tmp_path, "one.bmp")
    assert (one == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rgb = decode(encoded(image, "JPEG", exif=exif), tmp_path, "phone.jpg")
    assert rgb.shape == (40, 20, 3)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode(data, tmp_path, "anim.gif")[0, 0].tolist() == [255, 0, 0]


def test_decode_bytes_matches_file(tmp_path):
    data = encoded(noise(16), "PNG")
    (tmp_path / "x.png").write_bytes(data)
    assert np.array_equal(
        np.asarray(decode_image_bytes(data)), np.asarray(decode_image(tmp_path / "x.png"))
    )
    with pytest.raises(BadImage, match="not an image"):
        decode_image_bytes(b"hello")


# --- FolderSource ---------------------------------------------------------------------------------


def make_folder(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise(8, seed=i).save(root / name, format="PNG")
    return root


def test_folder_finds_images_recursively_in_path_order(tmp_path):
    make_folder(tmp_path, ["b.png", "a/z.png", "a/B.PNG", ".hidden/x.png", "._mac.png"])
    noise(8).save(tmp_path / "photo.JPeG", format="JPEG")
    (tmp_path / "notes.md").write_text("skip me")
    src = FolderSource(tmp_path)
    assert [src.key(i) for i in range(len(src))] == ["a/B.PNG", "a/z.png", "b.png", "photo.JPeG"]
    assert src.spec == str(tmp_path.resolve())
    assert src.load(3).size == (8, 8)
    assert isinstance(open_source(str(tmp_path)), FolderSource)


def test_folder_captions_sidecar_csv_jsonl(tmp_path):
    csv_dir = make_folder(tmp_path / "csv", ["a.png", "b.png", "sub/c.png"])
    (csv_dir / "a.txt").write_text("  a sidecar wins \n")
    (csv_dir / "captions.csv").write_text(
        'file,caption\na.png,from csv\n./sub/c.png,"nested, with comma"\n'
    )
    src = FolderSource(csv_dir)
    assert [src.caption(i) for i in range(3)] == ["a sidecar wins", "", "nested, with comma"]

    jsonl_dir = make_folder(tmp_path / "jsonl", ["a.png", "b.png"])
    lines = [{"file": "b.png", "caption": "from jsonl"}, {"file": "a.png", "caption": None}]
    (jsonl_dir / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = FolderSource(jsonl_dir)
    assert [src.caption(0), src.caption(1)] == ["", "from jsonl"]


def test_folder_bad_caption_files_name_the_file(tmp_path):
    make_folder(tmp_path, ["a.png"])
    (tmp_path / "captions.csv").write_text("name,text\na.png,x\n")
    with pytest.raises(SourceError, match=r"captions\.csv.*'file,caption'"):
        FolderSource(tmp_path)
    (tmp_path / "captions.csv").unlink()
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\nnot json\n')
    with pytest.raises(SourceError, match=r"captions\.jsonl' line 2"):
        FolderSource(tmp_path)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="holds no images") as info:
        FolderSource(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(SourceError, match="does not exist"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(encoded(noise(4), "PNG"))
    with pytest.raises(SourceError, match="is not a directory"):
        FolderSource(tmp_path / "file.png")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "missing"))


def test_folder_ids_do_not_shift_around_a_corrupt_file(tmp_path):
    make_folder(tmp_path, ["a.png", "c.png"])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = FolderSource(tmp_path)
    assert [src.key(i) for i in range(3)] == ["a.png", "b.png", "c.png"]
    assert np.asarray(src.load(2)).tobytes() == np.asarray(noise(8, seed=1)).tobytes()
    with pytest.raises(BadImage):
        src.load(1)


def test_splits_are_disjoint_complete_and_deterministic(tmp_path):
    names = [f"d{i // 10}/img{i:03d}.png" for i in range(60)]
    make_folder(tmp_path, names)
    src = FolderSource(tmp_path)
    train, db = src.split_ids("train"), src.split_ids("db")
    assert len(np.intersect1d(train, db)) == 0
    assert np.array_equal(np.union1d(train, db), src.split_ids("all"))
    assert len(src.split_ids("test")) == 0
    assert 10 < len(db) < 50  # a hash half, not everything on one side
    assert np.array_equal(FolderSource(tmp_path).split_ids("db"), db)
    assert all(key_fraction(src.key(int(i))) < 0.5 for i in db)
    with pytest.raises(SourceError, match="unknown split"):
        src.split_ids("val")


# --- Fashion-MNIST --------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def test_fashion_mnist_parses_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    train_y, test_y = np.arange(20) % 10, np.array([9, 8, 7, 6])
    write_idx(tmp_path / "train-images-idx3-ubyte", train_x, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_y, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, gz=False)
    src = open_source(f"fashion-mnist:{tmp_path}")
    assert len(src) == 24 and src.spec == f"fashion-mnist:{tmp_path.resolve()}"
    assert (src.key(3), src.caption(3)) == ("train/3", "Dress")
    assert (src.key(21), src.caption(21)) == ("test/1", "Bag")
    assert np.array_equal(src.pixels([21, 0]), np.stack([test_x[1], train_x[0]]))
    assert np.array_equal(np.asarray(src.load(22))[..., 1], test_x[2])
    assert np.array_equal(src.split_ids("test"), np.arange(20, 24))
    assert np.array_equal(np.union1d(src.split_ids("train"), src.split_ids("db")), np.arange(20))


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist") as info:
        FashionMNIST(tmp_path)
    assert str(tmp_path) in str(info.value) and "train-images-idx3-ubyte" in str(info.value)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"junk")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(SourceError, match="not a 1-d uint8 IDX file"):
        FashionMNIST(tmp_path)


@pytest.mark.skipif(not DEFAULT_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    src = open_source("fashion-mnist")
    assert len(src) == 70_000 and src.CLASSES == CLASSES
    assert np.bincount(src.labels).tolist() == [7000] * 10
    assert (src.key(0), src.key(60_000), src.caption(0)) == ("train/0", "test/0", "Ankle boot")
    assert src.pixels(np.arange(0, 70_000, 7000)).shape == (10, 28, 28)
    image = src.load(69_999)
    assert image.size == (28, 28) and image.mode == "RGB"
    train, db, test = (src.split_ids(s) for s in ("train", "db", "test"))
    assert 29_000 < len(train) < 31_000 and len(train) + len(db) == 60_000 and len(test) == 10_000
    assert len(np.intersect1d(train, db)) == 0 and test.min() == 60_000
    assert "test" in src.split_rule()


# --- emoji ----------------------------------------------------------------------------------------


def emoji_or_skip(style: str, size: int = 64):
    try:
        return open_source(f"emoji-{style}:{size}")
    except SourceError as exc:
        pytest.skip(f"emoji fonts missing: {exc}")


def test_emoji_styles_share_items_and_differ_in_pixels():
    colour, mono = emoji_or_skip("color"), emoji_or_skip("mono")
    assert len(colour) == len(mono) > 100
    keys = [colour.key(i) for i in range(len(colour))]
    assert keys == [mono.key(i) for i in range(len(mono))]
    assert [colour.caption(i) for i in range(len(colour))] == [
        mono.caption(i) for i in range(len(mono))
    ]
    i = keys.index("U+1F600")
    assert colour.caption(i) == "grinning face"
    a, b = np.asarray(colour.load(i)), np.asarray(mono.load(i))
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
    # colour has colour, mono is grey; both have white corners (drawn on white)
    assert np.ptp(a.astype(int), axis=2).max() > 100 and np.ptp(b.astype(int), axis=2).max() < 5
    assert a[0, 0].tolist() == b[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(colour.split_ids("db"), mono.split_ids("db"))


def test_emoji_size_and_bad_specs():
    assert emoji_or_skip("mono", 32).load(0).size == (32, 32)
    with pytest.raises(SourceError, match="whole number"):
        open_source("emoji-color:big")
    with pytest.raises(SourceError, match="out of range"):
        open_source("emoji-color:4")
