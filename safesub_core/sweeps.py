"""A sweep: diagnostics (and scores) at every point of a grid of subspaces x modes x rank fractions.

Contract: `sweep(family_or_session, variants=None, subspaces=..., modes=..., fracs=..., alpha=1.0,
scores="live", progress=None) -> DataFrame` returns one row per (variant, subspace, mode, rank fraction): the
family and variant names, the point's `ProjectionDiagnostics.summary()` (energy kept, cosines, mean rank
fraction...) and, by `scores` (the engines' warnings, e.g. a tensor whose alignment update is zero, are in
`table.attrs["warnings"]`, one line each):
- "none": diagnostics only; a `Family` is enough and no model is loaded (one SVD per tensor, cached);
- "live": plus the live read-outs of `FamilySession.point_scores` (margin, NLL, arithmetic exact match, KL);
- "generate": plus the generation scores (`FamilySession.generation_scores`), prefixed `gen_`.
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
from safesub_core.session import FamilySession
from safesub_core.subspace import SubspaceEngine

SCORES = ("none", "live", "generate")
DEFAULT_MODES = ("parallel", "orthogonal")
DEFAULT_FRACS = (0.01, 0.25, 0.5, 0.75, 0.99)  # the study's rank fractions


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
          progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """One row per point; see the module docstring."""
    if scores not in SCORES:
        raise SafesubError(f"scores {scores!r}: expected one of {', '.join(SCORES)}")
    configs = grid(subspaces, modes, fracs, alpha)  # bad settings fail before any work
    session = target if isinstance(target, FamilySession) else None
    family = session.family if session else target
    if scores != "none" and session is None:
        raise SafesubError(f"sweep scores {scores!r}: need a session (open one with safesub_core.open_session)")
    if variants is not None and not list(variants):
        raise SafesubError("sweep variants: the list is empty (None: every variant)")
    variants = list(variants) if variants is not None else list(family.variants)
    for v in variants:
        family.check_variant(v)
    points = [(v, key) for v in variants for key in configs]
    engines: dict[str, SubspaceEngine] = {}
    rows = []
    for i, (v, key) in enumerate(points):
        if progress:
            progress(i, len(points), f"{v} {configs[key].label}")
        cfg = configs[key]
        if v not in engines:
            engines[v] = SubspaceEngine.build(family, v) if session is None else session.engine(v)
        if session is None:
            row = engines[v].diagnostics(cfg).summary()
        else:
            row = session.point_scores(v, cfg) if scores != "none" else session.diagnostics(v, cfg).summary()
            if scores == "generate":
                row |= {f"gen_{k}": val for k, val in session.generation_scores(v, cfg)[0].items()}
        rows.append({"family": family.name, "variant": v} | row)
    if progress:
        progress(len(points), len(points), "done")
    table = pd.DataFrame(rows)
    table.attrs["warnings"] = list(dict.fromkeys(w for e in engines.values() for w in e.warnings))
    return table
