"""The view: what a page shows (family, variant, point, layer, prompt...), kept in the URL so a link reproduces it.

Contract: `view()` is this browser session's dict, read once from `st.query_params` through THE validation layer of
link values, `PARAMS`: one row per key with its type and its range (rank in [0.01, 1], read as a rank fraction or an
energy fraction; alpha in [-1, 3]: the Subspaces page's sliders read their bounds from this table), its allowed
values (subspace, mode, method, intervention, dtype and live from the core's own lists; rank_by; target) or the
core's own check (family: `family.resolve_family` through `ui.family.current_family`; device:
`compute.resolve_compute`; live: `settings.parse_count`; the evaluation sets harmful, utility, benign and edgy: a
set spec each, read by `prompts.specs.check_spec`, paths confined to the allowed roots; convention: flexible or
strict; strength, add_alpha and tau: the Hypotheses page's sliders' ranges). A malformed,
out-of-range or unknown value falls back to the default and is reported on ONE line, "link parameter k='v' (why), ...:
not a valid value; the default is used instead", drawn where `widgets.header` reserved it (`error_line`, `report`);
never an exception. The checks that need the core (torch) run in `check_deferred()`, which ui.family calls before
any of those values is used, so the first page draws its title and family selector before torch loads; the layer's
upper bound is the model's, checked by the Activation map page (`bounded`). `parse_query` is the same validation as
a pure function. `publish_view()` writes the view back at the end of each page; `bound(name, widget, ...)` renders a
widget whose value starts from and is written to view[name].
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import streamlit as st

from safesub_core import settings
from safesub_core.errors import SafesubError


def _float(x: str) -> float:
    try:
        value = float(x)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _opt_int(x: str) -> int | None:
    try:
        return None if x in ("", "None") else int(x)
    except ValueError:
        raise ValueError("not a whole number") from None


def _core(ref: str) -> Any:
    """A name of the core's, "module:NAME", imported on first use: the core's modules load torch, and the first page
    draws its title and family selector before that."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _open_family(spec: str) -> None:
    """Open the link's family through the core's one resolver (SafesubError: its one line). 'tiny' (built on first
    use) and the server's own family are the page's to open, not opened here: no torch before the first page's
    family selector."""
    if spec not in ("", "tiny", default_family_spec()):
        importlib.import_module("ui.family").current_family(spec)


@dataclass(frozen=True)
class Param:
    """One view key: its default, how its URL text is read, and which values it may take.

    `lo`/`hi`: inclusive bounds of a number; `check`: a function that raises SafesubError for a value it refuses
    (or the "module:function" of the core's own check); `choices`: the allowed values (a tuple, or the
    "module:NAME" of the core's own list or of a function listing them); `extra`: values allowed besides them. A
    key whose check or choices are the core's is checked by `check_deferred`."""

    default: Any = None
    cast: Callable[[str], Any] = str
    lo: float | None = None
    hi: float | None = None
    check: Callable[[Any], Any] | str | None = None
    choices: tuple | str | None = None
    extra: tuple = ()
    later: bool = False  # checked by `check_deferred` although its check is a function (it reads files)

    @property
    def deferred(self) -> bool:
        return self.later or isinstance(self.choices, str) or isinstance(self.check, str)

    def read(self, raw: str) -> Any:
        """The value of `raw`, or ValueError(why)."""
        value = self.cast(raw)
        if value is not None and (self.lo is not None and value < self.lo or self.hi is not None and value > self.hi):
            raise ValueError(f"outside {self.lo:g} to {self.hi:g}" if self.hi is not None else f"below {self.lo:g}")
        if self.check is not None:
            try:
                (_core(self.check) if isinstance(self.check, str) else self.check)(value)
            except SafesubError as err:
                raise ValueError(str(err)) from None
        if self.choices is not None:
            listed = _core(self.choices) if isinstance(self.choices, str) else self.choices
            allowed = (*self.extra, *(listed() if callable(listed) else listed))  # a function: this machine's devices
            if value not in allowed:
                raise ValueError(f"one of {', '.join(map(str, allowed))}")
        return value


def _set_check(role: str) -> Callable[[str], None]:
    """The check of an evaluation set's link value: the core reads the set it names (confined; SafesubError)."""
    return lambda text: _core("safesub_core.prompts.specs:check_spec")(text, role)


SET_ROLES = ("harmful", "utility", "benign", "edgy")  # prompts.ROLES (not imported: no core before the first page)
CONVENTIONS = ("flexible", "strict")  # scoring.text.CONVENTIONS

