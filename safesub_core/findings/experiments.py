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
   E1 is the parallel mode, E2 the orthogonal one; `power.run_power` scores both by generation with several
   random draws, Wilson intervals and paired tests (FamilyFindings.power).
2. Weight-space overlap (`weight_table`): `overlap.weight_overlap` of the study's pairs relative to A, and to S
   when the family has variants fine-tuned from S (never a pair sharing an offset), plus the second-seed pairs; the
   per-block rows give the study's per-layer panels (blocks nearest 70% and 85% depth, `panel_blocks`), the mean
   over tensors (`overlap.overlap_summary`) stays as an extra.
3. Activation overlap as the study ran it (`activation_tables`, `activation_study`): raw text, float32, the
   study's band, H1/H2 from different sources, 100 prompts a set, bootstrap intervals, a permutation null and the
   same-source noise ceiling, on the start model and the fine-tunes.

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
from safesub_core.activation_study import StudyActivationConfig, run_study, study_session
from safesub_core.errors import SafesubError
from safesub_core.family import Family, resolve_family
from safesub_core.findings.power import PowerConfig, generation_point, run_power
from safesub_core.linalg import DEFAULT_ENERGIES
from safesub_core.overlap import no_pairs_message, overlap_summary, reference_pairs, seed_pairs, weight_overlap
from safesub_core.projection import SUBSPACE_LABELS, ProjectionConfig
from safesub_core.prompts import EvalSets, arithmetic_set, load_set
from safesub_core.scoring.names import (ATTACK_SUCCESS_RATE, EXACT_MATCH, GEN_PREFIX, OVERREFUSAL_RATE,
                                        REFUSAL_RATE, gen_key)
from safesub_core.scoring.judges import Judge
from safesub_core.session import FamilySession
from safesub_core.stats import MIN_PROMPTS

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
    study_prompts: int = 100  # E4: prompts a set (all there are where fewer)
    study_chat: bool = False  # E4: the study put raw text to the models; True: the chat template
    n_boot: int = 200  # E4: bootstrap replicates
    n_perm: int = 200  # E4: permutation draws of the null
    n_seeds: int = 3  # E1/E2: draws of Random and Random-K
    power_modes: Sequence[str] | None = None  # E1/E2 modes scored with power (None: gen_modes, else every mode)
    power_matches: Sequence[str] = ("rank", "energy")  # Top-K vs controls at the same rank fraction / energy kept
    live_waves: int | None = None  # waves the live read-outs (extras) cover at each point (None: all, every prompt)
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
    weight: pd.DataFrame  # overlap_summary of weight_overlap (A, and S when the family has S-started variants)
    activations: pd.DataFrame  # per band layer (activation_study's layers table)
    band: pd.DataFrame  # band means, intervals, null, noise ceiling (activation_study's summary)
    band_range: tuple[int, int]  # the first and last hidden-state index of the study's band
    activation_sets: pd.DataFrame = field(default_factory=pd.DataFrame)  # role, name, source, size
    set_sizes: dict = field(default_factory=dict)  # role -> prompts in the evaluation set
    start: str = "aligned"  # the family's start model (aligned or safety_tuned)
    weight_blocks: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-block weight MSO (WeightTables.blocks)
    power_points: pd.DataFrame = field(default_factory=pd.DataFrame)  # power.POINT_COLUMNS: every draw, Wilson
    power_tests: pd.DataFrame = field(default_factory=pd.DataFrame)  # power.TEST_COLUMNS: Top-K vs the controls
    power_verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)  # F1's verdicts (power.Verdict.row)
    weight_notes: list = field(default_factory=list)  # references without a panel, and why
    findings: pd.DataFrame = field(default_factory=pd.DataFrame)
    timings: dict = field(default_factory=dict)
    behaviour_n: dict = field(default_factory=dict)  # metric -> the prompts behind it (behaviour.json's "prompts")
    behaviour_n_by_model: dict = field(default_factory=dict)  # model -> metric -> its own count, over behaviour_n


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


