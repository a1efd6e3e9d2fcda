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
    "inspector": ("Prompt_inspector", '[data-testid="stCaptionContainer"]:has-text("refusal log-odds ")'),
    "hypotheses": ("Hypotheses", '[data-testid="stMarkdownContainer"]:has-text("Chosen: layer")'),
}
TITLES = {"family": "Family", "subspaces": "Subspaces", "overlap": "Overlap", "activation_map": "Activation map",
          "inspector": "Prompt inspector", "hypotheses": "Hypotheses"}


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


def open_page(browser, url: str, name: str, query: str = ""):
    """`browser` is a Browser or a BrowserContext (its own cookies: a separate Streamlit session); `query`: the
    link's query string."""
    path, selector = PAGES[name]
    page = browser.new_page() if hasattr(browser, "browser") else browser.new_page(viewport={"width": 1500,
                                                                                             "height": 1100})
    page.goto(f"{url}/{path}{'?' + query if query else ''}", wait_until="domcontentloaded", timeout=60_000)
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


@pytest.mark.parametrize("name", [n for n in PAGES if n not in ("subspaces", "hypotheses")])
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


def test_hypotheses_page_and_its_tradeoff_in_the_browser(server, browser):
    """The Hypotheses page (issue 18) from a link: its sections drawn with no error, the link's view on screen; the
    trade-off button draws the harm-utility chart and the matched-utility table (screenshots before and after)."""
    page = open_page(browser, server, "hypotheses", "variant=harmful&intervention=orthogonalisation&strength=0.5")
    try:
        page.wait_for_selector('[data-testid="stMarkdownContainer"]:has-text("Orthogonalisation strength=0.5")',
                               timeout=60_000)
        assert_no_errors(page, "hypotheses")
        assert page.locator(".js-plotly-plot").count() >= 4, "selection, similarity, bridge and shift charts"
        screenshot(page, "hypotheses")
        page.get_by_role("button", name="Compute the trade-off").click()
        page.wait_for_selector('.js-plotly-plot .legendtext:has-text("Top-K")', timeout=240_000)
        wait_idle(page)
        assert_no_errors(page, "hypotheses after the trade-off")
        assert page.locator('[data-testid="stMarkdownContainer"]:has-text("At matched utility")').count() == 1
        screenshot(page, "hypotheses_tradeoff")
    finally:
        page.close()


def test_a_chosen_harmful_set_is_scored_and_the_read_outs_sharpen_in_the_browser(server, browser):
    """A link names the harmful set (HarmBench's eval split, first 12); the Subspaces page scores it, first wave at
    once, then wave after wave while the slider rests, until every set is exhausted (n counts up)."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    try:
        page.goto(f"{server}/Subspaces?harmful=harmbench:eval,n=12&rank=0.3", wait_until="domcontentloaded",
                  timeout=60_000)
        note = page.locator('[data-testid="stCaptionContainer"]', has_text="Live scores at")
        note.first.wait_for(timeout=240_000)
        assert "harmbench:eval" in note.first.inner_text(), note.first.inner_text()
        page.wait_for_function(  # every wave scored: "W of W waves"
            "() => [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')].some(e => "
            "/(\\d+) of \\1 waves/.test(e.innerText))", timeout=240_000)
        wait_idle(page)
        text = page.locator('[data-testid="stMain"]').inner_text()
        assert "n=12 " in text, "the harmful read-outs are on the 12 prompts chosen"
        assert re.search(r"95% CI \[", text), "each read-out carries its interval"
        assert_no_errors(page, "subspaces with a chosen set")
        screenshot(page, "subspaces_chosen_set_sharpened")
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
        page.wait_for_selector('[data-testid="stCaptionContainer"]:has-text("refusal log-odds")',
                               timeout=240_000)  # a picked model's box is drawn
        wait_idle(page)
        assert_no_errors(page, "inspector after a click on the map")
        assert "prompt=" in page.url, f"the URL carries the clicked prompt: {page.url}"
        assert page.locator("text=Prompt:").count() >= 1
    finally:
        page.close()


def _readouts(page) -> dict:
    """The Subspaces page's metric read-outs, label -> shown value."""
    out = {}
    for m in page.locator('[data-testid="stMetric"]').all():
        label = m.locator('[data-testid="stMetricLabel"]').inner_text().strip()
        out[label] = m.locator('[data-testid="stMetricValue"]').inner_text().strip()
    return out


def _press_rank(page, steps: int) -> None:
    thumb = page.locator('[data-testid="stSlider"]', has_text="rank fraction").locator('input[type="range"]')
    thumb.focus()
    for _ in range(steps):
        page.keyboard.press("ArrowRight")


def _settle(page, rank: str) -> dict:
    """Wait until the page's script run for `rank` (in the URL) is over; its read-outs."""
    page.wait_for_function("r => window.location.search.includes('rank=' + r)", arg=rank, timeout=240_000)
    page.wait_for_timeout(300)
    wait_idle(page)
    return _readouts(page)


def test_four_sessions_moving_sliders_at_once_agree_with_one_session_and_share_one_copy(server, browser):
    """Four browser sessions (separate contexts) move the rank slider at the same time, each to its own ranks, so
    their script runs overlap on the server's one resident session: no errors, and every read-out equals what a
    single session shows at the same rank; the Family page of every session names the same resident session with
    each checkpoint loaded once."""
    steps = {0: [5, 10], 1: [10, 5], 2: [15, 5], 3: [20, 5]}  # each session's key presses per round (0.01 each)
    ranks = {i: [round(0.25 + 0.01 * sum(s[: j + 1]), 2) for j in range(len(s))] for i, s in steps.items()}
    expected = {}
    single = open_page(browser, server, "subspaces")
    try:
        at = 0.25
        for r in sorted({r for rs in ranks.values() for r in rs}):
            _press_rank(single, round((r - at) / 0.01))
            expected[r] = _settle(single, f"{r:g}")
            at = r
    finally:
        single.close()
    contexts = [browser.new_context(viewport={"width": 1500, "height": 1100}) for _ in steps]
    try:
        pages = [open_page(c, server, "subspaces") for c in contexts]
        for j in range(2):
            for i, page in enumerate(pages):  # all presses first: the four reruns overlap on the server
                _press_rank(page, steps[i][j])
            for i, page in enumerate(pages):
                got = _settle(page, f"{ranks[i][j]:g}")
                assert_no_errors(page, f"session {i}")
                assert got == expected[ranks[i][j]], f"session {i} at rank {ranks[i][j]}: {got} != {expected}"
        captions = []
        for i, page in enumerate(pages):
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector('[data-testid="stCaptionContainer"]:has-text("In memory on")', timeout=240_000)
            wait_idle(page)
            assert_no_errors(page, f"session {i} family page")
            captions.append(page.locator('[data-testid="stCaptionContainer"]', has_text="In memory on").inner_text())
        assert len(set(captions)) == 1, f"one resident session for all: {captions}"
        models = re.search(r"open session: (.*) and a working copy", captions[0]).group(1).split(", ")
        assert len(models) == len(set(models)) and "aligned" in models, captions[0]
    finally:
        for c in contexts:
            c.close()
