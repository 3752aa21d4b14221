"""The whole flow once in a real browser: Debian's chromium driven by Playwright against
`streamlit run app.py`, on the bundled sample project.

open the sample project -> build -> test with an uploaded photo -> publish -> open the demo link
in a fresh browser context and get a prediction. Screenshots go to NANOSTREAM_SCREENSHOTS
(e.g. docs/screenshots) when it is set; a failure leaves its pages in the test's tmp folder.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

import pytest
from streamlit_app import free_port, start_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_S = 60_000       # ms: a page with its first torch import
BUILD_S = 600_000     # ms: a cold build on two CPU cores (three backbones tried)
# The Build page's progress line for a stage of the build's own work (ui.STAGES; cross-validating has no entry)
BUILD_WORK = re.compile("Reading the images with|Making augmented copies with|Cross-validating|Saving the model|"
                        "Estimating how many more images would help")


@pytest.fixture
def app_url(tmp_path):
    """A real `streamlit run app.py` with its own NANOSTREAM_HOME; stopped (with its workers) after."""
    port = free_port()
    server = start_app(tmp_path / "home", tmp_path / "streamlit.log", port,
                       "--server.headless", "true", "--server.address", "127.0.0.1",
                       env={"NANOSTREAM_WARM_WORKER": "1"})  # as a user's app runs: its jobs forked warm
    url = f"http://127.0.0.1:{port}"
    yield url
    server.terminate()
    server.wait(timeout=30)
    _stop_workers(tmp_path / "home")


def _stop_workers(home: Path) -> None:
    """Cancel the jobs still running (a ranking started by the Images page) and wait for their workers."""
    from nanostream.store.db import Store
    from nanostream.store.records import FINISHED

    with Store(home) as store:
        for job in store.list_jobs():
            if job.status not in FINISHED:
                store.request_cancel(job.id)
        deadline = time.monotonic() + 60
        while any(j.status not in FINISHED for j in store.list_jobs()) and time.monotonic() < deadline:
            time.sleep(0.25)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM}: install it with `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shots(request, tmp_path):
    """shoot(page, name): a full-page screenshot into NANOSTREAM_SCREENSHOTS when that is set (the
    README's docs/screenshots); without it, only the pages open when the test fails, into its tmp
    folder. The shots took this test and the sign-in test ~15 s that nobody looks at when they pass."""
    wanted = os.environ.get("NANOSTREAM_SCREENSHOTS")
    folder = Path(wanted or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    last = {}  # page -> the name of its last shot: what each page showed when the test failed

    def shoot(page, name: str) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        last[page] = name
        if not wanted:
            return
        try:  # the app is idle once its "running" indicator is gone
            page.locator("[data-testid='stStatusWidget']").wait_for(state="detached", timeout=20_000)
        except PlaywrightTimeout:
            pass  # a polling fragment keeps it busy: shoot as it is
        # Streamlit scrolls inside its main pane, so a full-page shot needs a viewport that tall.
        size = page.viewport_size
        height = page.evaluate("() => document.querySelector('[data-testid=stMain]')?.scrollHeight || 0")
        page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 8000)})
        page.wait_for_timeout(500)  # let it lay out again
        page.screenshot(path=folder / f"{name}.png")
        page.set_viewport_size(size)

    yield shoot
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for page, name in last.items():
            with contextlib.suppress(Exception):  # a page that closed or crashed: the others still come
                page.screenshot(path=folder / f"failed-after-{name}.png")
        print(f"screenshots of the pages as the test failed: {folder}")


def _photo(datasets_root: Path) -> Path:
    photos = sorted((datasets_root / "hymenoptera" / "val" / "bees").glob("*.jpg"))
    assert photos, f"no bee photos under {datasets_root}: the shared datasets are missing"
    return photos[0]


def _nav(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name=title, exact=True).click()
    page.get_by_role("heading", name=title, exact=True).wait_for(timeout=PAGE_S)


def _upload(page, label: str, path: Path) -> None:
    uploader = page.locator("[data-testid='stFileUploader']").filter(has_text=label)
    uploader.locator("input[type='file']").set_input_files(str(path))


def test_whole_flow_in_a_browser(app_url, browser, shots, datasets):
    photo = _photo(datasets)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(PAGE_S)

    # 0. a page opened directly as the server's first request (a tab reopened after a restart)
    #    still runs through app.py: its navigation, not Streamlit's automatic one
    page.goto(f"{app_url}/build")
    page.get_by_text("Choose a project in the sidebar").wait_for()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Projects", exact=True).wait_for()

    # 1. the app opens as NanoStream, with the sample project ready
    page.goto(app_url)
    page.get_by_role("heading", name="NanoStream").wait_for()
    assert page.title() == "NanoStream"
    page.get_by_text("Sample: ants and bees").first.wait_for()
    shots(page, "01-projects")

    # 2. open it: the Images page, sorted by suspicion once the background ranking is done
    page.get_by_test_id("stMain").get_by_role("button", name="Open", exact=True).first.click()
    page.get_by_role("heading", name="Images", exact=True).wait_for()
    page.get_by_text("Most suspicious photos first").wait_for(timeout=BUILD_S)
    # .first: while Streamlit re-renders after the ranking, the old list and the new can both be up
    page.get_by_text("#1", exact=True).first.wait_for()
    shots(page, "03-images")
    _nav(page, "Categories")
    page.get_by_label("Extra search words").first.wait_for()
    shots(page, "02-categories")

    # 3. build with the default options, watch it, read the results
    _nav(page, "Build")
    # the augmentation preview: the copies the default policy's build makes, and no more
    page.get_by_text("the 2 augmented copies the build makes of it").wait_for()
    page.get_by_text("copy 2").first.wait_for()
    assert page.get_by_text("copy 3").count() == 0
    shots(page, "04-build-options")
    page.get_by_role("button", name="Build model").click()
    page.get_by_role("button", name="Cancel").wait_for()
    # Whichever stage of the build's work the page catches: with the features the ranking cached,
    # "Reading the images with ..." lasts a few milliseconds and a poll can miss it.
    page.get_by_text(BUILD_WORK).first.wait_for(timeout=BUILD_S)
    shots(page, "05-build-progress")
    page.get_by_role("heading", name="Backbones tried").wait_for(timeout=BUILD_S)
    assert page.get_by_text("Accuracy on").count() == 1
    shots(page, "06-build-results")

    # 4. test it on a photo it never saw
    _nav(page, "Test")
    _upload(page, "Photos to classify", photo)
    page.locator("[data-testid='stAlertContentSuccess'], [data-testid='stAlertContentWarning']").first.wait_for()
    shots(page, "07-test")

    # 5. publish it and read the demo link
    _nav(page, "Share")
    page.get_by_role("button", name="Publish this version").click()
    link = page.locator("code", has_text="/demo?model=").first
    link.wait_for()
    demo_url = link.inner_text().strip()
    assert demo_url.startswith(app_url + "/demo?model=m-"), demo_url
    shots(page, "08-share")

    # 6. someone with only the link: no navigation, the model's classes, an upload, a prediction
    stranger = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    stranger.set_default_timeout(PAGE_S)
    stranger.goto(demo_url)
    stranger.get_by_text("Tells apart:").wait_for()
    assert stranger.locator("[data-testid='stSidebarNav']").count() == 0
    assert not stranger.locator("[data-testid='stSidebar']").is_visible()
    _upload(stranger, "Upload a photo", photo)
    answer = stranger.locator("[data-testid='stAlertContentSuccess'], [data-testid='stAlertContentWarning']").first
    answer.wait_for()
    assert "bees" in answer.inner_text() or "Not sure" in answer.inner_text()
    shots(stranger, "09-demo")

    # 7. an unpublished (or unknown) model is not reachable through a demo link
    stranger.goto(f"{app_url}/demo?model=m-0000000000")
    stranger.get_by_text("This model is not published").wait_for()
    shots(stranger, "10-demo-not-published")
