"""Activation map: a 2-D map of last-token hidden states at one layer; click a point to inspect its prompt."""
import plotly.express as px
import streamlit as st

import ui
from safesub_core.activations import METHODS
from ui.link import bounded

ui.header("Activation map",
          "Last-real-token hidden states of each prompt at one layer, embedded jointly in 2-D. Only "
          "neighbourhoods and separation mean something, not the coordinates.")
fam, res = ui.require_family()  # and its caption
S, v = res.session, ui.view()

n_layers = S.n_layers
bounded("layer", n_layers, max(0, round(0.75 * n_layers)))  # a link's layer beyond the model is reported
options = ui.set_options()
c1, c2 = st.columns([3, 1.2])
layer = ui.bound("layer", c1.slider, "Layer (0 = embeddings)", min_value=0, max_value=n_layers, step=1)
method = ui.bound("method", c2.radio, "Method", options=list(METHODS), horizontal=True,
                  format_func={"pca": "PCA", "umap": "UMAP", "tsne": "t-SNE"}.get)
c1, c2, c3 = st.columns([2, 2.4, 1])
names = list(fam.checkpoints())
models = c1.multiselect("Models", names, default=[fam.start, ui.default_harmful_variant(fam)], key="w_map_models")
defaults = [o for o in ("builtin-harmful:eval", "builtin-benign:eval") if o in options]
sets = c2.multiselect("Prompt sets", options, default=defaults, key="w_map_sets")
n_prompts = c3.slider("Prompts per set", 4, 64, 24, step=4, key="w_map_n")
ui.publish_view()

if not models or not sets:
    st.info("Choose at least one model and one prompt set.", icon="ℹ️")
    st.stop()

df = None
with ui.shown_errors():
    psets = [ui.prompt_set(s, n_prompts) for s in sets]
    label = {"pca": "PCA", "umap": "UMAP (the first fit in a process compiles first)", "tsne": "t-SNE"}[method]
    with st.status(f"Mapping {len(models) * sum(len(p) for p in psets)} states at layer {layer} with {label}…",
                   expanded=False) as box:
        df = S.activation_map(models, psets, int(layer), method)
        box.update(label=f"Map ready ({method}, layer {layer})", state="complete")

if df is not None:
    df = df.assign(short=df["prompt"].str.slice(0, 90))
    fig = px.scatter(df, x="x", y="y", color="set", symbol="model", custom_data=["prompt", "set", "model", "index"],
                     color_discrete_sequence=["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"],
                     hover_data={"short": True, "x": False, "y": False, "set": True, "model": True})
    fig.update_traces(marker=dict(size=9, opacity=0.85, line=dict(width=0.5, color="white")),
                      hovertemplate="<b>%{customdata[1]}</b> · %{customdata[2]}<br>%{customdata[0]}<extra></extra>")
    fig.update_layout(height=560, margin=dict(t=40, b=40), xaxis_title=f"{method} 1", yaxis_title=f"{method} 2",
                      title=dict(text=f"Layer {layer} of {n_layers}: click a point to open it in the inspector",
                                 font_size=13), legend_title_text="set, model")
    event = st.plotly_chart(fig, key="activation_map", on_select="rerun", selection_mode="points")
    ui.html_download(fig, f"{fam.name}_activation_map_layer{layer}_{method}")
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    if points and points[0].get("customdata"):
        prompt, pset, model = points[0]["customdata"][:3]
        v["prompt"], v["prompt_set"] = str(prompt), str(pset)
        st.session_state.pop("w_insp_source", None)
        st.session_state.pop("w_insp_text", None)
        st.session_state.pop("w_insp_set", None)
        st.session_state.pop("w_insp_pick", None)
        st.switch_page(ui.PAGE_FILES["inspector"])
    with st.expander("Points"):
        st.dataframe(df.drop(columns=["short"]), hide_index=True, width="stretch", height=300)
        ui.csv_download(df.drop(columns=["short"]), f"{fam.name}_activation_map_layer{layer}_{method}")
