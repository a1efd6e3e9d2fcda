"""What every page draws the same way: the header and navigation, one-line errors, progress bars, prompt-set
pickers, charts with their downloads.

Contract: every page opens with `header()` (it imports nothing heavy, so on a cold server the title shows before
torch loads; below the title it reserves the one line where bad link values are reported, `ui.link.report`);
`shown_errors()` turns a `SafesubError` into one `st.error` line, never a traceback; `progress_callback(bar,
label)` adapts the core's progress hooks to an `st.progress` bar; `chart()` draws a plotly figure with an HTML
download (plotly.js embedded, so it opens offline), `csv_download()` a table.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import streamlit as st

from safesub_core.errors import SafesubError
from safesub_core.prompts import PromptSet, available_sets, is_installed, resolve
from ui.link import error_line, view

PAGE_FILES = {  # Streamlit's pages/ layout: app.py is the first page, pages/ holds the others in order
    "family": "app.py",
    "subspaces": "pages/1_Subspaces.py",
    "overlap": "pages/2_Overlap.py",
    "activation_map": "pages/3_Activation_map.py",
    "inspector": "pages/4_Prompt_inspector.py",
    "hypotheses": "pages/5_Hypotheses.py",
}
PAGE_TITLES = {"family": ("Family", ":material/family_history:"), "subspaces": ("Subspaces", ":material/tune:"),
               "overlap": ("Overlap", ":material/join_inner:"),
               "activation_map": ("Activation map", ":material/scatter_plot:"),
               "inspector": ("Prompt inspector", ":material/search:"),
               "hypotheses": ("Hypotheses", ":material/compare:")}
SUBSPACE_COLORS = {"topk": "#d62728", "randomk": "#1f77b4", "random": "#7f7f7f"}
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]

# While a rerun is under way Streamlit fades the elements not yet redrawn (a 1 s opacity transition after 0.5 s).
# Headless or software-rendered, each of its frames repaints the page and takes CPU from the scoring
# (benchmarks/README.md). The elements still dim, at once, after the same 0.5 s.
STALE_STYLE = ('<style>.stElementContainer[data-stale="true"] {transition: opacity 0s linear 0.5s !important;}'
               '</style>')


def header(title: str, caption: str | None = None) -> None:
    """Every page's first call: wide layout, the navigation with the pages' names, the title and its caption."""
    st.set_page_config(page_title=f"{title} · safesub", page_icon=":material/explore:", layout="wide")
    st.html(STALE_STYLE)
    with st.sidebar:
        for key, (label, icon) in PAGE_TITLES.items():
            st.page_link(PAGE_FILES[key], label=label, icon=icon)
        st.divider()
        st.caption("safesub: is there a safety subspace? Slide the rank, mode and scale of a projection of the "
                   "fine-tuning update and watch harmfulness and utility move.")
    st.title(title)
    if caption:
        st.caption(caption)
    error_line(st.empty())  # the link's one error line, filled by ui.link.report in this run
    view()  # read the view from the link once per browser session (a bad value is reported on that line)


@contextmanager
def shown_errors(stop: bool = False):
    """Show a SafesubError as one error line (no traceback); with stop=True end the page run there."""
    try:
        yield
    except SafesubError as err:
        st.error(str(err), icon="⚠️")
        if stop:
            st.stop()


def progress_callback(bar, label: str) -> Callable:
    """A callback for core progress hooks, (done, total) or (done, total, message), driving an st.progress bar."""

    def cb(done, total, message: str = ""):
        frac = 0.0 if not total else min(1.0, max(0.0, done / total))
        bar.progress(frac, text=f"{label}: {message or f'{done}/{total}'}")

    return cb


def set_options() -> list[str]:
    """Named prompt sets that can be loaded here, with the built-in ones' fixed splits."""
    out = []
    for name in available_sets():
        if not is_installed(name):
            continue
        if name.startswith("builtin") or name == "arithmetic":
            out += [f"{name}:eval", f"{name}:train"]
        else:
            out.append(name)
    return out


@st.cache_resource(max_entries=64, show_spinner=False)
def prompt_set(spec: str, n: int | None = None) -> PromptSet:
    """A prompt set by name or file path, optionally its first n prompts (SafesubError for bad input)."""
    ps = resolve(spec)
    return ps.head(n) if n is not None and n < len(ps) else ps


def csv_download(df, name: str, label: str = "Download CSV", key: str | None = None) -> None:
    """A CSV download of a table (the file is made when the button is clicked)."""
    st.download_button(label, lambda: df.to_csv(index=False).encode("utf-8"), file_name=f"{name}.csv",
                       mime="text/csv", key=key or f"csv_{name}", on_click="ignore")


def html_download(fig, name: str, label: str = "Download chart (HTML)", key: str | None = None) -> None:
    """A standalone HTML download of a chart (plotly.js embedded, so it opens offline; made on click)."""
    st.download_button(label, lambda: fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8"),
                       file_name=f"{name}.html", mime="text/html", key=key or f"html_{name}", on_click="ignore")


def chart(fig, name: str, key: str | None = None, **kwargs):
    """A plotly chart with its HTML download button below it."""
    out = st.plotly_chart(fig, key=key, **kwargs)
    html_download(fig, name, key=f"html_{key or name}")
    return out
