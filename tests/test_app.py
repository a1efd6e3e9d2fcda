"""The Streamlit app through AppTest on the test-size tiny family: every page renders, read-outs follow the
sliders, orthogonal mode keeps 1 - E of the energy, links reproduce the view, bad input is one error line.

The app reads the family from SAFESUB_FAMILY. All tests of this module share one cache folder and, through
st.cache_resource, one resident session (the first run of a page imports torch/transformers and loads models,
so runs get a generous timeout).
"""
import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from apptest import open_app_page
from safesub_core.family import Family
from safesub_core.prompts import EvalSets
from ui import PAGE_FILES

pytestmark = pytest.mark.slow

PAGES = ("family", "subspaces", "overlap", "activation_map", "inspector")


def open_page(page: str, query: dict | None = None) -> AppTest:
    return open_app_page(page, query)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metric(at: AppTest, label: str) -> float:
    return float(next(m for m in at.metric if m.label == label).value)


def readouts(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def figures(at: AppTest) -> list[dict]:
    """Every plotly figure of the page as JSON, from the element protos."""
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def values(arr) -> np.ndarray:
    """A plotly array as numbers: plain JSON lists, or plotly 7's {"dtype", "bdata"} base64 typed arrays."""
    if isinstance(arr, dict) and "bdata" in arr:
        out = np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"]))
        return out.reshape(arr["shape"]) if "shape" in arr and isinstance(arr["shape"], list) else out
    return np.asarray(arr, dtype=float)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(app_env, page):
    at = open_page(page)
    assert_clean(at)
    assert at.title, "each page starts with its title"
    if page != "inspector":
        assert figures(at), f"the {page} page shows at least one chart"


def test_family_page_lists_checkpoints_and_update_sizes(app_env):
    at = open_page("family")
    assert_clean(at)
    table = at.table[0].value
    assert {"base", "aligned", "useful", "harmful"} <= set(table.index)
    assert {"architecture", "parameters", "dtype", "fingerprint"} <= set(table.columns)
    bars = figures(at)[0]["data"]
    names = [t["name"] for t in bars]
    assert any("alignment" in n for n in names) and any("harmful" in n for n in names)
    assert all((values(t["y"]) >= 0).all() for t in bars), "update sizes are sums of squares"
    assert (values(bars[0]["y"]) > 0).all(), "the alignment update touches every block"


def test_rank_slider_moves_the_readouts(app_env):
    at = open_page("subspaces")
    assert_clean(at)
    before = readouts(at)
    at.slider(key="w_rank").set_value(0.75).run()
    assert_clean(at)
    after = readouts(at)
    assert after["energy kept E"] != before["energy kept E"]
    assert any(after[k] != before[k] for k in ("refusal log-odds", "NLL (utility)", "KL to start"))
    assert at.query_params.get("rank") in (["0.75"], "0.75"), "the URL follows the slider"


def test_orthogonal_mode_keeps_one_minus_the_parallel_energy(app_env):
    at = open_page("subspaces")
    at.slider(key="w_rank").set_value(0.4).run()
    parallel = metric(at, "energy kept E")
    at.radio(key="w_mode").set_value("orthogonal").run()
    assert_clean(at)
    orthogonal = metric(at, "energy kept E")
    assert 0 < parallel < 1
    assert abs(parallel + orthogonal - 1.0) <= 2e-4  # E_orth = 1 - E_par (read-outs show 4 decimals)


def test_chart_marks_the_current_point(app_env):
    at = open_page("subspaces", {"rank": 0.5})
    assert_clean(at)
    assert at.slider(key="w_rank").value == pytest.approx(0.5), "the link's rank reaches the slider"
    fig = next(f for f in figures(at) if any(t.get("name") == "this point" for t in f["data"]))
    stars = [t for t in fig["data"] if t.get("name") == "this point" and t["marker"].get("symbol") == "star"]
    assert stars and all(values(t["x"])[0] == pytest.approx(0.5) for t in stars)
    energy = next(t for t in stars if t.get("xaxis", "x") == "x")
    assert values(energy["y"])[0] == pytest.approx(metric(at, "energy kept E"), abs=1e-4)


@pytest.mark.parametrize("where, problem", [("inside", "does not exist"), ("outside", "outside the allowed")])
def test_bad_family_path_shows_one_error_line(app_env, tmp_path, where, problem):
    bad = tmp_path / "missing" / "family.yaml" if where == "inside" else Path("/nonexistent/family.yaml")
    at = open_page("family")
    at.radio(key="w_family_source").set_value("Family file").run()
    at.text_input(key="w_family_file").input(str(bad)).run()
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert problem in message and "\n" not in message
    assert at.table, "the previous family stays on screen"


def test_bad_paths_entered_one_by_one_show_one_error_line(app_env, tmp_path):
    at = open_page("family")
    at.radio(key="w_family_source").set_value("Enter paths").run()
    inputs = at.text_input
    inputs[0].input(str(tmp_path / "base"))
    inputs[1].input(str(tmp_path / "aligned"))
    at.text_area[0].input(f"useful = {tmp_path / 'useful'}")
    at.button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "checkpoint 'base'" in at.error[0].value


def test_bad_link_shows_an_error_not_a_traceback(app_env):
    """A link's family outside the allowed folders is named once, on the page it opens, and the server's family is
    shown instead; the next page shows that family, not the error again."""
    at = open_page("family", {"family": "/nonexistent/family.yaml"})
    assert not at.exception
    assert len(at.error) == 1 and "outside the allowed" in at.error[0].value
    assert at.table, "the server's own family shows"
    at.switch_page(PAGE_FILES["subspaces"]).run()
    assert_clean(at)
    assert not at.error


def test_inspector_opens_the_prompt_of_a_link(app_env):
    from safesub_core.prompts import load_set

    prompt = load_set("builtin-harmful:eval").prompts[3]
    at = open_page("inspector", {"prompt": prompt, "prompt_set": "builtin-harmful:eval"})
    assert_clean(at)
    assert at.selectbox(key="w_insp_pick").value == 3
    shown = " ".join(m.value for m in at.markdown)
    assert prompt in shown
    assert "refusal" in shown or "compliance" in shown


def test_generation_scores_run_then_show_on_the_chart_and_in_the_inspector_table(app_env):
    at = open_page("subspaces", {"rank": 0.5, "variant": "harmful"})
    assert_clean(at)
    assert any("Not computed yet" in i.value for i in at.info)
    at.button(key="run_generation").click().run()
    assert_clean(at)
    labels = {m.label for m in at.metric}
    assert {"refusal rate", "attack success rate", "exact match", "over-refusal"} <= labels
    fig = next(f for f in figures(at) if any(t.get("name") == "this point" for t in f["data"]))
    assert any(t.get("marker", {}).get("symbol") == "circle-open" for t in fig["data"]), "ASR marker on the chart"
    assert at.dataframe, "the per-prompt table"

    # the inspector's per-prompt table reads the same cached results (aligned vs the current point)
    at.switch_page(PAGE_FILES["inspector"]).run()
    assert_clean(at)
    assert not any(b.key == "compute_tables" for b in at.button), "both targets are cached: nothing to compute"
    table = at.dataframe[-1].value
    assert {"set", "prompt", "completion A", "completion B", "refused A", "refused B"} <= set(table.columns)
    at.selectbox(key="w_tab_filter").set_value("flipped from refusal to compliance").run()
    assert_clean(at)
    flipped = at.dataframe[-1].value
    assert len(flipped) <= len(table)
    assert (flipped["refused A"] & ~flipped["refused B"]).all()


def test_the_builtin_family_is_built_on_first_run_with_a_progress_bar(tiny_family, tmp_path, monkeypatch):
    """No SAFESUB_FAMILY and no built family: the app builds the tiny family (here a stand-in copies the test
    family, reporting progress) and opens it."""
    import shutil

    from safesub_core import demo

    calls = []

    def fake_build(name, out_dir=None, size="full", seed=0, progress=None, log=None):
        assert name == "tiny"
        out = Path(out_dir) if out_dir is not None else demo.family_dir(name, size)
        for i in range(3):
            progress(i, 3, f"stage {i}")
            calls.append(i)
        shutil.copytree(Path(tiny_family).parent, out)
        return out / "family.yaml"

    monkeypatch.delenv("SAFESUB_FAMILY", raising=False)
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "build", fake_build)
    at = open_page("family")
    assert_clean(at)
    assert calls == [0, 1, 2]
    assert (tmp_path / "cache" / "families" / "tiny" / "family.yaml").is_file()
    assert at.radio(key="w_family_source").value == "Built-in tiny family"
    assert "harmful" in set(at.table[0].value.index)


