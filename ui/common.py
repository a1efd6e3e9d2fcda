"""What every page shares: the current family and its session, view state in the URL, errors, progress, downloads.

- The family: a spec string kept in the view, "tiny" (the built-in demo family, built on first use with a progress
  bar), the path of a family file, or "paths:" + JSON of entered checkpoint paths. The default is the file named
  by the environment variable SAFESUB_FAMILY, else "tiny".
- One family's models are resident at a time: `resident()` is a `st.cache_resource` with max_entries=1 keyed by
  the spec (and the cache folder), so choosing another family releases the old session. A lock serialises the
  computations on a session (its working model is written in place by projections).
- View state (family, variant, subspace, mode, rank, alpha, layer, method, prompt...) lives in
  `st.session_state["_view"]`, starts from `st.query_params`, and is written back to the URL at the end of each
  page (`publish_view()`), so a link reproduces the view.
- Pages use Streamlit's pages/ layout: app.py is the Family page and pages/N_Name.py the others; each page opens
  with `header()` (page config and the navigation, whose labels are the pages' titles).
- `shown_errors()` turns a `SafesubError` into one `st.error` line, never a traceback.
- Paths typed into the app or carried by a link are confined to the allowed roots (`safesub_core.paths`:
  SAFESUB_ROOTS, default the cache folder and the home folder); the SAFESUB_FAMILY default and the built-in family
  are trusted (the person who started the server chose them).
"""
from __future__ import annotations

import json
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from safesub_core.errors import SafesubError

REPO = Path(__file__).resolve().parent.parent
PAGE_FILES = {  # Streamlit's pages/ layout: app.py is the first page, pages/ holds the others in order
    "family": "app.py",
    "subspaces": "pages/1_Subspaces.py",
    "overlap": "pages/2_Overlap.py",
    "activation_map": "pages/3_Activation_map.py",
    "inspector": "pages/4_Prompt_inspector.py",
}
PAGE_TITLES = {"family": ("Family", ":material/family_history:"), "subspaces": ("Subspaces", ":material/tune:"),
               "overlap": ("Overlap", ":material/join_inner:"),
               "activation_map": ("Activation map", ":material/scatter_plot:"),
               "inspector": ("Prompt inspector", ":material/search:")}
SUBSPACE_LABELS = {"topk": "Top-K", "randomk": "Random-K", "random": "Random"}
SUBSPACE_COLORS = {"topk": "#d62728", "randomk": "#1f77b4", "random": "#7f7f7f"}
SCORE_GRID = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)
GEN_TOKENS = 48  # max new tokens of the generation scores (session default)


# ------------------------------------------------------------------------------------------------ view state

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
    env = os.environ.get("SAFESUB_FAMILY", "").strip()
    return env if env else "tiny"


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


# ------------------------------------------------------------------------------------------------ errors

@contextmanager
def shown_errors(stop: bool = False):
    """Show a SafesubError as one error line (no traceback); with stop=True end the page run there."""
    try:
        yield
    except SafesubError as err:
        st.error(str(err), icon="⚠️")
        if stop:
            st.stop()


# ------------------------------------------------------------------------------------------------ progress

def progress_callback(bar, label: str) -> Callable:
    """A callback for core progress hooks, (done, total) or (done, total, message), driving an st.progress bar."""

    def cb(done, total, message: str = ""):
        frac = 0.0 if not total else min(1.0, max(0.0, done / total))
        bar.progress(frac, text=f"{label}: {message or f'{done}/{total}'}")

    return cb


# ------------------------------------------------------------------------------------------------ family

def family_spec() -> str:
    return view()["family"] or default_family_spec()


def spec_label(spec: str) -> str:
    if spec in BUILT_IN:
        return f"built-in {spec} family"
    if spec.startswith("paths:"):
        return "entered paths"
    return spec


