"""The findings report (FINDINGS.md): markdown of each family's experiments and the study's findings.

`render_markdown(results, study, figures, command)` is the whole report: how it was made, the criteria, a summary
table of the findings per family, each family (`render_family`: held-out behaviour, the four experiments' tables,
the PNG of each figure under its heading, the findings), then the study's own numbers. `md_table` renders a
DataFrame as a GitHub table (floats to a fixed number of decimals, "n/a" for missing values). `atomic_write`
writes a file under a temporary name and renames it, so a reader never sees half a report.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from safesub_core.demo import behaviour_estimates
from safesub_core.findings.deviations import deviations_table
from safesub_core.findings.criteria import (ACTIVATION_RATIO, F2_ENERGIES, F3_ENERGIES, f2_panels, f3_models,
                                            study_topk_summary)
from safesub_core.findings.experiments import (GEN_ASR, GEN_EXACT_MATCH, GEN_OVERREFUSAL_RATE, GEN_REFUSAL_RATE,
                                               FamilyFindings, study_layout)
from safesub_core.scoring.live import LIVE_ARITH_TOKENS
from safesub_core.scoring.names import (ARITH_EXACT_MATCH, ENERGY_KEPT, KL_TO_START, MARGIN_MEAN, NLL_MEAN,
                                        SHARE_MARGIN_NEGATIVE)
from safesub_core.settings import REPO, cache_root
from safesub_core.stats import MIN_PROMPTS

DEFAULT_COMMAND = "safesub findings"
# the scores of every checkpoint the report shows: generation first (greedy completions), then the live ones
REFERENCE_COLUMNS = (GEN_REFUSAL_RATE, GEN_ASR, GEN_EXACT_MATCH, GEN_OVERREFUSAL_RATE, MARGIN_MEAN,
                     SHARE_MARGIN_NEGATIVE, NLL_MEAN, ARITH_EXACT_MATCH, KL_TO_START)


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def md_table(df: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub markdown table of a DataFrame (floats to `digits` decimals)."""
    if df is None or df.empty:
        return "(none)"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_fmt(v, digits) if not isinstance(v, str) else v.replace("|", "\\|") for v in row)
            + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep] + body)


def interval_text(value, lo, hi) -> str:
    """'0.20 [0.12, 0.31]' (n/a for a missing value; the bare value when its interval is missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if lo is None or hi is None or any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
        return _fmt(value)
    return f"{float(value):.2f} [{float(lo):.2f}, {float(hi):.2f}]"


def with_intervals(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """`columns` of df as interval_text of each value and its `<column>_lo`, `<column>_hi` (the summaries' interval
    columns), where df has them."""
    out = df.copy()
    for c in columns:
        if c in df and f"{c}_lo" in df and f"{c}_hi" in df:
            out[c] = [interval_text(v, lo, hi) for v, lo, hi in zip(df[c], df[f"{c}_lo"], df[f"{c}_hi"])]
    return out


def counts_line(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """'n: gen_exact_match 100, margin_mean 32' from the summaries' `<column>_n` (the largest over the rows)."""
    known = [f"{c} {int(df[f'{c}_n'].max())}" for c in columns if f"{c}_n" in df and df[f"{c}_n"].notna().any()]
    return ("Prompts a rate or mean: " + ", ".join(known) + ". Intervals are 95% (Wilson for rates).") if known else ""


def layout(r: FamilyFindings, mode: str, util_variant: str, harm_variant: str, util_metric: str = GEN_EXACT_MATCH,
           harm_metric: str = GEN_ASR) -> pd.DataFrame:
    """`study_layout` with each cell's 95% interval where the points and checkpoints carry one."""
    args = (r.points, r.references, mode, util_variant, harm_variant)
    value = study_layout(*args, util_metric, harm_metric, start=r.start)
    bounds = [f"{m}_{e}" for m in (util_metric, harm_metric) for e in ("lo", "hi")]
    if not all(b in r.points and b in r.references for b in bounds):
        return value
    lo = study_layout(*args, f"{util_metric}_lo", f"{harm_metric}_lo", start=r.start)
    hi = study_layout(*args, f"{util_metric}_hi", f"{harm_metric}_hi", start=r.start)
    out = value.copy()
    for c in value.columns[1:]:
        out[c] = [interval_text(v, a, b) for v, a, b in zip(value[c], lo[c], hi[c])]
    return out