def test_device_and_precision_reach_the_resident_session(app_env):
    import torch

    f32 = readouts(open_page("subspaces", {"dtype": "float32"}))["refusal log-odds"]
    at = open_page("family")
    assert_clean(at)
    assert at.selectbox(key="w_device").options == [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"]
    assert at.selectbox(key="w_dtype").value == ("bfloat16" if torch.cuda.is_available() else "float32")
    at.selectbox(key="w_dtype").set_value("bfloat16").run()
    assert_clean(at)
    assert at.query_params.get("dtype") in (["bfloat16"], "bfloat16"), "the URL keeps the precision"
    at.switch_page(PAGE_FILES["subspaces"]).run()
    assert_clean(at)
    bf16 = readouts(at)["refusal log-odds"]
    assert "on cpu in bfloat16" in " ".join(c.value for c in at.caption), "the read-outs say how they were scored"
    assert abs(float(bf16) - float(f32)) < 0.5, "the same point, scored in bfloat16"


def test_live_prompts_chosen_on_the_family_page_size_the_sets_every_page_scores(app_env):
    at = open_page("family")
    assert_clean(at)
    assert at.selectbox(key="w_live").value == "auto"
    at.selectbox(key="w_live").set_value("6").run()
    assert_clean(at)
    assert at.query_params.get("live") in (["6"], "6"), "the URL keeps the choice"
    at.switch_page(PAGE_FILES["subspaces"]).run()
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    sets = EvalSets.for_family(Family.from_file(app_env))
    waves = -(-max(len(sets.harmful), len(sets.utility), len(sets.benign)) // 6)
    assert f"{waves} of {waves} waves of 6 prompts a set" in captions, "sharpened until the sets were exhausted"
    assert f"n={len(sets.harmful)} " in captions and f"n={len(sets.utility)} " in captions


@pytest.mark.parametrize("live, message", [("0", "live prompts 0: must be at least 1"),
                                           ("many", "live prompts 'many': must be a whole number")])
def test_a_bad_live_prompt_count_in_a_link_is_one_error_line_and_auto_is_used(app_env, live, message):
    at = open_page("family", {"live": live})
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value
    assert at.selectbox(key="w_live").value == "auto" and at.table, "the family shows, with the default sets"


def test_a_device_this_machine_lacks_is_one_error_line_and_the_page_still_works(app_env):
    at = open_page("family", {"device": "cuda:7"})
    assert not at.exception
    assert len(at.error) == 1 and "device 'cuda:7': not available" in at.error[0].value
    assert at.table, "the family still shows, on the default device"


def test_smol_build_button_runs_in_the_background_and_then_shows_the_family(app_env, monkeypatch, tmp_path):
    """The build itself is tested in test_demo.py; here a stand-in build (a copy of the tiny family, with progress
    steps) checks the page: the button starts a server-side job, and the family shows once it has finished."""
    import shutil
    import threading

    import ui
    from safesub_core import demo

    release = threading.Event()

    def fake_build(name, size="full", progress=None, **kw):
        assert name == "smol"
        out = demo.family_dir(name, size)
        for i in range(3):
            progress(i, 3, f"stage {i}")
            release.wait(30)
        shutil.copytree(Path(app_env).parent, out, dirs_exist_ok=True)
        (out / "family.yaml").write_text((Path(app_env)).read_text().replace("name: tiny", "name: smol-standin"))
        return out / "family.yaml"

    monkeypatch.setattr(demo, "build", fake_build)
    monkeypatch.setenv("SAFESUB_SMOL_SIZE", "test")
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "cache"))
    at = open_page("family")
    at.radio(key="w_family_source").set_value("Built-in smol family (SmolLM2-135M)").run()
    assert_clean(at)
    build = next(b for b in at.button if "Build the smol family" in b.label)
    build.click().run()
    assert_clean(at)
    job = ui.build_job("smol")
    assert job.running and any("Building the smol family" in p.proto.text for p in at.get("progress"))
    release.set()
    job.thread.join(60)
    assert not job.running and job.error is None
    at.run()
    assert_clean(at)
    assert any("smol-standin" in c.value for c in at.caption), "the built family is now the current one"
    assert at.query_params.get("family") in (["smol"], "smol")


