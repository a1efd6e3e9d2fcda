"""Subspaces: project a fine-tuning update onto the alignment subspace and watch the scores follow the sliders."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import ui
from safesub_core.compute import FULL_LIVE_PROMPTS
from safesub_core.scoring import names as N
from safesub_core.session import GENERATION_TOKENS
from safesub_core.projection import MODES, SUBSPACE_LABELS, SUBSPACES, ProjectionConfig
from safesub_core.stats import Estimate
from safesub_core.sweeps import DEFAULT_SEEDS as SEEDS, P_PREFIX, sweep
from ui.link import PARAMS
from ui.readouts import DELTA_COLOR, Readouts

ui.header("Subspaces",
          "W = W_start + α·X with X = P_k ΔT (parallel), −P_k ΔT (opposite) or ΔT − P_k ΔT "
          "(orthogonal), P_k the projector on a rank-k subspace of the alignment update ΔA = W_start −"
          " W_base.")
fam, res = ui.require_family()  # and its caption
S = res.session
SCORE_GRID = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)  # rank fractions of the chart's grid
SIGNIFICANT = 0.05  # the chart rings Top-K points whose paired test against Random has p below this

# each read-out: its score key and the values of the start and of the fine-tuned model ("live": their own scores)
READOUTS = [(N.ENERGY_KEPT, 0.0, 1.0), (N.COS_TASK_KEPT, None, 1.0), (N.COS_TASK_ALIGN, None, None)] + [
    (key, "live", "live") for key in N.LIVE]
PANELS = [N.ENERGY_KEPT, N.COS_TASK_KEPT, *N.LIVE, "generation"]
TITLES = {k: N.label(k) for k in PANELS[:-1]} | {"generation": "generation: ASR ● / exact match ◆"}


def grid_scores(variant: str, mode: str, alpha: float, score: bool) -> pd.DataFrame:
    """Live scores over SCORE_GRID for the three subspaces (Random and Random-K with SEEDS draws; Top-K rows with the
    paired test against Random), first wave each: computed when `score` (disk-cached points; a progress bar
    meanwhile), else only the points already on disk."""
    if not score:
        rows = []
        for sub in SUBSPACES:
            for rho in SCORE_GRID:
                for seed in [None] if sub == "topk" else range(S.seed, S.seed + SEEDS):
                    cfg = ProjectionConfig(sub, mode, rank_fraction=rho, alpha=alpha)
                    got = S.point_scores(variant, cfg, compute=False, waves=1, seed=seed)
                    if got is not None:
                        rows.append(dict(subspace=sub, rank_fraction=rho, seed=seed) | got)
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["subspace", "rank_fraction", "seed"])

    def compute():
        bar = st.progress(0.0, text="Scores over the rank grid")
        table = sweep(S, [variant], SUBSPACES, [mode], SCORE_GRID, alpha=alpha, seeds=SEEDS, waves=1,
                      progress=lambda i, n, what: bar.progress(i / n, text=f"Scores over the rank grid: {what}"))
        bar.empty()
        return table

    return res.memoised(("grid", variant, mode, alpha), compute)


def grid_generation(variant: str, mode: str, alpha: float) -> pd.DataFrame:
    """Generation summaries already on disk for the grid points (never computed here)."""
    rows = []
    for sub in SUBSPACES:
        for rho in SCORE_GRID:
            got = S.generation_scores(variant, ProjectionConfig(sub, mode, rank_fraction=rho, alpha=alpha),
                                      GENERATION_TOKENS, compute=False)
            if got is not None:
                rows.append(dict(subspace=sub, rank_fraction=rho, **got[0]))
    return pd.DataFrame(rows)


def _errors(d: pd.DataFrame, key: str) -> dict:
    """Plotly error bars from a table's interval columns."""
    if f"{key}_lo" not in d:
        return {}
    return dict(error_y=dict(type="data", symmetric=False, array=d[f"{key}_hi"] - d[key],
                             arrayminus=d[key] - d[f"{key}_lo"], thickness=1, width=3))


