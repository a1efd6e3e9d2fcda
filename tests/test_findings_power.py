"""E1/E2 with power (safesub_core.findings.power): verdicts on synthetic outcomes, paired intervals and tests, energy
matching and the long table on the test-size tiny family (few prompts, two rank fractions, two seeds)."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from safesub_core.cache import DiskCache
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.findings import energy as E
from safesub_core.findings import power as P
from safesub_core.projection import ProjectionConfig
from safesub_core.prompts import EvalSets
from safesub_core.session import FamilySession
from safesub_core.stats import VERDICTS, mcnemar

N_PROMPTS = 6
TOKENS = 8


def _pairs(both: int, only_before: int, only_after: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Per-prompt outcomes (before, after) of a paired 2x2 table."""
    before = [True] * both + [True] * only_before + [False] * only_after + [False] * neither
    after = [True] * both + [False] * only_before + [True] * only_after + [False] * neither
    return before, after


# ------------------------------------------------------------------------------------------ pure: intervals, verdicts


def test_paired_difference_matches_the_published_newcombe_interval():
    # Cavo et al. 2012 (Fagerland, Lydersen & Laake, ch. 8): rows = first measure, columns = second; the book's
    # Newcombe square-and-add interval of p1+ - p+1 is -0.062 (-0.119 to -0.005)
    second, first = [], []
    for f, s, count in ((1, 1, 59), (1, 0, 6), (0, 1, 16), (0, 0, 80)):
        first += [bool(f)] * count
        second += [bool(s)] * count
    d = P.paired_difference(second, first)  # rate(first) - rate(second)
    assert d.n == 161
    assert d.value == pytest.approx(-10 / 161)
    assert d.lo == pytest.approx(-0.119, abs=6e-4) and d.hi == pytest.approx(-0.005, abs=6e-4)


def test_paired_difference_is_positive_correlation_aware_and_contains_the_value():
    before, after = _pairs(20, 2, 10, 8)
    d = P.paired_difference(before, after)
    assert d.value == pytest.approx(8 / 40) and d.lo < d.value < d.hi
    # the same marginal rates with no pairing information (independent-looking table) give a wider interval
    b2, a2 = _pairs(13, 9, 17, 1)
    assert (b2.count(True), a2.count(True)) == (before.count(True), after.count(True))
    d2 = P.paired_difference(b2, a2)
    assert d2.value == pytest.approx(d.value) and (d2.hi - d2.lo) > (d.hi - d.lo)
    with pytest.raises(SafesubError):
        P.paired_difference([True, False], [True])


def test_f1_clear_rise_holds():
    u0, u1 = _pairs(4, 0, 20, 16)  # exact match 4/40 -> 24/40, only gains
    h0, h1 = _pairs(5, 1, 18, 16)  # attack success 6/40 -> 23/40
    v = P.f1_from_outcomes(u0, u1, h0, h1)
    assert v.verdict == "holds"
    assert [c.verdict for c in v.changes] == ["holds", "holds"]
    assert all(c.diff.lo > 0 for c in v.changes)
    assert v.threshold == 0.0 and "McNemar" in v.test and "Newcombe" in v.statistic
    assert v.p_values["utility"] == pytest.approx(mcnemar(u0, u1).p) and v.p_values["utility"] < 1e-4
    assert v.changes[0].net == 20 and v.changes[1].net == 17
    assert P.F1_CLAIM in v.claim and "holds" in v.text()
    row = v.row()
    assert row["verdict"] == "holds" and row["p_harm"] == pytest.approx(v.p_values["harm"])


def test_f1_clear_fall_does_not_hold_even_when_harm_rises():
    u0, u1 = _pairs(4, 20, 0, 16)  # exact match 24/40 -> 4/40
    h0, h1 = _pairs(5, 1, 18, 16)
    v = P.f1_from_outcomes(u0, u1, h0, h1)
    assert v.changes[0].diff.hi < 0 and v.changes[0].verdict == "does not hold"
    assert v.changes[1].verdict == "holds"
    assert v.verdict == "does not hold"


def test_f1_one_or_two_prompts_never_decide():
    # two prompts out of two: Newcombe's interval alone lies above 0, yet two prompts decide nothing
    u0, u1 = _pairs(0, 0, 2, 0)
    c = P.change(u0, u1, "utility", "useful", "exact_match")
    assert c.diff.lo > 0 and c.net == 2
    assert c.verdict == "inconclusive"
    assert P.f1_from_outcomes(u0, u1, u0, u1).verdict == "inconclusive"
    # two prompts out of two fewer: not "does not hold" either
    assert P.change(u1, u0, "utility", "useful", "exact_match").verdict == "inconclusive"
    # one prompt of 200 beside a clear harm rise
    b, a = _pairs(50, 0, 1, 149)
    h0, h1 = _pairs(5, 1, 60, 134)
    v = P.f1_from_outcomes(b, a, h0, h1)
    assert v.changes[0].verdict == "inconclusive" and v.changes[1].verdict == "holds"
    assert v.verdict == "inconclusive"


