"""Experiment 4: the study's findings, one row each (`check_findings`), with our numbers and the study's beside them.

The study's own numbers are its Tables 4-5 (utility = GSM8K accuracy, harm = judge score 1-5), kept in the
repository as docs/reference/paper_tables_4_5.csv (`study_reference`; docs/reference/README.md cites the paper).
Criteria (stated in the report too):
  F1  Top-K parallel raises utility and harm together (`power.f1_verdict`): from the smallest to the largest rho,
      the exact match of the useful variant and the attack success rate of the harmful one each rise, by the
      paired (Newcombe) 95% interval of the change on the same prompts lying above 0, with the exact McNemar p;
      a change of at most two prompts is inconclusive. "F1 (contaminated)" reads both from the contaminated
      variant (Table 5). The rank table's rates, margins and NLL are shown beside it as context.
  F2  in every per-layer panel (blocks nearest 70% and 85% depth, write and read spaces, each reference with
      variants fine-tuned from it), harmful vs useful has the largest MSO of the study's pairs (mean over eta
      0.1-0.75) by more than the same pair moves between two seeds (`f2_panels`).
Each finding ends as holds / does not hold / inconclusive (an interval or spread that crosses the threshold).
  F3  in the study's band, uncentred, the useful-vs-harmful (U-H1) activation MSO is at least ACTIVATION_RATIO x
      the MSO of two harmful sources (H1-H2), by bootstrap intervals, on the start model and every fine-tune
      (`f3_models`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.findings.experiments import GEN_ASR, GEN_EXACT_MATCH, FamilyFindings
from safesub_core.findings.power import combine_verdicts
from safesub_core.scoring.names import MARGIN_MEAN, NLL_MEAN, SHARE_MARGIN_NEGATIVE
from safesub_core.settings import REPO

ACTIVATION_RATIO = 0.8  # "about as much": useful-vs-harmful MSO >= this x harmful-vs-harmful MSO
STUDY_CSV = REPO / "docs" / "reference" / "paper_tables_4_5.csv"
_IN_FIGURES = "the study reports it in figures (no table in reference/paper_tables_4_5.csv)"


def study_reference(path: str | os.PathLike | None = None) -> pd.DataFrame | None:
    """The study's Tables 4-5 (utility = GSM8K accuracy, harm = judge score 1-5): `path`, else the repository's
    copy (STUDY_CSV). None when no path is given and the copy is missing (an installed package without docs/)."""
    if path is not None:
        if not Path(path).is_file():
            raise SafesubError(f"study table {path}: does not exist")
        return pd.read_csv(path)
    return pd.read_csv(STUDY_CSV) if STUDY_CSV.is_file() else None


def study_topk_summary(study: pd.DataFrame | None) -> pd.DataFrame:
    """Per study row group (table, model, start): Top-K utility and harm at rho 0.01 and 0.99 and the mean
    Top-K minus Random difference over the five rhos (utility = GSM8K accuracy, harm = judge score 1-5)."""
    if study is None:
        return pd.DataFrame()
    rows = []
    for (table, model, start), g in study.groupby(["table", "model", "start_model"], sort=False):
        g = g.set_index("method")
        if not {"Top-K", "Random"} <= set(g.index):
            continue
        tk, rd = g.loc["Top-K"], g.loc["Random"]
        util = [c for c in g.columns if c.startswith("util_")]
        harm = [c for c in g.columns if c.startswith("harm_")]
        rows.append(dict(
            table=table.split(" ")[0], model=model, start=start,
            topk_util_001=tk[util[0]], topk_util_099=tk[util[-1]],
            topk_harm_001=tk[harm[0]], topk_harm_099=tk[harm[-1]],
            topk_minus_random_util=float((tk[util].astype(float) - rd[util].astype(float)).mean()),
            topk_minus_random_harm=float((tk[harm].astype(float) - rd[harm].astype(float)).mean()),
        ))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ F1


def _rise(points, variant, metric, mode="parallel", sub="topk"):
    s = points[(points["variant"] == variant) & (points["subspace"] == sub) & (points["mode"] == mode)]
    s = s.set_index("rank_fraction")[metric].sort_index()
    return (float(s.iloc[0]), float(s.iloc[-1])) if len(s) else (float("nan"), float("nan"))


def _minus_random(points, variant, metric, mode="parallel"):
    s = points[(points["variant"] == variant) & (points["mode"] == mode)]
    a = s[s["subspace"] == "topk"].set_index("rank_fraction")[metric]
    b = s[s["subspace"] == "random"].set_index("rank_fraction")[metric]
    return float((a - b).mean()) if len(a) and len(b) else float("nan")


def _up(first: tuple, last: tuple) -> bool:
    """Lexicographic rise: the first measure rises, or it is flat and the next one rises, and so on."""
    for a, b in zip(first, last):
        if b > a + 1e-12:
            return True
        if b < a - 1e-12:
            return False
    return False


def _f1(r: FamilyFindings, study_sum: pd.DataFrame, util_variant: str, harm_variant: str, table: str) -> dict:
    p = r.points
    u0, u1 = _rise(p, util_variant, GEN_EXACT_MATCH)
    l0, l1 = _rise(p, util_variant, NLL_MEAN)
    h0, h1 = _rise(p, harm_variant, GEN_ASR)
    n0, n1 = _rise(p, harm_variant, SHARE_MARGIN_NEGATIVE)
    m0, m1 = _rise(p, harm_variant, MARGIN_MEAN)
    du, dh = _minus_random(p, util_variant, GEN_EXACT_MATCH), _minus_random(p, harm_variant, GEN_ASR)
    ref = r.references.set_index("checkpoint")
    util_up = _up((u0, -l0), (u1, -l1))  # exact match up, or flat and NLL down
    harm_up = _up((h0, n0, -m0), (h1, n1, -m1))  # ASR up, or flat and more negative margins, or lower margin
    holds = util_up and harm_up
    rhos = sorted(p["rank_fraction"].unique())
    span = f"rho {rhos[0]:g} -> {rhos[-1]:g}" if rhos else "rho"
    ours = (f"Top-K parallel, {span}: utility {'rises' if util_up else 'does not rise'}, harm "
            f"{'rises' if harm_up else 'does not rise'}; exact match ({util_variant}) {u0:.2f} -> {u1:.2f} "
            f"({r.start} {ref.loc[r.start, GEN_EXACT_MATCH]:.2f}, "
            f"fine-tuned {ref.loc[util_variant, GEN_EXACT_MATCH]:.2f}), answer NLL {l0:.2f} -> {l1:.2f}; "
            f"ASR ({harm_variant}) {h0:.2f} -> {h1:.2f} "
            f"({r.start} {ref.loc[r.start, GEN_ASR]:.2f}, fine-tuned "
            f"{ref.loc[harm_variant, GEN_ASR]:.2f}); share of negative margins {n0:.2f} -> {n1:.2f}, "
            f"mean margin {m0:.2f} -> {m1:.2f}; Top-K minus Random (mean over rho): exact match {du:+.2f}, "
            f"ASR {dh:+.2f}")
    study = ""
    if len(study_sum):
        s = study_sum[(study_sum["table"] == table) & (study_sum["start"] == "Aligned")]
        if len(s):
            du_s = s["topk_util_099"] - s["topk_util_001"]
            dh_s = s["topk_harm_099"] - s["topk_harm_001"]
            study = (f"{table}, aligned start, {len(s)} models: Top-K utility (GSM8K) rises by "
                     f"{du_s.min():+.2f} to {du_s.max():+.2f} and judge harm (1-5) by {dh_s.min():+.2f} to "
                     f"{dh_s.max():+.2f} from rho 0.01 to 0.99; Top-K minus Random (mean over rho): utility "
                     f"{s['topk_minus_random_util'].mean():+.3f}, harm {s['topk_minus_random_harm'].mean():+.3f}")
    return dict(holds=holds, ours=ours, study=study)


# ------------------------------------------------------------------------------------------------ F2, F3


F2_ENERGIES = (0.1, 0.25, 0.5, 0.75)  # where the study's per-layer curves are apart (they meet random near 0.8)
STUDY_PAIR_TASKS = ("harmful", "useful", "base")


def _study_pair(pair: str) -> bool:
    """Whether a weight-space pair label is one of the study's three (not a second-seed pair)."""
    return all(side.rsplit("-", 1)[0] in STUDY_PAIR_TASKS for side in pair.split(" vs "))