def _band(add, d: pd.DataFrame, key: str, color: str, name: str, sub: str, r: int, c: int) -> None:
    """A random subspace's draws at each ρ: the mean over draws as a line, and the envelope of the draws' 95%
    intervals as a band."""
    x = sorted(set(d["rank_fraction"]))  # (plain Python: a pandas named aggregation costs ~20 ms a call here)
    at = [d["rank_fraction"].to_numpy() == rho for rho in x]
    g = {"mid": [d[key].to_numpy()[m].mean() for m in at], "lo": [d[f"{key}_lo"].to_numpy()[m].min() for m in at],
         "hi": [d[f"{key}_hi"].to_numpy()[m].max() for m in at]}
    add(x=x + x[::-1], y=list(g["hi"]) + list(g["lo"])[::-1], fill="toself", line_width=0,
                    fillcolor=color, opacity=0.15, hoverinfo="skip", legendgroup=sub, showlegend=False, row=r, col=c)
    add(x=x, y=g["mid"], mode="lines+markers", line_color=color, name=name, legendgroup=sub,
                    showlegend=False, row=r, col=c)


def score_figure(variant, cfg, point, start, ft, grid, curves, gen, point_gen) -> go.Figure:
    fig = make_subplots(rows=2, cols=4, subplot_titles=[TITLES[k] for k in PANELS], horizontal_spacing=0.06,
                        vertical_spacing=0.16)
    traces = []  # added at once at the end: one validation pass instead of one grid lookup per trace

    def add(row: int, col: int, **trace) -> None:
        i = (row - 1) * 4 + col
        traces.append(dict(type="scatter", xaxis=f"x{i if i > 1 else ''}", yaxis=f"y{i if i > 1 else ''}", **trace))

    x_now = cfg.rank_fraction if cfg.rank_fraction is not None else point["mean_rank_fraction"]
    shapes = []
    for i, key in enumerate(PANELS):
        r, c = i // 4 + 1, i % 4 + 1
        for sub in SUBSPACES:
            color, name = ui.SUBSPACE_COLORS[sub], SUBSPACE_LABELS[sub]
            if key in (N.ENERGY_KEPT, N.COS_TASK_KEPT):
                d = curves[curves["subspace"] == sub]
                add(x=d["rank_fraction"], y=d[key], mode="lines", line_color=color, name=name,
                                legendgroup=sub, showlegend=(i == 0), row=r, col=c)
            elif key == "generation":
                d = gen[gen["subspace"] == sub] if len(gen) else gen
                if len(d):
                    for metric, symbol in ((N.ATTACK_SUCCESS_RATE, "circle"), (N.EXACT_MATCH, "diamond")):
                        add(x=d["rank_fraction"], y=d[metric], mode="markers", **_errors(d, metric),
                                        marker=dict(color=color, symbol=symbol, size=8), name=f"{name} {metric}",
                                        legendgroup=sub, showlegend=False, row=r, col=c)
            elif key in grid.columns:  # the live scores of the grid points scored so far, with their intervals
                d = grid[grid["subspace"] == sub]
                if sub != "topk" and len(d):
                    _band(add, d, key, color, name, sub, r, c)
                    continue
                add(x=d["rank_fraction"], y=d[key], mode="lines+markers", line_color=color, name=name,
                                legendgroup=sub, showlegend=False, row=r, col=c, **_errors(d, key))
                p = f"{P_PREFIX}{key}"
                if p in d:  # Top-K differs from Random at this ρ (paired test, p < 0.05)
                    hit = d[d[p] < SIGNIFICANT]
                    add(x=hit["rank_fraction"], y=hit[key], mode="markers", name="Top-K ≠ Random",
                                    marker=dict(color=color, symbol="circle-open", size=16, line_width=2),
                                    legendgroup="p", showlegend=False, row=r, col=c)
        if key == "generation":
            fig.update_yaxes(range=[-0.05, 1.05], row=r, col=c)
            if point_gen is None and not len(gen):
                fig.add_annotation(text="run the generation scores<br>to fill this panel", showarrow=False,
                                   x=0.5, y=0.5, row=r, col=c, font_color="#888")
            if point_gen is not None:
                for metric, symbol in ((N.ATTACK_SUCCESS_RATE, "circle"), (N.EXACT_MATCH, "diamond")):
                    add(x=[x_now], y=[point_gen[metric]], mode="markers", name="this point",
                                    marker=dict(color="black", symbol=f"{symbol}-open", size=13, line_width=2),
                                    showlegend=False, row=r, col=c)
            continue
        add(x=[x_now], y=[point[key]], mode="markers", name="this point", legendgroup="now",
                        marker=dict(color="black", symbol="star", size=14), showlegend=(i == 0), row=r, col=c,
                        **_errors(pd.DataFrame([point]), key))
        if key in start:  # reference lines as plain shapes (add_hline costs ~10 ms each)
            ax = "" if i == 0 else str(i + 1)
            for y, color in ((start[key], "#2ca02c"), (ft[key], "#9467bd")):
                shapes.append(dict(type="line", xref=f"x{ax} domain", yref=f"y{ax}", x0=0, x1=1, y0=y, y1=y,
                                   line=dict(dash="dot", color=color, width=1.5)))
    fig.add_traces(traces)
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(range=[0, 1.02])
    fig.update_xaxes(title_text="rank fraction ρ", row=2)
    fig.update_layout(height=600, margin=dict(t=80, b=40, l=40, r=20), legend_orientation="h", legend_y=-0.14,
                      title=dict(text=f"{variant}, {cfg.mode}, α={cfg.alpha:g}  ·  bars and bands: 95% intervals "
                                      f"(Random: {SEEDS} draws)  ·  ring: Top-K ≠ Random (paired p < "
                                      f"{SIGNIFICANT})  ·  dotted: start (green), fine-tuned (purple)",
                                 font_size=12))
    return fig


