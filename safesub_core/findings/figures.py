"""The findings' three figures, drawn once each with plotly, and the files written from them.

  rank         utility and harm scores against the rank fraction rho, per mode and subspace (experiment 1)
  weight       weight-space mean MSO against the energy fraction, per reference and scope (experiment 2)
  activations  the study's activation curves: band-mean MSO against eta with bootstrap intervals (experiment 3)

`write_figures` writes, for one family: <family>.html with every figure (interactive; plotly.js inlined, from a
CDN, or read from plotly.min.js beside the pages), <family>_<data>.csv with each figure's data as a long table,
and <family>_<figure>.png for readers of FINDINGS.md without a browser. The PNGs are the same plotly figures
exported by plotly's `write_images` through kaleido, which drives a headless Chrome or Chromium: $BROWSER_PATH
when set, else the first one on the PATH (Debian's `chromium` package, /usr/bin/chromium, works). Without kaleido
or a browser the PNGs are left out with a warning (older ones at their paths removed), and the report links the
HTML alone.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from safesub_core.findings.experiments import GEN_ASR, GEN_EXACT_MATCH, FamilyFindings
from safesub_core.findings.report import atomic_write
from safesub_core.projection import SUBSPACE_LABELS
from safesub_core.scoring.names import (ARITH_EXACT_MATCH, ENERGY_KEPT, KL_TO_START, MARGIN_MEAN, NLL_MEAN,
                                        SHARE_MARGIN_NEGATIVE)

FIGURES = ("rank", "weight", "activations")
PLOTLYJS = ("inline", "cdn", "directory")  # how the HTML gets plotly.js (see write_figures)
# the score columns of the rank figure's data (after variant, subspace, mode, rank_fraction); the checkpoints' data
# keeps those after energy_kept
FIGURE_COLUMNS = (ENERGY_KEPT, GEN_EXACT_MATCH, GEN_ASR, ARITH_EXACT_MATCH, NLL_MEAN, MARGIN_MEAN,
                  SHARE_MARGIN_NEGATIVE, KL_TO_START)
SUBSPACE_COLORS = {"topk": "#d62728", "randomk": "#1f77b4", "random": "#7f7f7f"}
PALETTE = ("#d62728", "#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b")


def figure_frames(r: FamilyFindings) -> dict[str, pd.DataFrame]:
    """The data behind each figure, as long tables (written as CSV beside the HTML)."""
    keep = ["variant", "subspace", "mode", "rank_fraction", *FIGURE_COLUMNS]
    rank = r.points[[c for c in keep if c in r.points]]
    refs = r.references[[c for c in ["checkpoint", *FIGURE_COLUMNS[1:]] if c in r.references]]
    return {"rank": rank, "rank_references": refs, "weight": r.weight, "weight_blocks": r.weight_blocks,
            "activations": r.activations, "activation_band": r.band}


def _scored_as(points: pd.DataFrame, mode: str, variant: str, generated: str, live: str) -> str:
    """`generated` when the variant's points in this mode have generation scores, else the `live` column (E2's
    orthogonal mode is generated on the contaminated variant only, so useful's and harmful's read the live scores)."""
    sel = points[(points["mode"] == mode) & (points["variant"] == variant)]
    return generated if generated in sel and sel[generated].notna().any() else live


def rank_figure(r: FamilyFindings) -> go.Figure:
    """Utility (useful variant) and harm (harmful variant) against rho: one row per mode, one line per subspace,
    the start model (dashed) and the fine-tune (dotted) as horizontal lines. Utility and harm are the generation
    scores (exact match, ASR) where the variant was generated in that mode, else the live ones (exact match of a
    few greedy tokens, the share of prompts predicted to comply)."""
    p, ref = r.points, r.references.set_index("checkpoint")
    modes = list(r.config.modes)

    def metrics(mode):
        util = _scored_as(p, mode, "useful", GEN_EXACT_MATCH, ARITH_EXACT_MATCH)
        harm = _scored_as(p, mode, "harmful", GEN_ASR, SHARE_MARGIN_NEGATIVE)
        return [(util, "useful", f"{util} (useful)"), (NLL_MEAN, "useful", "answer NLL (useful)"),
                (harm, "harmful", f"{harm} (harmful)"), (MARGIN_MEAN, "harmful", "margin (harmful)")]

    fig = make_subplots(rows=len(modes), cols=4, shared_xaxes=True,
                        subplot_titles=[f"{m}: {t}" for m in modes for _, _, t in metrics(m)])
    for i, mode in enumerate(modes, 1):
        for j, (metric, variant, _) in enumerate(metrics(mode), 1):
            for sub, label in SUBSPACE_LABELS.items():
                s = p[(p["variant"] == variant) & (p["subspace"] == sub) & (p["mode"] == mode)]
                s = s.sort_values("rank_fraction")
                fig.add_trace(go.Scatter(x=s["rank_fraction"], y=s[metric], mode="lines+markers", name=label,
                                         legendgroup=label, showlegend=(i == 1 and j == 1),
                                         line=dict(color=SUBSPACE_COLORS[sub])), row=i, col=j)
            for name, dash in ((r.start, "dash"), (variant, "dot")):
                if name in ref.index:
                    fig.add_hline(y=float(ref.loc[name, metric]), line_dash=dash, line_color="black", row=i, col=j,
                                  annotation_text=name, annotation_font_size=9)
    fig.update_xaxes(title_text="rank fraction rho", row=len(modes))
    fig.update_layout(title=f"{r.name}: utility and harm against rank (dashed: {r.start}, dotted: fine-tuned)",
                      height=330 * len(modes), width=1400)
    return fig


def weight_figure(r: FamilyFindings) -> go.Figure:
    """The study's per-layer weight-space panels: MSO of each pair against the energy fraction at the blocks nearest
    70% and 85% depth (columns), one row per reference model and block space, the random baseline dotted; a pair
    (by task) has the same colour everywhere."""
    from safesub_core.findings.experiments import panel_blocks

    b = r.weight_blocks
    blocks = panel_blocks(r.n_layers)
    b = b[b["unit"].isin(blocks)]
    rows = list(b.groupby(["reference", "scope"], sort=False).groups)
    fig = make_subplots(rows=max(len(rows), 1), cols=len(blocks),
                        subplot_titles=[f"{rf} / {sc} / block {k} (depth {(k + 1) / r.n_layers:.2f})"
                                        for rf, sc in rows for k in blocks])
    roles: dict[str, str] = {}
    for i, (rf, sc) in enumerate(rows, 1):
        for j, k in enumerate(blocks, 1):
            g = b[(b["reference"] == rf) & (b["scope"] == sc) & (b["unit"] == k)]
            for pair, gp in g.groupby("pair", sort=False):
                role = pair.replace("-A", "").replace("-S", "")
                color = roles.setdefault(role, PALETTE[len(roles) % len(PALETTE)])
                fig.add_trace(go.Scatter(x=gp["energy"], y=gp["mso"], mode="lines+markers", name=role,
                                         legendgroup=role, showlegend=(i == 1 and j == 1),
                                         line=dict(color=color, dash="dash" if "seed" in role else "solid")),
                              row=i, col=j)
            rnd = g.groupby("energy")["random_baseline"].mean()
            fig.add_trace(go.Scatter(x=rnd.index, y=rnd.values, mode="lines", name="random baseline",
                                     legendgroup="random", showlegend=(i == 1 and j == 1),
                                     line=dict(color="grey", dash="dot")), row=i, col=j)
    fig.update_xaxes(title_text="energy fraction eta")
    fig.update_yaxes(title_text="MSO", col=1, range=[0, 1.02])
    fig.update_layout(title=f"{r.name}: weight-space overlap per layer (dashed: second-seed pairs; dotted: random)",
                      height=300 * max(len(rows), 1), width=1200)
    return fig


def activation_figure(r: FamilyFindings) -> go.Figure:
    """The study's activation curves: band-mean MSO of each pair against eta with its bootstrap interval (error bars),
    one row per centring, one column per model; the random baseline dotted."""
    b = r.band
    models = list(b["model"].unique())
    centers = list(b["center"].unique())
    label = {True: "centred", False: "uncentred"}
    fig = make_subplots(rows=len(centers), cols=len(models),
                        subplot_titles=[f"{m} ({label[bool(c)]})" for c in centers for m in models])
    for i, c in enumerate(centers, 1):
        for j, m in enumerate(models, 1):
            g = b[(b["model"] == m) & (b["center"] == c)]
            for k, (pair, gp) in enumerate(g.groupby("pair", sort=False)):
                color = PALETTE[k % len(PALETTE)]
                fig.add_trace(go.Scatter(x=gp["energy"], y=gp["mso"], mode="lines+markers", name=pair,
                                         legendgroup=pair, showlegend=(i == 1 and j == 1), line=dict(color=color),
                                         error_y=dict(type="data", symmetric=False, array=gp["hi"] - gp["mso"],
                                                      arrayminus=gp["mso"] - gp["lo"], thickness=1)),
                              row=i, col=j)
            rnd = g.groupby("energy")["random_baseline"].mean()
            fig.add_trace(go.Scatter(x=rnd.index, y=rnd.values, mode="lines", name="random baseline",
                                     legendgroup="random", showlegend=(i == 1 and j == 1),
                                     line=dict(color="grey", dash="dot")), row=i, col=j)
    lo, hi = r.band_range
    fig.update_xaxes(title_text="energy fraction eta")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(title=f"{r.name}: activation MSO, band mean over hidden states {lo}-{hi} (the study's band; "
                            "bars: 95% bootstrap intervals)", height=330 * len(centers), width=1400)
    return fig


def plotly_figures(r: FamilyFindings) -> dict[str, go.Figure]:
    """name -> plotly Figure: scores against rank, weight-space MSO against energy, activation MSO per layer."""
    return {"rank": rank_figure(r), "weight": weight_figure(r), "activations": activation_figure(r)}


def write_png(figs: dict[str, go.Figure], paths: dict[str, Path]) -> bool:
    """Export each figure to its PNG path at the figure's own width and height (plotly's `write_images`: one
    kaleido browser session for all of them). False, with a warning, when kaleido or a browser is missing; a PNG
    an earlier run left at one of the paths is then removed, so no figure outlives the data it was drawn from."""
    names = list(figs)
    try:
        pio.write_images([figs[n] for n in names], [paths[n] for n in names],
                         width=[figs[n].layout.width for n in names], height=[figs[n].layout.height for n in names])
    except RuntimeError as err:  # plotly's message when kaleido is not installed or finds no Chrome / Chromium
        stale = [p for p in (Path(paths[n]) for n in names) if p.exists()]
        for path in stale:
            path.unlink()
        removed = f"; removed the older {', '.join(p.name for p in stale)}" if stale else ""
        warnings.warn(f"PNG figures left out (the HTML has them){removed}: {str(err).strip().splitlines()[0]}",
                      stacklevel=2)
        return False
    return True


def write_figures(r: FamilyFindings, folder: str | os.PathLike, plotlyjs: str = "inline",
                  png: bool = True) -> dict[str, Path]:
    """Write <family>.html (all figures), <family>_<data>.csv and <family>_<figure>.png into `folder`.

    `plotlyjs` (PLOTLYJS): "inline" puts plotly.js in the page (about 4.6 MB a page), "cdn" loads it from the
    network, "directory" loads ./plotly.min.js, the installed plotly's bundle written once beside the pages
    (offline). Returns label -> path ("figures (HTML)", "<data> (CSV)", "<figure> (PNG)"; no PNG labels when they
    could not be drawn). Files are written to a temporary name and renamed.
    """
    if plotlyjs not in PLOTLYJS:
        raise ValueError(f"plotlyjs {plotlyjs!r}: expected one of {', '.join(PLOTLYJS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figs = plotly_figures(r)
    include = {"inline": True, "cdn": "cdn", "directory": "directory"}[plotlyjs]
    parts = [fig.to_html(full_html=False, include_plotlyjs=include if i == 0 else False)
             for i, fig in enumerate(figs.values())]
    html = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>safesub findings: {r.name}</title></head>"
            f"<body><h1>safesub findings: family {r.name}</h1>" + "".join(parts) + "</body></html>")
    out = {"figures (HTML)": atomic_write(folder / f"{r.name}.html", html)}
    if plotlyjs == "directory":
        atomic_write(folder / "plotly.min.js", get_plotlyjs())
    for name, df in figure_frames(r).items():
        out[f"{name} (CSV)"] = atomic_write(folder / f"{r.name}_{name}.csv", df.to_csv(index=False))
    pngs = {name: folder / f"{r.name}_{name}.png" for name in figs}
    if png and write_png(figs, pngs):
        out |= {f"{name} (PNG)": path for name, path in pngs.items()}
    return out
