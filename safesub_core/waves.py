"""Live scores in waves: what a slider point shows first, and how its numbers sharpen while the slider rests
(docs/method.md, "Statistics").

Wave b of size B scores prompts [b*B, (b+1)*B) of each evaluation role: harmful (refusal log-odds), utility (answer
NLL and greedy exact match) and benign (KL to the start model); a role whose set is shorter has no prompts in the
later waves. A point's scores after w waves summarise the per-prompt values of waves 0..w-1, so n counts up as
waves come in; each wave is cached on its own, keyed by its prompts' content, so the summary after w waves is the
same whatever order or session computed them in, and coming back to a point resumes where it stopped.

- `Waves(sets, size)`: `count` (waves until every set is exhausted), `part(role, b)` (that wave's prompts of a role,
  None when the role has none left) and `key(b)` (the content hashes of wave b's parts).
- `summarise(values)` -> {score: value, score_lo, score_hi, score_n} for every live score present in the per-prompt
  `values` {margin, nll, kl, correct}: Wilson intervals for the rates (share of prompts predicted to comply, exact
  match), BCa bootstrap intervals for the means (`stats`).
- `paired(a, b)` -> {p_<score>: p}: b against a on the same prompts; McNemar for the rates, the paired bootstrap
  for the means; a list `b` (several random draws) is compared draw by draw and the largest p is kept (a
  difference from a random subspace must hold against every draw).
- `generation_summary(table)`: the same summaries for a generation table (refusal rate, attack success rate,
  exact match, over-refusal, judge mean) from its per-prompt rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd

import torch

from safesub_core import scoring
from safesub_core.errors import SafesubError
from safesub_core.generation import greedy_answers
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets, PromptSet
from safesub_core.scoring import names
from safesub_core.scoring.live import LIVE_ARITH_TOKENS
from safesub_core.stats import Estimate, mcnemar, mean_interval, paired_bootstrap, rate_of

LIVE_ROLES = ("harmful", "utility", "benign")  # the roles a live wave scores (edgy: generation scores only)
# each live score: the per-prompt values it summarises, and how (a rate of a yes/no outcome, or a mean)
LIVE_VALUES = {
    names.MARGIN_MEAN: (names.MARGIN, "mean"),
    names.SHARE_MARGIN_NEGATIVE: (names.MARGIN, "negative"),
    names.NLL_MEAN: (names.NLL, "mean"),
    names.ARITH_EXACT_MATCH: (names.CORRECT, "rate"),
    names.KL_TO_START: (names.KL, "mean"),
}


@dataclass(frozen=True)
class Waves:
    """The waves of live scoring over `sets`, `size` prompts of each role a wave."""

    sets: EvalSets
    size: int

    def __post_init__(self):
        if int(self.size) != self.size or self.size < 1:
            raise SafesubError(f"live prompts per wave {self.size!r}: must be a whole number >= 1")

    @property
    def count(self) -> int:
        """Waves until every live role's set is exhausted."""
        return max(math.ceil(len(getattr(self.sets, r)) / self.size) for r in LIVE_ROLES)

    def part(self, role: str, b: int) -> PromptSet | None:
        """Wave b's prompts of `role` (with their references), None when the role has none left."""
        ps = getattr(self.sets, role)
        lo, hi = b * self.size, min(len(ps), (b + 1) * self.size)
        if lo >= hi:
            return None
        refs = None if ps.references is None else ps.references[lo:hi]
        return PromptSet(f"{ps.name}[{lo}:{hi}]", ps.prompts[lo:hi], refs, ps.kind, ps.source)

    def key(self, b: int) -> dict:
        """What wave b scores: its parts' content hashes by role (None for a role with none left)."""
        if not 0 <= b < self.count:
            raise SafesubError(f"live wave {b}: the sets have {self.count} waves of {self.size} prompts")
        return {r: None if (p := self.part(r, b)) is None else p.content_hash for r in LIVE_ROLES}


def estimate(values: Sequence, how: str) -> Estimate:
    """One live score's estimate from its per-prompt values: a mean, a rate of true outcomes, or the share of
    negative values."""
    if how == "mean":
        return mean_interval(values)
    if how == "negative":
        return rate_of([float(v) < 0 for v in values])
    return rate_of([bool(v) for v in values])