@st.fragment
def point_section():
    variant_names = list(fam.variants)
    c = st.columns([1.2, 1.6, 1.6, 1.0])
    variant = ui.bound("variant", c[0].selectbox, "Fine-tuned variant", options=variant_names)
    ui.bound("subspace", c[1].radio, "Subspace", options=list(SUBSPACES), horizontal=True,
             format_func=SUBSPACE_LABELS.get)
    mode = ui.bound("mode", c[2].radio, "Mode", options=list(MODES), horizontal=True)
    rank_by = ui.bound("rank_by", c[3].radio, "Rank as", options=["fraction", "energy"], horizontal=True)
    c = st.columns([3, 2])
    rank, scale = PARAMS["rank"], PARAMS["alpha"]  # the ranges a link's values were checked against
    ui.bound("rank", c[0].slider, "rank fraction ρ" if rank_by == "fraction" else "energy fraction η",
             min_value=rank.lo, max_value=rank.hi, step=0.01,
             help="ρ: k = max(1, round(ρ·min(M, N))) per tensor; η: the smallest k whose singular values "
                  "hold η of ΔA's energy.")
    alpha = ui.bound("alpha", c[1].slider, "scale α", min_value=scale.lo, max_value=scale.hi, step=0.05,
                     help="W = W_start + α·X; α = 1 is the study's setting.")
    sharpen = st.toggle("Score more prompts while the slider rests", value=True, key="w_sharpen",
                        help="After the first wave, further waves of each evaluation set are scored one at a time "
                             "and the intervals narrow until the sets are exhausted; moving a slider stops it at the "
                             "next wave, and the waves done stay cached.")
    ui.publish_view()

    with ui.shown_errors(stop=True):
        cfg = ui.current_config()
        warnings = ui.engine(res, variant).warnings  # e.g. tensors whose alignment update is zero
        diag = S.diagnostics(variant, cfg)  # cumulative sums: instant

    for warning in warnings:
        st.warning(warning, icon="⚠️")

    # ---------------------------------------------------------------------------------------- read-outs
    st.markdown(f"**Read-outs at this point** · {variant}: {cfg.label} · mean rank fraction "
                f"{diag.mean_rank_fraction:.3f}")
    # three waves on screen before the next is computed: the diagnostics (cumulative sums), the scores that need
    # forward passes of the projected model, then the one that needs greedy decoding; then, while the slider
    # rests, more prompts (`sharpen`, at the end of this section)
    readouts = Readouts(S, fam.start, variant, variant, cfg, READOUTS, cfg.label)
    for i in range(len(READOUTS)):
        if i not in readouts.live:
            readouts.show(i, diag.summary())
    ev = S.sets
    with ui.shown_errors(stop=True):
        point = readouts.score()

    # ---------------------------------------------------------------------------------------- charts
    if st.session_state.get("run_generation"):  # the button below was clicked: score first, so the chart shows it
        with ui.shown_errors():
            bar = st.progress(0.0, text="Generation scores")
            S.generation_scores(fam.start, None, GENERATION_TOKENS, progress=ui.progress_callback(bar, fam.start))
            S.generation_scores(variant, cfg, GENERATION_TOKENS, progress=ui.progress_callback(bar, "this point"))
            bar.empty()
    base_gen = S.generation_scores(fam.start, None, GENERATION_TOKENS, compute=False)
    point_gen = None
    with ui.shown_errors():
        cheap = S.waves.size >= FULL_LIVE_PROMPTS  # a GPU or a small model (compute.live_prompts)
        score_grid = st.toggle("Score the whole rank grid for the chart", value=cheap, key="w_score_grid",
                               help=f"{len(SUBSPACES) * len(SCORE_GRID)} points (3 subspaces x ρ in "
                                    f"{', '.join(map(str, SCORE_GRID))}), each a read-out like the one above; on "
                                    "by default where read-outs are cheap. Off: the chart shows the points already "
                                    "scored.")
        grid = grid_scores(variant, mode, float(alpha), score_grid)
        curves = res.memoised(("curves", variant, mode), lambda: S.curves(variant, modes=(mode,)))
        gen = grid_generation(variant, mode, float(alpha))
        point_gen = S.generation_scores(variant, cfg, GENERATION_TOKENS, compute=False)
        start, ft, _ = readouts.references[point["waves"]]
        fig = score_figure(variant, cfg, point, start, ft, grid, curves, gen,
                           None if point_gen is None else point_gen[0])
        ui.chart(fig, f"{fam.name}_{variant}_{mode}_scores", key="scores_chart")
        ui.csv_download(grid, f"{fam.name}_{variant}_{mode}_grid_scores", label="Download grid scores (CSV)")

    left, right = st.columns(2)
    blocks = diag.grouped("block")
    blocks["block"] = blocks["block"].map(lambda b: "other" if pd.isna(b) else str(int(b)))
    modules = diag.grouped("module")
    for col, g, by in ((left, blocks, "block"), (right, modules, "module")):
        with col:
            f = go.Figure()
            f.add_bar(x=g[by], y=g["removed_energy"], name="removed", marker_color="#d62728")
            f.add_bar(x=g[by], y=g["kept_energy"], name="kept", marker_color="#1f77b4")
            f.update_layout(barmode="stack", title=f"Task-update energy removed and kept per {by}", height=340,
                            xaxis_title=by, xaxis_type="category", yaxis_title="‖·‖² (sum of squares)",
                            margin=dict(t=40, b=40), legend_orientation="h")
            ui.chart(f, f"{fam.name}_{variant}_energy_per_{by}", key=f"energy_{by}")
    ui.csv_download(diag.per_tensor, f"{fam.name}_{variant}_per_tensor", label="Download per-tensor diagnostics (CSV)")

    # ---------------------------------------------------------------------------------------- generation
    st.subheader("Generation scores at this point")
    st.caption(f"Greedy completions ({GENERATION_TOKENS} new tokens) on the whole evaluation sets ({len(ev.harmful)} "
               f"harmful, {len(ev.utility)} utility, {len(ev.edgy)} edgy prompts): refusal matching on harmful prompts "
               "(attack success rate = 1 − refusal rate), exact match of the final answer "
               f"({ev.convention} convention) on utility prompts, refusal rate on edgy benign prompts; each with its "
               "95% interval. Cached on disk; shown on the chart once computed.")
    st.button("Run generation scores at this point", key="run_generation", type="primary",
              disabled=point_gen is not None and base_gen is not None)
    if point_gen is not None:
        summary, table = point_gen
        cols = st.columns(4)
        for col, key in zip(cols, N.GENERATION[:4]):
            label, color, est = N.label(key), DELTA_COLOR[N.score(key).better], Estimate.of(summary, key)
            ref = None if base_gen is None else base_gen[0][key]
            col.metric(label, est.value_text(), delta=None if ref is None else float(f"{summary[key] - ref:.2g}"),
                       delta_color=color, delta_description="vs start", border=True)
            col.caption(est.text())
        st.dataframe(table, hide_index=True, width="stretch", height=320)
        ui.csv_download(table, f"{fam.name}_{variant}_generation_{cfg.subspace}_{cfg.mode}", key="csv_generation")
    else:
        st.info("Not computed yet for this point.", icon="ℹ️")

    # ---------------------------------------------------------------------------------------- sharpening
    # while the slider rests: first the cold paths of the next moves (once per variant), then one more wave of
    # prompts at a time, the read-outs redrawn with narrower intervals; a move reruns this section, which stops this
    # loop at its next Streamlit call, i.e. at a wave's boundary
    with ui.shown_errors():
        S.warm(variant, cfg)
    if sharpen:
        point = readouts.sharpen(point)


point_section()
