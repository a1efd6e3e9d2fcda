"""Opening the app in Streamlit's AppTest, as the app tests do (the fixtures are in conftest.py: app_env)."""
from pathlib import Path

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 300  # the first run of a page imports torch/transformers and loads models


def open_app_page(page: str = "family", query: dict | None = None, deep: bool = False):
    """An AppTest of the app opened on `page` (a key of ui.PAGE_FILES) with `query` in the URL: after a run of the
    Family page, or with `deep` first, as a browser does for a link to it (the link's error line is on that page)."""
    from streamlit.testing.v1 import AppTest

    from ui import PAGE_FILES

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if query:
        at.query_params.update({k: str(v) for k, v in query.items()})
    if not deep:
        at.run()
    if page != "family":
        at.switch_page(PAGE_FILES[page])
    return at.run() if deep or page != "family" else at