def test_f1_interval_crossing_zero_is_inconclusive():
    u0, u1 = _pairs(10, 2, 6, 22)  # net +4 prompts of 40: more than two, but the interval crosses 0
    c = P.change(u0, u1, "utility", "useful", "exact_match")
    assert c.net == 4 and c.diff.lo < 0 < c.diff.hi
    assert c.verdict == "inconclusive"
    h0, h1 = _pairs(5, 1, 18, 16)
    assert P.f1_from_outcomes(u0, u1, h0, h1).verdict == "inconclusive"
    assert P.combine_verdicts(["holds", "inconclusive"]) == "inconclusive"
    assert P.combine_verdicts(["inconclusive", "does not hold"]) == "does not hold"


def test_mismatched_prompts_are_a_one_line_error():
    def table(prompts, refused):
        return pd.DataFrame(dict(role=["harmful"] * len(prompts), prompt=prompts, refused=refused))

    a = table(["p1", "p2", "p3"], [True, False, True])
    with pytest.raises(SafesubError) as err:
        P.paired_outcomes(a, table(["p1", "p2"], [True, True]), "attack_success_rate")
    assert "\n" not in str(err.value) and "3 and 2 prompts" in str(err.value)
    with pytest.raises(SafesubError, match="different prompts"):
        P.paired_outcomes(a, table(["p1", "p2", "p4"], [True, True, True]), "attack_success_rate")
    with pytest.raises(SafesubError) as err:
        P.change([True, False, True], [True], "utility", "useful", "exact_match")
    assert "\n" not in str(err.value)
    with pytest.raises(SafesubError) as err:
        P.f1_from_outcomes([True] * 5, [True] * 4, [True] * 5, [True] * 5)
    assert "\n" not in str(err.value)
    with pytest.raises(SafesubError):
        P.seed_test(a, table(["p1"], [True]), "attack_success_rate", 0, 0.1, 0.1)
    # same prompts: attack success is the negation of refusal, and the pairing follows the prompts
    x, y = P.paired_outcomes(a, table(["p1", "p2", "p3"], [False, False, True]), "attack_success_rate")
    assert x.tolist() == [False, True, False] and y.tolist() == [True, True, False]


def test_seed_tests_combine_by_the_largest_p():
    def st(seed, before, after):
        return P.SeedTest(seed, mcnemar(before, after), P.net_prompts(before, after), 0.3, 0.3)

    strong = st(0, *_pairs(0, 0, 20, 20))
    weak = st(1, *_pairs(0, 1, 4, 35))
    c = P.combine([strong, weak])
    assert c["p"] == pytest.approx(max(strong.test.p, weak.test.p)) == pytest.approx(weak.test.p)
    assert c["p_seeds"] == (strong.test.p, weak.test.p) and c["seeds"] == (0, 1)
    assert c["net_prompts_min"] == 3 and not c["differs"]
    assert P.combine([strong, st(1, *_pairs(0, 0, 12, 28))])["differs"]
    # opposite signs never "differ", however small the p-values
    assert not P.combine([strong, st(1, *_pairs(0, 20, 0, 20))])["differs"]


def test_closest_on_grid_finds_the_nearest_step():
    steps = np.array([0.0, 0.05, 0.3, 0.31, 0.7, 0.9])

    def up(rho):
        return float(steps[min(len(steps) - 1, int(rho * len(steps)))])

    grid = 200
    for target in (0.0, 0.04, 0.2, 0.305, 0.5, 0.69, 0.95, 2.0):
        rho, e = E.closest_on_grid(up, target, increasing=True, grid=grid)
        best = min(abs(up(i / grid) - target) for i in range(1, grid + 1))
        assert abs(e - target) == pytest.approx(best) and e == up(rho)
        rho, e = E.closest_on_grid(lambda r: 1 - up(r), 1 - target, increasing=False, grid=grid)
        assert abs(e - (1 - target)) == pytest.approx(best)


def test_power_config_validates():
    with pytest.raises(SafesubError):
        P.PowerConfig(n_seeds=0)
    with pytest.raises(SafesubError):
        P.PowerConfig(rhos=(0.0,))
    with pytest.raises(SafesubError):
        P.PowerConfig(matches=("bogus",))
    with pytest.raises(SafesubError, match="mode"):
        P.PowerConfig(variant_modes={"useful": ("sideways",)})
    assert P.PowerConfig(n_seeds=3).seeds == (0, 1, 2)


