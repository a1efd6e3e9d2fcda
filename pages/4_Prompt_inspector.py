"""Prompt inspector: one prompt through the picked models side by side, and a per-prompt table over whole sets."""
import re

import streamlit as st

import ui
from safesub_core import scoring
from safesub_core.scoring.judges import LOCAL_KINDS
from safesub_core.session import GENERATION_TOKENS
from safesub_core.stats import mcnemar, rate_of

ui.header("Prompt inspector",
          "Greedy completions of one prompt by the models you pick and by the projected model of the"
          " Subspaces page, with refusal verdicts, log-odds, arithmetic correctness and, optionally, a judge.")
fam, res = ui.require_family()  # and its caption
S, v = res.session, ui.view()

with ui.shown_errors(stop=True):
    cfg = ui.current_config()
variant = ui.current_variant(fam)
POINT = "current point"
st.caption(f"Current point (from the Subspaces page): **{variant}**, {cfg.label}")

# -------------------------------------------------------------------------------------------- markers
with st.expander("Refusal markers in use (editable)"):
    st.caption("A completion is a refusal when one of these starts within its first 100 characters "
               "(case-insensitive). One marker per line.")
    if st.button("Reset to the default list", key="reset_markers"):
        st.session_state["w_markers"] = "\n".join(scoring.REFUSAL_MARKERS)
    text = st.text_area("Markers", value="\n".join(scoring.REFUSAL_MARKERS), key="w_markers", height=220,
                        label_visibility="collapsed")
markers = tuple(m.strip() for m in text.splitlines() if m.strip()) or scoring.REFUSAL_MARKERS

# -------------------------------------------------------------------------------------------- the prompt
options = ui.set_options()
set_from_view = re.sub(r"\[:\d+\]$", "", v.get("prompt_set") or "")
SOURCES = ("From a prompt set", "Type a prompt")
if "w_insp_source" not in st.session_state:
    st.session_state["w_insp_source"] = SOURCES[0] if (not v.get("prompt") or set_from_view in options) else SOURCES[1]
source = st.radio("Prompt", SOURCES, key="w_insp_source", horizontal=True, label_visibility="collapsed")
prompt, reference = None, None
if source == SOURCES[0]:
    c1, c2 = st.columns([1, 3])
    if "w_insp_set" not in st.session_state:
        st.session_state["w_insp_set"] = set_from_view if set_from_view in options else (
            "builtin-harmful:eval" if "builtin-harmful:eval" in options else options[0])
    set_name = c1.selectbox("Prompt set", options, key="w_insp_set")
    with ui.shown_errors():
        ps = ui.prompt_set(set_name)
        prompts = list(ps.prompts)
        if "w_insp_pick" not in st.session_state or st.session_state["w_insp_pick"] not in range(len(prompts)):
            st.session_state["w_insp_pick"] = prompts.index(v["prompt"]) if v.get("prompt") in prompts else 0
        i = c2.selectbox("Prompt", range(len(prompts)), key="w_insp_pick", format_func=lambda j: prompts[j])
        prompt = prompts[i]
        reference = ps.references[i] if ps.references is not None else None
else:
    if "w_insp_text" not in st.session_state:
        st.session_state["w_insp_text"] = v.get("prompt") or ""
    prompt = st.text_area("Your prompt", key="w_insp_text", height=90).strip() or None
c1, c2 = st.columns([1, 3])
max_new = c1.slider("New tokens", 8, 96, 40, step=8, key="w_insp_tokens")
reference = c2.text_input("Reference answer (arithmetic; optional)", value=reference or "",
                          key=f"w_insp_ref_{hash((prompt, reference))}").strip() or None
if prompt:
    v["prompt"] = prompt
    if source == SOURCES[0]:
        v["prompt_set"] = set_name
ui.publish_view()

# -------------------------------------------------------------------------------------------- models and judge
targets = list(fam.checkpoints()) + [POINT]
c1, c2 = st.columns([3, 2])
picked = c1.multiselect("Models side by side", targets, key="w_insp_models",
                        default=[t for t in (fam.start, variant, POINT) if t in targets],
                        help="Each picked model runs the prompt (and is loaded if it is not resident): on a big "
                             "family, pick the few to compare.")
with c2.expander("Judge (optional)"):
    kind = st.selectbox("Kind", scoring.JUDGE_KINDS, key="w_insp_judge",
                        help="Scores each completion 1-5 (1 refuses, 5 complies with actionable harm); the endpoint "
                             "reads SAFESUB_JUDGE_URL / SAFESUB_JUDGE_KEY.")
    judge_path = st.text_input("Local judge model folder", key="w_insp_judge_path",
                               disabled=kind not in LOCAL_KINDS).strip() or None
judge = None
if kind != "off":
    with ui.shown_errors():
        judge = scoring.Judge(kind=kind, path=judge_path)
        judge.check()


def spec(name):
    return (variant, cfg) if name == POINT else (name, None)


def complete(name: str) -> tuple[str, float]:
    """(greedy completion, refusal log-odds) of the prompt under a model, memoised per session."""
    target, point = spec(name)
    return res.memoised(("inspect", target, point, prompt, max_new),
                        lambda: S.inspect(target, prompt, cfg=point, max_new_tokens=max_new))


def judged(text: str) -> float:
    """The judge's 1-5 score of the prompt's completion `text` (NaN: not judged), memoised per session."""
    return res.memoised(("judge", judge.kind, judge.path, prompt, text),
                        lambda: scoring.judge_scores([prompt], [text], judge).scores[0])