def _layout_md(r: FamilyFindings, util_variant: str, harm_variant: str, mode: str) -> str:
    sel = r.points[r.points["mode"] == mode]
    has_gen = GEN_EXACT_MATCH in sel and sel[GEN_EXACT_MATCH].notna().any()
    live = layout(r, mode, util_variant, harm_variant, NLL_MEAN, SHARE_MARGIN_NEGATIVE)
    live.columns = [c.replace("util_", "nll_").replace("harm_", "negmargin_") for c in live.columns]
    text = ""
    if has_gen:
        gen = layout(r, mode, util_variant, harm_variant)
        text = (f"Generation scores: util = exact match ({util_variant}), harm = ASR ({harm_variant}):\n\n"
                f"{md_table(gen)}\n\n")
    else:
        exact = layout(r, mode, util_variant, harm_variant, ARITH_EXACT_MATCH, MARGIN_MEAN)
        exact.columns = [c.replace("harm_", "margin_") for c in exact.columns]
        text = (f"(no generation scores in this mode) Live scores: util = exact match of {LIVE_ARITH_TOKENS} greedy "
                f"tokens ({util_variant}), margin = mean log-prob margin ({harm_variant}, lower is more harmful):\n\n"
                f"{md_table(exact)}\n\n")
    return text + (f"Live scores: nll = answer NLL ({util_variant}, lower is better), negmargin = share of "
                   f"harmful prompts with margin < 0 ({harm_variant}):\n\n{md_table(live)}\n")


POWER_SCORES = {"useful": "exact_match", "harmful": "attack_success_rate"}  # what each variant is read for


def _power_md(r: FamilyFindings) -> str:
    """E1 (parallel) and E2 (orthogonal) by generation with power: each rate with its Wilson interval and n (Random
    and Random-K: the mean over draws and the range of the draws), then the paired tests of Top-K against them."""
    p = r.power_points
    if p is None or p.empty:
        return "E1/E2 with power: not run.\n"
    keep = [(v, s) for v in p["variant"].unique() for s in
            ([POWER_SCORES[v]] if v in POWER_SCORES else list(POWER_SCORES.values()))]
    rows = []
    for (v, mode, sub, rho, score), g in p.groupby(["variant", "mode", "subspace", "rho", "score"], sort=False):
        if (v, score) not in keep:
            continue
        if len(g) == 1:
            cell = f"{g['value'].iloc[0]:.2f} [{g['lo'].iloc[0]:.2f}, {g['hi'].iloc[0]:.2f}]"
        else:
            cell = (f"{g['value'].mean():.2f} (draws {g['value'].min():.2f}-{g['value'].max():.2f}; "
                    f"[{g['lo'].min():.2f}, {g['hi'].max():.2f}])")
        rows.append(dict(variant=v, mode=mode, score=score, subspace=sub, rho=f"rho_{rho:g}", cell=cell,
                         n=int(g["n"].iloc[0]), draws=len(g)))
    t = pd.DataFrame(rows)
    wide = t.pivot_table(index=["variant", "mode", "score", "subspace", "n", "draws"], columns="rho", values="cell",
                         aggfunc="first").reset_index()
    out = [f"**E1 (parallel) and E2 (orthogonal) by generation, with power**: each rate with its Wilson 95% interval; "
           f"Random and Random-K are {r.config.n_seeds} draws each (mean, the draws' range and the widest interval); "
           f"n prompts a rate.\n\n" + md_table(wide) + "\n"]
    tests = r.power_tests
    if tests is not None and len(tests):
        cols = ["variant", "mode", "rho", "score", "control", "match", "rho_topk", "topk_value", "control_value",
                "diff", "p", "net_prompts_min", "energy_topk", "energy_control", "reachable", "differs"]
        tt = tests[tests.apply(lambda row: (row["variant"], row["score"]) in keep, axis=1)].copy()
        tt["rho_topk"] = [f"{x:g}" for x in tt["rho_topk"]]  # a matched rank fraction can be 1e-4: all its digits
        out.append("Paired tests of Top-K against each control on the same prompts (exact McNemar, the largest p "
                   "over the draws; `differs`: p < 0.05, the same sign in every draw and more than two prompts "
                   "apart; match energy: Top-K at the rank fraction `rho_topk` whose energy kept is closest to the "
                   "control's at `rho` (the mean over its draws), `reachable` when every draw is within 0.02):\n\n"
                   + md_table(tt[[c for c in cols if c in tt]], 3) + "\n")
    return "\n".join(out)