def paths_spec(base: str, aligned: str, safety: str, start: str, variants: dict[str, str]) -> str:
    return "paths:" + json.dumps(dict(base=base, aligned=aligned, safety_tuned=safety or None, start=start,
                                      variants=variants), sort_keys=True)


def parse_variants(text: str) -> dict[str, str]:
    """'name = path' lines (or bare paths, named by their folder) -> {name: path}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line:
            name, _, path = line.partition("=")
            name, path = name.strip(), path.strip()
        else:
            path = line
            name = Path(line).expanduser().name or line
        if not name or not path:
            raise SafesubError(f"fine-tune line {line!r}: expected 'name = path'")
        out[name] = path
    return out


BUILT_IN = ("tiny", "smol")


def tiny_path() -> Path:
    from safesub_core.zoo import default_out_dir

    return default_out_dir("full") / "family.yaml"


def smol_path() -> Path:
    from safesub_core.zoo import smol_out_dir

    return smol_out_dir(smol_size()) / "family.yaml"


def smol_size() -> str:
    """The smol family's size: 'full' unless SAFESUB_SMOL_SIZE says otherwise (the tests use 'test')."""
    return os.environ.get("SAFESUB_SMOL_SIZE", "full")


_BUILD_LOCK = threading.Lock()


@dataclass
class BuildJob:
    """A family build running in a background thread of the server, so a long build (the smol family: about 20
    minutes) goes on while people browse, and every session sees its progress. Builds are resumable stage by
    stage, so a server restart mid-build loses at most the stage in progress."""

    name: str
    done: int = 0
    total: int = 1
    message: str = "waiting to start"
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, build: Callable[[Callable], Any]) -> None:
        """Run `build(progress)` in a thread unless one is running; a SafesubError ends it with `error` set."""
        with _BUILD_LOCK:
            if self.running:
                return
            self.done, self.total, self.message, self.error = 0, 1, "starting", None

            def progress(done, total, message=""):
                self.done, self.total, self.message = done, max(total, 1), message or f"{done}/{total}"

            def run():
                try:
                    build(progress)
                    self.message = "built"
                except SafesubError as err:
                    self.error = str(err)
                except Exception as err:  # noqa: BLE001  (shown as one line; the stages built so far are kept)
                    self.error = f"family '{self.name}': the build stopped ({type(err).__name__}: {err})"

            self.thread = threading.Thread(target=run, name=f"safesub-build-{self.name}", daemon=True)
            self.thread.start()


@st.cache_resource(show_spinner=False)
def build_job(name: str) -> BuildJob:
    """The server's one build job for the built-in family `name` (shared by every browser session)."""
    return BuildJob(name)


def build_progress(job: BuildJob, every: float = 2.0) -> None:
    """The job's progress bar, refreshed every `every` seconds while it runs; the page reruns when it ends."""

    @st.fragment(run_every=every if job.running else None)
    def panel():
        if job.error:
            st.error(job.error, icon="⚠️")
        elif job.running:
            st.progress(min(1.0, job.done / job.total), text=f"Building the {job.name} family: {job.message}")
            st.caption("The build runs on the server: you can use the other pages meanwhile.")
        if not job.running and st.session_state.get(f"_watching_{job.name}"):
            st.session_state.pop(f"_watching_{job.name}")
            st.rerun(scope="app")  # the build ended: show its family (or its error)
        if job.running:
            st.session_state[f"_watching_{job.name}"] = True

    panel()


def start_smol_build() -> BuildJob:
    from safesub_core.zoo import build_smol

    job = build_job("smol")
    job.start(lambda progress: build_smol(size=smol_size(), progress=progress))
    return job


def ensure_tiny() -> Path:
    """The built-in tiny family's family.yaml, built here first (with a progress bar) when it is missing."""
    path = tiny_path()
    if path.is_file():
        return path
    from safesub_core.zoo import build_tiny

    with _BUILD_LOCK:
        if path.is_file():
            return path
        bar = st.progress(0.0, text="Building the built-in tiny family (first run only, about a minute or two)")
        build_tiny(progress=progress_callback(bar, "Building the tiny family"))
        bar.empty()
    return path


