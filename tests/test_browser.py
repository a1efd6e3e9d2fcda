"""The app in a real browser: `streamlit run app.py` driven by Playwright with Debian's Chromium.

Visits every page of the test-size tiny family, waits for each page's own elements, moves the rank slider with the
keyboard and checks that a read-out changed, checks that no exception or error box appeared, and saves a
screenshot of every page to artifacts/screenshots/<page>.png. Never runs `playwright install`: it uses the
chromium binary on PATH and skips (with the reason) when there is none.
"""
import re
import shutil
from pathlib import Path

import pytest

from ui.server import CHROMIUM_ARGS, free_port, start_server, stop_server, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "artifacts" / "screenshots"
# page -> (url path, a selector of the page's own content to wait for)
PAGES = {
    "family": ("", '[data-testid="stTable"]'),
    "subspaces": ("Subspaces", '[data-testid="stMetricValue"]'),
    "overlap": ("Overlap", ".js-plotly-plot"),
    "activation_map": ("Activation_map", ".js-plotly-plot"),
    "inspector": ("Prompt_inspector", '[data-testid="stCaptionContainer"]:has-text("margin ")'),
}
TITLES = {"family": "Family", "subspaces": "Subspaces", "overlap": "Overlap", "activation_map": "Activation map",
          "inspector": "Prompt inspector"}


def wait_idle(page, timeout_ms: int = 240_000) -> None:
    """Until the script run of the page is over (the app root says it is not running)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)


def assert_no_errors(page, name: str) -> None:
    exc = page.locator('[data-testid="stException"]')
    err = page.locator('[data-testid="stAlertContentError"]')
    assert exc.count() == 0, f"{name}: exception shown: {exc.first.inner_text()[:500]}"
    assert err.count() == 0, f"{name}: error box shown: {err.first.inner_text()[:500]}"


@pytest.fixture(scope="module")
def server(tiny_family, tmp_path_factory):
    port = free_port()
    cache = tmp_path_factory.mktemp("browser_cache")
    log_path = tmp_path_factory.mktemp("browser_log") / "streamlit.log"
    log = open(log_path, "w")
    proc = start_server(port, dict(SAFESUB_FAMILY=str(tiny_family), SAFESUB_CACHE=str(cache)), log)
    url = f"http://localhost:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop_server(proc)
        log.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); the browser test needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url: str, name: str):
    path, selector = PAGES[name]
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{url}/{path}", wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector(f'h1:has-text("{TITLES[name]}")', timeout=240_000)
    page.wait_for_selector(selector, timeout=240_000)
    wait_idle(page)
    if name != "inspector":
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    return page


def screenshot(page, name: str) -> None:
    """The whole page: the app scrolls inside its main block, so the viewport grows to the content first."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMainBlockContainer\"]');"
                           " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": 1500, "height": max(1000, min(int(height) + 120, 9000))})
    page.wait_for_timeout(1500)  # let plotly redraw at the new size
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("name", [n for n in PAGES if n != "subspaces"])
def test_page_renders_in_the_browser(server, browser, name):
    page = open_page(browser, server, name)
    try:
        assert_no_errors(page, name)
        if name != "inspector":
            page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        screenshot(page, name)
    finally:
        page.close()


def test_rank_slider_moves_the_readouts_in_the_browser(server, browser):
    page = open_page(browser, server, "subspaces")
    try:
        assert_no_errors(page, "subspaces")
        energy = page.locator('[data-testid="stMetric"]', has_text="energy kept E").locator(
            '[data-testid="stMetricValue"]')
        before = energy.inner_text()
        thumb = page.locator('[data-testid="stSlider"]', has_text="rank fraction").locator('input[type="range"]')
        start = float(thumb.input_value())
        thumb.focus()
        for _ in range(20):
            page.keyboard.press("ArrowRight")
        page.wait_for_function(
            "([sel, old]) => { const e = document.querySelector(sel); return e && e.innerText !== old; }",
            arg=['[data-testid="stMetric"] [data-testid="stMetricValue"]', before], timeout=120_000)
        page.wait_for_timeout(300)
        wait_idle(page)
        assert float(thumb.input_value()) == pytest.approx(start + 0.20, abs=1e-6)
        assert energy.inner_text() != before
        assert re.search(r"rank=0\.45", page.url), f"the URL follows the slider: {page.url}"
        assert_no_errors(page, "subspaces")
        screenshot(page, "subspaces")
    finally:
        page.close()


def test_clicking_a_map_point_opens_it_in_the_inspector(server, browser):
    page = open_page(browser, server, "activation_map")
    try:
        point = page.locator(".js-plotly-plot .scatterlayer .points path.point").first
        point.wait_for(timeout=60_000)
        box = point.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_selector('h1:has-text("Prompt inspector")', timeout=120_000)
        page.wait_for_selector('[data-testid="stCaptionContainer"]:has-text("margin ")', timeout=240_000)
        wait_idle(page)
        assert_no_errors(page, "inspector after a click on the map")
        assert "prompt=" in page.url, f"the URL carries the clicked prompt: {page.url}"
        assert page.locator("text=Prompt:").count() >= 1
    finally:
        page.close()
