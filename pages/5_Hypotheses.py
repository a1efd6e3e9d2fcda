"""Hypotheses: the field's competing safety-subspace hypotheses on the same family, side by side (issue 18): the
refusal direction (Arditi et al. 2024) and its interventions, SafeLoRA (Hsu et al. 2024), the bridge between them
and the study's subspaces, and the harm-utility trade-off of every method over its knob."""
import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import ui
from safesub_core.hypotheses import (DIRECTION_METHODS, METHOD_LABELS, MethodPoint, TradeoffGrid, matched_utility,
                                     tradeoff)
from safesub_core.refusal import INDUCE_MIN, KL_MAX, MAX_LAYER_FRAC
from safesub_core.stats import Estimate
from ui.link import PARAMS
from ui.readouts import LIVE_SPECS, Readouts

ui.header("Hypotheses",
          "Three answers to \"is there a safety subspace?\" on one family, one set of prompts and one set of scores: "
          "the study's Top-K alignment subspace (Subspaces page), the refusal direction of Arditi et al. (2024) and "
          "SafeLoRA's per-layer projection (Hsu et al. 2024).")
fam, res = ui.require_family()  # and its caption
S, v = res.session, ui.view()
MODULE_COLORS = dict(zip(("embed", "q", "k", "v", "o", "gate", "up", "down", "lm"), ui.PALETTE + ["#7f7f7f"]))
REFERENCE_STYLE = {"start": ("#2ca02c", "star"), "variant": ("#9467bd", "diamond")}

# -------------------------------------------------------------------------------------------- controls
if v.get("variant") not in fam.variants:
    v["variant"] = ui.default_harmful_variant(fam)
variant = ui.bound("variant", st.selectbox, "Fine-tuned variant (the model the methods act on)",
                   options=list(fam.variants))
sharpen = st.toggle("Score more prompts while the sliders rest", value=True, key="w_hyp_sharpen",
                    help="After the first wave, further waves of each evaluation set are scored one at a time and the "
                         "read-outs' intervals narrow; moving a slider stops it at the next wave (the waves done stay "
                         "cached).")


def est(row, name: str) -> str:
    """'value [lo, hi] n=N' of a table row's estimate `name`."""
    return Estimate(float(row[name]), float(row[f"{name}_lo"]), float(row[f"{name}_hi"]), int(row[f"{name}_n"])).text()


def interval(g: pd.DataFrame, name: str, color: str) -> dict:
    """Plotly error bars of a table's estimate `name` (its _lo and _hi columns)."""
    return dict(type="data", symmetric=False, array=g[f"{name}_hi"] - g[name], arrayminus=g[name] - g[f"{name}_lo"],
                thickness=1, width=2, color=color)


# -------------------------------------------------------------------------------------------- refusal direction
st.subheader("Refusal direction (Arditi et al. 2024)")
st.caption("Per stream point l and post-instruction position i, r = mean activation on harmful prompts − mean on "
           "harmless prompts (fit prompts). Each candidate is scored on the validation prompts: bypass = mean refusal "
           "score of harmful prompts with r ablated (lower is better), induce = of harmless prompts with r added "
           f"(must be > {INDUCE_MIN:g}), KL = harmless next-token KL under ablation (must be < {KL_MAX:g}), and only "
           f"l < {MAX_LAYER_FRAC:g} L is eligible; the lowest bypass that passes is chosen.")
sel = None
with ui.shown_errors():
    prompts = S.direction_prompts

    def select():
        bar = st.progress(0.0, text="Refusal direction")
        got = S.refusal_selection(progress=ui.progress_callback(bar, "Refusal direction: candidates scored"))
        bar.empty()
        return got

    sel = res.memoised(("refusal_selection", fam.start), select)
