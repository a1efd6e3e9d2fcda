"""The app's shared Streamlit pieces; pages import this package as `ui`.

- `ui.link`: the view (what a page shows) kept in the URL, and widgets bound to it;
- `ui.widgets`: what every page draws the same way (header, one-line errors, progress, downloads, charts);
- `ui.readouts`: the live read-outs of one point, sharpened wave by wave (the Subspaces and Hypotheses pages);
- `ui.family`: the family and its one resident session per server;
- `ui.builds`: building the demo families from the app.
Computation stays in safesub_core: this package only draws and wires. Names load on first use (PEP 562), so a page
can draw its header before torch is imported (on a cold server that import takes seconds).
"""
import importlib

_HOMES = {
    "ui.link": ("bound", "current_variant", "default_family_spec", "default_harmful_variant", "family_spec",
                "publish_view", "view"),
    "ui.widgets": ("PAGE_FILES", "PAGE_TITLES", "PALETTE", "SUBSPACE_COLORS", "chart", "csv_download", "header",
                   "html_download", "progress_callback", "prompt_set", "set_options", "shown_errors"),
    "ui.family": ("Resident", "compute", "current_config", "current_family", "current_sets", "engine", "family_caption",
                  "live_setting", "parse_variants", "require_family", "resident", "spec_label"),
    "safesub_core.family": ("paths_spec",),  # the spec of a family entered as paths
    "ui.readouts": ("Readouts",),
    "ui.builds": ("BuildJob", "build_job", "build_progress", "ensure_tiny", "smol_file", "start_smol_build"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ui' has no attribute {name!r}")