PARAMS: dict[str, Param] = {
    "family": Param(None, check=_open_family),
    "variant": Param(None),  # a name of the family's: the pages fall back to its first variant
    "subspace": Param("topk", choices="safesub_core.projection:SUBSPACES"),
    "mode": Param("parallel", choices="safesub_core.projection:MODES"),
    "rank_by": Param("fraction", choices=("fraction", "energy")),
    "rank": Param(0.25, _float, 0.01, 1.0),  # a rank fraction, or an energy fraction (0, 1]: the slider's range
    "alpha": Param(1.0, _float, -1.0, 3.0),  # the scale slider's range
    "layer": Param(None, _opt_int, 0),  # at most the model's layer count (`bounded`, on the Activation map page)
    "method": Param("pca", choices="safesub_core.activations:METHODS"),
    "prompt": Param(None),
    "prompt_set": Param(None),
    "reference": Param("aligned"),  # a role of the family's: the Overlap page falls back to 'aligned'
    "device": Param(None, check="safesub_core.compute:resolve_compute",
                    choices="safesub_core.compute:available_devices", extra=("auto",)),
    "dtype": Param(None, choices="safesub_core.compute:DTYPES", extra=("auto",)),
    "device_map": Param(None, check="safesub_core.placement:parse_device_map"),  # auto, a JSON map or file
    "max_memory": Param(None, check="safesub_core.placement:parse_max_memory"),  # e.g. 0=70GiB,cpu=200GiB
    "live": Param(None, check=lambda n: settings.parse_count(n, "live prompts"),  # SAFESUB_LIVE_PROMPTS's parser
                  choices="safesub_core.compute:LIVE_CHOICES"),
    **{role: Param(None, check=_set_check(role), later=True) for role in SET_ROLES},  # set specs (docs/method.md)
    "convention": Param(None, choices=CONVENTIONS),  # exact match of the utility set
    # the Hypotheses page: the refusal direction's intervention, its knob (strength s or addition's alpha), the model
    # it acts on, and SafeLoRA's threshold tau (the sliders' ranges)
    "intervention": Param("ablation", choices="safesub_core.hypotheses:DIRECTION_METHODS"),
    "strength": Param(1.0, _float, -2.0, 2.0),
    "add_alpha": Param(1.0, _float, 0.0, 4.0),
    "target": Param("variant", choices=("variant", "start")),
    "tau": Param(0.5, _float, 0.0, 1.0),
}
VIEW_DEFAULTS: dict[str, Any] = {k: p.default for k, p in PARAMS.items()}
BOUNDED_LATER = ("layer",)  # keys whose upper bound only a page knows (`bounded`)


def _shown(raw: str, limit: int = 60) -> str:
    """A value as the error line quotes it: repr (one line whatever it holds), long ones cut."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "…")


def parse_query(query: Mapping[str, Any], keys=None) -> tuple[dict, list[str]]:
    """({key: value} of `keys` (default: every key of PARAMS), the bad entries "key='raw' (why)"): each value read
    and checked by PARAMS; a bad or absent one is the default. `query` maps keys to their URL text."""
    values, bad = {}, []
    for key in PARAMS if keys is None else keys:
        param, raw = PARAMS[key], query.get(key)
        values[key] = param.default
        if raw is None:
            continue
        try:
            values[key] = param.read(str(raw))
        except ValueError as why:
            bad.append(f"{key}={_shown(str(raw))} ({why})")
    return values, bad


def error_line(slot) -> None:
    """Where this page run draws the link's one error line (`widgets.header` reserves it): `report` fills it."""
    st.session_state["_link_line"] = (slot, [])


def report(bad: list[str]) -> None:
    """Add bad link entries to this run's one error line (drawn again with all of them)."""
    if not bad:
        return
    slot, shown = st.session_state.get("_link_line") or (None, [])
    shown += bad
    line = f"link parameter {', '.join(shown)}: not a valid value; the default is used instead"
    (slot or st).error(line, icon="⚠️")


def default_family_spec() -> str:
    """The server's default family: SAFESUB_FAMILY, else the built-in tiny family."""
    return settings.default_family()


def view() -> dict:
    """The view dict of this browser session, first read from the URL's query parameters (see the contract)."""
    if "_view" not in st.session_state:
        query = {k: st.query_params.get(k) for k in PARAMS}
        now = [k for k, p in PARAMS.items() if not p.deferred]
        v, bad = parse_query(query, now)
        v |= {k: PARAMS[k].default for k in PARAMS if k not in v}
        if not v["family"]:
            v["family"] = default_family_spec()
        st.session_state["_view"] = v
        st.session_state["_link_later"] = {k: query[k] for k in PARAMS if k not in now and query[k] is not None}
        st.session_state["_link_raw"] = {k: query[k] for k in BOUNDED_LATER if query[k] is not None}
        report(bad)
    return st.session_state["_view"]


def check_deferred() -> None:
    """Check the link's values that need the core's lists (once per browser session; ui.family calls this before
    any of them is used): a bad one falls back to the default and joins the link's error line."""
    v = view()
    later = st.session_state.pop("_link_later", None)
    if later:
        values, bad = parse_query(later, list(later))
        v |= values
        report(bad)


def bounded(name: str, hi: float, default: Any) -> Any:
    """view[name] within [PARAMS[name].lo, hi] (an upper bound only the page knows, like the model's layer count),
    else `default`; reported on the link's error line when the value came from the link."""
    v, lo = view(), PARAMS[name].lo
    raw = st.session_state.get("_link_raw", {}).pop(name, None)
    if v.get(name) is None or not lo <= v[name] <= hi:
        if raw is not None and v.get(name) is not None:
            report([f"{name}={_shown(str(raw))} (outside {lo:g} to {hi:g})"])
        v[name] = default
    return v[name]


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