def test_rank_grid_is_scored_on_request_where_read_outs_are_costly(app_env, monkeypatch):
    """With small live sets (as for a 135M model on a CPU) the chart's rank grid waits for the toggle."""
    monkeypatch.setenv("SAFESUB_LIVE_PROMPTS", "4")
    at = open_page("subspaces")
    assert_clean(at)
    assert at.toggle(key="w_score_grid").value is False
    captions = " ".join(c.value for c in at.caption)
    assert "waves of 4 prompts a set" in captions
    sets = EvalSets.for_family(Family.from_file(app_env))  # the tiny family's: the built-in eval splits
    sizes = f"({len(sets.harmful)} harmful, {len(sets.utility)} utility, {len(sets.edgy)} edgy prompts)"
    assert sizes in captions, "generation scores say their sets' size"
    chart = next(f for f in figures(at) if any(t.get("name") == "this point" for t in f["data"]))
    live_lines = [t for t in chart["data"] if t.get("mode") == "lines+markers"]
    assert all(len(values(t["x"])) <= 1 for t in live_lines), "only points already scored (none yet) are drawn"
    at.toggle(key="w_score_grid").set_value(True).run()
    assert_clean(at)
    chart = next(f for f in figures(at) if any(t.get("name") == "this point" for t in f["data"]))
    live_lines = [t for t in chart["data"] if t.get("mode") == "lines+markers"]
    assert live_lines and all(len(values(t["x"])) == 6 for t in live_lines), "the whole grid, 6 ranks a subspace"


