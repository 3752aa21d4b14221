"""Files a user may upload that are not photos, in a real browser (Debian's chromium, Playwright,
`streamlit run app.py`): a truncated JPEG, a web page named .jpg, an empty file and a
100-megapixel PNG, to the public Demo page and to the Test page. Each gets a sentence under its
own name; no page shows a traceback, a server path or an object's repr. Every wait is bounded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit_app import free_port, start_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_MS = 90_000  # a page's first torch import and model load, on two busy cores
PROJECT = "insects"
# What each file is called, and the sentence the page must say about it (engine.images.BadImage's words).
SENTENCES = {
    "truncated.jpg": "Cannot read this file: not a readable image: damaged JPEG data.",
    "page.jpg": "Cannot read this file: not an image (HTML).",
    "empty.jpg": "Cannot read this file: empty file.",
    "huge.png": "Cannot read this file: too many pixels (10000x10000 > 50,000,000).",
}


def bad_files(folder: Path, photo: Path) -> list[Path]:
    from PIL import Image

    data = photo.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "page.jpg").write_text("<!doctype html><html><body>Not found</body></html>")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")  # one colour, 1 bit: ~12 kB, 100 megapixels
    return [folder / name for name in SENTENCES]


@pytest.fixture
def app(tmp_path):
    """The app on a home holding one published model (tests/model_fixture.py), stopped after."""
    from model_fixture import tiny_model

    from nanostream.store.db import Store

    model = tiny_model()
    with Store(tmp_path / "home") as store:
        store.create_project(PROJECT)
        store.record_model(PROJECT, model.model_id, model.path, {"accuracy": 1.0})
        store.set_published(model.model_id, True)
    port = free_port()
    server = start_app(tmp_path / "home", tmp_path / "streamlit.log", port,
                       "--server.headless", "true", "--server.address", "127.0.0.1")
    yield f"http://127.0.0.1:{port}", model
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def browser():
    assert Path(CHROMIUM).is_file(), f"chromium not found at {CHROMIUM}: install it with `apt-get install chromium`"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def assert_friendly(page) -> None:
    text = page.get_by_test_id("stMain").inner_text()
    assert "Traceback" not in text and "Error:" not in text, text
    assert not re.search(r"/(tmp|work|root|home|usr)/|<_io\.|0x[0-9a-f]{6}", text), text


def answered_as(page, name: str):
    """The name an answer is given under (ui.prediction_ui's bold line; the uploader lists it too)."""
    return page.get_by_test_id("stMain").locator("strong").get_by_text(name, exact=True)


def upload(page, label: str, files) -> None:
    uploader = page.locator("[data-testid='stFileUploader']").filter(has_text=label)
    uploader.locator("input[type='file']").set_input_files([str(f) for f in files])


def test_bad_files_get_a_sentence_on_the_demo_and_test_pages(app, browser, tmp_path, datasets):
    url, model = app
    files = bad_files(tmp_path, sorted((datasets / "hymenoptera" / "val" / "ants").glob("*.jpg"))[0])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(PAGE_MS)

    # the public demo: one photo at a time, each answered under its own name
    page.goto(f"{url}/demo?model={model.model_id}")
    page.get_by_text("Tells apart:").wait_for()
    for path in files:
        upload(page, "Upload a photo", [path])
        answered_as(page, path.name).wait_for()
        page.get_by_text(SENTENCES[path.name], exact=True).wait_for()
        assert_friendly(page)
    page.screenshot(path=tmp_path / "demo-bad-file.png")

    # the Test page: all four at once
    page.goto(f"{url}/test?project={PROJECT}")
    page.get_by_role("heading", name="Test", exact=True).wait_for()
    upload(page, "Photos to classify", files)
    for name, sentence in SENTENCES.items():
        page.get_by_text(sentence, exact=True).wait_for()
        answered_as(page, name).wait_for()
    assert_friendly(page)