def behaviour_checks(behaviour: pd.DataFrame, prompts: Mapping[str, int] | None = None,
                     by_model: Mapping[str, Mapping[str, int]] | None = None) -> pd.DataFrame:
    """The demo families' promised held-out behaviour (`demo.BEHAVIOUR_CHECKS`, applied by `demo.behaviour_checks`)
    against the stored numbers, as a table: model, metric, value, lo, hi, n (the Wilson 95% interval and its
    prompts, empty without `prompts`), threshold (the bound, and its value when it is another model's), verdict
    (pass / fail / inconclusive when the interval holds the bound); `prompts` (metric -> prompt count,
    behaviour.json's "prompts"; `by_model`, its "prompts_by_model") as in `demo.behaviour_checks`."""
    numbers = behaviour.set_index("model").to_dict(orient="index") if "model" in behaviour else {}
    rows = []
    for c in demo.behaviour_checks(numbers, prompts, by_model):
        op, bound = c["op"], c["bound"]
        limit = float(numbers[bound][c["metric"]]) if isinstance(bound, str) else float(bound)
        label = f"{op} {bound} ({limit:.2f})" if isinstance(bound, str) else f"{op} {limit:.2f}"
        if "prompts_apart" in c:
            label += f", {c['prompts_apart']:+d} of {c['n']} prompts (at most {MIN_PROMPTS} is no difference)"
        rows.append(dict(model=c["model"], metric=c["metric"], value=float(c["value"]), lo=c.get("lo"),
                         hi=c.get("hi"), n=c.get("n"), threshold=label, verdict=c["verdict"]))
    return pd.DataFrame(rows, columns=["model", "metric", "value", "lo", "hi", "n", "threshold", "verdict"])


# ------------------------------------------------------------------------------------------------ experiment 1


def _gen(summary: dict) -> dict:
    return {GEN_PREFIX + k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


def table_checkpoints(family: Family, variants: Sequence[str]) -> list[str]:
    """The checkpoints the study's tables show: base, the aligned and safety-tuned models, and `variants`."""
    return [n for n in family.checkpoints() if n in ("base", "aligned", "safety_tuned") or n in variants]


def live_waves(session: FamilySession, waves: int | None) -> int:
    """The waves the live read-outs cover: `waves` (at most the sets' count), None for all of them."""
    if waves is not None and int(waves) < 1:
        raise SafesubError(f"live waves {waves}: need at least 1")
    return session.waves.count if waves is None else min(int(waves), session.waves.count)


def reference_scores(session: FamilySession, gen_tokens: int = 24, progress: Progress | None = None,
                     judge: Judge | None = None, waves: int | None = None,
                     names: Sequence[str] | None = None) -> pd.DataFrame:
    """Live (on the first `waves` waves, default all) and generation scores of the checkpoints `names` (default
    every checkpoint of the family), one row per checkpoint; the generation's rates only (the margin and NLL are the
    live read-outs')."""
    names = list(session.family.checkpoints()) if names is None else list(names)
    rows = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), f"scores of {name}")
        live = session.checkpoint_scores(name, waves=live_waves(session, waves))
        gen, _ = session.generation_scores(name, max_new_tokens=gen_tokens, judge=judge, forward_scores=False)
        rows.append(dict(checkpoint=name) | live | _gen(gen))
    return pd.DataFrame(rows)