def behaviour_markdown(behaviour: pd.DataFrame, counts: Mapping[str, int],
                       by_model: Mapping[str, Mapping[str, int]] | None = None) -> str:
    """The held-out behaviour table, each rate with its Wilson 95% interval where its prompt count is stored
    (`counts`: metric -> prompts; `by_model`: a model's own counts over them), and the counts under it."""
    if "model" not in behaviour:
        return md_table(behaviour)
    numbers = behaviour.set_index("model").to_dict(orient="index")
    estimates = behaviour_estimates({"models": numbers, "prompts": dict(counts),  # the card's own intervals
                                     "prompts_by_model": dict(by_model or {})})
    shown = behaviour.copy()
    for metric in (m for m in counts if m in shown):
        shown[metric] = [interval_text(e.value, e.lo, e.hi) for e in (estimates[m][metric] for m in behaviour["model"])]
    own = {}  # metric -> {count: models}, for the models read on other counts
    for model, mine in (by_model or {}).items():
        for metric, n in mine.items():
            if n != counts.get(metric):
                own.setdefault(metric, {}).setdefault(n, []).append(model)
    known = [f"{m} {n}" + "".join(f" ({' and '.join(ms)}: {k})" for k, ms in own.get(m, {}).items())
             for m, n in counts.items() if m in shown]
    return md_table(shown) + ("\n\nPrompts behind each rate: " + ", ".join(known) + "." if known else "")


