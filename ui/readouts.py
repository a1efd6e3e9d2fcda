"""Live read-outs of one point (a projection or a competing method's point), drawn in place as waves come in.

Contract: `Readouts(S, start, variant, target, point, specs, label)` reserves one metric slot per spec (a grid of
`columns`) and, below it, the waves note and the exact-match note. A spec is (score key, the start model's value,
the fine-tune's value): a live key (scoring.names.LIVE) takes "live" for both (their own scores on the same waves);
any other key is a property of the point (fixed reference values, or None). `score()` draws the first wave: the
forward-pass scores, then greedy exact match (each read-out its value at the precision its interval allows, the
95% interval and n, the start model's and the fine-tune's values, the paired test against the start model);
`sharpen(point)`, at the end of a page, scores one more wave at a time while the widgets rest and redraws the
read-outs with narrower intervals (a widget move reruns the page, which stops the loop at a wave's boundary).
"""
from __future__ import annotations

import streamlit as st

from safesub_core.compute import dtype_name
from safesub_core.scoring import names as N
from safesub_core.scoring.live import LIVE_ARITH_TOKENS
from safesub_core.stats import Estimate, decimals
from safesub_core.waves import paired
from ui.widgets import shown_errors

DELTA_COLOR = {"higher": "normal", "lower": "inverse", None: "off"}  # st.metric's colour: is up good?
LIVE_SPECS = [(key, "live", "live") for key in N.LIVE]  # the live read-outs alone


def p_text(p: float) -> str:
    """A p-value as read-outs show it."""
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


class Readouts:
    """The read-outs of `point` on model `target` (a variant, or the start model for a method point), against the
    start model `start` and the fine-tune `variant` (module docstring)."""

    def __init__(self, session, start: str, variant: str, target: str, point, specs, label: str, columns: int = 4):
        self.S, self.start, self.variant, self.target, self.point = session, start, variant, target, point
        self.specs, self.label = list(specs), label
        cols = st.columns(columns)
        self.slots = [cols[i % columns].empty() for i in range(len(self.specs))]  # each redrawn in place
        self.live = [i for i, r in enumerate(self.specs) if r[0] in N.LIVE]
        self.decoded = [i for i, r in enumerate(self.specs) if r[0] in N.LIVE_DECODED]
        self.references: dict = {}  # waves -> (start's scores, fine-tune's, the start's per-prompt values)
        self.pending(self.live, f"scoring {label}…")
        self._waves_note, self._exact_note = st.empty(), st.empty()

    def show(self, i: int, point: dict, start: dict | None = None, ft: dict | None = None, p: dict | None = None):
        """Read-out i: the value at the precision its interval allows, the interval and n, the start model's and the
        fine-tune's values on the same prompts, and the paired test against the start model."""
        key, s_val, f_val = self.specs[i]
        label, color = N.label(key), DELTA_COLOR[N.score(key).better]
        notes = []
        if key in N.LIVE:
            est = Estimate.of(point, key)
            value, shown, d = est.value, est.value_text(), decimals(est.lo, est.hi)
            notes.append(f"95% CI [{est.lo:.{d}f}, {est.hi:.{d}f}] · n={est.n}")
            s_val, f_val = (None if d is None else d[key] for d in (start, ft))
        else:
            value = point[key]
            shown = f"{value:.4f}"
        if s_val is not None:
            notes.append(f"start ({self.start}) {s_val:.4g}" + ("" if not p or f"p_{key}" not in p
                                                                else f", paired {p_text(p[f'p_{key}'])}"))
        if f_val is not None:
            notes.append(f"{self.variant} {f_val:.4g}")
        with self.slots[i].container():
            st.metric(label, shown, delta=None if s_val is None else float(f"{value - s_val:.3g}"),
                      delta_color=color, delta_description=None if s_val is None else "vs start", border=True)
            st.caption(" · ".join(notes) if notes else "a property of the variant")

    def pending(self, indices, what: str) -> None:
        for i in indices:
            with self.slots[i].container():
                st.metric(N.label(self.specs[i][0]), "…", border=True)
                st.caption(what)

    def draw_live(self, point: dict, indices, decoded: bool = True) -> None:
        """The live read-outs of `point`, against the start model and the fine-tune on the same waves (the paired
        tests: the point's per-prompt values against the start model's)."""
        S, w = self.S, point["waves"]
        if w not in self.references:
            self.references[w] = (S.checkpoint_scores(self.start, waves=w), S.checkpoint_scores(self.variant, waves=w),
                                  S.live_values(self.start, waves=w))
        start, ft, start_values = self.references[w]
        p = paired(start_values, S.live_values(self.target, self.point, waves=w, decoded=decoded))
        for i in indices:
            self.show(i, point, start, ft, p)

    def note_waves(self, point: dict, busy: bool) -> None:
        S, ev = self.S, self.S.sets
        self._waves_note.caption(
            f"Live scores at {self.label}: refusal log-odds on harmful prompts ({ev.harmful.name}), NLL on utility "
            f"prompts ({ev.utility.name}), KL to the start model on benign prompts ({ev.benign.name}); "
            f"{point['waves']} of {point['waves_total']} waves of {S.waves.size} prompts a set, on {S.device} in "
            f"{dtype_name(S.dtype)}"
            + (" · scoring more while the slider rests…" if busy else "") + ". Deltas and p-values: the same "
            "prompts under the start model (paired tests).")

    def score(self) -> dict:
        """The first wave (or the waves already on disk): the forward-pass read-outs, then the decoded one; the
        point's scores. Raises SafesubError (a page shows it with `ui.shown_errors`)."""
        S, target, point = self.S, self.target, self.point
        scores = S.point_scores(target, point, decoded=False)
        self.draw_live(scores, [i for i in self.live if i not in self.decoded], decoded=False)
        self.note_waves(scores, busy=False)
        scores = S.point_scores(target, point)
        self.draw_live(scores, self.decoded)
        self._exact_note.caption(f"Exact match at {self.label}: {LIVE_ARITH_TOKENS}-token greedy answers to the "
                                 f"utility prompts, final answers compared by the {S.sets.convention} convention.")
        return scores

    def sharpen(self, scores: dict) -> dict:
        """One more wave at a time while the widgets rest, the read-outs redrawn (module docstring); the scores of
        the last wave drawn."""
        if scores["waves"] >= scores["waves_total"]:
            return scores
        with shown_errors():
            while self.S.sharpen(self.target, self.point):
                self.note_waves(scores, busy=True)
                scores = self.S.point_scores(self.target, self.point, compute=False)
                self.draw_live(scores, self.live)
            self.note_waves(scores, busy=False)
        return scores
