"""The app's links (issue 19): every value a URL carries goes through one validation layer, `ui.link.PARAMS`
(types, ranges, allowed values, the family's resolver); a bad one falls back to the default and is reported on ONE
line ("link parameter ...: not a valid value"), never an exception (a slider given a value outside its range
raised StreamlitAPIException before).

- `parse_query`, the layer as a pure function, under many random queries: every value it returns is allowed.
- The Subspaces page's sliders read their ranges from the same table.
- Deep links (a page opened first, as a browser's address bar does) with the issue's values, and a property test
  with random queries over every key on every page (few examples: each is an AppTest run of seconds).
"""
from __future__ import annotations

import json
import math
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest

from apptest import APP, TIMEOUT
from safesub_core.activations import METHODS
from safesub_core.compute import DTYPES, LIVE_CHOICES
from safesub_core.projection import MODES, SUBSPACES
from ui.link import PARAMS, parse_query
from ui.widgets import PAGE_FILES

# ------------------------------------------------------------------------------------------------ values

JUNK = st.one_of(
    st.text(alphabet=string.printable + "éλ\u202e\x00", max_size=20),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**20, 10**20).map(str),
    st.sampled_from(["", " ", "None", "nan", "-inf", "1e309", "0", "-0.0", "1.0000001", "0.0099", "3.05", "-1.01",
                     "paths:", "paths:{", 'paths:{"base": 5}', 'paths:["a"]', 'paths:{"base": "a", "aligned": "b", '
                     '"variants": {"x": 7}}', "smol", "/etc/passwd", "../../family.yaml"]),
)
GOOD = {  # values a page accepts (kept few where a new value costs a page real work: grids, maps, models)
    "family": st.just("tiny-test"), "variant": st.sampled_from(["useful", "harmful"]),
    "subspace": st.sampled_from(SUBSPACES), "mode": st.sampled_from(MODES), "rank_by": st.sampled_from(
        ["fraction", "energy"]), "rank": st.floats(0.01, 1.0).map(repr), "alpha": st.sampled_from(["1.0", "-1", "3"]),
    "layer": st.integers(0, 2).map(str), "method": st.just("pca"), "prompt": st.text(max_size=30),
    "prompt_set": st.just("builtin-harmful:eval"), "reference": st.just("aligned"), "device": st.just("cpu"),
    "dtype": st.just("float32"), "live": st.just("auto"),
    "device_map": st.just(""), "max_memory": st.just(""),  # a map reloads the family (tests/test_app.py has one)
    "harmful": st.sampled_from(["harmbench:eval,n=4", "builtin-harmful:eval"]), "utility": st.just("gsm8k,n=4"),
    "benign": st.just("pairs-benign:eval,n=4"), "edgy": st.just("overrefusal,split=eval,n=4"),
    "convention": st.sampled_from(["flexible", "strict"]),
    "intervention": st.sampled_from(["ablation", "orthogonalisation", "addition"]),
    "strength": st.sampled_from(["1.0", "-2", "0.5"]), "add_alpha": st.sampled_from(["0", "4"]),
    "target": st.sampled_from(["variant", "start"]), "tau": st.sampled_from(["0", "0.5", "1"]),
}


def queries(good: dict) -> st.SearchStrategy[dict]:
    """Random queries over every view key: each key absent, a good value or junk."""
    return st.fixed_dictionaries({}, optional={k: good[k] | JUNK for k in PARAMS})


def allowed(key: str, value) -> bool:
    p = PARAMS[key]
    if value is None or value == p.default:
        return True
    if p.lo is not None and not (math.isfinite(value) and p.lo <= value <= (p.hi if p.hi is not None else value)):
        return False
    choices = {"subspace": SUBSPACES, "mode": MODES, "method": METHODS, "live": LIVE_CHOICES,
               "dtype": ("auto", *DTYPES), "device": ("auto", "cpu", *(f"cuda:{i}" for i in range(16))),
               "rank_by": ("fraction", "energy"), "convention": ("flexible", "strict")}.get(key)
    return choices is None or value in choices


@settings(max_examples=300, deadline=None)
@given(query=queries({k: v for k, v in GOOD.items() if k != "family"} | {"family": st.just("tiny")}))
def test_property_parser_returns_only_allowed_values_and_one_entry_per_bad_key(query):
    values, bad = parse_query(query)
    assert set(values) == set(PARAMS)
    for key, value in values.items():
        assert allowed(key, value), (key, value)
    assert len(bad) <= len(query)
    bad_keys = [b.split("=", 1)[0] for b in bad]
    assert len(set(bad_keys)) == len(bad_keys) and set(bad_keys) <= set(query)
    for entry in bad:
        assert "\n" not in entry and "\r" not in entry, entry
    for key in set(query) - set(bad_keys):  # an accepted value is kept as read
        assert values[key] == PARAMS[key].read(query[key])


