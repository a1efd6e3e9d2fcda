"""The family the app shows and its one resident session per server.

Contract:
- A family is a spec kept in the view (`view.family_spec`): 'tiny' (built on first use with a progress bar),
  'smol', a family file, or 'paths:' + JSON of checkpoint paths entered on the Family page; it is opened by the
  core's one resolver (`safesub_core.family.resolve_family`). Paths typed into the app or carried by a link are
  confined to the allowed roots (SAFESUB_ROOTS); the built-in families and the server's SAFESUB_FAMILY are trusted
  (the person who started the server chose them).
- The evaluation sets (`current_sets`): the family's own (`eval_sets:` of its family file), then the view's
  harmful, utility, benign, edgy set specs and convention (the Family page or a link; typed paths confined, an
  upload stored by this server allowed), then the defaults (`prompts.EvalSets.for_family`), read before any model
  loads; a bad one is one error line.
- One family on one device is resident per server (`st.cache_resource`, max_entries=1): switching family, device,
  precision, live prompt count or evaluation sets releases the old session. The session holds the whole sets and
  scores them in waves of `compute.live_prompts` prompts (`batch`). The session serialises its own work; the `Resident`
  adds a small in-memory memo for what pages compute from it (grids, curves).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import streamlit as st
import torch

from safesub_core import settings
from safesub_core.fingerprints import fingerprint_all
from safesub_core.compute import DTYPES, dtype_name, live_prompts, requested_live_prompts, resolve_compute
from safesub_core.demo import BUILT_IN
from safesub_core.errors import SafesubError
from safesub_core.placement import Placement
from safesub_core.family import PATHS_PREFIX, Family, resolve_family
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession
from safesub_core.projection import ProjectionConfig
from safesub_core.subspace import SubspaceEngine
from ui.builds import ensure_tiny
from ui.link import CONVENTIONS, SET_ROLES, check_deferred, family_spec, view
from ui.widgets import progress_callback, shown_errors


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
            name = Path(line).name or line
        if not name or not path:
            raise SafesubError(f"fine-tune line {line!r}: expected 'name = path'")
        out[name] = path
    return out


def spec_label(spec: str) -> str:
    """How a family spec reads on screen."""
    if spec in BUILT_IN:
        return f"built-in {spec} family"
    if spec.startswith(PATHS_PREFIX):
        return "entered paths"
    return spec


def family_caption(fam) -> None:
    st.caption(f"Family **{fam.name}** ({spec_label(family_spec())}) · start model **{fam.start_checkpoint.name}** · "
               f"fine-tuned variants: {', '.join(fam.variants)}")


def trusted(spec: str) -> bool:
    """The built-in families and the server's SAFESUB_FAMILY are opened as given; anything typed is confined."""
    return spec in BUILT_IN or spec == settings.server_family()


@st.cache_resource(max_entries=4, show_spinner=False)
def _family(spec: str, cache_root: str) -> Family:
    return resolve_family(spec, confined=not trusted(spec))


def current_family(spec: str | None = None) -> Family:
    """The Family of `spec` (default: the view's), or a SafesubError; the tiny family is built first if needed."""
    spec = spec or family_spec()
    if spec == "tiny":
        ensure_tiny()
    return _family(spec, str(settings.cache_root()))


@dataclass
class Resident:
    """The resident family, its session and a small in-memory memo of what pages derive from it."""

    family: Family
    session: FamilySession | None
    memo: dict = field(default_factory=dict)
    lock: Any = field(default_factory=threading.RLock)

    def memoised(self, key, compute: Callable[[], Any]):
        with self.lock:
            if key not in self.memo:
                self.memo[key] = compute()
            return self.memo[key]


def _release(res: Resident) -> None:
    """Drop the old family's models (cache_resource on_release)."""
    res.memo.clear()
    res.session = None


def set_choice() -> tuple[tuple[str, str], ...]:
    """The view's choice of evaluation sets: ((role, spec), ...) for the roles it sets, then ('convention', c) when
    it sets one (what the resident session's key holds)."""
    check_deferred()
    v = view()
    chosen = tuple((role, v[role]) for role in SET_ROLES if v.get(role))
    return chosen + ((("convention", v["convention"]),) if v.get("convention") in CONVENTIONS else ())