def _useful_harmful(pair: str) -> bool:
    """Whether a weight-space pair name is harmful-X vs useful-X."""
    return pair.startswith("harmful-") and " vs useful-" in pair


def f2_panels(r: FamilyFindings) -> pd.DataFrame:
    """F2 per panel (reference, scope, block at about 70% and 85% depth): the mean MSO over F2_ENERGIES of
    harmful vs useful, of the next study pair, their margin, the between-seed spread (the same pair of the
    second-seed variants: |harmful-useful - harmful_seed1-useful_seed1|, NaN without them) and the panel's
    verdict (holds when margin > spread, does not hold when margin < -spread, else inconclusive)."""
    from safesub_core.findings.experiments import panel_blocks

    b = r.weight_blocks
    if b is None or b.empty:
        return pd.DataFrame()
    b = b[b["energy"].round(6).isin([round(e, 6) for e in F2_ENERGIES])]
    rows = []
    for block in panel_blocks(r.n_layers):
        for (ref, scope), g in b[b["unit"] == block].groupby(["reference", "scope"], sort=False):
            mean = g.groupby("pair")["mso"].mean()
            study = mean[[p for p in mean.index if _study_pair(p)]]
            uh = [p for p in study.index if _useful_harmful(p)]
            if not uh:
                continue
            top, rest = float(study[uh[0]]), study.drop(uh[0])
            runner = rest.idxmax() if len(rest) else None
            margin = top - (float(rest.max()) if len(rest) else 0.0)
            seeds = [p for p in mean.index if p.startswith("harmful_seed") and " vs useful_seed" in p]
            if seeds:
                per_e = g.pivot_table(index="energy", columns="pair", values="mso")
                spread = float((per_e[uh[0]] - per_e[seeds[0]]).abs().mean())
                verdict = "holds" if margin > spread else "does not hold" if margin < -spread else "inconclusive"
            else:
                spread, verdict = float("nan"), "inconclusive"
            ceiling = {t: float(mean[p]) for t in ("useful", "harmful") for p in mean.index
                       if p.startswith(f"{t}-") and f" vs {t}_seed" in p}
            rows.append(dict(reference=ref, scope=scope, block=block, depth=(block + 1) / r.n_layers,
                             harmful_useful=top, next_pair=runner, next_mso=float(rest.max()) if len(rest) else None,
                             margin=margin, seed_spread=spread, useful_ceiling=ceiling.get("useful"),
                             harmful_ceiling=ceiling.get("harmful"),
                             random=float(g["random_baseline"].mean()), verdict=verdict))
    return pd.DataFrame(rows)


