"""The view: what a page shows (family, variant, point, layer, prompt...), kept in the URL so a link reproduces it.

Contract: `view()` is this browser session's dict, read once from `st.query_params` (a malformed or out-of-range
value falls back to the default and is reported once by `widgets.header`), and `publish_view()` writes it back at
the end of each page. `bound(name, widget, ...)` renders a widget whose value starts from and is written to
view[name].
"""
from __future__ import annotations

import math
from typing import Any, Callable

import streamlit as st

from safesub_core import settings


def _float(x) -> float:
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{x!r} is not a finite number")
    return value


def _opt_int(x):
    return None if x in (None, "", "None") else int(x)


VIEW_TYPES: dict[str, Callable[[str], Any]] = {
    "family": str, "variant": str, "subspace": str, "mode": str, "rank_by": str, "rank": _float, "alpha": _float,
    "layer": _opt_int, "method": str, "prompt": str, "prompt_set": str, "reference": str, "device": str,
    "dtype": str, "live": str,
}
VIEW_DEFAULTS: dict[str, Any] = {
    "family": None, "variant": None, "subspace": "topk", "mode": "parallel", "rank_by": "fraction", "rank": 0.25,
    "alpha": 1.0, "layer": None, "method": "pca", "prompt": None, "prompt_set": None, "reference": "aligned",
    "device": None, "dtype": None, "live": None,
}


def default_family_spec() -> str:
    """The server's default family: SAFESUB_FAMILY, else the built-in tiny family."""
    return settings.default_family()


def view() -> dict:
    """The view dict of this browser session, first read from the URL's query parameters."""
    if "_view" not in st.session_state:
        v, bad = dict(VIEW_DEFAULTS), []
        for key, cast in VIEW_TYPES.items():
            raw = st.query_params.get(key)
            if raw is None:
                continue
            try:
                v[key] = cast(raw)
            except (TypeError, ValueError):
                bad.append(f"{key}={raw!r}")  # a malformed parameter falls back to the default, and is shown once
        st.session_state["_link_errors"] = bad
        if not v["family"]:
            v["family"] = default_family_spec()
        st.session_state["_view"] = v
    return st.session_state["_view"]


def publish_view() -> None:
    """Write the view to the URL (only values that are set), so a link reproduces it."""
    v = view()
    want = {k: str(val) for k, val in v.items() if val is not None}
    current = {k: st.query_params.get(k) for k in want}
    if current != want:
        st.query_params.update(want)


def bound(name: str, widget: Callable, *args, options=None, **kwargs):
    """Render `widget` bound to view[name]: its value starts from the view and is written back to it.

    `options` (for select widgets) is passed through; a view value outside them falls back to the first option.
    """
    v = view()
    key = f"w_{name}"
    if key not in st.session_state:
        value = v.get(name)
        if options is not None:
            opts = list(options)
            if value not in opts and opts:
                value = opts[0]
        if value is not None:
            st.session_state[key] = value
    elif options is not None and st.session_state[key] not in list(options) and list(options):
        st.session_state[key] = list(options)[0]
    if options is not None:
        out = widget(*args, options=options, key=key, **kwargs)
    else:
        out = widget(*args, key=key, **kwargs)
    v[name] = out
    return out


def family_spec() -> str:
    """The view's family: 'tiny', 'smol', a family file or 'paths:' + JSON."""
    return view()["family"] or default_family_spec()


def current_variant(fam) -> str:
    """The view's fine-tuned variant, or the family's first when the view names none of them."""
    v = view()
    if v["variant"] not in fam.variants:
        v["variant"] = next(iter(fam.variants))
    return v["variant"]


def default_harmful_variant(fam) -> str:
    return "harmful" if "harmful" in fam.variants else next(iter(fam.variants))