def rank_scores(session: FamilySession, cfg: FindingsConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Diagnostics, live and generation scores at every (variant, subspace, mode, rho), one row per point; the
    generation scores (`power.generation_point`) in the modes the variant's findings read (`power.MODES`, within
    cfg.gen_modes) and on the sets they read (`power.READS`); the others' columns are empty or have n 0.

    Variants run one after another and each one's engine is dropped when done (bounded memory).
    """
    variants = [v for v in cfg.variants if v in session.family.variants]
    # the modes (power.MODES within cfg.gen_modes) and sets (power.READS) a variant's points are generated in
    reads = replace(power_config(cfg), modes=tuple(cfg.gen_modes or cfg.modes))
    points = [(v, s, m, r) for v in variants for s in cfg.subspaces for m in cfg.modes for r in cfg.rhos]
    rows = []
    for i, (v, sub, mode, rho) in enumerate(points):
        if progress:
            progress(i, len(points), f"{v} {sub} {mode} rho={rho:g}")
        pc = ProjectionConfig(sub, mode, float(rho))
        live = session.point_scores(v, pc, waves=live_waves(session, cfg.live_waves))
        gen = {}
        if mode in reads.modes_of(v):
            gen, _ = generation_point(session, v, pc, None, reads)
        rows.append(dict(variant=v) | live | _gen(gen))
        if i + 1 == len(points) or points[i + 1][0] != v:
            # FamilySession has no public way to drop an engine; a 135M model's engine holds ~2-3 GB
            session.drop_engine(v)
    if progress:
        progress(len(points), len(points), "points done")
    return pd.DataFrame(rows)


def power_config(cfg: FindingsConfig) -> PowerConfig:
    """The E1/E2-with-power settings of a findings run."""
    modes = cfg.power_modes or cfg.gen_modes or cfg.modes
    return PowerConfig(rhos=tuple(cfg.rhos), n_seeds=cfg.n_seeds, subspaces=tuple(cfg.subspaces), modes=tuple(modes),
                       gen_tokens=cfg.gen_tokens, judge=cfg.judge, matches=tuple(cfg.power_matches))


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


PANEL_DEPTHS = (0.7, 0.85)  # the study's per-layer weight-space panels sit at about these depths


@dataclass
class WeightTables:
    """Experiment 2's tables: `summary` (overlap_summary: mean MSO per reference, scope, pair and energy), `blocks`
    (the per-block rows, scopes block-write and block-read, unit = block index: the study's per-layer curves) and
    `notes` (a reference no variant was fine-tuned from: why it has no panel)."""

    summary: pd.DataFrame
    blocks: pd.DataFrame
    notes: list[str]


def weight_table(family: Family, energies: Sequence[float] = DEFAULT_ENERGIES,
                 progress: Progress | None = None) -> WeightTables:
    """weight_overlap relative to A, and to S when the family has a safety-tuned model, of the study's pairs among the
    variants fine-tuned from that reference (`overlap.reference_pairs`: never a pair sharing an offset) and the
    second-seed pairs (`overlap.seed_pairs`); a reference without variants of its own gets a note instead."""
    refs = ["aligned"] + (["safety_tuned"] if family.safety_tuned is not None else [])
    tables, notes = [], []
    for r in refs:
        pairs = reference_pairs(family, r)
        if not pairs:
            notes.append(no_pairs_message(r))
            continue
        tables.append(weight_overlap(family, r, energies, pairs + seed_pairs(family, r), progress=progress))
    if not tables:
        raise SafesubError(f"family '{family.name}': {notes[0]}")
    table = pd.concat(tables, ignore_index=True)
    blocks = table[table["scope"].isin(["block-write", "block-read"])].copy()
    blocks["unit"] = blocks["unit"].astype(int)
    return WeightTables(overlap_summary(table), blocks.reset_index(drop=True), notes)


def panel_blocks(n_layers: int, depths: Sequence[float] = PANEL_DEPTHS) -> list[int]:
    """The blocks nearest each depth (block i's output sits at depth (i + 1) / n_layers), in order, no repeats."""
    if n_layers < 1:
        raise SafesubError(f"model depth {n_layers}: needs at least one block")
    nearest = [min(range(n_layers), key=lambda i: (abs((i + 1) / n_layers - d), i)) for d in depths]
    return list(dict.fromkeys(nearest))


# ------------------------------------------------------------------------------------------------ experiment 3


@dataclass
class ActivationTables:
    """Experiment 3 as the study ran it (`activation_study`): `layers` and `summary` (the band mean) of every model,
    `sets` (role, name, source, size), `band` (hidden-state indices) and `null` (the permutation draws)."""

    layers: pd.DataFrame
    summary: pd.DataFrame
    sets: pd.DataFrame
    band: range


def study_config(cfg: "FindingsConfig") -> StudyActivationConfig:
    """The activation study's settings of a findings run."""
    return StudyActivationConfig(chat=cfg.study_chat, n_prompts=cfg.study_prompts, n_boot=cfg.n_boot,
                                 n_perm=cfg.n_perm, seed=cfg.seed)


def activation_tables(session: FamilySession, cfg: "FindingsConfig", models: Sequence[str] | None = None,
                      progress: Progress | None = None) -> ActivationTables:
    """`activation_study.run_study` on the start model and the fine-tunes, in a session of the study's format (raw
    text, float32 unless cfg says otherwise) sharing `session`'s disk cache."""
    fam = session.family
    models = list(models) if models is not None else [fam.start] + [v for v in ("useful", "harmful", "contaminated")
                                                                    if v in fam.variants]
    scfg = study_config(cfg)
    study = study_session(fam, scfg, cache=session.cache, seed=cfg.seed)
    done = []

    def step(model, role):
        done.append((model, role))
        if progress:
            progress(len(done) - 1, len(models) * 4, f"activations of {model} ({role})")

    res = run_study(study, models, scfg, progress=step)
    return ActivationTables(res.layers, res.summary, res.sets, res.band)


# ------------------------------------------------------------------------------------------------ a family


def family_session(family: Family, cfg: FindingsConfig) -> FamilySession:
    """The session a findings run scores `family` in: cfg's evaluation sets and seed, the default disk cache."""
    return FamilySession(family, sets=eval_sets(family, cfg.n_prompts, cfg.sets, cfg.set_overrides, cfg.convention),
                         seed=cfg.seed)


def run_family(spec: str, cfg: FindingsConfig | None = None, progress: Progress | None = None,
               session: FamilySession | None = None) -> FamilyFindings:
    """Experiments 1-3 on one family (cached scores), as a FamilyFindings of DataFrames (findings not checked yet:
    `criteria.check_findings`). `spec` is anything `family.resolve_family` takes."""
    cfg = cfg or FindingsConfig()
    t0 = time.time()
    family = resolve_family(spec) if session is None else session.family
    session = session or family_session(family, cfg)
    timings = {"family and models (built or loaded)": time.time() - t0}
    s = session.sets
    sets = {role: f"{getattr(s, role).name} ({len(getattr(s, role))})" for role in ("harmful", "utility", "benign",
                                                                                       "edgy")}
    behaviour = behaviour_table(family)
    stored = family.behaviour or {}
    t = time.time()
    refs = reference_scores(session, cfg.gen_tokens, progress, cfg.judge, cfg.live_waves,
                            names=table_checkpoints(family, cfg.variants))
    points = rank_scores(session, cfg, progress)
    timings["experiment 1 (scores against rank)"] = time.time() - t
    t = time.time()
    power = run_power(session, power_config(cfg), [v for v in cfg.variants if v in family.variants], progress)
    timings["experiments 1-2 with power (draws, paired tests)"] = time.time() - t
    t = time.time()
    weight = weight_table(family, cfg.energies, progress)
    timings["experiment 2 (weight overlap)"] = time.time() - t
    t = time.time()
    acts = activation_tables(session, cfg, progress=progress)
    timings["experiment 3 (activation overlap)"] = time.time() - t
    conf = session.reference.config
    return FamilyFindings(
        name=family.name, path=str(family.root or spec), config=cfg, sets=sets, n_layers=conf.num_hidden_layers,
        hidden=conf.hidden_size, behaviour=behaviour, references=refs,
        checks=behaviour_checks(behaviour, stored.get("prompts"), stored.get("prompts_by_model")),
        behaviour_n=dict(stored.get("prompts") or {}), behaviour_n_by_model=dict(stored.get("prompts_by_model") or {}),
        points=points, weight=weight.summary, weight_blocks=weight.blocks, weight_notes=weight.notes,
        activations=acts.layers, band=acts.summary, band_range=(acts.band.start, acts.band.stop - 1),
        activation_sets=acts.sets, set_sizes={role: len(getattr(s, role)) for role in sets},
        power_points=power.points, power_tests=power.tests, power_verdicts=power.verdict_table(),
        start=family.start, timings=timings,
    )