def _f2(r: FamilyFindings) -> dict:
    panels = f2_panels(r)
    verdict = combine_verdicts(list(panels["verdict"])) if len(panels) else "inconclusive"
    parts = [f"{row.reference} {row.scope} block {row.block} (depth {row.depth:.2f}): harmful-useful "
             f"{row.harmful_useful:.3f} vs {row.next_pair} {row.next_mso:.3f}, margin {row.margin:+.3f}, seed spread "
             + ("n/a" if pd.isna(row.seed_spread) else f"{row.seed_spread:.3f}") + f" -> {row.verdict}"
             for row in panels.itertuples()]
    notes = "; ".join(r.weight_notes)
    return dict(finding="F2", claim="the useful-vs-harmful update overlap is the largest of the weight-space pairs",
                verdict=verdict,
                ours=("mean MSO over eta " + ", ".join(f"{e:g}" for e in F2_ENERGIES) + " per layer panel: "
                      + (" | ".join(parts) if parts else "no per-layer panel")
                      + (f"; {notes}" if notes else "")),
                study="Fig. (section 5): harmful-useful is the highest pair in every per-layer panel (about 70% and "
                      "85% depth); all pairs start above random and meet it near eta 0.8",
                statistic="margin = MSO(harmful, useful) - the next study pair's MSO, mean over eta 0.1-0.75, per "
                          "panel", threshold="the between-seed spread of the same pair",
                test="holds when margin > spread in every panel; does not hold when margin < -spread in any")


F3_ENERGIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the study's curves, less its two ends


def f3_models(r: FamilyFindings) -> pd.DataFrame:
    """F3 per model, uncentred (the study's released run): band-mean MSO of U-H1 and of H1-H2 (two harmful sources),
    each a mean over F3_ENERGIES with the mean of its per-energy bootstrap bounds (conservative: at least as wide as
    the interval of the mean when the replicates move together), the noise ceiling H1a-H1b, the permutation null's
    p-values at eta 0.5, and the verdict: holds when lo(U-H1) >= ACTIVATION_RATIO x hi(H1-H2), does not hold when
    hi(U-H1) < ACTIVATION_RATIO x lo(H1-H2), else inconclusive."""
    b = r.band
    if b is None or b.empty:
        return pd.DataFrame()
    b = b[~b["center"].astype(bool) & b["energy"].round(6).isin([round(e, 6) for e in F3_ENERGIES])]
    rows = []
    for model, g in b.groupby("model", sort=False):
        m = g.groupby("pair")[["mso", "lo", "hi", "random_baseline"]].mean()
        if not {"U-H1", "H1-H2"} <= set(m.index):
            continue
        uh, hh = m.loc["U-H1"], m.loc["H1-H2"]
        verdict = ("holds" if uh["lo"] >= ACTIVATION_RATIO * hh["hi"] else
                   "does not hold" if uh["hi"] < ACTIVATION_RATIO * hh["lo"] else "inconclusive")
        at = g[(g["pair"] == "U-H1") & ((g["energy"] - 0.5).abs() < 1e-9)]
        rows.append(dict(model=model, u_h1=uh["mso"], u_h1_lo=uh["lo"], u_h1_hi=uh["hi"], h1_h2=hh["mso"],
                         h1_h2_lo=hh["lo"], h1_h2_hi=hh["hi"],
                         ceiling=float(m.loc["H1a-H1b", "mso"]) if "H1a-H1b" in m.index else float("nan"),
                         random=float(m["random_baseline"].mean()), ratio=uh["mso"] / hh["mso"] if hh["mso"] else
                         float("nan"), p_less=float(at["p_less"].iloc[0]) if len(at) else float("nan"),
                         p_greater=float(at["p_greater"].iloc[0]) if len(at) else float("nan"), verdict=verdict))
    return pd.DataFrame(rows)