def test_each_variant_is_scored_in_the_studys_modes():
    """E1 (parallel) on every variant, E2 (orthogonal) on the contaminated update only; always within `modes`, and a
    variant the map does not name gets every mode."""
    cfg = P.PowerConfig()
    assert cfg.modes_of("useful") == cfg.modes_of("harmful") == ("parallel",)
    assert cfg.modes_of("contaminated") == ("parallel", "orthogonal")
    assert cfg.modes_of("useful_lora") == ("parallel", "orthogonal")
    assert P.PowerConfig(modes=("parallel",)).modes_of("contaminated") == ("parallel",)
    assert P.PowerConfig(modes=("orthogonal",)).modes_of("useful") == ()
    assert P.PowerConfig(variant_modes={}).modes_of("useful") == ("parallel", "orthogonal")


# ------------------------------------------------------------------------------------------ the tiny family


@pytest.fixture(scope="module")
def session(tiny_family, tmp_path_factory):
    return FamilySession(Family.from_file(tiny_family), sets=EvalSets.default(N_PROMPTS),
                         cache=DiskCache(tmp_path_factory.mktemp("power-cache")))


CFG = P.PowerConfig(rhos=(0.01, 0.99), n_seeds=2, gen_tokens=TOKENS, reads={}, variant_modes={})  # all sets, modes


@pytest.mark.slow
def test_a_variant_is_generated_on_the_sets_its_findings_read(session):
    """By default (power.READS) the useful variant's points are scored on utility prompts only and the harmful
    variant's on harmful prompts only; the contaminated variant gets both, a variant READS does not name all."""
    cfg = P.PowerConfig(rhos=(0.5,), n_seeds=1, subspaces=("topk", "random"), modes=("parallel",), gen_tokens=TOKENS)
    assert cfg.roles("contaminated") == ("harmful", "utility") and cfg.roles("other") == P.ROLES
    for variant, score in (("useful", {"exact_match"}), ("harmful", {"refusal_rate", "attack_success_rate"})):
        df = P.power_points(session, variant, cfg)
        assert set(df["score"]) == score and len(df) == 2 * len(score)
        pc = ProjectionConfig("topk", "parallel", 0.5)
        _, table = session.generation_scores(variant, pc, max_new_tokens=TOKENS, roles=cfg.roles(variant),
                                             compute=False, forward_scores=False)
        assert set(table["role"]) == set(cfg.roles(variant)) and len(table) == N_PROMPTS
        # no forward-pass column (no finding reads one), and the result is cached apart from one that has it
        assert not {"margin", "nll"} & set(table.columns)
        assert session.generation_scores(variant, pc, max_new_tokens=TOKENS, roles=cfg.roles(variant),
                                         compute=False) is None
        summary, full = session.generation_scores(variant, pc, max_new_tokens=TOKENS, roles=cfg.roles(variant))
        assert {"margin", "nll"} & set(full.columns)
        assert full["completion"].tolist() == table["completion"].tolist()  # the same greedy completions
        assert summary == P.generation_point(session, variant, pc, None, cfg)[0]  # and the same rates
    # a variant none of whose study modes is run gets no points (not every mode)
    assert P.power_points(session, "useful", dataclasses.replace(cfg, modes=("orthogonal",))).empty
    with pytest.raises(SafesubError, match="prompt sets read for useful"):
        P.PowerConfig(reads={"useful": ("benign",)})
    with pytest.raises(SafesubError, match="generation roles"):
        session.generation_scores("useful", ProjectionConfig("topk", "parallel", 0.5), roles=("nonsense",))


