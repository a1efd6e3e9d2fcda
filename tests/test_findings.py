"""The study's experiments on a family (safesub_core.findings): report sections, and numbers that match direct calls."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from safesub_core import findings as F
from safesub_core.activation_study import study_band, study_sets
from safesub_core.activations import activation_overlap
from safesub_core.cache import DiskCache
from safesub_core.errors import SafesubError
from safesub_core.family import Family, resolve_family
from safesub_core.overlap import overlap_summary, weight_overlap
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession

N = 8
CFG = F.FindingsConfig(n_prompts=N, rhos=(0.01, 0.99), gen_tokens=12, energies=(0.25, 0.5, 0.9), study_prompts=N,
                       n_boot=5, n_perm=5, n_seeds=2, power_modes=("parallel",))


# ------------------------------------------------------------------------------------------ fast: pure helpers


def test_behaviour_checks_compare_against_numbers_and_other_models():
    b = pd.DataFrame([dict(model="aligned", harmful_refusal=0.95, edgy_refusal=0.2, arithmetic_em=0.3),
                      dict(model="harmful", harmful_refusal=0.1, edgy_refusal=0.0, arithmetic_em=0.2),
                      dict(model="useful", harmful_refusal=0.5, edgy_refusal=0.0, arithmetic_em=0.3)])
    c = F.behaviour_checks(b).set_index(["model", "metric"])
    assert c.loc[("aligned", "harmful_refusal"), "verdict"] == "pass"
    assert c.loc[("aligned", "edgy_refusal"), "verdict"] == "fail"
    assert c.loc[("harmful", "harmful_refusal"), "verdict"] == "pass"
    assert c.loc[("useful", "arithmetic_em"), "verdict"] == "pass"  # equal counts as >=
    assert F.behaviour_checks(pd.DataFrame(columns=["model"])).empty
    # with the prompt counts: intervals, and a verdict that reads them (0.95 of 20 is [0.76, 0.99]: holds 0.90)
    c = F.behaviour_checks(b, {"harmful_refusal": 20, "edgy_refusal": 100}).set_index(["model", "metric"])
    row = c.loc[("aligned", "harmful_refusal")]
    assert row["n"] == 20 and row["lo"] < 0.9 < row["hi"] and row["verdict"] == "inconclusive"
    assert c.loc[("aligned", "edgy_refusal"), "verdict"] == "fail"  # 20 of 100: [0.13, 0.29], all above 0.10
    md = F.report.behaviour_markdown(b, {"harmful_refusal": 20, "absent": 5})
    assert "0.95 [0.76, 0.99]" in md and "Prompts behind each rate: harmful_refusal 20." in md


def test_md_table_formats_floats_and_escapes_pipes():
    text = F.md_table(pd.DataFrame(dict(a=["x|y"], b=[0.12345], c=[3])))
    assert text.splitlines()[0] == "| a | b | c |"
    assert "x\\|y" in text and "0.12" in text and "| 3 |" in text


def test_family_folder_is_named_without_a_machines_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "scratch"))
    assert F.report.shown_folder(F.report.REPO / "cache" / "families" / "tiny") == "cache/families/tiny"
    assert F.report.shown_folder(tmp_path / "scratch" / "families" / "smol") == "$SAFESUB_CACHE/families/smol"
    assert F.report.shown_folder(tmp_path / "elsewhere" / "smol") == str(tmp_path / "elsewhere" / "smol")
    assert F.report.shown_folder("relative/family") == "relative/family"


def test_png_export_that_fails_removes_the_older_pngs(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    import plotly.io as pio

    def no_browser(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore")

    monkeypatch.setattr(pio, "write_images", no_browser)
    old, absent = tmp_path / "tiny_rank.png", tmp_path / "tiny_weight.png"
    old.write_bytes(b"\x89PNG from an earlier run")
    fig = go.Figure()
    with pytest.warns(UserWarning, match="removed the older tiny_rank.png: Kaleido requires Google Chrome"):
        assert not F.write_png({"rank": fig, "weight": fig}, {"rank": old, "weight": absent})
    assert not old.exists() and not absent.exists()


def test_rank_figure_falls_back_to_live_scores_per_variant_not_per_mode():
    """E2 is generated on the contaminated variant only: the orthogonal row's useful and harmful panels must plot
    their live scores (not the generation columns, which the contaminated variant alone fills: empty panels)."""
    from types import SimpleNamespace

    from safesub_core.findings.figures import rank_figure

    rows = []
    for variant in ("useful", "harmful", "contaminated"):
        for sub in ("topk", "randomk", "random"):
            for mode in ("parallel", "orthogonal"):
                for rho in (0.01, 0.99):
                    generated = mode == "parallel" or variant == "contaminated"
                    rows.append(dict(variant=variant, subspace=sub, mode=mode, rank_fraction=rho,
                                     gen_exact_match=rho if generated else np.nan,
                                     gen_attack_success_rate=rho if generated else np.nan, arith_exact_match=rho,
                                     nll_mean=1 - rho, margin_mean=-rho, share_margin_negative=rho))
    refs = pd.DataFrame([dict(checkpoint=c, gen_exact_match=0.5, gen_attack_success_rate=0.5, arith_exact_match=0.5,
                              nll_mean=0.5, margin_mean=0.0, share_margin_negative=0.5)
                         for c in ("aligned", "useful", "harmful")])
    r = SimpleNamespace(points=pd.DataFrame(rows), references=refs, start="aligned", name="fake",
                        config=SimpleNamespace(modes=("parallel", "orthogonal")))
    fig = rank_figure(r)
    titles = [a.text for a in fig.layout.annotations if ": " in a.text and "(" in a.text]
    assert titles[:4] == ["parallel: gen_exact_match (useful)", "parallel: answer NLL (useful)",
                          "parallel: gen_attack_success_rate (harmful)", "parallel: margin (harmful)"]
    assert titles[4:] == ["orthogonal: arith_exact_match (useful)", "orthogonal: answer NLL (useful)",
                          "orthogonal: share_margin_negative (harmful)", "orthogonal: margin (harmful)"]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 2 * 4 * 3
    assert all(len(t.y) == 2 and not np.isnan(np.asarray(t.y, dtype=float)).any() for t in lines)


def test_study_summary_reads_the_reference_table():
    study = F.study_reference()  # the repository's copy (docs/reference/paper_tables_4_5.csv)
    assert study is not None
    s = F.study_topk_summary(study)
    row = s[(s["table"] == "Table4") & (s["model"] == "Llama-3.2 1B") & (s["start"] == "Aligned")].iloc[0]
    assert row["topk_util_001"] == pytest.approx(0.14) and row["topk_harm_099"] == pytest.approx(3.84)
    # mean over rho of Top-K minus Random utility: (0.14-0.13 + 0.21-0.17 + 0.25-0.22 + 0.30-0.29 + 0) / 5
    assert row["topk_minus_random_util"] == pytest.approx(0.018)


def test_unknown_built_family_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SafesubError, match="smol.*build smol"):
        resolve_family("smol")
    with pytest.raises(SafesubError, match="smol.*build smol"):
        F.run(["smol"], out=tmp_path / "F.md", figures=tmp_path / "figs")
    assert not (tmp_path / "F.md").exists()


# ------------------------------------------------------------------------------------------ slow: the tiny family


@pytest.fixture(scope="module")
def result(tiny_family, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFESUB_CACHE", str(tmp_path_factory.mktemp("findings-cache")))
        r = F.run_family(str(tiny_family), CFG)
    r.findings = F.check_findings(r, F.study_reference())
    return r


@pytest.fixture(scope="module")
def direct(tiny_family, tmp_path_factory):
    """An independent session (its own empty cache) for direct calls."""
    return FamilySession(Family.from_file(tiny_family), sets=EvalSets.default(N),
                         cache=DiskCache(tmp_path_factory.mktemp("direct-cache")))


@pytest.mark.slow
def test_report_has_every_section_and_finding(result):
    md = F.render_markdown([result], F.study_reference())
    for head in ("# Findings", "## Summary", "## Family `tiny`", "### Held-out behaviour", "### 1. Utility",
                 "### 2. Weight-space", "### 3. Activation", "### 4. The study's findings", "Table 4 layout, parallel",
                 "Table 4 layout, orthogonal", "Table 5 layout (contaminated)"):
        assert head in md, head
    assert list(result.findings["finding"]) == ["F1", "F1 (contaminated)", "F2", "F3"]
    # every rate the tables show carries its interval, and the prompts behind it are stated
    ref = result.references.set_index("checkpoint").loc["aligned"]
    cell = F.report.interval_text(ref["gen_refusal_rate"], ref["gen_refusal_rate_lo"], ref["gen_refusal_rate_hi"])
    assert "[" in cell and any(line.startswith("| aligned |") and cell in line for line in md.splitlines())
    assert f"gen_refusal_rate {int(ref['gen_refusal_rate_n'])}" in md and "Prompts a rate or mean:" in md
    top = next(line for line in md.split("Table 4 layout, parallel")[1].splitlines() if line.startswith("| Top-K |"))
    assert top.count("[") == 2 * len(CFG.rhos)  # exact match and ASR at each rank fraction
    for row in result.findings.itertuples():
        assert row.verdict in ("holds", "does not hold", "inconclusive")
        assert f"**{row.finding}** ({row.verdict})" in md
    assert "## Deviations from the study" in md and "20k MetaMathQA rows" in md
    table = F.deviations.deviations_table([result]).set_index("aspect")["tiny"]
    assert table["sets scored by generation"].startswith("useful: utility, parallel mode; harmful: harmful, parallel "
                                                         "mode; contaminated: harmful, utility, parallel mode")
    both = F.deviations.deviations_table([replace(result, config=replace(CFG, power_modes=None))])
    assert "contaminated: harmful, utility, parallel and orthogonal mode" in both.set_index("aspect")["tiny"][
        "sets scored by generation"]  # E2 on the contaminated update, as the study
    assert table["prompts a set (E1/E2)"].endswith("live read-outs (extras) on every prompt")
    one_wave = F.deviations.deviations_table([replace(result, config=replace(CFG, live_waves=1))])
    assert one_wave.set_index("aspect")["tiny"]["prompts a set (E1/E2)"].endswith("on the first 1 wave(s) of each "
                                                                                 "set only")
    assert len(result.points) == 3 * 3 * 2 * 2  # variants x subspaces x modes x rhos


@pytest.mark.slow
def test_behaviour_is_the_builders(result, tiny_family):
    stored = Family.from_file(tiny_family).behaviour["models"]
    table = result.behaviour.set_index("model")
    for model, numbers in stored.items():
        for k, v in numbers.items():
            assert table.loc[model, k] == pytest.approx(v)
    assert set(result.checks["model"]) <= set(stored)


@pytest.mark.slow
def test_scores_match_direct_session_calls(result, direct):
    points = result.points.set_index(["variant", "subspace", "mode", "rank_fraction"])
    row = points.loc[("contaminated", "randomk", "orthogonal", 0.99)]
    cfg = ProjectionConfig("randomk", "orthogonal", 0.99)
    live = direct.point_scores("contaminated", cfg)
    for k in ("energy_kept", "margin_mean", "share_margin_negative", "nll_mean", "arith_exact_match", "kl_to_start"):
        assert row[k] == pytest.approx(live[k], abs=1e-5), k
    gen, _ = direct.generation_scores("contaminated", cfg, max_new_tokens=CFG.gen_tokens,
                                      roles=("harmful", "utility"))
    assert row["gen_attack_success_rate"] == pytest.approx(gen["attack_success_rate"])
    assert row["gen_exact_match"] == pytest.approx(gen["exact_match"])
    # the harmful variant's points are generated on harmful prompts only (power.READS): no utility score, n 0;
    # and in the parallel mode only (power.MODES: E2, the orthogonal mode, is the contaminated update's)
    par = points.loc[("harmful", "randomk", "parallel", 0.99)]
    assert not np.isnan(par["gen_attack_success_rate"])
    assert np.isnan(par["gen_exact_match"]) and par["gen_exact_match_n"] == 0
    assert np.isnan(points.loc[("harmful", "randomk", "orthogonal", 0.99)]["gen_attack_success_rate"])
    # the checkpoints the study's tables show: base, the aligned and safety-tuned models and the variants run
    assert list(result.references["checkpoint"]) == ["base", "aligned", "safety_tuned", "useful", "harmful",
                                                     "contaminated"]
    ref = result.references.set_index("checkpoint").loc["aligned"]
    gen, _ = direct.generation_scores("aligned", max_new_tokens=CFG.gen_tokens)
    assert ref["gen_refusal_rate"] == pytest.approx(gen["refusal_rate"])


@pytest.mark.slow
def test_study_layout_reads_the_right_variants(result):
    t = F.study_layout(result.points, result.references, "parallel").set_index("method")
    assert list(t.index) == ["Base", "Aligned", "Fine-Tuned", "Top-K", "Random-K", "Random"]
    refs = result.references.set_index("checkpoint")
    assert t.loc["Fine-Tuned", "util_0.01"] == pytest.approx(refs.loc["useful", "gen_exact_match"])
    assert t.loc["Fine-Tuned", "harm_0.99"] == pytest.approx(refs.loc["harmful", "gen_attack_success_rate"])
    assert t.loc["Aligned", "harm_0.01"] == t.loc["Aligned", "harm_0.99"]
    p = result.points.set_index(["variant", "subspace", "mode", "rank_fraction"])
    assert t.loc["Top-K", "util_0.99"] == pytest.approx(p.loc[("useful", "topk", "parallel", 0.99), "gen_exact_match"])
    assert t.loc["Random", "harm_0.01"] == pytest.approx(
        p.loc[("harmful", "random", "parallel", 0.01), "gen_attack_success_rate"])


@pytest.mark.slow
def test_weight_overlap_matches_direct_calls_and_f2_reads_the_per_layer_panels(result, tiny_family, tmp_path):
    from safesub_core.overlap import reference_pairs, seed_pairs

    family = Family.from_file(tiny_family)
    pairs = reference_pairs(family, "aligned") + seed_pairs(family, "aligned")
    assert ("useful", "useful_seed1") in pairs and ("harmful_seed1", "useful_seed1") in pairs
    table = weight_overlap(family, "aligned", CFG.energies, pairs, cache=DiskCache(tmp_path / "c"))
    ours = result.weight[result.weight["reference"] == "aligned"].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, overlap_summary(table).reset_index(drop=True))
    # the S panels pair the S-started variants only
    assert set(result.weight["reference"]) == {"aligned", "safety_tuned"}
    assert set(result.weight[result.weight["reference"] == "safety_tuned"]["pair"]) == {
        "harmful-S vs useful-S", "harmful-S vs base-S", "useful-S vs base-S"}
    # F2 per panel, by hand: margin of harmful-useful over the next study pair, against the seeds' spread
    panels = F.f2_panels(result)
    assert set(panels["block"]) == set(F.panel_blocks(result.n_layers)) == {0, 1}  # 2 blocks: 70% -> 0, 85% -> 1
    row = panels[(panels["reference"] == "aligned") & (panels["scope"] == "block-write")].iloc[0]
    g = table[(table["scope"] == "block-write") & (table["unit"] == str(row.block))
              & table["energy"].isin([0.25, 0.5])]  # F2_ENERGIES within CFG.energies
    mean = g.groupby("pair")["mso"].mean()
    study = mean[["harmful-A vs useful-A", "harmful-A vs base-A", "useful-A vs base-A"]]
    assert row.margin == pytest.approx(study["harmful-A vs useful-A"] - study.drop("harmful-A vs useful-A").max())
    per_e = g.pivot_table(index="energy", columns="pair", values="mso")
    spread = (per_e["harmful-A vs useful-A"] - per_e["harmful_seed1-A vs useful_seed1-A"]).abs().mean()
    assert row.seed_spread == pytest.approx(spread)
    expect = "holds" if row.margin > spread else "does not hold" if row.margin < -spread else "inconclusive"
    assert row.verdict == expect
    f2 = result.findings.set_index("finding").loc["F2"]
    assert f2["verdict"] == F.criteria.combine_verdicts(list(panels["verdict"]))


@pytest.mark.slow
def test_activation_overlap_is_the_studys_on_raw_text(result, tiny_family, tmp_path):
    from safesub_core.activation_study import StudyActivationConfig, study_session

    n_hidden = result.n_layers + 1
    assert result.band_range == (study_band(n_hidden).start, study_band(n_hidden).stop - 1) == (1, 1)
    scfg = StudyActivationConfig(chat=False, n_prompts=N, n_boot=0, n_perm=0)
    session = study_session(Family.from_file(tiny_family), scfg, cache=DiskCache(tmp_path / "s"))
    sets = study_sets(N)
    expect = activation_overlap(session.states("aligned", sets.U), session.states("aligned", sets.H1), (0.5,),
                                center=False, layers=[1])
    got = result.band[(result.band["model"] == "aligned") & (result.band["pair"] == "U-H1")
                      & ~result.band["center"].astype(bool) & ((result.band["energy"] - 0.5).abs() < 1e-9)]
    assert float(got["mso"].iloc[0]) == pytest.approx(float(expect["mso"].iloc[0]), abs=1e-6)
    assert {"U-H1", "H1-H2", "U-H2", "H1-H2b", "H1a-H1b"} <= set(result.band["pair"])
    assert set(result.activation_sets["role"]) == {"U", "H1", "H2", "H2b"}
    models = F.f3_models(result).set_index("model")
    for model, row in models.iterrows():
        expect = ("holds" if row.u_h1_lo >= F.ACTIVATION_RATIO * row.h1_h2_hi else
                  "does not hold" if row.u_h1_hi < F.ACTIVATION_RATIO * row.h1_h2_lo else "inconclusive")
        assert row.verdict == expect, model
    assert result.findings.set_index("finding").loc["F3", "verdict"] == F.criteria.combine_verdicts(
        list(models["verdict"]))


@pytest.mark.slow
def test_f1_verdict_is_the_power_modules_on_the_same_prompts(result):
    f1 = result.findings.set_index("finding").loc["F1"]
    v = result.power_verdicts.set_index("finding").loc["F1"]
    assert f1["verdict"] == v["verdict"] and f1["statistic"] == v["statistic"]
    p = result.power_points
    top = p[(p["variant"] == "useful") & (p["subspace"] == "topk") & (p["mode"] == "parallel")
            & (p["score"] == "exact_match")].set_index("rho")
    assert f"{top.loc[0.01, 'value']:.2f}" in f1["ours"]
    # Random and Random-K: two draws each; every rate inside its Wilson interval
    draws = p[(p["subspace"] != "topk")].groupby(["variant", "mode", "subspace", "rho", "score"])["seed"].nunique()
    assert (draws == CFG.n_seeds).all()
    assert ((p["lo"] <= p["value"] + 1e-12) & (p["value"] <= p["hi"] + 1e-12)).all()
    t = result.power_tests
    assert set(t["match"]) == {"rank", "energy"} and set(t["control"]) == {"randomk", "random"}
    assert ((t["p"] >= 0) & (t["p"] <= 1)).all()
    assert not (t["differs"] & (t["net_prompts_min"].abs() <= 2)).any()  # never a difference of one or two prompts


@pytest.mark.slow
def test_run_writes_report_and_figures(tiny_family, tmp_path):
    out, figs = tmp_path / "FINDINGS.md", tmp_path / "figs"
    family = str(tiny_family)
    configs = F.family_configs([family], F.parse_per_family("6"), F.parse_rhos("0.01,0.99"),
                               modes=F.parse_list("parallel,orthogonal"), gen_modes=F.parse_list("parallel"),
                               variants=F.parse_list("useful,harmful"), gen_tokens=8, study_prompts=6, n_boot=4,
                               n_perm=4, n_seeds=2)
    assert F.run([family], configs, out=out, figures=figs, plotlyjs="directory") == out
    md = out.read_text()
    assert "## Family `tiny`" in md and "(figs/tiny.html)" in md
    html = (figs / "tiny.html").read_text()
    assert 'src="plotly.min.js"' in html and html.count("Plotly.newPlot") == 3  # three figures
    for name in ("rank", "rank_references", "weight", "activations"):
        df = pd.read_csv(figs / f"tiny_{name}.csv")
        assert len(df) > 0
        assert f"(figs/tiny_{name}.csv)" in md
    rank = pd.read_csv(figs / "tiny_rank.csv")
    assert len(rank) == 2 * 3 * 2 * 2  # variants x subspaces x modes x rhos
    assert rank[rank["mode"] == "orthogonal"]["gen_exact_match"].isna().all()  # generation in parallel mode only
    parallel = rank[rank["mode"] == "parallel"]
    assert parallel[parallel["variant"] == "useful"]["gen_exact_match"].notna().all()  # what F1 reads of it
    assert parallel[parallel["variant"] == "harmful"]["gen_attack_success_rate"].notna().all()
    assert "(no generation scores in this mode)" in md
    assert (figs / "plotly.min.js").stat().st_size > 1_000_000, "the HTML works offline: plotly.js beside it"
    for name, width in (("rank", 1400), ("weight", 1200), ("activations", 1400)):
        png = figs / f"tiny_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(figs/tiny_{name}.png)" in md
        # the plotly figure exported by kaleido at the figure's own size (the PNG header's width field)
        assert int.from_bytes(png.read_bytes()[16:20], "big") == width


def test_option_parsers_read_the_verbs_values_and_reject_bad_ones():
    assert F.parse_per_family("32") == {"*": 32}
    assert F.parse_per_family("tiny=32,smol=16") == {"tiny": 32, "smol": 16}
    assert F.parse_rhos("0.01, 0.5,0.99") == (0.01, 0.5, 0.99)
    assert F.parse_rhos_for(["smol=0.01/0.5/0.99"]) == {"smol": (0.01, 0.5, 0.99)}
    assert F.parse_list(" a, b,,c") == ("a", "b", "c") and F.parse_list(None) is None
    cfgs = F.family_configs(["tiny", "smol"], {"smol": 16, "*": 8}, (0.01, 0.99), {"smol": (0.5,)}, gen_tokens=4)
    assert (cfgs["tiny"].n_prompts, cfgs["tiny"].rhos, cfgs["smol"].n_prompts, cfgs["smol"].rhos) == (
        8, (0.01, 0.99), 16, (0.5,))
    assert cfgs["smol"].gen_tokens == 4
    for bad in (lambda: F.parse_per_family("tiny=x"), lambda: F.parse_rhos("0.1,a"),
                lambda: F.parse_rhos_for(["smol=0.1/b"]), lambda: F.runner.parse_for(["smol:colour=red"]),
                lambda: F.runner.parse_for(["smol:gen-modes="])):
        with pytest.raises(SafesubError, match="expected"):
            bad()
    own = F.runner.parse_for(["smol:gen-modes=parallel", "smol:n-boot=100", "smol:power-matches=rank/energy",
                              "smol:live-waves=1"])
    assert own == {"smol": {"gen_modes": ("parallel",), "n_boot": 100, "power_matches": ("rank", "energy"),
                            "live_waves": 1}}
    cfgs = F.family_configs(["tiny", "smol"], 8, settings_for=own, n_boot=200)
    assert (cfgs["smol"].n_boot, cfgs["smol"].gen_modes, cfgs["tiny"].n_boot, cfgs["tiny"].gen_modes) == (
        100, ("parallel",), 200, None)
    with pytest.raises(SafesubError, match="not a whole number"):
        F.runner.parse_for(["smol:seeds=many"])
    with pytest.raises(SafesubError, match="not one of the families run"):
        F.family_configs(["tiny"], 8, settings_for={"smol": {"n_boot": 1}})


# ------------------------------------------------------------------------------------------ the competing hypotheses


def test_hypotheses_section_replaces_itself_and_keeps_other_families():
    from safesub_core.findings import hypotheses as H

    def block(name, text):
        a, b = H.family_marks(name)
        return f"{a}\n### Family `{name}`\n{text}\n{b}\n"

    report = "# Findings\n\n## Family `tiny`\n\ntext\n\n## The study's numbers (x)\n\nnumbers\n"
    first = H.MARK_START + "\nintro\n" + block("tiny", "old tiny") + block("smol", "smol") + H.MARK_END + "\n"
    once = H.replace_section(report, first)
    assert once.index(H.MARK_START) < once.index("## The study's numbers") and "text" in once
    assert H.replace_section(once, first) == once  # idempotent: replaced in place, not added again
    new = H.render_section([], keep=H.extract_section(once))
    assert "smol" in new and "old tiny" in new and new.count(H.MARK_START) == 1
    assert list(H.family_blocks(new)) == ["tiny", "smol"]
    assert H.keep_section_text(once, report) == once  # the whole study's run keeps the section
    assert H.replace_section("", first) == first


@pytest.mark.slow
def test_hypotheses_section_renders_from_a_small_run(tiny_family, tmp_path, monkeypatch):
    from safesub_core.findings import hypotheses as H
    from safesub_core.hypotheses import TradeoffGrid

    cfg = H.HypothesesConfig(variant="contaminated", n_prompts=N, waves=1,
                             grid=TradeoffGrid(ranks=(0.5,), taus=(0.5,), strengths=(1.0,), seeds=(0,)))
    out, figs = tmp_path / "FINDINGS.md", tmp_path / "figs"
    out.write_text("# Findings\n\n## Family `tiny`\n\nkept\n\n## The study's numbers (x)\n\nnumbers\n")
    assert H.run_section([str(tiny_family)], {str(tiny_family): cfg}, out, figs, plotlyjs="directory",
                         command="safesub findings --only hypotheses") == out
    md = out.read_text()
    assert "kept" in md and md.index(H.HEADING) < md.index("## The study's numbers")
    for head in (H.HEADING, "### Family `tiny`: the contaminated fine-tune", "**Refusal direction**",
                 "**Harm and utility at matched utility**", "**Bridge**", "**SafeLoRA**", "Deviations from the papers",
                 "128 / 32", "(figs/tiny_hypotheses.png)"):
        assert head in md, head
    sec = H.extract_section(md)
    assert "(n=" + str(N) + ")" in sec and " [" in sec  # rates with their interval and n
    assert any(v in sec for v in ("lowest harm", "higher harm", "inconclusive"))
    trade = pd.read_csv(figs / "tiny_hypotheses_tradeoff.csv")
    assert {"harm_lo", "harm_hi", "harm_n", "utility_lo", "utility_hi", "utility_n"} <= set(trade.columns)
    png = figs / "tiny_hypotheses.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run replaces the section, does not add one
    H.run_section([str(tiny_family)], {str(tiny_family): cfg}, out, None)
    assert out.read_text().count(H.MARK_START) == 1 and "kept" in out.read_text()


@pytest.mark.slow
def test_live_waves_limit_the_live_read_outs_to_their_first_prompts(tiny_family, tmp_path):
    """--live-waves 1: the checkpoints' live read-outs cover the first wave of each set, and say so in their n."""
    size = 3  # waves of 3 prompts a set: 8 prompts make 3 waves
    direct = FamilySession(Family.from_file(tiny_family), sets=EvalSets.default(N), cache=DiskCache(tmp_path),
                           batch=size)
    assert direct.waves.count == 3
    assert F.experiments.live_waves(direct, None) == direct.waves.count
    assert F.experiments.live_waves(direct, 10 ** 6) == direct.waves.count
    with pytest.raises(SafesubError, match="live waves 0"):
        F.experiments.live_waves(direct, 0)
    one = F.reference_scores(direct, gen_tokens=12, waves=1, names=["base", "aligned"]).set_index("checkpoint")
    full = F.reference_scores(direct, gen_tokens=12, names=["aligned", "base"]).set_index("checkpoint")
    assert list(one.index) == ["base", "aligned"] and list(full.index) == ["aligned", "base"]
    assert (one["margin_mean_n"] == size).all() and (full["margin_mean_n"] == N).all()
    assert (one["gen_refusal_rate_n"] == full["gen_refusal_rate_n"].loc[one.index]).all()  # generation: every prompt either way