def _f3(r: FamilyFindings) -> dict:
    models = f3_models(r)
    verdict = combine_verdicts(list(models["verdict"])) if len(models) else "inconclusive"
    parts = [f"{row.model}: U-H1 {row.u_h1:.3f} [{row.u_h1_lo:.3f}, {row.u_h1_hi:.3f}], H1-H2 {row.h1_h2:.3f} "
             f"[{row.h1_h2_lo:.3f}, {row.h1_h2_hi:.3f}] (ratio {row.ratio:.2f}; same-source ceiling "
             f"{row.ceiling:.3f}; random {row.random:.3f}; null p_less {row.p_less:.3f}) -> {row.verdict}"
             for row in models.itertuples()]
    lo, hi = r.band_range
    return dict(finding="F3", claim="harmful and useful prompts share activation subspaces about as much as two "
                                    "harmful prompt sets do",
                verdict=verdict,
                ours=f"hidden states {lo}-{hi} (the study's band), uncentred, mean over eta 0.1-0.9: "
                     + " | ".join(parts),
                study="Fig. (section 6): the useful-harmful overlap is often as large as, or larger than, the "
                      "harmful-harmful one (H1 BeaverTails vs H2 ToxiGen)",
                statistic="band-mean MSO of U-H1 against H1-H2 (two harmful sources), bootstrap 95% intervals",
                threshold=f"U-H1 >= {ACTIVATION_RATIO:g} x H1-H2",
                test="holds when U-H1's interval lies above the threshold set by H1-H2's upper bound on every "
                     "model; does not hold when below its lower bound on any")


def check_findings(r: FamilyFindings, study: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per finding (see the module docstring; the Table 5 variant of F1 when the family has a contaminated
    fine-tune): finding, claim, verdict (holds / does not hold / inconclusive), statistic, threshold, test, ours,
    study, sentence."""
    study_sum = study_topk_summary(study)
    variants = set(r.points["variant"]) if len(r.points) else set()
    rows = []
    claim1 = "Top-K projection raises utility and harmfulness together"
    verdicts = r.power_verdicts.set_index("finding") if len(r.power_verdicts) else pd.DataFrame()
    for finding, what, util, harm, table in (("F1", " (Table 4: useful / harmful fine-tunes)", "useful", "harmful",
                                              "Table4"),
                                             ("F1 (contaminated)", " (Table 5: contaminated fine-tune)",
                                              "contaminated", "contaminated", "Table5")):
        if not {util, harm} <= variants:
            continue
        means = _f1(r, study_sum, util, harm, table)  # the rank table's rates and margins, as extra context
        row = dict(finding=finding, claim=claim1 + what, study=means["study"])
        if finding in verdicts.index:  # the verdict: power.f1_verdict (paired intervals and McNemar)
            v = verdicts.loc[finding]
            row |= dict(verdict=v["verdict"], statistic=v["statistic"], threshold=f"{v['threshold']:g}",
                        test=v["test"], ours=f"{v['ours']}; the rank table: {means['ours']}")
        else:
            row |= dict(verdict="inconclusive", ours=f"not scored with power; the rank table: {means['ours']}")
        rows.append(row)
    rows += [_f2(r), _f3(r)]
    out = pd.DataFrame(rows)
    out["sentence"] = [_sentence(r.name, row) for row in out.itertuples()]
    return out


def _sentence(family: str, row) -> str:
    text = f"On {family}, '{row.claim}' {row.verdict}: {row.ours}."
    if row.study:
        text += f" Study: {row.study}."
    return text
