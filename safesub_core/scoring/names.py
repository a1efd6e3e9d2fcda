"""Score keys: every score the project reports, defined once with its label, its kind and the direction that is
better (docs/method.md, "Scores"; the diagnostics' keys: "Diagnostics").

A key is the name of a score in a summary dict, a cache entry, a DataFrame column and a page's read-out. Kinds:
"rate" (a share of prompts, in [0, 1]), "mean" (a mean over prompts) and "diagnostic" (a property of the projected
update, no prompts involved). `better`: "higher", "lower" or None (neither: a drift or a geometry, shown without a
verdict). `source` says what computes it: "live" (forward passes at every slider move), "decoded" (live greedy
tokens), "generation" (greedy completions, `scoring.reports`) or "diagnostic" (`subspace.Diagnostics`).

Per-prompt values (the reports' table columns and `live_forward_scores`' dict keys) are named here too.
"""
from __future__ import annotations

from dataclasses import dataclass

from safesub_core.errors import SafesubError

# ---- live scores (forward passes, plus a few greedy tokens for arithmetic)
MARGIN_MEAN = "margin_mean"
SHARE_MARGIN_NEGATIVE = "share_margin_negative"
NLL_MEAN = "nll_mean"
ARITH_EXACT_MATCH = "arith_exact_match"
KL_TO_START = "kl_to_start"
# ---- generation scores (greedy completions)
REFUSAL_RATE = "refusal_rate"
ATTACK_SUCCESS_RATE = "attack_success_rate"
EXACT_MATCH = "exact_match"
OVERREFUSAL_RATE = "overrefusal_rate"
SHARE_MARGIN_POSITIVE = "share_margin_positive"
JUDGE_MEAN = "judge_mean"
# ---- diagnostics of the projected update (subspace.Diagnostics' fields)
ENERGY_KEPT = "energy_kept"
COS_TASK_KEPT = "cos_task_kept"
COS_TASK_ALIGN = "cos_task_align"

# ---- per-prompt values: the reports' table columns and `live_forward_scores`' keys
PROMPT, COMPLETION, REFUSED, MARGIN, JUDGE = "prompt", "completion", "refused", "margin", "judge"
PREDICTED, REFERENCE, CORRECT, NLL = "predicted", "reference", "correct", "nll"
KL, CHECKED = "kl", "checked"

GEN_PREFIX = "gen_"  # findings' columns for generation scores (gen_exact_match beside the live arith_exact_match)

KINDS = ("rate", "mean", "diagnostic")
DIRECTIONS = ("higher", "lower", None)
SOURCES = ("live", "decoded", "generation", "diagnostic")


@dataclass(frozen=True)
class Score:
    """One score: its key, a short label for tables and read-outs, its kind, the better direction, its source."""

    key: str
    label: str
    kind: str
    better: str | None
    source: str

    def __post_init__(self):
        if self.kind not in KINDS or self.better not in DIRECTIONS or self.source not in SOURCES:
            raise SafesubError(f"score {self.key!r}: kind, direction or source unknown")


SCORES: dict[str, Score] = {s.key: s for s in (
    Score(MARGIN_MEAN, "refusal log-odds", "mean", "higher", "live"),  # refusal log-odds: > 0 leans to refuse
    Score(SHARE_MARGIN_NEGATIVE, "share predicted to comply", "rate", "lower", "live"),  # log-odds < 0
    Score(NLL_MEAN, "NLL (utility)", "mean", "lower", "live"),
    Score(ARITH_EXACT_MATCH, "utility exact match", "rate", "higher", "decoded"),
    Score(KL_TO_START, "KL to start", "mean", None, "live"),  # drift from the start model, shown without a verdict
    Score(REFUSAL_RATE, "refusal rate", "rate", "higher", "generation"),  # on harmful prompts
    Score(ATTACK_SUCCESS_RATE, "attack success rate", "rate", "lower", "generation"),
    Score(EXACT_MATCH, "exact match", "rate", "higher", "generation"),
    Score(OVERREFUSAL_RATE, "over-refusal", "rate", "lower", "generation"),
    Score(SHARE_MARGIN_POSITIVE, "share predicted to refuse", "rate", "lower", "generation"),  # on edgy benign prompts
    Score(JUDGE_MEAN, "judge mean (1-5)", "mean", "lower", "generation"),  # 5 = fully complies with harm
    Score(ENERGY_KEPT, "energy kept E", "diagnostic", None, "diagnostic"),
    Score(COS_TASK_KEPT, "cos(task, kept)", "diagnostic", None, "diagnostic"),
    Score(COS_TASK_ALIGN, "cos(task, align)", "diagnostic", None, "diagnostic"),
)}

LIVE_FORWARD: tuple[str, ...] = (MARGIN_MEAN, SHARE_MARGIN_NEGATIVE, NLL_MEAN, KL_TO_START)
LIVE_DECODED: tuple[str, ...] = (ARITH_EXACT_MATCH,)
LIVE: tuple[str, ...] = LIVE_FORWARD[:3] + LIVE_DECODED + LIVE_FORWARD[3:]  # the read-outs' order
GENERATION: tuple[str, ...] = (REFUSAL_RATE, ATTACK_SUCCESS_RATE, EXACT_MATCH, OVERREFUSAL_RATE, JUDGE_MEAN)
DIAGNOSTICS: tuple[str, ...] = (ENERGY_KEPT, COS_TASK_KEPT, COS_TASK_ALIGN)


def score(key: str) -> Score:
    """The Score of `key` (a findings column such as "gen_exact_match" gives the generation score it holds)."""
    found = SCORES.get(key) or SCORES.get(key.removeprefix(GEN_PREFIX))
    if found is None:
        raise SafesubError(f"score {key!r}: unknown (expected one of {', '.join(SCORES)})")
    return found


def label(key: str) -> str:
    """The short label of a score key."""
    return score(key).label


def gen_key(key: str) -> str:
    """Findings' column for a generation score: "exact_match" -> "gen_exact_match"."""
    if score(key).source != "generation":
        raise SafesubError(f"score {key!r}: is not a generation score")
    return GEN_PREFIX + key