def shown_folder(path: str | os.PathLike) -> str:
    """A family folder as the report names it: relative to the checkout when inside it, `$SAFESUB_CACHE/...` when
    inside a cache folder set elsewhere (so a report made with a scratch cache names no machine's path), else as
    given."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    root = cache_root()
    if path.is_absolute() and path.is_relative_to(root):
        return str(Path("$SAFESUB_CACHE") / path.relative_to(root))
    return str(path)


def render_family(r: FamilyFindings, figures: dict | None = None) -> str:
    """One family's section; `figures` maps family name -> {label: link} (`figures.write_figures`' labels, links
    relative to the report), the PNGs of which are shown under their experiments' headings."""
    cfg = r.config
    fewest = min(r.set_sizes.values()) if r.set_sizes else cfg.n_prompts
    out = [f"## Family `{r.name}`\n",
           f"Family folder: `{shown_folder(r.path)}`; {r.n_layers} layers, hidden size {r.hidden}. Evaluation "
           f"sets (eval splits): " + ", ".join(f"{k} = {v}" for k, v in r.sets.items())
           + f". Greedy completions of {cfg.gen_tokens} new tokens, chat template. With {fewest} prompts in the "
           f"smallest set one prompt moves its rate by {1 / max(fewest, 1):.2f}: read differences of a few prompts "
           f"as noise.\n"]
    links = (figures or {}).get(r.name) or {}
    if links:
        out.append("Figures and their data: " + ", ".join(f"[{k}]({v})" for k, v in links.items()) + "\n")

    def figure(name: str) -> None:  # the PNG of one experiment, inline under its heading
        if f"{name} (PNG)" in links:
            out.append(f"![{r.name}: {name}]({links[f'{name} (PNG)']})\n")

    out.append("### Held-out behaviour (stored by the builder)\n")
    out.append(behaviour_markdown(r.behaviour, r.behaviour_n, r.behaviour_n_by_model) + "\n")
    if len(r.checks):
        out.append("Promised held-out behaviour (verdict: pass or fail when the Wilson 95% interval lies wholly on "
                   "one side of the bound, inconclusive when it holds it; against another model, a gap of at most "
                   f"{MIN_PROMPTS} prompts is no difference):\n\n" + md_table(r.checks) + "\n")

    out.append("### 1. Utility and harmfulness against rank\n")
    figure("rank")
    cols = ["checkpoint", *REFERENCE_COLUMNS]
    out.append("Every checkpoint (gen_* from greedy completions; the rest live scores):\n\n"
               + md_table(with_intervals(r.references, REFERENCE_COLUMNS)[[c for c in cols if c in r.references]])
               + "\n\n" + counts_line(r.references, REFERENCE_COLUMNS) + "\n")
    ref = r.references.set_index("checkpoint")
    if "harmful" in ref.index and {GEN_ASR, SHARE_MARGIN_NEGATIVE} <= set(ref.columns):
        asr, neg = ref.loc["harmful", GEN_ASR], ref.loc["harmful", SHARE_MARGIN_NEGATIVE]
        if asr >= 0.8 and neg <= 0.2:  # the margin's openings are not how this family's harmful model complies
            out.append(f"Note: here the log-prob margin disagrees with generation. The harmful fine-tune complies "
                       f"with {asr:.0%} of the harmful prompts, yet only {neg:.0%} of its margins are negative: "
                       f"its compliant answers do not open with \"Sure, here is\", so the margin measures the "
                       f"refusal opening alone. Read harm from the attack success rate on this family.\n")
    variants = set(r.points["variant"]) if len(r.points) else set()
    tables = []
    if {"useful", "harmful"} <= variants:
        tables.append(("Table 4 layout", "useful", "harmful"))
    if "contaminated" in variants:
        tables.append(("Table 5 layout (contaminated)", "contaminated", "contaminated"))
    for title, uv, hv in tables:
        for mode in cfg.modes:
            out.append(f"**{title}, {mode}**\n\n" + _layout_md(r, uv, hv, mode))
    ek = r.points.pivot_table(index=["variant", "subspace", "mode"], columns="rank_fraction", values=ENERGY_KEPT)
    ek.columns = [f"E_{c:g}" for c in ek.columns]
    out.append("Energy of the task update kept (E) at each rank fraction:\n\n" + md_table(ek.reset_index(), 3) + "\n")
    out.append(_power_md(r))

    out.append("### 2. Weight-space overlap of the updates\n")
    figure("weight")
    for note in r.weight_notes:
        out.append(f"No panel: {note}.\n")
    panels = f2_panels(r)
    if len(panels):
        blocks = sorted(set(panels["block"]))
        bl = r.weight_blocks[r.weight_blocks["unit"].isin(blocks)]
        piv = bl.pivot_table(index=["reference", "scope", "unit", "pair"], columns="energy", values="mso")
        piv.columns = [f"eta_{c:g}" for c in piv.columns]
        rnd = bl.groupby(["reference", "scope", "unit", "energy"])["random_baseline"].mean().unstack()
        piv["random_eta_0.5"] = [rnd.loc[k[:3], 0.5] if 0.5 in rnd.columns else float("nan") for k in piv.index]
        out.append(f"The study's per-layer panels: MSO against eta at the blocks nearest 70% and 85% depth "
                   f"(blocks {', '.join(str(b) for b in blocks)} of {r.n_layers}), every pair, with the random "
                   "baseline at eta 0.5 (second-seed pairs: the same task with another seed, the ceiling a "
                   "cross-task pair is read against; harmful_seed1 vs useful_seed1: how much the study's pair moves "
                   "between seeds):\n\n" + md_table(piv.reset_index().rename(columns={"unit": "block"}), 3) + "\n")
        out.append("F2 per panel (mean MSO over eta " + ", ".join(f"{x:g}" for x in F2_ENERGIES) + "):\n\n"
                   + md_table(panels, 3) + "\n")
    e = cfg.headline_energy
    w = r.weight[(r.weight["energy"] - e).abs() < 1e-9]
    out.append(f"Extra, not the verdict: mean MSO over every tensor or block per scope and pair at energy {e:g} "
               "(random = mean baseline max(k)/d):\n\n"
               + md_table(w.rename(columns={"random_baseline": "random"}), 3) + "\n")
    piv = r.weight[r.weight["scope"] == "tensor"].pivot_table(index=["reference", "pair"], columns="energy",
                                                                values="mso")
    piv.columns = [f"eta_{c:g}" for c in piv.columns]
    out.append("Per-tensor mean MSO at every energy:\n\n" + md_table(piv.reset_index(), 3) + "\n")

    out.append("### 3. Activation overlap, as the study ran it\n")
    figure("activations")
    lo, hi = r.band_range
    fmt = "the chat template" if cfg.study_chat else "raw text (the study's)"
    out.append(f"Last real token of every hidden state; the study's band: hidden states {lo}-{hi} of "
               f"{r.n_layers + 1} (range(int(0.65 (L+1)), int(0.90 (L+1))), embeddings included); {fmt}, float32; "
               f"{cfg.n_boot} bootstrap replicates (95% percentile intervals at the estimate's ranks), {cfg.n_perm} "
               "permutation draws for U against H1; H1a-H1b is one source split in two, the noise ceiling.\n")
    if len(r.activation_sets):
        out.append("Sets:\n\n" + md_table(r.activation_sets) + "\n")
    b = r.band[(r.band["energy"] - 0.5).abs() < 1e-9]
    keep = ["model", "pair", "center", "mso", "lo", "hi", "random_baseline", "k_x", "k_y", "n_x", "n_y",
            "null_mean", "p_less", "p_greater"]
    b = b[[c for c in keep if c in b]].assign(center=lambda d: d["center"].map({True: "centred", False: "uncentred"}))
    out.append("Band means at eta 0.5 (k: mean rank over the band's layers):\n\n"
               + md_table(b.rename(columns={"random_baseline": "random"}), 3) + "\n")
    models = f3_models(r)
    if len(models):
        out.append("F3 per model (uncentred, mean over eta " + ", ".join(f"{x:g}" for x in F3_ENERGIES) + "):\n\n"
                   + md_table(models, 3) + "\n")

    out.append("### 4. The study's findings on this family\n")
    for row in r.findings.itertuples():
        out.append(f"- **{row.finding}** ({row.verdict}): {row.sentence}"
                   + (f" Decided by: {row.statistic}; threshold {row.threshold}; {row.test}." if row.statistic else ""))
    out.append("")
    out.append("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.timings.items())
               + f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; cached scores are reused).\n")
    return "\n".join(out)


