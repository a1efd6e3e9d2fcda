"""Experiment 4: the study's findings, one row each (`check_findings`), with our numbers and the study's beside them.

The study's own numbers are its Tables 4-5 (utility = GSM8K accuracy, harm = judge score 1-5), kept in the
repository as docs/reference/paper_tables_4_5.csv (`study_reference`; docs/reference/README.md cites the paper).
Criteria (stated in the report too):
  F1  Top-K parallel raises utility and harm together: from the smallest to the largest rho, utility of the useful
      variant rises (exact match up; if flat, answer NLL down) and harm of the harmful variant rises (ASR up; if
      flat, the share of negative margins up; if flat too, the mean margin down). "F1 (contaminated)" reads both
      from the contaminated variant (Table 5).
  F2  harmful-A vs useful-A has the largest mean MSO of the weight-space pairs at the headline energy, in every
      scope (and every reference model).
  F3  in the depth band at the headline energy, the uncentred useful-vs-harmful activation MSO is at least
      ACTIVATION_RATIO x the harmful-vs-harmful MSO, on the start model and every fine-tune.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from safesub_core.errors import SafesubError
from safesub_core.findings.experiments import GEN_ASR, GEN_EXACT_MATCH, FamilyFindings
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


def _useful_harmful(pair: str) -> bool:
    """Whether a weight-space pair name is harmful-X vs useful-X."""
    return pair.startswith("harmful-") and "useful-" in pair


def _f2(r: FamilyFindings) -> dict:
    w = r.weight
    e = r.config.headline_energy
    at = w[(w["energy"] - e).abs() < 1e-9]
    parts, holds = [], True
    for (ref, scope), g in at.groupby(["reference", "scope"], sort=False):
        g = g.sort_values("mso", ascending=False)
        ok = _useful_harmful(g.iloc[0]["pair"])
        holds &= ok
        vals = ", ".join(f"{row.pair} {row.mso:.3f}" for row in g.itertuples())
        parts.append(f"{scope} ({'largest' if ok else 'not largest'}): {vals}; "
                     f"random {g['random_baseline'].mean():.3f}")
    n_e = 0
    for en, g in w[w["reference"] == "aligned"].groupby("energy"):
        tops = g.loc[g.groupby("scope")["mso"].idxmax(), "pair"]
        n_e += all(_useful_harmful(t) for t in tops)
    return dict(finding="F2", claim="the useful-vs-harmful update overlap is the largest of the weight-space pairs",
                holds=holds and len(parts) > 0,
                ours=f"mean MSO at energy {e:g}: " + " | ".join(parts)
                     + f"; largest in every scope at {n_e} of {w['energy'].nunique()} energies (reference A)",
                study=_IN_FIGURES)


def _f3(r: FamilyFindings) -> dict:
    e = r.config.headline_energy
    b = r.band[(r.band["energy"] - e).abs() < 1e-9]
    parts, holds = [], True
    for (model, center), g in b.groupby(["model", "center"], sort=False):
        g = g.set_index("pair")
        uh, hh = float(g.loc["useful vs harmful", "mso"]), float(g.loc["harmful vs harmful", "mso"])
        bh = float(g.loc["benign vs harmful", "mso"])
        ratio = uh / hh if hh > 0 else float("nan")
        ok = ratio >= ACTIVATION_RATIO
        if center == "uncentred":
            holds &= ok
        parts.append(f"{model} {center}: useful-harmful {uh:.3f}, benign-harmful {bh:.3f}, harmful-harmful {hh:.3f} "
                     f"(ratio {ratio:.2f}; random {float(g['random_baseline'].mean()):.3f})")
    lo, hi = r.band_range
    return dict(finding="F3", claim="harmful and useful prompts share activation subspaces about as much as two "
                                    "harmful prompt sets do",
                holds=holds and len(parts) > 0,
                ours=f"depth band {lo:.3g}-{hi:.3g}, energy {e:g}: " + " | ".join(parts),
                study=_IN_FIGURES)


def check_findings(r: FamilyFindings, study: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per finding (see the module docstring; the Table 5 variant of F1 when the family has a contaminated
    fine-tune): finding, claim, holds, ours, study, sentence."""
    study_sum = study_topk_summary(study)
    variants = set(r.points["variant"]) if len(r.points) else set()
    rows = []
    claim1 = "Top-K projection raises utility and harmfulness together"
    if {"useful", "harmful"} <= variants:
        rows.append(dict(finding="F1", claim=claim1 + " (Table 4: useful / harmful fine-tunes)",
                         **_f1(r, study_sum, "useful", "harmful", "Table4")))
    if "contaminated" in variants:
        rows.append(dict(finding="F1 (contaminated)", claim=claim1 + " (Table 5: contaminated fine-tune)",
                         **_f1(r, study_sum, "contaminated", "contaminated", "Table5")))
    rows += [_f2(r), _f3(r)]
    out = pd.DataFrame(rows)
    out["sentence"] = [_sentence(r.name, row) for row in out.itertuples()]
    return out


def _sentence(family: str, row) -> str:
    verdict = "holds" if row.holds else "does not hold"
    text = f"On {family}, '{row.claim}' {verdict}: {row.ours}."
    if row.study:
        text += f" Study: {row.study}."
    return text
