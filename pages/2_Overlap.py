"""Overlap: mode subspace overlap (MSO) of the updates in weight space, and of prompt sets in activation space."""
import itertools

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import ui
from safesub_core.activations import DEPTH_BAND
from safesub_core.linalg import DEFAULT_ENERGIES
from safesub_core.overlap import no_pairs_message, overlap_summary, overlap_warnings, reference_pairs

ui.header("Overlap",
          "MSO = ‖Q_Xᵀ Q_Y‖²_F / min(k_X, k_Y) of the top singular subspaces holding an energy "
          "fraction η of each update; two random subspaces give max(k_X, k_Y) / d (dotted).")
fam, res = ui.require_family()  # and its caption
S, v = res.session, ui.view()

# -------------------------------------------------------------------------------------------- weight space
st.subheader("Weight space: updates relative to A (or S)")
refs = ["aligned"] + (["safety_tuned"] if fam.safety_tuned is not None else [])
c1, c2, c3 = st.columns([1, 3, 1.2])
reference = ui.bound("reference", c1.radio, "Reference", options=refs,
                     format_func=lambda r: {"aligned": "A (aligned)", "safety_tuned": "S (safety-tuned)"}[r])
sides = list(fam.fine_tunes_of(reference).values())  # only variants fine-tuned from the reference: no shared offset
study = [f"{x} vs {y}" for x, y in reference_pairs(fam, reference)]
all_pairs = study + [f"{x} vs {y}" for x, y in itertools.combinations(sides + ["base"], 2)
                     if f"{x} vs {y}" not in study and f"{y} vs {x}" not in study]
pairs_txt = c2.multiselect("Pairs of updates (X − ref vs Y − ref)", all_pairs, default=study or all_pairs[:3],
                           key=f"w_overlap_pairs_{reference}", disabled=not sides)
scope = c3.radio("Block space", ["block-write", "block-read"], key="w_overlap_scope",
                 help="write: left singular vectors of [ΔO | ΔDown]; read: right singular vectors of "
                      "[ΔQ; ΔK; ΔV; ΔGate; ΔUp] (both in the residual stream)")
ui.publish_view()

table = None
if pairs_txt:
    pairs = [tuple(p.split(" vs ")) for p in pairs_txt]
    with ui.shown_errors():
        bar = st.progress(0.0, text="Weight-space overlap")
        table = S.weight_overlap(reference, pairs, DEFAULT_ENERGIES,
                                 progress=ui.progress_callback(bar, "Weight-space overlap"))
        bar.empty()
        for warning in overlap_warnings(table):
            st.warning(warning, icon="⚠️")
elif not sides:
    st.info(no_pairs_message(reference) + ".", icon="ℹ️")
else:
    st.info("Choose at least one pair.", icon="ℹ️")

