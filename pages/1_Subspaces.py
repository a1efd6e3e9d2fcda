"""Subspaces: project a fine-tuning update onto the alignment subspace and watch the scores follow the sliders."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import ui
from safesub_core.compute import FULL_LIVE_PROMPTS
from safesub_core.scoring import names as N
from safesub_core.scoring.live import LIVE_ARITH_TOKENS
from safesub_core.session import GENERATION_TOKENS
from safesub_core.projection import MODES, SUBSPACE_LABELS, SUBSPACES, ProjectionConfig
from ui.link import PARAMS

ui.header("Subspaces",
          "W = W_start + α·X with X = P_k ΔT (parallel), −P_k ΔT (opposite) or ΔT − P_k ΔT "
          "(orthogonal), P_k the projector on a rank-k subspace of the alignment update ΔA = W_start −"
          " W_base.")
fam, res = ui.require_family()  # and its caption
S = res.session
SCORE_GRID = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)  # rank fractions of the chart's grid

# each read-out: its score key and the values of the start and of the fine-tuned model ("live": their own scores)
READOUTS = [(N.ENERGY_KEPT, 0.0, 1.0), (N.COS_TASK_KEPT, None, 1.0), (N.COS_TASK_ALIGN, None, None)] + [
    (key, "live", "live") for key in N.LIVE]
DELTA_COLOR = {"higher": "normal", "lower": "inverse", None: "off"}  # st.metric's colour: is up good?
PANELS = [N.ENERGY_KEPT, N.COS_TASK_KEPT, *N.LIVE, "generation"]
TITLES = {k: N.label(k) for k in PANELS[:-1]} | {"generation": "generation: ASR ● / exact match ◆"}


def grid_scores(variant: str, mode: str, alpha: float, score: bool) -> pd.DataFrame:
    """Live scores over SCORE_GRID for the three subspaces: computed when `score` (disk-cached points; a progress
    bar meanwhile), else only the points already on disk."""
    points = [(sub, rho) for sub in SUBSPACES for rho in SCORE_GRID]
    if not score:
        got = [S.point_scores(variant, ProjectionConfig(sub, mode, rank_fraction=rho, alpha=alpha), compute=False)
               for sub, rho in points]
        return pd.DataFrame([g for g in got if g is not None], columns=["subspace", "rank_fraction"])

    def compute():
        rows, bar = [], st.progress(0.0, text="Scores over the rank grid")
        for i, (sub, rho) in enumerate(points):
            cfg = ProjectionConfig(sub, mode, rank_fraction=rho, alpha=alpha)
            rows.append(S.point_scores(variant, cfg))
            bar.progress((i + 1) / len(points), text=f"Scores over the rank grid: {SUBSPACE_LABELS[sub]} ρ={rho}")
        bar.empty()
        return pd.DataFrame(rows)

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


def score_figure(variant, cfg, point, start, ft, grid, curves, gen, point_gen) -> go.Figure:
    fig = make_subplots(rows=2, cols=4, subplot_titles=[TITLES[k] for k in PANELS], horizontal_spacing=0.06,
                        vertical_spacing=0.16)
    x_now = cfg.rank_fraction if cfg.rank_fraction is not None else point["mean_rank_fraction"]
    shapes = []
    for i, key in enumerate(PANELS):
        r, c = i // 4 + 1, i % 4 + 1
        for sub in SUBSPACES:
            color, name = ui.SUBSPACE_COLORS[sub], SUBSPACE_LABELS[sub]
            if key in (N.ENERGY_KEPT, N.COS_TASK_KEPT):
                d = curves[curves["subspace"] == sub]
                fig.add_scatter(x=d["rank_fraction"], y=d[key], mode="lines", line_color=color, name=name,
                                legendgroup=sub, showlegend=(i == 0), row=r, col=c)
            elif key == "generation":
                d = gen[gen["subspace"] == sub] if len(gen) else gen
                if len(d):
                    fig.add_scatter(x=d["rank_fraction"], y=d[N.ATTACK_SUCCESS_RATE], mode="markers",
                                    marker=dict(color=color, symbol="circle", size=8), name=f"{name} ASR",
                                    legendgroup=sub, showlegend=False, row=r, col=c)
                    fig.add_scatter(x=d["rank_fraction"], y=d[N.EXACT_MATCH], mode="markers",
                                    marker=dict(color=color, symbol="diamond", size=8), name=f"{name} EM",
                                    legendgroup=sub, showlegend=False, row=r, col=c)
            elif key in grid.columns:  # the live scores of the grid points scored so far
                d = grid[grid["subspace"] == sub]
                fig.add_scatter(x=d["rank_fraction"], y=d[key], mode="lines+markers", line_color=color, name=name,
                                legendgroup=sub, showlegend=False, row=r, col=c)
        if key == "generation":
            fig.update_yaxes(range=[-0.05, 1.05], row=r, col=c)
            if point_gen is None and not len(gen):
                fig.add_annotation(text="run the generation scores<br>to fill this panel", showarrow=False,
                                   x=0.5, y=0.5, row=r, col=c, font_color="#888")
            if point_gen is not None:
                for metric, symbol in ((N.ATTACK_SUCCESS_RATE, "circle"), (N.EXACT_MATCH, "diamond")):
                    fig.add_scatter(x=[x_now], y=[point_gen[metric]], mode="markers", name="this point",
                                    marker=dict(color="black", symbol=f"{symbol}-open", size=13, line_width=2),
                                    showlegend=False, row=r, col=c)
            continue
        fig.add_scatter(x=[x_now], y=[point[key]], mode="markers", name="this point", legendgroup="now",
                        marker=dict(color="black", symbol="star", size=14), showlegend=(i == 0), row=r, col=c)
        if key in start:  # reference lines as plain shapes (add_hline costs ~10 ms each)
            ax = "" if i == 0 else str(i + 1)
            for y, color in ((start[key], "#2ca02c"), (ft[key], "#9467bd")):
                shapes.append(dict(type="line", xref=f"x{ax} domain", yref=f"y{ax}", x0=0, x1=1, y0=y, y1=y,
                                   line=dict(dash="dot", color=color, width=1.5)))
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(range=[0, 1.02])
    fig.update_xaxes(title_text="rank fraction ρ", row=2)
    fig.update_layout(height=600, margin=dict(t=80, b=40, l=40, r=20), legend_orientation="h", legend_y=-0.14,
                      title=dict(text=f"{variant}, {cfg.mode}, α={cfg.alpha:g}  ·  dotted: start (green), "
                                      f"fine-tuned (purple)", font_size=13))
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
    ui.publish_view()

    with ui.shown_errors(stop=True):
        cfg = ui.current_config()
        warnings = ui.engine(res, variant).warnings  # e.g. tensors whose alignment update is zero
        diag = S.diagnostics(variant, cfg)  # cumulative sums: instant
        start = S.checkpoint_scores(fam.start)  # cached after the first visit
        ft = S.checkpoint_scores(variant)

    for warning in warnings:
        st.warning(warning, icon="⚠️")

    # ---------------------------------------------------------------------------------------- read-outs
    st.markdown(f"**Read-outs at this point** · {variant}: {cfg.label} · mean rank fraction "
                f"{diag.mean_rank_fraction:.3f}")
    cols = st.columns(4)

    def readout(i: int, point: dict) -> None:
        key, s_val, f_val = READOUTS[i]
        label, color = N.label(key), DELTA_COLOR[N.score(key).better]
        s_val = start[key] if s_val == "live" else s_val
        f_val = ft[key] if f_val == "live" else f_val
        value = point[key]
        with cols[i % 4]:
            st.metric(label, f"{value:.4f}", delta=None if s_val is None else round(value - s_val, 4),
                      delta_color=color, delta_description=None if s_val is None else "vs start", border=True)
            notes = []
            if s_val is not None:
                notes.append(f"start ({fam.start}) {s_val:.4f}")
            if f_val is not None:
                notes.append(f"{variant} {f_val:.4f}")
            st.caption(" · ".join(notes) if notes else "a property of the variant")

    # three waves, each on screen before the next is computed: the diagnostics (cumulative sums), the scores that
    # need forward passes of the projected model, then the one that needs greedy decoding
    decoded = [i for i, r in enumerate(READOUTS) if r[0] in N.LIVE_DECODED]
    forward = [i for i, r in enumerate(READOUTS) if r[0] in N.LIVE_FORWARD]
    for i in range(len(READOUTS)):
        if i not in forward + decoded:
            readout(i, diag.summary())
    with ui.shown_errors(stop=True):
        point = S.point_scores(variant, cfg, decoded=False)
    for i in forward:
        readout(i, point)
    ev = S.sets
    st.caption(f"Live scores at {cfg.label}: log-prob margin on {len(ev.harmful)} harmful prompts, NLL on "
               f"{len(ev.utility)} arithmetic prompts, KL to the start model on {len(ev.benign)} benign prompts "
               "(evaluation splits).")
    with ui.shown_errors(stop=True):
        point = S.point_scores(variant, cfg)
    for i in decoded:
        readout(i, point)
    st.caption(f"Exact match at {cfg.label}: {LIVE_ARITH_TOKENS}-token greedy answers to the {len(ev.utility)} "
               "arithmetic prompts.")

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
        cheap = len(S.sets.harmful) >= FULL_LIVE_PROMPTS  # a GPU or a small model (session.live_prompts)
        score_grid = st.toggle("Score the whole rank grid for the chart", value=cheap, key="w_score_grid",
                               help=f"{len(SUBSPACES) * len(SCORE_GRID)} points (3 subspaces x ρ in "
                                    f"{', '.join(map(str, SCORE_GRID))}), each a read-out like the one above; on "
                                    "by default where read-outs are cheap. Off: the chart shows the points already "
                                    "scored.")
        grid = grid_scores(variant, mode, float(alpha), score_grid)
        curves = res.memoised(("curves", variant, mode), lambda: S.curves(variant, modes=(mode,)))
        gen = grid_generation(variant, mode, float(alpha))
        point_gen = S.generation_scores(variant, cfg, GENERATION_TOKENS, compute=False)
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
    st.caption(f"Greedy completions ({GENERATION_TOKENS} new tokens) on the evaluation splits, the live read-outs' "
               f"sets ({len(ev.harmful)} harmful, {len(ev.utility)} arithmetic, {len(ev.edgy)} edgy prompts): refusal "
               "matching on harmful prompts (attack success rate = 1 − refusal rate), final-number exact match on "
               "arithmetic, refusal rate on edgy benign prompts. Cached on disk; shown on the chart once computed.")
    st.button("Run generation scores at this point", key="run_generation", type="primary",
              disabled=point_gen is not None and base_gen is not None)
    if point_gen is not None:
        summary, table = point_gen
        cols = st.columns(4)
        for col, key in zip(cols, N.GENERATION[:4]):
            label, color = N.label(key), DELTA_COLOR[N.score(key).better]
            ref = None if base_gen is None else base_gen[0][key]
            col.metric(label, f"{summary[key]:.3f}", delta=None if ref is None else round(summary[key] - ref, 3),
                       delta_color=color, delta_description="vs start", border=True)
        st.dataframe(table, hide_index=True, width="stretch", height=320)
        ui.csv_download(table, f"{fam.name}_{variant}_generation_{cfg.subspace}_{cfg.mode}", key="csv_generation")
    else:
        st.info("Not computed yet for this point.", icon="ℹ️")


point_section()