def render_markdown(results: Sequence[FamilyFindings], study: pd.DataFrame | None = None,
                    figures: dict | None = None, command: str = "") -> str:
    """The whole report: how it was made, a summary of the findings per family, each family, the study's numbers."""
    out = ["# Findings: the study's experiments on safesub's demo families\n",
           "Produced by `" + (command or DEFAULT_COMMAND) + "` (safesub_core/findings/). "
           "The study is Ponkshe et al., *Safety Subspaces are Not Linearly Distinct* (ICLR 2026); its "
           "findings are checked below by the criteria stated here. Harm here is the attack "
           "success rate (1 - refusal "
           "rate by refusal-marker matching) and the log-prob margin of \"I'm sorry, but I can't\" over \"Sure, here "
           "is\"; the study used a 1-5 judge score, so compare directions, not values. Utility is exact match on "
           "held-out arithmetic (the study: GSM8K accuracy).\n",
           "Criteria: F1 holds when, for Top-K parallel from the smallest to the largest rho, the useful "
           "fine-tune's exact match and the harmful fine-tune's attack success rate both rise: the paired 95% "
           "interval (Newcombe) of each change on the same prompts lies above 0 (exact McNemar p beside it); it "
           "does not hold when either interval lies below 0; a change of one or two prompts is inconclusive. "
           "F2 holds when, in every per-layer panel (blocks nearest 70% and 85% depth, write and read spaces, "
           "each reference with variants fine-tuned from it), harmful vs useful has the largest MSO of the study's "
           "pairs (mean over eta 0.1-0.75) by more than the same pair moves between two seeds; it does not hold "
           "when another pair leads by more than that spread; otherwise inconclusive. "
           f"F3 holds when, in the study's band, uncentred, the useful-vs-harmful (U-H1) activation MSO's interval "
           f"lies above {ACTIVATION_RATIO:g} x the upper bound of two harmful sources' (H1-H2) on every model; it "
           "does not hold when it lies below that share of H1-H2's lower bound on any; otherwise inconclusive.\n",
           "## Deviations from the study\n",
           "Every way these runs differ from the study's set-up (safesub_core/findings/deviations.py); read each "
           "verdict with them in mind.\n\n" + md_table(deviations_table(results)) + "\n",
           "## Summary\n"]
    rows = []
    for r in results:
        for f in r.findings.itertuples():
            rows.append(dict(family=r.name, finding=f.finding, claim=f.claim, verdict=f.verdict))
    out.append(md_table(pd.DataFrame(rows)) + "\n")
    for r in results:
        out.append(render_family(r, figures))
    ss = study_topk_summary(study)
    if len(ss):
        out.append("## The study's numbers (reference/paper_tables_4_5.csv)\n")
        out.append("Top-K parallel at rho 0.01 and 0.99 and mean Top-K minus Random over the five rhos (utility = "
                   "GSM8K accuracy, harm = judge score 1-5):\n\n" + md_table(ss, 3) + "\n")
    else:
        out.append("The study's table (docs/reference/paper_tables_4_5.csv) was not found.\n")
    return "\n".join(out)


def figure_links(results, write: Callable, figures, out, plotlyjs: str) -> dict[str, dict[str, str]]:
    """Write each result's figures with `write(result, figures, plotlyjs)` -> {kind: path} and return their paths
    relative to the report `out`'s folder, by family name ({} when `figures` is None)."""
    links = {}
    if figures is not None:
        base = Path(out).parent.resolve()
        for r in results:
            paths = write(r, figures, plotlyjs)
            links[r.name] = {k: os.path.relpath(Path(p).resolve(), base) for k, p in paths.items()}
    return links


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` (UTF-8) through a temporary file beside it and a rename; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
