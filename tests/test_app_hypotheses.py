"""The Hypotheses page (issue 18) through AppTest on the test-size tiny family: it renders with the chosen refusal
direction, the intervention's and SafeLoRA's sliders move their read-outs, the trade-off button draws the chart and
the matched-utility table, and a link reproduces the view.

All tests of this module share one cache folder and one resident session (conftest.py: app_env), as test_app.py's.
"""
import json

import pytest
from streamlit.testing.v1 import AppTest

from apptest import open_app_page

pytestmark = pytest.mark.slow

HARM = "share predicted to comply"


def open_page(query: dict | None = None) -> AppTest:
    at = open_app_page("hypotheses", query)
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metrics(at: AppTest, label: str) -> list[str]:
    """The shown values of every metric labelled `label`, top to bottom (the intervention's read-outs come first,
    then SafeLoRA's)."""
    return [m.value for m in at.metric if m.label == label]


def markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def figures(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def test_page_renders_with_the_chosen_direction_and_its_charts(app_env):
    at = open_page()
    assert at.title[0].value == "Hypotheses"
    assert "Chosen: layer " in markdown(at) and "position " in markdown(at)
    assert at.selectbox(key="w_variant").value == "harmful", "the family's harmful variant by default"
    names = {t.get("name") for f in figures(at) for t in f["data"]}
    assert {"chosen", "random k/D", "random 1/D"} <= names, names
    assert len(metrics(at, HARM)) == 2, "the intervention's and SafeLoRA's read-outs"
    assert "95% CI [" in captions(at) and "n=" in captions(at), "every read-out carries its interval and n"


def test_strength_slider_moves_the_intervention_read_outs(app_env):
    at = open_page({"target": "start", "intervention": "ablation", "strength": "0"})
    before = metrics(at, "refusal log-odds")[0]
    at.slider(key="w_strength").set_value(2.0).run()
    assert_clean(at)
    assert "Refusal ablation strength=2" in markdown(at)
    assert metrics(at, "refusal log-odds")[0] != before, "ablating the refusal direction moves the refusal log-odds"
    assert at.query_params.get("strength") in (["2.0"], "2.0"), "the URL follows the slider"


def test_addition_has_its_own_slider(app_env):
    at = open_page({"intervention": "addition", "add_alpha": "2"})
    assert at.slider(key="w_add_alpha").value == pytest.approx(2.0)
    assert "Activation addition alpha=2" in markdown(at)


def test_safelora_slider_changes_the_share_projected(app_env):
    at = open_page({"tau": "0.3"})
    before = metrics(at, "share of matrices projected")[0]
    at.slider(key="w_tau").set_value(0.95).run()
    assert_clean(at)
    after = metrics(at, "share of matrices projected")[0]
    assert float(after) > float(before), (before, after)
    assert "SafeLoRA tau=0.95" in markdown(at)
    tau_line = [s for f in figures(at) for s in f["layout"].get("shapes", []) if s.get("y0") == pytest.approx(0.95)]
    assert tau_line, "the similarity chart draws the threshold"


def test_tradeoff_button_draws_the_chart_and_the_matched_table(app_env):
    at = open_page({"variant": "harmful"})
    assert not any(t.get("name") == "Top-K" for f in figures(at) for t in f["data"])
    at.button(key="tradeoff_button").click().run()
    assert_clean(at)
    chart = next(f for f in figures(at) if any(t.get("name") == "Top-K" for t in f["data"]))
    names = {t["name"] for t in chart["data"]}
    assert {"Top-K", "Random (draw 0)", "SafeLoRA", "Refusal ablation", "Orthogonalisation"} <= names, names
    assert {"aligned (start)", "harmful (variant)"} <= names
    assert all("error_x" in t and "error_y" in t for t in chart["data"]), "intervals in both axes"
    matched = next(d.value for d in at.dataframe if "verdict" in d.value.columns)
    assert len(matched) and set(matched["verdict"]) <= {"lowest harm", "higher harm", "inconclusive"}
    assert matched["harm"].str.contains(r"n=\d+").all(), "each harm with its interval and n"
    at.run()  # a rerun keeps the computed trade-off
    assert any(t.get("name") == "Top-K" for f in figures(at) for t in f["data"])


def test_a_link_reproduces_the_view(app_env):
    at = open_page({"variant": "harmful", "intervention": "orthogonalisation", "strength": "0.5", "tau": "0.2",
                    "target": "start"})
    assert at.radio(key="w_intervention").value == "orthogonalisation"
    assert at.radio(key="w_target").value == "start"
    assert at.slider(key="w_strength").value == pytest.approx(0.5)
    assert at.slider(key="w_tau").value == pytest.approx(0.2)
    assert "aligned: Orthogonalisation strength=0.5" in markdown(at)


def test_a_bad_link_value_is_one_line_and_the_default(app_env):
    at = open_app_page("hypotheses", {"strength": "7", "intervention": "jailbreak"}, deep=True)
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and at.error[0].value.startswith("link parameter "), [e.value for e in at.error]
    assert "strength='7'" in at.error[0].value and "intervention='jailbreak'" in at.error[0].value
    assert at.slider(key="w_strength").value == pytest.approx(1.0)
    assert at.radio(key="w_intervention").value == "ablation"