@pytest.mark.slow
def test_power_points_long_table(session):
    seen = []
    df = P.power_points(session, "useful", CFG, progress=lambda d, t, m: seen.append((d, t)))
    assert list(df.columns) == P.POINT_COLUMNS
    # Top-K: 2 modes x 2 rhos; each control: 2 seeds x 2 modes x 2 rhos; 4 scores each
    assert len(df) == (4 + 2 * 2 * 2 * 2) * len(P.SCORES)
    assert seen[-1][0] == seen[-1][1] == 4 + 16
    assert df["n"].eq(N_PROMPTS).all()
    assert ((df["lo"] <= df["value"] + 1e-12) & (df["value"] <= df["hi"] + 1e-12)).all()
    assert (df["hi"] - df["lo"] > 0).all()  # 6 prompts never pin a rate
    assert np.allclose(df["value"], df["k"] / df["n"])
    topk = df[df["subspace"] == "topk"]
    assert topk["seed"].isna().all() and df[df["subspace"] != "topk"]["seed"].notna().all()
    assert set(df["mode"]) == {"parallel", "orthogonal"} and set(df["score"]) == set(P.SCORES)
    # harmful prompts: attack success is one minus refusal at every point
    for _, g in df.groupby(["mode", "subspace", "seed", "rho"], dropna=False):
        v = g.set_index("score")["value"]
        assert v["attack_success_rate"] + v["refusal_rate"] == pytest.approx(1.0)
    # E2's energy kept is the complement of E1's at the same point (E = kept / task energy)
    for (sub, seed, rho), g in df.groupby(["subspace", "seed", "rho"], dropna=False):
        e = g.groupby("mode")["energy_kept"].first()
        assert e["parallel"] + e["orthogonal"] == pytest.approx(1.0)
    # the numbers are the session's own: a cached generation summary and the draw's diagnostics
    row = df[(df["subspace"] == "random") & (df["seed"] == 1) & (df["rho"] == 0.99) & (df["mode"] == "parallel")]
    pc = ProjectionConfig("random", "parallel", 0.99)
    summary, _ = session.generation_scores("useful", pc, max_new_tokens=TOKENS, seed=1, compute=False,
                                           forward_scores=False)
    got = row.set_index("score")["value"]
    assert got["attack_success_rate"] == pytest.approx(summary["attack_success_rate"])
    assert got["exact_match"] == pytest.approx(summary["exact_match"])
    assert row["energy_kept"].iloc[0] == pytest.approx(session.engine("useful", seed=1).diagnostics(pc).energy_kept)
    assert row["energy_kept"].iloc[0] != pytest.approx(
        session.engine("useful", seed=0).diagnostics(pc).energy_kept)  # another draw keeps another energy


@pytest.mark.slow
def test_energy_match_is_the_closest_reachable_energy(session):
    top = session.engine("useful")
    for sub, mode, rho in (("randomk", "parallel", 0.5), ("random", "orthogonal", 0.01), ("randomk", "orthogonal", 0.99)):
        m = E.session_match(session, "useful", sub, mode, rho, seeds=(0, 1))
        draws = [session.engine("useful", seed=s).diagnostics(ProjectionConfig(sub, mode, rho)).energy_kept
                 for s in (0, 1)]
        assert draws[0] != pytest.approx(draws[1])  # two draws keep two energies; the target is their mean
        assert m.target == pytest.approx(np.mean(draws)) and m.rho == rho
        assert m.energy == pytest.approx(top.diagnostics(ProjectionConfig("topk", mode, m.rho_topk)).energy_kept)
        brute = min(abs(top.diagnostics(ProjectionConfig("topk", mode, i / 1000)).energy_kept - m.target)
                    for i in range(1, 1001))
        assert abs(m.gap) <= brute + 1e-12
        assert m.reachable == (abs(m.gap) <= E.ENERGY_TOL)
    # on tiny, Top-K's first direction of each tensor already keeps more of the task update than Random keeps at
    # half rank: matched at the smallest grid rank and reported as not reachable
    m = E.session_match(session, "useful", "random", "parallel", 0.5, seeds=(1,))
    assert m.rho_topk == 1 / E.RHO_GRID and not m.reachable and m.gap > 0.1
    # a target Top-K reaches exactly (its own energy at rho 0.3) is matched exactly
    own = top.diagnostics(ProjectionConfig("topk", "orthogonal", 0.3)).energy_kept
    m = E.match_energy(top, [own - 0.01, own + 0.01], "randomk", "orthogonal", 0.5)
    assert m.target == pytest.approx(own) and m.gap == pytest.approx(0.0, abs=1e-12) and m.reachable
    assert top.diagnostics(ProjectionConfig("topk", "orthogonal", m.rho_topk)).energy_kept == pytest.approx(own)
    # a target beyond Top-K's range is matched at the end of it and reported as not reachable
    m = E.match_energy(top, [2.0], "random", "parallel", 0.5)
    assert m.rho_topk == 1.0 and not m.reachable and m.gap < -0.1
    with pytest.raises(SafesubError, match="topk"):
        E.match_energy(top, [0.5], "topk", "parallel", 0.5)
    with pytest.raises(SafesubError, match="no control draws"):
        E.match_energy(top, [], "random", "parallel", 0.5)


