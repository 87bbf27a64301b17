"""Contact sheets, image grids and atomic PNG writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from rdm.errors import RdmError
from rdm.sheets import PAD, _fit, contact_sheet, image_grid, save_png


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (28, 28)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_contact_sheet_layout_and_content():
    colours = [solid((255, 0, 0)), solid((0, 0, 255), (40, 20)), solid((0, 200, 0))]
    images = colours * 3 + [solid((0, 0, 0))]
    plain = contact_sheet(images, cols=4, cell=50)
    assert plain.size == (4 * (50 + PAD) + PAD, 3 * (50 + PAD) + PAD)
    sheet = np.asarray(plain)
    # cell 0 red at its centre, cell 1 (a wide image, letterboxed) blue, cell 9 black
    assert sheet[PAD + 25, PAD + 25].tolist() == [255, 0, 0]
    assert sheet[PAD + 25, PAD + 54 + 25].tolist() == [0, 0, 255]
    assert sheet[PAD + 2 * 54 + 25, PAD + 54 + 25].tolist() == [0, 0, 0]

    labelled = contact_sheet(
        images,
        captions=[f"item {i}" for i in range(10)],
        scores=list(np.linspace(0, 1, 10)),
        cols=4,
        cell=50,
        title="query results",
    )
    assert labelled.width == plain.width and labelled.height > plain.height + 3 * 2 * 8
    assert labelled.mode == "RGB"


def test_small_images_are_upscaled_by_whole_pixels():
    checker = Image.fromarray((np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8))
    px = np.asarray(contact_sheet([checker], cell=30))  # 4 px -> 28 px: 7x7 blocks
    cell = px[PAD + 1 : PAD + 29, PAD + 1 : PAD + 29, 0]
    assert set(np.unique(cell).tolist()) == {0, 255}  # no blurred in-between greys
    assert (cell[:7, :7] == 0).all() and (cell[:7, 7:14] == 255).all()


def test_contact_sheet_default_columns_and_modes():
    images = [Image.new("L", (10, 10), 0), Image.new("RGBA", (10, 10), (0, 0, 0, 0))] * 5
    sheet = contact_sheet(images, cell=40)
    assert sheet.width == 4 * (40 + PAD) + PAD  # ceil(sqrt(10)) columns
    # transparent RGBA shows the white page, L is black
    px = np.asarray(sheet)
    assert px[PAD + 20, PAD + 20].tolist() == [0, 0, 0]
    assert px[PAD + 20, PAD + 44 + 20].tolist() == [255, 255, 255]


def test_contact_sheet_rejects_bad_input():
    with pytest.raises(RdmError, match="no images"):
        contact_sheet([])
    with pytest.raises(ValueError, match="captions has 1 entries for 2 images"):
        contact_sheet([solid((0, 0, 0))] * 2, captions=["one"])


def test_long_captions_are_cut_to_fit():
    font = ImageFont.load_default(size=11)
    text = "a very long caption that cannot possibly fit in a small cell"
    cut = _fit(text, font, 60)
    assert cut.endswith("…") and font.getlength(cut) <= 60 and text.startswith(cut[:-1])
    assert _fit("short", font, 60) == "short"


def test_image_grid_sizes_and_ragged_rows():
    rows = [[solid((255, 0, 0))] * 3, [solid((0, 0, 255))]]
    grid = image_grid(rows, cell=32, gap=2)
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    px = np.asarray(grid)
    assert px[2 + 16, 2 + 2 * 34 + 16].tolist() == [255, 0, 0]
    assert px[34 + 2 + 16, 2 + 16].tolist() == [0, 0, 255]
    assert px[34 + 2 + 16, 2 + 34 + 16].tolist() != [0, 0, 255]  # the missing cell is empty

    labelled = image_grid(rows, row_labels=["neighbours", "samples"], cell=32, gap=2)
    assert labelled.height == grid.height and labelled.width > grid.width
    with pytest.raises(RdmError, match="no images"):
        image_grid([[]])


def test_save_png_is_atomic_and_creates_parents(tmp_path):
    image = solid((1, 2, 3), (5, 4))
    path = save_png(image, tmp_path / "a" / "b" / "sheet.png")
    assert path == tmp_path / "a" / "b" / "sheet.png"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["sheet.png"]  # no .tmp left


def test_save_png_unwritable_names_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "sheet.png"  # a file where a folder should be
    with pytest.raises(RdmError, match="cannot write PNG") as info:
        save_png(solid((0, 0, 0)), target)
    assert str(target) in str(info.value)