def family_file_for(spec: str) -> str | None:
    if spec == "tiny":
        return str(ensure_tiny())
    if spec == "smol":
        if not smol_path().is_file():
            raise SafesubError("family 'smol': not built yet (build it on the Family page, or run "
                               "`python -m safesub_core.zoo build smol`)")
        return str(smol_path())
    if spec.startswith("paths:"):
        return None
    return spec


def trusted(spec: str) -> bool:
    """The built-in family and the server's SAFESUB_FAMILY are opened as given; anything typed is confined."""
    return spec in BUILT_IN or spec == os.environ.get("SAFESUB_FAMILY", "").strip()


@st.cache_resource(max_entries=4, show_spinner=False)
def _family(spec: str, file: str | None, cache_root: str):
    from safesub_core.family import Family

    confined = not trusted(spec)
    if file is not None:
        return Family.from_file(file, confined=confined)
    try:
        d = json.loads(spec.removeprefix("paths:"))
    except json.JSONDecodeError:
        raise SafesubError("family paths: the link's family parameter is malformed") from None
    for role in ("base", "aligned"):
        if not d.get(role):
            raise SafesubError(f"checkpoint '{role}': no path given")
    if not d.get("variants"):
        raise SafesubError("family: give at least one fine-tuned variant (name = path)")
    return Family.from_paths(name="entered", base=d["base"], aligned=d["aligned"], variants=d["variants"],
                             safety_tuned=d.get("safety_tuned"), start=d.get("start") or "aligned",
                             confined=confined)


def current_family(spec: str | None = None):
    """The Family of `spec` (default: the view's), or a SafesubError."""
    from safesub_core.cache import cache_root

    spec = spec or family_spec()
    return _family(spec, family_file_for(spec), str(cache_root()))


@dataclass
class Resident:
    """The resident family: its session, the session's lock (it serialises all use of the shared working model)
    and a small in-memory memo."""

    family: Any
    session: Any
    lock: Any = None
    memo: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.lock is None:
            self.lock = getattr(self.session, "lock", None) or threading.RLock()

    def memoised(self, key, compute: Callable[[], Any]):
        with self.lock:
            if key not in self.memo:
                self.memo[key] = compute()
            return self.memo[key]


def _release(res: Resident) -> None:
    """Drop the old family's models (cache_resource on_release)."""
    res.memo.clear()
    res.session = None


@st.cache_resource(max_entries=1, show_spinner=False, on_release=_release)
def _resident(spec: str, file: str | None, cache_root: str, device: str, dtype: str, live: str) -> Resident:
    """`live`: the live prompts per set asked for (`live_setting`: a count, or 'auto' for `live_prompts`' default)."""
    import torch

    from safesub_core.session import DTYPES, EvalSets, FamilySession, live_prompts

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    family = _family(spec, file, cache_root)
    sets = EvalSets.default(live_prompts(family, device, live))
    return Resident(family=family, session=FamilySession(family, device=device, dtype=DTYPES[dtype], sets=sets))


def compute() -> tuple[str, str]:
    """(device, dtype name) of the view: set on the Family page, else SAFESUB_DEVICE / SAFESUB_DTYPE, else auto
    (the first CUDA device when present, bfloat16 there; the CPU in float32). SafesubError when unavailable."""
    from safesub_core.session import resolve_compute

    v = view()
    device, dtype = resolve_compute(v.get("device") or os.environ.get("SAFESUB_DEVICE"),
                                    v.get("dtype") or os.environ.get("SAFESUB_DTYPE"))
    return device, str(dtype).removeprefix("torch.")


LIVE_CHOICES = ["auto", "4", "6", "8", "16", "32"]