@pytest.mark.slow
def test_paired_tests_pair_the_same_prompts_per_seed(session):
    cfg = P.PowerConfig(rhos=(0.5,), n_seeds=2, modes=("parallel",), gen_tokens=TOKENS, reads={})
    df = P.paired_tests(session, "useful", cfg, scores=("attack_success_rate", "exact_match"))
    assert list(df.columns) == P.TEST_COLUMNS
    assert len(df) == 2 * 2 * 2  # scores x controls x matches
    assert all(len(p) == 2 for p in df["p_seeds"]) and np.allclose(df["p"], [max(p) for p in df["p_seeds"]])
    assert df["n"].eq(N_PROMPTS).all()
    for r in df.itertuples():  # `differs` is exactly the documented rule
        rule = r.p < P.ALPHA and r.net_prompts_min > P.MIN_PROMPTS and (r.diff_min > 0 or r.diff_max < 0)
        assert r.differs == rule
    # the rank-matched test of seed 1 is McNemar of the two cached tables
    pc_t, pc_r = ProjectionConfig("topk", "parallel", 0.5), ProjectionConfig("randomk", "parallel", 0.5)
    _, t_top = session.generation_scores("useful", pc_t, max_new_tokens=TOKENS, compute=False, forward_scores=False)
    _, t_ctl = session.generation_scores("useful", pc_r, max_new_tokens=TOKENS, seed=1, compute=False,
                                         forward_scores=False)
    ctl, top = P.paired_outcomes(t_ctl, t_top, "exact_match")
    row = df[(df["control"] == "randomk") & (df["match"] == "rank") & (df["score"] == "exact_match")].iloc[0]
    assert row["p_seeds"][1] == pytest.approx(mcnemar(ctl, top).p)
    assert row["rho_topk"] == 0.5
    # energy-matched rows: Top-K at the match's rank fraction against the controls' grid points
    erow = df[(df["control"] == "randomk") & (df["match"] == "energy") & (df["score"] == "exact_match")].iloc[0]
    m = E.session_match(session, "useful", "randomk", "parallel", 0.5, seeds=(0, 1))
    assert erow["rho_topk"] == m.rho_topk != 0.5
    assert erow["energy_topk"] == pytest.approx(m.energy)
    assert erow["energy_control"] == pytest.approx(m.target) == pytest.approx(row["energy_control"])
    _, t_match = session.generation_scores("useful", ProjectionConfig("topk", "parallel", m.rho_topk),
                                           max_new_tokens=TOKENS, compute=False, forward_scores=False)
    assert erow["topk_value"] == pytest.approx(P.outcomes(t_match, "exact_match")[1].mean())
    assert erow["p_seeds"][1] == pytest.approx(mcnemar(ctl, P.paired_outcomes(t_ctl, t_match, "exact_match")[1]).p)
    assert erow["energy_gap_max"] < row["energy_gap_max"]  # matching energy closes the gap rank matching leaves


@pytest.mark.slow
def test_f1_verdict_on_a_session(session):
    v = P.f1_verdict(session, P.PowerConfig(gen_tokens=TOKENS))
    assert v.verdict in VERDICTS
    assert v.verdict == P.combine_verdicts([c.verdict for c in v.changes])
    util, harm = v.changes
    assert util.after.n == harm.after.n == N_PROMPTS
    _, t = session.generation_scores("useful", ProjectionConfig("topk", "parallel", 0.99), max_new_tokens=TOKENS,
                                     compute=False, roles=("utility",),
                                     forward_scores=False)  # F1 reads the useful variant's utility
    assert util.after.value == pytest.approx(t[t["role"] == "utility"]["correct"].astype(bool).mean())
    assert not math.isnan(v.p_values["harm"])
    with pytest.raises(SafesubError):
        P.f1_verdict(session, util_variant="nope")


@pytest.mark.slow
def test_run_power_gathers_points_and_f1(session):
    cfg = P.PowerConfig(rhos=(0.99, 0.01), n_seeds=1, modes=("parallel",), subspaces=("topk", "random"),
                        gen_tokens=TOKENS)
    r = P.run_power(session, cfg, variants=("useful", "harmful", "absent"), tests=False)
    assert set(r.points["variant"]) == {"useful", "harmful"} and r.tests.empty
    assert [v.finding for v in r.verdicts] == ["F1"]
    t = r.verdict_table()
    assert list(t["finding"]) == ["F1"] and t["verdict"].iloc[0] in VERDICTS
    # F1 reads the Top-K points of the table: the change is the table's rate at 0.99 minus at 0.01
    em = r.points[(r.points["variant"] == "useful") & (r.points["subspace"] == "topk")
                  & (r.points["score"] == "exact_match")].set_index("rho")["value"]
    assert r.verdicts[0].changes[0].diff.value == pytest.approx(em[0.99] - em[0.01])