@pytest.mark.parametrize("key, raw", [("rank", "0"), ("rank", "-0.5"), ("rank", "1.5"), ("rank", "0.0099"),
                                      ("alpha", "3.05"), ("alpha", "-1e300"), ("alpha", "1e309"), ("layer", "-1"),
                                      ("mode", "sideways"), ("rank_by", "percent"), ("live", "lots"),
                                      ("dtype", "int8"), ("method", "lda"), ("subspace", "top")])
def test_parser_refuses_out_of_range_and_unknown_values(key, raw):
    values, bad = parse_query({key: raw})
    assert values[key] == PARAMS[key].default
    assert len(bad) == 1 and bad[0].startswith(f"{key}={raw!r} (")


def test_parser_takes_the_range_ends():
    for key in ("rank", "alpha"):
        lo, hi = PARAMS[key].lo, PARAMS[key].hi
        assert parse_query({key: repr(lo)}) == ({**parse_query({})[0], key: lo}, [])
        assert parse_query({key: repr(hi)}) == ({**parse_query({})[0], key: hi}, [])


@pytest.mark.parametrize("family, words", [
    ("paths:{", ("family paths",)),
    ('paths:{"base": "a", "aligned": "b", "variants": {"x": 7}}', ("variants",)),
])
def test_parser_reports_the_family_resolvers_line(family, words, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESUB_ROOTS", str(tmp_path))
    values, bad = parse_query({"family": family})
    assert values["family"] is None and len(bad) == 1
    for w in words:
        assert w in bad[0]


# ------------------------------------------------------------------------------------------------ the app

slow = pytest.mark.slow  # the AppTest runs
PAGES = tuple(PAGE_FILES)


def deep_link(page: str, query: dict | None = None) -> AppTest:
    """The app opened on `page` first, as a browser does for a link to it (no Family page run before)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if query:
        at.query_params.update({k: str(v) for k, v in query.items()})
    if page != "family":
        at.switch_page(PAGE_FILES[page])
    return at.run()


def one_link_line(at: AppTest, *words) -> str:
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    line = at.error[0].value
    assert "\n" not in line and line.startswith("link parameter ") and "default is used" in line, line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


@slow
def test_subspaces_sliders_read_their_ranges_from_the_table(app_env):
    at = deep_link("subspaces")
    assert not at.exception and not at.error, [e.value for e in at.error]
    for key in ("rank", "alpha"):
        proto = at.slider(key=f"w_{key}").proto
        assert (proto.min, proto.max) == pytest.approx((PARAMS[key].lo, PARAMS[key].hi))


@slow
@pytest.mark.parametrize("query, words", [
    ({"rank": "-0.5"}, ("rank='-0.5'",)), ({"rank": "1.5"}, ("rank='1.5'",)),
    ({"rank_by": "energy", "rank": "0"}, ("rank='0'",)), ({"alpha": "1e6"}, ("alpha='1e6'",)),
    ({"alpha": "-7", "rank": "2", "mode": "sideways"}, ("alpha='-7'", "rank='2'", "mode='sideways'")),
])
def test_subspaces_deep_link_out_of_range_is_one_line_and_the_defaults(app_env, query, words):
    at = deep_link("subspaces", query)
    one_link_line(at, *words)
    assert at.slider(key="w_rank").value == pytest.approx(PARAMS["rank"].default)
    assert at.slider(key="w_alpha").value == pytest.approx(PARAMS["alpha"].default)
    assert at.metric, "the read-outs are on screen"


@slow
@pytest.mark.parametrize("family, words", [
    ('paths:{"base": "' + "x", ("family paths",)),
    ('paths:{"base": 5, "aligned": "a", "variants": {"u": "u"}}', ("base",)),
    ('paths:["a", "b"]', ("family",)),
    ("/nonexistent/family.yaml", ("outside the allowed",)),
])
def test_malformed_paths_family_in_a_link_is_one_line_and_the_default_family(app_env, family, words):
    at = deep_link("family", {"family": family, "rank": "9"})
    line = one_link_line(at, "family=", "rank='9'", *words)
    assert "Traceback" not in line
    assert "useful_lora" in set(at.table[0].value.index), "the server's family is shown instead"


@slow
def test_layer_beyond_the_model_is_reported_on_the_activation_map(app_env):
    at = deep_link("activation_map", {"layer": "99", "method": "lda"})
    one_link_line(at, "layer='99'", "method='lda'")
    assert at.slider(key="w_layer").value <= at.slider(key="w_layer").proto.max


@slow
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(page=st.sampled_from(PAGES), query=queries(GOOD))
@example(page="family", query={"family": "tiny-test", "device_map": "~u= 9,mz\u202e\\@M/"})  # an unknown ~user
@example(page="subspaces", query={"family": "tiny-test", "max_memory": " "})  # blank: no max_memory, no error
def test_property_any_link_opens_its_page_with_at_most_one_error_line(app_env, page, query):
    query = {k: str(app_env) if v == "tiny-test" else v for k, v in query.items()}  # the server's own family
    at = deep_link(page, query)
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) <= 1, [e.value for e in at.error]
    for e in at.error:
        assert "\n" not in e.value and e.value.startswith("link parameter "), e.value
    assert at.title, "the page is drawn"


def test_good_link_values_round_trip_through_the_url():
    """What publish_view writes (str of each value) reads back as the same value."""
    view = {"rank": 0.37, "alpha": -0.25, "layer": 1, "mode": "orthogonal", "rank_by": "energy", "live": "6",
            "dtype": "float32", "method": "pca", "subspace": "randomk"}
    values, bad = parse_query({k: str(v) for k, v in view.items()})
    assert not bad and {k: values[k] for k in view} == view
    assert json.loads(json.dumps(values)) == values


# ------------------------------------------------------------------------------------------------ evaluation sets


def test_evaluation_set_links_are_read_by_the_core_and_confined(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESUB_ROOTS", str(tmp_path / "roots"))
    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "qa.csv").write_text("q,a\nWhat is 2 + 2?,4\n")
    (tmp_path / "secret.txt").write_text("SECRET\n")
    good = {"harmful": "harmbench:eval,n=4", "utility": f"{tmp_path}/roots/qa.csv,prompt=q,reference=a",
            "benign": "pairs-benign:eval", "edgy": "overrefusal,split=eval", "convention": "strict"}
    values, bad = parse_query(good)
    assert not bad and {k: values[k] for k in good} == good
    assert all(PARAMS[k].deferred for k in ("harmful", "utility", "benign", "edgy"))
    values, bad = parse_query({"harmful": f"{tmp_path}/secret.txt", "utility": "harmbench",
                               "benign": "pairs-benign,colour=red", "edgy": "", "convention": "loose"})
    assert [b.split("=", 1)[0] for b in bad] == ["harmful", "utility", "benign", "edgy", "convention"]
    assert "outside the allowed folders" in bad[0] and "SECRET" not in " ".join(bad)
    assert "has no reference answers" in bad[1] and "unknown key 'colour'" in bad[2]
    assert all(values[k] is None for k in ("harmful", "utility", "benign", "edgy", "convention"))


@slow
def test_evaluation_sets_from_a_link_reach_the_family_page_and_the_session(app_env):
    at = deep_link("family", {"harmful": "harmbench:eval,n=4", "convention": "strict", "edgy": "nope"})
    line = one_link_line(at, "edgy='nope'", "unknown")
    table = at.table[1].value  # after the checkpoints: the evaluation sets by role
    assert list(table.index) == ["harmful", "utility", "benign", "edgy"] and "Traceback" not in line
    assert table.loc["harmful", "n"] == 4 and table.loc["harmful", "name"] == "harmbench:eval[:4]"
    assert table.loc["utility", "convention"] == "strict" and table.loc["edgy", "name"] == "builtin-edgy:eval"
    assert at.query_params.get("harmful") in (["harmbench:eval,n=4"], "harmbench:eval,n=4")


@slow
def test_evaluation_sets_typed_or_uploaded_on_the_family_page(app_env, tmp_path):
    at = deep_link("family")
    assert not at.exception and not at.error, [e.value for e in at.error]
    (tmp_path / "qa.jsonl").write_text('{"question": "What is 2 + 2?", "answer": "#### 4"}\n')
    at.text_input(key="set_text_utility").set_value(f"{tmp_path}/qa.jsonl,prompt=question")
    next(b for b in at.button if b.label == "Use these sets").click().run()  # a form: submitted with its values
    assert len(at.error) == 1 and "qa.jsonl has no reference answers" in at.error[0].value, \
        [e.value for e in at.error]
    assert not at.query_params.get("utility"), "the sets in use stay"
    assert at.table[1].value.loc["utility", "name"] == "arithmetic:eval"
    at.text_input(key="set_text_utility").set_value(f"{tmp_path}/qa.jsonl,prompt=question,reference=answer")
    next(b for b in at.button if b.label == "Use these sets").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.table[1].value
    assert table.loc["utility", "n"] == 1 and table.loc["utility", "reference field"] == "answer"
    assert at.query_params.get("utility") in ([f"{tmp_path}/qa.jsonl,prompt=question,reference=answer"],
                                             f"{tmp_path}/qa.jsonl,prompt=question,reference=answer")