def live_setting() -> str:
    """Live prompts per set asked for: the view's (the Family page or the link's `live`), else SAFESUB_LIVE_PROMPTS,
    else 'auto'."""
    from safesub_core.session import requested_live_prompts

    n = requested_live_prompts(view().get("live"))
    return "auto" if n is None else str(n)


def resident(spec: str | None = None) -> Resident:
    """The resident session of the current family on the view's device and dtype (loaded once, with a status box
    the first time). One family on one device is resident per server: switching either releases the old."""
    from safesub_core.cache import cache_root

    spec = spec or family_spec()
    file = family_file_for(spec)
    key = (spec, file, str(cache_root()), *compute(), live_setting())
    loaded = st.session_state.get("_loaded_key") == key
    if loaded:
        res = _resident(*key)
    else:
        with st.status("Loading the family's models…", expanded=False) as box:
            res = _resident(*key)
            box.update(label="Models loaded", state="complete")
        st.session_state["_loaded_key"] = key
    return res


def engine(res: Resident, variant: str):
    """The variant's SubspaceEngine, built once (with a progress bar the first time)."""
    def build():
        bar = st.progress(0.0, text=f"Alignment subspaces of {variant}")
        eng = res.session.engine(variant, progress=progress_callback(bar, f"Alignment subspaces of {variant}"))
        bar.empty()
        return eng

    return res.memoised(("engine", variant), build)


def require_family() -> tuple[Any, Resident]:
    """(family, resident) for a page that needs them; a bad family shows one error line and ends the page."""
    with shown_errors(stop=True):
        fam = current_family()
        res = resident()
        return fam, res
    raise AssertionError("unreachable")


# While a rerun is under way Streamlit fades the elements not yet redrawn (a 1 s opacity transition after 0.5 s).
# Headless or software-rendered, each of its frames repaints the page: on a 2-core machine that took half a core
# from the scoring for a second of every slider move. The elements still dim, at once, after the same 0.5 s.
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
    view()  # read the view from the link once per browser session
    st.title(title)
    if caption:
        st.caption(caption)
    bad = st.session_state.pop("_link_errors", None)
    if bad:
        st.error(f"link parameter {', '.join(bad)}: not a valid value; the default is used instead", icon="⚠️")


def family_caption(fam) -> None:
    start = fam.start_checkpoint.name
    st.caption(f"Family **{fam.name}** ({spec_label(family_spec())}) · start model **{start}** · "
               f"fine-tuned variants: {', '.join(fam.variants)}")


# ------------------------------------------------------------------------------------------------ views of the point

def current_config():
    """The ProjectionConfig of the Subspaces page's current view (raises SafesubError when invalid)."""
    from safesub_core.subspace import ProjectionConfig

    v = view()
    rank = float(v["rank"])
    if v["rank_by"] == "energy":
        return ProjectionConfig(v["subspace"], v["mode"], rank_fraction=None, energy=rank, alpha=float(v["alpha"]))
    return ProjectionConfig(v["subspace"], v["mode"], rank_fraction=rank, alpha=float(v["alpha"]))


def current_variant(fam) -> str:
    v = view()
    if v["variant"] not in fam.variants:
        v["variant"] = next(iter(fam.variants))
    return v["variant"]


def default_harmful_variant(fam) -> str:
    return "harmful" if "harmful" in fam.variants else next(iter(fam.variants))


# ------------------------------------------------------------------------------------------------ prompt sets

def set_options() -> list[str]:
    """Named prompt sets that can be loaded here, with the built-in ones' fixed splits."""
    from safesub_core.prompts import available_sets, is_installed

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
def prompt_set(spec: str, n: int | None = None):
    """A prompt set by name or file path, optionally its first n prompts (SafesubError for bad input)."""
    from safesub_core.prompts import resolve

    ps = resolve(spec)
    return ps.head(n) if n is not None and n < len(ps) else ps


# ------------------------------------------------------------------------------------------------ downloads

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
