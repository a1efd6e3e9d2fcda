"""The study's experiments 1-3 on one family, each a function returning DataFrames; `run_family` runs them all.

1. Utility and harmfulness against rank. For each fine-tuned variant (useful, harmful, contaminated) and each
   point (subspace in Top-K / Random-K / Random, mode in parallel / orthogonal, rank fraction rho in 0.01, 0.25,
   0.5, 0.75, 0.99) the live scores (`FamilySession.point_scores`: log-prob margin, answer NLL, arithmetic exact
   match, KL) and the generation scores (`FamilySession.generation_scores`: refusal rate / attack success rate
   on harmful prompts, exact match on arithmetic, over-refusal on edgy prompts; columns gen_<score>), plus the same
   scores of every checkpoint. `study_layout` arranges them as the study's Tables 4-5: utility (exact match) read
   from the 'useful' variant, harm (attack success rate, ASR = 1 - refusal rate; the study used a 1-5 judge score)
   from the 'harmful' variant, rows Base / Aligned / Fine-Tuned (constant in rho) then Top-K / Random-K / Random.
   Table 5 is the same with both read from the 'contaminated' variant.
2. Weight-space overlap: `overlap.weight_overlap` of the study's pairs (harmful-A vs useful-A, harmful-A vs
   base-A, useful-A vs base-A, and the same with S when the family has a safety-tuned model), summarised by
   `overlap.overlap_summary` (mean MSO per scope, pair and energy) beside the random baseline max(k)/d.
3. Activation overlap: last-token states of the evaluation sets on the start model and the fine-tunes; MSO per
   layer (`FamilySession.activation_overlap`) of useful (arithmetic) vs harmful and benign vs harmful prompts,
   against harmful vs harmful (two disjoint halves of the harmful set: even and odd positions), each set of the
   same size m = n // 2, uncentred and mean-centred; summarised over the study's depth band by
   `activations.band_mean` (docs/method.md, "Activations"), which says when a shallow model's band is widened.

Also the family's held-out behaviour (family.behaviour, stored by the builder) and the checks the demo families
promise (`behaviour_checks`). Every score comes from the session's disk cache, so a rerun is cheap. Experiment 4
(the study's findings) is `criteria.check_findings`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import pandas as pd

from safesub_core import demo
from safesub_core.activations import DEPTH_BAND, band_mean
from safesub_core.errors import SafesubError
from safesub_core.family import Family, resolve_family
from safesub_core.linalg import DEFAULT_ENERGIES
from safesub_core.overlap import overlap_summary, weight_overlap
from safesub_core.projection import SUBSPACE_LABELS, ProjectionConfig
from safesub_core.prompts import EvalSets, PromptSet, arithmetic_set, load_set
from safesub_core.scoring.names import (ATTACK_SUCCESS_RATE, EXACT_MATCH, GEN_PREFIX, OVERREFUSAL_RATE,
                                        REFUSAL_RATE, gen_key)
from safesub_core.scoring.judges import Judge
from safesub_core.session import FamilySession

RHOS = (0.01, 0.25, 0.5, 0.75, 0.99)
HEADLINE_ENERGY = 0.9
# findings' columns of the generation scores (beside the live ones of the same name without the prefix)
GEN_EXACT_MATCH = gen_key(EXACT_MATCH)
GEN_ASR = gen_key(ATTACK_SUCCESS_RATE)
GEN_REFUSAL_RATE = gen_key(REFUSAL_RATE)
GEN_OVERREFUSAL_RATE = gen_key(OVERREFUSAL_RATE)

Progress = Callable[[int, int, str], None]


@dataclass
class FindingsConfig:
    """What to run: prompts per evaluation set, points of experiment 1, energies, generation length."""

    n_prompts: int = 32
    rhos: Sequence[float] = RHOS
    subspaces: Sequence[str] = ("topk", "randomk", "random")
    modes: Sequence[str] = ("parallel", "orthogonal")
    gen_modes: Sequence[str] | None = None  # modes that also get generation scores (None: every mode)
    variants: Sequence[str] = ("useful", "harmful", "contaminated")  # those the family has
    gen_tokens: int = 24  # new tokens of greedy completions (refusal markers sit in the first 100 characters)
    energies: Sequence[float] = DEFAULT_ENERGIES
    headline_energy: float = HEADLINE_ENERGY
    band: tuple[float, float] = DEPTH_BAND
    sets: str = "auto"  # builtin | packaged | auto (builtin for families named tiny*, else packaged)
    set_overrides: Mapping[str, str] | None = None  # role -> set spec (the CLI's --harmful...): beats `sets`
    convention: str | None = None  # the utility set's exact-match convention (None: the set's own, else flexible)
    seed: int = 0
    judge: Judge | None = None  # a judge of the harmful completions (its mean 1-5 score beside the ASR), or None


@dataclass
class FamilyFindings:
    """Everything the report shows for one family (each table a DataFrame)."""

    name: str
    path: str
    config: FindingsConfig
    sets: dict  # role -> prompt set name and size
    n_layers: int
    hidden: int
    behaviour: pd.DataFrame  # held-out numbers stored by the builder, one row per model
    checks: pd.DataFrame  # the promised held-out behaviour, pass/fail
    references: pd.DataFrame  # scores of every checkpoint
    points: pd.DataFrame  # scores at every projected point
    weight: pd.DataFrame  # overlap_summary of weight_overlap (A, and S when present)
    activations: pd.DataFrame  # per layer
    band: pd.DataFrame  # depth-band means
    band_range: tuple[float, float]
    band_note: str
    start: str = "aligned"  # the family's start model (aligned or safety_tuned)
    findings: pd.DataFrame = field(default_factory=pd.DataFrame)
    timings: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ inputs


def eval_sets(family: Family, n: int, kind: str = "auto", overrides: Mapping[str, str] | None = None,
              convention: str | None = None) -> EvalSets:
    """The evaluation sets the session scores on (never a training split), the first `n` prompts of each.

    builtin:  builtin-harmful:eval, arithmetic (eval side), builtin-benign:eval, builtin-edgy:eval (EvalSets.default)
    packaged: harmbench:eval, arithmetic (eval side), pairs-benign:eval, overrefusal:eval
    A role the family file's `eval_sets` or `overrides` (role -> set spec, as the CLI's --harmful...) names takes
    that set instead; `convention` the utility set's exact-match convention.
    """
    if kind == "auto":
        kind = "builtin" if family.name.startswith("tiny") else "packaged"
    if kind not in ("builtin", "packaged"):
        raise SafesubError(f"evaluation sets {kind!r}: expected builtin, packaged or auto")
    base = EvalSets.default() if kind == "builtin" else EvalSets(
        harmful=load_set("harmbench:eval"), utility=arithmetic_set().split("eval"),
        benign=load_set("pairs-benign:eval"), edgy=load_set("overrefusal:eval"))
    chosen = set(family.eval_sets or {}) | {r for r, spec in (overrides or {}).items() if spec}
    mine = EvalSets.for_family(family, overrides, convention=convention)
    return replace(base, **{r: getattr(mine, r) for r in chosen}, convention=mine.convention).head(n)


def behaviour_table(family: Family) -> pd.DataFrame:
    """The held-out numbers the builder stored (family.behaviour['models']), one row per model."""
    models = (family.behaviour or {}).get("models") or {}
    if not models:
        return pd.DataFrame(columns=["model"])
    return pd.DataFrame([{"model": m} | dict(v) for m, v in models.items()])


def behaviour_checks(behaviour: pd.DataFrame) -> pd.DataFrame:
    """The demo families' promised held-out behaviour (`demo.BEHAVIOUR_CHECKS`, applied by `demo.behaviour_checks`)
    against the stored numbers, as a table: model, metric, value, threshold (the bound, and its value when it is
    another model's), passed."""
    numbers = behaviour.set_index("model").to_dict(orient="index") if "model" in behaviour else {}
    rows = []
    for c in demo.behaviour_checks(numbers):
        op, bound = c["op"], c["bound"]
        limit = float(numbers[bound][c["metric"]]) if isinstance(bound, str) else float(bound)
        label = f"{op} {bound} ({limit:.2f})" if isinstance(bound, str) else f"{op} {limit:.2f}"
        rows.append(dict(model=c["model"], metric=c["metric"], value=float(c["value"]), threshold=label,
                         passed=bool(c["passed"])))
    return pd.DataFrame(rows, columns=["model", "metric", "value", "threshold", "passed"])


# ------------------------------------------------------------------------------------------------ experiment 1


def _gen(summary: dict) -> dict:
    return {GEN_PREFIX + k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


def reference_scores(session: FamilySession, gen_tokens: int = 24, progress: Progress | None = None,
                     judge: Judge | None = None) -> pd.DataFrame:
    """Live and generation scores of every checkpoint of the family, one row per checkpoint."""
    names = list(session.family.checkpoints())
    rows = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), f"scores of {name}")
        live = session.checkpoint_scores(name, waves=session.waves.count)  # every prompt of the sets
        gen, _ = session.generation_scores(name, max_new_tokens=gen_tokens, judge=judge)
        rows.append(dict(checkpoint=name) | live | _gen(gen))
    return pd.DataFrame(rows)