if prompt and picked:
    st.markdown(f"**Prompt:** {prompt}")
    results = {}
    with ui.shown_errors():
        bar = st.progress(0.0, text="Greedy completions")
        for i, name in enumerate(picked):
            bar.progress(i / len(picked), text=f"Greedy completions: {name}")
            results[name] = complete(name)
        bar.empty()
    per_row = 4
    for start in range(0, len(picked), per_row):
        cols = st.columns(per_row)
        for col, name in zip(cols, picked[start:start + per_row]):
            if name not in results:
                continue
            text, margin = results[name]
            refused = scoring.is_refusal(text, markers)
            with col.container(border=True):
                title = f"{variant} @ {cfg.subspace} {cfg.mode}" if name == POINT else name
                st.markdown(f"**{title}**")
                st.markdown(":red-badge[refusal]" if refused else ":green-badge[compliance]")
                st.text(text.strip() or "(empty)")
                line = f"refusal log-odds {margin:+.2f}"
                if reference is not None:
                    ok = scoring.exact_match(scoring.extract_answer(text, S.sets.convention), reference)
                    line += f" · {'correct' if ok else 'wrong'} (ref {reference})"
                if judge is not None:
                    with ui.shown_errors():
                        score = judged(text)
                        line += f" · judge {score:.1f}/5" if score == score else " · judge: not judged"
                st.caption(line)
elif prompt:
    st.info("Pick at least one model.", icon="ℹ️")
else:
    st.info("Choose or type a prompt.", icon="ℹ️")

# -------------------------------------------------------------------------------------------- per-prompt table
st.subheader("Per-prompt table over the evaluation sets")
st.caption(f"From the generation scores ({GENERATION_TOKENS} new tokens) of two targets on the harmful, utility and "
           "edgy evaluation sets; refusal verdicts recomputed with the markers above.")
c1, c2 = st.columns(2)
target_a = c1.selectbox("Target A", targets, index=targets.index(fam.start), key="w_tab_a")
target_b = c2.selectbox("Target B", targets, index=len(targets) - 1, key="w_tab_b")


cached = {t: S.generation_scores(*spec(t), GENERATION_TOKENS, judge=judge, compute=False)
          for t in (target_a, target_b)}
missing = [t for t, got in cached.items() if got is None]
if missing and st.button(f"Compute generation scores for {', '.join(missing)}", key="compute_tables",
                         type="primary"):
    with ui.shown_errors():
        bar = st.progress(0.0, text="Generation scores")
        for t in missing:
            cached[t] = S.generation_scores(*spec(t), GENERATION_TOKENS, judge=judge,
                                            progress=ui.progress_callback(bar, t))
        bar.empty()
if all(got is not None for got in cached.values()):
    a, b = cached[target_a][1], cached[target_b][1]
    keep = [c for c in ("completion", "refused", "margin", "correct", "judge") if c in a.columns]
    merged = a[["set", "prompt"] + keep].merge(b[["set", "prompt"] + keep], on=["set", "prompt"],
                                               suffixes=(" A", " B"))
    for side in ("A", "B"):
        merged[f"refused {side}"] = [scoring.is_refusal(str(t), markers) for t in merged[f"completion {side}"]]
    flips = {
        "all rows": lambda d: d.index == d.index,
        "flipped from refusal to compliance": lambda d: d["refused A"] & ~d["refused B"],
        "flipped from compliance to refusal": lambda d: ~d["refused A"] & d["refused B"],
        "correctness changed": lambda d: d["correct A"].fillna(False).astype(bool)
        != d["correct B"].fillna(False).astype(bool) if "correct A" in d else d.index != d.index,
    }
    c1, c2, c3 = st.columns([1.4, 2, 2])
    which = c1.selectbox("Show", list(flips), key="w_tab_filter")
    set_filter = c2.multiselect("Sets", sorted(merged["set"].unique()), key="w_tab_sets")
    search = c3.text_input("Prompt contains", key="w_tab_search")
    shown = merged[flips[which](merged)]
    if set_filter:
        shown = shown[shown["set"].isin(set_filter)]
    if search:
        shown = shown[shown["prompt"].str.contains(search, case=False, regex=False)]
    st.caption(f"{len(shown)} of {len(merged)} prompts · A = {target_a}, B = {target_b}"
               + (f" ({variant}, {cfg.label})" if POINT in (target_a, target_b) else "")
               + " · click a column header to sort")
    st.dataframe(shown, hide_index=True, width="stretch", height=380)
    harm = merged[merged["set"] == S.sets.harmful.name]  # the same harmful prompts under both targets
    if len(harm):
        a_rate, b_rate = (rate_of(harm[f"refused {side}"]) for side in ("A", "B"))
        test = mcnemar(harm["refused A"], harm["refused B"])
        st.caption(f"Refusal rate on the harmful set: A {a_rate.text()} · B {b_rate.text()} · paired (McNemar) "
                   f"p = {test.p:.2g}" + (" · a difference of one or two prompts is never a finding"
                                          if abs(int(harm['refused A'].sum()) - int(harm['refused B'].sum())) <= 2
                                          else ""))
    ui.csv_download(shown, f"{fam.name}_per_prompt_{target_a}_vs_{target_b}".replace(" ", "_"))
else:
    st.info(f"Not computed yet for: {', '.join(missing)}.", icon="ℹ️")
