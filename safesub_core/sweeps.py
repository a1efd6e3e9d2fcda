"""A sweep: diagnostics (and scores) at every point of a grid of subspaces x modes x rank fractions.

Contract: `sweep(family_or_session, variants=None, subspaces=..., modes=..., fracs=..., alpha=1.0,
scores="live", progress=None, seeds=3, waves=None, judge=None) -> DataFrame` returns one row per (variant, subspace, mode, rank fraction)
and, for Random and Random-K, per random draw (`seeds` draws: the session's seed and the next ones; column `seed`,
empty for Top-K): the family and variant names, the point's `ProjectionDiagnostics.summary()` (energy kept,
cosines, mean rank fraction...) and, by `scores` (the engines' warnings, e.g. a tensor whose alignment update is
zero, are in `table.attrs["warnings"]`, one line each):
- "none": diagnostics only; a `Family` is enough and no model is loaded (one SVD per tensor, cached);
- "live": plus the live read-outs of `FamilySession.point_scores` on every prompt of the session's sets (all its
  waves; or the first `waves` waves, as a page's chart does), each with `<score>_lo`, `<score>_hi` and `<score>_n` (95% intervals), and on Top-K rows
  `p_vs_random_<score>`: the paired test of Top-K against Random at the same point (McNemar for the rates, paired
  bootstrap for the means), the largest p over the draws (`waves.paired`);
- "generate": plus the generation scores (`FamilySession.generation_scores`) with their intervals, prefixed `gen_`;
  with a `judge` (`scoring.Judge`) also its mean 1-5 score (`gen_judge_mean` and its interval) and how many
  completions it scored.
Scores need a `FamilySession` (its evaluation sets, device and dtype). Every setting is checked before any work:
a bad point, an unknown variant or an empty list (of variants, subspaces, modes or fractions; `variants=None` is
every variant) is a one-line SafesubError. Every score comes from the session's disk cache when present.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.projection import SUBSPACES, ProjectionConfig
from safesub_core.scoring import Judge
from safesub_core.session import FamilySession
from safesub_core.subspace import SubspaceEngine
from safesub_core.waves import paired

SCORES = ("none", "live", "generate")
DEFAULT_MODES = ("parallel", "orthogonal")
DEFAULT_FRACS = (0.01, 0.25, 0.5, 0.75, 0.99)  # the study's rank fractions
DEFAULT_SEEDS = 3  # random draws of the Random and Random-K subspaces per point
P_PREFIX = "p_vs_random_"  # Top-K rows: p-value of the paired test against Random at the same point, per live score


def grid(subspaces: Sequence[str], modes: Sequence[str], fracs: Sequence[float],
         alpha: float = 1.0) -> dict[tuple[str, str, float], ProjectionConfig]:
    """The sweep's points {(subspace, mode, fraction): ProjectionConfig}; an empty list or a bad value is a
    one-line SafesubError."""
    for what, values in (("subspaces", subspaces), ("modes", modes), ("rank fractions", fracs)):
        if not list(values):
            raise SafesubError(f"sweep {what}: the list is empty")
    return {(s, m, f): ProjectionConfig(s, m, f, alpha=alpha) for s in subspaces for m in modes for f in fracs}


def sweep(target: Family | FamilySession, variants: Sequence[str] | None = None,
          subspaces: Sequence[str] = SUBSPACES, modes: Sequence[str] = DEFAULT_MODES,
          fracs: Sequence[float] = DEFAULT_FRACS, alpha: float = 1.0, scores: str = "live",
          progress: Callable[[int, int, str], None] | None = None, seeds: int = DEFAULT_SEEDS,
          waves: int | None = None, judge: Judge | None = None) -> pd.DataFrame:
    """One row per point and random draw; see the module docstring."""
    if scores not in SCORES:
        raise SafesubError(f"scores {scores!r}: expected one of {', '.join(SCORES)}")
    if int(seeds) != seeds or seeds < 1:
        raise SafesubError(f"sweep seeds {seeds!r}: must be a whole number >= 1")
    configs = grid(subspaces, modes, fracs, alpha)  # bad settings fail before any work
    session = target if isinstance(target, FamilySession) else None
    family = session.family if session else target
    if scores != "none" and session is None:
        raise SafesubError(f"sweep scores {scores!r}: need a session (open one with safesub_core.open_session)")
    if judge is not None and judge.kind != "off":
        if scores != "generate":
            raise SafesubError(f"sweep judge {judge.kind}: judges read completions, so it needs scores 'generate'")
        judge.check()  # a judge that cannot run: one line before any point is scored
    if variants is not None and not list(variants):
        raise SafesubError("sweep variants: the list is empty (None: every variant)")
    variants = list(variants) if variants is not None else list(family.variants)
    for v in variants:
        family.check_variant(v)
    first = session.seed if session else 0
    points = [(v, key, None if key[0] == "topk" else first + i) for v in variants for key in configs
              for i in range(1 if key[0] == "topk" else int(seeds))]
    engines: dict[tuple[str, int | None], SubspaceEngine] = {}
    rows, values = [], {}
    for i, (v, key, seed) in enumerate(points):
        cfg = configs[key]
        if progress:
            progress(i, len(points), f"{v} {cfg.label}" + ("" if seed is None else f" draw {seed}"))
        if (v, seed) not in engines:
            engines[v, seed] = SubspaceEngine.build(family, v, seed=seed or 0) if session is None else \
                session.engine(v, seed=seed)
        row = engines[v, seed].diagnostics(cfg).summary()
        if session is not None and scores != "none":
            n = session.waves.count if waves is None else min(int(waves), session.waves.count)
            row = session.point_scores(v, cfg, waves=n, seed=seed)
            values[v, key, seed] = session.live_values(v, cfg, seed=seed, waves=n)
            if scores == "generate":
                row |= {f"gen_{k}": val for k, val in
                        session.generation_scores(v, cfg, seed=seed, judge=judge)[0].items()}
        rows.append({"family": family.name, "variant": v, "seed": seed} | row)
    if values:
        for row, (v, key, seed) in zip(rows, points):
            draws = [values[v, ("random",) + key[1:], s] for s in range(first, first + int(seeds))
                     if (v, ("random",) + key[1:], s) in values]
            if key[0] == "topk" and draws:
                row |= {f"{P_PREFIX}{k[2:]}": p for k, p in paired(values[v, key, seed], draws).items()}
    if progress:
        progress(len(points), len(points), "done")
    table = pd.DataFrame(rows)
    table.attrs["warnings"] = list(dict.fromkeys(w for e in engines.values() for w in e.warnings))
    return table