def test_a_bad_device_in_the_environment_is_one_error_line_and_auto_is_used(app_env, monkeypatch):
    monkeypatch.setenv("SAFESUB_DEVICE", "cuda:9")
    at = open_page("family")
    assert not at.exception
    assert len(at.error) == 1 and "device 'cuda:9': not available" in at.error[0].value
    assert at.table, "the family shows, on the automatic device"


def test_read_outs_sharpen_while_the_slider_rests_and_a_point_resumes_where_it_stopped(app_env, monkeypatch):
    """Live scores come in waves: the first at once, then more prompts while the slider rests (the toggle), each
    read-out with n and its interval; a new point shows only its own numbers, and coming back resumes."""
    monkeypatch.setenv("SAFESUB_LIVE_PROMPTS", "4")
    sets = EvalSets.for_family(Family.from_file(app_env))
    waves = -(-max(len(sets.harmful), len(sets.utility), len(sets.benign)) // 4)
    at = open_page("subspaces", {"rank": "0.33"})
    assert_clean(at)
    at.toggle(key="w_sharpen").set_value(False).run()
    at.slider(key="w_rank").set_value(0.34).run()  # a point never scored: its first wave only

    def shown(at) -> str:
        return " ".join(c.value for c in at.caption)

    assert_clean(at)
    assert "rho=0.34 alpha=1: refusal log-odds" in shown(at) and f"1 of {waves} waves of 4 prompts" in shown(at)
    assert "n=4 " in shown(at) and f"n={len(sets.harmful)} " not in shown(at)
    at.toggle(key="w_sharpen").set_value(True).run()  # the slider rests: scored until the sets are exhausted
    assert_clean(at)
    assert f"{waves} of {waves} waves" in shown(at) and f"n={len(sets.harmful)} " in shown(at)
    sharp = readouts(at)["refusal log-odds"]
    at.toggle(key="w_sharpen").set_value(False).run()
    at.slider(key="w_rank").set_value(0.36).run()  # a move: the new point's first wave, none of the old numbers
    assert_clean(at)
    assert "rho=0.36" in shown(at) and "rho=0.34" not in shown(at) and f"n={len(sets.harmful)} " not in shown(at)
    at.slider(key="w_rank").set_value(0.34).run()  # back: every wave scored before is there again
    assert_clean(at)
    assert f"{waves} of {waves} waves" in shown(at) and readouts(at)["refusal log-odds"] == sharp


def test_the_inspector_runs_the_picked_models_and_a_judge(app_env, tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from safesub_core.prompts import load_set
    from tests.factories import tiny_config

    prompt = load_set("builtin-harmful:eval").prompts[0]
    at = open_page("inspector", {"prompt": prompt, "prompt_set": "builtin-harmful:eval", "variant": "harmful"})
    assert_clean(at)
    family = Family.from_file(app_env)
    assert at.multiselect(key="w_insp_models").value == [family.start, "harmful", "current point"]
    boxes = [m.value for m in at.markdown if m.value.startswith("**") and m.value.endswith("**")]
    assert len(boxes) == 3, "the start model, the variant and the point; not every checkpoint"
    at.multiselect(key="w_insp_models").set_value(["useful"]).run()
    assert_clean(at)
    assert [m.value for m in at.markdown if m.value.startswith("**") and m.value.endswith("**")] == ["**useful**"]

    at.selectbox(key="w_insp_judge").set_value("llama-guard").run()  # no folder yet: one line, the page goes on
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value
    tok = AutoTokenizer.from_pretrained(str(family.start_checkpoint.path))
    folder = tmp_path / "judge"
    LlamaForSequenceClassification(tiny_config(vocab_size=len(tok), num_labels=2, id2label={0: "safe", 1: "unsafe"},
                                               label2id={"safe": 0, "unsafe": 1})).save_pretrained(folder)
    tok.save_pretrained(folder)
    at.selectbox(key="w_insp_judge").set_value("hf-classifier")
    at.text_input(key="w_insp_judge_path").set_value(str(folder)).run()
    assert_clean(at)
    assert any("judge " in c.value and "/5" in c.value for c in at.caption)


def test_the_family_page_takes_a_device_map_and_lists_what_is_resident(app_env):
    at = open_page("family", {"device_map": '{"": "cpu"}'})
    assert_clean(at)
    assert at.text_input(key="w_device_map").value == '{"": "cpu"}'
    shown = " ".join(c.value for c in at.caption)
    assert "In memory on cpu" in shown and "stay within" in shown and "GiB (SAFESUB_MODEL_BYTES)" in shown
    at.text_input(key="w_device_map").set_value('{"": "cuda:5"}').run()
    assert not at.exception
    assert any("names cuda:5, but this machine has" in e.value and "\n" not in e.value for e in at.error)
    at.text_input(key="w_device_map").set_value("").run()
    assert_clean(at)
    assert "device_map" not in at.query_params


def test_the_s_reference_pairs_the_s_started_variants_or_says_why_it_cannot(app_env, tmp_path, monkeypatch):
    at = open_page("overlap")
    at.radio(key="w_reference").set_value("safety_tuned").run()
    assert_clean(at)
    picked = at.multiselect(key="w_overlap_pairs_safety_tuned")
    assert picked.value == ["harmful_s vs useful_s", "harmful_s vs base", "useful_s vs base"]
    assert not any("harmful vs useful" in o for o in picked.options), "an A-started variant is offered against S"
    heat = figures(at)[0]
    titles = {a["text"] for a in heat["layout"]["annotations"]}
    assert {"harmful-S vs useful-S", "harmful-S vs base-S", "useful-S vs base-S"} <= titles

    root = Path(app_env).parent  # the same checkpoints, without the S-started variants
    spec = dict(name="no-s", base=str(root / "base"), aligned=str(root / "aligned"), safety_tuned=str(root / "safety"),
                variants={"useful": str(root / "useful"), "harmful": str(root / "harmful")})
    (tmp_path / "no_s.yaml").write_text(json.dumps(spec))
    monkeypatch.setenv("SAFESUB_FAMILY", str(tmp_path / "no_s.yaml"))
    at = open_page("overlap")
    at.radio(key="w_reference").set_value("safety_tuned").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("S panels need variants fine-tuned from the safety-tuned model" in i.value for i in at.info)
    assert not at.error, [e.value for e in at.error]