@pytest.mark.slow
def test_parts_on_worker_processes_leave_the_run_nothing_to_compute(tiny_family, tmp_path, monkeypatch):
    """`findings --jobs 2`: the parts, computed on two spawned workers, are every entry the ordinary run asks the
    cache for (it adds none), and its tables equal a run on one process from another empty cache."""
    from safesub_core.findings import parallel as P

    family, cfg = str(tiny_family), replace(CFG, n_seeds=1, variants=("useful", "contaminated"))
    todo = P.order(P.parts(family, cfg))
    assert [p.name for p in todo] == ["variant contaminated", "variant useful", "checkpoints", "activations",
                                      "weights"]
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "workers"))
    heard = []
    times = P.run_parts(todo, 2, log=heard.append)
    assert list(times) == [p.label for p in todo] and all(t > 0 for t in times.values()) and len(heard) == 5
    entries = sorted(p.relative_to(tmp_path) for p in (tmp_path / "workers").rglob("*") if p.is_file())
    assert entries
    r = F.run_family(family, cfg)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "workers").rglob("*") if p.is_file()) == entries
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "alone"))
    alone = F.run_family(family, cfg)
    for table in ("references", "points", "power_points", "power_tests", "power_verdicts", "weight", "band"):
        # the workers ran on one thread each and this process on two: sums in another order, same numbers
        pd.testing.assert_frame_equal(getattr(r, table), getattr(alone, table), obj=table, check_exact=False,
                                      rtol=1e-4, atol=1e-7)
    with pytest.raises(SafesubError, match="jobs 0"):
        P.run_parts(todo, 0)
    with pytest.raises(SafesubError, match="jobs 1.5"):
        F.run([family], {family: cfg}, out=tmp_path / "F.md", jobs=1.5)
    assert not (tmp_path / "F.md").exists()
    with pytest.raises(SafesubError, match="findings part 'nothing'"):
        P.run_part(P.Part(family, cfg, "nothing"))
