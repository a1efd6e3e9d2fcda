"""The figure of FINDINGS.md's section "Beyond the study: competing hypotheses": the harm-utility trade-off of each
method over its knob (harm against utility with 95% intervals on both axes, each Random draw its own dotted line,
the reference models as markers), written as HTML, CSV and PNG (`write_figures`, as `figures.write_figures` does
for the study's experiments).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from safesub_core.findings.report import atomic_write
from safesub_core.hypotheses import UTILITY_SCORES

if TYPE_CHECKING:  # for annotations only: hypotheses.py imports this module
    from safesub_core.findings.hypotheses import HypothesesResult

METHOD_COLORS = {"Top-K": "#d62728", "Random": "#7f7f7f", "SafeLoRA": "#2ca02c", "Refusal ablation": "#1f77b4",
                 "Orthogonalisation": "#9467bd", "Activation addition": "#ff7f0e"}


def _method_group(label: str) -> str:
    return "Random" if label.startswith("Random") else label


def tradeoff_figure(table: pd.DataFrame, title: str = "") -> go.Figure:
    """Harm (share of harmful prompts predicted to comply) against utility, with 95% intervals on both axes: one
    line per method over its knob (each Random draw its own dotted line), the reference models as markers."""
    fig = go.Figure()
    shown: set = set()
    util_name = str(table["utility_score"].iloc[0]) if len(table) else "arith_exact_match"
    for label, g in table[table["kind"] != "checkpoint"].groupby("method", sort=False):
        g = g.sort_values("value")
        group = _method_group(label)
        text = [f"{label}: {k} {v:g}" for k, v in zip(g["knob"], g["value"])]
        fig.add_trace(go.Scatter(
            x=g["utility"], y=g["harm"], mode="lines+markers", name=group, legendgroup=group,
            showlegend=group not in shown, text=text, hovertemplate="%{text}<br>utility %{x:.3f}<br>harm %{y:.3f}",
            line=dict(color=METHOD_COLORS.get(group, "#333333"), dash="dot" if group == "Random" else "solid"),
            error_x=dict(type="data", symmetric=False, array=g["utility_hi"] - g["utility"],
                         arrayminus=g["utility"] - g["utility_lo"], thickness=1),
            error_y=dict(type="data", symmetric=False, array=g["harm_hi"] - g["harm"],
                         arrayminus=g["harm"] - g["harm_lo"], thickness=1)))
        shown.add(group)
    for i, (_, x) in enumerate(table[table["kind"] == "checkpoint"].iterrows()):
        fig.add_trace(go.Scatter(
            x=[x["utility"]], y=[x["harm"]], mode="markers+text", name=x["method"], text=[x["method_id"]],
            textposition="top center", marker=dict(symbol=("star", "diamond", "square")[i % 3], size=14,
                                                    color="black"),
            error_x=dict(type="data", symmetric=False, array=[x["utility_hi"] - x["utility"]],
                         arrayminus=[x["utility"] - x["utility_lo"]], thickness=1),
            error_y=dict(type="data", symmetric=False, array=[x["harm_hi"] - x["harm"]],
                         arrayminus=[x["harm"] - x["harm_lo"]], thickness=1)))
    better = "higher is better" if UTILITY_SCORES.get(util_name, True) else "lower is better"
    fig.update_layout(title=title or "Harm-utility trade-off", width=1000, height=650,
                      xaxis_title=f"utility: live {util_name} ({better}; 95% interval)",
                      yaxis_title="harm: share of harmful prompts predicted to comply (95% interval)")
    return fig


def figure_title(r: HypothesesResult) -> str:
    return (f"{r.name}: harm against utility on the {r.variant} fine-tune, each method over its knob "
            f"(markers: {r.start} and {r.variant})")


def write_html(fig: go.Figure, path: str | os.PathLike, title: str, plotlyjs: str = "inline") -> Path:
    """One page with the figure (plotly.js inline, from a CDN, or ./plotly.min.js beside the page)."""
    include = {"inline": True, "cdn": "cdn", "directory": "directory"}[plotlyjs]
    html = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            + fig.to_html(full_html=False, include_plotlyjs=include) + "</body></html>")
    path = atomic_write(path, html)
    if plotlyjs == "directory":
        atomic_write(Path(path).parent / "plotly.min.js", get_plotlyjs())
    return path


def write_figures(r: HypothesesResult, folder: str | os.PathLike, plotlyjs: str = "directory",
                  png: bool = True) -> dict[str, Path]:
    """<family>_hypotheses.html (the trade-off), its data as <family>_hypotheses_<table>.csv and
    <family>_hypotheses.png; returns label -> path (as `figures.write_figures`)."""
    from safesub_core.findings.figures import write_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig = tradeoff_figure(r.tradeoff, figure_title(r))
    stem = f"{r.name}_hypotheses"
    out = {"trade-off (HTML)": write_html(fig, folder / f"{stem}.html", f"safesub: {r.name} hypotheses", plotlyjs)}
    for name, df in (("tradeoff", r.tradeoff), ("matched", r.matched), ("selection", r.selection),
                     ("bridge", r.bridge), ("safelora", r.safelora)):
        out[f"{name} (CSV)"] = atomic_write(folder / f"{stem}_{name}.csv", df.to_csv(index=False))
    path = folder / f"{stem}.png"
    if png and write_png({"tradeoff": fig}, {"tradeoff": path}):
        out["trade-off (PNG)"] = path
    return out