@st.cache_resource(max_entries=8, show_spinner=False)
def _sets(spec: str, cache_root: str, choice: tuple) -> EvalSets:
    family = _family(spec, cache_root)
    chosen = dict(choice)
    convention = chosen.pop("convention", None)
    return EvalSets.for_family(family, chosen, confined=True, convention=convention)


def current_sets(spec: str | None = None, choice: tuple | None = None) -> EvalSets:
    """The evaluation sets of the family `spec` (default: the view's) under `choice` (default: `set_choice()`), or a
    SafesubError naming the set and the problem."""
    spec = spec or family_spec()
    current_family(spec)
    return _sets(spec, str(settings.cache_root()), set_choice() if choice is None else choice)


@st.cache_resource(max_entries=1, show_spinner=False, on_release=_release)
def _resident(spec: str, cache_root: str, device: str, dtype: str, live: str, choice: tuple = (),
              placement: tuple = (None, None)) -> Resident:
    """`live`: the live prompts per set asked for (`live_setting`: a count, or 'auto' for the size rule); `choice`:
    the evaluation sets chosen (`set_choice`); `placement`: (device map, max_memory) as the view holds them."""
    torch.set_num_threads(settings.threads())
    family = _family(spec, cache_root)
    sets = _sets(spec, cache_root, choice)
    session = FamilySession(family, device=device, dtype=DTYPES[dtype], sets=sets,
                            batch=live_prompts(family, device, live), placement=Placement.parse(*placement))
    return Resident(family=family, session=session)


def compute() -> tuple[str, str]:
    """(device, dtype name) of the view: set on the Family page, else SAFESUB_DEVICE / SAFESUB_DTYPE, else auto.
    SafesubError when unavailable."""
    check_deferred()
    v = view()
    device, dtype = resolve_compute(v.get("device") or settings.device(), v.get("dtype") or settings.dtype())
    return device, dtype_name(dtype)


def live_setting() -> str:
    """Live prompts per set asked for: the view's (the Family page or the link's `live`), else SAFESUB_LIVE_PROMPTS,
    else 'auto'."""
    check_deferred()
    n = requested_live_prompts(view().get("live"))
    return "auto" if n is None else str(n)


def resident(spec: str | None = None) -> Resident:
    """The resident session of the current family on the view's device and dtype (loaded once, with a status box
    the first time)."""
    spec = spec or family_spec()
    family = current_family(spec)  # builds the tiny family first when needed
    placement = (view().get("device_map"), view().get("max_memory"))
    Placement.parse(*placement)  # a bad device map or max_memory: one error line, before any model loads
    key = (spec, str(settings.cache_root()), *compute(), live_setting(), set_choice(), placement)
    current_sets(spec, key[-2])  # a bad evaluation set: one error line, before any model loads
    if st.session_state.get("_loaded_key") == key:
        return _resident(*key)
    with st.status("Loading the family's models…", expanded=False) as box:
        bar = st.empty()  # a bar only when some weight file's hash is not stored yet (a new or edited file)
        fingerprint_all(family, progress=progress_callback(bar, "Hashing the checkpoints' files"))
        bar.empty()
        res = _resident(*key)
        box.update(label="Models loaded", state="complete")
    st.session_state["_loaded_key"] = key
    return res


def engine(res: Resident, variant: str) -> SubspaceEngine:
    """The variant's SubspaceEngine, built once (with a progress bar the first time)."""
    def build():
        bar = st.progress(0.0, text=f"Alignment subspaces of {variant}")
        eng = res.session.engine(variant, progress=progress_callback(bar, f"Alignment subspaces of {variant}"))
        bar.empty()
        return eng

    return res.memoised(("engine", variant), build)


def require_family() -> tuple[Family, Resident]:
    """(family, resident) for a page that needs them, with the family's caption drawn; a bad family shows one error
    line and ends the page. The link's values that need the core are checked first (`ui.link.check_deferred`)."""
    check_deferred()
    with shown_errors(stop=True):
        fam, res = current_family(), resident()
    family_caption(fam)
    return fam, res


def current_config() -> ProjectionConfig:
    """The ProjectionConfig of the Subspaces page's current view (raises SafesubError when invalid)."""
    check_deferred()
    v = view()
    rank = float(v["rank"])
    if v["rank_by"] == "energy":
        return ProjectionConfig(v["subspace"], v["mode"], rank_fraction=None, energy=rank, alpha=float(v["alpha"]))
    return ProjectionConfig(v["subspace"], v["mode"], rank_fraction=rank, alpha=float(v["alpha"]))
