"""The ``rdm serve`` page in a real browser: Debian's Chromium (``apt-get install chromium``)
driven by Playwright from PyPI through ``executable_path`` (Playwright's own browser download is
not possible offline). The server runs on loopback in this process over the tiny world of
tests/test_serve_api.py, so the model's calls can be counted.

Skipped when no Chromium is found (set RDM_CHROMIUM to its path if it is not /usr/bin/chromium).
The screenshot for the README uses the shipped demo model and the demo database, and is slow:

    RDM_DEMO_DB=runs/demo/db .venv/bin/python -m pytest -m slow tests/test_serve_browser.py
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_api import make_app, png, slow_model, world  # noqa: F401  (fixtures)

from rdm.serve import Limits, create_app, serving

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
CHROMIUM = os.environ.get("RDM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium"
)
ROOT = Path(__file__).resolve().parents[1]
UPLOAD_CAP = 16 * 1024


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to run as root, as CI does
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    app = make_app(world, max_upload_bytes=UPLOAD_CAP)
    with serving(app) as url:
        yield url, app


@pytest.fixture
def page(browser, server):
    url, _ = server
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert errors == []  # no script error on the page


def search(page, text: str) -> list[str]:
    page.fill("#search-text", text)
    page.click("#search-button")
    expect(page.locator("#search-status")).to_contain_text("nearest")
    return page.locator("#search-results .card .caption").all_inner_texts()


def until(page, js: str, timeout: float = 30.0):
    """Poll ``js`` (an expression) until it is truthy. page.wait_for_function evaluates strings
    with eval, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {js}"
        time.sleep(0.02)


def test_a_text_search_shows_the_neighbours(page, world):  # noqa: F811
    captions = search(page, "a blue thing")
    assert len(captions) == 8 and all(c.endswith("square") for c in captions)
    # the captions are the database's, in the API's order, and every image loaded
    db = world["dbs"]["squares"]
    q = world["enc"].encode_texts(["a blue thing"])[0]
    top = np.argsort(-(db.embeddings.astype(np.float32) @ q), kind="stable")[:8]
    assert captions == [db.captions[r] for r in top]
    until(page, "[...document.querySelectorAll('#search-results img')].every(i => i.complete)")
    widths = page.eval_on_selector_all(
        "#search-results img", "imgs => imgs.map(i => i.naturalWidth)"
    )
    assert widths == [12] * 8


def test_switching_the_database_changes_the_neighbours(page):
    assert all(c.endswith("square") for c in search(page, "a blue thing"))
    page.select_option("#db", "discs")  # the page repeats the search in the new database
    until(
        page,
        "[...document.querySelectorAll('#search-results .caption')].every(c => "
        "c.textContent.endsWith('disc'))",
    )
    assert "discs" in page.inner_text("#search-status")
    # the database of another encoder is not offered, and the page says so
    assert page.eval_on_selector_all("#db option", "os => os.map(o => o.value)") == [
        "squares",
        "discs",
    ]
    assert "other" in page.inner_text("#refused")


def test_a_generation_shows_progress_its_neighbours_and_the_image(page, slow_model, tmp_path):  # noqa: F811
    page.fill("#gen-text", "a red square")
    page.fill("#gen-n", "3")
    page.fill("#gen-steps", "20")
    page.click("#generate-button")
    page.wait_for_selector("#progress[data-state=done]", timeout=30_000)
    events = int(page.get_attribute("#progress", "data-events"))
    assert events >= 2  # progress arrived while it ran, not only at the end
    rows = page.locator(".sample-row")
    assert rows.count() == 3
    for i in range(3):
        assert rows.nth(i).locator(".neighbour").count() == 3  # k = 3 conditioning neighbours
    until(page, "[...document.querySelectorAll('.sample img')].every(i => i.complete)")
    sizes = page.eval_on_selector_all(".sample img", "imgs => imgs.map(i => i.naturalWidth)")
    assert sizes == [8] * 3
    # the grid downloads as a PNG: 3 rows of neighbours + sample
    with page.expect_download() as download:
        page.click("#download")
    grid = Image.open(download.value.path())
    assert grid.format == "PNG" and grid.size[1] > 3 * 8
    shot = page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    assert Image.open(io.BytesIO(shot)).size[0] == 1280


def test_generating_from_an_uploaded_image_puts_it_first(page, world, tmp_path):  # noqa: F811
    query = tmp_path / "query.png"
    world["squares"].load(2).save(query)
    page.check("input[name=mode][value=image]")
    page.set_input_files("#gen-image", str(query))
    page.fill("#gen-n", "1")
    page.fill("#gen-steps", "2")
    page.click("#generate-button")
    page.wait_for_selector("#progress[data-state=done]", timeout=30_000)
    first = page.locator(".sample-row .card").first
    assert first.inner_text().startswith("your image")
    assert page.locator(".sample-row .neighbour").count() == 3


def test_cancel_stops_the_work(page, server, slow_model):  # noqa: F811
    _, app = server
    page.fill("#gen-text", "a red square")
    page.fill("#gen-n", "1")
    page.fill("#gen-steps", "250")  # 250 x >= 10 ms: seconds of work
    page.click("#generate-button")
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"step ([3-9]|\d\d)"))
    page.click("#cancel-button")
    page.wait_for_selector("#progress[data-state=cancelled]", timeout=30_000)
    calls = len(slow_model)
    time.sleep(0.3)
    assert len(slow_model) == calls < 100  # nothing ran after the cancel
    assert "cancelled by the client" in page.inner_text("#generate-status")
    assert page.is_enabled("#generate-button") and not page.is_visible("#download")


def test_an_oversized_upload_is_refused(page):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = png(Image.fromarray(noise))
    assert len(data) > UPLOAD_CAP
    page.set_input_files(
        "#search-image", files=[{"name": "big.png", "mimeType": "image/png", "buffer": data}]
    )
    page.click("#search-button")
    expect(page.locator("#search-status")).to_have_class(re.compile("error"))
    status = page.inner_text("#search-status")
    assert status.startswith("413") and f"{UPLOAD_CAP} bytes" in status
    assert page.locator("#search-results .card").count() == 0


@pytest.mark.slow
def test_screenshot_of_the_demo_for_the_readme(browser):
    """docs/serve.png: the shipped model and the Fashion-MNIST demo database (RDM_DEMO_DB,
    default runs/demo/db, as 'rdm serve' builds it)."""
    from rdm.demo import SHIPPED_RUN
    from rdm.pipeline import RDMPipeline

    db = Path(os.environ.get("RDM_DEMO_DB", "runs/demo/db"))
    if not (db / "manifest.json").is_file():
        pytest.skip(f"no demo database at {db}: run 'rdm demo' or set RDM_DEMO_DB")
    pipe = RDMPipeline.from_pretrained(SHIPPED_RUN, db)
    app = create_app(pipe, {"fashion-mnist": db}, limits=Limits())
    with serving(app) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        search(page, "Ankle boot")
        page.fill("#gen-text", "Sneaker")
        page.fill("#gen-n", "4")
        page.click("#generate-button")
        page.wait_for_selector("#progress[data-state=done]", timeout=300_000)
        until(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(ROOT / "docs" / "serve.png"), full_page=True)
        context.close()
    assert Image.open(ROOT / "docs" / "serve.png").size[0] == 1280