if sel is not None:
    table, L = sel.table, S.n_layers
    n_val = dict(zip(prompts.describe()["part"], prompts.describe()["n"]))
    left, right = st.columns([1.3, 2.4])
    with left:
        st.markdown("**Direction prompts** (train splits; no evaluation prompt picks the direction)")
        st.dataframe(prompts.describe(), hide_index=True, width="stretch")
        if prompts.note:
            st.caption(prompts.note)
        st.markdown(f"**Chosen: layer {sel.layer}** of {L} (depth {sel.layer / L:.2f}), **position {sel.position}**"
                    f" · bypass {sel.bypass:.3g} (no ablation {sel.baseline_harmful:.3g}) · induce {sel.induce:.3g} "
                    f"(no addition {sel.baseline_harmless:.3g}) · KL {sel.kl:.3g}")
        st.caption(" ".join([f"Means over the validation prompts (n={n_val['val_harmful']} harmful, "
                             f"n={n_val['val_harmless']} harmless); the selection's scores carry no interval."]
                            + (["It passes every filter."] if sel.passed else [])
                            + ([sel.note[:1].upper() + sel.note[1:] + "."] if sel.note else [])))
    with right:
        scored = table[table["bypass"].notna()]
        fig = make_subplots(rows=1, cols=3, subplot_titles=["bypass (harmful, r ablated) ↓",
                                                            f"induce (harmless, r added) > {INDUCE_MIN:g}",
                                                            f"KL (harmless, r ablated) < {KL_MAX:g}"],
                            horizontal_spacing=0.08)
        for j, (pos, d) in enumerate(scored.groupby("position")):
            for c, key in enumerate(("bypass", "induce", "kl")):
                fig.add_scatter(x=d["layer"], y=d[key], mode="markers", name=f"position {pos}", legendgroup=str(pos),
                                showlegend=(c == 0), marker=dict(color=ui.PALETTE[(j + 1) % len(ui.PALETTE)], size=9,
                                                                 symbol=["circle" if p else "circle-open"
                                                                         for p in d["passed"]]),
                                customdata=d[["position", "bypass", "induce", "kl"]],
                                hovertemplate="layer %{x}, position %{customdata[0]}<br>bypass %{customdata[1]:.3g}"
                                              "<br>induce %{customdata[2]:.3g}<br>KL %{customdata[3]:.3g}"
                                              "<extra></extra>", row=1, col=c + 1)
        chosen = table[table["chosen"]]
        for c, key in enumerate(("bypass", "induce", "kl")):
            fig.add_scatter(x=chosen["layer"], y=chosen[key], mode="markers", name="chosen", legendgroup="chosen",
                            showlegend=(c == 0), marker=dict(color="black", symbol="star", size=16), row=1, col=c + 1)
            fig.add_vrect(x0=MAX_LAYER_FRAC * L, x1=L + 0.5, fillcolor="#888", opacity=0.15, line_width=0,
                          row=1, col=c + 1)
        fig.add_hline(y=sel.baseline_harmful, line=dict(dash="dot", color="#9467bd"), row=1, col=1,
                      annotation_text="no ablation", annotation_font_size=10)
        fig.add_hline(y=INDUCE_MIN, line=dict(dash="dash", color="#d62728"), row=1, col=2)
        fig.add_hline(y=sel.baseline_harmless, line=dict(dash="dot", color="#9467bd"), row=1, col=2,
                      annotation_text="no addition", annotation_font_size=10)
        fig.add_hline(y=KL_MAX, line=dict(dash="dash", color="#d62728"), row=1, col=3)
        if (scored["kl"] > 0).all() and len(scored):
            fig.update_yaxes(type="log", dtick=1, row=1, col=3)  # a tick per decade
        fig.update_xaxes(title_text="layer l", range=[-0.5, L + 0.5], dtick=max(1, L // 10))
        fig.update_layout(height=360, margin=dict(t=70, b=40, l=40, r=20), legend_orientation="h", legend_y=-0.22,
                          title=dict(text=f"Candidates scored ({len(scored)} of {len(table)}) · filled: passes every "
                                          f"filter · shaded: l ≥ {MAX_LAYER_FRAC:g} L (not eligible) · dashed: the "
                                          "filters", font_size=12))
        ui.chart(fig, f"{fam.name}_{fam.start}_refusal_selection", key="selection_chart")
    with st.expander(f"Selection table ({len(table)} candidates)"):
        st.dataframe(table, hide_index=True, width="stretch", height=300)
        ui.csv_download(table, f"{fam.name}_{fam.start}_refusal_selection", label="Download the selection (CSV)")

# -------------------------------------------------------------------------------------------- interventions
st.subheader("Interventions on the refusal direction")
c = st.columns([2.6, 1.6, 3])
intervention = ui.bound("intervention", c[0].radio, "Intervention", options=list(DIRECTION_METHODS),
                        horizontal=True, format_func=METHOD_LABELS.get)
target_kind = ui.bound("target", c[1].radio, "Acting on", options=["variant", "start"], horizontal=True,
                       format_func=lambda t: variant if t == "variant" else f"{fam.start} (start)")
if intervention == "addition":
    knob = PARAMS["add_alpha"]
    value = ui.bound("add_alpha", c[2].slider, "alpha α (x ← x + α r at the direction's layer)", min_value=knob.lo,
                     max_value=knob.hi, step=0.1)
else:
    knob = PARAMS["strength"]
    value = ui.bound("strength", c[2].slider, "strength s (x ← x − s r rᵀ x)", min_value=knob.lo, max_value=knob.hi,
                     step=0.1, help="1: the paper's removal of r (ablation at every layer and position, or written "
                                    "into every matrix that writes to the residual stream); 0: nothing; negative: "
                                    "r amplified (−1 doubles it).")
ui.publish_view()
target = variant if target_kind == "variant" else fam.start
methods = []  # (read-outs, scores): sharpened at the end of the page
with ui.shown_errors():
    point = MethodPoint(intervention, round(float(value), 4))
    st.markdown(f"**Read-outs** · {target}: {point.label}")
    readouts = Readouts(S, fam.start, variant, target, point, LIVE_SPECS, point.label, columns=len(LIVE_SPECS))
    methods.append((readouts, readouts.score()))

# -------------------------------------------------------------------------------------------- SafeLoRA
st.subheader("SafeLoRA (Hsu et al. 2024)")
st.caption("Per matrix, V = W_aligned − W_base and C = V Vᵀ / ‖V‖_F; the fine-tuning update ΔW is replaced by C ΔW "
           "where the similarity ⟨ΔW, C ΔW⟩_F / (‖ΔW‖_F ‖C ΔW‖_F) is below τ.")
knob = PARAMS["tau"]
tau = ui.bound("tau", st.slider, "threshold τ", min_value=knob.lo, max_value=knob.hi, step=0.05,
               help="0: the variant itself; above every similarity: every matrix projected.")
ui.publish_view()
with ui.shown_errors():
    def similarities():
        bar = st.progress(0.0, text="SafeLoRA similarities")
        got = S.safelora_table(variant, progress=ui.progress_callback(bar, "SafeLoRA similarities"))
        bar.empty()
        return got

    res.memoised(("safelora_table", variant), similarities)
    plan = S.safelora_plan(variant, float(tau))
    frame, summary = plan.frame(), plan.summary()
    d = frame[frame["in_plan"]].copy()
    d["x"] = d["block"].astype("Float64").fillna(-1).astype(float)
    kinds = list(dict.fromkeys(d["module"]))
    left, right = st.columns([2.4, 1])
    with left:
        fig = go.Figure()
        for j, kind in enumerate(kinds):
            g = d[d["module"] == kind]
            x = g["x"] + (j - (len(kinds) - 1) / 2) * 0.6 / max(1, len(kinds))  # side by side within a block
            fig.add_scatter(x=x, y=g["similarity"], mode="markers", name=kind,
                            marker=dict(color=MODULE_COLORS.get(kind, "#333"), size=10,
                                        symbol=["x" if p else "circle" for p in g["projected"]]),
                            customdata=g[["tensor", "projected"]],
                            hovertemplate="%{customdata[0]}<br>similarity %{y:.3f}<br>projected: %{customdata[1]}"
                                          "<extra></extra>")
        fig.add_hline(y=float(tau), line=dict(dash="dash", color="#d62728"), annotation_text=f"τ = {tau:g}")
        blocks = sorted(set(d["x"]))
        fig.update_xaxes(tickvals=blocks, ticktext=["emb/head" if b < 0 else str(int(b)) for b in blocks],
                         title_text="block")
        fig.update_layout(height=360, yaxis_title="similarity", margin=dict(t=50, b=40, l=40, r=20),
                          title=dict(text=f"{variant}: SafeLoRA similarity per matrix · ✕: projected at τ = {tau:g}",
                                     font_size=12))
        ui.chart(fig, f"{fam.name}_{variant}_safelora_tau{tau:g}", key="safelora_chart")
    with right:
        st.metric("share of matrices projected", f"{summary['share_projected']:.2f}", border=True)
        st.caption(f"{summary['n_projected']} of {summary['n_tensors']} matrices (exact counts)")
        st.metric("energy kept", f"{summary['energy_kept']:.4f}", border=True)
        st.metric("cos(task, kept)", f"{summary['cos_task_kept']:.4f}", border=True)
        st.caption("Energy kept ‖kept‖² / ‖ΔT‖² and cos(ΔT, kept) over every matrix: properties of the weights, "
                   "no interval.")
        ui.csv_download(frame, f"{fam.name}_{variant}_safelora_tau{tau:g}", label="Download similarities (CSV)")
    point = MethodPoint("safelora", float(tau))
    st.markdown(f"**Read-outs** · {variant}: {point.label}")
    readouts = Readouts(S, fam.start, variant, variant, point, LIVE_SPECS, point.label, columns=len(LIVE_SPECS))
    methods.append((readouts, readouts.score()))

# -------------------------------------------------------------------------------------------- the bridge
st.subheader("The bridge: the refusal direction in the study's subspaces")
if sel is not None:
    with ui.shown_errors():
        bridge = res.memoised(("bridge", variant), lambda: S.bridge_table(variant))
        shift = res.memoised(("shift", variant), lambda: S.shift_table(variant))
        left, right = st.columns(2)
        with left:
            fig = go.Figure()
            for (kind, tensor), g in bridge.groupby(["module", "tensor"], sort=False):
                first = tensor == bridge.loc[bridge["module"] == kind, "tensor"].iloc[0]
                fig.add_scatter(x=g["k"], y=g["captured"], mode="lines", name=f"{kind}_proj", legendgroup=kind,
                                showlegend=bool(first), line=dict(color=MODULE_COLORS.get(kind, "#333"), width=1.5),
                                opacity=0.7, hovertemplate=f"{tensor}<br>k=%{{x}}: %{{y:.3f}}<extra></extra>")
            base = bridge.drop_duplicates("k").sort_values("k")
            fig.add_scatter(x=base["k"], y=base["baseline"], mode="lines", name="random k/D",
                            line=dict(color="black", dash="dash", width=1.5))
            fig.update_layout(height=380, xaxis_title="rank k of the Top-K alignment subspace",
                              yaxis_title="‖U_kᵀ r‖²", yaxis_range=[0, 1.02], margin=dict(t=50, b=40, l=40, r=20),
                              title=dict(text=f"Share of r (layer {sel.layer}) in each stream writer's Top-K "
                                              f"subspace ({variant})", font_size=12))
            ui.chart(fig, f"{fam.name}_{variant}_bridge", key="bridge_chart")
            ui.csv_download(bridge, f"{fam.name}_{variant}_bridge", label="Download the bridge (CSV)")
        with right:
            fig = go.Figure()
            fig.add_bar(x=shift["layer"], y=shift["share"], name="share along r", marker_color="#1f77b4",
                        customdata=shift[["shift_norm", "along"]],
                        hovertemplate="layer %{x}: share %{y:.3f}<br>‖shift‖ %{customdata[0]:.3g}, along r "
                                      "%{customdata[1]:.3g}<extra></extra>")
            fig.add_scatter(x=shift["layer"], y=shift["baseline"], mode="lines", name="random 1/D",
                            line=dict(color="black", dash="dash", width=1.5))
            fig.update_layout(height=380, xaxis_title="stream point l", yaxis_title="share of the shift along r",
                              yaxis_range=[0, 1.02], margin=dict(t=50, b=40, l=40, r=20),
                              xaxis=dict(dtick=max(1, len(shift) // 10)), legend=dict(x=0.01, y=0.98),
                              title=dict(text=f"{variant}'s activation shift from {fam.start} along r, per layer",
                                         font_size=12))
            ui.chart(fig, f"{fam.name}_{variant}_shift_along_r", key="shift_chart")
            ui.csv_download(shift, f"{fam.name}_{variant}_shift_along_r", label="Download the shifts (CSV)")
        st.caption(f"Left: ‖U_kᵀ r̂‖² of the unit refusal direction in the span of the top k left singular vectors of "
                   f"each o_proj and down_proj's alignment update (a random k-dimensional subspace holds k/D). Right: "
                   f"the mean last-token shift of {variant} from {fam.start} on the {len(S.sets.harmful)} harmful "
                   f"evaluation prompts ({S.sets.harmful.name}), the share of its squared norm along each layer's "
                   "candidate at the last position (random: 1/D). Exact computations, no interval.")
else:
    st.info("Needs the refusal direction (above).", icon="ℹ️")

# -------------------------------------------------------------------------------------------- the trade-off
st.subheader("Harm-utility trade-off of every method over its knob")
grid = TradeoffGrid(seeds=(0,))
n_points = len(grid.points()) + 2
st.caption(f"Harm: live share of harmful prompts predicted to comply; utility: live exact match; one wave each, with "
           f"95% intervals ({n_points} points on {variant}: Top-K and Random over the rank fraction in orthogonal "
           f"mode, SafeLoRA over τ, ablation and orthogonalisation over the strength). Random uses one draw here; the "
           "CLI draws three.")
key = ("tradeoff", ui.family_spec(), variant)
if st.button("Compute the trade-off", key="tradeoff_button", type="primary", disabled=key in st.session_state):
    with ui.shown_errors():
        bar = st.progress(0.0, text="Trade-off")
        st.session_state[key] = tradeoff(S, variant, grid, waves=1, progress=ui.progress_callback(bar, "Trade-off"))
        bar.empty()
trade = st.session_state.get(key)
if trade is not None:
    fig = go.Figure()
    for j, (label, g) in enumerate(trade[trade["kind"] != "checkpoint"].groupby("method", sort=False)):
        g, color = g.sort_values("value"), ui.PALETTE[j % len(ui.PALETTE)]
        fig.add_scatter(x=g["utility"], y=g["harm"], mode="lines+markers", name=label, line_color=color,
                        error_x=interval(g, "utility", color + "66"), error_y=interval(g, "harm", color + "66"),
                        customdata=g[["knob", "value", "harm_n", "utility_n"]],
                        hovertemplate=f"{label}, %{{customdata[0]}} = %{{customdata[1]:.3g}}<br>harm %{{y:.3f}} "
                                      f"(n=%{{customdata[2]}})<br>utility %{{x:.3f}} (n=%{{customdata[3]}})"
                                      "<extra></extra>")
    for role, name in (("start", fam.start), ("variant", variant)):
        g = trade[(trade["kind"] == "checkpoint") & (trade["method_id"] == name)]
        color, symbol = REFERENCE_STYLE[role]
        fig.add_scatter(x=g["utility"], y=g["harm"], mode="markers", name=f"{name} ({role})",
                        marker=dict(color=color, symbol=symbol, size=16, line=dict(color="black", width=1)),
                        error_x=interval(g, "utility", color), error_y=interval(g, "harm", color),
                        customdata=g[["harm_n", "utility_n"]],
                        hovertemplate=f"{name}<br>harm %{{y:.3f}} (n=%{{customdata[0]}})<br>utility %{{x:.3f}} "
                                      "(n=%{customdata[1]})<extra></extra>")
    fig.update_layout(height=480, xaxis_title="utility: exact match (higher is better)",
                      yaxis_title="harm: share of harmful prompts predicted to comply", yaxis_range=[-0.03, 1.03],
                      margin=dict(t=50, b=40, l=40, r=20),
                      title=dict(text=f"{variant}: harm against utility · bars: 95% intervals · hover: the knob and n",
                                 font_size=12))
    ui.chart(fig, f"{fam.name}_{variant}_tradeoff", key="tradeoff_chart")
    ui.csv_download(trade, f"{fam.name}_{variant}_tradeoff", label="Download the trade-off (CSV)")
    with ui.shown_errors():
        matched = matched_utility(S, variant, trade)
        st.markdown(f"**At matched utility** (exact match at least {variant}'s less 0.05): each method's lowest-harm "
                    "point, tested against the best on the same harmful prompts (McNemar)")
        shown = pd.DataFrame(dict(
            method=matched["method"], knob=matched["knob"], value=matched["value"],
            harm=[est(r, "harm") for _, r in matched.iterrows()],
            utility=[est(r, "utility") for _, r in matched.iterrows()],
            p_vs_best=["" if math.isnan(p) else f"{p:.2g}" for p in matched["p_vs_best"]],
            verdict=matched["verdict"]))
        st.dataframe(shown, hide_index=True, width="stretch")
        ui.csv_download(matched, f"{fam.name}_{variant}_matched_utility", label="Download the matched table (CSV)")
else:
    st.info(f"Not computed yet for {variant} (about {n_points} read-outs of one wave; cached on disk).", icon="ℹ️")

# -------------------------------------------------------------------------------------------- sharpening
# while the sliders rest: one more wave of prompts at a time for each method point above, its read-outs redrawn
if sharpen:
    for readouts, scores in methods:
        readouts.sharpen(scores)