def rank_scores(session: FamilySession, cfg: FindingsConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Diagnostics, live and generation scores at every (variant, subspace, mode, rho), one row per point.

    Variants run one after another and each one's engine is dropped when done (bounded memory).
    """
    variants = [v for v in cfg.variants if v in session.family.variants]
    points = [(v, s, m, r) for v in variants for s in cfg.subspaces for m in cfg.modes for r in cfg.rhos]
    rows = []
    for i, (v, sub, mode, rho) in enumerate(points):
        if progress:
            progress(i, len(points), f"{v} {sub} {mode} rho={rho:g}")
        pc = ProjectionConfig(sub, mode, float(rho))
        live = session.point_scores(v, pc, waves=session.waves.count)
        gen = {}
        if cfg.gen_modes is None or mode in cfg.gen_modes:
            gen, _ = session.generation_scores(v, pc, max_new_tokens=cfg.gen_tokens, judge=cfg.judge)
        rows.append(dict(variant=v) | live | _gen(gen))
        if i + 1 == len(points) or points[i + 1][0] != v:
            # FamilySession has no public way to drop an engine; a 135M model's engine holds ~2-3 GB
            session.drop_engine(v)
    if progress:
        progress(len(points), len(points), "points done")
    return pd.DataFrame(rows)


def study_layout(points: pd.DataFrame, references: pd.DataFrame, mode: str = "parallel",
                 util_variant: str = "useful", harm_variant: str = "harmful",
                 util_metric: str = GEN_EXACT_MATCH, harm_metric: str = GEN_ASR,
                 start: str = "aligned") -> pd.DataFrame:
    """The study's Tables 4-5 layout: rows Base, Aligned, Fine-Tuned, Top-K, Random-K, Random; columns
    util_<rho> (from `util_variant`) and harm_<rho> (from `harm_variant`). Reference rows are constant in rho."""
    rhos = sorted(points["rank_fraction"].unique())
    ref = references.set_index("checkpoint")
    start_label = "Safety-Tuned" if start == "safety_tuned" else "Aligned"
    rows = []
    for label, util_name, harm_name in (("Base", "base", "base"), (start_label, start, start),
                                        ("Fine-Tuned", util_variant, harm_variant)):
        row = {"method": label}
        for r in rhos:
            row[f"util_{r:g}"] = float(ref.loc[util_name, util_metric])
        for r in rhos:
            row[f"harm_{r:g}"] = float(ref.loc[harm_name, harm_metric])
        rows.append(row)
    for sub, label in SUBSPACE_LABELS.items():
        sel = points[(points["subspace"] == sub) & (points["mode"] == mode)]
        if sel.empty:
            continue
        row = {"method": label}
        for part, variant, metric in (("util", util_variant, util_metric), ("harm", harm_variant, harm_metric)):
            s = sel[sel["variant"] == variant].set_index("rank_fraction")[metric]
            for r in rhos:
                row[f"{part}_{r:g}"] = float(s.get(r, float("nan")))
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ experiment 2


def weight_table(family: Family, energies: Sequence[float] = DEFAULT_ENERGIES,
                 progress: Progress | None = None) -> pd.DataFrame:
    """overlap_summary of weight_overlap relative to A, and to S when the family has a safety-tuned model."""
    refs = ["aligned"] + (["safety_tuned"] if family.safety_tuned is not None else [])
    frames = [overlap_summary(weight_overlap(family, r, energies, progress=progress)) for r in refs]
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------ experiment 3


def activation_sets(sets: EvalSets) -> dict[str, PromptSet]:
    """The prompt sets compared: harmful halves A (even positions) and B (odd), useful and benign of the same size."""
    h = sets.harmful
    m = len(h) // 2
    if m < 2:
        raise SafesubError(f"prompt set '{h.name}': needs at least 4 prompts to split into two halves")

    def half(name: str, prompts: Sequence[str]) -> PromptSet:
        return PromptSet(f"{h.name} {name}", tuple(prompts), None, "harmful", h.source)

    return dict(harmful_a=half("half A", h.prompts[0:2 * m:2]), harmful_b=half("half B", h.prompts[1:2 * m:2]),
                useful=sets.utility.head(m), benign=sets.benign.head(m))


ACTIVATION_PAIRS = (("useful vs harmful", "useful"), ("benign vs harmful", "benign"),
                    ("harmful vs harmful", "harmful_b"))


def activation_tables(session: FamilySession, energies: Sequence[float] = DEFAULT_ENERGIES,
                      band: tuple[float, float] = DEPTH_BAND, models: Sequence[str] | None = None,
                      progress: Progress | None = None):
    """(per-layer table, depth-band means, (lo, hi), note) of activation MSO on the start model and fine-tunes.

    Each pair compares a set with harmful half A (same size); columns model, pair, center, layer, depth, energy,
    k_x, k_y, mso, random_baseline. The band and its note are `activations.band_mean`'s.
    """
    fam = session.family
    models = list(models) if models is not None else [fam.start] + [v for v in ("useful", "harmful", "contaminated")
                                                                    if v in fam.variants]
    sets = activation_sets(session.sets)
    frames = []
    jobs = [(m, c) for m in models for c in (False, True)]
    for i, (model, center) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), f"activations of {model}")
        for label, key in ACTIVATION_PAIRS:
            df = session.activation_overlap(model, sets[key], model, sets["harmful_a"], energies, center=center)
            df.insert(0, "center", "centred" if center else "uncentred")
            df.insert(0, "pair", label)
            df.insert(0, "model", model)
            frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    means = band_mean(table, band)
    return table, means.table, (means.lo, means.hi), means.note


# ------------------------------------------------------------------------------------------------ a family


def run_family(spec: str, cfg: FindingsConfig | None = None, progress: Progress | None = None,
               session: FamilySession | None = None) -> FamilyFindings:
    """Experiments 1-3 on one family (cached scores), as a FamilyFindings of DataFrames (findings not checked yet:
    `criteria.check_findings`). `spec` is anything `family.resolve_family` takes."""
    cfg = cfg or FindingsConfig()
    t0 = time.time()
    family = resolve_family(spec) if session is None else session.family
    if session is None:
        session = FamilySession(family, sets=eval_sets(family, cfg.n_prompts, cfg.sets, cfg.set_overrides,
                                                       cfg.convention), seed=cfg.seed)
    timings = {"family and models (built or loaded)": time.time() - t0}
    s = session.sets
    sets = {role: f"{getattr(s, role).name} ({len(getattr(s, role))})" for role in ("harmful", "utility", "benign",
                                                                                       "edgy")}
    behaviour = behaviour_table(family)
    t = time.time()
    refs = reference_scores(session, cfg.gen_tokens, progress, cfg.judge)
    points = rank_scores(session, cfg, progress)
    timings["experiment 1 (scores against rank)"] = time.time() - t
    t = time.time()
    weight = weight_table(family, cfg.energies, progress)
    timings["experiment 2 (weight overlap)"] = time.time() - t
    t = time.time()
    acts, band, band_range, note = activation_tables(session, cfg.energies, cfg.band, progress=progress)
    timings["experiment 3 (activation overlap)"] = time.time() - t
    conf = session.reference.config
    return FamilyFindings(
        name=family.name, path=str(family.root or spec), config=cfg, sets=sets, n_layers=conf.num_hidden_layers,
        hidden=conf.hidden_size, behaviour=behaviour, checks=behaviour_checks(behaviour), references=refs,
        points=points, weight=weight, activations=acts, band=band, band_range=band_range, band_note=note,
        start=family.start, timings=timings,
    )