def summarise(values: dict[str, Sequence]) -> dict:
    """{score: value, score_lo, score_hi, score_n} for each live score whose per-prompt values are in `values`."""
    out = {}
    for score, (value, how) in LIVE_VALUES.items():
        if value in values:
            out |= estimate(values[value], how).columns(score)
    return out


def _outcomes(values: Sequence, how: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x < 0 if how == "negative" else x.astype(bool) if how == "rate" else x


def paired(a: dict[str, Sequence], b: dict[str, Sequence] | list[dict[str, Sequence]]) -> dict:
    """{p_<score>: two-sided p} of b against a on the same prompts, per live score both hold (see the module
    docstring; with several draws in `b`, the largest p)."""
    draws = b if isinstance(b, list) else [b]
    out = {}
    for score, (value, how) in LIVE_VALUES.items():
        if value not in a or not draws or any(value not in d for d in draws):
            continue
        test = paired_bootstrap if how == "mean" else mcnemar
        out[f"p_{score}"] = max(test(_outcomes(a[value], how), _outcomes(d[value], how)).p for d in draws)
    return out


def generation_summary(table: pd.DataFrame) -> dict:
    """Rates (and the judge's mean) of a generation table (`FamilySession.generation_scores`' per-prompt rows, with
    their `role`), each with its interval and n: refusal and attack success rates on the harmful role, exact match
    on utility, over-refusal on edgy."""
    role = table["role"] if "role" in table else pd.Series([""] * len(table))
    harmful, utility, edgy = (table[role == r] for r in ("harmful", "utility", "edgy"))
    refused = [bool(x) for x in harmful.get(names.REFUSED, [])]
    out = rate_of(refused).columns(names.REFUSAL_RATE)
    asr = rate_of([not x for x in refused])
    out |= asr.columns(names.ATTACK_SUCCESS_RATE)
    out |= rate_of([bool(x) for x in utility.get(names.CORRECT, [])]).columns(names.EXACT_MATCH)
    out |= rate_of([bool(x) for x in edgy.get(names.REFUSED, [])]).columns(names.OVERREFUSAL_RATE)
    judged = [float(x) for x in harmful.get(names.JUDGE, []) if x is not None and not math.isnan(float(x))]
    if names.JUDGE in harmful:
        out |= mean_interval(judged).columns(names.JUDGE_MEAN)
    return out


def _prompts(part: PromptSet | None) -> tuple[str, ...]:
    return () if part is None else part.prompts


MAX_DRAFTS = 256  # (point, wave)s whose greedy answers a session keeps as drafts (n x LIVE_ARITH_TOKENS ids each)


class LiveWaves:
    """The live scores of a `session.FamilySession`, wave by wave (see the module docstring): a part of the session
    (it uses the session's `waves`, `sets`, `cache`, `_key`, `_lock`, models, `format`, `openings` and drafts), kept
    here so that the session's module stays about models, points and keys."""

    def _wave_model(self, target: str, cfg, seed: int | None) -> torch.nn.Module:
        """The model a point's scores run on: a checkpoint (cfg None), a projection (`projected`) or a competing
        method's point (`hypotheses.Hypotheses._method_model`)."""
        if cfg is None:
            return self.model(target)
        if isinstance(cfg, ProjectionConfig):
            return self.projected(target, cfg, seed=seed)
        return self._method_model(target, cfg)

    def forward_values(self, model: torch.nn.Module, point: tuple | None = None, wave: int = 0) -> dict:
        """Per-prompt values of the live scores that need forward passes only, on wave `wave`'s prompts
        (`waves.Waves.part`): refusal log-odds (harmful), answer NLL (utility) and KL to the start model (benign), in
        two passes (`scoring.live_forward_scores`); a role with no prompts left in this wave is absent. The same
        passes check the greedy answers' draft for `point` (`_draft`), kept for `decoded_values` there."""
        h, u, b = (self.waves.part(r, wave) for r in LIVE_ROLES)
        draft = None if u is None else self._draft(point, wave)
        got = scoring.live_forward_scores(model, self.reference, self.tokenizer, _prompts(h), _prompts(u),
                                          [] if u is None else u.references, _prompts(b), chat=self.format,
                                          openings=self.openings, ref_cache=self._reference_logits, drafts=draft)
        self._checked = ((point, wave), draft, got[names.CHECKED]) if names.CHECKED in got else None
        return {key: got[key].tolist() for key, part in ((names.MARGIN, h), (names.NLL, u), (names.KL, b))
                if part is not None}

    def decoded_values(self, model: torch.nn.Module, point: tuple | None = None, wave: int = 0) -> dict:
        """Per-prompt exact match of greedy answers (LIVE_ARITH_TOKENS tokens) on wave `wave`'s utility prompts, under
        the sets' answer convention. The answers are checked against a draft, those of the nearest point scored
        before (`_draft`), in the forward pass when it ran at this point and wave just before, else in a pass of
        their own, and decoded token by token only where the draft fails (`generation.greedy_answers`; the result is
        the same)."""
        u = self.waves.part("utility", wave)
        if u is None:
            return {}
        draft, checked, kept = self._draft(point, wave), None, self._checked
        # the forward pass checked this draft at this point (without a point the model could be any)
        if point is not None and kept is not None and kept[0] == (point, wave) and kept[1] is draft:
            checked = kept[2]
        answers = greedy_answers(model, self.tokenizer, u.prompts, LIVE_ARITH_TOKENS, chat=self.format,
                                 draft=draft, checked=checked)
        if point is not None:
            self._answers.pop((point, wave), None)
            self._answers[(point, wave)] = answers.tokens
            while len(self._answers) > MAX_DRAFTS:
                self._answers.pop(next(iter(self._answers)))
        convention = self.sets.convention
        return {names.CORRECT: [scoring.exact_match(scoring.extract_answer(a, convention), r)
                                for a, r in zip(answers.completions, u.references)]}

    def _draft(self, point: tuple | None, wave: int) -> torch.Tensor | None:
        """Answers to check first at `point` = (target, cfg or None, seed) on `wave`: those of the same wave, variant,
        subspace, mode, scale and kind of rank at the closest rank; else the latest scored of the wave."""
        keys = [k for k in self._answers if k[1] == wave]
        if not keys:
            return None

        def distance(key: tuple) -> tuple:
            (target, c, s), cfg = key[0], None if point is None else point[1]
            if point is None or (target, s) != (point[0], point[2]) or c is None or cfg is None:
                return (1, 0.0)
            if not (isinstance(c, ProjectionConfig) and isinstance(cfg, ProjectionConfig)):
                same = type(c) is type(cfg) and getattr(c, "method", None) == getattr(cfg, "method", None)
                return (0, abs(c.value - cfg.value)) if same else (1, 0.0)
            if (c.subspace, c.mode, c.alpha, c.rank_fraction is None) != (cfg.subspace, cfg.mode, cfg.alpha,
                                                                          cfg.rank_fraction is None):
                return (1, 0.0)
            return (0, abs((c.rank_fraction or c.energy) - (cfg.rank_fraction or cfg.energy)))

        return self._answers[min(reversed(keys), key=distance)]  # ties: the latest

    def _wave(self, parts: dict, wave: int, model: Callable[[], torch.nn.Module], point: tuple, decoded: bool,
              compute: bool) -> dict | None:
        """Wave `wave`'s per-prompt values of a point from the disk cache or computed: the forward-pass values and
        the decoded ones are entries of their own ('live_forward', 'live_decoded'), so the first can show before
        the second is done. None when not cached and not `compute`."""
        parts = parts | {"wave": self.waves.key(wave)}
        if not compute:
            forward = self.cache.get("live_forward", parts)
            decoded_part = self.cache.get("live_decoded", parts) if decoded and forward is not None else {}
            return None if forward is None or decoded_part is None else forward | decoded_part
        with self._lock:
            forward = self.cache.get_or_compute("live_forward", parts,
                                                lambda: self.forward_values(model(), point, wave))
            if not decoded:
                return forward
            return forward | self.cache.get_or_compute("live_decoded", parts,
                                                       lambda: self.decoded_values(model(), point, wave))

    def _values(self, target: str, cfg: ProjectionConfig | None, seed: int | None, waves: int | None,
                decoded: bool, compute: bool) -> tuple[dict, int] | None:
        """(per-prompt values of waves 0..w-1 joined, w) of a checkpoint (cfg None) or a point. `waves` None: every
        wave already on disk from the first on (at least the first, computed when `compute`): where the point's
        scoring stopped last time."""
        seed = self._seed(cfg, seed)
        parts = self._key(target, cfg, reference=True, seed=seed, convention=self.sets.convention)
        point, model = (target, cfg, seed), lambda: self._wave_model(target, cfg, seed)
        total = self.waves.count
        if waves is None:
            waves = 1
            while waves < total and self.cache.get("live_forward", parts | {"wave": self.waves.key(waves)}):
                waves += 1
        if not 1 <= waves <= total:
            raise SafesubError(f"live waves {waves}: the sets have {total} waves of {self.waves.size} prompts")
        joined: dict[str, list] = {}
        for b in range(waves):
            got = self._wave(parts, b, model, point, decoded, compute)
            if got is None:
                return None
            for key, values in got.items():
                joined.setdefault(key, []).extend(values)
        return joined, waves

    def live_values(self, target: str, cfg: ProjectionConfig | None = None, seed: int | None = None,
                    waves: int | None = None, decoded: bool = True, compute: bool = True) -> dict | None:
        """Per-prompt live values {margin, nll, kl, correct} of a checkpoint (cfg None) or a point of variant `target`
        over its first `waves` waves (None: as many as are on disk, at least one); what paired tests compare."""
        got = self._values(target, cfg, seed, waves, decoded, compute)
        return None if got is None else got[0]

    def _scores(self, target, cfg, seed, waves, decoded, compute) -> dict | None:
        got = self._values(target, cfg, seed, waves, decoded, compute)
        if got is None:
            return None
        values, w = got
        return summarise(values) | {"waves": w, "waves_total": self.waves.count}

    def checkpoint_scores(self, name: str, waves: int | None = None, decoded: bool = True) -> dict:
        """Live scores of a checkpoint of the family, with intervals (`waves.summarise`) and the waves behind them
        (cached per wave)."""
        return self._scores(name, None, None, waves, decoded, compute=True)

    def point_scores(self, variant: str, cfg: ProjectionConfig, compute: bool = True, decoded: bool = True,
                     waves: int | None = None, seed: int | None = None) -> dict | None:
        """Diagnostics and live scores at a point, each score with its interval and n (`waves.summarise`), plus
        'waves' (scored so far) and 'waves_total'. `waves` None: every wave already on disk (resume), at least the
        first; with `decoded=False` the greedy exact match is left out (forward passes only: what a page shows
        first); with `compute=False` only waves already in the disk cache are used (None when the first is not).
        `seed`: the random draw of a Random or Random-K subspace (default the session's). `cfg` may also be a
        competing method's point (`hypotheses.MethodPoint`): its diagnostics are `method_diagnostics`."""
        live = self._scores(variant, cfg, seed, waves, decoded, compute)
        if live is None:
            return None
        if not isinstance(cfg, ProjectionConfig):  # a competing method's point
            return self.method_diagnostics(variant, cfg) | live
        return self.engine(variant, seed=self._seed(cfg, seed)).diagnostics(cfg).summary() | live

    def sharpen(self, target: str, cfg: ProjectionConfig | None = None, seed: int | None = None) -> bool:
        """Score the first wave of this point (or checkpoint, cfg None) not yet on disk, forward and decoded; False
        when every wave is already scored. A page calls it while the slider rests, one wave at a time, so a move
        cancels at the next wave's boundary and the waves done stay cached."""
        seed = self._seed(cfg, seed)
        parts = self._key(target, cfg, reference=True, seed=seed, convention=self.sets.convention)
        point, model = (target, cfg, seed), lambda: self._wave_model(target, cfg, seed)
        for b in range(self.waves.count):
            if self.cache.get("live_decoded", parts | {"wave": self.waves.key(b)}) is None:
                self._wave(parts, b, model, point, decoded=True, compute=True)
                return True
        return False

    def warm(self, variant: str, cfg: ProjectionConfig, step: float = 0.02) -> bool:
        """Pay now, once per variant and draw, for what the first slider moves away from `cfg` would otherwise pay
        (the first rank moves of the working model, the first forward passes that check a draft, buffers sized for
        them): score the first wave at the ranks `step` either side of `cfg` (cached like any point). A page calls
        it after its first read-outs are on screen. False when this variant was warm already."""
        key = (variant, self._seed(cfg, None))
        if key in self._warm:
            return False
        if cfg.rank_fraction is None:
            near = [replace(cfg, energy=min(1.0, max(0.01, cfg.energy + d))) for d in (step, -step)]
        else:
            near = [replace(cfg, rank_fraction=min(1.0, max(0.01, cfg.rank_fraction + d))) for d in (step, -step)]
        for other in near:
            self.point_scores(variant, other, waves=1)
        self._warm.add(key)
        return True