if table is not None:
    blk = table[table["scope"] == scope]
    pair_names = list(dict.fromkeys(blk["pair"]))
    fig = make_subplots(rows=1, cols=len(pair_names), subplot_titles=pair_names, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for i, pair in enumerate(pair_names):
        d = blk[blk["pair"] == pair].pivot_table(index="unit", columns="energy", values="mso")
        d = d.loc[sorted(d.index, key=lambda u: int(u) if str(u).isdigit() else 10**9)]
        fig.add_heatmap(z=d.values, x=[f"{e:g}" for e in d.columns], y=[f"block {u}" for u in d.index],
                        zmin=0, zmax=1, colorscale="Viridis", showscale=(i == 0), colorbar_title="MSO",
                        hovertemplate="%{y}, η=%{x}: MSO %{z:.3f}<extra></extra>", row=1, col=i + 1)
        fig.update_xaxes(title_text="energy η", type="category", row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=170 + 40 * blk["unit"].nunique(), margin=dict(t=70, b=40),
                      title=dict(text=f"Per-block {scope} MSO (reference {reference})", font_size=13))
    ui.chart(fig, f"{fam.name}_weight_mso_{scope}_{reference}", key="weight_heatmap")

    summ = overlap_summary(table)
    summ = summ[summ["scope"].isin(["tensor", scope])]
    fig2 = go.Figure()
    for i, ((sc, pair), d) in enumerate(summ.groupby(["scope", "pair"], sort=False)):
        color = ui.PALETTE[i % len(ui.PALETTE)]
        label = f"{pair} ({'per tensor' if sc == 'tensor' else sc})"
        fig2.add_scatter(x=d["energy"], y=d["mso"], mode="lines+markers", name=label, line_color=color,
                         line_dash="solid" if sc == "tensor" else "dash")
        fig2.add_scatter(x=d["energy"], y=d["random_baseline"], mode="lines", name=f"random baseline, {label}",
                         line=dict(color=color, dash="dot", width=1), showlegend=False)
    fig2.update_layout(title=dict(text="Mean MSO against η (dotted: random baseline)", font_size=13),
                       xaxis_title="energy η", yaxis_title="MSO", yaxis_range=[0, 1.02], height=400,
                       margin=dict(t=50, b=40), legend=dict(font_size=11))
    ui.chart(fig2, f"{fam.name}_weight_mso_curves_{reference}", key="weight_curves")
    ui.csv_download(table, f"{fam.name}_weight_overlap_{reference}", label="Download the overlap table (CSV)")

# -------------------------------------------------------------------------------------------- activation space
st.subheader("Activation space: prompt sets per layer")
st.caption("Last-real-token hidden states of each prompt at every layer; MSO of the two sets' state subspaces. "
           "The study averages layers at 65–90% depth (shaded). Uncentred states share their mean direction, "
           "so at low η the MSO is close to 1 for any two sets; centre them to compare how the prompts spread.")
options = ui.set_options()
c1, c2, c3 = st.columns([1.3, 2, 1])
ref_set = c1.selectbox("Set X", options, index=options.index("builtin-harmful:eval")
                       if "builtin-harmful:eval" in options else 0, key="w_act_ref")
others = [o for o in options if o != ref_set]
defaults = [o for o in ("builtin-benign:eval", "builtin-harmful:train") if o in others]
cmp_sets = c2.multiselect("Compared with sets Y", others, default=defaults, key="w_act_cmp")
n_prompts = c3.slider("Prompts per set", 4, 64, 24, step=4, key="w_act_n")
c1, c2, c3 = st.columns([2, 1.3, 1])
names = list(fam.checkpoints())
models = c1.multiselect("Models", names, default=[fam.start, ui.default_harmful_variant(fam)], key="w_act_models")
energy = c2.select_slider("Energy η", options=list(DEFAULT_ENERGIES), value=0.9, key="w_act_energy")
center = c3.checkbox("Centre states", value=False, key="w_act_center")

if models and cmp_sets:
    frames = []
    with ui.shown_errors():
        X = ui.prompt_set(ref_set, n_prompts)
        jobs = [(m, y) for m in models for y in cmp_sets]
        bar = st.progress(0.0, text="Activation overlap")
        for i, (m, y) in enumerate(jobs):
            Y = ui.prompt_set(y, n_prompts)
            df = S.activation_overlap(m, X, m, Y, energies=DEFAULT_ENERGIES, center=center)
            frames.append(df.assign(model=m, pair=f"{ref_set} vs {y}"))
            bar.progress((i + 1) / len(jobs), text=f"Activation overlap: {m}, {y}")
        bar.empty()
    if frames:
        act = pd.concat(frames, ignore_index=True)
        d = act[act["energy"] == energy]
        fig3 = go.Figure()
        fig3.add_vrect(x0=DEPTH_BAND[0], x1=DEPTH_BAND[1], fillcolor="#ffbf00", opacity=0.18, line_width=0,
                       annotation_text=f"{DEPTH_BAND[0]:.0%}–{DEPTH_BAND[1]:.0%} depth",
                       annotation_position="bottom left")
        dashes = ["solid", "dash", "dashdot", "longdash"]
        for i, m in enumerate(models):
            for j, y in enumerate(cmp_sets):
                g = d[(d["model"] == m) & (d["pair"] == f"{ref_set} vs {y}")]
                color = ui.PALETTE[i % len(ui.PALETTE)]
                fig3.add_scatter(x=g["depth"], y=g["mso"], mode="lines+markers", name=f"{m}: {ref_set} vs {y}",
                                 line=dict(color=color, dash=dashes[j % len(dashes)]),
                                 customdata=g[["layer"]], hovertemplate="layer %{customdata[0]}: MSO %{y:.3f}")
                fig3.add_scatter(x=g["depth"], y=g["random_baseline"], mode="lines", showlegend=False,
                                 line=dict(color=color, dash="dot", width=1), name="random baseline")
        fig3.update_layout(title=dict(text=f"Activation MSO per layer at η={energy:g} (dotted: random baseline)",
                                      font_size=13), xaxis_title="depth (layer / L)", yaxis_title="MSO",
                           yaxis_range=[0, 1.02], height=420, margin=dict(t=50, b=40))
        ui.chart(fig3, f"{fam.name}_activation_mso", key="activation_curves")
        with ui.shown_errors():
            band = S.band_mean(act)
            st.markdown(f"**{band.title}**")
            st.dataframe(band.table[band.table["energy"] == energy], hide_index=True, width="stretch")
        ui.csv_download(act, f"{fam.name}_activation_overlap", label="Download activation overlap (CSV)")
else:
    st.info("Choose at least one model and one compared set.", icon="ℹ️")
