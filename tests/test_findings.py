"""The study's experiments on a family (safesub_core.findings): report sections, and numbers that match direct calls."""

import pandas as pd
import pytest

from safesub_core import findings as F
from safesub_core.activations import depth_band_mean
from safesub_core.cache import DiskCache
from safesub_core.errors import SafesubError
from safesub_core.family import Family, resolve_family
from safesub_core.overlap import overlap_summary, weight_overlap
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession

N = 8
CFG = F.FindingsConfig(n_prompts=N, rhos=(0.01, 0.99), gen_tokens=12, energies=(0.5, 0.9))


# ------------------------------------------------------------------------------------------ fast: pure helpers


def test_behaviour_checks_compare_against_numbers_and_other_models():
    b = pd.DataFrame([dict(model="aligned", harmful_refusal=0.95, edgy_refusal=0.2, arithmetic_em=0.3),
                      dict(model="harmful", harmful_refusal=0.1, edgy_refusal=0.0, arithmetic_em=0.2),
                      dict(model="useful", harmful_refusal=0.5, edgy_refusal=0.0, arithmetic_em=0.3)])
    c = F.behaviour_checks(b).set_index(["model", "metric"])
    assert bool(c.loc[("aligned", "harmful_refusal"), "passed"])
    assert not bool(c.loc[("aligned", "edgy_refusal"), "passed"])
    assert bool(c.loc[("harmful", "harmful_refusal"), "passed"])
    assert bool(c.loc[("useful", "arithmetic_em"), "passed"])  # equal counts as >=
    assert F.behaviour_checks(pd.DataFrame(columns=["model"])).empty


def test_md_table_formats_floats_and_escapes_pipes():
    text = F.md_table(pd.DataFrame(dict(a=["x|y"], b=[0.12345], c=[3])))
    assert text.splitlines()[0] == "| a | b | c |"
    assert "x\\|y" in text and "0.12" in text and "| 3 |" in text


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
    for row in result.findings.itertuples():
        assert f"**{row.finding}** ({'holds' if row.holds else 'does not hold'})" in md
    assert "widened" in md  # a 2-layer model: the study's depth band holds no layer
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
    row = result.points.set_index(["variant", "subspace", "mode", "rank_fraction"]).loc[
        ("harmful", "randomk", "orthogonal", 0.99)]
    cfg = ProjectionConfig("randomk", "orthogonal", 0.99)
    live = direct.point_scores("harmful", cfg)
    for k in ("energy_kept", "margin_mean", "share_margin_negative", "nll_mean", "arith_exact_match", "kl_to_start"):
        assert row[k] == pytest.approx(live[k], abs=1e-5), k
    gen, _ = direct.generation_scores("harmful", cfg, max_new_tokens=CFG.gen_tokens)
    assert row["gen_attack_success_rate"] == pytest.approx(gen["attack_success_rate"])
    assert row["gen_exact_match"] == pytest.approx(gen["exact_match"])
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
def test_weight_overlap_matches_direct_calls(result, tiny_family, tmp_path):
    family = Family.from_file(tiny_family)
    direct = overlap_summary(weight_overlap(family, "aligned", CFG.energies, cache=DiskCache(tmp_path / "c")))
    ours = result.weight[result.weight["reference"] == "aligned"].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, direct.reset_index(drop=True))
    assert set(result.weight["reference"]) == {"aligned", "safety_tuned"}
    # F2's verdict is the arg-max pair at the headline energy, in every scope
    at = result.weight[result.weight["energy"] == CFG.headline_energy]
    tops = at.loc[at.groupby(["reference", "scope"])["mso"].idxmax(), "pair"]
    f2 = result.findings.set_index("finding").loc["F2"]
    assert bool(f2["holds"]) == all(t.startswith("harmful-") and "useful-" in t for t in tops)


@pytest.mark.slow
def test_activation_overlap_matches_direct_calls(result, direct):
    sets = F.activation_sets(direct.sets)
    assert len(sets["harmful_a"]) == len(sets["harmful_b"]) == len(sets["useful"]) == N // 2
    assert not set(sets["harmful_a"].prompts) & set(sets["harmful_b"].prompts)
    table = direct.activation_overlap("aligned", sets["useful"], "aligned", sets["harmful_a"], CFG.energies)
    lo, hi = result.band_range
    assert (lo, hi) == (0.5, 1.0)
    expect = depth_band_mean(table, lo, hi).set_index("energy")
    b = result.band
    got = b[(b["model"] == "aligned") & (b["pair"] == "useful vs harmful") & (b["center"] == "uncentred")]
    for row in got.itertuples():
        assert row.mso == pytest.approx(expect.loc[row.energy, "mso"], abs=1e-9)
        assert row.n_layers == 2
    f3 = result.findings.set_index("finding").loc["F3"]
    uh = float(got[got["energy"] == CFG.headline_energy]["mso"].iloc[0])
    assert f"useful-harmful {uh:.3f}" in f3["ours"]


@pytest.mark.slow
def test_f1_verdict_follows_its_criterion(result):
    p = result.points

    def sel(v, m):
        s = p[(p["variant"] == v) & (p["subspace"] == "topk") & (p["mode"] == "parallel")]
        return s.sort_values("rank_fraction")[m].tolist()

    u, nll = sel("useful", "gen_exact_match"), sel("useful", "nll_mean")
    h, neg, mar = sel("harmful", "gen_attack_success_rate"), sel("harmful", "share_margin_negative"), sel(
        "harmful", "margin_mean")
    util_up = u[-1] > u[0] or (u[-1] == u[0] and nll[-1] < nll[0])
    harm_up = h[-1] > h[0] or (h[-1] == h[0] and (neg[-1] > neg[0] or (neg[-1] == neg[0] and mar[-1] < mar[0])))
    f1 = result.findings.set_index("finding").loc["F1"]
    assert bool(f1["holds"]) == (util_up and harm_up)
    assert f"{u[0]:.2f} -> {u[-1]:.2f}" in f1["ours"]


@pytest.mark.slow
def test_run_writes_report_and_figures(tiny_family, tmp_path):
    out, figs = tmp_path / "FINDINGS.md", tmp_path / "figs"
    family = str(tiny_family)
    configs = F.family_configs([family], F.parse_per_family("6"), F.parse_rhos("0.01,0.99"),
                               modes=F.parse_list("parallel,orthogonal"), gen_modes=F.parse_list("parallel"),
                               variants=F.parse_list("useful,harmful"), gen_tokens=8)
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
    assert rank[rank["mode"] == "parallel"]["gen_exact_match"].notna().all()
    assert "(no generation scores in this mode)" in md
    assert (figs / "plotly.min.js").stat().st_size > 1_000_000, "the HTML works offline: plotly.js beside it"
    for name, width in (("rank", 1400), ("weight", 1200), ("activations", 1300)):
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
                lambda: F.parse_rhos_for(["smol=0.1/b"])):
        with pytest.raises(SafesubError, match="expected"):
            bad()


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
